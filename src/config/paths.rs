//! Paths that must not be the same place. Two keys naming one file under different
//! spellings (`replicas/../replicas/r.img`, a directory reached through a symlink) would
//! have two protections write one replica, or one protection's staging cleanup remove
//! another's snapshots. So every state_dir, staging_dir, snapshot_dir and volume path is
//! resolved as the kernel would (symlinks followed where they exist, `.` and `..` taken
//! lexically where they do not) and compared in two ways:
//!
//! 1. the same place named twice: two volumes, a volume and a directory, or two of the
//!    directories (a snapshot_dir shared by protections is fine: each has its own
//!    subdirectory);
//! 2. the places lifeboat writes (the state store `state_dir/db`, each protection's
//!    `staging_dir/NAME` and `snapshot_dir/NAME`, and each volume) nested in each other,
//!    such as a replica inside the state store or a state_dir inside a volume.
//!
//! The config keeps the paths as written; only the comparison uses the resolved ones.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use super::validate::Validator;

/// What a configured path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Use {
    StateDir,
    StagingDir,
    SnapshotDir,
    Volume,
}

/// One configured path, with the key it came from.
#[derive(Debug)]
pub(super) struct PathUse {
    pub(super) key: String,
    /// As written; `None` when the key was left out and the default applies.
    pub(super) spelled: Option<String>,
    pub(super) path: PathBuf,
    pub(super) kind: Use,
    /// The protection of a snapshot_dir or a volume.
    pub(super) protection: Option<String>,
}

impl PathUse {
    /// The value as written, or the default's resolved path.
    fn value(&self) -> String {
        match &self.spelled {
            Some(s) => format!("{s:?}"),
            None => format!("(default {})", self.path.display()),
        }
    }

    fn named(&self) -> String {
        format!("{} {}", self.key, self.value())
    }
}

/// `path` made absolute and resolved: each existing symlink replaced by its target (so `..`
/// after it climbs from where it really points), `.` dropped, `..` taken lexically where
/// nothing exists. Symlink chains deeper than 40 are left as they are, as the kernel
/// would refuse them anyway.
pub(super) fn resolve(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    resolve_into(&mut out, &abs, 0);
    out
}

fn resolve_into(out: &mut PathBuf, path: &Path, depth: u32) {
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => *out = PathBuf::from(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                out.push(name);
                if depth < 40 {
                    if let Ok(target) = std::fs::read_link(&*out) {
                        out.pop();
                        resolve_into(out, &target, depth + 1);
                    }
                }
            }
        }
    }
}

/// A place lifeboat writes, derived from a configured path.
struct Area {
    owner: usize,
    path: PathBuf,
    what: String,
}

impl Validator {
    /// Notes a configured path for [`Validator::check_path_uses`].
    pub(super) fn path_use(
        &mut self,
        kind: Use,
        key: String,
        spelled: Option<&str>,
        path: &Path,
        protection: Option<&str>,
    ) {
        self.uses.push(PathUse {
            key,
            spelled: spelled.map(str::to_string),
            path: resolve(path),
            kind,
            protection: protection.map(str::to_string),
        });
    }

    /// Reports each noted path that is the same place as an earlier one, or nests
    /// lifeboat's writes in an earlier one's; each problem names both keys. A path gets at
    /// most one problem (against the first it collides with: fixing that shows the next).
    /// `protections` are the names whose staging subdirectories the staging_dir holds.
    pub(super) fn check_path_uses(&mut self, protections: &[String]) {
        let uses = std::mem::take(&mut self.uses);
        let mut reported: HashSet<usize> = HashSet::new();
        for (j, b) in uses.iter().enumerate() {
            let earlier = uses[..j].iter().find(|a| {
                a.path == b.path && !(a.kind == Use::SnapshotDir && b.kind == Use::SnapshotDir)
            });
            if let Some(a) = earlier {
                let noun = match (a.kind, b.kind) {
                    (Use::Volume, Use::Volume) => "file",
                    (Use::Volume, _) | (_, Use::Volume) => "path",
                    _ => "directory",
                };
                let both = match (&a.spelled, &b.spelled) {
                    (Some(x), Some(y)) if x != y => format!(" (both are {})", b.path.display()),
                    _ => String::new(),
                };
                let message = format!("{} is the same {noun} as {}{both}", b.value(), a.named());
                self.problem(b.key.clone(), message);
                reported.insert(j);
            }
        }
        let areas = areas(&uses, protections);
        for (n, b) in areas.iter().enumerate() {
            for a in &areas[..n] {
                let (i, j) = (a.owner.min(b.owner), a.owner.max(b.owner));
                if i == j || reported.contains(&j) {
                    continue;
                }
                let (first, later) = if a.owner < b.owner { (a, b) } else { (b, a) };
                let relation = if later.path == first.path {
                    "the same place as"
                } else if later.path.starts_with(&first.path) {
                    "inside"
                } else if first.path.starts_with(&later.path) {
                    "around"
                } else {
                    continue;
                };
                let message = format!(
                    "{}: {} {} would be {relation} {} {} of {}",
                    uses[j].value(),
                    later.what,
                    later.path.display(),
                    first.what,
                    first.path.display(),
                    uses[i].named()
                );
                self.problem(uses[j].key.clone(), message);
                reported.insert(j);
            }
        }
    }
}

/// The places lifeboat writes, by the configured path each comes from.
fn areas(uses: &[PathUse], protections: &[String]) -> Vec<Area> {
    let mut out = Vec::new();
    for (owner, u) in uses.iter().enumerate() {
        let mut area = |path: PathBuf, what: String| out.push(Area { owner, path, what });
        match u.kind {
            Use::StateDir => area(u.path.join("db"), "the state store".into()),
            Use::StagingDir => {
                for p in protections {
                    area(
                        u.path.join(p),
                        format!("the staging logs of protection {p:?}"),
                    );
                }
            }
            Use::SnapshotDir => {
                if let Some(p) = &u.protection {
                    area(u.path.join(p), format!("the snapshots of protection {p:?}"));
                }
            }
            Use::Volume => area(u.path.clone(), "the volume".into()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_are_taken_lexically_and_symlinks_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let d = resolve(dir.path());
        std::fs::create_dir(d.join("real")).unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
        std::os::unix::fs::symlink("real/r.img", d.join("rel-link")).unwrap();
        assert_eq!(resolve(&d.join("a/./b/../c")), d.join("a/c"));
        assert_eq!(resolve(&d.join("link/r.img")), d.join("real/r.img"));
        // `..` after a symlink climbs from its target, as the kernel does.
        std::fs::create_dir(d.join("real/sub")).unwrap();
        std::os::unix::fs::symlink(d.join("real/sub"), d.join("deep")).unwrap();
        assert_eq!(resolve(&d.join("deep/../x")), d.join("real/x"));
        // A symlink whose target does not exist yet still counts.
        assert_eq!(resolve(&d.join("rel-link")), d.join("real/r.img"));
        assert_eq!(resolve(Path::new("/../x")), Path::new("/x"));
    }
}
