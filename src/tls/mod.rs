//! rustls configurations built from a workload certificate, and the SPIFFE checks on both ends:
//! TLS 1.3 only, AES-GCM suites only, ALPN `h2`, no SNI, no resumption; the peer must chain to the
//! trust bundle and prove a SPIFFE id of our trust domain (server side) or one of the expected ids
//! (client side). Knows nothing about the mesh or about HTTP/2 beyond its ALPN name.

/// The signature half of a rustls certificate verifier, the same for every verifier here: check
/// with the crypto provider's algorithms (a field `algorithms: WebPkiSupportedAlgorithms`).
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}
pub(crate) use signature_checks;

mod credentials;
pub(crate) mod verify;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ServerConfig};

use crate::identity::{IdentityError, SpiffeId, WorkloadCertificate};

pub use credentials::Credentials;
use verify::SpiffeVerifier;

/// The one ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("building the TLS {side} configuration for {id}: {source}")]
    Config {
        side: &'static str,
        id: String,
        #[source]
        source: rustls::Error,
    },
    #[error("trust bundle of {id}: {reason}")]
    Roots { id: String, reason: String },
}

/// The server side of HBONE for `cert`'s identity: presents its chain, requires a client
/// certificate chaining to `cert.roots` whose SPIFFE id is in `cert.id`'s trust domain.
pub fn server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, TlsError> {
    let config_error = |source| TlsError::Config {
        side: "server",
        id: cert.id.to_string(),
        source,
    };
    let verifier = SpiffeVerifier::same_trust_domain(cert, provider())?;
    let mut config = ServerConfig::builder_with_provider(provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The client side of HBONE from `cert`'s identity: presents its chain, sends no SNI, and accepts
/// only a server whose certificate chains to `cert.roots` and names one of `expected`.
pub fn client_config(
    cert: &WorkloadCertificate,
    expected: &[SpiffeId],
) -> Result<Arc<ClientConfig>, TlsError> {
    let config_error = |source| TlsError::Config {
        side: "client",
        id: cert.id.to_string(),
        source,
    };
    let verifier = SpiffeVerifier::one_of(cert, expected, provider())?;
    let mut config = ClientConfig::builder_with_provider(provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The name handed to `connect`: SNI is off and the verifier ignores names, so any fixed IP does.
pub fn dummy_server_name() -> ServerName<'static> {
    ServerName::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// Whether the handshake agreed on `h2`. A rustls server also completes handshakes with clients
/// that offer no ALPN at all, so the HBONE server must check this before speaking HTTP/2.
pub fn negotiated_h2(state: &rustls::CommonState) -> bool {
    state.alpn_protocol() == Some(ALPN_H2)
}

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

/// The crypto library under rustls: ring (Rust and assembly, no C toolchain) unless built with
/// the `aws-lc` feature (AWS-LC, a C library; measured against ring in BENCHMARKS.md).
pub fn backend() -> CryptoProvider {
    #[cfg(feature = "aws-lc")]
    return rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(not(feature = "aws-lc"))]
    return rustls::crypto::ring::default_provider();
}

/// The backend with Istio's TLS 1.3 suites only (no ChaCha20), built once.
fn provider() -> &'static Arc<CryptoProvider> {
    #[cfg(feature = "aws-lc")]
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384,
    };
    #[cfg(not(feature = "aws-lc"))]
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| {
        Arc::new(CryptoProvider {
            cipher_suites: vec![TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256],
            ..backend()
        })
    })
}

#[cfg(test)]
mod tests;
