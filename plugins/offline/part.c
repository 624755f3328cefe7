/*
 * part.c - the "offlinemsg" part of the login ack, and deleting what it
 * delivered.
 *
 * At login the user's stored messages are read oldest first (at most
 * max_per_login; the rest come with the next login).  A message that is
 * still in this node's insert queue would otherwise miss this login and
 * arrive after newer ones, so the part first waits (at most flush_wait_ms)
 * until the queue has stored everything reported for the user.  It waits,
 * too, for the deletions of messages an earlier login of the user on this
 * node has delivered: a client that reconnects the moment it has read the
 * last of them would otherwise be given them again.
 *
 * The part is a part of messages (register_login_messages): it hands the
 * host the stored texts themselves, the same for both protocols, and the
 * host puts into the ack what fits its byte bound (in the legacy shape, as
 * JSON strings, for a legacy session) and sends the rest right after the
 * ack as ordinary messages.  The host reports after each write how many of
 * them have reached the socket; exactly those rows are deleted (by id), so
 * a row another node is still inserting for the same user is never swept
 * up unseen, and a client that leaves halfway gets the rest at its next
 * login.  One DELETE is in flight per login at a time; what is written
 * meanwhile goes into the next one.  A failed deletion is retried; if it
 * keeps failing the messages come again at the next login (logged), which
 * is better than losing them.
 *
 * Durable messages (issue 8: they carry "mid", "conv" and "cseq") reach a
 * protocol-2 device by SYNC from the message store, so a protocol-2 login
 * leaves their rows out of the part (and deletes them with the others): the
 * device sees each once.  A legacy login gets them in offlinemsg as any
 * other message.
 *
 * A row another node commits after this login has read the table is taken
 * by take.c; the two never run at once for a user on this node: a take
 * waits while a login of the user waits or sweeps here (off_part_busy),
 * and a login waits while a take runs.
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

/* The messages of one login: handed to the host as the part's state.
 * ids[] are the rows read, in order; the host's element k is row
 * ids[pos[k]] (a corrupt row has no element and goes with the next one). */
struct off_sent {
    struct off_sent *next; /* in `deleting` while a retry timer waits */
    int64_t uid;
    unsigned attempts;
    size_t n;        /* rows */
    size_t nelem;    /* elements handed to the host */
    size_t *pos;     /* nelem entries */
    size_t covered;  /* rows whose messages are written (or corrupt) */
    size_t done;     /* rows deleted (or given up) */
    size_t busy;     /* rows of the DELETE in flight or waiting for a retry */
    int last;        /* the host is done with this state */
    int counted;     /* counted in `pending` (deletions to come) */
    int64_t ids[];
};
struct off_select {
    struct chat_login *l;
    int64_t uid;
    int proto;
};

static struct off_wait *waiters;
static struct off_sent *deleting; /* waiting for a retry timer */
/* user id -> how many of its states have deletions to come (as a pointer:
 * the map holds pointers, never NULL) */
static struct chat_map *pending;
/* user id -> logins of the user reading or delivering stored rows here, from
 * the SELECT until every row they read is deleted (a pointer-sized count) */
static struct chat_map *sweeps;

#define DELETE_TRIES 6
#define DELETE_HEAD "DELETE FROM offline_messages WHERE user_id = ? AND id IN (?"
#define DELETE_ID ",?"

/* ------------------------------------------------------------------------ */
/* Reading the stored messages */

/* One more (up) or one less of uid in the counting map *m (made on first
 * use; a count is stored as a pointer, absent when 0): the new count, or
 * UINTPTR_MAX out of memory (not counted). */
static uintptr_t count_step(struct chat_map **m, int64_t uid, int up)
{
    uintptr_t n;

    if (!*m && !(*m = off_host->map_new()))
        return UINTPTR_MAX;
    n = (uintptr_t)off_host->map_get(*m, uid);
    n = up ? n + 1 : n - 1;
    if (n == 0)
        off_host->map_del(*m, uid);
    else if (off_host->map_put(*m, uid, (void *)n) != CHAT_OK)
        return UINTPTR_MAX;
    return n;
}

/* Count st in `pending` while it has rows to delete; when a user's last
 * deletion is done, logins waiting for it go on. */
static void pending_update(struct off_sent *st)
{
    int now = st->busy || st->done < st->covered;

    if (now == st->counted || count_step(&pending, st->uid, now) == UINTPTR_MAX)
        return; /* out of memory: not counted, a login does not wait */
    st->counted = now;
    if (!now)
        off_part_progress();
}

static int deleting_for(int64_t uid)
{
    return pending && off_host->map_get(pending, uid) != NULL;
}

/* A login's sweep of uid's rows starts (1) or ends (0).  Out of memory it is
 * not counted: a take could then overlap it (a duplicate at worst). */
static void sweep_count(int64_t uid, int start)
{
    if (!start && !(sweeps && off_host->map_get(sweeps, uid)))
        return; /* not counted at its start */
    if (count_step(&sweeps, uid, start) == 0)
        off_take_progress(uid);
}

int off_part_busy(int64_t uid)
{
    struct off_wait *w;

    if (sweeps && off_host->map_get(sweeps, uid))
        return 1;
    for (w = waiters; w; w = w->next)
        if (w->uid == uid)
            return 1;
    return 0;
}

static void sent_free(struct off_sent *st)
{
    if (st) {
        off_host->free(st->pos);
        off_host->free(st);
    }
}

/* A durable message: stored in the message store, numbered. */
static int is_durable(const cJSON *o)
{
    return cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(o, "mid")) &&
           cJSON_IsString(cJSON_GetObjectItemCaseSensitive(o, "conv")) &&
           cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(o, "cseq"));
}

int off_json_durable(const char *json, size_t len)
{
    cJSON *o = cJSON_ParseWithLength(json, len);
    int d = !cJSON_IsObject(o) ? -1 : is_durable(o);

    cJSON_Delete(o);
    return d;
}

/* One stored message as an element: its text, checked to be a JSON object
 * (the host sends it as it is, or quotes it for a legacy ack).  NULL when
 * the row is unusable (logged), is a durable message and proto is 2 (SYNC
 * delivers it), or memory ran out (*nomem). */
static cJSON *message_item(const char *text, size_t len, int64_t id, int proto,
                           int *nomem)
{
    const char *end = NULL;
    cJSON *parsed, *item;
    int durable;

    parsed = strlen(text) == len ? cJSON_ParseWithLengthOpts(text, len, &end, 0) : NULL;
    if (!cJSON_IsObject(parsed)) {
        chat_log(off_host, off_self, CHAT_LOG_WARN,
                 "offline message %" PRId64 " is not a JSON object; skipped", id);
        cJSON_Delete(parsed);
        return NULL;
    }
    durable = is_durable(parsed);
    cJSON_Delete(parsed);
    if (durable && proto == CHAT_PROTO_2)
        return NULL;
    /* Raw, not the parsed tree: cJSON would cut strings at "\u0000". */
    if (!(item = cJSON_CreateRaw(text)))
        *nomem = 1;
    return item;
}

static struct off_sent *sent_new(int64_t uid, size_t n)
{
    struct off_sent *st = off_host->malloc(sizeof(*st) + n * sizeof(st->ids[0]));

    if (!st)
        return NULL;
    memset(st, 0, sizeof(*st));
    st->uid = uid;
    if (!(st->pos = off_host->malloc(n * sizeof(st->pos[0])))) {
        off_host->free(st);
        return NULL;
    }
    return st;
}

static void selected(const struct chat_db_result *r, void *ud)
{
    struct off_select *sel = ud;
    size_t n, i, len;
    struct off_sent *st = NULL;
    cJSON *arr = NULL, *item;
    const char *text;
    int64_t id;
    int nomem = 0;

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
    st = sent_new(sel->uid, n);
    if (!arr || !st)
        goto nomem;
    for (i = 0; i < n; i++) {
        id = off_host->db_int(r, i, 0);
        text = off_host->db_str(r, i, 1, &len);
        if ((item = message_item(text, len, id, sel->proto, &nomem)) != NULL) {
            cJSON_AddItemToArray(arr, item);
            st->pos[st->nelem++] = st->n;
        } else if (nomem) {
            goto nomem;
        }
        /* a skipped row (corrupt, or durable for a protocol-2 device) is
         * deleted too: it is never sent from here */
        st->ids[st->n++] = id;
    }
    off_host->login_part_set(sel->l, arr, st);
    off_host->free(sel);
    return;
nomem:
    chat_log(off_host, off_self, CHAT_LOG_ERROR, "out of memory reading offline "
             "messages of user %" PRId64, sel->uid);
    cJSON_Delete(arr);
    sent_free(st);
none:
    off_host->login_part_set(sel->l, NULL, NULL);
    sweep_count(sel->uid, 0);
    off_host->free(sel);
}

int off_page_query(const char *sql, int64_t uid, chat_db_cb cb, void *ud)
{
    struct chat_db_param p[2];

    p[0] = CHAT_DB_P_INT(uid);
    p[1] = CHAT_DB_P_INT(off_cfg.max_per_login);
    return off_host->db_query(off_self, sql, p, 2, cb, ud);
}

static void select_messages(struct chat_login *l, int64_t uid, int proto)
{
    struct off_select *sel = off_host->malloc(sizeof(*sel));
    int rc = CHAT_ERR_NOMEM;

    sweep_count(uid, 1);
    if (sel) {
        sel->l = l;
        sel->uid = uid;
        sel->proto = proto;
        rc = off_page_query("SELECT id, message FROM offline_messages WHERE "
                            "user_id = ? ORDER BY id LIMIT ?", uid, selected, sel);
    }
    if (rc != CHAT_OK) {
        chat_log(off_host, off_self, CHAT_LOG_ERROR,
                 "reading offline messages of user %" PRId64 ": %s",
                 uid, off_host->strerror(rc));
        off_host->free(sel);
        off_host->login_part_set(l, NULL, NULL);
        sweep_count(uid, 0);
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
             "login of user %" PRId64 ": offline messages still queued (or "
             "delivered ones not yet deleted) after %" PRIu64 " ms; they come "
             "with the next login (or again)", w->uid, off_cfg.flush_wait_ms);
    select_messages(w->l, w->uid, w->proto);
    off_host->free(w);
}

void off_part_progress(void)
{
    struct off_wait **pp = &waiters, *w;

    while ((w = *pp)) {
        if ((w->seq && !off_store_done(w->seq)) || deleting_for(w->uid) ||
            off_take_running(w->uid)) {
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
    if (!seq && !deleting_for(user_id) && !off_take_running(user_id)) {
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

/* Delete what is written and not yet deleted; free the state once the host
 * is done with it and nothing is left to do. */
static void delete_pump(struct off_sent *st)
{
    if (!st->busy && st->done < st->covered) {
        st->busy = st->covered - st->done;
        pending_update(st);
        delete_run(st);
        return;
    }
    pending_update(st);
    if (!st->busy && st->last) {
        int64_t uid = st->uid;

        sent_free(st);
        sweep_count(uid, 0);
    }
}

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
                 " failed (%s); retrying", st->busy, st->uid, why);
        st->next = deleting;
        deleting = st;
        return;
    }
    chat_log(off_host, off_self, CHAT_LOG_ERROR,
             "deleting %zu delivered offline messages of user %" PRId64
             " failed (%s); they will be delivered again", st->busy, st->uid, why);
    st->attempts = 0;
    st->done += st->busy;
    st->busy = 0;
    delete_pump(st);
}

static void deleted(const struct chat_db_result *r, void *ud)
{
    struct off_sent *st = ud;

    if (off_host->db_error(r) != CHAT_OK) {
        delete_failed(st, off_host->db_errmsg(r), off_host->db_error(r) == CHAT_ERR_CLOSED);
        return;
    }
    st->attempts = 0;
    st->done += st->busy;
    st->busy = 0;
    delete_pump(st);
}

/* DELETE the rows ids[done .. done + busy). */
static void delete_run(struct off_sent *st)
{
    size_t i, k = st->busy;
    size_t sqllen = sizeof(DELETE_HEAD) + (k - 1) * (sizeof(DELETE_ID) - 1) + 1;
    char *sql = off_host->malloc(sqllen);
    struct chat_db_param *p = off_host->malloc((k + 1) * sizeof(*p));
    int rc = CHAT_ERR_NOMEM;

    if (sql && p) {
        memcpy(sql, DELETE_HEAD, sizeof(DELETE_HEAD) - 1);
        for (i = 1; i < k; i++)
            memcpy(sql + sizeof(DELETE_HEAD) - 1 + (i - 1) * (sizeof(DELETE_ID) - 1),
                   DELETE_ID, sizeof(DELETE_ID) - 1);
        memcpy(sql + sqllen - 2, ")", 2);
        p[0] = CHAT_DB_P_INT(st->uid);
        for (i = 0; i < k; i++)
            p[i + 1] = CHAT_DB_P_INT(st->ids[st->done + i]);
        rc = off_host->db_query(off_self, sql, p, k + 1, deleted, st);
    }
    off_host->free(sql);
    off_host->free(p);
    if (rc != CHAT_OK)
        delete_failed(st, off_host->strerror(rc), rc == CHAT_ERR_CLOSED);
}

void off_written_fn(size_t n, int last, int64_t user_id, void *state, void *ud)
{
    struct off_sent *st = state;
    size_t covered;

    (void)user_id;
    (void)ud;
    if (!st)
        return;
    if (n > st->nelem)
        n = st->nelem;
    /* every row before the first unwritten element; all of them (trailing
     * corrupt rows too) once every element is written */
    covered = n == st->nelem ? st->n : st->pos[n];
    if (covered > st->covered)
        st->covered = covered;
    st->last = st->last || last;
    delete_pump(st);
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
                 " were deleted; they will be delivered again",
                 st->covered - st->done, st->uid);
        sent_free(st);
    }
    if (pending)
        off_host->map_free(pending);
    pending = NULL;
    if (sweeps)
        off_host->map_free(sweeps);
    sweeps = NULL;
}
