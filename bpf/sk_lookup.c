/* sk_lookup.c — inbound steering inside a meshed pod netns (one link per netns).
 *
 * A TCP connection arriving on a non-loopback interface for an enrolled pod IP (in
 * na_enrolled_ips) is assigned to the agent's inbound listener for that IP (na_inbound),
 * whatever the port, except the agent's own ports (NA_*_PORT: the tunnel listener on
 * NA_TUNNEL_PORT is reached by the normal lookup) and the pod's excluded inbound ports.
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

static __always_inline int na_is_agent_port(__u32 port)
{
	return port == NA_OUTBOUND_PORT || port == NA_INBOUND_PORT || port == NA_TUNNEL_PORT ||
	       port == NA_ADMIN_PORT;
}

/* Steer to the listener for `ip`; the sk_lookup verdict. */
static __always_inline int na_steer(struct bpf_sk_lookup *ctx, struct na_addr *ip)
{
	struct bpf_sock *sk;
	long err;

	sk = (struct bpf_sock *)na_inbound.lookup(ip);
	if (!sk) {
		na_count(NA_CNT_DROPPED_FAILCLOSED); /* NA_ERR_NO_LISTENER */
		return SK_DROP;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		na_count(NA_CNT_ERR_SK_ASSIGN); /* NA_ERR_SK_ASSIGN */
		return SK_DROP;
	}
	na_count(NA_CNT_STEERED);
	return SK_PASS;
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

int na_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct na_addr ip = {};
	struct na_pod_ip *pod;
	int local_origin;

	if (ctx->protocol != NA_IPPROTO_TCP || ctx->ingress_ifindex == NA_LOOPBACK_IFINDEX ||
	    na_is_agent_port(ctx->local_port))
		return SK_PASS;
	na_lookup_addr(ctx, &ip, &local_origin);
	if (local_origin)
		return SK_PASS;
	pod = na_enrolled_ips.lookup(&ip);
	if (!pod)
		return SK_PASS;
	if (na_port_listed(pod->exclude_ports, (__u16)ctx->local_port)) {
		na_count(NA_CNT_INBOUND_EXCLUDED);
		return SK_PASS;
	}
	return na_steer(ctx, &ip);
}
