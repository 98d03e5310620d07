//! The state store: replication state and hash indexes in one RocksDB, so that what must
//! change together commits in one write batch. No RocksDB type leaves this module.
//!
//! - [`schema`]: every key and value, in one table.
//! - [`records`]: the records and the pure changes of a protection's record.
//! - [`transitions`]: each durable step of a cycle or a failover as one synced batch.
//! - [`turn`]: which way a protection goes after a failback.
//! - [`face`]: the store as async code sees it; every call runs on a blocking thread.

pub mod face;
pub mod records;
pub mod retention;
pub mod schema;
pub mod transitions;
pub mod turn;

use std::path::Path;

use anyhow::{Context, Result};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use serde::de::DeserializeOwned;

use crate::engine::index::Segment;
use crate::ids::{Gen, ProtectionName, VolumeName};
pub use face::StateStore;
use records::{decode, json};
pub use records::{
    CommitRecord, FailoverRecord, FenceRecord, PointRecord, PointSnapshot, ProtectionRecord,
    Reconciled, RecoveryPoint, StagedVolume, VolumeRecord,
};
use schema::*;

enum Op {
    Put(&'static str, Vec<u8>, Vec<u8>),
    Delete(&'static str, Vec<u8>),
    DeleteRange(&'static str, Vec<u8>, Vec<u8>),
}

/// Changes that commit together.
#[derive(Default)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    pub fn put_protection(&mut self, prot: &ProtectionName, rec: &ProtectionRecord) -> &mut Self {
        self.ops.push(Op::Put(
            CF_PROTECTIONS,
            prot.as_str().as_bytes().to_vec(),
            json(rec),
        ));
        self
    }
    pub fn put_segment(
        &mut self,
        prot: &ProtectionName,
        vol: &VolumeName,
        gen: Gen,
        no: u64,
        seg: &Segment,
    ) -> &mut Self {
        self.ops.push(Op::Put(
            CF_INDEX,
            index_key(prot.as_str(), vol.as_str(), gen, no),
            seg.encode(),
        ));
        self
    }
    /// Removes an index; `vol` is a str because garbage found by [`Store::index_gens`] may
    /// carry a name no config would accept.
    pub fn delete_index(&mut self, prot: &ProtectionName, vol: &str, gen: Gen) -> &mut Self {
        let from = index_prefix(prot.as_str(), vol, gen);
        let to = prefix_end(&from);
        self.ops.push(Op::DeleteRange(CF_INDEX, from, to));
        self
    }
    pub fn put_commit(&mut self, prot: &ProtectionName, rec: &CommitRecord) -> &mut Self {
        self.ops.push(Op::Put(
            CF_COMMITS,
            commit_key(prot.as_str(), rec.point.point.gen),
            json(rec),
        ));
        self
    }
    pub fn delete_commit(&mut self, prot: &ProtectionName, gen: Gen) -> &mut Self {
        self.ops
            .push(Op::Delete(CF_COMMITS, commit_key(prot.as_str(), gen)));
        self
    }
    pub fn put_staged(
        &mut self,
        prot: &ProtectionName,
        gen: Gen,
        vol: &VolumeName,
        rec: &StagedVolume,
    ) -> &mut Self {
        self.ops.push(Op::Put(
            CF_STAGED,
            staged_key(prot.as_str(), gen, vol.as_str()),
            json(rec),
        ));
        self
    }
    /// A gen's manifest bundle; bundles older than the last [`MANIFEST_GENS_KEPT`] gens
    /// and than `oldest_point` (the oldest recovery point kept) go.
    pub fn put_manifests(
        &mut self,
        prot: &ProtectionName,
        gen: Gen,
        bundle: Vec<u8>,
        oldest_point: Option<Gen>,
    ) -> &mut Self {
        let p = prot.as_str();
        let floor = Gen((gen.0 + 1).saturating_sub(MANIFEST_GENS_KEPT));
        let floor = oldest_point.map_or(floor, |o| o.min(floor));
        if floor.0 > 0 {
            self.ops.push(Op::DeleteRange(
                CF_MANIFESTS,
                commit_key(p, Gen(0)),
                commit_key(p, floor),
            ));
        }
        self.ops
            .push(Op::Put(CF_MANIFESTS, commit_key(p, gen), bundle));
        self
    }
    pub fn delete_staged(&mut self, prot: &ProtectionName, gen: Gen, vol: &str) -> &mut Self {
        self.ops
            .push(Op::Delete(CF_STAGED, staged_key(prot.as_str(), gen, vol)));
        self
    }
}

pub struct Store {
    db: DB,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Small memtables: the store holds 32 bytes per 64 KiB chunk, and peak RSS matters.
        opts.set_write_buffer_size(8 << 20);
        opts.set_max_write_buffer_number(2);
        opts.set_keep_log_file_num(4);
        let cfs = ALL_CFS.iter().map(|n| {
            let mut o = Options::default();
            o.set_write_buffer_size(8 << 20);
            o.set_max_write_buffer_number(2);
            ColumnFamilyDescriptor::new(*n, o)
        });
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| {
            // The hint that fits the error, and only that one.
            let text = e.to_string();
            let hint = if text.contains("lock") || text.contains("LOCK") {
                " (is another lifeboat daemon using this state_dir?)"
            } else if e.kind() == rocksdb::ErrorKind::Corruption {
                " (the store is damaged: restore it from a backup, or move it away and let the DR site resync by hash exchange)"
            } else {
                ""
            };
            anyhow::anyhow!("open state store {}: {text}{hint}", dir.display())
        })?;
        Ok(Store { db })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// Applies `batch` atomically; `sync` makes it (and everything written before) durable.
    pub fn write(&self, batch: Batch, sync: bool) -> Result<()> {
        let mut wb = WriteBatch::default();
        for op in batch.ops {
            match op {
                Op::Put(cf, k, v) => wb.put_cf(self.cf(cf), k, v),
                Op::Delete(cf, k) => wb.delete_cf(self.cf(cf), k),
                Op::DeleteRange(cf, a, b) => wb.delete_range_cf(self.cf(cf), a, b),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db
            .write_opt(wb, &wo)
            .context("write to the state store")
    }

    /// Writes one index segment without a sync: an index only matters once a later synced
    /// batch (the tentative record, the group commit) refers to its gen, and that sync makes
    /// everything written before it durable.
    pub fn write_segment(
        &self,
        prot: &ProtectionName,
        vol: &VolumeName,
        gen: Gen,
        no: u64,
        seg: &Segment,
    ) -> Result<()> {
        let mut b = Batch::default();
        b.put_segment(prot, vol, gen, no, seg);
        self.write(b, false)
    }

    /// The manifest bundle committed with `gen`, if it is kept.
    pub fn manifests(&self, prot: &ProtectionName, gen: Gen) -> Result<Option<Vec<u8>>> {
        self.db
            .get_cf(self.cf(CF_MANIFESTS), commit_key(prot.as_str(), gen))
            .context("read manifests from the state store")
    }

    /// The gens whose manifest bundles are kept, oldest first.
    pub fn manifest_gens(&self, prot: &ProtectionName) -> Result<Vec<Gen>> {
        let prefix = name_prefix(prot);
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_MANIFESTS),
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (k, _) = item.context("read manifests from the state store")?;
            let Some(rest) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            if let Ok(b) = <[u8; 8]>::try_from(rest) {
                out.push(Gen(u64::from_be_bytes(b)));
            }
        }
        Ok(out)
    }

    /// The protection's record, if it has one.
    pub fn protection(&self, prot: &ProtectionName) -> Result<Option<ProtectionRecord>> {
        let key = prot.as_str().as_bytes();
        match self
            .db
            .get_cf(self.cf(CF_PROTECTIONS), key)
            .context("read the state store")?
        {
            None => Ok(None),
            Some(v) => decode("protection", key, &v).map(Some),
        }
    }

    /// The protection's record, or the record of a protection that never replicated.
    pub fn record(&self, prot: &ProtectionName) -> Result<ProtectionRecord> {
        Ok(self.protection(prot)?.unwrap_or_default())
    }

    /// The index of (prot, vol, gen) in segment order.
    pub fn index(
        &self,
        prot: &ProtectionName,
        vol: &VolumeName,
        gen: Gen,
    ) -> impl Iterator<Item = Result<(u64, Segment)>> + '_ {
        self.index_from(prot, vol, gen, 0)
    }

    /// As [`Self::index`], from segment `first` on (a scrub slice in the middle).
    pub fn index_from(
        &self,
        prot: &ProtectionName,
        vol: &VolumeName,
        gen: Gen,
        first: u64,
    ) -> impl Iterator<Item = Result<(u64, Segment)>> + '_ {
        let prefix = index_prefix(prot.as_str(), vol.as_str(), gen);
        let start = index_key(prot.as_str(), vol.as_str(), gen, first);
        let it = self.db.iterator_cf(
            self.cf(CF_INDEX),
            IteratorMode::From(&start, Direction::Forward),
        );
        let plen = prefix.len();
        it.map_while(move |item| match item {
            Err(e) => Some(Err(anyhow::Error::new(e).context("iterate the hash index"))),
            Ok((k, v)) => {
                if !k.starts_with(&prefix) || k.len() != plen + 8 {
                    return None;
                }
                let no = u64::from_be_bytes(k[plen..].try_into().expect("8 bytes"));
                Some(
                    Segment::decode(&v)
                        .map(|s| (no, s))
                        .map_err(anyhow::Error::new),
                )
            }
        })
    }

    /// Whether (prot, vol, gen) has any index segment.
    pub fn has_index(&self, prot: &ProtectionName, vol: &VolumeName, gen: Gen) -> bool {
        self.index(prot, vol, gen).next().is_some()
    }

    /// Every (volume, gen) that has index segments for `prot`.
    pub fn index_gens(&self, prot: &ProtectionName) -> Result<Vec<(String, Gen)>> {
        let prefix = name_prefix(prot);
        let mut out: Vec<(String, Gen)> = Vec::new();
        let mut from = prefix.clone();
        loop {
            let mut it = self.db.iterator_cf(
                self.cf(CF_INDEX),
                IteratorMode::From(&from, Direction::Forward),
            );
            let Some(item) = it.next() else { break };
            let (k, _) = item.context("iterate the hash index")?;
            if !k.starts_with(&prefix) {
                break;
            }
            let Some((vol, gen, _)) = parse_index_key(prot.as_str(), &k) else {
                break;
            };
            from = prefix_end(&index_prefix(prot.as_str(), &vol, gen));
            out.push((vol, gen));
        }
        Ok(out)
    }

    /// Adds to `b` the removal of every index of `prot` whose gen is not in `keep`.
    pub fn drop_index_except(
        &self,
        prot: &ProtectionName,
        keep: &[Gen],
        b: &mut Batch,
    ) -> Result<()> {
        for (vol, gen) in self.index_gens(prot)? {
            if !keep.contains(&gen) {
                b.delete_index(prot, &vol, gen);
            }
        }
        Ok(())
    }

    fn scan_prefix<T: DeserializeOwned>(
        &self,
        cf: &'static str,
        prefix: &[u8],
        what: &str,
    ) -> Result<Vec<(Vec<u8>, T)>> {
        let it = self
            .db
            .iterator_cf(self.cf(cf), IteratorMode::From(prefix, Direction::Forward));
        let mut out = Vec::new();
        for item in it {
            let (k, v) = item.context("iterate the state store")?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), decode(what, &k, &v)?));
        }
        Ok(out)
    }

    /// Group commits of `prot` not yet applied to the replicas, oldest first.
    pub fn commits(&self, prot: &ProtectionName) -> Result<Vec<CommitRecord>> {
        Ok(self
            .scan_prefix(CF_COMMITS, &name_prefix(prot), "commit")?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// Staged volumes of `prot`: (gen, volume, record).
    pub fn staged(&self, prot: &ProtectionName) -> Result<Vec<(Gen, String, StagedVolume)>> {
        let p = name_prefix(prot);
        let plen = p.len();
        Ok(self
            .scan_prefix::<StagedVolume>(CF_STAGED, &p, "staged volume")?
            .into_iter()
            .filter_map(|(k, v)| {
                let gen = u64::from_be_bytes(k.get(plen..plen + 8)?.try_into().ok()?);
                let vol = String::from_utf8(k.get(plen + 9..)?.to_vec()).ok()?;
                Some((Gen(gen), vol, v))
            })
            .collect())
    }
}

/// The key prefix of everything a protection has in a column family.
fn name_prefix(prot: &ProtectionName) -> Vec<u8> {
    let mut p = prot.as_str().as_bytes().to_vec();
    p.push(0);
    p
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ids::{ChunkHash, CycleId, Point};

    fn name(s: &str) -> ProtectionName {
        ProtectionName::new(s).unwrap()
    }

    #[test]
    fn batches_commit_records_and_indexes_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (p, p2) = (name("p"), name("p2"));
        let (v, w) = (VolumeName::new("v").unwrap(), VolumeName::new("w").unwrap());
        let mut b = Batch::default();
        let seg = Segment {
            hashes: vec![ChunkHash([1; 32]); 3],
        };
        b.put_segment(&p, &v, Gen(2), 0, &seg)
            .put_segment(&p, &v, Gen(2), 1, &seg);
        b.put_segment(&p, &w, Gen(3), 0, &seg);
        b.put_segment(&p2, &v, Gen(2), 0, &seg);
        let rec = ProtectionRecord {
            point: Some(PointRecord {
                point: Point {
                    gen: Gen(2),
                    cycle: CycleId(5),
                    taken_at_ms: 9,
                },
                volumes: BTreeMap::new(),
            }),
            ..Default::default()
        };
        b.put_protection(&p, &rec);
        store.write(b, true).unwrap();
        assert_eq!(store.protection(&p).unwrap(), Some(rec));
        let segs: Vec<_> = store.index(&p, &v, Gen(2)).collect::<Result<_>>().unwrap();
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[1], (1, seg.clone()));
        assert_eq!(
            store.index_gens(&p).unwrap(),
            vec![("v".into(), Gen(2)), ("w".into(), Gen(3))]
        );
        let mut b = Batch::default();
        b.delete_index(&p, "v", Gen(2));
        store.write(b, false).unwrap();
        assert_eq!(store.index(&p, &v, Gen(2)).count(), 0);
        assert_eq!(store.index(&p2, &v, Gen(2)).count(), 1);
        drop(store);
        // Reopening finds what was written; a second open of the same dir is refused by name.
        let store = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(
            format!("{err:#}").contains("another lifeboat daemon"),
            "{err:#}"
        );
        assert_eq!(store.index(&p, &w, Gen(3)).count(), 1);
    }
}
