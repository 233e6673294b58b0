//! The X509-SVID rules for a leaf certificate, stricter than webpki and than ztunnel: exactly one
//! URI SAN and it is a SPIFFE id of Istio's shape (never a CN, never "the first SAN that
//! parses"), not a CA, KeyUsage with digitalSignature and without keyCertSign/cRLSign, and an
//! ExtendedKeyUsage naming the purpose. Used on every peer certificate (`verify`) and on every
//! certificate a CA hands us (`check_issued`), which additionally must chain to its trust bundle
//! and hold the key we keep. Knows nothing about rustls configurations.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{TrustAnchor, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE,
    OID_X509_EXT_SUBJECT_ALT_NAME,
};

use crate::identity::{SpiffeId, SpiffeIdError, WorkloadCertificate};

/// What a leaf is being accepted for: the EKU it must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A client of our HBONE server (inbound): `id-kp-clientAuth`.
    ClientAuth,
    /// The HBONE server we dial (outbound): `id-kp-serverAuth`.
    ServerAuth,
}

impl Purpose {
    fn name(self) -> &'static str {
        match self {
            Purpose::ClientAuth => "clientAuth",
            Purpose::ServerAuth => "serverAuth",
        }
    }

    pub(crate) fn webpki(self) -> webpki::KeyUsage {
        match self {
            Purpose::ClientAuth => webpki::KeyUsage::client_auth(),
            Purpose::ServerAuth => webpki::KeyUsage::server_auth(),
        }
    }
}

/// A certificate that breaks an X509-SVID rule; the text says which rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("the leaf is not an X.509 certificate: {0}")]
    Unparsable(String),
    #[error("the leaf's {extension} extension is malformed or repeated")]
    MalformedExtension { extension: &'static str },
    #[error(
        "the leaf has no SubjectAltName; exactly one spiffe:// URI SAN is required (the CN is never used)"
    )]
    NoSubjectAltName,
    #[error("the leaf has no URI SAN (only {others}); exactly one spiffe:// URI SAN is required")]
    NoUriSan { others: String },
    #[error("the leaf has {count} URI SANs ({uris}); exactly one is allowed")]
    SeveralUriSans { count: usize, uris: String },
    #[error("the leaf's URI SAN is not a SPIFFE id: {0}")]
    NotSpiffe(#[source] SpiffeIdError),
    #[error("the leaf is a CA certificate (BasicConstraints cA=TRUE)")]
    IsCa,
    #[error("the leaf has no KeyUsage extension; digitalSignature is required")]
    NoKeyUsage,
    #[error("the leaf's KeyUsage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("the leaf's KeyUsage has {0}, which only a CA may have")]
    CaKeyUsage(&'static str),
    #[error("the leaf has no ExtendedKeyUsage; ztund requires one naming {0}")]
    NoExtendedKeyUsage(&'static str),
    #[error("the leaf's ExtendedKeyUsage lacks {0}")]
    WrongExtendedKeyUsage(&'static str),
    #[error("the chain is empty")]
    EmptyChain,
    #[error("the trust bundle is empty")]
    NoRoots,
    #[error("trust bundle entry {index} is not a usable root: {reason}")]
    BadRoot { index: usize, reason: String },
    #[error("the chain does not verify against the trust bundle for {purpose}: {reason}")]
    Unverifiable {
        purpose: &'static str,
        reason: String,
    },
    #[error("the leaf names {issued}, not {asked}")]
    WrongIdentity { asked: String, issued: String },
    #[error("the leaf does not hold the public key of our private key")]
    KeyMismatch,
}

/// Longest SAN text quoted in an error: hostile certificates do not get to fill the logs.
const QUOTE_MAX: usize = 128;

/// Checks the SVID rules on `leaf` (DER) for every one of `purposes` and returns its identity.
/// Does not verify the chain (webpki does, before this).
pub fn check_leaf(leaf: &[u8], purposes: &[Purpose]) -> Result<SpiffeId, SvidError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|err| SvidError::Unparsable(err.to_string()))?;
    let id = uri_identity(&cert)?;

    if let Some(ParsedExtension::BasicConstraints(bc)) =
        unique(&cert, &OID_X509_EXT_BASIC_CONSTRAINTS, "BasicConstraints")?
        && bc.ca
    {
        return Err(SvidError::IsCa);
    }

    let Some(ParsedExtension::KeyUsage(usage)) =
        unique(&cert, &OID_X509_EXT_KEY_USAGE, "KeyUsage")?
    else {
        return Err(SvidError::NoKeyUsage);
    };
    if usage.key_cert_sign() {
        return Err(SvidError::CaKeyUsage("keyCertSign"));
    }
    if usage.crl_sign() {
        return Err(SvidError::CaKeyUsage("cRLSign"));
    }
    if !usage.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }

    let eku = unique(&cert, &OID_X509_EXT_EXTENDED_KEY_USAGE, "ExtendedKeyUsage")?;
    for purpose in purposes {
        // No EKU means "any purpose" to RFC 5280 and webpki; every SVID issuer ztund knows
        // (istiod, SPIRE, cert-manager istio-csr, the built-in CA) sets one, so a leaf without
        // it is refused rather than taken for everything.
        let Some(ParsedExtension::ExtendedKeyUsage(eku)) = eku else {
            return Err(SvidError::NoExtendedKeyUsage(purpose.name()));
        };
        let present = match purpose {
            Purpose::ClientAuth => eku.client_auth,
            Purpose::ServerAuth => eku.server_auth,
        };
        if !present {
            return Err(SvidError::WrongExtendedKeyUsage(purpose.name()));
        }
    }
    Ok(id)
}

/// The identity a leaf's SAN rules give it, or `None`: what a finished handshake's peer is.
pub fn leaf_identity(leaf: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    uri_identity(&cert).ok()
}

/// Exactly one URI SAN, a valid SPIFFE id; other SAN types (DNS, IP) may sit beside it.
fn uri_identity(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let Some(ParsedExtension::SubjectAlternativeName(san)) =
        unique(cert, &OID_X509_EXT_SUBJECT_ALT_NAME, "SubjectAltName")?
    else {
        return Err(SvidError::NoSubjectAltName);
    };
    let uris: Vec<&str> = san
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => uri.parse().map_err(SvidError::NotSpiffe),
        [] => Err(SvidError::NoUriSan {
            others: quote(
                &san.general_names
                    .iter()
                    .map(|name| name.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        }),
        several => Err(SvidError::SeveralUriSans {
            count: several.len(),
            uris: quote(&several.join(", ")),
        }),
    }
}

/// The one extension with `oid`, parsed; an error if it repeats or does not parse (x509-parser
/// otherwise hands back such an extension as "unsupported", which would read as absent).
fn unique<'a>(
    cert: &'a X509Certificate<'_>,
    oid: &x509_parser::oid_registry::Oid<'_>,
    extension: &'static str,
) -> Result<Option<&'a ParsedExtension<'a>>, SvidError> {
    let malformed = SvidError::MalformedExtension { extension };
    let mut found = cert.extensions().iter().filter(|ext| ext.oid == *oid);
    let Some(ext) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return Err(malformed);
    }
    match ext.parsed_extension() {
        ParsedExtension::ParseError { .. } | ParsedExtension::UnsupportedExtension { .. } => {
            Err(malformed)
        }
        parsed => Ok(Some(parsed)),
    }
}

fn quote(text: &str) -> String {
    if text.len() <= QUOTE_MAX {
        return text.to_string();
    }
    let mut end = QUOTE_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// A CA's answer (any source: built-in, Istio CSR, SPIRE) before ztund uses it (HARDENING X7):
/// the leaf passes the SVID rules for both purposes and names `asked`, the chain verifies with
/// every root of the bundle usable, and the leaf holds the public half of `cert.key`.
pub fn check_issued(
    asked: &SpiffeId,
    cert: &WorkloadCertificate,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<(), SvidError> {
    let Some(leaf) = cert.chain.first() else {
        return Err(SvidError::EmptyChain);
    };
    if cert.roots.is_empty() {
        return Err(SvidError::NoRoots);
    }
    let anchors = cert
        .roots
        .iter()
        .enumerate()
        .map(|(index, root)| {
            webpki::anchor_from_trusted_cert(root)
                .map(|anchor| anchor.to_owned())
                .map_err(|err| SvidError::BadRoot {
                    index,
                    reason: err.to_string(),
                })
        })
        .collect::<Result<Vec<TrustAnchor<'static>>, _>>()?;

    let purposes = [Purpose::ClientAuth, Purpose::ServerAuth];
    let issued = check_leaf(leaf, &purposes)?;
    if issued != *asked || cert.id != *asked {
        return Err(SvidError::WrongIdentity {
            asked: asked.to_string(),
            issued: issued.to_string(),
        });
    }

    let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(|err| unverifiable("", err))?;
    let at = verification_time(cert.not_before);
    for purpose in purposes {
        end_entity
            .verify_for_usage(
                algorithms.all,
                &anchors,
                &cert.chain[1..],
                at,
                purpose.webpki(),
                None,
                None,
            )
            .map_err(|err| unverifiable(purpose.name(), err))?;
    }

    let key = rcgen::KeyPair::try_from(&cert.key).map_err(|_| SvidError::KeyMismatch)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|err| SvidError::Unparsable(err.to_string()))?;
    if parsed.tbs_certificate.subject_pki.raw != key.public_key_der().as_slice() {
        return Err(SvidError::KeyMismatch);
    }
    Ok(())
}

/// How far ahead of our clock a CA's may run: a leaf that starts within this is checked as of
/// its start (and renewed early by the manager), not refused.
const CA_CLOCK_AHEAD: Duration = Duration::from_secs(300);

fn verification_time(not_before: SystemTime) -> UnixTime {
    let now = SystemTime::now();
    let at = if not_before > now && not_before <= now + CA_CLOCK_AHEAD {
        not_before
    } else {
        now
    };
    UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).unwrap_or_default())
}

fn unverifiable(purpose: &'static str, err: webpki::Error) -> SvidError {
    SvidError::Unverifiable {
        purpose,
        reason: err.to_string(),
    }
}
