//! Local pre/post commands around a group snapshot: pre commands run in order and a failure
//! aborts the snapshot; post commands always run once a pre command started.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::process::Command;

/// A pre or post command failed; the cycle reports it as a hook error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HookFailed(pub String);

/// Outcome of one command, for status and errors.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HookResult {
    pub command: String,
    pub exit_code: Option<i32>,
    pub stderr: String,
    pub timed_out: bool,
    pub seconds: f64,
}

impl HookResult {
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    pub fn describe(&self) -> String {
        if self.timed_out {
            format!("`{}` timed out and was killed", self.command)
        } else {
            format!(
                "`{}` exited with {} (stderr: {:?})",
                self.command,
                self.exit_code
                    .map_or("a signal".to_string(), |c| c.to_string()),
                self.stderr.trim()
            )
        }
    }
}

/// Runs `command` with `sh -c`, killing it after `timeout`.
pub async fn run(command: &str, timeout: Duration) -> HookResult {
    let started = Instant::now();
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut result = HookResult {
        command: command.to_string(),
        exit_code: None,
        stderr: String::new(),
        timed_out: false,
        seconds: 0.0,
    };
    match child {
        Err(e) => result.stderr = format!("could not start /bin/sh: {e}"),
        Ok(child) => match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => {
                result.exit_code = out.status.code();
                let tail = out.stderr.len().saturating_sub(4096);
                result.stderr = String::from_utf8_lossy(&out.stderr[tail..]).into_owned();
            }
            Ok(Err(e)) => result.stderr = format!("wait failed: {e}"),
            // Dropping the future kills the child (kill_on_drop).
            Err(_) => result.timed_out = true,
        },
    }
    result.seconds = started.elapsed().as_secs_f64();
    result
}

/// Runs `pre`, then `body` if every pre command succeeded, then `post` always.
/// Returns the body's value and the freeze window (first pre start to last post end).
pub async fn around<T>(
    pre: &[String],
    post: &[String],
    timeout: Duration,
    body: impl std::future::Future<Output = Result<T>>,
) -> Result<(T, Duration)> {
    let started = Instant::now();
    let mut failure = None;
    for cmd in pre {
        let r = run(cmd, timeout).await;
        if !r.ok() {
            failure = Some(r);
            break;
        }
    }
    let value = match failure {
        None => Some(body.await),
        Some(_) => None,
    };
    let mut post_failures = Vec::new();
    for cmd in post {
        let r = run(cmd, timeout).await;
        if !r.ok() {
            post_failures.push(r.describe());
        }
    }
    let window = started.elapsed();
    if let Some(f) = failure {
        return Err(HookFailed(format!("pre command {}; snapshot not taken", f.describe())).into());
    }
    let value = value.expect("body ran")?;
    if !post_failures.is_empty() {
        return Err(HookFailed(format!("post command {}", post_failures.join("; "))).into());
    }
    Ok((value, window))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failed_pre_skips_body_but_runs_post() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("post-ran");
        let post = vec![format!("touch {}", marker.display())];
        let mut body_ran = false;
        let err = around(
            &["echo broken >&2; exit 3".to_string()],
            &post,
            Duration::from_secs(10),
            async {
                body_ran = true;
                Ok(())
            },
        )
        .await
        .unwrap_err();
        assert!(!body_ran);
        assert!(marker.exists());
        let msg = err.to_string();
        assert!(
            msg.contains("exited with 3") && msg.contains("broken"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn command_outliving_its_timeout_is_killed_and_reported() {
        let r = run("sleep 30", Duration::from_millis(200)).await;
        assert!(r.timed_out && !r.ok());
        assert!(r.describe().contains("timed out"));
    }
}
