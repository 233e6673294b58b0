#!/usr/bin/env bash
# End to end on a real cluster: kind, Istio ambient from Istio's own Helm charts, ztunnel swapped
# for ztund with daemonset/istio-ztunnel-values.yaml (the image, nothing else), two sample apps,
# then: the client's mTLS identity as the server sees it, STRICT PeerAuthentication refusing
# plaintext from outside the mesh, and an AuthorizationPolicy DENY. Cleans up on any exit.
#
# Needs docker (with registry access for kind's node image, Istio's images and the apps), kind,
# helm and kubectl. CI does not run it; it exits 0 with "skipped: ..." where they are missing.
#
#   tests/kind/run.sh              # builds the ztund image from the repository's Dockerfile
#   ISTIO_VERSION=1.28.0 KEEP=1 tests/kind/run.sh
set -euo pipefail

cd "$(dirname "$0")/../.."
ISTIO_VERSION=${ISTIO_VERSION:-1.28.0}
CLUSTER=${CLUSTER:-ztund-e2e}
IMAGE=localhost/ztund:dev # as in daemonset/istio-ztunnel-values.yaml
KEEP=${KEEP:-}

skip() {
    echo "skipped: needs kind and docker with registry access ($1)"
    exit 0
}
for tool in docker kind helm kubectl; do
    command -v "$tool" >/dev/null 2>&1 || skip "no $tool"
done
docker info >/dev/null 2>&1 || skip "docker daemon not reachable"
docker manifest inspect docker.io/kindest/node:v1.33.1 >/dev/null 2>&1 || skip "no registry access"

fail() {
    echo "FAIL: $*" >&2
    kubectl -n istio-system logs -l app=ztunnel --tail=50 >&2 || true
    exit 1
}
cleanup() {
    local status=$?
    if [ -z "$KEEP" ]; then
        kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    else
        echo "KEEP set: cluster $CLUSTER left running"
    fi
    exit "$status"
}
trap cleanup EXIT

step() { echo "== $*"; }

step "ztund image $IMAGE"
[ -f Dockerfile ] || fail "no Dockerfile at the repository root to build $IMAGE from"
docker build -q -t "$IMAGE" . >/dev/null

step "kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 120s
kind load docker-image --name "$CLUSTER" "$IMAGE"

step "Istio $ISTIO_VERSION ambient (base, istiod, cni), ztunnel chart running ztund"
helm repo add istio https://istio-release.storage.googleapis.com/charts >/dev/null
helm repo update istio >/dev/null
chart() { helm upgrade --install "$1" "istio/$2" -n istio-system --version "$ISTIO_VERSION" --wait "${@:3}"; }
kubectl create namespace istio-system
chart istio-base base
chart istiod istiod --set profile=ambient
# ztund has no DNS proxy: istio-cni must not send pods' DNS to one.
chart istio-cni cni --set profile=ambient --set ambient.dnsCapture=false
chart ztunnel ztunnel -f daemonset/istio-ztunnel-values.yaml
kubectl -n istio-system rollout status daemonset/ztunnel --timeout=180s
image=$(kubectl -n istio-system get daemonset ztunnel -o jsonpath='{.spec.template.spec.containers[0].image}')
[ "$image" = "$IMAGE" ] || fail "the ztunnel DaemonSet runs $image, not $IMAGE"

step "sample apps: sleep and httpbin in the mesh, an outsider without it"
kubectl create namespace demo
kubectl label namespace demo istio.io/dataplane-mode=ambient
kubectl create namespace outside
kubectl -n demo create serviceaccount sleep
kubectl -n demo create serviceaccount httpbin
kubectl apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin, namespace: demo}
spec:
  selector: {matchLabels: {app: httpbin}}
  template:
    metadata: {labels: {app: httpbin}}
    spec:
      serviceAccountName: httpbin
      containers:
        - name: httpbin
          image: docker.io/mccutchen/go-httpbin:v2.15.0
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: demo}
spec:
  selector: {app: httpbin}
  ports: [{name: http, port: 8000, targetPort: 8080}]
YAML
for ns in demo outside; do
    kubectl -n "$ns" apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep}
spec:
  selector: {matchLabels: {app: sleep}}
  template:
    metadata: {labels: {app: sleep}}
    spec:
      containers:
        - name: sleep
          image: docker.io/curlimages/curl:8.11.1
          command: [sleep, infinity]
YAML
done
kubectl -n demo patch deployment sleep --type merge \
    -p '{"spec":{"template":{"spec":{"serviceAccountName":"sleep"}}}}'
for ns_deploy in demo/httpbin demo/sleep outside/sleep; do
    kubectl -n "${ns_deploy%/*}" rollout status "deployment/${ns_deploy#*/}" --timeout=180s
done

URL=http://httpbin.demo.svc.cluster.local:8000
# curl from a namespace's sleep pod; prints the HTTP status (000 when the connection fails).
status_from() {
    kubectl -n "$1" exec deploy/sleep -- \
        curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$URL${2:-/get}" || true
}
eventually() {
    local want=$1 from=$2 _
    for _ in $(seq 1 30); do
        [ "$(status_from "$from")" = "$want" ] && return 0
        sleep 2
    done
    return 1
}

step "reachable through ztund"
eventually 200 demo || fail "sleep in the mesh does not reach httpbin"

step "mTLS identity: the server node's ztund saw the client's SPIFFE id"
want=spiffe://cluster.local/ns/demo/sa/sleep
node=$(kubectl -n demo get pod -l app=httpbin -o jsonpath='{.items[0].spec.nodeName}')
proxy=$(kubectl -n istio-system get pod -l app=ztunnel \
    --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}')
found=""
for _ in $(seq 1 15); do
    status_from demo >/dev/null
    if kubectl -n istio-system logs "$proxy" --since=2m | grep -F "$want" | grep -q httpbin; then
        found=yes
        break
    fi
    sleep 2
done
[ -n "$found" ] || fail "no access log on $proxy names $want reaching httpbin"

step "STRICT PeerAuthentication: plaintext from outside the mesh is refused"
eventually 200 outside || fail "before STRICT, the outsider should reach httpbin"
kubectl apply -f - <<'YAML'
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
YAML
eventually 000 outside || fail "under STRICT, plaintext from the outsider still reaches httpbin"
[ "$(status_from demo)" = 200 ] || fail "under STRICT, the mesh client lost httpbin"

step "AuthorizationPolicy DENY: sleep may not reach httpbin"
kubectl apply -f - <<'YAML'
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sleep, namespace: demo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}]}]
YAML
eventually 000 demo || fail "DENY did not stop sleep reaching httpbin"
kubectl delete authorizationpolicy -n demo deny-sleep
eventually 200 demo || fail "with the DENY gone, sleep does not reach httpbin again"

echo "PASS: Istio $ISTIO_VERSION ambient with ztund from the ztunnel chart"
