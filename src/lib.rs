//! lifeboat: continuous disaster recovery between two sites.
//!
//! The primary's daemon takes group snapshots of the protected volumes, diffs each against
//! the last replicated gen in blake3-hashed chunks, and streams only the changes over QUIC
//! with mutual TLS to the DR site's daemon, which stages them, commits the whole group at
//! once and only then acknowledges. See `DESIGN.md`-style notes in each module.
//!
//! Modules, in data-flow order:
//! - [`config`]: the TOML config, validated with every problem reported at once.
//! - [`ids`]: typed identifiers (chunk hashes, gens, epochs, names, points).
//! - [`rules`]: pre and post rules (local commands, Stork Rules, Velero hook annotations)
//!   run with a barrier around each group snapshot.
//! - [`volume`]: group snapshots with pre/post hooks, staging logs, writing replicas.
//! - [`engine`]: chunk geometry, the scanner that hashes on all cores (skipping extents the
//!   base snapshot shares), the ordered diff against packed index segments, compression
//!   and 4 KiB block refinement.
//! - [`k8s`]: Kubernetes mode: collecting a protection's objects, cleaning and mapping them
//!   into the bundle that travels with each gen, and applying it at the DR site.
//! - [`store`]: the RocksDB state store and its schema.
//! - [`net`]: the wire protocol, TLS material, QUIC endpoints and the bandwidth cap.
//! - [`site`]: the daemon: scheduler, sender, receiver, recovery, failover, control API.
//! - [`metrics`]: every Prometheus metric.
//! - [`cli`]: the command line, the control API client, and the two-site demonstration
//!   (`lifeboat demo`).
//! - [`failpoint`]: stop points for kill -9 tests.

pub mod cli;
pub mod config;
pub mod engine;
pub mod failpoint;
pub mod ids;
pub mod k8s;
pub mod metrics;
pub mod net;
pub mod rules;
pub mod site;
pub mod store;
pub mod volume;
