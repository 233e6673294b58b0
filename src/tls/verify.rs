//! The SPIFFE peer verifier used on both ends of HBONE: the chain must verify (webpki) against
//! the trust bundle that came with our own certificate, for the right key usage; then the leaf
//! must pass the X509-SVID rules (`svid`: one URI SAN, not a CA, KeyUsage, EKU), be in our trust
//! domain (no federation is configurable yet) and satisfy a rule. DNS names, the CN and SNI are
//! never looked at. Does not build configurations (`tls` does).

use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName, OtherError};

use super::TlsError;
use super::svid::{Purpose, SvidError, check_leaf};
use crate::identity::{SpiffeId, WorkloadCertificate};

/// Verifies a peer's chain against a trust bundle and its SPIFFE id against `rule`.
#[derive(Debug)]
pub(crate) struct SpiffeVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
    trust_domain: String,
    rule: PeerRule,
}

/// What the peer's SPIFFE id must satisfy, besides being in our trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PeerRule {
    /// Server side: any SPIFFE id of our trust domain; authorization comes later.
    AnyInTrustDomain,
    /// Client side: exactly one of the identities we meant to reach.
    OneOf(Vec<SpiffeId>),
}

/// Why a peer whose chain verified is refused; carried in the rustls error so the log line says
/// who was refused and by which rule. rustls prints what it carries with `{:?}`, so `Debug`
/// gives the sentence too.
#[derive(thiserror::Error)]
pub enum PeerRefusal {
    #[error("peer certificate breaks an X509-SVID rule: {0}")]
    Svid(#[from] SvidError),
    #[error("peer {presented} is not in trust domain {trust_domain} (no federation is configured)")]
    ForeignTrustDomain {
        presented: String,
        trust_domain: String,
    },
    #[error("peer certificate id {presented} is not {wanted}")]
    NotExpected { presented: String, wanted: String },
}

impl std::fmt::Debug for PeerRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl SpiffeVerifier {
    /// Accepts clients of `cert`'s trust domain.
    pub(crate) fn same_trust_domain(
        cert: &WorkloadCertificate,
        provider: &CryptoProvider,
    ) -> Result<Self, TlsError> {
        Self::new(cert, PeerRule::AnyInTrustDomain, provider)
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
            trust_domain: cert.id.trust_domain().to_string(),
            rule,
        })
    }

    fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        purpose: Purpose,
    ) -> Result<(), rustls::Error> {
        let leaf = webpki::EndEntityCert::try_from(end_entity).map_err(certificate_error)?;
        leaf.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            purpose.webpki(),
            None,
            None,
        )
        .map_err(certificate_error)?;

        self.check_identity(end_entity, purpose).map_err(|refusal| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                refusal,
            ))))
        })
    }

    /// The SVID rules, the trust domain, then the rule of this side.
    fn check_identity(
        &self,
        end_entity: &CertificateDer<'_>,
        purpose: Purpose,
    ) -> Result<(), PeerRefusal> {
        let presented = check_leaf(end_entity, &[purpose])?;
        if presented.trust_domain() != self.trust_domain {
            return Err(PeerRefusal::ForeignTrustDomain {
                presented: presented.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        match &self.rule {
            PeerRule::AnyInTrustDomain => Ok(()),
            PeerRule::OneOf(expected) if expected.contains(&presented) => Ok(()),
            PeerRule::OneOf(expected) => Err(PeerRefusal::NotExpected {
                presented: presented.to_string(),
                wanted: format!(
                    "one of [{}]",
                    expected
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
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
        self.verify_peer(end_entity, intermediates, now, Purpose::ClientAuth)?;
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
        self.verify_peer(end_entity, intermediates, now, Purpose::ServerAuth)?;
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
