//! Daemon settings: one typed struct loaded from a YAML file, overridden by `ZTUND_*` environment
//! variables and flags, validated in one place. Everything else receives a `Config`.
// Every key an operator can set is documented here first (README's reference follows it).
#![deny(missing_docs)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::scheduling::ThreadScheduling;
pub use crate::tls::KeyExchange;

/// What went wrong reading the daemon config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The config file.
        path: String,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed, or a key or value is not one the config accepts.
    #[error("{path}: {message}")]
    Parse {
        /// The config file.
        path: String,
        /// serde's message, prefixed with the field.
        message: String,
    },
    /// A value parsed but is not allowed (or an override is bad).
    #[error("{path}: field `{field}`: {reason}")]
    Invalid {
        /// The config file, or `environment`.
        path: String,
        /// The key path, e.g. `ports.socks5`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    fn invalid(path: &str, field: &'static str, reason: String) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_string(),
            field,
            reason,
        }
    }
}

/// How pods are handed to ztund.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CaptureMode {
    /// No transparent capture: HBONE and SOCKS5 listeners in the daemon's own namespace; local
    /// workloads are processes of this host reached on their addresses.
    #[default]
    None,
    /// Pods from the mesh file that name a network namespace; ztund installs the redirection.
    Standalone,
    /// Pods from istio-cni over the ZDS socket; istio-cni owns the redirection.
    IstioCni,
    /// A VM host: the host's own processes are the workload, captured in the host namespace.
    Host,
}

/// How a pod's traffic is captured once ztund has its network namespace (capture modes
/// `standalone` and `istio-cni`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CaptureBackend {
    /// nftables rules in the pod (standalone: ztund installs them; istio-cni: istio-cni does).
    #[default]
    Nftables,
    /// ztund's eBPF programs (bpf/): cgroup hooks on the pod's cgroup for outbound, sk_lookup on
    /// its netns for inbound; no netfilter rules in the pod.
    Ebpf,
}

/// Where workload certificates come from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
pub enum CaConfig {
    /// ztund's built-in CA: a directory made by `ztund ca init`.
    Builtin {
        /// The CA directory (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`).
        dir: PathBuf,
    },
    /// An organisation's intermediate in Istio's `cacerts` layout.
    Cacerts {
        /// The directory holding `ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`.
        dir: PathBuf,
    },
    /// Istio's CA API (istiod, or `ztund controlplane`): a CSR per identity over gRPC. Unset
    /// fields are taken from `controlPlane`.
    #[serde(rename_all = "camelCase")]
    Istio {
        /// `https://host:port` of the CA; default `controlPlane.address`.
        #[serde(default)]
        address: Option<String>,
        /// PEM roots the CA's serving certificate must chain to; default `controlPlane.rootCert`.
        #[serde(default)]
        root_cert: Option<PathBuf>,
        /// Bearer token file, re-read for every request; default `controlPlane.tokenFile`.
        #[serde(default)]
        token_file: Option<PathBuf>,
        /// The name checked against the CA's certificate; default `controlPlane.serverName`.
        #[serde(default)]
        server_name: Option<String>,
    },
    /// A SPIRE agent: SVIDs for every local identity through its Delegated Identity API.
    #[serde(rename_all = "camelCase")]
    Spiffe {
        /// The agent's admin socket (serves the Delegated Identity API).
        #[serde(default = "default_spire_admin_socket")]
        admin_socket: PathBuf,
    },
}

fn default_spire_admin_socket() -> PathBuf {
    "/run/spire/admin/admin.sock".into()
}

/// The control plane ztund takes workloads, services and policies from over Delta xDS
/// (istiod, or `ztund controlplane`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// `https://host:port` (istiod: `https://istiod.istio-system.svc:15012`).
    pub address: String,
    /// PEM roots the control plane's serving certificate must chain to.
    pub root_cert: PathBuf,
    /// Bearer token file, re-read on every connect (a projected service-account token for
    /// istiod, a node token for `ztund controlplane`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Sent as `clusterid` metadata and `CLUSTER_ID` node metadata.
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// The name checked against the server's certificate instead of the address's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// This proxy's pod name, namespace and IP, as they appear in the xDS node id
    /// (`ztunnel~IP~POD.NS~NS.svc.cluster.local`); defaults `ztund-<node>`, `istio-system`,
    /// `1.1.1.1` (ztunnel's).
    #[serde(default)]
    pub pod_name: Option<String>,
    /// This proxy's namespace in the node id; default `istio-system`.
    #[serde(default = "default_root_namespace")]
    pub pod_namespace: String,
    /// This proxy's IP in the node id; default `1.1.1.1`.
    #[serde(default)]
    pub instance_ip: Option<IpAddr>,
    /// Extra node metadata (Istio's `proxyMetadata` / `ISTIO_META_*`).
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
}

fn default_cluster_id() -> String {
    "Kubernetes".into()
}

/// Listener ports; Istio's numbers by default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Ports {
    /// HBONE (mTLS + HTTP/2 CONNECT) from other nodes; 15008.
    pub hbone: u16,
    /// SOCKS5, a way into the mesh without capture (on `socks5Bind`); 15080.
    pub socks5: u16,
    /// Where captured outbound connections are redirected (inside each pod); 15001.
    pub outbound: u16,
    /// Where captured plaintext inbound connections are redirected; 15006.
    pub inbound_plaintext: u16,
    /// The admin server, on loopback only; 15000.
    pub admin: u16,
    /// Prometheus metrics; 15020.
    pub metrics: u16,
    /// Readiness (`/healthz/ready`); 15021.
    pub readiness: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            hbone: 15008,
            socks5: 15080,
            outbound: 15001,
            inbound_plaintext: 15006,
            admin: 15000,
            metrics: 15020,
            readiness: 15021,
        }
    }
}

/// Connection pool settings for the HBONE client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PoolConfig {
    /// CONNECT streams one HBONE connection carries at most (less if the peer allows less).
    pub max_streams_per_connection: u32,
    /// An HBONE connection with no stream for this long is closed.
    #[serde(with = "duration_text")]
    pub idle_timeout: Duration,
    /// Pause after each PONG before the next keepalive PING on an HBONE connection.
    #[serde(with = "duration_text")]
    pub keepalive_interval: Duration,
    /// A PING unanswered this long closes the HBONE connection and takes it out of the pool:
    /// how long a blackholed peer node can hold the streams on it.
    #[serde(with = "duration_text")]
    pub keepalive_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// TLS settings of HBONE (both the server on 15008 and the pooled client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Key-exchange groups: `pqc-preferred` (default: hybrid post-quantum X25519MLKEM768 first,
    /// X25519 still agreed with a classic-only peer), `pqc-only` (a classic-only peer fails the
    /// handshake) or `classic` (never ML-KEM). See [`KeyExchange`].
    pub key_exchange: KeyExchange,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (`--log-json` overrides it).
    #[default]
    Text,
    /// One JSON object per line, fields flattened (`src.addr` is a top-level key).
    Json,
}

/// The data plane's threads (the shards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DataPlaneConfig {
    /// How many; by default a quarter of the node's cores, at least 2 (the apps need the rest).
    /// `ZTUND_WORKER_THREADS` overrides it.
    pub threads: Option<usize>,
    /// `normal`, `batch` or `auto` (see [`ThreadScheduling`]). `ZTUND_DATA_PLANE_SCHEDULING`
    /// overrides it.
    pub scheduling: ThreadScheduling,
}

impl DataPlaneConfig {
    /// `threads`, or the default for this node's cores.
    pub fn thread_count(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            cores.div_ceil(4).max(2)
        })
    }
}

/// The daemon configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// This node's name; workloads whose `node` equals it are local.
    pub node: String,
    /// The SPIFFE trust domain of every identity ztund issues, proves and accepts.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Multi-document Kubernetes/Istio YAML describing the mesh; watched for changes. With a
    /// `controlPlane` too, both are merged (README, "Deployment shapes").
    #[serde(default)]
    pub mesh_file: Option<PathBuf>,
    /// Take workloads, services and policies from a control plane over Delta xDS.
    #[serde(default)]
    pub control_plane: Option<ControlPlaneConfig>,
    /// A directory for the daemon's own state; accepted, but the daemon writes nothing there yet.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where workload certificates come from (`mode` picks the source).
    pub ca: CaConfig,
    /// The lifetime asked for each workload certificate (at least 60s); renewed at half life.
    #[serde(default = "default_cert_ttl", with = "duration_text")]
    pub cert_ttl: Duration,
    /// Listener ports.
    #[serde(default)]
    pub ports: Ports,
    /// Address the SOCKS5 listener binds; localhost unless configured.
    #[serde(default = "default_socks5_bind")]
    pub socks5_bind: IpAddr,
    /// Address of the HBONE listener in capture mode `none` (the node's own namespace).
    #[serde(default = "default_hbone_bind")]
    pub hbone_bind: IpAddr,
    /// How pods are handed to ztund and their traffic captured.
    #[serde(default)]
    pub capture: CaptureMode,
    /// How pods' traffic is captured in modes `standalone` and `istio-cni`; `ZTUND_CAPTURE_BACKEND`
    /// overrides it. A sibling of `capture` (not `capture.backend`) so that every existing
    /// `capture: <mode>` stays valid as it is.
    #[serde(default)]
    pub capture_backend: CaptureBackend,
    /// The bpffs directory the eBPF backend pins its maps and each pod's links under.
    #[serde(default = "default_bpf_dir")]
    pub bpf_dir: PathBuf,
    /// istio-cni's ZDS socket ztund connects to in capture mode `istio-cni`.
    #[serde(default = "default_zds_socket")]
    pub zds_socket: PathBuf,
    /// The HBONE client's connection pool.
    #[serde(default)]
    pub pool: PoolConfig,
    /// The data plane's threads.
    #[serde(default)]
    pub data_plane: DataPlaneConfig,
    /// TLS of HBONE: the key-exchange groups.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Istio's root namespace: policies there apply mesh-wide.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// Log output format.
    #[serde(default)]
    pub log_format: LogFormat,
    /// How often the mesh file is checked for changes.
    #[serde(default = "default_watch_interval", with = "duration_text")]
    pub watch_interval: Duration,
    /// How long open connections may run on after a stop is asked for; the rest are closed then.
    /// `ZTUND_DRAIN_DEADLINE` overrides it. Kubernetes' `terminationGracePeriodSeconds` must
    /// exceed it.
    #[serde(default = "default_drain_deadline", with = "duration_text")]
    pub drain_deadline: Duration,
    /// The DNS proxy (15053): mesh names answered locally, the rest forwarded.
    #[serde(default)]
    pub dns: crate::dns::DnsConfig,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/ztund".into()
}
fn default_cert_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_socks5_bind() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn default_hbone_bind() -> IpAddr {
    IpAddr::from([0, 0, 0, 0])
}
fn default_zds_socket() -> PathBuf {
    "/var/run/ztunnel/ztunnel.sock".into()
}
fn default_bpf_dir() -> PathBuf {
    "/sys/fs/bpf/ztund/v1".into()
}
fn default_root_namespace() -> String {
    "istio-system".into()
}
fn default_watch_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_drain_deadline() -> Duration {
    Duration::from_secs(5)
}

impl Config {
    /// Reads and validates a config file. Relative paths inside it are resolved against the
    /// file's directory, so a config and its mesh file can travel together.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_relative_paths(base);
        Ok(config)
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_path_to_error::deserialize(
            serde_norway::Deserializer::from_str(text),
        )
        .map_err(|e| {
            let field = e.path().to_string();
            let message = if field == "." {
                e.inner().to_string()
            } else {
                format!("field `{field}`: {}", e.inner())
            };
            ConfigError::Parse {
                path: origin.to_string(),
                message,
            }
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    pub(crate) fn resolve_relative_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(mesh) = &mut self.mesh_file {
            fix(mesh);
        }
        fix(&mut self.state_dir);
        fix(&mut self.zds_socket);
        fix(&mut self.bpf_dir);
        self.dns.resolve_relative_paths(base);
        if let Some(cp) = &mut self.control_plane {
            fix(&mut cp.root_cert);
            if let Some(token) = &mut cp.token_file {
                fix(token);
            }
        }
        match &mut self.ca {
            CaConfig::Builtin { dir } | CaConfig::Cacerts { dir } => fix(dir),
            CaConfig::Istio {
                root_cert,
                token_file,
                ..
            } => {
                for path in [root_cert, token_file].into_iter().flatten() {
                    fix(path);
                }
            }
            CaConfig::Spiffe { admin_socket } => fix(admin_socket),
        }
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |field, reason| ConfigError::invalid(origin, field, reason);
        if self.node.trim().is_empty() {
            return Err(invalid("node", "must not be empty".into()));
        }
        if crate::identity::SpiffeId::new(&self.trust_domain, "ns", "sa").is_err() {
            return Err(invalid(
                "trustDomain",
                format!("{:?} is not a valid SPIFFE trust domain", self.trust_domain),
            ));
        }
        if self.mesh_file.is_none() && self.control_plane.is_none() {
            return Err(invalid(
                "meshFile",
                "either meshFile or controlPlane must be set".into(),
            ));
        }
        if let CaConfig::Istio { address: None, .. } = &self.ca
            && self.control_plane.is_none()
        {
            return Err(invalid(
                "ca.address",
                "mode istio needs an address, or a controlPlane to take it from".into(),
            ));
        }
        for (field, value, least, most) in self.duration_bounds() {
            if value < least || value > most {
                let [value, least, most] = [value, least, most].map(duration_text::format);
                return Err(invalid(
                    field,
                    format!("{value} is out of range: must be from {least} to {most}"),
                ));
            }
        }
        if self.capture_backend == CaptureBackend::Ebpf
            && !matches!(
                self.capture,
                CaptureMode::Standalone | CaptureMode::IstioCni
            )
        {
            return Err(invalid(
                "captureBackend",
                "ebpf captures pods: it needs capture standalone or istio-cni".into(),
            ));
        }
        if let Some((field, reason)) = self.dns.invalid() {
            return Err(invalid(field, reason));
        }
        if let Err(err) = self.tls.key_exchange.group_names() {
            return Err(invalid("tls.keyExchange", err.to_string()));
        }
        let counts = [
            (
                "pool.maxStreamsPerConnection",
                u64::from(self.pool.max_streams_per_connection),
                MAX_STREAMS_PER_CONNECTION,
            ),
            (
                "dataPlane.threads",
                self.data_plane.threads.map_or(1, |n| n as u64),
                MAX_DATA_PLANE_THREADS,
            ),
        ];
        for (field, value, most) in counts {
            if value == 0 || value > most {
                return Err(invalid(
                    field,
                    format!("{value} is out of range: must be from 1 to {most}"),
                ));
            }
        }
        let p = &self.ports;
        let all = [
            ("ports.hbone", p.hbone),
            ("ports.socks5", p.socks5),
            ("ports.outbound", p.outbound),
            ("ports.inboundPlaintext", p.inbound_plaintext),
            ("ports.admin", p.admin),
            ("ports.metrics", p.metrics),
            ("ports.readiness", p.readiness),
            ("dns.port", self.dns.port),
        ];
        for (i, (field, port)) in all.iter().enumerate() {
            if *port == 0 {
                return Err(invalid(field, "must not be 0".into()));
            }
            if let Some((other, _)) = all[..i].iter().find(|(_, q)| q == port) {
                return Err(invalid(field, format!("port {port} is also {other}")));
            }
        }
        Ok(())
    }
}

/// More data-plane threads than this is a typo, not a node (each is a runtime and a thread).
const MAX_DATA_PLANE_THREADS: u64 = 1024;
/// HTTP/2 allows 2³¹ streams; past this many on one connection the pool stops spreading load
/// and a single connection's loss takes everything with it.
const MAX_STREAMS_PER_CONNECTION: u64 = 10_000;

impl Config {
    /// Every duration key with its allowed range. Zero is never allowed: a zero period panics
    /// the timer using it (`watchInterval: 0s` once killed the mesh watcher) and a zero
    /// timeout or lifetime ends things at once. The upper bounds stop typos (`24d` for `24h`)
    /// and values whose arithmetic would overflow a timer.
    fn duration_bounds(&self) -> [(&'static str, Duration, Duration, Duration); 6] {
        const MS: Duration = Duration::from_millis(1);
        const SECOND: Duration = Duration::from_secs(1);
        const HOUR: Duration = Duration::from_secs(3600);
        const DAY: Duration = Duration::from_secs(86400);
        [
            // Renewed at half life: shorter than a minute is renewal all the time.
            ("certTtl", self.cert_ttl, 60 * SECOND, 365 * DAY),
            ("pool.idleTimeout", self.pool.idle_timeout, SECOND, DAY),
            // A keepalive faster than 100 ms is PING traffic, not liveness.
            (
                "pool.keepaliveInterval",
                self.pool.keepalive_interval,
                100 * MS,
                HOUR,
            ),
            (
                "pool.keepaliveTimeout",
                self.pool.keepalive_timeout,
                100 * MS,
                HOUR,
            ),
            // Each poll stats the file; faster than 10 ms is a busy loop.
            ("watchInterval", self.watch_interval, 10 * MS, HOUR),
            // Kubernetes' terminationGracePeriodSeconds and systemd's TimeoutStopSec, outside
            // this file, must exceed it (tests/manifests.rs checks the shipped ones).
            ("drainDeadline", self.drain_deadline, MS, HOUR),
        ]
    }
}

#[path = "config_duration.rs"]
pub mod duration_text;
#[path = "config_env.rs"]
mod env;

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
