//! Fences that live beside the data: failover writes a small file next to each replica
//! (`<replica>.lifeboat-fence`, fsynced with its directory) saying which epoch and gen the
//! site failed over at. The state store says so too, but a state store can be lost (a disk
//! replaced, a volume restored, a PVC recreated) while the replicas, now the application's
//! live data, are not; a DR site that finds a fence refuses replication into those replicas
//! whatever its store says, so the old primary cannot overwrite the new primary's writes.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, Gen};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub protection: String,
    /// The epoch failover raised: replication from an older one is refused.
    pub epoch: Epoch,
    /// The gen the replicas were recovered at.
    pub gen: Option<Gen>,
    pub at_ms: u64,
}

pub fn fence_path(replica: &Path) -> PathBuf {
    let mut s = replica.as_os_str().to_owned();
    s.push(".lifeboat-fence");
    PathBuf::from(s)
}

/// Writes the fence beside `replica`, durably (temp file, fsync, rename, fsync the dir).
pub fn write(replica: &Path, fence: &Fence) -> Result<()> {
    let path = fence_path(replica);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(fence).expect("fence serialises"))
        .and_then(|_| f.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))?;
    super::sync_parent(&path)
}

/// The fence beside `replica`, if there is one.
pub fn read(replica: &Path) -> Result<Option<Fence>> {
    let path = fence_path(replica);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).with_context(|| {
            format!(
                "read fence {} (damaged? it must not be ignored)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read fence {}", path.display())),
    }
}

/// Removes the fence beside `replica` (re-protect), durably.
pub fn remove(replica: &Path) -> Result<bool> {
    let path = fence_path(replica);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            super::sync_parent(&path)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("remove fence {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_is_written_read_back_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("replicas/v.img");
        assert_eq!(read(&r).unwrap(), None);
        let f = Fence {
            protection: "p".into(),
            epoch: Epoch(2),
            gen: Some(Gen(7)),
            at_ms: 5,
        };
        write(&r, &f).unwrap();
        assert_eq!(read(&r).unwrap(), Some(f));
        std::fs::write(fence_path(&r), b"{torn").unwrap();
        assert!(read(&r)
            .unwrap_err()
            .to_string()
            .contains("must not be ignored"));
        assert!(remove(&r).unwrap());
        assert!(!remove(&r).unwrap());
        assert_eq!(read(&r).unwrap(), None);
    }
}
