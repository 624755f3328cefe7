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
 *     the frame text is forwarded as is, as the seed forwards it.  Otherwise
 *     (a spoofed, missing or duplicated sender field, or a protocol-2 frame
 *     whose "seq"/"proto" belong to the sender's connection and are not
 *     forwarded) the message is rebuilt in a stack buffer with the session's
 *     id and name and every other field's raw text, so what a receiver sees
 *     as the sender is always the session's.
 *   - on a hot reload the known ids are handed to the new instance
 *     (save/restore), so it does not start cold.
 * Legacy sessions get nothing back (the seed sends nothing); protocol 2 gets
 * exactly one ACK per request: errno 0 once the message is handed to
 * deliver(), or 104/105/108/112.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "chat/plugin.h"

#define O2O_MSG_MAX_DEF 4096
#define O2O_KNOWN_MAX_DEF 1000000

static const struct chat_host *host;
static struct chat_plugin *self;
static size_t msg_max = O2O_MSG_MAX_DEF;
static size_t known_max = O2O_KNOWN_MAX_DEF;

/* ------------------------------------------------------------------------ */
/* int64 -> pointer map, open addressing with linear probing and backward-
 * shift deletion.  Key 0 marks an empty slot (user ids start at 1). */
struct idmap {
    int64_t *keys;
    void **vals;
    size_t cap; /* power of two, or 0 */
    size_t len;
};

static size_t idmap_hash(int64_t k, size_t mask)
{
    uint64_t h = (uint64_t)k * 0x9E3779B97F4A7C15ull;
    return (size_t)(h ^ (h >> 29)) & mask;
}

static void *idmap_get(const struct idmap *m, int64_t k)
{
    size_t mask, i;

    if (!m->cap)
        return NULL;
    mask = m->cap - 1;
    for (i = idmap_hash(k, mask); m->keys[i]; i = (i + 1) & mask)
        if (m->keys[i] == k)
            return m->vals[i];
    return NULL;
}

static int idmap_grow(struct idmap *m)
{
    size_t ncap = m->cap ? m->cap * 2 : 64, i, j, mask = ncap - 1;
    int64_t *nk = host->malloc(ncap * sizeof(*nk));
    void **nv = host->malloc(ncap * sizeof(*nv));

    if (!nk || !nv) {
        host->free(nk);
        host->free(nv);
        return CHAT_ERR_NOMEM;
    }
    memset(nk, 0, ncap * sizeof(*nk));
    for (i = 0; i < m->cap; i++) {
        if (!m->keys[i])
            continue;
        for (j = idmap_hash(m->keys[i], mask); nk[j]; j = (j + 1) & mask)
            ;
        nk[j] = m->keys[i];
        nv[j] = m->vals[i];
    }
    host->free(m->keys);
    host->free(m->vals);
    m->keys = nk;
    m->vals = nv;
    m->cap = ncap;
    return CHAT_OK;
}

/* Insert or replace; val must not be NULL. */
static int idmap_put(struct idmap *m, int64_t k, void *val)
{
    size_t mask, i;

    if ((m->len + 1) * 2 > m->cap && idmap_grow(m) != CHAT_OK)
        return CHAT_ERR_NOMEM;
    mask = m->cap - 1;
    for (i = idmap_hash(k, mask); m->keys[i]; i = (i + 1) & mask)
        if (m->keys[i] == k) {
            m->vals[i] = val;
            return CHAT_OK;
        }
    m->keys[i] = k;
    m->vals[i] = val;
    m->len++;
    return CHAT_OK;
}

static void idmap_del(struct idmap *m, int64_t k)
{
    size_t mask, i, j, h;

    if (!m->cap)
        return;
    mask = m->cap - 1;
    for (i = idmap_hash(k, mask); m->keys[i] != k; i = (i + 1) & mask)
        if (!m->keys[i])
            return;
    for (j = (i + 1) & mask; m->keys[j]; j = (j + 1) & mask) {
        h = idmap_hash(m->keys[j], mask);
        /* keep entry j where it is when its home slot lies in (i, j] */
        if (i <= j ? (i < h && h <= j) : (i < h || h <= j))
            continue;
        m->keys[i] = m->keys[j];
        m->vals[i] = m->vals[j];
        i = j;
    }
    m->keys[i] = 0;
    m->vals[i] = NULL;
    m->len--;
}

static void idmap_free(struct idmap *m)
{
    host->free(m->keys);
    host->free(m->vals);
    memset(m, 0, sizeof(*m));
}

/* ------------------------------------------------------------------------ */
/* A growing string for rebuilt messages.  It starts in the caller's stack
 * buffer and moves to the heap only when that is too small; on allocation
 * failure `err` is set and further appends do nothing. */
struct sbuf {
    char *p;
    size_t len, cap;
    int err, heap;
};

static void sb_init(struct sbuf *b, char *stack, size_t cap)
{
    b->p = stack;
    b->len = 0;
    b->cap = cap;
    b->err = 0;
    b->heap = 0;
}

static void sb_release(struct sbuf *b)
{
    if (b->heap)
        host->free(b->p);
}

static void sb_add(struct sbuf *b, const char *s, size_t n)
{
    if (b->err)
        return;
    if (b->len + n > b->cap) {
        size_t ncap = b->cap * 2;
        char *np;

        while (ncap < b->len + n)
            ncap *= 2;
        np = b->heap ? host->realloc(b->p, ncap) : host->malloc(ncap);
        if (!np) {
            b->err = 1;
            return;
        }
        if (!b->heap)
            memcpy(np, b->p, b->len);
        b->p = np;
        b->cap = ncap;
        b->heap = 1;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void sb_str(struct sbuf *b, const char *s) { sb_add(b, s, strlen(s)); }

static void sb_int(struct sbuf *b, int64_t v)
{
    char num[24];
    int n = snprintf(num, sizeof(num), "%lld", (long long)v);

    sb_add(b, num, (size_t)n);
}

/* s[0..n) as a JSON string literal: copied between quotes when nothing in
 * it needs an escape (no allocation), else through host->json_quote. */
static void sb_quoted(struct sbuf *b, const char *s, size_t n)
{
    size_t i, qlen;
    char *q;

    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];

        if (c < 0x20 || c == '"' || c == '\\')
            break;
    }
    if (i == n) {
        sb_add(b, "\"", 1);
        sb_add(b, s, n);
        sb_add(b, "\"", 1);
        return;
    }
    if (!(q = host->json_quote(s, n, &qlen))) {
        b->err = 1;
        return;
    }
    sb_add(b, q, qlen);
    host->free(q);
}

/* ------------------------------------------------------------------------ */
/* Request helpers. */

/* *out = the positive integer in member key; 0 if absent, not a number, not
 * integral or out of the range where a double holds integers exactly. */
static int get_id(const cJSON *obj, const char *key, int64_t *out)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    double d;

    if (!cJSON_IsNumber(it))
        return 0;
    d = it->valuedouble;
    if (!(d >= 1.0 && d <= 9007199254740991.0) || d != (double)(int64_t)d)
        return 0;
    *out = (int64_t)d;
    return 1;
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\0';
}

/* The frame without separators around it. */
static void frame_text(const struct chat_request *req, const char **p, size_t *n)
{
    const char *b = req->raw, *e = req->raw + req->raw_len;

    while (b < e && is_space(*b))
        b++;
    while (e > b && is_space(e[-1]))
        e--;
    *p = b;
    *n = (size_t)(e - b);
}

/* The members the forwarded message is built from, then the request's own
 * metadata ("seq", "proto": per connection, never forwarded); any other
 * member is copied. */
static const char *const own_keys[] = {"msgid", "id", "name", "toid", "msg",
                                       "time", "seq", "proto"};
#define OWN_KEYS (sizeof(own_keys) / sizeof(own_keys[0]))

static int own_key(const char *k)
{
    size_t i;

    for (i = 0; i < OWN_KEYS; i++)
        if (!strcmp(k, own_keys[i]))
            return (int)i;
    return -1;
}

/* 1 when the frame can go out as is: each of our members appears once (a
 * receiver whose parser keeps the last duplicate must see what we checked),
 * "id" and "name" are the session's, and there is no "seq"/"proto". */
static int sender_is_session(const struct chat_request *req, int64_t uid,
                             const char *sname)
{
    const cJSON *c;
    unsigned seen = 0;
    const char *raw, *dec;
    char num[24];
    size_t len, slen;
    int n, k;

    for (c = req->json->child; c; c = c->next) {
        if (!c->string || (k = own_key(c->string)) < 0)
            continue;
        if (seen & (1u << k))
            return 0;
        seen |= 1u << k;
    }
    if ((seen & 0xC6u) != 6u) /* "id" and "name"; no "seq", no "proto" */
        return 0;
    raw = host->req_field_raw(req, "id", &len);
    n = snprintf(num, sizeof(num), "%lld", (long long)uid);
    if (!raw || len != (size_t)n || memcmp(raw, num, len))
        return 0;
    raw = host->req_field_raw(req, "name", &len);
    slen = strlen(sname);
    if (!raw || len < 2 || raw[0] != '"')
        return 0;
    if (!memchr(raw, '\\', len))
        return len - 2 == slen && !memcmp(raw + 1, sname, slen);
    dec = host->req_field_str(req, "name", &len); /* escaped: compare decoded */
    return dec && len == slen && !memcmp(dec, sname, slen);
}

/* Append every member that is not ours, first occurrence only, raw text. */
static void add_other_members(struct sbuf *b, const struct chat_request *req)
{
    const cJSON *c, *d;

    for (c = req->json->child; c; c = c->next) {
        const char *raw;
        size_t len;

        if (!c->string || own_key(c->string) >= 0)
            continue;
        for (d = req->json->child; d != c; d = d->next)
            if (d->string && !strcmp(d->string, c->string))
                break;
        if (d != c)
            continue; /* a duplicate: the first one was copied */
        sb_add(b, ",", 1);
        sb_quoted(b, c->string, strlen(c->string));
        sb_add(b, ":", 1);
        if ((raw = host->req_field_raw(req, c->string, &len)) != NULL) {
            sb_add(b, raw, len);
        } else { /* not found by name (cannot happen with a valid frame) */
            char *p = cJSON_PrintUnformatted(c);

            if (!p) {
                b->err = 1;
                return;
            }
            sb_str(b, p);
            cJSON_free(p);
        }
    }
}

/* The message rebuilt into b with the session's sender fields:
 * {"msgid":6,"id":..,"name":..,"toid":..,"msg":..,"time":..,<others>}. */
static void rebuild(struct sbuf *b, const struct chat_request *req, int64_t uid,
                    const char *sname, int64_t toid)
{
    const char *raw;
    size_t len;

    sb_str(b, "{\"msgid\":6,\"id\":");
    sb_int(b, uid);
    sb_str(b, ",\"name\":");
    sb_quoted(b, sname, strlen(sname));
    sb_str(b, ",\"toid\":");
    sb_int(b, toid);
    raw = host->req_field_raw(req, "msg", &len);
    sb_str(b, ",\"msg\":");
    sb_add(b, raw, len);
    if ((raw = host->req_field_raw(req, "time", &len)) != NULL) {
        sb_str(b, ",\"time\":");
        sb_add(b, raw, len);
    }
    add_other_members(b, req);
    sb_add(b, "}", 1);
}

/* ------------------------------------------------------------------------ */
/* Answers. */

static void answer(struct chat_session *s, const struct chat_ack *ack, int64_t uid,
                   int err, const char *why)
{
    if (host->session_proto(s) == CHAT_PROTO_2) {
        host->reply(s, ack, err, err ? why : NULL, NULL);
        return;
    }
    if (err) /* the seed never answers a chat message */
        chat_log(host, self, CHAT_LOG_INFO, "user %lld: message dropped: %s",
                 (long long)uid, why);
}

static int deliver_errno(int rc)
{
    return rc == CHAT_ERR_BUSY || rc == CHAT_ERR_UNAVAILABLE ? CHAT_E_UNAVAILABLE
                                                             : CHAT_E_INTERNAL;
}

/* ------------------------------------------------------------------------ */
/* Recipients not yet known to exist: one SELECT per id, messages queued. */

static struct idmap known;   /* user ids known to exist; value (void *)1 */
static struct idmap lookups; /* user id -> struct lookup * in flight */

struct pmsg {
    struct pmsg *next;
    uint64_t sid;      /* the sender's session */
    int64_t from;      /* the sender's user id */
    struct chat_ack ack;
    size_t len;
    char json[];
};

struct lookup {
    int64_t uid;
    struct pmsg *head, **tail;
};

static void known_add(int64_t uid)
{
    if (known.len >= known_max) {
        chat_log(host, self, CHAT_LOG_INFO,
                 "known-user cache full (%zu ids): cleared", known.len);
        idmap_free(&known);
    }
    if (idmap_put(&known, uid, (void *)1) != CHAT_OK)
        chat_log(host, self, CHAT_LOG_WARN, "known-user cache: out of memory");
}

/* exists: 1 yes, 0 no, -1 could not tell (database down). */
static void lookup_flush(struct lookup *lk, int exists)
{
    struct pmsg *m, *next;

    for (m = lk->head; m; m = next) {
        struct chat_session *s = host->session_get(m->sid);
        int rc = CHAT_OK, err = 0;

        next = m->next;
        if (exists) /* when the database cannot tell, fail open */
            rc = host->deliver(self, lk->uid, m->json, m->len);
        else
            err = CHAT_E_NOT_FOUND;
        if (rc != CHAT_OK)
            err = deliver_errno(rc);
        if (s)
            answer(s, &m->ack, m->from, err,
                   err == CHAT_E_NOT_FOUND ? "unknown user" : "delivery failed");
        else if (err)
            chat_log(host, self, CHAT_LOG_INFO,
                     "user %lld: message to %lld dropped (errno %d)",
                     (long long)m->from, (long long)lk->uid, err);
        host->free(m);
    }
    host->free(lk);
}

static void lookup_done(const struct chat_db_result *r, void *ud)
{
    struct lookup *lk = ud;
    int exists;

    idmap_del(&lookups, lk->uid);
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
                        int64_t from, int64_t toid, const char *json, size_t len)
{
    struct lookup *lk = idmap_get(&lookups, toid);
    struct pmsg *m = host->malloc(sizeof(*m) + len);

    if (!m)
        return CHAT_E_INTERNAL;
    m->next = NULL;
    m->sid = host->session_id(s);
    m->from = from;
    m->ack = req->ack;
    m->len = len;
    memcpy(m->json, json, len);
    if (!lk) {
        struct chat_db_param p = CHAT_DB_P_INT(toid);
        int rc;

        lk = host->malloc(sizeof(*lk));
        if (!lk || idmap_put(&lookups, toid, lk) != CHAT_OK) {
            host->free(lk);
            host->free(m);
            return CHAT_E_INTERNAL;
        }
        lk->uid = toid;
        lk->head = NULL;
        lk->tail = &lk->head;
        rc = host->db_query(self, "SELECT 1 FROM users WHERE id = ?", &p, 1,
                            lookup_done, lk);
        if (rc != CHAT_OK) {
            idmap_del(&lookups, toid);
            host->free(lk);
            host->free(m);
            return deliver_errno(rc);
        }
    }
    *lk->tail = m;
    lk->tail = &m->next;
    return 0;
}

/* ------------------------------------------------------------------------ */

static void on_one_chat(struct chat_session *s, const struct chat_request *req,
                        void *ud)
{
    char stack[2048];
    struct sbuf b;
    int64_t uid, toid;
    const char *sname, *raw, *out;
    size_t len, outlen;
    int err = 0, rc;

    (void)ud;
    if (!(uid = host->req_auth(s, req)))
        return;
    if (!get_id(req->json, "toid", &toid)) {
        answer(s, &req->ack, uid, CHAT_E_BAD_FIELD, "toid must be a user id");
        return;
    }
    raw = host->req_field_raw(req, "msg", &len);
    if (!raw || len < 2 || raw[0] != '"') {
        answer(s, &req->ack, uid, CHAT_E_BAD_FIELD, "msg must be a string");
        return;
    }
    /* The raw literal is never shorter than the decoded text: decode only
     * when the literal is over the limit. */
    if (len - 2 > msg_max && (!host->req_field_str(req, "msg", &len) || len > msg_max)) {
        answer(s, &req->ack, uid, CHAT_E_TOO_LONG, "msg is too long");
        return;
    }
    sname = host->session_name(s);
    sb_init(&b, stack, sizeof(stack));
    if (sender_is_session(req, uid, sname)) {
        frame_text(req, &out, &outlen);
    } else {
        rebuild(&b, req, uid, sname, toid);
        if (b.err) {
            answer(s, &req->ack, uid, CHAT_E_INTERNAL, "out of memory");
            return;
        }
        out = b.p;
        outlen = b.len;
    }
    /* While toid is unknown its messages queue behind one lookup, so none
     * overtakes another; once known, no lookup for it is in flight. */
    if (idmap_get(&known, toid)) {
        rc = host->deliver(self, toid, out, outlen);
        err = rc == CHAT_OK ? 0 : deliver_errno(rc);
        answer(s, &req->ack, uid, err, "delivery failed");
    } else if ((err = lookup_queue(s, req, uid, toid, out, outlen)) != 0) {
        answer(s, &req->ack, uid, err, "cannot check the recipient now");
    }
    sb_release(&b);
}

/* ------------------------------------------------------------------------ */

static void read_conf(void)
{
    int64_t v = host->conf_int(self, "msg_max", O2O_MSG_MAX_DEF);

    msg_max = v > 0 ? (size_t)v : O2O_MSG_MAX_DEF;
    v = host->conf_int(self, "known_users_max", O2O_KNOWN_MAX_DEF);
    known_max = v > 0 ? (size_t)v : O2O_KNOWN_MAX_DEF;
}

static int o2o_init(const struct chat_host *h, struct chat_plugin *p, void **state)
{
    host = h;
    self = p;
    *state = NULL;
    if (h->abi_major != CHAT_ABI_MAJOR || !CHAT_HOST_HAS(h, db_query))
        return CHAT_ERR_ABI;
    read_conf();
    return h->register_handler(p, CHAT_MSG_ONE_CHAT, on_one_chat, NULL);
}

static void o2o_fini(void *state)
{
    (void)state;
    idmap_free(&known);
    idmap_free(&lookups); /* empty: the instance has drained */
}

static int o2o_reconfigure(void *state)
{
    (void)state;
    read_conf();
    return CHAT_OK;
}

/* Reload: hand the known ids to the next instance, so that it does not
 * start with a lookup per recipient (a lookup the old instance still has in
 * flight keeps its own queue and finishes there). */
static int o2o_save(void *state, void **blob, size_t *len)
{
    int64_t *ids;
    size_t i, n = 0;

    (void)state;
    if (!(ids = host->malloc((known.len ? known.len : 1) * sizeof(*ids))))
        return CHAT_ERR_NOMEM;
    for (i = 0; i < known.cap; i++)
        if (known.keys[i])
            ids[n++] = known.keys[i];
    *blob = ids;
    *len = n * sizeof(*ids);
    return CHAT_OK;
}

static int o2o_restore(void *state, const void *blob, size_t len)
{
    const unsigned char *p = blob;
    size_t i;

    (void)state;
    for (i = 0; i + sizeof(int64_t) <= len && known.len < known_max; i += sizeof(int64_t)) {
        int64_t id;

        memcpy(&id, p + i, sizeof(id));
        if (id > 0 && idmap_put(&known, id, (void *)1) != CHAT_OK)
            return CHAT_ERR_NOMEM;
    }
    chat_log(host, self, CHAT_LOG_INFO, "restored %zu known user ids", known.len);
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
