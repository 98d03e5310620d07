//! The DR lifecycle around replication: the DR site's [`standby`] manifests, [`failover`]
//! (the [`plan`] and its run), the primary's half of a [`planned`] failover, and
//! [`reprotect`] after a failover.

pub mod failover;
pub mod plan;
pub mod planned;
pub mod reprotect;
pub mod standby;
