//! A throwaway PKI for HBONE tests and benches: a test CA, leaf certificates carrying one SPIFFE
//! URI SAN (plus loopback IP SANs so the stock rustls verifier checks the chain honestly), and
//! plain rustls configs with ALPN `h2`. Not for production: the real configs, with SPIFFE
//! identity checks, live in `crate::tls`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::ALPN_H2;

/// A test certificate authority.
pub struct TestPki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(crate::tls::backend())
}

impl TestPki {
    /// A fresh self-signed CA.
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().expect("test CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("test CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = params.self_signed(&ca_key).expect("test CA certificate");
        TestPki { ca, ca_key }
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A leaf for `spiffe_id`, good for client and server auth, with IP SANs 127.0.0.1 and ::1.
    pub fn leaf(&self, spiffe_id: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        self.leaf_until(spiffe_id, None)
    }

    /// Like [`TestPki::leaf`], expiring at `not_after` (whole seconds) when given.
    pub fn leaf_until(
        &self,
        spiffe_id: &str,
        not_after: Option<SystemTime>,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("test leaf key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("test leaf params");
        if let Some(not_after) = not_after {
            params.not_after = time::OffsetDateTime::from(not_after);
        }
        params.subject_alt_names = vec![
            SanType::URI(spiffe_id.try_into().expect("SPIFFE id as IA5 string")),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("test leaf certificate");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], key)
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.root()).expect("test root");
        Arc::new(roots)
    }

    /// A TLS 1.3 server config for `spiffe_id` that demands a client certificate from this CA.
    pub fn server_config(&self, spiffe_id: &str) -> Arc<ServerConfig> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots(), provider())
            .build()
            .expect("client verifier");
        let (chain, key) = self.leaf(spiffe_id);
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server certificate");
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Arc::new(config)
    }

    /// A TLS 1.3 client config for `spiffe_id` offering ALPN `h2`.
    pub fn client_config(&self, spiffe_id: &str) -> Arc<ClientConfig> {
        let mut config = self.client_config_inner(spiffe_id);
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Arc::new(config)
    }

    /// Like [`TestPki::client_config`] with a client certificate expiring at `not_after`.
    pub fn client_config_until(&self, spiffe_id: &str, not_after: SystemTime) -> Arc<ClientConfig> {
        let (chain, key) = self.leaf_until(spiffe_id, Some(not_after));
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(self.roots())
            .with_client_auth_cert(chain, key)
            .expect("client certificate");
        config.resumption = rustls::client::Resumption::disabled();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Arc::new(config)
    }

    /// Like [`TestPki::client_config`] but offering no ALPN: not an HBONE client.
    pub fn client_config_without_alpn(&self, spiffe_id: &str) -> Arc<ClientConfig> {
        Arc::new(self.client_config_inner(spiffe_id))
    }

    fn client_config_inner(&self, spiffe_id: &str) -> ClientConfig {
        let (chain, key) = self.leaf(spiffe_id);
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(self.roots())
            .with_client_auth_cert(chain, key)
            .expect("client certificate");
        config.resumption = rustls::client::Resumption::disabled();
        config
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}
