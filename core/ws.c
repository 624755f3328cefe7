/*
 * ws.c - the WebSocket engine: an RFC 6455 server connection over bytes.
 *
 * Two libraries do the parsing: http-parser reads the upgrade request (the
 * callbacks record the few headers that matter, the way admin_http.c does;
 * the head is bounded by WS_HEAD_MAX counted in bytes the parser consumed,
 * so the outcome does not depend on how the reads were split), and wslay's
 * frame API (wslay_frame_recv) reads frames: the header, the lengths (it
 * refuses a length not in its shortest form, and a control frame over 125
 * bytes or fragmented) and the unmasking.  Its recv callback hands over
 * the bytes given to ws_conn_feed and then says "want read".  Nothing here
 * reads a clock or a socket, so the transport owns every timer and the
 * unit test and the fuzz target (tests/fuzz/fuzz_ws.c) drive the engine
 * alone.
 *
 * Messages.  What wslay's event API used to add on top of its frame API,
 * the message rules of RFC 6455 sections 5 and 7, is here (frame_start,
 * on_chunk, control_end): a client frame must be masked, with no RSV bit
 * and a known opcode; a continuation needs a fragmented message open and
 * a new data frame needs none; a message over max_message (the whole
 * message, across its fragments) is refused when its frame starts,
 * before a byte of it is kept; text must be UTF-8 (ws_utf8, checked as the
 * bytes arrive and complete at fin); a close carries no payload, or a
 * valid code (7.4) and a UTF-8 reason.  Each rule is decided on the bytes
 * alone, whatever the reads were, so the engine's outcome never depends
 * on the split (the fuzz target checks this).  A text message that arrives
 * whole in one chunk goes up from wslay's read buffer without a copy;
 * others are joined once here.  ws_utf8 checks ASCII 16 and 8 bytes a
 * step and walks a small DFA only through multi-byte characters (wslay's
 * event API ran its automaton on every byte and stored its state each
 * time); what remains of wslay's cost is its byte-at-a-time unmasking.
 *
 * Policy: a binary message is refused with 1003 (once it is complete, as
 * before); a broken rule closes with 1002 (also what wslay_frame_recv
 * refuses, which wslay's event API answered with a close without a code),
 * text that is not UTF-8 (a close reason included) with 1007, a message
 * over max_message with 1009 (a control frame counts alone, as in wslay).
 * When the engine fails the connection it stops reading: the state is
 * WS_CLOSED as soon as the close frame is in the output.  A close started
 * by the transport (ws_conn_close) waits in WS_CLOSING for the peer's;
 * what breaks a rule meanwhile ends it with 1002 reported (our close is
 * already out).
 *
 * Writing.  Every server frame (text, ping, pong, close) is written here,
 * header and payload straight into the output buffer (frame_out) that the
 * transport drains with ws_conn_pending/ws_conn_consume: the order on the
 * wire is the order of the calls, and nothing follows a close.
 *
 * Memory.  The handshake state (a few KiB: parser, header copies) is
 * freed once the request is answered.  wslay's frame context (about
 * 4.2 KiB, its 4 KiB read buffer) exists only while frames are in
 * flight, the way SSL_MODE_RELEASE_BUFFERS treats OpenSSL's records: it
 * is made when frame bytes arrive (rd_new) and freed after a read that
 * ends on a frame boundary with nothing inside wslay (ws_idle).  "Nothing
 * inside" is proved, not guessed: the frame size (wslay refuses lengths
 * not in their shortest form and the engine unmasked frames, so the
 * header size follows from the length) of each whole frame is added up
 * against the bytes recv_cb handed over, no fragmented message may be
 * open, and no close sent or received.  The output buffer, the message
 * buffer and the control frame buffer go with it, so an idle open
 * connection holds only its struct ws_conn.  The output buffer is also
 * released whenever it drains after having grown past WS_OUT_KEEP.
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
    wslay_frame_context_ptr fr; /* once open, while frames are in flight */
    struct ws_out out;
    const char *in;             /* ws_conn_feed's bytes, for recv_cb */
    size_t in_len;
    /* Frame boundaries, for the idle release (see ws_idle): bytes recv_cb
     * handed to the current frame context, and bytes of the whole frames
     * it has returned. */
    uint64_t fed, framed;
    /* The frame being read (in_frame: its first chunk was seen): its
     * opcode, fin, payload length, payload bytes seen, and whole size. */
    uint64_t f_len, f_off, f_size;
    uint8_t f_op, f_fin, in_frame;
    /* The data message being read: msg_op is its opcode (text or binary)
     * from its first frame to its fin, 0 when none is open; total counts
     * its bytes for the limit, utf8 is ws_utf8's state over its text.
     * Its bytes are joined in msg unless it came whole in one chunk. */
    uint8_t msg_op;
    uint32_t utf8;
    uint64_t total;
    char *msg;
    size_t msg_len, msg_cap;
    uint8_t *ctl;  /* a control frame's payload split between chunks (125) */
    int closing;   /* a close frame went out (ours or the echo) */
    int read_off;  /* the read side stopped: close received, or failed */
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
    /* a burst is over, or the connection is idle (wslay's frame context
     * released, see ws_idle): give the memory back */
    if (o->cap > WS_OUT_KEEP || (!w->fr && !w->hs)) {
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
    if (h->h[H_VERSION].count != 1 || h->h[H_VERSION].over ||
        strcmp(h->h[H_VERSION].v, "13") != 0)
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

/* ---- UTF-8 ----------------------------------------------------------------- */

/* The byte classes of the DFA below: 0 ASCII, 1 80-8F, 2 90-9F, 3 A0-BF
 * (continuations), 4 C2-DF, 5 E0, 6 E1-EC EE-EF, 7 ED, 8 F0, 9 F1-F3,
 * 10 F4, 11 never in UTF-8 (C0 C1 F5-FF). */
static const uint8_t utf8_class[256] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 00 */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 40 */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, /* 80 */
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, /* 90 */
    3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, /* A0 */
    3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
    11, 11, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, /* C0 */
    4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
    5, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 7, 6, 6, /* E0 */
    8, 9, 9, 9, 10, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, /* F0 */
};

/* States: 0 WS_UTF8_OK (between characters), 1 WS_UTF8_BAD (for good),
 * 2, 3, 4: 1, 2, 3 continuations to go (any 80-BF); 5 after E0 (A0-BF
 * next: no overlong), 6 after ED (80-9F: no surrogate), 7 after F0 (90-BF:
 * no overlong), 8 after F4 (80-8F: nothing over U+10FFFF). */
static const uint8_t utf8_next[9][12] = {
    /*        asc 80 90 A0 C2 E0 E1 ED F0 F1 F4 bad */
    /* 0 */ {0, 1, 1, 1, 2, 5, 3, 6, 7, 4, 8, 1},
    /* 1 */ {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
    /* 2 */ {1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
    /* 3 */ {1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1},
    /* 4 */ {1, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1},
    /* 5 */ {1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1},
    /* 6 */ {1, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1},
    /* 7 */ {1, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1},
    /* 8 */ {1, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
};

#define ASCII_MASK 0x8080808080808080ull

uint32_t ws_utf8(uint32_t state, const void *in, size_t n)
{
    const unsigned char *p = in, *e = p + n;

    if (state > 8)
        return WS_UTF8_BAD;
    while (p < e) {
        if (state == WS_UTF8_OK) {
            /* between characters: skip ASCII 16, then 8 bytes a step */
            uint64_t a, b;
            while (e - p >= 16) {
                memcpy(&a, p, 8);
                memcpy(&b, p + 8, 8);
                if ((a | b) & ASCII_MASK)
                    break;
                p += 16;
            }
            if (e - p >= 8) {
                memcpy(&a, p, 8);
                if (!(a & ASCII_MASK))
                    p += 8;
            }
            while (p < e && *p < 0x80)
                p++;
            if (p == e)
                break;
        }
        state = utf8_next[state][utf8_class[*p++]];
        if (state == WS_UTF8_BAD)
            break;
    }
    return state;
}

/* ---- frames ---------------------------------------------------------------- */

/* wslay_frame_recv's source: the bytes ws_conn_feed was given, then 0
 * ("want read"). */
static ssize_t recv_cb(uint8_t *buf, size_t len, int flags, void *ud)
{
    struct ws_conn *w = ud;
    (void)flags;
    if (len > w->in_len)
        len = w->in_len;
    if (len == 0)
        return 0;
    memcpy(buf, w->in, len);
    w->in += len;
    w->in_len -= len;
    w->fed += len;
    return (ssize_t)len;
}

/* Only the reading half of the frame API is used (frame_out writes). */
static const struct wslay_frame_callbacks fr_callbacks = {NULL, recv_cb, NULL};

static void fail(struct ws_conn *w, int code, const char *why)
{
    if (w->reported)
        return;
    w->reported = 1;
    if (w->cb->on_error)
        w->cb->on_error(w->ud, code, why);
}

/* One unmasked server frame (fin set) straight into the output. */
static int frame_out(struct ws_conn *w, uint8_t opcode, const void *p, size_t n)
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

/* A close frame: code 0 sends none (and no reason); reason is at most 123
 * bytes.  Nothing is written after it. */
static void close_out(struct ws_conn *w, uint16_t code, const void *reason, size_t rl)
{
    uint8_t b[125];
    size_t n = 0;

    w->closing = 1;
    if (code) {
        b[0] = (uint8_t)(code >> 8);
        b[1] = (uint8_t)code;
        if (rl > 123)
            rl = 123;
        if (rl)
            memcpy(b + 2, reason, rl);
        n = 2 + rl;
    }
    frame_out(w, WSLAY_CONNECTION_CLOSE, b, n);
}

/* The peer broke a rule: close with code and stop reading.  When a close
 * of ours is already out, that close stands and 1002 is reported: the
 * peer broke the protocol while closing. */
static void refuse_frame(struct ws_conn *w, uint16_t code, const char *why)
{
    w->read_off = 1;
    if (w->closing) {
        fail(w, WS_CLOSE_PROTOCOL, "protocol error");
        return;
    }
    close_out(w, code, NULL, 0);
    fail(w, code, why);
}

/* RFC 6455 7.4.1 and 7.4.2: the codes a close frame may carry (1004,
 * 1005, 1006 and 1015 are reserved, 1012-2999 unassigned here as in
 * wslay's event API; 3000-4999 registered or private). */
static int close_code_ok(unsigned c)
{
    return (c >= 1000 && c <= 1011 && c != 1004 && c != 1005 && c != 1006) ||
           (c >= 3000 && c <= 4999);
}

/* A frame whose first chunk (or empty payload) wslay has just returned:
 * the rules of RFC 6455 5.2-5.5 wslay_frame_recv leaves to its user.
 * 1 to read it, 0 when it was refused. */
static int frame_start(struct ws_conn *w, const struct wslay_frame_iocb *io)
{
    uint8_t op = io->opcode;
    uint64_t n = io->payload_length;

    if (!io->mask) {
        refuse_frame(w, WS_CLOSE_PROTOCOL, "unmasked frame");
        return 0;
    }
    if (io->rsv) { /* no extension is negotiated */
        refuse_frame(w, WS_CLOSE_PROTOCOL, "reserved bits set");
        return 0;
    }
    if ((op & 8) ? op > WSLAY_PONG : op > WSLAY_BINARY_FRAME) {
        refuse_frame(w, WS_CLOSE_PROTOCOL, "unknown opcode");
        return 0;
    }
    if (!(op & 8) && (op == WSLAY_CONTINUATION_FRAME) != (w->msg_op != 0)) {
        refuse_frame(w, WS_CLOSE_PROTOCOL, op ? "data frame inside a fragmented message"
                                              : "continuation without a message");
        return 0;
    }
    /* the whole message against the limit (a control frame alone), before
     * any of it is kept */
    if (n > w->conf->max_message - ((op & 8) ? 0 : w->total)) {
        refuse_frame(w, WS_CLOSE_TOO_BIG, "message too big");
        return 0;
    }
    w->in_frame = 1;
    w->f_op = op;
    w->f_fin = io->fin;
    w->f_len = n;
    w->f_off = 0;
    w->f_size = 2 + (n < 126 ? 0 : n < 65536 ? 2 : 8) + 4 + n;
    if (!(op & 8)) {
        if (op != WSLAY_CONTINUATION_FRAME) { /* a message starts */
            w->msg_op = op;
            w->utf8 = WS_UTF8_OK;
            w->total = 0;
            w->msg_len = 0;
        }
        w->total += n;
    }
    return 1;
}

/* A close frame from the peer (its whole payload p, n bytes): answered
 * with the same code and reason unless a close of ours went out, and the
 * read side stops. */
static void close_in(struct ws_conn *w, const uint8_t *p, size_t n)
{
    uint16_t code = n >= 2 ? (uint16_t)(p[0] << 8 | p[1]) : 0;
    const char *reason = n > 2 ? (const char *)p + 2 : "";
    size_t rl = n > 2 ? n - 2 : 0;

    if (n == 1 || (n >= 2 && !close_code_ok(code))) {
        refuse_frame(w, WS_CLOSE_PROTOCOL, "invalid close code");
        return;
    }
    if (rl && ws_utf8(WS_UTF8_OK, reason, rl) != WS_UTF8_OK) {
        refuse_frame(w, WS_CLOSE_BAD_DATA, "close reason is not UTF-8");
        return;
    }
    w->read_off = 1;
    if (!w->closing)
        close_out(w, code, reason, rl);
    if (!w->reported && w->cb->on_close) {
        w->reported = 1;
        w->cb->on_close(w->ud, code ? code : WS_CLOSE_NO_STATUS, reason, rl);
    }
    w->reported = 1;
}

/* A whole control frame. */
static void control_end(struct ws_conn *w, const uint8_t *p, size_t n)
{
    switch (w->f_op) {
    case WSLAY_PING: /* no pong once a close is out */
        if (!w->closing)
            frame_out(w, WSLAY_PONG, p, n);
        break;
    case WSLAY_PONG:
        if (w->cb->on_pong)
            w->cb->on_pong(w->ud);
        break;
    default:
        close_in(w, p, n);
        break;
    }
}

/* The end of a data message: deliver a text message (from wslay's read
 * buffer when zc, else from msg), refuse a binary one. */
static void message_end(struct ws_conn *w, const uint8_t *zc, size_t zc_len)
{
    uint8_t op = w->msg_op;

    w->msg_op = 0;
    w->total = 0;
    if (op == WSLAY_BINARY_FRAME) {
        if (!w->closing) /* while closing what the peer sends is dropped */
            refuse_frame(w, WS_CLOSE_UNSUPPORTED, "binary messages are not accepted");
        return;
    }
    if (w->utf8 != WS_UTF8_OK) { /* a character cut at the end */
        refuse_frame(w, WS_CLOSE_BAD_DATA, "text is not UTF-8");
        return;
    }
    if (!w->closing && w->cb->on_message)
        w->cb->on_message(w->ud, zc ? (const char *)zc : w->msg ? w->msg : "",
                          zc ? zc_len : w->msg_len);
    w->msg_len = 0;
    if (w->msg_cap > WS_OUT_KEEP) {
        mem_free(w->msg);
        w->msg = NULL;
        w->msg_cap = 0;
    }
}

static int msg_append(struct ws_conn *w, const uint8_t *d, size_t n)
{
    if (n > w->msg_cap - w->msg_len) {
        size_t cap = w->msg_cap ? w->msg_cap : 256;
        char *b;
        while (cap - w->msg_len < n)
            cap *= 2;
        if (!(b = mem_realloc(w->msg, cap)))
            return w->fatal = 1, CHAT_ERR_NOMEM;
        w->msg = b;
        w->msg_cap = cap;
    }
    memcpy(w->msg + w->msg_len, d, n);
    w->msg_len += n;
    return 0;
}

/* One piece of a frame's payload from wslay_frame_recv, unmasked (the
 * first piece of a frame, possibly empty, starts it). */
static void on_chunk(struct ws_conn *w, const struct wslay_frame_iocb *io)
{
    const uint8_t *d = io->data;
    size_t n = io->data_length;
    int whole;

    if (!w->in_frame && !frame_start(w, io))
        return;
    whole = w->f_off == 0 && n == w->f_len; /* the frame in one piece */
    if (w->f_op & 8) {
        if (!whole && n) { /* gather it: at most 125 bytes */
            if (!w->ctl && !(w->ctl = mem_malloc(125))) {
                w->fatal = 1;
                return;
            }
            memcpy(w->ctl + w->f_off, d, n);
        }
    } else if (w->msg_op == WSLAY_TEXT_FRAME) {
        if (n && (w->utf8 = ws_utf8(w->utf8, d, n)) == WS_UTF8_BAD) {
            refuse_frame(w, WS_CLOSE_BAD_DATA, "text is not UTF-8");
            return;
        }
        /* a message whole in this piece goes up from wslay's buffer */
        if (!(whole && w->f_fin && w->msg_len == 0 && w->total == n) && n &&
            !w->closing && msg_append(w, d, n))
            return;
    }
    w->f_off += n;
    if (w->f_off < w->f_len)
        return;
    w->in_frame = 0;
    w->framed += w->f_size;
    if (w->f_op & 8)
        control_end(w, whole ? d : w->ctl, (size_t)w->f_len);
    else if (w->f_fin)
        message_end(w, whole && w->msg_len == 0 && w->total == n ? d : NULL, n);
}

/* A frame context for the frames to come (see ws_idle). */
static int rd_new(struct ws_conn *w)
{
    if (wslay_frame_context_init(&w->fr, &fr_callbacks, w) != 0) {
        w->fr = NULL;
        w->fatal = 1;
        return CHAT_ERR_NOMEM;
    }
    w->fed = w->framed = 0;
    return 0;
}

/* Release wslay's frame context (about 4.2 KiB: its 4 KiB read buffer)
 * when it provably holds nothing: every byte handed to it belonged to a
 * whole frame it has returned, no fragmented message is open, and no
 * close went out or came in.  The next bytes from the peer make a fresh
 * one (rd_new); a frame context at such a boundary is in its initial
 * state.  Like SSL_MODE_RELEASE_BUFFERS for OpenSSL: an idle connection
 * costs the struct ws_conn only. */
static void ws_idle(struct ws_conn *w)
{
    if (!w->fr || w->fatal || w->closing || w->read_off || w->in_frame ||
        w->msg_op || w->fed != w->framed)
        return;
    wslay_frame_context_free(w->fr);
    w->fr = NULL;
    mem_free(w->msg); /* no message is open */
    w->msg = NULL;
    w->msg_cap = w->msg_len = 0;
    mem_free(w->ctl);
    w->ctl = NULL;
    if (w->out.off == w->out.len) { /* else ws_conn_consume frees it */
        mem_free(w->out.buf);
        memset(&w->out, 0, sizeof w->out);
    }
}

static int frames_feed(struct ws_conn *w, const char *in, size_t n)
{
    struct wslay_frame_iocb io;
    ssize_t r;

    if (!w->fr && rd_new(w))
        return CHAT_ERR_NOMEM;
    w->in = in;
    w->in_len = n;
    while (!w->read_off && !w->fatal) {
        r = wslay_frame_recv(w->fr, &io);
        if (r == WSLAY_ERR_WANT_READ) /* all of in is taken (see recv_cb) */
            break;
        if (r < 0) {
            /* WSLAY_ERR_PROTO: a control frame over 125 bytes or
             * fragmented, a length not in its shortest form or over 2^63 */
            refuse_frame(w, WS_CLOSE_PROTOCOL, "protocol error");
            break;
        }
        on_chunk(w, &io);
    }
    w->in = NULL;
    w->in_len = 0;
    if (w->fatal)
        return CHAT_ERR_NOMEM;
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
    /* no frame context yet: the first frame bytes make it (rd_new) */
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
    if (w->fr)
        wslay_frame_context_free(w->fr);
    mem_free(w->hs);
    mem_free(w->out.buf);
    mem_free(w->msg);
    mem_free(w->ctl);
    mem_free(w);
}

enum ws_state ws_conn_state(const struct ws_conn *w)
{
    if (w->closed || w->fatal)
        return WS_CLOSED;
    if (w->hs)
        return WS_HANDSHAKE;
    if (w->closing && w->read_off) /* a close each way, or we failed it */
        return WS_CLOSED;
    return w->closing ? WS_CLOSING : WS_OPEN;
}

int ws_conn_idle(const struct ws_conn *w)
{
    return !w->hs && !w->closed && !w->closing && !w->fr && !w->out.buf && !w->msg &&
           !w->ctl;
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
    if (w->read_off)
        return 0; /* not reached: read_off comes with a close sent */
    return frames_feed(w, in, n);
}

/* Write one frame of ours (text or ping). */
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
    close_out(w, code, reason, reason ? strlen(reason) : 0);
    return w->fatal ? CHAT_ERR_NOMEM : 0;
}
