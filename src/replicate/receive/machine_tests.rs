//! The DR site's rules for a cycle, one test each, against the pure machine.

use std::collections::BTreeMap;
use std::path::Path;

use super::machine::{admit, admit_peer, receives, Action, Receiving, Staged};
use crate::config::Protection;
use crate::engine::chunk::Geometry;
use crate::ids::{ChunkHash, CycleId, Epoch, Gen, Point, VolumeName};
use crate::metrics::ErrorKind;
use crate::net::wire::{Refusal, VolumeMeta};
use crate::replicate::error::ReceiveError;
use crate::replicate::messages::{CycleMsg, CycleStart};
use crate::store::records::FailoverRecord;
use crate::store::{PointRecord, ProtectionRecord, VolumeRecord};

const CS: u32 = 65536;

fn protection(extra: &str) -> Protection {
    let text = format!(
        r#"
[site]
name = "dr"
role = "dr"
state_dir = "/tmp/lb-state"
[tls]
ca = "/tmp/ca.pem"
cert = "/tmp/dr.pem"
key = "/tmp/dr.key"
[listen]
address = "127.0.0.1:7420"
[[protection]]
name = "p"
{extra}
"#
    );
    let cfg = crate::config::parse(&text, Path::new("/tmp/dr.toml")).unwrap();
    cfg.protections[0].clone()
}

fn local() -> Protection {
    protection(
        "[[protection.volume]]\nname = \"a\"\npath = \"/r/a.img\"\n\
         [[protection.volume]]\nname = \"b\"\npath = \"/r/b.img\"\n\
         [[protection.volume]]\nname = \"c\"\npath = \"/r/c.img\"",
    )
}

fn kube() -> Protection {
    protection("[protection.kubernetes]\nvolume_path = \"/r/{namespace}/{pvc}.img\"")
}

fn point(gen: u64) -> Point {
    Point {
        gen: Gen(gen),
        cycle: CycleId(gen * 7 + 1),
        taken_at_ms: gen,
    }
}

fn vrec() -> VolumeRecord {
    VolumeRecord {
        size: 1 << 20,
        chunk_size: CS,
        root: ChunkHash([1; 32]),
    }
}

/// The DR site's consistent point gen 3 with volumes `names` at 64 KiB chunks.
fn have(names: &[&str]) -> Option<PointRecord> {
    Some(PointRecord {
        point: point(3),
        volumes: names
            .iter()
            .map(|n| (VolumeName::new(n).unwrap(), vrec()))
            .collect::<BTreeMap<_, _>>(),
    })
}

fn metas(names: &[&str]) -> Vec<VolumeMeta> {
    names
        .iter()
        .map(|n| VolumeMeta {
            name: n.to_string(),
            size: 1 << 20,
            chunk_size: CS,
        })
        .collect()
}

fn start(prot: &Protection, names: &[&str]) -> Result<Receiving, ReceiveError> {
    Receiving::start(
        prot,
        have(&["a", "b", "c"]),
        Default::default(),
        CycleStart {
            point: point(4),
            base: Some(point(3)),
            volumes: metas(names),
        },
    )
}

fn begin(v: &str) -> CycleMsg {
    CycleMsg::Begin {
        volume: v.into(),
        size: 1 << 20,
        chunk_size: CS,
    }
}

fn stage_all(m: &mut Receiving, names: &[&str]) {
    for v in names {
        assert!(matches!(
            m.handle(begin(v)).unwrap(),
            Action::Receive { .. }
        ));
        m.staged(Staged {
            log: format!("/s/{v}.log").into(),
            record: vrec(),
            fresh: false,
        });
    }
}

fn protocol_message(e: ReceiveError) -> String {
    assert_eq!(e.metric_label(), ErrorKind::Protocol, "{e}");
    match e.told() {
        Refusal::Invalid(m) => m,
        other => panic!("not Invalid: {other:?}"),
    }
}

#[test]
fn an_incremental_cycle_commits_every_volume_with_its_log() {
    let prot = local();
    let mut m = start(&prot, &["a", "b", "c"]).unwrap();
    match m.handle(begin("b")).unwrap() {
        Action::Receive {
            volume,
            replica,
            geometry,
            base_gen,
        } => {
            assert_eq!(volume.as_str(), "b");
            assert_eq!(replica, Path::new("/r/b.img"));
            assert_eq!(geometry, Geometry::new(1 << 20, CS));
            assert_eq!(base_gen, Gen(3), "diffed against the consistent point");
        }
        other => panic!("{other:?}"),
    }
    m.staged(Staged {
        log: "/s/b.log".into(),
        record: vrec(),
        fresh: true,
    });
    stage_all(&mut m, &["a", "c"]);
    let Action::Commit { commit, manifests } = m.handle(CycleMsg::Commit(Gen(4))).unwrap() else {
        panic!("no commit")
    };
    assert_eq!(commit.point.point, point(4));
    assert_eq!(commit.logs.len(), 3);
    assert_eq!(commit.logs["b"], Path::new("/s/b.log"));
    assert_eq!(
        commit.fresh.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    assert!(manifests.is_none());
}

#[test]
fn a_base_that_is_not_the_consistent_point_is_refused() {
    let err = Receiving::start(
        &local(),
        have(&["a", "b", "c"]),
        Default::default(),
        CycleStart {
            point: point(6),
            base: Some(point(5)),
            volumes: metas(&["a", "b", "c"]),
        },
    )
    .unwrap_err();
    assert!(matches!(
        err.told(),
        Refusal::BaseMismatch { sent: Some(s), have: Some(h) } if s == point(5) && h == point(3)
    ));
    assert_eq!(err.metric_label(), ErrorKind::Refused);
}

#[test]
fn a_cycle_with_a_volume_not_in_the_group_is_refused_by_name() {
    let err = start(&local(), &["a", "b", "x"]).unwrap_err();
    match err.told() {
        Refusal::UnknownVolume(v, have) => {
            assert_eq!((v.as_str(), have.as_str()), ("x", "a, b, c"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_cycle_that_leaves_out_a_volume_of_the_group_is_refused() {
    let m = protocol_message(start(&local(), &["a", "b"]).unwrap_err());
    assert!(
        m.contains("sends volumes [a, b] but this site's group is [a, b, c]"),
        "{m}"
    );
    // The same volume twice is not the group either.
    let m = protocol_message(start(&local(), &["a", "b", "c", "c"]).unwrap_err());
    assert!(m.contains("[a, b, c, c]"), "{m}");
}

#[test]
fn begin_for_a_volume_not_in_the_group_is_refused() {
    let mut m = start(&local(), &["a", "b", "c"]).unwrap();
    let msg = protocol_message(m.handle(begin("x")).unwrap_err());
    assert!(msg.contains("unexpected Begin for volume \"x\""), "{msg}");
}

#[test]
fn a_volume_begun_twice_is_refused() {
    let mut m = start(&local(), &["a", "b", "c"]).unwrap();
    stage_all(&mut m, &["a"]);
    let msg = protocol_message(m.handle(begin("a")).unwrap_err());
    assert!(msg.contains("unexpected Begin for volume \"a\""), "{msg}");
}

#[test]
fn commit_after_two_of_three_volumes_is_refused() {
    let mut m = start(&local(), &["a", "b", "c"]).unwrap();
    stage_all(&mut m, &["a", "b"]);
    let msg = protocol_message(m.handle(CycleMsg::Commit(Gen(4))).unwrap_err());
    assert!(msg.contains("Commit after 2 of 3 volumes"), "{msg}");
}

#[test]
fn commit_of_another_gen_is_refused() {
    let mut m = start(&local(), &["a", "b", "c"]).unwrap();
    stage_all(&mut m, &["a", "b", "c"]);
    let msg = protocol_message(m.handle(CycleMsg::Commit(Gen(9))).unwrap_err());
    assert!(
        msg.contains("unexpected Commit during the cycle of gen 4"),
        "{msg}"
    );
}

#[test]
fn a_message_while_a_volume_is_received_is_refused() {
    let mut m = start(&local(), &["a", "b", "c"]).unwrap();
    m.handle(begin("a")).unwrap();
    let msg = protocol_message(m.handle(CycleMsg::Commit(Gen(4))).unwrap_err());
    assert!(
        msg.contains("while volume a is still being received"),
        "{msg}"
    );
}

#[test]
fn a_kubernetes_gen_without_manifests_is_refused() {
    let prot = kube();
    let mut m = Receiving::start(
        &prot,
        None,
        Default::default(),
        CycleStart {
            point: point(1),
            base: None,
            volumes: metas(&["prod.data-0"]),
        },
    )
    .unwrap();
    assert_eq!(m.group().volumes[0].path, Path::new("/r/prod/data-0.img"));
    // A resync: the volume's hashes first, then its chunks against them.
    let Action::ServeHashes { known, .. } = m
        .handle(CycleMsg::HashRequest {
            volume: "prod.data-0".into(),
            chunk_size: CS,
        })
        .unwrap()
    else {
        panic!("no hashes")
    };
    assert_eq!(known, None, "no consistent point: scan the replica");
    m.hashes_served(
        VolumeName::new("prod.data-0").unwrap(),
        crate::store::schema::SCRATCH,
    );
    let Action::Receive { base_gen, .. } = m.handle(begin("prod.data-0")).unwrap() else {
        panic!("no receive")
    };
    assert_eq!(base_gen, crate::store::schema::SCRATCH);
    m.staged(Staged {
        log: "/s/x.log".into(),
        record: vrec(),
        fresh: false,
    });
    let msg = protocol_message(m.handle(CycleMsg::Commit(Gen(1))).unwrap_err());
    assert!(msg.contains("without its manifest bundle"), "{msg}");
    // A bundle that does not decode is refused by gen.
    let msg = protocol_message(m.handle(CycleMsg::Manifests(vec![9, 9])).unwrap_err());
    assert!(msg.contains("manifest bundle of gen 1"), "{msg}");
}

#[test]
fn manifests_for_a_local_protection_are_refused() {
    let mut m = start(&local(), &["a", "b", "c"]).unwrap();
    let msg = protocol_message(m.handle(CycleMsg::Manifests(vec![])).unwrap_err());
    assert!(msg.contains("unexpected Manifests"), "{msg}");
}

#[test]
fn begin_without_a_base_or_hashes_is_a_base_mismatch() {
    // The primary claims no base (a resync) but skips the hash exchange.
    let mut m = Receiving::start(
        &local(),
        have(&["a", "b", "c"]),
        Default::default(),
        CycleStart {
            point: point(4),
            base: None,
            volumes: metas(&["a", "b", "c"]),
        },
    )
    .unwrap();
    let err = m.handle(begin("a")).unwrap_err();
    assert!(
        matches!(err.told(), Refusal::BaseMismatch { sent: None, .. }),
        "{err}"
    );
}

#[test]
fn hashes_come_from_the_consistent_point_at_its_chunk_size_only() {
    let mut m = start(&local(), &["a", "b", "c"]).unwrap();
    let ask = |cs| CycleMsg::HashRequest {
        volume: "a".into(),
        chunk_size: cs,
    };
    assert!(matches!(
        m.handle(ask(CS)).unwrap(),
        Action::ServeHashes {
            known: Some(Gen(3)),
            ..
        }
    ));
    assert!(matches!(
        m.handle(ask(4096)).unwrap(),
        Action::ServeHashes { known: None, .. }
    ));
    let msg = protocol_message(m.handle(ask(3)).unwrap_err());
    assert!(msg.contains("chunk size 3 outside"), "{msg}");
    let msg = protocol_message(
        m.handle(CycleMsg::HashRequest {
            volume: "x".into(),
            chunk_size: CS,
        })
        .unwrap_err(),
    );
    assert!(
        msg.contains("hash request for unknown volume \"x\""),
        "{msg}"
    );
}

#[test]
fn admission_refuses_an_older_epoch_and_a_failed_over_site() {
    let rec = ProtectionRecord {
        epoch: Epoch(3),
        point: have(&["a"]),
        ..Default::default()
    };
    assert!(admit(&rec, false, Epoch(3)).is_ok());
    assert!(
        admit(&rec, false, Epoch(4)).is_ok(),
        "a newer primary (failback) is taken"
    );
    let e = admit(&rec, false, Epoch(2)).unwrap_err();
    assert!(matches!(
        e.told(),
        Refusal::StaleEpoch {
            ours: Epoch(2),
            theirs: Epoch(3)
        }
    ));
    assert_eq!(e.metric_label(), ErrorKind::Fenced);
    let e = admit(&rec, true, Epoch(3)).unwrap_err();
    assert!(matches!(
        e.told(),
        Refusal::FailedOver {
            epoch: Epoch(3),
            gen: Some(Gen(3))
        }
    ));
    let failed = ProtectionRecord {
        failed_over: Some(FailoverRecord {
            at_ms: 1,
            gen: Some(Gen(3)),
            snapshot_taken_at_ms: None,
        }),
        ..rec
    };
    assert!(matches!(
        admit(&failed, false, Epoch(9)).unwrap_err().told(),
        Refusal::FailedOver { .. }
    ));
}

#[test]
fn a_primary_receives_only_after_a_failback_and_a_dr_site_only_until_one() {
    let mut rec = ProtectionRecord::default();
    assert!(receives(&rec, false).is_ok());
    let e = receives(&rec, true).unwrap_err();
    assert!(matches!(e.told(), Refusal::NotReceiving(_)));
    assert_ne!(e.metric_label(), ErrorKind::Fenced, "not a fence");
    let turn = |sends| crate::store::turn::Turn {
        sends,
        at_ms: 1,
        peer: "b".into(),
        fork: None,
        earlier: Vec::new(),
    };
    rec.turn = Some(turn(false));
    assert!(receives(&rec, true).is_ok());
    rec.turn = Some(turn(true));
    assert!(receives(&rec, false).is_err());
    // Failed over and sending after a failback: the old primary at an older epoch is
    // fenced; the peer this site asked to fail back (a newer epoch) is only told to retry.
    rec.failed_over = Some(FailoverRecord {
        at_ms: 1,
        gen: None,
        snapshot_taken_at_ms: None,
    });
    rec.epoch = Epoch(3);
    let old = admit_peer(&rec, false, false, Epoch(2)).unwrap_err();
    assert_eq!(old.metric_label(), ErrorKind::Fenced);
    let turned = admit_peer(&rec, false, false, Epoch(4)).unwrap_err();
    assert!(matches!(turned.told(), Refusal::NotReceiving(_)));
}

#[test]
fn a_volume_under_repair_resyncs_against_its_replica_and_is_repaired_by_the_commit() {
    let repair = std::collections::BTreeSet::from([VolumeName::new("b").unwrap()]);
    let mut m = Receiving::start(
        &local(),
        have(&["a", "b", "c"]),
        repair,
        CycleStart {
            point: point(4),
            base: Some(point(3)),
            volumes: metas(&["a", "b", "c"]),
        },
    )
    .unwrap();
    // Its chunks may not be diffed against an index that no longer describes it.
    let msg = protocol_message(m.handle(begin("b")).unwrap_err());
    assert!(msg.contains("volume b is under repair"), "{msg}");
    let ask = CycleMsg::HashRequest {
        volume: "b".into(),
        chunk_size: CS,
    };
    assert!(
        matches!(
            m.handle(ask).unwrap(),
            Action::ServeHashes { known: None, .. }
        ),
        "the replica is scanned, not its index served"
    );
    m.hashes_served(VolumeName::new("b").unwrap(), crate::store::schema::SCRATCH);
    stage_all(&mut m, &["a", "b", "c"]);
    let Action::Commit { commit, .. } = m.handle(CycleMsg::Commit(Gen(4))).unwrap() else {
        panic!("no commit")
    };
    assert_eq!(
        commit
            .repaired
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>(),
        ["b"]
    );
}

fn staged(v: &str) -> Staged {
    Staged {
        log: format!("/s/{v}.log").into(),
        record: vrec(),
        fresh: false,
    }
}

#[test]
fn movers_join_side_by_side_and_the_commit_waits_for_every_one() {
    let prot = local();
    let mut m = start(&prot, &["a", "b", "c"]).unwrap();
    // Two movers at once, each answered with the consistent point's hashes.
    for v in ["a", "b"] {
        match m.join(v, CS).unwrap() {
            Action::ServeHashes { volume, known, .. } => {
                assert_eq!(volume.as_str(), v);
                assert_eq!(known, Some(Gen(3)));
            }
            other => panic!("{other:?}"),
        }
    }
    // A volume in flight may join again (the newer attempt supersedes the older), but
    // not arrive inline.
    assert!(matches!(
        m.join("a", CS).unwrap(),
        Action::ServeHashes { .. }
    ));
    assert!(m.handle(begin("a")).is_err());
    // Unknown volumes and bad chunk sizes are refused.
    assert!(format!("{}", m.join("zz", CS).unwrap_err()).contains("not in the cycle"));
    assert!(m.join("c", 3).is_err());
    // The third comes inline, as a local volume would.
    assert!(matches!(
        m.handle(begin("c")).unwrap(),
        Action::Receive { .. }
    ));
    m.staged(staged("c"));
    m.joined_staged(VolumeName::new("a").unwrap(), Gen(3), staged("a"));
    let e = m.handle(CycleMsg::Commit(Gen(4))).unwrap_err();
    assert!(format!("{e}").contains("mover of volume b"), "{e}");
    // A failed mover's volume may join again (its Job's retry) and then commits.
    m.join_failed("b");
    assert!(matches!(
        m.join("b", CS).unwrap(),
        Action::ServeHashes { .. }
    ));
    m.joined_staged(VolumeName::new("b").unwrap(), Gen(3), staged("b"));
    // A staged volume cannot join again.
    assert!(format!("{}", m.join("b", CS).unwrap_err()).contains("already staged"));
    match m.handle(CycleMsg::Commit(Gen(4))).unwrap() {
        Action::Commit { commit, .. } => assert_eq!(commit.point.volumes.len(), 3),
        other => panic!("{other:?}"),
    }
}
