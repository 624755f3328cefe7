/*
 * cli.h - chat-cli's internal interfaces: one struct cli holding the whole
 * client state, shared by the four source files.
 *
 *   main.c   options, the loop, signals, the terminal (libedit callback
 *            interface on a uv_poll of stdin) and the scripted line reader
 *   conn.c   the TCP connection: resolve, connect, frame the JSON stream,
 *            write, and reconnect with backoff
 *   xport.c  what runs between the socket and the JSON stream for the
 *            tls://, ws:// and wss:// schemes (OpenSSL, wslay)
 *   cmd.c    the command language: a typed line becomes a protocol-2 request
 *   event.c  what the server sends becomes output, human or key=value
 *   durable.c  durable messages: the cid of every chat message and the
 *            resend of unacknowledged ones, the per-conversation position
 *            and SYNC, read markers, the state file
 *   history.c  the history command (HISTORY, paged backwards)
 *   evdur.c  durable messages, receipts, typing and presence as output
 *
 * Everything runs on one libuv loop in one thread.  chat-cli is a standalone
 * program, not linked with the chatd core, so it uses malloc/free directly and
 * treats an allocation failure as fatal (cli_oom prints and exits).
 */
#ifndef CHAT_CLI_H
#define CHAT_CLI_H

#include <stddef.h>
#include <stdint.h>

#include <cJSON.h>
#include <uv.h>

/* Protocol message ids (docs/protocol.md). */
enum {
    M_LOGIN = 1, M_LOGIN_ACK = 2, M_LOGOUT = 3, M_REG = 4, M_REG_ACK = 5,
    M_CHAT = 6, M_ADD_FRIEND = 7, M_CREATE_GROUP = 8, M_ADD_GROUP = 9,
    M_GROUP_CHAT = 10, M_ACK = 11, M_NOTICE = 12, M_FRIEND_LIST = 13,
    M_GROUP_LIST = 14, M_SYNC = 15, M_HISTORY = 16, M_READ = 17,
    M_TYPING = 18, M_PRESENCE = 19
};

/* Server errno chat-cli reacts to (enum chat_proto_errno). */
enum { E_NO_HANDLER = 103, E_BUSY = 113, E_REPLACED = 116, E_RATE = 125 };

/* Delay between re-login attempts while the old session is still online. */
#define CLI_RELOGIN_DELAY_MS 1000

/* A growable string; data is always NUL-terminated once anything was added. */
struct sbuf {
    char *data;
    size_t len, cap;
};

/* A request waiting for its reply, matched by seq. */
struct cli_pending {
    struct cli_pending *next;
    int64_t seq;
    int msgid;
    int64_t arg;       /* target user, group or friend id */
    char *text;        /* group or user name, a durable chat's cid, a READ's
                          conversation; owned, may be NULL */
    uint64_t sent_ms;  /* uv_now when sent */
    int flags;         /* CLI_P_* */
};

#define CLI_P_AUTO_LOGIN 1 /* a re-login sent by the reconnect logic */
#define CLI_P_QUIET 2      /* an internal refresh: update state, print nothing */
#define CLI_P_AUTO 4       /* sent by chat-cli itself (SYNC, a read marker):
                              its errors are shown, its success is not */

/* What chat-cli knows of one conversation ("pA:B" or "gG"; durable.c). */
struct cli_conv {
    struct cli_conv *next;
    char name[32];
    int64_t pos;        /* every cseq up to here was shown or sent here: the
                           SYNC position */
    int64_t *above;     /* cseqs above pos shown or sent already */
    size_t nabove, capabove;
    int64_t head;       /* newest cseq known */
    int64_t delivered, read;           /* this user's marks, as stored */
    int64_t peer_delivered, peer_read; /* the other user's (pairs) */
    int64_t shown;      /* newest cseq of someone else's message shown */
    int64_t mark_sent;  /* newest marker sent */
    int mark_inflight;
    int changed;        /* marks changed by the SYNC pass running */
    uint64_t gap_ms;    /* uv_now when a gap below an own message was seen */
};

/* A durable message not acknowledged yet: sent again, with the same cid,
 * after a reconnect, a timeout or a "busy" answer. */
struct cli_out {
    struct cli_out *next;
    cJSON *req;        /* the request without seq; owned */
    char *cid;         /* owned */
    int msgid;
    int64_t target;    /* toid or groupid */
    int64_t seq;       /* the request in flight, 0 when none */
    uint64_t retry_ms; /* uv_now after which to send it again (seq 0) */
};

/* A HISTORY command being paged in (durable.c). */
struct cli_hist {
    char conv[32];
    int want, pages;
    int64_t before;    /* 0: from the newest */
    cJSON *msgs;       /* collected, oldest first */
    int more;
};

/* The transport of the server URL (xport.c). */
enum { XP_TCP, XP_TLS, XP_WS, XP_WSS };

struct xp;

/* One connection attempt; freed in its close callback. */
struct cli_conn {
    uv_tcp_t tcp;
    uv_connect_t creq;
    struct cli *c;
    char *in;          /* unparsed input */
    size_t inlen, incap;
    int up;            /* connect succeeded */
    struct xp *xp;     /* transport state once connected (xport.c) */
    uint64_t start_ms; /* uv_now when the socket connected */
};

/* A script line waiting its turn. */
struct cli_line {
    struct cli_line *next;
    char text[];
};

struct cli {
    uv_loop_t *loop;
    char *host, *port;
    int scheme;             /* XP_* */
    char *path;             /* ws, wss: the request path */
    char *label;            /* the server as the user wrote it, for messages */
    const char *ca_file;    /* --ca: trust these CAs instead of the system's */
    int insecure;           /* --insecure: no certificate check */
    const char *origin;     /* --origin: ws, wss */
    void *ssl_ctx;          /* SSL_CTX for tls, wss */
    int script;             /* stdin is not a terminal: key=value output */
    double reply_timeout;   /* seconds */
    int exit_code;
    int quitting;

    /* connection (conn.c) */
    struct cli_conn *conn;  /* current connection or NULL */
    uv_getaddrinfo_t *gai;  /* resolve in flight or NULL */
    uv_timer_t retry_timer; /* reconnect and re-login delays */
    uint64_t backoff_ms;    /* next reconnect delay */
    int connected;          /* conn is up */
    int lost_reported;      /* "server went away" said for this outage */

    /* session (cmd.c / event.c) */
    int64_t seq;
    struct cli_pending *pending;
    int logged_in;
    int64_t user_id;
    char *user_name;
    char *password;         /* of the last successful login; fallback re-login */
    char *token;            /* resume token from the login ack */
    int relogin;            /* reconnect logic owns the login in flight */
    int relogin_with_password;
    int relogin_tries;
    cJSON *groups;          /* last known group list (objects), for names */
    cJSON *names;           /* user id (as text) -> name, for receipts */

    /* durable messages (durable.c) */
    int durable;            /* -1 not known yet, 0 the server keeps no
                               messages (SYNC is error 103), 1 yes */
    int auto_read;          /* mark read what is shown (--no-read: only
                               delivered, and the read command) */
    int no_state;           /* --no-state: keep positions in memory only */
    int no_read_opt;        /* --no-read */
    int64_t conv_user;      /* the user convs and outbox belong to */
    struct cli_conv *convs;
    struct cli_out *outbox; /* in the order sent */
    int sync_inflight, sync_again, sync_pass, sync_msgs;
    uint64_t sync_retry_ms; /* after a failed SYNC: try again then, 0 none */
    struct cli_hist *hist;
    char cid_prefix[24];
    uint64_t cid_n;
    char *state_path;       /* NULL: no state file */
    int state_dirty;
    uint64_t state_ms;      /* last write */

    /* input (main.c) */
    uv_poll_t tty_poll;     /* interactive stdin */
    uv_pipe_t in_pipe;      /* scripted stdin when it is a pipe or socket */
    int in_pipe_open;
    struct sbuf inl;        /* partial script line */
    struct cli_line *q_head, *q_tail; /* script lines not yet run */
    int eof;                /* scripted stdin ended */
    int sleeping;           /* `sleep` running in a script */
    uv_timer_t sleep_timer;
    uv_timer_t tick_timer;  /* reply timeouts, exit after EOF */
    uint64_t eof_ms;
    int rl_active;          /* libedit callback handler installed */
    int in_linefunc;        /* inside libedit's line callback */
    uv_signal_t sig_int, sig_term, sig_winch;
};

/* main.c */
void cli_oom(void);
void *cli_xmalloc(size_t n);
char *cli_xstrdup(const char *s);
void cli_out(struct cli *c, const char *line); /* one event / one message */
void cli_prompt_update(struct cli *c);
void cli_script_pump(struct cli *c);
void cli_quit(struct cli *c, int code);

/* conn.c */
void conn_start(struct cli *c);                  /* connect now */
int conn_send(struct cli *c, const cJSON *obj);  /* 0 or -1 when down */
void conn_close_all(struct cli *c);              /* on quit */
void conn_relogin_in(struct cli *c, uint64_t ms); /* delayed re-login */
void conn_tick(struct cli *c);                   /* handshake timeout */
/* for xport.c: */
int conn_alive(const struct cli_conn *k);        /* still the current one */
void conn_ready(struct cli_conn *k);             /* handshakes done */
void conn_plain_in(struct cli_conn *k, const char *p, size_t n); /* JSON */
void conn_raw_write(struct cli_conn *k, const void *p, size_t n);
void conn_fail(struct cli_conn *k, const char *why); /* drop, retry later */

/* xport.c */
int xp_init(struct cli *c);       /* TLS context; prints why and -1 on error */
void xp_done(struct cli *c);
void xp_start(struct cli_conn *k); /* the socket is connected */
void xp_input(struct cli_conn *k, const char *p, size_t n); /* from socket */
void xp_send(struct cli_conn *k, const char *line, size_t n); /* JSON + \n */
void xp_free(struct cli_conn *k);  /* from the close callback */

/* cmd.c */
int cmd_run(struct cli *c, const char *line);    /* 1 when a reply is awaited */
int cmd_is_local(const char *line);              /* runs without a server */
cJSON *cmd_req(struct cli *c, int msgid);        /* msgid, proto 2, next seq */
int64_t cmd_send(struct cli *c, cJSON *req, int msgid, int64_t arg,
                 const char *text, int flags); /* takes req; seq or -1 */
void cmd_refresh_groups(struct cli *c);          /* quiet GROUP_LIST */
void cmd_relogin(struct cli *c);                 /* after a reconnect */
struct cli_pending *cmd_take_pending(struct cli *c, int64_t seq, int msgid);
void cmd_pending_free(struct cli_pending *p);
void cmd_fail_pending(struct cli *c, const char *why);
void cmd_check_timeouts(struct cli *c);

/* event.c: JSON fields */
int64_t cli_jint(const cJSON *o, const char *k, int64_t def); /* def if absent */
const char *cli_jstr(const cJSON *o, const char *k);          /* NULL if absent */

/* durable.c */
void dur_init(struct cli *c);
void dur_free(struct cli *c);
void dur_logged_in(struct cli *c);               /* after a login ack, ok */
void dur_logged_out(struct cli *c);              /* logout or replaced */
const char *dur_add_cid(struct cli *c, cJSON *req, int msgid, int64_t target);
void dur_in_flight(struct cli *c, const char *cid, int64_t seq); /* seq < 0: not sent */
int dur_on_reply(struct cli *c, struct cli_pending *p, int req,
                 const cJSON *m);                /* 1: handled */
void dur_pending_lost(struct cli *c, const struct cli_pending *p);
int dur_live(struct cli *c, const cJSON *m);     /* 1: show it, 0: had it */
void dur_shown(struct cli *c, const cJSON *m);   /* after showing it */
void dur_receipt(struct cli *c, const cJSON *m); /* live msgid 17 */
void dur_tick(struct cli *c);
void dur_save(struct cli *c);                    /* the state file, now */
int dur_conv_name(struct cli *c, const char *arg, char *out, size_t n);
int dur_read_cmd(struct cli *c, const char *conv); /* NULL: all */
void dur_list(struct cli *c);
const char *dur_name_of(struct cli *c, int64_t id);
void dur_learn_name(struct cli *c, int64_t id, const char *name);

/* history.c */
int dur_history(struct cli *c, const char *conv, int n, int64_t before);
void dur_history_reply(struct cli *c, const cJSON *m);
void dur_history_free(struct cli *c);

/* event.c */
void ev_message(struct cli *c, cJSON *msg);      /* one frame from the server */
void ev_error(struct cli *c, int req, int64_t seq, int64_t err,
              const char *msg);
void ev_connected(struct cli *c);
void ev_disconnected(struct cli *c, const char *why, uint64_t retry_ms,
                     int was_up);
/* for evdur.c: */
void ev_out(struct cli *c, struct sbuf *b);      /* print b, empty it */
void ev_time(const cJSON *m, int script, int stored, char *out, size_t n);
const char *ev_group_name(struct cli *c, int64_t gid); /* NULL: unknown */
int ev_online(const cJSON *o);                   /* a presence value */

/* evdur.c */
/* A durable message: how is EV_LIVE, EV_SYNC, EV_HISTORY or EV_SENT. */
enum { EV_LIVE, EV_SYNC, EV_HISTORY, EV_SENT };
void ev_durable(struct cli *c, const cJSON *m, int how);
void ev_sent(struct cli *c, const struct cli_pending *p, const cJSON *ack,
             const struct cli_out *o);
void ev_conv(struct cli *c, const struct cli_conv *v, const char *why);
void ev_receipt(struct cli *c, const char *conv, int64_t from,
                int64_t delivered, int64_t read, const char *via);
void ev_typing(struct cli *c, const cJSON *m);   /* msgid 18 */
void ev_presence(struct cli *c, const cJSON *m); /* msgid 19 */
/* one line: script_line for a script, human for a person (NULL: none) */
void ev_info(struct cli *c, const char *script_line, const char *human);

/* sbuf helpers (event.c) */
void sb_add(struct sbuf *b, const char *s, size_t n);
void sb_str(struct sbuf *b, const char *s);
void sb_fmt(struct sbuf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void sb_kv(struct sbuf *b, const char *key, const char *val); /* quoted if needed */
void sb_kvi(struct sbuf *b, const char *key, int64_t val);
void sb_tail(struct sbuf *b, const char *key, const char *val); /* rest of line */
void sb_safe(struct sbuf *b, const char *s); /* terminal-safe text for humans */
void sb_free(struct sbuf *b);

#endif
