//! The command line: clap definitions, and the client side of the control API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;

use crate::api::{ApiError, CycleReport, FailoverReport, SiteStatus};
use crate::config::{self, ConfigError};

#[derive(Parser, Debug)]
#[command(
    name = "lifeboat",
    version,
    about = "Continuous disaster recovery between two sites",
    long_about = "Continuous disaster recovery between two sites.\n\n\
        A daemon runs at each site. The primary snapshots each protected group of volumes, \
        diffs it against the last replicated gen in blake3-hashed chunks and streams only \
        the changes over QUIC with mutual TLS; the DR site commits the whole group at once, \
        so its replicas always sit at one consistent point.\n\n\
        New here? Run `lifeboat demo` to watch two sites on this machine replicate and fail over.",
    after_help = "Typical set-up:\n  lifeboat certs --out certs --site primary --site dr\n  lifeboat check-config config/dr.toml && lifeboat run --config config/dr.toml\n  lifeboat run --config config/primary.toml\n  lifeboat status --config config/primary.toml\n  lifeboat failover --config config/dr.toml --protection NAME"
)]
pub struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. `info` or `lifeboat=debug`.
    #[arg(long, global = true, default_value = "info", env = "LIFEBOAT_LOG")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The site's config file (its [control] address is used).
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// The control API address (host:port), instead of --config.
    #[arg(long)]
    pub control: Option<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a site's daemon (primary or DR, as the config says).
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show each protection: role, consistent gen and its age, last cycle, errors, peer.
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Run a replication cycle now (at the primary) and wait for its result.
    Sync {
        #[command(flatten)]
        target: Target,
        #[arg(short, long)]
        protection: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Fail over a protection at the DR site: fence the old primary (raise the epoch) and
    /// leave the replicas at the consistent point. Kubernetes protections: apply that gen's
    /// manifests with the primary's replica counts, resume CronJobs, and wait until the
    /// workloads are ready. Prints each step and its time. Works with the daemon stopped.
    Failover {
        #[command(flatten)]
        target: Target,
        #[arg(short, long)]
        protection: String,
        /// Print the plan (epoch, gen, objects, scaling) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for workloads to report ready replicas.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        ready_timeout: Duration,
        /// The primary is reachable: scale its workloads down and run a final cycle first,
        /// so nothing written before is lost. Needs --primary.
        #[arg(long, requires = "primary")]
        planned: bool,
        /// The primary daemon's control address (HOST:PORT), for --planned.
        #[arg(long)]
        primary: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Write a gen's DR-ready manifests (Kubernetes protections) as YAML files, one per
    /// object, numbered in apply order: for review, or to commit to a GitOps repository.
    Export {
        #[command(flatten)]
        target: Target,
        #[arg(short, long)]
        protection: String,
        /// The gen (default: the consistent gen). The DR site keeps the last 16 gens.
        #[arg(long)]
        gen: Option<u64>,
        /// The standby form (workloads at zero, CronJobs suspended) instead of the form
        /// failover applies.
        #[arg(long)]
        standby: bool,
        /// Directory to write into (created if missing).
        dir: PathBuf,
    },
    /// Create a pair CA and a certificate for each site (keys are written with mode 0600).
    Certs {
        /// Directory to write ca.pem, ca.key, SITE.pem and SITE.key into.
        #[arg(long)]
        out: PathBuf,
        /// Site names; each becomes a certificate's DNS name (the peer's server_name).
        #[arg(long = "site", default_values_t = ["primary".to_string(), "dr".to_string()])]
        sites: Vec<String>,
        /// Extra DNS names or IP addresses for every site certificate.
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Check a config file and report every problem at once, each with its key.
    CheckConfig { config: PathBuf },
    /// Two sites on this machine: initial sync, incremental cycles under a writer,
    /// failover, and a blake3 proof that the recovered replica equals its snapshot.
    Demo(crate::demo::DemoArgs),
}

pub fn init_tracing(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            let cfg = load_config(&config)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(crate::daemon::run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => match config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} site {:?}, {} protection(s))",
                    config.display(),
                    c.role,
                    c.site_name,
                    c.protections.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(2))
            }
        },
        Command::Certs { out, sites, sans } => {
            let g = crate::net::tls::generate(&out, &sites, &sans)?;
            println!(
                "pair CA: {} (keep {} offline)",
                g.ca_cert.display(),
                g.ca_key.display()
            );
            for (site, f) in g.sites {
                println!(
                    "site {site}: cert {} key {}",
                    f.cert.display(),
                    f.key.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { target, output } => {
            let s: SiteStatus = Client::new(&target)?.get("/v1/status")?;
            show(output, &s, render_status)
        }
        Command::Sync {
            target,
            protection,
            output,
        } => {
            let r: CycleReport =
                Client::new(&target)?.post(&format!("/v1/protections/{protection}/sync"))?;
            show(output, &r, |r| render_cycle(r) + "\n")
        }
        Command::Failover {
            target,
            protection,
            dry_run,
            ready_timeout,
            planned,
            primary,
            output,
        } => {
            let opts = crate::api::FailoverOptions {
                dry_run,
                ready_timeout_secs: ready_timeout.as_secs().max(1),
            };
            let mut before = Vec::new();
            if let (true, Some(addr), false) = (planned, &primary, dry_run) {
                before = planned_steps(addr, &protection)?;
            }
            let mut r = failover(&target, &protection, &opts)?;
            r.steps.splice(0..0, before);
            show(output, &r, render_failover)
        }
        Command::Export {
            target,
            protection,
            gen,
            standby,
            dir,
        } => {
            let e = export(&target, &protection, gen, standby)?;
            let files = crate::k8s::bundle::export(&e.objects, &dir)?;
            println!(
                "wrote {} objects of gen {} ({} form) to {}",
                files.len(),
                e.gen,
                if e.standby { "standby" } else { "failover" },
                dir.display()
            );
            for w in &e.warnings {
                println!("warning: {w}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => crate::demo::run(args),
    }
}

/// Prints a report as JSON or as text.
fn show<T: serde::Serialize>(
    output: Output,
    value: &T,
    text: impl Fn(&T) -> String,
) -> Result<ExitCode> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Text => print!("{}", text(value)),
    }
    Ok(ExitCode::SUCCESS)
}

fn load_config(path: &std::path::Path) -> Result<config::Config> {
    config::load(path).map_err(|e: ConfigError| anyhow::anyhow!("{e}"))
}

/// Failover through the daemon, or directly on the state store when the daemon is down
/// (the usual case in a real disaster is that the DR daemon is fine, but not always).
fn failover(
    target: &Target,
    protection: &str,
    opts: &crate::api::FailoverOptions,
) -> Result<FailoverReport> {
    let client = Client::new(target)?;
    let path = format!(
        "/v1/protections/{protection}/failover?dry_run={}&ready_timeout_secs={}",
        opts.dry_run, opts.ready_timeout_secs
    );
    match client.post::<FailoverReport>(&path) {
        Ok(r) => Ok(r),
        Err(e) if e.downcast_ref::<Unreachable>().is_some() && target.config.is_some() => {
            eprintln!("{e}; failing over directly on the state store");
            offline(target, |shared| async move {
                let dr = crate::site::dr::Dr::new(shared);
                Ok(crate::lifecycle::failover::failover(&dr, protection, opts).await?)
            })
        }
        Err(e) => Err(e),
    }
}

/// Planned failover's first half, at the primary: scale the workloads down, then a final
/// cycle, so the DR site's consistent point has everything written before.
fn planned_steps(primary: &str, protection: &str) -> Result<Vec<crate::api::Step>> {
    use crate::api::Step;
    let client = Client::at(primary);
    let t = std::time::Instant::now();
    let done: Vec<String> = client
        .post(&format!("/v1/protections/{protection}/quiesce"))
        .context("planned failover: scale down the primary's workloads (drop --planned if the primary is lost)")?;
    let mut steps = vec![Step {
        what: format!("scale down the primary's workloads ({})", done.join(", ")),
        seconds: t.elapsed().as_secs_f64(),
    }];
    let t = std::time::Instant::now();
    let r: CycleReport = client
        .post(&format!("/v1/protections/{protection}/sync"))
        .context("planned failover: the final cycle")?;
    steps.push(Step {
        what: format!("final cycle: gen {} committed at the DR site", r.gen),
        seconds: t.elapsed().as_secs_f64(),
    });
    Ok(steps)
}

/// Runs `f` on a site opened from the config file, for when the daemon is down.
fn offline<T, F, Fut>(target: &Target, f: F) -> Result<T>
where
    F: FnOnce(std::sync::Arc<crate::site::Shared>) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let path = target
        .config
        .as_ref()
        .context("--config is needed to work without the daemon")?;
    let cfg = load_config(path)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let store = crate::store::Store::open(&cfg.state_dir.join("db"))?;
        let shared = std::sync::Arc::new(crate::site::Shared::open(cfg, store).await?);
        f(shared).await
    })
}

fn export(
    target: &Target,
    protection: &str,
    gen: Option<u64>,
    standby: bool,
) -> Result<crate::api::Exported> {
    let client = Client::new(target)?;
    let mut path = format!("/v1/protections/{protection}/manifests?standby={standby}");
    if let Some(g) = gen {
        path.push_str(&format!("&gen={g}"));
    }
    match client.get(&path) {
        Ok(r) => Ok(r),
        Err(e) if e.downcast_ref::<Unreachable>().is_some() && target.config.is_some() => {
            eprintln!("{e}; reading the state store directly");
            offline(target, |shared| async move {
                crate::lifecycle::standby::export(&shared, protection, gen, standby).await
            })
        }
        Err(e) => Err(e),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the lifeboat daemon is not reachable at {0} ({1})")]
struct Unreachable(String, String);

/// A small client of the control API.
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(target: &Target) -> Result<Client> {
        let addr = match (&target.control, &target.config) {
            (Some(a), _) => a.clone(),
            (None, Some(c)) => load_config(c)?.control.to_string(),
            (None, None) => bail!("say which site: --config FILE or --control HOST:PORT"),
        };
        Ok(Client::at(&addr))
    }

    pub fn at(addr: &str) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .into();
        Client {
            base: format!("http://{addr}"),
            agent,
        }
    }

    fn decode<T: DeserializeOwned>(
        &self,
        path: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T> {
        let mut resp = r.map_err(|e| Unreachable(self.base.clone(), e.to_string()))?;
        let status = resp.status();
        let body = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("read the answer to {path}"))?;
        if status.is_success() {
            serde_json::from_str(&body).with_context(|| format!("decode the answer to {path}"))
        } else {
            match serde_json::from_str::<ApiError>(&body) {
                Ok(e) => bail!("{}", e.error),
                Err(_) => bail!("{path}: HTTP {status}: {body}"),
            }
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.decode(path, self.agent.get(&format!("{}{path}", self.base)).call())
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.decode(
            path,
            self.agent
                .post(&format!("{}{path}", self.base))
                .send_empty(),
        )
    }

    pub fn get_text(&self, path: &str) -> Result<String> {
        let mut resp = self
            .agent
            .get(&format!("{}{path}", self.base))
            .call()
            .map_err(|e| Unreachable(self.base.clone(), e.to_string()))?;
        Ok(resp.body_mut().read_to_string()?)
    }
}

pub fn human_bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

pub fn render_cycle(r: &CycleReport) -> String {
    let resync: Vec<_> = r
        .volumes
        .iter()
        .filter(|v| v.resync)
        .map(|v| v.name.as_str())
        .collect();
    format!(
        "gen {} in {:.2}s: scanned {}, changed {}, sent {} in {} chunks ({} zero markers), {} on the wire{}",
        r.gen,
        r.seconds,
        human_bytes(r.bytes_scanned),
        human_bytes(r.bytes_changed),
        human_bytes(r.chunk_bytes_sent),
        r.chunks_sent,
        r.zero_chunks_sent,
        human_bytes(r.wire_bytes),
        if resync.is_empty() { String::new() } else { format!("; resynced by hash exchange: {}", resync.join(", ")) }
    )
}

pub fn render_status(s: &SiteStatus) -> String {
    let mut out = format!("site {} ({}), lifeboat {}\n", s.site, s.role, s.version);
    if let Some(p) = &s.peer {
        out += &format!(
            "peer {}: {}\n",
            p.address,
            if p.connected {
                "connected"
            } else {
                "not connected"
            }
        );
    }
    for p in &s.protections {
        out += &format!("\nprotection {}: {} at epoch {}\n", p.name, p.role, p.epoch);
        match (p.consistent_gen, p.consistent_age_seconds) {
            (Some(g), Some(age)) => {
                out += &format!(
                    "  consistent gen {g}, snapshot taken {age:.1}s ago (RPO target {}s)\n",
                    p.rpo_target_seconds
                )
            }
            _ => out += "  no consistent gen yet\n",
        }
        out += &format!("  activity: {}\n", p.activity);
        if let Some(c) = &p.last_cycle {
            out += &format!("  last cycle: {}\n", render_cycle(c));
        }
        if let Some(e) = &p.last_error {
            out += &format!("  last error ({}): {}\n", e.kind.as_str(), e.message);
        }
        if let Some(why) = &p.stopped_because {
            out += &format!("  replication stopped: {why}\n");
        }
        if let Some(r) = &p.last_refusal {
            out += &format!("  last refusal: {}\n", r.message);
        }
        if let Some(k) = &p.kubernetes {
            out += &render_kube(k);
        }
        for v in &p.volumes {
            out += &format!(
                "  volume {} at {}{}\n",
                v.name,
                v.path,
                v.size
                    .map(|s| format!(", {}", human_bytes(s)))
                    .unwrap_or_default()
            );
        }
    }
    out
}

pub fn render_failover(r: &FailoverReport) -> String {
    if r.dry_run {
        let mut out = format!(
            "dry run: failover of protection {} would (nothing was changed):\n",
            r.protection
        );
        for (i, s) in r.steps.iter().enumerate() {
            out += &format!("  {}. {}\n", i + 1, s.what);
        }
        match r.recovered_gen {
            Some(g) => out += &format!("recovering gen {g}\n"),
            None => out += "no gen was ever replicated: there is nothing to recover\n",
        }
        return out;
    }
    let mut out = if r.already_failed_over {
        format!(
            "protection {} was already failed over (epoch {})\n",
            r.protection, r.epoch
        )
    } else {
        format!(
            "failed over protection {} in {:.3}s; epoch is now {}\n",
            r.protection, r.seconds, r.epoch
        )
    };
    match (r.recovered_gen, r.age_seconds) {
        (Some(g), Some(a)) => out += &format!("recovered gen {g}, a snapshot taken {a:.1}s ago\n"),
        _ => out += "no gen was ever replicated: the replicas hold no recovered data\n",
    }
    for v in &r.replicas {
        out += &format!("  replica {}: {}\n", v.name, v.path);
    }
    if !r.steps.is_empty() {
        out += "steps (the recovery time):\n";
        for s in &r.steps {
            out += &format!("  {:>8.3}s  {}\n", s.seconds, s.what);
        }
    }
    if let Some(k) = &r.kubernetes {
        for s in &k.scaled {
            out += &format!("  scaled {s}\n");
        }
        for s in &k.resumed {
            out += &format!("  resumed {s}\n");
        }
        for w in &k.ready {
            out += &format!(
                "  ready: {} ({} replicas) after {:.3}s\n",
                w.workload, w.replicas, w.seconds
            );
        }
    }
    out
}

fn render_kube(k: &crate::api::KubeStatus) -> String {
    let mut out = String::new();
    let c = &k.covers;
    if !c.namespaces.is_empty() {
        out += &format!(
            "  kubernetes{}: namespaces {}; {} pods, {} PVCs, {} objects\n",
            k.gen.map(|g| format!(" (gen {g})")).unwrap_or_default(),
            c.namespaces.join(", "),
            c.pods.len(),
            c.pvcs.len(),
            c.objects.len()
        );
    }
    for p in &c.pods {
        out += &format!("    pod {p}\n");
    }
    for p in &c.pvcs {
        out += &format!("    pvc {p}\n");
    }
    for o in &c.objects {
        out += &format!("    {o}\n");
    }
    if let Some(a) = &k.applied {
        out += &format!(
            "  standby manifests applied: {} objects, {} changed, {} pruned\n",
            a.applied.len(),
            a.changed.len(),
            a.pruned.len()
        );
    }
    if let Some(e) = &k.apply_error {
        out += &format!("  standby manifests NOT applied: {e}\n");
    }
    for w in &k.warnings {
        out += &format!("  warning: {w}\n");
    }
    out
}
