//! rustls configurations built from a workload certificate, and the SPIFFE checks on both ends:
//! TLS 1.3 only, AES-GCM suites only, the key-exchange groups `tls.keyExchange` names (hybrid
//! post-quantum X25519MLKEM768 first by default), ALPN `h2`, no SNI, no resumption; the peer must
//! chain to the trust bundle, pass the X509-SVID rules (`svid`) and prove a SPIFFE id of our trust
//! domain (server side) or one of the expected ids (client side). Knows nothing about the mesh or
//! about HTTP/2 beyond its ALPN name.

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
mod key_exchange;
pub mod svid;
pub(crate) mod verify;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};

use crate::identity::{IdentityError, SpiffeId, WorkloadCertificate};

pub use credentials::Credentials;
use key_exchange::provider;
pub use key_exchange::{KeyExchange, backend, backend_name, install_process_default};
pub use svid::SvidError;
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
    #[error("tls.keyExchange {setting}: {reason}")]
    KeyExchange {
        setting: KeyExchange,
        reason: &'static str,
    },
}

/// The server side of HBONE for `cert`'s identity: presents its chain, requires a client
/// certificate chaining to `cert.roots` whose SPIFFE id is in `cert.id`'s trust domain.
pub fn server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(cert, KeyExchange::default())
}

/// [`server_config`] accepting only the key-exchange groups of `key_exchange`.
pub fn server_config_with(
    cert: &WorkloadCertificate,
    key_exchange: KeyExchange,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider(key_exchange)?;
    let config_error = |source| TlsError::Config {
        side: "server",
        id: cert.id.to_string(),
        source,
    };
    let verifier = SpiffeVerifier::same_trust_domain(cert, provider)?;
    let mut config = ServerConfig::builder_with_provider(provider.clone())
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
    client_config_with(cert, expected, KeyExchange::default())
}

/// [`client_config`] offering only the key-exchange groups of `key_exchange`, in its order.
pub fn client_config_with(
    cert: &WorkloadCertificate,
    expected: &[SpiffeId],
    key_exchange: KeyExchange,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider(key_exchange)?;
    let config_error = |source| TlsError::Config {
        side: "client",
        id: cert.id.to_string(),
        source,
    };
    let verifier = SpiffeVerifier::one_of(cert, expected, provider)?;
    let mut config = ClientConfig::builder_with_provider(provider.clone())
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

/// The peer's identity after a handshake: the one SPIFFE URI SAN of its leaf certificate (the
/// verifier has refused any leaf with more, fewer or an invalid one).
pub fn peer_identity(state: &rustls::CommonState) -> Option<SpiffeId> {
    let leaf = state.peer_certificates()?.first()?;
    svid::leaf_identity(leaf)
}

#[cfg(test)]
mod forge;
#[cfg(test)]
mod issued_tests;
#[cfg(test)]
mod key_exchange_tests;
#[cfg(test)]
mod svid_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod wire_tests;
