//! The Kubernetes CSI data path at scale, against the local-mode engine on the same bytes,
//! in one run on this machine: a group of PVCs over several nodes (the test cluster of
//! tests/support/cluster.rs: each mover a real `lifeboat mover` process) with at most
//! `--concurrency` movers at once, then the same volumes as local files. Prints the initial
//! and the incremental (1% random 4 KiB writes) cycle's wall time for both and their ratio,
//! the most movers that ran at once, the nodes they ran on, chunk bytes sent, and the
//! primary daemon's peak RSS; then the CSI run again with changed block tracking (the
//! SnapshotMetadata stand-in): the bytes the movers read and the 1% cycle's time.
//!
//!   cargo bench --bench csi [-- --pvcs 40 --size-mib 16 --nodes 4 --concurrency 8]

use std::time::Instant;

#[path = "../tests/support/mod.rs"]
mod support;

use support::csisite::{Sites, Spec};
use support::{random_file, scatter_writes, Pair, PairOptions};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let pvcs = arg("--pvcs", 40) as usize;
    let size = arg("--size-mib", 16) << 20;
    let nodes = arg("--nodes", 4) as usize;
    let concurrency = arg("--concurrency", 8) as usize;
    let names: Vec<String> = (0..pvcs).map(|i| format!("data-{i}")).collect();
    let writes = size / 4096 / 100;
    println!("{pvcs} PVCs of {} MiB over {nodes} nodes, at most {concurrency} movers; 1% = {writes} random 4 KiB writes per volume", size >> 20);

    let spec = |cbt: bool| Spec {
        pvcs: names.clone(),
        block: names.iter().step_by(2).cloned().collect(),
        size,
        group_class: true,
        mover: String::new(),
        snapshots: true,
        kube_lines: format!("max_movers = {concurrency}"),
        nodes,
        concurrency,
        dr_csi: true,
        dr_protection: String::new(),
        cbt,
    };
    // 1% random 4 KiB writes to every PVC, the same in each run.
    let change = |s: &Sites| {
        for (i, n) in names.iter().enumerate() {
            let f = support::cluster::Cluster::backing_file(&s.primary_api, "prod", n).unwrap();
            scatter_writes(&f, writes, 65536, 5000 + i as u64);
        }
    };
    let s = Sites::start(&spec(false));
    let t = Instant::now();
    let c1 = s.pair.sync();
    let csi_initial = t.elapsed().as_secs_f64();
    let peak_initial = s.cluster.peak.load(std::sync::atomic::Ordering::SeqCst);
    change(&s);
    let t = Instant::now();
    let c2 = s.pair.sync();
    let csi_incr = t.elapsed().as_secs_f64();
    let used = s.cluster.nodes_used();
    let peak = s.cluster.peak.load(std::sync::atomic::Ordering::SeqCst);
    let csi_rss = s.pair.primary.pid().map_or(0, peak_rss_kib);
    drop(s);

    // The same again with changed block tracking (the SnapshotMetadata stand-in, volumes on
    // XFS): what the movers read, and the incremental cycle's time.
    let s = Sites::start(&spec(true));
    let b1 = s.pair.sync();
    change(&s);
    let t = Instant::now();
    let b2 = s.pair.sync();
    let cbt_incr = t.elapsed().as_secs_f64();
    let read = |r: &lifeboat::api::CycleReport| r.volumes.iter().map(|v| v.bytes_read).sum::<u64>();
    let used_cbt = b2.volumes.iter().filter(|v| v.cbt == "delta").count();
    drop(s);

    // The local-mode engine on the same bytes (the same seeds, the same writes).
    let leaked: Vec<(&'static str, u64)> = names
        .iter()
        .map(|n| (&*Box::leak(n.clone().into_boxed_str()), 0))
        .collect();
    let mut pair = Pair::new(PairOptions {
        volumes: leaked,
        start: false,
        ..Default::default()
    });
    for (i, n) in names.iter().enumerate() {
        random_file(&pair.volume(n), size, 900 + i as u64);
    }
    pair.start();
    let t = Instant::now();
    let l1 = pair.sync();
    let local_initial = t.elapsed().as_secs_f64();
    for (i, n) in names.iter().enumerate() {
        scatter_writes(&pair.volume(n), writes, 65536, 5000 + i as u64);
    }
    let t = Instant::now();
    let l2 = pair.sync();
    let local_incr = t.elapsed().as_secs_f64();
    let local_rss = pair.primary.pid().map_or(0, peak_rss_kib);

    println!();
    println!("| cycle | CSI movers (s) | local engine (s) | CSI/local | CSI chunk bytes | local chunk bytes |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| initial | {csi_initial:.2} | {local_initial:.2} | {:.2} | {} | {} |",
        csi_initial / local_initial,
        c1.chunk_bytes_sent,
        l1.chunk_bytes_sent
    );
    println!(
        "| 1% random 4 KiB | {csi_incr:.2} | {local_incr:.2} | {:.2} | {} | {} |",
        csi_incr / local_incr,
        c2.chunk_bytes_sent,
        l2.chunk_bytes_sent
    );
    println!();
    println!("| changed block tracking | 1% cycle (s) | bytes read by movers (initial) | bytes read by movers (1% cycle) |");
    println!("|---|---|---|---|");
    println!("| off | {csi_incr:.2} | {} | {} |", read(&c1), read(&c2));
    println!(
        "| on ({used_cbt}/{pvcs} volumes by delta) | {cbt_incr:.2} | {} | {} |",
        read(&b1),
        read(&b2)
    );
    println!();
    println!("movers at once: at most {peak} (initial cycle {peak_initial}; limit {concurrency}); nodes used: {}", used.len());
    println!(
        "primary daemon peak RSS: CSI {} MiB, local {} MiB",
        csi_rss / 1024,
        local_rss / 1024
    );
    assert!(peak <= concurrency, "more movers at once than the limit");
}
