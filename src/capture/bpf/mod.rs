//! The eBPF capture backend (issue 13, BPF.md §1): in-pod capture without netfilter. The programs
//! are `bpf/ztund.bpf.c`, compiled by build.rs when clang is there; [`BpfCapture`] loads them once
//! per node, attaches the outbound programs to a pod's cgroup and `sk_lookup` to its netns, and
//! pins the links so capture outlives ztund (fail closed). The accept side finds the original
//! destination through [`original_destination`], which `crate::net::original_destination` asks
//! before `SO_ORIGINAL_DST`.

pub mod cgroup;
mod loader;
mod origdst;
mod pods;

use std::io;
use std::path::PathBuf;

pub use loader::{BpfCapture, BpfSettings, Slot, netns_cookie_of};
pub use origdst::{OrigDstTable, netns_cookie, original_destination, register};
pub use pods::{PodCapture, delivers_from_pod};

/// The object build.rs compiled, or `None` when ztund was built without clang.
#[cfg(ztund_bpf)]
pub(crate) static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/ztund.bpf.o"
)));
#[cfg(not(ztund_bpf))]
pub(crate) static OBJECT: Option<&[u8]> = None;

/// Whether this build carries the eBPF programs.
pub fn built_in() -> bool {
    OBJECT.is_some()
}

/// What went wrong loading, attaching or using the eBPF capture.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "eBPF capture unavailable: built without clang (apt-get install clang llvm libbpf-dev, then rebuild)"
    )]
    Unavailable,
    #[error(
        "{dir} is not on a bpffs (mount -t bpf bpf {dir}, or mount the host's /sys/fs/bpf into ztund's pod)"
    )]
    NotBpffs { dir: PathBuf },
    #[error(
        "bpf() not permitted ({call}): the eBPF backend needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN)"
    )]
    NotPermitted { call: String },
    #[error("parsing or creating the maps of bpf/ztund.bpf.o: {0}")]
    Object(#[source] Box<aya::EbpfError>),
    /// The verifier's own message is part of the text (aya puts it in `LoadError`).
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("eBPF link of {name}: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    /// istio-cni hands over a netns; the pod's cgroup is found from its processes.
    #[error("no cgroup found for the pod in netns {netns}: {source}")]
    PodCgroup {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("refusing to attach to {path}: it is the root of a cgroup2 hierarchy")]
    RootCgroup { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl BpfError {
    fn program(name: &'static str, source: aya::programs::ProgramError) -> BpfError {
        if let Some(call) = permission_denied(&source) {
            return BpfError::NotPermitted { call };
        }
        BpfError::Program {
            name,
            source: Box::new(source),
        }
    }

    fn link(name: &'static str, source: aya::programs::links::LinkError) -> BpfError {
        BpfError::Link {
            name,
            source: Box::new(source),
        }
    }

    fn map(name: &'static str, source: aya::maps::MapError) -> BpfError {
        BpfError::Map {
            name,
            source: Box::new(source),
        }
    }
}

/// The syscall that returned EPERM, for the message naming the capability.
fn permission_denied(error: &aya::programs::ProgramError) -> Option<String> {
    use aya::programs::ProgramError;
    match error {
        ProgramError::LoadError { io_error, .. }
            if io_error.raw_os_error() == Some(libc::EPERM) =>
        {
            Some("BPF_PROG_LOAD".to_string())
        }
        ProgramError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::EPERM) => {
            Some(e.call.to_string())
        }
        _ => None,
    }
}
