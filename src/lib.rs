//! lifeboat: continuous disaster recovery between two sites.
//!
//! The primary's daemon takes group snapshots of the protected volumes, diffs each against
//! the last replicated gen in blake3-hashed chunks, and streams only the changes over QUIC
//! with mutual TLS to the DR site's daemon, which stages them, commits the whole group at
//! once and only then acknowledges. Each module opens with what it does and why.
//!
//! Modules, in data-flow order:
//! - [`config`]: the TOML config, read in two steps and validated with every problem
//!   reported at once by key.
//! - [`ids`]: typed identifiers (chunk hashes, gens, epochs, names, points).
//! - [`rules`]: pre/post rules (Stork Rules, Velero hooks, local commands) around a group
//!   snapshot, and where they run (local processes, pods/exec).
//! - [`k8s`]: Kubernetes mode: selection, manifest bundles, CSI group snapshots, standby
//!   and active apply.
//! - [`mover`]: one volume of a Kubernetes cycle, moved from its snapshot's block device
//!   by a Job on the node it attaches to.
//! - [`volume`]: group snapshots, staging logs, and where a replica is written.
//! - [`engine`]: chunk geometry, the scanner that hashes on all cores, the ordered diff
//!   against packed index segments, chunk verification, compression and 4 KiB block
//!   refinement.
//! - [`store`]: the RocksDB state store: its schema, records, durable transitions and the
//!   async face that keeps RocksDB off the async workers.
//! - [`net`]: the wire protocol's frames, TLS material, QUIC endpoints and the bandwidth
//!   cap.
//! - [`replicate`]: the replication protocol: pure send and receive machines with thin
//!   async shells, and the recovery of what was in flight.
//! - [`site`]: a site's state by role (shared core, primary, DR with its protection locks)
//!   and what `status` shows.
//! - [`lifecycle`]: standby manifests, failover (a pure plan and its run), planned failover.
//! - [`daemon`]: `lifeboat run`: start-up, the scheduler, the control API, ordered shutdown.
//! - [`api`]: the control API's types and client, shared by the daemon, CLI and tests.
//! - [`metrics`]: every Prometheus metric.
//! - [`cli`]: the command line and the two-site demonstration (`lifeboat demo`).
//! - [`failpoint`]: stop points for kill -9 tests.

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod failpoint;
pub mod ids;
pub mod k8s;
pub mod lifecycle;
pub mod metrics;
pub mod mover;
pub mod net;
pub mod replicate;
pub mod rules;
pub mod site;
pub mod store;
pub mod volume;
