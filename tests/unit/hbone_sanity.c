/* hbone_sanity.c - drives native/hbone.c through its API alone, for the sanitizers
 * (tests/unit/test_native_hbone.py builds it with ASan+UBSan and with TSan and runs it).
 *
 * Usage: hbone_sanity SERVER_PEM CLIENT_PEM TRUST_PEM SERVER_URI
 * One engine is both client and server on loopback: a stream carries 1 MiB up and
 * 256 KiB down with a half-close each way; a reset; a refusal (403); 20 streams at once;
 * a stream opened before its socket (the server's bytes wait, then nh_stream_attach), and a
 * socket attached to a stream that ended (reset); keepalive PINGs every 20 ms meanwhile;
 * a plaintext peer; a wrong expected identity; a pod's outbound listener in the engine (a
 * BPF map of original destinations: root) with an out-route: a stream opened and relayed by
 * the engine, one refused before its 200 handing the socket back with its first bytes, one
 * without a destination handed over, a stale route unused, bad arguments refused, one
 * listener closed and one left to the stop; then stop with a stream open, and free.
 * Then a second engine with a 512 KiB receive budget (and a 256 KiB send budget, which the
 * stuck stream's client side runs into): a server app that never reads has its
 * stream reset (OVERLOAD) once it holds half the budget, while a stream beside it on the same
 * connection carries 64 KiB both ways.
 * A second thread reads the stats all along (TSan: the engine's counters). Prints
 * "hbone_sanity: ok" and exits 0, or says what failed and exits 1.
 */
#define _GNU_SOURCE
#include "hbone.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/bpf.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "hbone_sanity: line %d: ", __LINE__); \
    fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(1); } } while (0)
#define MAX_EV 4096

static struct nh_engine *E;
static struct nh_event evs[MAX_EV];       /* every event seen (data released) */
static int nev;
static int listener;
static uint64_t last_request;             /* the newest REQUEST's stream id */
static int refuse_next;                   /* the next REQUEST gets this status */
static int server_app[64], napps;         /* the app ends of accepted streams */
static atomic_int stop_stats;
static int small_buffers;                 /* tcp_pair: 16 KiB socket buffers */

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    CHECK(f, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    rewind(f);
    char *p = malloc(*len + 1);
    CHECK(p && fread(p, 1, *len, f) == *len, "cannot read %s", path);
    fclose(f);
    return p;
}

static struct nh_tls *tls_from(const char *key_chain, const char *trust)
{
    size_t kl, tl;
    char *k = slurp(key_chain, &kl), *t = slurp(trust, &tl);
    struct nh_tls *tls;
    const char *err = NULL;
    CHECK(nh_tls_new(k, kl, t, tl, &tls, &err) == 0, "nh_tls_new: %s", err ? err : "?");
    free(k);
    free(t);
    return tls;
}

static void nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* One new socket, as nh_conn_route's array of one (the call takes it at once). */
static const int *one_socket(void)
{
    static int fd;
    fd = socket(AF_INET, SOCK_STREAM, 0);
    return &fd;
}

static void tcp_pair(int *app, int *theirs)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int l = socket(AF_INET, SOCK_STREAM, 0), small = 16384;
    if (small_buffers)
        setsockopt(l, SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
    CHECK(bind(l, (void *)&a, sizeof a) == 0 && listen(l, 1) == 0 && getsockname(l, (void *)&a, &len) == 0, "pair");
    *app = socket(AF_INET, SOCK_STREAM, 0);
    if (small_buffers)
        setsockopt(*app, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    CHECK(connect(*app, (void *)&a, sizeof a) == 0, "pair connect");
    *theirs = accept(l, NULL, NULL);
    CHECK(*theirs >= 0, "pair accept");
    close(l);
    nonblock(*app);
}

static int dial(void)
{
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    getsockname(listener, (void *)&a, &len);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(fd, (void *)&a, sizeof a) == 0, "dial");
    return fd;
}

static struct nh_tls *server_tls;

/* Take events and answer what the server side asks (verdicts, requests). */
static void pump(int timeout_ms)
{
    struct pollfd p[2] = {{.fd = nh_engine_notify_fd(E), .events = POLLIN}, {.fd = listener, .events = POLLIN}};
    poll(p, 2, timeout_ms);
    if (p[1].revents & POLLIN) {
        int fd = accept(listener, NULL, NULL);
        if (fd >= 0)
            CHECK(nh_conn_server(E, fd, server_tls) > 0, "nh_conn_server");
    }
    uint64_t v;
    if (read(p[0].fd, &v, sizeof v) < 0) { /* nothing */ }
    struct nh_event batch[64];
    size_t n;
    while ((n = nh_engine_events(E, batch, 64)) > 0)
        for (size_t i = 0; i < n; i++) {
            struct nh_event *ev = &batch[i];
            if (ev->type == NH_EV_CONN_UP)
                nh_conn_verdict(E, ev->conn, 1);  /* both sides' CONN_UP: the client's is ignored */
            if (ev->type == NH_EV_DELIVERED)
                CHECK(ev->data_len > 11 && !strcmp(ev->data, ":authority"), "delivered without :authority first");
            if (ev->type == NH_EV_REQUEST) {
                CHECK(ev->data_len > 11 && !strcmp(ev->data, ":authority"), "request without :authority first");
                last_request = ev->stream;
                if (refuse_next) {
                    CHECK(nh_stream_refuse(E, ev->stream, refuse_next) == 0, "refuse");
                    refuse_next = 0;
                } else {
                    int app, theirs;
                    tcp_pair(&app, &theirs);
                    CHECK(nh_stream_accept(E, ev->stream, theirs) == 0, "accept");
                    CHECK(napps < 64, "too many apps");
                    server_app[napps++] = app;
                }
            }
            nh_event_release(ev);
            CHECK(nev < MAX_EV, "too many events");
            evs[nev++] = *ev;
        }
}

static const struct nh_event *wait_event(uint32_t type, uint64_t conn, uint64_t stream)
{
    for (int tries = 0; tries < 2000; tries++) {
        for (int i = 0; i < nev; i++)
            if (evs[i].type == type && (!conn || evs[i].conn == conn) && (!stream || evs[i].stream == stream))
                return &evs[i];
        pump(5);
    }
    CHECK(0, "no event %u for conn %lu stream %lu", type, (unsigned long)conn, (unsigned long)stream);
    return NULL;
}

/* Send n bytes (pattern) from `from` then FIN, while reading `to` until EOF; bytes read. */
static size_t transfer(int from, int to, size_t n, unsigned seed)
{
    static char buf[65536];
    size_t sent = 0, got = 0;
    int eof = 0, fin = 0;
    while (!eof) {
        if (sent < n) {
            size_t k = n - sent < sizeof buf ? n - sent : sizeof buf;
            for (size_t i = 0; i < k; i++)
                buf[i] = (char)((sent + i) * seed);
            ssize_t w = write(from, buf, k);
            CHECK(w > 0 || errno == EAGAIN, "write: %s", strerror(errno));
            if (w > 0)
                sent += (size_t)w;
        } else if (!fin) {
            shutdown(from, SHUT_WR);
            fin = 1;
        }
        char in[65536];
        ssize_t r = read(to, in, sizeof in);
        if (r == 0)
            eof = 1;
        else if (r > 0) {
            for (ssize_t i = 0; i < r; i++)
                CHECK(in[i] == (char)((got + (size_t)i) * seed), "byte %zu differs", got + (size_t)i);
            got += (size_t)r;
        } else {
            CHECK(errno == EAGAIN, "read: %s", strerror(errno));
            pump(1);
        }
    }
    return got;
}

/* The capture's na_origdst map (bpf/nodeagent.h): (netns cookie, family, client port) ->
 * (cookie, family, address, port in network order). */
struct od_key {
    uint64_t cookie;
    uint16_t family, port;
    uint32_t pad;
};
struct od_val {
    uint64_t cookie;
    uint16_t family, pad0;
    uint32_t addr[4];
    uint16_t port, pad1;
};

static long bpf_cmd(int cmd, union bpf_attr *attr) { return syscall(__NR_bpf, cmd, attr, sizeof *attr); }

static int origdst_map(void)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_HASH;
    attr.key_size = sizeof(struct od_key);
    attr.value_size = sizeof(struct od_val);
    attr.max_entries = 64;
    int fd = (int)bpf_cmd(BPF_MAP_CREATE, &attr);
    CHECK(fd >= 0, "BPF_MAP_CREATE: %s (root?)", strerror(errno));
    return fd;
}

/* A client of the pod connecting to its outbound listener, its original destination
 * 10.96.0.1:80 recorded first (dst 0: none), as connect4 does. */
static int pod_dial(int map, int pod_listener, uint64_t cookie, int dst)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in self = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)}, to;
    socklen_t len = sizeof self;
    CHECK(bind(fd, (void *)&self, sizeof self) == 0 && getsockname(fd, (void *)&self, &len) == 0, "pod bind");
    if (dst) {
        struct od_key key = {.cookie = cookie, .family = AF_INET, .port = ntohs(self.sin_port)};
        struct od_val val = {.cookie = cookie, .family = AF_INET, .port = htons(80)};
        val.addr[0] = htonl(0x0a600001);
        union bpf_attr attr;
        memset(&attr, 0, sizeof attr);
        attr.map_fd = (uint32_t)map;
        attr.key = (uint64_t)(uintptr_t)&key;
        attr.value = (uint64_t)(uintptr_t)&val;
        CHECK(bpf_cmd(BPF_MAP_UPDATE_ELEM, &attr) == 0, "map update");
    }
    len = sizeof to;
    CHECK(getsockname(pod_listener, (void *)&to, &len) == 0 && connect(fd, (void *)&to, sizeof to) == 0, "pod dial");
    return fd;
}

static const struct nh_event *wait_listener_event(uint32_t type, uint64_t lid, int skip)
{
    for (int tries = 0; tries < 2000; tries++) {
        int seen = 0;
        for (int i = 0; i < nev; i++)
            if (evs[i].type == type && evs[i].listener == lid && seen++ == skip)
                return &evs[i];
        pump(5);
    }
    CHECK(0, "no listener event %u", type);
    return NULL;
}

static void listener_case(uint64_t conn)
{
    int map = origdst_map();
    int pod = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK(bind(pod, (void *)&a, sizeof a) == 0 && listen(pod, 16) == 0, "pod listen");
    int64_t lid = nh_listen(E, dup(pod), dup(map), 77);
    CHECK(lid > 0, "nh_listen %ld", (long)lid);
    CHECK(nh_listen(E, socket(AF_INET, SOCK_STREAM, 0), dup(map), 77) == -EINVAL, "a socket that does not listen");
    CHECK(nh_listen(E, -1, dup(map), 77) == -EBADF, "no socket");
    const uint64_t conns[1] = {conn};
    nh_out_generation(E, 5);
    CHECK(nh_listen_room(E, (uint64_t)lid, UINT32_MAX, 0) == 0, "room");
    CHECK(nh_out_route(E, (uint64_t)lid, "10.96.0.1", 80, conns, "10.0.0.1:80", 12, 1, 42, 5) == 0, "out-route");
    CHECK(nh_out_route(E, (uint64_t)lid, "not an ip", 80, conns, "10.0.0.1:80", 12, 1, 42, 5) == -EINVAL, "bad ip");
    CHECK(nh_out_route(E, (uint64_t)lid, "10.96.0.2", 80, conns, "10.0.0.1:80", 11, 1, 42, 5) == -EINVAL,
          "an authority without its NUL");
    const uint64_t three[3] = {conn, conn, conn};
    CHECK(nh_out_route(E, (uint64_t)lid, "10.96.0.3", 80, three, "a\0b\0", 4, 3, 42, 5) == -EINVAL, "fewer authorities");
    /* routed: the engine opens the CONNECT and relays it */
    int client = pod_dial(map, pod, 77, 1);
    const struct nh_event *opened = wait_listener_event(NH_EV_OUT_OPENED, (uint64_t)lid, 0);
    CHECK(opened->tag == 42 && opened->endpoint == 0 && opened->dst_port == 80 && !strcmp(opened->dst, "10.96.0.1")
          && opened->conn == conn, "opened: tag %lu endpoint %u dst %s", (unsigned long)opened->tag, opened->endpoint,
          opened->dst);
    uint64_t routed = opened->stream;
    nonblock(client);
    CHECK(transfer(client, server_app[napps - 1], 70 << 10, 17) == 70 << 10, "routed up");
    CHECK(transfer(server_app[napps - 1], client, 30 << 10, 19) == 30 << 10, "routed down");
    const struct nh_event *end = wait_event(NH_EV_STREAM_END, 0, routed);
    CHECK(end->how == NH_END_CLOSED && end->to_peer == 70 << 10 && end->from_peer == 30 << 10 && !end->handed
          && end->listener == (uint64_t)lid, "routed end %u", end->how);
    close(client);
    /* refused before its 200: the socket comes back with its first bytes */
    refuse_next = 403;
    client = pod_dial(map, pod, 77, 1);
    CHECK(write(client, "early", 5) == 5, "early");
    end = wait_listener_event(NH_EV_STREAM_END, (uint64_t)lid, 1);
    CHECK(end->how == NH_END_REFUSED && end->status == 403 && end->handed && end->fd >= 0, "refused %u", end->how);
    char peek[8];
    for (int tries = 0; tries < 200 && recv(end->fd, peek, 5, MSG_PEEK | MSG_DONTWAIT) < 5; tries++)
        pump(1);
    CHECK(read(end->fd, peek, 5) == 5 && !memcmp(peek, "early", 5), "the early bytes kept");
    close(end->fd);
    close(client);
    /* no destination recorded: handed over */
    client = pod_dial(map, pod, 77, 0);
    const struct nh_event *acc = wait_listener_event(NH_EV_ACCEPTED, (uint64_t)lid, 0);
    CHECK(acc->handed && acc->fd >= 0 && acc->dst[0] == 0 && acc->endpoint == NH_NO_ENDPOINT, "accepted");
    close(acc->fd);
    close(client);
    /* the generation moved: the route is not used */
    nh_out_generation(E, 6);
    client = pod_dial(map, pod, 77, 1);
    acc = wait_listener_event(NH_EV_ACCEPTED, (uint64_t)lid, 1);
    CHECK(acc->handed && !strcmp(acc->dst, "10.96.0.1") && acc->endpoint == NH_NO_ENDPOINT, "stale route used");
    close(acc->fd);
    close(client);
    struct nh_stats st;
    nh_engine_stats(E, &st);
    CHECK(st.listeners == 1 && st.accepted == 4 && st.streams_routed == 2 && st.handed_back == 1,
          "listener stats %lu %lu %lu %lu", (unsigned long)st.listeners, (unsigned long)st.accepted,
          (unsigned long)st.streams_routed, (unsigned long)st.handed_back);
    CHECK(nh_listen_close(E, (uint64_t)lid, 1) == 0, "listen close");
    /* a second listener, with a route, left to the engine's stop */
    int64_t lid2 = nh_listen(E, dup(pod), dup(map), 78);
    CHECK(lid2 > 0 && nh_out_route(E, (uint64_t)lid2, "10.96.0.1", 80, conns, "10.0.0.1:80", 12, 1, 43, 6) == 0,
          "second listener");
    close(pod);
    close(map);
}

static void *stats_reader(void *arg)
{
    (void)arg;
    struct nh_stats st;
    while (!atomic_load(&stop_stats)) {
        nh_engine_stats(E, &st);
        CHECK(st.fatal == 0, "engine fatal %d", st.fatal);
        usleep(200);
    }
    return NULL;
}

/* A second engine with a receive budget of 512 KiB (the first has none): the server's app of
 * one stream never reads, so its stream is reset once it would hold half the budget; a
 * stream beside it on the same connection goes on. */
static void budget_case(struct nh_tls *client_tls, const char *server_uri)
{
    struct nh_config cfg = {.max_conns = 8, .max_streams = 16, .stream_window = 1 << 20,
                            .connection_window = 4 << 20, .max_frame_size = 131072, .stream_buffer = 65536,
                            .max_resets = 200, .reset_window_ms = 10000, .handshake_timeout_ms = 5000,
                            .max_pending_handshakes = 16, .receive_budget = 512 << 10,
                            .send_budget = 256 << 10};
    CHECK(nh_engine_new(&cfg, &E) == 0, "budget engine");
    nev = napps = 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    listener = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(bind(listener, (void *)&a, sizeof a) == 0 && listen(listener, 8) == 0, "budget listen");
    nonblock(listener);
    int64_t conn = nh_conn_client(E, dial(), client_tls, server_uri);
    CHECK(conn > 0, "budget conn");
    int stuck, theirs;
    small_buffers = 1;
    tcp_pair(&stuck, &theirs);
    int64_t s1 = nh_stream_open(E, (uint64_t)conn, theirs, "10.0.0.1:80", NULL, 0);
    CHECK(wait_event(NH_EV_RESPONSE, 0, (uint64_t)s1)->status == 200, "budget status");
    uint64_t server_s1 = last_request;
    small_buffers = 0;
    nonblock(stuck);
    static char zeros[65536];
    const struct nh_event *end = NULL;
    for (int tries = 0; tries < 4000 && !end; tries++) {
        if (write(stuck, zeros, sizeof zeros) < 0)
            CHECK(errno == EAGAIN || errno == ECONNRESET || errno == EPIPE, "budget write: %s", strerror(errno));
        pump(1);
        for (int i = 0; i < nev && !end; i++)
            if (evs[i].type == NH_EV_STREAM_END && evs[i].stream == server_s1)
                end = &evs[i];
    }
    CHECK(end && end->how == NH_END_OVERLOAD, "the stream over budget was not reset: %u", end ? end->how : 0);
    end = wait_event(NH_EV_STREAM_END, 0, (uint64_t)s1);
    CHECK(end->how == NH_END_RESET && end->code == 8, "client saw %u code %u", end->how, end->code);
    int app;
    tcp_pair(&app, &theirs);
    int64_t s2 = nh_stream_open(E, (uint64_t)conn, theirs, "10.0.0.1:80", NULL, 0);
    CHECK(wait_event(NH_EV_RESPONSE, 0, (uint64_t)s2)->status == 200, "beside status");
    int srv2 = server_app[napps - 1];
    CHECK(transfer(app, srv2, 65536, 9) == 65536, "beside up");
    CHECK(transfer(srv2, app, 65536, 11) == 65536, "beside down");
    CHECK(wait_event(NH_EV_STREAM_END, 0, (uint64_t)s2)->how == NH_END_CLOSED, "beside end");
    struct nh_stats st;
    nh_engine_stats(E, &st);
    CHECK(st.streams_overloaded == 1 && st.received_held == 0 && st.received_held_peak < (512 << 10) + 65536
          && st.send_held == 0 && st.streams_send_waiting == 0 && st.send_held_peak <= (256 << 10) + 65536,
          "budget stats: %lu overloaded, %lu held, peak %lu; send %lu held, peak %lu, %lu waiting",
          (unsigned long)st.streams_overloaded, (unsigned long)st.received_held, (unsigned long)st.received_held_peak,
          (unsigned long)st.send_held, (unsigned long)st.send_held_peak, (unsigned long)st.streams_send_waiting);
    nh_engine_stop(E);
    struct nh_event tail[64];
    size_t n;
    while ((n = nh_engine_events(E, tail, 64)) > 0)
        for (size_t i = 0; i < n; i++)
            nh_event_release(&tail[i]);
    nh_engine_free(E);
    close(stuck);
    close(app);
    for (int i = 0; i < napps; i++)
        close(server_app[i]);
    close(listener);
}

int main(int argc, char **argv)
{
    CHECK(argc == 5 || argc == 6, "usage: hbone_sanity SERVER_PEM CLIENT_PEM TRUST_PEM SERVER_URI [listeners]");
    struct nh_config cfg = {.max_conns = 64, .max_streams = 200, .stream_window = 1 << 20,
                            .connection_window = 4 << 20, .max_frame_size = 131072, .stream_buffer = 65536,
                            .max_resets = 200, .reset_window_ms = 10000, .handshake_timeout_ms = 5000,
                            .max_pending_handshakes = 16, .keepalive_interval_ms = 20,
                            .keepalive_timeout_ms = 30000, .linger_ms = 1000};
    CHECK(nh_engine_new(&cfg, &E) == 0, "nh_engine_new");
    server_tls = tls_from(argv[1], argv[3]);
    struct nh_tls *client_tls = tls_from(argv[2], argv[3]);
    const char *err = NULL;
    struct nh_tls *bad;
    CHECK(nh_tls_new("junk", 4, "junk", 4, &bad, &err) == -EINVAL && err, "junk credentials accepted");
    pthread_t reader;
    pthread_create(&reader, NULL, stats_reader, NULL);

    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    listener = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(bind(listener, (void *)&a, sizeof a) == 0 && listen(listener, 64) == 0, "listen");
    nonblock(listener);

    /* one connection, a stream with a half-close each way */
    int64_t conn = nh_conn_client(E, dial(), client_tls, argv[4]);
    CHECK(conn > 0, "nh_conn_client %ld", (long)conn);
    int app, theirs;
    tcp_pair(&app, &theirs);
    const char hdrs[] = "baggage\0k8s.pod.name=a\0";
    int64_t s1 = nh_stream_open(E, (uint64_t)conn, theirs, "10.0.0.1:80", hdrs, sizeof hdrs - 1);
    CHECK(s1 > 0, "nh_stream_open");
    wait_event(NH_EV_CONN_UP, (uint64_t)conn, 0);
    CHECK(wait_event(NH_EV_RESPONSE, 0, (uint64_t)s1)->status == 200, "status");
    uint64_t server_s1 = last_request;
    CHECK(transfer(app, server_app[0], 1 << 20, 7) == 1 << 20, "up");
    /* idle for a few ticks: the stream's empty buffers go back, and come again for "down" */
    struct nh_stats st;
    for (int tries = 0; tries < 500; tries++) {
        pump(10);
        nh_engine_stats(E, &st);
        if (st.stream_buffers == 0)
            break;
    }
    /* at least the client's socket side; the server wrote what it received from the read
     * (struct pend) and needed a buffer only for what its app did not take at once */
    CHECK(st.stream_buffers == 0 && st.buffers_released >= 1, "idle buffers kept: %lu bytes, %lu released",
          (unsigned long)st.stream_buffers, (unsigned long)st.buffers_released);
    CHECK(transfer(server_app[0], app, 256 << 10, 13) == 256 << 10, "down");
    const struct nh_event *end = wait_event(NH_EV_STREAM_END, 0, (uint64_t)s1);
    CHECK(end->how == NH_END_CLOSED && end->to_peer == 1 << 20 && end->from_peer == 256 << 10, "client end %u", end->how);
    end = wait_event(NH_EV_STREAM_END, 0, server_s1);
    CHECK(end->how == NH_END_CLOSED && end->from_peer == 1 << 20 && end->to_peer == 256 << 10, "server end %u", end->how);
    close(app);

    /* routes: the server delivers a CONNECT itself on a route of the engine's generation
     * (NH_EV_DELIVERED, the local port of the route's socket), and asks again once the
     * generation moved; a socket given under another generation is closed */
    uint64_t server_conn = wait_event(NH_EV_REQUEST, 0, server_s1)->conn;
    int app_listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in la = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t lalen = sizeof la;
    CHECK(bind(app_listener, (void *)&la, sizeof la) == 0 && listen(app_listener, 8) == 0
          && getsockname(app_listener, (void *)&la, &lalen) == 0, "app listener");
    uint32_t app_port = ntohs(la.sin_port);
    nh_engine_generation(E, 1);
    CHECK(nh_conn_route(E, server_conn, "10.0.0.1:80", "127.0.0.1", app_port, one_socket(), 1, 1) == 0,
          "route");
    CHECK(nh_conn_route(E, server_conn, "10.0.0.1:80", "127.0.0.1", app_port, one_socket(), 1, 0) == 0,
          "a stale route socket");
    CHECK(nh_conn_route(E, server_conn, "10.0.0.1:80", "not an ip", 80, one_socket(), 1, 1) == -EINVAL,
          "a route to no address");
    tcp_pair(&app, &theirs);
    int64_t s9 = nh_stream_open(E, (uint64_t)conn, theirs, "10.0.0.1:80", NULL, 0);
    CHECK(wait_event(NH_EV_RESPONSE, 0, (uint64_t)s9)->status == 200, "routed status");
    const struct nh_event *routed = wait_event(NH_EV_DELIVERED, server_conn, 0);
    uint64_t routed_stream = routed->stream;
    int delivered = accept(app_listener, NULL, NULL);
    struct sockaddr_in peer;
    socklen_t plen = sizeof peer;
    CHECK(delivered >= 0 && getpeername(delivered, (void *)&peer, &plen) == 0 && ntohs(peer.sin_port) == routed->code,
          "delivered from the route's socket");
    CHECK(transfer(app, delivered, 100 << 10, 3) == 100 << 10, "routed up");
    CHECK(transfer(delivered, app, 50 << 10, 5) == 50 << 10, "routed down");
    end = wait_event(NH_EV_STREAM_END, 0, routed_stream);
    CHECK(end->how == NH_END_CLOSED && end->from_peer == 100 << 10 && end->to_peer == 50 << 10, "routed end %u", end->how);
    wait_event(NH_EV_STREAM_END, 0, (uint64_t)s9);
    close(app);
    close(delivered);
    nh_engine_stats(E, &st);
    CHECK(st.streams_delivered == 1 && st.route_sockets == 0 && st.route_failures == 0,
          "routes: %lu delivered, %lu sockets, %lu failures", (unsigned long)st.streams_delivered,
          (unsigned long)st.route_sockets, (unsigned long)st.route_failures);
    CHECK(nh_conn_route(E, server_conn, "10.0.0.1:80", "127.0.0.1", app_port, one_socket(), 1, 1) == 0,
          "route again");
    nh_engine_generation(E, 2);
    int apps_before = napps;
    tcp_pair(&app, &theirs);
    int64_t s10 = nh_stream_open(E, (uint64_t)conn, theirs, "10.0.0.1:80", NULL, 0);
    CHECK(wait_event(NH_EV_RESPONSE, 0, (uint64_t)s10)->status == 200, "asked status");
    CHECK(napps == apps_before + 1, "the CONNECT after the generation moved was not asked for");
    CHECK(transfer(app, server_app[napps - 1], 1000, 9) == 1000, "asked up");
    CHECK(transfer(server_app[napps - 1], app, 1000, 11) == 1000, "asked down");
    wait_event(NH_EV_STREAM_END, 0, (uint64_t)s10);
    close(app);
    close(app_listener);
    nh_engine_stats(E, &st);
    CHECK(st.streams_delivered == 1 && st.route_sockets == 0, "a stale route used: %lu delivered, %lu sockets",
          (unsigned long)st.streams_delivered, (unsigned long)st.route_sockets);

    /* the client's first bytes go with the CONNECT (peeked): a refusal leaves them in the
     * socket and counts none sent; an answered stream takes them once */
    tcp_pair(&app, &theirs);
    CHECK(write(app, "early", 5) == 5, "early write");
    refuse_next = 403;
    int64_t s7 = nh_stream_open(E, (uint64_t)conn, dup(theirs), "10.0.0.1:80", NULL, 0);
    end = wait_event(NH_EV_STREAM_END, 0, (uint64_t)s7);
    CHECK(end->how == NH_END_REFUSED && end->status == 403 && end->to_peer == 0, "refused early %u", end->how);
    char peek[8];
    CHECK(recv(theirs, peek, sizeof peek, MSG_PEEK | MSG_DONTWAIT) == 5 && !memcmp(peek, "early", 5), "early kept");
    int64_t s8 = nh_stream_open(E, (uint64_t)conn, theirs, "10.0.0.1:80", NULL, 0);
    CHECK(wait_event(NH_EV_RESPONSE, 0, (uint64_t)s8)->status == 200, "early status");
    int server_s8 = server_app[napps - 1];
    size_t taken = 0;
    for (int tries = 0; taken < 5 && tries < 2000; tries++) {
        ssize_t r = recv(server_s8, peek + taken, 5 - taken, MSG_DONTWAIT);
        if (r > 0)
            taken += (size_t)r;
        else
            pump(1);
    }
    CHECK(taken == 5 && !memcmp(peek, "early", 5), "early delivered");
    shutdown(app, SHUT_WR);
    shutdown(server_s8, SHUT_WR);
    end = wait_event(NH_EV_STREAM_END, 0, (uint64_t)s8);
    CHECK(end->how == NH_END_CLOSED && end->to_peer == 5 && end->from_peer == 0, "early end %u", end->how);
    close(app);

    /* a reset passes as a reset */
    tcp_pair(&app, &theirs);
    int64_t s2 = nh_stream_open(E, (uint64_t)conn, theirs, "10.0.0.1:80", NULL, 0);
    wait_event(NH_EV_RESPONSE, 0, (uint64_t)s2);
    uint64_t server_s2 = last_request;
    CHECK(nh_stream_reset(E, (uint64_t)s2) == 0, "reset");
    CHECK(wait_event(NH_EV_STREAM_END, 0, (uint64_t)s2)->how == NH_END_ABORTED, "aborted");
    end = wait_event(NH_EV_STREAM_END, 0, server_s2);
    CHECK(end->how == NH_END_RESET && end->code == 8, "server saw %u code %u", end->how, end->code);
    close(app);

    /* a refusal */
    refuse_next = 403;
    tcp_pair(&app, &theirs);
    int64_t s3 = nh_stream_open(E, (uint64_t)conn, theirs, "10.0.0.1:80", NULL, 0);
    end = wait_event(NH_EV_STREAM_END, 0, (uint64_t)s3);
    CHECK(end->how == NH_END_REFUSED && end->status == 403, "refused %u %u", end->how, end->status);
    close(app);

    /* 20 streams at once */
    int apps[20];
    int64_t ids[20];
    for (int i = 0; i < 20; i++) {
        tcp_pair(&apps[i], &theirs);
        ids[i] = nh_stream_open(E, (uint64_t)conn, theirs, "10.0.0.1:80", NULL, 0);
    }
    for (int i = 0; i < 20; i++)
        wait_event(NH_EV_RESPONSE, 0, (uint64_t)ids[i]);
    for (int i = 0; i < 20; i++) {
        int srv = server_app[napps - 20 + i];
        CHECK(transfer(apps[i], srv, 1000 + i, 3) == (size_t)(1000 + i), "many up");
        CHECK(transfer(srv, apps[i], 0, 3) == 0, "many down");
        CHECK(wait_event(NH_EV_STREAM_END, 0, (uint64_t)ids[i])->how == NH_END_CLOSED, "many end");
        close(apps[i]);
    }

    /* a stream opened before its socket: answered, the server's bytes and FIN wait, then attach */
    int64_t s5 = nh_stream_open(E, (uint64_t)conn, -1, "10.0.0.1:80", NULL, 0);
    CHECK(s5 > 0, "deferred open");
    CHECK(wait_event(NH_EV_RESPONSE, 0, (uint64_t)s5)->status == 200, "deferred status");
    int srv5 = server_app[napps - 1];
    nonblock(srv5);
    char early[100000];
    for (size_t i = 0; i < sizeof early; i++)
        early[i] = (char)(i * 11);
    for (size_t sent = 0; sent < sizeof early;) {
        ssize_t w = write(srv5, early + sent, sizeof early - sent);
        CHECK(w > 0 || errno == EAGAIN, "early write: %s", strerror(errno));
        sent += w > 0 ? (size_t)w : 0;
        pump(1);
    }
    shutdown(srv5, SHUT_WR);
    for (int i = 0; i < 40; i++)
        pump(5);  /* quiet for 200 ms: PINGs go both ways */
    tcp_pair(&app, &theirs);
    CHECK(nh_stream_attach(E, (uint64_t)s5, theirs) == 0, "attach");
    size_t got = 0;
    for (int tries = 0; tries < 4000; tries++) {
        char in[65536];
        ssize_t r = read(app, in, sizeof in);
        if (r == 0)
            break;
        if (r > 0) {
            for (ssize_t i = 0; i < r; i++)
                CHECK(in[i] == early[got + (size_t)i], "early byte %zu differs", got + (size_t)i);
            got += (size_t)r;
        } else {
            CHECK(errno == EAGAIN, "early read: %s", strerror(errno));
            pump(1);
        }
    }
    CHECK(got == sizeof early, "got %zu early bytes", got);
    CHECK(transfer(app, srv5, 5000, 5) == 5000, "after attach");
    end = wait_event(NH_EV_STREAM_END, 0, (uint64_t)s5);
    CHECK(end->how == NH_END_CLOSED && end->to_peer == 5000 && end->from_peer == sizeof early, "deferred end %u", end->how);
    close(app);

    /* a socket for a stream that has ended is reset */
    int64_t s6 = nh_stream_open(E, (uint64_t)conn, -1, "10.0.0.1:80", NULL, 0);
    wait_event(NH_EV_RESPONSE, 0, (uint64_t)s6);
    CHECK(nh_stream_reset(E, (uint64_t)s6) == 0, "reset s6");
    CHECK(wait_event(NH_EV_STREAM_END, 0, (uint64_t)s6)->how == NH_END_ABORTED, "s6 aborted");
    tcp_pair(&app, &theirs);
    CHECK(nh_stream_attach(E, (uint64_t)s6, theirs) == 0, "attach to an ended stream");
    int reset_seen = 0;
    for (int tries = 0; tries < 2000 && !reset_seen; tries++) {
        char in[16];
        ssize_t r = read(app, in, sizeof in);
        CHECK(r != 0, "EOF, not a reset");
        reset_seen = r < 0 && errno == ECONNRESET;
        if (!reset_seen)
            pump(1);
    }
    CHECK(reset_seen, "the socket of an ended stream was not reset");
    close(app);
    for (int i = 0; i < nev; i++)
        CHECK(!(evs[i].type == NH_EV_CONN_END && evs[i].conn == (uint64_t)conn), "the connection ended: %u",
              evs[i].how);

    /* a plaintext peer, and a server that is not who we expect */
    int raw = dial();
    CHECK(write(raw, "GET / HTTP/1.1\r\n\r\n", 18) == 18, "raw write");
    int64_t wrong = nh_conn_client(E, dial(), client_tls, "spiffe://cluster.local/ns/x/sa/y");
    CHECK(wait_event(NH_EV_CONN_END, (uint64_t)wrong, 0)->how == NH_END_IDENTITY, "wrong identity");
    int tls_ends = 0;
    for (int tries = 0; tries < 1000 && tls_ends == 0; tries++) {
        for (int i = 0; i < nev; i++)
            tls_ends += evs[i].type == NH_EV_CONN_END && evs[i].how == NH_END_TLS;
        pump(5);
    }
    CHECK(tls_ends == 1, "the plaintext peer was not refused");
    close(raw);

    /* a connection closed cleanly lingers until its peer's EOF (the client side of c2; the server
     * side too when it reads the GOAWAY before the FIN) */
    int64_t c2 = nh_conn_client(E, dial(), client_tls, argv[4]);
    wait_event(NH_EV_CONN_UP, (uint64_t)c2, 0);
    CHECK(nh_conn_close(E, (uint64_t)c2, 0) == 0, "close c2");
    CHECK(wait_event(NH_EV_CONN_END, (uint64_t)c2, 0)->how == NH_END_CLOSED, "c2 end");
    for (int tries = 0; tries < 1000; tries++) {
        nh_engine_stats(E, &st);
        if (st.lingering == 0 && st.lingered >= 1)
            break;
        pump(5);
    }
    CHECK(st.lingering == 0 && st.lingered >= 1, "lingering %lu, lingered %lu", (unsigned long)st.lingering,
          (unsigned long)st.lingered);
    /* and one may still linger at the stop below */
    int64_t c3 = nh_conn_client(E, dial(), client_tls, argv[4]);
    wait_event(NH_EV_CONN_UP, (uint64_t)c3, 0);
    CHECK(nh_conn_close(E, (uint64_t)c3, 0) == 0, "close c3");
    wait_event(NH_EV_CONN_END, (uint64_t)c3, 0);

    if (argc == 6 && !strcmp(argv[5], "listeners"))
        listener_case((uint64_t)conn);

    /* stop with a stream open, then free */
    tcp_pair(&app, &theirs);
    int64_t s4 = nh_stream_open(E, (uint64_t)conn, theirs, "10.0.0.1:80", NULL, 0);
    wait_event(NH_EV_RESPONSE, 0, (uint64_t)s4);
    atomic_store(&stop_stats, 1);
    pthread_join(reader, NULL);
    nh_engine_stop(E);
    struct nh_event tail[64];
    size_t n, stopped = 0;
    while ((n = nh_engine_events(E, tail, 64)) > 0)
        for (size_t i = 0; i < n; i++) {
            stopped += tail[i].type == NH_EV_STREAM_END && tail[i].how == NH_END_STOPPED;
            nh_event_release(&tail[i]);
        }
    CHECK(stopped == 2, "%zu streams ended STOPPED, expected 2", stopped);
    CHECK(nh_stream_open(E, (uint64_t)conn, dup(app), "10.0.0.1:80", NULL, 0) == -ESHUTDOWN, "open after stop");
    nh_engine_stats(E, &st);
    CHECK(st.conns_open == 0 && st.streams_open == 0 && st.bytes_held == 0 && st.stream_buffers == 0
          && st.lingering == 0 && st.h2_held == 0, "left open: %lu conns %lu streams %lu bytes",
          (unsigned long)st.conns_open, (unsigned long)st.streams_open, (unsigned long)st.bytes_held);
    nh_engine_free(E);
    close(app);
    for (int i = 0; i < napps; i++)
        close(server_app[i]);
    close(listener);
    budget_case(client_tls, argv[4]);
    nh_tls_free(server_tls);
    nh_tls_free(client_tls);
    printf("hbone_sanity: ok\n");
    return 0;
}
