//! pods/exec as a real kubelet runs it, for [`super::kubeapi`]: the command runs as a real
//! process (here, on this machine, standing in for the container), its stdout and stderr
//! stream on channels 1 and 2, channel 0 feeds its stdin, v5's `[255, 0]` closes stdin,
//! and the exit code comes on channel 3. A connection that drops does NOT end the process:
//! a real kubelet lets an exec'd command run on when its client goes away, which is what a
//! caller that times out must deal with.
//!
//! Not modelled: TTYs, resize (channel 4), and the container's own file system and PID
//! namespace (the process sees this machine's).

use std::process::Stdio;

use axum::extract::ws::{Message, WebSocket};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `argv` and speaks the channel protocol over `socket` until it exits.
pub async fn run_local(mut socket: WebSocket, argv: Vec<String>) {
    let frame = |ch: u8, data: &[u8]| {
        let mut b = vec![ch];
        b.extend_from_slice(data);
        Message::Binary(b.into())
    };
    let spawned = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let st = json!({"metadata": {}, "status": "Failure", "message": format!("exec: {e}"), "reason": "InternalError"});
            let _ = socket.send(frame(3, st.to_string().as_bytes())).await;
            return;
        }
    };
    let mut stdin = child.stdin.take();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (mut ob, mut eb) = (vec![0u8; 8192], vec![0u8; 8192]);
    let (mut out_open, mut err_open) = (true, true);
    loop {
        tokio::select! {
            n = out.read(&mut ob), if out_open => match n {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => if socket.send(frame(1, &ob[..n])).await.is_err() { return detach(child) },
            },
            n = err.read(&mut eb), if err_open => match n {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => if socket.send(frame(2, &eb[..n])).await.is_err() { return detach(child) },
            },
            m = socket.recv() => match m {
                Some(Ok(Message::Binary(b))) => match b.first() {
                    Some(0) => if let Some(s) = stdin.as_mut() { let _ = s.write_all(&b[1..]).await; let _ = s.flush().await; },
                    Some(255) if b.get(1) == Some(&0) => stdin = None,
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return detach(child),
                _ => {}
            },
            code = child.wait(), if !out_open && !err_open => {
                let code = code.ok().and_then(|s| s.code()).unwrap_or(-1);
                let st = if code == 0 {
                    json!({"metadata": {}, "status": "Success"})
                } else {
                    json!({"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                        "message": format!("command terminated with non-zero exit code: exit code {code}"),
                        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
                };
                let _ = socket.send(frame(3, st.to_string().as_bytes())).await;
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
    }
}

/// The client went away: the process runs on (and is reaped when it ends).
fn detach(mut child: tokio::process::Child) {
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
}
