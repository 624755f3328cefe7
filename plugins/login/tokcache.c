/*
 * tokcache.c - resume tokens this node has verified, kept in memory, so that
 * a re-login with a known token costs no database query.
 *
 * The database stays the authority; this is a cache of what it said:
 *   - an entry is stored after a login that used the token succeeded: a
 *     fresh token (password login) or one MariaDB confirmed (token login);
 *   - an entry is used for at most token_cache_ttl seconds after it was
 *     stored, and never past the token's own expiry;
 *   - a logout drops the user's entries here at once, and on every node
 *     once its DELETE has committed (host->broadcast "rev <uid>");
 *   - every drop bumps a generation: a token SELECT that started before a
 *     drop may answer its login but may not store its result, so a SELECT
 *     that raced a logout cannot bring a revoked token back.
 * So a token revoked on another node may still log in here only until the
 * broadcast arrives (milliseconds), or, when Redis is down and the broadcast
 * is lost, until token_cache_ttl has passed.
 *
 * Entries are per user (up to TC_PER_USER tokens: one per device) in a
 * host map; at most token_cache_max users.  A timer sweeps stale entries.
 * Tokens are held as sent (64 hex digits) and wiped when dropped.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "login.h"

#define TC_PER_USER 4

struct tc_tok {
    char hex[LOGIN_TOKEN_HEX];
    int64_t expires;   /* unix seconds: the token's own expiry */
    uint64_t stored;   /* monotonic ms when stored */
};

struct tc_user {
    char *name;        /* may hold NUL */
    size_t name_len;
    size_t n;
    struct tc_tok tok[TC_PER_USER];
};

static struct chat_map *tc_map; /* uid -> struct tc_user * */
static struct chat_timer *tc_sweeper;
static uint64_t tc_generation;

static uint64_t tc_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Equality of two tokens in a time that does not depend on the contents. */
static int tc_equal(const char *a, const char *b)
{
    unsigned char diff = 0;

    for (size_t i = 0; i < LOGIN_TOKEN_HEX; i++)
        diff |= (unsigned char)(a[i] ^ b[i]);
    return diff == 0;
}

static int tc_fresh(const struct tc_tok *t, uint64_t now_ms, int64_t now_s)
{
    return t->expires > now_s &&
           now_ms - t->stored < (uint64_t)login_cfg.token_cache_ttl * 1000u;
}

static void tc_user_free(struct tc_user *u)
{
    explicit_bzero(u->tok, sizeof(u->tok));
    login_host->free(u->name);
    login_host->free(u);
}

static void tc_remove(int64_t uid)
{
    struct tc_user *u = login_host->map_del(tc_map, uid);

    if (u)
        tc_user_free(u);
}

/* Drop the stale tokens of every user, and users left with none. */
static void tc_sweep(void)
{
    uint64_t now_ms = tc_now_ms();
    int64_t now_s = (int64_t)time(NULL), uid;
    size_t it = 0;
    void *v;

    while (login_host->map_next(tc_map, &it, &uid, &v)) {
        struct tc_user *u = v;
        size_t i = 0;

        while (i < u->n) {
            if (tc_fresh(&u->tok[i], now_ms, now_s)) {
                i++;
                continue;
            }
            u->tok[i] = u->tok[--u->n];
            explicit_bzero(&u->tok[u->n], sizeof(u->tok[u->n]));
        }
        if (u->n == 0)
            tc_remove(uid); /* deleting the current entry is allowed */
    }
}

static void tc_clear(void)
{
    size_t it = 0;
    int64_t uid;
    void *v;

    while (login_host->map_next(tc_map, &it, &uid, &v))
        tc_remove(uid);
}

static void tc_sweep_tick(struct chat_timer *t, void *ud)
{
    (void)t;
    (void)ud;
    tc_sweep();
}

/* ------------------------------------------------------------------------ */

int login_tc_init(void)
{
    if (!(tc_map = login_host->map_new()))
        return CHAT_ERR_NOMEM;
    return login_tc_configure();
}

int login_tc_configure(void)
{
    uint64_t ms = (uint64_t)login_cfg.token_cache_ttl * 1000u;

    if (tc_sweeper) {
        login_host->timer_stop(tc_sweeper);
        tc_sweeper = NULL;
    }
    if (login_cfg.token_cache_ttl <= 0) {
        tc_clear();
        return CHAT_OK;
    }
    tc_sweep(); /* a shorter ttl applies to what is there */
    tc_sweeper = login_host->timer_start(login_self, ms, ms, tc_sweep_tick, NULL);
    return tc_sweeper ? CHAT_OK : CHAT_ERR_NOMEM;
}

void login_tc_fini(void)
{
    if (!tc_map)
        return;
    tc_clear();
    login_host->map_free(tc_map);
    tc_map = NULL;
}

uint64_t login_tc_generation(void)
{
    return tc_generation;
}

int login_tc_lookup(int64_t uid, const char *token, const char **name,
                    size_t *name_len, int64_t *expires)
{
    struct tc_user *u;
    uint64_t now_ms;
    int64_t now_s;

    if (login_cfg.token_cache_ttl <= 0 || !(u = login_host->map_get(tc_map, uid)))
        return 0;
    now_ms = tc_now_ms();
    now_s = (int64_t)time(NULL);
    for (size_t i = 0; i < u->n; i++) {
        if (tc_equal(u->tok[i].hex, token) && tc_fresh(&u->tok[i], now_ms, now_s)) {
            *name = u->name;
            *name_len = u->name_len;
            *expires = u->tok[i].expires;
            return 1;
        }
    }
    return 0;
}

void login_tc_store(uint64_t generation, int64_t uid, const char *token,
                    const char *name, size_t name_len, int64_t expires)
{
    struct tc_user *u;
    struct tc_tok *slot = NULL;

    if (login_cfg.token_cache_ttl <= 0 || generation != tc_generation)
        return;
    if (!(u = login_host->map_get(tc_map, uid))) {
        if (login_host->map_len(tc_map) >= login_cfg.token_cache_max) {
            tc_sweep();
            if (login_host->map_len(tc_map) >= login_cfg.token_cache_max) {
                chat_log(login_host, login_self, CHAT_LOG_INFO,
                         "token cache full (%zu users): cleared",
                         login_cfg.token_cache_max);
                tc_clear();
            }
        }
        if (!(u = login_host->malloc(sizeof(*u))))
            return;
        memset(u, 0, sizeof(*u));
        if (!(u->name = login_host->malloc(name_len + 1)) ||
            login_host->map_put(tc_map, uid, u) != CHAT_OK) {
            tc_user_free(u);
            return;
        }
        memcpy(u->name, name, name_len);
        u->name[name_len] = '\0';
        u->name_len = name_len;
    }
    for (size_t i = 0; i < u->n && !slot; i++)
        if (tc_equal(u->tok[i].hex, token))
            slot = &u->tok[i];
    if (!slot && u->n < TC_PER_USER)
        slot = &u->tok[u->n++];
    if (!slot) { /* full: the one stored longest ago makes room */
        slot = &u->tok[0];
        for (size_t i = 1; i < u->n; i++)
            if (u->tok[i].stored < slot->stored)
                slot = &u->tok[i];
    }
    memcpy(slot->hex, token, LOGIN_TOKEN_HEX);
    slot->expires = expires;
    slot->stored = tc_now_ms();
}

void login_tc_drop(int64_t uid, const char *token)
{
    struct tc_user *u;

    tc_generation++;
    if (!(u = login_host->map_get(tc_map, uid)))
        return;
    if (!token) {
        tc_remove(uid);
        return;
    }
    for (size_t i = 0; i < u->n; i++) {
        if (tc_equal(u->tok[i].hex, token)) {
            u->tok[i] = u->tok[--u->n];
            explicit_bzero(&u->tok[u->n], sizeof(u->tok[u->n]));
            break;
        }
    }
    if (u->n == 0)
        tc_remove(uid);
}

void login_tc_revoke_everywhere(int64_t uid)
{
    char msg[32];
    int n = snprintf(msg, sizeof(msg), "rev %" PRId64, uid);

    login_tc_drop(uid, NULL);
    if (login_host->broadcast(login_self, msg, (size_t)n) != CHAT_OK)
        chat_log(login_host, login_self, CHAT_LOG_WARN,
                 "user %" PRId64 ": token revocation not broadcast; other nodes "
                 "may accept a cached token for up to %" PRId64 " s", uid,
                 login_cfg.token_cache_ttl);
}

void login_tc_on_broadcast(int event, const void *arg, void *ud)
{
    const struct chat_ev_broadcast *ev = arg;
    char buf[32];
    long long uid;

    (void)event;
    (void)ud;
    if (ev->len < 5 || ev->len >= sizeof(buf) || memcmp(ev->data, "rev ", 4) != 0)
        return;
    memcpy(buf, ev->data, ev->len);
    buf[ev->len] = '\0';
    uid = strtoll(buf + 4, NULL, 10);
    if (uid > 0)
        login_tc_drop((int64_t)uid, NULL);
}
