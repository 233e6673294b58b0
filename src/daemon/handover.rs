//! Which ztund instances run on this node: each holds an exclusive `flock` on
//! `<stateDir>/instances/<pid>` for its whole life. The kernel drops the lock when the process
//! dies, also on `kill -9`, so a file nobody holds is a crashed instance's leftover. A stopping
//! ztund asks [`Instance::successor_running`] whether another instance will carry on (an upgrade
//! hand-over): then what both share (listeners through `SO_REUSEPORT`, a pod's redirection, a
//! host's rules) must be left to it, not torn down.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The directory under `stateDir` holding one lock file per running instance.
const INSTANCES_DIR: &str = "instances";

/// Why this instance could not register.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("creating the instance directory {path} (under stateDir; point stateDir at a writable directory): {source}")]
    Directory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("locking the instance file {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// This process's registration; the lock is held until it drops (or the process dies).
#[derive(Debug)]
pub struct Instance {
    dir: PathBuf,
    pid: u32,
    path: PathBuf,
    /// Held open: closing it releases the lock.
    _lock: File,
}

impl Instance {
    /// Registers this process under `state_dir` and clears files left by crashed instances.
    pub fn register(state_dir: &Path) -> Result<Instance, HandoverError> {
        Instance::register_as(state_dir, std::process::id())
    }

    fn register_as(state_dir: &Path, pid: u32) -> Result<Instance, HandoverError> {
        let dir = state_dir.join(INSTANCES_DIR);
        fs::create_dir_all(&dir).map_err(|source| HandoverError::Directory {
            path: dir.clone(),
            source,
        })?;
        let path = dir.join(pid.to_string());
        let lock_error = |source| HandoverError::Lock {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(lock_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(lock_error(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "held by another process with this pid (another pid namespace?)",
                )));
            }
            Err(TryLockError::Error(e)) => return Err(lock_error(e)),
        }
        // For a person looking at the directory; the lock is what counts.
        let _ = writeln!(file, "{pid}");
        let instance = Instance {
            dir,
            pid,
            path,
            _lock: file,
        };
        instance.others();
        Ok(instance)
    }

    /// The pid of another running instance (the newest one, if several), which takes over when
    /// this one stops; `None` when this is the only one. Files of crashed instances are removed.
    pub fn successor_running(&self) -> Option<u32> {
        self.others().into_iter().max()
    }

    /// The pids of the other live instances; removes leftovers nobody holds.
    fn others(&self) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut live = Vec::new();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == self.pid {
                continue;
            }
            let path = entry.path();
            match held(&path) {
                Some(true) => live.push(pid),
                Some(false) => {
                    tracing::debug!(pid, "removing a crashed instance's registration");
                    let _ = fs::remove_file(&path);
                }
                None => {}
            }
        }
        live
    }
}

/// Whether another process holds the lock on `path`; `None` if it cannot be told.
fn held(path: &Path) -> Option<bool> {
    let file = File::open(path).ok()?;
    match file.try_lock() {
        // Ours for a moment: nobody else holds it. Released when `file` drops.
        Ok(()) => Some(false),
        Err(TryLockError::WouldBlock) => Some(true),
        Err(TryLockError::Error(_)) => None,
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Removed while still locked, so a concurrent look never sees it free and live.
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_sees_another_until_it_stops() {
        let state = tempfile::tempdir().unwrap();
        let first = Instance::register_as(state.path(), 100).unwrap();
        assert_eq!(first.successor_running(), None);
        let second = Instance::register_as(state.path(), 200).unwrap();
        assert_eq!(first.successor_running(), Some(200));
        assert_eq!(second.successor_running(), Some(100));
        drop(second);
        assert_eq!(first.successor_running(), None);
        assert!(!state.path().join("instances/200").exists());
    }

    #[test]
    fn a_file_nobody_holds_is_a_crashed_instance_and_is_cleared() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join(INSTANCES_DIR);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("4242"), "4242\n").unwrap();
        let instance = Instance::register_as(state.path(), 100).unwrap();
        assert_eq!(instance.successor_running(), None);
        assert!(!dir.join("4242").exists(), "the leftover stays");
    }

    #[test]
    fn an_unwritable_state_dir_is_named() {
        let state = tempfile::tempdir().unwrap();
        let blocker = state.path().join("file");
        fs::write(&blocker, "").unwrap();
        let err = Instance::register_as(&blocker, 1).unwrap_err().to_string();
        assert!(err.contains("instance directory"), "{err}");
        assert!(err.contains(&blocker.display().to_string()), "{err}");
    }
}
