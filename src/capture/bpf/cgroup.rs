//! Finding cgroup2 directories: the hierarchy's mount points (never attached to: a program on
//! the root would capture the whole node, ztund included) and a process's own cgroup.

use std::io;
use std::path::{Path, PathBuf};

/// Every cgroup2 mount point of this mount namespace (`/proc/self/mountinfo`).
pub fn mounts() -> io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            // "... mount-point options - fstype source super-options"
            let (before, after) = line.split_once(" - ")?;
            let fstype = after.split_whitespace().next()?;
            let mount_point = before.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest
            .get(at + 1..at + 4)
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The first cgroup2 mount point (`/sys/fs/cgroup` in Kubernetes, `/sys/fs/cgroup/unified` on a
/// hybrid host).
pub fn mount() -> io::Result<PathBuf> {
    mounts()?
        .into_iter()
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 hierarchy is mounted"))
}

/// Whether `dir` is the root of a cgroup2 hierarchy (a mount point, or the same directory
/// reached by another path).
pub fn is_root(dir: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir)?;
    for mount in mounts()? {
        if let Ok(root) = std::fs::metadata(&mount)
            && root.dev() == meta.dev()
            && root.ino() == meta.ino()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The cgroup2 directory of process `pid` (`0::/path` of `/proc/<pid>/cgroup`) under `mount`.
pub fn of_process(pid: u32, mount: &Path) -> io::Result<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {pid} is in no cgroup2 group"),
            )
        })?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

/// The cgroup2 directory (under `mount`) of the pod whose network namespace is `netns` and
/// whose uid is `uid`. istio-cni hands over a netns, not a cgroup, so it is found from the
/// processes in that netns (`/proc/*/ns/net`): the common ancestor of their cgroups, then the
/// nearest ancestor named after the pod's uid if there is one (kubelet's `pod<uid>` or
/// `…pod<uid_with_underscores>.slice`: at CNI ADD only the sandbox's process runs, in a
/// container directory below the pod's). Processes in the hierarchy's root (host tools that
/// entered the netns, `ip netns exec`) and ztund itself are not the pod's and are skipped.
pub fn of_netns(netns: &crate::net::Netns, uid: &str, mount: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let id = netns.id();
    let own = std::process::id();
    let mut found: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        // A process may exit between the listing and these reads: skipped.
        let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if ns.dev() != id.dev || ns.ino() != id.ino {
            continue;
        }
        if let Ok(dir) = of_process(pid, mount)
            && dir != mount
            && !found.contains(&dir)
        {
            found.push(dir);
        }
    }
    let common = common_ancestor(&found).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no process of the pod runs in it (outside the cgroup2 root)",
        )
    })?;
    let pod = pod_ancestor(&common, uid, mount).unwrap_or(common);
    if pod == mount {
        let list: Vec<String> = found.iter().map(|d| d.display().to_string()).collect();
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "its processes share no cgroup below the root ({})",
                list.join(", ")
            ),
        ));
    }
    Ok(pod)
}

/// The deepest directory that holds all of `dirs`.
fn common_ancestor(dirs: &[PathBuf]) -> Option<PathBuf> {
    let (first, rest) = dirs.split_first()?;
    let mut common = first.clone();
    for dir in rest {
        while !dir.starts_with(&common) {
            if !common.pop() {
                return None;
            }
        }
    }
    Some(common)
}

/// The nearest ancestor of `dir` (itself included, `mount` excluded) whose name holds `uid`,
/// with dashes or (systemd's slice names) underscores.
fn pod_ancestor(dir: &Path, uid: &str, mount: &Path) -> Option<PathBuf> {
    if uid.is_empty() {
        return None;
    }
    let underscored = uid.replace('-', "_");
    dir.ancestors()
        .take_while(|d| *d != mount && d.starts_with(mount))
        .find(|d| {
            d.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(uid) || n.contains(&underscored))
        })
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn the_pod_directory_is_the_common_ancestor_or_the_one_named_after_the_uid() {
        let m = Path::new("/cg");
        let dirs = [
            PathBuf::from("/cg/kp/pod1-2/a"),
            PathBuf::from("/cg/kp/pod1-2/b"),
        ];
        assert_eq!(common_ancestor(&dirs), Some(PathBuf::from("/cg/kp/pod1-2")));
        let sandbox = Path::new("/cg/kp/kp-pod1_2.slice/cri-abc.scope");
        assert_eq!(
            pod_ancestor(sandbox, "1-2", m),
            Some(PathBuf::from("/cg/kp/kp-pod1_2.slice"))
        );
        assert_eq!(pod_ancestor(sandbox, "9-9", m), None);
        assert_eq!(common_ancestor(&[]), None);
    }

    #[test]
    fn the_mount_point_is_a_root_and_this_process_is_below_it() {
        let mount = mount().expect("a cgroup2 mount");
        assert!(is_root(&mount).unwrap());
        let own = of_process(std::process::id(), &mount).unwrap();
        assert!(own.starts_with(&mount));
    }
}
