//! The server's answers: what is refused and with which status, who never reaches the caller,
//! and IPv6 authorities end to end.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// Refuses or drops each CONNECT as its `x-test-verdict` header says, never touching upstream.
fn judge() -> OnConnect {
    Arc::new(|incoming: IncomingConnect| {
        let verdict = incoming
            .headers
            .get("x-test-verdict")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        match verdict.as_str() {
            "deny" => incoming.refuse(Refusal::Denied("policy says no".into())),
            "unavailable" => incoming.refuse(Refusal::Unavailable("no such workload".into())),
            "bad" => incoming.refuse(Refusal::BadRequest("wrong destination".into())),
            "drop" => drop(incoming),
            // Answer later, from another task, as a real caller would.
            _ => {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    drop(incoming);
                });
            }
        }
    })
}

fn verdict(verdict: &'static str) -> (http::HeaderName, http::HeaderValue) {
    (
        http::HeaderName::from_static("x-test-verdict"),
        http::HeaderValue::from_static(verdict),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_their_status_and_reach_no_upstream() {
    let echo = Echo::start("127.0.0.1:0").await;
    let world = World::start(H2Settings::server(), judge()).await;
    let pool = small_pool();
    let cases = [
        ("deny", StatusCode::UNAUTHORIZED),
        ("unavailable", StatusCode::SERVICE_UNAVAILABLE),
        ("bad", StatusCode::BAD_REQUEST),
        ("drop", StatusCode::SERVICE_UNAVAILABLE),
        ("drop-later", StatusCode::SERVICE_UNAVAILABLE),
    ];
    for (said, want) in cases {
        let (name, value) = verdict(said);
        let request = ConnectRequest::new(echo.addr.to_string()).header(name, value);
        let error = pool
            .open(&world.key(), world.dial(), request)
            .await
            .expect_err(said);
        assert_eq!(error.status(), Some(want), "{said}: {error}");
    }
    assert_eq!(world.connects.load(Ordering::SeqCst), cases.len());
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(pool.stats().streams_refused, cases.len() as u64);
    // Refused streams leave the connection usable: one dial served them all.
    assert_eq!(pool.stats().dials, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_authorities_get_400_without_reaching_the_caller() {
    let world = World::start(H2Settings::server(), judge()).await;
    let pool = small_pool();
    for authority in ["reviews", "reviews:0", "reviews:http", "a..b:80"] {
        let error = pool
            .open(&world.key(), world.dial(), ConnectRequest::new(authority))
            .await
            .expect_err(authority);
        assert_eq!(
            error.status(),
            Some(StatusCode::BAD_REQUEST),
            "{authority}: {error}"
        );
    }
    assert_eq!(world.connects.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_other_than_connect_gets_400_without_reaching_the_caller() {
    let echo = Echo::start("127.0.0.1:0").await;
    let world = World::start(
        H2Settings::server(),
        forward(Arc::default(), Arc::default()),
    )
    .await;
    let tls = (world.dial())().await.expect("dial");
    let (client, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    for method in [Method::GET, Method::POST] {
        let request = Request::builder()
            .method(method.clone())
            .uri(format!("http://{}/", echo.addr))
            .body(())
            .unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        // The server may answer 400 and close the stream before the body goes out; sending it
        // then fails on our side, which is no part of what is checked here.
        let _ = body.send_data(Bytes::from_static(b"payload"), true);
        let response = response.await.expect("response");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{method}");
        client = client.ready().await.unwrap();
    }
    assert_eq!(world.connects.load(Ordering::SeqCst), 0);
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_without_alpn_never_gets_http2() {
    let world = World::start(
        H2Settings::server(),
        forward(Arc::default(), Arc::default()),
    )
    .await;
    let dial = dial_to(world.addr, world.pki.client_config_without_alpn(CLIENT_ID));
    let mut tls = dial().await.expect("the TLS handshake itself succeeds");
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);

    // Even a client that speaks HTTP/2 regardless is not served.
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "server kept the connection open");
    assert!(rest.is_empty(), "server answered: {rest:?}");
    assert!(
        eventually(Duration::from_secs(3), || world
            .served
            .lock()
            .unwrap()
            .len()
            == 1)
        .await
    );
    let served = world.served.lock().unwrap()[0].clone();
    assert!(
        matches!(&served, Err(e) if e.contains("ALPN")),
        "{served:?}"
    );
    assert_eq!(world.connects.load(Ordering::SeqCst), 0);

    // And the pool refuses such a connection from its side too.
    let pool = small_pool();
    let dial = dial_to(world.addr, world.pki.client_config_without_alpn(CLIENT_ID));
    let error = pool
        .open(&world.key(), dial, ConnectRequest::new("127.0.0.1:80"))
        .await
        .expect_err("no ALPN");
    assert!(matches!(error, HboneError::Alpn { .. }), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_never_reaches_the_caller() {
    let world = World::start(
        H2Settings::server(),
        forward(Arc::default(), Arc::default()),
    )
    .await;
    let mut tcp = TcpStream::connect(world.addr).await.unwrap();
    tcp.write_all(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(
        eventually(Duration::from_secs(3), || world
            .served
            .lock()
            .unwrap()
            .len()
            == 1)
        .await
    );
    let served = world.served.lock().unwrap()[0].clone();
    assert!(matches!(&served, Err(e) if e.contains("TLS")), "{served:?}");
    assert_eq!(world.connects.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_authority_reaches_an_ipv6_upstream() {
    let echo = Echo::start("[::1]:0").await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let world = World::start(H2Settings::server(), forward(seen.clone(), Arc::default())).await;
    let pool = small_pool();
    let authority = format!("[::1]:{}", echo.addr.port());
    let stream = pool
        .open(&world.key(), world.dial(), ConnectRequest::new(authority))
        .await
        .expect("open");
    assert_eq!(
        round_trip(stream, b"over v6".to_vec()).await.unwrap(),
        b"over v6"
    );
    let seen = seen.lock().unwrap();
    assert!(matches!(seen[0].1, Authority::Addr(addr) if addr.is_ipv6() && addr == echo.addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_request_headers_arrive_as_sent() {
    let headers = Arc::new(Mutex::new(None));
    let record = headers.clone();
    let on_connect: OnConnect = Arc::new(move |incoming: IncomingConnect| {
        *record.lock().unwrap() = Some(incoming.headers.clone());
        incoming.refuse(Refusal::Denied("only looking".into()));
    });
    let world = World::start(H2Settings::server(), on_connect).await;
    let request = ConnectRequest::new("10.1.2.3:8080")
        .forwarded(
            "10.0.0.7:43210".parse().unwrap(),
            Some("reviews.default.svc.cluster.local"),
        )
        .baggage([("k8s.namespace.name", "apps"), ("service.name", "client")])
        .random_traceparent();
    let error = small_pool()
        .open(&world.key(), world.dial(), request)
        .await
        .expect_err("refused");
    assert_eq!(error.status(), Some(StatusCode::UNAUTHORIZED));
    let headers = headers.lock().unwrap().clone().expect("reached the caller");
    assert_eq!(
        headers["forwarded"],
        "for=\"10.0.0.7:43210\";host=reviews.default.svc.cluster.local"
    );
    assert_eq!(
        headers["baggage"],
        "k8s.namespace.name=apps,service.name=client"
    );
    let traceparent = headers["traceparent"].to_str().unwrap();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(
        (parts[0], parts[1].len(), parts[2].len(), parts[3]),
        ("00", 32, 16, "00")
    );
}
