/*
 * pwhash.c - password hashing for the login plugin.
 *
 * yescrypt through libcrypt (crypt_gensalt_rn "$y$" and crypt_rn) costs tens
 * of milliseconds of CPU by design, so it never runs on the loop thread: each
 * job goes to the host's worker threads with host->work() and reports back on
 * the loop.  At most hash_threads jobs run at once (by default one core fewer
 * than the machine has, at least one), the rest wait here, so a login storm
 * cannot take the core the event loop needs for chat.  The number of jobs
 * waiting or running is bounded (hash_queue_max): a flood of logins gets
 * "busy" instead of an ever-growing queue.
 *
 * The queue is fair between client addresses (IPv4 whole, IPv6 by /64), so
 * that one client flooding registrations or logins cannot starve everyone
 * else's (issue 14, defect 4):
 *  - each address has its own waiting list, and the lists are served round
 *    robin: a job waits behind at most one job of every other address;
 *  - one address holds at most hash_per_address jobs (waiting or running);
 *    past it the client is told it hit a limit (LOGIN_ERR_LIMIT);
 *  - when the whole queue is full, a newcomer pushes out the newest waiting
 *    job of the address that holds the most, if that address holds more
 *    than the newcomer's would ("longest queue drop"); that job is answered
 *    busy.  So a flood, even from many addresses, never keeps an address
 *    with fewer jobs out.  Registration and login share this queue and
 *    these rules, so neither can starve the other.
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
#include <arpa/inet.h>
#include <crypt.h>
#include <string.h>
#include <time.h>

#include "login.h"

enum pw_mode { PW_HASH, PW_VERIFY };

struct pw_addr;

struct pw_job {
    enum pw_mode mode;
    unsigned long cost;
    char *password;                  /* NUL-terminated copy; wiped */
    size_t password_len;
    char setting[CRYPT_OUTPUT_SIZE]; /* PW_VERIFY: the stored hash */
    char result[CRYPT_OUTPUT_SIZE];  /* the computed hash ("" on failure) */
    int match;
    double cpu_s;                    /* CPU seconds the hash took */
    double wall_s;                   /* wall seconds it took (the metric) */
    login_pw_cb cb;
    void *ud;
    struct pw_addr *addr;            /* the client address it counts against */
    struct pw_job *prev, *next;      /* the address's waiting list */
};

/* One client address with jobs waiting or running; freed when it has none. */
struct pw_addr {
    struct pw_addr *chain;           /* hash bucket */
    struct pw_addr *rr_next;         /* the round-robin list (waiting > 0) */
    struct login_addr key;
    size_t jobs;                     /* waiting or running */
    size_t waiting;
    struct pw_job *head, *tail;      /* waiting, oldest first */
};

#define PW_ADDR_BUCKETS 256

static size_t pw_queued;  /* jobs waiting or running */
static size_t pw_running; /* jobs handed to host->work and not yet done */
static struct pw_addr *pw_addrs[PW_ADDR_BUCKETS];
static struct pw_addr *pw_rr_head, *pw_rr_tail; /* addresses with waiting jobs */
static double pw_cpu_avg;    /* moving average of CPU s per hash; 0: none yet */
static struct login_bucket pw_bucket;

/* ------------------------------------------------------------------------ */
/* Client addresses */

int login_addr_of(const struct chat_session *s, struct login_addr *a)
{
    const char *peer = login_host->session_peer(s);
    char ip[64];
    const char *end;
    int v6 = peer[0] == '[';
    size_t n;

    memset(a, 0, sizeof(*a));
    if (v6) {             /* "[v6]:port" */
        peer++;
        end = strchr(peer, ']');
    } else {              /* "v4:port" */
        end = strrchr(peer, ':');
    }
    n = end ? (size_t)(end - peer) : 0;
    if (n == 0 || n >= sizeof(ip))
        return -1;
    memcpy(ip, peer, n);
    ip[n] = '\0';
    if (v6) {
        if (inet_pton(AF_INET6, ip, a->b) != 1)
            return -1;
        /* one IPv6 client usually holds a whole /64; v4-mapped stays whole */
        if (!IN6_IS_ADDR_V4MAPPED((struct in6_addr *)a->b))
            memset(a->b + 8, 0, 8);
        return 0;
    }
    if (inet_pton(AF_INET, ip, a->b + 12) != 1) {
        memset(a, 0, sizeof(*a));
        return -1;
    }
    a->b[10] = a->b[11] = 0xff; /* ::ffff:a.b.c.d, as the kernel maps it */
    return 0;
}

static unsigned pw_addr_hash(const struct login_addr *k)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    size_t i;

    for (i = 0; i < sizeof(k->b); i++)
        h = (h ^ k->b[i]) * 16777619u;
    return h % PW_ADDR_BUCKETS;
}

/* The entry of key, created when absent; NULL when out of memory. */
static struct pw_addr *pw_addr_get(const struct login_addr *key)
{
    struct pw_addr **slot = &pw_addrs[pw_addr_hash(key)], *a;

    for (a = *slot; a; a = a->chain)
        if (memcmp(&a->key, key, sizeof(*key)) == 0)
            return a;
    if (!(a = login_host->malloc(sizeof(*a))))
        return NULL;
    memset(a, 0, sizeof(*a));
    a->key = *key;
    a->chain = *slot;
    *slot = a;
    return a;
}

/* Free a when it holds no job any more. */
static void pw_addr_put(struct pw_addr *a)
{
    struct pw_addr **pp;

    if (a->jobs)
        return;
    for (pp = &pw_addrs[pw_addr_hash(&a->key)]; *pp; pp = &(*pp)->chain)
        if (*pp == a) {
            *pp = a->chain;
            break;
        }
    login_host->free(a);
}

static void pw_rr_remove(struct pw_addr *a)
{
    struct pw_addr **pp, *prev = NULL;

    for (pp = &pw_rr_head; *pp; prev = *pp, pp = &(*pp)->rr_next)
        if (*pp == a) {
            *pp = a->rr_next;
            if (pw_rr_tail == a)
                pw_rr_tail = prev;
            a->rr_next = NULL;
            return;
        }
}

static void pw_rr_append(struct pw_addr *a)
{
    a->rr_next = NULL;
    if (pw_rr_tail)
        pw_rr_tail->rr_next = a;
    else
        pw_rr_head = a;
    pw_rr_tail = a;
}

/* Append j to its address's waiting list. */
static void pw_wait_push(struct pw_job *j)
{
    struct pw_addr *a = j->addr;

    j->next = NULL;
    j->prev = a->tail;
    if (a->tail)
        a->tail->next = j;
    else
        a->head = j;
    a->tail = j;
    if (a->waiting++ == 0)
        pw_rr_append(a);
}

/* Take j off its address's waiting list (the address stays in the round
 * robin only while it has more waiting). */
static void pw_wait_unlink(struct pw_job *j)
{
    struct pw_addr *a = j->addr;

    if (j->prev)
        j->prev->next = j->next;
    else
        a->head = j->next;
    if (j->next)
        j->next->prev = j->prev;
    else
        a->tail = j->prev;
    j->prev = j->next = NULL;
    if (--a->waiting == 0)
        pw_rr_remove(a);
}

static double pw_wall_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

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
    if (login_bucket_take(&pw_bucket, rate, burst))
        return CHAT_OK;
    login_m_admit(LOGIN_ADMIT_BUDGET);
    return CHAT_ERR_BUSY;
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
    double t0 = pw_cpu_now(), w0 = pw_wall_now();

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
    j->wall_s = pw_wall_now() - w0;
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

/* j leaves the queue (done, failed to start, or pushed out). */
static void pw_release(struct pw_job *j)
{
    struct pw_addr *a = j->addr;

    pw_queued--;
    a->jobs--;
    pw_addr_put(a);
}

static void pw_done(int status, void *ud);

static int pw_submit(struct pw_job *j)
{
    int rc = login_host->work(login_self, pw_work, pw_done, j);
    if (rc == CHAT_OK)
        pw_running++;
    return rc;
}

/* Start waiting jobs while there is room, one per address in turn; a job
 * that cannot start is answered with the error. */
static void pw_next(void)
{
    while (pw_rr_head && pw_running < login_cfg.hash_threads) {
        struct pw_addr *a = pw_rr_head;
        struct pw_job *j = a->head;
        int rc;

        pw_wait_unlink(j);
        if (a->waiting) { /* to the back of the round */
            pw_rr_remove(a);
            pw_rr_append(a);
        }
        if ((rc = pw_submit(j)) != CHAT_OK) {
            pw_release(j);
            j->cb(rc, 0, NULL, j->ud);
            pw_free(j);
        }
    }
}

static void pw_done(int status, void *ud)
{
    struct pw_job *j = ud;

    pw_running--;
    pw_release(j);
    if (status == CHAT_OK && j->result[0] == '\0') {
        chat_log(login_host, login_self, CHAT_LOG_ERROR,
                 "crypt failed (%s)", j->mode == PW_HASH ? "hash" : "verify");
        status = CHAT_ERR_IO;
    }
    if (status == CHAT_OK)
        login_m_hash_time(j->mode == PW_VERIFY, j->wall_s);
    if (status == CHAT_OK && j->cpu_s > 0) /* weight 1/8: follows a cost change */
        pw_cpu_avg = pw_cpu_avg > 0 ? pw_cpu_avg + (j->cpu_s - pw_cpu_avg) / 8
                                    : j->cpu_s;
    if (status == CHAT_OK)
        j->cb(CHAT_OK, j->match, j->mode == PW_HASH ? j->result : NULL, j->ud);
    else
        j->cb(status, 0, NULL, j->ud);
    pw_free(j);
    pw_next();
    login_m_queue(pw_queued, pw_running);
}

/* The queue is full: push out the newest waiting job of the address holding
 * the most jobs, if it holds more than mine will (mine->jobs + 1).  1 when
 * a job was pushed out (and answered busy), 0 when none may be. */
static int pw_push_out(const struct pw_addr *mine)
{
    struct pw_addr *a, *big = NULL;
    struct pw_job *j;

    for (a = pw_rr_head; a; a = a->rr_next)
        if (!big || a->jobs > big->jobs)
            big = a;
    if (!big || big == mine || big->jobs <= mine->jobs + 1)
        return 0;
    j = big->tail;
    pw_wait_unlink(j);
    pw_release(j);
    login_m_admit(LOGIN_ADMIT_PUSHED_OUT);
    j->cb(CHAT_ERR_BUSY, 0, NULL, j->ud);
    pw_free(j);
    return 1;
}

static struct pw_job *pw_job_new(enum pw_mode mode, const char *password, size_t len,
                                 const char *stored, login_pw_cb cb, void *ud)
{
    struct pw_job *j = login_host->malloc(sizeof(*j));

    if (!j)
        return NULL;
    memset(j, 0, sizeof(*j));
    j->password = login_host->malloc(len + 1);
    if (!j->password) {
        login_host->free(j);
        return NULL;
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
    return j;
}

static int pw_start(enum pw_mode mode, const char *password, size_t len,
                    const char *stored, const struct login_addr *from,
                    login_pw_cb cb, void *ud)
{
    struct pw_addr *a;
    struct pw_job *j = NULL;
    int rc = CHAT_OK;

    if (stored && strlen(stored) >= CRYPT_OUTPUT_SIZE)
        return CHAT_ERR_INVAL;
    if (!(a = pw_addr_get(from)))
        return CHAT_ERR_NOMEM;
    if (login_cfg.hash_per_address && a->jobs >= login_cfg.hash_per_address) {
        login_m_admit(LOGIN_ADMIT_ADDRESS);
        rc = LOGIN_ERR_LIMIT;
        goto out;
    }
    if (!(j = pw_job_new(mode, password, len, stored, cb, ud))) {
        rc = CHAT_ERR_NOMEM;
        goto out;
    }
    if (login_cfg.hash_queue_max && pw_queued >= login_cfg.hash_queue_max &&
        !pw_push_out(a)) {
        login_m_admit(LOGIN_ADMIT_QUEUE);
        rc = CHAT_ERR_BUSY;
        goto out;
    }
    j->addr = a;
    if (pw_running < login_cfg.hash_threads && !pw_rr_head) {
        if ((rc = pw_submit(j)) != CHAT_OK)
            goto out;
    } else {
        pw_wait_push(j);
    }
    a->jobs++;
    pw_queued++;
    login_m_queue(pw_queued, pw_running);
    j = NULL;
out:
    if (j)
        pw_free(j);
    pw_addr_put(a);
    return rc;
}

int login_pw_hash(const char *password, size_t len, const struct login_addr *from,
                  login_pw_cb cb, void *ud)
{
    return pw_start(PW_HASH, password, len, NULL, from, cb, ud);
}

int login_pw_verify(const char *password, size_t len, const char *stored,
                    const struct login_addr *from, login_pw_cb cb, void *ud)
{
    return pw_start(PW_VERIFY, password, len, stored, from, cb, ud);
}

int login_pw_dummy(char *out, size_t outlen)
{
    if (!crypt_gensalt_rn("$y$", login_cfg.hash_cost, NULL, 0, out, (int)outlen))
        return CHAT_ERR_IO;
    return CHAT_OK;
}
