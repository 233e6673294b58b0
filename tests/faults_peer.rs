//! HARDENING F3: a peer node blackholed mid-stream, and a pod whose network namespace is gone
//! while its connections are open. The keepalive notices the silent peer, tears the pooled
//! connection down (its streams end instead of hanging) and evicts it, and a new connection
//! works once the path is back; a removed pod's connections are cut at the drain deadline.

mod faults;
mod support;
mod testbed;

use std::time::{Duration, Instant};

use faults::{ECHO_PORT, World, closed_within, exchange, usage};
use support::pods::{MeshPod, PodWorld};
use testbed::Place;

/// Drops every packet to or from port 15008 inside `place` (an nftables table of the test's).
fn blackhole(w: &World, place: Place, on: bool) {
    let script = if on {
        "table inet fault_blackhole {\n\
         chain input_drop { type filter hook input priority -400; policy accept; tcp dport 15008 drop; tcp sport 15008 drop; }\n\
         chain output_drop { type filter hook output priority -400; policy accept; tcp dport 15008 drop; tcp sport 15008 drop; }\n\
         }\n"
    } else {
        "delete table inet fault_blackhole\n"
    };
    let file = w.cluster.write("blackhole.nft", script);
    w.bed
        .run_in(place, &["nft", "-f", file.to_str().expect("utf-8 path")]);
}

// HARDENING F3
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_peer_is_dropped_by_the_keepalive_and_a_new_connection_works_after() {
    let w = World::start("pool: {keepaliveInterval: 500ms, keepaliveTimeout: 1500ms}\n").await;
    let mut warm = w.connect(ECHO_PORT).await.expect("warm-up connection");
    exchange(&mut warm, 0, 1024).await.expect("warm-up");
    drop(warm);
    let baseline = usage(&w.node1);
    let tunnels_before = w.tunnels();
    let mut open = w.connect(ECHO_PORT).await.expect("mesh connection");
    exchange(&mut open, 1, 256 << 10)
        .await
        .expect("bytes before the fault");
    // One tunnel per data-plane thread at most.
    assert!((1..=2).contains(&w.tunnels()), "{} tunnels", w.tunnels());

    // The peer node vanishes from the network mid-stream: nothing is refused, all is lost.
    blackhole(&w, Place::Node(2), true);
    let cut = Instant::now();
    assert!(
        closed_within(&mut open, Duration::from_secs(5)).await,
        "the stream over the blackholed tunnel still hangs 5 s later"
    );
    let after = cut.elapsed();
    w.node1
        .wait_log(&["did not answer a PING", &w.bed.node_ip(2).to_string()])
        .await;
    assert_eq!(w.tunnels(), 0, "the dead connection is still established");
    eprintln!("blackholed tunnel torn down after {after:?}");

    // The path returns: a new connection dials a new tunnel and carries bytes exactly.
    blackhole(&w, Place::Node(2), false);
    let mut fresh = w.connect(ECHO_PORT).await.expect("a new connection");
    exchange(&mut fresh, 2, 256 << 10)
        .await
        .expect("bytes after the fault");
    // One tunnel per data-plane thread at most.
    assert!((1..=2).contains(&w.tunnels()), "{} tunnels", w.tunnels());
    drop(fresh);
    // Node 1 closed the dead tunnels' sockets (no leaked fd). The fresh tunnel may sit on
    // another data-plane thread than the warm-up's did, so count tunnels, not just files.
    let expected = baseline.fds - tunnels_before + w.tunnels();
    let fds = faults::fds_settle(&w.node1, expected, 0, Duration::from_secs(5)).await;
    assert!(
        fds <= expected,
        "node1 holds {fds} files, {} before with {tunnels_before} tunnels, {} tunnels now",
        baseline.fds,
        w.tunnels()
    );
}

// HARDENING F3
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_pods_open_connection_is_cut_at_the_drain_deadline() {
    let pods = [
        MeshPod::captured(1, 1, "client"),
        MeshPod::captured(2, 1, "server"),
    ];
    let mut w = PodWorld::new(2, 1, &pods, |_| {
        "capture: standalone\ndrainDeadline: 1s\n".to_string()
    });
    w.start(1).await;
    w.start(2).await;
    w.wait_captured(1, 1, true).await;
    let server = w.bed.echo_server(2, 1, ECHO_PORT);
    let before = w.daemon(1).open_fds();
    let mut held = w.bed.connect_from(1, 1, server).await.expect("connect");
    exchange(&mut held, 1, 64 << 10)
        .await
        .expect("through HBONE");

    // The pod goes away: out of the mesh, its interface and its namespace's name deleted
    // (ztund and this test still hold the namespace itself open).
    w.write_mesh(&[MeshPod::captured(2, 1, "server")]);
    let netns = w.bed.netns_name(Place::Pod(1, 1));
    w.bed.run_in(Place::Node(1), &["ip", "link", "del", "p1"]);
    w.bed
        .run_in(Place::Node(1), &["ip", "netns", "del", &netns]);
    w.wait_mesh_applied(1).await;
    let removed = Instant::now();
    w.daemon(1).wait_log(&["pod proxy stopped"]).await;

    // Idle but open, the connection is cut at the 1 s deadline: not at once, not never. (The
    // client's own socket lost its address with the interface, so ztund's log and open files
    // say it, not the client.)
    w.daemon(1)
        .wait_log(&[
            "connections cut: drain deadline passed",
            "\"connections\":1",
        ])
        .await;
    let cut_after = removed.elapsed();
    eprintln!("gone pod's connection cut {cut_after:?} after the removal was applied");
    assert!(
        (Duration::from_millis(700)..Duration::from_secs(4)).contains(&cut_after),
        "cut {cut_after:?} after the removal, the drain deadline is 1 s"
    );
    let fds = faults::fds_settle(w.daemon(1), before, 0, Duration::from_secs(5)).await;
    assert!(
        fds < before,
        "node1 holds {fds} files, {before} before the pod's connection (its listeners, netns and \
         connections should all be gone)"
    );
}
