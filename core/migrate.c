/*
 * migrate.c - `chatd --migrate`: bring the schema up to date, blocking.
 *
 * This runs before any loop exists, so it may block: one plain connection
 * (utf8mb4, CLIENT_MULTI_STATEMENTS), retried a few times while the server
 * comes up.  GET_LOCK('chatd_migrate') serialises nodes migrating at once;
 * the second one waits, then finds everything applied.  The applied versions
 * are rows of schema_version.  The migration files are sql/NNN_name.sql,
 * applied in numeric order; each missing one is sent whole as a
 * multi-statement query, every result is drained, and the first error stops
 * the run with "file: error" logged (its version row is not written, so the
 * next run starts at that file again; MySQL DDL is not transactional, so a
 * file that failed half-way may need fixing by hand).  A file ends with its
 * statements: DELIMITER and other client commands are not understood.  The
 * run is idempotent: with nothing missing it changes nothing.  When the
 * database named in [mysql] does not exist it is created (utf8mb4).
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mysql.h>
#include <mysqld_error.h>

#include "core.h"

#define MIG_CONNECT_TRIES 5
#define MIG_LOCK_WAIT_S 30

struct mig_file {
    long version;
    char *name;   /* file name, e.g. "001_init.sql" */
};

/* "NNN_name.sql" -> version, or -1 for a file that is not a migration. */
static long mig_version(const char *name)
{
    size_t n = strlen(name), i = 0;
    long v = 0;

    while (isdigit((unsigned char)name[i])) {
        if (v > 100000000L)
            return -1;
        v = v * 10 + (name[i] - '0');
        i++;
    }
    if (i == 0 || name[i] != '_' || n < i + 6 || strcmp(name + n - 4, ".sql") != 0)
        return -1;
    return v;
}

static int mig_cmp(const void *a, const void *b)
{
    const struct mig_file *x = a, *y = b;
    return (x->version > y->version) - (x->version < y->version);
}

static void mig_files_free(struct mig_file *f, size_t n)
{
    for (size_t i = 0; i < n; i++)
        mem_free(f[i].name);
    mem_free(f);
}

/* List dir's migrations sorted by version; duplicates are an error. */
static int mig_scan(const char *dir, struct mig_file **out, size_t *nout)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    struct mig_file *f = NULL;
    size_t n = 0, cap = 0;

    if (!d) {
        LOGE("migrate: %s: %s", dir, strerror(errno));
        return -1;
    }
    while ((e = readdir(d)) != NULL) {
        long v = mig_version(e->d_name);
        if (v < 0)
            continue;
        if (n == cap) {
            size_t nc = cap ? cap * 2 : 16;
            struct mig_file *nf = mem_realloc(f, nc * sizeof *nf);
            if (!nf)
                goto nomem;
            f = nf;
            cap = nc;
        }
        f[n].version = v;
        f[n].name = mem_strdup(e->d_name);
        if (!f[n].name)
            goto nomem;
        n++;
    }
    closedir(d);
    if (n)
        qsort(f, n, sizeof *f, mig_cmp);
    for (size_t i = 1; i < n; i++) {
        if (f[i].version == f[i - 1].version) {
            LOGE("migrate: %s and %s have the same number", f[i - 1].name, f[i].name);
            mig_files_free(f, n);
            return -1;
        }
    }
    *out = f;
    *nout = n;
    return 0;
nomem:
    closedir(d);
    LOGE("migrate: out of memory");
    mig_files_free(f, n);
    return -1;
}

/* Read a whole file; mem_malloc'd, NUL-terminated; caller frees. */
static char *mig_read(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    char *buf = NULL;
    size_t n = 0, cap = 0, got;

    if (!fp) {
        LOGE("migrate: %s: %s", path, strerror(errno));
        return NULL;
    }
    do {
        if (cap - n < 4096) {
            cap = cap ? cap * 2 : 16384;
            char *nb = mem_realloc(buf, cap + 1);
            if (!nb) {
                LOGE("migrate: %s: out of memory", path);
                mem_free(buf);
                fclose(fp);
                return NULL;
            }
            buf = nb;
        }
        got = fread(buf + n, 1, cap - n, fp);
        n += got;
    } while (got > 0);
    if (ferror(fp)) {
        LOGE("migrate: %s: read error", path);
        mem_free(buf);
        fclose(fp);
        return NULL;
    }
    fclose(fp);
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* Send sql (maybe several statements) and drain every result. */
static int mig_run(MYSQL *m, const char *sql, size_t len, const char *what)
{
    int st;

    if (mysql_real_query(m, sql, (unsigned long)len) != 0)
        goto fail;
    do {
        MYSQL_RES *res = mysql_store_result(m);
        if (res)
            mysql_free_result(res);
        else if (mysql_field_count(m) != 0)
            goto fail;
        st = mysql_next_result(m);
        if (st > 0)
            goto fail;
    } while (st == 0);
    return 0;
fail:
    LOGE("migrate: %s: %s (%u)", what, mysql_error(m), mysql_errno(m));
    return -1;
}

/* The first column of the first row of a one-value query: 1 / 0 / -1
 * (NULL or error). */
static long mig_value(MYSQL *m, const char *sql)
{
    MYSQL_RES *res;
    MYSQL_ROW row;
    long v = -1;

    if (mysql_query(m, sql) != 0) {
        LOGE("migrate: %s: %s", sql, mysql_error(m));
        return -1;
    }
    res = mysql_store_result(m);
    if (!res) {
        LOGE("migrate: %s: %s", sql, mysql_error(m));
        return -1;
    }
    row = mysql_fetch_row(res);
    if (row && row[0])
        v = strtol(row[0], NULL, 10);
    mysql_free_result(res);
    return v;
}

static MYSQL *mig_connect_once(const struct conf *c, const char *db)
{
    unsigned int ct = c->my_connect_timeout_s > 0 ? (unsigned)c->my_connect_timeout_s : 2;
    const char *sock = c->my_socket && *c->my_socket ? c->my_socket : NULL;
    MYSQL *m = mysql_init(NULL);

    if (!m)
        return NULL;
    mysql_options(m, MYSQL_SET_CHARSET_NAME, "utf8mb4");
    mysql_options(m, MYSQL_INIT_COMMAND, "SET NAMES utf8mb4");
    mysql_options(m, MYSQL_OPT_CONNECT_TIMEOUT, &ct);
    /* on failure the caller reads mysql_errno(m), then closes m */
    mysql_real_connect(m, sock ? NULL : c->my_host, c->my_user, c->my_password, db,
                       sock ? 0 : (unsigned)c->my_port, sock,
                       CLIENT_MULTI_STATEMENTS | CLIENT_MULTI_RESULTS);
    return m;
}

/* Connect to the configured database, creating it when it is missing;
 * retried while the server is not reachable. */
static MYSQL *mig_connect(const struct conf *c)
{
    for (int attempt = 1;; attempt++) {
        MYSQL *m = mig_connect_once(c, c->my_database);
        if (!m) {
            LOGE("migrate: out of memory");
            return NULL;
        }
        if (mysql_errno(m) == 0)
            return m;
        if (mysql_errno(m) == ER_BAD_DB_ERROR) {
            mysql_close(m);
            m = mig_connect_once(c, NULL);
            if (!m)
                return NULL;
            if (mysql_errno(m) == 0) {
                char sql[300];
                int n = snprintf(sql, sizeof sql,
                                 "CREATE DATABASE IF NOT EXISTS `%s` CHARACTER SET utf8mb4",
                                 c->my_database);
                if (strchr(c->my_database, '`') || n < 0 || (size_t)n >= sizeof sql) {
                    LOGE("migrate: bad database name");
                    mysql_close(m);
                    return NULL;
                }
                if (mig_run(m, sql, (size_t)n, "create database") != 0 ||
                    mysql_select_db(m, c->my_database) != 0) {
                    LOGE("migrate: cannot use database %s: %s", c->my_database,
                         mysql_error(m));
                    mysql_close(m);
                    return NULL;
                }
                LOGI("migrate: created database %s", c->my_database);
                return m;
            }
        }
        LOGW("migrate: cannot connect (attempt %d of %d): %s", attempt,
             MIG_CONNECT_TRIES, mysql_error(m));
        int transient = mysql_errno(m) >= 2000 && mysql_errno(m) < 3000;
        mysql_close(m);
        if (!transient || attempt >= MIG_CONNECT_TRIES)
            return NULL;
        struct timespec ts = {1, 0};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
    }
}

/* Versions already applied; mem_malloc'd array (caller frees). */
static int mig_applied(MYSQL *m, long **out, size_t *nout)
{
    MYSQL_RES *res;
    MYSQL_ROW row;
    long *v;
    size_t n = 0;

    if (mysql_query(m, "SELECT version FROM schema_version ORDER BY version") != 0 ||
        !(res = mysql_store_result(m))) {
        LOGE("migrate: reading schema_version: %s", mysql_error(m));
        return -1;
    }
    v = mem_malloc((mysql_num_rows(res) + 1) * sizeof *v);
    if (!v) {
        mysql_free_result(res);
        LOGE("migrate: out of memory");
        return -1;
    }
    while ((row = mysql_fetch_row(res)) != NULL)
        if (row[0])
            v[n++] = strtol(row[0], NULL, 10);
    mysql_free_result(res);
    *out = v;
    *nout = n;
    return 0;
}

static int mig_record(MYSQL *m, const struct mig_file *f)
{
    MYSQL_STMT *st = mysql_stmt_init(m);
    MYSQL_BIND b[2];
    long long version = f->version;
    unsigned long nlen = (unsigned long)strlen(f->name);
    const char *sql = "INSERT INTO schema_version (version, name) VALUES (?, ?)";
    int rc = -1;

    if (!st) {
        LOGE("migrate: out of memory");
        return -1;
    }
    memset(b, 0, sizeof b);
    b[0].buffer_type = MYSQL_TYPE_LONGLONG;
    b[0].buffer = &version;
    b[1].buffer_type = MYSQL_TYPE_STRING;
    b[1].buffer = f->name;
    b[1].buffer_length = nlen;
    b[1].length = &nlen;
    if (mysql_stmt_prepare(st, sql, (unsigned long)strlen(sql)) != 0 ||
        mysql_stmt_bind_param(st, b) != 0 || mysql_stmt_execute(st) != 0)
        LOGE("migrate: %s: recording the version: %s", f->name, mysql_stmt_error(st));
    else
        rc = 0;
    mysql_stmt_close(st);
    return rc;
}

static int mig_apply(MYSQL *m, const char *dir, const struct mig_file *f)
{
    size_t plen = strlen(dir) + strlen(f->name) + 2, len = 0;
    char *path = mem_malloc(plen), *sql = NULL;
    int rc = -1;

    if (!path) {
        LOGE("migrate: out of memory");
        return -1;
    }
    snprintf(path, plen, "%s/%s", dir, f->name);
    sql = mig_read(path, &len);
    if (!sql)
        goto out;
    if (mig_run(m, sql, len, f->name) != 0)
        goto out;
    if (mig_record(m, f) != 0)
        goto out;
    LOGI("migrate: applied %s", f->name);
    rc = 0;
out:
    mem_free(sql);
    mem_free(path);
    return rc;
}

static const char mig_table[] =
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INT NOT NULL PRIMARY KEY,"
    " name VARCHAR(255) NOT NULL,"
    " applied_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4";

static const char mig_unlock[] = "DO RELEASE_LOCK('chatd_migrate')";

int db_migrate(const struct conf *c)
{
    MYSQL *m = NULL;
    struct mig_file *files = NULL;
    size_t nfiles = 0, napplied = 0, done = 0;
    long *applied = NULL, lock;
    int locked = 0, rc = -1;

    if (!c->have_mysql) {
        LOGE("migrate: %s has no [mysql] section", c->path ? c->path : "the config");
        return -1;
    }
    if (!c->sql_dir || !*c->sql_dir) {
        LOGE("migrate: no migrations directory configured");
        return -1;
    }
    if (mysql_library_init(0, NULL, NULL) != 0) {
        LOGE("migrate: mysql_library_init failed");
        return -1;
    }
    if (mig_scan(c->sql_dir, &files, &nfiles) != 0)
        goto out;
    m = mig_connect(c);
    if (!m)
        goto out;
    lock = mig_value(m, "SELECT GET_LOCK('chatd_migrate', 30)");
    if (lock != 1) {
        LOGE("migrate: another node holds the migration lock (waited %d s)",
             MIG_LOCK_WAIT_S);
        goto out;
    }
    locked = 1;
    if (mig_run(m, mig_table, sizeof mig_table - 1, "schema_version") != 0)
        goto out;
    if (mig_applied(m, &applied, &napplied) != 0)
        goto out;
    for (size_t i = 0; i < nfiles; i++) {
        int have = 0;
        for (size_t k = 0; k < napplied && !have; k++)
            have = applied[k] == files[i].version;
        if (have)
            continue;
        if (mig_apply(m, c->sql_dir, &files[i]) != 0)
            goto out;
        done++;
    }
    if (done)
        LOGI("migrate: %zu migration(s) applied; schema at version %ld", done,
             files[nfiles - 1].version);
    else
        LOGI("migrate: schema up to date");
    rc = 0;
out:
    if (locked)
        mig_run(m, mig_unlock, sizeof mig_unlock - 1, "release lock");
    if (m)
        mysql_close(m);
    mem_free(applied);
    mig_files_free(files, nfiles);
    return rc;
}
