//! Where bytes cross the network: the wire protocol, TLS material and the QUIC endpoints.

pub mod identity;
pub mod limit;
pub mod quic;
pub mod tls;
pub mod wire;
#[cfg(test)]
mod wire_tests;
