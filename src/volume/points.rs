//! Recovery points of file replicas (local and host-path mode): after gen N is applied,
//! each replica is cloned by reflink (FICLONE) into `.lifeboat-points/<protection>/<gen>/`
//! beside it, on the replicas' own file system, so a point costs metadata until the
//! replica is written again (copy-on-write keeps the point's blocks). Where the file system
//! cannot share extents, keeping more than one point is refused, naming the directory:
//! a full copy per cycle is not what `keep` promises.
//!
//! Each file is cloned to a temporary name, fsynced and renamed, so a point file is whole
//! or absent; the point is recorded only after every file is in place (see
//! `replicate::recovery`), and a gen directory no record names is swept.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::snapshot::reflink;
use super::sync_parent;
use crate::ids::{Gen, VolumeName};

const DIR: &str = ".lifeboat-points";

/// Where `protection`'s points of the replicas in `replica`'s directory live.
pub fn root(replica: &Path, protection: &str) -> PathBuf {
    replica
        .parent()
        .unwrap_or(Path::new("."))
        .join(DIR)
        .join(protection)
}

/// Clones `src` to `dest` by reflink (through a temporary name), fsynced; fails, naming
/// `dest`'s directory, where the file system cannot share extents.
pub fn clone_file(src: &Path, dest: &Path) -> Result<()> {
    let tmp = dest.with_extension("partial");
    let s = File::open(src).with_context(|| format!("open {}", src.display()))?;
    let d = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    if let Err(e) = reflink(&s, &d) {
        let _ = std::fs::remove_file(&tmp);
        let dir = dest.parent().unwrap_or(Path::new("."));
        return Err(e).with_context(|| {
            format!(
                "clone {} by reflink: keeping more than one recovery point needs a file system that shares extents (XFS with reflink, btrfs) for the replicas in {}; set keep = 1, or move the replicas",
                src.display(),
                dir.display()
            )
        });
    }
    d.sync_all()?;
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("rename {} to {}", tmp.display(), dest.display()))?;
    sync_parent(dest)
}

/// Cuts point `gen` of `replicas` (volume, replica path); returns each point file.
pub fn cut(
    protection: &str,
    gen: Gen,
    replicas: &[(VolumeName, PathBuf)],
) -> Result<BTreeMap<VolumeName, PathBuf>> {
    let mut out = BTreeMap::new();
    for (v, path) in replicas {
        let dir = root(path, protection).join(gen.to_string());
        super::create_private_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        let file = path
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(v.as_str()));
        let dest = dir.join(file);
        clone_file(path, &dest)?;
        out.insert(v.clone(), dest);
    }
    Ok(out)
}

/// Removes a pruned point's files, and its directories once empty.
pub fn remove(files: &BTreeMap<VolumeName, PathBuf>) -> Result<()> {
    for f in files.values() {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", f.display())),
        }
        if let Some(d) = f.parent() {
            let _ = std::fs::remove_dir(d);
        }
    }
    Ok(())
}

/// Removes the gen directories of `protection`'s points beside `replicas` that are not in
/// `keep` (what a run killed between cutting and recording left).
pub fn sweep(protection: &str, replicas: &[PathBuf], keep: &[Gen]) -> Result<()> {
    let mut roots: Vec<PathBuf> = replicas.iter().map(|r| root(r, protection)).collect();
    roots.sort();
    roots.dedup();
    for r in roots {
        let Ok(entries) = std::fs::read_dir(&r) else {
            continue;
        };
        for e in entries.flatten() {
            let gen = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok());
            if gen.is_some_and(|g| !keep.contains(&Gen(g))) {
                std::fs::remove_dir_all(e.path())
                    .with_context(|| format!("remove {}", e.path().display()))?;
            }
        }
    }
    Ok(())
}

/// Removes the points' directories beside `replicas` where no point is left in them
/// (after a cut the file system refused).
pub fn remove_empty_roots(protection: &str, replicas: &[PathBuf]) {
    for r in replicas {
        let root = root(r, protection);
        // remove_dir refuses a directory that still holds a point: that one stays.
        if std::fs::remove_dir(&root).is_ok() {
            if let Some(parent) = root.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

/// Puts `replica` back to the point file `point` (a clone, renamed over it).
pub fn restore(point: &Path, replica: &Path) -> Result<()> {
    clone_file(point, replica)
}

/// What the DR site logs when the default retention falls back to the newest point only.
pub const NEWEST_ONLY: &str = "only the newest recovery point is kept: older ones are reflink clones beside the replicas, which this file system cannot make (put the replicas on XFS or btrfs, or set keep = 1 to silence this)";

/// Whether `dir` shares extents (a reflink of a scratch file there works).
pub fn probe(dir: &Path) -> Result<()> {
    let a = dir.join(".lifeboat-reflink-probe");
    let b = dir.join(".lifeboat-reflink-probe.clone");
    std::fs::write(&a, b"probe").with_context(|| format!("write in {}", dir.display()))?;
    let r = clone_file(&a, &b);
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_system_without_reflink_is_named_when_points_are_cut() {
        // /dev/shm (tmpfs) cannot share extents.
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let e = probe(dir.path()).unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("needs a file system that shares extents")
                && text.contains(&dir.path().display().to_string()),
            "{text}"
        );
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "left files behind"
        );
    }
}
