//! The Delta ADS stream to the control plane (PROTOCOL.md §3.1–3.3): one bidirectional
//! `DeltaAggregatedResources` stream, a wildcard subscription per type with the versions held
//! as `initial_resource_versions`, ACK/NACK of every response, reconnect with backoff. It hands
//! raw resources to a [`ResourceSink`] and knows nothing of what they mean; it never touches
//! the sink on a disconnect, so the last state keeps serving.
//!
//! Rules it follows, beyond the protocol's:
//! - A response for a type that was not subscribed is ignored with a warning and neither ACKed
//!   nor NACKed: the server is told nothing about a type this client does not hold.
//! - Backoff between attempts starts at [`ClientSettings::backoff_initial`] and doubles up to
//!   [`ClientSettings::backoff_max`]; it goes back to the start after a stream that delivered
//!   at least one response (it was healthy, whatever ended it) and after a stream the server
//!   ended cleanly. Refusals (a wrong token), connect failures and streams that fail before
//!   their first response keep doubling it. Each wait gets up to half again at random (jitter).
//! - Liveness is HTTP/2 keepalive on the channel: a control plane that goes silent at the TCP
//!   level fails the stream after `keepalive_interval + keepalive_timeout`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use prost::Message as _;
use prost_types::value::Kind;
use tokio::sync::{mpsc, watch};

use super::metrics::{TerminationReason, XdsMetrics};
use super::{RawResource, ResourceSink};
use crate::config::ControlPlaneConfig;
use crate::grpc::{CallAuth, GrpcError, Target};
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use crate::proto::type_url;

/// gRPC's `INVALID_ARGUMENT`, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

/// Tunables of the stream; the defaults are ztunnel's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// Type URLs subscribed (wildcard), in the order their first requests are sent.
    pub types: Vec<String>,
    /// Types whose first response readiness waits for ([`XdsStatus::pending`]). By default
    /// Address and Authorization: istiod never answers ztund's DestinationRule type.
    pub ready_types: Vec<String>,
    /// First wait before a reconnect.
    pub backoff_initial: Duration,
    /// Longest wait before a reconnect.
    pub backoff_max: Duration,
    /// HTTP/2 PING interval on the channel.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the stream is failed.
    pub keepalive_timeout: Duration,
    /// Largest response accepted (200 MiB, as ztunnel).
    pub max_message_bytes: usize,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            types: vec![
                type_url::ADDRESS.into(),
                type_url::AUTHORIZATION.into(),
                type_url::DESTINATION_RULE.into(),
            ],
            ready_types: vec![type_url::ADDRESS.into(), type_url::AUTHORIZATION.into()],
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(15),
            keepalive_interval: crate::grpc::KEEPALIVE_INTERVAL,
            keepalive_timeout: crate::grpc::KEEPALIVE_TIMEOUT,
            max_message_bytes: 200 << 20,
        }
    }
}

/// The stream's state as readiness and `/config_dump` see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XdsStatus {
    /// A stream is open now.
    pub connected: bool,
    /// Types of which at least one response was applied and ACKed or NACKed.
    pub received: BTreeSet<String>,
    /// The types readiness waits for ([`ClientSettings::ready_types`]).
    pub required: Vec<String>,
}

impl XdsStatus {
    /// Required types whose first response has not been applied yet.
    pub fn pending(&self) -> Vec<&str> {
        self.required
            .iter()
            .filter(|t| !self.received.contains(*t))
            .map(String::as_str)
            .collect()
    }

    /// Every required type has had its first response applied.
    pub fn ready(&self) -> bool {
        self.pending().is_empty()
    }
}

/// Why one attempt at a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("control plane {address}: {source}")]
    Setup {
        address: String,
        #[source]
        source: GrpcError,
    },
    #[error("control plane {address} refused the stream: {code:?}: {message}")]
    Refused {
        address: String,
        code: tonic::Code,
        message: String,
    },
    #[error("control plane {address}: stream failed: {code:?}: {message}")]
    Stream {
        address: String,
        code: tonic::Code,
        message: String,
    },
}

/// A Delta ADS client for one control plane. Build it, take [`XdsClient::status`] receivers,
/// then [`XdsClient::run`] it as a task.
#[derive(Debug)]
pub struct XdsClient {
    target: Target,
    auth: CallAuth,
    node: Node,
    settings: ClientSettings,
    metrics: XdsMetrics,
    status: std::sync::Arc<watch::Sender<XdsStatus>>,
}

/// The node id and metadata ztunnel sends (PROTOCOL.md §3.2), so istiod serves this node as a
/// ztunnel: `ztunnel~IP~POD.NS~NS.svc.cluster.local`. The five derived metadata keys win over
/// a same-named `metadata` entry, so `CLUSTER_ID` always matches the `clusterid` header.
pub fn node(config: &ControlPlaneConfig, node_name: &str) -> Node {
    let ip = config
        .instance_ip
        .map_or_else(|| "1.1.1.1".to_string(), |ip| ip.to_string());
    let pod = config
        .pod_name
        .clone()
        .unwrap_or_else(|| format!("ztund-{node_name}"));
    let ns = &config.pod_namespace;
    let mut fields = BTreeMap::new();
    let entries = config.metadata.iter().map(|(k, v)| (k.clone(), v.clone()));
    let derived = [
        ("NAME", pod.clone()),
        ("NAMESPACE", ns.clone()),
        ("INSTANCE_IPS", ip.clone()),
        ("NODE_NAME", node_name.to_string()),
        ("CLUSTER_ID", config.cluster_id.clone()),
    ]
    .map(|(k, v)| (k.to_string(), v));
    for (key, value) in entries.chain(derived) {
        let value = prost_types::Value {
            kind: Some(Kind::StringValue(value)),
        };
        fields.insert(key, value);
    }
    Node {
        id: format!("ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"),
        cluster: String::new(),
        metadata: Some(prost_types::Struct { fields }),
        build_version: String::new(),
    }
}

impl XdsClient {
    /// A client for `config`'s control plane, as node `node_name` (`Config.node`).
    pub fn new(config: &ControlPlaneConfig, node_name: &str, settings: ClientSettings) -> Self {
        let target = Target {
            address: config.address.clone(),
            root_cert: config.root_cert.clone(),
            server_name: config.server_name.clone(),
        };
        let auth = CallAuth {
            token_file: config.token_file.clone(),
            cluster_id: config.cluster_id.clone(),
        };
        let (status, _) = watch::channel(XdsStatus {
            required: settings.ready_types.clone(),
            ..XdsStatus::default()
        });
        XdsClient {
            target,
            auth,
            node: node(config, node_name),
            settings,
            metrics: XdsMetrics::new(),
            status: std::sync::Arc::new(status),
        }
    }

    /// Records into `metrics` (registered by the caller) instead of private ones.
    pub fn with_metrics(mut self, metrics: XdsMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Reports into `previous`'s status instead of its own: a client restarted after a
    /// failure keeps the receivers readiness and `/config_dump` hold.
    pub fn sharing_status_of(mut self, previous: &XdsClient) -> Self {
        self.status = previous.status.clone();
        self
    }

    /// The node sent in each type's first request.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Connection state and which types have had their first response; updated as it changes.
    pub fn status(&self) -> watch::Receiver<XdsStatus> {
        self.status.subscribe()
    }

    /// Runs the stream until `shutdown` resolves, reconnecting on every failure, and returns
    /// the sink. After each applied response (ACKed or NACKed) `on_applied(&mut sink,
    /// type_url)` is called: the place to rebuild the snapshot.
    pub async fn run<S, F>(
        self,
        mut sink: S,
        mut on_applied: F,
        shutdown: impl Future<Output = ()>,
    ) -> S
    where
        S: ResourceSink,
        F: FnMut(&mut S, &str),
    {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Backoff::new(self.settings.backoff_initial, self.settings.backoff_max);
        loop {
            let mut responses = 0u64;
            let outcome = tokio::select! {
                outcome = self.stream(&mut sink, &mut on_applied, &mut responses) => outcome,
                () = &mut shutdown => break,
            };
            self.set_connected(false);
            let reason = match &outcome {
                Ok(()) => {
                    tracing::info!(address = %self.target.address, "xDS stream ended by the control plane");
                    TerminationReason::Complete
                }
                Err(err) => {
                    tracing::warn!(%err, "xDS stream");
                    match err {
                        XdsError::Setup { .. } => TerminationReason::ConnectionError,
                        XdsError::Refused { .. } | XdsError::Stream { .. } => {
                            TerminationReason::Error
                        }
                    }
                }
            };
            self.metrics.terminated(reason);
            if responses > 0 || outcome.is_ok() {
                backoff.reset();
            }
            let delay = jitter(backoff.next_delay());
            tracing::debug!(?delay, "reconnecting to the control plane");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = &mut shutdown => break,
            }
        }
        self.set_connected(false);
        sink
    }

    /// One stream: connect, send the initial requests, then apply and answer responses until
    /// the stream ends. `Ok` is a clean end by the server.
    async fn stream<S, F>(
        &self,
        sink: &mut S,
        on_applied: &mut F,
        responses: &mut u64,
    ) -> Result<(), XdsError>
    where
        S: ResourceSink,
        F: FnMut(&mut S, &str),
    {
        let address = &self.target.address;
        let setup = |source| XdsError::Setup {
            address: address.clone(),
            source,
        };
        let channel = self
            .target
            .channel_with_keepalive(
                self.settings.keepalive_interval,
                self.settings.keepalive_timeout,
            )
            .map_err(setup)?;
        let (requests, mut outbox) = mpsc::unbounded_channel();
        for type_url in &self.settings.types {
            let _ = requests.send(self.initial_request(type_url, &*sink));
        }
        let body = futures::stream::poll_fn(move |cx| outbox.poll_recv(cx));
        let mut request = tonic::Request::new(body);
        self.auth.apply(&mut request).map_err(setup)?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(self.settings.max_message_bytes);
        let mut inbound = match client.delta_aggregated_resources(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(refused(address, &status, status_is_transport(&status))),
        };
        tracing::info!(%address, node = %self.node.id, "xDS stream open");
        self.set_connected(true);
        loop {
            let response = match inbound.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Ok(()),
                Err(status) => {
                    return Err(XdsError::Stream {
                        address: address.clone(),
                        code: status.code(),
                        message: status.message().to_string(),
                    });
                }
            };
            *responses += 1;
            if let Some(reply) = self.answer(response, sink, on_applied) {
                // The receiver lives as long as the call; a send can only fail after it ended,
                // which the next `message()` reports.
                let _ = requests.send(reply);
            }
        }
    }

    /// The first request of a type: the node, a wildcard subscription and the versions held.
    fn initial_request<S: ResourceSink>(&self, type_url: &str, sink: &S) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: type_url.to_string(),
            initial_resource_versions: sink.versions(type_url).into_iter().collect(),
            ..DeltaDiscoveryRequest::default()
        }
    }

    /// Applies one response and builds its ACK or NACK; `None` for a type not subscribed.
    fn answer<S, F>(
        &self,
        response: DeltaDiscoveryResponse,
        sink: &mut S,
        on_applied: &mut F,
    ) -> Option<DeltaDiscoveryRequest>
    where
        S: ResourceSink,
        F: FnMut(&mut S, &str),
    {
        let type_url = response.type_url.clone();
        if !self.settings.types.contains(&type_url) {
            tracing::warn!(%type_url, nonce = %response.nonce, "ignoring an xDS response for a type not subscribed");
            return None;
        }
        self.metrics.message(&type_url, response.encoded_len());
        let added = response
            .resources
            .into_iter()
            .map(|r| RawResource {
                name: r.name,
                version: r.version,
                resource: r.resource,
            })
            .collect();
        let rejected = sink.apply(&type_url, added, response.removed_resources);
        on_applied(sink, &type_url);
        self.metrics
            .set_resources(&type_url, sink.versions(&type_url).len());
        self.status
            .send_if_modified(|status| status.received.insert(type_url.clone()));
        let error_detail = (!rejected.is_empty()).then(|| {
            self.metrics.nack(&type_url);
            let message = rejected
                .iter()
                .map(|(name, reason)| format!("{name}: {reason}"))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(%type_url, nonce = %response.nonce, %message, "NACK");
            crate::proto::google::rpc::Status {
                code: INVALID_ARGUMENT,
                message,
                details: Vec::new(),
            }
        });
        Some(DeltaDiscoveryRequest {
            type_url,
            response_nonce: response.nonce,
            error_detail,
            ..DeltaDiscoveryRequest::default()
        })
    }

    fn set_connected(&self, connected: bool) {
        self.metrics.set_connected(connected);
        self.status.send_if_modified(|status| {
            let changed = status.connected != connected;
            status.connected = connected;
            changed
        });
    }
}

/// A status returned before the stream opened: a connect failure (tonic reports those as
/// `Unavailable` with a transport source) or a refusal by the server.
fn refused(address: &str, status: &tonic::Status, transport: bool) -> XdsError {
    if transport {
        XdsError::Setup {
            address: address.to_string(),
            source: GrpcError::Connect {
                address: address.to_string(),
                reason: status.message().to_string(),
            },
        }
    } else {
        XdsError::Refused {
            address: address.to_string(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// Whether a status came from the transport (no HTTP/2 connection) rather than the server.
fn status_is_transport(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    status.code() == tonic::Code::Unavailable
        && status
            .source()
            .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some())
}

/// Exponential reconnect backoff.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }

    /// The wait before the next attempt; doubles the one after it, up to `max`.
    fn next_delay(&mut self) -> Duration {
        let delay = self.next.min(self.max);
        self.next = (delay * 2).min(self.max);
        delay
    }
}

/// Adds up to half again to `delay`, so that the nodes a control plane restart dropped all at
/// once do not come back in step; never less than `delay`, so the doubling still holds.
fn jitter(delay: Duration) -> Duration {
    delay + delay.mul_f64(rand::random::<f64>() * 0.5)
}

#[cfg(test)]
#[path = "client_testing.rs"]
mod testing;

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
