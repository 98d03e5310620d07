//! The text form of the reports: status, a cycle, a failover, the recovery points; the
//! Kustomize snippet of
//! `lifeboat certs --kubernetes`.

use crate::api::{CycleReport, FailoverReport, KubeStatus, PointsReport, SiteStatus, VerifyReport};

/// What each overlay's kustomization.yaml holds to make the TLS Secret from the files
/// `certs --kubernetes` wrote (deploy/kubernetes/primary and dr have it already).
pub const OVERLAY_TLS_GENERATOR: &str = "\
Each overlay's kustomization.yaml makes the Secret from them (deploy/kubernetes has it):
  secretGenerator:
    - name: lifeboat-tls
      namespace: lifeboat
      type: Opaque
      files: [ca.pem=tls/ca.pem, site.pem=tls/site.pem, site.key=tls/site.key]
  generatorOptions:
    disableNameSuffixHash: true
Then: kubectl apply -k DIR/SITE (with its tokens/ files made too, see the README).";

pub fn human_bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

pub fn render_cycle(r: &CycleReport) -> String {
    let resync: Vec<_> = r
        .volumes
        .iter()
        .filter(|v| v.resync)
        .map(|v| v.name.as_str())
        .collect();
    format!(
        "gen {} in {:.2}s: scanned {}, changed {}, sent {} in {} chunks ({} zero markers), {} on the wire{}",
        r.gen,
        r.seconds,
        human_bytes(r.bytes_scanned),
        human_bytes(r.bytes_changed),
        human_bytes(r.chunk_bytes_sent),
        r.chunks_sent,
        r.zero_chunks_sent,
        human_bytes(r.wire_bytes),
        if resync.is_empty() { String::new() } else { format!("; resynced by hash exchange: {}", resync.join(", ")) }
    ) + &r
        .rule_failures
        .iter()
        .map(|f| format!("\n  rule failed, the cycle went on (onError: Continue): {f}"))
        .collect::<String>()
}

pub fn render_status(s: &SiteStatus) -> String {
    let mut out = format!("site {} ({}), lifeboat {}\n", s.site, s.role, s.version);
    if let Some(p) = &s.peer {
        out += &format!(
            "peer {}: {}\n",
            p.address,
            if p.connected {
                "connected"
            } else {
                "not connected"
            }
        );
    }
    for p in &s.protections {
        out += &format!("\nprotection {}: {} at epoch {}\n", p.name, p.role, p.epoch);
        match (p.consistent_gen, p.consistent_age_seconds) {
            (Some(g), Some(age)) => {
                out += &format!(
                    "  consistent gen {g}, snapshot taken {age:.1}s ago (RPO target {}s)\n",
                    p.rpo_target_seconds
                )
            }
            _ => out += "  no consistent gen yet\n",
        }
        if !p.points.is_empty() {
            let gens: Vec<String> = p.points.iter().map(|g| g.to_string()).collect();
            out += &format!(
                "  recovery points (replica snapshots): gens {} (failover --gen N recovers one)\n",
                gens.join(", ")
            );
        }
        if let Some(ms) = p.last_clean_scrub_ms {
            let age = std::time::Duration::from_secs(crate::site::status::age_seconds(ms) as u64);
            out += &format!(
                "  last clean scrub: {} ago\n",
                humantime::format_duration(age)
            );
        }
        out += &format!("  activity: {}\n", p.activity);
        if let Some(c) = &p.last_cycle {
            out += &format!("  last cycle: {}\n", render_cycle(c));
        }
        if let Some(e) = &p.last_error {
            out += &format!("  last error ({}): {}\n", e.kind.as_str(), e.message);
        }
        if let Some(why) = &p.stopped_because {
            out += &format!("  replication stopped: {why}\n");
        }
        if let Some(d) = &p.direction {
            out += &format!("  direction: {d}\n");
        }
        if let Some(r) = &p.last_refusal {
            out += &format!("  last refusal: {}\n", r.message);
        }
        if let Some(k) = &p.kubernetes {
            out += &render_kube(k);
        }
        for v in &p.volumes {
            out += &format!(
                "  volume {} at {}{}\n",
                v.name,
                v.path,
                v.size
                    .map(|s| format!(", {}", human_bytes(s)))
                    .unwrap_or_default()
            );
        }
    }
    out
}

pub fn render_failback(r: &crate::api::FailbackReport) -> String {
    let mut out = String::new();
    for line in &r.done {
        out += line;
        out += "\n";
    }
    out
}

pub fn render_failover(r: &FailoverReport) -> String {
    if r.dry_run {
        let mut out = format!(
            "dry run: failover of protection {} would (nothing was changed):\n",
            r.protection
        );
        for (i, s) in r.steps.iter().enumerate() {
            out += &format!("  {}. {}\n", i + 1, s.what);
        }
        match r.recovered_gen {
            Some(g) => out += &format!("recovering gen {g}\n"),
            None => out += "no gen was ever replicated: there is nothing to recover\n",
        }
        return out;
    }
    let mut out = if r.already_failed_over {
        format!(
            "protection {} was already failed over (epoch {})\n",
            r.protection, r.epoch
        )
    } else {
        format!(
            "failed over protection {} in {:.3}s; epoch is now {}\n",
            r.protection, r.seconds, r.epoch
        )
    };
    match (r.recovered_gen, r.age_seconds) {
        (Some(g), Some(a)) => out += &format!("recovered gen {g}, a snapshot taken {a:.1}s ago\n"),
        _ => out += "no gen was ever replicated: the replicas hold no recovered data\n",
    }
    for v in &r.replicas {
        out += &format!("  replica {}: {}\n", v.name, v.path);
    }
    if !r.steps.is_empty() {
        out += "steps (the recovery time):\n";
        for s in &r.steps {
            out += &format!("  {:>8.3}s  {}\n", s.seconds, s.what);
        }
    }
    if let Some(k) = &r.kubernetes {
        for s in &k.scaled {
            out += &format!("  scaled {s}\n");
        }
        for s in &k.resumed {
            out += &format!("  resumed {s}\n");
        }
        for w in &k.ready {
            out += &format!(
                "  ready: {} ({} replicas) after {:.3}s\n",
                w.workload, w.replicas, w.seconds
            );
        }
        for o in &k.recreated {
            out += &format!("  recreated (an immutable field changed): {o}\n");
        }
    }
    if !r.problems.is_empty() {
        out += &format!(
            "NOT COMPLETE: {} problem(s); the fence and the replicas are done, these need you:\n",
            r.problems.len()
        );
        for p in &r.problems {
            out += &format!("  {p}\n");
        }
    }
    out
}

fn render_kube(k: &KubeStatus) -> String {
    let mut out = String::new();
    let c = &k.covers;
    if !c.namespaces.is_empty() {
        out += &format!(
            "  kubernetes{}: namespaces {}; {} pods, {} PVCs, {} objects\n",
            k.gen.map(|g| format!(" (gen {g})")).unwrap_or_default(),
            c.namespaces.join(", "),
            c.pods.len(),
            c.pvcs.len(),
            c.objects.len()
        );
    }
    for p in &c.pods {
        out += &format!("    pod {p}\n");
    }
    for p in &c.pvcs {
        out += &format!("    pvc {p}\n");
    }
    for o in &c.objects {
        out += &format!("    {o}\n");
    }
    for m in &k.movers {
        let mut line = format!("    mover {} ({}): {}", m.pvc, m.volume, m.phase);
        if let Some(n) = &m.node {
            line += &format!(" on {n}");
        }
        if m.phase == "done" {
            let rate = if m.seconds > 0.0 {
                m.bytes_scanned as f64 / m.seconds
            } else {
                0.0
            };
            line += &format!(
                ", {} scanned, {} sent in {:.1}s ({}/s)",
                human_bytes(m.bytes_scanned),
                human_bytes(m.bytes_sent),
                m.seconds,
                human_bytes(rate as u64)
            );
            match m.cbt.as_str() {
                "" => {}
                "full" => line += ", changed block tracking not used (see the cycle report)",
                how => {
                    line += &format!(
                        ", {} read ({how} from changed block tracking)",
                        human_bytes(m.bytes_read)
                    )
                }
            }
        }
        if let Some(r) = &m.reason {
            line += &format!(": {r}");
        }
        out += &format!("{line}\n");
    }
    if let Some(a) = &k.applied {
        out += &format!(
            "  standby manifests applied: {} objects, {} changed, {} pruned\n",
            a.applied.len(),
            a.changed.len(),
            a.pruned.len()
        );
    }
    if let Some(e) = &k.apply_error {
        out += &format!("  standby manifests NOT applied: {e}\n");
    }
    for w in &k.warnings {
        out += &format!("  warning: {w}\n");
    }
    out
}

/// `lifeboat points`: one line per kept point, oldest first.
pub fn render_points(r: &PointsReport) -> String {
    let secs = |s: u64| humantime::format_duration(std::time::Duration::from_secs(s));
    let rule = match r.keep_for_seconds {
        Some(w) => format!("keep = {} over {}", r.keep, secs(w)),
        None => format!("keep = {}", r.keep),
    };
    let default = match (r.failover_default, r.apply_delay_seconds) {
        (Some(g), Some(d)) => format!(
            "failover default: gen {g}, the newest at least {} old (apply_delay)",
            secs(d)
        ),
        (Some(g), None) => format!("failover default: gen {g}, the newest"),
        (None, _) => "nothing to fail over to yet".into(),
    };
    if r.points.is_empty() {
        return format!(
            "protection {}: no older recovery points kept here ({rule}); {default}\n",
            r.protection
        );
    }
    let mut out = format!(
        "protection {}: {} recovery point(s), {rule}; {default}\n  {:>6}  {:<20}  {:>10}  {:>7}  {:>10}  held\n",
        r.protection,
        r.points.len(),
        "gen",
        "taken (UTC)",
        "age",
        "volumes",
        "size"
    );
    for p in &r.points {
        let taken = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(p.taken_at_ms),
        );
        let age = humantime::format_duration(std::time::Duration::from_secs(p.age_seconds as u64));
        out += &format!(
            "  {:>6}  {:<20}  {:>10}  {:>7}  {:>10}  {}\n",
            p.gen,
            taken.to_string().trim_end_matches('Z').replace('T', " "),
            age.to_string(),
            p.volumes,
            human_bytes(p.size_bytes),
            if p.held { "held" } else { "" }
        );
    }
    out
}

/// `lifeboat verify`: per replica, clean or each divergent chunk range.
pub fn render_verify(r: &VerifyReport) -> String {
    let mut out = format!("protection {}: replicas of gen {}\n", r.protection, r.gen);
    for v in &r.volumes {
        if v.divergent.is_empty() {
            out += &format!(
                "  {}: {} chunks, all equal to the DR index\n",
                v.volume, v.chunks
            );
            continue;
        }
        let ranges: Vec<String> = v
            .divergent
            .iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        out += &format!(
            "  {} ({}): {} of {} chunks DIFFER ({}): chunks {}\n",
            v.volume,
            v.path,
            v.divergent.iter().map(|(a, b)| b - a + 1).sum::<u64>(),
            v.chunks,
            human_bytes(v.divergent_bytes),
            ranges.join(", ")
        );
    }
    if r.marked_for_repair {
        out += "marked for repair: the next cycle resyncs them by hash exchange\n";
    }
    out
}

pub fn render_drill(r: &crate::api::DrillReport) -> String {
    let mut out = format!(
        "drill {} of protection {}, recovery point {}: {}\n",
        r.started.id,
        r.started.protection,
        r.started.gen,
        if r.passed { "PASSED" } else { "FAILED" }
    );
    for s in &r.steps {
        out += &format!("  {:>8.2}s  {}\n", s.seconds, s.what);
    }
    let what = if r.started.namespaces.is_empty() {
        "copy and check"
    } else {
        "restore, workloads ready and check"
    };
    out += &format!("  recovery time measured: {:.2}s ({what})\n", r.rto_seconds);
    for (ns, drill) in &r.started.namespaces {
        out += &format!("  namespace {ns} restored into {drill}\n");
    }
    for n in &r.started.not_ready {
        out += &format!("  NOT READY: {n}\n");
    }
    for p in &r.started.problems {
        out += &format!("  note: {p}\n");
    }
    if let Some(c) = &r.check {
        match c.exit_code {
            Some(code) => out += &format!("  check exited {code}\n"),
            None => out += "  check killed at its timeout\n",
        }
        for line in c
            .output
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            out += &format!("    | {line}\n");
        }
    }
    for k in &r.ended.kept {
        out += &format!("  kept: {k}\n");
    }
    out
}
