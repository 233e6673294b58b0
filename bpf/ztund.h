/* Structures shared by the eBPF programs (ztund.bpf.c) and ztund (src/capture/bpf/maps.rs, which
 * mirrors them as #[repr(C)]). Any change here is a map-layout change: bump the pin directory's
 * version (BPF.md §1(c)) so an old ztund's pinned maps are never read with the new layout. */
#ifndef ZTUND_H
#define ZTUND_H

#include <linux/types.h>

/* Where an app's connect() was headed before the redirect to the outbound listener. */
struct ztund_orig {
	__u32 addr[4]; /* network order; IPv4 (also v4-mapped) in addr[0], the rest zero */
	__u16 port;    /* host order */
	__u16 family;  /* AF_INET or AF_INET6 */
};

/* The app's socket as the outbound listener's accepted socket sees its peer: one per connection
 * in a netns, known before the SYN is sent (sockops TCP_CONNECT_CB), so ztund's lookup at accept
 * can never race the entry. */
struct ztund_tuple {
	__u64 netns_cookie;
	__u32 addr[4]; /* network order; IPv4 and v4-mapped in addr[0], as AF_INET */
	__u16 port;    /* host order */
	__u16 family;
	__u32 pad;
};

/* One listener slot of a pod's netns in the `listeners` SOCKHASH. */
struct ztund_slot {
	__u64 netns_cookie;
	__u32 slot; /* ZTUND_SLOT_* */
	__u32 pad;
};

#define ZTUND_SLOT_INBOUND 0 /* plaintext inbound (15006) */
#define ZTUND_SLOT_HBONE 1   /* HBONE (15008) */

#endif
