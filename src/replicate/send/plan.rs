//! The primary's decisions for a cycle, pure: what the DR site's answer to `Prepare` means
//! (go on, or fenced), which gen comes next, which base each volume diffs against (or a
//! resync by hash exchange), whether changed chunks are refined, and how each refusal
//! ends the cycle. The shell in [`super`] only carries them out.

use crate::config::{Protection, Refine};
use crate::ids::{Epoch, Gen, Point};
use crate::net::wire::Refusal;
use crate::replicate::error::CycleError;
use crate::replicate::messages::PrepareAnswer;
use crate::store::{PointRecord, ProtectionRecord};
use crate::volume::snapshot::GroupSnapshot;

/// What the DR site's answer to `Prepare` means.
#[derive(Debug, PartialEq)]
pub enum Prepared {
    /// Go on from the DR site's consistent point; `repair` volumes resync by hash
    /// exchange.
    Go {
        point: Option<Point>,
        repair: Vec<String>,
    },
    /// Re-protected: take the DR site's newer epoch (once) and prepare again.
    Adopt(Epoch),
    /// The DR site is at a newer epoch or failed over: this primary is fenced.
    Fence(Refusal),
    /// Refused for a reason that does not fence.
    Refused(Refusal),
}

/// `rec` is this primary's record: its epoch, and whether it was re-protected.
pub fn prepared(rec: &ProtectionRecord, answer: PrepareAnswer) -> Prepared {
    let ours = rec.epoch;
    let newer = match &answer {
        PrepareAnswer::Prepared { epoch, .. } => Some(*epoch).filter(|e| *e > ours),
        PrepareAnswer::Refused(Refusal::StaleEpoch { theirs, .. }) => Some(*theirs),
        _ => None,
    };
    match (answer, newer) {
        (_, Some(epoch)) if rec.reprotect => Prepared::Adopt(epoch),
        (PrepareAnswer::Prepared { .. }, Some(epoch)) => Prepared::Fence(Refusal::StaleEpoch {
            ours,
            theirs: epoch,
        }),
        (PrepareAnswer::Prepared { point, repair, .. }, None) => Prepared::Go { point, repair },
        (PrepareAnswer::Refused(r), _) if fences(&r) => Prepared::Fence(r),
        (PrepareAnswer::Refused(r), _) => Prepared::Refused(r),
    }
}

/// Whether a refusal means the DR site took over.
pub fn fences(r: &Refusal) -> bool {
    matches!(r, Refusal::StaleEpoch { .. } | Refusal::FailedOver { .. })
}

/// The fence's message, as recorded and shown.
pub fn fence_message(r: &Refusal) -> String {
    format!("fenced: {r}")
}

/// A refusal of `what` (the cycle, refinement) as the cycle's error. A fencing refusal is
/// persisted by the shell before it becomes [`CycleError::Fenced`]; one that arrives in
/// the middle of a stream ends the cycle as refused, and the next `Prepare` fences.
pub fn refused(what: &'static str, r: Refusal) -> CycleError {
    CycleError::Refused { what, refusal: r }
}

/// The gen and base of a cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct CyclePlan {
    pub gen: Gen,
    /// The acknowledged base, when the DR site's consistent point is that gen: the cycle
    /// is incremental. None: every volume resyncs by hash exchange.
    pub base: Option<PointRecord>,
}

/// `rec` is the record reconciled with the DR site's point.
pub fn plan(rec: &ProtectionRecord, dr_point: Option<Point>) -> CyclePlan {
    let base = rec.point.clone().filter(|p| Some(p.point) == dr_point);
    let newest = rec
        .point_gen()
        .map_or(0, |g| g.0)
        .max(dr_point.map_or(0, |p| p.gen.0));
    CyclePlan {
        gen: Gen(newest + 1),
        base,
    }
}

/// The index gen a volume diffs against: the base's, when the base has the volume at this
/// chunk size and the DR site is not repairing its replica. None: the volume resyncs
/// against the DR site's hashes.
pub fn volume_base(
    base: Option<&PointRecord>,
    volume: &str,
    chunk_size: u32,
    repair: &[String],
) -> Option<Gen> {
    base.filter(|b| b.volume_at(volume, chunk_size).is_some())
        .filter(|_| !repair.iter().any(|r| r == volume))
        .map(|b| b.point.gen)
}

/// A volume that was not empty at the base and is empty now: a question for the operator
/// (a lost disk, a wrong path), not a truncation to send to its replica.
pub fn emptied(
    prot: &Protection,
    snap: &GroupSnapshot,
    base: Option<&PointRecord>,
) -> Option<String> {
    let base = base?;
    snap.volumes.iter().find_map(|v| {
        let was = base.volumes.get(v.name.as_str())?;
        let path = prot.volume(v.name.as_str()).map(|c| c.path.display().to_string());
        (v.size == 0 && was.size > 0).then(|| {
            format!(
                "volume {} ({}) is empty now but had {} bytes at gen {}; lifeboat will not replicate that as a truncation of its replica. Restore the volume, or remove it from the protection",
                v.name,
                path.unwrap_or_default(),
                was.size,
                base.point.gen
            )
        })
    })
}

/// Whether changed chunks the replica has are sent as block patches; `auto_on_link` is the
/// link's answer for `refine = "auto"`.
pub fn refine(setting: Refine, auto_on_link: bool) -> bool {
    match setting {
        Refine::On => true,
        Refine::Off => false,
        Refine::Auto => auto_on_link,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ids::{ChunkHash, CycleId, VolumeName};
    use crate::store::VolumeRecord;

    fn point(gen: u64) -> Point {
        Point {
            gen: Gen(gen),
            cycle: CycleId(gen),
            taken_at_ms: gen,
        }
    }

    fn at(gen: u64, chunk_size: u32) -> PointRecord {
        PointRecord {
            point: point(gen),
            volumes: BTreeMap::from([(
                VolumeName::new("v").unwrap(),
                VolumeRecord {
                    size: 1,
                    chunk_size,
                    root: ChunkHash([0; 32]),
                },
            )]),
        }
    }

    #[test]
    fn plan_table() {
        // (our base, the DR site's point) -> (next gen, incremental)
        let rows = [
            (None, None, 1, false),
            (Some(3), Some(3), 4, true),
            // The DR site lost its state: resync, and never reuse a gen it may have seen.
            (Some(3), None, 4, false),
            // The DR site is ahead (our ack of gen 5 and its record were lost).
            (Some(3), Some(5), 6, false),
            // We are ahead of a DR site restored from a backup.
            (Some(7), Some(2), 8, false),
            (None, Some(2), 3, false),
        ];
        for (ours, dr, gen, incremental) in rows {
            let rec = ProtectionRecord {
                point: ours.map(|g| at(g, 65536)),
                ..Default::default()
            };
            let p = plan(&rec, dr.map(point));
            assert_eq!(
                (p.gen, p.base.is_some()),
                (Gen(gen), incremental),
                "{ours:?} {dr:?}"
            );
        }
    }

    #[test]
    fn volume_base_table() {
        let base = at(3, 65536);
        assert_eq!(volume_base(Some(&base), "v", 65536, &[]), Some(Gen(3)));
        // Another chunk size, an unknown volume, no base, a replica under repair: resync.
        assert_eq!(volume_base(Some(&base), "v", 4096, &[]), None);
        assert_eq!(volume_base(Some(&base), "w", 65536, &[]), None);
        assert_eq!(volume_base(None, "v", 65536, &[]), None);
        assert_eq!(volume_base(Some(&base), "v", 65536, &["v".into()]), None);
    }

    #[test]
    fn prepared_table() {
        let e = Epoch(2);
        let rec = ProtectionRecord {
            epoch: e,
            ..Default::default()
        };
        let go = PrepareAnswer::Prepared {
            epoch: e,
            point: Some(point(4)),
            repair: vec!["v".into()],
        };
        assert_eq!(
            prepared(&rec, go),
            Prepared::Go {
                point: Some(point(4)),
                repair: vec!["v".into()],
            }
        );
        let newer = || PrepareAnswer::Prepared {
            epoch: Epoch(3),
            point: None,
            repair: vec![],
        };
        assert_eq!(
            prepared(&rec, newer()),
            Prepared::Fence(Refusal::StaleEpoch {
                ours: e,
                theirs: Epoch(3)
            })
        );
        // Re-protected: the DR site's newer epoch is adopted instead, once, whether it
        // says so in Prepared or refuses our older one.
        let reprotected = ProtectionRecord {
            reprotect: true,
            ..rec.clone()
        };
        assert_eq!(prepared(&reprotected, newer()), Prepared::Adopt(Epoch(3)));
        let stale = Refusal::StaleEpoch {
            ours: e,
            theirs: Epoch(3),
        };
        assert_eq!(
            prepared(&reprotected, PrepareAnswer::Refused(stale.clone())),
            Prepared::Adopt(Epoch(3))
        );
        assert_eq!(
            prepared(&rec, PrepareAnswer::Refused(stale.clone())),
            Prepared::Fence(stale)
        );
        let failed = Refusal::FailedOver {
            epoch: Epoch(3),
            gen: None,
        };
        assert_eq!(
            prepared(&rec, PrepareAnswer::Refused(failed.clone())),
            Prepared::Fence(failed.clone())
        );
        assert_eq!(
            prepared(&rec, PrepareAnswer::Refused(Refusal::Busy)),
            Prepared::Refused(Refusal::Busy)
        );
        assert!(fence_message(&failed).starts_with("fenced: the DR site has failed over"));
        assert!(matches!(
            refused("refinement", Refusal::Busy),
            CycleError::Refused {
                what: "refinement",
                ..
            }
        ));
    }

    #[test]
    fn refine_table() {
        for (setting, link, want) in [
            (Refine::On, false, true),
            (Refine::Off, true, false),
            (Refine::Auto, true, true),
            (Refine::Auto, false, false),
        ] {
            assert_eq!(refine(setting, link), want, "{setting:?} {link}");
        }
    }
}
