/*
 * login.c - the login plugin: accounts and sessions (REG_MSG, LOGIN_MSG,
 * LOGINOUT_MSG).
 *
 * This file holds the plugin's entry, its settings, registration, logout
 * and the purge of expired resume tokens; auth.c does LOGIN_MSG and
 * pwhash.c the password hashing.  Every step that waits (hashing, the
 * database) continues in a callback that looks its session up again by id,
 * because the client may be gone by then.
 *
 * One registration is in flight per connection (as auth.c does for LOGIN),
 * and the hash queue in pwhash.c is fair between client addresses, so a
 * client flooding REG_MSG slows only itself.
 *
 * Legacy sessions get exactly the seed's replies: REG_MSG_ACK
 * {"msgid":5,"errno":0,"id":N} or {"msgid":5,"errno":1}, no reply to
 * LOGINOUT_MSG.  Protocol-2 sessions get one reply per request through
 * host->reply(), with the protocol-2 error codes of plugin.h.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "login.h"

const struct chat_host *login_host;
struct chat_plugin *login_self;
struct login_conf login_cfg;

static struct chat_timer *purge_timer;

#define PURGE_BATCH 1000 /* rows per purge statement */

/* ------------------------------------------------------------------------ */
/* Helpers shared with auth.c */

int login_req_str(const struct chat_request *req, const char *key,
                  const char **p, size_t *len)
{
    *p = login_host->req_field_str(req, key, len);
    return *p ? 0 : -1;
}

int login_is_p2(const struct chat_session *s)
{
    return login_host->session_proto(s) == CHAT_PROTO_2;
}

void login_fail(struct chat_session *s, const struct chat_ack *ack, int p2_errno,
                const char *errmsg, int legacy_errno, const char *legacy_msg)
{
    cJSON *o;

    if (login_is_p2(s)) {
        login_host->reply(s, ack, p2_errno, errmsg, NULL);
        return;
    }
    o = cJSON_CreateObject();
    if (!o || !cJSON_AddNumberToObject(o, "msgid", CHAT_MSG_LOGIN_ACK) ||
        !cJSON_AddNumberToObject(o, "errno", legacy_errno) ||
        !cJSON_AddStringToObject(o, "errmsg", legacy_msg ? legacy_msg : errmsg)) {
        chat_log(login_host, login_self, CHAT_LOG_ERROR, "out of memory");
        cJSON_Delete(o);
        return;
    }
    login_host->send_json(s, o);
    cJSON_Delete(o);
}

static void revoke_done(const struct chat_db_result *r, void *ud)
{
    (void)ud;
    if (login_host->db_error(r) != CHAT_OK)
        chat_log(login_host, login_self, CHAT_LOG_ERROR,
                 "revoking a resume token failed: %s", login_host->db_errmsg(r));
}

int login_bucket_take(struct login_bucket *b, double rate, double burst)
{
    struct timespec ts;
    double now;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    now = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    b->tokens = b->at > 0 ? b->tokens + rate * (now - b->at) : burst;
    b->at = now;
    if (b->tokens > burst)
        b->tokens = burst;
    if (b->tokens < 1)
        return 0;
    b->tokens -= 1;
    return 1;
}

/* login_rate: a bucket of a quarter second's worth (at least one). */
int login_rate_admit(void)
{
    static struct login_bucket bucket;
    double rate = (double)login_cfg.login_rate;

    if (login_cfg.login_rate <= 0)
        return CHAT_OK;
    return login_bucket_take(&bucket, rate, rate / 4 < 1 ? 1 : rate / 4)
               ? CHAT_OK : CHAT_ERR_BUSY;
}

void login_token_revoke(int64_t uid, const char *token_hex)
{
    login_tc_drop(uid, token_hex);
    struct chat_db_param p = CHAT_DB_P_STR(token_hex, strlen(token_hex));
    int rc = login_host->db_query(login_self,
        "DELETE FROM resume_tokens WHERE token_hash = UNHEX(SHA2(?, 256))",
        &p, 1, revoke_done, NULL);

    if (rc != CHAT_OK)
        chat_log(login_host, login_self, CHAT_LOG_ERROR,
                 "revoking a resume token failed: %s", login_host->strerror(rc));
}

/* ------------------------------------------------------------------------ */
/* REG_MSG */

struct reg_job {
    struct reg_job *next; /* chain of the in-flight set */
    uint64_t sid;
    struct chat_ack ack;
    char *name;       /* bytes, may hold NUL */
    size_t name_len;
};

/* Registrations in flight by session id: one at a time per connection, as
 * for LOGIN, so one connection cannot queue more than one hash. */
#define REG_BUCKETS 256
static struct reg_job *reg_pend[REG_BUCKETS];

static int reg_in_flight(uint64_t sid)
{
    struct reg_job *j;

    for (j = reg_pend[sid % REG_BUCKETS]; j; j = j->next)
        if (j->sid == sid)
            return 1;
    return 0;
}

static void reg_free(struct reg_job *j)
{
    struct reg_job **pp;

    for (pp = &reg_pend[j->sid % REG_BUCKETS]; *pp; pp = &(*pp)->next)
        if (*pp == j) {
            *pp = j->next;
            break;
        }
    login_host->free(j->name);
    login_host->free(j);
}

/* The legacy REG_MSG_ACK: exactly the seed's two shapes. */
static void reg_legacy(struct chat_session *s, int64_t id)
{
    char buf[80];
    int n;

    if (id > 0)
        n = snprintf(buf, sizeof(buf), "{\"msgid\":%d,\"errno\":0,\"id\":%" PRId64 "}",
                     CHAT_MSG_REG_ACK, id);
    else
        n = snprintf(buf, sizeof(buf), "{\"msgid\":%d,\"errno\":1}", CHAT_MSG_REG_ACK);
    login_host->send_raw(s, buf, (size_t)n);
}

static void reg_fail(struct chat_session *s, const struct chat_ack *ack,
                     int p2_errno, const char *errmsg)
{
    login_m_reg(p2_errno);
    if (login_is_p2(s))
        login_host->reply(s, ack, p2_errno, errmsg, NULL);
    else
        reg_legacy(s, 0);
}

static void reg_inserted(const struct chat_db_result *r, void *ud)
{
    struct reg_job *j = ud;
    struct chat_session *s = login_host->session_get(j->sid);
    int64_t id;
    cJSON *body;
    char idbuf[24];

    if (login_host->db_error(r) != CHAT_OK) {
        if (login_host->db_errno(r) == 1062) {
            if (s)
                reg_fail(s, &j->ack, 1, "name is already taken");
        } else {
            chat_log(login_host, login_self, CHAT_LOG_ERROR,
                     "register: insert failed: %s", login_host->db_errmsg(r));
            if (s)
                reg_fail(s, &j->ack, CHAT_E_INTERNAL, "internal error, try again");
        }
        goto out;
    }
    id = (int64_t)login_host->db_insert_id(r);
    login_m_reg(CHAT_E_OK);
    chat_log(login_host, login_self, CHAT_LOG_INFO, "registered user %" PRId64, id);
    if (!s)
        goto out;
    if (!login_is_p2(s)) {
        reg_legacy(s, id);
        goto out;
    }
    snprintf(idbuf, sizeof(idbuf), "%" PRId64, id);
    body = cJSON_CreateObject();
    if (!body || !cJSON_AddRawToObject(body, "id", idbuf)) {
        cJSON_Delete(body);
        login_host->reply(s, &j->ack, CHAT_E_INTERNAL, "out of memory", NULL);
        goto out;
    }
    login_host->reply(s, &j->ack, CHAT_E_OK, NULL, body);
    cJSON_Delete(body);
out:
    reg_free(j);
}

static void reg_hashed(int status, int match, const char *hash, void *ud)
{
    struct reg_job *j = ud;
    struct chat_session *s = login_host->session_get(j->sid);
    struct chat_db_param p[2];
    int rc;

    (void)match;
    if (!s) /* nobody would learn the new id: do not create the account */
        goto out;
    if (status == CHAT_ERR_BUSY) { /* pushed out of a full queue */
        reg_fail(s, &j->ack, CHAT_E_UNAVAILABLE, "server busy, try again later");
        goto out;
    }
    if (status != CHAT_OK) {
        reg_fail(s, &j->ack, status == CHAT_ERR_CLOSED ? CHAT_E_UNAVAILABLE
                                                       : CHAT_E_INTERNAL,
                 "internal error, try again");
        goto out;
    }
    p[0] = CHAT_DB_P_STR(j->name, j->name_len);
    p[1] = CHAT_DB_P_STR(hash, strlen(hash));
    rc = login_host->db_query(login_self,
                              "INSERT INTO users (name, pwhash) VALUES (?, ?)",
                              p, 2, reg_inserted, j);
    if (rc == CHAT_OK)
        return;
    reg_fail(s, &j->ack, CHAT_E_UNAVAILABLE, "database unavailable, try again");
out:
    reg_free(j);
}

static void handle_reg(struct chat_session *s, const struct chat_request *req,
                       void *ud)
{
    const char *name, *pw;
    size_t name_len, pw_len;
    char msg[96];
    struct reg_job *j;
    struct login_addr from;
    int rc;

    (void)ud;
    if (reg_in_flight(login_host->session_id(s))) {
        reg_fail(s, &req->ack, CHAT_E_LIMIT,
                 "a registration is already in progress on this connection");
        return;
    }
    if (login_req_str(req, "name", &name, &name_len) || name_len == 0) {
        reg_fail(s, &req->ack, CHAT_E_BAD_FIELD, "name must be a non-empty string");
        return;
    }
    if (login_req_str(req, "password", &pw, &pw_len)) {
        reg_fail(s, &req->ack, CHAT_E_BAD_FIELD, "password must be a string");
        return;
    }
    if (name_len > login_cfg.name_max) {
        snprintf(msg, sizeof(msg), "name is longer than %zu bytes", login_cfg.name_max);
        reg_fail(s, &req->ack, CHAT_E_TOO_LONG, msg);
        return;
    }
    if (pw_len > login_cfg.password_max) {
        snprintf(msg, sizeof(msg), "password is longer than %zu bytes",
                 login_cfg.password_max);
        reg_fail(s, &req->ack, CHAT_E_TOO_LONG, msg);
        return;
    }
    if (pw_len < login_cfg.password_min) {
        snprintf(msg, sizeof(msg), "password is too short (at least %zu bytes)",
                 login_cfg.password_min);
        reg_fail(s, &req->ack, CHAT_E_BAD_FIELD, msg);
        return;
    }
    if (memchr(pw, '\0', pw_len)) {
        reg_fail(s, &req->ack, CHAT_E_BAD_FIELD, "password must not contain NUL");
        return;
    }
    j = login_host->malloc(sizeof(*j));
    if (!j || !(j->name = login_host->malloc(name_len + 1))) {
        login_host->free(j);
        reg_fail(s, &req->ack, CHAT_E_INTERNAL, "out of memory");
        return;
    }
    memcpy(j->name, name, name_len + 1);
    j->name_len = name_len;
    j->sid = login_host->session_id(s);
    j->ack = req->ack;
    j->next = reg_pend[j->sid % REG_BUCKETS];
    reg_pend[j->sid % REG_BUCKETS] = j;
    login_addr_of(s, &from);
    rc = login_pw_admit();
    if (rc == CHAT_OK)
        rc = login_pw_hash(pw, pw_len, &from, reg_hashed, j);
    if (rc != CHAT_OK) {
        reg_free(j);
        if (rc == LOGIN_ERR_LIMIT)
            reg_fail(s, &req->ack, CHAT_E_LIMIT, "too many registrations in "
                     "progress from your address, try again shortly");
        else
            reg_fail(s, &req->ack, CHAT_E_UNAVAILABLE, "server busy, try again later");
    }
}

/* ------------------------------------------------------------------------ */
/* Per-device resume tokens (multi_login = multi).  A device's logout must
 * not end the others' tokens: each session's token is remembered here
 * (about 80 bytes a device) until its session closes.  After a hot reload
 * the new instance starts empty: a device logged in before then revokes no
 * token at logout (its token expires with resume_ttl). */

static struct chat_map *dev_tokens;

void login_dev_token_set(uint64_t sid, const char *token_hex)
{
    char *t;

    if (!dev_tokens && !(dev_tokens = login_host->map_new()))
        return;
    if (!(t = login_host->strdup(token_hex)))
        return;
    login_host->free(login_host->map_del(dev_tokens, (int64_t)sid));
    if (login_host->map_put(dev_tokens, (int64_t)sid, t) != CHAT_OK)
        login_host->free(t);
}

/* The session's token (the caller frees it), or NULL. */
static char *dev_token_take(uint64_t sid)
{
    return dev_tokens ? login_host->map_del(dev_tokens, (int64_t)sid) : NULL;
}

static void dev_on_close(int event, const void *arg, void *ud)
{
    const struct chat_ev_session *ev = arg;

    (void)event;
    (void)ud;
    if (dev_tokens && ev->session)
        login_host->free(dev_token_take(login_host->session_id(ev->session)));
}

static void dev_tokens_fini(void)
{
    chat_map_free_values(login_host, &dev_tokens);
}

/* ------------------------------------------------------------------------ */
/* LOGINOUT_MSG */

struct logout_job {
    uint64_t sid;
    struct chat_ack ack;
    int64_t uid;
};

static void logout_revoked(const struct chat_db_result *r, void *ud)
{
    struct logout_job *j = ud;
    struct chat_session *s = login_host->session_get(j->sid);
    int ok = login_host->db_error(r) == CHAT_OK;

    if (!ok)
        chat_log(login_host, login_self, CHAT_LOG_ERROR,
                 "logout of user %" PRId64 ": revoking resume tokens failed: %s",
                 j->uid, login_host->db_errmsg(r));
    if (s)
        login_host->reply(s, &j->ack, ok ? CHAT_E_OK : CHAT_E_INTERNAL,
                          ok ? NULL : "logged out, but resume tokens were not revoked",
                          NULL);
    /* now that the rows are gone, no node may trust its cached copy */
    login_tc_revoke_everywhere(j->uid);
    login_host->free(j);
}

/* multi_login = multi: one device of several logs out; only its own
 * token dies (before the ack, as below). */
static void handle_logout_device(struct chat_session *s,
                                 const struct chat_request *req, int64_t uid)
{
    char *tok = dev_token_take(login_host->session_id(s));
    struct logout_job *j = NULL;
    struct chat_db_param p;
    int rc = login_host->session_logout(s);

    if (rc != CHAT_OK) {
        login_host->reply(s, &req->ack, CHAT_E_INTERNAL, "logout failed", NULL);
        goto out;
    }
    if (!tok) { /* none given to this device (or not since a reload) */
        login_host->reply(s, &req->ack, CHAT_E_OK, NULL, NULL);
        goto out;
    }
    login_tc_drop(uid, tok);
    if (!(j = login_host->malloc(sizeof(*j)))) {
        login_host->reply(s, &req->ack, CHAT_E_INTERNAL,
                          "logged out, but the resume token was not revoked", NULL);
        goto out;
    }
    j->sid = login_host->session_id(s);
    j->ack = req->ack;
    j->uid = uid;
    p = CHAT_DB_P_STR(tok, strlen(tok));
    rc = login_host->db_query(login_self,
        "DELETE FROM resume_tokens WHERE token_hash = UNHEX(SHA2(?, 256))",
        &p, 1, logout_revoked, j);
    if (rc != CHAT_OK) {
        login_host->reply(s, &req->ack, CHAT_E_INTERNAL,
                          "logged out, but the resume token was not revoked", NULL);
        login_host->free(j);
    }
out:
    login_host->free(tok);
}

static void handle_logout(struct chat_session *s, const struct chat_request *req,
                          void *ud)
{
    int64_t uid = login_host->req_auth(s, req);
    struct logout_job *j;
    struct chat_db_param p;
    int rc;

    (void)ud;
    if (!uid)
        return; /* answered by req_auth */
    if (login_cfg.multi) {
        handle_logout_device(s, req, uid);
        return;
    }
    rc = login_host->session_logout(s);
    if (rc != CHAT_OK) {
        chat_log(login_host, login_self, CHAT_LOG_WARN, "logout of user %" PRId64
                 ": %s", uid, login_host->strerror(rc));
        login_host->reply(s, &req->ack, CHAT_E_INTERNAL, "logout failed", NULL);
        return;
    }
    /* Tokens are revoked before the protocol-2 ack, so a client that got
     * the ack can rely on its token being dead. */
    login_tc_drop(uid, NULL);
    login_ac_forget(uid); /* the next login of uid hashes again */
    j = login_host->malloc(sizeof(*j));
    if (!j) {
        login_host->reply(s, &req->ack, CHAT_E_INTERNAL,
                          "logged out, but resume tokens were not revoked", NULL);
        return;
    }
    j->sid = login_host->session_id(s);
    j->ack = req->ack;
    j->uid = uid;
    p = CHAT_DB_P_INT(uid);
    rc = login_host->db_query(login_self,
                              "DELETE FROM resume_tokens WHERE user_id = ?",
                              &p, 1, logout_revoked, j);
    if (rc != CHAT_OK) {
        chat_log(login_host, login_self, CHAT_LOG_ERROR,
                 "logout of user %" PRId64 ": revoking resume tokens failed: %s",
                 uid, login_host->strerror(rc));
        login_host->reply(s, &req->ack, CHAT_E_INTERNAL,
                          "logged out, but resume tokens were not revoked", NULL);
        login_host->free(j);
    }
}

/* ------------------------------------------------------------------------ */
/* Purge of expired resume tokens: a bounded DELETE every purge_interval,
 * repeated at once while it keeps finding a full batch. */

static void purge_run(void);

static void purge_done(const struct chat_db_result *r, void *ud)
{
    uint64_t n;

    (void)ud;
    if (login_host->db_error(r) != CHAT_OK) {
        chat_log(login_host, login_self, CHAT_LOG_WARN,
                 "purging expired resume tokens failed: %s", login_host->db_errmsg(r));
        return;
    }
    n = login_host->db_affected(r);
    if (n)
        chat_log(login_host, login_self, CHAT_LOG_DEBUG,
                 "purged %" PRIu64 " expired resume tokens", n);
    if (n >= PURGE_BATCH)
        purge_run();
}

static void purge_run(void)
{
    static const char sql[] =
        "DELETE FROM resume_tokens WHERE expires_at < UTC_TIMESTAMP() LIMIT 1000";
    int rc = login_host->db_query(login_self, sql, NULL, 0, purge_done, NULL);

    if (rc != CHAT_OK)
        chat_log(login_host, login_self, CHAT_LOG_WARN,
                 "purging expired resume tokens failed: %s", login_host->strerror(rc));
}

static void purge_tick(struct chat_timer *t, void *ud)
{
    (void)t;
    (void)ud;
    purge_run();
}

static int purge_schedule(void)
{
    uint64_t ms = (uint64_t)login_cfg.purge_interval_s * 1000u;

    if (purge_timer) {
        login_host->timer_stop(purge_timer);
        purge_timer = NULL;
    }
    if (login_cfg.purge_interval_s <= 0)
        return CHAT_OK;
    purge_timer = login_host->timer_start(login_self, ms, ms, purge_tick, NULL);
    return purge_timer ? CHAT_OK : CHAT_ERR_NOMEM;
}

/* ------------------------------------------------------------------------ */
/* Settings */

static int64_t conf_range(const char *key, int64_t def, int64_t lo, int64_t hi)
{
    return chat_conf_range(login_host, login_self, key, def, lo, hi);
}

static long default_hash_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 2 ? n - 1 : 1;
}

static int load_conf(void)
{
    const char *ml = login_host->conf_get(login_self, "multi_login", "refuse");
    struct login_conf c;

    memset(&c, 0, sizeof(c));
    if (strcmp(ml, "replace") == 0) {
        c.replace = 1;
    } else if (strcmp(ml, "multi") == 0) {
        c.multi = 1;
    } else if (strcmp(ml, "refuse") != 0) {
        chat_log(login_host, login_self, CHAT_LOG_ERROR,
                 "multi_login = %s: expected refuse, replace or multi", ml);
        return CHAT_ERR_INVAL;
    }
    if (c.multi && !CHAT_HOST_HAS(login_host, session_next_device)) {
        chat_log(login_host, login_self, CHAT_LOG_ERROR,
                 "multi_login = multi needs host ABI 1.9 (multi-device)");
        return CHAT_ERR_INVAL;
    }
    c.devices_max = (int)conf_range("devices_max", 10, 1, 32767);
    /* users.name is VARBINARY(255) */
    c.name_max = (size_t)conf_range("name_max", 64, 1, 255);
    c.password_min = (size_t)conf_range("password_min", 1, 0, 4096);
    c.password_max = (size_t)conf_range("password_max", 128, 1, 4096);
    if (c.password_min > c.password_max) {
        chat_log(login_host, login_self, CHAT_LOG_ERROR,
                 "password_min %zu > password_max %zu", c.password_min,
                 c.password_max);
        return CHAT_ERR_INVAL;
    }
    c.resume_ttl = conf_range("resume_ttl", 604800, 0, INT64_C(315360000));
    c.hash_cost = (unsigned long)conf_range("hash_cost", 0, 0, 11);
    c.purge_interval_s = conf_range("resume_purge_interval", 3600, 0, 86400 * 7);
    c.hash_queue_max = (size_t)conf_range("hash_queue_max", 256, 0, 1000000);
    /* one core is left to the event loop: hashing never starves chat */
    c.hash_threads = (size_t)conf_range("hash_threads", default_hash_threads(), 1, 256);
    /* one client address (IPv6: its /64) never holds more of the queue */
    c.hash_per_address = (size_t)conf_range("hash_per_address", 32, 0, 1000000);
    /* optionally only a share of those threads' time (100: all of it) */
    c.hash_budget = (long)conf_range("hash_budget", 100, 1, 100);
    c.login_rate = conf_range("login_rate", 0, 0, 1000000);
    c.login_queue_max = (size_t)conf_range("login_queue_max", 0, 0, 1000000);
    c.token_cache_ttl = conf_range("token_cache_ttl", 60, 0, 86400);
    c.token_cache_max = (size_t)conf_range("token_cache_max", 100000, 1, 100000000);
    /* used only with a secret (auth_cache_secret[_file]); see authcache.c */
    c.auth_cache_ttl = conf_range("auth_cache_ttl", 3600, 0, 86400 * 30);
    if (login_ac_configure(c.auth_cache_ttl) != CHAT_OK)
        return CHAT_ERR_INVAL;
    login_cfg = c;
    chat_log(login_host, login_self, CHAT_LOG_INFO,
             "multi_login=%s name_max=%zu password=%zu..%zu resume_ttl=%" PRId64
             "s hash_cost=%lu hash_threads=%zu hash_per_address=%zu hash_budget=%ld%% "
             "login_rate=%" PRId64 "/s login_queue_max=%zu token_cache_ttl=%" PRId64 "s auth_cache=%s",
             c.multi ? "multi" : c.replace ? "replace" : "refuse", c.name_max, c.password_min,
             c.password_max, c.resume_ttl, c.hash_cost, c.hash_threads,
             c.hash_per_address, c.hash_budget, c.login_rate, c.login_queue_max, c.token_cache_ttl,
             login_ac_enabled() ? "on" : "off");
    return CHAT_OK;
}

/* ------------------------------------------------------------------------ */
/* Entry points */

static int login_init(const struct chat_host *host, struct chat_plugin *self,
                      void **state)
{
    int rc;

    login_host = host;
    login_self = self;
    *state = NULL;
    CHAT_HOST_REQUIRE(host, self, map_next); /* and login_ack_begin (1.2) */
    rc = load_conf();
    if (rc != CHAT_OK)
        return rc;
    login_m_init();
    rc = login_auth_init();
    if (rc != CHAT_OK)
        return rc;
    if ((rc = login_tc_init()) != CHAT_OK ||
        (rc = host->register_hook(self, CHAT_EV_BROADCAST, login_tc_on_broadcast, NULL)) ||
        (rc = host->register_hook(self, CHAT_EV_SESSION_CLOSE, dev_on_close, NULL)) ||
        (rc = host->register_handler(self, CHAT_MSG_REG, handle_reg, NULL)) ||
        (rc = host->register_handler(self, CHAT_MSG_LOGIN, login_handle_login, NULL)) ||
        (rc = host->register_handler(self, CHAT_MSG_LOGOUT, handle_logout, NULL)) ||
        (rc = purge_schedule())) {
        login_tc_fini(); /* no fini after a failed init */
        return rc;
    }
    return CHAT_OK;
}

static void login_fini(void *state)
{
    (void)state; /* fini runs after the instance drained: nothing is pending */
    login_auth_fini();
    login_tc_fini();
    login_ac_fini();
    dev_tokens_fini();
}

static int login_reconfigure(void *state)
{
    struct login_conf old = login_cfg;
    int rc;

    (void)state;
    rc = load_conf();
    if (rc != CHAT_OK)
        return rc; /* the previous settings stay */
    if (old.hash_cost != login_cfg.hash_cost && (rc = login_auth_init()) != CHAT_OK)
        return rc;
    if (old.token_cache_ttl != login_cfg.token_cache_ttl &&
        (rc = login_tc_configure()) != CHAT_OK)
        return rc;
    if (old.purge_interval_s != login_cfg.purge_interval_s)
        return purge_schedule();
    return CHAT_OK;
}

static const struct chat_plugin_desc login_desc = {
    CHAT_PLUGIN_DESC_INIT("login", "1.0.0"),
    .init = login_init,
    .fini = login_fini,
    .reconfigure = login_reconfigure,
};

CHAT_PLUGIN_DECLARE(login_desc)
