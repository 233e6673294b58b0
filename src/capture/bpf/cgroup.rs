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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn the_mount_point_is_a_root_and_this_process_is_below_it() {
        let mount = mount().expect("a cgroup2 mount");
        assert!(is_root(&mount).unwrap());
        let own = of_process(std::process::id(), &mount).unwrap();
        assert!(own.starts_with(&mount));
    }
}
