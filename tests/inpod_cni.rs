//! istio-cni capture mode, end to end: the test plays istio-cni's node agent (a ZDS server
//! handing over the pod's namespace fd, and the pod's redirection rules installed as istio-cni
//! would), node 1's ztund adopts the pod from the snapshot and carries its traffic as HBONE both
//! ways (node 2 runs standalone capture); readiness waits for the snapshot and is lost with the
//! ZDS connection; a ZDS Del takes the pod's listeners away. Runs against both capture
//! backends: with nftables the test installs the pod's rules as istio-cni would; with eBPF
//! ztund itself captures the pod it was handed (its cgroup found from the netns) and releases
//! it on Del.

mod support;
mod testbed;

use std::net::SocketAddr;
use std::time::Duration;

use support::eventually;
use support::pods::{Backend, MeshPod, PodWorld, on_both_backends, spiffe_id};
use testbed::{Place, Testbed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztund::capture::PodInfo;
use ztund::capture::cni::{CniServer, SnapshotPod};
use ztund::capture::nft::{self, RedirectPorts};
use ztund::net::Netns;

const ECHO_PORT: u16 = 9000;
const WHOAMI_PORT: u16 = 9001;
/// A Kubernetes pod UID: ZDS names pods by it, the mesh file by namespace/name.
const CLIENT_UID: &str = "6f1c0b8e-3d2a-4c55-9a7e-0d9a2c1b7e44";

async fn exchange(bed: &Testbed, n: usize, p: usize, target: SocketAddr) {
    let attempt = async {
        let mut stream = bed.connect_from(n, p, target).await?;
        stream.write_all(b"ping").await?;
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    let back = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| panic!("pod ({n},{p}) → {target}: no echo within 10 s"))
        .unwrap_or_else(|e| panic!("pod ({n},{p}) → {target}: {e}"));
    assert_eq!(&back, b"ping");
}

on_both_backends!(a_pod_handed_over_by_istio_cni_is_carried_over_hbone_until_deleted);

async fn a_pod_handed_over_by_istio_cni_is_carried_over_hbone_until_deleted(backend: Backend) {
    // The client pod is in the mesh file without a netns: only ZDS hands its namespace over.
    let pods = [
        MeshPod::uncaptured(1, 1, "client"),
        MeshPod::captured(2, 1, "server"),
    ];
    let agent_dir = tempfile::tempdir().expect("a directory for the ZDS socket");
    let zds_socket = agent_dir.path().join("ztunnel.sock");
    let mut w = PodWorld::on(backend, 2, 1, &pods, |n| match n {
        1 => format!("capture: istio-cni\nzdsSocket: {}\n", zds_socket.display()),
        _ => "capture: standalone\n".to_string(),
    });
    let cni = CniServer::bind(&zds_socket).expect("binding the ZDS socket");
    w.start(2).await;
    let server = w.bed.echo_server(2, 1, ECHO_PORT);
    let server_whoami = w.bed.whoami_server(2, 1, WHOAMI_PORT);
    let client = w.bed.echo_server(1, 1, ECHO_PORT);

    // ztund connects, says hello and receives the snapshot; it is ready only after it.
    let pod_ns = Netns::open(&w.bed.netns_name(Place::Pod(1, 1))).expect("opening the pod netns");
    let info = PodInfo {
        uid: CLIENT_UID.into(),
        name: "pod-n1p1".into(),
        namespace: "default".into(),
        service_account: "client".into(),
    };
    w.spawn(1);
    let connection = tokio::time::timeout(Duration::from_secs(20), cni.accept())
        .await
        .expect("ztund connects to the ZDS socket in time")
        .expect("ztund says hello");
    let code = loop {
        if let Some(code) = w.daemon(1).readiness_code(&w.bed).await {
            break code;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, 500, "ready before istio-cni's snapshot arrived");
    connection
        .send_snapshot(&[SnapshotPod::Add(&info, &pod_ns)])
        .await
        .expect("the snapshot is acknowledged");
    w.daemon(1).wait_ready(&w.bed).await;
    // istio-cni redirects the pod's traffic once ztund acknowledged the pod (nftables); with
    // eBPF ztund enrolled it before acknowledging.
    if backend == Backend::Nftables {
        let ports = RedirectPorts::default();
        nft::install_pod_redirection(&pod_ns, &ports).expect("installing the pod's redirection");
    }
    w.wait_captured(1, 1, true).await;

    // Out of the pod: HBONE, the server sees the client pod's address and identity.
    exchange(&w.bed, 1, 1, server).await;
    let line = w
        .daemon(2)
        .wait_log(&[
            "connection complete",
            "\"inbound\"",
            &format!("\"{server}\""),
        ])
        .await;
    assert!(line.contains(&spiffe_id("client")), "{line}");
    let mut stream = w
        .bed
        .connect_from(1, 1, server_whoami)
        .await
        .expect("connect");
    let mut seen = String::new();
    stream.read_to_string(&mut seen).await.expect("whoami");
    let expected = w.app_sees(w.bed.pod_ip(1, 1), w.bed.pod_ip(2, 1));
    assert!(
        seen.starts_with(&format!("{expected}:")),
        "the server app saw {seen:?}, not {expected}"
    );
    // Into the pod: node 1's ztund terminates HBONE inside it and names the caller.
    exchange(&w.bed, 2, 1, client).await;
    let line = w
        .daemon(1)
        .wait_log(&[
            "connection complete",
            "\"inbound\"",
            &format!("\"{client}\""),
        ])
        .await;
    assert!(line.contains(&spiffe_id("server")), "{line}");

    // The pod goes away: its listeners go with it; its rules are istio-cni's to remove.
    connection
        .del(CLIENT_UID)
        .await
        .expect("Del is acknowledged");
    eventually(
        "the pod's listeners are closed",
        Duration::from_secs(10),
        || match w.inpod_listeners(1, 1) {
            ports if ports.is_empty() => Ok(()),
            ports => Err(format!("still listening on {ports:?}")),
        },
    )
    .await;
    w.daemon(1)
        .wait_log(&["pod proxy stopped", CLIENT_UID])
        .await;
    if backend == Backend::Nftables {
        nft::remove_redirection(&pod_ns).expect("removing the pod's redirection");
    }
    w.wait_captured(1, 1, false).await;

    // Without its CNI agent, ztund is not ready.
    drop(connection);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while w.daemon(1).readiness_code(&w.bed).await != Some(500) {
        assert!(
            std::time::Instant::now() < deadline,
            "still ready after the ZDS connection closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
