/*
 * bus.c - the Redis bus: cross-node delivery, cluster-wide presence and
 * plugin broadcasts, on hiredis 0.14's async API driven by the libuv loop.
 *
 * Link.  Each node has an id (conf node_id, or "host-pid-random") and two
 * connections to Redis: `cmd` for commands and `sub`, subscribed to the
 * node's own channel "chatd:node:<id>" and to the shared "chatd:all" (a
 * subscribed connection can send nothing else).  They form one link: when
 * either fails both are dropped and reconnected, backing off from 100 ms
 * doubling to 5 s.  A command left unanswered for max(ttl/2, 2 s), seen on
 * two heartbeat ticks in a row, means a stalled server and drops the link
 * too.
 *
 * Keys.  Presence lives in Redis, not MySQL:
 *   chatd:user:<uid>   the id of the node holding the user
 *   chatd:hb:<node>    the node's heartbeat: SET EX ttl, refreshed every ttl/3
 *   chatd:held:<node>  the set of uids the node announced
 * A user is online only while its key names a node whose heartbeat exists,
 * so the users of a crashed node go offline within the TTL with no cleanup.
 *   chatd:dev:<uid>    multi-device users only (CHAT_LOGIN_MULTI): a hash
 *                      of node id -> the user's devices on that node
 *   chatd:kv:<plugin>:<key>  the plugins' key-value store (host kv_*, ABI
 *                      1.8): plain GET, SET PX, DEL; Redis expires them
 *
 * Scripts.  Each operation is one Lua script (SCRIPT LOAD on every connect,
 * then EVALSHA): atomic, one round trip.  claim: when the key names another
 * live node, refuse (CHAT_ERR_EXISTS) or, with replace, PUBLISH "K <uid>"
 * to that node (it closes its session as replaced) and take over; SET the
 * key, SADD the set.  release: DEL the key only if it still names this node;
 * SREM.  route: PUBLISH "D <uid> <json>" to the holder's channel and return
 * the subscribers reached, -1 when no live node holds the user.  presence:
 * 1/0 per uid.  sync, on every (re)connect: drop the keys this node's set
 * still names (left by a previous incarnation with the same id, or released
 * while Redis was down), refresh the heartbeat, re-announce every user
 * claimed here; users another live node took meanwhile are closed here.
 *
 * Multi-device.  A CHAT_LOGIN_MULTI claim counts the user's devices on the
 * live nodes of chatd:dev:<uid> (pruning dead nodes), refuses over the
 * login's maximum, else HINCRBYs this node's field; each release
 * decrements it (HDEL at 0); sync re-announces the absolute counts.  The
 * claims map marks such users (CLAIM_MULTI): a message for one goes to
 * every local session of the user (struct bus_calls next) and, quietly
 * ("E <uid> <json>": no undeliverable on the far side), to every other
 * live node of the hash; a routed message ("D") is published to every
 * holder and the reply says whether this node holds the user as well.
 * Presence and route read both the single key and the hash, so nothing
 * changes for users that never log in with CHAT_LOGIN_MULTI (their keys
 * and replies are today's, one HKEYS of an absent key aside).  Mixing
 * policies for one user across nodes is not arbitrated: configure one
 * policy cluster-wide.
 *
 * Delivery.  A live local session gets the message at once; otherwise route
 * publishes it and the node holding the user hands it to its session.
 * Nothing is dropped silently: no live holder, a PUBLISH that reached
 * nobody, an error, Redis down, the link dropping with the command in
 * flight (hiredis runs each pending callback with a NULL reply), or a
 * receiving node without the session - each ends in the undeliverable
 * callback (struct bus_calls).
 * Pub/sub is at most once: a node dying after PUBLISH counted it loses what
 * it had received.  A delivery with a ticket (host deliver_ex) completes
 * with CHAT_OK when the message went to a local session or a subscriber
 * counted the PUBLISH, else the ticket rides on the undeliverable event.  Broadcasts ("B <node>\n<plugin>\n<data>" on chatd:all)
 * fire on this node from a local queue and are skipped when they come back.
 * The core's own broadcasts (plugin name BUS_CORE, "@core": the admin
 * listener's kicks and notices) go to the one callback set with
 * bus_on_core() instead of the plugins' hooks.
 *
 * Without Redis (down, or no [redis] section: single node) local delivery
 * works, remote delivery is undeliverable, claims succeed locally (and the
 * next sync announces them), presence answers from local sessions and
 * broadcasts stay local.  Callbacks and events that do not come from a
 * reply run from a queue on the next loop turn (one item of defer.c drains
 * it), never inside the call.  Claims are counted per uid: every claim not refused must be
 * matched by one bus_release, so a same-node re-login survives the release
 * of the older session.  bus_claim arbitrates between nodes only; a local
 * session of the same user is the caller's to check.
 *
 * Upward calls.  The bus calls nothing above it: local sessions, the
 * undeliverable path, delivery outcomes, broadcasts to the plugins and the
 * references that keep a plugin's presence callback loaded are the
 * function pointers of struct bus_calls, registered by main.c (wire.c)
 * with bus_on(); its unit test registers its own.
 *
 * Key names are built inside the scripts, so this needs one Redis (not
 * Redis Cluster).  hiredis 0.14 has no allocator hooks (hiredisSetAllocators
 * came in 1.0): its contexts, buffers, replies and the adapter's poll
 * handles come from libc malloc, and it aborts on OOM.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <hiredis/adapters/libuv.h>

#include "core.h"

#define K_USER "chatd:user:"
#define K_HB "chatd:hb:"
#define K_HELD "chatd:held:"
#define K_DEV "chatd:dev:"
#define K_CHAN "chatd:node:"
#define K_ALL "chatd:all"
#define K_KV "chatd:kv:"
#define KV_KEY_MAX 200
#define KV_VAL_MAX 4096

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
#define STOP_TIMEOUT_MS 2000
#define SYNC_CHUNK 1000
#define NODE_ID_MAX 64

enum { SC_CLAIM, SC_RELEASE, SC_ROUTE, SC_PRESENCE, SC_SYNC, SC_CLAIM_MULTI,
       SC_RELEASE_MULTI, SC_N };

/* ARGV: uid, node, replace.  Returns 1 (claimed), 2 (claimed from a live
 * holder, which is told to close its session) or the live holder's id. */
static const char script_claim[] =
    "local uk = '" K_USER "' .. ARGV[1]\n"
    "local cur = redis.call('GET', uk)\n"
    "local r = 1\n"
    "if cur and cur ~= ARGV[2] then\n"
    "  if redis.call('EXISTS', '" K_HB "' .. cur) == 1 then\n"
    "    if ARGV[3] ~= '1' then return cur end\n"
    "    redis.call('PUBLISH', '" K_CHAN "' .. cur, 'K ' .. ARGV[1])\n"
    "    r = 2\n"
    "  end\n"
    "  redis.call('SREM', '" K_HELD "' .. cur, ARGV[1])\n"
    "end\n"
    "redis.call('SET', uk, ARGV[2])\n"
    "redis.call('SADD', '" K_HELD "' .. ARGV[2], ARGV[1])\n"
    "return r\n";

/* Multi-device (CHAT_LOGIN_MULTI).  ARGV: uid, node, max (0: none).  Counts
 * the user's devices on live nodes (a single-device holder counts one),
 * dropping the fields of dead nodes; over max returns 0, else adds this
 * device and returns the count, this one included. */
static const char script_claim_multi[] =
    "local dk = '" K_DEV "' .. ARGV[1]\n"
    "local n = 0\n"
    "local cur = redis.call('GET', '" K_USER "' .. ARGV[1])\n"
    "if cur and cur ~= ARGV[2] and\n"
    "   redis.call('EXISTS', '" K_HB "' .. cur) == 1 then n = 1 end\n"
    "local h = redis.call('HGETALL', dk)\n"
    "for i = 1, #h, 2 do\n"
    "  if h[i] == ARGV[2] or\n"
    "     redis.call('EXISTS', '" K_HB "' .. h[i]) == 1 then\n"
    "    n = n + tonumber(h[i + 1])\n"
    "  else\n"
    "    redis.call('HDEL', dk, h[i])\n"
    "  end\n"
    "end\n"
    "if tonumber(ARGV[3]) > 0 and n >= tonumber(ARGV[3]) then return 0 end\n"
    "redis.call('HINCRBY', dk, ARGV[2], 1)\n"
    "redis.call('SADD', '" K_HELD "' .. ARGV[2], ARGV[1])\n"
    "return n + 1\n";

/* ARGV: uid, node.  One device of the user on this node is gone. */
static const char script_release_multi[] =
    "local dk = '" K_DEV "' .. ARGV[1]\n"
    "if redis.call('HINCRBY', dk, ARGV[2], -1) <= 0 then\n"
    "  redis.call('HDEL', dk, ARGV[2])\n"
    "  redis.call('SREM', '" K_HELD "' .. ARGV[2], ARGV[1])\n"
    "end\n"
    "return 1\n";

/* ARGV: uid, node. */
static const char script_release[] =
    "local uk = '" K_USER "' .. ARGV[1]\n"
    "if redis.call('GET', uk) == ARGV[2] then redis.call('DEL', uk) end\n"
    "redis.call('SREM', '" K_HELD "' .. ARGV[2], ARGV[1])\n"
    "return 1\n";

/* ARGV: uid, json, node, skip, kind.  PUBLISHes "<kind> <uid> <json>" to
 * every live node holding the user (the single-device key and the devices
 * hash) but the calling one.  Returns the number of subscribers reached, -1
 * when no live node holds the user, or -2 - reached when the calling node
 * holds it too (it then delivers from this reply, in order with its other
 * routed messages); with skip = 1 the calling node is left out (it has
 * delivered to its own sessions already). */
static const char script_route[] =
    "local node, any, self, sent, seen = ARGV[3], 0, 0, 0, {}\n"
    "local function one(n)\n"
    "  if seen[n] then return end\n"
    "  seen[n] = true\n"
    "  if redis.call('EXISTS', '" K_HB "' .. n) == 0 then return end\n"
    "  if n == node then\n"
    "    if ARGV[4] ~= '1' then any, self = 1, 1 end\n"
    "    return\n"
    "  end\n"
    "  any = 1\n"
    "  sent = sent + redis.call('PUBLISH', '" K_CHAN "' .. n,\n"
    "                           ARGV[5] .. ' ' .. ARGV[1] .. ' ' .. ARGV[2])\n"
    "end\n"
    "local cur = redis.call('GET', '" K_USER "' .. ARGV[1])\n"
    "if cur then one(cur) end\n"
    "for _, n in ipairs(redis.call('HKEYS', '" K_DEV "' .. ARGV[1])) do\n"
    "  one(n)\n"
    "end\n"
    "if any == 0 then return -1 end\n"
    "if self == 1 then return -2 - sent end\n"
    "return sent\n";

/* ARGV: uids.  Returns 1/0 per uid. */
static const char script_presence[] =
    "local live, r = {}, {}\n"
    "for i = 1, #ARGV do\n"
    "  local cur = redis.call('GET', '" K_USER "' .. ARGV[i])\n"
    "  local on = 0\n"
    "  if cur then\n"
    "    if live[cur] == nil then\n"
    "      live[cur] = redis.call('EXISTS', '" K_HB "' .. cur)\n"
    "    end\n"
    "    on = live[cur]\n"
    "  end\n"
    "  if on == 0 then\n"
    "    for _, n in ipairs(redis.call('HKEYS', '" K_DEV "' .. ARGV[i])) do\n"
    "      if live[n] == nil then\n"
    "        live[n] = redis.call('EXISTS', '" K_HB "' .. n)\n"
    "      end\n"
    "      if live[n] == 1 then on = 1 break end\n"
    "    end\n"
    "  end\n"
    "  r[i] = on\n"
    "end\n"
    "return r\n";

/* ARGV: node, mode (start|more|stop), ttl, uids...  start/stop first drop
 * what the node's set still names; stop also drops the heartbeat.  A uid
 * given as "m<uid>:<n>" is a multi-device user with n devices here (never
 * lost).  Returns the uids held by another live node (not announced). */
static const char script_sync[] =
    "local node, mode = ARGV[1], ARGV[2]\n"
    "local set = '" K_HELD "' .. node\n"
    "if mode ~= 'more' then\n"
    "  for _, u in ipairs(redis.call('SMEMBERS', set)) do\n"
    "    local uk = '" K_USER "' .. u\n"
    "    if redis.call('GET', uk) == node then redis.call('DEL', uk) end\n"
    "    redis.call('HDEL', '" K_DEV "' .. u, node)\n"
    "  end\n"
    "  redis.call('DEL', set)\n"
    "end\n"
    "if mode == 'stop' then\n"
    "  redis.call('DEL', '" K_HB "' .. node)\n"
    "  return {}\n"
    "end\n"
    "redis.call('SET', '" K_HB "' .. node, '1', 'EX', ARGV[3])\n"
    "local lost = {}\n"
    "for i = 4, #ARGV do\n"
    "  local uk = '" K_USER "' .. ARGV[i]\n"
    "  local m, c = string.match(ARGV[i], '^m(%d+):(%d+)$')\n"
    "  local cur = not m and redis.call('GET', uk)\n"
    "  if m then\n"
    "    redis.call('HSET', '" K_DEV "' .. m, node, c)\n"
    "    redis.call('SADD', set, m)\n"
    "  elseif cur and cur ~= node and\n"
    "     redis.call('EXISTS', '" K_HB "' .. cur) == 1 then\n"
    "    lost[#lost + 1] = ARGV[i]\n"
    "  else\n"
    "    redis.call('SET', uk, node)\n"
    "    redis.call('SADD', set, ARGV[i])\n"
    "  end\n"
    "end\n"
    "return lost\n";

static const char *const scripts[SC_N] = {script_claim, script_release,
                                          script_route, script_presence,
                                          script_sync, script_claim_multi,
                                          script_release_multi};

enum req_kind {
    REQ_SCRIPT,     /* SCRIPT LOAD of scripts[idx] */
    REQ_HEARTBEAT,
    REQ_SYNC,
    REQ_DELIVER,    /* data: json; NULL reply -> undeliverable */
    REQ_CLAIM,      /* NULL reply -> CHAT_OK (local only) */
    REQ_RELEASE,
    REQ_PRESENCE,   /* NULL reply -> answer from local sessions */
    REQ_PUBLISH,    /* broadcast to the other nodes */
    REQ_LOCAL_BCAST, /* data: plugin NUL data; fire here */
    REQ_KV_GET,     /* plugin kv_get: NULL reply -> CHAT_ERR_UNAVAILABLE */
    REQ_KV_SET      /* kv_set, kv_del: nothing waits */
};

/* One command in flight on the cmd connection (doubly linked, oldest
 * first), or one completion queued for the next loop turn (next only).
 * Owned by the bus; freed by req_done. */
struct bus_req {
    struct bus_req *prev, *next;
    uint64_t id;            /* in flight: a sequence number */
    uint64_t sent_ms;
    uint64_t sent_ns;       /* uv_hrtime() when sent: the round trip */
    int kind;
    int idx;
    int flags;              /* REQ_CLAIM: CHAT_LOGIN_*; REQ_DELIVER: RQ_* */
    int64_t uid;
    void (*claim_cb)(int status, void *ud);
    void *ud;
    struct chat_plugin *plug;
    struct chat_delivery *ticket; /* REQ_DELIVER: a sender waits (or NULL) */
    chat_presence_cb pres_cb;
    chat_kv_cb kv_cb;
    int64_t *uids;          /* REQ_PRESENCE: n uids, then n online bytes */
    size_t n;
    size_t plen;            /* REQ_LOCAL_BCAST: length of the plugin name */
    size_t len;             /* bytes in data (NUL-terminated beyond) */
    char data[];
};

enum link_state { LINK_DOWN, LINK_CONNECTING, LINK_UP };

/* REQ_DELIVER flags: quiet deliveries (the copies for a multi-device
 * user's other nodes, echoes) never end as undeliverable */
#define RQ_QUIET 0x1
/* REQ_CLAIM: refused here, before asking Redis (too many devices) */
#define RQ_TOO_MANY 0x100

/* claims map values: the count, with this bit set for a multi-device user */
#define CLAIM_MULTI ((uintptr_t)1 << (sizeof(uintptr_t) * 8 - 1))

static struct {
    int started, stopping, in_stop, finished;
    int have_redis;
    uv_loop_t *loop;
    char node[NODE_ID_MAX + 1];
    char chan[sizeof(K_CHAN) + NODE_ID_MAX];
    char hbkey[sizeof(K_HB) + NODE_ID_MAX];
    char *host;             /* as configured */
    int numeric;            /* host is an IP address: no resolving */
    int port;
    int ttl_s;
    uint64_t stall_ms;      /* oldest unanswered command older: link dead */
    uint64_t seq;           /* ids of requests in flight */
    uint64_t suspect;       /* id of the request seen stalled at the last tick */
    int connect_suspect;    /* the connect was seen stalled at the last tick */
    /* the link */
    int link;
    redisAsyncContext *cmd, *sub;
    int scripts_ok, subs_ok;
    uint64_t connect_ms;
    uint64_t backoff_ms;
    int down_logged, ever_up;
    int resolving;
    uv_getaddrinfo_t gai;
    char sha[SC_N][41];
    /* handles */
    uv_timer_t tick, retry, stop_timer;
    struct defer_item drain; /* runs the completion queue on the next turn */
    int open_handles;
    /* requests */
    struct bus_req *fly_head, *fly_tail;
    struct bus_req *dq_head, *dq_tail;
    /* uid -> (void *)(uintptr_t) number of claims not yet released */
    struct map claims;
    /* uid -> (void *)(uintptr_t) deliveries routed through Redis and not yet
     * answered: while there are any, a new message for that user is routed
     * too, even when the user is local by now, so it cannot overtake them */
    struct map routing;
    int claim_devices;      /* for bus_claim_devices(), during a claim's cb */
} bus;

static void (*core_cb)(const char *data, size_t len);
static struct bus_calls up;

void bus_on(const struct bus_calls *calls) { up = *calls; }

static void up_ref(struct chat_plugin *p)
{
    if (up.ref)
        up.ref(p);
}

static void up_unref(struct chat_plugin *p)
{
    if (up.unref)
        up.unref(p);
}

static void up_undeliverable(int64_t uid, const char *json, size_t len,
                             struct chat_delivery *d)
{
    if (up.undeliverable)
        up.undeliverable(uid, json, len, d);
}

/* A broadcast, here or from another node: the core's own go to core_cb. */
static void fire_broadcast(const struct chat_ev_broadcast *ev)
{
    if (strcmp(ev->plugin, BUS_CORE) == 0) {
        if (core_cb != NULL)
            core_cb(ev->data, ev->len);
        return;
    }
    if (up.broadcast != NULL)
        up.broadcast(ev);
}

static void link_down(const char *why);
static void link_connect(void);
static void maybe_finish(void);

/* ---- requests ----------------------------------------------------------- */

static struct bus_req *req_new(int kind, size_t datalen)
{
    struct bus_req *r = mem_calloc(1, sizeof(*r) + datalen + 1);

    if (r != NULL)
        r->kind = kind;
    return r;
}

static void req_free(struct bus_req *r)
{
    mem_free(r->uids);
    mem_free(r);
}

static void fly_add(struct bus_req *r)
{
    r->id = ++bus.seq;
    r->sent_ms = uv_now(bus.loop);
    r->sent_ns = uv_hrtime();
    r->next = NULL;
    r->prev = bus.fly_tail;
    if (bus.fly_tail != NULL)
        bus.fly_tail->next = r;
    else
        bus.fly_head = r;
    bus.fly_tail = r;
}

static void fly_del(struct bus_req *r)
{
    if (r->prev != NULL)
        r->prev->next = r->next;
    else
        bus.fly_head = r->next;
    if (r->next != NULL)
        r->next->prev = r->prev;
    else
        bus.fly_tail = r->prev;
    r->prev = r->next = NULL;
}

/* Queue r to complete (as with a NULL reply) on the next loop turn. */
static void defer(struct bus_req *r)
{
    r->next = NULL;
    if (bus.dq_tail != NULL)
        bus.dq_tail->next = r;
    else
        bus.dq_head = r;
    bus.dq_tail = r;
    defer_add(&bus.drain);
}

/* ---- claims ------------------------------------------------------------- */

static uintptr_t claims_get(int64_t uid)
{
    return (uintptr_t)map_get(&bus.claims, uid) & ~CLAIM_MULTI;
}

/* 1 when uid's claims here are multi-device ones. */
static int claims_multi(int64_t uid)
{
    return ((uintptr_t)map_get(&bus.claims, uid) & CLAIM_MULTI) != 0;
}

static int claims_inc(int64_t uid, int multi)
{
    uintptr_t v = (uintptr_t)map_get(&bus.claims, uid) + 1;

    return map_put(&bus.claims, uid, (void *)(multi ? v | CLAIM_MULTI : v));
}

/* Returns the count left. */
static uintptr_t claims_dec(int64_t uid)
{
    uintptr_t v = (uintptr_t)map_get(&bus.claims, uid);

    if ((v & ~CLAIM_MULTI) <= 1) {
        map_del(&bus.claims, uid);
        return 0;
    }
    map_put(&bus.claims, uid, (void *)(v - 1)); /* existing key: no alloc */
    return (v - 1) & ~CLAIM_MULTI;
}

/* ---- completion --------------------------------------------------------- */

static struct chat_session *live_session(int64_t uid)
{
    return up.live != NULL ? up.live(uid) : NULL;
}

/* Hand json to every live local session of uid but except; how many took
 * it.  Without a next callback (one device per user), only the first. */
static size_t deliver_all(int64_t uid, const char *json, size_t len,
                          const struct chat_session *except)
{
    struct chat_session *s = live_session(uid), *next;
    size_t n = 0;

    for (; s != NULL; s = next) {
        next = up.next != NULL ? up.next(s) : NULL; /* delivering may close s */
        if (s != except && up.deliver(s, json, len) == CHAT_OK)
            n++;
    }
    return n;
}

static void deliver_local_or_undeliverable(int64_t uid, const char *json,
                                           size_t len)
{
    if (deliver_all(uid, json, len, NULL) > 0)
        return;
    up_undeliverable(uid, json, len, NULL);
}

static int is_error(const redisReply *rp)
{
    return rp != NULL && rp->type == REDIS_REPLY_ERROR;
}

static void done_presence(struct bus_req *r, const redisReply *rp)
{
    unsigned char *online = (unsigned char *)(r->uids + r->n);

    for (size_t i = 0; i < r->n; i++) {
        online[i] = live_session(r->uids[i]) != NULL;
        if (rp != NULL && rp->type == REDIS_REPLY_ARRAY && rp->elements == r->n
            && rp->element[i]->type == REDIS_REPLY_INTEGER
            && rp->element[i]->integer == 1)
            online[i] = 1;
    }
    r->pres_cb(CHAT_OK, r->uids, online, r->n, r->ud);
    up_unref(r->plug);
}

static void done_kv_get(struct bus_req *r, const redisReply *rp)
{
    if (rp != NULL && rp->type == REDIS_REPLY_STRING)
        r->kv_cb(CHAT_OK, rp->str, rp->len, r->ud);
    else if (rp != NULL && rp->type == REDIS_REPLY_NIL)
        r->kv_cb(CHAT_OK, NULL, 0, r->ud);
    else
        r->kv_cb(CHAT_ERR_UNAVAILABLE, NULL, 0, r->ud);
    up_unref(r->plug);
}

static void done_sync(const redisReply *rp)
{
    if (rp == NULL || rp->type != REDIS_REPLY_ARRAY)
        return;
    for (size_t i = 0; i < rp->elements; i++) {
        const redisReply *e = rp->element[i];
        struct chat_session *s;
        int64_t uid;

        if (e->type != REDIS_REPLY_STRING)
            continue;
        uid = strtoll(e->str, NULL, 10);
        LOGW("bus: user %" PRId64 " was taken by another node while the "
             "link was down; closing it here", uid);
        s = live_session(uid);
        if (s != NULL)
            up.close(s, CHAT_E_REPLACED, "logged in elsewhere");
    }
}

/* Returns why the link must go, or NULL. */
static const char *done_script(struct bus_req *r, const redisReply *rp)
{
    if (rp == NULL)
        return NULL;
    if (rp->type != REDIS_REPLY_STRING || rp->len != 40)
        return "SCRIPT LOAD failed";
    memcpy(bus.sha[r->idx], rp->str, 40);
    bus.sha[r->idx][40] = '\0';
    bus.scripts_ok++;
    return NULL;
}

static void maybe_up(void);

static size_t routing_count(int64_t uid)
{
    return (size_t)(uintptr_t)map_get(&bus.routing, uid);
}

static void routing_add(int64_t uid, int d)
{
    size_t n = routing_count(uid) + (size_t)(ptrdiff_t)d;
    if (n == 0)
        map_del(&bus.routing, uid);
    else if (map_put(&bus.routing, uid, (void *)(uintptr_t)n) != CHAT_OK)
        LOGW("bus: out of memory tracking routed messages for user %lld", (long long)uid);
}

/* A routed message's reply: -2 - n means this node holds the user too
 * (deliver here now, in order with its other routed messages) and n
 * subscribers counted the PUBLISH; n >= 0 only those; -1 nobody. */
static void done_deliver(struct bus_req *r, const redisReply *rp)
{
    long long v = rp != NULL && rp->type == REDIS_REPLY_INTEGER ? rp->integer : -1;
    long long sent = v <= -2 ? -2 - v : v;
    size_t here = 0;

    if (r->idx) /* it was counted as routed */
        routing_add(r->uid, -1);
    if (v <= -2)
        here = deliver_all(r->uid, r->data, r->len, NULL);
    if (sent >= 1)
        /* a subscriber counted the PUBLISH: delivered (at most once) */
        metrics_loop.deliveries[METRICS_ROUTE_REMOTE]++;
    if (here > 0 || sent >= 1) {
        if (r->ticket != NULL && up.delivered != NULL)
            up.delivered(r->ticket, CHAT_OK);
        return;
    }
    if (r->flags & RQ_QUIET)
        return;
    up_undeliverable(r->uid, r->data, r->len, r->ticket);
}

static void done_claim(struct bus_req *r, const redisReply *rp)
{
    int multi = (r->flags & CHAT_LOGIN_MULTI) != 0;

    if ((r->flags & RQ_TOO_MANY)
        || (multi && rp != NULL && rp->type == REDIS_REPLY_INTEGER
            && rp->integer == 0)) {
        claims_dec(r->uid);
        r->claim_cb(CHAT_ERR_BUSY, r->ud);
    } else if (rp != NULL && rp->type == REDIS_REPLY_STRING) {
        claims_dec(r->uid);
        r->claim_cb(CHAT_ERR_EXISTS, r->ud);
    } else {
        /* claimed, or local only (announced by the next sync) */
        bus.claim_devices = rp != NULL && rp->type == REDIS_REPLY_INTEGER
                                    && rp->integer >= 1
                                ? (int)rp->integer
                                : (int)claims_get(r->uid);
        r->claim_cb(CHAT_OK, r->ud);
        bus.claim_devices = 0;
    }
}

/* Finish r with the reply rp (NULL: failed, or never sent); frees r. */
static void req_done(struct bus_req *r, const redisReply *rp)
{
    const char *down = NULL;
    int kind = r->kind;

    if (is_error(rp)) {
        LOGW("bus: redis error: %s", rp->str);
        /* without its scripts, or with presence not announced, the link is
         * useless: reconnecting reloads them and syncs */
        if (strncmp(rp->str, "NOSCRIPT", 8) == 0 || r->kind == REQ_SYNC
            || r->kind == REQ_CLAIM)
            down = "script failed";
    }
    switch (r->kind) {
    case REQ_SCRIPT:
        down = done_script(r, rp);
        break;
    case REQ_SYNC:
        done_sync(rp);
        break;
    case REQ_DELIVER:
        done_deliver(r, rp);
        break;
    case REQ_CLAIM:
        done_claim(r, rp);
        break;
    case REQ_PRESENCE:
        done_presence(r, rp);
        break;
    case REQ_KV_GET:
        done_kv_get(r, rp);
        break;
    case REQ_LOCAL_BCAST: {
        struct chat_ev_broadcast ev = {sizeof(ev), r->data,
                                       r->data + r->plen + 1,
                                       r->len - r->plen - 1};
        fire_broadcast(&ev);
        break;
    }
    default: /* heartbeat, release, publish: nothing waits for them */
        break;
    }
    req_free(r);
    if (down != NULL)
        link_down(down);
    else if (kind == REQ_SCRIPT)
        maybe_up();
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct bus_req *r = privdata;

    (void)ac;
    fly_del(r);
    if (reply != NULL && r->kind >= 0 && r->kind < METRICS_BUS_N)
        metrics_observe(&metrics_loop.bus_rtt[r->kind],
                        (double)(uv_hrtime() - r->sent_ns) / 1e9);
    req_done(r, reply);
}

static void defer_run(void)
{
    struct bus_req *r = bus.dq_head, *next;

    bus.dq_head = bus.dq_tail = NULL;
    for (; r != NULL; r = next) {
        next = r->next;
        req_done(r, NULL);
    }
}

static void on_drain(struct defer_item *it)
{
    (void)it;
    defer_run(); /* what these queue runs on the next turn */
}

/* ---- sending ------------------------------------------------------------ */

/* Queue a command on cmd with r as its completion.  0, or -1 (r untouched:
 * the callback will not run). */
static int send_cmd(struct bus_req *r, const char *fmt, ...)
{
    va_list ap;
    int rc;

    if (bus.cmd == NULL)
        return -1;
    va_start(ap, fmt);
    rc = redisvAsyncCommand(bus.cmd, on_reply, r, fmt, ap);
    va_end(ap);
    if (rc != REDIS_OK)
        return -1;
    fly_add(r);
    return 0;
}

/* EVALSHA scripts[sc] with fixed string args and then uids as args; a uid
 * with mcount[i] > 0 goes as "m<uid>:<mcount[i]>" (sync). */
#define EVAL_ARG_MAX 44
static int send_eval_m(struct bus_req *r, int sc, const char *const *fixed,
                       size_t nfixed, const int64_t *uids, const size_t *mcount,
                       size_t n)
{
    size_t argc = 3 + nfixed + n;
    const char **argv = NULL;
    size_t *lens = NULL;
    char *digits = NULL;
    int rc = -1;

    if (bus.cmd == NULL || argc > INT32_MAX)
        return -1;
    argv = mem_malloc(argc * sizeof(*argv));
    lens = mem_malloc(argc * sizeof(*lens));
    digits = mem_malloc(n * EVAL_ARG_MAX + 1);
    if (argv == NULL || lens == NULL || digits == NULL)
        goto out;
    argv[0] = "EVALSHA";
    argv[1] = bus.sha[sc];
    argv[2] = "0";
    for (size_t i = 0; i < nfixed; i++)
        argv[3 + i] = fixed[i];
    for (size_t i = 0; i < n; i++) {
        char *d = digits + i * EVAL_ARG_MAX;
        if (mcount != NULL && mcount[i] > 0)
            snprintf(d, EVAL_ARG_MAX, "m%" PRId64 ":%zu", uids[i], mcount[i]);
        else
            snprintf(d, EVAL_ARG_MAX, "%" PRId64, uids[i]);
        argv[3 + nfixed + i] = d;
    }
    for (size_t i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    if (redisAsyncCommandArgv(bus.cmd, on_reply, r, (int)argc, argv, lens)
        != REDIS_OK)
        goto out;
    fly_add(r);
    rc = 0;
out:
    mem_free(argv);
    mem_free(lens);
    mem_free(digits);
    return rc;
}

static int send_eval(struct bus_req *r, int sc, const char *const *fixed,
                     size_t nfixed, const int64_t *uids, size_t n)
{
    return send_eval_m(r, sc, fixed, nfixed, uids, NULL, n);
}

/* Sync: mode "start" (with the first chunk of bound users) or "stop". */
static int send_sync(const char *mode)
{
    char ttl[16];
    const char *fixed[3] = {bus.node, mode, ttl};
    int64_t *uids = NULL;
    size_t *mcount = NULL;
    size_t n = 0, it = 0, off = 0;
    int64_t uid;
    void *v;
    int rc = -1;

    snprintf(ttl, sizeof(ttl), "%d", bus.ttl_s);
    if (strcmp(mode, "stop") != 0 && bus.claims.len > 0) {
        uids = mem_malloc(bus.claims.len * sizeof(*uids));
        mcount = mem_malloc(bus.claims.len * sizeof(*mcount));
        if (uids == NULL || mcount == NULL)
            goto out;
        while (map_next(&bus.claims, &it, &uid, &v)) {
            /* a multi-device user is announced with its device count */
            mcount[n] = ((uintptr_t)v & CLAIM_MULTI) ? (uintptr_t)v & ~CLAIM_MULTI : 0;
            uids[n++] = uid;
        }
    }
    do {
        size_t chunk = n - off < SYNC_CHUNK ? n - off : SYNC_CHUNK;
        struct bus_req *r = req_new(REQ_SYNC, 0);

        if (r == NULL || send_eval_m(r, SC_SYNC, fixed, 3, uids ? uids + off : NULL,
                                     mcount ? mcount + off : NULL, chunk)) {
            mem_free(r);
            goto out;
        }
        fixed[1] = "more";
        off += chunk;
    } while (off < n);
    rc = 0;
out:
    mem_free(uids);
    mem_free(mcount);
    return rc;
}

/* ---- the link ----------------------------------------------------------- */

static void maybe_up(void)
{
    if (bus.link != LINK_CONNECTING || bus.scripts_ok < SC_N || bus.subs_ok < 2)
        return;
    bus.link = LINK_UP;
    bus.backoff_ms = BACKOFF_MIN_MS;
    if (bus.ever_up)
        metrics_loop.bus_reconnects++;
    if (send_sync("start") != 0) {
        link_down("cannot queue the sync");
        return;
    }
    if (!bus.ever_up || bus.down_logged)
        LOGI("bus: redis %s:%d %s, node %s", bus.host, bus.port,
             bus.ever_up ? "reconnected" : "connected", bus.node);
    bus.ever_up = 1;
    bus.down_logged = 0;
}

static void handle_message(const char *p, size_t len)
{
    const char *end = p + len, *sp;
    int64_t uid;

    if (len < 3 || p[1] != ' ')
        goto bad;
    if (p[0] == 'B') {
        const char *nl1 = memchr(p + 2, '\n', len - 2), *nl2;
        struct chat_ev_broadcast ev = {sizeof(ev), NULL, NULL, 0};
        char *plugin;

        nl2 = nl1 ? memchr(nl1 + 1, '\n', (size_t)(end - nl1 - 1)) : NULL;
        if (nl2 == NULL)
            goto bad;
        if ((size_t)(nl1 - p - 2) == strlen(bus.node)
            && memcmp(p + 2, bus.node, (size_t)(nl1 - p - 2)) == 0)
            return; /* our own: fired locally already */
        plugin = mem_strndup(nl1 + 1, (size_t)(nl2 - nl1 - 1));
        if (plugin == NULL) {
            LOGE("bus: out of memory: broadcast dropped");
            return;
        }
        ev.plugin = plugin;
        ev.data = nl2 + 1;
        ev.len = (size_t)(end - nl2 - 1);
        fire_broadcast(&ev);
        mem_free(plugin);
        return;
    }
    uid = strtoll(p + 2, NULL, 10);
    if (p[0] == 'K') {
        struct chat_session *s = live_session(uid);
        if (s != NULL)
            up.close(s, CHAT_E_REPLACED, "logged in elsewhere");
        return;
    }
    if (p[0] == 'D' && (sp = memchr(p + 2, ' ', len - 2)) != NULL) {
        deliver_local_or_undeliverable(uid, sp + 1, (size_t)(end - sp - 1));
        return;
    }
    if (p[0] == 'E' && (sp = memchr(p + 2, ' ', len - 2)) != NULL) {
        /* a quiet copy (multi-device): nobody here, nothing to do */
        deliver_all(uid, sp + 1, (size_t)(end - sp - 1), NULL);
        return;
    }
bad:
    LOGW("bus: malformed bus message ignored (%zu bytes)", len);
}

static void on_sub(redisAsyncContext *ac, void *reply, void *privdata)
{
    const redisReply *rp = reply, *kind;

    (void)privdata;
    if (rp == NULL)
        return; /* the connection is going away */
    if (rp->type != REDIS_REPLY_ARRAY || rp->elements < 3) {
        if (ac == bus.sub)
            link_down(is_error(rp) ? rp->str : "SUBSCRIBE: unexpected reply");
        return;
    }
    kind = rp->element[0];
    if (kind->type != REDIS_REPLY_STRING)
        return;
    if (strcmp(kind->str, "message") == 0
        && rp->element[2]->type == REDIS_REPLY_STRING) {
        handle_message(rp->element[2]->str, rp->element[2]->len);
    } else if (strcmp(kind->str, "subscribe") == 0 && ac == bus.sub) {
        bus.subs_ok++;
        maybe_up();
    }
}

/* Forget ac (hiredis is freeing it); 1 if it was ours. */
static int forget_ctx(const redisAsyncContext *ac)
{
    if (ac == bus.cmd) {
        bus.cmd = NULL;
        return 1;
    }
    if (ac == bus.sub) {
        bus.sub = NULL;
        return 1;
    }
    return 0;
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    char why[128];

    if (status == REDIS_OK)
        return;
    snprintf(why, sizeof(why), "%s", ac->errstr ? ac->errstr : "connect failed");
    if (forget_ctx(ac))
        link_down(why);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    char why[128];

    snprintf(why, sizeof(why), "%s",
             status == REDIS_OK ? "connection closed"
             : ac->errstr       ? ac->errstr
                                : "connection lost");
    if (forget_ctx(ac) && !bus.stopping)
        link_down(why);
    else
        maybe_finish();
}

static redisAsyncContext *ctx_open(const char *ip, char *why, size_t whylen)
{
    redisAsyncContext *ac = redisAsyncConnect(ip, bus.port);

    if (ac == NULL) {
        snprintf(why, whylen, "out of memory");
        return NULL;
    }
    if (ac->err) {
        snprintf(why, whylen, "%s", ac->errstr);
        redisAsyncFree(ac);
        return NULL;
    }
    if (redisLibuvAttach(ac, bus.loop) != REDIS_OK) {
        /* the adapter sets its hooks before failing; its cleanup would
         * dereference the missing event data */
        memset(&ac->ev, 0, sizeof(ac->ev));
        snprintf(why, whylen, "cannot attach to the loop");
        redisAsyncFree(ac);
        return NULL;
    }
    redisEnableKeepAlive(&ac->c);
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    return ac;
}

static void link_open(const char *ip)
{
    char why[128] = "";

    bus.cmd = ctx_open(ip, why, sizeof(why));
    if (bus.cmd != NULL)
        bus.sub = ctx_open(ip, why, sizeof(why));
    if (bus.sub == NULL) {
        link_down(why);
        return;
    }
    /* Queued now, written once connected; SCRIPT LOAD comes first on cmd,
     * so every later EVALSHA on this connection finds its script. */
    for (int i = 0; i < SC_N; i++) {
        struct bus_req *r = req_new(REQ_SCRIPT, 0);
        if (r == NULL || send_cmd(r, "SCRIPT LOAD %s", scripts[i]) != 0) {
            mem_free(r);
            link_down("cannot queue SCRIPT LOAD");
            return;
        }
        r->idx = i;
    }
    if (redisAsyncCommand(bus.sub, on_sub, NULL, "SUBSCRIBE %s %s", bus.chan,
                          K_ALL) != REDIS_OK)
        link_down("cannot queue SUBSCRIBE");
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    char ip[64] = "";

    (void)req;
    bus.resolving = 0;
    if (status == 0 && res != NULL) {
        if (res->ai_family == AF_INET6)
            uv_ip6_name((const struct sockaddr_in6 *)res->ai_addr, ip, sizeof(ip));
        else
            uv_ip4_name((const struct sockaddr_in *)res->ai_addr, ip, sizeof(ip));
    }
    uv_freeaddrinfo(res);
    if (bus.stopping) {
        bus.link = LINK_DOWN;
        maybe_finish();
    } else if (status != 0 || ip[0] == '\0') {
        link_down(status ? uv_strerror(status) : "no address");
    } else {
        link_open(ip);
    }
}

static void link_connect(void)
{
    struct addrinfo hints;

    bus.link = LINK_CONNECTING;
    bus.scripts_ok = bus.subs_ok = 0;
    bus.connect_suspect = 0;
    bus.connect_ms = uv_now(bus.loop);
    if (bus.numeric) {
        link_open(bus.host);
        return;
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (uv_getaddrinfo(bus.loop, &bus.gai, on_resolved, bus.host, NULL,
                       &hints) != 0) {
        link_down("cannot resolve");
        return;
    }
    bus.resolving = 1;
}

static void on_retry(uv_timer_t *t)
{
    (void)t;
    if (!bus.stopping && bus.link == LINK_DOWN)
        link_connect();
}

/* Drop both connections (every pending callback runs with a NULL reply)
 * and, unless stopping, try again after the backoff. */
static void link_down(const char *why)
{
    redisAsyncContext *c = bus.cmd, *s = bus.sub;
    int was_up = bus.link == LINK_UP;

    bus.cmd = bus.sub = NULL;
    if (!bus.stopping)
        metrics_loop.bus_link_lost++;
    if (!bus.resolving)
        bus.link = LINK_DOWN;
    if (c != NULL)
        redisAsyncFree(c);
    if (s != NULL)
        redisAsyncFree(s);
    if (bus.stopping) {
        maybe_finish();
        return;
    }
    if (bus.resolving)
        return;
    if (was_up || !bus.down_logged) {
        LOGW("bus: redis %s:%d %s (%s); retrying", bus.host, bus.port,
             was_up ? "lost" : "unreachable", why);
        bus.down_logged = 1;
    } else {
        LOGD("bus: redis still unreachable (%s)", why);
    }
    uv_timer_start(&bus.retry, on_retry, bus.backoff_ms, 0);
    bus.backoff_ms = bus.backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS
                                                         : bus.backoff_ms * 2;
}

/* Every ttl/3: detect a stalled server, refresh the heartbeat.  A stall
 * counts only when seen on two ticks in a row, so that replies which are
 * merely unread because the loop itself was blocked get one poll phase to
 * arrive first. */
static void on_tick(uv_timer_t *t)
{
    uint64_t now = uv_now(t->loop);
    struct bus_req *r = bus.fly_head;
    int cmd_stalled = r != NULL && now - r->sent_ms > bus.stall_ms;
    int conn_stalled = bus.link == LINK_CONNECTING && !bus.resolving
                       && now - bus.connect_ms > bus.stall_ms;

    if ((cmd_stalled && r->id == bus.suspect)
        || (conn_stalled && bus.connect_suspect)) {
        bus.suspect = 0;
        link_down("no reply from the server");
        return;
    }
    bus.suspect = cmd_stalled ? r->id : 0;
    bus.connect_suspect = conn_stalled;
    if (bus.link != LINK_UP || (r = req_new(REQ_HEARTBEAT, 0)) == NULL)
        return;
    if (send_cmd(r, "SET %s 1 EX %d", bus.hbkey, bus.ttl_s) != 0)
        req_free(r);
}

/* ---- start and stop ----------------------------------------------------- */

static int node_char_ok(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')
           || (ch >= '0' && ch <= '9') || ch == '-' || ch == '_' || ch == '.'
           || ch == ':';
}

static int make_node_id(const char *conf_id)
{
    char host[40] = "";
    uint32_t rnd = 0;

    if (conf_id != NULL && conf_id[0] != '\0') {
        size_t n = strlen(conf_id);
        if (n > NODE_ID_MAX)
            return -1;
        for (size_t i = 0; i < n; i++)
            if (!node_char_ok(conf_id[i]))
                return -1;
        memcpy(bus.node, conf_id, n + 1);
        return 0;
    }
    if (gethostname(host, sizeof(host) - 1) != 0 || host[0] == '\0')
        snprintf(host, sizeof(host), "node");
    for (char *p = host; *p; p++)
        if (!node_char_ok(*p))
            *p = '_';
    if (getrandom(&rnd, sizeof(rnd), GRND_NONBLOCK) != sizeof(rnd))
        rnd = (uint32_t)uv_hrtime() ^ (uint32_t)getpid();
    snprintf(bus.node, sizeof(bus.node), "%s-%ld-%08" PRIx32, host,
             (long)getpid(), rnd);
    return 0;
}

/* The round-trip histograms are indexed by request kind. */
_Static_assert((int)REQ_SCRIPT == (int)METRICS_BUS_SCRIPT &&
                   (int)REQ_HEARTBEAT == (int)METRICS_BUS_HEARTBEAT &&
                   (int)REQ_SYNC == (int)METRICS_BUS_SYNC &&
                   (int)REQ_DELIVER == (int)METRICS_BUS_DELIVER &&
                   (int)REQ_CLAIM == (int)METRICS_BUS_CLAIM &&
                   (int)REQ_RELEASE == (int)METRICS_BUS_RELEASE &&
                   (int)REQ_PRESENCE == (int)METRICS_BUS_PRESENCE &&
                   (int)REQ_PUBLISH == (int)METRICS_BUS_PUBLISH,
               "enum req_kind and enum metrics_bus_cmd differ");

static void bus_collect(struct metrics_out *o)
{
    size_t n = 0;

    for (const struct bus_req *r = bus.fly_head; r != NULL; r = r->next)
        n++;
    metrics_out_family(o, "chatd_bus_up",
                       "1 when the Redis link is up (or no [redis]: single node).",
                       METRICS_GAUGE);
    metrics_out_u64(o, "chatd_bus_up", NULL, NULL,
                    !bus.have_redis || bus.link == LINK_UP);
    metrics_out_family(o, "chatd_bus_in_flight", "Redis commands awaiting a reply.",
                       METRICS_GAUGE);
    metrics_out_u64(o, "chatd_bus_in_flight", NULL, NULL, n);
}

int bus_start(uv_loop_t *loop, const struct conf *c)
{
    unsigned char addr[16];
    uint64_t tick_ms;

    if (bus.started)
        return CHAT_ERR_STATE;
    memset(&bus, 0, sizeof(bus));
    bus.loop = loop;
    if (make_node_id(c->node_id) != 0) {
        LOGE("bus: node_id must be 1-%d characters of [A-Za-z0-9._:-]",
             NODE_ID_MAX);
        return CHAT_ERR_INVAL;
    }
    metrics_set_node(bus.node);
    metrics_add_collector(bus_collect);
    map_init(&bus.claims);
    map_init(&bus.routing);
    if (c->have_redis) {
        bus.host = mem_strdup(c->rd_host ? c->rd_host : "127.0.0.1");
        if (bus.host == NULL)
            return CHAT_ERR_NOMEM;
    }
    defer_item_init(&bus.drain, on_drain);
    bus.started = 1;
    if (!c->have_redis) {
        LOGI("bus: no [redis]: single node %s", bus.node);
        return CHAT_OK;
    }
    bus.have_redis = 1;
    bus.port = c->rd_port;
    bus.ttl_s = c->rd_heartbeat_ttl_s > 0 ? c->rd_heartbeat_ttl_s : 10;
    bus.stall_ms = (uint64_t)bus.ttl_s * 500 > 2000 ? (uint64_t)bus.ttl_s * 500
                                                    : 2000;
    bus.backoff_ms = BACKOFF_MIN_MS;
    bus.numeric = inet_pton(AF_INET, bus.host, addr) == 1
                  || inet_pton(AF_INET6, bus.host, addr) == 1;
    snprintf(bus.chan, sizeof(bus.chan), K_CHAN "%s", bus.node);
    snprintf(bus.hbkey, sizeof(bus.hbkey), K_HB "%s", bus.node);
    uv_timer_init(loop, &bus.tick);
    uv_timer_init(loop, &bus.retry);
    uv_timer_init(loop, &bus.stop_timer);
    bus.open_handles += 3;
    tick_ms = (uint64_t)bus.ttl_s * 1000 / 3;
    uv_timer_start(&bus.tick, on_tick, tick_ms, tick_ms);
    LOGI("bus: node %s, redis %s:%d, heartbeat ttl %d s", bus.node, bus.host,
         bus.port, bus.ttl_s);
    link_connect();
    return CHAT_OK;
}

static void on_handle_closed(uv_handle_t *h)
{
    (void)h;
    if (--bus.open_handles == 0)
        bus.started = 0; /* bus_start may run again */
}

/* Once stopping and nothing is left in flight: close the handles. */
static void maybe_finish(void)
{
    if (!bus.stopping || bus.in_stop || bus.finished || bus.cmd != NULL
        || bus.sub != NULL || bus.resolving)
        return;
    bus.finished = 1;
    while (bus.dq_head != NULL)
        defer_run();
    defer_cancel(&bus.drain);
    map_free(&bus.claims);
    map_free(&bus.routing);
    mem_free(bus.host);
    bus.host = NULL;
    if (!bus.have_redis) {
        bus.started = 0; /* no handles to wait for: bus_start may run again */
        return;
    }
    uv_close((uv_handle_t *)&bus.tick, on_handle_closed);
    uv_close((uv_handle_t *)&bus.retry, on_handle_closed);
    uv_close((uv_handle_t *)&bus.stop_timer, on_handle_closed);
}

static void on_stop_timeout(uv_timer_t *t)
{
    (void)t;
    LOGW("bus: redis did not answer the shutdown in time");
    link_down("shutdown timeout");
}

void bus_stop(void)
{
    if (!bus.started || bus.stopping)
        return;
    bus.stopping = bus.in_stop = 1;
    /* what is queued completes now; new calls are refused from here on */
    while (bus.dq_head != NULL)
        defer_run();
    if (bus.have_redis) {
        uv_timer_stop(&bus.tick);
        uv_timer_stop(&bus.retry);
        if (bus.resolving)
            uv_cancel((uv_req_t *)&bus.gai);
        if (bus.link == LINK_UP) {
            struct bus_req *r = req_new(REQ_SYNC, 0);
            const char *fixed[3] = {bus.node, "stop", "0"};
            if (r != NULL && send_eval(r, SC_SYNC, fixed, 3, NULL, 0) != 0)
                req_free(r);
            uv_timer_start(&bus.stop_timer, on_stop_timeout, STOP_TIMEOUT_MS, 0);
            /* each closes once its replies are in (the sub one at once) */
            redisAsyncDisconnect(bus.cmd);
            if (bus.sub != NULL)
                redisAsyncDisconnect(bus.sub);
        } else {
            link_down("stopping");
        }
    }
    bus.in_stop = 0;
    maybe_finish();
}

/* ---- the API ------------------------------------------------------------ */

const char *bus_node_id(void) { return bus.node; }

int bus_finished(void) { return !bus.started || bus.finished; }

int bus_connected(void) { return bus.started && bus.link == LINK_UP; }

int bus_configured(void) { return bus.have_redis; }

void bus_on_core(void (*cb)(const char *data, size_t len)) { core_cb = cb; }

static int bus_open(void) { return bus.started && !bus.stopping; }

/* Route json to uid's sessions on the other nodes only, quietly ('E':
 * no undeliverable anywhere): a multi-device user's copies, echoes. */
static void route_quiet(int64_t uid, const char *json, size_t len)
{
    struct bus_req *r;
    char uidbuf[24];

    if (bus.link != LINK_UP || (r = req_new(REQ_DELIVER, len)) == NULL)
        return;
    r->uid = uid;
    r->len = len;
    r->flags = RQ_QUIET;
    if (len > 0)
        memcpy(r->data, json, len);
    snprintf(uidbuf, sizeof(uidbuf), "%" PRId64, uid);
    if (send_cmd(r, "EVALSHA %s 0 %s %b %s 1 E", bus.sha[SC_ROUTE], uidbuf,
                 r->data, len, bus.node) != 0) {
        req_free(r);
        return;
    }
    metrics_loop.bus_publishes[METRICS_PUBLISH_DELIVER]++;
}

int bus_deliver_local(int64_t uid, const char *json, size_t len)
{
    struct chat_session *s;

    if (!bus_open() || (json == NULL && len > 0))
        return CHAT_ERR_NOTFOUND;
    s = live_session(uid);
    if (s == NULL || (bus.link == LINK_UP && routing_count(uid) > 0))
        return CHAT_ERR_NOTFOUND;
    if (!claims_multi(uid))
        return up.deliver(s, json, len) == CHAT_OK ? CHAT_OK : CHAT_ERR_NOTFOUND;
    /* multi-device: every device here now, the other nodes' through Redis */
    if (deliver_all(uid, json, len, NULL) == 0)
        return CHAT_ERR_NOTFOUND;
    route_quiet(uid, json, len);
    return CHAT_OK;
}

int bus_deliver_devices(int64_t uid, const struct chat_session *except,
                        const char *json, size_t len)
{
    if (!bus_open())
        return CHAT_ERR_CLOSED;
    if (uid <= 0 || json == NULL || len == 0)
        return CHAT_ERR_INVAL;
    deliver_all(uid, json, len, except);
    /* a single-device user held here has no other device to reach */
    if (claims_get(uid) == 0 || claims_multi(uid))
        route_quiet(uid, json, len);
    return CHAT_OK;
}

int bus_claim_devices(void) { return bus.claim_devices; }

int bus_deliver(int64_t uid, const char *json, size_t len)
{
    return bus_deliver_t(uid, json, len, NULL);
}

int bus_deliver_t(int64_t uid, const char *json, size_t len,
                  struct chat_delivery *t)
{
    struct bus_req *r;
    char uidbuf[24];

    if (!bus_open())
        return CHAT_ERR_CLOSED;
    if (json == NULL && len > 0)
        return CHAT_ERR_INVAL;
    if (bus_deliver_local(uid, json, len) == CHAT_OK)
        return CHAT_OK;
    r = req_new(REQ_DELIVER, len);
    if (r == NULL)
        return CHAT_ERR_NOMEM;
    r->ticket = t;
    r->uid = uid;
    r->len = len;
    if (len > 0)
        memcpy(r->data, json, len);
    snprintf(uidbuf, sizeof(uidbuf), "%" PRId64, uid);
    if (bus.link != LINK_UP
        || send_cmd(r, "EVALSHA %s 0 %s %b %s 0 D", bus.sha[SC_ROUTE], uidbuf,
                    r->data, len, bus.node) != 0) {
        defer(r); /* undeliverable, on the next loop turn */
        return t != NULL ? CHAT_DELIVER_PENDING : CHAT_OK;
    }
    routing_add(uid, +1);
    r->idx = 1;
    metrics_loop.bus_publishes[METRICS_PUBLISH_DELIVER]++;
    return t != NULL ? CHAT_DELIVER_PENDING : CHAT_OK;
}

int bus_presence_query(struct chat_plugin *self, const int64_t *uids, size_t n,
                       chat_presence_cb cb, void *ud)
{
    struct bus_req *r;

    if (!bus_open())
        return CHAT_ERR_CLOSED;
    if (cb == NULL || (uids == NULL && n > 0) || n > INT32_MAX / 2)
        return CHAT_ERR_INVAL;
    r = req_new(REQ_PRESENCE, 0);
    if (r == NULL)
        return CHAT_ERR_NOMEM;
    r->uids = mem_malloc(n * (sizeof(int64_t) + 1) + 1);
    if (r->uids == NULL) {
        req_free(r);
        return CHAT_ERR_NOMEM;
    }
    if (n > 0)
        memcpy(r->uids, uids, n * sizeof(int64_t));
    r->n = n;
    r->plug = self;
    r->pres_cb = cb;
    r->ud = ud;
    up_ref(self);
    metrics_loop.bus_presence[METRICS_PRESENCE_QUERY]++;
    if (n == 0 || bus.link != LINK_UP
        || send_eval(r, SC_PRESENCE, NULL, 0, uids, n) != 0)
        defer(r); /* local sessions only */
    return CHAT_OK;
}

int bus_claim(int64_t uid, int flags, void (*cb)(int status, void *ud), void *ud)
{
    int multi = (flags & CHAT_LOGIN_MULTI) != 0, max = CHAT_LOGIN_DEVICES_OF(flags);
    struct bus_req *r;
    char uidbuf[24];
    int sent;

    if (!bus_open())
        return CHAT_ERR_CLOSED;
    if (cb == NULL)
        return CHAT_ERR_INVAL;
    r = req_new(REQ_CLAIM, 0);
    if (r == NULL)
        return CHAT_ERR_NOMEM;
    if (claims_inc(uid, multi) != CHAT_OK) {
        req_free(r);
        return CHAT_ERR_NOMEM;
    }
    r->uid = uid;
    r->claim_cb = cb;
    r->ud = ud;
    r->flags = flags & (CHAT_LOGIN_REPLACE | CHAT_LOGIN_MULTI);
    metrics_loop.bus_presence[METRICS_PRESENCE_CLAIM]++;
    snprintf(uidbuf, sizeof(uidbuf), "%" PRId64, uid);
    if (multi && max > 0 && claims_get(uid) > (uintptr_t)max) {
        r->flags |= RQ_TOO_MANY; /* this node alone has max already */
        defer(r);
        return CHAT_OK;
    }
    if (bus.link != LINK_UP)
        sent = -1;
    else if (multi)
        sent = send_cmd(r, "EVALSHA %s 0 %s %s %d", bus.sha[SC_CLAIM_MULTI],
                        uidbuf, bus.node, max);
    else
        sent = send_cmd(r, "EVALSHA %s 0 %s %s %s", bus.sha[SC_CLAIM], uidbuf,
                        bus.node, (flags & CHAT_LOGIN_REPLACE) ? "1" : "0");
    if (sent != 0)
        defer(r); /* CHAT_OK, local only; announced by the next sync */
    return CHAT_OK;
}

void bus_release(int64_t uid)
{
    struct bus_req *r;
    char uidbuf[24];
    int multi;

    if (!bus.started || claims_get(uid) == 0)
        return;
    /* a multi-device user's count in Redis drops with each device */
    multi = claims_multi(uid);
    if (claims_dec(uid) > 0 && !multi)
        return;
    metrics_loop.bus_presence[METRICS_PRESENCE_RELEASE]++;
    /* Down: the next sync drops the key (it is in our set). */
    if (bus.stopping || bus.link != LINK_UP
        || (r = req_new(REQ_RELEASE, 0)) == NULL)
        return;
    snprintf(uidbuf, sizeof(uidbuf), "%" PRId64, uid);
    if (send_cmd(r, "EVALSHA %s 0 %s %s",
                 bus.sha[multi ? SC_RELEASE_MULTI : SC_RELEASE], uidbuf,
                 bus.node) != 0)
        req_free(r);
}

int bus_broadcast(const char *plugin, const char *data, size_t len)
{
    size_t plen, nlen = strlen(bus.node);
    struct bus_req *r, *pub = NULL;

    if (!bus_open())
        return CHAT_ERR_CLOSED;
    if (plugin == NULL || (data == NULL && len > 0) || strchr(plugin, '\n'))
        return CHAT_ERR_INVAL;
    plen = strlen(plugin);
    r = req_new(REQ_LOCAL_BCAST, plen + 1 + len);
    if (r == NULL)
        return CHAT_ERR_NOMEM;
    memcpy(r->data, plugin, plen + 1);
    if (len > 0)
        memcpy(r->data + plen + 1, data, len);
    r->plen = plen;
    r->len = plen + 1 + len;
    if (bus.link == LINK_UP) {
        /* "B <node>\n<plugin>\n<data>"; receivers skip their own */
        pub = req_new(REQ_PUBLISH, 2 + nlen + 1 + plen + 1 + len);
        if (pub == NULL) {
            req_free(r);
            return CHAT_ERR_NOMEM;
        }
        pub->len = (size_t)sprintf(pub->data, "B %s\n%s\n", bus.node, plugin);
        if (len > 0)
            memcpy(pub->data + pub->len, data, len);
        pub->len += len;
        if (send_cmd(pub, "PUBLISH %s %b", K_ALL, pub->data, pub->len) != 0)
            req_free(pub); /* best effort: this node still gets it */
        else
            metrics_loop.bus_publishes[METRICS_PUBLISH_BROADCAST]++;
    }
    defer(r);
    return CHAT_OK;
}

/* ---- rate limits (ratelimit.c): a user's bucket between nodes ----------- */
/* Plain GET / SET PX on the command connection, outside the request
 * machinery above: nothing waits on them, and a lost reply only means a
 * fresh bucket.  Key chatd:rl:u:<uid>, value the wall time (ms) at which
 * the user's bucket is full again. */
#define K_RL_USER "chatd:rl:u:"

struct bus_rl_get {
    int64_t uid;
    void (*cb)(int64_t uid, int64_t full_at, void *ud);
    void *ud;
};

void bus_rl_user_set(int64_t uid, int64_t full_at, int64_t px)
{
    if (bus.link != LINK_UP || !bus.cmd || px <= 0)
        return;
    redisAsyncCommand(bus.cmd, NULL, NULL, "SET " K_RL_USER "%lld %lld PX %lld",
                      (long long)uid, (long long)full_at, (long long)px);
}

static void on_rl_user_get(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct bus_rl_get *g = privdata;
    const redisReply *rp = reply;

    (void)ac;
    if (rp && rp->type == REDIS_REPLY_STRING)
        g->cb(g->uid, strtoll(rp->str, NULL, 10), g->ud);
    mem_free(g);
}

void bus_rl_user_get(int64_t uid, void (*cb)(int64_t uid, int64_t full_at, void *ud),
                     void *ud)
{
    struct bus_rl_get *g;

    if (bus.link != LINK_UP || !bus.cmd || !(g = mem_malloc(sizeof *g)))
        return;
    g->uid = uid;
    g->cb = cb;
    g->ud = ud;
    if (redisAsyncCommand(bus.cmd, on_rl_user_get, g, "GET " K_RL_USER "%lld",
                          (long long)uid) != REDIS_OK)
        mem_free(g);
}

/* ---- the plugins' key-value store (host ABI 1.8, auth cache) ------------
 * Plain GET / SET PX / DEL on the cmd connection under
 * "chatd:kv:<plugin>:<key>".  A get that cannot be sent completes with
 * CHAT_ERR_UNAVAILABLE on the next loop turn, like a presence query. */

/* A request of kind whose data is the full key; NULL on a bad key or OOM
 * (*rc says which). */
static struct bus_req *kv_req(int kind, const char *plugin, const char *key, int *rc)
{
    size_t plen, klen;
    struct bus_req *r;

    *rc = CHAT_ERR_INVAL;
    if (plugin == NULL || key == NULL || strchr(plugin, ':') != NULL)
        return NULL;
    plen = strlen(plugin);
    klen = strlen(key);
    if (klen == 0 || klen > KV_KEY_MAX)
        return NULL;
    *rc = CHAT_ERR_NOMEM;
    r = req_new(kind, sizeof(K_KV) + plen + 1 + klen);
    if (r == NULL)
        return NULL;
    r->len = (size_t)sprintf(r->data, K_KV "%s:%s", plugin, key);
    *rc = CHAT_OK;
    return r;
}

int bus_kv_get(struct chat_plugin *self, const char *plugin, const char *key,
               chat_kv_cb cb, void *ud)
{
    struct bus_req *r;
    int rc;

    if (!bus_open())
        return CHAT_ERR_CLOSED;
    if (cb == NULL)
        return CHAT_ERR_INVAL;
    if ((r = kv_req(REQ_KV_GET, plugin, key, &rc)) == NULL)
        return rc;
    r->plug = self;
    r->kv_cb = cb;
    r->ud = ud;
    up_ref(self);
    if (bus.link != LINK_UP || send_cmd(r, "GET %b", r->data, r->len) != 0)
        defer(r); /* CHAT_ERR_UNAVAILABLE on the next turn */
    return CHAT_OK;
}

int bus_kv_set(const char *plugin, const char *key, const char *val, size_t len,
               uint64_t ttl_ms)
{
    struct bus_req *r;
    int rc;

    if ((val == NULL && len > 0) || len > KV_VAL_MAX || ttl_ms == 0)
        return CHAT_ERR_INVAL;
    if ((r = kv_req(REQ_KV_SET, plugin, key, &rc)) == NULL)
        return rc;
    if (!bus_open() || bus.link != LINK_UP ||
        send_cmd(r, "SET %b %b PX %llu", r->data, r->len, val ? val : "", len,
                 (unsigned long long)ttl_ms) != 0) {
        req_free(r);
        return CHAT_ERR_UNAVAILABLE;
    }
    return CHAT_OK;
}

int bus_kv_del(const char *plugin, const char *key)
{
    struct bus_req *r;
    int rc;

    if ((r = kv_req(REQ_KV_SET, plugin, key, &rc)) == NULL)
        return rc;
    if (!bus_open() || bus.link != LINK_UP ||
        send_cmd(r, "DEL %b", r->data, r->len) != 0) {
        req_free(r);
        return CHAT_ERR_UNAVAILABLE;
    }
    return CHAT_OK;
}
