//! The Delta ADS client against a fake control plane speaking the real protocol over TLS:
//! node shape and call metadata, wildcard subscriptions, ACK/NACK, removals, ignored types,
//! reconnects with `initial_resource_versions`, refusal backoff and keepalive.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use prost_types::value::Kind;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::testing::{FakeControlPlane, Relay, TestSink, within};
use super::*;
use crate::proto::type_url::{ADDRESS, AUTHORIZATION, DESTINATION_RULE};

/// A client running as a task, with what the test watches.
struct Running {
    status: watch::Receiver<XdsStatus>,
    applied: mpsc::UnboundedReceiver<String>,
    registry: Registry,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<TestSink>,
}

impl Running {
    fn start(config: &ControlPlaneConfig, settings: ClientSettings, sink: TestSink) -> Running {
        let metrics = XdsMetrics::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let client = XdsClient::new(config, "node-a", settings).with_metrics(metrics);
        let status = client.status();
        let (applied_tx, applied) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(client.run(
            sink,
            move |_: &mut TestSink, type_url: &str| {
                let _ = applied_tx.send(type_url.to_string());
            },
            async move {
                let _ = stopped.await;
            },
        ));
        Running {
            status,
            applied,
            registry,
            stop: Some(stop),
            task,
        }
    }

    async fn applied(&mut self) -> String {
        within("an applied response", self.applied.recv())
            .await
            .unwrap()
    }

    fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    async fn stop(mut self) -> TestSink {
        let _ = self.stop.take().unwrap().send(());
        within("the client to stop", self.task).await.unwrap()
    }
}

fn fast() -> ClientSettings {
    ClientSettings {
        backoff_max: Duration::from_millis(200),
        ..ClientSettings::default()
    }
}

fn string_field(node: &Node, key: &str) -> Option<String> {
    let value = node.metadata.as_ref()?.fields.get(key)?;
    match &value.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn the_first_requests_carry_the_node_the_token_and_a_wildcard_per_type() {
    let mut cp = FakeControlPlane::start().await;
    let client = Running::start(&cp.config(cp.addr), fast(), TestSink::default());
    let mut stream = cp.accept().await;
    // The token file ends in "\n": the bearer is the trimmed token.
    assert_eq!(
        stream.metadata.get("authorization").unwrap(),
        "Bearer secret"
    );
    assert_eq!(stream.metadata.get("clusterid").unwrap(), "Kubernetes");
    for expected in [ADDRESS, AUTHORIZATION, DESTINATION_RULE] {
        let request = stream.request().await;
        assert_eq!(request.type_url, expected);
        assert!(request.resource_names_subscribe.is_empty(), "wildcard");
        assert!(request.initial_resource_versions.is_empty(), "first start");
        assert!(request.response_nonce.is_empty() && request.error_detail.is_none());
        let node = request.node.expect("node on each type's first request");
        assert_eq!(
            node.id,
            "ztunnel~1.1.1.1~ztund-node-a.istio-system~istio-system.svc.cluster.local"
        );
        assert!(node.cluster.is_empty() && node.build_version.is_empty());
        for (key, value) in [
            ("NAME", "ztund-node-a"),
            ("NAMESPACE", "istio-system"),
            ("INSTANCE_IPS", "1.1.1.1"),
            ("NODE_NAME", "node-a"),
            ("CLUSTER_ID", "Kubernetes"),
        ] {
            assert_eq!(string_field(&node, key).as_deref(), Some(value), "{key}");
        }
    }
    let mut status = client.status.clone();
    within("connected", status.wait_for(|s| s.connected))
        .await
        .unwrap();
    client.stop().await;
}

#[test]
fn the_node_takes_pod_ip_and_metadata_from_the_config() {
    let mut config = ControlPlaneConfig {
        address: "istiod:15012".into(),
        root_cert: "root.pem".into(),
        token_file: None,
        cluster_id: "east".into(),
        server_name: None,
        pod_name: Some("ztunnel-x1".into()),
        pod_namespace: "kube-system".into(),
        instance_ip: Some("10.0.0.7".parse().unwrap()),
        metadata: Default::default(),
    };
    config.metadata.insert("MESH_ID".into(), "m1".into());
    config
        .metadata
        .insert("CLUSTER_ID".into(), "ignored".into());
    let node = node(&config, "n1");
    assert_eq!(
        node.id,
        "ztunnel~10.0.0.7~ztunnel-x1.kube-system~kube-system.svc.cluster.local"
    );
    assert_eq!(string_field(&node, "MESH_ID").as_deref(), Some("m1"));
    assert_eq!(string_field(&node, "CLUSTER_ID").as_deref(), Some("east"));
    assert_eq!(
        string_field(&node, "INSTANCE_IPS").as_deref(),
        Some("10.0.0.7")
    );
    assert_eq!(node.metadata.unwrap().fields.len(), 6);
}

#[tokio::test]
async fn a_good_response_is_applied_and_acked_and_removals_pass_through() {
    let mut cp = FakeControlPlane::start().await;
    let sink = TestSink::default();
    let mut client = Running::start(&cp.config(cp.addr), fast(), sink.clone());
    let mut stream = cp.accept().await;
    for _ in 0..3 {
        stream.request().await;
    }
    assert_eq!(
        client.status.borrow().pending(),
        vec![ADDRESS, AUTHORIZATION]
    );

    stream.respond(ADDRESS, "n1", &[("w1", "1"), ("w2", "1")], &[]);
    let ack = stream.request().await;
    assert_eq!(
        (ack.type_url.as_str(), ack.response_nonce.as_str()),
        (ADDRESS, "n1")
    );
    assert!(ack.error_detail.is_none() && ack.node.is_none());
    assert_eq!(client.applied().await, ADDRESS);
    assert_eq!(sink.names(ADDRESS), ["w1", "w2"]);
    assert_eq!(client.status.borrow().pending(), vec![AUTHORIZATION]);

    stream.respond(ADDRESS, "n2", &[], &["w1"]);
    let ack = stream.request().await;
    assert_eq!(ack.response_nonce, "n2");
    assert!(ack.error_detail.is_none());
    assert_eq!(sink.names(ADDRESS), ["w2"]);

    stream.respond(AUTHORIZATION, "n3", &[], &[]);
    assert_eq!(stream.request().await.response_nonce, "n3");
    within("readiness", client.status.wait_for(XdsStatus::ready))
        .await
        .unwrap();
    let text = client.metrics_text();
    assert!(text.contains("ztund_xds_connected 1"), "{text}");
    assert!(
        text.contains(&format!("ztund_xds_resources{{url=\"{ADDRESS}\"}} 1")),
        "{text}"
    );
    assert!(
        text.contains(&format!("istio_xds_message_total{{url=\"{ADDRESS}\"}} 2")),
        "{text}"
    );
    client.stop().await;
}

#[tokio::test]
async fn bad_resources_are_nacked_by_name_and_the_good_ones_applied() {
    let mut cp = FakeControlPlane::start().await;
    let sink = TestSink::default();
    let mut client = Running::start(&cp.config(cp.addr), fast(), sink.clone());
    let mut stream = cp.accept().await;
    for _ in 0..3 {
        stream.request().await;
    }
    stream.respond(
        AUTHORIZATION,
        "n1",
        &[("ns/good", "1"), ("bad-one", "1"), ("bad-two", "1")],
        &[],
    );
    let nack = stream.request().await;
    assert_eq!(nack.type_url, AUTHORIZATION);
    assert_eq!(nack.response_nonce, "n1");
    let detail = nack.error_detail.expect("a NACK");
    assert_eq!(detail.code, 3, "INVALID_ARGUMENT");
    assert_eq!(
        detail.message,
        "bad-one: rejected by the test sink; bad-two: rejected by the test sink"
    );
    assert_eq!(client.applied().await, AUTHORIZATION);
    assert_eq!(sink.names(AUTHORIZATION), ["ns/good"]);
    // A NACKed response still counts as the type's first response.
    assert_eq!(client.status.borrow().pending(), vec![ADDRESS]);
    let text = client.metrics_text();
    assert!(
        text.contains(&format!(
            "ztund_xds_nacks_total{{url=\"{AUTHORIZATION}\"}} 1"
        )),
        "{text}"
    );
    client.stop().await;
}

// HARDENING X6
#[tokio::test]
async fn a_response_for_a_type_not_subscribed_is_ignored_without_a_reply() {
    let mut cp = FakeControlPlane::start().await;
    let sink = TestSink::default();
    let settings = ClientSettings {
        types: vec![ADDRESS.into(), AUTHORIZATION.into()],
        ..fast()
    };
    let mut client = Running::start(&cp.config(cp.addr), settings, sink.clone());
    let mut stream = cp.accept().await;
    for expected in [ADDRESS, AUTHORIZATION] {
        assert_eq!(stream.request().await.type_url, expected);
    }
    stream.respond(DESTINATION_RULE, "x", &[("ns/dr", "1")], &[]);
    assert!(
        stream.quiet_for(Duration::from_millis(300)).await,
        "no ACK/NACK for it"
    );
    stream.respond(ADDRESS, "y", &[("w1", "1")], &[]);
    let ack = stream.request().await;
    assert_eq!(ack.response_nonce, "y");
    assert_eq!(client.applied().await, ADDRESS);
    assert!(sink.names(DESTINATION_RULE).is_empty());
    assert!(client.status.borrow().connected, "the stream stays up");
    client.stop().await;
}

#[tokio::test]
async fn after_the_server_ends_the_stream_the_client_resumes_from_the_versions_it_holds() {
    let mut cp = FakeControlPlane::start().await;
    let sink = TestSink::default();
    let mut client = Running::start(&cp.config(cp.addr), fast(), sink.clone());
    let mut stream = cp.accept().await;
    for _ in 0..3 {
        stream.request().await;
    }
    stream.respond(
        ADDRESS,
        "n1",
        &[("a", "v1"), ("b", "v2"), ("bad", "v1")],
        &[],
    );
    assert!(stream.request().await.error_detail.is_some());
    client.applied().await;
    stream.close();

    let mut stream = cp.accept().await;
    let first = stream.request().await;
    assert_eq!(first.type_url, ADDRESS);
    assert!(first.node.is_some());
    let held: HashMap<String, String> = [("a", "v1"), ("b", "v2")]
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .into();
    // The rejected "bad" is not held, so the server resends it.
    assert_eq!(first.initial_resource_versions, held);
    let second = stream.request().await;
    assert_eq!(second.type_url, AUTHORIZATION);
    assert!(second.initial_resource_versions.is_empty());
    // The state was served all along: nothing was dropped on the disconnect.
    assert_eq!(sink.names(ADDRESS), ["a", "b"]);
    let text = client.metrics_text();
    assert!(
        text.contains("istio_xds_connection_terminations_total{reason=\"Complete\"} 1"),
        "{text}"
    );
    client.stop().await;
}

#[tokio::test]
async fn a_refused_token_is_retried_with_doubling_backoff_and_nothing_applied() {
    let cp = FakeControlPlane::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = cp.config(cp.addr);
    let wrong = dir.path().join("token");
    std::fs::write(&wrong, "wrong\n").unwrap();
    config.token_file = Some(wrong);
    let settings = ClientSettings {
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_secs(15),
        ..ClientSettings::default()
    };
    let sink = TestSink::default();
    let client = Running::start(&config, settings, sink.clone());
    let deadline = Instant::now() + Duration::from_secs(5);
    while cp.refusals.lock().unwrap().len() < 5 {
        assert!(Instant::now() < deadline, "the client stopped retrying");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let attempts = cp.refusals.lock().unwrap().clone();
    for (i, pair) in attempts.windows(2).take(4).enumerate() {
        let gap = pair[1] - pair[0];
        let backoff = Duration::from_millis(20) * 2u32.pow(i as u32);
        assert!(gap >= backoff, "gap {i} was {gap:?}, backoff {backoff:?}");
    }
    let status = client.status.borrow().clone();
    assert!(!status.connected);
    assert_eq!(status.pending(), vec![ADDRESS, AUTHORIZATION]);
    assert!(sink.names(ADDRESS).is_empty() && sink.names(AUTHORIZATION).is_empty());
    let text = client.metrics_text();
    assert!(text.contains("ztund_xds_connected 0"), "{text}");
    assert!(
        text.contains("istio_xds_connection_terminations_total{reason=\"Error\"}"),
        "{text}"
    );
    client.stop().await;
}

#[tokio::test]
async fn a_control_plane_gone_silent_is_found_by_keepalive_and_reconnected() {
    let mut cp = FakeControlPlane::start().await;
    let relay = Relay::start(cp.addr).await;
    let settings = ClientSettings {
        keepalive_interval: Duration::from_millis(200),
        keepalive_timeout: Duration::from_millis(300),
        ..fast()
    };
    let sink = TestSink::default();
    let mut client = Running::start(&cp.config(relay.addr), settings, sink.clone());
    let mut stream = cp.accept().await;
    for _ in 0..3 {
        stream.request().await;
    }
    stream.respond(ADDRESS, "n1", &[("w1", "7")], &[]);
    assert_eq!(stream.request().await.response_nonce, "n1");
    client.applied().await;

    relay.freeze();
    let frozen_at = Instant::now();
    let mut fresh = cp.accept().await;
    let first = fresh.request().await;
    let took = frozen_at.elapsed();
    assert!(took < Duration::from_secs(2), "reconnected after {took:?}");
    assert_eq!(first.type_url, ADDRESS);
    assert_eq!(
        first
            .initial_resource_versions
            .get("w1")
            .map(String::as_str),
        Some("7")
    );
    assert_eq!(
        sink.names(ADDRESS),
        ["w1"],
        "kept serving while disconnected"
    );
    let text = client.metrics_text();
    assert!(
        text.contains("istio_xds_connection_terminations_total{reason=\"Error\"} 1"),
        "{text}"
    );
    drop(stream);
    client.stop().await;
}

#[test]
fn backoff_doubles_to_its_cap_and_resets() {
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
    let delays: Vec<u64> = (0..5)
        .map(|_| backoff.next_delay().as_millis() as u64)
        .collect();
    assert_eq!(delays, [10, 20, 40, 50, 50]);
    backoff.reset();
    assert_eq!(backoff.next_delay(), Duration::from_millis(10));
}

#[test]
fn reconnect_waits_are_jittered_up_to_half_again() {
    let base = Duration::from_millis(100);
    let waits: Vec<Duration> = (0..200).map(|_| jitter(base)).collect();
    assert!(
        waits
            .iter()
            .all(|w| *w >= base && *w < base + base / 2 + Duration::from_millis(1)),
        "{waits:?}"
    );
    let distinct: std::collections::BTreeSet<Duration> = waits.iter().copied().collect();
    assert!(distinct.len() > 100, "waits spread out: {}", distinct.len());
}

// HARDENING X8
#[tokio::test]
async fn a_control_plane_answering_unavailable_is_retried_with_backoff_and_the_state_stays_served()
{
    let mut cp = FakeControlPlane::start().await;
    let sink = TestSink::default();
    let settings = ClientSettings {
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(400),
        ..ClientSettings::default()
    };
    let mut client = Running::start(&cp.config(cp.addr), settings, sink.clone());
    let mut stream = cp.accept().await;
    for _ in 0..3 {
        stream.request().await;
    }
    stream.respond(ADDRESS, "n1", &[("w1", "1")], &[]);
    stream.request().await;
    stream.respond(AUTHORIZATION, "n2", &[("ns/p", "1")], &[]);
    stream.request().await;
    within("readiness", client.status.wait_for(XdsStatus::ready))
        .await
        .unwrap();
    client.applied().await;
    stream.fail(tonic::Status::unavailable("istiod restarting"));

    // Every new stream fails at once, as from a control plane that keeps resetting.
    let mut opened = Vec::new();
    for _ in 0..5 {
        let stream = cp.accept().await;
        opened.push(Instant::now());
        stream.fail(tonic::Status::unavailable("istiod restarting"));
        // Readiness is latched and the last state keeps serving throughout.
        assert!(client.status.borrow().ready());
        assert_eq!(sink.names(ADDRESS), ["w1"]);
        assert_eq!(sink.names(AUTHORIZATION), ["ns/p"]);
    }
    // A stream that delivered something reset the backoff; failures before any response
    // double it: 20, 40, 80, 160 ms, each jittered up to half again.
    let gaps: Vec<Duration> = opened.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().enumerate() {
        let nominal = Duration::from_millis(40) * 2u32.pow(i as u32);
        assert!(*gap >= nominal, "gap {i} {gap:?} under {nominal:?}");
        assert!(
            *gap < nominal * 3 / 2 + Duration::from_millis(150),
            "gap {i} {gap:?} over {nominal:?} and its jitter"
        );
    }
    assert!(!client.status.borrow().connected);
    client.stop().await;
}

// HARDENING X4
#[tokio::test]
async fn a_response_over_the_decode_cap_is_refused_and_one_under_it_applied() {
    let mut cp = FakeControlPlane::start().await;
    let sink = TestSink::default();
    let settings = ClientSettings {
        max_message_bytes: 8 << 20,
        ..fast()
    };
    let mut client = Running::start(&cp.config(cp.addr), settings, sink.clone());
    let mut stream = cp.accept().await;
    for _ in 0..3 {
        stream.request().await;
    }
    // Just over the cap: the stream fails, nothing applied, no ACK.
    let over = "o".repeat((8 << 20) + 1);
    stream.respond(ADDRESS, "big", &[(over.as_str(), "1")], &[]);
    let mut stream = cp.accept().await;
    assert!(sink.names(ADDRESS).is_empty());
    for _ in 0..3 {
        stream.request().await;
    }
    // 100 000 resources, about 6 MB encoded, under the 8 MiB cap: all applied and ACKed.
    let names: Vec<String> = (0..100_000).map(|i| format!("w{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    stream.respond(ADDRESS, "many", &many, &[]);
    let ack = stream.request().await;
    assert_eq!(ack.response_nonce, "many");
    assert!(ack.error_detail.is_none());
    assert_eq!(client.applied().await, ADDRESS);
    assert_eq!(sink.names(ADDRESS).len(), 100_000);
    client.stop().await;
}
