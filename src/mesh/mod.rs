//! The node's view of the mesh: the model, the immutable snapshot and its store, and the readers
//! that turn Kubernetes/Istio YAML into the model. Knows nothing about where updates come from.

pub mod file;
pub mod k8s;
pub mod model;
pub mod snapshot;
pub mod vip;

pub use file::{
    MeshFileWatch, WatchError, load_and_watch, load_for_watching, load_snapshot,
    snapshot_from_files, snapshot_from_text, spawn_watcher, watch_file,
};
pub use k8s::{MeshError, MeshSettings};
pub use model::{
    DocRef, Endpoints, HealthStatus, Labels, RawDocument, Service, ServicePort, TunnelProtocol,
    Workload,
};
pub use snapshot::{MeshStore, Snapshot, service_key};
