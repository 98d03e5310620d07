//! The command line: clap definitions and the dispatch of each command.
//!
//! Files:
//! - `mod.rs`: the clap definitions ([`Cli`], [`Command`], ...), [`init_tracing`], [`run`].
//! - `commands.rs`: what the commands do beyond one API call: failover (through the daemon
//!   or, with it down, on the state store), planned failover's first half, export.
//! - `render.rs`: the text form of status, cycle and failover reports.
//! - `demo.rs`: `lifeboat demo`, two sites on this machine.

mod commands;
pub mod demo;
mod drill;
mod mover;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

use commands::{client, export, failover, planned_failback, planned_steps, rbac, reprotect, show};
pub use render::{
    human_bytes, render_cycle, render_failback, render_failover, render_points, render_status,
    render_verify,
};

use crate::api::{
    CycleReport, FailbackReport, FailoverOptions, PointsReport, SiteStatus, VerifyReport,
};
use crate::config;

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
    /// A file holding the bearer token to send (see [[control.client]]). Default with
    /// --config: the token file of the config's most powerful client, if readable.
    #[arg(long, env = "LIFEBOAT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
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
        /// Recover this retained recovery point (`lifeboat points` lists them) instead of
        /// the default: the newest, or with `apply_delay` the newest that old.
        #[arg(long, conflicts_with_all = ["planned", "latest"])]
        gen: Option<u64>,
        /// Recover the newest point even where `apply_delay` makes an older one the
        /// default.
        #[arg(long, conflicts_with = "planned")]
        latest: bool,
        /// The primary is reachable: scale its workloads down and run a final cycle first,
        /// so nothing written before is lost. Needs --primary.
        #[arg(long, requires = "primary")]
        planned: bool,
        /// The primary daemon's control address (HOST:PORT), for --planned.
        #[arg(long)]
        primary: Option<String>,
        /// A file holding the bearer token for the primary's control API (an admin
        /// caller there), for --planned.
        #[arg(long, requires = "primary")]
        primary_token_file: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// After a failover, protect in the original direction again: run it at the DR site
    /// (removes the fences beside the replicas, takes replication again) and at the old
    /// primary (lifts its fence). The DR site's writes since the failover are NOT kept:
    /// its replicas are resynced from the primary. Works with the daemon stopped.
    Reprotect {
        #[command(flatten)]
        target: Target,
        #[arg(short, long)]
        protection: String,
    },
    /// After a failover, at the old primary: the site the protection failed over to (the
    /// application runs there) sends it from now on, and this site receives it into its own
    /// volumes, at a higher epoch. Only chunks that differ travel: the first cycle resyncs
    /// by hash exchange, never a full copy. Writes this site took after the last gen the DR
    /// site had (the fork) are reported ("N chunks written at SITE after gen G are
    /// discarded") and kept in `.lifeboat-forks/` beside the volumes before anything
    /// overwrites them. Then `failover --planned` here brings the application back with
    /// nothing lost. Both sites need [listen] and [peer], each naming the other.
    /// Local-mode protections only in this release.
    Failback {
        #[command(flatten)]
        target: Target,
        #[arg(short, long)]
        protection: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// List the recovery points the DR site keeps (gen, when taken, age, size, held),
    /// oldest first; `failover --gen N` recovers any of them.
    Points {
        #[command(flatten)]
        target: Target,
        #[arg(short, long)]
        protection: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// At the DR site: re-read every replica of the consistent point and compare its
    /// chunks with the DR index, naming each divergent chunk range. Divergent volumes are
    /// marked for repair (the next cycle resyncs them) unless --no-repair. Exits 1 when
    /// anything differs. Waits for a running cycle of the protection. (The daemon also
    /// scrubs in the background: `scrub_every`, `scrub_rate`.)
    Verify {
        #[command(flatten)]
        target: Target,
        #[arg(short, long)]
        protection: String,
        /// Only report; leave the volumes as they are.
        #[arg(long)]
        no_repair: bool,
        /// Verify this kept recovery point's files (`lifeboat points` lists them)
        /// instead of the replicas; a damaged point is reported, not repaired.
        #[arg(long)]
        gen: Option<u64>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// At the DR site, while replication goes on: copy a recovery point (the newest, or
    /// --gen N) beside the replicas by reflink, run --check against the copies, remove
    /// them (unless --keep). Reports each step's time (the recovery time the drill
    /// measured); exits 1 when the check fails. Nothing the check writes reaches a replica,
    /// a point or the primary.
    Drill(Box<drill::DrillArgs>),
    /// Pin recovery point --gen against pruning (it stays beyond `keep` until released),
    /// e.g. the last point before a suspected corruption.
    Hold {
        #[command(flatten)]
        target: Target,
        #[arg(short, long)]
        protection: String,
        #[arg(long)]
        gen: u64,
    },
    /// Unpin a held recovery point: the next commit prunes it if it is beyond `keep`.
    Release {
        #[command(flatten)]
        target: Target,
        #[arg(short, long)]
        protection: String,
        #[arg(long)]
        gen: u64,
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
        /// Leave Secret data out (each Secret is annotated lifeboat.io/redacted), for a
        /// caller below admin or a bundle that must not hold Secrets.
        #[arg(long)]
        no_secrets: bool,
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
        /// Also copy each site's files into its Kustomize overlay, DIR/SITE/tls/ (ca.pem,
        /// site.pem, site.key), where the overlay's secretGenerator reads them; DIR is
        /// deploy/kubernetes. The CA key stays in --out.
        #[arg(long, value_name = "DIR")]
        kubernetes: Option<PathBuf>,
    },
    /// Check a config file and report every problem at once, each with its key.
    CheckConfig { config: PathBuf },
    /// Print (or write into --out as primary/rbac.yaml and dr/rbac.yaml) both sites'
    /// least-privilege RBAC for the primary's config: per-namespace RoleBindings, the
    /// custom resources it declares, pre-created DR namespaces.
    Rbac {
        /// The primary site's config (it has the selections).
        #[arg(short, long)]
        config: PathBuf,
        /// The daemons' ServiceAccount, NAMESPACE/NAME.
        #[arg(long, default_value = "lifeboat/lifeboat")]
        service_account: String,
        /// A ClusterRole the protected namespaces' RoleBindings refer to (repeatable).
        #[arg(long = "bind-clusterrole")]
        bind_cluster_roles: Vec<String>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Two sites on this machine: initial sync, incremental cycles under a writer,
    /// failover, and a blake3 proof that the recovered replica equals its snapshot.
    Demo(demo::DemoArgs),
    /// Kubernetes mode, run by the primary's daemon as a Job (not by hand): move one
    /// volume of a running cycle from its snapshot, attached as a block device, to the
    /// DR site over the pair's mutual TLS, and write the outcome as JSON to --result.
    Mover(Box<mover::MoverArgs>),
}

pub fn init_tracing(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: a log file or journald gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `hold` or `release` a recovery point through the DR daemon.
fn hold(target: &Target, protection: &str, gen: u64, action: &str) -> Result<ExitCode> {
    let path = format!("/v1/protections/{protection}/points/{gen}/{action}");
    let r: PointsReport = client(target)?.post(&path)?;
    show(Output::Text, &r, render_points)
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            // With the files' checks (a private key's mode), so `run` refuses what
            // `check-config` reports.
            let cfg = config::load_for_run(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(crate::daemon::run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => match config::load_for_run(&config) {
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
        Command::Certs {
            out,
            sites,
            sans,
            kubernetes,
        } => {
            if let Some(dir) = &kubernetes {
                crate::net::tls::check_overlays(dir, &sites)?;
            }
            let g = crate::net::tls::generate(&out, &sites, &sans)?;
            println!(
                "pair CA: {} (keep {} offline)",
                g.ca_cert.display(),
                g.ca_key.display()
            );
            for (site, f) in &g.sites {
                println!(
                    "site {site}: cert {} key {}",
                    f.cert.display(),
                    f.key.display()
                );
            }
            if let Some(dir) = &kubernetes {
                for (site, tls) in crate::net::tls::write_overlays(&g, dir)? {
                    println!("site {site}: overlay files in {}", tls.display());
                }
                println!("{}", render::OVERLAY_TLS_GENERATOR);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { target, output } => {
            let s: SiteStatus = client(&target)?.get("/v1/status")?;
            show(output, &s, render_status)
        }
        Command::Sync {
            target,
            protection,
            output,
        } => {
            let r: CycleReport =
                client(&target)?.post(&format!("/v1/protections/{protection}/sync"))?;
            show(output, &r, |r| render_cycle(r) + "\n")
        }
        Command::Failover {
            target,
            protection,
            dry_run,
            ready_timeout,
            gen,
            latest,
            planned,
            primary,
            primary_token_file,
            output,
        } => {
            let opts = FailoverOptions {
                gen,
                latest,
                dry_run,
                ready_timeout_secs: ready_timeout.as_secs().max(1),
            };
            let mut before = Vec::new();
            if let (true, Some(addr), false) = (planned, &primary, dry_run) {
                before = planned_steps(addr, primary_token_file.as_deref(), &protection)?;
            }
            let mut r = failover(&target, &protection, &opts)?;
            r.steps.splice(0..0, before);
            // A planned failover of a local protection is a relocate: the old side fails
            // back at once, so replication goes on in the new direction.
            if let (true, Some(addr), false, None) = (planned, &primary, dry_run, &r.kubernetes) {
                r.steps.push(planned_failback(
                    addr,
                    primary_token_file.as_deref(),
                    &protection,
                ));
            }
            show(output, &r, render_failover)?;
            // Failed over, but not everything is running: a script must not read success.
            Ok(if r.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Points {
            target,
            protection,
            output,
        } => {
            let r: PointsReport =
                client(&target)?.get(&format!("/v1/protections/{protection}/points"))?;
            show(output, &r, render_points)
        }
        Command::Verify {
            target,
            protection,
            no_repair,
            gen,
            output,
        } => {
            let mut path = format!("/v1/protections/{protection}/verify?repair={}", !no_repair);
            if let Some(g) = gen {
                path += &format!("&gen={g}");
            }
            let r: VerifyReport = client(&target)?.post(&path)?;
            show(output, &r, render_verify)?;
            let clean = r.volumes.iter().all(|v| v.divergent.is_empty());
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Drill(args) => drill::run(*args),
        Command::Hold {
            target,
            protection,
            gen,
        } => hold(&target, &protection, gen, "hold"),
        Command::Release {
            target,
            protection,
            gen,
        } => hold(&target, &protection, gen, "release"),
        Command::Failback {
            target,
            protection,
            output,
        } => {
            let r: FailbackReport =
                client(&target)?.post(&format!("/v1/protections/{protection}/failback"))?;
            show(output, &r, render_failback)
        }
        Command::Reprotect { target, protection } => {
            for line in reprotect(&target, &protection)? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            target,
            protection,
            gen,
            standby,
            no_secrets,
            dir,
        } => {
            let e = export(&target, &protection, gen, standby, !no_secrets)?;
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
        Command::Rbac {
            config,
            service_account,
            bind_cluster_roles,
            out,
        } => rbac(
            &config,
            &service_account,
            bind_cluster_roles,
            out.as_deref(),
        ),
        Command::Demo(args) => demo::run(args),
        Command::Mover(args) => mover::run(*args),
    }
}
