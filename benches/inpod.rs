//! In-pod capture measured (a bench, not a test; needs root and iperf3):
//! `cargo bench --bench inpod`.
//! Pod→pod across nodes through ztund (pods (1,1)→(2,1), standalone capture) against the same
//! topology without ztund (pods (1,2)→(2,2), not captured): bulk throughput with iperf3 (1 GiB,
//! median of 5) and connections per second (connect, 1 byte each way, close).
//!
//! Measured (release, 2 shared cores, load average ~6 from other builds; ztund at 2 workers):
//! throughput direct 11.6 Gbit/s, through ztund 3.0 Gbit/s; connections/s with one client loop
//! direct 18,400, through ztund 2,450; with eight loops direct 18,900, through ztund 3,830.
//! Before IP_BIND_ADDRESS_NO_PORT on the spoofed upstream socket, the ztund rate collapsed to
//! ~200/s after ~30k connections (the server pod's ports were all held by TIME_WAIT).

#[path = "../tests/support/mod.rs"]
mod support;
#[path = "../tests/testbed/mod.rs"]
mod testbed;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use support::pods::{MeshPod, PodWorld};
use testbed::{Place, Testbed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 9000;
const RUNS: usize = 5;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Gbit/s of one 1 GiB iperf3 transfer from pod (1, p) to pod (2, p).
fn iperf(bed: &Testbed, p: usize) -> f64 {
    let target = bed.pod_ip(2, p).to_string();
    let out = bed.run_in(
        Place::Pod(1, p),
        &["iperf3", "-c", &target, "-p", "5201", "-n", "1G", "-J"],
    );
    let report: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e9
}

/// Connections per second from pod (1, p) to an echo app in pod (2, p): `clients` loops of
/// connect, 1 byte each way, close, for `duration`.
async fn connection_rate(bed: &Testbed, p: usize, clients: usize, duration: Duration) -> f64 {
    let target = SocketAddr::new(bed.pod_ip(2, p), ECHO_PORT);
    let started = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..clients {
        let sockets = bed.app_sockets(Place::Pod(1, p));
        loops.push(tokio::spawn(async move {
            let mut done = 0u64;
            while started.elapsed() < duration {
                let mut s = sockets.connect(target, None).await.expect("connect");
                s.write_all(b"x").await.expect("write");
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.expect("read");
                drop(s);
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for l in loops {
        total += l.await.expect("client loop");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pods = [
        MeshPod::captured(1, 1, "client"),
        MeshPod::captured(2, 1, "server"),
        MeshPod::uncaptured(1, 2, "plain-client"),
        MeshPod::uncaptured(2, 2, "plain-server"),
    ];
    let w = PodWorld::standalone(2, 2, &pods).await;
    let bed = &w.bed;
    // Short connections leave TIME_WAIT behind: reuse it, and use the whole port range, so the
    // rate measures connection work and not the ephemeral-port search.
    for n in [1, 2] {
        for p in [1, 2] {
            bed.run_in(
                Place::Pod(n, p),
                &[
                    "sysctl",
                    "-qw",
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.ipv4.ip_local_port_range=1024 65000",
                ],
            );
        }
    }
    let mut servers = Vec::new();
    for p in [1, 2] {
        let mut command = Command::new("iperf3");
        command
            .args(["-s", "-p", &IPERF_PORT.to_string()])
            .stdout(std::process::Stdio::null());
        servers.push(bed.spawn_in(Place::Pod(2, p), command));
        bed.echo_server(2, p, ECHO_PORT);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Runs alternate between the two paths, so a busy neighbour on a shared machine slows both.
    let mut gbits = [Vec::new(), Vec::new()];
    for _ in 0..RUNS {
        for (i, p) in [2, 1].into_iter().enumerate() {
            gbits[i].push(iperf(bed, p));
        }
    }
    for (i, name) in ["direct", "ztund"].into_iter().enumerate() {
        println!(
            "{name}: 1 GiB iperf3 pod→pod across nodes: median {:.2} Gbit/s (runs {:?})",
            median(gbits[i].clone()),
            gbits[i]
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
        );
    }
    for clients in [1, 8] {
        let mut rates = [Vec::new(), Vec::new()];
        for _ in 0..RUNS {
            for (i, p) in [2, 1].into_iter().enumerate() {
                rates[i].push(connection_rate(bed, p, clients, Duration::from_secs(2)).await);
            }
        }
        for (i, name) in ["direct", "ztund"].into_iter().enumerate() {
            println!(
                "{name}: connections/s ({clients} client loop(s), 1 byte each way): median {:.0} (runs {:?})",
                median(rates[i].clone()),
                rates[i]
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
            );
        }
    }
    let tunnels = w.established_to(Place::Pod(1, 1), 15008);
    println!(
        "tunnels from pod (1,1) to 15008 afterwards: {}",
        tunnels.len()
    );
}
