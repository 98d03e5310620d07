//! The lies a hostile primary (a trusted certificate, a lying peer) can tell about one
//! volume, each its own test. `tests/hostile.rs` sends one of them end to end.
use serde_bytes::ByteBuf;

use super::intake::*;
use crate::engine::chunk::zero_hash;
use crate::engine::chunk::{Geometry, RootHasher};
use crate::engine::index::{Segment, SegmentBuilder};
use crate::engine::refine;
use crate::ids::{ChunkHash, VolumeName};
use crate::metrics::ErrorKind;
use crate::net::wire::Payload;
use crate::net::wire::Refusal;
use crate::replicate::error::ReceiveError;
use crate::replicate::messages::VolumeMsg;
use crate::store::VolumeRecord;

const CS: u32 = 65536;
const SIZE: u64 = 8 << 20; // 128 chunks

/// The replica and the base index: chunk i of the replica is all `i as u8`.
struct Dr {
    replica: Option<Vec<u8>>,
    base: Vec<ChunkHash>,
    /// A CSI replica: patches are checked by its writer.
    writer: bool,
}

impl ReplicaChunks for Dr {
    fn chunk(&self, offset: u64, len: u32) -> Option<std::io::Result<Vec<u8>>> {
        let r = self.replica.as_ref()?;
        Some(Ok(
            r[offset as usize..offset as usize + len as usize].to_vec()
        ))
    }
    fn patched_by_writer(&self) -> bool {
        self.writer
    }
}

fn dr() -> Dr {
    let replica: Vec<u8> = (0..SIZE).map(|o| (o / CS as u64) as u8).collect();
    let base = replica.chunks(CS as usize).map(ChunkHash::of).collect();
    Dr {
        replica: Some(replica),
        base,
        writer: false,
    }
}

fn segments(hashes: &[ChunkHash]) -> Vec<anyhow::Result<(u64, Segment)>> {
    let mut b = SegmentBuilder::default();
    let mut out: Vec<_> = hashes.iter().filter_map(|h| b.push(*h)).map(Ok).collect();
    out.extend(b.finish().map(Ok));
    out
}

/// Feeds `msgs` to a new intake; the result of the last message, or the first error.
fn feed(dr: &Dr, msgs: &[VolumeMsg]) -> Result<Option<VolumeRecord>, ReceiveError> {
    let mut intake = Intake::new(
        VolumeName::new("v1").unwrap(),
        Geometry::new(SIZE, CS),
        segments(&dr.base).into_iter(),
    );
    let mut segs = Vec::new();
    let mut put = |no, seg| {
        segs.push((no, seg));
        Ok(())
    };
    let mut done = None;
    for m in msgs {
        if let Step::Done(r) = intake.handle(m, dr, &mut put)? {
            done = Some(r);
        }
    }
    Ok(done)
}

fn chunk(index: u64, hash: ChunkHash, payload: Payload) -> VolumeMsg {
    VolumeMsg::Chunk {
        index,
        hash,
        payload,
    }
}

fn data(b: &[u8]) -> Payload {
    Payload::Data(ByteBuf::from(b.to_vec()))
}

/// The refusal told to the primary, and its label.
fn refusal(r: Result<Option<VolumeRecord>, ReceiveError>) -> (String, ErrorKind) {
    match r {
        Err(e @ ReceiveError::Refused { .. }) => {
            let Refusal::Invalid(m) = e.told() else {
                panic!("not an Invalid refusal: {e}")
            };
            (m, e.metric_label())
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn root_of(hashes: &[ChunkHash]) -> ChunkHash {
    let mut r = RootHasher::new(Geometry::new(SIZE, CS));
    hashes.iter().for_each(|h| r.push(h));
    r.finish()
}

#[test]
fn an_honest_volume_is_staged_and_its_root_checked() {
    let dr = dr();
    let new = vec![7u8; CS as usize];
    let mut hashes = dr.base.clone();
    hashes[5] = ChunkHash::of(&new);
    hashes[9] = zero_hash(CS);
    let msgs = [
        chunk(5, hashes[5], data(&new)),
        chunk(9, hashes[9], Payload::Zero),
        VolumeMsg::End {
            volume: "v1".into(),
            chunk_count: 128,
            root: root_of(&hashes),
        },
    ];
    let rec = feed(&dr, &msgs).unwrap().expect("done");
    assert_eq!(rec.root, root_of(&hashes));
    assert_eq!((rec.size, rec.chunk_size), (SIZE, CS));
}

#[test]
fn bytes_that_do_not_match_their_hash_are_refused() {
    let r = feed(
        &dr(),
        &[chunk(
            3,
            ChunkHash::of(b"something else"),
            data(&[7; CS as usize]),
        )],
    );
    let (m, kind) = refusal(r);
    assert!(m.contains("chunk 3 does not match its hash"), "{m}");
    assert_eq!(kind, ErrorKind::Verify);
}

#[test]
fn a_chunk_of_the_wrong_length_is_refused() {
    let short = vec![7u8; 100];
    let (m, _) = refusal(feed(
        &dr(),
        &[chunk(3, ChunkHash::of(&short), data(&short))],
    ));
    assert!(m.contains("chunk 3 does not match its hash"), "{m}");
}

#[test]
fn a_zero_marker_with_a_data_hash_is_refused() {
    let (m, kind) = refusal(feed(
        &dr(),
        &[chunk(0, ChunkHash::of(&[7; 10]), Payload::Zero)],
    ));
    assert!(m.contains("non-zero hash"), "{m}");
    assert_eq!(kind, ErrorKind::Verify);
}

#[test]
fn a_root_that_does_not_describe_the_volume_is_refused() {
    let bytes = vec![7u8; CS as usize];
    let (m, kind) = refusal(feed(
        &dr(),
        &[
            chunk(5, ChunkHash::of(&bytes), data(&bytes)),
            VolumeMsg::End {
                volume: "v1".into(),
                chunk_count: 128,
                root: ChunkHash([9; 32]),
            },
        ],
    ));
    assert!(m.contains("differs from the primary"), "{m}");
    assert_eq!(kind, ErrorKind::Verify);
}

#[test]
fn a_compressed_chunk_that_inflates_beyond_its_length_is_refused() {
    let bomb = zstd::bulk::compress(&vec![0u8; 8 << 20], 1).unwrap();
    let (m, _) = refusal(feed(
        &dr(),
        &[chunk(
            1,
            ChunkHash::of(&[7; 10]),
            Payload::Zstd(ByteBuf::from(bomb)),
        )],
    ));
    assert!(m.contains("compressed chunk 1"), "{m}");
}

#[test]
fn a_patch_that_does_not_complete_the_chunk_is_refused() {
    let (m, _) = refusal(feed(
        &dr(),
        &[chunk(
            2,
            ChunkHash::of(&[7u8; CS as usize]),
            Payload::Patch {
                mask: ByteBuf::from(vec![0b1, 0]),
                data: ByteBuf::from(vec![7u8; 4096]),
            },
        )],
    ));
    assert!(m.contains("chunk 2 does not match its hash"), "{m}");
}

#[test]
fn a_patch_whose_bitmap_does_not_fit_the_chunk_is_refused() {
    let (m, _) = refusal(feed(
        &dr(),
        &[chunk(
            2,
            ChunkHash([1; 32]),
            Payload::Patch {
                mask: ByteBuf::from(vec![0b1]),
                data: ByteBuf::from(vec![7u8; 4096]),
            },
        )],
    ));
    assert!(
        m.contains("patch 2") && m.contains("bitmap of 1 bytes"),
        "{m}"
    );
}

#[test]
fn a_patch_short_of_its_blocks_is_refused() {
    let (m, _) = refusal(feed(
        &dr(),
        &[chunk(
            2,
            ChunkHash([1; 32]),
            Payload::Patch {
                mask: ByteBuf::from(vec![0b11, 0]),
                data: ByteBuf::from(vec![7u8; 4096]),
            },
        )],
    ));
    assert!(
        m.contains("patch 2") && m.contains("its bitmap needs 8192"),
        "{m}"
    );
}

#[test]
fn a_patch_with_no_replica_to_complete_is_refused() {
    let mut dr = dr();
    dr.replica = None;
    let old = vec![2u8; CS as usize];
    let mut new = old.clone();
    new[0] = 1;
    let p = refine::diff(&new, &refine::block_hashes(&old)).unwrap();
    let (m, _) = refusal(feed(
        &dr,
        &[chunk(
            2,
            ChunkHash::of(&new),
            Payload::Patch {
                mask: ByteBuf::from(p.mask),
                data: ByteBuf::from(p.data),
            },
        )],
    ));
    assert!(m.contains("no replica to patch"), "{m}");
}

#[test]
fn a_patch_for_a_replica_its_writer_completes_is_staged_with_its_blocks_checked() {
    let mut dr = dr();
    let old = dr.replica.take().unwrap()[2 * CS as usize..3 * CS as usize].to_vec();
    dr.writer = true;
    let mut new = old.clone();
    new[4100] ^= 0xff;
    let p = refine::diff(&new, &refine::block_hashes(&old)).unwrap();
    let mut hashes = dr.base.clone();
    hashes[2] = ChunkHash::of(&new);
    let patch = |data: Vec<u8>| {
        chunk(
            2,
            hashes[2],
            Payload::Patch {
                mask: ByteBuf::from(p.mask.clone()),
                data: ByteBuf::from(data),
            },
        )
    };
    let end = VolumeMsg::End {
        volume: "v1".into(),
        chunk_count: 128,
        root: root_of(&hashes),
    };
    assert!(feed(&dr, &[patch(p.data.clone()), end]).unwrap().is_some());
    // Its blocks are still checked here: a patch short of its bitmap's blocks is refused.
    let (m, _) = refusal(feed(&dr, &[patch(p.data[..100].to_vec())]));
    assert!(m.contains("patch 2"), "{m}");
}

#[test]
fn a_true_patch_over_the_replica_is_staged() {
    let dr = dr();
    let old = dr.chunk(2 * CS as u64, CS).unwrap().unwrap();
    let mut new = old.clone();
    new[4100] ^= 0xff;
    let p = refine::diff(&new, &refine::block_hashes(&old)).unwrap();
    let mut hashes = dr.base.clone();
    hashes[2] = ChunkHash::of(&new);
    let msgs = [
        chunk(
            2,
            hashes[2],
            Payload::Patch {
                mask: ByteBuf::from(p.mask),
                data: ByteBuf::from(p.data),
            },
        ),
        VolumeMsg::End {
            volume: "v1".into(),
            chunk_count: 128,
            root: root_of(&hashes),
        },
    ];
    assert!(feed(&dr, &msgs).unwrap().is_some());
}

#[test]
fn chunks_out_of_order_or_beyond_the_volume_are_refused() {
    let bytes = vec![7u8; CS as usize];
    let h = ChunkHash::of(&bytes);
    let (m, kind) = refusal(feed(&dr(), &[chunk(500, h, data(&bytes))]));
    assert!(m.contains("out of order or beyond"), "{m}");
    assert_eq!(kind, ErrorKind::Protocol);
    let (m, _) = refusal(feed(
        &dr(),
        &[chunk(5, h, data(&bytes)), chunk(4, h, data(&bytes))],
    ));
    assert!(m.contains("chunk 4 is out of order"), "{m}");
    let (m, _) = refusal(feed(&dr(), &[chunk(128, h, data(&bytes))]));
    assert!(m.contains("chunk 128 is beyond its 128 chunks"), "{m}");
}

#[test]
fn a_chunk_neither_sent_nor_in_the_base_is_refused() {
    let mut dr = dr();
    dr.base.truncate(10);
    let (m, _) = refusal(feed(
        &dr,
        &[VolumeMsg::End {
            volume: "v1".into(),
            chunk_count: 128,
            root: ChunkHash([0; 32]),
        }],
    ));
    assert!(
        m.contains("chunk 10 was neither sent nor in the base index"),
        "{m}"
    );
}

#[test]
fn the_end_of_another_volume_is_refused() {
    let (m, _) = refusal(feed(
        &dr(),
        &[VolumeMsg::End {
            volume: "v2".into(),
            chunk_count: 128,
            root: ChunkHash([0; 32]),
        }],
    ));
    assert!(m.contains("End of volume \"v2\""), "{m}");
}

#[test]
fn a_zero_run_stands_for_its_chunks_in_the_root_and_may_not_overrun_the_volume() {
    let dr = dr();
    let mut hashes = dr.base.clone();
    for h in &mut hashes[10..100] {
        *h = zero_hash(CS);
    }
    let end = |hashes: &[ChunkHash]| VolumeMsg::End {
        volume: "v1".into(),
        chunk_count: 128,
        root: root_of(hashes),
    };
    let run = VolumeMsg::ZeroRun {
        first: 10,
        count: 90,
    };
    let rec = feed(&dr, &[run.clone(), end(&hashes)])
        .unwrap()
        .expect("done");
    assert_eq!(rec.root, root_of(&hashes));
    // A run that claims fewer chunks than were zeroed fails the root.
    let short = VolumeMsg::ZeroRun {
        first: 10,
        count: 89,
    };
    assert!(feed(&dr, &[short, end(&hashes)]).is_err());
    for (first, count) in [(100, 29), (0, 0), (5, u64::MAX)] {
        let (m, kind) = refusal(feed(&dr, &[VolumeMsg::ZeroRun { first, count }]));
        assert!(m.contains("zero run"), "{m}");
        assert_eq!(kind, ErrorKind::Protocol);
    }
    // Runs and chunks must come in order.
    let (m, _) = refusal(feed(&dr, &[chunk(50, hashes[50], Payload::Zero), run]));
    assert!(m.contains("out of order"), "{m}");
}
