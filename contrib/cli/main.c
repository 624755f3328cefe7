/*
 * main.c - chat-cli: options, the event loop, and the two faces of stdin.
 *
 *   chat-cli [-t SECONDS] [--ca FILE] [--insecure] [--origin ORIGIN]
 *            [--no-read] [--no-state] [SERVER]
 *
 * SERVER is HOST:PORT or tcp://HOST:PORT (default 127.0.0.1:6000),
 * tls://HOST:PORT, ws://HOST[:PORT]/PATH or wss://HOST[:PORT]/PATH; the
 * transports are in xport.c.
 *
 * On a terminal the line is edited by libedit through its readline-compatible
 * callback interface: a uv_poll on stdin calls rl_callback_read_char for each
 * key, so the loop never blocks in the line editor and messages from the
 * server are printed while the user types.  To print without garbling the
 * half-typed line, cli_out erases the prompt and the line (moving up over
 * the rows the line wraps onto), prints, and has libedit draw prompt and line
 * again (EL_REFRESH through rl_forced_update_display).  libedit leaves the
 * callback mode once a line is complete, so the handler is installed again
 * after every line.  History is kept in ~/.chat-cli_history.
 *
 * When stdin is not a terminal, chat-cli is scriptable: it reads commands
 * line by line, runs them one at a time (each waits for the reply to the one
 * before, and for the connection and any re-login), and prints one key=value
 * line per event (see event.c).  At end of input it exits once the last reply
 * is in; if nothing moves for the reply timeout (-t, 10 s) it exits 1.
 */
#include <ctype.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include <editline/readline.h>

#include "cli.h"

#define TICK_MS 250
#define PROMPT_MAX 160

/* libedit keeps global state, so the terminal side is a singleton anyway. */
static struct cli *the_cli;
static char prompt[PROMPT_MAX] = "> ";
static char history_path[512];
static uint64_t progress_ms; /* scripts: last time a line ran or a reply came */

void cli_oom(void)
{
    fputs("chat-cli: out of memory\n", stderr);
    abort();
}

void *cli_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);

    if (!p)
        cli_oom();
    return p;
}

char *cli_xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;

    return memcpy(cli_xmalloc(n), s, n);
}

/* ---- terminal output ----------------------------------------------------- */

static int term_cols(void)
{
    struct winsize ws;

    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
        return ws.ws_col;
    return 80;
}

/* Display columns of UTF-8 text, one per character (no wide glyphs). */
static size_t text_cols(const char *s, size_t n)
{
    size_t cols = 0, i;

    for (i = 0; i < n && s[i]; i++)
        cols += ((unsigned char)s[i] & 0xc0) != 0x80;
    return cols;
}

/* Erase the prompt and the line being edited; the cursor ends at column 0 of
 * the prompt's first row, which is where libedit will draw them again. */
static void term_hide(void)
{
    size_t row = text_cols(prompt, strlen(prompt)) +
                 (rl_point > 0 ? (size_t)rl_point : 0);

    row /= (size_t)term_cols();
    if (row > 0)
        printf("\x1b[%zuA", row);
    fputs("\r\x1b[J", stdout);
}

void cli_out(struct cli *c, const char *line)
{
    int redraw = c->rl_active && !c->in_linefunc;
    const char *p;

    if (c->script) {
        fputs(line, stdout);
        fputc('\n', stdout);
        fflush(stdout);
        return;
    }
    if (redraw)
        term_hide();
    /* the editor may have the terminal in raw mode: end lines with \r\n */
    for (p = line; *p; p++) {
        if (*p == '\n')
            fputc('\r', stdout);
        fputc(*p, stdout);
    }
    fputs("\r\n", stdout);
    fflush(stdout);
    if (redraw)
        rl_forced_update_display();
}

void cli_prompt_update(struct cli *c)
{
    char next[PROMPT_MAX];
    struct sbuf b = {0};

    if (c->script || c->quitting)
        return;
    if (!c->connected)
        sb_str(&b, "(offline) ");
    if (c->logged_in && c->user_name) {
        sb_safe(&b, c->user_name);
        sb_fmt(&b, "(%lld)", (long long)c->user_id);
    }
    sb_str(&b, "> ");
    snprintf(next, sizeof(next), "%s", b.data);
    sb_free(&b);
    if (!strcmp(next, prompt))
        return;
    if (c->rl_active && !c->in_linefunc) {
        term_hide();
        snprintf(prompt, sizeof(prompt), "%s", next);
        rl_set_prompt(prompt);
        rl_forced_update_display();
    } else {
        snprintf(prompt, sizeof(prompt), "%s", next);
    }
}

/* ---- interactive input --------------------------------------------------- */

static void line_cb(char *line);

static void term_install(struct cli *c)
{
    rl_callback_handler_install(prompt, line_cb);
    c->rl_active = 1;
}

static void line_cb(char *line)
{
    struct cli *c = the_cli;

    c->in_linefunc = 1;
    if (!line) { /* Ctrl-D on an empty line */
        fputs("\r\n", stdout);
        cli_quit(c, 0);
    } else {
        char *s = line;

        while (isspace((unsigned char)*s))
            s++;
        if (*s && strncasecmp(s, "login", 5) && strncasecmp(s, "register", 8))
            add_history(s); /* never keep passwords in the history file */
        cmd_run(c, s);
    }
    free(line);
    c->in_linefunc = 0;
    if (!c->quitting)
        term_install(c); /* libedit left callback mode with this line */
}

static void tty_cb(uv_poll_t *h, int status, int events)
{
    (void)h;
    (void)events;
    if (status < 0) {
        cli_quit(the_cli, 1);
        return;
    }
    rl_callback_read_char();
}

static char *complete_cmd(const char *text, int state)
{
    static const char *const names[] = {
        "help", "register", "login", "chat:", "addfriend:", "creategroup:",
        "addgroup:", "groupchat:", "friends", "groups", "loginout", "quit",
        "history", "read", "convs",
    };
    static size_t i, len;

    if (!state) {
        i = 0;
        len = strlen(text);
    }
    while (i < sizeof(names) / sizeof(names[0])) {
        const char *n = names[i++];

        if (!strncmp(n, text, len))
            return strdup(n);
    }
    return NULL;
}

static char **complete(const char *text, int start, int end)
{
    (void)end;
    rl_attempted_completion_over = 1; /* never complete file names */
    return start == 0 ? rl_completion_matches(text, complete_cmd) : NULL;
}

static int term_start(struct cli *c)
{
    const char *home = getenv("HOME");

    rl_readline_name = "chat-cli";
    rl_catch_signals = 0; /* libuv owns the signals */
    rl_catch_sigwinch = 0;
    rl_attempted_completion_function = complete;
    rl_completion_append_character = '\0';
    rl_initialize();
    using_history();
    stifle_history(1000);
    if (home && *home) {
        snprintf(history_path, sizeof(history_path), "%s/.chat-cli_history",
                 home);
        read_history(history_path);
    }
    if (uv_poll_init(c->loop, &c->tty_poll, STDIN_FILENO) < 0)
        return -1;
    c->tty_poll.data = c;
    term_install(c);
    uv_poll_start(&c->tty_poll, UV_READABLE, tty_cb);
    return 0;
}

/* ---- scripted input ------------------------------------------------------ */

static void queue_line(struct cli *c, const char *s, size_t n)
{
    struct cli_line *l;

    if (n && s[n - 1] == '\r')
        n--;
    l = cli_xmalloc(sizeof(*l) + n + 1);
    memcpy(l->text, s, n);
    l->text[n] = '\0';
    l->next = NULL;
    if (c->q_tail)
        c->q_tail->next = l;
    else
        c->q_head = l;
    c->q_tail = l;
}

static void script_bytes(struct cli *c, const char *buf, size_t n)
{
    size_t i, start = 0;

    for (i = 0; i < n; i++) {
        if (buf[i] != '\n')
            continue;
        if (c->inl.len) {
            sb_add(&c->inl, buf + start, i - start);
            queue_line(c, c->inl.data, c->inl.len);
            c->inl.len = 0;
        } else {
            queue_line(c, buf + start, i - start);
        }
        start = i + 1;
    }
    if (start < n)
        sb_add(&c->inl, buf + start, n - start);
}

static void script_eof(struct cli *c)
{
    if (c->inl.len) {
        queue_line(c, c->inl.data, c->inl.len);
        c->inl.len = 0;
    }
    c->eof = 1;
    progress_ms = uv_now(c->loop);
    cli_script_pump(c);
}

static void pipe_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    static char slab[65536];

    (void)h;
    (void)hint;
    *buf = uv_buf_init(slab, sizeof(slab));
}

static void pipe_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf)
{
    struct cli *c = st->data;

    if (n > 0) {
        script_bytes(c, buf->base, (size_t)n);
        cli_script_pump(c);
    } else if (n < 0) {
        uv_read_stop(st);
        script_eof(c);
    }
}

static int script_start(struct cli *c)
{
    uv_handle_type t = uv_guess_handle(STDIN_FILENO);

    setvbuf(stdout, NULL, _IOLBF, 0);
    if (t == UV_NAMED_PIPE || t == UV_TCP) {
        if (uv_pipe_init(c->loop, &c->in_pipe, 0) < 0 ||
            uv_pipe_open(&c->in_pipe, STDIN_FILENO) < 0)
            return -1;
        c->in_pipe_open = 1;
        c->in_pipe.data = c;
        return uv_read_start((uv_stream_t *)&c->in_pipe, pipe_alloc, pipe_read);
    }
    /* a file (or /dev/null): reading it never blocks for long */
    for (;;) {
        char buf[65536];
        ssize_t n = read(STDIN_FILENO, buf, sizeof(buf));

        if (n <= 0)
            break;
        script_bytes(c, buf, (size_t)n);
    }
    script_eof(c);
    return 0;
}

void cli_script_pump(struct cli *c)
{
    static int busy;

    if (!c->script || busy)
        return;
    busy = 1;
    progress_ms = uv_now(c->loop);
    while (!c->quitting && c->q_head && !c->sleeping && !c->pending) {
        struct cli_line *l = c->q_head;

        if (!cmd_is_local(l->text) && (!c->connected || c->relogin))
            break;
        c->q_head = l->next;
        if (!c->q_head)
            c->q_tail = NULL;
        cmd_run(c, l->text);
        memset(l->text, 0, strlen(l->text));
        free(l);
    }
    busy = 0;
    /* at the end, wait for durable messages to be acknowledged too */
    if (c->eof && !c->q_head && !c->pending && !c->sleeping && !c->quitting &&
        !c->outbox)
        cli_quit(c, c->exit_code);
}

/* ---- loop plumbing ------------------------------------------------------- */

static void tick_cb(uv_timer_t *t)
{
    struct cli *c = t->data;

    cmd_check_timeouts(c);
    conn_tick(c);
    dur_tick(c);
    if (c->script && c->eof && !c->sleeping && !c->quitting &&
        uv_now(c->loop) - progress_ms > (uint64_t)(c->reply_timeout * 1000)) {
        struct sbuf b = {0};

        sb_str(&b, "event=timeout req=0 seq=0");
        sb_tail(&b, "reason", c->connected ? "script stalled at end of input"
                                           : "no connection at end of input");
        cli_out(c, b.data);
        sb_free(&b);
        cli_quit(c, 1);
    }
}

static void signal_cb(uv_signal_t *s, int signum)
{
    struct cli *c = s->data;

    if (signum == SIGWINCH) {
        if (c->rl_active)
            rl_resize_terminal();
        return;
    }
    if (c->rl_active)
        fputs("\r\n", stdout);
    cli_quit(c, 128 + signum);
}

static void close_if_open(uv_handle_t *h)
{
    if (h->loop && !uv_is_closing(h))
        uv_close(h, NULL);
}

void cli_quit(struct cli *c, int code)
{
    if (c->quitting)
        return;
    c->quitting = 1;
    c->exit_code = code;
    if (c->rl_active) {
        rl_callback_handler_remove();
        c->rl_active = 0;
        if (history_path[0])
            write_history(history_path);
        uv_poll_stop(&c->tty_poll);
        close_if_open((uv_handle_t *)&c->tty_poll);
    }
    fflush(stdout);
    dur_save(c);
    conn_close_all(c);
    if (c->in_pipe_open)
        close_if_open((uv_handle_t *)&c->in_pipe);
    close_if_open((uv_handle_t *)&c->retry_timer);
    close_if_open((uv_handle_t *)&c->sleep_timer);
    close_if_open((uv_handle_t *)&c->tick_timer);
    close_if_open((uv_handle_t *)&c->sig_int);
    close_if_open((uv_handle_t *)&c->sig_term);
    close_if_open((uv_handle_t *)&c->sig_winch);
}

static void usage_exit(const char *argv0, int code)
{
    fprintf(code ? stderr : stdout,
            "usage: %s [-t SECONDS] [--ca FILE] [--insecure] [--origin ORIGIN]"
            " [--no-read] [--no-state] [SERVER]\n"
            "  SERVER     the chatd node or balancer (default 127.0.0.1:6000):\n"
            "             HOST:PORT or tcp://HOST:PORT   plain TCP\n"
            "             tls://HOST:PORT                TLS\n"
            "             ws://HOST[:PORT]/PATH          WebSocket (port 80)\n"
            "             wss://HOST[:PORT]/PATH         WebSocket over TLS (443)\n"
            "  -t SECONDS reply timeout (default 10); scripts give up after it\n"
            "  --ca FILE  tls, wss: trust the CA certificates in FILE (PEM)\n"
            "             instead of the system's\n"
            "  --insecure tls, wss: do not check the server's certificate\n"
            "             (self-signed tests only)\n"
            "  --origin ORIGIN  ws, wss: send this Origin header\n"
            "  --no-read  mark conversations read only with the read command\n"
            "             (what is shown is marked delivered)\n"
            "  --no-state keep the positions in conversations in memory only\n"
            "             (else in $XDG_STATE_HOME/chat-cli, for the next run)\n"
            "On a terminal: an interactive client (type help).  Otherwise it\n"
            "reads one command per line and prints one event per line.\n",
            argv0);
    exit(code);
}

static void bad_server(const char *arg, const char *why)
{
    fprintf(stderr, "chat-cli: %s: %s\n", arg, why);
    exit(2);
}

/* HOST:PORT or [V6]:PORT, up to end; PORT may be missing when dflt is set. */
static void parse_hostport(struct cli *c, const char *arg, const char *s,
                           const char *end, const char *dflt)
{
    const char *colon = NULL, *h = s, *he;

    if (*s == '[') {
        he = memchr(s, ']', (size_t)(end - s));
        if (!he)
            bad_server(arg, "expected [IPV6]:PORT");
        h = s + 1;
        if (he + 1 < end && he[1] == ':')
            colon = he + 1;
        else if (he + 1 != end)
            bad_server(arg, "expected [IPV6]:PORT");
    } else {
        for (he = s; he < end; he++)
            if (*he == ':')
                colon = he;
        he = colon ? colon : end;
    }
    if (he == h || (!colon && !dflt) || (colon && colon + 1 == end))
        bad_server(arg, dflt ? "expected HOST[:PORT]" : "expected HOST:PORT");
    c->host = cli_xmalloc((size_t)(he - h) + 1);
    memcpy(c->host, h, (size_t)(he - h));
    c->host[he - h] = '\0';
    if (colon) {
        c->port = cli_xmalloc((size_t)(end - colon));
        memcpy(c->port, colon + 1, (size_t)(end - colon - 1));
        c->port[end - colon - 1] = '\0';
    } else {
        c->port = cli_xstrdup(dflt);
    }
}

static void parse_server(struct cli *c, const char *arg)
{
    static const struct {
        const char *prefix, *dflt_port;
        int scheme;
    } schemes[] = {
        {"tcp://", NULL, XP_TCP}, {"tls://", NULL, XP_TLS},
        {"ws://", "80", XP_WS},   {"wss://", "443", XP_WSS},
    };
    const char *s = arg, *end, *dflt = NULL;
    size_t i;

    c->scheme = XP_TCP;
    for (i = 0; i < sizeof(schemes) / sizeof(schemes[0]); i++)
        if (!strncasecmp(arg, schemes[i].prefix, strlen(schemes[i].prefix))) {
            c->scheme = schemes[i].scheme;
            dflt = schemes[i].dflt_port;
            s = arg + strlen(schemes[i].prefix);
            break;
        }
    if (strstr(arg, "://") && s == arg)
        bad_server(arg, "unknown scheme (tcp, tls, ws or wss)");
    end = s + strcspn(s, "/");
    if (*end && c->scheme != XP_WS && c->scheme != XP_WSS)
        bad_server(arg, "a path is only for ws:// and wss://");
    parse_hostport(c, arg, s, end, dflt);
    c->path = cli_xstrdup(*end ? end : "/");
    if (c->scheme == XP_TCP) {
        struct sbuf b = {0};

        sb_fmt(&b, strchr(c->host, ':') ? "[%s]:%s" : "%s:%s", c->host,
               c->port);
        c->label = b.data;
    } else {
        c->label = cli_xstrdup(arg);
    }
}

static void free_all(struct cli *c)
{
    while (c->q_head) {
        struct cli_line *l = c->q_head;

        c->q_head = l->next;
        free(l);
    }
    while (c->pending) {
        struct cli_pending *p = c->pending;

        c->pending = p->next;
        cmd_pending_free(p);
    }
    if (c->password)
        memset(c->password, 0, strlen(c->password));
    free(c->password);
    free(c->token);
    free(c->user_name);
    sb_free(&c->inl);
    free(c->host);
    free(c->port);
    free(c->path);
    free(c->label);
    xp_done(c);
    dur_free(c);
    cJSON_Delete(c->groups);
}

int main(int argc, char **argv)
{
    static struct cli cli;
    struct cli *c = &cli;
    int i, rc;
    const char *addr = "127.0.0.1:6000";

    c->reply_timeout = 10;
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help"))
            usage_exit(argv[0], 0);
        else if (!strcmp(argv[i], "-t") && i + 1 < argc)
            c->reply_timeout = atof(argv[++i]);
        else if (!strcmp(argv[i], "--ca") && i + 1 < argc)
            c->ca_file = argv[++i];
        else if (!strcmp(argv[i], "--insecure"))
            c->insecure = 1;
        else if (!strcmp(argv[i], "--no-read"))
            c->no_read_opt = 1;
        else if (!strcmp(argv[i], "--no-state"))
            c->no_state = 1;
        else if (!strcmp(argv[i], "--origin") && i + 1 < argc)
            c->origin = argv[++i];
        else if (argv[i][0] == '-')
            usage_exit(argv[0], 2);
        else
            addr = argv[i];
    }
    if (c->reply_timeout <= 0)
        usage_exit(argv[0], 2);
    parse_server(c, addr);
    if ((c->ca_file || c->insecure) && c->scheme != XP_TLS &&
        c->scheme != XP_WSS)
        fprintf(stderr, "chat-cli: note: --ca and --insecure apply to tls:// "
                "and wss:// only\n");
    if (xp_init(c) < 0)
        return 2;
    the_cli = c;
    srand((unsigned)time(NULL) ^ (unsigned)getpid());
    signal(SIGPIPE, SIG_IGN);
    c->loop = uv_default_loop();
    c->script = !isatty(STDIN_FILENO);
    c->groups = cJSON_CreateArray();
    if (!c->groups)
        cli_oom();
    dur_init(c);
    c->auto_read = !c->no_read_opt;
    uv_timer_init(c->loop, &c->retry_timer);
    uv_timer_init(c->loop, &c->sleep_timer);
    uv_timer_init(c->loop, &c->tick_timer);
    c->retry_timer.data = c->sleep_timer.data = c->tick_timer.data = c;
    uv_signal_init(c->loop, &c->sig_int);
    uv_signal_init(c->loop, &c->sig_term);
    uv_signal_init(c->loop, &c->sig_winch);
    c->sig_int.data = c->sig_term.data = c->sig_winch.data = c;
    uv_signal_start(&c->sig_int, signal_cb, SIGINT);
    uv_signal_start(&c->sig_term, signal_cb, SIGTERM);
    uv_timer_start(&c->tick_timer, tick_cb, TICK_MS, TICK_MS);
    if (!c->script) {
        uv_signal_start(&c->sig_winch, signal_cb, SIGWINCH);
        cli_prompt_update(c);
        rc = term_start(c);
    } else {
        rc = script_start(c);
    }
    if (rc < 0) {
        fprintf(stderr, "chat-cli: cannot read stdin: %s\n", uv_strerror(rc));
        return 1;
    }
    conn_start(c);
    uv_run(c->loop, UV_RUN_DEFAULT);
    rc = c->exit_code;
    uv_loop_close(c->loop);
    free_all(c);
    return rc;
}
