//! HARDENING H7 across connections: the node's budget of bytes queued toward peers
//! ([`crate::hbone::send_budget`]) against peers that grant the largest windows and then stop
//! reading their TCP.

use super::*;
use crate::hbone::raw_client::*;

const LARGEST_WINDOW: u32 = (1 << 31) - 1;
const BUDGET: usize = 1 << 20;
const FLOOR: usize = 64 << 10;
const HOG_STREAMS: usize = 8;

// HARDENING H7 (the node-wide send budget)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_stop_reading_fill_the_nodes_send_budget_and_no_more() {
    let mut limits = Limits::server();
    limits.max_send_queued_total = BUDGET;
    limits.send_queued_floor = FLOOR;
    let chatty = App::start(Behaviour::Chatty).await;
    let echo = App::start(Behaviour::Echo).await;
    let world =
        World::start_with(limits, cancellable_forward(Duration::ZERO, Arc::default())).await;
    let queued = Arc::clone(world.budget.send());

    // Two connections, four streams each, to an app that writes as fast as it can; windows as
    // large as HTTP/2 allows, and after the answers nothing is read.
    let mut hogs = Vec::new();
    for _ in 0..HOG_STREAMS / 4 {
        let mut raw = world
            .raw_as(CLIENT_ID, &[(SETTINGS_INITIAL_WINDOW_SIZE, LARGEST_WINDOW)])
            .await;
        raw.window_update(0, LARGEST_WINDOW - 65_535).await.unwrap();
        for n in 0..4u32 {
            let stream = 2 * n + 1;
            raw.connect(stream, &chatty.addr.to_string(), &[])
                .await
                .unwrap();
            assert_eq!(raw.answer(stream, WAIT).await, Answer::Status(200));
        }
        hogs.push(raw);
    }
    assert!(
        eventually(WAIT, || queued.queued() >= BUDGET).await,
        "the budget never filled: {} bytes queued",
        queued.queued()
    );
    // Without the budget each stream would fill its whole 400 KiB send buffer: 3.2 MiB.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bound = BUDGET + HOG_STREAMS * FLOOR;
    let at_most = queued.queued();
    assert!(
        at_most <= bound,
        "{at_most} bytes queued toward peers that read nothing; the bound is {bound}"
    );
    assert!(queued.waits() > 0, "no stream ever waited for the budget");

    // A well-behaved peer still gets its bytes through, within its floor.
    let mut good = world.raw().await;
    good.connect(1, &echo.addr.to_string(), &[]).await.unwrap();
    assert_eq!(good.answer(1, WAIT).await, Answer::Status(200));
    let sent: Vec<u8> = (0..60 * 1024).map(|i| (i % 251) as u8).collect();
    for (i, piece) in sent.chunks(15 * 1024).enumerate() {
        let last = i == 3;
        let flags = if last { END_STREAM } else { 0 };
        good.send(DATA, flags, 1, piece).await.unwrap();
    }
    let mut echoed = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match good.next(left).await {
            Ok(frame) if frame.kind == DATA && frame.stream == 1 => {
                echoed.extend_from_slice(&frame.payload);
                if frame.flags & END_STREAM != 0 {
                    break;
                }
            }
            Ok(_) => {}
            Err(answer) => panic!("the echo stopped after {} bytes: {answer:?}", echoed.len()),
        }
    }
    assert!(echoed == sent, "the echo came back altered");

    // Peers gone: everything they left queued leaves the budget, to the byte.
    drop(hogs);
    drop(good);
    assert!(
        eventually(WAIT, || queued.queued() == 0).await,
        "{} bytes still counted after every peer left",
        queued.queued()
    );
    assert!(world.all_served(HOG_STREAMS / 4 + 1).await);
}
