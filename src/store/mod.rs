//! The state store: replication state and hash indexes in one RocksDB, so that what must
//! change together commits in one write batch. No RocksDB type leaves this module.

pub mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::engine::index::Segment;
use crate::ids::{ChunkHash, Epoch, Gen, Point};
use schema::*;

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
    pub volumes: BTreeMap<String, VolumeRecord>,
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
        }
    }
}

/// The DR site's group-commit record: the gen's staged volumes are complete and verified.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CommitRecord {
    pub v: u32,
    pub point: PointRecord,
    /// Volume name → staging log path.
    pub logs: BTreeMap<String, String>,
    /// Volumes whose "log" is a complete new replica file, renamed into place on apply
    /// (a first full sync onto a replica that did not exist).
    #[serde(default)]
    pub fresh: BTreeSet<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StagedVolume {
    pub v: u32,
    pub cycle: u64,
    pub log: String,
    pub record: VolumeRecord,
    /// `log` is a new replica file, not a staging log.
    #[serde(default)]
    pub fresh: bool,
}

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

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

impl Batch {
    pub fn put_protection(&mut self, prot: &str, rec: &ProtectionRecord) -> &mut Self {
        self.ops
            .push(Op::Put(CF_PROTECTIONS, prot.as_bytes().to_vec(), json(rec)));
        self
    }
    pub fn put_segment(
        &mut self,
        prot: &str,
        vol: &str,
        gen: Gen,
        no: u64,
        seg: &Segment,
    ) -> &mut Self {
        self.ops.push(Op::Put(
            CF_INDEX,
            index_key(prot, vol, gen, no),
            seg.encode(),
        ));
        self
    }
    pub fn delete_index(&mut self, prot: &str, vol: &str, gen: Gen) -> &mut Self {
        let from = index_prefix(prot, vol, gen);
        let to = prefix_end(&from);
        self.ops.push(Op::DeleteRange(CF_INDEX, from, to));
        self
    }
    pub fn put_commit(&mut self, prot: &str, rec: &CommitRecord) -> &mut Self {
        self.ops.push(Op::Put(
            CF_COMMITS,
            commit_key(prot, rec.point.point.gen),
            json(rec),
        ));
        self
    }
    pub fn delete_commit(&mut self, prot: &str, gen: Gen) -> &mut Self {
        self.ops.push(Op::Delete(CF_COMMITS, commit_key(prot, gen)));
        self
    }
    pub fn put_staged(&mut self, prot: &str, gen: Gen, vol: &str, rec: &StagedVolume) -> &mut Self {
        self.ops
            .push(Op::Put(CF_STAGED, staged_key(prot, gen, vol), json(rec)));
        self
    }
    /// A gen's manifest bundle; bundles older than the last [`MANIFEST_GENS_KEPT`] go.
    pub fn put_manifests(&mut self, prot: &str, gen: Gen, bundle: Vec<u8>) -> &mut Self {
        if gen.0 > MANIFEST_GENS_KEPT {
            self.ops.push(Op::DeleteRange(
                CF_MANIFESTS,
                commit_key(prot, Gen(0)),
                commit_key(prot, Gen(gen.0 - MANIFEST_GENS_KEPT + 1)),
            ));
        }
        self.ops
            .push(Op::Put(CF_MANIFESTS, commit_key(prot, gen), bundle));
        self
    }
    pub fn delete_staged(&mut self, prot: &str, gen: Gen, vol: &str) -> &mut Self {
        self.ops
            .push(Op::Delete(CF_STAGED, staged_key(prot, gen, vol)));
        self
    }
}

pub struct Store {
    db: DB,
}

fn decode<T: DeserializeOwned>(what: &str, key: &[u8], v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).with_context(|| {
        format!(
            "decode {what} record {:?} in the state store (written by another lifeboat version?)",
            String::from_utf8_lossy(key)
        )
    })
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
        let db = DB::open_cf_descriptors(&opts, dir, cfs).with_context(|| {
            format!(
                "open state store {} (is another lifeboat daemon using this state_dir?)",
                dir.display()
            )
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
        prot: &str,
        vol: &str,
        gen: Gen,
        no: u64,
        seg: &Segment,
    ) -> Result<()> {
        let mut b = Batch::default();
        b.put_segment(prot, vol, gen, no, seg);
        self.write(b, false)
    }

    /// The manifest bundle committed with `gen`, if it is kept.
    pub fn manifests(&self, prot: &str, gen: Gen) -> Result<Option<Vec<u8>>> {
        self.db
            .get_cf(self.cf(CF_MANIFESTS), commit_key(prot, gen))
            .context("read manifests from the state store")
    }

    /// The gens whose manifest bundles are kept, oldest first.
    pub fn manifest_gens(&self, prot: &str) -> Result<Vec<Gen>> {
        let mut prefix = prot.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_MANIFESTS),
            rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
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

    pub fn protection(&self, prot: &str) -> Result<Option<ProtectionRecord>> {
        let cf = self.cf(CF_PROTECTIONS);
        match self
            .db
            .get_cf(cf, prot.as_bytes())
            .context("read the state store")?
        {
            None => Ok(None),
            Some(v) => decode("protection", prot.as_bytes(), &v).map(Some),
        }
    }

    /// The index of (prot, vol, gen) in segment order.
    pub fn index(
        &self,
        prot: &str,
        vol: &str,
        gen: Gen,
    ) -> impl Iterator<Item = Result<(u64, Segment)>> + '_ {
        let prefix = index_prefix(prot, vol, gen);
        let it = self.db.iterator_cf(
            self.cf(CF_INDEX),
            IteratorMode::From(&prefix, Direction::Forward),
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

    /// Every (volume, gen) that has index segments for `prot`.
    pub fn index_gens(&self, prot: &str) -> Result<Vec<(String, Gen)>> {
        let mut prefix = prot.as_bytes().to_vec();
        prefix.push(0);
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
            let Some((vol, gen, _)) = parse_index_key(prot, &k) else {
                break;
            };
            from = prefix_end(&index_prefix(prot, &vol, gen));
            out.push((vol, gen));
        }
        Ok(out)
    }

    /// Adds to `b` the removal of every index of `prot` whose gen is not in `keep`.
    pub fn drop_index_except(&self, prot: &str, keep: &[Gen], b: &mut Batch) -> Result<()> {
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

    pub fn commits(&self, prot: &str) -> Result<Vec<CommitRecord>> {
        let mut p = prot.as_bytes().to_vec();
        p.push(0);
        Ok(self
            .scan_prefix(CF_COMMITS, &p, "commit")?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// Staged volumes of `prot`: (gen, volume, record).
    pub fn staged(&self, prot: &str) -> Result<Vec<(Gen, String, StagedVolume)>> {
        let mut p = prot.as_bytes().to_vec();
        p.push(0);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::CycleId;

    #[test]
    fn batches_commit_records_and_indexes_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = Batch::default();
        let seg = Segment {
            hashes: vec![ChunkHash([1; 32]); 3],
        };
        b.put_segment("p", "v", Gen(2), 0, &seg)
            .put_segment("p", "v", Gen(2), 1, &seg);
        b.put_segment("p", "w", Gen(3), 0, &seg);
        b.put_segment("p2", "v", Gen(2), 0, &seg);
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
        b.put_protection("p", &rec);
        store.write(b, true).unwrap();
        assert_eq!(store.protection("p").unwrap(), Some(rec));
        let segs: Vec<_> = store
            .index("p", "v", Gen(2))
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[1], (1, seg.clone()));
        assert_eq!(
            store.index_gens("p").unwrap(),
            vec![("v".into(), Gen(2)), ("w".into(), Gen(3))]
        );
        let mut b = Batch::default();
        b.delete_index("p", "v", Gen(2));
        store.write(b, false).unwrap();
        assert_eq!(store.index("p", "v", Gen(2)).count(), 0);
        assert_eq!(store.index("p2", "v", Gen(2)).count(), 1);
        drop(store);
        // Reopening finds what was written; a second open of the same dir is refused by name.
        let store = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(
            format!("{err:#}").contains("another lifeboat daemon"),
            "{err:#}"
        );
        assert_eq!(store.index("p", "w", Gen(3)).count(), 1);
    }
}
