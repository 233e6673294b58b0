//! The demo's `ztund controlplane`: this same binary, started in node 1's namespace on node 1's
//! address (its IPv6 one with `--ipv6`, the nodes dialling `https://[addr]:15012`), serving the mesh YAML from a directory in the demo's working directory; node tokens
//! made with `ztund controlplane token`; files written into its directory in one rename.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::DemoError;
use super::world::{daemon_command, ztund_exe};
use crate::topology::{ChildGuard, Place, Topology};

/// The port the control plane listens on (istiod's).
pub const PORT: u16 = 15012;

/// How long the control plane may take to listen.
const LISTEN_DEADLINE: Duration = Duration::from_secs(15);

/// A running `ztund controlplane`; killed (by its pid) when dropped.
pub struct ControlPlane {
    /// The directory of YAML it serves.
    pub dir: PathBuf,
    pub state: PathBuf,
    pub listen: SocketAddr,
    pub log: PathBuf,
    child: ChildGuard,
}

impl ControlPlane {
    /// Starts it in node 1's namespace serving `work/cp` (which must hold the YAML already) and
    /// waits until it accepts connections; on node 1's address of the demo's family.
    pub async fn start(
        topology: &Topology,
        work: &Path,
        ipv6: bool,
    ) -> Result<ControlPlane, DemoError> {
        let dir = work.join("cp");
        let state = work.join("cp-state");
        let log = work.join("controlplane.log");
        let place = Place::Node(1);
        let listen = SocketAddr::new(super::scenario::node_ip(topology, 1, ipv6), PORT);
        let log_file = std::fs::File::create(&log).map_err(|source| DemoError::File {
            path: log.clone(),
            source,
        })?;
        let mut command = daemon_command(log_file)?;
        command
            .args(["--log-json", "controlplane", "--dir"])
            .arg(&dir)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--state-dir")
            .arg(&state)
            .arg("--san")
            .arg(listen.ip().to_string())
            .env("ZTUND_LOG", "info");
        let mut cp = ControlPlane {
            child: topology.spawn_in(place, command)?,
            dir,
            state,
            listen,
            log,
        };
        let deadline = Instant::now() + LISTEN_DEADLINE;
        let sockets = topology.app_sockets(place)?;
        while sockets.connect(listen, None).await.is_err() {
            let exited = cp.child.child().try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                return Err(DemoError::Daemon {
                    node: "the control plane".into(),
                    reason: match exited {
                        Some(status) => format!("exited ({status})"),
                        None => format!("not listening after {}s", LISTEN_DEADLINE.as_secs()),
                    },
                    log: cp.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(cp)
    }

    /// The root certificate nodes verify it with.
    pub fn root_cert(&self) -> PathBuf {
        self.state.join("ca").join("root-cert.pem")
    }

    /// Node `node`'s token, made by `ztund controlplane token`.
    pub fn token(&self, node: &str) -> Result<String, DemoError> {
        let output = Command::new(ztund_exe()?)
            .args(["controlplane", "token", "--state-dir"])
            .arg(&self.state)
            .args(["--node", node])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| DemoError::Setup(format!("running ztund controlplane token: {e}")))?;
        if !output.status.success() {
            return Err(DemoError::Setup(format!(
                "ztund controlplane token --node {node} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }
}

/// Writes `path` through a temporary file and a rename.
pub fn replace_file(path: &Path, text: &str) -> Result<(), DemoError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let fail = |source| DemoError::File {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, text).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}
