//! `ztund controlplane`: a control plane for fleets without Istio. It serves Delta ADS (`ads`)
//! and Istio's CA API (`ca_service`) over TLS on one port, from a directory of the same YAML the
//! standalone mode reads (`source`, translated the way istiod would by `translate`). Nodes
//! authenticate with per-node bearer tokens (`tokens`).
//!
//! State directory layout:
//! - `ca/`: the CA in Istio's `cacerts` layout, created on first start, loaded afterwards (the
//!   key and root survive restarts); clients trust `ca/root-cert.pem`;
//! - `tokens/<node>`: each node's token (mode 0600);
//! - `serving/cert-chain.pem`, `serving/key.pem`: the TLS certificate, issued at every start.
//!
//! A directory that does not parse at start-up stops the start (serving an empty mesh would
//! remove every workload from every node); later, a bad change is refused and logged and the
//! last good configuration keeps being served.

pub mod ads;
pub mod ca_service;
pub mod source;
pub mod tokens;
pub mod translate;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::{error, info};

use crate::identity::{CertificateAuthority, IdentityError, ca};
use crate::mesh::{MeshError, MeshSettings, Snapshot};
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use crate::proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;
use translate::Resources;

/// How often the directory is polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// The serving certificate's lifetime (it is issued again at every start).
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// The largest message accepted from a node (ztunnel allows 200 MiB inbound).
const MAX_MESSAGE: usize = 200 * 1024 * 1024;

/// The command line of `ztund controlplane`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The YAML directory served.
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub trust_domain: String,
    pub root_namespace: String,
    /// Extra names (DNS or IP) for the serving certificate.
    pub sans: Vec<String>,
    /// The longest certificate lifetime granted.
    pub cert_ttl: Duration,
}

/// The configuration being served: the mesh (who runs where, for the CA) and its resources.
#[derive(Debug, Default)]
pub struct Served {
    /// Bumped at every applied change.
    pub generation: u64,
    pub snapshot: Snapshot,
    pub resources: Resources,
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("the directory {dir}: {source}")]
    Config {
        dir: String,
        #[source]
        source: Box<MeshError>,
    },
    #[error("the CA in {dir}: {source}")]
    Ca {
        dir: String,
        #[source]
        source: IdentityError,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on {address}: {reason}")]
    Serve { address: String, reason: String },
}

/// The CA of the state directory: loaded, or created on first start.
pub fn open_ca(
    state_dir: &Path,
    settings: &Settings,
) -> Result<CertificateAuthority, ControlPlaneError> {
    let dir = state_dir.join("ca");
    let ca_error = |source| ControlPlaneError::Ca {
        dir: dir.display().to_string(),
        source,
    };
    if !dir.join(ca::CA_KEY).exists() {
        CertificateAuthority::init(&dir, &settings.trust_domain).map_err(ca_error)?;
        info!(dir = %dir.display(), trust_domain = %settings.trust_domain, "created the CA");
    }
    CertificateAuthority::load(&dir, &settings.trust_domain, settings.cert_ttl).map_err(ca_error)
}

/// The names the serving certificate carries: every `--san`, the listen IP (if specified),
/// `localhost` and 127.0.0.1.
pub fn serving_names(settings: &Settings) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = vec!["localhost".to_string()];
    let mut ips = vec![IpAddr::from([127, 0, 0, 1])];
    if !settings.listen.ip().is_unspecified() {
        ips.push(settings.listen.ip());
    }
    for san in &settings.sans {
        match san.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(san.clone()),
        }
    }
    dns.dedup();
    ips.sort();
    ips.dedup();
    (dns, ips)
}

/// Writes the serving certificate under `STATE/serving/` and returns it as a TLS identity.
fn serving_identity(
    ca: &CertificateAuthority,
    settings: &Settings,
) -> Result<Identity, ControlPlaneError> {
    let (dns, ips) = serving_names(settings);
    let (chain, key) = ca
        .issue_serving(&dns, &ips, SERVING_CERT_TTL)
        .map_err(|source| ControlPlaneError::Ca {
            dir: settings.state_dir.join("ca").display().to_string(),
            source,
        })?;
    let dir = settings.state_dir.join("serving");
    write_private(&dir, "cert-chain.pem", chain.as_bytes(), 0o644)?;
    write_private(&dir, "key.pem", key.as_bytes(), 0o600)?;
    info!(dns = ?dns, ips = ?ips, "serving certificate issued");
    Ok(Identity::from_pem(chain, key))
}

fn write_private(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), ControlPlaneError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let io = |source| ControlPlaneError::Io {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// Runs the control plane on its own runtime until the process is stopped.
pub fn run_blocking(settings: Settings) -> Result<(), ControlPlaneError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ztund-cp")
        .enable_all()
        .build()
        .map_err(|source| ControlPlaneError::Io {
            path: "the tokio runtime".into(),
            source,
        })?;
    runtime.block_on(run(settings))
}

/// Runs the control plane until the process is stopped.
pub async fn run(settings: Settings) -> Result<(), ControlPlaneError> {
    let mesh = MeshSettings {
        trust_domain: settings.trust_domain.clone(),
        cluster_domain: "cluster.local".into(),
        root_namespace: settings.root_namespace.clone(),
    };
    let dir_error = |source| ControlPlaneError::Config {
        dir: settings.dir.display().to_string(),
        source: Box::new(source),
    };
    let (loaded, hash) = source::load_with_hash(&settings.dir, &mesh).map_err(dir_error)?;
    info!(
        dir = %settings.dir.display(), files = loaded.files.len(),
        workloads = loaded.snapshot.workloads().len(), services = loaded.snapshot.services().len(),
        "configuration loaded"
    );
    let (tx, served) = watch::channel(Arc::new(Served {
        generation: 0,
        snapshot: loaded.snapshot,
        resources: loaded.resources,
    }));
    let watch = source::DirWatch::new(settings.dir.clone(), mesh, hash);
    tokio::spawn(watch_dir(watch, tx));

    let ca = Arc::new(open_ca(&settings.state_dir, &settings)?);
    let identity = serving_identity(&ca, &settings)?;
    let tokens = Arc::new(tokens::TokenStore::new(&settings.state_dir));
    let ads = ads::Ads {
        tokens: tokens.clone(),
        served: served.clone(),
    };
    let ca_service = ca_service::CaService {
        tokens,
        served,
        ca,
        max_ttl: settings.cert_ttl,
    };
    let address = settings.listen.to_string();
    let serve_error = |reason: String| ControlPlaneError::Serve {
        address: address.clone(),
        reason,
    };
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| serve_error(e.to_string()))?;
    let local = listener
        .local_addr()
        .map_err(|e| serve_error(e.to_string()))?;
    info!(address = %local, "serving Delta ADS and the Istio CA API");
    Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))
        .map_err(|e| serve_error(e.to_string()))?
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(
            AggregatedDiscoveryServiceServer::new(ads).max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(IstioCertificateServiceServer::new(ca_service))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await
        .map_err(|e| serve_error(e.to_string()))
}

/// Polls the directory and publishes each valid change.
async fn watch_dir(mut watch: source::DirWatch, tx: watch::Sender<Arc<Served>>) {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let polled = tokio::task::spawn_blocking(move || {
            let outcome = watch.poll();
            (watch, outcome)
        })
        .await;
        let outcome;
        (watch, outcome) = match polled {
            Ok(polled) => polled,
            Err(_) => return,
        };
        match outcome {
            source::Poll::Unchanged => {}
            source::Poll::Applied(loaded) => {
                let generation = tx.borrow().generation + 1;
                info!(
                    generation,
                    files = loaded.files.len(),
                    workloads = loaded.snapshot.workloads().len(),
                    services = loaded.snapshot.services().len(),
                    "configuration applied"
                );
                tx.send_replace(Arc::new(Served {
                    generation,
                    snapshot: loaded.snapshot,
                    resources: loaded.resources,
                }));
            }
            source::Poll::Refused(e) => {
                error!(error = %e, "configuration refused; the last good one keeps being served");
            }
        }
    }
}
