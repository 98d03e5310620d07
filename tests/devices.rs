//! Real snapshot mechanisms and block devices: reflink (FICLONE) snapshots on an XFS file
//! system on a loop device, and a block-device volume replicated to a block-device replica.
//! These tests make loop devices and mounts, so they need root (CI runs as root).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::relay::Xfs;
use support::*;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed (these tests need root and xfsprogs): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A loop block device over a file.
struct LoopDev {
    dev: String,
}

impl LoopDev {
    fn new(backing: &Path) -> LoopDev {
        LoopDev {
            dev: run("losetup", &["-f", "--show", backing.to_str().unwrap()]),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Moves `path` onto `target_dir` and leaves a symlink, so configs stay unchanged.
fn relocate(path: &Path, target_dir: &Path) -> PathBuf {
    let to = target_dir.join(path.file_name().unwrap());
    std::fs::copy(path, &to).unwrap();
    std::fs::remove_file(path).unwrap();
    std::os::unix::fs::symlink(&to, path).unwrap();
    to
}

#[test]
fn snapshots_on_xfs_are_reflinks_and_replicate_identically() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 32 << 20)],
        start: false,
        primary_protection: "snapshot = \"reflink\"\nsnapshot_dir = \"xfs/snaps\"",
        ..Default::default()
    });
    let d = pair.dir.path();
    let _xfs = Xfs::mount(&d.join("xfs.img"), &d.join("xfs"), 512 << 20).unwrap();
    relocate(&pair.volume("v1"), &pair.dir.path().join("xfs"));
    let mut pair = pair;
    pair.start();
    let r = pair.sync();
    assert_eq!(r.volumes[0].snapshot_method, "reflink");
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    let changed = scatter_writes(&pair.volume("v1"), 50, pair.chunk_size, 4);
    let r = pair.sync();
    assert_eq!(r.volumes[0].snapshot_method, "reflink");
    // The snapshot of gen 2 shares extents with the volume yet kept its own bytes.
    let snap = pair.dir.path().join("xfs/snaps").join(PROT).join("2/v1");
    assert_eq!(pair.replica_hashes(), vec![b3(&snap)]);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    // Chunks whose extents gen 1's snapshot shares were neither read nor sent; the
    // written ones were (their extents moved).
    let size = 32u64 << 20;
    assert_eq!(r.bytes_changed, changed.len() as u64 * pair.chunk_size);
    assert!(
        r.bytes_shared >= size - changed.len() as u64 * pair.chunk_size - (4 << 20),
        "only {} of {size} bytes recognised as shared ({r:?})",
        r.bytes_shared
    );
    assert!(r.bytes_shared <= size - changed.len() as u64 * pair.chunk_size);
    // An idle cycle reads nothing at all.
    let idle = pair.sync();
    assert_eq!(idle.bytes_shared, size, "{idle:?}");
    assert_eq!(idle.chunk_bytes_sent, 0);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn reflink_mode_on_a_file_system_without_reflink_fails_with_a_clear_error() {
    let pair = Pair::new(PairOptions {
        primary_protection: "snapshot = \"reflink\"",
        ..Default::default()
    });
    let err = pair.try_sync().unwrap_err();
    // The test directory is on ext4 or tmpfs here; neither shares extents.
    assert!(
        err.contains("reflink of") && err.contains("\"auto\""),
        "{err}"
    );
    assert_eq!(
        pair.primary.status().protections[0]
            .last_error
            .as_ref()
            .unwrap()
            .kind
            .as_str(),
        "snapshot"
    );
}

#[test]
fn a_block_device_volume_replicates_to_a_block_device_replica() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 16 << 20)],
        start: false,
        ..Default::default()
    });
    let d = pair.dir.path().to_path_buf();
    // The primary's volume becomes a loop device over its data; the replica another one.
    std::fs::rename(pair.volume("v1"), d.join("primary-backing.img")).unwrap();
    std::fs::File::create(d.join("replica-backing.img"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let src = LoopDev::new(&d.join("primary-backing.img"));
    let dst = LoopDev::new(&d.join("replica-backing.img"));
    std::os::unix::fs::symlink(&src.dev, pair.volume("v1")).unwrap();
    std::os::unix::fs::symlink(&dst.dev, pair.replica("v1")).unwrap();
    let mut pair = pair;
    pair.start();
    let r = pair.sync();
    assert_eq!(r.volumes[0].snapshot_method, "copy");
    assert_eq!(r.volumes[0].size, 16 << 20);
    assert_eq!(b3(Path::new(&dst.dev)), b3(Path::new(&src.dev)));
    scatter_writes(&pair.volume("v1"), 40, pair.chunk_size, 8);
    let r = pair.sync();
    assert!(r.chunks_sent > 0 && r.chunks_sent <= 40);
    assert_eq!(b3(Path::new(&dst.dev)), b3(Path::new(&src.dev)));
}
