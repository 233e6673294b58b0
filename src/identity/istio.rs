//! Istio's CA as an identity source (PROTOCOL.md §2): a fresh P-256 key and a CSR (empty
//! subject, one critical URI SAN) per certificate, sent to
//! `IstioCertificateService/CreateCertificate` with the caller's token, at most
//! `MAX_IN_FLIGHT` at a time; the answer's chain is split into leaf, intermediates and trust
//! bundle, and refused unless the leaf is for the identity and key asked for. Does not cache or
//! renew (`manager` does).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost_types::{Struct, Value, value::Kind};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use x509_parser::extensions::GeneralName;

use super::ca::uri_san;
use super::{BoxFuture, IdentityError, IdentitySource, SpiffeId, WorkloadCertificate};
use crate::grpc::{CallAuth, Target};
use crate::proto::istio::v1::auth::IstioCertificateRequest;
use crate::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

/// How many CSRs may wait on the CA at once, over all identities (ztunnel's limit).
pub const MAX_IN_FLIGHT: usize = 8;
/// A call the CA has not answered by then fails (and is retried with backoff by `manager`),
/// so a hung CA cannot hold the in-flight permits forever.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The metadata key naming the identity a node proxy asks for on a workload's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// A client of istiod's (or any Istio-compatible) CA.
#[derive(Debug)]
pub struct IstioCa {
    target: Target,
    auth: CallAuth,
    ttl: Duration,
    impersonate: bool,
    in_flight: Semaphore,
    /// The channel and the root file content it was built with: a changed root file rebuilds it
    /// on the next call (PROTOCOL.md §2.3).
    channel: Mutex<Option<(Vec<u8>, Channel)>>,
}

impl IstioCa {
    /// A CA client asking for certificates valid `ttl` (istiod may shorten it). `impersonate`
    /// (a node proxy asking for its workloads) sends the identity as `ImpersonatedIdentity`.
    /// Nothing is dialled until the first `issue`.
    pub fn new(target: Target, auth: CallAuth, ttl: Duration, impersonate: bool) -> IstioCa {
        IstioCa {
            target,
            auth,
            ttl,
            impersonate,
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            channel: Mutex::new(None),
        }
    }

    /// Sends one CSR for `id` and checks the answer.
    pub async fn issue_now(&self, id: &SpiffeId) -> Result<WorkloadCertificate, IdentityError> {
        let (key, csr) = csr(id)?;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: self.impersonate.then(|| impersonation(id)),
        });
        request.set_timeout(CALL_TIMEOUT);
        self.auth
            .apply(&mut request)
            .map_err(|source| self.connection_error(source))?;
        let mut client = IstioCertificateServiceClient::new(self.channel()?);

        // Never closed: an error here cannot happen, and would only mean no limit.
        let permit = self.in_flight.acquire().await.ok();
        let answer = tokio::time::timeout(CALL_TIMEOUT, client.create_certificate(request))
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")))
            .map_err(|status| IdentityError::CaStatus {
                address: self.target.address.clone(),
                id: id.to_string(),
                code: status.code(),
                message: status.message().to_string(),
            })?;
        drop(permit);
        certificate(id, &key, &answer.into_inner().cert_chain)
    }

    fn channel(&self) -> Result<Channel, IdentityError> {
        let roots = std::fs::read(&self.target.root_cert).map_err(|source| {
            self.connection_error(crate::grpc::GrpcError::Read {
                path: self.target.root_cert.display().to_string(),
                source,
            })
        })?;
        let mut cached = self
            .channel
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, channel)) = cached
            .as_ref()
            .filter(|(built_with, _)| *built_with == roots)
        {
            return Ok(channel.clone());
        }
        let channel = self
            .target
            .channel()
            .map_err(|source| self.connection_error(source))?;
        *cached = Some((roots, channel.clone()));
        Ok(channel)
    }

    fn connection_error(&self, source: crate::grpc::GrpcError) -> IdentityError {
        IdentityError::CaConnection {
            address: self.target.address.clone(),
            source,
        }
    }
}

impl IdentitySource for IstioCa {
    fn issue<'a>(
        &'a self,
        id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>> {
        Box::pin(self.issue_now(id))
    }
}

/// A fresh P-256 key and its CSR: empty subject, one critical SubjectAltName with the URI.
pub(crate) fn csr(id: &SpiffeId) -> Result<(KeyPair, String), IdentityError> {
    let signing = |reason: rcgen::Error| IdentityError::Signing {
        id: id.to_string(),
        reason: reason.to_string(),
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(signing)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.custom_extensions = vec![uri_san(&id.to_string())];
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(signing)?;
    Ok((key, csr))
}

fn impersonation(id: &SpiffeId) -> Struct {
    let value = Value {
        kind: Some(Kind::StringValue(id.to_string())),
    };
    Struct {
        fields: BTreeMap::from([(IMPERSONATED_IDENTITY.to_string(), value)]),
    }
}

/// Reads `cert_chain`: element 0 the leaf, then intermediates, the last element the trust
/// bundle (every certificate in it a root). Any element may hold several PEM certificates.
pub(crate) fn certificate(
    id: &SpiffeId,
    key: &KeyPair,
    cert_chain: &[String],
) -> Result<WorkloadCertificate, IdentityError> {
    let bad = |reason: String| IdentityError::CaResponse {
        id: id.to_string(),
        reason,
    };
    let Some((bundle, leaf_and_intermediates)) = cert_chain.split_last() else {
        return Err(bad("cert_chain is empty".into()));
    };
    if leaf_and_intermediates.is_empty() {
        return Err(bad(
            "cert_chain has one element; expected the leaf, intermediates, then the trust bundle"
                .into(),
        ));
    }
    let parse = |index: usize, pem: &str| -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| bad(format!("cert_chain[{index}] is not PEM: {err}")))?;
        if certs.is_empty() {
            return Err(bad(format!("cert_chain[{index}] holds no CERTIFICATE")));
        }
        Ok(certs)
    };
    let mut chain = Vec::new();
    for (index, pem) in leaf_and_intermediates.iter().enumerate() {
        chain.extend(parse(index, pem)?);
    }
    let roots = parse(cert_chain.len() - 1, bundle)?;

    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|err| bad(format!("the leaf is not an X.509 certificate: {err}")))?;
    let uris = leaf_uris(&leaf).map_err(|err| bad(format!("the leaf's SubjectAltName: {err}")))?;
    if uris != [id.to_string()] {
        return Err(IdentityError::WrongIdentity {
            asked: id.to_string(),
            issued: if uris.is_empty() {
                "no URI SAN".into()
            } else {
                uris.join(", ")
            },
        });
    }
    if leaf.tbs_certificate.subject_pki.raw != key.public_key_der().as_slice() {
        return Err(IdentityError::KeyMismatch { id: id.to_string() });
    }
    let time = |at: x509_parser::time::ASN1Time| {
        u64::try_from(at.timestamp())
            .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
            .map_err(|_| bad(format!("the leaf's validity {at} is before 1970")))
    };
    let not_before = time(leaf.validity().not_before)?;
    let not_after = time(leaf.validity().not_after)?;
    if not_after <= SystemTime::now() {
        return Err(bad(format!(
            "the leaf expired at {}",
            leaf.validity().not_after
        )));
    }

    Ok(WorkloadCertificate {
        id: id.clone(),
        chain,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        roots,
        not_before,
        not_after,
    })
}

/// Every URI in the certificate's SubjectAltName (none if it has no such extension).
fn leaf_uris(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<Vec<String>, x509_parser::error::X509Error> {
    let san = cert.subject_alternative_name()?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(uri.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
#[path = "istio_tests.rs"]
mod tests;
