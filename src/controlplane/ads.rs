//! The Delta ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService`), as istiod
//! serves it to ztunnel (PROTOCOL.md §3): each stream is authenticated by its node token before
//! anything is sent; per type a wildcard (or named) subscription, `initial_resource_versions`
//! honoured, only changed and removed resources pushed, nonces tracked, NACKs logged and not
//! answered with the same version again. [`Session`] is the protocol without I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::Served;
use super::tokens::TokenStore;
use super::translate::Resources;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use crate::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

/// The ADS service: node tokens and the configuration being served.
#[derive(Debug, Clone)]
pub struct Ads {
    pub tokens: Arc<TokenStore>,
    pub served: watch::Receiver<Arc<Served>>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let node = self.tokens.authenticate(&request)?;
        let mut inbound = request.into_inner();
        // The first request names the node; a mismatch is refused before anything is sent.
        let Some(first) = inbound.message().await? else {
            return Err(Status::cancelled("stream closed before its first request"));
        };
        check_node(&node, &first)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(serve_stream(node, first, inbound, self.served.clone(), tx));
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Refuses a request whose node metadata names another node than the token's.
fn check_node(node: &str, request: &DeltaDiscoveryRequest) -> Result<(), Status> {
    let claimed = request
        .node
        .as_ref()
        .and_then(|n| n.metadata.as_ref())
        .and_then(|m| m.fields.get("NODE_NAME"))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        });
    match claimed {
        Some(claimed) if claimed != node => {
            warn!(%node, %claimed, "refused: NODE_NAME differs from the token's node");
            Err(Status::permission_denied(format!(
                "the token is node {node}'s, the request claims NODE_NAME {claimed}"
            )))
        }
        _ => Ok(()),
    }
}

async fn serve_stream(
    node: String,
    first: DeltaDiscoveryRequest,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    mut served: watch::Receiver<Arc<Served>>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) {
    let mut session = Session::new(node.clone());
    let current = served.borrow_and_update().clone();
    for response in session.on_request(first, &current.resources) {
        if tx.send(Ok(response)).await.is_err() {
            return;
        }
    }
    loop {
        let responses = tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    if let Err(status) = check_node(&node, &request) {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    let current = served.borrow().clone();
                    session.on_request(request, &current.resources)
                }
                Ok(None) => {
                    debug!(%node, "stream closed by the node");
                    return;
                }
                Err(status) => {
                    debug!(%node, %status, "stream broken");
                    return;
                }
            },
            changed = served.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = served.borrow_and_update().clone();
                session.on_change(&current.resources)
            }
            () = tx.closed() => return,
        };
        for response in responses {
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
        }
    }
}

/// What one stream's client subscribed to and holds, per type.
#[derive(Debug, Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Name → version the client holds (as far as this server knows).
    held: HashMap<String, String>,
}

impl Subscription {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    fn update(&mut self, subscribe: &[String], unsubscribe: &[String]) {
        for name in subscribe {
            if name == "*" {
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
            }
        }
        for name in unsubscribe {
            if name == "*" {
                self.wildcard = false;
            } else {
                self.names.remove(name);
            }
        }
    }
}

/// The Delta xDS protocol of one stream, without I/O: requests and configuration changes in,
/// responses out.
#[derive(Debug)]
pub struct Session {
    node: String,
    subscriptions: BTreeMap<String, Subscription>,
    /// Nonces sent and not yet answered, with their type.
    pending: HashMap<String, String>,
    next_nonce: u64,
}

impl Session {
    pub fn new(node: String) -> Session {
        Session {
            node,
            subscriptions: BTreeMap::new(),
            pending: HashMap::new(),
            next_nonce: 0,
        }
    }

    /// Handles one request: a subscription (first of its type, or a change of names), an ACK
    /// or a NACK. Unknown types get nothing.
    pub fn on_request(
        &mut self,
        request: DeltaDiscoveryRequest,
        resources: &Resources,
    ) -> Vec<DeltaDiscoveryResponse> {
        let type_url = request.type_url.clone();
        let node = self.node.clone();
        if resources.of(&type_url).is_none() {
            warn!(%node, %type_url, "subscription to a type this server does not serve; nothing sent");
            return Vec::new();
        }
        if !request.response_nonce.is_empty() {
            let known = self.pending.remove(&request.response_nonce).is_some();
            match &request.error_detail {
                Some(error) => warn!(
                    %node, %type_url, nonce = %request.response_nonce, error = %error.message,
                    "NACK: the node rejected resources; not resending that version"
                ),
                None if known => debug!(%node, %type_url, nonce = %request.response_nonce, "ACK"),
                None => {
                    debug!(%node, %type_url, nonce = %request.response_nonce, "ACK of an old nonce")
                }
            }
        }
        let first = !self.subscriptions.contains_key(&type_url);
        let subscription = self.subscriptions.entry(type_url.clone()).or_default();
        if first {
            // An empty first subscription is a wildcard (the "legacy" form ztunnel uses).
            subscription.wildcard = request.resource_names_subscribe.is_empty();
            subscription.held = request.initial_resource_versions.clone();
        } else if request.resource_names_subscribe.is_empty()
            && request.resource_names_unsubscribe.is_empty()
        {
            return Vec::new();
        }
        subscription.update(
            &request.resource_names_subscribe,
            &request.resource_names_unsubscribe,
        );
        self.push(&type_url, resources, first).into_iter().collect()
    }

    /// A new configuration: pushes what changed for every subscribed type.
    pub fn on_change(&mut self, resources: &Resources) -> Vec<DeltaDiscoveryResponse> {
        let types: Vec<String> = self.subscriptions.keys().cloned().collect();
        types
            .iter()
            .filter_map(|t| self.push(t, resources, false))
            .collect()
    }

    /// The difference between what the client holds and what is served; `force` sends a
    /// response even when there is none (the first answer to a subscription).
    fn push(
        &mut self,
        type_url: &str,
        resources: &Resources,
        force: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let served = resources.of(type_url)?;
        let subscription = self.subscriptions.get_mut(type_url)?;
        let mut added = Vec::new();
        for (name, resource) in served {
            if subscription.wants(name) && subscription.held.get(name) != Some(&resource.version) {
                added.push(resource.clone());
            }
        }
        let mut removed = Vec::new();
        subscription.held.retain(|name, _| {
            if !served.contains_key(name) {
                removed.push(name.clone());
                false
            } else {
                subscription.wildcard || subscription.names.contains(name)
            }
        });
        for resource in &added {
            subscription
                .held
                .insert(resource.name.clone(), resource.version.clone());
        }
        if added.is_empty() && removed.is_empty() && !force {
            return None;
        }
        removed.sort();
        self.next_nonce += 1;
        let nonce = format!("{:x}", self.next_nonce);
        self.pending.insert(nonce.clone(), type_url.to_string());
        // Names are logged for small pushes only (a first push may hold thousands).
        let names: Vec<&str> = added.iter().take(10).map(|r| r.name.as_str()).collect();
        info!(
            node = %self.node, %type_url, added = added.len(), removed = removed.len(),
            added_names = ?names, removed_names = ?&removed[..removed.len().min(10)], %nonce, "push"
        );
        Some(DeltaDiscoveryResponse {
            system_version_info: String::new(),
            resources: added,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce,
        })
    }
}

#[cfg(test)]
#[path = "ads_tests.rs"]
mod tests;
