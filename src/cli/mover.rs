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
    #[arg(long)]
    pub cycle: String,
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
    /// Scratch space for the DR site's hashes of the replica (32 bytes per chunk).
    #[arg(long, default_value = "/tmp")]
    pub scratch: PathBuf,
    /// Where the outcome goes (the container's terminationMessagePath).
    #[arg(long, default_value = "/dev/termination-log")]
    pub result: PathBuf,
}

pub fn run(a: MoverArgs) -> Result<ExitCode> {
    let result_file = a.result.clone();
    let outcome = (|| -> Result<mover::Outcome> {
        let peer = a
            .peer
            .to_socket_addrs()
            .with_context(|| format!("--peer {:?}: expected HOST:PORT", a.peer))?
            .next()
            .with_context(|| format!("--peer {:?} resolves to no address", a.peer))?;
        let cycle = u64::from_str_radix(&a.cycle, 16)
            .map(CycleId)
            .with_context(|| format!("--cycle {:?}: expected 16 hex digits", a.cycle))?;
        let job = Job {
            device: a.device,
            peer,
            server_name: a.server_name,
            site: a.site,
            tls: TlsFiles {
                ca: a.tls_dir.join("ca.pem"),
                cert: a.tls_dir.join("site.pem"),
                key: a.tls_dir.join("site.key"),
            },
            protection: a.protection,
            cycle,
            volume: a.volume,
            chunk_size: a.chunk_size,
            compress: a.compress,
            scratch: a.scratch,
            size: a.size,
            refine: a.refine,
        };
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(mover::send(&job))
    })();
    match outcome {
        Ok(o) => {
            let json = serde_json::to_string(&o)?;
            std::fs::write(&result_file, &json)
                .with_context(|| format!("write the outcome to {}", result_file.display()))?;
            println!("{json}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let why = format!("{e:#}");
            // The termination message holds at most 4 KiB.
            let _ = std::fs::write(&result_file, why.chars().take(3500).collect::<String>());
            eprintln!("mover failed: {why}");
            Ok(ExitCode::FAILURE)
        }
    }
}
