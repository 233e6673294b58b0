//! The pooled client against the real server: bytes intact, half-close, sharing, limits,
//! one dial at a time, idle release, keepalive teardown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;

use super::*;

/// An echo app and an HBONE server that forwards to it, as most tests here need.
pub(super) async fn echo_and_server() -> (Echo, World) {
    let echo = Echo::start("127.0.0.1:0").await;
    let world = World::start(
        H2Settings::server(),
        forward(Arc::default(), Arc::default()),
    )
    .await;
    (echo, world)
}

/// A CONNECT to `target`, the request every test here sends.
pub(super) fn connect_to(target: SocketAddr) -> ConnectRequest {
    ConnectRequest::new(target.to_string())
}

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_round_trip_is_byte_exact_and_identified() {
    let echo = Echo::start("127.0.0.1:0").await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let world = World::start(H2Settings::server(), forward(seen.clone(), Arc::default())).await;
    let pool = small_pool();

    let stream = pool
        .open(&world.key(), world.dial(), connect_to(echo.addr))
        .await
        .expect("open");
    let data = pattern(16 * MIB);
    let back = round_trip(stream, data.clone()).await.expect("round trip");

    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(Some(CLIENT_ID.parse().unwrap()), Authority::Addr(echo.addr))],
        "the server saw the client's SPIFFE id and the requested authority"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_propagates_both_ways() {
    // The upstream greets, half-closes, then reports how much it read before EOF.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (report, mut reports) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let report = report.clone();
            tokio::spawn(async move {
                tcp.write_all(b"hello").await.unwrap();
                tcp.shutdown().await.unwrap();
                let mut got = Vec::new();
                tcp.read_to_end(&mut got).await.unwrap();
                report.send(got.len()).unwrap();
            });
        }
    });
    let world = World::start(
        H2Settings::server(),
        forward(Arc::default(), Arc::default()),
    )
    .await;
    let pool = small_pool();
    let mut stream = pool
        .open(
            &world.key(),
            world.dial(),
            ConnectRequest::new(upstream.to_string()),
        )
        .await
        .expect("open");

    // Upstream EOF reaches the client as EOF while the client's direction stays open...
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"hello");
    // ...and the client can still send, and its EOF reaches the upstream.
    stream.write_all(&pattern(100_000)).await.unwrap();
    stream.shutdown().await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), reports.recv())
        .await
        .expect("upstream saw EOF")
        .unwrap();
    assert_eq!(read, 100_000);

    // The other order: the client half-closes first and still reads the whole reply.
    let echo = Echo::start("127.0.0.1:0").await;
    let stream = pool
        .open(&world.key(), world.dial(), connect_to(echo.addr))
        .await
        .expect("open");
    let back = round_trip(stream, pattern(300_000)).await.unwrap();
    assert!(back == pattern(300_000));
}

/// Opens `count` streams at once, holds them all open together, and returns the pool's
/// connection count at that moment.
async fn hold_concurrently(world: &World, pool: &Pool, target: SocketAddr, count: usize) -> usize {
    let barrier = Arc::new(Barrier::new(count + 1));
    let release = Arc::new(Barrier::new(count + 1));
    let mut tasks = Vec::new();
    for i in 0..count {
        let (pool, key, dial) = (pool.clone(), world.key(), world.dial());
        let (barrier, release) = (barrier.clone(), release.clone());
        tasks.push(tokio::spawn(async move {
            let mut stream = pool
                .open(&key, dial, ConnectRequest::new(target.to_string()))
                .await
                .expect("open");
            let message = format!("stream {i}");
            stream.write_all(message.as_bytes()).await.unwrap();
            let mut back = vec![0; message.len()];
            stream.read_exact(&mut back).await.unwrap();
            assert_eq!(back, message.as_bytes());
            barrier.wait().await;
            release.wait().await;
        }));
    }
    tokio::time::timeout(Duration::from_secs(20), barrier.wait())
        .await
        .expect("all streams open at once");
    let connections = pool.connection_count();
    release.wait().await;
    for task in tasks {
        task.await.expect("stream task");
    }
    connections
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams_share_one_connection() {
    let (echo, world) = echo_and_server().await;
    let pool = small_pool();

    let connections = hold_concurrently(&world, &pool, echo.addr, 100).await;

    assert!(
        connections <= 2,
        "{connections} connections for 100 streams"
    );
    assert!(world.accepted.load(Ordering::SeqCst) <= 2);
    assert_eq!(pool.stats().streams_opened, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_stream_limit_spreads_streams_over_connections() {
    let echo = Echo::start("127.0.0.1:0").await;
    let concurrency = Arc::new(Concurrency::default());
    let world = World::start(
        H2Settings::server(),
        forward(Arc::default(), concurrency.clone()),
    )
    .await;
    let pool = Pool::new(PoolSettings {
        max_streams_per_connection: 10,
        ..PoolSettings::default()
    });

    let connections = hold_concurrently(&world, &pool, echo.addr, 100).await;

    assert!(connections >= 10, "only {connections} connections");
    let (peak, seen) = concurrency.peak();
    assert!(peak <= 10, "a connection carried {peak} streams at once");
    assert!(seen >= 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_stream_limit_is_respected() {
    let echo = Echo::start("127.0.0.1:0").await;
    let concurrency = Arc::new(Concurrency::default());
    let settings = H2Settings {
        max_concurrent_streams: 5,
        ..H2Settings::server()
    };
    let world = World::start(settings, forward(Arc::default(), concurrency.clone())).await;
    let pool = small_pool();

    let connections = hold_concurrently(&world, &pool, echo.addr, 20).await;

    assert!(connections >= 4, "only {connections} connections");
    let (peak, _) = concurrency.peak();
    assert!(peak <= 5, "a connection carried {peak} streams at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_pool_dials_once_for_many_callers() {
    let (echo, world) = echo_and_server().await;
    let pool = small_pool();
    let dials = Arc::new(AtomicUsize::new(0));

    let opens = (0..50).map(|_| {
        let (pool, key) = (pool.clone(), world.key());
        let dial = world.counted_dial(dials.clone(), Duration::from_millis(50));
        let target = echo.addr.to_string();
        tokio::spawn(async move { pool.open(&key, dial, ConnectRequest::new(target)).await })
    });
    let streams = futures::future::join_all(opens).await;

    assert!(streams.iter().all(|s| matches!(s, Ok(Ok(_)))));
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    assert_eq!(pool.stats().dials, 1);
    assert_eq!(world.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_pods_connections_close_and_other_pods_keep_theirs() {
    let (echo, world) = echo_and_server().await;
    let pool = Pool::new(PoolSettings::default());
    let key_of = |uid: &str| PoolKey {
        pod: Some(Arc::from(uid)),
        ..world.key()
    };
    let (gone, staying) = (key_of("pod-a"), key_of("pod-b"));
    let request = || connect_to(echo.addr);
    let mut cut = pool
        .open(&gone, world.dial(), request())
        .await
        .expect("pod-a");
    let mut kept = pool
        .open(&staying, world.dial(), request())
        .await
        .expect("pod-b");
    assert_eq!(pool.connection_count(), 2, "pods never share a connection");

    assert_eq!(pool.release_pod("pod-a"), 1);
    assert_eq!(pool.release_pod("pod-a"), 0, "released once");
    // A stream already open finishes its work (the pod's drain is what cuts it).
    cut.write_all(b"last").await.unwrap();
    let mut back = [0; 4];
    cut.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"last");
    drop(cut);
    assert!(
        eventually(Duration::from_secs(3), || pool.connection_count() == 1).await,
        "the released connection did not close"
    );

    // The other pod's connection is untouched and still carries new streams.
    kept.write_all(b"ping").await.unwrap();
    kept.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    let mut again = pool
        .open(&staying, world.dial(), request())
        .await
        .expect("a new stream for pod-b");
    again.write_all(b"pong").await.unwrap();
    again.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"pong");
    assert_eq!(
        pool.stats().dials,
        2,
        "pod-b's stream reused its connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_connection_is_closed_after_the_idle_timeout() {
    let (echo, world) = echo_and_server().await;
    let pool = Pool::new(PoolSettings {
        idle_timeout: Duration::from_millis(300),
        ..PoolSettings::default()
    });
    let key = world.key();
    let open = || pool.open(&key, world.dial(), connect_to(echo.addr));

    // A stream held open past the idle timeout keeps its connection.
    let mut held = open().await.expect("open");
    tokio::time::sleep(Duration::from_millis(700)).await;
    held.write_all(b"still here").await.unwrap();
    let mut back = [0; 10];
    held.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    assert_eq!(pool.connection_count(), 1);
    drop(held);

    // Unused, it goes, on both ends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pool.connection_count(), 1, "closed before the idle timeout");
    assert!(eventually(Duration::from_secs(3), || pool.connection_count() == 0).await);
    assert!(
        eventually(Duration::from_secs(3), || world
            .served
            .lock()
            .unwrap()
            .len()
            == 1)
        .await
    );
    assert_eq!(world.served.lock().unwrap()[0], Ok(()));

    // The next stream dials afresh.
    let stream = open().await.expect("open after idle close");
    assert_eq!(
        round_trip(stream, b"again".to_vec()).await.unwrap(),
        b"again"
    );
    assert_eq!(pool.stats().dials, 2);
}

/// After a burst a key keeps one warm connection; the spares close on both ends after the
/// short spare timeout (their buffers are the memory a burst leaves behind, issue 16 item 5),
/// not after the long idle timeout, and never while they carry a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bursts_spare_connections_close_after_the_spare_timeout_and_one_stays() {
    let (echo, world) = echo_and_server().await;
    let pool = Pool::new(PoolSettings {
        max_streams_per_connection: 10,
        idle_timeout: Duration::from_secs(600),
        spare_idle_timeout: Duration::from_secs(1),
        ..PoolSettings::default()
    });

    let during = hold_concurrently(&world, &pool, echo.addr, 30).await;
    assert!(during >= 3, "only {during} connections for 30 streams");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        pool.connection_count(),
        during,
        "a spare closed before the spare timeout"
    );
    assert!(
        eventually(Duration::from_secs(5), || pool.connection_count() == 1).await,
        "{} connections left after the spare timeout",
        pool.connection_count()
    );
    assert!(
        eventually(Duration::from_secs(5), || world
            .served
            .lock()
            .unwrap()
            .len()
            == during - 1)
        .await,
        "the server still serves the spares"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        pool.connection_count(),
        1,
        "the last warm connection closed"
    );

    // The one kept carries the next stream without a dial.
    let dials = pool.stats().dials;
    let stream = pool
        .open(&world.key(), world.dial(), connect_to(echo.addr))
        .await
        .expect("open on the kept connection");
    assert_eq!(round_trip(stream, b"warm".to_vec()).await.unwrap(), b"warm");
    assert_eq!(
        pool.stats().dials,
        dials,
        "the kept connection was not used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_server_finishes_open_streams_and_the_pool_moves_on() {
    let (echo, world) = echo_and_server().await;
    let pool = small_pool();
    let mut stream = pool
        .open(&world.key(), world.dial(), connect_to(echo.addr))
        .await
        .expect("open");

    world.drain.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The open stream still works end to end.
    stream.write_all(b"after drain").await.unwrap();
    let mut back = [0; 11];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"after drain");
    assert!(
        world.served.lock().unwrap().is_empty(),
        "server ended with a stream open"
    );
    drop(stream);

    // Then the server ends the connection cleanly, and the pool lets go of it.
    assert!(
        eventually(Duration::from_secs(3), || world
            .served
            .lock()
            .unwrap()
            .len()
            == 1)
        .await
    );
    assert_eq!(world.served.lock().unwrap()[0], Ok(()));
    assert!(eventually(Duration::from_secs(3), || pool.connection_count() == 0).await);
}

/// A TCP relay that can be frozen: it then holds both sockets open and forwards nothing.
async fn freezable_relay(target: SocketAddr) -> (SocketAddr, Arc<tokio::sync::Notify>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let freeze = Arc::new(tokio::sync::Notify::new());
    let frozen = freeze.clone();
    tokio::spawn(async move {
        let (mut client, _) = listener.accept().await.unwrap();
        let mut server = TcpStream::connect(target).await.unwrap();
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
            () = frozen.notified() => std::future::pending::<()>().await,
        }
    });
    (addr, freeze)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_ping_tears_the_connection_down() {
    let (echo, world) = echo_and_server().await;
    let (relay, freeze) = freezable_relay(world.addr).await;
    let pool = Pool::new(PoolSettings {
        h2: H2Settings {
            keepalive_interval: Duration::from_millis(100),
            keepalive_timeout: Duration::from_millis(300),
            ..H2Settings::client()
        },
        ..PoolSettings::default()
    });
    let key = PoolKey {
        destination: relay,
        ..world.key()
    };
    let dial = dial_to(relay, world.pki.client_config(CLIENT_ID));
    let mut stream = pool
        .open(&key, dial, connect_to(echo.addr))
        .await
        .expect("open through the relay");
    stream.write_all(b"ping").await.unwrap();
    let mut back = [0; 4];
    stream.read_exact(&mut back).await.unwrap();

    freeze.notify_one();
    assert!(
        eventually(Duration::from_secs(3), || pool.connection_count() == 0).await,
        "the connection outlived its keepalive"
    );
    let mut rest = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut rest)).await;
    assert!(
        outcome.is_ok(),
        "the stream still waits on a dead connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_socket_copied_into_a_pooled_stream_round_trips() {
    let (echo, world) = echo_and_server().await;
    let pool = small_pool();
    // The outbound side of a proxy: app socket in, HBONE stream out, the copier between.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outbound = listener.local_addr().unwrap();
    let (key, dial, target) = (world.key(), world.dial(), echo.addr.to_string());
    let proxy = tokio::spawn(async move {
        let (app, _) = listener.accept().await.unwrap();
        let stream = pool
            .open(&key, dial, ConnectRequest::new(target))
            .await
            .unwrap();
        crate::proxy::copy::copy_tcp_h2(app, stream).await
    });

    let app = TcpStream::connect(outbound).await.unwrap();
    let (mut read, mut write) = app.into_split();
    let data = pattern(4 * MIB);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    read.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();

    assert!(back == data, "echoed bytes differ");
    let transferred = proxy.await.unwrap().expect("copy");
    assert_eq!(transferred.to_upstream, (4 * MIB) as u64);
    assert_eq!(transferred.to_downstream, (4 * MIB) as u64);
}
