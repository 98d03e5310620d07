//! The TOML config, read in two steps: raw serde structs (unknown keys and wrong types are
//! rejected by the parser, which names the key), then validation that reports every
//! semantic problem at once, each with its key path.
//!
//! Relative paths are resolved against the config file's directory.

use std::collections::HashSet;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::engine::chunk::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::ids::{ProtectionName, VolumeName};
use crate::k8s::KubeProtection;
use crate::net::tls::TlsFiles;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site: RawSite,
    tls: RawTls,
    peer: Option<RawPeer>,
    listen: Option<RawListen>,
    control: Option<RawControl>,
    kubernetes: Option<RawKubernetes>,
    #[serde(default, rename = "protection")]
    protections: Vec<RawProtection>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: String,
    role: String,
    state_dir: String,
    staging_dir: Option<String>,
    min_free_space: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: String,
    cert: String,
    key: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    address: String,
    server_name: String,
    max_bandwidth: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawListen {
    address: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawControl {
    address: String,
}

/// `[kubernetes]`: how this site's daemon reaches its own cluster.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    kubeconfig: Option<String>,
    context: Option<String>,
}

/// `[protection.kubernetes]`: what a protection selects in the cluster.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawKubeProtection {
    #[serde(default)]
    namespaces: Vec<String>,
    selector: Option<String>,
    #[serde(default)]
    include_kinds: Vec<String>,
    #[serde(default)]
    exclude_kinds: Vec<String>,
    #[serde(default)]
    custom_resources: Vec<String>,
    exclude_label: Option<String>,
    #[serde(default)]
    namespace_map: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    storage_class_map: std::collections::BTreeMap<String, String>,
    resource_modifiers: Option<String>,
    volume_path: Option<String>,
    /// A Stork Rule object in the (first) protected namespace, run before the snapshot.
    pre_rule: Option<String>,
    post_rule: Option<String>,
    /// Run Velero's backup hook annotations of the selected pods (default true).
    velero_hooks: Option<bool>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawProtection {
    name: String,
    interval: Option<String>,
    rpo_target: Option<String>,
    chunk_size: Option<String>,
    snapshot: Option<String>,
    snapshot_dir: Option<String>,
    #[serde(default)]
    pre: Vec<String>,
    #[serde(default)]
    post: Vec<String>,
    hook_timeout: Option<String>,
    pre_rule: Option<String>,
    post_rule: Option<String>,
    sync_on_start: Option<bool>,
    compression: Option<String>,
    refine: Option<String>,
    kubernetes: Option<RawKubeProtection>,
    #[serde(default, rename = "volume")]
    volumes: Vec<RawVolume>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: String,
    path: String,
}

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
    pub control: SocketAddr,
    /// Set when any protection is a Kubernetes protection.
    pub kubernetes: Option<KubeSettings>,
    pub protections: Vec<Protection>,
}

/// How the daemon reaches its cluster: a kubeconfig file (and context), or, without one,
/// the in-cluster service account (or `$KUBECONFIG`, as kubectl infers it).
#[derive(Debug, Clone, Default)]
pub struct KubeSettings {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
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
    pub fn protection(&self, name: &str) -> Option<&Protection> {
        self.protections.iter().find(|p| p.name.as_str() == name)
    }
}

impl Protection {
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

pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates `text` as if read from `path`.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
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

struct Validator {
    base: PathBuf,
    problems: Vec<Problem>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{s:?} is not a duration ({e}); expected e.g. \"30s\", \"5m\", \"1h\"")
    })?;
    if d.is_zero() {
        return Err(format!("{s:?} is zero; expected a positive duration"));
    }
    Ok(d)
}

/// Parses a human size such as "64KiB" or "1 MiB" into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size ({e}); expected e.g. \"64KiB\", \"1MiB\""))
}

impl Validator {
    /// One of a fixed set of words; missing means the first (the default). Anything else
    /// is a problem naming the words allowed.
    fn choice<T: Copy>(
        &mut self,
        key: String,
        value: Option<&str>,
        what: &str,
        options: &[(&str, T)],
    ) -> T {
        let Some(v) = value else { return options[0].1 };
        if let Some((_, t)) = options.iter().find(|(word, _)| *word == v) {
            return *t;
        }
        let words: Vec<String> = options.iter().map(|(w, _)| format!("{w:?}")).collect();
        let (last, rest) = words.split_last().expect("options are not empty");
        let expected = if rest.is_empty() {
            last.clone()
        } else {
            format!("{} or {last}", rest.join(", "))
        };
        self.problem(key, format!("{v:?} is not a {what}; expected {expected}"));
        options[0].1
    }

    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn path(&mut self, key: &str, s: &str) -> PathBuf {
        if s.trim().is_empty() {
            self.problem(key, "is empty; expected a path");
        }
        let p = PathBuf::from(s);
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }

    fn addr(&mut self, key: &str, s: &str) -> SocketAddr {
        match s.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(a)) => a,
            Ok(None) | Err(_) => {
                self.problem(
                    key,
                    format!(
                        "{s:?} is not an address; expected host:port such as \"127.0.0.1:7420\""
                    ),
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }

    fn config(&mut self, raw: RawConfig, file: &Path) -> Config {
        let role = match raw.site.role.as_str() {
            "primary" => Role::Primary,
            "dr" => Role::Dr,
            other => {
                self.problem(
                    "site.role",
                    format!("{other:?} is not a role; expected \"primary\" or \"dr\""),
                );
                Role::Primary
            }
        };
        if let Err(e) = crate::ids::check_name(&raw.site.name) {
            self.problem("site.name", e);
        }
        let state_dir = self.path("site.state_dir", &raw.site.state_dir);
        let staging_dir = match &raw.site.staging_dir {
            Some(s) => self.path("site.staging_dir", s),
            None => state_dir.join("staging"),
        };
        let min_free_space = match raw.site.min_free_space.as_deref().map(parse_size) {
            None => 256 << 20,
            Some(Ok(n)) => n,
            Some(Err(e)) => {
                self.problem("site.min_free_space", e);
                0
            }
        };
        let tls = TlsFiles {
            ca: self.path("tls.ca", &raw.tls.ca),
            cert: self.path("tls.cert", &raw.tls.cert),
            key: self.path("tls.key", &raw.tls.key),
        };
        let peer = match (&raw.peer, role) {
            (Some(p), _) => {
                let address = self.addr("peer.address", &p.address);
                if p.server_name.trim().is_empty() {
                    self.problem(
                        "peer.server_name",
                        "is empty; expected the DR site's name in its certificate",
                    );
                }
                let max_bandwidth = p.max_bandwidth.as_deref().and_then(|b| {
                    let bytes = b.trim().trim_end_matches("/s");
                    match parse_size(bytes) {
                        Ok(0) => {
                            self.problem("peer.max_bandwidth", "is zero; leave it out for no cap");
                            None
                        }
                        Ok(n) => Some(n),
                        Err(e) => {
                            self.problem(
                                "peer.max_bandwidth",
                                format!("{e}; expected bytes per second such as \"50MiB/s\""),
                            );
                            None
                        }
                    }
                });
                Some(Peer {
                    address,
                    server_name: p.server_name.clone(),
                    max_bandwidth,
                })
            }
            (None, Role::Primary) => {
                self.problem(
                    "peer",
                    "is missing; a primary needs [peer] with address and server_name of the DR site",
                );
                None
            }
            (None, Role::Dr) => None,
        };
        let listen = match (&raw.listen, role) {
            (Some(l), _) => Some(self.addr("listen.address", &l.address)),
            (None, Role::Dr) => Some(SocketAddr::from(([0, 0, 0, 0], 7420))),
            (None, Role::Primary) => None,
        };
        let control = match &raw.control {
            Some(c) => self.addr("control.address", &c.address),
            None => SocketAddr::from(([127, 0, 0, 1], 7421)),
        };
        let mut names = HashSet::new();
        let mut protections = Vec::new();
        for (i, p) in raw.protections.into_iter().enumerate() {
            let key = format!("protection[{i}]");
            if !names.insert(p.name.clone()) {
                self.problem(
                    format!("{key}.name"),
                    format!("{:?} is used by an earlier protection", p.name),
                );
            }
            protections.push(self.protection(&key, p, &state_dir, role));
        }
        let kubernetes = match (
            &raw.kubernetes,
            protections.iter().any(|p| p.kubernetes.is_some()),
        ) {
            (Some(k), _) => Some(KubeSettings {
                kubeconfig: k
                    .kubeconfig
                    .as_deref()
                    .map(|s| self.path("kubernetes.kubeconfig", s)),
                context: k.context.clone(),
            }),
            (None, true) => Some(KubeSettings::default()),
            (None, false) => None,
        };
        if protections.is_empty() {
            self.problem(
                "protection",
                "no [[protection]] is configured; expected at least one",
            );
        }
        Config {
            file: file.to_path_buf(),
            site_name: raw.site.name,
            role,
            state_dir,
            staging_dir,
            min_free_space,
            tls,
            peer,
            listen,
            control,
            kubernetes,
            protections,
        }
    }

    fn protection(
        &mut self,
        key: &str,
        p: RawProtection,
        state_dir: &Path,
        role: Role,
    ) -> Protection {
        let name = ProtectionName::new(&p.name).unwrap_or_else(|e| {
            self.problem(format!("{key}.name"), e);
            ProtectionName::new("invalid").expect("literal")
        });
        let dur = |this: &mut Self, field: &str, v: &Option<String>, default: Duration| {
            v.as_deref()
                .map(|s| {
                    parse_duration(s).unwrap_or_else(|e| {
                        this.problem(format!("{key}.{field}"), e);
                        default
                    })
                })
                .unwrap_or(default)
        };
        let interval = dur(self, "interval", &p.interval, Duration::from_secs(60));
        let rpo_target = dur(self, "rpo_target", &p.rpo_target, interval * 2);
        let hook_timeout = dur(
            self,
            "hook_timeout",
            &p.hook_timeout,
            Duration::from_secs(60),
        );
        let chunk_size = match p.chunk_size.as_deref().map(parse_size) {
            None => DEFAULT_CHUNK_SIZE,
            Some(Err(e)) => {
                self.problem(format!("{key}.chunk_size"), e);
                DEFAULT_CHUNK_SIZE
            }
            Some(Ok(n))
                if n < MIN_CHUNK_SIZE as u64
                    || n > MAX_CHUNK_SIZE as u64
                    || n % MIN_CHUNK_SIZE as u64 != 0 =>
            {
                self.problem(
                    format!("{key}.chunk_size"),
                    format!("{n} bytes; expected a multiple of 4KiB from 4KiB to 16MiB"),
                );
                DEFAULT_CHUNK_SIZE
            }
            Some(Ok(n)) => n as u32,
        };
        let snapshot = self.choice(
            format!("{key}.snapshot"),
            p.snapshot.as_deref(),
            "snapshot method",
            &[
                ("auto", SnapshotMode::Auto),
                ("reflink", SnapshotMode::Reflink),
                ("copy", SnapshotMode::Copy),
            ],
        );
        let compression = self.choice(
            format!("{key}.compression"),
            p.compression.as_deref(),
            "compression mode",
            &[("auto", true), ("off", false)],
        );
        let refine = self.choice(
            format!("{key}.refine"),
            p.refine.as_deref(),
            "refinement mode",
            &[
                ("auto", Refine::Auto),
                ("on", Refine::On),
                ("off", Refine::Off),
            ],
        );
        let snapshot_dir = match &p.snapshot_dir {
            Some(s) => self.path(&format!("{key}.snapshot_dir"), s),
            None => state_dir.join("snapshots"),
        };
        for (field, cmds) in [("pre", &p.pre), ("post", &p.post)] {
            for (j, c) in cmds.iter().enumerate() {
                if c.trim().is_empty() {
                    self.problem(
                        format!("{key}.{field}[{j}]"),
                        "is empty; expected a shell command",
                    );
                }
            }
        }
        let mut vol_names = HashSet::new();
        let mut vol_paths = HashSet::new();
        let mut volumes = Vec::new();
        for (j, v) in p.volumes.iter().enumerate() {
            let vkey = format!("{key}.volume[{j}]");
            let vname = match VolumeName::new(&v.name) {
                Ok(n) => n,
                Err(e) => {
                    self.problem(format!("{vkey}.name"), e);
                    continue;
                }
            };
            if !vol_names.insert(v.name.clone()) {
                self.problem(
                    format!("{vkey}.name"),
                    format!(
                        "{:?} is used by an earlier volume of this protection",
                        v.name
                    ),
                );
            }
            let path = self.path(&format!("{vkey}.path"), &v.path);
            if !vol_paths.insert(path.clone()) {
                self.problem(
                    format!("{vkey}.path"),
                    format!(
                        "{} is used by an earlier volume of this protection",
                        path.display()
                    ),
                );
            }
            volumes.push(Volume { name: vname, path });
        }
        let kubernetes = p
            .kubernetes
            .map(|k| self.kube_protection(&format!("{key}.kubernetes"), k, role));
        if kubernetes.is_some() && !(p.pre.is_empty() && p.post.is_empty()) {
            self.problem(
                format!("{key}.pre"),
                "pre/post commands run on this host; in Kubernetes mode use pre_rule/post_rule (Stork Rules, run in the pods) or Velero hook annotations",
            );
        }
        let mut rules = |field: &str, commands: &[String], file: &Option<String>| {
            let mut out = Vec::new();
            if !commands.is_empty() {
                out.push(crate::rules::format::local(field, commands, hook_timeout));
            }
            if let Some(f) = file {
                let path = self.path(&format!("{key}.{field}_rule"), f);
                match std::fs::read_to_string(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|y| crate::rules::format::stork_rule(&y, hook_timeout))
                {
                    Ok(r) => out.push(r),
                    Err(e) => self.problem(
                        format!("{key}.{field}_rule"),
                        format!("{}: {e:#}", path.display()),
                    ),
                }
            }
            out
        };
        let pre_rules = rules("pre", &p.pre, &p.pre_rule);
        let post_rules = rules("post", &p.post, &p.post_rule);
        if p.volumes.is_empty() && kubernetes.is_none() {
            self.problem(
                format!("{key}.volume"),
                "no [[protection.volume]] is listed; expected at least one (or a [protection.kubernetes] selection)",
            );
        }
        Protection {
            name,
            interval,
            rpo_target,
            chunk_size,
            snapshot,
            snapshot_dir,
            pre: p.pre,
            post: p.post,
            hook_timeout,
            pre_rules,
            post_rules,
            sync_on_start: p.sync_on_start.unwrap_or(true),
            compression,
            refine,
            kubernetes,
            volumes,
        }
    }

    fn kube_protection(&mut self, key: &str, k: RawKubeProtection, role: Role) -> KubeProtection {
        use crate::k8s::labels::Selector;
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if role == Role::Primary && k.namespaces.is_empty() {
            self.problem(
                format!("{key}.namespaces"),
                "is empty; expected the namespace(s) to protect, e.g. [\"prod\"]",
            );
        }
        for (i, ns) in k.namespaces.iter().enumerate() {
            if !dns_label(ns) {
                self.problem(
                    format!("{key}.namespaces[{i}]"),
                    format!("{ns:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"),
                );
            }
        }
        for (from, to) in &k.namespace_map {
            if !dns_label(to) {
                self.problem(
                    format!("{key}.namespace_map.{from}"),
                    format!("{to:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"),
                );
            }
        }
        let selector = k
            .selector
            .as_deref()
            .and_then(|s| match Selector::parse(s) {
                Ok(sel) => Some(sel),
                Err(e) => {
                    self.problem(format!("{key}.selector"), e);
                    None
                }
            });
        let resource_modifiers = k.resource_modifiers.as_deref().and_then(|s| {
            let path = self.path(&format!("{key}.resource_modifiers"), s);
            match crate::k8s::transform::Modifiers::load(&path) {
                Ok(m) => Some(m),
                Err(e) => {
                    self.problem(format!("{key}.resource_modifiers"), format!("{e:#}"));
                    None
                }
            }
        });
        let volume_path = match k.volume_path.as_deref() {
            Some(t) if t.contains("{pvc}") => Some(t.to_string()),
            Some(t) => {
                self.problem(
                    format!("{key}.volume_path"),
                    format!("{t:?} does not contain {{pvc}}; expected a template such as \"/srv/volumes/{{namespace}}/{{pvc}}.img\""),
                );
                None
            }
            None => {
                self.problem(
                    format!("{key}.volume_path"),
                    "is missing; expected where a PVC's bytes are (primary) or its replica goes (DR), e.g. \"/srv/volumes/{namespace}/{pvc}.img\"",
                );
                None
            }
        };
        let volume_path = volume_path.map(|t| {
            if Path::new(&t).is_absolute() {
                t
            } else {
                self.base.join(t).display().to_string()
            }
        });
        KubeProtection {
            namespaces: k.namespaces,
            selector,
            include_kinds: k.include_kinds,
            exclude_kinds: k.exclude_kinds,
            custom_resources: k.custom_resources,
            exclude_label: k
                .exclude_label
                .unwrap_or_else(|| crate::k8s::EXCLUDE_LABEL.to_string()),
            namespace_map: k.namespace_map,
            storage_class_map: k.storage_class_map,
            resource_modifiers,
            volume_path: volume_path.unwrap_or_default(),
            pre_rule: k.pre_rule,
            post_rule: k.post_rule,
            velero_hooks: k.velero_hooks.unwrap_or(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[site]
name = "primary"
role = "primary"
state_dir = "state"
[tls]
ca = "certs/ca.pem"
cert = "certs/primary.pem"
key = "certs/primary.key"
[peer]
address = "127.0.0.1:7420"
server_name = "dr"
[[protection]]
name = "pg"
interval = "30s"
chunk_size = "64KiB"
[[protection.volume]]
name = "data"
path = "/srv/pg.img"
"#;

    #[test]
    fn good_config_resolves_relative_paths_and_defaults() {
        let c = parse(GOOD, Path::new("/etc/lifeboat/primary.toml")).unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/lifeboat/state"));
        let p = &c.protections[0];
        assert_eq!(p.interval, Duration::from_secs(30));
        assert_eq!(p.rpo_target, Duration::from_secs(60));
        assert_eq!(p.chunk_size, 65536);
        assert_eq!(p.snapshot_dir, Path::new("/etc/lifeboat/state/snapshots"));
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let bad = GOOD
            .replace("\"30s\"", "\"soon\"")
            .replace("\"64KiB\"", "\"3KiB\"")
            .replace("role = \"primary\"", "role = \"leader\"");
        let err = parse(&bad, Path::new("x.toml")).unwrap_err();
        let keys = err.keys();
        assert!(
            keys.contains(&"protection[0].interval".to_string()),
            "{keys:?}"
        );
        assert!(
            keys.contains(&"protection[0].chunk_size".to_string()),
            "{keys:?}"
        );
        assert!(keys.contains(&"site.role".to_string()), "{keys:?}");
    }
}
