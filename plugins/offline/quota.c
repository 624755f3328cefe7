/*
 * quota.c - the stored-message quotas (issue 12): at most stored_max
 * messages stored for one recipient, and at most stored_per_sender_max of
 * them from one sender; 0 turns either off.
 *
 * The count is the table itself, not a counter beside it: several nodes
 * insert into one offline_messages and the rows are deleted by whichever
 * node the recipient logs in on, so a per-node count would be wrong, and a
 * counter table would have to be kept in step by every insert and delete
 * (and could drift).  Before a batch that holds messages whose senders wait
 * for the outcome (a ticket) is inserted, one SELECT counts, for each
 * recipient of those messages and each (recipient, sender) pair:
 *
 *   SELECT 0, uid, 0, COUNT(*) FROM (SELECT 1 FROM offline_messages
 *          WHERE user_id = ? LIMIT stored_max) q
 *   UNION ALL SELECT 1, uid, from, COUNT(*) FROM (SELECT 1 FROM
 *          offline_messages WHERE user_id = ? AND from_id = ? LIMIT per_sender) q
 *   UNION ALL ...
 *
 * Each part reads a covering index range (ix_offline_user,
 * ix_offline_from of migration 003) and stops at the quota (LIMIT), and
 * it is a plain consistent read: no locks.  The batch's rows are then
 * decided in queue order, each admitted row adding to its counts, so a
 * burst in one batch cannot pass a quota; the INSERT that follows holds
 * only the admitted rows.  A refused row's ticket gets CHAT_ERR_QUOTA or
 * CHAT_ERR_QUOTA_SENDER (both full: the sender's) once the batch is done.
 *
 * Across nodes the count is what was committed when the SELECT ran: two
 * nodes inserting for the same recipient at the same moment may together
 * pass a quota by what the other node's batch in flight holds for that
 * recipient (one batch per node is in flight).  That is the price of not
 * locking the recipient's rows on every insert (a locking count serialised
 * the inserts and cost milliseconds per message at a full mailbox).
 *
 * Messages nobody waits for (no ticket: already acknowledged to their
 * sender, e.g. routed to a node that then found the user gone, or a closed
 * session's unsent output) are never refused: refusing them would lose a
 * message that was reported delivered.  They count towards the quotas of
 * later messages.  The exception is the copy of a durable message
 * (issue 8: "mid", "conv", "cseq"; its sender had its ACK once the
 * message store committed it): a protocol-2 device gets it by SYNC from
 * the message store whatever happens here, so the copy, kept only for a
 * legacy device of the recipient, is refused past a quota like any other
 * (counted and logged; nobody is told).  Without that a protocol-2 sender
 * could fill an offline user's mailbox without bound.
 */
#include <inttypes.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "offline.h"

#define PART_USER "SELECT 0, ?, 0, COUNT(*) FROM (SELECT 1 FROM offline_messages " \
                  "WHERE user_id = ? LIMIT ?) q"
#define PART_FROM "SELECT 1, ?, ?, COUNT(*) FROM (SELECT 1 FROM offline_messages " \
                  "WHERE user_id = ? AND from_id = ? LIMIT ?) q"
#define UNION " UNION ALL "

/* One count: a recipient's (from 0) or a (recipient, sender) pair's. */
struct off_count {
    int pair;
    int64_t uid, from, n;
};

static int checks_user(void)
{
    return off_cfg.stored_max > 0;
}

static int checks_from(const struct off_msg *m)
{
    return off_cfg.stored_per_sender_max > 0 && m->from;
}

int off_quota_applies(const struct off_msg *m)
{
    return (m->ticket || m->durable) && (checks_user() || checks_from(m));
}

static struct off_count *find(struct off_count *c, size_t n, int pair, int64_t uid,
                              int64_t from)
{
    for (size_t i = 0; i < n; i++)
        if (c[i].pair == pair && c[i].uid == uid && (!pair || c[i].from == from))
            return &c[i];
    return NULL;
}

/* The distinct counts the checked rows of the batch need. */
static size_t counts_of(const struct off_msg *m, size_t n, struct off_count *c)
{
    size_t k = 0;

    for (; n--; m = m->next) {
        if (!off_quota_applies(m))
            continue;
        if (checks_user() && !find(c, k, 0, m->uid, 0))
            c[k++] = (struct off_count){0, m->uid, 0, 0};
        if (checks_from(m) && !find(c, k, 1, m->uid, m->from))
            c[k++] = (struct off_count){1, m->uid, m->from, 0};
    }
    return k;
}

int off_quota_query(const struct off_msg *m, size_t n, chat_db_cb cb)
{
    struct off_count *c = off_host->malloc(2 * n * sizeof(*c));
    struct chat_db_param *p = off_host->malloc(10 * n * sizeof(*p));
    char *sql = off_host->malloc(2 * n * (sizeof(PART_FROM) + sizeof(UNION)));
    size_t k, i, np = 0, w = 0;
    int rc = CHAT_ERR_NOMEM;

    if (!c || !p || !sql)
        goto out;
    k = counts_of(m, n, c);
    for (i = 0; i < k; i++) {
        const char *part = c[i].pair ? PART_FROM : PART_USER;
        size_t len = strlen(part);

        if (i) {
            memcpy(sql + w, UNION, sizeof(UNION) - 1);
            w += sizeof(UNION) - 1;
        }
        memcpy(sql + w, part, len);
        w += len;
        p[np++] = CHAT_DB_P_INT(c[i].uid);
        if (c[i].pair)
            p[np++] = CHAT_DB_P_INT(c[i].from);
        p[np++] = CHAT_DB_P_INT(c[i].uid);
        if (c[i].pair)
            p[np++] = CHAT_DB_P_INT(c[i].from);
        p[np++] = CHAT_DB_P_INT(c[i].pair ? off_cfg.stored_per_sender_max
                                          : off_cfg.stored_max);
    }
    sql[w] = '\0';
    rc = off_host->db_query(off_self, sql, p, np, cb, NULL);
out:
    off_host->free(c);
    off_host->free(p);
    off_host->free(sql);
    return rc;
}

int off_quota_decide(const struct chat_db_result *r, const struct off_msg *m,
                     size_t n, int *status)
{
    struct off_count *c = off_host->malloc(2 * n * sizeof(*c)), *u, *f;
    size_t k, i, rows = off_host->db_nrows(r);

    if (!c)
        return CHAT_ERR_NOMEM;
    k = counts_of(m, n, c);
    for (i = 0; i < rows; i++) {
        struct off_count *x = find(c, k, (int)off_host->db_int(r, i, 0),
                                   off_host->db_int(r, i, 1), off_host->db_int(r, i, 2));
        if (x)
            x->n = off_host->db_int(r, i, 3);
    }
    for (i = 0; i < n; i++, m = m->next) {
        u = find(c, k, 0, m->uid, 0);
        f = m->from ? find(c, k, 1, m->uid, m->from) : NULL;
        status[i] = CHAT_OK;
        if (off_quota_applies(m)) {
            if (f && f->n >= off_cfg.stored_per_sender_max)
                status[i] = CHAT_ERR_QUOTA_SENDER;
            else if (u && u->n >= off_cfg.stored_max)
                status[i] = CHAT_ERR_QUOTA;
        }
        if (status[i] != CHAT_OK)
            continue;
        if (u)
            u->n++;
        if (f)
            f->n++;
    }
    off_host->free(c);
    return CHAT_OK;
}

/* ------------------------------------------------------------------------ */
/* Refusals: counted, and logged at most once a second (a flood of messages
 * to a full mailbox must not flood the log). */

static struct chat_metric *refused_m[2]; /* recipient, sender */
static uint64_t log_next_ms;
static uint64_t log_quiet; /* refusals not logged since the last line */

void off_quota_start(void)
{
    static const char help[] =
        "Offline messages refused by a stored-message quota: recipient "
        "(stored_max, errno 128), sender (stored_per_sender_max, 129); the "
        "offline copies of durable messages included (their senders had an ACK).";
    const char *lu[] = {"quota", "recipient", NULL};
    const char *ls[] = {"quota", "sender", NULL};

    refused_m[0] = refused_m[1] = NULL;
    if (!CHAT_HOST_HAS(off_host, metric_inc))
        return;
    refused_m[0] = off_host->metric_counter(off_self, "refused_total", help, lu);
    refused_m[1] = off_host->metric_counter(off_self, "refused_total", help, ls);
}

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void off_quota_refused(int64_t uid, int64_t from, int status, int durable)
{
    int by_sender = status == CHAT_ERR_QUOTA_SENDER;
    uint64_t now = now_ms();

    if (refused_m[by_sender])
        off_host->metric_inc(refused_m[by_sender]);
    if (now < log_next_ms) {
        log_quiet++;
        return;
    }
    log_next_ms = now + 1000;
    chat_log(off_host, off_self, CHAT_LOG_INFO,
             "%s from %" PRId64 " for user %" PRId64 " not stored: %s "
             "(%s=%" PRId64 "); %" PRIu64 " more refused since the last line",
             durable ? "offline copy of a durable message (SYNC has it)" : "message",
             from, uid, by_sender ? "too many from this sender"
                                  : "the recipient's mailbox is full",
             by_sender ? "stored_per_sender_max" : "stored_max",
             by_sender ? off_cfg.stored_per_sender_max : off_cfg.stored_max,
             log_quiet);
    log_quiet = 0;
}
