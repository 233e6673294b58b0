//! Transparent in-pod capture, end to end: apps in pod namespaces use plain sockets; ztund
//! (standalone capture, real binary in each node namespace) carries pod→pod traffic as HBONE,
//! which the wire proves (only TLS on 15008 crosses the bridge, never the app's bytes), while the
//! server app still sees the client pod's address and the server's access log names the client's
//! SPIFFE id. Traffic to addresses outside the mesh, and to a mesh workload without a ztund in
//! front of it, goes as plain TCP (and plain TCP from outside into a captured pod is taken by its
//! plaintext listener); short connections reuse pooled tunnels. Every case runs against both
//! capture backends (`<case>::nftables`, `<case>::ebpf`).

mod support;
mod testbed;

use std::net::SocketAddr;
use std::time::Duration;

use futures::future::BoxFuture;
use support::pods::{Backend, MeshPod, PodWorld, on_both_backends, spiffe_id};
use support::sniffer::Sniffer;
use testbed::{Place, Testbed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ECHO_PORT: u16 = 9000;
const WHOAMI_PORT: u16 = 9001;
const MIB: usize = 1 << 20;

/// Node 1: the client and a neighbour; node 2: a server, and a legacy workload that the mesh
/// knows but that has no ztund in front of it (`istio.io/dataplane-mode: none`, no netns).
fn pods() -> Vec<MeshPod> {
    vec![
        MeshPod::captured(1, 1, "client"),
        MeshPod::captured(1, 2, "neighbour"),
        MeshPod::captured(2, 1, "server"),
        MeshPod::uncaptured(2, 2, "legacy").label("istio.io/dataplane-mode", "none"),
    ]
}

fn echo(mut stream: TcpStream, _peer: SocketAddr) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let (mut reader, mut writer) = stream.split();
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
    })
}

/// What the app at `target` saw as the client's address, connecting from pod (n, p).
async fn whoami(bed: &Testbed, n: usize, p: usize, target: SocketAddr) -> SocketAddr {
    let mut stream = bed
        .connect_from(n, p, target)
        .await
        .unwrap_or_else(|e| panic!("connecting from pod ({n},{p}) to {target}: {e}"));
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .expect("whoami answer in time")
        .expect("reading the whoami answer");
    answer
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("whoami answered {answer:?}: {e}"))
}

/// Sends `text` on a fresh connection from pod (n, p) to an echo app and checks it comes back.
async fn echo_text(bed: &Testbed, n: usize, p: usize, target: SocketAddr, text: &[u8]) {
    let mut stream = bed.connect_from(n, p, target).await.expect("connect");
    stream.write_all(text).await.expect("write");
    let mut back = vec![0u8; text.len()];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(back, text);
}

on_both_backends!(
    pod_to_pod_is_hbone_on_the_wire_and_the_app_sees_the_client_pod,
    outside_the_mesh_and_to_workloads_without_ztund_traffic_is_plain_tcp,
    two_hundred_short_connections_reuse_pooled_tunnels,
    short_connections_into_a_pod_do_not_exhaust_its_source_ports,
);

async fn pod_to_pod_is_hbone_on_the_wire_and_the_app_sees_the_client_pod(backend: Backend) {
    let w = PodWorld::standalone_on(backend, 2, 2, &pods()).await;
    let bed = &w.bed;
    let client_ip = bed.pod_ip(1, 1);
    let secret = format!("ztund-app-secret-{}", bed.prefix()).into_bytes();
    let control = format!("ztund-plain-control-{}", bed.prefix()).into_bytes();
    let mut targets = Vec::new();
    for (n, p) in [(2, 1), (1, 2)] {
        targets.push((
            bed.echo_server(n, p, ECHO_PORT),
            bed.whoami_server(n, p, WHOAMI_PORT),
        ));
    }
    // Uncaptured traffic between the nodes, to prove the sniffer does see payloads.
    let plain = bed.serve(
        Place::Node(2),
        SocketAddr::new(bed.node_ip(2), ECHO_PORT),
        echo,
    );
    let sniffer = Sniffer::start(
        &bed.netns(Place::Switch),
        vec![secret.clone(), control.clone()],
    );

    for (echo_addr, whoami_addr) in &targets {
        let seen = whoami(bed, 1, 1, *whoami_addr).await;
        assert_eq!(
            seen.ip(),
            w.app_sees(client_ip, whoami_addr.ip()),
            "the app at {whoami_addr} saw {seen}, not the client pod"
        );
        echo_text(bed, 1, 1, *echo_addr, &secret).await;
    }
    let cross = bed.connect_from(1, 1, targets[0].0).await.expect("connect");
    let same = bed.connect_from(1, 1, targets[1].0).await.expect("connect");
    tokio::join!(
        Testbed::assert_echo(cross, 64 * MIB),
        Testbed::assert_echo(same, 64 * MIB)
    );
    let mut direct = bed
        .app_sockets(Place::Node(1))
        .connect(plain, None)
        .await
        .expect("connect between nodes");
    direct.write_all(&control).await.expect("write");
    let mut back = vec![0u8; control.len()];
    direct.read_exact(&mut back).await.expect("echo");
    let capture = sniffer.stop();

    assert!(
        capture.marker_hits[1] > 0,
        "the sniffer missed plaintext it should have seen ({} frames)",
        capture.frames
    );
    assert_eq!(
        capture.marker_hits[0], 0,
        "the app's bytes crossed the wire in the clear"
    );
    let flows = capture.flows_between(client_ip, bed.pod_ip(2, 1));
    assert!(
        !flows.is_empty(),
        "no pod-to-pod TCP seen on the bridge ({} frames)",
        capture.frames
    );
    let plaintext: Vec<_> = flows.iter().filter(|f| !f.uses_port(15008)).collect();
    assert!(
        plaintext.is_empty(),
        "pod-to-pod TCP outside HBONE: {plaintext:?}"
    );

    // Both servers' ztund name the client's identity for connections that reached their app.
    let client = spiffe_id("client");
    for (node, target) in [(2, targets[0].0), (1, targets[1].0)] {
        let line = w
            .daemon(node)
            .wait_log(&[
                "connection complete",
                "\"inbound\"",
                &format!("\"{target}\""),
            ])
            .await;
        assert!(
            line.contains(&client),
            "node{node}'s access log does not name {client}: {line}"
        );
    }
}

async fn outside_the_mesh_and_to_workloads_without_ztund_traffic_is_plain_tcp(backend: Backend) {
    let w = PodWorld::standalone_on(backend, 2, 2, &pods()).await;
    let bed = &w.bed;
    let client_ip = bed.pod_ip(1, 1);

    // Not a workload: the node's own address.
    let outside = bed.serve(
        Place::Node(2),
        SocketAddr::new(bed.node_ip(2), ECHO_PORT),
        echo,
    );
    let stream = bed.connect_from(1, 1, outside).await.expect("connect");
    Testbed::assert_echo(stream, MIB).await;
    let line = w
        .daemon(1)
        .wait_log(&[
            "connection complete",
            "\"outbound\"",
            &format!("\"{outside}\""),
        ])
        .await;
    assert!(line.contains("\"passthrough\""), "{line}");

    // A mesh workload with no ztund in front of it: reached directly, from the client's address.
    assert!(
        w.inpod_listeners(2, 2).is_empty(),
        "the legacy pod must have no ztund listeners"
    );
    let legacy_echo = bed.echo_server(2, 2, ECHO_PORT);
    let legacy_whoami = bed.whoami_server(2, 2, WHOAMI_PORT);
    let stream = bed.connect_from(1, 1, legacy_echo).await.expect("connect");
    Testbed::assert_echo(stream, MIB).await;
    assert_eq!(whoami(bed, 1, 1, legacy_whoami).await.ip(), client_ip);
    let line = w
        .daemon(1)
        .wait_log(&[
            "connection complete",
            "\"outbound\"",
            &format!("\"{legacy_echo}\""),
        ])
        .await;
    assert!(line.contains("\"direct\""), "{line}");
    assert!(
        w.daemon(2)
            .log_lines(&["\"inbound\"", "connection"])
            .is_empty(),
        "node2's ztund saw traffic meant for a workload without ztund"
    );

    // The other way: plain TCP from outside the mesh into a captured pod lands on its 15006
    // listener (PERMISSIVE by default), and the app still sees the real client.
    let captured_whoami = bed.whoami_server(2, 1, WHOAMI_PORT);
    let mut stream = bed
        .app_sockets(Place::Node(1))
        .connect(captured_whoami, None)
        .await
        .expect("connect from node 1");
    let mut seen = String::new();
    stream.read_to_string(&mut seen).await.expect("whoami");
    let expected = w.app_sees(bed.node_ip(1), bed.pod_ip(2, 1));
    assert!(
        seen.starts_with(&format!("{expected}:")),
        "the app saw {seen:?}, not {expected}"
    );
    drop(stream);
    w.daemon(2)
        .wait_log(&[
            "connection complete",
            "\"inbound_plaintext\"",
            &format!("\"{captured_whoami}\""),
        ])
        .await;
}

async fn two_hundred_short_connections_reuse_pooled_tunnels(backend: Backend) {
    let w = PodWorld::standalone_on(backend, 2, 2, &pods()).await;
    let bed = &w.bed;
    let target = bed.echo_server(2, 1, ECHO_PORT);
    // Warm up: the first connection dials; certificates and the pool are ready after it.
    echo_text(bed, 1, 1, target, b"x").await;
    let fds_before = w.daemon(1).open_fds();

    for i in 0..200u32 {
        let byte = [(i % 256) as u8];
        let mut stream = bed.connect_from(1, 1, target).await.expect("connect");
        stream.write_all(&byte).await.expect("write");
        let mut back = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("connection {i}: no echo within 10 s"))
            .expect("echo");
        assert_eq!(back, byte);
    }

    let tunnels = w.established_to(Place::Pod(1, 1), 15008);
    assert!(
        (1..=2).contains(&tunnels.len()),
        "200 short connections left {} TCP connections to 15008:\n{}",
        tunnels.len(),
        tunnels.join("\n")
    );
    // Every closed connection gave its sockets back (slack for timers and log files).
    support::eventually(
        "node1's ztund gives its sockets back",
        Duration::from_secs(5),
        || {
            let now = w.daemon(1).open_fds();
            if now <= fds_before + 4 {
                Ok(())
            } else {
                Err(format!("{now} open fds, {fds_before} before"))
            }
        },
    )
    .await;
}

async fn short_connections_into_a_pod_do_not_exhaust_its_source_ports(backend: Backend) {
    // ztund's connection to the app keeps the client's address and closes first, leaving
    // TIME_WAIT in the server pod. With 16 ephemeral ports there, a port reserved per
    // connection runs out after 16; ports chosen per 4-tuple serve 4 app ports × 15.
    let w = PodWorld::standalone_on(backend, 2, 2, &pods()).await;
    let bed = &w.bed;
    bed.run_in(
        Place::Pod(2, 1),
        &["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40015"],
    );
    let targets: Vec<SocketAddr> = (0..4)
        .map(|i| bed.echo_server(2, 1, ECHO_PORT + i))
        .collect();
    for round in 0..15 {
        for target in &targets {
            let attempt = echo_text_checked(bed, *target, b"x").await;
            assert!(
                attempt.is_ok(),
                "round {round}, {target}: {:?}\n(time-wait in the server pod: {})",
                attempt.err(),
                bed.run_in(Place::Pod(2, 1), &["ss", "-Htan", "state", "time-wait"])
                    .lines()
                    .count()
            );
        }
    }
}

/// One short exchange from pod (1, 1), as a `Result` for tests that explain a failure.
async fn echo_text_checked(bed: &Testbed, target: SocketAddr, text: &[u8]) -> Result<(), String> {
    let attempt = async {
        let mut stream = bed.connect_from(1, 1, target).await?;
        stream.write_all(text).await?;
        let mut back = vec![0u8; text.len()];
        stream.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(back)) if back == text => Ok(()),
        Ok(Ok(back)) => Err(format!("echo returned {back:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no echo within 10 s".into()),
    }
}
