//! IPv6 and dual-stack in-pod capture, end to end on the testbed (every node and pod has an
//! IPv6 address besides its IPv4 one): a v6 pod reaches a v6 pod through HBONE (only TLS on
//! 15008 crosses the bridge) and the server's access log names the client's identity; a
//! dual-stack Service is reachable on each of its VIPs; an AuthorizationPolicy with a v6 CIDR
//! lets one source through and keeps another from the app; a pod whose namespace has IPv6
//! disabled gets IPv4 listeners and rules and works as before. Every case runs against both
//! capture backends (`<case>::nftables`, `::ebpf`); the policy case's app counts what reaches
//! it in counters of its own world, so the two variants running in parallel cannot disturb
//! each other's counts.

mod support;
mod testbed;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use support::pods::{
    Backend, MESH_FILE, MeshPod, PodWorld, mesh_yaml, on_both_backends, spiffe_id,
};
use support::sniffer::Sniffer;
use testbed::{Place, Testbed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ECHO_PORT: u16 = 9000;
const WHOAMI_PORT: u16 = 9001;
const MIB: usize = 1 << 20;

fn echo(mut stream: TcpStream, _peer: SocketAddr) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let (mut reader, mut writer) = stream.split();
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
    })
}

fn whoami(mut stream: TcpStream, peer: SocketAddr) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let _ = stream.write_all(format!("{peer}\n").as_bytes()).await;
        let _ = stream.shutdown().await;
    })
}

/// What reached the policy test's app: connections accepted and bytes read.
#[derive(Default)]
struct Reached {
    accepted: AtomicUsize,
    bytes: AtomicUsize,
}

impl Reached {
    fn now(&self) -> (usize, usize) {
        (
            self.accepted.load(Ordering::SeqCst),
            self.bytes.load(Ordering::SeqCst),
        )
    }
}

/// An echo app on `addr` in `place` that counts what reaches it. Not [`Testbed::serve`]: its
/// handler is a plain `fn`, so the counts would have to be statics, shared by every world of
/// the test binary (both backends' variants run in parallel).
fn guarded_echo(bed: &Testbed, place: Place, addr: SocketAddr) -> Arc<Reached> {
    let reached = Arc::new(Reached::default());
    let listener = bed
        .app_sockets(place)
        .listener(addr, false)
        .unwrap_or_else(|e| panic!("the guarded app's listener on {addr}: {e}"));
    let counts = reached.clone();
    bed.keep_task(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counts.accepted.fetch_add(1, Ordering::SeqCst);
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            counts.bytes.fetch_add(n, Ordering::SeqCst);
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    }));
    reached
}

/// Starts the world on `backend` with `extra` documents (Services, policies) after the pods,
/// with `prepare` run on the testbed before any daemon starts.
async fn world_with(
    backend: Backend,
    nodes: usize,
    pods_per_node: usize,
    pods: &[MeshPod],
    extra: &str,
    prepare: impl FnOnce(&Testbed),
) -> PodWorld {
    let mut w = PodWorld::on(backend, nodes, pods_per_node, pods, |_| {
        "capture: standalone\n".to_string()
    });
    prepare(&w.bed);
    let mut text = mesh_yaml(&w.bed, pods);
    if !extra.is_empty() {
        text = format!("{text}---\n{extra}");
    }
    w.cluster.write(MESH_FILE, &text);
    for n in 1..=nodes {
        w.start(n).await;
    }
    for pod in pods.iter().filter(|p| p.netns_annotation) {
        w.wait_captured(pod.node, pod.pod, true).await;
    }
    w
}

/// Sends `text` on a fresh connection from pod (n, p) and returns what came back (bounded).
async fn exchange(bed: &Testbed, n: usize, p: usize, target: SocketAddr, text: &[u8]) -> Vec<u8> {
    let attempt = async {
        let mut stream = bed.connect_from(n, p, target).await?;
        stream.write_all(text).await?;
        stream.shutdown().await?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(back)) => back,
        Ok(Err(_)) | Err(_) => Vec::new(),
    }
}

/// What the whoami app at `target` saw as the client's address, connecting from pod (n, p).
async fn seen_by(bed: &Testbed, n: usize, p: usize, target: SocketAddr) -> SocketAddr {
    let answer = exchange(bed, n, p, target, b"").await;
    let answer = String::from_utf8_lossy(&answer);
    answer
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("whoami at {target} answered {answer:?}: {e}"))
}

on_both_backends!(
    v6_pod_to_v6_pod_is_hbone_and_the_server_logs_the_client_identity,
    a_dual_stack_service_is_reachable_on_each_vip,
    a_v6_cidr_allows_one_source_and_keeps_another_from_the_app,
    a_pod_with_ipv6_disabled_works_ipv4_only,
);

async fn v6_pod_to_v6_pod_is_hbone_and_the_server_logs_the_client_identity(backend: Backend) {
    let pods = [
        MeshPod::captured(1, 1, "client").dual_stack(),
        MeshPod::captured(2, 1, "server").dual_stack(),
    ];
    let w = world_with(backend, 2, 1, &pods, "", |_| {}).await;
    let bed = &w.bed;
    let (client6, server6) = (bed.pod_ip6(1, 1), bed.pod_ip6(2, 1));
    let echo_addr = bed.serve(Place::Pod(2, 1), SocketAddr::new(server6, ECHO_PORT), echo);
    let whoami_addr = bed.serve(
        Place::Pod(2, 1),
        SocketAddr::new(server6, WHOAMI_PORT),
        whoami,
    );
    let secret = format!("ztund-v6-secret-{}", bed.prefix()).into_bytes();
    let sniffer = Sniffer::start(&bed.netns(Place::Switch), vec![secret.clone()]);

    // The app keeps seeing the client pod's own IPv6 address (IPV6_TRANSPARENT upstream).
    assert_eq!(
        seen_by(bed, 1, 1, whoami_addr).await.ip(),
        w.app_sees(client6, server6)
    );
    assert_eq!(exchange(bed, 1, 1, echo_addr, &secret).await, secret);
    let stream = bed.connect_from(1, 1, echo_addr).await.expect("connect");
    Testbed::assert_echo(stream, 16 * MIB).await;
    let capture = sniffer.stop();

    assert_eq!(
        capture.marker_hits[0], 0,
        "the app's bytes crossed the wire in the clear"
    );
    let flows = capture.flows_between(client6, server6);
    assert!(
        !flows.is_empty(),
        "no v6 pod-to-pod TCP seen on the bridge ({} frames)",
        capture.frames
    );
    let outside: Vec<_> = flows.iter().filter(|f| !f.uses_port(15008)).collect();
    assert!(
        outside.is_empty(),
        "v6 pod-to-pod TCP outside HBONE: {outside:?}"
    );

    let client = spiffe_id("client");
    let line = w
        .daemon(2)
        .wait_log(&[
            "connection complete",
            "\"inbound\"",
            &format!("\"{echo_addr}\""),
        ])
        .await;
    assert!(
        line.contains(&client) && line.contains(&client6.to_string()),
        "node2's access log does not name {client} at {client6}: {line}"
    );
    let line = w
        .daemon(1)
        .wait_log(&[
            "connection complete",
            "\"outbound\"",
            &format!("\"{echo_addr}\""),
        ])
        .await;
    assert!(line.contains(&spiffe_id("server")), "{line}");
}

const DUAL_STACK_SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: pod-n2p1}
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.60
  clusterIPs: [10.96.0.60, \"fd00:96::60\"]
  ports: [{name: tcp, port: 80, targetPort: 9000}]
";

async fn a_dual_stack_service_is_reachable_on_each_vip(backend: Backend) {
    let pods = [
        MeshPod::captured(1, 1, "client").dual_stack(),
        MeshPod::captured(2, 1, "server").dual_stack(),
    ];
    let w = world_with(backend, 2, 1, &pods, DUAL_STACK_SERVICE, |_| {}).await;
    let bed = &w.bed;
    // The app listens on both of its addresses.
    bed.serve(
        Place::Pod(2, 1),
        SocketAddr::new(bed.pod_ip(2, 1), ECHO_PORT),
        echo,
    );
    bed.serve(
        Place::Pod(2, 1),
        SocketAddr::new(bed.pod_ip6(2, 1), ECHO_PORT),
        echo,
    );
    for (vip, endpoint) in [
        (
            "10.96.0.60:80",
            SocketAddr::new(bed.pod_ip(2, 1), ECHO_PORT),
        ),
        (
            "[fd00:96::60]:80",
            SocketAddr::new(bed.pod_ip6(2, 1), ECHO_PORT),
        ),
    ] {
        let vip: SocketAddr = vip.parse().unwrap();
        let text = format!("through {vip}").into_bytes();
        assert_eq!(
            exchange(bed, 1, 1, vip, &text).await,
            text,
            "{vip} was not served"
        );
        // Each VIP leads to the endpoint address of its own family.
        let line = w
            .daemon(2)
            .wait_log(&[
                "connection complete",
                "\"inbound\"",
                &format!("\"{endpoint}\""),
            ])
            .await;
        assert!(line.contains(&spiffe_id("client")), "{line}");
    }
}

async fn a_v6_cidr_allows_one_source_and_keeps_another_from_the_app(backend: Backend) {
    let pods = [
        MeshPod::captured(1, 1, "allowed").dual_stack(),
        MeshPod::captured(1, 2, "other").dual_stack(),
        MeshPod::captured(2, 1, "server").dual_stack(),
    ];
    // Test-local prefix the testbed gives pod (1, 1): fd00:201:1::2.
    let policy = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-v6-client, namespace: default}
spec:
  selector: {matchLabels: {app: pod-n2p1}}
  action: ALLOW
  rules: [{from: [{source: {ipBlocks: [\"fd00:201:1::2/128\"]}}]}]
";
    let w = world_with(backend, 2, 2, &pods, policy, |_| {}).await;
    let bed = &w.bed;
    assert_eq!(bed.pod_ip6(1, 1).to_string(), "fd00:201:1::2");
    let target = SocketAddr::new(bed.pod_ip6(2, 1), ECHO_PORT);
    let reached = guarded_echo(bed, Place::Pod(2, 1), target);

    let text = b"from the allowed address".to_vec();
    assert_eq!(exchange(bed, 1, 1, target, &text).await, text);
    let served = reached.now();
    assert_eq!(served, (1, text.len()));

    let denied = exchange(bed, 1, 2, target, b"from another address").await;
    assert!(denied.is_empty(), "the other source was served: {denied:?}");
    let line = w
        .daemon(2)
        .wait_log(&["connection refused", "default/only-v6-client"])
        .await;
    assert!(
        line.contains(&bed.pod_ip6(1, 2).to_string()) && line.contains(&spiffe_id("other")),
        "{line}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        reached.now(),
        served,
        "a denied client's connection or bytes reached the app"
    );
}

async fn a_pod_with_ipv6_disabled_works_ipv4_only(backend: Backend) {
    let pods = [
        MeshPod::captured(1, 1, "client"),
        MeshPod::captured(2, 1, "server").dual_stack(),
    ];
    let w = world_with(backend, 2, 1, &pods, "", |bed| {
        bed.disable_ipv6(1, 1)
            .unwrap_or_else(|e| panic!("disabling IPv6 in pod (1,1): {e}"));
    })
    .await;
    let bed = &w.bed;
    let pod = Place::Pod(1, 1);
    // IPv4 listeners only, the IPv4 reply rule only, and no error about the pod.
    let listening = bed.run_in(pod, &["ss", "-Htln"]);
    for port in [15001, 15006, 15008] {
        assert!(
            listening.contains(&format!("0.0.0.0:{port}")),
            "no IPv4 listener on {port}:\n{listening}"
        );
    }
    assert!(!listening.contains("[::]"), "{listening}");
    // The reply routing is the nftables backend's (eBPF delivers from the pod's address).
    assert_eq!(
        bed.run_in(pod, &["ip", "-4", "rule", "show", "pref", "32764"])
            .contains("lookup 100"),
        backend == Backend::Nftables
    );
    assert!(
        bed.run_in(pod, &["ip", "-6", "rule", "show", "pref", "32764"])
            .trim()
            .is_empty()
    );
    let problems = w.daemon(1).log_lines(&["\"level\":\"WARN\""]);
    let problems: Vec<_> = problems
        .iter()
        .chain(w.daemon(1).log_lines(&["\"level\":\"ERROR\""]).iter())
        .cloned()
        .collect();
    assert!(problems.is_empty(), "node1 complained: {problems:?}");

    let server = SocketAddr::new(bed.pod_ip(2, 1), ECHO_PORT);
    let whoami_addr = bed.whoami_server(2, 1, WHOAMI_PORT);
    bed.serve(Place::Pod(2, 1), server, echo);
    let text = b"v4 only".to_vec();
    assert_eq!(exchange(bed, 1, 1, server, &text).await, text);
    assert_eq!(
        seen_by(bed, 1, 1, whoami_addr).await.ip(),
        w.app_sees(bed.pod_ip(1, 1), bed.pod_ip(2, 1))
    );
    let line = w
        .daemon(2)
        .wait_log(&[
            "connection complete",
            "\"inbound\"",
            &format!("\"{server}\""),
        ])
        .await;
    assert!(line.contains(&spiffe_id("client")), "{line}");
    // The dual-stack server still takes plaintext v4 into its own capture, not through v6.
    assert!(matches!(bed.pod_ip(1, 1), IpAddr::V4(_)));
}
