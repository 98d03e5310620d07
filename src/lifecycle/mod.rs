//! The DR lifecycle around replication: the DR site's [`standby`] manifests, [`failover`]
//! (the [`plan`] and its run), the primary's half of a [`planned`] failover,
//! [`reprotect`] after a failover and [`failback`], the recovery [`points`] an operator lists and holds, and
//! [`verify`] of the replicas against the DR index, also in the background ([`scrub`]).

pub mod drill;
pub mod drill_kube;
pub mod failback;
pub mod failover;
pub mod plan;
pub mod planned;
pub mod points;
pub mod reprotect;
pub mod scrub;
pub mod standby;
pub mod verify;
