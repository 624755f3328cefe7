/*
 * ws.h - the WebSocket engine (core/ws.c): RFC 6455 over bytes, no I/O.
 *
 * A struct ws_conn takes the bytes read from the peer (ws_conn_feed) and
 * leaves the bytes to write in its output (ws_conn_pending /
 * ws_conn_consume); what happens in between is reported through the
 * callbacks of struct ws_cb.  It runs no loop and owns no timer, so the
 * transport that carries it (core/net.c) keeps the handshake timeout, the
 * ping interval, the pong timeout and the close timeout, and the engine is
 * unit-tested and fuzzed alone.  Loop thread only; one ws_conn per peer.
 *
 * Errors are CHAT_ERR_* codes (include/chat/plugin.h).
 */
#ifndef CHAT_WS_H
#define CHAT_WS_H

#include <stddef.h>
#include <stdint.h>

/* Close codes (RFC 6455 7.4.1) the engine and the transport send. */
#define WS_CLOSE_NORMAL 1000     /* idle timeout, the user logged out */
#define WS_CLOSE_GOING_AWAY 1001 /* the server stops or drains */
#define WS_CLOSE_PROTOCOL 1002   /* a frame broke RFC 6455 (unmasked, ...) */
#define WS_CLOSE_UNSUPPORTED 1003 /* a binary message */
#define WS_CLOSE_NO_STATUS 1005  /* reported only: a close without a code */
#define WS_CLOSE_BAD_DATA 1007   /* a text message that is not UTF-8 */
#define WS_CLOSE_POLICY 1008     /* the transport's policy (no pong, limits) */
#define WS_CLOSE_TOO_BIG 1009    /* a message over max_message */

#define WS_HEAD_MAX 8192 /* bytes of the upgrade request head (else 431) */

/* What the engine checks; borrowed: it must outlive every ws_conn made
 * with it (the transport keeps it in the listener, replaced on reload only
 * for new connections). */
struct ws_conf {
    size_t max_message;   /* bytes of one reassembled message (else 1009) */
    const char *path;     /* request path to accept, e.g. "/chat" (else 404) */
    char *const *origins; /* allowed Origin values; none: no check */
    size_t norigins;
    /* The web client's files (webfiles.c), borrowed like the rest: a GET
     * or HEAD of any other path than `path` (or any other method there)
     * is answered from them and the connection ends (WS_CLOSED after the
     * answer; no keep-alive).  NULL: such requests are refused (404, 405)
     * as before. */
    const struct web_files *files;
};

/* Events, all optional (NULL), called from inside ws_conn_feed on the
 * caller's stack with the ud given to ws_conn_new.  A callback may call
 * ws_conn_send_text, ws_conn_close and ws_conn_ping (their frames go to
 * the output at once, before what later frames cause) but never
 * ws_conn_free: free after ws_conn_feed has returned.  Pointers passed are
 * valid for the call only. */
struct ws_cb {
    /* The upgrade request was accepted; the 101 is in the output. */
    void (*on_open)(void *ud);
    /* One complete text message, fragments reassembled, valid UTF-8, at
     * most max_message bytes (not NUL-terminated). */
    void (*on_message)(void *ud, const char *text, size_t len);
    /* A pong arrived (an answer to ws_conn_ping, or unsolicited). */
    void (*on_pong)(void *ud);
    /* The peer sent a close frame; code is WS_CLOSE_NO_STATUS when it
     * carried none.  The engine has answered it (unless it had closed
     * first); state is WS_CLOSED once the answer is in the output. */
    void (*on_close)(void *ud, uint16_t code, const char *reason, size_t len);
    /* The engine refused or failed the connection: code is the HTTP status
     * of the refused upgrade (400, 403, 404, 405, 426, 431) or the close
     * code it sent (1002, 1003, 1007, 1009); why is a short text for the
     * log.  state is WS_CLOSED: write the output, then close the socket. */
    void (*on_error)(void *ud, int code, const char *why);
    /* A plain HTTP request was answered from ws_conf.files with status
     * (200, 304, 404, 405); state is WS_CLOSED: write the output, then
     * close the socket.  When NULL, on_error is called instead (with the
     * status and "http"), so a transport that knows only on_error still
     * closes. */
    void (*on_http)(void *ud, int status);
};

enum ws_state {
    WS_HANDSHAKE, /* waiting for the upgrade request */
    WS_OPEN,      /* messages flow */
    WS_CLOSING,   /* a close frame went out; waiting for the peer's */
    WS_CLOSED     /* done: write what is pending, then close the socket */
};

struct ws_conn;

/* A connection in WS_HANDSHAKE.  c and cb are borrowed (see struct
 * ws_conf); NULL when out of memory.  Freed with ws_conn_free. */
struct ws_conn *ws_conn_new(const struct ws_conf *c, const struct ws_cb *cb,
                            void *ud);
void ws_conn_free(struct ws_conn *w); /* NULL is fine */

/* Bytes read from the peer, any split (an upgrade request and the first
 * frames may arrive in one read).  0; CHAT_ERR_CLOSED when the state is
 * already WS_CLOSED (the bytes are dropped); CHAT_ERR_NOMEM (the
 * connection is unusable: close the socket).  Check ws_conn_pending and
 * ws_conn_state after every call. */
int ws_conn_feed(struct ws_conn *w, const char *in, size_t n);

/* Queue one text message (one unfragmented frame; p need not be
 * NUL-terminated and is copied).  0; CHAT_ERR_STATE before the handshake;
 * CHAT_ERR_CLOSED once a close frame was queued either way;
 * CHAT_ERR_NOMEM. */
int ws_conn_send_text(struct ws_conn *w, const char *p, size_t n);

/* Start the close handshake with code and reason (at most 123 bytes, cut
 * there; NULL: none).  The state becomes WS_CLOSING until the peer answers
 * (the transport bounds that wait).  Before the handshake completed it
 * only moves to WS_CLOSED (there is no WebSocket to close).  0;
 * CHAT_ERR_CLOSED when a close was already queued; CHAT_ERR_NOMEM. */
int ws_conn_close(struct ws_conn *w, uint16_t code, const char *reason);

/* Queue a ping; on_pong reports the answer.  0; CHAT_ERR_STATE,
 * CHAT_ERR_CLOSED, CHAT_ERR_NOMEM as for ws_conn_send_text. */
int ws_conn_ping(struct ws_conn *w);

/* The output not yet consumed: *p points at it (valid until the next call
 * on w), the result is its length (0: nothing to write).  The transport
 * copies or writes it and calls ws_conn_consume with what it took. */
size_t ws_conn_pending(const struct ws_conn *w, const char **p);
void ws_conn_consume(struct ws_conn *w, size_t n);

enum ws_state ws_conn_state(const struct ws_conn *w);

/* 1 when an open connection (no close sent) holds no wslay frame
 * context (released at a frame boundary with nothing buffered, made again
 * by the next bytes; see ws.c) and no output or message buffer: it costs
 * its struct ws_conn only.  For tests. */
int ws_conn_idle(const struct ws_conn *w);

/* The engine's UTF-8 check (RFC 3629: no overlong form, no surrogate
 * U+D800-DFFF, nothing over U+10FFFF), incremental: start from
 * WS_UTF8_OK and pass each piece with the state the last one returned;
 * a character may be split anywhere.  The result is WS_UTF8_OK when the
 * bytes so far end between characters, WS_UTF8_BAD (for good) as soon as
 * they cannot begin valid UTF-8, else another value (a character is
 * incomplete).  ASCII is checked 8 and 16 bytes a step. */
#define WS_UTF8_OK 0u
#define WS_UTF8_BAD 1u
uint32_t ws_utf8(uint32_t state, const void *p, size_t n);

/* Sec-WebSocket-Accept for a key: base64(SHA-1(key GUID)), 28 characters
 * and a NUL into out[29].  0; CHAT_ERR_INVAL (a key over 256 bytes);
 * CHAT_ERR_NOMEM (OpenSSL failed). */
int ws_accept_key(const char *key, size_t len, char out[29]);

#endif
