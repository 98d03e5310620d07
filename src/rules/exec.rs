//! Running one action in one place: a local process (`sh -c`), or a container through the
//! pods/exec API. Foreground actions run to completion within their timeout (and are killed
//! after it); background actions run until they announce that they hold their lock
//! (`${WAIT_CMD}`), and are ended after the snapshot by closing their stdin.

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

    pub fn ok(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    pub fn describe(&self) -> String {
        let what = format!("rule {}: `{}` in {}", self.rule, self.command, self.target);
        if self.timed_out {
            format!("{what} outlived its timeout and was killed")
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

fn argv(a: &Action) -> Vec<String> {
    match &a.argv {
        Some(v) => v.clone(),
        None => vec![
            "/bin/sh".into(),
            "-c".into(),
            a.command.replace("${WAIT_CMD}", WAIT_CMD),
        ],
    }
}

/// An action's process, whichever way it runs.
struct Proc {
    stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    stdout: Option<Box<dyn AsyncRead + Send + Unpin>>,
    stderr: Option<Box<dyn AsyncRead + Send + Unpin>>,
    wait: std::pin::Pin<Box<dyn std::future::Future<Output = Option<i32>> + Send>>,
}

impl Proc {
    /// Waits for the exit code while draining stdout and stderr (a full pipe would stall
    /// the command); returns the code and the tail of stderr.
    async fn finish(mut self) -> (Option<i32>, String) {
        let stderr = read_all(self.stderr.take());
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
    async fn spawn(&self, target: &Target, a: &Action) -> Result<Proc> {
        let args = argv(a);
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
                    stderr: child.stderr.take().map(|s| Box::new(s) as _),
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
                Ok(Proc {
                    stdin: p.stdin().map(|s| Box::new(s) as _),
                    stdout: p.stdout().map(|s| Box::new(s) as _),
                    stderr: p.stderr().map(|s| Box::new(s) as _),
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
        let work = async { Ok::<_, anyhow::Error>(self.spawn(target, a).await?.finish().await) };
        match tokio::time::timeout(a.timeout, work).await {
            Ok(Ok((code, err))) => {
                out.exit_code = code;
                out.stderr = err;
            }
            Ok(Err(e)) => out.stderr = format!("{e:#}"),
            // Dropping the work kills a local child (kill_on_drop) or closes the exec stream.
            Err(_) => out.timed_out = true,
        }
        out.seconds = started.elapsed().as_secs_f64();
        out
    }

    /// Starts a background action and waits (within its timeout) until it holds its lock.
    pub async fn start(&self, rule: &str, target: &Target, a: &Action) -> Result<Holding, Outcome> {
        let started = Instant::now();
        let mut out = Outcome::new(rule, target, a);
        let waits = a.command.contains("${WAIT_CMD}");
        let spawned = tokio::time::timeout(a.timeout, async {
            let mut p = self.spawn(target, a).await?;
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
            Ok(Ok(p)) => Ok(Holding {
                proc: p,
                outcome: out,
                started,
                timeout: a.timeout,
            }),
            Ok(Err(e)) => {
                out.stderr = format!("{e:#}");
                out.seconds = started.elapsed().as_secs_f64();
                Err(out)
            }
            Err(_) => {
                out.timed_out = true;
                out.seconds = started.elapsed().as_secs_f64();
                Err(out)
            }
        }
    }
}

async fn read_all(r: Option<Box<dyn AsyncRead + Send + Unpin>>) -> String {
    let Some(mut r) = r else { return String::new() };
    let mut buf = Vec::new();
    let _ = r.read_to_end(&mut buf).await;
    let tail = buf.len().saturating_sub(4096);
    String::from_utf8_lossy(&buf[tail..]).into_owned()
}

/// A background action holding its lock.
pub struct Holding {
    proc: Proc,
    outcome: Outcome,
    started: Instant,
    timeout: Duration,
}

impl Holding {
    /// Ends the action: closes its stdin (its `${WAIT_CMD}` returns) and waits for it, killing
    /// it if it does not exit within its timeout.
    pub async fn end(mut self) -> Outcome {
        // Shut down, not just drop: an exec stream's stdin half only reports EOF (and so
        // sends the v5 close frame) when shut down.
        if let Some(mut stdin) = self.proc.stdin.take() {
            let _ = stdin.shutdown().await;
        }
        match tokio::time::timeout(self.timeout, self.proc.finish()).await {
            Ok((code, err)) => {
                self.outcome.exit_code = code;
                self.outcome.stderr = err;
            }
            Err(_) => self.outcome.timed_out = true,
        }
        self.outcome.seconds = self.started.elapsed().as_secs_f64();
        self.outcome
    }
}
