//! Where the node's mesh comes from: the mesh file alone (standalone), a control plane over
//! Delta xDS alone (istiod, `ztund controlplane`), or both merged (`xds::state` says how). Each
//! source keeps the last good state serving when its input goes bad or away. Also the
//! readiness tasks that wait for the control plane's first answer of every type.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;
use tracing::{error, info};

use super::DaemonError;
use crate::admin::Readiness;
use crate::config::Config;
use crate::mesh::{MeshSettings, MeshStore, Snapshot, load_and_watch};
use crate::xds::client::{ClientSettings, XdsClient, XdsStatus};
use crate::xds::metrics::XdsMetrics;
use crate::xds::state::{FileMesh, Provenance, XdsState};

/// The running sources behind the node's [`MeshStore`].
pub struct MeshSources {
    pub store: Arc<MeshStore>,
    /// What the control plane sent, for `/config_dump`; `None` without a control plane.
    pub xds: Option<Arc<Mutex<XdsState>>>,
    /// The xDS stream's state; `None` without a control plane.
    pub status: Option<watch::Receiver<XdsStatus>>,
}

impl MeshSources {
    /// Which pieces of state came from the control plane (name → version).
    pub fn provenance(&self) -> Option<Provenance> {
        let xds = self.xds.as_ref()?;
        Some(lock(xds).provenance())
    }
}

fn lock(state: &Mutex<XdsState>) -> std::sync::MutexGuard<'_, XdsState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts the sources the config names and returns once the store holds their first state
/// (the file's; a control plane's first answers arrive later and readiness waits for them).
pub async fn start(
    config: &Arc<Config>,
    readiness: &Readiness,
    metrics: XdsMetrics,
    drain: watch::Receiver<bool>,
) -> Result<MeshSources, DaemonError> {
    let settings = MeshSettings::from_config(config);
    let Some(control_plane) = &config.control_plane else {
        let path = config.mesh_file.clone().unwrap_or_default();
        let (store, _watcher) = load_and_watch(path, settings, config.watch_interval)
            .map_err(|e| DaemonError::Mesh(e.to_string()))?;
        return Ok(MeshSources {
            store,
            xds: None,
            status: None,
        });
    };

    // The mesh file beside a control plane: validated like the file-only mode at start (a bad
    // file stops the daemon), then followed through its own watcher's store.
    let file: Arc<ArcSwapOption<FileMesh>> = Arc::new(ArcSwapOption::empty());
    let file_changes = match &config.mesh_file {
        None => None,
        Some(path) => {
            let (file_store, _watcher) =
                load_and_watch(path.clone(), settings.clone(), config.watch_interval)
                    .map_err(|e| DaemonError::Mesh(e.to_string()))?;
            let mesh =
                FileMesh::load(path, &settings).map_err(|e| DaemonError::Mesh(e.to_string()))?;
            file.store(Some(Arc::new(mesh)));
            Some((path.clone(), file_store))
        }
    };

    let state = Arc::new(Mutex::new(XdsState::new()));
    let store = Arc::new(MeshStore::new(build(&state, &file, &config.root_namespace)));
    let client = XdsClient::new(control_plane, &config.node, ClientSettings::default())
        .with_metrics(metrics);
    let status = client.status();
    for pending in status.borrow().pending() {
        readiness.mark_pending(&xds_task(pending));
    }
    tokio::spawn(track_readiness(status.clone(), readiness.clone()));

    let sink = state.clone();
    let (rebuild_store, rebuild_file) = (store.clone(), file.clone());
    let root = config.root_namespace.clone();
    let rebuild_state = state.clone();
    let mut stop = drain.clone();
    tokio::spawn(async move {
        client
            .run(
                sink,
                move |_sink, type_url| {
                    if !lock(&rebuild_state).take_changed() {
                        return;
                    }
                    let snapshot = build(&rebuild_state, &rebuild_file, &root);
                    let (workloads, services) =
                        (snapshot.workloads().len(), snapshot.services().len());
                    rebuild_store.replace(snapshot);
                    info!(
                        type_url,
                        generation = rebuild_store.load().generation,
                        workloads,
                        services,
                        "xds update applied"
                    );
                },
                async move {
                    let _ = stop.wait_for(|d| *d).await;
                },
            )
            .await;
    });

    if let Some((path, file_store)) = file_changes {
        tokio::spawn(follow_file(
            path,
            settings,
            file_store,
            file,
            state.clone(),
            store.clone(),
            config.root_namespace.clone(),
            drain,
        ));
    }
    Ok(MeshSources {
        store,
        xds: Some(state),
        status: Some(status),
    })
}

fn build(
    state: &Mutex<XdsState>,
    file: &ArcSwapOption<FileMesh>,
    root_namespace: &str,
) -> Snapshot {
    let file = file.load_full();
    lock(state).snapshot(file.as_deref(), root_namespace)
}

/// The readiness task of one xDS type.
fn xds_task(type_url: &str) -> String {
    format!("xds: first response of {type_url}")
}

async fn track_readiness(mut status: watch::Receiver<XdsStatus>, readiness: Readiness) {
    loop {
        {
            let now = status.borrow_and_update();
            for required in &now.required {
                if now.received.contains(required) {
                    readiness.mark_ready(&xds_task(required));
                }
            }
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Re-reads the mesh file whenever its watcher applied a new valid version, and merges it.
#[allow(clippy::too_many_arguments)]
async fn follow_file(
    path: std::path::PathBuf,
    settings: MeshSettings,
    file_store: Arc<MeshStore>,
    file: Arc<ArcSwapOption<FileMesh>>,
    state: Arc<Mutex<XdsState>>,
    store: Arc<MeshStore>,
    root_namespace: String,
    mut drain: watch::Receiver<bool>,
) {
    let mut changes = file_store.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = drain.wait_for(|d| *d) => return,
        }
        let read = {
            let (path, settings) = (path.clone(), settings.clone());
            tokio::task::spawn_blocking(move || FileMesh::load(&path, &settings)).await
        };
        match read {
            Ok(Ok(mesh)) => {
                file.store(Some(Arc::new(mesh)));
                store.replace(build(&state, &file, &root_namespace));
                info!(file = %path.display(), generation = store.load().generation, "mesh file merged with the control plane's state");
            }
            Ok(Err(e)) => {
                error!(file = %path.display(), error = %e, "mesh file refused; the last good one keeps serving")
            }
            Err(_) => return,
        }
    }
}
