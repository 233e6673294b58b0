#!/usr/bin/env bash
# Assembles the root filesystem of ztund's runtime image: the binary, exactly the shared libraries
# it links (as `ldd` resolves them on the machine that built it, so they match the glibc it was
# linked against), their copyright files, and the few files glibc and Kubernetes expect.
# Nothing else: no shell, no package manager, no CA bundle (ztund trusts only the roots its
# config names).
#
# Used by both ways of building the image, so they cannot differ: the Dockerfile's builder stage
# runs it on the release binary, and build-and-check.sh runs it on the binary CI already built.
#
# usage: rootfs.sh BINARY OUT_DIR
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 BINARY OUT_DIR" >&2
    exit 2
fi
binary=$1
out=$2

if [ ! -x "$binary" ]; then
    echo "rootfs.sh: $binary is not an executable file" >&2
    exit 1
fi
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ]; then
    echo "rootfs.sh: $out is not empty; refusing to mix two images' files" >&2
    exit 1
fi

install -D -m 0755 "$binary" "$out/usr/local/bin/ztund"
# Debug info is most of a debug build's size (244 MB -> 14 MB) and is never read in a container.
strip "$out/usr/local/bin/ztund"

# `ldd` prints "name => /path (addr)" for libraries and "/path (addr)" for the loader.
libraries=$(ldd "$binary" | awk '
    /not found/ { print "MISSING " $1; next }
    $2 == "=>" && $3 ~ /^\// { print $3; next }
    $1 ~ /^\// { print $1 }
')
if grep -q '^MISSING' <<<"$libraries"; then
    echo "rootfs.sh: $binary links libraries this machine lacks:" >&2
    grep '^MISSING' <<<"$libraries" >&2
    exit 1
fi

packages=()
for library in $libraries; do
    # Copy the file behind the symlink to the path the loader looks up.
    install -D -m 0755 "$(readlink -f "$library")" "$out$library"
    owner=$(dpkg -S "$library" 2>/dev/null | head -n1 | cut -d: -f1 || true)
    if [ -n "$owner" ]; then
        packages+=("$owner")
    fi
done
# The libraries' licences travel with them, as Debian ships them.
for package in $(printf '%s\n' "${packages[@]}" | sort -u); do
    if [ -f "/usr/share/doc/$package/copyright" ]; then
        install -D -m 0644 "/usr/share/doc/$package/copyright" "$out/usr/share/doc/$package/copyright"
    fi
done

# Users and groups: root for the DaemonSet (Kubernetes grants capabilities only to UID 0, see
# README "Container image"), nonroot (65532, the distroless convention) as the image's default.
install -d -m 0755 "$out/etc"
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$out/etc/passwd"
printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$out/etc/group"
# glibc resolves istiod's name through these (nss files and dns are built into glibc >= 2.34);
# Kubernetes mounts /etc/hosts and /etc/resolv.conf.
echo 'hosts: files dns' >"$out/etc/nsswitch.conf"

install -d -m 1777 "$out/tmp"
install -d -m 0755 "$out/home/nonroot"
