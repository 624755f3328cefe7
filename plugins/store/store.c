/*
 * store.c - the store plugin: SYNC (15), HISTORY (16) and READ (17) over the
 * durable messages that the one2one and group plugins write (writer.c).
 * docs/architecture.md, "Durable messaging", is the design;
 * docs/protocol.md, "Durable messages", the wire.
 *
 * SYNC.  The device says where it is: the last cseq it holds per
 * conversation (a conversation it does not name is at 0).  One query lists
 * the user's conversations with their heads (pairs from conv_heads.user_a /
 * user_b, groups from group_members joined to conv_heads); then, for the
 * conversations behind, in conv_id order, the missing range is read in one
 * statement each (cseq > pos ORDER BY cseq LIMIT allot), the allotments
 * adding up to at most `limit` messages.  The reply lists every
 * conversation's head, the messages conversation by conversation in cseq
 * order, and "more" when some conversation is still behind.  Nothing is
 * kept per device: the position is the device's, so any node answers and a
 * lost reply costs a repeat.  Rows are never past the head read first (the
 * LIMIT stops at it), so after a reply without "more" the device is at
 * every head it was given.
 *
 * HISTORY.  One conversation, the `limit` messages before `before`,
 * participants only (a pair: one of its two users; a group: a member).
 * Under group_history = joined (the default) a member sees a group's
 * messages from when it joined (created_at >= group_members.joined_at,
 * both stamped by the MariaDB server); SYNC applies the same rule.
 *
 * READ (receipts).  A participant says how far it has received
 * ("delivered") and read a conversation; conv_marks keeps the larger
 * values (they only grow, capped at the head) in one small transaction
 * that also checks the participant (a group: its membership).  The ACK
 * returns the stored marks; in a pair the other user's devices are told
 * live (protocol 2 only) through host->broadcast to this plugin on every
 * node, which hands it to a local session of that user: deliver() would
 * send it to a legacy client or the offline store.  In a group the members
 * are told the same way, coalesced per group with the group's aggregate
 * ("read by all up to"; gmarks.c).  SYNC returns the marks with the heads
 * (the user's own; in a pair the other user's; in a group the lowest among
 * the other members), so a device that was away clears its unread counts.
 *
 * Retention.  With retention_count (keep the newest N messages of each
 * conversation) and/or retention_seconds (keep what is younger), a timer
 * walks conv_heads in pages of 64 conversations (a cursor on conv_id) and
 * deletes each conversation's expired prefix in DELETEs of at most
 * purge_batch rows, one statement in flight at a time, so the purge never
 * competes with the writers for more than one pool connection.  Messages go
 * oldest first, so what is kept is always a contiguous run up to the head.
 *
 * Everything goes through the pool (db_query); the loop never waits.  A
 * request holds its answer state until its last query returns; the session
 * is looked up again by id then (it may be gone).
 */
#include <stdlib.h>

#include "dstore.h"
#include "gmarks.h"

#define ST_SYNC_LIMIT_DEF 500
#define ST_HISTORY_LIMIT_DEF 50

static const struct chat_host *host;
static struct chat_plugin *self;
static size_t sync_limit_max = ST_SYNC_LIMIT_DEF;
static size_t history_limit_max = 200;
static int history_all; /* group_history = all */
static int64_t retention_count;   /* 0: keep all */
static int64_t retention_seconds; /* 0: forever */
static int64_t purge_batch = 500;
static int64_t purge_interval_ms = 1000;

static void answer(struct chat_session *s, const struct chat_ack *ack, int err,
                   const char *why, const cJSON *body)
{
    host->reply(s, ack, err, err ? why : NULL, body);
}

static int db_proto_errno(int rc)
{
    return rc == CHAT_ERR_BUSY || rc == CHAT_ERR_UNAVAILABLE || rc == CHAT_ERR_CLOSED
               ? CHAT_E_UNAVAILABLE
               : CHAT_E_INTERNAL;
}

/* A row (cseq, id, body) of conv as its delivered text, into arr.  0, or
 * -1 when out of memory. */
static int add_message(cJSON *arr, const struct chat_db_result *r, size_t row,
                       int64_t conv)
{
    size_t len, n;
    const char *body = host->db_str(r, row, 2, &len);
    char *text = ds_render(host, conv, host->db_int(r, row, 1), host->db_int(r, row, 0),
                           body, len, &n);
    cJSON *item;

    if (!text)
        return -1;
    item = cJSON_CreateRaw(text);
    host->free(text);
    if (!item)
        return -1;
    cJSON_AddItemToArray(arr, item);
    return 0;
}

/* The messages of conv after pos (SYNC: ascending, "after") or before it
 * (HISTORY: descending).  joined: the member's joined_at, or NULL. */
static int read_range(int64_t conv, int64_t pos, int after, const char *joined,
                      size_t limit, chat_db_cb cb, void *ud)
{
    static const char *const sql[2][2] = {
        {"SELECT cseq, id, body FROM messages WHERE conv_id = ? AND cseq < ?"
         " ORDER BY cseq DESC LIMIT ?",
         "SELECT cseq, id, body FROM messages WHERE conv_id = ? AND cseq < ?"
         " AND created_at >= ? ORDER BY cseq DESC LIMIT ?"},
        {"SELECT cseq, id, body FROM messages WHERE conv_id = ? AND cseq > ?"
         " ORDER BY cseq LIMIT ?",
         "SELECT cseq, id, body FROM messages WHERE conv_id = ? AND cseq > ?"
         " AND created_at >= ? ORDER BY cseq LIMIT ?"}};
    struct chat_db_param p[4];
    size_t n = 0;
    int j = joined && !history_all;

    p[n++] = CHAT_DB_P_INT(conv);
    p[n++] = CHAT_DB_P_INT(pos);
    if (j)
        p[n++] = CHAT_DB_P_STR(joined, strlen(joined));
    p[n++] = CHAT_DB_P_INT(limit);
    return host->db_query(self, sql[after][j], p, n, cb, ud);
}

/* ------------------------------------------------------------------------ */
/* SYNC */

struct sync_conv {
    int64_t conv, head, pos;
    int64_t mark[4];  /* own delivered, own read, peer's delivered, read; -1: none */
    size_t allot, got;
    char joined[32];  /* group: joined_at as text; "" for pairs */
    cJSON *msgs;      /* its rows, once read */
};

struct sync_req {
    uint64_t sid;
    int64_t uid;
    struct chat_ack ack;
    size_t limit;
    struct chat_map *pos;     /* conv -> (uintptr_t)(pos + 1) */
    struct sync_conv *convs;
    size_t nconvs;
    size_t pending;
    int err;                  /* first failure: a protocol errno */
};

struct sync_part {
    struct sync_req *q;
    size_t idx;
};

static void sync_free(struct sync_req *q)
{
    size_t i;

    for (i = 0; i < q->nconvs; i++)
        cJSON_Delete(q->convs[i].msgs);
    host->free(q->convs);
    host->map_free(q->pos);
    host->free(q);
}

/* A group's "peer" marks are the aggregate: the lowest of the others. */
static void add_marks(cJSON *c, const int64_t *mark, int group)
{
    static const char *const keys[2][4] = {
        {"delivered", "read", "peer_delivered", "peer_read"},
        {"delivered", "read", "all_delivered", "all_read"}};
    size_t i;

    for (i = 0; i < 4; i++)
        if (mark[i] >= 0)
            cJSON_AddNumberToObject(c, keys[group][i], (double)mark[i]);
}

static void sync_reply(struct sync_req *q)
{
    struct chat_session *s = host->session_get(q->sid);
    cJSON *body = NULL, *convs, *msgs, *c;
    char name[DS_CONV_STR];
    size_t i;
    int more = 0;

    if (!s)
        goto out;
    if (q->err) {
        answer(s, &q->ack, q->err, q->err == CHAT_E_UNAVAILABLE
               ? "database unavailable, try again" : "cannot read the messages", NULL);
        goto out;
    }
    if (!(body = cJSON_CreateObject()) ||
        !(convs = cJSON_AddArrayToObject(body, "convs")) ||
        !(msgs = cJSON_AddArrayToObject(body, "msgs")))
        goto nomem;
    for (i = 0; i < q->nconvs; i++) {
        struct sync_conv *sc = &q->convs[i];

        ds_conv_format(sc->conv, name, sizeof(name));
        if (!(c = cJSON_CreateObject()))
            goto nomem;
        cJSON_AddItemToArray(convs, c);
        cJSON_AddStringToObject(c, "conv", name);
        cJSON_AddNumberToObject(c, "head", (double)sc->head);
        add_marks(c, sc->mark, sc->conv < 0);
        /* behind and not all read: a full allotment, or none given */
        if (sc->head > sc->pos && (size_t)(sc->head - sc->pos) > sc->allot &&
            sc->got == sc->allot)
            more = 1;
        while (sc->msgs && cJSON_GetArraySize(sc->msgs) > 0)
            cJSON_AddItemToArray(msgs, cJSON_DetachItemFromArray(sc->msgs, 0));
    }
    cJSON_AddBoolToObject(body, "more", more);
    answer(s, &q->ack, 0, NULL, body);
    goto out;
nomem:
    answer(s, &q->ack, CHAT_E_INTERNAL, "out of memory", NULL);
out:
    cJSON_Delete(body);
    sync_free(q);
}

static void sync_part_done(struct sync_req *q)
{
    if (--q->pending == 0)
        sync_reply(q);
}

static void range_read(const struct chat_db_result *r, void *ud)
{
    struct sync_part *part = ud;
    struct sync_req *q = part->q;
    struct sync_conv *sc = &q->convs[part->idx];
    size_t i, n;
    int rc;

    host->free(part);
    if ((rc = host->db_error(r)) != CHAT_OK) {
        if (!q->err)
            q->err = db_proto_errno(rc);
    } else if (!(sc->msgs = cJSON_CreateArray())) {
        q->err = CHAT_E_INTERNAL;
    } else {
        n = host->db_nrows(r);
        for (i = 0; i < n && !q->err; i++)
            if (add_message(sc->msgs, r, i, sc->conv) != 0)
                q->err = CHAT_E_INTERNAL;
        sc->got = n;
    }
    sync_part_done(q);
}

static int conv_cmp(const void *a, const void *b)
{
    const struct sync_conv *x = a, *y = b;

    return (x->conv > y->conv) - (x->conv < y->conv);
}

/* The user's conversations and heads are known: read what is missing. */
static void heads_read(const struct chat_db_result *r, void *ud)
{
    struct sync_req *q = ud;
    size_t i, n, left = q->limit;
    int rc;

    q->pending = 1; /* this function's own share */
    if ((rc = host->db_error(r)) != CHAT_OK) {
        q->err = db_proto_errno(rc);
        goto out;
    }
    n = host->db_nrows(r);
    if (n && !(q->convs = host->malloc(n * sizeof(*q->convs)))) {
        q->err = CHAT_E_INTERNAL;
        goto out;
    }
    for (i = 0; i < n; i++) {
        struct sync_conv *sc = &q->convs[q->nconvs++];
        uintptr_t p;
        size_t len;
        const char *j;

        size_t k;

        memset(sc, 0, sizeof(*sc));
        sc->conv = host->db_int(r, i, 0);
        sc->head = host->db_int(r, i, 1);
        for (k = 0; k < 4; k++)
            sc->mark[k] = host->db_is_null(r, i, 3 + k) ? -1 : host->db_int(r, i, 3 + k);
        p = (uintptr_t)host->map_get(q->pos, sc->conv);
        sc->pos = p ? (int64_t)(p - 1) : 0;
        if (!host->db_is_null(r, i, 2) && (j = host->db_str(r, i, 2, &len)) &&
            len < sizeof(sc->joined))
            memcpy(sc->joined, j, len + 1);
    }
    if (q->nconvs) /* (qsort of NULL, 0 is undefined) */
        qsort(q->convs, q->nconvs, sizeof(*q->convs), conv_cmp);
    for (i = 0; i < q->nconvs && left > 0; i++) {
        struct sync_conv *sc = &q->convs[i];
        struct sync_part *part;

        if (sc->head <= sc->pos)
            continue;
        sc->allot = (size_t)(sc->head - sc->pos) < left ? (size_t)(sc->head - sc->pos)
                                                        : left;
        left -= sc->allot;
        if (!(part = host->malloc(sizeof(*part)))) {
            q->err = CHAT_E_INTERNAL;
            break;
        }
        part->q = q;
        part->idx = i;
        rc = read_range(sc->conv, sc->pos, 1, sc->joined[0] ? sc->joined : NULL,
                        sc->allot, range_read, part);
        if (rc != CHAT_OK) {
            host->free(part);
            q->err = db_proto_errno(rc);
            break;
        }
        q->pending++;
    }
out:
    sync_part_done(q);
}

/* "convs": [{"conv":"p1:2","cseq":12}, ...] into q->pos.  0, or an errmsg. */
static const char *sync_positions(struct sync_req *q, const cJSON *convs)
{
    const cJSON *e;

    if (!convs)
        return NULL;
    if (!cJSON_IsArray(convs))
        return "convs must be an array of {conv, cseq}";
    cJSON_ArrayForEach(e, convs) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(e, "conv");
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(e, "cseq");
        int64_t conv;

        if (!cJSON_IsString(c) || !cJSON_IsNumber(n) || n->valuedouble < 0 ||
            n->valuedouble > 9007199254740991.0 ||
            n->valuedouble != (double)(int64_t)n->valuedouble ||
            !(conv = ds_conv_parse(c->valuestring, strlen(c->valuestring))))
            return "convs must be an array of {conv, cseq}";
        if (host->map_put(q->pos, conv, (void *)(uintptr_t)((int64_t)n->valuedouble + 1)) !=
            CHAT_OK)
            return "out of memory";
    }
    return NULL;
}

/* 1..max, def when absent; -1 when present and not such an integer. */
static int64_t req_limit(const struct chat_request *req, int64_t def, int64_t max)
{
    int64_t v;
    int rc = host->req_int(req, "limit", &v);

    if (rc == 0)
        return def;
    return rc == 1 && v >= 1 && v <= max ? v : -1;
}

static void on_sync(struct chat_session *s, const struct chat_request *req, void *ud)
{
    /* the user's conversations, heads and marks (own; a pair: the peer's) */
    static const char sql[] =
        "SELECT h.conv_id, h.head, NULL, o.delivered, o.read_seq, p.delivered,"
        " p.read_seq FROM conv_heads h"
        " LEFT JOIN conv_marks o ON o.conv_id = h.conv_id AND o.user_id = h.user_a"
        " LEFT JOIN conv_marks p ON p.conv_id = h.conv_id AND p.user_id = h.user_b"
        " WHERE h.user_a = ?"
        " UNION ALL SELECT h.conv_id, h.head, NULL, o.delivered, o.read_seq,"
        " p.delivered, p.read_seq FROM conv_heads h"
        " LEFT JOIN conv_marks o ON o.conv_id = h.conv_id AND o.user_id = h.user_b"
        " LEFT JOIN conv_marks p ON p.conv_id = h.conv_id AND p.user_id = h.user_a"
        " WHERE h.user_b = ? AND h.user_a <> ?"
        " UNION ALL SELECT h.conv_id, h.head, m.joined_at, o.delivered, o.read_seq,"
        " (SELECT MIN(COALESCE(x.delivered, 0)) FROM group_members g2"
        "  LEFT JOIN conv_marks x ON x.conv_id = h.conv_id AND x.user_id = g2.user_id"
        "  WHERE g2.group_id = m.group_id AND g2.user_id <> m.user_id),"
        " (SELECT MIN(COALESCE(x.read_seq, 0)) FROM group_members g2"
        "  LEFT JOIN conv_marks x ON x.conv_id = h.conv_id AND x.user_id = g2.user_id"
        "  WHERE g2.group_id = m.group_id AND g2.user_id <> m.user_id)"
        " FROM group_members m"
        " JOIN conv_heads h ON h.conv_id = -m.group_id"
        " LEFT JOIN conv_marks o ON o.conv_id = h.conv_id AND o.user_id = m.user_id"
        " WHERE m.user_id = ?";
    struct chat_db_param p[4];
    struct sync_req *q;
    const char *why;
    int64_t uid, limit;
    int rc;

    (void)ud;
    if (host->session_proto(s) != CHAT_PROTO_2) { /* as 13 and 14: ignored */
        chat_log(host, self, CHAT_LOG_INFO, "SYNC from a legacy session: ignored");
        return;
    }
    if (!(uid = host->req_auth(s, req)))
        return;
    if ((limit = req_limit(req, (int64_t)sync_limit_max, (int64_t)sync_limit_max)) < 0) {
        answer(s, &req->ack, CHAT_E_BAD_FIELD, "limit must be an integer in 1..max", NULL);
        return;
    }
    if (!(q = host->malloc(sizeof(*q)))) {
        answer(s, &req->ack, CHAT_E_INTERNAL, "out of memory", NULL);
        return;
    }
    memset(q, 0, sizeof(*q));
    q->sid = host->session_id(s);
    q->uid = uid;
    q->ack = req->ack;
    q->limit = (size_t)limit;
    if (!(q->pos = host->map_new())) {
        host->free(q);
        answer(s, &req->ack, CHAT_E_INTERNAL, "out of memory", NULL);
        return;
    }
    if ((why = sync_positions(q, cJSON_GetObjectItemCaseSensitive(req->json, "convs")))) {
        answer(s, &req->ack, why[0] == 'o' ? CHAT_E_INTERNAL : CHAT_E_BAD_FIELD, why, NULL);
        sync_free(q);
        return;
    }
    p[0] = p[1] = p[2] = p[3] = CHAT_DB_P_INT(uid);
    if ((rc = host->db_query(self, sql, p, 4, heads_read, q)) != CHAT_OK) {
        answer(s, &req->ack, db_proto_errno(rc), "database unavailable, try again", NULL);
        sync_free(q);
    }
}

/* ------------------------------------------------------------------------ */
/* HISTORY */

struct hist_req {
    uint64_t sid;
    struct chat_ack ack;
    int64_t conv, before;
    size_t limit;
};

static void history_read(const struct chat_db_result *r, void *ud)
{
    struct hist_req *h = ud;
    struct chat_session *s = host->session_get(h->sid);
    cJSON *body = NULL, *msgs;
    char name[DS_CONV_STR];
    size_t n, i;
    int rc;

    if (!s)
        goto out;
    if ((rc = host->db_error(r)) != CHAT_OK) {
        answer(s, &h->ack, db_proto_errno(rc), "database unavailable, try again", NULL);
        goto out;
    }
    n = host->db_nrows(r);
    ds_conv_format(h->conv, name, sizeof(name));
    if (!(body = cJSON_CreateObject()) || !cJSON_AddStringToObject(body, "conv", name) ||
        !(msgs = cJSON_AddArrayToObject(body, "msgs")))
        goto nomem;
    /* read newest first, one more than asked (to tell "more"); sent oldest first */
    for (i = n > h->limit ? h->limit : n; i-- > 0;)
        if (add_message(msgs, r, i, h->conv) != 0)
            goto nomem;
    cJSON_AddBoolToObject(body, "more", n > h->limit);
    answer(s, &h->ack, 0, NULL, body);
    goto out;
nomem:
    answer(s, &h->ack, CHAT_E_INTERNAL, "out of memory", NULL);
out:
    cJSON_Delete(body);
    host->free(h);
}

static void history_start(struct chat_session *s, struct hist_req *h, const char *joined)
{
    int rc = read_range(h->conv, h->before, 0, joined, h->limit + 1, history_read, h);

    if (rc != CHAT_OK) {
        if (s)
            answer(s, &h->ack, db_proto_errno(rc), "database unavailable, try again",
                   NULL);
        host->free(h);
    }
}

static void member_read(const struct chat_db_result *r, void *ud)
{
    struct hist_req *h = ud;
    struct chat_session *s = host->session_get(h->sid);
    char joined[32];
    const char *j;
    size_t len;
    int rc;

    if (!s) {
        host->free(h);
        return;
    }
    if ((rc = host->db_error(r)) != CHAT_OK) {
        answer(s, &h->ack, db_proto_errno(rc), "database unavailable, try again", NULL);
        host->free(h);
        return;
    }
    if (host->db_nrows(r) == 0) {
        answer(s, &h->ack, DS_E_NOT_PARTICIPANT, "not a participant of the conversation",
               NULL);
        host->free(h);
        return;
    }
    j = host->db_str(r, 0, 0, &len);
    if (len >= sizeof(joined))
        len = 0;
    memcpy(joined, j, len);
    joined[len] = '\0';
    history_start(s, h, joined);
}

static void on_history(struct chat_session *s, const struct chat_request *req, void *ud)
{
    struct hist_req *h;
    const char *c;
    size_t len;
    int64_t uid, a, b, limit, before = INT64_MAX;
    int rc;

    (void)ud;
    if (host->session_proto(s) != CHAT_PROTO_2) {
        chat_log(host, self, CHAT_LOG_INFO, "HISTORY from a legacy session: ignored");
        return;
    }
    if (!(uid = host->req_auth(s, req)))
        return;
    c = host->req_field_str(req, "conv", &len);
    if (!c || !(a = ds_conv_parse(c, len))) {
        answer(s, &req->ack, CHAT_E_BAD_FIELD, "conv must be a conversation (\"pA:B\" or "
               "\"gG\")", NULL);
        return;
    }
    if ((rc = host->req_int(req, "before", &before)) < 0 || (rc == 1 && before < 1)) {
        answer(s, &req->ack, CHAT_E_BAD_FIELD, "before must be a positive integer", NULL);
        return;
    }
    if ((limit = req_limit(req, ST_HISTORY_LIMIT_DEF, (int64_t)history_limit_max)) < 0) {
        answer(s, &req->ack, CHAT_E_BAD_FIELD, "limit must be an integer in 1..max", NULL);
        return;
    }
    if (!(h = host->malloc(sizeof(*h)))) {
        answer(s, &req->ack, CHAT_E_INTERNAL, "out of memory", NULL);
        return;
    }
    h->sid = host->session_id(s);
    h->ack = req->ack;
    h->conv = a;
    h->before = before;
    h->limit = (size_t)limit;
    if (a > 0) { /* a pair: its users are in its id */
        ds_conv_users(a, &a, &b);
        if (uid != a && uid != b) {
            answer(s, &req->ack, DS_E_NOT_PARTICIPANT,
                   "not a participant of the conversation", NULL);
            host->free(h);
            return;
        }
        history_start(s, h, NULL);
        return;
    } else {
        struct chat_db_param p[2] = {CHAT_DB_P_INT(-a), CHAT_DB_P_INT(uid)};

        rc = host->db_query(self, "SELECT joined_at FROM group_members"
                            " WHERE group_id = ? AND user_id = ?", p, 2, member_read, h);
        if (rc != CHAT_OK) {
            answer(s, &req->ack, db_proto_errno(rc), "database unavailable, try again",
                   NULL);
            host->free(h);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* READ (receipts) */

struct mark_req {
    uint64_t sid;
    struct chat_ack ack;
    int64_t uid, conv;
};

/* Tell the peer's protocol-2 sessions on this node (broadcast hook). */
static void on_broadcast(int event, const void *arg, void *ud)
{
    const struct chat_ev_broadcast *ev = arg;
    long long peer, conv, reader, dl, rd;
    char buf[128], name[DS_CONV_STR];
    struct chat_session *s, *next;
    cJSON *o;

    (void)ud;
    if (event == CHAT_EV_BROADCAST && ev->len > 2 && ev->data[0] == 'G') {
        gm_broadcast(ev->data, ev->len); /* group receipts: gmarks.c */
        return;
    }
    if (event != CHAT_EV_BROADCAST || ev->len >= sizeof(buf))
        return;
    memcpy(buf, ev->data, ev->len);
    buf[ev->len] = '\0';
    if (sscanf(buf, "mark %lld %lld %lld %lld %lld", &peer, &conv, &reader, &dl, &rd) != 5)
        return;
    if (!(s = host->session_by_user(peer)) || !(o = cJSON_CreateObject()))
        return;
    ds_conv_format(conv, name, sizeof(name));
    cJSON_AddNumberToObject(o, "msgid", DS_MSG_READ);
    cJSON_AddStringToObject(o, "conv", name);
    cJSON_AddNumberToObject(o, "id", (double)reader);
    cJSON_AddNumberToObject(o, "delivered", (double)dl);
    cJSON_AddNumberToObject(o, "read", (double)rd);
    /* every device of the peer here (multi-device, host ABI 1.9) */
    for (; s; s = next) {
        next = CHAT_HOST_HAS(host, session_next_device) ? host->session_next_device(s)
                                                        : NULL;
        if (host->session_proto(s) == CHAT_PROTO_2)
            host->send_json(s, o); /* may close s: next was taken first */
    }
    cJSON_Delete(o);
}

static void mark_done(const struct chat_db_result *r, void *ud)
{
    struct mark_req *m = ud;
    struct chat_session *s = host->session_get(m->sid);
    const struct chat_db_result *sel = host->db_sub(r, 1);
    char name[DS_CONV_STR], note[128];
    int64_t dl, rd, a, b;
    cJSON *body;
    int rc, n;

    if ((rc = host->db_error(r)) != CHAT_OK || !sel) {
        if (s)
            answer(s, &m->ack, db_proto_errno(rc), rc == CHAT_ERR_UNAVAILABLE ||
                   rc == CHAT_ERR_BUSY ? "database unavailable, try again"
                                       : "cannot store the marks", NULL);
        goto out;
    }
    if (host->db_nrows(sel) == 0) {
        if (s)
            answer(s, &m->ack, DS_E_NOT_PARTICIPANT,
                   "not a participant of the conversation", NULL);
        goto out;
    }
    dl = host->db_int(sel, 0, 0);
    rd = host->db_int(sel, 0, 1);
    if (m->conv > 0) { /* a pair: tell the other user, wherever it is */
        ds_conv_users(m->conv, &a, &b);
        n = snprintf(note, sizeof(note), "mark %lld %lld %lld %lld %lld",
                     (long long)(a == m->uid ? b : a), (long long)m->conv,
                     (long long)m->uid, (long long)dl, (long long)rd);
        if (n > 0 && (size_t)n < sizeof(note))
            host->broadcast(self, note, (size_t)n);
    } else { /* a group: the members, coalesced (gmarks.c) */
        gm_note(-m->conv, m->uid, dl, rd);
    }
    if (s && (body = cJSON_CreateObject())) {
        ds_conv_format(m->conv, name, sizeof(name));
        cJSON_AddStringToObject(body, "conv", name);
        cJSON_AddNumberToObject(body, "delivered", (double)dl);
        cJSON_AddNumberToObject(body, "read", (double)rd);
        answer(s, &m->ack, 0, NULL, body);
        cJSON_Delete(body);
    } else if (s) {
        answer(s, &m->ack, CHAT_E_INTERNAL, "out of memory", NULL);
    }
out:
    host->free(m);
}

/* "read"/"delivered": absent (0), or an integer >= 0.  -1 when bad. */
static int mark_field(const struct chat_request *req, const char *key, int64_t *v)
{
    int rc = host->req_int(req, key, v);

    if (rc == 0)
        *v = 0;
    return rc < 0 || *v < 0 ? -1 : rc;
}

static void on_read(struct chat_session *s, const struct chat_request *req, void *ud)
{
    static const char pair_sql[] =
        "INSERT INTO conv_marks (conv_id, user_id, delivered, read_seq)"
        " SELECT h.conv_id, ?, LEAST(?, h.head), LEAST(?, h.head) FROM conv_heads h"
        " WHERE h.conv_id = ? ON DUPLICATE KEY UPDATE"
        " delivered = GREATEST(delivered, VALUES(delivered)),"
        " read_seq = GREATEST(read_seq, VALUES(read_seq))";
    static const char group_sql[] =
        "INSERT INTO conv_marks (conv_id, user_id, delivered, read_seq)"
        " SELECT h.conv_id, ?, LEAST(?, h.head), LEAST(?, h.head) FROM conv_heads h"
        " JOIN group_members m ON m.group_id = -h.conv_id AND m.user_id = ?"
        " WHERE h.conv_id = ? ON DUPLICATE KEY UPDATE"
        " delivered = GREATEST(delivered, VALUES(delivered)),"
        " read_seq = GREATEST(read_seq, VALUES(read_seq))";
    static const char sel_sql[] =
        "SELECT delivered, read_seq FROM conv_marks WHERE conv_id = ? AND user_id = ?";
    struct chat_db_param p[5], q[2];
    struct chat_db_stmt st[2];
    struct mark_req *m;
    const char *c;
    size_t len, np = 0;
    int64_t uid, conv, a, b, dl, rd;
    int hd, hr, rc;

    (void)ud;
    if (host->session_proto(s) != CHAT_PROTO_2) {
        chat_log(host, self, CHAT_LOG_INFO, "READ from a legacy session: ignored");
        return;
    }
    if (!(uid = host->req_auth(s, req)))
        return;
    c = host->req_field_str(req, "conv", &len);
    if (!c || !(conv = ds_conv_parse(c, len))) {
        answer(s, &req->ack, CHAT_E_BAD_FIELD, "conv must be a conversation (\"pA:B\" or "
               "\"gG\")", NULL);
        return;
    }
    if ((hd = mark_field(req, "delivered", &dl)) < 0 || (hr = mark_field(req, "read", &rd)) < 0 ||
        !(hd || hr)) {
        answer(s, &req->ack, CHAT_E_BAD_FIELD,
               "read and/or delivered must be an integer >= 0", NULL);
        return;
    }
    if (conv > 0) {
        ds_conv_users(conv, &a, &b);
        if (uid != a && uid != b) {
            answer(s, &req->ack, DS_E_NOT_PARTICIPANT,
                   "not a participant of the conversation", NULL);
            return;
        }
    }
    if (!(m = host->malloc(sizeof(*m)))) {
        answer(s, &req->ack, CHAT_E_INTERNAL, "out of memory", NULL);
        return;
    }
    m->sid = host->session_id(s);
    m->ack = req->ack;
    m->uid = uid;
    m->conv = conv;
    p[np++] = CHAT_DB_P_INT(uid);
    p[np++] = CHAT_DB_P_INT(dl > rd ? dl : rd); /* what is read was delivered */
    p[np++] = CHAT_DB_P_INT(rd);
    if (conv < 0)
        p[np++] = CHAT_DB_P_INT(uid);
    p[np++] = CHAT_DB_P_INT(conv);
    q[0] = CHAT_DB_P_INT(conv);
    q[1] = CHAT_DB_P_INT(uid);
    st[0].sql = conv > 0 ? pair_sql : group_sql;
    st[0].params = p;
    st[0].nparams = np;
    st[1].sql = sel_sql;
    st[1].params = q;
    st[1].nparams = 2;
    if ((rc = host->db_txn(self, st, 2, mark_done, m)) != CHAT_OK) {
        answer(s, &req->ack, db_proto_errno(rc), "database unavailable, try again", NULL);
        host->free(m);
    }
}

/* ------------------------------------------------------------------------ */
/* Retention */

#define PURGE_PAGE 64

static struct {
    struct chat_timer *timer;
    int busy;
    int64_t cursor;               /* the last conv_id of the page done */
    int64_t conv[PURGE_PAGE], head[PURGE_PAGE];
    size_t n, i;
    int64_t bound;                /* delete cseq <= bound of conv[i] */
} pg;

static void purge_next(void);

static void purge_fail(const struct chat_db_result *r)
{
    chat_log(host, self, CHAT_LOG_WARN, "retention: %s; again later", host->db_errmsg(r));
    pg.busy = 0; /* the next tick starts this page again */
}

static void purge_deleted(const struct chat_db_result *r, void *ud)
{
    (void)ud;
    if (host->db_error(r) != CHAT_OK) {
        purge_fail(r);
        return;
    }
    if ((int64_t)host->db_affected(r) < purge_batch)
        pg.i++; /* this conversation is done */
    purge_next();
}

static void purge_delete(void)
{
    struct chat_db_param p[3] = {CHAT_DB_P_INT(pg.conv[pg.i]), CHAT_DB_P_INT(pg.bound),
                                 CHAT_DB_P_INT(purge_batch)};

    if (host->db_query(self, "DELETE FROM messages WHERE conv_id = ? AND cseq <= ?"
                       " ORDER BY cseq LIMIT ?", p, 3, purge_deleted, NULL) != CHAT_OK)
        pg.busy = 0;
}

/* The first message young enough to keep: everything before it expires. */
static void purge_aged(const struct chat_db_result *r, void *ud)
{
    int64_t keep_from;

    (void)ud;
    if (host->db_error(r) != CHAT_OK) {
        purge_fail(r);
        return;
    }
    keep_from = host->db_nrows(r) ? host->db_int(r, 0, 0) : pg.head[pg.i] + 1;
    if (keep_from - 1 > pg.bound)
        pg.bound = keep_from - 1;
    if (pg.bound < 1) {
        pg.i++;
        purge_next();
        return;
    }
    purge_delete();
}

/* Work on conv[i]: its bound from the count, then (with an age) the age. */
static void purge_next(void)
{
    struct chat_db_param p[2];

    for (;;) {
        if (pg.i >= pg.n) {
            pg.busy = 0;
            return;
        }
        pg.bound = retention_count ? pg.head[pg.i] - retention_count : 0;
        if (retention_seconds)
            break;
        if (pg.bound >= 1) {
            purge_delete();
            return;
        }
        pg.i++;
    }
    p[0] = CHAT_DB_P_INT(pg.conv[pg.i]);
    p[1] = CHAT_DB_P_INT(retention_seconds);
    if (host->db_query(self, "SELECT cseq FROM messages WHERE conv_id = ? AND"
                       " created_at >= NOW(3) - INTERVAL ? SECOND ORDER BY cseq LIMIT 1",
                       p, 2, purge_aged, NULL) != CHAT_OK)
        pg.busy = 0;
}

static void purge_page(const struct chat_db_result *r, void *ud)
{
    size_t i;

    (void)ud;
    if (host->db_error(r) != CHAT_OK) {
        purge_fail(r);
        return;
    }
    pg.n = host->db_nrows(r);
    for (i = 0; i < pg.n; i++) {
        pg.conv[i] = host->db_int(r, i, 0);
        pg.head[i] = host->db_int(r, i, 1);
    }
    pg.i = 0;
    /* the next page starts after this one; after the last, from the start */
    pg.cursor = pg.n == PURGE_PAGE ? pg.conv[pg.n - 1] : INT64_MIN;
    purge_next();
}

static void purge_tick(struct chat_timer *t, void *ud)
{
    struct chat_db_param p[2];

    (void)t;
    (void)ud;
    if (pg.busy || (!retention_count && !retention_seconds))
        return;
    p[0] = CHAT_DB_P_INT(pg.cursor);
    p[1] = CHAT_DB_P_INT(PURGE_PAGE);
    if (host->db_query(self, "SELECT conv_id, head FROM conv_heads WHERE conv_id > ?"
                       " ORDER BY conv_id LIMIT ?", p, 2, purge_page, NULL) == CHAT_OK)
        pg.busy = 1;
}

/* ------------------------------------------------------------------------ */

static int read_conf(void)
{
    const char *g = host->conf_get(self, "group_history", "joined");

    sync_limit_max = (size_t)chat_conf_range(host, self, "sync_limit_max",
                                             ST_SYNC_LIMIT_DEF, 1, 10000);
    history_limit_max = (size_t)chat_conf_range(host, self, "history_limit_max", 200, 1,
                                                10000);
    if (strcmp(g, "joined") != 0 && strcmp(g, "all") != 0) {
        chat_log(host, self, CHAT_LOG_ERROR, "group_history = %s: must be joined or all",
                 g);
        return CHAT_ERR_INVAL;
    }
    history_all = strcmp(g, "all") == 0;
    retention_count = chat_conf_range(host, self, "retention_count", 0, 0, INT64_MAX);
    retention_seconds = chat_conf_range(host, self, "retention_seconds", 0, 0,
                                        INT64_C(1) << 40);
    purge_batch = chat_conf_range(host, self, "purge_batch", 500, 1, 100000);
    purge_interval_ms = chat_conf_range(host, self, "purge_interval_ms", 1000, 10, 3600000);
    gm_conf();
    return CHAT_OK;
}

static int store_init(const struct chat_host *h, struct chat_plugin *p, void **state)
{
    int rc;

    host = h;
    self = p;
    *state = NULL;
    CHAT_HOST_REQUIRE(h, p, req_int);
    if ((rc = gm_start(h, p)) != CHAT_OK)
        return rc;
    if ((rc = read_conf()) != CHAT_OK) {
        gm_fini();
        return rc;
    }
    if ((rc = h->register_handler(p, DS_MSG_SYNC, on_sync, NULL)) != CHAT_OK ||
        (rc = h->register_handler(p, DS_MSG_HISTORY, on_history, NULL)) != CHAT_OK ||
        (rc = h->register_handler(p, DS_MSG_READ, on_read, NULL)) != CHAT_OK ||
        (rc = h->register_hook(p, CHAT_EV_BROADCAST, on_broadcast, NULL)) != CHAT_OK)
        return rc;
    pg.cursor = INT64_MIN;
    if (!(pg.timer = h->timer_start(p, (uint64_t)purge_interval_ms,
                                    (uint64_t)purge_interval_ms, purge_tick, NULL)))
        return CHAT_ERR_NOMEM;
    return CHAT_OK;
}

static void store_fini(void *state)
{
    (void)state;
    gm_fini();
}

static int store_reconfigure(void *state)
{
    int64_t was = purge_interval_ms;
    int rc;

    (void)state;
    if ((rc = read_conf()) != CHAT_OK)
        return rc;
    if (purge_interval_ms != was && pg.timer) {
        host->timer_stop(pg.timer);
        pg.timer = host->timer_start(self, (uint64_t)purge_interval_ms,
                                     (uint64_t)purge_interval_ms, purge_tick, NULL);
        if (!pg.timer)
            chat_log(host, self, CHAT_LOG_ERROR, "retention: no timer, out of memory");
    }
    return CHAT_OK;
}

static const struct chat_plugin_desc store_desc = {
    CHAT_PLUGIN_DESC_INIT("store", "1.0.0"),
    .init = store_init,
    .fini = store_fini,
    .reconfigure = store_reconfigure,
};

CHAT_PLUGIN_DECLARE(store_desc)
