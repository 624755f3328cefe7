/*
 * failover.c - the failover login storm (issue 12): N legacy users logged
 * in on one node, that node killed, and the re-login curve through nginx.
 *
 *   chat-bench failover -t VICTIM -t LB -t SURVIVOR... -K N --victim-pid PID
 *
 * One process, one libuv loop (the storm is a few hundred logins a second;
 * the server side is what is measured).  Targets: the first is the node
 * that will be killed (the N users log in there directly), the second the
 * load balancer the users come back through, the rest the surviving nodes,
 * where P chat pairs (-P, sender on one survivor, receiver on the next)
 * exchange ONE_CHAT_MSG at --rate messages/s in total the whole time.
 *
 * Phases: the pairs log in; the N users log in on the victim (the "fill":
 * with a warm authentication cache this is fast, else it costs N password
 * hashes); --hook runs (a shell command, e.g. one that reconfigures the
 * survivors); --calm seconds of chat only (the calm latency); SIGKILL to
 * --victim-pid; every user whose connection died reconnects through the
 * load balancer at once and logs in again with its password, as a legacy
 * client does, until all N are back or --storm-max seconds passed (the
 * storm latency is measured from the kill to then).
 *
 * Legacy clients see "busy" (errno 1 with "busy"/"try again": the hashing
 * queue or the per-address limit) and "in use" (errno 2: the dead node's
 * presence lives until its heartbeat expires); both are retried with an
 * exponential backoff from 100 ms to 3.2 s (jittered), as a well-behaved
 * client would, on the same connection.  At most --concurrency connects
 * and logins are in progress at once.
 *
 * The pairs run in a child process with a loop of their own: the storm's
 * thousands of connects and login replies in this process would otherwise
 * delay the pairs' deliveries and count as server latency.
 *
 * Output: a progress line per second (the chat child's with that second's
 * p99), the re-login curve (logins per second
 * since the kill), and one RESULT line with the time until all users were
 * back, the sustained rate (N over first to last re-login) and the chat
 * p50/p99 of the pairs, calm and during the storm.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"

#define FO_TICK_MS 10
#define FO_MAX_SEC 3600
#define FO_BACKOFF_MIN_NS (100ull * 1000000ull)
#define FO_BACKOFF_MAX_NS (3200ull * 1000000ull)
#define NS 1000000000ull

enum fo_state { FS_WAIT, FS_CONNECTING, FS_LOGIN, FS_UP, FS_GAVE_UP };
enum fo_phase { PH_PAIRS, PH_FILL, PH_CALM, PH_STORM, PH_END };

struct fo_link;

struct fo_user {
    int slot;              /* index into bench.users */
    int target;            /* where the next connect goes */
    enum fo_state st;
    struct fo_link *link;  /* the current connection (NULL: none) */
    unsigned tries;        /* failed attempts in a row (backoff) */
    uint64_t retry_at;     /* FS_WAIT: connect then; FS_LOGIN: resend then */
    int resend;            /* FS_LOGIN: the login is to be sent again */
    int storm;             /* on the victim at the kill, not back yet */
};

/* One connection; freed in its close callback, so a user reconnects on a
 * fresh one without waiting for libuv. */
struct fo_link {
    struct bn_conn c;
    struct fo_user *u;     /* NULL once the user left it */
};

static struct {
    uv_loop_t loop;
    struct bn_net net;
    uv_timer_t tick;
    struct fo_user *users; /* N storm users, then 2P pair members */
    int n, np;
    int inflight, up, pairs_up, gave_up;
    int storm_users;       /* logged in on the victim when it was killed */
    enum fo_phase phase;
    uint64_t t0, t_phase, t_kill, t_first, t_last, t_fill;
    uint64_t busy, in_use, conn_err, invalid, relogins;
    uint32_t per_sec[FO_MAX_SEC];
    struct bst_hist calm, storm;
    struct bst_hist sec;   /* this second's chat latency (progress lines) */
    double credit;
    uint64_t t_credit;
    int next_sender;
    uint64_t sent, recv, last_prog;
    uint64_t rng;
    /* the chat pairs run in a child process of their own, so that the
     * storm's client work never delays their deliveries: */
    int chat_child;        /* this process is that child */
    pid_t child;           /* the parent: the child's pid (0: no pairs) */
    int to_fd, from_fd;    /* commands to / replies from the other process */
    int child_ready;
} F;

/* The chat child's results, written to the parent at the end. */
struct fo_chat_res {
    uint64_t sent, recv;
    struct bst_hist calm, storm;
};

static uint64_t fo_rand(void)
{
    F.rng ^= F.rng << 13;
    F.rng ^= F.rng >> 7;
    F.rng ^= F.rng << 17;
    return F.rng;
}

static int fo_is_pair(const struct fo_user *u) { return u - F.users >= F.n; }

static void fo_send_login(struct fo_user *u)
{
    const struct bench_user *bu = &bench.users[u->slot];
    struct bn_buf *b = bn_out(&u->link->c);

    bn_buf_add(b, "{\"msgid\":1,\"id\":", 16);
    bn_buf_addi(b, bu->id);
    bn_buf_add(b, ",\"password\":", 12);
    bn_buf_addjs(b, bu->pass, strlen(bu->pass));
    bn_buf_add(b, "}", 2); /* with the NUL */
    u->resend = 0;
}

static uint64_t fo_backoff(struct fo_user *u)
{
    uint64_t d = FO_BACKOFF_MIN_NS << (u->tries < 5 ? u->tries : 5);

    if (d > FO_BACKOFF_MAX_NS)
        d = FO_BACKOFF_MAX_NS;
    u->tries++;
    return d / 2 + fo_rand() % (d / 2 + 1);
}

static void fo_link_closed(uv_handle_t *h)
{
    struct fo_link *l = h->data;

    bn_buf_free(&l->c.out);
    bn_buf_free(&l->c.wbuf);
    bn_buf_free(&l->c.in);
    free(l);
}

/* The user's connection is gone (or must go): close it, wait, reconnect
 * (through the load balancer once the victim is dead). */
static void fo_drop(struct fo_user *u, uint64_t delay)
{
    if (u->st == FS_CONNECTING || u->st == FS_LOGIN)
        F.inflight--;
    if (u->st == FS_UP) {
        if (fo_is_pair(u))
            F.pairs_up--;
        else
            F.up--;
    }
    if (u->link) {
        u->link->u = NULL;
        bn_close(&u->link->c, fo_link_closed);
        u->link = NULL;
    }
    if (!fo_is_pair(u) && F.phase >= PH_STORM)
        u->target = 1;
    u->st = FS_WAIT;
    u->retry_at = bst_now_ns() + delay;
}

static void fo_on_error(struct bn_conn *c, int status)
{
    struct fo_link *l = c->data;

    (void)status;
    if (l->u) {
        if (l->u->st != FS_UP)
            F.conn_err++;
        fo_drop(l->u, l->u->st == FS_UP ? 0 : fo_backoff(l->u));
    } else {
        bn_close(c, fo_link_closed);
    }
}

static void fo_on_connect(struct bn_conn *c, int status)
{
    struct fo_link *l = c->data;
    struct fo_user *u = l->u;

    if (!u) {
        bn_close(c, fo_link_closed);
        return;
    }
    if (status < 0) {
        F.conn_err++;
        fo_drop(u, fo_backoff(u));
        return;
    }
    u->st = FS_LOGIN;
    fo_send_login(u);
}

static void fo_logged_in(struct fo_user *u)
{
    uint64_t now = bst_now_ns();

    F.inflight--;
    u->st = FS_UP;
    u->tries = 0;
    if (fo_is_pair(u)) {
        F.pairs_up++;
        return;
    }
    F.up++;
    if (F.phase == PH_STORM && u->storm) { /* back for the first time */
        uint64_t s = (now - F.t_kill) / NS;
        u->storm = 0;
        F.relogins++;
        F.per_sec[s < FO_MAX_SEC ? s : FO_MAX_SEC - 1]++;
        if (!F.t_first)
            F.t_first = now;
        F.t_last = now;
    }
}

static void fo_login_reply(struct fo_user *u, const struct bn_fields *f)
{
    if (f->has_errno && f->errno_ == 0) {
        fo_logged_in(u);
        return;
    }
    if (bn_is_busy(f) || (f->has_errno && f->errno_ == 2)) {
        if (bn_is_busy(f))
            F.busy++;
        else
            F.in_use++;
        u->resend = 1;
        u->retry_at = bst_now_ns() + fo_backoff(u);
        return;
    }
    F.invalid++;
    if (F.invalid == 1)
        fprintf(stderr, "chat-bench: login of user %lld refused (errno %lld): "
                "a stale --ids file or wrong password?\n",
                (long long)bench.users[u->slot].id, (long long)f->errno_);
    fo_drop(u, 0);
    u->st = FS_GAVE_UP;
    F.gave_up++;
}

/* A delivery to a pair's receiver: msg is the sender's clock in ns. */
static void fo_delivery(const struct bn_fields *f)
{
    uint64_t now = bst_now_ns(), t = 0;

    for (size_t i = 0; i < f->msg_len && f->msg[i] >= '0' && f->msg[i] <= '9'; i++)
        t = t * 10 + (uint64_t)(f->msg[i] - '0');
    if (!t || t > now)
        return;
    F.recv++;
    bst_hist_add(&F.sec, now - t);
    if (F.phase == PH_CALM)
        bst_hist_add(&F.calm, now - t);
    else if (F.phase == PH_STORM)
        bst_hist_add(&F.storm, now - t);
}

static void fo_on_frame(struct bn_conn *c, const char *frame, size_t len)
{
    struct fo_link *l = c->data;
    struct bn_fields f;

    if (!l->u || bn_scan(frame, len, &f) < 0 || !f.has_msgid)
        return;
    if (f.msgid == 2 && l->u->st == FS_LOGIN && !l->u->resend)
        fo_login_reply(l->u, &f);
    else if (f.msgid == 6 && f.msg)
        fo_delivery(&f);
}

static void fo_connect(struct fo_user *u)
{
    struct fo_link *l = bx_calloc(1, sizeof(*l));
    int r;

    l->u = u;
    l->c.data = l;
    l->c.on_frame = fo_on_frame;
    l->c.on_connect = fo_on_connect;
    l->c.on_error = fo_on_error;
    r = bn_connect(&F.net, &l->c, (const struct sockaddr *)&bench.targets[u->target],
                   &bench.target_xp[u->target]);
    if (r < 0) { /* bnet closed the handle without a callback: l stays */
        F.conn_err++;
        u->retry_at = bst_now_ns() + fo_backoff(u);
        return;
    }
    u->link = l;
    u->st = FS_CONNECTING;
    F.inflight++;
}

/* Start due connects and resend due logins of users [from, to). */
static void fo_pump(int from, int to, uint64_t now)
{
    for (int i = from; i < to && F.inflight < bench.concurrency; i++) {
        struct fo_user *u = &F.users[i];

        if (u->st == FS_WAIT && u->retry_at <= now)
            fo_connect(u);
    }
    for (int i = from; i < to; i++) {
        struct fo_user *u = &F.users[i];

        if (u->st == FS_LOGIN && u->resend && u->retry_at <= now)
            fo_send_login(u);
    }
}

static void fo_send_chat(uint64_t now)
{
    double dt = (double)(now - F.t_credit) / 1e9;

    F.t_credit = now;
    if (F.np == 0 || F.phase < PH_CALM || F.phase > PH_STORM)
        return;
    F.credit += bench.rate * dt;
    for (int tries = 0; F.credit >= 1 && tries < F.np; tries++) {
        int p = F.next_sender++ % (F.np / 2);
        struct fo_user *s = &F.users[F.n + 2 * p], *r = s + 1;
        const struct bench_user *su = &bench.users[s->slot];
        struct bn_buf *b;

        if (s->st != FS_UP || r->st != FS_UP)
            continue;
        b = bn_out(&s->link->c);
        bn_buf_add(b, "{\"msgid\":6,\"id\":", 16);
        bn_buf_addi(b, su->id);
        bn_buf_add(b, ",\"name\":", 8);
        bn_buf_addjs(b, su->name, strlen(su->name));
        bn_buf_add(b, ",\"toid\":", 8);
        bn_buf_addi(b, bench.users[r->slot].id);
        bn_buf_add(b, ",\"msg\":\"", 8);
        bn_buf_addu(b, bst_now_ns());
        bn_buf_add(b, "\",\"time\":\"2026-01-01 00:00:00\"}", 32); /* with the NUL */
        F.credit -= 1;
        F.sent++;
    }
    if (F.credit > bench.rate) /* nobody could send: do not build a burst */
        F.credit = bench.rate;
}

static double fo_ms(const struct bst_hist *h, double pct)
{
    return h->count ? (double)bst_hist_pct(h, pct) / 1e6 : 0;
}

static void fo_progress(uint64_t now)
{
    if (bench.quiet || now - F.last_prog < NS)
        return;
    F.last_prog = now;
    if (F.chat_child) {
        fprintf(stderr, "failover: t=%.0fs chat sent=%" PRIu64 " recv=%" PRIu64
                " p99=%.1fms max=%.1fms\n", (double)(now - F.t0) / 1e9, F.sent,
                F.recv, fo_ms(&F.sec, 99), (double)F.sec.max / 1e6);
        memset(&F.sec, 0, sizeof(F.sec));
        return;
    }
    fprintf(stderr, "failover: t=%.0fs phase=%s up=%d/%d pairs=%d/%d inflight=%d "
            "busy=%" PRIu64 " in_use=%" PRIu64 " conn_err=%" PRIu64 "\n",
            (double)(now - F.t0) / 1e9,
            (const char *[]){"pairs", "fill", "calm", "storm", "end"}[F.phase],
            F.up, F.n, F.child_ready ? 2 * bench.pairs : 0, 2 * bench.pairs,
            F.inflight, F.busy, F.in_use, F.conn_err);
}

static void fo_write_all(int fd, const void *p, size_t n)
{
    const char *c = p;

    while (n > 0) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            bx_die("failover: pipe write: %s", strerror(errno));
        c += w;
        n -= (size_t)w;
    }
}

static void fo_read_all(int fd, void *p, size_t n)
{
    char *c = p;

    while (n > 0) {
        ssize_t r = read(fd, c, n);
        if (r < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (r <= 0)
            bx_die("failover: the chat process is gone");
        c += r;
        n -= (size_t)r;
    }
}

/* The parent tells the chat child about a phase ('C' calm, 'S' storm, 'E'
 * end); the child answers 'R' (pairs logged in) and, after 'E', its
 * results. */
static void fo_tell(char cmd)
{
    if (F.child)
        fo_write_all(F.to_fd, &cmd, 1);
}

static void fo_enter(enum fo_phase ph, uint64_t now)
{
    F.phase = ph;
    F.t_phase = now;
    if (ph == PH_CALM)
        fo_tell('C');
    else if (ph == PH_STORM)
        fo_tell('S');
}

/* One tick of the chat child: follow the parent's commands. */
static void fo_chat_tick(uint64_t now)
{
    char cmd;
    struct fo_chat_res r;

    if (F.phase == PH_PAIRS && F.pairs_up == F.np) {
        fo_write_all(F.to_fd, "R", 1);
        F.phase = PH_FILL;
    }
    while (read(F.from_fd, &cmd, 1) == 1) {
        if (cmd == 'C') {
            F.phase = PH_CALM;
            F.t_credit = now;
        } else if (cmd == 'S') {
            F.phase = PH_STORM;
        } else if (cmd == 'E') {
            memset(&r, 0, sizeof(r));
            r.sent = F.sent;
            r.recv = F.recv;
            r.calm = F.calm;
            r.storm = F.storm;
            fprintf(stderr, "failover: chat sent=%" PRIu64 " recv=%" PRIu64
                    " calm_n=%" PRIu64 " storm_n=%" PRIu64 "\n", F.sent, F.recv,
                    F.calm.count, F.storm.count);
            fo_write_all(F.to_fd, &r, sizeof(r));
            F.phase = PH_END;
            uv_stop(&F.loop);
        }
    }
}

/* The parent, at the end: the child's results into F. */
static void fo_chat_collect(void)
{
    struct fo_chat_res *r;
    int fl;

    if (!F.child)
        return;
    r = bx_calloc(1, sizeof(*r));
    fo_tell('E');
    fl = fcntl(F.from_fd, F_GETFL);
    fcntl(F.from_fd, F_SETFL, fl & ~O_NONBLOCK);
    fo_read_all(F.from_fd, r, sizeof(*r));
    F.sent = r->sent;
    F.recv = r->recv;
    F.calm = r->calm;
    F.storm = r->storm;
    free(r);
    waitpid(F.child, NULL, 0);
}

static int fo_child_ready(void)
{
    char c;

    if (!F.child_ready && read(F.from_fd, &c, 1) == 1 && c == 'R')
        F.child_ready = 1;
    return F.child_ready;
}

static void fo_kill(uint64_t now)
{
    if (kill(bench.victim_pid, SIGKILL) < 0)
        bx_die("kill %d: %s", (int)bench.victim_pid, strerror(errno));
    F.t_kill = now;
    for (int i = 0; i < F.n; i++) { /* all of them were on the victim */
        F.users[i].target = 1;
        F.users[i].storm = F.users[i].st == FS_UP;
        F.storm_users += F.users[i].storm;
    }
    fprintf(stderr, "failover: killed pid %d with %d users logged in on it\n",
            (int)bench.victim_pid, F.up);
    fo_enter(PH_STORM, now);
}

static void fo_tick(uv_timer_t *t)
{
    uint64_t now = bst_now_ns();

    (void)t;
    fo_pump(F.n, F.n + F.np, now);
    if (F.phase >= PH_FILL)
        fo_pump(0, F.n, now);
    fo_send_chat(now);
    fo_progress(now);
    if (F.chat_child) {
        fo_chat_tick(now);
        return;
    }
    switch (F.phase) {
    case PH_PAIRS:
        if (F.child ? fo_child_ready() : F.pairs_up == F.np)
            fo_enter(PH_FILL, now);
        break;
    case PH_FILL:
        if (F.up + F.gave_up < F.n)
            break;
        F.t_fill = now - F.t_phase;
        fprintf(stderr, "failover: %d users logged in on the victim in %.1f s "
                "(%.0f/s)\n", F.up, (double)F.t_fill / 1e9,
                F.up / ((double)F.t_fill / 1e9));
        if (bench.hook) {
            int rc = system(bench.hook);
            if (rc != 0)
                bx_die("--hook '%s' failed (%d)", bench.hook, rc);
        }
        now = bst_now_ns();
        F.t_credit = now;
        fo_enter(PH_CALM, now);
        break;
    case PH_CALM:
        if (now - F.t_phase >= (uint64_t)(bench.calm_s * 1e9))
            fo_kill(now);
        break;
    case PH_STORM:
        if (F.relogins + F.gave_up >= (uint64_t)F.storm_users ||
            now - F.t_kill >= (uint64_t)(bench.storm_max_s * 1e9)) {
            fo_enter(PH_END, now);
            uv_stop(&F.loop);
        }
        break;
    case PH_END:
        break;
    }
}

static void fo_report(void)
{
    double all = F.t_last ? (double)(F.t_last - F.t_kill) / 1e9 : 0;
    double span = F.t_last > F.t_first ? (double)(F.t_last - F.t_first) / 1e9 : 0;
    int secs = (int)((bst_now_ns() - F.t_kill) / NS) + 1;

    printf("re-login curve (second after the kill: logins in it, total back):\n");
    for (int s = 0, tot = 0; s < secs && s < FO_MAX_SEC; s++) {
        tot += (int)F.per_sec[s];
        printf("  +%3ds %6u %6d\n", s, F.per_sec[s], tot);
    }
    printf("RESULT scenario=failover users=%d back=%" PRIu64 " all_back=%s "
           "time_to_all_s=%.1f first_back_s=%.2f sustained_per_s=%.0f "
           "fill_s=%.1f busy=%" PRIu64 " in_use=%" PRIu64 " conn_err=%" PRIu64
           " invalid=%" PRIu64 " pairs=%d rate=%.0f calm_p50_ms=%.2f "
           "calm_p99_ms=%.2f calm_n=%" PRIu64 " storm_p50_ms=%.2f storm_p99_ms=%.2f "
           "storm_max_ms=%.1f storm_n=%" PRIu64 "\n",
           F.n, F.relogins, F.relogins == (uint64_t)F.storm_users ? "yes" : "no", all,
           F.t_first ? (double)(F.t_first - F.t_kill) / 1e9 : 0,
           span > 0 ? (double)F.relogins / span : 0, (double)F.t_fill / 1e9,
           F.busy, F.in_use, F.conn_err, F.invalid, bench.pairs, bench.rate,
           fo_ms(&F.calm, 50), fo_ms(&F.calm, 99), F.calm.count, fo_ms(&F.storm, 50),
           fo_ms(&F.storm, 99), (double)F.storm.max / 1e6, F.storm.count);
    fflush(stdout);
}

static void fo_walk_close(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, h->type == UV_TCP ? fo_link_closed : NULL);
}

/* Split: the child keeps the pairs (F.n = 0), the parent the storm users
 * (F.np = 0); two pipes between them, non-blocking on the reading ends. */
static void fo_fork(void)
{
    int down[2], up[2];
    pid_t pid;

    if (pipe(down) < 0 || pipe(up) < 0)
        bx_die("pipe: %s", strerror(errno));
    fflush(NULL);
    pid = fork();
    if (pid < 0)
        bx_die("fork: %s", strerror(errno));
    if (pid == 0) {
        close(down[1]);
        close(up[0]);
        F.chat_child = 1;
        F.from_fd = down[0];
        F.to_fd = up[1];
        F.n = 0;
    } else {
        close(down[0]);
        close(up[1]);
        F.child = pid;
        F.to_fd = down[1];
        F.from_fd = up[0];
        F.np = 0;
    }
    fcntl(F.from_fd, F_SETFL, fcntl(F.from_fd, F_GETFL) | O_NONBLOCK);
}

void bf_run(void)
{
    int ns = bench.ntargets - 2;

    if (bench.ntargets < 2 || (bench.pairs > 0 && ns < 1))
        bx_die("failover: -t VICTIM -t LB [-t SURVIVOR...] (survivors for -P pairs)");
    if (!bench.victim_pid)
        bx_die("failover: --victim-pid is required");
    memset(&F, 0, sizeof(F));
    F.rng = bst_now_ns() | 1;
    F.n = bench.conns;
    F.np = 2 * bench.pairs;
    if (F.np)
        fo_fork();
    F.users = bx_calloc((size_t)(F.n + F.np), sizeof(*F.users));
    for (int i = 0; i < F.n + F.np; i++) {
        F.users[i].slot = F.chat_child ? bench.conns + i : i;
        F.users[i].st = FS_WAIT;
    }
    for (int p = 0; p < F.np / 2; p++) { /* sender and receiver on two survivors */
        F.users[F.n + 2 * p].target = 2 + p % ns;
        F.users[F.n + 2 * p + 1].target = 2 + (p + 1) % ns;
    }
    uv_loop_init(&F.loop);
    bn_net_init(&F.net, &F.loop);
    F.net.src_ips = bench.src_ips;
    uv_timer_init(&F.loop, &F.tick);
    F.t0 = F.t_credit = bst_now_ns();
    fo_enter(F.np || F.child ? PH_PAIRS : PH_FILL, F.t0);
    uv_timer_start(&F.tick, fo_tick, FO_TICK_MS, FO_TICK_MS);
    uv_run(&F.loop, UV_RUN_DEFAULT);
    if (F.chat_child)
        _exit(0);
    fo_chat_collect();
    fo_report();
    uv_walk(&F.loop, fo_walk_close, NULL);
    uv_run(&F.loop, UV_RUN_DEFAULT);
    free(F.users);
}
