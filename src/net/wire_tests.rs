//! The wire codec's properties: every message round-trips, garbage never panics, the
//! limits hold.

use super::wire::*;
use crate::engine::chunk::MAX_CHUNK_SIZE;
use crate::ids::CycleId;
use crate::ids::{ChunkHash, Epoch, Gen, Point};
use proptest::prelude::*;
use serde_bytes::ByteBuf;

fn arb_msg() -> impl Strategy<Value = Msg> {
    let hash = any::<[u8; 32]>().prop_map(ChunkHash);
    let point = (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(g, c, t)| Point {
        gen: Gen(g),
        cycle: CycleId(c),
        taken_at_ms: t,
    });
    prop_oneof![
        (any::<u32>(), ".{0,20}").prop_map(|(version, site)| Msg::Hello {
            version,
            site,
            role: SiteRole::Primary
        }),
        (".{0,20}", any::<u64>()).prop_map(|(protection, e)| Msg::Prepare {
            protection,
            epoch: Epoch(e)
        }),
        (
            any::<u64>(),
            proptest::option::of(point.clone()),
            proptest::collection::vec(".{0,8}", 0..3)
        )
            .prop_map(|(e, point, repair)| Msg::Prepared {
                epoch: Epoch(e),
                point,
                repair,
            }),
        (
            point.clone(),
            proptest::option::of(point.clone()),
            ".{0,10}",
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(|(point, base, name, size, chunk_size)| Msg::Cycle {
                point,
                base,
                volumes: vec![VolumeMeta {
                    name,
                    size,
                    chunk_size
                }],
            }),
        (
            any::<u64>(),
            hash.clone(),
            proptest::collection::vec(any::<u8>(), 0..3000)
        )
            .prop_map(|(index, hash, d)| Msg::Chunk {
                index,
                hash,
                payload: Payload::Data(ByteBuf::from(d)),
            }),
        (any::<u64>(), hash.clone()).prop_map(|(index, hash)| Msg::Chunk {
            index,
            hash,
            payload: Payload::Zero
        }),
        (
            any::<u64>(),
            hash.clone(),
            proptest::collection::vec(any::<u8>(), 0..3),
            proptest::collection::vec(any::<u8>(), 0..3000)
        )
            .prop_map(|(index, hash, m, d)| Msg::Chunk {
                index,
                hash,
                payload: Payload::Patch {
                    mask: ByteBuf::from(m),
                    data: ByteBuf::from(d)
                },
            }),
        (".{0,10}", ".{0,10}", any::<u64>(), any::<u32>()).prop_map(
            |(protection, volume, size, chunk_size)| Msg::RefineOpen {
                protection,
                volume,
                size,
                chunk_size
            }
        ),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..600)).prop_map(|(index, p)| {
            Msg::BlockHashes {
                index,
                packed: ByteBuf::from(p),
            }
        }),
        (".{0,10}", any::<u64>(), hash).prop_map(|(volume, chunk_count, root)| Msg::End {
            volume,
            chunk_count,
            root
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(o, t)| Msg::Refused(Refusal::StaleEpoch {
            ours: Epoch(o),
            theirs: Epoch(t)
        })),
    ]
}

proptest! {
    #[test]
    fn frames_round_trip(msg in arb_msg()) {
        let mut buf = Vec::new();
        encode_frame(&msg, &mut buf).unwrap();
        let len = frame_len(buf[..4].try_into().unwrap()).unwrap();
        prop_assert_eq!(len, buf.len() - 4);
        prop_assert_eq!(decode_body(&buf[4..]).unwrap(), msg);
    }

    #[test]
    fn garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_body(&body);
    }
}

#[test]
fn oversized_length_is_refused_before_reading() {
    assert!(matches!(
        frame_len(u32::MAX.to_be_bytes()),
        Err(WireError::TooLarge(_))
    ));
}

#[test]
fn truncated_and_padded_bodies_are_malformed() {
    let mut buf = Vec::new();
    encode_frame(&Msg::Commit { gen: Gen(3) }, &mut buf).unwrap();
    assert!(decode_body(&buf[4..buf.len() - 1]).is_err());
    let mut padded = buf[4..].to_vec();
    padded.push(0);
    assert!(matches!(decode_body(&padded), Err(WireError::Trailing(1))));
}

#[test]
fn a_full_chunk_at_the_largest_size_fits_a_frame() {
    let msg = Msg::Chunk {
        index: u64::MAX,
        hash: ChunkHash([9; 32]),
        payload: Payload::Data(ByteBuf::from(vec![1u8; MAX_CHUNK_SIZE as usize])),
    };
    let mut buf = Vec::new();
    encode_frame(&msg, &mut buf).unwrap();
    assert!(buf.len() - 4 <= MAX_FRAME);
}
