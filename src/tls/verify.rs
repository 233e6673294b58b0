//! The SPIFFE peer verifier used on both ends of HBONE: the chain must verify (webpki) against
//! the trust bundle that came with our own certificate, for the right key usage; then the leaf's
//! SPIFFE URI SANs must satisfy a rule. DNS names and SNI are never looked at. Does not build
//! configurations (`tls` does).

use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName, OtherError};

use super::{TlsError, spiffe_ids};
use crate::identity::{SpiffeId, WorkloadCertificate};

/// Verifies a peer's chain against a trust bundle and its SPIFFE id against `rule`.
#[derive(Debug)]
pub(crate) struct SpiffeVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
    rule: PeerRule,
}

/// What the peer's SPIFFE id must satisfy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PeerRule {
    /// Server side: any SPIFFE id of our trust domain; authorization comes later.
    SameTrustDomain(String),
    /// Client side: exactly one of the identities we meant to reach.
    OneOf(Vec<SpiffeId>),
}

/// A peer whose chain verified but whose identity does not fit; carried in the rustls error so
/// logs say who was refused and why.
#[derive(Debug, thiserror::Error)]
#[error("peer certificate ids {presented:?} do not satisfy {wanted}")]
struct IdentityMismatch {
    presented: Vec<String>,
    wanted: String,
}

impl SpiffeVerifier {
    /// Accepts clients of `cert`'s trust domain.
    pub(crate) fn same_trust_domain(
        cert: &WorkloadCertificate,
        provider: &CryptoProvider,
    ) -> Result<Self, TlsError> {
        let rule = PeerRule::SameTrustDomain(cert.id.trust_domain().to_string());
        Self::new(cert, rule, provider)
    }

    /// Accepts servers proving one of `expected`.
    pub(crate) fn one_of(
        cert: &WorkloadCertificate,
        expected: &[SpiffeId],
        provider: &CryptoProvider,
    ) -> Result<Self, TlsError> {
        Self::new(cert, PeerRule::OneOf(expected.to_vec()), provider)
    }

    fn new(
        cert: &WorkloadCertificate,
        rule: PeerRule,
        provider: &CryptoProvider,
    ) -> Result<Self, TlsError> {
        let roots_error = |reason: String| TlsError::Roots {
            id: cert.id.to_string(),
            reason,
        };
        if cert.roots.is_empty() {
            return Err(roots_error("no root certificates".to_string()));
        }
        let anchors = cert
            .roots
            .iter()
            .map(|root| webpki::anchor_from_trusted_cert(root).map(|anchor| anchor.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| roots_error(format!("a root is not a usable trust anchor: {err}")))?;
        Ok(SpiffeVerifier {
            anchors,
            algorithms: provider.signature_verification_algorithms,
            rule,
        })
    }

    fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        let leaf = webpki::EndEntityCert::try_from(end_entity).map_err(certificate_error)?;
        leaf.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(certificate_error)?;

        let presented = spiffe_ids(end_entity);
        let (accepted, wanted) = match &self.rule {
            PeerRule::SameTrustDomain(td) => (
                presented.iter().any(|id| id.trust_domain() == td),
                format!("trust domain {td}"),
            ),
            PeerRule::OneOf(expected) => (
                presented.iter().any(|id| expected.contains(id)),
                format!(
                    "one of [{}]",
                    expected
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        };
        if accepted {
            return Ok(());
        }
        let mismatch = IdentityMismatch {
            presented: presented.iter().map(ToString::to_string).collect(),
            wanted,
        };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(mismatch)),
        )))
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No hints: every workload holds exactly one certificate, so there is nothing to choose.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_peer(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    super::signature_checks!();
}

impl ServerCertVerifier for SpiffeVerifier {
    /// `_server_name` is the dummy name: identity is proven by URI SAN, never by DNS name.
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify_peer(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    super::signature_checks!();
}

/// webpki's verdict in rustls's terms, keeping the common cases distinct for logs and alerts.
fn certificate_error(err: webpki::Error) -> rustls::Error {
    let kind = match err {
        webpki::Error::BadDer | webpki::Error::BadDerTime | webpki::Error::TrailingData(_) => {
            CertificateError::BadEncoding
        }
        webpki::Error::CertExpired { .. } | webpki::Error::InvalidCertValidity => {
            CertificateError::Expired
        }
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        #[allow(deprecated)]
        webpki::Error::RequiredEkuNotFound | webpki::Error::RequiredEkuNotFoundContext(_) => {
            CertificateError::InvalidPurpose
        }
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(kind)
}
