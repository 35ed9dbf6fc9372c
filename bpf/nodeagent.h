/* nodeagent.h — what the capture programs (connect.c, sockops.c, sk_lookup.c) share
 * with each other and with user space: structs, codes, counters, maps, small helpers.
 *
 * Compiled by bcc at agent start (nodeagent/capture/programs.py passes NA_PIN_DIR,
 * NA_MARK, NA_MARK_MASK and the NA_*_PORT flags). nodeagent/capture/structs.py mirrors every struct,
 * code, counter and map here; tests/kernel/test_structs.py checks they agree.
 *
 * ABI: maps are pinned and adopted by the next agent, so a running agent and its
 * successor must agree on them. Struct fields NEVER move, change size or get
 * renumbered (append at the end, keep the explicit padding); codes and counter indexes
 * are never renumbered; map names, types, key/value sizes and sizes never change.
 */
#ifndef NODEAGENT_H
#define NODEAGENT_H

#include <uapi/linux/bpf.h>

#if !defined(NA_PIN_DIR) || !defined(NA_MARK) || !defined(NA_MARK_MASK) || \
    !defined(NA_OUTBOUND_PORT) || !defined(NA_INBOUND_PORT) || !defined(NA_TUNNEL_PORT) || \
    !defined(NA_ADMIN_PORT)
#error "compile through nodeagent.capture: it passes -DNA_PIN_DIR, -DNA_MARK(_MASK) and -DNA_*_PORT"
#endif

/* The agent's own sockets: (mark & NA_MARK_MASK) == NA_MARK, ztunnel's 0x539/0xfff, so
 * its delivery mark (0x1539) is recognised too. */
#define na_is_agent_mark(mark) (((mark) & NA_MARK_MASK) == NA_MARK)

/* Our own copies: bcc's include set does not reliably pull in the libc/kernel ones. */
#define NA_AF_INET 2
#define NA_AF_INET6 10
#define NA_SOCK_STREAM 1
#define NA_IPPROTO_TCP 6
#define NA_LOOPBACK_IFINDEX 1 /* lo is always ifindex 1 in its netns */

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define na_htonl(x) __builtin_bswap32(x)
#define na_htons(x) __builtin_bswap16(x)
#else
#define na_htonl(x) (x)
#define na_htons(x) (x)
#endif
#define na_ntohs(x) na_htons(x)

#define NA_MAX_EXCLUDED_PORTS 8

/* ---- shared structs (mirrored in nodeagent/capture/structs.py) ---- */

/* An IP address as a map key. IPv4 uses addr[0]; addr[1..3] stay zero. */
struct na_addr {
	__u16 family; /* NA_AF_INET or NA_AF_INET6 */
	__u16 _pad0;
	__be32 addr[4]; /* network byte order */
};

/* Value of na_pods: one meshed pod network namespace. */
struct na_pod {
	__u32 flags; /* NA_POD_F_* */
	__u16 exclude_ports[NA_MAX_EXCLUDED_PORTS]; /* outbound, host order, 0 = unused */
};
#define NA_POD_F_CAPTURE (1U << 0) /* capture this netns' outbound TCP */

/* Value of na_enrolled_ips: a pod IP whose inbound TCP is steered to the agent. */
struct na_pod_ip {
	__u64 netns_cookie; /* the pod's netns (sk_lookup cannot ask; user space reads it) */
	__u16 exclude_ports[NA_MAX_EXCLUDED_PORTS]; /* inbound, host order, 0 = unused */
};

/* Original destination of a captured connect: value of na_origdst_ck and na_origdst. */
struct na_origdst {
	__u64 netns_cookie; /* netns the connect came from */
	struct na_addr dst;
	__be16 port; /* network byte order */
	__u16 _pad0;
};

/* Key of na_origdst: what the agent knows about an accepted outbound connection. */
struct na_origdst_key {
	__u64 netns_cookie;
	__u16 family; /* of the client socket (AF_INET6 for v4-mapped destinations) */
	__u16 client_port; /* host byte order: the accepted socket's peer port */
	__u32 _pad0;
};

_Static_assert(sizeof(struct na_addr) == 20, "struct na_addr layout is ABI");
_Static_assert(sizeof(struct na_pod) == 20, "struct na_pod layout is ABI");
_Static_assert(sizeof(struct na_pod_ip) == 24, "struct na_pod_ip layout is ABI");
_Static_assert(sizeof(struct na_origdst) == 32, "struct na_origdst layout is ABI");
_Static_assert(sizeof(struct na_origdst_key) == 16, "struct na_origdst_key layout is ABI");

/* ---- codes: why a program acted or not; negative, never renumbered ---- */
enum na_code {
	NA_OK = 0,
	NA_SKIP_NOT_TCP = -1,
	NA_SKIP_NOT_MESHED = -2,
	NA_SKIP_MARK = -3,
	NA_SKIP_LOOPBACK = -4,
	NA_SKIP_EXCLUDED = -5,
	NA_SKIP_AGENT_PORT = -6,
	NA_ERR_ORIGDST_UPDATE = -7,
	NA_ERR_NO_LISTENER = -8,
	NA_ERR_SK_ASSIGN = -9,
};

/* ---- counters: indexes into na_counters; never renumbered ---- */
enum na_counter {
	NA_CNT_CAPTURED = 0, /* connect rewritten to the outbound listener */
	NA_CNT_SKIPPED_MARK = 1, /* meshed netns, the agent's socket (na_is_agent_mark) */
	NA_CNT_SKIPPED_LOOPBACK = 2, /* meshed netns, loopback/unspecified destination */
	NA_CNT_SKIPPED_EXCLUDED = 3, /* meshed netns, excluded outbound port */
	NA_CNT_ORIGDST_RECORDED = 4, /* sockops published an original destination */
	NA_CNT_STEERED = 5, /* sk_lookup assigned the agent's inbound listener */
	NA_CNT_DROPPED_FAILCLOSED = 6, /* enrolled pod IP but no listener: dropped */
	NA_CNT_INBOUND_EXCLUDED = 7, /* enrolled pod IP, excluded inbound port: passed */
	NA_CNT_ERR_ORIGDST = 8, /* could not record an original destination: connect refused */
	NA_CNT_ERR_SK_ASSIGN = 9, /* bpf_sk_assign failed: dropped */
	NA_CNT_MAX = 10,
};

/* ---- maps: pinned under NA_PIN_DIR, so a restarted agent adopts them ---- */

/* Meshed pod netns: netns cookie -> struct na_pod. Written by the agent (enrol/remove). */
#define NA_PODS_MAX 1024
BPF_TABLE_PINNED("hash", __u64, struct na_pod, na_pods, NA_PODS_MAX, NA_PIN_DIR "/na_pods");

/* Captured connects not yet established: socket cookie -> struct na_origdst.
 * Written by connect4/6, moved to na_origdst by sockops. LRU: failed connects age out. */
#define NA_ORIGDST_CK_MAX 65536
BPF_TABLE_PINNED("lru_hash", __u64, struct na_origdst, na_origdst_ck, NA_ORIGDST_CK_MAX,
		 NA_PIN_DIR "/na_origdst_ck");

/* Established captured connections: struct na_origdst_key -> struct na_origdst.
 * Written by sockops, read and deleted by the agent on accept. */
#define NA_ORIGDST_MAX 65536
BPF_TABLE_PINNED("lru_hash", struct na_origdst_key, struct na_origdst, na_origdst, NA_ORIGDST_MAX,
		 NA_PIN_DIR "/na_origdst");

/* The agent's inbound (15006) listener per pod IP: struct na_addr -> socket.
 * Written by the agent (steer_inbound); the kernel drops an entry when its socket closes. */
#define NA_INBOUND_MAX 2048
BPF_TABLE_PINNED("sockhash", struct na_addr, __u64, na_inbound, NA_INBOUND_MAX,
		 NA_PIN_DIR "/na_inbound");

/* Pod IPs whose inbound TCP must go through the agent: struct na_addr -> struct na_pod_ip.
 * Written by the agent (steer_inbound/unsteer_inbound); outlives the listener (fail closed). */
#define NA_ENROLLED_IPS_MAX 2048
BPF_TABLE_PINNED("hash", struct na_addr, struct na_pod_ip, na_enrolled_ips, NA_ENROLLED_IPS_MAX,
		 NA_PIN_DIR "/na_enrolled_ips");

/* Per-CPU event counters, indexed by enum na_counter. Written by every program. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, na_counters, NA_CNT_MAX,
		 NA_PIN_DIR "/na_counters");

/* ---- helpers ----
 * Helpers that touch maps live in the .c files: bcc rewrites map calls
 * (na_pods.lookup(...)) only in the file it compiles, not in headers or macros.
 */

/* bcc declares bpf_get_socket_cookie as returning u32; the kernel returns the full u64. */
#define na_get_socket_cookie(ctx) (((__u64(*)(void *))BPF_FUNC_get_socket_cookie)(ctx))

static __always_inline int na_port_listed(const __u16 *ports, __u16 port)
{
#pragma unroll
	for (int i = 0; i < NA_MAX_EXCLUDED_PORTS; i++)
		if (ports[i] != 0 && ports[i] == port)
			return 1;
	return 0;
}

#endif /* NODEAGENT_H */
