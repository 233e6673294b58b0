//! The DNS proxy's servers (UDP and TCP on 15053, `127.0.0.1` and `::1`) and the one decision
//! each query gets: parse (hickory-proto) → answered from the mesh, or forwarded, or refused.
//! A query that does not parse is answered FORMERR when its header can be read and dropped
//! otherwise; a UDP answer larger than the client accepts goes out truncated (TC=1) so the
//! client asks again over TCP; forwards past the node's cap are answered REFUSED at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::debug;

use super::DnsService;
use super::forward::udp_socket;
use super::metrics::{DnsLabels, Protocol};
use super::resolve::Lookup;
use crate::net::SocketFactory;

/// TTL of the answers made from the mesh (Istio's DNS proxy uses 30 s too).
const TTL: u32 = 30;
/// The UDP payload a client without EDNS accepts (RFC 1035).
const CLASSIC_UDP: usize = 512;
/// What ztund offers in its own EDNS record: the size DNS Flag Day 2020 settled on.
const OFFERED_UDP: u16 = 1232;
/// A TCP client that sends nothing for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// TCP connections one listener serves at once; more wait in the accept queue.
const MAX_TCP_CONNECTIONS: usize = 256;

/// Who asks: the pod a server belongs to (its namespace for the search forms, its uid for the
/// metrics' source labels) and where its forwards are sent from.
#[derive(Debug, Clone, Default)]
pub struct DnsScope {
    pub namespace: Option<String>,
    pub uid: Option<Arc<str>>,
    pub sockets: SocketFactory,
}

/// What to do with one received message.
enum Decision {
    Reply(Vec<u8>),
    Drop,
    Forward {
        permit: OwnedSemaphorePermit,
        request: Box<Message>,
        labels: DnsLabels,
    },
}

impl DnsService {
    /// Reads one query and decides; cheap (no I/O), so the UDP loop runs it inline.
    fn decide(&self, scope: &DnsScope, bytes: &[u8], protocol: Protocol) -> Decision {
        let request = match Message::from_vec(bytes) {
            Ok(request) => request,
            Err(e) => {
                self.metrics.malformed.inc();
                debug!(error = %e, "malformed DNS query");
                return match header_id(bytes) {
                    Some(id) => Decision::Reply(error_reply(id, ResponseCode::FormErr)),
                    None => Decision::Drop,
                };
            }
        };
        // A response sent to the proxy is never answered: two proxies cannot loop.
        if request.metadata.message_type != MessageType::Query {
            return Decision::Drop;
        }
        let id = request.metadata.id;
        if request.metadata.op_code != OpCode::Query {
            return Decision::Reply(error_reply(id, ResponseCode::NotImp));
        }
        let [query] = request.queries.as_slice() else {
            self.metrics.malformed.inc();
            return Decision::Reply(error_reply(id, ResponseCode::FormErr));
        };
        let labels = self.labels(scope, query.query_type(), protocol);
        self.metrics.requests.get_or_create(&labels).inc();
        let asks_address = matches!(query.query_type(), RecordType::A | RecordType::AAAA)
            && query.query_class() == DNSClass::IN;
        if asks_address {
            let snapshot = self.mesh.load();
            let name = query.name().to_ascii();
            if let Lookup::Mesh(addresses) =
                self.resolver
                    .lookup(&snapshot, &name, scope.namespace.as_deref())
            {
                let reply = mesh_reply(&request, query, &addresses);
                return Decision::Reply(encode_within(&reply, client_limit(&request, protocol)));
            }
        }
        match self.forwarder.try_permit() {
            Some(permit) => Decision::Forward {
                permit,
                request: Box::new(request),
                labels,
            },
            None => {
                self.metrics.refused.inc();
                Decision::Reply(error_reply(id, ResponseCode::Refused))
            }
        }
    }

    /// Forwards and returns what the client gets back (SERVFAIL when no upstream answered).
    async fn forward(
        &self,
        scope: &DnsScope,
        bytes: &[u8],
        request: &Message,
        labels: &DnsLabels,
        protocol: Protocol,
    ) -> Vec<u8> {
        self.metrics.upstream_requests.get_or_create(labels).inc();
        let started = Instant::now();
        let tcp = protocol == Protocol::tcp;
        match self.forwarder.forward(&scope.sockets, bytes, tcp).await {
            Ok(answer) => {
                self.metrics
                    .upstream_duration
                    .get_or_create(labels)
                    .observe(started.elapsed().as_secs_f64());
                let limit = client_limit(request, protocol);
                if answer.len() <= limit {
                    return answer;
                }
                // Larger than the client takes over UDP: the header and question, TC=1.
                match Message::from_vec(&answer) {
                    Ok(message) => encode_within(&message, limit),
                    Err(_) => error_reply(request.metadata.id, ResponseCode::ServFail),
                }
            }
            Err(e) => {
                self.metrics.upstream_failures.get_or_create(labels).inc();
                debug!(error = %e, "DNS forward failed");
                error_reply(request.metadata.id, ResponseCode::ServFail)
            }
        }
    }

    /// The answer to one message, forwarding included (the TCP server's path, and tests').
    pub async fn handle(
        &self,
        scope: &DnsScope,
        bytes: &[u8],
        protocol: Protocol,
    ) -> Option<Vec<u8>> {
        match self.decide(scope, bytes, protocol) {
            Decision::Reply(reply) => Some(reply),
            Decision::Drop => None,
            Decision::Forward {
                permit,
                request,
                labels,
            } => {
                let reply = self
                    .forward(scope, bytes, &request, &labels, protocol)
                    .await;
                drop(permit);
                Some(reply)
            }
        }
    }

    fn labels(&self, scope: &DnsScope, query_type: RecordType, protocol: Protocol) -> DnsLabels {
        let workload = scope
            .uid
            .as_deref()
            .and_then(|uid| self.mesh.load().workload_by_uid(uid).cloned());
        let (service, revision) = match &workload {
            Some(w) => (
                crate::proxy::labels::canonical_service(w),
                crate::proxy::labels::canonical_revision(w),
            ),
            None => ("unknown".into(), "unknown".into()),
        };
        DnsLabels {
            // ztunnel's values are lowercase: `a`, `aaaa`, `srv`.
            request_query_type: query_type.to_string().to_ascii_lowercase(),
            request_protocol: protocol,
            source_canonical_service: service,
            source_canonical_revision: revision,
        }
    }
}

/// The id of a message whose header is complete, even when the rest does not parse.
fn header_id(bytes: &[u8]) -> Option<u16> {
    (bytes.len() >= 12).then(|| u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn error_reply(id: u16, code: ResponseCode) -> Vec<u8> {
    let mut reply = Message::error_msg(id, OpCode::Query, code);
    reply.metadata.recursion_available = true;
    reply.to_vec().unwrap_or_default()
}

/// The largest answer the client takes: its EDNS size over UDP (at least 512), 64 KiB over TCP.
fn client_limit(request: &Message, protocol: Protocol) -> usize {
    match protocol {
        Protocol::tcp => 65_535,
        Protocol::udp => request
            .edns
            .as_ref()
            .map_or(CLASSIC_UDP, |e| usize::from(e.max_payload()))
            .max(CLASSIC_UDP),
    }
}

/// An authoritative answer with the addresses of the asked family (none: NODATA).
fn mesh_reply(request: &Message, query: &Query, addresses: &[IpAddr]) -> Message {
    let mut reply = Message::response(request.metadata.id, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(query.clone());
    let name = query.name().clone();
    for ip in addresses {
        let data = match (query.query_type(), ip) {
            (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
            (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
            _ => continue,
        };
        reply.add_answer(Record::from_rdata(name.clone(), TTL, data));
    }
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(OFFERED_UDP);
        reply.set_edns(edns);
    }
    reply
}

/// `message` encoded; if longer than `limit`, its truncated form (header, question, TC=1).
fn encode_within(message: &Message, limit: usize) -> Vec<u8> {
    match message.to_vec() {
        Ok(bytes) if bytes.len() <= limit => bytes,
        Ok(_) => message
            .truncate()
            .to_vec()
            .unwrap_or_else(|_| error_reply(message.metadata.id, ResponseCode::ServFail)),
        Err(_) => error_reply(message.metadata.id, ResponseCode::ServFail),
    }
}

/// One server's sockets: UDP and TCP on `127.0.0.1`, and on `::1` when the namespace has it.
pub struct DnsListeners {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

impl DnsListeners {
    /// Binds `port` in `sockets`' namespace. IPv4 must work; IPv6 is skipped where loopback has
    /// no `::1` (IPv6 disabled in the pod).
    /// Port 0 picks a free port for UDP on `127.0.0.1` and binds everything else on it too.
    pub fn bind(sockets: &SocketFactory, port: u16) -> std::io::Result<DnsListeners> {
        let udp4 = udp_socket(
            sockets,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        )?;
        let port = udp4.local_addr()?.port();
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
        let mut listeners = DnsListeners {
            udp: vec![udp4],
            tcp: vec![sockets.listener(v4, false)?],
        };
        if let (Ok(udp), Ok(tcp)) = (udp_socket(sockets, v6), sockets.listener(v6, false)) {
            listeners.udp.push(udp);
            listeners.tcp.push(tcp);
        }
        Ok(listeners)
    }

    /// The bound addresses (tests bind port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// Serves every socket until `drain` turns true (or the tasks are aborted).
    pub fn serve(
        self,
        service: Arc<DnsService>,
        scope: DnsScope,
        drain: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        for socket in self.udp {
            let (service, scope, drain) = (service.clone(), scope.clone(), drain.clone());
            tasks.push(tokio::spawn(until_drain(
                drain,
                serve_udp(service, scope, Arc::new(socket)),
            )));
        }
        for listener in self.tcp {
            let (service, scope, drain) = (service.clone(), scope.clone(), drain.clone());
            tasks.push(tokio::spawn(until_drain(
                drain,
                serve_tcp(service, scope, listener),
            )));
        }
        // Bound before this call, so every query from now on is queued for a serving task.
        service.mark_serving();
        tasks
    }
}

async fn until_drain(mut drain: watch::Receiver<bool>, serve: impl Future<Output = ()>) {
    tokio::select! {
        _ = serve => {}
        _ = drain.wait_for(|d| *d) => {}
    }
}

async fn serve_udp(service: Arc<DnsService>, scope: DnsScope, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            // ICMP errors from earlier replies surface here; the socket itself is fine.
            Err(e) => {
                debug!(error = %e, "DNS UDP receive");
                continue;
            }
        };
        let query = &buf[..n];
        match service.decide(&scope, query, Protocol::udp) {
            Decision::Reply(reply) => {
                let _ = socket.send_to(&reply, client).await;
            }
            Decision::Drop => {}
            Decision::Forward {
                permit,
                request,
                labels,
            } => {
                let (service, scope, socket) = (service.clone(), scope.clone(), socket.clone());
                let query = query.to_vec();
                tokio::spawn(async move {
                    let reply = service
                        .forward(&scope, &query, &request, &labels, Protocol::udp)
                        .await;
                    drop(permit);
                    let _ = socket.send_to(&reply, client).await;
                });
            }
        }
    }
}

async fn serve_tcp(service: Arc<DnsService>, scope: DnsScope, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!(error = %e, "DNS TCP accept");
                // EMFILE and friends: give the node a moment instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (service, scope) = (service.clone(), scope.clone());
        tokio::spawn(async move {
            serve_tcp_connection(&service, &scope, stream).await;
            drop(slot);
        });
    }
}

/// Queries one after another on one connection, each with its 2-byte length prefix.
async fn serve_tcp_connection(service: &DnsService, scope: &DnsScope, mut stream: TcpStream) {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            _ => return,
        };
        let mut query = vec![0u8; len];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let Some(reply) = service.handle(scope, &query, Protocol::tcp).await else {
            continue;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}
