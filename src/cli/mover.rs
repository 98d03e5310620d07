//! `lifeboat mover`: the arguments a mover Job runs with, and its exit: the outcome as
//! JSON into the termination message file (where the daemon reads it from the Pod's
//! status) and on stdout; a failure's reason there too, so `status` can show it.

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use crate::ids::CycleId;
use crate::mover::{self, Job};
use crate::net::tls::TlsFiles;

#[derive(Args, Debug)]
pub struct MoverArgs {
    /// The snapshot's restored PVC, attached as a raw block device (volumeDevices).
    #[arg(long)]
    pub device: PathBuf,
    /// Bytes to move (the snapshot's restore size); default the whole device.
    #[arg(long)]
    pub size: Option<u64>,
    /// The DR site's peer address, HOST:PORT.
    #[arg(long)]
    pub peer: String,
    /// The DR site's name in its certificate.
    #[arg(long)]
    pub server_name: String,
    /// This (primary) site's name.
    #[arg(long)]
    pub site: String,
    /// Directory with ca.pem, site.pem and site.key (the primary's pair TLS Secret).
    #[arg(long)]
    pub tls_dir: PathBuf,
    #[arg(long)]
    pub protection: String,
    /// The running cycle to join (16 hex digits).
    #[arg(long, required_unless_present_any = ["write", "verify"])]
    pub cycle: Option<String>,
    /// DR site: write the committed gen `--gen`'s staging log of `--volume`, fetched from
    /// this site's daemon at `--peer`, to the replica `--device` (a writer Job).
    #[arg(long, requires = "gen")]
    pub write: bool,
    /// DR site: hash the replica `--device` (read-only) as a volume of `--size` bytes and
    /// `--chunk-size` chunks, and send the hashes to this site's daemon for its verify of
    /// the consistent gen `--gen` (a reader Job).
    #[arg(long, requires_all = ["gen", "size"], conflicts_with = "write")]
    pub verify: bool,
    /// The committed gen a writer applies.
    #[arg(long)]
    pub gen: Option<u64>,
    /// The lifeboat volume (namespace.pvc at the DR site's namespace).
    #[arg(long)]
    pub volume: String,
    #[arg(long, default_value_t = 65536)]
    pub chunk_size: u32,
    #[arg(long)]
    pub compress: bool,
    /// Send changed chunks the replica has as their changed 4 KiB blocks.
    #[arg(long)]
    pub refine: bool,
    /// With --refine: the base gen's snapshot, restored and attached read-only; the old
    /// chunks are read from it instead of asking the DR site for their block hashes.
    #[arg(long, requires = "refine")]
    pub base_device: Option<PathBuf>,
    /// Fail when nothing moves for this long (no hashes received, nothing scanned), e.g.
    /// `5m`: a hung device or a DR site that stopped answering.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub stall_after: Option<std::time::Duration>,
    /// Changed block tracking: the driver's SnapshotMetadata service, HOST:PORT. With it,
    /// only the ranges it reports are read (a sample of the others is checked).
    #[arg(long, requires_all = ["cbt_ca", "cbt_token", "cbt_namespace", "cbt_snapshot"])]
    pub cbt_address: Option<String>,
    /// The service's CA bundle, base64 of PEM (its SnapshotMetadataService's caCert).
    #[arg(long)]
    pub cbt_ca: Option<String>,
    /// The audience-scoped ServiceAccount token file (a projected volume).
    #[arg(long)]
    pub cbt_token: Option<PathBuf>,
    /// The namespace and name of this snapshot's VolumeSnapshot.
    #[arg(long)]
    pub cbt_namespace: Option<String>,
    #[arg(long)]
    pub cbt_snapshot: Option<String>,
    /// The base gen's snapshot handle: ask for the delta against it (else the allocated
    /// ranges).
    #[arg(long)]
    pub cbt_base_id: Option<String>,
    /// The share of the chunks the answer leaves out that are read anyway, to catch a
    /// tracker that misses changes.
    #[arg(long, default_value_t = 0.01)]
    pub cbt_sample: f64,
    /// Scratch space for the DR site's hashes of the replica (32 bytes per chunk).
    #[arg(long, default_value = "/tmp")]
    pub scratch: PathBuf,
    /// Where the outcome goes (the container's terminationMessagePath).
    #[arg(long, default_value = "/dev/termination-log")]
    pub result: PathBuf,
}

fn tls_files(dir: &std::path::Path) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("site.pem"),
        key: dir.join("site.key"),
    }
}

pub fn run(a: MoverArgs) -> Result<ExitCode> {
    let result_file = a.result.clone();
    let write = a.write;
    let verify = a.verify;
    let outcome = (|| -> Result<String> {
        let peer = a
            .peer
            .to_socket_addrs()
            .with_context(|| format!("--peer {:?}: expected HOST:PORT", a.peer))?
            .next()
            .with_context(|| format!("--peer {:?} resolves to no address", a.peer))?;
        let rt = tokio::runtime::Runtime::new()?;
        let link = mover::DrLink {
            peer,
            server_name: a.server_name,
            site: a.site,
            tls: tls_files(&a.tls_dir),
        };
        if verify {
            let job = mover::read::ReadJob {
                device: a.device,
                link,
                protection: a.protection,
                gen: crate::ids::Gen(a.gen.context("--verify needs --gen")?),
                volume: a.volume,
                size: a.size.context("--verify needs --size")?,
                chunk_size: a.chunk_size,
            };
            let r = rt.block_on(mover::read::read(&job))?;
            return Ok(serde_json::to_string(&r)?);
        }
        if write {
            let job = mover::write::WriteJob {
                device: a.device,
                link,
                protection: a.protection,
                gen: crate::ids::Gen(a.gen.context("--write needs --gen")?),
                volume: a.volume,
            };
            let w = rt.block_on(mover::write::write(&job))?;
            return Ok(serde_json::to_string(&w)?);
        }
        let c = a.cycle.as_deref().unwrap_or_default();
        let cycle = u64::from_str_radix(c, 16)
            .map(CycleId)
            .with_context(|| format!("--cycle {c:?}: expected 16 hex digits"))?;
        let cbt = match a.cbt_address {
            Some(address) => Some(mover::cbt::CbtJob {
                address,
                ca_pem: mover::cbt::decode_ca(a.cbt_ca.as_deref().unwrap_or_default())?,
                token_file: a.cbt_token.unwrap_or_default(),
                namespace: a.cbt_namespace.unwrap_or_default(),
                snapshot: a.cbt_snapshot.unwrap_or_default(),
                base_id: a.cbt_base_id,
                sample: a.cbt_sample,
            }),
            None => None,
        };
        let job = Job {
            device: a.device,
            link,
            protection: a.protection,
            cycle,
            volume: a.volume,
            chunk_size: a.chunk_size,
            compress: a.compress,
            scratch: a.scratch,
            size: a.size,
            refine: a.refine,
            base_device: a.base_device,
            stall_after: a.stall_after,
            cbt,
        };
        let moved = rt.block_on(mover::send(&job));
        // A read stuck in the kernel keeps its blocking thread: do not wait for it.
        rt.shutdown_background();
        Ok(serde_json::to_string(&moved?)?)
    })();
    match outcome {
        Ok(json) => {
            std::fs::write(&result_file, &json)
                .with_context(|| format!("write the outcome to {}", result_file.display()))?;
            println!("{json}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let why = format!("{e:#}");
            // The termination message holds at most 4 KiB.
            let _ = std::fs::write(&result_file, why.chars().take(3500).collect::<String>());
            let what = match (write, verify) {
                (true, _) => "writer",
                (_, true) => "reader",
                _ => "mover",
            };
            eprintln!("{what} failed: {why}");
            Ok(ExitCode::FAILURE)
        }
    }
}
