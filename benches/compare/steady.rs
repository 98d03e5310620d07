//! The steady-state row: the daemons' own schedule cycling every few seconds while a writer
//! changes the volume at a constant rate, for minutes. It shows what a user sees over a day
//! of short intervals: the RPO actually achieved (sampled at the DR site, as Prometheus
//! would), the primary's CPU per cycle over time (it must stay flat: a cycle costs what it
//! scans and what changed, not how many cycles came before) and each daemon's peak RSS.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifeboat::api::{CycleReport, SiteStatus};
use rand::{Rng, RngCore, SeedableRng};

use super::{median, peak_rss_mib, proc_cpu, proc_times, reset_peak, start_pair_every};

pub struct Settings {
    pub interval_s: u64,
    pub minutes: f64,
    /// Bytes a second the writer changes, in random 4 KiB blocks.
    pub write_rate: u64,
}

/// One cycle as the bench saw it complete.
struct Seen {
    /// Seconds since the steady window began, when the bench saw the cycle's report.
    at_s: f64,
    /// The primary's CPU seconds since the previous cycle was seen, and of them the
    /// kernel's (system time: FICLONE, FIEMAP, reads).
    primary_cpu: f64,
    primary_sys: f64,
    dr_cpu: f64,
    report: CycleReport,
}

/// How many extents the volume's file has: what a reflink clone of it costs in the kernel.
fn extent_count(image: &Path, size: u64) -> usize {
    let f = std::fs::File::open(image).unwrap();
    lifeboat::engine::extents::extents(&f, 0..size).map_or(0, |e| e.len())
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A writer of random 4 KiB blocks at `rate` bytes a second until `stop`.
fn writer(
    image: &Path,
    size: u64,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    std::thread::spawn(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        let mut buf = vec![0u8; 4096];
        let tick = Duration::from_millis(50);
        let per_tick = (rate / 20 / 4096).max(1);
        let mut written = 0;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            for _ in 0..per_tick {
                rng.fill_bytes(&mut buf);
                let off = rng.random_range(0..size / 4096) * 4096;
                f.write_all_at(&buf, off).unwrap();
                written += 4096;
            }
            std::thread::sleep(tick.saturating_sub(t.elapsed()));
        }
        written
    })
}

pub fn steady_row(dir: &Path, image: &Path, replica: &Path, size: u64, s: &Settings) {
    let _ = std::fs::remove_file(replica);
    let p = start_pair_every(dir, image, replica, "", &format!("{}s", s.interval_s));
    let (pp, dp) = (p.primary.0.id(), p.dr.0.id());
    // The initial full sync is not steady state: wait for the first consistent point.
    let first: CycleReport = p
        .client
        .post("/v1/protections/b/sync")
        .expect("initial sync");
    eprintln!(
        "steady: initial sync gen {} in {:.1} s; now {} min of {} s cycles under a {} KiB/s writer",
        first.gen,
        first.seconds,
        s.minutes,
        s.interval_s,
        s.write_rate >> 10
    );
    reset_peak(pp);
    reset_peak(dp);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(image, size, s.write_rate, stop.clone());
    let extents0 = extent_count(image, size);
    let t0 = Instant::now();
    let p0 = proc_times(pp);
    let (mut last_gen, mut pcpu, mut psys) = (first.gen, p0.user + p0.sys, p0.sys);
    let mut dcpu = proc_cpu(dp).0;
    let (mut seen, mut rpo) = (Vec::<Seen>::new(), Vec::<f64>::new());
    let window = Duration::from_secs_f64(s.minutes * 60.0);
    while t0.elapsed() < window {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(d) = p.dr_client.get::<SiteStatus>("/v1/status") {
            if let Some(a) = d.protections.first().and_then(|x| x.consistent_age_seconds) {
                rpo.push(a);
            }
        }
        let Ok(st) = p.client.get::<SiteStatus>("/v1/status") else {
            continue;
        };
        let Some(r) = st.protections.first().and_then(|x| x.last_cycle.clone()) else {
            continue;
        };
        if r.gen <= last_gen {
            continue;
        }
        let (pt, dc) = (proc_times(pp), proc_cpu(dp).0);
        let (pc, ps) = (pt.user + pt.sys, pt.sys);
        last_gen = r.gen;
        seen.push(Seen {
            at_s: t0.elapsed().as_secs_f64(),
            primary_cpu: pc - pcpu,
            primary_sys: ps - psys,
            dr_cpu: dc - dcpu,
            report: r,
        });
        (pcpu, psys, dcpu) = (pc, ps, dc);
        if seen.len() % 20 == 0 {
            let last = seen.iter().rev().take(20);
            eprintln!(
                "  {:>6.0} s: {} cycles, primary CPU per cycle (last 20, median) {:.3} s, of it kernel {:.3} s",
                t0.elapsed().as_secs_f64(),
                seen.len(),
                median(last.clone().map(|x| x.primary_cpu).collect()),
                median(last.map(|x| x.primary_sys).collect()),
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let written = w.join().unwrap();
    assert!(
        seen.len() >= 4,
        "steady: only {} cycles completed",
        seen.len()
    );
    let extents1 = extent_count(image, size);
    let minute = |first: bool, f: fn(&Seen) -> f64| -> f64 {
        let end = seen.last().unwrap().at_s;
        median(
            seen.iter()
                .filter(|x| {
                    if first {
                        x.at_s <= 60.0
                    } else {
                        x.at_s >= end - 60.0
                    }
                })
                .map(f)
                .collect(),
        )
    };
    let (cpu_first, cpu_last) = (
        minute(true, |x| x.primary_cpu),
        minute(false, |x| x.primary_cpu),
    );
    let user = |x: &Seen| x.primary_cpu - x.primary_sys;
    let (user_first, user_last) = (minute(true, user), minute(false, user));
    let durations: Vec<f64> = seen.iter().map(|x| x.report.seconds).collect();
    let changed: Vec<f64> = seen.iter().map(|x| x.report.bytes_changed as f64).collect();
    let dr_cpu: Vec<f64> = seen.iter().map(|x| x.dr_cpu).collect();
    let (rpo_med, rpo_p99, rpo_max) = (
        percentile(&rpo, 0.5),
        percentile(&rpo, 0.99),
        percentile(&rpo, 1.0),
    );
    let cycle_p99 = percentile(&durations, 0.99);
    println!(
        "\nS9 steady state ({} min, {} s interval, {:.1} MiB/s random 4 KiB writer, {} MiB written)",
        s.minutes,
        s.interval_s,
        s.write_rate as f64 / (1 << 20) as f64,
        written >> 20
    );
    println!(
        "  cycles {}; duration median {:.2} s, p99 {:.2} s, max {:.2} s; changed per cycle median {:.1} MiB",
        seen.len(),
        median(durations.clone()),
        cycle_p99,
        percentile(&durations, 1.0),
        median(changed) / (1 << 20) as f64
    );
    println!(
        "  achieved RPO (DR site, {} samples): median {:.2} s, p99 {:.2} s, max {:.2} s",
        rpo.len(),
        rpo_med,
        rpo_p99,
        rpo_max
    );
    println!(
        "  primary CPU per cycle: first minute median {:.3} s, last minute {:.3} s ({:.2} x); DR {:.3} s",
        cpu_first,
        cpu_last,
        cpu_last / cpu_first,
        median(dr_cpu)
    );
    println!(
        "    of it lifeboat's own (user): first minute {:.3} s, last minute {:.3} s ({:.2} x); the rest is the kernel's",
        user_first,
        user_last,
        user_last / user_first
    );
    println!(
        "  the volume's extents: {extents0} before, {extents1} after (a reflink clone costs the kernel per extent)"
    );
    println!(
        "  peak RSS: primary {:.0} MiB, DR {:.0} MiB",
        peak_rss_mib(pp),
        peak_rss_mib(dp)
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    // Under two minutes the first and the last minute overlap: a comparison would be void.
    let flat = |ok: bool| {
        if seen.last().unwrap().at_s < 120.0 {
            "not judged (the run is shorter than two minutes)"
        } else {
            verdict(ok)
        }
    };
    println!(
        "  target flat cost (last minute within 1.3 x the first): {}",
        flat(cpu_last <= 1.3 * cpu_first)
    );
    println!(
        "  target flat own cost (user CPU, last minute within 1.3 x the first): {}",
        flat(user_last <= 1.3 * user_first)
    );
    let bound = s.interval_s as f64 + cycle_p99;
    println!(
        "  target RPO p99 <= interval + a cycle ({:.2} s): {}",
        bound,
        verdict(rpo_p99 <= bound)
    );
}
