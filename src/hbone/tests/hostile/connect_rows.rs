//! HARDENING.md §3, rows C5–C8, and Rapid Reset spread over many connections (issue 14),
//! against the HBONE server.

use super::*;
use crate::hbone::budget::LimitHit;
use crate::hbone::raw_client::*;
use crate::hbone::request::forwarded_for;

// HARDENING H1 (after accept), issue 14 "Rapid Reset spread over many connections"
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_spread_over_connections_cancel_their_dials_and_spend_the_peers_budget() {
    let app = App::start(Behaviour::Echo).await;
    let (connections, streams) = (10u32, 5u32);
    let mut limits = Limits::server();
    limits.early_reset_burst = 4 * streams;
    // No refill while the test runs, so what the peer spends does not depend on how fast this
    // machine is: four connections' resets empty the budget, and every later one is refused.
    limits.early_resets_per_second = 0;
    // The caller's authorization of CLIENT_ID outlasts the test: every reset lands while it
    // runs, however slowly the resets travel, and a caller the reset did not cancel is a task
    // left behind (it would dial only after the test). OTHER_ID is authorized at once.
    let held = cancellable_forward(4 * WAIT, Arc::default());
    let prompt = cancellable_forward(Duration::ZERO, Arc::default());
    let on_connect: OnConnect = Arc::new(move |incoming: IncomingConnect| {
        let other = incoming.peer_identity.as_ref().map(ToString::to_string);
        if other.as_deref() == Some(OTHER_ID) {
            prompt(incoming)
        } else {
            held(incoming)
        }
    });
    let world = World::start_with(limits, on_connect).await;
    let baseline = alive_tasks();
    let target = app.addr.to_string();
    let early = || world.budget.hits(LimitHit::EarlyReset);
    let refused = || world.budget.hits(LimitHit::EarlyResetBudget);
    let mut calmed = 0;
    for _ in 0..connections {
        let mut raw = world.raw().await;
        let (connects_before, early_before, refused_before) =
            (world.connects.load(Ordering::SeqCst), early(), refused());
        for n in 0..streams {
            // Over budget the server answers the first CONNECT with GOAWAY and closes, so a
            // later write may find the connection gone; the GOAWAY is read below.
            if raw.connect(2 * n + 1, &target, &[]).await.is_err() {
                break;
            }
        }
        // Either the caller has every CONNECT (under HTTP/2's own per-connection cap) or the
        // server turned the connection away.
        let dispatched =
            || world.connects.load(Ordering::SeqCst) >= connects_before + streams as usize;
        assert!(
            eventually(WAIT, || dispatched() || refused() > refused_before).await,
            "the CONNECTs neither reached the caller nor were refused"
        );
        if refused() > refused_before {
            let answer = raw.until_goaway(WAIT).await;
            if let Answer::GoAway {
                code: ENHANCE_YOUR_CALM,
                ..
            } = answer
            {
                calmed += 1;
            }
            continue;
        }
        for n in 0..streams {
            let _ = raw.reset(2 * n + 1, CANCEL).await;
        }
        // Each reset is spent once its caller has seen it; then the next connection meets the
        // budget as these resets left it.
        assert!(
            eventually(WAIT, || early() >= early_before + u64::from(streams)).await,
            "{} of {streams} resets counted",
            early() - early_before
        );
    }
    assert_eq!(
        early(),
        u64::from(4 * streams),
        "early resets counted before the budget closed in"
    );
    assert_eq!(
        calmed,
        connections - 4,
        "every connection over budget is told ENHANCE_YOUR_CALM"
    );
    assert!(
        tasks_back_to(baseline).await,
        "a reset left its caller running: its CONNECT would still be dialled"
    );
    assert_eq!(app.accepted(), 0, "a cancelled CONNECT reached the app");

    // Another identity is not held to this one's budget.
    let mut other = world.raw_as(OTHER_ID, &[]).await;
    other.connect(1, &target, &[]).await.unwrap();
    assert_eq!(other.answer(1, WAIT).await, Answer::Status(200));
    assert_eq!(app.accepted(), 1);
}

// HARDENING C5
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_without_authority_with_path_or_extended_and_other_methods_are_refused() {
    let app = App::start(Behaviour::Echo).await;
    let world = World::start_with(Limits::server(), forward(Seen::default(), Arc::default())).await;
    let target = app.addr.to_string();
    let cases: [(&str, Vec<(&str, &str)>); 5] = [
        ("no :authority", vec![(":method", "CONNECT")]),
        (
            ":path and :scheme",
            vec![
                (":method", "CONNECT"),
                (":authority", &target),
                (":scheme", "https"),
                (":path", "/"),
            ],
        ),
        (
            "extended CONNECT",
            vec![
                (":method", "CONNECT"),
                (":protocol", "websocket"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", &target),
            ],
        ),
        (
            "GET",
            vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", &target),
            ],
        ),
        (
            "POST without :path",
            vec![(":method", "POST"), (":authority", &target)],
        ),
    ];
    let mut raw = world.raw().await;
    for (n, (what, fields)) in cases.iter().enumerate() {
        let stream = 2 * n as u32 + 1;
        raw.send(
            HEADERS,
            END_HEADERS | END_STREAM,
            stream,
            &header_block(fields),
        )
        .await
        .unwrap();
        let answer = raw.answer(stream, WAIT).await;
        assert!(
            answer == Answer::Status(400) || answer == Answer::Reset(PROTOCOL_ERROR),
            "{what}: {answer:?}"
        );
    }
    assert_eq!(world.connects.load(Ordering::SeqCst), 0);
    assert_eq!(app.accepted(), 0);
}

// HARDENING C6
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_telemetry_headers_change_nothing_but_telemetry() {
    let app = App::start(Behaviour::Echo).await;
    let seen = Seen::default();
    let headers = Arc::new(Mutex::new(Vec::new()));
    let record = headers.clone();
    let forward = forward(seen.clone(), Arc::default());
    let on_connect: OnConnect = Arc::new(move |incoming: IncomingConnect| {
        record.lock().unwrap().push(incoming.headers.clone());
        forward(incoming);
    });
    let world = World::start_with(Limits::server(), on_connect).await;
    let baggage: Vec<String> = (0..100)
        .map(|n| format!("k8s.namespace.name=kube-system-{n}"))
        .chain(["k8s.namespace.name=kube-system".to_string()])
        .collect();
    let baggage = baggage.join(",");
    let mut raw = world.raw().await;
    raw.connect(
        1,
        &app.addr.to_string(),
        &[
            ("baggage", &baggage),
            ("traceparent", "zz-not-a-trace"),
            ("forwarded", "host=evil.example;for=\"[garbage\""),
        ],
    )
    .await
    .unwrap();
    assert_eq!(raw.answer(1, WAIT).await, Answer::Status(200));
    // The identity is the certificate's, whatever the headers claim.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].0.as_ref().map(ToString::to_string).as_deref(),
        Some(CLIENT_ID)
    );
    let headers = headers.lock().unwrap().clone();
    assert_eq!(forwarded_for(&headers[0]), None);
}

// HARDENING C7
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_sent_before_a_refusal_is_dropped_and_its_window_given_back() {
    for (refusal, status) in [
        (Refusal::Denied("policy".into()), 401),
        (Refusal::Unavailable("no app".into()), 503),
    ] {
        // Stream windows of 1 MiB (not the default 80 KiB), so that a few refused streams
        // pass more than the 16 MiB connection window between them.
        let mut limits = Limits::server();
        limits.h2.stream_window = 1024 * 1024;
        let world =
            World::start_with(limits, refuse_after(Duration::from_millis(200), refusal)).await;
        let mut raw = world.raw().await;
        // The windows are the RFC's 64 KiB until the server's SETTINGS (acknowledged on
        // reading) and its WINDOW_UPDATE for the connection arrive; this client sends without
        // looking at windows, so it waits for both first.
        loop {
            let frame = raw
                .next(WAIT)
                .await
                .expect("the server's connection window");
            if frame.kind == WINDOW_UPDATE && frame.stream == 0 {
                break;
            }
        }
        // 1 MiB before the answer, a few times over: the connection window (16 MiB) only
        // holds if what a refused stream received is released.
        for n in 0..20u32 {
            let stream = 2 * n + 1;
            raw.connect(stream, "127.0.0.1:9", &[]).await.unwrap();
            let chunk = vec![0u8; 16 * 1024];
            for _ in 0..64 {
                if raw.send(DATA, 0, stream, &chunk).await.is_err() {
                    break;
                }
            }
            let answer = raw.answer(stream, WAIT).await;
            assert_eq!(answer, Answer::Status(status), "stream {stream}");
        }
    }
}

/// How a stream ended for the raw client, and the bytes that came before.
#[derive(Debug, PartialEq, Eq)]
enum StreamEnd {
    EndStream(Vec<u8>),
    Reset(Vec<u8>, u32),
    Neither(Vec<u8>),
}

async fn stream_end(raw: &mut Raw, stream: u32) -> StreamEnd {
    let mut data = Vec::new();
    while let Ok(frame) = raw.next(WAIT).await {
        if frame.stream != stream {
            continue;
        }
        match frame.kind {
            DATA => {
                data.extend_from_slice(&frame.payload);
                if frame.flags & END_STREAM != 0 {
                    return StreamEnd::EndStream(data);
                }
            }
            RST_STREAM => {
                let code = u32::from_be_bytes(frame.payload[..4].try_into().unwrap());
                return StreamEnd::Reset(data, code);
            }
            _ => {}
        }
    }
    StreamEnd::Neither(data)
}

/// CONNECTs `stream` to the listener and returns the app's end of it, once answered 200.
async fn connect_app(raw: &mut Raw, stream: u32, app: &TcpListener) -> TcpStream {
    let target = app.local_addr().unwrap().to_string();
    raw.connect(stream, &target, &[]).await.unwrap();
    let (tcp, _) = tokio::time::timeout(WAIT, app.accept())
        .await
        .expect("dialled")
        .unwrap();
    assert_eq!(raw.answer(stream, WAIT).await, Answer::Status(200));
    tcp
}

// HARDENING C8 (client → app)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_stream_reaches_the_app_as_eof_and_a_client_reset_as_a_tcp_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forward = cancellable_forward(Duration::ZERO, Arc::default());
    let world = World::start_with(Limits::server(), forward).await;
    let mut raw = world.raw().await;
    // END_STREAM: the app reads EOF (not a reset) and its answer still flows back.
    let mut app = connect_app(&mut raw, 1, &listener).await;
    raw.send(DATA, END_STREAM, 1, b"hello").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, app.read_to_end(&mut got))
        .await
        .expect("EOF")
        .expect("END_STREAM reached the app as a reset");
    assert_eq!(got, b"hello");
    app.write_all(b"bye").await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(
        stream_end(&mut raw, 1).await,
        StreamEnd::EndStream(b"bye".to_vec())
    );
    // RST_STREAM, with the app's direction still open: the app's next read fails with a reset.
    for (stream, code) in [(3, CANCEL), (5, PROTOCOL_ERROR)] {
        let mut app = connect_app(&mut raw, stream, &listener).await;
        raw.send(DATA, 0, stream, b"x").await.unwrap();
        let mut first = [0u8; 1];
        app.read_exact(&mut first).await.unwrap();
        raw.reset(stream, code).await.unwrap();
        let mut rest = [0u8; 16];
        let read = tokio::time::timeout(WAIT, app.read(&mut rest))
            .await
            .expect("the app's connection stayed open after RST_STREAM");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "RST_STREAM {code:#x} reached the app as"
        );
    }
}

// HARDENING C8 (app → client)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_fin_becomes_end_stream_and_an_app_reset_becomes_rst_stream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forward = cancellable_forward(Duration::ZERO, Arc::default());
    let world = World::start_with(Limits::server(), forward).await;
    let mut raw = world.raw().await;
    // FIN: END_STREAM, and the client's direction keeps flowing to the app.
    let mut app = connect_app(&mut raw, 1, &listener).await;
    app.write_all(b"early").await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(
        stream_end(&mut raw, 1).await,
        StreamEnd::EndStream(b"early".to_vec())
    );
    raw.send(DATA, END_STREAM, 1, b"late").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, app.read_to_end(&mut got))
        .await
        .expect("EOF")
        .unwrap();
    assert_eq!(got, b"late");
    // RST: RST_STREAM CONNECT_ERROR (RFC 9113 §8.5), never END_STREAM.
    let app = connect_app(&mut raw, 3, &listener).await;
    app.set_zero_linger().unwrap();
    drop(app);
    assert_eq!(
        stream_end(&mut raw, 3).await,
        StreamEnd::Reset(Vec::new(), CONNECT_ERROR)
    );
}
