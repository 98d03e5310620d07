//! `lifeboat mover --write`: the DR site's writer. The DR daemon runs it as a Job that
//! attaches one replica PVC (a raw block device) once the gen is committed: it fetches
//! the volume's staging log from its own daemon (the DR site's certificate, so no other
//! party can ask) and applies it, verifying each record as the host-path redo does, then
//! fsyncs the device. Applying a log again gives the same replica, so a writer killed
//! mid-way is simply run again; the daemon snapshots the replicas into the recovery point
//! only once every writer of the gen succeeded.

use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;

use anyhow::{anyhow, bail, Result};

use crate::ids::Gen;
pub use crate::k8s::writer_job::Written;
use crate::net::wire::{FrameReader, FrameWriter, Msg, SiteRole};
use crate::volume::replica;
use crate::volume::staging::StagingReader;

/// What the DR daemon tells a writer (its Job's arguments).
#[derive(Debug, Clone)]
pub struct WriteJob {
    pub device: PathBuf,
    /// The DR daemon as the writer reaches it; the site is this (DR) site.
    pub link: super::DrLink,
    pub protection: String,
    pub gen: Gen,
    pub volume: String,
}

/// The staging log as a blocking reader over the frames the network side forwards.
struct Incoming {
    rx: std_mpsc::Receiver<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    at: usize,
}

impl Read for Incoming {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(b)) => (self.buf, self.at) = (b, 0),
                Ok(Err(e)) => return Err(e),
                // The network side ended after LogEnd: the log is whole.
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Fetches the staging log and applies it to the device.
pub async fn write(job: &WriteJob) -> Result<Written> {
    let conn = super::connect_as(&job.link, SiteRole::Dr).await?;
    let (send, recv) = conn.open_bi().await?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
    w.send(&Msg::Fetch {
        protection: job.protection.clone(),
        gen: job.gen,
        volume: job.volume.clone(),
    })
    .await?;
    // Bounded: the network side waits while the device is slower.
    let (tx, rx) = std_mpsc::sync_channel::<std::io::Result<Vec<u8>>>(8);
    let (device, name) = (
        job.device.clone(),
        PathBuf::from(format!("staging log of {} gen {}", job.volume, job.gen)),
    );
    let apply = tokio::task::spawn_blocking(move || -> Result<replica::ApplyStats> {
        let input = Incoming {
            rx,
            buf: Vec::new(),
            at: 0,
        };
        let reader = StagingReader::from_reader(Box::new(input), &name)?;
        replica::apply_from(reader, &device)
    });
    let mut got = 0u64;
    let fed = async {
        loop {
            match r.expect("LogEnd").await? {
                Msg::LogPart { bytes } => {
                    got += bytes.len() as u64;
                    if tx.send(Ok(bytes.into_vec())).is_err() {
                        // The apply ended early: its error says why.
                        return Ok(());
                    }
                }
                Msg::LogEnd { bytes } if bytes == got => return Ok(()),
                Msg::LogEnd { bytes } => {
                    bail!("the DR daemon said the log has {bytes} bytes; {got} arrived")
                }
                Msg::Refused(why) => bail!("the DR daemon refused the fetch: {why}"),
                other => bail!("expected LogPart, got {}", other.kind()),
            }
        }
    }
    .await;
    if let Err(e) = &fed {
        // A log cut short must fail the apply, not end it as if whole.
        let _ = tx.send(Err(std::io::Error::other(format!("{e:#}"))));
    }
    drop(tx);
    let stats = apply
        .await
        .map_err(|e| anyhow!("the apply panicked: {e}"))?;
    fed?;
    let stats = match stats {
        Ok(s) => s,
        // Not a failure to retry: running again would find the same bytes. Reported as
        // the outcome, so the daemon resyncs the volume.
        Err(e) if e.downcast_ref::<replica::Diverged>().is_some() => {
            w.finish();
            conn.close(0u32.into(), b"writer done");
            return Ok(Written {
                volume: job.volume.clone(),
                gen: job.gen.0,
                diverged: Some(format!("{e:#}")),
                ..Default::default()
            });
        }
        Err(e) => return Err(e),
    };
    w.finish();
    conn.close(0u32.into(), b"writer done");
    Ok(Written {
        volume: job.volume.clone(),
        gen: job.gen.0,
        log_bytes: got,
        data_chunks: stats.data_chunks,
        zero_chunks: stats.zero_chunks,
        patched_chunks: stats.patched_chunks,
        bytes_written: stats.bytes_written,
        diverged: None,
    })
}
