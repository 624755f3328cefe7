/*
 * friend.c - ADD_FRIEND_MSG (7), FRIEND_LIST (13, protocol 2) and the
 * "friends" part of the login ack.
 *
 * As in the seed, a friendship is one row (user_id added friend_id) and the
 * friend list of a user is the users it added.  The database does the
 * checking: the primary key refuses a second row (1062 -> "already a
 * friend") and the foreign key an unknown user (1452 -> "unknown user"), so
 * adding a friend is exactly one INSERT and no check can race with another.
 *
 * The list is read with one SELECT and completed with the users' live
 * presence from the core's bus (presence_query), never a stored state, so a
 * crashed node's users are shown offline once their presence expires.  The
 * list is built as JSON text from the database bytes (json_quote), so any
 * name round-trips exactly: for a legacy session each entry is that text as
 * a JSON string (the seed's shape, which its client parses a second time),
 * for protocol 2 the object itself.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "chat/plugin.h"

static const struct chat_host *host;
static struct chat_plugin *self;

/* ------------------------------------------------------------------------ */

/* Protocol 2: the reply; legacy: a log line for a failure (the seed never
 * answers these requests). */
static void answer(struct chat_session *s, const struct chat_ack *ack, int64_t uid,
                   int err, const char *why, const cJSON *body)
{
    if (host->session_proto(s) == CHAT_PROTO_2) {
        host->reply(s, ack, err, err ? why : NULL, body);
        return;
    }
    if (err)
        chat_log(host, self, CHAT_LOG_INFO, "user %lld: msgid %d refused: %s",
                 (long long)uid, ack->msgid, why);
}

/* The protocol errno for a failed database call or result. */
static int db_errno_to_proto(int err)
{
    return err == CHAT_ERR_BUSY || err == CHAT_ERR_UNAVAILABLE ? CHAT_E_UNAVAILABLE
                                                               : CHAT_E_INTERNAL;
}

/* ------------------------------------------------------------------------ */
/* ADD_FRIEND_MSG */

/* Attempts of an INSERT that InnoDB chose as a deadlock victim (or that
 * timed out waiting for a lock): it is run again, as the server asks. */
#define ADD_TRIES 5

struct add_req {
    uint64_t sid;
    int64_t uid, fid;
    struct chat_ack ack;
    int tries;
};

static void add_done(const struct chat_db_result *r, void *ud);

static int add_start(struct add_req *a)
{
    struct chat_db_param p[2];

    p[0] = CHAT_DB_P_INT(a->uid);
    p[1] = CHAT_DB_P_INT(a->fid);
    return host->db_query(self, "INSERT INTO friends (user_id, friend_id) VALUES (?, ?)",
                          p, 2, add_done, a);
}

static void add_done(const struct chat_db_result *r, void *ud)
{
    struct add_req *a = ud;
    struct chat_session *s;
    int err = 0, rc;
    const char *why = NULL;

    if (host->db_error(r) != CHAT_OK) {
        switch (host->db_errno(r)) {
        case 1062:
            err = CHAT_E_ALREADY;
            why = "already a friend";
            break;
        case 1452:
            err = CHAT_E_NOT_FOUND;
            why = "unknown user";
            break;
        case 1205: /* lock wait timeout */
        case 1213: /* deadlock: rolled back */
            if (++a->tries < ADD_TRIES && (rc = add_start(a)) == CHAT_OK)
                return;
            /* fall through */
        default:
            err = db_errno_to_proto(host->db_error(r));
            why = err == CHAT_E_UNAVAILABLE ? "database unavailable" : "database error";
            chat_log(host, self, CHAT_LOG_WARN, "add friend %lld -> %lld: %s",
                     (long long)a->uid, (long long)a->fid, host->db_errmsg(r));
        }
    }
    if ((s = host->session_get(a->sid)) != NULL)
        answer(s, &a->ack, a->uid, err, why, NULL);
    host->free(a);
}

static void on_add_friend(struct chat_session *s, const struct chat_request *req,
                          void *ud)
{
    struct add_req *a;
    int64_t uid, fid;
    int rc;

    (void)ud;
    if (!(uid = host->req_auth(s, req)))
        return;
    if (host->req_int(req, "friendid", &fid) != 1 || fid <= 0) {
        answer(s, &req->ack, uid, CHAT_E_BAD_FIELD, "friendid must be a user id", NULL);
        return;
    }
    if (fid == uid) {
        answer(s, &req->ack, uid, CHAT_E_BAD_FIELD, "friendid is your own id", NULL);
        return;
    }
    if (!(a = host->malloc(sizeof(*a)))) {
        answer(s, &req->ack, uid, CHAT_E_INTERNAL, "out of memory", NULL);
        return;
    }
    a->sid = host->session_id(s);
    a->uid = uid;
    a->fid = fid;
    a->ack = req->ack;
    a->tries = 0;
    if ((rc = add_start(a)) != CHAT_OK) {
        host->free(a);
        answer(s, &req->ack, uid, db_errno_to_proto(rc), "database unavailable", NULL);
    }
}

/* ------------------------------------------------------------------------ */
/* The friend list: SELECT, then presence, then the array. */

struct list_req {
    struct chat_login *l; /* the login part being answered, or NULL */
    uint64_t sid;         /* FRIEND_LIST: the session to answer */
    struct chat_ack ack;
    int proto;
    int64_t uid;
    size_t n;
    int64_t *ids;
    char **names;         /* JSON string literals (json_quote) */
};

static void list_free(struct list_req *q)
{
    size_t i;

    for (i = 0; i < q->n; i++)
        host->free(q->names[i]);
    host->free(q->names);
    host->free(q->ids);
    host->free(q);
}

/* One entry: {"id":..,"name":..,"state":..} (the seed's key order), as a
 * JSON string for legacy sessions, as the object for protocol 2. */
static cJSON *entry(const struct list_req *q, size_t i, int online)
{
    const char *state = online ? "online" : "offline";
    size_t cap = strlen(q->names[i]) + 64;
    char *text = host->malloc(cap);
    cJSON *item;

    if (!text)
        return NULL;
    snprintf(text, cap, "{\"id\":%lld,\"name\":%s,\"state\":\"%s\"}",
             (long long)q->ids[i], q->names[i], state);
    item = q->proto == CHAT_PROTO_2 ? cJSON_CreateRaw(text) : cJSON_CreateString(text);
    host->free(text);
    return item;
}

/* Answer q with the list (online may be NULL: all offline) or with err. */
static void list_finish(struct list_req *q, const unsigned char *online, int err)
{
    cJSON *arr = NULL, *body = NULL, *item;
    struct chat_session *s;
    size_t i;

    if (!err) {
        arr = cJSON_CreateArray();
        for (i = 0; arr && i < q->n; i++) {
            if (!(item = entry(q, i, online && online[i]))) {
                cJSON_Delete(arr);
                arr = NULL;
                break;
            }
            cJSON_AddItemToArray(arr, item);
        }
        if (!arr)
            err = CHAT_E_INTERNAL;
    }
    if (q->l) {
        host->login_part_set(q->l, arr, NULL); /* takes arr (NULL: nothing) */
        list_free(q);
        return;
    }
    if (!(s = host->session_get(q->sid))) {
        cJSON_Delete(arr);
        list_free(q);
        return;
    }
    if (!err) {
        if ((body = cJSON_CreateObject()) != NULL) {
            cJSON_AddItemToObject(body, "friends", arr); /* takes arr */
        } else {
            cJSON_Delete(arr);
            err = CHAT_E_INTERNAL;
        }
    }
    answer(s, &q->ack, q->uid, err,
           err == CHAT_E_UNAVAILABLE ? "database unavailable" : "server error", body);
    cJSON_Delete(body);
    list_free(q);
}

static void list_presence(int status, const int64_t *uids, const unsigned char *online,
                          size_t n, void *ud)
{
    struct list_req *q = ud;

    (void)uids;
    if (status != CHAT_OK || n != q->n) {
        chat_log(host, self, CHAT_LOG_WARN, "presence query failed (%s): "
                 "friends shown offline", host->strerror(status));
        online = NULL;
    }
    list_finish(q, online, 0);
}

static void list_rows(const struct chat_db_result *r, void *ud)
{
    struct list_req *q = ud;
    size_t i, n, len;
    int rc;

    if ((rc = host->db_error(r)) != CHAT_OK) {
        chat_log(host, self, CHAT_LOG_WARN, "friend list of %lld: %s",
                 (long long)q->uid, host->db_errmsg(r));
        list_finish(q, NULL, db_errno_to_proto(rc));
        return;
    }
    n = host->db_nrows(r);
    if (n) {
        q->ids = host->malloc(n * sizeof(*q->ids));
        q->names = host->malloc(n * sizeof(*q->names));
        if (!q->ids || !q->names) {
            list_finish(q, NULL, CHAT_E_INTERNAL);
            return;
        }
    }
    for (i = 0; i < n; i++) {
        const char *name = host->db_str(r, i, 1, &len);

        q->ids[i] = host->db_int(r, i, 0);
        if (!(q->names[i] = host->json_quote(name ? name : "", name ? len : 0, &len))) {
            list_finish(q, NULL, CHAT_E_INTERNAL);
            return;
        }
        q->n = i + 1;
    }
    if (!n || host->presence_query(self, q->ids, n, list_presence, q) != CHAT_OK)
        list_finish(q, NULL, 0);
}

/* Start reading the list of uid; the answer goes to l or to session sid. */
static int list_start(struct chat_login *l, uint64_t sid, const struct chat_ack *ack,
                      int proto, int64_t uid)
{
    static const char sql[] =
        "SELECT u.id, u.name FROM friends f JOIN users u ON u.id = f.friend_id "
        "WHERE f.user_id = ? ORDER BY f.created_at, f.friend_id";
    struct chat_db_param p = CHAT_DB_P_INT(uid);
    struct list_req *q = host->malloc(sizeof(*q));
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
    if ((rc = host->db_query(self, sql, &p, 1, list_rows, q)) != CHAT_OK)
        host->free(q);
    return rc;
}

static void friends_part(struct chat_login *l, int64_t uid, int proto, void *ud)
{
    int rc;

    (void)ud;
    if ((rc = list_start(l, 0, NULL, proto, uid)) != CHAT_OK) {
        chat_log(host, self, CHAT_LOG_WARN, "friend list of %lld: %s",
                 (long long)uid, host->strerror(rc));
        host->login_part_set(l, NULL, NULL);
    }
}

static void on_friend_list(struct chat_session *s, const struct chat_request *req,
                           void *ud)
{
    int64_t uid;
    int rc;

    (void)ud;
    if (!(uid = host->req_auth(s, req)))
        return;
    if (host->session_proto(s) != CHAT_PROTO_2) {
        chat_log(host, self, CHAT_LOG_INFO,
                 "user %lld: FRIEND_LIST is protocol 2 only: ignored", (long long)uid);
        return;
    }
    rc = list_start(NULL, host->session_id(s), &req->ack, CHAT_PROTO_2, uid);
    if (rc != CHAT_OK)
        answer(s, &req->ack, uid, db_errno_to_proto(rc), "database unavailable", NULL);
}

/* ------------------------------------------------------------------------ */

static int friend_init(const struct chat_host *h, struct chat_plugin *p, void **state)
{
    int rc;

    host = h;
    self = p;
    *state = NULL;
    CHAT_HOST_REQUIRE(h, p, map_next);
    if ((rc = h->register_handler(p, CHAT_MSG_ADD_FRIEND, on_add_friend, NULL)) ||
        (rc = h->register_handler(p, CHAT_MSG_FRIEND_LIST, on_friend_list, NULL)) ||
        (rc = h->register_login_part(p, "friends", friends_part, NULL, NULL)))
        return rc;
    return CHAT_OK;
}

static void friend_fini(void *state)
{
    (void)state;
}

static const struct chat_plugin_desc friend_desc = {
    CHAT_PLUGIN_DESC_INIT("friend", "1.0.0"),
    .init = friend_init,
    .fini = friend_fini,
};

CHAT_PLUGIN_DECLARE(friend_desc)
