/*
 * login.h - what the files of the login plugin share.  Private to the
 * plugin: nothing here is exported (the .so is built with hidden
 * visibility and exports only chat_plugin_entry).
 *
 *   login.c   init/fini/reconfigure, settings, REG_MSG, LOGINOUT_MSG, the
 *             expired-token purge, reply helpers
 *   auth.c    LOGIN_MSG: password and resume-token logins, session binding,
 *             the login ack
 *   pwhash.c  yescrypt hashing and verification on the host's worker threads
 *   metrics.c the plugin's Prometheus metrics (host ABI 1.6)
 *   authcache.c the cluster-wide authentication cache (host ABI 1.8 kv_*)
 */
#ifndef LOGIN_H
#define LOGIN_H

#include <stddef.h>
#include <stdint.h>

#include "chat/plugin.h"

/* Settings of [plugin.login], parsed once per (re)configuration. */
struct login_conf {
    int replace;               /* multi_login = replace */
    int multi;                 /* multi_login = multi (several devices) */
    int devices_max;           /* multi: devices per user, cluster-wide */
    size_t name_max;           /* bytes */
    size_t password_min;       /* bytes */
    size_t password_max;       /* bytes */
    int64_t resume_ttl;        /* seconds; 0 disables resume tokens */
    unsigned long hash_cost;   /* yescrypt cost 1..11; 0 = libcrypt default */
    int64_t purge_interval_s;  /* expired-token purge period */
    size_t hash_queue_max;     /* hashing jobs queued or running at once */
    size_t hash_threads;       /* hashing jobs running at once */
    size_t hash_per_address;   /* jobs queued or running per client address */
    long hash_budget;          /* % of the hashing threads' CPU; 100 = none */
    int64_t login_rate;        /* logins admitted per second; 0 = no limit */
    size_t login_queue_max;    /* logins over login_rate that wait; 0 = refuse */
    int64_t token_cache_ttl;   /* seconds a verified token is trusted; 0 = off */
    size_t token_cache_max;    /* users with cached tokens */
    int64_t auth_cache_ttl;    /* seconds a verified password is cached; 0 = off */
};

/* Set in init; per instance (each load is a private copy of the .so). */
extern const struct chat_host *login_host;
extern struct chat_plugin *login_self;
extern struct login_conf login_cfg;

/* The seed's LOGIN_MSG_ACK messages. */
#define LOGIN_ERRMSG_INVALID "id or password is invalid!"
#define LOGIN_ERRMSG_IN_USE "this account is using, input another!"
/* multi_login = multi: the user has devices_max devices online already
 * (protocol 2 and legacy login ack alike, as errno 2 above) */
#define LOGIN_E_TOO_MANY_DEVICES 127
/* multi_login = multi: the resume token each device logged in with or was
 * given (session id -> copy), so that its logout revokes that one only. */
void login_dev_token_set(uint64_t sid, const char *token_hex);
#define LOGIN_ERRMSG_TOO_MANY_DEVICES "too many devices"

/* Resume tokens: 32 random bytes as 64 lowercase hex digits. */
#define LOGIN_TOKEN_HEX 64

/* ---- login.c ----------------------------------------------------------- */
/* Read string member key of req: 0 and *p, *len (borrowed, NUL-safe) when it
 * is a string, -1 when absent or of another type. */
int login_req_str(const struct chat_request *req, const char *key,
                  const char **p, size_t *len);
/* 1 when s speaks protocol 2. */
int login_is_p2(const struct chat_session *s);
/* Send the failure of a LOGIN_MSG: protocol 2 gets errno p2_errno with
 * errmsg; a legacy session gets the seed's {"msgid":2,"errno":legacy_errno,
 * "errmsg":legacy_msg} (legacy_msg NULL: errmsg). */
void login_fail(struct chat_session *s, const struct chat_ack *ack, int p2_errno,
                const char *errmsg, int legacy_errno, const char *legacy_msg);
/* A token bucket: up to burst tokens, refilled at rate per second. */
struct login_bucket {
    double tokens;
    double at; /* monotonic seconds of the last refill; 0: never used */
};
/* Take one token: 1, or 0 when the bucket is empty. */
int login_bucket_take(struct login_bucket *b, double rate, double burst);
/* Admission of one LOGIN_MSG under login_rate: CHAT_OK or CHAT_ERR_BUSY. */
int login_rate_admit(void);
/* Revoke one resume token of uid, never handed out (fire and forget;
 * failures are logged). */
void login_token_revoke(int64_t uid, const char *token_hex);

/* ---- auth.c ------------------------------------------------------------ */
void login_handle_login(struct chat_session *s, const struct chat_request *req,
                        void *ud);
/* (Re)compute the stand-in hash used for unknown ids, with the current
 * hash_cost; CHAT_OK or an error.  Called from init and reconfigure. */
int login_auth_init(void);
void login_auth_fini(void); /* frees the logins still queued */

/* ---- tokcache.c: verified resume tokens in memory ---------------------- */
int login_tc_init(void);      /* init: CHAT_OK or CHAT_ERR_NOMEM */
int login_tc_configure(void); /* after the settings changed */
void login_tc_fini(void);
/* The current generation: read it before a token SELECT, pass it to
 * login_tc_store; a drop in between makes the store a no-op. */
uint64_t login_tc_generation(void);
/* 1 and the user's name (borrowed until the next call into this cache) and
 * the token's expiry when token (LOGIN_TOKEN_HEX digits) of uid is cached
 * and fresh; else 0. */
int login_tc_lookup(int64_t uid, const char *token, const char **name,
                    size_t *name_len, int64_t *expires);
/* Remember that token of uid logged in (name and expiry copied). */
void login_tc_store(uint64_t generation, int64_t uid, const char *token,
                    const char *name, size_t name_len, int64_t expires);
/* Forget one token of uid (token NULL: all of them), on this node. */
void login_tc_drop(int64_t uid, const char *token);
/* Forget all tokens of uid here and, through the bus, on every node. */
void login_tc_revoke_everywhere(int64_t uid);
/* The CHAT_EV_BROADCAST hook ("rev <uid>" from another node). */
void login_tc_on_broadcast(int event, const void *arg, void *ud);

/* ---- pwhash.c ---------------------------------------------------------- */
/* A client address as the hashing queue counts it: IPv4 as ::ffff:a.b.c.d,
 * IPv6 cut to its /64. */
struct login_addr {
    unsigned char b[16];
};
/* The address of s: 0, or -1 when unknown (then all zeros: such clients
 * share one entry). */
int login_addr_of(const struct chat_session *s, struct login_addr *a);

/* Returned by login_pw_hash/verify when the client's address already holds
 * hash_per_address jobs (plugin-private; never crosses the ABI). */
#define LOGIN_ERR_LIMIT (-100)

/* Completion of a hashing job, on the loop thread.  status: CHAT_OK, or an
 * error (the hash could not be computed; match is 0, hash NULL).  For a new
 * hash, hash is the "$y$..." string (borrowed for the call); for a
 * verification, match is 1 when the password matches. */
typedef void (*login_pw_cb)(int status, int match, const char *hash, void *ud);

/* Hash password[0..len) with a fresh yescrypt salt of cost login_cfg.hash_cost,
 * for a client at from.  The password is copied (and wiped after use).
 * Returns CHAT_OK and later calls cb once, or an error and never calls cb:
 * LOGIN_ERR_LIMIT (from holds hash_per_address jobs), CHAT_ERR_BUSY (the
 * queue is full of jobs of addresses holding no more than from).  A job
 * already queued may still end with status CHAT_ERR_BUSY when a client of a
 * lighter address pushed it out of a full queue. */
int login_pw_hash(const char *password, size_t len, const struct login_addr *from,
                  login_pw_cb cb, void *ud);
/* Verify password against stored (a crypt(3) hash string, copied), comparing
 * in constant time.  Same return and callback rules as login_pw_hash. */
int login_pw_verify(const char *password, size_t len, const char *stored,
                    const struct login_addr *from, login_pw_cb cb, void *ud);
/* Admission to hashing under the CPU budget (hash_budget): CHAT_OK and one
 * hash's worth of budget taken, or CHAT_ERR_BUSY.  Call once per login or
 * registration, before any other work for it. */
int login_pw_admit(void);
/* A "$y$" setting usable as a stand-in hash (for unknown user ids), written
 * to out; CHAT_OK or CHAT_ERR_IO.  Cheap (no hashing): call on the loop. */
int login_pw_dummy(char *out, size_t outlen);

/* ---- authcache.c: verified passwords, cluster-wide --------------------- */
#define LOGIN_AC_MAC 32 /* HMAC-SHA256 */
/* Read the secret (auth_cache_secret or auth_cache_secret_file) for the
 * settings about to apply (ttl: their auth_cache_ttl): CHAT_OK (cache on,
 * or off without a secret or with ttl 0) or an error (a secret too short, a
 * file unreadable; logged), and then the previous secret stays. */
int login_ac_configure(int64_t ttl);
void login_ac_fini(void);
int login_ac_enabled(void);
/* The HMAC of (uid, password, stored hash) into out: CHAT_OK or an error. */
int login_ac_mac(int64_t uid, const char *password, size_t pw_len, const char *stored,
                 unsigned char out[LOGIN_AC_MAC]);
/* hit: 1 when the cached HMAC of uid equals mac; 0 on a miss or an error. */
typedef void (*login_ac_cb)(int hit, void *ud);
/* Look uid's entry up: CHAT_OK and later cb once (never inside the call),
 * or an error and cb never runs (mac is copied). */
int login_ac_check(int64_t uid, const unsigned char mac[LOGIN_AC_MAC], login_ac_cb cb,
                   void *ud);
/* After a successful slow verification: remember mac for auth_cache_ttl. */
void login_ac_store(int64_t uid, const unsigned char mac[LOGIN_AC_MAC]);
/* Logout: delete uid's entry cluster-wide (fire and forget). */
void login_ac_forget(int64_t uid);

/* ---- metrics.c --------------------------------------------------------- */
enum login_outcome {
    LOGIN_OUT_OK, LOGIN_OUT_INVALID, LOGIN_OUT_IN_USE, LOGIN_OUT_BUSY,
    LOGIN_OUT_LIMIT, LOGIN_OUT_BAD_REQUEST, LOGIN_OUT_ERROR, LOGIN_OUT_N
};
enum login_ac_result { LOGIN_AC_HIT, LOGIN_AC_MISS, LOGIN_AC_ERROR, LOGIN_AC_STORED,
                       LOGIN_AC_N };
enum login_admit {
    LOGIN_ADMIT_RATE, LOGIN_ADMIT_BUDGET, LOGIN_ADMIT_ADDRESS, LOGIN_ADMIT_QUEUE,
    LOGIN_ADMIT_PUSHED_OUT, LOGIN_ADMIT_N
};
/* Register the series (init; nothing on a host without ABI 1.6).  The rest
 * count, each a no-op before init or on such a host.  p2_errno is the
 * protocol-2 errno the request was answered with (0: success). */
void login_m_init(void);
void login_m_login(int by_token, int p2_errno);
void login_m_reg(int p2_errno);
void login_m_admit(int reason); /* enum login_admit */
void login_m_queue(size_t queued, size_t running);
void login_m_hash_time(int verify, double seconds);
void login_m_auth_cache(int result); /* enum login_ac_result */

#endif /* LOGIN_H */
