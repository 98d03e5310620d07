//! The fork of a failback: before the first cycle of the new direction overwrites the old
//! primary's volumes, each is kept as it was, so the writes it took after the last common
//! gen are never lost without a trace. A file is cloned by reflink where the file system
//! shares extents (else copied, holes kept) into `.lifeboat-forks/<protection>/epoch-<E>/`
//! beside it; a block device is copied under the state directory. The operator removes a
//! fork once it is no longer wanted: lifeboat names it and leaves it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::snapshot::{snapshot_volume, Method};
use super::sync_parent;
use crate::config::SnapshotMode;
use crate::ids::Epoch;

const DIR: &str = ".lifeboat-forks";

/// Where the fork of `protection`'s failback to `epoch` keeps the volume at `path`.
pub fn dir(path: &Path, state_dir: &Path, protection: &str, epoch: Epoch) -> PathBuf {
    let on_file = std::fs::metadata(path).is_ok_and(|m| m.is_file());
    let base = match path.parent() {
        Some(p) if on_file && !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => state_dir.to_path_buf(),
    };
    base.join(DIR)
        .join(protection)
        .join(format!("epoch-{}", epoch.0))
}

/// Keeps the volume at `path` as `name` in `dir`, durably; returns where and how.
pub fn keep(path: &Path, dir: &Path, name: &str) -> Result<(PathBuf, Method)> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let dest = dir.join(name);
    let tmp = dir.join(format!("{name}.partial"));
    let (_, method) = snapshot_volume(path, &tmp, SnapshotMode::Auto)
        .with_context(|| format!("keep {} in {}", path.display(), dir.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync {}", tmp.display()))?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("rename to {}", dest.display()))?;
    sync_parent(&dest)?;
    Ok((dest, method))
}

/// Removes a fork directory that could not be completed.
pub fn discard(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove an incomplete fork");
        }
    }
}
