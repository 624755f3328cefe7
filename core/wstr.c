/*
 * wstr.c - the ws and wss transports: the WebSocket engine on the seam.
 *
 * Two table entries share these functions: ws (on the socket) and wss (on
 * tls; net builds the chain, this file never knows which it is).  Each
 * connection owns one struct ws_conn (ws.c), which parses the upgrade
 * request and the frames and leaves the bytes to write in its output; this
 * file moves them down with net_tr_down after every call into the engine,
 * so nothing stays held here between calls (also from inside a callback:
 * net may close the session synchronously while a message is processed,
 * and must find our close frame already in its wire buffer).  Each whole text message goes up to net in one net_tr_up,
 * and each '\n'-terminated message net hands down becomes one text frame
 * without its '\n'.
 *
 * The engine's callbacks only record what happened (and pass messages
 * up); the connection is ended after ws_conn_feed has returned and the
 * engine's last bytes (an HTTP refusal, a close frame, our answer to the
 * peer's close) are written: net_tr_close(t, 1) for an error, (t, 0) for
 * the peer's goodbye.  The engine is freed only from free().
 *
 * Keepalive: the endpoint keeps its connections on a list, and tick()
 * (net's limits timer, about once a second) pings each open one every
 * [ws] ping_interval and closes it with 1008 when the pong has not come
 * within pong_timeout.  The endpoint's ws_conf (path, origins,
 * max_message) is copied at start; a SIGHUP makes a new copy for new
 * connections (each connection holds a reference to the one it began
 * with) and applies the ping times to all.
 */
#include <string.h>

#include "transport.h"
#include "ws.h"

struct wstr_conn;

/* What the engine checks, shared by the connections made with it: a
 * reload makes a new one for new connections, the old one goes with its
 * last connection. */
struct wstr_set {
    struct ws_conf wc;
    char *path;
    char **origins;
    size_t norigins;
    struct web_files *files; /* [web] root as loaded then (a reference) */
    unsigned refs; /* the endpoint's and each connection's */
};

struct wstr_ep {
    struct wstr_set *set;
    uint64_t ping_ms, pong_ms; /* live: a reload applies to every connection */
    struct wstr_conn *conns;   /* for tick */
    char name[80];
};

struct wstr_conn {
    struct net_tconn t; /* first: net sees this */
    struct ws_conn *w;
    struct wstr_ep *ep;
    struct wstr_set *set;
    struct wstr_conn *prev, *next;
    uint64_t next_ping, pong_due; /* 0: none */
    int err_code;                 /* on_error's code, for the log */
    unsigned failed : 1, peer_closed : 1;
};

/* Move the engine's output down; 0 or -1. */
static int wstr_flush(struct wstr_conn *c)
{
    const char *p;
    size_t n;

    while ((n = ws_conn_pending(c->w, &p)) > 0) {
        if (net_tr_down(&c->t, p, n))
            return -1;
        ws_conn_consume(c->w, n);
    }
    return 0;
}

/* ---- engine callbacks ---------------------------------------------------- */

static void on_open(void *ud)
{
    struct wstr_conn *c = ud;

    if (c->ep->ping_ms)
        c->next_ping = uv_now(net_tr_loop()) + c->ep->ping_ms;
    net_tr_ready(&c->t);
}

static void on_message(void *ud, const char *text, size_t len)
{
    struct wstr_conn *c = ud;
    net_tr_up(&c->t, text, len);
}

static void on_pong(void *ud)
{
    struct wstr_conn *c = ud;
    c->pong_due = 0;
}

static void on_close(void *ud, uint16_t code, const char *reason, size_t len)
{
    struct wstr_conn *c = ud;
    (void)reason;
    (void)len;
    LOGSD(c->t.s, "ws: the peer closed (%u)", (unsigned)code);
    c->peer_closed = 1;
}

static void on_error(void *ud, int code, const char *why)
{
    struct wstr_conn *c = ud;
    LOGSD(c->t.s, "ws: %d %s", code, why ? why : "");
    c->err_code = code;
    c->failed = 1;
}

static const struct ws_cb wstr_cb = {
    .on_open = on_open,
    .on_message = on_message,
    .on_pong = on_pong,
    .on_close = on_close,
    .on_error = on_error,
};

/* ---- endpoint -------------------------------------------------------------- */

static void set_put(struct wstr_set *st)
{
    if (!st || --st->refs)
        return;
    for (size_t i = 0; i < st->norigins; i++)
        mem_free(st->origins[i]);
    mem_free(st->origins);
    mem_free(st->path);
    web_files_unref(st->files);
    mem_free(st);
}

/* A set from c and path; NULL when out of memory. */
static struct wstr_set *set_new(const struct conf *c, const char *path)
{
    struct wstr_set *st = mem_calloc(1, sizeof *st);

    if (!st)
        return NULL;
    st->refs = 1;
    if (!(st->path = mem_strdup(path)))
        goto fail;
    if (c->nws_origins && !(st->origins = mem_calloc(c->nws_origins, sizeof *st->origins)))
        goto fail;
    for (size_t i = 0; i < c->nws_origins; i++, st->norigins++)
        if (!(st->origins[i] = mem_strdup(c->ws_origins[i])))
            goto fail;
    st->wc.max_message = c->ws_max_message;
    st->wc.path = st->path;
    st->wc.origins = st->origins;
    st->wc.norigins = st->norigins;
    /* the web client on every other path (webfiles.c loads it before the
     * endpoints start, and again before they reload) */
    st->files = web_files_ref((struct web_files *)web_current());
    st->wc.files = st->files;
    return st;
fail:
    set_put(st);
    return NULL;
}

static void ep_times(struct wstr_ep *ep, const struct conf *c)
{
    ep->ping_ms = (uint64_t)c->ws_ping_interval_s * 1000;
    ep->pong_ms = (uint64_t)c->ws_pong_timeout_s * 1000;
}

static int wstr_ep_start(const struct conf *c, const struct conf_listen *l, void **ep_ctx,
                         int *handshake_ms, char *err, size_t errlen)
{
    struct wstr_ep *ep = mem_calloc(1, sizeof *ep);

    if (!ep || !(ep->set = set_new(c, l->path ? l->path : "/"))) {
        mem_free(ep);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    ep_times(ep, c);
    snprintf(ep->name, sizeof ep->name, "%s:%d%s", l->host, l->port, ep->set->path);
    *handshake_ms = c->ws_handshake_timeout_s * 1000;
    *ep_ctx = ep;
    return 0;
}

/* SIGHUP: origins and max_message for new connections, the ping times for
 * all (handshake_timeout and the path stay: net and the listener keep them). */
static void wstr_ep_reload(void *ep_ctx, const struct conf *c)
{
    struct wstr_ep *ep = ep_ctx;
    struct wstr_set *st = set_new(c, ep->set->path);

    if (!st) {
        LOGE("ws %s: reload: out of memory; keeping the old [ws] settings", ep->name);
        return;
    }
    set_put(ep->set);
    ep->set = st;
    ep_times(ep, c);
    LOGI("ws %s: [ws] reloaded (%zu origins); new connections use it", ep->name,
         st->norigins);
}

static void wstr_ep_stop(void *ep_ctx)
{
    struct wstr_ep *ep = ep_ctx;
    set_put(ep->set);
    mem_free(ep);
}

/* End c once the engine's last bytes are down: error 1, or the peer's
 * goodbye 0. */
static void wstr_end(struct wstr_conn *c, int error)
{
    wstr_flush(c);
    net_tr_close(&c->t, error);
}

static void wstr_tick(void *ep_ctx, uint64_t now)
{
    struct wstr_ep *ep = ep_ctx;

    if (!ep->ping_ms)
        return;
    for (struct wstr_conn *c = ep->conns; c; c = c->next) {
        if (net_session_closing(c->t.s) || ws_conn_state(c->w) != WS_OPEN)
            continue;
        if (c->pong_due && now >= c->pong_due) {
            LOGSD(c->t.s, "ws: no pong within %llu ms", (unsigned long long)ep->pong_ms);
            ws_conn_close(c->w, WS_CLOSE_POLICY, "pong timeout");
            wstr_end(c, 1);
            continue;
        }
        if (!c->pong_due && c->next_ping && now >= c->next_ping) {
            if (ws_conn_ping(c->w) == 0)
                c->pong_due = now + ep->pong_ms;
            c->next_ping = now + ep->ping_ms;
            if (wstr_flush(c))
                net_tr_close(&c->t, 1);
        }
    }
}

/* ---- connection ------------------------------------------------------------- */

static struct net_tconn *wstr_open(void *ep_ctx, struct chat_session *s,
                                   struct net_tconn *below)
{
    struct wstr_ep *ep = ep_ctx;
    struct wstr_conn *c = mem_calloc(1, sizeof *c);

    (void)s;
    (void)below;
    if (!c)
        return NULL;
    if (!(c->w = ws_conn_new(&ep->set->wc, &wstr_cb, c))) {
        mem_free(c);
        return NULL;
    }
    c->ep = ep;
    c->set = ep->set;
    ep->set->refs++;
    c->next = ep->conns;
    if (ep->conns)
        ep->conns->prev = c;
    ep->conns = c;
    return &c->t;
}

static int wstr_input(struct net_tconn *t, const char *buf, size_t n)
{
    struct wstr_conn *c = (struct wstr_conn *)t;
    int r;

    r = ws_conn_feed(c->w, buf, n);
    if (r == CHAT_ERR_NOMEM) {
        LOGSD(t->s, "ws: out of memory");
        return -1;
    }
    if (c->failed)
        wstr_end(c, 1);
    else if (c->peer_closed)
        wstr_end(c, 0);
    else if (wstr_flush(c))
        return -1;
    return 0;
}

static int wstr_output(struct net_tconn *t, const char *buf, size_t n)
{
    struct wstr_conn *c = (struct wstr_conn *)t;
    const char *end = buf + n;

    while (buf < end) {
        const char *nl = memchr(buf, '\n', (size_t)(end - buf));
        size_t len = (size_t)((nl ? nl : end) - buf);
        int r = ws_conn_send_text(c->w, buf, len);
        if (r == CHAT_ERR_NOMEM)
            return -1;
        if (r) /* closed either way: the peer gets no more */
            return 0;
        buf += len + (nl ? 1 : 0);
    }
    return wstr_flush(c);
}

static size_t wstr_pending(const struct net_tconn *t)
{
    const char *p;
    return ws_conn_pending(((const struct wstr_conn *)t)->w, &p);
}

/* The close code for the errno net closed the session with. */
static uint16_t close_code(int code)
{
    switch (code) {
    case 0:
    case CHAT_E_IDLE:
    case CHAT_E_KICKED:
    case CHAT_E_REPLACED:
        return WS_CLOSE_NORMAL;
    case CHAT_E_SHUTDOWN:
    case CHAT_E_DRAINING:
        return WS_CLOSE_GOING_AWAY;
    default: /* slow reader, limits, protocol errors */
        return WS_CLOSE_POLICY;
    }
}

static void wstr_close(struct net_tconn *t, int code, const char *reason)
{
    struct wstr_conn *c = (struct wstr_conn *)t;

    if (ws_conn_state(c->w) != WS_OPEN)
        return; /* a handshake (nothing to close) or a close already sent */
    ws_conn_close(c->w, close_code(code), reason);
    wstr_flush(c);
}

static void wstr_free(struct net_tconn *t)
{
    struct wstr_conn *c = (struct wstr_conn *)t;

    if (c->prev)
        c->prev->next = c->next;
    else
        c->ep->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    ws_conn_free(c->w);
    set_put(c->set);
    mem_free(c);
}

const struct net_transport wstr_ws_transport = {
    .name = "ws",
    .below = NULL,
    .flags = NET_TR_MESSAGES,
    .ep_start = wstr_ep_start,
    .ep_reload = wstr_ep_reload,
    .ep_stop = wstr_ep_stop,
    .tick = wstr_tick,
    .open = wstr_open,
    .input = wstr_input,
    .output = wstr_output,
    .pending = wstr_pending,
    .close = wstr_close,
    .free = wstr_free,
};

const struct net_transport wstr_wss_transport = {
    .name = "wss",
    .below = "tls",
    .flags = NET_TR_MESSAGES,
    .ep_start = wstr_ep_start,
    .ep_reload = wstr_ep_reload,
    .ep_stop = wstr_ep_stop,
    .tick = wstr_tick,
    .open = wstr_open,
    .input = wstr_input,
    .output = wstr_output,
    .pending = wstr_pending,
    .close = wstr_close,
    .free = wstr_free,
};
