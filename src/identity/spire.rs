//! Workload certificates from a SPIRE agent: X.509 SVIDs for every identity on the node through
//! the agent's Delegated Identity API (on its admin socket), one SVID stream per identity, plus
//! one stream of X.509 bundles. The streams keep the latest SVID and bundles here, so `issue`
//! hands back what the agent rotated last and `CertManager`'s renewal at half-life picks up the
//! agent's rotation. Knows nothing about TLS or the manager's cache.
//!
//! # What SPIRE must be configured with
//!
//! - **Agent admin socket.** The agent's `admin_socket_path` (in the `agent { … }` block) set to
//!   a path ztund can reach, e.g. `/run/spire/admin/admin.sock`, and mounted into ztund's pod;
//!   ztund's `ca: {mode: spiffe, adminSocket: /run/spire/admin/admin.sock}` names the same path.
//!   SPIRE refuses an admin socket in the directory of the Workload API socket
//!   (`socket_path`), so the two need separate directories (and mounts).
//! - **ztund as an authorized delegate.** The agent's `authorized_delegates` lists ztund's own
//!   SPIFFE id, e.g. `["spiffe://cluster.local/ns/istio-system/sa/ztunnel"]`. The agent attests
//!   the process on the other end of the admin socket like any workload, so ztund needs a
//!   registration entry of its own that gives it that id (e.g. selectors `k8s:ns:istio-system`
//!   and `k8s:sa:ztunnel`, parented to the node agents).
//! - **A registration entry per workload identity**, with SPIFFE id
//!   `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` (Istio's form, which ztund's
//!   policies compare) and selectors drawn only from `k8s:ns:<namespace>` and
//!   `k8s:sa:<service account>`: ztund asks for an identity with exactly those two selectors,
//!   and the agent answers with the entries whose selectors are all among them. Entries keyed on
//!   other selectors (`k8s:pod-uid:…`, which spire-controller-manager's `ClusterSPIFFEID` writes,
//!   or `k8s:pod-label:…`) never match. Each entry must reach this node's agent: parent it to
//!   the agents' ids or to a node alias that covers them.
//! - The trust domain in ztund's config equals SPIRE's `trust_domain`; the bundle of that trust
//!   domain becomes the roots peers are verified against.
//!
//! An SVID whose id is not the one asked for is never used: when the agent matches the
//! selectors only to other ids, `issue` fails naming them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spire_api::pb::spire::api::agent::delegatedidentity::v1::delegated_identity_client::DelegatedIdentityClient as SvidClient;
use spire_api::pb::spire::api::agent::delegatedidentity::v1::{
    SubscribeToX509sviDsRequest, SubscribeToX509sviDsResponse,
};
use spire_api::selectors::{K8s, Selector};
use tokio::sync::{OnceCell, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::{BoxFuture, IdentityError, IdentitySource, SpiffeId, WorkloadCertificate};

/// How long `issue` waits for the agent's first answer (or a due rotation) by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Why the SPIRE agent gave no usable certificate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpireError {
    #[error("cannot reach the SPIRE agent's admin socket {socket}: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error("the SPIRE agent's stream of {stream} failed: {reason}")]
    Stream { stream: String, reason: String },
    #[error("the SPIRE agent sent no {what} within {waited:?}")]
    Timeout { what: String, waited: Duration },
    #[error(
        "the SPIRE agent matched selectors {selectors} to {got:?}, not to {id}: is there a \
         registration entry for {id} with those selectors, parented to this node's agent?"
    )]
    WrongIdentity {
        id: String,
        selectors: String,
        got: Vec<String>,
    },
    #[error("the SPIRE agent's SVID for {id} is unusable: {reason}")]
    BadSvid { id: String, reason: String },
    #[error(
        "the SPIRE agent has no X.509 bundle for trust domain {trust_domain} (it has {have:?})"
    )]
    NoBundle {
        trust_domain: String,
        have: Vec<String>,
    },
}

/// What a stream last delivered: nothing yet, a value, or why there is none.
type Latest<T> = Option<Result<Arc<T>, SpireError>>;

/// One identity's SVID as the agent last sent it.
#[derive(Debug)]
struct Svid {
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Svid {
    /// Half-way through its life: when the agent is due to rotate it.
    fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

/// A background stream and the latest thing it delivered; dropping it ends the stream.
#[derive(Debug)]
struct Follower<T> {
    latest: watch::Receiver<Latest<T>>,
    task: JoinHandle<()>,
}

impl<T> Drop for Follower<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct Connected {
    channel: Channel,
    bundles: Follower<spiffe::X509BundleSet>,
}

/// Certificates from a SPIRE agent's Delegated Identity API (see the module docs for what SPIRE
/// must be configured with).
#[derive(Debug)]
pub struct SpireSource {
    admin_socket: PathBuf,
    timeout: Duration,
    /// Made on the first `issue`, so ztund can start before the agent; a failed connection is
    /// tried again on the next one.
    connected: OnceCell<Connected>,
    svids: Mutex<HashMap<SpiffeId, Follower<Svid>>>,
    changes: Arc<watch::Sender<u64>>,
}

impl SpireSource {
    /// A source talking to the agent's admin socket at `admin_socket`; nothing is connected yet.
    pub fn new(admin_socket: impl Into<PathBuf>) -> SpireSource {
        let (changes, _) = watch::channel(0);
        SpireSource {
            admin_socket: admin_socket.into(),
            timeout: DEFAULT_TIMEOUT,
            connected: OnceCell::new(),
            svids: Mutex::new(HashMap::new()),
            changes: Arc::new(changes),
        }
    }

    /// How long `issue` waits for the agent (connecting, a first SVID or bundle, a due rotation).
    pub fn with_timeout(mut self, timeout: Duration) -> SpireSource {
        self.timeout = timeout;
        self
    }

    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// A receiver whose value changes whenever the agent sends an SVID or bundle update (a
    /// rotation included): what the next `issue` returns may have changed.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Closes `id`'s SVID stream; the next `issue` for it opens a new one.
    pub fn forget(&self, id: &SpiffeId) {
        self.lock_svids().remove(id);
    }

    async fn issue_svid(&self, id: &SpiffeId) -> Result<WorkloadCertificate, SpireError> {
        let connected = self.connect().await?;
        let mut latest = self.follow(id, connected);
        let svid = self.current_svid(id, &mut latest).await?;
        let roots = self.roots(id, connected).await?;
        Ok(WorkloadCertificate {
            id: id.clone(),
            chain: svid.chain.clone(),
            key: PrivateKeyDer::Pkcs8(svid.key.clone_key()),
            roots,
            not_before: svid.not_before,
            not_after: svid.not_after,
        })
    }

    async fn connect(&self) -> Result<&Connected, SpireError> {
        self.connected
            .get_or_try_init(|| async {
                let unreachable = |reason: String| SpireError::Unreachable {
                    socket: self.admin_socket.display().to_string(),
                    reason,
                };
                let endpoint = spiffe::transport::Endpoint::Unix(self.admin_socket.clone());
                let channel = tokio::time::timeout(
                    self.timeout,
                    spiffe::transport::connector::connect(&endpoint),
                )
                .await
                .map_err(|_| unreachable(format!("no connection within {:?}", self.timeout)))?
                .map_err(|err| unreachable(chain(&err)))?;
                let (latest, receiver) = watch::channel(None);
                let task = tokio::spawn(follow_bundles(
                    channel.clone(),
                    latest,
                    self.changes.clone(),
                ));
                Ok(Connected {
                    channel,
                    bundles: Follower {
                        latest: receiver,
                        task,
                    },
                })
            })
            .await
    }

    /// `id`'s SVID stream, opened unless one is open.
    fn follow(&self, id: &SpiffeId, connected: &Connected) -> watch::Receiver<Latest<Svid>> {
        let mut svids = self.lock_svids();
        if let Some(follower) = svids.get(id)
            && !follower.task.is_finished()
        {
            return follower.latest.clone();
        }
        let (latest, receiver) = watch::channel(None);
        let task = tokio::spawn(follow_svids(
            connected.channel.clone(),
            id.clone(),
            latest,
            self.changes.clone(),
        ));
        svids.insert(
            id.clone(),
            Follower {
                latest: receiver.clone(),
                task,
            },
        );
        receiver
    }

    /// The latest SVID, waiting for the first one, or for the agent's rotation if the one held
    /// is past half its life (so a renewal is not answered with the certificate being renewed
    /// while the agent is about to rotate it). Past the wait, a still-valid SVID is returned.
    async fn current_svid(
        &self,
        id: &SpiffeId,
        latest: &mut watch::Receiver<Latest<Svid>>,
    ) -> Result<Arc<Svid>, SpireError> {
        let now = SystemTime::now();
        let settled = |latest: &Latest<Svid>| match latest {
            None => false,
            Some(Err(_)) => true,
            Some(Ok(svid)) => svid.refresh_at() > now,
        };
        // Timing out (or the stream task ending) just means: take what is there.
        let _ = tokio::time::timeout(self.timeout, latest.wait_for(settled)).await;
        let held = latest.borrow().clone();
        match held {
            Some(Ok(svid)) if svid.not_after > SystemTime::now() => Ok(svid),
            Some(Err(err)) => Err(err),
            _ => Err(SpireError::Timeout {
                what: format!("valid X.509 SVID for {id}"),
                waited: self.timeout,
            }),
        }
    }

    /// The CA certificates of `id`'s trust domain.
    async fn roots(
        &self,
        id: &SpiffeId,
        connected: &Connected,
    ) -> Result<Vec<CertificateDer<'static>>, SpireError> {
        let mut latest = connected.bundles.latest.clone();
        let _ = tokio::time::timeout(self.timeout, latest.wait_for(Option::is_some)).await;
        let held = latest.borrow().clone();
        let bundles = match held {
            Some(Ok(bundles)) => bundles,
            Some(Err(err)) => return Err(err),
            None => {
                return Err(SpireError::Timeout {
                    what: "X.509 bundles".into(),
                    waited: self.timeout,
                });
            }
        };
        let missing = || SpireError::NoBundle {
            trust_domain: id.trust_domain().to_string(),
            have: bundles.iter().map(|(td, _)| td.to_string()).collect(),
        };
        let trust_domain = spiffe::TrustDomain::new(id.trust_domain()).map_err(|_| missing())?;
        let bundle = bundles.get(&trust_domain).ok_or_else(missing)?;
        Ok(bundle
            .authorities()
            .iter()
            .map(|ca| CertificateDer::from(ca.as_bytes().to_vec()))
            .collect())
    }

    fn lock_svids(&self) -> MutexGuard<'_, HashMap<SpiffeId, Follower<Svid>>> {
        // Inserts and removes are single calls: a panic elsewhere cannot leave the map torn.
        self.svids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl IdentitySource for SpireSource {
    fn issue<'a>(
        &'a self,
        id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>> {
        Box::pin(async move { Ok(self.issue_svid(id).await?) })
    }
}

/// The selectors the agent matches `id`'s registration entries against.
fn selectors(id: &SpiffeId) -> Vec<Selector> {
    vec![
        Selector::K8s(K8s::Namespace(id.namespace().to_string())),
        Selector::K8s(K8s::ServiceAccount(id.service_account().to_string())),
    ]
}

fn selectors_text(id: &SpiffeId) -> String {
    format!("k8s:ns:{},k8s:sa:{}", id.namespace(), id.service_account())
}

/// Follows `id`'s SVIDs for as long as the task lives, reopening the stream with backoff.
async fn follow_svids(
    channel: Channel,
    id: SpiffeId,
    latest: watch::Sender<Latest<Svid>>,
    changes: Arc<watch::Sender<u64>>,
) {
    let mut client = SvidClient::new(channel);
    let mut retry = FIRST_RETRY;
    loop {
        let request = SubscribeToX509sviDsRequest {
            selectors: selectors(&id).into_iter().map(Into::into).collect(),
            pid: 0,
        };
        let failure = match client.subscribe_to_x509svi_ds(request).await {
            Err(status) => chain(&status),
            Ok(response) => {
                let mut updates = response.into_inner();
                loop {
                    match updates.message().await {
                        Ok(Some(update)) => {
                            retry = FIRST_RETRY;
                            publish(&latest, &changes, pick(&id, &update).map(Arc::new));
                        }
                        Ok(None) => break "the agent ended the stream".to_string(),
                        Err(status) => break chain(&status),
                    }
                }
            }
        };
        let stream = format!("X.509 SVIDs for {id}");
        tracing::warn!(%id, error = %failure, retry_in = ?retry, "SPIRE SVID stream failed");
        keep_or_fail(
            &latest,
            SpireError::Stream {
                stream,
                reason: failure,
            },
        );
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}

/// Follows the X.509 bundles for as long as the task lives, reopening the stream with backoff.
async fn follow_bundles(
    channel: Channel,
    latest: watch::Sender<Latest<spiffe::X509BundleSet>>,
    changes: Arc<watch::Sender<u64>>,
) {
    let client = spire_api::DelegatedIdentityClient::new(channel);
    let mut retry = FIRST_RETRY;
    loop {
        let failure = match client.stream_x509_bundles().await {
            Err(err) => chain(&err),
            Ok(updates) => {
                let mut updates = std::pin::pin!(updates);
                loop {
                    match updates.next().await {
                        Some(Ok(bundles)) => {
                            retry = FIRST_RETRY;
                            publish(&latest, &changes, Ok(Arc::new(bundles)));
                        }
                        Some(Err(err)) => break chain(&err),
                        None => break "the agent ended the stream".to_string(),
                    }
                }
            }
        };
        tracing::warn!(error = %failure, retry_in = ?retry, "SPIRE bundle stream failed");
        keep_or_fail(
            &latest,
            SpireError::Stream {
                stream: "X.509 bundles".into(),
                reason: failure,
            },
        );
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}

/// An answer from the agent replaces what was held, whatever it says.
fn publish<T>(
    latest: &watch::Sender<Latest<T>>,
    changes: &watch::Sender<u64>,
    update: Result<Arc<T>, SpireError>,
) {
    latest.send_replace(Some(update));
    changes.send_modify(|generation| *generation += 1);
}

/// A broken stream does not displace a value the agent sent: it stays usable while it is valid
/// (`current_svid` checks expiry), and the stream is reopened meanwhile.
fn keep_or_fail<T>(latest: &watch::Sender<Latest<T>>, err: SpireError) {
    latest.send_if_modified(|held| {
        if matches!(held, Some(Ok(_))) {
            return false;
        }
        *held = Some(Err(err));
        true
    });
}

/// The SVID for `id` among those the agent matched to its selectors.
fn pick(id: &SpiffeId, update: &SubscribeToX509sviDsResponse) -> Result<Svid, SpireError> {
    let wanted = id.to_string();
    let mut got = Vec::new();
    for entry in &update.x509_svids {
        let Some(svid) = &entry.x509_svid else {
            continue;
        };
        let mut der = Vec::new();
        for cert in &svid.cert_chain {
            der.extend_from_slice(cert);
        }
        let parsed = match spiffe::X509Svid::parse_from_der(&der, &entry.x509_svid_key[..]) {
            Ok(parsed) => parsed,
            Err(err) => {
                got.push(format!("an unparseable SVID ({err})"));
                continue;
            }
        };
        if parsed.spiffe_id().to_string() == wanted {
            return svid_from(&wanted, &parsed);
        }
        got.push(parsed.spiffe_id().to_string());
    }
    Err(SpireError::WrongIdentity {
        id: wanted,
        selectors: selectors_text(id),
        got,
    })
}

fn svid_from(id: &str, svid: &spiffe::X509Svid) -> Result<Svid, SpireError> {
    let bad = |reason: String| SpireError::BadSvid {
        id: id.to_string(),
        reason,
    };
    let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes())
        .map_err(|err| bad(format!("leaf certificate: {err}")))?;
    let key = rcgen::KeyPair::try_from(svid.private_key().as_bytes())
        .map_err(|err| bad(format!("private key: {err}")))?;
    if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(bad(
            "the private key does not belong to the certificate".into()
        ));
    }
    let validity = leaf.validity();
    Ok(Svid {
        chain: svid
            .cert_chain()
            .iter()
            .map(|cert| CertificateDer::from(cert.as_bytes().to_vec()))
            .collect(),
        key: PrivatePkcs8KeyDer::from(svid.private_key().as_bytes().to_vec()),
        not_before: unix_time(validity.not_before.timestamp()),
        not_after: unix_time(validity.not_after.timestamp()),
    })
}

fn unix_time(seconds: i64) -> SystemTime {
    u64::try_from(seconds)
        .map(|seconds| UNIX_EPOCH + Duration::from_secs(seconds))
        .unwrap_or(UNIX_EPOCH)
}

/// An error with its causes, for a message that says what actually went wrong.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
#[path = "spire_tests.rs"]
mod tests;
