//! The primary's context: the shared state plus its link to the DR site.

use std::ops::Deref;
use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::site::peer::PeerLink;
use crate::site::Shared;

pub struct Primary {
    shared: Arc<Shared>,
    pub peer: PeerLink,
    /// Work off the cycle's path (removing old snapshots), drained at shutdown.
    pub background: TaskTracker,
    /// Mover Jobs of every protection at once (`[kubernetes] max_movers`).
    pub movers: Arc<tokio::sync::Semaphore>,
    /// Per protection, the CSI snapshots of the gen it last acknowledged: the next
    /// cycle's base, which its movers read for refinement.
    pub csi_bases: std::sync::Mutex<std::collections::HashMap<String, crate::k8s::cut::CutSet>>,
}

impl Deref for Primary {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Primary {
    pub fn new(shared: Arc<Shared>, peer: PeerLink, background: TaskTracker) -> Primary {
        let max = shared.config.max_movers();
        Primary {
            shared,
            peer,
            background,
            movers: Arc::new(tokio::sync::Semaphore::new(max)),
            csi_bases: Default::default(),
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}
