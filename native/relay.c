/* relay.c - the native relay engine (see relay.h for the API, ownership and threads).
 *
 * One epoll thread per engine, edge-triggered: every event on either socket of a relay
 * pumps both of its directions until the kernel says EAGAIN or the direction has used
 * its budget for this round (then the relay goes on the ready list, so one busy relay
 * cannot starve the others). A direction moves bytes with splice(2): socket -> pipe ->
 * socket, at most pipe_size held. Pipes come from a small pool and go back to it as soon
 * as they are empty, so an idle relay holds only its two sockets. Where splice is
 * refused (EINVAL and the like), or no pipe can be had, that direction reads and writes
 * through a buffer of the same size instead.
 *
 * State shared with other threads (slots, the add/abort queues, the end ring) is under
 * `lock`; everything about a registered relay is the engine thread's alone. A relay keeps
 * its slot until its end has been taken by na_engine_ends, so its id stays unique until
 * the caller has seen it end, and at most max_relays ends are ever queued.
 */
#define _GNU_SOURCE
#include "relay.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define EVENTS 256                 /* epoll events taken per wait */
#define POOL_MAX 64                /* empty pipes kept for reuse */
#define MIN_ROUND (256u << 10)     /* bytes a relay may move per round, at least */
#define DEFAULT_PIPE 65536u        /* a new pipe's size: no F_SETPIPE_SZ needed for it */
#define WAKE_TAG ((void *)0)       /* epoll data of the wake eventfd */

struct dir {                       /* one direction: read from fd[i], written to fd[1 - i] */
    int pipe[2];                   /* while it holds bytes (splice), else -1 */
    char *buf;                     /* copy mode: buf[off..len) are held */
    uint32_t off, len;
    uint32_t held;                 /* bytes read and not yet written */
    uint64_t moved;                /* bytes written */
    bool copy;                     /* read/write instead of splice */
    bool blocked;                  /* its last write found the out socket full */
    bool more;                     /* stopped by the round's budget: pumped again next round */
    bool eof;                      /* the reading side sent FIN */
    bool done;                     /* ... and it was passed on */
};

struct relay;
struct side {                      /* what an epoll event points at */
    struct relay *relay;
    int index;
};

struct relay {
    uint64_t id;
    int fd[2];                     /* a, b */
    struct dir dir[2];             /* a -> b, b -> a */
    struct side side[2];
    bool out_armed[2];             /* EPOLLOUT asked for on fd[i]: dir[1 - i] waits to write */
    bool registered, ended, ready, abort_requested;
    struct relay *next;            /* add queue, then ready list or graveyard */
};

struct pipe_pair {
    int r, w;
};

struct na_engine {
    struct na_config config;
    uint32_t round;                /* bytes per relay per round */
    int epfd, wakefd, notifyfd;
    pthread_t thread;
    bool thread_running;

    pthread_mutex_t lock;          /* guards everything down to `thread only` */
    struct relay **slots;          /* slot -> open relay (NULL once ended) */
    uint32_t *gens;                /* generation per slot, part of the id */
    uint32_t *free_slots, nfree;   /* slots whose end was taken */
    struct relay *adds, *adds_tail;
    uint32_t *aborts, naborts;     /* slots with an abort to do, each at most once */
    bool *abort_queued;            /* per slot: in `aborts` */
    struct na_end *ends;           /* ring of max_relays */
    uint32_t ends_head, nends;
    bool stopping;                 /* no more adds; the thread ends */
    int32_t fatal;

    /* thread only */
    struct relay *ready, *graveyard;
    struct pipe_pair pool[POOL_MAX];
    int npool;

    /* counters: written with atomics, read by na_engine_stats from any thread */
    uint64_t relays_total, relays_ended, relays_failed, relays_aborted;
    uint64_t bytes[2], bytes_held, copy_directions, pipes, wakeups, empty_reads;
};

#define ADD(field, n) __atomic_add_fetch(&(field), (n), __ATOMIC_RELAXED)
#define SUB(field, n) __atomic_sub_fetch(&(field), (n), __ATOMIC_RELAXED)
#define LOAD(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)

static void *engine_main(void *arg);

/* ---- helpers ------------------------------------------------------------------------ */

static void poke(int fd)
{
    uint64_t one = 1;
    while (write(fd, &one, sizeof one) < 0 && errno == EINTR)
        ;
}

static void drain_eventfd(int fd)
{
    uint64_t count;
    while (read(fd, &count, sizeof count) < 0 && errno == EINTR)
        ;
}

/* Close a socket so that its peer sees a reset: SO_LINGER 0 sends RST (AF_UNIX ignores
 * it; a close there is what the peer sees). */
static void reset_close(int fd)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

static int sock_error(int fd)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return errno;
    return err;
}

static int stream_socket(int fd)
{
    int type = 0;
    socklen_t len = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
        return -errno;
    if (type != SOCK_STREAM)
        return -EPROTOTYPE;
    if (fcntl(fd, F_SETFL, O_NONBLOCK) < 0)
        return -errno;
    return 0;
}

/* ---- engine life ---------------------------------------------------------------------- */

/* The per-slot arrays sized by max_relays: freed by na_engine_new's failure path (some
 * may be NULL there) and by na_engine_free, so a new array is added in one place. */
static void free_arrays(struct na_engine *e)
{
    free(e->slots);
    free(e->gens);
    free(e->free_slots);
    free(e->aborts);
    free(e->abort_queued);
    free(e->ends);
}

int na_engine_new(const struct na_config *config, struct na_engine **out)
{
    if (config->max_relays < 1 || config->max_relays > (1u << 20) || config->pipe_size < 4096 ||
        config->pipe_size > (1u << 20) || (config->flags & ~(uint32_t)NA_COPY_ONLY))
        return -EINVAL;
    struct na_engine *e = calloc(1, sizeof *e);
    if (!e)
        return -ENOMEM;
    e->config = *config;
    e->round = config->pipe_size * 4 > MIN_ROUND ? config->pipe_size * 4 : MIN_ROUND;
    e->epfd = e->wakefd = e->notifyfd = -1;
    uint32_t n = config->max_relays;
    e->slots = calloc(n, sizeof *e->slots);
    e->gens = calloc(n, sizeof *e->gens);
    e->free_slots = malloc(n * sizeof *e->free_slots);
    e->aborts = malloc(n * sizeof *e->aborts);
    e->abort_queued = calloc(n, sizeof *e->abort_queued);
    e->ends = malloc(n * sizeof *e->ends);
    int err = -ENOMEM;
    if (!e->slots || !e->gens || !e->free_slots || !e->aborts || !e->abort_queued || !e->ends)
        goto fail;
    for (uint32_t i = 0; i < n; i++)
        e->free_slots[i] = n - 1 - i;  /* slot 0 is taken first */
    e->nfree = n;
    if ((err = pthread_mutex_init(&e->lock, NULL)) != 0) {
        err = -err;
        goto fail;
    }
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    e->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->notifyfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->epfd < 0 || e->wakefd < 0 || e->notifyfd < 0) {
        err = -errno;
        goto fail_lock;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = WAKE_TAG};
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wakefd, &ev) < 0) {
        err = -errno;
        goto fail_lock;
    }
    /* The thread takes no signal: they stay for the caller's threads (Python's main
     * thread), and a SIGPIPE from splice to a reset socket is never delivered. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    err = pthread_create(&e->thread, NULL, engine_main, e);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err != 0) {
        err = -err;
        goto fail_lock;
    }
    e->thread_running = true;
    *out = e;
    return 0;

fail_lock:
    pthread_mutex_destroy(&e->lock);
fail:
    if (e->epfd >= 0)
        close(e->epfd);
    if (e->wakefd >= 0)
        close(e->wakefd);
    if (e->notifyfd >= 0)
        close(e->notifyfd);
    free_arrays(e);
    free(e);
    return err;
}

int na_engine_notify_fd(const struct na_engine *e)
{
    return e->notifyfd;
}

void na_engine_stop(struct na_engine *e)
{
    pthread_mutex_lock(&e->lock);
    bool running = e->thread_running;
    e->stopping = true;
    e->thread_running = false;
    pthread_mutex_unlock(&e->lock);
    if (!running)
        return;
    poke(e->wakefd);
    pthread_join(e->thread, NULL);
}

void na_engine_free(struct na_engine *e)
{
    if (!e)
        return;
    na_engine_stop(e);
    for (int i = 0; i < e->npool; i++) {
        close(e->pool[i].r);
        close(e->pool[i].w);
    }
    close(e->epfd);
    close(e->wakefd);
    close(e->notifyfd);
    pthread_mutex_destroy(&e->lock);
    free_arrays(e);
    free(e);
}

void na_engine_stats(const struct na_engine *e, struct na_stats *out)
{
    struct na_engine *m = (struct na_engine *)e;  /* the lock is the only thing written */
    memset(out, 0, sizeof *out);
    out->relays_total = LOAD(m->relays_total);
    out->relays_open = out->relays_total - LOAD(m->relays_ended);
    out->relays_failed = LOAD(m->relays_failed);
    out->relays_aborted = LOAD(m->relays_aborted);
    out->bytes_a_to_b = LOAD(m->bytes[0]);
    out->bytes_b_to_a = LOAD(m->bytes[1]);
    out->bytes_held = LOAD(m->bytes_held);
    out->copy_directions = LOAD(m->copy_directions);
    out->pipes = LOAD(m->pipes);
    out->wakeups = LOAD(m->wakeups);
    out->empty_reads = LOAD(m->empty_reads);
    out->max_relays = e->config.max_relays;
    out->pipe_size = e->config.pipe_size;
    out->flags = e->config.flags;
    pthread_mutex_lock(&m->lock);
    out->ends_queued = m->nends;
    out->fatal = m->fatal;
    pthread_mutex_unlock(&m->lock);
}

/* ---- calls from the caller's threads ---------------------------------------------------- */

int64_t na_relay_add(struct na_engine *e, int fd_a, int fd_b)
{
    if (fd_a < 0 || fd_b < 0 || fd_a == fd_b)
        return -EBADF;
    int err = stream_socket(fd_a);
    if (!err)
        err = stream_socket(fd_b);
    struct relay *r = err ? NULL : calloc(1, sizeof *r);
    if (!err && !r)
        err = -ENOMEM;
    if (err)
        goto refuse;
    r->fd[0] = fd_a;
    r->fd[1] = fd_b;
    for (int i = 0; i < 2; i++) {
        r->dir[i].pipe[0] = r->dir[i].pipe[1] = -1;
        r->dir[i].copy = e->config.flags & NA_COPY_ONLY;
        r->side[i].relay = r;
        r->side[i].index = i;
    }
    pthread_mutex_lock(&e->lock);
    if (e->stopping)
        err = -ESHUTDOWN;
    else if (e->nfree == 0)
        err = -ENOSPC;
    if (err) {
        pthread_mutex_unlock(&e->lock);
        free(r);
        goto refuse;
    }
    uint32_t slot = e->free_slots[--e->nfree];
    if (++e->gens[slot] >= (1u << 31))
        e->gens[slot] = 1;
    uint64_t id = ((uint64_t)e->gens[slot] << 32) | slot;
    r->id = id;  /* r is the engine's once queued: it may end and be freed before we return */
    e->slots[slot] = r;
    bool wake = !e->adds && !e->naborts;
    if (e->adds_tail)
        e->adds_tail->next = r;
    else
        e->adds = r;
    e->adds_tail = r;
    ADD(e->relays_total, 1);  /* before the engine can count its end */
    pthread_mutex_unlock(&e->lock);
    if (wake)
        poke(e->wakefd);
    return (int64_t)id;

refuse:
    reset_close(fd_a);
    reset_close(fd_b);
    return err;
}

int na_relay_abort(struct na_engine *e, uint64_t id)
{
    uint32_t slot = (uint32_t)id;
    int err = -ESRCH;
    pthread_mutex_lock(&e->lock);
    struct relay *r = slot < e->config.max_relays ? e->slots[slot] : NULL;
    bool wake = false;
    if (r && r->id == id && !e->stopping) {
        err = 0;
        r->abort_requested = true;
        if (!e->abort_queued[slot]) {
            e->abort_queued[slot] = true;
            wake = !e->adds && !e->naborts;
            e->aborts[e->naborts++] = slot;
        }
    }
    pthread_mutex_unlock(&e->lock);
    if (wake)
        poke(e->wakefd);
    return err;
}

size_t na_engine_ends(struct na_engine *e, struct na_end *out, size_t max)
{
    size_t n = 0;
    uint32_t cap = e->config.max_relays;
    pthread_mutex_lock(&e->lock);
    while (n < max && e->nends > 0) {
        out[n] = e->ends[e->ends_head];
        e->ends_head = (e->ends_head + 1) % cap;
        e->nends--;
        e->free_slots[e->nfree++] = (uint32_t)out[n].id;  /* its id may now be reused */
        n++;
    }
    pthread_mutex_unlock(&e->lock);
    return n;
}

/* ---- the engine thread: pipes ----------------------------------------------------------- */

static int take_pipe(struct na_engine *e, struct dir *d)
{
    if (e->npool > 0) {
        struct pipe_pair p = e->pool[--e->npool];
        d->pipe[0] = p.r;
        d->pipe[1] = p.w;
        return 0;
    }
    if (pipe2(d->pipe, O_NONBLOCK | O_CLOEXEC) < 0) {
        d->pipe[0] = d->pipe[1] = -1;
        return errno;
    }
    ADD(e->pipes, 1);
    /* Best effort: a user over pipe-user-pages-soft gets smaller pipes; held stays
     * bounded by pipe_size either way, splice just says EAGAIN sooner. */
    if (e->config.pipe_size != DEFAULT_PIPE)
        fcntl(d->pipe[1], F_SETPIPE_SZ, (int)e->config.pipe_size);
    return 0;
}

/* An empty pipe goes back to the pool; one still holding bytes is closed with them. */
static void give_pipe(struct na_engine *e, struct dir *d)
{
    if (d->pipe[0] < 0)
        return;
    if (d->held == 0 && e->npool < POOL_MAX) {
        e->pool[e->npool++] = (struct pipe_pair){d->pipe[0], d->pipe[1]};
    } else {
        close(d->pipe[0]);
        close(d->pipe[1]);
        SUB(e->pipes, 1);
    }
    d->pipe[0] = d->pipe[1] = -1;
}

/* From now on this direction reads and writes through a buffer (NA_COPY_ONLY, splice
 * refused, or no pipe to be had); what its pipe holds moves into the buffer first. */
static int to_copy(struct na_engine *e, struct dir *d)
{
    if (!d->buf) {
        d->buf = malloc(e->config.pipe_size);
        if (!d->buf)
            return ENOMEM;
        d->off = d->len = 0;
        ADD(e->copy_directions, 1);
    }
    while (d->len < d->held) {
        ssize_t n = read(d->pipe[0], d->buf + d->len, d->held - d->len);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            return n < 0 ? errno : EIO;
        }
        d->len += (uint32_t)n;
    }
    give_pipe(e, d);
    d->copy = true;
    return 0;
}

static bool splice_refused(int err)
{
    return err == EINVAL || err == ENOSYS || err == EOPNOTSUPP;
}

/* ---- the engine thread: moving bytes ---------------------------------------------------- */

static ssize_t write_out(struct dir *d, int out)
{
    if (!d->copy)
        return splice(d->pipe[0], NULL, out, NULL, d->held, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    ssize_t n = send(out, d->buf + d->off, d->len - d->off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
        d->off += (uint32_t)n;
        if (d->off == d->len)
            d->off = d->len = 0;
    }
    return n;
}

static ssize_t read_in(struct na_engine *e, struct dir *d, int in)
{
    uint32_t room = e->config.pipe_size - d->held;
    if (!d->copy)
        return splice(in, NULL, d->pipe[1], NULL, room, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (d->off > 0) {
        memmove(d->buf, d->buf + d->off, d->len - d->off);
        d->len -= d->off;
        d->off = 0;
    }
    ssize_t n = recv(in, d->buf + d->len, room, MSG_DONTWAIT);
    if (n > 0)
        d->len += (uint32_t)n;
    return n;
}

/* Move what direction i can move now. Returns 0, or the errno that ends the relay;
 * *budget is what the relay may still move this round. */
static int pump(struct na_engine *e, struct relay *r, int i, uint64_t *budget)
{
    struct dir *d = &r->dir[i];
    int in = r->fd[i], out = r->fd[1 - i];
    bool dry = false;  /* a read found nothing: edge-triggered, the next bytes wake us again */
    while (!d->done) {
        bool progress = false;
        if (d->held > 0) {
            ssize_t n = write_out(d, out);
            d->blocked = n < 0 && errno == EAGAIN;
            if (n > 0) {
                d->held -= (uint32_t)n;
                d->moved += (uint64_t)n;
                SUB(e->bytes_held, (uint64_t)n);
                ADD(e->bytes[i], (uint64_t)n);
                *budget = *budget > (uint64_t)n ? *budget - (uint64_t)n : 0;
                progress = true;
                if (d->held == 0 && !d->copy)
                    give_pipe(e, d);
            } else if (n < 0 && errno == EINTR) {
                continue;
            } else if (n < 0 && !d->copy && splice_refused(errno)) {
                int err = to_copy(e, d);
                if (err)
                    return err;
                continue;
            } else if (n < 0 && errno != EAGAIN) {
                return errno;
            }
        }
        if (!d->eof && !dry && d->held < e->config.pipe_size && *budget > 0) {
            if (d->copy ? !d->buf : (d->pipe[0] < 0 && take_pipe(e, d) != 0)) {
                int err = to_copy(e, d);  /* no fd for a pipe: carry on without one */
                if (err)
                    return err;
            }
            ssize_t n = read_in(e, d, in);
            if (n > 0) {
                d->held += (uint32_t)n;
                ADD(e->bytes_held, (uint64_t)n);
                progress = true;
            } else if (n == 0) {
                d->eof = true;
                progress = true;
            } else if (errno == EINTR) {
                continue;
            } else if (!d->copy && splice_refused(errno)) {
                int err = to_copy(e, d);
                if (err)
                    return err;
                continue;
            } else if (errno != EAGAIN) {
                return errno;
            } else {
                dry = true;
                ADD(e->empty_reads, 1);
            }
            if (d->held == 0 && !d->copy)
                give_pipe(e, d);
        }
        if (d->eof && d->held == 0) {
            if (shutdown(out, SHUT_WR) < 0)
                return errno;  /* ENOTCONN: reset while we were not writing to it */
            d->done = true;
            break;
        }
        if (!progress)
            break;
        if (*budget == 0) {
            d->more = true;
            if (!r->ready) {  /* more next round, after the other relays */
                r->ready = true;
                r->next = e->ready;
                e->ready = r;
            }
            break;
        }
    }
    return 0;
}

/* ---- the engine thread: ends ----------------------------------------------------------- */

static void end_relay(struct na_engine *e, struct relay *r, uint32_t how, int err)
{
    r->ended = true;
    for (int i = 0; i < 2; i++) {
        if (r->registered)
            epoll_ctl(e->epfd, EPOLL_CTL_DEL, r->fd[i], NULL);
        if (how == NA_END_CLOSED)
            close(r->fd[i]);  /* FIN was passed on both ways: a plain close */
        else
            reset_close(r->fd[i]);
        struct dir *d = &r->dir[i];
        SUB(e->bytes_held, d->held);
        give_pipe(e, d);
        free(d->buf);
        d->buf = NULL;
    }
    struct na_end end = {.id = r->id, .a_to_b = r->dir[0].moved, .b_to_a = r->dir[1].moved,
                         .error = how == NA_END_ERROR ? err : 0, .how = how};
    uint32_t cap = e->config.max_relays;
    pthread_mutex_lock(&e->lock);
    e->slots[(uint32_t)r->id] = NULL;
    bool notify = e->nends == 0;
    e->ends[(e->ends_head + e->nends) % cap] = end;  /* room: this relay still holds its slot */
    e->nends++;
    pthread_mutex_unlock(&e->lock);
    ADD(e->relays_ended, 1);
    if (how == NA_END_ERROR)
        ADD(e->relays_failed, 1);
    else if (how == NA_END_ABORTED)
        ADD(e->relays_aborted, 1);
    if (notify)
        poke(e->notifyfd);
    if (!r->ready) {  /* freed after this round; one on the ready list when taken off it */
        r->next = e->graveyard;
        e->graveyard = r;
    }
}

/* Pump the directions in `dirs` (bit i: direction i), then end the relay if both are done. */
static void pump_relay(struct na_engine *e, struct relay *r, unsigned dirs)
{
    for (int i = 0; i < 2 && !r->ended; i++) {
        if (!(dirs & (1u << i)))
            continue;
        uint64_t budget = e->round;  /* each direction its own: a stream one way cannot starve the other */
        int err = pump(e, r, i, &budget);
        if (err)
            end_relay(e, r, NA_END_ERROR, err);
    }
    if (!r->ended && r->dir[0].done && r->dir[1].done)
        end_relay(e, r, NA_END_CLOSED, 0);
}

/* Interest in EPOLLOUT on fd[k] on or off. */
static void set_out(struct na_engine *e, struct relay *r, int k, bool on)
{
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET | (on ? EPOLLOUT : 0), .data.ptr = &r->side[k]};
    if (epoll_ctl(e->epfd, EPOLL_CTL_MOD, r->fd[k], &ev) < 0) {
        end_relay(e, r, NA_END_ERROR, errno);
        return;
    }
    r->out_armed[k] = on;
}

/* EPOLLOUT is asked for on a socket once the direction writing to it found it full, and
 * given up at the first writable event with nothing to write: a relay whose writes are
 * taken at once (requests and answers) never wakes for writability, where every read by
 * the peer (a unix socket's above all) made its socket writable again, and a bulk relay
 * that keeps filling its peer keeps the interest rather than changing it each time.
 * Edge-triggered, and EPOLL_CTL_MOD polls the socket, so one that became writable
 * before the MOD is still reported. */
static void arm(struct na_engine *e, struct relay *r)
{
    for (int k = 0; k < 2 && !r->ended; k++) {
        const struct dir *d = &r->dir[1 - k];
        if (!r->out_armed[k] && d->blocked && d->held > 0 && !d->done)
            set_out(e, r, k, true);
    }
}

/* An event on fd[s]: readable (or closed, or failed) pumps the direction reading it;
 * writable pumps the direction writing to it, if that one holds bytes. */
static void on_event(struct na_engine *e, struct side *s, uint32_t events)
{
    struct relay *r = s->relay;
    if (r->ended)
        return;
    int i = s->index;
    unsigned dirs = 0;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        dirs |= 1u << i;
    if ((events & (EPOLLHUP | EPOLLERR)) || ((events & EPOLLOUT) && r->dir[1 - i].held > 0))
        dirs |= 1u << (1 - i);
    else if ((events & EPOLLOUT) && r->out_armed[i])
        set_out(e, r, i, false);  /* writable with nothing to write: no more of these */
    pump_relay(e, r, dirs);
    /* A reset seen while that side is not read (FIN already taken, or its direction full):
     * pass it on now rather than when the other side next writes. */
    if (!r->ended && (events & EPOLLERR)) {
        int err = sock_error(r->fd[i]);
        if (err)
            end_relay(e, r, NA_END_ERROR, err);
    }
    arm(e, r);
}

static void register_relay(struct na_engine *e, struct relay *r)
{
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.ptr = &r->side[i]};
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, r->fd[i], &ev) < 0) {
            int err = errno;
            if (i == 1)
                epoll_ctl(e->epfd, EPOLL_CTL_DEL, r->fd[0], NULL);
            end_relay(e, r, NA_END_ERROR, err);
            return;
        }
    }
    r->registered = true;  /* epoll reports what is already readable: no pump needed here */
}

/* Adds and aborts queued by other threads; returns whether the engine is to stop. */
static bool take_commands(struct na_engine *e)
{
    drain_eventfd(e->wakefd);
    pthread_mutex_lock(&e->lock);
    struct relay *adds = e->adds;
    e->adds = e->adds_tail = NULL;
    struct relay *aborted[64];     /* relays are freed by this thread only: safe after unlock */
    uint32_t naborted = 0;
    while (e->naborts > 0 && naborted < 64) {
        uint32_t slot = e->aborts[--e->naborts];
        e->abort_queued[slot] = false;
        if (e->slots[slot] && e->slots[slot]->abort_requested)
            aborted[naborted++] = e->slots[slot];
    }
    bool more = e->naborts > 0;
    bool stopping = e->stopping;
    pthread_mutex_unlock(&e->lock);
    if (more)
        poke(e->wakefd);  /* the rest next round */
    while (adds) {
        struct relay *r = adds;
        adds = r->next;
        r->next = NULL;
        register_relay(e, r);
    }
    for (uint32_t i = 0; i < naborted; i++) {
        if (!aborted[i]->ended)  /* an add of this round may have failed and ended it */
            end_relay(e, aborted[i], NA_END_ABORTED, 0);
    }
    return stopping;
}

static void bury(struct na_engine *e)
{
    while (e->graveyard) {
        struct relay *r = e->graveyard;
        e->graveyard = r->next;
        free(r);
    }
}

/* The relays that had more to move last round (taken off e->ready before this round's
 * events, so one pumped by an event now is not pumped twice, and not re-queued onto a
 * list being walked). */
static void run_ready(struct na_engine *e, struct relay *list)
{
    while (list) {
        struct relay *r = list;
        list = r->next;
        r->ready = false;
        if (r->ended) {
            free(r);  /* ended while waiting here: not in the graveyard */
            continue;
        }
        unsigned dirs = (r->dir[0].more ? 1u : 0u) | (r->dir[1].more ? 2u : 0u);
        r->dir[0].more = r->dir[1].more = false;
        pump_relay(e, r, dirs);
        arm(e, r);
    }
}

/* Stop: every relay still open (or queued to be added) is reset and reported. */
static void stop_all(struct na_engine *e)
{
    take_commands(e);  /* adds queued before `stopping` was set are registered first */
    for (uint32_t slot = 0; slot < e->config.max_relays; slot++) {
        pthread_mutex_lock(&e->lock);
        struct relay *r = e->slots[slot];
        pthread_mutex_unlock(&e->lock);
        if (r && !r->ended)
            end_relay(e, r, NA_END_STOPPED, 0);
    }
    struct relay *ready = e->ready;
    e->ready = NULL;
    run_ready(e, ready);
    bury(e);
}

static void *engine_main(void *arg)
{
    struct na_engine *e = arg;
    struct epoll_event events[EVENTS];
    for (;;) {
        int n = epoll_wait(e->epfd, events, EVENTS, e->ready ? 0 : -1);
        if (n < 0 && errno != EINTR) {
            pthread_mutex_lock(&e->lock);
            e->fatal = errno;
            e->stopping = true;
            pthread_mutex_unlock(&e->lock);
            break;
        }
        if (n > 0)
            ADD(e->wakeups, 1);
        struct relay *ready = e->ready;
        e->ready = NULL;
        bool woken = false;
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == WAKE_TAG)
                woken = true;
            else
                on_event(e, events[i].data.ptr, events[i].events);
        }
        run_ready(e, ready);
        bool stop = woken && take_commands(e);
        bury(e);
        if (stop)
            break;
    }
    stop_all(e);
    return NULL;
}
