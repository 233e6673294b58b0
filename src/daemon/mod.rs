//! `ztund run`: wires the pieces together in the order data flows — identity, mesh, policy,
//! listeners, admin — runs until told to stop, then drains.

mod dump;
pub mod handover;
mod identity;
mod limits;
pub mod memory;
pub mod notify;
pub mod pods;
mod sources;
pub mod supervise;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{
    AdminState, Metrics, Readiness, bind_admin, serve_admin, serve_metrics, serve_readiness,
};
use crate::config::{CaptureMode, Config};
use crate::hbone::pool::{Pool, PoolSettings};
use crate::identity::CertManager;
use crate::logging::LogControl;
use crate::net::SocketFactory;
use crate::proxy::accept::LiveConnections;
use crate::proxy::admission::Admission;
use crate::proxy::context::{Owner, ProxyContext, Scope};
use crate::proxy::originate::Originator;
use crate::proxy::refusals::Refusals;
use crate::proxy::tracker::{self, ConnectionTracker};
use crate::proxy::{inbound, outbound};
use crate::shard::{Shards, Spawner};
use crate::tls::Credentials;
use crate::xds::metrics::XdsMetrics;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("certificate authority: {0}")]
    Ca(#[from] crate::identity::IdentityError),
    #[error("mesh file: {0}")]
    Mesh(#[source] crate::mesh::MeshError),
    /// A remote CA without the field it needs, and no `controlPlane` to take it from.
    #[error("config: ca.{field}: not set, and there is no controlPlane to take it from")]
    CaFieldMissing { field: &'static str },
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin server: {0}")]
    Admin(#[source] crate::admin::AdminError),
    #[error("capture: {0}")]
    Capture(#[from] pods::CaptureStartError),
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("instance registry: {0}")]
    Handover(#[from] handover::HandoverError),
    #[error("systemd notification: {0}")]
    Notify(#[from] notify::NotifyError),
    #[error("background task {task} {failure}")]
    TaskFailed {
        task: &'static str,
        failure: supervise::TaskFailure,
    },
}

/// Runs the daemon until SIGINT/SIGTERM or `POST /quitquitquit`.
pub fn run(config: Config, log: LogControl) -> Result<(), DaemonError> {
    memory::keep_freed_heap();
    limits::raise_open_files();
    // The main runtime does control work only (mesh, certificates, admin); the data plane
    // runs on the shards, one thread each.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ztund")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let data_plane = config.data_plane;
    let shards = Shards::start(data_plane.thread_count(), data_plane.scheduling)
        .map_err(DaemonError::Runtime)?;
    let result = runtime.block_on(serve(Arc::new(config), log, shards.spawner()));
    // Connections still open on the shards end here, after the drain.
    drop(shards);
    result
}

async fn serve(config: Arc<Config>, log: LogControl, shards: Spawner) -> Result<(), DaemonError> {
    info!(node = %config.node, trust_domain = %config.trust_domain, "ztund starting");
    let notifier = notify::Notifier::from_env()?;
    let watchdog_interval = notify::watchdog_interval()?;
    notifier.status("starting");
    // Held until this function returns: a stopping instance sees a successor by its lock.
    let instance = handover::Instance::register(&config.state_dir)?;
    if let Some(pid) = instance.successor_running() {
        info!(
            pid,
            "another ztund runs on this node: taking over from pid {pid}"
        );
    }
    let (drain_tx, drain) = watch::channel(false);
    let readiness = Readiness::new();
    let supervisor = supervise::Supervisor::new(readiness.clone(), drain.clone());

    // Identity: the source `ca` names, its requests counted; certificates follow this node's
    // workloads (`identity::follow_local_identities`, started once the mesh is known).
    let counted = identity::Counted::new(identity::source(&config)?);
    let certificates = CertManager::new(counted.clone());
    // One crypto library for HBONE, tonic and everything else; the groups `tls.keyExchange` names.
    crate::tls::install_process_default();
    let credentials =
        Arc::new(Credentials::new(certificates.clone()).with_key_exchange(config.tls.key_exchange));
    let xds_metrics = XdsMetrics::new();
    let hbone_limits = crate::hbone::Limits::server();
    // One budget of bytes queued toward peers for the node, served and pooled streams alike.
    let send_budget = crate::hbone::SendBudget::for_limits(&hbone_limits);
    let dns_metrics = crate::dns::DnsMetrics::default();
    let metrics = {
        let (certificates, xds_metrics) = (certificates.clone(), xds_metrics.clone());
        let supervisor = supervisor.clone();
        let (send_budget, dns_metrics) = (send_budget.clone(), dns_metrics.clone());
        Metrics::new_with(move |registry| {
            supervisor.register(registry);
            counted.register(registry);
            xds_metrics.register(registry);
            dns_metrics.register(registry);
            registry.register_collector(Box::new(identity::ExpiryCollector(certificates)));
            registry.register_collector(Box::new(limits::SendBudgetCollector(send_budget)));
        })
    };

    // Mesh: the file, the control plane, or both; an invalid file at start-up stops the daemon
    // with the reason.
    let sources =
        sources::start(&config, &readiness, &supervisor, xds_metrics, drain.clone()).await?;
    let mesh = sources.store.clone();
    let snapshot = mesh.load();
    info!(
        workloads = snapshot.workloads().len(),
        services = snapshot.services().len(),
        control_plane = config.control_plane.as_ref().map(|c| c.address.as_str()),
        "mesh loaded"
    );
    // Restart: the certificates live in the manager and the wanted set is recomputed from the
    // mesh at start, so a fresh copy resumes where the dead one was.
    {
        let (node, mesh, certificates) = (config.node.clone(), mesh.clone(), certificates.clone());
        let (readiness, drain) = (readiness.clone(), drain.clone());
        supervisor.spawn("certificate manager", restart(), move || {
            supervise::never_fails(identity::follow_local_identities(
                node.clone(),
                mesh.clone(),
                certificates.clone(),
                readiness.clone(),
                drain.clone(),
            ))
        });
    }

    tokio::spawn(memory::return_freed_heap(shards.clone()));

    let hbone_budget = {
        let metrics = metrics.clone();
        crate::hbone::ServerBudget::sharing(
            hbone_limits,
            send_budget.clone(),
            Some(Box::new(move |hit| metrics.hbone_limit_hit(hit.name()))),
        )
    };
    let pool = Arc::new(Pool::sharing(PoolSettings::from(&config.pool), send_budget));
    let ctx = Arc::new(ProxyContext {
        config: config.clone(),
        mesh: mesh.clone(),
        credentials,
        pool,
        metrics: metrics.clone(),
        tracker: ConnectionTracker::new(),
        originator: Arc::new(Originator::new()),
        drain: drain.clone(),
        live: Arc::new(LiveConnections::default()),
        shards: shards.clone(),
        hbone_budget: hbone_budget.clone(),
        admission: admission(&metrics),
    });
    // Restart: the open connections live in the tracker; a fresh copy rechecks them against
    // the mesh at once, so a DENY that arrived while none ran is enforced then.
    {
        let (tracker, mesh, metrics, drain) = (
            ctx.tracker.clone(),
            mesh.clone(),
            metrics.clone(),
            drain.clone(),
        );
        supervisor.spawn("policy enforcer", restart(), move || {
            supervise::never_fails(tracker::watch_policies(
                tracker.clone(),
                mesh.clone(),
                metrics.clone(),
                drain.clone(),
            ))
        });
    }

    // Listeners. Queued connections must survive a hand-over in this namespace too.
    if let Err(e) = crate::net::enable_request_migration(None) {
        warn!(error = %e, "connections queued at a restart will be reset");
    }
    let ports = &config.ports;
    let node_scope = Scope {
        owner: Owner::Node,
        sockets: SocketFactory::default(),
    };
    let host_capture = match config.capture {
        CaptureMode::None => {
            let hbone = bind_per_shard(
                &shards,
                "HBONE",
                SocketAddr::new(config.hbone_bind, ports.hbone),
            )?;
            let (ctx, scope) = (ctx.clone(), node_scope.clone());
            shards.serve_each(hbone, move |listener| {
                inbound::serve(ctx.clone(), scope.clone(), listener)
            });
            None
        }
        other => {
            // The DNS proxy runs where capture puts listeners: in each pod, or on the VM host.
            let dns = config.dns.enabled.then(|| {
                let domain = crate::mesh::MeshSettings::from_config(&config).cluster_domain;
                let task = readiness.register(crate::dns::READINESS_TASK);
                Arc::new(
                    crate::dns::DnsService::new(
                        &config.dns,
                        &domain,
                        mesh.clone(),
                        dns_metrics.clone(),
                    )
                    .with_readiness(task),
                )
            });
            let started = pods::start(ctx.clone(), other, dns.clone(), &readiness, &supervisor)
                .await
                .map_err(DaemonError::Capture)?;
            // In-pod, the pods' DNS servers are part of their proxies (the proxy manager's
            // task); the host's served already, in `start` (DnsListeners::serve).
            if let Some(dns) = dns.filter(|_| other != CaptureMode::Host) {
                dns.mark_serving();
            }
            started
        }
    };
    let socks5 = bind_per_shard(
        &shards,
        "SOCKS5",
        SocketAddr::new(config.socks5_bind, ports.socks5),
    )?;
    let socks5_ctx = ctx.clone();
    shards.serve_each(socks5, move |listener| {
        outbound::serve(
            socks5_ctx.clone(),
            node_scope.clone(),
            listener,
            outbound::Entry::Socks5,
        )
    });

    // Admin, metrics, readiness.
    let (quit_tx, mut quit) = watch::channel(false);
    let quit_tx = Arc::new(quit_tx);
    let dump_mesh = mesh.clone();
    let dump_certs = certificates.clone();
    let dump_config = config.clone();
    let dump_budget = hbone_budget.clone();
    let key_exchange = config.tls.key_exchange;
    let tls_dump = serde_json::json!({
        "keyExchange": key_exchange,
        "groups": key_exchange.group_names().unwrap_or_default(),
        "cryptoBackend": crate::tls::backend_name(),
    });
    let capture_dump = serde_json::json!({
        "mode": config.capture,
        "backend": config.capture_backend,
        "bpfDir": config.bpf_dir,
    });
    let sources = Arc::new(sources);
    let state = AdminState {
        config_dump: Arc::new(move || {
            let origin = dump::Origin {
                mesh_file: dump_config
                    .mesh_file
                    .as_ref()
                    .map(|p| p.display().to_string()),
                control_plane: dump_config.control_plane.as_ref().and_then(|cp| {
                    let status = sources.status.as_ref()?.borrow().clone();
                    Some((cp.address.clone(), status, sources.provenance()?))
                }),
            };
            let mut dump =
                dump::config_dump(&dump_mesh.load(), &dump_certs, &origin, &dump_budget.limits);
            dump["tls"] = tls_dump.clone();
            dump["capture"] = capture_dump.clone();
            dump
        }),
        log,
        shutdown: quit_tx,
        metrics: metrics.clone(),
    };
    let admin_listeners = bind_admin(ports.admin).await.map_err(DaemonError::Admin)?;
    // The servers stop the daemon when they end: each owns its listening socket, which a
    // fresh copy could not bind again while connections it accepted linger; a daemon nobody
    // can probe or scrape is better restarted whole by kubelet or systemd.
    for listener in admin_listeners {
        supervisor.spawn_once(
            "admin server",
            supervise::never_fails(serve_admin(listener, state.clone(), drain.clone())),
        );
    }
    let metrics_listener = bind("metrics", SocketAddr::from(([0, 0, 0, 0], ports.metrics)))?;
    supervisor.spawn_once(
        "metrics server",
        supervise::never_fails(serve_metrics(
            metrics_listener,
            metrics.clone(),
            drain.clone(),
        )),
    );
    let ready_listener = bind(
        "readiness",
        SocketAddr::from(([0, 0, 0, 0], ports.readiness)),
    )?;
    // Readiness outlives the drain signal: it answers 503 while connections drain.
    let (ready_stop, ready_stopped) = watch::channel(false);
    supervisor.spawn_once(
        "readiness server",
        supervise::never_fails(serve_readiness(
            ready_listener,
            readiness.clone(),
            ready_stopped,
        )),
    );

    // systemd hears READY=1 once /healthz/ready, now listening, would answer 200. A one-shot
    // that ends by design, so not supervised.
    let capture = format!("{:?}", config.capture).to_lowercase();
    tokio::spawn(notify::announce_ready(
        notifier.clone(),
        readiness.clone(),
        format!(
            "ready: node {}, capture {capture}, {} workloads, {} services",
            config.node,
            snapshot.workloads().len(),
            snapshot.services().len()
        ),
    ));
    if let Some(interval) = watchdog_interval {
        info!(interval = ?interval, "petting the systemd watchdog");
        // Restart: it holds nothing but the interval; while it is dead systemd's watchdog
        // may fire, which is the point of one.
        let (notifier, shards, drain) = (notifier.clone(), shards.clone(), drain.clone());
        supervisor.spawn("systemd watchdog", restart(), move || {
            supervise::never_fails(notify::watchdog(
                notifier.clone(),
                interval,
                shards.clone(),
                drain.clone(),
            ))
        });
    }

    info!(
        hbone = ports.hbone,
        socks5 = %SocketAddr::new(config.socks5_bind, ports.socks5),
        "ztund ready"
    );
    let fatal = tokio::select! {
        () = wait_for_stop(&mut quit) => None,
        fatal = supervisor.fatal() => Some(fatal),
    };
    notifier.send("STOPPING=1\nSTATUS=draining");
    drain_connections(
        &config, &ctx.live, &instance, &readiness, drain_tx, ready_stop,
    )
    .await;
    // A stopped ztund leaves the host's network as it found it (the one place teardown runs),
    // unless a successor runs: it has adopted the same table, rule and route.
    if let Some(host) = host_capture {
        match instance.successor_running() {
            Some(pid) => info!(pid, "host redirection left to the successor"),
            None => host.remove(),
        }
    }
    match fatal {
        None => Ok(()),
        Some(supervise::FatalFailure { task, failure }) => {
            Err(DaemonError::TaskFailed { task, failure })
        }
    }
}

fn restart() -> supervise::OnFailure {
    supervise::OnFailure::Restart(supervise::RestartBackoff::default())
}

/// Admission sized to the open-files limit the daemon runs with (raised at start).
fn admission(metrics: &Arc<Metrics>) -> Arc<Admission> {
    let limit = match limits::open_files() {
        Ok((soft, _)) => soft,
        Err(e) => {
            warn!(error = %e, "cannot read the open-files limit; assuming 1024");
            1024
        }
    };
    let admission = Admission::new(limit, Refusals::new(metrics.clone()));
    let caps = admission.limits();
    info!(
        open_files = limit,
        fd_reserve = crate::proxy::admission::fd_reserve(limit),
        pending_handshakes = caps.total,
        pending_handshakes_per_source = caps.per_source,
        "admission limits"
    );
    Arc::new(admission)
}

/// How long before the drain deadline the daemon counts what is still open.
const DRAIN_LOOK_AHEAD: Duration = Duration::from_millis(20);

/// Stops accepting at once (every listener closes, HBONE connections get a GOAWAY), lets open
/// connections run on until they end or `drainDeadline` passes, then returns; the caller's
/// shards close what is left. Readiness answers 503 from the start; with a successor running
/// its readiness listener closes at once too, so probes on the shared port reach the successor.
async fn drain_connections(
    config: &Config,
    live: &LiveConnections,
    instance: &handover::Instance,
    readiness: &Readiness,
    drain: watch::Sender<bool>,
    ready_stop: watch::Sender<bool>,
) {
    let started = Instant::now();
    let successor = instance.successor_running();
    match successor {
        Some(pid) => info!(pid, open = live.count(), "handing over to pid {pid}"),
        None => info!(open = live.count(), "draining"),
    }
    readiness.start_draining();
    drain.send_replace(true);
    if successor.is_some() {
        ready_stop.send_replace(true);
    }
    let deadline = config.drain_deadline;
    // The listeners cut their connections at the deadline themselves (`proxy::accept`), on
    // other threads' timers: looking a moment before it counts what they are about to cut
    // instead of racing them; then the cut is waited for.
    let look = deadline.saturating_sub(DRAIN_LOOK_AHEAD);
    match tokio::time::timeout(look, live.idle()).await {
        Ok(()) => info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "drained: every connection finished"
        ),
        Err(_) => {
            info!(
                open = live.count(),
                deadline_ms = deadline.as_millis() as u64,
                "drain deadline passed: closing the connections still open"
            );
            let _ = tokio::time::timeout(DRAIN_LOOK_AHEAD * 2, live.idle()).await;
        }
    }
    ready_stop.send_replace(true);
}

/// One listener on `addr` per shard (they share the port through `SO_REUSEPORT`).
fn bind_per_shard(
    shards: &Spawner,
    what: &'static str,
    addr: SocketAddr,
) -> Result<Vec<TcpListener>, DaemonError> {
    (0..shards.len()).map(|_| bind(what, addr)).collect()
}

fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, DaemonError> {
    SocketFactory::default()
        .listener(addr, false)
        .map_err(|source| DaemonError::Bind { what, addr, source })
}

async fn wait_for_stop(quit: &mut watch::Receiver<bool>) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            error!(error = %e, "cannot watch SIGTERM");
            let _ = quit.wait_for(|q| *q).await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT"),
        _ = term.recv() => info!("SIGTERM"),
        _ = quit.wait_for(|q| *q) => info!("quit requested"),
    }
}
