//! The demo's running world: the namespace topology, a private working directory (mesh, node
//! configs, logs), the apps in the pods, the mesh's source (a `ztund controlplane` it started, or
//! a mesh file and a built-in CA), one real `ztund run` per node with the demo as its istio-cni
//! agent; with the eBPF capture backend also the pods' sandboxes, cgroups and a bpffs
//! (`sandbox`). Dropping it kills the daemons, closes the agents, kills the sandboxes and removes
//! their cgroups and the bpffs, kills the control plane, deletes the namespaces and removes the
//! directory, in that order.

use std::fs::{DirBuilder, File};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::DemoError;
use super::agent::CniAgent;
use super::controlplane::{self, ControlPlane};
use super::sandbox::{self, EbpfPods};
use super::scenario::{self, NODES, NodeSource, PODS, PODS_PER_NODE};
use crate::config::CaptureBackend;
use crate::topology::{ChildGuard, Place, Topology};

/// The prefix of every namespace the demo creates.
pub const PREFIX: &str = "ztdemo";

/// The name of the demo's working directory under the temp dir, before the pid.
const WORK_DIR_PREFIX: &str = "ztund-demo-";

/// How long a daemon may take to answer its readiness probe.
const READY_DEADLINE: Duration = Duration::from_secs(15);

/// One node's daemon and where its log goes.
pub struct NodeDaemon {
    pub node: usize,
    pub log: PathBuf,
    child: ChildGuard,
}

impl NodeDaemon {
    /// The daemon's log so far (empty when it cannot be read).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }
}

/// Everything the demo made; torn down on drop (fields drop in this order).
pub struct World {
    pub daemons: Vec<NodeDaemon>,
    agents: Vec<CniAgent>,
    /// The eBPF backend's sandboxes, cgroups and bpffs; `None` with nftables.
    ebpf: Option<EbpfPods>,
    /// The mesh's source when it is `ztund controlplane`; `None`: the mesh file.
    pub control_plane: Option<ControlPlane>,
    pub topology: Topology,
    pub dir: WorkDir,
    /// `--ipv6`: pods, the VIP, the control plane and every flow on IPv6 addresses.
    pub ipv6: bool,
    /// The mesh as first written.
    mesh: String,
}

impl World {
    /// Builds the namespaces (for eBPF, with the pods' sandboxes), writes the mesh into the
    /// control plane's directory and starts it, starts the apps and the daemons, hands each
    /// daemon its node's pods, and waits until every daemon is ready. Anything made before a
    /// failure is removed again.
    pub async fn start(ipv6: bool, backend: CaptureBackend) -> Result<World, DemoError> {
        let dir = WorkDir::create()?;
        let topology = Topology::with_prefix(PREFIX, NODES, PODS_PER_NODE)?;
        let mesh = scenario::mesh_yaml(
            &scenario::placements(&topology, ipv6),
            scenario::echo_vip(ipv6),
        );
        let mut world = World {
            daemons: Vec::new(),
            agents: Vec::new(),
            ebpf: None,
            control_plane: None,
            topology,
            dir,
            ipv6,
            mesh,
        };
        if backend == CaptureBackend::Ebpf {
            // Before the daemons: ztund finds a pod's cgroup from its sandbox when handed it.
            world.ebpf = Some(EbpfPods::start(&world.topology, world.dir.path())?);
        }
        let cp_dir = world.dir.path().join("cp");
        DirBuilder::new()
            .mode(0o700)
            .create(&cp_dir)
            .map_err(|source| DemoError::File {
                path: cp_dir.clone(),
                source,
            })?;
        controlplane::replace_file(&cp_dir.join("mesh.yaml"), &world.mesh)?;
        world.control_plane =
            Some(ControlPlane::start(&world.topology, world.dir.path(), ipv6).await?);
        for pod in PODS {
            if let Some(addr) = pod.addr(&world.topology, ipv6) {
                world.topology.echo_server_at(pod.place(), addr)?;
            }
        }
        for n in 1..=NODES {
            world.agents.push(CniAgent::listen(n, world.dir.path())?);
            let config = world.node_config(n)?;
            let daemon = world.spawn_daemon(n, &config)?;
            world.daemons.push(daemon);
        }
        for (agent, daemon) in world.agents.iter_mut().zip(&world.daemons) {
            if let Err(reason) = agent.hand_over_pods(&world.topology, backend).await {
                return Err(DemoError::Daemon {
                    node: scenario::node_name(daemon.node),
                    reason: reason.to_string(),
                    log: daemon.log_tail(),
                });
            }
        }
        for daemon in &mut world.daemons {
            wait_ready(&world.topology, daemon).await?;
        }
        Ok(world)
    }

    /// The control plane, started by [`World::start`].
    fn control_plane(&self) -> Result<&ControlPlane, DemoError> {
        self.control_plane
            .as_ref()
            .ok_or_else(|| DemoError::Setup("the control plane is not running".into()))
    }

    /// Writes node `n`'s token and config and returns the config's path.
    fn node_config(&self, n: usize) -> Result<PathBuf, DemoError> {
        let node = scenario::node_name(n);
        let cp = self.control_plane()?;
        // A trailing newline, as `kubectl create secret` and editors leave one.
        let token = self
            .dir
            .write(&format!("token-{node}"), &format!("{}\n", cp.token(&node)?))?;
        let root = cp.root_cert();
        let source = NodeSource {
            address: cp.listen,
            root_cert: &root,
            token_file: &token,
        };
        let bpf_dir = self.ebpf.as_ref().map(|e| e.bpffs.node_dir(n));
        let text = scenario::node_config(n, self.dir.path(), source, bpf_dir.as_deref());
        self.dir.write(&format!("{node}.yaml"), &text)
    }

    /// Adds or replaces policy `name` as a file of its own in the control plane's directory.
    /// Returns where it went.
    pub fn write_policy(&self, name: &str, yaml: &str) -> Result<PathBuf, DemoError> {
        let path = self.control_plane()?.dir.join(format!("{name}.yaml"));
        controlplane::replace_file(&path, yaml)?;
        Ok(path)
    }

    fn spawn_daemon(&self, n: usize, config: &Path) -> Result<NodeDaemon, DemoError> {
        let log = self
            .dir
            .path()
            .join(format!("{}.log", scenario::node_name(n)));
        let log_file = File::create(&log).map_err(|source| DemoError::File {
            path: log.clone(),
            source,
        })?;
        let mut command = daemon_command(log_file)?;
        command
            .args(["--log-json", "run", "--config"])
            .arg(config)
            .env("ZTUND_LOG", "info,access=info")
            .env("ZTUND_WORKER_THREADS", "1");
        let child = self.topology.spawn_in(Place::Node(n), command)?;
        Ok(NodeDaemon {
            node: n,
            log,
            child,
        })
    }

    /// Connects to `target` from an app at `place`, with a plain unmarked socket; in a pod of the
    /// eBPF world the socket is made by the pod's sandbox, so it belongs to the pod's cgroup
    /// and ztund captures it.
    pub async fn connect(&self, place: Place, target: SocketAddr) -> io::Result<TcpStream> {
        if let Some(sandbox) = self.ebpf.as_ref().and_then(|e| e.sandbox(place)) {
            let socket = sandbox.socket(target.is_ipv6())?;
            socket.set_nonblocking(true)?;
            socket.set_tcp_nodelay(true)?;
            let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
            return socket.connect(target).await;
        }
        let sockets = self.topology.app_sockets(place).map_err(io::Error::other)?;
        sockets.connect(target, None).await
    }

    /// The daemon of node `n`.
    pub fn daemon(&self, n: usize) -> Option<&NodeDaemon> {
        self.daemons.iter().find(|d| d.node == n)
    }
}

/// This binary.
pub fn ztund_exe() -> Result<PathBuf, DemoError> {
    std::env::current_exe().map_err(|e| DemoError::Setup(format!("finding the ztund binary: {e}")))
}

/// This binary as a background process of the demo, its stderr to `log`: out of the terminal's
/// process group (Ctrl-C reaches only the demo, which stops it itself, in order) and killed if
/// the demo dies.
pub fn daemon_command(log: File) -> Result<Command, DemoError> {
    let mut command = Command::new(ztund_exe()?);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe. The process dies with the demo even if the demo is
    // killed outright; the demo forks from its main thread, which lives as long as it does.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    Ok(command)
}

/// Polls node `n`'s readiness endpoint (15021 inside the node namespace) until it answers 200.
async fn wait_ready(topology: &Topology, daemon: &mut NodeDaemon) -> Result<(), DemoError> {
    let deadline = Instant::now() + READY_DEADLINE;
    let sockets = topology.app_sockets(Place::Node(daemon.node))?;
    let probe = SocketAddr::from(([127, 0, 0, 1], 15021));
    loop {
        if let Ok(Some(status)) = daemon.child.child().try_wait() {
            return Err(DemoError::Daemon {
                node: scenario::node_name(daemon.node),
                reason: format!("exited ({status})"),
                log: daemon.log_tail(),
            });
        }
        if let Ok(mut stream) = sockets.connect(probe, None).await {
            let request =
                b"GET /healthz/ready HTTP/1.1\r\nHost: ztund\r\nConnection: close\r\n\r\n";
            let mut answer = String::new();
            if stream.write_all(request).await.is_ok()
                && stream.read_to_string(&mut answer).await.is_ok()
                && answer.starts_with("HTTP/1.1 200")
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(DemoError::Daemon {
                node: scenario::node_name(daemon.node),
                reason: format!("not ready after {}s", READY_DEADLINE.as_secs()),
                log: daemon.log_tail(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A private directory under the system temp dir, removed on drop.
pub struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> Result<WorkDir, DemoError> {
        let temp = std::env::temp_dir();
        // The caller holds the demo lock, so any other demo directory was left by a demo that
        // was killed outright.
        if let Ok(entries) = std::fs::read_dir(&temp) {
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(WORK_DIR_PREFIX)
                {
                    sandbox::remove_leftovers(&entry.path());
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let path = temp.join(format!("{WORK_DIR_PREFIX}{}", std::process::id()));
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| DemoError::File {
                path: path.clone(),
                source,
            })?;
        Ok(WorkDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, text: &str) -> Result<PathBuf, DemoError> {
        let path = self.0.join(name);
        std::fs::write(&path, text).map_err(|source| DemoError::File {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
