//! The errors of a cycle, one type per side, with variants that say what the caller does
//! next: retry on a fresh connection, stop for good (fenced), tell the peer which refusal.
//! Each variant has one metric label ([`crate::metrics::ErrorKind`], a fixed set), in the
//! manner of controller-rs's `metric_label`.

use crate::engine::verify::Rejected;
use crate::metrics::ErrorKind;
use crate::net::wire::{Refusal, WireError};

/// Why a cycle failed at the primary.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    /// The DR site failed over: this primary is fenced and stops replicating the protection.
    #[error("{0}")]
    Fenced(String),
    /// The DR site refused the cycle (or its refinement stream) for a reason that does not
    /// fence; the next cycle may succeed.
    #[error("DR site refused {what}: {refusal}")]
    Refused {
        what: &'static str,
        refusal: Refusal,
    },
    /// The connection or stream to the DR site failed; retried on a fresh connection.
    #[error("{0:#}")]
    Link(anyhow::Error),
    /// The DR site answered out of protocol; retried on a fresh connection.
    #[error("{0}")]
    Protocol(String),
    /// A pre rule failed: no snapshot was taken.
    #[error("{0:#}")]
    Hook(anyhow::Error),
    #[error("{0:#}")]
    Snapshot(anyhow::Error),
    /// The cluster: selection, manifests, rules lookup.
    #[error("{0:#}")]
    Kubernetes(anyhow::Error),
    /// This site's files (reading a snapshot).
    #[error("{0:#}")]
    Io(anyhow::Error),
    /// This site's state store.
    #[error("{0:#}")]
    Store(anyhow::Error),
}

impl CycleError {
    pub fn metric_label(&self) -> ErrorKind {
        match self {
            CycleError::Fenced(_) => ErrorKind::Fenced,
            CycleError::Refused { .. } => ErrorKind::Refused,
            CycleError::Link(_) => ErrorKind::Peer,
            CycleError::Protocol(_) => ErrorKind::Protocol,
            CycleError::Hook(_) => ErrorKind::Hook,
            CycleError::Snapshot(_) => ErrorKind::Snapshot,
            CycleError::Kubernetes(_) => ErrorKind::Kubernetes,
            CycleError::Io(_) => ErrorKind::Io,
            CycleError::Store(_) => ErrorKind::Store,
        }
    }

    /// Whether the connection is suspect and the next cycle should make a new one.
    pub fn resets_link(&self) -> bool {
        matches!(self, CycleError::Link(_) | CycleError::Protocol(_))
    }

    pub fn link(e: impl Into<anyhow::Error>) -> Self {
        CycleError::Link(e.into())
    }

    pub fn store(e: impl Into<anyhow::Error>) -> Self {
        CycleError::Store(e.into())
    }

    pub fn unexpected(got: &'static str, expected: &'static str) -> Self {
        CycleError::Protocol(WireError::Unexpected { got, expected }.to_string())
    }
}

impl From<WireError> for CycleError {
    fn from(e: WireError) -> Self {
        CycleError::Link(e.into())
    }
}

/// Why the DR site stopped a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The primary's request is refused and it is told why; `kind` counts it.
    #[error("{refusal}")]
    Refused { refusal: Refusal, kind: ErrorKind },
    /// The stream or connection failed, or a newer attempt or a failover took over.
    #[error("{0:#}")]
    Link(anyhow::Error),
    /// This site's files or state store failed; the primary is told it could not store
    /// the cycle.
    #[error("{error:#}")]
    Local {
        kind: ErrorKind,
        error: anyhow::Error,
    },
}

impl ReceiveError {
    /// A refusal, counted by what it means for the primary.
    pub fn refuse(refusal: Refusal) -> Self {
        let kind = match refusal {
            Refusal::StaleEpoch { .. } | Refusal::FailedOver { .. } => ErrorKind::Fenced,
            Refusal::Invalid(_) => ErrorKind::Protocol,
            Refusal::Storage(_) => ErrorKind::Io,
            _ => ErrorKind::Refused,
        };
        ReceiveError::Refused { refusal, kind }
    }

    /// The primary broke the protocol.
    pub fn protocol(msg: impl Into<String>) -> Self {
        ReceiveError::Refused {
            refusal: Refusal::Invalid(msg.into()),
            kind: ErrorKind::Protocol,
        }
    }

    /// The primary sent data that fails verification: nothing of it reaches a replica.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        ReceiveError::Refused {
            refusal: Refusal::Invalid(msg.into()),
            kind: ErrorKind::Verify,
        }
    }

    /// A chunk of `volume` was rejected.
    pub fn rejected(volume: &str, r: Rejected) -> Self {
        Self::corrupt(format!(
            "volume {volume}: {r}; nothing of this gen was applied"
        ))
    }

    pub fn io(e: impl Into<anyhow::Error>) -> Self {
        ReceiveError::Local {
            kind: ErrorKind::Io,
            error: e.into(),
        }
    }

    pub fn store(e: impl Into<anyhow::Error>) -> Self {
        ReceiveError::Local {
            kind: ErrorKind::Store,
            error: e.into(),
        }
    }

    pub fn link(e: impl Into<anyhow::Error>) -> Self {
        ReceiveError::Link(e.into())
    }

    pub fn metric_label(&self) -> ErrorKind {
        match self {
            ReceiveError::Refused { kind, .. } | ReceiveError::Local { kind, .. } => *kind,
            ReceiveError::Link(_) => ErrorKind::Peer,
        }
    }

    /// What the primary is told (when it is still listening).
    pub fn told(&self) -> Refusal {
        match self {
            ReceiveError::Refused { refusal, .. } => refusal.clone(),
            ReceiveError::Local { error, .. } => Refusal::Storage(format!("{error:#}")),
            ReceiveError::Link(e) => Refusal::Invalid(format!("{e:#}")),
        }
    }
}

impl From<WireError> for ReceiveError {
    fn from(e: WireError) -> Self {
        ReceiveError::Link(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Epoch;

    #[test]
    fn each_error_has_one_label_and_one_answer() {
        let stale = Refusal::StaleEpoch {
            ours: Epoch(1),
            theirs: Epoch(2),
        };
        let rows: Vec<(ReceiveError, ErrorKind, &str)> = vec![
            (
                ReceiveError::refuse(stale.clone()),
                ErrorKind::Fenced,
                "epoch 2",
            ),
            (
                ReceiveError::refuse(Refusal::Busy),
                ErrorKind::Refused,
                "busy",
            ),
            (
                ReceiveError::protocol("bad order"),
                ErrorKind::Protocol,
                "bad order",
            ),
            (
                ReceiveError::corrupt("bad hash"),
                ErrorKind::Verify,
                "bad hash",
            ),
            (
                ReceiveError::io(anyhow::anyhow!("disk full")),
                ErrorKind::Io,
                "could not store the cycle: disk full",
            ),
            (
                ReceiveError::store(anyhow::anyhow!("rocks")),
                ErrorKind::Store,
                "could not store the cycle: rocks",
            ),
            (
                ReceiveError::link(anyhow::anyhow!("gone")),
                ErrorKind::Peer,
                "gone",
            ),
        ];
        for (e, label, told) in rows {
            assert_eq!(e.metric_label(), label, "{e}");
            assert!(e.told().to_string().contains(told), "{e}: {}", e.told());
        }
        let rows: Vec<(CycleError, ErrorKind, bool)> = vec![
            (CycleError::Fenced("x".into()), ErrorKind::Fenced, false),
            (
                CycleError::Refused {
                    what: "the cycle",
                    refusal: Refusal::Busy,
                },
                ErrorKind::Refused,
                false,
            ),
            (
                CycleError::link(anyhow::anyhow!("x")),
                ErrorKind::Peer,
                true,
            ),
            (
                CycleError::unexpected("Chunk", "Prepared"),
                ErrorKind::Protocol,
                true,
            ),
            (
                CycleError::Store(anyhow::anyhow!("x")),
                ErrorKind::Store,
                false,
            ),
        ];
        for (e, label, resets) in rows {
            assert_eq!((e.metric_label(), e.resets_link()), (label, resets), "{e}");
        }
    }
}
