//! The life of a standalone in-pod proxy: a pod removed from the mesh file loses its listeners,
//! nftables table and routing rule (and is then reached as plain TCP, like any address outside
//! the mesh), and its pooled HBONE tunnels close; a killed ztund that starts again adopts its
//! pods again (its listeners use SO_REUSEPORT, so nothing is "in use") and traffic flows both
//! ways once more.

mod support;
mod testbed;

use std::net::SocketAddr;
use std::time::Duration;

use support::pods::{INPOD_PORTS, MeshPod, PodWorld};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_removed_from_the_mesh_file_loses_listeners_rules_and_routing() {
    let w = PodWorld::standalone(2, 1, &pods()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_ztund_adopts_its_pods_again() {
    let mut w = PodWorld::standalone(2, 1, &pods()).await;
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
    // Its rules outlive it: the pod's traffic has nowhere to go until ztund is back.
    assert!(
        w.nft_tables(Place::Pod(2, 1)).contains("table inet ztund"),
        "the rules went away with the process"
    );
    w.start(2).await;
    w.wait_captured(2, 1, true).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_pods_pooled_tunnels_close_with_it() {
    let w = PodWorld::standalone(2, 1, &pods()).await;
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
