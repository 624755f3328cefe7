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
    M_GROUP_LIST = 14
};

/* Server errno chat-cli reacts to (enum chat_proto_errno). */
enum { E_REPLACED = 116 };

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
    char *text;        /* group or user name; owned, may be NULL */
    uint64_t sent_ms;  /* uv_now when sent */
    int flags;         /* CLI_P_* */
};

#define CLI_P_AUTO_LOGIN 1 /* a re-login sent by the reconnect logic */
#define CLI_P_QUIET 2      /* an internal refresh: update state, print nothing */

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
int64_t cmd_send(struct cli *c, cJSON *req, int msgid, int64_t arg,
                 const char *text, int flags); /* takes req; seq or -1 */
void cmd_refresh_groups(struct cli *c);          /* quiet GROUP_LIST */
void cmd_relogin(struct cli *c);                 /* after a reconnect */
struct cli_pending *cmd_take_pending(struct cli *c, int64_t seq, int msgid);
void cmd_pending_free(struct cli_pending *p);
void cmd_fail_pending(struct cli *c, const char *why);
void cmd_check_timeouts(struct cli *c);

/* event.c */
void ev_message(struct cli *c, cJSON *msg);      /* one frame from the server */
void ev_connected(struct cli *c);
void ev_disconnected(struct cli *c, const char *why, uint64_t retry_ms,
                     int was_up);

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
