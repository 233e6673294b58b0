//! The entry points the cargo-fuzz targets in `fuzz/` need that are not public API: thin
//! wrappers with no logic of their own, so a target exercises exactly the code the daemon runs.
//! Nothing else should call these.

use rcgen::KeyPair;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;

use crate::identity::{IdentityError, SpiffeId, WorkloadCertificate};
use crate::tls::{TlsError, verify::SpiffeVerifier};

/// What [`crate::capture::zds::validate`] takes: one received SEQPACKET packet.
pub use crate::capture::seqpacket::Packet;

/// The Istio CA client's reading of a CSR response (`identity::istio::certificate`): the chain
/// for `id`, whose leaf must carry the public half of `key`; then the check the certificate
/// manager makes of every issued certificate before use (`tls::svid::check_issued`, X7).
pub fn istio_ca_response(
    id: &SpiffeId,
    key: &KeyPair,
    cert_chain: &[String],
) -> Result<WorkloadCertificate, IdentityError> {
    let cert = crate::identity::istio::certificate(id, key, cert_chain)?;
    crate::identity::manager::check_issued(id, &cert)?;
    Ok(cert)
}

/// The HBONE server's check of a client certificate (port 15008): chain to `local.roots`,
/// client-auth usage, a SPIFFE id of `local`'s trust domain.
pub fn verify_client_leaf(
    local: &WorkloadCertificate,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<Result<(), rustls::Error>, TlsError> {
    let verifier = SpiffeVerifier::same_trust_domain(local, &crate::tls::backend())?;
    Ok(verifier
        .verify_client_cert(end_entity, intermediates, now)
        .map(drop))
}

/// The HBONE client's check of a server certificate: chain to `local.roots`, server-auth
/// usage, one of the `expected` ids.
pub fn verify_server_leaf(
    local: &WorkloadCertificate,
    expected: &[SpiffeId],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<Result<(), rustls::Error>, TlsError> {
    let verifier = SpiffeVerifier::one_of(local, expected, &crate::tls::backend())?;
    Ok(verifier
        .verify_server_cert(
            end_entity,
            intermediates,
            &crate::tls::dummy_server_name(),
            &[],
            now,
        )
        .map(drop))
}
