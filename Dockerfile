# ztund's container image. Two ways to the same runtime image (README "Container image"):
#   docker build -t ztund .                     builds ztund in release in the `builder` stage
#   deploy/image/build-and-check.sh             packs a binary built outside (`--target prebuilt`),
#                                               for machines without a registry (CI)
# Both assemble the image's files with deploy/image/rootfs.sh.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# The caches only speed up rebuilds; the binary leaves the cached target/ inside this same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ztund \
    && deploy/image/rootfs.sh target/release/ztund /rootfs

# What every variant of the image declares. No shell, so ENTRYPOINT is in exec form; the Helm
# chart of Istio's ztunnel passes `proxy ztunnel` as the container's args.
FROM scratch AS base
ARG ZTUND_VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="ztund" \
      org.opencontainers.image.description="Node-level zero-trust tunnel daemon (HBONE, SPIFFE identities); a drop-in for Istio's ztunnel" \
      org.opencontainers.image.version="${ZTUND_VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Non-root unless the pod says otherwise: the node proxy's DaemonSet runs it as UID 0 with only
# NET_ADMIN, SYS_ADMIN and NET_RAW, since Kubernetes gives added capabilities to UID 0 only
# (README "Container image"); `ztund controlplane` needs none and runs as this user.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/ztund"]

# The image from a binary built outside; the build context holds rootfs/ made by rootfs.sh.
FROM base AS prebuilt
COPY rootfs/ /

# The default target: the image from the builder stage's release binary.
FROM base AS runtime
COPY --from=builder /rootfs/ /
