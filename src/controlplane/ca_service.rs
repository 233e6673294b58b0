//! Istio's CA API (`istio.v1.auth.IstioCertificateService/CreateCertificate`) as the control
//! plane serves it: the caller is a node (by its token), it asks for a workload's identity
//! (`ImpersonatedIdentity`), and the CSR is signed only if that identity has a workload on that
//! node in the configuration being served. Everything else is refused with a status naming why.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::Served;
use super::tokens::TokenStore;
use crate::identity::{CertificateAuthority, IdentityError, SpiffeId, SpiffeIdError};
use crate::proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;
use crate::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

/// The metadata key a node proxy names the workload identity with.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The CA service: node tokens, the configuration (who runs where), the CA and the longest
/// lifetime it grants.
#[derive(Debug, Clone)]
pub struct CaService {
    pub tokens: Arc<TokenStore>,
    pub served: watch::Receiver<Arc<Served>>,
    pub ca: Arc<CertificateAuthority>,
    pub max_ttl: Duration,
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let node = self.tokens.authenticate(&request)?;
        let request = request.into_inner();
        let id = impersonated(&request).map_err(|reason| {
            warn!(%node, %reason, "certificate refused");
            Status::invalid_argument(reason.to_string())
        })?;
        let served = self.served.borrow().clone();
        let runs_here = served
            .snapshot
            .local_workloads(&node)
            .any(|w| *w.identity_ref() == id);
        if !runs_here {
            warn!(%node, identity = %id, "certificate refused: no workload with this identity on the node");
            return Err(Status::permission_denied(format!(
                "identity {id} has no workload on node {node}"
            )));
        }
        let requested = u64::try_from(request.validity_duration).unwrap_or(0);
        let ttl = match requested {
            0 => self.max_ttl,
            secs => Duration::from_secs(secs).min(self.max_ttl),
        };
        let mut chain = self.ca.sign_csr(&request.csr, &id, ttl).map_err(|e| {
            warn!(%node, identity = %id, error = %e, "certificate refused");
            match e {
                IdentityError::Csr { .. } | IdentityError::ForeignTrustDomain { .. } => {
                    Status::invalid_argument(e.to_string())
                }
                _ => Status::internal(e.to_string()),
            }
        })?;
        // The last element is the trust bundle (every root, one PEM after the other).
        chain.push(
            self.ca
                .roots()
                .iter()
                .map(|root| crate::identity::ca::pem_of(root))
                .collect(),
        );
        info!(%node, identity = %id, ttl_seconds = ttl.as_secs(), "certificate signed");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// Why a request's `ImpersonatedIdentity` cannot be read; sent back as `InvalidArgument`.
#[derive(Debug, thiserror::Error)]
enum ImpersonationError {
    #[error(
        "metadata {} is required: a node asks for a workload's identity",
        IMPERSONATED_IDENTITY
    )]
    Missing,
    #[error("metadata {} must be a string", IMPERSONATED_IDENTITY)]
    NotAString,
    #[error("metadata {} {text:?}: {source}", IMPERSONATED_IDENTITY)]
    NotSpiffe {
        text: String,
        #[source]
        source: SpiffeIdError,
    },
}

/// The identity a node asks for; a node proxy always names it.
fn impersonated(request: &IstioCertificateRequest) -> Result<SpiffeId, ImpersonationError> {
    let value = request
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
        .ok_or(ImpersonationError::Missing)?;
    let Some(prost_types::value::Kind::StringValue(text)) = &value.kind else {
        return Err(ImpersonationError::NotAString);
    };
    text.parse()
        .map_err(|source| ImpersonationError::NotSpiffe {
            text: text.clone(),
            source,
        })
}
