//! Kubernetes data through CSI (issue 12): the group is cut as CSI snapshots inside the
//! rules, and each volume is moved by a mover Job, a real `lifeboat mover` process run by
//! the kubelet stand-in ([`support::cluster`]), joining the cycle at a real DR daemon over
//! QUIC and mutual TLS. The daemons talk to the test API servers with the real `kube`
//! client under the RBAC `lifeboat rbac` makes for the config.

mod support;

use std::path::{Path, PathBuf};

use serde_json::Value;
use support::cluster::Cluster;
use support::csisite::{wait_for, Sites, Spec};
use support::kubeapi::{ExecCall, ExecResult, KubeApi};
use support::{b3, random_file};

const PVCS: [&str; 4] = [
    "data-cassandra-0",
    "data-cassandra-1",
    "data-cassandra-2",
    "mysql-data",
];
const SIZE: u64 = 8 << 20;

fn sites(group_class: bool, mover: &str) -> Sites {
    sites_with(group_class, mover, true, "")
}

/// The four PVCs (mysql-data in Block mode) of `SIZE` over two nodes, CSI replicas at
/// the DR site.
fn spec() -> Spec {
    Spec {
        pvcs: PVCS.iter().map(|p| p.to_string()).collect(),
        block: vec!["mysql-data".into()],
        size: SIZE,
        group_class: true,
        mover: String::new(),
        snapshots: true,
        kube_lines: String::new(),
        nodes: 2,
        concurrency: 2,
        dr_csi: true,
        // Three points: what the tests below count on (the default keeps a day's worth).
        dr_protection: "keep = 3".into(),
        cbt: false,
    }
}

/// Sites whose driver offers changed block tracking (a SnapshotMetadata service), with
/// `size`-byte volumes on XFS.
fn cbt_sites(size: u64, mover: &str) -> Sites {
    Sites::start(&Spec {
        size,
        mover: mover.into(),
        cbt: true,
        ..spec()
    })
}

/// As [`sites`]; `snapshots`: whether the driver supports snapshots at all; `kube_lines`:
/// more lines of the primary's `[kubernetes]`.
fn sites_with(group_class: bool, mover: &str, snapshots: bool, kube_lines: &str) -> Sites {
    Sites::start(&Spec {
        group_class,
        mover: mover.into(),
        snapshots,
        kube_lines: kube_lines.into(),
        ..spec()
    })
}

impl Sites {
    /// The DR site's replica of `pvc`: its replica PVC's file (CSI replicas) or its
    /// host-path file.
    fn replica(&self, pvc: &str) -> PathBuf {
        if self.dr_cluster.is_none() {
            return self
                .pair
                .dir
                .path()
                .join(format!("replicas/prod/{pvc}.img"));
        }
        let name = lifeboat::k8s::writer_job::replica_name(support::PROT, &format!("prod.{pvc}"));
        Cluster::backing_file(&self.dr_api, "lifeboat", &name)
            .unwrap_or_else(|| panic!("no replica PVC {name} for {pvc}"))
    }

    /// The snapshot files of DR recovery point `gen`, one per PVC (its own snapshot of the
    /// replica PVC, or its group snapshot's member).
    fn point_files(&self, gen: u64) -> Vec<PathBuf> {
        let claims = PVCS
            .iter()
            .map(|p| lifeboat::k8s::writer_job::replica_name(support::PROT, &format!("prod.{p}")));
        gen_snapshot_files(&self.dr_api, "lifeboat", gen, claims)
    }

    /// The snapshot file of each PVC at gen `gen` (its own VolumeSnapshot, or its group
    /// snapshot's member).
    fn snapshot_files(&self, gen: u64) -> Vec<PathBuf> {
        let claims = PVCS.iter().map(|p| p.to_string());
        gen_snapshot_files(&self.primary_api, "prod", gen, claims)
    }

    /// The replicas, and with CSI replicas recovery point `gen`'s snapshots, equal the
    /// primary's gen `gen` snapshots by blake3.
    fn assert_replicas_equal_snapshots(&self, gen: u64) {
        let snaps = self.snapshot_files(gen);
        for (p, snap) in PVCS.iter().zip(&snaps) {
            assert_eq!(
                b3(&self.replica(p)),
                b3(snap),
                "replica of {p} differs from its gen {gen} snapshot"
            );
        }
        if self.dr_cluster.is_some() {
            for ((p, snap), point) in PVCS.iter().zip(&snaps).zip(self.point_files(gen)) {
                assert_eq!(
                    b3(&point),
                    b3(snap),
                    "recovery point {gen} of {p} differs from the primary's snapshot"
                );
            }
        }
    }

    /// Waits until nothing of the movers is left (the garbage collector removes a deleted
    /// Job's Pods a moment later, as a real one does); fails naming what stayed.
    fn assert_no_mover_leftovers(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let left = self.mover_leftovers();
            if left.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "left behind: {left:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// What lifeboat left in its movers' namespace and cluster-wide, at both sites (at
    /// the DR site: anything but the replica PVCs and the retained points' snapshots).
    fn mover_leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.dr_cluster.is_some() {
            for (g, plural) in [("batch", "jobs"), ("", "pods")] {
                for o in self.dr_api.all(g, plural) {
                    out.push(format!("dr {plural}/{}", o["metadata"]["name"]));
                }
            }
            for o in self.dr_api.all("", "persistentvolumeclaims") {
                let name = o["metadata"]["name"].as_str().unwrap_or("");
                if o["metadata"]["namespace"] == "lifeboat" && !name.contains("-replica-") {
                    out.push(format!("dr persistentvolumeclaims/{name}"));
                }
            }
            let points: Vec<String> = self.pair.dr.status().protections[0]
                .points
                .iter()
                .map(|g| g.to_string())
                .collect();
            for o in self
                .dr_api
                .all("snapshot.storage.k8s.io", "volumesnapshots")
            {
                let gen = o["metadata"]["labels"]["lifeboat.dev/gen"]
                    .as_str()
                    .unwrap_or("");
                let member = o["metadata"]["ownerReferences"].is_array();
                if !member && !points.iter().any(|p| p == gen) {
                    out.push(format!("dr volumesnapshots/{}", o["metadata"]["name"]));
                }
            }
        }
        for (g, plural) in [
            ("batch", "jobs"),
            ("", "pods"),
            ("", "persistentvolumeclaims"),
            ("snapshot.storage.k8s.io", "volumesnapshots"),
        ] {
            for o in self.primary_api.all(g, plural) {
                if o["metadata"]["namespace"] == "lifeboat" {
                    out.push(format!("{plural}/{}", o["metadata"]["name"]));
                }
            }
        }
        for c in self
            .primary_api
            .all("snapshot.storage.k8s.io", "volumesnapshotcontents")
        {
            if c["spec"]["volumeSnapshotRef"]["namespace"] == "lifeboat" {
                out.push(format!("content/{}", c["metadata"]["name"]));
            }
        }
        out
    }
}

/// The file behind each claim's snapshot of gen `gen` in `ns`: its own VolumeSnapshot
/// or its group snapshot's member.
fn gen_snapshot_files(
    api: &KubeApi,
    ns: &str,
    gen: u64,
    claims: impl Iterator<Item = String>,
) -> Vec<PathBuf> {
    let snaps = api.all("snapshot.storage.k8s.io", "volumesnapshots");
    let groups = api.all("groupsnapshot.storage.k8s.io", "volumegroupsnapshots");
    let g = gen.to_string();
    let of_gen = |v: &Value| v["metadata"]["labels"]["lifeboat.dev/gen"] == g.as_str();
    claims
        .map(|claim| {
            let s = snaps
                .iter()
                .filter(|s| s["metadata"]["namespace"] == ns)
                .filter(|s| s["spec"]["source"]["persistentVolumeClaimName"] == claim.as_str())
                .find(|s| {
                    of_gen(s)
                        || groups.iter().any(|g| {
                            of_gen(g)
                                && s["metadata"]["ownerReferences"][0]["uid"]
                                    == g["metadata"]["uid"]
                        })
                })
                .unwrap_or_else(|| panic!("no gen {gen} snapshot of {claim} in {ns}"));
            Cluster::snapshot_file(api, ns, s["metadata"]["name"].as_str().unwrap()).unwrap()
        })
        .collect()
}

fn change(f: &Path, seed: u64) {
    support::scatter_writes(f, 20, 65536, seed);
}

#[test]
fn a_group_snapshot_is_moved_by_jobs_on_two_nodes_and_the_replicas_equal_the_snapshots() {
    let s = sites(true, "");
    let r = s.pair.sync();
    // One group snapshot of the four PVCs, created by lifeboat for gen 1.
    let groups = s
        .primary_api
        .all("groupsnapshot.storage.k8s.io", "volumegroupsnapshots");
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(r.volumes.len(), 4);
    assert!(r.volumes.iter().all(|v| v.snapshot_method == "csi"));
    s.assert_replicas_equal_snapshots(r.gen);
    // The movers ran as processes on both nodes.
    let nodes = s.cluster.nodes_used();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    let peak = s.cluster.peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        peak <= 2,
        "the protection's concurrency is 2, {peak} movers ran at once"
    );
    s.assert_no_mover_leftovers();

    // An incremental cycle: only changed chunks travel.
    for (i, p) in PVCS.iter().enumerate() {
        change(
            &Cluster::backing_file(&s.primary_api, "prod", p).unwrap(),
            70 + i as u64,
        );
    }
    let r2 = s.pair.sync();
    s.assert_replicas_equal_snapshots(r2.gen);
    // 20 random 4 KiB writes per volume: the movers refine changed chunks into their
    // changed blocks as the daemon does, reading the old chunks from the base gen's
    // snapshot (the DR replicas are PVCs the DR daemon cannot read), so about 80 blocks
    // travel, not 80 chunks; the DR writers check each patch against its chunk hash.
    assert!(r2.refine && r2.refined_chunks > 0, "{r2:?}");
    assert!(
        r2.chunk_bytes_sent < 2 * 80 * 4096,
        "sent {} for 80 changed blocks",
        r2.chunk_bytes_sent
    );
    // Only the acknowledged gen's snapshots remain; the first gen's went with its files.
    let groups = s
        .primary_api
        .all("groupsnapshot.storage.k8s.io", "volumegroupsnapshots");
    assert_eq!(groups.len(), 1);
    assert_eq!(
        groups[0]["metadata"]["labels"]["lifeboat.dev/gen"],
        r2.gen.to_string()
    );
    s.assert_no_mover_leftovers();
}

#[test]
fn without_a_group_class_each_pvc_gets_its_own_snapshot() {
    let s = sites(false, "");
    let r = s.pair.sync();
    let snaps: Vec<Value> = s
        .primary_api
        .all("snapshot.storage.k8s.io", "volumesnapshots")
        .into_iter()
        .filter(|v| v["metadata"]["namespace"] == "prod")
        .collect();
    assert_eq!(snaps.len(), 4, "{snaps:?}");
    assert!(s
        .primary_api
        .all("groupsnapshot.storage.k8s.io", "volumegroupsnapshots")
        .is_empty());
    s.assert_replicas_equal_snapshots(r.gen);
}

#[test]
fn an_unschedulable_mover_fails_the_cycle_naming_the_pvc_and_leaves_nothing() {
    let s = sites(true, "cpu = \"4\"\nstuck_after = \"2s\"");
    let e = s.pair.try_sync().unwrap_err();
    assert!(e.contains("mover of PVC prod/"), "{e}");
    assert!(e.contains("Insufficient cpu"), "{e}");
    assert_eq!(s.pair.dr.status().protections[0].consistent_gen, None);
    s.assert_no_mover_leftovers();
    assert!(
        s.primary_api
            .all("groupsnapshot.storage.k8s.io", "volumegroupsnapshots")
            .is_empty(),
        "the failed gen's snapshots are removed"
    );
}

#[test]
fn post_rules_run_once_every_snapshot_is_cut_before_any_is_ready() {
    let s = sites(true, "");
    s.primary_api.seed(serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "cassandra-0", "namespace": "prod", "annotations": {
            "pre.hook.backup.velero.io/command": "[\"/bin/echo\", \"frozen\"]",
            "post.hook.backup.velero.io/command": "[\"/bin/echo\", \"thawed\"]"}},
        "spec": {"containers": [{"name": "cassandra", "image": "cassandra:4.1"}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data-cassandra-0"}}]},
        "status": {"phase": "Running", "containerStatuses": [{"name": "cassandra", "ready": true}]}}));
    s.primary_api
        .set_exec_handler(|_: &ExecCall| ExecResult::default());
    s.cluster.hold_ready(true);
    std::thread::scope(|sc| {
        let cycle = sc.spawn(|| s.pair.sync());
        wait_for(|| {
            s.primary_api
                .execs()
                .into_iter()
                .find(|c| c.command.join(" ").contains("thawed"))
        });
        // The post rule ran with the group cut (creation time, bound content) and no
        // snapshot ready yet; the cycle waits for readiness after the thaw.
        let groups = s
            .primary_api
            .all("groupsnapshot.storage.k8s.io", "volumegroupsnapshots");
        assert_eq!(groups.len(), 1);
        assert!(
            groups[0]["status"]["creationTime"].is_string(),
            "{groups:?}"
        );
        assert_eq!(groups[0]["status"]["readyToUse"], false);
        let members = s
            .primary_api
            .all("snapshot.storage.k8s.io", "volumesnapshots");
        assert_eq!(members.len(), 4);
        assert!(members.iter().all(|m| m["status"]["readyToUse"] == false
            && m["status"]["boundVolumeSnapshotContentName"].is_string()));
        assert!(!cycle.is_finished());
        s.cluster.hold_ready(false);
        let r = cycle.join().unwrap();
        s.assert_replicas_equal_snapshots(r.gen);
        let order: Vec<String> = s
            .primary_api
            .execs()
            .iter()
            .map(|c| c.command.join(" "))
            .collect();
        let pre = order.iter().position(|c| c.contains("frozen")).unwrap();
        let post = order.iter().position(|c| c.contains("thawed")).unwrap();
        assert!(pre < post, "{order:?}");
    });
}

#[test]
fn a_missing_snapshot_class_or_a_driver_without_snapshots_is_named_and_commits_nothing() {
    let s = sites(false, "");
    s.primary_api.delete(
        "snapshot.storage.k8s.io",
        "volumesnapshotclasses",
        "",
        "rbd-snap",
    );
    let e = s.pair.try_sync().unwrap_err();
    assert!(
        e.contains("PVC prod/data-cassandra-0: VolumeSnapshotClass: no class exists for driver rbd.csi.test"),
        "{e}"
    );
    assert!(e.contains("PVC prod/mysql-data"), "every PVC is named: {e}");
    assert_eq!(s.pair.dr.status().protections[0].consistent_gen, None);
    assert!(s
        .primary_api
        .all("snapshot.storage.k8s.io", "volumesnapshots")
        .is_empty());

    let s = sites_with(false, "", false, "");
    let e = s.pair.try_sync().unwrap_err();
    assert!(e.contains("snapshot of PVC prod/"), "{e}");
    assert!(e.contains("does not support snapshots"), "{e}");
    assert_eq!(s.pair.dr.status().protections[0].consistent_gen, None);
    let left: Vec<Value> = s
        .primary_api
        .all("snapshot.storage.k8s.io", "volumesnapshots");
    assert!(
        left.is_empty(),
        "the failed gen's snapshots are removed: {left:?}"
    );
    s.assert_no_mover_leftovers();
}

#[test]
fn a_mover_killed_mid_transfer_is_retried_by_its_job_and_the_gen_commits_whole() {
    let s = sites(true, "");
    let first = s.pair.sync();
    for (i, p) in PVCS.iter().enumerate() {
        random_file(
            &Cluster::backing_file(&s.primary_api, "prod", p).unwrap(),
            SIZE,
            4000 + i as u64,
        );
    }
    std::thread::scope(|sc| {
        let cycle = sc.spawn(|| s.pair.sync());
        // kill -9 the first mover that runs.
        let key = wait_for(|| s.cluster.pids.lock().unwrap().keys().next().cloned());
        assert!(s.cluster.kill_pod(&key));
        let r = cycle.join().unwrap();
        assert_eq!(r.gen, first.gen + 1);
        s.assert_replicas_equal_snapshots(r.gen);
    });
    let runs = s.cluster.scheduled.lock().unwrap().len();
    assert!(
        runs > 2 * PVCS.len(),
        "the killed mover ran again: {runs} pods"
    );
    s.assert_no_mover_leftovers();
}

#[test]
fn a_writer_killed_mid_write_is_retried_by_its_job_and_the_point_is_whole() {
    let s = sites(true, "");
    let first = s.pair.sync();
    let dr = s.dr_cluster.as_ref().unwrap();
    let before = dr.scheduled.lock().unwrap().len();
    let point: Vec<String> = s.point_files(first.gen).iter().map(|f| b3(f)).collect();
    rewrite_all(&s, 4100);
    std::thread::scope(|sc| {
        let cycle = sc.spawn(|| s.pair.sync());
        // kill -9 the first writer (DR cluster) as soon as it runs, before or while it
        // applies the gen's log to its replica PVC.
        let key = wait_for(|| dr.pids.lock().unwrap().keys().next().cloned());
        assert!(dr.kill_pod(&key));
        let r = cycle.join().unwrap();
        assert_eq!(r.gen, first.gen + 1);
        s.assert_replicas_equal_snapshots(r.gen);
        // The older point was never touched by the writes.
        let now: Vec<String> = s.point_files(first.gen).iter().map(|f| b3(f)).collect();
        assert_eq!(now, point);
    });
    let runs = dr.scheduled.lock().unwrap().len() - before;
    assert!(
        runs > PVCS.len(),
        "the killed writer ran again: {runs} pods"
    );
    s.assert_no_mover_leftovers();
}

#[test]
fn every_rule_lifeboat_rbac_makes_for_the_csi_path_is_needed() {
    let mut s = sites(true, "");
    // Group snapshots, twice (the second sweeps the first), then single snapshots twice.
    s.pair.sync();
    s.pair.sync();
    s.primary_api.delete(
        "groupsnapshot.storage.k8s.io",
        "volumegroupsnapshotclasses",
        "",
        "rbd-group",
    );
    s.dr_api.delete(
        "groupsnapshot.storage.k8s.io",
        "volumegroupsnapshotclasses",
        "",
        "rbd-group",
    );
    s.pair.sync();
    let r = s.pair.sync();
    s.assert_replicas_equal_snapshots(r.gen);
    // Failover restores the PVCs from the newest point.
    s.pair.primary.kill9();
    let (ok, out, err) = s.pair.dr.cli(&["failover", "--protection", support::PROT]);
    let text = out + &err;
    assert!(ok && !text.contains("NOT COMPLETE"), "{text}");
    // The CSI path's rules; the others (quiesce, exec) are proven needed by
    // tests/kubernetes.rs's replay of a sync, a rule and a planned failover.
    let unneeded: Vec<String> = support::rbac::unneeded_rules("primary", &s.primary_api)
        .into_iter()
        .filter(|u| {
            ["snapshot", "persistentvolume", "-cluster", "-movers"]
                .iter()
                .any(|k| u.contains(k))
                // Changed block tracking's rules are proven needed by the CBT test.
                && !u.contains("lifeboat-mover")
                && !u.contains("snapshotmetadataservices")
        })
        .chain(
            support::rbac::unneeded_rules("dr", &s.dr_api)
                .into_iter()
                .filter(|u| {
                    ["snapshot", "persistentvolume", "-cluster", "-writers"]
                        .iter()
                        .any(|k| u.contains(k))
                }),
        )
        .collect();
    assert!(unneeded.is_empty(), "{unneeded:#?}");
}

/// Rewrites every PVC of the primary with new random bytes.
fn rewrite_all(s: &Sites, seed: u64) {
    for (i, p) in PVCS.iter().enumerate() {
        random_file(
            &Cluster::backing_file(&s.primary_api, "prod", p).unwrap(),
            SIZE,
            seed + i as u64,
        );
    }
}

#[test]
fn kill_9_of_either_daemon_mid_transfer_keeps_the_point_and_ten_cycles_leave_one_gen() {
    let mut s = sites(true, "");
    let first = s.pair.sync();
    s.assert_replicas_equal_snapshots(first.gen);
    for (round, killed) in ["primary", "dr"].into_iter().enumerate() {
        let point = s.pair.dr.status().protections[0].consistent_gen;
        let before: Vec<String> = s
            .point_files(point.unwrap())
            .iter()
            .map(|f| b3(f))
            .collect();
        rewrite_all(&s, 7000 + 10 * round as u64);
        let client = s.pair.primary.client();
        let cycle = std::thread::spawn(move || {
            client.post::<lifeboat::api::CycleReport>(&format!(
                "/v1/protections/{}/sync",
                support::PROT
            ))
        });
        // kill -9 while the movers move.
        wait_for(|| s.cluster.pids.lock().unwrap().keys().next().cloned());
        match killed {
            "primary" => s.pair.primary.kill9(),
            _ => s.pair.dr.kill9(),
        }
        let _ = cycle.join();
        match killed {
            "primary" => s.pair.primary.start(),
            _ => s.pair.dr.start(),
        }
        // The DR site is still at its point: replicas unchanged, nothing torn.
        assert_eq!(
            s.pair.dr.status().protections[0].consistent_gen,
            point,
            "{killed}"
        );
        // The newest recovery point is still the previous gen's and equals it.
        let now: Vec<String> = s
            .point_files(point.unwrap())
            .iter()
            .map(|f| b3(f))
            .collect();
        assert_eq!(now, before, "after kill -9 of the {killed}");
        // The next cycle completes, and sweeps what the killed one left.
        let r = s.pair.sync();
        s.assert_replicas_equal_snapshots(r.gen);
    }
    for i in 0..7 {
        for (j, p) in PVCS.iter().enumerate() {
            change(
                &Cluster::backing_file(&s.primary_api, "prod", p).unwrap(),
                100 * i + j as u64,
            );
        }
        s.pair.sync();
    }
    let last = s.pair.sync();
    s.assert_replicas_equal_snapshots(last.gen);
    s.assert_no_mover_leftovers();
    // Exactly the acknowledged gen's snapshots are left (once the garbage collector has
    // taken the older group's members): one group, its members, their contents and files.
    let counts = || {
        let groups = s
            .primary_api
            .all("groupsnapshot.storage.k8s.io", "volumegroupsnapshots")
            .len();
        let snaps = s
            .primary_api
            .all("snapshot.storage.k8s.io", "volumesnapshots")
            .len();
        let contents = s
            .primary_api
            .all("snapshot.storage.k8s.io", "volumesnapshotcontents")
            .len();
        let files = std::fs::read_dir(s.cluster.root.join("snapshots"))
            .unwrap()
            .count();
        (groups, snaps, contents, files)
    };
    let want = (1, PVCS.len(), PVCS.len(), PVCS.len());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while counts() != want && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(counts(), want, "(groups, snapshots, contents, files)");
    // The DR site keeps exactly its last 3 recovery points (`keep = 3`), each whole:
    // a group snapshot of the replicas, its members, their contents and files.
    let points = s.pair.dr.status().protections[0].points.clone();
    assert_eq!(points.len(), 3, "{points:?}");
    assert_eq!(points.last(), Some(&last.gen));
    let dr_root = s.dr_cluster.as_ref().unwrap().root.clone();
    let dr_counts = || {
        let n = |g: &str, r: &str| s.dr_api.all(g, r).len();
        (
            n("groupsnapshot.storage.k8s.io", "volumegroupsnapshots"),
            n("snapshot.storage.k8s.io", "volumesnapshots"),
            n("snapshot.storage.k8s.io", "volumesnapshotcontents"),
            std::fs::read_dir(dr_root.join("snapshots"))
                .unwrap()
                .count(),
        )
    };
    let n = 3 * PVCS.len();
    let want = (3, n, n, n);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while dr_counts() != want && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(dr_counts(), want, "DR (groups, snapshots, contents, files)");
    for g in points {
        assert_eq!(s.point_files(g).len(), PVCS.len());
    }
    let m = s.pair.dr.metrics();
    let sel = |n: &str| format!("{n}{{protection=\"{}\"}}", support::PROT);
    assert_eq!(
        support::metric(&m, &sel("lifeboat_recovery_points")),
        Some(3.0)
    );
    let oldest = support::metric(&m, &sel("lifeboat_recovery_point_oldest_age_seconds")).unwrap();
    let rpo = support::metric(&m, &sel("lifeboat_rpo_seconds")).unwrap();
    assert!(
        oldest > rpo,
        "the oldest point {oldest}s, the newest {rpo}s"
    );
}

#[test]
fn the_dr_daemon_killed_after_writing_or_cutting_a_point_finishes_that_point_on_restart() {
    let mut s = sites(true, "");
    let first = s.pair.sync();
    s.assert_replicas_equal_snapshots(first.gen);
    for (round, at) in ["dr-written", "dr-point-cut"].into_iter().enumerate() {
        let point = s.pair.dr.status().protections[0].consistent_gen.unwrap();
        let before: Vec<String> = s.point_files(point).iter().map(|f| b3(f)).collect();
        rewrite_all(&s, 9000 + 10 * round as u64);
        s.pair.dr.stop();
        s.pair.dr.failpoint = Some(at.into());
        s.pair.dr.start();
        let client = s.pair.primary.client();
        let cycle = std::thread::spawn(move || {
            client.post::<lifeboat::api::CycleReport>(&format!(
                "/v1/protections/{}/sync",
                support::PROT
            ))
        });
        s.pair.dr.wait_failpoint();
        s.pair.dr.kill9();
        let _ = cycle.join();
        // Killed after the gen committed: the newest finished point is untouched.
        let now: Vec<String> = s.point_files(point).iter().map(|f| b3(f)).collect();
        assert_eq!(now, before, "point {point} changed by a kill at {at}");
        s.pair.dr.failpoint = None;
        s.pair.dr.start();
        // Recovery finishes the committed gen as a whole point (written again from its
        // staging log, snapshotted again: what the killed run cut is swept).
        let p = wait_for(|| {
            let p = s.pair.dr.status().protections[0].clone();
            (p.points.last() > Some(&point)).then_some(p)
        });
        assert_eq!(p.points.last(), p.consistent_gen.as_ref(), "{at}: {p:?}");
        let r = s.pair.sync();
        s.assert_replicas_equal_snapshots(r.gen);
        for g in &s.pair.dr.status().protections[0].points {
            assert_eq!(s.point_files(*g).len(), PVCS.len());
        }
        let groups = s
            .dr_api
            .all("groupsnapshot.storage.k8s.io", "volumegroupsnapshots")
            .len();
        assert_eq!(
            groups,
            s.pair.dr.status().protections[0].points.len(),
            "{at}: a group snapshot that is no point was left"
        );
    }
    s.assert_no_mover_leftovers();
}

#[test]
fn a_mover_whose_pvc_cannot_be_provisioned_is_named_with_the_event_in_status_and_the_error() {
    let s = sites(true, "stuck_after = \"2s\"");
    let first = s.pair.sync();
    // status shows each mover of the last cycle: done, its node, what it read and sent.
    let st = s.pair.primary.status();
    let movers = &st.protections[0].kubernetes.as_ref().unwrap().movers;
    assert_eq!(movers.len(), PVCS.len());
    assert!(
        movers
            .iter()
            .all(|m| m.phase == "done" && m.node.is_some() && m.bytes_scanned == SIZE),
        "{movers:?}"
    );
    // Without its StorageClass no restore PVC is provisioned.
    s.primary_api
        .delete("storage.k8s.io", "storageclasses", "", "fast");
    let e = s.pair.try_sync().unwrap_err();
    assert!(e.contains("stuck for 2s"), "{e}");
    assert!(
        e.contains("ProvisioningFailed: storageclass.storage.k8s.io \"fast\" not found"),
        "{e}"
    );
    let st = s.pair.primary.status();
    let movers = &st.protections[0].kubernetes.as_ref().unwrap().movers;
    assert!(
        movers
            .iter()
            .any(|m| m.phase == "failed"
                && m.reason.as_deref().is_some_and(|r| r.contains("not found"))),
        "{movers:?}"
    );
    let (_, text, _) = s.pair.primary.cli(&["status"]);
    assert!(text.contains("mover prod/data-cassandra-0"), "{text}");
    assert_eq!(
        s.pair.dr.status().protections[0].consistent_gen,
        Some(first.gen)
    );
    s.assert_no_mover_leftovers();
}

#[test]
fn the_sites_mover_limit_holds_over_the_protections_own() {
    // The protection allows 2 at once; the site, 1.
    let s = sites_with(true, "", true, "max_movers = 1");
    let r = s.pair.sync();
    s.assert_replicas_equal_snapshots(r.gen);
    assert_eq!(s.cluster.peak.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(s.cluster.scheduled.lock().unwrap().len(), PVCS.len());
}

/// A Deployment of the protected namespace that mounts the block PVC.
const MYSQL: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: mysql, namespace: prod}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: mysql}}\n  template:\n    metadata: {labels: {app: mysql}}\n    spec:\n      containers: [{name: mysql, image: mysql:8, volumeDevices: [{name: data, devicePath: /dev/data}]}]\n      volumes: [{name: data, persistentVolumeClaim: {claimName: mysql-data}}]\n";

#[test]
fn failover_restores_the_pvcs_from_a_retained_point_and_an_older_gen_by_gen() {
    let mut s = sites(true, "");
    s.primary_api.create_yaml(MYSQL);
    // Four gens, each with other data; the DR site keeps the last 3 points (`keep = 3`).
    let mut want = std::collections::BTreeMap::new();
    for i in 0..4u64 {
        if i > 0 {
            rewrite_all(&s, 500 + i);
        }
        let r = s.pair.sync();
        let hashes: Vec<String> = s.snapshot_files(r.gen).iter().map(|f| b3(f)).collect();
        want.insert(r.gen, hashes);
    }
    let gens: Vec<u64> = want.keys().copied().collect();
    let st = s.pair.dr.status();
    assert_eq!(st.protections[0].points, gens[1..].to_vec(), "{st:?}");
    // The pruned point's snapshots are gone with it.
    let pruned = gens[0].to_string();
    assert!(s
        .dr_api
        .all("snapshot.storage.k8s.io", "volumesnapshots")
        .iter()
        .all(|v| v["metadata"]["labels"]["lifeboat.dev/gen"] != pruned.as_str()));
    // Standby: the Deployment at 0 and no PVC in the application's namespace yet.
    assert_eq!(
        s.dr_api
            .get("apps", "deployments", "prod", "mysql")
            .unwrap()["spec"]["replicas"],
        0
    );
    assert!(s
        .dr_api
        .get("", "persistentvolumeclaims", "prod", "mysql-data")
        .is_none());

    s.pair.primary.kill9();
    let run = |args: &[&str]| {
        let (ok, out, err) = s.pair.dr.cli(args);
        (ok, out + &err)
    };
    // A pruned gen is named as not retained, with the ones that are.
    let (ok, text) = run(&["failover", "--protection", support::PROT, "--gen", &pruned]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "gen {pruned} of protection {} is not a retained recovery point",
            support::PROT
        )) && text.contains(&gens[1].to_string()),
        "{text}"
    );
    // The oldest retained point: its data, not the newest.
    let old = gens[1];
    let (ok, text) = run(&[
        "failover",
        "--protection",
        support::PROT,
        "--gen",
        &old.to_string(),
        "--ready-timeout",
        "30s",
    ]);
    assert!(ok, "{text}\n{}", s.pair.dr.log_text());
    assert!(text.contains(&format!("recovered gen {old}")), "{text}");
    let replica = lifeboat::k8s::writer_job::replica_name(support::PROT, "prod.mysql-data");
    assert!(
        text.contains(&format!("replica prod.mysql-data: PVC lifeboat/{replica}")),
        "{text}"
    );
    assert!(!text.contains("NOT COMPLETE"), "{text}");
    for (p, hash) in PVCS.iter().zip(&want[&old]) {
        let pvc = s
            .dr_api
            .get("", "persistentvolumeclaims", "prod", p)
            .unwrap_or_else(|| panic!("no PVC prod/{p} after failover"));
        assert_eq!(pvc["spec"]["dataSource"]["kind"], "VolumeSnapshot", "{pvc}");
        assert!(
            pvc["spec"]["volumeName"].is_string(),
            "{p} not bound: {pvc}"
        );
        let file = Cluster::backing_file(&s.dr_api, "prod", p).unwrap();
        assert_eq!(&b3(&file), hash, "PVC {p} is not gen {old}'s data");
    }
    assert_ne!(want[&old], want[gens.last().unwrap()]);
    let mysql = s
        .dr_api
        .get("apps", "deployments", "prod", "mysql")
        .unwrap();
    assert_eq!(mysql["spec"]["replicas"], 1);
    assert_eq!(mysql["status"]["readyReplicas"], 1);
    // The restore snapshots went once their PVCs were bound; the points stay.
    let left: Vec<Value> = s
        .dr_api
        .all("snapshot.storage.k8s.io", "volumesnapshots")
        .into_iter()
        .filter(|v| v["metadata"]["namespace"] == "prod")
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(s.pair.dr.status().protections[0].role, "failed-over");
}

#[test]
fn a_replica_pvc_damaged_out_of_band_is_found_by_its_writer_and_resent_whole() {
    let s = sites(true, "");
    let first = s.pair.sync();
    s.assert_replicas_equal_snapshots(first.gen);
    // Flip a byte of every chunk of one replica PVC at the DR site: any patch over it no
    // longer gives the chunk the primary hashed.
    let damaged = s.replica("mysql-data");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&damaged)
            .unwrap();
        for off in (0..SIZE).step_by(65536) {
            f.write_all_at(&[0xa5], off + 100).unwrap();
        }
    }
    for (i, p) in PVCS.iter().enumerate() {
        change(
            &Cluster::backing_file(&s.primary_api, "prod", p).unwrap(),
            300 + i as u64,
        );
    }
    // The writer finds the patch does not fit the damaged replica; the gen is not
    // finished on it (no point holds the damage) and its volumes are marked for repair.
    let e = s.pair.try_sync().unwrap_err();
    assert!(e.contains("does not hold what the DR index says"), "{e}");
    assert!(e.contains("prod.mysql-data"), "{e}");
    assert_eq!(
        s.pair.dr.status().protections[0].points.last(),
        Some(&first.gen)
    );
    // The next cycle resends the marked volumes whole and commits.
    let last = s.pair.try_sync().ok();
    let r = last.expect("a cycle after the damage commits");
    s.assert_replicas_equal_snapshots(r.gen);
    let mysql = r
        .volumes
        .iter()
        .find(|v| v.name == "prod.mysql-data")
        .unwrap();
    assert_eq!(mysql.chunks_changed, SIZE / 65536, "{r:?}");
    let st = s.pair.dr.status();
    for g in &st.protections[0].points {
        assert_eq!(s.point_files(*g).len(), PVCS.len());
    }
    s.assert_no_mover_leftovers();
}

#[test]
fn a_mover_that_stops_progressing_gives_up_named_in_status_and_the_next_cycle_completes() {
    // Movers give up after 2 s without progress (and Pending movers after 2 s as well).
    let s = sites(true, "stuck_after = \"2s\"");
    let first = s.pair.sync();
    rewrite_all(&s, 5100);
    let dr_pid = s.pair.dr.pid().unwrap() as i32;
    let outcome = std::thread::scope(|sc| {
        let cycle = sc.spawn(|| s.pair.try_sync());
        // The DR daemon stops answering (SIGSTOP) while the first mover runs.
        wait_for(|| s.cluster.pids.lock().unwrap().keys().next().cloned());
        unsafe { libc::kill(dr_pid, libc::SIGSTOP) };
        let outcome = cycle.join().unwrap();
        unsafe { libc::kill(dr_pid, libc::SIGCONT) };
        outcome
    });
    // The cycle fails (by the stalled movers, or by the primary's own link to the DR site
    // timing out first); each mover that gave up is named in status with why.
    let e = outcome.unwrap_err();
    let st = s.pair.primary.status();
    let movers = st.protections[0]
        .kubernetes
        .clone()
        .unwrap_or_default()
        .movers;
    let stalled: Vec<_> = movers
        .iter()
        .filter(|m| m.phase == "failed")
        .filter(|m| {
            m.reason
                .as_deref()
                .is_some_and(|r| r.contains("no progress for 2s"))
        })
        .collect();
    assert!(!stalled.is_empty(), "{e}\n{movers:?}");
    assert_eq!(
        s.pair.dr.status().protections[0].consistent_gen,
        Some(first.gen)
    );
    let r = s.pair.sync();
    s.assert_replicas_equal_snapshots(r.gen);
    s.assert_no_mover_leftovers();
}

#[test]
fn a_held_point_survives_pruning_until_released_and_points_lists_it() {
    let s = Sites::start(&Spec {
        dr_protection: "keep = 2".into(),
        ..spec()
    });
    let cli = |args: &[&str]| {
        let args = [args, &["--protection", support::PROT]].concat();
        let (ok, out, err) = s.pair.dr.cli(&args);
        (ok, out + &err)
    };
    let first = s.pair.sync();
    let held: Vec<String> = s.point_files(first.gen).iter().map(|f| b3(f)).collect();
    let (ok, text) = cli(&["hold", "--gen", &first.gen.to_string()]);
    assert!(ok && text.contains("held"), "{text}");
    // A gen that is not kept is named with the kept ones.
    let (ok, text) = cli(&["hold", "--gen", "99"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("gen 99 of protection p is not a kept recovery point (kept: 1)"),
        "{text}"
    );
    let mut last = first.gen;
    for i in 0..3 {
        rewrite_all(&s, 600 + i);
        last = s.pair.sync().gen;
    }
    // keep = 2 with the first gen held: each commit prunes the oldest point not held, so
    // the held gen and the newest remain, the held one's data untouched.
    assert_eq!(
        s.pair.dr.status().protections[0].points,
        vec![first.gen, last]
    );
    let now: Vec<String> = s.point_files(first.gen).iter().map(|f| b3(f)).collect();
    assert_eq!(now, held);
    let (ok, text) = cli(&["points"]);
    assert!(ok, "{text}");
    assert!(text.contains("2 recovery point(s), keep = 2"), "{text}");
    let held_line = text
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{} ", first.gen)))
        .unwrap_or_else(|| panic!("no line for gen {}: {text}", first.gen));
    assert!(held_line.trim_end().ends_with("held"), "{text}");
    let (ok, json) = cli(&["points", "--output", "json"]);
    assert!(ok, "{json}");
    let r: lifeboat::api::PointsReport = serde_json::from_str(&json).unwrap();
    assert_eq!(r.points.len(), 2);
    assert!(r.points[0].held && !r.points[1].held);
    assert_eq!(r.points[0].volumes, PVCS.len());
    assert_eq!(r.points[0].size_bytes, SIZE * PVCS.len() as u64);
    // Released, it goes with the next commit, snapshots and all.
    let (ok, text) = cli(&["release", "--gen", &first.gen.to_string()]);
    assert!(ok, "{text}");
    rewrite_all(&s, 700);
    let newest = s.pair.sync().gen;
    assert_eq!(s.pair.dr.status().protections[0].points, vec![last, newest]);
    let old = first.gen.to_string();
    assert!(s
        .dr_api
        .all("groupsnapshot.storage.k8s.io", "volumegroupsnapshots")
        .iter()
        .all(|g| g["metadata"]["labels"]["lifeboat.dev/gen"] != old.as_str()));
}

/// Chunks a changed block answer leaves out that a mover reads anyway, at most.
const SAMPLED: u64 = lifeboat::mover::cbt::MIN_SAMPLE;

#[test]
fn with_changed_block_tracking_movers_read_only_the_reported_ranges_and_the_replicas_are_exact() {
    let size = 32 << 20;
    let s = cbt_sites(size, "");
    // mysql-data holds 1 MiB in a sparse 32 MiB (written where it starts at 4 MiB).
    let mysql = Cluster::backing_file(&s.primary_api, "prod", "mysql-data").unwrap();
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&mysql)
            .unwrap();
        f.set_len(0).unwrap();
        f.set_len(size).unwrap();
    }
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new()
            .write(true)
            .open(&mysql)
            .unwrap(),
        &vec![0xa5; 1 << 20],
        4 << 20,
    )
    .unwrap();
    // First sync: no base, so each mover asks for the allocated ranges.
    let r1 = s.pair.sync();
    s.assert_replicas_equal_snapshots(r1.gen);
    for v in &r1.volumes {
        assert_eq!(v.cbt, "allocated", "{v:?}");
    }
    let m = r1
        .volumes
        .iter()
        .find(|v| v.name.ends_with("mysql-data"))
        .unwrap();
    assert!(
        m.bytes_read <= (1 << 20) + SAMPLED * 65536,
        "read {} of a volume holding 1 MiB",
        m.bytes_read
    );
    let gen1 = s.snapshot_files(r1.gen);
    // 20 random 4 KiB writes per volume: each mover asks for the delta against the base
    // gen's snapshot (its CSI handle) and reads only the chunks it names, plus the sample.
    for (i, p) in PVCS.iter().enumerate() {
        change(
            &Cluster::backing_file(&s.primary_api, "prod", p).unwrap(),
            300 + i as u64,
        );
    }
    let r2 = s.pair.sync();
    s.assert_replicas_equal_snapshots(r2.gen);
    for v in &r2.volumes {
        assert_eq!(v.cbt, "delta", "{v:?}");
        assert!(v.cbt_fallback.is_none(), "{v:?}");
        // XFS may remap more than the 4 KiB written (its copy-on-write extent hint), so a
        // write can name two chunks.
        assert!(
            v.bytes_read <= (2 * 20 + SAMPLED) * 65536,
            "{}: read {} bytes for 20 writes",
            v.name,
            v.bytes_read
        );
        assert!(v.chunks_changed >= 1 && v.chunks_changed <= 20, "{v:?}");
    }
    let read: u64 = r2.volumes.iter().map(|v| v.bytes_read).sum();
    assert!(read < 4 * size / 4, "read {read} of {}", 4 * size);
    // The service was asked for deltas against gen 1's handles, by the movers' own
    // ServiceAccount with the service's audience, and answered each.
    let calls = s.cbt.as_ref().unwrap().calls();
    let deltas: Vec<_> = calls
        .iter()
        .filter(|c| c.method == "GetMetadataDelta")
        .collect();
    assert_eq!(deltas.len(), 4, "{calls:?}");
    for c in &deltas {
        assert!(c.result.is_ok(), "{c:?}");
        assert_eq!(c.namespace, "lifeboat");
        let base = PathBuf::from(c.base.as_deref().unwrap());
        assert!(gen1.contains(&base), "{c:?} names no gen 1 snapshot");
    }
    let text = s.pair.primary.metrics();
    assert_eq!(
        support::metric(
            &text,
            &format!(
                "lifeboat_mover_cbt_total{{protection=\"{}\",result=\"delta\"}}",
                support::PROT
            )
        ),
        Some(4.0),
        "{text}"
    );
    // The rules this needs: the daemon's get of the SnapshotMetadataService, and the
    // movers' get of their snapshot (the service's SubjectAccessReview).
    let unneeded: Vec<String> = support::rbac::unneeded_rules("primary", &s.primary_api)
        .into_iter()
        .filter(|u| u.contains("snapshotmetadataservices") || u.contains("lifeboat-mover"))
        .collect();
    assert!(unneeded.is_empty(), "{unneeded:#?}");
    s.assert_no_mover_leftovers();
}

#[test]
fn a_tracker_that_misses_changes_or_fails_is_caught_and_the_volume_is_read_whole() {
    let size = 16 << 20;
    // A quarter of the unlisted chunks (64 at most here) read to check each answer.
    let s = cbt_sites(size, "cbt_sample = 0.25");
    let svc = s.cbt.as_ref().unwrap();
    s.pair.sync();
    // A tracker that drops all but the first range of each delta: the sample finds a
    // chunk it left out that differs from the replica, and the mover reads everything.
    // (150 writes touch about 115 of the 256 chunks: the chance that 64 sampled chunks
    // miss every one dropped is below 1e-15.)
    svc.set_mode(support::cbt::Mode::Lie);
    for (i, p) in PVCS.iter().enumerate() {
        let f = Cluster::backing_file(&s.primary_api, "prod", p).unwrap();
        support::scatter_writes(&f, 150, 65536, 400 + i as u64);
    }
    let r = s.pair.sync();
    s.assert_replicas_equal_snapshots(r.gen);
    for v in &r.volumes {
        assert_eq!(v.cbt, "full", "{v:?}");
        let why = v.cbt_fallback.as_deref().unwrap_or_default();
        assert!(
            why.contains("GetMetadataDelta left chunk") && why.contains("differs from the replica"),
            "{why}"
        );
        assert!(v.bytes_read >= size, "{v:?}");
    }
    let text = s.pair.primary.metrics();
    let mismatch = format!(
        "lifeboat_mover_cbt_total{{protection=\"{}\",result=\"mismatch\"}}",
        support::PROT
    );
    assert_eq!(support::metric(&text, &mismatch), Some(4.0), "{text}");
    // A service that does not answer: named, and the volume read whole.
    svc.set_mode(support::cbt::Mode::Fail);
    for (i, p) in PVCS.iter().enumerate() {
        change(
            &Cluster::backing_file(&s.primary_api, "prod", p).unwrap(),
            500 + i as u64,
        );
    }
    let r = s.pair.sync();
    s.assert_replicas_equal_snapshots(r.gen);
    for v in &r.volumes {
        assert_eq!(v.cbt, "full", "{v:?}");
        let why = v.cbt_fallback.as_deref().unwrap_or_default();
        assert!(why.contains("GetMetadataDelta: Unavailable"), "{why}");
    }
    // Honest again: deltas are used again.
    svc.set_mode(support::cbt::Mode::Honest);
    for (i, p) in PVCS.iter().enumerate() {
        change(
            &Cluster::backing_file(&s.primary_api, "prod", p).unwrap(),
            600 + i as u64,
        );
    }
    let r = s.pair.sync();
    s.assert_replicas_equal_snapshots(r.gen);
    assert!(
        r.volumes.iter().all(|v| v.cbt == "delta"),
        "{:?}",
        r.volumes
    );
    s.assert_no_mover_leftovers();
}

/// The first 4 KiB of `f`.
fn head(f: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut b = vec![0u8; 4096];
    std::fs::File::open(f).unwrap().read_exact(&mut b).unwrap();
    b
}

impl Sites {
    /// Everything a drill labels, at the DR site.
    fn drill_objects(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (g, plural) in [
            ("apps", "deployments"),
            ("", "persistentvolumeclaims"),
            ("snapshot.storage.k8s.io", "volumesnapshots"),
            ("snapshot.storage.k8s.io", "volumesnapshotcontents"),
        ] {
            for o in self.dr_api.all(g, plural) {
                let labels = &o["metadata"]["labels"];
                if labels["lifeboat.dev/drill-of"].is_string()
                    || o["metadata"]["namespace"] == "prod-drill"
                {
                    out.push(format!("{plural}/{}", o["metadata"]["name"]));
                }
            }
        }
        out
    }

    /// Runs `lifeboat drill` of gen `gen` at the DR site; its check writes the drill's
    /// environment to `started` and waits for `go` to exist.
    fn drill_waiting(&self, gen: u64, started: &Path, go: &Path) -> (bool, String) {
        let check = format!(
            "echo \"$LIFEBOAT_DRILL_NAMESPACE $LIFEBOAT_DRILL_NAMESPACE_PROD $LIFEBOAT_DRILL_GEN\" > {s}.tmp && mv {s}.tmp {s}; while [ ! -e {g} ]; do sleep 0.05; done",
            s = started.display(),
            g = go.display()
        );
        let (ok, out, err) = self.pair.dr.cli(&[
            "drill",
            "--protection",
            support::PROT,
            "--gen",
            &gen.to_string(),
            "--check",
            &check,
            "--ready-timeout",
            "30s",
            // A failed assertion never leaves it waiting for `go`.
            "--check-timeout",
            "90s",
        ]);
        (ok, out + &err)
    }
}

#[test]
fn a_drill_restores_a_kept_point_into_its_namespace_while_cycles_commit_and_leaves_nothing() {
    let s = sites(true, "");
    s.primary_api.create_yaml(MYSQL);
    let g1 = s.pair.sync().gen;
    let want: Vec<String> = s.snapshot_files(g1).iter().map(|f| b3(f)).collect();
    rewrite_all(&s, 700);
    s.pair.sync();
    let dir = s.pair.dir.path().to_path_buf();
    let (started, go) = (dir.join("drill-started"), dir.join("drill-go"));
    std::thread::scope(|sc| {
        let drill = sc.spawn(|| s.drill_waiting(g1, &started, &go));
        wait_for(|| std::fs::read_to_string(&started).ok());
        let env = std::fs::read_to_string(&started).unwrap();
        assert_eq!(env.trim(), format!("prod-drill prod-drill {g1}"));
        // The drill namespace holds gen g1's data and its workload is up; the standby
        // in `prod` is untouched.
        for (p, hash) in PVCS.iter().zip(&want) {
            let file = Cluster::backing_file(&s.dr_api, "prod-drill", p)
                .unwrap_or_else(|| panic!("no drill PVC prod-drill/{p}"));
            assert_eq!(&b3(&file), hash, "drill PVC {p} is not gen {g1}'s data");
        }
        let mysql = s
            .dr_api
            .get("apps", "deployments", "prod-drill", "mysql")
            .unwrap();
        assert_eq!(mysql["spec"]["replicas"], 1);
        assert_eq!(mysql["status"]["readyReplicas"], 1);
        assert_eq!(
            s.dr_api
                .get("apps", "deployments", "prod", "mysql")
                .unwrap()["spec"]["replicas"],
            0
        );
        // Replication goes on: two gens commit; the drilled point is pinned against
        // pruning (keep = 3, four points).
        let mut later = Vec::new();
        for i in 0..2 {
            rewrite_all(&s, 710 + i);
            later.push(s.pair.sync().gen);
        }
        let points = s.pair.dr.status().protections[0].points.clone();
        assert!(
            points.contains(&g1),
            "the drilled point was pruned: {points:?}"
        );
        assert!(later.iter().all(|g| points.contains(g)), "{points:?}");
        // The check writes into the drill's copy.
        let drilled = Cluster::backing_file(&s.dr_api, "prod-drill", "mysql-data").unwrap();
        {
            use std::io::{Seek, Write};
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&drilled)
                .unwrap();
            f.seek(std::io::SeekFrom::Start(0)).unwrap();
            f.write_all(&[0xAB; 4096]).unwrap();
            f.sync_all().unwrap();
        }
        // One drill at a time.
        let (ok, out, err) = s.pair.dr.cli(&["drill", "--protection", support::PROT]);
        assert!(!ok, "{out}");
        assert!(err.contains("is running"), "{err}");
        std::fs::write(&go, b"").unwrap();
        let (ok, text) = drill.join().unwrap();
        assert!(ok, "{text}\n{}", s.pair.dr.log_text());
        assert!(text.contains("PASSED"), "{text}");
        assert!(
            text.contains("namespace prod restored into prod-drill"),
            "{text}"
        );
        assert!(text.contains("wait for the workloads: 1 ready"), "{text}");
    });
    let left = s.drill_objects();
    assert!(left.is_empty(), "the drill left {left:?}");
    // The drill's write is in no replica, point or primary volume.
    let last = *s.pair.dr.status().protections[0].points.last().unwrap();
    let mut files = vec![s.replica("mysql-data")];
    files.extend(s.point_files(last));
    files.extend(
        PVCS.iter()
            .map(|p| Cluster::backing_file(&s.primary_api, "prod", p).unwrap()),
    );
    for f in &files {
        assert_ne!(
            head(f),
            vec![0xAB; 4096],
            "{} has the drill's write",
            f.display()
        );
    }
    s.assert_replicas_equal_snapshots(last);
    assert_eq!(
        s.point_files(g1).iter().map(|f| b3(f)).collect::<Vec<_>>(),
        want,
        "the drilled point changed"
    );
    // Unpinned: the next commit prunes it.
    rewrite_all(&s, 720);
    s.pair.sync();
    let points = s.pair.dr.status().protections[0].points.clone();
    assert!(!points.contains(&g1), "{points:?}");
    let m = s.pair.dr.metrics();
    assert_eq!(
        support::metric(
            &m,
            &format!(
                "lifeboat_drills_total{{protection=\"{}\",result=\"passed\"}}",
                support::PROT
            )
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn a_dr_daemon_killed_during_a_drill_removes_it_at_restart_and_the_next_drill_passes() {
    let mut s = sites(true, "");
    s.primary_api.create_yaml(MYSQL);
    let g1 = s.pair.sync().gen;
    let dir = s.pair.dir.path().to_path_buf();
    let (started, go) = (dir.join("drill-started"), dir.join("drill-go"));
    std::thread::scope(|sc| {
        let drill = sc.spawn(|| s.drill_waiting(g1, &started, &go));
        wait_for(|| std::fs::read_to_string(&started).ok());
        assert!(!s.drill_objects().is_empty());
        s.pair.dr.signal(libc::SIGKILL);
        std::fs::write(&go, b"").unwrap();
        let (ok, text) = drill.join().unwrap();
        assert!(!ok, "ending the drill needs its daemon: {text}");
    });
    s.pair.dr.kill9();
    s.pair.dr.start();
    s.pair.dr.wait_ready();
    let left = s.drill_objects();
    assert!(left.is_empty(), "after the restart the drill left {left:?}");
    // Replication and the next drill go on.
    rewrite_all(&s, 730);
    // The primary's first cycle may find its connection to the killed daemon dead.
    let g2 = wait_for(|| s.pair.try_sync().ok()).gen;
    s.assert_replicas_equal_snapshots(g2);
    let (ok, out, err) = s.pair.dr.cli(&[
        "drill",
        "--protection",
        support::PROT,
        "--check",
        "test \"$LIFEBOAT_DRILL_GEN\" -gt 0",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("recovery point {g2}: PASSED")),
        "{out}"
    );
    assert!(s.drill_objects().is_empty(), "{:?}", s.drill_objects());
}

#[test]
fn verify_of_csi_replicas_reads_them_by_reader_jobs_names_the_damage_and_the_next_cycle_repairs_it()
{
    let s = sites(true, "");
    let g = s.pair.sync().gen;
    let verify = || {
        let (ok, out, err) =
            s.pair
                .dr
                .cli(&["verify", "--protection", support::PROT, "--output", "json"]);
        assert!(
            ok || out.contains("divergent"),
            "{out}{err}\n{}",
            s.pair.dr.log_text()
        );
        serde_json::from_str::<Value>(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"))
    };
    let clean = verify();
    assert_eq!(clean["gen"], g);
    let vols = clean["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), PVCS.len(), "{clean}");
    assert!(
        vols.iter()
            .all(|v| v["divergent"].as_array().unwrap().is_empty()),
        "{clean}"
    );
    // Out-of-band damage in one replica PVC: chunk 3 (64 KiB chunks).
    let replica = s.replica("mysql-data");
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&replica)
            .unwrap();
        f.seek(std::io::SeekFrom::Start(3 * 65536 + 10)).unwrap();
        f.write_all(b"damage").unwrap();
    }
    let found = verify();
    let v = found["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["volume"] == "prod.mysql-data")
        .unwrap()
        .clone();
    assert_eq!(v["divergent"], serde_json::json!([[3, 3]]), "{found}");
    assert_eq!(found["marked_for_repair"], true, "{found}");
    // No reader Job stays.
    assert!(s.dr_api.all("batch", "jobs").is_empty());
    // The next cycle resends the marked volume; verify is clean again.
    let g2 = s.pair.sync().gen;
    s.assert_replicas_equal_snapshots(g2);
    let again = verify();
    assert!(
        again["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["divergent"].as_array().unwrap().is_empty()),
        "{again}"
    );
}
