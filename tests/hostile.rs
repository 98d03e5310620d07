//! A peer with a trusted certificate that lies, end to end: one lie per kind of stream (a
//! cycle stream, a refinement stream, frames that are not frames). Nothing it sends reaches
//! a replica, the DR site says why, and the daemon keeps serving the real primary. Every
//! other lie about a volume or a cycle is a unit test of the receiver's machines
//! (`replicate::receive::intake` and `replicate::receive::machine_tests`).

mod support;

use lifeboat::ids::{now_ms, ChunkHash, CycleId, Epoch, Point};
use lifeboat::net::tls::{client_config, TlsFiles};
use lifeboat::net::wire::{
    FrameReader, FrameWriter, Msg, Payload, Refusal, SiteRole, VolumeMeta, PROTOCOL_VERSION,
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
            role: SiteRole::Primary,
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

/// A pair synced once, and a liar connected to its DR site.
async fn setup() -> (Pair, Vec<String>, Liar) {
    let pair = tokio::task::spawn_blocking(|| {
        let pair = Pair::new(PairOptions {
            volumes: vec![("v1", 8 << 20)],
            ..Default::default()
        });
        pair.sync();
        pair
    })
    .await
    .unwrap();
    let gen1 = pair.replica_hashes();
    let liar = Liar::connect(&pair).await;
    (pair, gen1, liar)
}

/// Nothing reached the replica, the consistent point did not move, and the real primary
/// carries on.
async fn unharmed(pair: Pair, gen1: Vec<String>) {
    tokio::task::spawn_blocking(move || {
        assert_eq!(pair.replica_hashes(), gen1, "a lie reached the replica");
        assert_eq!(pair.dr.status().protections[0].consistent_gen, Some(1));
        scatter_writes(&pair.volume("v1"), 10, pair.chunk_size, 1);
        pair.sync();
        assert_eq!(pair.replica_hashes(), pair.volume_hashes());
    })
    .await
    .unwrap();
}

const PROMPTLY: std::time::Duration = std::time::Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_that_does_not_match_its_hash_never_reaches_the_replica() {
    let (pair, gen1, liar) = setup().await;
    let (mut w, mut r) = liar.begin(8 << 20).await;
    w.send(&Msg::Chunk {
        index: 3,
        hash: ChunkHash::of(b"something else"),
        payload: Payload::Data(ByteBuf::from(vec![7u8; 65536])),
    })
    .await
    .unwrap();
    let m = tokio::time::timeout(PROMPTLY, refusal(&mut r))
        .await
        .expect("the DR site answers");
    assert!(m.contains("chunk 3 does not match its hash"), "{m}");
    drop(liar);
    let metrics = pair.dr.metrics();
    assert_eq!(
        metric(
            &metrics,
            &format!("lifeboat_errors_total{{kind=\"verify\",protection=\"{PROT}\"}}")
        ),
        Some(1.0),
        "{metrics}"
    );
    unharmed(pair, gen1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refinement_stream_for_an_unknown_volume_is_refused_by_name() {
    let (pair, gen1, liar) = setup().await;
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
    match tokio::time::timeout(PROMPTLY, r.expect("Refused"))
        .await
        .expect("the DR site answers")
    {
        Ok(Msg::Refused(Refusal::UnknownVolume(v, have))) => {
            assert_eq!((v.as_str(), have.as_str()), ("nope", "v1"))
        }
        other => panic!("expected UnknownVolume, got {other:?}"),
    }
    drop(liar);
    unharmed(pair, gen1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_or_malformed_frame_gets_no_real_answer() {
    let (pair, gen1, liar) = setup().await;
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
    unharmed(pair, gen1).await;
}
