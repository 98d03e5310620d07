//! Cut links and full disks: the DR replicas stay at the previous consistent point, the
//! error says what happened, and the next cycle completes once the fault is gone.

mod support;

use std::os::unix::fs::FileExt;

use support::relay::Tmpfs;
use support::*;

#[test]
fn a_link_cut_mid_transfer_leaves_the_replicas_at_the_previous_gen() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 8 << 20), ("v2", 8 << 20), ("v3", 8 << 20)],
        relay: true,
        // Whole chunks, so the cut at 5 MiB falls inside the second volume.
        primary_protection: "refine = \"off\"",
        ..Default::default()
    });
    pair.sync();
    let gen1 = pair.replica_hashes();
    pair.change_all(60, 70);
    let relay = pair.relay.as_ref().unwrap();
    // About 3.7 MiB change per volume: the cut falls inside the second volume.
    relay.cut_after(5 << 20);
    let err = pair.try_sync().unwrap_err();
    assert!(
        relay.is_cut(),
        "the link was never cut; the test proves nothing"
    );
    assert!(!err.is_empty());
    assert_eq!(pair.replica_hashes(), gen1, "a cut link left a torn group");
    assert_eq!(pair.dr.status().protections[0].consistent_gen, Some(1));
    let st = pair.primary.status();
    assert_eq!(
        st.protections[0].last_error.as_ref().unwrap().kind.as_str(),
        "peer"
    );

    relay.restore();
    let r = pair.sync();
    assert_eq!(r.gen, 2);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn a_full_staging_disk_fails_the_cycle_cleanly_and_the_next_one_completes() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 16 << 20)],
        start: false,
        dr_site: "staging_dir = \"stagefs\"\nmin_free_space = \"0\"",
        // Whole chunks, so the changes need more staging than the shrunk file system has.
        primary_protection: "refine = \"off\"",
        ..Default::default()
    });
    let fs = Tmpfs::mount(&pair.dir.path().join("stagefs"), "64m");
    let mut pair = pair;
    pair.start();
    pair.sync();
    let gen1 = pair.replica_hashes();
    // 300 scattered writes change about 17 MiB of chunks: more than 2 MiB of staging.
    pair.change_all(300, 80);
    fs.resize("2m");
    let err = pair.try_sync().unwrap_err();
    assert!(
        err.contains("No space left on device"),
        "{err}\n--- primary log ---\n{}\n--- dr log ---\n{}",
        pair.primary.log_text(),
        pair.dr.log_text()
    );
    assert_eq!(pair.replica_hashes(), gen1);
    assert_eq!(pair.dr.status().protections[0].consistent_gen, Some(1));
    let left: Vec<_> = walk(&fs.path);
    assert!(left.is_empty(), "staging was not discarded: {left:?}");

    fs.resize("64m");
    let r = pair.sync();
    assert_eq!(r.gen, 2);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn the_reserve_stops_staging_before_the_disk_is_full() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 32 << 20)],
        start: false,
        dr_site: "staging_dir = \"stagefs\"\nmin_free_space = \"24MiB\"",
        ..Default::default()
    });
    let _fs = Tmpfs::mount(&pair.dir.path().join("stagefs"), "40m");
    // An existing (empty) replica: the sync stages a log instead of building a new replica.
    std::fs::File::create(pair.replica("v1")).unwrap();
    let mut pair = pair;
    pair.start();
    let err = pair.try_sync().unwrap_err();
    assert!(err.contains("min_free_space"), "{err}");
    assert_eq!(pair.dr.status().protections[0].consistent_gen, None);
}

#[test]
fn a_full_replica_disk_fails_before_the_group_commit() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 8 << 20)],
        start: false,
        ..Default::default()
    });
    let fs = Tmpfs::mount(pair.replica("v1").parent().unwrap(), "24m");
    let mut pair = pair;
    pair.start();
    pair.sync();
    let gen1 = pair.replica_hashes();
    // Fill the replica file system, then grow the volume by 8 MiB of new data.
    let filler = fs.path.join("filler");
    let free = 24u64 << 20;
    let f = std::fs::File::create(&filler).unwrap();
    let mut off = 0;
    let block = vec![1u8; 1 << 20];
    while off < free && f.write_all_at(&block, off).is_ok() {
        off += 1 << 20;
    }
    drop(f);
    let v = std::fs::OpenOptions::new()
        .write(true)
        .open(pair.volume("v1"))
        .unwrap();
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    v.write_all_at(&data, 8 << 20).unwrap();
    drop(v);
    let err = pair.try_sync().unwrap_err();
    assert!(
        err.contains("No space left on device") && err.contains("replica"),
        "{err}"
    );
    assert_eq!(
        pair.replica_hashes(),
        gen1,
        "the replica changed although its gen never committed"
    );
    assert_eq!(
        std::fs::metadata(pair.replica("v1")).unwrap().len(),
        8 << 20
    );

    std::fs::remove_file(&filler).unwrap();
    pair.sync();
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}
