/*
 * ws.c - the WebSocket engine: an RFC 6455 server connection over bytes.
 *
 * Two libraries do the parsing: http-parser reads the upgrade request (the
 * callbacks record the few headers that matter, the way admin_http.c does;
 * the head is bounded by WS_HEAD_MAX counted in bytes the parser consumed,
 * so the outcome does not depend on how the reads were split), and wslay's
 * event API reads and writes frames.  The engine only feeds them: wslay's recv callback hands over the bytes given
 * to ws_conn_feed and then says WOULDBLOCK, its send callback appends to an
 * output buffer the transport drains with ws_conn_pending/ws_conn_consume.
 * Nothing here reads a clock or a socket, so the transport owns every
 * timer and the unit test and the fuzz target (tests/fuzz/fuzz_ws.c) drive
 * the engine alone.
 *
 * Memory.  The handshake state (a few KiB: parser, header copies) is
 * freed once the request is answered.  wslay's event context (about
 * 8.5 KiB with its frame context: a 4 KiB read buffer, a 4 KiB send
 * buffer) exists only while frames are in flight, the way
 * SSL_MODE_RELEASE_BUFFERS treats OpenSSL's records: it is made when
 * frame bytes arrive (ev_new, with max_message and no buffering) and
 * freed after a read that ends on a frame boundary with nothing inside
 * wslay (ws_idle).  "Nothing inside" is proved, not guessed: the frame
 * callbacks add up each whole frame's size (wslay refuses unmasked client
 * frames and lengths not in their shortest form, so the header size
 * follows from the length) against the bytes recv_cb handed over, track
 * whether a fragmented message is open, and wslay's send queue must be
 * empty with no close sent, queued or received.  The output buffer and
 * the message buffer go with it, so an idle open connection holds only
 * its struct ws_conn.  The output buffer is also released whenever it
 * drains after having grown past WS_OUT_KEEP.
 *
 * Speed.  wslay still reads every frame (unmasking, UTF-8, the message
 * rules), but runs without buffering: it does not copy data frames into
 * chunks and join them; a text message that arrives whole in one chunk is
 * passed up from wslay's read buffer, others are joined once here
 * (on_chunk).  wslay checks the limit per frame then, so on_frame_start
 * adds the message-wide check with wslay's answer (1009).  Server frames
 * of text and pings are written here, header and payload straight into
 * the output (frame_out), not through wslay's queue (which copies twice
 * and mallocs per message); wslay writes only pongs and closes, and
 * flush() empties its queue at once, so the order on the wire is the
 * order of the calls and nothing follows a close.  What remains of
 * wslay's cost is its byte loops: UTF-8 validation (most of
 * wslay_event_recv in a profile) and unmasking.
 *
 * Policy: a binary message is refused with 1003; wslay itself closes with
 * 1002 (an unmasked or malformed frame), 1007 (text that is not UTF-8) and
 * 1009 (a message over max_message, checked before it is buffered).  One
 * wslay quirk (1.1.1, still in its HEAD): it checks the UTF-8 of a close
 * frame's reason per chunk and skips two bytes of every chunk, not only
 * the code's, so whether a bad reason is answered with 1007 depends on how
 * the frame was split between reads; harmless (the reason is only logged),
 * and the one place where the engine's outcome depends on the split.  When
 * the engine or wslay fails the connection it stops reading: the state is
 * WS_CLOSED as soon as the close frame is in the output.  A close started
 * by the transport (ws_conn_close) waits in WS_CLOSING for the peer's.
 *
 * With ws_conf.files set, the listener is also the web client's HTTP
 * server: a request whose path is not the WebSocket path is decided once
 * its head is complete (no body is read) and answered from the in-memory
 * file set (webfiles.c), then the connection ends; no keep-alive, so the
 * engine stays one request per connection and the transport needs no HTTP
 * state of its own.
 */
#include <strings.h>
#include <string.h>
#include <sys/types.h>

#include <http_parser.h>
#include <openssl/evp.h>
#include <wslay/wslay.h>

#include "core.h"
#include "ws.h"

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define WS_URL_MAX 2048
#define WS_HVAL_MAX 256   /* a recorded header value; longer is invalid */
#define WS_OUT_KEEP 16384 /* an output buffer above this is freed when drained */

enum { H_HOST, H_UPGRADE, H_KEY, H_VERSION, H_ORIGIN, H_INM, H_COUNT,
       H_OTHER = H_COUNT };

struct ws_hval {
    char v[WS_HVAL_MAX];
    size_t len;
    unsigned count;
    int over; /* longer than WS_HVAL_MAX - 1 */
};

/* The upgrade request being read; freed once it is answered. */
struct ws_hs {
    http_parser hp;
    size_t head;   /* bytes of the head consumed by the parser so far */
    char field[24];
    size_t field_len;
    int in_value;
    int cur; /* H_* of the header whose value is being read */
    struct ws_hval h[H_COUNT];
    char url[WS_URL_MAX];
    size_t url_len;
    int status;  /* an HTTP status decided while parsing */
    int done;    /* the head is complete */
    int web;     /* a request for the web client's files (conf->files) */
    const struct ws_conf *conf;
};

struct ws_out {
    char *buf;
    size_t off, len, cap; /* pending bytes are buf[off, len) */
};

struct ws_conn {
    const struct ws_conf *conf;
    const struct ws_cb *cb;
    void *ud;
    struct ws_hs *hs;           /* while in WS_HANDSHAKE */
    wslay_event_context_ptr ev; /* once open */
    struct ws_out out;
    const char *in;             /* ws_conn_feed's bytes, for recv_cb */
    size_t in_len;
    /* Frame boundaries, for the idle release (see ws_idle): bytes recv_cb
     * handed to the current wslay context, bytes of the whole frames it
     * has read, the size of the frame being read, and whether a
     * fragmented message is in progress. */
    uint64_t fed, framed, frame_size;
    int in_frag, frame_data_fin; /* frame_data_fin: 0 none, 1 fin, 2 not */
    /* The text message being read (wslay runs without buffering, see
     * on_chunk): its bytes so far, or, for a message that came whole in
     * one chunk, a pointer into wslay's read buffer (zc), valid until
     * on_msg returns; total counts a data message's bytes for the limit. */
    char *msg;
    size_t msg_len, msg_cap;
    const uint8_t *zc;
    size_t zc_len;
    uint64_t total, frame_len;
    uint8_t msg_op;  /* the opcode of the data message being read */
    int too_big;
    int closing;   /* a close frame was queued (by anyone) */
    int reported;  /* on_error or on_close was called */
    int closed;    /* refused, or closed before the handshake */
    int fatal;     /* out of memory: unusable */
};

/* ---- output ------------------------------------------------------------ */

static int out_append(struct ws_out *o, const void *p, size_t n)
{
    if (o->off == o->len)
        o->off = o->len = 0;
    if (n > o->cap - o->len) {
        size_t cap = o->cap ? o->cap : 256;
        char *b;
        if (o->off) { /* move the pending bytes down first */
            memmove(o->buf, o->buf + o->off, o->len - o->off);
            o->len -= o->off;
            o->off = 0;
        }
        while (cap - o->len < n)
            cap *= 2;
        if (cap != o->cap) {
            if (!(b = mem_realloc(o->buf, cap)))
                return CHAT_ERR_NOMEM;
            o->buf = b;
            o->cap = cap;
        }
    }
    memcpy(o->buf + o->len, p, n);
    o->len += n;
    return 0;
}

size_t ws_conn_pending(const struct ws_conn *w, const char **p)
{
    *p = w->out.buf ? w->out.buf + w->out.off : "";
    return w->out.len - w->out.off;
}

void ws_conn_consume(struct ws_conn *w, size_t n)
{
    struct ws_out *o = &w->out;
    if (n > o->len - o->off)
        n = o->len - o->off;
    o->off += n;
    if (o->off < o->len)
        return;
    o->off = o->len = 0;
    /* a burst is over, or the connection is idle (wslay's contexts
     * released, see ws_idle): give the memory back */
    if (o->cap > WS_OUT_KEEP || (!w->ev && !w->hs)) {
        mem_free(o->buf);
        o->buf = NULL;
        o->cap = 0;
    }
}

/* ---- the accept key ------------------------------------------------------ */

int ws_accept_key(const char *key, size_t len, char out[29])
{
    unsigned char md[EVP_MAX_MD_SIZE], in[WS_HVAL_MAX + sizeof WS_GUID];
    unsigned int mdlen = 0;

    if (len > WS_HVAL_MAX)
        return CHAT_ERR_INVAL;
    memcpy(in, key, len);
    memcpy(in + len, WS_GUID, sizeof WS_GUID - 1);
    if (!EVP_Digest(in, len + sizeof WS_GUID - 1, md, &mdlen, EVP_sha1(), NULL) ||
        mdlen != 20)
        return CHAT_ERR_NOMEM;
    EVP_EncodeBlock((unsigned char *)out, md, 20); /* 28 chars and a NUL */
    return 0;
}

/* A Sec-WebSocket-Key is base64 of 16 bytes: 24 characters ending "==". */
static int key_ok(const struct ws_hval *k)
{
    unsigned char raw[24];
    if (k->count != 1 || k->over || k->len != 24 || k->v[22] != '=' ||
        k->v[23] != '=')
        return 0;
    /* EVP_DecodeBlock counts the padding as data: 24 -> 18 */
    return EVP_DecodeBlock(raw, (const unsigned char *)k->v, 24) == 18;
}

/* ---- the upgrade request (http-parser callbacks) ------------------------- */

static int hs_fail(struct ws_hs *h, int status)
{
    if (!h->status)
        h->status = status;
    return 1; /* http-parser: stop */
}

static int on_url(http_parser *p, const char *at, size_t n)
{
    struct ws_hs *h = p->data;
    if (n > WS_URL_MAX - 1 - h->url_len)
        return hs_fail(h, 414);
    memcpy(h->url + h->url_len, at, n);
    h->url_len += n;
    h->url[h->url_len] = '\0';
    return 0;
}

static int on_hfield(http_parser *p, const char *at, size_t n)
{
    struct ws_hs *h = p->data;
    if (h->in_value) { /* a new header starts */
        h->in_value = 0;
        h->field_len = 0;
    }
    for (size_t i = 0; i < n; i++, h->field_len++)
        if (h->field_len < sizeof h->field - 1)
            h->field[h->field_len] = at[i];
    h->field[h->field_len < sizeof h->field ? h->field_len : sizeof h->field - 1] = '\0';
    return 0;
}

static int header_id(const struct ws_hs *h)
{
    static const char *const names[H_COUNT] = {
        "host", "upgrade", "sec-websocket-key", "sec-websocket-version", "origin",
        "if-none-match"};
    if (h->field_len >= sizeof h->field)
        return H_OTHER;
    for (int i = 0; i < H_COUNT; i++)
        if (strcasecmp(h->field, names[i]) == 0)
            return i;
    return H_OTHER;
}

static int on_hvalue(http_parser *p, const char *at, size_t n)
{
    struct ws_hs *h = p->data;
    struct ws_hval *v;
    if (!h->in_value) { /* the first piece of this value */
        h->in_value = 1;
        h->cur = header_id(h);
        if (h->cur != H_OTHER)
            h->h[h->cur].count++;
    }
    if (h->cur == H_OTHER)
        return 0;
    v = &h->h[h->cur];
    if (v->count > 1 || v->over || n > sizeof v->v - 1 - v->len) {
        v->over = 1; /* a repeated or overlong value is not recorded */
        return 0;
    }
    memcpy(v->v + v->len, at, n);
    v->len += n;
    v->v[v->len] = '\0';
    return 0;
}

static int path_ok(const struct ws_hs *h, const char *want);

static int on_headers_done(http_parser *p)
{
    struct ws_hs *h = p->data;
    h->done = 1;
    if (h->conf->files && !path_ok(h, h->conf->path ? h->conf->path : "/")) {
        h->web = 1;               /* answered from the files, whatever the */
        http_parser_pause(p, 1);  /* method: no body is read */
        return 0;
    }
    if ((p->flags & F_CHUNKED) ||
        ((p->flags & F_CONTENTLENGTH) && p->content_length > 0)) {
        hs_fail(h, 400); /* an upgrade request has no body */
        return -1;       /* http-parser: error */
    }
    return 0;
}

static int on_done(http_parser *p)
{
    http_parser_pause(p, 1); /* one request; what follows is frames */
    return 0;
}

static const http_parser_settings hs_settings = {
    .on_url = on_url,
    .on_header_field = on_hfield,
    .on_header_value = on_hvalue,
    .on_headers_complete = on_headers_done,
    .on_message_complete = on_done,
};

/* Trailing blanks are not part of a value (RFC 7230 3.2.4). */
static void hval_trim(struct ws_hval *v)
{
    while (v->len && (v->v[v->len - 1] == ' ' || v->v[v->len - 1] == '\t'))
        v->v[--v->len] = '\0';
}

static int path_ok(const struct ws_hs *h, const char *want)
{
    struct http_parser_url u;
    const char *p;
    size_t n;

    http_parser_url_init(&u);
    if (http_parser_parse_url(h->url, h->url_len, 0, &u) != 0 ||
        !(u.field_set & (1 << UF_PATH)))
        return 0;
    p = h->url + u.field_data[UF_PATH].off;
    n = u.field_data[UF_PATH].len;
    return n == strlen(want) && memcmp(p, want, n) == 0;
}

/* No Origin: not a browser, allowed.  Else one of the list (the scheme and
 * host of an origin are case-insensitive). */
static int origin_ok(const struct ws_conf *c, const struct ws_hval *o)
{
    if (c->norigins == 0 || o->count == 0)
        return 1;
    if (o->count > 1 || o->over)
        return 0;
    for (size_t i = 0; i < c->norigins; i++)
        if (strcasecmp(o->v, c->origins[i]) == 0)
            return 1;
    return 0;
}

/* The status the request earns: 0 to accept; *why for the log. */
static int hs_check(struct ws_conn *w, const char **why)
{
    struct ws_hs *h = w->hs;
    const http_parser *p = &h->hp;

    for (int i = 0; i < H_COUNT; i++)
        hval_trim(&h->h[i]);
    if (p->method != HTTP_GET)
        return *why = "method is not GET", 405;
    if (p->http_major < 1 || (p->http_major == 1 && p->http_minor < 1))
        return *why = "HTTP/1.0", 400;
    if (!path_ok(h, w->conf->path ? w->conf->path : "/"))
        return *why = "unknown path", 404;
    if (!p->upgrade || h->h[H_UPGRADE].over ||
        strcasecmp(h->h[H_UPGRADE].v, "websocket") != 0)
        return *why = "not a WebSocket upgrade", 426;
    if (h->h[H_HOST].count != 1)
        return *why = "no Host", 400;
    if (h->h[H_VERSION].count != 1 || strcmp(h->h[H_VERSION].v, "13") != 0)
        return *why = "Sec-WebSocket-Version is not 13", 426;
    if (!key_ok(&h->h[H_KEY]))
        return *why = "missing or invalid Sec-WebSocket-Key", 400;
    if (!origin_ok(w->conf, &h->h[H_ORIGIN]))
        return *why = "Origin not allowed", 403;
    return 0;
}

static const char *status_text(int status)
{
    switch (status) {
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 414: return "URI Too Long";
    case 426: return "Upgrade Required";
    case 431: return "Request Header Fields Too Large";
    default: return "Bad Request";
    }
}

static void refuse(struct ws_conn *w, int status, const char *why)
{
    char buf[256];
    int n = snprintf(buf, sizeof buf,
                     "HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n%s\r\n",
                     status, status_text(status),
                     status == 426 ? "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                     : status == 405 ? "Allow: GET\r\n" : "");
    mem_free(w->hs);
    w->hs = NULL;
    w->closed = 1;
    if (out_append(&w->out, buf, (size_t)n))
        w->fatal = 1;
    w->reported = 1;
    if (w->cb->on_error)
        w->cb->on_error(w->ud, status, why);
}

/* A request for the web client's files: the answer, then WS_CLOSED. */
static void web_reply(struct ws_conn *w)
{
    struct ws_hs *h = w->hs;
    struct http_parser_url u;
    struct web_reply r;
    const struct ws_hval *inm = &h->h[H_INM];
    const char *path = "";
    size_t plen = 0;

    hval_trim(&h->h[H_INM]);
    http_parser_url_init(&u);
    if (http_parser_parse_url(h->url, h->url_len, 0, &u) == 0 &&
        (u.field_set & (1 << UF_PATH))) {
        path = h->url + u.field_data[UF_PATH].off;
        plen = u.field_data[UF_PATH].len;
    }
    web_answer(w->conf->files, http_method_str((enum http_method)h->hp.method), path,
               plen, inm->count == 1 && !inm->over ? inm->v : NULL, &r);
    mem_free(w->hs);
    w->hs = NULL;
    w->closed = 1;
    w->reported = 1;
    if (out_append(&w->out, r.head, r.head_len) ||
        (r.body_len && out_append(&w->out, r.body, r.body_len)))
        w->fatal = 1;
    if (w->cb->on_http)
        w->cb->on_http(w->ud, r.status);
    else if (w->cb->on_error)
        w->cb->on_error(w->ud, r.status, "http");
}

/* ---- frames (wslay callbacks) -------------------------------------------- */

static ssize_t recv_cb(wslay_event_context_ptr ev, uint8_t *buf, size_t len,
                       int flags, void *ud)
{
    struct ws_conn *w = ud;
    (void)flags;
    if (w->in_len == 0) {
        wslay_event_set_error(ev, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    if (len > w->in_len)
        len = w->in_len;
    memcpy(buf, w->in, len);
    w->in += len;
    w->in_len -= len;
    w->fed += len;
    return (ssize_t)len;
}

static ssize_t send_cb(wslay_event_context_ptr ev, const uint8_t *data,
                       size_t len, int flags, void *ud)
{
    struct ws_conn *w = ud;
    (void)flags;
    if (out_append(&w->out, data, len)) {
        w->fatal = 1;
        wslay_event_set_error(ev, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return (ssize_t)len;
}

static void fail(struct ws_conn *w, int code, const char *why)
{
    if (w->reported)
        return;
    w->reported = 1;
    if (w->cb->on_error)
        w->cb->on_error(w->ud, code, why);
}

/* Frames queued go to the output at once, from inside wslay_event_recv
 * too (its send and receive sides share no state): a reply to a message
 * or the pong to a ping is out before a close that a later frame of the
 * same read causes (wslay sends nothing but the close once one is queued),
 * however the reads were split. */
static void flush(struct ws_conn *w)
{
    if (w->ev && !w->fatal &&
        wslay_event_send(w->ev) == WSLAY_ERR_NOMEM)
        w->fatal = 1;
}

static void on_msg(wslay_event_context_ptr ev,
                   const struct wslay_event_on_msg_recv_arg *a, void *ud)
{
    struct ws_conn *w = ud;
    static const char bin[] = "binary messages are not accepted";

    switch (a->opcode) {
    case WSLAY_TEXT_FRAME: {
        const char *p = w->zc ? (const char *)w->zc : w->msg ? w->msg : "";
        size_t n = w->zc ? w->zc_len : w->msg_len;
        w->zc = NULL;
        w->msg_len = 0;
        if (!w->closing && !w->too_big && w->cb->on_message)
            w->cb->on_message(w->ud, p, n);
        if (w->msg_cap > WS_OUT_KEEP) {
            mem_free(w->msg);
            w->msg = NULL;
            w->msg_cap = 0;
        }
        break;
    }
    case WSLAY_BINARY_FRAME:
        /* a message already refused as too big (on_frame_start) keeps
         * that answer: its 1009 is the close on the wire */
        if (w->closing || w->too_big)
            break;
        w->closing = 1;
        wslay_event_shutdown_read(ev);
        if (wslay_event_queue_close(ev, WS_CLOSE_UNSUPPORTED, (const uint8_t *)bin,
                                    sizeof bin - 1) == WSLAY_ERR_NOMEM)
            w->fatal = 1;
        fail(w, WS_CLOSE_UNSUPPORTED, bin);
        break;
    case WSLAY_CONNECTION_CLOSE:
        w->closing = 1;
        if (!w->reported && w->cb->on_close) {
            w->reported = 1;
            w->cb->on_close(w->ud, a->status_code ? a->status_code : WS_CLOSE_NO_STATUS,
                            a->msg_length > 2 ? (const char *)a->msg + 2 : "",
                            a->msg_length > 2 ? a->msg_length - 2 : 0);
        }
        w->reported = 1;
        break;
    case WSLAY_PONG:
        if (w->cb->on_pong)
            w->cb->on_pong(w->ud);
        break;
    default: /* a ping: wslay has queued the pong */
        break;
    }
    flush(w);
}

/* The size of the frame starting, header included: wslay has refused an
 * unmasked client frame before this is called, and refuses lengths not in
 * their shortest encoding (wslay_frame.c), so the header follows from the
 * payload's length.  A data frame (text, binary, continuation) without
 * fin leaves a fragmented message in progress. */
static void on_frame_start(wslay_event_context_ptr ev,
                           const struct wslay_event_on_frame_recv_start_arg *a,
                           void *ud)
{
    struct ws_conn *w = ud;
    uint64_t n = a->payload_length;

    w->frame_size = 2 + 4 + (n < 126 ? 0 : n < 65536 ? 2 : 8) + n;
    w->frame_data_fin = (a->opcode & 8) ? 0 : a->fin ? 1 : 2;
    if (!w->frame_data_fin)
        return;
    if (a->opcode != WSLAY_CONTINUATION_FRAME)
        w->msg_op = a->opcode;
    w->frame_len = n;
    /* without buffering wslay checks each frame against the limit, not
     * the message: the rest of the check is here, with wslay's answer */
    if (n > w->conf->max_message - w->total && !w->too_big) {
        w->too_big = 1;
        if (wslay_event_queue_close(ev, WS_CLOSE_TOO_BIG, NULL, 0) == WSLAY_ERR_NOMEM)
            w->fatal = 1;
        wslay_event_shutdown_read(ev);
        return;
    }
    w->total += n;
}

/* A piece of a frame's payload, unmasked, its UTF-8 checked by wslay.
 * With no buffering (ev_new) wslay neither copies data frames into chunks
 * nor joins them into a message: a text message that comes whole in one
 * chunk is passed up from wslay's read buffer itself, others are joined
 * here. */
static void on_chunk(wslay_event_context_ptr ev,
                     const struct wslay_event_on_frame_recv_chunk_arg *a, void *ud)
{
    struct ws_conn *w = ud;

    if (!w->frame_data_fin || w->too_big || w->msg_op != WSLAY_TEXT_FRAME ||
        a->data_length == 0)
        return;
    if (w->frame_data_fin == 1 && w->msg_len == 0 && w->total == w->frame_len &&
        a->data_length == w->frame_len) {
        w->zc = a->data;
        w->zc_len = a->data_length;
        return;
    }
    if (a->data_length > w->msg_cap - w->msg_len) {
        size_t cap = w->msg_cap ? w->msg_cap : 256;
        char *b;
        while (cap - w->msg_len < a->data_length)
            cap *= 2;
        if (!(b = mem_realloc(w->msg, cap))) {
            w->fatal = 1;
            wslay_event_shutdown_read(ev);
            return;
        }
        w->msg = b;
        w->msg_cap = cap;
    }
    memcpy(w->msg + w->msg_len, a->data, a->data_length);
    w->msg_len += a->data_length;
}

static void on_frame_end(wslay_event_context_ptr ev, void *ud)
{
    struct ws_conn *w = ud;
    (void)ev;
    w->framed += w->frame_size;
    if (w->frame_data_fin)
        w->in_frag = w->frame_data_fin == 2;
    if (w->frame_data_fin == 1)
        w->total = 0; /* the message ends: on_msg comes next */
}

static const struct wslay_event_callbacks ev_callbacks = {
    .recv_callback = recv_cb,
    .send_callback = send_cb,
    .on_frame_recv_start_callback = on_frame_start,
    .on_frame_recv_chunk_callback = on_chunk,
    .on_frame_recv_end_callback = on_frame_end,
    .on_msg_recv_callback = on_msg,
};

/* A wslay context for the frames to come (see ws_idle). */
static int ev_new(struct ws_conn *w)
{
    if (wslay_event_context_server_init(&w->ev, &ev_callbacks, w) != 0) {
        w->ev = NULL;
        w->fatal = 1;
        return CHAT_ERR_NOMEM;
    }
    wslay_event_config_set_max_recv_msg_length(w->ev, w->conf->max_message);
    wslay_event_config_set_no_buffering(w->ev, 1); /* see on_chunk */
    w->fed = w->framed = w->total = 0;
    w->in_frag = 0;
    w->msg_len = 0;
    return 0;
}

/* Release wslay's contexts (about 8.5 KiB: its 4 KiB read buffer, its
 * 4 KiB fragmenting send buffer, message state) when they provably hold
 * nothing: every byte handed to wslay belonged to a whole frame it has
 * read, no fragmented message is open, nothing is queued to send, and no
 * close was sent, queued or received.  The next bytes from the peer make
 * a fresh one (ev_new); what wslay would carry over is all in its initial
 * state at such a boundary.  Like SSL_MODE_RELEASE_BUFFERS for OpenSSL:
 * an idle connection costs the struct ws_conn only. */
static void ws_idle(struct ws_conn *w)
{
    wslay_event_context_ptr ev = w->ev;
    if (!ev || w->fatal || w->closing || w->fed != w->framed || w->in_frag ||
        !wslay_event_get_read_enabled(ev) || !wslay_event_get_write_enabled(ev) ||
        wslay_event_get_close_sent(ev) || wslay_event_get_close_received(ev) ||
        wslay_event_get_queued_msg_count(ev) != 0)
        return;
    wslay_event_context_free(ev);
    w->ev = NULL;
    mem_free(w->msg); /* no message is open */
    w->msg = NULL;
    w->msg_cap = w->msg_len = 0;
    if (w->out.off == w->out.len) { /* else ws_conn_consume frees it */
        mem_free(w->out.buf);
        memset(&w->out, 0, sizeof w->out);
    }
}

static int frames_feed(struct ws_conn *w, const char *in, size_t n)
{
    int r;
    if (!w->ev && ev_new(w))
        return CHAT_ERR_NOMEM;
    w->in = in;
    w->in_len = n;
    r = wslay_event_recv(w->ev);
    w->in = NULL;
    w->in_len = 0;
    if (r == WSLAY_ERR_NOMEM)
        w->fatal = 1;
    flush(w);
    if (w->fatal)
        return CHAT_ERR_NOMEM;
    if (!wslay_event_get_read_enabled(w->ev) && !w->reported) {
        /* wslay failed the connection and queued the close (now sent);
         * a frame-level error (a control frame over 125 bytes, a bad
         * length) gets a close without a code from wslay.  After a close
         * of ours it could queue nothing: the code sent is ours, and the
         * peer broke the protocol while closing. */
        uint16_t code = w->closing ? WS_CLOSE_PROTOCOL
                                   : wslay_event_get_status_code_sent(w->ev);
        w->closing = 1;
        if (code == WS_CLOSE_NO_STATUS || code == 1006 || code == 0)
            code = WS_CLOSE_PROTOCOL;
        fail(w, code, code == WS_CLOSE_TOO_BIG ? "message too big"
                      : code == WS_CLOSE_BAD_DATA ? "text is not UTF-8"
                                                  : "protocol error");
    }
    ws_idle(w);
    return 0;
}

static int open_ws(struct ws_conn *w)
{
    char acc[29], buf[160];
    const struct ws_hval *k = &w->hs->h[H_KEY];
    int n;

    if (ws_accept_key(k->v, k->len, acc))
        return w->fatal = 1, CHAT_ERR_NOMEM;
    /* no wslay context yet: the first frame bytes make it (ev_new) */
    n = snprintf(buf, sizeof buf,
                 "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", acc);
    if (out_append(&w->out, buf, (size_t)n))
        return w->fatal = 1, CHAT_ERR_NOMEM;
    mem_free(w->hs);
    w->hs = NULL;
    if (w->cb->on_open)
        w->cb->on_open(w->ud);
    return 0;
}

/* The request head, then (if accepted) the frames that came with it. */
static int hs_feed(struct ws_conn *w, const char *in, size_t n)
{
    struct ws_hs *h = w->hs;
    const char *why = "bad request";
    size_t used = http_parser_execute(&h->hp, &hs_settings, in, n);
    enum http_errno e = HTTP_PARSER_ERRNO(&h->hp);
    int st;

    /* the parser stops after the head (an upgrade) or the request (it
     * pauses), so this counts the head's bytes whatever the reads were */
    h->head += used;
    if (h->head > WS_HEAD_MAX)
        hs_fail(h, 431);
    if (!h->status && e != HPE_OK && e != HPE_PAUSED)
        h->status = e == HPE_HEADER_OVERFLOW ? 431 : 400;
    if (h->status) {
        refuse(w, h->status, h->status == 431 ? "request head too large" : why);
        return w->fatal ? CHAT_ERR_NOMEM : 0;
    }
    if (h->web && h->done) {
        web_reply(w);
        return w->fatal ? CHAT_ERR_NOMEM : 0;
    }
    if (!h->done || (!h->hp.upgrade && e != HPE_PAUSED))
        return 0; /* more to come */
    if ((st = hs_check(w, &why)) != 0) {
        refuse(w, st, why);
        return w->fatal ? CHAT_ERR_NOMEM : 0;
    }
    if (open_ws(w))
        return CHAT_ERR_NOMEM;
    return used < n ? frames_feed(w, in + used, n - used) : 0;
}

/* ---- the connection ------------------------------------------------------- */

struct ws_conn *ws_conn_new(const struct ws_conf *c, const struct ws_cb *cb,
                            void *ud)
{
    struct ws_conn *w = mem_calloc(1, sizeof *w);
    if (!w)
        return NULL;
    if (!(w->hs = mem_calloc(1, sizeof *w->hs))) {
        mem_free(w);
        return NULL;
    }
    w->conf = c;
    w->cb = cb;
    w->ud = ud;
    http_parser_init(&w->hs->hp, HTTP_REQUEST);
    w->hs->hp.data = w->hs;
    w->hs->conf = c;
    return w;
}

void ws_conn_free(struct ws_conn *w)
{
    if (!w)
        return;
    if (w->ev)
        wslay_event_context_free(w->ev);
    mem_free(w->hs);
    mem_free(w->out.buf);
    mem_free(w->msg);
    mem_free(w);
}

enum ws_state ws_conn_state(const struct ws_conn *w)
{
    if (w->closed || w->fatal)
        return WS_CLOSED;
    if (w->hs)
        return WS_HANDSHAKE;
    if (!w->ev) /* released while idle: nothing was closing */
        return w->closing ? WS_CLOSING : WS_OPEN;
    if (wslay_event_get_close_sent(w->ev) &&
        (wslay_event_get_close_received(w->ev) ||
         !wslay_event_get_read_enabled(w->ev)))
        return WS_CLOSED;
    return w->closing ? WS_CLOSING : WS_OPEN;
}

int ws_conn_idle(const struct ws_conn *w)
{
    return !w->hs && !w->closed && !w->ev && !w->out.buf && !w->msg;
}

int ws_conn_feed(struct ws_conn *w, const char *in, size_t n)
{
    if (w->fatal)
        return CHAT_ERR_NOMEM;
    if (ws_conn_state(w) == WS_CLOSED)
        return CHAT_ERR_CLOSED;
    if (n == 0) /* http-parser takes 0 bytes as the end of the stream */
        return 0;
    if (w->hs)
        return hs_feed(w, in, n);
    if (w->ev && !wslay_event_get_read_enabled(w->ev))
        return 0; /* closing: what the peer sends now is dropped */
    return frames_feed(w, in, n);
}

/* One unmasked server frame (fin set) straight into the output: writing
 * a frame is not parsing, and it spares wslay's two copies (its queue,
 * then the send callback) and its malloc per message.  Ordering with the
 * frames wslay writes itself (pongs, closes) holds because flush() sends
 * whatever wslay queued at once: its queue is empty here, and a close it
 * sent or queued sets closing or close_sent, after which nothing goes
 * out. */
static int frame_out(struct ws_conn *w, uint8_t opcode, const char *p, size_t n)
{
    unsigned char h[10];
    size_t hl = 2;

    h[0] = (unsigned char)(0x80 | opcode);
    if (n < 126) {
        h[1] = (unsigned char)n;
    } else if (n < 65536) {
        h[1] = 126;
        h[2] = (unsigned char)(n >> 8);
        h[3] = (unsigned char)n;
        hl = 4;
    } else {
        h[1] = 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (unsigned char)((uint64_t)n >> (56 - 8 * i));
        hl = 10;
    }
    if (out_append(&w->out, h, hl) || (n && out_append(&w->out, p, n)))
        return w->fatal = 1, CHAT_ERR_NOMEM;
    return 0;
}

/* Write one frame of a wslay opcode (text or ping). */
static int queue(struct ws_conn *w, uint8_t opcode, const char *p, size_t n)
{
    if (w->fatal)
        return CHAT_ERR_NOMEM;
    if (w->closed)
        return CHAT_ERR_CLOSED;
    if (w->hs)
        return CHAT_ERR_STATE;
    if (w->closing)
        return CHAT_ERR_CLOSED;
    if (w->ev) {
        if (wslay_event_get_queued_msg_count(w->ev))
            flush(w); /* what wslay holds goes first */
        if (w->fatal)
            return CHAT_ERR_NOMEM;
        if (!wslay_event_get_write_enabled(w->ev) || wslay_event_get_close_sent(w->ev) ||
            wslay_event_get_queued_msg_count(w->ev))
            return CHAT_ERR_CLOSED;
    }
    return frame_out(w, opcode, p, n);
}

int ws_conn_send_text(struct ws_conn *w, const char *p, size_t n)
{
    return queue(w, WSLAY_TEXT_FRAME, n ? p : "", n);
}

int ws_conn_ping(struct ws_conn *w)
{
    return queue(w, WSLAY_PING, "", 0);
}

int ws_conn_close(struct ws_conn *w, uint16_t code, const char *reason)
{
    size_t rl = reason ? strlen(reason) : 0;
    int r;

    if (w->fatal)
        return CHAT_ERR_NOMEM;
    if (w->closed || w->closing)
        return CHAT_ERR_CLOSED;
    if (w->hs) { /* no WebSocket yet: nothing to say */
        mem_free(w->hs);
        w->hs = NULL;
        w->closed = 1;
        return 0;
    }
    if (rl > 123)
        rl = 123;
    if (!w->ev && ev_new(w)) /* released while idle: wslay tracks the close */
        return CHAT_ERR_NOMEM;
    r = wslay_event_queue_close(w->ev, code, (const uint8_t *)reason, rl);
    if (r == WSLAY_ERR_NO_MORE_MSG)
        return CHAT_ERR_CLOSED;
    if (r)
        return r == WSLAY_ERR_NOMEM ? CHAT_ERR_NOMEM : CHAT_ERR_INVAL;
    w->closing = 1;
    flush(w);
    return w->fatal ? CHAT_ERR_NOMEM : 0;
}
