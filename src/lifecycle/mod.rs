//! The DR lifecycle around replication: the DR site's [`standby`] manifests, [`failover`]
//! (the [`plan`] and its run), and the primary's half of a [`planned`] failover.

pub mod failover;
pub mod plan;
pub mod planned;
pub mod standby;
