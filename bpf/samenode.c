/* samenode.c — join the two sockets of a same-node fast-path connection in the kernel.
 *
 * After the agent has admitted a connection between two meshed pods of this node
 * (nodeagent/agent/proxy/samenode.py), it holds the client's socket (accepted in the
 * client pod) and its delivery socket (connected to the app in the server pod). It
 * puts both in na_sn_peers, each under its own socket cookie with the *other* socket
 * as value; this verdict program, attached to that map, then sends every segment one
 * socket receives out of its peer (bpf_sk_redirect_hash, egress) without waking the
 * agent, and counts its bytes per receiving socket in na_sn_bytes, which the agent
 * reads when the pair ends (exact istio_tcp_* bytes). A FIN is not redirected: the
 * agent passes it on (nodeagent/capture/sockmap.py). Compiled on its own in the compile
 * child (programs.SAMENODE), so a kernel that refuses it costs the fast path only its
 * in-kernel join (splice then), never capture.
 */
#include "nodeagent.h"

/* Sockets of joined pairs: socket cookie -> its peer socket. Written by the agent (both
 * sockets of a pair, after admission); the kernel drops an entry when its socket closes. */
#define NA_SN_MAX 65536
/* BPF_TABLE_PINNED's table has no sk_redirect_hash member and BPF_SOCKHASH cannot be
 * pinned, so this is BPF_SOCKHASH's declaration with BPF_TABLE_PINNED's section. */
struct na_sn_peers_table_t {
	__u64 key;
	__u64 leaf;
	int (*update)(__u64 *, __u64 *);
	int (*delete)(__u64 *);
	int (*sock_hash_update)(void *, void *, u64);
	int (*msg_redirect_hash)(void *, void *, u64);
	int (*sk_redirect_hash)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockhash:" NA_PIN_DIR "/na_sn_peers")))
struct na_sn_peers_table_t na_sn_peers = {.max_entries = NA_SN_MAX};
BPF_ANNOTATE_KV_PAIR(na_sn_peers, __u64, __u64);

/* Bytes redirected, by receiving socket's cookie. Written by na_sn_verdict; read and
 * deleted by the agent when the pair ends. LRU: a crashed agent's entries age out. */
BPF_TABLE_PINNED("lru_hash", __u64, __u64, na_sn_bytes, NA_SN_MAX, NA_PIN_DIR "/na_sn_bytes");

int na_sn_verdict(struct __sk_buff *skb)
{
	__u64 cookie = na_get_socket_cookie(skb);
	__u64 zero = 0, *bytes;

	/* The FIN's empty skb: redirected, its send would fail once the agent has passed
	 * the FIN on (EPIPE on the peer). The agent passes FINs itself. */
	if (skb->len == 0)
		return SK_DROP;
	bytes = na_sn_bytes.lookup_or_try_init(&cookie, &zero);
	if (bytes)
		__sync_fetch_and_add(bytes, skb->len);
	return na_sn_peers.sk_redirect_hash(skb, &cookie, 0);
}
