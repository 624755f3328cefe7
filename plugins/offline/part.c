/*
 * part.c - the "offlinemsg" part of the login ack, and deleting what it
 * delivered.
 *
 * At login the user's stored messages are read oldest first (at most
 * max_per_login; the rest come with the next login).  A message that is
 * still in this node's insert queue would otherwise miss this login and
 * arrive after newer ones, so the part first waits (at most flush_wait_ms)
 * until the queue has stored everything reported for the user.
 *
 * Rows are deleted only when the host reports that the ack carrying them
 * was written to the client (sent_fn with ok=1), and exactly the rows that
 * were sent (by id): a row another node is still inserting for the same user
 * is never swept up unseen.  A failed deletion is retried; if it keeps
 * failing the messages come again at the next login (logged), which is
 * better than losing them.
 */
#include <inttypes.h>
#include <string.h>

#include "offline.h"

/* A login waiting for this node's queue to store the user's messages. */
struct off_wait {
    struct off_wait *next;
    struct chat_login *l;
    int64_t uid;
    int proto;
    uint64_t seq;              /* wait until the queue stored this one */
    struct chat_timer *timer;  /* gives up after flush_wait_ms */
};

/* What a login ack delivered: handed back to off_sent_fn. */
struct off_sent {
    struct off_sent *next; /* in `deleting` while a retry timer waits */
    int64_t uid;
    unsigned attempts;
    size_t n;
    int64_t ids[];
};

struct off_select {
    struct chat_login *l;
    int64_t uid;
    int proto;
};

static struct off_wait *waiters;
static struct off_sent *deleting; /* waiting for a retry timer */

#define DELETE_TRIES 6
#define DELETE_HEAD "DELETE FROM offline_messages WHERE user_id = ? AND id IN (?"
#define DELETE_ID ",?"

/* ------------------------------------------------------------------------ */
/* Reading the stored messages */

/* One stored message as an array element: legacy clients get the JSON text
 * as a string, protocol 2 the object itself (checked to be one).  NULL when
 * the row is unusable (logged) or memory ran out. */
static cJSON *message_item(const char *text, size_t len, int proto, int64_t id)
{
    const char *end = NULL;
    cJSON *parsed;
    char *q;
    cJSON *item;

    if (proto != CHAT_PROTO_2) {
        q = off_host->json_quote(text, len, &len);
        item = q ? cJSON_CreateRaw(q) : NULL;
        off_host->free(q);
        return item;
    }
    parsed = strlen(text) == len ? cJSON_ParseWithLengthOpts(text, len, &end, 0) : NULL;
    if (!cJSON_IsObject(parsed)) {
        chat_log(off_host, off_self, CHAT_LOG_WARN,
                 "offline message %" PRId64 " is not a JSON object; skipped", id);
        cJSON_Delete(parsed);
        return NULL;
    }
    cJSON_Delete(parsed);
    /* Raw, not the parsed tree: cJSON would cut strings at "\u0000". */
    return cJSON_CreateRaw(text);
}

static void selected(const struct chat_db_result *r, void *ud)
{
    struct off_select *sel = ud;
    size_t n, i, len;
    struct off_sent *st = NULL;
    cJSON *arr = NULL, *item;
    const char *text;
    int64_t id;

    if (off_host->db_error(r) != CHAT_OK) {
        chat_log(off_host, off_self, CHAT_LOG_ERROR,
                 "reading offline messages of user %" PRId64 " failed: %s; they "
                 "stay for the next login", sel->uid, off_host->db_errmsg(r));
        goto none;
    }
    n = off_host->db_nrows(r);
    if (n == 0)
        goto none;
    arr = cJSON_CreateArray();
    st = off_host->malloc(sizeof(*st) + n * sizeof(st->ids[0]));
    if (!arr || !st)
        goto nomem;
    st->next = NULL;
    st->uid = sel->uid;
    st->attempts = 0;
    st->n = 0;
    for (i = 0; i < n; i++) {
        id = off_host->db_int(r, i, 0);
        text = off_host->db_str(r, i, 1, &len);
        item = message_item(text, len, sel->proto, id);
        if (item)
            cJSON_AddItemToArray(arr, item);
        else if (sel->proto != CHAT_PROTO_2)
            goto nomem;
        /* a skipped (corrupt) row is deleted too: it can never be sent */
        st->ids[st->n++] = id;
    }
    off_host->login_part_set(sel->l, arr, st);
    off_host->free(sel);
    return;
nomem:
    chat_log(off_host, off_self, CHAT_LOG_ERROR, "out of memory reading offline "
             "messages of user %" PRId64, sel->uid);
    cJSON_Delete(arr);
    off_host->free(st);
none:
    off_host->login_part_set(sel->l, NULL, NULL);
    off_host->free(sel);
}

static void select_messages(struct chat_login *l, int64_t uid, int proto)
{
    struct off_select *sel = off_host->malloc(sizeof(*sel));
    struct chat_db_param p[2];
    int rc = CHAT_ERR_NOMEM;

    if (sel) {
        sel->l = l;
        sel->uid = uid;
        sel->proto = proto;
        p[0] = CHAT_DB_P_INT(uid);
        p[1] = CHAT_DB_P_INT(off_cfg.max_per_login);
        rc = off_host->db_query(off_self,
            "SELECT id, message FROM offline_messages WHERE user_id = ?"
            " ORDER BY id LIMIT ?", p, 2, selected, sel);
    }
    if (rc != CHAT_OK) {
        chat_log(off_host, off_self, CHAT_LOG_ERROR,
                 "reading offline messages of user %" PRId64 ": %s",
                 uid, off_host->strerror(rc));
        off_host->free(sel);
        off_host->login_part_set(l, NULL, NULL);
    }
}

/* ------------------------------------------------------------------------ */
/* Waiting for the queue */

static void unlink_waiter(struct off_wait *w)
{
    struct off_wait **pp;

    for (pp = &waiters; *pp; pp = &(*pp)->next)
        if (*pp == w) {
            *pp = w->next;
            return;
        }
}

static void wait_expired(struct chat_timer *t, void *ud)
{
    struct off_wait *w = ud;

    (void)t;
    unlink_waiter(w);
    /* What is stored is older than what is still queued: send it now; the
     * queued rest comes with the next login. */
    chat_log(off_host, off_self, CHAT_LOG_WARN,
             "login of user %" PRId64 ": offline messages still queued after %"
             PRIu64 " ms; they come with the next login", w->uid,
             off_cfg.flush_wait_ms);
    select_messages(w->l, w->uid, w->proto);
    off_host->free(w);
}

void off_part_progress(void)
{
    struct off_wait **pp = &waiters, *w;

    while ((w = *pp)) {
        if (!off_store_done(w->seq)) {
            pp = &w->next;
            continue;
        }
        *pp = w->next;
        off_host->timer_stop(w->timer);
        select_messages(w->l, w->uid, w->proto);
        off_host->free(w);
    }
}

void off_part_fn(struct chat_login *l, int64_t user_id, int proto, void *ud)
{
    uint64_t seq = off_store_pending(user_id);
    struct off_wait *w;

    (void)ud;
    if (!seq) {
        select_messages(l, user_id, proto);
        return;
    }
    w = off_host->malloc(sizeof(*w));
    if (w) {
        w->l = l;
        w->uid = user_id;
        w->proto = proto;
        w->seq = seq;
        w->timer = off_host->timer_start(off_self, off_cfg.flush_wait_ms, 0,
                                         wait_expired, w);
    }
    if (!w || !w->timer) {
        off_host->free(w);
        select_messages(l, user_id, proto);
        return;
    }
    w->next = waiters;
    waiters = w;
}

/* ------------------------------------------------------------------------ */
/* Deleting what was delivered */

static void delete_run(struct off_sent *st);

static void delete_retry(struct chat_timer *t, void *ud)
{
    struct off_sent **pp, *st = ud;

    (void)t;
    for (pp = &deleting; *pp; pp = &(*pp)->next)
        if (*pp == st) {
            *pp = st->next;
            break;
        }
    delete_run(st);
}

/* closed: the server is stopping (no timer would run any more). */
static void delete_failed(struct off_sent *st, const char *why, int closed)
{
    if (!closed && ++st->attempts < DELETE_TRIES &&
        off_host->timer_start(off_self, 500u << st->attempts, 0, delete_retry, st)) {
        chat_log(off_host, off_self, CHAT_LOG_WARN,
                 "deleting %zu delivered offline messages of user %" PRId64
                 " failed (%s); retrying", st->n, st->uid, why);
        st->next = deleting;
        deleting = st;
        return;
    }
    chat_log(off_host, off_self, CHAT_LOG_ERROR,
             "deleting %zu delivered offline messages of user %" PRId64
             " failed (%s); they will be delivered again", st->n, st->uid, why);
    off_host->free(st);
}

static void deleted(const struct chat_db_result *r, void *ud)
{
    struct off_sent *st = ud;

    if (off_host->db_error(r) != CHAT_OK) {
        delete_failed(st, off_host->db_errmsg(r), off_host->db_error(r) == CHAT_ERR_CLOSED);
        return;
    }
    off_host->free(st);
}

static void delete_run(struct off_sent *st)
{
    size_t i, sqllen = sizeof(DELETE_HEAD) + (st->n - 1) * (sizeof(DELETE_ID) - 1) + 1;
    char *sql = off_host->malloc(sqllen);
    struct chat_db_param *p = off_host->malloc((st->n + 1) * sizeof(*p));
    int rc = CHAT_ERR_NOMEM;

    if (sql && p) {
        memcpy(sql, DELETE_HEAD, sizeof(DELETE_HEAD) - 1);
        for (i = 1; i < st->n; i++)
            memcpy(sql + sizeof(DELETE_HEAD) - 1 + (i - 1) * (sizeof(DELETE_ID) - 1),
                   DELETE_ID, sizeof(DELETE_ID) - 1);
        memcpy(sql + sqllen - 2, ")", 2);
        p[0] = CHAT_DB_P_INT(st->uid);
        for (i = 0; i < st->n; i++)
            p[i + 1] = CHAT_DB_P_INT(st->ids[i]);
        rc = off_host->db_query(off_self, sql, p, st->n + 1, deleted, st);
    }
    off_host->free(sql);
    off_host->free(p);
    if (rc != CHAT_OK)
        delete_failed(st, off_host->strerror(rc), rc == CHAT_ERR_CLOSED);
}

void off_sent_fn(int ok, int64_t user_id, void *state, void *ud)
{
    struct off_sent *st = state;

    (void)user_id;
    (void)ud;
    if (!st)
        return;
    if (!ok || st->n == 0) { /* not delivered: they come with the next login */
        off_host->free(st);
        return;
    }
    delete_run(st);
}

void off_part_fini(void)
{
    struct off_wait *w;
    struct off_sent *st;

    /* Only at shutdown can anything be left: timers that never ran. */
    while ((w = waiters)) {
        waiters = w->next;
        off_host->free(w);
    }
    while ((st = deleting)) {
        deleting = st->next;
        chat_log(off_host, off_self, CHAT_LOG_ERROR,
                 "stopping before %zu delivered offline messages of user %" PRId64
                 " were deleted; they will be delivered again", st->n, st->uid);
        off_host->free(st);
    }
}
