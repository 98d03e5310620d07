//! The DR site's rules for a cycle, as a pure state machine in the manner of quinn-proto's
//! `Connection`: the shell feeds it each message and does what the returned [`Action`]
//! says (serve hashes, receive a volume, write the group commit), then reports back. No
//! I/O, no clock: every rule here is a unit test.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use crate::config::Protection;
use crate::engine::chunk::{Geometry, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::ids::{Epoch, Gen, Point, VolumeName};
use crate::net::wire::Refusal;
use crate::replicate::error::ReceiveError;
use crate::replicate::messages::{CycleMsg, CycleStart};
use crate::store::schema::RECORD_VERSION;
use crate::store::{CommitRecord, PointRecord, ProtectionRecord, VolumeRecord};

/// Whether a primary at `epoch` may replicate into this protection now. Checked before the
/// protection's lock is taken (a stale peer must not disturb a cycle in flight) and again
/// under it.
pub fn admit(rec: &ProtectionRecord, failing_over: bool, epoch: Epoch) -> Result<(), ReceiveError> {
    if rec.failed_over.is_some() || failing_over {
        return Err(failed_over(rec));
    }
    if epoch < rec.epoch {
        return Err(ReceiveError::refuse(Refusal::StaleEpoch {
            ours: epoch,
            theirs: rec.epoch,
        }));
    }
    Ok(())
}

/// [`admit`] and [`receives`] together. A peer at a newer epoch while this site sends took
/// the failback this site asked for, before this site recorded its own turn: it is told
/// to retry (not a fence), where `admit` would fence it for this site's failover.
pub fn admit_peer(
    rec: &ProtectionRecord,
    configured_primary: bool,
    failing_over: bool,
    epoch: Epoch,
) -> Result<(), ReceiveError> {
    if !(rec.sends(configured_primary) && epoch > rec.epoch) {
        admit(rec, failing_over, epoch)?;
    }
    receives(rec, configured_primary)
}

/// Whether this site receives the protection now (see [`ProtectionRecord::sends`]); a
/// primary receives one only after a failback there. Checked after [`admit`]: a failed-over
/// site fences the peer instead.
pub fn receives(rec: &ProtectionRecord, configured_primary: bool) -> Result<(), ReceiveError> {
    if rec.sends(configured_primary) {
        return Err(ReceiveError::refuse(Refusal::NotReceiving(
            "this site sends the protection itself and receives it only after a failback there (`lifeboat failback` at this site)".into(),
        )));
    }
    Ok(())
}

/// The refusal a primary gets once this site failed over (or is failing over).
pub fn failed_over(rec: &ProtectionRecord) -> ReceiveError {
    ReceiveError::refuse(Refusal::FailedOver {
        epoch: rec.epoch,
        gen: rec.point_gen(),
    })
}

pub fn check_chunk_size(cs: u32) -> Result<(), ReceiveError> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(ReceiveError::protocol(format!(
            "chunk size {cs} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
        )));
    }
    Ok(())
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this site's hashes of the replica at `path`: the index of gen `known` when the
    /// consistent point has one at this chunk size, else a fresh scan of the replica.
    /// Report back with [`Receiving::hashes_served`].
    ServeHashes {
        volume: VolumeName,
        path: PathBuf,
        chunk_size: u32,
        known: Option<Gen>,
    },
    /// Receive the volume's chunks until its `End`, against the index of `base_gen`.
    /// Report back with [`Receiving::staged`].
    Receive {
        volume: VolumeName,
        replica: PathBuf,
        geometry: Geometry,
        base_gen: Gen,
    },
    /// Nothing to do; read the next message.
    Next,
    /// Every volume and the manifests are staged: write the group commit, apply it, and
    /// acknowledge.
    Commit {
        commit: CommitRecord,
        manifests: Option<Vec<u8>>,
    },
}

/// One staged volume, as the shell reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Staged {
    pub log: PathBuf,
    pub record: VolumeRecord,
    pub fresh: bool,
}

/// A cycle at the DR site between `Cycle` and `Commit`.
#[derive(Debug)]
pub struct Receiving {
    /// The group: the protection with the cycle's volumes (Kubernetes: the PVCs of the
    /// primary's selection this cycle).
    group: Protection,
    point: Point,
    base: Option<Point>,
    /// The consistent point.
    have: Option<PointRecord>,
    /// Volumes whose replicas are under repair: their index is not to be trusted, so they
    /// resync against a scan of the replica.
    repair: BTreeSet<VolumeName>,
    /// Volumes whose hashes were exchanged (a resync), and the index gen they diff against.
    bases: HashMap<VolumeName, Gen>,
    /// Between an `Action::Receive` and its report.
    receiving: Option<VolumeName>,
    /// Volumes whose movers joined the cycle with a stream of their own, until staged.
    joined: BTreeSet<VolumeName>,
    staged: BTreeMap<VolumeName, Staged>,
    manifests: Option<Vec<u8>>,
}

impl Receiving {
    /// The primary's plan arrives after `Prepared`: its base must be this site's consistent
    /// point (or none, for a resync), and its volumes the protection's group.
    pub fn start(
        prot: &Protection,
        have: Option<PointRecord>,
        repair: BTreeSet<VolumeName>,
        start: CycleStart,
    ) -> Result<Receiving, ReceiveError> {
        let have_point = have.as_ref().map(|p| p.point);
        if start.base.is_some() && start.base != have_point {
            return Err(ReceiveError::refuse(Refusal::BaseMismatch {
                sent: start.base,
                have: have_point,
            }));
        }
        let group = prot.with_volumes(start.volumes.iter().map(|v| v.name.as_str()));
        let expected: BTreeSet<&str> = group.volumes.iter().map(|v| v.name.as_str()).collect();
        let sent: BTreeSet<&str> = start.volumes.iter().map(|v| v.name.as_str()).collect();
        if sent != expected || sent.len() != start.volumes.len() {
            let names = || expected.iter().copied().collect::<Vec<_>>().join(", ");
            return Err(match sent.iter().find(|v| !expected.contains(*v)) {
                Some(v) => ReceiveError::refuse(Refusal::UnknownVolume(v.to_string(), names())),
                None => ReceiveError::protocol(format!(
                    "the cycle sends volumes [{}] but this site's group is [{}]",
                    start
                        .volumes
                        .iter()
                        .map(|v| v.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    names()
                )),
            });
        }
        Ok(Receiving {
            group,
            point: start.point,
            base: start.base,
            have,
            repair,
            bases: HashMap::new(),
            receiving: None,
            joined: BTreeSet::new(),
            staged: BTreeMap::new(),
            manifests: None,
        })
    }

    pub fn group(&self) -> &Protection {
        &self.group
    }

    pub fn point(&self) -> Point {
        self.point
    }

    /// A message the cycle does not take at this point.
    pub fn unexpected(&self, what: &str) -> ReceiveError {
        ReceiveError::protocol(format!(
            "unexpected {what} during the cycle of gen {}",
            self.point.gen
        ))
    }

    /// The next message of the cycle.
    pub fn handle(&mut self, msg: CycleMsg) -> Result<Action, ReceiveError> {
        if let Some(v) = &self.receiving {
            // The shell reports each volume before the next message; one that does not
            // has broken the protocol on the primary's behalf.
            return Err(ReceiveError::protocol(format!(
                "a message arrived while volume {v} is still being received"
            )));
        }
        match msg {
            CycleMsg::HashRequest { volume, chunk_size } => {
                let Some(v) = self.group.volume(&volume) else {
                    return Err(ReceiveError::protocol(format!(
                        "hash request for unknown volume {volume:?}"
                    )));
                };
                check_chunk_size(chunk_size)?;
                let known = self.known_index(&volume, chunk_size);
                Ok(Action::ServeHashes {
                    volume: v.name.clone(),
                    path: v.path.clone(),
                    chunk_size,
                    known,
                })
            }
            CycleMsg::Begin {
                volume,
                size,
                chunk_size,
            } => {
                let v = match self.group.volume(&volume) {
                    Some(v)
                        if !self.staged.contains_key(volume.as_str())
                            && !self.joined.contains(volume.as_str()) =>
                    {
                        v.clone()
                    }
                    _ => {
                        return Err(ReceiveError::protocol(format!(
                            "unexpected Begin for volume {volume:?}"
                        )))
                    }
                };
                check_chunk_size(chunk_size)?;
                let base_gen = match self.bases.get(volume.as_str()) {
                    Some(g) => *g,
                    None if self.repair.contains(volume.as_str()) => {
                        return Err(ReceiveError::protocol(format!(
                            "volume {volume} is under repair at this site: its hashes must be exchanged before Begin"
                        )))
                    }
                    None => self
                        .have
                        .as_ref()
                        .filter(|p| self.base == Some(p.point))
                        .filter(|p| p.volume_at(&volume, chunk_size).is_some())
                        .map(|p| p.point.gen)
                        .ok_or_else(|| {
                            ReceiveError::refuse(Refusal::BaseMismatch {
                                sent: self.base,
                                have: self.have.as_ref().map(|p| p.point),
                            })
                        })?,
                };
                self.receiving = Some(v.name.clone());
                Ok(Action::Receive {
                    volume: v.name,
                    replica: v.path,
                    geometry: Geometry::new(size, chunk_size),
                    base_gen,
                })
            }
            CycleMsg::Manifests(bundle) if self.group.kubernetes.is_some() => {
                crate::k8s::bundle::Bundle::decode(&bundle).map_err(|e| {
                    ReceiveError::protocol(format!(
                        "manifest bundle of gen {}: {e:#}",
                        self.point.gen
                    ))
                })?;
                self.manifests = Some(bundle);
                Ok(Action::Next)
            }
            CycleMsg::Manifests(_) => Err(self.unexpected("Manifests")),
            CycleMsg::Commit(gen) if gen == self.point.gen => self.commit(),
            CycleMsg::Commit(_) => Err(self.unexpected("Commit")),
        }
    }

    /// The index gen this site can serve hashes of `volume` from: the consistent point's,
    /// unless the volume is under repair or was replicated at another chunk size.
    fn known_index(&self, volume: &str, chunk_size: u32) -> Option<Gen> {
        self.have
            .as_ref()
            .filter(|p| p.volume_at(volume, chunk_size).is_some())
            .filter(|_| !self.repair.contains(volume))
            .map(|p| p.point.gen)
    }

    /// A mover joins with `volume` on a stream of its own. It always exchanges hashes
    /// first (a mover has no index of its own), so what it needs is what
    /// [`Action::ServeHashes`] says; its chunks then diff against the served gen, and the
    /// shell reports it with [`Receiving::joined_staged`].
    pub fn join(&mut self, volume: &str, chunk_size: u32) -> Result<Action, ReceiveError> {
        // A volume already joined may join again: the newer attempt supersedes the older
        // stream (its mover died without the connection saying so yet).
        let v = match self.group.volume(volume) {
            Some(v)
                if !self.staged.contains_key(volume)
                    && self.receiving.as_ref().map(|v| v.as_str()) != Some(volume) =>
            {
                v.clone()
            }
            Some(_) => {
                return Err(ReceiveError::protocol(format!(
                    "volume {volume} of the cycle of gen {} is already staged or received in the cycle stream",
                    self.point.gen
                )))
            }
            None => {
                return Err(ReceiveError::protocol(format!(
                    "a mover joined with volume {volume:?}, which is not in the cycle of gen {}",
                    self.point.gen
                )))
            }
        };
        check_chunk_size(chunk_size)?;
        self.joined.insert(v.name.clone());
        Ok(Action::ServeHashes {
            known: self.known_index(volume, chunk_size),
            volume: v.name,
            path: v.path,
            chunk_size,
        })
    }

    /// A joined volume's stream failed: the cycle cannot commit without it (its mover's
    /// Job retries it in a new stream).
    pub fn join_failed(&mut self, volume: &str) {
        self.joined.remove(volume);
    }

    /// A joined volume is staged, its chunks diffed against `base_gen`'s index.
    pub fn joined_staged(&mut self, volume: VolumeName, base_gen: Gen, staged: Staged) {
        if self.joined.remove(volume.as_str()) {
            self.bases.insert(volume.clone(), base_gen);
            self.staged.insert(volume, staged);
        }
    }

    /// The shell sent the hashes of `volume`; its chunks diff against `gen`'s index.
    pub fn hashes_served(&mut self, volume: VolumeName, gen: Gen) {
        self.bases.insert(volume, gen);
    }

    /// The shell staged the volume it was told to receive.
    pub fn staged(&mut self, staged: Staged) {
        if let Some(v) = self.receiving.take() {
            self.staged.insert(v, staged);
        }
    }

    fn commit(&mut self) -> Result<Action, ReceiveError> {
        let group = self.group.volumes.len();
        if let Some(v) = self.joined.iter().next() {
            return Err(ReceiveError::protocol(format!(
                "Commit while the mover of volume {v} is still sending"
            )));
        }
        if self.staged.len() != group {
            return Err(ReceiveError::protocol(format!(
                "Commit after {} of {group} volumes",
                self.staged.len()
            )));
        }
        if self.group.kubernetes.is_some() && self.manifests.is_none() {
            return Err(ReceiveError::protocol(format!(
                "Commit of gen {} without its manifest bundle (a Kubernetes protection's gen commits its data and manifests together)",
                self.point.gen
            )));
        }
        let staged = std::mem::take(&mut self.staged);
        let commit = CommitRecord {
            v: RECORD_VERSION,
            point: PointRecord {
                point: self.point,
                volumes: staged
                    .iter()
                    .map(|(k, s)| (k.clone(), s.record.clone()))
                    .collect(),
            },
            fresh: staged
                .iter()
                .filter(|(_, s)| s.fresh)
                .map(|(k, _)| k.clone())
                .collect(),
            logs: staged.into_iter().map(|(k, s)| (k, s.log)).collect(),
            repaired: self
                .repair
                .iter()
                .filter(|v| self.bases.contains_key(*v))
                .cloned()
                .collect(),
        };
        Ok(Action::Commit {
            commit,
            manifests: self.manifests.take(),
        })
    }
}
