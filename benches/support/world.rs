//! The dataplane benchmark's world: two testbed nodes, a ztund on each in node mode (`capture:
//! none`, one WorkloadEntry per node at the node's address), the apps (sink, echo, ping) in their
//! own process on node 2 (this bench binary again, with `--serve-apps`), and a tokio runtime
//! whose threads live permanently inside node 1 for the load generator, so its sockets need no
//! namespace switching. Also reads a daemon's CPU time and memory from /proc. Knows nothing
//! about what is measured.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use ztund::net::Netns;

use std::process::Command;

use crate::support::{Cluster, Daemon, proc_stat_field};
use crate::testbed::{ChildGuard, Place, Testbed};

/// Reads until EOF, then answers the byte count (u64, big endian) and closes.
pub const SINK_PORT: u16 = 9000;
/// Echoes everything back.
pub const ECHO_PORT: u16 = 9001;
/// Reads one byte, answers one byte, closes first (so TIME_WAIT stays on the app's side).
pub const PING_PORT: u16 = 9002;

/// The flag that makes this binary the apps' process.
pub const SERVE_APPS: &str = "--serve-apps";

pub struct World {
    // Fields drop in order: daemons and apps first, the namespaces last.
    pub node1: Daemon,
    pub node2: Daemon,
    _apps: ChildGuard,
    pub client: Runtime,
    ztund: std::path::PathBuf,
    configs: [std::path::PathBuf; 2],
    /// Kept alive: the daemons' CA, configs and logs live in it.
    _cluster: Cluster,
    pub bed: Testbed,
}

impl World {
    /// Builds the testbed, starts the apps and both daemons (`ztund`, the binary to measure),
    /// and waits until they are ready.
    pub fn start(ztund: &std::path::Path) -> World {
        raise_open_files();
        let bed = Testbed::new(2, 0);
        for n in 1..=2 {
            tune_node(&bed.netns(Place::Node(n)));
        }
        let client = runtime_in(bed.netns(Place::Node(1)), "bench-client", 2);
        let mut command = Command::new(std::env::current_exe().expect("bench binary"));
        command.arg(SERVE_APPS).arg(bed.node_ip(2).to_string());
        let apps = bed.spawn_in(Place::Node(2), command);
        let sink_addr = SocketAddr::new(bed.node_ip(2), SINK_PORT);
        client
            .block_on(client.spawn(wait_for_port(sink_addr)))
            .expect("apps");

        let cluster = Cluster::new();
        cluster.write("mesh.yaml", &mesh(&bed));
        let c1 = cluster.node_config("node1", "mesh.yaml", "");
        let c2 = cluster.node_config("node2", "mesh.yaml", "");
        let node2 = start_daemon(&bed, &cluster, ztund, 2, &c2);
        let node1 = start_daemon(&bed, &cluster, ztund, 1, &c1);
        let world = World {
            node1,
            node2,
            _apps: apps,
            client,
            ztund: ztund.to_path_buf(),
            configs: [c1, c2],
            _cluster: cluster,
            bed,
        };
        world.wait_until_warm();
        world
    }

    /// Replaces both daemons by fresh ones (a heap that never held a busy workload).
    pub fn restart_daemons(&mut self) {
        for old in [&mut self.node1, &mut self.node2] {
            let child = old.child.child();
            let _ = child.kill();
            let _ = child.wait();
        }
        let [c1, c2] = &self.configs;
        self.node2 = start_daemon(&self.bed, &self._cluster, &self.ztund, 2, c2);
        self.node1 = start_daemon(&self.bed, &self._cluster, &self.ztund, 1, c1);
        self.wait_until_warm();
    }

    /// Waits for the daemons' listeners, then opens one tunnel so the pool is warm.
    fn wait_until_warm(&self) {
        let (node1_ip, node2_ip) = (self.bed.node_ip(1), self.bed.node_ip(2));
        self.client
            .block_on(self.client.spawn(async move {
                for node in [node1_ip, node2_ip] {
                    wait_for_port(SocketAddr::new(node, 15008)).await;
                }
                wait_for_port("127.0.0.1:15080".parse().expect("addr")).await;
                // Warm the pool: every measured tunnel rides an established HBONE connection.
                let echo = SocketAddr::new(node2_ip, ECHO_PORT);
                let mut tunnel = crate::load::open(crate::load::Path::Ztund, echo)
                    .await
                    .expect("a first tunnel through ztund");
                tunnel.write_all(b"w").await.expect("warm-up write");
                let mut back = [0u8; 1];
                tunnel.read_exact(&mut back).await.expect("warm-up echo");
            }))
            .expect("daemons");
    }

    /// An app port on node 2.
    pub fn app(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.bed.node_ip(2), port)
    }

    pub fn node1_netns(&self) -> Arc<Netns> {
        self.bed.netns(Place::Node(1))
    }

    /// Both daemons' pids, node 1 (outbound) first.
    pub fn pids(&self) -> [u32; 2] {
        [self.node1.child.id(), self.node2.child.id()]
    }

    /// The endpoints' processes: the apps, and this one (the load generator).
    pub fn endpoint_pids(&self) -> [u32; 2] {
        [self._apps.id(), std::process::id()]
    }
}

/// Debian's `heaptrack` package puts its recorder here.
const HEAPTRACK_PRELOAD: &str = "/usr/lib/heaptrack/libheaptrack_preload.so";

/// Starts `ztund run` in node `n` with its log in the cluster directory. Unlike
/// `Cluster::start`, the binary is a parameter, so two builds can be measured side by side.
fn start_daemon(
    bed: &Testbed,
    cluster: &Cluster,
    ztund: &std::path::Path,
    n: usize,
    config: &std::path::Path,
) -> Daemon {
    let log = cluster.path(&format!("node{n}-{}.log", bed.prefix()));
    let log_file = std::fs::File::create(&log).expect("log file");
    let mut command = Command::new(ztund);
    command
        .args(["--log-json", "run", "--config"])
        .arg(config)
        .env("ZTUND_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log_file);
    if let Some(dir) = std::env::var_os("ZTUND_BENCH_HEAPTRACK") {
        // heaptrack's recorder, without its wrapper script: the raw trace survives the kill
        // that ends each daemon (BENCHMARKS.md, "Heap profiles").
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let start = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("node{n}-{}-{start}.raw", bed.prefix());
        let trace = std::path::Path::new(&dir).join(name);
        command
            .env("LD_PRELOAD", HEAPTRACK_PRELOAD)
            .env("DUMP_HEAPTRACK_OUTPUT", trace);
    }
    Daemon {
        child: bed.spawn_in(Place::Node(n), command),
        log,
        node: n,
    }
}

/// Node-mode mesh: the client workload on node 1's address, the apps' workload on node 2's.
fn mesh(bed: &Testbed) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: client, namespace: default, annotations: {{ztund.io/node: node1}}}}
spec: {{address: "{n1}", serviceAccount: client, labels: {{app: client}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: server, namespace: default, annotations: {{ztund.io/node: node2}}}}
spec: {{address: "{n2}", serviceAccount: server, labels: {{app: server}}}}
"#,
        n1 = bed.node_ip(1),
        n2 = bed.node_ip(2),
    )
}

/// A tokio runtime whose every thread enters `netns` as it starts.
pub fn runtime_in(netns: Arc<Netns>, name: &str, threads: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .on_thread_start(move || enter_for_good(&netns))
        .build()
        .expect("bench runtime")
}

/// Moves the calling thread into `netns` for the rest of its life.
pub fn enter_for_good(netns: &Netns) {
    if let Err(e) = ztund::net::setns(netns.as_fd()) {
        eprintln!("bench: cannot enter {}: {e}", netns.describe());
        std::process::abort();
    }
}

/// Many short connections from one address to one port: reuse TIME_WAIT ports, use them all.
fn tune_node(netns: &Netns) {
    let settings = [
        ("/proc/sys/net/ipv4/tcp_tw_reuse", "1"),
        ("/proc/sys/net/ipv4/ip_local_port_range", "1024 65000"),
        ("/proc/sys/net/core/somaxconn", "8192"),
    ];
    for (path, value) in settings {
        netns
            .enter(|| std::fs::write(path, value))
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("bench: {path}={value}: {e}"));
    }
}

fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid struct. The hard limit is what this machine allows
    // without CAP_SYS_RESOURCE; the daemons and the apps inherit the raised soft limit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The soft limit on open files.
pub fn open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall with a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_cur
}

/// Waits (bounded) until something accepts on `addr`.
async fn wait_for_port(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "bench apps on {addr} did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The apps' process: started in node 2's namespace with `--serve-apps <ip>`; serves until
/// killed.
pub fn serve_apps(ip: &str) {
    let ip: std::net::IpAddr = ip.parse().expect("apps address");
    raise_open_files();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-apps")
        .enable_all()
        .build()
        .expect("apps runtime");
    let here = Netns::current().expect("own namespace");
    let at = |port| listen(&here, SocketAddr::new(ip, port));
    runtime.spawn(serve(at(SINK_PORT), sink));
    runtime.spawn(serve(at(ECHO_PORT), echo));
    runtime.block_on(serve(at(PING_PORT), ping));
}

/// An app listener inside `netns`, with a backlog deep enough for connection-rate bursts.
fn listen(netns: &Netns, addr: SocketAddr) -> std::net::TcpListener {
    let bind = || -> std::io::Result<std::net::TcpListener> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(8192)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    };
    netns
        .enter(bind)
        .and_then(|r| r)
        .unwrap_or_else(|e| panic!("bench: app listener on {addr}: {e}"))
}

async fn serve<F, Fut>(listener: std::net::TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    let listener = TcpListener::from_std(listener).expect("registering an app listener");
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::spawn(handle(stream));
    }
}

async fn sink(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf).await? {
            0 => break,
            n => total += n as u64,
        }
    }
    stream.write_all(&total.to_be_bytes()).await?;
    stream.shutdown().await
}

async fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await? {
            0 => return stream.shutdown().await,
            n => stream.write_all(&buf[..n]).await?,
        }
    }
}

async fn ping(mut stream: TcpStream) -> std::io::Result<()> {
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    stream.write_all(&byte).await?;
    Ok(())
}

/// CPU seconds (user + system) a process has used, from /proc/<pid>/stat.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::path::PathBuf::from(format!("/proc/{pid}/stat"));
    // utime and stime are fields 14 and 15.
    let ticks = |field| proc_stat_field(&stat, field).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(14) + ticks(15)) as f64 / hz
}

/// A line of /proc/<pid>/status in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix(field)?.strip_prefix(':')?;
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .unwrap_or(0.0)
}
