//! The records the state store keeps, and the pure changes a protection's record goes
//! through (acknowledge, reconcile, fence, fail over). Each change is one function of the
//! record, so the rules can be read and tested without RocksDB; [`super::transitions`]
//! makes each one durable in one synced batch.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::retention::Retention;
use super::schema::RECORD_VERSION;
use crate::ids::{ChunkHash, Epoch, Gen, Point, VolumeName};
use crate::volume::stamp::Stamp;

pub use crate::k8s::restore::PointSnapshot;

/// Geometry and root of one volume at a point.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub size: u64,
    pub chunk_size: u32,
    pub root: ChunkHash,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PointRecord {
    pub point: Point,
    pub volumes: BTreeMap<VolumeName, VolumeRecord>,
}

impl PointRecord {
    /// The volume's record at this point, if it was recorded at `chunk_size`: only then can
    /// its index serve as a base.
    pub fn volume_at(&self, volume: &str, chunk_size: u32) -> Option<&VolumeRecord> {
        self.volumes
            .get(volume)
            .filter(|v| v.chunk_size == chunk_size)
    }
}

/// A recovery point kept at the DR site: a consistent gen and, with CSI replicas, the
/// snapshot of each replica taken once every volume of the gen was written and flushed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RecoveryPoint {
    pub point: PointRecord,
    #[serde(default)]
    pub snapshots: BTreeMap<VolumeName, PointSnapshot>,
    /// Pinned against pruning.
    #[serde(default)]
    pub held: bool,
    /// File replicas (local and host-path mode): each volume's reflink clone.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<VolumeName, std::path::PathBuf>,
    /// A Kubernetes drill restoring from this point (its id): pinned until it ends, so no
    /// prune deletes the snapshots its PVCs are restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<String>,
}

impl RecoveryPoint {
    /// Kept whatever the retention rule says: held, or a drill's source.
    pub fn pinned(&self) -> bool {
        self.held || self.drill.is_some()
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FailoverRecord {
    pub at_ms: u64,
    pub gen: Option<Gen>,
    pub snapshot_taken_at_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FenceRecord {
    pub at_ms: u64,
    pub message: String,
}

/// Durable state of one protection at one site.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ProtectionRecord {
    pub v: u32,
    pub epoch: Epoch,
    /// Primary: the acknowledged base. DR: the consistent point.
    pub point: Option<PointRecord>,
    /// Primary: a gen whose index was written but whose acknowledgement has not arrived.
    pub tentative: Option<PointRecord>,
    /// DR: set by failover; the site takes no more replication for this protection.
    pub failed_over: Option<FailoverRecord>,
    /// Primary: set when the DR site refused us for a newer epoch.
    pub fenced: Option<FenceRecord>,
    /// DR: each replica as lifeboat last wrote it, checked before every cycle.
    #[serde(default)]
    pub replicas: BTreeMap<VolumeName, Stamp>,
    /// DR: replicas found changed outside lifeboat (or left behind by a gen that could not
    /// be finished), with what was found; the next cycle resyncs them by hash exchange.
    #[serde(default)]
    pub repair: BTreeMap<VolumeName, String>,
    /// Primary: re-protected after a fence; the DR site's newer epoch is adopted once.
    #[serde(default)]
    pub reprotect: bool,
    /// DR: the recovery points kept (CSI replicas, or file replicas with `keep` above 1),
    /// oldest first; the last is `point`'s.
    #[serde(default)]
    pub points: Vec<RecoveryPoint>,
    /// DR: the background scrub's last full pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub: Option<ScrubRecord>,
    /// Set by a failback: which way the protection goes from this site (see
    /// [`super::turn`]); absent, the site's configured role says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<super::turn::Turn>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrubRecord {
    pub last_pass_ms: u64,
    /// When a full pass last found every replica equal to the DR index.
    pub last_clean_ms: Option<u64>,
}

impl Default for ProtectionRecord {
    fn default() -> Self {
        ProtectionRecord {
            v: RECORD_VERSION,
            epoch: Epoch(1),
            point: None,
            tentative: None,
            failed_over: None,
            fenced: None,
            replicas: BTreeMap::new(),
            repair: BTreeMap::new(),
            scrub: None,
            reprotect: false,
            points: Vec::new(),
            turn: None,
        }
    }
}

/// What [`ProtectionRecord::reconcile`] did with a tentative gen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// No tentative gen.
    Nothing,
    /// The DR site committed it (its acknowledgement was lost): it is the base now.
    Adopted(Gen),
    /// The DR site does not have it: dropped.
    Dropped(Gen),
}

impl ProtectionRecord {
    /// The gen of the point, if any.
    pub fn point_gen(&self) -> Option<Gen> {
        self.point.as_ref().map(|p| p.point.gen)
    }

    /// The gens whose indexes the DR site keeps: its consistent point's, and each kept
    /// point of file replicas' (what `verify --gen` compares a point with).
    pub fn dr_index_gens(&self) -> Vec<Gen> {
        let mut gens: Vec<Gen> = self
            .points
            .iter()
            .filter(|p| !p.files.is_empty())
            .map(|p| p.point.point.gen)
            .chain(self.point_gen())
            .collect();
        gens.sort();
        gens.dedup();
        gens
    }

    /// The gens whose indexes the primary must keep: the base and the tentative gen (and,
    /// at a site sending after a failback, its kept points' DR indexes).
    pub fn kept_gens(&self) -> Vec<Gen> {
        let mut gens = self.dr_index_gens();
        gens.extend(self.tentative.iter().map(|r| r.point.gen));
        gens
    }

    /// Primary: brings the record in line with what the DR site has committed. A tentative
    /// gen the DR site committed (with its volumes recorded) becomes the base; any other
    /// tentative gen is dropped.
    pub fn reconcile(&mut self, dr_point: Option<Point>) -> Reconciled {
        match self.tentative.take() {
            None => Reconciled::Nothing,
            Some(t) if Some(t.point) == dr_point && !t.volumes.is_empty() => {
                let gen = t.point.gen;
                self.point = Some(t);
                Reconciled::Adopted(gen)
            }
            Some(t) => Reconciled::Dropped(t.point.gen),
        }
    }

    /// Primary: the DR site acknowledged the tentative gen; it becomes the base.
    pub fn acknowledge(&mut self) -> Result<Gen> {
        let Some(t) = self.tentative.take() else {
            bail!("acknowledged a cycle with no tentative gen");
        };
        let gen = t.point.gen;
        self.point = Some(t);
        Ok(gen)
    }

    /// Primary: the DR site refused us for a newer epoch; we stop for good. A cycle that
    /// was in flight when a failback turned this site to receiving does not fence it.
    pub fn fence(&mut self, message: String, at_ms: u64) {
        if self.turn.as_ref().is_some_and(|t| !t.sends) {
            return;
        }
        self.fenced = Some(FenceRecord { at_ms, message });
    }

    /// DR: a committed gen is applied: it is the consistent point, its replicas look as
    /// `stamps` say, and the volumes it resynced are repaired.
    pub fn finish_gen(&mut self, commit: &CommitRecord, stamps: BTreeMap<VolumeName, Stamp>) {
        self.point = Some(commit.point.clone());
        self.replicas = stamps;
        for v in &commit.repaired {
            self.repair.remove(v);
        }
    }

    /// Adds the newest recovery point and prunes those `rule` no longer keeps at `now_ms`
    /// (never the newest, never a held one); returns those pruned, whose snapshots go next.
    pub fn add_point(
        &mut self,
        point: RecoveryPoint,
        rule: Retention,
        now_ms: u64,
    ) -> Vec<RecoveryPoint> {
        let gen = point.point.point.gen;
        self.points.retain(|p| p.point.point.gen != gen);
        self.points.push(point);
        self.points.sort_by_key(|p| p.point.point.gen);
        super::retention::prune(&mut self.points, rule, now_ms)
    }

    /// The kept points' gens for an error that names them: "2, 5, 6", or what is kept
    /// when no older point is.
    pub fn kept_points_text(&self) -> String {
        let kept: Vec<String> = self
            .points
            .iter()
            .map(|p| p.point.point.gen.to_string())
            .collect();
        match (kept.is_empty(), self.point_gen()) {
            (false, _) => kept.join(", "),
            (true, Some(g)) => format!(
                "only the newest, gen {g}; set keep above 1 at the DR site to keep older ones"
            ),
            (true, None) => "none".into(),
        }
    }

    /// The recovery point of `gen`, if it is kept.
    pub fn recovery_point(&self, gen: Gen) -> Option<&RecoveryPoint> {
        self.points.iter().find(|p| p.point.point.gen == gen)
    }

    /// DR: a fence found beside the replicas (the state store was lost or restored):
    /// the protection is failed over at the fence's epoch at least.
    pub fn restore_fence(&mut self, epoch: Epoch, gen: Option<Gen>, at_ms: u64) {
        self.epoch = self.epoch.max(epoch);
        if self.failed_over.is_none() {
            self.failed_over = Some(FailoverRecord {
                at_ms,
                gen,
                snapshot_taken_at_ms: None,
            });
        }
    }

    /// Re-protect after a failover, in the original direction. DR: replication is taken
    /// again (at the raised epoch). Primary: the fence is lifted and the DR site's newer
    /// epoch will be adopted once, instead of fencing again.
    pub fn reprotect(&mut self) {
        self.failed_over = None;
        if self.fenced.take().is_some() {
            self.reprotect = true;
        }
    }

    /// Primary: after a re-protect, the DR site's epoch becomes ours.
    pub fn adopt_epoch(&mut self, epoch: Epoch) {
        self.epoch = self.epoch.max(epoch);
        self.reprotect = false;
    }

    /// DR: failover raises the epoch (once) and records which point was recovered:
    /// `chosen`, an older kept point, or else the consistent point. Returns false when the
    /// protection had already failed over.
    pub fn fail_over(&mut self, at_ms: u64, chosen: Option<Point>) -> bool {
        if self.failed_over.is_some() {
            return false;
        }
        self.epoch = Epoch(self.epoch.0 + 1);
        let point = chosen.or(self.point.as_ref().map(|p| p.point));
        self.failed_over = Some(FailoverRecord {
            at_ms,
            gen: point.map(|p| p.gen),
            snapshot_taken_at_ms: point.map(|p| p.taken_at_ms),
        });
        true
    }
}

/// The DR site's group-commit record: the gen's staged volumes are complete and verified.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CommitRecord {
    pub v: u32,
    pub point: PointRecord,
    /// Volume → staging log path.
    pub logs: BTreeMap<VolumeName, PathBuf>,
    /// Volumes whose "log" is a complete new replica file, renamed into place on apply
    /// (a first full sync onto a replica that did not exist).
    #[serde(default)]
    pub fresh: BTreeSet<VolumeName>,
    /// Volumes under repair that this gen resynced by hash exchange.
    #[serde(default)]
    pub repaired: BTreeSet<VolumeName>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StagedVolume {
    pub v: u32,
    pub cycle: u64,
    pub log: PathBuf,
    pub record: VolumeRecord,
    /// `log` is a new replica file, not a staging log.
    #[serde(default)]
    pub fresh: bool,
}

pub(super) fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

/// Decodes a JSON record, refusing one of another format version by name: a downgraded
/// daemon must not misread what a newer one wrote.
pub(super) fn decode<T: DeserializeOwned>(what: &str, key: &[u8], v: &[u8]) -> Result<T> {
    #[derive(Deserialize)]
    struct Version {
        v: Option<u32>,
    }
    let key = String::from_utf8_lossy(key);
    let version = serde_json::from_slice::<Version>(v).map(|h| h.v);
    match version {
        Ok(Some(RECORD_VERSION)) => {}
        Ok(Some(other)) => bail!(
            "{what} record {key:?} in the state store has format version {other}; this lifeboat reads version {RECORD_VERSION} (was the store written by another lifeboat release?)"
        ),
        Ok(None) => bail!(
            "{what} record {key:?} in the state store has no format version; expected version {RECORD_VERSION}"
        ),
        Err(e) => bail!("decode {what} record {key:?} in the state store: {e} (the store is damaged)"),
    }
    serde_json::from_slice(v).map_err(|e| {
        anyhow::anyhow!(
            "decode {what} record {key:?} in the state store: {e} (the store is damaged)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::CycleId;

    fn point(gen: u64) -> Point {
        Point {
            gen: Gen(gen),
            cycle: CycleId(gen * 10 + 1),
            taken_at_ms: gen * 1000,
        }
    }

    fn record(gen: u64, with_volume: bool) -> PointRecord {
        let mut volumes = BTreeMap::new();
        if with_volume {
            let root = ChunkHash([gen as u8; 32]);
            volumes.insert(
                VolumeName::new("v").unwrap(),
                VolumeRecord {
                    size: 1,
                    chunk_size: 65536,
                    root,
                },
            );
        }
        PointRecord {
            point: point(gen),
            volumes,
        }
    }

    #[test]
    fn reconcile_table() {
        // (base, tentative, DR site's point) -> (outcome, base after)
        let rows = [
            (None, None, None, Reconciled::Nothing, None),
            (Some(1), None, Some(1), Reconciled::Nothing, Some(1)),
            // The acknowledgement of gen 2 was lost: the DR site has it.
            (
                Some(1),
                Some((2, true)),
                Some(2),
                Reconciled::Adopted(Gen(2)),
                Some(2),
            ),
            // Gen 2 never committed: the base stays.
            (
                Some(1),
                Some((2, true)),
                Some(1),
                Reconciled::Dropped(Gen(2)),
                Some(1),
            ),
            // A tentative gen killed before its volumes were recorded is never adopted.
            (
                Some(1),
                Some((2, false)),
                Some(2),
                Reconciled::Dropped(Gen(2)),
                Some(1),
            ),
            // A first cycle whose ack was lost.
            (
                None,
                Some((1, true)),
                Some(1),
                Reconciled::Adopted(Gen(1)),
                Some(1),
            ),
        ];
        for (base, tentative, dr, outcome, after) in rows {
            let mut rec = ProtectionRecord {
                point: base.map(|g| record(g, true)),
                tentative: tentative.map(|(g, v)| record(g, v)),
                ..Default::default()
            };
            let got = rec.reconcile(dr.map(point));
            assert_eq!(got, outcome, "{base:?} {tentative:?} {dr:?}");
            assert_eq!(
                rec.point_gen(),
                after.map(Gen),
                "{base:?} {tentative:?} {dr:?}"
            );
            assert!(rec.tentative.is_none());
        }
    }

    #[test]
    fn acknowledge_makes_the_tentative_gen_the_base_and_needs_one() {
        let mut rec = ProtectionRecord {
            point: Some(record(1, true)),
            tentative: Some(record(2, true)),
            ..Default::default()
        };
        assert_eq!(rec.kept_gens(), vec![Gen(1), Gen(2)]);
        assert_eq!(rec.acknowledge().unwrap(), Gen(2));
        assert_eq!(rec.point_gen(), Some(Gen(2)));
        assert!(rec.acknowledge().is_err());
    }

    #[test]
    fn failing_over_raises_the_epoch_once() {
        let mut rec = ProtectionRecord {
            point: Some(record(4, true)),
            ..Default::default()
        };
        assert!(rec.fail_over(7, None));
        assert_eq!(rec.epoch, Epoch(2));
        let f = rec.failed_over.clone().unwrap();
        assert_eq!((f.gen, f.snapshot_taken_at_ms), (Some(Gen(4)), Some(4000)));
        assert!(!rec.fail_over(8, None));
        assert_eq!(rec.epoch, Epoch(2));
    }

    #[test]
    fn a_fence_found_beside_the_data_fails_the_protection_over_and_reprotect_lifts_it() {
        let mut dr = ProtectionRecord::default();
        dr.restore_fence(Epoch(3), Some(Gen(5)), 9);
        assert_eq!(dr.epoch, Epoch(3));
        assert_eq!(dr.failed_over.as_ref().and_then(|f| f.gen), Some(Gen(5)));
        // An older fence never lowers the epoch.
        dr.restore_fence(Epoch(2), None, 10);
        assert_eq!(dr.epoch, Epoch(3));
        dr.reprotect();
        assert!(dr.failed_over.is_none() && !dr.reprotect);
        let mut primary = ProtectionRecord::default();
        primary.fence("fenced: epoch 3".into(), 1);
        primary.reprotect();
        assert!(primary.fenced.is_none() && primary.reprotect);
        primary.adopt_epoch(Epoch(3));
        assert_eq!((primary.epoch, primary.reprotect), (Epoch(3), false));
    }

    #[test]
    fn records_of_another_version_are_refused_by_name() {
        let rec = ProtectionRecord::default();
        let ok: ProtectionRecord = decode("protection", b"p", &json(&rec)).unwrap();
        assert_eq!(ok, rec);
        let mut newer = serde_json::to_value(&rec).unwrap();
        newer["v"] = 2.into();
        let err = decode::<ProtectionRecord>("protection", b"p", newer.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("format version 2") && err.contains("\"p\""),
            "{err}"
        );
        let err = decode::<ProtectionRecord>("protection", b"p", b"{\"epoch\":1}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no format version"), "{err}");
        let err = decode::<ProtectionRecord>("protection", b"p", b"\x00garbage")
            .unwrap_err()
            .to_string();
        assert!(err.contains("damaged"), "{err}");
        // A stored volume name is checked like a configured one.
        let mut bad = serde_json::to_value(ProtectionRecord {
            point: Some(record(1, true)),
            ..Default::default()
        })
        .unwrap();
        let vols = bad["point"]["volumes"].as_object_mut().unwrap();
        let v = vols.remove("v").unwrap();
        vols.insert("../x".into(), v);
        assert!(
            decode::<ProtectionRecord>("protection", b"p", bad.to_string().as_bytes()).is_err()
        );
    }
}
