//! DestinationRule on the outbound side, end to end (ztund's extension; Istio ambient's ztunnel
//! ignores DestinationRules): DISABLE sends plain TCP that a STRICT destination refuses and a
//! PERMISSIVE one serves; SIMPLE originates TLS to a server outside the mesh (its own CA, made
//! here) while the app speaks plaintext, and a wrong `subjectAltNames` fails; MUTUAL presents the
//! client certificate the server then sees.
//! Every case runs twice, `<case>::ipv4` and `<case>::ipv6` (`on_both_families!`): the v6 world
//! has only v6 workload, service and client addresses.

mod policy_world;
mod support;
mod testbed;

use std::sync::Arc;

use policy_world::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use testbed::Place;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

on_both_families!(
    disable_sends_plain_tcp_that_strict_refuses_and_permissive_serves,
    simple_and_mutual_originate_tls_and_a_wrong_subject_alt_name_fails,
);

const DR_EXAMPLE_DISABLE: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: example-plain, namespace: default}
spec:
  host: example-service.default.svc.cluster.local
  trafficPolicy: {tls: {mode: DISABLE}}
";

/// The TLS echo server outside the mesh, at a VIP of `fam` (the pod's own address behind it).
fn tls_echo_entry(fam: Family) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: tls-echo, namespace: default}}
spec:
  hosts: [tls-echo.example]
  addresses: ['{}']
  ports: [{{number: 443, targetPort: 9443, name: tls, protocol: TLS}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: '{}'}}]
",
        tls_echo_vip(fam).ip(),
        fam.outside()
    )
}

fn tls_echo_vip(fam: Family) -> std::net::SocketAddr {
    addr(
        match fam {
            Family::V4 => "240.240.0.10",
            Family::V6 => "fd00:240::10",
        },
        443,
    )
}

async fn disable_sends_plain_tcp_that_strict_refuses_and_permissive_serves(fam: Family) {
    let w = World::of_family(fam, &[PA_GLOBAL_STRICT, DR_EXAMPLE_DISABLE]).await;
    // The TCP connection itself succeeds (the capture accepts it); then node 2 refuses it.
    if let Ok(mut stream) = w.mesh_client(fam.sleep(), fam.example_service()).await {
        assert!(!echoes(&mut stream).await, "STRICT served a DISABLE client");
    }
    let out = log_line(&w.node1, &["connection complete", "\"path\":\"direct\""]).await;
    assert!(out.contains(&addr(fam.echo(), 9000).to_string()), "{out}");
    let refused = log_line(&w.node2, &["connection refused", "inbound_plaintext"]).await;
    assert!(refused.contains("istio-system/global-mtls"), "{refused}");
    assert_eq!(w.echo.accepted(), 0, "plaintext reached a STRICT app");

    w.apply(&[PA_DEFAULT_PERMISSIVE, DR_EXAMPLE_DISABLE]).await;
    let mut stream = w
        .mesh_client(fam.sleep(), fam.example_service())
        .await
        .expect("DISABLE to a PERMISSIVE destination");
    assert!(echoes(&mut stream).await);
    drop(stream);
    let served = log_line(&w.node2, &["connection complete", "inbound_plaintext"]).await;
    assert!(
        served.contains(&addr(fam.echo(), 9000).to_string()),
        "{served}"
    );
    assert_eq!(w.echo.accepted(), 1);
}

async fn simple_and_mutual_originate_tls_and_a_wrong_subject_alt_name_fails(fam: Family) {
    let w = World::of_family(fam, &[]).await;
    let pki = Pki::new(&w);
    pki.serve(&w);
    let ca = pki.path("ca.pem");
    let entry = tls_echo_entry(fam);

    // SIMPLE, checked against the host name: the app's plaintext arrives, no client certificate.
    w.apply(&[
        &entry,
        &rule(&format!("{{mode: SIMPLE, caCertificates: {ca}}}")),
    ])
    .await;
    assert_eq!(round_trip(&w).await.as_deref(), Ok("-"));
    let out = log_line(&w.node1, &["connection complete", "tls-origination"]).await;
    assert!(
        out.contains(&addr(fam.outside(), 9443).to_string()) && out.contains("\"error\":\"\""),
        "{out}"
    );

    // SIMPLE with subjectAltNames: a right one passes, a wrong one fails the handshake.
    w.apply(&[
        &entry,
        &rule(&format!(
            "{{mode: SIMPLE, caCertificates: {ca}, sni: other.example, subjectAltNames: [tls-echo.example]}}"
        )),
    ])
    .await;
    assert_eq!(round_trip(&w).await.as_deref(), Ok("-"));
    w.apply(&[
        &entry,
        &rule(&format!(
            "{{mode: SIMPLE, caCertificates: {ca}, subjectAltNames: [wrong.example]}}"
        )),
    ])
    .await;
    assert!(round_trip(&w).await.is_err(), "a wrong SAN was accepted");
    let failed = log_line(&w.node1, &["tls-origination", "wrong.example"]).await;
    assert!(failed.contains("tls-echo.example"), "{failed}");

    // MUTUAL: the server sees ztund's client certificate.
    w.apply(&[
        &entry,
        &rule(&format!(
            "{{mode: MUTUAL, caCertificates: {ca}, clientCertificate: {}, privateKey: {}}}",
            pki.path("client.pem"),
            pki.path("client-key.pem")
        )),
    ])
    .await;
    assert_eq!(round_trip(&w).await.as_deref(), Ok("client.test"));
}

fn rule(tls: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: tls-echo, namespace: default}}\nspec:\n  host: tls-echo.example\n  trafficPolicy: {{tls: {tls}}}\n"
    )
}

/// Plaintext from the mesh client through ztund to the TLS echo server: returns the client
/// certificate name the server saw (`-` for none) once `ping` came back, or the SOCKS5 code.
async fn round_trip(w: &World) -> Result<String, String> {
    let stream = w
        .mesh_client(w.fam.sleep(), tls_echo_vip(w.fam))
        .await
        .map_err(|code| format!("SOCKS5 reply {code}"))?;
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(b"ping")
        .await
        .map_err(|e| e.to_string())?;
    let mut seen = String::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        stream.read_line(&mut seen).await?;
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    })
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|e| e.to_string())?;
    if &read != b"ping" {
        return Err(format!("echo returned {read:?}"));
    }
    Ok(seen.trim_end().to_string())
}

/// A test CA, a server certificate for `tls-echo.example`, a client certificate, as files.
struct Pki {
    dir: std::path::PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new(w: &World) -> Pki {
        let dir = w.cluster.path("tls");
        std::fs::create_dir_all(&dir).expect("tls dir");
        let ca_key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![]).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).expect("CA");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
        let pki = Pki { dir, ca, ca_key };
        pki.leaf("server", "tls-echo.example");
        pki.leaf("client", "client.test");
        pki
    }

    fn leaf(&self, name: &str, dns: &str) {
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec![dns.to_string()]).expect("params");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("leaf");
        std::fs::write(self.dir.join(format!("{name}.pem")), cert.pem()).expect("write");
        std::fs::write(
            self.dir.join(format!("{name}-key.pem")),
            key.serialize_pem(),
        )
        .expect("write");
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The TLS echo app on pod 10.201.2.2:9443 (fd00:201:2::2 in an IPv6 world): accepts an optional client certificate from
    /// this CA, writes its DNS name (or `-`), then echoes.
    fn serve(&self, w: &World) {
        let provider = Arc::new(ztund::tls::backend());
        let chain = CertificateDer::pem_file_iter(self.path("server.pem"))
            .expect("server.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("server chain");
        let key = PrivateKeyDer::from_pem_file(self.path("server-key.pem")).expect("server key");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("root");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .expect("client verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = w
            .bed
            .app_sockets(Place::Pod(2, 1))
            .listener(addr(w.fam.outside(), 9443), false)
            .expect("TLS app listener");
        w.bed.keep_task(tokio::spawn(async move {
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
                        .and_then(|c| dns_name(c))
                        .unwrap_or_else(|| "-".to_string());
                    let _ = tls.write_all(format!("{client}\n").as_bytes()).await;
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = tls.read(&mut buf).await {
                        if tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }));
    }
}

fn dns_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
        _ => None,
    })
}
