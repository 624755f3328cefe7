/*
 * writer.c - the group-committed writer of durable messages.
 *
 * Messages queue in lanes (a conversation always in the same lane: its id
 * modulo the lanes), and each lane has one transaction in flight: what
 * arrives meanwhile waits and goes into the next one, up to batch_max
 * messages.  So under load a transaction carries hundreds of messages from
 * many sessions, and per conversation the numbers follow the order this
 * node received the messages.  A batch takes at least 3/4 of what waits
 * (two INSERTs of power-of-two sizes: batch_want), and under load a lane
 * lingers linger_ms before a batch much smaller than its previous one
 * (lane_linger): right after a COMMIT only the stragglers wait, and the
 * senders it answered are about to send again.
 *
 * Numbering.  The writer keeps each conversation's head (its newest cseq)
 * in memory and numbers a batch itself: the i-th message of conversation c
 * gets head(c) + i.  The transaction (db_txn, on the pool's threads) is
 *   1. UPDATE conv_heads SET head = CASE conv_id WHEN c THEN new ... END
 *      WHERE conv_id IN (...): the row locks that serialise every writer of
 *      a conversation on every node (taken in conv_id order, record locks
 *      only: a primary-key IN list);
 *   2. INSERT INTO messages ... VALUES (...), ...: plain multi-row INSERTs
 *      of power-of-two sizes (so each pool connection prepares few shapes).
 * A head this writer does not know is read first ("prime": INSERT IGNORE
 * the row, then SELECT the heads, one small transaction).  Another node
 * (or a reloaded instance) may have written the conversation since: the
 * cached head is then behind, and the INSERT collides with the other
 * writer's row on PRIMARY (conv_id, cseq) (error 1062), which rolls the
 * whole transaction back; the writer forgets the heads of the batch, primes
 * them again and runs the batch again.  The primary key is what makes a
 * number impossible to hand out twice; the cache only makes the common
 * case (one writer per conversation at a time) a single transaction of two
 * statements.  Statements of the UPDATE are padded to 1, 8, 64 or 512
 * conversations (repeating the first).
 *
 * Message ids are reserved in blocks (id_blocks, LAST_INSERT_ID(next_id +
 * block)) in a transaction of their own, the next block fetched when half
 * of the current one is used: unique across nodes, no round trip per
 * message.
 *
 * Idempotency.  (sender_id, cid) is a unique key; a message without cid
 * (cid NULL: a protocol-2 message under durable = all that named none) has
 * no key, is never joined or deduplicated, and a resend of it is a new
 * message (NULLs never collide in a MariaDB unique index).  A retry whose original
 * is still queued or in flight here joins it and gets the same outcome.  A
 * retry of a message already stored (here or on another node) makes the
 * INSERT fail with 1062 on uq_messages_cid: the writer then reads which of
 * its messages exist already, answers those with the stored numbers (dup)
 * and runs the rest again.  Deadlock (1213) and lock wait timeout (1205)
 * run the batch again; at most DS_ATTEMPTS runs in all.  Any other failure
 * answers every message of the batch with the error (the database being
 * down: CHAT_ERR_UNAVAILABLE): an answer of CHAT_OK is only ever given
 * after COMMIT.
 */
#include <stdlib.h>

#include "dstore.h"

#define DS_ATTEMPTS 5
#define DS_LANES_MAX 16
#define DS_NBUCKETS 4
#define DS_INS_SHAPES 10         /* INSERT of 1, 2, 4, ..., 512 rows */
#define DS_HEADS_MAX (1u << 20)  /* cached heads; cleared when full */

static const size_t buckets[DS_NBUCKETS] = {1, 8, 64, 512};

struct ds_pend {
    struct ds_pend *next;    /* lane queue, then the batch */
    struct ds_pend *joined;  /* retries waiting for this one's outcome */
    int64_t conv, sender, mid, cseq;
    uint64_t key;            /* hash of (sender, cid) */
    int in_map;              /* it is the inflight map's entry for key */
    ds_done_fn fn;
    union {
        max_align_t align;
        unsigned char b[DS_CTX_MAX];
    } ctx;
    size_t cid_len, body_len;
    char data[];             /* cid, then body */
};

/* A conversation of the batch: its head before and after. */
struct ds_head {
    int64_t conv, old, new_;
};

struct ds_lane {
    struct ds_writer *w;
    struct ds_pend *head, **tail;
    size_t queued;           /* in head..tail */
    struct ds_pend *batch;   /* in flight */
    size_t nbatch;
    struct ds_head *heads;   /* the batch's conversations */
    size_t nheads;
    int busy;
    int attempts;
    int lingering;           /* a linger timer runs: submits start none */
    size_t last;             /* messages in the lane's previous batch */
};

struct ds_writer {
    const struct chat_host *h;
    struct chat_plugin *self;
    struct ds_conf conf;
    struct ds_lane lanes[DS_LANES_MAX];
    size_t queued;                /* messages not yet answered */
    struct chat_map *inflight;    /* key -> struct ds_pend * */
    struct chat_map *heads;       /* conv -> (uintptr_t)(head + 1) */
    int64_t id_next, id_end;      /* the block in use */
    int64_t spare_next, spare_end;/* the next block */
    int fetching;
    char *sql_upd[DS_NBUCKETS], *sql_prime_ins[DS_NBUCKETS];
    char *sql_prime_sel[DS_NBUCKETS], *sql_dedup[DS_NBUCKETS];
    char *sql_ins[DS_INS_SHAPES];
};

static void lane_pump(struct ds_lane *l);
static void batch_start(struct ds_lane *l);

/* ------------------------------------------------------------------------ */
/* SQL text per shape, built once. */

struct ds_sb {
    char *p;
    size_t len, cap;
    int err;
};

static void sb_add(const struct chat_host *h, struct ds_sb *b, const char *s)
{
    size_t n = strlen(s);
    char *np;

    if (b->err)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = (b->len + n + 1) * 2;

        if (!(np = h->realloc(b->p, cap))) {
            b->err = 1;
            return;
        }
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n + 1);
    b->len += n;
}

/* pre, then `item` n times joined by `sep`, then post. */
static char *sql_build(const struct chat_host *h, const char *pre, const char *item,
                       const char *sep, size_t n, const char *post)
{
    struct ds_sb b = {0};
    size_t i;

    sb_add(h, &b, pre);
    for (i = 0; i < n; i++) {
        if (i)
            sb_add(h, &b, sep);
        sb_add(h, &b, item);
    }
    sb_add(h, &b, post);
    if (b.err) {
        h->free(b.p);
        return NULL;
    }
    return b.p;
}

static size_t bucket_of(size_t n)
{
    size_t i;

    for (i = 0; i + 1 < DS_NBUCKETS && buckets[i] < n; i++)
        ;
    return i;
}

enum { SQL_UPD, SQL_PRIME_INS, SQL_PRIME_SEL, SQL_DEDUP };

static const char *sql_get(struct ds_writer *w, int kind, size_t bi)
{
    const struct chat_host *h = w->h;
    size_t n = buckets[bi];
    char **slot, *upd_case, *upd_in;

    switch (kind) {
    case SQL_UPD:
        if (!*(slot = &w->sql_upd[bi])) {
            upd_case = sql_build(h, "UPDATE conv_heads SET head = CASE conv_id ",
                                 "WHEN ? THEN ?", " ", n, " END WHERE conv_id IN (");
            upd_in = upd_case ? sql_build(h, upd_case, "?", ",", n, ")") : NULL;
            h->free(upd_case);
            *slot = upd_in;
        }
        return *slot;
    case SQL_PRIME_INS:
        if (!*(slot = &w->sql_prime_ins[bi]))
            *slot = sql_build(h, "INSERT IGNORE INTO conv_heads (conv_id, head, user_a, "
                              "user_b) VALUES ", "(?,0,?,?)", ",", n, "");
        return *slot;
    case SQL_PRIME_SEL:
        if (!*(slot = &w->sql_prime_sel[bi]))
            *slot = sql_build(h, "SELECT conv_id, head FROM conv_heads WHERE conv_id IN (",
                              "?", ",", n, ")");
        return *slot;
    default:
        if (!*(slot = &w->sql_dedup[bi])) {
            upd_case = sql_build(h, "SELECT sender_id, cid, id, conv_id, cseq FROM "
                                 "messages WHERE sender_id IN (", "?", ",", n,
                                 ") AND cid IN (");
            *slot = upd_case ? sql_build(h, upd_case, "?", ",", n, ")") : NULL;
            h->free(upd_case);
        }
        return *slot;
    }
}

/* INSERT INTO messages of exactly 2^shift rows. */
static const char *sql_ins(struct ds_writer *w, size_t shift)
{
    if (!w->sql_ins[shift])
        w->sql_ins[shift] = sql_build(w->h, "INSERT INTO messages (conv_id, cseq, id, "
                                      "sender_id, cid, body) VALUES ", "(?,?,?,?,?,?)",
                                      ",", (size_t)1 << shift, "");
    return w->sql_ins[shift];
}

/* ------------------------------------------------------------------------ */
/* Cached heads. */

static int head_get(const struct ds_writer *w, int64_t conv, int64_t *head)
{
    uintptr_t v = (uintptr_t)w->h->map_get(w->heads, conv);

    *head = (int64_t)v - 1;
    return v != 0;
}

static void head_put(struct ds_writer *w, int64_t conv, int64_t head)
{
    if (w->h->map_len(w->heads) >= DS_HEADS_MAX && !w->h->map_get(w->heads, conv)) {
        struct chat_map *m = w->h->map_new();

        if (!m)
            return;
        w->h->map_free(w->heads);
        w->heads = m;
    }
    w->h->map_put(w->heads, conv, (void *)(uintptr_t)(head + 1));
}

/* Forget the heads of the lane's batch (they may be stale). */
static void heads_forget(struct ds_lane *l)
{
    struct ds_pend *p;

    for (p = l->batch; p; p = p->next)
        l->w->h->map_del(l->w->heads, p->conv);
}

/* ------------------------------------------------------------------------ */
/* Answers. */

static void pend_answer(struct ds_writer *w, struct ds_pend *p, int status, int dup)
{
    struct ds_result r;
    struct ds_pend *j, *next;

    if (p->in_map)
        w->h->map_del(w->inflight, (int64_t)p->key);
    r.status = status;
    r.dup = dup;
    r.conv = p->conv;
    r.mid = status == CHAT_OK ? p->mid : 0;
    r.cseq = status == CHAT_OK ? p->cseq : 0;
    p->fn(&r, p->data + p->cid_len, p->body_len, p->ctx.b);
    for (j = p->joined; j; j = next) {
        next = j->next;
        r.dup = status == CHAT_OK;
        j->fn(&r, j->data + j->cid_len, j->body_len, j->ctx.b);
        w->h->free(j);
        w->queued--;
    }
    w->h->free(p);
    w->queued--;
}

static void batch_fail(struct ds_lane *l, int status)
{
    struct ds_pend *p, *next;

    heads_forget(l);
    for (p = l->batch; p; p = next) {
        next = p->next;
        pend_answer(l->w, p, status, 0);
    }
    l->batch = NULL;
    l->nbatch = 0;
}

/* Fail what waits in the lanes' queues (the ids cannot be had). */
static void queues_fail(struct ds_writer *w, int status)
{
    size_t i;

    for (i = 0; i < w->conf.lanes; i++) {
        struct ds_lane *l = &w->lanes[i];
        struct ds_pend *p, *next;

        p = l->head;
        l->head = NULL;
        l->tail = &l->head;
        l->queued = 0;
        for (; p; p = next) {
            next = p->next;
            pend_answer(w, p, status, 0);
        }
    }
}

static int fail_status(int rc)
{
    return rc == CHAT_ERR_BUSY || rc == CHAT_ERR_CLOSED || rc == CHAT_ERR_DB
               ? rc
               : CHAT_ERR_UNAVAILABLE;
}

/* ------------------------------------------------------------------------ */
/* Message ids. */

static int64_t ids_left(const struct ds_writer *w)
{
    return (w->id_end - w->id_next) + (w->spare_end - w->spare_next);
}

static void ids_done(const struct chat_db_result *r, void *ud)
{
    struct ds_writer *w = ud;
    const struct chat_db_result *sub;
    int64_t top;
    size_t i;
    int rc;

    w->fetching = 0;
    if ((rc = w->h->db_error(r)) != CHAT_OK || !(sub = w->h->db_sub(r, 1)) ||
        w->h->db_nrows(sub) != 1) {
        chat_log(w->h, w->self, CHAT_LOG_WARN, "reserving message ids failed: %s",
                 rc ? w->h->db_errmsg(r) : "no row");
        if (ids_left(w) == 0)
            queues_fail(w, rc == CHAT_ERR_DB ? CHAT_ERR_UNAVAILABLE : fail_status(rc));
        return;
    }
    top = w->h->db_int(sub, 0, 0);
    if (w->id_next == w->id_end) {
        w->id_next = top - w->conf.id_block;
        w->id_end = top;
    } else {
        w->spare_next = top - w->conf.id_block;
        w->spare_end = top;
    }
    for (i = 0; i < w->conf.lanes; i++)
        lane_pump(&w->lanes[i]);
}

static void ids_fetch(struct ds_writer *w)
{
    static const char upd[] = "UPDATE id_blocks SET next_id = "
                              "LAST_INSERT_ID(next_id + ?) WHERE name = 'message'";
    static const char sel[] = "SELECT LAST_INSERT_ID()";
    struct chat_db_param p = CHAT_DB_P_INT(w->conf.id_block);
    struct chat_db_stmt st[2] = {{upd, &p, 1}, {sel, NULL, 0}};
    int rc;

    if (w->fetching || w->spare_end > w->spare_next)
        return;
    if ((rc = w->h->db_txn(w->self, st, 2, ids_done, w)) == CHAT_OK)
        w->fetching = 1;
    else if (ids_left(w) == 0)
        queues_fail(w, rc == CHAT_ERR_BUSY ? CHAT_ERR_BUSY : CHAT_ERR_UNAVAILABLE);
}

static int64_t id_take(struct ds_writer *w)
{
    if (w->id_next == w->id_end) {
        w->id_next = w->spare_next;
        w->id_end = w->spare_end;
        w->spare_next = w->spare_end = 0;
    }
    return w->id_next++;
}

/* ------------------------------------------------------------------------ */
/* Priming: the heads this writer does not know. */

static void prime_done(const struct chat_db_result *r, void *ud)
{
    struct ds_lane *l = ud;
    const struct chat_host *h = l->w->h;
    const struct chat_db_result *sel;
    size_t i, n;
    int rc;

    l->busy = 0;
    if ((rc = h->db_error(r)) != CHAT_OK || !(sel = h->db_sub(r, 1))) {
        chat_log(h, l->w->self, CHAT_LOG_WARN, "reading conversation heads: %s",
                 h->db_errmsg(r));
        batch_fail(l, rc == CHAT_ERR_DB ? CHAT_ERR_UNAVAILABLE : fail_status(rc));
        lane_pump(l);
        return;
    }
    n = h->db_nrows(sel);
    for (i = 0; i < n; i++)
        head_put(l->w, h->db_int(sel, i, 0), h->db_int(sel, i, 1));
    batch_start(l);
    if (!l->busy)
        lane_pump(l);
}

/* Read the heads of the batch's conversations that are not cached.
 * 1: a prime is in flight; 0: nothing to read; -1: failed (batch answered). */
static int prime(struct ds_lane *l)
{
    struct ds_writer *w = l->w;
    const struct chat_host *h = w->h;
    int64_t *miss, v;
    size_t n = 0, i, bi, nb;
    struct chat_db_param *pr = NULL;
    struct chat_db_stmt st[2];
    struct ds_pend *p;
    int rc = CHAT_ERR_NOMEM;

    if (!(miss = h->malloc(l->nbatch * sizeof(*miss))))
        goto out;
    for (p = l->batch; p; p = p->next) {
        if (head_get(w, p->conv, &v))
            continue;
        for (i = 0; i < n && miss[i] != p->conv; i++)
            ;
        if (i == n)
            miss[n++] = p->conv;
    }
    if (n == 0) {
        h->free(miss);
        return 0;
    }
    if (n > buckets[DS_NBUCKETS - 1])
        n = buckets[DS_NBUCKETS - 1]; /* the rest in the next prime */
    bi = bucket_of(n);
    nb = buckets[bi];
    st[0].sql = sql_get(w, SQL_PRIME_INS, bi);
    st[1].sql = sql_get(w, SQL_PRIME_SEL, bi);
    if (!st[0].sql || !st[1].sql || !(pr = h->malloc(4 * nb * sizeof(*pr))))
        goto out;
    for (i = 0; i < nb; i++) {
        int64_t c = miss[i < n ? i : 0], a, b;

        ds_conv_users(c, &a, &b);
        pr[3 * i] = CHAT_DB_P_INT(c);
        pr[3 * i + 1] = a ? CHAT_DB_P_INT(a) : CHAT_DB_P_NULL;
        pr[3 * i + 2] = b ? CHAT_DB_P_INT(b) : CHAT_DB_P_NULL;
        pr[3 * nb + i] = CHAT_DB_P_INT(c);
    }
    st[0].params = pr;
    st[0].nparams = 3 * nb;
    st[1].params = pr + 3 * nb;
    st[1].nparams = nb;
    rc = h->db_txn(w->self, st, 2, prime_done, l);
out:
    h->free(pr);
    h->free(miss);
    if (rc == CHAT_OK) {
        l->busy = 1;
        return 1;
    }
    batch_fail(l, rc == CHAT_ERR_BUSY ? CHAT_ERR_BUSY : CHAT_ERR_UNAVAILABLE);
    return -1;
}

/* ------------------------------------------------------------------------ */
/* A batch. */

static void batch_done(const struct chat_db_result *r, void *ud);

/* Number the batch from the cached heads and build its statements: the
 * heads' UPDATE, then INSERTs of power-of-two sizes.  CHAT_OK once
 * db_txn took them. */
static int batch_run(struct ds_lane *l)
{
    struct ds_writer *w = l->w;
    const struct chat_host *h = w->h;
    size_t n = l->nbatch, nh = 0, i, bh, np = 0, ns = 0, left, shift;
    struct ds_head *hd;
    struct chat_db_param *pr = NULL;
    struct chat_db_stmt st[1 + DS_INS_SHAPES];
    struct ds_pend *p;
    int rc = CHAT_ERR_NOMEM;

    h->free(l->heads);
    if (!(l->heads = hd = h->malloc(n * sizeof(*hd))))
        goto out;
    for (p = l->batch; p; p = p->next) { /* batches are small: a linear scan */
        for (i = 0; i < nh && hd[i].conv != p->conv; i++)
            ;
        if (i == nh) {
            hd[nh].conv = p->conv;
            if (!head_get(w, p->conv, &hd[nh].old))
                goto out; /* primed just before: cannot happen */
            hd[nh++].new_ = hd[i].old;
        }
        p->cseq = ++hd[i].new_;
    }
    l->nheads = nh;
    bh = bucket_of(nh);
    if (nh > buckets[DS_NBUCKETS - 1] || !(st[0].sql = sql_get(w, SQL_UPD, bh)))
        goto out;
    if (!(pr = h->malloc((3 * buckets[bh] + 6 * n) * sizeof(*pr))))
        goto out;
    st[0].params = pr;
    for (i = 0; i < buckets[bh]; i++) { /* in conv_id order: sorted by the IN scan */
        const struct ds_head *x = &hd[i < nh ? i : 0];

        pr[np++] = CHAT_DB_P_INT(x->conv);
        pr[np++] = CHAT_DB_P_INT(x->new_);
    }
    for (i = 0; i < buckets[bh]; i++)
        pr[np++] = CHAT_DB_P_INT(hd[i < nh ? i : 0].conv);
    st[0].nparams = np;
    ns = 1;
    p = l->batch;
    for (left = n, shift = DS_INS_SHAPES; left > 0;) { /* 2^shift rows at a time */
        while (((size_t)1 << --shift) > left)
            ;
        if (!(st[ns].sql = sql_ins(w, shift)))
            goto out;
        st[ns].params = pr + np;
        st[ns].nparams = 6 * ((size_t)1 << shift);
        for (i = 0; i < ((size_t)1 << shift); i++, p = p->next) {
            pr[np++] = CHAT_DB_P_INT(p->conv);
            pr[np++] = CHAT_DB_P_INT(p->cseq);
            pr[np++] = CHAT_DB_P_INT(p->mid);
            pr[np++] = CHAT_DB_P_INT(p->sender);
            pr[np++] = p->cid_len ? CHAT_DB_P_STR(p->data, p->cid_len) : CHAT_DB_P_NULL;
            pr[np++] = CHAT_DB_P_STR(p->data + p->cid_len, p->body_len);
        }
        left -= (size_t)1 << shift;
        ns++;
        shift++; /* the next chunk is at most as large */
    }
    rc = h->db_txn(w->self, st, ns, batch_done, l);
out:
    h->free(pr);
    return rc;
}

/* Prime the heads if needed, then run the batch. */
static void batch_start(struct ds_lane *l)
{
    int rc;

    if (prime(l) != 0)
        return; /* in flight (busy), or failed and answered */
    if ((rc = batch_run(l)) == CHAT_OK) {
        l->busy = 1;
        return;
    }
    chat_log(l->w->h, l->w->self, CHAT_LOG_WARN, "storing %zu messages: %s",
             l->nbatch, l->w->h->strerror(rc));
    batch_fail(l, rc == CHAT_ERR_BUSY ? CHAT_ERR_BUSY : CHAT_ERR_UNAVAILABLE);
}

static void batch_stored(struct ds_lane *l)
{
    struct ds_pend *p, *next;
    size_t i;

    for (i = 0; i < l->nheads; i++)
        head_put(l->w, l->heads[i].conv, l->heads[i].new_);
    for (p = l->batch; p; p = next) {
        next = p->next;
        pend_answer(l->w, p, CHAT_OK, 0);
    }
    l->batch = NULL;
    l->nbatch = 0;
}

/* p is the message (sender, cid); never true for a message without cid. */
static int pend_is(const struct ds_pend *p, int64_t sender, const char *cid, size_t len)
{
    return p->cid_len && cid && p->sender == sender && p->cid_len == len &&
           memcmp(p->data, cid, len) == 0;
}

/* Which messages of the batch were stored before: answer those (dup) and
 * run the rest again. */
static void dedup_done(const struct chat_db_result *r, void *ud)
{
    struct ds_lane *l = ud;
    const struct chat_host *h = l->w->h;
    struct ds_pend **pp, *p;
    size_t i, n, found = 0;

    l->busy = 0;
    if (h->db_error(r) != CHAT_OK) {
        batch_fail(l, CHAT_ERR_UNAVAILABLE);
        lane_pump(l);
        return;
    }
    n = h->db_nrows(r);
    for (pp = &l->batch; (p = *pp) != NULL;) {
        for (i = 0; i < n; i++) {
            size_t len;
            const char *cid = h->db_str(r, i, 1, &len);

            if (pend_is(p, h->db_int(r, i, 0), cid, len))
                break;
        }
        if (i == n) {
            pp = &p->next;
            continue;
        }
        *pp = p->next;
        l->nbatch--;
        p->mid = h->db_int(r, i, 2);
        p->conv = h->db_int(r, i, 3);
        p->cseq = h->db_int(r, i, 4);
        pend_answer(l->w, p, CHAT_OK, 1);
        found++;
    }
    if (!found) { /* a duplicate key that is no retry: give up */
        chat_log(h, l->w->self, CHAT_LOG_ERROR, "storing messages: a duplicate key, "
                 "but no message of the batch was stored before");
        batch_fail(l, CHAT_ERR_DB);
    } else if (l->batch) {
        batch_start(l);
    }
    if (!l->busy)
        lane_pump(l);
}

static void dedup_start(struct ds_lane *l)
{
    struct ds_writer *w = l->w;
    size_t bi = bucket_of(l->nbatch), i, nb = buckets[bi];
    struct chat_db_param *pr;
    const char *sql = sql_get(w, SQL_DEDUP, bi);
    struct ds_pend *p;
    int rc = CHAT_ERR_NOMEM;

    if (sql && (pr = w->h->malloc(2 * nb * sizeof(*pr)))) {
        for (p = l->batch, i = 0; i < nb; i++) {
            const struct ds_pend *q = p ? p : l->batch;

            pr[i] = CHAT_DB_P_INT(q->sender);
            pr[nb + i] = q->cid_len ? CHAT_DB_P_STR(q->data, q->cid_len) : CHAT_DB_P_NULL;
            if (p)
                p = p->next;
        }
        rc = w->h->db_query(w->self, sql, pr, 2 * nb, dedup_done, l);
        w->h->free(pr);
    }
    if (rc == CHAT_OK) {
        l->busy = 1;
        return;
    }
    batch_fail(l, rc == CHAT_ERR_BUSY ? CHAT_ERR_BUSY : CHAT_ERR_UNAVAILABLE);
}

static void batch_done(const struct chat_db_result *r, void *ud)
{
    struct ds_lane *l = ud;
    const struct chat_host *h = l->w->h;
    int rc = h->db_error(r), my = h->db_errno(r);
    const char *msg = rc ? h->db_errmsg(r) : NULL;

    l->busy = 0;
    if (rc == CHAT_OK) {
        l->attempts = 0;
        batch_stored(l);
    } else if (my == 1062 && msg && strstr(msg, "uq_messages_cid")) {
        dedup_start(l); /* retries of stored messages */
    } else if ((my == 1062 || my == 1213 || my == 1205) && ++l->attempts < DS_ATTEMPTS) {
        /* 1062 on PRIMARY: a head was stale (another writer); deadlock or
         * lock wait: run again.  Either way the heads are read again. */
        chat_log(h, l->w->self, CHAT_LOG_INFO, "storing %zu messages: %s; again",
                 l->nbatch, msg);
        heads_forget(l);
        batch_start(l);
    } else {
        l->attempts = 0;
        chat_log(h, l->w->self, CHAT_LOG_WARN, "storing %zu messages failed: %s",
                 l->nbatch, msg);
        batch_fail(l, fail_status(rc));
    }
    if (!l->busy)
        lane_pump(l);
}

/* How many of the n waiting messages the next batch takes: the largest
 * power of two p <= n, plus the largest power of two <= n - p (so at
 * least 3/4 of what waits, at most batch_max, in at most two INSERTs: an
 * INSERT is a round trip, and messages left behind wait a whole
 * transaction more). */
static size_t batch_want(size_t n, size_t max)
{
    size_t p = 1, q = 0;

    if (n > max)
        n = max;
    while (p * 2 <= n)
        p *= 2;
    if (n > p)
        for (q = 1; q * 2 <= n - p; q *= 2)
            ;
    return p + q;
}

static void linger_timer(struct chat_timer *t, void *ud);

/* Under load (the previous batch was large), wait linger_ms before a
 * batch that would be much smaller than the previous one: the senders
 * answered by the previous COMMIT are sending their next messages, and a
 * batch started at once would carry only the stragglers.  1: lingering. */
static int lane_linger(struct ds_lane *l)
{
    struct ds_writer *w = l->w;

    if (l->lingering)
        return 1;
    if (!w->conf.linger_ms || l->last < 32 || l->queued * 2 >= l->last)
        return 0;
    if (!w->h->timer_start(w->self, w->conf.linger_ms, 0, linger_timer, l))
        return 0;
    l->lingering = 1;
    l->last = 0; /* the batch after the linger starts whatever waits */
    return 1;
}

/* Start the next batch when the lane is idle and ids are at hand.  A
 * batch takes what waits (at most batch_max; batch_want). */
static void lane_pump(struct ds_lane *l)
{
    struct ds_writer *w = l->w;

    while (!l->busy && l->head) {
        struct ds_pend **tailp = &l->batch, *p;
        size_t n = 0, want;

        if (ids_left(w) < w->conf.id_block / 2)
            ids_fetch(w); /* the next block, before this one runs out */
        if (ids_left(w) == 0)
            return; /* ids_done pumps again (or failed the queues) */
        if (lane_linger(l))
            return; /* linger_timer pumps */
        want = batch_want(l->queued, w->conf.batch_max);
        while (l->head && n < want && ids_left(w) > 0) {
            p = l->head;
            if (!(l->head = p->next))
                l->tail = &l->head;
            l->queued--;
            p->next = NULL;
            p->mid = id_take(w);
            *tailp = p;
            tailp = &p->next;
            n++;
        }
        l->nbatch = n;
        l->last = n;
        l->attempts = 0;
        batch_start(l);
    }
}

static void linger_timer(struct chat_timer *t, void *ud)
{
    struct ds_lane *l = ud;

    (void)t;
    l->lingering = 0;
    lane_pump(l);
}

/* Runs lane_pump outside the submitter's call (an answer never comes
 * inside ds_submit). */
static void pump_timer(struct chat_timer *t, void *ud)
{
    struct ds_lane *l = ud;

    (void)t;
    lane_pump(l);
}

/* ------------------------------------------------------------------------ */

static uint64_t key_of(int64_t sender, const char *cid, size_t len)
{
    uint64_t x = 1469598103934665603ULL;
    size_t i;

    for (i = 0; i < sizeof(sender); i++) {
        x ^= (uint64_t)((uint64_t)sender >> (8 * i)) & 0xff;
        x *= 1099511628211ULL;
    }
    for (i = 0; i < len; i++) {
        x ^= (unsigned char)cid[i];
        x *= 1099511628211ULL;
    }
    return x ? x : 1;
}

int ds_submit(struct ds_writer *w, const struct ds_msg *m, ds_done_fn fn,
              const void *ctx, size_t ctx_len)
{
    const struct chat_host *h = w->h;
    struct ds_pend *p, *orig;
    struct ds_lane *l;

    if (!fn || ctx_len > DS_CTX_MAX || m->cid_len > DS_CID_MAX ||
        (m->cid_len && !m->cid) || m->body_len < 2)
        return CHAT_ERR_INVAL;
    if (w->queued >= w->conf.queue_max)
        return CHAT_ERR_BUSY;
    if (!(p = h->malloc(sizeof(*p) + m->cid_len + m->body_len)))
        return CHAT_ERR_NOMEM;
    memset(p, 0, sizeof(*p));
    p->conv = m->conv;
    p->sender = m->sender;
    p->fn = fn;
    if (ctx_len)
        memcpy(p->ctx.b, ctx, ctx_len);
    p->cid_len = m->cid_len;
    p->body_len = m->body_len;
    if (m->cid_len)
        memcpy(p->data, m->cid, m->cid_len);
    memcpy(p->data + m->cid_len, m->body, m->body_len);
    p->key = m->cid_len ? key_of(m->sender, m->cid, m->cid_len) : 0;
    orig = p->key ? h->map_get(w->inflight, (int64_t)p->key) : NULL;
    if (orig && pend_is(orig, m->sender, m->cid, m->cid_len)) {
        p->next = orig->joined; /* a retry of a message still on its way */
        orig->joined = p;
        w->queued++;
        return CHAT_OK;
    }
    if (p->key && !orig && h->map_put(w->inflight, (int64_t)p->key, p) == CHAT_OK)
        p->in_map = 1;
    l = &w->lanes[(uint64_t)m->conv % w->conf.lanes];
    if (!l->busy && !l->head && !l->lingering &&
        !h->timer_start(w->self, 0, 0, pump_timer, l)) {
        if (p->in_map)
            h->map_del(w->inflight, (int64_t)p->key);
        h->free(p);
        return CHAT_ERR_NOMEM;
    }
    *l->tail = p;
    l->tail = &p->next;
    l->queued++;
    w->queued++;
    return CHAT_OK;
}

static void conf_fix(struct ds_conf *c)
{
    if (c->lanes < 1)
        c->lanes = 1;
    if (c->lanes > DS_LANES_MAX)
        c->lanes = DS_LANES_MAX;
    if (c->batch_max < 1)
        c->batch_max = 1;
    if (c->batch_max > buckets[DS_NBUCKETS - 1])
        c->batch_max = buckets[DS_NBUCKETS - 1];
    if (c->id_block < (int64_t)c->batch_max * 2)
        c->id_block = (int64_t)c->batch_max * 2;
}

void ds_conf_read(const struct chat_host *h, struct chat_plugin *self,
                  struct ds_conf *c)
{
    c->lanes = (size_t)chat_conf_range(h, self, "durable_lanes", 2, 1, DS_LANES_MAX);
    c->batch_max = (size_t)chat_conf_range(h, self, "durable_batch_max", 512, 1, 512);
    c->queue_max = (size_t)chat_conf_range(h, self, "durable_queue_max", 100000, 1,
                                           INT32_MAX);
    c->id_block = chat_conf_range(h, self, "durable_id_block", 100000, 1024,
                                  INT64_C(1) << 40);
    c->linger_ms = (unsigned)chat_conf_range(h, self, "durable_linger_ms", 0, 0, 100);
    conf_fix(c);
}

struct ds_writer *ds_writer_new(const struct chat_host *h, struct chat_plugin *self,
                                const struct ds_conf *conf)
{
    struct ds_writer *w = h->malloc(sizeof(*w));
    size_t i;

    if (!w)
        return NULL;
    memset(w, 0, sizeof(*w));
    w->h = h;
    w->self = self;
    w->conf = *conf;
    conf_fix(&w->conf);
    for (i = 0; i < DS_LANES_MAX; i++) {
        w->lanes[i].w = w;
        w->lanes[i].tail = &w->lanes[i].head;
    }
    if (!(w->inflight = h->map_new()) || !(w->heads = h->map_new())) {
        h->map_free(w->inflight);
        h->free(w);
        return NULL;
    }
    return w;
}

/* The lane count changes only while nothing waits (a conversation must not
 * move between lanes with messages queued in the old one). */
void ds_writer_reconf(struct ds_writer *w, const struct ds_conf *conf)
{
    struct ds_conf c = *conf;

    conf_fix(&c);
    if (w->queued)
        c.lanes = w->conf.lanes;
    c.id_block = w->conf.id_block; /* ids_done reads it for the block in flight */
    w->conf = c;
}

void ds_writer_free(struct ds_writer *w)
{
    size_t i;

    if (!w)
        return;
    queues_fail(w, CHAT_ERR_CLOSED); /* nothing is left once drained */
    for (i = 0; i < DS_NBUCKETS; i++) {
        w->h->free(w->sql_upd[i]);
        w->h->free(w->sql_prime_ins[i]);
        w->h->free(w->sql_prime_sel[i]);
        w->h->free(w->sql_dedup[i]);
    }
    for (i = 0; i < DS_INS_SHAPES; i++)
        w->h->free(w->sql_ins[i]);
    for (i = 0; i < DS_LANES_MAX; i++)
        w->h->free(w->lanes[i].heads);
    w->h->map_free(w->heads);
    w->h->map_free(w->inflight);
    w->h->free(w);
}
