//! What the fault tests (HARDENING F1–F8) share: a two-node world in node mode (a mesh client
//! on node 1 reaching node 2's apps through node 1's SOCKS5 listener and HBONE), apps that echo
//! or never read, per-connection byte patterns, and a daemon's memory and open files.
//! Use it with `mod support; mod testbed; mod faults;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Cluster, Daemon};
use crate::testbed::{Place, Testbed};

/// Node 2's echo app.
pub const ECHO_PORT: u16 = 9000;
/// Node 2's app that accepts and never reads (a slow consumer).
pub const STALLED_PORT: u16 = 9001;

/// `client` on node 1's address, `echo` on node 2's: every connection crosses HBONE.
pub fn mesh(bed: &Testbed) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: client, namespace: default, annotations: {{ztund.io/node: node1}}}}
spec: {{address: "{n1}", serviceAccount: client, labels: {{app: client}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: echo, namespace: default, annotations: {{ztund.io/node: node2}}}}
spec: {{address: "{n2}", serviceAccount: echo, labels: {{app: echo}}}}
"#,
        n1 = bed.node_ip(1),
        n2 = bed.node_ip(2),
    )
}

/// Connections an app accepted, how many it holds open now, and (stalled app) the sockets it
/// holds without reading.
#[derive(Clone, Default)]
pub struct AppCounters {
    pub accepted: Arc<AtomicUsize>,
    pub open: Arc<AtomicUsize>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl AppCounters {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// The stalled app lets go of every connection it holds (closing them unread).
    pub fn release(&self) {
        let held: Vec<TcpStream> = std::mem::take(&mut *self.held.lock().expect("held"));
        self.open.fetch_sub(held.len(), Ordering::SeqCst);
    }
}

/// Serves `addr` inside `place`: echoes until EOF, or (`stalled`) holds each connection without
/// ever reading until [`AppCounters::release`].
pub fn app(bed: &Testbed, place: Place, addr: SocketAddr, stalled: bool) -> AppCounters {
    let counters = AppCounters::default();
    let listener = bed
        .app_sockets(place)
        .listener(addr, false)
        .expect("app listener");
    let c = counters.clone();
    bed.keep_task(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            c.accepted.fetch_add(1, Ordering::SeqCst);
            c.open.fetch_add(1, Ordering::SeqCst);
            if stalled {
                c.held.lock().expect("held").push(stream);
                continue;
            }
            let open = c.open.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }));
    counters
}

/// The two-node world: daemons running, node 2's echo and stalled apps listening.
pub struct World {
    pub node1: Daemon,
    pub node2: Daemon,
    pub echo: AppCounters,
    pub stalled: AppCounters,
    pub cluster: Cluster,
    pub bed: Testbed,
}

impl World {
    /// `node1_extra` is YAML appended to node 1's config.
    pub async fn start(node1_extra: &str) -> World {
        let bed = Testbed::new(2, 0);
        let cluster = Cluster::new();
        cluster.write("mesh.yaml", &mesh(&bed));
        let echo = app(&bed, Place::Node(2), World::addr_in(&bed, ECHO_PORT), false);
        let stalled = app(
            &bed,
            Place::Node(2),
            World::addr_in(&bed, STALLED_PORT),
            true,
        );
        let c2 = cluster.node_config("node2", "mesh.yaml", "");
        let c1 = cluster.node_config("node1", "mesh.yaml", node1_extra);
        let node2 = cluster.start(&bed, 2, &c2).await;
        let node1 = cluster.start(&bed, 1, &c1).await;
        World {
            node1,
            node2,
            echo,
            stalled,
            cluster,
            bed,
        }
    }

    fn addr_in(bed: &Testbed, port: u16) -> SocketAddr {
        SocketAddr::new(bed.node_ip(2), port)
    }

    /// An app of node 2.
    pub fn target(&self, port: u16) -> SocketAddr {
        World::addr_in(&self.bed, port)
    }

    /// A mesh connection from node 1's client through SOCKS5 and HBONE.
    pub async fn connect(&self, port: u16) -> Result<TcpStream, String> {
        socks5(&self.bed, Place::Node(1), self.target(port)).await
    }

    /// HBONE connections node 1 holds open to node 2 (`ss`, established, to 15008).
    pub fn tunnels(&self) -> usize {
        self.bed
            .run_in(
                Place::Node(1),
                &["ss", "-Htn", "state", "established", "( dport = :15008 )"],
            )
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    }
}

/// A SOCKS5 CONNECT from `place` through its ztund (127.0.0.1:15080) to `target`; unlike
/// `support::socks5_connect`, every failure (nothing listening, a reset) is an `Err`.
pub async fn socks5(bed: &Testbed, place: Place, target: SocketAddr) -> Result<TcpStream, String> {
    let SocketAddr::V4(v4) = target else {
        return Err(format!("{target}: IPv4 only"));
    };
    let proxy: SocketAddr = "127.0.0.1:15080".parse().expect("addr");
    let handshake = async {
        let mut stream = bed.app_sockets(place).connect(proxy, None).await?;
        stream.write_all(&[5, 1, 0]).await?;
        let mut choice = [0u8; 2];
        stream.read_exact(&mut choice).await?;
        let mut request = vec![5, 1, 0, 1];
        request.extend_from_slice(&v4.ip().octets());
        request.extend_from_slice(&v4.port().to_be_bytes());
        stream.write_all(&request).await?;
        let mut reply = [0u8; 10];
        stream.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>((stream, choice, reply[1]))
    };
    match tokio::time::timeout(Duration::from_secs(20), handshake).await {
        Err(_) => Err(format!("SOCKS5 to {target}: no answer within 20 s")),
        Ok(Err(e)) => Err(format!("SOCKS5 to {target}: {e}")),
        Ok(Ok((_, choice, _))) if choice != [5, 0] => Err(format!("SOCKS5 method {choice:?}")),
        Ok(Ok((_, _, code))) if code != 0 => Err(format!("SOCKS5 to {target}: reply {code}")),
        Ok(Ok((stream, _, _))) => Ok(stream),
    }
}

/// `len` bytes unique to connection `seed`: a stream mixed up with another cannot match.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Sends connection `seed`'s pattern and checks the echo is exactly it.
pub async fn exchange(stream: &mut TcpStream, seed: u64, len: usize) -> Result<(), String> {
    let sent = pattern(seed, len);
    let io = async {
        stream.write_all(&sent).await?;
        let mut back = vec![0u8; len];
        stream.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    match tokio::time::timeout(Duration::from_secs(20), io).await {
        Ok(Ok(back)) if back == sent => Ok(()),
        Ok(Ok(_)) => Err(format!("connection {seed}: echoed bytes differ")),
        Ok(Err(e)) => Err(format!("connection {seed}: {e}")),
        Err(_) => Err(format!("connection {seed}: no echo within 20 s")),
    }
}

/// Whether the peer closed `stream` (EOF or an error) within `within`.
pub async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read).await.is_ok()
}

/// Resident memory of a process, KiB (`VmRSS`).
pub fn rss_kib(daemon: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid()))
        .expect("the daemon's /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A daemon's memory and open files at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub rss_kib: u64,
    pub fds: usize,
}

pub fn usage(daemon: &Daemon) -> Usage {
    Usage {
        rss_kib: rss_kib(daemon),
        fds: daemon.open_fds(),
    }
}

/// Waits (bounded) until the daemon's open files are back to at most `baseline + slack`;
/// returns the last count.
pub async fn fds_settle(daemon: &Daemon, baseline: usize, slack: usize, within: Duration) -> usize {
    let deadline = std::time::Instant::now() + within;
    loop {
        let now = daemon.open_fds();
        if now <= baseline + slack || std::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Raises this test process's open-files limit (soft and hard, where root may) to at least 65 536:
/// it holds both ends of thousands of connections, and the daemons it starts inherit it.
/// Returns the limit.
pub fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let hard = limit.rlim_max;
        limit.rlim_max = hard.max(65_536);
        limit.rlim_cur = limit.rlim_max;
        // Without CAP_SYS_RESOURCE (a container) the hard limit stays where it is.
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            limit.rlim_max = hard;
            limit.rlim_cur = hard;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
    limit.rlim_cur
}
