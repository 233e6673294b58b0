//! TLS origination for DestinationRule SIMPLE and MUTUAL: the rustls client configuration built
//! from the rule's files (`caCertificates`, `clientCertificate`, `privateKey`), cached by those
//! paths and their modification times, and the handshake toward the destination. The server is
//! checked against `subjectAltNames` (DNS or URI SANs) when the rule lists any, else against the
//! server name; `insecureSkipVerify` checks nothing but the handshake signature. Knows nothing
//! about routing (`route` decided) or copying (`outbound` does it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::{Error as PemError, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::{CertificateError, ClientConfig, OtherError};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::policy::TlsOrigination;

/// Where a rule without `caCertificates` finds roots: the system bundle, as Envoy would.
const SYSTEM_ROOTS: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// Why TLS toward a destination could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OriginateError {
    #[error("reading {field} {path}: {source}")]
    Read {
        field: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{field} {path}: {reason}")]
    Pem {
        field: &'static str,
        path: String,
        reason: String,
    },
    #[error("MUTUAL needs both clientCertificate and privateKey")]
    MissingClientCredentials,
    #[error(
        "no caCertificates given and no system roots found (looked in {SYSTEM_ROOTS:?}); set caCertificates or insecureSkipVerify"
    )]
    NoRoots,
    #[error("building the TLS client configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error("{name:?} is not a usable TLS server name")]
    ServerName { name: String },
    #[error("TLS to {target} ({name}): {source}")]
    Handshake {
        target: std::net::SocketAddr,
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Client configurations for TLS origination, rebuilt when a rule's files change.
#[derive(Debug, Default)]
pub struct Originator {
    cache: Mutex<HashMap<TlsOrigination, Cached>>,
}

#[derive(Debug)]
struct Cached {
    stamps: Vec<(PathBuf, Option<SystemTime>)>,
    config: Arc<ClientConfig>,
}

impl Originator {
    pub fn new() -> Originator {
        Originator::default()
    }

    /// Opens TLS over `tcp` (already connected to `target`) as the rule says, naming the server
    /// `server_name` in SNI.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        target: std::net::SocketAddr,
        tls: &TlsOrigination,
        server_name: &str,
    ) -> Result<TlsStream<TcpStream>, OriginateError> {
        let config = self.config(tls)?;
        let name = server_name_of(server_name)?;
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| OriginateError::Handshake {
                target,
                name: server_name.to_string(),
                source,
            })
    }

    /// The client configuration for a rule, from the cache while its files are unchanged.
    /// Reads a few small files on a miss; the callers accept that on a connection's setup path.
    pub fn config(&self, tls: &TlsOrigination) -> Result<Arc<ClientConfig>, OriginateError> {
        let stamps = stamps(tls);
        if let Ok(cache) = self.cache.lock()
            && let Some(cached) = cache.get(tls)
            && cached.stamps == stamps
        {
            return Ok(cached.config.clone());
        }
        let config = build(tls)?;
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(
                tls.clone(),
                Cached {
                    stamps,
                    config: config.clone(),
                },
            );
        }
        Ok(config)
    }
}

/// The rule's files with their modification times (`None` when unreadable now).
fn stamps(tls: &TlsOrigination) -> Vec<(PathBuf, Option<SystemTime>)> {
    [
        &tls.ca_certificates,
        &tls.client_certificate,
        &tls.private_key,
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        let path = PathBuf::from(path);
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        (path, modified)
    })
    .collect()
}

fn server_name_of(name: &str) -> Result<ServerName<'static>, OriginateError> {
    ServerName::try_from(name.to_string()).map_err(|_| OriginateError::ServerName {
        name: name.to_string(),
    })
}

fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(crate::tls::backend()))
}

fn build(tls: &TlsOrigination) -> Result<Arc<ClientConfig>, OriginateError> {
    let verifier = Arc::new(OriginationVerifier::new(tls)?);
    let builder = ClientConfig::builder_with_provider(provider().clone())
        .with_safe_default_protocol_versions()
        .map_err(OriginateError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = if tls.mutual {
        let (Some(cert), Some(key)) = (&tls.client_certificate, &tls.private_key) else {
            return Err(OriginateError::MissingClientCredentials);
        };
        let chain = read_certs("clientCertificate", Path::new(cert))?;
        let key = read_key(Path::new(key))?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(OriginateError::Config)?
    } else {
        builder.with_no_client_auth()
    };
    Ok(Arc::new(config))
}

fn read_file(field: &'static str, path: &Path) -> Result<Vec<u8>, OriginateError> {
    std::fs::read(path).map_err(|source| OriginateError::Read {
        field,
        path: path.display().to_string(),
        source,
    })
}

fn read_certs(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, OriginateError> {
    let pem_error = |reason: String| OriginateError::Pem {
        field,
        path: path.display().to_string(),
        reason,
    };
    let bytes = read_file(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error("no CERTIFICATE block".to_string()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, OriginateError> {
    let pem_error = |reason: String| OriginateError::Pem {
        field: "privateKey",
        path: path.display().to_string(),
        reason,
    };
    let bytes = read_file("privateKey", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        PemError::NoItemsFound => pem_error("no PRIVATE KEY block".to_string()),
        e => pem_error(format!("not PEM: {e}")),
    })
}

/// How a destination's certificate is judged.
#[derive(Debug)]
struct OriginationVerifier {
    /// Empty with `insecure_skip_verify`.
    anchors: Vec<TrustAnchor<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
    subject_alt_names: Vec<String>,
    insecure_skip_verify: bool,
}

/// A verified chain whose names are not the ones the rule asked for.
#[derive(Debug, thiserror::Error)]
#[error("certificate names {presented:?} match none of subjectAltNames {wanted:?}")]
struct NameMismatch {
    presented: Vec<String>,
    wanted: Vec<String>,
}

impl OriginationVerifier {
    fn new(tls: &TlsOrigination) -> Result<Self, OriginateError> {
        let algorithms = provider().signature_verification_algorithms;
        let mut verifier = OriginationVerifier {
            anchors: Vec::new(),
            algorithms,
            subject_alt_names: tls.subject_alt_names.clone(),
            insecure_skip_verify: tls.insecure_skip_verify,
        };
        if tls.insecure_skip_verify {
            return Ok(verifier);
        }
        let (field, roots) = match &tls.ca_certificates {
            Some(path) => (
                "caCertificates",
                read_certs("caCertificates", Path::new(path))?,
            ),
            None => {
                let path = SYSTEM_ROOTS
                    .iter()
                    .map(Path::new)
                    .find(|p| p.exists())
                    .ok_or(OriginateError::NoRoots)?;
                ("system roots", read_certs("system roots", path)?)
            }
        };
        for root in &roots {
            // A bundle may hold certificates webpki cannot use as anchors; skip those.
            if let Ok(anchor) = webpki::anchor_from_trusted_cert(root) {
                verifier.anchors.push(anchor.to_owned());
            }
        }
        if verifier.anchors.is_empty() {
            return Err(OriginateError::Pem {
                field,
                path: tls.ca_certificates.clone().unwrap_or_default(),
                reason: "no usable root certificate".to_string(),
            });
        }
        Ok(verifier)
    }
}

impl ServerCertVerifier for OriginationVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.insecure_skip_verify {
            return Ok(ServerCertVerified::assertion());
        }
        let leaf = webpki::EndEntityCert::try_from(end_entity).map_err(certificate_error)?;
        leaf.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(certificate_error)?;
        if self.subject_alt_names.is_empty() {
            leaf.verify_is_valid_for_subject_name(server_name)
                .map_err(certificate_error)?;
            return Ok(ServerCertVerified::assertion());
        }
        let presented = san_names(end_entity);
        if presented
            .iter()
            .any(|name| self.subject_alt_names.contains(name))
        {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(NameMismatch {
                presented,
                wanted: self.subject_alt_names.clone(),
            })),
        )))
    }

    crate::tls::signature_checks!();
}

/// The DNS and URI SANs of a certificate, in order.
fn san_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
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
            GeneralName::DNSName(dns) => Some(dns.to_string()),
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

fn certificate_error(err: webpki::Error) -> rustls::Error {
    let kind = match err {
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::CertNotValidForName(_) => CertificateError::NotValidForName,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(kind)
}

#[cfg(test)]
#[path = "originate_tests.rs"]
mod tests;
