//! HARDENING.md §8 `h2_server`: fuzzed bytes sent as HTTP/2 frames after the client preface,
//! inside a real mutual-TLS connection, to ztund's HBONE server ([`accept_and_serve`] with the
//! port-15008 limits and ztund's own TLS server config). CONNECTs it hands over are refused,
//! dropped (503) or accepted and echoed, by their port. The server must end the connection by
//! itself within its own timeouts (the runtime's clock is paused, so idle waits pass at once)
//! and stay under libFuzzer's `-rss_limit_mb`.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use ztund::hbone::server::accept_and_serve;
use ztund::hbone::testing::TestPki;
use ztund::hbone::{ConnectionInfo, Limits, Refusal, ServerBudget};
use ztund::identity::{SpiffeId, WorkloadCertificate};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longer than any path through the server's own timeouts (TLS handshake 10 s, preface and
/// keepalive 20 s); on the paused clock it costs nothing unless the server hangs.
const DEADLINE: Duration = Duration::from_secs(600);

struct Setup {
    runtime: Runtime,
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let pki = TestPki::new();
        let id = SpiffeId::new("cluster.local", "default", "server").unwrap();
        let (chain, key) = pki.leaf(&id.to_string());
        let cert = WorkloadCertificate {
            id,
            chain,
            key,
            roots: vec![pki.root()],
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::now() + Duration::from_secs(86400),
        };
        let server = ztund::tls::server_config(&cert).unwrap();
        let client = pki.client_config("spiffe://cluster.local/ns/default/sa/client");
        Setup {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap(),
            acceptor: tokio_rustls::TlsAcceptor::from(server),
            connector: tokio_rustls::TlsConnector::from(client),
        }
    })
}

fn on_connect(incoming: ztund::hbone::IncomingConnect) {
    match incoming.authority.port() % 3 {
        0 => incoming.refuse(Refusal::Denied("fuzz".into())),
        1 => drop(incoming),
        _ => {
            if let Ok(stream) = incoming.accept() {
                tokio::spawn(async move {
                    let (mut read, mut write) = tokio::io::split(stream);
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let setup = setup();
    setup.runtime.block_on(async {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let info = ConnectionInfo {
            peer_addr: SocketAddr::from(([10, 0, 0, 1], 40000)),
            local_addr: SocketAddr::from(([10, 0, 0, 2], 15008)),
        };
        let (_drain, drain) = watch::channel(false);
        let acceptor = setup.acceptor.clone();
        let server = tokio::spawn(async move {
            // A budget per input: its reset buckets would otherwise carry one input into the next.
            let budget = ServerBudget::new(Limits::server());
            accept_and_serve(server_io, &acceptor, info, &budget, drain, on_connect).await
        });
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let tls = setup
            .connector
            .connect(name, client_io)
            .await
            .expect("TLS with ztund's server");
        let (mut read, mut write) = tokio::io::split(tls);
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 16 * 1024];
            while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let _ = write.write_all(PREFACE).await;
        let _ = write.write_all(data).await;
        let _ = write.flush().await;
        let _ = write.shutdown().await;
        let ended = tokio::time::timeout(DEADLINE, server).await;
        assert!(
            ended.is_ok(),
            "the server did not end the connection within {DEADLINE:?}"
        );
        // An error is how a hostile connection ends; a panic is not.
        let _ = ended.unwrap().expect("the server task panicked");
        reader.abort();
    });
});
