//! The error a failed rule action gives a cycle. Rules themselves (local commands, Stork
//! Rules, Velero hooks) are in [`crate::rules`].

/// A pre or post action failed; the cycle reports it as a hook error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HookFailed(pub String);
