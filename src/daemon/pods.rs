//! Capture wiring: per-pod listeners (15001/15006/15008 inside each pod's namespace) for the pods
//! that istio-cni (ZDS) or the mesh file (standalone) hand over, and host mode for a VM.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::supervise::{OnFailure, RestartBackoff, Supervisor, never_fails};
use crate::admin::Readiness;
use crate::capture::CaptureError;
use crate::capture::bpf::{BpfSettings, PodCapture};
use crate::capture::nft::{self, HostRedirection, RedirectPorts};
use crate::capture::nft_dns;
use crate::capture::pods::{PodError, PodInfo, PodManager, PodProxies};
use crate::capture::zds::ZdsClient;
use crate::config::{CaptureBackend, CaptureMode, Config};
use crate::dns::{DnsListeners, DnsScope, DnsService};
use crate::mesh::Snapshot;
use crate::net::{Netns, SocketFactory};
use crate::proxy::context::{Owner, PodRef, ProxyContext, Scope};
use crate::proxy::outbound::Entry;
use crate::proxy::{inbound, inbound_plaintext, outbound};

/// Why transparent capture could not start.
#[derive(Debug, thiserror::Error)]
pub enum CaptureStartError {
    /// `nft`/`ip` are missing, or the host's rules could not be installed.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// A listener could not be bound (host mode binds the same set a pod gets).
    #[error(transparent)]
    Listeners(#[from] PodError),
    /// The eBPF backend was chosen but cannot run here (the reason names what is missing:
    /// clang at build time, a capability, the bpffs, or the verifier's message).
    #[error("capture backend ebpf: {0}")]
    Bpf(#[from] crate::capture::bpf::BpfError),
    /// Host mode could not open the namespace it runs in.
    #[error("opening this namespace: {0}")]
    OwnNetns(#[source] std::io::Error),
}

/// Starts transparent capture in the configured mode. Host mode returns what the daemon must
/// remove when it stops.
///
/// Every task here restarts when it fails: the pods' state lives in the [`PodManager`] (and the
/// host's rules in the kernel), so a fresh copy picks up from it.
pub async fn start(
    ctx: Arc<ProxyContext>,
    mode: CaptureMode,
    dns: Option<Arc<DnsService>>,
    readiness: &Readiness,
    supervisor: &Supervisor,
) -> Result<Option<HostCapture>, CaptureStartError> {
    let ports = RedirectPorts::from(&ctx.config.ports);
    match mode {
        CaptureMode::None => Ok(None),
        CaptureMode::Host => start_host(ctx, ports, dns, supervisor).map(Some),
        CaptureMode::Standalone => {
            let bpf = start_bpf(&ctx.config)?;
            if bpf.is_none() || dns.is_some() {
                nft::check_tools()?;
            }
            // Standalone pods get ztund's own port-53 redirection; under istio-cni, istio-cni
            // installs it (its DNS capture setting).
            let proxies = InPodProxies::new(ctx.clone()).with_dns(dns, true);
            let manager = match bpf {
                Some(bpf) => PodManager::new(Arc::new(proxies.with_bpf(bpf))),
                None => PodManager::new(Arc::new(proxies)).with_redirection(ports),
            };
            let manager = Arc::new(manager);
            readiness.mark_pending(PROXY_MANAGER_TASK);
            reconcile(&manager, &ctx.mesh.load(), &ctx.config).await;
            spawn_manager_tasks(&manager, readiness, supervisor, false);
            // A fresh copy reconciles at once (idempotent for pods already placed).
            let m = manager.clone();
            supervisor.spawn("pod mesh follower", restart(), move || {
                never_fails(follow_mesh(ctx.clone(), m.clone()))
            });
            Ok(None)
        }
        CaptureMode::IstioCni => {
            let mut proxies = InPodProxies::new(ctx.clone()).with_dns(dns, false);
            if let Some(bpf) = start_bpf(&ctx.config)? {
                proxies = proxies.with_bpf(bpf);
            }
            let proxies = Arc::new(proxies);
            let manager = Arc::new(PodManager::new(proxies));
            // Not ready until istio-cni's snapshot arrived (PROTOCOL.md §5.1, §5.3).
            readiness.mark_pending(PROXY_MANAGER_TASK);
            spawn_manager_tasks(&manager, readiness, supervisor, true);
            // A fresh client connects anew, and istio-cni sends a fresh snapshot on each
            // connection: reconcile drains what it no longer names.
            let client = Arc::new(ZdsClient::new(ctx.config.zds_socket.clone(), manager));
            supervisor.spawn("zds client", restart(), move || {
                let client = client.clone();
                never_fails(async move { client.run().await })
            });
            Ok(None)
        }
    }
}

/// Loads the eBPF capture when `captureBackend: ebpf`; its failure stops ztund's start (never
/// a silent fall-back to no capture).
fn start_bpf(config: &Config) -> Result<Option<Arc<PodCapture>>, CaptureStartError> {
    if config.capture_backend != CaptureBackend::Ebpf {
        return Ok(None);
    }
    let settings = BpfSettings {
        outbound_port: config.ports.outbound,
        hbone_port: config.ports.hbone,
        ..BpfSettings::default()
    };
    let bpf = PodCapture::start(&config.bpf_dir, &settings)?;
    info!(pins = %config.bpf_dir.display(), pinned_pods = bpf.pinned().len(), "eBPF capture loaded");
    Ok(Some(bpf))
}

fn restart() -> OnFailure {
    OnFailure::Restart(RestartBackoff::default())
}

fn spawn_manager_tasks(
    manager: &Arc<PodManager>,
    readiness: &Readiness,
    supervisor: &Supervisor,
    uses_zds: bool,
) {
    let (m, ready) = (manager.clone(), readiness.clone());
    supervisor.spawn("pod readiness", restart(), move || {
        never_fails(track_readiness(m.clone(), ready.clone(), uses_zds))
    });
    let m = manager.clone();
    supervisor.spawn("pod retries", restart(), move || {
        never_fails(m.clone().run_retries(Duration::from_secs(5)))
    });
}

/// The readiness task of in-pod capture: pending while ZDS is disconnected or its snapshot
/// has not arrived (istio-cni mode), or while a pod's proxy waits for a retry.
const PROXY_MANAGER_TASK: &str = "workload proxy manager";
/// How often the pod manager's state is mirrored into readiness.
const READINESS_POLL: Duration = Duration::from_millis(100);

async fn track_readiness(manager: Arc<PodManager>, readiness: Readiness, uses_zds: bool) {
    loop {
        if manager.is_ready(uses_zds).await {
            readiness.mark_ready(PROXY_MANAGER_TASK);
        } else {
            readiness.mark_pending(PROXY_MANAGER_TASK);
        }
        tokio::time::sleep(READINESS_POLL).await;
    }
}

/// A VM host: the host's own processes are the workload; listeners and rules live here.
fn start_host(
    ctx: Arc<ProxyContext>,
    ports: RedirectPorts,
    dns: Option<Arc<DnsService>>,
    supervisor: &Supervisor,
) -> Result<HostCapture, CaptureStartError> {
    nft::check_tools()?;
    let sockets = SocketFactory {
        netns: None,
        mark: Some(crate::net::ZTUND_MARK),
    };
    let scope = Scope {
        owner: Owner::Node,
        sockets: sockets.clone(),
    };
    let listeners = bind_sets(&ctx, &sockets, &ports)?;
    spawn_sets(&ctx, &scope, listeners);
    let current = Netns::current().map_err(CaptureStartError::OwnNetns)?;
    let dns_on = dns.is_some();
    if let Some(dns) = dns {
        let port = ctx.config.dns.port;
        let listeners =
            DnsListeners::bind(&sockets, port).map_err(|source| PodError::Bind { port, source })?;
        let scope = DnsScope {
            namespace: None,
            uid: None,
            sockets: sockets.clone(),
        };
        // The host's DNS servers live as long as the daemon: they stop with its drain.
        drop(listeners.serve(dns, scope, ctx.drain.clone()));
        nft_dns::install_host_dns_redirection(&current, port)?;
        info!(port, "host DNS capture installed");
    }
    let rules = HostRedirection {
        ports,
        ..HostRedirection::default()
    };
    // Replacing the table adopts whatever a crashed predecessor left.
    let destinations = mesh_destinations(&ctx.mesh.load());
    nft::install_host_redirection(&current, &rules, &destinations)?;
    info!(
        mesh_destinations = destinations.len(),
        "host capture installed"
    );
    let host = HostCapture {
        netns: Arc::new(current),
        dns: dns_on,
    };
    // A fresh copy does not know what the set holds, so its first look rewrites it to the
    // mesh's: whatever changed while none ran is caught up.
    let (netns, mut installed) = (host.netns.clone(), Some(destinations));
    supervisor.spawn("host capture follower", restart(), move || {
        never_fails(follow_mesh_destinations(
            ctx.clone(),
            netns.clone(),
            installed.take(),
        ))
    });
    Ok(host)
}

/// What host mode installed in the host's namespace.
pub struct HostCapture {
    netns: Arc<Netns>,
    /// Whether the DNS redirection table was installed too.
    dns: bool,
}

impl HostCapture {
    /// Removes the host's redirection (nft table, ip rule, route table), leaving its network as
    /// it was before ztund: called once, after the drain.
    pub fn remove(self) {
        if self.dns
            && let Err(e) = nft_dns::remove_dns_redirection(&self.netns)
        {
            warn!(error = %e, "cannot remove the host DNS capture; remove table inet ztund_dns by hand");
        }
        match nft::remove_host_redirection(&self.netns) {
            Ok(()) => info!("host capture removed"),
            Err(e) => {
                warn!(error = %e, "cannot remove the host capture; remove table inet ztund by hand")
            }
        }
    }
}

/// Every address whose outbound plan is not a passthrough (`proxy::route::plan`): mesh
/// workloads and service VIPs, both families (the host rules keep one set per family).
fn mesh_destinations(snapshot: &Snapshot) -> Vec<IpAddr> {
    let workloads = snapshot.workloads().iter().flat_map(|w| w.addresses.iter());
    let workloads = workloads.map(|ip| ip.to_canonical());
    // Auto-allocated VIPs too: a host process dials what the DNS proxy answered.
    let mut addresses: Vec<IpAddr> = workloads.chain(snapshot.service_vips()).collect();
    addresses.sort_unstable();
    addresses.dedup();
    addresses
}

/// Keeps the host's set of redirected destinations equal to the mesh's. `installed` is what the
/// set holds now: the mesh may have changed between the install and this task's subscription,
/// so the first look compares against the set, not against the snapshot of the moment. `None`:
/// the set's content is unknown (a restarted copy), so the first look rewrites it.
async fn follow_mesh_destinations(
    ctx: Arc<ProxyContext>,
    netns: Arc<Netns>,
    mut installed: Option<Vec<IpAddr>>,
) {
    let mut changes = ctx.mesh.subscribe();
    let mut drain = ctx.drain.clone();
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = drain.wait_for(|d| *d) => return,
            }
        }
        let wanted = mesh_destinations(&ctx.mesh.load());
        if installed.as_ref() == Some(&wanted) {
            continue;
        }
        let netns = netns.clone();
        let update = wanted.clone();
        let applied =
            tokio::task::spawn_blocking(move || nft::update_mesh_destinations(&netns, &update))
                .await;
        match applied {
            Ok(Ok(())) => {
                info!(mesh_destinations = wanted.len(), "host capture updated");
                installed = Some(wanted);
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cannot update the host's mesh destinations; retrying on the next change")
            }
            Err(e) => warn!(error = %e, "host capture update task failed"),
        }
    }
}

/// The pods the mesh file places on this node with a network namespace.
async fn reconcile(manager: &PodManager, snapshot: &Snapshot, config: &Config) {
    let wanted: Vec<(PodInfo, String)> = snapshot
        .local_workloads(&config.node)
        .filter_map(|w| {
            let netns = w.netns.clone()?;
            let info = PodInfo {
                uid: w.uid.clone(),
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
            };
            Some((info, netns))
        })
        .collect();
    let report = manager.reconcile_standalone(wanted).await;
    for (uid, reason) in &report.failed {
        warn!(%uid, %reason, "pod capture failed; retrying");
    }
}

async fn follow_mesh(ctx: Arc<ProxyContext>, manager: Arc<PodManager>) {
    let mut changes = ctx.mesh.subscribe();
    let mut drain = ctx.drain.clone();
    loop {
        // First at start: a restarted copy catches up on changes made while none ran.
        reconcile(&manager, &ctx.mesh.load(), &ctx.config).await;
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = drain.wait_for(|d| *d) => return,
        }
    }
}

/// The listeners of one pod (or of a VM host).
struct ListenerSet {
    outbound: TcpListener,
    inbound_plaintext: TcpListener,
    hbone: TcpListener,
}

fn bind_set(
    sockets: &SocketFactory,
    ports: &RedirectPorts,
    ipv6: bool,
) -> Result<ListenerSet, PodError> {
    // Dual-stack where the namespace has IPv6 (v4 clients arrive v4-mapped and are made plain
    // v4 again at accept, `net::canonical`), plain IPv4 where it does not.
    let wildcard = crate::net::unspecified(ipv6);
    let bind = |port: u16| {
        sockets
            .listener(SocketAddr::new(wildcard, port), true)
            .map_err(|source| PodError::Bind { port, source })
    };
    Ok(ListenerSet {
        outbound: bind(ports.outbound)?,
        inbound_plaintext: bind(ports.inbound_plaintext)?,
        hbone: bind(ports.hbone)?,
    })
}

/// One set of listeners per shard.
fn bind_sets(
    ctx: &ProxyContext,
    sockets: &SocketFactory,
    ports: &RedirectPorts,
) -> Result<Vec<ListenerSet>, PodError> {
    let ipv6 = crate::net::ipv6_enabled(sockets.netns.as_deref());
    (0..ctx.shards.len())
        .map(|_| bind_set(sockets, ports, ipv6))
        .collect()
}

/// Serves each shard's set on that shard.
fn spawn_sets(
    ctx: &Arc<ProxyContext>,
    scope: &Scope,
    sets: Vec<ListenerSet>,
) -> Vec<JoinHandle<()>> {
    let mut outbound = Vec::new();
    let mut inbound_plaintext = Vec::new();
    let mut hbone = Vec::new();
    for set in sets {
        outbound.push(set.outbound);
        inbound_plaintext.push(set.inbound_plaintext);
        hbone.push(set.hbone);
    }
    let shards = &ctx.shards;
    let mut tasks = Vec::new();
    let (c, s) = (ctx.clone(), scope.clone());
    tasks.extend(shards.serve_each(outbound, move |listener| {
        outbound::serve(c.clone(), s.clone(), listener, Entry::Transparent)
    }));
    let (c, s) = (ctx.clone(), scope.clone());
    tasks.extend(shards.serve_each(inbound_plaintext, move |listener| {
        inbound_plaintext::serve(c.clone(), s.clone(), listener)
    }));
    let (c, s) = (ctx.clone(), scope.clone());
    tasks.extend(shards.serve_each(hbone, move |listener| {
        inbound::serve(c.clone(), s.clone(), listener)
    }));
    tasks
}

/// A running pod proxy: its drain signal and listener tasks.
struct RunningPod {
    drain: Arc<watch::Sender<bool>>,
    listeners: Vec<JoinHandle<()>>,
    /// The namespace ztund installed the port-53 redirection in, to remove it at the stop.
    dns_redirected: Option<Arc<Netns>>,
}

/// A pod drains when the whole daemon does (a stop or an upgrade hand-over), not only when
/// the pod goes away.
async fn follow_daemon_drain(mut daemon: watch::Receiver<bool>, pod: Arc<watch::Sender<bool>>) {
    if daemon.wait_for(|d| *d).await.is_ok() {
        pod.send_replace(true);
    }
}

/// The daemon's side of [`PodProxies`]: binds a pod's listeners inside its namespace.
pub struct InPodProxies {
    ctx: Arc<ProxyContext>,
    running: Mutex<HashMap<String, RunningPod>>,
    /// The DNS proxy every pod gets on `dns.port`, when `dns.enabled`.
    dns: Option<Arc<DnsService>>,
    /// Whether ztund redirects the pods' port 53 itself (standalone) or istio-cni does.
    redirect_dns: bool,
    /// The eBPF backend: pods are enrolled in it instead of getting nftables rules.
    bpf: Option<Arc<PodCapture>>,
}

impl InPodProxies {
    pub fn new(ctx: Arc<ProxyContext>) -> InPodProxies {
        InPodProxies {
            ctx,
            running: Mutex::new(HashMap::new()),
            dns: None,
            redirect_dns: false,
            bpf: None,
        }
    }

    /// Pods are captured by the eBPF programs: enrolled at start, released at stop.
    pub fn with_bpf(mut self, bpf: Arc<PodCapture>) -> InPodProxies {
        self.bpf = Some(bpf);
        self
    }

    /// Pods also get a DNS server; with `redirect`, ztund installs their port-53 redirection.
    pub fn with_dns(mut self, dns: Option<Arc<DnsService>>, redirect: bool) -> InPodProxies {
        self.dns = dns;
        self.redirect_dns = redirect;
        self
    }

    /// Binds the pod's DNS server and, in standalone mode, redirects its port 53 to it.
    async fn start_dns(
        &self,
        pod: &PodInfo,
        sockets: &SocketFactory,
        drain: watch::Receiver<bool>,
    ) -> Result<(Vec<JoinHandle<()>>, Option<Arc<Netns>>), PodError> {
        let Some(dns) = &self.dns else {
            return Ok((Vec::new(), None));
        };
        let port = self.ctx.config.dns.port;
        let listeners =
            DnsListeners::bind(sockets, port).map_err(|source| PodError::Bind { port, source })?;
        let scope = DnsScope {
            namespace: Some(pod.namespace.clone()),
            uid: Some(Arc::from(pod.uid.as_str())),
            sockets: sockets.clone(),
        };
        let tasks = listeners.serve(dns.clone(), scope, drain);
        let netns = match (&sockets.netns, self.redirect_dns) {
            (Some(netns), true) => netns.clone(),
            _ => return Ok((tasks, None)),
        };
        let ns = netns.clone();
        let installed =
            tokio::task::spawn_blocking(move || nft_dns::install_dns_redirection(&ns, port)).await;
        let failed = match installed {
            Ok(Ok(())) => return Ok((tasks, Some(netns))),
            Ok(Err(e)) => PodError::Redirect(e),
            Err(e) => PodError::RedirectTask(e),
        };
        for task in tasks {
            task.abort();
        }
        Err(failed)
    }
}

impl PodProxies for InPodProxies {
    fn start(&self, pod: PodInfo, netns: Arc<Netns>) -> BoxFuture<'_, Result<(), PodError>> {
        Box::pin(async move {
            // Before binding: a successor's listeners on these ports take over what is queued
            // on ours when we stop (an upgrade hand-over).
            if let Err(e) = crate::net::enable_request_migration(Some(&netns)) {
                warn!(uid = %pod.uid, error = %e, "connections queued at a restart will be reset");
            }
            let netns_id = netns.id();
            let sockets = SocketFactory::in_netns(netns.clone());
            let ports = RedirectPorts::from(&self.ctx.config.ports);
            let sets = bind_sets(&self.ctx, &sockets, &ports)?;
            if let (Some(bpf), Some(first)) = (&self.bpf, sets.first()) {
                // One listener per slot: the kernel spreads over the shards' SO_REUSEPORT
                // group after sk_lookup picked one of them.
                bpf.enrol(&pod.uid, &netns, &first.inbound_plaintext, &first.hbone)
                    .map_err(|source| PodError::Bpf {
                        uid: pod.uid.clone(),
                        source,
                    })?;
            }
            let (drain, drain_rx) = watch::channel(false);
            let drain = Arc::new(drain);
            let pod_ctx = Arc::new(ProxyContext {
                drain: drain_rx,
                ..(*self.ctx).clone()
            });
            let scope = Scope {
                owner: Owner::Pod(PodRef {
                    uid: Arc::from(pod.uid.as_str()),
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                }),
                sockets,
            };
            let (dns_tasks, dns_redirected) = self
                .start_dns(&pod, &scope.sockets, pod_ctx.drain.clone())
                .await?;
            let mut listeners = spawn_sets(&pod_ctx, &scope, sets);
            listeners.extend(dns_tasks);
            listeners.push(tokio::spawn(follow_daemon_drain(
                self.ctx.drain.clone(),
                drain.clone(),
            )));
            let previous = self.running.lock().await.insert(
                pod.uid.clone(),
                RunningPod {
                    drain,
                    listeners,
                    dns_redirected,
                },
            );
            if let Some(mut previous) = previous {
                // Restarted in the same namespace: the table just installed is the one to keep.
                if previous.dns_redirected.as_ref().map(|n| n.id()) == Some(netns_id) {
                    previous.dns_redirected = None;
                }
                stop_pod(previous);
            }
            self.ctx.metrics.proxy_started();
            info!(uid = %pod.uid, pod = %format!("{}/{}", pod.namespace, pod.name), "pod proxy started");
            Ok(())
        })
    }

    fn settled(&self, pods: &HashSet<String>) {
        if let Some(bpf) = &self.bpf {
            bpf.collect(pods);
        }
    }

    fn stop<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(bpf) = &self.bpf {
                bpf.release(uid);
            }
            if let Some(pod) = self.running.lock().await.remove(uid) {
                stop_pod(pod);
                let tunnels = self.ctx.pool.release_pod(uid);
                self.ctx.metrics.proxy_stopped();
                info!(%uid, tunnels_released = tunnels, "pod proxy stopped");
            }
        })
    }
}

/// Closes the listeners now and signals the pod's drain: HBONE connections answer it with a
/// GOAWAY, and connections still open `drainDeadline` later are cut. The pod's port 53 goes
/// back to its own resolver (a namespace already gone has nothing to remove).
fn stop_pod(pod: RunningPod) {
    pod.drain.send_replace(true);
    for task in pod.listeners {
        task.abort();
    }
    if let Some(netns) = pod.dns_redirected {
        tokio::task::spawn_blocking(move || {
            if let Err(e) = nft_dns::remove_dns_redirection(&netns) {
                tracing::debug!(error = %e, "removing a pod's DNS redirection");
            }
        });
    }
}
