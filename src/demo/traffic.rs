//! The demo's traffic: each flow is a plain TCP connection made by an app socket inside a pod
//! (or a node, for a client outside the mesh), one message echoed back; then what the daemons
//! recorded about it in their JSON access logs (target `access`) becomes one table row.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::scenario::{self, DB, ECHO, HTTPBIN, Pod, SLEEP};
use super::world::World;
use crate::topology::Place;

/// How long one flow may take, and how long its access log lines may take to appear.
const FLOW_DEADLINE: Duration = Duration::from_secs(3);

/// What a flow should end in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The message comes back through the mesh.
    Echoed,
    /// The server side refuses it, naming this policy; the app never sees it.
    RefusedBy(&'static str),
}

/// Where a flow starts.
#[derive(Debug, Clone, Copy)]
pub enum Client {
    /// An app inside a mesh pod; its node's ztund captures it.
    Pod(Pod),
    /// A process in node `n`'s own namespace: not a mesh workload, no ztund in its path.
    Outside(usize),
}

/// One connection the demo makes.
#[derive(Debug, Clone)]
pub struct Flow {
    pub client: Client,
    /// The server pod (whose node's daemon records the inbound side).
    pub server: Pod,
    pub target: SocketAddr,
    /// How the target reads in the table (`echo:8080`, `echo VIP 10.96.0.10:80`).
    pub target_label: String,
    pub expect: Expect,
}

/// The demo's flows, in the order the table shows them.
pub fn flows(world: &World) -> Vec<Flow> {
    let t = &world.topology;
    let ipv6 = world.ipv6;
    let vip = scenario::echo_vip(ipv6);
    let direct = |client, server: Pod, expect| {
        let target = server.addr(t, ipv6).unwrap_or_else(|| {
            SocketAddr::new(scenario::pod_ip(t, server.node, server.index, ipv6), 0)
        });
        Flow {
            client,
            server,
            target,
            target_label: format!("{}:{}", server.name, target.port()),
            expect,
        }
    };
    vec![
        direct(Client::Pod(SLEEP), ECHO, Expect::Echoed),
        direct(Client::Pod(SLEEP), HTTPBIN, Expect::Echoed),
        Flow {
            client: Client::Pod(HTTPBIN),
            server: ECHO,
            target: vip,
            target_label: format!("echo VIP {vip}"),
            expect: Expect::Echoed,
        },
        direct(Client::Pod(SLEEP), DB, Expect::Echoed),
        direct(
            Client::Pod(HTTPBIN),
            DB,
            Expect::RefusedBy(scenario::DB_DENY),
        ),
        direct(
            Client::Outside(1),
            DB,
            // The node knows PeerAuthentication STRICT as istiod sends it: the static policy
            // that denies connections without a peer identity.
            Expect::RefusedBy(crate::policy::STATIC_STRICT_POLICY),
        ),
        direct(Client::Outside(1), ECHO, Expect::Echoed),
    ]
}

/// One line of the demo's table.
#[derive(Debug, Clone)]
pub struct Row {
    pub from_to: String,
    pub path: String,
    pub identity: String,
    pub bytes: String,
    pub result: String,
    /// Whether the outcome is what the scenario expects.
    pub as_expected: bool,
}

/// What the client saw.
struct ClientSide {
    sent: usize,
    echoed: usize,
    error: Option<String>,
}

/// Runs one flow and reads what the daemons logged about it.
pub async fn run(world: &World, flow: &Flow) -> Row {
    let marks = LogMarks::take(world);
    let client = send(world, flow).await;
    let server_node = flow.server.node;
    let server_line = wait_for_line(world, &marks, server_node, |line| {
        matches!(
            line["direction"].as_str(),
            Some("inbound" | "inbound_plaintext")
        )
    })
    .await;
    let client_line = match flow.client {
        Client::Pod(pod) => {
            wait_for_line(world, &marks, pod.node, |line| {
                line["direction"] == "outbound"
            })
            .await
        }
        Client::Outside(_) => None,
    };
    row(flow, &client, server_line.as_ref(), client_line.as_ref())
}

async fn send(world: &World, flow: &Flow) -> ClientSide {
    let (place, name) = match flow.client {
        Client::Pod(pod) => (pod.place(), pod.name.to_string()),
        Client::Outside(n) => (Place::Node(n), scenario::node_name(n)),
    };
    let message = format!("hello {}, this is {name}\n", flow.server.name);
    let mut side = ClientSide {
        sent: message.len(),
        echoed: 0,
        error: None,
    };
    let exchange = async {
        let mut stream = world
            .connect(place, flow.target)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(message.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let _ = stream.shutdown().await;
        let mut back = Vec::new();
        let read = stream.read_to_end(&mut back).await;
        Ok::<_, String>((back, read.err().map(|e| format!("read: {e}"))))
    };
    match tokio::time::timeout(FLOW_DEADLINE, exchange).await {
        Ok(Ok((back, error))) => {
            side.echoed = if back == message.as_bytes() {
                back.len()
            } else {
                0
            };
            side.error = error;
        }
        Ok(Err(error)) => side.error = Some(error),
        Err(_) => side.error = Some("timed out".into()),
    }
    side
}

fn row(flow: &Flow, client: &ClientSide, server: Option<&Value>, outbound: Option<&Value>) -> Row {
    let from = match flow.client {
        Client::Pod(pod) => pod.name.to_string(),
        Client::Outside(n) => format!("{} (no mesh)", scenario::node_name(n)),
    };
    let path = match (flow.client, outbound.and_then(|l| l["path"].as_str())) {
        (Client::Pod(pod), Some("hbone")) => format!(
            "HBONE {}→{}",
            scenario::node_name(pod.node),
            scenario::node_name(flow.server.node)
        ),
        (Client::Pod(_), Some(other)) => other.to_string(),
        (Client::Pod(_), None) => "?".into(),
        (Client::Outside(_), _) => "plaintext".into(),
    };
    let identity = match server.and_then(|l| l["src.identity"].as_str()) {
        Some(id) if !id.is_empty() => id.to_string(),
        _ if server.is_some() => "(none: plaintext)".into(),
        _ => "?".into(),
    };
    let refused = server.is_some_and(|l| l["message"] == "connection refused");
    // Bytes the server side carried between client and app (received/sent); none when refused.
    let bytes = match server {
        Some(l) if !refused => format!(
            "{}/{}",
            l["bytes_received"].as_u64().unwrap_or(0),
            l["bytes_sent"].as_u64().unwrap_or(0)
        ),
        _ => "0".to_string(),
    };
    let echoed = client.echoed == client.sent;
    let result = match server {
        Some(l) if refused => refusal(l["reason"].as_str().unwrap_or("")),
        Some(_) if echoed => "ok".to_string(),
        _ => format!(
            "failed: {}",
            client.error.as_deref().unwrap_or("no echo, no access log")
        ),
    };
    let as_expected = match flow.expect {
        Expect::Echoed => echoed && !refused && server.is_some(),
        // A refusal counts when the named policy decided it and the client got nothing back.
        Expect::RefusedBy(policy) => refused && result.contains(policy) && client.echoed == 0,
    };
    Row {
        from_to: format!("{from} → {}", flow.target_label),
        path,
        identity,
        bytes,
        result,
        as_expected,
    }
}

/// The reason a daemon gave, in the words of the policy that decided.
fn refusal(reason: &str) -> String {
    if let Some((_, pa)) = reason.split_once("(PeerAuthentication ") {
        let pa = pa.trim_end_matches(')').trim_end_matches(" requires mTLS");
        return format!("refused: PeerAuthentication {pa} is STRICT");
    }
    if let Some(policy) = reason.strip_prefix("explicitly denied by: ") {
        if policy.ends_with(crate::policy::STATIC_STRICT_POLICY) {
            return format!("refused: STRICT mTLS ({policy})");
        }
        return format!("denied by AuthorizationPolicy {policy}");
    }
    format!("refused: {reason}")
}

/// Each daemon log's length before a flow, so only the flow's own lines are read afterwards.
pub(super) struct LogMarks(Vec<(usize, usize)>);

impl LogMarks {
    pub(super) fn take(world: &World) -> LogMarks {
        LogMarks(
            world
                .daemons
                .iter()
                .map(|d| (d.node, d.log_text().len()))
                .collect(),
        )
    }

    fn of(&self, node: usize) -> usize {
        self.0
            .iter()
            .find(|(n, _)| *n == node)
            .map_or(0, |(_, len)| *len)
    }
}

/// The first access log line of node `node` since `marks` that `wanted` accepts, waiting for it
/// (bounded).
pub(super) async fn wait_for_line(
    world: &World,
    marks: &LogMarks,
    node: usize,
    wanted: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let daemon = world.daemon(node)?;
    let deadline = Instant::now() + FLOW_DEADLINE;
    loop {
        let text = daemon.log_text();
        let fresh = text.get(marks.of(node)..).unwrap_or("");
        let found = fresh
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|line| line["target"] == "access" && wanted(line));
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
