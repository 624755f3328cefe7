/*
 * test_db.c - the MySQL pool and migrations against a real MariaDB.
 *
 * The server: with CHAT_TEST_MYSQL_DIR and CHAT_TEST_MYSQL_PORT set (the
 * test runner started one) the suite creates a fresh database there;
 * otherwise it starts its own with contrib/stack/mariadb.sh in a mkdtemp
 * directory on a free port.  The restart test always starts a private server
 * of its own, since it stops it.  Whatever was started or created is torn
 * down at exit, also on a failed assertion or a fatal signal.
 *
 * The test is its own loop thread: it runs a uv loop until the callbacks it
 * waits for have arrived (polling with a deadline, no fixed sleeps), and
 * counts every callback so a lost or doubled one is seen.  The references a
 * query takes on its plugin go to the counters of stubs.c (stub_ref/unref,
 * registered with db_on_ref): after each test they must balance to zero.
 */
#include <arpa/inet.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <CUnit/Basic.h>
#include <mysql.h>

#include "core.h"

#ifndef CHAT_SRC_DIR
#define CHAT_SRC_DIR "."
#endif

extern long stub_refs, stub_ref_calls, stub_unref_calls, stub_unref_below_zero;
void stub_ref(struct chat_plugin *p);
void stub_unref(struct chat_plugin *p);

static char fake_plugin_mem;
#define FAKE ((struct chat_plugin *)(void *)&fake_plugin_mem)

static uv_loop_t loop;
static char src_dir[1024], script[PATH_MAX], sql_dir[PATH_MAX];
static char tmp_root[512]; /* everything this process owns */

struct server {
    char dir[PATH_MAX];
    int port;
    int owned;    /* started by us: stop it at exit */
    int running;
};
static struct server main_srv, priv_srv;
static char main_db[64];
static int main_db_created;

/* ---- process-level setup and teardown --------------------------------- */

static int sh(const char *fmt, ...) CHAT_PRINTF(1, 2);
static int sh(const char *fmt, ...)
{
    char cmd[4 * PATH_MAX];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    return rc == -1 ? -1 : WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

static void cleanup_all(void)
{
    static int done;
    if (done)
        return;
    done = 1;
    if (priv_srv.running)
        sh("'%s' stop '%s' >/dev/null 2>&1", script, priv_srv.dir);
    if (main_srv.owned && main_srv.running)
        sh("'%s' stop '%s' >/dev/null 2>&1", script, main_srv.dir);
    else if (main_db_created)
        sh("'%s' dropdb '%s' %s >/dev/null 2>&1", script, main_srv.dir, main_db);
    if (tmp_root[0] && !getenv("CHAT_TEST_KEEP"))
        sh("rm -rf '%s'", tmp_root);
}

static void on_fatal(int sig)
{
    cleanup_all();
    signal(sig, SIG_DFL);
    raise(sig);
}

static int free_port(void)
{
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;

    if (fd < 0)
        return -1;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

static int server_start(struct server *s, const char *name)
{
    snprintf(s->dir, sizeof s->dir, "%s/%s", tmp_root, name);
    s->port = free_port();
    s->owned = 1;
    if (s->port <= 0)
        return -1;
    s->running = 1; /* even a half-started server gets a stop at exit */
    return sh("'%s' start '%s' %d", script, s->dir, s->port) == 0 ? 0 : -1;
}

static void conf_for(struct conf *c, const struct server *s, const char *db, int pool,
                     int qmax)
{
    memset(c, 0, sizeof *c);
    c->path = (char *)"test_db";
    c->have_mysql = 1;
    c->my_host = (char *)"127.0.0.1";
    c->my_port = s->port;
    c->my_user = (char *)"chat";
    c->my_password = (char *)"chat";
    c->my_database = (char *)db;
    c->my_socket = (char *)"";
    c->my_pool_size = pool;
    c->my_queue_max = qmax;
    c->my_connect_timeout_s = 2;
    c->sql_dir = sql_dir;
}

/* ---- running the loop ------------------------------------------------- */

static void tick_cb(uv_timer_t *t)
{
    (void)t;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Run the loop until *counter >= target or timeout_ms passes. */
static int run_until(const long *counter, long target, unsigned timeout_ms)
{
    uv_timer_t t;
    uint64_t end = now_ms() + timeout_ms;

    uv_timer_init(&loop, &t);
    uv_timer_start(&t, tick_cb, 10, 10); /* keeps the loop alive and wakes us */
    while (*counter < target && now_ms() < end)
        uv_run(&loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
    return *counter >= target;
}

static void pool_up(const struct conf *c)
{
    CU_ASSERT_EQUAL_FATAL(db_start(&loop, c), CHAT_OK);
}

static void pool_down(void)
{
    db_stop();
    uv_run(&loop, UV_RUN_NOWAIT); /* the async handle's close callback */
    CU_ASSERT_EQUAL(stub_refs, 0);
    CU_ASSERT_EQUAL(stub_ref_calls, stub_unref_calls);
    CU_ASSERT_EQUAL(stub_unref_below_zero, 0);
}

/* ---- a copied result -------------------------------------------------- */

#define TRES_SUBS 8
struct tres {
    long done;           /* callbacks received (must end at 1) */
    int err, my_errno;
    char errmsg[512];
    size_t nrows, ncols;
    char **cells;
    size_t *lens;
    int *nulls;
    int64_t *ints;
    uint64_t affected, insert_id;
    int had_ref;         /* the reference was held during the callback */
    int sub_null[TRES_SUBS];
    struct tres *sub[TRES_SUBS];
};

static void tres_fill(struct tres *t, const struct chat_db_result *r)
{
    size_t n;

    t->err = db_error(r);
    t->my_errno = db_errno(r);
    snprintf(t->errmsg, sizeof t->errmsg, "%s", db_errmsg(r));
    t->nrows = db_nrows(r);
    t->ncols = db_ncols(r);
    t->affected = db_affected(r);
    t->insert_id = db_insert_id(r);
    n = t->nrows * t->ncols;
    t->cells = calloc(n + 1, sizeof *t->cells);
    t->lens = calloc(n + 1, sizeof *t->lens);
    t->nulls = calloc(n + 1, sizeof *t->nulls);
    t->ints = calloc(n + 1, sizeof *t->ints);
    for (size_t i = 0; i < t->nrows; i++) {
        for (size_t k = 0; k < t->ncols; k++) {
            size_t len, x = i * t->ncols + k;
            const char *s = db_str(r, i, k, &len);
            t->cells[x] = malloc(len + 1);
            memcpy(t->cells[x], s, len + 1);
            t->lens[x] = len;
            t->nulls[x] = db_is_null(r, i, k);
            t->ints[x] = db_int(r, i, k);
        }
    }
    for (size_t i = 0; i < TRES_SUBS; i++) {
        const struct chat_db_result *s = db_sub(r, i);
        t->sub_null[i] = s == NULL;
        if (s) {
            t->sub[i] = calloc(1, sizeof *t->sub[i]);
            tres_fill(t->sub[i], s);
        }
    }
}

static void tres_free(struct tres *t)
{
    size_t n = t->nrows * t->ncols;
    for (size_t i = 0; i < n; i++)
        free(t->cells[i]);
    free(t->cells);
    free(t->lens);
    free(t->nulls);
    free(t->ints);
    for (size_t i = 0; i < TRES_SUBS; i++)
        if (t->sub[i]) {
            tres_free(t->sub[i]);
            free(t->sub[i]);
        }
    memset(t, 0, sizeof *t);
}

static const char *tcell(const struct tres *t, size_t row, size_t col)
{
    if (row >= t->nrows || col >= t->ncols)
        return "<out of range>";
    return t->cells[row * t->ncols + col];
}

static void tres_cb(const struct chat_db_result *r, void *ud)
{
    struct tres *t = ud;
    t->had_ref = stub_refs > 0;
    if (t->done == 0)
        tres_fill(t, r);
    t->done++;
}

/* Submit and wait (10 s); returns the submit status. */
static int q(struct tres *t, const char *sql, const struct chat_db_param *p, size_t n)
{
    memset(t, 0, sizeof *t);
    int rc = db_query(FAKE, sql, p, n, tres_cb, t);
    if (rc != CHAT_OK)
        return rc;
    CU_ASSERT_EQUAL(t->done, 0); /* never synchronous */
    CU_ASSERT(run_until(&t->done, 1, 10000));
    CU_ASSERT_EQUAL(t->done, 1);
    CU_ASSERT(t->had_ref);
    return rc;
}

/* Run sql, expect success. */
static void exec_ok(const char *sql)
{
    struct tres t;
    CU_ASSERT_EQUAL(q(&t, sql, NULL, 0), CHAT_OK);
    if (t.err != CHAT_OK)
        fprintf(stderr, "%s: %s\n", sql, t.errmsg);
    CU_ASSERT_EQUAL(t.err, CHAT_OK);
    tres_free(&t);
}

static long scalar(const char *sql)
{
    struct tres t;
    long v = -1;
    if (q(&t, sql, NULL, 0) == CHAT_OK && t.err == CHAT_OK && t.nrows == 1)
        v = (long)t.ints[0];
    tres_free(&t);
    return v;
}

/* ---- tests: configuration edge ----------------------------------------- */

static void noop_cb(const struct chat_db_result *r, void *ud)
{
    (void)r;
    ++*(long *)ud;
}

static void test_no_mysql(void)
{
    struct conf c;
    long calls = 0;

    conf_for(&c, &main_srv, main_db, 4, 100);
    c.have_mysql = 0;
    CU_ASSERT_EQUAL(db_start(&loop, &c), CHAT_OK);
    CU_ASSERT_EQUAL(db_query(FAKE, "SELECT 1", NULL, 0, noop_cb, &calls),
                    CHAT_ERR_UNAVAILABLE);
    CU_ASSERT_EQUAL(stub_refs, 0);
    db_stop();
    CU_ASSERT_EQUAL(db_query(FAKE, "SELECT 1", NULL, 0, noop_cb, &calls), CHAT_ERR_CLOSED);
    uv_run(&loop, UV_RUN_NOWAIT);
    CU_ASSERT_EQUAL(calls, 0);
    pool_down();
}

/* ---- tests: migrations ------------------------------------------------ */

static void test_migrate(void)
{
    struct conf c;
    struct tres t;

    conf_for(&c, &main_srv, main_db, 2, 100);
    CU_ASSERT_EQUAL(db_migrate(&c), 0);
    pool_up(&c);
    CU_ASSERT_EQUAL(scalar("SELECT COUNT(*) FROM information_schema.tables"
                           " WHERE table_schema = DATABASE() AND table_name IN"
                           " ('users','friends','chat_groups','group_members',"
                           "'offline_messages','resume_tokens','schema_version')"),
                    7);
    CU_ASSERT_EQUAL(q(&t, "SELECT version, name, applied_at FROM schema_version"
                          " ORDER BY version", NULL, 0),
                    CHAT_OK);
    CU_ASSERT_EQUAL(t.nrows, 3); /* every file of sql/ */
    CU_ASSERT_EQUAL(t.ints[0], 1);
    CU_ASSERT_STRING_EQUAL(tcell(&t, 0, 1), "001_init.sql");
    CU_ASSERT_STRING_EQUAL(tcell(&t, 1, 1), "002_durable.sql");
    CU_ASSERT_STRING_EQUAL(tcell(&t, 2, 1), "003_offline_quota.sql");
    char applied_at[64];
    snprintf(applied_at, sizeof applied_at, "%s", tcell(&t, 0, 2));
    tres_free(&t);
    pool_down();

    /* again: nothing to do, nothing changed */
    CU_ASSERT_EQUAL(db_migrate(&c), 0);
    pool_up(&c);
    CU_ASSERT_EQUAL(q(&t, "SELECT version, name, applied_at FROM schema_version"
                          " ORDER BY version", NULL, 0),
                    CHAT_OK);
    CU_ASSERT_EQUAL(t.nrows, 3);
    CU_ASSERT_STRING_EQUAL(tcell(&t, 0, 2), applied_at);
    tres_free(&t);
    /* the schema takes what the plugins will store */
    exec_ok("INSERT INTO users (name, pwhash) VALUES ('alice', '$y$x')");
    pool_down();
}

static void write_file(const char *dir, const char *name, const char *text)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fputs(text, f);
    fclose(f);
}

struct mig_arg {
    const struct conf *c;
    int rc;
};

static void *mig_thread(void *arg)
{
    struct mig_arg *a = arg;
    a->rc = db_migrate(a->c);
    return NULL;
}

static void test_migrate_files(void)
{
    char dir[PATH_MAX], db2[80];
    struct conf c;
    struct tres t;
    pthread_t th[2];
    struct mig_arg args[2];

    snprintf(dir, sizeof dir, "%s/sql-extra", tmp_root);
    CU_ASSERT_EQUAL_FATAL(mkdir(dir, 0700), 0);
    write_file(dir, "001_a.sql",
               "-- first\nCREATE TABLE a (id INT PRIMARY KEY);\n"
               "INSERT INTO a VALUES (1), (2);\n");
    write_file(dir, "002_b.sql",
               "/* results in the middle are drained */\n"
               "CREATE TABLE b (x VARCHAR(10));\nSELECT * FROM a;\n"
               "INSERT INTO b VALUES ('x');\n");
    write_file(dir, "010_c.sql", "ALTER TABLE a ADD COLUMN c INT NOT NULL DEFAULT 7;\n");
    write_file(dir, "README.txt", "not a migration\n");
    write_file(dir, "abc.sql", "SELEC garbage that must not run;\n");

    /* a database that does not exist yet: db_migrate creates it; two
     * nodes migrating at once serialise on GET_LOCK */
    snprintf(db2, sizeof db2, "%s_mig", main_db);
    conf_for(&c, &main_srv, db2, 1, 100);
    c.sql_dir = dir;
    for (int i = 0; i < 2; i++) {
        args[i].c = &c;
        args[i].rc = -2;
        pthread_create(&th[i], NULL, mig_thread, &args[i]);
    }
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    CU_ASSERT_EQUAL(args[0].rc, 0);
    CU_ASSERT_EQUAL(args[1].rc, 0);

    pool_up(&c);
    CU_ASSERT_EQUAL(q(&t, "SELECT version FROM schema_version ORDER BY version", NULL, 0),
                    CHAT_OK);
    CU_ASSERT_EQUAL(t.nrows, 3);
    if (t.nrows == 3) {
        CU_ASSERT_EQUAL(t.ints[0], 1);
        CU_ASSERT_EQUAL(t.ints[1], 2);
        CU_ASSERT_EQUAL(t.ints[2], 10);
    }
    tres_free(&t);
    CU_ASSERT_EQUAL(scalar("SELECT SUM(c) FROM a"), 14);
    CU_ASSERT_EQUAL(scalar("SELECT COUNT(*) FROM b"), 1);
    pool_down();

    /* a failing file stops the run and is not recorded */
    write_file(dir, "011_bad.sql", "CREATE TABLE d (id INT);\nSELEC oops;\n");
    write_file(dir, "012_after.sql", "CREATE TABLE e (id INT);\n");
    CU_ASSERT_EQUAL(db_migrate(&c), -1);
    pool_up(&c);
    CU_ASSERT_EQUAL(scalar("SELECT MAX(version) FROM schema_version"), 10);
    CU_ASSERT_EQUAL(scalar("SELECT COUNT(*) FROM information_schema.tables"
                           " WHERE table_schema = DATABASE() AND table_name = 'e'"),
                    0);
    char drop[160];
    snprintf(drop, sizeof drop, "DROP DATABASE `%s`", db2);
    exec_ok(drop);
    pool_down();
}

/* ---- tests: values ---------------------------------------------------- */

static void test_params_roundtrip(void)
{
    static const char nul[] = "nul\0mid\0";
    static const char emoji[] = "\xF0\x9F\x98\x80 smile \xF0\x9F\x92\xA9";
    static const char bad_utf8[] = "\xff\xfe\x00\x80 not utf-8";
    struct {
        const char *s;
        size_t len;
        int text; /* also valid for the utf8mb4 VARCHAR column */
    } v[8];
    size_t nv = 0, big_len = 1024 * 1024;
    char *big = malloc(big_len);
    struct conf c;
    struct tres t;

    CU_ASSERT_PTR_NOT_NULL_FATAL(big);
    uint32_t x = 12345;
    for (size_t i = 0; i < big_len; i++) {
        x = x * 1103515245u + 12345u;
        big[i] = (char)(x >> 16);
    }
    big[0] = '\0';
    big[1] = '\'';
    big[2] = '\\';
#define V(str, n, tx) (v[nv].s = (str), v[nv].len = (n), v[nv].text = (tx), nv++)
    V("it's a \"quote\"; --", strlen("it's a \"quote\"; --"), 1);
    V("back\\slash\\", strlen("back\\slash\\"), 1);
    V(nul, sizeof nul - 1, 1);
    V(emoji, sizeof emoji - 1, 1);
    V("", 0, 1);
    V(bad_utf8, sizeof bad_utf8 - 1, 0);
    V(big, big_len, 0);
#undef V

    conf_for(&c, &main_srv, main_db, 2, 100);
    pool_up(&c);
    exec_ok("CREATE TABLE scratch (id BIGINT AUTO_INCREMENT PRIMARY KEY, b LONGBLOB NULL,"
            " t VARCHAR(255) CHARACTER SET utf8mb4 NULL, n BIGINT NULL)");
    for (size_t i = 0; i < nv; i++) {
        struct chat_db_param p[2] = {CHAT_DB_P_STR(v[i].s, v[i].len),
                                     v[i].text ? CHAT_DB_P_STR(v[i].s, v[i].len)
                                               : CHAT_DB_P_NULL};
        CU_ASSERT_EQUAL(q(&t, "INSERT INTO scratch (b, t) VALUES (?, ?)", p, 2), CHAT_OK);
        CU_ASSERT_EQUAL(t.err, CHAT_OK);
        if (t.err)
            fprintf(stderr, "value %zu: %s\n", i, t.errmsg);
        CU_ASSERT_EQUAL(t.affected, 1);
        int64_t id = (int64_t)t.insert_id;
        CU_ASSERT(id > 0);
        tres_free(&t);

        struct chat_db_param k = CHAT_DB_P_INT(id);
        CU_ASSERT_EQUAL(q(&t, "SELECT b, LENGTH(b), t FROM scratch WHERE id = ?", &k, 1),
                        CHAT_OK);
        CU_ASSERT_EQUAL_FATAL(t.nrows, 1);
        CU_ASSERT_EQUAL(t.lens[0], v[i].len);
        CU_ASSERT(t.lens[0] == v[i].len && memcmp(t.cells[0], v[i].s, v[i].len) == 0);
        CU_ASSERT_EQUAL(t.ints[1], (int64_t)v[i].len);
        if (v[i].text) {
            CU_ASSERT(t.lens[2] == v[i].len && memcmp(t.cells[2], v[i].s, v[i].len) == 0);
        } else {
            CU_ASSERT(t.nulls[2]);
            CU_ASSERT_EQUAL(t.lens[2], 0);
            CU_ASSERT_STRING_EQUAL(t.cells[2], "");
        }
        tres_free(&t);

        /* and as a search key */
        struct chat_db_param s = CHAT_DB_P_STR(v[i].s, v[i].len);
        CU_ASSERT_EQUAL(q(&t, "SELECT id FROM scratch WHERE b = ?", &s, 1), CHAT_OK);
        CU_ASSERT_EQUAL(t.nrows, 1);
        CU_ASSERT(t.nrows == 1 && t.ints[0] == id);
        tres_free(&t);
    }

    /* integers at the edges, and NULL */
    const int64_t ints[] = {INT64_MAX, INT64_MIN, -1, 0};
    for (size_t i = 0; i < 4; i++) {
        struct chat_db_param p = CHAT_DB_P_INT(ints[i]);
        CU_ASSERT_EQUAL(q(&t, "INSERT INTO scratch (n) VALUES (?)", &p, 1), CHAT_OK);
        struct chat_db_param k = CHAT_DB_P_INT(t.insert_id);
        tres_free(&t);
        CU_ASSERT_EQUAL(q(&t, "SELECT n, b FROM scratch WHERE id = ?", &k, 1), CHAT_OK);
        CU_ASSERT_EQUAL_FATAL(t.nrows, 1);
        CU_ASSERT_EQUAL(t.ints[0], ints[i]);
        char want[32];
        snprintf(want, sizeof want, "%lld", (long long)ints[i]);
        CU_ASSERT_STRING_EQUAL(t.cells[0], want);
        CU_ASSERT(t.nulls[1]);
        CU_ASSERT(!t.nulls[0]);
        tres_free(&t);
    }
    struct chat_db_param pn[2] = {CHAT_DB_P_NULL, CHAT_DB_P_NULL};
    CU_ASSERT_EQUAL(q(&t, "SELECT ? IS NULL, ?", pn, 2), CHAT_OK);
    CU_ASSERT_EQUAL(t.ints[0], 1);
    CU_ASSERT(t.nulls[1]);
    tres_free(&t);
    exec_ok("DROP TABLE scratch");
    pool_down();
    free(big);
}

static void test_types(void)
{
    struct conf c;
    struct tres t;

    conf_for(&c, &main_srv, main_db, 1, 100);
    pool_up(&c);
    CU_ASSERT_EQUAL(q(&t,
                      "SELECT NULL, 1.5e0, CAST('2024-01-02 03:04:05.678' AS DATETIME(3)),"
                      " CAST('12345678901234567890123456789012345.123456789012345678901234567890'"
                      " AS DECIMAL(65,30)), -42, REPEAT('\xC3\xA9', 1000), 0x00FF, ''",
                      NULL, 0),
                    CHAT_OK);
    CU_ASSERT_EQUAL(t.err, CHAT_OK);
    CU_ASSERT_EQUAL_FATAL(t.nrows, 1);
    CU_ASSERT_EQUAL(t.ncols, 8);
    CU_ASSERT(t.nulls[0]);
    CU_ASSERT_STRING_EQUAL(t.cells[0], "");
    CU_ASSERT_EQUAL(strtod(t.cells[1], NULL), 1.5);
    CU_ASSERT_STRING_EQUAL(t.cells[2], "2024-01-02 03:04:05.678");
    CU_ASSERT_STRING_EQUAL(t.cells[3],
                           "12345678901234567890123456789012345.123456789012345678901234567890");
    CU_ASSERT_EQUAL(t.ints[4], -42);
    CU_ASSERT_EQUAL(t.lens[5], 2000);
    CU_ASSERT(t.lens[6] == 2 && memcmp(t.cells[6], "\x00\xff", 2) == 0);
    CU_ASSERT(!t.nulls[7]);
    CU_ASSERT_EQUAL(t.lens[7], 0);
    tres_free(&t);

    /* many rows */
    CU_ASSERT_EQUAL(q(&t, "SELECT seq, CONCAT('row', seq) FROM seq_1_to_5000", NULL, 0),
                    CHAT_OK);
    CU_ASSERT_EQUAL(t.nrows, 5000);
    int ok = t.nrows == 5000;
    for (size_t i = 0; ok && i < t.nrows; i++) {
        char want[32];
        snprintf(want, sizeof want, "row%zu", i + 1);
        ok = t.ints[i * 2] == (int64_t)(i + 1) && strcmp(tcell(&t, i, 1), want) == 0;
    }
    CU_ASSERT(ok);
    tres_free(&t);
    pool_down();
}

static void test_errors(void)
{
    struct conf c;
    struct tres t;
    long calls = 0;

    conf_for(&c, &main_srv, main_db, 1, 100); /* one connection: in order */
    pool_up(&c);
    exec_ok("CREATE TABLE uniq (id INT PRIMARY KEY)");
    struct chat_db_param one = CHAT_DB_P_INT(1);
    CU_ASSERT_EQUAL(q(&t, "INSERT INTO uniq VALUES (?)", &one, 1), CHAT_OK);
    CU_ASSERT_EQUAL(t.err, CHAT_OK);
    tres_free(&t);
    for (int i = 0; i < 3; i++) { /* the cached statement stays usable */
        CU_ASSERT_EQUAL(q(&t, "INSERT INTO uniq VALUES (?)", &one, 1), CHAT_OK);
        CU_ASSERT_EQUAL(t.err, CHAT_ERR_DB);
        CU_ASSERT_EQUAL(t.my_errno, 1062);
        CU_ASSERT_PTR_NOT_NULL(strstr(t.errmsg, "Duplicate"));
        tres_free(&t);
    }
    CU_ASSERT_EQUAL(q(&t, "SELEC 1", NULL, 0), CHAT_OK);
    CU_ASSERT_EQUAL(t.err, CHAT_ERR_DB);
    CU_ASSERT_EQUAL(t.my_errno, 1064);
    tres_free(&t);
    CU_ASSERT_EQUAL(q(&t, "SELECT ?, ?", &one, 1), CHAT_OK);
    CU_ASSERT_EQUAL(t.err, CHAT_ERR_INVAL);
    tres_free(&t);
    /* refused synchronously: no callback, no reference */
    struct chat_db_param bad = {7, 0, NULL, 0};
    CU_ASSERT_EQUAL(db_query(FAKE, "SELECT ?", &bad, 1, noop_cb, &calls), CHAT_ERR_INVAL);
    CU_ASSERT_EQUAL(db_query(FAKE, NULL, NULL, 0, noop_cb, &calls), CHAT_ERR_INVAL);
    CU_ASSERT_EQUAL(db_query(FAKE, "SELECT ?", NULL, 1, noop_cb, &calls), CHAT_ERR_INVAL);
    CU_ASSERT_EQUAL(db_txn(FAKE, NULL, 0, noop_cb, &calls), CHAT_ERR_INVAL);
    CU_ASSERT_EQUAL(stub_refs, 0);
    /* a NULL callback is allowed (fire and forget); the ref still balances */
    CU_ASSERT_EQUAL(db_query(FAKE, "DELETE FROM uniq", NULL, 0, NULL, NULL), CHAT_OK);
    CU_ASSERT_EQUAL(scalar("SELECT COUNT(*) FROM uniq"), 0);
    exec_ok("DROP TABLE uniq");
    pool_down();
    CU_ASSERT_EQUAL(calls, 0);
}

/* ---- tests: transactions ---------------------------------------------- */

static void txn_wait(struct tres *t, const struct chat_db_stmt *s, size_t n)
{
    memset(t, 0, sizeof *t);
    CU_ASSERT_EQUAL_FATAL(db_txn(FAKE, s, n, tres_cb, t), CHAT_OK);
    CU_ASSERT(run_until(&t->done, 1, 10000));
    CU_ASSERT_EQUAL(t->done, 1);
}

static void test_txn(void)
{
    struct conf c;
    struct tres t;
    const char *ins = "INSERT INTO t_txn (id, v) VALUES (?, ?)";
    struct chat_db_param p1[2] = {CHAT_DB_P_INT(1), CHAT_DB_P_STR("a", 1)};
    struct chat_db_param p2[2] = {CHAT_DB_P_INT(2), CHAT_DB_P_STR("b", 1)};
    struct chat_db_param pd[2] = {CHAT_DB_P_INT(1), CHAT_DB_P_STR("dup", 3)};
    struct chat_db_param p3[2] = {CHAT_DB_P_INT(3), CHAT_DB_P_STR("c", 1)};

    conf_for(&c, &main_srv, main_db, 3, 100);
    pool_up(&c);
    exec_ok("CREATE TABLE t_txn (id INT PRIMARY KEY, v VARCHAR(20))");

    /* fails at the third statement: nothing stays */
    struct chat_db_stmt bad[4] = {{ins, p1, 2}, {ins, p2, 2}, {ins, pd, 2}, {ins, p3, 2}};
    txn_wait(&t, bad, 4);
    CU_ASSERT_EQUAL(t.err, CHAT_ERR_DB);
    CU_ASSERT_EQUAL(t.my_errno, 1062);
    CU_ASSERT_PTR_NOT_NULL(strstr(t.errmsg, "Duplicate"));
    CU_ASSERT(!t.sub_null[0] && !t.sub_null[1] && !t.sub_null[2]);
    CU_ASSERT(t.sub_null[3]);
    if (t.sub[0] && t.sub[2]) {
        CU_ASSERT_EQUAL(t.sub[0]->err, CHAT_OK);
        CU_ASSERT_EQUAL(t.sub[0]->affected, 1);
        CU_ASSERT_EQUAL(t.sub[2]->err, CHAT_ERR_DB);
        CU_ASSERT_EQUAL(t.sub[2]->my_errno, 1062);
    }
    tres_free(&t);
    CU_ASSERT_EQUAL(scalar("SELECT COUNT(*) FROM t_txn"), 0);

    /* a syntax error in the middle */
    struct chat_db_stmt bad2[3] = {{ins, p1, 2}, {"UPDAT t_txn SET v = 'x'", NULL, 0},
                                   {ins, p2, 2}};
    txn_wait(&t, bad2, 3);
    CU_ASSERT_EQUAL(t.err, CHAT_ERR_DB);
    CU_ASSERT_EQUAL(t.my_errno, 1064);
    tres_free(&t);
    CU_ASSERT_EQUAL(scalar("SELECT COUNT(*) FROM t_txn"), 0);

    /* success: every statement's own result */
    struct chat_db_param k1 = CHAT_DB_P_INT(1);
    struct chat_db_stmt good[4] = {{ins, p1, 2},
                                   {ins, p2, 2},
                                   {"UPDATE t_txn SET v = 'z' WHERE id = ?", &k1, 1},
                                   {"SELECT v FROM t_txn ORDER BY id", NULL, 0}};
    txn_wait(&t, good, 4);
    CU_ASSERT_EQUAL(t.err, CHAT_OK);
    CU_ASSERT_EQUAL(t.affected, 3); /* rows changed; the SELECT's are not */
    CU_ASSERT(t.sub[3] && t.sub[3]->affected == 2); /* rows read */
    CU_ASSERT(t.sub[3] && t.sub[3]->nrows == 2);
    if (t.sub[3] && t.sub[3]->nrows == 2) {
        CU_ASSERT_STRING_EQUAL(tcell(t.sub[3], 0, 0), "z");
        CU_ASSERT_STRING_EQUAL(tcell(t.sub[3], 1, 0), "b");
    }
    CU_ASSERT(t.sub_null[4]);
    tres_free(&t);
    CU_ASSERT_EQUAL(scalar("SELECT COUNT(*) FROM t_txn"), 2);

    /* insert ids per statement */
    exec_ok("CREATE TABLE t_auto (id BIGINT AUTO_INCREMENT PRIMARY KEY, v INT)");
    struct chat_db_stmt autos[2] = {{"INSERT INTO t_auto (v) VALUES (1)", NULL, 0},
                                    {"INSERT INTO t_auto (v) VALUES (2)", NULL, 0}};
    txn_wait(&t, autos, 2);
    CU_ASSERT_EQUAL(t.err, CHAT_OK);
    CU_ASSERT(t.sub[0] && t.sub[1] && t.sub[0]->insert_id > 0 &&
              t.sub[1]->insert_id == t.sub[0]->insert_id + 1);
    CU_ASSERT(t.sub[1] && t.insert_id == t.sub[1]->insert_id);
    tres_free(&t);
    /* db_sub of a plain query */
    CU_ASSERT_EQUAL(q(&t, "SELECT 1", NULL, 0), CHAT_OK);
    CU_ASSERT(t.sub_null[0]);
    tres_free(&t);
    exec_ok("DROP TABLE t_txn");
    exec_ok("DROP TABLE t_auto");
    pool_down();
}

/* ---- tests: the pool under load --------------------------------------- */

#define NCONC 2000
static long conc_calls[NCONC];
static long conc_total, conc_bad;

static void conc_cb(const struct chat_db_result *r, void *ud)
{
    size_t i = (size_t)(uintptr_t)ud;
    char want[32];
    size_t len;
    const char *s = db_str(r, 0, 1, &len);

    snprintf(want, sizeof want, "v%zu", i);
    if (db_error(r) != CHAT_OK || db_nrows(r) != 1 || db_int(r, 0, 0) != (int64_t)i ||
        !s || strcmp(s, want) != 0 || stub_refs <= 0)
        conc_bad++;
    conc_calls[i]++;
    conc_total++;
}

static void test_concurrency(void)
{
    struct conf c;
    struct db_stats st;
    char buf[32];

    conf_for(&c, &main_srv, main_db, 4, 10000);
    pool_up(&c);
    exec_ok("SELECT 1"); /* connected */
    memset(conc_calls, 0, sizeof conc_calls);
    conc_total = conc_bad = 0;
    uint64_t t0 = uv_hrtime();
    for (size_t i = 0; i < NCONC; i++) {
        int n = snprintf(buf, sizeof buf, "v%zu", i);
        struct chat_db_param p[2] = {CHAT_DB_P_INT(i), CHAT_DB_P_STR(buf, (size_t)n)};
        CU_ASSERT_EQUAL(db_query(FAKE, "SELECT ?, ?", p, 2, conc_cb, (void *)(uintptr_t)i),
                        CHAT_OK);
    }
    CU_ASSERT(stub_refs >= NCONC);
    CU_ASSERT(run_until(&conc_total, NCONC, 60000));
    double secs = (double)(uv_hrtime() - t0) / 1e9;
    CU_ASSERT_EQUAL(conc_total, NCONC);
    CU_ASSERT_EQUAL(conc_bad, 0);
    int once = 1;
    for (size_t i = 0; i < NCONC; i++)
        once &= conc_calls[i] == 1;
    CU_ASSERT(once);
    CU_ASSERT_EQUAL(stub_refs, 0);
    db_get_stats(&st);
    CU_ASSERT_EQUAL(st.queued, 0);
    CU_ASSERT_EQUAL(st.in_flight, 0);
    CU_ASSERT(st.done >= NCONC);
    printf("\n  pool: %d parameterised SELECTs on 4 connections: %.2f s, %.0f/s"
           " (mean latency %.1f ms incl. queueing, max %.1f ms)\n",
           NCONC, secs, NCONC / secs, (double)st.latency_us_total / (double)st.done / 1000.0,
           (double)st.latency_us_max / 1000.0);

    /* round trips per second with a window of 64 in flight */
    static long rt_done;
    rt_done = 0;
    const long total = 5000;
    long sent = 0;
    t0 = uv_hrtime();
    while (rt_done < total) {
        while (sent < total && sent - rt_done < 64) {
            CU_ASSERT_EQUAL_FATAL(db_query(FAKE, "SELECT 1", NULL, 0, noop_cb, &rt_done),
                                  CHAT_OK);
            sent++;
        }
        if (!run_until(&rt_done, rt_done + 1, 10000))
            break;
    }
    secs = (double)(uv_hrtime() - t0) / 1e9;
    CU_ASSERT_EQUAL(rt_done, total);
    printf("  pool: SELECT 1 round trips, 4 connections, 64 in flight: %.0f/s\n",
           (double)total / secs);
    pool_down();
}

/* more distinct statements than a connection caches */
static long cache_calls, cache_bad;
static void cache_cb(const struct chat_db_result *r, void *ud)
{
    if (db_error(r) != CHAT_OK || db_int(r, 0, 0) != (int64_t)(uintptr_t)ud)
        cache_bad++;
    cache_calls++;
}

static void test_stmt_cache(void)
{
    struct conf c;
    char sql[64];
    long n = 0;

    conf_for(&c, &main_srv, main_db, 2, 10000);
    pool_up(&c);
    cache_calls = cache_bad = 0;
    for (int round = 0; round < 3; round++) {
        for (int k = 0; k < 80; k++) {
            snprintf(sql, sizeof sql, "SELECT ? + %d", k);
            struct chat_db_param p = CHAT_DB_P_INT(round);
            CU_ASSERT_EQUAL(db_query(FAKE, sql, &p, 1, cache_cb,
                                     (void *)(uintptr_t)(round + k)),
                            CHAT_OK);
            n++;
        }
    }
    CU_ASSERT(run_until(&cache_calls, n, 30000));
    CU_ASSERT_EQUAL(cache_calls, n);
    CU_ASSERT_EQUAL(cache_bad, 0);
    pool_down();
}

static long busy_calls, busy_wrong_calls;
static void busy_cb(const struct chat_db_result *r, void *ud)
{
    (void)r;
    (void)ud;
    busy_calls++;
}
static void busy_wrong_cb(const struct chat_db_result *r, void *ud)
{
    (void)r;
    (void)ud;
    busy_wrong_calls++;
}

static void test_queue_bound(void)
{
    struct conf c;
    struct db_stats st;
    uint64_t end;

    conf_for(&c, &main_srv, main_db, 1, 5);
    pool_up(&c);
    busy_calls = busy_wrong_calls = 0;
    CU_ASSERT_EQUAL(db_query(FAKE, "SELECT SLEEP(1)", NULL, 0, busy_cb, NULL), CHAT_OK);
    /* wait until the one worker holds it */
    end = now_ms() + 10000;
    do {
        long never = 0;
        run_until(&never, 1, 5);
        db_get_stats(&st);
    } while (!(st.queued == 0 && st.in_flight == 1) && now_ms() < end);
    CU_ASSERT_EQUAL(st.in_flight, 1);
    for (int i = 0; i < 5; i++)
        CU_ASSERT_EQUAL(db_query(FAKE, "SELECT 1", NULL, 0, busy_cb, NULL), CHAT_OK);
    CU_ASSERT_EQUAL(db_query(FAKE, "SELECT 1", NULL, 0, busy_wrong_cb, NULL), CHAT_ERR_BUSY);
    struct chat_db_stmt s = {"SELECT 1", NULL, 0};
    CU_ASSERT_EQUAL(db_txn(FAKE, &s, 1, busy_wrong_cb, NULL), CHAT_ERR_BUSY);
    CU_ASSERT_EQUAL(stub_refs, 6);
    CU_ASSERT(run_until(&busy_calls, 6, 10000));
    CU_ASSERT_EQUAL(busy_calls, 6);
    /* room again */
    CU_ASSERT_EQUAL(db_query(FAKE, "SELECT 1", NULL, 0, busy_cb, NULL), CHAT_OK);
    pool_down(); /* runs the last callback */
    CU_ASSERT_EQUAL(busy_calls, 7);
    CU_ASSERT_EQUAL(busy_wrong_calls, 0);
}

static long stop_calls, stop_ok, stop_closed, stop_requery_closed;
static void stop_cb(const struct chat_db_result *r, void *ud)
{
    long calls = 0;
    (void)ud;
    stop_calls++;
    if (db_error(r) == CHAT_OK)
        stop_ok++;
    else if (db_error(r) == CHAT_ERR_CLOSED)
        stop_closed++;
    if (db_query(FAKE, "SELECT 1", NULL, 0, noop_cb, &calls) == CHAT_ERR_CLOSED)
        stop_requery_closed++;
}

static void test_stop_outstanding(void)
{
    struct conf c;
    long calls = 0;

    conf_for(&c, &main_srv, main_db, 2, 100);
    pool_up(&c);
    exec_ok("SELECT 1");
    stop_calls = stop_ok = stop_closed = stop_requery_closed = 0;
    for (int i = 0; i < 40; i++)
        CU_ASSERT_EQUAL(db_query(FAKE, "SELECT SLEEP(0.05)", NULL, 0, stop_cb, NULL),
                        CHAT_OK);
    CU_ASSERT_EQUAL(stub_refs, 40);
    db_stop(); /* every callback before it returns */
    CU_ASSERT_EQUAL(stop_calls, 40);
    CU_ASSERT_EQUAL(stop_ok + stop_closed, 40);
    CU_ASSERT(stop_closed > 0);
    CU_ASSERT_EQUAL(stop_requery_closed, 40);
    CU_ASSERT_EQUAL(db_query(FAKE, "SELECT 1", NULL, 0, noop_cb, &calls), CHAT_ERR_CLOSED);
    pool_down();
    CU_ASSERT_EQUAL(calls, 0);
    /* the pool starts again after a stop */
    pool_up(&c);
    CU_ASSERT_EQUAL(scalar("SELECT 41"), 41);
    pool_down();
}

static long ref_calls_seen;
static void ref_cb(const struct chat_db_result *r, void *ud)
{
    (void)r;
    if (stub_refs > 0)
        ref_calls_seen++;
    ++*(long *)ud;
}

static void test_refcount(void)
{
    struct conf c;
    long done = 0;

    conf_for(&c, &main_srv, main_db, 2, 1000);
    pool_up(&c);
    long base_ref = stub_ref_calls;
    ref_calls_seen = 0;
    for (int i = 0; i < 100; i++)
        CU_ASSERT_EQUAL(db_query(FAKE, "SELECT 1", NULL, 0, ref_cb, &done), CHAT_OK);
    /* core-internal calls (self NULL) take no reference */
    for (int i = 0; i < 10; i++)
        CU_ASSERT_EQUAL(db_query(NULL, "SELECT 1", NULL, 0, noop_cb, &done), CHAT_OK);
    CU_ASSERT_EQUAL(stub_refs, 100);
    CU_ASSERT_EQUAL(stub_ref_calls - base_ref, 100);
    CU_ASSERT(run_until(&done, 110, 10000));
    CU_ASSERT_EQUAL(ref_calls_seen, 100);
    CU_ASSERT_EQUAL(stub_refs, 0);
    pool_down();
}

static void test_socket(void)
{
    struct conf c;
    char sock[PATH_MAX + 16];

    snprintf(sock, sizeof sock, "%s/mysqld.sock", main_srv.dir);
    conf_for(&c, &main_srv, main_db, 1, 100);
    c.my_port = 1; /* must not be used */
    c.my_socket = sock;
    pool_up(&c);
    CU_ASSERT_EQUAL(scalar("SELECT 7"), 7);
    struct tres t;
    CU_ASSERT_EQUAL(q(&t, "SELECT @@character_set_client, @@character_set_results,"
                          " @@character_set_connection",
                      NULL, 0),
                    CHAT_OK);
    CU_ASSERT_STRING_EQUAL(tcell(&t, 0, 0), "utf8mb4");
    CU_ASSERT_STRING_EQUAL(tcell(&t, 0, 1), "utf8mb4");
    CU_ASSERT_STRING_EQUAL(tcell(&t, 0, 2), "utf8mb4");
    tres_free(&t);
    pool_down();
}

/* ---- tests: connections killed under the pool --------------------------- */

#define NDOWN 300
static long down_calls[NDOWN], down_total, down_ok;
static void down_cb(const struct chat_db_result *r, void *ud)
{
    down_calls[(uintptr_t)ud]++;
    down_total++;
    if (db_error(r) == CHAT_OK)
        down_ok++;
}

static MYSQL *admin_connect(void)
{
    MYSQL *m = mysql_init(NULL);
    if (m && !mysql_real_connect(m, "127.0.0.1", "chat", "chat", main_db,
                                 (unsigned)main_srv.port, NULL, 0)) {
        fprintf(stderr, "admin connect: %s\n", mysql_error(m));
        mysql_close(m);
        return NULL;
    }
    return m;
}

/* Ids of the other connections matching cond; returns how many (max n). */
static int find_conns(MYSQL *m, const char *cond, unsigned long *ids, int n)
{
    char sql[512];
    int k = 0;

    snprintf(sql, sizeof sql,
             "SELECT ID FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()"
             " AND USER = 'chat' AND DB = '%s' AND %s",
             main_db, cond);
    if (mysql_query(m, sql) != 0)
        return -1;
    MYSQL_RES *res = mysql_store_result(m);
    MYSQL_ROW row;
    while (res && (row = mysql_fetch_row(res)) != NULL && k < n)
        ids[k++] = strtoul(row[0], NULL, 10);
    if (res)
        mysql_free_result(res);
    return k;
}

/* Poll until a connection runs a statement matching `like`, then kill that
 * connection; wait until it is gone. */
static int kill_running(MYSQL *m, const char *like)
{
    char cond[256], sql[64];
    unsigned long id;
    uint64_t end = now_ms() + 5000;
    struct timespec ts = {0, 20 * 1000000};

    snprintf(cond, sizeof cond, "INFO LIKE '%s'", like);
    while (find_conns(m, cond, &id, 1) != 1) {
        if (now_ms() > end)
            return -1;
        nanosleep(&ts, NULL);
    }
    snprintf(sql, sizeof sql, "KILL CONNECTION %lu", id);
    if (mysql_query(m, sql) != 0)
        return -1;
    snprintf(cond, sizeof cond, "ID = %lu", id);
    while (find_conns(m, cond, &id, 1) != 0 && now_ms() < end)
        nanosleep(&ts, NULL);
    return 0;
}

static void test_killed(void)
{
    struct conf c;
    struct tres t;
    MYSQL *m = admin_connect();

    CU_ASSERT_PTR_NOT_NULL_FATAL(m);
    conf_for(&c, &main_srv, main_db, 2, 100);
    pool_up(&c);
    exec_ok("CREATE TABLE k (id INT AUTO_INCREMENT PRIMARY KEY, v INT)");

    /* a SELECT whose connection dies is run again on a new one */
    memset(&t, 0, sizeof t);
    CU_ASSERT_EQUAL(db_query(FAKE, "SELECT SLEEP(1), 'sel'", NULL, 0, tres_cb, &t), CHAT_OK);
    CU_ASSERT_EQUAL(kill_running(m, "SELECT SLEEP(1), _sel_%"), 0);
    CU_ASSERT(run_until(&t.done, 1, 10000));
    CU_ASSERT_EQUAL(t.done, 1);
    CU_ASSERT_EQUAL(t.err, CHAT_OK);
    CU_ASSERT_STRING_EQUAL(tcell(&t, 0, 1), "sel");
    tres_free(&t);

    /* an INSERT is not: it may have been applied */
    memset(&t, 0, sizeof t);
    CU_ASSERT_EQUAL(db_query(FAKE, "INSERT INTO k (v) SELECT SLEEP(1)", NULL, 0, tres_cb, &t),
                    CHAT_OK);
    CU_ASSERT_EQUAL(kill_running(m, "INSERT INTO k (v) SELECT SLEEP(1)%"), 0);
    CU_ASSERT(run_until(&t.done, 1, 10000));
    CU_ASSERT_EQUAL(t.done, 1);
    CU_ASSERT_EQUAL(t.err, CHAT_ERR_UNAVAILABLE);
    printf("\n  killed INSERT: %d %d %s\n", t.err, t.my_errno, t.errmsg);
    tres_free(&t);
    CU_ASSERT_EQUAL(scalar("SELECT COUNT(*) FROM k"), 0);

    /* a transaction cut before COMMIT is rolled back by the server: retried */
    struct chat_db_stmt txn[2] = {{"INSERT INTO k (v) VALUES (5)", NULL, 0},
                                  {"SELECT SLEEP(1), 'txn'", NULL, 0}};
    memset(&t, 0, sizeof t);
    CU_ASSERT_EQUAL(db_txn(FAKE, txn, 2, tres_cb, &t), CHAT_OK);
    CU_ASSERT_EQUAL(kill_running(m, "SELECT SLEEP(1), _txn_%"), 0);
    CU_ASSERT(run_until(&t.done, 1, 10000));
    CU_ASSERT_EQUAL(t.err, CHAT_OK);
    tres_free(&t);
    CU_ASSERT_EQUAL(scalar("SELECT COUNT(*) FROM k WHERE v = 5"), 1);

    /* idle connections killed: noticed before use, so even writes succeed */
    unsigned long ids[8];
    int n = find_conns(m, "COMMAND = 'Sleep'", ids, 8);
    CU_ASSERT_EQUAL(n, 2);
    for (int i = 0; i < n; i++) {
        char sql[64];
        snprintf(sql, sizeof sql, "KILL CONNECTION %lu", ids[i]);
        CU_ASSERT_EQUAL(mysql_query(m, sql), 0);
    }
    uint64_t end = now_ms() + 5000;
    struct timespec ts = {0, 20 * 1000000};
    while (find_conns(m, "1", ids, 8) != 0 && now_ms() < end)
        nanosleep(&ts, NULL);
    for (int i = 0; i < 4; i++) {
        CU_ASSERT_EQUAL(q(&t, "INSERT INTO k (v) VALUES (6)", NULL, 0), CHAT_OK);
        CU_ASSERT_EQUAL(t.err, CHAT_OK);
        tres_free(&t);
    }
    CU_ASSERT_EQUAL(scalar("SELECT COUNT(*) FROM k WHERE v = 6"), 4);
    exec_ok("DROP TABLE k");
    pool_down();
    mysql_close(m);
}

static void test_unreachable(void)
{
    struct conf c;
    struct server none;
    uint64_t t0 = now_ms();

    memset(&none, 0, sizeof none);
    none.port = free_port(); /* nothing listens there */
    conf_for(&c, &none, "x", 4, 1000);
    pool_up(&c);
    memset(down_calls, 0, sizeof down_calls);
    down_total = down_ok = 0;
    for (uintptr_t i = 0; i < 100; i++)
        CU_ASSERT_EQUAL(db_query(FAKE, "SELECT 1", NULL, 0, down_cb, (void *)i), CHAT_OK);
    CU_ASSERT(run_until(&down_total, 100, 10000));
    CU_ASSERT_EQUAL(down_total, 100);
    CU_ASSERT_EQUAL(down_ok, 0);
    CU_ASSERT(now_ms() - t0 < 5000);
    pool_down();
}

/* ---- tests: the server goes away and comes back ----------------------- */


static void burst(const char *what, int expect_ok)
{
    struct chat_db_param p = CHAT_DB_P_INT(1);
    uint64_t t0 = now_ms();

    memset(down_calls, 0, sizeof down_calls);
    down_total = down_ok = 0;
    for (uintptr_t i = 0; i < NDOWN; i++) {
        const char *sql = i % 2 ? "INSERT INTO r (v) VALUES (?)" : "SELECT ?";
        CU_ASSERT_EQUAL(db_query(FAKE, sql, &p, 1, down_cb, (void *)i), CHAT_OK);
    }
    CU_ASSERT_EQUAL(down_total, 0);
    CU_ASSERT(run_until(&down_total, NDOWN, 15000));
    int once = 1;
    for (int i = 0; i < NDOWN; i++)
        once &= down_calls[i] == 1;
    CU_ASSERT(once);
    CU_ASSERT_EQUAL(down_total, NDOWN);
    CU_ASSERT_EQUAL(down_ok, expect_ok ? NDOWN : 0);
    printf("  restart: %s: %d queries answered in %llu ms, %ld ok\n", what, NDOWN,
           (unsigned long long)(now_ms() - t0), down_ok);
}

static void test_restart(void)
{
    struct conf c;
    struct tres t, sleeper;

    if (server_start(&priv_srv, "private") != 0) {
        CU_FAIL("cannot start the private MariaDB");
        return;
    }
    CU_ASSERT_EQUAL_FATAL(sh("'%s' createdb '%s' t", script, priv_srv.dir), 0);
    conf_for(&c, &priv_srv, "t", 4, 10000);
    pool_up(&c);
    exec_ok("CREATE TABLE r (id INT AUTO_INCREMENT PRIMARY KEY, v INT)");
    burst("server up", 1);

    /* a query running when the server stops */
    memset(&sleeper, 0, sizeof sleeper);
    CU_ASSERT_EQUAL(db_query(FAKE, "SELECT SLEEP(20)", NULL, 0, tres_cb, &sleeper), CHAT_OK);
    long never = 0;
    run_until(&never, 1, 200);
    uint64_t t0 = now_ms();
    CU_ASSERT_EQUAL_FATAL(sh("'%s' stop '%s'", script, priv_srv.dir), 0);
    printf("\n  restart: server stopped in %llu ms\n", (unsigned long long)(now_ms() - t0));
    CU_ASSERT(run_until(&sleeper.done, 1, 10000));
    CU_ASSERT_EQUAL(sleeper.done, 1);
    printf("  restart: the running SLEEP(20) ended with %d (%s)\n", sleeper.err,
           sleeper.errmsg);
    tres_free(&sleeper);

    /* down: each query answered, with an error, quickly */
    uint64_t worst = 0;
    for (int i = 0; i < 10; i++) {
        uint64_t s = now_ms();
        CU_ASSERT_EQUAL(q(&t, i % 2 ? "INSERT INTO r (v) VALUES (2)" : "SELECT 1", NULL, 0),
                        CHAT_OK);
        CU_ASSERT_EQUAL(t.err, CHAT_ERR_UNAVAILABLE);
        uint64_t d = now_ms() - s;
        CU_ASSERT(d < 5000);
        if (d > worst)
            worst = d;
        tres_free(&t);
    }
    printf("  restart: while down, slowest of 10 sequential queries: %llu ms\n",
           (unsigned long long)worst);
    burst("server down", 0);

    /* back: the pool reconnects by itself */
    CU_ASSERT_EQUAL_FATAL(sh("'%s' start '%s' %d", script, priv_srv.dir, priv_srv.port), 0);
    t0 = now_ms();
    int ok = 0;
    while (!ok && now_ms() - t0 < 20000) {
        CU_ASSERT_EQUAL(q(&t, "SELECT 1", NULL, 0), CHAT_OK);
        ok = t.err == CHAT_OK;
        tres_free(&t);
        if (!ok) {
            run_until(&never, 1, 100);
        }
    }
    CU_ASSERT(ok);
    printf("  restart: first success %llu ms after the server was back\n",
           (unsigned long long)(now_ms() - t0));
    burst("server back", 1);
    /* inserts: 150 before the stop, 150 after, none while down */
    CU_ASSERT_EQUAL(scalar("SELECT COUNT(*) FROM r"), NDOWN);
    pool_down();
    CU_ASSERT_EQUAL(sh("'%s' stop '%s'", script, priv_srv.dir), 0);
    priv_srv.running = 0;
}

/* ---- main -------------------------------------------------------------- */

static int setup_servers(void)
{
    const char *dir = getenv("CHAT_TEST_MYSQL_DIR");
    const char *port = getenv("CHAT_TEST_MYSQL_PORT");
    char tmpl[] = "/tmp/chatd-test-db.XXXXXX";

    if (!mkdtemp(tmpl)) {
        perror("mkdtemp");
        return -1;
    }
    snprintf(tmp_root, sizeof tmp_root, "%s", tmpl);
    if (dir && *dir && port && *port) {
        snprintf(main_srv.dir, sizeof main_srv.dir, "%s", dir);
        main_srv.port = atoi(port);
        main_srv.running = 1;
        printf("using the MariaDB in %s, port %d\n", main_srv.dir, main_srv.port);
    } else if (server_start(&main_srv, "main") != 0) {
        fprintf(stderr, "cannot start MariaDB in %s\n", main_srv.dir);
        return -1;
    }
    snprintf(main_db, sizeof main_db, "chatd_test_%ld_%ld", (long)getpid(), (long)time(NULL));
    if (sh("'%s' createdb '%s' %s", script, main_srv.dir, main_db) != 0)
        return -1;
    main_db_created = 1;
    return 0;
}

int main(void)
{
    const char *src = getenv("CHAT_SRC");
    const char *lvl = getenv("CHAT_TEST_LOG");
    int failed;

    snprintf(src_dir, sizeof src_dir, "%s", src && *src ? src : CHAT_SRC_DIR);
    snprintf(script, sizeof script, "%s/contrib/stack/mariadb.sh", src_dir);
    snprintf(sql_dir, sizeof sql_dir, "%s/sql", src_dir);
    log_level = lvl ? log_parse_level(lvl) : CHAT_LOG_ERROR;
    if (log_level < 0)
        log_level = CHAT_LOG_ERROR;
    setvbuf(stdout, NULL, _IONBF, 0);
    mysql_library_init(0, NULL, NULL);

    atexit(cleanup_all);
    signal(SIGINT, on_fatal);
    signal(SIGTERM, on_fatal);
    signal(SIGSEGV, on_fatal);
    signal(SIGABRT, on_fatal);
    signal(SIGBUS, on_fatal);
    signal(SIGFPE, on_fatal);
    uv_loop_init(&loop);
    db_on_ref(stub_ref, stub_unref);
    if (setup_servers() != 0)
        return 1;

    if (CU_initialize_registry() != CUE_SUCCESS)
        return 1;
    CU_pSuite s = CU_add_suite("db", NULL, NULL);
    CU_add_test(s, "no [mysql]: UNAVAILABLE at once", test_no_mysql);
    CU_add_test(s, "migrations apply, idempotent", test_migrate);
    CU_add_test(s, "migrations: order, lock, failure", test_migrate_files);
    CU_add_test(s, "parameters round-trip exactly", test_params_roundtrip);
    CU_add_test(s, "column types as bytes", test_types);
    CU_add_test(s, "errors", test_errors);
    CU_add_test(s, "transactions", test_txn);
    CU_add_test(s, "2000 queries on 4 connections", test_concurrency);
    CU_add_test(s, "statement cache eviction", test_stmt_cache);
    CU_add_test(s, "queue bound: BUSY, no callback", test_queue_bound);
    CU_add_test(s, "db_stop runs every callback", test_stop_outstanding);
    CU_add_test(s, "plugin references balance", test_refcount);
    CU_add_test(s, "unix socket, utf8mb4", test_socket);
    CU_add_test(s, "connections killed: retry rule", test_killed);
    CU_add_test(s, "server unreachable from the start", test_unreachable);
    CU_add_test(s, "server stopped and restarted", test_restart);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failed = (int)CU_get_number_of_failures() + (int)CU_get_number_of_tests_failed();
    CU_cleanup_registry();
    uv_loop_close(&loop);
    cleanup_all();
    return failed ? 1 : 0;
}
