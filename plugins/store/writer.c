/*
 * writer.c - the group-committed writer of durable messages.
 *
 * Messages queue in lanes (a conversation always in the same lane: its id
 * modulo the lanes), and each lane has one transaction in flight: what
 * arrives meanwhile waits and goes into the next one, up to batch_max
 * messages.  So under load a transaction carries hundreds of messages from
 * many sessions (three statements and one COMMIT), and per conversation
 * the numbers follow the order this node received the messages.  The
 * transaction (db_txn, on the pool's worker threads):
 *   1. INSERT INTO conv_heads ... ON DUPLICATE KEY UPDATE head = head + k
 *      (one row per conversation, in conv_id order: the row locks that
 *      serialise writers of one conversation on every node);
 *   2. INSERT INTO messages ... SELECT ..., h.head - t.k + t.i ... JOIN
 *      conv_heads h: MariaDB numbers the messages from the head it holds;
 *   3. SELECT conv_id, head ...: the new heads, from which the same
 *      numbers are computed here for the replies.
 * Statements are padded to 1, 8, 64 or 512 rows so that each pool
 * connection prepares at most a few shapes (padding: NULL conversation rows,
 * which the JOIN drops; head rows repeating the first with k = 0).
 *
 * Message ids are reserved in blocks (id_blocks, LAST_INSERT_ID(next_id +
 * block)) in a transaction of their own, the next block fetched when half
 * of the current one is used: unique across nodes, no round trip per
 * message.
 *
 * Idempotency.  (sender_id, cid) is a unique key.  A retry whose original
 * is still queued or in flight here joins it and gets the same outcome.  A
 * retry of a message already stored (here or on another node) makes the
 * INSERT fail with 1062: the writer then reads which of its messages exist
 * already, answers those with the stored numbers (dup) and runs the rest
 * again.  Deadlock (1213) and lock wait timeout (1205) run the batch again
 * (at most DS_ATTEMPTS times).  Any other failure answers every message of
 * the batch with the error (the database being down: CHAT_ERR_UNAVAILABLE):
 * an answer of CHAT_OK is only ever given after COMMIT.
 */
#include <stdlib.h>

#include "dstore.h"

#define DS_ATTEMPTS 5
#define DS_LANES_MAX 16
#define DS_NBUCKETS 4

static const size_t buckets[DS_NBUCKETS] = {1, 8, 64, 512};

struct ds_pend {
    struct ds_pend *next;    /* lane queue, then the batch */
    struct ds_pend *joined;  /* retries waiting for this one's outcome */
    int64_t conv, sender, mid, cseq;
    int64_t k, i;            /* messages of its conversation in the batch; its rank */
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

struct ds_lane {
    struct ds_writer *w;
    struct ds_pend *head, **tail;
    struct ds_pend *batch;   /* in flight */
    size_t nbatch;
    int busy;
    int attempts;
};

struct ds_writer {
    const struct chat_host *h;
    struct chat_plugin *self;
    struct ds_conf conf;
    struct ds_lane lanes[DS_LANES_MAX];
    size_t queued;                /* messages not yet answered */
    struct chat_map *inflight;    /* key -> struct ds_pend * */
    int64_t id_next, id_end;      /* the block in use */
    int64_t spare_next, spare_end;/* the next block */
    int fetching;
    char *sql[4][DS_NBUCKETS];    /* heads, msgs, select, dedup */
};

enum { SQL_HEADS, SQL_MSGS, SQL_SEL, SQL_DEDUP };

static void lane_pump(struct ds_lane *l);

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

static size_t bucket_of(size_t n)
{
    size_t i;

    for (i = 0; i + 1 < DS_NBUCKETS && buckets[i] < n; i++)
        ;
    return i;
}

static const char *sql_get(struct ds_writer *w, int kind, size_t bi)
{
    struct ds_sb b = {0};
    size_t i, n = buckets[bi];

    if (w->sql[kind][bi])
        return w->sql[kind][bi];
    switch (kind) {
    case SQL_HEADS:
        sb_add(w->h, &b, "INSERT INTO conv_heads (conv_id, head, user_a, user_b) VALUES ");
        for (i = 0; i < n; i++)
            sb_add(w->h, &b, i ? ",(?,?,?,?)" : "(?,?,?,?)");
        sb_add(w->h, &b, " ON DUPLICATE KEY UPDATE head = head + VALUES(head)");
        break;
    case SQL_MSGS:
        sb_add(w->h, &b, "INSERT INTO messages (conv_id, cseq, id, sender_id, cid, body) "
                         "SELECT t.c, h.head - t.k + t.i, t.m, t.s, t.d, t.b FROM ("
                         "SELECT ? AS c, ? AS k, ? AS i, ? AS m, ? AS s, ? AS d, ? AS b");
        for (i = 1; i < n; i++)
            sb_add(w->h, &b, " UNION ALL SELECT ?,?,?,?,?,?,?");
        sb_add(w->h, &b, ") AS t JOIN conv_heads h ON h.conv_id = t.c");
        break;
    case SQL_SEL:
        sb_add(w->h, &b, "SELECT conv_id, head FROM conv_heads WHERE conv_id IN (");
        for (i = 0; i < n; i++)
            sb_add(w->h, &b, i ? ",?" : "?");
        sb_add(w->h, &b, ")");
        break;
    default:
        sb_add(w->h, &b, "SELECT sender_id, cid, id, conv_id, cseq FROM messages "
                         "WHERE sender_id IN (");
        for (i = 0; i < n; i++)
            sb_add(w->h, &b, i ? ",?" : "?");
        sb_add(w->h, &b, ") AND cid IN (");
        for (i = 0; i < n; i++)
            sb_add(w->h, &b, i ? ",?" : "?");
        sb_add(w->h, &b, ")");
        break;
    }
    if (b.err) {
        w->h->free(b.p);
        return NULL;
    }
    return w->sql[kind][bi] = b.p;
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
        for (; p; p = next) {
            next = p->next;
            pend_answer(w, p, status, 0);
        }
    }
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
            queues_fail(w, rc == CHAT_ERR_BUSY || rc == CHAT_ERR_CLOSED ? rc
                                                                      : CHAT_ERR_UNAVAILABLE);
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
/* A batch. */

struct ds_head {
    int64_t conv, k;
};

static int head_cmp(const void *a, const void *b)
{
    const struct ds_head *x = a, *y = b;

    return (x->conv > y->conv) - (x->conv < y->conv);
}

static void batch_done(const struct chat_db_result *r, void *ud);

/* Number the batch's messages per conversation and build the three
 * statements.  Returns CHAT_OK once db_txn took them. */
static int batch_run(struct ds_lane *l)
{
    struct ds_writer *w = l->w;
    const struct chat_host *h = w->h;
    size_t n = l->nbatch, nh = 0, i, bh, bm, np = 0;
    struct ds_head *heads = NULL;
    struct chat_db_param *pr = NULL;
    struct chat_db_stmt st[3];
    struct ds_pend *p;
    int rc = CHAT_ERR_NOMEM;

    if (!(heads = h->malloc(n * sizeof(*heads))))
        goto out;
    for (p = l->batch; p; p = p->next) { /* batches are small: a linear scan */
        for (i = 0; i < nh && heads[i].conv != p->conv; i++)
            ;
        if (i == nh) {
            heads[nh].conv = p->conv;
            heads[nh++].k = 0;
        }
        p->i = ++heads[i].k;
    }
    for (p = l->batch; p; p = p->next)
        for (i = 0; i < nh; i++)
            if (heads[i].conv == p->conv)
                p->k = heads[i].k;
    qsort(heads, nh, sizeof(*heads), head_cmp);
    bh = bucket_of(nh);
    bm = bucket_of(n);
    st[0].sql = sql_get(w, SQL_HEADS, bh);
    st[1].sql = sql_get(w, SQL_MSGS, bm);
    st[2].sql = sql_get(w, SQL_SEL, bh);
    if (!st[0].sql || !st[1].sql || !st[2].sql)
        goto out;
    if (!(pr = h->malloc((buckets[bh] * 5 + buckets[bm] * 7) * sizeof(*pr))))
        goto out;
    st[0].params = pr;
    for (i = 0; i < buckets[bh]; i++) {
        const struct ds_head *hd = &heads[i < nh ? i : 0];
        int64_t a, b;

        ds_conv_users(hd->conv, &a, &b);
        pr[np++] = CHAT_DB_P_INT(hd->conv);
        pr[np++] = CHAT_DB_P_INT(i < nh ? hd->k : 0);
        pr[np++] = a ? CHAT_DB_P_INT(a) : CHAT_DB_P_NULL;
        pr[np++] = b ? CHAT_DB_P_INT(b) : CHAT_DB_P_NULL;
    }
    st[0].nparams = np;
    st[1].params = pr + np;
    for (p = l->batch, i = 0; i < buckets[bm]; i++) {
        if (p) {
            pr[np++] = CHAT_DB_P_INT(p->conv);
            pr[np++] = CHAT_DB_P_INT(p->k);
            pr[np++] = CHAT_DB_P_INT(p->i);
            pr[np++] = CHAT_DB_P_INT(p->mid);
            pr[np++] = CHAT_DB_P_INT(p->sender);
            pr[np++] = CHAT_DB_P_STR(p->data, p->cid_len);
            pr[np++] = CHAT_DB_P_STR(p->data + p->cid_len, p->body_len);
            p = p->next;
        } else {
            size_t k;

            for (k = 0; k < 7; k++)
                pr[np++] = CHAT_DB_P_NULL;
        }
    }
    st[1].nparams = np - st[0].nparams;
    st[2].params = pr + np;
    for (i = 0; i < buckets[bh]; i++)
        pr[np++] = CHAT_DB_P_INT(heads[i < nh ? i : 0].conv);
    st[2].nparams = buckets[bh];
    rc = h->db_txn(w->self, st, 3, batch_done, l);
out:
    h->free(pr);
    h->free(heads);
    return rc;
}

static void batch_start(struct ds_lane *l)
{
    int rc = batch_run(l);

    if (rc == CHAT_OK) {
        l->busy = 1;
        return;
    }
    chat_log(l->w->h, l->w->self, CHAT_LOG_WARN, "storing %zu messages: %s",
             l->nbatch, l->w->h->strerror(rc));
    batch_fail(l, rc == CHAT_ERR_BUSY ? CHAT_ERR_BUSY : CHAT_ERR_UNAVAILABLE);
}

static void batch_stored(struct ds_lane *l, const struct chat_db_result *sel)
{
    const struct chat_host *h = l->w->h;
    size_t i, n = sel ? h->db_nrows(sel) : 0;
    struct ds_pend *p, *next;

    for (p = l->batch; p; p = next) {
        next = p->next;
        for (i = 0; i < n && h->db_int(sel, i, 0) != p->conv; i++)
            ;
        if (i == n) { /* cannot happen: the head row was written */
            pend_answer(l->w, p, CHAT_ERR_DB, 0);
            continue;
        }
        p->cseq = h->db_int(sel, i, 1) - p->k + p->i;
        pend_answer(l->w, p, CHAT_OK, 0);
    }
    l->batch = NULL;
    l->nbatch = 0;
}

static int pend_is(const struct ds_pend *p, int64_t sender, const char *cid, size_t len)
{
    return p->sender == sender && p->cid_len == len && memcmp(p->data, cid, len) == 0;
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
            pr[nb + i] = CHAT_DB_P_STR(q->data, q->cid_len);
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

    l->busy = 0;
    if (rc == CHAT_OK) {
        l->attempts = 0;
        batch_stored(l, h->db_sub(r, 2));
    } else if (my == 1062) {
        dedup_start(l);
    } else if ((my == 1213 || my == 1205) && ++l->attempts < DS_ATTEMPTS) {
        chat_log(h, l->w->self, CHAT_LOG_INFO, "storing %zu messages: %s; again",
                 l->nbatch, h->db_errmsg(r));
        batch_start(l);
    } else {
        l->attempts = 0;
        chat_log(h, l->w->self, CHAT_LOG_WARN, "storing %zu messages failed: %s",
                 l->nbatch, h->db_errmsg(r));
        batch_fail(l, rc == CHAT_ERR_DB ? CHAT_ERR_DB
                      : rc == CHAT_ERR_CLOSED ? CHAT_ERR_CLOSED : CHAT_ERR_UNAVAILABLE);
    }
    if (!l->busy)
        lane_pump(l);
}

/* Start the next batch when the lane is idle and ids are at hand. */
static void lane_pump(struct ds_lane *l)
{
    struct ds_writer *w = l->w;

    while (!l->busy && l->head) {
        struct ds_pend **tailp = &l->batch, *p;
        size_t n = 0;

        if (ids_left(w) < w->conf.id_block / 2)
            ids_fetch(w); /* the next block, before this one runs out */
        if (ids_left(w) == 0)
            return; /* ids_done pumps again (or failed the queues) */
        while (l->head && n < w->conf.batch_max && ids_left(w) > 0) {
            p = l->head;
            if (!(l->head = p->next))
                l->tail = &l->head;
            p->next = NULL;
            p->mid = id_take(w);
            *tailp = p;
            tailp = &p->next;
            n++;
        }
        l->nbatch = n;
        l->attempts = 0;
        batch_start(l);
    }
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

    if (!fn || ctx_len > DS_CTX_MAX || !m->cid_len || m->cid_len > DS_CID_MAX ||
        m->body_len < 2)
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
    memcpy(p->data, m->cid, m->cid_len);
    memcpy(p->data + m->cid_len, m->body, m->body_len);
    p->key = key_of(m->sender, m->cid, m->cid_len);
    orig = h->map_get(w->inflight, (int64_t)p->key);
    if (orig && pend_is(orig, m->sender, m->cid, m->cid_len)) {
        p->next = orig->joined; /* a retry of a message still on its way */
        orig->joined = p;
        w->queued++;
        return CHAT_OK;
    }
    if (!orig && h->map_put(w->inflight, (int64_t)p->key, p) == CHAT_OK)
        p->in_map = 1;
    l = &w->lanes[(uint64_t)m->conv % w->conf.lanes];
    if (!l->busy && !l->head &&
        !h->timer_start(w->self, 0, 0, pump_timer, l)) {
        if (p->in_map)
            h->map_del(w->inflight, (int64_t)p->key);
        h->free(p);
        return CHAT_ERR_NOMEM;
    }
    *l->tail = p;
    l->tail = &p->next;
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
    if (!(w->inflight = h->map_new())) {
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
    size_t i, k;

    if (!w)
        return;
    queues_fail(w, CHAT_ERR_CLOSED); /* nothing is left once drained */
    for (k = 0; k < 4; k++)
        for (i = 0; i < DS_NBUCKETS; i++)
            w->h->free(w->sql[k][i]);
    w->h->map_free(w->inflight);
    w->h->free(w);
}
