/*
 * group_list.c - the user's groups with all their members: the "groups"
 * part of the login ack, and GROUP_LIST (14, protocol 2).
 *
 * One SELECT returns a row per (group of the user, member of that group);
 * one presence_query gives the members' live state.  The list is written
 * as JSON text from the database bytes (json_quote), so names and
 * descriptions round-trip exactly.  Legacy sessions get the seed's shape:
 * each group a JSON string of {"groupdesc","groupname","id","users"} whose
 * "users" are JSON strings of {"id","name","role","state"} (the seed's
 * nlohmann output, keys sorted); protocol 2 gets the same as objects.
 *
 * The rows as read (struct grp_ldata) are kept in the list cache
 * (group_lcache.c) for list_cache_ttl seconds, so a user's next login or
 * GROUP_LIST costs no SELECT until the list changes; presence is still
 * queried for every answer.  Requests for a user whose list is being read
 * wait for that one SELECT (loads coalesce), unless an invalidation came
 * since it was sent: then they send their own.  With list_cache_ttl = 0
 * every request sends its own SELECT and nothing is kept.
 */
#include <stdlib.h>
#include <string.h>

#include "group.h"

/* One request for a list. */
struct list_req {
    struct list_req *next; /* waiting for the same load */
    struct chat_login *l;  /* the login part being answered, or NULL */
    uint64_t sid;          /* GROUP_LIST: the session to answer */
    struct chat_ack ack;
    int proto;
    int64_t uid;
    struct grp_ldata *d;   /* the list (a reference), once known */
};

/* One SELECT in flight, with the requests waiting for it. */
struct list_load {
    int64_t uid;
    uint64_t gen;          /* grp_lcache_gen() when it was sent */
    struct list_req *head, **tail;
};

/* user id -> the load later requests of that user may wait for (only
 * while the cache is on) */
static struct chat_map *loads;

void grp_ldata_unref(struct grp_ldata *d)
{
    if (!d || --d->refs)
        return;
    grp.host->free(d->rows);
    grp.host->free(d->groups);
    grp.host->free(d->uids);
    grp.host->free(d->text);
    grp.host->free(d);
}

static void list_free(struct list_req *q)
{
    grp_ldata_unref(q->d);
    grp.host->free(q);
}

static int cmp_id(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

    return (x > y) - (x < y);
}

static int online_of(const struct grp_ldata *d, const unsigned char *online,
                     int64_t uid)
{
    const int64_t *p;

    if (!online)
        return 0;
    p = bsearch(&uid, d->uids, d->nuids, sizeof(*d->uids), cmp_id);
    return p && online[p - d->uids];
}

/* Append group g's JSON text to b. */
static void group_text(struct grp_sb *b, const struct list_req *q,
                       const struct grp_lgroup *g, const unsigned char *online)
{
    const struct grp_ldata *d = q->d;
    int legacy = q->proto != CHAT_PROTO_2;
    struct grp_sb u = {0};
    size_t i;

    if (legacy) {
        grp_sb_str(b, "{\"groupdesc\":");
        grp_sb_str(b, d->text + g->desc);
        grp_sb_str(b, ",\"groupname\":");
        grp_sb_str(b, d->text + g->name);
        grp_sb_str(b, ",\"id\":");
        grp_sb_int(b, g->gid);
    } else {
        grp_sb_str(b, "{\"id\":");
        grp_sb_int(b, g->gid);
        grp_sb_str(b, ",\"groupname\":");
        grp_sb_str(b, d->text + g->name);
        grp_sb_str(b, ",\"groupdesc\":");
        grp_sb_str(b, d->text + g->desc);
    }
    grp_sb_str(b, ",\"users\":[");
    for (i = 0; i < g->n; i++) {
        const struct grp_lrow *r = &d->rows[g->first + i];

        u.len = 0;
        grp_sb_str(&u, "{\"id\":");
        grp_sb_int(&u, r->uid);
        grp_sb_str(&u, ",\"name\":");
        grp_sb_str(&u, d->text + r->name);
        grp_sb_str(&u, r->creator ? ",\"role\":\"creator\"" : ",\"role\":\"normal\"");
        grp_sb_str(&u, online_of(d, online, r->uid) ? ",\"state\":\"online\"}"
                                                      : ",\"state\":\"offline\"}");
        if (u.err)
            break;
        if (i)
            grp_sb_str(b, ",");
        if (legacy) { /* the seed's users are JSON strings */
            size_t qlen;
            char *s = grp.host->json_quote(u.p, u.len, &qlen);

            if (!s) {
                b->err = 1;
                break;
            }
            grp_sb_add(b, s, qlen);
            grp.host->free(s);
        } else {
            grp_sb_add(b, u.p, u.len);
        }
    }
    if (u.err)
        b->err = 1;
    grp_sb_release(&u);
    grp_sb_str(b, "]}");
}

static cJSON *build_array(const struct list_req *q, const unsigned char *online)
{
    cJSON *arr = cJSON_CreateArray(), *item;
    struct grp_sb b = {0};
    size_t i;

    for (i = 0; arr && i < q->d->ngroups; i++) {
        b.len = 0;
        group_text(&b, q, &q->d->groups[i], online);
        item = b.err ? NULL
                     : q->proto == CHAT_PROTO_2 ? cJSON_CreateRaw(b.p) : cJSON_CreateString(b.p);
        if (!item) {
            cJSON_Delete(arr);
            arr = NULL;
            break;
        }
        cJSON_AddItemToArray(arr, item);
    }
    grp_sb_release(&b);
    return arr;
}

/* Answer q with its list (online may be NULL: all offline) or with err,
 * and free q. */
static void list_finish(struct list_req *q, const unsigned char *online, int err,
                        const char *why)
{
    cJSON *arr = err ? NULL : build_array(q, online), *body = NULL;
    struct chat_session *s;

    if (!err && !arr) {
        err = CHAT_E_INTERNAL;
        why = "out of memory";
    }
    if (q->l) {
        grp.host->login_part_set(q->l, arr, NULL); /* takes arr */
        list_free(q);
        return;
    }
    if (!(s = grp.host->session_get(q->sid))) {
        cJSON_Delete(arr);
        list_free(q);
        return;
    }
    if (!err) {
        if ((body = cJSON_CreateObject()) != NULL) {
            cJSON_AddItemToObject(body, "groups", arr); /* takes arr */
        } else {
            cJSON_Delete(arr);
            err = CHAT_E_INTERNAL;
            why = "out of memory";
        }
    }
    grp_answer(s, &q->ack, q->uid, err, why, body);
    cJSON_Delete(body);
    list_free(q);
}

static void list_presence(int status, const int64_t *uids, const unsigned char *online,
                          size_t n, void *ud)
{
    struct list_req *q = ud;

    (void)uids;
    if (status != CHAT_OK || n != q->d->nuids) {
        chat_log(grp.host, grp.self, CHAT_LOG_WARN,
                 "presence query failed (%s): members shown offline",
                 grp.host->strerror(status));
        online = NULL;
    }
    list_finish(q, online, 0, NULL);
}

/* Answer q from its list d (a new reference): members' presence, then the
 * answer.  q is freed, now or later. */
static void list_serve(struct list_req *q, struct grp_ldata *d)
{
    q->d = d;
    d->refs++;
    if (!d->nuids ||
        grp.host->presence_query(grp.self, d->uids, d->nuids, list_presence, q) != CHAT_OK)
        list_finish(q, NULL, 0, NULL);
}

/* ------------------------------------------------------------------------ */
/* Reading a list. */

/* Append the JSON literal of column col of row as a NUL-terminated string
 * to t; its offset. */
static size_t add_literal(struct grp_sb *t, const struct chat_db_result *r,
                          size_t row, size_t col)
{
    size_t len, off = t->len;
    const char *s = grp.host->db_str(r, row, col, &len);
    char *lit = grp.host->json_quote(s ? s : "", s ? len : 0, &len);

    if (!lit) {
        t->err = 1;
        return 0;
    }
    grp_sb_add(t, lit, len);
    grp_sb_add(t, "", 1); /* its NUL */
    grp.host->free(lit);
    return off;
}

/* The rows of r as a list with one reference, or NULL (out of memory). */
static struct grp_ldata *ldata_build(const struct chat_db_result *r)
{
    size_t n = grp.host->db_nrows(r), i, k;
    struct grp_ldata *d = grp.host->malloc(sizeof(*d));
    struct grp_sb t = {0};
    const char *s;
    size_t len;
    int64_t *shrunk;

    if (!d)
        return NULL;
    memset(d, 0, sizeof(*d));
    d->refs = 1;
    if (!n)
        return d; /* no groups: a list like any other */
    for (i = 0, k = 0; i < n; i++) /* the rows of a group are adjacent */
        if (!i || grp.host->db_int(r, i, 0) != grp.host->db_int(r, i - 1, 0))
            k++;
    d->rows = grp.host->malloc(n * sizeof(*d->rows));
    d->groups = grp.host->malloc(k * sizeof(*d->groups));
    d->uids = grp.host->malloc(n * sizeof(*d->uids));
    if (!d->rows || !d->groups || !d->uids)
        goto fail;
    for (i = 0; i < n; i++) {
        int64_t gid = grp.host->db_int(r, i, 0);
        struct grp_lrow *row = &d->rows[i];

        if (!d->ngroups || d->groups[d->ngroups - 1].gid != gid) {
            struct grp_lgroup *g = &d->groups[d->ngroups++];

            g->gid = gid;
            g->first = i;
            g->n = 0;
            g->name = add_literal(&t, r, i, 1);
            g->desc = add_literal(&t, r, i, 2);
        }
        d->groups[d->ngroups - 1].n++;
        row->uid = grp.host->db_int(r, i, 3);
        row->name = add_literal(&t, r, i, 4);
        s = grp.host->db_str(r, i, 5, &len);
        row->creator = s && !strcmp(s, "creator");
        d->uids[i] = row->uid;
    }
    if (t.err)
        goto fail;
    d->text = grp.host->realloc(t.p, t.len); /* kept: give back the slack */
    if (!d->text)
        d->text = t.p;
    d->nrows = n;
    qsort(d->uids, n, sizeof(*d->uids), cmp_id);
    for (i = 1, k = 1; i < n; i++)
        if (d->uids[i] != d->uids[k - 1])
            d->uids[k++] = d->uids[i];
    d->nuids = k;
    if (k < n && (shrunk = grp.host->realloc(d->uids, k * sizeof(*d->uids))) != NULL)
        d->uids = shrunk;
    return d;
fail:
    grp_sb_release(&t);
    grp_ldata_unref(d);
    return NULL;
}

static void load_rows(const struct chat_db_result *r, void *ud)
{
    struct list_load *ld = ud;
    struct list_req *q, *next;
    struct grp_ldata *d = NULL;
    const char *why = NULL;
    int err = 0, rc;

    if (loads && grp.host->map_get(loads, ld->uid) == ld)
        grp.host->map_del(loads, ld->uid); /* later requests: the cache */
    if ((rc = grp.host->db_error(r)) != CHAT_OK) {
        chat_log(grp.host, grp.self, CHAT_LOG_WARN, "group list of %lld: %s",
                 (long long)ld->uid, grp.host->db_errmsg(r));
        err = grp_db_proto_errno(rc, &why);
    } else if (!(d = ldata_build(r))) {
        err = CHAT_E_INTERNAL;
        why = "out of memory";
    } else {
        grp_lcache_put(ld->uid, d, ld->gen); /* unless invalidated meanwhile */
    }
    for (q = ld->head; q; q = next) {
        next = q->next;
        if (err)
            list_finish(q, NULL, err, why);
        else
            list_serve(q, d);
    }
    grp_ldata_unref(d);
    grp.host->free(ld);
}

/* Send the SELECT of uid's list, q its first waiter. */
static int load_start(struct list_req *q)
{
    static const char sql[] =
        "SELECT g.id, g.name, g.description, u.id, u.name, m2.role "
        "FROM group_members m "
        "JOIN chat_groups g ON g.id = m.group_id "
        "JOIN group_members m2 ON m2.group_id = m.group_id "
        "JOIN users u ON u.id = m2.user_id "
        "WHERE m.user_id = ? "
        "ORDER BY m.joined_at, m.group_id, m2.joined_at, m2.user_id";
    struct chat_db_param p = CHAT_DB_P_INT(q->uid);
    struct list_load *ld = grp.host->malloc(sizeof(*ld));
    int rc;

    if (!ld)
        return CHAT_ERR_NOMEM;
    ld->uid = q->uid;
    ld->gen = grp_lcache_gen();
    ld->head = q;
    ld->tail = &q->next;
    if ((rc = grp.host->db_query(grp.self, sql, &p, 1, load_rows, ld)) != CHAT_OK) {
        grp.host->free(ld);
        return rc;
    }
    /* Later requests wait for this one (replacing a load sent before an
     * invalidation).  Out of memory: they send their own. */
    if (grp.list_ttl_ms && loads)
        grp.host->map_put(loads, ld->uid, ld);
    return CHAT_OK;
}

/* Answer a request for uid's list: from the cache, behind a load in
 * flight, or with a new SELECT.  An error means nothing was answered. */
static int list_start(struct chat_login *l, uint64_t sid, const struct chat_ack *ack,
                      int proto, int64_t uid)
{
    struct list_req *q = grp.host->malloc(sizeof(*q));
    struct grp_ldata *d;
    struct list_load *ld;
    int rc;

    if (!q)
        return CHAT_ERR_NOMEM;
    memset(q, 0, sizeof(*q));
    q->l = l;
    q->sid = sid;
    if (ack)
        q->ack = *ack;
    q->proto = proto;
    q->uid = uid;
    if ((d = grp_lcache_get(uid)) != NULL) {
        list_serve(q, d);
        return CHAT_OK;
    }
    if (grp.list_ttl_ms && loads && (ld = grp.host->map_get(loads, uid)) != NULL &&
        ld->gen == grp_lcache_gen()) { /* no change since it was sent */
        *ld->tail = q;
        ld->tail = &q->next;
        return CHAT_OK;
    }
    if ((rc = load_start(q)) != CHAT_OK)
        grp.host->free(q);
    return rc;
}

void grp_groups_part(struct chat_login *l, int64_t uid, int proto, void *ud)
{
    int rc;

    (void)ud;
    if ((rc = list_start(l, 0, NULL, proto, uid)) != CHAT_OK) {
        chat_log(grp.host, grp.self, CHAT_LOG_WARN, "group list of %lld: %s",
                 (long long)uid, grp.host->strerror(rc));
        grp.host->login_part_set(l, NULL, NULL);
    }
}

void grp_on_list(struct chat_session *s, const struct chat_request *req, void *ud)
{
    const char *why;
    int64_t uid;
    int rc;

    (void)ud;
    if (!(uid = grp.host->req_auth(s, req)))
        return;
    if (grp.host->session_proto(s) != CHAT_PROTO_2) {
        chat_log(grp.host, grp.self, CHAT_LOG_INFO,
                 "user %lld: GROUP_LIST is protocol 2 only: ignored", (long long)uid);
        return;
    }
    rc = list_start(NULL, grp.host->session_id(s), &req->ack, CHAT_PROTO_2, uid);
    if (rc != CHAT_OK) {
        rc = grp_db_proto_errno(rc, &why);
        grp_answer(s, &req->ack, uid, rc, why, NULL);
    }
}

/* ------------------------------------------------------------------------ */

int grp_list_start(void)
{
    int rc;

    if (!(loads = grp.host->map_new()))
        return CHAT_ERR_NOMEM;
    if ((rc = grp_lcache_start()) != CHAT_OK) {
        grp.host->map_free(loads);
        loads = NULL;
    }
    return rc;
}

void grp_list_fini(void)
{
    /* The instance has drained: no load is in flight. */
    grp_lcache_fini();
    if (loads)
        grp.host->map_free(loads);
    loads = NULL;
}
