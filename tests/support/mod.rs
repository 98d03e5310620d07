//! Test support: a pair of real lifeboat daemons (separate processes, real QUIC, TLS,
//! RocksDB and files) on loopback, with helpers to change volumes, kill -9 a site at a
//! failpoint, and compare files by blake3.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lifeboat::api::Client;
use lifeboat::api::{CycleReport, SiteStatus};
use rand::{Rng, RngCore, SeedableRng};

pub mod apirules;
pub mod cbt;
pub mod cluster;
pub mod csisite;
pub mod kubeapi;
pub mod kubeexec;
pub mod rbac;
pub mod relay;

pub const PROT: &str = "p";

pub fn b3(path: &Path) -> String {
    lifeboat::volume::file_blake3(path).unwrap_or_else(|e| panic!("hash {}: {e:#}", path.display()))
}

pub fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fills a new file with seeded random bytes.
pub fn random_file(path: &Path, size: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        f.write_all_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
    f.set_len(size).unwrap();
}

/// Writes `count` random 4 KiB blocks at random 4 KiB-aligned offsets; returns the set of
/// distinct chunk indexes (of `chunk_size`) touched.
pub fn scatter_writes(
    path: &Path,
    count: u64,
    chunk_size: u64,
    seed: u64,
) -> std::collections::BTreeSet<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let size = lifeboat::engine::scan::volume_size(&f).unwrap();
    let mut block = vec![0u8; 4096];
    let mut chunks = std::collections::BTreeSet::new();
    for _ in 0..count {
        rng.fill_bytes(&mut block);
        let off = rng.random_range(0..size / 4096) * 4096;
        f.write_all_at(&block, off).unwrap();
        chunks.insert(off / chunk_size);
    }
    chunks
}

pub struct SiteProc {
    pub name: &'static str,
    pub config: PathBuf,
    pub control: String,
    pub log: PathBuf,
    pub state_dir: PathBuf,
    child: Option<Child>,
    pub failpoint: Option<String>,
    pub marker: PathBuf,
    /// The bearer token [`SiteProc::client`] sends, for sites with `[[control.client]]`.
    pub token: Option<String>,
}

impl SiteProc {
    /// Runs `lifeboat ARGS --config <this site's config>`: whether it succeeded, its
    /// stdout and its stderr.
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_lifeboat"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn client(&self) -> Client {
        Client::at(&self.control).with_token(self.token.clone())
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let _ = fs::remove_file(&self.marker);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lifeboat"));
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .env("LIFEBOAT_LOG", "info,lifeboat=debug")
            .env("LIFEBOAT_FAILPOINT_MARKER", &self.marker)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .unwrap(),
            );
        match &self.failpoint {
            Some(fp) => cmd.env("LIFEBOAT_FAILPOINT", fp),
            None => cmd.env_remove("LIFEBOAT_FAILPOINT"),
        };
        self.child = Some(cmd.spawn().expect("start lifeboat"));
        self.wait_ready();
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = self.client();
        while Instant::now() < deadline {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited with {st}:\n{}", self.name, self.log_text());
            }
            // Started: ready, or up but not ready for a reason it names (fenced, degraded).
            if client
                .get_text("/readyz")
                .map(|t| t.starts_with("ready") || t.starts_with("not ready:"))
                .unwrap_or(false)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} not ready:\n{}", self.name, self.log_text());
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the armed failpoint was reached.
    pub fn wait_failpoint(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if self.marker.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} never reached failpoint {:?}:\n{}",
            self.name,
            self.failpoint,
            self.log_text()
        );
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    pub fn stop(&mut self) {
        self.terminate();
    }

    /// SIGTERM, and how the daemon exited.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        Some(c.wait().unwrap())
    }

    /// Sends `sig` (e.g. `libc::SIGHUP`) to the running daemon.
    pub fn signal(&self, sig: i32) {
        let c = self.child.as_ref().expect("the daemon is running");
        assert_eq!(unsafe { libc::kill(c.id() as i32, sig) }, 0, "kill {sig}");
    }

    pub fn status(&self) -> SiteStatus {
        self.client().get("/v1/status").unwrap()
    }

    pub fn metrics(&self) -> String {
        self.client().get_text("/metrics").unwrap()
    }
}

impl Drop for SiteProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Pair {
    pub dir: tempfile::TempDir,
    pub primary: SiteProc,
    pub dr: SiteProc,
    pub volumes: Vec<String>,
    pub chunk_size: u64,
    pub relay: Option<relay::Relay>,
    pub quic_port: u16,
}

impl Drop for Pair {
    /// Stops both daemons, then unmounts whatever a test mounted under the pair's
    /// directory, so the directory itself can be removed.
    fn drop(&mut self) {
        self.primary.kill9();
        self.dr.kill9();
        let root = self.dir.path().to_string_lossy().into_owned();
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        for m in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            if m.starts_with(&root) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
}

pub struct PairOptions {
    pub volumes: Vec<(&'static str, u64)>,
    pub chunk_size: &'static str,
    pub start: bool,
    /// Route the primary's QUIC traffic through a [`relay::Relay`].
    pub relay: bool,
    /// Extra lines for the DR site's `[site]` table.
    pub dr_site: &'static str,
    /// Extra lines for the primary's `[[protection]]` table.
    pub primary_protection: &'static str,
    /// Extra lines for the primary's `[peer]` table.
    pub primary_peer: &'static str,
    /// Appended to the primary's config (after its protection): `[protection.kubernetes]`
    /// and `[kubernetes]` tables.
    pub primary_tail: String,
    /// Appended to the DR site's config.
    pub dr_tail: String,
    /// Extra lines for the DR site's `[[protection]]` table.
    pub dr_protection: String,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            volumes: vec![("v1", 8 << 20)],
            chunk_size: "64KiB",
            start: true,
            relay: false,
            dr_site: "",
            primary_protection: "",
            primary_peer: "",
            primary_tail: String::new(),
            dr_tail: String::new(),
            dr_protection: String::new(),
        }
    }
}

impl Pair {
    pub fn new(opts: PairOptions) -> Pair {
        let dir = tempfile::Builder::new()
            .prefix("lifeboat-test-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        lifeboat::net::tls::generate(&d.join("certs"), &["primary".into(), "dr".into()], &[])
            .unwrap();
        fs::create_dir_all(d.join("vols")).unwrap();
        fs::create_dir_all(d.join("replicas")).unwrap();
        let quic = free_udp();
        let relay = opts
            .relay
            .then(|| relay::Relay::start(format!("127.0.0.1:{quic}").parse().unwrap()));
        let peer_port = relay.as_ref().map_or(quic, |r| r.addr.port());
        let (pctl, dctl) = (free_tcp(), free_tcp());
        let mut pvols = String::new();
        let mut dvols = String::new();
        for (i, (name, size)) in opts.volumes.iter().enumerate() {
            let path = d.join("vols").join(format!("{name}.img"));
            if *size > 0 {
                random_file(&path, *size, 100 + i as u64);
            }
            pvols += &format!(
                "\n[[protection.volume]]\nname = \"{name}\"\npath = \"vols/{name}.img\"\n"
            );
            dvols += &format!(
                "\n[[protection.volume]]\nname = \"{name}\"\npath = \"replicas/{name}.img\"\n"
            );
        }
        let prot = |extra: &str, vols: &str| {
            format!("\n[[protection]]\nname = \"{PROT}\"\ninterval = \"1h\"\nsync_on_start = false\nchunk_size = \"{}\"\n{extra}\n{vols}", opts.chunk_size)
        };
        let primary_cfg = d.join("primary.toml");
        fs::write(&primary_cfg, format!("[site]\nname = \"primary\"\nrole = \"primary\"\nstate_dir = \"pstate\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/primary.pem\"\nkey = \"certs/primary.key\"\n[peer]\naddress = \"127.0.0.1:{peer_port}\"\nserver_name = \"dr\"\n{}\n[control]\naddress = \"127.0.0.1:{pctl}\"\n{}", opts.primary_peer, prot(opts.primary_protection, &pvols) + &opts.primary_tail)).unwrap();
        let dr_cfg = d.join("dr.toml");
        fs::write(&dr_cfg, format!("[site]\nname = \"dr\"\nrole = \"dr\"\nstate_dir = \"dstate\"\n{}\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/dr.pem\"\nkey = \"certs/dr.key\"\n[listen]\naddress = \"127.0.0.1:{quic}\"\n[control]\naddress = \"127.0.0.1:{dctl}\"\n{}", opts.dr_site, prot(&opts.dr_protection, &dvols) + &opts.dr_tail)).unwrap();
        let site = |name: &'static str, config: PathBuf, port: u16, state: &str| SiteProc {
            name,
            config,
            control: format!("127.0.0.1:{port}"),
            log: d.join(format!("{name}.log")),
            state_dir: d.join(state),
            child: None,
            failpoint: None,
            marker: d.join(format!("{name}.failpoint")),
            token: None,
        };
        let chunk_size = lifeboat::config::parse_size(opts.chunk_size).unwrap();
        let mut pair = Pair {
            primary: site("primary", primary_cfg, pctl, "pstate"),
            dr: site("dr", dr_cfg, dctl, "dstate"),
            volumes: opts.volumes.iter().map(|(n, _)| n.to_string()).collect(),
            chunk_size,
            relay,
            quic_port: quic,
            dir,
        };
        if opts.start {
            pair.start();
        }
        pair
    }

    /// Starts the DR site, then the primary.
    pub fn start(&mut self) {
        self.dr.start();
        self.primary.start();
    }

    pub fn volume(&self, name: &str) -> PathBuf {
        self.dir.path().join("vols").join(format!("{name}.img"))
    }

    pub fn replica(&self, name: &str) -> PathBuf {
        self.dir.path().join("replicas").join(format!("{name}.img"))
    }

    /// The primary's snapshot of `gen` (kept while `gen` is the acknowledged base).
    pub fn snapshot(&self, gen: u64, name: &str) -> PathBuf {
        self.primary
            .state_dir
            .join("snapshots")
            .join(PROT)
            .join(gen.to_string())
            .join(name)
    }

    pub fn try_sync(&self) -> Result<CycleReport, String> {
        self.primary
            .client()
            .post::<CycleReport>(&format!("/v1/protections/{PROT}/sync"))
            .map_err(|e| format!("{e:#}"))
    }

    pub fn sync(&self) -> CycleReport {
        self.try_sync().unwrap_or_else(|e| {
            panic!(
                "sync failed: {e}\n--- primary log ---\n{}\n--- dr log ---\n{}",
                self.primary.log_text(),
                self.dr.log_text()
            )
        })
    }

    /// blake3 of every primary volume, in order.
    pub fn volume_hashes(&self) -> Vec<String> {
        self.volumes.iter().map(|v| b3(&self.volume(v))).collect()
    }

    pub fn replica_hashes(&self) -> Vec<String> {
        self.volumes.iter().map(|v| b3(&self.replica(v))).collect()
    }

    /// Scatters `writes` random 4 KiB writes over every volume.
    pub fn change_all(&self, writes: u64, seed: u64) {
        for (i, v) in self.volumes.iter().enumerate() {
            scatter_writes(&self.volume(v), writes, self.chunk_size, seed + i as u64);
        }
    }

    pub fn snapshot_hashes(&self, gen: u64) -> Vec<String> {
        self.volumes
            .iter()
            .map(|v| b3(&self.snapshot(gen, v)))
            .collect()
    }
}

/// Parses one sample `name{labels} value` from Prometheus text.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
