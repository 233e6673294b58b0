// SPDX-License-Identifier: Apache-2.0
/* ztund's in-pod capture without netfilter (BPF.md §1). One object, loaded once per node:
 * - cgroup/connect4|6 (attached to each pod's cgroup) send the app's TCP connections to the pod's
 *   outbound listener and remember where they were headed, by socket cookie;
 * - sockops moves that entry, at TCP_CONNECT_CB (source port chosen, SYN not yet sent), to a key
 *   ztund can compute from the accepted socket: {netns cookie, the app's address and port};
 * - cgroup/getpeername4|6 show the app the original destination, as REDIRECT would;
 * - sk_lookup (one instance per pod netns, its cookie a constant) steers inbound connections to ztund's listeners
 *   through a SOCKHASH; an empty slot drops, so while ztund is away the client's SYN retries
 *   instead of reaching the app in plaintext. */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ztund.h"

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define LOOPBACK_IFINDEX 1 /* lo is ifindex 1 in every netns */
#define PROBE_SOURCE_V4 0xa9fe077f /* 169.254.7.127; IPv6: fd16:9254:7127:1337:ffff:ffff:ffff:ffff */

/* Overridden by the loader (aya `override_global`); these are ztund's defaults. */
volatile const __u32 ZTUND_MARK = 0x539;
volatile const __u32 ZTUND_MARK_MASK = 0xfff;
volatile const __u16 ZTUND_OUTBOUND_PORT = 15001;
volatile const __u16 ZTUND_HBONE_PORT = 15008;
/* sk_lookup only: the netns this instance is attached to. The kernel (6.18) refuses
 * bpf_get_netns_cookie in sk_lookup programs ("program of this type cannot use helper
 * bpf_get_netns_cookie#122"), so each pod's netns gets its own instance with its cookie here. */
volatile const __u64 ZTUND_NETNS_COOKIE = 0;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct ztund_orig);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} orig_by_cookie SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ztund_tuple);
	__type(value, struct ztund_orig);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} orig_by_tuple SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 16384);
	__type(key, struct ztund_slot);
	__type(value, __u32); /* the socket fd on update, as aya's SockHash expects */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} listeners SEC(".maps");

char LICENSE[] SEC("license") = "GPL";

/* ztund's own sockets: never seen here in the first place (they belong to ztund's cgroup, not the
 * pod's), the mark is the backstop for a ztund that runs inside the pod's cgroup. */
static __always_inline int is_ztund(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	return sk && (sk->mark & ZTUND_MARK_MASK) == ZTUND_MARK;
}

static __always_inline int remember(struct bpf_sock_addr *ctx, struct ztund_orig *orig)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	return bpf_map_update_elem(&orig_by_cookie, &cookie, orig, BPF_ANY);
}

SEC("cgroup/connect4")
int ztund_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || is_ztund(ctx))
		return 1;
	__u32 dst = ctx->user_ip4;
	if ((bpf_ntohl(dst) >> 24) == 127)
		return 1;
	struct ztund_orig orig = {};
	orig.addr[0] = dst;
	orig.port = bpf_ntohs((__u16)ctx->user_port);
	orig.family = AF_INET;
	/* Without the entry ztund could not tell where to go: refuse (EPERM) rather than leak. */
	if (remember(ctx, &orig))
		return 0;
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(ZTUND_OUTBOUND_PORT);
	return 1;
}

static __always_inline int is_v4_mapped(__u32 a0, __u32 a1, __u32 a2)
{
	return a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff);
}

SEC("cgroup/connect6")
int ztund_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || is_ztund(ctx))
		return 1;
	__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1];
	__u32 a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
	struct ztund_orig orig = {};
	orig.port = bpf_ntohs((__u16)ctx->user_port);
	int mapped = is_v4_mapped(a0, a1, a2);
	if (mapped) {
		if ((bpf_ntohl(a3) >> 24) == 127)
			return 1;
		orig.family = AF_INET;
		orig.addr[0] = a3;
	} else {
		if (a0 == 0 && a1 == 0 && a2 == 0 && a3 == bpf_htonl(1))
			return 1;
		orig.family = AF_INET6;
		orig.addr[0] = a0;
		orig.addr[1] = a1;
		orig.addr[2] = a2;
		orig.addr[3] = a3;
	}
	if (remember(ctx, &orig))
		return 0;
	/* A v4-mapped destination stays mapped (::ffff:127.0.0.1): the socket may be dual-stack
	 * only, and ::1 would then be a different family on the wire. */
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
	ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
	ctx->user_port = bpf_htons(ZTUND_OUTBOUND_PORT);
	return 1;
}

SEC("sockops")
int ztund_sockops(struct bpf_sock_ops *skops)
{
	__u64 cookie;
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: {
		cookie = bpf_get_socket_cookie(skops);
		struct ztund_orig *orig = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
		if (!orig)
			return 1;
		struct ztund_tuple key = {};
		key.netns_cookie = bpf_get_netns_cookie(skops);
		key.port = (__u16)skops->local_port;
		if (skops->family == AF_INET) {
			key.family = AF_INET;
			key.addr[0] = skops->local_ip4;
		} else {
			__u32 a0 = skops->local_ip6[0], a1 = skops->local_ip6[1];
			__u32 a2 = skops->local_ip6[2], a3 = skops->local_ip6[3];
			if (is_v4_mapped(a0, a1, a2)) {
				key.family = AF_INET;
				key.addr[0] = a3;
			} else {
				key.family = AF_INET6;
				key.addr[0] = a0;
				key.addr[1] = a1;
				key.addr[2] = a2;
				key.addr[3] = a3;
			}
		}
		bpf_map_update_elem(&orig_by_tuple, &key, orig, BPF_ANY);
		/* Told when the socket closes, to drop the cookie's entry (getpeername needs it
		 * until then). */
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	}
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE) {
			cookie = bpf_get_socket_cookie(skops);
			bpf_map_delete_elem(&orig_by_cookie, &cookie);
		}
		return 1;
	}
	return 1;
}

SEC("cgroup/getpeername4")
int ztund_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct ztund_orig *orig = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
	if (orig && orig->family == AF_INET) {
		ctx->user_ip4 = orig->addr[0];
		ctx->user_port = bpf_htons(orig->port);
	}
	return 1;
}

SEC("cgroup/getpeername6")
int ztund_getpeername6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct ztund_orig *orig = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
	if (!orig)
		return 1;
	if (orig->family == AF_INET) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = orig->addr[0];
	} else {
		ctx->user_ip6[0] = orig->addr[0];
		ctx->user_ip6[1] = orig->addr[1];
		ctx->user_ip6[2] = orig->addr[2];
		ctx->user_ip6[3] = orig->addr[3];
	}
	ctx->user_port = bpf_htons(orig->port);
	return 1;
}

/* A connection made inside the netns: the app calling itself, ztund delivering to the app.
 * ingress_ifindex alone does not tell: for a local destination the kernel reports the device
 * that holds the address (eth0 for the pod IP; seen on 6.18), not lo. Such a connection's
 * source is the destination address itself (or loopback). A spoofed-source delivery
 * (IP_TRANSPARENT) would not be recognised: ztund delivers from the pod's own address. */
static __always_inline int is_local(struct bpf_sk_lookup *ctx)
{
	if (ctx->ingress_ifindex == LOOPBACK_IFINDEX)
		return 1;
	if (ctx->family == AF_INET)
		return ctx->remote_ip4 == ctx->local_ip4 ||
		       (bpf_ntohl(ctx->local_ip4) >> 24) == 127;
	return (ctx->remote_ip6[0] == ctx->local_ip6[0] && ctx->remote_ip6[1] == ctx->local_ip6[1] &&
		ctx->remote_ip6[2] == ctx->local_ip6[2] && ctx->remote_ip6[3] == ctx->local_ip6[3]) ||
	       (ctx->local_ip6[0] == 0 && ctx->local_ip6[1] == 0 && ctx->local_ip6[2] == 0 &&
		ctx->local_ip6[3] == bpf_htonl(1));
}

/* kubelet's probes arrive SNATed to Istio's probe source (PROTOCOL.md §5.5, as the nftables
 * backend's rules): they reach the app directly. */
static __always_inline int is_probe(struct bpf_sk_lookup *ctx)
{
	if (ctx->family == AF_INET)
		return ctx->remote_ip4 == bpf_htonl(PROBE_SOURCE_V4);
	return ctx->remote_ip6[0] == bpf_htonl(0xfd169254) &&
	       ctx->remote_ip6[1] == bpf_htonl(0x71271337) && ctx->remote_ip6[2] == 0xffffffff &&
	       ctx->remote_ip6[3] == 0xffffffff;
}

SEC("sk_lookup")
int ztund_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP || is_local(ctx) || is_probe(ctx))
		return SK_PASS;
	struct ztund_slot key = {};
	key.netns_cookie = ZTUND_NETNS_COOKIE;
	key.slot = ctx->local_port == ZTUND_HBONE_PORT ? ZTUND_SLOT_HBONE : ZTUND_SLOT_INBOUND;
	struct bpf_sock *sk = bpf_map_lookup_elem(&listeners, &key);
	/* Empty slot: ztund is not serving this pod (restarting, or gone). Fail closed. */
	if (!sk)
		return SK_DROP;
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}
