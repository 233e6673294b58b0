//! Where the node's mesh comes from: the mesh file alone (standalone), a control plane over
//! Delta xDS alone (istiod, `ztund controlplane`), or both merged (`xds::state` says how). Each
//! source keeps the last good state serving when its input goes bad or away. Also the
//! readiness tasks that wait for the control plane's first answer of every type.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;
use tracing::{error, info};

use super::DaemonError;
use super::supervise::{OnFailure, RestartBackoff, Supervisor, never_fails};
use crate::admin::Readiness;
use crate::config::Config;
use crate::mesh::{
    MeshFileWatch, MeshSettings, MeshStore, Snapshot, load_for_watching, watch_file,
};
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
    supervisor: &Supervisor,
    metrics: XdsMetrics,
    drain: watch::Receiver<bool>,
) -> Result<MeshSources, DaemonError> {
    let settings = MeshSettings::from_config(config);
    let Some(control_plane) = &config.control_plane else {
        let path = config.mesh_file.clone().unwrap_or_default();
        let store = watch_mesh_file(path, settings, config, supervisor)?;
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
            let file_store = watch_mesh_file(path.clone(), settings.clone(), config, supervisor)?;
            let mesh = FileMesh::load(path, &settings).map_err(DaemonError::Mesh)?;
            file.store(Some(Arc::new(mesh)));
            Some((path.clone(), file_store))
        }
    };

    let state = Arc::new(Mutex::new(XdsState::new()));
    let store = Arc::new(MeshStore::new(build(&state, &file, &config.root_namespace)));
    let new_client = {
        let (control_plane, node) = (control_plane.clone(), config.node.clone());
        move || {
            XdsClient::new(&control_plane, &node, ClientSettings::default())
                .with_metrics(metrics.clone())
        }
    };
    // Never run: it holds the status every running copy reports into.
    let template = new_client();
    let status = template.status();
    for pending in status.borrow().pending() {
        readiness.mark_pending(&xds_task(pending));
    }
    // Restart: readiness follows `status`, which every copy shares; the stream's state lives
    // in `state`, so a fresh client resumes from the versions held.
    let (tracked, ready) = (status.clone(), readiness.clone());
    supervisor.spawn("xds readiness", restart(), move || {
        never_fails(track_readiness(tracked.clone(), ready.clone()))
    });

    // Restart: a client ends only by a panic (it reconnects on every stream failure itself);
    // a fresh one shares the status and resumes from the versions in `state`.
    let (sink, root) = (state.clone(), config.root_namespace.clone());
    let (rebuild_store, rebuild_file) = (store.clone(), file.clone());
    let stop = drain.clone();
    supervisor.spawn("xds client", restart(), move || {
        let client = new_client().sharing_status_of(&template);
        let (sink, rebuild_state) = (sink.clone(), sink.clone());
        let (rebuild_store, rebuild_file, root) =
            (rebuild_store.clone(), rebuild_file.clone(), root.clone());
        let mut stop = stop.clone();
        never_fails(async move {
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
        })
    });

    if let Some((path, file_store)) = file_changes {
        // Restart: the merged inputs live in `file` and `state`; a fresh copy merges the file
        // once at start, in case it changed while none ran.
        let (file, state, store) = (file.clone(), state.clone(), store.clone());
        let root = config.root_namespace.clone();
        let mut restarted = false;
        supervisor.spawn("mesh file merger", restart(), move || {
            let merge_first = std::mem::replace(&mut restarted, true);
            never_fails(follow_file(
                path.clone(),
                settings.clone(),
                file_store.clone(),
                file.clone(),
                state.clone(),
                store.clone(),
                root.clone(),
                drain.clone(),
                merge_first,
            ))
        });
    }
    Ok(MeshSources {
        store,
        xds: Some(state),
        status: Some(status),
    })
}

/// Loads the mesh file into a store and keeps it watched.
fn watch_mesh_file(
    path: std::path::PathBuf,
    settings: MeshSettings,
    config: &Config,
    supervisor: &Supervisor,
) -> Result<Arc<MeshStore>, DaemonError> {
    let (store, watch) =
        load_for_watching(path.clone(), settings.clone()).map_err(DaemonError::Mesh)?;
    // Restart: the mesh in force lives in `store`; a fresh watcher re-reads the file at its
    // first poll, so an edit made while none ran is applied then (the same content applied
    // again is harmless). It fails when the file's directory is gone, and each restart fails
    // again until the directory is back: readiness names it meanwhile.
    let mut primed = Some(watch);
    let (watched, interval) = (store.clone(), config.watch_interval);
    supervisor.spawn("mesh watcher", restart(), move || {
        let watch = primed
            .take()
            .unwrap_or_else(|| MeshFileWatch::unstarted(path.clone(), settings.clone()));
        watch_file(watch, watched.clone(), interval)
    });
    Ok(store)
}

fn restart() -> OnFailure {
    OnFailure::Restart(RestartBackoff::default())
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
    merge_first: bool,
) {
    let mut changes = file_store.subscribe();
    let mut first = true;
    loop {
        if !(std::mem::take(&mut first) && merge_first) {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = drain.wait_for(|d| *d) => return,
            }
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
