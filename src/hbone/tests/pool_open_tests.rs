//! Opening a pooled stream: what the open costs the caller's task, and the client's first bytes
//! travelling with the CONNECT (before its answer, and never to an app when it is refused).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use super::pool_tests::{connect_to, echo_and_server};
use super::*;

/// Every outbound tunnel's task holds the `open` future's space for the tunnel's whole life, so
/// the dial (TLS and HTTP/2 handshake state, several KiB) must not be inline in it.
#[test]
fn opening_a_stream_keeps_the_dial_state_off_the_callers_task() {
    let pool = Pool::new(PoolSettings::default());
    let addr: SocketAddr = "127.0.0.1:15008".parse().unwrap();
    let key = PoolKey::new(
        CLIENT_ID.parse().unwrap(),
        vec![SERVER_ID.parse().unwrap()],
        addr,
        None,
    );
    let dial = dial_to(addr, TestPki::new().client_config(CLIENT_ID));
    let open = pool.open(&key, dial, ConnectRequest::new("10.0.0.1:80"));
    let size = std::mem::size_of_val(&open);
    assert!(
        size <= 1536,
        "Pool::open's future is {size} bytes (7 KiB with the dial inline)"
    );
}

/// A server that answers a CONNECT only once it has read the stream's first DATA, then sends
/// those bytes back and ends the stream. Returns its address.
async fn answers_after_first_data(pki: &TestPki) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(SERVER_ID));
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut connection = h2::server::handshake(tls).await.unwrap();
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            tokio::spawn(async move {
                let mut body = request.into_body();
                let Some(Ok(first)) = body.data().await else {
                    return;
                };
                let _ = body.flow_control().release_capacity(first.len());
                let response = http::Response::new(());
                let mut send = respond.send_response(response, false).unwrap();
                send.send_data(first, true).unwrap();
            });
        }
    });
    addr
}

/// The client's first bytes go out with the CONNECT, not after the 200: against a server that
/// answers only once it has them, the open completes and the bytes come back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_data_goes_out_with_the_connect_before_the_answer() {
    let pki = Arc::new(TestPki::new());
    let addr = answers_after_first_data(&pki).await;
    let key = PoolKey::new(
        CLIENT_ID.parse().unwrap(),
        vec![SERVER_ID.parse().unwrap()],
        addr,
        None,
    );
    let pool = small_pool();
    let request = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
    let open = pool.open(
        &key,
        dial_to(addr, pki.client_config(CLIENT_ID)),
        connect_to(addr).with_first_data(Bytes::from_static(request)),
    );
    let mut stream = tokio::time::timeout(Duration::from_secs(5), open)
        .await
        .expect("the server never answered: the first bytes waited for the 200")
        .expect("open");
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, request);
}

/// First bytes on a CONNECT the server refuses reach no app, and the node's send budget gets
/// back what they held; the next stream on the same connection carries its own intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_data_of_a_refused_connect_reaches_nothing_and_is_given_back() {
    let (echo, world) = echo_and_server().await;
    let budget = SendBudget::for_limits(&Limits::server());
    let pool = Pool::sharing(PoolSettings::default(), budget.clone());
    // Port 0 is refused by the server (nothing to dial) before any app is reached.
    let refused = SocketAddr::new(echo.addr.ip(), 0);
    let outcome = pool
        .open(
            &world.key(),
            world.dial(),
            connect_to(refused).with_first_data(Bytes::from(pattern(10_000))),
        )
        .await;
    assert!(outcome.is_err(), "a CONNECT to port 0 was accepted");
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 0);

    let data = Bytes::from(pattern(12_000));
    let stream = pool
        .open(
            &world.key(),
            world.dial(),
            connect_to(echo.addr).with_first_data(data.clone()),
        )
        .await
        .expect("open");
    let back = round_trip(stream, pattern(50_000)).await.unwrap();
    let mut expected = data.to_vec();
    expected.extend(pattern(50_000));
    assert!(
        back == expected,
        "the first bytes and the rest did not come back in order"
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while budget.queued() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the refused stream's first bytes stayed counted in the send budget");
}
