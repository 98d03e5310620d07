//! What a restart does with what was in flight. DR site: a gen with a group-commit record is
//! re-applied (idempotent redo) and becomes the consistent point; staged but uncommitted
//! volumes are discarded. Primary: indexes and snapshots other than the base and the
//! tentative gen are removed. Either way the replicas stay at one consistent point.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::{Config, Protection, Role};
use crate::failpoint;
use crate::ids::Gen;
use crate::store::{Batch, CommitRecord, Store};
use crate::volume::{replica, snapshot};

pub fn staging_dir(config: &Config, prot: &str) -> PathBuf {
    config.staging_dir.join(prot)
}

/// Runs at start-up, before the site accepts or sends anything.
pub fn recover(store: &Store, config: &Config) -> Result<()> {
    for p in &config.protections {
        let name = p.name.as_str();
        match config.role {
            Role::Dr => {
                finish_pending(store, config, p)?;
                discard_staging(store, config, p)?;
            }
            Role::Primary => {
                let rec = store.protection(name)?.unwrap_or_default();
                let keep: Vec<Gen> = rec
                    .point
                    .iter()
                    .chain(rec.tentative.iter())
                    .map(|r| r.point.gen)
                    .collect();
                let mut b = Batch::default();
                store.drop_index_except(name, &keep, &mut b)?;
                store.write(b, true)?;
                snapshot::prune(p, &keep)?;
            }
        }
    }
    Ok(())
}

/// Re-applies every committed but unfinished gen of `prot`.
pub fn finish_pending(store: &Store, config: &Config, prot: &Protection) -> Result<()> {
    for commit in store.commits(prot.name.as_str())? {
        tracing::info!(protection = %prot.name, gen = %commit.point.point.gen, "finishing a committed gen (redo)");
        redo_commit(store, config, prot, &commit)?;
    }
    Ok(())
}

/// Applies a committed gen's staging logs to the replicas and makes it the consistent point.
pub fn redo_commit(
    store: &Store,
    config: &Config,
    prot: &Protection,
    commit: &CommitRecord,
) -> Result<()> {
    let name = prot.name.as_str();
    let gen = commit.point.point.gen;
    let prot = prot.with_volumes(commit.logs.keys().map(String::as_str));
    for v in &prot.volumes {
        let Some(log) = commit.logs.get(v.name.as_str()) else {
            continue;
        };
        failpoint::hit(&format!("dr-applying:{}", v.name));
        if commit.fresh.contains(v.name.as_str()) {
            replica::install(Path::new(log), &v.path).with_context(|| {
                format!(
                    "install gen {gen} as replica {} ({})",
                    v.name,
                    v.path.display()
                )
            })?;
            continue;
        }
        replica::apply(Path::new(log), &v.path).with_context(|| {
            format!(
                "apply gen {gen} to replica {} ({})",
                v.name,
                v.path.display()
            )
        })?;
    }
    let mut rec = store.protection(name)?.unwrap_or_default();
    rec.point = Some(commit.point.clone());
    let mut b = Batch::default();
    store.drop_index_except(name, &[gen], &mut b)?;
    b.put_protection(name, &rec).delete_commit(name, gen);
    store.write(b, true)?;
    remove_dir(&staging_dir(config, name))?;
    Ok(())
}

/// Drops staged volumes of uncommitted gens, their logs and their partial indexes.
pub fn discard_staging(store: &Store, config: &Config, prot: &Protection) -> Result<()> {
    let name = prot.name.as_str();
    if !store.commits(name)?.is_empty() {
        // Never discard the logs of a committed gen; finish_pending must run first.
        anyhow::bail!("protection {name} has a committed gen that is not applied yet");
    }
    let rec = store.protection(name)?.unwrap_or_default();
    let mut b = Batch::default();
    for (gen, vol, _) in store.staged(name)? {
        b.delete_staged(name, gen, &vol);
    }
    let keep: Vec<Gen> = rec.point.iter().map(|p| p.point.gen).collect();
    store.drop_index_except(name, &keep, &mut b)?;
    let staged: Vec<String> = store.staged(name)?.into_iter().map(|(_, v, _)| v).collect();
    store.write(b, true)?;
    let known = rec
        .point
        .iter()
        .flat_map(|p| p.volumes.keys())
        .chain(&staged);
    let prot = prot.with_volumes(known.map(String::as_str));
    for v in &prot.volumes {
        let fresh = replica::fresh_path(&v.path);
        match std::fs::remove_file(&fresh) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", fresh.display())),
        }
    }
    remove_dir(&staging_dir(config, name))
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", dir.display())),
    }
}
