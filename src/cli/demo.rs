//! `lifeboat demo`: two sites on this machine. Makes certificates, configs and a volume
//! group with realistic data, starts both daemons on loopback, runs the initial sync and
//! incremental cycles while a writer keeps changing the volumes (paused by the pre hook,
//! released by the post hook), fails over, and proves by blake3 that every recovered replica
//! equals the primary's snapshot of the recovered gen. Exits non-zero if a check fails.

use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, RngCore, SeedableRng};

use super::render::{human_bytes, render_cycle, render_failover};
use crate::api::Client;
use crate::api::{CycleReport, FailoverReport, SiteStatus};
use crate::volume::file_blake3;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Size of the main data volume (a second, WAL-like volume is 1/8 of it).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub size: u64,
    /// Incremental cycles to run after the initial sync.
    #[arg(long, default_value_t = 4)]
    pub cycles: u32,
    /// Work in this directory instead of a temporary one (kept afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the temporary directory (daemon logs, state, replicas) for inspection.
    #[arg(long)]
    pub keep: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    crate::config::parse_size(s)
}

fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Writes `size` bytes that look like a database file: text-like pages, random (already
/// compressed) pages and runs of zeros.
fn write_realistic(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut page = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let mut line = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(page.len());
        match rng.random_range(0..10) {
            0..=3 => {
                let mut text = Vec::with_capacity(n);
                while text.len() < n {
                    line += 1;
                    writeln!(
                        text,
                        "{line:012} INSERT INTO orders VALUES ({}, 'customer-{}', {}.{:02});",
                        line,
                        rng.random_range(0..100_000),
                        rng.random_range(1..999),
                        rng.random_range(0..100)
                    )?;
                }
                page[..n].copy_from_slice(&text[..n]);
            }
            4..=6 => rng.fill_bytes(&mut page[..n]),
            _ => page[..n].fill(0),
        }
        if page[..n].iter().any(|&b| b != 0) {
            f.write_all_at(&page[..n], off)?;
        }
        off += n as u64;
    }
    f.set_len(size)?;
    Ok(())
}

struct Daemon {
    child: Child,
    name: &'static str,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("{} daemon did not stop on SIGTERM; killed", self.name);
    }
}

fn start(name: &'static str, config: &Path, log: &Path) -> Result<Daemon> {
    let exe = std::env::current_exe().context("find the lifeboat executable")?;
    let child = Command::new(exe)
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log)?)
        .spawn()
        .with_context(|| format!("start the {name} daemon"))?;
    Ok(Daemon { child, name })
}

fn wait_ready(d: &mut Daemon, client: &Client, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = d.child.try_wait()? {
            bail!(
                "the {} daemon exited ({status}); its log {}:\n{}",
                d.name,
                log.display(),
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        if client
            .get_text("/readyz")
            .map(|t| t.starts_with("ready"))
            .unwrap_or(false)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "the {} daemon did not become ready in 60s; see {}",
        d.name,
        log.display()
    )
}

/// Runs a sync while printing the primary's activity, like a progress line.
fn sync_with_progress(primary: &Client, control: &str) -> Result<CycleReport> {
    let addr = control.to_string();
    let handle = std::thread::spawn(move || {
        Client::at(&addr).post::<CycleReport>("/v1/protections/demo-db/sync")
    });
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut shown = String::new();
    while !handle.is_finished() {
        if let Ok(s) = primary.get::<SiteStatus>("/v1/status") {
            let a: String = s.protections[0].activity.chars().take(70).collect();
            if tty {
                eprint!("\r  [{:5.1}s] {a:<70}", started.elapsed().as_secs_f64());
            } else if a != shown && a != "idle" {
                // Not a terminal: one line per phase, not a spinner.
                let phase = a.split(": ").take(2).collect::<Vec<_>>().join(": ");
                if !shown.starts_with(&phase) {
                    eprintln!("  [{:5.1}s] {a}", started.elapsed().as_secs_f64());
                }
                shown = a;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    if tty {
        eprint!("\r{:<90}\r", "");
    }
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("sync thread panicked"))?
}

/// A writer that keeps changing both volumes (the data file first, then the WAL) until
/// stopped, and pauses while the pre hook's quiesce file exists.
fn writer(
    dir: PathBuf,
    data: PathBuf,
    wal: PathBuf,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let d = OpenOptions::new().write(true).open(&data)?;
    let w = OpenOptions::new().write(true).open(&wal)?;
    let (dsize, wsize) = (d.metadata()?.len(), w.metadata()?.len());
    let (quiesce, quiesced) = (dir.join("quiesce"), dir.join("quiesced"));
    let mut block = vec![0u8; 4096];
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if quiesce.exists() {
            fs::write(&quiesced, b"")?;
            while quiesce.exists() && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
            continue;
        }
        seq += 1;
        rng.fill_bytes(&mut block);
        block[..8].copy_from_slice(&seq.to_le_bytes());
        let off = rng.random_range(0..dsize / 4096) * 4096;
        d.write_all_at(&block, off)?;
        let woff = (seq * 4096) % (wsize - 4096);
        w.write_all_at(&block, woff)?;
        writes.fetch_add(1, Ordering::Relaxed);
        // About 40 random 4 KiB page writes a second, plus the WAL append: a steady OLTP load.
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("lifeboat-demo-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let result = demo(&args, &dir, started);
    let keep = args.keep || args.dir.is_some() || result.as_ref().map(|ok| !ok).unwrap_or(true);
    if keep {
        let kept = dir.join(".kept");
        let _ = fs::write(kept, b"");
        eprintln!("kept {} (daemon logs: primary.log, dr.log)", dir.display());
        std::mem::forget(dir);
    }
    match result {
        Ok(true) => Ok(ExitCode::SUCCESS),
        Ok(false) => Ok(ExitCode::from(1)),
        Err(e) => Err(e),
    }
}

fn demo(args: &DemoArgs, dir: &Path, started: Instant) -> Result<bool> {
    println!("lifeboat demo in {}", dir.display());
    let certs = dir.join("certs");
    crate::net::tls::generate(&certs, &["primary".into(), "dr".into()], &[])?;
    let (quic, pctl, dctl) = (free_udp_port()?, free_tcp_port()?, free_tcp_port()?);
    let vols = dir.join("primary/volumes");
    let replicas = dir.join("dr/replicas");
    fs::create_dir_all(&vols)?;
    let (data, wal) = (vols.join("data.img"), vols.join("wal.img"));
    println!(
        "1. writing a {} data volume and a {} WAL volume with mixed text, random and zero pages",
        human_bytes(args.size),
        human_bytes(args.size / 8)
    );
    write_realistic(&data, args.size, 1)?;
    write_realistic(&wal, (args.size / 8).max(1 << 20), 2)?;
    let hooks = format!(
        "pre = [\"touch {d}/quiesce; i=0; while [ ! -e {d}/quiesced ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done; [ -e {d}/quiesced ]\"]\npost = [\"rm -f {d}/quiesce {d}/quiesced\"]",
        d = dir.display()
    );
    let primary_cfg = dir.join("primary.toml");
    fs::write(&primary_cfg, format!(
        "[site]\nname = \"primary\"\nrole = \"primary\"\nstate_dir = \"primary/state\"\n\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/primary.pem\"\nkey = \"certs/primary.key\"\n\n[peer]\naddress = \"127.0.0.1:{quic}\"\nserver_name = \"dr\"\n\n[control]\naddress = \"127.0.0.1:{pctl}\"\n\n[[protection]]\nname = \"demo-db\"\ninterval = \"1h\"\nsync_on_start = false\nrpo_target = \"1m\"\n{hooks}\n\n[[protection.volume]]\nname = \"data\"\npath = \"{}\"\n\n[[protection.volume]]\nname = \"wal\"\npath = \"{}\"\n",
        data.display(), wal.display()))?;
    let dr_cfg = dir.join("dr.toml");
    fs::write(&dr_cfg, format!(
        "[site]\nname = \"dr\"\nrole = \"dr\"\nstate_dir = \"dr/state\"\n\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/dr.pem\"\nkey = \"certs/dr.key\"\n\n[listen]\naddress = \"127.0.0.1:{quic}\"\n\n[control]\naddress = \"127.0.0.1:{dctl}\"\n\n[[protection]]\nname = \"demo-db\"\nrpo_target = \"1m\"\n\n[[protection.volume]]\nname = \"data\"\npath = \"{}\"\n\n[[protection.volume]]\nname = \"wal\"\npath = \"{}\"\n",
        replicas.join("data.img").display(), replicas.join("wal.img").display()))?;

    println!("2. starting the DR daemon (QUIC 127.0.0.1:{quic}) and the primary daemon, mutual TLS from a fresh pair CA");
    let (plog, dlog) = (dir.join("primary.log"), dir.join("dr.log"));
    let mut dr = start("dr", &dr_cfg, &dlog)?;
    let drc = Client::at(&format!("127.0.0.1:{dctl}"));
    wait_ready(&mut dr, &drc, &dlog)?;
    let mut primary = start("primary", &primary_cfg, &plog)?;
    let pc = Client::at(&format!("127.0.0.1:{pctl}"));
    wait_ready(&mut primary, &pc, &plog)?;
    let pctl_addr = format!("127.0.0.1:{pctl}");

    println!("3. a writer starts changing both volumes (it pauses only between the pre and post hooks); initial sync");
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let w = {
        let (d, da, wa, s, n) = (
            dir.to_path_buf(),
            data.clone(),
            wal.clone(),
            stop.clone(),
            writes.clone(),
        );
        std::thread::spawn(move || writer(d, da, wa, s, n))
    };
    let first = sync_with_progress(&pc, &pctl_addr)?;
    println!("   {}", render_cycle(&first));
    let mut total_sent = first.chunk_bytes_sent;

    println!(
        "4. {} incremental cycles while the writer keeps changing both volumes",
        args.cycles
    );
    let mut incremental_sent = 0;
    let mut last = first;
    for i in 1..=args.cycles {
        std::thread::sleep(Duration::from_secs(2));
        let r = sync_with_progress(&pc, &pctl_addr)?;
        println!(
            "   cycle {i}: {} (freeze {:.0} ms)",
            render_cycle(&r),
            r.phases.freeze * 1000.0
        );
        total_sent += r.chunk_bytes_sent;
        incremental_sent += r.chunk_bytes_sent;
        last = r;
    }
    stop.store(true, Ordering::Relaxed);
    w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    println!(
        "   the writer made {} 4 KiB writes to each volume",
        writes.load(Ordering::Relaxed)
    );

    println!("5. failover at the DR site");
    let fo: FailoverReport = drc.post("/v1/protections/demo-db/failover")?;
    print!("{}", render_failover(&fo));

    println!("6. checks");
    let mut ok = true;
    let mut check = |what: String, good: bool| {
        println!("   [{}] {what}", if good { "ok" } else { "FAILED" });
        ok &= good;
    };
    check(
        format!(
            "recovered gen {} is the last acknowledged gen {}",
            fo.recovered_gen.unwrap_or(0),
            last.gen
        ),
        fo.recovered_gen == Some(last.gen),
    );
    let snaps = dir
        .join("primary/state/snapshots/demo-db")
        .join(last.gen.to_string());
    for name in ["data", "wal"] {
        let snap = file_blake3(&snaps.join(name))?;
        let rep = file_blake3(&replicas.join(format!("{name}.img")))?;
        check(
            format!(
                "replica {name} equals the primary's snapshot of gen {} (blake3 {}…)",
                last.gen,
                &rep[..16]
            ),
            snap == rep,
        );
    }
    let refused = pc.post::<CycleReport>("/v1/protections/demo-db/sync");
    let msg = refused
        .as_ref()
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    check(
        "the old primary is refused after failover and stops replicating".into(),
        refused.is_err() && msg.contains("fenced"),
    );
    let volume_bytes = args.size + (args.size / 8).max(1 << 20);
    println!("\nsummary");
    println!(
        "   RPO at failover: {:.1}s (the recovered snapshot's age)",
        fo.age_seconds.unwrap_or(f64::NAN)
    );
    println!(
        "   bytes sent: {} in {} cycles over {} of volumes; the {} incremental cycles sent {} ({:.2}% of the volumes per cycle)",
        human_bytes(total_sent),
        args.cycles + 1,
        human_bytes(volume_bytes),
        args.cycles,
        human_bytes(incremental_sent),
        100.0 * incremental_sent as f64 / (volume_bytes as f64 * args.cycles.max(1) as f64)
    );
    println!(
        "   failover took {:.3}s; demo took {:.1}s",
        fo.seconds,
        started.elapsed().as_secs_f64()
    );
    println!(
        "{}",
        if ok {
            "all checks passed"
        } else {
            "SOME CHECKS FAILED"
        }
    );
    drop(primary);
    drop(dr);
    Ok(ok)
}
