//! The mesh file as a source of snapshots: loading it once, and watching it so that a valid edit
//! replaces the snapshot and an invalid one is logged once and refused while the last good
//! snapshot keeps serving. Reading YAML is `k8s`'s job; deciding anything is `policy`'s.
//!
//! Watching is by polling (file identity, size, times, then a content hash) on purpose: it follows
//! a ConfigMap's `..data` symlink swap and an editor's rename-on-save without inotify.
//!
//! A file written in place (`>`, `cp`, most tools) is empty between its truncation and its write,
//! and an empty file is a valid, empty mesh: applied, it would drop every workload for a poll
//! interval. So new content is applied only once it has held still from one poll to the next; a
//! writer that finishes within a poll interval is never seen half done. Renaming a complete file
//! over the old one remains the way to be safe whatever the writer's pace.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;
use tracing::{error, info};

use super::k8s::{MAX_MESH_BYTES, MeshError, MeshSettings, parse_mesh, split_documents};
use super::snapshot::{MeshStore, Snapshot};

/// Builds a snapshot from mesh-file text; `file` names it in errors.
pub fn snapshot_from_text(
    file: &str,
    text: &str,
    settings: &MeshSettings,
) -> Result<Snapshot, MeshError> {
    let docs = split_documents(file, text)?;
    let mesh = parse_mesh(&docs, settings)?;
    let policies = crate::mesh::k8s::security::policy_set(&docs, &settings.root_namespace)?;
    Ok(Snapshot::build(mesh.workloads, mesh.services, policies))
}

/// Reads several mesh files as one mesh (for `ztund check`): documents keep their own file
/// names in errors, and conflicts across files are caught like conflicts within one.
pub fn snapshot_from_files(
    paths: &[PathBuf],
    settings: &MeshSettings,
) -> Result<Snapshot, MeshError> {
    let mut docs = Vec::new();
    for path in paths {
        let text = read_text(path)?;
        docs.extend(split_documents(&path.display().to_string(), &text)?);
    }
    let mesh = parse_mesh(&docs, settings)?;
    let policies = crate::mesh::k8s::security::policy_set(&docs, &settings.root_namespace)?;
    Ok(Snapshot::build(mesh.workloads, mesh.services, policies))
}

/// Reads and parses the mesh file.
pub fn load_snapshot(path: &Path, settings: &MeshSettings) -> Result<Snapshot, MeshError> {
    let text = read_text(path)?;
    snapshot_from_text(&path.display().to_string(), &text, settings)
}

/// The task watching a mesh file: it ends only when the watch fails.
pub type WatchTask = JoinHandle<Result<(), WatchError>>;

/// Loads the mesh file into a new store and watches it, with no gap between the two: the
/// watcher's baseline is the very content the first snapshot was built from.
pub fn load_and_watch(
    path: PathBuf,
    settings: MeshSettings,
    interval: Duration,
) -> Result<(Arc<MeshStore>, WatchTask), MeshError> {
    let (store, watch) = load_for_watching(path, settings)?;
    let handle = tokio::spawn(watch_file(watch, store.clone(), interval));
    Ok((store, handle))
}

/// Loads the mesh file into a new store and returns the watch to run on it with
/// [`watch_file`] (the daemon runs it under its supervisor).
pub fn load_for_watching(
    path: PathBuf,
    settings: MeshSettings,
) -> Result<(Arc<MeshStore>, MeshFileWatch), MeshError> {
    let mut watch = MeshFileWatch::unstarted(path, settings);
    let snapshot = match watch.poll() {
        Some(Reload::Applied(snapshot)) => *snapshot,
        Some(Reload::Refused(e)) => return Err(e),
        // A fresh watch has seen nothing, so its first poll always reports.
        Some(Reload::Restored) | None => Snapshot::default(),
    };
    Ok((Arc::new(MeshStore::new(snapshot)), watch))
}

/// Polls the mesh file every `interval` and applies valid changes to `store`. The store is
/// taken to hold the file's content as it is now (call this right after [`load_snapshot`], or
/// use [`load_and_watch`]).
pub fn spawn_watcher(
    path: PathBuf,
    settings: MeshSettings,
    store: Arc<MeshStore>,
    interval: Duration,
) -> JoinHandle<Result<(), WatchError>> {
    // The baseline is taken before returning so that an edit made right after this call is seen.
    let watch = MeshFileWatch::new(path, settings);
    tokio::spawn(watch_file(watch, store, interval))
}

/// Why a mesh file watcher stopped.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// A missing file is a refused edit that a later write heals; a missing directory means
    /// the volume or the path itself went away, which an operator must hear about.
    #[error("the mesh file's directory {dir} is gone")]
    DirectoryGone { dir: String },
}

/// Polls the mesh file every `interval` and applies valid changes to `store` until the file's
/// directory disappears. `interval` must not be zero (the config refuses it).
pub async fn watch_file(
    mut watch: MeshFileWatch,
    store: Arc<MeshStore>,
    interval: Duration,
) -> Result<(), WatchError> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        // Reading and parsing are blocking work; keep them off the runtime's threads.
        let checked = tokio::task::spawn_blocking(move || {
            let gone = watch
                .path
                .parent()
                .filter(|dir| !dir.as_os_str().is_empty() && !dir.is_dir())
                .map(|dir| dir.display().to_string());
            let outcome = match gone {
                Some(_) => None,
                None => watch.poll(),
            };
            (watch, gone, outcome)
        })
        .await;
        let (gone, outcome);
        (watch, gone, outcome) = match checked {
            Ok(checked) => checked,
            // Only when the runtime is shutting down (poll does not panic on any input).
            Err(_) => return Ok(()),
        };
        if let Some(dir) = gone {
            return Err(WatchError::DirectoryGone { dir });
        }
        let file = watch.path.display();
        match outcome {
            None => {}
            Some(Reload::Applied(snapshot)) => {
                let (workloads, services) = (snapshot.workloads().len(), snapshot.services().len());
                store.replace(*snapshot);
                let generation = store.load().generation;
                info!(%file, generation, workloads, services, "mesh file applied");
            }
            Some(Reload::Refused(e)) => {
                error!(%file, error = %e, "mesh file refused; the last good snapshot keeps serving");
            }
            Some(Reload::Restored) => {
                info!(%file, "mesh file is back to the content in force; nothing to apply");
            }
        }
    }
}

/// What one poll found.
#[derive(Debug)]
pub enum Reload {
    /// New, valid content: the snapshot to swap in.
    Applied(Box<Snapshot>),
    /// New content (or a missing file) that cannot be used; reported once per distinct content.
    Refused(MeshError),
    /// After a refusal, the file again holds the content already in force.
    Restored,
}

/// The watcher's memory of the file: what it last saw, what it last reported and what is in
/// force. Synchronous, so the change-detection rules are testable without timers.
#[derive(Debug)]
pub struct MeshFileWatch {
    path: PathBuf,
    settings: MeshSettings,
    seen: Seen,
    /// Hash of the content last applied, refused or restored: seen again, it is not news.
    reported: Option<u64>,
    /// Hash of the content the store holds.
    applied: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Nothing,
    Unreadable,
    Content { stamp: Stamp, hash: u64 },
}

/// File identity, size and times: any write, rename over or symlink swap changes one of them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            modified: meta.modified().ok(),
        }
    }

    /// A file modified in the last couple of seconds may change again without its times
    /// moving (coarse timestamps); its content is compared instead of trusting the stamp.
    fn is_recent(&self) -> bool {
        match self.modified.map(|m| SystemTime::now().duration_since(m)) {
            Some(Ok(age)) => age < Duration::from_secs(2),
            _ => true,
        }
    }
}

impl MeshFileWatch {
    /// A watch whose baseline is the file as it is now, taken to be in force.
    pub fn new(path: PathBuf, settings: MeshSettings) -> MeshFileWatch {
        let mut watch = MeshFileWatch::unstarted(path, settings);
        if let Ok((stamp, bytes)) = watch.read() {
            let hash = content_hash(&bytes);
            watch.seen = Seen::Content { stamp, hash };
            watch.reported = Some(hash);
            watch.applied = Some(hash);
        } else {
            watch.seen = Seen::Unreadable;
        }
        watch
    }

    /// A watch that has seen nothing: its first poll reports the file's content (and a
    /// restarted watcher starts so, since the file may have changed while none ran).
    pub fn unstarted(path: PathBuf, settings: MeshSettings) -> MeshFileWatch {
        MeshFileWatch {
            path,
            settings,
            seen: Seen::Nothing,
            reported: None,
            applied: None,
        }
    }

    /// Checks the file once; `None` when there is nothing new to report, or when the content
    /// changed since the last poll and may still be being written (reported at the next poll if
    /// it holds still). The first poll of an unstarted watch reports at once: at start-up there
    /// is no last good mesh to keep serving meanwhile.
    pub fn poll(&mut self) -> Option<Reload> {
        if let (Seen::Content { stamp, hash }, Ok(meta)) =
            (&self.seen, std::fs::metadata(&self.path))
            && self.reported == Some(*hash)
            && *stamp == Stamp::of(&meta)
            && !stamp.is_recent()
        {
            return None;
        }
        let (stamp, bytes) = match self.read() {
            Ok(read) => read,
            Err(e) => {
                if self.seen == Seen::Unreadable {
                    return None;
                }
                self.seen = Seen::Unreadable;
                // Whatever content comes back is news, even the content reported before.
                self.reported = None;
                return Some(Reload::Refused(e));
            }
        };
        let hash = content_hash(&bytes);
        let previous = std::mem::replace(&mut self.seen, Seen::Content { stamp, hash });
        let held_still = matches!(previous, Seen::Content { hash: seen, .. } if seen == hash);
        if self.reported == Some(hash) || (!held_still && previous != Seen::Nothing) {
            return None;
        }
        self.reported = Some(hash);
        if self.applied == Some(hash) {
            return Some(Reload::Restored);
        }
        let file = self.path.display().to_string();
        let parsed = String::from_utf8(bytes)
            .map_err(|_| MeshError::Io {
                path: file.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
            })
            .and_then(|text| snapshot_from_text(&file, &text, &self.settings));
        match parsed {
            Ok(snapshot) => {
                self.applied = Some(hash);
                Some(Reload::Applied(Box::new(snapshot)))
            }
            Err(e) => Some(Reload::Refused(e)),
        }
    }

    /// The stamp is taken before the content, so a write in between shows up at the next poll.
    fn read(&self) -> Result<(Stamp, Vec<u8>), MeshError> {
        let io = |source| MeshError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let stamp = Stamp::of(&std::fs::metadata(&self.path).map_err(io)?);
        let bytes = read_capped(&self.path)?;
        Ok((stamp, bytes))
    }
}

fn read_text(path: &Path) -> Result<String, MeshError> {
    let bytes = read_capped(path)?;
    String::from_utf8(bytes).map_err(|_| MeshError::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
    })
}

/// The file's bytes, refused once past [`MAX_MESH_BYTES`] without reading further: a huge file
/// (or a FIFO, or /dev/zero) costs at most the cap in memory.
fn read_capped(path: &Path) -> Result<Vec<u8>, MeshError> {
    use std::io::Read;
    let io = |source| MeshError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_MESH_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() > MAX_MESH_BYTES {
        let size = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Err(MeshError::TooLarge {
            file: path.display().to_string(),
            size: size.max(bytes.len() as u64),
            cap: MAX_MESH_BYTES,
        });
    }
    Ok(bytes)
}

fn content_hash(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
