//! Running one action in one place: a local process (`sh -c`), or a container through the
//! pods/exec API. Foreground actions run to completion within their timeout (and are killed
//! after it); background actions run until they announce that they hold their lock
//! (`${WAIT_CMD}`), and are ended after the snapshot by a line on their stdin (which exec
//! protocol v4 can send as well as v5; v4 cannot close stdin).
//!
//! Dropping an exec connection does not end the command in the container (the kubelet
//! lets it run), so a shell command in a pod first prints its shell's PID; after a timeout
//! a second exec kills that process and its descendants (found through `/proc`). An action
//! given as an argv (Velero's hooks) runs as is, without the wrapper: it cannot be killed
//! that way, and its timeout only ends lifeboat's wait.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, AttachedProcess};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::{Action, WAIT_CMD, WAIT_MARKER};

/// Where an action runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Local,
    Pod {
        namespace: String,
        name: String,
        container: Option<String>,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Local => f.write_str("this host"),
            Target::Pod {
                namespace,
                name,
                container: Some(c),
            } => write!(f, "pod {namespace}/{name} (container {c})"),
            Target::Pod {
                namespace, name, ..
            } => write!(f, "pod {namespace}/{name}"),
        }
    }
}

/// The result of one action in one place.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    pub rule: String,
    pub target: String,
    pub command: String,
    pub exit_code: Option<i32>,
    pub stderr: String,
    pub timed_out: bool,
    pub seconds: f64,
}

impl Outcome {
    /// Not yet run: what, where, by which rule.
    fn new(rule: &str, target: &Target, a: &Action) -> Outcome {
        Outcome {
            rule: rule.to_string(),
            target: target.to_string(),
            command: a.command.clone(),
            ..Default::default()
        }
    }

    /// An action that could not run in `target`, and why.
    pub fn not_run(rule: &str, target: &Target, a: &Action, why: &str) -> Outcome {
        Outcome {
            stderr: why.to_string(),
            ..Outcome::new(rule, target, a)
        }
    }

    pub fn ok(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    pub fn describe(&self) -> String {
        let what = format!("rule {}: `{}` in {}", self.rule, self.command, self.target);
        if self.timed_out {
            format!("{what} outlived its timeout and was killed")
        } else if self.exit_code.is_none() && !self.stderr.is_empty() {
            format!("{what} did not run: {}", self.stderr.trim())
        } else {
            format!(
                "{what} exited with {} (stderr: {:?})",
                self.exit_code
                    .map_or("no exit code".to_string(), |c| c.to_string()),
                self.stderr.trim()
            )
        }
    }
}

/// Runs actions: locally, or in pods through this client.
#[derive(Clone)]
pub enum Executor {
    Local,
    Kube(kube::Client),
}

/// What a wrapped command in a pod prints first: `lifeboat-pid PID`.
const PID_MARKER: &str = "lifeboat-pid";

/// Kills process `{pid}` and every descendant, children first.
const KILL_TREE: &str = r#"t() { for c in $(grep -l "^PPid:[[:space:]]*$1\$" /proc/[0-9]*/status 2>/dev/null | cut -d/ -f3); do t "$c"; done; kill -KILL "$1" 2>/dev/null; }; t {pid}"#;

/// The process to start; in a pod, a shell command is wrapped to print its PID first.
fn argv(a: &Action, in_pod: bool) -> Vec<String> {
    match &a.argv {
        Some(v) => v.clone(),
        None => {
            let cmd = a.command.replace("${WAIT_CMD}", WAIT_CMD);
            let cmd = if in_pod {
                format!("echo {PID_MARKER} $$; {cmd}")
            } else {
                cmd
            };
            vec!["/bin/sh".into(), "-c".into(), cmd]
        }
    }
}

/// The PID a wrapped command printed, once it has.
type Pid = std::sync::Arc<std::sync::OnceLock<u32>>;

/// An action's process, whichever way it runs.
struct Proc {
    stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    stdout: Option<Box<dyn AsyncRead + Send + Unpin>>,
    /// Drained from the start into its tail: a command that writes more stderr than the
    /// exec stream buffers would otherwise stall before it prints its lock marker.
    stderr: Option<tokio::task::JoinHandle<String>>,
    wait: std::pin::Pin<Box<dyn std::future::Future<Output = Option<i32>> + Send>>,
}

impl Proc {
    /// Waits for the exit code while draining stdout and stderr (a full pipe would stall
    /// the command); returns the code and the tail of stderr.
    async fn finish(mut self) -> (Option<i32>, String) {
        let stderr = async {
            match self.stderr.take() {
                Some(t) => t.await.unwrap_or_default(),
                None => String::new(),
            }
        };
        let stdout = read_all(self.stdout.take());
        let (code, err, _) = tokio::join!(self.wait, stderr, stdout);
        (code, err)
    }
}

fn exit_code_of(
    status: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>,
) -> Option<i32> {
    let s = status?;
    if s.status.as_deref() == Some("Success") {
        return Some(0);
    }
    s.details
        .and_then(|d| d.causes)
        .into_iter()
        .flatten()
        .find(|c| c.reason.as_deref() == Some("ExitCode"))
        .and_then(|c| c.message)
        .and_then(|m| m.parse().ok())
        .or(Some(-1))
}

impl Executor {
    /// Starts the action; in a pod, a wrapped command's PID is put in `pid`.
    async fn spawn(&self, target: &Target, a: &Action, pid: &Pid) -> Result<Proc> {
        let args = argv(a, matches!(target, Target::Pod { .. }));
        match (self, target) {
            (Executor::Local, _) => {
                let mut child = tokio::process::Command::new(&args[0])
                    .args(&args[1..])
                    .stdin(if a.background {
                        Stdio::piped()
                    } else {
                        Stdio::null()
                    })
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| anyhow!("could not start {}: {e}", args[0]))?;
                Ok(Proc {
                    stdin: child.stdin.take().map(|s| Box::new(s) as _),
                    stdout: child.stdout.take().map(|s| Box::new(s) as _),
                    stderr: drain(child.stderr.take().map(|s| Box::new(s) as _)),
                    wait: Box::pin(async move { child.wait().await.ok().and_then(|s| s.code()) }),
                })
            }
            (
                Executor::Kube(client),
                Target::Pod {
                    namespace,
                    name,
                    container,
                },
            ) => {
                let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
                let mut ap = AttachParams::default()
                    .stdin(a.background)
                    .stdout(true)
                    .stderr(true);
                if let Some(c) = container {
                    ap = ap.container(c.clone());
                }
                let mut p: AttachedProcess = pods.exec(name, args, &ap).await.map_err(|e| {
                    crate::k8s::api_error(e, format!("exec in pod {namespace}/{name}"))
                })?;
                let status = p.take_status();
                let mut stdout: Option<Box<dyn AsyncRead + Send + Unpin>> =
                    p.stdout().map(|s| Box::new(s) as _);
                if a.argv.is_none() {
                    if let Some(out) = stdout.take() {
                        let mut r = BufReader::new(out);
                        let mut first = String::new();
                        r.read_line(&mut first).await?;
                        match first.trim().strip_prefix(PID_MARKER).map(str::trim) {
                            Some(n) if n.parse::<u32>().is_ok() => {
                                let _ = pid.set(n.parse().expect("checked"));
                                stdout = Some(Box::new(r));
                            }
                            // Not the wrapper's line: the command's own output, kept.
                            _ => {
                                let kept = std::io::Cursor::new(first.into_bytes());
                                stdout = Some(Box::new(kept.chain(r)));
                            }
                        }
                    }
                }
                Ok(Proc {
                    stdin: p.stdin().map(|s| Box::new(s) as _),
                    stdout,
                    stderr: drain(p.stderr().map(|s| Box::new(s) as _)),
                    wait: Box::pin(async move {
                        let code = match status {
                            Some(s) => exit_code_of(s.await),
                            None => None,
                        };
                        // The process handle owns the websocket; keep it until the end.
                        drop(p);
                        code
                    }),
                })
            }
            (Executor::Kube(_), Target::Local) => {
                Err(anyhow!("a Kubernetes executor runs in pods only"))
            }
        }
    }

    /// Runs a foreground action to completion, killing it after its timeout.
    pub async fn run(&self, rule: &str, target: &Target, a: &Action) -> Outcome {
        let started = Instant::now();
        let mut out = Outcome::new(rule, target, a);
        let pid = Pid::default();
        let work =
            async { Ok::<_, anyhow::Error>(self.spawn(target, a, &pid).await?.finish().await) };
        match tokio::time::timeout(a.timeout, work).await {
            Ok(Ok((code, err))) => {
                out.exit_code = code;
                out.stderr = err;
            }
            Ok(Err(e)) => out.stderr = format!("{e:#}"),
            // Dropping the work kills a local child (kill_on_drop) or closes the exec
            // stream, which leaves the command running in the container: kill it there.
            Err(_) => {
                out.timed_out = true;
                out.stderr = self.kill(target, &pid).await;
            }
        }
        out.seconds = started.elapsed().as_secs_f64();
        out
    }

    /// Ends a timed-out command in its container; what happened, for the outcome.
    async fn kill(&self, target: &Target, pid: &Pid) -> String {
        let Target::Pod { .. } = target else {
            return String::new();
        };
        let Some(pid) = pid.get() else {
            return "it had not started (no PID seen); nothing to kill".into();
        };
        // As an argv, so it is not wrapped to print a PID of its own.
        let kill_tree = KILL_TREE.replace("{pid}", &pid.to_string());
        let a = Action {
            argv: Some(vec!["/bin/sh".into(), "-c".into(), kill_tree.clone()]),
            command: kill_tree,
            background: false,
            single_pod: false,
            timeout: Duration::from_secs(10),
            on_error: super::OnError::Continue,
        };
        let done = tokio::time::timeout(a.timeout, async {
            self.spawn(target, &a, &Pid::default())
                .await?
                .finish()
                .await;
            Ok::<_, anyhow::Error>(())
        })
        .await;
        match done {
            Ok(Ok(())) => format!("killed process {pid} and its children in the container"),
            Ok(Err(e)) => format!("could not kill process {pid} in the container: {e:#}"),
            Err(_) => format!("could not kill process {pid} in the container: the kill timed out"),
        }
    }

    /// Starts a background action and waits (within its timeout) until it holds its lock.
    pub async fn start(&self, rule: &str, target: &Target, a: &Action) -> Result<Holding, Outcome> {
        let started = Instant::now();
        let mut out = Outcome::new(rule, target, a);
        let waits = a.command.contains("${WAIT_CMD}");
        let pid = Pid::default();
        let spawned = tokio::time::timeout(a.timeout, async {
            let mut p = self.spawn(target, a, &pid).await?;
            if waits {
                let mut lines = BufReader::new(p.stdout.take().expect("stdout piped")).lines();
                loop {
                    match lines.next_line().await? {
                        Some(l) if l.trim() == WAIT_MARKER => break,
                        Some(_) => continue,
                        None => return Err(anyhow!("exited before it held its lock")),
                    }
                }
                p.stdout = Some(Box::new(lines.into_inner()));
            }
            Ok::<_, anyhow::Error>(p)
        })
        .await;
        match spawned {
            Ok(Ok(p)) => Ok(Holding(Some(Held {
                proc: p,
                outcome: out,
                started,
                timeout: a.timeout,
                kill: (self.clone(), target.clone(), pid),
            }))),
            Ok(Err(e)) => {
                out.stderr = format!("{e:#}");
                out.seconds = started.elapsed().as_secs_f64();
                Err(out)
            }
            Err(_) => {
                out.timed_out = true;
                out.stderr = self.kill(target, &pid).await;
                out.seconds = started.elapsed().as_secs_f64();
                Err(out)
            }
        }
    }
}

/// Reads `r` to its end in a task of its own; the task's result is the tail.
fn drain(r: Option<Box<dyn AsyncRead + Send + Unpin>>) -> Option<tokio::task::JoinHandle<String>> {
    r.map(|r| tokio::spawn(read_all(Some(r))))
}

async fn read_all(r: Option<Box<dyn AsyncRead + Send + Unpin>>) -> String {
    let Some(mut r) = r else { return String::new() };
    let mut buf = Vec::new();
    let _ = r.read_to_end(&mut buf).await;
    let tail = buf.len().saturating_sub(4096);
    String::from_utf8_lossy(&buf[tail..]).into_owned()
}

/// A background action holding its lock.
///
/// Dropped without [`Holding::end`] (a cycle cancelled at shutdown while the snapshot is
/// taken), it is ended anyway, in a task of its own: otherwise a local holder would be
/// killed before its unlock step ran, and one in a pod would hold its lock on.
pub struct Holding(Option<Held>);

struct Held {
    proc: Proc,
    outcome: Outcome,
    started: Instant,
    timeout: Duration,
    /// Where it runs, to kill it there if it does not end.
    kill: (Executor, Target, Pid),
}

impl Drop for Holding {
    fn drop(&mut self) {
        if let (Some(h), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let o = h.end().await;
                tracing::warn!(rule = %o.rule, target = %o.target, ok = o.ok(), "background action ended after its cycle was cancelled");
            });
        }
    }
}

impl Holding {
    /// Ends the action: a line on its stdin (its `${WAIT_CMD}` returns), then stdin closed,
    /// and waits for it, killing it if it does not exit within its timeout.
    pub async fn end(mut self) -> Outcome {
        self.0.take().expect("ended once").end().await
    }
}

impl Held {
    async fn end(mut self) -> Outcome {
        // The line is what v4 can send; the shutdown (not just a drop: an exec stream's
        // stdin half only sends the v5 close frame when shut down) is for commands that
        // read to the end.
        if let Some(mut stdin) = self.proc.stdin.take() {
            let _ = stdin.write_all(b"done\n").await;
            let _ = stdin.flush().await;
            let _ = stdin.shutdown().await;
        }
        match tokio::time::timeout(self.timeout, self.proc.finish()).await {
            Ok((code, err)) => {
                self.outcome.exit_code = code;
                self.outcome.stderr = err;
            }
            Err(_) => {
                self.outcome.timed_out = true;
                let (executor, target, pid) = &self.kill;
                self.outcome.stderr = executor.kill(target, pid).await;
            }
        }
        self.outcome.seconds = self.started.elapsed().as_secs_f64();
        self.outcome
    }
}
