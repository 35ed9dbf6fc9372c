/* hbone_fuzz.c - peers speaking garbage to native/hbone.c, for the sanitizers
 * (tests/unit/test_native_hbone.py builds it with ASan+LSan+UBSan and runs it).
 *
 * Usage: hbone_fuzz SERVER_PEM CLIENT_PEM TRUST_PEM SERVER_URI SEED ROUNDS
 * One engine with small limits (8 streams a connection, 20 resets, 64 KiB windows, budgets
 * of 1 MiB, short timeouts). Each round is one connection from a peer holding a valid
 * certificate, the bytes it sends drawn from SEED:
 *   - to the engine's server side: bytes before TLS, or TLS then bytes, or TLS then the
 *     HTTP/2 preface and frames of every type with random flags, stream ids, lengths
 *     (declared and real disagreeing now and then), paddings, SETTINGS, window increments,
 *     and HEADERS that are well-formed HPACK of CONNECTs with authorities and headers an
 *     attacker would try (no port, port 0 or 99999, NUL, CRLF, IPv6, 20 KB values, pseudo
 *     headers twice or out of order) or random HPACK; the harness answers every request
 *     (accepts with a socket, refuses with a random status, late) and gives routes for
 *     some authorities, moving the generation now and then, so CONNECTs are delivered by
 *     the engine too; the apps write, half-close, close and reset at random;
 *   - to its client side: streams opened (some with the socket attached later) on a
 *     connection to a TLS server that answers with frames drawn the same way (HEADERS of
 *     random :status values and headers, DATA, RST_STREAM, GOAWAY, PUSH_PROMISE...).
 * Every round ends by a close, a reset, a TLS close_notify, or leaving the connection to
 * the engine's timeouts. Then everything is closed and the engine must end: every
 * connection handed to it ends exactly once, every stream it announced (REQUEST, DELIVERED)
 * or opened ends exactly once, nothing stays open or held, no route socket is left. Any
 * sanitizer report, leak at exit, hang (a global deadline) or broken rule fails the run.
 * Prints "hbone_fuzz: ok" and the counts, and exits 0, or says what failed and exits 1.
 */
#define _GNU_SOURCE
#include "hbone.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "hbone_fuzz: line %d: ", __LINE__); \
    fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } } while (0)

#define MAX_IDS 16384
#define MAX_APPS 512
#define MAX_PENDING 256

static struct nh_engine *E;
static struct nh_tls *server_tls, *client_tls;
static uint64_t rng;
static double deadline;

/* Ends seen per connection and stream id (ids are engine-wide counters, small here). */
static unsigned char conn_handed[MAX_IDS], conn_ended[MAX_IDS];
static unsigned char stream_known[MAX_IDS], stream_ended[MAX_IDS];
static unsigned long n_routes, n_requests, n_delivered, n_refused_by_engine, n_opened, n_events;

/* The apps' ends of streams (accepted, delivered, opened): random writes, FIN, close, RST. */
static int apps[MAX_APPS], napps;
/* Requests not answered yet (answered late, or at the end). */
static uint64_t pending[MAX_PENDING];
static int npending;
static int app_listener;                  /* where routes deliver */
static uint32_t app_port;
static uint64_t generation = 1;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

static uint32_t below(uint32_t n) { return n ? rnd() % n : 0; }

static void random_bytes(unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)rnd();
}

static void nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static void reset_close(int fd)
{
    struct linger l = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close(fd);
}

static int tcp_listener(uint32_t *port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(l >= 0 && bind(l, (void *)&a, sizeof a) == 0 && listen(l, 256) == 0
          && getsockname(l, (void *)&a, &len) == 0, "listener: %s", strerror(errno));
    if (port)
        *port = ntohs(a.sin_port);
    return l;
}

/* Both ends of a new loopback TCP connection. */
static void tcp_pair(int *mine, int *theirs)
{
    uint32_t port;
    int l = tcp_listener(&port);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK), .sin_port = htons(port)};
    *mine = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(*mine, (void *)&a, sizeof a) == 0, "pair connect: %s", strerror(errno));
    *theirs = accept(l, NULL, NULL);
    CHECK(*theirs >= 0, "pair accept: %s", strerror(errno));
    close(l);
    nonblock(*mine);
}

static void keep_app(int fd)
{
    if (napps == MAX_APPS) {        /* the oldest goes, reset */
        reset_close(apps[0]);
        memmove(apps, apps + 1, sizeof apps[0] * (MAX_APPS - 1));
        napps--;
    }
    apps[napps++] = fd;
}

/* One random thing an app does. */
static void poke_app(void)
{
    if (!napps)
        return;
    int i = (int)below((uint32_t)napps), fd = apps[i];
    unsigned char buf[8192];
    switch (below(8)) {
    case 0:
    case 1:
    case 2:
        random_bytes(buf, sizeof buf);
        if (write(fd, buf, 1 + below(sizeof buf)) < 0) { /* full or gone: fine */ }
        return;
    case 3:
        shutdown(fd, SHUT_WR);
        return;
    case 4:
    case 5:
        while (read(fd, buf, sizeof buf) > 0) { /* drain */ }
        return;
    case 6:
        close(fd);
        break;
    default:
        reset_close(fd);
    }
    apps[i] = apps[--napps];
}

static void answer(uint64_t stream)
{
    static const uint32_t statuses[] = {0, 400, 403, 404, 503, 200, 100, 999, 1, 65535};
    if (below(3) == 0) {
        int r = nh_stream_refuse(E, stream, statuses[below(sizeof statuses / sizeof statuses[0])]);
        CHECK(r == 0 || r == -EINVAL, "nh_stream_refuse: %d", r);
        if (r == 0)
            return;               /* a status it does not send: accepted instead */
    }
    int mine, theirs;
    tcp_pair(&mine, &theirs);
    int r = nh_stream_accept(E, stream, theirs);
    CHECK(r == 0, "nh_stream_accept: %d", r);
    keep_app(mine);
}

static void ended(unsigned char *table, uint64_t id, const char *what)
{
    CHECK(id > 0 && id < MAX_IDS, "%s id %lu out of range", what, (unsigned long)id);
    CHECK(!table[id], "%s %lu ended twice", what, (unsigned long)id);
    table[id] = 1;
}

/* Take the engine's events and answer what it asks. */
static void pump(int timeout_ms)
{
    CHECK(now() < deadline, "the run did not end in time");
    struct pollfd p[2] = {{.fd = nh_engine_notify_fd(E), .events = POLLIN}, {.fd = app_listener, .events = POLLIN}};
    poll(p, 2, timeout_ms);
    int fd;
    while ((fd = accept4(app_listener, NULL, NULL, SOCK_NONBLOCK)) >= 0)
        keep_app(fd);
    uint64_t v;
    if (read(p[0].fd, &v, sizeof v) < 0) { /* nothing queued */ }
    struct nh_event batch[64];
    size_t n;
    while ((n = nh_engine_events(E, batch, 64)) > 0)
        for (size_t i = 0; i < n; i++) {
            struct nh_event *ev = &batch[i];
            n_events++;
            switch (ev->type) {
            case NH_EV_CONN_UP:
                CHECK(ev->conn < MAX_IDS && conn_handed[ev->conn], "CONN_UP of an unknown connection");
                nh_conn_verdict(E, ev->conn, below(10) != 0);  /* the client side's CONN_UP: ignored */
                break;
            case NH_EV_CONN_END:
                ended(conn_ended, ev->conn, "connection");
                break;
            case NH_EV_REQUEST:
                CHECK(ev->stream < MAX_IDS && !stream_known[ev->stream], "REQUEST for a known stream");
                CHECK(ev->data_len > 11 && !strcmp(ev->data, ":authority"), "a request without :authority first");
                stream_known[ev->stream] = 1;
                n_requests++;
                if (below(4) == 0 && npending < MAX_PENDING)
                    pending[npending++] = ev->stream;
                else
                    answer(ev->stream);
                if (below(2) == 0) {
                    int fds[3], k = 1 + (int)below(3);
                    for (int j = 0; j < k; j++)
                        fds[j] = socket(AF_INET, SOCK_STREAM, 0);
                    int r = nh_conn_route(E, ev->conn, ev->data + 11, "127.0.0.1", app_port, fds, (uint32_t)k,
                                          generation);
                    CHECK(r == 0 || r == -EINVAL, "nh_conn_route: %d", r);
                    n_routes += r == 0;
                    if (r == -EINVAL)      /* an authority the engine will not route: not taken */
                        for (int j = 0; j < k; j++)
                            close(fds[j]);
                }
                break;
            case NH_EV_DELIVERED:
                CHECK(ev->stream < MAX_IDS && !stream_known[ev->stream], "DELIVERED for a known stream");
                CHECK(ev->data_len > 11 && !strcmp(ev->data, ":authority"), "delivered without :authority first");
                CHECK(ev->tag <= generation, "delivered under generation %lu, newer than any given",
                      (unsigned long)ev->tag);
                stream_known[ev->stream] = 1;
                n_delivered++;
                break;
            case NH_EV_REFUSED:
                n_refused_by_engine++;
                break;
            case NH_EV_REQUEST_RESET:
                CHECK(ev->stream < MAX_IDS && stream_known[ev->stream], "REQUEST_RESET of an unknown stream");
                break;
            case NH_EV_STREAM_END:
                CHECK(ev->stream < MAX_IDS && stream_known[ev->stream],
                      "the end of a stream never announced: %lu how %u code %u %.*s", (unsigned long)ev->stream,
                      ev->how, ev->code, (int)ev->data_len, ev->data ? ev->data : "");
                ended(stream_ended, ev->stream, "stream");
                CHECK(!ev->handed, "a socket handed back without a listener");
                break;
            case NH_EV_RESPONSE:
                CHECK(ev->stream < MAX_IDS && stream_known[ev->stream], "RESPONSE of an unknown stream");
                break;
            default:
                CHECK(0, "unexpected event %u", ev->type);
            }
            nh_event_release(ev);
        }
}

/* The server's ALPN: h2 when offered, now and then nothing. */
static int select_h2(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                     unsigned int inlen, void *arg)
{
    (void)ssl;
    (void)arg;
    if (below(20) == 0)
        return SSL_TLSEXT_ERR_NOACK;
    for (unsigned i = 0; i + 1 < inlen && i + 1 + in[i] <= inlen; i += 1u + in[i])
        if (in[i] == 2 && !memcmp(in + i + 1, "h2", 2)) {
            *out = in + i + 1;
            *outlen = 2;
            return SSL_TLSEXT_ERR_OK;
        }
    return SSL_TLSEXT_ERR_NOACK;
}

/* A peer's TLS: blocking-free, every step within 2 s of the run's clock (pumping meanwhile). */
static SSL_CTX *peer_ctx(const char *key_chain, const char *trust, int server)
{
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    CHECK(ctx && SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION)
          && SSL_CTX_use_certificate_chain_file(ctx, key_chain) == 1
          && SSL_CTX_use_PrivateKey_file(ctx, key_chain, SSL_FILETYPE_PEM) == 1
          && SSL_CTX_load_verify_locations(ctx, trust, NULL) == 1, "peer TLS context");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    if (server) {
        SSL_CTX_set_alpn_select_cb(ctx, select_h2, NULL);
    } else {
        static const unsigned char alpn[] = "\x02h2";
        SSL_CTX_set_alpn_protos(ctx, alpn, sizeof alpn - 1);
    }
    return ctx;
}

/* Wait for fd's readiness for an SSL call that wants it; 0 once the step's time is up. */
static int ssl_wait(SSL *ssl, int r, int fd, double until)
{
    int e = SSL_get_error(ssl, r);
    if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
        return 0;
    if (now() > until)
        return 0;
    struct pollfd p = {.fd = fd, .events = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT};
    poll(&p, 1, 2);
    pump(0);
    return 1;
}

static int handshake(SSL *ssl, int fd, int server)
{
    double until = now() + 2;
    for (;;) {
        int r = server ? SSL_accept(ssl) : SSL_connect(ssl);
        if (r == 1)
            return 1;
        if (!ssl_wait(ssl, r, fd, until))
            return 0;
    }
}

/* Read and drop what the engine sent; 0 once it closed. */
static int drain(SSL *ssl)
{
    unsigned char buf[16384];
    for (int i = 0; i < 64; i++) {
        int r = SSL_read(ssl, buf, sizeof buf);
        if (r > 0)
            continue;
        int e = SSL_get_error(ssl, r);
        ERR_clear_error();
        return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE;
    }
    return 1;
}

static int send_all(SSL *ssl, int fd, const unsigned char *p, size_t n)
{
    double until = now() + 2;
    while (n) {
        int r = SSL_write(ssl, p, (int)n);
        if (r > 0) {
            p += r;
            n -= (size_t)r;
            continue;
        }
        if (SSL_get_error(ssl, r) == SSL_ERROR_WANT_WRITE)
            drain(ssl);     /* the engine may wait for us to read before it reads */
        if (!ssl_wait(ssl, r, fd, until)) {
            ERR_clear_error();
            return 0;
        }
    }
    return 1;
}

/* HPACK: literal header fields without indexing, names and values as they are. */
static size_t hp_int(unsigned char *out, unsigned prefix_bits, unsigned char first, size_t v)
{
    size_t max = (1u << prefix_bits) - 1, n = 0;
    if (v < max) {
        out[n++] = (unsigned char)(first | v);
        return n;
    }
    out[n++] = (unsigned char)(first | max);
    v -= max;
    while (v >= 128) {
        out[n++] = (unsigned char)(v % 128 + 128);
        v /= 128;
    }
    out[n++] = (unsigned char)v;
    return n;
}

static size_t hp_field(unsigned char *out, const char *name, size_t nl, const char *value, size_t vl)
{
    size_t n = 0;
    out[n++] = 0x00;                      /* literal without indexing, new name */
    n += hp_int(out + n, 7, 0x00, nl);
    memcpy(out + n, name, nl);
    n += nl;
    n += hp_int(out + n, 7, 0x00, vl);
    memcpy(out + n, value, vl);
    return n + vl;
}

static size_t hp(unsigned char *out, const char *name, const char *value)
{
    return hp_field(out, name, strlen(name), value, strlen(value));
}

static const char *const authorities[] = {
    "10.0.0.1:80", "10.0.0.2:8080", "[::1]:80", "[fd00::1]:15008", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:99999",
    "10.0.0.1:-1", "10.0.0.1:80x", ":80", "", "host.example:80", "10.0.0.1:80\r\nx: y", "[::1", "::1:80",
    "10.0.0.1:080", "300.0.0.1:80", "10.0.0.1:65535", "10.0.0.1 :80", "%00:80",
};

/* A HEADERS block: a CONNECT as a client would send it, broken in a random way, or a
 * response (`response`), or random bytes. */
static size_t header_block(unsigned char *out, size_t cap, int response)
{
    static char big[20001];
    if (!big[0])
        memset(big, 'v', sizeof big - 1);
    size_t n = 0;
    switch (below(10)) {
    case 0: {                                 /* random HPACK */
        size_t k = below(200);
        random_bytes(out, k);
        return k;
    }
    case 1:                                   /* a dynamic table size update, then indexed fields */
        n += hp_int(out + n, 5, 0x20, below(8192));
        out[n++] = (unsigned char)(0x80 | below(128));
        out[n++] = (unsigned char)(0x80 | below(128));
        return n;
    default:
        break;
    }
    if (response) {
        static const char *const statuses[] = {"200", "200", "403", "503", "20", "abc", "", "099", "2000", "100"};
        n += hp(out + n, ":status", statuses[below(10)]);
    } else {
        static const char *const methods[] = {"CONNECT", "CONNECT", "CONNECT", "GET", "", "connect"};
        int order = (int)below(4);
        if (order == 0)
            n += hp(out + n, "baggage", "k8s.pod.name=x");   /* a regular header before the pseudo ones */
        n += hp(out + n, ":method", methods[below(6)]);
        const char *auth = authorities[below(sizeof authorities / sizeof authorities[0])];
        if (below(8) == 0) {                  /* an authority with a NUL inside */
            n += hp_field(out + n, ":authority", 10, "10.0.0.1\0:80", 12);
        } else if (below(12) != 0) {
            n += hp(out + n, ":authority", auth);
            if (below(10) == 0)
                n += hp(out + n, ":authority", "10.0.0.9:80");
        }
        if (below(8) == 0)
            n += hp(out + n, ":path", "/");
        if (below(10) == 0)
            n += hp(out + n, ":protocol", "websocket");
    }
    int extra = (int)below(4);
    for (int i = 0; i < extra && n + 20100 < cap; i++) {
        switch (below(6)) {
        case 0:
            n += hp_field(out + n, "x-big", 5, big, below(sizeof big));
            break;
        case 1:
            n += hp(out + n, "Upper-Case", "x");
            break;
        case 2:
            n += hp(out + n, "connection", "close");
            break;
        case 3:
            n += hp(out + n, "baggage", "k8s.namespace.name=default,k8s.pod.name=a");
            break;
        case 4:
            n += hp_field(out + n, "x-nul", 5, "a\0b", 3);
            break;
        default:
            n += hp(out + n, "traceparent", "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01");
        }
    }
    return n;
}

static size_t frame_header(unsigned char *out, size_t len, int type, int flags, uint32_t sid)
{
    out[0] = (unsigned char)(len >> 16);
    out[1] = (unsigned char)(len >> 8);
    out[2] = (unsigned char)len;
    out[3] = (unsigned char)type;
    out[4] = (unsigned char)flags;
    out[5] = (unsigned char)((sid >> 24) & 0x7f);
    out[6] = (unsigned char)(sid >> 16);
    out[7] = (unsigned char)(sid >> 8);
    out[8] = (unsigned char)sid;
    return 9;
}

/* One frame of a random kind into out (cap bytes); its length. `response`: the peer is a server. */
static size_t random_frame(unsigned char *out, size_t cap, int response, uint32_t *next_sid)
{
    static const uint32_t sids[] = {0, 1, 3, 5, 2, 0x7fffffff, 101};
    uint32_t sid = below(3) ? *next_sid : sids[below(sizeof sids / sizeof sids[0])];
    unsigned char *p = out + 9;
    size_t len = 0;
    int type = (int)below(12), flags = (int)(below(4) ? 0 : rnd() & 0xff);
    switch (type) {
    case 0:                                   /* DATA, maybe padded */
        len = below(4) ? below(2048) : below(70000);
        if (len > cap - 10)
            len = cap - 10;
        if (flags & 0x08 && len)
            p[0] = (unsigned char)rnd();
        else
            memset(p, 'd', len);
        if (below(3) == 0)
            flags |= 0x01;                    /* END_STREAM */
        break;
    case 1:                                   /* HEADERS */
        flags = below(6) ? 0x04 : (int)(rnd() & 0xff);   /* END_HEADERS, or anything */
        if (below(5) == 0)
            flags |= 0x01;
        if (flags & 0x20) {                   /* PRIORITY fields */
            random_bytes(p, 5);
            len = 5;
        }
        len += header_block(p + len, cap - 9 - len, response);
        if (below(2) == 0)
            *next_sid += 2;
        break;
    case 2:                                   /* PRIORITY */
        len = below(6) ? 5 : below(9);
        random_bytes(p, len);
        break;
    case 3:                                   /* RST_STREAM */
        len = below(8) ? 4 : below(9);
        random_bytes(p, len);
        if (below(2))
            memset(p, 0, 3);
        break;
    case 4: {                                 /* SETTINGS: known ids, random values */
        if (below(4) == 0) {
            flags = 0x01;
            len = below(3) ? 0 : 6;
            break;
        }
        size_t k = below(5);
        for (size_t i = 0; i < k; i++) {
            p[len] = 0;
            p[len + 1] = (unsigned char)(1 + below(9));
            uint32_t v = below(3) ? rnd() : (below(2) ? 0 : 0x7fffffff + below(3));
            p[len + 2] = (unsigned char)(v >> 24);
            p[len + 3] = (unsigned char)(v >> 16);
            p[len + 4] = (unsigned char)(v >> 8);
            p[len + 5] = (unsigned char)v;
            len += 6;
        }
        if (below(10) == 0)
            len += 1 + below(5);              /* not a multiple of 6 */
        sid = below(10) ? 0 : sid;
        break;
    }
    case 5:                                   /* PUSH_PROMISE */
        len = 4 + below(32);
        random_bytes(p, len);
        break;
    case 6:                                   /* PING */
        len = below(6) ? 8 : below(20);
        random_bytes(p, len);
        sid = below(10) ? 0 : sid;
        break;
    case 7:                                   /* GOAWAY */
        len = 8 + below(16);
        random_bytes(p, len);
        sid = 0;
        break;
    case 8: {                                 /* WINDOW_UPDATE */
        static const uint32_t incs[] = {0, 1, 65535, 0x7fffffff, 0x80000000u, 16384};
        uint32_t v = below(2) ? incs[below(6)] : rnd();
        len = below(8) ? 4 : below(8);
        unsigned char w[8] = {(unsigned char)(v >> 24), (unsigned char)(v >> 16), (unsigned char)(v >> 8),
                              (unsigned char)v};
        memcpy(p, w, len);
        sid = below(2) ? 0 : sid;
        break;
    }
    case 9:                                   /* CONTINUATION */
        len = header_block(p, cap - 9, response);
        flags = below(2) ? 0x04 : 0;
        break;
    default:                                  /* an unknown type */
        type = 10 + (int)below(246);
        len = below(64);
        random_bytes(p, len);
    }
    size_t declared = len;
    if (below(25) == 0)
        declared = below(1 << 24);            /* the length field lies */
    return frame_header(out, declared, type, flags, sid) + len;
}

/* One frame a well-behaved peer could send: a CONNECT (a response, for `response`) on the next
 * stream, DATA, RST_STREAM or WINDOW_UPDATE on one opened before, PING, SETTINGS, PRIORITY. */
static size_t sane_frame(unsigned char *out, int response, uint32_t *next_sid)
{
    static const char *const valid[] = {"10.0.0.1:80", "10.0.0.2:8080", "[::1]:80", "host.example:80",
                                        "10.0.0.1:99999", "10.0.0.1:0", "10.0.0.1"};
    unsigned char *p = out + 9;
    uint32_t open_sid = *next_sid > 1 ? 1 + 2 * below((*next_sid - 1) / 2) : 1;
    uint32_t pick = below(100), v;
    size_t len = 0;
    if (pick < 35) {                          /* HEADERS */
        if (response) {
            static const char *const statuses[] = {"200", "200", "200", "403", "503"};
            len = hp(p, ":status", statuses[below(5)]);
        } else {
            len = hp(p, ":method", "CONNECT");
            len += hp(p + len, ":authority", below(2) ? valid[0] : valid[below(sizeof valid / sizeof valid[0])]);
            if (below(2))
                len += hp(p + len, "baggage", "k8s.pod.name=x");
        }
        uint32_t sid = *next_sid;
        *next_sid += 2;
        return frame_header(out, len, 1, 0x04 | (below(8) ? 0 : 0x01), sid) + len;
    }
    if (pick < 70) {                          /* DATA */
        len = below(16385);
        memset(p, 'd', len);
        return frame_header(out, len, 0, below(5) ? 0 : 0x01, open_sid) + len;
    }
    if (pick < 78) {                          /* RST_STREAM */
        v = below(14);
        p[0] = p[1] = p[2] = 0;
        p[3] = (unsigned char)v;
        return frame_header(out, 4, 3, 0, open_sid) + 4;
    }
    if (pick < 88) {                          /* WINDOW_UPDATE */
        v = 1 + below(65535);
        p[0] = 0;
        p[1] = (unsigned char)(v >> 16);
        p[2] = (unsigned char)(v >> 8);
        p[3] = (unsigned char)v;
        return frame_header(out, 4, 8, 0, below(2) ? 0 : open_sid) + 4;
    }
    if (pick < 93) {                          /* PING */
        random_bytes(p, 8);
        return frame_header(out, 8, 6, 0, 0) + 8;
    }
    if (pick < 98) {                          /* SETTINGS: the initial window, the frame size */
        v = below(2) ? below(1u << 20) : 16384 + below(1 << 16);
        p[0] = 0;
        p[1] = below(2) ? 4 : 5;
        if (p[1] == 5 && v < 16384)
            v = 16384;
        p[2] = (unsigned char)(v >> 24);
        p[3] = (unsigned char)(v >> 16);
        p[4] = (unsigned char)(v >> 8);
        p[5] = (unsigned char)v;
        return frame_header(out, 6, 4, 0, 0) + 6;
    }
    memset(p, 0, 5);                          /* PRIORITY */
    p[4] = (unsigned char)below(256);
    return frame_header(out, 5, 2, 0, open_sid) + 5;
}

/* What a peer sends after TLS: frames, with the engine's output read in between. Most peers
 * behave but now and then send a wild frame; the others send only wild ones. */
static void fuzz_frames(SSL *ssl, int fd, int response, uint64_t conn)
{
    static unsigned char buf[1 << 18];
    static const unsigned char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    uint32_t next_sid = 1;
    if (!response && below(10) != 0 && !send_all(ssl, fd, preface, sizeof preface - 1))
        return;
    if (below(10) != 0) {                     /* an empty SETTINGS first, as a peer must */
        unsigned char s[9];
        frame_header(s, 0, 4, 0, 0);
        if (!send_all(ssl, fd, s, sizeof s))
            return;
    }
    int frames = 1 + (int)below(60), sane = below(5) < 3;
    for (int i = 0; i < frames; i++) {
        size_t n = sane && below(15) ? sane_frame(buf, response, &next_sid)
                                     : random_frame(buf, sizeof buf, response, &next_sid);
        if (below(30) == 0) {                 /* bits flipped */
            for (int k = 0; k < 4; k++)
                buf[below((uint32_t)n)] ^= (unsigned char)(1u << below(8));
        }
        if (!send_all(ssl, fd, buf, n) || !drain(ssl))
            return;
        if (sane && buf[3] == 1 && !response) {
            /* a request: its answer and route come before what follows (up to 200 ms: it may be
             * refused at the HTTP/2 layer, which says nothing, or the connection end) */
            unsigned long before = n_requests + n_delivered + n_refused_by_engine;
            double until = now() + 0.2;
            while (n_requests + n_delivered + n_refused_by_engine == before && !conn_ended[conn] && now() < until)
                pump(1);
        } else {
            pump(0);
        }
        if (below(4) == 0)
            poke_app();
        if (npending && below(4) == 0)
            answer(pending[--npending]);
    }
}

/* The end of a round's connection; some are left open for the engine's timeouts. */
static int held[64], nheld;
static SSL *held_ssl[64];

static void finish(SSL *ssl, int fd)
{
    switch (below(5)) {
    case 0:
        SSL_shutdown(ssl);
        close(fd);
        break;
    case 1:
        reset_close(fd);
        break;
    case 2:
        if (nheld < 64) {
            held[nheld] = fd;
            held_ssl[nheld++] = ssl;
            return;
        }
        close(fd);
        break;
    default:
        close(fd);
    }
    SSL_free(ssl);
}

static void server_round(SSL_CTX *peer, int engine_listener)
{
    socklen_t len = sizeof(struct sockaddr_in);
    struct sockaddr_in a;
    getsockname(engine_listener, (void *)&a, &len);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(fd, (void *)&a, sizeof a) == 0, "dial: %s", strerror(errno));
    int theirs = accept(engine_listener, NULL, NULL);
    CHECK(theirs >= 0, "accept");
    int64_t conn = nh_conn_server(E, theirs, server_tls);
    CHECK(conn > 0 || conn == -EBUSY || conn == -ENOSPC, "nh_conn_server: %ld", (long)conn);
    if (conn > 0) {
        CHECK(conn < MAX_IDS, "too many connections");
        conn_handed[conn] = 1;
    }
    nonblock(fd);
    if (below(12) == 0) {                     /* bytes before TLS */
        unsigned char junk[512];
        random_bytes(junk, sizeof junk);
        if (write(fd, junk, 1 + below(sizeof junk)) < 0) { /* the engine may have reset it */ }
        if (below(2))
            close(fd);
        else
            reset_close(fd);
        return;
    }
    SSL *ssl = SSL_new(peer);
    SSL_set_fd(ssl, fd);
    if (!handshake(ssl, fd, 0)) {
        ERR_clear_error();
        SSL_free(ssl);
        reset_close(fd);
        return;
    }
    if (below(12) == 0) {                     /* TLS, then bytes that are not HTTP/2 */
        unsigned char junk[4096];
        random_bytes(junk, sizeof junk);
        send_all(ssl, fd, junk, 1 + below(sizeof junk));
    } else {
        fuzz_frames(ssl, fd, 0, conn > 0 ? (uint64_t)conn : 0);
    }
    finish(ssl, fd);
}

/* The engine as a client: streams on a connection to a server that answers garbage. */
static void client_round(SSL_CTX *peer, const char *server_uri)
{
    int mine, theirs;
    tcp_pair(&mine, &theirs);
    int64_t conn = nh_conn_client(E, theirs, client_tls, below(10) ? server_uri : "spiffe://fuzz.test/ns/x/sa/y");
    CHECK(conn > 0 || conn == -ENOSPC, "nh_conn_client: %ld", (long)conn);
    if (conn < 0) {
        close(mine);
        return;
    }
    CHECK(conn < MAX_IDS, "too many connections");
    conn_handed[conn] = 1;
    int streams = (int)below(6);
    int64_t later[6];
    int later_fd[6], nlater = 0;
    for (int i = 0; i < streams; i++) {
        int app, sock;
        tcp_pair(&app, &sock);
        int attach_later = below(4) == 0;
        const char hdrs[] = "baggage\0k8s.pod.name=a\0";
        int64_t s = nh_stream_open(E, (uint64_t)conn, attach_later ? -1 : sock, authorities[below(4)], hdrs,
                                   sizeof hdrs - 1);
        CHECK(s > 0 && s < MAX_IDS, "nh_stream_open: %ld", (long)s);
        stream_known[s] = 1;
        n_opened++;
        if (attach_later) {
            later[nlater] = s;
            later_fd[nlater++] = sock;
        }
        unsigned char early[300];
        random_bytes(early, sizeof early);
        if (write(app, early, below(sizeof early)) < 0) { /* fine */ }
        keep_app(app);
    }
    SSL *ssl = SSL_new(peer);
    SSL_set_fd(ssl, mine);
    if (handshake(ssl, mine, 1)) {
        fuzz_frames(ssl, mine, 1, 0);
    } else {
        ERR_clear_error();
    }
    for (int i = 0; i < nlater; i++)
        CHECK(nh_stream_attach(E, (uint64_t)later[i], later_fd[i]) <= 0, "attach");
    finish(ssl, mine);
}

int main(int argc, char **argv)
{
    CHECK(argc == 7, "usage: hbone_fuzz SERVER_PEM CLIENT_PEM TRUST_PEM SERVER_URI SEED ROUNDS");
    rng = strtoull(argv[5], NULL, 10) * 0x9e3779b97f4a7c15ull | 1;
    int rounds = atoi(argv[6]);
    deadline = now() + 240;
    signal(SIGPIPE, SIG_IGN);
    struct nh_config cfg = {.max_conns = 256, .max_streams = 8, .stream_window = 65535,
                            .connection_window = 1 << 20, .max_frame_size = 16384, .stream_buffer = 16384,
                            .max_resets = 20, .reset_window_ms = 10000, .handshake_timeout_ms = 1000,
                            .max_pending_handshakes = 8, .keepalive_interval_ms = 100, .keepalive_timeout_ms = 300,
                            .client_idle_ms = 500, .server_idle_ms = 500, .client_handshake_timeout_ms = 1000,
                            .linger_ms = 100, .receive_budget = 1 << 20, .send_budget = 1 << 20,
                            .open_timeout_ms = 500};
    CHECK(nh_engine_new(&cfg, &E) == 0, "nh_engine_new");
    nh_engine_generation(E, generation);
    const char *err = NULL;
    size_t kl, tl;
    FILE *f;
    char *pem[2], *trust;
    for (int i = 0; i < 2; i++) {
        f = fopen(argv[1 + i], "rb");
        CHECK(f, "cannot open %s", argv[1 + i]);
        fseek(f, 0, SEEK_END);
        kl = (size_t)ftell(f);
        rewind(f);
        pem[i] = malloc(kl + 1);
        CHECK(fread(pem[i], 1, kl, f) == kl, "read %s", argv[1 + i]);
        pem[i][kl] = 0;
        fclose(f);
    }
    f = fopen(argv[3], "rb");
    CHECK(f, "cannot open %s", argv[3]);
    fseek(f, 0, SEEK_END);
    tl = (size_t)ftell(f);
    rewind(f);
    trust = malloc(tl + 1);
    CHECK(fread(trust, 1, tl, f) == tl, "read trust");
    fclose(f);
    CHECK(nh_tls_new(pem[0], strlen(pem[0]), trust, tl, &server_tls, &err) == 0, "server tls: %s", err);
    CHECK(nh_tls_new(pem[1], strlen(pem[1]), trust, tl, &client_tls, &err) == 0, "client tls: %s", err);
    free(pem[0]);
    free(pem[1]);
    free(trust);
    SSL_CTX *as_client = peer_ctx(argv[2], argv[3], 0), *as_server = peer_ctx(argv[1], argv[3], 1);

    app_listener = tcp_listener(&app_port);
    nonblock(app_listener);
    int engine_listener = tcp_listener(NULL);
    for (int r = 0; r < rounds; r++) {
        if (below(8) == 0)
            nh_engine_generation(E, ++generation);
        if (below(3) == 0)
            client_round(as_server, argv[4]);
        else
            server_round(as_client, engine_listener);
        pump(0);
    }

    /* Everything closed: the engine ends what it has. */
    while (npending)
        answer(pending[--npending]);
    for (int i = 0; i < nheld; i++) {
        close(held[i]);
        SSL_free(held_ssl[i]);
    }
    struct nh_stats st;
    for (;;) {
        while (napps)
            reset_close(apps[--napps]);
        pump(20);
        nh_engine_stats(E, &st);
        if (!st.conns_open && !st.streams_open && !st.route_sockets && !st.bytes_held && !st.received_held
            && !st.send_held && !st.lingering)
            break;
    }
    CHECK(!st.fatal, "the engine's thread stopped: %s", strerror(st.fatal));
    unsigned long conns = 0, streams = 0;
    for (int i = 0; i < MAX_IDS; i++) {
        CHECK(conn_handed[i] == conn_ended[i], "connection %d: handed %d, ended %d", i, conn_handed[i], conn_ended[i]);
        CHECK(stream_known[i] == stream_ended[i], "stream %d: known %d, ended %d", i, stream_known[i],
              stream_ended[i]);
        conns += conn_handed[i];
        streams += stream_known[i];
    }
    nh_engine_stop(E);
    pump(0);
    nh_engine_free(E);
    nh_tls_free(server_tls);
    nh_tls_free(client_tls);
    SSL_CTX_free(as_client);
    SSL_CTX_free(as_server);
    close(app_listener);
    close(engine_listener);
    printf("hbone_fuzz: ok\n");
    printf("connections %lu, streams %lu (requests %lu, delivered %lu, opened %lu), refused by the engine %lu,"
            " events %lu, TLS failures %lu, routes %lu, route failures %lu\n", conns, streams, n_requests, n_delivered,
           n_opened, n_refused_by_engine, n_events, (unsigned long)st.tls_failures, n_routes,
           (unsigned long)st.route_failures);
    return 0;
}
