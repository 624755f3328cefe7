/*
 * bench.h - declarations shared by chat-bench's files.
 *
 * chat-bench is a load generator for chatd speaking the legacy protocol
 * (requests: compact JSON + one NUL byte; replies: JSON + '\n').  It is a
 * standalone program: it links neither the core nor cJSON's allocator hooks,
 * and its allocation failure policy is to print a message and exit (bx_*),
 * because a load generator that runs out of memory has nothing sensible left
 * to measure.
 *
 * Files and prefixes:
 *   main.c    bm_   command line, fork of worker processes, merging results,
 *                   progress lines, the RESULT line
 *   bnet.c    bn_   client connections on libuv: connect, '\n' framing,
 *                   writes coalesced once per loop iteration, field scanner
 *   bxport.c  bt_   tls://, ws:// and wss:// targets under bnet.c (OpenSSL
 *                   with a BIO on bnet's buffers, WebSocket client frames)
 *   setup.c   bs_   user registration, the ids file, group creation
 *   worker.c  bw_   one worker process: the scenarios' traffic
 *   stats.c   bst_  latency histogram, /proc readers, CPU time
 */
#ifndef CHAT_BENCH_H
#define CHAT_BENCH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#define BENCH_MAX_TARGETS 16
#define BENCH_NAME_MAX 64
#define BENCH_PASS_MAX 64

/* ---- allocation: exit on failure ---------------------------------------- */
void *bx_malloc(size_t n);
void *bx_calloc(size_t n, size_t sz);
void *bx_realloc(void *p, size_t n);
char *bx_strdup(const char *s);
void bx_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* ---- configuration (filled by main.c, read everywhere) ------------------- */
enum bench_scenario { SC_PAIRS = 1, SC_GROUP, SC_CONNS, SC_LOGIN, SC_FAILOVER };

struct bench_user {
    int64_t id;
    char name[BENCH_NAME_MAX];
    char pass[BENCH_PASS_MAX];
};

/* A target's transport (bxport.c); tcp is bnet.c alone. */
enum bt_scheme { BT_TCP = 0, BT_TLS, BT_WS, BT_WSS };
struct bn_target {
    enum bt_scheme scheme;
    char host[64];        /* for SNI and the certificate check */
    char hostport[80];    /* ws: the Host header */
    char path[128];       /* ws: the request path */
};

struct bench_conf {
    enum bench_scenario scenario;
    const char *scenario_name;
    struct sockaddr_storage targets[BENCH_MAX_TARGETS];
    struct bn_target target_xp[BENCH_MAX_TARGETS];
    const char *ca_file; /* --ca: check tls/wss certificates against it */
    char target_str[BENCH_MAX_TARGETS][64];
    int ntargets;
    int pairs;          /* -P */
    int window;         /* -W: messages in flight per sender */
    int group_size;     /* -G */
    int senders;        /* -S */
    int conns;          /* -K */
    int login_conns;    /* -L */
    int resume;         /* --resume: protocol-2 logins with resume tokens */
    int handshakes;     /* --handshakes: login storm of bare reconnects */
    int payload;        /* --size: payload bytes in each message */
    double rate;        /* --rate: messages/s offered in total; 0 = closed loop */
    double warmup_s;    /* --warmup */
    double duration_s;  /* --duration */
    double drain_s;     /* --drain: max wait for in-flight messages */
    int procs;          /* --procs */
    int concurrency;    /* --concurrency: connects/logins in progress per worker */
    int reg_conns;      /* connections used for registration */
    int src_ips;        /* --src-ips: loopback source addresses to spread over */
    pid_t server_pid;   /* --server-pid, 0 if none */
    const char *ids_file;
    const char *prefix; /* user name prefix */
    const char *password;
    int quiet;
    /* failover (failover.c) */
    pid_t victim_pid;   /* --victim-pid: the node killed */
    const char *hook;   /* --hook: shell command run between fill and calm */
    double calm_s;      /* --calm: chat-only seconds before the kill */
    double storm_max_s; /* --storm-max: give up waiting for re-logins */
    /* filled by setup: the users the scenario needs, and the group */
    struct bench_user *users;
    int nusers;
    int64_t group_id;
    int durable;        /* --durable: pairs as durable protocol-2 clients */
};

extern struct bench_conf bench;

/* Users needed by the scenario (pairs: 2P, group: G, conns: K, login: L). */
int bm_users_needed(void);
/* The target index of user slot i: users are spread round-robin. */
static inline int bm_target_of(int slot) { return slot % bench.ntargets; }

/* ---- stats.c ------------------------------------------------------------ */
/* Log-linear histogram of nanosecond values: 64 sub-buckets per power of two
 * (about 1.6% resolution), mergeable by adding counts. */
#define BST_SUB_BITS 6
#define BST_SUB (1 << BST_SUB_BITS)
#define BST_NBUCKETS (BST_SUB * 42)
struct bst_hist {
    uint64_t count;
    uint64_t max;
    uint64_t buckets[BST_NBUCKETS];
};
void bst_hist_add(struct bst_hist *h, uint64_t v);
void bst_hist_merge(struct bst_hist *dst, const struct bst_hist *src);
uint64_t bst_hist_pct(const struct bst_hist *h, double pct); /* ns */
uint64_t bst_now_ns(void);             /* CLOCK_MONOTONIC */
uint64_t bst_cpu_ns(uint64_t *user, uint64_t *sys); /* own process; total */
/* Server figures from /proc for pid and its descendants; -1 when pid's own
 * figures are unreadable. */
int64_t bst_proc_cpu_ns(pid_t pid);    /* utime + stime of all threads */
int64_t bst_proc_rss_kb(pid_t pid);    /* VmRSS */

/* ---- bnet.c ------------------------------------------------------------- */
struct bn_buf {
    char *p;
    size_t len, cap;
};
void bn_buf_reserve(struct bn_buf *b, size_t extra);
void bn_buf_add(struct bn_buf *b, const void *p, size_t n);
static inline void bn_buf_addc(struct bn_buf *b, char c)
{
    if (b->len == b->cap)
        bn_buf_reserve(b, 1);
    b->p[b->len++] = c;
}
void bn_buf_addu(struct bn_buf *b, uint64_t v); /* decimal */
void bn_buf_addi(struct bn_buf *b, int64_t v);
void bn_buf_free(struct bn_buf *b);

struct bn_net;
struct bn_conn;
struct bt_conn;

/* Called for every '\n'-terminated frame (without the '\n'); the bytes are
 * borrowed for the call.  Leading NUL/whitespace is stripped. */
typedef void (*bn_frame_fn)(struct bn_conn *c, const char *f, size_t len);
/* Called once when the connection is established (status 0) or failed. */
typedef void (*bn_connect_fn)(struct bn_conn *c, int status);
/* Called when the peer closed or a read/write failed (before closing). */
typedef void (*bn_error_fn)(struct bn_conn *c, int status);

struct bn_conn {
    uv_tcp_t tcp;
    uv_connect_t creq;
    uv_write_t wreq;
    struct bn_net *net;
    struct bn_buf out;     /* queued, not yet handed to the kernel */
    struct bn_buf wbuf;    /* handed to uv_write, waiting for its callback */
    struct bn_buf in;      /* partial frame carried over between reads */
    struct bn_conn *next_dirty;
    bn_frame_fn on_frame;
    bn_connect_fn on_connect;
    bn_error_fn on_error;
    void *data;
    struct bt_conn *xp;    /* tls/ws/wss state (bxport.c); NULL on tcp */
    unsigned dirty : 1, writing : 1, connected : 1, closing : 1, in_own : 1;
};

struct bn_net {
    uv_loop_t *loop;
    uv_prepare_t flush;    /* writes are flushed once per loop iteration */
    struct bn_conn *dirty;
    char *rbuf;            /* shared read buffer (one read at a time) */
    size_t rbuf_cap;
    char *sbuf;            /* shared plaintext buffer (bxport.c's TLS reads) */
    size_t sbuf_cap;
    uint64_t frames_in, bytes_in, bytes_out;
    int src_ips;           /* >1: spread loopback connects over 127.0.0.x */
    unsigned src_next;
};

void bn_net_init(struct bn_net *n, uv_loop_t *loop);
void bn_net_close(struct bn_net *n); /* closes the prepare handle */
/* Connect c (zeroed by the caller, callbacks and data set) to addr, with
 * the transport of t (NULL: tcp).  on_connect runs once the transport's
 * handshakes are done. */
int bn_connect(struct bn_net *n, struct bn_conn *c, const struct sockaddr *addr,
               const struct bn_target *t);
/* Queue bytes; they are written at the end of this loop iteration. */
void bn_send(struct bn_conn *c, const void *p, size_t len);
/* Reserve space at the end of the output buffer and mark it dirty. */
struct bn_buf *bn_out(struct bn_conn *c);
/* Close; close_cb (may be NULL) runs when libuv has released the handle. */
void bn_close(struct bn_conn *c, uv_close_cb close_cb);

/* For bxport.c: */
void bn_mark_dirty(struct bn_conn *c);
void bn_fail(struct bn_conn *c, int status);  /* on_error, or close */
void bn_plain_in(struct bn_conn *c, const char *p, size_t n); /* '\n' lines */
char *bn_scratch(struct bn_net *n, size_t size); /* shared, >= size bytes */

/* ---- bxport.c ----------------------------------------------------------- */
void bt_attach(struct bn_conn *c, const struct bn_target *t); /* before connect */
void bt_start(struct bn_conn *c);              /* socket connected */
void bt_input(struct bn_conn *c, const char *p, size_t n); /* bytes read */
int bt_encode(struct bn_conn *c);              /* app -> out; -1 on error */
struct bn_buf *bt_app(struct bn_conn *c);      /* where requests go */
void bt_close(struct bn_conn *c, uv_close_cb close_cb);
void bt_free(struct bn_conn *c);

/* Top-level fields of one flat JSON object, found in one pass without
 * building a tree.  Spans point into the frame (string spans exclude the
 * quotes and are not unescaped).  Nested values are skipped. */
struct bn_fields {
    int64_t msgid, errno_, id, groupid, req;
    int has_msgid, has_errno, has_id, has_groupid, has_req;
    int64_t seq;        /* protocol-2 replies (--durable) */
    int has_seq;
    const char *msg, *token, *name, *errmsg;
    size_t msg_len, token_len, name_len, errmsg_len;
};
/* 1 when a failed reply says the server is busy ("try again"): legacy
 * replies have no errno for it, only the errmsg; protocol 2 uses 113. */
int bn_is_busy(const struct bn_fields *f);
int bn_scan(const char *f, size_t len, struct bn_fields *out); /* 0 or -1 */
/* Append s as a JSON string literal (with quotes). */
void bn_buf_addjs(struct bn_buf *b, const char *s, size_t len);

/* ---- setup.c ------------------------------------------------------------ */
/* Load the ids file (if any), register the missing users, save the file,
 * create the group when the scenario needs one.  Exits on failure. */
void bs_setup(void);

/* ---- failover.c --------------------------------------------------------- */
/* The failover scenario, in this process (no workers); prints its report. */
void bf_run(void);

/* ---- worker.c ----------------------------------------------------------- */
/* Records a worker sends to the parent on its pipe. */
enum bw_rec_type { REC_READY = 1, REC_TICK, REC_PHASE, REC_RESULT, REC_FAIL };
struct bw_tick {
    uint64_t sent, recv, logins, errors, connected;
};
struct bw_result {
    uint64_t sent;          /* messages sent in total */
    uint64_t expected;      /* deliveries those messages owe (sent x fan-out) */
    uint64_t distinct;      /* distinct deliveries received in total */
    uint64_t recv_window;   /* deliveries received inside the measured window */
    uint64_t recv_total;
    uint64_t dup, ooo, corrupt, errors;
    uint64_t logins_ok, logins_fail;  /* inside the window (conns: all) */
    uint64_t busy;                    /* "server busy" replies (retried) */
    uint64_t cpu_user_ns, cpu_sys_ns; /* over the measured window */
    uint64_t t_first_ns, t_last_ns;   /* conns: first connect, last login ack */
    struct bst_hist hist;             /* latency in the window */
};
/* Commands the parent sends a worker. */
enum bw_cmd_type { CMD_GO = 1, CMD_STOP };
struct bw_cmd {
    uint32_t type;
    uint64_t t0_ns;        /* CMD_GO: when traffic starts (CLOCK_MONOTONIC) */
};
struct bw_rec_hdr {
    uint32_t type;
    uint32_t len;
};

/* Run worker number `index` of `count`; never returns. */
void bw_main(int index, int count, int cmd_fd, int rec_fd) __attribute__((noreturn));

#endif
