//! The TOML config, read in two steps: raw serde structs (unknown keys and wrong types are
//! rejected by the parser, which names the key), then validation that reports every
//! semantic problem at once, each with its key path.
//!
//! Relative paths are resolved against the config file's directory.
//!
//! Files:
//! - `mod.rs`: the validated types ([`Config`], [`Protection`], [`Volume`], ...), the errors,
//!   [`load`] and [`parse`].
//! - `raw.rs`: the serde structs exactly as read from TOML.
//! - `validate.rs`: the validator that turns them into the types here, and the duration and
//!   size parsers.
//! - `control.rs`: validation of `[control]`: its address and callers.
//! - `kubernetes.rs`: validation of `[kubernetes]` and `[protection.kubernetes]`.
//! - `paths.rs`: paths resolved (`..`, symlinks) and refused where two keys name one place.
//! - `tests.rs`: unit tests.

mod control;
mod kubernetes;
mod paths;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ids::{ProtectionName, VolumeName};
pub use crate::k8s::KubeSettings;
use crate::net::tls::TlsFiles;
pub use control::{read_token, MIN_TOKEN_LEN};
use raw::RawConfig;
pub use validate::parse_size;
use validate::Validator;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Dr,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Dr => "dr",
        })
    }
}

/// How the primary snapshots a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Reflink where the file system can, else a copy while the hooks hold writers quiet.
    Auto,
    /// Reflink or fail: for users who cannot afford a long freeze.
    Reflink,
    /// Always copy.
    Copy,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub site_name: String,
    pub role: Role,
    pub state_dir: PathBuf,
    /// DR site: where incoming changes are staged until their group commits.
    pub staging_dir: PathBuf,
    /// DR site: staging stops (and the cycle fails cleanly) before free space on the
    /// staging file system drops below this, so the state store never meets a full disk.
    pub min_free_space: u64,
    pub tls: TlsFiles,
    pub peer: Option<Peer>,
    pub listen: Option<SocketAddr>,
    /// DR: the primary site's name; a peer whose certificate is not for it is refused.
    /// Unset: any site of the pair but this one.
    pub listen_peer: Option<String>,
    pub control: SocketAddr,
    /// Who may call the control API, each with a bearer token in a file. Empty: the API
    /// is open, which validation allows on loopback addresses only.
    pub control_clients: Vec<ControlClient>,
    /// Set when any protection is a Kubernetes protection.
    pub kubernetes: Option<KubeSettings>,
    pub protections: Vec<Protection>,
}

/// One caller of the control API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlClient {
    /// Who it is, in the daemon's log of state-changing calls.
    pub name: String,
    pub level: crate::api::Level,
    /// A file holding its bearer token (surrounding white space ignored).
    pub token_file: PathBuf,
}

impl Config {
    /// The token files of the clients this config names, most powerful first, for the
    /// CLI run with `--config` at the site itself (it uses the first it can read).
    pub fn cli_token_files(&self) -> Vec<&Path> {
        let mut c: Vec<&ControlClient> = self.control_clients.iter().collect();
        c.sort_by_key(|c| std::cmp::Reverse(c.level));
        c.into_iter().map(|c| c.token_file.as_path()).collect()
    }
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub address: SocketAddr,
    pub server_name: String,
    /// Cap on replication bytes per second to this peer, all protections together.
    pub max_bandwidth: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Protection {
    pub name: ProtectionName,
    pub interval: Duration,
    pub rpo_target: Duration,
    pub chunk_size: u32,
    pub snapshot: SnapshotMode,
    pub snapshot_dir: PathBuf,
    pub pre: Vec<String>,
    pub post: Vec<String>,
    pub hook_timeout: Duration,
    /// Pre and post rules: the `pre`/`post` commands and the Stork Rule files
    /// `pre_rule`/`post_rule`, in that order.
    pub pre_rules: Vec<crate::rules::Rule>,
    pub post_rules: Vec<crate::rules::Rule>,
    /// Run the first cycle when the daemon starts, not one interval later.
    pub sync_on_start: bool,
    /// zstd-compress chunks where that saves bytes ("auto", the default) or never ("off").
    pub compression: bool,
    /// Send only the changed 4 KiB blocks of changed chunks.
    pub refine: Refine,
    /// Kubernetes mode: the selection whose PVCs form the group (at the primary) and
    /// where replicas of those PVCs live (at the DR site).
    pub kubernetes: Option<crate::k8s::KubeProtection>,
    pub volumes: Vec<Volume>,
    /// DR site: recovery points kept (the newest is the consistent point).
    pub keep: Keep,
    /// DR site: a point becomes the failover default only once it is this old.
    pub apply_delay: Option<Duration>,
    /// DR site: the background scrub of file replicas (None: off).
    pub scrub: Option<Scrub>,
}

/// DR site: re-read each replica against the DR index once every `every`, at most `rate`
/// bytes a second, a slice at a time between cycles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scrub {
    pub every: Duration,
    pub rate: u64,
}

pub const DEFAULT_SCRUB_EVERY: Duration = Duration::from_secs(24 * 3600);
/// 16 MiB/s: a TiB of data in about 18 hours, a small share of a disk's bandwidth.
pub const DEFAULT_SCRUB_RATE: u64 = 16 << 20;

/// DR site: which recovery points are kept (`store::retention` applies it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// At most this many.
    pub count: usize,
    /// Spread over this window; older ones go.
    pub window: Option<Duration>,
    /// The newest this many stay whole, whatever the spreading.
    pub recent: usize,
    /// Neither `keep` nor `keep_for` was set: a day's worth where the replicas allow
    /// older points, else the newest only (see `Keep::newest_only`).
    pub by_default: bool,
}

/// The default window: a day.
pub const DEFAULT_KEEP_FOR: Duration = Duration::from_secs(24 * 3600);
/// Points spread over the default day at most: one an hour.
pub const DEFAULT_KEEP_SLOTS: usize = 24;
/// The newest points kept whole by default (an hour at a 5-minute interval).
pub const DEFAULT_RECENT: usize = 12;
/// Points a `keep_for` without `keep` spreads over its window at most.
pub const KEEP_FOR_MAX: usize = 1000;

impl Keep {
    /// `keep`, `keep_for`, `apply_delay` and the interval as written. The count defaults
    /// to every cycle of the window (bounded), the window to a day when neither is set;
    /// the points an `apply_delay` can choose (and two more) stay whole.
    pub fn new(
        count: Option<usize>,
        window: Option<Duration>,
        interval: Duration,
        delay: Option<Duration>,
    ) -> Keep {
        let cycles =
            |d: Duration| (d.as_secs_f64() / interval.as_secs_f64().max(0.001)).ceil() as usize;
        let delayed = delay.map_or(0, |d| cycles(d).saturating_add(2));
        match (count, window) {
            (Some(c), None) => Keep {
                count: c,
                window: None,
                recent: 0,
                by_default: false,
            },
            (Some(c), Some(w)) => Keep {
                count: c,
                window: Some(w),
                recent: delayed.min(c),
                by_default: false,
            },
            (None, Some(w)) => Keep {
                count: delayed + cycles(w).min(KEEP_FOR_MAX),
                window: Some(w),
                recent: delayed,
                by_default: false,
            },
            (None, None) => {
                let recent = delayed.max(DEFAULT_RECENT);
                Keep {
                    count: recent + cycles(DEFAULT_KEEP_FOR).min(DEFAULT_KEEP_SLOTS),
                    window: Some(DEFAULT_KEEP_FOR),
                    recent,
                    by_default: true,
                }
            }
        }
    }

    /// The newest point only: where the replicas' file system cannot share extents and
    /// nothing asked for more.
    pub fn newest_only() -> Keep {
        Keep {
            count: 1,
            window: None,
            recent: 0,
            by_default: true,
        }
    }

    /// The oldest a kept point can be: what an `apply_delay` must stay under.
    pub fn reach(&self, interval: Duration) -> Duration {
        self.window
            .unwrap_or(interval * (self.count.saturating_sub(1)) as u32)
    }
}

/// Sub-chunk refinement (see [`crate::engine::refine`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refine {
    /// On unless `peer.max_bandwidth` is at least [`REFINE_AUTO_BELOW`].
    Auto,
    On,
    Off,
}

/// 10 Gbit/s: the link speed from which `refine = "auto"` stops refining. Refinement costs
/// the DR site a read of each changed chunk from its replica and a pipelined round trip;
/// it saves up to 15/16 of the wire and staging bytes of scattered 4 KiB writes. Measured
/// on this project's machines it still wins at 5 Gbit/s (see the README's performance
/// section); from 10 Gbit/s a DR replica on disks slower than the link may lose by it.
pub const REFINE_AUTO_BELOW: f64 = 1.25e9;

#[derive(Debug, Clone)]
pub struct Volume {
    pub name: VolumeName,
    pub path: PathBuf,
}

impl Config {
    /// Mover (primary) or writer (DR site) Jobs of every protection at once.
    pub fn max_movers(&self) -> usize {
        self.kubernetes
            .as_ref()
            .and_then(|k| k.max_movers)
            .unwrap_or(crate::k8s::DEFAULT_MAX_MOVERS)
    }

    pub fn protection(&self, name: &str) -> Option<&Protection> {
        self.protections.iter().find(|p| p.name.as_str() == name)
    }
}

impl Protection {
    /// The CSI data path's settings: snapshots and movers at the primary, replica PVCs,
    /// writers and recovery points at the DR site.
    pub fn csi(&self) -> Option<&crate::k8s::CsiSettings> {
        self.kubernetes.as_ref().and_then(|k| k.csi.as_ref())
    }

    pub fn volume(&self, name: &str) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.name.as_str() == name)
    }

    /// This protection with the volumes `names` added where the config does not list them:
    /// in Kubernetes mode the group is the selection's PVCs, which change between cycles
    /// (a StatefulSet scaled up), so a volume's path comes from `volume_path`.
    pub fn with_volumes<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Protection {
        let mut p = self.clone();
        let Some(k) = &self.kubernetes else { return p };
        for name in names {
            if p.volume(name).is_some() {
                continue;
            }
            if let (Ok(vname), Some(path)) = (VolumeName::new(name), k.path_of_volume(name)) {
                p.volumes.push(Volume { name: vname, path });
            }
        }
        p
    }
}

/// One problem with a config value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is not valid TOML for lifeboat: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {}: {}", p.key, p.message)).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The keys named by this error (for tests and for `check-config --output json`).
    pub fn keys(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { problems, .. } => {
                problems.iter().map(|p| p.key.clone()).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// Reads and validates the config at `path`: what commands that only use its values need
/// (`status`, `failover`), so a disaster is not the moment to learn of a key's mode.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, false)
}

/// [`load`], and also the files the daemon will use: the private key must not be open to
/// group or others. For `run` and `check-config`.
pub fn load_for_run(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, true)
}

fn load_with(path: &Path, check_files: bool) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_with(&text, path, check_files)
}

/// Parses and validates `text` as if read from `path`.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    parse_with(text, path, false)
}

fn parse_with(text: &str, path: &Path, check_files: bool) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut v = Validator {
        base,
        problems: Vec::new(),
        uses: Vec::new(),
        check_files,
    };
    let cfg = v.config(raw, path);
    if v.problems.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            problems: v.problems,
        })
    }
}
