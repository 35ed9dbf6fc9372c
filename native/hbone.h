/* hbone.h - the native HBONE engine of nodeagent's data path (issue 11, item 2).
 *
 * HBONE is HTTP/2 CONNECT streams inside mutual TLS 1.3 (port 15008). Python decides,
 * C moves bytes: Python hands the engine connected TCP sockets (a connection to a peer
 * agent: client side; one accepted on 15008: server side) and, per stream, the plain
 * socket whose bytes the stream carries; the engine's own thread runs TLS (OpenSSL),
 * HTTP/2 (nghttp2) and the copy between each stream and its plain socket: END_STREAM <->
 * FIN (half-close), RST_STREAM <-> reset (SO_LINGER 0). Everything that needs a decision
 * comes back to Python as an event (a connection's TLS is up: the peer's chain; a new
 * inbound CONNECT: its :authority and headers; a stream's response; ends with byte counts
 * and reasons) through a queue Python drains when the notify fd is readable; Python
 * answers with calls (a verdict on the peer, accept a stream with a socket or refuse it
 * with a status). The engine never calls into Python.
 *
 * Ownership
 *   - nh_tls_new copies the PEM it is given into an OpenSSL context; the caller frees
 *     the nh_tls with nh_tls_free when it hands no more new connections to it
 *     (rotation: make a new one for new connections; connections already made keep a
 *     reference to theirs).
 *   - nh_conn_client, nh_conn_server, nh_stream_open, nh_stream_attach, nh_stream_accept and nh_conn_route take the fd
 *     (nh_conn_route: each of its fds)
 *     in every case where they return >= 0 (or any negative errno but -EBADF): the engine
 *     closes it (a reset where the peer must see one) when its connection/stream ends.
 *     The caller must hold no other reference that could close or read it (Python:
 *     socket.detach()).
 *   - Events are copied into memory the caller owns; an event's `data` is malloc'ed and
 *     the caller's: release it with nh_event_release (once, also when ignored).
 *
 * Threads
 *   - nh_engine_new starts one thread (all signals blocked in it) with its own epoll; it
 *     alone touches sockets, SSL and nghttp2 objects. Every other call may come from any
 *     thread, concurrently; calls about connections and streams are queued for it and
 *     applied in order.
 *   - nh_engine_stop and nh_engine_free: from one thread, no other call during or after
 *     free. stop resets every connection and stream (their ends are queued) and joins.
 *
 * Errors
 *   Functions return 0 (or a positive id / count) on success and a negative errno on
 *   failure: -EINVAL (bad argument), -ENOSPC (max_conns), -EBUSY (max_pending_handshakes:
 *   the fd was reset), -ESHUTDOWN (stopped), -ENOMEM. Calls naming a connection or stream
 *   that has ended are ignored (its end event is, or was, queued). Ends say why in `how`
 *   (NH_END_*), with an errno, an HTTP/2 error code or a status where one applies, and a
 *   short reason text in `data`.
 *
 * Back-pressure
 *   Per stream at most `stream_buffer` bytes read from the plain socket wait for HTTP/2
 *   (the socket is not read while that much waits), and at most one stream window
 *   (`stream_window`) received from the peer waits for the plain socket: received bytes
 *   are given back to the peer's window only once written to the socket. Per connection,
 *   HTTP/2 output is pulled from nghttp2 (up to 64 KiB at once) only when TLS has written
 *   everything pulled before, so a peer that does not read stops the streams' sockets
 *   from being read.
 *   Across streams and connections, `receive_budget` (0: none) bounds what all streams
 *   together hold of received DATA: once they would hold half of it, DATA for a stream
 *   that would hold its share of that half (the half over the streams holding any) resets
 *   the stream (NH_END_OVERLOAD, RST_STREAM CANCEL; its bytes dropped, the connection
 *   window given back), as Envoy's overload manager resets the streams using the most
 *   memory. Connections are always read (a connection not read hears no WINDOW_UPDATE, so
 *   an app that writes as it reads would wait on it for good), and a stream whose app
 *   reads holds little, so only streams whose apps lag are reset, only when the budget is
 *   half used, however many connections send to apps that do not read.
 *   Likewise `send_budget` (0: none) bounds what all streams hold of bytes read from their
 *   sockets that the peers' windows have not let out yet (a peer that never opens its
 *   window keeps stream_buffer per stream): once they hold half of it, a stream reads its
 *   socket only up to its share of that half, and one at its share stops reading (its
 *   app's writes wait in the kernel) until its peer takes some or all together hold under
 *   half again.
 *
 * Memory: a stream's buffers are allocated when bytes come (from its socket: 16 KiB, grown
 *   x4 each time a read fills it, up to stream_buffer; what the peer sends only when the
 *   socket does not take it at once, up to its window) and released, empty, once the stream
 *   has moved no byte for a whole tick (a second or two), so an idle keep-alive stream
 *   holds no buffer; the freed memory goes back to the system (malloc_trim) once a tick
 *   has released a few MiB.
 *
 * Liveness (tunnel/liveness.py): a connection not heard from for keepalive_interval_ms is
 *   PINGed, and ends NH_END_KEEPALIVE when the answer has not come within
 *   keepalive_timeout_ms; one without streams for client_idle_ms / server_idle_ms is closed
 *   with GOAWAY NO_ERROR (an open racing it ends NH_END_CONN_LOST before any byte is sent).
 *
 * Limits (tunnel/limits.py): a server connection serves at most max_streams streams at
 *   once, counting a stream until Python answered its request and its socket closed
 *   (more: RST_STREAM REFUSED_STREAM); more than max_resets client resets within
 *   reset_window_ms end it with GOAWAY ENHANCE_YOUR_CALM; TLS must be done within
 *   handshake_timeout_ms of nh_conn_server (a client's within client_handshake_timeout_ms:
 *   up to the server's first SETTINGS, as the Python pool's), and at most max_pending_handshakes server
 *   connections may be in their handshake (more: -EBUSY, reset). The client's SPIFFE
 *   identity check is the engine's (exactly one URI SAN, equal to `expected`); the
 *   server reports the chain and waits for nh_conn_verdict before any HTTP/2.
 *
 * Routes (the destination's delivery without Python; docs/design.md "Delivery by the
 *   engine"): once Python delivered a CONNECT itself, it may give the server connection a
 *   route for that :authority: sockets it made in the destination pod's netns, bound as
 *   the client would be (transparent), not connected, and the generation of what decided
 *   it (policy, steering, the model, memory). A later CONNECT with that :authority on the
 *   connection, while the engine's generation (nh_engine_generation) is still the route's,
 *   takes one of the sockets, connects it to the authority, answers 200 and relays, and
 *   Python hears of it afterwards (NH_EV_DELIVERED) and admits it again. With no socket
 *   left, a route of another generation (dropped, its sockets closed), or a connect that
 *   does not complete at once (dropped too, unless the 4-tuple was taken: the next
 *   socket), the engine asks Python (NH_EV_REQUEST) as it does without a route. Python
 *   moves the generation before it re-checks what it delivered, so no CONNECT the engine
 *   reads after a change of what decides it is delivered on a route made before it.
 *
 * Listeners and out-routes (the source's side without Python per connection; docs/design.md
 *   "The source's connections in the engine"): Python may hand the engine a pod's outbound
 *   listener (nh_listen) with the capture map of original destinations (a BPF hash map of
 *   struct na_origdst keyed by (netns cookie, family, client port)). The engine then accepts
 *   on it, reads and deletes the original destination, and, when the listener has an
 *   out-route for that destination (nh_out_route) of the engine's out-generation
 *   (nh_out_generation) and room for one more connection (nh_listen_room), opens a CONNECT
 *   itself on the client connection of the route's next endpoint (round robin), with the
 *   client's first bytes as early data, and relays it once answered 200 (NH_EV_OUT_OPENED,
 *   then the stream's end with its byte counts). Anything else goes to Python with the
 *   socket (NH_EV_ACCEPTED): no destination recorded, no route, none current, no room, or
 *   the endpoint's connection not up, draining or full (endpoint and tag then say where the
 *   route missed). A routed stream that ends before its 200 (refused, reset, never
 *   processed, open_timeout_ms) hands the client's socket back in its end event, as the
 *   CONNECT left it, so Python fails it or retries it as its own pool would.
 *
 * The block between cffi-begin and cffi-end is also the cffi cdef (nodeagent/native/
 * build.py reads it): declarations and integer #defines only.
 */
#ifndef NODEAGENT_HBONE_H
#define NODEAGENT_HBONE_H

#include <stddef.h>
#include <stdint.h>

/* cffi-begin */
#define NH_API 9                  /* bumped on any change of the functions or structs below */

#define NH_EV_CONN_UP 1           /* data = the peer's chain, PEM, leaf first. Server: TLS
                                     done, waits for nh_conn_verdict. Client: identity
                                     checked and the server's first SETTINGS received. */
#define NH_EV_CONN_END 2          /* how: NH_END_*, error/code, data: reason text */
#define NH_EV_REQUEST 3           /* server: a CONNECT; data = name\0value\0... (":authority"
                                     first, then the request's other headers); answer with
                                     nh_stream_accept or nh_stream_refuse */
#define NH_EV_RESPONSE 4          /* client: the response; status (200: the stream relays) */
#define NH_EV_STREAM_END 5        /* to_peer/from_peer bytes, how, error/code/status; a server
                                     stream's only once announced (REQUEST, DELIVERED): one reset
                                     while its request came in ends without an event */
#define NH_EV_REQUEST_RESET 6     /* server: the client reset a stream Python has not answered
                                     yet; it must still be answered (accept: its socket is
                                     reset at once; refuse), but may stop preparing it */
#define NH_EV_REFUSED 7           /* server: streams refused (REFUSED_STREAM) without asking
                                     Python; how: NH_REFUSED_*; status: how many (one event for
                                     a connection's refusals of one read and reason) */
#define NH_EV_DELIVERED 8         /* server: a CONNECT the engine delivered on a route (nh_conn_route):
                                     answered 200, relaying; data as NH_EV_REQUEST, code = the
                                     local port of the route's socket it connected, tag = the
                                     route's generation */
#define NH_EV_ACCEPTED 9          /* a listener's connection the engine did not open a stream for itself
                                     (nh_listen): `fd` is the accepted socket, handed to the caller
                                     (`handed`); listener, client_port, dst/dst_port (dst "": none
                                     recorded), and tag/endpoint of the out-route it missed on
                                     (endpoint NH_NO_ENDPOINT: no route, or none current) */
#define NH_EV_OUT_OPENED 10       /* a stream the engine opened on an out-route was answered 200 and
                                     relays: stream, conn, listener, client_port, dst/dst_port, tag,
                                     endpoint; data = its :authority */
#define NH_EV_ACCEPT_FAILED 11    /* accept(2) on a listener failed: error; how = the ms the listener
                                     pauses (0: it goes on with the next queued connection) */
#define NH_NO_ENDPOINT 0xffffffffu
#define NH_REFUSED_CAP 1          /* max_streams were being served */
#define NH_REFUSED_DRAINING 2     /* the connection is draining (GOAWAY sent or received) */

#define NH_END_CLOSED 1           /* clean: FIN/END_STREAM both ways (conn: GOAWAY/close) */
#define NH_END_RESET 2            /* stream: RST_STREAM from the peer (code) */
#define NH_END_SOCKET 3           /* stream: the plain socket failed (error); RST_STREAM sent */
#define NH_END_ABORTED 4          /* nh_stream_reset / nh_conn_close(abort) */
#define NH_END_REFUSED 5          /* stream: not 200 (status; a RESPONSE came first), or
                                     REFUSED_STREAM, or nh_stream_refuse */
#define NH_END_CONN_LOST 6        /* stream: its connection ended first */
#define NH_END_TLS 7              /* conn: the TLS handshake failed (data: OpenSSL's reason; code:
                                     the X509 verify result when the peer's chain failed it) */
#define NH_END_IDENTITY 8         /* conn: the peer's identity is not the expected one / verdict no */
#define NH_END_TIMEOUT 9          /* conn: handshake_timeout_ms passed; stream opened on an out-route:
                                     no answer within open_timeout_ms (RST_STREAM CANCEL sent) */
#define NH_END_PROTOCOL 10        /* conn: HTTP/2 error by the peer (code; GOAWAY sent) */
#define NH_END_FLOOD 11           /* conn: too many resets: GOAWAY ENHANCE_YOUR_CALM sent */
#define NH_END_GOAWAY 12          /* conn: the peer sent GOAWAY with an error (code) */
#define NH_END_IO 13              /* conn: the TCP connection failed or closed (error) */
#define NH_END_STOPPED 14         /* nh_engine_stop */
#define NH_END_KEEPALIVE 15       /* conn: no answer to our PING within keepalive_timeout_ms */
#define NH_END_TRUNCATED 16       /* conn: the peer's bytes ended (closed, reset) inside an HTTP/2 frame */
#define NH_END_OVERLOAD 17        /* stream: it held its share of a half-used receive budget (RST_STREAM sent) */

struct nh_config {
    uint32_t max_conns;           /* connections at once (1..65536); more: -ENOSPC */
    uint32_t max_streams;         /* per connection, served/opened at once (1..65536) */
    uint32_t stream_window;       /* HTTP/2 initial stream window we advertise */
    uint32_t connection_window;   /* ... and the connection window (>= stream_window) */
    uint32_t max_frame_size;      /* largest DATA frame we accept (16384..16777215) */
    uint32_t stream_buffer;       /* bytes read from a plain socket held per stream (4096..) */
    uint32_t max_resets;          /* server: client resets allowed within reset_window_ms */
    uint32_t reset_window_ms;
    uint32_t handshake_timeout_ms;
    uint32_t max_pending_handshakes; /* server connections in their TLS handshake at once */
    /* 0 turns each of these off */
    uint32_t keepalive_interval_ms; /* PING a connection not heard from for this long... */
    uint32_t keepalive_timeout_ms;  /* ...and end it (NH_END_KEEPALIVE) unanswered this long */
    uint32_t client_idle_ms;      /* a client connection without streams this long: GOAWAY, closed */
    uint32_t server_idle_ms;      /* the same for a server connection */
    uint32_t client_handshake_timeout_ms; /* a client's (up to the server's SETTINGS); 0: handshake_timeout_ms */
    uint32_t linger_ms;           /* a connection ended cleanly reads until its peer's EOF at most this long
                                   * before it closes (0: closes at once; see linger_start) */
    uint64_t receive_budget;      /* bytes of received DATA all streams hold at most (see Back-pressure) */
    uint64_t send_budget;         /* bytes read from the streams' sockets all streams hold at most (idem) */
    uint32_t open_timeout_ms;     /* a stream opened on an out-route waits this long for its answer (0: no limit) */
    uint32_t pad;
};

struct nh_event {
    uint64_t conn;                /* connection id */
    uint64_t stream;              /* stream id (engine-wide, not the HTTP/2 one), or 0 */
    uint64_t to_peer;             /* stream end: bytes read from the socket, sent in DATA */
    uint64_t from_peer;           /* stream end: bytes received in DATA, written to the socket */
    uint32_t type;                /* NH_EV_* */
    uint32_t how;                 /* NH_END_* for ends */
    int32_t error;                /* positive errno, or 0 */
    uint32_t code;                /* HTTP/2 error code where one applies */
    uint32_t status;              /* HTTP status (response, refusal) */
    uint32_t h2_stream;           /* the HTTP/2 stream id; a client stream's end says 0 when its
                                     HEADERS never went out (the server cannot have seen it) */
    char *data;                   /* malloc'ed (the caller's: nh_event_release), or NULL */
    size_t data_len;
    /* Listeners and out-routes (see Listeners): */
    uint64_t listener;            /* the listener's id, or 0: not a listener's connection */
    uint64_t tag;                 /* the out-route's tag (nh_out_route) it went by or missed on;
                                     NH_EV_DELIVERED: the route's generation */
    uint32_t endpoint;            /* ... and the endpoint's index in it, or NH_NO_ENDPOINT */
    uint32_t client_port;         /* the client's port (its address is the listener pod's) */
    uint32_t dst_port;            /* the original destination's port... */
    int32_t fd;                   /* the socket handed to the caller when `handed` */
    uint32_t handed;              /* 1: `fd` is the caller's now (NH_EV_ACCEPTED; a routed stream's
                                     end before its 200: the client's socket, untouched, its early
                                     bytes still in it); 0: `fd` means nothing */
    char dst[48];                 /* ... and address (text; "" when none was recorded) */
};

struct nh_stats {
    uint64_t conns_open;
    uint64_t conns_total;
    uint64_t handshakes_pending;  /* server connections in their handshake, now */
    uint64_t streams_open;        /* stream objects alive (awaiting an answer, relaying) */
    uint64_t streams_total;
    uint64_t bytes_to_peer;       /* over every stream, sent in DATA */
    uint64_t bytes_from_peer;     /* ... received in DATA and written to the sockets */
    uint64_t bytes_held;          /* in stream buffers and TLS output, now */
    uint64_t bytes_held_peak;     /* the most ever held at once */
    uint64_t stream_held_peak;    /* the most one stream ever held (both directions) */
    uint64_t tls_failures;        /* handshakes that failed (NH_END_TLS, IDENTITY, TIMEOUT) */
    uint64_t refused_streams;     /* REFUSED_STREAM for the stream cap */
    uint64_t flood_goaways;       /* GOAWAY ENHANCE_YOUR_CALM sent */
    uint64_t events_queued;
    uint64_t received_held;       /* received DATA the streams hold, now (what receive_budget bounds) */
    uint64_t received_held_peak;  /* ... the most at once */
    uint64_t streams_overloaded;  /* streams reset for the receive budget (NH_END_OVERLOAD) */
    uint64_t write_buffers;       /* connections holding a TLS write buffer (those with streams, or idle < a tick) */
    uint64_t send_held;           /* bytes read from the streams' sockets, not yet framed (what send_budget bounds) */
    uint64_t send_held_peak;      /* ... the most at once */
    uint64_t streams_send_waiting; /* streams not read for the send budget, now */
    uint64_t frames_direct;       /* DATA frames handed to TLS straight from their stream's buffer */
    uint64_t frames_copied;       /* DATA frames (or what TLS did not take of them) copied to the
                                   * connection's output, to wait for a full socket */
    uint64_t received_direct;     /* received DATA written to its stream's socket straight from the read */
    uint64_t received_copied;     /* ... copied to the stream's buffer first (its socket was full) */
    uint64_t stream_buffers;      /* bytes allocated to the streams' buffers (both ways), now */
    uint64_t buffers_released;    /* buffers of idle streams released (see Memory) */
    uint64_t lingering;           /* sockets of ended connections reading until the peer's EOF, now */
    uint64_t lingered;            /* ... ever (a clean close we started: see linger_start) */
    uint64_t h2_held;             /* bytes nghttp2's sessions hold, now (their frame buffers, HPACK tables...) */
    uint64_t streams_delivered;   /* CONNECTs delivered on a route, without asking Python */
    uint64_t route_failures;      /* route sockets whose connect failed or did not complete at once */
    uint64_t route_sockets;       /* sockets the routes hold, now */
    uint64_t listeners;           /* listeners the engine accepts on, now */
    uint64_t accepted;            /* connections it accepted on them */
    uint64_t streams_routed;      /* ... for which it opened a stream on an out-route itself */
    uint64_t handed_back;         /* ... of those, ended before their 200 and handed to the caller */
    uint64_t tls_empty_reads;     /* reads of a connection's socket that found nothing (EAGAIN) */
    int32_t fatal;                /* the errno that stopped the engine's thread, else 0 */
    uint32_t pad;
};

struct nh_engine;
struct nh_tls;

int nh_engine_new(const struct nh_config *config, struct nh_engine **out);

/* A non-blocking eventfd readable while events are queued; read it to clear it before
 * draining with nh_engine_events; never close it. */
int nh_engine_notify_fd(const struct nh_engine *engine);

/* Credentials: `key_chain_pem` holds the private key and the certificate chain (leaf
 * first), `trust_pem` the trust bundle; TLS 1.3 only, ALPN h2, the peer's certificate
 * required and verified. *err (may be NULL) gets a reason text on failure (static). */
int nh_tls_new(const char *key_chain_pem, size_t key_chain_len, const char *trust_pem, size_t trust_len,
               struct nh_tls **out, const char **err);
void nh_tls_free(struct nh_tls *tls);

/* A client connection on connected TCP socket `fd`; the server must present exactly one
 * URI SAN equal to `expected` (NUL-terminated). Returns its id (> 0). */
int64_t nh_conn_client(struct nh_engine *engine, int fd, struct nh_tls *tls, const char *expected);

/* A server connection on accepted TCP socket `fd`. Returns its id (> 0), -EBUSY when
 * max_pending_handshakes are pending (fd reset and closed). */
int64_t nh_conn_server(struct nh_engine *engine, int fd, struct nh_tls *tls);

/* Server: after NH_EV_CONN_UP, admit the peer (accept != 0: HTTP/2 starts) or close. */
int nh_conn_verdict(struct nh_engine *engine, uint64_t conn, int accept);

/* GOAWAY (NO_ERROR) once open streams end (abort == 0), or reset everything now. */
int nh_conn_close(struct nh_engine *engine, uint64_t conn, int abort);

/* Client: a CONNECT to `authority` (host:port) with `headers` (name\0value\0... of
 * headers_len bytes, names lower-case; may be empty) on connection `conn` (queued until
 * it is up), relayed to connected stream socket `fd` once answered 200. Before the answer
 * the engine only peeks: the first bytes waiting in `fd` (up to 16 KiB, one peek) go out
 * as DATA right behind the CONNECT, so the server has them when it accepts; they leave the
 * socket only with the 200 and count in to_peer only then, so a refused stream leaves
 * `fd`'s bytes where they were. `fd` -1: the socket comes later (nh_stream_attach), so the
 * caller can learn the answer first; until then at most one stream window received waits
 * in the engine. Returns the stream id (> 0). */
int64_t nh_stream_open(struct nh_engine *engine, uint64_t conn, int fd, const char *authority,
                       const char *headers, size_t headers_len);

/* Client: the socket of a stream opened with fd -1 (before or after its RESPONSE). A
 * stream that has ended, or has a socket, gets none: fd is reset and closed. */
int nh_stream_attach(struct nh_engine *engine, uint64_t stream, int fd);

/* Server: answer an NH_EV_REQUEST with 200 and relay to connected stream socket `fd`. */
int nh_stream_accept(struct nh_engine *engine, uint64_t stream, int fd);

/* Server: refuse an NH_EV_REQUEST with `status` (e.g. 400, 403, 503), or with
 * RST_STREAM REFUSED_STREAM when status is 0. */
int nh_stream_refuse(struct nh_engine *engine, uint64_t stream, uint32_t status);

/* Server: give connection `conn` a route for CONNECTs to `authority` (as the peer names
 * it), to ip:port (IPv4 or IPv6 text), decided under `generation`: `fds` are `nfds`
 * sockets of it (see Routes), taken in one command. A route holds at most 8 sockets and a
 * connection 16 routes; what does not fit, or all of them for a connection that ended or
 * drains or a generation that is not the engine's, is closed. -EBADF (none taken): no
 * socket, or a negative one. */
int nh_conn_route(struct nh_engine *engine, uint64_t conn, const char *authority, const char *ip, uint32_t port,
                  const int *fds, uint32_t nfds, uint64_t generation);

/* What decides delivery changed: routes of another generation are no longer used. */
void nh_engine_generation(struct nh_engine *engine, uint64_t generation);

/* Accept on listening socket `fd` (the engine owns it: closed at nh_listen_close or the
 * stop) of the pod whose netns cookie is `netns_cookie`; original destinations come from
 * BPF map `map_fd` (owned too: closed with the listener, also on failure). Returns the
 * listener's id (> 0). Its room starts at 0: every connection goes to Python until
 * nh_listen_room. */
int64_t nh_listen(struct nh_engine *engine, int fd, int map_fd, uint64_t netns_cookie);

/* Stop accepting: with accept_queued, what is queued is accepted first (and routed or handed
 * over as any); without, it is left to the kernel (another listener of a reuseport group).
 * Streams opened from it go on. */
int nh_listen_close(struct nh_engine *engine, uint64_t listener, int accept_queued);

/* The connections the engine may still open streams for on `listener`: `room` (UINT32_MAX:
 * no limit) counted from the `seen`-th of its routed opens Python has heard of (its
 * NH_EV_OUT_OPENED events and routed ends before a 200, counted together). */
int nh_listen_room(struct nh_engine *engine, uint64_t listener, uint32_t room, uint64_t seen);

/* The out-route of `listener` for original destination ip:port: `n` endpoints, each the id
 * of a client connection (0: none, so a connection meeting it goes to Python) and the
 * :authority to CONNECT to (`authorities`: n NUL-terminated strings back to back), decided
 * under out-generation `generation`; `tag` comes back in the events of what goes by it or
 * misses on it. n == 0 removes it. A listener holds at most 256 routes (more: -ENOSPC). */
int nh_out_route(struct nh_engine *engine, uint64_t listener, const char *ip, uint32_t port, const uint64_t *conns,
                 const char *authorities, size_t authorities_len, uint32_t n, uint64_t tag, uint64_t generation);

/* What decides the source's routes changed: out-routes of another generation are not used. */
void nh_out_generation(struct nh_engine *engine, uint64_t generation);

/* RST_STREAM CANCEL and reset the socket (ends NH_END_ABORTED). */
int nh_stream_reset(struct nh_engine *engine, uint64_t stream);

/* Move up to `max` queued events into `out`, oldest first; returns how many. */
size_t nh_engine_events(struct nh_engine *engine, struct nh_event *out, size_t max);
void nh_event_release(struct nh_event *event);

void nh_engine_stats(struct nh_engine *engine, struct nh_stats *out);
/* The TLS library the engine runs, as OpenSSL names itself ("OpenSSL 3.5.5 27 Jan 2026"). */
const char *nh_tls_library(void);
void nh_engine_stop(struct nh_engine *engine);
void nh_engine_free(struct nh_engine *engine);
/* cffi-end */

#endif
