/*
 * take.c - rows committed after the login that should have taken them.
 *
 * A login reads its user's stored messages once (part.c), after this
 * node's insert queue has stored what it held for the user.  Another
 * node's queue is not waited for: a sender on node X may find the user
 * offline (or its presence still naming a node that died), queue the
 * message, and commit the row a moment after the user's login on node Y
 * has read the table.  That row would then wait for the next login.
 *
 * So after each committed batch the queue (store.c) asks presence which of
 * its recipients are online now (off_take_check) and, for those, tells the
 * offline plugin on every node ("take <uid> ...", host->broadcast).  The
 * node holding a session of the user takes the rows -- DELETE ... RETURNING,
 * one page of max_per_login -- and delivers them as ordinary messages.
 * Rows and deliveries never double up with this node's own logins: a take
 * waits while a login of the user is waiting or sweeping here (part.c's
 * off_part_busy), and a login waits while a take runs (off_take_running).
 * A message whose delivery fails at once goes back into the queue.
 *
 * Durable messages reach a protocol-2 device by SYNC: their rows are taken
 * (deleted) without being sent, as a protocol-2 login does.
 *
 * A user's takes are spaced by TAKE_GAP_MS; nudges meanwhile coalesce into
 * one more take.  Without a bus, presence and broadcast are this node's, so
 * the check still covers rows this node commits after a login here.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "offline.h"

#define TAKE_GAP_MS 100
#define TAKE_TAG "take"
#define NOTE_MAX 4000 /* bytes of one broadcast */

struct off_take {
    int64_t uid;
    int running;              /* the DELETE ... RETURNING is in flight */
    int again;                /* nudged meanwhile: take once more */
    struct chat_timer *timer; /* the gap after a take */
};

static struct chat_map *takes; /* uid -> struct off_take */
static struct chat_metric *taken_m;

static void take_run(struct off_take *t);

static void take_free(struct off_take *t)
{
    if (takes)
        off_host->map_del(takes, t->uid);
    off_host->free(t);
}

void off_take_start(void)
{
    static const char help[] =
        "Offline messages committed after their user's login had read the "
        "stored ones (a race with another node), then taken and delivered live.";

    taken_m = NULL;
    if (CHAT_HOST_HAS(off_host, metric_inc))
        taken_m = off_host->metric_counter(off_self, "late_taken_total", help, NULL);
}

/* ------------------------------------------------------------------------ */
/* After a commit: who of the recipients is online now */

static void note_flush(char *note, size_t *used)
{
    if (*used > sizeof(TAKE_TAG) - 1 &&
        off_host->broadcast(off_self, note, *used) != CHAT_OK)
        chat_log(off_host, off_self, CHAT_LOG_WARN,
                 "cannot send a take notice; rows of online users stay for "
                 "their next login");
    memcpy(note, TAKE_TAG, sizeof(TAKE_TAG) - 1);
    *used = sizeof(TAKE_TAG) - 1;
}

static void checked(int status, const int64_t *uids, const unsigned char *online,
                    size_t n, void *ud)
{
    char note[NOTE_MAX + 32];
    size_t i, used = 0;
    int k;

    (void)ud;
    if (status != CHAT_OK)
        return; /* no presence: the rows wait for the next login, as before */
    note_flush(note, &used);
    for (i = 0; i < n; i++) {
        if (!online[i])
            continue;
        k = snprintf(note + used, sizeof(note) - used, " %" PRId64, uids[i]);
        used += (size_t)k;
        if (used >= NOTE_MAX)
            note_flush(note, &used);
    }
    note_flush(note, &used);
}

static int cmp_uid(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

    return (x > y) - (x < y);
}

void off_take_check(int64_t *uids, size_t n)
{
    size_t i, k = 0;
    int rc;

    if (!n || !CHAT_HOST_HAS(off_host, presence_query) ||
        !CHAT_HOST_HAS(off_host, broadcast))
        return;
    qsort(uids, n, sizeof(*uids), cmp_uid);
    for (i = 0; i < n; i++)
        if (!k || uids[k - 1] != uids[i])
            uids[k++] = uids[i];
    rc = off_host->presence_query(off_self, uids, k, checked, NULL);
    if (rc != CHAT_OK)
        chat_log(off_host, off_self, CHAT_LOG_WARN,
                 "cannot ask presence after storing offline messages (%s); "
                 "rows of online users stay for their next login",
                 off_host->strerror(rc));
}

/* ------------------------------------------------------------------------ */
/* The node holding the user: take the rows */

static void gap_over(struct chat_timer *tm, void *ud)
{
    struct off_take *t = ud;

    (void)tm;
    t->timer = NULL;
    if (t->again)
        take_run(t);
    else
        take_free(t);
}

/* The take is done: space the next one, or forget the user. */
static void take_end(struct off_take *t, int more)
{
    t->running = 0;
    t->again = t->again || more;
    off_part_progress(); /* logins that waited for the take */
    t->timer = off_host->timer_start(off_self, TAKE_GAP_MS, 0, gap_over, t);
    if (!t->timer)
        take_free(t); /* no timer: the next nudge starts over */
}

static void taken(const struct chat_db_result *r, void *ud)
{
    struct off_take *t = ud;
    struct chat_session *s = off_host->session_by_user(t->uid);
    int proto2 = s && off_host->session_proto(s) == CHAT_PROTO_2;
    size_t i, n, len, sent = 0;
    const char *text;
    int kind;

    if (off_host->db_error(r) != CHAT_OK) {
        chat_log(off_host, off_self, CHAT_LOG_WARN,
                 "taking offline messages of user %" PRId64 " failed (%s); they "
                 "stay for the next login", t->uid, off_host->db_errmsg(r));
        take_end(t, 0);
        return;
    }
    n = off_host->db_nrows(r);
    for (i = 0; i < n; i++) {
        text = off_host->db_str(r, i, 1, &len);
        if ((kind = off_json_durable(text, len)) < 0) {
            chat_log(off_host, off_self, CHAT_LOG_WARN, "offline message %" PRId64
                     " is not a JSON object; skipped", off_host->db_int(r, i, 0));
            continue;
        }
        if (kind == 1 && proto2)
            continue; /* SYNC has it */
        sent++;
        if (off_host->deliver(off_self, t->uid, text, len) == CHAT_OK)
            continue;
        /* not handed over: back into the queue, as a new row */
        if (off_store_add(t->uid, 0, text, len, NULL) != CHAT_OK)
            chat_log(off_host, off_self, CHAT_LOG_ERROR,
                     "offline message %" PRId64 " of user %" PRId64 " LOST "
                     "(neither delivered nor stored again)",
                     off_host->db_int(r, i, 0), t->uid);
    }
    if (n) {
        chat_log(off_host, off_self, CHAT_LOG_INFO,
                 "took %zu offline messages of user %" PRId64 " stored after its "
                 "login (%zu sent)", n, t->uid, sent);
        if (taken_m)
            off_host->metric_add(taken_m, (double)sent);
    }
    take_end(t, n == off_cfg.max_per_login);
}

static void take_run(struct off_take *t)
{
    int rc;

    t->again = 0;
    if (off_part_busy(t->uid))
        return; /* off_take_progress() runs it when the login is done */
    if (!off_host->session_by_user(t->uid)) {
        take_free(t); /* gone: its next login reads the rows */
        return;
    }
    rc = off_page_query("DELETE FROM offline_messages WHERE user_id = ? ORDER BY "
                        "id LIMIT ? RETURNING id, message", t->uid, taken, t);
    if (rc != CHAT_OK) {
        chat_log(off_host, off_self, CHAT_LOG_WARN,
                 "cannot take offline messages of user %" PRId64 " (%s); they "
                 "stay for the next login", t->uid, off_host->strerror(rc));
        take_free(t);
        return;
    }
    t->running = 1;
}

/* Someone committed rows for uid, and uid is online somewhere. */
static void nudge(int64_t uid)
{
    struct off_take *t;

    if (uid <= 0 || !off_host->session_by_user(uid))
        return; /* not held here */
    if ((t = takes ? off_host->map_get(takes, uid) : NULL)) {
        t->again = 1; /* runs when the take, the gap or the login is over */
        return;
    }
    if ((!takes && !(takes = off_host->map_new())) ||
        !(t = off_host->malloc(sizeof(*t))))
        goto nomem;
    memset(t, 0, sizeof(*t));
    t->uid = uid;
    if (off_host->map_put(takes, uid, t) != CHAT_OK) {
        off_host->free(t);
        goto nomem;
    }
    take_run(t);
    return;
nomem:
    chat_log(off_host, off_self, CHAT_LOG_ERROR, "out of memory: offline "
             "messages of user %" PRId64 " stay for the next login", uid);
}

void off_take_note(const char *data, size_t len)
{
    char buf[NOTE_MAX + 32], *p, *end;
    long long v;

    if (len < sizeof(TAKE_TAG) - 1 || len >= sizeof(buf) ||
        memcmp(data, TAKE_TAG, sizeof(TAKE_TAG) - 1) != 0)
        return; /* not ours (or from a newer version) */
    memcpy(buf, data, len);
    buf[len] = '\0';
    for (p = buf + sizeof(TAKE_TAG) - 1; *p == ' '; p = end) {
        v = strtoll(p + 1, &end, 10);
        if (end == p + 1)
            break;
        nudge((int64_t)v);
    }
}

int off_take_running(int64_t uid)
{
    struct off_take *t = takes ? off_host->map_get(takes, uid) : NULL;

    return t && t->running;
}

void off_take_progress(int64_t uid)
{
    struct off_take *t = takes ? off_host->map_get(takes, uid) : NULL;

    if (t && !t->running && !t->timer)
        take_run(t); /* it waited for the login */
}

void off_take_fini(void)
{
    /* After draining: no take is in flight; gap timers will never run. */
    chat_map_free_values(off_host, &takes);
}
