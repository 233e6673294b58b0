//! The test world: nodes and pods built from network namespaces on this machine, exactly as
//! TESTBED.md describes (a switch namespace with a bridge; node namespaces 10.200.0.N/24 on it;
//! pods 10.201.N.(P+1) behind their node on a veth pair). Names carry a per-test prefix so tests
//! run in parallel, and the guard's `Drop` deletes every namespace it made, also on panic.
//! Knows nothing about ztund beyond `Netns`/`SocketFactory`, which it uses to open sockets
//! inside pods. Use it from a test file with `mod testbed;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use ztund::net::{Netns, SocketFactory};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A namespace of the testbed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    /// The namespace holding the bridge all nodes hang off.
    Switch,
    /// Node `n` (1-based).
    Node(usize),
    /// Pod `p` (1-based) of node `n`.
    Pod(usize, usize),
}

/// Nodes × pods made of network namespaces; everything is removed when it drops.
pub struct Testbed {
    prefix: String,
    nodes: usize,
    pods_per_node: usize,
    /// Namespaces created so far, in creation order (deleted in reverse).
    created: Vec<String>,
    opened: HashMap<Place, Arc<Netns>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Testbed {
    /// Builds `nodes` nodes with `pods_per_node` pods each. Panics (failing the test) when the
    /// namespaces cannot be made.
    pub fn new(nodes: usize, pods_per_node: usize) -> Testbed {
        assert!((1..=250).contains(&nodes), "1..=250 nodes");
        assert!((0..=250).contains(&pods_per_node), "0..=250 pods per node");
        let prefix = format!(
            "zt{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut bed = Testbed {
            prefix,
            nodes,
            pods_per_node,
            created: Vec::new(),
            opened: HashMap::new(),
            tasks: Mutex::new(Vec::new()),
        };
        bed.build();
        bed
    }

    fn places(&self) -> Vec<Place> {
        let mut places = vec![Place::Switch];
        for n in 1..=self.nodes {
            places.push(Place::Node(n));
            places.extend((1..=self.pods_per_node).map(|p| Place::Pod(n, p)));
        }
        places
    }

    fn build(&mut self) {
        for place in self.places() {
            let name = self.netns_name(place);
            if Path::new("/var/run/netns").join(&name).exists() {
                // Left over by a crashed run with the same pid.
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
            ip_batch(None, &format!("netns add {name}"));
            self.created.push(name.clone());
            let netns =
                Netns::open(&name).unwrap_or_else(|e| panic!("testbed: opening netns {name}: {e}"));
            self.opened.insert(place, Arc::new(netns));
        }
        let switch = self.netns_name(Place::Switch);
        let mut batch = String::from("link add br0 type bridge\nlink set br0 up\nlink set lo up\n");
        for n in 1..=self.nodes {
            let node = self.netns_name(Place::Node(n));
            batch += &format!("link add n{n} type veth peer name eth0 netns {node}\n");
            batch += &format!("link set n{n} master br0 up\n");
        }
        ip_batch(Some(&switch), &batch);
        for n in 1..=self.nodes {
            self.build_node(n);
        }
    }

    fn build_node(&self, n: usize) {
        let node = self.netns_name(Place::Node(n));
        self.sysctls(
            Place::Node(n),
            &[
                ("ipv4/ip_forward", "1"),
                ("ipv4/conf/all/rp_filter", "0"),
                ("ipv4/conf/default/rp_filter", "0"),
            ],
        );
        let gateway = gateway_ip(n);
        let mut batch = format!(
            "link set lo up\naddr add {}/24 dev eth0\nlink set eth0 up\n",
            self.node_ip(n)
        );
        for other in (1..=self.nodes).filter(|&o| o != n) {
            batch += &format!(
                "route add 10.201.{other}.0/24 via {}\n",
                self.node_ip(other)
            );
        }
        for p in 1..=self.pods_per_node {
            let pod = self.netns_name(Place::Pod(n, p));
            batch += &format!("link add p{p} type veth peer name eth0 netns {pod}\n");
            batch += &format!("addr add {gateway}/32 dev p{p}\nlink set p{p} up\n");
            batch += &format!("route add {}/32 dev p{p} scope link\n", self.pod_ip(n, p));
        }
        ip_batch(Some(&node), &batch);
        for p in 1..=self.pods_per_node {
            self.build_pod(n, p);
        }
    }

    fn build_pod(&self, n: usize, p: usize) {
        let pod = self.netns_name(Place::Pod(n, p));
        self.sysctls(
            Place::Pod(n, p),
            &[
                ("ipv4/conf/all/rp_filter", "0"),
                ("ipv4/conf/default/rp_filter", "0"),
                ("ipv4/conf/eth0/rp_filter", "0"),
            ],
        );
        let ip = self.pod_ip(n, p);
        let gateway = gateway_ip(n);
        let batch = format!(
            "link set lo up\naddr add {ip}/32 dev eth0\nlink set eth0 up\n\
             route add {gateway} dev eth0 scope link\n\
             route add default via {gateway} dev eth0 src {ip}\n"
        );
        ip_batch(Some(&pod), &batch);
    }

    /// Writes `/proc/sys/net/<key>` from inside the place's namespace.
    fn sysctls(&self, place: Place, settings: &[(&str, &str)]) {
        let netns = self.netns(place);
        for (key, value) in settings {
            let path = format!("/proc/sys/net/{key}");
            netns
                .enter(|| std::fs::write(&path, value))
                .and_then(|r| r)
                .unwrap_or_else(|e| panic!("testbed: {path}={value} in {place:?}: {e}"));
        }
    }

    /// This testbed's name prefix (`zt<pid>x<counter>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace name of a place (for `ip netns exec`, `ip -n`, `Netns::open`).
    pub fn netns_name(&self, place: Place) -> String {
        match place {
            Place::Switch => format!("{}-sw", self.prefix),
            Place::Node(n) => format!("{}-n{n}", self.prefix),
            Place::Pod(n, p) => format!("{}-n{n}p{p}", self.prefix),
        }
    }

    /// The open namespace of a place.
    pub fn netns(&self, place: Place) -> Arc<Netns> {
        self.opened
            .get(&place)
            .cloned()
            .unwrap_or_else(|| panic!("testbed has no {place:?}"))
    }

    /// Node `n`'s address on the bridge: 10.200.0.n.
    pub fn node_ip(&self, n: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 200, 0, n as u8))
    }

    /// Pod `p` of node `n`: 10.201.n.(p+1) (.1 is the node's gateway address).
    pub fn pod_ip(&self, n: usize, p: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 201, n as u8, (p + 1) as u8))
    }

    /// Runs a command inside a place and returns its stdout; panics with stderr on failure.
    pub fn run_in(&self, place: Place, args: &[&str]) -> String {
        self.try_run_in(place, args)
            .unwrap_or_else(|e| panic!("testbed: {args:?} in {place:?}: {e}"))
    }

    /// Runs a command inside a place; `Err(stderr)` on failure.
    pub fn try_run_in(&self, place: Place, args: &[&str]) -> Result<String, String> {
        let (program, rest) = args.split_first().ok_or("empty command")?;
        let mut command = Command::new(program);
        command.args(rest).stdin(Stdio::null());
        self.enter_on_exec(place, &mut command);
        let output = command.output().map_err(|e| format!("{program}: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts a process inside a place; it is killed when the guard drops.
    pub fn spawn_in(&self, place: Place, mut command: Command) -> ChildGuard {
        self.enter_on_exec(place, &mut command);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("testbed: spawning {command:?} in {place:?}: {e}"));
        ChildGuard(Some(child))
    }

    fn enter_on_exec(&self, place: Place, command: &mut Command) {
        let fd = self.netns(place).as_fd().as_raw_fd();
        // SAFETY: only the async-signal-safe setns syscall runs between fork and exec, on an fd
        // the testbed keeps open while it exists.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }

    /// A socket factory for a place: no mark, as an application's sockets have none.
    pub fn app_sockets(&self, place: Place) -> SocketFactory {
        SocketFactory {
            netns: Some(self.netns(place)),
            mark: None,
        }
    }

    /// An echo server on `pod_ip(n, p):port` inside the pod (a tokio task, stopped on drop).
    pub fn echo_server(&self, n: usize, p: usize, port: u16) -> SocketAddr {
        self.serve(
            Place::Pod(n, p),
            SocketAddr::new(self.pod_ip(n, p), port),
            |mut stream, _| {
                Box::pin(async move {
                    let (mut reader, mut writer) = stream.split();
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                })
            },
        )
    }

    /// A server that writes the client's address as seen by the app (`ip:port\n`), then closes.
    pub fn whoami_server(&self, n: usize, p: usize, port: u16) -> SocketAddr {
        self.serve(
            Place::Pod(n, p),
            SocketAddr::new(self.pod_ip(n, p), port),
            |mut stream, peer| {
                Box::pin(async move {
                    let _ = stream.write_all(format!("{peer}\n").as_bytes()).await;
                    let _ = stream.shutdown().await;
                })
            },
        )
    }

    /// Serves `addr` inside `place` with `handle` per connection (a task stopped on drop).
    pub fn serve(
        &self,
        place: Place,
        addr: SocketAddr,
        handle: fn(TcpStream, SocketAddr) -> futures::future::BoxFuture<'static, ()>,
    ) -> SocketAddr {
        let listener = self
            .app_sockets(place)
            .listener(addr, false)
            .unwrap_or_else(|e| panic!("testbed: listening on {addr} in {place:?}: {e}"));
        let task = tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                tokio::spawn(handle(stream, peer));
            }
        });
        self.keep_task(task);
        addr
    }

    /// Stops `task` when the testbed drops.
    pub fn keep_task(&self, task: JoinHandle<()>) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.push(task);
        }
    }

    /// Connects from inside pod `(n, p)` as an application would (no mark).
    pub async fn connect_from(
        &self,
        n: usize,
        p: usize,
        dst: SocketAddr,
    ) -> std::io::Result<TcpStream> {
        self.app_sockets(Place::Pod(n, p)).connect(dst, None).await
    }

    /// Sends `len` patterned bytes through an echo connection and checks they all come back
    /// intact and in order.
    pub async fn assert_echo(stream: TcpStream, len: usize) {
        let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let (mut reader, mut writer) = stream.into_split();
        let sent = pattern.clone();
        let writing = tokio::spawn(async move {
            writer
                .write_all(&sent)
                .await
                .expect("writing to the echo server");
            writer.shutdown().await.expect("closing the write side");
        });
        let mut back = Vec::with_capacity(len);
        reader
            .read_to_end(&mut back)
            .await
            .expect("reading the echo");
        writing.await.expect("writer task");
        assert_eq!(
            back.len(),
            len,
            "echo returned {} of {len} bytes",
            back.len()
        );
        assert!(back == pattern, "echoed bytes differ from what was sent");
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.get_mut() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
        self.opened.clear();
        for name in self.created.iter().rev() {
            let status = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("testbed: could not delete netns {name}");
            }
        }
    }
}

/// A child process killed (by its pid) when the guard drops.
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// The child, to wait on it or read its pipes.
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present until drop")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn gateway_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, n as u8, 1)
}

/// Runs `ip [-n netns] -batch -` with `commands`; panics naming the failing batch.
fn ip_batch(netns: Option<&str>, commands: &str) {
    let mut command = Command::new("ip");
    if let Some(netns) = netns {
        command.args(["-n", netns]);
    }
    let mut child = command
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("testbed: cannot run `ip` (apt-get install iproute2): {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(commands.as_bytes())
            .expect("writing ip batch");
    }
    let output = child.wait_with_output().expect("waiting for ip");
    assert!(
        output.status.success(),
        "testbed: ip {netns:?} batch failed: {}\n{commands}",
        String::from_utf8_lossy(&output.stderr)
    );
}
