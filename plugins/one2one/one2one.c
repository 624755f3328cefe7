/*
 * one2one.c - ONE_CHAT_MSG (6): a message from one user to another, handed
 * to host->deliver(), which finds the recipient's session on this node or
 * another one, or raises CHAT_EV_UNDELIVERABLE (the offline plugin stores it).
 *
 * This is the hottest path of the service, so the design is about what it
 * does NOT do per message:
 *   - no database access: whether the recipient exists is answered by an
 *     in-memory set of user ids known to exist.  A miss costs one SELECT; the
 *     messages to that id wait in a queue per id (so a second message cannot
 *     overtake the first) until the answer comes back.  Users are never
 *     deleted, so the set needs no invalidation; only positive answers are
 *     kept.
 *   - no allocation and no re-serialisation when the client already put the
 *     session's own id and name in the frame (the seed client always does):
 *     host->req_forward() hands back the frame text as is, as the seed
 *     forwards it.  Otherwise (a spoofed, missing or duplicated sender
 *     field, or a protocol-2 frame whose "seq"/"proto" belong to the
 *     sender's connection) it rebuilds the message with the session's id and
 *     name and every other member's raw text, so what a receiver sees as the
 *     sender is always the session's.
 *   - on a hot reload the known ids are handed to the new instance
 *     (save/restore), so it does not start cold.
 * Legacy sessions get nothing back (the seed sends nothing); protocol 2 gets
 * exactly one ACK per request, and errno 0 only once the message is
 * delivered or stored: host->deliver_ex() hands it at once to a live session
 * on this node (answered at once: the hot path allocates nothing more), or
 * its outcome comes later (another node's subscriber took it, or the
 * offline store committed it) and the ACK waits for it.  Errors: 104/105,
 * 108 unknown user, 112, 113 busy (a bound of a queue, or the database is
 * failing: send again later), 128/129 the offline store's quotas (the
 * recipient's mailbox is full / too many from this sender: not stored; a
 * legacy sender gets nothing, the drop is logged and counted by the
 * offline plugin).
 *
 * Bounds.  The messages waiting for an existence check are bounded by
 * lookup_max_bytes in all and lookup_sender_max_bytes per sender (113
 * past them), so a stalled database cannot grow memory.  A message is
 * bounded as a whole: besides its "msg" text (msg_max bytes decoded) the
 * forwarded frame may hold extra_max bytes (ids, name, "time" and any
 * other member the client adds, all forwarded as sent); 105 past it.
 *
 * Durable messages (issue 8).  A protocol-2 message is stored before it
 * is acknowledged (durable = all, the default; durable = cid: only one
 * that carries a client message id "cid"): after the same
 * recipient check it goes to the group-committed writer
 * (plugins/store/writer.c, linked in), and only once its transaction has
 * committed does the sender get the ACK with "mid", "conv", "cseq" and the
 * recipient the message with those members added (deliver(): live here or
 * on another node, else the offline store for a legacy recipient; a
 * protocol-2 device gets it by SYNC).  A retry with the same cid is
 * answered with the original numbers and "dup":true and is not delivered
 * again; without a cid there is no such key, and a resend is stored as a
 * new message.  113 when the database cannot store it (send again, same
 * cid).  A pair conversation's id holds both user ids, so they must be
 * below 2^31: with a cid that is 104, without one the message takes the
 * non-durable path (as it did before durability became the default); so
 * does one without a cid while no plugin answers SYNC (ds_sync_served).
 */
#include <stdint.h>
#include <string.h>

#include "chat/plugin.h"
#include "../store/dstore.h"

#define O2O_MSG_MAX_DEF 4096
#define O2O_EXTRA_MAX_DEF 2048
#define O2O_KNOWN_MAX_DEF 1000000
#define O2O_LOOKUP_MAX_DEF (8 << 20)
#define O2O_LOOKUP_SENDER_MAX_DEF (256 << 10)

static const struct chat_host *host;
static struct chat_plugin *self;
static size_t msg_max = O2O_MSG_MAX_DEF;
static size_t extra_max = O2O_EXTRA_MAX_DEF;
static size_t known_max = O2O_KNOWN_MAX_DEF;
static size_t lookup_max = O2O_LOOKUP_MAX_DEF;
static size_t lookup_sender_max = O2O_LOOKUP_SENDER_MAX_DEF;
static struct ds_writer *writer; /* durable messages */
static struct ds_conf ds_cfg;
static int durable_all = 1;      /* durable = all: not only messages with a cid */
static int no_sync_warned;       /* ds_sync_served() logged its warning */

/* ------------------------------------------------------------------------ */
/* Answers. */

static void answer(struct chat_session *s, const struct chat_ack *ack, int64_t uid,
                   int err, const char *why)
{
    if (host->session_proto(s) == CHAT_PROTO_2) {
        host->reply(s, ack, err, err ? why : NULL, NULL);
        return;
    }
    if (err) /* the seed never answers a chat message; quota refusals are
              * logged (throttled) and counted by the offline plugin */
        chat_log(host, self,
                 err == CHAT_E_MAILBOX_FULL || err == CHAT_E_MAILBOX_SENDER
                     ? CHAT_LOG_DEBUG : CHAT_LOG_INFO,
                 "user %lld: message dropped: %s", (long long)uid, why);
}

static int deliver_errno(int rc)
{
    switch (rc) {
    case CHAT_OK: return 0;
    case CHAT_ERR_NOTFOUND: return CHAT_E_NOT_FOUND;
    case CHAT_ERR_QUOTA: return CHAT_E_MAILBOX_FULL;
    case CHAT_ERR_QUOTA_SENDER: return CHAT_E_MAILBOX_SENDER;
    case CHAT_ERR_BUSY:
    case CHAT_ERR_UNAVAILABLE:
    case CHAT_ERR_CLOSED:
    case CHAT_ERR_TIMEOUT: return CHAT_E_UNAVAILABLE;
    default: return CHAT_E_INTERNAL;
    }
}

static const char *deliver_why(int err)
{
    return err == CHAT_E_NOT_FOUND       ? "unknown user"
           : err == CHAT_E_UNAVAILABLE   ? "busy: not stored, send again later"
           : err == CHAT_E_MAILBOX_FULL  ? "recipient's mailbox is full"
           : err == CHAT_E_MAILBOX_SENDER ? "too many messages waiting for this "
                                           "recipient from you"
                                         : "delivery failed";
}

/* What a pending delivery needs to answer its sender (copied by the host
 * only when the outcome is pending). */
struct o2o_ctx {
    uint64_t sid;
    int64_t from;
    struct chat_ack ack;
};

static void delivered(int status, int64_t user_id, void *ctx)
{
    const struct o2o_ctx *c = ctx;
    struct chat_session *s = host->session_get(c->sid);
    int err = deliver_errno(status);

    if (s)
        answer(s, &c->ack, c->from, err, deliver_why(err));
    else if (err)
        chat_log(host, self, CHAT_LOG_INFO,
                 "user %lld: message to %lld not delivered (errno %d); the "
                 "sender is gone", (long long)c->from, (long long)user_id, err);
}

/* Multi-device (host ABI 1.9): the sender's other devices get a copy of
 * what it sent, durable or not, live (the sending device has its ack).
 * One pass over the sender's local sessions when it has a single device. */
static void echo(uint64_t sid, int64_t from, const char *json, size_t len)
{
    if (CHAT_HOST_HAS(host, deliver_devices))
        host->deliver_devices(from, host->session_get(sid), json, len);
}

/* Deliver json to toid and answer the sender now (delivered here, or an
 * error) or once the outcome is known.  s may be NULL (sender gone). */
static void send_one(struct chat_session *s, uint64_t sid, const struct chat_ack *ack,
                     int64_t from, int64_t toid, const char *json, size_t len)
{
    struct o2o_ctx c;
    int rc, err;

    c.sid = sid;
    c.from = from;
    c.ack = *ack;
    if (toid != from)
        echo(sid, from, json, len);
    rc = host->deliver_ex(self, from, toid, json, len, delivered, &c, sizeof(c));
    if (rc == CHAT_DELIVER_PENDING)
        return;
    err = deliver_errno(rc);
    if (s)
        answer(s, ack, from, err, deliver_why(err));
    else if (err)
        chat_log(host, self, CHAT_LOG_INFO,
                 "user %lld: message to %lld dropped (errno %d)", (long long)from,
                 (long long)toid, err);
}

/* ------------------------------------------------------------------------ */
/* Durable messages: stored first, then answered and delivered. */

struct o2o_dctx {
    uint64_t sid;
    int64_t from, toid;
    struct chat_ack ack;
    int has_cid;
};
_Static_assert(sizeof(struct o2o_dctx) <= DS_CTX_MAX, "ds_submit copies at most DS_CTX_MAX");

static void durable_answer(struct chat_session *s, const struct o2o_dctx *c,
                           const struct ds_result *r)
{
    if (r->status != CHAT_OK) {
        int err = r->status == CHAT_ERR_DB ? CHAT_E_INTERNAL : CHAT_E_UNAVAILABLE;

        answer(s, &c->ack, c->from, err,
               err == CHAT_E_INTERNAL ? "not stored"
               : c->has_cid           ? "busy: not stored, send again with the same cid"
                                      : "busy: not stored, send again later");
        return;
    }
    ds_reply_ok(host, s, &c->ack, r->conv, r->mid, r->cseq, r->dup);
}

static void durable_stored(const struct ds_result *r, const char *body, size_t len,
                           void *ctx)
{
    const struct o2o_dctx *c = ctx;
    struct chat_session *s;
    size_t n;
    char *text;

    if (r->status == CHAT_OK && !r->dup) {
        if ((text = ds_render(host, r->conv, r->mid, r->cseq, body, len, &n))) {
            host->deliver(self, c->toid, text, n); /* best effort: SYNC has it */
            if (c->toid != c->from)
                echo(c->sid, c->from, text, n);
            host->free(text);
        } else {
            chat_log(host, self, CHAT_LOG_WARN, "message %lld stored but not "
                     "delivered live: out of memory", (long long)r->mid);
        }
    }
    if ((s = host->session_get(c->sid)))
        durable_answer(s, c, r);
}

/* Hand a durable message to the writer; the answer comes once stored. */
static void durable_send(struct chat_session *s, uint64_t sid, const struct chat_ack *ack,
                         int64_t from, int64_t toid, const char *json, size_t len,
                         const char *cid, size_t cid_len)
{
    struct o2o_dctx c;
    struct ds_msg m;
    int rc;

    c.sid = sid;
    c.from = from;
    c.toid = toid;
    c.ack = *ack;
    c.has_cid = cid_len > 0;
    m.conv = ds_conv_pair(from, toid);
    m.sender = from;
    m.cid = cid;
    m.cid_len = cid_len;
    m.body = json;
    m.body_len = len;
    rc = ds_submit(writer, &m, durable_stored, &c, sizeof(c));
    if (rc != CHAT_OK && s)
        answer(s, ack, from, rc == CHAT_ERR_BUSY ? CHAT_E_UNAVAILABLE : CHAT_E_INTERNAL,
               rc == CHAT_ERR_BUSY ? "busy: too many messages wait to be stored"
                                   : "out of memory");
}

/* ------------------------------------------------------------------------ */
/* Recipients not yet known to exist: one SELECT per id, messages queued. */

static struct chat_map *known;   /* user ids known to exist; value (void *)1 */
static struct chat_map *lookups; /* user id -> struct lookup * in flight */
static struct chat_map *waiting; /* sender -> (uintptr_t) bytes queued */
static size_t waiting_total;     /* bytes queued behind lookups */

struct pmsg {
    struct pmsg *next;
    uint64_t sid;      /* the sender's session */
    int64_t from;      /* the sender's user id */
    struct chat_ack ack;
    size_t len;
    size_t cid_len;    /* its cid (if any) follows json */
    int durable;       /* stored first (durable_send) */
    char json[];
};

struct lookup {
    int64_t uid;
    struct pmsg *head, **tail;
};

#define PMSG_COST(len) (sizeof(struct pmsg) + (len))

static size_t waiting_of(int64_t from)
{
    return (size_t)(uintptr_t)host->map_get(waiting, from);
}

static void waiting_sub(int64_t from, size_t bytes)
{
    size_t v = waiting_of(from) - bytes;

    waiting_total -= bytes;
    if (v)
        host->map_put(waiting, from, (void *)(uintptr_t)v); /* present: no alloc */
    else
        host->map_del(waiting, from);
}

/* Account bytes to from's share: 0, or 113 past a bound (or out of memory). */
static int waiting_add(int64_t from, size_t bytes)
{
    size_t v = waiting_of(from);

    if (waiting_total + bytes > lookup_max || v + bytes > lookup_sender_max ||
        host->map_put(waiting, from, (void *)(uintptr_t)(v + bytes)) != CHAT_OK)
        return CHAT_E_UNAVAILABLE;
    waiting_total += bytes;
    return 0;
}

static void known_add(int64_t uid)
{
    size_t n = host->map_len(known);
    struct chat_map *empty;

    if (n >= known_max) {
        if (!(empty = host->map_new())) {
            chat_log(host, self, CHAT_LOG_WARN, "known-user cache: out of memory");
            return;
        }
        host->map_free(known);
        known = empty;
        chat_log(host, self, CHAT_LOG_INFO, "known-user cache full (%zu ids): cleared", n);
    }
    if (host->map_put(known, uid, (void *)1) != CHAT_OK)
        chat_log(host, self, CHAT_LOG_WARN, "known-user cache: out of memory");
}

/* exists: 1 yes, 0 no, -1 could not tell (database down). */
static void lookup_flush(struct lookup *lk, int exists)
{
    struct pmsg *m, *next;

    for (m = lk->head; m; m = next) {
        struct chat_session *s = host->session_get(m->sid);

        next = m->next;
        waiting_sub(m->from, PMSG_COST(m->len + m->cid_len));
        if (exists && m->durable) /* when the database cannot tell, fail open */
            durable_send(s, m->sid, &m->ack, m->from, lk->uid, m->json, m->len,
                         m->cid_len ? m->json + m->len : NULL, m->cid_len);
        else if (exists)
            send_one(s, m->sid, &m->ack, m->from, lk->uid, m->json, m->len);
        else if (s)
            answer(s, &m->ack, m->from, CHAT_E_NOT_FOUND, "unknown user");
        host->free(m);
    }
    host->free(lk);
}

static void lookup_done(const struct chat_db_result *r, void *ud)
{
    struct lookup *lk = ud;
    int exists;

    host->map_del(lookups, lk->uid);
    if (host->db_error(r) != CHAT_OK) {
        chat_log(host, self, CHAT_LOG_WARN,
                 "user %lld: existence check failed (%s): delivering anyway",
                 (long long)lk->uid, host->db_errmsg(r));
        exists = -1;
    } else {
        exists = host->db_nrows(r) > 0;
        if (exists)
            known_add(lk->uid);
    }
    lookup_flush(lk, exists);
}

/* Queue json for toid behind the lookup of toid (started if needed).
 * Returns a protocol errno, 0 when queued. */
static int lookup_queue(struct chat_session *s, const struct chat_request *req,
                        int64_t from, int64_t toid, const char *json, size_t len,
                        int durable, const char *cid, size_t cid_len)
{
    struct lookup *lk = host->map_get(lookups, toid);
    struct pmsg *m;
    size_t total = len + cid_len;

    if (waiting_add(from, PMSG_COST(total)) != 0)
        return CHAT_E_UNAVAILABLE;
    if (!(m = host->malloc(PMSG_COST(total)))) {
        waiting_sub(from, PMSG_COST(total));
        return CHAT_E_INTERNAL;
    }
    m->next = NULL;
    m->sid = host->session_id(s);
    m->from = from;
    m->ack = req->ack;
    m->len = len;
    m->cid_len = cid_len;
    m->durable = durable;
    memcpy(m->json, json, len);
    if (cid_len)
        memcpy(m->json + len, cid, cid_len);
    if (!lk) {
        struct chat_db_param p = CHAT_DB_P_INT(toid);
        int rc;

        lk = host->malloc(sizeof(*lk));
        if (!lk || host->map_put(lookups, toid, lk) != CHAT_OK) {
            host->free(lk);
            host->free(m);
            waiting_sub(from, PMSG_COST(total));
            return CHAT_E_INTERNAL;
        }
        lk->uid = toid;
        lk->head = NULL;
        lk->tail = &lk->head;
        rc = host->db_query(self, "SELECT 1 FROM users WHERE id = ?", &p, 1,
                            lookup_done, lk);
        if (rc != CHAT_OK) {
            host->map_del(lookups, toid);
            host->free(lk);
            host->free(m);
            waiting_sub(from, PMSG_COST(total));
            return deliver_errno(rc);
        }
    }
    *lk->tail = m;
    lk->tail = &m->next;
    return 0;
}

/* ------------------------------------------------------------------------ */

/* Whether the message is durable: 1 (stored first; *cid and *len set to
 * its "cid" when it has one, else NULL and 0), 0 (the non-durable path: a
 * legacy session, or without a cid: durable = cid, user ids past a pair
 * conversation's, or no plugin answering SYNC), -1 when answered with an
 * error. */
static int durable_mode(struct chat_session *s, const struct chat_request *req,
                        int64_t uid, int64_t toid, const char **cid, size_t *len)
{
    size_t rl;

    *cid = NULL;
    *len = 0;
    if (host->session_proto(s) != CHAT_PROTO_2)
        return 0;
    if (!host->req_field_raw(req, "cid", &rl))
        return durable_all && uid <= DS_UID_MAX && toid <= DS_UID_MAX &&
               ds_sync_served(host, self, &no_sync_warned);
    if (!(*cid = host->req_field_str(req, "cid", len)) || *len == 0 || *len > DS_CID_MAX) {
        answer(s, &req->ack, uid, CHAT_E_BAD_FIELD, "cid must be a string of 1 to 64 bytes");
        return -1;
    }
    if (uid > DS_UID_MAX || toid > DS_UID_MAX) {
        answer(s, &req->ack, uid, CHAT_E_BAD_FIELD,
               "durable messages need user ids below 2^31");
        return -1;
    }
    return 1;
}

static void on_one_chat(struct chat_session *s, const struct chat_request *req,
                        void *ud)
{
    int64_t uid, toid;
    const char *raw, *out, *cid;
    size_t len, rawlen, outlen, cid_len;
    int err, durable;

    (void)ud;
    if (!(uid = host->req_auth(s, req)))
        return;
    if (host->req_int(req, "toid", &toid) != 1 || toid <= 0) {
        answer(s, &req->ack, uid, CHAT_E_BAD_FIELD, "toid must be a user id");
        return;
    }
    raw = host->req_field_raw(req, "msg", &len);
    if (!raw || len < 2 || raw[0] != '"') {
        answer(s, &req->ack, uid, CHAT_E_BAD_FIELD, "msg must be a string");
        return;
    }
    rawlen = len;
    /* The raw literal is never shorter than the decoded text: decode only
     * when the literal is over the limit. */
    if (len - 2 > msg_max && (!host->req_field_str(req, "msg", &len) || len > msg_max)) {
        answer(s, &req->ack, uid, CHAT_E_TOO_LONG, "msg is too long");
        return;
    }
    if (!(out = host->req_forward(s, req, &outlen))) {
        answer(s, &req->ack, uid, CHAT_E_INTERNAL, "out of memory");
        return;
    }
    if (outlen > rawlen && outlen - rawlen > extra_max) {
        answer(s, &req->ack, uid, CHAT_E_TOO_LONG, "message too large");
        return;
    }
    if ((durable = durable_mode(s, req, uid, toid, &cid, &cid_len)) < 0)
        return;
    /* While toid is unknown its messages queue behind one lookup, so none
     * overtakes another; once known, no lookup for it is in flight. */
    if (host->map_get(known, toid) && durable)
        durable_send(s, host->session_id(s), &req->ack, uid, toid, out, outlen, cid,
                     cid_len);
    else if (host->map_get(known, toid))
        send_one(s, host->session_id(s), &req->ack, uid, toid, out, outlen);
    else if ((err = lookup_queue(s, req, uid, toid, out, outlen, durable, cid,
                                 cid_len)) != 0)
        answer(s, &req->ack, uid, err,
               err == CHAT_E_UNAVAILABLE ? "busy: cannot check the recipient now"
                                         : "cannot check the recipient now");
}

/* ------------------------------------------------------------------------ */

/* CHAT_ERR_INVAL (logged) when durable is neither all nor cid: nothing
 * is applied then (a reload keeps the previous settings). */
static int read_conf(void)
{
    int rc;

    if ((rc = ds_conf_mode(host, self, &durable_all)) != CHAT_OK)
        return rc;
    msg_max = (size_t)chat_conf_range(host, self, "msg_max", O2O_MSG_MAX_DEF, 1,
                                      INT64_MAX);
    known_max = (size_t)chat_conf_range(host, self, "known_users_max",
                                        O2O_KNOWN_MAX_DEF, 1, INT64_MAX);
    extra_max = (size_t)chat_conf_range(host, self, "extra_max", O2O_EXTRA_MAX_DEF,
                                        256, INT32_MAX);
    lookup_max = (size_t)chat_conf_range(host, self, "lookup_max_bytes",
                                         O2O_LOOKUP_MAX_DEF, 4096, INT64_MAX);
    lookup_sender_max = (size_t)chat_conf_range(host, self, "lookup_sender_max_bytes",
                                                O2O_LOOKUP_SENDER_MAX_DEF, 1024,
                                                INT64_MAX);
    ds_conf_read(host, self, &ds_cfg);
    if (writer)
        ds_writer_reconf(writer, &ds_cfg);
    return CHAT_OK;
}

static int o2o_init(const struct chat_host *h, struct chat_plugin *p, void **state)
{
    int rc;

    host = h;
    self = p;
    *state = NULL;
    CHAT_HOST_REQUIRE(h, p, deliver_ex);
    if ((rc = read_conf()) != CHAT_OK)
        return rc;
    /* the hot path: no cJSON tree, fields are read from the raw frame */
    if ((rc = h->register_handler_ex(p, CHAT_MSG_ONE_CHAT, on_one_chat, NULL,
                                     CHAT_HANDLER_RAW)) != CHAT_OK)
        return rc;
    if (!(known = h->map_new()))
        return CHAT_ERR_NOMEM;
    if (!(lookups = h->map_new()) || !(waiting = h->map_new()) ||
        !(writer = ds_writer_new(h, p, &ds_cfg))) {
        h->map_free(waiting);
        h->map_free(lookups);
        h->map_free(known);
        return CHAT_ERR_NOMEM;
    }
    return CHAT_OK;
}

static void o2o_fini(void *state)
{
    (void)state;
    host->map_free(known);
    host->map_free(lookups); /* empty: the instance has drained */
    host->map_free(waiting);
    ds_writer_free(writer);
    writer = NULL;
}

static int o2o_reconfigure(void *state)
{
    (void)state;
    return read_conf();
}

/* Reload: hand the known ids to the next instance, so that it does not
 * start with a lookup per recipient (a lookup the old instance still has in
 * flight keeps its own queue and finishes there). */
static int o2o_save(void *state, void **blob, size_t *len)
{
    size_t it, n = host->map_len(known);
    int64_t *ids, id;
    void *v;

    (void)state;
    if (!(ids = host->malloc((n ? n : 1) * sizeof(*ids))))
        return CHAT_ERR_NOMEM;
    n = 0;
    for (it = 0; host->map_next(known, &it, &id, &v);)
        ids[n++] = id;
    *blob = ids;
    *len = n * sizeof(*ids);
    return CHAT_OK;
}

static int o2o_restore(void *state, const void *blob, size_t len)
{
    const unsigned char *p = blob;
    size_t i;

    (void)state;
    for (i = 0; i + sizeof(int64_t) <= len && host->map_len(known) < known_max;
         i += sizeof(int64_t)) {
        int64_t id;

        memcpy(&id, p + i, sizeof(id));
        if (id > 0 && host->map_put(known, id, (void *)1) != CHAT_OK)
            return CHAT_ERR_NOMEM;
    }
    chat_log(host, self, CHAT_LOG_INFO, "restored %zu known user ids",
             host->map_len(known));
    return CHAT_OK;
}

static const struct chat_plugin_desc o2o_desc = {
    CHAT_PLUGIN_DESC_INIT("one2one", "1.0.0"),
    .init = o2o_init,
    .fini = o2o_fini,
    .save = o2o_save,
    .restore = o2o_restore,
    .reconfigure = o2o_reconfigure,
};

CHAT_PLUGIN_DECLARE(o2o_desc)
