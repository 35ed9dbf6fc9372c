/* relay_sanity.c - drives native/relay.c through its API alone, for a build with
 * sanitizers (test_native_sanitizers.py: AddressSanitizer + LeakSanitizer + UBSan, and
 * ThreadSanitizer): bytes both ways with FIN over TCP and unix sockets, a reset passed
 * on, abort, the relay limit, stop with relays open, add after stop, free, each in splice
 * and in copy mode; then adds and aborts from four threads at once. Exits 0 when every check held; prints the first that did not.
 *
 * Usage: relay_sanity   (built with: gcc -fsanitize=... relay_sanity.c relay.c -lpthread)
 */
#define _GNU_SOURCE
#include "relay.h"

#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: check failed: %s (errno %d)\n", __FILE__, __LINE__, \
                    #cond, errno);                                                     \
            exit(1);                                                                   \
        }                                                                              \
    } while (0)

#define TRANSFER (1 << 20)

static int listener = -1;

/* (ours, theirs) of one loopback TCP connection, or of a unix socketpair. */
static void connected(int unix_pair, int *ours, int *theirs)
{
    if (unix_pair) {
        int sv[2];
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        *ours = sv[0];
        *theirs = sv[1];
        return;
    }
    struct sockaddr_in addr;
    socklen_t len = sizeof addr;
    CHECK(getsockname(listener, (struct sockaddr *)&addr, &len) == 0);
    *ours = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(*ours >= 0);
    CHECK(connect(*ours, (struct sockaddr *)&addr, len) == 0);
    *theirs = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    CHECK(*theirs >= 0);
}

/* The next end the engine reports (waits on its notify fd). */
static struct na_end next_end(struct na_engine *e)
{
    struct na_end end;
    for (;;) {
        if (na_engine_ends(e, &end, 1) == 1)
            return end;
        struct pollfd p = {.fd = na_engine_notify_fd(e), .events = POLLIN};
        CHECK(poll(&p, 1, 5000) == 1);
        uint64_t count;
        (void)!read(p.fd, &count, sizeof count);
    }
}

struct sender {
    int fd;
    unsigned char seed;
};

static void *send_all(void *arg)
{
    struct sender *s = arg;
    static __thread unsigned char block[65536];
    size_t sent = 0;
    while (sent < TRANSFER) {
        for (size_t i = 0; i < sizeof block; i++)
            block[i] = (unsigned char)(s->seed + (sent + i) * 7);
        ssize_t n = send(s->fd, block, sizeof block, MSG_NOSIGNAL);
        CHECK(n > 0);
        sent += (size_t)n;  /* a short send would shift the pattern: blocking sends are whole */
        CHECK(n == (ssize_t)sizeof block);
    }
    CHECK(shutdown(s->fd, SHUT_WR) == 0);
    return NULL;
}

static void receive_all(int fd, unsigned char seed)
{
    static unsigned char buf[65536];
    size_t got = 0;
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        CHECK(n >= 0);
        if (n == 0)
            break;
        for (ssize_t i = 0; i < n; i++)
            CHECK(buf[i] == (unsigned char)(seed + (got + (size_t)i) * 7));
        got += (size_t)n;
    }
    CHECK(got == TRANSFER);
}

static void both_ways(struct na_engine *e, int unix_pair)
{
    int client, a, server, b;
    connected(unix_pair, &client, &a);
    connected(unix_pair, &server, &b);
    int64_t id = na_relay_add(e, a, b);
    CHECK(id > 0);
    pthread_t up, down;
    struct sender su = {client, 11}, sd = {server, 97};
    CHECK(pthread_create(&up, NULL, send_all, &su) == 0);
    CHECK(pthread_create(&down, NULL, send_all, &sd) == 0);
    receive_all(server, 11);
    receive_all(client, 97);
    pthread_join(up, NULL);
    pthread_join(down, NULL);
    struct na_end end = next_end(e);
    CHECK(end.id == (uint64_t)id && end.how == NA_END_CLOSED && end.error == 0);
    CHECK(end.a_to_b == TRANSFER && end.b_to_a == TRANSFER);
    close(client);
    close(server);
}

#define expect_reset(fd) expect_reset_at(fd, __LINE__)
static void expect_reset_at(int fd, int line)
{
    char c;
    errno = 0;
    ssize_t n = recv(fd, &c, 1, 0);
    if (!(n < 0 && errno == ECONNRESET))
        fprintf(stderr, "line %d: recv gave %zd, not a reset\n", line, n);
    CHECK(n < 0 && errno == ECONNRESET);
    close(fd);
}

static void reset_and_abort(struct na_engine *e)
{
    int client, a, server, b;
    connected(0, &client, &a);
    connected(0, &server, &b);
    int64_t id = na_relay_add(e, a, b);
    CHECK(id > 0);
    CHECK(send(client, "x", 1, 0) == 1);
    char c;
    CHECK(recv(server, &c, 1, 0) == 1);
    struct linger lg = {1, 0};
    CHECK(setsockopt(client, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) == 0);
    close(client);  /* RST */
    expect_reset(server);
    struct na_end end = next_end(e);
    CHECK(end.id == (uint64_t)id && end.how == NA_END_ERROR && end.error == ECONNRESET && end.a_to_b == 1);

    connected(0, &client, &a);
    connected(0, &server, &b);
    id = na_relay_add(e, a, b);
    CHECK(id > 0);
    CHECK(na_relay_abort(e, (uint64_t)id) == 0);
    end = next_end(e);
    CHECK(end.id == (uint64_t)id && end.how == NA_END_ABORTED && end.error == 0);
    CHECK(na_relay_abort(e, (uint64_t)id) == -ESRCH);  /* ended */
    expect_reset(client);
    expect_reset(server);
}

static void limit_stop_and_free(uint32_t flags)
{
    struct na_config config = {.max_relays = 2, .pipe_size = 16384, .flags = flags};
    struct na_engine *e = NULL;
    CHECK(na_engine_new(&config, &e) == 0);
    int peers[6], ends[6];
    for (int i = 0; i < 3; i++) {
        connected(i % 2, &peers[2 * i], &ends[2 * i]);
        connected(0, &peers[2 * i + 1], &ends[2 * i + 1]);
    }
    CHECK(na_relay_add(e, ends[0], ends[1]) > 0);
    CHECK(na_relay_add(e, ends[2], ends[3]) > 0);
    CHECK(na_relay_add(e, ends[4], ends[5]) == -ENOSPC);  /* and both reset */
    expect_reset(peers[5]);
    close(peers[4]);
    struct na_stats stats;
    na_engine_stats(e, &stats);
    CHECK(stats.relays_open == 2 && stats.max_relays == 2 && stats.pipe_size == 16384);
    na_engine_stop(e);
    for (int i = 0; i < 2; i++) {
        struct na_end end;
        CHECK(na_engine_ends(e, &end, 1) == 1 && end.how == NA_END_STOPPED);
    }
    int x1, y1, x2, y2;
    connected(0, &x1, &y1);
    connected(0, &x2, &y2);
    CHECK(na_relay_add(e, y1, y2) == -ESHUTDOWN);  /* and both reset */
    expect_reset(x1);
    expect_reset(x2);
    for (int i = 0; i < 4; i++) {
        if (i == 2) {  /* a unix socket: closed is all its peer can see */
            char c;
            CHECK(recv(peers[i], &c, 1, 0) == 0);
            close(peers[i]);
        } else {
            expect_reset(peers[i]);
        }
    }
    na_engine_free(e);
}

/* Four threads add idle relays over unix socketpairs and abort every other one while
 * this thread takes the ends: every abort is reported once, the rest end at stop. */
#define STORM_THREADS 4
#define STORM_EACH 40  /* 4 fds each: 640 in all, under a default limit of 1024 */

struct storm {
    struct na_engine *e;
    int peers[2 * STORM_EACH];
};

static void *storm_adder(void *arg)
{
    struct storm *s = arg;
    for (int i = 0; i < STORM_EACH; i++) {
        int a, b;
        connected(1, &s->peers[2 * i], &a);
        connected(1, &s->peers[2 * i + 1], &b);
        int64_t id = na_relay_add(s->e, a, b);
        CHECK(id > 0);
        if (i % 2)
            CHECK(na_relay_abort(s->e, (uint64_t)id) == 0);
    }
    return NULL;
}

static void storm(void)
{
    struct na_config config = {.max_relays = 1024, .pipe_size = 65536};
    struct na_engine *e = NULL;
    CHECK(na_engine_new(&config, &e) == 0);
    static struct storm storms[STORM_THREADS];
    pthread_t threads[STORM_THREADS];
    for (int t = 0; t < STORM_THREADS; t++) {
        storms[t].e = e;
        CHECK(pthread_create(&threads[t], NULL, storm_adder, &storms[t]) == 0);
    }
    for (int aborted = 0; aborted < STORM_THREADS * STORM_EACH / 2; aborted++)
        CHECK(next_end(e).how == NA_END_ABORTED);
    for (int t = 0; t < STORM_THREADS; t++)
        pthread_join(threads[t], NULL);
    na_engine_stop(e);
    struct na_end ends[64];
    size_t stopped = 0, n;
    while ((n = na_engine_ends(e, ends, 64)) > 0)
        for (size_t i = 0; i < n; i++, stopped++)
            CHECK(ends[i].how == NA_END_STOPPED);
    CHECK(stopped == STORM_THREADS * STORM_EACH / 2);
    struct na_stats stats;
    na_engine_stats(e, &stats);
    CHECK(stats.relays_total == STORM_THREADS * STORM_EACH && stats.relays_open == 0);
    CHECK(stats.relays_aborted == STORM_THREADS * STORM_EACH / 2);
    na_engine_free(e);
    for (int t = 0; t < STORM_THREADS; t++)
        for (int i = 0; i < 2 * STORM_EACH; i++)
            close(storms[t].peers[i]);
}

int main(void)
{
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(listener >= 0);
    CHECK(bind(listener, (struct sockaddr *)&addr, sizeof addr) == 0);
    CHECK(listen(listener, 16) == 0);
    struct na_config bad = {.max_relays = 0, .pipe_size = 65536};
    struct na_engine *e = NULL;
    CHECK(na_engine_new(&bad, &e) == -EINVAL);
    for (uint32_t flags = 0; flags <= NA_COPY_ONLY; flags++) {
        struct na_config config = {.max_relays = 64, .pipe_size = 65536, .flags = flags};
        CHECK(na_engine_new(&config, &e) == 0);
        both_ways(e, 0);
        both_ways(e, 1);
        reset_and_abort(e);
        CHECK(na_relay_abort(e, 12345) == -ESRCH);
        struct na_stats stats;
        na_engine_stats(e, &stats);
        CHECK(stats.relays_total == 4 && stats.relays_open == 0 && stats.bytes_held == 0);
        CHECK(flags ? stats.copy_directions >= 4 : stats.copy_directions == 0);
        na_engine_free(e);
        limit_stop_and_free(flags);
    }
    storm();
    close(listener);
    puts("relay_sanity: ok");
    return 0;
}
