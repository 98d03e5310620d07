//! What the DR site checks before every cycle, under the protection's lock and at the cost
//! of a `stat` per replica: a fence beside any replica (the site failed over, whatever its
//! state store says), and each replica against the stamp lifeboat took when it last wrote
//! it. A replica that differs is not trusted: the cycle fails naming it, and the next one
//! resyncs it by hash exchange.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;

use crate::config::Protection;
use crate::ids::VolumeName;
use crate::store::ProtectionRecord;
use crate::volume::fence::{self, Fence};
use crate::volume::stamp::{self, Observed};

/// The protection's replicas as of its consistent point (Kubernetes: the point's PVCs).
pub fn group(prot: &Protection, rec: &ProtectionRecord) -> Protection {
    match &rec.point {
        Some(p) => prot.with_volumes(p.volumes.keys().map(|v| v.as_str())),
        None => prot.clone(),
    }
}

/// The first fence found beside a replica of `group`.
pub fn fences(group: &Protection) -> Result<Option<Fence>> {
    for v in &group.volumes {
        if let Some(f) = fence::read(&v.path)? {
            return Ok(Some(f));
        }
    }
    Ok(None)
}

/// Replicas that differ from their stamps, each with what was found. Replicas already
/// under repair, and replicas lifeboat has not stamped yet, are not checked.
pub fn damaged(group: &Protection, rec: &ProtectionRecord) -> BTreeMap<VolumeName, String> {
    let mut out = BTreeMap::new();
    for v in &group.volumes {
        let Some(was) = rec.replicas.get(v.name.as_str()) else {
            continue;
        };
        if rec.repair.contains_key(v.name.as_str()) {
            continue;
        }
        let found = match stamp::observe(&v.path) {
            Ok(now) => stamp::compare(was, &now),
            Err(e) => Some(format!("it cannot be read: {e}")),
        };
        if let Some(what) = found {
            out.insert(
                v.name.clone(),
                format!("replica {} ({}): {what}", v.name, v.path.display()),
            );
        }
    }
    out
}

/// The stamp of a replica lifeboat has just written and fsynced.
pub fn stamp_of(path: &Path) -> Result<Option<stamp::Stamp>> {
    Ok(match stamp::observe(path)? {
        Observed::Is(s) => Some(s),
        _ => None,
    })
}
