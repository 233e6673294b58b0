//! HARDENING F1: the control plane is down when ztund starts, and later restarts. Until its
//! first sync ztund is not ready and serves nothing (an unknown destination is never passed
//! through in plaintext); once synced, the state it cached keeps serving while the control
//! plane is away, open connections keep flowing, and it resumes when the control plane returns.

mod faults;
mod support;
mod testbed;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use faults::{ECHO_PORT, app, exchange, mesh, socks5, usage};
use support::Cluster;
use support::controlplane::ControlPlane;
use testbed::{Place, Testbed};

// HARDENING F1
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_down_at_start_then_restarting_fails_closed_then_serves_from_cache() {
    let bed = Testbed::new(2, 0);
    let cluster = Cluster::new();
    std::fs::create_dir_all(cluster.path("cp")).expect("cp dir");
    std::fs::write(cluster.path("cp/mesh.yaml"), mesh(&bed)).expect("cp yaml");
    let listen = SocketAddr::new(bed.node_ip(1), 15012);
    // Run once to make its CA and token key, then take it away before any node starts.
    let mut cp = ControlPlane::start(&bed, &cluster, Place::Node(1), listen).await;
    let c1 = cp.node_config(&cluster, "node1", "");
    let c2 = cp.node_config(&cluster, "node2", "");
    cp.kill();
    let echo_addr = SocketAddr::new(bed.node_ip(2), ECHO_PORT);
    let echo = app(&bed, Place::Node(2), echo_addr, false);

    let node1 = cluster.spawn(&bed, 1, &c1);
    let node2 = cluster.spawn(&bed, 2, &c2);
    // Down at start: readiness answers, and says "not ready", for as long as it stays down...
    let down_since = Instant::now();
    while down_since.elapsed() < Duration::from_millis(1500) {
        let code = node1.readiness_code(&bed).await;
        assert_ne!(code, Some(200), "ready without a first sync");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        node1.readiness_code(&bed).await.is_some(),
        "readiness does not answer while the control plane is down"
    );
    // ...and a destination it knows nothing about yet is refused, never passed through.
    if let Ok(mut stream) = socks5(&bed, Place::Node(1), echo_addr).await {
        assert!(
            exchange(&mut stream, 1, 64).await.is_err(),
            "served before the first sync"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        echo.accepted(),
        0,
        "a connection reached the app before the first sync"
    );

    // The control plane comes up: both nodes sync, get certificates and become ready.
    cp.restart(&bed).await;
    let came_up = Instant::now();
    node1.wait_ready(&bed).await;
    node2.wait_ready(&bed).await;
    eprintln!(
        "ready {:?} after the control plane came up",
        came_up.elapsed()
    );
    let mut long = socks5(&bed, Place::Node(1), echo_addr)
        .await
        .expect("mesh connection after the sync");
    exchange(&mut long, 2, 64 << 10)
        .await
        .expect("bytes over HBONE");
    let baseline = usage(&node1);

    // Restarting: killed, the nodes keep everything they hold.
    let stream_lines = node1.log_lines(&["xDS stream"]).len();
    cp.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while node1.log_lines(&["xDS stream"]).len() == stream_lines {
        assert!(
            Instant::now() < deadline,
            "node1 never saw its xDS stream end"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    exchange(&mut long, 2, 64 << 10)
        .await
        .expect("the open connection stopped when the control plane went away");
    for seed in 3..6 {
        let mut fresh = socks5(&bed, Place::Node(1), echo_addr)
            .await
            .expect("a new connection from cached state");
        exchange(&mut fresh, seed, 16 << 10)
            .await
            .expect("bytes from cached state");
    }
    assert_eq!(
        node1.readiness_code(&bed).await,
        Some(200),
        "readiness dropped while serving from cache"
    );

    // Back: the node reconnects (a second "xDS stream open") and still serves.
    cp.restart(&bed).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while node1.log_lines(&["xDS stream open"]).len() < 2 {
        assert!(Instant::now() < deadline, "node1 never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    exchange(&mut long, 7, 64 << 10)
        .await
        .expect("after the restart");
    drop(long);
    let mut after = socks5(&bed, Place::Node(1), echo_addr)
        .await
        .expect("after the restart");
    exchange(&mut after, 8, 16 << 10)
        .await
        .expect("after the restart");
    drop(after);
    let settled = faults::fds_settle(&node1, baseline.fds, 2, Duration::from_secs(5)).await;
    assert!(
        settled <= baseline.fds + 2,
        "node1's open files {settled}, {} before the outage",
        baseline.fds
    );
    assert_eq!(echo.accepted(), 1 + 3 + 1);
    // They went over HBONE, node 2 naming the client's verified identity.
    node2
        .wait_log(&["connection complete", "\"inbound\"", "sa/client"])
        .await;
    drop(cp);
}
