//! The control plane's input: every `*.yaml`/`*.yml` of one directory (sorted by name, hidden
//! files skipped, symlinks followed, so a ConfigMap mount works), all documents read as one mesh
//! by the mesh file's readers, and translated into xDS resources. Watching is by polling, with
//! the mesh file's rule (`mesh::file`): new content applies only once it has held still for one
//! poll, and content that does not parse is refused (once) while the last good one keeps serving.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::translate::{Resources, translate};
use crate::mesh::k8s::{parse_mesh, split_documents};
use crate::mesh::{MeshError, MeshSettings, Snapshot};

/// One configuration read from the directory.
#[derive(Debug)]
pub struct Loaded {
    pub snapshot: Snapshot,
    pub resources: Resources,
    /// The files it was read from.
    pub files: Vec<PathBuf>,
}

/// The YAML files of `dir`, sorted.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, MeshError> {
    let io = |source| MeshError::Io {
        path: dir.display().to_string(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let path = entry.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The directory's content now: each file with its bytes.
fn read_all(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>, MeshError> {
    yaml_files(dir)?
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).map_err(|source| MeshError::Io {
                path: path.display().to_string(),
                source,
            })?;
            Ok((path, bytes))
        })
        .collect()
}

/// Parses and translates files' content as one mesh.
pub fn load(content: &[(PathBuf, Vec<u8>)], settings: &MeshSettings) -> Result<Loaded, MeshError> {
    let mut docs = Vec::new();
    for (path, bytes) in content {
        let file = path.display().to_string();
        let text = std::str::from_utf8(bytes).map_err(|_| MeshError::Io {
            path: file.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
        })?;
        docs.extend(split_documents(&file, text)?);
    }
    let mesh = parse_mesh(&docs, settings)?;
    let policies = crate::mesh::k8s::security::policy_set(&docs, &settings.root_namespace)?;
    let snapshot = Snapshot::build(mesh.workloads, mesh.services, policies);
    let resources = translate(&snapshot, &docs)?;
    Ok(Loaded {
        snapshot,
        resources,
        files: content.iter().map(|(p, _)| p.clone()).collect(),
    })
}

/// Reads and loads the directory once.
pub fn load_dir(dir: &Path, settings: &MeshSettings) -> Result<Loaded, MeshError> {
    load(&read_all(dir)?, settings)
}

/// What one poll found.
#[derive(Debug)]
pub enum Poll {
    /// Nothing new (or new content still settling).
    Unchanged,
    Applied(Box<Loaded>),
    Refused(MeshError),
}

/// A file's path, inode, mtime (seconds, nanoseconds), ctime nanoseconds and size.
type FileStamp = (PathBuf, u64, i64, i64, i64, u64);

/// The watcher's memory of the directory.
#[derive(Debug)]
pub struct DirWatch {
    dir: PathBuf,
    settings: MeshSettings,
    /// Stamps of the files at the last poll: unchanged (and not recent), nothing is read.
    stamps: Vec<FileStamp>,
    /// Hash of the content seen at the last poll (None: unreadable).
    seen: Option<Option<u64>>,
    /// Hash of the content last applied or refused: seen again, it is not news.
    reported: Option<Option<u64>>,
}

impl DirWatch {
    /// A watch whose baseline is `content`, already applied.
    pub fn new(dir: PathBuf, settings: MeshSettings, content_hash: u64) -> DirWatch {
        let mut watch = DirWatch {
            dir,
            settings,
            stamps: Vec::new(),
            seen: Some(Some(content_hash)),
            reported: Some(Some(content_hash)),
        };
        watch.stamps = watch.stamp_now().unwrap_or_default();
        watch
    }

    fn stamp_now(&self) -> Result<Vec<FileStamp>, MeshError> {
        let mut stamps = Vec::new();
        for path in yaml_files(&self.dir)? {
            if let Ok(m) = std::fs::metadata(&path) {
                stamps.push((
                    path,
                    m.ino(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime_nsec(),
                    m.size(),
                ));
            }
        }
        Ok(stamps)
    }

    /// Checks the directory once.
    pub fn poll(&mut self) -> Poll {
        let stamps = self.stamp_now();
        if let Ok(stamps) = &stamps {
            let recent = stamps.iter().any(|s| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                now - s.2 < 2
            });
            if *stamps == self.stamps && !recent && self.seen == self.reported {
                return Poll::Unchanged;
            }
            self.stamps = stamps.clone();
        }
        let content = read_all(&self.dir);
        let hash = content.as_ref().ok().map(|c| content_hash(c));
        let previous = self.seen.replace(hash);
        if self.reported == Some(hash) {
            return Poll::Unchanged;
        }
        // New content applies once it held still for a poll; an unreadable directory is news
        // at once (there is nothing half-written to wait for).
        if previous != Some(hash) && hash.is_some() {
            return Poll::Unchanged;
        }
        self.reported = Some(hash);
        match content.and_then(|c| load(&c, &self.settings)) {
            Ok(loaded) => Poll::Applied(Box::new(loaded)),
            Err(e) => Poll::Refused(e),
        }
    }
}

/// A hash of the files' names and bytes.
pub fn content_hash(content: &[(PathBuf, Vec<u8>)]) -> u64 {
    let mut hasher = DefaultHasher::new();
    content.hash(&mut hasher);
    hasher.finish()
}

/// Reads the directory and loads it, returning the content hash as the watch's baseline.
pub fn load_with_hash(dir: &Path, settings: &MeshSettings) -> Result<(Loaded, u64), MeshError> {
    let content = read_all(dir)?;
    let hash = content_hash(&content);
    Ok((load(&content, settings)?, hash))
}
