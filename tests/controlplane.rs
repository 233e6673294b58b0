//! The real `ztund controlplane` on 127.0.0.1 with a temporary directory, talked to by tonic
//! clients over TLS verified with the state directory's root: node tokens decide who gets
//! anything, the first answer holds every resource, an edit pushes only what changed (within a
//! second), a bad file is refused while the last good config keeps being served, a reconnect's
//! `initial_resource_versions` is honoured, and the CA signs only for identities running on the
//! asking node, with a key that survives a restart.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::mpsc;
use tonic::{Code, Status, Streaming};
use ztund::grpc::Target;
use ztund::proto::envoy::config::core::v3::Node;
use ztund::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ztund::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ztund::proto::istio::security::Authorization;
use ztund::proto::istio::v1::auth::IstioCertificateRequest;
use ztund::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use ztund::proto::type_url::{ADDRESS, AUTHORIZATION};

const PODS: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default, labels: {app: sleep}}
spec: {nodeName: node1, serviceAccountName: sleep}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: default, labels: {app: echo}}
spec: {nodeName: node2, serviceAccountName: echo}
status: {podIP: 10.1.2.2}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {app: echo}, ports: [{port: 80, targetPort: 8080}]}
";

fn policies(action: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-sleep, namespace: default}}\nspec: {{selector: {{matchLabels: {{app: echo}}}}, action: {action}, rules: [{{from: [{{source: {{principals: [cluster.local/ns/default/sa/sleep]}}}}]}}]}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: default}}\nspec: {{mtls: {{mode: STRICT}}}}\n"
    )
}

const BROKEN: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: default}\nspec: {nodeName: node1}\nstatus: {podIP: not-an-ip}\n";

/// A running `ztund controlplane`, killed when dropped.
struct ControlPlane {
    child: Child,
    port: u16,
    state: PathBuf,
    log: Arc<Mutex<String>>,
}

impl ControlPlane {
    fn start(dir: &Path, state: &Path) -> ControlPlane {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ztund"))
            .args(["controlplane", "--listen", "127.0.0.1:0", "--dir"])
            .arg(dir)
            .arg("--state-dir")
            .arg(state)
            .env("ZTUND_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting ztund controlplane");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut cp = ControlPlane {
            child,
            port: 0,
            state: state.to_path_buf(),
            log,
        };
        let line = cp.wait_for_log(&["serving Delta ADS"], Duration::from_secs(20));
        let address = line
            .split_whitespace()
            .find_map(|word| word.strip_prefix("address="))
            .expect("the listen address is logged");
        cp.port = address.rsplit(':').next().unwrap().parse().unwrap();
        cp
    }

    /// Waits for a log line holding every one of `words`, and returns it.
    fn wait_for_log(&mut self, words: &[&str], limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log.lock().unwrap().clone();
            if let Some(line) = log.lines().find(|l| words.iter().all(|w| l.contains(w))) {
                return line.to_string();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("ztund controlplane exited ({status}):\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {words:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn root(&self) -> PathBuf {
        self.state.join("ca/root-cert.pem")
    }

    fn channel(&self) -> tonic::transport::Channel {
        Target {
            address: format!("https://127.0.0.1:{}", self.port),
            root_cert: self.root(),
            server_name: None,
        }
        .channel()
        .unwrap()
    }

    fn token(&self, node: &str, rotate: bool) -> String {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ztund"));
        command
            .args(["controlplane", "token", "--node", node, "--state-dir"])
            .arg(&self.state);
        if rotate {
            command.arg("--rotate");
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- controlplane log -----\n{}", self.log.lock().unwrap());
        }
    }
}

/// One Delta ADS stream as a node opens it.
struct Xds {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

fn node(name: &str) -> Node {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "NODE_NAME".to_string(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(name.into())),
        },
    );
    Node {
        id: format!("ztunnel~10.0.0.1~ztunnel-{name}.istio-system~istio-system.svc.cluster.local"),
        metadata: Some(prost_types::Struct { fields }),
        ..Node::default()
    }
}

fn subscription(
    type_url: &str,
    node_name: &str,
    held: HashMap<String, String>,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node(node_name)),
        type_url: type_url.into(),
        initial_resource_versions: held,
        ..Default::default()
    }
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

impl Xds {
    /// Opens a stream and subscribes to `types` (wildcard), with the versions held per type.
    async fn open(
        cp: &ControlPlane,
        token: Option<&str>,
        node_name: &str,
        types: &[(&str, HashMap<String, String>)],
    ) -> Result<Xds, Status> {
        let (tx, rx) = mpsc::channel(16);
        for (t, held) in types {
            tx.send(subscription(t, node_name, held.clone()))
                .await
                .unwrap();
        }
        let requests =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let mut client = AggregatedDiscoveryServiceClient::new(cp.channel());
        let rx = client
            .delta_aggregated_resources(with_token(requests, token))
            .await?
            .into_inner();
        Ok(Xds { tx, rx })
    }

    /// The next response within `limit` (`None` if none came), ACKed.
    async fn next(&mut self, limit: Duration) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        match tokio::time::timeout(limit, self.rx.message()).await {
            Err(_) => Ok(None),
            Ok(message) => {
                let response = message?.expect("stream ended");
                let ack = DeltaDiscoveryRequest {
                    type_url: response.type_url.clone(),
                    response_nonce: response.nonce.clone(),
                    ..Default::default()
                };
                let _ = self.tx.send(ack).await;
                Ok(Some(response))
            }
        }
    }

    /// The first response of each of `n` types.
    async fn initial(&mut self, n: usize) -> HashMap<String, DeltaDiscoveryResponse> {
        let mut by_type = HashMap::new();
        while by_type.len() < n {
            let response = self
                .next(Duration::from_secs(5))
                .await
                .unwrap()
                .expect("initial response");
            by_type.insert(response.type_url.clone(), response);
        }
        by_type
    }
}

fn names(response: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut names: Vec<String> = response.resources.iter().map(|r| r.name.clone()).collect();
    names.sort();
    names
}

fn versions(response: &DeltaDiscoveryResponse) -> HashMap<String, String> {
    response
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

fn mesh_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("10-pods.yaml"), PODS).unwrap();
    std::fs::write(dir.path().join("20-policies.yaml"), policies("DENY")).unwrap();
    dir
}

/// Replaces a file in one rename, as editors and ConfigMaps do.
fn save(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

const ALL: [&str; 5] = [
    "Kubernetes//Pod/default/echo",
    "Kubernetes//Pod/default/sleep",
    "default/echo.default.svc.cluster.local",
    "default/deny-sleep",
    "istio-system/istio_converted_static_strict",
];

#[tokio::test]
async fn nodes_without_a_valid_token_get_nothing() {
    let (dir, state) = (mesh_dir(), tempfile::tempdir().unwrap());
    let cp = ControlPlane::start(dir.path(), state.path());
    let token = cp.token("node1", false);
    let types = [(ADDRESS, HashMap::new())];

    async fn refused(result: Result<Xds, Status>) -> Status {
        match result {
            Err(status) => status,
            Ok(mut xds) => match xds.next(Duration::from_secs(2)).await {
                Err(status) => status,
                Ok(response) => panic!("a refused stream was sent {response:?}"),
            },
        }
    }
    let missing = refused(Xds::open(&cp, None, "node1", &types).await).await;
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    let wrong = refused(Xds::open(&cp, Some("0123abcd"), "node1", &types).await).await;
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    let other_node = refused(Xds::open(&cp, Some(&token), "node2", &types).await).await;
    assert_eq!(other_node.code(), Code::PermissionDenied, "{other_node:?}");
    assert!(other_node.message().contains("node2"), "{other_node:?}");

    let mut ca = IstioCertificateServiceClient::new(cp.channel());
    let status = ca
        .create_certificate(with_token(IstioCertificateRequest::default(), Some("nope")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // The good token works; rotated, the old one stops working without a restart.
    let mut xds = Xds::open(&cp, Some(&token), "node1", &types).await.unwrap();
    assert!(!xds.initial(1).await[ADDRESS].resources.is_empty());
    let rotated = cp.token("node1", true);
    let old = refused(Xds::open(&cp, Some(&token), "node1", &types).await).await;
    assert_eq!(old.code(), Code::Unauthenticated, "{old:?}");
    let mut xds = Xds::open(&cp, Some(&rotated), "node1", &types)
        .await
        .unwrap();
    assert!(!xds.initial(1).await[ADDRESS].resources.is_empty());
}

#[tokio::test]
async fn everything_first_then_only_what_changed_and_bad_files_are_refused() {
    let (dir, state) = (mesh_dir(), tempfile::tempdir().unwrap());
    let mut cp = ControlPlane::start(dir.path(), state.path());
    let token = cp.token("node1", false);
    let types = [(ADDRESS, HashMap::new()), (AUTHORIZATION, HashMap::new())];
    let mut xds = Xds::open(&cp, Some(&token), "node1", &types).await.unwrap();
    let initial = xds.initial(2).await;
    let mut all = names(&initial[ADDRESS]);
    all.extend(names(&initial[AUTHORIZATION]));
    all.sort();
    let mut expected: Vec<String> = ALL.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(all, expected);

    // A policy edit: only that Authorization is pushed, within a second.
    save(dir.path(), "20-policies.yaml", &policies("ALLOW"));
    let written = Instant::now();
    let pushed = xds
        .next(Duration::from_secs(3))
        .await
        .unwrap()
        .expect("a push");
    let took = written.elapsed();
    assert_eq!(pushed.type_url, AUTHORIZATION);
    assert_eq!(names(&pushed), ["default/deny-sleep"]);
    assert!(pushed.removed_resources.is_empty());
    let policy = Authorization::decode(
        pushed.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap();
    assert_eq!(policy.action, 0, "ALLOW");
    assert!(took < Duration::from_secs(1), "pushed after {took:?}");
    assert!(
        xds.next(Duration::from_millis(600))
            .await
            .unwrap()
            .is_none(),
        "one push only"
    );

    // A bad file: refused, naming file, document and field; nothing is pushed.
    save(dir.path(), "30-broken.yaml", BROKEN);
    cp.wait_for_log(
        &[
            "configuration refused",
            "30-broken.yaml",
            "document 1",
            "status.podIP",
        ],
        Duration::from_secs(5),
    );
    assert!(
        xds.next(Duration::from_millis(300))
            .await
            .unwrap()
            .is_none()
    );
    // A new node still gets the last good configuration.
    let mut late = Xds::open(&cp, Some(&token), "node1", &types).await.unwrap();
    let initial = late.initial(2).await;
    assert_eq!(names(&initial[ADDRESS]).len(), 3);
    let policy = &initial[AUTHORIZATION]
        .resources
        .iter()
        .find(|r| r.name == "default/deny-sleep")
        .unwrap();
    let policy = Authorization::decode(policy.resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(policy.action, 0, "the last good (edited) policy");
}

#[tokio::test]
async fn a_reconnect_gets_only_what_it_does_not_hold() {
    let (dir, state) = (mesh_dir(), tempfile::tempdir().unwrap());
    let cp = ControlPlane::start(dir.path(), state.path());
    let token = cp.token("node1", false);
    let first = {
        let types = [(ADDRESS, HashMap::new()), (AUTHORIZATION, HashMap::new())];
        let mut xds = Xds::open(&cp, Some(&token), "node1", &types).await.unwrap();
        xds.initial(2).await
    };
    let held_addresses = versions(&first[ADDRESS]);
    let mut held_policies = versions(&first[AUTHORIZATION]);
    held_policies.insert("default/deny-sleep".into(), "stale".into());
    held_policies.insert("default/gone".into(), "1".into());
    let types = [(ADDRESS, held_addresses), (AUTHORIZATION, held_policies)];
    let mut xds = Xds::open(&cp, Some(&token), "node1", &types).await.unwrap();
    let again = xds.initial(2).await;
    assert!(
        again[ADDRESS].resources.is_empty(),
        "{:?}",
        names(&again[ADDRESS])
    );
    assert!(again[ADDRESS].removed_resources.is_empty());
    assert_eq!(names(&again[AUTHORIZATION]), ["default/deny-sleep"]);
    assert_eq!(again[AUTHORIZATION].removed_resources, ["default/gone"]);
}

fn csr(uri: &str) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn ca_request(uri: &str, impersonate: bool) -> IstioCertificateRequest {
    let mut fields = std::collections::BTreeMap::new();
    if impersonate {
        fields.insert(
            "ImpersonatedIdentity".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(uri.into())),
            },
        );
    }
    IstioCertificateRequest {
        csr: csr(uri),
        validity_duration: 3600,
        metadata: Some(prost_types::Struct { fields }),
    }
}

fn der(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(Result::unwrap)
        .collect()
}

/// Verifies a chain (leaf first, roots last) against the root file, and returns the leaf's URI.
fn verify(chain: &[String], root_file: &Path) -> String {
    assert!(
        chain.len() >= 2 && chain.iter().all(|pem| pem.ends_with('\n')),
        "{chain:?}"
    );
    let root_pem = std::fs::read_to_string(root_file).unwrap();
    assert_eq!(
        chain.last().unwrap(),
        &root_pem,
        "the root bundle comes last"
    );
    let roots = der(&root_pem);
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let leaf = der(&chain[0]).remove(0);
    let intermediates: Vec<_> = chain[1..chain.len() - 1]
        .iter()
        .flat_map(|p| der(p))
        .collect();
    let end_entity = webpki::EndEntityCert::try_from(&leaf).unwrap();
    let algorithms = ztund::tls::backend().signature_verification_algorithms;
    end_entity
        .verify_for_usage(
            algorithms.all,
            &anchors,
            &intermediates,
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .expect("the leaf chains to root-cert.pem");
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let san = parsed.subject_alternative_name().unwrap().unwrap().value;
    assert!(!parsed.is_ca());
    match &san.general_names[..] {
        [x509_parser::extensions::GeneralName::URI(uri)] => uri.to_string(),
        other => panic!("leaf SANs {other:?}"),
    }
}

#[tokio::test]
async fn the_ca_signs_only_for_workloads_on_the_asking_node_and_survives_a_restart() {
    let (dir, state) = (mesh_dir(), tempfile::tempdir().unwrap());
    let sleep = "spiffe://cluster.local/ns/default/sa/sleep";
    let echo = "spiffe://cluster.local/ns/default/sa/echo";
    let (root_before, token) = {
        let cp = ControlPlane::start(dir.path(), state.path());
        let token = cp.token("node1", false);
        let mut ca = IstioCertificateServiceClient::new(cp.channel());
        let chain = ca
            .create_certificate(with_token(ca_request(sleep, true), Some(&token)))
            .await
            .unwrap()
            .into_inner()
            .cert_chain;
        assert_eq!(verify(&chain, &cp.root()), sleep);

        let refused = ca
            .create_certificate(with_token(ca_request(echo, true), Some(&token)))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(
            refused.message().contains(echo) && refused.message().contains("node1"),
            "{refused:?}"
        );
        let unnamed = ca
            .create_certificate(with_token(ca_request(sleep, false), Some(&token)))
            .await
            .unwrap_err();
        assert_eq!(unnamed.code(), Code::InvalidArgument, "{unnamed:?}");
        let mut mismatch = ca_request(sleep, true);
        mismatch.csr = csr(echo);
        let mismatch = ca
            .create_certificate(with_token(mismatch, Some(&token)))
            .await
            .unwrap_err();
        assert_eq!(mismatch.code(), Code::InvalidArgument, "{mismatch:?}");
        (std::fs::read_to_string(cp.root()).unwrap(), token)
    };

    let cp = ControlPlane::start(dir.path(), state.path());
    assert_eq!(
        std::fs::read_to_string(cp.root()).unwrap(),
        root_before,
        "same root"
    );
    let mut ca = IstioCertificateServiceClient::new(cp.channel());
    let chain = ca
        .create_certificate(with_token(ca_request(sleep, true), Some(&token)))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(
        verify(&chain, &cp.root()),
        sleep,
        "signed by the same CA, token kept"
    );
}
