/*
 * metrics.c - the login plugin's Prometheus metrics, through the host's
 * metric_* functions (ABI 1.6): logins by kind and outcome, registrations
 * by outcome, admission rejections by reason, the password-hashing
 * queue (length, running jobs, time per hash) and the authentication
 * cache (hits, misses, errors, stores).
 *
 * Each series is registered once in init and updated through its handle,
 * plain memory on the loop thread.  Hash times are measured on the worker
 * thread that hashed and observed on the loop in the job's completion.  On
 * a host older than 1.6 (or in the unit test's fake host) every handle
 * stays NULL and the updates do nothing.  A reloaded instance registers
 * the same series again, so the values continue across reloads.
 */
#include <string.h>

#include "login.h"

static const char *const outcome_names[LOGIN_OUT_N] = {
    "ok", "invalid", "in_use", "busy", "limit", "bad_request", "error"};
static const char *const ac_names[LOGIN_AC_N] = {"hit", "miss", "error", "stored"};
static const char *const admit_names[LOGIN_ADMIT_N] = {"rate", "budget", "address",
                                                       "queue", "pushed_out"};

static struct {
    struct chat_metric *logins[2][LOGIN_OUT_N]; /* [by_token][outcome] */
    struct chat_metric *regs[LOGIN_OUT_N];
    struct chat_metric *admit[LOGIN_ADMIT_N];
    struct chat_metric *queue, *running;
    struct chat_metric *hash_s[2];              /* hash, verify */
    struct chat_metric *ac[LOGIN_AC_N];
} lm;

/* Hashing takes tens to hundreds of milliseconds; a queue adds seconds. */
static const double hash_bounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                     0.5,   1,    2.5,   5,    10};

void login_m_init(void)
{
    const struct chat_host *h = login_host;

    memset(&lm, 0, sizeof lm);
    if (!CHAT_HOST_HAS(h, metric_observe))
        return;
    for (int o = 0; o < LOGIN_OUT_N; o++) {
        const char *pw[] = {"kind", "password", "outcome", outcome_names[o], NULL};
        const char *tk[] = {"kind", "token", "outcome", outcome_names[o], NULL};
        const char *rg[] = {"outcome", outcome_names[o], NULL};
        static const char help[] =
            "LOGIN requests answered, by kind (password, token) and outcome.";
        lm.logins[0][o] = h->metric_counter(login_self, "logins_total", help, pw);
        lm.logins[1][o] = h->metric_counter(login_self, "logins_total", help, tk);
        lm.regs[o] = h->metric_counter(login_self, "registrations_total",
                                       "REG requests answered, by outcome.", rg);
    }
    for (int r = 0; r < LOGIN_ADMIT_N; r++) {
        const char *l[] = {"reason", admit_names[r], NULL};
        lm.admit[r] = h->metric_counter(
            login_self, "admission_rejected_total",
            "Logins and registrations turned away before hashing, by reason: "
            "rate (login_rate), budget (hash_budget), address (hash_per_address), "
            "queue (hash_queue_max), pushed_out (dropped from a full queue).", l);
    }
    for (int r = 0; r < LOGIN_AC_N; r++) {
        const char *l[] = {"result", ac_names[r], NULL};
        lm.ac[r] = h->metric_counter(
            login_self, "auth_cache_total",
            "Authentication cache: lookups that hit (no password hash), missed "
            "or failed (Redis unavailable), and entries stored.", l);
    }
    lm.queue = h->metric_gauge(login_self, "hash_queue_length",
                               "Password hashing jobs waiting or running.", NULL);
    lm.running = h->metric_gauge(login_self, "hash_running",
                                 "Password hashing jobs running on worker threads.", NULL);
    {
        const char *hs[] = {"op", "hash", NULL}, *vf[] = {"op", "verify", NULL};
        static const char help[] =
            "Wall time of one password hash on a worker thread, by operation.";
        size_t nb = sizeof hash_bounds / sizeof hash_bounds[0];
        lm.hash_s[0] = h->metric_histogram(login_self, "hash_seconds", help, hs,
                                           hash_bounds, nb);
        lm.hash_s[1] = h->metric_histogram(login_self, "hash_seconds", help, vf,
                                           hash_bounds, nb);
    }
}

static void inc(struct chat_metric *m)
{
    if (m)
        login_host->metric_inc(m);
}

/* The outcome of a p2 errno as the plugin answers it. */
static int outcome_of(int p2_errno)
{
    switch (p2_errno) {
    case CHAT_E_OK: return LOGIN_OUT_OK;
    case 1: return LOGIN_OUT_INVALID;        /* the seed's "invalid" / "taken" */
    case 2: case CHAT_E_ALREADY: case LOGIN_E_TOO_MANY_DEVICES:
        return LOGIN_OUT_IN_USE;
    case CHAT_E_UNAVAILABLE: return LOGIN_OUT_BUSY;
    case CHAT_E_LIMIT: return LOGIN_OUT_LIMIT;
    case CHAT_E_BAD_FIELD: case CHAT_E_TOO_LONG: return LOGIN_OUT_BAD_REQUEST;
    default: return LOGIN_OUT_ERROR;
    }
}

void login_m_login(int by_token, int p2_errno)
{
    inc(lm.logins[by_token ? 1 : 0][outcome_of(p2_errno)]);
}

/* For a registration the seed's errno 1 means "name taken": in_use. */
void login_m_reg(int p2_errno)
{
    inc(lm.regs[p2_errno == 1 ? LOGIN_OUT_IN_USE : outcome_of(p2_errno)]);
}

void login_m_admit(int reason)
{
    if (reason >= 0 && reason < LOGIN_ADMIT_N)
        inc(lm.admit[reason]);
}

void login_m_queue(size_t queued, size_t running)
{
    if (lm.queue)
        login_host->metric_set(lm.queue, (double)queued);
    if (lm.running)
        login_host->metric_set(lm.running, (double)running);
}

void login_m_hash_time(int verify, double seconds)
{
    struct chat_metric *m = lm.hash_s[verify ? 1 : 0];

    if (m)
        login_host->metric_observe(m, seconds);
}

void login_m_auth_cache(int result)
{
    if (result >= 0 && result < LOGIN_AC_N)
        inc(lm.ac[result]);
}
