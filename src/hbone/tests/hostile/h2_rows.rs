//! HARDENING.md §1, rows H1–H9 and H11, against the HBONE server.

use super::*;
use crate::hbone::budget::LimitHit;
use crate::hbone::raw_client::*;

fn limits() -> Limits {
    Limits::server()
}

// HARDENING H1
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_in_one_burst_gets_goaway_enhance_your_calm_and_no_dial() {
    let app = App::start(Behaviour::Echo).await;
    let dials = Arc::new(AtomicUsize::new(0));
    let world =
        World::start_with(limits(), cancellable_forward(Duration::ZERO, dials.clone())).await;
    let baseline = alive_tasks();
    let mut raw = world.raw().await;
    let mut burst = Vec::new();
    for n in 0..40u32 {
        let stream = 2 * n + 1;
        let block = header_block(&[
            (":method", "CONNECT"),
            (":authority", &app.addr.to_string()),
        ]);
        burst.extend(frame(HEADERS, END_HEADERS, stream, &block));
        burst.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
    }
    raw.send_bytes(&burst).await.unwrap();
    let answer = raw.until_goaway(WAIT).await;
    assert!(
        matches!(
            answer,
            Answer::GoAway {
                code: ENHANCE_YOUR_CALM,
                ..
            }
        ),
        "{answer:?}"
    );
    drop(raw);
    assert!(world.all_served(1).await);
    // Streams reset before they were accepted never reach the caller, let alone the app.
    assert_eq!(app.accepted(), 0, "a reset CONNECT reached the app");
    assert!(tasks_back_to(baseline).await, "tasks left behind");
}

// HARDENING H2
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_error_resets_at_a_zero_window_end_in_goaway_at_the_cap() {
    let world = World::start_with(limits(), judge_nothing()).await;
    // The client reads nothing and grants no window: every RST the server makes must be
    // bounded by the cap, not queued forever.
    let mut raw = world
        .raw_as(CLIENT_ID, &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)])
        .await;
    raw.polite = false;
    let mut burst = Vec::new();
    for n in 0..1100u32 {
        // :path in a CONNECT is malformed (RFC 9113 §8.5): HTTP/2 resets the stream itself.
        let block = header_block(&[
            (":method", "CONNECT"),
            (":authority", "127.0.0.1:9"),
            (":path", "/"),
        ]);
        burst.extend(frame(HEADERS, END_HEADERS, 2 * n + 1, &block));
    }
    let _ = raw.send_bytes(&burst).await;
    let answer = raw.until_goaway(WAIT).await;
    assert!(
        matches!(
            answer,
            Answer::GoAway {
                code: ENHANCE_YOUR_CALM,
                ..
            }
        ),
        "{answer:?}"
    );
    assert_eq!(world.connects.load(Ordering::SeqCst), 0);
}

fn judge_nothing() -> OnConnect {
    Arc::new(|incoming: IncomingConnect| incoming.refuse(Refusal::Denied("test".into())))
}

// HARDENING H3
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_continuation_frames_end_the_connection() {
    let world = World::start_with(limits(), judge_nothing()).await;
    let baseline = alive_tasks();
    for payload in [Vec::new(), vec![b'a'; 1024]] {
        let mut raw = world.raw().await;
        let block = header_block(&[(":method", "CONNECT"), (":authority", "127.0.0.1:9")]);
        raw.send(HEADERS, 0, 1, &block).await.unwrap();
        let mut sent = 0;
        for _ in 0..2000 {
            if raw.send(CONTINUATION, 0, 1, &payload).await.is_err() {
                break;
            }
            sent += 1;
        }
        let answer = raw.until_goaway(WAIT).await;
        assert!(
            matches!(answer, Answer::GoAway { code, .. } if code != NO_ERROR)
                || answer == Answer::Closed,
            "{} B CONTINUATION x{sent}: {answer:?}",
            payload.len()
        );
    }
    assert!(world.all_served(2).await);
    assert_eq!(world.connects.load(Ordering::SeqCst), 0);
    assert!(tasks_back_to(baseline).await, "tasks left behind");
}

// HARDENING H4
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_lists_are_refused_before_the_caller() {
    let world = World::start_with(limits(), judge_nothing()).await;
    let app = "127.0.0.1:9";
    // (a) one 1 MiB header; (b) 10 000 small headers.
    let big = "x".repeat(1024 * 1024 - 100);
    let many: Vec<(String, String)> = (0..10_000).map(|n| (format!("h{n}"), "v".into())).collect();
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![(":method", "CONNECT"), (":authority", app), ("big", &big)],
        [(":method", "CONNECT"), (":authority", app)]
            .into_iter()
            .chain(many.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .collect(),
    ];
    for fields in cases {
        let mut raw = world.raw().await;
        let block = header_block(&fields);
        let _ = send_header_block(&mut raw, 1, &block).await;
        let answer = raw.answer(1, WAIT).await;
        assert!(refused_or_closed(&answer), "{answer:?}");
    }
    // (c) one 4 000-byte HPACK entry, then referenced 100 times: 400 kB decoded.
    let mut raw = world.raw().await;
    let mut block = header_block(&[(":method", "CONNECT"), (":authority", app)]);
    block.push(0x40);
    block.push(5);
    block.extend(b"bloat");
    block.extend([0x7f, 0xa1, 0x1e]); // 127 + 0x21 + 0x1e * 128 = 4 000
    block.extend(vec![b'y'; 4000]);
    block.extend(std::iter::repeat_n(0x80 | 62, 100));
    let _ = send_header_block(&mut raw, 1, &block).await;
    let answer = raw.answer(1, WAIT).await;
    assert!(refused_or_closed(&answer), "{answer:?}");
    assert_eq!(world.connects.load(Ordering::SeqCst), 0);
}

/// Sends a header block as HEADERS plus CONTINUATION frames of 16 KiB.
async fn send_header_block(raw: &mut Raw, stream: u32, block: &[u8]) -> std::io::Result<()> {
    let mut chunks = block.chunks(16 * 1024).peekable();
    let mut kind = HEADERS;
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        raw.send(kind, flags, stream, chunk).await?;
        kind = CONTINUATION;
    }
    Ok(())
}

fn refused_or_closed(answer: &Answer) -> bool {
    match answer {
        Answer::Status(status) => *status == 431 || *status == 400,
        Answer::Reset(_) | Answer::Closed => true,
        Answer::GoAway { code, .. } => *code != NO_ERROR,
        Answer::Timeout => false,
    }
}

// HARDENING H5
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_settings_floods_spend_the_frame_budget_and_get_goaway() {
    let world = World::start_with(limits(), judge_nothing()).await;
    let baseline = alive_tasks();
    let flood = |kind: u8, payload: &[u8], count: usize| {
        let one = frame(kind, 0, 0, payload);
        one.repeat(count)
    };
    // (a) PINGs, never reading the PONGs; (b) PINGs, reading them; (c) SETTINGS.
    let cases = [
        ("PING, not reading", flood(PING, &[0; 8], 5000), false),
        ("PING, reading", flood(PING, &[0; 8], 5000), true),
        ("SETTINGS", flood(SETTINGS, &[], 5000), true),
    ];
    for (what, bytes, reading) in cases {
        let mut raw = world.raw().await;
        raw.polite = false;
        let mut answer = Answer::Timeout;
        if reading {
            // 100 frames at a time, reading what came back in between.
            for chunk in bytes.chunks(100 * 9) {
                if raw.send_bytes(chunk).await.is_err() {
                    break;
                }
                answer = drain_for_goaway(&mut raw).await;
                if answer != Answer::Timeout {
                    break;
                }
            }
        } else {
            let _ = raw.send_bytes(&bytes).await;
        }
        if answer == Answer::Timeout {
            answer = raw.until_goaway(WAIT).await;
        }
        assert!(
            matches!(
                answer,
                Answer::GoAway {
                    code: ENHANCE_YOUR_CALM,
                    ..
                }
            ),
            "{what}: {answer:?}"
        );
        // The server answered at most the budget's worth of them, plus the frames HTTP/2 had
        // already read in the same read as the one over budget (16 KiB holds 963 PINGs).
        assert!(
            raw.frames_read < 200 + 963,
            "{what}: {} frames back",
            raw.frames_read
        );
    }
    assert!(world.all_served(3).await);
    assert_eq!(world.budget.hits(LimitHit::ControlFrames), 3);
    assert!(tasks_back_to(baseline).await, "tasks left behind");
}

/// Reads what the server has sent so far; a GOAWAY or the close if one came.
async fn drain_for_goaway(raw: &mut Raw) -> Answer {
    loop {
        match raw.next(Duration::from_millis(2)).await {
            Ok(frame) if frame.kind == GOAWAY => {
                return raw_client_goaway(&frame);
            }
            Ok(_) => {}
            Err(Answer::Timeout) => return Answer::Timeout,
            Err(other) => return other,
        }
    }
}

fn raw_client_goaway(frame: &Frame) -> Answer {
    let payload = &frame.payload;
    Answer::GoAway {
        last_stream: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
            & 0x7fff_ffff,
        code: u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
    }
}

// HARDENING H6
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_empty_and_tiny_data_frames_get_enhance_your_calm() {
    let (on_connect, held) = accept_never_read();
    let world = World::start_with(limits(), on_connect).await;
    for (what, payload, count) in [("empty", &b""[..], 1000), ("1-byte", &b"x"[..], 200_000)] {
        let mut raw = world.raw().await;
        raw.connect(1, "127.0.0.1:9", &[]).await.unwrap();
        assert_eq!(raw.answer(1, WAIT).await, Answer::Status(200), "{what}");
        let one = frame(DATA, 0, 1, payload);
        let _ = raw.send_bytes(&one.repeat(count)).await;
        let answer = raw.until_goaway(WAIT).await;
        assert!(
            matches!(answer, Answer::GoAway { code, .. } if code == ENHANCE_YOUR_CALM || code == FLOW_CONTROL_ERROR),
            "{what} DATA x{count}: {answer:?}"
        );
    }
    held.lock().unwrap().clear();
}

// HARDENING H7
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_window_reader_pushes_back_on_a_chatty_upstream() {
    let app = App::start(Behaviour::Chatty).await;
    let dials = Arc::new(AtomicUsize::new(0));
    let world = World::start_with(limits(), cancellable_forward(Duration::ZERO, dials)).await;
    let mut raw = world
        .raw_as(CLIENT_ID, &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)])
        .await;
    for n in 0..4u32 {
        raw.connect(2 * n + 1, &app.addr.to_string(), &[])
            .await
            .unwrap();
        assert_eq!(raw.answer(2 * n + 1, WAIT).await, Answer::Status(200));
    }
    // Two seconds of an app writing as fast as it can into four streams nobody reads.
    let mut data_frames = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(frame) = raw.next(deadline - tokio::time::Instant::now()).await {
        if frame.kind == DATA && !frame.payload.is_empty() {
            data_frames += 1;
        }
    }
    assert_eq!(data_frames, 0, "DATA sent into a zero window");
    // What the app could write is what the sockets buffer, never what it wanted to.
    let written = app.written.load(Ordering::SeqCst);
    assert!(
        written < 4 * 8 * 1024 * 1024,
        "{written} bytes left the app: no backpressure"
    );
}

// HARDENING H7 (the stall timeout)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_held_at_a_zero_window_is_reset_after_the_stall_timeout_and_its_app_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let mut limits = limits();
    limits.stream_stall_timeout = Duration::from_millis(500);
    let forward = cancellable_forward(Duration::ZERO, Arc::default());
    let world = World::start_with(limits, forward).await;
    let mut raw = world
        .raw_as(CLIENT_ID, &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)])
        .await;
    raw.connect(1, &target, &[]).await.unwrap();
    let (mut app, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the CONNECT was dialled")
        .unwrap();
    assert_eq!(raw.answer(1, WAIT).await, Answer::Status(200));
    let started = tokio::time::Instant::now();
    // A chatty app: it writes until its writes block, and then until they fail.
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        loop {
            match app.write_all(&chunk).await {
                Ok(()) => written += chunk.len(),
                Err(e) => return (written, e.kind()),
            }
        }
    });
    assert_eq!(raw.answer(1, WAIT).await, Answer::Reset(CANCEL));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(450),
        "reset after {waited:?}, before the stall timeout"
    );
    let (written, ended) = tokio::time::timeout(WAIT, writer)
        .await
        .expect("the app's connection stayed open after the reset")
        .unwrap();
    assert!(
        matches!(
            ended,
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "the app's write ended with {ended:?}"
    );
    // Backpressure: what left the app is what the sockets and one read buffer hold.
    assert!(written < 16 * 1024 * 1024, "{written} bytes left the app");
    assert_eq!(world.budget.hits(LimitHit::StreamStall), 1);
    // A stream that moves, however slowly, is not cut off: 2 s of 1 KiB every 100 ms.
    let app = App::start(Behaviour::Chatty).await;
    raw.connect(3, &app.addr.to_string(), &[]).await.unwrap();
    assert_eq!(raw.answer(3, WAIT).await, Answer::Status(200));
    let mut received = 0;
    for _ in 0..20 {
        raw.window_update(3, 1024).await.unwrap();
        raw.window_update(0, 1024).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        while let Ok(frame) = raw.next(deadline - tokio::time::Instant::now()).await {
            assert!(frame.kind != RST_STREAM, "a moving stream was reset");
            if frame.kind == DATA && frame.stream == 3 {
                received += frame.payload.len();
            }
        }
    }
    assert!(received >= 19 * 1024, "{received} bytes arrived");
    assert_eq!(world.budget.hits(LimitHit::StreamStall), 1);
}

// HARDENING H8
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_overflow_and_zero_increments_are_protocol_errors() {
    let (on_connect, _held) = hold_unanswered();
    let world = World::start_with(limits(), on_connect).await;
    // A connection window pushed past 2^31 - 1.
    let mut raw = world.raw().await;
    raw.window_update(0, 0x7fff_ffff).await.unwrap();
    let answer = raw.until_goaway(WAIT).await;
    assert!(
        matches!(
            answer,
            Answer::GoAway {
                code: FLOW_CONTROL_ERROR,
                ..
            }
        ),
        "{answer:?}"
    );
    // A zero increment on the connection.
    let mut raw = world.raw().await;
    raw.window_update(0, 0).await.unwrap();
    let answer = raw.until_goaway(WAIT).await;
    assert!(
        matches!(
            answer,
            Answer::GoAway {
                code: PROTOCOL_ERROR,
                ..
            }
        ),
        "{answer:?}"
    );
    // A zero increment on a stream, and a stream window pushed past 2^31 - 1.
    for (increment, code) in [(0, PROTOCOL_ERROR), (0x7fff_ffff, FLOW_CONTROL_ERROR)] {
        let mut raw = world.raw().await;
        raw.connect(1, "127.0.0.1:9", &[]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        raw.window_update(1, increment).await.unwrap();
        let answer = raw.answer(1, WAIT).await;
        assert!(
            answer == Answer::Reset(code)
                || matches!(answer, Answer::GoAway { code: c, .. } if c == code),
            "increment {increment}: {answer:?}"
        );
    }
}

// HARDENING H9
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_the_advertised_and_the_node_budget_are_refused() {
    let (on_connect, held) = hold_unanswered();
    let mut limits = limits();
    limits.max_streams_total = 250;
    let world = World::start_with(limits, on_connect).await;
    // 200 streams held open on one connection, and one more.
    let mut first = world.raw().await;
    for n in 0..201u32 {
        first.connect(2 * n + 1, "127.0.0.1:9", &[]).await.unwrap();
    }
    assert_eq!(first.answer(401, WAIT).await, Answer::Reset(REFUSED_STREAM));
    assert!(eventually(WAIT, || held.lock().unwrap().len() == 200).await);
    // A second connection gets the node's remaining 50, then REFUSED_STREAM too.
    let mut second = world.raw().await;
    for n in 0..51u32 {
        second.connect(2 * n + 1, "127.0.0.1:9", &[]).await.unwrap();
    }
    assert_eq!(
        second.answer(101, WAIT).await,
        Answer::Reset(REFUSED_STREAM)
    );
    assert_eq!(world.budget.open_streams(), 250);
    assert_eq!(world.budget.hits(LimitHit::StreamsTotal), 1);
    // Streams given back free the budget.
    held.lock().unwrap().clear();
    assert!(eventually(WAIT, || world.budget.open_streams() == 0).await);
}

// HARDENING H11
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_after_tls_half_a_preface_and_an_idle_connection_are_closed() {
    let mut limits = limits();
    limits.preface_timeout = Duration::from_millis(300);
    limits.idle_timeout = Duration::from_millis(400);
    let world = World::start_with(limits, judge_nothing()).await;
    let baseline = alive_tasks();
    // No preface at all; half of one.
    for sent in [&b""[..], &PREFACE[..12]] {
        let mut tls = raw_client::tls_connect(world.addr, world.pki.client_config(CLIENT_ID))
            .await
            .unwrap();
        tls.write_all(sent).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "kept open after {} preface bytes", sent.len());
    }
    // A whole preface, then no request: GOAWAY NO_ERROR and the close.
    let mut raw = world.raw().await;
    let answer = raw.until_goaway(WAIT).await;
    // Graceful: the first GOAWAY names the highest stream id, the second the last one.
    assert!(
        matches!(answer, Answer::GoAway { code: NO_ERROR, .. }),
        "{answer:?}"
    );
    assert!(raw.until_closed(WAIT).await);
    assert!(world.all_served(3).await);
    assert_eq!(world.budget.hits(LimitHit::PrefaceTimeout), 2);
    assert_eq!(world.budget.hits(LimitHit::IdleTimeout), 1);
    let served = world.served.lock().unwrap().clone();
    assert!(
        served
            .iter()
            .filter(|r| matches!(r, Err(e) if e.contains("preface")))
            .count()
            == 2,
        "{served:?}"
    );
    assert!(tasks_back_to(baseline).await, "tasks left behind");
}
