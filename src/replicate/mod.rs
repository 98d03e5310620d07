//! The replication protocol, both halves. Pure cores decide, async shells move frames and
//! do what the cores say:
//! - [`messages`]: each stream's messages, typed by where they may appear.
//! - [`error`]: one error type per side, with variants a caller branches on.
//! - [`send`]: the primary: [`send::plan`] (pure), the cycle, one volume's transfer.
//! - [`receive`]: the DR site: [`receive::machine`] and [`receive::intake`] (pure), the
//!   cycle stream, staging, hash answers.
//! - [`recovery`]: what a restart, a cycle or a failover finishes or discards first.
//! - [`points`]: that redo where the DR replicas are PVCs: writer Jobs, then the
//!   recovery point's snapshots.
//!
//! The wire itself (frames, [`crate::net::wire::Msg`]) is in [`crate::net`].

pub mod error;
pub mod messages;
pub mod points;
pub mod receive;
pub mod recovery;
pub mod send;
