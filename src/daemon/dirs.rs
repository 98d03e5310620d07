//! The daemon's own directories, made private before anything is written to them: the
//! state store, snapshots and staging logs hold copies of the protected data.
//!
//! - `state_dir` is lifeboat's alone: created with mode 0700, and an existing one open to
//!   group or others is tightened to 0700 (with a warning naming the old mode). Tightening
//!   rather than refusing, because nothing but lifeboat has business there and an upgrade
//!   should not stop a site over it.
//! - `staging_dir` and each `snapshot_dir` may be an operator's mount point or a directory
//!   on the volumes' file system (for reflink), shared with others: created with mode 0700
//!   when missing, left as they are when they exist. What lifeboat creates inside them
//!   (per protection and gen) is 0700 ([`crate::volume::create_private_dir`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::{Config, Keep, Role};
use crate::volume::create_private_dir;

pub fn prepare(config: &mut Config) -> Result<()> {
    let state = &config.state_dir;
    match std::fs::metadata(state) {
        Ok(m) if !m.is_dir() => bail!("state_dir {} is not a directory", state.display()),
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            let old = m.permissions().mode() & 0o7777;
            std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700)).with_context(
                || format!("make state_dir {} private (mode 0700)", state.display()),
            )?;
            tracing::warn!(
                state_dir = %state.display(),
                old_mode = %format!("{old:04o}"),
                "state_dir was open to group or others; set it to 0700"
            );
        }
        Ok(_) => {}
        Err(_) => create(state, "state_dir")?,
    }
    // Each half makes only the directories it writes: a primary with [listen] receives
    // (stages) after a failback, a DR site with [peer] sends (snapshots).
    if config.role == Role::Dr || config.listen.is_some() {
        create(&config.staging_dir, "staging_dir")?;
    }
    match config.role {
        Role::Dr => points_possible(config)?,
        // A primary receives only between a failback and the relocate that follows it:
        // it keeps the newest point, not a ladder of points no one prunes afterwards.
        Role::Primary => {
            for p in config.protections.iter_mut().filter(|p| p.keep.by_default) {
                p.keep = Keep::newest_only();
            }
        }
    }
    if config.role == Role::Primary || config.peer.is_some() {
        for p in &config.protections {
            create(&p.snapshot_dir, "snapshot_dir")?;
        }
    }
    Ok(())
}

/// File replicas keeping more than one recovery point need a file system that shares
/// extents. Asked for with `keep`/`keep_for`, that is refused at start, naming the
/// directory, rather than at the first point; the default (a day's worth) falls back to
/// the newest point only, with a warning that says why.
fn points_possible(config: &mut Config) -> Result<()> {
    for p in config
        .protections
        .iter_mut()
        .filter(|p| p.keep.count > 1 && p.csi().is_none())
    {
        let mut dirs: Vec<PathBuf> = p
            .volumes
            .iter()
            .filter_map(|v| v.path.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        for d in dirs {
            create_private_dir(&d).with_context(|| format!("create {}", d.display()))?;
            match crate::volume::points::probe(&d) {
                Ok(()) => {}
                Err(e) if p.keep.by_default => {
                    tracing::warn!(
                        protection = %p.name,
                        directory = %d.display(),
                        error = %format!("{e:#}"),
                        "{}", crate::volume::points::NEWEST_ONLY
                    );
                    p.keep = Keep::newest_only();
                    if p.apply_delay.is_some() {
                        bail!("protection {}: apply_delay needs older recovery points, which {} cannot hold (no reflink): put the replicas on XFS or btrfs", p.name, d.display());
                    }
                    break;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "protection {}: keep = {}{}",
                            p.name,
                            p.keep.count,
                            p.keep.window.map_or(String::new(), |w| format!(
                                ", keep_for = {}",
                                humantime::format_duration(w)
                            ))
                        )
                    })
                }
            }
        }
    }
    Ok(())
}

fn create(dir: &Path, key: &str) -> Result<()> {
    create_private_dir(dir).with_context(|| format!("create {key} {}", dir.display()))
}
