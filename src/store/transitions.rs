//! Each durable step of replication and failover, as one synced batch: the only places that
//! change a protection's record. A step reads the record, applies the pure change from
//! [`super::records`], and writes the record together with what must change with it
//! (indexes dropped, a commit record removed) in one batch, so a crash leaves either the
//! state before or the state after.
//!
//! These run on blocking threads: async code calls them through [`super::StateStore`].

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use super::{
    records::{RecoveryPoint, ScrubRecord},
    retention::Retention,
    Batch, CommitRecord, PointRecord, ProtectionRecord, Reconciled, StagedVolume, Store,
    VolumeRecord,
};
use crate::ids::{Epoch, Gen, Point, ProtectionName, VolumeName};
use crate::store::schema::SCRATCH;
use crate::volume::fence::Fence;
use crate::volume::stamp::Stamp;

impl Store {
    fn put_record(
        &self,
        prot: &ProtectionName,
        rec: &ProtectionRecord,
        mut b: Batch,
    ) -> Result<()> {
        b.put_protection(prot, rec);
        self.write(b, true)
    }

    // The primary's steps.

    /// Brings the record in line with the DR site's consistent point (see
    /// [`ProtectionRecord::reconcile`]); every index but the base's (and kept points') goes.
    pub fn reconcile(
        &self,
        prot: &ProtectionName,
        dr_point: Option<Point>,
    ) -> Result<(ProtectionRecord, Reconciled)> {
        let mut rec = self.record(prot)?;
        let outcome = rec.reconcile(dr_point);
        let mut b = Batch::default();
        self.drop_index_except(prot, &rec.dr_index_gens(), &mut b)?;
        self.put_record(prot, &rec, b)?;
        Ok((rec, outcome))
    }

    /// A new gen's snapshot is taken: its index may be written from now on.
    pub fn begin_tentative(&self, prot: &ProtectionName, point: Point) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        rec.tentative = Some(PointRecord {
            point,
            volumes: BTreeMap::new(),
        });
        self.put_record(prot, &rec, Batch::default())?;
        Ok(rec)
    }

    /// Every volume of the tentative gen is sent: its geometry and roots, and (by the sync)
    /// the index segments written without one.
    pub fn record_volumes(
        &self,
        prot: &ProtectionName,
        point: Point,
        volumes: BTreeMap<VolumeName, VolumeRecord>,
    ) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        match rec.tentative.as_mut() {
            Some(t) if t.point == point => t.volumes = volumes,
            other => bail!(
                "record the volumes of gen {}: the tentative gen is {:?}",
                point.gen,
                other.map(|t| t.point.gen)
            ),
        }
        self.put_record(prot, &rec, Batch::default())?;
        Ok(rec)
    }

    /// The DR site acknowledged the tentative gen: it becomes the base; older and scratch
    /// indexes go.
    pub fn acknowledge(&self, prot: &ProtectionName) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        rec.acknowledge()?;
        let mut b = Batch::default();
        // The base's, and (at a site sending after a failback) its kept points'.
        self.drop_index_except(prot, &rec.kept_gens(), &mut b)?;
        self.put_record(prot, &rec, b)?;
        Ok(rec)
    }

    /// The DR site refused this primary for a newer epoch: replication stops for good.
    pub fn fence(
        &self,
        prot: &ProtectionName,
        message: String,
        at_ms: u64,
    ) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        rec.fence(message, at_ms);
        self.put_record(prot, &rec, Batch::default())?;
        Ok(rec)
    }

    /// Start-up at the primary: indexes other than the base's and the tentative gen's are
    /// garbage. Returns the gens kept (their snapshots are kept too).
    pub fn prune_primary(&self, prot: &ProtectionName) -> Result<Vec<Gen>> {
        let rec = self.record(prot)?;
        let keep = rec.kept_gens();
        let mut b = Batch::default();
        self.drop_index_except(prot, &keep, &mut b)?;
        self.write(b, true)?;
        Ok(keep)
    }

    /// Empties the scratch index of a volume before a resync fills it. Unsynced: scratch
    /// hashes only matter within the cycle that wrote them.
    pub fn clear_scratch(&self, prot: &ProtectionName, vol: &VolumeName) -> Result<()> {
        let mut b = Batch::default();
        b.delete_index(prot, vol.as_str(), SCRATCH);
        self.write(b, false)
    }

    // The DR site's steps.

    /// A primary of a newer epoch (after a failback, say) is accepted: the epoch is raised
    /// before anything of its cycle is staged.
    pub fn raise_epoch(&self, prot: &ProtectionName, epoch: Epoch) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        if epoch > rec.epoch {
            rec.epoch = epoch;
            self.put_record(prot, &rec, Batch::default())?;
        }
        Ok(rec)
    }

    /// One volume of an uncommitted gen is staged and verified. Unsynced: the group
    /// commit's sync makes it durable, and without a commit it is discarded anyway.
    pub fn record_staged(
        &self,
        prot: &ProtectionName,
        gen: Gen,
        vol: &VolumeName,
        staged: &StagedVolume,
    ) -> Result<()> {
        let mut b = Batch::default();
        b.put_staged(prot, gen, vol, staged);
        self.write(b, false)
    }

    /// The group commit: from this sync on, the gen's staged volumes must be applied (the
    /// redo), and its manifests are kept with it.
    pub fn commit_group(
        &self,
        prot: &ProtectionName,
        commit: &CommitRecord,
        manifests: Option<Vec<u8>>,
    ) -> Result<()> {
        let gen = commit.point.point.gen;
        let mut b = Batch::default();
        b.put_commit(prot, commit);
        if let Some(m) = manifests {
            let oldest = self.record(prot)?.points.first().map(|p| p.point.point.gen);
            b.put_manifests(prot, gen, m, oldest);
        }
        for v in commit.logs.keys() {
            b.delete_staged(prot, gen, v.as_str());
        }
        self.write(b, true)
    }

    /// The redo of a group commit is applied and fsynced: the gen is the consistent point,
    /// and its replicas look as `stamps` say.
    pub fn finish_redo(
        &self,
        prot: &ProtectionName,
        commit: &CommitRecord,
        stamps: BTreeMap<VolumeName, Stamp>,
    ) -> Result<ProtectionRecord> {
        self.finish_redo_with_point(prot, commit, stamps, None)
            .map(|(rec, _)| rec)
    }

    /// As [`Self::finish_redo`], recording the gen's recovery point (CSI replicas) in the
    /// same batch; returns the points `rule` prunes, whose snapshots the caller
    /// deletes (a crash before that leaves them to the next sweep).
    pub fn finish_redo_with_point(
        &self,
        prot: &ProtectionName,
        commit: &CommitRecord,
        stamps: BTreeMap<VolumeName, Stamp>,
        point: Option<(RecoveryPoint, Retention)>,
    ) -> Result<(ProtectionRecord, Vec<RecoveryPoint>)> {
        let gen = commit.point.point.gen;
        let mut rec = self.record(prot)?;
        rec.finish_gen(commit, stamps);
        let pruned = match point {
            Some((p, rule)) => rec.add_point(p, rule, crate::ids::now_ms()),
            None => Vec::new(),
        };
        let mut b = Batch::default();
        self.drop_index_except(prot, &rec.dr_index_gens(), &mut b)?;
        b.delete_commit(prot, gen);
        self.put_record(prot, &rec, b)?;
        Ok((rec, pruned))
    }

    /// Drops the staged volumes of uncommitted gens and their partial indexes; returns the
    /// volumes that were staged (their fresh replicas are removed by the caller). Refused
    /// while a committed gen waits for its redo: its logs must never be discarded.
    pub fn discard_staged(&self, prot: &ProtectionName) -> Result<Vec<String>> {
        if !self.commits(prot)?.is_empty() {
            bail!("protection {prot} has a committed gen that is not applied yet");
        }
        let rec = self.record(prot)?;
        let staged = self.staged(prot)?;
        let mut b = Batch::default();
        for (gen, vol, _) in &staged {
            b.delete_staged(prot, *gen, vol);
        }
        self.drop_index_except(prot, &rec.dr_index_gens(), &mut b)?;
        self.write(b, true)?;
        Ok(staged.into_iter().map(|(_, v, _)| v).collect())
    }

    /// A committed gen cannot be finished (its staging log is gone and its replicas do not
    /// hold it): the commit is dropped, the point stays, and every volume of the gen is
    /// resynced by hash exchange on the next cycle.
    pub fn abandon_commit(
        &self,
        prot: &ProtectionName,
        commit: &CommitRecord,
        why: &str,
    ) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        for v in commit.logs.keys() {
            rec.repair.insert(v.clone(), why.to_string());
        }
        let mut b = Batch::default();
        b.delete_commit(prot, commit.point.point.gen);
        self.put_record(prot, &rec, b)?;
        Ok(rec)
    }

    /// Pins (or unpins) recovery point `gen` against pruning.
    pub fn hold_point(
        &self,
        prot: &ProtectionName,
        gen: Gen,
        held: bool,
    ) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        let Some(p) = rec.points.iter_mut().find(|p| p.point.point.gen == gen) else {
            bail!("protection {prot} has no recovery point of gen {gen}");
        };
        p.held = held;
        self.put_record(prot, &rec, Batch::default())?;
        Ok(rec)
    }

    /// Pins recovery point `gen` for drill `id` (None: unpins it from any drill).
    pub fn drill_hold(
        &self,
        prot: &ProtectionName,
        gen: Gen,
        id: Option<&str>,
    ) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        let Some(p) = rec.points.iter_mut().find(|p| p.point.point.gen == gen) else {
            bail!("protection {prot} has no recovery point of gen {gen}");
        };
        p.drill = id.map(str::to_string);
        self.put_record(prot, &rec, Batch::default())?;
        Ok(rec)
    }

    /// Every drill pin of `prot` removed (the start-up sweep: no drill outlives a restart).
    pub fn drill_unhold_all(&self, prot: &ProtectionName) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        if rec.points.iter().any(|p| p.drill.is_some()) {
            for p in &mut rec.points {
                p.drill = None;
            }
            self.put_record(prot, &rec, Batch::default())?;
        }
        Ok(rec)
    }

    /// Replicas found changed outside lifeboat: the next cycle repairs them.
    pub fn mark_repair(
        &self,
        prot: &ProtectionName,
        found: BTreeMap<VolumeName, String>,
    ) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        rec.repair.extend(found);
        self.put_record(prot, &rec, Batch::default())?;
        Ok(rec)
    }

    /// A full scrub pass ended at `at_ms`; `clean`: it found every replica equal to the
    /// DR index.
    pub fn record_scrub(
        &self,
        prot: &ProtectionName,
        at_ms: u64,
        clean: bool,
    ) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        let last_clean_ms = if clean {
            Some(at_ms)
        } else {
            rec.scrub.and_then(|s| s.last_clean_ms)
        };
        rec.scrub = Some(ScrubRecord {
            last_pass_ms: at_ms,
            last_clean_ms,
        });
        self.put_record(prot, &rec, Batch::default())?;
        Ok(rec)
    }

    /// A fence found beside the replicas: the protection is failed over (the store had
    /// lost it).
    pub fn restore_fence(&self, prot: &ProtectionName, fence: &Fence) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        rec.restore_fence(fence.epoch, fence.gen, fence.at_ms);
        self.put_record(prot, &rec, Batch::default())?;
        Ok(rec)
    }

    /// Re-protect in the original direction (see [`ProtectionRecord::reprotect`]).
    pub fn reprotect(&self, prot: &ProtectionName) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        rec.reprotect();
        self.put_record(prot, &rec, Batch::default())?;
        Ok(rec)
    }

    /// Primary, re-protected: the DR site's epoch becomes ours.
    pub fn adopt_epoch(&self, prot: &ProtectionName, epoch: Epoch) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        rec.adopt_epoch(epoch);
        self.put_record(prot, &rec, Batch::default())?;
        Ok(rec)
    }

    /// Failback, at the failed-over site: it sends from now on (see
    /// [`ProtectionRecord::turn_to_sender`]).
    pub fn turn_to_sender(
        &self,
        prot: &ProtectionName,
        peer: &str,
        at_ms: u64,
    ) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        rec.turn_to_sender(peer, at_ms)?;
        self.put_record(prot, &rec, Batch::default())?;
        Ok(rec)
    }

    /// Failback, at the old primary: it receives from now on; its indexes go with its base
    /// (see [`ProtectionRecord::turn_to_receiver`]).
    pub fn turn_to_receiver(
        &self,
        prot: &ProtectionName,
        peer: &str,
        epoch: Epoch,
        at_ms: u64,
        volumes: &[VolumeName],
        fork: super::turn::Fork,
    ) -> Result<ProtectionRecord> {
        let mut rec = self.record(prot)?;
        rec.turn_to_receiver(peer, epoch, at_ms, volumes, fork);
        let mut b = Batch::default();
        self.drop_index_except(prot, &rec.dr_index_gens(), &mut b)?;
        self.put_record(prot, &rec, b)?;
        Ok(rec)
    }

    /// Failover: the epoch is raised (once) and the recovered point recorded, so the old
    /// primary is refused from this sync on. Returns the record and whether this call
    /// failed over (false: it had already).
    pub fn fail_over(
        &self,
        prot: &ProtectionName,
        at_ms: u64,
        chosen: Option<Point>,
    ) -> Result<(ProtectionRecord, bool)> {
        let mut rec = self.record(prot)?;
        let now = rec.fail_over(at_ms, chosen);
        if now {
            self.put_record(prot, &rec, Batch::default())?;
        }
        Ok((rec, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::index::Segment;
    use crate::ids::{ChunkHash, CycleId};

    fn point(gen: u64) -> Point {
        Point {
            gen: Gen(gen),
            cycle: CycleId(gen),
            taken_at_ms: gen,
        }
    }

    #[test]
    fn a_primary_cycle_leaves_only_the_acknowledged_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let p = ProtectionName::new("p").unwrap();
        let v = VolumeName::new("v").unwrap();
        let seg = Segment {
            hashes: vec![ChunkHash([3; 32]); 2],
        };
        for gen in [1, 2] {
            store.begin_tentative(&p, point(gen)).unwrap();
            store.write_segment(&p, &v, Gen(gen), 0, &seg).unwrap();
            let vols = BTreeMap::from([(
                v.clone(),
                VolumeRecord {
                    size: 2,
                    chunk_size: 1,
                    root: ChunkHash([0; 32]),
                },
            )]);
            // Recording the volumes of a gen that is not the tentative one is refused.
            assert!(store
                .record_volumes(&p, point(gen + 5), vols.clone())
                .is_err());
            store.record_volumes(&p, point(gen), vols).unwrap();
            store.acknowledge(&p).unwrap();
        }
        assert_eq!(
            store.index_gens(&p).unwrap(),
            vec![("v".to_string(), Gen(2))]
        );
        // A tentative gen 3 the DR site never got is dropped with its index.
        store.begin_tentative(&p, point(3)).unwrap();
        store.write_segment(&p, &v, Gen(3), 0, &seg).unwrap();
        let (rec, outcome) = store.reconcile(&p, Some(point(2))).unwrap();
        assert_eq!(outcome, Reconciled::Dropped(Gen(3)));
        assert_eq!(rec.point_gen(), Some(Gen(2)));
        assert_eq!(
            store.index_gens(&p).unwrap(),
            vec![("v".to_string(), Gen(2))]
        );
        assert_eq!(store.record(&p).unwrap(), rec);
    }

    #[test]
    fn staging_cannot_be_discarded_while_a_commit_waits_for_its_redo() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let p = ProtectionName::new("p").unwrap();
        let v = VolumeName::new("v").unwrap();
        let vrec = VolumeRecord {
            size: 2,
            chunk_size: 1,
            root: ChunkHash([0; 32]),
        };
        let staged = StagedVolume {
            v: crate::store::schema::RECORD_VERSION,
            cycle: 1,
            log: "/s/v.log".into(),
            record: vrec.clone(),
            fresh: false,
        };
        store.record_staged(&p, Gen(1), &v, &staged).unwrap();
        let commit = CommitRecord {
            v: crate::store::schema::RECORD_VERSION,
            point: PointRecord {
                point: point(1),
                volumes: BTreeMap::from([(v.clone(), vrec)]),
            },
            logs: BTreeMap::from([(v.clone(), "/s/v.log".into())]),
            fresh: Default::default(),
            repaired: Default::default(),
        };
        store
            .commit_group(&p, &commit, Some(b"bundle".to_vec()))
            .unwrap();
        assert!(
            store.staged(&p).unwrap().is_empty(),
            "the commit took the staged volume"
        );
        let err = store.discard_staged(&p).unwrap_err().to_string();
        assert!(err.contains("not applied yet"), "{err}");
        let rec = store.finish_redo(&p, &commit, BTreeMap::new()).unwrap();
        assert_eq!(rec.point_gen(), Some(Gen(1)));
        assert!(store.commits(&p).unwrap().is_empty());
        assert_eq!(
            store.manifests(&p, Gen(1)).unwrap(),
            Some(b"bundle".to_vec())
        );
        assert!(store.discard_staged(&p).unwrap().is_empty());
    }
}
