/*
 * relay.c - chat-relay, the bare baseline chat-bench measures chatd against.
 *
 * The least a server must do to pass chat-bench's pairs scenario: accept
 * connections, cut the byte stream into frames (NUL or newline separated),
 * and for each frame look at two numbers with a plain substring scan, no
 * JSON parsing:
 *   LOGIN_MSG (1)      remember the connection under "id", answer a fixed
 *                      {"msgid":2,"errno":0,"id":N,"name":"x"}
 *   LOGINOUT_MSG (3)   forget it
 *   REG_MSG (4)        hand out the next id: {"msgid":5,"errno":0,"id":N}
 *   ONE_CHAT_MSG (6)   append the frame + '\n' to the connection of "toid"
 * Anything else is dropped.  There are no passwords, no database, no
 * checks: the rate it reaches on a machine is what the event loop and the
 * kernel allow, so chatd's rate can be stated as a fraction of it.
 *
 * The I/O is done the way a careful libuv server does it, so the baseline
 * is not a strawman: one read buffer shared by all connections (only a
 * frame cut by a read is copied into the connection), and output appended
 * to a per-connection buffer that one uv_prepare handle flushes once per
 * loop iteration with uv_try_write (uv_write for the rest), so a receiver
 * gets everything relayed to it during an iteration in one syscall.
 *
 * usage: chat-relay [-l HOST:PORT]   (default 127.0.0.1:6100; port 0 picks
 * a free port, printed as "chat-relay: listening on HOST:PORT")
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#define RBUF_SIZE (256 * 1024)
#define READ_MIN_FREE (16 * 1024)
#define MAX_FRAME (1 << 20)

struct buf {
    char *p;
    size_t len, cap;
};

struct conn {
    uv_tcp_t tcp;
    uv_write_t wreq;
    struct buf out, wbuf, in;
    struct conn *next_dirty;
    int64_t user;              /* 0 when not logged in */
    unsigned dirty : 1, writing : 1, closing : 1, in_own : 1;
};

struct slot {
    int64_t key;               /* 0: empty, -1: deleted */
    struct conn *c;
};

static uv_loop_t *loop;
static uv_tcp_t server;
static uv_prepare_t flusher;
static uv_signal_t sigint_h, sigterm_h;
static struct conn *dirty_list;
static char *rbuf;
static struct slot *users;
static size_t users_cap, users_used;
static int64_t next_id = 1;

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n);
    if (!q) {
        fprintf(stderr, "chat-relay: out of memory\n");
        exit(1);
    }
    return q;
}

static void buf_reserve(struct buf *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < extra)
        cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

static void buf_add(struct buf *b, const void *p, size_t n)
{
    buf_reserve(b, n);
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

/* ---- id -> connection, open addressing ---------------------------------- */

static size_t hash64(int64_t k)
{
    uint64_t x = (uint64_t)k * 0x9E3779B97F4A7C15ull;
    return (size_t)(x ^ (x >> 29));
}

static struct slot *users_find(int64_t key, int for_insert)
{
    if (!users_cap)
        return NULL;
    size_t mask = users_cap - 1, i = hash64(key) & mask;
    struct slot *tomb = NULL;
    for (;;) {
        struct slot *s = &users[i];
        if (s->key == key)
            return s;
        if (s->key == 0)
            return for_insert ? (tomb ? tomb : s) : NULL;
        if (s->key == -1 && !tomb)
            tomb = s;
        i = (i + 1) & mask;
    }
}

static void users_put(int64_t key, struct conn *c)
{
    if ((users_used + 1) * 2 > users_cap) {
        struct slot *old = users;
        size_t oldcap = users_cap;
        users_cap = users_cap ? users_cap * 2 : 1024;
        users = calloc(users_cap, sizeof *users);
        if (!users) {
            fprintf(stderr, "chat-relay: out of memory\n");
            exit(1);
        }
        users_used = 0;
        for (size_t i = 0; i < oldcap; i++)
            if (old[i].key > 0) {
                *users_find(old[i].key, 1) = old[i];
                users_used++;
            }
        free(old);
    }
    struct slot *s = users_find(key, 1);
    if (s->key != key) {
        if (s->key == 0)
            users_used++;
        s->key = key;
    }
    s->c = c;
}

static void users_del(int64_t key, const struct conn *c)
{
    struct slot *s = users_find(key, 0);
    if (s && s->c == c) {
        s->key = -1;
        s->c = NULL;
    }
}

/* ---- output ------------------------------------------------------------- */

static void conn_close(struct conn *c);
static void flush_conn(struct conn *c);

static void write_cb(uv_write_t *req, int status)
{
    struct conn *c = req->data;
    c->writing = 0;
    c->wbuf.len = 0;
    if (c->closing)
        return;
    if (status < 0)
        conn_close(c);
    else if (c->out.len)
        flush_conn(c);
}

static void flush_conn(struct conn *c)
{
    if (c->writing || c->closing || c->out.len == 0)
        return;
    uv_buf_t b = uv_buf_init(c->out.p, (unsigned)c->out.len);
    int r = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (r == (int)c->out.len) {
        c->out.len = 0;
        return;
    }
    if (r < 0 && r != UV_EAGAIN) {
        conn_close(c);
        return;
    }
    size_t done = r > 0 ? (size_t)r : 0;
    struct buf t = c->wbuf;
    c->wbuf = c->out;
    c->out = t;
    c->out.len = 0;
    b = uv_buf_init(c->wbuf.p + done, (unsigned)(c->wbuf.len - done));
    c->wreq.data = c;
    c->writing = 1;
    if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, write_cb) < 0) {
        c->writing = 0;
        conn_close(c);
    }
}

static void flush_cb(uv_prepare_t *h)
{
    (void)h;
    while (dirty_list) {
        struct conn *c = dirty_list;
        dirty_list = c->next_dirty;
        c->next_dirty = NULL;
        c->dirty = 0;
        flush_conn(c);
    }
}

static struct buf *out_of(struct conn *c)
{
    if (!c->dirty) {
        c->dirty = 1;
        c->next_dirty = dirty_list;
        dirty_list = c;
    }
    return &c->out;
}

/* ---- frames --------------------------------------------------------------- */

/* The integer after the first occurrence of key (e.g. "\"toid\":"). */
static int find_int(const char *f, size_t len, const char *key, int64_t *out)
{
    size_t klen = strlen(key);
    const char *p = memmem(f, len, key, klen);
    if (!p)
        return -1;
    const char *e = f + len;
    p += klen;
    while (p < e && *p == ' ')
        p++;
    int64_t v = 0;
    if (p >= e || *p < '0' || *p > '9')
        return -1;
    while (p < e && *p >= '0' && *p <= '9')
        v = v * 10 + (*p++ - '0');
    *out = v;
    return 0;
}

static void reply_id(struct conn *c, const char *head, int64_t id, const char *tail)
{
    char tmp[128];
    int n = snprintf(tmp, sizeof tmp, "%s%lld%s\n", head, (long long)id, tail);
    buf_add(out_of(c), tmp, (size_t)n);
}

static void on_frame(struct conn *c, const char *f, size_t len)
{
    int64_t msgid, id;
    if (find_int(f, len, "\"msgid\":", &msgid) < 0)
        return;
    switch (msgid) {
    case 6: {
        if (find_int(f, len, "\"toid\":", &id) < 0)
            return;
        struct slot *s = users_find(id, 0);
        if (!s || !s->c || s->c->closing)
            return;
        struct buf *b = out_of(s->c);
        buf_reserve(b, len + 1);
        memcpy(b->p + b->len, f, len);
        b->p[b->len + len] = '\n';
        b->len += len + 1;
        return;
    }
    case 1:
        if (find_int(f, len, "\"id\":", &id) < 0 || id <= 0)
            return;
        if (c->user)
            users_del(c->user, c);
        c->user = id;
        users_put(id, c);
        reply_id(c, "{\"msgid\":2,\"errno\":0,\"id\":", id, ",\"name\":\"x\"}");
        return;
    case 3:
        if (c->user)
            users_del(c->user, c);
        c->user = 0;
        return;
    case 4:
        reply_id(c, "{\"msgid\":5,\"errno\":0,\"id\":", next_id++, "}");
        return;
    default:
        return;
    }
}

/* Split p[0..len) at NUL/'\n'; returns the bytes consumed. */
static size_t split(struct conn *c, const char *p, size_t len)
{
    size_t pos = 0;
    while (pos < len && !c->closing) {
        size_t i = pos;
        while (i < len && p[i] != '\0' && p[i] != '\n')
            i++;
        if (i == len)
            break;
        const char *s = p + pos, *e = p + i;
        pos = i + 1;
        while (s < e && (*s == ' ' || *s == '\r' || *s == '\t'))
            s++;
        while (e > s && (e[-1] == '\r' || e[-1] == ' '))
            e--;
        if (e > s)
            on_frame(c, s, (size_t)(e - s));
    }
    return pos;
}

/* ---- connections -------------------------------------------------------- */

static void close_cb(uv_handle_t *h)
{
    struct conn *c = h->data;
    free(c->out.p);
    free(c->wbuf.p);
    free(c->in.p);
    free(c);
}

static void conn_close(struct conn *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    if (c->user)
        users_del(c->user, c);
    if (c->dirty) {
        struct conn **pp = &dirty_list;
        while (*pp && *pp != c)
            pp = &(*pp)->next_dirty;
        if (*pp)
            *pp = c->next_dirty;
        c->dirty = 0;
    }
    uv_close((uv_handle_t *)&c->tcp, close_cb);
}

static void alloc_cb(uv_handle_t *h, size_t sz, uv_buf_t *b)
{
    struct conn *c = h->data;
    (void)sz;
    if (c->in.len) {
        buf_reserve(&c->in, READ_MIN_FREE);
        c->in_own = 1;
        *b = uv_buf_init(c->in.p + c->in.len, (unsigned)(c->in.cap - c->in.len));
    } else {
        c->in_own = 0;
        *b = uv_buf_init(rbuf, RBUF_SIZE);
    }
}

static void read_cb(uv_stream_t *st, ssize_t n, const uv_buf_t *b)
{
    struct conn *c = st->data;
    (void)b;
    if (n == 0)
        return;
    if (n < 0) {
        conn_close(c);
        return;
    }
    if (c->in_own) {
        c->in.len += (size_t)n;
        size_t used = split(c, c->in.p, c->in.len);
        memmove(c->in.p, c->in.p + used, c->in.len - used);
        c->in.len -= used;
    } else {
        size_t used = split(c, rbuf, (size_t)n);
        if (used < (size_t)n && !c->closing)
            buf_add(&c->in, rbuf + used, (size_t)n - used);
    }
    if (c->in.len > MAX_FRAME)
        conn_close(c);
}

static void on_connection(uv_stream_t *srv, int status)
{
    if (status < 0)
        return;
    struct conn *c = calloc(1, sizeof *c);
    if (!c)
        return;
    uv_tcp_init(loop, &c->tcp);
    c->tcp.data = c;
    if (uv_accept(srv, (uv_stream_t *)&c->tcp) < 0) {
        uv_close((uv_handle_t *)&c->tcp, close_cb);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
}

static void walk_close(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (uv_is_closing(h))
        return;
    if (h->type == UV_TCP && h != (uv_handle_t *)&server)
        conn_close(h->data);
    else
        uv_close(h, NULL);
}

static void on_signal(uv_signal_t *h, int sig)
{
    (void)h;
    (void)sig;
    uv_walk(loop, walk_close, NULL);
}

int main(int argc, char **argv)
{
    const char *listen_on = "127.0.0.1:6100";
    int opt;
    while ((opt = getopt(argc, argv, "l:h")) != -1) {
        if (opt == 'l') {
            listen_on = optarg;
        } else {
            fprintf(opt == 'h' ? stdout : stderr, "usage: chat-relay [-l HOST:PORT]\n");
            return opt == 'h' ? 0 : 2;
        }
    }
    char host[64];
    const char *colon = strrchr(listen_on, ':');
    if (!colon || (size_t)(colon - listen_on) >= sizeof host) {
        fprintf(stderr, "chat-relay: bad address '%s'\n", listen_on);
        return 2;
    }
    memcpy(host, listen_on, (size_t)(colon - listen_on));
    host[colon - listen_on] = '\0';
    struct sockaddr_in addr;
    if (uv_ip4_addr(host, atoi(colon + 1), &addr) < 0) {
        fprintf(stderr, "chat-relay: bad address '%s'\n", listen_on);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    rbuf = malloc(RBUF_SIZE);
    loop = uv_default_loop();
    uv_tcp_init(loop, &server);
    int r = uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0);
    if (r == 0)
        r = uv_listen((uv_stream_t *)&server, 4096, on_connection);
    if (r < 0) {
        fprintf(stderr, "chat-relay: listen on %s: %s\n", listen_on, uv_strerror(r));
        return 1;
    }
    struct sockaddr_in bound;
    int blen = sizeof bound;
    uv_tcp_getsockname(&server, (struct sockaddr *)&bound, &blen);
    printf("chat-relay: listening on %s:%d\n", host, ntohs(bound.sin_port));
    fflush(stdout);
    uv_prepare_init(loop, &flusher);
    uv_prepare_start(&flusher, flush_cb);
    uv_signal_init(loop, &sigint_h);
    uv_signal_start(&sigint_h, on_signal, SIGINT);
    uv_signal_init(loop, &sigterm_h);
    uv_signal_start(&sigterm_h, on_signal, SIGTERM);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
    free(rbuf);
    free(users);
    return 0;
}
