/*
 * conn.c - chat-cli's connection to the server: resolve, connect, read the
 * JSON stream, write requests, and come back after the server went away.
 *
 * One connection at a time.  Each attempt is a fresh heap struct cli_conn
 * whose uv_tcp_t is closed, never reused, when the attempt ends; the close
 * callback frees it, so a late callback of an old attempt can only ever see
 * its own, still valid, struct and is recognised by c->conn != k.
 *
 * Framing: chatd writes one compact JSON object plus '\n'; the reader does
 * not rely on the newline but finds the end of each top-level object itself
 * (string- and escape-aware), like the server does, so it reads any of the
 * server's framings.
 *
 * Transports: for tcp:// the socket's bytes go straight into the scanner's
 * buffer and requests straight to uv_write, as they always did; for tls://,
 * ws:// and wss:// they pass through xport.c, which calls conn_ready once
 * its handshakes are done (a connection counts as up only then; a
 * handshake that takes longer than the reply timeout is given up).
 *
 * Reconnect: after a failed attempt or a lost connection the next attempt is
 * delayed by a backoff that starts at 250 ms and doubles up to 8 s, with
 * +-25% jitter so that the clients of a dead node do not all come back in the
 * same millisecond.  The backoff resets once a connection has proved useful
 * (the server sent something, or it stayed up for two seconds): a balancer
 * that accepts and at once closes, because no node behind it is up, keeps
 * backing off.
 */
#include <stdlib.h>
#include <string.h>

#include "cli.h"

#define IN_MAX (64u << 20)    /* a login ack with many offline messages */
#define BACKOFF_MIN 250
#define BACKOFF_MAX 8000
#define USEFUL_MS 2000

/* Scanner state lives in the connection: see conn_scan. */
struct scan {
    size_t pos;    /* next byte to look at */
    size_t start;  /* first byte of the current object */
    int depth, in_str, esc;
};

struct conn_priv {
    struct cli_conn pub;
    struct scan sc;
    uint64_t up_ms;   /* uv_now at connect */
    int got_frame;
};

struct wreq {
    uv_write_t w;
    char data[];
};

static void retry_cb(uv_timer_t *t);

static void conn_free_cb(uv_handle_t *h)
{
    struct conn_priv *p = h->data;

    xp_free(&p->pub);
    free(p->pub.in);
    free(p);
}

static uint64_t next_delay(struct cli *c)
{
    uint64_t d = c->backoff_ms;
    uint64_t jitter = d / 2 ? (uint64_t)rand() % (d / 2 + 1) : 0;

    c->backoff_ms = d * 2 > BACKOFF_MAX ? BACKOFF_MAX : d * 2;
    return d - d / 4 + jitter;
}

/* End the current attempt (connected or not) and schedule the next one. */
static void conn_drop(struct cli *c, const char *why)
{
    struct conn_priv *p = (struct conn_priv *)c->conn;
    int was_up = c->connected;
    uint64_t delay;

    if (!p)
        return;
    c->conn = NULL;
    c->connected = 0;
    if (was_up && (p->got_frame || uv_now(c->loop) - p->up_ms >= USEFUL_MS))
        c->backoff_ms = BACKOFF_MIN;
    uv_close((uv_handle_t *)&p->pub.tcp, conn_free_cb);
    if (c->quitting)
        return;
    delay = next_delay(c);
    ev_disconnected(c, why, delay, was_up);
    uv_timer_start(&c->retry_timer, retry_cb, delay, 0);
}

static void reserve_in(struct cli_conn *k, size_t want)
{
    if (want > k->incap) {
        char *n = realloc(k->in, want);
        if (!n)
            cli_oom();
        k->in = n;
        k->incap = want;
    }
}

static void alloc_cb(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    static char raw[65536]; /* ciphertext or frames: xp_input copies out */
    struct cli_conn *k = h->data;

    if (k->c->scheme != XP_TCP) {
        *buf = uv_buf_init(raw, sizeof(raw));
        return;
    }
    reserve_in(k, k->inlen + (hint < 65536 ? 65536 : hint));
    *buf = uv_buf_init(k->in + k->inlen, (unsigned)(k->incap - k->inlen));
}

/* Hand every complete object in k->in to ev_message; keep the rest.
 * Returns -1 when the stream is not JSON objects (the caller drops). */
static int conn_scan(struct cli *c, struct conn_priv *p)
{
    struct cli_conn *k = &p->pub;
    struct scan *s = &p->sc;
    size_t keep;

    for (; s->pos < k->inlen; s->pos++) {
        unsigned char ch = (unsigned char)k->in[s->pos];

        if (s->depth == 0) {
            if (ch == '{') {
                s->depth = 1;
                s->start = s->pos;
            } else if (ch != '\n' && ch != '\r' && ch != ' ' && ch != '\t' &&
                       ch != '\0') {
                return -1;
            } else {
                s->start = s->pos + 1;
            }
            continue;
        }
        if (s->in_str) {
            if (s->esc)
                s->esc = 0;
            else if (ch == '\\')
                s->esc = 1;
            else if (ch == '"')
                s->in_str = 0;
            continue;
        }
        if (ch == '"') {
            s->in_str = 1;
        } else if (ch == '{' || ch == '[') {
            s->depth++;
        } else if ((ch == '}' || ch == ']') && --s->depth == 0) {
            cJSON *j = cJSON_ParseWithLength(k->in + s->start,
                                             s->pos + 1 - s->start);
            s->start = s->pos + 1;
            if (!j)
                return -1;
            p->got_frame = 1;
            ev_message(c, j);
            cJSON_Delete(j);
            if (c->conn != k)
                return 0; /* dropped or quitting meanwhile */
        }
    }
    /* move the unfinished object (if any) to the front */
    keep = s->depth ? k->inlen - s->start : 0;
    if (keep && s->start)
        memmove(k->in, k->in + s->start, keep);
    k->inlen = keep;
    s->pos = keep;
    s->start = 0;
    if (keep > IN_MAX)
        return -1;
    return 0;
}

static void read_cb(uv_stream_t *st, ssize_t n, const uv_buf_t *buf)
{
    struct conn_priv *p = st->data;
    struct cli *c = p->pub.c;

    if (c->conn != &p->pub)
        return;
    if (n < 0) {
        conn_drop(c, n == UV_EOF ? "the server closed the connection"
                                 : uv_strerror((int)n));
        return;
    }
    if (c->scheme != XP_TCP) {
        if (n > 0)
            xp_input(&p->pub, buf->base, (size_t)n);
        return;
    }
    p->pub.inlen += (size_t)n;
    if (conn_scan(c, p) < 0 && c->conn == &p->pub)
        conn_drop(c, "the server sent something that is not JSON");
}

int conn_alive(const struct cli_conn *k)
{
    return k->c->conn == k && !k->c->quitting;
}

void conn_fail(struct cli_conn *k, const char *why)
{
    if (conn_alive(k))
        conn_drop(k->c, why);
}

void conn_plain_in(struct cli_conn *k, const char *data, size_t n)
{
    struct conn_priv *p = (struct conn_priv *)k;

    if (!conn_alive(k))
        return;
    reserve_in(k, k->inlen + n);
    memcpy(k->in + k->inlen, data, n);
    k->inlen += n;
    if (conn_scan(k->c, p) < 0 && conn_alive(k))
        conn_drop(k->c, "the server sent something that is not JSON");
}

void conn_ready(struct cli_conn *k)
{
    struct conn_priv *p = (struct conn_priv *)k;
    struct cli *c = k->c;

    if (!conn_alive(k))
        return;
    p->up_ms = uv_now(c->loop);
    c->connected = 1;
    ev_connected(c);
}

void conn_tick(struct cli *c)
{
    struct cli_conn *k = c->conn;

    if (k && k->up && !c->connected &&
        uv_now(c->loop) - k->start_ms > (uint64_t)(c->reply_timeout * 1000))
        conn_drop(c, c->scheme == XP_TLS ? "the TLS handshake timed out"
                                         : "the handshake timed out");
}

static void connect_cb(uv_connect_t *req, int status)
{
    struct conn_priv *p = req->data;
    struct cli *c = p->pub.c;
    int rc;

    if (status == UV_ECANCELED || c->conn != &p->pub)
        return;
    if (status < 0) {
        conn_drop(c, uv_strerror(status));
        return;
    }
    rc = uv_read_start((uv_stream_t *)&p->pub.tcp, alloc_cb, read_cb);
    if (rc < 0) {
        conn_drop(c, uv_strerror(rc));
        return;
    }
    p->pub.up = 1;
    p->pub.start_ms = uv_now(c->loop);
    xp_start(&p->pub); /* calls conn_ready once the transport is up */
}

static void resolve_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct cli *c = req->data;
    struct conn_priv *p;
    int rc;

    c->gai = NULL;
    free(req);
    if (c->quitting || status == UV_EAI_CANCELED) {
        uv_freeaddrinfo(res);
        return;
    }
    p = calloc(1, sizeof(*p));
    if (!p)
        cli_oom();
    p->pub.c = c;
    p->pub.tcp.data = p;
    p->pub.creq.data = p;
    uv_tcp_init(c->loop, &p->pub.tcp);
    c->conn = &p->pub;
    if (status < 0) {
        uv_freeaddrinfo(res);
        conn_drop(c, uv_strerror(status));
        return;
    }
    uv_tcp_nodelay(&p->pub.tcp, 1);
    uv_tcp_keepalive(&p->pub.tcp, 1, 30);
    rc = uv_tcp_connect(&p->pub.creq, &p->pub.tcp, res->ai_addr, connect_cb);
    uv_freeaddrinfo(res);
    if (rc < 0)
        conn_drop(c, uv_strerror(rc));
}

void conn_start(struct cli *c)
{
    struct addrinfo hints;
    int rc;

    if (c->conn || c->gai || c->quitting)
        return;
    uv_timer_stop(&c->retry_timer);
    if (!c->backoff_ms)
        c->backoff_ms = BACKOFF_MIN;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    c->gai = cli_xmalloc(sizeof(*c->gai));
    c->gai->data = c;
    rc = uv_getaddrinfo(c->loop, c->gai, resolve_cb, c->host, c->port, &hints);
    if (rc < 0) {
        /* the callback will not run: retry later as for any failure */
        uint64_t delay = next_delay(c);

        free(c->gai);
        c->gai = NULL;
        ev_disconnected(c, uv_strerror(rc), delay, 0);
        uv_timer_start(&c->retry_timer, retry_cb, delay, 0);
    }
}

static void retry_cb(uv_timer_t *t)
{
    struct cli *c = t->data;

    if (c->relogin && c->connected) {
        cmd_relogin(c); /* a delayed re-login, not a reconnect */
        return;
    }
    conn_start(c);
}

void conn_relogin_in(struct cli *c, uint64_t ms)
{
    if (c->connected)
        uv_timer_start(&c->retry_timer, retry_cb, ms, 0);
}

static void write_cb(uv_write_t *w, int status)
{
    (void)status; /* a failed write shows up as a read error too */
    free(w);
}

void conn_raw_write(struct cli_conn *k, const void *data, size_t n)
{
    struct wreq *w;
    uv_buf_t b;

    if (!conn_alive(k) || !n)
        return;
    w = cli_xmalloc(sizeof(*w) + n);
    memcpy(w->data, data, n);
    b = uv_buf_init(w->data, (unsigned)n);
    if (uv_write(&w->w, (uv_stream_t *)&k->tcp, &b, 1, write_cb) < 0) {
        free(w);
        conn_drop(k->c, "cannot write to the socket");
    }
}

int conn_send(struct cli *c, const cJSON *obj)
{
    char *s;
    size_t n;
    struct wreq *w;
    uv_buf_t b;

    if (!c->connected)
        return -1;
    s = cJSON_PrintUnformatted(obj);
    if (!s)
        cli_oom();
    n = strlen(s);
    w = cli_xmalloc(sizeof(*w) + n + 1);
    memcpy(w->data, s, n);
    w->data[n] = '\n';
    cJSON_free(s);
    if (c->scheme != XP_TCP) {
        xp_send(c->conn, w->data, n + 1);
        free(w);
        return c->connected ? 0 : -1;
    }
    b = uv_buf_init(w->data, (unsigned)(n + 1));
    if (uv_write(&w->w, (uv_stream_t *)&c->conn->tcp, &b, 1, write_cb) < 0) {
        free(w);
        return -1;
    }
    return 0;
}

void conn_close_all(struct cli *c)
{
    uv_timer_stop(&c->retry_timer);
    if (c->gai)
        uv_cancel((uv_req_t *)c->gai);
    if (c->conn) {
        struct cli_conn *k = c->conn;

        c->conn = NULL;
        c->connected = 0;
        uv_close((uv_handle_t *)&k->tcp, conn_free_cb);
    }
}
