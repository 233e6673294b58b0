//! Mesh lookups with 100 000 workloads: what the data path asks the snapshot for on every new
//! connection (workload by IP, service by VIP, the outbound plan, the node-mode source lookup)
//! must cost what a hash lookup costs, not what a scan of the mesh costs. Also times building
//! the snapshot, which every mesh update pays once.
//!
//! The mesh: 100 000 workloads in 1 000 namespaces on 1 000 nodes (100 per node), and 10 000
//! services (VIPs in 10.96/12) each backed by 10 workload addresses.
//!
//! Measured (release, 2 shared vCPUs, `cargo bench --bench mesh`): workload by IP 32 ns, miss
//! 15 ns, service by VIP 14 ns, by hostname 86 ns; outbound plan to a workload 0.78 µs, to a
//! VIP 2.2 µs (identity strings and the endpoint key are built per call); node-mode source by
//! IP 0.70 µs; **node-mode source for a loopback client 680 µs** — a scan of all 100 000
//! workloads per connection (`Snapshot::local_workloads`); Snapshot::build 67 ms.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{Criterion, criterion_group, criterion_main};
use ztund::mesh::{
    Endpoints, HealthStatus, Service, ServicePort, Snapshot, TunnelProtocol, Workload,
};
use ztund::net::SocketFactory;
use ztund::policy::PolicySet;
use ztund::proxy::context::{Owner, Scope};
use ztund::proxy::route;

const WORKLOADS: u32 = 100_000;
const SERVICES: u32 = 10_000;
const PER_NODE: u32 = 100;

fn workload_ip(i: u32) -> IpAddr {
    // 10.16.0.0/12 holds 1 M addresses; skip .0 of each /24 for realism.
    let n = i + 1 + i / 255;
    IpAddr::V4(Ipv4Addr::from(0x0a10_0000 + n))
}

fn service_vip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i + 1))
}

fn workloads() -> Vec<Workload> {
    (0..WORKLOADS)
        .map(|i| {
            let ns = format!("ns-{}", i % 1_000);
            Workload {
                uid: format!("Kubernetes//Pod/{ns}/pod-{i}"),
                name: format!("pod-{i}"),
                namespace: ns,
                service_account: format!("sa-{}", i % 7),
                trust_domain: "cluster.local".into(),
                labels: [("app".to_string(), format!("app-{}", i % 10))].into(),
                addresses: vec![workload_ip(i)],
                node: format!("node-{}", i / PER_NODE),
                tunnel: TunnelProtocol::Hbone,
                status: HealthStatus::Healthy,
                netns: None,
                creation_timestamp: None,
                authorization_policies: Vec::new(),
                service_ports: Default::default(),
                identity_cache: Default::default(),
            }
        })
        .collect()
}

fn services() -> Vec<Service> {
    (0..SERVICES)
        .map(|i| {
            let ns = format!("ns-{}", i % 1_000);
            Service {
                name: format!("svc-{i}"),
                hostname: format!("svc-{i}.{ns}.svc.cluster.local"),
                namespace: ns,
                vips: vec![service_vip(i)],
                ports: vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: 8080,
                }],
                endpoints: Endpoints::Addresses(
                    (0..10)
                        .map(|k| workload_ip((i * 10 + k) % WORKLOADS))
                        .collect(),
                ),
                subject_alt_names: Vec::new(),
                external: false,
            }
        })
        .collect()
}

fn snapshot() -> Snapshot {
    Snapshot::build(workloads(), services(), PolicySet::default())
}

fn lookups(c: &mut Criterion) {
    let snapshot = snapshot();
    let mut group = c.benchmark_group("mesh, 100k workloads");
    let mut i = 0u32;
    group.bench_function("workload by IP (hit)", |b| {
        b.iter(|| {
            i = (i + 7_919) % WORKLOADS;
            black_box(snapshot.workload_by_ip(black_box(workload_ip(i))))
        })
    });
    group.bench_function("workload by IP (miss)", |b| {
        let outside = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        b.iter(|| black_box(snapshot.workload_by_ip(black_box(outside))))
    });
    group.bench_function("service by VIP", |b| {
        b.iter(|| {
            i = (i + 7_919) % SERVICES;
            black_box(snapshot.service_by_vip(black_box(service_vip(i))))
        })
    });
    group.bench_function("service by hostname", |b| {
        let names: Vec<String> = (0..SERVICES)
            .map(|i| format!("svc-{i}.ns-{}.svc.cluster.local", i % 1_000))
            .collect();
        b.iter(|| {
            i = (i + 7_919) % SERVICES;
            black_box(snapshot.service_by_hostname(&names[i as usize], "ns-1"))
        })
    });
    group.bench_function("outbound plan to a workload IP", |b| {
        b.iter(|| {
            i = (i + 7_919) % WORKLOADS;
            let destination = SocketAddr::new(workload_ip(i), 8080);
            black_box(route::plan(
                &snapshot,
                Some("default"),
                black_box(destination),
                15008,
            ))
        })
    });
    group.bench_function("outbound plan to a service VIP", |b| {
        b.iter(|| {
            i = (i + 7_919) % SERVICES;
            let destination = SocketAddr::new(service_vip(i), 80);
            black_box(route::plan(
                &snapshot,
                Some("default"),
                black_box(destination),
                15008,
            ))
        })
    });
    let node = Scope {
        owner: Owner::Node,
        sockets: SocketFactory::default(),
    };
    group.bench_function("node-mode source workload (by IP)", |b| {
        b.iter(|| {
            i = (i + 7_919) % WORKLOADS;
            let home = format!("node-{}", i / PER_NODE);
            black_box(node.source_workload(&snapshot, &home, black_box(workload_ip(i))))
        })
    });
    group.bench_function("node-mode source workload (loopback)", |b| {
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        b.iter(|| black_box(node.source_workload(&snapshot, "node-500", black_box(loopback))))
    });
    group.finish();
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("mesh, 100k workloads");
    group.sample_size(10);
    group.bench_function("Snapshot::build", |b| {
        b.iter_batched(
            || (workloads(), services()),
            |(w, s)| black_box(Snapshot::build(w, s, PolicySet::default())),
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, lookups, build);
criterion_main!(benches);
