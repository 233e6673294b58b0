//! TLS origination against a loopback TLS server with its own CA: SIMPLE by name and by
//! `subjectAltNames`, a wrong name refused, MUTUAL presenting the client certificate, files
//! re-read when they change, and errors that name the field and file.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::*;

/// A CA, a server certificate for `echo.test` (+ a URI SAN) and a client certificate, as files.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let pki = Pki { dir, ca, ca_key };
        pki.leaf("server", &["echo.test"], Some("spiffe://example/echo"));
        pki.leaf("client", &["client.test"], None);
        pki
    }

    fn leaf(&self, name: &str, dns: &[&str], uri: Option<&str>) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn simple(&self) -> TlsOrigination {
        TlsOrigination {
            ca_certificates: Some(self.path("ca.pem")),
            ..Default::default()
        }
    }

    /// A TLS server that writes the client certificate's DNS names (or `-`), then echoes.
    async fn server(&self, require_client: bool) -> std::net::SocketAddr {
        let chain = CertificateDer::pem_file_iter(self.path("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(self.path("server-key.pem")).unwrap();
        let builder = ServerConfig::builder_with_provider(provider().clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let config = if require_client {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider().clone(),
            )
            .build()
            .unwrap();
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .unwrap()
        } else {
            builder
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap()
        };
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let client = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| san_names(c).join(","))
                        .unwrap_or_else(|| "-".to_string());
                    let _ = tls.write_all(format!("{client}\n").as_bytes()).await;
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = tls.read(&mut buf).await {
                        let _ = tls.write_all(&buf[..n]).await;
                    }
                });
            }
        });
        addr
    }
}

async fn originate(
    addr: std::net::SocketAddr,
    tls: &TlsOrigination,
    name: &str,
) -> Result<String, OriginateError> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = Originator::new().connect(tcp, addr, tls, name).await?;
    stream.write_all(b"ping").await.unwrap();
    let mut answer = [0u8; 128];
    let mut got = 0;
    while !answer[..got].ends_with(b"ping") {
        let n = stream.read(&mut answer[got..]).await.unwrap();
        assert!(n > 0, "server closed early");
        got += n;
    }
    Ok(String::from_utf8_lossy(&answer[..got]).into_owned())
}

#[tokio::test]
async fn simple_checks_the_server_name() {
    let pki = Pki::new();
    let addr = pki.server(false).await;
    let answer = originate(addr, &pki.simple(), "echo.test").await.unwrap();
    assert_eq!(answer, "-\nping", "no client certificate under SIMPLE");
    let wrong = originate(addr, &pki.simple(), "other.test").await;
    assert!(
        matches!(&wrong, Err(OriginateError::Handshake { .. })),
        "{wrong:?}"
    );
}

#[tokio::test]
async fn subject_alt_names_replace_the_name_check() {
    let pki = Pki::new();
    let addr = pki.server(false).await;
    for san in ["echo.test", "spiffe://example/echo"] {
        let tls = TlsOrigination {
            subject_alt_names: vec!["nope.test".into(), san.into()],
            ..pki.simple()
        };
        originate(addr, &tls, "some-other-name.test")
            .await
            .unwrap_or_else(|e| panic!("{san}: {e}"));
    }
    let tls = TlsOrigination {
        subject_alt_names: vec!["nope.test".into()],
        ..pki.simple()
    };
    let wrong = originate(addr, &tls, "echo.test").await;
    let text = wrong.expect_err("a wrong SAN must fail").to_string();
    assert!(text.contains("nope.test"), "{text}");
}

#[tokio::test]
async fn an_unknown_ca_fails_unless_verification_is_skipped() {
    let pki = Pki::new();
    let other = Pki::new();
    let addr = pki.server(false).await;
    assert!(originate(addr, &other.simple(), "echo.test").await.is_err());
    let skip = TlsOrigination {
        insecure_skip_verify: true,
        ..other.simple()
    };
    originate(addr, &skip, "echo.test").await.unwrap();
}

#[tokio::test]
async fn mutual_presents_the_client_certificate() {
    let pki = Pki::new();
    let addr = pki.server(true).await;
    let tls = TlsOrigination {
        client_certificate: Some(pki.path("client.pem")),
        private_key: Some(pki.path("client-key.pem")),
        mutual: true,
        ..pki.simple()
    };
    let answer = originate(addr, &tls, "echo.test").await.unwrap();
    assert_eq!(answer, "client.test\nping");
    let missing = TlsOrigination {
        client_certificate: None,
        ..tls
    };
    assert!(matches!(
        Originator::new().config(&missing),
        Err(OriginateError::MissingClientCredentials)
    ));
}

#[test]
fn files_are_cached_until_they_change_and_errors_name_the_file() {
    let pki = Pki::new();
    let originator = Originator::new();
    let tls = pki.simple();
    let first = originator.config(&tls).unwrap();
    assert!(Arc::ptr_eq(&first, &originator.config(&tls).unwrap()));
    // A new modification time (some filesystems keep only seconds) means a rebuilt config.
    let file = std::fs::File::options()
        .write(true)
        .open(pki.path("ca.pem"))
        .unwrap();
    file.set_modified(SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    assert!(!Arc::ptr_eq(&first, &originator.config(&tls).unwrap()));

    let missing = TlsOrigination {
        ca_certificates: Some(pki.path("absent.pem")),
        ..Default::default()
    };
    let text = originator.config(&missing).unwrap_err().to_string();
    assert!(
        text.contains("caCertificates") && text.contains("absent.pem"),
        "{text}"
    );
    std::fs::write(pki.path("garbage.pem"), "not a certificate").unwrap();
    let garbage = TlsOrigination {
        ca_certificates: Some(pki.path("garbage.pem")),
        ..Default::default()
    };
    let text = originator.config(&garbage).unwrap_err().to_string();
    assert!(text.contains("garbage.pem"), "{text}");
}
