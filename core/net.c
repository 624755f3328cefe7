/*
 * net.c - the listener, client sessions and their buffered output.
 *
 * Input: every read lands in one loop-wide buffer; the frame scanner finds
 * complete JSON objects and they are dispatched in place, so the common case
 * (whole requests in one read) copies nothing and allocates nothing per
 * byte.  Only a frame that straddles two reads is copied into the session's
 * partial buffer, which is released again once it is no longer needed.
 *
 * Output: net_send() appends to the session's output buffer and puts the
 * session on a flush list; a uv_check handle flushes every listed session
 * once per loop iteration, so all replies produced while handling one read
 * go out in one write.  The flush first tries uv_try_write(); only what the
 * kernel did not take becomes an asynchronous uv_write.  Output buffers come
 * from a small free list and go back there when a session has nothing
 * pending, so an idle connection holds no buffer at all.  The bytes queued
 * but not yet written are bounded by max_output: a client that stops reading
 * is logged and disconnected instead of growing memory.
 *
 * Deliveries (net_deliver: messages from other users, already reported as
 * delivered to their senders) are remembered as spans of the output stream
 * (a small array per session, trimmed as bytes are written).  When a session
 * closes with some of them unwritten (cut as a slow reader, a write error,
 * the shutdown timeout, a login ack never sent) each unsent one goes to
 * the callback registered with net_on_unsent() (sess_undeliverable, set by
 * main.c: net calls no layer above it directly) before its buffer is
 * freed, so the offline store keeps it; a frame the kernel took only in part counts as unsent.
 *
 * Transports (transport.h): every listen endpoint has a scheme.  A tcp
 * session takes the paths above as they are; a tls, ws or wss session
 * also has a chain of transport layers between its socket and its JSON
 * stream: reads go to the bottom layer, which hands decoded bytes up to
 * the frame scanner (or, for a message transport, one whole message to
 * process_message), and its output is encoded batch by batch into a wire
 * buffer that is written the same way; a batch counts as written, for the
 * delivery marks and flush waits, only once the wire has drained to the
 * kernel.  Sessions in a handshake are on their endpoint's time-ordered
 * list, expired by the same timer as the other limits.
 *
 * Sessions are freed only in their uv_close callback.  Closing first
 * unregisters the session (session_get() stops finding it), calls the
 * closing callback (net_on_closing: sess_closing, which queues the
 * protocol-2 NOTICE, fires CHAT_EV_SESSION_CLOSE with the user still bound
 * and releases the presence), then drops the user's binding, flushes what
 * is queued and shuts the socket down.  Complete frames, framing errors
 * and new sessions go up the same way (net_on_frame, net_on_error,
 * net_on_open): net calls nothing above it.
 *
 * Time limits are per request, never per byte, and one timer enforces them
 * all by walking two lists kept in time order (appending at the tail and
 * unlinking are O(1)), not one timer per session:
 *   - the request list holds the sessions with a frame under way, stamped
 *     with the arrival of its first byte: a frame not complete within
 *     request_timeout closes the session (slowloris);
 *   - the idle list holds the sessions idle_timeout applies to, stamped
 *     with their last complete request: a session that never logged in
 *     (its login deadline), and a logged-in one only while its output waits
 *     on a full kernel buffer (stamped when the wait began or last moved), so
 *     a peer that neither sends nor drains is dropped.  A logged-in reader
 *     is never idle: whether its peer is alive is the kernel's job, with TCP
 *     keepalive and TCP_USER_TIMEOUT (tcp_keepalive*, tcp_user_timeout).
 *
 * Admission: besides max_connections, connections are counted per client
 * address, all of them and those not logged in (a session counts as logged
 * in from net_session_bind to net_session_unbind), in two hash maps keyed
 * by the address, so accept and close cost O(1).  An IPv4 address is one
 * key; IPv6 is counted per /64, since one host is routinely given a whole
 * /64 and could otherwise take a fresh address per connection.  Addresses
 * in the trusted list (a proxy, a load generator) are not counted.  Over a
 * cap the connection is accepted and closed at once, with a log line at
 * most once a second.
 *
 * PROXY protocol ([server] proxy_protocol = on; the block "PROXY protocol"
 * below): a balancer in front says who the client is in a header before
 * the connection's own bytes.  The connection must come from a trusted
 * address (else it is refused at accept) and its first bytes go to
 * pp_parse() until the header is whole; only then is the session admitted
 * as any other (per-address caps and rates, registration, the open
 * callback), with the header's source as its address in every count, rate
 * limit and log line.  Until then the layers above do not know it: a bad
 * header, or none within request_timeout (else idle_timeout), refuses it.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core.h"
#include "transport.h"

#define OBUF_SMALL 4096      /* capacity of a pooled buffer */
#define OBUF_POOL_MAX 1024   /* pooled buffers kept */
#define READ_BUF_SIZE 65536
#define PART_KEEP 4096       /* partial buffer kept between frames */

struct obuf {
    size_t len;  /* bytes in data */
    size_t off;  /* bytes already written */
    size_t cap;
    char data[];
};

struct flush_wait {
    struct flush_wait *next;
    uint64_t mark; /* done when written_total >= mark */
    void (*cb)(int ok, void *ud);
    void *ud;
};

/* A delivery queued on a session: bytes [start, end) of the output stream
 * (queued_total positions), or of the held buffer while held. */
struct dmark {
    uint64_t start, end;
    int64_t uid;    /* the recipient (the session's user then) */
    int held;
};

/* A link of a time-ordered session list (idle, requests under way). */
struct tlink {
    struct tlink *prev, *next;
    uint64_t at;             /* uv_now() when the session joined the list */
};
struct tlist {
    struct tlink *head, *tail;
};

/* One listen endpoint: its socket and its transport chain, bottom first
 * (empty for tcp: net.c's own path).  See transport.h. */
#define NET_CHAIN_MAX 3
#define NET_TR_MAX 8      /* entries of transports[] */
struct net_endpoint {
    uv_tcp_t tcp;
    int open;
    const struct net_transport *chain[NET_CHAIN_MAX];
    void *ctx[NET_CHAIN_MAX];
    int nchain;
    int handshake_ms;        /* 0: no handshake deadline */
    unsigned char tri;       /* its transport's index in transports[] */
    struct tlist hands;      /* sessions in their handshake, oldest first */
    char name[80];           /* "tls://127.0.0.1:6443", for logs */
};

/* Connections from one IPv4 address or IPv6 /64; freed with the last one. */
struct net_addr {
    int64_t key;
    int v6;
    unsigned total, unauth;
};

struct chat_session {
    uv_tcp_t tcp;
    uint64_t id;
    /* transport (NULL top: tcp, net.c writes out itself): see transport.h */
    struct net_endpoint *ep;
    struct net_tconn *top, *bottom;
    struct obuf *wire;       /* encoded bytes not yet handed to the kernel */
    struct obuf *wire_inflight; /* owned by the pending uv_write */
    struct tlink hand;       /* on ep->hands until the handshake is done */
    int close_errno;         /* net_close's errno, for the transport's close */
    unsigned tr_ready : 1, tr_closed : 1;
    unsigned char tri;       /* index in transports[] (metrics) */
    int64_t uid;
    char *name;              /* NUL-terminated copy; may hold NUL itself */
    size_t name_len;
    int proto;
    unsigned closing : 1, hold : 1, in_flush : 1, writing : 1, graceful : 1,
        garbage : 1, registered : 1, sink : 1, pacing : 1, unauth : 1;
    struct net_addr *addr;   /* its address's counts; NULL: not counted */
    unsigned char why;       /* enum metrics_close + 1 when set by the cause */
    struct frame_scanner fs;
    char *part;              /* bytes of a frame that straddles reads */
    size_t part_len, part_cap;
    struct obuf *out;        /* queued, not yet handed to the kernel */
    struct obuf *inflight;   /* owned by the pending uv_write */
    struct obuf *held;       /* deliveries held while a login ack is pending */
    uint64_t queued_total, written_total;
    struct flush_wait *waits;
    struct dmark *marks;     /* deliveries not known written: [mhead, mlen) */
    size_t mhead, mlen, mcap;
    struct chat_session *flush_next;
    struct tlink idle;       /* on net.idle: see the top of the file */
    struct tlink req;        /* on net.reqs while a frame is under way */
    struct chat_session *all_prev, *all_next; /* every session, for shutdown */
    struct chat_session *dev_next; /* multi-device: the user's next older session */
    uint64_t connected_at;   /* uv_now() at accept (admin: connected-for) */
    uint64_t pace_until;     /* legacy: no next message before this uv_now() */
    struct chat_session *pace_prev, *pace_next; /* waiting for pace_until */
    /* PROXY protocol (see the top): */
    unsigned pp_wait : 1;    /* its header has not come yet */
    char *pp_buf;            /* the header's bytes so far (PP_MAX_HEADER) */
    size_t pp_len;
    struct sockaddr_storage *real; /* the header's source; NULL: the socket's */
    uv_write_t wreq;
    uv_shutdown_t sreq;
};

static struct {
    uv_loop_t *loop;
    struct net_endpoint *eps;
    size_t neps;
    uv_check_t flusher;
    uv_idle_t flush_idle;    /* active while sessions wait on the flush list */
    net_unsent_fn unsent_cb; /* a closed session's unwritten deliveries */
    net_frame_fn frame_cb;   /* a complete frame (dispatch) */
    net_error_fn error_cb;   /* a framing error to report (dispatch) */
    net_session_fn open_cb;  /* a session accepted */
    net_closing_fn closing_cb; /* a session begins to close */
    net_admit_fn admit_cb;   /* a new connection over a rate: refused */
    uv_timer_t idle_timer;
    uv_timer_t pace_timer;
    struct chat_session *pace_head, *pace_tail; /* in pace_until order */
    int legacy_pace_ms;      /* 0: legacy output is coalesced like protocol 2 */
    struct map by_id, by_user;
    struct map addr4, addr6; /* int64 key -> struct net_addr */
    uint64_t next_id;
    size_t count;
    struct chat_session *flush_head;
    struct tlist idle, reqs;
    struct chat_session *all_head;
    struct obuf *pool[OBUF_POOL_MAX];
    size_t npool;
    char rbuf[READ_BUF_SIZE];
    int rbuf_busy;
    /* limits (reloadable) */
    size_t max_frame, max_output;
    int max_connections, idle_timeout_s, request_timeout_s;
    int max_per_addr, max_unauth_per_addr;
    struct conf_cidr *trusted;
    size_t ntrusted;
    int ka_idle_s, ka_intvl_s, ka_cnt, user_timeout_s;
    /* sessions by transport (transports[] index): all, registered, logged in */
    size_t tr_all[NET_TR_MAX], tr_open[NET_TR_MAX], tr_in[NET_TR_MAX];
    uint64_t refused;        /* connections refused by a cap */
    uint64_t refused_logged_at;
    int proxy_protocol;      /* a PROXY header opens each connection */
    size_t pp_waiting;       /* sessions waiting for theirs */
    void (*shutdown_done)(void);
    uv_timer_t shutdown_timer;
} net;

/* ---- output buffers --------------------------------------------------- */

static struct obuf *obuf_get(size_t need)
{
    struct obuf *b;
    if (need <= OBUF_SMALL && net.npool)
        b = net.pool[--net.npool];
    else {
        size_t cap = OBUF_SMALL;
        while (cap < need)
            cap *= 2;
        if (!(b = mem_malloc(sizeof *b + cap)))
            return NULL;
        b->cap = cap;
    }
    b->len = b->off = 0;
    return b;
}

static void obuf_put(struct obuf *b)
{
    if (!b)
        return;
    if (b->cap == OBUF_SMALL && net.npool < OBUF_POOL_MAX)
        net.pool[net.npool++] = b;
    else
        mem_free(b);
}

/* Append to *bp (allocating or growing it); 0 or CHAT_ERR_NOMEM. */
static int obuf_append(struct obuf **bp, const char *p, size_t n, int nl)
{
    struct obuf *b = *bp;
    size_t need = n + (nl ? 1 : 0);
    if (!b) {
        if (!(b = obuf_get(need)))
            return CHAT_ERR_NOMEM;
        *bp = b;
    }
    if (b->len + need > b->cap) {
        size_t cap = b->cap * 2;
        struct obuf *nb;
        while (cap < b->len + need)
            cap *= 2;
        if (!(nb = mem_malloc(sizeof *nb + cap)))
            return CHAT_ERR_NOMEM;
        memcpy(nb, b, sizeof *b + b->len);
        nb->cap = cap;
        obuf_put(b);
        *bp = b = nb;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    if (nl)
        b->data[b->len++] = '\n';
    return CHAT_OK;
}

static size_t pending_bytes(const struct chat_session *s)
{
    size_t n = 0;
    if (s->out)
        n += s->out->len - s->out->off;
    if (s->inflight)
        n += s->inflight->len - s->inflight->off;
    if (s->held)
        n += s->held->len;
    if (s->top) { /* what the transport encoded or holds is output too */
        if (s->wire)
            n += s->wire->len - s->wire->off;
        if (s->wire_inflight)
            n += s->wire_inflight->len - s->wire_inflight->off;
        for (const struct net_tconn *t = s->top; t; t = t->below)
            if (t->type->pending)
                n += t->type->pending(t);
    }
    return n;
}

/* ---- time limits ------------------------------------------------------ */

static void begin_close(struct chat_session *s, int errno_, const char *why,
                        int graceful);
static void close_why(struct chat_session *s, unsigned reason);
/* PROXY protocol (its block is below "accepting") */
static void pp_refuse(struct chat_session *s, const char *why, const char *detail,
                      int rate_limited);
static void pp_end(struct chat_session *s);
static int pp_input(struct chat_session *s, const char *buf, size_t n, size_t *off);

static int tl_linked(const struct tlist *l, const struct tlink *k)
{
    return k->prev || l->head == k;
}

static void tl_unlink(struct tlist *l, struct tlink *k)
{
    if (k->prev)
        k->prev->next = k->next;
    else if (l->head == k)
        l->head = k->next;
    if (k->next)
        k->next->prev = k->prev;
    else if (l->tail == k)
        l->tail = k->prev;
    k->prev = k->next = NULL;
}

/* (Re)join at the tail, stamped now: the list stays in time order. */
static void tl_push(struct tlist *l, struct tlink *k)
{
    k->at = uv_now(net.loop);
    if (l->tail == k)
        return;
    tl_unlink(l, k);
    k->prev = l->tail;
    if (l->tail)
        l->tail->next = k;
    else
        l->head = k;
    l->tail = k;
}

/* Does idle_timeout apply to s now?  See the top of the file. */
static int idle_applies(const struct chat_session *s)
{
    return !s->closing && !s->sink && (!s->uid || s->writing);
}

/* Activity (a complete request, a login, a logout): restart the clock, or
 * leave the list when the timeout no longer applies. */
static void idle_refresh(struct chat_session *s)
{
    if (idle_applies(s))
        tl_push(&net.idle, &s->idle);
    else
        tl_unlink(&net.idle, &s->idle);
}

/* The kernel took some output, or stopped taking it: a logged-in session
 * is on the idle list exactly while it waits on a full kernel buffer. */
static void idle_output(struct chat_session *s)
{
    if (s->uid && !s->closing)
        idle_refresh(s);
}

/* After a read: a frame left unfinished starts the request clock (its
 * first byte came in this read); a finished one stopped it in process(). */
static void req_track(struct chat_session *s)
{
    if (s->closing || s->fs.len == 0)
        tl_unlink(&net.reqs, &s->req);
    else if (!tl_linked(&net.reqs, &s->req))
        tl_push(&net.reqs, &s->req);
}

/* Close for a time limit: a notice for protocol 2, unless the peer is not
 * reading (a graceful close would wait on it forever). */
static void close_timed_out(struct chat_session *s, const char *why)
{
    if (s->writing)
        begin_close(s, 0, NULL, 0);
    else
        net_close(s, CHAT_E_IDLE, why);
}

static void on_idle_timer(uv_timer_t *t)
{
    uint64_t now = uv_now(net.loop), limit;
    (void)t;
    limit = (uint64_t)net.request_timeout_s * 1000;
    while (net.request_timeout_s > 0 && net.reqs.head &&
           net.reqs.head->at + limit <= now) {
        struct chat_session *s = container_of(net.reqs.head, struct chat_session, req);
        tl_unlink(&net.reqs, &s->req);
        if (s->pp_wait) {
            pp_refuse(s, "no header within request_timeout", NULL, 0);
            continue;
        }
        LOGSI(s, "request not complete after %d s, closing", net.request_timeout_s);
        close_timed_out(s, "request timeout");
    }
    limit = (uint64_t)net.idle_timeout_s * 1000;
    while (net.idle_timeout_s > 0 && net.idle.head &&
           net.idle.head->at + limit <= now) {
        struct chat_session *s = container_of(net.idle.head, struct chat_session, idle);
        tl_unlink(&net.idle, &s->idle);
        if (s->pp_wait) {
            pp_refuse(s, "no header within idle_timeout", NULL, 0);
            continue;
        }
        if (s->uid)
            LOGSI(s, "output not drained and no request for %d s, closing",
                  net.idle_timeout_s);
        else
            LOGSI(s, "not logged in and no request for %d s, closing",
                  net.idle_timeout_s);
        close_timed_out(s, "idle timeout");
    }
    for (size_t i = 0; i < net.neps; i++) {
        struct net_endpoint *ep = &net.eps[i];
        while (ep->handshake_ms > 0 && ep->hands.head &&
               ep->hands.head->at + (uint64_t)ep->handshake_ms <= now) {
            struct chat_session *s =
                container_of(ep->hands.head, struct chat_session, hand);
            tl_unlink(&ep->hands, &s->hand);
            LOGSI(s, "%s: handshake not done after %d ms, closing", ep->name,
                  ep->handshake_ms);
            close_why(s, METRICS_CLOSE_IDLE);
            begin_close(s, 0, NULL, 0);
        }
        for (int k = 0; k < ep->nchain; k++)
            if (ep->chain[k]->tick)
                ep->chain[k]->tick(ep->ctx[k], now);
    }
}

/* ---- per-address counts ----------------------------------------------- */

/* The client's address: the PROXY header's source when one gave it, else
 * the socket's peer; 0 or -1. */
static int session_sockaddr(const struct chat_session *s, struct sockaddr_storage *ss)
{
    int len = sizeof *ss;

    if (s->real) {
        *ss = *s->real;
        return 0;
    }
    return uv_tcp_getpeername(&s->tcp, (struct sockaddr *)ss, &len) == 0 ? 0 : -1;
}

/* The peer's address, IPv4-mapped IPv6 taken as IPv4; 0 or -1. */
static int peer_addr(const struct chat_session *s, int *family, unsigned char *addr)
{
    struct sockaddr_storage ss;

    if (session_sockaddr(s, &ss))
        return -1;
    if (ss.ss_family == AF_INET) {
        *family = AF_INET;
        memcpy(addr, &((struct sockaddr_in *)&ss)->sin_addr, 4);
        return 0;
    }
    if (ss.ss_family != AF_INET6)
        return -1;
    const struct in6_addr *a6 = &((struct sockaddr_in6 *)&ss)->sin6_addr;
    if (IN6_IS_ADDR_V4MAPPED(a6)) {
        *family = AF_INET;
        memcpy(addr, a6->s6_addr + 12, 4);
    } else {
        *family = AF_INET6;
        memcpy(addr, a6->s6_addr, 16);
    }
    return 0;
}

static int addr_trusted(int family, const unsigned char *addr)
{
    for (size_t i = 0; i < net.ntrusted; i++)
        if (conf_cidr_match(&net.trusted[i], family, addr))
            return 1;
    return 0;
}

/* The counts of the peer's address, created when new; NULL (nothing
 * counted) when it is trusted or unknown.  *err is set on no memory. */
static struct net_addr *addr_lookup(const struct chat_session *s, int *err)
{
    unsigned char a[16];
    int family, v6;
    uint64_t key = 0;
    struct net_addr *na;
    struct map *m;

    *err = 0;
    if (peer_addr(s, &family, a) || addr_trusted(family, a))
        return NULL;
    v6 = family == AF_INET6;
    for (int i = 0; i < (v6 ? 8 : 4); i++) /* IPv6: the /64 */
        key = key << 8 | a[i];
    m = v6 ? &net.addr6 : &net.addr4;
    if ((na = map_get(m, (int64_t)key)))
        return na;
    if (!(na = mem_calloc(1, sizeof *na)) || map_put(m, (int64_t)key, na)) {
        mem_free(na);
        *err = 1;
        return NULL;
    }
    na->key = (int64_t)key;
    na->v6 = v6;
    return na;
}

static void addr_release(struct chat_session *s)
{
    struct net_addr *na = s->addr;
    if (!na)
        return;
    s->addr = NULL;
    if (s->unauth)
        na->unauth--;
    s->unauth = 0;
    if (--na->total == 0) {
        map_del(na->v6 ? &net.addr6 : &net.addr4, na->key);
        mem_free(na);
    }
}

/* Counted as not logged in, or no longer. */
static void addr_set_unauth(struct chat_session *s, int on)
{
    if (!s->addr || s->closing || s->unauth == (unsigned)!!on)
        return;
    s->unauth = on ? 1 : 0;
    if (on)
        s->addr->unauth++;
    else
        s->addr->unauth--;
}

static void flush_session(struct chat_session *s);

/* ---- pacing legacy output ---------------------------------------------- */
/* The seed client reads with one recv() of at most 1024 bytes and parses it
 * as exactly one JSON document: two messages in one read crash it.  So a
 * legacy session's output goes out one message per write, and the next
 * message waits legacy_pace_ms after the previous one.  A message with no
 * predecessor in the last legacy_pace_ms goes out at once, so pacing costs
 * latency only inside a burst.  Every waiting session has the same delay,
 * so appending keeps the wait list in deadline order and one timer serves
 * them all.  Protocol-2 sessions, and every session when legacy_pace_ms is
 * 0, keep full coalescing; so does a session being closed (a stop, a
 * replaced login), whose queue is flushed as fast as the client reads it,
 * bounded by the shutdown timeout, rather than lost to the pace.  A message
 * transport (ws, wss) frames every message itself: never paced. */

static int pace_on(const struct chat_session *s)
{
    return net.legacy_pace_ms > 0 && s->proto != CHAT_PROTO_2 && !s->sink && !s->closing &&
           !(s->top && (s->top->type->flags & NET_TR_MESSAGES));
}

static void pace_unlink(struct chat_session *s)
{
    if (!s->pacing)
        return;
    if (s->pace_prev)
        s->pace_prev->pace_next = s->pace_next;
    else
        net.pace_head = s->pace_next;
    if (s->pace_next)
        s->pace_next->pace_prev = s->pace_prev;
    else
        net.pace_tail = s->pace_prev;
    s->pace_prev = s->pace_next = NULL;
    s->pacing = 0;
}

static void on_pace_timer(uv_timer_t *t);

static void pace_arm(void)
{
    uint64_t now = uv_now(net.loop), until;
    if (!net.pace_head) {
        uv_timer_stop(&net.pace_timer);
        return;
    }
    until = net.pace_head->pace_until;
    uv_timer_start(&net.pace_timer, on_pace_timer, until > now ? until - now : 0, 0);
}

/* s may not write before pace_until: wait in the list. */
static void pace_wait(struct chat_session *s)
{
    if (s->pacing)
        return;
    s->pacing = 1;
    s->pace_prev = net.pace_tail;
    s->pace_next = NULL;
    if (net.pace_tail)
        net.pace_tail->pace_next = s;
    else
        net.pace_head = s;
    net.pace_tail = s;
    if (net.pace_head == s)
        pace_arm();
}

static void on_pace_timer(uv_timer_t *t)
{
    uint64_t now = uv_now(net.loop);
    (void)t;
    while (net.pace_head && net.pace_head->pace_until <= now) {
        struct chat_session *s = net.pace_head;
        pace_unlink(s);
        flush_session(s);
    }
    pace_arm();
}

/* How many bytes of b a session may write now: all of them, or for a paced
 * session the next message (0 while it must wait). */
static size_t pace_take(struct chat_session *s, const struct obuf *b)
{
    size_t len = b->len - b->off;
    const char *nl;
    if (!pace_on(s))
        return len;
    if (s->pace_until > uv_now(net.loop)) {
        pace_wait(s);
        return 0;
    }
    nl = memchr(b->data + b->off, '\n', len);
    return nl ? (size_t)(nl - (b->data + b->off)) + 1 : len;
}

/* A paced message went out whole: the next one waits. */
static void pace_sent(struct chat_session *s)
{
    if (pace_on(s))
        s->pace_until = uv_now(net.loop) + (uint64_t)net.legacy_pace_ms;
}

/* ---- unsent deliveries ------------------------------------------------ */

/* The bytes of mark m if they are still unwritten and in a buffer, else NULL. */
static const char *mark_bytes(const struct chat_session *s, const struct dmark *m)
{
    uint64_t rem = 0, base;

    if (m->held)
        return s->held && m->end <= s->held->len ? s->held->data + m->start : NULL;
    if (m->end <= s->written_total)
        return NULL;
    if (s->inflight) {
        rem = s->inflight->len - s->inflight->off;
        base = s->written_total - s->inflight->off;
        if (m->start >= base && m->end <= base + s->inflight->len)
            return s->inflight->data + (m->start - base);
    }
    if (s->out) {
        base = s->written_total + rem - s->out->off;
        if (m->start >= base && m->end <= base + s->out->len)
            return s->out->data + (m->start - base);
    }
    return NULL;
}

/* Remember the delivery of n bytes (with its '\n') just queued. */
static void mark_add(struct chat_session *s, size_t n)
{
    struct dmark *m;

    while (s->mhead < s->mlen && !s->marks[s->mhead].held &&
           s->marks[s->mhead].end <= s->written_total)
        s->mhead++;
    if (s->mhead == s->mlen)
        s->mhead = s->mlen = 0;
    if (s->mlen == s->mcap && s->mhead > 0) {
        memmove(s->marks, s->marks + s->mhead, (s->mlen - s->mhead) * sizeof *m);
        s->mlen -= s->mhead;
        s->mhead = 0;
    }
    if (s->mlen == s->mcap) {
        size_t cap = s->mcap ? s->mcap * 2 : 16;
        if (!(m = mem_realloc(s->marks, cap * sizeof *m))) {
            LOGSW(s, "out of memory tracking a delivery; it is not "
                  "stored should the session close unwritten");
            return;
        }
        s->marks = m;
        s->mcap = cap;
    }
    m = &s->marks[s->mlen++];
    m->held = s->hold && s->held;
    m->end = m->held ? s->held->len : s->queued_total;
    m->start = m->end - n;
    m->uid = s->uid;
}

/* The held deliveries were appended to out at stream position base. */
static void marks_unhold(struct chat_session *s, uint64_t base)
{
    for (size_t i = s->mhead; i < s->mlen; i++)
        if (s->marks[i].held) {
            s->marks[i].start += base;
            s->marks[i].end += base;
            s->marks[i].held = 0;
        }
}

/* Hand every unwritten delivery to the undeliverable path (the offline
 * store); called before the buffers are freed. */
static void spill_unsent(struct chat_session *s)
{
    size_t n = 0;

    for (size_t i = s->mhead; i < s->mlen; i++) {
        const struct dmark *m = &s->marks[i];
        const char *p = mark_bytes(s, m);

        if (p && m->uid > 0 && m->end - m->start > 1) {
            if (net.unsent_cb)
                net.unsent_cb(m->uid, p, (size_t)(m->end - m->start - 1));
            n++;
        }
    }
    if (n)
        LOGSI(s, "%zu deliveries not written before it closed; "
              "handed to the offline store", n);
    s->mhead = s->mlen = 0;
}

/* ---- closing ---------------------------------------------------------- */

static void run_waits(struct chat_session *s, int closing)
{
    struct flush_wait **pp = &s->waits;
    while (*pp) {
        struct flush_wait *w = *pp;
        if (closing || s->written_total >= w->mark) {
            *pp = w->next;
            w->cb(!closing, w->ud);
            mem_free(w);
        } else
            pp = &w->next;
    }
}

/* Take s off the flush list.  In chatd the check phase always drains the
 * list before the close phase frees a session; the test seam drains only
 * in net_test_feed(), so a reply queued from a worker's callback could leave
 * a freed session on it (fuzz_login found that).  O(list), and rare. */
static void flush_unlink(struct chat_session *s)
{
    struct chat_session **pp = &net.flush_head;

    while (*pp && *pp != s)
        pp = &(*pp)->flush_next;
    if (*pp)
        *pp = s->flush_next;
    s->flush_next = NULL;
    s->in_flush = 0;
}

static void on_closed(uv_handle_t *h)
{
    struct chat_session *s = container_of((uv_tcp_t *)h, struct chat_session, tcp);
    if (s->in_flush)
        flush_unlink(s);
    if (s->all_prev)
        s->all_prev->all_next = s->all_next;
    else if (net.all_head == s)
        net.all_head = s->all_next;
    if (s->all_next)
        s->all_next->all_prev = s->all_prev;
    tl_unlink(&net.idle, &s->idle);
    tl_unlink(&net.reqs, &s->req);
    if (s->ep)
        tl_unlink(&s->ep->hands, &s->hand);
    addr_release(s);
    pp_end(s);
    mem_free(s->real);
    run_waits(s, 1);
    pace_unlink(s);
    spill_unsent(s);
    while (s->top) {
        struct net_tconn *t = s->top;
        s->top = t->below;
        t->type->free(t);
    }
    s->bottom = NULL;
    obuf_put(s->wire);
    obuf_put(s->wire_inflight);
    mem_free(s->marks);
    obuf_put(s->out);
    obuf_put(s->inflight);
    obuf_put(s->held);
    mem_free(s->part);
    mem_free(s->name);
    net.tr_all[s->tri]--;
    mem_free(s);
    net.count--;
    if (net.shutdown_done && net.count == 0) {
        void (*done)(void) = net.shutdown_done;
        net.shutdown_done = NULL;
        uv_timer_stop(&net.shutdown_timer);
        done();
    }
}

static void close_now(struct chat_session *s)
{
    if (!uv_is_closing((uv_handle_t *)&s->tcp))
        uv_close((uv_handle_t *)&s->tcp, on_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    struct chat_session *s = container_of(req, struct chat_session, sreq);
    (void)status;
    close_now(s);
}

static int wire_busy(const struct chat_session *s)
{
    return s->writing || (s->wire && s->wire->len > s->wire->off);
}

static void wire_write(struct chat_session *s);

/* Called when a closing session has nothing left to write.  A transport
 * says goodbye first (close frame, close_notify), top layer first. */
static void finish_close(struct chat_session *s)
{
    if (uv_is_closing((uv_handle_t *)&s->tcp))
        return;
    if (s->top && s->graceful) {
        if (!s->tr_closed) {
            s->tr_closed = 1;
            for (struct net_tconn *t = s->top; t; t = t->below)
                t->type->close(t, s->close_errno, NULL);
            if (wire_busy(s)) {
                wire_write(s); /* comes back here once drained */
                return;
            }
        } else if (wire_busy(s))
            return;
    }
    if (s->graceful && uv_shutdown(&s->sreq, (uv_stream_t *)&s->tcp, on_shutdown) == 0)
        return;
    close_now(s);
}

static void flush_session(struct chat_session *s);

/* The chatd_connections_closed_total reason of a close. */
static unsigned close_reason(const struct chat_session *s, int errno_)
{
    if (s->why)
        return s->why - 1u;
    switch (errno_) {
    case CHAT_E_IDLE: return METRICS_CLOSE_IDLE;
    case CHAT_E_SHUTDOWN: return METRICS_CLOSE_SHUTDOWN;
    case CHAT_E_REPLACED: return METRICS_CLOSE_REPLACED;
    case CHAT_E_SLOW_READER: return METRICS_CLOSE_SLOW_READER;
    default: return METRICS_CLOSE_SERVER;
    }
}

/* Record why s is about to close (the first cause wins). */
static void close_why(struct chat_session *s, unsigned reason)
{
    if (!s->why && !s->closing)
        s->why = (unsigned char)(reason + 1);
}

static void begin_close(struct chat_session *s, int errno_, const char *why,
                        int graceful)
{
    int opened = !s->pp_wait; /* PROXY: still unknown above net */

    if (s->closing)
        return;
    s->closing = 1;
    pp_end(s);
    metrics_loop.closed[close_reason(s, errno_)]++;
    s->graceful = graceful ? 1 : 0;
    s->close_errno = errno_;
    uv_read_stop((uv_stream_t *)&s->tcp);
    tl_unlink(&net.idle, &s->idle);
    tl_unlink(&net.reqs, &s->req);
    if (s->ep)
        tl_unlink(&s->ep->hands, &s->hand);
    if (s->registered) {
        map_del(&net.by_id, (int64_t)s->id);
        s->registered = 0;
        net.tr_open[s->tri]--;
    }
    if (net.closing_cb && opened)
        net.closing_cb(s, errno_, why, graceful);
    if (s->uid)
        net_session_unbind(s);
    if (!graceful) {
        close_now(s);
        return;
    }
    if (s->out && s->out->len > s->out->off)
        flush_session(s);
    if (!s->inflight && !(s->out && s->out->len > s->out->off) && !wire_busy(s))
        finish_close(s);
}

void net_close(struct chat_session *s, int errno_, const char *why)
{
    begin_close(s, errno_, why, 1);
}

/* The closing callback's last words (the protocol-2 NOTICE): the held
 * deliveries go first, then json. */
int net_send_last(struct chat_session *s, const char *json, size_t len)
{
    int rc;

    if (s->held && obuf_append(&s->out, s->held->data, s->held->len, 0) == CHAT_OK) {
        marks_unhold(s, s->queued_total);
        s->queued_total += s->held->len;
        obuf_put(s->held);
        s->held = NULL;
    }
    rc = obuf_append(&s->out, json, len, 1);
    s->queued_total += len + 1;
    return rc;
}

/* ---- writing ---------------------------------------------------------- */

static void on_written(uv_write_t *req, int status)
{
    struct chat_session *s = container_of(req, struct chat_session, wreq);
    struct obuf *b = s->inflight;
    s->writing = 0;
    s->inflight = NULL;
    if (status < 0) {
        s->inflight = b; /* its unwritten deliveries go to the store */
        spill_unsent(s);
        s->inflight = NULL;
        obuf_put(b);
        if (!s->closing)
            LOGSD(s, "write failed: %s", uv_strerror(status));
        close_why(s, METRICS_CLOSE_WRITE_ERROR);
        begin_close(s, 0, NULL, 0);
        return;
    }
    s->written_total += b->len - b->off;
    metrics_loop.bytes_out += b->len - b->off;
    obuf_put(b);
    pace_sent(s);
    run_waits(s, 0);
    if (s->out && s->out->len > s->out->off)
        flush_session(s);
    else if (s->closing)
        finish_close(s);
    idle_output(s); /* drained: off the idle list, or its clock restarted */
}

static void flush_filtered(struct chat_session *s);

static void flush_session(struct chat_session *s)
{
    struct obuf *b = s->out;
    uv_buf_t ub;
    size_t take;
    int n;

    if (s->top) {
        flush_filtered(s);
        return;
    }
    if (s->writing || !b || b->len == b->off || uv_is_closing((uv_handle_t *)&s->tcp))
        return;
    if (s->sink) { /* test session without a socket: output is dropped */
        s->written_total += b->len - b->off;
        s->out = NULL;
        obuf_put(b);
        run_waits(s, 0);
        if (s->closing)
            finish_close(s);
        return;
    }
    if (!(take = pace_take(s, b)))
        return; /* the pace timer comes back */
    ub = uv_buf_init(b->data + b->off, (unsigned)take);
    n = uv_try_write((uv_stream_t *)&s->tcp, &ub, 1);
    if (n > 0) {
        b->off += (size_t)n;
        s->written_total += (uint64_t)n;
        metrics_loop.bytes_out += (uint64_t)n;
    } else if (n < 0 && n != UV_EAGAIN) {
        LOGSD(s, "write failed: %s", uv_strerror(n));
        close_why(s, METRICS_CLOSE_WRITE_ERROR);
        begin_close(s, 0, NULL, 0);
        return;
    }
    if (n >= 0 && (size_t)n == take)
        pace_sent(s);
    if (b->off == b->len) {
        s->out = NULL;
        obuf_put(b);
        if (s->waits)
            run_waits(s, 0);
        if (s->closing)
            finish_close(s);
        return;
    }
    if (n >= 0 && (size_t)n == take) { /* paced: the next message waits */
        if (s->waits)
            run_waits(s, 0);
        pace_wait(s);
        return;
    }
    /* the kernel is full: hand the rest to an asynchronous write (a paced
     * session only the rest of its current message) */
    take -= n > 0 ? (size_t)n : 0;
    if (take < b->len - b->off) {
        /* the whole message, its written part skipped: inflight then out
         * stay one contiguous stream, as the delivery marks expect */
        struct obuf *m = NULL;
        size_t done = n > 0 ? (size_t)n : 0;
        if (obuf_append(&m, b->data + b->off - done, done + take, 0)) {
            close_why(s, METRICS_CLOSE_ERROR);
            begin_close(s, 0, NULL, 0);
            return;
        }
        m->off = done;
        b->off += take;
        b = m;
    } else
        s->out = NULL;
    s->inflight = b;
    s->writing = 1;
    ub = uv_buf_init(b->data + b->off, (unsigned)(b->len - b->off));
    n = uv_write(&s->wreq, (uv_stream_t *)&s->tcp, &ub, 1, on_written);
    if (n < 0) {
        s->writing = 0;
        close_why(s, METRICS_CLOSE_ERROR);
        begin_close(s, 0, NULL, 0);
        return;
    }
    if (!tl_linked(&net.idle, &s->idle))
        idle_output(s); /* waiting on the peer from now */
}

/* ---- writing through a transport ---------------------------------------
 * The session's output (out) is encoded by the transport chain into the
 * wire buffer, one batch at a time: the batch moves to inflight, as the
 * unwritten part of a plain write does, and counts as written (delivery
 * marks, flush waits, pacing) only when the wire buffer has drained to the
 * kernel, since only then did every byte that carries it get there.  A
 * layer's own bytes (handshake, alerts, pings) join the wire in order. */

static void wire_drained(struct chat_session *s);
static void flush_later(struct chat_session *s);

/* The socket cannot be written: close now (a closing session too, which
 * would otherwise wait forever on its goodbye). */
static void wire_failed(struct chat_session *s, unsigned reason)
{
    close_why(s, reason);
    if (s->closing)
        close_now(s);
    else
        begin_close(s, 0, NULL, 0);
}

static void on_wire_written(uv_write_t *req, int status)
{
    struct chat_session *s = container_of(req, struct chat_session, wreq);
    struct obuf *w = s->wire_inflight;

    s->writing = 0;
    s->wire_inflight = NULL;
    if (status < 0) {
        obuf_put(w); /* inflight stays: its deliveries go to the store */
        if (!s->closing)
            LOGSD(s, "write failed: %s", uv_strerror(status));
        wire_failed(s, METRICS_CLOSE_WRITE_ERROR);
        return;
    }
    metrics_loop.bytes_out += w->len - w->off;
    obuf_put(w);
    wire_write(s);
    idle_output(s);
}

/* Hand the wire buffer to the kernel: uv_try_write, the rest by uv_write. */
static void wire_write(struct chat_session *s)
{
    struct obuf *w = s->wire;
    uv_buf_t ub;
    int n;

    if (s->writing || uv_is_closing((uv_handle_t *)&s->tcp))
        return;
    if (!w || w->len == w->off) {
        wire_drained(s);
        return;
    }
    ub = uv_buf_init(w->data + w->off, (unsigned)(w->len - w->off));
    n = uv_try_write((uv_stream_t *)&s->tcp, &ub, 1);
    if (n < 0 && n != UV_EAGAIN) {
        LOGSD(s, "write failed: %s", uv_strerror(n));
        wire_failed(s, METRICS_CLOSE_WRITE_ERROR);
        return;
    }
    if (n > 0) {
        w->off += (size_t)n;
        metrics_loop.bytes_out += (uint64_t)n;
    }
    s->wire = NULL;
    if (w->off == w->len) {
        obuf_put(w);
        wire_drained(s);
        return;
    }
    s->wire_inflight = w; /* later layer bytes go to a fresh wire buffer */
    s->writing = 1;
    ub = uv_buf_init(w->data + w->off, (unsigned)(w->len - w->off));
    if (uv_write(&s->wreq, (uv_stream_t *)&s->tcp, &ub, 1, on_wire_written) < 0) {
        s->writing = 0;
        wire_failed(s, METRICS_CLOSE_ERROR);
        return;
    }
    if (!tl_linked(&net.idle, &s->idle))
        idle_output(s); /* waiting on the peer from now */
}

/* Everything encoded so far reached the kernel. */
static void wire_drained(struct chat_session *s)
{
    struct obuf *b = s->inflight;

    if (b) {
        s->inflight = NULL;
        s->written_total += b->len - b->off;
        obuf_put(b);
        pace_sent(s);
        if (s->waits)
            run_waits(s, 0);
    }
    if (s->out && s->out->len > s->out->off && s->tr_ready && !s->tr_closed &&
        !s->pacing) {
        if (b) /* a batch went out: the next one (at most once per drain) */
            flush_filtered(s);
        else
            flush_later(s);
        return;
    }
    if (s->closing) {
        finish_close(s);
        return;
    }
    for (struct net_tconn *t = s->top; t; t = t->below)
        if (t->type->idle)
            t->type->idle(t);
}

/* Encode the next batch of out (when the previous one is written and the
 * handshake is done), then write the wire. */
static void flush_filtered(struct chat_session *s)
{
    struct obuf *b = s->out;
    size_t take;

    if (uv_is_closing((uv_handle_t *)&s->tcp))
        return;
    if (s->closing && !s->tr_ready && b && b->len > b->off) {
        close_now(s); /* nothing can be said before the handshake */
        return;
    }
    if (s->tr_ready && !s->tr_closed && !s->inflight && b && b->len > b->off &&
        (take = pace_take(s, b)) > 0) {
        if (s->top->type->output(s->top, b->data + b->off, take)) {
            wire_failed(s, METRICS_CLOSE_ERROR);
            return;
        }
        if (take == b->len - b->off) {
            s->inflight = b;
            s->out = NULL;
        } else { /* paced: one message; inflight then out stay contiguous */
            struct obuf *m = NULL;
            if (obuf_append(&m, b->data + b->off, take, 0)) {
                wire_failed(s, METRICS_CLOSE_ERROR);
                return;
            }
            b->off += take;
            s->inflight = m;
        }
    }
    wire_write(s);
}

/* ---- the transport seam (transport.h) ---------------------------------- */

static void process(struct chat_session *s, const char *buf, size_t n);
static void process_message(struct chat_session *s, const char *buf, size_t n);

int net_tr_up(struct net_tconn *t, const char *buf, size_t n)
{
    if (t->s->closing || n == 0)
        return 0;
    if (t->above)
        return t->above->type->input(t->above, buf, n);
    if (t->type->flags & NET_TR_MESSAGES)
        process_message(t->s, buf, n);
    else
        process(t->s, buf, n);
    return 0;
}

int net_tr_down(struct net_tconn *t, const char *buf, size_t n)
{
    if (n == 0)
        return 0;
    if (t->below)
        return t->below->type->output(t->below, buf, n);
    if (obuf_append(&t->s->wire, buf, n, 0))
        return -1;
    flush_later(t->s);
    return 0;
}

void net_tr_ready(struct net_tconn *t)
{
    struct chat_session *s = t->s;

    t->ready = 1;
    for (const struct net_tconn *k = s->top; k; k = k->below)
        if (!k->ready)
            return;
    s->tr_ready = 1;
    tl_unlink(&s->ep->hands, &s->hand);
    if (s->out && s->out->len > s->out->off)
        flush_later(s);
}

void net_tr_close(struct net_tconn *t, int error)
{
    close_why(t->s, error ? METRICS_CLOSE_READ_ERROR : METRICS_CLOSE_PEER);
    begin_close(t->s, 0, NULL, 1);
}

uv_loop_t *net_tr_loop(void) { return net.loop; }

static void on_flush_idle(uv_idle_t *h) { (void)h; }

/* Put s on the flush list.  The check phase that drains it runs after the
 * poll: an active idle handle makes that poll return at once, so output
 * queued outside a read callback (a timer, a pace tick, a flush callback)
 * leaves in this iteration instead of when some other event wakes the loop. */
static void flush_later(struct chat_session *s)
{
    if (s->in_flush)
        return;
    s->in_flush = 1;
    s->flush_next = net.flush_head;
    net.flush_head = s;
    /* (the test seam runs without the flusher and drains by hand) */
    if (uv_is_active((uv_handle_t *)&net.flusher) &&
        !uv_is_active((uv_handle_t *)&net.flush_idle))
        uv_idle_start(&net.flush_idle, on_flush_idle);
}

static void on_check(uv_check_t *h)
{
    (void)h;
    while (net.flush_head) {
        struct chat_session *s = net.flush_head;
        net.flush_head = s->flush_next;
        s->flush_next = NULL;
        s->in_flush = 0;
        flush_session(s);
    }
    uv_idle_stop(&net.flush_idle);
}

/* The slow-reader rule looks at what is already pending before this
 * message, never at the size of the message itself: one reply, however
 * large (a long friend list, a big login ack), is always queued, and a
 * session is closed only when max_output bytes or more that it has not yet
 * taken are still waiting when the next one comes.  Memory per session is
 * thus bounded by max_output plus one message. */
static int queue_out(struct chat_session *s, struct obuf **bp, const char *json,
                     size_t len)
{
    size_t pending;

    if (s->closing)
        return CHAT_ERR_CLOSED;
    pending = pending_bytes(s);
    if (pending >= net.max_output) {
        LOGSW(s, "%zu bytes still waiting to be written to it "
              "(%zu of them held behind its login ack), at or over max_output "
              "(%zu); closing it instead of queueing %zu more",
              pending, s->held ? s->held->len : (size_t)0, net.max_output, len + 1);
        close_why(s, METRICS_CLOSE_SLOW_READER);
        begin_close(s, 0, NULL, 0);
        return CHAT_ERR_BUSY;
    }
    if (obuf_append(bp, json, len, 1))
        return CHAT_ERR_NOMEM;
    if (bp == &s->out) {
        s->queued_total += len + 1;
        flush_later(s);
    }
    return CHAT_OK;
}

int net_send(struct chat_session *s, const char *json, size_t len)
{
    return queue_out(s, &s->out, json, len);
}

int net_deliver(struct chat_session *s, const char *json, size_t len)
{
    int rc = queue_out(s, s->hold ? &s->held : &s->out, json, len);

    if (rc == CHAT_OK) {
        mark_add(s, len + 1);
        metrics_loop.deliveries[METRICS_ROUTE_LOCAL]++;
    }
    return rc;
}

void net_hold(struct chat_session *s, int on)
{
    if (on) {
        s->hold = 1;
        return;
    }
    s->hold = 0;
    if (s->held && !s->closing) {
        struct obuf *h = s->held;
        s->held = NULL;
        /* already counted against max_output; cannot fail on size */
        if (obuf_append(&s->out, h->data, h->len, 0) == CHAT_OK) {
            marks_unhold(s, s->queued_total);
            s->queued_total += h->len;
            flush_later(s);
        }
        obuf_put(h);
    }
}

int net_on_flushed(struct chat_session *s, void (*cb)(int ok, void *ud), void *ud)
{
    struct flush_wait *w, **pp;
    if (s->closing)
        return CHAT_ERR_CLOSED;
    if (!(w = mem_malloc(sizeof *w)))
        return CHAT_ERR_NOMEM;
    w->next = NULL;
    w->mark = s->queued_total;
    w->cb = cb;
    w->ud = ud;
    for (pp = &s->waits; *pp; pp = &(*pp)->next)
        ;
    *pp = w;
    return CHAT_OK;
}

/* ---- reading ---------------------------------------------------------- */

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)h;
    (void)hint;
    if (net.rbuf_busy) { /* cannot happen with one loop; be safe */
        *buf = uv_buf_init(NULL, 0);
        return;
    }
    net.rbuf_busy = 1;
    *buf = uv_buf_init(net.rbuf, sizeof net.rbuf);
}

static int part_append(struct chat_session *s, const char *p, size_t n)
{
    if (s->part_len + n > s->part_cap) {
        size_t cap = s->part_cap ? s->part_cap : 1024;
        char *np;
        while (cap < s->part_len + n)
            cap *= 2;
        if (!(np = mem_realloc(s->part, cap)))
            return CHAT_ERR_NOMEM;
        s->part = np;
        s->part_cap = cap;
    }
    memcpy(s->part + s->part_len, p, n);
    s->part_len += n;
    return CHAT_OK;
}

static void frame_too_large(struct chat_session *s)
{
    LOGSW(s, "frame over max_frame (%zu bytes), closing", net.max_frame);
    if (s->proto == CHAT_PROTO_2 && net.error_cb)
        net.error_cb(s, CHAT_E_FRAME_TOO_LARGE, "frame too large");
    close_why(s, METRICS_CLOSE_FRAME_TOO_LARGE);
    net_close(s, 0, NULL);
}

/* Split buf into frames and dispatch them. */
static void process(struct chat_session *s, const char *buf, size_t n)
{
    size_t pos = 0;
    while (pos < n && !s->closing) {
        size_t used = 0;
        long start = -1;
        int r = frame_scan(&s->fs, buf + pos, n - pos, &used, &start);
        if (r == FRAME_COMPLETE) {
            s->garbage = 0;
            tl_unlink(&net.reqs, &s->req);
            idle_refresh(s);
            if (s->part_len == 0 && start >= 0) {
                net.frame_cb(s, buf + pos + start, used - (size_t)start);
            } else {
                size_t from = start >= 0 ? (size_t)start : 0;
                if (part_append(s, buf + pos + from, used - from)) {
                    close_why(s, METRICS_CLOSE_ERROR);
                    begin_close(s, 0, NULL, 0);
                    return;
                }
                net.frame_cb(s, s->part, s->part_len);
                s->part_len = 0;
                if (s->part_cap > PART_KEEP) {
                    mem_free(s->part);
                    s->part = NULL;
                    s->part_cap = 0;
                }
            }
        } else if (r == FRAME_NEED_MORE) {
            /* the last fs.len bytes seen belong to an unfinished frame */
            size_t mine = s->fs.len - s->part_len;
            if (mine > used)
                mine = used;
            if (mine && part_append(s, buf + pos + used - mine, mine)) {
                close_why(s, METRICS_CLOSE_ERROR);
                begin_close(s, 0, NULL, 0);
                return;
            }
        } else if (r == FRAME_TOO_LARGE) {
            frame_too_large(s);
            return;
        } else { /* FRAME_GARBAGE: a byte outside any object */
            if (!s->garbage) {
                s->garbage = 1;
                if (net.error_cb)
                    net.error_cb(s, CHAT_E_BAD_JSON, "bytes outside a JSON object");
            }
        }
        pos += used;
    }
}

/* One whole message from a message transport (transport.h): exactly one
 * JSON object, blanks around it allowed; anything else is a protocol
 * error, as bytes outside an object are on a stream. */
static void process_message(struct chat_session *s, const char *buf, size_t n)
{
    struct frame_scanner fs;
    size_t used = 0, i;
    long start = -1;
    int r;

    if (n > net.max_frame) {
        frame_too_large(s);
        return;
    }
    frame_init(&fs, net.max_frame);
    r = frame_scan(&fs, buf, n, &used, &start);
    for (i = used; r == FRAME_COMPLETE && i < n; i++)
        if (buf[i] != ' ' && buf[i] != '\t' && buf[i] != '\r' && buf[i] != '\n')
            break;
    if (r == FRAME_COMPLETE && start >= 0 && i == n) {
        s->garbage = 0;
        idle_refresh(s);
        net.frame_cb(s, buf + start, used - (size_t)start);
        return;
    }
    if (net.error_cb)
        net.error_cb(s, CHAT_E_BAD_JSON, "a message must hold exactly one JSON object");
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct chat_session *s = container_of((uv_tcp_t *)st, struct chat_session, tcp);
    if (buf->base == net.rbuf)
        net.rbuf_busy = 0;
    if (nread > 0) {
        size_t off = 0;
        metrics_loop.bytes_in += (uint64_t)nread;
        if (s->pp_wait && pp_input(s, buf->base, (size_t)nread, &off))
            return; /* PROXY: the header is not whole yet, or refused */
        if (off == (size_t)nread)
            ;
        else if (!s->bottom)
            process(s, buf->base + off, (size_t)nread - off);
        else if (s->bottom->type->input(s->bottom, buf->base + off, (size_t)nread - off)) {
            close_why(s, METRICS_CLOSE_READ_ERROR);
            begin_close(s, 0, NULL, 0);
            return;
        }
        req_track(s);
        return;
    }
    if (nread == 0)
        return;
    if (nread != UV_EOF)
        LOGSD(s, "read: %s", uv_strerror((int)nread));
    close_why(s, nread == UV_EOF ? METRICS_CLOSE_PEER : METRICS_CLOSE_READ_ERROR);
    /* the client is gone (or half-closed): flush what we have and close */
    begin_close(s, 0, NULL, nread == UV_EOF);
}

/* ---- accepting -------------------------------------------------------- */

/* Close a connection a cap does not admit; one log line a second at most. */
static void refuse(struct chat_session *s, enum metrics_refuse why, const char *cap,
                   int limit)
{
    uint64_t now = uv_now(net.loop);
    net.refused++;
    metrics_loop.refused[why]++;
    if (now - net.refused_logged_at >= 1000 || net.refused == 1) {
        LOGW("%s (%d) reached: refused %s (%llu refused so far)", cap, limit,
             net_session_peer(s), (unsigned long long)net.refused);
        net.refused_logged_at = now;
    }
    s->closing = 1;
    close_now(s);
}

/* Count s against its address; 0, or -1 when refused (and closed). */
static int admit_addr(struct chat_session *s)
{
    int err;
    struct net_addr *na = addr_lookup(s, &err);

    if (err) {
        s->closing = 1;
        close_now(s);
        return -1;
    }
    if (!na)
        return 0;
    /* a fresh entry (total 0) passes both tests, so none is left empty */
    if (net.max_per_addr > 0 && na->total >= (unsigned)net.max_per_addr) {
        refuse(s, METRICS_REFUSE_PER_ADDR, "max_connections_per_addr", net.max_per_addr);
        return -1;
    }
    if (net.max_unauth_per_addr > 0 && na->unauth >= (unsigned)net.max_unauth_per_addr) {
        refuse(s, METRICS_REFUSE_UNAUTH_PER_ADDR, "max_unauth_per_addr",
               net.max_unauth_per_addr);
        return -1;
    }
    if (net.admit_cb && net.admit_cb(na->v6, na->key)) { /* [limits] addr_conns */
        if (na->total == 0) {
            map_del(na->v6 ? &net.addr6 : &net.addr4, na->key);
            mem_free(na);
        }
        refuse(s, METRICS_REFUSE_ADDR_RATE, "[limits] addr_conns", 0);
        return -1;
    }
    s->addr = na;
    na->total++;
    na->unauth++;
    s->unauth = 1;
    return 0;
}

/* TCP keepalive and TCP_USER_TIMEOUT: how a dead peer is found. */
static void set_keepalive(struct chat_session *s)
{
    uv_os_fd_t fd;
    int v;

    if (net.ka_idle_s <= 0) {
        uv_tcp_keepalive(&s->tcp, 0, 0);
    } else if (uv_tcp_keepalive(&s->tcp, 1, (unsigned)net.ka_idle_s) == 0 &&
               uv_fileno((uv_handle_t *)&s->tcp, &fd) == 0) {
        /* libuv 1.44 sets only the idle time; the rest is ours */
        v = net.ka_intvl_s;
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &v, sizeof v);
        v = net.ka_cnt;
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &v, sizeof v);
    }
    if (net.user_timeout_s > 0 && uv_fileno((uv_handle_t *)&s->tcp, &fd) == 0) {
        unsigned ms = (unsigned)net.user_timeout_s * 1000u;
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms);
    }
}

/* Stack the endpoint's transport layers on s, bottom first; 0 or -1. */
static int open_chain(struct chat_session *s, struct net_endpoint *ep)
{
    s->ep = ep;
    if (ep->nchain == 0) {
        s->tr_ready = 1;
        return 0;
    }
    for (int k = 0; k < ep->nchain; k++) {
        struct net_tconn *t = ep->chain[k]->open(ep->ctx[k], s, s->top);
        if (!t)
            return -1;
        t->type = ep->chain[k];
        t->s = s;
        t->below = s->top;
        t->above = NULL;
        if (s->top)
            s->top->above = t;
        else
            s->bottom = t;
        s->top = t;
    }
    tl_push(&ep->hands, &s->hand);
    return 0;
}

/* ---- PROXY protocol ---------------------------------------------------- */
/* [server] proxy_protocol = on (see the top of the file).  The whole of it
 * is here; elsewhere net only skips a session whose header has not come
 * (pp_wait): on_read hands its bytes to pp_input, the timer refuses it,
 * begin_close tells no one above, net_session_next does not list it. */

static void pp_end(struct chat_session *s)
{
    if (s->pp_wait) {
        s->pp_wait = 0;
        net.pp_waiting--;
    }
    mem_free(s->pp_buf);
    s->pp_buf = NULL;
    s->pp_len = 0;
}

/* Close a connection that brought no valid header (never admitted). */
static void pp_refuse(struct chat_session *s, const char *why, const char *detail,
                      int rate_limited)
{
    uint64_t now = uv_now(net.loop);

    net.refused++;
    metrics_loop.refused[METRICS_REFUSE_PROXY]++;
    if (!rate_limited || now - net.refused_logged_at >= 1000 || net.refused == 1) {
        LOGW("PROXY protocol: %s: refused %s%s%s", why, net_session_peer(s),
             detail ? ": " : "", detail ? detail : "");
        if (rate_limited)
            net.refused_logged_at = now;
    }
    pp_end(s);
    tl_unlink(&net.reqs, &s->req);
    tl_unlink(&net.idle, &s->idle);
    s->closing = 1;
    close_now(s);
}

/* Accepted with proxy_protocol on: only a trusted peer may speak for its
 * clients; read its header first, within the request clock. */
static void pp_begin(struct chat_session *s)
{
    unsigned char a[16];
    int family;

    if (peer_addr(s, &family, a) || !addr_trusted(family, a)) {
        pp_refuse(s, "peer not in [server] trusted", NULL, 1);
        return;
    }
    uv_tcp_nodelay(&s->tcp, 1);
    set_keepalive(s);
    s->pp_wait = 1;
    net.pp_waiting++;
    if (uv_read_start((uv_stream_t *)&s->tcp, on_alloc, on_read)) {
        pp_refuse(s, "cannot read", NULL, 1);
        return;
    }
    tl_push(&net.reqs, &s->req);
    idle_refresh(s);
}

/* The header came: the session is admitted as on_connection admits one,
 * under the header's source address.  0, or -1 when refused (closed). */
static int pp_admit(struct chat_session *s, const struct pp_header *h)
{
    pp_end(s);
    tl_unlink(&net.reqs, &s->req);
    if (h->command == PP_PROXY) {
        if (!(s->real = mem_malloc(sizeof *s->real))) {
            pp_refuse(s, "out of memory", NULL, 1);
            return -1;
        }
        *s->real = h->src;
    }
    if (admit_addr(s))
        return -1;
    if (map_put(&net.by_id, (int64_t)s->id, s)) {
        s->closing = 1;
        close_now(s);
        return -1;
    }
    if (open_chain(s, s->ep)) {
        LOGE("accept: out of memory for the %s transport", s->ep->chain[0]->name);
        map_del(&net.by_id, (int64_t)s->id);
        s->closing = 1;
        close_now(s);
        return -1;
    }
    s->registered = 1;
    net.tr_open[s->tri]++;
    idle_refresh(s);
    LOGSD(s, "connected (PROXY v%d %s)", h->version,
          h->command == PP_PROXY ? "PROXY" : "LOCAL: the balancer's own address");
    if (net.open_cb)
        net.open_cb(s);
    return s->closing ? -1 : 0;
}

/* A read of a session waiting for its header.  1: nothing more to do with
 * it (more is needed, or the connection was refused); 0: the header is
 * done and the read's bytes from *off on are the session's own. */
static int pp_input(struct chat_session *s, const char *buf, size_t n, size_t *off)
{
    struct pp_header h;
    size_t have = s->pp_len, used;
    const char *p = buf;
    size_t len = n;
    int r;

    if (have) { /* the buffer has room: pp_parse decides by PP_MAX_HEADER */
        size_t take = n < PP_MAX_HEADER - have ? n : PP_MAX_HEADER - have;
        memcpy(s->pp_buf + have, buf, take);
        s->pp_len += take;
        p = s->pp_buf;
        len = s->pp_len;
    }
    r = pp_parse(p, len, &h, &used);
    if (r == PP_NEED_MORE) {
        if (!have) {
            if (!(s->pp_buf = mem_malloc(PP_MAX_HEADER))) {
                pp_refuse(s, "out of memory", NULL, 1);
                return 1;
            }
            memcpy(s->pp_buf, buf, n); /* n < PP_MAX_HEADER: NEED_MORE */
            s->pp_len = n;
        }
        return 1;
    }
    if (r == PP_INVALID) {
        pp_refuse(s, "invalid header", h.err, 0);
        return 1;
    }
    *off = used - have; /* have bytes were not enough: used > have */
    return pp_admit(s, &h) ? 1 : 0;
}

static void on_connection(uv_stream_t *server, int status)
{
    struct chat_session *s;
    struct net_endpoint *ep = server->data;

    if (status < 0) {
        LOGW("accept: %s", uv_strerror(status));
        return;
    }
    if (!(s = mem_calloc(1, sizeof *s))) {
        LOGE("accept: out of memory");
        return;
    }
    if (uv_tcp_init(net.loop, &s->tcp) || uv_accept(server, (uv_stream_t *)&s->tcp)) {
        mem_free(s);
        return;
    }
    net.count++;
    s->tri = ep->tri;
    net.tr_all[s->tri]++;
    metrics_loop.accepted++;
    s->all_next = net.all_head;
    if (net.all_head)
        net.all_head->all_prev = s;
    net.all_head = s;
    s->id = ++net.next_id;
    s->proto = CHAT_PROTO_LEGACY;
    s->connected_at = uv_now(net.loop);
    frame_init(&s->fs, net.max_frame);
    if (net.count > (size_t)net.max_connections || net.shutdown_done) {
        refuse(s, net.shutdown_done ? METRICS_REFUSE_STOPPING : METRICS_REFUSE_MAX_CONN,
               "max_connections", net.max_connections);
        return;
    }
    /* PROXY headers come on stream listeners; a WebSocket balancer (nginx's
     * http proxy) sends none, so message transports never expect one */
    if (net.proxy_protocol &&
        !(ep->nchain && (ep->chain[ep->nchain - 1]->flags & NET_TR_MESSAGES))) {
        s->ep = ep;  /* its transports are stacked in pp_admit() */
        pp_begin(s); /* admitted when its header comes: pp_admit() */
        return;
    }
    if (admit_addr(s))
        return;
    uv_tcp_nodelay(&s->tcp, 1);
    set_keepalive(s);
    if (map_put(&net.by_id, (int64_t)s->id, s)) {
        s->closing = 1;
        close_now(s);
        return;
    }
    if (open_chain(s, ep)) {
        LOGE("accept: out of memory for the %s transport", ep->chain[0]->name);
        map_del(&net.by_id, (int64_t)s->id);
        s->closing = 1;
        close_now(s);
        return;
    }
    s->registered = 1;
    net.tr_open[s->tri]++;
    idle_refresh(s);
    if (uv_read_start((uv_stream_t *)&s->tcp, on_alloc, on_read)) {
        close_why(s, METRICS_CLOSE_ERROR);
        begin_close(s, 0, NULL, 0);
        return;
    }
    LOGSD(s, "connected");
    if (net.open_cb)
        net.open_cb(s);
}

/* ---- endpoints -------------------------------------------------------- */

/* The transports, by scheme.  tcp is net.c's own path (no functions). */
static const struct net_transport tcp_transport = {.name = "tcp"};
static const struct net_transport *const transports[] = {
    &tcp_transport, &tls_transport, &wstr_ws_transport, &wstr_wss_transport};

#define NET_NTR (sizeof transports / sizeof transports[0])
_Static_assert(NET_NTR <= NET_TR_MAX, "NET_TR_MAX: room for every transport");

static const struct net_transport *transport_find(const char *name)
{
    for (size_t i = 0; i < NET_NTR; i++)
        if (strcmp(transports[i]->name, name) == 0)
            return transports[i];
    return NULL;
}

/* The chain of l's transport, bottom first, and each layer's endpoint
 * state; 0 or -1 (logged). */
static int endpoint_chain(struct net_endpoint *ep, const struct conf *c,
                          const struct conf_listen *l)
{
    const struct net_transport *top = transport_find(l->scheme), *t;
    const struct net_transport *up[NET_CHAIN_MAX];
    int n = 0;
    char err[256];

    if (!top) {
        LOGE("listen %s: no %s transport in this build", ep->name, l->scheme);
        return -1;
    }
    for (size_t i = 0; i < NET_NTR; i++)
        if (transports[i] == top)
            ep->tri = (unsigned char)i;
    for (t = top; t && t != &tcp_transport; t = t->below ? transport_find(t->below) : NULL) {
        if (n == NET_CHAIN_MAX) {
            LOGE("listen %s: transports stacked too deep", ep->name);
            return -1;
        }
        up[n++] = t;
    }
    for (int k = 0; k < n; k++) { /* bottom first */
        int hs = 0;
        ep->chain[k] = up[n - 1 - k];
        err[0] = '\0';
        if (ep->chain[k]->ep_start(c, l, &ep->ctx[k], &hs, err, sizeof err)) {
            LOGE("listen %s: %s", ep->name, err);
            return -1;
        }
        ep->nchain = k + 1;
        if (hs > 0 && (!ep->handshake_ms || hs < ep->handshake_ms))
            ep->handshake_ms = hs;
    }
    return 0;
}

/* A listening socket with SO_REUSEPORT, so that several worker processes
 * can share the port (libuv 1.44 has no flag for it). */
static int open_listener(struct net_endpoint *ep, const char *host, int port)
{
    struct sockaddr_storage ss;
    int fd, one = 1, r;

    memset(&ss, 0, sizeof ss);
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)&ss) != 0 &&
        uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss) != 0) {
        LOGE("listen: bad address %s:%d", host, port);
        return -1;
    }
    fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        LOGE("socket: %s", strerror(errno));
        return -1;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    r = bind(fd, (struct sockaddr *)&ss,
             ss.ss_family == AF_INET ? sizeof(struct sockaddr_in)
                                     : sizeof(struct sockaddr_in6));
    if (r < 0) {
        LOGE("bind %s:%d: %s", host, port, strerror(errno));
        close(fd);
        return -1;
    }
    if (uv_tcp_init(net.loop, &ep->tcp) || uv_tcp_open(&ep->tcp, fd)) {
        close(fd);
        return -1;
    }
    ep->tcp.data = ep;
    ep->open = 1;
    if ((r = uv_listen((uv_stream_t *)&ep->tcp, 4096, on_connection)) < 0) {
        LOGE("listen %s:%d: %s", host, port, uv_strerror(r));
        uv_close((uv_handle_t *)&ep->tcp, NULL);
        ep->open = 0;
        return -1;
    }
    return 0;
}

static int open_endpoints(const struct conf *c)
{
    if (!(net.eps = mem_calloc(c->nlistens, sizeof *net.eps))) {
        LOGE("listen: out of memory");
        return -1;
    }
    net.neps = c->nlistens;
    for (size_t i = 0; i < c->nlistens; i++) {
        const struct conf_listen *l = &c->listens[i];
        struct net_endpoint *ep = &net.eps[i];
        int v6 = strchr(l->host, ':') != NULL;
        int tcp = strcmp(l->scheme, "tcp") == 0; /* plain HOST:PORT, as always */
        snprintf(ep->name, sizeof ep->name, "%s%s%s%s%s:%d%s", tcp ? "" : l->scheme,
                 tcp ? "" : "://", v6 ? "[" : "", l->host, v6 ? "]" : "", l->port,
                 l->path ? l->path : "");
        if (endpoint_chain(ep, c, l) || open_listener(ep, l->host, l->port))
            return -1;
    }
    return 0;
}

/* "listening on 127.0.0.1:6000, tls://127.0.0.1:6443" once every endpoint
 * is open (tests and scripts wait for it; tcp keeps its bare HOST:PORT). */
static void log_endpoints(void)
{
    char line[1024];
    size_t off = 0;

    line[0] = '\0';
    for (size_t i = 0; i < net.neps && off < sizeof line; i++)
        off += (size_t)snprintf(line + off, sizeof line - off, "%s%s", i ? ", " : "",
                                net.eps[i].name);
    LOGI("listening on %s", line);
}

int net_check_conf(const struct conf *c, char *err, size_t errlen)
{
    for (size_t i = 0; i < c->nlistens; i++)
        if (!transport_find(c->listens[i].scheme)) {
            snprintf(err, errlen, "%s: listen %s://%s:%d: no %s transport in this build",
                     c->path, c->listens[i].scheme, c->listens[i].host, c->listens[i].port,
                     c->listens[i].scheme);
            return -1;
        }
    return 0;
}

void net_reload_tls(const struct conf *c)
{
    for (size_t i = 0; c && i < net.neps; i++)
        for (int k = 0; k < net.eps[i].nchain; k++)
            if (net.eps[i].chain[k]->ep_reload)
                net.eps[i].chain[k]->ep_reload(net.eps[i].ctx[k], c);
}

/* A copy of the trusted list (the conf may be freed after a reload). */
static void set_trusted(const struct conf *c)
{
    struct conf_cidr *t = NULL;

    if (c->ntrusted && !(t = mem_malloc(c->ntrusted * sizeof *t))) {
        LOGE("out of memory: the trusted list is unchanged");
        return;
    }
    if (t)
        memcpy(t, c->trusted, c->ntrusted * sizeof *t);
    mem_free(net.trusted);
    net.trusted = t;
    net.ntrusted = c->ntrusted;
}

void net_on_unsent(net_unsent_fn cb) { net.unsent_cb = cb; }
void net_on_frame(net_frame_fn cb) { net.frame_cb = cb; }
void net_on_error(net_error_fn cb) { net.error_cb = cb; }
void net_on_open(net_session_fn cb) { net.open_cb = cb; }
void net_on_closing(net_closing_fn cb) { net.closing_cb = cb; }
void net_on_admit(net_admit_fn cb) { net.admit_cb = cb; }

void net_apply_conf(const struct conf *c)
{
    int shortest = 0;

    net.max_frame = c->max_frame;
    net.max_output = c->max_output;
    net.max_connections = c->max_connections;
    net.idle_timeout_s = c->idle_timeout_s;
    net.legacy_pace_ms = c->legacy_pace_ms;
    net.request_timeout_s = c->request_timeout_s;
    net.max_per_addr = c->max_conns_per_addr;
    net.max_unauth_per_addr = c->max_unauth_per_addr;
    net.ka_idle_s = c->keepalive_idle_s;
    net.ka_intvl_s = c->keepalive_intvl_s;
    net.ka_cnt = c->keepalive_cnt;
    net.user_timeout_s = c->user_timeout_s;
    net.proxy_protocol = c->proxy_protocol; /* new connections on */
    set_trusted(c);
    if (net.loop && uv_is_active((uv_handle_t *)&net.idle_timer))
        uv_timer_stop(&net.idle_timer);
    if (net.idle_timeout_s > 0)
        shortest = net.idle_timeout_s;
    if (net.request_timeout_s > 0 && (!shortest || net.request_timeout_s < shortest))
        shortest = net.request_timeout_s;
    for (size_t i = 0; i < net.neps; i++) { /* handshakes, transport ticks */
        int hs = net.eps[i].handshake_ms > 0 ? (net.eps[i].handshake_ms + 999) / 1000 : 4;
        if (net.eps[i].nchain && (!shortest || hs < shortest))
            shortest = hs;
    }
    if (net.loop && shortest > 0) {
        /* a quarter of the shortest limit: closed at most 25% late */
        uint64_t every = (uint64_t)shortest * 250;
        if (every < 100)
            every = 100;
        if (every > 1000)
            every = 1000;
        uv_timer_start(&net.idle_timer, on_idle_timer, every, every);
    }
}

/* Sessions by state at scrape time: open ones are registered by id,
 * logged-in ones also by user; the rest of net.count is closing. */
static void net_collect(struct metrics_out *o)
{
    metrics_out_family(o, "chatd_sessions", "Client sessions now, by transport and state.",
                       METRICS_GAUGE);
    for (size_t i = 0; i < NET_NTR; i++) {
        const char *name = transports[i]->name;
        const char *un[] = {"transport", name, "state", "unauthenticated", NULL};
        const char *li[] = {"transport", name, "state", "logged_in", NULL};
        const char *cl[] = {"transport", name, "state", "closing", NULL};
        size_t all = net.tr_all[i], open = net.tr_open[i], in = net.tr_in[i];
        int used = i == 0 || all;

        for (size_t k = 0; !used && k < net.neps; k++)
            used = net.eps[k].tri == i;
        if (!used) /* a transport no endpoint uses: no series */
            continue;
        metrics_out_u64_labels(o, "chatd_sessions", un, open > in ? open - in : 0);
        metrics_out_u64_labels(o, "chatd_sessions", li, in);
        metrics_out_u64_labels(o, "chatd_sessions", cl, all > open ? all - open : 0);
    }
    metrics_out_family(o, "chatd_max_connections", "The max_connections setting.",
                       METRICS_GAUGE);
    metrics_out_u64(o, "chatd_max_connections", NULL, NULL, (uint64_t)net.max_connections);
}

int net_start(uv_loop_t *loop, const struct conf *c)
{
    net.loop = loop;
    metrics_add_collector(net_collect);
    map_init(&net.by_id);
    map_init(&net.by_user);
    map_init(&net.addr4);
    map_init(&net.addr6);
    uv_check_init(loop, &net.flusher);
    uv_check_start(&net.flusher, on_check);
    uv_idle_init(loop, &net.flush_idle);
    uv_timer_init(loop, &net.idle_timer);
    uv_timer_init(loop, &net.pace_timer);
    uv_timer_init(loop, &net.shutdown_timer);
    if (open_endpoints(c))
        return -1;
    net_apply_conf(c); /* after the endpoints: their handshake deadlines */
    log_endpoints();
    if (c->proxy_protocol)
        LOGI("proxy_protocol on: each connection starts with a PROXY header "
             "from a [server] trusted address");
    return 0;
}

void net_stop_accepting(void)
{
    for (size_t i = 0; i < net.neps; i++)
        if (net.eps[i].open) {
            uv_close((uv_handle_t *)&net.eps[i].tcp, NULL);
            net.eps[i].open = 0;
        }
}

static void on_shutdown_timeout(uv_timer_t *t)
{
    (void)t;
    LOGW("shutdown: %zu sessions still flushing after 5 s; closing them",
         net.count);
    for (struct chat_session *s = net.all_head; s; s = s->all_next) {
        if (!s->closing) /* not expected: every session got net_close */
            begin_close(s, 0, NULL, 0);
        else
            close_now(s); /* stuck flushing to a client that does not read */
    }
}

static void close_handles(void)
{
    uv_check_stop(&net.flusher);
    uv_close((uv_handle_t *)&net.flusher, NULL);
    uv_close((uv_handle_t *)&net.flush_idle, NULL);
    uv_close((uv_handle_t *)&net.idle_timer, NULL);
    uv_close((uv_handle_t *)&net.pace_timer, NULL);
    uv_close((uv_handle_t *)&net.shutdown_timer, NULL);
    for (size_t i = 0; i < net.npool; i++)
        mem_free(net.pool[i]);
    net.npool = 0;
    map_free(&net.by_id);
    map_free(&net.by_user);
    map_free(&net.addr4); /* empty: every session is closed */
    map_free(&net.addr6);
    mem_free(net.trusted);
    net.trusted = NULL;
    net.ntrusted = 0;
    for (size_t i = 0; i < net.neps; i++) /* every session is freed */
        for (int k = 0; k < net.eps[i].nchain; k++)
            net.eps[i].chain[k]->ep_stop(net.eps[i].ctx[k]);
    /* net.eps stays: a listener closed just now is still closing */
}

static void (*net_final_done)(void);

static void on_all_closed(void)
{
    close_handles();
    if (net_final_done)
        net_final_done();
}

void net_shutdown(void (*done)(void))
{
    struct chat_session **all;
    size_t n = 0;

    net_stop_accepting();
    net_final_done = done;
    if (net.count == 0) {
        on_all_closed();
        return;
    }
    net.shutdown_done = on_all_closed;
    uv_timer_start(&net.shutdown_timer, on_shutdown_timeout, 5000, 0);
    for (struct chat_session *s = net.all_head; s; s = s->all_next)
        if (s->pp_wait) /* PROXY: no header yet, nothing to say goodbye to */
            begin_close(s, 0, NULL, 0);
    /* closing mutates by_id: collect first */
    all = mem_malloc((net.by_id.len + 1) * sizeof *all);
    if (all) {
        int64_t k;
        void *v;
        for (size_t it = 0; map_next(&net.by_id, &it, &k, &v);)
            all[n++] = v;
        for (size_t i = 0; i < n; i++)
            net_close(all[i], CHAT_E_SHUTDOWN, "server is stopping");
        mem_free(all);
    }
}

/* ---- test seam -------------------------------------------------------- */

struct chat_session *net_test_session(uv_loop_t *loop, size_t max_frame)
{
    struct chat_session *s = mem_calloc(1, sizeof *s);
    if (!s)
        return NULL;
    if (!net.loop) {
        net.loop = loop;
        map_init(&net.by_id);
        map_init(&net.by_user);
        net.max_frame = max_frame;
        net.max_output = 1u << 20;
        net.max_connections = 1 << 20;
    }
    uv_tcp_init(loop, &s->tcp);
    s->sink = 1;
    s->tr_ready = 1;
    s->graceful = 0;
    s->id = ++net.next_id;
    s->proto = CHAT_PROTO_LEGACY;
    frame_init(&s->fs, max_frame);
    net.count++;
    metrics_loop.accepted++;
    s->all_next = net.all_head;
    if (net.all_head)
        net.all_head->all_prev = s;
    net.all_head = s;
    map_put(&net.by_id, (int64_t)s->id, s);
    s->registered = 1;
    net.tr_all[0]++;
    net.tr_open[0]++;
    return s;
}

void net_test_feed(struct chat_session *s, const char *buf, size_t n)
{
    process(s, buf, n);
    on_check(NULL);
}

void net_test_message(struct chat_session *s, const char *buf, size_t n)
{
    process_message(s, buf, n);
    on_check(NULL);
}

/* ---- session accessors ------------------------------------------------ */

struct chat_session *net_session_get(uint64_t id) { return map_get(&net.by_id, (int64_t)id); }

struct chat_session *net_session_by_user(int64_t uid)
{
    return uid ? map_get(&net.by_user, uid) : NULL;
}

uint64_t net_session_id(const struct chat_session *s) { return s->id; }
int net_session_proto(const struct chat_session *s) { return s->proto; }
void net_session_set_proto(struct chat_session *s, int proto) { s->proto = proto; }
int64_t net_session_user(const struct chat_session *s) { return s->uid; }
const char *net_session_name(const struct chat_session *s) { return s->name ? s->name : ""; }

const char *net_session_name_len(const struct chat_session *s, size_t *len)
{
    if (len)
        *len = s->name ? s->name_len : 0;
    return s->name ? s->name : "";
}
int net_session_closing(const struct chat_session *s) { return s->closing; }
size_t net_session_count(void) { return net.count; }
uint64_t net_session_connected_at(const struct chat_session *s) { return s->connected_at; }

struct chat_session *net_session_next(const struct chat_session *s)
{
    struct chat_session *n = s ? s->all_next : net.all_head;
    while (n && (n->closing || n->pp_wait))
        n = n->all_next;
    return n;
}

const char *net_session_peer(const struct chat_session *s)
{
    static char buf[64];
    struct sockaddr_storage ss;
    char ip[48];

    if (session_sockaddr(s, &ss))
        return "?";
    if (ss.ss_family == AF_INET6) {
        uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof ip);
        snprintf(buf, sizeof buf, "[%s]:%d", ip,
                 ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
    } else {
        uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof ip);
        snprintf(buf, sizeof buf, "%s:%d", ip,
                 ntohs(((struct sockaddr_in *)&ss)->sin_port));
    }
    return buf;
}

/* ---- the user's devices (multi-device logins) -------------------------
 * by_user maps a user to its newest bound session; a user logged in with
 * CHAT_LOGIN_MULTI on several connections has the older ones chained from
 * it through dev_next, newest first.  One pointer per session, and the
 * single-device case stays one map lookup. */

int net_session_bind_ex(struct chat_session *s, int64_t uid, const char *name,
                        size_t name_len, int multi)
{
    struct chat_session *head;
    char *n;
    if (s->closing)
        return CHAT_ERR_CLOSED;
    if (uid <= 0)
        return CHAT_ERR_INVAL;
    head = map_get(&net.by_user, uid);
    if (head && !multi)
        return CHAT_ERR_EXISTS;
    if (!(n = mem_strndup(name ? name : "", name ? name_len : 0)))
        return CHAT_ERR_NOMEM;
    if (map_put(&net.by_user, uid, s)) {
        mem_free(n);
        return CHAT_ERR_NOMEM;
    }
    s->dev_next = head;
    mem_free(s->name);
    s->name = n;
    s->name_len = name ? name_len : 0;
    s->uid = uid;
    net.tr_in[s->tri]++;
    addr_set_unauth(s, 0);
    idle_refresh(s); /* logged in: idle only while not draining */
    return CHAT_OK;
}

int net_session_bind(struct chat_session *s, int64_t uid, const char *name,
                     size_t name_len)
{
    return net_session_bind_ex(s, uid, name, name_len, 0);
}

/* Take s out of its user's chain (the map entry is the head). */
static void dev_unlink(struct chat_session *s)
{
    struct chat_session *head = map_get(&net.by_user, s->uid), *p;

    if (head == s) {
        if (s->dev_next) /* existing key: no allocation */
            map_put(&net.by_user, s->uid, s->dev_next);
        else
            map_del(&net.by_user, s->uid);
    } else {
        for (p = head; p && p->dev_next != s; p = p->dev_next)
            ;
        if (p)
            p->dev_next = s->dev_next;
    }
    s->dev_next = NULL;
}

struct chat_session *net_session_next_device(const struct chat_session *s)
{
    return s ? s->dev_next : NULL;
}

void net_session_unbind(struct chat_session *s)
{
    if (!s->uid)
        return;
    dev_unlink(s);
    s->uid = 0;
    net.tr_in[s->tri]--;
    mem_free(s->name);
    s->name = NULL;
    s->name_len = 0;
    addr_set_unauth(s, 1);
    idle_refresh(s); /* logged out: the login deadline runs again */
}

/* ---- rate limits (ratelimit.c) ---------------------------------------- */
/* Kept apart from the read path above: ratelimit.c stops a session's reads
 * while it is over a limit (its TCP window closes) and starts them again.
 * The request clock of a frame under way does not run while the server
 * holds the client: each call restamps it (ratelimit.c calls pause again
 * every second while a session waits). */

int net_read_pause(struct chat_session *s, int pause)
{
    if (s->closing || s->sink)
        return -1;
    if (tl_linked(&net.reqs, &s->req))
        tl_push(&net.reqs, &s->req);
    if (pause)
        return uv_read_stop((uv_stream_t *)&s->tcp) ? -1 : 0;
    if (uv_read_start((uv_stream_t *)&s->tcp, on_alloc, on_read)) {
        close_why(s, METRICS_CLOSE_ERROR);
        begin_close(s, 0, NULL, 0);
        return -1;
    }
    return 0;
}

int net_session_addr_key(const struct chat_session *s, int *v6, int64_t *key)
{
    if (!s->addr)
        return -1;
    *v6 = s->addr->v6;
    *key = s->addr->key;
    return 0;
}
