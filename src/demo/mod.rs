//! `ztund demo`: a two-node mesh from network namespaces on this machine, run from a
//! `ztund controlplane` the demo starts, the real daemons in in-pod capture with the demo as each
//! node's istio-cni agent, real traffic between pods and a table of what the daemons saw; then a
//! policy change pushed while traffic flows; then everything is torn down, also on Ctrl-C. The
//! mesh itself is in `scenario`, the running pieces in `world` (`controlplane`, `agent`, and for
//! the eBPF capture backend `sandbox`), the flows in `traffic`, the policy change in `act`, the
//! printing in `report`.

mod act;
mod agent;
mod controlplane;
mod report;
mod sandbox;
mod scenario;
mod traffic;
mod world;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::capture::bpf::BpfError;
use crate::config::CaptureBackend;
use crate::topology::TopologyError;
use world::World;

pub use sandbox::{SUBCOMMAND as POD_SANDBOX_SUBCOMMAND, SandboxError, serve as serve_pod_sandbox};

/// Only one demo at a time: the namespace names are fixed so a user can find them.
const LOCK_FILE: &str = "/run/ztund-demo.lock";

/// Why the demo could not run (or did not show what it should).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "ztund demo needs root: it creates network namespaces and nftables rules (try: sudo ztund demo)"
    )]
    NotRoot,
    #[error("`{tool}` not found: apt-get install {package}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("another ztund demo is running (it holds {LOCK_FILE})")]
    AlreadyRunning,
    #[error("{0}")]
    Setup(String),
    #[error("building the namespaces: {0}")]
    Topology(#[from] TopologyError),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ztund on {node} {reason}; its last log lines:\n{log}")]
    Daemon {
        node: String,
        reason: String,
        log: String,
    },
    #[error("interrupted by {0}; everything was torn down")]
    Interrupted(&'static str),
    #[error("{0} of the flows above did not end as the mesh's policies say (marked with !)")]
    Unexpected(usize),
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    /// `--capture-backend ebpf` cannot run here (built without clang): the backend's own reason.
    #[error("--capture-backend ebpf: {0}")]
    Bpf(#[source] BpfError),
    /// The eBPF backend's pod sandboxes, cgroups or bpffs.
    #[error("--capture-backend ebpf: {0}")]
    Sandbox(#[from] SandboxError),
}

/// How the demo runs: its command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Keep the topology up until Ctrl-C.
    pub hold: bool,
    /// The pods', the nodes' and the control plane's IPv6 addresses.
    pub ipv6: bool,
    /// How the daemons capture the pods' traffic.
    pub backend: CaptureBackend,
}

/// Runs the demo; with `hold`, keeps the topology up until Ctrl-C; with `ipv6`, on the pods',
/// the nodes' and the control plane's IPv6 addresses; the daemons capture with `backend`.
pub fn run(options: Options) -> Result<(), DemoError> {
    preflight(options.backend)?;
    let _lock = DemoLock::acquire()?;
    // One thread: daemons are forked from it and die with it (PR_SET_PDEATHSIG).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DemoError::Runtime)?;
    runtime.block_on(demo(options))
}

/// Root, `ip`, and `nft` for the nftables backend or the eBPF programs for the eBPF one,
/// checked before anything is made.
fn preflight(backend: CaptureBackend) -> Result<(), DemoError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(DemoError::NotRoot);
    }
    backend_built_in(backend)?;
    let mut tools = vec![("ip", "iproute2")];
    if backend == CaptureBackend::Nftables {
        tools.push(("nft", "nftables"));
    }
    for (tool, package) in tools {
        if !on_path(tool) {
            return Err(DemoError::MissingTool { tool, package });
        }
    }
    Ok(())
}

/// The eBPF backend needs the programs build.rs compiles with clang; without them the demo
/// stops with the backend's own reason. No fall-back to nftables: the user asked to see eBPF.
fn backend_built_in(backend: CaptureBackend) -> Result<(), DemoError> {
    match backend {
        CaptureBackend::Ebpf if !crate::capture::bpf::built_in() => {
            Err(DemoError::Bpf(BpfError::Unavailable))
        }
        _ => Ok(()),
    }
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|dir| is_executable(&dir.join(tool)))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

async fn demo(options: Options) -> Result<(), DemoError> {
    let Options { hold, .. } = options;
    let started = Instant::now();
    let mut stop = Stop::install()?;
    println!(
        "ztund demo: {} nodes × {} pods from network namespaces ({}-*), handed to the real daemons as istio-cni does; capture backend: {}",
        scenario::NODES,
        scenario::PODS_PER_NODE,
        world::PREFIX,
        backend_label(options.backend),
    );
    let world = tokio::select! {
        world = World::start(options.ipv6, options.backend) => world?,
        signal = stop.wait() => return Err(DemoError::Interrupted(signal)),
    };
    print!("{}", describe(&world));
    println!(
        "daemons ready after {:.1}s; sending traffic\n",
        started.elapsed().as_secs_f32()
    );
    let flows = traffic::flows(&world);
    let mut rows = Vec::new();
    for flow in &flows {
        let row = tokio::select! {
            row = traffic::run(&world, flow) => row,
            signal = stop.wait() => return Err(DemoError::Interrupted(signal)),
        };
        rows.push(row);
    }
    print!("{}", report::table(&rows));
    println!();
    let act = tokio::select! {
        act = act::run(&world) => act?,
        signal = stop.wait() => return Err(DemoError::Interrupted(signal)),
    };
    print!("{}", act.1);
    println!();
    print!("{}", report::metrics_lines(&world, hold).await);
    if hold {
        println!(
            "holding: files and daemon logs in {}; Ctrl-C tears it all down",
            world.dir.path().display()
        );
        let signal = stop.wait().await;
        println!("{signal}: tearing down");
    }
    drop(world);
    let ebpf = match options.backend {
        CaptureBackend::Ebpf => ", pod cgroups removed, bpffs unmounted",
        CaptureBackend::Nftables => "",
    };
    println!(
        "torn down: daemons stopped, namespaces deleted{ebpf} ({:.1}s in all)",
        started.elapsed().as_secs_f32()
    );
    let unexpected =
        rows.iter().filter(|r| !r.as_expected).count() + usize::from(!act.0.as_expected);
    match unexpected {
        0 => Ok(()),
        n => Err(DemoError::Unexpected(n)),
    }
}

/// The capture backend as the header names it.
fn backend_label(backend: CaptureBackend) -> &'static str {
    match backend {
        CaptureBackend::Nftables => "nftables (istio-cni's rules in each pod)",
        CaptureBackend::Ebpf => {
            "eBPF (cgroup connect hooks and sk_lookup per pod, no netfilter rules)"
        }
    }
}

/// Who runs where, which policies are in force, and where the mesh comes from, in four lines.
fn describe(world: &World) -> String {
    let mut out = String::new();
    for n in 1..=scenario::NODES {
        let pods: Vec<String> = scenario::placements(&world.topology, world.ipv6)
            .into_iter()
            .filter(|p| p.pod.node == n)
            .map(|p| format!("{} {}", p.pod.name, p.ip))
            .collect();
        out += &format!(
            "  {} ({}): {}\n",
            scenario::node_name(n),
            scenario::node_ip(&world.topology, n, world.ipv6),
            pods.join(", ")
        );
    }
    out += &format!(
        "  Service echo {vip}; PeerAuthentication db-strict (STRICT on db); \
         AuthorizationPolicy db-deny-httpbin (DENY httpbin → db)\n",
        vip = scenario::echo_vip(world.ipv6)
    );
    if let Some(cp) = &world.control_plane {
        out += &format!(
            "  control plane: ztund controlplane on {} at https://{} (Delta xDS + Istio CA, node tokens), serving {}\n",
            scenario::node_name(1),
            cp.listen,
            cp.dir
                .strip_prefix(world.dir.path())
                .unwrap_or(&cp.dir)
                .join("mesh.yaml")
                .display(),
        );
    }
    out
}

/// SIGINT and SIGTERM, watched from the start so a Ctrl-C always tears down.
struct Stop {
    interrupt: Signal,
    terminate: Signal,
}

impl Stop {
    fn install() -> Result<Stop, DemoError> {
        let watch =
            |kind| signal(kind).map_err(|e| DemoError::Setup(format!("watching signals: {e}")));
        Ok(Stop {
            interrupt: watch(SignalKind::interrupt())?,
            terminate: watch(SignalKind::terminate())?,
        })
    }

    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "Ctrl-C",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// An exclusive `flock` on [`LOCK_FILE`], released when the demo's process ends however it ends.
struct DemoLock(#[allow(dead_code)] File);

impl DemoLock {
    fn acquire() -> Result<DemoLock, DemoError> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .map_err(|source| DemoError::File {
                path: LOCK_FILE.into(),
                source,
            })?;
        // SAFETY: flock on an fd this function owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(DemoError::AlreadyRunning);
        }
        Ok(DemoLock(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A build without clang refuses `--capture-backend ebpf` before building anything, with
    /// the backend's message; a build with it (CI's) goes on. nftables needs no programs.
    #[test]
    fn ebpf_without_the_built_programs_is_refused_with_the_backends_reason() {
        assert!(backend_built_in(CaptureBackend::Nftables).is_ok());
        match backend_built_in(CaptureBackend::Ebpf) {
            Ok(()) => assert!(crate::capture::bpf::built_in()),
            Err(e) => {
                assert!(!crate::capture::bpf::built_in());
                let text = e.to_string();
                assert!(
                    text.contains("eBPF capture unavailable: built without clang"),
                    "{text}"
                );
            }
        }
    }
}
