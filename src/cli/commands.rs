//! The commands that are more than one control API call: failover through the daemon or,
//! when it is down, directly on the state store; planned failover's first half at the
//! primary; export; and the helpers they share.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use super::{Output, Target};
use crate::api::{
    Client, CycleReport, Exported, FailoverOptions, FailoverReport, Step, Unreachable,
};
use crate::config::{self, ConfigError};

/// A client of the site named by `--control`, or by the `[control]` address of `--config`.
/// The token is `--token-file`'s, else (with `--config` alone) the most powerful one of
/// the config's clients that this user can read.
pub(super) fn client(target: &Target) -> Result<Client> {
    let cfg = target.config.as_deref().map(load_config).transpose()?;
    let addr = match (&target.control, &cfg) {
        (Some(a), _) => a.clone(),
        (None, Some(c)) => c.control.to_string(),
        (None, None) => bail!("say which site: --config FILE or --control HOST:PORT"),
    };
    // A config's own tokens go only to that config's address, never to --control's.
    let token = match (&target.token_file, &cfg, &target.control) {
        (Some(f), _, _) => Some(token(f)?),
        (None, Some(c), None) => c
            .cli_token_files()
            .into_iter()
            .find_map(|f| config::read_token(f).ok()),
        _ => None,
    };
    Ok(Client::at(&addr).with_token(token))
}

fn token(file: &std::path::Path) -> Result<String> {
    config::read_token(file).map_err(|e| anyhow::anyhow!("--token-file: {e}"))
}

/// Prints a report as JSON or as text.
pub(super) fn show<T: serde::Serialize>(
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

pub(super) fn load_config(path: &std::path::Path) -> Result<config::Config> {
    config::load(path).map_err(|e: ConfigError| anyhow::anyhow!("{e}"))
}

/// Failover through the daemon, or directly on the state store when the daemon is down
/// (the usual case in a real disaster is that the DR daemon is fine, but not always).
pub(super) fn failover(
    target: &Target,
    protection: &str,
    opts: &FailoverOptions,
) -> Result<FailoverReport> {
    let client = client(target)?;
    let mut path = format!(
        "/v1/protections/{protection}/failover?dry_run={}&ready_timeout_secs={}",
        opts.dry_run, opts.ready_timeout_secs
    );
    if let Some(g) = opts.gen {
        path.push_str(&format!("&gen={g}"));
    }
    if opts.latest {
        path.push_str("&latest=true");
    }
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

/// Re-protect through the daemon, or on the state store when it is down.
pub(super) fn reprotect(target: &Target, protection: &str) -> Result<Vec<String>> {
    let client = client(target)?;
    match client.post::<Vec<String>>(&format!("/v1/protections/{protection}/reprotect")) {
        Ok(r) => Ok(r),
        Err(e) if e.downcast_ref::<Unreachable>().is_some() && target.config.is_some() => {
            eprintln!("{e}; working directly on the state store");
            offline(target, |shared| async move {
                match shared.config.role {
                    config::Role::Dr => {
                        let dr = crate::site::dr::Dr::new(shared);
                        crate::lifecycle::reprotect::dr(&dr, protection).await
                    }
                    config::Role::Primary => {
                        crate::lifecycle::reprotect::primary(&shared, protection).await
                    }
                }
            })
        }
        Err(e) => Err(e),
    }
}

/// Planned failover's first half, at the primary: scale the workloads down, then a final
/// cycle, so the DR site's consistent point has everything written before.
pub(super) fn planned_steps(
    primary: &str,
    token_file: Option<&std::path::Path>,
    protection: &str,
) -> Result<Vec<Step>> {
    let client = Client::at(primary).with_token(token_file.map(token).transpose()?);
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

/// A planned failover's last step: the old primary fails back, so it receives from now
/// on. Its failure is reported as the step, not as the failover's: the application runs
/// here either way, and `lifeboat failback` there can be run again.
pub(super) fn planned_failback(
    primary: &str,
    token_file: Option<&std::path::Path>,
    protection: &str,
) -> Step {
    let t = std::time::Instant::now();
    let done = token_file.map(token).transpose().and_then(|tok| {
        Client::at(primary)
            .with_token(tok)
            .post::<crate::api::FailbackReport>(&format!("/v1/protections/{protection}/failback"))
    });
    let what = match done {
        Ok(r) => format!(
            "the old primary failed back: it receives {protection} from now on ({} chunks of its own discarded)",
            r.discarded_chunks
        ),
        Err(e) => format!(
            "the old primary did not fail back ({e:#}); run `lifeboat failback --protection {protection}` there"
        ),
    };
    Step {
        what,
        seconds: t.elapsed().as_secs_f64(),
    }
}

/// Runs `f` on a site's state opened from the config file, for when the daemon is down.
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
        let db = cfg.state_dir.join("db");
        let store = tokio::task::spawn_blocking(move || crate::store::Store::open(&db)).await??;
        let shared = std::sync::Arc::new(crate::site::Shared::open(cfg, store).await?);
        f(shared).await
    })
}

pub(super) fn export(
    target: &Target,
    protection: &str,
    gen: Option<u64>,
    standby: bool,
    secrets: bool,
) -> Result<Exported> {
    let client = client(target)?;
    let mut path =
        format!("/v1/protections/{protection}/manifests?standby={standby}&secrets={secrets}");
    if let Some(g) = gen {
        path.push_str(&format!("&gen={g}"));
    }
    match client.get(&path) {
        Ok(r) => Ok(r),
        Err(e) if e.downcast_ref::<Unreachable>().is_some() && target.config.is_some() => {
            eprintln!("{e}; reading the state store directly");
            offline(target, |shared| async move {
                crate::lifecycle::standby::export(&shared, protection, gen, standby, secrets).await
            })
        }
        Err(e) => Err(e),
    }
}

/// `lifeboat rbac`: both sites' RBAC for a primary config's Kubernetes protections.
pub(super) fn rbac(
    config_file: &std::path::Path,
    service_account: &str,
    bind_cluster_roles: Vec<String>,
    out: Option<&std::path::Path>,
) -> Result<ExitCode> {
    use crate::k8s::rbac::{generate, to_yaml, RbacOptions};
    let cfg = load_config(config_file)?;
    let kps: Vec<_> = cfg
        .protections
        .iter()
        .filter_map(|p| p.kubernetes.as_ref())
        .collect();
    if kps.is_empty() {
        bail!(
            "{}: no Kubernetes protection (give the primary's config)",
            config_file.display()
        );
    }
    let Some((ns, name)) = service_account.split_once('/') else {
        bail!("--service-account {service_account:?}: expected NAMESPACE/NAME");
    };
    let opts = RbacOptions {
        service_account: (ns.into(), name.into()),
        bind_cluster_roles,
    };
    let r = generate(&kps, &opts)?;
    let from = format!(
        "Made by `lifeboat rbac --config {}`.",
        config_file.display()
    );
    let files = [
        (
            "primary",
            format!("The primary site's RBAC. {from}"),
            &r.primary,
        ),
        ("dr", format!("The DR site's RBAC. {from}"), &r.dr),
    ];
    for (site, header, docs) in files {
        let yaml = to_yaml(&header, docs)?;
        match out {
            Some(dir) => {
                let path = dir.join(site).join("rbac.yaml");
                std::fs::create_dir_all(dir.join(site))?;
                std::fs::write(&path, yaml).with_context(|| format!("write {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            None => print!("# {site}/rbac.yaml\n{yaml}---\n"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
