/*
 * store.c - the offline plugin's insert queue.
 *
 * Messages for a user must come back in the order they were reported, and
 * they come back ordered by offline_messages.id.  The pool runs queries on
 * several connections at once, so independent INSERTs could take their ids
 * (or commit) out of order.  Hence one FIFO and at most one INSERT in
 * flight: whatever queued meanwhile goes out as the next multi-row INSERT
 * (bounded by batch_max rows and batch_bytes bytes), whose rows get
 * increasing ids in VALUES order.  When the stored-message quotas apply to
 * some of its rows, one SELECT counts first (quota.c) and the INSERT holds
 * only the rows admitted; a refused row's ticket gets CHAT_ERR_QUOTA or
 * CHAT_ERR_QUOTA_SENDER when the batch is done.
 *
 * Failures never drop a message silently:
 *  - a database error keeps the batch at the head of the queue and retries
 *    it after a backoff (retry_min_ms doubling up to retry_max_ms);
 *  - a foreign-key error (1452: the user does not exist) fails the whole
 *    statement, so the batch is then stored row by row to find the culprit,
 *    which is logged and dropped (nobody could ever receive it);
 *  - past queue_max_bytes of queued messages new ones are refused with an
 *    error line naming the user.
 *
 * Outcomes (ABI 1.5).  A message whose sender waits for it comes with a
 * ticket; the ticket is completed once its row is committed (CHAT_OK), when
 * its user does not exist (CHAT_ERR_NOTFOUND), or refused at once:
 *  - CHAT_ERR_BUSY past queue_sender_max_bytes queued for its sender,
 *    queue_user_max_bytes queued for its recipient, or three quarters of
 *    queue_max_bytes in all (the last quarter is kept for messages without
 *    a ticket: those were already reported delivered, e.g. the unsent output
 *    of a closed session, so they must not be refused for room);
 *  - CHAT_ERR_UNAVAILABLE while the database is failing (a retry timer
 *    runs): a failed INSERT fails every ticketed message queued, which the
 *    senders may send again, and keeps retrying the others.
 * These admission bounds are the fairness: FIFO service, but no sender (a
 * group fan-out) and no recipient can hold more than its share of the
 * queue, so a message from anybody else is never refused for room that one
 * sender took.
 *
 * Hot reload keeps the order too.  save() hands every message that is not in
 * flight to the next instance, and with them a "baton": a small shared
 * object that stays busy until this instance's last INSERT is done.  The new
 * instance starts inserting only once the baton is released (it polls it;
 * a callback into either instance's code could outlive that code).  The
 * host calls save, restore and the handler swap in one go on the loop
 * thread, so nothing runs in between.
 */
#include <inttypes.h>
#include <string.h>

#include "offline.h"

static struct off_msg *head, *tail;
static size_t q_bytes;       /* memory held by queued messages */
static size_t q_count;
static uint64_t next_seq = 1;
static size_t inflight;      /* rows of the head batch being inserted (0: none) */
static size_t single_left;   /* rows still to store one by one after a 1452 */
static uint64_t retry_ms;    /* current backoff; 0 after a success */
static int retry_wait;       /* a retry timer is running */
static int *b_status;        /* per row of the batch in flight: admitted
                              * (CHAT_OK) or refused by a quota */
static struct chat_map *by_from; /* sender -> (uintptr_t) bytes queued */
static struct chat_map *by_uid;  /* recipient -> (uintptr_t) bytes queued */

/* Shared between two instances across a reload; freed by the last unref.
 * Memory from the host's allocator, which both instances use. */
struct off_baton {
    int busy;  /* the older instance still has an INSERT to finish */
    int refs;
};
static struct off_baton *my_baton;   /* handed out by save(); busy until empty */
static struct off_baton *pred_baton; /* from restore(): wait while busy */
static int pred_poll;                /* a poll timer is running */

#define BATON_POLL_MS 20
#define BLOB_MAGIC 0x4f464c32u /* "OFL2" */

#define MSG_COST(len) (sizeof(struct off_msg) + (len))
#define INSERT_HEAD "INSERT INTO offline_messages (user_id, from_id, message) " \
                    "VALUES (?,?,?)"
#define INSERT_ROW ",(?,?,?)"
#define CHECKED_MAX 256 /* rows checked against the quotas per batch */

static void flush(void);

static void baton_unref(struct off_baton *b)
{
    if (--b->refs == 0)
        off_host->free(b);
}

/* 1 while the previous instance still inserts (then wait). */
static int pred_busy(void)
{
    if (pred_baton && !pred_baton->busy) {
        baton_unref(pred_baton);
        pred_baton = NULL;
    }
    return pred_baton != NULL;
}

static void pred_tick(struct chat_timer *t, void *ud)
{
    (void)t;
    (void)ud;
    pred_poll = 0;
    if (pred_busy()) {
        pred_poll = off_host->timer_start(off_self, BATON_POLL_MS, 0, pred_tick,
                                          NULL) != NULL;
        return;
    }
    off_part_progress();
    flush();
}

static size_t share(struct chat_map *map, int64_t key)
{
    return key && map ? (size_t)(uintptr_t)off_host->map_get(map, key) : 0;
}

/* Add (d > 0) or remove bytes of key's share; 0 or CHAT_ERR_NOMEM. */
static int share_add(struct chat_map *map, int64_t key, size_t bytes, int d)
{
    size_t v = share(map, key);

    if (!key || !map)
        return CHAT_OK;
    v = d > 0 ? v + bytes : v - bytes;
    if (!v) {
        off_host->map_del(map, key);
        return CHAT_OK;
    }
    return off_host->map_put(map, key, (void *)(uintptr_t)v);
}

/* Unlink and free m (prev is its predecessor or NULL), completing its
 * ticket with status. */
static void drop(struct off_msg *m, struct off_msg *prev, int status)
{
    if (prev)
        prev->next = m->next;
    else
        head = m->next;
    if (tail == m)
        tail = prev;
    q_bytes -= MSG_COST(m->len);
    q_count--;
    share_add(by_from, m->from, MSG_COST(m->len), -1);
    share_add(by_uid, m->uid, MSG_COST(m->len), -1);
    if (m->ticket)
        off_host->delivery_done(m->ticket, status);
    off_host->free(m);
}

static void pop(size_t n, int status)
{
    while (n-- && head)
        drop(head, NULL, status);
    if (!head && my_baton) { /* handed over and done: let the next one go */
        my_baton->busy = 0;
        baton_unref(my_baton);
        my_baton = NULL;
    }
}

static void retry_tick(struct chat_timer *t, void *ud)
{
    (void)t;
    (void)ud;
    retry_wait = 0;
    flush();
}

static void backoff(void)
{
    retry_ms = retry_ms ? retry_ms * 2 : off_cfg.retry_min_ms;
    if (retry_ms > off_cfg.retry_max_ms)
        retry_ms = off_cfg.retry_max_ms;
    if (off_host->timer_start(off_self, retry_ms, 0, retry_tick, NULL)) {
        retry_wait = 1;
        return;
    }
    /* No timer: the next reported message (or login) flushes again. */
    chat_log(off_host, off_self, CHAT_LOG_ERROR,
             "cannot start a retry timer; %zu messages wait", q_count);
}

/* The database is failing: the senders that wait are told now (113; they
 * may send again) rather than after an outage of unknown length; messages
 * without a ticket stay and are retried. */
static void fail_waiting(void)
{
    struct off_msg *m = head, *prev = NULL, *next;
    size_t n = 0;

    for (; m; m = next) {
        next = m->next;
        if (m->ticket) {
            drop(m, prev, CHAT_ERR_UNAVAILABLE);
            n++;
        } else {
            prev = m;
        }
    }
    single_left = 0;
    if (n)
        chat_log(off_host, off_self, CHAT_LOG_WARN,
                 "%zu offline messages refused to their senders (database failing)", n);
    if (!head && my_baton) {
        my_baton->busy = 0;
        baton_unref(my_baton);
        my_baton = NULL;
    }
}

/* The head batch is done: each row's ticket gets its outcome. */
static void stored(size_t n)
{
    size_t i;
    int st;

    for (i = 0; i < n && head; i++) {
        st = b_status ? b_status[i] : CHAT_OK;
        if (st != CHAT_OK)
            off_quota_refused(head->uid, head->from, st, head->durable);
        drop(head, NULL, st);
    }
    pop(0, CHAT_OK);
}

static void batch_end(void)
{
    off_host->free(b_status);
    b_status = NULL;
    inflight = 0;
}

/* The batch could not be stored now: senders are told, the rest waits. */
static void batch_failed(void)
{
    batch_end();
    fail_waiting();
    backoff();
}

/* The head batch (n rows) is committed: are the recipients of its rows
 * online now?  (A login elsewhere may have read the table just before.) */
static void check_online(size_t n)
{
    int64_t *uids = off_host->malloc(n * sizeof(*uids));
    struct off_msg *m = head;
    size_t i, k = 0;

    if (!uids)
        return; /* out of memory: the rows wait for the next login */
    for (i = 0; i < n && m; i++, m = m->next)
        if (!b_status || b_status[i] == CHAT_OK)
            uids[k++] = m->uid;
    off_take_check(uids, k);
    off_host->free(uids);
}

static void inserted(const struct chat_db_result *r, void *ud)
{
    size_t n = inflight;
    int err = off_host->db_error(r), dberr = off_host->db_errno(r);

    (void)ud;
    if (err == CHAT_OK) {
        check_online(n);
        stored(n);
        single_left = single_left > n ? single_left - n : 0;
        retry_ms = 0;
    } else if (dberr == 1452 && n > 1) {
        single_left = n; /* find the row with the unknown user */
    } else if (dberr == 1452) {
        chat_log(off_host, off_self, CHAT_LOG_WARN,
                 "dropping an offline message for unknown user %" PRId64
                 " (%zu bytes)", head->uid, head->len);
        pop(1, CHAT_ERR_NOTFOUND);
        single_left = single_left ? single_left - 1 : 0;
    } else if (err == CHAT_ERR_CLOSED) {
        batch_end();
        return; /* stopping: fini reports what is left */
    } else {
        chat_log(off_host, off_self, CHAT_LOG_WARN,
                 "storing %zu offline messages failed (%s); %zu queued, retrying",
                 n, off_host->db_errmsg(r), q_count);
        batch_failed();
        return;
    }
    batch_end();
    off_part_progress();
    flush();
}

/* INSERT the admitted rows of the head batch (inflight rows). */
static int insert_batch(void)
{
    size_t n = inflight, k = 0, i;
    struct chat_db_param *p = NULL;
    struct off_msg *m;
    char *sql = NULL;
    int rc = CHAT_ERR_NOMEM;

    for (i = 0; i < n; i++)
        k += !b_status || b_status[i] == CHAT_OK;
    if (k == 0) { /* every row refused: nothing to insert */
        stored(n);
        batch_end();
        off_part_progress();
        flush();
        return CHAT_OK;
    }
    sql = off_host->malloc(sizeof(INSERT_HEAD) + (k - 1) * (sizeof(INSERT_ROW) - 1));
    p = off_host->malloc(3 * k * sizeof(*p));
    if (!sql || !p)
        goto out;
    memcpy(sql, INSERT_HEAD, sizeof(INSERT_HEAD));
    for (i = 1; i < k; i++)
        memcpy(sql + sizeof(INSERT_HEAD) - 1 + (i - 1) * (sizeof(INSERT_ROW) - 1),
               INSERT_ROW, sizeof(INSERT_ROW));
    for (i = 0, k = 0, m = head; i < n; i++, m = m->next) {
        if (b_status && b_status[i] != CHAT_OK)
            continue;
        p[k++] = CHAT_DB_P_INT(m->uid);
        p[k++] = CHAT_DB_P_INT(m->from);
        p[k++] = CHAT_DB_P_STR(m->json, m->len);
    }
    rc = off_host->db_query(off_self, sql, p, k, inserted, NULL);
out:
    off_host->free(sql);
    off_host->free(p);
    return rc;
}

static void counted(const struct chat_db_result *r, void *ud)
{
    int err = off_host->db_error(r), rc;

    (void)ud;
    if (err == CHAT_ERR_CLOSED || !b_status || !head) {
        batch_end(); /* stopping (or unloaded meanwhile): fini reports */
        return;
    }
    if (err != CHAT_OK) {
        chat_log(off_host, off_self, CHAT_LOG_WARN,
                 "counting stored offline messages failed (%s); %zu queued, retrying",
                 off_host->db_errmsg(r), q_count);
        batch_failed();
        return;
    }
    if ((rc = off_quota_decide(r, head, inflight, b_status)) == CHAT_OK)
        rc = insert_batch();
    if (rc != CHAT_OK) {
        chat_log(off_host, off_self, CHAT_LOG_WARN,
                 "cannot queue an insert of %zu offline messages: %s", inflight,
                 off_host->strerror(rc));
        batch_failed();
    }
}

/* Start the next batch when none is in flight: count for the quotas first
 * when they apply to some of its rows, else insert at once. */
static void flush(void)
{
    size_t limit = single_left ? 1 : off_cfg.batch_max, n = 0, bytes = 0, checked = 0;
    struct off_msg *m;
    int rc;

    if (inflight || retry_wait || !head)
        return;
    if (pred_busy()) {
        if (!pred_poll)
            pred_poll = off_host->timer_start(off_self, BATON_POLL_MS, 0, pred_tick,
                                              NULL) != NULL;
        return;
    }
    for (m = head; m && n < limit; m = m->next) {
        if (n && (bytes + m->len > off_cfg.batch_bytes ||
                  (off_quota_applies(m) && checked == CHECKED_MAX)))
            break;
        checked += (size_t)off_quota_applies(m);
        bytes += m->len;
        n++;
    }
    inflight = n;
    if (!checked) {
        rc = insert_batch();
    } else if (!(b_status = off_host->malloc(n * sizeof(*b_status)))) {
        rc = CHAT_ERR_NOMEM;
    } else {
        rc = off_quota_query(head, n, counted);
    }
    if (rc == CHAT_OK)
        return;
    chat_log(off_host, off_self, CHAT_LOG_WARN,
             "cannot queue an insert of %zu offline messages: %s", n,
             off_host->strerror(rc));
    batch_failed();
}

/* Why a message with a ticket cannot be queued now (CHAT_OK: it can). */
static int admit(int64_t uid, int64_t from, size_t cost)
{
    if (retry_wait)
        return CHAT_ERR_UNAVAILABLE;
    if (q_bytes + cost > off_cfg.queue_max_bytes / 4 * 3 ||
        (from && share(by_from, from) + cost > off_cfg.queue_sender_max_bytes) ||
        share(by_uid, uid) + cost > off_cfg.queue_user_max_bytes)
        return CHAT_ERR_BUSY;
    return CHAT_OK;
}

int off_store_add(int64_t uid, int64_t from, const char *json, size_t len,
                  struct chat_delivery *ticket)
{
    struct off_msg *m;
    int rc;

    if (ticket && (rc = admit(uid, from, MSG_COST(len))) != CHAT_OK) {
        chat_log(off_host, off_self, CHAT_LOG_DEBUG,
                 "message from %" PRId64 " for user %" PRId64 " refused: %s "
                 "(%zu queued for the sender, %zu for the user, %zu in all)",
                 from, uid, off_host->strerror(rc), share(by_from, from),
                 share(by_uid, uid), q_bytes);
        return rc;
    }
    if (!ticket && q_bytes + MSG_COST(len) > off_cfg.queue_max_bytes) {
        chat_log(off_host, off_self, CHAT_LOG_ERROR,
                 "offline queue full (%zu messages, %zu bytes, queue_max_bytes=%zu):"
                 " message for user %" PRId64 " (%zu bytes) LOST",
                 q_count, q_bytes, off_cfg.queue_max_bytes, uid, len);
        return CHAT_ERR_BUSY;
    }
    m = off_host->malloc(MSG_COST(len));
    if (!m || share_add(by_from, from, MSG_COST(len), 1) != CHAT_OK) {
        off_host->free(m);
        chat_log(off_host, off_self, CHAT_LOG_ERROR,
                 "out of memory: offline message for user %" PRId64 "%s", uid,
                 ticket ? " refused" : " LOST");
        return CHAT_ERR_NOMEM;
    }
    if (share_add(by_uid, uid, MSG_COST(len), 1) != CHAT_OK) {
        share_add(by_from, from, MSG_COST(len), -1);
        off_host->free(m);
        chat_log(off_host, off_self, CHAT_LOG_ERROR,
                 "out of memory: offline message for user %" PRId64 "%s", uid,
                 ticket ? " refused" : " LOST");
        return CHAT_ERR_NOMEM;
    }
    m->next = NULL;
    m->seq = next_seq++;
    m->uid = uid;
    m->from = from;
    m->ticket = ticket;
    m->durable = !ticket && off_json_durable(json, len) == 1;
    m->len = len;
    memcpy(m->json, json, len);
    if (tail)
        tail->next = m;
    else
        head = m;
    tail = m;
    q_bytes += MSG_COST(len);
    q_count++;
    chat_log(off_host, off_self, CHAT_LOG_DEBUG,
             "queued a message for user %" PRId64 " (%zu waiting)", uid, q_count);
    flush();
    return CHAT_OK;
}

int off_store_start(void)
{
    if (!(by_from = off_host->map_new()) || !(by_uid = off_host->map_new())) {
        off_host->map_free(by_from);
        by_from = NULL;
        return CHAT_ERR_NOMEM;
    }
    return CHAT_OK;
}

uint64_t off_store_pending(int64_t uid)
{
    const struct off_msg *m;
    uint64_t seq = 0;

    for (m = head; m; m = m->next)
        if (m->uid == uid)
            seq = m->seq;
    if (!seq && pred_busy())
        seq = 1; /* the previous instance may still hold some */
    return seq;
}

int off_store_done(uint64_t seq)
{
    return !pred_busy() && (!head || head->seq > seq);
}

/* ------------------------------------------------------------------------ */
/* Reload handover.  Blob: u32 magic, u32 pad, u64 baton pointer, u64 count,
 * then per message u64 uid, u64 from, u64 ticket pointer, u64 len, len
 * bytes.  Tickets move with their messages (one process, one host). */

static void put64(unsigned char **w, uint64_t v)
{
    memcpy(*w, &v, 8);
    *w += 8;
}

static uint64_t get64(const unsigned char **r)
{
    uint64_t v;

    memcpy(&v, *r, 8);
    *r += 8;
    return v;
}

int off_store_save(void **blob, size_t *len)
{
    struct off_msg *m, *first = head;
    struct off_baton *b = NULL;
    size_t n = 0, size = 24, i;
    unsigned char *buf, *w;
    uint32_t magic = BLOB_MAGIC, pad = 0;

    for (i = 0; i < inflight; i++)
        first = first->next; /* the batch in flight stays here */
    for (m = first; m; m = m->next, n++)
        size += 32 + m->len;
    buf = off_host->malloc(size);
    if (!buf)
        return CHAT_ERR_NOMEM;
    if (inflight) { /* the next instance waits for our last INSERT */
        if (!my_baton) {
            if (!(my_baton = off_host->malloc(sizeof(*my_baton)))) {
                off_host->free(buf);
                return CHAT_ERR_NOMEM;
            }
            my_baton->busy = 1;
            my_baton->refs = 1; /* ours, dropped when our queue is empty */
        }
        b = my_baton;
        b->refs++; /* the blob's, adopted by restore() */
    } else if (pred_baton) {
        b = pred_baton; /* we never started: they wait for our predecessor */
        pred_baton = NULL; /* our reference moves into the blob */
    }
    w = buf;
    memcpy(w, &magic, 4);
    memcpy(w + 4, &pad, 4);
    w += 8;
    put64(&w, (uint64_t)(uintptr_t)b);
    put64(&w, n);
    for (m = first; m; m = m->next) {
        put64(&w, (uint64_t)m->uid);
        put64(&w, (uint64_t)m->from);
        put64(&w, (uint64_t)(uintptr_t)m->ticket);
        put64(&w, m->len);
        memcpy(w, m->json, m->len);
        w += m->len;
    }
    /* Forget what moved: keep only the batch in flight. */
    if (inflight) {
        struct off_msg *last = head;

        for (i = 1; i < inflight; i++)
            last = last->next;
        last->next = NULL;
        tail = last;
    } else {
        tail = head = NULL;
    }
    while (first) {
        m = first;
        first = m->next;
        q_bytes -= MSG_COST(m->len);
        q_count--;
        share_add(by_from, m->from, MSG_COST(m->len), -1);
        share_add(by_uid, m->uid, MSG_COST(m->len), -1);
        off_host->free(m); /* its ticket moved with the blob */
    }
    chat_log(off_host, off_self, CHAT_LOG_INFO,
             "handing %zu queued offline messages to the new instance%s", n,
             inflight ? " (it waits for our last insert)" : "");
    *blob = buf;
    *len = size;
    return CHAT_OK;
}

int off_store_restore(const void *blob, size_t len)
{
    const unsigned char *r = blob, *end = r + len;
    uint32_t magic;
    uint64_t n, uid, from, tk, mlen, i;

    if (len < 24)
        return CHAT_ERR_INVAL;
    memcpy(&magic, r, 4);
    if (magic != BLOB_MAGIC)
        return CHAT_ERR_INVAL;
    r += 8;
    pred_baton = (struct off_baton *)(uintptr_t)get64(&r);
    n = get64(&r);
    for (i = 0; i < n; i++) {
        if ((size_t)(end - r) < 32)
            return CHAT_ERR_INVAL;
        uid = get64(&r);
        from = get64(&r);
        tk = get64(&r);
        mlen = get64(&r);
        if ((uint64_t)(end - r) < mlen)
            return CHAT_ERR_INVAL;
        /* without its ticket for admission: it was admitted already */
        if (off_store_add((int64_t)uid, (int64_t)from, (const char *)r,
                          (size_t)mlen, NULL) == CHAT_OK)
            tail->ticket = (struct chat_delivery *)(uintptr_t)tk;
        else if (tk)
            off_host->delivery_done((struct chat_delivery *)(uintptr_t)tk,
                                    CHAT_ERR_NOMEM);
        r += mlen;
    }
    return CHAT_OK;
}

void off_store_fini(void)
{
    size_t waiting = 0;
    const struct off_msg *m;

    for (m = head; m; m = m->next)
        waiting += m->ticket != NULL;
    if (q_count - waiting)
        chat_log(off_host, off_self, CHAT_LOG_ERROR,
                 "unloading with %zu offline messages not stored: they are LOST",
                 q_count - waiting);
    if (waiting)
        chat_log(off_host, off_self, CHAT_LOG_WARN,
                 "unloading with %zu offline messages not stored; their senders "
                 "were not acknowledged", waiting);
    pop(q_count, CHAT_ERR_CLOSED);
    off_host->free(b_status);
    b_status = NULL;
    off_host->map_free(by_from);
    off_host->map_free(by_uid);
    by_from = by_uid = NULL;
}
