/*
 * transport.h - the seam between a session's socket and its JSON stream.
 *
 * In the spirit of Redis's ConnectionType: a transport is a table of
 * functions (struct net_transport) and one file (tls.c; tcp is the table
 * entry with no functions, net.c's own fast path).  net.c owns the socket
 * (a uv_tcp_t), sessions, output buffers and their limits, delivery marks,
 * pacing, framing and dispatch; a transport sits between the socket bytes
 * and the JSON stream and knows nothing of any of them.  Adding one means
 * a file, an entry in net.c's table and nothing above it changes.
 *
 * Layers.  Each connection has a chain of layers, one struct net_tconn per
 * transport, bottom (next to the socket) to top (next to net): tls alone,
 * or ws over tls for wss.  A table entry names the transport it stacks on
 * in `below`, and net builds the chain from the endpoint's scheme down: the
 * WebSocket file exports two entries with the same functions, ws (below
 * NULL) and wss (below "tls"), and each layer gets ep_start/open calls of
 * its own, so tls neither knows nor cares what runs above it.  Bytes move
 * through two functions of net.c:
 *   net_tr_up(t, buf, n)    t decoded these bytes: they go to the layer
 *                           above, or to net (framing, dispatch) at the top;
 *   net_tr_down(t, buf, n)  t encoded these bytes: they go to the layer
 *                           below, or into the session's wire buffer, which
 *                           net writes to the socket.
 * Both are synchronous and copy what they keep; buf is borrowed.
 *
 * Output.  net hands the top layer whole messages, never part of one:
 * output(t, buf, n) gets one or more JSON messages, each ending in '\n'
 * (a message-oriented transport frames each one; the '\n' is net's and
 * may be dropped).  App bytes count as written (delivery marks, flush
 * waits) only once every wire byte produced up to them has reached the
 * kernel, so a delivery is never taken as sent while the bytes that carry
 * it wait in a transport or in the wire buffer.  The wire buffer counts
 * against max_output with the rest of the session's output, and so must a
 * layer's own pending bytes: pending() reports them.
 *
 * Input.  net reads the socket into one loop-wide buffer and gives it to
 * the bottom layer's input().  A stream transport (tls) passes decoded
 * bytes up in any cut; a message transport (NET_TR_MESSAGES, ws) passes up
 * one complete message per call, and net requires that message to be
 * exactly one JSON object (anything else is answered with a protocol
 * error, as bytes outside an object are on tcp).
 *
 * Handshake.  A connection is not ready until every layer says so with
 * net_tr_ready(t): before that net queues the session's output but encodes
 * none of it, and a layer may write its own bytes (a ServerHello, an HTTP
 * 101 response) with net_tr_down at any time.  A layer below that is not
 * ready yet never passes bytes up, so an upper layer's handshake starts
 * after the lower one's.  The handshake must end within the endpoint's
 * handshake_ms (set by ep_start) or net closes the connection.
 *
 * Closing.  A layer that must end the connection calls net_tr_close(t,
 * error): error 0 when the peer said goodbye (a close frame, a TLS
 * close_notify), 1 for a protocol error (after writing its own alert or
 * close frame with net_tr_down, e.g. WebSocket 1002/1003/1009).  net then
 * closes the session gracefully: it writes the queued output, then calls
 * close(t, code, reason) on each layer top down, writes what they produced
 * and shuts the socket down.  code is the CHAT_E_* errno net_close was
 * given (0 for a plain close: a peer EOF, a server-side close), reason is
 * NULL for now (borrowed when set).  A layer that already sent its own
 * goodbye must not send another from close().  A non-graceful close (a
 * socket error, an input() returning -1, the handshake deadline) calls no
 * close() at all.
 *
 * Time.  tick(ep_ctx, now) runs with net's limits timer, at most a second
 * apart, for each endpoint; a transport with keepalive (WebSocket
 * ping/pong, its pong timeout) walks its own connections there rather than
 * arming a timer per connection.
 *
 * Memory.  A layer's state is allocated by open() and freed by free(),
 * which net calls from the socket's close callback (never earlier).  idle()
 * runs when the session's output has drained: release what can be
 * released (buffers).  All of it runs on the loop thread; nothing blocks.
 */
#ifndef CHAT_TRANSPORT_H
#define CHAT_TRANSPORT_H

#include "core.h"

/* One layer of one connection; a transport embeds it first in its state. */
struct net_tconn {
    const struct net_transport *type;
    struct net_tconn *above, *below; /* NULL: net / the socket */
    struct chat_session *s;
    unsigned ready : 1;              /* net_tr_ready() was called */
};

#define NET_TR_MESSAGES 1u /* input comes up one whole message per call */

struct net_transport {
    const char *name;   /* the scheme: "tcp", "tls", "ws", "wss" */
    const char *below;  /* the transport this one stacks on, or NULL */
    unsigned flags;     /* NET_TR_* */
    /* Endpoint state from the config, at start (before the loop runs: may
     * read files); *ep_ctx is passed to the calls below.  0, or -1 with a
     * reason in err.  *handshake_ms: the handshake deadline (0: none). */
    int (*ep_start)(const struct conf *c, const struct conf_listen *l, void **ep_ctx,
                    int *handshake_ms, char *err, size_t errlen);
    /* SIGHUP: apply c (certificates...) to new connections; existing ones
     * keep what they have.  May finish later (worker thread); logs. */
    void (*ep_reload)(void *ep_ctx, const struct conf *c);
    void (*ep_stop)(void *ep_ctx); /* after the last connection is freed */
    void (*tick)(void *ep_ctx, uint64_t now_ms); /* optional */
    /* A layer for session s over below (NULL: the socket), allocated here
     * with the struct net_tconn first; NULL when out of memory.  net fills
     * in type, s, above and below after it returns, so it must not call
     * net_tr_* (the peer speaks first in tls and ws). */
    struct net_tconn *(*open)(void *ep_ctx, struct chat_session *s,
                              struct net_tconn *below);
    /* Bytes from below (socket or lower layer); 0, or -1: net closes the
     * session (the layer logged why). */
    int (*input)(struct net_tconn *t, const char *buf, size_t n);
    /* App bytes from above: whole messages (see the top).  0 or -1. */
    int (*output)(struct net_tconn *t, const char *buf, size_t n);
    size_t (*pending)(const struct net_tconn *t); /* bytes held; NULL: 0 */
    void (*close)(struct net_tconn *t, int code, const char *reason);
    void (*idle)(struct net_tconn *t);           /* optional */
    void (*free)(struct net_tconn *t);
};

/* ---- provided by net.c to transports ----------------------------------- */
/* Decoded bytes up (see the top); 0, or what the layer above's input()
 * returned.  Nothing happens once the session is closing. */
int net_tr_up(struct net_tconn *t, const char *buf, size_t n);
/* Encoded bytes down; 0, or -1 (out of memory, or the layer below failed):
 * the caller fails its own call. */
int net_tr_down(struct net_tconn *t, const char *buf, size_t n);
/* t's handshake is done; the session is ready once every layer is. */
void net_tr_ready(struct net_tconn *t);
/* End the connection (see Closing); the session stays until its close
 * callback, so t may still be called (closing: input no longer comes). */
void net_tr_close(struct net_tconn *t, int error);
/* The loop the endpoints run on, for uv_queue_work and the like. */
uv_loop_t *net_tr_loop(void);

/* ---- tls.c ------------------------------------------------------------ */
extern const struct net_transport tls_transport;

/* ---- wstr.c: ws (on the socket) and wss (on tls), one set of functions -- */
extern const struct net_transport wstr_ws_transport, wstr_wss_transport;

#endif
