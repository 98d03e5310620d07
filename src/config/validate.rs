//! Validation: the raw serde structs ([`super::raw`]) become the validated types of
//! [`super`], and every semantic problem is reported, each with its key path, instead of
//! stopping at the first. The `[kubernetes]` parts are in [`super::kubernetes`].

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::paths::{PathUse, Use};
use super::raw::{RawConfig, RawProtection};
use super::{
    Config, Keep, Peer, Problem, Protection, Refine, Role, Scrub, SnapshotMode, Volume,
    DEFAULT_KEEP_FOR, DEFAULT_SCRUB_EVERY, DEFAULT_SCRUB_RATE,
};
use crate::engine::chunk::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::ids::{ProtectionName, VolumeName};
use crate::net::tls::TlsFiles;

pub(super) struct Validator {
    /// The config file's directory: relative paths are resolved against it.
    pub(super) base: PathBuf,
    pub(super) problems: Vec<Problem>,
    /// Paths noted for the same-place check ([`super::paths`]).
    pub(super) uses: Vec<PathUse>,
    /// Also check what files say about themselves (a private key's mode): for `run` and
    /// `check-config`, not for commands that only read the config's values.
    pub(super) check_files: bool,
}

pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
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
    pub(super) fn choice<T: Copy>(
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

    pub(super) fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    pub(super) fn path(&mut self, key: &str, s: &str) -> PathBuf {
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

    pub(super) fn addr(&mut self, key: &str, s: &str) -> SocketAddr {
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

    pub(super) fn config(&mut self, raw: RawConfig, file: &Path) -> Config {
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
        self.path_use(
            Use::StateDir,
            "site.state_dir".into(),
            Some(&raw.site.state_dir),
            &state_dir,
            None,
        );
        let staging_dir = match &raw.site.staging_dir {
            Some(s) => self.path("site.staging_dir", s),
            None => state_dir.join("staging"),
        };
        self.path_use(
            Use::StagingDir,
            "site.staging_dir".into(),
            raw.site.staging_dir.as_deref(),
            &staging_dir,
            None,
        );
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
        if self.check_files {
            if let Some(loose) = crate::net::tls::loose_key(&tls.key) {
                self.problem("tls.key", loose);
            }
        }
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
        let listen_peer = raw.listen.as_ref().and_then(|l| l.peer.clone());
        if let Some(p) = &listen_peer {
            if p == &raw.site.name {
                self.problem(
                    "listen.peer",
                    format!("{p:?} is this site's own name; expected the primary site's name"),
                );
            }
        }
        let (control, control_clients) = self.control(raw.control.as_ref());
        let mut names = HashSet::new();
        let all_names: Vec<String> = raw.protections.iter().map(|p| p.name.clone()).collect();
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
        self.check_path_uses(&all_names);
        let kubernetes = self.kube_settings(
            raw.kubernetes.as_ref(),
            protections.iter().any(|p| p.kubernetes.is_some()),
        );
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
            listen_peer,
            control,
            control_clients,
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
        self.path_use(
            Use::SnapshotDir,
            format!("{key}.snapshot_dir"),
            p.snapshot_dir.as_deref(),
            &snapshot_dir,
            Some(&p.name),
        );
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
            self.path_use(
                Use::Volume,
                format!("{vkey}.path"),
                Some(&v.path),
                &path,
                Some(&p.name),
            );
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
        let keep_for = p
            .keep_for
            .as_deref()
            .map(|s| dur(self, "keep_for", &Some(s.to_string()), DEFAULT_KEEP_FOR));
        let apply_delay = p
            .apply_delay
            .as_deref()
            .map(|s| dur(self, "apply_delay", &Some(s.to_string()), Duration::ZERO));
        let scrub = match p.scrub_every.as_deref().map(str::trim) {
            Some("off") => None,
            every => Some(Scrub {
                every: every.map_or(DEFAULT_SCRUB_EVERY, |s| {
                    dur(
                        self,
                        "scrub_every",
                        &Some(s.to_string()),
                        DEFAULT_SCRUB_EVERY,
                    )
                }),
                rate: match p
                    .scrub_rate
                    .as_deref()
                    .map(|r| parse_size(r.trim().trim_end_matches("/s")))
                {
                    None => DEFAULT_SCRUB_RATE,
                    Some(Ok(n)) if n > 0 => n,
                    Some(Ok(_)) => {
                        self.problem(format!("{key}.scrub_rate"), "is zero; expected bytes per second such as \"16MiB/s\", or scrub_every = \"off\"");
                        DEFAULT_SCRUB_RATE
                    }
                    Some(Err(e)) => {
                        self.problem(
                            format!("{key}.scrub_rate"),
                            format!("{e}; expected bytes per second such as \"16MiB/s\""),
                        );
                        DEFAULT_SCRUB_RATE
                    }
                },
            }),
        };
        if p.keep == Some(0) {
            self.problem(
                format!("{key}.keep"),
                "is 0; expected how many recovery points the DR site keeps, at least 1",
            );
        }
        let keep = Keep::new(p.keep.map(|k| k.max(1)), keep_for, interval, apply_delay);
        if let Some(d) = apply_delay.filter(|d| !d.is_zero()) {
            let reach = keep.reach(interval);
            if d >= reach {
                self.problem(
                    format!("{key}.apply_delay"),
                    format!(
                        "is {}, but the points kept reach back {} (keep = {}{}, interval {}); expected a delay shorter than that, or more points kept",
                        humantime::format_duration(d),
                        humantime::format_duration(reach),
                        keep.count,
                        keep.window.map_or(String::new(), |w| format!(", keep_for {}", humantime::format_duration(w))),
                        humantime::format_duration(interval),
                    ),
                );
            }
        }
        Protection {
            keep,
            apply_delay,
            scrub,
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
}
