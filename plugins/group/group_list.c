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
 */
#include <stdlib.h>
#include <string.h>

#include "group.h"

struct lrow {
    int64_t uid;
    char *name;        /* JSON string literal */
    int creator;
};

struct lgroup {
    int64_t gid;
    char *name, *desc; /* JSON string literals */
    size_t first, n;   /* its rows */
};

struct list_req {
    struct chat_login *l; /* the login part being answered, or NULL */
    uint64_t sid;         /* GROUP_LIST: the session to answer */
    struct chat_ack ack;
    int proto;
    int64_t uid;
    struct lrow *rows;
    size_t nrows;
    struct lgroup *groups;
    size_t ngroups;
    int64_t *uids;        /* distinct members, sorted */
    size_t nuids;
};

static void list_free(struct list_req *q)
{
    size_t i;

    for (i = 0; i < q->nrows; i++)
        grp.host->free(q->rows[i].name);
    for (i = 0; i < q->ngroups; i++) {
        grp.host->free(q->groups[i].name);
        grp.host->free(q->groups[i].desc);
    }
    grp.host->free(q->rows);
    grp.host->free(q->groups);
    grp.host->free(q->uids);
    grp.host->free(q);
}

static int cmp_id(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

    return (x > y) - (x < y);
}

static int online_of(const struct list_req *q, const unsigned char *online,
                     int64_t uid)
{
    const int64_t *p;

    if (!online)
        return 0;
    p = bsearch(&uid, q->uids, q->nuids, sizeof(*q->uids), cmp_id);
    return p && online[p - q->uids];
}

/* Append group g's JSON text to b. */
static void group_text(struct grp_sb *b, const struct list_req *q,
                       const struct lgroup *g, const unsigned char *online)
{
    int legacy = q->proto != CHAT_PROTO_2;
    struct grp_sb u = {0};
    size_t i;

    if (legacy) {
        grp_sb_str(b, "{\"groupdesc\":");
        grp_sb_str(b, g->desc);
        grp_sb_str(b, ",\"groupname\":");
        grp_sb_str(b, g->name);
        grp_sb_str(b, ",\"id\":");
        grp_sb_int(b, g->gid);
    } else {
        grp_sb_str(b, "{\"id\":");
        grp_sb_int(b, g->gid);
        grp_sb_str(b, ",\"groupname\":");
        grp_sb_str(b, g->name);
        grp_sb_str(b, ",\"groupdesc\":");
        grp_sb_str(b, g->desc);
    }
    grp_sb_str(b, ",\"users\":[");
    for (i = 0; i < g->n; i++) {
        const struct lrow *r = &q->rows[g->first + i];

        u.len = 0;
        grp_sb_str(&u, "{\"id\":");
        grp_sb_int(&u, r->uid);
        grp_sb_str(&u, ",\"name\":");
        grp_sb_str(&u, r->name);
        grp_sb_str(&u, r->creator ? ",\"role\":\"creator\"" : ",\"role\":\"normal\"");
        grp_sb_str(&u, online_of(q, online, r->uid) ? ",\"state\":\"online\"}"
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

    for (i = 0; arr && i < q->ngroups; i++) {
        b.len = 0;
        group_text(&b, q, &q->groups[i], online);
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

/* Answer q with the list (online may be NULL: all offline) or with err. */
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
    if (status != CHAT_OK || n != q->nuids) {
        chat_log(grp.host, grp.self, CHAT_LOG_WARN,
                 "presence query failed (%s): members shown offline",
                 grp.host->strerror(status));
        online = NULL;
    }
    list_finish(q, online, 0, NULL);
}

/* Copy the rows into q (groups, members, distinct member ids). */
static int copy_rows(struct list_req *q, const struct chat_db_result *r)
{
    size_t n = grp.host->db_nrows(r), i, len, k;
    const char *s;

    if (!n)
        return CHAT_OK;
    q->rows = grp.host->malloc(n * sizeof(*q->rows));
    q->groups = grp.host->malloc(n * sizeof(*q->groups));
    q->uids = grp.host->malloc(n * sizeof(*q->uids));
    if (!q->rows || !q->groups || !q->uids)
        return CHAT_ERR_NOMEM;
    for (i = 0; i < n; i++) {
        int64_t gid = grp.host->db_int(r, i, 0);
        struct lrow *row = &q->rows[i];

        if (!q->ngroups || q->groups[q->ngroups - 1].gid != gid) {
            struct lgroup *g = &q->groups[q->ngroups++];

            memset(g, 0, sizeof(*g));
            g->gid = gid;
            g->first = i;
            s = grp.host->db_str(r, i, 1, &len);
            g->name = grp.host->json_quote(s ? s : "", s ? len : 0, &len);
            s = grp.host->db_str(r, i, 2, &len);
            g->desc = grp.host->json_quote(s ? s : "", s ? len : 0, &len);
            if (!g->name || !g->desc)
                return CHAT_ERR_NOMEM;
        }
        q->groups[q->ngroups - 1].n++;
        row->uid = grp.host->db_int(r, i, 3);
        s = grp.host->db_str(r, i, 4, &len);
        row->name = grp.host->json_quote(s ? s : "", s ? len : 0, &len);
        s = grp.host->db_str(r, i, 5, &len);
        row->creator = s && !strcmp(s, "creator");
        q->uids[i] = row->uid;
        q->nrows = i + 1;
        if (!row->name)
            return CHAT_ERR_NOMEM;
    }
    qsort(q->uids, n, sizeof(*q->uids), cmp_id);
    for (i = 1, k = 1; i < n; i++)
        if (q->uids[i] != q->uids[k - 1])
            q->uids[k++] = q->uids[i];
    q->nuids = k;
    return CHAT_OK;
}

static void list_rows(const struct chat_db_result *r, void *ud)
{
    struct list_req *q = ud;
    const char *why;
    int rc;

    if ((rc = grp.host->db_error(r)) != CHAT_OK) {
        chat_log(grp.host, grp.self, CHAT_LOG_WARN, "group list of %lld: %s",
                 (long long)q->uid, grp.host->db_errmsg(r));
        rc = grp_db_proto_errno(rc, &why);
        list_finish(q, NULL, rc, why);
        return;
    }
    if (copy_rows(q, r) != CHAT_OK) {
        list_finish(q, NULL, CHAT_E_INTERNAL, "out of memory");
        return;
    }
    if (!q->nuids ||
        grp.host->presence_query(grp.self, q->uids, q->nuids, list_presence, q) != CHAT_OK)
        list_finish(q, NULL, 0, NULL);
}

static int list_start(struct chat_login *l, uint64_t sid, const struct chat_ack *ack,
                      int proto, int64_t uid)
{
    static const char sql[] =
        "SELECT g.id, g.name, g.description, u.id, u.name, m2.role "
        "FROM group_members m "
        "JOIN chat_groups g ON g.id = m.group_id "
        "JOIN group_members m2 ON m2.group_id = m.group_id "
        "JOIN users u ON u.id = m2.user_id "
        "WHERE m.user_id = ? "
        "ORDER BY m.joined_at, m.group_id, m2.joined_at, m2.user_id";
    struct chat_db_param p = CHAT_DB_P_INT(uid);
    struct list_req *q = grp.host->malloc(sizeof(*q));
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
    if ((rc = grp.host->db_query(grp.self, sql, &p, 1, list_rows, q)) != CHAT_OK)
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
