/*
 * bxport.c - chat-bench's tls://, ws:// and wss:// targets, under bnet.c.
 *
 * A tcp:// connection never comes here (its bn_conn.xp is NULL), so the
 * plain path costs one pointer test.  For the other schemes bnet.c hands
 * over at four points: the socket connected (bt_start), bytes read
 * (bt_input), requests to encode before a flush (bt_encode), close
 * (bt_free).  Requests are written by the scenarios exactly as for tcp
 * (JSON + one NUL each) into bt_conn.app; bt_encode turns them into wire
 * bytes in bn_conn.out, which bnet.c writes as usual.
 *
 * Memory per connection is what 10k+ connections can afford:
 *   - TLS has no buffers of its own here: OpenSSL's BIO is a custom one
 *     whose read side reads the loop's shared read buffer in place and
 *     whose write side appends to the connection's output buffer, and
 *     OpenSSL's record buffers are given back after every read and write
 *     (SSL_MODE_RELEASE_BUFFERS, and SSL_free_buffers for the read buffer
 *     the last SSL_read allocates before it finds nothing to read).  What
 *     stays is the SSL object and its session.
 *   - WebSocket keeps a partial frame, if any, in bn_conn.in (like a
 *     partial line on tcp) and a fragmented message, if any, in a buffer
 *     freed once the message is complete.
 * Certificates are checked only with --ca FILE (a load generator measures
 * the server; checking costs the client), and then against the target's
 * host name or IP address.
 *
 * WebSocket framing is written out here rather than taken from wslay, whose
 * context holds a 4 KiB input buffer per connection, far too much for 19,000
 * connections: the client side of RFC 6455 (masked text frames out;
 * unmasked text, continuation, ping and close frames in) is a few lines.
 * The upgrade response is checked for "HTTP/1.1 101"; the load generator
 * trusts the server's Sec-WebSocket-Accept (chat-cli checks it).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "bench.h"

#define WS_HDR_MAX 8192  /* upgrade response headers */
#define WS_MSG_MAX (64u << 20)

enum { BT_HANDSHAKE, BT_UPGRADE, BT_READY };

struct bt_conn {
    uv_close_cb user_close;   /* bt_close: the caller's close callback */
    struct bn_buf app;        /* requests not yet encoded (JSON + NUL each) */
    SSL *ssl;                 /* tls, wss */
    const char *rd;           /* ciphertext for the BIO's read side */
    size_t rdlen;
    struct bn_buf frag;       /* ws: a fragmented message being assembled */
    uint64_t mask_state;      /* ws: xorshift state for masking keys */
    const struct bn_target *t;
    unsigned state : 2, ws : 1;
};

static SSL_CTX *bt_ctx;
static BIO_METHOD *bt_bio_method;
static struct bn_buf scratch; /* ws frames on their way into TLS */

/* ---- the BIO between OpenSSL and the connection's buffers ----------------- */

static int bio_write(BIO *b, const char *p, int n)
{
    struct bn_conn *c = BIO_get_data(b);

    bn_buf_add(&c->out, p, (size_t)n);
    bn_mark_dirty(c);
    return n;
}

static int bio_read(BIO *b, char *p, int n)
{
    struct bn_conn *c = BIO_get_data(b);
    struct bt_conn *x = c->xp;

    BIO_clear_retry_flags(b);
    if (!x->rdlen) {
        BIO_set_retry_read(b);
        return -1;
    }
    if ((size_t)n > x->rdlen)
        n = (int)x->rdlen;
    memcpy(p, x->rd, (size_t)n);
    x->rd += n;
    x->rdlen -= (size_t)n;
    return n;
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)b;
    (void)num;
    (void)ptr;
    return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static void tls_init(void)
{
    if (bt_ctx)
        return;
    bt_ctx = SSL_CTX_new(TLS_client_method());
    bt_bio_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK,
                                 "chat-bench");
    if (!bt_ctx || !bt_bio_method)
        bx_die("cannot set up OpenSSL");
    BIO_meth_set_write(bt_bio_method, bio_write);
    BIO_meth_set_read(bt_bio_method, bio_read);
    BIO_meth_set_ctrl(bt_bio_method, bio_ctrl);
    SSL_CTX_set_min_proto_version(bt_ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(bt_ctx, SSL_MODE_RELEASE_BUFFERS);
    if (bench.ca_file) {
        if (!SSL_CTX_load_verify_locations(bt_ctx, bench.ca_file, NULL))
            bx_die("cannot load --ca %s", bench.ca_file);
        SSL_CTX_set_verify(bt_ctx, SSL_VERIFY_PEER, NULL);
    } else {
        SSL_CTX_set_verify(bt_ctx, SSL_VERIFY_NONE, NULL);
    }
}

static int tls_new(struct bn_conn *c, const struct bn_target *t)
{
    struct bt_conn *x = c->xp;
    BIO *bio = BIO_new(bt_bio_method);
    unsigned char ip[16];

    x->ssl = SSL_new(bt_ctx);
    if (!x->ssl || !bio)
        bx_die("out of memory (OpenSSL)");
    BIO_set_data(bio, c);
    BIO_set_init(bio, 1);
    SSL_set_bio(x->ssl, bio, bio);
    SSL_set_connect_state(x->ssl);
    if (inet_pton(AF_INET, t->host, ip) == 1 || inet_pton(AF_INET6, t->host, ip) == 1) {
        if (bench.ca_file &&
            !X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(x->ssl), t->host))
            return -1;
    } else if (!SSL_set_tlsext_host_name(x->ssl, t->host) ||
               (bench.ca_file && !SSL_set1_host(x->ssl, t->host))) {
        return -1;
    }
    return 0;
}

/* ---- WebSocket frames ------------------------------------------------------ */

static uint32_t next_mask(struct bt_conn *x)
{
    uint64_t s = x->mask_state;

    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    x->mask_state = s;
    return (uint32_t)(s >> 16);
}

/* One client frame (masked) of opcode op with payload p[0..n) onto b. */
static void ws_frame(struct bt_conn *x, struct bn_buf *b, int op,
                     const char *p, size_t n)
{
    unsigned char h[14];
    size_t hl = 2;
    uint32_t m = next_mask(x);
    unsigned char mk[4] = {(unsigned char)m, (unsigned char)(m >> 8),
                           (unsigned char)(m >> 16), (unsigned char)(m >> 24)};

    h[0] = (unsigned char)(0x80 | op);
    if (n < 126) {
        h[1] = (unsigned char)(0x80 | n);
    } else if (n < 65536) {
        h[1] = 0x80 | 126;
        h[2] = (unsigned char)(n >> 8);
        h[3] = (unsigned char)n;
        hl = 4;
    } else {
        h[1] = 0x80 | 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (unsigned char)((uint64_t)n >> (56 - 8 * i));
        hl = 10;
    }
    memcpy(h + hl, mk, 4);
    hl += 4;
    bn_buf_reserve(b, hl + n);
    memcpy(b->p + b->len, h, hl);
    b->len += hl;
    char *d = b->p + b->len;
    for (size_t i = 0; i < n; i++)
        d[i] = (char)(p[i] ^ mk[i & 3]);
    b->len += n;
}

/* Bytes for the peer: through TLS when there is TLS. */
static int wire_write(struct bn_conn *c, const char *p, size_t n)
{
    struct bt_conn *x = c->xp;

    if (!x->ssl) {
        bn_buf_add(&c->out, p, n);
        bn_mark_dirty(c);
        return 0;
    }
    if (n && SSL_write(x->ssl, p, (int)n) <= 0)
        return -1;
    return 0;
}

static void ws_control(struct bn_conn *c, int op, const char *p, size_t n)
{
    struct bt_conn *x = c->xp;

    scratch.len = 0;
    ws_frame(x, &scratch, op, p, n);
    if (wire_write(c, scratch.p, scratch.len) < 0)
        bn_fail(c, UV_EPROTO);
}

static void ws_message(struct bn_conn *c, const char *p, size_t n)
{
    while (n && (*p == '\0' || *p == ' ' || *p == '\r' || *p == '\n'))
        p++, n--;
    while (n && (p[n - 1] == '\n' || p[n - 1] == '\r' || p[n - 1] == ' '))
        n--;
    if (n) {
        c->net->frames_in++;
        c->on_frame(c, p, n);
    }
}

/* Handle one complete frame; 0, or -1 after failing the connection. */
static int ws_one(struct bn_conn *c, int fin, int op, const char *p, size_t n)
{
    struct bt_conn *x = c->xp;

    switch (op) {
    case 0x0: /* continuation */
        if (!x->frag.len && !x->frag.p)
            goto proto;
        bn_buf_add(&x->frag, p, n);
        if (x->frag.len > WS_MSG_MAX)
            goto proto;
        if (fin) {
            ws_message(c, x->frag.p, x->frag.len);
            bn_buf_free(&x->frag);
        }
        return 0;
    case 0x1: /* text */
        if (x->frag.p)
            goto proto;
        if (fin) {
            ws_message(c, p, n);
        } else {
            bn_buf_add(&x->frag, p, n);
        }
        return 0;
    case 0x9: /* ping */
        ws_control(c, 0xA, p, n);
        return 0;
    case 0xA: /* pong */
        return 0;
    case 0x8: /* close: answer, then the connection is over */
        ws_control(c, 0x8, p, n < 2 ? n : 2);
        bn_fail(c, UV_EOF);
        return -1;
    }
proto:
    bn_fail(c, UV_EPROTO);
    return -1;
}

/* Parse frames from p[0..len); returns the bytes consumed (whole frames). */
static size_t ws_split(struct bn_conn *c, const char *p, size_t len)
{
    const unsigned char *u = (const unsigned char *)p;
    size_t pos = 0;

    while (!c->closing && len - pos >= 2) {
        size_t hl = 2, n = u[pos + 1] & 0x7f;
        int masked = u[pos + 1] & 0x80;

        if (n == 126) {
            if (len - pos < 4)
                break;
            n = (size_t)u[pos + 2] << 8 | u[pos + 3];
            hl = 4;
        } else if (n == 127) {
            if (len - pos < 10)
                break;
            n = 0;
            for (int i = 0; i < 8; i++)
                n = n << 8 | u[pos + 2 + i];
            hl = 10;
        }
        if (masked || n > WS_MSG_MAX) {
            bn_fail(c, UV_EPROTO); /* a server never masks */
            break;
        }
        if (len - pos - hl < n)
            break;
        if (ws_one(c, u[pos] & 0x80, u[pos] & 0x0f, p + pos + hl, n) < 0)
            break;
        pos += hl + n;
    }
    return pos;
}

/* ---- the upgrade ------------------------------------------------------------- */

static int ws_request(struct bn_conn *c)
{
    const struct bn_target *t = c->xp->t;
    unsigned char key[16];
    char k64[32], req[512];

    if (RAND_bytes(key, sizeof key) != 1)
        return -1;
    EVP_EncodeBlock((unsigned char *)k64, key, sizeof key);
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\nUser-Agent: chat-bench\r\n\r\n",
                     t->path, t->hostport, k64);
    if (n < 0 || (size_t)n >= sizeof req)
        return -1;
    c->xp->state = BT_UPGRADE;
    return wire_write(c, req, (size_t)n);
}

/* The upgrade response in p[0..len): bytes consumed, or 0 for more. */
static size_t ws_upgrade(struct bn_conn *c, const char *p, size_t len)
{
    const char *end = memmem(p, len, "\r\n\r\n", 4);

    if (!end) {
        if (len > WS_HDR_MAX)
            bn_fail(c, UV_EPROTO);
        return 0;
    }
    if (len < 12 || memcmp(p, "HTTP/1.1 101", 12) != 0) {
        bn_fail(c, UV_EPROTO);
        return 0;
    }
    c->xp->state = BT_READY;
    c->on_connect(c, 0);
    if (c->xp && c->xp->app.len)
        bn_mark_dirty(c);
    return (size_t)(end + 4 - p);
}

/* ---- plaintext from the peer --------------------------------------------------- */

/* Split what can be split; keep the rest in c->in (as bnet.c does on tcp). */
static void plain_in(struct bn_conn *c, const char *p, size_t n)
{
    struct bt_conn *x = c->xp;
    size_t used;

    if (!x->ws) {
        bn_plain_in(c, p, n);
        return;
    }
    if (c->in.len) {
        bn_buf_add(&c->in, p, n);
        p = c->in.p;
        n = c->in.len;
    }
    used = 0;
    if (x->state == BT_UPGRADE)
        used = ws_upgrade(c, p, n);
    if (!c->closing && c->xp && c->xp->state == BT_READY)
        used += ws_split(c, p + used, n - used);
    if (c->closing)
        return;
    if (p == c->in.p) {
        memmove(c->in.p, c->in.p + used, c->in.len - used);
        c->in.len -= used;
        if (!c->in.len && c->in.cap > 65536)
            bn_buf_free(&c->in);
    } else if (used < n) {
        bn_buf_add(&c->in, p + used, n - used);
    }
}

static void lower_ready(struct bn_conn *c)
{
    struct bt_conn *x = c->xp;

    if (x->ws) {
        if (ws_request(c) < 0)
            bn_fail(c, UV_EPROTO);
        return;
    }
    x->state = BT_READY;
    c->on_connect(c, 0);
    if (c->xp && c->xp->app.len)
        bn_mark_dirty(c);
}

static void tls_step(struct bn_conn *c)
{
    struct bt_conn *x = c->xp;
    int r = SSL_do_handshake(x->ssl);

    if (r == 1) {
        SSL_free_buffers(x->ssl);
        lower_ready(c);
        return;
    }
    if (SSL_get_error(x->ssl, r) != SSL_ERROR_WANT_READ) {
        static int said;
        long vr = SSL_get_verify_result(x->ssl);
        char e[200];

        if (!said++) {
            ERR_error_string_n(ERR_peek_error(), e, sizeof e);
            fprintf(stderr, "chat-bench: TLS handshake with %s failed: %s\n",
                    x->t->hostport, vr != X509_V_OK
                    ? X509_verify_cert_error_string(vr) : e);
        }
        ERR_clear_error();
        c->on_connect(c, UV_EPROTO);
    }
}

/* ---- bnet.c's hooks ---------------------------------------------------------- */

void bt_attach(struct bn_conn *c, const struct bn_target *t)
{
    struct bt_conn *x = bx_calloc(1, sizeof *x);

    c->xp = x;
    x->t = t;
    x->ws = t->scheme == BT_WS || t->scheme == BT_WSS;
    if (x->ws && RAND_bytes((unsigned char *)&x->mask_state, sizeof x->mask_state) != 1)
        bx_die("RAND_bytes failed");
    x->mask_state |= 1;
    if (t->scheme == BT_TLS || t->scheme == BT_WSS) {
        tls_init();
        if (tls_new(c, t) < 0)
            bx_die("bad TLS host name '%s'", t->host);
    }
}

void bt_start(struct bn_conn *c)
{
    if (c->xp->ssl)
        tls_step(c);
    else
        lower_ready(c);
}

void bt_input(struct bn_conn *c, const char *p, size_t n)
{
    struct bt_conn *x = c->xp;
    char *buf;
    int r = 0; /* (gcc -O1 with ASan cannot see it is set before use) */

    if (!x->ssl) {
        plain_in(c, p, n);
        return;
    }
    x->rd = p;
    x->rdlen = n;
    if (x->state == BT_HANDSHAKE) {
        tls_step(c);
        if (c->closing || !c->xp || x->state == BT_HANDSHAKE)
            return;
    }
    /* plaintext never outgrows the ciphertext it came in */
    buf = bn_scratch(c->net, n + 16384);
    while (!c->closing && (r = SSL_read(x->ssl, buf, (int)(n + 16384))) > 0)
        plain_in(c, buf, (size_t)r);
    if (c->closing)
        return;
    r = SSL_get_error(x->ssl, r);
    if (r != SSL_ERROR_WANT_READ) {
        ERR_clear_error();
        bn_fail(c, r == SSL_ERROR_ZERO_RETURN ? UV_EOF : UV_EPROTO);
        return;
    }
    /* The SSL_read that found nothing more allocated a fresh 16 KiB record
     * buffer first; RELEASE_BUFFERS does not see that one.  Unless it holds
     * part of a record, give it back now. */
    SSL_free_buffers(x->ssl);
}

/* Move the ready requests from app into c->out as wire bytes. */
int bt_encode(struct bn_conn *c)
{
    struct bt_conn *x = c->xp;

    if (x->state != BT_READY || !x->app.len)
        return 0;
    if (x->ws) {
        struct bn_buf *b = x->ssl ? &scratch : &c->out;
        size_t pos = 0;

        scratch.len = 0;
        while (pos < x->app.len) {
            const char *s = x->app.p + pos;
            const char *z = memchr(s, '\0', x->app.len - pos);
            size_t n = z ? (size_t)(z - s) : x->app.len - pos;

            if (n)
                ws_frame(x, b, 0x1, s, n);
            pos += n + (z != NULL);
        }
        x->app.len = 0;
        if (x->ssl && SSL_write(x->ssl, scratch.p, (int)scratch.len) <= 0)
            return -1;
        if (x->ssl)
            SSL_free_buffers(x->ssl);
        return 0;
    }
    if (SSL_write(x->ssl, x->app.p, (int)x->app.len) <= 0)
        return -1;
    x->app.len = 0;
    SSL_free_buffers(x->ssl);
    return 0;
}

static void closed_cb(uv_handle_t *h)
{
    struct bn_conn *c = h->data;
    uv_close_cb cb = c->xp->user_close;

    bt_free(c);
    if (cb)
        cb(h);
}

/* The transport state outlives the callbacks on the stack: freed in the
 * close callback, before the caller's. */
void bt_close(struct bn_conn *c, uv_close_cb close_cb)
{
    c->xp->user_close = close_cb;
    uv_close((uv_handle_t *)&c->tcp, closed_cb);
}

void bt_free(struct bn_conn *c)
{
    struct bt_conn *x = c->xp;

    if (!x)
        return;
    SSL_free(x->ssl);
    bn_buf_free(&x->app);
    bn_buf_free(&x->frag);
    free(x);
    c->xp = NULL;
}

struct bn_buf *bt_app(struct bn_conn *c)
{
    return &c->xp->app;
}
