/*
 * test_bus.c - CUnit tests of core/bus.c against real redis-server
 * instances that the test starts itself (contrib/stack/redis.sh) on free
 * loopback ports in mkdtemp directories, and always stops (also on
 * SIGALRM/SIGTERM/SIGINT and at exit).
 *
 * bus.c keeps its state in statics, so the second node of a two-node test is
 * this binary re-executed as a child ("test_bus --node PORT ID FD"), with a
 * fresh loop and its own bus.  The parent drives it over a socketpair with
 * one-line commands ("claim UID FLAGS", "deliver UID HEX", ...) and the child
 * reports what its bus did as one-line events ("D UID HEX" for a delivery,
 * "C UID CODE" for a kick, ...).  Binary payloads travel as hex.
 *
 * Tests that keep Redis running use CHAT_TEST_REDIS_PORT when it is set (else
 * an instance of their own); tests that stop or pause Redis always use their
 * own.  Heartbeat TTL is 2 s.  Waits poll with a deadline; none sleeps.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CUnit/Basic.h>
#include <hiredis/hiredis.h>
#include <uv.h>

#include "core.h"
#include "bus_fakes.h"

#ifndef CHAT_REDIS_SH
#error "CHAT_REDIS_SH (path of contrib/stack/redis.sh) must be defined"
#endif

#define TTL_S 2
#define MAX_INST 4
#define MAX_NODES 4

static uv_loop_t loop;
static uv_timer_t pace;
static char exe[PATH_MAX];
static int64_t uid_base;

/* ---- helpers: redis-server instances ------------------------------------ */

struct inst {
    char dir[64];
    int port;
};

static struct inst *insts[MAX_INST];
static struct inst shared;        /* dir "" when CHAT_TEST_REDIS_PORT is used */
static pid_t children[MAX_NODES];

static int sh(const char *fmt, ...) CHAT_PRINTF(1, 2);
static int sh(const char *fmt, ...)
{
    char cmd[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    return system(cmd) == 0 ? 0 : -1;
}

static int free_port(void)
{
    struct sockaddr_in a;
    socklen_t alen = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;

    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0
        && getsockname(fd, (struct sockaddr *)&a, &alen) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

static int inst_start(struct inst *in)
{
    return sh("'%s' start '%s' %d >/dev/null", CHAT_REDIS_SH, in->dir, in->port);
}

static void inst_stop(struct inst *in)
{
    sh("'%s' stop '%s'", CHAT_REDIS_SH, in->dir);
}

static int inst_new(struct inst *in)
{
    snprintf(in->dir, sizeof(in->dir), "/tmp/chat-bus-XXXXXX");
    if (mkdtemp(in->dir) == NULL)
        return -1;
    in->port = free_port();
    for (int i = 0; i < MAX_INST; i++) {
        if (insts[i] == NULL) {
            insts[i] = in;
            break;
        }
    }
    return inst_start(in);
}

static void inst_del(struct inst *in)
{
    if (in->dir[0] == '\0')
        return;
    inst_stop(in);
    sh("rm -rf '%s'", in->dir);
    for (int i = 0; i < MAX_INST; i++)
        if (insts[i] == in)
            insts[i] = NULL;
    in->dir[0] = '\0';
}

static pid_t inst_pid(const struct inst *in)
{
    char path[128];
    FILE *f;
    long pid = -1;

    snprintf(path, sizeof(path), "%s/redis.pid", in->dir);
    f = fopen(path, "r");
    if (f != NULL) {
        if (fscanf(f, "%ld", &pid) != 1)
            pid = -1;
        fclose(f);
    }
    return (pid_t)pid;
}

static void cleanup_all(void)
{
    for (int i = 0; i < MAX_NODES; i++) {
        if (children[i] > 0) {
            kill(children[i], SIGKILL);
            waitpid(children[i], NULL, 0);
            children[i] = 0;
        }
    }
    for (int i = 0; i < MAX_INST; i++)
        if (insts[i] != NULL)
            inst_del(insts[i]);
}

static void on_fatal_signal(int sig)
{
    static const char msg[] = "test_bus: killed by a signal; cleaning up\n";

    if (write(2, msg, sizeof(msg) - 1) < 0) {
        /* nothing to do */
    }
    cleanup_all();
    _exit(128 + sig);
}

/* ---- helpers: synchronous Redis queries --------------------------------- */

static redisReply *rqueryv(int port, const char *fmt, va_list ap)
{
    redisContext *c = redisConnect("127.0.0.1", port);
    redisReply *r = NULL;

    if (c != NULL && !c->err)
        r = redisvCommand(c, fmt, ap);
    if (c != NULL)
        redisFree(c);
    return r;
}

static redisReply *rquery(int port, const char *fmt, ...)
{
    redisReply *r;
    va_list ap;

    va_start(ap, fmt);
    r = rqueryv(port, fmt, ap);
    va_end(ap);
    return r;
}

/* The string at key, "" when missing, "?" when Redis failed. */
static const char *rget(int port, const char *key)
{
    static char buf[256];
    redisReply *r = rquery(port, "GET %s", key);

    snprintf(buf, sizeof(buf), "%s",
             r == NULL                         ? "?"
             : r->type == REDIS_REPLY_STRING ? r->str
             : r->type == REDIS_REPLY_NIL    ? ""
                                             : "?");
    if (r != NULL)
        freeReplyObject(r);
    return buf;
}

static long long rnum(int port, const char *fmt, const char *arg, const char *arg2)
{
    redisReply *r = rquery(port, fmt, arg, arg2);
    long long v = -999;

    if (r != NULL && r->type == REDIS_REPLY_INTEGER)
        v = r->integer;
    if (r != NULL)
        freeReplyObject(r);
    return v;
}

static const char *ukey(int64_t uid)
{
    static char k[64];
    snprintf(k, sizeof(k), "chatd:user:%" PRId64, uid);
    return k;
}

/* A command (hiredis format) that must succeed. */
static void ok_cmd(int port, const char *fmt, ...)
{
    redisReply *r;
    va_list ap;

    va_start(ap, fmt);
    r = rqueryv(port, fmt, ap);
    va_end(ap);
    CU_ASSERT_PTR_NOT_NULL(r);
    if (r != NULL) {
        CU_ASSERT(r->type != REDIS_REPLY_ERROR);
        freeReplyObject(r);
    }
}

/* ---- helpers: hex ------------------------------------------------------- */

static char *hex_encode(const char *p, size_t len)
{
    static const char digits[] = "0123456789abcdef";
    char *h = malloc(len * 2 + 1);

    for (size_t i = 0; i < len; i++) {
        h[2 * i] = digits[(unsigned char)p[i] >> 4];
        h[2 * i + 1] = digits[(unsigned char)p[i] & 15];
    }
    h[len * 2] = '\0';
    return h;
}

static size_t hex_decode(const char *h, char *out)
{
    size_t n = 0;

    for (; h[0] && h[1]; h += 2) {
        unsigned v;
        sscanf(h, "%2x", &v);
        out[n++] = (char)v;
    }
    return n;
}

/* ---- helpers: the loop -------------------------------------------------- */

static void on_pace(uv_timer_t *t) { (void)t; }

typedef int (*pred_fn)(const void *arg);

/* Run the loop until pred(arg) or timeout_ms; returns pred's last value.
 * stub_pump() plays the host's part after sessions closed. */
static int wait_for(pred_fn pred, const void *arg, int timeout_ms)
{
    uint64_t end;
    int ok;

    uv_update_time(&loop);
    end = uv_now(&loop) + (uint64_t)timeout_ms;
    uv_timer_start(&pace, on_pace, 5, 5);
    while (!(ok = pred(arg)) && uv_now(&loop) < end) {
        uv_run(&loop, UV_RUN_ONCE);
        stub_pump();
    }
    uv_timer_stop(&pace);
    return ok;
}

static int p_connected(const void *a) { (void)a; return bus_connected(); }
static int p_disconnected(const void *a) { (void)a; return !bus_connected(); }
static int p_flag(const void *a) { return *(const int *)a; }

struct p_count {
    char kind;
    int64_t uid;
    size_t n;
};
static int p_count(const void *a)
{
    const struct p_count *c = a;
    return stub_count(c->kind, c->uid) >= c->n;
}

struct p_rget {
    int port;
    const char *key;
    const char *want;
};
static int p_rget(const void *a)
{
    const struct p_rget *g = a;
    return strcmp(rget(g->port, g->key), g->want) == 0;
}

static void loop_setup(void)
{
    stub_reset();
    CU_ASSERT_FATAL(uv_loop_init(&loop) == 0);
    stub_wire(&loop);
    uv_timer_init(&loop, &pace);
}

static void on_closed(uv_handle_t *h) { (void)h; }

/* After bus_stop: the loop must end (every handle closed) by itself. */
static void loop_teardown(void)
{
    uv_close((uv_handle_t *)&pace, on_closed);
    defer_stop();
    CU_ASSERT(uv_run(&loop, UV_RUN_DEFAULT) == 0);
    CU_ASSERT(uv_loop_close(&loop) == 0);
}

static void conf_init(struct conf *c, int port, const char *node)
{
    memset(c, 0, sizeof(*c));
    c->node_id = (char *)node;
    if (port > 0) {
        c->have_redis = 1;
        c->rd_host = "127.0.0.1";
        c->rd_port = port;
        c->rd_heartbeat_ttl_s = TTL_S;
    }
}

static int start_node(int port, const char *node)
{
    struct conf c;

    conf_init(&c, port, node);
    if (bus_start(&loop, &c) != CHAT_OK)
        return -1;
    return port > 0 && !wait_for(p_connected, NULL, 5000) ? -1 : 0;
}

/* ---- helpers: bus calls waited for -------------------------------------- */

struct res {
    int done;
    int status;
    unsigned char online[8];
};

static void on_claim(int status, void *ud)
{
    struct res *r = ud;
    r->done++;
    r->status = status;
}

/* bus_claim and wait; asserts the callback ran later, once. */
static int claim(int64_t uid, int flags)
{
    struct res r = {0};

    CU_ASSERT_FATAL(bus_claim(uid, flags, on_claim, &r) == CHAT_OK);
    CU_ASSERT(r.done == 0);
    CU_ASSERT(wait_for(p_flag, &r.done, 5000));
    CU_ASSERT(r.done == 1);
    return r.done ? r.status : -999;
}

static void on_presence(int status, const int64_t *uids,
                        const unsigned char *online, size_t n, void *ud)
{
    struct res *r = ud;

    (void)uids;
    r->done++;
    r->status = status;
    CU_ASSERT(stub_refs == 1); /* held until after this callback */
    for (size_t i = 0; i < n && i < sizeof(r->online); i++)
        r->online[i] = online[i];
}

/* presence of n uids as a string of '0'/'1' ("" on failure) */
static const char *presence(const int64_t *uids, size_t n)
{
    static char out[16];
    struct res r = {0};

    out[0] = '\0';
    CU_ASSERT_FATAL(bus_presence_query((struct chat_plugin *)&r, uids, n,
                                       on_presence, &r) == CHAT_OK);
    CU_ASSERT(r.done == 0);
    CU_ASSERT(wait_for(p_flag, &r.done, 5000));
    CU_ASSERT(stub_refs == 0);
    if (r.done != 1 || r.status != CHAT_OK)
        return out;
    for (size_t i = 0; i < n; i++)
        out[i] = (char)('0' + r.online[i]);
    out[n] = '\0';
    return out;
}

/* ---- helpers: the child node -------------------------------------------- */

struct node {
    pid_t pid;
    int slot;
    uv_pipe_t pipe;
    char part[65536];
    size_t plen;
    char **lines;
    size_t nlines, cap;
    size_t quiet_count; /* from "n UID COUNT" lines */
    int eof;
};

static void node_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b)
{
    struct node *n = h->data;
    (void)sz;
    *b = uv_buf_init(n->part + n->plen, (unsigned)(sizeof(n->part) - n->plen));
}

static void node_line(struct node *n, const char *line)
{
    unsigned long long cnt;
    int64_t uid;

    if (sscanf(line, "n %" SCNd64 " %llu", &uid, &cnt) == 2) {
        n->quiet_count = cnt;
        return;
    }
    if (n->nlines == n->cap) {
        n->cap = n->cap ? n->cap * 2 : 64;
        n->lines = realloc(n->lines, n->cap * sizeof(*n->lines));
    }
    n->lines[n->nlines++] = strdup(line);
}

static void node_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *b)
{
    struct node *n = st->data;
    char *start, *nl;

    (void)b;
    if (nread < 0) {
        n->eof = 1;
        uv_read_stop(st);
        return;
    }
    n->plen += (size_t)nread;
    start = n->part;
    while ((nl = memchr(start, '\n', n->plen - (size_t)(start - n->part)))) {
        *nl = '\0';
        node_line(n, start);
        start = nl + 1;
    }
    n->plen -= (size_t)(start - n->part);
    memmove(n->part, start, n->plen);
}

static void on_written(uv_write_t *w, int status)
{
    (void)status;
    free(w);
}

/* Queue one line on a pipe (copied). */
static void pipe_send(uv_pipe_t *p, const char *fmt, ...) CHAT_PRINTF(2, 3);
static void pipe_send(uv_pipe_t *p, const char *fmt, ...)
{
    va_list ap;
    int len;
    uv_write_t *w;
    uv_buf_t b;

    va_start(ap, fmt);
    len = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    w = malloc(sizeof(*w) + (size_t)len + 2);
    b = uv_buf_init((char *)(w + 1), (unsigned)len + 1);
    va_start(ap, fmt);
    vsnprintf(b.base, (size_t)len + 1, fmt, ap);
    va_end(ap);
    b.base[len] = '\n';
    if (uv_write(w, (uv_stream_t *)p, &b, 1, on_written) != 0)
        free(w);
}

struct p_line {
    struct node *n;
    const char *prefix;
};
static int p_line(const void *a)
{
    const struct p_line *l = a;
    size_t plen = strlen(l->prefix);

    for (size_t i = 0; i < l->n->nlines; i++)
        if (l->n->lines[i][0] != '\0' && strncmp(l->n->lines[i], l->prefix, plen) == 0)
            return 1;
    return 0;
}

/* Wait for a line starting with prefix; consumes it.  Returns a copy of the
 * line (static buffer) or NULL. */
static const char *node_expect(struct node *n, const char *prefix, int timeout_ms)
{
    static char buf[65536];
    struct p_line l = {n, prefix};
    size_t plen = strlen(prefix);

    if (!wait_for(p_line, &l, timeout_ms))
        return NULL;
    for (size_t i = 0; i < n->nlines; i++) {
        if (n->lines[i][0] != '\0' && strncmp(n->lines[i], prefix, plen) == 0) {
            snprintf(buf, sizeof(buf), "%s", n->lines[i]);
            n->lines[i][0] = '\0';
            return buf;
        }
    }
    return NULL;
}

static int node_spawn(struct node *n, int port, const char *id)
{
    int sv[2];
    char portbuf[16], fdbuf[16];

    memset(n, 0, sizeof(*n));
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        return -1;
    n->pid = fork();
    if (n->pid < 0)
        return -1;
    if (n->pid == 0) {
        for (int fd = 3; fd < 1024; fd++)
            if (fd != sv[1])
                close(fd);
        snprintf(portbuf, sizeof(portbuf), "%d", port);
        snprintf(fdbuf, sizeof(fdbuf), "%d", sv[1]);
        execl(exe, exe, "--node", portbuf, id, fdbuf, (char *)NULL);
        _exit(127);
    }
    close(sv[1]);
    for (n->slot = 0; n->slot < MAX_NODES && children[n->slot]; n->slot++)
        ;
    if (n->slot < MAX_NODES)
        children[n->slot] = n->pid;
    uv_pipe_init(&loop, &n->pipe, 0);
    uv_pipe_open(&n->pipe, sv[0]);
    n->pipe.data = n;
    uv_read_start((uv_stream_t *)&n->pipe, node_alloc, node_read);
    return node_expect(n, "ready", 10000) ? 0 : -1;
}

static void node_free_lines(struct node *n)
{
    for (size_t i = 0; i < n->nlines; i++)
        free(n->lines[i]);
    free(n->lines);
    n->lines = NULL;
    n->nlines = n->cap = 0;
}

static int p_exited(const void *a)
{
    const struct node *n = a;
    return waitpid(n->pid, NULL, WNOHANG) == n->pid;
}

/* Stop the child: EOF on its control pipe makes it bus_stop() and exit. */
static void node_stop(struct node *n)
{
    if (n->pid <= 0)
        return;
    uv_close((uv_handle_t *)&n->pipe, on_closed);
    if (!wait_for(p_exited, n, 10000)) {
        CU_FAIL("child node did not exit");
        kill(n->pid, SIGKILL);
        waitpid(n->pid, NULL, 0);
    }
    if (n->slot < MAX_NODES)
        children[n->slot] = 0;
    n->pid = 0;
    node_free_lines(n);
}

static void node_kill(struct node *n)
{
    kill(n->pid, SIGKILL);
    waitpid(n->pid, NULL, 0);
    if (n->slot < MAX_NODES)
        children[n->slot] = 0;
    n->pid = 0;
    uv_close((uv_handle_t *)&n->pipe, on_closed);
    node_free_lines(n);
}

/* ---- the child node's side ---------------------------------------------- */

static uv_pipe_t ctl;
static uv_timer_t ctl_timer;
static char ctl_part[1 << 20];
static size_t ctl_plen;
static int ctl_ready_sent, ctl_quiet;
static size_t ctl_quiet_n;

static void child_event(const struct stub_event *ev)
{
    char *h;

    if (ctl_quiet && ev->kind == 'D') {
        if (++ctl_quiet_n % 1000 == 0)
            pipe_send(&ctl, "n %" PRId64 " %zu", ev->uid, ctl_quiet_n);
        return;
    }
    h = hex_encode(ev->data, ev->len);
    switch (ev->kind) {
    case 'B':
        pipe_send(&ctl, "B %s %s", ev->plugin, h);
        break;
    case 'C':
        pipe_send(&ctl, "C %" PRId64 " %d", ev->uid, ev->code);
        break;
    default:
        pipe_send(&ctl, "%c %" PRId64 " %s", ev->kind, ev->uid, h);
        break;
    }
    free(h);
}

static void child_on_claim(int status, void *ud)
{
    int64_t uid = (int64_t)(intptr_t)ud;

    if (status == CHAT_OK)
        stub_bind(uid);
    pipe_send(&ctl, "claim %" PRId64 " %d", uid, status);
}

static void child_on_presence(int status, const int64_t *uids,
                              const unsigned char *online, size_t n, void *ud)
{
    char out[64] = "";

    (void)status;
    (void)uids;
    (void)ud;
    for (size_t i = 0; i < n && i < sizeof(out) - 1; i++)
        out[i] = (char)('0' + online[i]);
    pipe_send(&ctl, "presence %s", out);
}

static void child_stop(void)
{
    bus_stop();
    defer_stop();
    if (!uv_is_closing((uv_handle_t *)&ctl))
        uv_close((uv_handle_t *)&ctl, NULL);
    if (!uv_is_closing((uv_handle_t *)&ctl_timer))
        uv_close((uv_handle_t *)&ctl_timer, NULL);
}

static void child_command(char *line)
{
    static char bin[32768];
    int64_t uid, uid2;
    int flags;
    char arg[32768], plugin[64];
    size_t n;

    if (sscanf(line, "claim %" SCNd64 " %d", &uid, &flags) == 2) {
        bus_claim(uid, flags, child_on_claim, (void *)(intptr_t)uid);
    } else if (sscanf(line, "unbind %" SCNd64, &uid) == 1) {
        stub_unbind(uid);
        pipe_send(&ctl, "unbound %" PRId64, uid);
    } else if (sscanf(line, "release %" SCNd64, &uid) == 1) {
        stub_unbind(uid);
        bus_release(uid);
    } else if (sscanf(line, "deliver %" SCNd64 " %32767s", &uid, arg) == 2) {
        n = hex_decode(arg, bin);
        bus_deliver(uid, bin, n);
    } else if (sscanf(line, "bcast %63s %32767s", plugin, arg) == 2) {
        n = hex_decode(arg, bin);
        bus_broadcast(plugin, bin, n);
    } else if (sscanf(line, "presence %" SCNd64 " %" SCNd64, &uid, &uid2) == 2) {
        int64_t uids[2] = {uid, uid2};
        bus_presence_query(NULL, uids, 2, child_on_presence, NULL);
    } else if (sscanf(line, "quiet %d", &flags) == 1) {
        ctl_quiet = flags;
        ctl_quiet_n = 0;
        pipe_send(&ctl, "quiet %d", flags);
    }
}

static void child_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *b)
{
    char *start, *nl;

    (void)b;
    if (nread < 0) {
        child_stop();
        return;
    }
    (void)st;
    ctl_plen += (size_t)nread;
    start = ctl_part;
    while ((nl = memchr(start, '\n', ctl_plen - (size_t)(start - ctl_part)))) {
        *nl = '\0';
        child_command(start);
        start = nl + 1;
    }
    ctl_plen -= (size_t)(start - ctl_part);
    memmove(ctl_part, start, ctl_plen);
}

static void child_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b)
{
    (void)h;
    (void)sz;
    *b = uv_buf_init(ctl_part + ctl_plen, (unsigned)(sizeof(ctl_part) - ctl_plen));
}

static void child_tick(uv_timer_t *t)
{
    (void)t;
    if (!ctl_ready_sent && bus_connected()) {
        ctl_ready_sent = 1;
        pipe_send(&ctl, "ready");
    }
    stub_pump();
}

static int node_main(int port, const char *id, int fd)
{
    struct conf c;

    signal(SIGPIPE, SIG_IGN);
    alarm(120); /* never outlive a lost parent */
    log_level = getenv("CHAT_TEST_VERBOSE") ? CHAT_LOG_DEBUG : CHAT_LOG_ERROR;
    uv_loop_init(&loop);
    stub_wire(&loop);
    conf_init(&c, port, id);
    uv_pipe_init(&loop, &ctl, 0);
    uv_pipe_open(&ctl, fd);
    uv_read_start((uv_stream_t *)&ctl, child_alloc, child_read);
    uv_timer_init(&loop, &ctl_timer);
    uv_timer_start(&ctl_timer, child_tick, 5, 5);
    stub_on_event = child_event;
    if (bus_start(&loop, &c) != CHAT_OK)
        return 1;
    uv_run(&loop, UV_RUN_DEFAULT);
    return uv_loop_close(&loop) == 0 ? 0 : 1;
}

/* ---- tests -------------------------------------------------------------- */

static void on_claim_count(int status, void *ud)
{
    struct res *r = ud;
    r->done++;
    if (status != CHAT_OK)
        r->status = status;
}

/* No [redis]: local or undeliverable, presence from local sessions, every
 * callback and event asynchronous. */
static void test_single_node(void)
{
    struct conf c;
    struct res r = {0};
    struct p_count pc;
    int64_t a = uid_base + 1, b = uid_base + 2;
    int64_t both[2] = {a, b};

    loop_setup();
    conf_init(&c, 0, "");
    CU_ASSERT_FATAL(bus_start(&loop, &c) == CHAT_OK);
    CU_ASSERT(strlen(bus_node_id()) > 0);
    CU_ASSERT(strchr(bus_node_id(), '-') != NULL); /* host-pid-random */
    CU_ASSERT(bus_connected() == 0);
    CU_ASSERT(bus_start(&loop, &c) == CHAT_ERR_STATE);

    stub_bind(a);
    CU_ASSERT(bus_deliver(a, "{\"x\":1}", 7) == CHAT_OK);
    CU_ASSERT(stub_count('D', a) == 1); /* local: queued at once */
    CU_ASSERT(bus_deliver(b, "{\"y\":\0}", 7) == CHAT_OK);
    CU_ASSERT(stub_count('U', b) == 0); /* never inside the call */
    pc = (struct p_count){'U', b, 1};
    CU_ASSERT(wait_for(p_count, &pc, 1000));
    CU_ASSERT(stub_find('U', b, 0) && stub_find('U', b, 0)->len == 7
              && memcmp(stub_find('U', b, 0)->data, "{\"y\":\0}", 7) == 0);

    CU_ASSERT(bus_claim(b, 0, on_claim_count, &r) == CHAT_OK);
    CU_ASSERT(r.done == 0);
    CU_ASSERT(wait_for(p_flag, &r.done, 1000) && r.status == CHAT_OK);
    CU_ASSERT(strcmp(presence(both, 2), "10") == 0);

    CU_ASSERT(bus_broadcast("plug", "hi", 2) == CHAT_OK);
    CU_ASSERT(stub_count('B', 0) == 0);
    pc = (struct p_count){'B', 0, 1};
    CU_ASSERT(wait_for(p_count, &pc, 1000));
    CU_ASSERT(strcmp(stub_find('B', 0, 0)->plugin, "plug") == 0);
    CU_ASSERT(bus_broadcast("a\nb", "", 0) == CHAT_ERR_INVAL);

    bus_stop();
    CU_ASSERT(bus_deliver(a, "{}", 2) == CHAT_ERR_CLOSED);
    loop_teardown();
    CU_ASSERT(stub_count('B', 0) == 1);
}

/* Keys in Redis, refcounted release, a restarted node clearing what its
 * previous incarnation held, presence, and bus_stop cleaning up. */
static void test_presence_keys(void)
{
    char node[64], held[96], hb[96];
    int64_t u1 = uid_base + 11, u2 = uid_base + 12, u3 = uid_base + 13;
    int64_t stale = uid_base + 14, other = uid_base + 15;
    int64_t q[3] = {u1, u2, other};
    struct p_rget g;
    int port = shared.port;

    snprintf(node, sizeof(node), "t%d-a", (int)getpid());
    snprintf(held, sizeof(held), "chatd:held:%s", node);
    snprintf(hb, sizeof(hb), "chatd:hb:%s", node);
    /* a previous incarnation of this node held `stale`; `other` moved on */
    ok_cmd(port, "SET %s %s", ukey(stale), node);
    ok_cmd(port, "SET %s t%d-gone", ukey(other), (int)getpid());
    ok_cmd(port, "SADD %s %" PRId64 " %" PRId64, held, stale, other);

    loop_setup();
    CU_ASSERT_FATAL(start_node(port, node) == 0);
    CU_ASSERT(strcmp(bus_node_id(), node) == 0);
    g = (struct p_rget){port, ukey(stale), ""}; /* the sync is under way */
    CU_ASSERT(wait_for(p_rget, &g, 3000));
    CU_ASSERT(strncmp(rget(port, ukey(other)), "t", 1) == 0);
    CU_ASSERT(rnum(port, "TTL %s", hb, NULL) > 0);
    CU_ASSERT(rnum(port, "TTL %s", hb, NULL) <= TTL_S);

    CU_ASSERT(claim(u1, 0) == CHAT_OK);
    CU_ASSERT(strcmp(rget(port, ukey(u1)), node) == 0);
    CU_ASSERT(rnum(port, "SCARD %s", held, NULL) == 1);
    /* u1 is online through Redis (no local session), u2 is not, other's
     * node has no heartbeat */
    CU_ASSERT(strcmp(presence(q, 3), "100") == 0);
    stub_bind(u2);
    CU_ASSERT(strcmp(presence(q, 3), "110") == 0);
    CU_ASSERT(strcmp(presence(q, 0), "") == 0);

    /* two claims (same-node re-login): the first release keeps the key */
    CU_ASSERT(claim(u3, 0) == CHAT_OK);
    CU_ASSERT(claim(u3, 0) == CHAT_OK);
    bus_release(u3);
    CU_ASSERT(claim(u1, 0) == CHAT_OK); /* a round trip after the release */
    CU_ASSERT(strcmp(rget(port, ukey(u3)), node) == 0);
    bus_release(u3);
    g = (struct p_rget){port, ukey(u3), ""};
    CU_ASSERT(wait_for(p_rget, &g, 3000));
    bus_release(u3); /* unbalanced: ignored */

    /* the heartbeat is refreshed: still there after more than a TTL */
    uv_update_time(&loop);
    {
        uint64_t until = uv_now(&loop) + TTL_S * 1000 + 500;
        while (uv_now(&loop) < until) {
            uv_timer_start(&pace, on_pace, 50, 50);
            uv_run(&loop, UV_RUN_ONCE);
        }
        uv_timer_stop(&pace);
    }
    CU_ASSERT(rnum(port, "EXISTS %s", hb, NULL) == 1);

    bus_stop();
    loop_teardown();
    CU_ASSERT(strcmp(rget(port, ukey(u1)), "") == 0);
    CU_ASSERT(rnum(port, "EXISTS %s", hb, NULL) == 0);
    CU_ASSERT(rnum(port, "EXISTS %s", held, NULL) == 0);
    ok_cmd(port, "DEL %s", ukey(other));
}

static double now_ms(void) { return (double)uv_hrtime() / 1e6; }

/* Two nodes: remote delivery (binary-safe), refusal, presence, broadcast
 * both ways, replace with kick, throughput and latency. */
static void test_two_nodes(void)
{
    struct node child;
    char pnode[64], cnode[64], msg[160], *h;
    int64_t u = uid_base + 21, v = uid_base + 22, nobody = uid_base + 23;
    int64_t uv2[2] = {u, nobody};
    struct p_count pc;
    int port = shared.port;
    static const char bin[] = "{\"m\":\"a\0b\\\"\xc3\xa9\"}";
    size_t binlen = sizeof(bin) - 1;

    snprintf(pnode, sizeof(pnode), "t%d-p", (int)getpid());
    snprintf(cnode, sizeof(cnode), "t%d-c", (int)getpid());
    loop_setup();
    CU_ASSERT_FATAL(start_node(port, pnode) == 0);
    if (node_spawn(&child, port, cnode) != 0) {
        CU_FAIL("child node did not come up");
        goto out;
    }
    pipe_send(&child.pipe, "claim %" PRId64 " 0", u);
    snprintf(msg, sizeof(msg), "claim %" PRId64 " 0", u);
    CU_ASSERT(node_expect(&child, msg, 5000) != NULL);

    /* remote delivery, binary-safe */
    CU_ASSERT(bus_deliver(u, bin, binlen) == CHAT_OK);
    h = hex_encode(bin, binlen);
    snprintf(msg, sizeof(msg), "D %" PRId64 " %s", u, h);
    free(h);
    CU_ASSERT(node_expect(&child, msg, 5000) != NULL);
    CU_ASSERT(stub_count('U', u) == 0);
    /* nobody holds this one */
    CU_ASSERT(bus_deliver(nobody, "{}", 2) == CHAT_OK);
    pc = (struct p_count){'U', nobody, 1};
    CU_ASSERT(wait_for(p_count, &pc, 3000));

    /* the holder's key names the child, which has no session any more:
     * the child raises undeliverable */
    pipe_send(&child.pipe, "claim %" PRId64 " 0", nobody);
    snprintf(msg, sizeof(msg), "claim %" PRId64 " 0", nobody);
    CU_ASSERT(node_expect(&child, msg, 5000) != NULL);
    pipe_send(&child.pipe, "unbind %" PRId64, nobody);
    snprintf(msg, sizeof(msg), "unbound %" PRId64, nobody);
    CU_ASSERT(node_expect(&child, msg, 5000) != NULL); /* before the delivery */
    CU_ASSERT(bus_deliver(nobody, "{\"gone\":1}", 10) == CHAT_OK);
    snprintf(msg, sizeof(msg), "U %" PRId64 " 7b22676f6e65223a317d", nobody);
    CU_ASSERT(node_expect(&child, msg, 5000) != NULL);
    CU_ASSERT(stub_count('U', nobody) == 1); /* only the earlier one here */
    pipe_send(&child.pipe, "release %" PRId64, nobody);

    /* refused while the holder lives; presence from the other node. The
     * child's release reaches Redis on the child's own connection, with no
     * order against ours, so poll until it has landed. */
    CU_ASSERT(claim(u, 0) == CHAT_ERR_EXISTS);
    {
        uint64_t until = uv_hrtime() + 5000ULL * 1000000ULL;

        while (strcmp(presence(uv2, 2), "10") != 0 && uv_hrtime() < until)
            ;
        CU_ASSERT(strcmp(presence(uv2, 2), "10") == 0);
    }
    pipe_send(&child.pipe, "presence %" PRId64 " %" PRId64, u, nobody);
    CU_ASSERT(node_expect(&child, "presence 10", 5000) != NULL);

    /* broadcast both ways, each node fires once */
    CU_ASSERT(bus_broadcast("plg", "x\0y", 3) == CHAT_OK);
    CU_ASSERT(node_expect(&child, "B plg 780079", 5000) != NULL);
    pipe_send(&child.pipe, "bcast other 7a");
    CU_ASSERT(node_expect(&child, "B other 7a", 5000) != NULL);
    pc = (struct p_count){'B', 0, 2};
    CU_ASSERT(wait_for(p_count, &pc, 5000));
    CU_ASSERT(stub_count('B', 0) == 2);
    CU_ASSERT(node_expect(&child, "B ", 300) == NULL); /* not twice */
    if (stub_find('B', 0, 1) != NULL)
        CU_ASSERT(strcmp(stub_find('B', 0, 1)->plugin, "other") == 0);

    /* throughput: route+publish from this node to the child */
    pipe_send(&child.pipe, "claim %" PRId64 " 0", v);
    snprintf(msg, sizeof(msg), "claim %" PRId64 " 0", v);
    CU_ASSERT(node_expect(&child, msg, 5000) != NULL);
    {
        enum { N = 20000, LAT = 200 };
        char json[128];
        double t0, t1, sum = 0, max = 0;
        int len = snprintf(json, sizeof(json),
                           "{\"msgid\":6,\"id\":1,\"from\":\"alice\",\"to\":%" PRId64
                           ",\"msg\":\"hello there, this is a test\"}", v);

        for (int i = 0; i < LAT; i++) {
            t0 = now_ms();
            bus_deliver(v, json, (size_t)len);
            snprintf(msg, sizeof(msg), "D %" PRId64 " ", v);
            if (node_expect(&child, msg, 5000) == NULL)
                break;
            t1 = now_ms() - t0;
            sum += t1;
            max = t1 > max ? t1 : max;
        }
        printf("\n    remote delivery latency (deliver -> child's session, "
               "plus the report back): avg %.3f ms, max %.3f ms over %d\n",
               sum / LAT, max, LAT);
        pipe_send(&child.pipe, "quiet 1");
        CU_ASSERT(node_expect(&child, "quiet 1", 5000) != NULL);
        t0 = now_ms();
        for (int i = 0; i < N; i++)
            CU_ASSERT_FATAL(bus_deliver(v, json, (size_t)len) == CHAT_OK);
        t1 = now_ms();
        child.quiet_count = 0;
        {
            uint64_t end;
            uv_update_time(&loop);
            end = uv_now(&loop) + 30000;
            uv_timer_start(&pace, on_pace, 5, 5);
            while (child.quiet_count < (size_t)N && uv_now(&loop) < end)
                uv_run(&loop, UV_RUN_ONCE);
            uv_timer_stop(&pace);
        }
        CU_ASSERT(child.quiet_count == (size_t)N);
        printf("    remote delivery throughput: %d deliveries in %.0f ms = "
               "%.0f/s (queueing the calls took %.0f ms)\n",
               N, now_ms() - t0, N / ((now_ms() - t0) / 1000), t1 - t0);
        CU_ASSERT(stub_count('U', v) == 0);
        pipe_send(&child.pipe, "quiet 0");
        CU_ASSERT(node_expect(&child, "quiet 0", 5000) != NULL);
    }

    /* replace: the child is kicked; its release leaves our claim alone */
    CU_ASSERT(claim(u, CHAT_LOGIN_REPLACE) == CHAT_OK);
    stub_bind(u);
    snprintf(msg, sizeof(msg), "C %" PRId64 " %d", u, CHAT_E_REPLACED);
    CU_ASSERT(node_expect(&child, msg, 5000) != NULL);
    snprintf(msg, sizeof(msg), "R %" PRId64, u);
    CU_ASSERT(node_expect(&child, msg, 5000) != NULL);
    CU_ASSERT(strcmp(rget(port, ukey(u)), pnode) == 0);
    /* and the child now reaches u here */
    pipe_send(&child.pipe, "deliver %" PRId64 " 7b7d", u);
    pc = (struct p_count){'D', u, 1};
    CU_ASSERT(wait_for(p_count, &pc, 5000));

    /* the holder dies: refused until its heartbeat expires (<= TTL) */
    CU_ASSERT(claim(v, 0) == CHAT_ERR_EXISTS);
    node_kill(&child);
    {
        double t0 = now_ms(), waited;
        int64_t one[1] = {v};
        struct p_count pu = {'U', v, 1};

        /* its subscription is gone: PUBLISH reaches nobody */
        CU_ASSERT(bus_deliver(v, "{}", 2) == CHAT_OK);
        CU_ASSERT(wait_for(p_count, &pu, 3000));
        while (strcmp(presence(one, 1), "1") == 0 && now_ms() - t0 < 5000)
            wait_for(p_flag, &(int){0}, 100);
        waited = now_ms() - t0;
        printf("    dead holder seen offline after %.0f ms (ttl %d s)\n",
               waited, TTL_S);
        CU_ASSERT(waited <= TTL_S * 1000 + 1000);
        CU_ASSERT(claim(v, 0) == CHAT_OK);
        bus_release(v);
    }
out:
    if (child.pid > 0)
        node_stop(&child);
    bus_stop();
    loop_teardown();
}

/* Multi-device (CHAT_LOGIN_MULTI): one user claimed on both nodes, counted
 * per node in chatd:dev:<uid>; a delivery from either node reaches both
 * (the holder's own session now, the other node's quietly); the cluster-wide
 * maximum refuses with CHAT_ERR_BUSY; releases count down; a dead node's
 * devices stop counting; the last release makes the user offline. */
static void test_multi_device(void)
{
    struct node child;
    char pnode[64], cnode[64], msg[160], dkey[64];
    int64_t u = uid_base + 41;
    int64_t one[1] = {u};
    int flags = CHAT_LOGIN_MULTI | CHAT_LOGIN_DEVICES_MAX(3);
    struct p_count pc;
    int port = shared.port;

    snprintf(pnode, sizeof(pnode), "t%d-mp", (int)getpid());
    snprintf(cnode, sizeof(cnode), "t%d-mc", (int)getpid());
    snprintf(dkey, sizeof(dkey), "chatd:dev:%" PRId64, u);
    loop_setup();
    CU_ASSERT_FATAL(start_node(port, pnode) == 0);
    if (node_spawn(&child, port, cnode) != 0) {
        CU_FAIL("child node did not come up");
        goto out;
    }
    CU_ASSERT(claim(u, flags) == CHAT_OK);
    stub_bind(u);
    snprintf(msg, sizeof(msg), "claim %" PRId64 " %d", u, flags);
    pipe_send(&child.pipe, "%s", msg);
    snprintf(msg, sizeof(msg), "claim %" PRId64 " 0", u);
    CU_ASSERT(node_expect(&child, msg, 5000) != NULL);
    {
        redisReply *r = rquery(port, "HGET %s %s", dkey, pnode);
        CU_ASSERT(r != NULL && r->type == REDIS_REPLY_STRING && strcmp(r->str, "1") == 0);
        if (r != NULL)
            freeReplyObject(r);
    }
    CU_ASSERT(strcmp(rget(port, ukey(u)), "") == 0); /* no single-device key */
    {
        redisReply *r = rquery(port, "HLEN %s", dkey);
        CU_ASSERT(r != NULL && r->type == REDIS_REPLY_INTEGER && r->integer == 2);
        if (r != NULL)
            freeReplyObject(r);
    }

    /* from here: both nodes' sessions, no undeliverable */
    CU_ASSERT(bus_deliver(u, "{}", 2) == CHAT_OK);
    CU_ASSERT(stub_count('D', u) == 1); /* ours at once */
    snprintf(msg, sizeof(msg), "D %" PRId64 " 7b7d", u);
    CU_ASSERT(node_expect(&child, msg, 5000) != NULL);
    /* from the child: its session and ours */
    pipe_send(&child.pipe, "deliver %" PRId64 " 7b7d", u);
    CU_ASSERT(node_expect(&child, msg, 5000) != NULL);
    pc = (struct p_count){'D', u, 2};
    CU_ASSERT(wait_for(p_count, &pc, 5000));
    CU_ASSERT(stub_count('U', u) == 0);

    /* the maximum is cluster-wide: a third device fits, a fourth does not */
    CU_ASSERT(claim(u, flags) == CHAT_OK);
    CU_ASSERT(claim(u, flags) == CHAT_ERR_BUSY);
    CU_ASSERT(strcmp(presence(one, 1), "1") == 0);
    /* one device of ours goes: two left, room for one */
    bus_release(u);
    CU_ASSERT(claim(u, flags) == CHAT_OK);
    bus_release(u);

    /* the child dies: its device stops counting once its heartbeat is gone
     * (one here and one there: a maximum of 2 refuses until then) */
    node_kill(&child);
    {
        int two = CHAT_LOGIN_MULTI | CHAT_LOGIN_DEVICES_MAX(2);
        uint64_t until = uv_hrtime() + (TTL_S + 3) * 1000000000ULL;
        int st = claim(u, two);

        CU_ASSERT(st == CHAT_ERR_BUSY);
        while (st == CHAT_ERR_BUSY && uv_hrtime() < until) {
            wait_for(p_flag, &(int){0}, 200);
            st = claim(u, two);
        }
        CU_ASSERT(st == CHAT_OK);
        bus_release(u);
    }
    CU_ASSERT(strcmp(presence(one, 1), "1") == 0);
    bus_release(u);
    stub_unbind(u);
    CU_ASSERT(strcmp(presence(one, 1), "0") == 0); /* ordered after the release */
    CU_ASSERT(rnum(port, "EXISTS %s", dkey, NULL) == 0);
out:
    if (child.pid > 0)
        node_stop(&child);
    bus_stop();
    loop_teardown();
}

/* Redis stops and comes back: local delivery keeps working, remote goes to
 * undeliverable, claims succeed locally and are re-announced, the
 * heartbeat resumes. */
static void test_redis_restart(void)
{
    struct inst in;
    char node[64], hb[96];
    int64_t a = uid_base + 31, b = uid_base + 32, c = uid_base + 33;
    int64_t m = uid_base + 34;
    int64_t abc[3] = {a, b, c};
    struct p_count pc;
    struct p_rget g;
    char dkey[64];

    CU_ASSERT_FATAL(inst_new(&in) == 0);
    snprintf(node, sizeof(node), "t%d-r", (int)getpid());
    snprintf(hb, sizeof(hb), "chatd:hb:%s", node);
    loop_setup();
    CU_ASSERT_FATAL(start_node(in.port, node) == 0);
    CU_ASSERT(claim(a, 0) == CHAT_OK);
    stub_bind(a);
    /* a multi-device user: two devices here, then one more and one less
     * while Redis is away; the sync announces the count (2) */
    snprintf(dkey, sizeof(dkey), "chatd:dev:%" PRId64, m);
    CU_ASSERT(claim(m, CHAT_LOGIN_MULTI) == CHAT_OK);
    CU_ASSERT(claim(m, CHAT_LOGIN_MULTI) == CHAT_OK);

    inst_stop(&in);
    CU_ASSERT(wait_for(p_disconnected, NULL, 5000));
    CU_ASSERT(bus_deliver(a, "{\"l\":1}", 7) == CHAT_OK);
    CU_ASSERT(stub_count('D', a) == 1);
    CU_ASSERT(bus_deliver(b, "{\"r\":1}", 7) == CHAT_OK);
    CU_ASSERT(stub_count('U', b) == 0);
    pc = (struct p_count){'U', b, 1};
    CU_ASSERT(wait_for(p_count, &pc, 1000));
    CU_ASSERT(claim(c, 0) == CHAT_OK);
    stub_bind(c);
    CU_ASSERT(strcmp(presence(abc, 3), "101") == 0);
    CU_ASSERT(claim(m, CHAT_LOGIN_MULTI) == CHAT_OK);
    bus_release(m);

    CU_ASSERT_FATAL(inst_start(&in) == 0);
    CU_ASSERT(wait_for(p_connected, NULL, 8000));
    g = (struct p_rget){in.port, ukey(c), node};
    CU_ASSERT(wait_for(p_rget, &g, 3000));
    {
        redisReply *r = rquery(in.port, "HGET %s %s", dkey, node);
        CU_ASSERT(r != NULL && r->type == REDIS_REPLY_STRING && strcmp(r->str, "2") == 0);
        if (r != NULL)
            freeReplyObject(r);
    }
    bus_release(m);
    bus_release(m);
    {
        int64_t one[1] = {m};
        CU_ASSERT(strcmp(presence(one, 1), "0") == 0);
    }
    g = (struct p_rget){in.port, ukey(a), node};
    CU_ASSERT(wait_for(p_rget, &g, 3000));
    g.key = ukey(c);
    CU_ASSERT(wait_for(p_rget, &g, 3000));
    CU_ASSERT(rnum(in.port, "EXISTS %s", hb, NULL) == 1);
    CU_ASSERT(strcmp(presence(abc, 3), "101") == 0);
    bus_release(c);
    g = (struct p_rget){in.port, ukey(c), ""};
    CU_ASSERT(wait_for(p_rget, &g, 3000));

    bus_stop();
    loop_teardown();
    CU_ASSERT(strcmp(rget(in.port, ukey(a)), "") == 0);
    inst_del(&in);
}

/* Commands in flight when the link fails all complete: a stalled server
 * (CLIENT PAUSE) is detected by the watchdog, a killed one by the socket. */
static void test_pending_on_failure(void)
{
    enum { N = 200 };
    struct inst in;
    char node[64];
    int64_t far = uid_base + 41, me = uid_base + 42;
    int64_t two[2] = {far, me};
    struct res cr = {0}, pr = {0};
    struct p_count pc = {'U', far, 0};
    double t0;

    CU_ASSERT_FATAL(inst_new(&in) == 0);
    snprintf(node, sizeof(node), "t%d-f", (int)getpid());
    loop_setup();
    CU_ASSERT_FATAL(start_node(in.port, node) == 0);
    /* a live-looking remote holder, so deliveries really go out */
    ok_cmd(in.port, "SET %s t%d-far", ukey(far), (int)getpid());
    ok_cmd(in.port, "SET chatd:hb:t%d-far 1 EX 60", (int)getpid());

    for (int round = 0; round < 2; round++) {
        ok_cmd(in.port, "CLIENT PAUSE 5000 ALL");
        for (int i = 0; i < N; i++)
            CU_ASSERT(bus_deliver(far, "{\"p\":1}", 7) == CHAT_OK);
        memset(&cr, 0, sizeof(cr));
        memset(&pr, 0, sizeof(pr));
        CU_ASSERT(bus_claim(me, 0, on_claim_count, &cr) == CHAT_OK);
        CU_ASSERT(bus_presence_query((struct chat_plugin *)&pr, two, 2,
                                     on_presence, &pr) == CHAT_OK);
        stub_bind(me);
        t0 = now_ms();
        if (round == 1) {
            /* killed with everything in flight */
            pid_t pid = inst_pid(&in);
            CU_ASSERT_FATAL(pid > 0);
            kill(pid, SIGKILL);
        }
        pc.n += N;
        CU_ASSERT(wait_for(p_count, &pc, 8000));
        CU_ASSERT(stub_count('U', far) == pc.n);
        CU_ASSERT(wait_for(p_flag, &cr.done, 1000) && cr.status == CHAT_OK);
        CU_ASSERT(wait_for(p_flag, &pr.done, 1000));
        CU_ASSERT(pr.online[0] == 0 && pr.online[1] == 1);
        CU_ASSERT(stub_refs == 0);
        printf("\n    %s: %d pending deliveries failed over to undeliverable "
               "after %.0f ms\n", round ? "redis killed" : "redis paused",
               N, now_ms() - t0);
        if (round == 1) {
            inst_stop(&in); /* reap the pidfile */
            CU_ASSERT_FATAL(inst_start(&in) == 0);
        }
        CU_ASSERT(wait_for(p_connected, NULL, 10000));
        if (round == 1) {
            /* a fresh server: the far holder is gone, me re-announced */
            struct p_rget g = {in.port, ukey(me), node};
            CU_ASSERT(wait_for(p_rget, &g, 3000));
        }
        stub_unbind(me);
        bus_release(me);
    }
    bus_stop();
    loop_teardown();
    inst_del(&in);
}

int main(int argc, char **argv)
{
    CU_pSuite suite;
    const char *env;
    unsigned failed;

    if (argc == 5 && strcmp(argv[1], "--node") == 0)
        return node_main(atoi(argv[2]), argv[3], atoi(argv[4]));

    if (realpath("/proc/self/exe", exe) == NULL)
        return 1;
    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_fatal_signal);
    signal(SIGTERM, on_fatal_signal);
    signal(SIGINT, on_fatal_signal);
    atexit(cleanup_all);
    alarm(240);
    log_level = getenv("CHAT_TEST_VERBOSE") ? CHAT_LOG_DEBUG : CHAT_LOG_ERROR;
    uid_base = (int64_t)getpid() * 1000;

    env = getenv("CHAT_TEST_REDIS_PORT");
    if (env != NULL && atoi(env) > 0) {
        shared.port = atoi(env);
    } else if (inst_new(&shared) != 0) {
        fprintf(stderr, "test_bus: cannot start redis-server\n");
        return 1;
    }

    if (CU_initialize_registry() != CUE_SUCCESS)
        return 1;
    suite = CU_add_suite("bus", NULL, NULL);
    CU_add_test(suite, "single node (no redis)", test_single_node);
    CU_add_test(suite, "presence keys, release, restart, stop", test_presence_keys);
    CU_add_test(suite, "two nodes", test_two_nodes);
    CU_add_test(suite, "multi-device", test_multi_device);
    CU_add_test(suite, "redis restart", test_redis_restart);
    CU_add_test(suite, "pending commands on failure", test_pending_on_failure);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failed = CU_get_number_of_failures();
    CU_cleanup_registry();
    inst_del(&shared);
    return failed ? 1 : 0;
}
