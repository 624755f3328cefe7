/*
 * group_chat.c - GROUP_CHAT_MSG (10) and the member cache behind it.
 *
 * A group message goes to every member but the sender through
 * host->deliver(): online members get it wherever they are, offline ones
 * through CHAT_EV_UNDELIVERABLE (the offline plugin stores a copy each).
 *
 * The hot path does no database access and, when the frame already carries
 * the session's own id and name (the seed client's case), no allocation:
 * host->req_forward() hands back the frame text as is, and it goes to
 * deliver() once per member.  The member ids of a group come from a cache
 * (group id -> sorted member ids, a host->map_*):
 *   - loaded with one SELECT on first use; messages arriving meanwhile queue
 *     behind that one load (concurrent loads coalesce, order is kept);
 *   - dropped when a membership changes on any node (host->broadcast, see
 *     grp_membership_changed); an invalidation that arrives during a load
 *     makes the load run again, so the queued messages see the change;
 *   - reloaded after cache_ttl seconds as a safety net for a lost broadcast,
 *     and swept by a timer when unused.
 * A sender that is not a member gets 109, an unknown group 108 (protocol 2;
 * legacy: a log line, as the seed answers nothing).
 *
 * Outcomes.  Each member's copy goes through host->deliver_ex(): handed at
 * once to a live local session, or its outcome comes later (another node,
 * or the offline store's commit).  The sender's answer waits until every
 * member's copy has an outcome: errno 0 when all were delivered or stored,
 * else 113 with "failed": the number of members whose copy was not (a
 * bound of the store, the database failing); the others did get it, so a
 * client that sends again may duplicate it for them.  A member whose
 * mailbox is at a stored-message quota of the offline store (its
 * stored_max, or this sender's stored_per_sender_max for it) does not get
 * the copy, and that is not a failure of the message: errno 0 with "full":
 * the number of such members (the offline plugin logs and counts each).
 * The fan-out holds one
 * small record per message while outcomes are pending, none when every
 * member is online here.
 *
 * Bounds.  Messages waiting for a member load are bounded by
 * load_queue_max_bytes in all and load_queue_sender_max_bytes per sender
 * (113 past them).  Besides its "msg" text a forwarded message may hold
 * extra_max bytes (105 past it).  A frame with a spoofed,
 * missing or duplicated sender field, or with the protocol-2 "seq"/"proto"
 * of the sender's connection, is rebuilt by req_forward() with the session's
 * id and name and every other member's raw text.  On a hot reload the fresh
 * entries are handed to the new instance (save/restore).
 *
 * Durable messages (issue 8).  A protocol-2 message (durable = all, the
 * default; durable = cid: only one with a client message id "cid") is
 * checked the same way (member cache, sender a member), then
 * stored once in the group's conversation by the group-committed writer
 * (plugins/store/writer.c, linked in; conversation -groupid); the sender's
 * ACK with "mid", "conv", "cseq" comes after COMMIT, and only then is it
 * fanned out to the members the cache held when it was sent (deliver():
 * live, else the offline store for legacy members; protocol-2 devices
 * fetch it by SYNC).  A retry with the same cid gets the original numbers
 * and "dup":true and is not fanned out again; without a cid a resend is
 * stored as a new message (and without a cid, while no plugin answers
 * SYNC, the message stays non-durable: ds_sync_served).
 */
#include <string.h>

#include "group.h"
#include "../store/dstore.h"

struct gmsg {
    struct gmsg *next;
    uint64_t sid;       /* the sender's session */
    int64_t from;       /* the sender's user id */
    struct chat_ack ack;
    size_t len;
    size_t cid_len;     /* its cid (if any) follows json */
    int durable;        /* stored first (durable_send) */
    char json[];
};

struct gent {
    int64_t gid;
    int64_t *members;   /* sorted */
    size_t n;
    uint64_t loaded_ms; /* when members were read; 0: never */
    int loading;        /* a SELECT is in flight */
    int stale;          /* invalidated while loading: load again */
    struct gmsg *head, **tail; /* waiting for the load */
};

static struct chat_map *cache; /* group id -> struct gent * */
static struct chat_timer *sweeper;
static struct chat_map *q_by_from; /* sender -> (uintptr_t) bytes waiting */
static size_t q_total;             /* bytes waiting for loads */
static struct ds_writer *writer;   /* durable messages */
static struct ds_conf ds_cfg;
static int no_sync_warned;         /* ds_sync_served() logged its warning */

#define GMSG_COST(len) (sizeof(struct gmsg) + (len))

static size_t q_of(int64_t from)
{
    return (size_t)(uintptr_t)grp.host->map_get(q_by_from, from);
}

static void q_sub(int64_t from, size_t bytes)
{
    size_t v = q_of(from) - bytes;

    q_total -= bytes;
    if (v)
        grp.host->map_put(q_by_from, from, (void *)(uintptr_t)v);
    else
        grp.host->map_del(q_by_from, from);
}

static int q_add(int64_t from, size_t bytes)
{
    size_t v = q_of(from);

    if (q_total + bytes > grp.queue_max || v + bytes > grp.queue_sender_max ||
        grp.host->map_put(q_by_from, from, (void *)(uintptr_t)(v + bytes)) != CHAT_OK)
        return -1;
    q_total += bytes;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Sending with a loaded entry. */

static int is_member(const struct gent *e, int64_t uid)
{
    return chat_ids_has(e->members, e->n, uid);
}

/* One group message whose members' outcomes are pending. */
struct gpend {
    uint64_t sid;       /* the sender's session */
    int64_t from, gid;
    struct chat_ack ack;
    size_t pending;     /* outcomes to come (+1 while fanning out) */
    size_t failed;      /* members whose copy was neither delivered nor stored */
    size_t full;        /* members whose copy a stored-message quota refused */
};

static void gpend_answer(struct gpend *p)
{
    struct chat_session *s = grp.host->session_get(p->sid);
    cJSON *body;

    if (!p->failed) {
        body = p->full ? cJSON_CreateObject() : NULL;
        if (body)
            cJSON_AddNumberToObject(body, "full", (double)p->full);
        if (s)
            grp_answer(s, &p->ack, p->from, 0, NULL, body);
        cJSON_Delete(body);
    } else {
        chat_log(grp.host, grp.self, CHAT_LOG_INFO,
                 "group %lld: message from %lld not delivered to %zu members",
                 (long long)p->gid, (long long)p->from, p->failed);
        if (s && (body = cJSON_CreateObject())) {
            cJSON_AddNumberToObject(body, "failed", (double)p->failed);
            if (p->full)
                cJSON_AddNumberToObject(body, "full", (double)p->full);
            grp_answer(s, &p->ack, p->from, CHAT_E_UNAVAILABLE,
                       "busy: not delivered to some members", body);
            cJSON_Delete(body);
        }
    }
    grp.host->free(p);
}

static void gpend_one(struct gpend *p, int status)
{
    if (status == CHAT_ERR_QUOTA || status == CHAT_ERR_QUOTA_SENDER)
        p->full++;
    else if (status != CHAT_OK)
        p->failed++;
    if (--p->pending == 0)
        gpend_answer(p);
}

static void member_done(int status, int64_t uid, void *ctx)
{
    struct gpend *p;

    memcpy(&p, ctx, sizeof(p));
    if (status != CHAT_OK)
        chat_log(grp.host, grp.self, CHAT_LOG_DEBUG,
                 "group %lld: copy for %lld: %s", (long long)p->gid, (long long)uid,
                 grp.host->strerror(status));
    gpend_one(p, status);
}

/* Multi-device (host ABI 1.9): the sender's other devices get a copy of
 * what it sent, durable or not, live (the sending device has its ack). */
static void echo(uint64_t sid, int64_t from, const char *json, size_t len)
{
    if (CHAT_HOST_HAS(grp.host, deliver_devices))
        grp.host->deliver_devices(from, grp.host->session_get(sid), json, len);
}

/* A durable message on its way to the writer: the members to fan out to
 * once it is stored. */
struct gdur {
    uint64_t sid;
    int64_t from, gid;
    struct chat_ack ack;
    int has_cid;
    size_t n;
    int64_t members[];
};

static void durable_answer(struct chat_session *s, const struct gdur *d,
                           const struct ds_result *r)
{
    if (r->status != CHAT_OK) {
        int err = r->status == CHAT_ERR_DB ? CHAT_E_INTERNAL : CHAT_E_UNAVAILABLE;

        grp_answer(s, &d->ack, d->from, err,
                   err == CHAT_E_INTERNAL ? "not stored"
                   : d->has_cid           ? "busy: not stored, send again with the same cid"
                                          : "busy: not stored, send again later",
                   NULL);
        return;
    }
    ds_reply_ok(grp.host, s, &d->ack, r->conv, r->mid, r->cseq, r->dup);
}

static void durable_stored(const struct ds_result *r, const char *body, size_t len,
                           void *ctx)
{
    struct gdur *d;
    struct chat_session *s;
    char *text = NULL;
    size_t i, n;

    memcpy(&d, ctx, sizeof(d));
    if (r->status == CHAT_OK && !r->dup &&
        !(text = ds_render(grp.host, r->conv, r->mid, r->cseq, body, len, &n)))
        chat_log(grp.host, grp.self, CHAT_LOG_WARN, "message %lld stored but not "
                 "delivered live: out of memory", (long long)r->mid);
    for (i = 0; text && i < d->n; i++) /* best effort: SYNC has it */
        if (d->members[i] != d->from)
            grp.host->deliver(grp.self, d->members[i], text, n);
    if (text)
        echo(d->sid, d->from, text, n);
    grp.host->free(text);
    if ((s = grp.host->session_get(d->sid)))
        durable_answer(s, d, r);
    grp.host->free(d);
}

/* Store a member's durable message; answered and fanned out once stored. */
static void durable_send(const struct gent *e, struct chat_session *s, uint64_t sid,
                         const struct chat_ack *ack, int64_t from, const char *json,
                         size_t len, const char *cid, size_t cid_len)
{
    struct gdur *d = grp.host->malloc(sizeof(*d) + e->n * sizeof(int64_t));
    struct ds_msg m;
    int rc = CHAT_ERR_NOMEM;

    if (d) {
        d->sid = sid;
        d->from = from;
        d->gid = e->gid;
        d->ack = *ack;
        d->has_cid = cid_len > 0;
        d->n = e->n;
        memcpy(d->members, e->members, e->n * sizeof(int64_t));
        m.conv = ds_conv_group(e->gid);
        m.sender = from;
        m.cid = cid;
        m.cid_len = cid_len;
        m.body = json;
        m.body_len = len;
        if ((rc = ds_submit(writer, &m, durable_stored, &d, sizeof(d))) != CHAT_OK)
            grp.host->free(d);
    }
    if (rc != CHAT_OK && s)
        grp_answer(s, ack, from, rc == CHAT_ERR_BUSY ? CHAT_E_UNAVAILABLE : CHAT_E_INTERNAL,
                   rc == CHAT_ERR_BUSY ? "busy: too many messages wait to be stored"
                                       : "out of memory", NULL);
}

/* Hand json to every member but the sender; the answer goes to the sender
 * now or once every copy has an outcome.  durable: stored first (see
 * durable_send). */
static void send_to_members(const struct gent *e, uint64_t sid,
                            const struct chat_ack *ack, int64_t from,
                            const char *json, size_t len, int durable,
                            const char *cid, size_t cid_len)
{
    struct chat_session *s = grp.host->session_get(sid);
    struct gpend *p;
    size_t i;
    int rc;

    if (!is_member(e, from)) {
        if (s)
            grp_answer(s, ack, from, CHAT_E_NOT_MEMBER, "not a member of the group",
                       NULL);
        return;
    }
    if (durable) {
        durable_send(e, s, sid, ack, from, json, len, cid, cid_len);
        return;
    }
    if (!(p = grp.host->malloc(sizeof(*p)))) {
        if (s)
            grp_answer(s, ack, from, CHAT_E_INTERNAL, "out of memory", NULL);
        return;
    }
    p->sid = sid;
    p->from = from;
    p->gid = e->gid;
    p->ack = *ack;
    p->pending = 1;
    p->failed = 0;
    p->full = 0;
    echo(sid, from, json, len);
    for (i = 0; i < e->n; i++) {
        if (e->members[i] == from)
            continue;
        rc = grp.host->deliver_ex(grp.self, from, e->members[i], json, len,
                                  member_done, &p, sizeof(p));
        if (rc == CHAT_DELIVER_PENDING) {
            p->pending++;
        } else if (rc != CHAT_OK) {
            chat_log(grp.host, grp.self, CHAT_LOG_WARN,
                     "group %lld: delivery to %lld failed: %s", (long long)e->gid,
                     (long long)e->members[i], grp.host->strerror(rc));
            p->failed++;
        }
    }
    gpend_one(p, CHAT_OK); /* the fan-out itself is done */
}

static int fresh(const struct gent *e)
{
    return !e->loading && e->loaded_ms &&
           grp_now_ms() - e->loaded_ms < grp.cache_ttl_ms;
}

/* ------------------------------------------------------------------------ */
/* Loading. */

static void entry_free(struct gent *e)
{
    grp.host->free(e->members);
    grp.host->free(e);
}

/* Answer (and free) every queued message: sent with e's members when err is
 * 0, else refused with err. */
static void flush_queue(struct gent *e, int err, const char *why)
{
    struct gmsg *m, *next;

    m = e->head;
    e->head = NULL;
    e->tail = &e->head;
    for (; m; m = next) {
        struct chat_session *s = grp.host->session_get(m->sid);

        next = m->next;
        q_sub(m->from, GMSG_COST(m->len + m->cid_len));
        if (!err)
            send_to_members(e, m->sid, &m->ack, m->from, m->json, m->len,
                            m->durable, m->cid_len ? m->json + m->len : NULL,
                            m->cid_len);
        else if (s)
            grp_answer(s, &m->ack, m->from, err, why, NULL);
        else
            chat_log(grp.host, grp.self, CHAT_LOG_INFO,
                     "user %lld: group message to %lld dropped: %s",
                     (long long)m->from, (long long)e->gid, why);
        grp.host->free(m);
    }
}

static void load_done(const struct chat_db_result *r, void *ud);

static int load_start(struct gent *e)
{
    static const char sql[] =
        "SELECT m.user_id FROM chat_groups g "
        "LEFT JOIN group_members m ON m.group_id = g.id "
        "WHERE g.id = ? ORDER BY m.user_id";
    struct chat_db_param p = CHAT_DB_P_INT(e->gid);
    int rc = grp.host->db_query(grp.self, sql, &p, 1, load_done, e);

    e->loading = rc == CHAT_OK;
    e->stale = 0;
    return rc;
}

/* Give up on e: answer its queue with err and forget it. */
static void load_fail(struct gent *e, int err, const char *why)
{
    e->loading = 0;
    grp.host->map_del(cache, e->gid);
    flush_queue(e, err, why);
    entry_free(e);
}

static void load_done(const struct chat_db_result *r, void *ud)
{
    struct gent *e = ud;
    size_t i, n, k = 0;
    int64_t *ids = NULL;
    const char *why;
    int rc;

    if (e->stale) { /* membership changed while reading: read again */
        if ((rc = load_start(e)) != CHAT_OK)
            load_fail(e, grp_db_proto_errno(rc, &why), why);
        return;
    }
    if ((rc = grp.host->db_error(r)) != CHAT_OK) {
        chat_log(grp.host, grp.self, CHAT_LOG_WARN, "group %lld: members: %s",
                 (long long)e->gid, grp.host->db_errmsg(r));
        rc = grp_db_proto_errno(rc, &why);
        load_fail(e, rc, why);
        return;
    }
    if ((n = grp.host->db_nrows(r)) == 0) {
        load_fail(e, CHAT_E_NOT_FOUND, "unknown group");
        return;
    }
    if (!(ids = grp.host->malloc(n * sizeof(*ids)))) {
        load_fail(e, CHAT_E_INTERNAL, "out of memory");
        return;
    }
    for (i = 0; i < n; i++) /* sorted by the query; NULL: no member */
        if (!grp.host->db_is_null(r, i, 0))
            ids[k++] = grp.host->db_int(r, i, 0);
    grp.host->free(e->members);
    e->members = ids;
    e->n = k;
    e->loaded_ms = grp_now_ms();
    e->loading = 0;
    flush_queue(e, 0, NULL);
}

/* Queue a copy of json behind the (started if needed) load of gid. */
static int enqueue(struct chat_session *s, const struct chat_request *req,
                   int64_t from, int64_t gid, const char *json, size_t len,
                   int durable, const char *cid, size_t cid_len, const char **why)
{
    struct gent *e = grp.host->map_get(cache, gid);
    struct gmsg *m;
    size_t total = len + cid_len;
    int rc;

    *why = "out of memory";
    if (!e) {
        if (!(e = grp.host->malloc(sizeof(*e))))
            return CHAT_E_INTERNAL;
        memset(e, 0, sizeof(*e));
        e->gid = gid;
        e->tail = &e->head;
        if (grp.host->map_put(cache, gid, e) != CHAT_OK) {
            grp.host->free(e);
            return CHAT_E_INTERNAL;
        }
    }
    if (!e->loading && (rc = load_start(e)) != CHAT_OK) {
        if (!e->head) {
            grp.host->map_del(cache, gid);
            entry_free(e);
        }
        return grp_db_proto_errno(rc, why);
    }
    if (q_add(from, GMSG_COST(total)) != 0) {
        *why = "busy: too many messages wait for the database";
        return CHAT_E_UNAVAILABLE; /* the load runs anyway and fills the cache */
    }
    if (!(m = grp.host->malloc(GMSG_COST(total)))) {
        q_sub(from, GMSG_COST(total));
        return CHAT_E_INTERNAL;
    }
    m->next = NULL;
    m->sid = grp.host->session_id(s);
    m->from = from;
    m->ack = req->ack;
    m->len = len;
    m->cid_len = cid_len;
    m->durable = durable;
    memcpy(m->json, json, len);
    if (cid_len)
        memcpy(m->json + len, cid, cid_len);
    *e->tail = m;
    e->tail = &m->next;
    return 0;
}

/* ------------------------------------------------------------------------ */

/* Whether the message is durable: 1 (stored first; *cid and *len set to
 * its "cid" when it has one, else NULL and 0), 0 (the non-durable path: a
 * legacy session, or without a cid: durable = cid, or no plugin answering
 * SYNC), -1 when answered with an error.  (A group's conversation id holds
 * no user id: any sender.) */
static int durable_mode(struct chat_session *s, const struct chat_request *req,
                        int64_t uid, const char **cid, size_t *len)
{
    size_t rl;

    *cid = NULL;
    *len = 0;
    if (grp.host->session_proto(s) != CHAT_PROTO_2)
        return 0;
    if (!grp.host->req_field_raw(req, "cid", &rl))
        return grp.durable_all && ds_sync_served(grp.host, grp.self, &no_sync_warned);
    if (!(*cid = grp.host->req_field_str(req, "cid", len)) || *len == 0 ||
        *len > DS_CID_MAX) {
        grp_answer(s, &req->ack, uid, CHAT_E_BAD_FIELD,
                   "cid must be a string of 1 to 64 bytes", NULL);
        return -1;
    }
    return 1;
}

void grp_on_chat(struct chat_session *s, const struct chat_request *req, void *ud)
{
    const char *raw, *out, *why = NULL, *cid;
    size_t len, rawlen, outlen, cid_len;
    int64_t uid, gid;
    struct gent *e;
    int err, durable;

    (void)ud;
    if (!(uid = grp.host->req_auth(s, req)))
        return;
    if (grp.host->req_int(req, "groupid", &gid) != 1 || gid <= 0) {
        grp_answer(s, &req->ack, uid, CHAT_E_BAD_FIELD, "groupid must be a group id", NULL);
        return;
    }
    raw = grp.host->req_field_raw(req, "msg", &len);
    if (!raw || len < 2 || raw[0] != '"') {
        grp_answer(s, &req->ack, uid, CHAT_E_BAD_FIELD, "msg must be a string", NULL);
        return;
    }
    rawlen = len;
    /* A literal is never shorter than its decoded text: decode only when
     * the literal is over the limit. */
    if (len - 2 > grp.msg_max &&
        (!grp.host->req_field_str(req, "msg", &len) || len > grp.msg_max)) {
        grp_answer(s, &req->ack, uid, CHAT_E_TOO_LONG, "msg is too long", NULL);
        return;
    }
    if (!(out = grp.host->req_forward(s, req, &outlen))) {
        grp_answer(s, &req->ack, uid, CHAT_E_INTERNAL, "out of memory", NULL);
        return;
    }
    if (outlen > rawlen && outlen - rawlen > grp.extra_max) {
        grp_answer(s, &req->ack, uid, CHAT_E_TOO_LONG, "message too large", NULL);
        return;
    }
    if ((durable = durable_mode(s, req, uid, &cid, &cid_len)) < 0)
        return;
    e = grp.host->map_get(cache, gid);
    if (e && fresh(e)) {
        send_to_members(e, grp.host->session_id(s), &req->ack, uid, out, outlen, durable,
                        cid, cid_len);
    } else if ((err = enqueue(s, req, uid, gid, out, outlen, durable, cid, cid_len,
                              &why)) != 0) {
        grp_answer(s, &req->ack, uid, err, why, NULL);
    } /* else answered when the load completes */
}

/* ------------------------------------------------------------------------ */

void grp_cache_invalidate(int64_t gid)
{
    struct gent *e = grp.host->map_get(cache, gid);

    if (!e)
        return;
    if (e->loading) {
        e->stale = 1;
        return;
    }
    grp.host->map_del(cache, gid);
    entry_free(e);
}

/* Drop entries past their TTL that nobody waits for (and the expired
 * entries of the list cache). */
static void sweep(struct chat_timer *t, void *ud)
{
    uint64_t now = grp_now_ms();
    size_t it;
    int64_t gid;
    void *v;

    (void)t;
    (void)ud;
    grp_lcache_sweep(); /* the list cache shares this timer */
    for (it = 0; grp.host->map_next(cache, &it, &gid, &v);) {
        struct gent *e = v;

        if (!e->loading && now - e->loaded_ms >= grp.cache_ttl_ms) {
            grp.host->map_del(cache, gid); /* the entry just returned: allowed */
            entry_free(e);
        }
    }
}

/* Blob: per fresh entry int64 gid, int64 loaded_ms, int64 n, n member ids. */
int grp_cache_save(void **blob, size_t *len)
{
    size_t it, n = 0, k = 0;
    int64_t *out, gid;
    void *v;

    for (it = 0; grp.host->map_next(cache, &it, &gid, &v);) {
        const struct gent *e = v;

        if (fresh(e))
            n += 3 + e->n;
    }
    if (!(out = grp.host->malloc((n ? n : 1) * sizeof(*out))))
        return CHAT_ERR_NOMEM;
    for (it = 0; grp.host->map_next(cache, &it, &gid, &v);) {
        const struct gent *e = v;

        if (!fresh(e))
            continue;
        out[k++] = e->gid;
        out[k++] = (int64_t)e->loaded_ms;
        out[k++] = (int64_t)e->n;
        memcpy(out + k, e->members, e->n * sizeof(*out));
        k += e->n;
    }
    *blob = out;
    *len = k * sizeof(*out);
    return CHAT_OK;
}

int grp_cache_restore(const void *blob, size_t len)
{
    const unsigned char *p = blob;
    size_t total = len / sizeof(int64_t), i = 0, groups = 0;
    int64_t hdr[3];

    while (i + 3 <= total) {
        struct gent *e;

        memcpy(hdr, p + i * sizeof(int64_t), sizeof(hdr));
        i += 3;
        if (hdr[0] <= 0 || hdr[2] < 0 || (size_t)hdr[2] > total - i)
            return CHAT_ERR_INVAL;
        if (!(e = grp.host->malloc(sizeof(*e))))
            return CHAT_ERR_NOMEM;
        memset(e, 0, sizeof(*e));
        e->gid = hdr[0];
        e->loaded_ms = (uint64_t)hdr[1];
        e->n = (size_t)hdr[2];
        e->tail = &e->head;
        e->members = grp.host->malloc((e->n ? e->n : 1) * sizeof(int64_t));
        if (!e->members || grp.host->map_put(cache, e->gid, e) != CHAT_OK) {
            entry_free(e);
            return CHAT_ERR_NOMEM;
        }
        memcpy(e->members, p + i * sizeof(int64_t), e->n * sizeof(int64_t));
        i += e->n;
        groups++;
    }
    chat_log(grp.host, grp.self, CHAT_LOG_INFO, "restored the members of %zu groups",
             groups);
    return CHAT_OK;
}

int grp_cache_start(void)
{
    /* the shorter TTL of the two caches (this one and the list cache) */
    uint64_t period = grp.cache_ttl_ms;

    if (grp.list_ttl_ms && grp.list_ttl_ms < period)
        period = grp.list_ttl_ms;
    if (period < 1000)
        period = 1000;

    if (!(cache = grp.host->map_new()))
        return CHAT_ERR_NOMEM;
    if (!(q_by_from = grp.host->map_new()) ||
        !(writer = ds_writer_new(grp.host, grp.self, &ds_cfg))) {
        grp.host->map_free(q_by_from);
        grp.host->map_free(cache);
        cache = NULL;
        q_by_from = NULL;
        return CHAT_ERR_NOMEM;
    }
    if (!(sweeper = grp.host->timer_start(grp.self, period, period, sweep, NULL))) {
        grp.host->map_free(cache);
        grp.host->map_free(q_by_from);
        ds_writer_free(writer);
        writer = NULL;
        cache = NULL;
        q_by_from = NULL;
        return CHAT_ERR_NOMEM;
    }
    return CHAT_OK;
}

void grp_cache_fini(void)
{
    size_t it;
    int64_t gid;
    void *v;

    /* The instance has drained: no load is in flight, no queue is left. */
    for (it = 0; grp.host->map_next(cache, &it, &gid, &v);)
        entry_free(v);
    grp.host->map_free(cache);
    cache = NULL;
    grp.host->map_free(q_by_from);
    q_by_from = NULL;
    q_total = 0;
    ds_writer_free(writer);
    writer = NULL;
    sweeper = NULL; /* a repeating timer is stopped with its instance */
}

void grp_durable_conf(void)
{
    ds_conf_read(grp.host, grp.self, &ds_cfg);
    if (writer)
        ds_writer_reconf(writer, &ds_cfg);
}
