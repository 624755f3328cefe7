/*
 * db.c - the asynchronous MySQL pool.
 *
 * Threads.  db_start() creates my_pool_size worker threads; each owns one
 * MYSQL connection (utf8mb4, connect/read/write timeouts, no auto-reconnect)
 * and a small LRU cache of prepared statements keyed by SQL text, since
 * plugins run the same few statements over and over.  The loop thread never
 * makes a MySQL call: db_query()/db_txn() copy the SQL and parameters into one
 * job and append it to a FIFO queue under a mutex, signalling one worker.
 * The queue is bounded (my_queue_max jobs waiting): past it the call fails
 * with CHAT_ERR_BUSY at once and the callback never runs.
 *
 * Completion.  A worker fills the job's result (rows copied out as byte
 * strings with lengths and NULL flags, so a result never refers to MySQL
 * memory), appends the job to a completed list under a second mutex and
 * pokes one uv_async_t.  On the loop thread the async callback takes the
 * whole list at once, runs each callback, frees the result and drops the
 * plugin reference taken when the call was accepted (through the two
 * functions main.c registers with db_on_ref: db calls nothing above it).  The async handle is
 * referenced only while callbacks are outstanding, so a pending query keeps
 * the loop alive and an idle pool does not.
 *
 * Faults and the retry rule.  Before a job a worker checks its socket with a
 * zero-timeout poll(): an idle connection with anything to read (EOF, the
 * server's shutdown packet) is dead, and is replaced before the job starts.
 * A connection lost during a job (2006, 2013, 1053, ...) is reconnected at
 * once, and the job is run again, once, when that cannot apply anything
 * twice: the failure came at connect or prepare time, the statement is a
 * SELECT, or it is a transaction that had not reached COMMIT (the server rolls
 * back an open transaction when its connection dies).  Otherwise the job fails
 * with CHAT_ERR_UNAVAILABLE.  A connection that cannot connect goes DOWN and
 * retries on its own with a backoff of 100 ms doubling to 5 s (all of them
 * retry at once when one gets through again); a DOWN worker takes no jobs.
 * When every connection is DOWN the database is considered unavailable:
 * what is queued, and what arrives until one connection comes back, fails
 * at once with CHAT_ERR_UNAVAILABLE ("database unavailable") -
 * through the callback, never synchronously - instead of waiting a connect
 * timeout each.  Outages and recoveries are logged once per state change.
 *
 * Shutdown.  db_stop() refuses new calls, fails what is still queued with
 * CHAT_ERR_CLOSED, lets running jobs finish, joins the threads and runs every
 * outstanding callback before it returns.
 *
 * Results.  Every column is fetched as bytes (MYSQL_TYPE_STRING buffers
 * sized by STMT_ATTR_UPDATE_MAX_LENGTH; a longer value is fetched again with
 * mysql_stmt_fetch_column), so db_str() works for any type and db_int() is
 * strtoll() of the text.  db_affected() is the rows changed, or for a
 * statement returning rows the number of rows; a transaction's own result
 * has no rows, the sum of its statements' changed rows and the last insert
 * id, and db_sub(r, i) gives statement i (NULL past the failing one).
 * String parameters go as MYSQL_TYPE_STRING in the connection's utf8mb4:
 * into BLOB/VARBINARY columns any bytes pass unchanged.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <mysql.h>
#include <errmsg.h>
#include <mysqld_error.h>

#include "core.h"

#define DB_STMT_CACHE 32        /* prepared statements kept per connection */
#define DB_BACKOFF_MIN_MS 100
#define DB_BACKOFF_MAX_MS 5000
#define DB_RW_TIMEOUT_S 30      /* read/write timeout of a running query */
#define DB_COL_MIN 64           /* smallest fetch buffer for a column */
#define DB_DEFAULT_POOL 4
#define DB_DEFAULT_QUEUE 10000
#define DB_DEFAULT_CONNECT_S 2

/* One cell of a result: bytes at data + off, NUL-terminated. */
struct db_cell {
    size_t off;
    size_t len;
    int null;
};

struct chat_db_result {
    int err;                 /* CHAT_OK or enum chat_err */
    unsigned my_errno;       /* server/client error number, 0 if none */
    char *errmsg;            /* mem_malloc'd; NULL when ok */
    size_t nrows, ncols;
    struct db_cell *cells;   /* nrows * ncols */
    size_t cellcap;
    char *data;              /* cell bytes */
    size_t dlen, dcap;
    uint64_t affected;
    uint64_t insert_id;
    int is_txn;
    struct chat_db_result *subs; /* txn: one per statement that ran */
    size_t nsubs;
};

/* A statement as queued: everything points into the job's one block. */
struct db_jstmt {
    const char *sql;
    size_t sqllen;
    struct chat_db_param *params;
    size_t nparams;
    int is_select;
};

struct db_job {
    struct db_job *next;
    struct chat_plugin *self;
    chat_db_cb cb;
    void *ud;
    uint64_t t_accept_ns;
    int is_txn;
    size_t nstmts;
    struct db_jstmt *stmts;
    struct chat_db_result res;
};

struct db_cached {
    struct db_cached *prev, *next;
    uint64_t hash;
    size_t len;
    MYSQL_STMT *st;
    char sql[];
};

enum db_conn_state {
    CONN_START,  /* first connect in progress */
    CONN_UP,     /* connected (or reconnecting inside a job) */
    CONN_DOWN,   /* failed; waiting for next_try_ms */
    CONN_RETRY   /* reconnecting after a backoff */
};

struct db_pool;

struct db_conn {
    struct db_pool *pool;
    int id;
    pthread_t thread;
    MYSQL *my;                   /* NULL while not connected */
    enum db_conn_state state;    /* guarded by pool->qlock */
    int was_up;                  /* has been connected once */
    uint64_t next_try_ms;        /* DOWN: when to retry; qlock */
    unsigned backoff_ms;         /* worker-only from here on */
    unsigned failures;           /* connect failures since last up */
    uint64_t reconnects;         /* re-established after a loss; qlock */
    uint64_t connect_failed;     /* failed connect attempts; qlock */
    unsigned last_errno;
    char last_err[256];
    struct db_cached *lru_head, *lru_tail;
    size_t ncached;
};

struct db_pool {
    uv_loop_t *loop;
    uv_async_t async;
    /* connection parameters, copied from the conf */
    char *host, *user, *password, *database, *socket;
    int port;
    unsigned connect_timeout_s;
    /* job queue and connection states */
    pthread_mutex_t qlock;
    pthread_cond_t job_cond;   /* UP workers wait here for jobs */
    pthread_cond_t idle_cond;  /* DOWN workers wait here for their retry */
    struct db_job *qhead, *qtail;
    size_t qlen, qmax;
    int stopping;
    int nconns, nthreads, n_down, outage;
    struct db_conn *conns;
    /* completed jobs, handed to the loop */
    pthread_mutex_t dlock;
    struct db_job *dhead, *dtail;
    /* loop thread only */
    struct db_job *batch;      /* taken from dhead, callbacks not yet run */
    uint64_t accepted, done, errors, lat_total_us, lat_max_us, outstanding;
    uint64_t refused;          /* queue full */
    struct metrics_hist lat;   /* seconds from accept to completion */
};

static void db_collect(struct metrics_out *o);

static struct db_pool *pool;   /* NULL: not started, no [mysql], or stopped */
/* plug_ref/plug_unref, registered by main.c (db calls nothing above it) */
static void (*ref_cb)(struct chat_plugin *p), (*unref_cb)(struct chat_plugin *p);

void db_on_ref(void (*ref)(struct chat_plugin *p), void (*unref)(struct chat_plugin *p))
{
    ref_cb = ref;
    unref_cb = unref;
}
static int pool_stopped;       /* db_stop() ran: calls fail CHAT_ERR_CLOSED */

/* ---- small helpers ---------------------------------------------------- */

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* Errors after which the connection cannot be used any more. */
static int err_is_lost(unsigned e)
{
    switch (e) {
    case CR_SERVER_GONE_ERROR:
    case CR_SERVER_LOST:
    case CR_CONNECTION_ERROR:
    case CR_CONN_HOST_ERROR:
    case CR_SERVER_LOST_EXTENDED:
    case CR_COMMANDS_OUT_OF_SYNC:
#ifdef CR_ERR_NET_READ
    case CR_ERR_NET_READ:
    case CR_ERR_NET_WRITE:
#endif
    case ER_SERVER_SHUTDOWN:
    case ER_CONNECTION_KILLED:
        return 1;
    default:
        return 0;
    }
}

/* Skip blanks, comments and '(' to the first keyword; 1 if it is SELECT. */
static int sql_is_select(const char *s)
{
    for (;;) {
        while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r' || *s == '(')
            s++;
        if (s[0] == '/' && s[1] == '*') {
            const char *e = strstr(s + 2, "*/");
            if (!e)
                return 0;
            s = e + 2;
        } else if (*s == '#' || (s[0] == '-' && s[1] == '-' &&
                                 (s[2] == ' ' || s[2] == '\t'))) {
            while (*s && *s != '\n')
                s++;
        } else {
            break;
        }
    }
    if (strncasecmp(s, "SELECT", 6) != 0)
        return 0;
    char c = s[6];
    return !((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
             (c >= '0' && c <= '9') || c == '_');
}

/* ---- results ---------------------------------------------------------- */

static void res_reset(struct chat_db_result *r)
{
    for (size_t i = 0; i < r->nsubs; i++)
        res_reset(&r->subs[i]);
    mem_free(r->subs);
    mem_free(r->errmsg);
    mem_free(r->cells);
    mem_free(r->data);
    int is_txn = r->is_txn;
    memset(r, 0, sizeof *r);
    r->is_txn = is_txn;
}

/* Set an error (replacing any earlier one); rows already read are kept. */
static void res_fail(struct chat_db_result *r, int err, unsigned my_errno,
                     const char *fmt, ...) CHAT_PRINTF(4, 5);
static void res_fail(struct chat_db_result *r, int err, unsigned my_errno,
                     const char *fmt, ...)
{
    char buf[600];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    mem_free(r->errmsg);
    r->err = err;
    r->my_errno = my_errno;
    r->errmsg = mem_strdup(buf); /* NULL on OOM: db_errmsg() gives "" */
}

/* Copy another result's error (a transaction's failing statement). */
static void res_copy_err(struct chat_db_result *dst, const struct chat_db_result *src)
{
    res_fail(dst, src->err, src->my_errno, "%s", src->errmsg ? src->errmsg : "");
}

/* Room for n more bytes in r->data; returns the offset or SIZE_MAX. */
static size_t res_reserve(struct chat_db_result *r, size_t n)
{
    if (r->dcap - r->dlen < n) {
        size_t cap = r->dcap ? r->dcap : 256;
        while (cap - r->dlen < n) {
            if (cap > SIZE_MAX / 2)
                return SIZE_MAX;
            cap *= 2;
        }
        char *d = mem_realloc(r->data, cap);
        if (!d)
            return SIZE_MAX;
        r->data = d;
        r->dcap = cap;
    }
    size_t off = r->dlen;
    r->dlen += n;
    return off;
}

static int res_add_row(struct chat_db_result *r)
{
    size_t need = (r->nrows + 1) * r->ncols;
    if (need > r->cellcap) {
        size_t cap = r->cellcap ? r->cellcap * 2 : r->ncols * 8;
        while (cap < need)
            cap *= 2;
        struct db_cell *c = mem_realloc(r->cells, cap * sizeof *c);
        if (!c)
            return -1;
        r->cells = c;
        r->cellcap = cap;
    }
    return 0;
}

/* ---- prepared statement cache ----------------------------------------- */

static void cache_unlink(struct db_conn *cn, struct db_cached *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        cn->lru_head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        cn->lru_tail = c->prev;
    c->prev = c->next = NULL;
    cn->ncached--;
}

static void cache_push_front(struct db_conn *cn, struct db_cached *c)
{
    c->prev = NULL;
    c->next = cn->lru_head;
    if (cn->lru_head)
        cn->lru_head->prev = c;
    cn->lru_head = c;
    if (!cn->lru_tail)
        cn->lru_tail = c;
    cn->ncached++;
}

/* Drop one entry; the statement is closed (COM_STMT_CLOSE when still live). */
static void cache_evict(struct db_conn *cn, struct db_cached *c)
{
    cache_unlink(cn, c);
    mysql_stmt_close(c->st);
    mem_free(c);
}

static void cache_clear(struct db_conn *cn)
{
    while (cn->lru_head)
        cache_evict(cn, cn->lru_head);
}

/* The prepared statement for js, from the cache or newly prepared (and
 * cached).  NULL with r's error set on failure. */
static struct db_cached *cache_get(struct db_conn *cn, const struct db_jstmt *js,
                                   struct chat_db_result *r)
{
    uint64_t h = fnv1a(js->sql, js->sqllen);
    struct db_cached *c;

    for (c = cn->lru_head; c; c = c->next) {
        if (c->hash == h && c->len == js->sqllen &&
            memcmp(c->sql, js->sql, js->sqllen) == 0) {
            if (c != cn->lru_head) {
                cache_unlink(cn, c);
                cache_push_front(cn, c);
            }
            return c;
        }
    }
    c = mem_malloc(sizeof *c + js->sqllen + 1);
    if (!c) {
        res_fail(r, CHAT_ERR_NOMEM, 0, "out of memory");
        return NULL;
    }
    c->st = mysql_stmt_init(cn->my);
    if (!c->st) {
        res_fail(r, CHAT_ERR_NOMEM, CR_OUT_OF_MEMORY, "out of memory");
        mem_free(c);
        return NULL;
    }
    my_bool on = 1;
    mysql_stmt_attr_set(c->st, STMT_ATTR_UPDATE_MAX_LENGTH, &on);
    if (mysql_stmt_prepare(c->st, js->sql, (unsigned long)js->sqllen) != 0) {
        unsigned e = mysql_stmt_errno(c->st);
        res_fail(r, err_is_lost(e) ? CHAT_ERR_UNAVAILABLE : CHAT_ERR_DB, e,
                 "%s", mysql_stmt_error(c->st));
        mysql_stmt_close(c->st);
        mem_free(c);
        return NULL;
    }
    c->hash = h;
    c->len = js->sqllen;
    memcpy(c->sql, js->sql, js->sqllen);
    c->sql[js->sqllen] = '\0';
    if (cn->ncached >= DB_STMT_CACHE)
        cache_evict(cn, cn->lru_tail);
    cache_push_front(cn, c);
    return c;
}

/* ---- connections ------------------------------------------------------ */

static void conn_drop(struct db_conn *cn)
{
    /* mysql_close() first: it detaches the statements, which are then only
     * freed instead of each sending COM_STMT_CLOSE to a dead socket. */
    if (cn->my)
        mysql_close(cn->my);
    cn->my = NULL;
    cache_clear(cn);
}

/* An idle connection has nothing to read: readable means EOF or an error
 * packet the server sent before closing (e.g. at shutdown). */
static int conn_alive(struct db_conn *cn)
{
    struct pollfd pf;

    pf.fd = (int)mysql_get_socket(cn->my);
    pf.events = POLLIN;
    pf.revents = 0;
    if (pf.fd < 0)
        return 0;
    int n = poll(&pf, 1, 0);
    return n == 0 || (n < 0 && errno == EINTR);
}

static int conn_open(struct db_conn *cn)
{
    struct db_pool *p = cn->pool;
    unsigned int ct = p->connect_timeout_s, rw = DB_RW_TIMEOUT_S;
    my_bool off = 0;
    const char *sock = p->socket && *p->socket ? p->socket : NULL;
    MYSQL *m = mysql_init(NULL);

    if (!m) {
        cn->last_errno = CR_OUT_OF_MEMORY;
        snprintf(cn->last_err, sizeof cn->last_err, "out of memory");
        return -1;
    }
    mysql_options(m, MYSQL_SET_CHARSET_NAME, "utf8mb4");
    mysql_options(m, MYSQL_INIT_COMMAND, "SET NAMES utf8mb4");
    mysql_options(m, MYSQL_OPT_CONNECT_TIMEOUT, &ct);
    mysql_options(m, MYSQL_OPT_READ_TIMEOUT, &rw);
    mysql_options(m, MYSQL_OPT_WRITE_TIMEOUT, &rw);
    mysql_options(m, MYSQL_OPT_RECONNECT, &off);
    if (!mysql_real_connect(m, sock ? NULL : p->host, p->user, p->password,
                            p->database, sock ? 0 : (unsigned)p->port, sock, 0)) {
        cn->last_errno = mysql_errno(m);
        snprintf(cn->last_err, sizeof cn->last_err, "%s", mysql_error(m));
        mysql_close(m);
        return -1;
    }
    cn->my = m;
    return 0;
}

/* Fail every queued job with UNAVAILABLE (qlock held, all connections DOWN). */
static void pool_fail_queue(struct db_pool *p)
{
    struct db_job *j = p->qhead, *last = NULL;

    if (!j)
        return;
    for (; j; j = j->next) {
        res_fail(&j->res, CHAT_ERR_UNAVAILABLE, 0, "database unavailable");
        last = j;
    }
    pthread_mutex_lock(&p->dlock);
    if (p->dtail)
        p->dtail->next = p->qhead;
    else
        p->dhead = p->qhead;
    p->dtail = last;
    pthread_mutex_unlock(&p->dlock);
    p->qhead = p->qtail = NULL;
    p->qlen = 0;
    uv_async_send(&p->async);
}

/* State changes, with qlock held. */
static void conn_set_up(struct db_conn *cn)
{
    struct db_pool *p = cn->pool;

    if (cn->state == CONN_DOWN)
        p->n_down--;
    if (cn->was_up)
        cn->reconnects++;
    if (cn->was_up && cn->failures > 0)
        LOGI("db: connection %d re-established after %u failed attempt(s)",
             cn->id, cn->failures);
    else
        LOGD("db: connection %d up", cn->id);
    if (p->outage) {
        p->outage = 0;
        LOGW("db: database reachable again");
    }
    if (cn->failures > 0) {
        /* the server is back: the others retry now, not at their backoff */
        for (int i = 0; i < p->nconns; i++)
            if (p->conns[i].state == CONN_DOWN)
                p->conns[i].next_try_ms = 0;
        pthread_cond_broadcast(&p->idle_cond);
    }
    cn->state = CONN_UP;
    cn->was_up = 1;
    cn->failures = 0;
    cn->backoff_ms = 0;
}

static void conn_set_down(struct db_conn *cn)
{
    struct db_pool *p = cn->pool;
    enum db_conn_state prev = cn->state;

    cn->failures++;
    cn->connect_failed++;
    cn->backoff_ms = cn->backoff_ms ? cn->backoff_ms * 2 : DB_BACKOFF_MIN_MS;
    if (cn->backoff_ms > DB_BACKOFF_MAX_MS)
        cn->backoff_ms = DB_BACKOFF_MAX_MS;
    cn->next_try_ms = mono_ms() + cn->backoff_ms;
    if (prev != CONN_DOWN)
        p->n_down++;
    cn->state = CONN_DOWN;
    if (prev == CONN_UP || prev == CONN_START)
        LOGW("db: connection %d cannot connect: %s (%u); retrying with backoff",
             cn->id, cn->last_err, cn->last_errno);
    else
        LOGD("db: connection %d retry failed: %s", cn->id, cn->last_err);
    if (p->n_down == p->nconns && !p->outage) {
        p->outage = 1;
        LOGE("db: database unavailable (%s); queries fail until it is back",
             cn->last_err);
    }
    if (p->n_down == p->nconns)
        pool_fail_queue(p);
}

/* One connect attempt; records the outcome in the connection state. */
static int conn_connect(struct db_conn *cn)
{
    struct db_pool *p = cn->pool;
    int rc = conn_open(cn);

    pthread_mutex_lock(&p->qlock);
    if (rc == 0)
        conn_set_up(cn);
    else
        conn_set_down(cn);
    pthread_mutex_unlock(&p->qlock);
    return rc;
}

/* Make sure the connection is usable before a job: 0 or -1 (DOWN). */
static int conn_ensure(struct db_conn *cn)
{
    if (cn->my && !conn_alive(cn)) {
        LOGI("db: connection %d was closed by the server; reconnecting", cn->id);
        conn_drop(cn);
    }
    if (cn->my)
        return 0;
    return conn_connect(cn);
}

/* ---- running statements ----------------------------------------------- */

/* Fill r from a failed statement call; returns 1 if the connection is lost. */
static int stmt_fail(struct db_cached *c, struct chat_db_result *r)
{
    unsigned e = mysql_stmt_errno(c->st);
    int lost = err_is_lost(e);

    res_fail(r, lost ? CHAT_ERR_UNAVAILABLE : CHAT_ERR_DB, e, "%s",
             mysql_stmt_error(c->st));
    return lost;
}

/* Fetch buffers for one result set: one MYSQL_BIND per column, sized by
 * the max_length that STMT_ATTR_UPDATE_MAX_LENGTH computed while storing. */
struct db_fetch {
    unsigned n;
    MYSQL_BIND *b;
    unsigned long *lens;
    my_bool *nulls;
    size_t *caps;
    char *bufs;
};

static void fetch_free(struct db_fetch *fx)
{
    mem_free(fx->bufs);
    mem_free(fx->caps);
    mem_free(fx->nulls);
    mem_free(fx->lens);
    mem_free(fx->b);
}

static int fetch_init(struct db_fetch *fx, const MYSQL_FIELD *f, unsigned n)
{
    size_t total = 0;

    memset(fx, 0, sizeof *fx);
    fx->n = n;
    fx->b = mem_calloc(n, sizeof *fx->b);
    fx->lens = mem_calloc(n, sizeof *fx->lens);
    fx->nulls = mem_calloc(n, sizeof *fx->nulls);
    fx->caps = mem_calloc(n, sizeof *fx->caps);
    if (!fx->b || !fx->lens || !fx->nulls || !fx->caps)
        return -1;
    for (unsigned i = 0; i < n; i++) {
        /* max_length covers converted types too (e.g. 300 for a DOUBLE) */
        fx->caps[i] = f[i].max_length > DB_COL_MIN ? f[i].max_length : DB_COL_MIN;
        total += fx->caps[i];
    }
    fx->bufs = mem_malloc(total);
    if (!fx->bufs)
        return -1;
    total = 0;
    for (unsigned i = 0; i < n; i++) {
        fx->b[i].buffer_type = MYSQL_TYPE_STRING;
        fx->b[i].buffer = fx->bufs + total;
        fx->b[i].buffer_length = fx->caps[i];
        fx->b[i].length = &fx->lens[i];
        fx->b[i].is_null = &fx->nulls[i];
        total += fx->caps[i];
    }
    return 0;
}

/* Copy the fetched row into r.  0, -1 (out of memory) or 1 (a column could
 * not be fetched again: the statement's error says why). */
static int fetch_row(MYSQL_STMT *st, struct db_fetch *fx, struct chat_db_result *r)
{
    if (res_add_row(r) != 0)
        return -1;
    struct db_cell *row = r->cells + r->nrows * fx->n;
    for (unsigned i = 0; i < fx->n; i++) {
        row[i].null = fx->nulls[i] != 0;
        row[i].len = row[i].null ? 0 : fx->lens[i];
        row[i].off = res_reserve(r, row[i].len + 1);
        if (row[i].off == SIZE_MAX)
            return -1;
        char *dst = r->data + row[i].off;
        if (row[i].len <= fx->caps[i]) {
            memcpy(dst, fx->b[i].buffer, row[i].len);
        } else {
            /* longer than max_length said: fetch it again, in place */
            MYSQL_BIND one;
            unsigned long got = 0;
            memset(&one, 0, sizeof one);
            one.buffer_type = MYSQL_TYPE_STRING;
            one.buffer = dst;
            one.buffer_length = row[i].len;
            one.length = &got;
            if (mysql_stmt_fetch_column(st, &one, i, 0) != 0)
                return 1;
        }
        dst[row[i].len] = '\0';
    }
    r->nrows++;
    return 0;
}

/* Copy the rows of the executed statement into r.  Returns 1 if the
 * connection is lost. */
static int stmt_fetch(struct db_cached *c, struct chat_db_result *r)
{
    MYSQL_STMT *st = c->st;
    MYSQL_RES *meta = NULL;
    struct db_fetch fx;
    int lost = 0, rc;

    memset(&fx, 0, sizeof fx);
    /* store first: the metadata then carries each column's max_length */
    if (mysql_stmt_store_result(st) != 0)
        return stmt_fail(c, r);
    meta = mysql_stmt_result_metadata(st);
    if (!meta) {
        lost = stmt_fail(c, r);
        goto out;
    }
    if (fetch_init(&fx, mysql_fetch_fields(meta), mysql_stmt_field_count(st)) != 0)
        goto nomem;
    if (mysql_stmt_bind_result(st, fx.b) != 0) {
        lost = stmt_fail(c, r);
        goto out;
    }
    r->ncols = fx.n;
    while ((rc = mysql_stmt_fetch(st)) == 0 || rc == MYSQL_DATA_TRUNCATED) {
        int frc = fetch_row(st, &fx, r);
        if (frc < 0)
            goto nomem;
        if (frc > 0) {
            lost = stmt_fail(c, r);
            goto out;
        }
    }
    if (rc == 1)
        lost = stmt_fail(c, r);
    goto out;
nomem:
    res_fail(r, CHAT_ERR_NOMEM, 0, "out of memory reading the result");
out:
    mysql_stmt_free_result(st);
    if (meta)
        mysql_free_result(meta);
    fetch_free(&fx);
    return lost;
}

/* Run one statement into r.  *safe says whether running it again cannot
 * apply it twice.  Returns 1 if the connection was lost (r has the error). */
static int stmt_exec(struct db_conn *cn, const struct db_jstmt *js,
                     struct chat_db_result *r, int *safe)
{
    MYSQL_BIND pb[16], *binds = pb;
    unsigned long plen_s[16], *plen = plen_s;
    struct db_cached *c;
    int lost = 0;

    *safe = 1;
    c = cache_get(cn, js, r);
    if (!c)
        return err_is_lost(r->my_errno);
    if (mysql_stmt_param_count(c->st) != js->nparams) {
        res_fail(r, CHAT_ERR_INVAL, 0, "the statement has %lu placeholders, %zu parameters given",
                 mysql_stmt_param_count(c->st), js->nparams);
        return 0;
    }
    if (js->nparams > 16) {
        binds = mem_calloc(js->nparams, sizeof *binds);
        plen = mem_calloc(js->nparams, sizeof *plen);
        if (!binds || !plen) {
            res_fail(r, CHAT_ERR_NOMEM, 0, "out of memory");
            goto out;
        }
    } else {
        memset(pb, 0, sizeof pb);
    }
    for (size_t i = 0; i < js->nparams; i++) {
        const struct chat_db_param *prm = &js->params[i];
        switch (prm->type) {
        case CHAT_DB_INT:
            binds[i].buffer_type = MYSQL_TYPE_LONGLONG;
            binds[i].buffer = (void *)&prm->i;
            break;
        case CHAT_DB_STR:
            plen[i] = (unsigned long)prm->len;
            binds[i].buffer_type = MYSQL_TYPE_STRING;
            binds[i].buffer = (void *)prm->s;
            binds[i].buffer_length = plen[i];
            binds[i].length = &plen[i];
            break;
        default:
            binds[i].buffer_type = MYSQL_TYPE_NULL;
            break;
        }
    }
    if (js->nparams > 0 && mysql_stmt_bind_param(c->st, binds) != 0) {
        lost = stmt_fail(c, r);
        goto out;
    }
    *safe = js->is_select;
    if (mysql_stmt_execute(c->st) != 0) {
        lost = stmt_fail(c, r);
        goto out;
    }
    r->insert_id = (uint64_t)mysql_stmt_insert_id(c->st);
    if (mysql_stmt_field_count(c->st) > 0) {
        lost = stmt_fetch(c, r);
        r->affected = r->nrows; /* as mysql_affected_rows() after a SELECT */
    } else {
        r->affected = (uint64_t)mysql_stmt_affected_rows(c->st);
    }
out:
    if (binds != pb) {
        mem_free(binds);
        mem_free(plen);
    }
    /* A client-side failure may leave the statement in an odd state:
     * prepare it afresh next time.  Server errors (1062...) keep it. */
    if (!lost && r->err == CHAT_ERR_DB && r->my_errno >= CR_MIN_ERROR &&
        r->my_errno <= CR_MAX_ERROR)
        cache_evict(cn, c);
    return lost;
}

/* Plain text command on the connection (transaction control). */
static int conn_cmd(struct db_conn *cn, const char *sql, struct chat_db_result *r)
{
    if (mysql_real_query(cn->my, sql, (unsigned long)strlen(sql)) == 0)
        return 0;
    unsigned e = mysql_errno(cn->my);
    int lost = err_is_lost(e);
    res_fail(r, lost ? CHAT_ERR_UNAVAILABLE : CHAT_ERR_DB, e, "%s: %s", sql,
             mysql_error(cn->my));
    return lost ? 1 : -1;
}

/* After a failed statement: ROLLBACK, or drop the connection if even that
 * fails (closing it rolls back on the server; a connection must never be
 * handed to the next job inside a transaction). */
static void txn_rollback(struct db_conn *cn)
{
    if (mysql_rollback(cn->my) != 0)
        conn_drop(cn);
}

static int txn_exec(struct db_conn *cn, struct db_job *j, int *safe)
{
    struct chat_db_result *r = &j->res;
    int rc, s_safe;

    *safe = 1; /* until COMMIT is sent, a lost connection rolls back */
    r->subs = mem_calloc(j->nstmts, sizeof *r->subs);
    if (!r->subs) {
        res_fail(r, CHAT_ERR_NOMEM, 0, "out of memory");
        return 0;
    }
    rc = conn_cmd(cn, "START TRANSACTION", r);
    if (rc != 0)
        return rc > 0;
    for (size_t i = 0; i < j->nstmts; i++) {
        struct chat_db_result *sub = &r->subs[i];
        int lost = stmt_exec(cn, &j->stmts[i], sub, &s_safe);
        r->nsubs = i + 1;
        if (lost) {
            res_copy_err(r, sub);
            return 1;
        }
        if (sub->err) {
            res_copy_err(r, sub);
            txn_rollback(cn);
            return 0;
        }
        if (sub->ncols == 0) /* rows changed, not rows read */
            r->affected += sub->affected;
        if (sub->insert_id)
            r->insert_id = sub->insert_id;
    }
    if (mysql_commit(cn->my) != 0) {
        unsigned e = mysql_errno(cn->my);
        if (err_is_lost(e)) {
            *safe = 0; /* the COMMIT may have been applied */
            res_fail(r, CHAT_ERR_UNAVAILABLE, e, "COMMIT: %s", mysql_error(cn->my));
            return 1;
        }
        res_fail(r, CHAT_ERR_DB, e, "COMMIT: %s", mysql_error(cn->my));
        txn_rollback(cn);
    }
    return 0;
}

/* Run a job to completion on cn, including one retry when safe. */
static void job_run(struct db_conn *cn, struct db_job *j)
{
    int retried = 0, safe, lost;

    for (;;) {
        if (conn_ensure(cn) != 0) {
            res_reset(&j->res);
            res_fail(&j->res, CHAT_ERR_UNAVAILABLE, cn->last_errno,
                     "database unavailable: %s", cn->last_err);
            return;
        }
        if (j->is_txn)
            lost = txn_exec(cn, j, &safe);
        else
            lost = stmt_exec(cn, &j->stmts[0], &j->res, &safe);
        if (!lost)
            return;
        unsigned e = j->res.my_errno;
        char msg[300];
        snprintf(msg, sizeof msg, "%s", j->res.errmsg ? j->res.errmsg : "");
        LOGW("db: connection %d lost: %s (%u); reconnecting", cn->id, msg, e);
        conn_drop(cn);
        int up = conn_connect(cn) == 0;
        if (!up || retried || !safe) {
            res_reset(&j->res);
            res_fail(&j->res, CHAT_ERR_UNAVAILABLE, e, "database unavailable: %s", msg);
            return;
        }
        retried = 1;
        res_reset(&j->res);
    }
}

/* ---- worker threads --------------------------------------------------- */

static void pool_complete(struct db_pool *p, struct db_job *j)
{
    j->next = NULL;
    pthread_mutex_lock(&p->dlock);
    if (p->dtail)
        p->dtail->next = j;
    else
        p->dhead = j;
    p->dtail = j;
    pthread_mutex_unlock(&p->dlock);
    uv_async_send(&p->async);
}

static void *conn_main(void *arg)
{
    struct db_conn *cn = arg;
    struct db_pool *p = cn->pool;

    mysql_thread_init();
    conn_connect(cn);
    pthread_mutex_lock(&p->qlock);
    while (!p->stopping) {
        if (cn->state == CONN_DOWN) {
            uint64_t now = mono_ms();
            if (now < cn->next_try_ms) {
                struct timespec ts;
                clock_gettime(CLOCK_MONOTONIC, &ts);
                uint64_t ns = (uint64_t)ts.tv_nsec + (cn->next_try_ms - now) * 1000000u;
                ts.tv_sec += (time_t)(ns / 1000000000u);
                ts.tv_nsec = (long)(ns % 1000000000u);
                pthread_cond_timedwait(&p->idle_cond, &p->qlock, &ts);
                continue;
            }
            cn->state = CONN_RETRY;
            p->n_down--;
            pthread_mutex_unlock(&p->qlock);
            conn_connect(cn);
            pthread_mutex_lock(&p->qlock);
            continue;
        }
        struct db_job *j = p->qhead;
        if (!j) {
            pthread_cond_wait(&p->job_cond, &p->qlock);
            continue;
        }
        p->qhead = j->next;
        if (!p->qhead)
            p->qtail = NULL;
        p->qlen--;
        pthread_mutex_unlock(&p->qlock);
        job_run(cn, j);
        pool_complete(p, j);
        pthread_mutex_lock(&p->qlock);
    }
    pthread_mutex_unlock(&p->qlock);
    conn_drop(cn);
    mysql_thread_end();
    return NULL;
}

/* ---- the loop side ---------------------------------------------------- */

static void job_free(struct db_job *j)
{
    res_reset(&j->res);
    mem_free(j); /* the statements and parameters live in the same block */
}

static void job_finish(struct db_pool *p, struct db_job *j)
{
    uint64_t lat = (uv_hrtime() - j->t_accept_ns) / 1000u;
    struct chat_plugin *self = j->self;

    p->done++;
    if (j->res.err)
        p->errors++;
    p->lat_total_us += lat;
    if (lat > p->lat_max_us)
        p->lat_max_us = lat;
    metrics_observe(&p->lat, (double)lat / 1e6);
    if (j->cb)
        j->cb(&j->res, j->ud);
    job_free(j);
    if (--p->outstanding == 0)
        uv_unref((uv_handle_t *)&p->async);
    if (self && unref_cb)
        unref_cb(self);
}

/* Run the callbacks of completed jobs: the batch taken now, or (all=1)
 * until nothing is left. */
static void pool_run_done(struct db_pool *p, int all)
{
    int taken = 0;

    for (;;) {
        if (!p->batch) {
            if (taken && !all)
                return;
            pthread_mutex_lock(&p->dlock);
            p->batch = p->dhead;
            p->dhead = p->dtail = NULL;
            pthread_mutex_unlock(&p->dlock);
            taken = 1;
            if (!p->batch)
                return;
        }
        struct db_job *j = p->batch;
        p->batch = j->next;
        job_finish(p, j);
    }
}

static void pool_async_cb(uv_async_t *h)
{
    pool_run_done(h->data, 0);
}

/* Copy the statements and their parameters into one block. */
static struct db_job *job_new(const struct chat_db_stmt *stmts, size_t n, int is_txn)
{
    size_t np = 0, bytes = 0, sz;
    struct db_job *j;
    char *data;
    struct chat_db_param *prm;

    for (size_t i = 0; i < n; i++) {
        np += stmts[i].nparams;
        bytes += strlen(stmts[i].sql) + 1;
        for (size_t k = 0; k < stmts[i].nparams; k++)
            if (stmts[i].params[k].type == CHAT_DB_STR)
                bytes += stmts[i].params[k].len + 1;
    }
    sz = sizeof *j + n * sizeof(struct db_jstmt) + np * sizeof(struct chat_db_param) + bytes;
    j = mem_malloc(sz);
    if (!j)
        return NULL;
    memset(j, 0, sizeof *j);
    j->is_txn = is_txn;
    j->res.is_txn = is_txn;
    j->nstmts = n;
    j->stmts = (struct db_jstmt *)(j + 1);
    prm = (struct chat_db_param *)(j->stmts + n);
    data = (char *)(prm + np);
    for (size_t i = 0; i < n; i++) {
        struct db_jstmt *js = &j->stmts[i];
        js->sqllen = strlen(stmts[i].sql);
        memcpy(data, stmts[i].sql, js->sqllen + 1);
        js->sql = data;
        data += js->sqllen + 1;
        js->is_select = sql_is_select(js->sql);
        js->params = prm;
        js->nparams = stmts[i].nparams;
        for (size_t k = 0; k < js->nparams; k++, prm++) {
            *prm = stmts[i].params[k];
            if (prm->type == CHAT_DB_STR) {
                if (prm->len)
                    memcpy(data, stmts[i].params[k].s, prm->len);
                data[prm->len] = '\0';
                prm->s = data;
                data += prm->len + 1;
            }
        }
    }
    return j;
}

static int stmts_valid(const struct chat_db_stmt *stmts, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!stmts[i].sql || (stmts[i].nparams && !stmts[i].params))
            return 0;
        if (stmts[i].nparams > UINT_MAX)
            return 0;
        for (size_t k = 0; k < stmts[i].nparams; k++) {
            const struct chat_db_param *prm = &stmts[i].params[k];
            if (prm->type != CHAT_DB_NULL && prm->type != CHAT_DB_INT &&
                prm->type != CHAT_DB_STR)
                return 0;
            if (prm->type == CHAT_DB_STR &&
                ((!prm->s && prm->len) || prm->len > ULONG_MAX / 2))
                return 0;
        }
    }
    return 1;
}

static int db_submit(struct chat_plugin *self, const struct chat_db_stmt *stmts,
                     size_t n, int is_txn, chat_db_cb cb, void *ud)
{
    struct db_pool *p = pool;
    struct db_job *j;
    int fail_now = 0;

    if (!p)
        return pool_stopped ? CHAT_ERR_CLOSED : CHAT_ERR_UNAVAILABLE;
    if (!stmts || n == 0 || !stmts_valid(stmts, n))
        return CHAT_ERR_INVAL;
    j = job_new(stmts, n, is_txn);
    if (!j)
        return CHAT_ERR_NOMEM;
    j->self = self;
    j->cb = cb;
    j->ud = ud;
    j->t_accept_ns = uv_hrtime();

    pthread_mutex_lock(&p->qlock);
    if (p->qlen >= p->qmax) {
        pthread_mutex_unlock(&p->qlock);
        job_free(j);
        p->refused++;
        return CHAT_ERR_BUSY;
    }
    if (p->n_down == p->nconns) {
        fail_now = 1;
    } else {
        if (p->qtail)
            p->qtail->next = j;
        else
            p->qhead = j;
        p->qtail = j;
        p->qlen++;
        pthread_cond_signal(&p->job_cond);
    }
    pthread_mutex_unlock(&p->qlock);
    if (fail_now) {
        /* every connection is in backoff: answer at once, but through the
         * loop like any other completion */
        res_fail(&j->res, CHAT_ERR_UNAVAILABLE, 0, "database unavailable");
        pool_complete(p, j);
    }
    p->accepted++;
    if (p->outstanding++ == 0)
        uv_ref((uv_handle_t *)&p->async);
    if (self && ref_cb)
        ref_cb(self);
    return CHAT_OK;
}

/* ---- public ----------------------------------------------------------- */

/* As chat_host.db_query/db_txn.  self may be NULL (core-internal: no
 * reference taken); cb may be NULL (fire and forget). */

int db_query(struct chat_plugin *self, const char *sql,
             const struct chat_db_param *params, size_t nparams, chat_db_cb cb,
             void *ud)
{
    struct chat_db_stmt one;

    one.sql = sql;
    one.params = params;
    one.nparams = nparams;
    return db_submit(self, &one, 1, 0, cb, ud);
}

int db_txn(struct chat_plugin *self, const struct chat_db_stmt *stmts,
           size_t nstmts, chat_db_cb cb, void *ud)
{
    return db_submit(self, stmts, nstmts, 1, cb, ud);
}

static void pool_free(struct db_pool *p)
{
    pthread_mutex_destroy(&p->qlock);
    pthread_mutex_destroy(&p->dlock);
    pthread_cond_destroy(&p->job_cond);
    pthread_cond_destroy(&p->idle_cond);
    mem_free(p->conns);
    mem_free(p->host);
    mem_free(p->user);
    mem_free(p->password);
    mem_free(p->database);
    mem_free(p->socket);
    mem_free(p);
}

static void pool_closed(uv_handle_t *h)
{
    pool_free(h->data);
}

/* Tell the threads to stop and join them. */
static void pool_join(struct db_pool *p)
{
    pthread_mutex_lock(&p->qlock);
    p->stopping = 1;
    pthread_cond_broadcast(&p->job_cond);
    pthread_cond_broadcast(&p->idle_cond);
    pthread_mutex_unlock(&p->qlock);
    for (int i = 0; i < p->nthreads; i++)
        pthread_join(p->conns[i].thread, NULL);
    p->nthreads = 0;
}

static char *dup_or_empty(const char *s)
{
    return mem_strdup(s ? s : "");
}

/* Fill p from the conf.  The locks are set up first, so that pool_free()
 * can undo whatever part of this succeeded. */
static int pool_init(struct db_pool *p, const struct conf *c)
{
    pthread_condattr_t ca;

    pthread_mutex_init(&p->qlock, NULL);
    pthread_mutex_init(&p->dlock, NULL);
    pthread_cond_init(&p->job_cond, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&p->idle_cond, &ca);
    pthread_condattr_destroy(&ca);
    p->host = dup_or_empty(c->my_host && *c->my_host ? c->my_host : "127.0.0.1");
    p->user = dup_or_empty(c->my_user);
    p->password = dup_or_empty(c->my_password);
    p->database = dup_or_empty(c->my_database);
    p->socket = dup_or_empty(c->my_socket);
    if (!p->host || !p->user || !p->password || !p->database || !p->socket)
        return CHAT_ERR_NOMEM;
    p->port = c->my_port > 0 ? c->my_port : 3306;
    p->connect_timeout_s = c->my_connect_timeout_s > 0 ? (unsigned)c->my_connect_timeout_s
                                                       : DB_DEFAULT_CONNECT_S;
    p->nconns = c->my_pool_size > 0 ? c->my_pool_size : DB_DEFAULT_POOL;
    p->qmax = c->my_queue_max > 0 ? (size_t)c->my_queue_max : DB_DEFAULT_QUEUE;
    p->conns = mem_calloc((size_t)p->nconns, sizeof *p->conns);
    return p->conns ? CHAT_OK : CHAT_ERR_NOMEM;
}

int db_start(uv_loop_t *loop, const struct conf *c)
{
    struct db_pool *p;
    sigset_t all, old;
    int rc;

    if (pool)
        return CHAT_ERR_STATE;
    pool_stopped = 0;
    if (!c->have_mysql) {
        LOGI("db: no [mysql] section; database calls fail with UNAVAILABLE");
        return CHAT_OK;
    }
    if (mysql_library_init(0, NULL, NULL) != 0) {
        LOGE("db: mysql_library_init failed");
        return CHAT_ERR_IO;
    }
    p = mem_calloc(1, sizeof *p);
    if (!p)
        return CHAT_ERR_NOMEM;
    metrics_hist_init(&p->lat, metrics_latency_bounds, METRICS_LATENCY_NB);
    metrics_add_collector(db_collect);
    rc = pool_init(p, c);
    if (rc == CHAT_OK && uv_async_init(loop, &p->async, pool_async_cb) != 0)
        rc = CHAT_ERR_IO;
    if (rc != CHAT_OK) {
        LOGE("db: cannot set up the pool: %s", rc == CHAT_ERR_NOMEM ? "out of memory"
                                                                     : "uv_async_init");
        pool_free(p);
        return rc;
    }
    p->loop = loop;
    p->async.data = p;
    uv_unref((uv_handle_t *)&p->async);

    /* workers take no signals: libuv's handlers belong to the loop thread */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (int i = 0; i < p->nconns; i++) {
        struct db_conn *cn = &p->conns[i];
        cn->pool = p;
        cn->id = i;
        cn->state = CONN_START;
        if (pthread_create(&cn->thread, NULL, conn_main, cn) != 0) {
            rc = CHAT_ERR_IO;
            break;
        }
        p->nthreads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        LOGE("db: cannot start the worker threads");
        pool_join(p);
        uv_close((uv_handle_t *)&p->async, pool_closed);
        return rc;
    }
    pool = p;
    if (*p->socket)
        LOGI("db: %d connections to %s as %s, database %s", p->nconns, p->socket,
             p->user, p->database);
    else
        LOGI("db: %d connections to %s:%d as %s, database %s", p->nconns, p->host,
             p->port, p->user, p->database);
    return CHAT_OK;
}

void db_stop(void)
{
    struct db_pool *p = pool;
    struct db_job *stolen, *j;

    if (!p) {
        pool_stopped = 1;
        return;
    }
    pool = NULL; /* callbacks run below see CHAT_ERR_CLOSED */
    pool_stopped = 1;
    pthread_mutex_lock(&p->qlock);
    stolen = p->qhead;
    p->qhead = p->qtail = NULL;
    p->qlen = 0;
    pthread_mutex_unlock(&p->qlock);
    pool_join(p);
    pool_run_done(p, 1);
    while ((j = stolen) != NULL) {
        stolen = j->next;
        res_fail(&j->res, CHAT_ERR_CLOSED, 0, "the server is stopping");
        job_finish(p, j);
    }
    LOGD("db: stopped after %llu queries", (unsigned long long)p->done);
    uv_close((uv_handle_t *)&p->async, pool_closed);
}

void db_get_stats(struct db_stats *st)
{
    struct db_pool *p = pool;

    memset(st, 0, sizeof *st);
    if (!p)
        return;
    pthread_mutex_lock(&p->qlock);
    st->queued = p->qlen;
    for (int i = 0; i < p->nconns; i++) {
        const struct db_conn *cn = &p->conns[i];
        st->reconnects += cn->reconnects;
        st->connect_failures += cn->connect_failed;
        st->conns_up += cn->state == CONN_UP;
    }
    pthread_mutex_unlock(&p->qlock);
    st->in_flight = p->accepted - p->done - st->queued;
    st->done = p->done;
    st->errors = p->errors;
    st->latency_us_total = p->lat_total_us;
    st->latency_us_max = p->lat_max_us;
    st->accepted = p->accepted;
    st->refused = p->refused;
    st->conns = (uint64_t)p->nconns;
    st->latency = p->lat;
}

/* chatd_db_*: the pool's figures at scrape time. */
static void db_collect(struct metrics_out *o)
{
    struct db_stats st;

    if (!pool)
        return;
    db_get_stats(&st);
    metrics_out_family(o, "chatd_db_queue_depth", "Database jobs waiting for a connection.",
                       METRICS_GAUGE);
    metrics_out_u64(o, "chatd_db_queue_depth", NULL, NULL, st.queued);
    metrics_out_family(o, "chatd_db_in_flight",
                       "Database jobs running on a connection or completed and not "
                       "yet called back.", METRICS_GAUGE);
    metrics_out_u64(o, "chatd_db_in_flight", NULL, NULL, st.in_flight);
    metrics_out_family(o, "chatd_db_connections", "Pool connections, by state.",
                       METRICS_GAUGE);
    metrics_out_u64(o, "chatd_db_connections", "state", "up", st.conns_up);
    metrics_out_u64(o, "chatd_db_connections", "state", "down", st.conns - st.conns_up);
    metrics_out_family(o, "chatd_db_queries_total",
                       "Database jobs (queries and transactions) completed.",
                       METRICS_COUNTER);
    metrics_out_u64(o, "chatd_db_queries_total", NULL, NULL, st.done);
    metrics_out_family(o, "chatd_db_errors_total",
                       "Database jobs completed with an error (database down included).",
                       METRICS_COUNTER);
    metrics_out_u64(o, "chatd_db_errors_total", NULL, NULL, st.errors);
    metrics_out_family(o, "chatd_db_refused_total",
                       "Database calls refused because the queue was full.",
                       METRICS_COUNTER);
    metrics_out_u64(o, "chatd_db_refused_total", NULL, NULL, st.refused);
    metrics_out_family(o, "chatd_db_reconnects_total",
                       "Connections re-established after being lost.", METRICS_COUNTER);
    metrics_out_u64(o, "chatd_db_reconnects_total", NULL, NULL, st.reconnects);
    metrics_out_family(o, "chatd_db_connect_failures_total",
                       "Connection attempts that failed.", METRICS_COUNTER);
    metrics_out_u64(o, "chatd_db_connect_failures_total", NULL, NULL,
                    st.connect_failures);
    metrics_out_family(o, "chatd_db_query_seconds",
                       "Database jobs from acceptance to completion (queue wait "
                       "included).", METRICS_HISTOGRAM);
    metrics_out_hist(o, "chatd_db_query_seconds", NULL, NULL, &st.latency);
}

int db_conns_up(void)
{
    struct db_pool *p = pool;
    int up = 0;

    if (!p)
        return -1;
    pthread_mutex_lock(&p->qlock);
    for (int i = 0; i < p->nconns; i++)
        up += p->conns[i].state == CONN_UP;
    pthread_mutex_unlock(&p->qlock);
    return up;
}

/* ---- result accessors (loop thread, inside the callback) -------------- */

int db_error(const struct chat_db_result *r)
{
    return r ? r->err : CHAT_ERR_INVAL;
}

int db_errno(const struct chat_db_result *r)
{
    return r ? (int)r->my_errno : 0;
}

const char *db_errmsg(const struct chat_db_result *r)
{
    return r && r->errmsg ? r->errmsg : "";
}

size_t db_nrows(const struct chat_db_result *r)
{
    return r ? r->nrows : 0;
}

size_t db_ncols(const struct chat_db_result *r)
{
    return r ? r->ncols : 0;
}

static const struct db_cell *cell(const struct chat_db_result *r, size_t row, size_t col)
{
    if (!r || row >= r->nrows || col >= r->ncols)
        return NULL;
    return &r->cells[row * r->ncols + col];
}

int db_is_null(const struct chat_db_result *r, size_t row, size_t col)
{
    const struct db_cell *c = cell(r, row, col);
    return !c || c->null;
}

int64_t db_int(const struct chat_db_result *r, size_t row, size_t col)
{
    const struct db_cell *c = cell(r, row, col);
    if (!c || c->null)
        return 0;
    return (int64_t)strtoll(r->data + c->off, NULL, 10);
}

/* SQL NULL gives "" (length 0; db_is_null tells them apart); a row or
 * column out of range gives NULL. */
const char *db_str(const struct chat_db_result *r, size_t row, size_t col, size_t *len)
{
    const struct db_cell *c = cell(r, row, col);

    if (len)
        *len = c ? c->len : 0;
    if (!c)
        return NULL;
    return c->null ? "" : r->data + c->off;
}

uint64_t db_affected(const struct chat_db_result *r)
{
    return r ? r->affected : 0;
}

uint64_t db_insert_id(const struct chat_db_result *r)
{
    return r ? r->insert_id : 0;
}

const struct chat_db_result *db_sub(const struct chat_db_result *r, size_t i)
{
    if (!r || !r->is_txn || i >= r->nsubs)
        return NULL;
    return &r->subs[i];
}
