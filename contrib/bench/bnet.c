/*
 * bnet.c - chat-bench's client connections on libuv.
 *
 * A load generator must cost the machine less per message than the server
 * it measures, so the connection layer avoids the usual per-message costs:
 *   - Writes are coalesced: bn_send() only appends to the connection's
 *     output buffer and puts the connection on a dirty list; one uv_prepare
 *     handle (run once per loop iteration, just before the loop blocks)
 *     hands each dirty connection's bytes to the kernel with uv_try_write,
 *     falling back to uv_write for what the socket did not take.  Everything
 *     a connection produced during an iteration leaves in one syscall.
 *   - Reads go into one buffer shared by all connections of the loop (libuv
 *     calls alloc and read back to back for one stream); only a partial
 *     frame left at the end of a read is copied into the connection's own
 *     buffer, and the next read for that connection appends to it directly.
 *     Idle connections therefore hold no read buffer at all.
 *   - Replies are split on '\n' (chatd ends every reply with one), and
 *     bn_scan() picks the few top-level fields a scenario needs from a flat
 *     object in one pass instead of building a cJSON tree.
 *   - tls://, ws:// and wss:// targets hang below this layer (bxport.c):
 *     a tcp connection's xp is NULL and its path here is as described; an
 *     xp connection writes its requests to xp's own buffer, which bxport.c
 *     encodes into `out` just before the flush, and reads through bt_input.
 *   - Thousands of connections from one address to one server port make
 *     connect() slow: Linux looks for a free source port by walking the
 *     ports (even ones first) that this 4-tuple already uses, so past about
 *     14,000 connections every connect() scans the whole range in the
 *     kernel.  For a loopback target each socket is therefore bound to one
 *     of several source addresses 127.0.0.x (IP_BIND_ADDRESS_NO_PORT keeps
 *     the port choice in connect()), which gives each address its own port
 *     space.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench.h"

#define RBUF_SIZE (256 * 1024)
#define READ_MIN_FREE (16 * 1024)

void *bx_malloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        bx_die("out of memory (%zu bytes)", n);
    return p;
}

void *bx_calloc(size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    if (!p)
        bx_die("out of memory (%zu x %zu bytes)", n, sz);
    return p;
}

void *bx_realloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        bx_die("out of memory (%zu bytes)", n);
    return q;
}

char *bx_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = bx_malloc(n);
    memcpy(p, s, n);
    return p;
}

void bx_die(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "chat-bench: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

/* ---- buffers -------------------------------------------------------------- */

void bn_buf_reserve(struct bn_buf *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < extra)
        cap *= 2;
    b->p = bx_realloc(b->p, cap);
    b->cap = cap;
}

void bn_buf_add(struct bn_buf *b, const void *p, size_t n)
{
    bn_buf_reserve(b, n);
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

void bn_buf_addu(struct bn_buf *b, uint64_t v)
{
    char tmp[24];
    int i = (int)sizeof tmp;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    bn_buf_add(b, tmp + i, sizeof tmp - (size_t)i);
}

void bn_buf_addi(struct bn_buf *b, int64_t v)
{
    if (v < 0) {
        bn_buf_addc(b, '-');
        bn_buf_addu(b, (uint64_t)0 - (uint64_t)v);
    } else {
        bn_buf_addu(b, (uint64_t)v);
    }
}

void bn_buf_addjs(struct bn_buf *b, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    bn_buf_addc(b, '"');
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') {
            bn_buf_addc(b, '\\');
            bn_buf_addc(b, (char)ch);
        } else if (ch < 0x20) {
            char esc[6] = {'\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15]};
            bn_buf_add(b, esc, sizeof esc);
        } else {
            bn_buf_addc(b, (char)ch);
        }
    }
    bn_buf_addc(b, '"');
}

void bn_buf_free(struct bn_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* ---- connections ---------------------------------------------------------- */

static void flush_conn(struct bn_conn *c);

void bn_fail(struct bn_conn *c, int status)
{
    if (c->closing)
        return;
    if (c->on_error)
        c->on_error(c, status);
    else
        bn_close(c, NULL);
}

static void write_cb(uv_write_t *req, int status)
{
    struct bn_conn *c = req->data;
    c->writing = 0;
    c->wbuf.len = 0;
    if (c->closing)
        return;
    if (status < 0) {
        bn_fail(c, status);
        return;
    }
    if (c->out.len || c->xp)
        flush_conn(c);
}

static void flush_conn(struct bn_conn *c)
{
    if (c->writing || c->closing || !c->connected)
        return;
    if (c->xp && bt_encode(c) < 0) {
        bn_fail(c, UV_EPROTO);
        return;
    }
    if (c->out.len == 0)
        return;
    uv_buf_t b = uv_buf_init(c->out.p, (unsigned)c->out.len);
    int r = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (r == (int)c->out.len) {
        c->net->bytes_out += (uint64_t)r;
        c->out.len = 0;
        return;
    }
    if (r < 0 && r != UV_EAGAIN) {
        bn_fail(c, r);
        return;
    }
    size_t done = r > 0 ? (size_t)r : 0;
    c->net->bytes_out += done;
    /* hand the rest to uv_write from the other buffer; out starts empty */
    struct bn_buf t = c->wbuf;
    c->wbuf = c->out;
    c->out = t;
    c->out.len = 0;
    b = uv_buf_init(c->wbuf.p + done, (unsigned)(c->wbuf.len - done));
    c->wreq.data = c;
    c->writing = 1;
    r = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, write_cb);
    if (r < 0) {
        c->writing = 0;
        bn_fail(c, r);
    }
}

static void flush_cb(uv_prepare_t *h)
{
    struct bn_net *n = h->data;
    while (n->dirty) {
        struct bn_conn *c = n->dirty;
        n->dirty = c->next_dirty;
        c->next_dirty = NULL;
        c->dirty = 0;
        flush_conn(c);
    }
}

void bn_mark_dirty(struct bn_conn *c)
{
    if (c->dirty)
        return;
    c->dirty = 1;
    c->next_dirty = c->net->dirty;
    c->net->dirty = c;
}

void bn_send(struct bn_conn *c, const void *p, size_t len)
{
    bn_buf_add(c->xp ? bt_app(c) : &c->out, p, len);
    bn_mark_dirty(c);
}

struct bn_buf *bn_out(struct bn_conn *c)
{
    bn_mark_dirty(c);
    return c->xp ? bt_app(c) : &c->out;
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct bn_conn *c = h->data;
    (void)suggested;
    if (c->in.len && !c->xp) {
        bn_buf_reserve(&c->in, READ_MIN_FREE);
        c->in_own = 1;
        *buf = uv_buf_init(c->in.p + c->in.len, (unsigned)(c->in.cap - c->in.len));
    } else {
        c->in_own = 0;
        *buf = uv_buf_init(c->net->rbuf, (unsigned)c->net->rbuf_cap);
    }
}

/* Split p[0..len) into frames; returns the bytes consumed. */
static size_t split_frames(struct bn_conn *c, const char *p, size_t len)
{
    size_t pos = 0;
    while (pos < len && !c->closing) {
        const char *nl = memchr(p + pos, '\n', len - pos);
        if (!nl)
            break;
        const char *s = p + pos, *e = nl;
        pos = (size_t)(nl - p) + 1;
        while (s < e && (*s == '\0' || *s == ' ' || *s == '\r' || *s == '\t'))
            s++;
        while (e > s && (e[-1] == '\r' || e[-1] == ' '))
            e--;
        if (e > s) {
            c->net->frames_in++;
            c->on_frame(c, s, (size_t)(e - s));
        }
    }
    return pos;
}

static void read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct bn_conn *c = st->data;
    (void)buf;
    if (nread == 0)
        return;
    if (nread < 0) {
        bn_fail(c, (int)nread);
        return;
    }
    c->net->bytes_in += (uint64_t)nread;
    if (c->xp) {
        bt_input(c, c->net->rbuf, (size_t)nread);
        return;
    }
    if (c->in_own) {
        c->in.len += (size_t)nread;
        size_t used = split_frames(c, c->in.p, c->in.len);
        memmove(c->in.p, c->in.p + used, c->in.len - used);
        c->in.len -= used;
        if (c->in.len == 0 && c->in.cap > 4 * READ_MIN_FREE)
            bn_buf_free(&c->in); /* a large ack went by: give it back */
    } else {
        size_t used = split_frames(c, c->net->rbuf, (size_t)nread);
        if (used < (size_t)nread && !c->closing)
            bn_buf_add(&c->in, c->net->rbuf + used, (size_t)nread - used);
    }
}

static void connect_cb(uv_connect_t *req, int status)
{
    struct bn_conn *c = req->data;
    if (c->closing)
        return;
    if (status < 0) {
        c->on_connect(c, status);
        return;
    }
    c->connected = 1;
    uv_tcp_nodelay(&c->tcp, 1);
    int r = uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
    if (r < 0) {
        c->on_connect(c, r);
        return;
    }
    if (c->xp) {
        bt_start(c); /* calls on_connect once the handshakes are done */
        return;
    }
    c->on_connect(c, 0);
    if (c->out.len && !c->closing)
        bn_mark_dirty(c);
}

/* Plaintext lines from an xp connection: split what is whole, keep the rest
 * in c->in (which, on xp connections, only ever holds plaintext). */
void bn_plain_in(struct bn_conn *c, const char *p, size_t n)
{
    if (c->in.len) {
        bn_buf_add(&c->in, p, n);
        size_t used = split_frames(c, c->in.p, c->in.len);
        if (c->closing)
            return;
        memmove(c->in.p, c->in.p + used, c->in.len - used);
        c->in.len -= used;
        if (c->in.len == 0 && c->in.cap > 4 * READ_MIN_FREE)
            bn_buf_free(&c->in);
        return;
    }
    size_t used = split_frames(c, p, n);
    if (used < n && !c->closing)
        bn_buf_add(&c->in, p + used, n - used);
}

char *bn_scratch(struct bn_net *n, size_t size)
{
    if (n->sbuf_cap < size) {
        n->sbuf = bx_realloc(n->sbuf, size);
        n->sbuf_cap = size;
    }
    return n->sbuf;
}

/* A socket bound to source address 127.0.0.(1 + k % src_ips) with the port
 * left to connect(): see bn_net.src_ips.  -errno on failure. */
static int loopback_socket(struct bn_net *n)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    struct sockaddr_in src;
    memset(&src, 0, sizeof src);
    src.sin_family = AF_INET;
    src.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(n->src_next++ % n->src_ips));
    if (setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    return fd;
}

static int is_loopback4(const struct sockaddr *a)
{
    return a->sa_family == AF_INET &&
           (ntohl(((const struct sockaddr_in *)a)->sin_addr.s_addr) >> 24) == 127;
}

int bn_connect(struct bn_net *n, struct bn_conn *c, const struct sockaddr *addr,
               const struct bn_target *t)
{
    c->net = n;
    c->xp = NULL;
    int r = uv_tcp_init(n->loop, &c->tcp);
    if (r < 0)
        return r;
    if (n->src_ips > 1 && is_loopback4(addr)) {
        int fd = loopback_socket(n);
        if (fd < 0 || (r = uv_tcp_open(&c->tcp, fd)) < 0) {
            if (fd >= 0)
                close(fd);
            else
                r = fd;
            c->closing = 1;
            uv_close((uv_handle_t *)&c->tcp, NULL);
            return r;
        }
    }
    c->tcp.data = c;
    c->creq.data = c;
    if (t && t->scheme != BT_TCP)
        bt_attach(c, t);
    r = uv_tcp_connect(&c->creq, &c->tcp, addr, connect_cb);
    if (r < 0) {
        c->closing = 1;
        bt_free(c);
        uv_close((uv_handle_t *)&c->tcp, NULL);
    }
    return r;
}

void bn_close(struct bn_conn *c, uv_close_cb close_cb)
{
    if (c->closing)
        return;
    c->closing = 1;
    if (c->dirty) {
        struct bn_conn **pp = &c->net->dirty;
        while (*pp && *pp != c)
            pp = &(*pp)->next_dirty;
        if (*pp)
            *pp = c->next_dirty;
        c->dirty = 0;
    }
    if (c->xp)
        bt_close(c, close_cb);
    else
        uv_close((uv_handle_t *)&c->tcp, close_cb);
}

void bn_net_init(struct bn_net *n, uv_loop_t *loop)
{
    memset(n, 0, sizeof *n);
    n->loop = loop;
    n->rbuf_cap = RBUF_SIZE;
    n->rbuf = bx_malloc(n->rbuf_cap);
    uv_prepare_init(loop, &n->flush);
    n->flush.data = n;
    uv_prepare_start(&n->flush, flush_cb);
    uv_unref((uv_handle_t *)&n->flush);
}

void bn_net_close(struct bn_net *n)
{
    uv_close((uv_handle_t *)&n->flush, NULL);
    free(n->rbuf);
    n->rbuf = NULL;
    free(n->sbuf);
    n->sbuf = NULL;
}

/* ---- field scanner -------------------------------------------------------- */

static const char *skip_ws(const char *p, const char *e)
{
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* p is just after an opening quote: returns the closing quote or NULL. */
static const char *str_end(const char *p, const char *e)
{
    while (p < e) {
        const char *q = memchr(p, '"', (size_t)(e - p));
        if (!q)
            return NULL;
        /* count the backslashes before the quote */
        const char *b = q;
        while (b > p && b[-1] == '\\')
            b--;
        if (((q - b) & 1) == 0)
            return q;
        p = q + 1;
    }
    return NULL;
}

/* Skip one value starting at p; returns the byte after it or NULL. */
static const char *skip_value(const char *p, const char *e)
{
    if (p >= e)
        return NULL;
    if (*p == '"') {
        const char *q = str_end(p + 1, e);
        return q ? q + 1 : NULL;
    }
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (p < e) {
            char ch = *p;
            if (ch == '"') {
                const char *q = str_end(p + 1, e);
                if (!q)
                    return NULL;
                p = q + 1;
                continue;
            }
            if (ch == '{' || ch == '[')
                depth++;
            else if ((ch == '}' || ch == ']') && --depth == 0)
                return p + 1;
            p++;
        }
        return NULL;
    }
    while (p < e && *p != ',' && *p != '}' && *p != ' ' && *p != '\n')
        p++;
    return p;
}

static int parse_int(const char *p, const char *e, int64_t *out)
{
    int neg = 0;
    int64_t v = 0;
    if (p < e && *p == '-') {
        neg = 1;
        p++;
    }
    if (p >= e || *p < '0' || *p > '9')
        return -1;
    while (p < e && *p >= '0' && *p <= '9')
        v = v * 10 + (*p++ - '0');
    *out = neg ? -v : v;
    return 0;
}

#define KEY_IS(k, lit) (klen == sizeof(lit) - 1 && memcmp((k), (lit), klen) == 0)

int bn_scan(const char *f, size_t len, struct bn_fields *o)
{
    const char *p = f, *e = f + len;
    memset(o, 0, sizeof *o);
    p = skip_ws(p, e);
    if (p >= e || *p != '{')
        return -1;
    p++;
    for (;;) {
        p = skip_ws(p, e);
        if (p < e && *p == '}')
            return 0;
        if (p >= e || *p != '"')
            return -1;
        const char *k = p + 1, *ke = str_end(k, e);
        if (!ke)
            return -1;
        size_t klen = (size_t)(ke - k);
        p = skip_ws(ke + 1, e);
        if (p >= e || *p != ':')
            return -1;
        p = skip_ws(p + 1, e);
        const char *v = p;
        p = skip_value(p, e);
        if (!p)
            return -1;
        if (KEY_IS(k, "msgid"))
            o->has_msgid = parse_int(v, p, &o->msgid) == 0;
        else if (KEY_IS(k, "id"))
            o->has_id = parse_int(v, p, &o->id) == 0;
        else if (KEY_IS(k, "errno"))
            o->has_errno = parse_int(v, p, &o->errno_) == 0;
        else if (KEY_IS(k, "groupid"))
            o->has_groupid = parse_int(v, p, &o->groupid) == 0;
        else if (KEY_IS(k, "req"))
            o->has_req = parse_int(v, p, &o->req) == 0;
        else if (KEY_IS(k, "seq"))
            o->has_seq = parse_int(v, p, &o->seq) == 0;
        else if (*v == '"' && KEY_IS(k, "msg")) {
            o->msg = v + 1;
            o->msg_len = (size_t)(p - v) - 2;
        } else if (*v == '"' && KEY_IS(k, "token")) {
            o->token = v + 1;
            o->token_len = (size_t)(p - v) - 2;
        } else if (*v == '"' && KEY_IS(k, "name")) {
            o->name = v + 1;
            o->name_len = (size_t)(p - v) - 2;
        } else if (*v == '"' && KEY_IS(k, "errmsg")) {
            o->errmsg = v + 1;
            o->errmsg_len = (size_t)(p - v) - 2;
        }
        p = skip_ws(p, e);
        if (p < e && *p == ',') {
            p++;
            continue;
        }
        if (p < e && *p == '}')
            return 0;
        return -1;
    }
}

int bn_is_busy(const struct bn_fields *f)
{
    if (f->has_errno && f->errno_ == 113)
        return 1;
    return f->errmsg && (memmem(f->errmsg, f->errmsg_len, "busy", 4) ||
                         memmem(f->errmsg, f->errmsg_len, "try again", 9));
}
