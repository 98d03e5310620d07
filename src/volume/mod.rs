//! Volumes on disk: the primary's group snapshots (taken inside the rules that hold writers
//! quiet), the DR site's staging logs, and where a replica is written.
//!
//! Regular files and block devices are both plain files to this code; a Kubernetes mover
//! reading a block-mode PVC sees the same thing, which is why the engine needs no other
//! volume abstraction than a path.
//!
//! [`file_blake3`] hashes a whole volume file (the demo's and the tests' proof that a
//! replica equals its snapshot).

pub mod fence;
pub mod fork;
pub mod points;
pub mod replica;
pub mod snapshot;
pub mod staging;
pub mod stamp;

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

/// Creates `dir` and any missing parents with mode 0700: what lifeboat keeps there
/// (snapshots, staging logs) is a copy of the protected data. Existing directories are left
/// as they are.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// blake3 of a whole file, as hex.
pub fn file_blake3(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Fsyncs the directory holding `path`, so a rename or a new file in it is durable.
pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync directory {}", dir.display()))
}
