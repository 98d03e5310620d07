//! The pure half of the CSI group snapshot, one rule per test.
use super::*;

fn pvc(ns: &str, name: &str, driver: Option<&str>) -> Pvc {
    Pvc {
        namespace: ns.into(),
        name: name.into(),
        volume: format!("{ns}.{name}"),
        storage_class: Some("fast".into()),
        mode: VolumeMode::Filesystem,
        pv: Some(format!("pv-{name}")),
        driver: driver.map(str::to_string),
        phase: "Bound".into(),
    }
}

fn class(name: &str, driver: &str, default: bool) -> Class {
    Class {
        name: name.into(),
        driver: driver.into(),
        default,
    }
}

fn wanted() -> Wanted {
    Wanted {
        group_snapshots: true,
        ..Default::default()
    }
}

#[test]
fn a_group_class_makes_one_group_snapshot_per_namespace_and_driver() {
    let pvcs = [
        pvc("db", "data-0", Some("rbd")),
        pvc("db", "data-1", Some("rbd")),
        pvc("db", "wal", Some("ebs")),
        pvc("web", "cache", Some("rbd")),
    ];
    let classes = [
        class("rbd-snap", "rbd", false),
        class("ebs-snap", "ebs", true),
    ];
    let groups = [class("rbd-group", "rbd", false)];
    let p = plan("shop", &pvcs, &classes, Some(&groups), &wanted()).unwrap();
    assert_eq!(p.groups.len(), 2);
    assert_eq!(p.groups[0].namespace, "db");
    assert_eq!(p.groups[0].members, vec![0, 1]);
    assert_eq!(p.groups[1].members, vec![3]);
    assert_ne!(p.groups[0].label, p.groups[1].label);
    assert_eq!(
        p.singles,
        vec![SingleCut {
            member: 2,
            class: "ebs-snap".into()
        }]
    );
    // Without the group API, or with group snapshots off: one snapshot per PVC.
    for (g, w) in [
        (None, wanted()),
        (
            Some(&groups[..]),
            Wanted {
                group_snapshots: false,
                ..wanted()
            },
        ),
    ] {
        let p = plan("shop", &pvcs, &classes, g, &w).unwrap();
        assert!(p.groups.is_empty());
        assert_eq!(p.singles.len(), 4);
    }
}

#[test]
fn every_pvc_that_cannot_be_snapshotted_is_named_with_why() {
    let mut unbound = pvc("db", "new", Some("rbd"));
    unbound.phase = "Pending".into();
    unbound.pv = None;
    let pvcs = [
        pvc("db", "data", Some("rbd")),
        pvc("db", "legacy", None),
        unbound,
        pvc("db", "other", Some("nfs")),
    ];
    let classes = [class("a", "rbd", false), class("b", "rbd", false)];
    let e = plan("shop", &pvcs, &classes, None, &wanted()).unwrap_err();
    assert_eq!(e.len(), 4, "{e:?}");
    assert!(
        e[0].contains("db/data") && e[0].contains("2 classes"),
        "{}",
        e[0]
    );
    assert!(e[1].contains("db/legacy") && e[1].contains("not a CSI volume"));
    assert!(e[2].contains("db/new") && e[2].contains("not bound"));
    assert!(e[3].contains("db/other") && e[3].contains("no class exists for driver nfs"));
    // A named class must be the driver's.
    let w = Wanted {
        snapshot_class: Some("a".into()),
        ..wanted()
    };
    let e = plan("shop", &pvcs[3..], &classes, None, &w).unwrap_err();
    assert!(e[0].contains("class a is for driver rbd, not nfs"), "{e:?}");
    // The default wins over several.
    let classes = [class("a", "rbd", false), class("b", "rbd", true)];
    let p = plan("shop", &pvcs[..1], &classes, None, &wanted()).unwrap();
    assert_eq!(p.singles[0].class, "b");
}

#[test]
fn progress_reads_cut_before_ready_and_errors() {
    let mut v = json!({"status": {}});
    assert_eq!(progress(&v), Progress::Pending);
    v["status"] = json!({"boundVolumeSnapshotContentName": "c", "readyToUse": false});
    assert_eq!(progress(&v), Progress::Pending, "no creation time: not cut");
    v["status"]["creationTime"] = json!("2026-12-02T00:00:00Z");
    assert_eq!(progress(&v), Progress::Cut);
    v["status"]["readyToUse"] = json!(true);
    assert_eq!(progress(&v), Progress::Ready);
    v["status"]["error"] = json!({"message": "driver does not support snapshots"});
    assert_eq!(
        progress(&v),
        Progress::Failed("driver does not support snapshots".into())
    );
    let g = json!({"status": {"boundVolumeGroupSnapshotContentName": "g", "creationTime": "t", "readyToUse": true}});
    assert_eq!(progress(&g), Progress::Ready);
}

#[test]
fn names_stay_valid_and_distinct() {
    let n = object_name("shop", Gen(7), "data-0", 253);
    assert_eq!(n, "lifeboat-shop-g7-data-0");
    let long = "x".repeat(80);
    let a = object_name("shop", Gen(7), &format!("{long}a"), 63);
    let b = object_name("shop", Gen(7), &format!("{long}b"), 63);
    assert!(a.len() <= 63 && b.len() <= 63 && a != b, "{a} {b}");
    assert!(!a.contains("--"));
    assert!(group_label("p", "ns", "driver").len() <= 63);
}

#[test]
fn quantities() {
    assert_eq!(quantity_bytes(&json!("64Mi")), Some(64 << 20));
    assert_eq!(quantity_bytes(&json!("1G")), Some(1_000_000_000));
    assert_eq!(quantity_bytes(&json!(4096)), Some(4096));
    assert_eq!(quantity_bytes(&json!("1.5Gi")), Some(3 << 29));
    assert_eq!(quantity_bytes(&json!("12x")), None);
}

#[test]
fn members_match_by_claim_or_by_volume_handle() {
    let a = pvc("db", "a", Some("rbd"));
    let b = pvc("db", "b", Some("rbd"));
    let vgs = json!({"metadata": {"name": "g", "uid": "u1"}});
    let own = json!([{"uid": "u1", "kind": "VolumeGroupSnapshot"}]);
    let snaps = vec![
        json!({"metadata": {"name": "s-a", "ownerReferences": own},
            "spec": {"source": {"persistentVolumeClaimName": "a"}}}),
        json!({"metadata": {"name": "s-b", "ownerReferences": own},
            "spec": {"source": {"volumeSnapshotContentName": "c-b"}}}),
        json!({"metadata": {"name": "other", "ownerReferences": [{"uid": "u2"}]},
            "spec": {"source": {"persistentVolumeClaimName": "b"}}}),
    ];
    let contents = vec![json!({"metadata": {"name": "c-b"},
        "spec": {"source": {"snapshotHandle": "snap-b"}}, "status": {"snapshotHandle": "snap-b"}})];
    let gc = json!({"status": {"volumeSnapshotHandlePairList": [{"volumeHandle": "vol-b", "snapshotHandle": "snap-b"}]}});
    let pvcs = [(&a, Some("vol-a".into())), (&b, Some("vol-b".into()))];
    let m = members(&vgs, Some(&gc), &snaps, &contents, &pvcs).unwrap();
    assert_eq!(m["a"], "s-a");
    assert_eq!(m["b"], "s-b");
    let e = members(&vgs, None, &snaps, &contents, &pvcs).unwrap_err();
    assert!(e.contains("db/b"), "{e}");
}
