//! "HBONE stream open on a warm pool": the cost of one CONNECT round trip (request, the server
//! handing it to its caller, 200, stream set up) over an already-established mTLS HTTP/2
//! connection on loopback. This is the per-connection overhead outbound pays once the pool has
//! a connection to the peer.

use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use futures::future::BoxFuture;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use ztund::hbone::server::accept_and_serve;
use ztund::hbone::testing::TestPki;
use ztund::hbone::{
    ConnectRequest, ConnectionInfo, HboneError, IncomingConnect, Limits, Pool, PoolKey,
    PoolSettings, ServerBudget,
};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";

/// An HBONE server that accepts every CONNECT at once and drops the tunnel.
async fn start_server(pki: &TestPki) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(SERVER_ID));
    let (_drain, drain_rx) = tokio::sync::watch::channel(false);
    let budget = ServerBudget::new(Limits::server());
    tokio::spawn(async move {
        let _keep_drain_open = _drain;
        while let Ok((tcp, peer_addr)) = listener.accept().await {
            let info = ConnectionInfo {
                peer_addr,
                local_addr: addr,
            };
            let (acceptor, drain_rx, budget) = (acceptor.clone(), drain_rx.clone(), budget.clone());
            tokio::spawn(async move {
                let on_connect = |incoming: IncomingConnect| drop(incoming.accept());
                let _ = accept_and_serve(tcp, &acceptor, info, &budget, drain_rx, on_connect).await;
            });
        }
    });
    addr
}

fn dial(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> impl FnOnce() -> BoxFuture<'static, Result<TlsStream<TcpStream>, HboneError>> {
    move || {
        Box::pin(async move {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| HboneError::Dial { peer: addr, source })?;
            let _ = tcp.set_nodelay(true);
            tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .map_err(|source| HboneError::Tls { peer: addr, source })
        })
    }
}

fn stream_open_on_a_warm_pool(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pki = TestPki::new();
    let config = pki.client_config(CLIENT_ID);
    let addr = runtime.block_on(start_server(&pki));
    let key = PoolKey::new(
        CLIENT_ID.parse().expect("id"),
        vec![SERVER_ID.parse().expect("id")],
        addr,
        None,
    );
    let pool = Pool::new(PoolSettings::default());
    let open = || async {
        pool.open(
            &key,
            dial(addr, config.clone()),
            ConnectRequest::new("127.0.0.1:8080"),
        )
        .await
        .expect("open")
    };
    drop(runtime.block_on(open()));
    assert_eq!(pool.connection_count(), 1, "the pool is warm");

    c.bench_function("HBONE stream open on a warm pool", |b| {
        b.iter(|| drop(runtime.block_on(open())))
    });
    assert_eq!(
        pool.stats().dials,
        1,
        "every open reused the warm connection"
    );
}

criterion_group!(benches, stream_open_on_a_warm_pool);
criterion_main!(benches);
