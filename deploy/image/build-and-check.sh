#!/usr/bin/env bash
# Builds ztund's container image from an already built binary (the Dockerfile's `prebuilt`
# target: no registry needed) and checks it by running it: `ztund --version` through the image's
# entrypoint, as the image's non-root user, must print what the binary prints outside; the image
# must hold ztund and its libraries and no shell; its labels and user must be as declared. Then
# the daemon itself, as that user, in a network namespace of this script's own: it must answer
# readiness with 200 and exit 0 on SIGTERM.
#
# usage: build-and-check.sh [BINARY]     (default target/debug/ztund, which `cargo test` builds)
# Env: ZTUND_IMAGE  tag to build (default localhost/ztund:check); KEEP_IMAGE=1 keeps it (and
#      the storage it lives in, printed at the end) instead of removing both.
#
# Needs root, podman and runc (installed here with apt-get when missing). Storage lives in a
# temporary directory of its own, so the check neither reads nor changes the machine's images.
set -euo pipefail
cd "$(dirname "$0")/../.."

binary=${1:-target/debug/ztund}
image=${ZTUND_IMAGE:-localhost/ztund:check}
started=$(date +%s)

need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
# runc, not Debian's default crun: crun refuses to start containers on a host whose cgroups are
# mounted in hybrid mode (v1 controllers beside a v2 tree), as on the sandboxes CI runs in.
command -v runc >/dev/null 2>&1 || need+=(runc)
if ((${#need[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/ztund-image.XXXXXX")
podman=(podman --root "$work/storage" --runroot "$work/run" --runtime runc)
netns=ztund-image-$$
cleanup() {
    "${podman[@]}" rm -f -t 0 ztund-image-check >/dev/null 2>&1 || true
    ip netns delete "$netns" 2>/dev/null || true
    if [ "${KEEP_IMAGE:-0}" = 1 ]; then
        echo "image kept: ${podman[*]} images $image"
    else
        "${podman[@]}" rmi -f "$image" >/dev/null 2>&1 || true
        rm -rf "$work"
    fi
}
trap cleanup EXIT

fail() {
    echo "image check FAILED: $*" >&2
    exit 1
}

expected=$("$binary" --version)
deploy/image/rootfs.sh "$binary" "$work/context/rootfs"
# Overlay storage where the kernel allows it (it does here), else vfs: slower, works anywhere.
driver=overlay
if ! "${podman[@]}" --storage-driver overlay info >/dev/null 2>&1; then
    driver=vfs
fi
podman+=(--storage-driver "$driver")
"${podman[@]}" build --quiet --isolation chroot --target prebuilt \
    --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -f Dockerfile -t "$image" "$work/context" >/dev/null

# podman gives a container 1048576 open files and 4194304 processes unless told otherwise, and
# a sandboxed root (CI's) may not raise its limits that far: the container start fails with
# "setrlimit: operation not permitted". Lowering a limit is always allowed, and a run of
# `--version` needs few of either.
run=("${podman[@]}" run --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

inside=$("${run[@]}" --rm --network none "$image" --version) || fail "ztund --version did not run in the image"
[ "$inside" = "$expected" ] || fail "ztund --version printed '$inside' in the image, '$expected' outside"

user=$("${podman[@]}" image inspect --format '{{.Config.User}}' "$image")
[ "$user" = "65532:65532" ] || fail "image user is '$user', want 65532:65532"
entrypoint=$("${podman[@]}" image inspect --format '{{json .Config.Entrypoint}}' "$image")
[ "$entrypoint" = '["/usr/local/bin/ztund"]' ] || fail "entrypoint is $entrypoint"
label=$("${podman[@]}" image inspect \
    --format '{{index .Config.Labels "org.opencontainers.image.version"}}' "$image")
[ "ztund $label" = "$expected" ] ||
    fail "label org.opencontainers.image.version is '$label' but the binary is '$expected' (ARG ZTUND_VERSION in Dockerfile)"

container=$("${podman[@]}" create "$image")
files=$("${podman[@]}" export "$container" | tar -t)
"${podman[@]}" rm "$container" >/dev/null
for wanted in usr/local/bin/ztund lib64/ld-linux-x86-64.so.2 etc/passwd; do
    grep -qx "$wanted" <<<"$files" || fail "the image lacks /$wanted"
done
for unwanted in bin/sh usr/bin/sh bin/bash usr/bin/apt-get; do
    if grep -qx "$unwanted" <<<"$files"; then
        fail "the image holds /$unwanted; the runtime image has no shell or package manager"
    fi
done

# The daemon: a node with the built-in CA, an empty mesh and no capture, which needs no
# privilege, so it runs as the image's user. Its namespace holds only loopback. Its state lives
# in /tmp/ztund, as in the DaemonSets: the image's only writable directory for that user.
node=$work/node
"$binary" ca init --dir "$node/ca" >/dev/null
printf '%s\n' 'node: image-check' 'meshFile: mesh.yaml' 'ca: {mode: builtin, dir: ca}' \
    'capture: none' 'stateDir: /tmp/ztund' >"$node/config.yaml"
: >"$node/mesh.yaml"
chown -R 65532:65532 "$node"
ip netns add "$netns"
ip -n "$netns" link set lo up
"${run[@]}" -d --name ztund-image-check --network "ns:/run/netns/$netns" \
    -v "$node:/etc/ztund:ro" "$image" run --config /etc/ztund/config.yaml >/dev/null
ready=""
for _ in $(seq 100); do
    ready=$(ip netns exec "$netns" bash -c 'exec 3<>/dev/tcp/127.0.0.1/15021 &&
        printf "GET /healthz/ready HTTP/1.0\r\n\r\n" >&3 && head -n1 <&3' 2>/dev/null || true)
    case $ready in *" 200 "*) break ;; esac
    running=$("${podman[@]}" inspect --format '{{.State.Running}}' ztund-image-check)
    [ "$running" = true ] || break
    sleep 0.1
done
case $ready in
*" 200 "*) ;;
*)
    "${podman[@]}" logs ztund-image-check >&2 || true
    fail "the daemon in the image did not answer readiness with 200 within 10 s, or exited (last answer: '$ready')"
    ;;
esac
"${podman[@]}" stop -t 10 ztund-image-check >/dev/null
status=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' ztund-image-check)
if [ "$status" != 0 ]; then
    "${podman[@]}" logs ztund-image-check >&2 || true
    fail "the daemon in the image exited $status on SIGTERM"
fi
"${podman[@]}" rm ztund-image-check >/dev/null

size=$("${podman[@]}" image inspect --format '{{.Size}}' "$image")
echo "image check: ok ($image, $((size / 1024 / 1024)) MiB, $(grep -vc '/$' <<<"$files") files," \
    "storage $driver, '$inside' as user $user, daemon ready and stopped cleanly," \
    "$(($(date +%s) - started)) s)"
