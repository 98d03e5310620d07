//! A peer with a trusted certificate that lies: chunks and block patches whose bytes do not
//! match their hash, a wrong root, oversized and malformed frames. Nothing it sends reaches a replica, the
//! DR site says why, and the daemon keeps serving the real primary.

mod support;

use lifeboat::ids::{now_ms, ChunkHash, CycleId, Epoch, Point};
use lifeboat::net::tls::{client_config, TlsFiles};
use lifeboat::net::wire::{
    FrameReader, FrameWriter, Msg, Payload, Refusal, VolumeMeta, PROTOCOL_VERSION,
};
use lifeboat::net::{quic, wire};
use serde_bytes::ByteBuf;
use support::*;

struct Liar {
    conn: quinn::Connection,
    _ep: quinn::Endpoint,
}

impl Liar {
    async fn connect(pair: &Pair) -> Liar {
        let d = pair.dir.path();
        let files = TlsFiles {
            ca: d.join("certs/ca.pem"),
            cert: d.join("certs/primary.pem"),
            key: d.join("certs/primary.key"),
        };
        let addr = format!("127.0.0.1:{}", pair.quic_port).parse().unwrap();
        let ep = quic::client_endpoint(addr, client_config(&files).unwrap()).unwrap();
        let conn = ep.connect(addr, "dr").unwrap().await.unwrap();
        let (s, r) = conn.open_bi().await.unwrap();
        let (mut w, mut r) = (FrameWriter::new(s), FrameReader::new(r));
        w.send(&Msg::Hello {
            version: PROTOCOL_VERSION,
            site: "liar".into(),
        })
        .await
        .unwrap();
        assert!(matches!(
            r.expect("HelloAck").await.unwrap(),
            Msg::HelloAck { .. }
        ));
        Liar { conn, _ep: ep }
    }

    /// Opens a cycle stream up to `Begin` of volume v1; returns the stream.
    async fn begin(&self, size: u64) -> (FrameWriter, FrameReader) {
        let (s, r) = self.conn.open_bi().await.unwrap();
        let (mut w, mut r) = (FrameWriter::new(s), FrameReader::new(r));
        w.send(&Msg::Prepare {
            protection: PROT.into(),
            epoch: Epoch(1),
        })
        .await
        .unwrap();
        let Msg::Prepared { point, .. } = r.expect("Prepared").await.unwrap() else {
            panic!("not prepared")
        };
        let base = point.expect("the pair synced once");
        let next = Point {
            gen: base.gen.next(),
            cycle: CycleId(42),
            taken_at_ms: now_ms(),
        };
        w.send(&Msg::Cycle {
            point: next,
            base: Some(base),
            volumes: vec![VolumeMeta {
                name: "v1".into(),
                size,
                chunk_size: 65536,
            }],
        })
        .await
        .unwrap();
        w.send(&Msg::Begin {
            volume: "v1".into(),
            size,
            chunk_size: 65536,
        })
        .await
        .unwrap();
        (w, r)
    }
}

async fn refusal(r: &mut FrameReader) -> String {
    match r.expect("Refused").await {
        Ok(Msg::Refused(Refusal::Invalid(m))) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_a_lying_peer_sends_reaches_a_replica() {
    tokio::time::timeout(std::time::Duration::from_secs(120), lies())
        .await
        .expect("the DR site must answer every lie promptly");
}

async fn lies() {
    let pair = Pair::new(PairOptions {
        volumes: vec![("v1", 8 << 20)],
        ..Default::default()
    });
    pair.sync();
    let gen1 = pair.replica_hashes();
    let liar = Liar::connect(&pair).await;

    // 1. Bytes that do not match their hash.
    let (mut w, mut r) = liar.begin(8 << 20).await;
    let bytes = vec![7u8; 65536];
    w.send(&Msg::Chunk {
        index: 3,
        hash: ChunkHash::of(b"something else"),
        payload: Payload::Data(ByteBuf::from(bytes.clone())),
    })
    .await
    .unwrap();
    let m = refusal(&mut r).await;
    assert!(m.contains("chunk 3 does not match its hash"), "{m}");

    // 2. A zero marker with a data hash.
    let (mut w, mut r) = liar.begin(8 << 20).await;
    w.send(&Msg::Chunk {
        index: 0,
        hash: ChunkHash::of(&bytes),
        payload: Payload::Zero,
    })
    .await
    .unwrap();
    assert!(refusal(&mut r).await.contains("non-zero hash"));

    // 3. Valid chunks, but a root that does not describe the volume.
    let (mut w, mut r) = liar.begin(8 << 20).await;
    w.send(&Msg::Chunk {
        index: 5,
        hash: ChunkHash::of(&bytes),
        payload: Payload::Data(ByteBuf::from(bytes.clone())),
    })
    .await
    .unwrap();
    w.send(&Msg::End {
        volume: "v1".into(),
        chunk_count: 128,
        root: ChunkHash([9; 32]),
    })
    .await
    .unwrap();
    assert!(refusal(&mut r).await.contains("differs from the primary"));

    // 3b. A compressed chunk that inflates beyond the chunk's length (a zstd bomb).
    let (mut w, mut r) = liar.begin(8 << 20).await;
    let bomb = zstd::bulk::compress(&vec![0u8; 8 << 20], 1).unwrap();
    w.send(&Msg::Chunk {
        index: 1,
        hash: ChunkHash::of(&bytes),
        payload: Payload::Zstd(ByteBuf::from(bomb)),
    })
    .await
    .unwrap();
    assert!(refusal(&mut r).await.contains("compressed chunk 1"));

    // 3c. A block patch whose blocks, laid over the replica's chunk, do not give its hash.
    let (mut w, mut r) = liar.begin(8 << 20).await;
    w.send(&Msg::Chunk {
        index: 2,
        hash: ChunkHash::of(&bytes),
        payload: Payload::Patch {
            mask: ByteBuf::from(vec![0b1, 0]),
            data: ByteBuf::from(vec![7u8; 4096]),
        },
    })
    .await
    .unwrap();
    assert!(refusal(&mut r)
        .await
        .contains("chunk 2 does not match its hash"));

    // 3d. A patch whose bitmap does not fit the chunk, and one short of its blocks.
    for (mask, data, says) in [
        (vec![0b1], vec![7u8; 4096], "bitmap of 1 bytes"),
        (vec![0b11, 0], vec![7u8; 4096], "its bitmap needs 8192"),
    ] {
        let (mut w, mut r) = liar.begin(8 << 20).await;
        w.send(&Msg::Chunk {
            index: 2,
            hash: ChunkHash::of(&bytes),
            payload: Payload::Patch {
                mask: ByteBuf::from(mask),
                data: ByteBuf::from(data),
            },
        })
        .await
        .unwrap();
        let m = refusal(&mut r).await;
        assert!(m.contains("patch 2") && m.contains(says), "{m}");
    }

    // 3e. A refinement stream for a volume this site does not have is refused by name.
    let (s, rcv) = liar.conn.open_bi().await.unwrap();
    let (mut w, mut r) = (FrameWriter::new(s), FrameReader::new(rcv));
    w.send(&Msg::RefineOpen {
        protection: PROT.into(),
        volume: "nope".into(),
        size: 8 << 20,
        chunk_size: 65536,
    })
    .await
    .unwrap();
    match r.expect("Refused").await {
        Ok(Msg::Refused(Refusal::UnknownVolume(v, have))) => {
            assert_eq!((v.as_str(), have.as_str()), ("nope", "v1"))
        }
        other => panic!("expected UnknownVolume, got {other:?}"),
    }

    // 4. Chunks out of order or beyond the volume.
    let (mut w, mut r) = liar.begin(8 << 20).await;
    w.send(&Msg::Chunk {
        index: 500,
        hash: ChunkHash::of(&bytes),
        payload: Payload::Data(ByteBuf::from(bytes.clone())),
    })
    .await
    .unwrap();
    assert!(refusal(&mut r).await.contains("out of order or beyond"));

    // 5. An oversized frame header, and a malformed body.
    for junk in [
        vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
        vec![0, 0, 0, 3, 0xfe, 0xfe, 0xfe],
    ] {
        let (mut s, mut rcv) = liar.conn.open_bi().await.unwrap();
        s.write_all(&junk).await.unwrap();
        let _ = s.finish();
        let mut buf = Vec::new();
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let mut b = [0u8; 256];
            while let Ok(Some(n)) = rcv.read(&mut b).await {
                buf.extend_from_slice(&b[..n]);
            }
        })
        .await;
        assert!(
            got.is_ok(),
            "the DR site neither answered nor closed the stream"
        );
        assert!(
            buf.is_empty()
                || wire::decode_body(&buf[4..])
                    .map(|m| m.kind() == "Refused")
                    .unwrap_or(false),
            "junk got a real answer: {buf:?}"
        );
    }

    drop(liar);
    assert_eq!(pair.replica_hashes(), gen1, "a lie reached the replica");
    assert_eq!(pair.dr.status().protections[0].consistent_gen, Some(1));
    let m = pair.dr.metrics();
    assert!(
        metric(
            &m,
            &format!("lifeboat_errors_total{{kind=\"verify\",protection=\"{PROT}\"}}")
        )
        .unwrap()
            >= 3.0,
        "{m}"
    );
    // The real primary carries on.
    scatter_writes(&pair.volume("v1"), 10, pair.chunk_size, 1);
    pair.sync();
    assert_eq!(pair.replica_hashes(), pair.volume_hashes());
}
