//! HARDENING.md §1, row H10: the pooled client against a hostile server written by hand; and
//! row H7's connection window: streams that stall must not starve the rest of their pooled
//! connection.

use super::*;
use crate::hbone::raw_client::*;

/// How the hand-written server treats the first connection; later ones answer 200 to all.
#[derive(Clone, Copy)]
enum FirstConnection {
    /// 200 to stream 1; stream 3 gets GOAWAY(last_stream_id = 1), then stream 1 ends cleanly.
    GoAwayAfterOne,
    /// A GOAWAY on stream 1 (RFC 9113 §6.8: a connection error).
    GoAwayOnAStream,
}

/// A server on 127.0.0.1 that speaks HTTP/2 by hand; counts the connections it accepted.
async fn hostile_server(pki: &TestPki, first: FirstConnection) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(SERVER_ID));
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let nth = count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut server) = RawClient::accept(tls).await else {
                    return;
                };
                while let Ok(frame) = server.next(Duration::from_secs(30)).await {
                    if frame.kind != HEADERS {
                        continue;
                    }
                    let ok = [0x88]; // :status 200, static table
                    let _ = match (nth, first, frame.stream) {
                        (0, FirstConnection::GoAwayAfterOne, 3) => {
                            let mut goaway = 1u32.to_be_bytes().to_vec();
                            goaway.extend(NO_ERROR.to_be_bytes());
                            let _ = server.send(GOAWAY, 0, 0, &goaway).await;
                            server.send(DATA, END_STREAM, 1, b"done").await
                        }
                        (0, FirstConnection::GoAwayOnAStream, stream) => {
                            let mut goaway = 0u32.to_be_bytes().to_vec();
                            goaway.extend(NO_ERROR.to_be_bytes());
                            server.send(GOAWAY, 0, stream, &goaway).await
                        }
                        (_, _, stream) => server.send(HEADERS, END_HEADERS, stream, &ok).await,
                    };
                }
            });
        }
    });
    (addr, accepted)
}

fn key_for(addr: SocketAddr) -> PoolKey {
    PoolKey::new(
        CLIENT_ID.parse().unwrap(),
        vec![SERVER_ID.parse().unwrap()],
        addr,
        None,
    )
}

// HARDENING H10
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_above_a_goaway_are_retried_on_a_new_connection() {
    let pki = TestPki::new();
    let (addr, accepted) = hostile_server(&pki, FirstConnection::GoAwayAfterOne).await;
    let pool = small_pool();
    let key = key_for(addr);
    let dial = || dial_to(addr, pki.client_config(CLIENT_ID));
    let mut first = pool
        .open(&key, dial(), ConnectRequest::new("10.0.0.1:80"))
        .await
        .expect("the first stream");
    // Stream 3 is above the GOAWAY's last stream id: the pool carries it on a new connection.
    let second = pool
        .open(&key, dial(), ConnectRequest::new("10.0.0.1:80"))
        .await
        .expect("the stream above the GOAWAY, retried");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // Stream 1, at or below it, still finishes.
    let mut got = Vec::new();
    first.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"done");
    drop(second);
    // Later streams use the new connection only.
    let _third = pool
        .open(&key, dial(), ConnectRequest::new("10.0.0.1:80"))
        .await
        .unwrap();
    assert_eq!(pool.stats().dials, 2);
}

// HARDENING H10
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goaway_on_a_stream_is_a_protocol_error_and_the_connection_is_evicted() {
    let pki = TestPki::new();
    let (addr, accepted) = hostile_server(&pki, FirstConnection::GoAwayOnAStream).await;
    let pool = small_pool();
    let key = key_for(addr);
    let dial = || dial_to(addr, pki.client_config(CLIENT_ID));
    let error = pool
        .open(&key, dial(), ConnectRequest::new("10.0.0.1:80"))
        .await
        .expect_err("a malformed GOAWAY must fail the connection");
    assert!(error.to_string().contains("HTTP/2"), "{error}");
    assert!(eventually(WAIT, || pool.connection_count() == 0).await);
    let _next = pool
        .open(&key, dial(), ConnectRequest::new("10.0.0.1:80"))
        .await
        .expect("a new connection");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

// HARDENING H7 (connection window)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_leave_window_for_the_others_on_their_pooled_connection() {
    const STALLED: usize = 10;
    let (deaf, chatty) = (
        App::start(Behaviour::Deaf).await,
        App::start(Behaviour::Chatty).await,
    );
    let echo = Echo::start("127.0.0.1:0").await;
    let world = World::start(
        H2Settings::server(),
        forward(Arc::default(), Arc::default()),
    )
    .await;
    let pool = Pool::new(PoolSettings::default());
    let key = world.key();
    let open =
        |target: SocketAddr| pool.open(&key, world.dial(), ConnectRequest::new(target.to_string()));
    // Client → server: streams into apps that never read, each written as fast as it goes.
    let mut writers = Vec::new();
    for _ in 0..STALLED {
        let mut stream = open(deaf.addr).await.expect("stream to the deaf app");
        writers.push(tokio::spawn(async move {
            let chunk = vec![1u8; 1024 * 1024];
            while stream.write_all(&chunk).await.is_ok() {}
        }));
    }
    // Server → client: streams from apps that write as fast as they can, never read here.
    let mut unread = Vec::new();
    for _ in 0..STALLED {
        unread.push(open(chatty.addr).await.expect("stream from the chatty app"));
    }
    // Long enough for every stalled stream to fill every window it may.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        pool.connection_count(),
        1,
        "the streams did not share a connection"
    );
    let stream = open(echo.addr).await.expect("one more stream");
    let data = pattern(256 * 1024);
    let back = tokio::time::timeout(Duration::from_secs(3), round_trip(stream, data.clone()))
        .await
        .expect("starved: the stalled streams hold the whole connection window")
        .unwrap();
    assert!(back == data, "echoed bytes differ");
    for writer in writers {
        writer.abort();
    }
}
