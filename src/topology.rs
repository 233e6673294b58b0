//! A mesh topology on one machine: nodes and pods built from network namespaces, as TESTBED.md
//! describes (a switch namespace with a bridge; node namespaces 10.200.0.N/24 on it; pods
//! 10.201.N.(P+1) behind their node on a veth pair; every address has an IPv6 twin, see
//! [`Topology::node_ip6`] and [`Topology::pod_ip6`]). `ztund demo` and the integration tests
//! share it. Names carry a prefix so several topologies coexist, and `Drop` deletes every
//! namespace it made, also on panic. Knows nothing about ztund's daemons or policy; it only opens
//! sockets and starts processes inside its namespaces.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::net::{Netns, SocketFactory};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Where named network namespaces live (`ip netns add`).
const NETNS_DIR: &str = "/var/run/netns";

/// Why a topology (or something inside it) could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("a topology has 1..=250 nodes and 0..=250 pods per node, not {nodes}×{pods}")]
    Size { nodes: usize, pods: usize },
    #[error("cannot run `ip` (apt-get install iproute2): {0}")]
    NoIp(std::io::Error),
    #[error("`ip{netns}` batch failed: {stderr}\n{commands}", netns = .netns.as_ref().map(|n| format!(" -n {n}")).unwrap_or_default())]
    IpBatch {
        netns: Option<String>,
        commands: String,
        stderr: String,
    },
    #[error("opening netns {name}: {source}")]
    Netns {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting /proc/sys/net/{key}={value} in {place:?}: {source}")]
    Sysctl {
        key: String,
        value: String,
        place: Place,
        #[source]
        source: std::io::Error,
    },
    #[error("this topology has no {0:?}")]
    UnknownPlace(Place),
    #[error("running {program} in {place:?}: {reason}")]
    Command {
        program: String,
        place: Place,
        reason: String,
    },
    #[error("listening on {addr} in {place:?}: {source}")]
    Listen {
        addr: SocketAddr,
        place: Place,
        #[source]
        source: std::io::Error,
    },
}

/// A namespace of the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    /// The namespace holding the bridge all nodes hang off.
    Switch,
    /// Node `n` (1-based).
    Node(usize),
    /// Pod `p` (1-based) of node `n`.
    Pod(usize, usize),
}

/// A connection handler for [`Topology::serve`].
pub type Handler = fn(TcpStream, SocketAddr) -> futures::future::BoxFuture<'static, ()>;

/// Nodes × pods made of network namespaces; everything is removed when it drops.
pub struct Topology {
    prefix: String,
    nodes: usize,
    pods_per_node: usize,
    /// Namespaces created so far, in creation order (deleted in reverse).
    created: Vec<String>,
    opened: HashMap<Place, Arc<Netns>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Topology {
    /// Builds `nodes` nodes with `pods_per_node` pods each, named with a prefix unique to this
    /// process and call (`zt<pid>x<counter>`).
    pub fn new(nodes: usize, pods_per_node: usize) -> Result<Topology, TopologyError> {
        let prefix = format!(
            "zt{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Topology::with_prefix(&prefix, nodes, pods_per_node)
    }

    /// Builds a topology whose namespaces are `<prefix>-sw`, `<prefix>-n<N>`, `<prefix>-n<N>p<P>`.
    /// Namespaces of those names left over by a crashed run are deleted first.
    pub fn with_prefix(
        prefix: &str,
        nodes: usize,
        pods_per_node: usize,
    ) -> Result<Topology, TopologyError> {
        if !(1..=250).contains(&nodes) || pods_per_node > 250 {
            return Err(TopologyError::Size {
                nodes,
                pods: pods_per_node,
            });
        }
        let mut topology = Topology {
            prefix: prefix.to_string(),
            nodes,
            pods_per_node,
            created: Vec::new(),
            opened: HashMap::new(),
            tasks: Mutex::new(Vec::new()),
        };
        // On error the half-built topology drops here and deletes what it made.
        topology.build()?;
        Ok(topology)
    }

    fn places(&self) -> Vec<Place> {
        let mut places = vec![Place::Switch];
        for n in 1..=self.nodes {
            places.push(Place::Node(n));
            places.extend((1..=self.pods_per_node).map(|p| Place::Pod(n, p)));
        }
        places
    }

    fn build(&mut self) -> Result<(), TopologyError> {
        for place in self.places() {
            let name = self.netns_name(place);
            if Path::new(NETNS_DIR).join(&name).exists() {
                let _ = Command::new("ip")
                    .args(["netns", "del", &name])
                    .stderr(Stdio::null())
                    .process_group(0)
                    .status();
            }
            ip_batch(None, &format!("netns add {name}"))?;
            self.created.push(name.clone());
            let netns = Netns::open(&name).map_err(|source| TopologyError::Netns {
                name: name.clone(),
                source,
            })?;
            self.opened.insert(place, Arc::new(netns));
        }
        let switch = self.netns_name(Place::Switch);
        let mut batch = String::from("link add br0 type bridge\nlink set br0 up\nlink set lo up\n");
        for n in 1..=self.nodes {
            let node = self.netns_name(Place::Node(n));
            batch += &format!("link add n{n} type veth peer name eth0 netns {node}\n");
            batch += &format!("link set n{n} master br0 up\n");
        }
        ip_batch(Some(&switch), &batch)?;
        for n in 1..=self.nodes {
            self.build_node(n)?;
        }
        Ok(())
    }

    fn build_node(&self, n: usize) -> Result<(), TopologyError> {
        let node = self.netns_name(Place::Node(n));
        self.sysctls(
            Place::Node(n),
            &[
                ("ipv4/ip_forward", "1"),
                ("ipv4/conf/all/rp_filter", "0"),
                ("ipv4/conf/default/rp_filter", "0"),
                ("ipv6/conf/all/forwarding", "1"),
            ],
        )?;
        let gateway = gateway_ip(n);
        let gateway6 = gateway_ip6(n);
        // `nodad`: an address is usable at once, not after a second of duplicate detection.
        let mut batch = format!(
            "link set lo up\naddr add {}/24 dev eth0\naddr add {}/64 dev eth0 nodad\nlink set eth0 up\n",
            self.node_ip(n),
            self.node_ip6(n)
        );
        for other in (1..=self.nodes).filter(|&o| o != n) {
            batch += &format!(
                "route add 10.201.{other}.0/24 via {}\n",
                self.node_ip(other)
            );
            batch += &format!(
                "route add {} via {}\n",
                pod_range6(other),
                self.node_ip6(other)
            );
        }
        for p in 1..=self.pods_per_node {
            let pod = self.netns_name(Place::Pod(n, p));
            batch += &format!("link add p{p} type veth peer name eth0 netns {pod}\n");
            batch += &format!("addr add {gateway}/32 dev p{p}\nlink set p{p} up\n");
            batch += &format!("addr add {gateway6}/128 dev p{p} nodad\n");
            batch += &format!("route add {}/32 dev p{p} scope link\n", self.pod_ip(n, p));
            batch += &format!("route add {}/128 dev p{p}\n", self.pod_ip6(n, p));
        }
        ip_batch(Some(&node), &batch)?;
        for p in 1..=self.pods_per_node {
            self.build_pod(n, p)?;
        }
        Ok(())
    }

    fn build_pod(&self, n: usize, p: usize) -> Result<(), TopologyError> {
        let pod = self.netns_name(Place::Pod(n, p));
        self.sysctls(
            Place::Pod(n, p),
            &[
                ("ipv4/conf/all/rp_filter", "0"),
                ("ipv4/conf/default/rp_filter", "0"),
                ("ipv4/conf/eth0/rp_filter", "0"),
            ],
        )?;
        let ip = self.pod_ip(n, p);
        let ip6 = self.pod_ip6(n, p);
        let gateway = gateway_ip(n);
        let gateway6 = gateway_ip6(n);
        let batch = format!(
            "link set lo up\naddr add {ip}/32 dev eth0\naddr add {ip6}/128 dev eth0 nodad\n\
             link set eth0 up\n\
             route add {gateway} dev eth0 scope link\n\
             route add default via {gateway} dev eth0 src {ip}\n\
             route add {gateway6}/128 dev eth0\n\
             route add default via {gateway6} dev eth0 src {ip6}\n"
        );
        ip_batch(Some(&pod), &batch)
    }

    /// Writes `/proc/sys/net/<key>` from inside the place's namespace.
    fn sysctls(&self, place: Place, settings: &[(&str, &str)]) -> Result<(), TopologyError> {
        let netns = self.netns(place)?;
        for (key, value) in settings {
            let path = format!("/proc/sys/net/{key}");
            netns
                .enter(|| std::fs::write(&path, value))
                .and_then(|r| r)
                .map_err(|source| TopologyError::Sysctl {
                    key: key.to_string(),
                    value: value.to_string(),
                    place,
                    source,
                })?;
        }
        Ok(())
    }

    /// This topology's name prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The number of nodes.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The number of pods on each node.
    pub fn pods_per_node(&self) -> usize {
        self.pods_per_node
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
    pub fn netns(&self, place: Place) -> Result<Arc<Netns>, TopologyError> {
        self.opened
            .get(&place)
            .cloned()
            .ok_or(TopologyError::UnknownPlace(place))
    }

    /// Node `n`'s address on the bridge: 10.200.0.n.
    pub fn node_ip(&self, n: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 200, 0, n as u8))
    }

    /// Pod `p` of node `n`: 10.201.n.(p+1) (.1 is the node's gateway address).
    pub fn pod_ip(&self, n: usize, p: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 201, n as u8, (p + 1) as u8))
    }

    /// Node `n`'s IPv6 address on the bridge: fd00:200::n.
    pub fn node_ip6(&self, n: usize) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, n as u16))
    }

    /// Pod `p` of node `n`'s IPv6 address: fd00:201:n::(p+1) (`::1` is the node's gateway).
    pub fn pod_ip6(&self, n: usize, p: usize) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x201,
            n as u16,
            0,
            0,
            0,
            0,
            (p + 1) as u16,
        ))
    }

    /// Turns IPv6 off in pod (n, p)'s namespace (`net.ipv6.conf.{all,default}.disable_ipv6`),
    /// which removes its IPv6 addresses: the pod is IPv4-only from then on.
    pub fn disable_ipv6(&self, n: usize, p: usize) -> Result<(), TopologyError> {
        self.sysctls(
            Place::Pod(n, p),
            &[
                ("ipv6/conf/all/disable_ipv6", "1"),
                ("ipv6/conf/default/disable_ipv6", "1"),
            ],
        )
    }

    /// Runs a command inside a place and returns its stdout; the error carries its stderr.
    pub fn run_in(&self, place: Place, args: &[&str]) -> Result<String, TopologyError> {
        let Some((program, rest)) = args.split_first() else {
            return Err(TopologyError::Command {
                program: String::new(),
                place,
                reason: "empty command".into(),
            });
        };
        let failed = |reason: String| TopologyError::Command {
            program: program.to_string(),
            place,
            reason,
        };
        let mut command = Command::new(program);
        command.args(rest).stdin(Stdio::null());
        self.enter_on_exec(place, &mut command)?;
        let output = command.output().map_err(|e| failed(e.to_string()))?;
        if !output.status.success() {
            return Err(failed(format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts a process inside a place; it is killed (by its pid) when the guard drops.
    pub fn spawn_in(
        &self,
        place: Place,
        mut command: Command,
    ) -> Result<ChildGuard, TopologyError> {
        self.enter_on_exec(place, &mut command)?;
        let child = command.spawn().map_err(|e| TopologyError::Command {
            program: command.get_program().to_string_lossy().into_owned(),
            place,
            reason: e.to_string(),
        })?;
        Ok(ChildGuard(child))
    }

    fn enter_on_exec(&self, place: Place, command: &mut Command) -> Result<(), TopologyError> {
        crate::net::enter_before_exec(command, &*self.netns(place)?);
        Ok(())
    }

    /// A socket factory for a place: no mark, as an application's sockets have none.
    pub fn app_sockets(&self, place: Place) -> Result<SocketFactory, TopologyError> {
        Ok(SocketFactory {
            netns: Some(self.netns(place)?),
            mark: None,
        })
    }

    /// An echo server on `pod_ip(n, p):port` inside the pod (a tokio task, stopped on drop).
    pub fn echo_server(&self, n: usize, p: usize, port: u16) -> Result<SocketAddr, TopologyError> {
        self.echo_server_at(Place::Pod(n, p), SocketAddr::new(self.pod_ip(n, p), port))
    }

    /// An echo server on `addr` inside `place` (a tokio task, stopped on drop).
    pub fn echo_server_at(
        &self,
        place: Place,
        addr: SocketAddr,
    ) -> Result<SocketAddr, TopologyError> {
        self.serve(place, addr, |mut stream, _| {
            Box::pin(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            })
        })
    }

    /// A server that writes the client's address as seen by the app (`ip:port\n`), then closes.
    pub fn whoami_server(
        &self,
        n: usize,
        p: usize,
        port: u16,
    ) -> Result<SocketAddr, TopologyError> {
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
    /// Must be called within a tokio runtime.
    pub fn serve(
        &self,
        place: Place,
        addr: SocketAddr,
        handle: Handler,
    ) -> Result<SocketAddr, TopologyError> {
        let listener = self
            .app_sockets(place)?
            .listener(addr, false)
            .map_err(|source| TopologyError::Listen {
                addr,
                place,
                source,
            })?;
        let task = tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                tokio::spawn(handle(stream, peer));
            }
        });
        self.keep_task(task);
        Ok(addr)
    }

    /// Stops `task` when the topology drops.
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
        let sockets = self
            .app_sockets(Place::Pod(n, p))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string()))?;
        sockets.connect(dst, None).await
    }
}

impl Drop for Topology {
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
                .process_group(0)
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("topology: could not delete netns {name}");
            }
        }
    }
}

/// A child process killed (by its pid) when the guard drops.
pub struct ChildGuard(Child);

impl ChildGuard {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// The child, to wait on it or read its pipes.
    pub fn child(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn gateway_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, n as u8, 1)
}

fn gateway_ip6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x201, n as u16, 0, 0, 0, 0, 1)
}

/// Node `n`'s IPv6 pod range.
fn pod_range6(n: usize) -> String {
    format!("fd00:201:{n:x}::/64")
}

/// Runs `ip [-n netns] -batch -` with `commands`. Like every `ip` the topology runs, in its own
/// process group: a Ctrl-C at the terminal goes to the owner, who then builds or tears down in
/// order instead of finding half a batch applied.
fn ip_batch(netns: Option<&str>, commands: &str) -> Result<(), TopologyError> {
    let mut command = Command::new("ip");
    command.process_group(0);
    if let Some(netns) = netns {
        command.args(["-n", netns]);
    }
    let mut child = command
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(TopologyError::NoIp)?;
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(commands.as_bytes()),
        None => Ok(()),
    };
    let output = child.wait_with_output().map_err(TopologyError::NoIp)?;
    if !output.status.success() || written.is_err() {
        return Err(TopologyError::IpBatch {
            netns: netns.map(str::to_string),
            commands: commands.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}
