//! Handshakes over loopback TCP between workload certificates: who is let in, who sees whom.

use std::path::Path;
use std::time::Duration;

use rustls::ProtocolVersion;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::ca::DEFAULT_LEAF_TTL;
use crate::identity::ca::tests::{hierarchy, write_cacerts};
use crate::identity::{CertManager, CertificateAuthority};

const SERVER_HELLO: &[u8] = b"server says hi";
const CLIENT_HELLO: &[u8] = b"client says hi";

/// A CA in a temporary `cacerts` directory.
pub(super) struct Mesh {
    dir: tempfile::TempDir,
    ca: CertificateAuthority,
}

impl Mesh {
    pub(super) fn new(trust_domain: &str) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init(dir.path(), trust_domain).unwrap();
        Mesh { dir, ca }
    }

    pub(super) fn id(&self, sa: &str) -> SpiffeId {
        SpiffeId::new(self.ca.trust_domain(), "default", sa).unwrap()
    }

    pub(super) fn cert(&self, sa: &str) -> WorkloadCertificate {
        self.ca.issue_now(&self.id(sa)).unwrap()
    }

    /// The same keys signing for another trust domain: chains verify, trust domain differs.
    fn same_root_other_domain(&self, trust_domain: &str) -> CertificateAuthority {
        CertificateAuthority::load(self.dir.path(), trust_domain, DEFAULT_LEAF_TTL).unwrap()
    }
}

/// What one side of a finished handshake observed.
#[derive(Debug)]
pub(super) struct Seen {
    pub(super) peer: Option<SpiffeId>,
    pub(super) h2: bool,
    pub(super) version: Option<ProtocolVersion>,
    pub(super) suite: Option<rustls::CipherSuite>,
    pub(super) sni: Option<String>,
    pub(super) group: Option<rustls::NamedGroup>,
    pub(super) hello_retry: bool,
}

fn seen(state: &rustls::CommonState, sni: Option<&str>) -> Seen {
    Seen {
        peer: peer_identity(state),
        h2: negotiated_h2(state),
        version: state.protocol_version(),
        suite: state.negotiated_cipher_suite().map(|s| s.suite()),
        sni: sni.map(str::to_string),
        group: state.negotiated_key_exchange_group().map(|g| g.name()),
        hello_retry: state.handshake_kind()
            == Some(rustls::HandshakeKind::FullWithHelloRetryRequest),
    }
}

/// Runs one handshake and exchanges a greeting each way, so a client refused after its own
/// handshake finished (TLS 1.3 checks the client certificate last) also shows up as a failure.
pub(super) async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (Result<Seen, String>, Result<Seen, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let seen = seen(conn, conn.server_name());
        tls.write_all(SERVER_HELLO)
            .await
            .map_err(|e| e.to_string())?;
        let mut greeting = vec![0; CLIENT_HELLO.len()];
        tls.read_exact(&mut greeting)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(greeting, CLIENT_HELLO);
        Ok::<_, String>(seen)
    });
    let client_side = async move {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = TlsConnector::from(client)
            .connect(dummy_server_name(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let seen = seen(tls.get_ref().1, None);
        tls.write_all(CLIENT_HELLO)
            .await
            .map_err(|e| e.to_string())?;
        let mut greeting = vec![0; SERVER_HELLO.len()];
        tls.read_exact(&mut greeting)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(greeting, SERVER_HELLO);
        Ok::<_, String>(seen)
    };
    let deadline = Duration::from_secs(5);
    let client = tokio::time::timeout(deadline, client_side)
        .await
        .unwrap_or_else(|_| Err("client timed out".into()));
    let server = tokio::time::timeout(deadline, server_side)
        .await
        .map(|joined| joined.unwrap())
        .unwrap_or_else(|_| Err("server timed out".into()));
    (server, client)
}

pub(super) fn assert_refused(result: (Result<Seen, String>, Result<Seen, String>), why: &str) {
    let (server, client) = result;
    assert!(server.is_err(), "{why}: server accepted: {server:?}");
    assert!(client.is_err(), "{why}: client exchanged data: {client:?}");
}

#[tokio::test]
async fn workloads_of_one_ca_see_each_others_identity() {
    let mesh = Mesh::new("cluster.local");
    let (sleep, httpbin) = (mesh.cert("sleep"), mesh.cert("httpbin"));
    let server = server_config(&httpbin).unwrap();
    let expected = [mesh.id("something-else"), httpbin.id.clone()];
    let client = client_config(&sleep, &expected).unwrap();

    let (server, client) = handshake(server, client).await;
    let (server, client) = (server.unwrap(), client.unwrap());
    assert_eq!(server.peer, Some(sleep.id.clone()));
    assert_eq!(client.peer, Some(httpbin.id.clone()));
    assert!(server.h2 && client.h2);
    assert_eq!(server.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(server.sni, None, "no SNI is sent");
    let allowed = [
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
    ];
    assert!(
        allowed.contains(&client.suite.unwrap()),
        "{:?}",
        client.suite
    );
}

// HARDENING T1
#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let (ours, theirs) = (Mesh::new("cluster.local"), Mesh::new("cluster.local"));
    let server_cert = ours.cert("httpbin");
    let intruder = theirs.cert("sleep");
    // The intruder trusts our root, so only the server's check can stop it.
    let intruder = WorkloadCertificate {
        roots: server_cert.roots.clone(),
        ..intruder
    };
    let server = server_config(&server_cert).unwrap();
    let client = client_config(&intruder, std::slice::from_ref(&server_cert.id)).unwrap();
    assert_refused(handshake(server, client).await, "foreign CA");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let mesh = Mesh::new("cluster.local");
    let server_cert = mesh.cert("httpbin");
    let verifier = SpiffeVerifier::one_of(
        &server_cert,
        std::slice::from_ref(&server_cert.id),
        provider(KeyExchange::default()).unwrap(),
    )
    .unwrap();
    let mut anonymous =
        ClientConfig::builder_with_provider(provider(KeyExchange::default()).unwrap().clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
    anonymous.alpn_protocols = vec![ALPN_H2.to_vec()];
    let server = server_config(&server_cert).unwrap();
    assert_refused(
        handshake(server, Arc::new(anonymous)).await,
        "no client cert",
    );
}

// HARDENING T3
#[tokio::test]
async fn a_client_of_another_trust_domain_is_refused_even_with_a_valid_chain() {
    let mesh = Mesh::new("cluster.local");
    let server_cert = mesh.cert("httpbin");
    let other = mesh.same_root_other_domain("other.example");
    let stranger = other
        .issue_now(&SpiffeId::new("other.example", "default", "sleep").unwrap())
        .unwrap();
    assert_eq!(
        stranger.roots, server_cert.roots,
        "same root, so only the trust domain differs"
    );
    let server = server_config(&server_cert).unwrap();
    let client = client_config(&stranger, std::slice::from_ref(&server_cert.id)).unwrap();
    assert_refused(handshake(server, client).await, "foreign trust domain");
}

#[tokio::test]
async fn a_server_that_is_not_the_expected_identity_is_refused() {
    let mesh = Mesh::new("cluster.local");
    let (sleep, impostor) = (mesh.cert("sleep"), mesh.cert("impostor"));
    let server = server_config(&impostor).unwrap();
    let client = client_config(&sleep, &[mesh.id("httpbin")]).unwrap();
    let (server, client) = handshake(server, client).await;
    let err = client.unwrap_err();
    assert!(
        err.contains("impostor") && err.contains("httpbin"),
        "says who and why: {err}"
    );
    assert!(server.is_err());
}

#[tokio::test]
async fn a_server_from_another_ca_is_refused() {
    let (ours, theirs) = (Mesh::new("cluster.local"), Mesh::new("cluster.local"));
    let sleep = ours.cert("sleep");
    let fake = theirs.cert("httpbin");
    let server = server_config(&fake).unwrap();
    let client = client_config(&sleep, &[ours.id("httpbin")]).unwrap();
    let (_, client) = handshake(server, client).await;
    let err = client.unwrap_err();
    // Both roots carry the same name, so webpki finds "the" issuer and its signature fails.
    assert!(err.contains("invalid peer certificate"), "{err}");
}

// HARDENING T1
#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let mesh = Mesh::new("cluster.local");
    let short =
        CertificateAuthority::load(mesh.dir.path(), "cluster.local", Duration::from_secs(1))
            .unwrap();
    let expired = short.issue_now(&mesh.id("sleep")).unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let server_cert = mesh.cert("httpbin");
    let server = server_config(&server_cert).unwrap();
    let client = client_config(&expired, std::slice::from_ref(&server_cert.id)).unwrap();
    assert_refused(handshake(server, client).await, "expired client cert");
}

#[tokio::test]
async fn a_client_offering_no_alpn_completes_but_does_not_negotiate_h2() {
    let mesh = Mesh::new("cluster.local");
    let (sleep, httpbin) = (mesh.cert("sleep"), mesh.cert("httpbin"));
    let server = server_config(&httpbin).unwrap();
    let mut client = (*client_config(&sleep, std::slice::from_ref(&httpbin.id)).unwrap()).clone();
    client.alpn_protocols.clear();
    let (server, client) = handshake(server, Arc::new(client)).await;
    let (server, client) = (server.unwrap(), client.unwrap());
    assert!(
        !server.h2,
        "the HBONE server must refuse this connection itself"
    );
    assert!(!client.h2);
}

// HARDENING T9
#[tokio::test]
async fn a_tls12_client_is_refused() {
    let mesh = Mesh::new("cluster.local");
    let (sleep, httpbin) = (mesh.cert("sleep"), mesh.cert("httpbin"));
    let verifier = SpiffeVerifier::one_of(
        &sleep,
        std::slice::from_ref(&httpbin.id),
        provider(KeyExchange::default()).unwrap(),
    )
    .unwrap();
    let mut old = ClientConfig::builder_with_provider(Arc::new(super::backend()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(sleep.chain.clone(), sleep.key.clone_key())
        .unwrap();
    old.alpn_protocols = vec![ALPN_H2.to_vec()];
    let server = server_config(&httpbin).unwrap();
    let (server, client) = handshake(server, Arc::new(old)).await;
    assert!(server.is_err(), "TLS 1.2: server accepted: {server:?}");
    let err = client.unwrap_err();
    assert!(
        err.contains("ProtocolVersion"),
        "a protocol_version alert: {err}"
    );
}

#[tokio::test]
async fn certificates_from_an_organisation_intermediate_send_the_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    let org = hierarchy();
    write_cacerts(dir.path(), &org, None);
    let ca = CertificateAuthority::load(Path::new(dir.path()), "corp.example", DEFAULT_LEAF_TTL)
        .unwrap();
    let id = |sa| SpiffeId::new("corp.example", "default", sa).unwrap();
    let (sleep, httpbin) = (
        ca.issue_now(&id("sleep")).unwrap(),
        ca.issue_now(&id("httpbin")).unwrap(),
    );
    assert_eq!(sleep.chain.len(), 2);
    let server = server_config(&httpbin).unwrap();
    let client = client_config(&sleep, &[id("httpbin")]).unwrap();
    let (server, client) = handshake(server, client).await;
    assert_eq!(server.unwrap().peer, Some(id("sleep")));
    assert_eq!(client.unwrap().peer, Some(id("httpbin")));
}

#[tokio::test]
async fn an_empty_trust_bundle_is_a_configuration_error() {
    let mesh = Mesh::new("cluster.local");
    let cert = WorkloadCertificate {
        roots: Vec::new(),
        ..mesh.cert("sleep")
    };
    let err = server_config(&cert).unwrap_err();
    assert!(matches!(err, TlsError::Roots { .. }), "{err}");
    assert!(err.to_string().contains("sa/sleep"), "{err}");
}

#[tokio::test]
async fn credentials_reuse_configs_until_the_certificate_is_renewed() {
    let mesh = Mesh::new("cluster.local");
    let short =
        CertificateAuthority::load(mesh.dir.path(), "cluster.local", Duration::from_secs(4))
            .unwrap();
    let certs = CertManager::new(Arc::new(short));
    let mut changes = certs.subscribe();
    let credentials = Credentials::new(certs);
    let (sleep, httpbin, other) = (mesh.id("sleep"), mesh.id("httpbin"), mesh.id("other"));

    let server_before = credentials.server_config(&httpbin).await.unwrap();
    let client_before = credentials
        .client_config(&sleep, &[httpbin.clone(), other.clone()])
        .await
        .unwrap();
    let server_again = credentials.server_config(&httpbin).await.unwrap();
    let client_again = credentials
        .client_config(&sleep, &[other.clone(), httpbin.clone(), other.clone()])
        .await
        .unwrap();
    assert!(Arc::ptr_eq(&server_before, &server_again));
    assert!(
        Arc::ptr_eq(&client_before, &client_again),
        "expected ids are a set"
    );
    changes.borrow_and_update();

    // Both identities renew around the same moment; wait until both have.
    let generation = credentials.certs().generation();
    tokio::time::timeout(Duration::from_secs(8), async {
        while credentials.certs().generation() < generation + 2 {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("both certificates renewed");

    let server_after = credentials.server_config(&httpbin).await.unwrap();
    let client_after = credentials
        .client_config(&sleep, std::slice::from_ref(&httpbin))
        .await
        .unwrap();
    assert!(
        !Arc::ptr_eq(&server_before, &server_after),
        "rebuilt on renewal"
    );

    let (server, client) = handshake(server_after, client_after.clone()).await;
    assert_eq!(server.unwrap().peer, Some(sleep.clone()));
    assert_eq!(client.unwrap().peer, Some(httpbin.clone()));
    // A config built on the old, still valid certificate keeps working for who holds it.
    let (server, client) = handshake(server_before, client_after).await;
    assert!(server.is_ok() && client.is_ok(), "{server:?} {client:?}");
}
