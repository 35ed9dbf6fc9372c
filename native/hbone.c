/* hbone.c - the native HBONE engine (see hbone.h for the API, ownership and threads).
 *
 * One thread, one level-triggered epoll. A connection's socket carries TLS (OpenSSL on
 * the fd itself, non-blocking); decrypted input goes to nghttp2 (mem_recv), whose
 * callbacks move stream data to the streams' plain sockets; output is pulled from
 * nghttp2 (mem_send) into one buffer per connection that SSL_write drains, refilled only
 * when empty, so a peer that does not read stops nghttp2 from producing, which stops the
 * data providers, which fill the stream buffers, which stop reading the plain sockets.
 * Received DATA is given back to the peer's window (nghttp2_session_consume) only once
 * written to the plain socket. Interest sets follow the state (a socket with nothing to
 * wait for is taken out of epoll, so a hung-up socket cannot spin the loop).
 *
 * Objects that end during a round are unhooked at once (hash, epoll, nghttp2 user data)
 * and freed at the end of the round, so a later epoll event of the same batch finds them
 * marked dead. Calls from other threads are commands on a locked queue (woken by an
 * eventfd); events go the other way on a locked queue, signalled on the notify eventfd.
 */
#define _GNU_SOURCE
#include "hbone.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <malloc.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <linux/bpf.h>
#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define EVENTS 256
#define BUCKETS 4096u              /* id hash buckets (chained) */
#define READ_CHUNK 65536           /* TLS plaintext read at once */
#define READ_ARENA 262144u         /* a read round's plaintext, kept while received DATA in it waits to
                                    * be written straight from it (struct pend) */
#define READ_MIN 16384u            /* room the arena must have left for another read: a TLS record */
#define PEND_MAX 64                /* received DATA chunks waiting in the arena at most */
#define OUT_FILL 65536u            /* nghttp2 output gathered before SSL_write */
#define DOWN_BATCH 65536u          /* received DATA gathered before a write to the plain socket */
#define TLS_IN 65536               /* ciphertext read(2) at once (OpenSSL's read-ahead buffer) */
#define TLS_OUT 65536              /* TLS records gathered before a write(2): one TCP segment of up to
                                    * 64 KiB instead of one per 16 KiB record */
#define UP_HEAD 16u                /* room before a stream's bytes for the header of the DATA frame that
                                    * carries them (send_data_cb) */
#define FRAME_SMALL 16375u         /* DATA payload that never grows nghttp2's frame buffer (data_length_cb) */
#define EARLY_MAX 16384u           /* client: the first bytes sent with the CONNECT, before its answer */
#define UP_FIRST 16384u            /* a stream's first socket-side buffer; it grows (x4) each time a
                                    * read fills it, up to stream_buffer (up_grow) */
#define MAX_HEADERS 16384u         /* MAX_HEADER_LIST_SIZE, as tunnel/h2conn.py */
#define MAX_URI 512
#define STREAM_IDLE_MS 2000u       /* a stream that moved nothing for a tick (at most half this) gives
                                      its empty buffers back */
#define ROUTE_SOCKETS 8u           /* sockets one route holds at most (nh_conn_route) */
#define CONN_ROUTES 16u            /* routes one connection holds at most */
#define LISTENER_ROUTES 256u       /* out-routes one listener holds at most (nh_out_route) */
#define ACCEPT_BATCH 64            /* connections accepted on one listener per round */
#define ACCEPT_PAUSE_MS 100u       /* a listener stops accepting this long when accept(2) lacks
                                      descriptors or memory (as agent/inpod/sockets.py ACCEPT_PAUSE) */
#define TRIM_AFTER (4u << 20)      /* bytes of buffers released before the memory goes back to the system */

enum kind { K_WAKE = 1, K_CONN, K_STREAM, K_LINGER, K_LISTENER };
enum op { OP_CLIENT = 1, OP_SERVER, OP_VERDICT, OP_CLOSE, OP_OPEN, OP_ACCEPT, OP_REFUSE, OP_RESET, OP_ATTACH,
          OP_ROUTE, OP_LISTEN, OP_LISTEN_CLOSE, OP_LISTEN_ROOM, OP_OUT_ROUTE };
enum state { S_HANDSHAKE = 1, S_VERDICT, S_H2 };

struct obj {                       /* first member of what epoll and the hash point at */
    enum kind kind;
    uint64_t id;
    struct obj *hnext;
    bool dead;
    struct obj *gnext;             /* graveyard */
};

struct buf {
    char *p;
    size_t off, len, cap;
    size_t head;                   /* kept free before the bytes (a stream's `up`: UP_HEAD), else 0;
                                      an emptied buffer starts over there */
};

/* Server: CONNECTs to one :authority the engine delivers itself (see Routes in hbone.h). */
struct route {
    struct route *next;
    uint64_t gen;                  /* the generation Python decided under */
    struct sockaddr_storage dst;
    socklen_t dstlen;
    uint32_t nfds;
    int fds[ROUTE_SOCKETS];        /* bound in the pod's netns, not connected */
    char authority[];
};

/* Source: a listener's route for one original destination (see Listeners in hbone.h). */
struct out_ep {
    uint64_t conn;                 /* client connection id, 0: none (the connection goes to Python) */
    char *authority;
};

struct out_route {
    struct out_route *next;
    uint64_t gen, tag;
    uint32_t port, n, rr;
    char ip[48];
    struct out_ep ep[];
};

struct listener {
    struct obj o;
    struct nh_engine *e;
    int fd, map_fd;
    uint64_t cookie;
    uint16_t family;
    bool registered, closed;
    uint32_t mask;
    uint64_t paused_until;         /* ms; 0: accepting */
    uint64_t room, seen, opened;   /* room counted from Python's `seen`-th routed open; opened: all of them */
    struct out_route *routes;
    uint32_t nroutes;
    struct listener *lnext, *lprev; /* the engine's listeners */
};

/* What a stream opened on an out-route reports in its events. */
struct routed {
    uint64_t listener, tag, opened_ms;
    uint32_t endpoint, client_port, dst_port;
    char dst[48];
};

struct conn;
struct stream {
    struct obj o;
    struct conn *conn;
    struct stream *prev, *next;    /* the connection's streams */
    int fd;                        /* the plain socket, -1 until given */
    int32_t sid;                   /* HTTP/2 stream id, 0 until submitted */
    uint32_t mask;
    bool registered, relaying, answered;
    bool up_eof, up_done;          /* socket FIN read; END_STREAM produced (or no more sending) */
    bool down_eof, down_done;      /* END_STREAM (or clean close) received; FIN passed on */
    bool h2_closed, deferred, ended, is_connect;
    bool got_200;                  /* client: answered 200 (relays once it has its socket) */
    bool active;                   /* bytes came since the last tick (its buffers are kept) */
    bool peeked;                   /* client: the early peek is done (or not wanted) */
    bool sent;                     /* client: its HEADERS went out (on_frame_send); until then the
                                      server cannot have seen it, whatever its id */
    bool announced;                /* server: Python heard of it (NH_EV_REQUEST, NH_EV_DELIVERED); one
                                      that ends before is freed without an event */
    uint32_t early;                /* client: bytes peeked into `up` before the answer, still in the socket */
    uint64_t early_sent;           /* client: ... of which handed to DATA before relaying */
    uint32_t reset_code;           /* the peer's reset before Python answered */
    uint64_t down_held;            /* bytes of `down` counted in the receive budget */
    uint64_t up_held;              /* bytes of `up` counted in the send budget */
    struct stream *wprev, *wnext;  /* on the engine's list of streams the send budget stopped reading */
    bool budget_waits;             /* ... on it */
    size_t pend_bytes;             /* received DATA of this stream still in the read arena (struct pend) */
    uint32_t status;               /* client: the response's :status */
    struct buf up, down;           /* socket -> peer, peer -> socket */
    uint64_t to_peer, from_peer;
    char *authority, *hdrs;        /* client: what to send; server: what came */
    size_t hdrs_len;
    struct routed *routed;         /* client: opened by the engine on an out-route, else NULL */
};

struct conn {
    struct obj o;
    struct nh_engine *e;
    int fd;
    SSL *ssl;
    nghttp2_session *h2;
    enum state state;
    bool server, registered, pending_hs, closing, draining, in_hs_list, dirty;
    bool peer_eof;                 /* the peer's bytes ended (no lingering close then) */
    uint32_t mask;
    uint32_t closing_how, closing_code, goaway_code;
    uint32_t sent_goaway_code;     /* nghttp2 ended the connection for the peer's error (GOAWAY sent) */
    char *expected;
    char *peer_pem;                /* client: the server's chain, reported with its first SETTINGS */
    size_t peer_pem_len;
    uint64_t deadline;
    struct conn *hs_prev, *hs_next, *dnext;
    struct stream *streams;
    uint32_t nstreams;
    struct evnode *refused[3];     /* engine thread: this read's NH_EV_REFUSED by NH_REFUSED_*, ... */
    uint64_t refused_stage;        /* ... valid while e->stage_seq is this */
    struct buf out;
    uint64_t *resets;              /* ring of the client's reset times (ms), server only */
    uint32_t reset_head, reset_count;
    uint64_t last_heard, ping_sent, idle_since; /* ms; 0: no PING out / streams open */
    uint32_t preface_left, frame_left; /* received HTTP/2: preface bytes to come, payload of this frame */
    uint8_t frame_head[9], frame_head_len; /* ... and the frame header being read */
    struct conn *live_prev, *live_next; /* connections in HTTP/2 (keepalive, idle) */
    bool live;
    bool gathering;                /* TLS writes go through the buffer BIO (tls_gather_writes) */
    struct route *routes;          /* server: nh_conn_route's */
    uint32_t nroutes;
    int write_err, write_errno;    /* an SSL_write failed (tls_write): conn_flush reports it */
    bool read_drained;             /* the socket's last read took less than asked (sock_read_seen) */
};

struct cmd {
    enum op op;
    uint64_t id;
    int fd;
    uint32_t arg;
    void *ptr;
    struct cmd *next;
};

struct evnode {
    struct nh_event ev;
    struct evnode *next;
};

struct nh_tls {
    SSL_CTX *ctx;
};

/* Received DATA of a relaying stream, still in the read round's plaintext (conn_read's
 * arena): written to the stream's socket straight from there, gathered up to DOWN_BATCH,
 * instead of copied into the stream's `down` first; only what the socket does not take is
 * copied (pend_out). Entries live only within one conn_read: every other callback, the
 * end of a stream and the end of the round write or copy them first (pend_flush). */
struct pend {
    struct stream *s;              /* NULL: taken already */
    const uint8_t *p;
    size_t n;
};

/* One budget's count: what all streams hold, and how many hold any. */
struct tally {
    uint64_t held, peak;
    uint32_t holding;
};

struct nh_engine {
    struct nh_config cfg;
    int ep, wake, notify;
    pthread_t thread;
    bool started;
    pthread_mutex_t lock;          /* cmds, events, stopped */
    struct cmd *cmd_head, *cmd_tail;
    struct evnode *ev_head, *ev_tail;
    bool stopped, stopping;
    uint64_t next_id;              /* atomic */
    uint32_t conns_reserved;       /* under lock: conns made, not yet freed */
    uint32_t pending_hs;           /* under lock */
    struct obj wake_obj;
    struct obj *buckets[BUCKETS];  /* engine thread */
    struct obj *graveyard;
    struct conn *hs_head, *hs_tail, *dirty;
    struct conn *live_head;        /* connections in HTTP/2, for tick() */
    struct lingerer *lingering;    /* closed connections' sockets, oldest first (linger_start) */
    struct lingerer *lingering_tail;
    uint32_t nlingering;
    struct evnode *stage_head, *stage_tail; /* engine thread: events of one read, published together */
    bool staging;                  /* engine thread */
    uint64_t stage_seq;            /* engine thread: +1 at each publish */
    uint64_t next_tick;            /* ms; 0: no periodic work configured */
    uint32_t tick_ms;
    uint64_t held;
    uint64_t released_untrimmed;   /* engine thread: bytes of stream buffers released since the last malloc_trim */
    uint64_t generation;           /* atomic: nh_engine_generation's; routes of another are not used */
    uint64_t out_generation;       /* atomic: nh_out_generation's; out-routes of another are not used */
    struct listener *listeners;    /* engine thread */
    uint32_t npaused;              /* listeners paused (ACCEPT_PAUSE_MS) */
    struct tally received;         /* received DATA the streams hold (the receive budget's) */
    struct tally sent;             /* bytes read from the streams' sockets, not yet framed (the send budget's) */
    struct stream *budget_waiting; /* streams the send budget stopped reading (send_room 0) */
    struct pend pend[PEND_MAX];    /* engine thread: received DATA waiting in the read arena */
    int npend;
    struct nh_stats st;            /* counters: atomics */
};

/* Release/acquire (plain instructions on x86): a reader (nh_engine_stats, loading the
 * fields in struct order) that sees one update sees every update the engine made before
 * it, so a count moved before another (streams_open before the socket ends,
 * buffers_released before stream_buffers falls) is never seen behind it. */
#define ST_ADD(e, f, n) __atomic_fetch_add(&(e)->st.f, (n), __ATOMIC_RELEASE)
#define ST_SET(e, f, v) __atomic_store_n(&(e)->st.f, (v), __ATOMIC_RELEASE)
#define MIN(a, b) ((a) < (b) ? (a) : (b))

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void reset_close(int fd)
{
    struct linger lg = {1, 0};
    if (fd < 0)
        return;
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

/* --- buffers, held bytes ------------------------------------------------------------ */

/* Used for buffers without a head (the connection's output, a stream's `down`). */
static int buf_append(struct buf *b, const void *data, size_t n)
{
    if (b->off && b->off == b->len)
        b->off = b->len = 0;
    if (b->len + n > b->cap) {
        if (b->off) {
            memmove(b->p, b->p + b->off, b->len - b->off);
            b->len -= b->off;
            b->off = 0;
        }
        if (b->len + n > b->cap) {
            size_t cap = b->cap ? b->cap : 16384;
            while (cap < b->len + n)
                cap *= 2;
            char *p = realloc(b->p, cap);
            if (!p)
                return -ENOMEM;
            b->p = p;
            b->cap = cap;
        }
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

static size_t buf_avail(const struct buf *b) { return b->len - b->off; }

/* `n` bytes taken from the front; an emptied buffer starts over at its head */
static void buf_consume(struct buf *b, size_t n)
{
    b->off += n;
    if (b->off == b->len)
        b->off = b->len = b->head;
}

static void buf_free(struct buf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* One of a stream's buffers freed, and no longer counted in stream_buffers. */
static void stream_buf_free(struct nh_engine *e, struct buf *b)
{
    ST_ADD(e, stream_buffers, -(int64_t)b->cap);
    buf_free(b);
}

static void held_add(struct nh_engine *e, int64_t delta)
{
    e->held += delta;
    ST_SET(e, bytes_held, e->held);
    if (e->held > e->st.bytes_held_peak)
        ST_SET(e, bytes_held_peak, e->held);
}

static void stream_peak(struct stream *s)
{
    uint64_t mine = buf_avail(&s->up) + buf_avail(&s->down) + s->pend_bytes;
    if (mine > s->conn->e->st.stream_held_peak)
        ST_SET(s->conn->e, stream_held_peak, mine);
}

/* --- the receive budget (hbone.h, Back-pressure) ------------------------------------ */

/* `delta` bytes more (or fewer) held by a stream holding `*mine`. */
static void tally_add(struct tally *t, uint64_t *mine, int64_t delta)
{
    bool was = *mine != 0;
    *mine += delta;
    t->held += delta;
    if (was != (*mine != 0))
        t->holding += was ? -1 : 1;
    if (t->held > t->peak)
        t->peak = t->held;
}

/* `delta` bytes of received DATA more (or fewer) held by `s`. */
static void received_add(struct stream *s, int64_t delta)
{
    struct nh_engine *e = s->conn->e;
    if (delta == 0)
        return;
    held_add(e, delta);
    tally_add(&e->received, &s->down_held, delta);
    ST_SET(e, received_held, e->received.held);
    ST_SET(e, received_held_peak, e->received.peak);
}

/* Whether `len` more bytes for `s` are over the budget: the streams would hold half of it,
 * and `s` its share of that half (the half over the streams holding any); or they would
 * hold more than all of it (shares taken when fewer streams held were larger, so shares
 * alone let the sum grow with the log of the number of streams). */
static bool over_budget(const struct stream *s, size_t len)
{
    const struct nh_engine *e = s->conn->e;
    uint64_t half = e->cfg.receive_budget / 2;
    uint64_t holding = e->received.holding + (s->down_held == 0);
    return half && e->received.held + len >= half
           && ((s->down_held + len) * holding >= half || e->received.held + len > e->cfg.receive_budget);
}

/* The send budget: what streams read from their sockets and have not framed yet waits for
 * the peer's window, so a peer that never opens it (a slow or stopped reader) keeps up to
 * stream_buffer per stream. Once the streams hold half of send_budget, a stream may read
 * only up to its share of that half (the half over the streams holding any); a stream at
 * its share stops reading its socket (the app's writes wait in the kernel) until its
 * peer takes some, or until all together hold under half again (stream_update then
 * re-arms every waiting stream: budget_waiting). Reading sockets is safe to stop, unlike
 * reading connections: nothing the engine needs comes in on them. */
static size_t send_room(const struct stream *s)
{
    const struct nh_engine *e = s->conn->e;
    uint64_t half = e->cfg.send_budget / 2;
    if (!half || e->sent.held < half)
        return SIZE_MAX;
    uint64_t share = half / (e->sent.holding + (s->up_held == 0));
    uint64_t left = e->sent.held < e->cfg.send_budget ? e->cfg.send_budget - e->sent.held : 0;
    return s->up_held >= share ? 0 : (size_t)MIN(share - s->up_held, left);  /* never past the budget */
}

static void budget_wait(struct stream *s, bool wait)
{
    struct nh_engine *e = s->conn->e;
    if (wait == s->budget_waits)
        return;
    s->budget_waits = wait;
    if (wait) {
        s->wprev = NULL;
        s->wnext = e->budget_waiting;
        if (e->budget_waiting)
            e->budget_waiting->wprev = s;
        e->budget_waiting = s;
        ST_ADD(e, streams_send_waiting, 1);
        return;
    }
    if (s->wprev)
        s->wprev->wnext = s->wnext;
    else
        e->budget_waiting = s->wnext;
    if (s->wnext)
        s->wnext->wprev = s->wprev;
    s->wprev = s->wnext = NULL;
    ST_ADD(e, streams_send_waiting, -1);
}

static void stream_update(struct stream *s);

/* `delta` bytes more (or fewer) in `s`'s `up`. Fewer, once all hold under half the
 * budget: the waiting streams read again. */
static void sent_add(struct stream *s, int64_t delta)
{
    struct nh_engine *e = s->conn->e;
    if (delta == 0)
        return;
    tally_add(&e->sent, &s->up_held, delta);
    ST_SET(e, send_held, e->sent.held);
    ST_SET(e, send_held_peak, e->sent.peak);
    if (delta < 0 && e->budget_waiting && e->sent.held < e->cfg.send_budget / 2)
        while (e->budget_waiting) {
            struct stream *w = e->budget_waiting;
            budget_wait(w, false);
            stream_update(w);
        }
}

/* --- ids, events, epoll ------------------------------------------------------------- */

static void hash_put(struct nh_engine *e, struct obj *o)
{
    struct obj **b = &e->buckets[o->id & (BUCKETS - 1)];
    o->hnext = *b;
    *b = o;
}

static struct obj *hash_get(struct nh_engine *e, uint64_t id, enum kind kind)
{
    for (struct obj *o = e->buckets[id & (BUCKETS - 1)]; o; o = o->hnext)
        if (o->id == id)
            return o->kind == kind && !o->dead ? o : NULL;
    return NULL;
}

static void hash_del(struct nh_engine *e, struct obj *o)
{
    for (struct obj **p = &e->buckets[o->id & (BUCKETS - 1)]; *p; p = &(*p)->hnext)
        if (*p == o) {
            *p = o->hnext;
            return;
        }
}

static void bury(struct nh_engine *e, struct obj *o)
{
    hash_del(e, o);
    o->dead = true;
    o->gnext = e->graveyard;
    e->graveyard = o;
}

/* --- lingering close ---------------------------------------------------------------- */

/* A connection we end cleanly, our GOAWAY and close_notify out, may still have bytes of
 * the peer on their way: a CONNECT sent before the peer saw the GOAWAY. A socket closed
 * with bytes unread, or receiving bytes once closed, answers with an RST, and the RST
 * discards what is still queued to send (with BBR's pacing, perhaps the GOAWAY itself):
 * the peer then sees its stream lost instead of refused, and does not retry it. So, as
 * nginx and Envoy close, the socket sends its FIN (shutdown SHUT_WR) and reads and
 * discards until the peer's EOF, for at most cfg.linger_ms, and then closes. */
struct lingerer {
    struct obj o;
    int fd;
    bool registered;
    uint32_t mask;
    uint64_t deadline;
    struct lingerer *prev, *next;  /* e->lingering, by deadline */
};

static void set_mask(struct nh_engine *e, int fd, struct obj *o, bool *registered, uint32_t *cur, uint32_t mask);

static void linger_end(struct nh_engine *e, struct lingerer *l)
{
    set_mask(e, l->fd, &l->o, &l->registered, &l->mask, 0);
    close(l->fd);
    if (l->prev)
        l->prev->next = l->next;
    else
        e->lingering = l->next;
    if (l->next)
        l->next->prev = l->prev;
    else
        e->lingering_tail = l->prev;
    e->nlingering--;
    ST_ADD(e, lingering, -1);
    bury(e, &l->o);
}

/* Closes `fd` once the peer's EOF is read, or linger_ms from now (see above); at once when
 * as many sockets linger as the engine takes connections, or lingering is off. */
static void linger_start(struct nh_engine *e, int fd)
{
    struct lingerer *l = NULL;
    if (!e->cfg.linger_ms || e->nlingering >= e->cfg.max_conns || !(l = calloc(1, sizeof *l))) {
        close(fd);
        return;
    }
    l->o.kind = K_LINGER;
    l->fd = fd;
    l->deadline = now_ms() + e->cfg.linger_ms;
    l->prev = e->lingering_tail;
    if (e->lingering_tail)
        e->lingering_tail->next = l;
    else
        e->lingering = l;
    e->lingering_tail = l;
    e->nlingering++;
    ST_ADD(e, lingering, 1);  /* counted before the FIN goes out: a peer that saw it sees the count */
    ST_ADD(e, lingered, 1);
    if (shutdown(fd, SHUT_WR) == 0)
        set_mask(e, fd, &l->o, &l->registered, &l->mask, EPOLLIN | EPOLLRDHUP);
    if (!l->registered)
        linger_end(e, l);
}

static void linger_read(struct nh_engine *e, struct lingerer *l)
{
    static __thread char sink[READ_CHUNK];
    for (int i = 0; i < 16; i++) {  /* a peer that keeps sending gets its turn again with the others */
        ssize_t n = recv(l->fd, sink, sizeof sink, MSG_TRUNC);  /* TCP discards without copying */
        if (n > 0)
            continue;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        linger_end(e, l);  /* EOF, or the peer's RST */
        return;
    }
}

static void expire_lingering(struct nh_engine *e, uint64_t now)
{
    while (e->lingering && e->lingering->deadline <= now)
        linger_end(e, e->lingering);
}

/* Queue an event for Python; while staging, the node is returned (it is the engine's
 * until the stage is published), else NULL. */
static struct evnode *emit(struct nh_engine *e, const struct nh_event *ev, const char *data, size_t len)
{
    struct evnode *n = calloc(1, sizeof *n);
    if (!n) {
        ST_SET(e, fatal, ENOMEM);
        return NULL;
    }
    n->ev = *ev;
    if (data && len) {
        n->ev.data = malloc(len + 1);
        if (n->ev.data) {
            memcpy(n->ev.data, data, len);
            n->ev.data[len] = 0;
            n->ev.data_len = len;
        }
    }
    if (e->staging) {
        if (e->stage_tail)
            e->stage_tail->next = n;
        else
            e->stage_head = n;
        e->stage_tail = n;
        return n;
    }
    pthread_mutex_lock(&e->lock);
    if (e->ev_tail)
        e->ev_tail->next = n;
    else
        e->ev_head = n;
    e->ev_tail = n;
    ST_ADD(e, events_queued, 1);
    pthread_mutex_unlock(&e->lock);
    uint64_t one = 1;
    if (write(e->notify, &one, sizeof one) < 0) {
        /* EAGAIN: the counter is already huge, the reader is woken anyway */
    }
    return NULL;
}

/* The events of one read (a REQUEST and the client's reset of it right behind, say) go to
 * Python together: it drains the queue at once, so it never acts on a request whose reset
 * it has not seen yet, as the Python server, which handles a read's frames in one go. */
static void stage_begin(struct nh_engine *e)
{
    e->staging = true;
}

static void stage_publish(struct nh_engine *e)
{
    e->staging = false;
    e->stage_seq++;
    if (!e->stage_head)
        return;
    size_t count = 0;
    for (struct evnode *n = e->stage_head; n; n = n->next)
        count++;
    pthread_mutex_lock(&e->lock);
    if (e->ev_tail)
        e->ev_tail->next = e->stage_head;
    else
        e->ev_head = e->stage_head;
    e->ev_tail = e->stage_tail;
    ST_ADD(e, events_queued, (uint64_t)count);
    pthread_mutex_unlock(&e->lock);
    e->stage_head = e->stage_tail = NULL;
    uint64_t one = 1;
    if (write(e->notify, &one, sizeof one) < 0) {
        /* EAGAIN: the counter is already huge, the reader is woken anyway */
    }
}

static void set_mask(struct nh_engine *e, int fd, struct obj *o, bool *registered, uint32_t *cur, uint32_t mask)
{
    struct epoll_event ev = {.events = mask, .data.ptr = o};
    if (mask == 0) {
        if (*registered)
            epoll_ctl(e->ep, EPOLL_CTL_DEL, fd, NULL);
        *registered = false;
    } else if (!*registered) {
        if (epoll_ctl(e->ep, EPOLL_CTL_ADD, fd, &ev) == 0)
            *registered = true;
    } else if (mask != *cur) {
        epoll_ctl(e->ep, EPOLL_CTL_MOD, fd, &ev);
    }
    *cur = mask;
}

static void mark_dirty(struct conn *c)
{
    if (!c->dirty && !c->o.dead) {
        c->dirty = true;
        c->dnext = c->e->dirty;
        c->e->dirty = c;
    }
}

/* --- streams ------------------------------------------------------------------------ */

static void stream_update(struct stream *s);
static void pend_copy(struct stream *s);

static void routed_fields(struct nh_event *ev, const struct routed *r)
{
    ev->listener = r->listener;
    ev->tag = r->tag;
    ev->endpoint = r->endpoint;
    ev->client_port = r->client_port;
    ev->dst_port = r->dst_port;
    memcpy(ev->dst, r->dst, sizeof ev->dst);
}

static void stream_end(struct stream *s, uint32_t how, int32_t error, uint32_t code, uint32_t status,
                       const char *reason)
{
    struct conn *c = s->conn;
    struct nh_engine *e = c->e;
    if (s->ended)
        return;
    pend_copy(s);                  /* its DATA still in the read arena: in `down` from here, as before */
    s->ended = true;
    /* Counted before the stream's socket ends (its FIN or RST can reach the app, which
     * may then read the stats), as conns_open is. */
    ST_ADD(e, streams_open, -1);
    if (s->sid > 0 && !s->h2_closed && c->h2) {
        nghttp2_session_set_stream_user_data(c->h2, s->sid, NULL);
        if (how != NH_END_CLOSED && how != NH_END_RESET)
            nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, s->sid,
                                      how == NH_END_REFUSED && status == 0 ? NGHTTP2_REFUSED_STREAM
                                                                           : NGHTTP2_CANCEL);
        mark_dirty(c);
    }
    int handed = -1;
    if (s->fd >= 0) {
        set_mask(e, s->fd, &s->o, &s->registered, &s->mask, 0);
        if (s->routed && !s->got_200)
            handed = s->fd;        /* before its 200: the caller's again, as the CONNECT left it */
        else if (how == NH_END_CLOSED)
            close(s->fd);
        else
            reset_close(s->fd);
        s->fd = -1;
    }
    held_add(e, -(int64_t)buf_avail(&s->up));
    budget_wait(s, false);
    sent_add(s, -(int64_t)s->up_held);
    received_add(s, -(int64_t)buf_avail(&s->down));
    /* what the socket took stays consumed; what it did not goes back to the connection window */
    if (c->h2 && buf_avail(&s->down))
        nghttp2_session_consume_connection(c->h2, buf_avail(&s->down));
    stream_buf_free(e, &s->up);
    stream_buf_free(e, &s->down);
    struct nh_event ev = {.conn = c->o.id, .stream = s->o.id, .type = NH_EV_STREAM_END, .how = how,
                          .error = error, .code = code, .status = status,
                          .h2_stream = c->server || s->sent ? (uint32_t)s->sid : 0,  /* 0: never sent */
                          .to_peer = s->to_peer, .from_peer = s->from_peer};
    if (s->routed) {
        routed_fields(&ev, s->routed);
        if (handed >= 0) {
            ev.fd = handed;
            ev.handed = 1;
            ST_ADD(e, handed_back, 1);
        }
    }
    if (!c->server || s->announced)  /* a request still coming in when it ended: Python never knew it */
        emit(e, &ev, reason, reason ? strlen(reason) : 0);
    if (s->prev)
        s->prev->next = s->next;
    else if (c->streams == s)
        c->streams = s->next;
    if (s->next)
        s->next->prev = s->prev;
    s->prev = s->next = NULL;
    if (--c->nstreams == 0)
        c->idle_since = now_ms();
    bury(e, &s->o);
}

static void stream_maybe_finish(struct stream *s)
{
    if (s->ended || !s->relaying || s->fd < 0)
        return;
    if (s->down_eof && !s->down_done && buf_avail(&s->down) == 0) {
        shutdown(s->fd, SHUT_WR);
        s->down_done = true;
    }
    if (s->h2_closed && s->down_done && (s->up_done || s->up_eof))
        stream_end(s, NH_END_CLOSED, 0, 0, 0, NULL);
}

static void stream_consume(struct stream *s, size_t n)
{
    if (n && s->conn->h2) {
        nghttp2_session_consume(s->conn->h2, s->sid, n);
        mark_dirty(s->conn);
    }
}

/* Write what waits for the plain socket; false when the stream ended. */
static bool stream_write(struct stream *s)
{
    while (buf_avail(&s->down)) {
        ssize_t n = send(s->fd, s->down.p + s->down.off, buf_avail(&s->down), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                break;
            stream_end(s, NH_END_SOCKET, errno, NGHTTP2_CANCEL, 0, "write to the socket failed");
            return false;
        }
        buf_consume(&s->down, (size_t)n);
        s->from_peer += n;
        ST_ADD(s->conn->e, bytes_from_peer, n);
        received_add(s, -n);
        stream_consume(s, n);
    }
    return true;
}

/* --- received DATA written from the read arena (struct pend) ----------------------------- */

/* `s`'s chunks in the arena, in order, into `iov` (their slots emptied); how many. */
static int pend_take(struct stream *s, struct iovec *iov)
{
    struct nh_engine *e = s->conn->e;
    int n = 0;
    for (int i = 0; i < e->npend; i++) {
        if (e->pend[i].s == s) {
            iov[n].iov_base = (void *)e->pend[i].p;
            iov[n++].iov_len = e->pend[i].n;
            e->pend[i].s = NULL;
        }
    }
    s->pend_bytes = 0;
    return n;
}

/* What the socket did not take (from `skip` bytes into `iov`) copied into `down`. false when
 * memory ran out: what could not be kept is uncounted and its window given back, as for a
 * stream that ends with bytes in `down`; the caller ends the stream. */
static bool pend_keep(struct stream *s, const struct iovec *iov, int n, size_t skip)
{
    size_t cap = s->down.cap, lost = 0;
    for (int i = 0; i < n; i++) {
        if (skip >= iov[i].iov_len) {
            skip -= iov[i].iov_len;
            continue;
        }
        if (lost || buf_append(&s->down, (const char *)iov[i].iov_base + skip, iov[i].iov_len - skip) < 0)
            lost += iov[i].iov_len - skip;
        skip = 0;
    }
    ST_ADD(s->conn->e, stream_buffers, (int64_t)(s->down.cap - cap));
    ST_ADD(s->conn->e, received_copied, buf_avail(&s->down));  /* `down` was empty before: all of it */
    if (!lost)
        return true;
    received_add(s, -(int64_t)lost);
    if (s->conn->h2)
        nghttp2_session_consume_connection(s->conn->h2, lost);
    return false;
}

/* A stream that ends with chunks in the arena keeps them in `down` (stream_end then does
 * what it always did with what `down` holds). */
static void pend_copy(struct stream *s)
{
    struct iovec iov[PEND_MAX];
    if (s->pend_bytes)
        pend_keep(s, iov, pend_take(s, iov), 0);
}

/* `s`'s chunks go to its socket in one sendmsg, straight from the arena (nothing waits in
 * `down` before them: on_data_chunk adds a chunk here only then); what the socket does not
 * take is copied into `down`, which streams_write and EPOLLOUT drain as before. */
static void pend_out(struct stream *s)
{
    struct iovec iov[PEND_MAX];
    int n = pend_take(s, iov);
    size_t done = 0;
    if (n == 0)
        return;
    ssize_t w;
    do
        w = sendmsg(s->fd, &(struct msghdr){.msg_iov = iov, .msg_iovlen = (size_t)n}, MSG_NOSIGNAL);
    while (w < 0 && errno == EINTR);
    if (w < 0 && errno != EAGAIN) {
        int err = errno;
        pend_keep(s, iov, n, 0);
        stream_end(s, NH_END_SOCKET, err, NGHTTP2_CANCEL, 0, "write to the socket failed");
        return;
    }
    if (w > 0) {
        done = (size_t)w;
        s->from_peer += done;
        ST_ADD(s->conn->e, bytes_from_peer, done);
        ST_ADD(s->conn->e, received_direct, done);
        received_add(s, -(int64_t)done);
        stream_consume(s, done);
    }
    if (!pend_keep(s, iov, n, done))
        stream_end(s, NH_END_SOCKET, ENOMEM, NGHTTP2_INTERNAL_ERROR, 0, "out of memory");
}

/* Every chunk still in the arena written (or copied): before any callback but DATA's runs,
 * and before the arena is read into again or the read round ends. */
static void pend_flush(struct nh_engine *e)
{
    for (int i = 0; i < e->npend; i++)
        if (e->pend[i].s)
            pend_out(e->pend[i].s);
    e->npend = 0;
}

/* The stream's buffer of bytes read from its socket, allocated on first use: small (a
 * request, an answer, an early peek need no more), grown by up_grow for a stream that
 * moves more. */
static bool up_ready(struct stream *s)
{
    if (s->up.cap == 0) {
        size_t cap = UP_HEAD + MIN(UP_FIRST, s->conn->e->cfg.stream_buffer);
        s->up.p = malloc(cap);
        if (!s->up.p)
            return false;
        s->up.cap = cap;
        ST_ADD(s->conn->e, stream_buffers, s->up.cap);
        s->up.off = s->up.len = s->up.head = UP_HEAD;
    }
    return true;
}

/* A read filled `up`: the socket likely holds more, so the next read gets more room (x4, up
 * to stream_buffer). Out of memory: it stays as it is. */
static void up_grow(struct stream *s)
{
    struct buf *up = &s->up;
    size_t max = UP_HEAD + s->conn->e->cfg.stream_buffer;
    if (up->cap >= max)
        return;
    size_t cap = MIN(up->cap * 4, max);
    char *p = realloc(up->p, cap);
    if (!p)
        return;
    ST_ADD(s->conn->e, stream_buffers, (int64_t)(cap - up->cap));
    up->p = p;
    up->cap = cap;
}

/* `n` bytes more in `up`: counted, and HTTP/2 may send them. */
static void up_added(struct stream *s, size_t n)
{
    held_add(s->conn->e, n);
    sent_add(s, (int64_t)n);
    stream_peak(s);
    if (s->deferred && s->conn->h2) {
        s->deferred = false;
        nghttp2_session_resume_data(s->conn->h2, s->sid);
    }
    mark_dirty(s->conn);
}

static void stream_read(struct stream *s)
{
    if (!up_ready(s)) {
        stream_end(s, NH_END_SOCKET, ENOMEM, NGHTTP2_INTERNAL_ERROR, 0, "out of memory");
        return;
    }
    struct buf *up = &s->up;
    if (up->off > up->head && up->cap - up->len < up->cap / 4) {  /* compact only when the end is
                                                                    * near: not a large move per read */
        memmove(up->p + up->head, up->p + up->off, up->len - up->off);
        up->len -= up->off - up->head;
        up->off = up->head;
    }
    if (up->len == up->cap) {     /* full, and nothing sent to compact (the early peek fills the first) */
        up_grow(s);
        if (up->len == up->cap && up->cap < UP_HEAD + s->conn->e->cfg.stream_buffer) {
            /* not grown: left as it is, its socket would be readable with nowhere to read to */
            stream_end(s, NH_END_SOCKET, ENOMEM, NGHTTP2_INTERNAL_ERROR, 0, "out of memory");
            return;
        }
    }
    size_t room = MIN(s->up.cap - s->up.len, send_room(s));
    if (room == 0)
        return;
    ssize_t n = recv(s->fd, s->up.p + s->up.len, room, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return;
        stream_end(s, NH_END_SOCKET, errno, NGHTTP2_CANCEL, 0, "read from the socket failed");
        return;
    }
    if (n == 0)
        s->up_eof = true;
    s->active = true;
    s->up.len += n;
    if (s->up.len == s->up.cap)
        up_grow(s);                /* filled: the next read may take more */
    up_added(s, (size_t)n);
}

/* Client, before the answer: the first bytes the client sent go out with the CONNECT
 * (DATA right behind its HEADERS), so the server has them the moment it accepts instead of
 * a round trip after its 200. They are peeked, not read: the socket keeps them until the
 * 200 (stream_start discards them then), so a refused or unprocessed stream leaves the
 * caller's socket as it was. One peek, up to EARLY_MAX; nothing more before the answer.
 * The socket's interest follows (stream_update: EPOLLIN until the peek is done). */
static void stream_peek(struct stream *s)
{
    if (s->peeked || s->ended || s->fd < 0 || s->relaying || s->conn->server)
        return;
    /* without a buffer no early bytes: stream_read reports it, once relaying */
    ssize_t n = up_ready(s) ? recv(s->fd, s->up.p + s->up.head, MIN(s->up.cap - s->up.head, EARLY_MAX),
                                   MSG_PEEK | MSG_DONTWAIT) : 0;
    if (n > 0) {
        s->early = (uint32_t)n;
        s->up.off = s->up.head;
        s->up.len = s->up.head + (size_t)n;
        up_added(s, (size_t)n);
    }
    /* nothing yet: wait for EPOLLIN; else (bytes, EOF, an error the relay finds after the 200) done */
    s->peeked = !(n < 0 && (errno == EAGAIN || errno == EINTR));
    stream_update(s);
}

/* The 200: the peeked bytes are the stream's; take them out of the socket (their DATA is
 * sent or waits in `up`). false when the stream ended. */
static bool stream_take_early(struct stream *s)
{
    char scratch[4096];
    while (s->early) {
        ssize_t n = recv(s->fd, scratch, MIN(sizeof scratch, s->early), MSG_DONTWAIT);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            /* the socket lost bytes it showed: nobody else reads it, so it was reset */
            stream_end(s, NH_END_SOCKET, n < 0 ? errno : EPIPE, NGHTTP2_CANCEL, 0, "read from the socket failed");
            return false;
        }
        s->early -= (uint32_t)n;
    }
    s->to_peer += s->early_sent;
    ST_ADD(s->conn->e, bytes_to_peer, s->early_sent);
    s->early_sent = 0;
    return true;
}

static void stream_update(struct stream *s)
{
    if (s->ended || s->fd < 0)
        return;
    if (!s->relaying) {            /* client before its answer: only the early peek reads */
        if (!s->conn->server)
            set_mask(s->conn->e, s->fd, &s->o, &s->registered, &s->mask, s->peeked ? 0 : EPOLLIN);
        return;
    }
    uint32_t mask = 0;
    if (!s->up_eof && !s->up_done && buf_avail(&s->up) < s->conn->e->cfg.stream_buffer) {
        bool room = send_room(s) > 0;
        budget_wait(s, !room);
        if (room)
            mask |= EPOLLIN;
    } else {
        budget_wait(s, false);
    }
    if (buf_avail(&s->down))
        mask |= EPOLLOUT;
    set_mask(s->conn->e, s->fd, &s->o, &s->registered, &s->mask, mask);
}

static void stream_io(struct stream *s, uint32_t events)
{
    if (!s->relaying) {            /* client before its answer: registered for the early peek only */
        stream_peek(s);
        return;
    }
    if (events & EPOLLOUT && !stream_write(s))
        return;
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR) && s->mask & EPOLLIN)
        stream_read(s);
    else if (events & EPOLLERR) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        stream_end(s, NH_END_SOCKET, err ? err : EPIPE, NGHTTP2_CANCEL, 0, "socket error");
        return;
    }
    if (s->ended)
        return;
    stream_maybe_finish(s);
    stream_update(s);
}

/* What waits for the socket goes to it; FIN once all has (stream_maybe_finish). */
static void stream_drain(struct stream *s)
{
    if (stream_write(s)) {
        stream_maybe_finish(s);
        stream_update(s);
    }
}

/* Begin relaying: the socket is the stream's (non-blocking from here). */
static void stream_start(struct stream *s)
{
    if (!stream_take_early(s))     /* client: what was peeked before the answer */
        return;
    s->relaying = true;
    stream_drain(s);
}

static ssize_t up_read_cb(nghttp2_session *h2, int32_t sid, uint8_t *buf, size_t length, uint32_t *flags,
                          nghttp2_data_source *source, void *user)
{
    (void)source;
    (void)user;
    struct stream *s = nghttp2_session_get_stream_user_data(h2, sid);
    if (!s || s->ended)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    size_t avail = buf_avail(&s->up);
    if (avail == 0 && !s->up_eof) {
        s->deferred = true;
        return NGHTTP2_ERR_DEFERRED;
    }
    (void)buf;
    size_t n = MIN(avail, length);
    /* no copy into nghttp2's frame buffer: send_data_cb appends the frame to the
     * connection's output straight from the stream buffer, in this same mem_send */
    *flags |= NGHTTP2_DATA_FLAG_NO_COPY;
    if (s->relaying) {
        s->to_peer += n;
        ST_ADD(s->conn->e, bytes_to_peer, n);
    } else {
        s->early_sent += n;        /* counted once the 200 makes them the stream's (stream_start) */
    }
    if (s->up_eof && avail == n) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        s->up_done = true;
    }
    return (ssize_t)n;
}

/* SSL_write of `n` bytes at `p` until all went or the socket is full; *done: how many went.
 * 0: all; 1: full (WANT_WRITE: OpenSSL holds the first unwritten record, encrypted, and its
 * next SSL_write must begin with the same bytes); -1: failed, kept in c->write_err for
 * conn_flush to report (with OpenSSL's error queue as it is: nothing calls OpenSSL before). */
static int tls_write(struct conn *c, const char *p, size_t n, size_t *done)
{
    *done = 0;
    while (*done < n) {
        ERR_clear_error();
        int w = SSL_write(c->ssl, p + *done, (int)MIN(n - *done, (size_t)INT_MAX));
        if (w > 0) {
            *done += (size_t)w;
            continue;
        }
        int err = SSL_get_error(c->ssl, w);
        if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ)
            return 1;
        c->write_err = err;
        c->write_errno = errno;
        return -1;
    }
    return 0;
}

/* What waits in the connection's output goes to TLS, as far as it goes. */
static int out_write(struct conn *c)
{
    size_t done;
    int r = tls_write(c, c->out.p + c->out.off, buf_avail(&c->out), &done);
    c->out.off += done;
    held_add(c->e, -(int64_t)done);
    return r;
}

/* A DATA frame goes to TLS straight from the stream's buffer: its header is written into
 * the UP_HEAD bytes before the payload (bytes already sent, or never used), so header and
 * payload are one SSL_write and no copy, where appending both to the connection's output
 * copied every byte once more before OpenSSL encrypted it (a third of the sender's
 * memmove). What nghttp2 gave before it (HEADERS, WINDOW_UPDATE...) goes first. What TLS
 * does not take (the socket is full: its first record is OpenSSL's pending one, and the
 * copy starts with the same bytes; or a failure, reported by conn_flush) is copied to the
 * output, as every frame was before, so the frame is sent either way (nghttp2 cannot
 * take part of one back). */
static int send_data_cb(nghttp2_session *h2, nghttp2_frame *frame, const uint8_t *framehd, size_t length,
                        nghttp2_data_source *source, void *user)
{
    (void)source;
    struct conn *c = user;
    struct stream *s = nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id);
    if (!s || frame->data.padlen || length > buf_avail(&s->up) || (length && s->up.off < 9))
        return NGHTTP2_ERR_CALLBACK_FAILURE;  /* we never pad; up_read_cb said `length`; UP_HEAD kept */
    /* END_STREAM alone: the stream's buffer may be gone (released while the window was shut) */
    char alone[9];
    char *whole = length ? s->up.p + s->up.off - 9 : alone;
    size_t total = 9 + length, done = 0;
    memcpy(whole, framehd, 9);
    if (!c->write_err && buf_avail(&c->out))
        out_write(c);
    if (!c->write_err && !buf_avail(&c->out)) {
        tls_write(c, whole, total, &done);
        ST_ADD(c->e, frames_direct, 1);
    }
    if (done < total) {
        if (buf_append(&c->out, whole + done, total - done) < 0)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        ST_ADD(c->e, frames_copied, 1);
    }
    held_add(c->e, (int64_t)(total - done) - (int64_t)length);  /* the rest moved to the output */
    buf_consume(&s->up, length);
    sent_add(s, -(int64_t)length);
    stream_update(s);
    return 0;
}

/* DATA frames as large as the peer takes (SETTINGS_MAX_FRAME_SIZE) rather than nghttp2's
 * 16 KiB, when the stream has that much to send: fewer frames to build and to parse on the
 * other side. nghttp2 grows the session's frame buffer to the length this returns (even
 * though the payload never goes there: NO_COPY) and never shrinks it, so a frame is never
 * offered more than the stream holds: a connection that only carries small requests keeps
 * the 16 KiB buffer it started with instead of ~128 KiB (FRAME_SMALL fits it: nghttp2 keeps
 * 10 bytes before the payload, a 9-byte header then fills one 16 KiB TLS record). */
static ssize_t data_length_cb(nghttp2_session *h2, uint8_t type, int32_t sid, int32_t session_window,
                              int32_t stream_window, uint32_t max_frame, void *user)
{
    (void)type;
    (void)user;
    struct stream *s = nghttp2_session_get_stream_user_data(h2, sid);
    size_t want = s ? buf_avail(&s->up) : 0;
    int32_t len = MIN(MIN(session_window, stream_window), (int32_t)max_frame);
    return want <= FRAME_SMALL ? MIN(len, (int32_t)FRAME_SMALL) : MIN(len, (int32_t)MIN(want, (size_t)INT32_MAX));
}

static struct stream *stream_alloc(struct nh_engine *e)
{
    struct stream *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->o.kind = K_STREAM;
    s->o.id = __atomic_add_fetch(&e->next_id, 1, __ATOMIC_RELAXED);
    s->fd = -1;
    return s;
}

static void stream_link(struct conn *c, struct stream *s)
{
    s->conn = c;
    s->next = c->streams;
    if (c->streams)
        c->streams->prev = s;
    c->streams = s;
    c->nstreams++;
    c->idle_since = 0;
    hash_put(c->e, &s->o);
    ST_ADD(c->e, streams_open, 1);
    ST_ADD(c->e, streams_total, 1);
}

static void stream_free(struct nh_engine *e, struct stream *s)
{
    free(s->routed);
    free(s->authority);
    free(s->hdrs);
    stream_buf_free(e, &s->up);
    stream_buf_free(e, &s->down);
    free(s);
}

/* --- connections -------------------------------------------------------------------- */

static void conn_flush(struct conn *c);

static void hs_unlink(struct conn *c)
{
    struct nh_engine *e = c->e;
    if (c->in_hs_list) {
        if (c->hs_prev)
            c->hs_prev->hs_next = c->hs_next;
        else
            e->hs_head = c->hs_next;
        if (c->hs_next)
            c->hs_next->hs_prev = c->hs_prev;
        else
            e->hs_tail = c->hs_prev;
        c->in_hs_list = false;
    }
    if (c->pending_hs) {
        c->pending_hs = false;
        pthread_mutex_lock(&e->lock);
        e->pending_hs--;
        pthread_mutex_unlock(&e->lock);
        ST_ADD(e, handshakes_pending, -1);
    }
}

static void conn_end(struct conn *c, uint32_t how, int32_t error, uint32_t code, const char *reason)
{
    struct nh_engine *e = c->e;
    if (c->o.dead)
        return;
    hs_unlink(c);
    if (c->live) {
        if (c->live_prev)
            c->live_prev->live_next = c->live_next;
        else
            e->live_head = c->live_next;
        if (c->live_next)
            c->live_next->live_prev = c->live_prev;
        c->live = false;
    }
    if (how == NH_END_TLS || how == NH_END_IDENTITY || how == NH_END_TIMEOUT)
        ST_ADD(e, tls_failures, 1);
    uint32_t stream_how = how == NH_END_STOPPED ? NH_END_STOPPED : NH_END_CONN_LOST;
    while (c->streams)
        stream_end(c->streams, stream_how, 0, 0, 0, reason);
    set_mask(e, c->fd, &c->o, &c->registered, &c->mask, 0);
    held_add(e, -(int64_t)buf_avail(&c->out));
    buf_free(&c->out);
    if (c->h2) {
        nghttp2_session_del(c->h2);
        c->h2 = NULL;
    }
    /* Counted before the socket's end can reach the peer (a FIN, an RST): one that saw it
     * and then read the stats must find the connection gone. */
    ST_ADD(e, conns_open, -1);
    /* A peer silent past the handshake deadline gets a FIN, as from the Python server
     * (and Envoy, ztunnel): nothing of it is left unread, so close() sends no RST. */
    bool clean = how == NH_END_CLOSED || how == NH_END_FLOOD || how == NH_END_PROTOCOL || how == NH_END_GOAWAY
                 || how == NH_END_TLS || how == NH_END_IDENTITY || how == NH_END_TIMEOUT;
    if (c->state == S_H2 && clean) {
        SSL_shutdown(c->ssl);  /* close_notify, best effort */
        (void)BIO_flush(SSL_get_wbio(c->ssl));  /* and what the buffer BIO held */
    }
    if (clean && c->state == S_H2 && !c->peer_eof && (how == NH_END_CLOSED || how == NH_END_GOAWAY))
        linger_start(e, c->fd);
    else if (clean)
        close(c->fd);
    else
        reset_close(c->fd);
    c->fd = -1;
    if (c->gathering) {
        c->gathering = false;      /* the buffer BIO goes with the SSL (conn_free) */
        ST_ADD(e, write_buffers, -1);
    }
    struct nh_event ev = {.conn = c->o.id, .type = NH_EV_CONN_END, .how = how, .error = error, .code = code};
    emit(e, &ev, reason, reason ? strlen(reason) : 0);
    bury(e, &c->o);
}

static void route_free(struct nh_engine *e, struct route *r)
{
    for (uint32_t i = 0; i < r->nfds; i++)
        close(r->fds[i]);              /* bound, never connected: nothing to reset */
    ST_ADD(e, route_sockets, -(int64_t)r->nfds);
    free(r);
}

/* Drop the routes of `c` decided under another generation than `gen`, or all of them. */
static void routes_drop(struct conn *c, uint64_t gen, bool all)
{
    for (struct route **pp = &c->routes, *r; (r = *pp);) {
        if (all || r->gen != gen) {
            *pp = r->next;
            c->nroutes--;
            route_free(c->e, r);
        } else {
            pp = &r->next;
        }
    }
}

static void conn_free(struct conn *c)
{
    struct nh_engine *e = c->e;
    routes_drop(c, 0, true);
    if (c->fd >= 0)
        reset_close(c->fd);
    if (c->h2)
        nghttp2_session_del(c->h2);
    SSL_free(c->ssl);
    buf_free(&c->out);
    free(c->expected);
    free(c->peer_pem);
    free(c->resets);
    free(c);
    pthread_mutex_lock(&e->lock);
    e->conns_reserved--;
    pthread_mutex_unlock(&e->lock);
}

/* The client's RST_STREAM: false once more than max_resets fall within the window. */
static bool reset_allowed(struct conn *c)
{
    struct nh_engine *e = c->e;
    uint32_t cap = e->cfg.max_resets + 1;
    uint64_t now = now_ms();
    if (!c->resets && !(c->resets = calloc(cap, sizeof *c->resets)))
        return false;
    while (c->reset_count && c->resets[(c->reset_head + cap - c->reset_count) % cap] + e->cfg.reset_window_ms <= now)
        c->reset_count--;
    c->resets[c->reset_head] = now;
    c->reset_head = (c->reset_head + 1) % cap;
    if (c->reset_count < cap)
        c->reset_count++;
    return c->reset_count <= e->cfg.max_resets;
}

static void conn_terminate(struct conn *c, uint32_t how, uint32_t code, int32_t last_sid)
{
    if (c->closing)
        return;
    c->closing = true;
    c->closing_how = how;
    c->closing_code = code;
    nghttp2_session_terminate_session2(c->h2, last_sid, code);
    mark_dirty(c);
}

static int on_begin_headers(nghttp2_session *h2, const nghttp2_frame *frame, void *user)
{
    struct conn *c = user;
    if (!c->server || frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    struct stream *s = stream_alloc(c->e);
    if (!s)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    s->sid = frame->hd.stream_id;
    stream_link(c, s);
    nghttp2_session_set_stream_user_data(h2, s->sid, s);
    return 0;
}

static int on_header(nghttp2_session *h2, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *user)
{
    (void)flags;
    (void)user;
    struct stream *s = nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id);
    if (!s || frame->hd.type != NGHTTP2_HEADERS)
        return 0;
    if (namelen == 7 && !memcmp(name, ":status", 7)) {
        char tmp[8] = {0};
        memcpy(tmp, value, MIN(valuelen, sizeof tmp - 1));
        s->status = (uint32_t)atoi(tmp);
        return 0;
    }
    if (!s->conn->server)
        return 0;                          /* response headers: only the status matters */
    if (namelen == 7 && !memcmp(name, ":method", 7)) {
        s->is_connect = valuelen == 7 && !memcmp(value, "CONNECT", 7);
        return 0;
    }
    if (namelen && name[0] == ':' && !(namelen == 10 && !memcmp(name, ":authority", 10)))
        return 0;
    size_t need = namelen + valuelen + 2;
    if (s->hdrs_len + need > MAX_HEADERS)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    char *p = realloc(s->hdrs, s->hdrs_len + need);
    if (!p)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    s->hdrs = p;
    bool authority = namelen == 10 && !memcmp(name, ":authority", 10);
    if (authority && s->hdrs_len) {          /* :authority first */
        memmove(p + need, p, s->hdrs_len);
        p = s->hdrs;
    } else {
        p = s->hdrs + s->hdrs_len;
    }
    memcpy(p, name, namelen);
    p[namelen] = 0;
    memcpy(p + namelen + 1, value, valuelen);
    p[namelen + 1 + valuelen] = 0;
    s->hdrs_len += need;
    return 0;
}

static void refuse_now(struct conn *c, struct stream *s, uint32_t status)
{
    /* answered here: Python never hears of this stream */
    if (!s->h2_closed) {
        if (status) {
            char st[16];
            snprintf(st, sizeof st, "%u", status);
            nghttp2_nv nv = {(uint8_t *)":status", (uint8_t *)st, 7, strlen(st), NGHTTP2_NV_FLAG_NONE};
            nghttp2_submit_response(c->h2, s->sid, &nv, 1, NULL);  /* END_STREAM; the client resets */
        } else {
            nghttp2_submit_rst_stream(c->h2, NGHTTP2_FLAG_NONE, s->sid, NGHTTP2_REFUSED_STREAM);
        }
        nghttp2_session_set_stream_user_data(c->h2, s->sid, NULL);
    }
    mark_dirty(c);
    if (s->prev)
        s->prev->next = s->next;
    else
        c->streams = s->next;
    if (s->next)
        s->next->prev = s->prev;
    if (--c->nstreams == 0)
        c->idle_since = now_ms();
    s->ended = true;
    held_add(c->e, -(int64_t)buf_avail(&s->up));
    budget_wait(s, false);
    sent_add(s, -(int64_t)s->up_held);
    received_add(s, -(int64_t)buf_avail(&s->down));
    if (buf_avail(&s->down))
        nghttp2_session_consume_connection(c->h2, buf_avail(&s->down));
    ST_ADD(c->e, streams_open, -1);
    bury(c->e, &s->o);
}

/* One event per connection, reason and read, counting the streams it stands for: a peer
 * sending HEADERS at the cap queued an event per frame, as many as Python was slow to
 * drain (a frame is 9 bytes and a few of HPACK). */
static void refused_event(struct conn *c, struct stream *s, uint32_t why)
{
    struct nh_engine *e = c->e;
    if (e->staging && c->refused_stage == e->stage_seq && c->refused[why]) {
        c->refused[why]->ev.status++;
        return;
    }
    struct nh_event ev = {.conn = c->o.id, .type = NH_EV_REFUSED, .how = why, .code = NGHTTP2_REFUSED_STREAM,
                          .status = 1, .h2_stream = (uint32_t)s->sid};
    struct evnode *n = emit(e, &ev, NULL, 0);
    if (c->refused_stage != e->stage_seq)
        memset(c->refused, 0, sizeof c->refused);
    c->refused_stage = e->stage_seq;
    c->refused[why] = n;
}

/* Answer a server stream 200 and relay its socket (s->fd). */
static void answer_200(struct conn *c, struct stream *s)
{
    nghttp2_nv nv = {(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE};
    nghttp2_data_provider prd = {.source.ptr = s, .read_callback = up_read_cb};
    if (nghttp2_submit_response(c->h2, s->sid, &nv, 1, &prd)) {
        stream_end(s, NH_END_SOCKET, ENOMEM, 0, 0, "cannot answer");
        return;
    }
    mark_dirty(c);
    stream_start(s);
}

/* Connect a route's socket: 0 once connected, else why not. Over loopback the handshake
 * is done before connect(2) returns (EINPROGRESS all the same), so a poll without waiting
 * finds it writable; one that is not (the app's accept queue full) is left to Python,
 * which waits for it, as one that failed is. */
static int route_connect(int fd, const struct route *r)
{
    if (connect(fd, (const struct sockaddr *)&r->dst, r->dstlen) == 0)
        return 0;
    if (errno != EINPROGRESS && errno != EAGAIN)
        return errno;
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    if (poll(&p, 1, 0) != 1)
        return EINPROGRESS;
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return errno;
    return err;
}

/* A CONNECT to an :authority the connection has a route for, of the engine's generation:
 * one of its sockets connected, 200, relayed; Python hears of it afterwards. False: ask
 * Python (no route, none current, no socket left, or the connect did not complete). */
static bool deliver_on_route(struct conn *c, struct stream *s)
{
    struct nh_engine *e = c->e;
    static const char key[] = ":authority";  /* on_header puts it first */
    if (!c->routes || s->hdrs_len < sizeof key || memcmp(s->hdrs, key, sizeof key))
        return false;
    const char *authority = s->hdrs + sizeof key;
    routes_drop(c, __atomic_load_n(&e->generation, __ATOMIC_ACQUIRE), false);
    struct route **pp = &c->routes, *r;
    while ((r = *pp) && strcmp(r->authority, authority))
        pp = &r->next;
    if (!r)
        return false;
    while (r->nfds) {
        int fd = r->fds[--r->nfds];
        ST_ADD(e, route_sockets, -1);
        int err = route_connect(fd, r);
        if (!err) {
            struct sockaddr_storage local;
            socklen_t len = sizeof local;
            uint32_t port = 0;
            if (getsockname(fd, (struct sockaddr *)&local, &len) == 0)
                port = ntohs(local.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&local)->sin6_port
                                                         : ((struct sockaddr_in *)&local)->sin_port);
            struct nh_event ev = {.conn = c->o.id, .stream = s->o.id, .type = NH_EV_DELIVERED, .code = port,
                                  .h2_stream = (uint32_t)s->sid, .tag = r->gen};
            emit(e, &ev, s->hdrs, s->hdrs_len);  /* before the stream's end can be */
            free(s->hdrs);
            s->hdrs = NULL;
            s->hdrs_len = 0;
            ST_ADD(e, streams_delivered, 1);
            s->announced = s->answered = true;
            s->fd = fd;
            answer_200(c, s);
            return true;
        }
        reset_close(fd);               /* a connect under way is reset, not left to finish */
        ST_ADD(e, route_failures, 1);
        if (err != EADDRNOTAVAIL)      /* the 4-tuple taken: the next socket has another port */
            break;
    }
    *pp = r->next;                     /* emptied, or a connect failed: Python delivers, and may route again */
    c->nroutes--;
    route_free(e, r);
    return false;
}

static void on_request(struct conn *c, struct stream *s)
{
    struct nh_engine *e = c->e;
    if (c->draining) {
        refused_event(c, s, NH_REFUSED_DRAINING);
        refuse_now(c, s, 0);
        return;
    }
    if (c->nstreams > e->cfg.max_streams) {
        ST_ADD(e, refused_streams, 1);
        refused_event(c, s, NH_REFUSED_CAP);
        refuse_now(c, s, 0);
        return;
    }
    if (!s->is_connect) {
        refuse_now(c, s, 405);
        return;
    }
    if (deliver_on_route(c, s))
        return;
    struct nh_event ev = {.conn = c->o.id, .stream = s->o.id, .type = NH_EV_REQUEST, .h2_stream = (uint32_t)s->sid};
    s->announced = true;
    emit(e, &ev, s->hdrs, s->hdrs_len);
    free(s->hdrs);
    s->hdrs = NULL;
    s->hdrs_len = 0;
}

static void on_response(struct conn *c, struct stream *s)
{
    uint32_t status = s->status;
    if (s->routed) {               /* Python hears of it only once it relays, or from its end */
        if (status != 200) {
            stream_end(s, NH_END_REFUSED, 0, 0, status, "the server refused the CONNECT");
            return;
        }
        s->got_200 = true;         /* from here its socket is the stream's: reset at an error end */
        struct nh_event ev = {.conn = c->o.id, .stream = s->o.id, .type = NH_EV_OUT_OPENED, .status = status,
                              .h2_stream = (uint32_t)s->sid};
        routed_fields(&ev, s->routed);
        emit(c->e, &ev, s->authority, strlen(s->authority));
        stream_start(s);
        return;
    }
    struct nh_event ev = {.conn = c->o.id, .stream = s->o.id, .type = NH_EV_RESPONSE, .status = status,
                          .h2_stream = (uint32_t)s->sid};
    emit(c->e, &ev, NULL, 0);
    if (status == 200) {
        s->got_200 = true;
        if (s->fd >= 0)
            stream_start(s);       /* else at nh_stream_attach */
    } else
        stream_end(s, NH_END_REFUSED, 0, 0, status, "the server refused the CONNECT");
}

static int on_frame_recv(nghttp2_session *h2, const nghttp2_frame *frame, void *user)
{
    struct conn *c = user;
    uint8_t type = frame->hd.type;
    if ((type == NGHTTP2_DATA && frame->hd.flags & NGHTTP2_FLAG_END_STREAM) || type == NGHTTP2_HEADERS
        || type == NGHTTP2_RST_STREAM || type == NGHTTP2_GOAWAY)
        pend_flush(c->e);  /* what a stream received goes out before what ends it is acted on */
    int32_t sid = frame->hd.stream_id;
    struct stream *s = sid ? nghttp2_session_get_stream_user_data(h2, sid) : NULL;
    switch (frame->hd.type) {
    case NGHTTP2_HEADERS:
        if (!s)
            break;
        if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
            s->down_eof = true;
        if (c->server && frame->headers.cat == NGHTTP2_HCAT_REQUEST)
            on_request(c, s);
        else if (!c->server && frame->headers.cat == NGHTTP2_HCAT_RESPONSE)
            on_response(c, s);
        else if (!s->ended)
            stream_maybe_finish(s);
        break;
    case NGHTTP2_DATA:
        if (s && frame->hd.flags & NGHTTP2_FLAG_END_STREAM) {
            s->down_eof = true;
            stream_maybe_finish(s);
            stream_update(s);
        }
        break;
    case NGHTTP2_RST_STREAM:
        if (c->server && !c->closing
            && !(frame->rst_stream.error_code == NGHTTP2_NO_ERROR && (!s || s->down_eof))
            && !reset_allowed(c)) {
            ST_ADD(c->e, flood_goaways, 1);
            conn_terminate(c, NH_END_FLOOD, NGHTTP2_ENHANCE_YOUR_CALM, sid);
        }
        break;
    case NGHTTP2_SETTINGS:
        if (!c->server && c->in_hs_list && !(frame->hd.flags & NGHTTP2_FLAG_ACK)) {
            struct nh_event ev = {.conn = c->o.id, .type = NH_EV_CONN_UP};
            hs_unlink(c);
            emit(c->e, &ev, c->peer_pem, c->peer_pem_len);
            free(c->peer_pem);
            c->peer_pem = NULL;
        }
        break;
    case NGHTTP2_PING:
        if (frame->hd.flags & NGHTTP2_FLAG_ACK)
            c->ping_sent = 0;
        break;
    case NGHTTP2_GOAWAY:
        c->draining = true;
        if (frame->goaway.error_code != NGHTTP2_NO_ERROR)
            c->goaway_code = frame->goaway.error_code;
        break;
    default:
        break;
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *h2, uint8_t flags, int32_t sid, const uint8_t *data, size_t len,
                         void *user)
{
    (void)flags;
    (void)user;
    struct stream *s = nghttp2_session_get_stream_user_data(h2, sid);
    if (!s || s->ended) {
        nghttp2_session_consume(h2, sid, len);  /* nobody takes it: give the window back */
        return 0;
    }
    /* Gathered, and written once DOWN_BATCH is there or the read round ends (conn_read):
     * one send per DATA chunk (a TLS record, 16 KiB) made as many segments on the app's
     * socket, and the app paid for each. */
    if (over_budget(s, len)) {
        char reason[160];
        snprintf(reason, sizeof reason, "its app had not read %zu bytes received when the node's streams held half "
                 "the receive budget (%llu bytes)", buf_avail(&s->down), (unsigned long long)s->conn->e->cfg.receive_budget);
        ST_ADD(s->conn->e, streams_overloaded, 1);
        nghttp2_session_consume_connection(h2, len);  /* dropped: the connection window is the peer's again */
        stream_end(s, NH_END_OVERLOAD, 0, NGHTTP2_CANCEL, 0, reason);
        return 0;
    }
    struct nh_engine *e = s->conn->e;
    if (s->relaying && s->fd >= 0 && e->npend == PEND_MAX) {
        pend_flush(e);
        if (s->ended) {            /* its own write failed in the flush */
            nghttp2_session_consume(h2, sid, len);
            return 0;
        }
    }
    if (s->relaying && s->fd >= 0 && !buf_avail(&s->down)) {
        /* nothing waits before it: kept in the arena, written from there (pend_out) */
        struct pend *last = e->npend ? &e->pend[e->npend - 1] : NULL;
        if (last && last->s == s && last->p + last->n == data)
            last->n += len;        /* the rest of a frame whose start the last read gave */
        else
            e->pend[e->npend++] = (struct pend){.s = s, .p = data, .n = len};
        s->pend_bytes += len;
        s->active = true;
        received_add(s, (int64_t)len);
        stream_peak(s);
        if (s->pend_bytes >= DOWN_BATCH)
            pend_out(s);
        mark_dirty(s->conn);
        return 0;
    }
    size_t cap = s->down.cap;
    if (buf_append(&s->down, data, len) < 0)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    ST_ADD(e, stream_buffers, (int64_t)(s->down.cap - cap));
    ST_ADD(e, received_copied, len);
    s->active = true;
    received_add(s, (int64_t)len);
    stream_peak(s);
    if (s->relaying && buf_avail(&s->down) >= DOWN_BATCH && !stream_write(s))
        return 0;
    /* No stream_update here: the read round ends in streams_write, which writes the rest
     * and sets the socket's interest then. Setting it here asked for EPOLLOUT before the
     * write and took it back after: two epoll_ctl per delivery of received data. */
    mark_dirty(s->conn);
    return 0;
}

/* The end of a read round: what the streams gathered goes to their sockets. */
static void streams_write(struct conn *c)
{
    for (struct stream *s = c->streams, *next; s; s = next) {
        next = s->next;
        if (s->relaying && s->fd >= 0 && buf_avail(&s->down))
            stream_drain(s);
    }
}

static int on_stream_close(nghttp2_session *h2, int32_t sid, uint32_t code, void *user)
{
    struct conn *c = user;
    pend_flush(c->e);
    struct stream *s = nghttp2_session_get_stream_user_data(h2, sid);
    if (!s || s->ended)
        return 0;
    s->h2_closed = true;
    if (s->conn->server && !s->announced) {  /* reset (or refused by nghttp2) before its request was whole */
        stream_end(s, NH_END_RESET, 0, code, 0, NULL);
        return 0;
    }
    if (!s->relaying && s->conn->server && !s->answered) {
        s->reset_code = code ? code : NGHTTP2_CANCEL;  /* Python's answer ends it */
        struct nh_event ev = {.conn = s->conn->o.id, .stream = s->o.id, .type = NH_EV_REQUEST_RESET,
                              .code = s->reset_code, .h2_stream = (uint32_t)sid};
        emit(s->conn->e, &ev, NULL, 0);
        return 0;
    }
    if (code != NGHTTP2_NO_ERROR) {
        stream_end(s, NH_END_RESET, 0, code, 0, "reset by the peer");
        return 0;
    }
    /* closed cleanly: what was received goes out, then FIN; we send nothing more */
    s->down_eof = true;
    if (!s->up_done) {
        s->up_done = true;
        held_add(s->conn->e, -(int64_t)buf_avail(&s->up));
        sent_add(s, -(int64_t)s->up_held);
        s->up.off = s->up.len = s->up.head;
    }
    if (!s->relaying && !s->got_200) {
        stream_end(s, NH_END_REFUSED, 0, 0, 0, "closed before a response");
        return 0;
    }
    stream_maybe_finish(s);
    stream_update(s);
    return 0;
}

/* A GOAWAY with an error that we did not ask for is nghttp2 answering the peer's protocol
 * error (flow control, a bad frame...): the connection then ends NH_END_PROTOCOL. */
static int on_frame_send(nghttp2_session *h2, const nghttp2_frame *frame, void *user)
{
    struct conn *c = user;
    if (frame->hd.type == NGHTTP2_HEADERS && !c->server) {
        struct stream *s = nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id);
        if (s)
            s->sent = true;
    }
    if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR && !c->closing)
        c->sent_goaway_code = frame->goaway.error_code;
    return 0;
}

/* While a connection has streams, TLS writes go through a buffer BIO in front of the
 * socket: SSL_write writes each 16 KiB record by itself, and with TCP_NODELAY each write is
 * a segment of its own, so a bulk transfer paid the per-packet cost (veth, bridge,
 * netfilter, the peer's receive) once per record. The buffer writes TLS_OUT at once;
 * conn_flush pushes what is left at the end of each round, so nothing small waits. What
 * the socket does not take stays in the BIO: the connection then wants EPOLLOUT
 * (conn_update) and SSL_write reports WANT_WRITE once the BIO is full, so back-pressure is
 * unchanged. A connection without streams for a tick (tick(): PINGs, SETTINGS, GOAWAY)
 * writes straight to the socket, and frees the buffer and its output buffer
 * (tls_direct_writes): an idle connection held ~150 KiB of malloc, 68 of them these two,
 * and a node keeps pooled connections to its peers. The next stream gathers again. */
static int tls_gather_writes(struct conn *c)
{
    BIO *sock = SSL_get_wbio(c->ssl);
    BIO *buf = BIO_new(BIO_f_buffer());
    if (!buf || BIO_set_write_buffer_size(buf, TLS_OUT) <= 0 || !BIO_up_ref(sock)) {
        BIO_free(buf);
        return -ENOMEM;
    }
    BIO_push(buf, sock);       /* the chain holds its own reference; the read side keeps the socket BIO */
    SSL_set0_wbio(c->ssl, buf);
    c->gathering = true;
    ST_ADD(c->e, write_buffers, 1);
    return 0;
}

/* Back to writing straight to the socket; only when the buffer BIO holds nothing. */
static void tls_direct_writes(struct conn *c)
{
    BIO *sock = BIO_next(SSL_get_wbio(c->ssl));
    if (!sock)
        return;
    /* frees the buffer BIO and drops the chain's reference to the socket BIO: read and write
     * side are one BIO again, holding one reference, as SSL_set_bio(ssl, b, b) leaves them */
    SSL_set0_wbio(c->ssl, sock);
    c->gathering = false;
    ST_ADD(c->e, write_buffers, -1);
    buf_free(&c->out);
}

static size_t tls_pending(const struct conn *c)
{
    return c->ssl ? (size_t)BIO_wpending(SSL_get_wbio(c->ssl)) : 0;
}

/* Write what the buffer BIO holds: 1 all written, 0 the socket is full, -1 the connection ended. */
static int tls_push(struct conn *c)
{
    BIO *w = SSL_get_wbio(c->ssl);
    if (BIO_wpending(w) == 0)
        return 1;
    errno = 0;
    if (BIO_flush(w) > 0)
        return 1;
    if (BIO_should_retry(w))
        return 0;
    conn_end(c, NH_END_IO, errno ? errno : EPIPE, 0, "TLS write: the socket refused it");
    return -1;
}

/* nghttp2's memory, counted (nh_stats.h2_held): glibc's usable size of each block. */
static void h2_count(void *engine, void *p, int64_t sign)
{
    if (p)
        ST_ADD((struct nh_engine *)engine, h2_held, (uint64_t)(sign * (int64_t)malloc_usable_size(p)));
}

static void *h2_malloc(size_t size, void *engine)
{
    void *p = malloc(size);
    h2_count(engine, p, 1);
    return p;
}

static void h2_free(void *p, void *engine)
{
    h2_count(engine, p, -1);
    free(p);
}

static void *h2_calloc(size_t n, size_t size, void *engine)
{
    void *p = calloc(n, size);
    h2_count(engine, p, 1);
    return p;
}

static void *h2_realloc(void *p, size_t size, void *engine)
{
    size_t before = p ? malloc_usable_size(p) : 0;
    void *q = realloc(p, size);
    if (q || size == 0) {
        ST_ADD((struct nh_engine *)engine, h2_held, (uint64_t)-(int64_t)before);
        h2_count(engine, q, 1);
    }
    return q;
}

/* A client's CONNECT nghttp2 will not send: a GOAWAY came while it waited behind the
 * server's MAX_CONCURRENT_STREAMS. The server never saw it, so it ends now as never sent
 * (h2_stream 0: the pool retries it on another connection), not when the connection ends. */
static int on_frame_not_send(nghttp2_session *h2, const nghttp2_frame *frame, int lib_error, void *user)
{
    (void)h2;
    (void)lib_error;
    struct conn *c = user;
    if (frame->hd.type != NGHTTP2_HEADERS || c->server)
        return 0;
    struct stream *s = c->streams;
    while (s && s->sid != frame->hd.stream_id)
        s = s->next;
    if (s && !s->sent) {
        s->h2_closed = true;       /* never opened: no RST_STREAM for it */
        stream_end(s, NH_END_CONN_LOST, 0, 0, 0, "not sent: the server's GOAWAY came first");
    }
    return 0;
}

static int h2_start(struct conn *c)
{
    struct nh_engine *e = c->e;
    nghttp2_session_callbacks *cb;
    nghttp2_option *opt;
    if (nghttp2_session_callbacks_new(&cb))
        return -ENOMEM;
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_send_callback(cb, on_frame_send);
    nghttp2_session_callbacks_set_on_frame_not_send_callback(cb, on_frame_not_send);
    nghttp2_session_callbacks_set_send_data_callback(cb, send_data_cb);
    nghttp2_session_callbacks_set_data_source_read_length_callback(cb, data_length_cb);
    if (nghttp2_option_new(&opt)) {
        nghttp2_session_callbacks_del(cb);
        return -ENOMEM;
    }
    nghttp2_option_set_no_auto_window_update(opt, 1);
    nghttp2_option_set_max_send_header_block_length(opt, MAX_HEADERS * 4);
    nghttp2_mem mem = {c->e, h2_malloc, h2_free, h2_calloc, h2_realloc};
    int rv = c->server ? nghttp2_session_server_new3(&c->h2, cb, c, opt, &mem)
                       : nghttp2_session_client_new3(&c->h2, cb, c, opt, &mem);
    nghttp2_session_callbacks_del(cb);
    nghttp2_option_del(opt);
    if (rv)
        return -ENOMEM;
    nghttp2_settings_entry iv[5] = {
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, e->cfg.stream_window},
        {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, e->cfg.max_frame_size},
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, e->cfg.max_streams},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADERS},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
    };
    if (nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, iv, c->server ? 4 : 5)
        || nghttp2_session_set_local_window_size(c->h2, NGHTTP2_FLAG_NONE, 0, (int32_t)e->cfg.connection_window))
        return -ENOMEM;
    c->state = S_H2;
    c->preface_left = c->server ? 24 : 0;
    c->last_heard = now_ms();
    if (c->nstreams == 0)
        c->idle_since = c->last_heard;
    c->live = true;
    c->live_next = e->live_head;
    if (e->live_head)
        e->live_head->live_prev = c;
    e->live_head = c;
    return 0;
}

static void submit_open(struct conn *c, struct stream *s)
{
    size_t n = 2;
    for (size_t i = 0; i < s->hdrs_len; i++)
        n += s->hdrs[i] == 0;
    n = 2 + n / 2;
    nghttp2_nv *nva = calloc(n, sizeof *nva);
    if (!nva) {
        stream_end(s, NH_END_SOCKET, ENOMEM, 0, 0, "out of memory");
        return;
    }
    size_t k = 0;
    nva[k++] = (nghttp2_nv){(uint8_t *)":method", (uint8_t *)"CONNECT", 7, 7, NGHTTP2_NV_FLAG_NONE};
    nva[k++] = (nghttp2_nv){(uint8_t *)":authority", (uint8_t *)s->authority, 10, strlen(s->authority),
                            NGHTTP2_NV_FLAG_NONE};
    for (size_t i = 0; i < s->hdrs_len && k < n;) {
        char *name = s->hdrs + i;
        size_t nl = strlen(name);
        if (i + nl + 1 >= s->hdrs_len)
            break;
        char *value = name + nl + 1;
        size_t vl = strlen(value);
        nva[k++] = (nghttp2_nv){(uint8_t *)name, (uint8_t *)value, nl, vl, NGHTTP2_NV_FLAG_NONE};
        i += nl + vl + 2;
    }
    nghttp2_data_provider prd = {.source.ptr = s, .read_callback = up_read_cb};
    int32_t sid = nghttp2_submit_request(c->h2, NULL, nva, k, &prd, s);
    free(nva);
    if (sid < 0) {
        stream_end(s, NH_END_REFUSED, 0, 0, 0, nghttp2_strerror(sid));
        return;
    }
    s->sid = sid;
    stream_peek(s);
    mark_dirty(c);
}

static void conn_update(struct conn *c)
{
    uint32_t mask = c->state == S_VERDICT || c->closing ? 0 : EPOLLIN;
    if (buf_avail(&c->out) || tls_pending(c))
        mask |= EPOLLOUT;
    set_mask(c->e, c->fd, &c->o, &c->registered, &c->mask, mask);
}

static void conn_fail_tls(struct conn *c, int sslerr, const char *what)
{
    char reason[256];
    unsigned long err = ERR_peek_last_error();
    if (sslerr == SSL_ERROR_SSL && err)
        snprintf(reason, sizeof reason, "%s: %s", what, ERR_reason_error_string(err) ?: "unknown");
    else if (sslerr == SSL_ERROR_SYSCALL && errno)
        snprintf(reason, sizeof reason, "%s: %s", what, strerror(errno));
    else
        snprintf(reason, sizeof reason, "%s: the peer closed the connection", what);
    ERR_clear_error();
    int saved = sslerr == SSL_ERROR_SYSCALL ? errno : 0;
    long verify = c->state == S_HANDSHAKE ? SSL_get_verify_result(c->ssl) : X509_V_OK;
    /* a client's handshake lasts until the server's SETTINGS (see handshake_done) */
    conn_end(c, c->state == S_HANDSHAKE || c->in_hs_list ? NH_END_TLS : NH_END_IO, saved,
             verify != X509_V_OK ? (uint32_t)verify : 0, reason);
}

static int uri_sans(X509 *cert, char *out, size_t cap)
{
    GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    int count = 0;
    out[0] = 0;
    for (int i = 0; names && i < sk_GENERAL_NAME_num(names); i++) {
        GENERAL_NAME *g = sk_GENERAL_NAME_value(names, i);
        if (g->type != GEN_URI)
            continue;
        if (count++ == 0) {
            int len = ASN1_STRING_length(g->d.uniformResourceIdentifier);
            const unsigned char *uri = ASN1_STRING_get0_data(g->d.uniformResourceIdentifier);
            /* one with a NUL inside stays "": compared as text, it would pass for its start */
            if (len > 0 && (size_t)len < cap && !memchr(uri, 0, (size_t)len)) {
                memcpy(out, uri, len);
                out[len] = 0;
            }
        }
    }
    GENERAL_NAMES_free(names);
    return count;
}

static void conn_read(struct conn *c);

static void handshake_done(struct conn *c)
{
    X509 *leaf = SSL_get0_peer_certificate(c->ssl);
    if (!leaf) {
        conn_end(c, NH_END_IDENTITY, 0, 0, "the peer presented no certificate");
        return;
    }
    BIO *bio = BIO_new(BIO_s_mem());
    if (!bio) {
        conn_end(c, NH_END_IO, ENOMEM, 0, "out of memory");
        return;
    }
    PEM_write_bio_X509(bio, leaf);
    STACK_OF(X509) *chain = SSL_get_peer_cert_chain(c->ssl);
    for (int i = 0; chain && i < sk_X509_num(chain); i++)
        if (X509_cmp(sk_X509_value(chain, i), leaf))
            PEM_write_bio_X509(bio, sk_X509_value(chain, i));
    char *pem;
    long len = BIO_get_mem_data(bio, &pem);
    if (!c->server) {
        char uri[MAX_URI], reason[2 * MAX_URI + 64];
        int n = uri_sans(leaf, uri, sizeof uri);
        if (n != 1 || strcmp(uri, c->expected)) {
            snprintf(reason, sizeof reason, "the server is %s%s, expected %s", n == 1 ? uri : "",
                     n == 1 ? "" : "not one URI SAN", c->expected);
            BIO_free(bio);
            conn_end(c, NH_END_IDENTITY, 0, 0, reason);
            return;
        }
    }
    if (c->server) {
        struct nh_event ev = {.conn = c->o.id, .type = NH_EV_CONN_UP};
        emit(c->e, &ev, pem, (size_t)len);
        BIO_free(bio);
        hs_unlink(c);
        c->state = S_VERDICT;
        conn_update(c);
        return;
    }
    /* Client: up once the server's first SETTINGS comes, as the Python pool: the server
     * checks our certificate after its side of TLS, so its refusal comes instead. */
    c->peer_pem = malloc((size_t)len);
    if (c->peer_pem) {
        memcpy(c->peer_pem, pem, (size_t)len);
        c->peer_pem_len = (size_t)len;
    }
    BIO_free(bio);
    if (h2_start(c) < 0) {
        conn_end(c, NH_END_IO, ENOMEM, 0, "out of memory");
        return;
    }
    for (struct stream *s = c->streams, *next; s; s = next) {
        next = s->next;            /* a stream submit_open ends leaves the list (buried: next stays) */
        if (s->sid == 0)
            submit_open(c, s);
    }
    mark_dirty(c);
    conn_read(c);  /* records OpenSSL may already hold */
}

static void do_handshake(struct conn *c)
{
    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        handshake_done(c);
        return;
    }
    int err = SSL_get_error(c->ssl, r);
    if (err == SSL_ERROR_WANT_READ) {
        set_mask(c->e, c->fd, &c->o, &c->registered, &c->mask, EPOLLIN);
    } else if (err == SSL_ERROR_WANT_WRITE) {
        set_mask(c->e, c->fd, &c->o, &c->registered, &c->mask, EPOLLIN | EPOLLOUT);
    } else {
        conn_fail_tls(c, err, "TLS handshake");
    }
}

/* Follow the frame boundaries of what the peer sent (nghttp2 does not say), so a peer
 * that stops inside a frame is told apart (NH_END_TRUNCATED) from one that closes. */
static void track_frames(struct conn *c, const uint8_t *p, size_t n)
{
    while (n) {
        size_t k;
        if (c->preface_left || c->frame_left) {
            uint32_t *left = c->preface_left ? &c->preface_left : &c->frame_left;
            k = MIN(n, *left);
            *left -= (uint32_t)k;
        } else {
            k = 1;
            c->frame_head[c->frame_head_len++] = *p;
            if (c->frame_head_len == 9) {
                c->frame_left = (uint32_t)c->frame_head[0] << 16 | (uint32_t)c->frame_head[1] << 8 | c->frame_head[2];
                c->frame_head_len = 0;
            }
        }
        p += k;
        n -= k;
    }
}

static bool mid_frame(const struct conn *c)
{
    return c->frame_left || c->frame_head_len || (c->server && c->preface_left && c->preface_left < 24);
}

/* The socket BIO's reads, seen as they return: one that took less than it asked for
 * emptied the socket (TCP hands over all it holds, up to the length), so conn_read stops
 * there instead of reading again only to be told EAGAIN; epoll is level-triggered, so
 * bytes that come meanwhile wake the engine again. With read-ahead OpenSSL asks for its
 * whole buffer, so a request or an answer comes in one read that says it emptied it. */
static long sock_read_seen(BIO *b, int oper, const char *argp, size_t len, int argi, long argl, int ret,
                           size_t *processed)
{
    (void)argp;
    (void)argi;
    (void)argl;
    if (oper != (BIO_CB_READ | BIO_CB_RETURN))
        return ret;
    struct conn *c = (struct conn *)BIO_get_callback_arg(b);
    if (c) {
        c->read_drained = ret > 0 && processed && *processed < len;
        if (ret <= 0 && BIO_should_retry(b))
            ST_ADD(c->e, tls_empty_reads, 1);
    }
    return ret;
}

static void conn_read(struct conn *c)
{
    /* The round's plaintext: received DATA is written to the streams' sockets from here
     * (struct pend), so each read goes to the next free part until the arena is full. */
    static __thread uint8_t arena[READ_ARENA];
    size_t used = 0;
    while (!c->o.dead && !c->closing && c->state == S_H2) {
        if (READ_ARENA - used < READ_MIN) {
            pend_flush(c->e);
            used = 0;
        }
        uint8_t *buf = arena + used;
        ERR_clear_error();
        c->read_drained = false;
        int n = SSL_read(c->ssl, buf, (int)MIN((size_t)READ_CHUNK, READ_ARENA - used));
        if (n <= 0) {
            int err = SSL_get_error(c->ssl, n);
            if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
                break;
            int saved = errno;
            pend_flush(c->e);
            streams_write(c);  /* what this round gathered goes out before the connection ends */
            errno = saved;
            if (c->in_hs_list) {
                conn_fail_tls(c, err, "the server closed the connection right after TLS (our certificate "
                                      "refused?)");
            } else if (mid_frame(c) && err != SSL_ERROR_SSL) {
                int saved = err == SSL_ERROR_SYSCALL ? errno : 0;
                ERR_clear_error();
                conn_end(c, NH_END_TRUNCATED, saved, 0, "the peer's bytes ended inside an HTTP/2 frame");
            } else if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && errno == 0)) {
                bool idle = c->nstreams == 0;
                c->peer_eof = true;
                ERR_clear_error();
                conn_end(c, c->goaway_code ? NH_END_GOAWAY : idle ? NH_END_CLOSED : NH_END_IO, 0,
                         c->goaway_code, idle ? "the peer closed the connection"
                                              : "the peer closed the connection with streams open");
            } else {
                conn_fail_tls(c, err, "TLS read");
            }
            return;
        }
        used += (size_t)n;
        c->last_heard = now_ms();
        track_frames(c, buf, (size_t)n);
        stage_begin(c->e);
        ssize_t rv = nghttp2_session_mem_recv(c->h2, buf, (size_t)n);
        stage_publish(c->e);
        if (rv < 0) {
            /* nghttp2 queued GOAWAY itself, but not for a bad preface: then we do */
            nghttp2_session_terminate_session(c->h2, NGHTTP2_PROTOCOL_ERROR);
            c->closing = true;
            c->closing_how = NH_END_PROTOCOL;
            c->closing_code = rv == NGHTTP2_ERR_FLOODED ? NGHTTP2_ENHANCE_YOUR_CALM : NGHTTP2_PROTOCOL_ERROR;
            while (c->streams)
                stream_end(c->streams, NH_END_CONN_LOST, 0, 0, 0, nghttp2_strerror((int)rv));
            c->e->npend = 0;  /* what its streams had in the arena went with them (stream_end) */
            conn_flush(c);  /* the GOAWAY nghttp2 queued, best effort */
            if (!c->o.dead)
                conn_end(c, NH_END_PROTOCOL, 0, c->closing_code, nghttp2_strerror((int)rv));
            return;
        }
        if (c->read_drained && !SSL_has_pending(c->ssl))
            break;                 /* the socket is empty and OpenSSL holds nothing more */
    }
    pend_flush(c->e);
    if (!c->o.dead)
        streams_write(c);
    mark_dirty(c);
}

static void conn_flush(struct conn *c)
{
    struct nh_engine *e = c->e;
    if (c->o.dead || c->state != S_H2)
        return;
    if (c->closing)
        while (c->streams)
            stream_end(c->streams, NH_END_CONN_LOST, 0, 0, 0, "the connection is closing");
    if (c->nstreams && !c->gathering && tls_gather_writes(c) < 0) {
        conn_end(c, NH_END_IO, ENOMEM, 0, "out of memory");
        return;
    }
    for (;;) {
        if (!c->write_err && buf_avail(&c->out) && out_write(c) > 0)
            break;
        if (c->write_err) {
            errno = c->write_errno;
            conn_fail_tls(c, c->write_err, "TLS write");
            return;
        }
        c->out.off = c->out.len = 0;
        while (c->out.len < OUT_FILL) {
            const uint8_t *data;
            ssize_t n = nghttp2_session_mem_send(c->h2, &data);
            if (n < 0) {
                conn_end(c, NH_END_PROTOCOL, 0, NGHTTP2_INTERNAL_ERROR, nghttp2_strerror((int)n));
                return;
            }
            if (n == 0)
                break;
            if (buf_append(&c->out, data, (size_t)n) < 0) {
                conn_end(c, NH_END_IO, ENOMEM, 0, "out of memory");
                return;
            }
            held_add(e, n);
        }
        if (c->out.len == 0)
            break;
    }
    if (tls_push(c) < 0)
        return;
    if (c->closing && (buf_avail(&c->out) || tls_pending(c))) {
        /* a flood or a protocol error: the GOAWAY does not go out at once (the peer does
         * not read), so no waiting for it */
        conn_end(c, c->closing_how, 0, c->closing_code, "closed before the GOAWAY was written");
        return;
    }
    if (!buf_avail(&c->out) && !tls_pending(c) && !nghttp2_session_want_read(c->h2)
        && !nghttp2_session_want_write(c->h2)) {
        if (!c->closing && c->sent_goaway_code) {
            char reason[96];
            snprintf(reason, sizeof reason, "the peer broke HTTP/2: GOAWAY %s sent",
                     nghttp2_http2_strerror(c->sent_goaway_code));
            conn_end(c, NH_END_PROTOCOL, 0, c->sent_goaway_code, reason);
            return;
        }
        conn_end(c, c->closing ? c->closing_how : c->goaway_code ? NH_END_GOAWAY : NH_END_CLOSED, 0,
                 c->closing ? c->closing_code : c->goaway_code,
                 c->closing_how == NH_END_FLOOD ? "the client reset too many streams: GOAWAY ENHANCE_YOUR_CALM"
                                                : "GOAWAY");
        return;
    }
    conn_update(c);
}

static void conn_io(struct conn *c, uint32_t events)
{
    if (c->state == S_HANDSHAKE) {
        do_handshake(c);
        return;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR))
        conn_read(c);
    if (events & EPOLLOUT)
        mark_dirty(c);
}

/* --- commands ----------------------------------------------------------------------- */

static void cmd_client_or_server(struct nh_engine *e, struct conn *c)
{
    hash_put(e, &c->o);
    ST_ADD(e, conns_open, 1);
    ST_ADD(e, conns_total, 1);
    c->deadline = now_ms() + (c->server || !e->cfg.client_handshake_timeout_ms ? e->cfg.handshake_timeout_ms
                                                                                : e->cfg.client_handshake_timeout_ms);
    /* the list stays sorted by deadline (expire_handshakes reads its head): from the tail,
     * since with one timeout per side a new one goes last or behind the other side's few */
    struct conn *after = e->hs_tail;
    while (after && after->deadline > c->deadline)
        after = after->hs_prev;
    c->in_hs_list = true;
    c->hs_prev = after;
    c->hs_next = after ? after->hs_next : e->hs_head;
    if (c->hs_next)
        c->hs_next->hs_prev = c;
    else
        e->hs_tail = c;
    if (after)
        after->hs_next = c;
    else
        e->hs_head = c;
    do_handshake(c);
}

static void cmd_open(struct nh_engine *e, struct cmd *cmd)
{
    struct stream *s = cmd->ptr;
    struct conn *c = (struct conn *)hash_get(e, cmd->id, K_CONN);
    s->fd = cmd->fd;
    if (!c || c->closing || c->draining) {
        struct nh_event ev = {.conn = cmd->id, .stream = s->o.id, .type = NH_EV_STREAM_END,
                              .how = NH_END_CONN_LOST};
        reset_close(s->fd);
        emit(e, &ev, "no such connection, or it is closing", 36);
        stream_free(e, s);
        return;
    }
    stream_link(c, s);
    if (c->state == S_H2)
        submit_open(c, s);
}

static void cmd_answer(struct nh_engine *e, struct cmd *cmd)
{
    struct stream *s = (struct stream *)hash_get(e, cmd->id, K_STREAM);
    if (!s || s->answered || !s->conn->server) {
        if (cmd->fd >= 0)
            reset_close(cmd->fd);
        return;
    }
    struct conn *c = s->conn;
    s->answered = true;
    if (cmd->op == OP_REFUSE) {
        if (!s->h2_closed) {
            if (cmd->arg) {
                char st[16];
                snprintf(st, sizeof st, "%u", cmd->arg);
                nghttp2_nv nv = {(uint8_t *)":status", (uint8_t *)st, 7, strlen(st), NGHTTP2_NV_FLAG_NONE};
                nghttp2_session_set_stream_user_data(c->h2, s->sid, NULL);
                /* END_STREAM. No RST_STREAM NO_ERROR behind it as the Python server sends:
                 * with it the Python pool saw a reset, not the status (nghttp2 seemingly
                 * sends the RST first); clients reset a refused stream themselves. */
                nghttp2_submit_response(c->h2, s->sid, &nv, 1, NULL);
                s->h2_closed = true;   /* nothing more of ours goes on it */
            }
            mark_dirty(c);
        }
        stream_end(s, NH_END_REFUSED, 0, cmd->arg ? 0 : NGHTTP2_REFUSED_STREAM, cmd->arg, "refused");
        return;
    }
    s->fd = cmd->fd;
    if (s->h2_closed) {
        stream_end(s, NH_END_RESET, 0, s->reset_code, 0, "reset by the peer before the answer");
        return;
    }
    answer_200(c, s);
}

struct route_cmd {
    uint64_t gen;
    struct sockaddr_storage dst;
    socklen_t dstlen;
    uint32_t nfds;
    int fds[ROUTE_SOCKETS];
    char authority[];
};

static void cmd_route(struct nh_engine *e, struct cmd *cmd)
{
    struct route_cmd *rc = cmd->ptr;
    struct conn *c = (struct conn *)hash_get(e, cmd->id, K_CONN);
    uint64_t gen = __atomic_load_n(&e->generation, __ATOMIC_ACQUIRE);
    struct route *r = NULL;
    if (c && c->server && c->state == S_H2 && !c->closing && !c->draining && rc->gen == gen) {
        routes_drop(c, gen, false);
        for (r = c->routes; r && strcmp(r->authority, rc->authority); r = r->next) {
        }
        if (!r && c->nroutes < CONN_ROUTES && (r = calloc(1, sizeof *r + strlen(rc->authority) + 1))) {
            r->gen = gen;
            r->dst = rc->dst;
            r->dstlen = rc->dstlen;
            strcpy(r->authority, rc->authority);
            r->next = c->routes;
            c->routes = r;
            c->nroutes++;
        }
    }
    for (uint32_t i = 0; i < rc->nfds; i++) {
        if (r && r->nfds < ROUTE_SOCKETS) {
            r->fds[r->nfds++] = rc->fds[i];
            ST_ADD(e, route_sockets, 1);
        } else {
            close(rc->fds[i]);
        }
    }
    free(rc);
}

struct listener;
static void cmd_listen(struct nh_engine *e, struct listener *l);
static void listener_accept(struct listener *l, bool all);
static void listener_free(struct listener *l);
static void cmd_out_route(struct nh_engine *e, struct cmd *cmd);

static void run_cmd(struct nh_engine *e, struct cmd *cmd)
{
    struct conn *c;
    struct stream *s;
    switch (cmd->op) {
    case OP_CLIENT:
    case OP_SERVER:
        cmd_client_or_server(e, cmd->ptr);
        break;
    case OP_VERDICT:
        c = (struct conn *)hash_get(e, cmd->id, K_CONN);
        if (!c || c->state != S_VERDICT)
            break;
        if (!cmd->arg) {
            conn_end(c, NH_END_IDENTITY, 0, 0, "the peer's identity was refused");
        } else if (h2_start(c) < 0) {
            conn_end(c, NH_END_IO, ENOMEM, 0, "out of memory");
        } else {
            conn_read(c);  /* the client's preface may be in OpenSSL's buffer already */
            mark_dirty(c);
        }
        break;
    case OP_CLOSE:
        c = (struct conn *)hash_get(e, cmd->id, K_CONN);
        if (!c)
            break;
        if (cmd->arg || c->state != S_H2) {
            conn_end(c, NH_END_ABORTED, 0, 0, "closed");
        } else if (!c->draining) {
            c->draining = true;
            nghttp2_submit_goaway(c->h2, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(c->h2),
                                  NGHTTP2_NO_ERROR, NULL, 0);
            mark_dirty(c);
        }
        break;
    case OP_OPEN:
        cmd_open(e, cmd);
        break;
    case OP_ACCEPT:
    case OP_REFUSE:
        cmd_answer(e, cmd);
        break;
    case OP_RESET:
        s = (struct stream *)hash_get(e, cmd->id, K_STREAM);
        if (s)
            stream_end(s, NH_END_ABORTED, 0, NGHTTP2_CANCEL, 0, "reset");
        break;
    case OP_ROUTE:
        cmd_route(e, cmd);
        break;
    case OP_LISTEN:
        cmd_listen(e, cmd->ptr);
        break;
    case OP_LISTEN_CLOSE: {
        struct listener *l = (struct listener *)hash_get(e, cmd->id, K_LISTENER);
        if (l) {
            if (cmd->arg)
                listener_accept(l, true);
            listener_free(l);
        }
        break;
    }
    case OP_LISTEN_ROOM: {
        struct listener *l = (struct listener *)hash_get(e, cmd->id, K_LISTENER);
        uint64_t *room = cmd->ptr;  /* {room, seen} */
        if (l) {
            l->room = room[0];
            l->seen = room[1];
        }
        free(room);
        break;
    }
    case OP_OUT_ROUTE:
        cmd_out_route(e, cmd);
        break;
    case OP_ATTACH:
        s = (struct stream *)hash_get(e, cmd->id, K_STREAM);
        if (!s || s->conn->server || s->fd >= 0) {
            reset_close(cmd->fd);  /* ended (its end is queued), or not one waiting for a socket */
            break;
        }
        s->fd = cmd->fd;
        if (s->got_200)
            stream_start(s);
        else
            stream_peek(s);        /* on_response starts it */
        break;
    }
}

static void drain_cmds(struct nh_engine *e)
{
    uint64_t v;
    if (read(e->wake, &v, sizeof v) < 0) {
        /* EAGAIN: nothing new */
    }
    pthread_mutex_lock(&e->lock);
    struct cmd *list = e->cmd_head;
    e->cmd_head = e->cmd_tail = NULL;
    pthread_mutex_unlock(&e->lock);
    while (list) {
        struct cmd *next = list->next;
        run_cmd(e, list);
        free(list);
        list = next;
    }
}

static int queue_cmd(struct nh_engine *e, struct cmd *cmd)
{
    pthread_mutex_lock(&e->lock);
    if (e->stopped || e->stopping) {
        pthread_mutex_unlock(&e->lock);
        return -ESHUTDOWN;
    }
    if (e->cmd_tail)
        e->cmd_tail->next = cmd;
    else
        e->cmd_head = cmd;
    e->cmd_tail = cmd;
    pthread_mutex_unlock(&e->lock);
    uint64_t one = 1;
    if (write(e->wake, &one, sizeof one) < 0) {
        /* EAGAIN: already awake */
    }
    return 0;
}

/* --- listeners and out-routes (the source's side; see Listeners in hbone.h) ------------ */

/* struct na_origdst_key and struct na_origdst of bpf/nodeagent.h (capture/structs.py) */
struct origdst_key {
    uint64_t netns_cookie;
    uint16_t family;
    uint16_t client_port;          /* host order */
    uint32_t pad;
};

struct origdst {
    uint64_t netns_cookie;
    uint16_t family;
    uint16_t pad0;
    uint32_t addr[4];              /* network order; IPv4 in addr[0] */
    uint16_t port;                 /* network order */
    uint16_t pad1;
};

static long bpf_map_cmd(int cmd, int map_fd, const void *key, void *value)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_fd = (uint32_t)map_fd;
    attr.key = (uint64_t)(uintptr_t)key;
    attr.value = (uint64_t)(uintptr_t)value;
    return syscall(__NR_bpf, cmd, &attr, sizeof attr);
}

/* The original destination of the connection from `client_port`, read and deleted, into
 * r->dst (text; a v4-mapped IPv6 address as the IPv4 one it stands for) and r->dst_port. */
static bool pop_origdst(const struct listener *l, uint32_t client_port, struct routed *r)
{
    struct origdst_key key = {.netns_cookie = l->cookie, .family = l->family, .client_port = (uint16_t)client_port};
    struct origdst v;
    memset(&v, 0, sizeof v);
    if (bpf_map_cmd(BPF_MAP_LOOKUP_ELEM, l->map_fd, &key, &v) != 0)
        return false;
    bpf_map_cmd(BPF_MAP_DELETE_ELEM, l->map_fd, &key, NULL);
    const uint8_t *b = (const uint8_t *)v.addr;
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    const char *ok;
    if (v.family == AF_INET)
        ok = inet_ntop(AF_INET, b, r->dst, sizeof r->dst);
    else if (v.family == AF_INET6 && !memcmp(b, mapped, sizeof mapped))
        ok = inet_ntop(AF_INET, b + 12, r->dst, sizeof r->dst);
    else if (v.family == AF_INET6)
        ok = inet_ntop(AF_INET6, b, r->dst, sizeof r->dst);
    else
        ok = NULL;
    if (!ok) {
        r->dst[0] = 0;
        return false;
    }
    r->dst_port = ntohs(v.port);
    return true;
}

static void out_route_free(struct out_route *r)
{
    for (uint32_t i = 0; i < r->n; i++)
        free(r->ep[i].authority);
    free(r);
}

static struct out_route **out_route_find(struct listener *l, const char *ip, uint32_t port)
{
    struct out_route **pp = &l->routes;
    while (*pp && ((*pp)->port != port || strcmp((*pp)->ip, ip)))
        pp = &(*pp)->next;
    return pp;
}

/* Open a stream for accepted `fd` on the out-route of its destination: true when taken (the
 * stream owns fd), false when it goes to Python (r->tag, r->endpoint say where it missed). */
static bool route_out(struct listener *l, int fd, struct routed *r)
{
    struct nh_engine *e = l->e;
    struct out_route **pp = out_route_find(l, r->dst, r->dst_port), *route = *pp;
    if (!route)
        return false;
    if (route->gen != __atomic_load_n(&e->out_generation, __ATOMIC_ACQUIRE)) {
        *pp = route->next;         /* decided under what has changed since: Python decides again */
        l->nroutes--;
        out_route_free(route);
        return false;
    }
    uint32_t i = route->rr++ % route->n;
    r->tag = route->tag;
    r->endpoint = i;
    if (l->opened - l->seen >= l->room)
        return false;              /* the pod's connections: Python's to count (and refuse) */
    struct conn *c = route->ep[i].conn ? (struct conn *)hash_get(e, route->ep[i].conn, K_CONN) : NULL;
    if (!c || c->server || c->state != S_H2 || c->closing || c->draining || c->in_hs_list)
        return false;
    uint32_t most = nghttp2_session_get_remote_settings(c->h2, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
    if (c->nstreams >= MIN(most, e->cfg.max_streams))
        return false;
    struct stream *s = stream_alloc(e);
    struct routed *mine = s ? malloc(sizeof *mine) : NULL;
    char *authority = mine ? strdup(route->ep[i].authority) : NULL;
    if (!authority) {
        free(mine);
        if (s)
            stream_free(e, s);
        return false;
    }
    *mine = *r;
    mine->opened_ms = now_ms();
    s->routed = mine;
    s->authority = authority;
    s->answered = true;
    s->fd = fd;
    l->opened++;
    ST_ADD(e, streams_routed, 1);
    stream_link(c, s);
    submit_open(c, s);             /* with the client's first bytes, peeked (stream_peek) */
    return true;
}

static void listener_update(struct listener *l)
{
    uint32_t mask = l->closed || l->paused_until ? 0 : EPOLLIN;
    set_mask(l->e, l->fd, &l->o, &l->registered, &l->mask, mask);
}

static void listener_pause(struct listener *l, uint64_t until)
{
    if (!l->paused_until)
        l->e->npaused++;
    l->paused_until = until ? until : 1;
    listener_update(l);
}

static void listener_resume(struct listener *l)
{
    if (l->paused_until) {
        l->paused_until = 0;
        l->e->npaused--;
        listener_update(l);
    }
}

/* Accept what is queued (at most ACCEPT_BATCH a round, unless `all`): each connection goes
 * by its out-route, or to Python with its socket. */
static void listener_accept(struct listener *l, bool all)
{
    struct nh_engine *e = l->e;
    for (int i = 0; all || i < ACCEPT_BATCH; i++) {
        struct sockaddr_storage peer;
        socklen_t len = sizeof peer;
        int fd = accept4(l->fd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int err = errno;
            if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR || err == EBADF || err == EINVAL)
                return;
            bool pause = err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
            struct nh_event ev = {.type = NH_EV_ACCEPT_FAILED, .listener = l->o.id, .error = err,
                                  .how = pause ? ACCEPT_PAUSE_MS : 0, .endpoint = NH_NO_ENDPOINT};
            emit(e, &ev, NULL, 0);
            if (pause) {           /* the connection stays queued: retried after the pause */
                listener_pause(l, now_ms() + ACCEPT_PAUSE_MS);
                return;
            }
            continue;              /* that queued connection's own error: the next one */
        }
        ST_ADD(e, accepted, 1);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  /* as agent/nodelay.py */
        struct routed r;
        memset(&r, 0, sizeof r);
        r.listener = l->o.id;
        r.endpoint = NH_NO_ENDPOINT;
        r.client_port = ntohs(peer.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&peer)->sin6_port
                                                         : ((struct sockaddr_in *)&peer)->sin_port);
        if (pop_origdst(l, r.client_port, &r) && route_out(l, fd, &r))
            continue;
        struct nh_event ev = {.type = NH_EV_ACCEPTED, .fd = fd, .handed = 1};
        routed_fields(&ev, &r);
        emit(e, &ev, NULL, 0);
    }
}

static void listener_free(struct listener *l)
{
    struct nh_engine *e = l->e;
    listener_resume(l);
    l->closed = true;
    listener_update(l);
    if (l->fd >= 0)
        close(l->fd);
    if (l->map_fd >= 0)
        close(l->map_fd);
    l->fd = l->map_fd = -1;
    while (l->routes) {
        struct out_route *r = l->routes;
        l->routes = r->next;
        out_route_free(r);
    }
    l->nroutes = 0;
    if (l->lprev)
        l->lprev->lnext = l->lnext;
    else if (e->listeners == l)
        e->listeners = l->lnext;
    if (l->lnext)
        l->lnext->lprev = l->lprev;
    l->lprev = l->lnext = NULL;
    ST_ADD(e, listeners, -1);
    bury(e, &l->o);
}

static void expire_pauses(struct nh_engine *e, uint64_t now)
{
    if (!e->npaused)
        return;
    for (struct listener *l = e->listeners; l; l = l->lnext)
        if (l->paused_until && l->paused_until <= now)
            listener_resume(l);
}

static int pause_timeout(struct nh_engine *e, uint64_t now)
{
    int best = -1;
    if (!e->npaused)
        return best;
    for (struct listener *l = e->listeners; l; l = l->lnext)
        if (l->paused_until) {
            int until = l->paused_until <= now ? 0 : (int)(l->paused_until - now);
            best = best < 0 || until < best ? until : best;
        }
    return best;
}

static void cmd_listen(struct nh_engine *e, struct listener *l)
{
    hash_put(e, &l->o);
    l->lnext = e->listeners;
    if (e->listeners)
        e->listeners->lprev = l;
    e->listeners = l;
    ST_ADD(e, listeners, 1);
    listener_update(l);
}

struct out_route_cmd {
    uint64_t listener;
    struct out_route *route;       /* n == 0: remove */
};

static void cmd_out_route(struct nh_engine *e, struct cmd *cmd)
{
    struct out_route *route = cmd->ptr;
    struct listener *l = (struct listener *)hash_get(e, cmd->id, K_LISTENER);
    if (!l || route->gen != __atomic_load_n(&e->out_generation, __ATOMIC_ACQUIRE)) {
        out_route_free(route);
        return;
    }
    struct out_route **pp = out_route_find(l, route->ip, route->port), *old = *pp;
    if (old) {
        *pp = old->next;
        l->nroutes--;
        out_route_free(old);
    }
    if (!route->n || l->nroutes >= LISTENER_ROUTES) {
        out_route_free(route);
        return;
    }
    route->next = l->routes;
    l->routes = route;
    l->nroutes++;
}

/* Routed streams unanswered for open_timeout_ms (from tick()): reset, their sockets handed back. */
static void expire_opens(struct conn *c, uint64_t now)
{
    uint32_t limit = c->e->cfg.open_timeout_ms;
    if (!limit || c->server)
        return;
    for (struct stream *s = c->streams, *next; s; s = next) {
        next = s->next;
        if (s->routed && !s->got_200 && now - s->routed->opened_ms >= limit) {
            char reason[64];
            snprintf(reason, sizeof reason, "no answer to the CONNECT within %u ms", limit);
            stream_end(s, NH_END_TIMEOUT, ETIMEDOUT, 0, 0, reason);
        }
    }
}

/* --- the thread --------------------------------------------------------------------- */

static void expire_handshakes(struct nh_engine *e, uint64_t now)
{
    while (e->hs_head && e->hs_head->deadline <= now) {
        struct conn *c = e->hs_head;
        char reason[64];
        snprintf(reason, sizeof reason, "no TLS handshake within %u ms",
                 c->server || !e->cfg.client_handshake_timeout_ms ? e->cfg.handshake_timeout_ms
                                                                  : e->cfg.client_handshake_timeout_ms);
        conn_end(c, NH_END_TIMEOUT, ETIMEDOUT, 0, reason);
    }
}

/* The empty buffers of `c`'s streams that moved no byte since the last tick go back:
 * an idle keep-alive stream that once moved a large body held its stream_buffer (and
 * what it received) until it closed. */
static void release_idle_buffers(struct conn *c)
{
    struct nh_engine *e = c->e;
    for (struct stream *s = c->streams; s; s = s->next) {
        if (s->active) {
            s->active = false;
            continue;
        }
        struct buf *bufs[] = {&s->up, &s->down};
        for (size_t i = 0; i < 2; i++) {
            if (bufs[i]->cap && !buf_avail(bufs[i])) {
                /* counted before stream_buffers falls: a reader that sees it fall sees this */
                ST_ADD(e, buffers_released, 1);
                e->released_untrimmed += bufs[i]->cap;
                stream_buf_free(e, bufs[i]);
            }
        }
    }
}

/* Keepalive and idle (tunnel/liveness.py's): every tick_ms, PING connections not heard
 * from for keepalive_interval_ms, end those whose PING went unanswered for
 * keepalive_timeout_ms, and GOAWAY those without streams for their idle time; and the
 * idle streams' buffers go back (release_idle_buffers). */
static void tick(struct nh_engine *e, uint64_t now)
{
    if (!e->tick_ms || now < e->next_tick)
        return;
    e->next_tick = now + e->tick_ms;
    const struct nh_config *cfg = &e->cfg;
    for (struct conn *c = e->live_head, *next; c; c = next) {
        next = c->live_next;
        if (c->closing)
            continue;
        release_idle_buffers(c);
        if (cfg->keepalive_interval_ms) {
            if (c->ping_sent && now - c->ping_sent >= cfg->keepalive_timeout_ms) {
                char reason[64];
                snprintf(reason, sizeof reason, "no answer to PING within %u ms", cfg->keepalive_timeout_ms);
                conn_end(c, NH_END_KEEPALIVE, ETIMEDOUT, 0, reason);
                continue;
            }
            if (!c->ping_sent && now - c->last_heard >= cfg->keepalive_interval_ms
                && nghttp2_submit_ping(c->h2, NGHTTP2_FLAG_NONE, NULL) == 0) {
                c->ping_sent = now ? now : 1;
                mark_dirty(c);
            }
        }
        if (c->gathering && c->nstreams == 0 && c->idle_since && now - c->idle_since >= e->tick_ms
            && !buf_avail(&c->out) && !tls_pending(c))
            tls_direct_writes(c);
        expire_opens(c, now);
        if (c->o.dead)
            continue;
        uint32_t idle = c->server ? cfg->server_idle_ms : cfg->client_idle_ms;
        if (idle && !c->draining && c->nstreams == 0 && c->idle_since && now - c->idle_since >= idle) {
            c->draining = true;    /* no new streams; closed once the GOAWAY is out */
            nghttp2_submit_goaway(c->h2, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(c->h2),
                                  NGHTTP2_NO_ERROR, NULL, 0);
            mark_dirty(c);
        }
    }
    uint64_t gen = __atomic_load_n(&e->generation, __ATOMIC_ACQUIRE);
    for (struct conn *c = e->live_head; c; c = c->live_next)
        if (c->routes)
            routes_drop(c, gen, c->closing || c->draining);  /* stale routes' sockets closed within a tick */
    if (e->released_untrimmed >= TRIM_AFTER) {  /* freed chunks stay in malloc's arenas otherwise */
        malloc_trim(0);
        e->released_untrimmed = 0;
    }
}

static void flush_dirty(struct nh_engine *e)
{
    while (e->dirty) {
        struct conn *c = e->dirty;
        e->dirty = c->dnext;
        c->dirty = false;
        conn_flush(c);
    }
}

static void free_graveyard(struct nh_engine *e)
{
    while (e->graveyard) {
        struct obj *o = e->graveyard;
        e->graveyard = o->gnext;
        if (o->kind == K_CONN)
            conn_free((struct conn *)o);
        else if (o->kind == K_LINGER || o->kind == K_LISTENER)
            free(o);
        else
            stream_free(e, (struct stream *)o);
    }
}

static void end_everything(struct nh_engine *e)
{
    for (unsigned i = 0; i < BUCKETS; i++)
        while (e->buckets[i]) {
            struct obj *o = e->buckets[i];
            if (o->kind == K_CONN)
                conn_end((struct conn *)o, NH_END_STOPPED, 0, 0, "the engine stopped");
            else if (o->kind == K_LISTENER)
                listener_free((struct listener *)o);
            else
                stream_end((struct stream *)o, NH_END_STOPPED, 0, 0, 0, "the engine stopped");
        }
    free_graveyard(e);
}

/* At the stop, the sockets still lingering (a drained agent's last GOAWAYs) get the rest of
 * their time: the thread ends once each has read its peer's EOF or reached its deadline. */
static void linger_out(struct nh_engine *e)
{
    struct epoll_event evs[EVENTS];
    for (;;) {
        uint64_t now = now_ms();
        expire_lingering(e, now);
        free_graveyard(e);
        if (!e->lingering)
            return;
        int n = epoll_wait(e->ep, evs, EVENTS, (int)(e->lingering->deadline - now));
        if (n < 0 && errno != EINTR)
            break;
        for (int i = 0; i < n; i++) {
            struct obj *o = evs[i].data.ptr;
            uint64_t v;
            if (o->kind == K_LINGER && !o->dead)
                linger_read(e, (struct lingerer *)o);
            else if (o->kind == K_WAKE && read(e->wake, &v, sizeof v) < 0) {
                /* EAGAIN: commands after the stop are not run */
            }
        }
    }
    while (e->lingering)
        linger_end(e, e->lingering);
    free_graveyard(e);
}

static void *engine_main(void *arg)
{
    struct nh_engine *e = arg;
    struct epoll_event evs[EVENTS];
    for (;;) {
        pthread_mutex_lock(&e->lock);
        bool stopping = e->stopping;
        pthread_mutex_unlock(&e->lock);
        if (stopping)
            break;
        int timeout = -1;
        uint64_t now = now_ms();
        if (e->hs_head)
            timeout = e->hs_head->deadline <= now ? 0 : (int)(e->hs_head->deadline - now);
        if (e->lingering) {
            int until = e->lingering->deadline <= now ? 0 : (int)(e->lingering->deadline - now);
            timeout = timeout < 0 || until < timeout ? until : timeout;
        }
        if (e->tick_ms && e->live_head) {
            int until = e->next_tick <= now ? 0 : (int)(e->next_tick - now);
            timeout = timeout < 0 || until < timeout ? until : timeout;
        }
        int paused = pause_timeout(e, now);
        if (paused >= 0)
            timeout = timeout < 0 || paused < timeout ? paused : timeout;
        int n = epoll_wait(e->ep, evs, EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            ST_SET(e, fatal, errno);
            break;
        }
        for (int i = 0; i < n; i++) {
            struct obj *o = evs[i].data.ptr;
            if (o->kind == K_WAKE)
                drain_cmds(e);
            else if (o->dead)
                continue;
            else if (o->kind == K_CONN)
                conn_io((struct conn *)o, evs[i].events);
            else if (o->kind == K_LINGER)
                linger_read(e, (struct lingerer *)o);
            else if (o->kind == K_LISTENER)
                listener_accept((struct listener *)o, false);
            else
                stream_io((struct stream *)o, evs[i].events);
        }
        now = now_ms();
        expire_pauses(e, now);
        expire_handshakes(e, now);
        expire_lingering(e, now);
        tick(e, now);
        flush_dirty(e);
        free_graveyard(e);
    }
    drain_cmds(e);  /* what was queued before stop: its fds are closed below */
    end_everything(e);
    linger_out(e);
    return NULL;
}

/* --- the API ------------------------------------------------------------------------ */

static int check_config(const struct nh_config *c)
{
    if (!c || c->max_conns < 1 || c->max_conns > 65536 || c->max_streams < 1 || c->max_streams > 65536
        || c->stream_window < 65535 || c->stream_window > 0x7fffffff || c->connection_window < c->stream_window
        || c->connection_window > 0x7fffffff || c->max_frame_size < 16384 || c->max_frame_size > 16777215
        || c->stream_buffer < 4096 || c->stream_buffer > (64u << 20) || c->max_resets < 1
        || c->reset_window_ms < 1 || c->handshake_timeout_ms < 1 || c->max_pending_handshakes < 1
        || (c->keepalive_interval_ms && !c->keepalive_timeout_ms) || c->linger_ms > 60000)
        return -EINVAL;
    return 0;
}

/* How often tick() runs: half the shortest of its periods (as tunnel/liveness.py), 0: never. */
static uint32_t tick_period(const struct nh_config *c)
{
    uint32_t periods[] = {c->keepalive_interval_ms, c->keepalive_interval_ms ? c->keepalive_timeout_ms : 0,
                          c->client_idle_ms, c->server_idle_ms, STREAM_IDLE_MS};
    uint32_t best = 0;
    for (size_t i = 0; i < sizeof periods / sizeof periods[0]; i++)
        if (periods[i] && (!best || periods[i] / 2 < best))
            best = periods[i] / 2;
    return best ? (best < 5 ? 5 : best) : 0;
}

int nh_engine_new(const struct nh_config *config, struct nh_engine **out)
{
    int err = check_config(config);
    if (err)
        return err;
    struct nh_engine *e = calloc(1, sizeof *e);
    if (!e)
        return -ENOMEM;
    e->cfg = *config;
    e->tick_ms = tick_period(config);
    e->wake_obj.kind = K_WAKE;
    e->ep = epoll_create1(EPOLL_CLOEXEC);
    e->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->notify = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    pthread_mutex_init(&e->lock, NULL);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &e->wake_obj};
    if (e->ep < 0 || e->wake < 0 || e->notify < 0 || epoll_ctl(e->ep, EPOLL_CTL_ADD, e->wake, &ev) < 0) {
        err = -errno;
        nh_engine_free(e);
        return err;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    err = pthread_create(&e->thread, NULL, engine_main, e);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        nh_engine_free(e);
        return -err;
    }
    e->started = true;
    *out = e;
    return 0;
}

int nh_engine_notify_fd(const struct nh_engine *engine) { return engine->notify; }

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                       unsigned int inlen, void *arg)
{
    (void)ssl;
    (void)arg;
    for (unsigned i = 0; i + 1 <= inlen;) {
        unsigned len = in[i];
        if (i + 1 + len <= inlen && len == 2 && !memcmp(in + i + 1, "h2", 2)) {
            *out = in + i + 1;
            *outlen = 2;
            return SSL_TLSEXT_ERR_OK;
        }
        i += 1 + len;
    }
    return SSL_TLSEXT_ERR_NOACK;
}

int nh_tls_new(const char *key_chain_pem, size_t key_chain_len, const char *trust_pem, size_t trust_len,
               struct nh_tls **out, const char **err)
{
    const char *why = NULL;
    int rc = -EINVAL;
    SSL_CTX *ctx = SSL_CTX_new(TLS_method());
    BIO *bio = NULL;
    X509 *cert = NULL;
    EVP_PKEY *key = NULL;
    int n = 0;
    if (!ctx) {
        why = "cannot make an SSL_CTX";
        rc = -ENOMEM;
        goto fail;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                          | SSL_MODE_RELEASE_BUFFERS);
    /* Read what the socket holds, up to TLS_IN, at once: without read-ahead OpenSSL reads
     * each record with two read(2)s, its 5-byte header and then its body. What it reads
     * past the record it returns stays in its buffer, where epoll does not see it; conn_read
     * reads until WANT_READ, and is called wherever reading starts (handshake done,
     * verdict), so nothing is left there. */
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, TLS_IN);
    SSL_CTX_set_alpn_protos(ctx, (const unsigned char *)"\x02h2", 3);
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    bio = BIO_new_mem_buf(trust_pem, (int)trust_len);
    while (bio && (cert = PEM_read_bio_X509(bio, NULL, NULL, NULL))) {
        X509_STORE_add_cert(store, cert);
        X509_free(cert);
        n++;
    }
    BIO_free(bio);
    if (n == 0) {
        why = "the trust bundle holds no PEM certificate";
        goto fail;
    }
    bio = BIO_new_mem_buf(key_chain_pem, (int)key_chain_len);
    key = bio ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    if (!key) {
        why = "the key and chain PEM holds no (unencrypted) private key";
        goto fail;
    }
    bio = BIO_new_mem_buf(key_chain_pem, (int)key_chain_len);
    n = 0;
    while (bio && (cert = PEM_read_bio_X509(bio, NULL, NULL, NULL))) {
        if (n++ == 0) {
            SSL_CTX_use_certificate(ctx, cert);
            X509_free(cert);
        } else {
            SSL_CTX_add0_chain_cert(ctx, cert);
        }
    }
    BIO_free(bio);
    if (n == 0) {
        why = "the key and chain PEM holds no certificate";
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey(ctx, key) != 1 || SSL_CTX_check_private_key(ctx) != 1) {
        why = "the private key is not the certificate's";
        goto fail;
    }
    EVP_PKEY_free(key);
    ERR_clear_error();
    struct nh_tls *t = calloc(1, sizeof *t);
    if (!t) {
        SSL_CTX_free(ctx);
        return -ENOMEM;
    }
    t->ctx = ctx;
    *out = t;
    return 0;
fail:
    ERR_clear_error();
    EVP_PKEY_free(key);
    SSL_CTX_free(ctx);
    if (err)
        *err = why;
    return rc;
}

void nh_tls_free(struct nh_tls *tls)
{
    if (tls) {
        SSL_CTX_free(tls->ctx);
        free(tls);
    }
}

/* A connection conn_new reserved room for and did not hand to the thread: fd reset, the
 * reservations (and the pending handshake) given back; c may be NULL (not allocated). */
static void conn_unmade(struct nh_engine *e, struct conn *c, int fd, bool server)
{
    if (server) {
        pthread_mutex_lock(&e->lock);
        e->pending_hs--;
        pthread_mutex_unlock(&e->lock);
        ST_ADD(e, handshakes_pending, -1);
    }
    if (c) {
        c->pending_hs = false;
        conn_free(c);  /* resets fd, gives back conns_reserved */
        return;
    }
    reset_close(fd);
    pthread_mutex_lock(&e->lock);
    e->conns_reserved--;
    pthread_mutex_unlock(&e->lock);
}

static int64_t conn_new(struct nh_engine *e, int fd, struct nh_tls *tls, const char *expected, bool server)
{
    if (fd < 0)
        return -EBADF;
    int type = 0;
    socklen_t len = sizeof type;
    if (!tls || (!server && (!expected || !*expected))) {
        reset_close(fd);
        return -EINVAL;
    }
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_STREAM) {
        int err = type ? EPROTOTYPE : errno;
        reset_close(fd);
        return -err;
    }
    pthread_mutex_lock(&e->lock);
    int err = e->stopped || e->stopping ? -ESHUTDOWN
              : e->conns_reserved >= e->cfg.max_conns ? -ENOSPC
              : server && e->pending_hs >= e->cfg.max_pending_handshakes ? -EBUSY : 0;
    if (!err) {
        e->conns_reserved++;
        if (server) {
            e->pending_hs++;
            ST_ADD(e, handshakes_pending, 1);
        }
    }
    pthread_mutex_unlock(&e->lock);
    if (err) {
        reset_close(fd);
        return err;
    }
    struct conn *c = calloc(1, sizeof *c);
    struct cmd *cmd = calloc(1, sizeof *cmd);
    if (c) {
        c->e = e;
        c->fd = fd;
        c->server = server;
        c->pending_hs = server;
        c->state = S_HANDSHAKE;
        c->o.kind = K_CONN;
        c->o.id = __atomic_add_fetch(&e->next_id, 1, __ATOMIC_RELAXED);
        c->ssl = SSL_new(tls->ctx);
        c->expected = expected ? strdup(expected) : NULL;
    }
    if (!c || !cmd || !c->ssl || (expected && !c->expected) || !SSL_set_fd(c->ssl, fd)) {
        free(cmd);
        conn_unmade(e, c, fd, server);
        return -ENOMEM;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    BIO *rbio = SSL_get_rbio(c->ssl);
    BIO_set_callback_ex(rbio, sock_read_seen);
    BIO_set_callback_arg(rbio, (char *)c);
    if (server)
        SSL_set_accept_state(c->ssl);
    else
        SSL_set_connect_state(c->ssl);
    int64_t id = (int64_t)c->o.id;
    cmd->op = server ? OP_SERVER : OP_CLIENT;
    cmd->ptr = c;
    if ((err = queue_cmd(e, cmd)) < 0) {
        free(cmd);
        conn_unmade(e, c, fd, server);
        return err;
    }
    return id;
}

int64_t nh_conn_client(struct nh_engine *engine, int fd, struct nh_tls *tls, const char *expected)
{
    return conn_new(engine, fd, tls, expected, false);
}

int64_t nh_conn_server(struct nh_engine *engine, int fd, struct nh_tls *tls)
{
    return conn_new(engine, fd, tls, NULL, true);
}

static int simple_cmd(struct nh_engine *e, enum op op, uint64_t id, int fd, uint32_t arg)
{
    struct cmd *cmd = calloc(1, sizeof *cmd);
    if (!cmd) {
        if (fd >= 0)
            reset_close(fd);
        return -ENOMEM;
    }
    *cmd = (struct cmd){.op = op, .id = id, .fd = fd, .arg = arg};
    int err = queue_cmd(e, cmd);
    if (err < 0) {
        free(cmd);
        if (fd >= 0)
            reset_close(fd);
    }
    return err;
}

static int stream_fd_ok(int fd)
{
    int type = 0;
    socklen_t len = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
        return -errno;
    if (type != SOCK_STREAM)
        return -EPROTOTYPE;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return 0;
}

int nh_conn_verdict(struct nh_engine *engine, uint64_t conn, int accept)
{
    return simple_cmd(engine, OP_VERDICT, conn, -1, accept != 0);
}

int nh_conn_close(struct nh_engine *engine, uint64_t conn, int abort)
{
    return simple_cmd(engine, OP_CLOSE, conn, -1, abort != 0);
}

int64_t nh_stream_open(struct nh_engine *e, uint64_t conn, int fd, const char *authority, const char *headers,
                       size_t headers_len)
{
    if (fd < -1)
        return -EBADF;
    int err = authority && *authority && (headers_len == 0 || headers[headers_len - 1] == 0)
                  ? (fd == -1 ? 0 : stream_fd_ok(fd))
                  : -EINVAL;
    if (err) {
        reset_close(fd);
        return err;
    }
    struct stream *s = stream_alloc(e);
    struct cmd *cmd = calloc(1, sizeof *cmd);
    if (s) {
        s->authority = strdup(authority);
        s->hdrs = headers_len ? malloc(headers_len) : NULL;
        if (s->hdrs)
            memcpy(s->hdrs, headers, headers_len);
        s->hdrs_len = headers_len;
        s->answered = true;
    }
    if (!s || !cmd || !s->authority || (headers_len && !s->hdrs)) {
        if (s)
            stream_free(e, s);
        free(cmd);
        reset_close(fd);
        return -ENOMEM;
    }
    int64_t id = (int64_t)s->o.id;
    *cmd = (struct cmd){.op = OP_OPEN, .id = conn, .fd = fd, .ptr = s};
    if ((err = queue_cmd(e, cmd)) < 0) {
        stream_free(e, s);
        free(cmd);
        reset_close(fd);
        return err;
    }
    return id;
}

/* A stream's socket handed over (accept, attach): checked, then queued; owned either way. */
static int stream_fd_cmd(struct nh_engine *engine, enum op op, uint64_t stream, int fd)
{
    if (fd < 0)
        return -EBADF;
    int err = stream_fd_ok(fd);
    if (err) {
        reset_close(fd);
        return err;
    }
    return simple_cmd(engine, op, stream, fd, 0);
}

int nh_stream_accept(struct nh_engine *engine, uint64_t stream, int fd)
{
    return stream_fd_cmd(engine, OP_ACCEPT, stream, fd);
}

int nh_stream_attach(struct nh_engine *engine, uint64_t stream, int fd)
{
    return stream_fd_cmd(engine, OP_ATTACH, stream, fd);
}

int nh_conn_route(struct nh_engine *e, uint64_t conn, const char *authority, const char *ip, uint32_t port,
                  const int *fds, uint32_t nfds, uint64_t generation)
{
    if (!fds || nfds == 0)
        return -EBADF;
    for (uint32_t i = 0; i < nfds; i++)
        if (fds[i] < 0)
            return -EBADF;
    struct sockaddr_storage dst = {0};
    socklen_t dstlen = 0;
    int err = authority && *authority && strlen(authority) < MAX_URI && ip && port && port < 65536 ? 0 : -EINVAL;
    for (uint32_t i = 0; !err && i < nfds; i++)
        err = stream_fd_ok(fds[i]);
    if (!err) {
        struct sockaddr_in *v4 = (struct sockaddr_in *)&dst;
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&dst;
        if (inet_pton(AF_INET, ip, &v4->sin_addr) == 1) {
            v4->sin_family = AF_INET;
            v4->sin_port = htons((uint16_t)port);
            dstlen = sizeof *v4;
        } else if (inet_pton(AF_INET6, ip, &v6->sin6_addr) == 1) {
            v6->sin6_family = AF_INET6;
            v6->sin6_port = htons((uint16_t)port);
            dstlen = sizeof *v6;
        } else {
            err = -EINVAL;
        }
    }
    struct route_cmd *rc = err ? NULL : calloc(1, sizeof *rc + strlen(authority) + 1);
    struct cmd *cmd = rc ? calloc(1, sizeof *cmd) : NULL;
    if (!err && !cmd)
        err = -ENOMEM;
    uint32_t taken = 0;
    if (!err) {
        rc->gen = generation;
        rc->dst = dst;
        rc->dstlen = dstlen;
        rc->nfds = taken = MIN(nfds, ROUTE_SOCKETS);  /* a route holds no more: the rest closed below */
        memcpy(rc->fds, fds, taken * sizeof *fds);
        strcpy(rc->authority, authority);
        *cmd = (struct cmd){.op = OP_ROUTE, .id = conn, .fd = -1, .ptr = rc};
        err = queue_cmd(e, cmd);
    }
    if (err) {
        free(rc);
        free(cmd);
        taken = 0;
    }
    for (uint32_t i = taken; i < nfds; i++)
        close(fds[i]);
    return err;
}

void nh_engine_generation(struct nh_engine *e, uint64_t generation)
{
    __atomic_store_n(&e->generation, generation, __ATOMIC_RELEASE);
}

int64_t nh_listen(struct nh_engine *e, int fd, int map_fd, uint64_t netns_cookie)
{
    if (fd < 0) {
        if (map_fd >= 0)
            close(map_fd);
        return -EBADF;
    }
    int listening = 0;
    socklen_t len = sizeof listening;
    struct sockaddr_storage local;
    socklen_t llen = sizeof local;
    int err = 0;
    if (map_fd < 0)
        err = -EBADF;
    else if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) < 0
             || getsockname(fd, (struct sockaddr *)&local, &llen) < 0)
        err = -errno;
    else if (!listening || (local.ss_family != AF_INET && local.ss_family != AF_INET6))
        err = -EINVAL;
    struct listener *l = err ? NULL : calloc(1, sizeof *l);
    struct cmd *cmd = l ? calloc(1, sizeof *cmd) : NULL;
    if (!err && !cmd)
        err = -ENOMEM;
    if (err) {
        free(l);
        close(fd);
        if (map_fd >= 0)
            close(map_fd);
        return err;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    l->o.kind = K_LISTENER;
    l->o.id = __atomic_add_fetch(&e->next_id, 1, __ATOMIC_RELAXED);
    l->e = e;
    l->fd = fd;
    l->map_fd = map_fd;
    l->cookie = netns_cookie;
    l->family = local.ss_family;
    int64_t id = (int64_t)l->o.id;
    *cmd = (struct cmd){.op = OP_LISTEN, .id = l->o.id, .fd = -1, .ptr = l};
    if ((err = queue_cmd(e, cmd)) < 0) {
        free(cmd);
        free(l);
        close(fd);
        close(map_fd);
        return err;
    }
    return id;
}

int nh_listen_close(struct nh_engine *engine, uint64_t listener, int accept_queued)
{
    return simple_cmd(engine, OP_LISTEN_CLOSE, listener, -1, accept_queued != 0);
}

int nh_listen_room(struct nh_engine *e, uint64_t listener, uint32_t room, uint64_t seen)
{
    uint64_t *arg = malloc(2 * sizeof *arg);
    struct cmd *cmd = arg ? calloc(1, sizeof *cmd) : NULL;
    if (!cmd) {
        free(arg);
        return -ENOMEM;
    }
    arg[0] = room == UINT32_MAX ? UINT64_MAX : room;
    arg[1] = seen;
    *cmd = (struct cmd){.op = OP_LISTEN_ROOM, .id = listener, .fd = -1, .ptr = arg};
    int err = queue_cmd(e, cmd);
    if (err < 0) {
        free(arg);
        free(cmd);
    }
    return err;
}

int nh_out_route(struct nh_engine *e, uint64_t listener, const char *ip, uint32_t port, const uint64_t *conns,
                 const char *authorities, size_t authorities_len, uint32_t n, uint64_t tag, uint64_t generation)
{
    unsigned char probe[sizeof(struct in6_addr)];
    if (!ip || strlen(ip) >= sizeof((struct out_route *)0)->ip || !port || port > 65535 || n > 4096
        || (n && (!conns || !authorities || !authorities_len || authorities[authorities_len - 1]))
        || (inet_pton(AF_INET, ip, probe) != 1 && inet_pton(AF_INET6, ip, probe) != 1))
        return -EINVAL;
    struct out_route *r = calloc(1, sizeof *r + n * sizeof r->ep[0]);
    if (!r)
        return -ENOMEM;
    strcpy(r->ip, ip);
    r->port = port;
    r->gen = generation;
    r->tag = tag;
    const char *a = authorities, *end = authorities + authorities_len;
    for (uint32_t i = 0; i < n; i++) {
        size_t alen = a < end ? strnlen(a, (size_t)(end - a)) : 0;
        if (a >= end || !alen || alen >= MAX_URI || a + alen >= end) {
            out_route_free(r);
            return -EINVAL;
        }
        r->ep[i].conn = conns[i];
        if (!(r->ep[i].authority = strdup(a))) {
            out_route_free(r);
            return -ENOMEM;
        }
        r->n = i + 1;
        a += alen + 1;
    }
    struct cmd *cmd = calloc(1, sizeof *cmd);
    if (!cmd) {
        out_route_free(r);
        return -ENOMEM;
    }
    *cmd = (struct cmd){.op = OP_OUT_ROUTE, .id = listener, .fd = -1, .ptr = r};
    int err = queue_cmd(e, cmd);
    if (err < 0) {
        out_route_free(r);
        free(cmd);
    }
    return err;
}

void nh_out_generation(struct nh_engine *e, uint64_t generation)
{
    __atomic_store_n(&e->out_generation, generation, __ATOMIC_RELEASE);
}

int nh_stream_refuse(struct nh_engine *engine, uint64_t stream, uint32_t status)
{
    if (status && (status < 100 || status > 999))
        return -EINVAL;
    return simple_cmd(engine, OP_REFUSE, stream, -1, status);
}

int nh_stream_reset(struct nh_engine *engine, uint64_t stream)
{
    return simple_cmd(engine, OP_RESET, stream, -1, 0);
}

size_t nh_engine_events(struct nh_engine *e, struct nh_event *out, size_t max)
{
    size_t n = 0;
    pthread_mutex_lock(&e->lock);
    while (n < max && e->ev_head) {
        struct evnode *node = e->ev_head;
        e->ev_head = node->next;
        if (!e->ev_head)
            e->ev_tail = NULL;
        out[n++] = node->ev;
        free(node);
        ST_ADD(e, events_queued, -1);
    }
    pthread_mutex_unlock(&e->lock);
    return n;
}

void nh_event_release(struct nh_event *event)
{
    free(event->data);
    event->data = NULL;
    event->data_len = 0;
}

const char *nh_tls_library(void)
{
    return OpenSSL_version(OPENSSL_VERSION);
}

void nh_engine_stats(struct nh_engine *e, struct nh_stats *out)
{
    uint64_t *dst = (uint64_t *)out, *src = (uint64_t *)&e->st;
    for (size_t i = 0; i < offsetof(struct nh_stats, fatal) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_ACQUIRE);
    out->fatal = __atomic_load_n(&e->st.fatal, __ATOMIC_ACQUIRE);
    out->pad = 0;
}

void nh_engine_stop(struct nh_engine *e)
{
    pthread_mutex_lock(&e->lock);
    bool join = e->started && !e->stopped;
    e->stopping = true;
    pthread_mutex_unlock(&e->lock);
    if (join) {
        uint64_t one = 1;
        if (write(e->wake, &one, sizeof one) < 0) {
            /* already awake */
        }
        pthread_join(e->thread, NULL);
    }
    pthread_mutex_lock(&e->lock);
    e->stopped = true;
    pthread_mutex_unlock(&e->lock);
}

void nh_engine_free(struct nh_engine *e)
{
    if (!e)
        return;
    nh_engine_stop(e);
    struct nh_event ev;
    while (nh_engine_events(e, &ev, 1))
        nh_event_release(&ev);
    if (e->ep >= 0)
        close(e->ep);
    if (e->wake >= 0)
        close(e->wake);
    if (e->notify >= 0)
        close(e->notify);
    pthread_mutex_destroy(&e->lock);
    free(e);
}
