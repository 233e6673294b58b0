//! The paths users run (issue 16, item 1): traffic that enters ztund through transparent
//! capture, against the same traffic without ztund, in the same run.
//!
//! Three worlds (support/capture_worlds.rs), each two testbed nodes with a ztund on each:
//! - `inpod`: pod (1,1) → pod (2,1), both captured in standalone mode (nftables redirect inside
//!   the pod to ztund's in-pod listener, HBONE to the peer's in-pod 15008), against
//!   pod (1,2) → pod (2,2), not captured, over the same veths and bridge;
//! - `inpod-ebpf` (issue 13, item 7): the same, captured by the eBPF programs
//!   (`captureBackend: ebpf`); every pod has a sandbox cgroup, and the servers and load tools
//!   run in their pod's cgroup, as a pod's containers do;
//! - host: a VM host's own processes (`capture: host`): node 1 → node 2's address (a mesh
//!   workload), against node 1 → pod (2,1) (no mesh member: not redirected).
//!
//! Node mode (SOCKS5) has no place in these worlds, as the tools below cannot speak SOCKS5:
//! `cargo bench --bench dataplane` measures it.
//!
//! Cases, with real servers and load generators (Debian packages nginx-light, wrk, iperf3,
//! sockperf): one iperf3 stream (Gbit/s, both daemons' CPU per GB); sockperf 1 KiB ping-pong at
//! the maximum rate and at 1 000 messages/s (p50, p99, p99.9 over every message: 10 000 samples
//! in 10 s, so p99 rests on 100 of them); HTTP/1.1 with wrk -c4 against nginx answering 1 KiB,
//! keep-alive and `Connection: close` (a new tunneled connection per request), with both
//! daemons' CPU per 1 000 requests, and the conntrack entries the client and server pods gained
//! under the `Connection: close` load (`nf_conntrack_count` of each netns). Once per world, on
//! fresh daemons: a burst of connections held open, then closed, with both daemons' RSS for
//! `settle` seconds after (item 5; in `inpod-ebpf` from sockets of the client pod's cgroup).
//!
//! The `hop` case (issue 13, item 7: the app↔ztund hop alone), in the in-pod worlds only: the
//! captured pod (1,1) calls pod (2,2), which is no mesh workload, so node 1's ztund passes the
//! connection through as plain TCP (app → capture → 15001 → ztund dials the server; no HBONE,
//! node 2's ztund idle), against the uncaptured pod (1,2) calling the same server. wrk
//! `Connection: close` req/s with both daemons' CPU per 1 000 connections and the conntrack
//! entries added, and 1 KiB ping-pong p50/p99 at 1 000 messages/s; rows `capture hop only (no
//! HBONE): …`. The host world has no such route (host capture redirects mesh destinations only).
//!
//! Every figure is the median of the runs with min and max; ratios are taken within each run
//! and direct and ztund alternate which goes first. Prints a table per world, the targets of
//! issue 16, and this run against the last (`target/capture-<world>.json`, then overwritten).
//!
//! `cargo bench --bench capture` (root). Settings, from the environment:
//! `ZTUND_BENCH_QUICK=1`: 1 run, 1 s per case, no burst (tests/memory_after_burst.rs checks
//! that in CI): ~40 s.
//! `ZTUND_BENCH_RUNS` (3; 0: the burst only), `ZTUND_BENCH_SECONDS` (10), `ZTUND_BENCH_BURST` (5 000),
//! `ZTUND_BENCH_SETTLE` (30 s), `ZTUND_BENCH_WORLDS` (inpod,host; also
//! inpod-ebpf: `inpod,inpod-ebpf` puts the two capture backends side by side),
//! `ZTUND_BENCH_AFTER=PATH`: measure that ztund binary instead of the one cargo built.
//! `ZTUND_BENCH_CASES` (all): a comma list of bulk, pingpong, latency, keepalive, close, hop, to
//! run only those (an A/B of one change need not pay for the cases it cannot move).

#[path = "../tests/support/mod.rs"]
mod support;
#[path = "../tests/testbed/mod.rs"]
mod testbed;

#[path = "support/burst.rs"]
mod burst;
#[allow(dead_code)]
#[path = "support/report.rs"]
mod report;
#[path = "support/tools.rs"]
mod tools;
#[path = "support/capture_worlds.rs"]
mod worlds;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use report::{Column, Results, Target};
use support::pods::Backend;
use worlds::{Route, World};

const FIXED_RATE: u32 = 1_000;

struct Settings {
    runs: usize,
    seconds: Duration,
    burst: usize,
    settle: Duration,
    worlds: Vec<String>,
    cases: Vec<String>,
    quick: bool,
    ztund: PathBuf,
}

/// Every case, in the order they run.
const CASES: [&str; 6] = ["bulk", "pingpong", "latency", "keepalive", "close", "hop"];

impl Settings {
    fn runs_case(&self, case: &str) -> bool {
        self.cases.iter().any(|c| c == case)
    }

    fn from_env() -> Settings {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let number = |name: &str, default: usize| {
            env(name).map_or(default, |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
            })
        };
        let quick = env("ZTUND_BENCH_QUICK").is_some_and(|v| v != "0");
        let seconds = |name, normal, quick_value| {
            Duration::from_secs(number(name, if quick { quick_value } else { normal }) as u64)
        };
        Settings {
            runs: number("ZTUND_BENCH_RUNS", if quick { 1 } else { 3 }),
            seconds: seconds("ZTUND_BENCH_SECONDS", 10, 1).max(Duration::from_secs(1)),
            burst: number("ZTUND_BENCH_BURST", if quick { 0 } else { 5_000 }),
            settle: seconds("ZTUND_BENCH_SETTLE", 30, 30),
            worlds: env("ZTUND_BENCH_WORLDS")
                .unwrap_or_else(|| "inpod,host".into())
                .split(',')
                .map(|w| w.trim().to_string())
                .collect(),
            cases: env("ZTUND_BENCH_CASES")
                .unwrap_or_else(|| CASES.join(","))
                .split(',')
                .map(|c| {
                    let c = c.trim();
                    assert!(
                        CASES.contains(&c),
                        "ZTUND_BENCH_CASES: unknown case {c} ({CASES:?})"
                    );
                    c.to_string()
                })
                .collect(),
            quick,
            ztund: env("ZTUND_BENCH_AFTER")
                .map_or_else(|| PathBuf::from(support::ztund_bin()), PathBuf::from),
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tools::check_installed();
    raise_open_files();
    let settings = Settings::from_env();
    eprintln!(
        "capture: {} run(s), {:?} per case, burst {}, settle {:?}, worlds {:?}{}",
        settings.runs,
        settings.seconds,
        settings.burst,
        settings.settle,
        settings.worlds,
        if settings.quick { " (quick)" } else { "" }
    );
    for name in settings.worlds.clone() {
        let world = match name.as_str() {
            "inpod" => worlds::inpod_world(&settings.ztund, Backend::Nftables).await,
            "inpod-ebpf" => worlds::inpod_world(&settings.ztund, Backend::Ebpf).await,
            "host" => worlds::host_world(&settings.ztund).await,
            other => panic!("ZTUND_BENCH_WORLDS: unknown world {other} (inpod, inpod-ebpf, host)"),
        };
        let mut results = Results::default();
        // Fresh daemons: the burst first, so its idle RSS is a daemon that carried nothing.
        memory_after_burst(&world, &settings, &mut results).await;
        worlds::wait_for_servers(&world);
        if settings.runs_case("hop") && world.hop.is_none() {
            eprintln!(
                "capture: {}: no `hop` case (host capture redirects mesh destinations only)",
                world.name
            );
        }
        for run in 0..settings.runs {
            let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
            one_run(&world, &settings, order, &mut results);
            eprintln!(
                "capture: {}: run {} of {} done",
                world.name,
                run + 1,
                settings.runs
            );
        }
        report(&world, &settings, &results);
    }
}

fn one_run(world: &World, s: &Settings, order: [usize; 2], results: &mut Results) {
    let time = s.seconds;
    if s.runs_case("bulk") {
        bulk(world, time, order, results);
    }
    if s.runs_case("pingpong") {
        ping_pong(world, time, order, results);
    }
    if s.runs_case("latency") {
        latency(world, time, order, results);
    }
    for (case, close) in [("keepalive", false), ("close", true)] {
        if s.runs_case(case) {
            http(world, time, order, close, results);
        }
    }
    if let Some(hop) = world.hop.filter(|_| s.runs_case("hop")) {
        hop_only(world, [world.routes[0], hop], time, order, results);
    }
}

fn bulk(world: &World, time: Duration, order: [usize; 2], results: &mut Results) {
    let mut gbps = [0.0; 2];
    let mut cpu_per_gb = 0.0;
    for path in order {
        let route = world.routes[path];
        let (bulk, cpu) =
            world.with_cpu(|| tools::iperf3(&world.bed, route.client, route.server, time));
        gbps[path] = bulk.gbit_per_second;
        if path == 1 {
            cpu_per_gb = cpu / (bulk.bytes / 1e9);
        }
    }
    results.pair("throughput, 1 stream", "Gbit/s", gbps[0], gbps[1]);
    results.ztund("CPU per GB, both daemons", "core-s/GB", cpu_per_gb);
}

fn ping_pong(world: &World, time: Duration, order: [usize; 2], results: &mut Results) {
    let mut max = [0.0; 2];
    for path in order {
        let route = world.routes[path];
        max[path] = tools::sockperf(&world.bed, route.client, route.server, time, None).per_second;
    }
    results.pair("ping-pong 1 KiB, max rate", "msg/s", max[0], max[1]);
}

fn latency(world: &World, time: Duration, order: [usize; 2], results: &mut Results) {
    let fixed = fixed_rate(world, world.routes, time, order);
    results.pair("p50 @1000/s", "µs", fixed[0][0], fixed[1][0]);
    results.pair("p99 @1000/s", "µs", fixed[0][1], fixed[1][1]);
    results.pair("p99.9 @1000/s", "µs", fixed[0][2], fixed[1][2]);
    results.ztund("added p99 @1000/s", "µs", fixed[1][1] - fixed[0][1]);
}

/// p50, p99 and p99.9 (µs) of 1 KiB ping-pong at [`FIXED_RATE`] on each of `routes`.
fn fixed_rate(
    world: &World,
    routes: [Route; 2],
    time: Duration,
    order: [usize; 2],
) -> [[f64; 3]; 2] {
    let mut fixed = [[0.0; 3]; 2];
    for path in order {
        let route = routes[path];
        let p = tools::sockperf(
            &world.bed,
            route.client,
            route.server,
            time,
            Some(FIXED_RATE),
        );
        fixed[path] = [p.p50, p.p99, p.p999];
    }
    fixed
}

fn http(world: &World, time: Duration, order: [usize; 2], close: bool, results: &mut Results) {
    let (rate, cpu_per_1000, conntrack) = http_pair(world, world.routes, time, order, close);
    if close {
        results.pair("HTTP Connection: close", "req/s", rate[0], rate[1]);
        results.ztund("CPU per 1000 conns, both", "core-ms", cpu_per_1000);
        results.pair(
            "conntrack entries added, close",
            "entries",
            conntrack[0],
            conntrack[1],
        );
    } else {
        results.pair("HTTP keep-alive, wrk -c4", "req/s", rate[0], rate[1]);
        results.ztund("CPU per 1000 req keep-alive", "core-ms", cpu_per_1000);
    }
}

/// The capture hop alone ([`World::hop`]), against the direct route to the same server: new
/// connections/s and CPU, then the fixed-rate latency. Only node 1's ztund carries anything,
/// so the CPU of both daemons is node 1's hop (and node 2's idle cost).
fn hop_only(world: &World, routes: [Route; 2], time: Duration, order: [usize; 2], r: &mut Results) {
    let (rate, cpu_per_1000, conntrack) = http_pair(world, routes, time, order, true);
    r.pair(
        "capture hop only (no HBONE): HTTP Connection: close",
        "req/s",
        rate[0],
        rate[1],
    );
    r.ztund(
        "capture hop only (no HBONE): CPU per 1000 conns, both",
        "core-ms",
        cpu_per_1000,
    );
    r.pair(
        "capture hop only (no HBONE): conntrack entries added, close",
        "entries",
        conntrack[0],
        conntrack[1],
    );
    let fixed = fixed_rate(world, routes, time, order);
    r.pair(
        "capture hop only (no HBONE): p50 @1000/s",
        "µs",
        fixed[0][0],
        fixed[1][0],
    );
    r.pair(
        "capture hop only (no HBONE): p99 @1000/s",
        "µs",
        fixed[0][1],
        fixed[1][1],
    );
    r.ztund(
        "capture hop only (no HBONE): added p99 @1000/s",
        "µs",
        fixed[1][1] - fixed[0][1],
    );
}

/// wrk on each of `routes` (keep-alive or `close`): req/s per route, both daemons' CPU per
/// 1 000 requests on route 1, and the conntrack entries each route's load added.
fn http_pair(
    world: &World,
    routes: [Route; 2],
    time: Duration,
    order: [usize; 2],
    close: bool,
) -> ([f64; 2], f64, [f64; 2]) {
    let mut rate = [0.0; 2];
    let mut cpu_per_1000 = 0.0;
    let mut conntrack = [0.0; 2];
    for path in order {
        let route = routes[path];
        let ((http, cpu), added) = conntrack_growth(world, route, || {
            world.with_cpu(|| tools::wrk(&world.bed, route.client, route.server, time, close))
        });
        conntrack[path] = added;
        assert!(
            http.errors <= http.requests * 0.001,
            "{}: wrk to {} saw {} errors in {} requests (close: {close})",
            world.name,
            route.server,
            http.errors,
            http.requests
        );
        rate[path] = http.per_second;
        if path == 1 {
            cpu_per_1000 = cpu * 1e3 / (http.requests / 1e3);
        }
        // Closed connections' last packets settle before the next measurement.
        std::thread::sleep(Duration::from_millis(300));
    }
    (rate, cpu_per_1000, conntrack)
}

/// Runs `f` while sampling the conntrack tables of the route's client and server pods every
/// 100 ms: `f`'s result and the most entries they held above their count before `f` began (the
/// connection-rate load's own entries; those of earlier cases linger in TIME_WAIT).
fn conntrack_growth<T: Send>(
    world: &World,
    route: Route,
    f: impl FnOnce() -> T + Send,
) -> (T, f64) {
    let before = world.conntrack_entries(route);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = before;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(world.conntrack_entries(route));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak.max(world.conntrack_entries(route))
        });
        let value = f();
        done.store(true, Ordering::Relaxed);
        let peak = sampler.join().expect("conntrack sampler");
        (value, peak - before)
    })
}

async fn memory_after_burst(world: &World, s: &Settings, results: &mut Results) {
    if s.burst == 0 {
        return;
    }
    let client = world.routes[1].client;
    let b = burst::run(
        || world.connect(client, world.echo),
        world.echo,
        s.burst,
        world.pids(),
        s.settle,
    )
    .await;
    eprintln!(
        "capture: {}: RSS MiB idle {:?}, holding {} {:?}, after: {:?}",
        world.name, b.idle, s.burst, b.held, b.after
    );
    let per = b.per_connection_kib(s.burst);
    results.ztund("RSS idle, node1", "MiB", b.idle[0]);
    results.ztund("RSS idle, node2", "MiB", b.idle[1]);
    results.ztund("RSS holding the burst, node1", "MiB", b.held[0]);
    results.ztund("RSS holding the burst, node2", "MiB", b.held[1]);
    results.ztund("memory per idle conn, worse", "KiB", per[0].max(per[1]));
    if let Some((_, last)) = b.after.last() {
        results.ztund("RSS at settle end, node1", "MiB", last[0]);
        results.ztund("RSS at settle end, node2", "MiB", last[1]);
    }
    results.ztund("RSS at settle end / idle, worse", "x", b.end_over_idle());
    results.ztund(
        "s until both <= 1.5x idle",
        "s",
        b.seconds_until_within(1.5).unwrap_or(f64::INFINITY),
    );
}

const TARGETS: &[Target] = &[
    Target {
        goal: "single stream >= 0.60 of direct",
        metric: "throughput, 1 stream",
        column: Column::Ratio,
        at_least: true,
        bound: 0.6,
    },
    Target {
        goal: "ping-pong max rate >= 0.75 of direct",
        metric: "ping-pong 1 KiB, max rate",
        column: Column::Ratio,
        at_least: true,
        bound: 0.75,
    },
    Target {
        goal: "keep-alive req/s >= 0.45 of direct",
        metric: "HTTP keep-alive, wrk -c4",
        column: Column::Ratio,
        at_least: true,
        bound: 0.45,
    },
    Target {
        goal: "Connection: close req/s >= 0.35 of direct",
        metric: "HTTP Connection: close",
        column: Column::Ratio,
        at_least: true,
        bound: 0.35,
    },
    Target {
        goal: "added p99 at 1000 req/s <= 100 µs",
        metric: "added p99 @1000/s",
        column: Column::Ztund,
        at_least: false,
        bound: 100.0,
    },
    Target {
        goal: "RSS within 1.5x of idle after the burst",
        metric: "RSS at settle end / idle, worse",
        column: Column::Ztund,
        at_least: false,
        bound: 1.5,
    },
    Target {
        goal: "<= 3 KiB per idle tunnel per daemon",
        metric: "memory per idle conn, worse",
        column: Column::Ztund,
        at_least: false,
        bound: 3.0,
    },
];

fn report(world: &World, s: &Settings, results: &Results) {
    let (targets, targets_json) = report::check_targets(results, TARGETS);
    println!(
        "\n== {} capture: {}\n{}\n{targets}",
        world.name,
        s.ztund.display(),
        results.table()
    );
    let json = serde_json::json!({
        "settings": {
            "runs": s.runs, "seconds": s.seconds.as_secs(), "burst": s.burst,
            "settle": s.settle.as_secs(), "quick": s.quick, "world": world.name,
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        },
        "builds": [{
            "build": "this build", "binary": s.ztund.display().to_string(),
            "metrics": results.json(), "targets": targets_json,
        }],
    });
    let path = report::json_path(&format!("capture-{}", world.name));
    let last = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
    if let Some(table) = last.and_then(|last| report::compare_with_last(&last, results)) {
        println!("{table}");
    }
    match std::fs::write(&path, serde_json::to_string_pretty(&json).expect("JSON")) {
        Ok(()) => println!("written to {}", path.display()),
        Err(e) => eprintln!("capture: writing {}: {e}", path.display()),
    }
}

/// The burst holds both ends of every connection in this process.
fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid struct; the servers and daemons inherit the limit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
