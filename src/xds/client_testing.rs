//! Test world for the xDS client: a fake control plane that speaks real Delta ADS over TLS on
//! 127.0.0.1 (the test drives each accepted stream by hand), a TCP relay that can go silent
//! without closing its sockets, and a sink that rejects names starting with `bad`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::config::ControlPlaneConfig;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use crate::xds::{RawResource, ResourceSink};

/// The token the fake control plane accepts.
pub(super) const TOKEN: &str = "secret";
/// The name its certificate carries (the client's `serverName`).
pub(super) const SERVER_NAME: &str = "xds.test";

/// Waits for `future`, failing the test after 5 s with `what`.
pub(super) async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(5), future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

type Responses = mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>;

/// One stream the fake control plane accepted.
pub(super) struct AcceptedStream {
    pub metadata: MetadataMap,
    requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    responses: Responses,
}

impl AcceptedStream {
    /// The next request the client sent.
    pub async fn request(&mut self) -> DeltaDiscoveryRequest {
        within("a request", self.requests.recv())
            .await
            .expect("the client's request stream ended")
    }

    /// Whether a request arrives within `wait`.
    pub async fn quiet_for(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.requests.recv())
            .await
            .is_err()
    }

    /// Sends a response of `type_url`: `(name, version)` resources and removed names.
    pub fn respond(&self, type_url: &str, nonce: &str, added: &[(&str, &str)], removed: &[&str]) {
        let resources = added
            .iter()
            .map(|(name, version)| Resource {
                name: name.to_string(),
                version: version.to_string(),
                resource: Some(prost_types::Any {
                    type_url: type_url.to_string(),
                    value: Vec::new(),
                }),
                ..Resource::default()
            })
            .collect();
        let response = DeltaDiscoveryResponse {
            type_url: type_url.to_string(),
            nonce: nonce.to_string(),
            resources,
            removed_resources: removed.iter().map(|n| n.to_string()).collect(),
            ..DeltaDiscoveryResponse::default()
        };
        self.responses.send(Ok(response)).expect("stream open");
    }

    /// Ends the stream cleanly (gRPC status OK).
    pub fn close(self) {}

    /// Ends the stream with an error status (`UNAVAILABLE` is what a restarting istiod sends).
    pub fn fail(self, status: tonic::Status) {
        let _ = self.responses.send(Err(status));
    }
}

struct Service {
    streams: mpsc::UnboundedSender<AcceptedStream>,
    refusals: Arc<Mutex<Vec<Instant>>>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type DeltaAggregatedResourcesStream = Pin<
        Box<dyn futures::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send + 'static>,
    >;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        if crate::grpc::bearer_token(&request) != Some(TOKEN) {
            self.refusals.lock().unwrap().push(Instant::now());
            return Err(Status::unauthenticated("bad token"));
        }
        let metadata = request.metadata().clone();
        let mut inbound = request.into_inner();
        let (to_test, requests) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if to_test.send(message).is_err() {
                    break;
                }
            }
        });
        let (responses, mut outbox) = mpsc::unbounded_channel();
        let _ = self.streams.send(AcceptedStream {
            metadata,
            requests,
            responses,
        });
        let body = futures::stream::poll_fn(move |cx| outbox.poll_recv(cx));
        Ok(Response::new(Box::pin(body)))
    }
}

/// A Delta ADS server on 127.0.0.1 with a CA, a serving certificate and a token file.
pub(super) struct FakeControlPlane {
    pub addr: SocketAddr,
    pub root_cert: PathBuf,
    pub token_file: PathBuf,
    pub refusals: Arc<Mutex<Vec<Instant>>>,
    streams: mpsc::UnboundedReceiver<AcceptedStream>,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl FakeControlPlane {
    pub async fn start() -> FakeControlPlane {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec![SERVER_NAME.to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let root_cert = dir.path().join("root.pem");
        std::fs::write(&root_cert, ca.pem()).unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let service = Service {
            streams: streams_tx,
            refusals: refusals.clone(),
        };
        let tls =
            ServerTlsConfig::new().identity(Identity::from_pem(leaf.pem(), key.serialize_pem()));
        let router = Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(AggregatedDiscoveryServiceServer::new(service));
        let task = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming(TcpIncoming::from(listener))
                .await;
        });
        FakeControlPlane {
            addr,
            root_cert,
            token_file,
            refusals,
            streams,
            task,
            _dir: dir,
        }
    }

    /// The next stream a client opened.
    pub async fn accept(&mut self) -> AcceptedStream {
        within("a stream", self.streams.recv())
            .await
            .expect("server running")
    }

    /// A client config for this control plane, dialled at `addr` (the server or a relay).
    pub fn config(&self, addr: SocketAddr) -> ControlPlaneConfig {
        ControlPlaneConfig {
            address: format!("https://{addr}"),
            root_cert: self.root_cert.clone(),
            token_file: Some(self.token_file.clone()),
            cluster_id: "Kubernetes".into(),
            server_name: Some(SERVER_NAME.into()),
            pod_name: None,
            pod_namespace: "istio-system".into(),
            instance_ip: None,
            metadata: BTreeMap::new(),
        }
    }
}

impl Drop for FakeControlPlane {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP relay in front of the control plane; [`Relay::freeze`] makes the connections open
/// now stop forwarding in both directions while their sockets stay open. Later connections
/// flow normally.
pub(super) struct Relay {
    pub addr: SocketAddr,
    live: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let live: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let registry = live.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let frozen = Arc::new(AtomicBool::new(false));
                registry.lock().unwrap().push(frozen.clone());
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, frozen.clone()));
                tokio::spawn(pump(server_read, client_write, frozen));
            }
        });
        Relay { addr, live, task }
    }

    /// Stops every connection open now from forwarding anything more.
    pub fn freeze(&self) {
        for frozen in self.live.lock().unwrap().iter() {
            frozen.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            // Silent, sockets open: hold the bytes forever (until the test's runtime ends).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A sink that keeps name → version per type and rejects names starting with `bad`; clones
/// share their state so a test can look while the client owns one.
#[derive(Debug, Clone, Default)]
pub(super) struct TestSink {
    held: Arc<Mutex<HashMap<String, HashMap<String, String>>>>,
}

impl TestSink {
    /// The names of `type_url` held now, sorted.
    pub fn names(&self, type_url: &str) -> Vec<String> {
        let mut names: Vec<String> = self.versions(type_url).into_keys().collect();
        names.sort();
        names
    }
}

impl ResourceSink for TestSink {
    fn apply(
        &mut self,
        type_url: &str,
        added: Vec<RawResource>,
        removed: Vec<String>,
    ) -> Vec<(String, String)> {
        let mut held = self.held.lock().unwrap();
        let of_type = held.entry(type_url.to_string()).or_default();
        let mut rejected = Vec::new();
        for resource in added {
            if resource.name.starts_with("bad") {
                of_type.remove(&resource.name);
                rejected.push((resource.name, "rejected by the test sink".to_string()));
            } else {
                of_type.insert(resource.name, resource.version);
            }
        }
        for name in removed {
            of_type.remove(&name);
        }
        rejected
    }

    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.held
            .lock()
            .unwrap()
            .get(type_url)
            .cloned()
            .unwrap_or_default()
    }
}
