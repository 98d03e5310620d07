//! Who is on the other end of a connection: the names the peer's certificate is valid for.
//! Every site of a pair has a certificate from the pair CA, so the CA alone cannot tell a
//! primary from a DR site; the DR site also checks that the connecting certificate is not
//! its own (a stolen DR key pushing data as the primary) and, when `[listen] peer` is set,
//! that it is the primary's.

use rustls::pki_types::{CertificateDer, ServerName};

/// The peer's end-entity certificate, as rustls verified it.
fn leaf(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

/// Whether the peer's certificate is valid for the site name `name`.
pub fn peer_is(conn: &quinn::Connection, name: &str) -> bool {
    let (Some(cert), Ok(name)) = (leaf(conn), ServerName::try_from(name)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(&cert)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}
