//! Volumes on disk: the primary's group snapshots (taken inside the rules that hold writers
//! quiet), the DR site's staging logs, and where a replica is written.
//!
//! Regular files and block devices are both plain files to this code; a Kubernetes mover
//! reading a block-mode PVC sees the same thing, which is why the engine needs no other
//! volume abstraction than a path.

pub mod replica;
pub mod snapshot;
pub mod staging;
