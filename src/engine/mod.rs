//! The chunk engine: pure chunk arithmetic, packed hash segments and the ordered diff, plus
//! the scanner that reads a snapshot and hashes it on all cores.

pub mod chunk;
pub mod compress;
pub mod diff;
pub mod extents;
pub mod holes;
pub mod index;
pub mod narrow;
pub mod refine;
pub mod reread;
pub mod scan;
pub mod verify;
