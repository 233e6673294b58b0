//! Behaviour of the metrics text and of the three servers over real loopback sockets, spoken
//! to with raw HTTP/1.1 so the tests depend on nothing but the wire format.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::*;
use crate::config::LogFormat;

/// One sample of the exposition: metric name, labels and value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the sample lines of Prometheus/OpenMetrics text, honouring quotes and escapes.
fn parse_samples(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, rest) = match line.find('{') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => {
                let (name, value) = line.split_once(' ').expect("sample has a value");
                samples.push(Sample {
                    name: name.into(),
                    labels: BTreeMap::new(),
                    value: value.trim().parse().expect("numeric value"),
                });
                continue;
            }
        };
        let mut labels = BTreeMap::new();
        let mut chars = rest.chars();
        loop {
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            assert_eq!(
                chars.next(),
                Some('"'),
                "label value opens with a quote: {line}"
            );
            let mut value = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.push(chars.next().expect("escape")),
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key.trim_start_matches(',').to_string(), value);
            let remaining = chars.as_str();
            if remaining.starts_with('}') {
                break;
            }
        }
        let value = chars.as_str().trim_start_matches('}').trim();
        samples.push(Sample {
            name: name.into(),
            labels,
            value: value.parse().expect("numeric value"),
        });
    }
    samples
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

fn outbound_labels() -> TrafficLabels {
    TrafficLabels {
        source_workload: "client".into(),
        source_workload_namespace: "apps".into(),
        source_principal: "spiffe://cluster.local/ns/apps/sa/client".into(),
        source_app: "client".into(),
        destination_workload: "server".into(),
        destination_workload_namespace: "apps".into(),
        destination_principal: "spiffe://cluster.local/ns/apps/sa/server".into(),
        destination_service: "server.apps.svc.cluster.local".into(),
        destination_service_namespace: "apps".into(),
        destination_service_name: "server".into(),
        connection_security_policy: SecurityPolicy::MutualTls,
        ..TrafficLabels::new(Reporter::Source)
    }
}

#[test]
fn traffic_metrics_carry_istio_labels_and_count_bytes() {
    let metrics = Metrics::new();
    let labels = outbound_labels();
    metrics.connection_opened(&labels);
    metrics.add_bytes(&labels, 100, 40);
    metrics.connection_closed(&labels, 20, 2);
    let denied = TrafficLabels::new(Reporter::Destination);
    metrics.connection_opened(&denied);
    metrics.connection_closed(
        &denied.clone().with_response_flags(ResponseFlags::Deny),
        0,
        0,
    );

    let samples = parse_samples(&metrics.encode(false));
    let opened = find(
        &samples,
        "istio_tcp_connections_opened_total",
        &[("reporter", "source")],
    )
    .expect("opened counter");
    assert_eq!(opened.value, 1.0);
    let expected = [
        ("source_workload", "client"),
        ("source_workload_namespace", "apps"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/apps/sa/client",
        ),
        ("source_app", "client"),
        ("source_canonical_service", "unknown"),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "apps"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/apps/sa/server",
        ),
        ("destination_service", "server.apps.svc.cluster.local"),
        ("destination_service_namespace", "apps"),
        ("destination_service_name", "server"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ];
    for (key, value) in expected {
        assert_eq!(
            opened.labels.get(key).map(String::as_str),
            Some(value),
            "label {key}"
        );
    }
    let source = [("reporter", "source")];
    let value = |name: &str, labels: &[(&str, &str)]| find(&samples, name, labels).map(|s| s.value);
    assert_eq!(
        value("istio_tcp_received_bytes_total", &source),
        Some(120.0)
    );
    assert_eq!(value("istio_tcp_sent_bytes_total", &source), Some(42.0));
    assert_eq!(
        value("istio_tcp_connections_closed_total", &source),
        Some(1.0)
    );
    assert_eq!(value("istio_tcp_connections_failed_total", &source), None);

    // The denied inbound connection: unknown identities, failure counted under its flags.
    let deny = [("reporter", "destination"), ("response_flags", "DENY")];
    assert_eq!(
        value("istio_tcp_connections_failed_total", &deny),
        Some(1.0)
    );
    assert_eq!(
        value("istio_tcp_connections_closed_total", &deny),
        Some(1.0)
    );
    let failed = find(&samples, "istio_tcp_connections_failed_total", &deny).unwrap();
    assert_eq!(failed.labels["source_principal"], "unknown");
    assert_eq!(failed.labels["connection_security_policy"], "unknown");
    assert_eq!(value("istio_tcp_sockets_open", &source), Some(0.0));
    assert_eq!(
        value(
            "istio_build",
            &[("component", "ztund"), ("tag", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
}

#[test]
fn daemon_and_process_metrics_are_exported() {
    let metrics = Metrics::new();
    metrics.hbone_pool_connection_opened();
    metrics.hbone_pool_connection_opened();
    metrics.hbone_pool_connection_closed();
    metrics.mesh_reload(ReloadResult::Applied);
    metrics.mesh_reload(ReloadResult::Rejected);
    metrics.mesh_reload(ReloadResult::Rejected);
    metrics.policy_denial("apps/deny-\"all\"");
    metrics.proxy_started();
    metrics.proxy_started();
    metrics.proxy_stopped();

    let samples = parse_samples(&metrics.encode(false));
    let value = |name: &str, labels: &[(&str, &str)]| find(&samples, name, labels).map(|s| s.value);
    assert_eq!(value("ztund_hbone_pool_connections", &[]), Some(1.0));
    assert_eq!(
        value("ztund_mesh_reloads_total", &[("result", "applied")]),
        Some(1.0)
    );
    assert_eq!(
        value("ztund_mesh_reloads_total", &[("result", "rejected")]),
        Some(2.0)
    );
    assert_eq!(
        value(
            "ztund_policy_denials_total",
            &[("policy", "apps/deny-\"all\"")]
        ),
        Some(1.0)
    );
    assert_eq!(value("workload_manager_active_proxy_count", &[]), Some(1.0));
    assert_eq!(
        value("workload_manager_proxies_started_total", &[]),
        Some(2.0)
    );
    assert_eq!(
        value("workload_manager_proxies_stopped_total", &[]),
        Some(1.0)
    );
    assert!(value("process_open_fds", &[]).unwrap_or(0.0) >= 3.0);
    assert!(value("process_resident_memory_bytes", &[]).unwrap_or(0.0) > 1_000_000.0);
    assert!(value("process_cpu_seconds_total", &[]).is_some());
}

#[test]
fn text_formats_differ_only_where_the_formats_do() {
    let metrics = Metrics::new();
    metrics.connection_opened(&outbound_labels());
    let prometheus = metrics.encode(false);
    let openmetrics = metrics.encode(true);
    assert!(openmetrics.ends_with("# EOF\n"));
    assert!(!prometheus.contains("# EOF"));
    // In 0.0.4 text the counter's TYPE names the sample itself, suffix included.
    assert!(prometheus.contains("# TYPE istio_tcp_connections_opened_total counter\n"));
    assert!(prometheus.contains("# HELP istio_tcp_connections_opened_total "));
    assert!(openmetrics.contains("# TYPE istio_tcp_connections_opened counter\n"));
    assert_eq!(
        parse_samples(&prometheus).len(),
        parse_samples(&openmetrics).len()
    );
}

/// A response as read off the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

async fn http(addr: SocketAddr, method: &str, target: &str, extra: &[(&str, &str)]) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
        .await
        .expect("response within 5 s")
        .expect("read");
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.lines();
    let status = lines
        .next()
        .expect("status line")
        .split(' ')
        .nth(1)
        .expect("code");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status: status.parse().expect("numeric status"),
        headers,
        body: body.to_string(),
    }
}

struct Running {
    addr: SocketAddr,
    drain: watch::Sender<bool>,
    task: JoinHandle<()>,
}

async fn loopback() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

async fn start_admin(state: AdminState) -> Running {
    let (listener, addr) = loopback().await;
    let (drain, rx) = watch::channel(false);
    let task = tokio::spawn(serve_admin(listener, state, rx));
    Running { addr, drain, task }
}

/// The admin state, the shutdown receiver, and the log control with its subscriber (which must
/// stay alive for level changes to apply).
type AdminFixture = (
    AdminState,
    watch::Receiver<bool>,
    (
        crate::logging::LogControl,
        Box<dyn tracing::Subscriber + Send + Sync>,
    ),
);

fn admin_state(dump: serde_json::Value) -> AdminFixture {
    let (subscriber, log, _) = crate::logging::build(LogFormat::Text, "info", std::io::sink, false);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let state = AdminState {
        metrics: Metrics::new(),
        config_dump: Arc::new(move || dump.clone()),
        log: log.clone(),
        shutdown: Arc::new(shutdown),
    };
    (state, shutdown_rx, (log, Box::new(subscriber)))
}

#[tokio::test]
async fn readiness_turns_200_when_the_last_task_is_ready() {
    let readiness = Readiness::new();
    let proxy = readiness.register("proxy");
    let state = readiness.register("state manager");
    let (listener, addr) = loopback().await;
    let (_drain, rx) = watch::channel(false);
    tokio::spawn(serve_readiness(listener, readiness.clone(), rx));

    let reply = http(addr, "GET", "/healthz/ready", &[]).await;
    assert_eq!(reply.status, 500);
    assert_eq!(reply.body, "not ready, pending: proxy, state manager\n");
    proxy.ready();
    let reply = http(addr, "GET", "/healthz/ready", &[]).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (500, "not ready, pending: state manager\n")
    );
    state.ready();
    let reply = http(addr, "GET", "/healthz/ready", &[]).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ready\n"));
    assert_eq!(http(addr, "POST", "/healthz/ready", &[]).await.status, 405);
    assert_eq!(http(addr, "GET", "/other", &[]).await.status, 404);
}

#[tokio::test]
async fn metrics_server_negotiates_the_format() {
    let metrics = Metrics::new();
    metrics.connection_opened(&outbound_labels());
    let (listener, addr) = loopback().await;
    let (_drain, rx) = watch::channel(false);
    tokio::spawn(serve_metrics(listener, metrics, rx));

    for path in ["/metrics", "/stats/prometheus"] {
        let reply = http(addr, "GET", path, &[]).await;
        assert_eq!(reply.status, 200, "{path}");
        assert!(reply.headers["content-type"].starts_with("text/plain; version=0.0.4"));
        assert!(
            reply
                .body
                .contains("istio_tcp_connections_opened_total{reporter=\"source\"")
        );
        assert!(!reply.body.contains("# EOF"));
    }
    let accept = [(
        "Accept",
        "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
    )];
    let reply = http(addr, "GET", "/metrics", &accept).await;
    assert!(reply.headers["content-type"].starts_with("application/openmetrics-text"));
    assert!(reply.body.ends_with("# EOF\n"));
    assert_eq!(http(addr, "POST", "/metrics", &[]).await.status, 405);
    assert_eq!(http(addr, "GET", "/", &[]).await.status, 404);
}

#[tokio::test]
async fn admin_binds_loopback_only() {
    let listeners = bind_admin(0).await.expect("bind admin");
    assert!(!listeners.is_empty());
    let port = listeners[0].local_addr().unwrap().port();
    for listener in &listeners {
        let addr = listener.local_addr().unwrap();
        assert!(addr.ip().is_loopback(), "{addr} is not loopback");
        assert_eq!(addr.port(), port);
    }
    assert!(listeners[0].local_addr().unwrap().is_ipv4());
}

#[tokio::test]
async fn quitquitquit_needs_post_and_fires_shutdown() {
    let (state, mut shutdown, _log) = admin_state(serde_json::json!({}));
    let admin = start_admin(state).await;
    let reply = http(admin.addr, "GET", "/quitquitquit", &[]).await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.headers["allow"], "POST");
    assert!(!*shutdown.borrow_and_update());
    assert_eq!(
        http(admin.addr, "POST", "/quitquitquit", &[]).await.status,
        200
    );
    tokio::time::timeout(Duration::from_secs(2), shutdown.wait_for(|quit| *quit))
        .await
        .expect("shutdown signalled")
        .expect("sender alive");
}

#[tokio::test]
async fn logging_shows_changes_and_resets_levels() {
    let (state, _shutdown, (log, _subscriber)) = admin_state(serde_json::json!({}));
    let admin = start_admin(state).await;
    assert_eq!(
        http(admin.addr, "GET", "/logging?level=debug", &[])
            .await
            .status,
        405
    );
    assert_eq!(log.current(), "info");

    let reply = http(admin.addr, "POST", "/logging", &[]).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "current log level is info\n")
    );
    let reply = http(admin.addr, "POST", "/logging?level=debug", &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(log.current(), "debug");
    let encoded = "/logging?level=ztund%3A%3Aproxy%3Dtrace,access=off";
    assert_eq!(http(admin.addr, "POST", encoded, &[]).await.status, 200);
    assert_eq!(log.current(), "debug,access=off,ztund::proxy=trace");

    let reply = http(admin.addr, "POST", "/logging?level=loud", &[]).await;
    assert_eq!(reply.status, 400);
    assert!(
        reply.body.contains("unknown level `loud`"),
        "{}",
        reply.body
    );
    assert_eq!(log.current(), "debug,access=off,ztund::proxy=trace");

    let reply = http(admin.addr, "POST", "/logging?reset", &[]).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "current log level is info\n")
    );
    assert_eq!(log.current(), "info");
}

#[tokio::test]
async fn config_dump_and_metrics_aliases() {
    let dump = serde_json::json!({"workloads": [{"name": "server", "namespace": "apps"}], "version": "test"});
    let (state, _shutdown, _log) = admin_state(dump.clone());
    state.metrics.mesh_reload(ReloadResult::Applied);
    let admin = start_admin(state).await;

    let reply = http(admin.addr, "GET", "/config_dump", &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON body");
    assert_eq!(body, dump);
    for path in ["/stats", "/metrics"] {
        let reply = http(admin.addr, "GET", path, &[]).await;
        assert!(
            reply
                .body
                .contains("ztund_mesh_reloads_total{result=\"applied\"} 1"),
            "{path}"
        );
    }
    let index = http(admin.addr, "GET", "/", &[]).await;
    assert!(index.body.contains("/config_dump"));
    assert_eq!(
        http(admin.addr, "POST", "/config_dump", &[]).await.status,
        405
    );
    assert_eq!(http(admin.addr, "GET", "/nothing", &[]).await.status, 404);
}

#[tokio::test]
async fn servers_stop_accepting_on_drain_even_with_idle_connections() {
    let (state, _shutdown, _log) = admin_state(serde_json::json!({}));
    let admin = start_admin(state).await;
    let (listener, metrics_addr) = loopback().await;
    let (metrics_drain, rx) = watch::channel(false);
    let metrics_task = tokio::spawn(serve_metrics(listener, Metrics::new(), rx));
    let (listener, ready_addr) = loopback().await;
    let (ready_drain, rx) = watch::channel(false);
    let ready_task = tokio::spawn(serve_readiness(listener, Readiness::new(), rx));
    assert_eq!(
        http(ready_addr, "GET", "/healthz/ready", &[]).await.status,
        200
    );

    // An idle client must not hold the server open past the drain.
    let mut idle = TcpStream::connect(admin.addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(50)).await;

    for (drain, task) in [
        (admin.drain, admin.task),
        (metrics_drain, metrics_task),
        (ready_drain, ready_task),
    ] {
        drain.send_replace(true);
        tokio::time::timeout(Duration::from_millis(900), task)
            .await
            .expect("server stops within the drain grace")
            .expect("server task did not panic");
    }
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "idle connection closed: {read:?}"
    );
    for addr in [admin.addr, metrics_addr, ready_addr] {
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "{addr} still accepts"
        );
    }
}
