/*
 * auth.c - LOGIN_MSG: authenticate, bind the session, send the login ack.
 *
 * A password login is: SELECT the user -> verify the password on a worker
 * thread -> (protocol 2) store a new resume token -> session_login() ->
 * login_ack_begin().  A token login (protocol 2, "token" instead of
 * "password") is one SELECT that checks token, user and expiry together,
 * then the same binding; it never hashes, which is what makes a mass
 * reconnect after a node failure cheap.
 *
 * An unknown id costs the same hash as a wrong password (against a
 * stand-in hash) and gets the same reply, so neither the reply nor its
 * timing says whether an id exists.  Only the SHA-256 of a token is stored,
 * computed by MariaDB (UNHEX(SHA2(?,256))); token expiry is kept in UTC.
 *
 * The authentication cache (authcache.c) sits between the SELECT and the
 * hash: when the HMAC of this id, password and stored hash is the one a
 * successful verification stored, the hash is skipped; else the
 * verification runs as without it and, when it succeeds, stores the HMAC.
 *
 * One login at a time per connection: jobs in flight are kept in a small
 * hash set by session id, so a second LOGIN on the same connection while
 * the first is still hashing is refused instead of binding twice.
 *
 * The login queue (login_queue_max, with login_rate): a login over the rate
 * waits in a FIFO instead of being told "busy", and a one-shot timer starts
 * the queued ones as the rate allows, every 1000/login_rate ms (at most
 * QUEUE_TICK_MS), so one or two per loop turn.  A failover storm then reaches the database at a steady pace, the
 * chat read in the same turn is not queued behind a burst of login work,
 * and the clients do not send each refused login again (a busy reply and
 * its retry cost the loop, nginx and the client as much as a login that
 * the caches answer).  A queued job is in the pending set, so the
 * connection cannot start a second login; a job whose session closed while
 * it waited is dropped without taking the rate.  Only a full queue answers
 * "busy", as the rate alone did.
 */
#include <crypt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "login.h"

#define MSG_BUSY "server busy, try again later"
#define MSG_INTERNAL "internal error, try again"
#define MSG_TOKEN_INVALID "id or token is invalid!"
#define MSG_ADDR_LIMIT "too many logins in progress from your address, try again shortly"

struct auth_job {
    struct auth_job *next;   /* chain of the pending set */
    struct auth_job *qnext;  /* the login queue, while it waits there */
    uint64_t sid;
    struct chat_ack ack;
    int64_t uid;
    int by_token;
    int unknown;             /* no such user: verifying against the stand-in */
    char *password;          /* NUL-terminated; wiped and freed once hashed */
    size_t password_len;
    char *name;              /* from users.name; may hold NUL */
    size_t name_len;
    char token[LOGIN_TOKEN_HEX + 1]; /* "" when the ack carries none */
    int64_t token_expires;   /* unix seconds */
    int token_new;           /* created by this login: revoke if it fails */
    int tc_store;            /* remember the token once the login succeeded */
    uint64_t tc_generation;  /* the token cache's, when the token was read */
    int ac_have;             /* mac holds the auth cache HMAC of this attempt */
    unsigned char mac[LOGIN_AC_MAC];
    char stored[CRYPT_OUTPUT_SIZE]; /* the users row's hash, while the cache is asked */
};

#define QUEUE_TICK_MS 10

#define PEND_BUCKETS 1024
static struct auth_job *pend[PEND_BUCKETS];
static char dummy_hash[CRYPT_GENSALT_OUTPUT_SIZE];

int login_auth_init(void)
{
    int rc = login_pw_dummy(dummy_hash, sizeof(dummy_hash));

    if (rc != CHAT_OK)
        chat_log(login_host, login_self, CHAT_LOG_ERROR,
                 "crypt_gensalt(\"$y$\") failed: is yescrypt supported?");
    return rc;
}

/* ------------------------------------------------------------------------ */
/* The pending set and the job's end */

static struct auth_job **pend_slot(uint64_t sid)
{
    return &pend[sid % PEND_BUCKETS];
}

static struct auth_job *pend_find(uint64_t sid)
{
    struct auth_job *j;

    for (j = *pend_slot(sid); j; j = j->next)
        if (j->sid == sid)
            return j;
    return NULL;
}

static void pend_remove(struct auth_job *j)
{
    struct auth_job **pp;

    for (pp = pend_slot(j->sid); *pp; pp = &(*pp)->next)
        if (*pp == j) {
            *pp = j->next;
            return;
        }
}

static void wipe_password(struct auth_job *j)
{
    if (j->password) {
        explicit_bzero(j->password, j->password_len);
        login_host->free(j->password);
        j->password = NULL;
    }
}

/* The end of every login attempt.  revoke: the new token never reached the
 * client, delete it. */
static void job_end(struct auth_job *j, int revoke)
{
    if (revoke && j->token_new)
        login_token_revoke(j->uid, j->token);
    pend_remove(j);
    wipe_password(j);
    login_host->free(j->name);
    explicit_bzero(j->token, sizeof(j->token));
    explicit_bzero(j->mac, sizeof(j->mac));
    login_host->free(j);
}

static void job_fail(struct chat_session *s, struct auth_job *j, int p2_errno,
                     const char *errmsg, int legacy_errno, const char *legacy_msg)
{
    login_m_login(j->by_token, s ? p2_errno : CHAT_E_INTERNAL);
    if (s)
        login_fail(s, &j->ack, p2_errno, errmsg, legacy_errno, legacy_msg);
    job_end(j, 1);
}

/* Failure of a step that could not start (rc from the host). */
static void job_fail_rc(struct chat_session *s, struct auth_job *j, int rc)
{
    if (rc == LOGIN_ERR_LIMIT) /* legacy: the seed's shape, as for busy */
        job_fail(s, j, CHAT_E_LIMIT, MSG_ADDR_LIMIT, 1, MSG_BUSY);
    else if (rc == CHAT_ERR_BUSY || rc == CHAT_ERR_UNAVAILABLE)
        job_fail(s, j, CHAT_E_UNAVAILABLE, MSG_BUSY, 1, MSG_BUSY);
    else
        job_fail(s, j, CHAT_E_INTERNAL, MSG_INTERNAL, 1, MSG_INTERNAL);
}

/* ------------------------------------------------------------------------ */
/* The last steps: bind the session, send the ack */

static cJSON *ack_base(const struct auth_job *j)
{
    cJSON *o = cJSON_CreateObject();
    char num[24];
    char *q = NULL;
    size_t qlen;

    if (!o)
        return NULL;
    snprintf(num, sizeof(num), "%" PRId64, j->uid);
    if (!cJSON_AddNumberToObject(o, "msgid", CHAT_MSG_LOGIN_ACK) ||
        !cJSON_AddNumberToObject(o, "errno", 0) ||
        !cJSON_AddRawToObject(o, "id", num) ||
        !(q = login_host->json_quote(j->name, j->name_len, &qlen)) ||
        !cJSON_AddRawToObject(o, "name", q))
        goto fail;
    if (j->token[0]) {
        snprintf(num, sizeof(num), "%" PRId64, j->token_expires);
        if (!cJSON_AddStringToObject(o, "token", j->token) ||
            !cJSON_AddRawToObject(o, "token_expires", num))
            goto fail;
    }
    login_host->free(q);
    return o;
fail:
    login_host->free(q);
    cJSON_Delete(o);
    return NULL;
}

static void bound(int status, uint64_t sid, void *ud)
{
    struct auth_job *j = ud;
    struct chat_session *s = login_host->session_get(sid);
    cJSON *base;
    int rc;

    if (status == CHAT_ERR_EXISTS) {
        chat_log(login_host, login_self, CHAT_LOG_INFO,
                 "login of user %" PRId64 " refused: online elsewhere", j->uid);
        job_fail(s, j, 2, LOGIN_ERRMSG_IN_USE, 2, LOGIN_ERRMSG_IN_USE);
        return;
    }
    if (status == CHAT_ERR_BUSY && login_cfg.multi) {
        chat_log(login_host, login_self, CHAT_LOG_INFO,
                 "login of user %" PRId64 " refused: %d devices online already",
                 j->uid, login_cfg.devices_max);
        job_fail(s, j, LOGIN_E_TOO_MANY_DEVICES, LOGIN_ERRMSG_TOO_MANY_DEVICES,
                 LOGIN_E_TOO_MANY_DEVICES, LOGIN_ERRMSG_TOO_MANY_DEVICES);
        return;
    }
    if (status != CHAT_OK || !s) {
        if (status != CHAT_ERR_CLOSED && s)
            chat_log(login_host, login_self, CHAT_LOG_ERROR, "session_login(%" PRId64
                     "): %s", j->uid, login_host->strerror(status));
        job_fail_rc(s, j, status);
        return;
    }
    base = ack_base(j);
    rc = base ? login_host->login_ack_begin(login_self, s, &j->ack, base, NULL, NULL)
              : CHAT_ERR_NOMEM;
    cJSON_Delete(base);
    if (rc != CHAT_OK) {
        chat_log(login_host, login_self, CHAT_LOG_ERROR,
                 "login ack for user %" PRId64 ": %s", j->uid, login_host->strerror(rc));
        login_host->session_logout(s);
        job_fail_rc(s, j, rc);
        return;
    }
    chat_log(login_host, login_self, CHAT_LOG_INFO,
             "user %" PRId64 " logged in from %s (%s)", j->uid,
             login_host->session_peer(s), j->by_token ? "token" : "password");
    if (login_cfg.multi && j->token[0])
        login_dev_token_set(sid, j->token);
    if (j->tc_store && j->token[0])
        login_tc_store(j->tc_generation, j->uid, j->token, j->name, j->name_len,
                       j->token_expires);
    login_m_login(j->by_token, CHAT_E_OK);
    job_end(j, 0);
}

static void bind_session(struct chat_session *s, struct auth_job *j)
{
    int flags = login_cfg.replace ? CHAT_LOGIN_REPLACE : 0;
    int rc;

    if (login_cfg.multi)
        flags = CHAT_LOGIN_MULTI | CHAT_LOGIN_DEVICES_MAX(login_cfg.devices_max);
    if (login_host->session_user(s) != 0) {
        job_fail(s, j, CHAT_E_ALREADY, "already logged in", 2, LOGIN_ERRMSG_IN_USE);
        return;
    }
    /* ABI 1.3 keeps a name holding NUL whole; older hosts cut it there. */
    if (CHAT_HOST_HAS(login_host, session_login_len))
        rc = login_host->session_login_len(login_self, s, j->uid, j->name, j->name_len,
                                           flags, bound, j);
    else
        rc = login_host->session_login(login_self, s, j->uid, j->name, flags, bound, j);
    if (rc != CHAT_OK)
        job_fail_rc(s, j, rc);
}

/* ------------------------------------------------------------------------ */
/* Password logins */

static void token_stored(const struct chat_db_result *r, void *ud)
{
    struct auth_job *j = ud;
    struct chat_session *s = login_host->session_get(j->sid);

    if (login_host->db_error(r) == CHAT_OK) {
        j->token_new = 1;
    } else {
        /* The login stands; the client just gets no token this time. */
        chat_log(login_host, login_self, CHAT_LOG_WARN,
                 "storing a resume token for user %" PRId64 " failed: %s",
                 j->uid, login_host->db_errmsg(r));
        j->token[0] = '\0';
    }
    if (!s) {
        job_end(j, 1);
        return;
    }
    bind_session(s, j);
}

/* Create a token, store its hash; then bind.  Without a token (tokens off,
 * randomness or database unavailable) the login goes on without one. */
static void token_create(struct chat_session *s, struct auth_job *j)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char rnd[LOGIN_TOKEN_HEX / 2];
    struct chat_db_param p[3];
    size_t i;
    int rc;

    if (login_cfg.resume_ttl <= 0 ||
        getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
        bind_session(s, j);
        return;
    }
    for (i = 0; i < sizeof(rnd); i++) {
        j->token[2 * i] = hex[rnd[i] >> 4];
        j->token[2 * i + 1] = hex[rnd[i] & 15];
    }
    j->token[LOGIN_TOKEN_HEX] = '\0';
    explicit_bzero(rnd, sizeof(rnd));
    j->tc_store = 1;
    j->tc_generation = login_tc_generation();
    j->token_expires = (int64_t)time(NULL) + login_cfg.resume_ttl;
    p[0] = CHAT_DB_P_STR(j->token, LOGIN_TOKEN_HEX);
    p[1] = CHAT_DB_P_INT(j->uid);
    p[2] = CHAT_DB_P_INT(j->token_expires);
    rc = login_host->db_query(login_self,
        "INSERT INTO resume_tokens (token_hash, user_id, expires_at) VALUES "
        "(UNHEX(SHA2(?, 256)), ?, DATE_ADD('1970-01-01', INTERVAL ? SECOND))",
        p, 3, token_stored, j);
    if (rc != CHAT_OK) {
        j->token[0] = '\0';
        bind_session(s, j);
    }
}

/* verified()'s hash argument for a login the auth cache answered. */
static const char AC_HIT[] = "";

static void verified(int status, int match, const char *hash, void *ud)
{
    struct auth_job *j = ud;
    struct chat_session *s = login_host->session_get(j->sid);

    (void)hash;
    if (!s) {
        job_end(j, 1);
        return;
    }
    if (status != CHAT_OK) {
        job_fail_rc(s, j, status == CHAT_ERR_CLOSED ? CHAT_ERR_UNAVAILABLE : status);
        return;
    }
    if (!match || j->unknown) {
        chat_log(login_host, login_self, CHAT_LOG_INFO,
                 "login of user %" PRId64 " from %s: wrong id or password",
                 j->uid, login_host->session_peer(s));
        if (CHAT_HOST_HAS(login_host, login_failed)) /* [limits] (ABI 1.7) */
            login_host->login_failed(s);
        job_fail(s, j, 1, LOGIN_ERRMSG_INVALID, 1, LOGIN_ERRMSG_INVALID);
        return;
    }
    if (j->ac_have && hash != AC_HIT)
        login_ac_store(j->uid, j->mac);
    if (login_is_p2(s))
        token_create(s, j);
    else
        bind_session(s, j);
}


/* Copy the user name of column 0 of row 0 into the job (names may hold NUL). */
static int job_take_name(struct auth_job *j, const struct chat_db_result *r)
{
    size_t len;
    const char *name = login_host->db_str(r, 0, 0, &len);
    if (!(j->name = login_host->malloc(len + 1)))
        return CHAT_ERR_NOMEM;
    memcpy(j->name, name, len);
    j->name[len] = '\0';
    j->name_len = len;
    return CHAT_OK;
}

/* The slow path: verify the password against j->stored on a worker. */
static void verify(struct chat_session *s, struct auth_job *j)
{
    struct login_addr from;
    int rc;

    login_addr_of(s, &from);
    rc = login_pw_verify(j->password, j->password_len, j->stored, &from, verified, j);
    wipe_password(j);
    if (rc != CHAT_OK)
        job_fail_rc(s, j, rc);
}

static void ac_answered(int hit, void *ud)
{
    struct auth_job *j = ud;
    struct chat_session *s = login_host->session_get(j->sid);

    if (!s) {
        job_end(j, 0);
        return;
    }
    if (!hit) {
        verify(s, j);
        return;
    }
    /* the same HMAC: the password matched this very hash before */
    wipe_password(j);
    verified(CHAT_OK, 1, AC_HIT, j);
}

/* Ask the auth cache about this attempt: CHAT_OK (ac_answered follows), or
 * an error (cache off or unusable: verify now).  Unknown ids ask too, so a
 * miss costs the same whether the id exists or not. */
static int ac_ask(struct auth_job *j)
{
    if (!login_ac_enabled() ||
        login_ac_mac(j->uid, j->password, j->password_len, j->stored, j->mac) != CHAT_OK)
        return CHAT_ERR_INVAL;
    j->ac_have = !j->unknown;
    return login_ac_check(j->uid, j->mac, ac_answered, j);
}

static void user_loaded(const struct chat_db_result *r, void *ud)
{
    struct auth_job *j = ud;
    struct chat_session *s = login_host->session_get(j->sid);
    const char *stored = dummy_hash;
    size_t len;

    if (!s) {
        job_end(j, 0);
        return;
    }
    if (login_host->db_error(r) != CHAT_OK) {
        chat_log(login_host, login_self, CHAT_LOG_ERROR, "login: loading user %"
                 PRId64 " failed: %s", j->uid, login_host->db_errmsg(r));
        job_fail_rc(s, j, login_host->db_error(r));
        return;
    }
    if (login_host->db_nrows(r) == 0) {
        j->unknown = 1;
    } else {
        if (job_take_name(j, r) != CHAT_OK) {
            job_fail_rc(s, j, CHAT_ERR_NOMEM);
            return;
        }
        stored = login_host->db_str(r, 0, 1, &len);
    }
    if (strlen(stored) >= sizeof(j->stored)) {
        job_fail_rc(s, j, CHAT_ERR_INVAL);
        return;
    }
    memcpy(j->stored, stored, strlen(stored) + 1);
    if (ac_ask(j) == CHAT_OK)
        return; /* on in ac_answered */
    verify(s, j);
}

/* ------------------------------------------------------------------------ */
/* Token logins */

static void token_checked(const struct chat_db_result *r, void *ud)
{
    struct auth_job *j = ud;
    struct chat_session *s = login_host->session_get(j->sid);

    if (!s) {
        job_end(j, 0);
        return;
    }
    if (login_host->db_error(r) != CHAT_OK) {
        chat_log(login_host, login_self, CHAT_LOG_ERROR, "login: checking a token "
                 "of user %" PRId64 " failed: %s", j->uid, login_host->db_errmsg(r));
        job_fail_rc(s, j, login_host->db_error(r));
        return;
    }
    if (login_host->db_nrows(r) == 0) {
        chat_log(login_host, login_self, CHAT_LOG_INFO,
                 "login of user %" PRId64 " from %s: invalid or expired token",
                 j->uid, login_host->session_peer(s));
        if (CHAT_HOST_HAS(login_host, login_failed)) /* [limits] (ABI 1.7) */
            login_host->login_failed(s);
        job_fail(s, j, 1, MSG_TOKEN_INVALID, 1, MSG_TOKEN_INVALID);
        return;
    }
    if (job_take_name(j, r) != CHAT_OK) {
        job_fail_rc(s, j, CHAT_ERR_NOMEM);
        return;
    }
    j->token_expires = login_host->db_int(r, 0, 1);
    j->tc_store = 1; /* with the generation read before the SELECT */
    bind_session(s, j);
}

/* ------------------------------------------------------------------------ */
/* The handler */

static int valid_token(const char *t, size_t len)
{
    size_t i;

    if (len != LOGIN_TOKEN_HEX)
        return 0;
    for (i = 0; i < len; i++)
        if (!((t[i] >= '0' && t[i] <= '9') || (t[i] >= 'a' && t[i] <= 'f')))
            return 0;
    return 1;
}

/* The request's "id" as a positive integer, or 0. */
static int64_t req_id(const struct chat_request *req)
{
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(req->json, "id");
    double d;

    if (!cJSON_IsNumber(id))
        return 0;
    d = id->valuedouble;
    if (!(d >= 1 && d <= 9007199254740992.0) || (double)(int64_t)d != d)
        return 0;
    return (int64_t)d;
}

/* Checks the request and fills j (token or password); 0, or -1 after
 * answering. */
static int parse_request(struct chat_session *s, const struct chat_request *req,
                         struct auth_job *j)
{
    const char *pw, *tok;
    size_t len;
    char msg[80];

    j->uid = req_id(req);
    if (!j->uid) {
        login_m_login(0, CHAT_E_BAD_FIELD);
        login_fail(s, &req->ack, CHAT_E_BAD_FIELD, "id must be a positive integer",
                   1, LOGIN_ERRMSG_INVALID);
        return -1;
    }
    if (login_is_p2(s) && cJSON_GetObjectItemCaseSensitive(req->json, "token")) {
        if (login_req_str(req, "token", &tok, &len) || !valid_token(tok, len)) {
            login_m_login(1, CHAT_E_BAD_FIELD);
            login_fail(s, &req->ack, CHAT_E_BAD_FIELD,
                       "token must be a string of 64 hex digits", 1, NULL);
            return -1;
        }
        memcpy(j->token, tok, LOGIN_TOKEN_HEX + 1);
        j->by_token = 1;
        return 0;
    }
    if (login_req_str(req, "password", &pw, &len)) {
        login_m_login(0, CHAT_E_BAD_FIELD);
        login_fail(s, &req->ack, CHAT_E_BAD_FIELD, "password must be a string",
                   1, LOGIN_ERRMSG_INVALID);
        return -1;
    }
    if (len > login_cfg.password_max) {
        snprintf(msg, sizeof(msg), "password is longer than %zu bytes",
                 login_cfg.password_max);
        login_m_login(0, CHAT_E_TOO_LONG);
        login_fail(s, &req->ack, CHAT_E_TOO_LONG, msg, 1, LOGIN_ERRMSG_INVALID);
        return -1;
    }
    if (memchr(pw, '\0', len)) {
        /* crypt() would stop at the NUL: never let "pw\0junk" pass as "pw" */
        login_m_login(0, 1);
        login_fail(s, &req->ack, 1, LOGIN_ERRMSG_INVALID, 1, LOGIN_ERRMSG_INVALID);
        return -1;
    }
    j->password = login_host->malloc(len + 1);
    if (!j->password) {
        login_m_login(0, CHAT_E_INTERNAL);
        login_fail(s, &req->ack, CHAT_E_INTERNAL, MSG_INTERNAL, 1, MSG_INTERNAL);
        return -1;
    }
    memcpy(j->password, pw, len + 1);
    j->password_len = len;
    return 0;
}

/* A token this node verified recently: bind without asking the database.
 * 1 when the login went on from here. */
static int token_from_cache(struct chat_session *s, struct auth_job *j)
{
    const char *name;
    size_t len;

    if (!login_tc_lookup(j->uid, j->token, &name, &len, &j->token_expires))
        return 0;
    if (!(j->name = login_host->malloc(len + 1))) {
        job_fail_rc(s, j, CHAT_ERR_NOMEM);
        return 1;
    }
    memcpy(j->name, name, len);
    j->name[len] = '\0';
    j->name_len = len;
    bind_session(s, j);
    return 1;
}

/* ------------------------------------------------------------------------ */
/* The login queue (see the top of the file) */

static void job_start(struct chat_session *s, struct auth_job *j);

static struct auth_job *queue_head, *queue_tail;
static size_t queue_len;
static int queue_armed;

static void pend_add(struct auth_job *j)
{
    j->next = *pend_slot(j->sid);
    *pend_slot(j->sid) = j;
}

static void queue_tick(struct chat_timer *t, void *ud);

/* One login's worth of the rate (4 ms at 250/s), within 1..QUEUE_TICK_MS:
 * the queued logins start one or two at a time, not in bursts. */
static uint64_t queue_tick_ms(void)
{
    int64_t ms = login_cfg.login_rate > 0 ? 1000 / login_cfg.login_rate : QUEUE_TICK_MS;

    return ms < 1 ? 1 : ms > QUEUE_TICK_MS ? QUEUE_TICK_MS : (uint64_t)ms;
}

static void queue_arm(void)
{
    if (queue_armed || !queue_head)
        return;
    if (login_host->timer_start(login_self, queue_tick_ms(), 0, queue_tick, NULL))
        queue_armed = 1;
    else /* tried again by the next push */
        chat_log(login_host, login_self, CHAT_LOG_ERROR, "login queue: no timer");
}

/* Starts the queued logins the rate allows, oldest first. */
static void queue_tick(struct chat_timer *t, void *ud)
{
    struct auth_job *j;
    struct chat_session *s;

    (void)t;
    (void)ud;
    queue_armed = 0;
    while ((j = queue_head)) {
        s = login_host->session_get(j->sid);
        if (s && login_rate_admit() != CHAT_OK)
            break;
        queue_head = j->qnext;
        if (!queue_head)
            queue_tail = NULL;
        queue_len--;
        j->qnext = NULL;
        if (s)
            job_start(s, j);
        else
            job_end(j, 0); /* gone while it waited */
    }
    queue_arm();
}

/* fini: the logins still queued when a stopping server closed the queue's
 * timer without calling it back (a reload drains the queue first: the
 * timer holds the instance). */
void login_auth_fini(void)
{
    struct auth_job *j;

    while ((j = queue_head)) {
        queue_head = j->qnext;
        j->qnext = NULL;
        job_end(j, 0);
    }
    queue_tail = NULL;
    queue_len = 0;
    queue_armed = 0;
}

/* Appends j (not yet in the pending set); CHAT_ERR_BUSY when full. */
static int queue_push(struct auth_job *j)
{
    if (queue_len >= login_cfg.login_queue_max) {
        queue_arm(); /* if a timer could not be started before */
        return CHAT_ERR_BUSY;
    }
    if (queue_tail)
        queue_tail->qnext = j;
    else
        queue_head = j;
    queue_tail = j;
    queue_len++;
    queue_arm();
    return CHAT_OK;
}

void login_handle_login(struct chat_session *s, const struct chat_request *req,
                        void *ud)
{
    uint64_t sid = login_host->session_id(s);
    struct auth_job *j;
    int by_token = login_is_p2(s) && req->json &&
                   cJSON_GetObjectItemCaseSensitive(req->json, "token") != NULL;

    (void)ud;
    if (login_host->session_user(s) != 0) {
        login_m_login(by_token, CHAT_E_ALREADY);
        login_fail(s, &req->ack, CHAT_E_ALREADY, "already logged in",
                   2, LOGIN_ERRMSG_IN_USE);
        return;
    }
    if (pend_find(sid)) {
        login_m_login(by_token, CHAT_E_ALREADY);
        login_fail(s, &req->ack, CHAT_E_ALREADY,
                   "a login is already in progress on this connection",
                   2, LOGIN_ERRMSG_IN_USE);
        return;
    }
    j = login_host->malloc(sizeof(*j));
    if (!j) {
        login_m_login(by_token, CHAT_E_INTERNAL);
        login_fail(s, &req->ack, CHAT_E_INTERNAL, MSG_INTERNAL, 1, MSG_INTERNAL);
        return;
    }
    memset(j, 0, sizeof(*j));
    j->sid = sid;
    j->ack = req->ack;
    if (parse_request(s, req, j) != 0) {
        login_host->free(j);
        return;
    }
    if (queue_len || login_rate_admit() != CHAT_OK) {
        if (queue_push(j) == CHAT_OK) {
            pend_add(j);
            return; /* on in queue_tick */
        }
        login_m_admit(LOGIN_ADMIT_RATE);
        wipe_password(j);
        explicit_bzero(j->token, sizeof(j->token));
        login_host->free(j);
        login_m_login(by_token, CHAT_E_UNAVAILABLE);
        login_fail(s, &req->ack, CHAT_E_UNAVAILABLE, MSG_BUSY, 1, MSG_BUSY);
        return;
    }
    pend_add(j);
    job_start(s, j);
}

/* The first step of an admitted login: the token cache, or the SELECT. */
static void job_start(struct chat_session *s, struct auth_job *j)
{
    struct chat_db_param p[2];
    int rc;

    if (j->by_token && token_from_cache(s, j))
        return;
    if (j->by_token) {
        j->tc_generation = login_tc_generation();
        p[0] = CHAT_DB_P_STR(j->token, LOGIN_TOKEN_HEX);
        p[1] = CHAT_DB_P_INT(j->uid);
        rc = login_host->db_query(login_self,
            "SELECT u.name, TIMESTAMPDIFF(SECOND, '1970-01-01 00:00:00', t.expires_at)"
            " FROM resume_tokens t JOIN users u ON u.id = t.user_id"
            " WHERE t.token_hash = UNHEX(SHA2(?, 256)) AND t.user_id = ?"
            " AND t.expires_at > UTC_TIMESTAMP()",
            p, 2, token_checked, j);
    } else if ((rc = login_pw_admit()) == CHAT_OK) {
        p[0] = CHAT_DB_P_INT(j->uid);
        rc = login_host->db_query(login_self,
                                  "SELECT name, pwhash FROM users WHERE id = ?",
                                  p, 1, user_loaded, j);
    }
    if (rc != CHAT_OK)
        job_fail_rc(s, j, rc);
}
