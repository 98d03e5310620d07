//! `lifeboat drill` at the DR site: asks the daemon for a copy of a recovery point, runs
//! the check in this process (with the caller's rights, never the daemon's) against the
//! copies, then ends the drill, which removes them (unless `--keep`) and records the
//! result. Prints each step's time; their sum is the recovery time the drill measured.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use super::commands::{client, show};
use super::{Output, Target};
use crate::api::{DrillCheck, DrillEnded, DrillReport, DrillStarted, Step};

#[derive(Args, Debug)]
pub struct DrillArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(short, long)]
    pub protection: String,
    /// A kept recovery point (default: the newest).
    #[arg(long)]
    pub gen: Option<u64>,
    /// Remove kept drill ID (as `--keep` printed it) instead of starting one.
    #[arg(long, value_name = "ID", conflicts_with_all = ["gen", "check", "keep"])]
    pub end: Option<String>,
    /// Kubernetes mode: how long the drill's workloads may take to become ready.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// A shell command run against the copies, e.g. a database's own consistency check.
    /// It sees LIFEBOAT_DRILL_DIR (the first copy's directory, its working directory),
    /// LIFEBOAT_DRILL_GEN, and LIFEBOAT_DRILL_VOLUME_<NAME> (each copy's path; NAME in
    /// upper case, other characters as _). Kubernetes mode (CSI points): the point is
    /// restored into drill namespaces and the workloads are up when the check runs; it sees
    /// LIFEBOAT_DRILL_NAMESPACE (the first) and LIFEBOAT_DRILL_NAMESPACE_<NS> for each DR
    /// namespace, e.g. `kubectl -n "$LIFEBOAT_DRILL_NAMESPACE" exec deploy/db -- pg_isready`
    /// (your kubeconfig, your rights). Exit 0 passes the drill.
    #[arg(long)]
    pub check: Option<String>,
    /// The check fails when it runs longer (it is killed with its children).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub check_timeout: Duration,
    /// Leave the copies where they are (the daemon's restart keeps them too).
    #[arg(long)]
    pub keep: bool,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// `data-0.wal` -> `DATA_0_WAL`.
fn env_name(volume: &str) -> String {
    let v: String = volume
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("LIFEBOAT_DRILL_VOLUME_{v}")
}

/// Runs `cmd` against the drill's copies; its exit code (None: killed at the timeout)
/// and the end of its output.
fn run_check(cmd: &str, started: &DrillStarted, timeout: Duration) -> Result<DrillCheck> {
    let dir = started
        .files
        .values()
        .next()
        .and_then(|f| std::path::Path::new(f).parent().map(|p| p.to_path_buf()))
        .unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| ".".into()));
    let out = tempfile::tempfile()?;
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .current_dir(&dir)
        .env("LIFEBOAT_DRILL_DIR", &dir)
        .env("LIFEBOAT_DRILL_GEN", started.gen.to_string())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out.try_clone()?)
        // Its own process group, so a timeout kills its children too.
        .process_group(0);
    for (v, f) in &started.files {
        c.env(env_name(v), f);
    }
    if let Some(first) = started.namespaces.values().next() {
        c.env("LIFEBOAT_DRILL_NAMESPACE", first);
    }
    for (ns, drill) in &started.namespaces {
        c.env(
            env_name(ns).replace("LIFEBOAT_DRILL_VOLUME_", "LIFEBOAT_DRILL_NAMESPACE_"),
            drill,
        );
    }
    let mut child = c
        .spawn()
        .with_context(|| format!("run the check {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(s) = child.try_wait()? {
            break s.code();
        }
        if Instant::now() >= deadline {
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut text = String::new();
    let mut f = out;
    std::io::Seek::rewind(&mut f)?;
    f.read_to_string(&mut text).ok();
    let start = text.len().saturating_sub(4096);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let mut output = text[start..].to_string();
    if code.is_none() {
        output += &format!("\n(killed after {})", humantime::format_duration(timeout));
    }
    Ok(DrillCheck {
        command: cmd.to_string(),
        exit_code: code,
        output,
    })
}

pub fn run(a: DrillArgs) -> Result<ExitCode> {
    let api = client(&a.target)?;
    if let Some(id) = &a.end {
        let ended: DrillEnded = api.post(&format!(
            "/v1/protections/{}/drills/{id}/end?keep=false",
            a.protection
        ))?;
        show(a.output, &ended, |e| format!("drill {} removed\n", e.id))?;
        return Ok(ExitCode::SUCCESS);
    }
    let t = Instant::now();
    let mut path = format!(
        "/v1/protections/{}/drills?ready_timeout_secs={}",
        a.protection,
        a.ready_timeout.as_secs().max(1)
    );
    if let Some(g) = a.gen {
        path += &format!("&gen={g}");
    }
    let started: DrillStarted = api.post(&path)?;
    let mut steps = if started.steps.is_empty() {
        vec![Step {
            what: format!(
                "copy recovery point {} ({} volume(s), {})",
                started.gen,
                started.files.len(),
                started.method
            ),
            seconds: t.elapsed().as_secs_f64(),
        }]
    } else {
        started.steps.clone()
    };
    // Workloads that never came up fail the drill; the check would only confirm it.
    let ready = started.not_ready.is_empty();
    let check = match &a.check {
        Some(cmd) if ready => {
            let t = Instant::now();
            let c = run_check(cmd, &started, a.check_timeout);
            steps.push(Step {
                what: format!("check: {cmd}"),
                seconds: t.elapsed().as_secs_f64(),
            });
            Some(c)
        }
        _ => None,
    };
    // The drill is ended whatever the check did, so its copies never stay by accident.
    let (check, check_error) = match check {
        Some(Ok(c)) => (Some(c), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let passed =
        ready && check_error.is_none() && check.as_ref().is_none_or(|c| c.exit_code == Some(0));
    let rto: f64 = steps.iter().map(|s| s.seconds).sum();
    let t = Instant::now();
    let ended: DrillEnded = api.post(&format!(
        "/v1/protections/{}/drills/{}/end?passed={passed}&seconds={rto}&keep={}",
        a.protection, started.id, a.keep
    ))?;
    steps.push(Step {
        what: if a.keep {
            "keep the copies".into()
        } else {
            "remove the copies".into()
        },
        seconds: t.elapsed().as_secs_f64(),
    });
    if let Some(e) = check_error {
        return Err(e);
    }
    let r = DrillReport {
        started,
        steps,
        rto_seconds: rto,
        check,
        passed,
        ended,
    };
    show(a.output, &r, super::render::render_drill)?;
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn volume_names_become_environment_names() {
        assert_eq!(
            super::env_name("prod.data-0"),
            "LIFEBOAT_DRILL_VOLUME_PROD_DATA_0"
        );
    }
}
