//! The DR site's context: per protection, one lock held by whichever changes its replicas
//! and record (a cycle's commit, a failover, the start-up redo). [`Locked`] is the proof of
//! holding it: the durable DR steps are methods of `Locked` or take it as an argument, so
//! code without the lock cannot commit a gen or fail over (as Garage's
//! `BlockManagerLocked` does for its blocks).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::{MutexGuard, Notify};
use tokio_util::sync::CancellationToken;

use crate::ids::{CycleId, Epoch, Gen, ProtectionName, VolumeName};
use crate::net::wire::{FrameReader, FrameWriter};
use crate::site::Shared;
use crate::store::{CommitRecord, ProtectionRecord, StagedVolume};
use crate::volume::fence::Fence;

/// Coordination of one protection at the DR site.
pub struct ProtectionLock {
    name: ProtectionName,
    lock: tokio::sync::Mutex<()>,
    /// Set first by failover, so a cycle in transfer gives up the lock quickly.
    failing_over: AtomicBool,
    /// Cancels the cycle in flight: a newer attempt from the primary supersedes it (after
    /// a kill -9 the old connection would otherwise hold the lock until its idle timeout).
    current: std::sync::Mutex<Option<CancellationToken>>,
    /// The running cycle that movers may join: its id, and where their streams go.
    joins: std::sync::Mutex<Option<(CycleId, tokio::sync::mpsc::Sender<JoinedStream>)>>,
    /// Verifies of CSI replicas waiting for their reader Job's hashes: (volume, gen) ->
    /// where the comparison goes.
    verifies: std::sync::Mutex<VerifyWaits>,
}

type VerifyWaits = HashMap<(String, Gen), tokio::sync::oneshot::Sender<ReaderCompared>>;

/// A reader Job's hashes of a CSI replica compared with the DR index.
#[derive(Debug, Default, Clone)]
pub struct ReaderCompared {
    pub chunks: u64,
    /// The chunks whose hashes differ (or that the index lacks).
    pub divergent: Vec<u64>,
}

/// A mover's stream of one volume, handed to the running cycle it joined.
pub struct JoinedStream {
    pub volume: String,
    pub chunk_size: u32,
    pub w: FrameWriter,
    pub r: FrameReader,
}

impl ProtectionLock {
    fn new(name: ProtectionName) -> Self {
        ProtectionLock {
            name,
            lock: tokio::sync::Mutex::new(()),
            failing_over: AtomicBool::new(false),
            current: std::sync::Mutex::new(None),
            joins: std::sync::Mutex::new(None),
            verifies: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Waits for the reader Job of `volume` at `gen`: its comparison arrives on the
    /// receiver (dropped unsent if the reader never connects).
    pub fn expect_reader(
        &self,
        volume: &str,
        gen: Gen,
    ) -> tokio::sync::oneshot::Receiver<ReaderCompared> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.verifies
            .lock()
            .expect("verify registry")
            .insert((volume.to_string(), gen), tx);
        rx
    }

    /// The verify a reader's stream answers, if one waits for it.
    pub fn reader_arrived(
        &self,
        volume: &str,
        gen: Gen,
    ) -> Option<tokio::sync::oneshot::Sender<ReaderCompared>> {
        self.verifies
            .lock()
            .expect("verify registry")
            .remove(&(volume.to_string(), gen))
    }

    /// Opens the running cycle `cycle` to movers; the returned receiver gets their
    /// streams until [`ProtectionLock::close_joins`] (or a newer cycle opens).
    pub fn open_joins(&self, cycle: CycleId) -> tokio::sync::mpsc::Receiver<JoinedStream> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        *self.joins.lock().expect("join registry") = Some((cycle, tx));
        rx
    }

    pub fn close_joins(&self, cycle: CycleId) {
        let mut j = self.joins.lock().expect("join registry");
        if j.as_ref().is_some_and(|(c, _)| *c == cycle) {
            *j = None;
        }
    }

    /// Where a mover's stream for `cycle` goes, if that cycle is running here.
    pub fn join(&self, cycle: CycleId) -> Option<tokio::sync::mpsc::Sender<JoinedStream>> {
        let j = self.joins.lock().expect("join registry");
        j.as_ref()
            .filter(|(c, _)| *c == cycle)
            .map(|(_, tx)| tx.clone())
    }

    pub fn failing_over(&self) -> bool {
        self.failing_over.load(Ordering::SeqCst)
    }

    /// Cancels the cycle in flight (if any) and registers a new one; `parent` is the
    /// daemon's token for cycles, so shutdown cancels it too.
    pub fn supersede(&self, parent: &CancellationToken) -> CancellationToken {
        let token = parent.child_token();
        if let Some(old) = self
            .current
            .lock()
            .expect("protection lock state")
            .replace(token.clone())
        {
            old.cancel();
        }
        token
    }

    /// Marks the protection as failing over and cancels the cycle in flight. The mark
    /// stays only once the returned flag is [`Failing::kept`] (the fence is durable):
    /// a failover that errs, or whose caller goes away, before that lets replication in
    /// again.
    pub fn begin_failover(&self) -> Failing<'_> {
        let was = self.failing_over.swap(true, Ordering::SeqCst);
        if let Some(old) = self.current.lock().expect("protection lock state").take() {
            old.cancel();
        }
        Failing {
            lock: self,
            keep: was,
        }
    }

    /// Re-protect: replication is taken again (the holder of the lock cleared the
    /// failover record).
    pub fn end_failover(&self, _locked: &Locked<'_>) {
        self.failing_over.store(false, Ordering::SeqCst);
    }

    pub async fn lock(&self) -> Locked<'_> {
        Locked {
            state: self,
            _guard: self.lock.lock().await,
        }
    }

    /// The lock, unless it stays held for `wait`.
    pub async fn lock_within(&self, wait: Duration) -> Option<Locked<'_>> {
        tokio::time::timeout(wait, self.lock()).await.ok()
    }
}

/// A failover in progress: see [`ProtectionLock::begin_failover`].
pub struct Failing<'a> {
    lock: &'a ProtectionLock,
    /// Leave the mark set when dropped: the fence is durable, or another failover set it.
    keep: bool,
}

impl Failing<'_> {
    /// The fence is durable: the mark stays.
    pub fn kept(&mut self) {
        self.keep = true;
    }
}

impl Drop for Failing<'_> {
    fn drop(&mut self) {
        if !self.keep {
            self.lock.failing_over.store(false, Ordering::SeqCst);
        }
    }
}

/// Holding a protection's lock.
pub struct Locked<'a> {
    state: &'a ProtectionLock,
    _guard: MutexGuard<'a, ()>,
}

impl Locked<'_> {
    pub fn name(&self) -> &ProtectionName {
        &self.state.name
    }

    pub fn failing_over(&self) -> bool {
        self.state.failing_over()
    }

    /// A primary of a newer epoch is accepted: the epoch is raised before anything of its
    /// cycle is staged.
    pub async fn raise_epoch(&self, shared: &Shared, epoch: Epoch) -> Result<ProtectionRecord> {
        shared
            .store
            .step(self.name(), move |s, p| s.raise_epoch(p, epoch))
            .await
    }

    /// One volume of the gen is staged (unsynced: the group commit syncs it).
    pub async fn record_staged(
        &self,
        shared: &Shared,
        gen: Gen,
        vol: VolumeName,
        staged: StagedVolume,
    ) -> Result<()> {
        shared
            .store
            .step(self.name(), move |s, p| {
                s.record_staged(p, gen, &vol, &staged)
            })
            .await
    }

    /// The group commit record: from its sync on, the gen must be applied.
    pub async fn commit_group(
        &self,
        shared: &Shared,
        commit: CommitRecord,
        manifests: Option<Vec<u8>>,
    ) -> Result<CommitRecord> {
        shared
            .store
            .step(self.name(), move |s, p| {
                s.commit_group(p, &commit, manifests)?;
                crate::failpoint::hit("dr-committed");
                Ok(commit)
            })
            .await
    }

    /// A fence found beside the replicas: the protection is failed over again in the store.
    pub async fn restore_fence(&self, shared: &Shared, fence: Fence) -> Result<ProtectionRecord> {
        shared
            .store
            .step(self.name(), move |s, p| s.restore_fence(p, &fence))
            .await
    }

    /// Replicas found changed outside lifeboat: the next cycle repairs them.
    pub async fn mark_repair(
        &self,
        shared: &Shared,
        found: BTreeMap<VolumeName, String>,
    ) -> Result<ProtectionRecord> {
        shared
            .store
            .step(self.name(), move |s, p| s.mark_repair(p, found))
            .await
    }

    /// Failover's fence: the epoch is raised (once). Returns the record and whether this
    /// call raised it.
    pub async fn fail_over(
        &self,
        shared: &Shared,
        at_ms: u64,
        chosen: Option<crate::ids::Point>,
    ) -> Result<(ProtectionRecord, bool)> {
        shared
            .store
            .step(self.name(), move |s, p| s.fail_over(p, at_ms, chosen))
            .await
    }
}

/// The DR site: the shared state plus the protections' locks.
pub struct Dr {
    shared: Arc<Shared>,
    locks: HashMap<ProtectionName, ProtectionLock>,
    /// One manifest apply (standby or active) at a time per site.
    pub manifests_lock: tokio::sync::Mutex<()>,
    /// Protections whose standby manifests are to be applied; the daemon's standby task
    /// takes them.
    pub standby: StandbyQueue,
    /// Writer Jobs of every protection at once (`[kubernetes] max_movers`).
    pub writers: tokio::sync::Semaphore,
}

/// Protections whose standby manifests wait to be applied. A set: a protection that
/// commits faster than its manifests apply is applied once, for its newest gen, and the
/// queue never holds more than one entry per protection.
#[derive(Default)]
pub struct StandbyQueue {
    pending: std::sync::Mutex<BTreeSet<ProtectionName>>,
    notify: Notify,
}

impl StandbyQueue {
    pub fn push(&self, prot: &ProtectionName) {
        self.pending
            .lock()
            .expect("standby queue")
            .insert(prot.clone());
        self.notify.notify_one();
    }

    /// The next protection to apply, waiting for one.
    pub async fn next(&self) -> ProtectionName {
        loop {
            if let Some(p) = self.pending.lock().expect("standby queue").pop_first() {
                return p;
            }
            self.notify.notified().await;
        }
    }
}

impl Deref for Dr {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Dr {
    pub fn new(shared: Arc<Shared>) -> Dr {
        let locks = shared
            .config
            .protections
            .iter()
            .map(|p| (p.name.clone(), ProtectionLock::new(p.name.clone())))
            .collect();
        let max = shared.config.max_movers();
        Dr {
            shared,
            writers: tokio::sync::Semaphore::new(max),
            locks,
            manifests_lock: tokio::sync::Mutex::new(()),
            standby: StandbyQueue::default(),
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The lock of a configured protection.
    pub fn lock_of(&self, prot: &str) -> Option<&ProtectionLock> {
        self.locks.get(prot)
    }

    /// Asks the standby task to apply the consistent gen's manifests of `prot`.
    pub fn request_standby(&self, prot: &ProtectionName) {
        self.standby.push(prot);
    }
}
