#!/usr/bin/env python3
"""Writes the seed inputs of the byte-fed fuzz targets into fuzz/corpus/<target>/seed-*.

The structured targets (svid_leaf, ca_response, xds_delta_seq, zds_message, zds_state, headers,
rbac_diff) build their inputs with `arbitrary` and need no seeds. Everything here is written
by hand from the protocols (protobuf field numbers from proto/, HTTP/2 frames from RFC 9113,
HPACK from RFC 7541); nothing is fetched. Idempotent: existing seeds are rewritten.
"""
import pathlib
import struct

FUZZ = pathlib.Path(__file__).resolve().parent
CORPUS = FUZZ / "corpus"


def write(target, seeds):
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        data = seed.encode() if isinstance(seed, str) else seed
        (folder / f"seed-{i:02}").write_bytes(data)


# --- protobuf, just enough: varints, length-delimited fields ---
def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number, value):
    """A field: int -> varint (wire type 0), bytes/str -> length-delimited (wire type 2)."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def message(*fields):
    return b"".join(field(n, v) for n, v in fields)


def ipv4(text):
    return bytes(int(part) for part in text.split("."))


# istio.workload.Workload (proto/istio/workload/workload.proto)
workload = message(
    (20, "Kubernetes//Pod/default/echo"), (1, "echo"), (2, "default"),
    (3, ipv4("10.0.0.2")), (5, 1), (7, "echo"), (9, "node1"),
    (16, "default/allow-sleep"),
)
# istio.workload.Service: namespace, hostname, addresses (NetworkAddress), ports (Port).
service = message(
    (1, "echo"), (2, "default"), (3, "echo.default.svc.cluster.local"),
    (4, message((1, ""), (2, ipv4("10.96.0.10")))),
    (5, message((1, 80), (2, 8080))),
    (6, "spiffe://cluster.local/ns/default/sa/echo"),
)
# istio.security.Authorization: name, namespace, scope, action, rules.
match = message(
    (1, message((1, "default"))),                      # namespaces: exact
    (3, message((2, "cluster.local/ns/default/sa/"))),  # principals: prefix
    (5, message((1, ipv4("10.0.0.0")), (2, 8))),       # source_ips
    (9, 8080),                                         # destination_ports
)
authorization = message(
    (1, "allow-sleep"), (2, "default"), (3, 1), (4, 0),
    (5, message((1, message((2, match))))),            # rules[0].clauses[0].matches[0]
)
# ztund.config.v1.DestinationRule: name, namespace, spec_json.
destination_rule = message(
    (1, "echo-tls"), (2, "default"),
    (4, '{"host":"echo.default.svc.cluster.local","trafficPolicy":{"tls":{"mode":"SIMPLE"}}}'),
)
# Input of xds_resources: [kind, flags (bit 0: name from content), protobuf].
write("xds_resources", [
    b"\x00\x01" + message((1, workload)),   # Address{workload}
    b"\x00\x01" + message((2, service)),    # Address{service}
    b"\x01\x01" + authorization,
    b"\x02\x01" + destination_rule,
    b"\x00\x00" + message((1, workload)),   # named otherwise: refused
])

write("hbone_authority", [
    "10.0.0.2:8080", "[fd00::2]:80", "reviews.default.svc.cluster.local:9080",
    "127.0.0.1:15008", "[::ffff:127.0.0.1]:15021", "localhost:80", "127.1:80",
    "2130706433:80", "user@10.0.0.2:80", "[fe80::1%25eth0]:80", "10.0.0.2:0", "a.b:65536",
])

write("spiffe_id", [
    "spiffe://cluster.local/ns/default/sa/sleep", "spiffe://cluster.local/ns/../sa/x",
    "spiffe:///ns//sa/", "spiffe://td/ns/a/sa/b/c", "spiffe://td:80/ns/a/sa/b",
    "spiffe://td/ns/a%2Fb/sa/c", "spiffe://td/ns/a/sa/b?q#f",
])

write("yaml_policy", [
    (FUZZ.parent / "examples" / "mesh.yaml").read_text(),
    """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-prod, namespace: default}
spec:
  action: DENY
  selector: {matchLabels: {app: echo}}
  rules:
  - from: [{source: {namespaces: ["prod"], ipBlocks: ["10.0.0.0/8", "::ffff:10.0.0.0/104"]}}]
    to: [{operation: {ports: ["8080"]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: istio-system}
spec: {mtls: {mode: STRICT}, portLevelMtls: {"8080": {mode: PERMISSIVE}}}
""",
    "a: &a [*a, *a]\nb: &b [*a, *a]\n",
    "[" * 200 + "]" * 200,
])


# --- HTTP/2 frames (RFC 9113 §4.1) after the client preface ---
def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def literal(index, value):
    """HPACK literal header field without indexing, name from the static table (RFC 7541 §6.2.2)."""
    data = value.encode()
    return bytes([index]) + bytes([len(data)]) + data


def connect(authority):
    # Static table: 1 = :authority, 2 = :method (GET) whose name we reuse.
    return literal(2, "CONNECT") + literal(1, authority)


settings = frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 65535))
write("h2_server", [
    settings,
    settings + frame(HEADERS, END_HEADERS, 1, connect("10.0.0.2:8080"))
    + frame(DATA, 0, 1, b"hello") + frame(DATA, END_STREAM, 1, b""),
    settings + frame(HEADERS, END_HEADERS, 1, connect("10.0.0.2:8081"))
    + frame(RST_STREAM, 0, 1, struct.pack(">I", 8)),
    settings + frame(HEADERS, 0, 3, connect("10.0.0.2:8082")[:5])
    + frame(CONTINUATION, END_HEADERS, 3, connect("10.0.0.2:8082")[5:]),
    settings + frame(PING, 0, 0, b"\0" * 8) + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20))
    + frame(SETTINGS, ACK, 0) + frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)),
    settings + frame(HEADERS, END_HEADERS | END_STREAM, 1, literal(2, "GET") + literal(1, "x:1")),
])
