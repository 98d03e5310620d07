//! Rules: commands that hold an application quiet while its group snapshot is taken.
//!
//! A rule lists, per pod selector (and optional container), actions of type `command`.
//! Formats read as they are: Stork's `Rule` (`stork.libopenstorage.org/v1alpha1`) and
//! Velero's `pre.hook.backup.velero.io/*` / `post.hook.backup.velero.io/*` pod annotations
//! ([`format`]). [`run`] executes a group snapshot's rules with a barrier: every pre action
//! in every matching pod (in parallel) must succeed before the snapshot starts; background
//! actions keep their lock until the snapshot is taken; post actions always run once pre
//! actions started. Commands run as local processes (local mode) or through pods/exec
//! (Kubernetes mode): see [`exec`].

pub mod exec;
pub mod format;
pub mod run;

use std::time::Duration;

use crate::k8s::labels::Selector;

/// What a failed action does to the cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Abort: no snapshot (pre) or a failed cycle (post).
    Fail,
    /// Record it and go on.
    Continue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// A shell command line (run with `sh -c`); `${WAIT_CMD}` marks where a background
    /// action waits until the snapshot is taken.
    pub command: String,
    /// Velero gives argv directly; when set it is used instead of `sh -c command`.
    pub argv: Option<Vec<String>>,
    pub background: bool,
    pub single_pod: bool,
    pub timeout: Duration,
    pub on_error: OnError,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleItem {
    /// None: every selected pod (Velero annotations name their own pod).
    pub selector: Option<Selector>,
    /// A specific pod (Velero annotations).
    pub pod: Option<(String, String)>,
    pub container: Option<String>,
    pub actions: Vec<Action>,
}

/// A named list of items, run in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub items: Vec<RuleItem>,
}

/// What `${WAIT_CMD}` becomes: announce the lock is held, then wait for stdin to close
/// (lifeboat closes it once the snapshot is taken).
pub const WAIT_CMD: &str = "echo lifeboat-rule-waiting; read -r _lifeboat_done";
pub const WAIT_MARKER: &str = "lifeboat-rule-waiting";
