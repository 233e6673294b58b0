//! The control plane, measured (issue 11): on the namespace testbed, `ztund controlplane` on
//! node 1 and a real ztund on each of three nodes, all from this build.
//!
//! - **propagation**: a policy file rewritten in the control plane's directory → every node has
//!   applied the update (its "xds update applied" log line after the write), median of 5;
//! - **ready**: a mesh of 10 000 workloads and 1 000 AuthorizationPolicies; a ztund started
//!   against it until its readiness endpoint answers 200 (first ACK of every type and the
//!   node's certificates), median of 3;
//! - **memory**: the node's RSS with that mesh against its RSS with an empty one, per 1 000
//!   workloads;
//! - **csr**: CSRs signed per second by the control plane (8 in flight, P-256, one node's
//!   identity), over a few seconds.
//!
//! `cargo bench --bench controlplane`; `ZTUND_BENCH_QUICK=1` for a smoke run.

#[path = "../tests/support/mod.rs"]
mod support;
#[path = "../tests/testbed/mod.rs"]
mod testbed;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::controlplane::ControlPlane;
use support::{Cluster, Daemon};
use testbed::{Place, Testbed};
use ztund::grpc::{CallAuth, Target};
use ztund::proto::istio::v1::auth::IstioCertificateRequest;
use ztund::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

struct Settings {
    quick: bool,
    runs: usize,
    workloads: usize,
    policies: usize,
    csr_seconds: u64,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = std::env::args().any(|a| a == "--quick")
            || std::env::var("ZTUND_BENCH_QUICK").is_ok_and(|v| v != "0");
        Settings {
            quick,
            runs: if quick { 1 } else { 5 },
            workloads: if quick { 1_000 } else { 10_000 },
            policies: if quick { 100 } else { 1_000 },
            csr_seconds: if quick { 1 } else { 5 },
        }
    }
}

fn main() {
    let settings = Settings::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let propagation = propagation(&settings).await;
        let (ready, memory) = ready_and_memory(&settings).await;
        let csr = csr_rate(&settings).await;
        println!(
            "\ncontrol plane ({}):",
            if settings.quick { "quick" } else { "full" }
        );
        println!(
            "  policy file change → applied on all 3 nodes: median {} ms (runs: {})",
            median(&propagation).as_millis(),
            list(&propagation)
        );
        println!(
            "  ready with {} workloads and {} policies: median {} ms (runs: {})",
            settings.workloads,
            settings.policies,
            median(&ready).as_millis(),
            list(&ready)
        );
        println!(
            "  node memory for the mesh: {:.0} KiB per 1 000 workloads (RSS {} → {} KiB)",
            (memory.1 as f64 - memory.0 as f64) * 1000.0 / settings.workloads as f64,
            memory.0,
            memory.1
        );
        println!("  CSRs signed: {csr:.0} per second (8 in flight)");
    });
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn list(samples: &[Duration]) -> String {
    samples
        .iter()
        .map(|d| d.as_millis().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `count` WorkloadEntries spread over 100 nodes (`node1`..`node100`), the testbed's node
/// addresses first so the first nodes' own workloads are real.
fn workloads_yaml(bed: &Testbed, count: usize) -> String {
    let mut out = String::new();
    for i in 0..count {
        let node = i % 100 + 1;
        let address = if i < bed.nodes() {
            bed.node_ip(i + 1).to_string()
        } else {
            format!("10.{}.{}.{}", 16 + i / 65_536, (i / 256) % 256, i % 256)
        };
        let node_name = if i < bed.nodes() {
            format!("node{}", i + 1)
        } else {
            format!("node{node}")
        };
        out += &format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: w{i}, namespace: ns{ns}, annotations: {{ztund.io/node: {node_name}}}}}\nspec: {{address: \"{address}\", serviceAccount: sa{i}, labels: {{app: w{i}}}}}\n---\n",
            ns = i % 100,
        );
    }
    out
}

fn policies_yaml(count: usize, salt: &str) -> String {
    let mut out = String::new();
    for i in 0..count {
        out += &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}{salt}, namespace: ns{ns}}}\nspec:\n  selector: {{matchLabels: {{app: w{i}}}}}\n  action: DENY\n  rules: [{{from: [{{source: {{principals: [cluster.local/ns/x/sa/y{i}]}}}}]}}]\n---\n",
            ns = i % 100,
        );
    }
    out
}

fn applied(daemon: &Daemon) -> usize {
    daemon.log_lines(&["xds update applied"]).len()
}

async fn three_nodes(bed: &Testbed, cluster: &Cluster, yaml: &str) -> (ControlPlane, Vec<Daemon>) {
    std::fs::create_dir_all(cluster.path("cp")).expect("cp dir");
    std::fs::write(cluster.path("cp/mesh.yaml"), yaml).expect("cp yaml");
    let listen = SocketAddr::new(bed.node_ip(1), 15012);
    let cp = ControlPlane::start(bed, cluster, Place::Node(1), listen).await;
    let mut daemons = Vec::new();
    for n in 1..=bed.nodes() {
        let config = cp.node_config(cluster, &format!("node{n}"), "");
        daemons.push(cluster.start(bed, n, &config).await);
    }
    (cp, daemons)
}

async fn propagation(settings: &Settings) -> Vec<Duration> {
    let bed = Testbed::new(3, 0);
    let cluster = Cluster::new();
    let base = workloads_yaml(&bed, 3);
    let (cp, daemons) = three_nodes(&bed, &cluster, &base).await;
    let mut samples = Vec::new();
    for run in 0..settings.runs {
        let before: Vec<usize> = daemons.iter().map(applied).collect();
        let start = Instant::now();
        cp.write("policy.yaml", &policies_yaml(1, &format!("-{run}")));
        loop {
            let now: Vec<usize> = daemons.iter().map(applied).collect();
            if now.iter().zip(&before).all(|(a, b)| a > b) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the nodes did not apply the change"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    samples
}

async fn ready_and_memory(settings: &Settings) -> (Vec<Duration>, (u64, u64)) {
    let bed = Testbed::new(1, 0);
    let cluster = Cluster::new();
    let yaml = workloads_yaml(&bed, settings.workloads) + &policies_yaml(settings.policies, "");
    std::fs::create_dir_all(cluster.path("cp")).expect("cp dir");
    std::fs::write(cluster.path("cp/mesh.yaml"), workloads_yaml(&bed, 1)).expect("cp yaml");
    let listen = SocketAddr::new(bed.node_ip(1), 15012);
    let cp = ControlPlane::start(&bed, &cluster, Place::Node(1), listen).await;
    let config = cp.node_config(&cluster, "node1", "");
    let small = cluster.start(&bed, 1, &config).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_small = rss_kib(small.pid());
    drop(small);

    cp.write("mesh.yaml", &yaml);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut samples = Vec::new();
    let mut rss_large = 0;
    for _ in 0..settings.runs.min(3) {
        let start = Instant::now();
        let daemon = cluster.start(&bed, 1, &config).await;
        samples.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_large = rss_kib(daemon.pid());
    }
    (samples, (rss_small, rss_large))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn csr_rate(settings: &Settings) -> f64 {
    let bed = Testbed::new(1, 0);
    let cluster = Cluster::new();
    std::fs::create_dir_all(cluster.path("cp")).expect("cp dir");
    std::fs::write(cluster.path("cp/mesh.yaml"), workloads_yaml(&bed, 1)).expect("cp yaml");
    let listen = SocketAddr::new(bed.node_ip(1), 15012);
    let cp = ControlPlane::start(&bed, &cluster, Place::Node(1), listen).await;
    let token = cp.token_file(&cluster, "node1");
    let identity = "spiffe://cluster.local/ns/ns0/sa/sa0";
    // The client runs inside node 1's namespace: a thread entered there builds the channel.
    let target = Target {
        address: format!("https://{listen}"),
        root_cert: cp.root_cert(),
        server_name: None,
    };
    let auth = CallAuth {
        token_file: Some(token),
        cluster_id: "Kubernetes".into(),
    };
    let csrs: Arc<Vec<String>> = Arc::new((0..64).map(|_| csr_pem(identity)).collect());
    let signed = Arc::new(AtomicUsize::new(0));
    // The client's threads live in node 1's namespace, where the control plane listens.
    let netns = bed.netns(Place::Node(1));
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            if let Err(e) = ztund::net::setns(netns.as_fd()) {
                eprintln!("bench: cannot enter node 1: {e}");
                std::process::abort();
            }
        })
        .build()
        .expect("client runtime");
    let seconds = settings.csr_seconds;
    let counter = signed.clone();
    let elapsed = client
        .spawn(async move {
            let channel = target.channel().expect("channel");
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let start = Instant::now();
            let mut tasks = Vec::new();
            for worker in 0..8 {
                let (channel, auth, csrs, signed) =
                    (channel.clone(), auth.clone(), csrs.clone(), counter.clone());
                tasks.push(tokio::spawn(async move {
                    let mut client = IstioCertificateServiceClient::new(channel);
                    let mut i = worker;
                    while Instant::now() < deadline {
                        let mut request = tonic::Request::new(IstioCertificateRequest {
                            csr: csrs[i % csrs.len()].clone(),
                            validity_duration: 3600,
                            metadata: Some(impersonate(identity)),
                        });
                        auth.apply(&mut request).expect("auth metadata");
                        client
                            .create_certificate(request)
                            .await
                            .expect("the control plane signs");
                        signed.fetch_add(1, Ordering::Relaxed);
                        i += 8;
                    }
                }));
            }
            for task in tasks {
                task.await.expect("csr worker");
            }
            start.elapsed()
        })
        .await
        .expect("csr client");
    client.shutdown_background();
    drop(cp);
    signed.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
}

fn impersonate(identity: &str) -> prost_types::Struct {
    prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
            },
        )]
        .into(),
    }
}

/// A P-256 CSR with an empty subject and the one URI SAN, as a node proxy sends it.
fn csr_pem(identity: &str) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into().expect("a URI"))];
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}
