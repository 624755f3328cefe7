/*
 * pwhash.c - password hashing for the login plugin.
 *
 * yescrypt through libcrypt (crypt_gensalt_rn "$y$" and crypt_rn) costs tens
 * of milliseconds of CPU by design, so it never runs on the loop thread: each
 * job goes to the host's worker threads with host->work() and reports back on
 * the loop.  At most hash_threads jobs run at once (by default one core fewer
 * than the machine has, at least one), the rest wait here in order, so a
 * login storm cannot take the core the event loop needs for chat.  The
 * number of jobs waiting or running is bounded (hash_queue_max): a flood of
 * logins gets "busy" instead of an ever-growing queue.
 *
 * A CPU budget (off by default) sits in front of the queue
 * (login_pw_admit): hashing may use at most hash_budget percent of the
 * hashing threads' time.  Each job measures its own CPU time
 * (CLOCK_THREAD_CPUTIME_ID); an average of those turns the budget into
 * hashes per second, enforced by a token bucket of a quarter second's
 * worth.  A login or registration over the budget is answered "busy" at
 * once, before any database work, so hashing takes a bounded share of the
 * machine whatever the storm.
 *
 * The plain password lives only in the job, which wipes it as soon as the
 * hash is computed.  Hash strings are compared in constant time.
 */
#include <crypt.h>
#include <string.h>
#include <time.h>

#include "login.h"

enum pw_mode { PW_HASH, PW_VERIFY };

struct pw_job {
    enum pw_mode mode;
    unsigned long cost;
    char *password;                  /* NUL-terminated copy; wiped */
    size_t password_len;
    char setting[CRYPT_OUTPUT_SIZE]; /* PW_VERIFY: the stored hash */
    char result[CRYPT_OUTPUT_SIZE];  /* the computed hash ("" on failure) */
    int match;
    double cpu_s;                    /* CPU seconds the hash took */
    login_pw_cb cb;
    void *ud;
    struct pw_job *next;             /* waiting list */
};

static size_t pw_queued;  /* jobs waiting or running */
static size_t pw_running; /* jobs handed to host->work and not yet done */
static struct pw_job *pw_wait_head, *pw_wait_tail;
static double pw_cpu_avg;    /* moving average of CPU s per hash; 0: none yet */
static struct login_bucket pw_bucket;

static double pw_cpu_now(void)
{
    struct timespec ts;

    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0)
        return 0;
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int login_pw_admit(void)
{
    double rate, burst;

    if (login_cfg.hash_budget >= 100 || pw_cpu_avg <= 0)
        return CHAT_OK; /* no budget, or nothing measured yet */
    /* hashes per second that fit the budget; a quarter second's burst */
    rate = (double)login_cfg.hash_budget / 100.0 * (double)login_cfg.hash_threads /
           pw_cpu_avg;
    burst = rate / 4;
    if (burst < (double)login_cfg.hash_threads)
        burst = (double)login_cfg.hash_threads;
    return login_bucket_take(&pw_bucket, rate, burst) ? CHAT_OK : CHAT_ERR_BUSY;
}

/* Constant-time equality of two NUL-terminated strings: the time depends on
 * the lengths only, never on where they differ. */
static int pw_equal(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b), n = la > lb ? la : lb, i;
    unsigned char diff = (unsigned char)(la != lb);

    for (i = 0; i < n; i++) {
        unsigned char ca = i < la ? (unsigned char)a[i] : 0;
        unsigned char cb = i < lb ? (unsigned char)b[i] : 0;
        diff |= (unsigned char)(ca ^ cb);
    }
    return diff == 0;
}

/* Worker thread: only malloc/free/log of the host table may be used here. */
static void pw_work(void *ud)
{
    struct pw_job *j = ud;
    struct crypt_data *cd;
    char salt[CRYPT_GENSALT_OUTPUT_SIZE];
    const char *setting = j->setting;
    char *out;
    double t0 = pw_cpu_now();

    j->result[0] = '\0';
    cd = login_host->malloc(sizeof(*cd));
    if (!cd)
        goto out;
    memset(cd, 0, sizeof(*cd));
    if (j->mode == PW_HASH) {
        if (!crypt_gensalt_rn("$y$", j->cost, NULL, 0, salt, (int)sizeof(salt)))
            goto out;
        setting = salt;
    }
    out = crypt_rn(j->password, setting, cd, (int)sizeof(*cd));
    /* crypt_rn returns NULL on failure; some versions return a "*" string. */
    if (out && out[0] != '*' && strlen(out) < sizeof(j->result)) {
        memcpy(j->result, out, strlen(out) + 1);
        if (j->mode == PW_VERIFY)
            j->match = pw_equal(j->result, j->setting);
    }
out:
    j->cpu_s = pw_cpu_now() - t0;
    explicit_bzero(j->password, j->password_len);
    if (cd) {
        explicit_bzero(cd, sizeof(*cd));
        login_host->free(cd);
    }
}

static void pw_free(struct pw_job *j)
{
    explicit_bzero(j->password, j->password_len);
    login_host->free(j->password);
    explicit_bzero(j, sizeof(*j));
    login_host->free(j);
}

static void pw_done(int status, void *ud);

static int pw_submit(struct pw_job *j)
{
    int rc = login_host->work(login_self, pw_work, pw_done, j);
    if (rc == CHAT_OK)
        pw_running++;
    return rc;
}

/* Start waiting jobs while there is room; a job that cannot start is
 * answered with the error. */
static void pw_next(void)
{
    while (pw_wait_head && pw_running < login_cfg.hash_threads) {
        struct pw_job *j = pw_wait_head;
        int rc;
        pw_wait_head = j->next;
        if (!pw_wait_head)
            pw_wait_tail = NULL;
        if ((rc = pw_submit(j)) != CHAT_OK) {
            pw_queued--;
            j->cb(rc, 0, NULL, j->ud);
            pw_free(j);
        }
    }
}

static void pw_done(int status, void *ud)
{
    struct pw_job *j = ud;

    pw_running--;
    pw_queued--;
    if (status == CHAT_OK && j->result[0] == '\0') {
        chat_log(login_host, login_self, CHAT_LOG_ERROR,
                 "crypt failed (%s)", j->mode == PW_HASH ? "hash" : "verify");
        status = CHAT_ERR_IO;
    }
    if (status == CHAT_OK && j->cpu_s > 0) /* weight 1/8: follows a cost change */
        pw_cpu_avg = pw_cpu_avg > 0 ? pw_cpu_avg + (j->cpu_s - pw_cpu_avg) / 8
                                    : j->cpu_s;
    if (status == CHAT_OK)
        j->cb(CHAT_OK, j->match, j->mode == PW_HASH ? j->result : NULL, j->ud);
    else
        j->cb(status, 0, NULL, j->ud);
    pw_free(j);
    pw_next();
}

static int pw_start(enum pw_mode mode, const char *password, size_t len,
                    const char *stored, login_pw_cb cb, void *ud)
{
    struct pw_job *j;
    int rc;

    if (login_cfg.hash_queue_max && pw_queued >= login_cfg.hash_queue_max)
        return CHAT_ERR_BUSY;
    if (stored && strlen(stored) >= CRYPT_OUTPUT_SIZE)
        return CHAT_ERR_INVAL;
    j = login_host->malloc(sizeof(*j));
    if (!j)
        return CHAT_ERR_NOMEM;
    memset(j, 0, sizeof(*j));
    j->password = login_host->malloc(len + 1);
    if (!j->password) {
        login_host->free(j);
        return CHAT_ERR_NOMEM;
    }
    memcpy(j->password, password, len);
    j->password[len] = '\0';
    j->password_len = len;
    j->mode = mode;
    j->cost = login_cfg.hash_cost;
    if (stored)
        memcpy(j->setting, stored, strlen(stored) + 1);
    j->cb = cb;
    j->ud = ud;
    if (pw_running < login_cfg.hash_threads) {
        if ((rc = pw_submit(j)) != CHAT_OK) {
            pw_free(j);
            return rc;
        }
    } else if (pw_wait_tail) {
        pw_wait_tail->next = j;
        pw_wait_tail = j;
    } else {
        pw_wait_head = pw_wait_tail = j;
    }
    pw_queued++;
    return CHAT_OK;
}

int login_pw_hash(const char *password, size_t len, login_pw_cb cb, void *ud)
{
    return pw_start(PW_HASH, password, len, NULL, cb, ud);
}

int login_pw_verify(const char *password, size_t len, const char *stored,
                    login_pw_cb cb, void *ud)
{
    return pw_start(PW_VERIFY, password, len, stored, cb, ud);
}

int login_pw_dummy(char *out, size_t outlen)
{
    if (!crypt_gensalt_rn("$y$", login_cfg.hash_cost, NULL, 0, out, (int)outlen))
        return CHAT_ERR_IO;
    return CHAT_OK;
}
