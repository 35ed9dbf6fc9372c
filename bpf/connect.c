/* connect.c — outbound capture: cgroup/connect4 and cgroup/connect6.
 *
 * For a TCP connect from a meshed pod netns (its cookie is in na_pods) the original
 * destination is saved in na_origdst_ck (key: socket cookie) and the connect is
 * rewritten to the agent's outbound listener inside the same netns (127.0.0.1 or ::1,
 * port NA_OUTBOUND_PORT). sockops.c publishes the entry once the connection is up.
 * Left alone: other netns, the agent's own sockets (SO_MARK, see na_is_agent_mark), loopback and
 * unspecified destinations, and the pod's excluded outbound ports.
 * Returns 1 (proceed) except when the destination cannot be recorded: then 0, so the
 * connect fails with EPERM instead of leaving the mesh (fail closed).
 */
#include "nodeagent.h"

/* Bump a per-CPU counter (no atomics needed). Defined per program file: see nodeagent.h. */
static __always_inline void na_count(__u32 counter)
{
	__u64 *value = na_counters.lookup(&counter);

	if (value)
		*value += 1;
}

/* Decide whether to capture, and record the original destination if so. */
static __always_inline int na_capture(struct bpf_sock_addr *ctx, struct na_origdst *orig,
				      int loopback)
{
	struct bpf_sock *sk = ctx->sk;
	__u64 netns_cookie, sock_cookie;
	struct na_pod *pod;

	if (ctx->type != NA_SOCK_STREAM || ctx->protocol != NA_IPPROTO_TCP)
		return NA_SKIP_NOT_TCP;
	netns_cookie = bpf_get_netns_cookie(ctx);
	pod = na_pods.lookup(&netns_cookie);
	if (!pod || !(pod->flags & NA_POD_F_CAPTURE))
		return NA_SKIP_NOT_MESHED;
	if (sk && na_is_agent_mark(sk->mark))
		return NA_SKIP_MARK;
	if (loopback)
		return NA_SKIP_LOOPBACK;
	if (na_port_listed(pod->exclude_ports, na_ntohs(orig->port)))
		return NA_SKIP_EXCLUDED;

	orig->netns_cookie = netns_cookie;
	sock_cookie = na_get_socket_cookie(ctx);
	if (na_origdst_ck.update(&sock_cookie, orig))
		return NA_ERR_ORIGDST_UPDATE;
	return NA_OK;
}

/* Count the decision; the connect's verdict (1 = proceed, 0 = EPERM). */
static __always_inline int na_connect_verdict(int code)
{
	switch (code) {
	case NA_OK:
		na_count(NA_CNT_CAPTURED);
		return 1;
	case NA_SKIP_MARK:
		na_count(NA_CNT_SKIPPED_MARK);
		return 1;
	case NA_SKIP_LOOPBACK:
		na_count(NA_CNT_SKIPPED_LOOPBACK);
		return 1;
	case NA_SKIP_EXCLUDED:
		na_count(NA_CNT_SKIPPED_EXCLUDED);
		return 1;
	case NA_ERR_ORIGDST_UPDATE:
		na_count(NA_CNT_ERR_ORIGDST);
		return 0;
	default: /* not TCP, not meshed: the common case, not counted */
		return 1;
	}
}

/* 127.0.0.0/8 or 0.0.0.0 (which the kernel also delivers locally). */
static __always_inline int na_ip4_is_local(__be32 ip)
{
	return (ip & na_htonl(0xff000000)) == na_htonl(0x7f000000) || ip == 0;
}

int na_connect4(struct bpf_sock_addr *ctx)
{
	struct na_origdst orig = {};
	int code;

	orig.dst.family = NA_AF_INET;
	orig.dst.addr[0] = ctx->user_ip4;
	orig.port = (__be16)ctx->user_port;
	code = na_capture(ctx, &orig, na_ip4_is_local(orig.dst.addr[0]));
	if (code == NA_OK) {
		ctx->user_ip4 = na_htonl(0x7f000001);
		ctx->user_port = na_htons(NA_OUTBOUND_PORT);
	}
	return na_connect_verdict(code);
}

/* ::1, ::, and the v4-mapped forms of local IPv4 addresses. */
static __always_inline int na_ip6_is_local(const __be32 *ip)
{
	if (ip[0] != 0 || ip[1] != 0)
		return 0;
	if (ip[2] == na_htonl(0x0000ffff))
		return na_ip4_is_local(ip[3]);
	return ip[2] == 0 && (ip[3] == 0 || ip[3] == na_htonl(1));
}

int na_connect6(struct bpf_sock_addr *ctx)
{
	struct na_origdst orig = {};
	int code;

	orig.dst.family = NA_AF_INET6;
	orig.dst.addr[0] = ctx->user_ip6[0];
	orig.dst.addr[1] = ctx->user_ip6[1];
	orig.dst.addr[2] = ctx->user_ip6[2];
	orig.dst.addr[3] = ctx->user_ip6[3];
	orig.port = (__be16)ctx->user_port;
	code = na_capture(ctx, &orig, na_ip6_is_local(orig.dst.addr));
	if (code == NA_OK) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = na_htonl(1);
		ctx->user_port = na_htons(NA_OUTBOUND_PORT);
	}
	return na_connect_verdict(code);
}
