/*
 * ratelimit.c - token-bucket rate limits ([limits] in chat.conf).
 *
 * A bucket holds up to `burst` tokens and gains `rate` a second; a request
 * costs one token (bytes: its length).  Buckets are kept per session
 * (messages, bytes, and one per class of msgids), per user (messages, on
 * whichever node holds the user) and per client address (IPv4 whole, IPv6
 * per /64, the keys net.c counts connections by: new connections,
 * registrations, failed logins).  Addresses in [server] trusted are exempt
 * from all of them; net_session_addr_key() says which sessions those are.
 *
 * The check runs in dispatch before the handler (rl_check), one map lookup
 * and a few multiplications per request.  What a client over a limit gets:
 *   - protocol 2: errno 125 "rate limited" with retry_after_ms, the request
 *     is not executed; reads pause for min(retry_after_ms, 1 s) so a client
 *     ignoring the hint costs nothing more (frames already read are answered
 *     125 each);
 *   - legacy (no error reply in the seed protocol): the request runs, the
 *     bucket goes into debt, and the session's reads stop (uv_read_stop,
 *     so the kernel's receive window fills and the client's writes block)
 *     until every bucket is out of debt.  Nothing is dropped; what one read
 *     brought in (at most 64 KiB) runs, then the client waits it off.
 *
 * A user has one session in the cluster at a time (bus_claim), so the user
 * bucket lives on the node holding the session; what crosses nodes is its
 * state when the user moves: once the bucket is below half, the wall-clock
 * time at which it will be full again is written to Redis (with that
 * expiry; at most every 250 ms per user until the bucket is empty, then on
 * every request it pays for), and a session that starts sending as
 * a user reads it back and starts no fuller than that.  A reconnect to
 * another node so finds the bucket as it left it, one round trip late.
 * Without Redis the bucket is per node.
 *
 * Entries are created on first use and swept every two seconds: a session's
 * when the session is gone, a user's or an address's when its buckets are
 * full again (a full bucket is the same as none).  All on the loop thread.
 *
 * The [limits] syntax and the bucket arithmetic are in rlbucket.c, a leaf
 * that conf.c can call; this file is in the sessions layer (it reads net's
 * sessions, asks the bus, answers through dispatch), and net reaches
 * rl_conn only through the callback main.c registers (net_on_admit).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core.h"

#define RL_SWEEP_MS 2000
#define RL_P2_PAUSE_MAX_MS 1000

enum rl_kind {
    RL_K_SESS_MSGS, RL_K_SESS_BYTES, RL_K_USER, RL_K_CONNS, RL_K_REGS, RL_K_FAILS,
    RL_K_N
};
static const char *const kind_names[RL_K_N] = {
    "session_msgs", "session_bytes", "user_msgs", "addr_conns", "addr_regs",
    "addr_login_failures"};

struct rl_sess {
    uint64_t sid;
    int64_t uid;             /* the user it last sent as (0: none) */
    struct rl_bucket msgs, bytes, cls[RL_CLASS_MAX];
    uint64_t resume_at;      /* paused: uv_now() to start reading again */
    struct rl_sess *pprev, *pnext;
    unsigned paused : 1;
};

struct rl_user {
    struct rl_bucket msgs;
    uint64_t pushed_at;      /* uv_now() of the last write to Redis */
};

struct rl_addr {
    struct rl_bucket conns, regs, fails;
};

#define RL_COUNT_NAMES 32
static struct {
    uv_loop_t *loop;
    struct rl_conf c;
    int on;                  /* some limit is configured */
    struct map sess, users, addr4, addr6;
    uv_timer_t sweep, resume;
    struct rl_sess *paused;
    uint64_t limited[RL_K_N];
    struct {                 /* by class name: survive reloads */
        char name[RL_NAME_MAX];
        uint64_t n;
    } cls_count[RL_COUNT_NAMES];
} rl;

/* ---- entries ------------------------------------------------------------ */

static struct rl_sess *sess_get(struct chat_session *s)
{
    uint64_t sid = net_session_id(s);
    struct rl_sess *e = map_get(&rl.sess, (int64_t)sid);
    if (e)
        return e;
    if (!(e = mem_calloc(1, sizeof *e)) || map_put(&rl.sess, (int64_t)sid, e)) {
        mem_free(e);
        return NULL;
    }
    e->sid = sid;
    return e;
}

static void *entry_get(struct map *m, int64_t key, size_t size)
{
    void *e = map_get(m, key);
    if (e)
        return e;
    if (!(e = mem_calloc(1, size)) || map_put(m, key, e)) {
        mem_free(e);
        return NULL;
    }
    return e;
}

static struct rl_addr *addr_get(int v6, int64_t key)
{
    return entry_get(v6 ? &rl.addr6 : &rl.addr4, key, sizeof(struct rl_addr));
}

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* The user's bucket as another node left it: full at wall time full_at. */
static void on_user_state(int64_t uid, int64_t full_at, void *ud)
{
    struct rl_user *u = map_get(&rl.users, uid);
    const struct rl_rate *r = &rl.c.user_msgs;
    int64_t left = full_at - (int64_t)wall_ms();
    double tokens;

    (void)ud;
    LOGD("user %lld: bucket full again in %lld ms (Redis)", (long long)uid, (long long)left);
    if (!u || left <= 0 || r->rate <= 0)
        return;
    rl_bucket_refill(&u->msgs, r, uv_now(rl.loop));
    tokens = r->burst - (double)left * r->rate / 1000.0;
    if (tokens < u->msgs.tokens)
        u->msgs.tokens = tokens;
}

/* Tell the other nodes how empty the user's bucket is (see the top). */
static void user_push(int64_t uid, struct rl_user *u, uint64_t now)
{
    const struct rl_rate *r = &rl.c.user_msgs;
    double ms;

    if (!u || u->msgs.tokens >= r->burst / 2 ||
        (u->pushed_at && now - u->pushed_at < 250 && u->msgs.tokens >= 1))
        return;
    u->pushed_at = now;
    ms = (r->burst - u->msgs.tokens) * 1000.0 / r->rate;
    bus_rl_user_set(uid, (int64_t)wall_ms() + (int64_t)ms, (int64_t)ms + 1);
}

/* ---- pausing reads ------------------------------------------------------ */

static void on_resume(uv_timer_t *t);

/* The timer runs at the first resume_at, and at least once a second while
 * any session waits (net_read_pause keeps its request clock still). */
static void resume_schedule(void)
{
    uint64_t first = UINT64_MAX, now = uv_now(rl.loop), in;
    for (struct rl_sess *e = rl.paused; e; e = e->pnext)
        if (e->resume_at < first)
            first = e->resume_at;
    if (first == UINT64_MAX) {
        uv_timer_stop(&rl.resume);
        return;
    }
    in = first > now ? first - now : 0;
    uv_timer_start(&rl.resume, on_resume, in < 1000 ? in : 1000, 0);
}

static void unpause(struct rl_sess *e)
{
    if (!e->paused)
        return;
    if (e->pprev)
        e->pprev->pnext = e->pnext;
    else
        rl.paused = e->pnext;
    if (e->pnext)
        e->pnext->pprev = e->pprev;
    e->pprev = e->pnext = NULL;
    e->paused = 0;
}

static void on_resume(uv_timer_t *t)
{
    uint64_t now = uv_now(t->loop);
    struct rl_sess *e = rl.paused, *next;

    for (; e; e = next) {
        struct chat_session *s = net_session_get(e->sid);
        next = e->pnext;
        if (s && e->resume_at > now) {
            net_read_pause(s, 1); /* still waiting: restamp its request clock */
            continue;
        }
        unpause(e);
        if (s)
            net_read_pause(s, 0);
    }
    resume_schedule();
}

static void pause_for(struct chat_session *s, struct rl_sess *e, uint64_t ms)
{
    uint64_t at = uv_now(rl.loop) + ms;
    if (e->paused && e->resume_at >= at)
        return;
    if (!e->paused) {
        if (net_read_pause(s, 1))
            return;
        e->paused = 1;
        e->pprev = NULL;
        e->pnext = rl.paused;
        if (rl.paused)
            rl.paused->pprev = e;
        rl.paused = e;
    }
    e->resume_at = at;
    resume_schedule();
}

/* ---- the check ---------------------------------------------------------- */

struct need {
    struct rl_bucket *b;
    const struct rl_rate *r;
    double cost;
    int take;                /* 0: only waits (failed logins) */
    int kind;                /* enum rl_kind, or RL_K_N + class index */
};

static const struct rl_class *class_of(int msgid, size_t *idx)
{
    for (size_t i = 0; i < rl.c.ncls; i++)
        for (size_t j = 0; j < rl.c.cls[i].nmsgids; j++)
            if (rl.c.cls[i].msgids[j] == msgid) {
                *idx = i;
                return &rl.c.cls[i];
            }
    return NULL;
}

static void count_limited(int kind)
{
    if (kind < RL_K_N) {
        rl.limited[kind]++;
        return;
    }
    const char *name = rl.c.cls[kind - RL_K_N].name;
    for (size_t i = 0; i < RL_COUNT_NAMES; i++) {
        if (!rl.cls_count[i].name[0])
            snprintf(rl.cls_count[i].name, RL_NAME_MAX, "%s", name);
        if (!strcmp(rl.cls_count[i].name, name)) {
            rl.cls_count[i].n++;
            return;
        }
    }
}

/* The buckets a request from s draws on; their count. */
static size_t needs_of(struct chat_session *s, struct rl_sess *e, int msgid, size_t len,
                       struct need *n)
{
    size_t k = 0, ci;
    const struct rl_class *cl;
    int64_t uid = net_session_user(s), key;
    int v6;

    n[k++] = (struct need){&e->msgs, &rl.c.session_msgs, 1, 1, RL_K_SESS_MSGS};
    n[k++] = (struct need){&e->bytes, &rl.c.session_bytes, (double)len, 1, RL_K_SESS_BYTES};
    if ((cl = class_of(msgid, &ci)))
        n[k++] = (struct need){&e->cls[ci], &cl->r, 1, 1, RL_K_N + (int)ci};
    if (uid > 0 && rl.c.user_msgs.rate > 0) {
        struct rl_user *u = entry_get(&rl.users, uid, sizeof *u);
        if (u)
            n[k++] = (struct need){&u->msgs, &rl.c.user_msgs, 1, 1, RL_K_USER};
        if (e->uid != uid && u && bus_configured())
            bus_rl_user_get(uid, on_user_state, NULL);
    }
    e->uid = uid;
    if ((msgid == CHAT_MSG_REG || msgid == CHAT_MSG_LOGIN) &&
        net_session_addr_key(s, &v6, &key) == 0) {
        struct rl_addr *a = addr_get(v6, key);
        if (a && msgid == CHAT_MSG_REG)
            n[k++] = (struct need){&a->regs, &rl.c.addr_regs, 1, 1, RL_K_REGS};
        else if (a)
            n[k++] = (struct need){&a->fails, &rl.c.addr_fails, 1, 0, RL_K_FAILS};
    }
    return k;
}

/* Answer a protocol-2 request over a limit: 125 with retry_after_ms. */
static void refuse_p2(struct chat_session *s, const struct chat_ack *ack, int kind,
                      uint64_t wait)
{
    cJSON *body = cJSON_CreateObject();
    char msg[96];

    snprintf(msg, sizeof msg, "rate limited (%s): retry after %llu ms",
             kind < RL_K_N ? kind_names[kind] : rl.c.cls[kind - RL_K_N].name,
             (unsigned long long)wait);
    if (body)
        cJSON_AddNumberToObject(body, "retry_after_ms", (double)wait);
    disp_reply(s, ack, CHAT_E_RATE_LIMITED, msg, body);
    cJSON_Delete(body);
}

int rl_check(struct chat_session *s, const struct chat_ack *ack, size_t len)
{
    struct need n[8];
    struct rl_sess *e;
    uint64_t now, wait = 0, w, debt = 0;
    size_t k;
    int worst = -1, v6;
    int64_t key;

    if (!rl.on || !rl.loop || net_session_addr_key(s, &v6, &key))
        return 0; /* trusted (or unknown) addresses are exempt */
    if (!(e = sess_get(s)))
        return 0; /* out of memory: let it through */
    now = uv_now(rl.loop);
    k = needs_of(s, e, ack->msgid, len, n);
    for (size_t i = 0; i < k; i++)
        if ((w = rl_bucket_wait(n[i].b, n[i].r, now, n[i].cost)) > wait)
            wait = w, worst = n[i].kind;
    if (worst >= 0)
        count_limited(worst);
    if (net_session_proto(s) == CHAT_PROTO_2 && wait) {
        LOGSD(s, "msgid %d rate limited: retry after %llu ms", ack->msgid,
              (unsigned long long)wait);
        refuse_p2(s, ack, worst, wait);
        pause_for(s, e, wait < RL_P2_PAUSE_MAX_MS ? wait : RL_P2_PAUSE_MAX_MS);
        return 1;
    }
    for (size_t i = 0; i < k; i++) {
        if (n[i].take)
            rl_bucket_take(n[i].b, n[i].r, now, n[i].cost);
        if (n[i].r->rate > 0 &&
            (w = rl_bucket_need(n[i].b, n[i].r, n[i].take ? 0 : 1)) > debt)
            debt = w;
        if (n[i].kind == RL_K_USER)
            user_push(net_session_user(s), map_get(&rl.users, net_session_user(s)), now);
    }
    if (debt && net_session_proto(s) != CHAT_PROTO_2) {
        if (!e->paused)
            LOGSD(s, "over a rate limit: reads paused for %llu ms",
                  (unsigned long long)debt);
        pause_for(s, e, debt);
    }
    return 0;
}

int rl_conn(int v6, int64_t key)
{
    struct rl_addr *a;
    uint64_t now;

    if (!rl.loop || rl.c.addr_conns.rate <= 0 || !(a = addr_get(v6, key)))
        return 0;
    now = uv_now(rl.loop);
    if (rl_bucket_wait(&a->conns, &rl.c.addr_conns, now, 1)) {
        rl.limited[RL_K_CONNS]++;
        return 1;
    }
    rl_bucket_take(&a->conns, &rl.c.addr_conns, now, 1);
    return 0;
}

void rl_login_failed(struct chat_session *s)
{
    struct rl_addr *a;
    int64_t key;
    int v6;

    if (!rl.loop || rl.c.addr_fails.rate <= 0 || net_session_addr_key(s, &v6, &key) ||
        !(a = addr_get(v6, key)))
        return;
    rl_bucket_take(&a->fails, &rl.c.addr_fails, uv_now(rl.loop), 1);
}

/* ---- sweeping, metrics, start and stop ---------------------------------- */

static int addr_full(struct rl_addr *a, uint64_t now)
{
    return rl_bucket_full(&a->conns, &rl.c.addr_conns, now) &&
           rl_bucket_full(&a->regs, &rl.c.addr_regs, now) &&
           rl_bucket_full(&a->fails, &rl.c.addr_fails, now);
}

static void sweep_map(struct map *m, int kind, uint64_t now)
{
    int64_t key;
    void *v;

    for (size_t it = 0; map_next(m, &it, &key, &v);) {
        int drop;
        if (kind == 0) {
            struct rl_sess *e = v;
            drop = !e->paused && !net_session_get(e->sid);
        } else if (kind == 1) {
            drop = rl_bucket_full(&((struct rl_user *)v)->msgs, &rl.c.user_msgs, now);
        } else {
            drop = addr_full(v, now);
        }
        if (drop) {
            map_del(m, key);
            mem_free(v); /* map.c allows deleting the entry just returned */
        }
    }
}

static void on_sweep(uv_timer_t *t)
{
    uint64_t now = uv_now(t->loop);
    sweep_map(&rl.sess, 0, now);
    sweep_map(&rl.users, 1, now);
    sweep_map(&rl.addr4, 2, now);
    sweep_map(&rl.addr6, 2, now);
}

static void rl_collect(struct metrics_out *o)
{
    metrics_out_family(o, "chatd_rate_limited_total",
                       "Requests and connections over a rate limit ([limits]), "
                       "by limit (a class: class.NAME).", METRICS_COUNTER);
    for (int k = 0; k < RL_K_N; k++)
        metrics_out_u64(o, "chatd_rate_limited_total", "limit", kind_names[k],
                        rl.limited[k]);
    for (size_t i = 0; i < RL_COUNT_NAMES && rl.cls_count[i].name[0]; i++) {
        char lv[RL_NAME_MAX + 8];
        snprintf(lv, sizeof lv, "class.%s", rl.cls_count[i].name);
        metrics_out_u64(o, "chatd_rate_limited_total", "limit", lv, rl.cls_count[i].n);
    }
}

void rl_apply_conf(const struct conf *c)
{
    const struct rl_conf *l = &c->limits;
    rl.c = *l;
    rl.on = l->session_msgs.rate > 0 || l->session_bytes.rate > 0 ||
            l->user_msgs.rate > 0 || l->addr_regs.rate > 0 || l->addr_fails.rate > 0 ||
            l->ncls > 0;
    /* class buckets are by position: a reload starts them afresh */
    for (size_t it = 0; rl.loop;) {
        int64_t key;
        void *v;
        if (!map_next(&rl.sess, &it, &key, &v))
            break;
        memset(((struct rl_sess *)v)->cls, 0, sizeof ((struct rl_sess *)v)->cls);
    }
}

void rl_start(uv_loop_t *loop, const struct conf *c)
{
    rl.loop = loop;
    map_init(&rl.sess);
    map_init(&rl.users);
    map_init(&rl.addr4);
    map_init(&rl.addr6);
    uv_timer_init(loop, &rl.sweep);
    uv_timer_init(loop, &rl.resume);
    uv_timer_start(&rl.sweep, on_sweep, RL_SWEEP_MS, RL_SWEEP_MS);
    uv_unref((uv_handle_t *)&rl.sweep);
    uv_unref((uv_handle_t *)&rl.resume);
    metrics_add_collector(rl_collect);
    rl_apply_conf(c);
}

static void free_all(struct map *m)
{
    int64_t key;
    void *v;
    for (size_t it = 0; map_next(m, &it, &key, &v);)
        mem_free(v);
    map_free(m);
}

void rl_stop(void)
{
    if (!rl.loop)
        return;
    uv_close((uv_handle_t *)&rl.sweep, NULL);
    uv_close((uv_handle_t *)&rl.resume, NULL);
    rl.paused = NULL;
    free_all(&rl.sess);
    free_all(&rl.users);
    free_all(&rl.addr4);
    free_all(&rl.addr6);
    rl.loop = NULL;
}
