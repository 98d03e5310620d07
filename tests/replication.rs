//! Two real daemons on loopback: initial sync, incremental cycles, zeros, and resync after
//! the DR site lost its state store. Replicas are compared by blake3.

mod support;

use support::*;

#[test]
fn initial_sync_makes_a_byte_identical_replica() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 64 << 20)],
        ..Default::default()
    });
    let r = pair.sync();
    assert_eq!(r.gen, 1);
    assert_eq!(r.bytes_scanned, 64 << 20);
    assert_eq!(
        r.bytes_changed,
        64 << 20,
        "no replica existed, so every chunk is new"
    );
    assert_eq!(pair.replica_hashes(), pair.snapshot_hashes(1));
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    let st = pair.dr.status();
    assert_eq!(st.protections[0].consistent_gen, Some(1));
}

#[test]
fn incremental_cycle_sends_only_the_changed_chunks_and_an_idle_cycle_sends_none() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 64 << 20)],
        primary_protection: "refine = \"off\"",
        ..Default::default()
    });
    pair.sync();
    // 1% of the volume's 4 KiB blocks, at random offsets.
    let writes = (64 << 20) / 4096 / 100;
    let changed = scatter_writes(&pair.volume("v1"), writes, pair.chunk_size, 11);
    let r = pair.sync();
    assert_eq!(r.gen, 2);
    assert_eq!(r.bytes_changed, changed.len() as u64 * pair.chunk_size);
    let budget = (changed.len() as f64 * pair.chunk_size as f64 * 1.05) as u64;
    assert!(
        r.chunk_bytes_sent <= budget,
        "sent {} bytes of chunk frames for {} changed chunks (budget {budget})",
        r.chunk_bytes_sent,
        changed.len()
    );
    assert!(r.chunk_bytes_sent >= changed.len() as u64 * pair.chunk_size);
    assert_eq!(pair.replica_hashes(), pair.snapshot_hashes(2));
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());

    let idle = pair.sync();
    assert_eq!(idle.gen, 3);
    assert_eq!(idle.chunks_sent, 0);
    assert_eq!(idle.chunk_bytes_sent, 0);
    assert_eq!(idle.bytes_changed, 0);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn refinement_sends_only_the_changed_4k_blocks_and_the_replica_stays_exact() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 64 << 20), ("v2", 8 << 20)],
        primary_protection: "refine = \"on\"",
        ..Default::default()
    });
    pair.sync();
    for (cycle, seed) in [(2u64, 21u64), (3, 22)] {
        // 1% of the 4 KiB blocks of v1, random bytes (incompressible), random offsets.
        let writes = (64 << 20) / 4096 / 100;
        let changed = scatter_writes(&pair.volume("v1"), writes, pair.chunk_size, seed);
        let r = pair.sync();
        assert_eq!(r.gen, cycle);
        assert!(r.refine);
        assert_eq!(r.refined_chunks, changed.len() as u64, "{r:?}");
        let written = writes * 4096;
        assert!(
            r.chunk_bytes_sent <= 2 * written,
            "sent {} bytes of chunk frames for {written} bytes written",
            r.chunk_bytes_sent
        );
        assert!(r.chunk_bytes_sent >= changed.len() as u64 * 4096);
        assert_eq!(pair.replica_hashes(), pair.snapshot_hashes(cycle));
        assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    }
}

#[test]
fn a_mostly_zero_volume_does_not_send_its_zeros() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("z", 0)],
        start: false,
        ..Default::default()
    });
    // 64 MiB: a sparse hole, 1 MiB of data, and 8 MiB of zeros actually written.
    let path = pair.volume("z");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&vec![0u8; 8 << 20], 16 << 20).unwrap();
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    f.write_all_at(&data, 40 << 20).unwrap();
    drop(f);
    let mut pair = pair;
    pair.start();
    let r = pair.sync();
    assert_eq!(
        r.chunks_sent, 1024,
        "every chunk of a new replica is sent, most as zero markers"
    );
    assert_eq!(r.zero_chunks_sent, 1024 - 16);
    assert!(
        r.chunk_bytes_sent < (1 << 20) + (128 << 10),
        "sent {} bytes for 1 MiB of data",
        r.chunk_bytes_sent
    );
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn lost_dr_state_store_resyncs_by_hash_exchange_and_sends_only_differing_chunks() {
    let mut pair = Pair::new(PairOptions {
        volumes: vec![("v1", 32 << 20)],
        ..Default::default()
    });
    pair.sync();
    pair.dr.stop();
    std::fs::remove_dir_all(pair.dr.state_dir.join("db")).unwrap();
    let changed = scatter_writes(&pair.volume("v1"), 80, pair.chunk_size, 5);
    pair.dr.start();
    let r = pair.sync();
    assert!(
        r.volumes[0].resync,
        "the DR site lost its index, so the cycle must resync"
    );
    assert!(
        r.hash_bytes_received >= (32 << 20) / pair.chunk_size * 32,
        "hashes were exchanged"
    );
    assert_eq!(r.bytes_changed, changed.len() as u64 * pair.chunk_size);
    let budget = (changed.len() as f64 * pair.chunk_size as f64 * 1.05) as u64;
    assert!(
        r.chunk_bytes_sent <= budget,
        "resync sent {} bytes for {} differing chunks",
        r.chunk_bytes_sent,
        changed.len()
    );
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    // And the next cycle is incremental again.
    let next = pair.sync();
    assert!(!next.volumes[0].resync);
    assert_eq!(next.chunk_bytes_sent, 0);
}

#[test]
fn first_sync_onto_an_existing_replica_sends_only_the_differences() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 16 << 20)],
        start: false,
        ..Default::default()
    });
    // The DR site already holds an older copy (restored from a backup, say).
    std::fs::copy(pair.volume("v1"), pair.replica("v1")).unwrap();
    let changed = scatter_writes(&pair.volume("v1"), 20, pair.chunk_size, 9);
    let mut pair = pair;
    pair.start();
    let r = pair.sync();
    assert!(r.volumes[0].resync);
    assert_eq!(r.chunks_sent, changed.len() as u64);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn lost_primary_state_store_resyncs_from_the_dr_index_without_a_full_copy() {
    let mut pair = Pair::new(PairOptions {
        volumes: vec![("v1", 16 << 20)],
        ..Default::default()
    });
    pair.sync();
    pair.primary.stop();
    std::fs::remove_dir_all(pair.primary.state_dir.join("db")).unwrap();
    let changed = scatter_writes(&pair.volume("v1"), 12, pair.chunk_size, 21);
    pair.primary.start();
    let r = pair.sync();
    assert!(r.volumes[0].resync);
    assert_eq!(r.chunks_sent, changed.len() as u64);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn no_key_material_reaches_the_logs() {
    let pair = Pair::new(PairOptions::default());
    pair.sync();
    let logs = pair.primary.log_text() + &pair.dr.log_text();
    assert!(
        logs.contains("consistent point advanced"),
        "the logs are not the daemon's"
    );
    for key in ["certs/primary.key", "certs/dr.key", "certs/ca.key"] {
        let pem = std::fs::read_to_string(pair.dir.path().join(key)).unwrap();
        assert!(!logs.contains("PRIVATE KEY"));
        for line in pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 16)
        {
            assert!(!logs.contains(line), "a line of {key} is in the logs");
        }
    }
}

fn text_volume(path: &std::path::Path, size: usize) {
    let mut text = Vec::with_capacity(size);
    let mut i = 0u64;
    while text.len() < size {
        i += 1;
        text.extend_from_slice(
            format!(
                "{i:010} INSERT INTO orders VALUES ({}, 'customer-{}');\n",
                i * 7,
                i % 977
            )
            .as_bytes(),
        );
    }
    text.truncate(size);
    std::fs::write(path, text).unwrap();
}

#[test]
fn compressible_chunks_travel_compressed_and_replicate_identically() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("t", 0)],
        start: false,
        ..Default::default()
    });
    text_volume(&pair.volume("t"), 16 << 20);
    let mut pair = pair;
    pair.start();
    let r = pair.sync();
    assert_eq!(r.bytes_changed, 16 << 20);
    assert_eq!(r.compressed_chunks, 256);
    assert!(
        r.chunk_bytes_sent < (16 << 20) / 3,
        "sent {} for 16 MiB of text",
        r.chunk_bytes_sent
    );
    assert!(r.compression_saved_bytes > 10 << 20);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    let m = pair.primary.metrics();
    assert_eq!(
        metric(
            &m,
            &format!("lifeboat_compression_saved_bytes_total{{protection=\"{PROT}\"}}")
        ),
        Some(r.compression_saved_bytes as f64)
    );
}

#[test]
fn compression_off_sends_raw_chunks() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("t", 0)],
        start: false,
        primary_protection: "compression = \"off\"",
        ..Default::default()
    });
    text_volume(&pair.volume("t"), 4 << 20);
    let mut pair = pair;
    pair.start();
    let r = pair.sync();
    assert_eq!(r.compressed_chunks, 0);
    assert!(r.chunk_bytes_sent >= 4 << 20);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}

#[test]
fn the_holes_of_a_sparse_volume_travel_as_runs_whose_cost_does_not_grow_with_its_size() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("s", 0)],
        start: false,
        ..Default::default()
    });
    // 4 GiB (65,536 chunks), 3 MiB of data in three places: a marker per zero chunk would
    // cost about 2.6 MB, more than the data.
    let path = pair.volume("s");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(4 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    for (i, at) in [0u64, 1 << 30, (4 << 30) - (1 << 20)]
        .into_iter()
        .enumerate()
    {
        let data: Vec<u8> = (0..1u32 << 20)
            .map(|j| ((j ^ i as u32).wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        f.write_all_at(&data, at).unwrap();
    }
    drop(f);
    let mut pair = pair;
    pair.start();
    let r = pair.sync();
    assert_eq!(r.zero_chunks_sent, 65536 - 48);
    assert!(
        r.chunk_bytes_sent < (3 << 20) + (16 << 10),
        "sent {} bytes for 3 MiB of data",
        r.chunk_bytes_sent
    );
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    // The runs stage as zeros over a replica that had data there, too.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&vec![0u8; 1 << 20], 1 << 30).unwrap();
    drop(f);
    let r = pair.sync();
    assert_eq!(r.zero_chunks_sent, 16);
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}
