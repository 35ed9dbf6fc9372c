/* sk_lookup.c — inbound steering inside a meshed pod netns (one link per netns).
 *
 * A TCP connection arriving on a non-loopback interface for an enrolled pod IP (in
 * na_enrolled_ips) is assigned to the agent's inbound listener for that IP (na_inbound),
 * whatever the port, except the agent's tunnel port (NA_TUNNEL_PORT: its HBONE listener
 * is reached by the normal lookup) and the pod's excluded inbound ports. The agent's other
 * ports are steered too (the agent resets what comes to them): skipping them let an app
 * listening there (on the pod IP's 15001, or the admin port, which the agent never binds
 * in the pod) take plaintext from anybody, unchecked.
 * The accepted socket's local address is the original destination.
 * Local connections are never steered (ztunnel's in-pod rules skip `-i lo` likewise):
 * those arriving on lo (ingress_ifindex 1) and those from the pod's own address. The
 * kernel reports the address's device (eth0), not lo, as the ingress of a connection
 * to a local IP, so the agent's delivery to the app binds its socket to lo
 * (SO_BINDTODEVICE, with the fwmark table 539 route: docs/design.md) to be seen as lo.
 * Enrolled IP without a listener (agent gone): SK_DROP, the client gets a reset — fail
 * closed rather than let plaintext reach the app.
 */
#include "nodeagent.h"

/* Bump a per-CPU counter (no atomics needed). Defined per program file: see nodeagent.h. */
static __always_inline void na_count(__u32 counter)
{
	__u64 *value = na_counters.lookup(&counter);

	if (value)
		*value += 1;
}

static __always_inline int na_is_tunnel_port(__u32 port)
{
	return port == NA_TUNNEL_PORT;
}

/* The destination address of the lookup as a map key; *local_origin set when the
 * source address is the same (the pod connecting to its own IP). */
static __always_inline void na_lookup_addr(struct bpf_sk_lookup *ctx, struct na_addr *ip,
					   int *local_origin)
{
	ip->family = (__u16)ctx->family;
	if (ctx->family == NA_AF_INET) {
		ip->addr[0] = ctx->local_ip4;
		*local_origin = ctx->remote_ip4 == ctx->local_ip4;
		return;
	}
	ip->addr[0] = ctx->local_ip6[0];
	ip->addr[1] = ctx->local_ip6[1];
	ip->addr[2] = ctx->local_ip6[2];
	ip->addr[3] = ctx->local_ip6[3];
	*local_origin = ctx->remote_ip6[0] == ip->addr[0] && ctx->remote_ip6[1] == ip->addr[1] &&
			ctx->remote_ip6[2] == ip->addr[2] && ctx->remote_ip6[3] == ip->addr[3];
}

/* Whether to steer this lookup (NA_OK) or why not; fills *ip. */
static __always_inline int na_classify(struct bpf_sk_lookup *ctx, struct na_addr *ip)
{
	struct na_pod_ip *pod;
	int local_origin;

	if (ctx->protocol != NA_IPPROTO_TCP)
		return NA_SKIP_NOT_TCP;
	if (ctx->ingress_ifindex == NA_LOOPBACK_IFINDEX)
		return NA_SKIP_LOOPBACK;
	if (na_is_tunnel_port(ctx->local_port))
		return NA_SKIP_AGENT_PORT;
	na_lookup_addr(ctx, ip, &local_origin);
	if (local_origin)
		return NA_SKIP_LOOPBACK;
	pod = na_enrolled_ips.lookup(ip);
	if (!pod)
		return NA_SKIP_NOT_MESHED;
	if (na_port_listed(pod->exclude_ports, (__u16)ctx->local_port))
		return NA_SKIP_EXCLUDED;
	return NA_OK;
}

/* Assign the agent's listener for `ip`: NA_OK, NA_ERR_NO_LISTENER or NA_ERR_SK_ASSIGN. */
static __always_inline int na_steer(struct bpf_sk_lookup *ctx, struct na_addr *ip)
{
	struct bpf_sock *sk;
	long err;

	sk = (struct bpf_sock *)na_inbound.lookup(ip);
	if (!sk)
		return NA_ERR_NO_LISTENER;
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? NA_ERR_SK_ASSIGN : NA_OK;
}

/* Count the outcome; the sk_lookup verdict. Errors drop: fail closed. */
static __always_inline int na_lookup_verdict(int code)
{
	switch (code) {
	case NA_OK:
		na_count(NA_CNT_STEERED);
		return SK_PASS;
	case NA_SKIP_EXCLUDED:
		na_count(NA_CNT_INBOUND_EXCLUDED);
		return SK_PASS;
	case NA_ERR_NO_LISTENER:
		na_count(NA_CNT_DROPPED_FAILCLOSED);
		return SK_DROP;
	case NA_ERR_SK_ASSIGN:
		na_count(NA_CNT_ERR_SK_ASSIGN);
		return SK_DROP;
	default: /* not for us: the normal socket lookup goes on */
		return SK_PASS;
	}
}

int na_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct na_addr ip = {};
	int code;

	code = na_classify(ctx, &ip);
	if (code == NA_OK)
		code = na_steer(ctx, &ip);
	return na_lookup_verdict(code);
}
