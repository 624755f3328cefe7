/*
 * quota.c - the stored-message quotas (issue 12): at most stored_max
 * messages stored for one recipient, and at most stored_per_sender_max of
 * them from one sender; 0 turns either off.
 *
 * The count is the table itself, not a counter beside it: several nodes
 * insert into one offline_messages and the rows are deleted by whichever
 * node the recipient logs in on, so a per-node count would be wrong and a
 * counter table would have to be kept in step by every insert and delete
 * (and could drift).  Each message whose sender waits for its outcome (it
 * has a ticket) is inserted by a statement of its own that inserts it only
 * while the counts are under the quotas:
 *
 *   INSERT INTO offline_messages (user_id, from_id, message)
 *   SELECT ?, ?, ? FROM DUAL
 *   WHERE (SELECT COUNT(*) FROM (SELECT 1 FROM offline_messages
 *          WHERE user_id = ? LIMIT stored_max) q) < stored_max
 *     AND (... WHERE user_id = ? AND from_id = ? LIMIT per_sender ...) < per_sender
 *
 * Each COUNT reads an index range (ix_offline_user, ix_offline_from of
 * migration 003) and stops at the quota (LIMIT), so a check costs at most
 * stored_max + stored_per_sender_max index entries, and only a few while
 * mailboxes are small.  Under REPEATABLE READ the INSERT ... SELECT reads
 * with shared next-key locks, so two nodes inserting for the same
 * recipient at once are serialised (or one is rolled back as a deadlock
 * and its batch retried, store.c): the quota holds across nodes.
 *
 * No affected row: refused.  Which quota refused it is read from a plain
 * count of the sender's rows run just before (only when both quotas are
 * on): 129 when the sender is at its share, else 128.
 *
 * Messages nobody waits for (no ticket: already acknowledged to their
 * sender, e.g. routed to a node that then found the user gone, or a closed
 * session's unsent output) are not checked: refusing them would lose a
 * message that was reported delivered.  They go out, as before, in
 * multi-row INSERTs, and count towards the quotas of later messages.
 *
 * A batch is one transaction of these statements, in queue order (one
 * database round trip per statement, on the pool's worker thread).
 */
#include <inttypes.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "offline.h"

#define COLS "INSERT INTO offline_messages (user_id, from_id, message) "
#define INS_HEAD COLS "VALUES (?,?,?)"
#define INS_ROW ",(?,?,?)"
#define CHK_HEAD COLS "SELECT ?, ?, ? FROM DUAL WHERE "
#define CNT_USER "(SELECT COUNT(*) FROM (SELECT 1 FROM offline_messages " \
                 "WHERE user_id = ? LIMIT ?) q)"
#define CNT_FROM "(SELECT COUNT(*) FROM (SELECT 1 FROM offline_messages " \
                 "WHERE user_id = ? AND from_id = ? LIMIT ?) q)"

static const char chk_user[] = CHK_HEAD CNT_USER " < ?";
static const char chk_from[] = CHK_HEAD CNT_FROM " < ?";
static const char chk_both[] = CHK_HEAD CNT_USER " < ? AND " CNT_FROM " < ?";
static const char cnt_from[] = "SELECT " CNT_FROM;

#define NONE SIZE_MAX
#define PARAMS_MAX 13 /* of one row: count 3 + insert 3 + 3 + 4 */

static void add_stmt(struct off_batch *b, const char *sql)
{
    b->stmts[b->nstmts].sql = sql;
    b->stmts[b->nstmts].params = b->params + b->nparams;
    b->stmts[b->nstmts].nparams = 0;
    b->nstmts++;
}

static void add_param(struct off_batch *b, struct chat_db_param p)
{
    b->params[b->nparams++] = p;
    b->stmts[b->nstmts - 1].nparams++;
}

/* m's checked statements: the sender count (both quotas on), the insert. */
static void add_checked(struct off_batch *b, size_t i, const struct off_msg *m)
{
    int user = off_cfg.stored_max > 0;
    int from = off_cfg.stored_per_sender_max > 0 && m->from;
    int64_t um = off_cfg.stored_max, fm = off_cfg.stored_per_sender_max;

    b->rows[i].checked = (unsigned char)(user ? (from ? 3 : 1) : 2);
    if (user && from) {
        b->rows[i].cnt = b->nstmts;
        add_stmt(b, cnt_from);
        add_param(b, CHAT_DB_P_INT(m->uid));
        add_param(b, CHAT_DB_P_INT(m->from));
        add_param(b, CHAT_DB_P_INT(fm));
    }
    b->rows[i].stmt = b->nstmts;
    add_stmt(b, user && from ? chk_both : user ? chk_user : chk_from);
    add_param(b, CHAT_DB_P_INT(m->uid));
    add_param(b, CHAT_DB_P_INT(m->from));
    add_param(b, CHAT_DB_P_STR(m->json, m->len));
    if (user) {
        add_param(b, CHAT_DB_P_INT(m->uid));
        add_param(b, CHAT_DB_P_INT(um));
        add_param(b, CHAT_DB_P_INT(um));
    }
    if (from) {
        add_param(b, CHAT_DB_P_INT(m->uid));
        add_param(b, CHAT_DB_P_INT(m->from));
        add_param(b, CHAT_DB_P_INT(fm));
        add_param(b, CHAT_DB_P_INT(fm));
    }
}

static int is_checked(const struct off_msg *m)
{
    return m->ticket && (off_cfg.stored_max > 0 ||
                         (off_cfg.stored_per_sender_max > 0 && m->from));
}

int off_batch_build(struct off_batch *b, const struct off_msg *m, size_t n)
{
    size_t i, sqlw = 0;
    int run = 0; /* a multi-row INSERT is open at sql + sqlw */

    memset(b, 0, sizeof(*b));
    b->stmts = off_host->malloc(2 * n * sizeof(*b->stmts));
    b->params = off_host->malloc(PARAMS_MAX * n * sizeof(*b->params));
    b->rows = off_host->malloc(n * sizeof(*b->rows));
    b->sql = off_host->malloc(n * sizeof(INS_HEAD));
    if (!b->stmts || !b->params || !b->rows || !b->sql) {
        off_batch_free(b);
        return CHAT_ERR_NOMEM;
    }
    for (i = 0; i < n; i++, m = m->next) {
        b->rows[i].cnt = NONE;
        b->rows[i].checked = 0;
        if (is_checked(m)) {
            if (run)
                b->sql[sqlw++] = '\0';
            run = 0;
            add_checked(b, i, m);
            continue;
        }
        if (!run) { /* each row takes at most sizeof(INS_HEAD) bytes */
            add_stmt(b, b->sql + sqlw);
            memcpy(b->sql + sqlw, INS_HEAD, sizeof(INS_HEAD) - 1);
            sqlw += sizeof(INS_HEAD) - 1;
            run = 1;
        } else {
            memcpy(b->sql + sqlw, INS_ROW, sizeof(INS_ROW) - 1);
            sqlw += sizeof(INS_ROW) - 1;
        }
        b->rows[i].stmt = b->nstmts - 1;
        add_param(b, CHAT_DB_P_INT(m->uid));
        add_param(b, CHAT_DB_P_INT(m->from));
        add_param(b, CHAT_DB_P_STR(m->json, m->len));
    }
    if (run)
        b->sql[sqlw] = '\0';
    b->n = n;
    return CHAT_OK;
}

int off_batch_run(struct off_batch *b, chat_db_cb cb)
{
    if (b->nstmts == 1)
        return off_host->db_query(off_self, b->stmts[0].sql, b->stmts[0].params,
                                  b->stmts[0].nparams, cb, NULL);
    return off_host->db_txn(off_self, b->stmts, b->nstmts, cb, NULL);
}

static const struct chat_db_result *stmt_result(const struct off_batch *b,
                                                const struct chat_db_result *r,
                                                size_t k)
{
    return b->nstmts == 1 ? r : off_host->db_sub(r, k);
}

int off_batch_status(const struct off_batch *b, const struct chat_db_result *r,
                     size_t i)
{
    const struct chat_db_result *ins, *cnt;

    if (i >= b->n || !b->rows[i].checked)
        return CHAT_OK;
    ins = stmt_result(b, r, b->rows[i].stmt);
    if (!ins || off_host->db_affected(ins) > 0)
        return CHAT_OK;
    if (b->rows[i].checked == 1)
        return CHAT_ERR_QUOTA;
    if (b->rows[i].checked == 2)
        return CHAT_ERR_QUOTA_SENDER;
    cnt = stmt_result(b, r, b->rows[i].cnt);
    return cnt && off_host->db_nrows(cnt) &&
                   off_host->db_int(cnt, 0, 0) >= off_cfg.stored_per_sender_max
               ? CHAT_ERR_QUOTA_SENDER
               : CHAT_ERR_QUOTA;
}

void off_batch_free(struct off_batch *b)
{
    off_host->free(b->stmts);
    off_host->free(b->params);
    off_host->free(b->rows);
    off_host->free(b->sql);
    memset(b, 0, sizeof(*b));
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
        "Offline messages refused to their sender by a stored-message quota: "
        "recipient (stored_max, errno 128), sender (stored_per_sender_max, 129).";
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

void off_quota_refused(int64_t uid, int64_t from, int status)
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
             "message from %" PRId64 " for user %" PRId64 " not stored: %s "
             "(%s=%" PRId64 "); %" PRIu64 " more refused since the last line",
             from, uid, by_sender ? "too many from this sender"
                                  : "the recipient's mailbox is full",
             by_sender ? "stored_per_sender_max" : "stored_max",
             by_sender ? off_cfg.stored_per_sender_max : off_cfg.stored_max,
             log_quiet);
    log_quiet = 0;
}
