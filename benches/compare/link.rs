//! The QUIC path alone: lifeboat's own endpoints, TLS and framing moving incompressible
//! 64 KiB chunk frames over loopback, with nothing read from or written to disk. This is
//! the "network" stage a full sync cannot beat.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use lifeboat::ids::ChunkHash;
use lifeboat::net::tls::TlsFiles;
use lifeboat::net::wire::{FrameReader, FrameWriter, Msg, Payload};
use lifeboat::net::{quic, tls};
use rand::RngCore;
use serde_bytes::ByteBuf;

fn files(certs: &Path, site: &str) -> TlsFiles {
    TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("{site}.pem")),
        key: certs.join(format!("{site}.key")),
    }
}

fn self_cpu() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// (wall, CPU) seconds to move `bytes` of chunk frames from a client endpoint to a server
/// endpoint, both in this process (so the CPU is both ends').
pub fn quic_path(certs: &Path, bytes: u64) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = quic::server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            tls::server_config(&files(certs, "dr")).unwrap(),
        )
        .unwrap();
        let addr: SocketAddr = server.local_addr().unwrap();
        let sink = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (_, recv) = conn.accept_bi().await.unwrap();
            let mut r = FrameReader::new(recv);
            let mut n = 0u64;
            while let Some(m) = r.next().await.unwrap() {
                if let Msg::Chunk {
                    payload: Payload::Data(d),
                    ..
                } = m
                {
                    n += d.len() as u64;
                }
            }
            n
        });
        let client =
            quic::client_endpoint(addr, tls::client_config(&files(certs, "primary")).unwrap())
                .unwrap();
        let conn = client.connect(addr, "dr").unwrap().await.unwrap();
        let (send, _recv) = conn.open_bi().await.unwrap();
        let mut w = FrameWriter::new(send);
        let mut chunk = vec![0u8; 64 << 10];
        rand::rng().fill_bytes(&mut chunk);
        let hash = ChunkHash::of(&chunk);
        let t = Instant::now();
        let cpu0 = self_cpu();
        let mut sent = 0u64;
        let mut index = 0;
        while sent < bytes {
            // Each frame is built from an owned buffer, as the sender does.
            let msg = Msg::Chunk {
                index,
                hash,
                payload: Payload::Data(ByteBuf::from(chunk.clone())),
            };
            w.send(&msg).await.unwrap();
            sent += chunk.len() as u64;
            index += 1;
        }
        w.finish();
        let got = sink.await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        let cpu = self_cpu() - cpu0;
        assert_eq!(got, sent);
        conn.close(0u32.into(), b"done");
        (secs, cpu)
    })
}
