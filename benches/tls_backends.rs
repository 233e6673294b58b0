//! ring vs AWS-LC under rustls, and X25519 vs X25519MLKEM768, in one process, interleaved:
//! full mutual-TLS 1.3 handshakes per second (P-256 certificates, as ztund's CA issues), bulk
//! seal+open throughput in 16 KiB records and 1 KiB records per second, all in memory on one
//! thread (no sockets, no scheduler: the crypto library is what differs).
//!
//! `cargo bench --bench tls_backends --features ring` (both backends compiled in);
//! `ZTUND_BENCH_ROUNDS` (3) rounds of `ZTUND_BENCH_SECONDS` (2) per case; medians printed.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

struct Pki {
    root: CertificateDer<'static>,
    server: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    client: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca.self_signed(&ca_key).unwrap();
    let leaf = |uri: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(uri.try_into().unwrap()),
            SanType::DnsName("bench.example".try_into().unwrap()),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    };
    Pki {
        root: ca.der().clone(),
        server: leaf("spiffe://cluster.local/ns/default/sa/server"),
        client: leaf("spiffe://cluster.local/ns/default/sa/client"),
    }
}

/// A backend with ztund's suites (AES-256-GCM, then AES-128-GCM) and one key-exchange group.
#[derive(Clone)]
struct Case {
    name: &'static str,
    provider: Arc<CryptoProvider>,
}

fn case(name: &'static str, base: CryptoProvider, group: &'static dyn SupportedKxGroup) -> Case {
    let suites = base
        .cipher_suites
        .iter()
        .filter(|s| {
            s.version() == &rustls::version::TLS13 && !format!("{:?}", s.suite()).contains("CHACHA")
        })
        .copied()
        .collect();
    Case {
        name,
        provider: Arc::new(CryptoProvider {
            cipher_suites: suites,
            kx_groups: vec![group],
            ..base
        }),
    }
}

fn configs(pki: &Pki, case: &Case) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let mut roots = RootCertStore::empty();
    roots.add(pki.root.clone()).unwrap();
    let roots = Arc::new(roots);
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), case.provider.clone())
            .build()
            .unwrap();
    let server = ServerConfig::builder_with_provider(case.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server.0.clone(), pki.server.1.clone_key())
        .unwrap();
    let mut client = ClientConfig::builder_with_provider(case.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(pki.client.0.clone(), pki.client.1.clone_key())
        .unwrap();
    client.resumption = rustls::client::Resumption::disabled();
    let mut server = server;
    server.send_tls13_tickets = 0;
    (Arc::new(server), Arc::new(client))
}

/// Moves every pending TLS byte from one side to the other until neither has any.
fn pump(client: &mut ClientConnection, server: &mut ServerConnection) {
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        let mut moved = false;
        while client.wants_write() {
            buf.clear();
            client.write_tls(&mut buf).unwrap();
            let mut slice = &buf[..];
            while !slice.is_empty() {
                server.read_tls(&mut slice).unwrap();
                server.process_new_packets().unwrap();
            }
            moved = true;
        }
        while server.wants_write() {
            buf.clear();
            server.write_tls(&mut buf).unwrap();
            let mut slice = &buf[..];
            while !slice.is_empty() {
                client.read_tls(&mut slice).unwrap();
                client.process_new_packets().unwrap();
            }
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn connect(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
) -> (ClientConnection, ServerConnection) {
    let name = ServerName::try_from("bench.example").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    pump(&mut c, &mut s);
    assert!(!c.is_handshaking() && !s.is_handshaking());
    (c, s)
}

fn handshakes_per_second(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    for_: Duration,
) -> f64 {
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < for_ {
        connect(server, client);
        count += 1;
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// Client seals `size`-byte writes, server opens and reads them: bytes per second.
fn transfer(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    size: usize,
    for_: Duration,
) -> f64 {
    let (mut c, mut s) = connect(server, client);
    let chunk = vec![0x5a; size];
    let mut sink = vec![0; 64 * 1024];
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed() < for_ {
        for _ in 0..64 {
            c.writer().write_all(&chunk).unwrap();
            pump(&mut c, &mut s);
            loop {
                match s.reader().read(&mut sink) {
                    Ok(0) => break,
                    Ok(n) => bytes += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
    bytes as f64 / started.elapsed().as_secs_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn main() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = env("ZTUND_BENCH_ROUNDS", 3).max(1) as usize;
    let seconds = Duration::from_secs(env("ZTUND_BENCH_SECONDS", 2).max(1));
    let pki = pki();
    use rustls::crypto::{aws_lc_rs, ring};
    let cases = [
        case(
            "ring, X25519",
            ring::default_provider(),
            ring::kx_group::X25519,
        ),
        case(
            "aws-lc, X25519",
            aws_lc_rs::default_provider(),
            aws_lc_rs::kx_group::X25519,
        ),
        case(
            "aws-lc, X25519MLKEM768",
            aws_lc_rs::default_provider(),
            aws_lc_rs::kx_group::X25519MLKEM768,
        ),
    ];
    let built: Vec<_> = cases.iter().map(|c| configs(&pki, c)).collect();
    let mut results = vec![[Vec::new(), Vec::new(), Vec::new()]; cases.len()];
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        // Interleaved: every case once per round, so drift hits them all alike.
        for (i, (server, client)) in built.iter().enumerate() {
            results[i][0].push(handshakes_per_second(server, client, seconds));
            results[i][1].push(transfer(server, client, 16 * 1024, seconds) * 8.0 / 1e9);
            results[i][2].push(transfer(server, client, 1024, seconds) / 1024.0 / 1e3);
        }
    }
    println!(
        "{:<26} {:>22} {:>22} {:>22}",
        "backend, group", "handshakes/s", "16 KiB records Gbit/s", "1 KiB records k/s"
    );
    for (case, metrics) in cases.iter().zip(results.iter_mut()) {
        let cell = |v: &mut Vec<f64>| {
            let (lo, hi) = (
                v.iter().cloned().fold(f64::MAX, f64::min),
                v.iter().cloned().fold(f64::MIN, f64::max),
            );
            format!("{:.1} [{:.1}..{:.1}]", median(v), lo, hi)
        };
        let [h, b, s] = metrics;
        println!(
            "{:<26} {:>22} {:>22} {:>22}",
            case.name,
            cell(h),
            cell(b),
            cell(s)
        );
    }
}
