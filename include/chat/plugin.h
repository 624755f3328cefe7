/*
 * chat/plugin.h - the one header a chatd plugin includes.
 *
 * A plugin is a shared object exporting exactly one symbol, chat_plugin_entry(),
 * which returns a pointer to a const struct chat_plugin_desc.  The core checks
 * the descriptor (magic, ABI major, ABI minor, struct size), then calls init()
 * with a const table of host functions (struct chat_host).  Everything the plugin
 * does afterwards goes through that table: registering msgid handlers and event
 * hooks, answering sessions, delivering messages, the MySQL pool, timers, config
 * and logging.  Core objects (sessions, timers, results) are opaque.
 *
 * Versioning.  CHAT_ABI_MAJOR changes only when something is removed or changes
 * meaning; the host refuses a plugin with another major.  CHAT_ABI_MINOR grows
 * when functions are appended to struct chat_host (the table only ever grows at
 * the end); the host refuses a plugin built against a newer minor than it has.
 * A plugin that wants to run on older hosts of the same major may check
 * host->size before calling a function appended later (CHAT_HOST_HAS()).
 *
 *   1.0  core: handlers, events, sessions, deliver (local), timers, config, log
 *   1.1  MySQL pool (db_*), worker threads (work), Redis bus (presence_query,
 *        session_login with cluster-wide presence), undeliverable event
 *   1.2  login acknowledgement assembled from parts (login_part_*)
 *   1.3  NUL-safe user names (session_name_len, session_login_len),
 *        req_forward (a request as forwarded, sender fields the session's),
 *        req_int, and an int64-keyed hash map (map_*)
 *   1.4  register_handler_ex with CHAT_HANDLER_RAW (no cJSON tree built)
 *   1.5  (delivery) deliver_ex with a completion: the outcome of a message
 *        (delivered, stored, or failed) instead of "handed over";
 *        chat_ev_undeliverable grows from/ticket, claimed by the plugin that
 *        stores the message (undeliverable_claim, delivery_done)
 *        (login ack) register_login_messages: a login-ack part of
 *        messages, bounded in bytes, whose overflow follows the ack
 *   1.6  (metrics) Prometheus counters, gauges and histograms of a plugin
 *        (metric_counter, metric_gauge, metric_histogram, metric_inc/add/
 *        set/observe), served with the core's on the admin listener
 *   1.7  (abuse limits) login_failed: a failed login counted against the
 *        client's address ([limits] addr_login_failures)
 *   1.8  (auth cache) kv_get/kv_set/kv_del: a cluster-wide key-value
 *        store with expiry, in the bus's Redis
 *   1.9  (multi-device) CHAT_LOGIN_MULTI: several sessions (devices) of one
 *        user on any nodes; session_next_device, deliver_devices (the echo
 *        of a user's own message to its other devices); chat_ev_session
 *        grows `devices`
 *   1.10 msgid_handled: whether some plugin handles a msgid now
 *
 * Threads.  Every function in the table must be called on the loop thread,
 * except chat_host.malloc/free/realloc/strdup and log, which are thread-safe.
 * Every callback the host makes runs on the loop thread, except the work_fn
 * given to chat_host.work(), which runs on a worker thread.
 *
 * Ownership.  Each function says who frees what.  In short: what the host
 * passes to a callback is borrowed for the duration of the call; what the
 * plugin passes to the host is copied unless the function says it "takes" it;
 * the plugin never frees memory the host allocated except where a function says
 * "free with host->free".
 *
 * Callbacks never run synchronously inside the call that registers them, and a
 * call that returns an error never runs its callback.
 *
 * Lifetime and reload.  Each loaded copy of a plugin is an instance (struct
 * chat_plugin, passed to init as `self`).  On a hot reload the new instance is
 * initialised beside the old one; only if that succeeds are the handlers swapped.
 * The old instance then drains: its one-shot timers, database queries and
 * worker jobs still run their callbacks (its code stays mapped), its repeating
 * timers are stopped, and it is finalised (fini) and unloaded when nothing refers
 * to it any more.  A plugin therefore never needs to cancel work in fini.
 */
#ifndef CHAT_PLUGIN_H
#define CHAT_PLUGIN_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CHAT_PLUGIN_MAGIC 0x43484154u /* "CHAT" */
#define CHAT_ABI_MAJOR 1
#define CHAT_ABI_MINOR 10

#if defined(__GNUC__)
#define CHAT_EXPORT __attribute__((visibility("default")))
#define CHAT_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define CHAT_EXPORT
#define CHAT_PRINTF(f, a)
#endif

/* The name of the one symbol a plugin exports. */
#define CHAT_PLUGIN_ENTRY "chat_plugin_entry"

/* Opaque core objects. */
struct chat_plugin;   /* a loaded plugin instance */
struct chat_session;  /* one client connection */
struct chat_timer;    /* a timer owned by a plugin instance */
struct chat_db_result;/* the outcome of a query or transaction */
struct chat_login;    /* a login acknowledgement being assembled */
struct chat_map;      /* an int64 -> pointer hash map (ABI 1.3) */
struct chat_delivery; /* the pending outcome of one deliver_ex (ABI 1.5) */
struct chat_metric;   /* one registered metric series (ABI 1.6) */

/* ------------------------------------------------------------------------ */
/* Errors returned by host functions. 0 is success. host->strerror() names them. */
enum chat_err {
    CHAT_OK = 0,
    CHAT_ERR_NOMEM = -1,       /* allocation failed */
    CHAT_ERR_INVAL = -2,       /* bad argument */
    CHAT_ERR_EXISTS = -3,      /* already registered / already logged in */
    CHAT_ERR_NOTFOUND = -4,    /* no such session, user or key */
    CHAT_ERR_STATE = -5,       /* not allowed now (e.g. register after init) */
    CHAT_ERR_BUSY = -6,        /* a bounded queue is full; try later */
    CHAT_ERR_DB = -7,          /* the database reported an error */
    CHAT_ERR_UNAVAILABLE = -8, /* database or bus unreachable */
    CHAT_ERR_CLOSED = -9,      /* the session is closed or closing */
    CHAT_ERR_TIMEOUT = -10,    /* gave up waiting */
    CHAT_ERR_ABI = -11,        /* plugin/host version mismatch */
    CHAT_ERR_IO = -12,         /* an operating system call failed */
    /* stored-message quotas (issue 12, quota; a chat_deliver_cb status) */
    CHAT_ERR_QUOTA = -13,        /* the recipient's stored messages are at
                                  * [plugin.offline] stored_max */
    CHAT_ERR_QUOTA_SENDER = -14  /* the sender's stored messages for this
                                  * recipient are at stored_per_sender_max */
};

/* Log levels, most severe first. */
enum chat_log_level {
    CHAT_LOG_ERROR = 0,
    CHAT_LOG_WARN = 1,
    CHAT_LOG_INFO = 2,
    CHAT_LOG_DEBUG = 3
};

/* ------------------------------------------------------------------------ */
/* Wire protocol constants shared by the core and the business plugins.
 * docs/protocol.md is the full description. */
enum chat_msgid {
    CHAT_MSG_LOGIN = 1,
    CHAT_MSG_LOGIN_ACK = 2,
    CHAT_MSG_LOGOUT = 3,
    CHAT_MSG_REG = 4,
    CHAT_MSG_REG_ACK = 5,
    CHAT_MSG_ONE_CHAT = 6,
    CHAT_MSG_ADD_FRIEND = 7,
    CHAT_MSG_CREATE_GROUP = 8,
    CHAT_MSG_ADD_GROUP = 9,
    CHAT_MSG_GROUP_CHAT = 10,
    /* protocol 2 only */
    CHAT_MSG_ACK = 11,         /* the reply to any request without its own ack id */
    CHAT_MSG_NOTICE = 12,      /* server notice, e.g. why the session is closed */
    CHAT_MSG_FRIEND_LIST = 13, /* request the friend list */
    CHAT_MSG_GROUP_LIST = 14   /* request the group list */
};

/* Protocol-2 errno values that the core itself uses; plugins may use them and
 * define more from 200 up.  The seed's own values (1 and 2 for login, 1 for
 * register) keep their meaning on those messages. */
enum chat_proto_errno {
    CHAT_E_OK = 0,
    CHAT_E_BAD_JSON = 100,     /* the frame is not valid JSON */
    CHAT_E_NOT_OBJECT = 101,   /* the frame is not a JSON object */
    CHAT_E_BAD_MSGID = 102,    /* msgid missing or not an integer */
    CHAT_E_UNKNOWN_MSGID = 103,/* no handler for this msgid */
    CHAT_E_BAD_FIELD = 104,    /* a field is missing or of the wrong type */
    CHAT_E_TOO_LONG = 105,     /* a field is over its configured limit */
    CHAT_E_NOT_LOGGED_IN = 106,/* the request needs a logged-in session */
    CHAT_E_ID_MISMATCH = 107,  /* "id" is not the session's user */
    CHAT_E_NOT_FOUND = 108,    /* unknown user or group */
    CHAT_E_NOT_MEMBER = 109,   /* not a member of the group */
    CHAT_E_ALREADY = 110,      /* already a friend / member / logged in */
    CHAT_E_LIMIT = 111,        /* a configured limit is reached */
    CHAT_E_INTERNAL = 112,     /* server-side failure (database, ...) */
    CHAT_E_UNAVAILABLE = 113,  /* a back end is down; try again */
    CHAT_E_FRAME_TOO_LARGE = 114,
    CHAT_E_SLOW_READER = 115,  /* (notice) output queue overflowed */
    CHAT_E_REPLACED = 116,     /* (notice) logged in elsewhere */
    CHAT_E_IDLE = 117,         /* (notice) idle timeout */
    CHAT_E_SHUTDOWN = 118,     /* (notice) server is stopping */
    CHAT_E_DRAINING = 119,     /* (notice) node draining: reconnect elsewhere */
    CHAT_E_KICKED = 120,       /* (notice) closed by an operator */
    /* abuse limits (issue 12; see docs/protocol.md) */
    CHAT_E_RATE_LIMITED = 125, /* over a rate limit: not executed; the reply
                                * carries retry_after_ms */
    CHAT_E_QUOTA = 126,        /* a stored quota is full (undelivered
                                * messages, friends): not executed */
    /* stored-message quotas (issue 12, quota): the chat message is not stored */
    CHAT_E_MAILBOX_FULL = 128,    /* the recipient's mailbox is full */
    CHAT_E_MAILBOX_SENDER = 129   /* too many of the sender's messages wait
                                   * for this recipient */
};

/* Protocol version of a session. A session starts as LEGACY and switches to 2
 * for good when a request carries "proto":2 (see docs/protocol.md). */
enum chat_proto { CHAT_PROTO_LEGACY = 1, CHAT_PROTO_2 = 2 };

/* ------------------------------------------------------------------------ */
/* A request as a handler sees it.  Borrowed: valid only during the handler
 * call.  To answer later, copy `ack` (a small value type) and the session id. */
struct chat_ack {
    int msgid;       /* the request's msgid */
    int has_seq;     /* 1 if the request carried an integer "seq" */
    int64_t seq;     /* the client's "seq", echoed in protocol-2 replies */
};

struct chat_request {
    uint32_t size;        /* sizeof(struct chat_request) as the host built it */
    int msgid;
    const cJSON *json;    /* the parsed object; borrowed.  NULL for handlers
                           * registered with CHAT_HANDLER_RAW */
    const char *raw;      /* the frame's bytes, not NUL-terminated; borrowed */
    size_t raw_len;
    struct chat_ack ack;  /* what a reply needs */
};

typedef void (*chat_handler_fn)(struct chat_session *s,
                                const struct chat_request *req, void *ud);

/* ------------------------------------------------------------------------ */
/* Events.  A hook gets the event id and an event-specific argument struct
 * (borrowed for the call).  Hooks run in load order of the plugins. */
enum chat_event {
    CHAT_EV_SESSION_OPEN = 1,  /* arg: struct chat_ev_session */
    CHAT_EV_SESSION_CLOSE = 2, /* arg: struct chat_ev_session; user still bound */
    CHAT_EV_LOGIN = 3,         /* arg: struct chat_ev_session (user bound) */
    CHAT_EV_LOGOUT = 4,        /* arg: struct chat_ev_session; before unbinding */
    CHAT_EV_UNDELIVERABLE = 5, /* arg: struct chat_ev_undeliverable */
    CHAT_EV_BROADCAST = 6,     /* arg: struct chat_ev_broadcast (ABI 1.1) */
    CHAT_EV_MAX /* one past the last event */
};

struct chat_ev_session {
    uint32_t size;
    struct chat_session *session;
    int64_t user_id; /* 0 when no user is bound */
    /* ABI 1.9 (multi-device; check size before reading it).  On
     * CHAT_EV_LOGIN: how many devices of the user are online in the whole
     * cluster, this one included, as the presence claim saw them (1: this
     * is the user's first device; without Redis: this node's count).  0 on
     * the other events.  On CHAT_EV_LOGOUT and CHAT_EV_SESSION_CLOSE this
     * device's presence is already released when the hook runs, so a
     * presence_query made from the hook answers offline exactly when no
     * other device of the user is online anywhere. */
    int devices;
};

/* A message that deliver() could not hand to any session of its user: the user
 * is offline, the node holding it is gone, or the bus is down.  A plugin that
 * stores offline messages keeps `json` (copy it; it is borrowed).
 *
 * ABI 1.5 appends `from` and `ticket` (check size before reading them).  When
 * ticket is not NULL a sender waits for this message's outcome: the plugin
 * that stores it calls host->undeliverable_claim(ev) in its hook and later
 * host->delivery_done() exactly once (CHAT_OK once the message is committed).
 * A ticket nobody claims fails with CHAT_ERR_UNAVAILABLE after the hooks ran.
 * NULL ticket: nobody waits (host->deliver, a message that reached another
 * node, or a closed session's unsent output, which was already counted as
 * delivered): store it if at all possible. */
struct chat_ev_undeliverable {
    uint32_t size;
    int64_t user_id;
    const char *json; /* the message text as it would have been sent */
    size_t len;
    /* ABI 1.5 */
    int64_t from;                  /* the sender's user id; 0: unknown */
    struct chat_delivery *ticket;  /* opaque; see above */
};

/* A cluster-wide notice sent with chat_host.broadcast() by a plugin of the
 * same name on any node (this one included), e.g. to drop a cache entry. */
struct chat_ev_broadcast {
    uint32_t size;
    const char *plugin; /* name of the sending plugin */
    const char *data;   /* borrowed */
    size_t len;
};

typedef void (*chat_hook_fn)(int event, const void *arg, void *ud);

/* ------------------------------------------------------------------------ */
/* Database.  Parameters are bound to '?' placeholders of a prepared statement;
 * the host copies them, so they may live on the caller's stack. */
enum chat_db_type { CHAT_DB_NULL = 0, CHAT_DB_INT = 1, CHAT_DB_STR = 2 };

struct chat_db_param {
    int type;           /* enum chat_db_type */
    int64_t i;          /* CHAT_DB_INT */
    const char *s;      /* CHAT_DB_STR: bytes, may hold NUL */
    size_t len;         /* CHAT_DB_STR: length of s */
};

#define CHAT_DB_P_INT(v) ((struct chat_db_param){CHAT_DB_INT, (int64_t)(v), NULL, 0})
#define CHAT_DB_P_STR(p, n) ((struct chat_db_param){CHAT_DB_STR, 0, (p), (n)})
#define CHAT_DB_P_NULL ((struct chat_db_param){CHAT_DB_NULL, 0, NULL, 0})

/* One statement of a transaction. */
struct chat_db_stmt {
    const char *sql;
    const struct chat_db_param *params;
    size_t nparams;
};

/* Query completion. `r` is borrowed for the call.  Always called exactly once
 * for a query the host accepted, with an error when the database is down. */
typedef void (*chat_db_cb)(const struct chat_db_result *r, void *ud);

/* Worker-thread job (see chat_host.work). work_fn runs on a worker thread and
 * must not call the host table except malloc/free/log; done_fn runs on the loop. */
typedef void (*chat_work_fn)(void *ud);
typedef void (*chat_done_fn)(int status, void *ud);

typedef void (*chat_timer_fn)(struct chat_timer *t, void *ud);

/* presence_query completion: online[i] is 1 when uids[i] is online anywhere. */
typedef void (*chat_presence_cb)(int status, const int64_t *uids,
                                 const unsigned char *online, size_t n, void *ud);

/* session_login completion.  status CHAT_OK: the session is bound to the user
 * (CHAT_EV_LOGIN has run).  CHAT_ERR_EXISTS: the user is online elsewhere and
 * the policy is to refuse.  CHAT_ERR_CLOSED: the session went away meanwhile. */
typedef void (*chat_login_cb)(int status, uint64_t session_id, void *ud);

/* Login acknowledgement parts (ABI 1.2).  When a login succeeds, the login
 * plugin starts an ack with login_ack_begin(); the host calls every registered
 * part function, each of which answers, now or later, with login_part_set()
 * (a NULL value adds nothing).  When every part has answered, or the configured
 * part timeout has passed, the host adds the parts to the ack body and sends
 * it, and then calls each part's sent function with ok=1 once the ack has been
 * written to the client's socket (ok=0 if the session closed first).  Messages
 * delivered to the session while its ack is pending are held and sent after
 * the ack. */
typedef void (*chat_login_part_fn)(struct chat_login *l, int64_t user_id,
                                   int proto, void *ud);
typedef void (*chat_login_sent_fn)(int ok, int64_t user_id, void *state, void *ud);
typedef void (*chat_login_done_fn)(int status, uint64_t session_id, void *ud);
/* Progress of a login part of messages (ABI 1.5, register_login_messages):
 * the first n messages of the part's array have been written to the
 * client's socket.  Called with growing n; last=1 on the final call, after
 * which the host no longer uses state (n is below the count when the
 * session closed first or the part was left out). */
typedef void (*chat_login_written_fn)(size_t n, int last, int64_t user_id,
                                      void *state, void *ud);

/* deliver_ex completion (ABI 1.5).  status: CHAT_OK delivered to a session
 * (on another node: the PUBLISH reached its subscriber) or stored for the
 * user's next login; CHAT_ERR_BUSY a bound of the store was reached (try
 * later); CHAT_ERR_UNAVAILABLE nobody could store it (no offline plugin, the
 * database is failing); CHAT_ERR_NOTFOUND the user does not exist;
 * CHAT_ERR_CLOSED the server is stopping; CHAT_ERR_QUOTA /
 * CHAT_ERR_QUOTA_SENDER the offline store refused it for a stored-message
 * quota (not stored).  ctx is the host's copy of the
 * ctx given to deliver_ex (aligned for any type, writable), borrowed for the
 * call. */
typedef void (*chat_deliver_cb)(int status, int64_t user_id, void *ctx);
/* kv_get's answer (ABI 1.8, auth cache): val borrowed for the call. */
typedef void (*chat_kv_cb)(int status, const char *val, size_t len, void *ud);
#define CHAT_DELIVER_CTX_MAX 64
/* deliver_ex's positive return: the outcome comes later through cb. */
#define CHAT_DELIVER_PENDING 1

/* ------------------------------------------------------------------------ */
/* The host table.  Append-only: new functions go at the end and bump
 * CHAT_ABI_MINOR.  `size` is sizeof(struct chat_host) as the host built it. */
struct chat_host {
    uint32_t size;
    uint16_t abi_major;
    uint16_t abi_minor;
    const int *log_level; /* current level; read by chat_log() */

    /* --- memory (thread-safe).  All memory that crosses the boundary comes
     * from these; cJSON uses them too. */
    void *(*malloc)(size_t n);
    void *(*realloc)(void *p, size_t n);
    void (*free)(void *p);
    char *(*strdup)(const char *s);

    /* --- logging (thread-safe).  Prefer the chat_log() macro. */
    void (*log)(struct chat_plugin *self, int level, const char *fmt, ...)
        CHAT_PRINTF(3, 4);
    const char *(*strerror)(int err); /* static string */

    /* --- registration: only inside init(); after that CHAT_ERR_STATE.
     * A msgid already claimed by another plugin fails with CHAT_ERR_EXISTS and
     * the plugin should return that error from init (the load is refused). */
    int (*register_handler)(struct chat_plugin *self, int msgid,
                            chat_handler_fn fn, void *ud);
    int (*register_hook)(struct chat_plugin *self, int event, chat_hook_fn fn,
                         void *ud);

    /* --- config: the plugin's own section [plugin.NAME] of chat.conf.
     * Returned strings are borrowed until the next reconfigure() or unload. */
    const char *(*conf_get)(struct chat_plugin *self, const char *key,
                            const char *def);
    int64_t (*conf_int)(struct chat_plugin *self, const char *key, int64_t def);

    /* --- sessions */
    uint64_t (*session_id)(const struct chat_session *s); /* never 0, never reused */
    struct chat_session *(*session_get)(uint64_t id);    /* NULL if gone */
    int (*session_proto)(const struct chat_session *s);  /* enum chat_proto */
    int64_t (*session_user)(const struct chat_session *s); /* 0: not logged in */
    const char *(*session_name)(const struct chat_session *s); /* "" if none; borrowed */
    struct chat_session *(*session_by_user)(int64_t user_id); /* local only */
    const char *(*session_peer)(const struct chat_session *s); /* "ip:port" */
    /* Unbind the user (CHAT_EV_LOGOUT runs first) and drop its presence. */
    int (*session_logout)(struct chat_session *s);
    /* Close after flushing what is queued. For a protocol-2 session a notice
     * {msgid:12, errno, errmsg} is sent first when errno_ != 0. */
    void (*session_close)(struct chat_session *s, int errno_, const char *why);

    /* --- output.  Every message is written as compact JSON plus '\n'.
     * send_json: the host serialises obj; the caller keeps ownership of obj.
     * send_raw: the host copies len bytes (a complete JSON text, no '\n'). */
    int (*send_json)(struct chat_session *s, const cJSON *obj);
    int (*send_raw)(struct chat_session *s, const char *json, size_t len);
    /* Answer a request.  Protocol 2: sends body's fields plus "msgid" (2 for
     * login, 5 for register, else 11), "req" (the request msgid, for 11),
     * "seq" when the request had one, "errno" and "errmsg" ("ok" if NULL and
     * errno_ is 0).  Legacy sessions: sends nothing (legacy replies are built
     * by the plugin with send_json, because their shapes differ per message).
     * body may be NULL; the caller keeps ownership. */
    int (*reply)(struct chat_session *s, const struct chat_ack *ack, int errno_,
                 const char *errmsg, const cJSON *body);

    /* --- delivery.  Routes json (len bytes, no '\n') to the user's session:
     * locally, via the bus to the node holding the user, or, when no session
     * can take it, to CHAT_EV_UNDELIVERABLE.  Asynchronous; never fails
     * silently.  The host copies json. */
    int (*deliver)(struct chat_plugin *self, int64_t user_id, const char *json,
                   size_t len);

    /* --- timers, owned by the instance.  Returns NULL on failure.  A one-shot
     * timer (repeat_ms 0) frees itself after its callback; a repeating one lives
     * until timer_stop() or until its instance is retired.  timer_stop() on a
     * timer whose one-shot callback has run is a bug; inside the callback it is
     * allowed. */
    struct chat_timer *(*timer_start)(struct chat_plugin *self, uint64_t timeout_ms,
                                      uint64_t repeat_ms, chat_timer_fn fn, void *ud);
    void (*timer_stop)(struct chat_timer *t);

    /* --- JSON strings with their length.  cJSON's valuestring stops at the
     * first NUL, so a string holding "\u0000" is read with these instead.
     * req_field_raw: the raw JSON text of top-level member key of the request
     * (e.g. "\"hi\\u0000\"" or "42"), borrowed from the frame; NULL if
     * absent.  req_field_str: the decoded bytes of a string member (may hold
     * NUL; NUL-terminated), borrowed until the handler returns; NULL if absent
     * or not a string.  json_quote: s[0..len) as a JSON string literal with
     * quotes; free with host->free. */
    const char *(*req_field_raw)(const struct chat_request *req, const char *key,
                                 size_t *len);
    const char *(*req_field_str)(const struct chat_request *req, const char *key,
                                 size_t *len);
    char *(*json_quote)(const char *s, size_t len, size_t *outlen);

    /* The identity check every business request needs: returns the user id
     * of s when s is logged in and the request's "id" (if present) is that
     * user.  Otherwise it answers the request itself (protocol 2: errno
     * CHAT_E_NOT_LOGGED_IN, CHAT_E_ID_MISMATCH or CHAT_E_BAD_FIELD; legacy: a
     * log line, nothing sent, as the seed sends nothing) and returns 0. */
    int64_t (*req_auth)(struct chat_session *s, const struct chat_request *req);

    /* ===== ABI 1.1 ===== */

    /* --- database pool.  The host copies sql and params.  Returns CHAT_OK and
     * later calls cb exactly once, or returns an error (CHAT_ERR_BUSY when the
     * queue is full) and never calls cb. */
    int (*db_query)(struct chat_plugin *self, const char *sql,
                    const struct chat_db_param *params, size_t nparams,
                    chat_db_cb cb, void *ud);
    /* All statements on one connection in one transaction: committed if every
     * one succeeds, else rolled back.  db_sub() reaches each statement's result. */
    int (*db_txn)(struct chat_plugin *self, const struct chat_db_stmt *stmts,
                  size_t nstmts, chat_db_cb cb, void *ud);
    int (*db_error)(const struct chat_db_result *r);   /* CHAT_OK or an error */
    int (*db_errno)(const struct chat_db_result *r);   /* server code, e.g. 1062 */
    const char *(*db_errmsg)(const struct chat_db_result *r); /* borrowed */
    size_t (*db_nrows)(const struct chat_db_result *r);
    size_t (*db_ncols)(const struct chat_db_result *r);
    int (*db_is_null)(const struct chat_db_result *r, size_t row, size_t col);
    int64_t (*db_int)(const struct chat_db_result *r, size_t row, size_t col);
    /* Column bytes (NUL-terminated for convenience, may contain NUL); borrowed. */
    const char *(*db_str)(const struct chat_db_result *r, size_t row, size_t col,
                          size_t *len);
    uint64_t (*db_affected)(const struct chat_db_result *r);
    uint64_t (*db_insert_id)(const struct chat_db_result *r);
    /* Result of statement i of a transaction (NULL if it did not run). */
    const struct chat_db_result *(*db_sub)(const struct chat_db_result *r, size_t i);

    /* --- worker threads for CPU-heavy work (password hashing).  Holds a
     * reference on the instance until done_fn has run.  status is CHAT_OK, or
     * CHAT_ERR_CLOSED when the server is stopping. */
    int (*work)(struct chat_plugin *self, chat_work_fn work_fn,
                chat_done_fn done_fn, void *ud);

    /* --- presence, cluster-wide through the bus (local only without one).
     * The host copies uids. */
    int (*presence_query)(struct chat_plugin *self, const int64_t *uids, size_t n,
                          chat_presence_cb cb, void *ud);
    /* Bind session s to user_id (with display name) after the plugin has
     * authenticated it, claiming the user's presence across the cluster.
     * flags: CHAT_LOGIN_REPLACE to take over an existing login (the older
     * session is told and closed) instead of failing with CHAT_ERR_EXISTS. */
    int (*session_login)(struct chat_plugin *self, struct chat_session *s,
                         int64_t user_id, const char *name, int flags,
                         chat_login_cb cb, void *ud);

    /* Send data (copied) to CHAT_EV_BROADCAST hooks of the plugin with this
     * plugin's name on every node, this one included (asynchronously).  Best
     * effort: with Redis down only this node gets it. */
    int (*broadcast)(struct chat_plugin *self, const char *data, size_t len);

    /* ===== ABI 1.2 ===== */

    /* Register a part of the login ack named key (e.g. "friends").  Only in
     * init().  part_fn is called for every successful login; sent_fn (may be
     * NULL) after the ack went out. */
    int (*register_login_part)(struct chat_plugin *self, const char *key,
                               chat_login_part_fn part_fn,
                               chat_login_sent_fn sent_fn, void *ud);
    /* Start assembling the ack for a session that session_login() bound.
     * base is the body so far (copied), e.g. {"msgid":2,"errno":0,"id":..,
     * "name":..}.  Each part's value is added under its key, except that for
     * a legacy session a NULL value or an empty array is left out (the seed
     * sends a list only when it is non-empty); a protocol-2 session gets every
     * key (NULL becomes []) plus "seq" (when the request had one) and
     * "errmsg":"ok" when base has none.  done_fn (may be NULL) runs after the
     * ack is queued for writing, with CHAT_OK or CHAT_ERR_CLOSED. */
    int (*login_ack_begin)(struct chat_plugin *self, struct chat_session *s,
                           const struct chat_ack *ack, const cJSON *base,
                           chat_login_done_fn done_fn, void *ud);
    /* Answer a part: value is TAKEN (the host frees it; NULL means "nothing to
     * add").  state is handed back to sent_fn.  Exactly one call per part
     * call; a late answer after the timeout is freed and ignored. */
    void (*login_part_set)(struct chat_login *l, cJSON *value, void *state);
    int (*login_proto)(const struct chat_login *l);

    /* ===== ABI 1.3 ===== */

    /* The session's user name and its length in bytes (a name may hold NUL,
     * which session_name() cannot show); borrowed like session_name(). */
    const char *(*session_name_len)(const struct chat_session *s, size_t *len);
    /* session_login() with a name of name_len bytes (may hold NUL). */
    int (*session_login_len)(struct chat_plugin *self, struct chat_session *s,
                             int64_t user_id, const char *name, size_t name_len,
                             int flags, chat_login_cb cb, void *ud);
    /* The request as it is forwarded to other users: the frame itself
     * (surrounding separators trimmed) when its "id" and "name" are the
     * session's user and name, no member appears twice and it carries no
     * "seq" or "proto" (those belong to the sender's connection); otherwise
     * a rebuilt object: "msgid", then "id" and "name" from the session, then
     * every other member's raw text in order (first occurrence).  Borrowed
     * until the handler returns; NULL if the session is not logged in or
     * memory ran out. */
    const char *(*req_forward)(struct chat_session *s,
                               const struct chat_request *req, size_t *len);
    /* Top-level member key of the request as an integer: 1 and *out set
     * when it is an integral JSON number in int64 range, 0 when absent, -1
     * when it is something else. */
    int (*req_int)(const struct chat_request *req, const char *key, int64_t *out);

    /* int64 -> pointer hash map (the one the core uses for sessions and
     * msgids).  map_new returns NULL when out of memory; free with map_free
     * (the values are the caller's).  map_put replaces; a NULL value is
     * CHAT_ERR_INVAL.  map_del returns the old value or NULL.  Iterate with
     * for (size_t it = 0; host->map_next(m, &it, &k, &v);) — deleting
     * entries already returned is allowed during the loop, inserting is not. */
    struct chat_map *(*map_new)(void);
    void (*map_free)(struct chat_map *m);
    void *(*map_get)(const struct chat_map *m, int64_t key);
    int (*map_put)(struct chat_map *m, int64_t key, void *val);
    void *(*map_del)(struct chat_map *m, int64_t key);
    size_t (*map_len)(const struct chat_map *m);
    int (*map_next)(const struct chat_map *m, size_t *it, int64_t *key, void **val);

    /* ===== ABI 1.4 ===== */

    /* register_handler with flags.  CHAT_HANDLER_RAW: the handler reads the
     * request only through req_int, req_field_raw, req_field_str, req_auth and
     * req_forward, so the host builds no cJSON tree for it (req->json is
     * NULL): the hot path of chat messages.  The frame has been validated as
     * strict JSON either way. */
    int (*register_handler_ex)(struct chat_plugin *self, int msgid,
                               chat_handler_fn fn, void *ud, unsigned flags);

    /* ===== ABI 1.5 (delivery) ===== */

    /* deliver() with its outcome.  from is the sender's user id (0: none),
     * used by the store's per-sender bounds.  Returns:
     *   CHAT_OK               handed at once to a live session on this node
     *                         (its output queue); cb never runs.  Should the
     *                         session close before writing it, the message
     *                         goes to CHAT_EV_UNDELIVERABLE without a ticket.
     *   CHAT_DELIVER_PENDING  (positive) the outcome comes later: cb runs
     *                         exactly once, never inside this call (see
     *                         chat_deliver_cb for the statuses).
     *   CHAT_ERR_INVAL        bad argument (uid <= 0, empty json, no cb,
     *                         ctx_len over CHAT_DELIVER_CTX_MAX);
     *   CHAT_ERR_NOMEM        out of memory;
     *   CHAT_ERR_CLOSED       the server is stopping.  cb never runs.
     * ctx (ctx_len bytes, may be NULL/0) is copied only when the outcome is
     * pending and handed to cb: the common case (recipient online here)
     * allocates nothing.  The host copies json.  Holds a reference on the
     * instance until cb has run. */
    int (*deliver_ex)(struct chat_plugin *self, int64_t from, int64_t user_id,
                      const char *json, size_t len, chat_deliver_cb cb,
                      const void *ctx, size_t ctx_len);
    /* In a CHAT_EV_UNDELIVERABLE hook: take the event's ticket (the plugin
     * then owes one delivery_done).  NULL when the event has no ticket or
     * another hook took it. */
    struct chat_delivery *(*undeliverable_claim)(const struct chat_ev_undeliverable *ev);
    /* Report the outcome of a claimed ticket (a chat_deliver_cb status;
     * CHAT_OK once the message is stored) and free it.  Runs the sender's
     * callback inside this call.  Exactly once per claimed ticket. */
    void (*delivery_done)(struct chat_delivery *d, int status);

    /* ===== ABI 1.5 (login ack) ===== */

    /* Register a login-ack part whose value is an array of MESSAGES, each
     * one complete message exactly as it would be delivered: a JSON object
     * (a raw cJSON item is taken as its text), the same for both protocols.
     * The host renders them in the ack for the session (legacy: each as a
     * JSON string of its text, the seed's shape; protocol 2: the objects).
     * Every login ack is bounded in bytes ([server] login_ack_max; for a
     * legacy session also the seed client's one 1,024-byte read): the
     * messages that do not fit are not dropped but follow the ack, in
     * order, as ordinary messages, ahead of anything delivered to the
     * session meanwhile.  (Elements of a part registered with
     * register_login_part that do not fit are trimmed.)  written_fn reports
     * how many of them have been written (see chat_login_written_fn); it is
     * always called at least once, with last=1, for every answered part.
     * Only in init(). */
    int (*register_login_messages)(struct chat_plugin *self, const char *key,
                                   chat_login_part_fn part_fn,
                                   chat_login_written_fn written_fn, void *ud);
    /* ===== ABI 1.6 (metrics) ===== */

    /* Register one series of a Prometheus metric, exported as
     * chatd_<plugin name>_<name> (name: [a-zA-Z_][a-zA-Z0-9_]*; a counter's
     * name should end in _total, a duration's in _seconds).  labels is a
     * NULL-terminated list of name, value pairs fixed for this series (NULL:
     * none), e.g. {"kind", "password", "outcome", "ok", NULL}; the names
     * must be valid and may not be "node" (the host adds node="<node id>"
     * to every sample), "le" (histograms) or start with "__".  Every series
     * of one name must have the same type, the same label names in the same
     * order and (histograms) the same bounds.  help and the labels are
     * copied.  bounds: nbounds (at most 24) strictly increasing finite upper
     * bounds of the histogram's buckets; the +Inf bucket, _sum and _count
     * are implied.
     *
     * Returns a handle, or NULL (logged) for a bad name, label or bound
     * list or a clash with an earlier registration.  The update functions
     * accept NULL and do nothing, so a plugin may ignore a failed
     * registration.  Registration is allowed at any time on the loop
     * thread; the handle is the instance's until it is unloaded (after
     * fini), when the host drops it.  Registering the same name and labels
     * again (also from a reloaded plugin's new instance) shares the series:
     * its value continues.  A series no live instance registered any more
     * disappears when its last instance is unloaded. */
    struct chat_metric *(*metric_counter)(struct chat_plugin *self, const char *name,
                                          const char *help,
                                          const char *const *labels);
    struct chat_metric *(*metric_gauge)(struct chat_plugin *self, const char *name,
                                        const char *help, const char *const *labels);
    struct chat_metric *(*metric_histogram)(struct chat_plugin *self, const char *name,
                                            const char *help,
                                            const char *const *labels,
                                            const double *bounds, size_t nbounds);
    /* Counters: inc adds 1, add adds v >= 0 (a negative v is ignored).
     * Gauges: add adds v (any sign), set sets it.  Histograms: observe.
     * A call that does not fit the metric's type does nothing.  Plain
     * memory on the loop thread: cheap enough for any hot path. */
    void (*metric_inc)(struct chat_metric *m);
    void (*metric_add)(struct chat_metric *m, double v);
    void (*metric_set)(struct chat_metric *m, double v);
    void (*metric_observe)(struct chat_metric *m, double v);

    /* ===== ABI 1.7 (abuse limits) ===== */

    /* A login from session s failed for a wrong id or password: counted
     * against s's client address ([limits] addr_login_failures); when that
     * bucket is empty the address's next logins get errno 125 (legacy: its
     * reads pause).  Nothing happens for a trusted address.  Loop thread. */
    void (*login_failed)(struct chat_session *s);

    /* ===== ABI 1.8 (auth cache): a small cluster-wide key-value store =====
     * Short-lived values shared by every node, kept in the bus's Redis under
     * "chatd:kv:<plugin name>:<key>", so two plugins never share a key.
     * key: a NUL-terminated string without '\0' (at most 200 bytes); values
     * are bytes (at most 4096).  Without Redis (none configured, or down)
     * nothing is kept: a plugin must treat the store as a cache that may
     * forget anything at any time.
     *
     * kv_get: CHAT_OK and later, never inside the call, cb(status, val, len,
     * ud) once: CHAT_OK with the value (borrowed for the call) or val NULL
     * when the key is absent; CHAT_ERR_UNAVAILABLE when Redis could not be
     * asked.  Or an error (CHAT_ERR_INVAL, CHAT_ERR_NOMEM, CHAT_ERR_CLOSED
     * while stopping) and cb never runs.
     * kv_set: store val[0..len) for ttl_ms (>= 1) milliseconds; kv_del:
     * delete the key.  Both are fire and forget: CHAT_OK when the command
     * was sent, CHAT_ERR_UNAVAILABLE when Redis is not reachable now (the
     * command is dropped), CHAT_ERR_INVAL or CHAT_ERR_NOMEM. */
    int (*kv_get)(struct chat_plugin *self, const char *key, chat_kv_cb cb, void *ud);
    int (*kv_set)(struct chat_plugin *self, const char *key, const char *val,
                  size_t len, uint64_t ttl_ms);
    int (*kv_del)(struct chat_plugin *self, const char *key);

    /* ===== ABI 1.9 (multi-device) =====
     * With CHAT_LOGIN_MULTI a user may have several sessions ("devices") on
     * this node and on others.  session_by_user returns the newest local
     * one; session_next_device(s) the next older local session of the same
     * user (closing ones skipped), NULL after the last.  deliver and
     * deliver_ex already reach every device of the user on every node.
     *
     * deliver_devices: send json (len bytes, copied) to every session of
     * user_id on every node except `except` (the device that sent the
     * message; NULL: none excepted): the echo of a user's own message to
     * its other devices.  Best effort and without outcome: when no other
     * device is online nothing happens (never CHAT_EV_UNDELIVERABLE).
     * CHAT_OK, CHAT_ERR_INVAL, CHAT_ERR_NOMEM, CHAT_ERR_CLOSED (stopping). */
    struct chat_session *(*session_next_device)(const struct chat_session *s);
    int (*deliver_devices)(int64_t user_id, const struct chat_session *except,
                           const char *json, size_t len);

    /* ===== ABI 1.10 =====
     * msgid_handled: 1 when some loaded plugin (this one included) handles
     * requests of msgid now, else 0.  For a plugin whose feature needs
     * another plugin's requests (a durable message is fetched again with
     * SYNC, the store plugin's), checked when it matters, not cached: the
     * other plugin may be enabled, disabled or reloaded at any time. */
    int (*msgid_handled)(int msgid);
};

#define CHAT_HANDLER_RAW 0x1u

#define CHAT_LOGIN_REPLACE 0x1
/* ABI 1.9 (multi-device): join the user's other sessions, here and on other
 * nodes, instead of refusing or replacing them.  CHAT_LOGIN_DEVICES_MAX(n)
 * (n <= 32767; 0 or absent: no limit) refuses the login with
 * CHAT_ERR_BUSY when the user already has n devices online in the cluster.
 * A host older than 1.9 ignores both: check CHAT_HOST_HAS(h,
 * session_next_device) first. */
#define CHAT_LOGIN_MULTI 0x2
#define CHAT_LOGIN_DEVICES_MAX(n) (((int)(n) & 0x7fff) << 16)
#define CHAT_LOGIN_DEVICES_OF(flags) (((flags) >> 16) & 0x7fff)

/* True when the host table has member m (it may be an older host). */
#define CHAT_HOST_HAS(h, m) \
    ((h)->size >= offsetof(struct chat_host, m) + sizeof((h)->m))

/* In init(): refuse to load, with a log line, on a host that lacks member m
 * of the table (a host older than the plugin needs). */
#define CHAT_HOST_REQUIRE(h, self, m)                                        \
    do {                                                                     \
        if (!CHAT_HOST_HAS(h, m)) {                                          \
            (h)->log((self), CHAT_LOG_ERROR,                                 \
                     "needs host function " #m ", which host ABI %u.%u "     \
                     "lacks: not loaded", (unsigned)(h)->abi_major,          \
                     (unsigned)(h)->abi_minor);                              \
            return CHAT_ERR_ABI;                                             \
        }                                                                    \
    } while (0)

/* Log through the host, formatting only when the level is enabled. */
#define chat_log(h, self, lvl, ...)                        \
    do {                                                   \
        if ((int)(lvl) <= *(h)->log_level)                 \
            (h)->log((self), (lvl), __VA_ARGS__);          \
    } while (0)

/* An integer setting of the plugin's section in lo..hi: def when absent,
 * and def with a warning when it is out of range.  Header-only: no host
 * function, so any host of ABI 1.0 or later can serve it. */
static inline int64_t chat_conf_range(const struct chat_host *h,
                                      struct chat_plugin *self, const char *key,
                                      int64_t def, int64_t lo, int64_t hi)
{
    int64_t v = h->conf_int(self, key, def);

    if (v < lo || v > hi) {
        chat_log(h, self, CHAT_LOG_WARN,
                 "%s = %lld is out of range [%lld, %lld]; using %lld", key,
                 (long long)v, (long long)lo, (long long)hi, (long long)def);
        v = def;
    }
    return v;
}

/* Whether id is in ids[0..n), sorted ascending (a member list, a friend
 * list): a binary search.  Header-only, like chat_conf_range. */
static inline int chat_ids_has(const int64_t *ids, size_t n, int64_t id)
{
    size_t lo = 0, hi = n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;

        if (ids[mid] == id)
            return 1;
        if (ids[mid] < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

/* Free every value of *m with h->free, then the map, and set *m to NULL (a
 * plugin's fini; *m may be NULL).  Header-only, like chat_conf_range. */
static inline void chat_map_free_values(const struct chat_host *h, struct chat_map **m)
{
    size_t it = 0;
    int64_t k;
    void *v;

    if (!*m)
        return;
    while (h->map_next(*m, &it, &k, &v))
        h->free(v);
    h->map_free(*m);
    *m = NULL;
}

/* ------------------------------------------------------------------------ */
/* The plugin descriptor. */
struct chat_plugin_desc {
    uint32_t magic;      /* CHAT_PLUGIN_MAGIC */
    uint16_t abi_major;  /* CHAT_ABI_MAJOR the plugin was built with */
    uint16_t abi_minor;  /* CHAT_ABI_MINOR the plugin was built with */
    uint32_t size;       /* sizeof(struct chat_plugin_desc) */
    const char *name;    /* must match the name it is enabled under */
    const char *version; /* free text, e.g. "1.0.0" */

    /* Called once.  Register handlers and hooks here.  *state is the plugin's
     * own pointer, handed back to fini/save/restore/reconfigure.  Return
     * CHAT_OK, or an error to refuse the load (fini is then not called, and
     * everything registered is dropped). */
    int (*init)(const struct chat_host *host, struct chat_plugin *self,
                void **state);
    /* Called once when the instance is unloaded, after it has drained. */
    void (*fini)(void *state);

    /* Optional (NULL): hand state to the next instance on reload.  save()
     * returns a buffer from host->malloc (the host takes it) and its length;
     * restore() borrows it. */
    int (*save)(void *state, void **blob, size_t *len);
    int (*restore)(void *state, const void *blob, size_t len);
    /* Optional: the plugin's config section changed (no reload). */
    int (*reconfigure)(void *state);

    void *reserved[4]; /* NULL; room to grow without changing size rules */
};

/* Declare the entry point: CHAT_PLUGIN_DECLARE(my_desc); */
#define CHAT_PLUGIN_DECLARE(desc)                                        \
    CHAT_EXPORT const struct chat_plugin_desc *chat_plugin_entry(void); \
    const struct chat_plugin_desc *chat_plugin_entry(void) { return &(desc); }

#define CHAT_PLUGIN_DESC_INIT(nm, ver)                                   \
    .magic = CHAT_PLUGIN_MAGIC, .abi_major = CHAT_ABI_MAJOR,             \
    .abi_minor = CHAT_ABI_MINOR, .size = sizeof(struct chat_plugin_desc), \
    .name = (nm), .version = (ver)

#ifdef __cplusplus
}
#endif
#endif /* CHAT_PLUGIN_H */
