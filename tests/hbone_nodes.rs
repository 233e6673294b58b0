//! Two ztund nodes in network namespaces carry traffic over HBONE: bytes arrive intact, the
//! server side knows the client's SPIFFE id, the two nodes' access-log lines of one connection
//! join on the client's address and name each other's verified identity, streams share pooled
//! connections, and everything that is not a valid CONNECT from a trusted peer to a local
//! workload is refused before the app sees a byte.

mod support;
mod testbed;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::{Cluster, Daemon, proc_stat_field, socks5_connect};
use testbed::{Place, Testbed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztund::identity::{CertificateAuthority, SpiffeId};

const APP_PORT: u16 = 9000;

/// Node-mode mesh: one workload per node, living on the node's own address.
fn mesh(bed: &Testbed, echo_sa: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: client, namespace: default, annotations: {{ztund.io/node: node1}}}}
spec: {{address: "{n1}", serviceAccount: client, labels: {{app: client}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: echo, namespace: default, annotations: {{ztund.io/node: node2}}}}
spec: {{address: "{n2}", serviceAccount: {echo_sa}, labels: {{app: echo}}}}
"#,
        n1 = bed.node_ip(1),
        n2 = bed.node_ip(2),
    )
}

/// An echo app on node 2 that counts the connections it accepted and the bytes it received.
#[derive(Clone, Default)]
struct App {
    accepted: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
}

impl App {
    fn start(bed: &Testbed, place: Place, addr: SocketAddr) -> App {
        let app = App::default();
        let listener = bed
            .app_sockets(place)
            .listener(addr, false)
            .expect("app listener");
        let counters = app.clone();
        bed.keep_task(tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counters.accepted.fetch_add(1, Ordering::SeqCst);
                let bytes = counters.bytes.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                bytes.fetch_add(n, Ordering::SeqCst);
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = stream.shutdown().await;
                });
            }
        }));
        app
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

struct World {
    bed: Testbed,
    cluster: Cluster,
    app: App,
    app_addr: SocketAddr,
    node1: Daemon,
    node2: Daemon,
}

async fn world(node1_echo_sa: &str) -> World {
    let bed = Testbed::new(2, 0);
    let cluster = Cluster::new();
    cluster.write("mesh1.yaml", &mesh(&bed, node1_echo_sa));
    cluster.write("mesh2.yaml", &mesh(&bed, "echo"));
    let app_addr = SocketAddr::new(bed.node_ip(2), APP_PORT);
    let app = App::start(&bed, Place::Node(2), app_addr);
    let c1 = cluster.node_config("node1", "mesh1.yaml", "");
    // Node 2 runs its data plane with the opt-in batch scheduling: every test here also checks
    // that it carries the same traffic as node 1's default.
    let c2 = cluster.node_config(
        "node2",
        "mesh2.yaml",
        "dataPlane: {threads: 2, scheduling: batch}\n",
    );
    let node2 = cluster.start(&bed, 2, &c2).await;
    let node1 = cluster.start(&bed, 1, &c1).await;
    World {
        bed,
        cluster,
        app,
        app_addr,
        node1,
        node2,
    }
}

/// The scheduling policy (field 41 of `/proc/<pid>/task/<tid>/stat`) of each of a daemon's
/// data-plane threads.
fn shard_policies(daemon: &Daemon) -> Vec<u64> {
    let tasks = format!("/proc/{}/task", daemon.pid());
    let mut policies = Vec::new();
    for task in std::fs::read_dir(&tasks).expect("the daemon's threads") {
        let path = task.unwrap().path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with("ztund-shard") {
            continue;
        }
        let policy = proc_stat_field(&path.join("stat"), 41).expect("the thread's policy");
        policies.push(policy);
    }
    policies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_round_trip_and_the_server_names_the_client() {
    let w = world("echo").await;
    let stream = socks5_connect(&w.bed, Place::Node(1), w.app_addr)
        .await
        .expect("SOCKS5 CONNECT through ztund succeeds");
    let client = stream.local_addr().expect("the client's address");
    Testbed::assert_echo(stream, 16 << 20).await;
    assert_lines_join(&w, client).await;
    assert!(w.app.accepted() >= 1);
    const SCHED_OTHER: u64 = 0;
    const SCHED_BATCH: u64 = 3;
    assert_eq!(
        shard_policies(&w.node2),
        [SCHED_BATCH; 2],
        "dataPlane.scheduling: batch"
    );
    let node1 = shard_policies(&w.node1);
    assert!(
        !node1.is_empty() && node1.iter().all(|&p| p == SCHED_OTHER),
        "{node1:?}"
    );
}

/// The access-log field `key` of a JSON line, as text.
fn field(line: &serde_json::Value, key: &str) -> String {
    line[key].as_str().unwrap_or_default().to_string()
}

/// Node 1's `outbound` line and node 2's `inbound` line of the connection from `client` carry
/// the same `src.addr` (the client's own socket, not the pooled tunnel's), and each names the
/// identity the other side proved.
async fn assert_lines_join(w: &World, client: SocketAddr) {
    let src = format!("\"src.addr\":\"{client}\"");
    let parse = |line: String| -> serde_json::Value {
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let out = parse(
        w.node1
            .wait_log(&["connection complete", "\"outbound\"", &src])
            .await,
    );
    let served = parse(
        w.node2
            .wait_log(&["connection complete", "\"inbound\"", &src])
            .await,
    );
    assert_eq!(field(&out, "path"), "hbone", "{out}");
    assert_eq!(field(&out, "dst.addr"), w.app_addr.to_string(), "{out}");
    assert_eq!(
        field(&out, "dst.hbone_addr"),
        w.app_addr.to_string(),
        "{out}"
    );
    let next_hop = SocketAddr::new(w.bed.node_ip(2), 15008);
    assert_eq!(field(&out, "upstream.addr"), next_hop.to_string(), "{out}");
    assert_eq!(
        field(&out, "dst.identity"),
        "spiffe://cluster.local/ns/default/sa/echo",
        "the client side names the identity node 2 proved: {out}"
    );
    assert_eq!(
        field(&served, "src.identity"),
        "spiffe://cluster.local/ns/default/sa/client",
        "the server side names the client's verified identity: {served}"
    );
    assert_eq!(
        field(&served, "dst.addr"),
        w.app_addr.to_string(),
        "{served}"
    );
    let tunnel: SocketAddr = field(&served, "tunnel.peer_addr")
        .parse()
        .unwrap_or_else(|e| panic!("tunnel.peer_addr: {e}: {served}"));
    assert_eq!(tunnel.ip(), w.bed.node_ip(1), "{served}");
    assert_ne!(
        tunnel, client,
        "the tunnel is not the client's socket: {served}"
    );
    assert_eq!(
        (
            out["bytes_sent"].as_u64(),
            served["bytes_received"].as_u64()
        ),
        (Some(16 << 20), Some(16 << 20)),
        "both sides count the 16 MiB: {out} {served}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_connections_share_at_most_two_tunnels() {
    let w = world("echo").await;
    let mut streams = Vec::new();
    for _ in 0..100 {
        let mut s = socks5_connect(&w.bed, Place::Node(1), w.app_addr)
            .await
            .expect("SOCKS5 CONNECT");
        s.write_all(b"ping").await.expect("write");
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.expect("echo");
        assert_eq!(&back, b"ping");
        streams.push(s);
    }
    let out = w.bed.run_in(
        Place::Node(1),
        &["ss", "-Htn", "state", "established", "( dport = :15008 )"],
    );
    let tunnels = out.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(
        (1..=2).contains(&tunnels),
        "100 open connections used {tunnels} TCP connections to 15008:\n{out}"
    );
    assert_eq!(w.app.accepted(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_an_unexpected_identity_is_refused() {
    // Node 1 believes the echo workload runs as `impostor`; node 2 proves `echo`.
    let w = world("impostor").await;
    let reply = socks5_connect(&w.bed, Place::Node(1), w.app_addr).await;
    assert!(reply.is_err(), "the tunnel must fail");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(w.app.accepted(), 0, "the app saw a connection");
}

/// Raw clients against node 2's HBONE port, from inside node 1.
mod raw {
    use super::*;
    use tokio_rustls::TlsConnector;

    fn hbone_addr(w: &World) -> SocketAddr {
        SocketAddr::new(w.bed.node_ip(2), 15008)
    }

    async fn tls_to_node2(
        w: &World,
        ca: &CertificateAuthority,
        alpn: bool,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let client: SpiffeId = "spiffe://cluster.local/ns/default/sa/client"
            .parse()
            .unwrap();
        let echo: SpiffeId = "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap();
        let cert = ca.issue_now(&client).expect("issuing a client cert");
        let mut config =
            (*ztund::tls::client_config(&cert, &[echo]).expect("client config")).clone();
        if !alpn {
            config.alpn_protocols.clear();
        }
        let tcp = w
            .bed
            .app_sockets(Place::Node(1))
            .connect(hbone_addr(w), None)
            .await?;
        TlsConnector::from(Arc::new(config))
            .connect(ztund::tls::dummy_server_name(), tcp)
            .await
    }

    fn cluster_ca(w: &World) -> CertificateAuthority {
        CertificateAuthority::load(
            &w.cluster.path("ca"),
            "cluster.local",
            Duration::from_secs(3600),
        )
        .expect("loading the cluster CA")
    }

    /// Sends one request over a fresh HBONE connection and returns the status.
    async fn status_of(w: &World, method: &str, authority: &str) -> u16 {
        let tls = tls_to_node2(w, &cluster_ca(w), true).await.expect("TLS");
        let (mut send, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(method)
            .uri(authority)
            .body(())
            .expect("request");
        let (response, _stream) = send.send_request(request, false).expect("send");
        response.await.expect("response").status().as_u16()
    }

    async fn connection_is_closed_without_service(
        mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    ) {
        let _ = stream
            .write_all(b"CONNECT x HTTP/1.1\r\n\r\nhello app")
            .await;
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "server kept a refused connection open");
        // At most a TLS alert record (content type 21) before the close; never a service.
        assert!(
            answer.is_empty() || answer[0] == 21,
            "server answered a refused client with {answer:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_never_reach_the_app() {
        let w = world("echo").await;

        // Plain TCP to 15008.
        let tcp = w
            .bed
            .app_sockets(Place::Node(1))
            .connect(hbone_addr(&w), None)
            .await
            .expect("tcp");
        connection_is_closed_without_service(tcp).await;

        // A client certificate from another CA.
        let other = tempfile::tempdir().unwrap();
        let other_ca =
            CertificateAuthority::init(&other.path().join("ca"), "cluster.local").unwrap();
        if let Ok(tls) = tls_to_node2(&w, &other_ca, true).await {
            connection_is_closed_without_service(tls).await;
        }

        // TLS without ALPN h2.
        if let Ok(tls) = tls_to_node2(&w, &cluster_ca(&w), false).await {
            connection_is_closed_without_service(tls).await;
        }

        // CONNECT to an address that is not a workload of node 2 (ztund is no open proxy).
        let elsewhere = format!("{}:{APP_PORT}", w.bed.node_ip(1));
        assert_eq!(status_of(&w, "CONNECT", &elsewhere).await, 400);
        // A method other than CONNECT.
        let app = w.app_addr.to_string();
        assert_eq!(status_of(&w, "GET", &format!("http://{app}/")).await, 400);
        // A malformed authority (no port).
        assert_eq!(
            status_of(&w, "CONNECT", &w.bed.node_ip(2).to_string()).await,
            400
        );
        // A port nobody listens on: 503, and still nothing reaches the app.
        let closed = format!("{}:9", w.bed.node_ip(2));
        assert_eq!(status_of(&w, "CONNECT", &closed).await, 503);

        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(w.app.accepted(), 0, "a refused client reached the app");

        // And a good CONNECT does reach it, so the refusals above were real.
        assert_eq!(status_of(&w, "CONNECT", &app).await, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(w.app.accepted(), 1);
    }
}
