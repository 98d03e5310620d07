//! Whole-system comparison on this machine, in one run: lifeboat against rsync and the
//! hardware limits (`cat` to /dev/null, `b3sum`, lifeboat's QUIC path), for the scenarios
//! of the performance issue. Prints a table; `--json FILE` also writes it as JSON.
//!
//!   cargo bench --bench compare -- [--quick] [--runs N] [--json FILE]
//!
//! Needs rsync and b3sum (`apt-get install rsync b3sum`). Figures are medians of `--runs`;
//! CPU is user+sys of both ends (daemons read from /proc, rsync from rusage), peak RSS is
//! VmHWM reset before each scenario.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lifeboat::cli::Client;
use lifeboat::site::status::CycleReport;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

#[path = "../../tests/support/mod.rs"]
mod support;

mod link;

#[derive(Serialize, Clone)]
struct Row {
    scenario: String,
    tool: String,
    wall_s: f64,
    cpu_s: f64,
    wire_bytes: u64,
    rss_primary_mib: f64,
    rss_dr_mib: f64,
    note: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn clk_tck() -> f64 {
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// (own user+sys, waited-for children's user+sys) of a process, in seconds.
fn proc_cpu(pid: u32) -> (f64, f64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(") ").next().unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let t = clk_tck();
    // After ") ": state is field 0; utime 11, stime 12, cutime 13, cstime 14.
    (
        (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / t,
        (f.get(13).unwrap_or(&0.0) + f.get(14).unwrap_or(&0.0)) / t,
    )
}

fn children_cpu() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn peak_rss_mib(pid: u32) -> f64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn reset_peak(pid: u32) {
    let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// 1% of the image changed: scattered 4 KiB blocks, or contiguous 1 MiB extents.
fn change(path: &Path, size: u64, extent: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let mut buf = vec![0u8; extent as usize];
    for _ in 0..(size / 100 / extent) {
        rng.fill_bytes(&mut buf);
        let off = rng.random_range(0..size / extent) * extent;
        f.write_all_at(&buf, off).unwrap();
    }
    f.sync_all().unwrap();
}

fn timed(cmd: &mut Command) -> (f64, f64, String) {
    let cpu0 = children_cpu();
    let t = Instant::now();
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed");
    (
        t.elapsed().as_secs_f64(),
        children_cpu() - cpu0,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

struct Pair {
    primary: Daemon,
    dr: Daemon,
    client: Client,
}

fn start_pair(dir: &Path, image: &Path, replica: &Path, extra: &str) -> Pair {
    let _ = fs::remove_dir_all(dir.join("pstate"));
    let _ = fs::remove_dir_all(dir.join("dstate"));
    let (quic, pctl, dctl) = (free_port(true), free_port(false), free_port(false));
    let prot = |path: &Path| {
        format!("[[protection]]\nname = \"b\"\ninterval = \"1h\"\nsync_on_start = false\n{extra}\n[[protection.volume]]\nname = \"img\"\npath = \"{}\"\n", path.display())
    };
    fs::write(dir.join("p.toml"), format!("[site]\nname = \"primary\"\nrole = \"primary\"\nstate_dir = \"pstate\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/primary.pem\"\nkey = \"certs/primary.key\"\n[peer]\naddress = \"127.0.0.1:{quic}\"\nserver_name = \"dr\"\n[control]\naddress = \"127.0.0.1:{pctl}\"\n{}", prot(image))).unwrap();
    fs::write(dir.join("d.toml"), format!("[site]\nname = \"dr\"\nrole = \"dr\"\nstate_dir = \"dstate\"\nmin_free_space = \"0\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/dr.pem\"\nkey = \"certs/dr.key\"\n[listen]\naddress = \"127.0.0.1:{quic}\"\n[control]\naddress = \"127.0.0.1:{dctl}\"\n{}", prot(replica))).unwrap();
    let spawn = |cfg: &str, ctl: u16| {
        let child = Command::new(env!("CARGO_BIN_EXE_lifeboat"))
            .args(["run", "--config"])
            .arg(dir.join(cfg))
            .env("LIFEBOAT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(File::create(dir.join(format!("{cfg}.log"))).unwrap())
            .spawn()
            .unwrap();
        let c = Client::at(&format!("127.0.0.1:{ctl}"));
        let t = Instant::now();
        while !c
            .get_text("/readyz")
            .map(|s| s.starts_with("ready"))
            .unwrap_or(false)
        {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "daemon {cfg} not ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Daemon(child)
    };
    let dr = spawn("d.toml", dctl);
    let primary = spawn("p.toml", pctl);
    Pair {
        primary,
        dr,
        client: Client::at(&format!("127.0.0.1:{pctl}")),
    }
}

fn lifeboat_cycle(p: &Pair, scenario: &str, note: &str) -> Row {
    let (pp, dp) = (p.primary.0.id(), p.dr.0.id());
    reset_peak(pp);
    reset_peak(dp);
    let (c0, d0) = (proc_cpu(pp).0, proc_cpu(dp).0);
    let t = Instant::now();
    let r: CycleReport = p
        .client
        .post("/v1/protections/b/sync")
        .expect("lifeboat sync");
    let wall = t.elapsed().as_secs_f64();
    Row {
        scenario: scenario.into(),
        tool: "lifeboat".into(),
        wall_s: wall,
        cpu_s: proc_cpu(pp).0 - c0 + proc_cpu(dp).0 - d0,
        wire_bytes: r.wire_bytes,
        rss_primary_mib: peak_rss_mib(pp),
        rss_dr_mib: peak_rss_mib(dp),
        note: format!(
            "{note}chunk bytes {} changed {}",
            r.chunk_bytes_sent, r.bytes_changed
        ),
    }
}

fn rsync_run(daemon: &Daemon, port: u16, image: &Path, scenario: &str) -> Row {
    let d0 = proc_cpu(daemon.0.id()).1;
    let (wall, cpu, out) = timed(
        Command::new("rsync")
            .args(["--inplace", "--no-whole-file", "--stats"])
            .arg(image)
            .arg(format!("rsync://127.0.0.1:{port}/m/img")),
    );
    let sent = out
        .lines()
        .find(|l| l.starts_with("Total bytes sent:"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().replace(',', "").parse::<u64>().unwrap_or(0))
        .unwrap_or(0);
    std::thread::sleep(Duration::from_millis(200)); // let the daemon reap its worker
    Row {
        scenario: scenario.into(),
        tool: "rsync".into(),
        wall_s: wall,
        cpu_s: cpu + proc_cpu(daemon.0.id()).1 - d0,
        wire_bytes: sent,
        rss_primary_mib: 0.0,
        rss_dr_mib: 0.0,
        note: String::new(),
    }
}

fn med_rows(rows: Vec<Row>) -> Row {
    let mut r = rows[rows.len() / 2].clone();
    r.wall_s = median(rows.iter().map(|x| x.wall_s).collect());
    r.cpu_s = median(rows.iter().map(|x| x.cpu_s).collect());
    r.wire_bytes = median(rows.iter().map(|x| x.wire_bytes as f64).collect()) as u64;
    r.rss_primary_mib = rows.iter().map(|x| x.rss_primary_mib).fold(0.0, f64::max);
    r.rss_dr_mib = rows.iter().map(|x| x.rss_dr_mib).fold(0.0, f64::max);
    r
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench")
        && !args.iter().any(|a| a == "--quick" || a == "--full")
        && std::env::var("LIFEBOAT_BENCH").is_err()
    {
        // `cargo bench` with no arguments runs every bench; this one takes minutes.
        eprintln!("compare: skipped; run `cargo bench --bench compare -- --quick` (1 GiB) or `-- --full` (4 GiB)");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let size: u64 = if quick { 1 << 30 } else { 4 << 30 };
    let base = std::env::var("LIFEBOAT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let tmp = tempfile::Builder::new()
        .prefix("lifeboat-bench-")
        .tempdir_in(base)
        .unwrap();
    let dir = tmp.path();
    let load0 = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    lifeboat::net::tls::generate(&dir.join("certs"), &["primary".into(), "dr".into()], &[])
        .unwrap();
    if args.iter().any(|a| a == "--link-only") {
        let v: Vec<f64> = (0..runs)
            .map(|_| link::quic_path_seconds(&dir.join("certs"), size))
            .collect();
        println!(
            "QUIC path: {:.3} s for {} ({:.0} MiB/s)",
            median(v.clone()),
            size,
            size as f64 / median(v) / 1048576.0
        );
        return;
    }
    let image = dir.join("image");
    let replica = dir.join("replica");
    eprintln!(
        "compare: {} image, {runs} run(s) per figure, in {}",
        lifeboat::cli::human_bytes(size),
        dir.display()
    );
    support::random_file(&image, size, 1);
    let mut rows = Vec::new();

    // Baselines: reading (warm) and hashing the image.
    let _ = timed(Command::new("cat").arg(&image).stdout(Stdio::null()));
    let base_row = |tool: &str, cmd: &dyn Fn() -> Command| {
        let v: Vec<(f64, f64)> = (0..runs)
            .map(|_| {
                let (w, c, _) = timed(&mut cmd());
                (w, c)
            })
            .collect();
        Row {
            scenario: "baseline".into(),
            tool: tool.into(),
            wall_s: median(v.iter().map(|x| x.0).collect()),
            cpu_s: median(v.iter().map(|x| x.1).collect()),
            wire_bytes: 0,
            rss_primary_mib: 0.0,
            rss_dr_mib: 0.0,
            note: String::new(),
        }
    };
    let img = image.clone();
    rows.push(base_row("cat", &|| {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!("cat {} > /dev/null", img.display()));
        c
    }));
    rows.push(base_row("b3sum 1 thread", &|| {
        let mut c = Command::new("b3sum");
        c.args(["--num-threads", "1"]).arg(&img);
        c
    }));
    rows.push(base_row("b3sum 2 threads", &|| {
        let mut c = Command::new("b3sum");
        c.args(["--num-threads", "2"]).arg(&img);
        c
    }));

    // rsync daemon on loopback.
    let rport = free_port(false);
    fs::create_dir_all(dir.join("rsync-dest")).unwrap();
    fs::write(
        dir.join("rsyncd.conf"),
        format!(
            "use chroot = no\nuid = root\ngid = root\n[m]\npath = {}\nread only = no\n",
            dir.join("rsync-dest").display()
        ),
    )
    .unwrap();
    let rsyncd = Daemon(
        Command::new("rsync")
            .args([
                "--daemon",
                "--no-detach",
                &format!("--port={rport}"),
                "--address=127.0.0.1",
            ])
            .arg(format!("--config={}", dir.join("rsyncd.conf").display()))
            .spawn()
            .expect("start rsync --daemon (apt-get install rsync)"),
    );
    std::thread::sleep(Duration::from_millis(500));

    // S1: initial full sync, each run onto an empty destination.
    let mut lb = Vec::new();
    let mut rs = Vec::new();
    for _ in 0..runs {
        let _ = fs::remove_file(&replica);
        let p = start_pair(dir, &image, &replica, "");
        lb.push(lifeboat_cycle(&p, "S1 initial", ""));
        drop(p);
        let _ = fs::remove_file(dir.join("rsync-dest/img"));
        rs.push(rsync_run(&rsyncd, rport, &image, "S1 initial"));
    }
    rows.push(med_rows(lb));
    rows.push(med_rows(rs));

    // S3, S4, S5 on one pair that stays up, as in production.
    let p = start_pair(dir, &image, &replica, "");
    p.client
        .post::<CycleReport>("/v1/protections/b/sync")
        .unwrap();
    for (scenario, extent) in [
        ("S3 no change", 0u64),
        ("S4 1% random 4 KiB", 4096),
        ("S5 1% as 1 MiB extents", 1 << 20),
    ] {
        let (mut lb, mut rs) = (Vec::new(), Vec::new());
        for run in 0..runs {
            if extent > 0 {
                change(&image, size, extent, 100 + run as u64);
            }
            lb.push(lifeboat_cycle(&p, scenario, ""));
            rs.push(rsync_run(&rsyncd, rport, &image, scenario));
        }
        rows.push(med_rows(lb));
        rows.push(med_rows(rs));
    }
    drop(p);
    let load1 = fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let find = |s: &str, t: &str| {
        rows.iter()
            .find(|r| r.scenario == s && r.tool == t)
            .cloned()
    };
    println!(
        "\n{:<24} {:<16} {:>9} {:>9} {:>14} {:>9} {:>9}  note",
        "scenario", "tool", "wall s", "cpu s", "wire bytes", "rss P MiB", "rss D MiB"
    );
    for r in &rows {
        println!(
            "{:<24} {:<16} {:>9.3} {:>9.3} {:>14} {:>9.1} {:>9.1}  {}",
            r.scenario,
            r.tool,
            r.wall_s,
            r.cpu_s,
            r.wire_bytes,
            r.rss_primary_mib,
            r.rss_dr_mib,
            r.note
        );
    }
    println!(
        "\nratios (same machine, same run; load average before: {} after: {})",
        load0.trim(),
        load1.trim()
    );
    let read_hash = find("baseline", "b3sum 2 threads")
        .unwrap()
        .wall_s
        .max(find("baseline", "cat").unwrap().wall_s);
    for s in [
        "S1 initial",
        "S3 no change",
        "S4 1% random 4 KiB",
        "S5 1% as 1 MiB extents",
    ] {
        let (l, r) = (find(s, "lifeboat").unwrap(), find(s, "rsync").unwrap());
        println!("  {s:<24} wall {:.2}x rsync, cpu {:.2}x rsync, wire {:.2}x rsync, wall {:.2}x read+hash", l.wall_s / r.wall_s, l.cpu_s / r.cpu_s.max(1e-9), l.wire_bytes as f64 / r.wire_bytes.max(1) as f64, l.wall_s / read_hash);
    }
    if let Some(path) = json {
        fs::write(&path, serde_json::to_string_pretty(&serde_json::json!({ "image_bytes": size, "runs": runs, "loadavg_before": load0.trim(), "loadavg_after": load1.trim(), "rows": rows })).unwrap()).unwrap();
        eprintln!("wrote {path}");
    }
    drop(rsyncd);
}
