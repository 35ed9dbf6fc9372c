/* sockops.c — publish the original destination of a captured connection.
 *
 * connect.c keys the original destination by socket cookie, which the agent cannot
 * see from the socket it accepts. When the client side becomes established
 * (BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, always delivered: no callback flags needed) its
 * local port is known, so the entry moves to na_origdst under (netns cookie, family,
 * client port): the accepted socket's peer port. On loopback the client handles the
 * SYN-ACK before the listener can accept, so the entry is there before the agent asks.
 */
#include "nodeagent.h"

/* Bump a per-CPU counter (no atomics needed). Defined per program file: see nodeagent.h. */
static __always_inline void na_count(__u32 counter)
{
	__u64 *value = na_counters.lookup(&counter);

	if (value)
		*value += 1;
}

int na_sockops(struct bpf_sock_ops *skops)
{
	struct na_origdst_key key = {};
	struct na_origdst orig, *found;
	__u64 sock_cookie;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	sock_cookie = na_get_socket_cookie(skops);
	found = na_origdst_ck.lookup(&sock_cookie);
	if (!found)
		return 1; /* not a captured connection */

	orig = *found; /* copy: the entry is deleted below */
	key.netns_cookie = orig.netns_cookie;
	key.family = (__u16)skops->family;
	key.client_port = (__u16)skops->local_port;
	if (na_origdst.update(&key, &orig))
		na_count(NA_CNT_ERR_ORIGDST);
	else
		na_count(NA_CNT_ORIGDST_RECORDED);
	na_origdst_ck.delete(&sock_cookie);
	return 1;
}
