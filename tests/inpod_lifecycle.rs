//! The life of a standalone in-pod proxy: a pod removed from the mesh file loses its listeners,
//! nftables table and routing rule (and is then reached as plain TCP, like any address outside
//! the mesh), and its pooled HBONE tunnels close; a killed ztund that starts again adopts its
//! pods again (its listeners use SO_REUSEPORT, so nothing is "in use") and traffic flows both
//! ways once more. While no ztund runs, the pod's capture stays and fails closed: nothing
//! reaches the app in plaintext. Every case runs against both capture backends
//! (`<case>::nftables`, `<case>::ebpf`); under eBPF the restarted ztund adopts the pinned links
//! (never a second attachment) and collects the pins of a pod that went away meanwhile.

mod support;
mod testbed;

use std::net::SocketAddr;
use std::time::Duration;

use support::pods::{Backend, INPOD_PORTS, MeshPod, PodWorld, on_both_backends};
use testbed::{Place, Testbed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ECHO_PORT: u16 = 9000;

fn pods() -> Vec<MeshPod> {
    vec![
        MeshPod::captured(1, 1, "client"),
        MeshPod::captured(2, 1, "server"),
    ]
}

/// One short echo exchange from pod (n, p) to `target`.
async fn exchange(bed: &Testbed, n: usize, p: usize, target: SocketAddr) -> Result<(), String> {
    let attempt = async {
        let mut stream = bed.connect_from(n, p, target).await?;
        stream.write_all(b"ping").await?;
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(back)) if &back == b"ping" => Ok(()),
        Ok(Ok(back)) => Err(format!("echo returned {back:?}")),
        Ok(Err(e)) => Err(format!("from pod ({n},{p}) to {target}: {e}")),
        Err(_) => Err(format!(
            "from pod ({n},{p}) to {target}: no echo within 10 s"
        )),
    }
}

on_both_backends!(
    a_pod_removed_from_the_mesh_file_loses_listeners_rules_and_routing,
    a_restarted_ztund_adopts_its_pods_again,
    a_removed_pods_pooled_tunnels_close_with_it,
);

async fn a_pod_removed_from_the_mesh_file_loses_listeners_rules_and_routing(backend: Backend) {
    let w = PodWorld::standalone_on(backend, 2, 1, &pods()).await;
    let bed = &w.bed;
    let server = bed.echo_server(2, 1, ECHO_PORT);
    w.wait_captured(2, 1, true).await;
    exchange(bed, 1, 1, server).await.expect("through HBONE");
    w.daemon(2)
        .wait_log(&[
            "connection complete",
            "\"inbound\"",
            &format!("\"{server}\""),
        ])
        .await;

    w.write_mesh(&[MeshPod::captured(1, 1, "client")]);
    w.wait_mesh_applied(1).await;
    w.wait_captured(2, 1, false).await;
    let rules = bed.run_in(Place::Pod(2, 1), &["ip", "rule", "show"]);
    assert!(
        !rules.contains("lookup 100"),
        "the reply routing rule is still there:\n{rules}"
    );
    w.daemon(2).wait_log(&["pod proxy stopped"]).await;

    // No longer a mesh workload: node 1 passes the connection through in plain TCP.
    exchange(bed, 1, 1, server).await.expect("plain TCP");
    let line = w
        .daemon(1)
        .wait_log(&[
            "connection complete",
            "\"passthrough\"",
            &format!("\"{server}\""),
        ])
        .await;
    assert!(line.contains("\"outbound\""), "{line}");
    // The untouched pod keeps its capture.
    w.wait_captured(1, 1, true).await;
}

async fn a_restarted_ztund_adopts_its_pods_again(backend: Backend) {
    let mut w = PodWorld::standalone_on(backend, 2, 1, &pods()).await;
    let server = w.bed.echo_server(2, 1, ECHO_PORT);
    let client = w.bed.echo_server(1, 1, ECHO_PORT);
    exchange(&w.bed, 1, 1, server)
        .await
        .expect("before the restart");

    // ztund's in-pod listeners let a second SO_REUSEPORT listener join their port (as a
    // restarted or upgraded ztund's would), and only such a listener.
    let pod = w.bed.netns(Place::Pod(2, 1));
    let sockets = ztund::net::SocketFactory::in_netns(pod.clone());
    for port in INPOD_PORTS {
        let addr = SocketAddr::new(ztund::net::unspecified(true), port);
        let joined = sockets.listener(addr, true);
        assert!(
            joined.is_ok(),
            "port {port}: ztund's listener does not use SO_REUSEPORT: {:?}",
            joined.err()
        );
        let exclusive = pod
            .enter(|| std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))))
            .expect("entering the pod");
        assert!(
            exclusive.is_err(),
            "port {port}: a plain listener could bind it too, so the check above proves nothing"
        );
    }

    let killed = w.kill(2).expect("node2's ztund was running");
    // Its capture outlives it (rules, or pinned programs): the pod's traffic has nowhere to go
    // until ztund is back. Fail closed: plaintext from outside never reaches the app.
    let tables = w.nft_tables(Place::Pod(2, 1));
    assert!(
        w.capture_installed(2, 1, &tables),
        "the capture went away with the process:\n{tables}"
    );
    let plain = async {
        let mut stream = w
            .bed
            .app_sockets(Place::Node(1))
            .connect(server, None)
            .await?;
        stream.write_all(b"ping").await?;
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await
    };
    let outcome = tokio::time::timeout(Duration::from_secs(2), plain).await;
    assert!(
        !matches!(outcome, Ok(Ok(_))),
        "plaintext reached the app while no ztund ran"
    );
    w.start(2).await;
    w.wait_captured(2, 1, true).await;
    if backend == Backend::Ebpf {
        w.daemon(2)
            .wait_log(&["pod enrolled in eBPF capture", "\"adopted\":true"])
            .await;
    }
    let log = w.daemon(2).log_text().to_lowercase();
    assert!(
        !log.contains("in use"),
        "restart hit a busy address:\n{log}\n(first run:\n{})",
        killed.log_text()
    );
    w.daemon(2)
        .wait_log(&["pod proxy started", "pod-n2p1"])
        .await;

    // Node 1's pooled tunnel to the killed process is dead; a new one is dialled.
    exchange(&w.bed, 1, 1, server)
        .await
        .expect("into the re-adopted pod");
    exchange(&w.bed, 2, 1, client)
        .await
        .expect("out of the re-adopted pod");
    w.daemon(2)
        .wait_log(&[
            "connection complete",
            "\"outbound\"",
            &format!("\"{client}\""),
            "\"hbone\"",
        ])
        .await;
}

/// The HBONE connections a pod has dialled (port 15008), as `ss` sees them inside it.
fn tunnels_from(bed: &Testbed, n: usize, p: usize) -> String {
    bed.run_in(
        Place::Pod(n, p),
        &["ss", "-Htn", "state", "established", "( dport = :15008 )"],
    )
}

async fn a_removed_pods_pooled_tunnels_close_with_it(backend: Backend) {
    let w = PodWorld::standalone_on(backend, 2, 1, &pods()).await;
    let bed = &w.bed;
    let server = bed.echo_server(2, 1, ECHO_PORT);
    w.wait_captured(1, 1, true).await;
    exchange(bed, 1, 1, server).await.expect("through HBONE");
    // The exchange is over; its tunnel stays pooled (the idle timeout is minutes away).
    assert!(
        !tunnels_from(bed, 1, 1).trim().is_empty(),
        "no pooled tunnel from the client pod after the exchange"
    );

    w.write_mesh(&[MeshPod::captured(2, 1, "server")]);
    w.wait_mesh_applied(1).await;
    w.daemon(1)
        .wait_log(&["pod proxy stopped", "\"tunnels_released\":1"])
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let open = tunnels_from(bed, 1, 1);
        if open.trim().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the removed pod's tunnel is still open:\n{open}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_pins_of_a_pod_gone_while_no_ztund_ran_are_collected_at_start() {
    let mut w = PodWorld::standalone_on(Backend::Ebpf, 2, 1, &pods()).await;
    w.wait_captured(2, 1, true).await;
    w.kill(2).expect("node2's ztund was running");
    w.write_mesh(&[MeshPod::captured(1, 1, "client")]);
    w.wait_mesh_applied(1).await;
    // The pins were all that held the links: the programs leave the pod with them.
    w.start(2).await;
    w.daemon(2)
        .wait_log(&["collecting the eBPF pins of a pod that is gone", "pod-n2p1"])
        .await;
    w.wait_captured(2, 1, false).await;
    let pods = std::fs::read_dir(w.bpf_dir(2).unwrap().join("pods")).unwrap();
    assert_eq!(pods.count(), 0, "pins left behind");
    w.wait_captured(1, 1, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_unavailable_stops_ztund_at_start_with_the_reason() {
    // bpfDir on a plain directory, not a bpffs: refused, never a start without capture.
    let w = PodWorld::new(1, 1, &pods(), |_| {
        "capture: standalone\ncaptureBackend: ebpf\nbpfDir: not-a-bpffs\n".to_string()
    });
    let config = w.cluster.path("node1.yaml");
    let config = config.to_str().unwrap();
    // In the node's namespace (its own ports); `timeout` ends a ztund that started after all.
    let args = [
        "timeout",
        "20",
        support::ztund_bin(),
        "run",
        "--config",
        config,
    ];
    let said = w
        .bed
        .try_run_in(Place::Node(1), &args)
        .expect_err("ztund must refuse to start");
    assert!(
        said.contains("not on a bpffs") && said.contains("mount -t bpf"),
        "the reason is not named: {said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_a_pod_whose_cgroup_cannot_be_found_is_not_served_and_named() {
    let mut w = PodWorld::on(Backend::Ebpf, 2, 1, &pods(), |_| {
        "capture: standalone\n".to_string()
    });
    // No process in the pod's netns: nothing tells which cgroup is the pod's.
    w.bed.remove_sandbox(2, 1);
    w.spawn(2);
    let line = w
        .daemon(2)
        .wait_log(&["pod capture failed", "pod-n2p1", "no cgroup found"])
        .await;
    let netns = w.bed.netns_name(Place::Pod(2, 1));
    assert!(
        line.contains(&netns),
        "the error does not name the netns: {line}"
    );
    assert!(
        w.inpod_listeners(2, 1).is_empty(),
        "a pod ztund cannot capture must not be served"
    );
}
