//! The DNS proxy in a pod's network namespace, end to end: the real `ztund` binary in standalone
//! capture with `dns.enabled`; an app in the pod sends ordinary queries to a resolver on port 53
//! (a tiny DNS server this test runs in the node's namespace). ztund's `inet ztund_dns` table
//! redirects them to its 15053 inside the pod: a ServiceEntry host is answered with its
//! auto-allocated VIP (UDP and TCP, the TCP query not taken by the outbound capture), an unknown
//! name reaches the upstream through ztund's own (marked, so exempt) query and comes back.
//! A pod that resolves a host without addresses and connects to the answer reaches the
//! ServiceEntry's workload on another node through HBONE, both sides proving their identities.

mod support;
mod testbed;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, OpCode, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use support::Cluster;
use support::pods::{MESH_FILE, MeshPod, mesh_yaml, spiffe_id};
use testbed::{Place, Testbed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztund::dns::forward::udp_socket;

const SERVICE_ENTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partner, namespace: default}
spec:
  hosts: [api.partner.example]
  ports: [{number: 443, name: https}]
  resolution: DNS
";

/// A UDP resolver on `addr` inside the node namespace: every name is `192.0.2.77`; the names
/// asked are recorded.
fn start_upstream(bed: &Testbed, addr: SocketAddr) -> Arc<Mutex<Vec<String>>> {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let socket = udp_socket(&bed.app_sockets(Place::Node(1)), addr).expect("binding the upstream");
    let record = asked.clone();
    bed.keep_task(tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let Some(q) = query.queries.first().cloned() else {
                continue;
            };
            record.lock().unwrap().push(q.name().to_ascii());
            let mut reply = Message::response(query.metadata.id, OpCode::Query);
            reply.add_query(q.clone());
            let data = RData::A(A("192.0.2.77".parse().unwrap()));
            reply.add_answer(Record::from_rdata(q.name().clone(), 60, data));
            let _ = socket.send_to(&reply.to_vec().unwrap(), from).await;
        }
    }));
    asked
}

fn query(name: &str, kind: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    message
}

fn addresses(reply: &Message) -> Vec<IpAddr> {
    reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect()
}

/// Asks `resolver` over UDP from inside pod (1, 1), as an app would (no mark).
async fn ask_udp_from_pod(bed: &Testbed, resolver: SocketAddr, name: &str) -> Message {
    ask_udp(bed, Place::Pod(1, 1), resolver, name, RecordType::A).await
}

/// Asks `resolver` over UDP from inside `place`, as an app would (no mark).
async fn ask_udp(
    bed: &Testbed,
    place: Place,
    resolver: SocketAddr,
    name: &str,
    kind: RecordType,
) -> Message {
    let any: SocketAddr = if resolver.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = udp_socket(&bed.app_sockets(place), any).expect("an app's UDP socket");
    let q = query(name, kind);
    socket
        .send_to(&q.to_vec().unwrap(), resolver)
        .await
        .unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, from) = tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no answer for {name}"))
        .unwrap();
    assert_eq!(
        from, resolver,
        "the answer seems to come from the resolver asked"
    );
    let reply = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(reply.metadata.id, q.metadata.id);
    reply
}

async fn ask_tcp_from_pod(bed: &Testbed, resolver: SocketAddr, name: &str) -> Message {
    ask_tcp(bed, Place::Pod(1, 1), resolver, name, RecordType::A).await
}

async fn ask_tcp(
    bed: &Testbed,
    place: Place,
    resolver: SocketAddr,
    name: &str,
    kind: RecordType,
) -> Message {
    let mut stream = bed
        .app_sockets(place)
        .connect(resolver, None)
        .await
        .expect("TCP to port 53 from an app");
    let bytes = query(name, kind).to_vec().unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed).await.unwrap();
    let len = tokio::time::timeout(Duration::from_secs(10), stream.read_u16())
        .await
        .expect("a TCP answer in time")
        .unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_resolves_mesh_hosts_through_port_53_and_other_names_through_its_upstream() {
    let prefix = format!("dns{}x", std::process::id() % 100_000);
    let bed = Testbed::with_prefix(&prefix, 1, 1);
    let cluster = Cluster::new();
    let resolver = SocketAddr::new(bed.node_ip(1), 53);
    let asked = start_upstream(&bed, resolver);
    let mesh = format!(
        "{}---\n{SERVICE_ENTRY}",
        mesh_yaml(&bed, &[MeshPod::captured(1, 1, "client")])
    );
    cluster.write(MESH_FILE, &mesh);
    let config = cluster.node_config(
        "node1",
        MESH_FILE,
        &format!("capture: standalone\ndns: {{enabled: true, upstreams: [\"{resolver}\"], timeout: 2s}}\n"),
    );
    let daemon = cluster.start(&bed, 1, &config).await;
    let tables = support::eventually("the pod's DNS table", Duration::from_secs(10), || {
        let tables = bed.run_in(Place::Pod(1, 1), &["nft", "list", "tables"]);
        if tables.contains("inet ztund_dns") {
            Ok(tables)
        } else {
            Err(tables)
        }
    })
    .await;
    // Beside ztund's own table, which it leaves alone.
    assert!(
        tables.lines().any(|l| l.trim() == "table inet ztund"),
        "{tables}"
    );

    // A ServiceEntry host: answered inside the pod with its auto-allocated VIP.
    let reply = ask_udp_from_pod(&bed, resolver, "api.partner.example.").await;
    let [IpAddr::V4(vip)] = addresses(&reply)[..] else {
        panic!("{reply:?}\n{}", daemon.log_text())
    };
    assert_eq!(vip.octets()[..2], [240, 240]);
    let over_tcp = ask_tcp_from_pod(&bed, resolver, "api.partner.example.").await;
    assert_eq!(addresses(&over_tcp), [IpAddr::V4(vip)]);
    // An unknown name: forwarded by ztund from the pod to the upstream, answered from there.
    let reply = ask_udp_from_pod(&bed, resolver, "www.example.org.").await;
    assert_eq!(addresses(&reply), ["192.0.2.77".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        asked.lock().unwrap().as_slice(),
        ["www.example.org."],
        "only the unknown name went upstream"
    );
}

/// A host without addresses whose endpoints are a mesh workload (pod (2, 1), `app: pod-n2p1`).
const ORDERS_ENTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: orders, namespace: default}
spec:
  hosts: [orders.partner.example]
  ports: [{number: 80, name: tcp, targetPort: 9000}]
  resolution: STATIC
  workloadSelector: {labels: {app: pod-n2p1}}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolved_auto_vip_reaches_the_service_entry_workload_through_hbone() {
    let prefix = format!("dns2v{}", std::process::id() % 100_000);
    let bed = Testbed::with_prefix(&prefix, 2, 1);
    let cluster = Cluster::new();
    let resolver = SocketAddr::new(bed.node_ip(1), 53);
    let asked = start_upstream(&bed, resolver);
    let pods = [
        MeshPod::captured(1, 1, "client"),
        MeshPod::captured(2, 1, "orders"),
    ];
    let mesh = format!("{}---\n{ORDERS_ENTRY}", mesh_yaml(&bed, &pods));
    cluster.write(MESH_FILE, &mesh);
    let dns = format!("dns: {{enabled: true, upstreams: [\"{resolver}\"], timeout: 2s}}\n");
    let mut daemons = Vec::new();
    for n in 1..=2 {
        let config = cluster.node_config(
            &format!("node{n}"),
            MESH_FILE,
            &format!("capture: standalone\n{dns}"),
        );
        daemons.push(cluster.start(&bed, n, &config).await);
    }
    for n in 1..=2 {
        support::eventually("the pods' DNS tables", Duration::from_secs(10), || {
            let tables = bed.run_in(Place::Pod(n, 1), &["nft", "list", "tables"]);
            if tables.contains("inet ztund_dns") && tables.contains("table inet ztund\n") {
                Ok(())
            } else {
                Err(tables)
            }
        })
        .await;
    }
    let server = bed.whoami_server(2, 1, 9000);

    let reply = ask_udp_from_pod(&bed, resolver, "orders.partner.example.").await;
    let [IpAddr::V4(vip)] = addresses(&reply)[..] else {
        panic!("{reply:?}\n{}", daemons[0].log_text())
    };
    assert_eq!(vip.octets()[..2], [240, 240]);
    assert!(
        asked.lock().unwrap().is_empty(),
        "a mesh host went upstream"
    );

    // The app dials the answer; the server app sees the client pod's own address.
    let target = SocketAddr::new(IpAddr::V4(vip), 80);
    let attempt = async {
        let mut stream = bed.connect_from(1, 1, target).await?;
        let mut seen = String::new();
        stream.read_to_string(&mut seen).await?;
        Ok::<_, std::io::Error>(seen)
    };
    let seen = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .expect("the connection to the VIP answered in time")
        .unwrap_or_else(|e| panic!("connecting to {target}: {e}\n{}", daemons[0].log_text()));
    let seen: SocketAddr = seen.trim().parse().unwrap_or_else(|e| {
        panic!(
            "whoami at {server} answered {seen:?}: {e}\n{}",
            daemons[0].log_text()
        )
    });
    assert_eq!(seen.ip(), bed.pod_ip(1, 1));

    // Node 1 carried it through HBONE to the workload's 15008 and verified its identity.
    let outbound = daemons[0]
        .wait_log(&[
            "connection complete",
            "\"outbound\"",
            &format!("\"{target}\""),
        ])
        .await;
    let hbone = format!("\"{}:15008\"", bed.pod_ip(2, 1));
    assert!(
        outbound.contains(&spiffe_id("orders")) && outbound.contains(&hbone),
        "node1's access log: {outbound}"
    );
    assert!(outbound.contains("\"path\":\"hbone\""), "{outbound}");
    // Node 2 took it in through HBONE from the client's identity, to the app's port.
    let inbound = daemons[1]
        .wait_log(&[
            "connection complete",
            "\"inbound\"",
            &format!("\"{server}\""),
        ])
        .await;
    assert!(
        inbound.contains(&spiffe_id("client")) && inbound.contains(&bed.pod_ip(1, 1).to_string()),
        "node2's access log: {inbound}"
    );
}

/// An app in a pod whose resolver has an IPv6 address: its queries are redirected to ztund's
/// `::1` server (UDP and TCP), mesh hosts answered there with their v6 VIP, and an unknown name
/// reaches the v6 upstream through ztund's own exempt query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_query_to_an_ipv6_resolver_is_answered_by_ztund() {
    let prefix = format!("dns26{}", std::process::id() % 100_000);
    let bed = Testbed::with_prefix(&prefix, 1, 1);
    let cluster = Cluster::new();
    let resolver = SocketAddr::new(bed.node_ip6(1), 53);
    let asked = start_upstream(&bed, resolver);
    let pods = [MeshPod::captured(1, 1, "client").dual_stack()];
    cluster.write(
        MESH_FILE,
        &format!("{}---\n{SERVICE_ENTRY}", mesh_yaml(&bed, &pods)),
    );
    let config = cluster.node_config(
        "node1",
        MESH_FILE,
        &format!("capture: standalone\ndns: {{enabled: true, upstreams: [\"{resolver}\"], timeout: 2s}}\n"),
    );
    let daemon = cluster.start(&bed, 1, &config).await;
    support::eventually("the pod's DNS table", Duration::from_secs(10), || {
        let tables = bed.run_in(Place::Pod(1, 1), &["nft", "list", "tables"]);
        if tables.contains("inet ztund_dns") {
            Ok(())
        } else {
            Err(tables)
        }
    })
    .await;

    let pod = Place::Pod(1, 1);
    let host = "api.partner.example.";
    let reply = ask_udp(&bed, pod, resolver, host, RecordType::AAAA).await;
    let [IpAddr::V6(vip6)] = addresses(&reply)[..] else {
        panic!("{reply:?}\n{}", daemon.log_text())
    };
    assert_eq!(vip6.segments()[..2], [0x2001, 0x2]);
    let reply = ask_tcp(&bed, pod, resolver, host, RecordType::AAAA).await;
    assert_eq!(addresses(&reply), [IpAddr::V6(vip6)]);
    let reply = ask_udp(&bed, pod, resolver, host, RecordType::A).await;
    assert!(
        matches!(addresses(&reply)[..], [IpAddr::V4(v4)] if v4.octets()[..2] == [240, 240]),
        "{reply:?}"
    );
    let reply = ask_udp(&bed, pod, resolver, "www.example.org.", RecordType::A).await;
    assert_eq!(addresses(&reply), ["192.0.2.77".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        asked.lock().unwrap().as_slice(),
        ["www.example.org."],
        "only the unknown name went upstream"
    );
}

/// A VM host (`capture: host`) whose resolv.conf names a stub resolver on loopback
/// (`127.0.0.53`, `::1`): the host's queries to it are captured and answered by ztund (UDP and
/// TCP, both families), while ztund's own forwards reach the stub (they carry its mark). The
/// daemon was ready only with the host's DNS listener serving; the answered auto-allocated VIP
/// is among the host's captured mesh destinations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_hosts_loopback_stub_resolver_is_captured_and_ztund_still_reaches_it() {
    let prefix = format!("dns2h{}", std::process::id() % 100_000);
    let bed = Testbed::with_prefix(&prefix, 1, 1);
    let cluster = Cluster::new();
    let stub: SocketAddr = "127.0.0.53:53".parse().unwrap();
    let asked = start_upstream(&bed, stub);
    let vm = format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: vm, namespace: default, annotations: {{ztund.io/node: node1}}}}\nspec: {{address: \"{}\", serviceAccount: vm}}\n",
        bed.node_ip(1)
    );
    cluster.write(MESH_FILE, &format!("{vm}---\n{SERVICE_ENTRY}"));
    let config = cluster.node_config(
        "node1",
        MESH_FILE,
        &format!("capture: host\ndns: {{enabled: true, upstreams: [\"{stub}\"], timeout: 2s}}\n"),
    );
    let daemon = cluster.start(&bed, 1, &config).await;
    let host = Place::Node(1);
    let rules = bed.run_in(host, &["nft", "list", "table", "inet", "ztund_dns"]);
    assert!(!rules.contains("oifname"), "{rules}");

    // Ready, so the host's DNS server answers at once: over UDP and TCP, at both stubs.
    let name = "api.partner.example.";
    let reply = ask_udp(&bed, host, stub, name, RecordType::A).await;
    let [IpAddr::V4(vip)] = addresses(&reply)[..] else {
        panic!("{reply:?}\n{}", daemon.log_text())
    };
    assert_eq!(vip.octets()[..2], [240, 240]);
    // The host's outbound capture takes the answered VIP like a declared one.
    let set = bed.run_in(
        host,
        &["nft", "list", "set", "inet", "ztund", "mesh_destinations"],
    );
    assert!(set.contains(&vip.to_string()), "{vip} not captured:\n{set}");
    let reply = ask_tcp(&bed, host, stub, name, RecordType::A).await;
    assert_eq!(addresses(&reply), [IpAddr::V4(vip)]);
    let stub6: SocketAddr = "[::1]:53".parse().unwrap();
    let reply = ask_udp(&bed, host, stub6, name, RecordType::AAAA).await;
    assert!(
        matches!(addresses(&reply)[..], [IpAddr::V6(v6)] if v6.segments()[..2] == [0x2001, 0x2]),
        "{reply:?}"
    );
    // An unknown name: ztund forwards it to the stub, its own marked query not captured again.
    let reply = ask_udp(&bed, host, stub, "www.example.org.", RecordType::A).await;
    assert_eq!(addresses(&reply), ["192.0.2.77".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        asked.lock().unwrap().as_slice(),
        ["www.example.org."],
        "only the unknown name reached the stub"
    );
}
