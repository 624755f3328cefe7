/*
 * worker.c - one chat-bench worker process: its share of the scenario's
 * connections and all of their traffic, on one libuv loop.
 *
 * The parent forks the workers after setup; worker i of n owns the pairs,
 * group members or connections whose index is i modulo n, so a pair's
 * sender and receiver always live in the same process and latency is a
 * difference of two readings of the same clock.  The life of a worker:
 *   1. connect and log in its users (legacy LOGIN_MSG, or protocol 2 for
 *      the resume storm), then send READY (conns: READY at once);
 *   2. on GO(t0) start traffic at t0; from t0+warmup to t0+warmup+duration
 *      is the measured window: deliveries and logins are counted and their
 *      latencies recorded only when they complete inside it, and the CPU
 *      time of the process is read at both ends;
 *   3. stop sending at the end of the window, wait for what is in flight
 *      (at most --drain seconds, and until nothing arrived for 300 ms),
 *      send RESULT and exit.
 *
 * The login storm with --handshakes logs in no more: each cycle is a new
 * connection (tcp connect, then the target's TLS and WebSocket handshakes)
 * closed once the transport is up, so its rate is handshakes per second.
 *
 * Flow control is closed-loop: a sender starts with W credits and gets one
 * back each time a message of its own is delivered (pairs: to its receiver;
 * group: to every member of the group in the same process).  Without
 * --rate nothing is paced by timers, so the rate is what the server
 * sustains with W messages in flight per sender; with --rate a token bucket
 * fixes the offered load (pace_cb) and W only caps what is in flight.
 *
 * Every message carries "SEQ:T:PAYLOAD": the sender's sequence number, the
 * send time (CLOCK_MONOTONIC ns) and a payload derived from sender id and
 * sequence.  Each receiver keeps, per sender, a bitmap of the sequence
 * numbers seen, which makes duplicates and reordering exact; losses are
 * what the senders owe minus the distinct deliveries, summed over all
 * workers by the parent.
 *
 * --durable (pairs, group): every connection speaks protocol 2 and each message
 * carries "seq" (the sender's sequence number) and "cid" (the run's
 * prefix and that number).  A sender's
 * credit comes back with its ACK, which the server sends only once the
 * message is committed; the count and the latency are send-to-ACK.  An
 * ACK with errno 113 makes the sender send the same message again (same
 * cid), as a durable client does; the receivers still check every delivery
 * (lost, dup, ooo after deduplication by sequence number).  group: the
 * credit comes back with the ACK as well, but what is counted and timed is
 * the deliveries to the members (send-to-delivery), as without --durable.
 * A sender's sequence number names one cid and so one stored message (one
 * mid): deduplicating by it is deduplicating by mid.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

#define TICK_MS 50
#define QUIET_NS (300ull * 1000000ull)
#define RETRY_NS (100ull * 1000000ull)
#define MAX_RETRIES 100

enum cstate { CS_NEW = 0, CS_CONNECTING, CS_LOGIN, CS_READY, CS_RETRY, CS_DEAD };
enum phase { PH_SETUP = 0, PH_WAIT, PH_RUN, PH_DRAIN, PH_HOLD, PH_DONE };

struct stream {              /* one sender's messages at one receiver */
    uint64_t *bits;
    size_t nwords;
    uint64_t top;            /* highest sequence seen + 1 */
};

struct sender {
    struct wconn *wc;
    int64_t uid;
    uint64_t seq, sent, done;
    int credits;
    int need;                /* group: local members that must receive */
    uint32_t *ring;          /* group: deliveries counted per seq & mask */
    uint32_t mask;
    struct bn_buf prefix;    /* the message up to the opening quote of msg */
    uint64_t *sent_at;       /* --durable: send time by seq & ring_mask */
    uint32_t ring_mask;
};

struct wconn {
    struct bn_conn c;
    struct worker *w;
    int slot;                /* index into bench.users */
    enum cstate st;
    int peer;                /* pairs: local sender feeding this receiver */
    struct stream *streams;  /* pairs: 1; group: one per sender */
    uint64_t t_req;          /* when the pending login went out */
    uint64_t retry_at;
    int retries;
    int storm;               /* login scenario: cycling */
    char token[80];
    size_t token_len;
};

struct worker {
    uv_loop_t loop;
    struct bn_net net;
    uv_pipe_t cmd;
    uv_timer_t tick, phase_timer, pace;
    double tokens;           /* --rate: sends allowed now */
    uint64_t pace_last;
    int pace_next;
    int index, count, rec_fd;
    char cmdbuf[sizeof(struct bw_cmd)];
    size_t cmdlen;
    enum phase phase;
    struct wconn *conns;
    int nconns;
    int next_connect, pending, logged_in, failed;
    struct sender *senders;
    int nsenders;
    int *g2l;                /* group: global sender index -> local, or -1 */
    uint64_t t0, t_ms, t_me, t_drain_end, last_recv, last_tick_ns;
    uint64_t cpu_u0, cpu_s0;
    int measuring, stopped, ready_sent, phase_sent;
    char timestr[24];
    time_t timestr_sec;
    struct bw_tick tk;
    struct bw_result res;
};

static struct worker W;

static void conn_start(struct wconn *wc);
static void send_login(struct wconn *wc);
static void connect_more(void);

/* ---- records to the parent ---------------------------------------------- */

static void rec_write(uint32_t type, const void *p, size_t len)
{
    struct bw_rec_hdr h = {type, (uint32_t)len};
    const char *parts[2] = {(const char *)&h, p};
    size_t lens[2] = {sizeof h, len};
    for (int i = 0; i < 2; i++) {
        size_t off = 0;
        while (off < lens[i]) {
            ssize_t n = write(W.rec_fd, parts[i] + off, lens[i] - off);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                _exit(3); /* the parent is gone */
            off += (size_t)n;
        }
    }
}

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fail(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    rec_write(REC_FAIL, msg, strlen(msg) + 1);
    _exit(1);
}

/* ---- message payloads --------------------------------------------------- */

static inline char pattern(int64_t uid, uint64_t seq, size_t i)
{
    uint64_t x = (uint64_t)uid * 0x9E3779B97F4A7C15ull + seq * 0xBF58476D1CE4E5B9ull +
                 i * 0x94D049BB133111EBull;
    return (char)('a' + (x >> 58) % 26);
}

static void refresh_time(void)
{
    time_t now = time(NULL);
    if (now == W.timestr_sec)
        return;
    struct tm tm;
    localtime_r(&now, &tm);
    strftime(W.timestr, sizeof W.timestr, "%Y-%m-%d %H:%M:%S", &tm);
    W.timestr_sec = now;
}

static void durable_tail(struct bn_buf *b, uint64_t seq);

/* Message seq of s, stamped ts (a resend keeps its first stamp). */
static void send_seq(struct sender *s, uint64_t seq, uint64_t ts)
{
    struct bn_buf *b = bn_out(&s->wc->c);
    size_t plen = (size_t)bench.payload;
    bn_buf_reserve(b, s->prefix.len + plen + 160);
    bn_buf_add(b, s->prefix.p, s->prefix.len);
    bn_buf_addu(b, seq);
    bn_buf_addc(b, ':');
    bn_buf_addu(b, ts);
    bn_buf_addc(b, ':');
    char *p = b->p + b->len;
    for (size_t i = 0; i < plen; i++)
        p[i] = pattern(s->uid, seq, i);
    b->len += plen;
    if (bench.durable)
        durable_tail(b, seq);
    bn_buf_add(b, "\",\"time\":\"", 10);
    bn_buf_add(b, W.timestr, strlen(W.timestr));
    bn_buf_add(b, "\"}", 3); /* with the terminating NUL */
}

static void send_msg(struct sender *s)
{
    uint64_t now = bst_now_ns();

    if (s->sent_at)
        s->sent_at[s->seq & s->ring_mask] = now;
    send_seq(s, s->seq, now);
    s->seq++;
    s->sent++;
    W.tk.sent++;
}

static void sender_pump(struct sender *s)
{
    if (W.stopped || W.phase != PH_RUN || s->wc->st != CS_READY)
        return;
    if (bench.rate > 0)
        return; /* paced: pace_cb hands out the sends */
    for (; s->credits > 0; s->credits--)
        send_msg(s);
}

/* --rate: every millisecond the worker earns its share of the rate in
 * tokens (at most 5 ms worth banked) and spends them round-robin on the
 * senders that have a credit, so the offered load is fixed and latency is
 * measured below saturation.  W still caps what is in flight: a server
 * that falls behind shows up as an achieved rate below the asked one. */
static void pace_cb(uv_timer_t *t)
{
    (void)t;
    uint64_t now = bst_now_ns();
    double per_ns = bench.rate / (double)W.count / 1e9;
    W.tokens += per_ns * (double)(now - W.pace_last);
    W.pace_last = now;
    if (W.tokens > per_ns * 5e6 + 1)
        W.tokens = per_ns * 5e6 + 1;
    if (W.stopped || W.phase != PH_RUN || W.nsenders == 0)
        return;
    int idle = 0;
    while (W.tokens >= 1 && idle < W.nsenders) {
        struct sender *s = &W.senders[W.pace_next];
        W.pace_next = (W.pace_next + 1) % W.nsenders;
        if (s->credits > 0 && s->wc->st == CS_READY) {
            s->credits--;
            send_msg(s);
            W.tokens -= 1;
            idle = 0;
        } else {
            idle++;
        }
    }
}

/* ---- receiving ------------------------------------------------------------ */

/* Mark seq in the stream: 1 if new, 0 if seen before. */
static int stream_mark(struct stream *st, uint64_t seq, int *ooo)
{
    size_t w = (size_t)(seq >> 6);
    if (w >= st->nwords) {
        size_t n = st->nwords ? st->nwords : 64;
        while (n <= w)
            n *= 2;
        st->bits = bx_realloc(st->bits, n * sizeof *st->bits);
        memset(st->bits + st->nwords, 0, (n - st->nwords) * sizeof *st->bits);
        st->nwords = n;
    }
    uint64_t bit = 1ull << (seq & 63);
    if (st->bits[w] & bit)
        return 0;
    st->bits[w] |= bit;
    *ooo = seq + 1 < st->top;
    if (seq + 1 > st->top)
        st->top = seq + 1;
    return 1;
}

static int parse_u64(const char **pp, const char *e, uint64_t *v)
{
    const char *p = *pp;
    uint64_t x = 0;
    if (p >= e || *p < '0' || *p > '9')
        return -1;
    while (p < e && *p >= '0' && *p <= '9')
        x = x * 10 + (uint64_t)(*p++ - '0');
    *pp = p;
    *v = x;
    return 0;
}

/* A chat delivery to wc: check it, count it, credit its local sender. */
static void on_delivery(struct wconn *wc, const struct bn_fields *f)
{
    uint64_t now = bst_now_ns();
    struct stream *st = NULL;
    struct sender *snd = NULL;
    int gidx = -1;

    W.res.recv_total++;
    W.tk.recv++;
    W.last_recv = now;
    if (!wc->streams) {
        W.res.corrupt++; /* a chat message to a connection that only sends */
        return;
    }
    if (bench.scenario == SC_PAIRS) {
        snd = &W.senders[wc->peer];
        if (!f->has_id || f->id != snd->uid) {
            W.res.corrupt++;
            return;
        }
        st = &wc->streams[0];
    } else {
        for (int i = 0; i < bench.senders; i++)
            if (f->has_id && bench.users[i].id == f->id) {
                gidx = i;
                break;
            }
        if (gidx < 0 || gidx == wc->slot) {
            W.res.corrupt++; /* unknown sender, or our own message echoed */
            return;
        }
        st = &wc->streams[gidx];
        if (W.g2l[gidx] >= 0)
            snd = &W.senders[W.g2l[gidx]];
    }
    const char *p = f->msg, *e = f->msg + f->msg_len;
    uint64_t seq, ts;
    if (!p || parse_u64(&p, e, &seq) || p >= e || *p++ != ':' ||
        parse_u64(&p, e, &ts) || p >= e || *p++ != ':') {
        W.res.corrupt++;
        return;
    }
    int64_t uid = f->id;
    int bad = (size_t)(e - p) != (size_t)bench.payload;
    for (size_t i = 0; !bad && p + i < e; i++)
        bad = p[i] != pattern(uid, seq, i);
    int ooo = 0;
    if (!stream_mark(st, seq, &ooo)) {
        W.res.dup++;
        return;
    }
    W.res.distinct++;
    W.res.ooo += (uint64_t)ooo;
    if (bad)
        W.res.corrupt++;
    if ((!bench.durable || bench.scenario == SC_GROUP) && now >= W.t_ms && now < W.t_me) {
        W.res.recv_window++;
        bst_hist_add(&W.res.hist, now > ts ? now - ts : 0);
    }
    if (!snd || bench.durable)
        return; /* --durable: the ACK gives the credit back */
    if (bench.scenario == SC_GROUP) {
        uint32_t *slot = &snd->ring[seq & snd->mask];
        if (++*slot < (uint32_t)snd->need)
            return;
        *slot = 0;
    }
    snd->done++;
    snd->credits++;
    sender_pump(snd);
}

/* ---- --durable: protocol-2 durable messages ----------------------------- */

/* ,"seq":N,"cid":"PREFIX N" inside the message, before "time".  The
 * run's user-name prefix makes the cid unique per run (users are reused
 * with --ids, and a cid is unique per sender for good). */
static void durable_tail(struct bn_buf *b, uint64_t seq)
{
    bn_buf_add(b, "\",\"seq\":", 8);
    bn_buf_addu(b, seq);
    bn_buf_add(b, ",\"cid\":\"", 8);
    bn_buf_add(b, bench.prefix, strlen(bench.prefix));
    bn_buf_addu(b, seq);
}

static void durable_ring(struct sender *s)
{
    uint32_t n = 1;

    while (n < (uint32_t)bench.window * 2)
        n <<= 1;
    s->sent_at = bx_calloc(n, sizeof *s->sent_at);
    s->ring_mask = n - 1;
}

/* The sender that sends on wc, or NULL (pairs: a sender connection has no
 * streams; group: the first S members send). */
static struct sender *sender_of(struct wconn *wc)
{
    if (bench.scenario == SC_PAIRS)
        return !wc->streams && wc->peer >= 0 && wc->peer < W.nsenders &&
                       W.senders[wc->peer].wc == wc
                   ? &W.senders[wc->peer]
                   : NULL;
    if (bench.scenario == SC_GROUP && wc->slot < bench.senders && W.g2l[wc->slot] >= 0)
        return &W.senders[W.g2l[wc->slot]];
    return NULL;
}

/* The ACK of a sender's message: committed (count it, credit back), or
 * 113 (send it again with the same cid), or another error (counted).
 * pairs: the ACK is what is counted and timed; group: the deliveries are
 * (on_delivery), the ACK only gives the credit back. */
static void on_durable_ack(struct wconn *wc, const struct bn_fields *f)
{
    uint64_t now = bst_now_ns();
    struct sender *s = sender_of(wc);
    uint64_t seq, t;
    int req = bench.scenario == SC_GROUP ? 10 : 6;

    if (s && f->has_seq && f->seq >= 0 && f->has_errno && f->has_req && f->req == req) {
        seq = (uint64_t)f->seq;
        t = s->sent_at[seq & s->ring_mask];
        if (f->errno_ == 113) {
            W.res.busy++;
            send_seq(s, seq, t);
            return;
        }
        if (f->errno_ != 0) {
            W.res.errors++;
            W.tk.errors++;
        } else if (bench.scenario == SC_PAIRS && now >= W.t_ms && now < W.t_me) {
            W.res.recv_window++;
            bst_hist_add(&W.res.hist, now > t ? now - t : 0);
        }
        s->done++;
        s->credits++;
        sender_pump(s);
        return;
    }
    if (f->has_errno && f->errno_ != 0) { /* e.g. a protocol error */
        W.res.errors++;
        W.tk.errors++;
    }
}

/* ---- logins --------------------------------------------------------------- */

static void all_logged_in_check(void)
{
    if (W.phase == PH_SETUP && !W.ready_sent && W.logged_in == W.nconns) {
        W.ready_sent = 1;
        W.phase = PH_WAIT;
        rec_write(REC_READY, NULL, 0);
    } else if (bench.scenario == SC_CONNS && W.phase == PH_RUN && !W.phase_sent &&
               W.logged_in + W.failed == W.nconns) {
        uint64_t u, s;
        bst_cpu_ns(&u, &s);
        W.res.cpu_user_ns = u - W.cpu_u0;
        W.res.cpu_sys_ns = s - W.cpu_s0;
        W.res.t_last_ns = bst_now_ns();
        W.phase_sent = 1;
        W.phase = PH_HOLD;
        rec_write(REC_PHASE, NULL, 0);
    }
}

static void storm_next(struct wconn *wc);

static void on_login_ack(struct wconn *wc, const struct bn_fields *f,
                         const char *frame, size_t len)
{
    uint64_t now = bst_now_ns();
    int64_t err = f->has_errno ? f->errno_ : -1;
    int in_window = now >= W.t_ms && now < W.t_me;

    W.pending -= wc->storm ? 0 : 1;
    if (err == 0) {
        if (f->token && f->token_len < sizeof wc->token) {
            memcpy(wc->token, f->token, f->token_len);
            wc->token_len = f->token_len;
        }
        wc->retries = 0;
        wc->st = CS_READY;
        if (wc->storm) {
            W.tk.logins++;
            if (in_window) {
                W.res.logins_ok++;
                bst_hist_add(&W.res.hist, now - wc->t_req);
            }
            storm_next(wc);
            return;
        }
        W.logged_in++;
        W.tk.connected++;
        if (bench.scenario == SC_CONNS) {
            W.res.logins_ok++;
            W.tk.logins++;
            bst_hist_add(&W.res.hist, now - wc->t_req);
        }
        if (W.phase == PH_SETUP || (bench.scenario == SC_CONNS && W.phase == PH_RUN))
            connect_more();
        all_logged_in_check();
        return;
    }
    /* errno 2 (legacy) / 110 (protocol 2): still logged in from an earlier
     * connection whose close the server has not processed yet; or the
     * server's hashing queue is full: retry */
    int busy = bn_is_busy(f);
    if ((err == 2 || err == 110 || busy) && (busy || wc->retries < MAX_RETRIES)) {
        if (busy)
            W.res.busy++;
        wc->retries++;
        wc->st = CS_RETRY;
        wc->retry_at = now + RETRY_NS;
        W.pending += wc->storm ? 0 : 1;
        return;
    }
    if (wc->storm) {
        W.tk.errors++;
        if (in_window)
            W.res.logins_fail++;
        storm_next(wc);
        return;
    }
    fail("login of user %lld failed: %.*s (stale --ids file, wrong password, "
         "or a target without these users?)",
         (long long)bench.users[wc->slot].id, (int)len, frame);
}

static void on_frame(struct bn_conn *c, const char *f, size_t len)
{
    struct wconn *wc = c->data;
    struct bn_fields fl;
    if (bn_scan(f, len, &fl) < 0 || !fl.has_msgid) {
        W.res.errors++;
        W.tk.errors++;
        return;
    }
    switch (fl.msgid) {
    case 6:
    case 10:
        if (bench.scenario == SC_PAIRS || bench.scenario == SC_GROUP)
            on_delivery(wc, &fl);
        else
            W.res.errors++;
        return;
    case 2:
        if (wc->st == CS_LOGIN)
            on_login_ack(wc, &fl, f, len);
        return;
    case 11:
        if (bench.durable)
            on_durable_ack(wc, &fl);
        return;
    default:
        return; /* acks of logouts, notices */
    }
}

/* ---- connections ---------------------------------------------------------- */

static void conn_dead(struct wconn *wc, const char *why, int status)
{
    if (wc->st == CS_DEAD)
        return;
    if (wc->st == CS_CONNECTING || wc->st == CS_LOGIN || wc->st == CS_RETRY)
        if (!wc->storm)
            W.pending--;
    if (W.phase == PH_SETUP)
        fail("user %lld: %s: %s", (long long)bench.users[wc->slot].id, why,
             uv_strerror(status));
    if (W.res.errors == 0)
        fprintf(stderr, "chat-bench[worker %d]: user %lld: %s: %s (further "
                "connection errors are only counted)\n", W.index,
                (long long)bench.users[wc->slot].id, why, uv_strerror(status));
    int was_ready = wc->st == CS_READY;
    wc->st = CS_DEAD;
    W.res.errors++;
    W.tk.errors++;
    if (bench.scenario == SC_CONNS && !W.phase_sent && !was_ready) {
        W.failed++;
        all_logged_in_check();
    }
    bn_close(&wc->c, NULL);
}

static void on_error(struct bn_conn *c, int status)
{
    conn_dead(c->data, W.phase >= PH_DRAIN ? "closed" : "connection lost", status);
}

static void on_connect(struct bn_conn *c, int status)
{
    struct wconn *wc = c->data;
    if (status < 0) {
        conn_dead(wc, "connect failed", status);
        return;
    }
    if (wc->storm && bench.handshakes) {
        /* --handshakes: the cycle ends when the transport is up */
        uint64_t now = bst_now_ns();
        W.tk.logins++;
        if (now >= W.t_ms && now < W.t_me) {
            W.res.logins_ok++;
            bst_hist_add(&W.res.hist, now - wc->t_req);
        }
        wc->st = CS_READY;
        storm_next(wc);
        return;
    }
    send_login(wc);
}

static void send_login(struct wconn *wc)
{
    const struct bench_user *u = &bench.users[wc->slot];
    struct bn_buf *b = bn_out(&wc->c);
    if (bench.resume || bench.durable) {
        bn_buf_add(b, "{\"msgid\":1,\"proto\":2,\"id\":", 26);
        bn_buf_addi(b, u->id);
        if (wc->token_len) {
            bn_buf_add(b, ",\"token\":\"", 10);
            bn_buf_add(b, wc->token, wc->token_len);
            bn_buf_addc(b, '"');
        } else {
            bn_buf_add(b, ",\"password\":", 12);
            bn_buf_addjs(b, u->pass, strlen(u->pass));
        }
    } else {
        bn_buf_add(b, "{\"msgid\":1,\"id\":", 16);
        bn_buf_addi(b, u->id);
        bn_buf_add(b, ",\"password\":", 12);
        bn_buf_addjs(b, u->pass, strlen(u->pass));
    }
    bn_buf_add(b, "}", 2); /* with the NUL */
    wc->st = CS_LOGIN;
    if (!wc->storm || !wc->t_req)
        wc->t_req = bst_now_ns();
}

static void conn_start(struct wconn *wc)
{
    struct bn_buf keep[3] = {wc->c.out, wc->c.wbuf, wc->c.in};
    memset(&wc->c, 0, sizeof wc->c);
    /* reuse the buffers of an earlier connection of this user */
    wc->c.out = keep[0];
    wc->c.wbuf = keep[1];
    wc->c.in = keep[2];
    wc->c.out.len = wc->c.wbuf.len = wc->c.in.len = 0;
    wc->c.on_frame = on_frame;
    wc->c.on_connect = on_connect;
    wc->c.on_error = on_error;
    wc->c.data = wc;
    wc->st = CS_CONNECTING;
    if (!wc->storm) {
        wc->t_req = bst_now_ns(); /* a storm cycle started in storm_next */
        W.pending++;
    }
    int r = bn_connect(&W.net, &wc->c,
                       (const struct sockaddr *)&bench.targets[bm_target_of(wc->slot)],
                       &bench.target_xp[bm_target_of(wc->slot)]);
    if (r < 0)
        conn_dead(wc, "connect", r);
}

/* Start connections up to the concurrency limit. */
static void connect_more(void)
{
    while (W.next_connect < W.nconns && W.pending < bench.concurrency)
        conn_start(&W.conns[W.next_connect++]);
}

/* ---- login storm ---------------------------------------------------------- */

static void storm_closed(uv_handle_t *h)
{
    struct wconn *wc = ((struct bn_conn *)h->data)->data;
    if (W.stopped) {
        wc->st = CS_DEAD;
        return;
    }
    conn_start(wc);
}

/* Next cycle of a storm connection: legacy LOGINOUT + LOGIN on the same
 * connection; resume: reconnect and log in with the token (a logout would
 * revoke it). */
static void storm_next(struct wconn *wc)
{
    if (W.stopped)
        return;
    wc->t_req = bst_now_ns();
    if (bench.resume || bench.handshakes) {
        wc->st = CS_CONNECTING;
        bn_close(&wc->c, storm_closed);
        return;
    }
    struct bn_buf *b = bn_out(&wc->c);
    bn_buf_add(b, "{\"msgid\":3,\"id\":", 16);
    bn_buf_addi(b, bench.users[wc->slot].id);
    bn_buf_add(b, "}", 2);
    send_login(wc);
}

/* ---- phases --------------------------------------------------------------- */

static void finish(void)
{
    W.phase = PH_DONE;
    for (int i = 0; i < W.nsenders; i++) {
        struct sender *s = &W.senders[i];
        W.res.sent += s->sent;
        W.res.expected += s->sent * (uint64_t)(bench.scenario == SC_GROUP
                                                   ? bench.group_size - 1 : 1);
    }
    rec_write(REC_RESULT, &W.res, sizeof W.res);
    _exit(0);
}

static int drained(void)
{
    for (int i = 0; i < W.nsenders; i++)
        if (W.senders[i].done < W.senders[i].sent && W.senders[i].wc->st == CS_READY)
            return 0;
    for (int i = 0; i < W.nconns; i++)
        if (W.conns[i].storm && W.conns[i].st != CS_READY && W.conns[i].st != CS_DEAD)
            return 0;
    return 1;
}

static void phase_cb(uv_timer_t *t);

static void arm_phase(uint64_t at_ns)
{
    uint64_t now = bst_now_ns();
    uint64_t ms = at_ns > now ? (at_ns - now + 999999) / 1000000 : 0;
    uv_timer_start(&W.phase_timer, phase_cb, ms, 0);
}

static void phase_cb(uv_timer_t *t)
{
    uint64_t now = bst_now_ns();
    (void)t;
    if (W.phase == PH_WAIT && now >= W.t0) {
        W.phase = PH_RUN;
        if (bench.scenario == SC_CONNS) {
            bst_cpu_ns(&W.cpu_u0, &W.cpu_s0);
            W.res.t_first_ns = now;
            connect_more();
            if (W.nconns == 0)
                all_logged_in_check();
            return;
        }
        for (int i = 0; i < W.nsenders; i++)
            sender_pump(&W.senders[i]);
        if (bench.rate > 0 && W.nsenders) {
            W.pace_last = now;
            uv_timer_start(&W.pace, pace_cb, 1, 1);
        }
        if (bench.scenario == SC_LOGIN)
            for (int i = 0; i < W.nconns; i++) {
                W.conns[i].storm = 1;
                storm_next(&W.conns[i]);
            }
        arm_phase(W.t_ms);
        return;
    }
    if (W.phase == PH_RUN && !W.measuring && now >= W.t_ms) {
        W.measuring = 1;
        bst_cpu_ns(&W.cpu_u0, &W.cpu_s0);
        arm_phase(W.t_me);
        return;
    }
    if (W.phase == PH_RUN && W.measuring && now >= W.t_me) {
        uint64_t u, s;
        bst_cpu_ns(&u, &s);
        W.res.cpu_user_ns = u - W.cpu_u0;
        W.res.cpu_sys_ns = s - W.cpu_s0;
        W.stopped = 1;
        W.phase = PH_DRAIN;
        W.t_drain_end = now + (uint64_t)(bench.drain_s * 1e9);
        return;
    }
    arm_phase(W.phase == PH_RUN ? (W.measuring ? W.t_me : W.t_ms) : W.t0);
}

static void tick_cb(uv_timer_t *t)
{
    uint64_t now = bst_now_ns();
    (void)t;
    refresh_time();
    for (int i = 0; i < W.nconns; i++) {
        struct wconn *wc = &W.conns[i];
        if (wc->st == CS_RETRY && now >= wc->retry_at && !wc->c.closing)
            send_login(wc);
    }
    if (bench.scenario == SC_CONNS ? W.phase == PH_RUN : W.phase == PH_SETUP)
        connect_more();
    if (W.phase == PH_DRAIN &&
        ((drained() && now - W.last_recv > QUIET_NS) || now >= W.t_drain_end))
        finish();
    if (now - W.last_tick_ns >= 1000000000ull) {
        W.last_tick_ns = now;
        rec_write(REC_TICK, &W.tk, sizeof W.tk);
    }
}

/* ---- commands from the parent -------------------------------------------- */

static void cmd_alloc(uv_handle_t *h, size_t sz, uv_buf_t *buf)
{
    (void)h;
    (void)sz;
    *buf = uv_buf_init(W.cmdbuf + W.cmdlen, (unsigned)(sizeof W.cmdbuf - W.cmdlen));
}

static void close_all_cb(uv_handle_t *h)
{
    (void)h;
}

static void cmd_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf)
{
    (void)st;
    (void)buf;
    if (n < 0)
        _exit(3); /* the parent is gone */
    W.cmdlen += (size_t)n;
    if (W.cmdlen < sizeof W.cmdbuf)
        return;
    struct bw_cmd cmd;
    memcpy(&cmd, W.cmdbuf, sizeof cmd);
    W.cmdlen = 0;
    if (cmd.type == CMD_GO) {
        W.t0 = cmd.t0_ns;
        W.t_ms = W.t0 + (uint64_t)(bench.warmup_s * 1e9);
        W.t_me = W.t_ms + (uint64_t)(bench.duration_s * 1e9);
        arm_phase(W.t0);
    } else if (cmd.type == CMD_STOP) {
        /* conns: the parent has read the server's RSS; close and report */
        W.stopped = 1;
        W.phase = PH_DONE;
        for (int i = 0; i < W.nconns; i++)
            if (W.conns[i].st != CS_DEAD && W.conns[i].c.net && !W.conns[i].c.closing)
                bn_close(&W.conns[i].c, close_all_cb);
        finish();
    }
}

/* ---- building the worker's share ------------------------------------------ */

static void make_prefix(struct sender *s, int slot, int64_t to, int group)
{
    const struct bench_user *u = &bench.users[slot];
    struct bn_buf *b = &s->prefix;
    bn_buf_add(b, group ? "{\"msgid\":10,\"id\":" : "{\"msgid\":6,\"id\":",
               group ? 17 : 16);
    bn_buf_addi(b, u->id);
    bn_buf_add(b, ",\"name\":", 8);
    bn_buf_addjs(b, u->name, strlen(u->name));
    bn_buf_add(b, group ? ",\"groupid\":" : ",\"toid\":", group ? 11 : 8);
    bn_buf_addi(b, to);
    bn_buf_add(b, ",\"msg\":\"", 8);
}

static void build_pairs(void)
{
    int mine = 0;
    for (int p = W.index; p < bench.pairs; p += W.count)
        mine++;
    W.nconns = 2 * mine;
    W.nsenders = mine;
    W.conns = bx_calloc((size_t)W.nconns, sizeof *W.conns);
    W.senders = bx_calloc((size_t)mine, sizeof *W.senders);
    int k = 0;
    for (int p = W.index; p < bench.pairs; p += W.count, k++) {
        struct wconn *snd = &W.conns[2 * k], *rcv = &W.conns[2 * k + 1];
        snd->slot = 2 * p;
        rcv->slot = 2 * p + 1;
        rcv->peer = k;
        snd->peer = k;
        rcv->streams = bx_calloc(1, sizeof *rcv->streams);
        struct sender *s = &W.senders[k];
        if (bench.durable)
            durable_ring(s);
        s->wc = snd;
        s->uid = bench.users[2 * p].id;
        s->credits = bench.window;
        make_prefix(s, 2 * p, bench.users[2 * p + 1].id, 0);
    }
}

static void build_group(void)
{
    int mine = 0;
    for (int m = W.index; m < bench.group_size; m += W.count)
        mine++;
    W.nconns = mine;
    W.conns = bx_calloc((size_t)mine, sizeof *W.conns);
    W.g2l = bx_calloc((size_t)bench.senders, sizeof *W.g2l);
    for (int i = 0; i < bench.senders; i++)
        W.g2l[i] = -1;
    int nsend = 0;
    for (int m = W.index; m < bench.senders; m += W.count)
        nsend++;
    W.nsenders = nsend;
    W.senders = bx_calloc((size_t)(nsend ? nsend : 1), sizeof *W.senders);
    uint32_t ring = 1;
    while (ring < (uint32_t)bench.window * 4)
        ring <<= 1;
    int k = 0, j = 0;
    for (int m = W.index; m < bench.group_size; m += W.count, k++) {
        struct wconn *wc = &W.conns[k];
        wc->slot = m;
        wc->streams = bx_calloc((size_t)bench.senders, sizeof *wc->streams);
        if (m < bench.senders) {
            struct sender *s = &W.senders[j];
            if (bench.durable)
                durable_ring(s);
            s->wc = wc;
            s->uid = bench.users[m].id;
            s->credits = bench.window;
            s->need = mine - 1;
            s->ring = bx_calloc(ring, sizeof *s->ring);
            s->mask = ring - 1;
            make_prefix(s, m, bench.group_id, 1);
            W.g2l[m] = j++;
        }
    }
}

static void build_plain(int total)
{
    int mine = 0;
    for (int i = W.index; i < total; i += W.count)
        mine++;
    W.nconns = mine;
    W.conns = bx_calloc((size_t)(mine ? mine : 1), sizeof *W.conns);
    int k = 0;
    for (int i = W.index; i < total; i += W.count)
        W.conns[k++].slot = i;
}

void bw_main(int index, int count, int cmd_fd, int rec_fd)
{
    memset(&W, 0, sizeof W);
    W.index = index;
    W.count = count;
    W.rec_fd = rec_fd;
    W.t0 = W.t_ms = W.t_me = UINT64_MAX;
    uv_loop_init(&W.loop);
    bn_net_init(&W.net, &W.loop);
    W.net.src_ips = bench.src_ips;
    W.net.src_next = (unsigned)index;
    switch (bench.scenario) {
    case SC_PAIRS:
        build_pairs();
        break;
    case SC_GROUP:
        build_group();
        break;
    case SC_CONNS:
        build_plain(bench.conns);
        break;
    case SC_LOGIN:
        build_plain(bench.login_conns);
        break;
    case SC_FAILOVER: /* runs in the parent (failover.c), never here */
        break;
    }
    for (int i = 0; i < W.nconns; i++)
        W.conns[i].w = &W;
    refresh_time();
    uv_pipe_init(&W.loop, &W.cmd, 0);
    if (uv_pipe_open(&W.cmd, cmd_fd) < 0)
        fail("cannot open the command pipe");
    uv_read_start((uv_stream_t *)&W.cmd, cmd_alloc, cmd_read);
    uv_timer_init(&W.loop, &W.tick);
    uv_timer_init(&W.loop, &W.phase_timer);
    uv_timer_init(&W.loop, &W.pace);
    uv_timer_start(&W.tick, tick_cb, TICK_MS, TICK_MS);
    W.last_tick_ns = bst_now_ns();
    if (bench.scenario == SC_CONNS) {
        W.phase = PH_WAIT;
        W.ready_sent = 1;
        rec_write(REC_READY, NULL, 0);
    } else {
        W.phase = PH_SETUP;
        connect_more();
        all_logged_in_check();
    }
    uv_run(&W.loop, UV_RUN_DEFAULT);
    fail("worker loop ended");
}
