//! Compiles every `.proto` under `proto/` into Rust: messages with prost, gRPC clients and servers
//! with tonic. The protobuf parser is `protox` (pure Rust), so no `protoc` is needed on the build
//! machine. Well-known types (`google.protobuf.*`) come from `prost-types`.
//!
//! Also compiles the eBPF capture programs (`bpf/ztund.bpf.c`) with clang when clang is there,
//! setting `cfg(ztund_bpf)`; without clang ztund still builds and its eBPF backend reports that
//! it is unavailable (src/capture/bpf/). A clang that is there but fails the build fails it: a
//! broken program must not turn into a silently missing backend.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new("proto");
    println!("cargo:rerun-if-changed=proto");
    let mut files = Vec::new();
    collect_protos(root, &mut files)?;
    files.sort();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    build_bpf()?;
    Ok(())
}

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

/// `clang -O2 -g -target bpf` of `bpf/ztund.bpf.c` into `$OUT_DIR/ztund.bpf.o` (BPF.md §1).
fn build_bpf() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rustc-check-cfg=cfg(ztund_bpf)");
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    if Command::new(&clang).arg("--version").output().is_err() {
        println!("cargo:warning=clang not found: ztund is built without its eBPF capture backend");
        return Ok(());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("ztund.bpf.o");
    // <asm/types.h>, included by the UAPI headers, sits in Debian's multiarch directory; the
    // bpf target has no multiarch of its own, so the host's is named.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH")?;
    let output = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{arch}-linux-gnu"))
        .arg("-c")
        .arg("bpf/ztund.bpf.c")
        .arg("-o")
        .arg(&out)
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "{clang} failed on bpf/ztund.bpf.c (apt-get install clang llvm libbpf-dev):\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    println!("cargo:rustc-cfg=ztund_bpf");
    Ok(())
}
