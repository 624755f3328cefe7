/*
 * core.h - declarations shared between the core's subsystems.  Never
 * installed; plugins see only include/chat/plugin.h.
 *
 * Subsystems and their prefixes, by layer from the bottom up (see
 * docs/architecture.md, "Layers"; tests/check_layers.py holds the same
 * table).  A file calls its own layer or the ones below; what goes up goes
 * through a callback main.c registers at start (wire.c).
 *
 * 1 leaf utilities
 *   mem_   alloc.c     the one allocator (chat_host malloc/free), cJSON hooks
 *   log_   log.c       logging: text or JSON, stderr/journal or a file
 *   map_   map.c       int64 -> pointer hash map
 *   frame_ frame.c     splitting a byte stream into JSON objects
 *   json_  jsonstr.c   JSON string literals with their length (NUL-safe)
 *   conf_  conf.c      chat.conf parsing and validation (inih)
 *   metrics_ metrics.c the node's metrics, Prometheus text format
 *   sdn_   sdnotify.c  systemd readiness, reload, stop and watchdog (sd_notify)
 *   defer_ defer.c     the one deferral queue: fn on a later loop turn
 *   rl_    rlbucket.c  [limits] syntax and the token bucket arithmetic
 *   ws_    ws.c        WebSocket engine: upgrade + frames over bytes (ws.h)
 *   adm_   admin_http.c the admin listener's request parsing (http-parser)
 *   web_   webfiles.c  the web client's static files, in memory ([web] root)
 *   pp_    proxyproto.c PROXY protocol v1/v2 header parsing (pure)
 * 2 net, db and bus (they never call each other)
 *   net_   net.c       listener, sessions, buffered output, limits
 *          transport.h the transport seam (net_transport table, net_tr_*)
 *   tls_   tls.c       the tls transport (OpenSSL 3 on the loop)
 *   wstr_  wstr.c      the ws and wss transports (ws.c on the seam)
 *   db_    db.c        MySQL pool on worker threads (migrate.c: --migrate)
 *   bus_   bus.c       Redis bus: node channel, presence, routing
 * 3 sessions, dispatch and the login ack
 *   sess_  session.c   login, logout, open/close, delivery outcomes, work
 *   rl_    ratelimit.c token-bucket rate limits ([limits]), per session,
 *                      user and address
 *   disp_  dispatch.c  frame -> cJSON -> msgid handler; protocol errors
 *   ack_   loginack.c  login acknowledgements assembled from plugin parts
 * 4 plug_  plugin.c    loading, versions, instances, reference counts, reload
 * 5 host_  host.c      the struct chat_host table handed to plugins
 * 6 main.c             start-up, signals, shutdown, reload and live settings
 *   wire_  wire.c      every upward callback, registered at start
 *   admin_ admin.c     the admin listener (HTTP): metrics, health, actions
 */
#ifndef CHAT_CORE_H
#define CHAT_CORE_H

#include <stdint.h>
#include <stddef.h>
#include <uv.h>

#include "chat/plugin.h"

#define CHATD_VERSION "0.1.0"

#define container_of(ptr, type, member) \
    ((type *)((char *)(ptr) - offsetof(type, member)))

/* ---- alloc.c ---------------------------------------------------------- */
/* Allocation failure policy: mem_malloc and friends return NULL and callers
 * handle it where it can be handled (a request fails with CHAT_ERR_NOMEM);
 * libuv/cJSON/hiredis, routed through the same functions, do the same. */
void *mem_malloc(size_t n);
void *mem_calloc(size_t n, size_t sz);
void *mem_realloc(void *p, size_t n);
void mem_free(void *p);
char *mem_strdup(const char *s);
char *mem_strndup(const char *s, size_t n);
void mem_init(void); /* routes cJSON and libuv through mem_*; call first */

/* ---- log.c ------------------------------------------------------------ */
/* Thread-safe: any thread may log.  log_open and log_reopen run on the loop
 * thread (or before it starts). */
extern int log_level;
#define LOG_FORMAT_TEXT 0
#define LOG_FORMAT_JSON 1
/* What a line about a session carries (borrowed for the call). */
struct log_ctx {
    uint64_t session;
    const char *peer;  /* "ip:port", or NULL */
    int64_t user;      /* 0: not logged in */
    const char *name;  /* the user's name, or NULL */
};
void log_write(int level, const char *who, const char *fmt, ...)
    CHAT_PRINTF(3, 4);
void log_vwrite(int level, const char *who, const char *fmt, va_list ap);
void log_write_ctx(int level, const char *who, const struct log_ctx *ctx,
                   const char *fmt, ...) CHAT_PRINTF(4, 5);
void log_vwrite_ctx(int level, const char *who, const struct log_ctx *ctx,
                    const char *fmt, va_list ap);
int log_parse_level(const char *s);  /* -1 if unknown */
int log_parse_format(const char *s); /* LOG_FORMAT_*, -1 if unknown */
/* Log to path ("" or NULL: stderr) in format from now on; the same path
 * again keeps its descriptor.  0, or -1 with err set (nothing changed). */
int log_open(const char *path, int format, char *err, size_t errlen);
/* SIGUSR1: open the log_file again (logrotate moved it); logs the outcome.
 * 0 when writing to stderr. */
int log_reopen(void);
/* stderr is the stream systemd connected to the journal (JOURNAL_STREAM). */
int log_stderr_is_journal(void);
/* The name of a CHAT_ERR_* code (host->strerror). */
const char *log_strerror(int err);
#define LOG(lvl, ...)                                  \
    do {                                               \
        if ((int)(lvl) <= log_level)                   \
            log_write((lvl), "core", __VA_ARGS__);     \
    } while (0)
#define LOGE(...) LOG(CHAT_LOG_ERROR, __VA_ARGS__)
#define LOGW(...) LOG(CHAT_LOG_WARN, __VA_ARGS__)
#define LOGI(...) LOG(CHAT_LOG_INFO, __VA_ARGS__)
#define LOGD(...) LOG(CHAT_LOG_DEBUG, __VA_ARGS__)
/* A line about session s (loop thread: it reads the session), with its id,
 * peer, user and name as context. */
#define LOGS(s, lvl, ...)                                               \
    do {                                                                \
        if ((int)(lvl) <= log_level) {                                  \
            const struct chat_session *s_ = (s);                        \
            struct log_ctx c_ = {net_session_id(s_), net_session_peer(s_), \
                                 net_session_user(s_), net_session_name(s_)}; \
            log_write_ctx((lvl), "core", &c_, __VA_ARGS__);             \
        }                                                               \
    } while (0)
#define LOGSE(s, ...) LOGS(s, CHAT_LOG_ERROR, __VA_ARGS__)
#define LOGSW(s, ...) LOGS(s, CHAT_LOG_WARN, __VA_ARGS__)
#define LOGSI(s, ...) LOGS(s, CHAT_LOG_INFO, __VA_ARGS__)
#define LOGSD(s, ...) LOGS(s, CHAT_LOG_DEBUG, __VA_ARGS__)

/* ---- map.c ------------------------------------------------------------ */
struct map_slot;
struct map {
    struct map_slot *slots;
    size_t cap;  /* power of two, or 0 */
    size_t len;
};
void map_init(struct map *m);
void map_free(struct map *m); /* frees the table, not the values */
void *map_get(const struct map *m, int64_t key);
int map_put(struct map *m, int64_t key, void *val); /* replaces; CHAT_ERR_NOMEM */
void *map_del(struct map *m, int64_t key);          /* returns old value */
/* Iterate: for (size_t it = 0; map_next(m, &it, &k, &v);) */
int map_next(const struct map *m, size_t *it, int64_t *key, void **val);

/* ---- defer.c ---------------------------------------------------------- */
/* The one deferral mechanism: run something on a later loop turn, never
 * inside the caller.  An item is embedded in its owner (no allocation) and
 * queued at most once; fn runs with it unqueued. */
struct defer_item {
    struct defer_item *next;
    void (*fn)(struct defer_item *it);
    int queued;
};
void defer_init(uv_loop_t *loop); /* main.c (wire.c), before anything defers */
/* Shutdown: what is queued (and what it queues) still runs, then the
 * handle closes; adds after that fail. */
void defer_stop(void);
void defer_item_init(struct defer_item *it, void (*fn)(struct defer_item *it));
/* Queue it (already queued: nothing changes).  CHAT_ERR_CLOSED after
 * defer_stop: fn never runs. */
int defer_add(struct defer_item *it);
void defer_cancel(struct defer_item *it); /* not queued: nothing */
/* fn(arg) on a later turn.  CHAT_ERR_NOMEM or CHAT_ERR_CLOSED: it never runs. */
int defer_call(void (*fn)(void *arg), void *arg);

/* ---- metrics.c -------------------------------------------------------- */
/* Hot-path counters: plain fields of metrics_loop, touched only on the loop
 * thread (no atomics, no locks); labels are these array indexes. */
#define METRICS_MSGID_MAX 14 /* msgids 1..14 by number; slot 0: "other" */
#define METRICS_BUCKETS_MAX 24
#define METRICS_LATENCY_NB 15
#define METRICS_LAG_INTERVAL_MS 100
enum metrics_type { METRICS_COUNTER, METRICS_GAUGE, METRICS_HISTOGRAM };
enum metrics_close {
    METRICS_CLOSE_PEER, METRICS_CLOSE_READ_ERROR, METRICS_CLOSE_WRITE_ERROR,
    METRICS_CLOSE_SLOW_READER, METRICS_CLOSE_FRAME_TOO_LARGE, METRICS_CLOSE_IDLE,
    METRICS_CLOSE_SHUTDOWN, METRICS_CLOSE_REPLACED, METRICS_CLOSE_SERVER,
    METRICS_CLOSE_ERROR, METRICS_CLOSE_N
};
enum metrics_refuse {
    METRICS_REFUSE_MAX_CONN, METRICS_REFUSE_STOPPING, METRICS_REFUSE_PER_ADDR,
    METRICS_REFUSE_UNAUTH_PER_ADDR, METRICS_REFUSE_ADDR_RATE,
    METRICS_REFUSE_PROXY, /* proxy_protocol: untrusted peer, bad or no header */
    METRICS_REFUSE_N
};
enum metrics_route {
    METRICS_ROUTE_LOCAL, METRICS_ROUTE_REMOTE, METRICS_ROUTE_STORED,
    METRICS_ROUTE_UNDELIVERABLE, METRICS_ROUTE_N
};
/* Redis commands, in the order of bus.c's request kinds. */
enum metrics_bus_cmd {
    METRICS_BUS_SCRIPT, METRICS_BUS_HEARTBEAT, METRICS_BUS_SYNC, METRICS_BUS_DELIVER,
    METRICS_BUS_CLAIM, METRICS_BUS_RELEASE, METRICS_BUS_PRESENCE, METRICS_BUS_PUBLISH,
    METRICS_BUS_N
};
enum metrics_presence { METRICS_PRESENCE_CLAIM, METRICS_PRESENCE_RELEASE,
                        METRICS_PRESENCE_QUERY, METRICS_PRESENCE_N };
enum metrics_publish { METRICS_PUBLISH_DELIVER, METRICS_PUBLISH_BROADCAST,
                       METRICS_PUBLISH_N };
/* A histogram: counts per bucket (not cumulative; the exposition adds them
 * up), the last one past every bound (+Inf). */
struct metrics_hist {
    unsigned nb;
    double bounds[METRICS_BUCKETS_MAX];
    uint64_t counts[METRICS_BUCKETS_MAX + 1];
    uint64_t count;
    double sum;
};
struct metrics_loop {
    uint64_t accepted;
    uint64_t refused[METRICS_REFUSE_N];
    uint64_t closed[METRICS_CLOSE_N];
    uint64_t frames[METRICS_MSGID_MAX + 1];
    uint64_t errors[METRICS_MSGID_MAX + 1];
    uint64_t bytes_in, bytes_out;
    uint64_t deliveries[METRICS_ROUTE_N];
    uint64_t bus_publishes[METRICS_PUBLISH_N];
    uint64_t bus_presence[METRICS_PRESENCE_N];
    uint64_t bus_reconnects, bus_link_lost;
    struct metrics_hist bus_rtt[METRICS_BUS_N];
    struct metrics_hist loop_lag;
};
extern struct metrics_loop metrics_loop;
extern const double metrics_latency_bounds[METRICS_LATENCY_NB];
static inline unsigned metrics_msgid_slot(int msgid)
{
    return msgid >= 1 && msgid <= METRICS_MSGID_MAX ? (unsigned)msgid : 0;
}
void metrics_hist_init(struct metrics_hist *h, const double *bounds, size_t nb);
void metrics_observe(struct metrics_hist *h, double v);

/* Start the event-loop lag timer (unreferenced) and the uptime clock;
 * metrics_stop closes the timer (shutdown).  loop NULL: no lag timer. */
void metrics_start(uv_loop_t *loop);
void metrics_stop(void);
/* The node id every sample is labelled with (node="..."). */
void metrics_set_node(const char *node);
/* The Prometheus text exposition (format 0.0.4: serve it as "text/plain;
 * version=0.0.4; charset=utf-8") of every metric, on the loop thread;
 * mem_malloc'd and NUL-terminated, *len bytes; the caller frees it with
 * mem_free; NULL when out of memory. */
char *metrics_render(size_t *len);

/* Collectors write a subsystem's figures at scrape time (loop thread). */
struct metrics_out;
typedef void (*metrics_collect_fn)(struct metrics_out *o);
int metrics_add_collector(metrics_collect_fn fn); /* once per fn; CHAT_ERR_NOMEM */
void metrics_out_family(struct metrics_out *o, const char *name, const char *help,
                        int type);
/* One sample with at most one label (lk NULL: none) besides node. */
void metrics_out_u64(struct metrics_out *o, const char *name, const char *lk,
                     const char *lv, uint64_t v);
void metrics_out_double(struct metrics_out *o, const char *name, const char *lk,
                        const char *lv, double v);
/* One sample with labels: NULL-terminated name, value pairs. */
void metrics_out_u64_labels(struct metrics_out *o, const char *name,
                            const char *const *labels, uint64_t v);
void metrics_out_hist(struct metrics_out *o, const char *name, const char *lk,
                      const char *lv, const struct metrics_hist *h);

/* The registry of labelled series.  labels: NULL-terminated name, value
 * pairs (NULL: none), fixed for the series.  get: the series (created, or
 * the existing one with its reference count raised); NULL when the name or
 * a label is invalid, the family exists with another type, label names or
 * buckets, or memory ran out.  put: drop a reference (the last frees it). */
struct metrics_series;
struct metrics_series *metrics_series_get(int type, const char *name, const char *help,
                                          const char *const *labels,
                                          const double *bounds, size_t nb);
void metrics_series_put(struct metrics_series *s);
void metrics_series_add(struct metrics_series *s, double v); /* NULL: no-op */
void metrics_series_set(struct metrics_series *s, double v);
void metrics_series_observe(struct metrics_series *s, double v);
double metrics_series_value(const struct metrics_series *s); /* hist: count */

/* chat_host metric_* (ABI 1.6): a plugin's series are named
 * chatd_<plugin>_<name>; each registration is a handle owned by the
 * instance, released by metrics_plugin_release when it is unloaded. */
struct chat_metric *metrics_plugin_register(const struct chat_plugin *self,
                                            const char *pname, int type,
                                            const char *name, const char *help,
                                            const char *const *labels,
                                            const double *bounds, size_t nb);
void metrics_plugin_release(const struct chat_plugin *self);
void metrics_metric_add(struct chat_metric *m, double v);
void metrics_metric_set(struct chat_metric *m, double v);
void metrics_metric_observe(struct chat_metric *m, double v);

/* ---- webfiles.c (the web client's static files; issue 10) ----------- */
/* A set of files read whole from a folder, immutable, reference-counted
 * (loop thread only).  ws.c answers a plain GET/HEAD with it. */
#define WEB_NAME_MAX 1024 /* bytes of a decoded request path */
struct web_files;
/* What web_answer decided: head[0, head_len) then body[0, body_len) are
 * the bytes to write.  body is borrowed from the set (NULL when none):
 * copy it before the set can go (web_files_unref). */
struct web_reply {
    int status;         /* 200, 304, 404, 405 */
    char head[1024];
    size_t head_len;
    const char *body;
    size_t body_len;
};
/* Read every regular file under root (see webfiles.c for what is skipped)
 * into a new set with one reference.  CHAT_OK; CHAT_ERR_INVAL (root is no
 * folder, a file unreadable, over max_bytes or max_files: err says which)
 * or CHAT_ERR_NOMEM, *out NULL.  Blocking I/O: start or reload only. */
int web_load(const char *root, size_t max_bytes, size_t max_files,
             struct web_files **out, char *err, size_t errlen);
struct web_files *web_files_ref(struct web_files *s); /* NULL is fine */
void web_files_unref(struct web_files *s);            /* frees at zero */
size_t web_files_count(const struct web_files *s);
size_t web_files_bytes(const struct web_files *s);
/* The node's current set (NULL: [web] root off); borrowed until the next
 * web_set_current, which takes the caller's reference to s (NULL: off)
 * and drops the old one's.  Listeners read it when they build a ws_conf. */
const struct web_files *web_current(void);
void web_set_current(struct web_files *s);
/* Start and SIGHUP: load c's [web] root (timed and logged) and make it
 * current; root "" drops the current set.  CHAT_OK, or the web_load error
 * (logged; the current set is kept). */
struct conf;
int web_configure(const struct conf *c);
/* The answer to METHOD TARGET (the request target's path; a query or
 * fragment is ignored) with an If-None-Match value (NULL: none).  s NULL
 * answers 404.  Never fails: r always holds a complete response. */
void web_answer(const struct web_files *s, const char *method, const char *target,
                size_t len, const char *if_none_match, struct web_reply *r);
/* The request path decoded into the file name to look up: percent-decoded,
 * no leading '/', "index.html" appended to "" and "dir/".  CHAT_OK;
 * CHAT_ERR_INVAL for NUL, '\\', "//", a "." or ".." segment, a dot-name,
 * a bad escape, or over outlen. */
int web_path(const char *target, size_t len, char *out, size_t outlen);
const char *web_mime(const char *name); /* by extension; static string */

/* ---- rlbucket.c, ratelimit.c (types: struct conf holds them) -------- */
/* A token bucket's setting: rate tokens a second (0: off), burst at most. */
struct rl_rate {
    double rate;
    double burst;
};
#define RL_CLASS_MAX 8
#define RL_CLASS_MSGIDS 16
#define RL_NAME_MAX 32
/* class.NAME = MSGID[,MSGID...] RATE: a per-session bucket for those msgids. */
struct rl_class {
    char name[RL_NAME_MAX];
    int msgids[RL_CLASS_MSGIDS];
    size_t nmsgids;
    struct rl_rate r;
};
struct rl_conf {
    struct rl_rate session_msgs, session_bytes, user_msgs;
    struct rl_rate addr_conns, addr_regs, addr_fails;
    struct rl_class cls[RL_CLASS_MAX];
    size_t ncls;
};
struct rl_bucket {
    double tokens;
    uint64_t at;  /* uv_now() of the last refill; 0: never used (full) */
};
/* The defaults of every key (docs/operations.md). */
void rl_conf_defaults(struct rl_conf *c);
/* "RATE/UNIT [burst N]" (UNIT s, m or h; k and m suffixes: 1024, 1024^2;
 * burst defaults to one second's worth, at least 1), or "off" / "0".
 * 0, or -1 (out untouched in part). */
int rl_parse_rate(const char *s, struct rl_rate *out);
/* "MSGID[,MSGID...] RATE/UNIT [burst N]" for class name; 0 or -1. */
int rl_parse_class(const char *name, const char *s, struct rl_class *out);
/* Milliseconds until b holds cost tokens (capped at the burst), refilled to
 * now (ms); 0 when it does now or the rate is off. */
uint64_t rl_bucket_wait(struct rl_bucket *b, const struct rl_rate *r, uint64_t now,
                        double cost);
/* Take cost tokens (capped at the burst), going into debt if need be. */
void rl_bucket_take(struct rl_bucket *b, const struct rl_rate *r, uint64_t now,
                    double cost);
int rl_bucket_full(struct rl_bucket *b, const struct rl_rate *r, uint64_t now);
/* Refill b to now; milliseconds until b holds want tokens (already
 * refilled; the rate must be on). */
void rl_bucket_refill(struct rl_bucket *b, const struct rl_rate *r, uint64_t now);
uint64_t rl_bucket_need(const struct rl_bucket *b, const struct rl_rate *r, double want);
/* The above: rlbucket.c (leaf); what follows: ratelimit.c (sessions layer). */
struct conf;
/* Start (sweep timer, metrics collector) with c's [limits]; stop frees
 * everything (shutdown).  apply_conf: a reload's [limits]. */
void rl_start(uv_loop_t *loop, const struct conf *c);
void rl_apply_conf(const struct conf *c);
void rl_stop(void);
/* Before the handler of a request of len bytes: 0 run it (a legacy session
 * over a limit runs it and its reads pause); 1 refused (protocol 2: answered
 * 125 with retry_after_ms). */
int rl_check(struct chat_session *s, const struct chat_ack *ack, size_t len);
/* A new connection from the address key (v6: an IPv6 /64): 1 over addr_conns. */
int rl_conn(int v6, int64_t key);
/* A failed login from s's address (host table, ABI 1.7). */
void rl_login_failed(struct chat_session *s);

/* ---- conf.c ----------------------------------------------------------- */
struct conf_kv {
    char *key;
    char *val;
    int line;
};
struct conf_section {
    char *name;   /* plugin name for [plugin.NAME] */
    struct conf_kv *kv;
    size_t nkv;
};
/* An address or network of the [server] trusted list: family AF_INET or
 * AF_INET6, the address in network order (4 or 16 bytes used), prefix bits. */
struct conf_cidr {
    int family;
    unsigned char addr[16];
    unsigned bits;
};
/* One [server] listen endpoint (SCHEME://HOST:PORT[/PATH]; a bare
 * HOST:PORT is tcp).  The scheme names a transport (net.c's table). */
struct conf_listen {
    char scheme[8];    /* "tcp", "tls", "ws", "wss" */
    char *host;        /* numeric IPv4 or IPv6, without brackets */
    int port;
    char *path;        /* ws, wss: the request path ("/chat"); else NULL */
};
struct conf {
    char *path;            /* the file read */
    char *dir;             /* its directory, for relative paths */
    /* [server] */
    char *listen_host;
    int listen_port;
    int log_level;
    int log_format;        /* LOG_FORMAT_* */
    char *log_file;        /* absolute; "" = stderr */
    int max_connections;
    size_t max_frame;
    int idle_timeout_s;    /* 0: none */
    int request_timeout_s; /* first byte to last of one request; 0: none */
    int max_conns_per_addr;   /* per IPv4 address / IPv6 /64; 0: none */
    int max_unauth_per_addr;  /* of those, not logged in; 0: none */
    struct conf_cidr *trusted; /* exempt from the per-address caps */
    size_t ntrusted;
    int keepalive_idle_s;  /* TCP keepalive: idle before probing; 0: off */
    int keepalive_intvl_s; /* between probes */
    int keepalive_cnt;     /* unanswered probes (without a user timeout) */
    int user_timeout_s;    /* TCP_USER_TIMEOUT; 0: the kernel's default */
    size_t max_output;     /* bytes of unsent output per session */
    int legacy_pace_ms;    /* gap between two messages to a legacy session */
    int max_members;       /* top-level members of one request */
    size_t login_ack_max;  /* bytes of one login ack (the rest follows) */
    int login_part_timeout_ms;
    int threadpool_size;
    int worker_nice;       /* nice of the worker threads (hashing) */
    int workers;           /* processes sharing the port (SO_REUSEPORT) */
    char *node_id;         /* "" -> generated */
    int proxy_protocol;    /* 1: a PROXY header opens every connection */
    /* [plugins] */
    char *plugin_dir;      /* absolute */
    char **plugins;        /* enabled, in order */
    size_t nplugins;
    int plugins_line;      /* line of "enabled", for error messages */
    /* [mysql]; have_mysql 0 when the section is absent */
    int have_mysql;
    char *my_host, *my_user, *my_password, *my_database, *my_socket;
    int my_port, my_pool_size, my_queue_max, my_connect_timeout_s;
    char *sql_dir;         /* migrations, absolute */
    /* [redis]; have_redis 0 when absent (single-node bus) */
    int have_redis;
    char *rd_host;
    int rd_port;
    int rd_heartbeat_ttl_s;
    /* [admin] (admin.c): listen address, port 0 when "off"; token "" none */
    char *admin_host;
    int admin_port;
    char *admin_token;
    /* [limits] (ratelimit.c) */
    struct rl_conf limits;
    /* [ws] (the WebSocket transport, core/ws.c) */
    char **ws_origins;     /* allowed Origin values; none: no check */
    size_t nws_origins;
    size_t ws_max_message; /* bytes of one message; default [server] max_frame */
    int ws_ping_interval_s;     /* 0: no pings */
    int ws_pong_timeout_s;
    int ws_handshake_timeout_s; /* accept to the end of the upgrade request */
    /* [server] listen, every endpoint (listen_host/port: the first one) */
    struct conf_listen *listens;
    size_t nlistens;
    /* [tls] (tls.c): files absolute, "" when unset */
    char *tls_cert, *tls_key, *tls_ca;
    char *tls_ciphers, *tls_groups;
    int tls_min_version;   /* 0x0303 (TLS 1.2) or 0x0304 (TLS 1.3) */
    int tls_handshake_timeout_s;
    /* [web] (webfiles.c): the web client's files; root "" = off */
    char *web_root;        /* absolute */
    size_t web_max_bytes;
    int web_max_files;
    /* [plugin.NAME] sections */
    struct conf_section *sections;
    size_t nsections;
};
/* Parse and validate. On error returns NULL and writes "file:line: reason"
 * into err. The result is freed with conf_free. */
struct conf *conf_load(const char *path, char *err, size_t errlen);
void conf_free(struct conf *c);
const struct conf_section *conf_section(const struct conf *c, const char *plugin);
const char *conf_section_get(const struct conf_section *sec, const char *key);
/* Parse "host:port"; 0 or CHAT_ERR_INVAL. *host is mem_strdup'd. */
int conf_parse_hostport(const char *s, char **host, int *port);
/* A numeric IPv4 or IPv6 address (listen addresses are never resolved). */
int conf_ip_ok(const char *host);
/* Parse a listen value: endpoints separated by commas, each
 * [SCHEME://]HOST:PORT[/PATH] (scheme tcp, tls, ws or wss; HOST numeric,
 * IPv6 in brackets; a path only for ws/wss, "/" when absent).  On success
 * *out (mem_malloc'd, n entries) replaces nothing: free it with
 * conf_listen_free.  CHAT_ERR_INVAL with the bad endpoint in bad, or
 * CHAT_ERR_NOMEM. */
int conf_parse_listen(const char *v, struct conf_listen **out, size_t *n, char *bad,
                      size_t badlen);
void conf_listen_free(struct conf_listen *l, size_t n);
/* Parse "ADDR" or "ADDR/BITS" (numeric IPv4 or IPv6); 0 or CHAT_ERR_INVAL. */
int conf_parse_cidr(const char *s, struct conf_cidr *out);
/* 1 when the address (family, bytes in network order) is inside c. */
int conf_cidr_match(const struct conf_cidr *c, int family, const unsigned char *addr);

/* ---- frame.c ---------------------------------------------------------- */
/* Incremental splitter for a stream of JSON objects separated by optional
 * NUL, '\n', '\r', ' ', '\t'.  The state survives between reads. */
struct frame_scanner {
    size_t max;        /* maximum frame size in bytes */
    size_t len;        /* bytes of the current frame seen so far (0: between) */
    int depth;         /* {} / [] nesting depth */
    unsigned char in_str, esc;
};
enum frame_status {
    FRAME_NEED_MORE = 0, /* consumed everything; no complete frame */
    FRAME_COMPLETE = 1,  /* a frame ends at *used (exclusive) */
    FRAME_TOO_LARGE = -1,/* the current frame exceeds max */
    FRAME_GARBAGE = -2   /* a byte that cannot start a frame (not '{') */
};
void frame_init(struct frame_scanner *fs, size_t max);
/* Scan buf[0..len).  Sets *used to the bytes consumed and, for
 * FRAME_COMPLETE, *start to the offset where the frame began in buf (or -1
 * when it began in an earlier buffer).  Separators before a frame are
 * skipped.  For FRAME_GARBAGE, *used includes the offending byte, which is
 * skipped (the seed ignores garbage; the caller decides what to tell). */
int frame_scan(struct frame_scanner *fs, const char *buf, size_t len,
               size_t *used, long *start);

/* ---- proxyproto.c ----------------------------------------------------- */
/* The PROXY protocol header (haproxy's proxy-protocol.txt, v1 and v2) a
 * balancer sends before a connection's own bytes ([server] proxy_protocol).
 * pp_parse(buf, len, h, used) looks at the first len bytes of a connection
 * (borrowed; nothing is kept) and answers:
 *   PP_NEED_MORE  no verdict yet: call again with more bytes (never for
 *                 len >= PP_MAX_HEADER, so a buffer of that size suffices);
 *   PP_DONE       a whole header of *used bytes; the connection's own bytes
 *                 follow it.  h->command PP_PROXY: h->src (the client) and
 *                 h->dst hold an AF_INET or AF_INET6 address and port;
 *                 PP_LOCAL (v1 UNKNOWN, v2 LOCAL or AF_UNSPEC): use the
 *                 socket's own addresses;
 *   PP_INVALID    not a valid header; h->err names why (a static string).
 * A longer input never changes a verdict a shorter one gave. */
#define PP_V2_MAX_LEN 512                 /* address block + TLVs accepted */
#define PP_MAX_HEADER (16 + PP_V2_MAX_LEN)
enum pp_status { PP_INVALID = -1, PP_NEED_MORE = 0, PP_DONE = 1 };
enum pp_command { PP_LOCAL = 0, PP_PROXY = 1 };
struct pp_header {
    int version;                          /* 1 or 2 */
    int command;                          /* enum pp_command */
    struct sockaddr_storage src, dst;     /* PP_PROXY only */
    const char *err;                      /* PP_INVALID only */
};
int pp_parse(const char *buf, size_t len, struct pp_header *h, size_t *used);

/* ---- jsonstr.c -------------------------------------------------------- */
/* cJSON's strings stop at the first NUL; these work on the raw frame text.
 * json_member_raw: in the JSON object text obj[0..len) (already validated by
 * cJSON), find the top-level member named key and return a pointer to its raw
 * value text (borrowed from obj), with *vlen set; NULL if absent.
 * json_unescape: decode the JSON string literal lit[0..len) (with quotes) into
 * bytes; returns a mem_malloc'd NUL-terminated buffer (caller frees with
 * mem_free) and *outlen, or NULL if lit is not a valid string literal.
 * json_quote: the JSON string literal (with quotes) for bytes s[0..len);
 * control characters and NUL escaped, UTF-8 passed through; mem_malloc'd. */
const char *json_member_raw(const char *obj, size_t len, const char *key,
                            size_t *vlen);
/* json_scan_object: validate obj[0..len) as exactly one JSON object (RFC
 * 8259, strict: no raw control characters in strings, no leading zeros;
 * surrounding whitespace and trailing NULs allowed) without allocating, and
 * record its first max top-level members (key body without quotes, raw
 * value).  Returns the number of members (more than max when some were not
 * recorded), JSON_SCAN_SYNTAX when the text is not such an object, or
 * JSON_SCAN_UTF8 when a string holds bytes that are not UTF-8 (RFC 3629).
 * json_span_find: the first recorded member named key (escapes decoded).
 * json_span_dup: the index of the first member whose key decodes to the same
 * bytes as an earlier one's, -1 when every key is unique, -2 when n is over
 * JSON_SPAN_DUP_MAX; linear time. */
#define JSON_SCAN_SYNTAX (-1)
#define JSON_SCAN_UTF8 (-2)
#define JSON_SPAN_DUP_MAX 1024
struct json_span {
    const char *key;
    size_t klen;
    const char *val;
    size_t vlen;
};
long json_scan_object(const char *obj, size_t len, struct json_span *m, size_t max);
const struct json_span *json_span_find(const struct json_span *m, size_t n,
                                       const char *key);
long json_span_dup(const struct json_span *m, size_t n);
char *json_unescape(const char *lit, size_t len, size_t *outlen);
char *json_quote(const char *s, size_t len, size_t *outlen);

/* ---- net.c ------------------------------------------------------------ */
struct net_session;                 /* == struct chat_session */
int net_start(uv_loop_t *loop, const struct conf *c);
void net_apply_conf(const struct conf *c); /* limits on reload */
/* What net reports upward, through callbacks main.c (wire.c) registers
 * before net_start: net calls no layer above it.
 * - unsent: a closing session's unwritten deliveries (user, message text);
 *   sess_undeliverable.
 * - frame: one complete frame of s (disp_frame); required.
 * - error: a framing error net found itself, for a client to be told
 *   (sess_proto_error).
 * - open: a session was accepted (sess_open).
 * - closing: s begins to close, still registered to its user, which net
 *   unbinds after the call; graceful 0 means no more output reaches the
 *   peer (sess_closing: the NOTICE through net_send_last, the close event,
 *   the presence release). */
typedef void (*net_unsent_fn)(int64_t uid, const char *json, size_t len);
typedef void (*net_frame_fn)(struct chat_session *s, const char *buf, size_t len);
typedef void (*net_error_fn)(struct chat_session *s, int errno_, const char *errmsg);
typedef void (*net_session_fn)(struct chat_session *s);
typedef void (*net_closing_fn)(struct chat_session *s, int errno_, const char *why,
                               int graceful);
/* - admit: a new connection from the address (v6, key: as net counts them)
 *   is over a rate and is refused when this returns non-zero (rl_conn). */
typedef int (*net_admit_fn)(int v6, int64_t key);
void net_on_unsent(net_unsent_fn cb);
void net_on_frame(net_frame_fn cb);
void net_on_error(net_error_fn cb);
void net_on_open(net_session_fn cb);
void net_on_closing(net_closing_fn cb);
void net_on_admit(net_admit_fn cb);
/* Only from the closing callback: queue json + '\n' after the deliveries
 * held for a pending login ack, on a session already closing (its last
 * words).  CHAT_ERR_NOMEM. */
int net_send_last(struct chat_session *s, const char *json, size_t len);
void net_stop_accepting(void);
/* SIGHUP (main.c): every tls endpoint loads [tls] cert and key again for
 * new handshakes; a pair that does not load keeps the old one (logged). */
void net_reload_tls(const struct conf *c);
/* chatd -t: every listen scheme has a transport in this build; 0, or -1
 * with "listen SCHEME://...: no SCHEME transport in this build" in err. */
int net_check_conf(const struct conf *c, char *err, size_t errlen);
/* Close every session gracefully (flush, notice for protocol 2); calls
 * done when all are closed. */
void net_shutdown(void (*done)(void));
struct chat_session *net_session_get(uint64_t id);
struct chat_session *net_session_by_user(int64_t uid);
uint64_t net_session_id(const struct chat_session *s);
int net_session_proto(const struct chat_session *s);
void net_session_set_proto(struct chat_session *s, int proto);
int64_t net_session_user(const struct chat_session *s);
const char *net_session_name(const struct chat_session *s);
const char *net_session_name_len(const struct chat_session *s, size_t *len);
const char *net_session_peer(const struct chat_session *s);
/* Bind/unbind the user (local map only; presence is the bus's). */
int net_session_bind(struct chat_session *s, int64_t uid, const char *name,
                     size_t name_len);
void net_session_unbind(struct chat_session *s);
/* Multi-device (CHAT_LOGIN_MULTI): bind with multi set joins the user's
 * other local sessions (net_session_by_user returns the newest) instead of
 * failing with CHAT_ERR_EXISTS; next_device walks them, newest first,
 * closing ones included (NULL at the end). */
int net_session_bind_ex(struct chat_session *s, int64_t uid, const char *name,
                        size_t name_len, int multi);
struct chat_session *net_session_next_device(const struct chat_session *s);
int net_session_closing(const struct chat_session *s);
/* Queue json + '\n'.  CHAT_ERR_CLOSED on a closing session.  Enforces
 * max_output on what is already pending before this message (closes the
 * session, returns CHAT_ERR_BUSY); one message alone never trips it. */
int net_send(struct chat_session *s, const char *json, size_t len);
/* Same, but for messages delivered from other users: held while the
 * session's login ack is pending. */
int net_deliver(struct chat_session *s, const char *json, size_t len);
void net_hold(struct chat_session *s, int on); /* login ack pending */
/* Called when everything queued before it was written (or the session
 * closed: ok=0).  One-shot. */
int net_on_flushed(struct chat_session *s, void (*cb)(int ok, void *ud), void *ud);
void net_close(struct chat_session *s, int errno_, const char *why);
size_t net_session_count(void);
/* uv_now() when s was accepted. */
uint64_t net_session_connected_at(const struct chat_session *s);
/* Walk the sessions not closing, newest first: net_session_next(NULL) is
 * the first.  Closing a session while walking: take its successor first. */
struct chat_session *net_session_next(const struct chat_session *s);
/* Rate limits (ratelimit.c): stop (pause 1) or restart reading from s;
 * 0, or -1 when s is closing or reading cannot start (then it closes). */
int net_read_pause(struct chat_session *s, int pause);
/* The key s's address is counted under (IPv4 whole, *v6 set for an IPv6
 * /64): 0, or -1 when it is not counted (trusted, or unknown). */
int net_session_addr_key(const struct chat_session *s, int *v6, int64_t *key);
/* Test seam (fuzzer, unit tests): a session without a socket whose output
 * is dropped; net_test_feed() runs bytes through framing and dispatch. */
struct chat_session *net_test_session(uv_loop_t *loop, size_t max_frame);
void net_test_feed(struct chat_session *s, const char *buf, size_t n);
/* As a message transport (NET_TR_MESSAGES, transport.h) hands net one
 * whole message: exactly one JSON object, else a protocol error. */
void net_test_message(struct chat_session *s, const char *buf, size_t n);

/* ---- dispatch.c ------------------------------------------------------- */
/* Handle one complete frame of session s (net's frame callback). */
void disp_frame(struct chat_session *s, const char *buf, size_t len);
/* The handlers, registered by main.c (wire.c) before the first frame:
 * find msgid's (NULL: none; plug_handler), run one for a request with its
 * instance referenced, counted and timed (plug_run_handler). */
struct plug_handler;
typedef const struct plug_handler *(*disp_find_fn)(int msgid);
typedef void (*disp_run_fn)(const struct plug_handler *h, struct chat_session *s,
                            const struct chat_request *req);
void disp_on_handlers(disp_find_fn find, disp_run_fn run);
/* [server] max_members: top-level members a request may have (the strict
 * scan refuses more, and refuses a key that appears twice). */
#define DISP_MAX_MEMBERS_DEF 128
/* "seq" is echoed as a JSON number: at most 2^53 - 1 either way, where a
 * double (what most clients parse numbers into) is exact. */
#define DISP_SEQ_MAX INT64_C(9007199254740991)
void disp_configure(size_t max_members);
/* Protocol-level error for s (protocol 2 gets a reply, legacy a log line). */
void disp_error(struct chat_session *s, const struct chat_ack *ack, int errno_,
                const char *errmsg);
/* Build and send a protocol-2 reply (see chat_host.reply). */
int disp_reply(struct chat_session *s, const struct chat_ack *ack, int errno_,
               const char *errmsg, const cJSON *body);
/* The protocol-2 reply object (caller deletes it). */
cJSON *disp_reply_object(const struct chat_ack *ack, int errno_, const char *errmsg,
                         const cJSON *body);
/* Serialise obj and queue it (deliver: held while a login ack is pending). */
int disp_send_json(struct chat_session *s, const cJSON *obj, int deliver);
/* host->req_field_raw / req_field_str. */
const char *disp_field_raw(const struct chat_request *req, const char *key, size_t *len);
const char *disp_field_str(const struct chat_request *req, const char *key, size_t *len);
/* Member key of object o as an integer in [lo, hi]: 1 and *out, 0 when
 * absent, -1 when not an integral number in range. */
int disp_json_int(const cJSON *o, const char *key, int64_t lo, int64_t hi,
                  int64_t *out);
/* Member key of the request (recorded spans, or its cJSON tree) as an
 * integer in [lo, hi]: 1 and *out, 0 when absent, -1 otherwise. */
int disp_req_int(const struct chat_request *req, const char *key, int64_t lo,
                 int64_t hi, int64_t *out);
/* host->req_forward. */
const char *disp_forward(struct chat_session *s, const struct chat_request *req,
                         size_t *len);

/* ---- plugin.c --------------------------------------------------------- */
struct plug_inst;                   /* == struct chat_plugin */
struct plug_handler {
    struct chat_plugin *inst;
    chat_handler_fn fn;
    void *ud;
    unsigned flags; /* CHAT_HANDLER_* */
    struct metrics_series *latency; /* chatd_handler_seconds{plugin} or NULL */
    struct metrics_series *calls;   /* chatd_handler_calls_total{plugin} or NULL */
};
struct plug_hook {
    struct chat_plugin *inst;
    chat_hook_fn fn;
    void *ud;
};
int plug_start(uv_loop_t *loop, const struct conf *c); /* load all; -1 on error */
/* Check a config and its plugins without running them (chatd -t). */
int plug_check(const struct conf *c, char *err, size_t errlen);
void plug_reload(void);              /* SIGHUP: asynchronous */
/* plug_reload, then done(ok, what, ud) once the reload that starts after
 * this call has finished: ok 1 when the file was read and every plugin
 * loaded, else 0 with what failed in msg (borrowed for the call).  Runs
 * on a later loop turn, never inside this call.  CHAT_ERR_NOMEM: done
 * never runs. */
int plug_reload_ex(void (*done)(int ok, const char *msg, void *ud), void *ud);
size_t plug_active(void);            /* instances in the active set */
void plug_stop(void);                /* retire everything (shutdown) */
size_t plug_live(void);              /* instances not yet unloaded */
const struct plug_handler *plug_handler(int msgid);
/* host->msgid_handled (ABI 1.10): 1 when a live handler takes msgid. */
int plug_msgid_handled(int msgid);
/* Run h for one request (dispatch's run callback): h's instance stays
 * referenced for the call, which is counted and, one in 16, timed. */
void plug_run_handler(const struct plug_handler *h, struct chat_session *s,
                      const struct chat_request *req);
/* The table handed to every plugin's init (&host_table, set by main.c
 * before plug_start; unset, init is refused with CHAT_ERR_STATE). */
void plug_set_host(const struct chat_host *h);
/* After a reload has swapped in its config: apply it to the layers below
 * (main.c: net limits, login ack bounds, max_members). */
void plug_on_conf(void (*apply)(const struct conf *c));
/* Fire an event to every hook, in load order; returns how many ran. */
int plug_fire(int event, const void *arg);
/* The config in force (owned by plugin.c once plug_start took it). */
const struct conf *plug_current_conf(void);
void plug_free_conf(void);
void plug_ref(struct chat_plugin *p);
void plug_unref(struct chat_plugin *p);
const char *plug_name(const struct chat_plugin *p);
int plug_in_init(const struct chat_plugin *p);
/* Registration (called from the host table during init). */
int plug_register_handler(struct chat_plugin *p, int msgid, chat_handler_fn fn, void *ud);
int plug_register_handler_ex(struct chat_plugin *p, int msgid, chat_handler_fn fn,
                             void *ud, unsigned flags);
int plug_register_hook(struct chat_plugin *p, int event, chat_hook_fn fn, void *ud);
int plug_register_login_part(struct chat_plugin *p, const char *key,
                             chat_login_part_fn part_fn, chat_login_sent_fn sent_fn,
                             void *ud);
int plug_register_login_messages(struct chat_plugin *p, const char *key,
                                 chat_login_part_fn part_fn,
                                 chat_login_written_fn written_fn, void *ud);
const struct conf_section *plug_conf(const struct chat_plugin *p);
/* Timers owned by an instance. */
struct chat_timer *plug_timer_start(struct chat_plugin *p, uint64_t timeout_ms,
                                    uint64_t repeat_ms, chat_timer_fn fn, void *ud);
void plug_timer_stop(struct chat_timer *t);
/* Login parts of the active instances, in load order. */
struct plug_login_part {
    struct chat_plugin *inst;
    char *key;
    chat_login_part_fn part_fn;
    chat_login_sent_fn sent_fn;
    chat_login_written_fn written_fn; /* non-NULL: a part of messages */
    void *ud;
};
size_t plug_login_parts(const struct plug_login_part **parts);

/* ---- session.c -------------------------------------------------------- */
/* The sessions layer: login, logout, opening and closing, delivery with an
 * outcome, worker jobs.  It reaches the plugins only through what main.c
 * registers with sess_on_plugins (fire: plug_fire; ref/unref: plug_ref,
 * plug_unref); unset, events reach nobody and nothing is referenced. */
void sess_init(uv_loop_t *loop); /* the loop worker jobs are queued on */
void sess_on_plugins(int (*fire)(int event, const void *arg),
                     void (*ref)(struct chat_plugin *p),
                     void (*unref)(struct chat_plugin *p));
/* uid's newest session that is not closing, or NULL (host->session_by_user);
 * sess_next_device: the next older one (multi-device), or NULL. */
struct chat_session *sess_live(int64_t uid);
struct chat_session *sess_next_device(const struct chat_session *s);
/* net's callbacks: CHAT_EV_SESSION_OPEN; the closing session's NOTICE,
 * CHAT_EV_SESSION_CLOSE and presence release; a framing error. */
void sess_open(struct chat_session *s);
void sess_closing(struct chat_session *s, int errno_, const char *why, int graceful);
void sess_proto_error(struct chat_session *s, int errno_, const char *errmsg);
/* host->session_logout, req_auth, work, session_login(_len), deliver_ex,
 * undeliverable_claim and delivery_done (sess_delivery_stored). */
int sess_logout(struct chat_session *s);
int64_t sess_req_auth(struct chat_session *s, const struct chat_request *req);
int sess_work(struct chat_plugin *self, chat_work_fn fn, chat_done_fn done, void *ud);
/* Nice value worker threads take before their first job (0: unchanged). */
void sess_set_work_nice(int nice);
int sess_login(struct chat_plugin *self, struct chat_session *s, int64_t uid,
               const char *name, int flags, chat_login_cb cb, void *ud);
int sess_login_len(struct chat_plugin *self, struct chat_session *s, int64_t uid,
                   const char *name, size_t name_len, int flags, chat_login_cb cb,
                   void *ud);
int sess_deliver_ex(struct chat_plugin *self, int64_t from, int64_t uid,
                    const char *json, size_t len, chat_deliver_cb cb,
                    const void *ctx, size_t ctx_len);
struct chat_delivery *sess_undeliverable_claim(const struct chat_ev_undeliverable *ev);
void sess_delivery_stored(struct chat_delivery *d, int status);
/* Fire CHAT_EV_UNDELIVERABLE for uid (no ticket: nobody waits; net's
 * unsent callback). */
void sess_undeliverable(int64_t uid, const char *json, size_t len);
/* The same with the pending outcome d of a deliver_ex (may be NULL): a
 * ticket no hook claims completes with CHAT_ERR_UNAVAILABLE.  The bus's
 * undeliverable callback. */
void sess_undeliverable_t(int64_t uid, const char *json, size_t len,
                          struct chat_delivery *d);
/* Complete d: run its callback, drop its reference, free it (the bus's
 * delivered callback). */
void sess_delivery_done(struct chat_delivery *d, int status);

/* ---- loginack.c ------------------------------------------------------- */
/* What the login ack needs of the plugin registry, registered by main.c
 * (wire.c) with ack_init before the first login (all four set):
 * plug_login_parts, plug_name, plug_ref, plug_unref.  loop: the part
 * timers'. */
struct plug_login_part;
struct ack_plugins {
    size_t (*parts)(const struct plug_login_part **parts);
    const char *(*name)(const struct chat_plugin *p);
    void (*ref)(struct chat_plugin *p);
    void (*unref)(struct chat_plugin *p);
};
void ack_init(uv_loop_t *loop, const struct ack_plugins *plugins);
int ack_begin(struct chat_plugin *self, struct chat_session *s,
              const struct chat_ack *ack, const cJSON *base,
              chat_login_done_fn done_fn, void *ud);
void ack_part_set(struct chat_login *l, cJSON *value, void *state);
int ack_proto(const struct chat_login *l);
/* [server] login_part_timeout_ms, login_ack_max and max_output. */
void ack_configure(const struct conf *c);

/* ---- db.c ------------------------------------------------------------- */
struct db_stats {
    uint64_t queued;      /* jobs waiting now */
    uint64_t in_flight;   /* jobs on a connection now */
    uint64_t done;        /* completed */
    uint64_t errors;      /* completed with an error */
    uint64_t latency_us_total; /* sum of queue+run time of completed jobs */
    uint64_t latency_us_max;
    uint64_t accepted;    /* jobs accepted */
    uint64_t refused;     /* db_query/db_txn calls refused: queue full */
    uint64_t reconnects;  /* connections re-established after a loss */
    uint64_t connect_failures; /* connect attempts that failed */
    uint64_t conns;       /* pool size */
    uint64_t conns_up;    /* connections up now */
    struct metrics_hist latency; /* queue+run seconds of completed jobs */
};
/* Start the pool (no-op returning 0 when !c->have_mysql: every query then
 * fails with CHAT_ERR_UNAVAILABLE). */
int db_start(uv_loop_t *loop, const struct conf *c);
/* How a query keeps its plugin's code loaded until its callback has run:
 * plug_ref and plug_unref, registered by main.c (wire.c) before db_start. */
void db_on_ref(void (*ref)(struct chat_plugin *p), void (*unref)(struct chat_plugin *p));
/* Shutdown, on the loop thread: refuse new calls, fail what is queued with
 * CHAT_ERR_CLOSED, let running jobs finish, join the threads, then run every
 * outstanding callback before returning (so none is lost). */
void db_stop(void);
int db_query(struct chat_plugin *self, const char *sql,
             const struct chat_db_param *params, size_t nparams, chat_db_cb cb,
             void *ud);
int db_txn(struct chat_plugin *self, const struct chat_db_stmt *stmts,
           size_t nstmts, chat_db_cb cb, void *ud);
int db_error(const struct chat_db_result *r);
int db_errno(const struct chat_db_result *r);
const char *db_errmsg(const struct chat_db_result *r);
size_t db_nrows(const struct chat_db_result *r);
size_t db_ncols(const struct chat_db_result *r);
int db_is_null(const struct chat_db_result *r, size_t row, size_t col);
int64_t db_int(const struct chat_db_result *r, size_t row, size_t col);
const char *db_str(const struct chat_db_result *r, size_t row, size_t col, size_t *len);
uint64_t db_affected(const struct chat_db_result *r);
uint64_t db_insert_id(const struct chat_db_result *r);
const struct chat_db_result *db_sub(const struct chat_db_result *r, size_t i);
void db_get_stats(struct db_stats *st);
/* Connections of the pool that are up now; -1 without a pool ([mysql]
 * absent, or stopped). */
int db_conns_up(void);
/* chatd --migrate: blocking; applies sql/NNN_*.sql not yet in
 * schema_version.  Returns 0 or -1 (logged). Never called on the loop. */
int db_migrate(const struct conf *c);

/* ---- bus.c ------------------------------------------------------------ */
/* What the bus reports upward: function pointers main.c (wire.c) registers
 * with bus_on() before bus_start (copied; any left NULL does nothing, but
 * deliver and close must be set with live).
 * - live: uid's local session unless it is closing, or NULL (sess_live);
 * - deliver, close: net_deliver, net_close on such a session;
 * - undeliverable: a message no session took, with its pending outcome d
 *   or NULL (sess_undeliverable_t);
 * - delivered: d's message went out (sess_delivery_done(d, CHAT_OK));
 * - broadcast: a plugin broadcast to fire here (CHAT_EV_BROADCAST);
 * - ref, unref: keep the instance behind a presence query loaded until its
 *   callback has run (plug_ref, plug_unref). */
struct bus_calls {
    struct chat_session *(*live)(int64_t uid);
    int (*deliver)(struct chat_session *s, const char *json, size_t len);
    void (*close)(struct chat_session *s, int errno_, const char *why);
    void (*undeliverable)(int64_t uid, const char *json, size_t len,
                          struct chat_delivery *d);
    void (*delivered)(struct chat_delivery *d, int status);
    void (*broadcast)(const struct chat_ev_broadcast *ev);
    void (*ref)(struct chat_plugin *p);
    void (*unref)(struct chat_plugin *p);
    /* multi-device: the user's next live local session after s, or NULL
     * (sess_next_device); NULL: one session per user */
    struct chat_session *(*next)(const struct chat_session *s);
};
void bus_on(const struct bus_calls *calls);
/* Connect to Redis (or run single-node when !c->have_redis). */
int bus_start(uv_loop_t *loop, const struct conf *c);
void bus_stop(void);  /* release this node's presence, disconnect */
int bus_finished(void); /* bus_stop has completed (or the bus never ran) */
const char *bus_node_id(void);
int bus_connected(void);
int bus_deliver(int64_t uid, const char *json, size_t len);
/* A live local session (and nothing of uid's still routed): queue json to
 * it now.  CHAT_OK, or CHAT_ERR_NOTFOUND (use bus_deliver_t). */
int bus_deliver_local(int64_t uid, const char *json, size_t len);
/* bus_deliver with a pending outcome d (NULL: as bus_deliver).  CHAT_OK:
 * delivered locally now, d untouched; CHAT_DELIVER_PENDING: d taken and
 * completed later (delivered, or through the undeliverable callback); an error:
 * d untouched. */
int bus_deliver_t(int64_t uid, const char *json, size_t len,
                  struct chat_delivery *d);
int bus_presence_query(struct chat_plugin *self, const int64_t *uids, size_t n,
                       chat_presence_cb cb, void *ud);
/* Claim uid for this node.  cb(status): CHAT_OK claimed; CHAT_ERR_EXISTS held
 * by a live node (and !(flags & CHAT_LOGIN_REPLACE)).  With REPLACE the old
 * holder is told to close its session.  Redis down: CHAT_OK (local only; the
 * claim is re-announced on reconnect). */
int bus_claim(int64_t uid, int flags, void (*cb)(int status, void *ud), void *ud);
/* Drop uid's presence if this node holds it (a multi-device claim: one
 * device's). */
void bus_release(int64_t uid);
/* Multi-device.  During a granted claim's cb: the user's devices online in
 * the cluster, this one included (with CHAT_LOGIN_REPLACE, 2 when a live
 * holder was replaced; Redis down: this node's claims).  A CHAT_LOGIN_MULTI
 * claim over CHAT_LOGIN_DEVICES_OF(flags) completes with CHAT_ERR_BUSY.
 * bus_deliver_devices: json to every live session of uid here but except,
 * and quietly to the user's other nodes (host deliver_devices). */
int bus_claim_devices(void);
int bus_deliver_devices(int64_t uid, const struct chat_session *except,
                        const char *json, size_t len);
/* Publish to every node's CHAT_EV_BROADCAST hooks (the broadcast callback) for plugin
 * name, this node included (asynchronously: never inside this call). */
int bus_broadcast(const char *plugin, const char *data, size_t len);
/* The core's own broadcasts (admin actions): bus_broadcast(BUS_CORE, ...)
 * reaches cb on every node instead of the plugins' hooks.  "@" is not a
 * plugin name character, so no plugin can send or receive these. */
#define BUS_CORE "@core"
void bus_on_core(void (*cb)(const char *data, size_t len));
/* Redis is configured ([redis] present). */
int bus_configured(void);
/* Rate limits (ratelimit.c): a user's bucket between nodes, as the wall
 * time (ms) at which it is full again.  set: SET with an expiry of px ms,
 * fire and forget.  get: cb(uid, full_at, ud) later when the key exists
 * (never when Redis is down or the key is absent; never inside the call). */
void bus_rl_user_set(int64_t uid, int64_t full_at, int64_t px);
void bus_rl_user_get(int64_t uid, void (*cb)(int64_t uid, int64_t full_at, void *ud),
                     void *ud);

/* The plugins' key-value store (host kv_get/kv_set/kv_del, ABI 1.8, auth
 * cache): plugin is the caller's name, the key's namespace. */
int bus_kv_get(struct chat_plugin *self, const char *plugin, const char *key,
               chat_kv_cb cb, void *ud);
int bus_kv_set(const char *plugin, const char *key, const char *val, size_t len,
               uint64_t ttl_ms);
int bus_kv_del(const char *plugin, const char *key);

/* ---- host.c ----------------------------------------------------------- */
/* The table handed to plugins: pointers into the layers below, nothing
 * more. */
extern const struct chat_host host_table;

/* ---- wire.c ----------------------------------------------------------- */
/* main.c's wiring (top layer): register every upward callback (net, db,
 * bus, dispatch, the login ack, the sessions layer, the plugin registry)
 * and start the deferral queue on loop.  Call first, before any *_start. */
void wire_core(uv_loop_t *loop);
/* A config's live settings, applied to net, the rate limits, the login ack
 * and dispatch (after a reload; at start net_start and rl_start apply
 * theirs). */
void wire_apply_conf(const struct conf *c);

/* ---- admin.c ---------------------------------------------------------- */
/* The admin listener ([admin] listen; see the top of admin.c).  Top layer:
 * only main.c calls these. */
int admin_start(uv_loop_t *loop, const struct conf *c); /* -1: cannot listen */
void admin_stop(void);     /* close the listener and every admin connection */
int admin_draining(void);  /* POST /drain was accepted */

/* ---- admin_http.c ----------------------------------------------------- */
/* Request parsing and routing, apart from the sockets (the fuzz target
 * drives these).  adm_req_feed: 0 needs more, 1 complete (bytes after the
 * first request are ignored), else the HTTP status to answer (400, 413,
 * 414, 431, 500).  adm_req_free frees the body, not r. */
#include <http_parser.h>
struct adm_req {
    http_parser hp;
    size_t head;           /* bytes before the end of the headers */
    size_t hbytes;         /* bytes of header names and values (+4 each) */
    int status, complete, headers_done, in_value, have_auth, method;
    char url[2048 + 1];
    size_t url_len;
    char field[32];        /* current header name, lower case, truncated */
    size_t field_len;
    char auth[512 + 1];    /* the Authorization value */
    size_t auth_len;
    char *body;            /* mem_malloc'd, NUL-terminated */
    size_t body_len;
};
enum adm_ep {
    ADM_EP_NONE, ADM_EP_METRICS, ADM_EP_HEALTHZ, ADM_EP_READYZ, ADM_EP_SESSIONS,
    ADM_EP_PRESENCE,
    /* from here on: POST, with the token */
    ADM_EP_KICK, ADM_EP_NOTICE, ADM_EP_RELOAD, ADM_EP_DRAIN
};
struct adm_route {
    enum adm_ep ep;
    int post;              /* the endpoint needs POST and the token */
    int64_t uid;           /* /users/<uid>/... */
    const char *query;     /* borrowed from the request's url */
    size_t qlen;
};
void adm_req_init(struct adm_req *r);
int adm_req_feed(struct adm_req *r, const char *buf, size_t len);
void adm_req_free(struct adm_req *r);
/* 0 and *rt, or 400 (bad URL), 404 (no such path), 405 (wrong method). */
int adm_route(const struct adm_req *r, struct adm_route *rt);
/* key=value in the query q[0..qlen): 1 and *out in [lo, hi], 0 absent,
 * -1 present but not a decimal integer in range. */
int adm_query_int(const char *q, size_t qlen, const char *key, int64_t lo,
                  int64_t hi, int64_t *out);

/* ---- sdnotify.c ------------------------------------------------------- */
/* No-ops unless systemd set NOTIFY_SOCKET; loop thread only.  sdn_ready
 * starts the watchdog pings on loop when WATCHDOG_USEC asks for them (loop
 * NULL: the worker supervisor, no pings). */
void sdn_ready(uv_loop_t *loop, const char *fmt, ...) CHAT_PRINTF(2, 3);
void sdn_reloading(void);
void sdn_reloaded(const char *result);
/* A reload (SIGHUP or POST /reload) has finished: log it when it succeeded
 * and tell systemd READY=1 with "reloaded: N plugins" or "reload failed:
 * msg" as its STATUS. */
void sdn_reload_result(int ok, const char *msg, size_t nplugins);
void sdn_stopping(void);
void sdn_status(const char *fmt, ...) CHAT_PRINTF(1, 2);

#endif /* CHAT_CORE_H */
