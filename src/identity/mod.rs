//! Workload identities and their certificates: SPIFFE ids, the sources that issue certificates
//! (built-in CA, an organisation's `cacerts`, Istio's CA, later the SPIFFE Workload API), and
//! the per-identity cache that renews certificates before they expire. Knows nothing about HTTP/2.

pub mod ca;
pub mod istio;
pub mod manager;
pub(crate) mod pem;
pub mod spiffe;
pub mod spire;

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use ca::CertificateAuthority;
pub use manager::CertManager;
pub use spiffe::{SpiffeId, SpiffeIdError};

/// A leaf certificate for one identity, with what a TLS handshake needs around it.
#[derive(Debug)]
pub struct WorkloadCertificate {
    pub id: SpiffeId,
    /// Leaf first, then intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The trust bundle peers are verified against.
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCertificate {
    /// When a renewal is due: half-way through the certificate's life.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

/// Why a certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadPem { path: String, reason: String },
    #[error("signing a certificate for {id}: {reason}")]
    Signing { id: String, reason: String },
    /// A CSR that cannot be signed as asked: unparsable, a bad signature, or not for `id`.
    #[error("CSR for {id}: {reason}")]
    Csr { id: String, reason: String },
    #[error("identity {id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain { id: String, trust_domain: String },
    #[error("CA {dir} already exists; refusing to overwrite it")]
    AlreadyExists { dir: String },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("trust domain {trust_domain:?}: {source}")]
    BadTrustDomain {
        trust_domain: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("CA {address}: {source}")]
    CaConnection {
        address: String,
        #[source]
        source: crate::grpc::GrpcError,
    },
    #[error("CA {address} answered {code:?} to the request for {id}: {message}")]
    CaStatus {
        address: String,
        id: String,
        code: tonic::Code,
        message: String,
    },
    #[error("CA's answer for {id}: {reason}")]
    CaResponse { id: String, reason: String },
    #[error("CA issued a certificate for {issued} when {asked} was asked for; refused")]
    WrongIdentity { asked: String, issued: String },
    #[error("CA's certificate for {id} does not hold the key of the request; refused")]
    KeyMismatch { id: String },
    /// The CA's answer broke a rule `tls::svid::check_issued` enforces (HARDENING X7).
    #[error("certificate issued for {id} refused: {source}")]
    Refused {
        id: String,
        #[source]
        source: crate::tls::SvidError,
    },
    #[error("no certificate for {id} yet: the last attempt failed ({last}); next in {retry_in:?}")]
    BackingOff {
        id: String,
        retry_in: std::time::Duration,
        last: String,
    },
    #[error(transparent)]
    Spire(#[from] spire::SpireError),
}

/// A boxed future, so sources can sit behind `dyn IdentitySource`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Anything that can issue a certificate for a workload identity.
pub trait IdentitySource: Send + Sync + std::fmt::Debug {
    /// Issues a fresh certificate (and key) for `id`.
    fn issue<'a>(
        &'a self,
        id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>>;
}
