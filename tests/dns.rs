//! The DNS proxy on real sockets (loopback): mesh names answered locally, the search forms a
//! pod's resolv.conf produces, wildcard ServiceEntry hosts, unknown names forwarded to a tiny
//! upstream this test runs, truncation and the TCP fallback on both sides, a malformed query,
//! a flood of forwards held to the cap, an oversized local answer truncated.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use ztund::dns::{DnsConfig, DnsListeners, DnsMetrics, DnsScope, DnsService};
use ztund::mesh::{MeshSettings, MeshStore, snapshot_from_text};
use ztund::net::SocketFactory;

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.20, clusterIPs: [10.96.0.20, "fd00:96::20"], ports: [{port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pay, namespace: shop}
spec:
  hosts: [pay.example.com, "*.pay.example.com"]
  addresses: [240.0.0.1]
  ports: [{number: 443, name: https}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.5}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partner, namespace: shop}
spec:
  hosts: [api.partner.example]
  ports: [{number: 443, name: https}]
  resolution: DNS
---
apiVersion: v1
kind: Service
metadata: {name: many, namespace: shop}
spec: {clusterIP: None, selector: {app: many}, ports: [{port: 80}]}
"#;

/// A headless service with 100 endpoints: its A answer is ~1.6 KB, over 512 bytes.
fn mesh_text() -> String {
    let mut text = MESH.to_string();
    for i in 0..100 {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: many-{i}, namespace: shop, labels: {{app: many}}}}\n\
             spec: {{nodeName: node-1}}\nstatus: {{podIP: 10.1.0.{}}}\n",
            i + 1
        ));
    }
    text
}

fn mesh() -> Arc<MeshStore> {
    let settings = MeshSettings {
        trust_domain: "cluster.local".into(),
        cluster_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
    };
    let snapshot = snapshot_from_text("mesh.yaml", &mesh_text(), &settings).expect("mesh parses");
    Arc::new(MeshStore::new(snapshot))
}

/// A tiny upstream resolver on UDP and TCP of one loopback port: `big.example` has 100 A
/// records (over UDP it answers TC=1 with none, as a real server does), `slow.example` is
/// never answered, `nx.example` is NXDOMAIN, anything else is `192.0.2.1`.
struct Upstream {
    addr: SocketAddr,
    udp_queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
}

fn upstream_answer(query: &Message, over_udp: bool) -> Option<Message> {
    let q = query.queries.first()?.clone();
    let name = q.name().to_ascii();
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.recursion_available = true;
    reply.add_query(q.clone());
    match name.as_str() {
        "slow.example." => return None,
        "nx.example." => reply.metadata.response_code = ResponseCode::NXDomain,
        "big.example." if over_udp => reply.metadata.truncation = true,
        "big.example." => {
            for i in 0..100u8 {
                let data = RData::A(A(Ipv4Addr::new(198, 51, 100, i)));
                reply.add_answer(Record::from_rdata(q.name().clone(), 60, data));
            }
        }
        _ => {
            let data = RData::A(A(Ipv4Addr::new(192, 0, 2, 1)));
            reply.add_answer(Record::from_rdata(q.name().clone(), 60, data));
        }
    }
    Some(reply)
}

async fn start_upstream() -> Upstream {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    let (udp_queries, tcp_queries) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let counted = udp_queries.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            counted.fetch_add(1, Ordering::SeqCst);
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if let Some(reply) = upstream_answer(&query, true) {
                let _ = udp.send_to(&reply.to_vec().unwrap(), from).await;
            }
        }
    });
    let counted = tcp_queries.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                while let Ok(len) = stream.read_u16().await {
                    let mut buf = vec![0u8; usize::from(len)];
                    if stream.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(query) = Message::from_vec(&buf) else {
                        return;
                    };
                    if let Some(reply) = upstream_answer(&query, false) {
                        let bytes = reply.to_vec().unwrap();
                        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&bytes);
                        let _ = stream.write_all(&framed).await;
                    }
                }
            });
        }
    });
    Upstream {
        addr,
        udp_queries,
        tcp_queries,
    }
}

/// A DNS proxy for a pod in namespace `shop`, forwarding to `upstream`.
struct Proxy {
    addr: SocketAddr,
    service: Arc<DnsService>,
    _drain: watch::Sender<bool>,
}

async fn start_proxy(upstream: SocketAddr, tweak: impl FnOnce(&mut DnsConfig)) -> Proxy {
    let mut config = DnsConfig {
        enabled: true,
        upstreams: vec![upstream.to_string()],
        timeout: Duration::from_secs(2),
        ..DnsConfig::default()
    };
    tweak(&mut config);
    let service = Arc::new(DnsService::new(
        &config,
        "cluster.local",
        mesh(),
        DnsMetrics::default(),
    ));
    let listeners = DnsListeners::bind(&SocketFactory::default(), 0).unwrap();
    let addr = listeners.local_addrs()[0];
    let scope = DnsScope {
        namespace: Some("shop".into()),
        uid: None,
        sockets: SocketFactory::default(),
    };
    let (drain, drain_rx) = watch::channel(false);
    listeners.serve(service.clone(), scope, drain_rx);
    Proxy {
        addr,
        service,
        _drain: drain,
    }
}

fn query(name: &str, kind: RecordType, edns: Option<u16>) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        message.set_edns(e);
    }
    message
}

async fn ask_udp_raw(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(bytes, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(buf[..n].to_vec())
}

async fn ask_udp(server: SocketAddr, message: &Message) -> (Message, usize) {
    let bytes = ask_udp_raw(server, &message.to_vec().unwrap())
        .await
        .expect("an answer over UDP");
    let reply = Message::from_vec(&bytes).unwrap();
    assert_eq!(reply.metadata.id, message.metadata.id);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    (reply, bytes.len())
}

async fn ask_tcp(server: SocketAddr, message: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    let bytes = message.to_vec().unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed).await.unwrap();
    let len = stream.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.unwrap();
    let reply = Message::from_vec(&buf).unwrap();
    assert_eq!(reply.metadata.id, message.metadata.id);
    reply
}

fn addresses(reply: &Message) -> Vec<IpAddr> {
    reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[tokio::test]
async fn mesh_names_are_answered_locally_for_a_and_aaaa() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr, |_| {}).await;
    let name = "reviews.shop.svc.cluster.local.";
    let (a, _) = ask_udp(proxy.addr, &query(name, RecordType::A, None)).await;
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.metadata.authoritative);
    assert_eq!(addresses(&a), [ip("10.96.0.20")]);
    let (aaaa, _) = ask_udp(proxy.addr, &query(name, RecordType::AAAA, Some(1232))).await;
    assert_eq!(addresses(&aaaa), [ip("fd00:96::20")]);
    assert!(aaaa.edns.is_some(), "an EDNS query gets an EDNS answer");
    let over_tcp = ask_tcp(proxy.addr, &query(name, RecordType::A, None)).await;
    assert_eq!(addresses(&over_tcp), [ip("10.96.0.20")]);
    assert_eq!(
        upstream.udp_queries.load(Ordering::SeqCst),
        0,
        "nothing was forwarded"
    );
}

#[tokio::test]
async fn the_search_forms_of_a_pods_resolv_conf_resolve() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr, |_| {}).await;
    for name in [
        "reviews.",
        "reviews.shop.",
        "reviews.shop.svc.",
        "reviews.shop.shop.svc.cluster.local.",
    ] {
        let (reply, _) = ask_udp(proxy.addr, &query(name, RecordType::A, None)).await;
        assert_eq!(addresses(&reply), [ip("10.96.0.20")], "{name}");
    }
    assert_eq!(upstream.udp_queries.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn service_entry_hosts_wildcards_and_auto_allocated_vips_resolve() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr, |_| {}).await;
    for name in [
        "pay.example.com.",
        "eu.pay.example.com.",
        "a.b.pay.example.com.",
    ] {
        let (reply, _) = ask_udp(proxy.addr, &query(name, RecordType::A, None)).await;
        assert_eq!(addresses(&reply), [ip("240.0.0.1")], "{name}");
    }
    // Declared without addresses: a VIP from 240.240.0.0/16 and 2001:2::/48.
    let (v4, _) = ask_udp(
        proxy.addr,
        &query("api.partner.example.", RecordType::A, None),
    )
    .await;
    let (v6, _) = ask_udp(
        proxy.addr,
        &query("api.partner.example.", RecordType::AAAA, None),
    )
    .await;
    let [IpAddr::V4(v4)] = addresses(&v4)[..] else {
        panic!("{v4:?}")
    };
    let [IpAddr::V6(v6)] = addresses(&v6)[..] else {
        panic!("{v6:?}")
    };
    assert_eq!(v4.octets()[..2], [240, 240]);
    assert_eq!(v6.segments()[..3], [0x2001, 0x2, 0]);
    // A second proxy (another node, a restart) hands out the same VIP.
    let again = start_proxy(upstream.addr, |_| {}).await;
    let (same, _) = ask_udp(
        again.addr,
        &query("api.partner.example.", RecordType::A, None),
    )
    .await;
    assert_eq!(addresses(&same), [IpAddr::V4(v4)]);
    assert_eq!(upstream.udp_queries.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn unknown_names_are_forwarded_upstream_and_counted() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr, |_| {}).await;
    let (reply, _) = ask_udp(proxy.addr, &query("www.example.org.", RecordType::A, None)).await;
    assert_eq!(addresses(&reply), [ip("192.0.2.1")]);
    let (nx, _) = ask_udp(proxy.addr, &query("nx.example.", RecordType::A, None)).await;
    assert_eq!(
        nx.metadata.response_code,
        ResponseCode::NXDomain,
        "passed on, not invented"
    );
    // Other types for a mesh name are the upstream's to answer (SRV, TXT...).
    let (mx, _) = ask_udp(proxy.addr, &query("reviews.shop.", RecordType::MX, None)).await;
    assert_eq!(mx.metadata.response_code, ResponseCode::NoError);
    assert_eq!(upstream.udp_queries.load(Ordering::SeqCst), 3);
    let mut registry = prometheus_client::registry::Registry::default();
    proxy.service.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(
            "istio_dns_upstream_requests_total{request_query_type=\"a\",request_protocol=\"udp\""
        ) && text.contains("istio_dns_requests_total{"),
        "{text}"
    );
}

#[tokio::test]
async fn a_truncated_upstream_answer_is_fetched_over_tcp_and_truncated_for_a_small_client() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr, |_| {}).await;
    // The client takes 4096 bytes: the proxy's TCP retry brings all 100 records.
    let (big, _) = ask_udp(
        proxy.addr,
        &query("big.example.", RecordType::A, Some(4096)),
    )
    .await;
    assert!(!big.metadata.truncation);
    assert_eq!(addresses(&big).len(), 100);
    assert_eq!(upstream.tcp_queries.load(Ordering::SeqCst), 1);
    // A classic client takes 512: TC=1, and it asks again over TCP.
    let (small, len) = ask_udp(proxy.addr, &query("big.example.", RecordType::A, None)).await;
    assert!(small.metadata.truncation);
    assert!(len <= 512, "{len} bytes");
    let full = ask_tcp(proxy.addr, &query("big.example.", RecordType::A, None)).await;
    assert_eq!(addresses(&full).len(), 100);
}

#[tokio::test]
async fn an_oversized_local_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr, |_| {}).await;
    let (small, len) = ask_udp(proxy.addr, &query("many.shop.", RecordType::A, None)).await;
    assert!(small.metadata.truncation && small.answers.is_empty());
    assert!(len <= 512);
    let full = ask_tcp(proxy.addr, &query("many.shop.", RecordType::A, None)).await;
    assert_eq!(addresses(&full).len(), 100);
    assert!(!full.metadata.truncation);
}

#[tokio::test]
async fn a_malformed_query_gets_formerr_and_the_server_keeps_serving() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr, |_| {}).await;
    // A header that claims one question, then garbage.
    let mut bad = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    bad.extend_from_slice(&[0xff; 20]);
    let reply = Message::from_vec(&ask_udp_raw(proxy.addr, &bad).await.unwrap()).unwrap();
    assert_eq!(reply.metadata.id, 0xabcd);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    // Shorter than a header: nothing to answer to.
    let none = ask_udp_raw(proxy.addr, &[1, 2, 3]).await;
    assert!(none.is_none());
    // Two questions in one query.
    let mut two = query("reviews.shop.", RecordType::A, None);
    two.add_query(Query::query(
        Name::from_ascii("pay.example.com.").unwrap(),
        RecordType::A,
    ));
    let (reply, _) = ask_udp(proxy.addr, &two).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    let (ok, _) = ask_udp(proxy.addr, &query("reviews.shop.", RecordType::A, None)).await;
    assert_eq!(addresses(&ok), [ip("10.96.0.20")]);
    assert_eq!(proxy.service.metrics().malformed.get(), 3);
}

#[tokio::test]
async fn a_flood_of_forwards_is_held_to_the_cap_and_local_answers_go_on() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr, |c| c.max_concurrent_forwards = 8).await;
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let flood = 500;
    let (sender, target) = (socket.clone(), proxy.addr);
    tokio::spawn(async move {
        for i in 0..flood {
            let q = query("slow.example.", RecordType::A, None)
                .to_vec()
                .unwrap();
            sender.send_to(&q, target).await.unwrap();
            // Paced a little so that the kernel's socket buffers never drop one.
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    // Every query past the 8 in flight is answered REFUSED at once.
    let mut refused = 0;
    let mut buf = vec![0u8; 65535];
    let deadline = Instant::now() + Duration::from_millis(1500);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline.into(), socket.recv(&mut buf)).await {
        let reply = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        refused += 1;
    }
    assert_eq!(refused, flood - 8, "all but the 8 in flight are refused");
    assert!(upstream.udp_queries.load(Ordering::SeqCst) <= 8);
    assert_eq!(proxy.service.metrics().refused.get(), refused as u64);
    let (ok, _) = ask_udp(proxy.addr, &query("reviews.shop.", RecordType::A, None)).await;
    assert_eq!(addresses(&ok), [ip("10.96.0.20")]);
    // Once the upstream timeout frees the slots, forwards work again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (fwd, _) = ask_udp(proxy.addr, &query("www.example.org.", RecordType::A, None)).await;
    assert_eq!(addresses(&fwd), [ip("192.0.2.1")]);
}

/// The daemon's `dns proxy` readiness task stays pending until a server of the service is
/// listening and serving; from then on a query is answered at once.
#[tokio::test]
async fn the_dns_proxy_readiness_task_completes_when_a_server_serves() {
    use ztund::admin::Readiness;

    let upstream = start_upstream().await;
    let readiness = Readiness::new();
    let config = DnsConfig {
        enabled: true,
        upstreams: vec![upstream.addr.to_string()],
        ..DnsConfig::default()
    };
    let service = Arc::new(
        DnsService::new(&config, "cluster.local", mesh(), DnsMetrics::default())
            .with_readiness(readiness.register(ztund::dns::READINESS_TASK)),
    );
    assert_eq!(readiness.pending(), ["dns proxy"]);
    let listeners = DnsListeners::bind(&SocketFactory::default(), 0).unwrap();
    let addr = listeners.local_addrs()[0];
    assert!(!readiness.is_ready(), "bound is not serving yet");
    let scope = DnsScope {
        namespace: Some("shop".into()),
        uid: None,
        sockets: SocketFactory::default(),
    };
    let (_drain, drain_rx) = watch::channel(false);
    listeners.serve(service.clone(), scope, drain_rx);
    assert!(readiness.is_ready(), "{:?}", readiness.pending());
    let (reply, _) = ask_udp(addr, &query("reviews.shop.", RecordType::A, None)).await;
    assert_eq!(addresses(&reply), [ip("10.96.0.20")]);
    // A second pod's server, or a restart of one, changes nothing.
    service.mark_serving();
    assert!(readiness.is_ready());
}
