//! Staging logs: the DR site appends each verified chunk of an uncommitted gen to a log
//! file, never to the replica. The group commit makes the logs the truth; applying a log is
//! an idempotent redo, so a crash during apply is finished at restart.
//!
//! Format: header `LBSTAGE1`, volume size (u64 LE), chunk size (u32 LE); then records of
//! kind (u8: 1 data, 2 zero, 3 patch), index (u64 LE), length (u32 LE), blake3 (32 bytes),
//! for data the bytes, for a patch its block bitmap and blocks. Data and zero records are
//! re-verified when read back; a patch is verified when applied, against the replica chunk
//! it completes (the hash is of the whole new chunk).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::engine::chunk::Geometry;
use crate::engine::{refine, verify};
use crate::ids::ChunkHash;

const MAGIC: &[u8; 8] = b"LBSTAGE1";
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_PATCH: u8 = 3;

pub enum Record {
    Data {
        index: u64,
        hash: ChunkHash,
        bytes: Vec<u8>,
    },
    Zero {
        index: u64,
        len: u32,
    },
    /// Blocks of a chunk that differ from the replica's (see [`crate::engine::refine`]).
    Patch {
        index: u64,
        hash: ChunkHash,
        len: u32,
        mask: Vec<u8>,
        data: Vec<u8>,
    },
}

pub struct StagingWriter {
    out: BufWriter<File>,
    path: PathBuf,
    pub records: u64,
    pub bytes: u64,
}

impl StagingWriter {
    pub fn create(path: &Path, geometry: Geometry) -> Result<Self> {
        if let Some(dir) = path.parent() {
            super::create_private_dir(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("create staging log {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.write_all(MAGIC)?;
        out.write_all(&geometry.size.to_le_bytes())?;
        out.write_all(&geometry.chunk_size.to_le_bytes())?;
        Ok(StagingWriter {
            out,
            path: path.to_path_buf(),
            records: 0,
            bytes: 20,
        })
    }

    /// Appends a verified chunk; `bytes` is `None` for a zero chunk of `len` bytes.
    pub fn append(
        &mut self,
        index: u64,
        hash: &ChunkHash,
        len: u32,
        bytes: Option<&[u8]>,
    ) -> Result<()> {
        match bytes {
            Some(b) => self.record(KIND_DATA, index, hash, len, &[b]),
            None => self.record(KIND_ZERO, index, hash, len, &[]),
        }
    }

    /// Appends a verified patch: the blocks of chunk `index` that differ from the replica.
    pub fn append_patch(
        &mut self,
        index: u64,
        hash: &ChunkHash,
        len: u32,
        mask: &[u8],
        data: &[u8],
    ) -> Result<()> {
        self.record(KIND_PATCH, index, hash, len, &[mask, data])
    }

    /// One record: the fixed header, then `body` in order.
    fn record(
        &mut self,
        kind: u8,
        index: u64,
        hash: &ChunkHash,
        len: u32,
        body: &[&[u8]],
    ) -> Result<()> {
        let w = &mut self.out;
        let res = (|| -> std::io::Result<()> {
            w.write_all(&[kind])?;
            w.write_all(&index.to_le_bytes())?;
            w.write_all(&len.to_le_bytes())?;
            w.write_all(&hash.0)?;
            for part in body {
                w.write_all(part)?;
            }
            Ok(())
        })();
        res.with_context(|| format!("append to staging log {}", self.path.display()))?;
        self.records += 1;
        self.bytes += 45 + body.iter().map(|p| p.len() as u64).sum::<u64>();
        Ok(())
    }

    /// Flushes and fsyncs; after this the log survives a crash.
    pub fn finish(self) -> Result<PathBuf> {
        let f = self
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("flush staging log {}", self.path.display()))?;
        f.sync_all()
            .with_context(|| format!("fsync staging log {}", self.path.display()))?;
        Ok(self.path)
    }
}

/// Reads a staging log back, verifying every record against its hash.
pub struct StagingReader {
    input: BufReader<Box<dyn Read + Send>>,
    path: PathBuf,
    pub geometry: Geometry,
}

impl StagingReader {
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).with_context(|| format!("open staging log {}", path.display()))?;
        Self::from_reader(Box::new(f), path)
    }

    /// A log read from `input` (a DR writer's, streamed from its daemon); `path` names
    /// it in errors.
    pub fn from_reader(input: Box<dyn Read + Send>, path: &Path) -> Result<Self> {
        let mut input = BufReader::with_capacity(1 << 20, input);
        let mut header = [0u8; 20];
        input
            .read_exact(&mut header)
            .with_context(|| format!("read header of staging log {}", path.display()))?;
        if &header[..8] != MAGIC {
            bail!("{} is not a lifeboat staging log", path.display());
        }
        let size = u64::from_le_bytes(header[8..16].try_into().expect("8"));
        let chunk_size = u32::from_le_bytes(header[16..20].try_into().expect("4"));
        Ok(StagingReader {
            input,
            path: path.to_path_buf(),
            geometry: Geometry::new(size, chunk_size.max(1)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn next_record(&mut self) -> Result<Option<Record>> {
        let mut head = [0u8; 45];
        match self.input.read_exact(&mut head[..1]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("read {}", self.path.display())),
        }
        self.input
            .read_exact(&mut head[1..])
            .with_context(|| format!("truncated record in {}", self.path.display()))?;
        let index = u64::from_le_bytes(head[1..9].try_into().expect("8"));
        let len = u32::from_le_bytes(head[9..13].try_into().expect("4"));
        let hash = ChunkHash::from_slice(&head[13..45]).expect("32");
        if index >= self.geometry.chunk_count() || len != self.geometry.len(index) {
            bail!(
                "{}: record for chunk {index} of {len} bytes does not fit the volume",
                self.path.display()
            );
        }
        match head[0] {
            KIND_DATA => {
                let mut bytes = vec![0u8; len as usize];
                self.input.read_exact(&mut bytes).with_context(|| {
                    format!("truncated chunk {index} in {}", self.path.display())
                })?;
                verify::data(index, &hash, len, &bytes).map_err(|e| {
                    anyhow::anyhow!("{}: {e}; refusing to apply it", self.path.display())
                })?;
                Ok(Some(Record::Data { index, hash, bytes }))
            }
            KIND_ZERO => {
                verify::zero(index, &hash, len)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))?;
                Ok(Some(Record::Zero { index, len }))
            }
            KIND_PATCH => {
                let mut mask = vec![0u8; refine::mask_len(len as usize)];
                self.input.read_exact(&mut mask).with_context(|| {
                    format!("truncated patch {index} in {}", self.path.display())
                })?;
                let data_len = refine::patch_data_len(len as usize, &mask)
                    .map_err(|e| anyhow::anyhow!("{}: patch {index}: {e}", self.path.display()))?;
                let mut data = vec![0u8; data_len];
                self.input.read_exact(&mut data).with_context(|| {
                    format!("truncated patch {index} in {}", self.path.display())
                })?;
                Ok(Some(Record::Patch {
                    index,
                    hash,
                    len,
                    mask,
                    data,
                }))
            }
            k => bail!("{}: unknown record kind {k}", self.path.display()),
        }
    }
}
