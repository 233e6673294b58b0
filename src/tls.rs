//! rustls configurations built from a workload certificate, and the SPIFFE checks on both ends:
//! TLS 1.3 only, ALPN `h2`, the peer must chain to the trust bundle and prove a SPIFFE id of our
//! trust domain (server side) or one of the expected ids (client side). Knows nothing about the mesh.
//! TODO(identity helper): implement server_config / client_config.

use rustls::pki_types::CertificateDer;

use crate::identity::SpiffeId;

/// The SPIFFE ids in a certificate's URI SANs, in order; non-SPIFFE URIs are skipped.
pub fn spiffe_ids(cert: &CertificateDer<'_>) -> Vec<SpiffeId> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => uri.parse().ok(),
            _ => None,
        })
        .collect()
}

/// The peer's identity after a handshake: the first SPIFFE URI SAN of its leaf certificate.
pub fn peer_identity(state: &rustls::CommonState) -> Option<SpiffeId> {
    let leaf = state.peer_certificates()?.first()?;
    spiffe_ids(leaf).into_iter().next()
}
