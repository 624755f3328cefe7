/*
 * friend.c - ADD_FRIEND_MSG (7), FRIEND_LIST (13, protocol 2) and the
 * "friends" part of the login ack.
 *
 * As in the seed, ADD_FRIEND writes one row (user_id added friend_id).  What
 * the list shows depends on the policy (issue 14: ADD_FRIEND needed no
 * consent, so anyone could watch anyone's presence):
 *  - policy = open (the seed): the friend list of a user is the users it
 *    added, with their live presence;
 *  - policy = mutual (the default): a row is a request; the list shows only
 *    the users who added each other, so presence is seen only by consent.
 *    FRIEND_LIST (protocol 2) also returns the requests waiting for the
 *    user ("requests": who added it and was not added back, no presence).
 * The wire shapes are the seed's under both, so the seed's client works
 * unchanged (under mutual both users add each other, as it can).  The database does the
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
 *
 * The list part (ids and quoted names) is cached per user, so a user who
 * logs in again costs no SELECT; presence is still asked every time.  A
 * user's list changes only when that user adds a friend (rows are only
 * added, names never change), so the node that ran the INSERT drops the
 * entry before answering and tells the other nodes with host->broadcast();
 * a SELECT that started before any invalidation does not fill the cache.
 * list_cache_ttl bounds how long an entry is trusted (a lost broadcast),
 * list_cache_max how many there are; a timer sweeps expired entries.
 *
 * PRESENCE (19): friends told live of a user's first login and last
 * logout, in presence.c (the LOGIN / LOGOUT / SESSION_CLOSE hooks and the
 * "P ..." broadcasts are routed there from here).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "friend.h"

#define PLUGIN_NAME "friend"

static const struct chat_host *host;
static struct chat_plugin *self;

static void cache_invalidate(int64_t uid);

enum policy { POLICY_OPEN, POLICY_MUTUAL };
static enum policy policy; /* [plugin.friend] policy */

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

/* Drop id's cached list here and, through the bus, on every node. */
static void invalidate_everywhere(int64_t id)
{
    char buf[32];
    int n = snprintf(buf, sizeof(buf), "inv %lld", (long long)id), rc;

    cache_invalidate(id);
    if ((rc = host->broadcast(self, buf, (size_t)n)) != CHAT_OK)
        chat_log(host, self, CHAT_LOG_WARN, "friend list of %lld: invalidation "
                 "not broadcast (%s); other nodes rely on list_cache_ttl",
                 (long long)id, host->strerror(rc));
}

/* Protocol 2 under mutual: the ACK says whether the friendship now exists
 * ("mutual":true) or waits for the other user ("mutual":false). */
static void add_checked(const struct chat_db_result *r, void *ud)
{
    struct add_req *a = ud;
    struct chat_session *s = host->session_get(a->sid);
    cJSON *body;

    if (s) {
        body = cJSON_CreateObject();
        if (body && host->db_error(r) == CHAT_OK)
            cJSON_AddBoolToObject(body, "mutual", host->db_nrows(r) > 0);
        answer(s, &a->ack, a->uid, 0, NULL, body);
        cJSON_Delete(body);
    }
    host->free(a);
}

/* The row is in: answer (under mutual, protocol 2, after checking the
 * reverse row).  Takes a. */
static void add_answer(struct chat_session *s, struct add_req *a)
{
    struct chat_db_param p[2];

    if (s && policy == POLICY_MUTUAL && host->session_proto(s) == CHAT_PROTO_2) {
        p[0] = CHAT_DB_P_INT(a->fid);
        p[1] = CHAT_DB_P_INT(a->uid);
        if (host->db_query(self, "SELECT 1 FROM friends WHERE user_id = ? AND "
                           "friend_id = ?", p, 2, add_checked, a) == CHAT_OK)
            return;
    }
    if (s)
        answer(s, &a->ack, a->uid, 0, NULL, NULL);
    host->free(a);
}

/* friends_max (quota, issue 12): the row goes in only while the user has
 * fewer rows, in the same one statement (no row: 126).  Two adds of one
 * user racing on two connections may both pass at the bound: it can be
 * passed by the adds in flight at once, never more. */
static int64_t friends_max;

static int add_start(struct add_req *a)
{
    struct chat_db_param p[4];

    p[0] = CHAT_DB_P_INT(a->uid);
    p[1] = CHAT_DB_P_INT(a->fid);
    if (friends_max <= 0)
        return host->db_query(self, "INSERT INTO friends (user_id, friend_id) "
                              "VALUES (?, ?)", p, 2, add_done, a);
    p[2] = CHAT_DB_P_INT(a->uid);
    p[3] = CHAT_DB_P_INT(friends_max);
    return host->db_query(self, "INSERT INTO friends (user_id, friend_id) SELECT ?, ? "
                          "FROM DUAL WHERE (SELECT COUNT(*) FROM friends WHERE "
                          "user_id = ?) < ?", p, 4, add_done, a);
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
    if (!err && host->db_affected(r) == 0) {
        err = CHAT_E_QUOTA;
        why = "too many friends";
    }
    s = host->session_get(a->sid);
    if (!err) {
        /* uid's list changed (under mutual, maybe fid's too): here before
         * answering, and elsewhere */
        invalidate_everywhere(a->uid);
        if (policy == POLICY_MUTUAL)
            invalidate_everywhere(a->fid);
        /* fid has a new watcher (open: uid; mutual: uid, and fid may now
         * watch uid): the nodes holding them read their watchers again */
        fr_presence_watch(a->fid);
        if (policy == POLICY_MUTUAL)
            fr_presence_watch(a->uid);
        add_answer(s, a);
        return;
    }
    if (s)
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
    /* A login between the commit and add_done() must not be served the old
     * list: drop it now too (add_done drops it again, and broadcasts). */
    cache_invalidate(uid);
    if (policy == POLICY_MUTUAL)
        cache_invalidate(fid);
    if ((rc = add_start(a)) != CHAT_OK) {
        host->free(a);
        answer(s, &req->ack, uid, db_errno_to_proto(rc), "database unavailable", NULL);
    }
}

/* ------------------------------------------------------------------------ */
/* A friend list as read: ids and names (JSON string literals, json_quote)
 * in the SELECT's order.  Shared, read-only, by the cache and the requests
 * answering from it (refs); an empty list (n 0) is a list like any other. */

struct flist {
    int refs;
    uint64_t read_ms; /* when its SELECT started (monotonic) */
    size_t n;
    int64_t *ids;     /* n ids, in the same block */
    char *names;      /* n NUL-terminated literals, one after the other */
};

static void flist_unref(struct flist *fl)
{
    if (fl && --fl->refs == 0) {
        host->free(fl->names);
        host->free(fl);
    }
}

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* The rows of the SELECT (id, name) started at started_ms as a list with
 * one reference; NULL when out of memory. */
static struct flist *flist_read(const struct chat_db_result *r, uint64_t started_ms)
{
    size_t i, n = host->db_nrows(r), len, qlen, used = 0, cap = 0;
    struct flist *fl = host->malloc(sizeof(*fl) + n * sizeof(int64_t));
    char *names = NULL, *np, *lit;

    if (!fl)
        return NULL;
    fl->refs = 1;
    fl->read_ms = started_ms;
    fl->n = n;
    fl->ids = (int64_t *)(fl + 1);
    fl->names = NULL;
    for (i = 0; i < n; i++) {
        const char *name = host->db_str(r, i, 1, &len);

        fl->ids[i] = host->db_int(r, i, 0);
        if (!(lit = host->json_quote(name ? name : "", name ? len : 0, &qlen)))
            goto nomem;
        if (used + qlen + 1 > cap) {
            cap = (used + qlen + 1) * 2;
            if (!(np = host->realloc(names, cap))) {
                host->free(lit);
                goto nomem;
            }
            names = np;
        }
        memcpy(names + used, lit, qlen + 1);
        used += qlen + 1;
        host->free(lit);
    }
    fl->names = names;
    return fl;
nomem:
    host->free(names);
    host->free(fl);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* The cache: uid -> struct flist (holding one reference). */

static struct chat_map *cache;
static struct chat_timer *sweeper;
static uint64_t sweep_ms;    /* the sweeper's period */
static uint64_t cache_gen;   /* bumped by every invalidation */
static uint64_t ttl_ms;      /* list_cache_ttl; 0: no cache */
static size_t cache_max;     /* list_cache_max */

/* Drop every entry (all: 1) or the expired ones. */
static void cache_drop(int all)
{
    uint64_t now = now_ms();
    size_t it;
    int64_t uid;
    void *v;

    for (it = 0; cache && host->map_next(cache, &it, &uid, &v);) {
        struct flist *fl = v;

        if (all || now - fl->read_ms >= ttl_ms) {
            host->map_del(cache, uid); /* the entry just returned: allowed */
            flist_unref(fl);
        }
    }
}

static void cache_invalidate(int64_t uid)
{
    cache_gen++; /* a SELECT in flight may have read the old list */
    if (cache)
        flist_unref(host->map_del(cache, uid));
}

/* The fresh list of uid (a new reference), or NULL. */
static struct flist *cache_get(int64_t uid)
{
    struct flist *fl;

    if (!ttl_ms || !(fl = host->map_get(cache, uid)))
        return NULL;
    if (now_ms() - fl->read_ms >= ttl_ms)
        return NULL; /* replaced by the next read, or swept */
    fl->refs++;
    return fl;
}

static void cache_put(int64_t uid, struct flist *fl)
{
    struct flist *old;

    if (!ttl_ms)
        return;
    if (!(old = host->map_get(cache, uid)) && host->map_len(cache) >= cache_max) {
        cache_drop(0);
        /* Still (nearly) full: start again rather than scan at every put. */
        if (host->map_len(cache) >= cache_max - cache_max / 8) {
            chat_log(host, self, CHAT_LOG_INFO, "friend list cache full "
                     "(%zu lists, list_cache_max %zu): emptied",
                     host->map_len(cache), cache_max);
            cache_drop(1);
        }
    }
    if (host->map_put(cache, uid, fl) == CHAT_OK) {
        fl->refs++;
        flist_unref(old);
    } else if (old) { /* out of memory: at least drop the older list */
        host->map_del(cache, uid);
        flist_unref(old);
    }
}

static void sweep(struct chat_timer *t, void *ud)
{
    (void)t;
    (void)ud;
    cache_drop(0);
}

/* ------------------------------------------------------------------------ */
/* The friend list: the cache or a SELECT, then presence, then the array. */

struct list_req {
    struct chat_login *l; /* the login part being answered, or NULL */
    uint64_t sid;         /* FRIEND_LIST: the session to answer */
    struct chat_ack ack;
    int proto;
    int64_t uid;
    uint64_t gen;         /* cache_gen when the SELECT started */
    uint64_t started_ms;  /* and when */
    struct flist *fl;     /* the list (a reference), once known */
    cJSON *body;          /* FRIEND_LIST under mutual: waiting for "requests" */
};

static void list_free(struct list_req *q)
{
    flist_unref(q->fl);
    cJSON_Delete(q->body);
    host->free(q);
}

static int requests_start(struct list_req *q);

/* One entry: {"id":..,"name":..,"state":..} (the seed's key order), as a
 * JSON string for legacy sessions, as the object for protocol 2. */
static cJSON *entry(const struct list_req *q, int64_t id, const char *name, int online)
{
    const char *state = online ? "online" : "offline";
    size_t cap = strlen(name) + 64;
    char *text = host->malloc(cap);
    cJSON *item;

    if (!text)
        return NULL;
    snprintf(text, cap, "{\"id\":%lld,\"name\":%s,\"state\":\"%s\"}",
             (long long)id, name, state);
    item = q->proto == CHAT_PROTO_2 ? cJSON_CreateRaw(text) : cJSON_CreateString(text);
    host->free(text);
    return item;
}

/* Answer q with the list (online may be NULL: all offline) or with err. */
static void list_finish(struct list_req *q, const unsigned char *online, int err)
{
    cJSON *arr = NULL, *body = NULL, *item;
    struct chat_session *s;
    const char *name;
    size_t i;

    if (!err) {
        arr = cJSON_CreateArray();
        name = q->fl->names;
        for (i = 0; arr && i < q->fl->n; i++, name += strlen(name) + 1) {
            if (!(item = entry(q, q->fl->ids[i], name, online && online[i]))) {
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
    if (!err && policy == POLICY_MUTUAL) {
        q->body = body;
        if ((err = requests_start(q)) == 0)
            return;
        q->body = NULL;
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
    if (status != CHAT_OK || n != q->fl->n) {
        chat_log(host, self, CHAT_LOG_WARN, "presence query failed (%s): "
                 "friends shown offline", host->strerror(status));
        online = NULL;
    }
    list_finish(q, online, 0);
}

/* q->fl is known: ask the live presence of its users, then answer. */
static void list_known(struct list_req *q)
{
    if (!q->fl->n ||
        host->presence_query(self, q->fl->ids, q->fl->n, list_presence, q) != CHAT_OK)
        list_finish(q, NULL, 0);
}

static void list_rows(const struct chat_db_result *r, void *ud)
{
    struct list_req *q = ud;
    int rc;

    if ((rc = host->db_error(r)) != CHAT_OK) {
        chat_log(host, self, CHAT_LOG_WARN, "friend list of %lld: %s",
                 (long long)q->uid, host->db_errmsg(r));
        list_finish(q, NULL, db_errno_to_proto(rc));
        return;
    }
    if (!(q->fl = flist_read(r, q->started_ms))) {
        list_finish(q, NULL, CHAT_E_INTERNAL);
        return;
    }
    if (q->gen == cache_gen) /* no invalidation since the SELECT started */
        cache_put(q->uid, q->fl);
    list_known(q);
}

/* The requests waiting for q->uid (mutual): added it, not added back. */
static void requests_rows(const struct chat_db_result *r, void *ud)
{
    struct list_req *q = ud;
    struct chat_session *s = host->session_get(q->sid);
    cJSON *arr = NULL, *item;
    char *lit, *text;
    size_t i, n, len, qlen;
    int err = 0;

    if (!s)
        goto out;
    if (host->db_error(r) != CHAT_OK) {
        chat_log(host, self, CHAT_LOG_WARN, "friend requests of %lld: %s",
                 (long long)q->uid, host->db_errmsg(r));
        err = db_errno_to_proto(host->db_error(r));
        goto answer;
    }
    arr = cJSON_CreateArray();
    n = host->db_nrows(r);
    for (i = 0; arr && i < n; i++) {
        const char *name = host->db_str(r, i, 1, &len);

        if (!(lit = host->json_quote(name ? name : "", name ? len : 0, &qlen)))
            break;
        text = host->malloc(qlen + 48);
        if (text) {
            snprintf(text, qlen + 48, "{\"id\":%lld,\"name\":%s}",
                     (long long)host->db_int(r, i, 0), lit);
            item = cJSON_CreateRaw(text);
            host->free(text);
        }
        host->free(lit);
        if (!text || !item)
            break;
        cJSON_AddItemToArray(arr, item);
    }
    if (!arr || i < n || !cJSON_AddItemToObject(q->body, "requests", arr)) {
        cJSON_Delete(arr);
        err = CHAT_E_INTERNAL;
    }
answer:
    answer(s, &q->ack, q->uid, err,
           err == CHAT_E_UNAVAILABLE ? "database unavailable" : "server error",
           err ? NULL : q->body);
out:
    list_free(q);
}

/* Takes q when it returns 0; else the protocol errno. */
static int requests_start(struct list_req *q)
{
    static const char sql[] =
        "SELECT u.id, u.name FROM friends f JOIN users u ON u.id = f.user_id "
        "LEFT JOIN friends b ON b.user_id = f.friend_id AND b.friend_id = f.user_id "
        "WHERE f.friend_id = ? AND b.user_id IS NULL "
        "ORDER BY f.created_at, f.user_id LIMIT 1000";
    struct chat_db_param p = CHAT_DB_P_INT(q->uid);
    int rc = host->db_query(self, sql, &p, 1, requests_rows, q);

    return rc == CHAT_OK ? 0 : db_errno_to_proto(rc);
}

/* Start answering the list of uid, to l or to session sid. */
static int list_start(struct chat_login *l, uint64_t sid, const struct chat_ack *ack,
                      int proto, int64_t uid)
{
    static const char sql_open[] =
        "SELECT u.id, u.name FROM friends f JOIN users u ON u.id = f.friend_id "
        "WHERE f.user_id = ? ORDER BY f.created_at, f.friend_id";
    /* mutual: only the users who added this one back; ordered by when the
     * friendship came to be (the later of the two rows) */
    static const char sql_mutual[] =
        "SELECT u.id, u.name FROM friends f "
        "JOIN friends b ON b.user_id = f.friend_id AND b.friend_id = f.user_id "
        "JOIN users u ON u.id = f.friend_id "
        "WHERE f.user_id = ? ORDER BY GREATEST(f.created_at, b.created_at), f.friend_id";
    const char *sql = policy == POLICY_MUTUAL ? sql_mutual : sql_open;
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
    if ((q->fl = cache_get(uid)) != NULL) {
        list_known(q);
        return CHAT_OK;
    }
    q->gen = cache_gen;
    q->started_ms = now_ms();
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

/* Cluster-wide invalidation: the payload is "inv <user id>". */
static void on_broadcast(int event, const void *arg, void *ud)
{
    const struct chat_ev_broadcast *ev = arg;
    char buf[32];
    long long uid;

    (void)event;
    (void)ud;
    if (ev->plugin && !strcmp(ev->plugin, PLUGIN_NAME) && ev->len > 2 &&
        ev->data[0] == 'P') {
        fr_presence_broadcast(ev->data, ev->len);
        return;
    }
    if (ev->plugin && !strcmp(ev->plugin, PLUGIN_NAME) && ev->len > 2 &&
        ev->data[0] == 'W') {
        fr_presence_rewatch(ev->data, ev->len);
        return;
    }
    if (!ev->plugin || strcmp(ev->plugin, PLUGIN_NAME) || ev->len < 5 ||
        ev->len >= sizeof(buf) || memcmp(ev->data, "inv ", 4))
        return;
    memcpy(buf, ev->data, ev->len);
    buf[ev->len] = '\0';
    if ((uid = strtoll(buf + 4, NULL, 10)) > 0)
        cache_invalidate(uid);
}

/* LOGIN, LOGOUT, SESSION_CLOSE: presence.c */
static void on_session(int event, const void *arg, void *ud)
{
    (void)ud;
    fr_presence_hook(event, arg);
}

/* Setting key in min..max, else def (logged). */
static int64_t conf_range(const char *key, int64_t def, int64_t min, int64_t max)
{
    return chat_conf_range(host, self, key, def, min, max);
}

/* Read the settings and (re)arm the sweeper to match. */
static int read_conf(void)
{
    uint64_t period;

    const char *pol = host->conf_get(self, "policy", "mutual");
    enum policy np;

    if (strcmp(pol, "open") == 0) {
        np = POLICY_OPEN;
    } else if (strcmp(pol, "mutual") == 0) {
        np = POLICY_MUTUAL;
    } else {
        chat_log(host, self, CHAT_LOG_ERROR, "policy = %s: expected open or mutual", pol);
        return CHAT_ERR_INVAL;
    }
    if (np != policy) { /* every cached list was read under the other one */
        cache_drop(1);
        cache_gen++;
        policy = np;
    }
    chat_log(host, self, CHAT_LOG_INFO, "policy=%s", np == POLICY_MUTUAL ? "mutual" : "open");
    fr_presence_conf(np == POLICY_MUTUAL);
    ttl_ms = (uint64_t)conf_range("list_cache_ttl", 60, 0, 86400) * 1000u;
    cache_max = (size_t)conf_range("list_cache_max", 100000, 1, INT32_MAX);
    friends_max = conf_range("friends_max", 1000, 0, INT32_MAX);
    period = ttl_ms < 1000 ? 1000 : ttl_ms;
    if (!ttl_ms)
        cache_drop(1);
    if (sweeper && (!ttl_ms || period != sweep_ms)) {
        host->timer_stop(sweeper);
        sweeper = NULL;
    }
    if (ttl_ms && !sweeper) {
        if (!(sweeper = host->timer_start(self, period, period, sweep, NULL)))
            return CHAT_ERR_NOMEM;
        sweep_ms = period;
    }
    return CHAT_OK;
}

static int friend_init(const struct chat_host *h, struct chat_plugin *p, void **state)
{
    int rc;

    host = h;
    self = p;
    *state = NULL;
    cache = NULL;
    sweeper = NULL;
    cache_gen = 0;
    policy = POLICY_MUTUAL;
    CHAT_HOST_REQUIRE(h, p, map_next);
    if (!(cache = h->map_new()))
        return CHAT_ERR_NOMEM;
    if ((rc = fr_presence_start(h, p)) != CHAT_OK) {
        h->map_free(cache);
        cache = NULL;
        return rc;
    }
    if ((rc = read_conf()) ||
        (rc = h->register_hook(p, CHAT_EV_LOGIN, on_session, NULL)) ||
        (rc = h->register_hook(p, CHAT_EV_LOGOUT, on_session, NULL)) ||
        (rc = h->register_hook(p, CHAT_EV_SESSION_CLOSE, on_session, NULL)) ||
        (rc = h->register_handler(p, CHAT_MSG_ADD_FRIEND, on_add_friend, NULL)) ||
        (rc = h->register_handler(p, CHAT_MSG_FRIEND_LIST, on_friend_list, NULL)) ||
        (rc = h->register_hook(p, CHAT_EV_BROADCAST, on_broadcast, NULL)) ||
        (rc = h->register_login_part(p, "friends", friends_part, NULL, NULL))) {
        h->map_free(cache); /* empty: nothing has run yet */
        cache = NULL;
        fr_presence_fini();
        return rc; /* a timer started is dropped with the refused instance */
    }
    return CHAT_OK;
}

static void friend_fini(void *state)
{
    (void)state;
    /* Drained: no request holds a list, every one is the cache's alone. */
    cache_drop(1);
    host->map_free(cache);
    cache = NULL;
    sweeper = NULL; /* a repeating timer is stopped with its instance */
    fr_presence_fini();
}

static int friend_reconfigure(void *state)
{
    (void)state;
    return read_conf();
}

static const struct chat_plugin_desc friend_desc = {
    CHAT_PLUGIN_DESC_INIT(PLUGIN_NAME, "1.2.0"),
    .init = friend_init,
    .fini = friend_fini,
    .reconfigure = friend_reconfigure,
};

CHAT_PLUGIN_DECLARE(friend_desc)
