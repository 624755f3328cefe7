/*
 * fuzz_ws.c - libFuzzer target for the WebSocket engine (core/ws.c): the
 * HTTP upgrade request (http-parser) and the frame stream behind it
 * (wslay's frame reader, the message rules and UTF-8 check of ws.c), from
 * arbitrary bytes, without sockets.
 *
 * Input layout: byte 0 picks where the stream is split in two reads (the
 * way libuv may hand it over); byte 1 holds options: bit 0 puts a valid
 * upgrade request in front (so the frame layer is reached without the
 * fuzzer guessing a key), bit 1 sets an Origin list, bit 2 a small
 * max_message (64), bit 3 answers each message from inside on_message,
 * bit 4 pings and bit 5 starts a close after the first read.  The rest is
 * the peer's bytes.  Invariants, checked with abort():
 *   - the one-read and two-read runs agree on everything: the messages
 *     delivered, the state, the events (opens, closes, pongs, the error
 *     code) and the bytes written, except that two refused upgrades may
 *     differ in their status (http-parser may stop at another byte);
 *   - a message is at most max_message bytes; nothing is delivered before
 *     on_open or after a close;
 *   - a refusal writes an HTTP 4xx status line and ends in WS_CLOSED, an
 *     open connection writes 101 first; feeding a WS_CLOSED connection
 *     answers CHAT_ERR_CLOSED.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"
#include "ws.h"

#define HEAD "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n" \
             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" \
             "Sec-WebSocket-Version: 13\r\n\r\n"

struct run {
    struct ws_conn *w;
    uint8_t opts;
    int opened, closes, pongs, err;
    unsigned nmsg;
    uint64_t digest; /* FNV-1a over the messages and their lengths */
    int after_close; /* a message arrived after a close event */
    size_t max;
    char *out;
    size_t outlen, outcap;
    int state;
};

static void hash(struct run *r, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        r->digest = (r->digest ^ b[i]) * 1099511628211ull;
}

static void on_open(void *ud) { ((struct run *)ud)->opened++; }
static void on_pong(void *ud) { ((struct run *)ud)->pongs++; }

static void on_message(void *ud, const char *t, size_t n)
{
    struct run *r = ud;
    if (!r->opened || n > r->max)
        abort();
    if (r->closes || r->err)
        r->after_close = 1;
    r->nmsg++;
    hash(r, &n, sizeof n);
    hash(r, t, n);
    if (r->opts & 8) {
        int rc = ws_conn_send_text(r->w, t, n);
        if (rc != 0 && rc != CHAT_ERR_CLOSED)
            abort();
    }
}

static void on_close(void *ud, uint16_t code, const char *reason, size_t n)
{
    struct run *r = ud;
    r->closes++;
    hash(r, &code, sizeof code);
    hash(r, reason, n);
}

static void on_error(void *ud, int code, const char *why)
{
    struct run *r = ud;
    (void)why;
    if (r->err)
        abort(); /* reported once */
    r->err = code;
}

static const struct ws_cb cbs = {on_open, on_message, on_pong, on_close, on_error, NULL};
static char *origins[] = {"https://chat.example"};

static void drain(struct run *r)
{
    const char *p;
    size_t n;
    while ((n = ws_conn_pending(r->w, &p)) > 0) {
        if (r->outlen + n > r->outcap) {
            size_t cap = (r->outlen + n) * 2;
            char *o = realloc(r->out, cap);
            if (!o)
                abort();
            r->out = o;
            r->outcap = cap;
        }
        memcpy(r->out + r->outlen, p, n);
        r->outlen += n;
        ws_conn_consume(r->w, n);
    }
}

static void feed(struct run *r, const uint8_t *p, size_t n)
{
    int before = ws_conn_state(r->w), rc;
    if (n == 0)
        return;
    rc = ws_conn_feed(r->w, (const char *)p, n);
    if (before == WS_CLOSED ? rc != CHAT_ERR_CLOSED : rc != 0)
        abort();
    drain(r);
}

/* [a, b) of p, in two reads if s falls inside. */
static void feed_range(struct run *r, const uint8_t *p, size_t a, size_t b, size_t s)
{
    if (s > a && s < b) {
        feed(r, p + a, s - a);
        feed(r, p + s, b - s);
    } else {
        feed(r, p + a, b - a);
    }
}

/* The bytes up to k, the ping or close the options ask for, the rest. */
static void run(struct run *r, const struct ws_conf *c, uint8_t opts,
                const uint8_t *p, size_t n, size_t k, size_t s)
{
    int rc;
    memset(r, 0, sizeof *r);
    r->opts = opts;
    r->max = c->max_message;
    if (!(r->w = ws_conn_new(c, &cbs, r)))
        abort();
    feed_range(r, p, 0, k, s);
    if (opts & 16) {
        rc = ws_conn_ping(r->w);
        if (rc != 0 && rc != CHAT_ERR_STATE && rc != CHAT_ERR_CLOSED)
            abort();
    }
    if (opts & 32) {
        rc = ws_conn_close(r->w, WS_CLOSE_GOING_AWAY, "bye");
        if (rc != 0 && rc != CHAT_ERR_CLOSED)
            abort();
    }
    drain(r);
    feed_range(r, p, k, n, s);
    r->state = ws_conn_state(r->w);
    if (r->after_close)
        abort();
    if (r->err >= 400 && r->err < 600 &&
        (r->state != WS_CLOSED || r->outlen < 13 || memcmp(r->out, "HTTP/1.1 4", 10)))
        abort();
    if (r->opened && (r->outlen < 13 || memcmp(r->out, "HTTP/1.1 101 ", 13)))
        abort();
    ws_conn_free(r->w);
    r->w = NULL;
}

static int http_refusal(int e) { return e >= 400 && e < 600; }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct run a, b;
    struct ws_conf c = {65536, "/chat", NULL, 0, NULL};
    uint8_t opts;
    uint8_t *buf;
    size_t n, k, s, hl;

    if (size < 3)
        return 0;
    opts = data[1];
    hl = opts & 1 ? sizeof HEAD - 1 : 0;
    n = hl + size - 3;
    if (!(buf = malloc(n ? n : 1)))
        return 0;
    memcpy(buf, HEAD, hl);
    memcpy(buf + hl, data + 3, size - 3);
    if (opts & 2) {
        c.origins = origins;
        c.norigins = 1;
    }
    if (opts & 4)
        c.max_message = 64;
    k = data[2] * n / 255;
    s = data[0] * n / 255;
    run(&a, &c, opts, buf, n, k, n);
    run(&b, &c, opts, buf, n, k, s);
    if (a.opened != b.opened || a.nmsg != b.nmsg || a.digest != b.digest ||
        a.state != b.state || a.closes != b.closes || a.pongs != b.pongs)
        abort();
    if (http_refusal(a.err) || http_refusal(b.err)) {
        if (!http_refusal(a.err) || !http_refusal(b.err))
            abort();
    } else if (a.err != b.err || a.outlen != b.outlen ||
               (a.outlen && memcmp(a.out, b.out, a.outlen))) {
        abort();
    }
    free(a.out);
    free(b.out);
    a.out = b.out = NULL;
    free(buf);
    return 0;
}
