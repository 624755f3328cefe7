/*
 * typing.c - TYPING (18, protocol 2): "I am typing" / "I stopped" to the
 * other user of a pair or the other members of a group.  docs/protocol.md,
 * "18 TYPING", is the wire.
 *
 * Typing is ephemeral: it is never stored, never queued for an offline
 * user and never sent to a legacy session.  So it does not go through
 * host->deliver() (which would hand it to a legacy client or to the
 * offline store) but through host->broadcast() to this plugin on every
 * node, the way the store plugin forwards READ marks: each node looks up
 * its own sessions of the recipients and writes the event to the
 * protocol-2 ones.  The broadcast carries the recipients' ids, so a
 * receiving node needs no database.
 *
 * Who may send it is what a chat message needs: a pair's peer must exist
 * (108), a group's sender must be a member (109; 108 for no such group).
 * Both answers are cached so a user typing costs no query: user ids known
 * to exist (users are never deleted: only positive answers, no expiry),
 * and a group's members for member_ttl_ms (a new member is reloaded at
 * once when it is not in the cached list, so a member never gets 109
 * from a stale entry; a member who joined later than the load may miss
 * others' typing for at most member_ttl_ms).  At most lookups_max
 * queries are in flight (113 past them: typing is not worth a queue).
 *
 * Coalescing.  A client sends "typing" again every few seconds while the
 * user types; the same state for the same target is forwarded at most once
 * per coalesce_ms (the request is still answered with errno 0), a change
 * of state always.  The last state per (sender, target) is kept in a map,
 * bounded by coalesce_max entries and swept by a timer.  The per-connection
 * rate limit of [limits] class.NAME applies too (class.typing = 18 ...).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chat/plugin.h"

#define PLUGIN_NAME "typing"
#define TY_MSG_TYPING 18
#define TY_RECHECK_MS 1000  /* a non-member in an older list: reload */
#define TY_NOTE_MAX (64 * 1024) /* a broadcast: header, name, ids */

static const struct chat_host *host;
static struct chat_plugin *self;
static uint64_t coalesce_ms = 2000;
static size_t coalesce_max = 100000;
static uint64_t member_ttl_ms = 10000;
static size_t lookups_max = 1024;
static size_t known_max = 1000000;

static struct chat_map *known;   /* user ids known to exist: (void *)1 */
static struct chat_map *groups;  /* group id -> struct tgroup * */
static struct chat_map *last;    /* coalescing key -> struct tlast * */
static struct chat_timer *sweeper;
static size_t inflight;          /* queries running */

struct tgroup {
    uint64_t loaded_ms;
    size_t n;
    int64_t ids[];               /* sorted */
};

struct tlast {
    int64_t from, target;        /* target: toid, or -groupid */
    uint64_t ms;
    int typing;
};

/* One request waiting for its check. */
struct treq {
    uint64_t sid;
    struct chat_ack ack;
    int64_t from, target;
    int typing;
};

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ------------------------------------------------------------------------ */
/* Receiving: this node's protocol-2 sessions of the listed users. */

/* "T <from> <target> <0|1> <nids> <ids...>\n<quoted name>" */
static void on_broadcast(int event, const void *arg, void *ud)
{
    const struct chat_ev_broadcast *ev = arg;
    char head[64], *text = NULL, *p, *end;
    const char *nl, *name;
    long long from, target, typing, nids, id;
    size_t nlen, tlen;
    int n, off;

    (void)ud;
    if (event != CHAT_EV_BROADCAST || ev->len < 2 || ev->data[0] != 'T' ||
        !(nl = memchr(ev->data, '\n', ev->len)))
        return;
    name = nl + 1;
    nlen = ev->len - (size_t)(name - ev->data);
    if ((size_t)(nl - ev->data) >= TY_NOTE_MAX ||
        !(text = host->malloc((size_t)(nl - ev->data) + 1)))
        return;
    memcpy(text, ev->data, (size_t)(nl - ev->data));
    text[nl - ev->data] = '\0';
    if (sscanf(text, "T %lld %lld %lld %lld%n", &from, &target, &typing, &nids, &off) != 4)
        goto out;
    n = snprintf(head, sizeof(head), "{\"msgid\":%d,\"id\":%lld,\"name\":", TY_MSG_TYPING,
                 from);
    tlen = (size_t)n + nlen + 64;
    {
        char *msg = host->malloc(tlen);
        size_t mlen;

        if (!msg)
            goto out;
        memcpy(msg, head, (size_t)n);
        memcpy(msg + n, name, nlen);
        mlen = (size_t)n + nlen;
        mlen += (size_t)snprintf(msg + mlen, tlen - mlen, ",\"%s\":%lld,\"typing\":%s}",
                                 target > 0 ? "toid" : "groupid",
                                 target > 0 ? target : -target, typing ? "true" : "false");
        for (p = text + off; nids-- > 0; p = end) {
            struct chat_session *s, *next;

            id = strtoll(p, &end, 10);
            if (end == p)
                break;
            /* every device of id here (multi-device, host ABI 1.9) */
            for (s = host->session_by_user(id); s; s = next) {
                next = CHAT_HOST_HAS(host, session_next_device)
                           ? host->session_next_device(s) : NULL;
                if (host->session_proto(s) == CHAT_PROTO_2)
                    host->send_raw(s, msg, mlen); /* may close s */
            }
        }
        host->free(msg);
    }
out:
    host->free(text);
}

/* Send the event of q to ids (n of them, the sender left out) everywhere. */
static int forward(const struct treq *q, const int64_t *ids, size_t n,
                   struct chat_session *s)
{
    const char *name;
    char *lit = NULL, *note = NULL;
    size_t len, qlen, cap, used, i;
    int rc = CHAT_ERR_NOMEM;

    name = host->session_name_len(s, &len);
    if (!(lit = host->json_quote(name ? name : "", name ? len : 0, &qlen)))
        goto out;
    cap = 64 + n * 21 + 1 + qlen;
    if (cap > TY_NOTE_MAX + qlen) { /* cannot happen under group size_max */
        rc = CHAT_ERR_INVAL;
        goto out;
    }
    if (!(note = host->malloc(cap)))
        goto out;
    used = (size_t)snprintf(note, cap, "T %lld %lld %d %zu", (long long)q->from,
                            (long long)q->target, q->typing, n);
    for (i = 0; i < n; i++)
        used += (size_t)snprintf(note + used, cap - used, " %lld", (long long)ids[i]);
    note[used++] = '\n';
    memcpy(note + used, lit, qlen);
    used += qlen;
    rc = host->broadcast(self, note, used);
out:
    host->free(note);
    host->free(lit);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Coalescing */

static int64_t last_key(int64_t from, int64_t target)
{
    uint64_t k = (uint64_t)from * 0x9E3779B97F4A7C15u ^ (uint64_t)target;

    return (int64_t)(k & INT64_MAX);
}

/* 1 when an event like q was forwarded less than coalesce_ms ago. */
static int coalesced(const struct treq *q)
{
    struct tlast *l = host->map_get(last, last_key(q->from, q->target));

    return coalesce_ms && l && l->from == q->from && l->target == q->target &&
           l->typing == q->typing && now_ms() - l->ms < coalesce_ms;
}

static void note_sent(const struct treq *q)
{
    int64_t k = last_key(q->from, q->target);
    struct tlast *l = host->map_get(last, k);

    if (!coalesce_ms)
        return;
    if (!l) {
        if (host->map_len(last) >= coalesce_max || !(l = host->malloc(sizeof(*l))))
            return;
        if (host->map_put(last, k, l) != CHAT_OK) {
            host->free(l);
            return;
        }
    }
    l->from = q->from;
    l->target = q->target;
    l->typing = q->typing;
    l->ms = now_ms();
}

static void sweep(struct chat_timer *t, void *ud)
{
    uint64_t now = now_ms();
    int64_t k;
    void *v;

    (void)t;
    (void)ud;
    for (size_t it = 0; host->map_next(last, &it, &k, &v);)
        if (now - ((struct tlast *)v)->ms >= coalesce_ms) {
            host->map_del(last, k);
            host->free(v);
        }
    for (size_t it = 0; host->map_next(groups, &it, &k, &v);)
        if (now - ((struct tgroup *)v)->loaded_ms >= member_ttl_ms) {
            host->map_del(groups, k);
            host->free(v);
        }
}

/* ------------------------------------------------------------------------ */
/* The checks and the answer */

static void answer(struct chat_session *s, const struct chat_ack *ack, int err,
                   const char *why)
{
    host->reply(s, ack, err, err ? why : NULL, NULL);
}

static int db_proto_errno(int rc)
{
    return rc == CHAT_ERR_BUSY || rc == CHAT_ERR_UNAVAILABLE || rc == CHAT_ERR_CLOSED
               ? CHAT_E_UNAVAILABLE
               : CHAT_E_INTERNAL;
}

/* The check passed: forward (unless coalesced) to ids and answer. */
static void finish(struct chat_session *s, const struct treq *q, const int64_t *ids,
                   size_t n)
{
    int64_t buf[1];
    size_t i, k = 0;
    int64_t *out = n > 1 ? host->malloc(n * sizeof(*out)) : buf;

    if (!out) {
        answer(s, &q->ack, CHAT_E_INTERNAL, "out of memory");
        return;
    }
    for (i = 0; i < n; i++)
        if (ids[i] != q->from)
            out[k++] = ids[i];
    if (!coalesced(q)) {
        if (k && forward(q, out, k, s) != CHAT_OK)
            chat_log(host, self, CHAT_LOG_WARN, "typing of %lld: not forwarded",
                     (long long)q->from);
        note_sent(q);
    }
    if (out != buf)
        host->free(out);
    answer(s, &q->ack, 0, NULL);
}

static int is_member(const struct tgroup *g, int64_t uid)
{
    return chat_ids_has(g->ids, g->n, uid);
}

static void group_checked(struct chat_session *s, const struct treq *q,
                          const struct tgroup *g)
{
    if (!is_member(g, q->from))
        answer(s, &q->ack, CHAT_E_NOT_MEMBER, "not a member of the group");
    else
        finish(s, q, g->ids, g->n);
}

static void lookup_done(const struct chat_db_result *r, void *ud)
{
    struct treq *q = ud;
    struct chat_session *s = host->session_get(q->sid);
    struct tgroup *g = NULL, *old;
    size_t i, n;
    int rc;

    inflight--;
    if ((rc = host->db_error(r)) != CHAT_OK) {
        if (s)
            answer(s, &q->ack, db_proto_errno(rc), "database unavailable, try again");
        goto out;
    }
    n = host->db_nrows(r);
    if (q->target > 0) {
        if (n && host->map_len(known) < known_max)
            host->map_put(known, q->target, (void *)1);
        if (!s)
            goto out;
        if (!n)
            answer(s, &q->ack, CHAT_E_NOT_FOUND, "unknown user");
        else
            finish(s, q, &q->target, 1);
        goto out;
    }
    if (n == 0) { /* a group has at least its creator */
        if (s)
            answer(s, &q->ack, CHAT_E_NOT_FOUND, "unknown group");
        goto out;
    }
    if (!(g = host->malloc(sizeof(*g) + n * sizeof(int64_t)))) {
        if (s)
            answer(s, &q->ack, CHAT_E_INTERNAL, "out of memory");
        goto out;
    }
    g->loaded_ms = now_ms();
    g->n = n;
    for (i = 0; i < n; i++) /* ORDER BY user_id */
        g->ids[i] = host->db_int(r, i, 0);
    if (s)
        group_checked(s, q, g);
    if ((old = host->map_del(groups, -q->target)))
        host->free(old);
    if (host->map_put(groups, -q->target, g) != CHAT_OK)
        host->free(g);
out:
    host->free(q);
}

/* Ask the database; takes q on CHAT_OK. */
static int lookup_start(struct treq *q)
{
    static const char user_sql[] = "SELECT id FROM users WHERE id = ?";
    static const char group_sql[] =
        "SELECT user_id FROM group_members WHERE group_id = ? ORDER BY user_id";
    struct chat_db_param p = CHAT_DB_P_INT(q->target > 0 ? q->target : -q->target);
    int rc;

    if (inflight >= lookups_max)
        return CHAT_ERR_BUSY;
    rc = host->db_query(self, q->target > 0 ? user_sql : group_sql, &p, 1, lookup_done, q);
    if (rc == CHAT_OK)
        inflight++;
    return rc;
}

/* ------------------------------------------------------------------------ */

/* "toid" / "groupid": exactly one, an integer >= 1.  The target, or 0. */
static int64_t req_target(const struct chat_request *req)
{
    int64_t to = 0, gid = 0;
    int a = host->req_int(req, "toid", &to), b = host->req_int(req, "groupid", &gid);

    if (a < 0 || b < 0 || a + b != 1)
        return 0;
    if (a == 1)
        return to >= 1 ? to : 0;
    return gid >= 1 ? -gid : 0;
}

static void on_typing(struct chat_session *s, const struct chat_request *req, void *ud)
{
    const struct tgroup *g;
    struct treq q, *qp;
    const char *t;
    size_t len;
    int64_t uid;
    int rc;

    (void)ud;
    if (host->session_proto(s) != CHAT_PROTO_2) { /* as 13..17: ignored */
        chat_log(host, self, CHAT_LOG_INFO, "TYPING from a legacy session: ignored");
        return;
    }
    if (!(uid = host->req_auth(s, req)))
        return;
    memset(&q, 0, sizeof(q));
    q.sid = host->session_id(s);
    q.ack = req->ack;
    q.from = uid;
    q.typing = 1;
    if (!(q.target = req_target(req))) {
        answer(s, &req->ack, CHAT_E_BAD_FIELD,
               "exactly one of toid and groupid, a positive integer");
        return;
    }
    if ((t = host->req_field_raw(req, "typing", &len)) != NULL) {
        if (len == 5 && !memcmp(t, "false", 5))
            q.typing = 0;
        else if (len != 4 || memcmp(t, "true", 4)) {
            answer(s, &req->ack, CHAT_E_BAD_FIELD, "typing must be true or false");
            return;
        }
    }
    if (q.target > 0 && host->map_get(known, q.target)) {
        finish(s, &q, &q.target, 1);
        return;
    }
    if (q.target < 0 && (g = host->map_get(groups, -q.target)) &&
        now_ms() - g->loaded_ms < member_ttl_ms &&
        (is_member(g, uid) || now_ms() - g->loaded_ms < TY_RECHECK_MS)) {
        group_checked(s, &q, g); /* not in a list older than 1 s: read again */
        return;
    }
    if (!(qp = host->malloc(sizeof(*qp)))) {
        answer(s, &req->ack, CHAT_E_INTERNAL, "out of memory");
        return;
    }
    *qp = q;
    if ((rc = lookup_start(qp)) != CHAT_OK) {
        host->free(qp);
        answer(s, &req->ack, db_proto_errno(rc), "busy, try again");
    }
}

/* ------------------------------------------------------------------------ */

static void read_conf(void)
{
    coalesce_ms = (uint64_t)chat_conf_range(host, self, "coalesce_ms", 2000, 0, 60000);
    coalesce_max = (size_t)chat_conf_range(host, self, "coalesce_max", 100000, 0, 10000000);
    member_ttl_ms = (uint64_t)chat_conf_range(host, self, "member_ttl_ms", 10000, 0,
                                              3600000);
    lookups_max = (size_t)chat_conf_range(host, self, "lookups_max", 1024, 1, 1000000);
}

static void free_all(struct chat_map *m)
{
    int64_t k;
    void *v;

    if (!m)
        return;
    for (size_t it = 0; host->map_next(m, &it, &k, &v);)
        if (v != (void *)1)
            host->free(v);
    host->map_free(m);
}

static int typing_init(const struct chat_host *h, struct chat_plugin *p, void **state)
{
    int rc;

    host = h;
    self = p;
    *state = NULL;
    CHAT_HOST_REQUIRE(h, p, register_handler_ex);
    read_conf();
    if (!(known = h->map_new()) || !(groups = h->map_new()) || !(last = h->map_new()))
        goto nomem;
    if ((rc = h->register_handler_ex(p, TY_MSG_TYPING, on_typing, NULL,
                                     CHAT_HANDLER_RAW)) != CHAT_OK ||
        (rc = h->register_hook(p, CHAT_EV_BROADCAST, on_broadcast, NULL)) != CHAT_OK)
        goto fail;
    if (!(sweeper = h->timer_start(p, 1000, 1000, sweep, NULL)))
        goto nomem;
    return CHAT_OK;
nomem:
    rc = CHAT_ERR_NOMEM;
fail:
    free_all(known);
    free_all(groups);
    free_all(last);
    known = groups = last = NULL;
    return rc;
}

static void typing_fini(void *state)
{
    (void)state;
    free_all(known);
    free_all(groups);
    free_all(last);
    known = groups = last = NULL;
}

static int typing_reconfigure(void *state)
{
    (void)state;
    read_conf();
    return CHAT_OK;
}

static const struct chat_plugin_desc typing_desc = {
    CHAT_PLUGIN_DESC_INIT(PLUGIN_NAME, "1.0.0"),
    .init = typing_init,
    .fini = typing_fini,
    .reconfigure = typing_reconfigure,
};

CHAT_PLUGIN_DECLARE(typing_desc)
