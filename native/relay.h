/* relay.h - the native relay engine of nodeagent's data path (issue 11).
 *
 * Python decides, C moves bytes: once the agent has decided a connection (destination,
 * identity, policy), it hands the engine the two connected stream sockets of the hop and
 * gets back an id; the engine's own thread moves the bytes both ways with splice(2)
 * through one bounded pipe per direction (read/write through a buffer of the same size
 * where splice is refused), passes a FIN on as a FIN (shutdown(SHUT_WR), half-close) and
 * a reset as a reset (SO_LINGER 0, then close), and reports each end (bytes each way,
 * errno) through a queue Python drains when the notify fd is readable. The engine never
 * calls into Python.
 *
 * Ownership
 *   - na_relay_add takes both fds in every case: on success the engine closes them when
 *     the relay ends; on failure it has reset and closed them before returning (so the
 *     peers see a reset). The caller must hold no other reference that could close or
 *     read them (Python: socket.detach()).
 *   - Pipes, buffers and relay state are the engine's; na_engine_free releases them.
 *   - struct na_end / na_stats are filled into memory the caller owns.
 *
 * Threads
 *   - na_engine_new starts one thread (all signals blocked in it); it alone touches the
 *     sockets and pipes of open relays.
 *   - na_relay_add, na_relay_abort, na_engine_ends, na_engine_stats and
 *     na_engine_notify_fd may be called from any thread, concurrently.
 *   - na_engine_stop and na_engine_free: from one thread, no other call during or after
 *     free. stop resets every open relay and joins the thread; its ends stay queued for
 *     na_engine_ends.
 *
 * Errors
 *   Functions return 0 (or a positive id / count) on success and a negative errno on
 *   failure. An end carries a positive errno (0: both directions closed with FIN, or the
 *   relay was aborted or stopped: see `how`).
 *
 * Back-pressure
 *   At most `pipe_size` bytes per direction are held (read from one side, not yet written
 *   to the other); a side is not read while its direction holds that much, so TCP's
 *   window pushes back on its sender.
 *
 * The block between cffi-begin and cffi-end is also the cffi cdef (nodeagent/native/
 * build.py reads it): declarations and integer #defines only.
 */
#ifndef NODEAGENT_RELAY_H
#define NODEAGENT_RELAY_H

#include <stddef.h>
#include <stdint.h>

/* cffi-begin */
#define NA_RELAY_API 1            /* bumped on any change of the functions or structs below */

#define NA_COPY_ONLY 1            /* na_config.flags: never splice, always read/write */

#define NA_END_CLOSED 1           /* both directions ended with a FIN passed on */
#define NA_END_ERROR 2            /* a socket error (error: its errno); both sides reset */
#define NA_END_ABORTED 3          /* na_relay_abort: both sides reset */
#define NA_END_STOPPED 4          /* na_engine_stop with the relay open: both sides reset */

struct na_config {
    uint32_t max_relays;          /* relays open at once (1..1048576); more: -ENOSPC */
    uint32_t pipe_size;           /* bytes held per direction at most (4096..1048576) */
    uint32_t flags;               /* NA_COPY_ONLY */
};

struct na_end {
    uint64_t id;
    uint64_t a_to_b;              /* bytes written to b that were read from a */
    uint64_t b_to_a;
    int32_t error;                /* positive errno for NA_END_ERROR, else 0 */
    uint32_t how;                 /* NA_END_* */
};

struct na_stats {
    uint64_t relays_open;         /* now */
    uint64_t relays_total;        /* added since start */
    uint64_t relays_failed;       /* ended NA_END_ERROR */
    uint64_t relays_aborted;      /* ended NA_END_ABORTED */
    uint64_t bytes_a_to_b;        /* over every relay, as written */
    uint64_t bytes_b_to_a;
    uint64_t bytes_held;          /* read from one side and not yet written, now */
    uint64_t copy_directions;     /* directions that moved bytes with read/write */
    uint64_t pipes;               /* pipes open now: holding bytes, or kept empty for reuse */
    uint64_t ends_queued;         /* ends not yet taken by na_engine_ends */
    uint64_t wakeups;             /* epoll waits that returned events */
    uint64_t empty_reads;         /* reads that found nothing (EAGAIN) */
    uint32_t max_relays;
    uint32_t pipe_size;
    int32_t fatal;                /* the errno that stopped the engine's thread, else 0 */
    uint32_t flags;
};

struct na_engine;

/* A new engine with its thread running; *out is set on success. */
int na_engine_new(const struct na_config *config, struct na_engine **out);

/* An eventfd (non-blocking) that is readable while ends are queued; the caller may read
 * it to clear it (before draining with na_engine_ends), never close it. */
int na_engine_notify_fd(const struct na_engine *engine);

/* Relay between connected stream sockets fd_a and fd_b (AF_INET, AF_INET6 or AF_UNIX;
 * made non-blocking here). Returns the relay's id (> 0) or a negative errno: -ENOSPC
 * (max_relays open), -EPROTOTYPE (not a stream socket), -ENOTSOCK, -ENOMEM, -ESHUTDOWN
 * (stopped): the fds are the engine's either way, reset and closed on failure. Only
 * -EBADF (a negative fd, or the same fd twice) leaves them to the caller. */
int64_t na_relay_add(struct na_engine *engine, int fd_a, int fd_b);

/* End relay `id` with a reset on both sides (its end is reported NA_END_ABORTED).
 * 0: queued; -ESRCH: not open (ended, or never added). */
int na_relay_abort(struct na_engine *engine, uint64_t id);

/* Move up to `max` queued ends into `out`, oldest first; returns how many. */
size_t na_engine_ends(struct na_engine *engine, struct na_end *out, size_t max);

void na_engine_stats(const struct na_engine *engine, struct na_stats *out);

/* Reset every open relay (ends NA_END_STOPPED, queued), stop and join the thread. After
 * it, na_relay_add fails with -ESHUTDOWN. Idempotent. */
void na_engine_stop(struct na_engine *engine);

/* Stop if needed, then release everything, the notify fd included. */
void na_engine_free(struct na_engine *engine);
/* cffi-end */

#endif
