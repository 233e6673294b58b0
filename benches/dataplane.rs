//! The data path against the physical limit (issue 5): on the namespace testbed, two nodes; the
//! same client on node 1 reaches the app on node 2 either directly (plain TCP: the limit) or
//! through ztund (SOCKS5 into node 1's daemon, HBONE to node 2's, TCP to the app; node mode).
//! Cases: throughput (1 and 8 streams), 1 KiB request/response latency at 1 000 req/s and at the
//! maximum rate, new connections per second over a warm pool, the daemons' CPU per GB and per
//! 1 000 requests (from /proc/<pid>/stat), and their memory per idle tunneled connection. The
//! client's and the apps' CPU is measured too, on both paths: the direct path's endpoints are
//! the physical reference for one ztund hop, which also reads one socket and writes another.
//!
//! Every figure is the median of the runs with min and max; ratios are taken within each run,
//! and direct and ztund alternate which goes first. Prints a table and this run against the
//! last one (the `target/dataplane.json` it then overwrites). The machine is shared, so read
//! spreads before medians.
//!
//! `cargo bench --bench dataplane` (release build). Settings, from the environment:
//! `ZTUND_BENCH_QUICK=1` (or `--quick`): 1 run, 1 s per case, 1 000 idle connections, < 60 s.
//! `ZTUND_BENCH_RUNS` (5), `ZTUND_BENCH_SECONDS` (10), `ZTUND_BENCH_IDLE` (10 000),
//! `ZTUND_BENCH_CASES` (comma list of throughput, latency, maxrate, connections, idle; all),
//! `ZTUND_BENCH_PROFILE=DIR`: `perf record` both daemons during each ztund case into DIR.
//! `ZTUND_BENCH_BEFORE=PATH`: also measure another ztund build (a second testbed, interleaved
//! case by case with this build) and print before → after: an optimisation's effect, same run.
//! `ZTUND_BENCH_AFTER=PATH`: measure that binary as "this build" instead of the one cargo built.
//! `ZTUND_BENCH_HEAPTRACK=DIR`: record each daemon's heap with heaptrack into DIR (one raw trace
//! per daemon start; `heaptrack` must be installed).

#[path = "../tests/support/mod.rs"]
mod support;
#[path = "../tests/testbed/mod.rs"]
mod testbed;

#[path = "support/load.rs"]
mod load;
#[path = "support/report.rs"]
mod report;
#[path = "support/world.rs"]
mod world;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use load::Path;
use report::Results;
use world::{ECHO_PORT, PING_PORT, SINK_PORT, World, cpu_seconds, status_kib};

const FIXED_RATE: u32 = 1_000;
const MAX_RATE_CONNECTIONS: usize = 4;
const CONNECT_CONCURRENCY: usize = 8;

struct Settings {
    quick: bool,
    runs: usize,
    seconds: Duration,
    idle: usize,
    cases: Vec<String>,
    profile: Option<PathBuf>,
    before: Option<PathBuf>,
}

impl Settings {
    fn from_env() -> Settings {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let number = |name: &str, default: usize| {
            env(name).map_or(default, |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
            })
        };
        let quick = std::env::args().any(|a| a == "--quick")
            || env("ZTUND_BENCH_QUICK").is_some_and(|v| v != "0");
        let all = "throughput,latency,maxrate,connections,idle";
        Settings {
            quick,
            runs: number("ZTUND_BENCH_RUNS", if quick { 1 } else { 5 }).max(1),
            seconds: Duration::from_secs(
                number("ZTUND_BENCH_SECONDS", if quick { 1 } else { 10 }).max(1) as u64,
            ),
            idle: number("ZTUND_BENCH_IDLE", if quick { 1_000 } else { 10_000 }),
            cases: env("ZTUND_BENCH_CASES")
                .unwrap_or_else(|| all.to_string())
                .split(',')
                .map(|c| c.trim().to_string())
                .collect(),
            profile: env("ZTUND_BENCH_PROFILE").map(PathBuf::from),
            before: env("ZTUND_BENCH_BEFORE").map(PathBuf::from),
        }
    }

    fn runs_case(&self, case: &str) -> bool {
        self.cases.iter().any(|c| c == case)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == world::SERVE_APPS) {
        world::serve_apps(args.get(i + 1).map_or("", String::as_str));
        return;
    }
    let settings = Settings::from_env();
    eprintln!(
        "dataplane: {} run(s), {:?} per case, {} idle connections, cases {:?}{}",
        settings.runs,
        settings.seconds,
        settings.idle,
        settings.cases,
        if settings.quick { " (quick)" } else { "" }
    );
    let mut builds = Vec::new();
    if let Some(before) = &settings.before {
        builds.push(("before", before.clone()));
    }
    let this_build = std::env::var_os("ZTUND_BENCH_AFTER")
        .map_or_else(|| PathBuf::from(support::ztund_bin()), PathBuf::from);
    builds.push(("this build", this_build));
    let mut worlds: Vec<World> = builds.iter().map(|(_, bin)| World::start(bin)).collect();
    let files = world::open_files_limit() as usize;
    if settings.idle + 100 > files {
        eprintln!(
            "dataplane: {} idle connections need as many open files; the limit here is {files}",
            settings.idle
        );
    }
    let mut results: Vec<Results> = worlds.iter().map(|_| Results::default()).collect();
    for run in 0..settings.runs {
        // Alternate which path (and which build) goes first, so drift on the shared machine
        // favours neither.
        let order = if run % 2 == 0 {
            [Path::Direct, Path::Ztund]
        } else {
            [Path::Ztund, Path::Direct]
        };
        one_run(&mut worlds, &settings, order, run % 2 == 1, &mut results);
        eprintln!("dataplane: run {} of {} done", run + 1, settings.runs);
    }

    let mut builds_json = Vec::new();
    for ((label, bin), results) in builds.iter().zip(&results) {
        let table = results.table();
        let (targets_text, targets_json) = report::check_targets(results, report::TARGETS);
        println!("\n== {label}: {}\n{table}\n{targets_text}", bin.display());
        builds_json.push(serde_json::json!({
            "build": label, "binary": bin.display().to_string(),
            "metrics": results.json(), "targets": targets_json,
        }));
    }
    if let [before, after] = &results[..] {
        println!("{}", report::compare(before, after));
    }
    let json = serde_json::json!({
        "settings": {
            "runs": settings.runs,
            "seconds": settings.seconds.as_secs(),
            "idle_connections": settings.idle,
            "quick": settings.quick,
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "mode": "node mode: SOCKS5 on node 1 -> HBONE -> node 2 (direct: TCP node 1 -> node 2)",
        },
        "builds": builds_json,
    });
    let path = report::json_path("dataplane");
    let last = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
    if let (Some(last), Some(this)) = (last, results.last())
        && let Some(table) = report::compare_with_last(&last, this)
    {
        println!("{table}");
    }
    let text = serde_json::to_string_pretty(&json).expect("JSON");
    match std::fs::write(&path, text) {
        Ok(()) => println!("written to {}", path.display()),
        Err(e) => eprintln!("dataplane: writing {}: {e}", path.display()),
    }
}

type Case = fn(&World, &Settings, [Path; 2], &mut Results);

/// Every selected case once, each on every build before the next case starts.
fn one_run(
    worlds: &mut [World],
    settings: &Settings,
    order: [Path; 2],
    last_build_first: bool,
    results: &mut [Results],
) {
    let mut builds: Vec<usize> = (0..worlds.len()).collect();
    if last_build_first {
        builds.reverse();
    }
    if settings.runs_case("idle") && settings.idle > 0 {
        // Fresh daemons: a heap that already held a busy run hides new allocations.
        for &b in &builds {
            worlds[b].restart_daemons();
            idle_memory(&worlds[b], settings, &mut results[b]);
        }
    }
    let cases: [(&str, Case); 5] = [
        ("throughput", |w, s, o, r| throughput(w, s, o, 1, r)),
        ("throughput", |w, s, o, r| throughput(w, s, o, 8, r)),
        ("latency", latency_at_rate),
        ("maxrate", latency_at_max_rate),
        ("connections", connections),
    ];
    for (name, case) in cases {
        if !settings.runs_case(name) {
            continue;
        }
        for &b in &builds {
            case(&worlds[b], settings, order, &mut results[b]);
        }
    }
}

/// CPU seconds spent while a case ran.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    /// Each daemon: node 1 (outbound), node 2 (inbound).
    daemons: [f64; 2],
    /// The client and the apps together: what the same traffic costs without ztund, the
    /// physical reference each ztund hop is judged against (a hop reads one socket and
    /// writes another, as the two endpoints together do).
    endpoints: f64,
}

impl Cpu {
    fn both_daemons(&self) -> f64 {
        self.daemons[0] + self.daemons[1]
    }
}

/// The CPU each party spent while `f` ran, and its result.
fn with_cpu<T>(world: &World, f: impl FnOnce() -> T) -> (T, Cpu) {
    let daemons = world.pids();
    let endpoints = world.endpoint_pids();
    let total = |pids: [u32; 2]| pids.map(cpu_seconds).iter().sum::<f64>();
    let before = (daemons.map(cpu_seconds), total(endpoints));
    let value = f();
    let after = (daemons.map(cpu_seconds), total(endpoints));
    let cpu = Cpu {
        daemons: [after.0[0] - before.0[0], after.0[1] - before.0[1]],
        endpoints: after.1 - before.1,
    };
    (value, cpu)
}

/// Runs `f` for one path; the ztund path under `perf record` when profiling is on.
fn measure<T>(
    world: &World,
    settings: &Settings,
    case: &str,
    path: Path,
    f: impl FnOnce() -> T,
) -> (T, Cpu) {
    let recorder = match (&settings.profile, path) {
        (Some(dir), Path::Ztund) => start_perf(world, dir, case),
        _ => None,
    };
    let measured = with_cpu(world, f);
    if let Some(mut perf) = recorder {
        // SIGINT lets perf write its file; it is our own child, ended by its pid.
        // SAFETY: kill with a pid we spawned and still own.
        unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
        let _ = perf.wait();
    }
    measured
}

fn start_perf(world: &World, dir: &std::path::Path, case: &str) -> Option<Child> {
    let _ = std::fs::create_dir_all(dir);
    let [a, b] = world.pids();
    let out = dir.join(format!("{case}.data"));
    Command::new("perf")
        .args([
            "record",
            "-q",
            "-F",
            "499",
            "--call-graph",
            "dwarf,16384",
            "-p",
        ])
        .arg(format!("{a},{b}"))
        .arg("-o")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .inspect_err(|e| eprintln!("dataplane: perf record: {e}"))
        .ok()
}

fn throughput(
    world: &World,
    s: &Settings,
    order: [Path; 2],
    streams: usize,
    results: &mut Results,
) {
    let case = if streams == 1 {
        "throughput-1"
    } else {
        "throughput-8"
    };
    let mut gbps = [0.0; 2];
    let mut cpu_per_gb = [0.0; 2];
    let mut endpoints_per_gb = [0.0; 2];
    for path in order {
        let (moved, cpu) = measure(world, s, case, path, || {
            world.client.block_on(load::throughput(
                path,
                world.app(SINK_PORT),
                streams,
                s.seconds,
            ))
        });
        gbps[path as usize] = moved.gbit_per_second();
        let gb = moved.bytes as f64 / 1e9;
        endpoints_per_gb[path as usize] = cpu.endpoints / gb;
        if path == Path::Ztund {
            cpu_per_gb = cpu.daemons.map(|seconds| seconds / gb);
        }
    }
    let [direct, ztund] = gbps;
    if streams == 1 {
        results.pair("throughput, 1 stream", "Gbit/s", direct, ztund);
        results.ztund("CPU per GB, node1 (out)", "core-s/GB", cpu_per_gb[0]);
        results.ztund("CPU per GB, node2 (in)", "core-s/GB", cpu_per_gb[1]);
        results.ztund(
            "CPU per GB, both daemons",
            "core-s/GB",
            cpu_per_gb[0] + cpu_per_gb[1],
        );
        let [direct, ztund] = endpoints_per_gb;
        results.pair("CPU per GB, client+app", "core-s/GB", direct, ztund);
    } else {
        results.pair("throughput, 8 streams", "Gbit/s", direct, ztund);
        results.ztund(
            "CPU per GB, 8 streams, both",
            "core-s/GB",
            cpu_per_gb[0] + cpu_per_gb[1],
        );
    }
}

fn latency_at_rate(world: &World, s: &Settings, order: [Path; 2], results: &mut Results) {
    let mut quantiles = [[0.0; 3]; 2];
    let mut ztund_cpu = (0.0, 0.0, 0.0);
    let mut endpoints = [0.0; 2];
    for path in order {
        let (mut latencies, cpu) = measure(world, s, "latency-1000", path, || {
            load::latency_at_rate(
                world.node1_netns(),
                path,
                world.app(ECHO_PORT),
                FIXED_RATE,
                s.seconds,
            )
        });
        quantiles[path as usize] = [0.5, 0.99, 0.999].map(|q| latencies.quantile_us(q));
        let requests = latencies.nanos.len() as f64;
        let elapsed = latencies.elapsed.as_secs_f64();
        let rate = requests / elapsed;
        endpoints[path as usize] = (cpu.endpoints / elapsed) / (rate / 1e3);
        if path == Path::Ztund {
            ztund_cpu = (cpu.both_daemons(), requests, elapsed);
        }
    }
    let [direct, ztund] = quantiles;
    results.pair("p50 @1000/s", "µs", direct[0], ztund[0]);
    results.pair("p99 @1000/s", "µs", direct[1], ztund[1]);
    results.pair("p99.9 @1000/s", "µs", direct[2], ztund[2]);
    results.ztund("added p99 @1000/s", "µs", ztund[1] - direct[1]);
    let (cpu, requests, elapsed) = ztund_cpu;
    results.ztund(
        "CPU per 1000 req, both",
        "core-ms",
        cpu * 1e3 / (requests / 1e3),
    );
    let rate = requests / elapsed;
    results.ztund(
        "vCPU per 1000 req/s, both",
        "vCPU",
        (cpu / elapsed) / (rate / 1e3),
    );
    let [direct, ztund] = endpoints;
    results.pair("vCPU per 1000 req/s, client+app", "vCPU", direct, ztund);
}

fn latency_at_max_rate(world: &World, s: &Settings, order: [Path; 2], results: &mut Results) {
    let mut figures = [[0.0; 4]; 2];
    let mut ztund_cpu = 0.0;
    for path in order {
        let (mut latencies, cpu) = measure(world, s, "latency-max", path, || {
            load::latency_at_max_rate(
                world.node1_netns(),
                path,
                world.app(ECHO_PORT),
                MAX_RATE_CONNECTIONS,
                s.seconds,
            )
        });
        let [p50, p99, p999] = [0.5, 0.99, 0.999].map(|q| latencies.quantile_us(q));
        figures[path as usize] = [latencies.per_second, p50, p99, p999];
        if path == Path::Ztund {
            ztund_cpu = cpu.both_daemons() * 1e3 / (latencies.nanos.len() as f64 / 1e3);
        }
    }
    let [direct, ztund] = figures;
    results.pair("max rate, 4 conns", "req/s", direct[0], ztund[0]);
    results.pair("p50 @max", "µs", direct[1], ztund[1]);
    results.pair("p99 @max", "µs", direct[2], ztund[2]);
    results.pair("p99.9 @max", "µs", direct[3], ztund[3]);
    results.ztund("CPU per 1000 req @max, both", "core-ms", ztund_cpu);
}

fn connections(world: &World, s: &Settings, order: [Path; 2], results: &mut Results) {
    let mut rates = [0.0; 2];
    let mut ztund_cpu = 0.0;
    let mut endpoints = [0.0; 2];
    for path in order {
        let ((rate, count), cpu) = measure(world, s, "connections", path, || {
            world.client.block_on(load::connection_rate(
                path,
                world.app(PING_PORT),
                CONNECT_CONCURRENCY,
                s.seconds,
            ))
        });
        rates[path as usize] = rate;
        endpoints[path as usize] = cpu.endpoints * 1e3 / (count as f64 / 1e3);
        if path == Path::Ztund {
            ztund_cpu = cpu.both_daemons() * 1e3 / (count as f64 / 1e3);
        }
        // Let the closed connections' last packets settle before the next measurement.
        std::thread::sleep(Duration::from_millis(500));
    }
    results.pair("new connections", "conn/s", rates[0], rates[1]);
    results.ztund("CPU per 1000 conns, both", "core-ms", ztund_cpu);
    let [direct, ztund] = endpoints;
    results.pair("CPU per 1000 conns, client+app", "core-ms", direct, ztund);
}

/// Memory per idle tunneled connection, on daemons that have carried nothing but the warm-up.
fn idle_memory(world: &World, s: &Settings, results: &mut Results) {
    let pids = world.pids();
    std::thread::sleep(Duration::from_millis(500));
    let idle = pids.map(|pid| status_kib(pid, "VmRSS"));
    let held = world
        .client
        .block_on(load::open_idle(world.app(ECHO_PORT), s.idle));
    std::thread::sleep(Duration::from_secs(1));
    let loaded = pids.map(|pid| status_kib(pid, "VmRSS"));
    let per = [0, 1].map(|i| (loaded[i] - idle[i]) / s.idle as f64);
    results.ztund("memory per idle conn, node1", "KiB", per[0]);
    results.ztund("memory per idle conn, node2", "KiB", per[1]);
    results.ztund("memory per idle conn, both", "KiB", per[0] + per[1]);
    results.ztund("RSS before idle conns, node1", "MiB", idle[0] / 1024.0);
    results.ztund("RSS before idle conns, node2", "MiB", idle[1] / 1024.0);
    drop(held);
    // Give the daemons time to tear the tunnels down before the next case.
    std::thread::sleep(Duration::from_secs(2));
    let after = pids.map(|pid| status_kib(pid, "VmRSS"));
    results.ztund("RSS after closing them, node1", "MiB", after[0] / 1024.0);
    results.ztund("RSS after closing them, node2", "MiB", after[1] / 1024.0);
}
