//! Per-node bearer tokens: `STATE/tokens/<node>`, one file per node holding its token (mode
//! 0600, in a 0700 directory). `ztund controlplane token` makes (or rotates) one; the server
//! maps an incoming `authorization: Bearer <token>` to its node, re-reading a token file whenever
//! its stamp changes, so a rotation takes effect at once and the old token stops working.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The directory under the state directory.
pub const TOKENS_DIR: &str = "tokens";

/// Why a token could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("node name {node:?}: {reason}")]
    BadNode { node: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TokenError + '_ {
    move |source| TokenError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A node name usable as a file name: a DNS subdomain (what Kubernetes allows for nodes).
pub fn check_node(node: &str) -> Result<(), TokenError> {
    let bad = |reason: &str| TokenError::BadNode {
        node: node.to_string(),
        reason: reason.to_string(),
    };
    if node.is_empty() || node.len() > 253 {
        return Err(bad("must be 1 to 253 characters"));
    }
    if !node
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(bad(
            "only lowercase letters, digits, '-' and '.' are allowed",
        ));
    }
    if node.starts_with(['.', '-']) || node.ends_with(['.', '-']) {
        return Err(bad("must start and end with a letter or digit"));
    }
    Ok(())
}

/// The node's token, made (32 random bytes, hex) if it has none or if `rotate` is set.
pub fn node_token(state_dir: &Path, node: &str, rotate: bool) -> Result<String, TokenError> {
    check_node(node)?;
    let dir = state_dir.join(TOKENS_DIR);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
    let path = dir.join(node);
    if !rotate && let Ok(text) = std::fs::read_to_string(&path) {
        let token = text.trim();
        if !token.is_empty() {
            return Ok(token.to_string());
        }
    }
    let bytes: [u8; 32] = rand::random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // Written whole under a hidden name, then renamed: the server never sees half a token.
    let tmp = dir.join(format!(".{node}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(token)
}

/// The tokens in force, read from `STATE/tokens`.
#[derive(Debug)]
pub struct TokenStore {
    dir: PathBuf,
    /// Node → (file stamp, token), refreshed when the stamp changes.
    cache: Mutex<HashMap<String, (Stamp, String)>>,
}

type Stamp = (u64, i64, i64, u64);

impl TokenStore {
    pub fn new(state_dir: &Path) -> TokenStore {
        TokenStore {
            dir: state_dir.join(TOKENS_DIR),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The node whose token this is, reading the token files as they are now.
    pub fn node_of(&self, token: &str) -> Option<String> {
        if token.is_empty() {
            return None;
        }
        let entries = std::fs::read_dir(&self.dir).ok()?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut present = Vec::new();
        for entry in entries.flatten() {
            let Ok(node) = entry.file_name().into_string() else {
                continue;
            };
            if check_node(&node).is_err() {
                continue;
            }
            let Ok(meta) = std::fs::metadata(entry.path()) else {
                continue;
            };
            let stamp = (meta.ino(), meta.mtime(), meta.mtime_nsec(), meta.size());
            if cache.get(&node).is_none_or(|(s, _)| *s != stamp) {
                let Ok(text) = std::fs::read_to_string(entry.path()) else {
                    continue;
                };
                cache.insert(node.clone(), (stamp, text.trim().to_string()));
            }
            present.push(node);
        }
        cache.retain(|node, _| present.contains(node));
        cache
            .iter()
            .find(|(_, (_, known))| !known.is_empty() && same(known.as_bytes(), token.as_bytes()))
            .map(|(node, _)| node.clone())
    }

    /// The node a call comes from, by its bearer token; `Unauthenticated` otherwise.
    pub fn authenticate<T>(&self, request: &tonic::Request<T>) -> Result<String, tonic::Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let Some(token) = crate::grpc::bearer_token(request) else {
            tracing::warn!(%peer, "refused: no bearer token");
            return Err(tonic::Status::unauthenticated(
                "authorization: Bearer <node token> is required",
            ));
        };
        match self.node_of(token) {
            Some(node) => Ok(node),
            None => {
                tracing::warn!(%peer, "refused: unknown bearer token");
                Err(tonic::Status::unauthenticated("unknown bearer token"))
            }
        }
    }
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_made_once_rotated_on_demand_and_looked_up_fresh() {
        let state = tempfile::tempdir().unwrap();
        let store = TokenStore::new(state.path());
        assert_eq!(store.node_of("anything"), None, "no tokens yet");
        let first = node_token(state.path(), "node1", false).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(node_token(state.path(), "node1", false).unwrap(), first);
        let path = state.path().join("tokens/node1");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(store.node_of(&first).as_deref(), Some("node1"));
        assert_eq!(store.node_of(""), None);

        let rotated = node_token(state.path(), "node1", true).unwrap();
        assert_ne!(rotated, first);
        assert_eq!(store.node_of(&first), None, "the old token stops working");
        assert_eq!(store.node_of(&rotated).as_deref(), Some("node1"));

        for bad in ["", "../x", "Node", "a/b", ".hidden", "-x"] {
            assert!(node_token(state.path(), bad, false).is_err(), "{bad:?}");
        }
    }
}
