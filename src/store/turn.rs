//! Failback turns a protection around: the site where it failed over (the application runs
//! there) starts sending it, and the old primary starts receiving it. A [`Turn`] in the
//! record says which way the protection goes from this site once that happened; without
//! one, the site's configured role says. The changes are pure functions of the record, as
//! in [`super::records`].
//!
//! The fields of a record mean what they mean for the site's current direction: a sending
//! site's `point` is its acknowledged base, a receiving site's is its consistent point. So
//! a turn resets what no longer applies: the site that starts receiving forgets its base
//! and marks every volume for repair (its first cycle resyncs by hash exchange against what
//! it still holds); the site that starts sending keeps its consistent point, which the peer
//! does not have, so its first cycle resyncs as well.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::ProtectionRecord;
use crate::ids::{Epoch, Gen, VolumeName};

/// This site's direction for a protection, set by a failback.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// This site sends the protection (the application runs here).
    pub sends: bool,
    pub at_ms: u64,
    /// The other site's name.
    pub peer: String,
    /// The receiving site's fork: what it held beyond the last common gen, kept aside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<Fork>,
    /// Forks of this site's earlier failbacks, still on disk until the operator removes
    /// them: a later turn does not make them nameless.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<Fork>,
}

impl Turn {
    /// Every fork this site kept, newest last.
    pub fn forks(&self) -> impl Iterator<Item = &Fork> {
        self.earlier.iter().chain(self.fork.iter())
    }

    fn into_forks(self) -> Vec<Fork> {
        let mut all = self.earlier;
        all.extend(self.fork);
        all
    }
}

/// Writes the old primary took after the last gen the DR site had (the fork): counted, and
/// kept in a snapshot before the first cycle of the new direction overwrites them.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Fork {
    /// The gen the writes were counted against (the last common gen when this site still
    /// had its index, else its newest acknowledged one); None: no gen was ever common.
    pub gen: Option<Gen>,
    /// Divergent chunks and their bytes, per volume.
    pub volumes: BTreeMap<VolumeName, ForkVolume>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ForkVolume {
    pub chunks: u64,
    pub bytes: u64,
    /// The snapshot of the volume as it was before the turn.
    pub kept: PathBuf,
}

impl Fork {
    pub fn chunks(&self) -> u64 {
        self.volumes.values().map(|v| v.chunks).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.volumes.values().map(|v| v.bytes).sum()
    }

    /// "N chunks (B bytes) written at SITE after gen G are discarded; kept in ...".
    pub fn describe(&self, site: &str) -> String {
        let after = self.gen.map_or("with no gen in common".to_string(), |g| {
            format!("after gen {g}")
        });
        let kept: Vec<String> = self
            .volumes
            .iter()
            .map(|(v, f)| format!("{v}: {}", f.kept.display()))
            .collect();
        format!(
            "{} chunks ({} bytes) written at {site} {after} are discarded; the volumes as they were are kept in {}",
            self.chunks(),
            self.bytes(),
            kept.join(", ")
        )
    }
}

impl ProtectionRecord {
    /// Whether this site sends the protection now; `configured_primary` is the site's role.
    pub fn sends(&self, configured_primary: bool) -> bool {
        self.turn.as_ref().map_or(configured_primary, |t| t.sends)
    }

    /// The failed-over site accepts a failback from `peer`: it sends from now on, at a new
    /// epoch, which it returns. Asked again (the answer was lost), it returns the same
    /// epoch. Refused where the protection is not failed over: the peer is still the
    /// application's site, and taking its place would lose its writes.
    pub fn turn_to_sender(&mut self, peer: &str, at_ms: u64) -> Result<Epoch> {
        if self
            .turn
            .as_ref()
            .is_some_and(|t| t.sends && t.peer == peer)
        {
            return Ok(self.epoch);
        }
        if self.failed_over.is_none() {
            bail!("the protection is not failed over here: this site still receives it, and the application runs at {peer}; nothing to fail back");
        }
        self.epoch = Epoch(self.epoch.0 + 1);
        let earlier = self.turn.take().map(Turn::into_forks).unwrap_or_default();
        self.turn = Some(Turn {
            sends: true,
            at_ms,
            peer: peer.to_string(),
            fork: None,
            earlier,
        });
        Ok(self.epoch)
    }

    /// The old primary (or any site that sent the protection) receives it from `peer` from
    /// now on, at `epoch`. Its base and fence go; each of `volumes` is marked for repair, so
    /// the first cycle resyncs it by hash exchange; `fork` is what it discards.
    pub fn turn_to_receiver(
        &mut self,
        peer: &str,
        epoch: Epoch,
        at_ms: u64,
        volumes: &[VolumeName],
        fork: Fork,
    ) {
        self.epoch = self.epoch.max(epoch);
        self.point = None;
        self.tentative = None;
        self.fenced = None;
        self.failed_over = None;
        self.reprotect = false;
        self.replicas.clear();
        for v in volumes {
            self.repair.insert(
                v.clone(),
                format!("failback: resync from {peer} by hash exchange"),
            );
        }
        let earlier = self.turn.take().map(Turn::into_forks).unwrap_or_default();
        self.turn = Some(Turn {
            sends: false,
            at_ms,
            peer: peer.to_string(),
            fork: Some(fork),
            earlier,
        });
    }

    /// The gen the fork is counted against: the gen the peer failed over at, when this
    /// site holds its index (as its base, or as a tentative gen whose acknowledgement was
    /// lost), else this site's base.
    pub fn fork_base(&self, peer_gen: Option<Gen>) -> Option<&super::PointRecord> {
        self.point
            .iter()
            .chain(self.tentative.iter())
            .find(|p| Some(p.point.gen) == peer_gen)
            .or(self.point.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{CycleId, Point};
    use crate::store::{FailoverRecord, FenceRecord, PointRecord};

    fn point(gen: u64) -> PointRecord {
        PointRecord {
            point: Point {
                gen: Gen(gen),
                cycle: CycleId(gen),
                taken_at_ms: gen,
            },
            volumes: BTreeMap::new(),
        }
    }

    fn fork() -> Fork {
        Fork {
            gen: Some(Gen(4)),
            volumes: BTreeMap::from([(
                VolumeName::new("v").unwrap(),
                ForkVolume {
                    chunks: 3,
                    bytes: 3 << 16,
                    kept: "/f/v".into(),
                },
            )]),
        }
    }

    #[test]
    fn only_a_failed_over_site_turns_to_sending_and_asking_twice_gives_one_epoch() {
        let mut dr = ProtectionRecord {
            epoch: Epoch(2),
            point: Some(point(4)),
            ..Default::default()
        };
        assert!(!dr.sends(false));
        let err = dr.turn_to_sender("a", 9).unwrap_err().to_string();
        assert!(err.contains("not failed over"), "{err}");
        assert_eq!(dr.epoch, Epoch(2));
        dr.failed_over = Some(FailoverRecord {
            at_ms: 1,
            gen: Some(Gen(4)),
            snapshot_taken_at_ms: None,
        });
        assert_eq!(dr.turn_to_sender("a", 9).unwrap(), Epoch(3));
        assert_eq!(dr.turn_to_sender("a", 10).unwrap(), Epoch(3));
        assert!(dr.sends(false));
        // Its consistent point stays: the gens it sends continue from it.
        assert_eq!(dr.point_gen(), Some(Gen(4)));
    }

    #[test]
    fn the_old_primary_forgets_its_base_and_fence_and_repairs_every_volume() {
        let mut p = ProtectionRecord {
            epoch: Epoch(1),
            point: Some(point(3)),
            tentative: Some(point(4)),
            fenced: Some(FenceRecord {
                at_ms: 1,
                message: "fenced".into(),
            }),
            ..Default::default()
        };
        assert!(p.sends(true));
        assert_eq!(p.fork_base(Some(Gen(4))).unwrap().point.gen, Gen(4));
        assert_eq!(p.fork_base(Some(Gen(9))).unwrap().point.gen, Gen(3));
        let v = VolumeName::new("v").unwrap();
        p.turn_to_receiver("b", Epoch(3), 5, std::slice::from_ref(&v), fork());
        assert!(!p.sends(true));
        assert_eq!(p.epoch, Epoch(3));
        assert!(p.point.is_none() && p.tentative.is_none() && p.fenced.is_none());
        assert!(p.repair[&v].contains("failback"));
        let text = p
            .turn
            .as_ref()
            .unwrap()
            .fork
            .as_ref()
            .unwrap()
            .describe("a");
        assert!(
            text.starts_with("3 chunks (196608 bytes) written at a after gen 4 are discarded"),
            "{text}"
        );
        // Turned around again (a relocate), then failed back once more: both forks stay named.
        p.failed_over = Some(FailoverRecord {
            at_ms: 6,
            gen: None,
            snapshot_taken_at_ms: None,
        });
        p.turn_to_sender("b", 7).unwrap();
        assert_eq!(p.turn.as_ref().unwrap().forks().count(), 1);
        p.turn_to_receiver("b", Epoch(6), 8, std::slice::from_ref(&v), fork());
        assert_eq!(p.turn.as_ref().unwrap().forks().count(), 2);
    }
}
