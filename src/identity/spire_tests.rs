//! Tests of the SPIRE source against a fake SPIRE agent: an in-process tonic server on a unix
//! socket speaking SPIRE's Delegated Identity gRPC service, handing out SVIDs from ztund's own CA.

use std::pin::Pin;

use futures::Stream;
use tokio::net::UnixListener;

use super::*;
use crate::identity::{CertManager, CertificateAuthority};

/// The server side of SPIRE's protos (`proto/spire/`), compiled for these tests only.
mod pb {
    pub mod spire {
        pub mod api {
            pub mod agent {
                pub mod delegatedidentity {
                    pub mod v1 {
                        include!(concat!(
                            env!("OUT_DIR"),
                            "/spire.api.agent.delegatedidentity.v1.rs"
                        ));
                    }
                }
            }
            pub mod types {
                include!(concat!(env!("OUT_DIR"), "/spire.api.types.rs"));
            }
        }
    }
}

use pb::spire::api::agent::delegatedidentity::v1 as di;
use pb::spire::api::types;

const TD: &str = "cluster.local";

/// A registration entry: the selectors it matches and the SVID the agent holds for it.
#[derive(Debug, Clone)]
struct Entry {
    selectors: Vec<(String, String)>,
    svid: di::X509svidWithKey,
}

/// A SPIRE agent's admin API: answers each subscription with the entries whose selectors are
/// all among the request's, and again whenever the entries change.
#[derive(Debug)]
struct FakeAgent {
    entries: watch::Sender<Vec<Entry>>,
    bundles: watch::Sender<HashMap<String, Vec<u8>>>,
    asked: Mutex<Vec<Vec<(String, String)>>>,
}

type Updates<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl di::delegated_identity_server::DelegatedIdentity for Arc<FakeAgent> {
    type SubscribeToX509SVIDsStream = Updates<di::SubscribeToX509sviDsResponse>;
    type SubscribeToX509BundlesStream = Updates<di::SubscribeToX509BundlesResponse>;

    async fn subscribe_to_x509svi_ds(
        &self,
        request: tonic::Request<di::SubscribeToX509sviDsRequest>,
    ) -> Result<tonic::Response<Self::SubscribeToX509SVIDsStream>, tonic::Status> {
        let asked: Vec<(String, String)> = request
            .into_inner()
            .selectors
            .into_iter()
            .map(|s| (s.r#type, s.value))
            .collect();
        self.asked.lock().unwrap().push(asked.clone());
        let mut entries = self.entries.subscribe();
        entries.mark_changed();
        let updates = futures::stream::unfold(entries, move |mut entries| {
            let asked = asked.clone();
            async move {
                entries.changed().await.ok()?;
                let x509_svids = entries
                    .borrow_and_update()
                    .iter()
                    .filter(|entry| entry.selectors.iter().all(|s| asked.contains(s)))
                    .map(|entry| entry.svid.clone())
                    .collect();
                let update = di::SubscribeToX509sviDsResponse {
                    x509_svids,
                    federates_with: Vec::new(),
                };
                Some((Ok(update), entries))
            }
        });
        Ok(tonic::Response::new(Box::pin(updates)))
    }

    async fn subscribe_to_x509_bundles(
        &self,
        _request: tonic::Request<di::SubscribeToX509BundlesRequest>,
    ) -> Result<tonic::Response<Self::SubscribeToX509BundlesStream>, tonic::Status> {
        let mut bundles = self.bundles.subscribe();
        bundles.mark_changed();
        let updates = futures::stream::unfold(bundles, |mut bundles| async move {
            bundles.changed().await.ok()?;
            let ca_certificates = bundles.borrow_and_update().clone();
            Some((
                Ok(di::SubscribeToX509BundlesResponse { ca_certificates }),
                bundles,
            ))
        });
        Ok(tonic::Response::new(Box::pin(updates)))
    }
}

/// A fake agent serving on a socket in a temp dir, with a CA to make SVIDs from.
struct Harness {
    agent: Arc<FakeAgent>,
    ca: CertificateAuthority,
    socket: PathBuf,
    server: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Harness {
    async fn start(leaf_ttl: Duration) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        CertificateAuthority::init(&ca_dir, TD).unwrap();
        let ca = CertificateAuthority::load(&ca_dir, TD, leaf_ttl).unwrap();
        let root = ca.issue_now(&id("default", "probe")).unwrap().roots;
        let bundle: Vec<u8> = root.iter().flat_map(|c| c.as_ref().to_vec()).collect();
        let agent = Arc::new(FakeAgent {
            entries: watch::channel(Vec::new()).0,
            // Released agents key bundles by the trust domain's SPIFFE id.
            bundles: watch::channel(HashMap::from([(format!("spiffe://{TD}"), bundle)])).0,
            asked: Mutex::new(Vec::new()),
        });
        let socket = dir.path().join("admin.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let incoming = futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| stream);
            Some((accepted, listener))
        });
        let service = di::delegated_identity_server::DelegatedIdentityServer::new(agent.clone());
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        Harness {
            agent,
            ca,
            socket,
            server,
            _dir: dir,
        }
    }

    fn source(&self) -> SpireSource {
        SpireSource::new(&self.socket).with_timeout(Duration::from_secs(2))
    }

    /// Registers (or replaces) the entry with `selectors`, holding `cert`.
    fn register(&self, selectors: Vec<(String, String)>, cert: &WorkloadCertificate) {
        let svid = di::X509svidWithKey {
            x509_svid: Some(types::X509svid {
                cert_chain: cert.chain.iter().map(|c| c.as_ref().to_vec()).collect(),
                id: Some(types::Spiffeid {
                    trust_domain: TD.into(),
                    path: format!(
                        "/ns/{}/sa/{}",
                        cert.id.namespace(),
                        cert.id.service_account()
                    ),
                }),
                expires_at: 0,
                hint: String::new(),
            }),
            x509_svid_key: cert.key.secret_der().to_vec(),
        };
        self.agent.entries.send_modify(|entries| {
            entries.retain(|entry| entry.selectors != selectors);
            entries.push(Entry { selectors, svid });
        });
    }

    /// A fresh SVID for `id`, registered under `id`'s namespace and service account selectors.
    fn register_new(&self, id: &SpiffeId) -> WorkloadCertificate {
        let cert = self.ca.issue_now(id).unwrap();
        self.register(k8s(id.namespace(), id.service_account()), &cert);
        cert
    }
}

fn id(namespace: &str, service_account: &str) -> SpiffeId {
    SpiffeId::new(TD, namespace, service_account).unwrap()
}

fn k8s(namespace: &str, service_account: &str) -> Vec<(String, String)> {
    vec![
        ("k8s".into(), format!("ns:{namespace}")),
        ("k8s".into(), format!("sa:{service_account}")),
    ]
}

/// The URI SAN of a certificate.
fn uri_san(cert: &CertificateDer<'_>) -> String {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    let san = parsed.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .unwrap()
}

fn spire_error(err: IdentityError) -> SpireError {
    match err {
        IdentityError::Spire(err) => err,
        other => panic!("not a SPIRE error: {other}"),
    }
}

#[tokio::test]
async fn issues_the_svid_of_the_identity_asked_for_with_its_key_and_roots() {
    let harness = Harness::start(Duration::from_secs(3600)).await;
    let wanted = id("default", "reviews");
    let registered = harness.register_new(&wanted);
    harness.register_new(&id("default", "ratings"));
    harness.register_new(&id("shop", "reviews"));
    let source = harness.source();

    let cert = source.issue(&wanted).await.unwrap();

    assert_eq!(cert.id, wanted);
    assert_eq!(uri_san(&cert.chain[0]), wanted.to_string());
    assert_eq!(cert.chain, registered.chain);
    assert_eq!(cert.key.secret_der(), registered.key.secret_der());
    assert_eq!(cert.roots, registered.roots);
    assert!(!cert.roots.is_empty());
    assert_eq!(cert.not_after, registered.not_after);
    // The agent was asked with the identity's namespace and service account.
    let asked = harness.agent.asked.lock().unwrap().clone();
    assert_eq!(asked, vec![k8s("default", "reviews")]);
}

#[tokio::test]
async fn a_rotation_on_the_stream_is_what_the_next_issue_returns() {
    let harness = Harness::start(Duration::from_secs(3600)).await;
    let wanted = id("default", "reviews");
    let first = harness.register_new(&wanted);
    let source = harness.source();
    let mut changes = source.changes();
    assert_eq!(source.issue(&wanted).await.unwrap().chain, first.chain);
    changes.borrow_and_update();

    let rotated = harness.register_new(&wanted);
    assert_ne!(rotated.chain, first.chain);
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();

    let cert = source.issue(&wanted).await.unwrap();
    assert_eq!(cert.chain, rotated.chain);
    assert_eq!(cert.key.secret_der(), rotated.key.secret_der());
    // One stream per identity, kept open: the rotation did not need a second subscription.
    assert_eq!(harness.agent.asked.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn the_cert_manager_renews_to_the_agents_rotation() {
    // Short SVIDs: the manager renews at half-life, before the agent has rotated, so the source
    // waits for the rotation instead of handing back the certificate being renewed.
    let harness = Harness::start(Duration::from_secs(4)).await;
    let wanted = id("default", "reviews");
    let first = harness.register_new(&wanted);
    let source = SpireSource::new(&harness.socket).with_timeout(Duration::from_secs(6));
    let manager = CertManager::new(Arc::new(source));
    let mut changes = manager.subscribe();
    assert_eq!(manager.fetch(&wanted).await.unwrap().chain, first.chain);
    changes.borrow_and_update();

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let rotated = harness.register_new(&wanted);
    tokio::time::timeout(Duration::from_secs(8), async {
        while manager.fetch(&wanted).await.unwrap().chain != rotated.chain {
            changes.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_svid_of_another_identity_is_refused() {
    let harness = Harness::start(Duration::from_secs(3600)).await;
    let wanted = id("default", "reviews");
    // An entry matching the selectors but naming another id.
    let other = harness.ca.issue_now(&id("default", "admin")).unwrap();
    harness.register(k8s("default", "reviews"), &other);
    let source = harness.source();

    let err = spire_error(source.issue(&wanted).await.unwrap_err());

    let text = err.to_string();
    match err {
        SpireError::WrongIdentity { id, got, .. } => {
            assert_eq!(id, wanted.to_string());
            assert_eq!(got, vec![other.id.to_string()]);
        }
        other => panic!("expected WrongIdentity, got {other}"),
    }
    assert!(text.contains("k8s:ns:default,k8s:sa:reviews"), "{text}");
}

#[tokio::test]
async fn an_identity_without_an_entry_is_refused() {
    let harness = Harness::start(Duration::from_secs(3600)).await;
    harness.register_new(&id("default", "ratings"));
    let source = harness.source();

    let err = spire_error(source.issue(&id("default", "reviews")).await.unwrap_err());

    assert!(
        matches!(&err, SpireError::WrongIdentity { got, .. } if got.is_empty()),
        "{err}"
    );
}

#[tokio::test]
async fn an_svid_whose_key_is_not_its_certificates_is_refused() {
    let harness = Harness::start(Duration::from_secs(3600)).await;
    let wanted = id("default", "reviews");
    let mut cert = harness.ca.issue_now(&wanted).unwrap();
    cert.key = harness.ca.issue_now(&wanted).unwrap().key;
    harness.register(k8s("default", "reviews"), &cert);
    let source = harness.source();

    let err = spire_error(source.issue(&wanted).await.unwrap_err());

    assert!(
        matches!(&err, SpireError::BadSvid { reason, .. } if reason.contains("does not belong")),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_agent_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("no-agent.sock");
    let source = SpireSource::new(&socket).with_timeout(Duration::from_secs(2));

    let err = spire_error(source.issue(&id("default", "reviews")).await.unwrap_err());

    let text = err.to_string();
    assert!(matches!(err, SpireError::Unreachable { .. }), "{text}");
    assert!(text.contains(&socket.display().to_string()), "{text}");
}

#[tokio::test]
async fn a_trust_domain_without_a_bundle_is_refused() {
    let harness = Harness::start(Duration::from_secs(3600)).await;
    let wanted = id("default", "reviews");
    harness.register_new(&wanted);
    harness.agent.bundles.send_modify(|bundles| {
        let ours = bundles.remove(&format!("spiffe://{TD}")).unwrap();
        bundles.insert("spiffe://other.domain".to_string(), ours);
    });
    let source = harness.source();

    let err = spire_error(source.issue(&wanted).await.unwrap_err());

    assert!(
        matches!(&err, SpireError::NoBundle { trust_domain, have } if trust_domain == TD && have == &["other.domain".to_string()]),
        "{err}"
    );
}
