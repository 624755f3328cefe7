/*
 * authcache.c - the cluster-wide authentication cache (after Dovecot's auth
 * cache): a legacy user's re-login, for instance on a surviving node after
 * a failover, costs a keyed hash instead of a fresh yescrypt verification.
 *
 * After a password verification succeeded, the node stores
 *     HMAC-SHA256(secret, "chatd-authcache-v1" || uid || len(stored) ||
 *                 stored || password)
 * through the host's key-value store (Redis, key chatd:kv:login:u:<uid>)
 * for auth_cache_ttl seconds.  A later login of that user computes the same
 * HMAC from the password it was sent and the hash the users row holds
 * now; when it equals the cached value (compared in constant time), the
 * slow hash is skipped.  So:
 *   - a wrong password never matches (it would need an HMAC collision);
 *   - the stored yescrypt hash is part of the input: any change of the
 *     users row's hash (a password change, a rehash at a new cost) makes
 *     every cached entry of the user miss, with no explicit invalidation;
 *   - a logout deletes the user's entry (login_ac_forget);
 *   - every node of the cluster shares the secret (config), so an entry
 *     stored on one node is used by all of them.
 * The stored password hashes are unchanged: the cache never writes the
 * users table.  Redis alone gives an attacker nothing without the secret;
 * Redis plus the secret gives, per cached user, an HMAC that can be
 * attacked offline at SHA-256 speed instead of yescrypt speed - the
 * trade-off docs/operations.md spells out.
 *
 * No secret (auth_cache_secret / auth_cache_secret_file), auth_cache_ttl 0,
 * or a host without kv_get (ABI < 1.8): the cache is off and every login
 * hashes.  Redis down: every lookup misses (counted as "error").  The HMAC
 * takes microseconds, so it runs on the loop.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "login.h"

#define AC_SECRET_MIN 32
#define AC_SECRET_MAX 1024
#define AC_TAG "chatd-authcache-v1"

static unsigned char ac_secret[AC_SECRET_MAX];
static size_t ac_secret_len; /* 0: off */

struct ac_lookup {
    unsigned char mac[LOGIN_AC_MAC];
    login_ac_cb cb;
    void *ud;
};

static void ac_wipe_secret(void)
{
    explicit_bzero(ac_secret, sizeof(ac_secret));
    ac_secret_len = 0;
}

/* The secret from the file at path into buf (trailing newlines dropped):
 * its length, or -1 (logged).  Read once per (re)configuration, like
 * chat.conf itself. */
static long ac_read_file(const char *path, unsigned char *buf, size_t cap)
{
    FILE *f = fopen(path, "rb");
    size_t n;

    if (!f) {
        chat_log(login_host, login_self, CHAT_LOG_ERROR,
                 "auth_cache_secret_file %s: cannot open", path);
        return -1;
    }
    n = fread(buf, 1, cap, f);
    fclose(f);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        n--;
    return (long)n;
}

int login_ac_configure(int64_t ttl)
{
    const char *s = login_host->conf_get(login_self, "auth_cache_secret", "");
    const char *path = login_host->conf_get(login_self, "auth_cache_secret_file", "");
    unsigned char buf[AC_SECRET_MAX];
    long n;

    if (ttl <= 0 || (!s[0] && !path[0])) {
        ac_wipe_secret(); /* off */
        return CHAT_OK;
    }
    if (!CHAT_HOST_HAS(login_host, kv_del)) {
        chat_log(login_host, login_self, CHAT_LOG_WARN,
                 "auth cache needs host ABI 1.8 (kv_get): off");
        ac_wipe_secret();
        return CHAT_OK;
    }
    if (path[0]) {
        n = ac_read_file(path, buf, sizeof(buf));
    } else {
        n = (long)(strlen(s) < sizeof(buf) ? strlen(s) : sizeof(buf));
        memcpy(buf, s, (size_t)n);
    }
    if (n >= 0 && n < AC_SECRET_MIN)
        chat_log(login_host, login_self, CHAT_LOG_ERROR,
                 "auth cache secret is %ld bytes; at least %d are needed", n,
                 AC_SECRET_MIN);
    if (n < AC_SECRET_MIN) { /* the previous secret (or none) stays */
        explicit_bzero(buf, sizeof(buf));
        return CHAT_ERR_INVAL;
    }
    ac_wipe_secret();
    memcpy(ac_secret, buf, (size_t)n);
    ac_secret_len = (size_t)n;
    explicit_bzero(buf, sizeof(buf));
    return CHAT_OK;
}

void login_ac_fini(void)
{
    ac_wipe_secret();
}

int login_ac_enabled(void)
{
    return ac_secret_len > 0;
}

int login_ac_mac(int64_t uid, const char *password, size_t pw_len, const char *stored,
                 unsigned char out[LOGIN_AC_MAC])
{
    size_t slen = strlen(stored), tlen = sizeof(AC_TAG) - 1;
    size_t n = tlen + 8 + 4 + slen + pw_len, i;
    unsigned char *buf = login_host->malloc(n);
    unsigned int outlen = LOGIN_AC_MAC;
    int rc = CHAT_ERR_NOMEM;

    if (!buf)
        return rc;
    memcpy(buf, AC_TAG, tlen);
    for (i = 0; i < 8; i++)
        buf[tlen + i] = (unsigned char)((uint64_t)uid >> (56 - 8 * i));
    for (i = 0; i < 4; i++)
        buf[tlen + 8 + i] = (unsigned char)((uint32_t)slen >> (24 - 8 * i));
    memcpy(buf + tlen + 12, stored, slen);
    memcpy(buf + tlen + 12 + slen, password, pw_len);
    rc = HMAC(EVP_sha256(), ac_secret, (int)ac_secret_len, buf, n, out, &outlen) &&
                 outlen == LOGIN_AC_MAC
             ? CHAT_OK
             : CHAT_ERR_IO;
    explicit_bzero(buf, n);
    login_host->free(buf);
    return rc;
}

static void ac_key(int64_t uid, char *key, size_t len)
{
    snprintf(key, len, "u:%" PRId64, uid);
}

static void ac_got(int status, const char *val, size_t len, void *ud)
{
    struct ac_lookup *l = ud;
    int hit = status == CHAT_OK && val && len == LOGIN_AC_MAC &&
              CRYPTO_memcmp(val, l->mac, LOGIN_AC_MAC) == 0;

    login_m_auth_cache(status != CHAT_OK ? LOGIN_AC_ERROR
                                         : hit ? LOGIN_AC_HIT : LOGIN_AC_MISS);
    l->cb(hit, l->ud);
    explicit_bzero(l, sizeof(*l));
    login_host->free(l);
}

int login_ac_check(int64_t uid, const unsigned char mac[LOGIN_AC_MAC], login_ac_cb cb,
                   void *ud)
{
    struct ac_lookup *l;
    char key[32];
    int rc;

    if (!login_ac_enabled())
        return CHAT_ERR_INVAL;
    if (!(l = login_host->malloc(sizeof(*l))))
        return CHAT_ERR_NOMEM;
    memcpy(l->mac, mac, LOGIN_AC_MAC);
    l->cb = cb;
    l->ud = ud;
    ac_key(uid, key, sizeof(key));
    rc = login_host->kv_get(login_self, key, ac_got, l);
    if (rc != CHAT_OK) {
        login_m_auth_cache(LOGIN_AC_ERROR);
        explicit_bzero(l, sizeof(*l));
        login_host->free(l);
    }
    return rc;
}

void login_ac_store(int64_t uid, const unsigned char mac[LOGIN_AC_MAC])
{
    char key[32];

    if (!login_ac_enabled())
        return;
    ac_key(uid, key, sizeof(key));
    if (login_host->kv_set(login_self, key, (const char *)mac, LOGIN_AC_MAC,
                           (uint64_t)login_cfg.auth_cache_ttl * 1000u) == CHAT_OK)
        login_m_auth_cache(LOGIN_AC_STORED);
}

void login_ac_forget(int64_t uid)
{
    char key[32];
    int rc;

    if (!login_ac_enabled())
        return;
    ac_key(uid, key, sizeof(key));
    rc = login_host->kv_del(login_self, key);
    if (rc != CHAT_OK)
        chat_log(login_host, login_self, CHAT_LOG_WARN,
                 "user %" PRId64 ": auth cache entry not deleted (%s); it stays "
                 "usable for up to %" PRId64 " s", uid, login_host->strerror(rc),
                 login_cfg.auth_cache_ttl);
}
