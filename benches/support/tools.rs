//! Real servers and load generators of the capture benchmark, run inside testbed places: nginx
//! (1 KiB answers), iperf3 and sockperf servers, and their clients wrk, iperf3 and sockperf,
//! whose reports are parsed here. In a pod with a sandbox (eBPF worlds) every one of them joins
//! the pod's cgroup. Knows nothing about daemons or reporting.

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::testbed::{ChildGuard, Place, Testbed, bpf};

pub const HTTP_PORT: u16 = 8080;
pub const IPERF_PORT: u16 = 5201;
pub const SOCKPERF_PORT: u16 = 11111;
/// The HTTP answer's body and each ping-pong message.
pub const MESSAGE: usize = 1024;
/// Connections wrk keeps (the issue's `wrk -c4`).
pub const HTTP_CONNECTIONS: usize = 4;

/// The Debian packages the benchmark runs.
pub const PROGRAMS: [&str; 4] = ["nginx", "wrk", "iperf3", "sockperf"];

/// Panics naming what to install when a program is missing.
pub fn check_installed() {
    for program in PROGRAMS {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "capture bench: `{program}` is missing (apt-get install nginx-light wrk iperf3 sockperf)"
        );
    }
}

/// Makes `command` join pod `place`'s cgroup when the pod has a sandbox: the eBPF programs
/// capture a socket by the cgroup of the process that made it, and ztund finds a pod's cgroup
/// from the processes in its netns (a process outside it would hide the pod). The returned
/// file must stay open until the command is started.
fn join_pod_cgroup(bed: &Testbed, place: Place, command: &mut Command) -> Option<File> {
    let Place::Pod(n, p) = place else {
        return None;
    };
    let sandbox = bed.sandbox(n, p)?;
    Some(bpf::in_cgroup(command, &sandbox.cgroup.0))
}

/// Starts a program inside `place` (and its pod's cgroup); it is killed when the guard drops.
pub fn spawn(bed: &Testbed, place: Place, mut command: Command) -> ChildGuard {
    let procs = join_pod_cgroup(bed, place, &mut command);
    let child = bed.spawn_in(place, command);
    drop(procs);
    child
}

/// Runs a program inside `place` (and its pod's cgroup); its stdout, or why it failed.
pub fn try_run(bed: &Testbed, place: Place, args: &[&str]) -> Result<String, String> {
    let (program, rest) = args.split_first().expect("a program");
    let mut command = Command::new(program);
    command.args(rest).stdin(Stdio::null());
    let procs = join_pod_cgroup(bed, place, &mut command);
    ztund::net::enter_before_exec(&mut command, &bed.netns(place));
    let output = command
        .output()
        .map_err(|e| format!("{program} in {place:?}: {e}"))?;
    drop(procs);
    if !output.status.success() {
        return Err(format!(
            "{program} in {place:?}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// [`try_run`], panicking with the reason.
pub fn run(bed: &Testbed, place: Place, args: &[&str]) -> String {
    try_run(bed, place, args).unwrap_or_else(|e| panic!("capture bench: {e}"))
}

/// nginx, iperf3 and sockperf servers on `ip` inside `place`; they stop when the guards drop.
/// `dir` holds nginx's config, pid file and error log.
pub fn start_servers(bed: &Testbed, place: Place, ip: IpAddr, dir: &Path) -> Vec<ChildGuard> {
    std::fs::create_dir_all(dir).expect("server dir");
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(ip, dir)).expect("nginx.conf");
    let mut nginx = Command::new("nginx");
    nginx.arg("-c").arg(&conf).arg("-p").arg(dir);
    let mut iperf = Command::new("iperf3");
    iperf.args(["-s", "-B", &ip.to_string(), "-p", &IPERF_PORT.to_string()]);
    let mut sockperf = Command::new("sockperf");
    sockperf.args([
        "server",
        "--tcp",
        "-i",
        &ip.to_string(),
        "-p",
        &SOCKPERF_PORT.to_string(),
    ]);
    [nginx, iperf, sockperf]
        .into_iter()
        .map(|mut command| {
            command.stdout(Stdio::null()).stderr(Stdio::null());
            spawn(bed, place, command)
        })
        .collect()
}

/// One worker (the machine has two cores for everything), no access log, keep-alive without a
/// request limit, and a fixed 1 KiB answer from memory: the server costs as little as it can.
fn nginx_conf(ip: IpAddr, dir: &Path) -> String {
    let body = "x".repeat(MESSAGE);
    let dir = dir.display();
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
         error_log {dir}/error.log warn;\nevents {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 100000000;\n  \
         client_body_temp_path {dir};\n  proxy_temp_path {dir};\n  fastcgi_temp_path {dir};\n  \
         uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n  \
         server {{\n    listen {ip}:{HTTP_PORT} backlog=8192;\n    \
         location / {{ default_type text/plain; return 200 \"{body}\"; }}\n  }}\n}}\n"
    )
}

/// What wrk reported.
#[derive(Debug, Clone, Copy)]
pub struct Http {
    pub per_second: f64,
    pub requests: f64,
    /// Connect, read, write and timeout errors together, and non-2xx answers.
    pub errors: f64,
}

/// wrk from `place` against `ip`: keep-alive, or a new connection per request (`close`).
pub fn wrk(bed: &Testbed, place: Place, ip: IpAddr, time: Duration, close: bool) -> Http {
    let url = format!("http://{ip}:{HTTP_PORT}/");
    let duration = format!("{}s", time.as_secs().max(1));
    let connections = HTTP_CONNECTIONS.to_string();
    let mut args = vec![
        "wrk",
        "-t1",
        "-c",
        &connections,
        "-d",
        &duration,
        "--timeout",
        "2s",
    ];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(&url);
    let out = run(bed, place, &args);
    let field = |prefix: &str| -> Option<f64> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    };
    let requests = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok());
    let socket_errors: f64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|rest| {
            rest.split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    let non_2xx = field("Non-2xx or 3xx responses:").unwrap_or(0.0);
    Http {
        per_second: field("Requests/sec:").unwrap_or_else(|| panic!("wrk said:\n{out}")),
        requests: requests.unwrap_or_else(|| panic!("wrk said:\n{out}")),
        errors: socket_errors + non_2xx,
    }
}

/// What iperf3 reported: bytes received and Gbit/s.
#[derive(Debug, Clone, Copy)]
pub struct Bulk {
    pub bytes: f64,
    pub gbit_per_second: f64,
}

/// One iperf3 stream from `place` to `ip` for `time`.
pub fn iperf3(bed: &Testbed, place: Place, ip: IpAddr, time: Duration) -> Bulk {
    let seconds = time.as_secs().max(1).to_string();
    let out = run(
        bed,
        place,
        &[
            "iperf3",
            "-c",
            &ip.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &seconds,
            "-J",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    let received = &report["end"]["sum_received"];
    Bulk {
        bytes: received["bytes"].as_f64().expect("iperf3 bytes"),
        gbit_per_second: received["bits_per_second"]
            .as_f64()
            .expect("iperf3 bits_per_second")
            / 1e9,
    }
}

/// What sockperf reported for one ping-pong run (latencies in µs, over its valid duration).
#[derive(Debug, Clone, Copy)]
pub struct PingPong {
    pub per_second: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

/// sockperf ping-pong of 1 KiB messages from `place` to `ip` over one TCP connection, at
/// `rate` messages per second or as fast as they come back (`None`).
pub fn sockperf(
    bed: &Testbed,
    place: Place,
    ip: IpAddr,
    time: Duration,
    rate: Option<u32>,
) -> PingPong {
    let mps = rate.map_or_else(|| "max".to_string(), |r| r.to_string());
    let out = run(
        bed,
        place,
        &[
            "sockperf",
            "ping-pong",
            "--tcp",
            "-i",
            &ip.to_string(),
            "-p",
            &SOCKPERF_PORT.to_string(),
            "-m",
            &MESSAGE.to_string(),
            "-t",
            &time.as_secs().max(1).to_string(),
            &format!("--mps={mps}"),
        ],
    );
    parse_sockperf(&out).unwrap_or_else(|| panic!("sockperf said:\n{out}"))
}

fn parse_sockperf(out: &str) -> Option<PingPong> {
    // "[Valid Duration] RunTime=1.548 sec; SentMessages=1549; ReceivedMessages=1549"
    let valid = out.lines().find(|l| l.contains("[Valid Duration]"))?;
    let after = |key: &str| -> Option<f64> {
        let rest = &valid[valid.find(key)? + key.len()..];
        rest.split([' ', ';']).next()?.parse().ok()
    };
    let seconds = after("RunTime=")?;
    let messages = after("ReceivedMessages=")?;
    // "---> percentile 99.000 =   24.579"
    let percentile = |p: &str| -> Option<f64> {
        out.lines()
            .find(|l| l.contains(&format!("percentile {p} ")))?
            .rsplit('=')
            .next()?
            .trim()
            .parse()
            .ok()
    };
    Some(PingPong {
        per_second: messages / seconds,
        p50: percentile("50.000")?,
        p99: percentile("99.000")?,
        p999: percentile("99.900")?,
    })
}
