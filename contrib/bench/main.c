/*
 * main.c - chat-bench's command line and its parent process.
 *
 * The parent does the setup (users, group: setup.c), forks --procs worker
 * processes (worker.c) and then only coordinates: it waits until every
 * worker has logged its users in, picks a start time t0 a little in the
 * future and sends it to all of them (CLOCK_MONOTONIC is shared by the
 * processes of one machine, so the workers' windows line up), prints a
 * progress line per second from the workers' cumulative counters, reads the
 * server's CPU time (/proc/PID/stat) at both ends of the measured window and
 * its RSS (/proc/PID/status), then merges the workers' results: counters
 * are added, latency histograms merged, and losses computed as what all
 * senders owe minus what all receivers got.  Parent and workers talk over
 * two pipes per worker with fixed binary records (same binary, same
 * layout).
 *
 * The one line on stdout is the result, "RESULT key=value ...", meant for
 * scripts (run-bench.sh); everything else goes to stderr.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

struct bench_conf bench;

struct wproc {
    pid_t pid;
    int cmd_fd, rec_fd;
    int ready, phase_done, done;
    struct bw_tick tick;
    struct bw_result res;
};

static struct wproc *procs;

int bm_users_needed(void)
{
    switch (bench.scenario) {
    case SC_PAIRS:
        return 2 * bench.pairs;
    case SC_GROUP:
        return bench.group_size;
    case SC_CONNS:
        return bench.conns;
    case SC_LOGIN:
        return bench.login_conns;
    case SC_FAILOVER:
        return bench.conns + 2 * bench.pairs;
    }
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f,
"usage: chat-bench SCENARIO [options]\n"
"scenarios:\n"
"  pairs   P sender->receiver pairs, W ONE_CHAT_MSG in flight per sender\n"
"  group   one group of G members, S of them sending GROUP_CHAT_MSG\n"
"  conns   K logged-in idle connections (logins/s, server RSS per connection)\n"
"  login   L connections doing LOGINOUT+LOGIN (with --resume: reconnect and\n"
"          log in with a protocol-2 resume token)\n"
"  failover  K users log in on the first target (--victim-pid), which is\n"
"          killed; they come back through the second (nginx); P pairs chat\n"
"          on the others at --rate (200) msg/s (see failover.c; options\n"
"          --victim-pid PID, --hook CMD, --calm SEC (10), --storm-max SEC (120))\n"
"options:\n"
"  -t, --target URL       server (repeat for several; users round-robin):\n"
"                          HOST:PORT, tcp://HOST:PORT, tls://HOST:PORT,\n"
"                          ws://HOST:PORT/PATH or wss://HOST:PORT/PATH\n"
"                          (numeric addresses or localhost)\n"
"      --ca FILE           tls/wss: check the server's certificate against\n"
"                          the CAs in FILE (default: not checked)\n"
"  -P, --pairs N           pairs (50)          -W, --window N  in flight (8)\n"
"  -G, --group-size N      members (50)        -S, --senders N  senders (5)\n"
"  -K, --conns N           connections (1000)  -L, --logins N  storm conns (50)\n"
"      --resume            login storm with resume tokens\n"
"      --handshakes        login storm without logins: each cycle is a new\n"
"                          connection and its tls/ws handshakes (rate =\n"
"                          handshakes/s; latency from connect to ready)\n"
"      --durable           pairs, group: protocol-2 durable messages (a cid\n"
"                          each); a sender's credit comes back with the ACK,\n"
"                          a message answered 113 is sent again with its\n"
"                          cid; pairs count and time ACKs (send-to-ACK),\n"
"                          group counts and times deliveries\n"
"      --size N            payload bytes per message (32)\n"
"      --rate N            pairs/group: offer N messages/s in total (paced;\n"
"                          default: closed loop, as fast as W allows)\n"
"      --warmup SEC (5)    --duration SEC (10)  --drain SEC (5)\n"
"      --procs N           worker processes (1)\n"
"      --concurrency N     connects+logins in progress per worker (256)\n"
"      --reg-conns N       parallel connections for registration (16)\n"
"      --src-ips N         loopback targets: spread connections over source\n"
"                          addresses 127.0.0.1..N (16; 1 = off)\n"
"      --server-pid PID    read the server's CPU and RSS from /proc\n"
"      --ids FILE          keep/reuse registered users (and the group)\n"
"      --prefix STR        user name prefix (default: unique per run)\n"
"      --password STR      password of new users (benchpw1)\n"
"  -q, --quiet             no progress lines\n");
}

/* Strip the scheme and the path of a target URL into t; the HOST:PORT part
 * is copied to hp. */
static void parse_scheme(const char *url, struct bn_target *t, char *hp, size_t hpsz)
{
    static const struct { const char *p; enum bt_scheme s; } sc[] = {
        {"tcp://", BT_TCP}, {"tls://", BT_TLS}, {"ws://", BT_WS}, {"wss://", BT_WSS},
    };
    const char *s = url;
    memset(t, 0, sizeof *t);
    for (size_t i = 0; i < sizeof sc / sizeof sc[0]; i++)
        if (!strncmp(url, sc[i].p, strlen(sc[i].p))) {
            t->scheme = sc[i].s;
            s = url + strlen(sc[i].p);
        }
    if (s == url && strstr(url, "://"))
        bx_die("bad target '%s' (tcp, tls, ws or wss)", url);
    size_t n = strcspn(s, "/");
    if (s[n] && t->scheme != BT_WS && t->scheme != BT_WSS)
        bx_die("bad target '%s' (a path is only for ws:// and wss://)", url);
    if (n >= hpsz || n >= sizeof t->hostport)
        bx_die("bad target '%s' (too long)", url);
    memcpy(hp, s, n);
    hp[n] = '\0';
    memcpy(t->hostport, s, n + 1);
    snprintf(t->path, sizeof t->path, "%s", s[n] ? s + n : "/");
}

static void parse_target(const char *url)
{
    if (bench.ntargets == BENCH_MAX_TARGETS)
        bx_die("at most %d targets", BENCH_MAX_TARGETS);
    struct bn_target *t = &bench.target_xp[bench.ntargets];
    char hp[80];
    parse_scheme(url, t, hp, sizeof hp);
    const char *s = hp;
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s || (size_t)(colon - s) >= sizeof host)
        bx_die("bad target '%s' (HOST:PORT)", url);
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
    int port = atoi(colon + 1);
    if (port <= 0 || port > 65535)
        bx_die("bad port in '%s'", s);
    struct sockaddr_storage *ss = &bench.targets[bench.ntargets];
    int r;
    if (host[0] == '[') {
        size_t n = strlen(host);
        if (n < 3 || host[n - 1] != ']')
            bx_die("bad target '%s'", s);
        host[n - 1] = '\0';
        r = uv_ip6_addr(host + 1, port, (struct sockaddr_in6 *)ss);
    } else {
        r = uv_ip4_addr(strcmp(host, "localhost") ? host : "127.0.0.1", port,
                        (struct sockaddr_in *)ss);
    }
    if (r < 0)
        bx_die("bad address in '%s' (numeric IP expected)", s);
    snprintf(t->host, sizeof t->host, "%s", host[0] == '[' ? host + 1 : host);
    snprintf(bench.target_str[bench.ntargets], sizeof bench.target_str[0], "%s", url);
    bench.ntargets++;
}

static long num_arg(const char *opt, const char *v, long lo, long hi)
{
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno || *end || n < lo || n > hi)
        bx_die("%s: expected an integer in %ld..%ld, got '%s'", opt, lo, hi, v);
    return n;
}

static double sec_arg(const char *opt, const char *v)
{
    char *end;
    double d = strtod(v, &end);
    if (*end || !(d >= 0 && d <= 86400))
        bx_die("%s: expected seconds, got '%s'", opt, v);
    return d;
}

static void parse_args(int argc, char **argv)
{
    enum { O_RESUME = 256, O_SIZE, O_WARMUP, O_DURATION, O_DRAIN, O_PROCS,
           O_CONC, O_REGC, O_SPID, O_IDS, O_PREFIX, O_PASS, O_SRC, O_RATE, O_CA, O_HANDSHAKES,
           O_DURABLE, O_VICTIM, O_HOOK, O_CALM, O_STORM_MAX };
    static const struct option opts[] = {
        {"target", required_argument, NULL, 't'},
        {"pairs", required_argument, NULL, 'P'},
        {"window", required_argument, NULL, 'W'},
        {"group-size", required_argument, NULL, 'G'},
        {"senders", required_argument, NULL, 'S'},
        {"conns", required_argument, NULL, 'K'},
        {"logins", required_argument, NULL, 'L'},
        {"resume", no_argument, NULL, O_RESUME},
        {"handshakes", no_argument, NULL, O_HANDSHAKES},
        {"durable", no_argument, NULL, O_DURABLE},
        {"size", required_argument, NULL, O_SIZE},
        {"rate", required_argument, NULL, O_RATE},
        {"warmup", required_argument, NULL, O_WARMUP},
        {"duration", required_argument, NULL, O_DURATION},
        {"drain", required_argument, NULL, O_DRAIN},
        {"procs", required_argument, NULL, O_PROCS},
        {"concurrency", required_argument, NULL, O_CONC},
        {"reg-conns", required_argument, NULL, O_REGC},
        {"server-pid", required_argument, NULL, O_SPID},
        {"ids", required_argument, NULL, O_IDS},
        {"prefix", required_argument, NULL, O_PREFIX},
        {"password", required_argument, NULL, O_PASS},
        {"src-ips", required_argument, NULL, O_SRC},
        {"ca", required_argument, NULL, O_CA},
        {"victim-pid", required_argument, NULL, O_VICTIM},
        {"hook", required_argument, NULL, O_HOOK},
        {"calm", required_argument, NULL, O_CALM},
        {"storm-max", required_argument, NULL, O_STORM_MAX},
        {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static char prefix[40];
    bench.pairs = 50;
    bench.window = 8;
    bench.group_size = 50;
    bench.senders = 5;
    bench.conns = 1000;
    bench.login_conns = 50;
    bench.payload = 32;
    bench.warmup_s = 5;
    bench.duration_s = 10;
    bench.drain_s = 5;
    bench.procs = 1;
    bench.concurrency = 256;
    bench.reg_conns = 16;
    bench.src_ips = 16;
    bench.password = "benchpw1";
    bench.calm_s = 10;
    bench.storm_max_s = 120;
    snprintf(prefix, sizeof prefix, "cb%lx%x_", (unsigned long)time(NULL),
             (unsigned)getpid());
    bench.prefix = prefix;

    int c;
    while ((c = getopt_long(argc, argv, "t:P:W:G:S:K:L:qh", opts, NULL)) != -1) {
        switch (c) {
        case 't': parse_target(optarg); break;
        case 'P': bench.pairs = (int)num_arg("-P", optarg, 1, 1000000); break;
        case 'W': bench.window = (int)num_arg("-W", optarg, 1, 100000); break;
        case 'G': bench.group_size = (int)num_arg("-G", optarg, 2, 100000); break;
        case 'S': bench.senders = (int)num_arg("-S", optarg, 1, 100000); break;
        case 'K': bench.conns = (int)num_arg("-K", optarg, 1, 10000000); break;
        case 'L': bench.login_conns = (int)num_arg("-L", optarg, 1, 1000000); break;
        case O_RESUME: bench.resume = 1; break;
        case O_HANDSHAKES: bench.handshakes = 1; break;
        case O_DURABLE: bench.durable = 1; break;
        case O_SIZE: bench.payload = (int)num_arg("--size", optarg, 0, 60000); break;
        case O_RATE: bench.rate = (double)num_arg("--rate", optarg, 1, 100000000); break;
        case O_WARMUP: bench.warmup_s = sec_arg("--warmup", optarg); break;
        case O_DURATION: bench.duration_s = sec_arg("--duration", optarg); break;
        case O_DRAIN: bench.drain_s = sec_arg("--drain", optarg); break;
        case O_PROCS: bench.procs = (int)num_arg("--procs", optarg, 1, 256); break;
        case O_CONC: bench.concurrency = (int)num_arg("--concurrency", optarg, 1, 100000); break;
        case O_REGC: bench.reg_conns = (int)num_arg("--reg-conns", optarg, 1, 1000); break;
        case O_SPID: bench.server_pid = (pid_t)num_arg("--server-pid", optarg, 1, 1 << 30); break;
        case O_IDS: bench.ids_file = optarg; break;
        case O_PREFIX: bench.prefix = optarg; break;
        case O_PASS: bench.password = optarg; break;
        case O_SRC: bench.src_ips = (int)num_arg("--src-ips", optarg, 1, 254); break;
        case O_CA: bench.ca_file = optarg; break;
        case O_VICTIM: bench.victim_pid = (pid_t)num_arg("--victim-pid", optarg, 1, 1 << 30); break;
        case O_HOOK: bench.hook = optarg; break;
        case O_CALM: bench.calm_s = sec_arg("--calm", optarg); break;
        case O_STORM_MAX: bench.storm_max_s = sec_arg("--storm-max", optarg); break;
        case 'q': bench.quiet = 1; break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(2);
        }
    }
    if (optind != argc - 1) {
        usage(stderr);
        exit(2);
    }
    const char *sc = argv[optind];
    if (!strcmp(sc, "pairs"))
        bench.scenario = SC_PAIRS;
    else if (!strcmp(sc, "group"))
        bench.scenario = SC_GROUP;
    else if (!strcmp(sc, "conns"))
        bench.scenario = SC_CONNS;
    else if (!strcmp(sc, "login"))
        bench.scenario = SC_LOGIN;
    else if (!strcmp(sc, "failover"))
        bench.scenario = SC_FAILOVER;
    else
        bx_die("unknown scenario '%s'", sc);
    bench.scenario_name = sc;
    if (bench.durable && bench.scenario != SC_PAIRS && bench.scenario != SC_GROUP)
        bx_die("--durable: only the pairs and group scenarios");
    if (bench.ntargets == 0)
        parse_target("127.0.0.1:6000");
    if (strlen(bench.prefix) > 40 || strlen(bench.password) >= BENCH_PASS_MAX ||
        strpbrk(bench.prefix, " \t\n\"\\") || strpbrk(bench.password, " \t\n"))
        bx_die("--prefix/--password: too long or containing blanks/quotes");
    if (bench.scenario == SC_GROUP) {
        if (bench.senders > bench.group_size)
            bx_die("-S must not exceed -G");
        if (bench.group_size < 2 * bench.procs)
            bx_die("group: -G must be at least 2 x --procs (each worker needs "
                   "a receiving member for flow control)");
    }
    int units = bm_users_needed() / (bench.scenario == SC_PAIRS ? 2 : 1);
    if (bench.procs > units)
        bench.procs = units;
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        long need = (long)bm_users_needed() / bench.procs + 64;
        if ((long)rl.rlim_cur < need)
            bx_die("open files limit %ld < %ld needed per worker: use --procs",
                   (long)rl.rlim_cur, need);
    }
}

/* ---- workers -------------------------------------------------------------- */

static void kill_workers(void)
{
    for (int i = 0; i < bench.procs; i++)
        if (procs[i].pid > 0 && !procs[i].done)
            kill(procs[i].pid, SIGTERM);
}

static void start_workers(void)
{
    procs = bx_calloc((size_t)bench.procs, sizeof *procs);
    fflush(NULL);
    for (int i = 0; i < bench.procs; i++) {
        int cmd[2], rec[2];
        if (pipe(cmd) < 0 || pipe(rec) < 0)
            bx_die("pipe: %s", strerror(errno));
        pid_t pid = fork();
        if (pid < 0)
            bx_die("fork: %s", strerror(errno));
        if (pid == 0) {
            for (int j = 0; j < i; j++) {
                close(procs[j].cmd_fd);
                close(procs[j].rec_fd);
            }
            close(cmd[1]);
            close(rec[0]);
            bw_main(i, bench.procs, cmd[0], rec[1]);
        }
        close(cmd[0]);
        close(rec[1]);
        procs[i].pid = pid;
        procs[i].cmd_fd = cmd[1];
        procs[i].rec_fd = rec[0];
    }
}

static void send_cmd(uint32_t type, uint64_t t0)
{
    struct bw_cmd c;
    memset(&c, 0, sizeof c);
    c.type = type;
    c.t0_ns = t0;
    for (int i = 0; i < bench.procs; i++)
        if (write(procs[i].cmd_fd, &c, sizeof c) != (ssize_t)sizeof c)
            bx_die("worker %d: command pipe: %s", i, strerror(errno));
}

static int read_full(int fd, void *p, size_t n)
{
    size_t off = 0;
    while (off < n) {
        ssize_t r = read(fd, (char *)p + off, n - off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        off += (size_t)r;
    }
    return 0;
}

/* Read one record from worker i and apply it. */
static void read_record(int i)
{
    struct wproc *w = &procs[i];
    struct bw_rec_hdr h;
    if (read_full(w->rec_fd, &h, sizeof h) < 0) {
        kill_workers();
        bx_die("worker %d exited without a result", i);
    }
    static char buf[sizeof(struct bw_result) + 1024];
    if (h.len > sizeof buf || read_full(w->rec_fd, buf, h.len) < 0) {
        kill_workers();
        bx_die("worker %d: bad record", i);
    }
    switch (h.type) {
    case REC_READY:
        w->ready = 1;
        break;
    case REC_TICK:
        memcpy(&w->tick, buf, sizeof w->tick);
        break;
    case REC_PHASE:
        w->phase_done = 1;
        break;
    case REC_RESULT:
        memcpy(&w->res, buf, sizeof w->res);
        w->done = 1;
        break;
    case REC_FAIL:
        buf[h.len ? h.len - 1 : 0] = '\0';
        kill_workers();
        bx_die("worker %d: %s", i, buf);
    default:
        kill_workers();
        bx_die("worker %d: unknown record %u", i, h.type);
    }
}

/* Wait up to ms for records; returns after handling what arrived. */
static void pump(int ms)
{
    struct pollfd pf[256];
    int n = 0;
    for (int i = 0; i < bench.procs; i++)
        if (!procs[i].done) {
            pf[n].fd = procs[i].rec_fd;
            pf[n].events = POLLIN;
            n++;
        }
    if (n == 0)
        return;
    int r = poll(pf, (nfds_t)n, ms < 0 ? 0 : ms);
    if (r <= 0)
        return;
    for (int k = 0, i = 0; i < bench.procs; i++) {
        if (procs[i].done)
            continue;
        if (pf[k].revents)
            read_record(i);
        k++;
    }
}

static int count_flag(size_t off)
{
    int n = 0;
    for (int i = 0; i < bench.procs; i++)
        n += *(int *)((char *)&procs[i] + off);
    return n;
}

static struct bw_tick sum_ticks(void)
{
    struct bw_tick t;
    memset(&t, 0, sizeof t);
    for (int i = 0; i < bench.procs; i++) {
        t.sent += procs[i].tick.sent;
        t.recv += procs[i].tick.recv;
        t.logins += procs[i].tick.logins;
        t.errors += procs[i].tick.errors;
        t.connected += procs[i].tick.connected;
    }
    return t;
}

static void progress(double t, const char *phase, struct bw_tick *last, double dt)
{
    struct bw_tick now = sum_ticks();
    if (!bench.quiet && dt > 0) {
        if (bench.scenario == SC_CONNS)
            fprintf(stderr, "[conns %5.1fs] %s: %" PRIu64 "/%d logged in, "
                    "%.0f logins/s, errors %" PRIu64 "\n", t, phase,
                    now.connected, bench.conns,
                    (double)(now.logins - last->logins) / dt, now.errors);
        else if (bench.scenario == SC_LOGIN)
            fprintf(stderr, "[login %5.1fs] %s: %.0f logins/s, errors %" PRIu64 "\n",
                    t, phase, (double)(now.logins - last->logins) / dt, now.errors);
        else
            fprintf(stderr, "[%s %5.1fs] %s: %.0f delivered/s, %.0f sent/s, "
                    "errors %" PRIu64 "\n", bench.scenario_name, t, phase,
                    (double)(now.recv - last->recv) / dt,
                    (double)(now.sent - last->sent) / dt, now.errors);
    }
    *last = now;
}

/* ---- the run ------------------------------------------------------------ */

struct run_out {
    int64_t srv_cpu0, srv_cpu1, rss0, rss1, rss2;
    uint64_t t_win0, t_win1;
};

static void wait_all(size_t flag_off, const char *what, double timeout_s)
{
    uint64_t t0 = bst_now_ns(), last = t0;
    struct bw_tick lt = sum_ticks();
    while (count_flag(flag_off) < bench.procs) {
        pump(200);
        uint64_t now = bst_now_ns();
        if ((double)(now - t0) / 1e9 > timeout_s) {
            kill_workers();
            bx_die("timed out after %.0f s waiting for %s", timeout_s, what);
        }
        if (now - last >= 1000000000ull) {
            progress((double)(now - t0) / 1e9, what, &lt, (double)(now - last) / 1e9);
            last = now;
        }
    }
}

static void run_timed(struct run_out *o)
{
    uint64_t t0 = bst_now_ns() + 200000000ull;
    uint64_t tms = t0 + (uint64_t)(bench.warmup_s * 1e9);
    uint64_t tme = tms + (uint64_t)(bench.duration_s * 1e9);
    int have0 = 0, have1 = 0;
    send_cmd(CMD_GO, t0);
    struct bw_tick lt = sum_ticks();
    uint64_t last = t0;
    while (count_flag(offsetof(struct wproc, done)) < bench.procs) {
        uint64_t now = bst_now_ns();
        uint64_t next = last + 1000000000ull;
        if (!have0 && tms < next)
            next = tms;
        else if (!have1 && tme < next)
            next = tme;
        pump(next > now ? (int)((next - now) / 1000000) : 0);
        now = bst_now_ns();
        if (!have0 && now >= tms) {
            have0 = 1;
            o->t_win0 = now;
            if (bench.server_pid)
                o->srv_cpu0 = bst_proc_cpu_ns(bench.server_pid);
        }
        if (!have1 && now >= tme) {
            have1 = 1;
            o->t_win1 = now;
            if (bench.server_pid) {
                o->srv_cpu1 = bst_proc_cpu_ns(bench.server_pid);
                o->rss1 = bst_proc_rss_kb(bench.server_pid);
            }
        }
        if (now >= last + 1000000000ull && now > t0) {
            const char *ph = now < tms ? "warmup" : now < tme ? "measure" : "drain";
            progress((double)(now - t0) / 1e9, ph, &lt, (double)(now - last) / 1e9);
            last = now;
        }
    }
}

static void run_conns(struct run_out *o)
{
    uint64_t t0 = bst_now_ns() + 100000000ull;
    if (bench.server_pid) {
        o->rss0 = bst_proc_rss_kb(bench.server_pid);
        o->srv_cpu0 = bst_proc_cpu_ns(bench.server_pid);
    }
    send_cmd(CMD_GO, t0);
    o->t_win0 = t0;
    wait_all(offsetof(struct wproc, phase_done), "logging in", 3600);
    o->t_win1 = bst_now_ns();
    if (bench.server_pid) {
        o->srv_cpu1 = bst_proc_cpu_ns(bench.server_pid);
        o->rss1 = bst_proc_rss_kb(bench.server_pid);
    }
    /* hold the idle connections, then read the RSS again */
    uint64_t end = bst_now_ns() + (uint64_t)(bench.duration_s * 1e9);
    struct bw_tick lt = sum_ticks();
    uint64_t last = bst_now_ns();
    while (bst_now_ns() < end) {
        pump(200);
        uint64_t now = bst_now_ns();
        if (now - last >= 1000000000ull) {
            progress((double)(now - t0) / 1e9, "idle", &lt, (double)(now - last) / 1e9);
            last = now;
        }
    }
    if (bench.server_pid)
        o->rss2 = bst_proc_rss_kb(bench.server_pid);
    send_cmd(CMD_STOP, 0);
    wait_all(offsetof(struct wproc, done), "results", 60);
}

static double us(uint64_t ns)
{
    return (double)ns / 1000.0;
}

static void report(const struct run_out *o)
{
    struct bw_result r;
    memset(&r, 0, sizeof r);
    uint64_t tfirst = UINT64_MAX, tlast = 0;
    for (int i = 0; i < bench.procs; i++) {
        const struct bw_result *w = &procs[i].res;
        r.sent += w->sent;
        r.expected += w->expected;
        r.distinct += w->distinct;
        r.recv_window += w->recv_window;
        r.recv_total += w->recv_total;
        r.dup += w->dup;
        r.ooo += w->ooo;
        r.corrupt += w->corrupt;
        r.errors += w->errors;
        r.logins_ok += w->logins_ok;
        r.logins_fail += w->logins_fail;
        r.busy += w->busy;
        r.cpu_user_ns += w->cpu_user_ns;
        r.cpu_sys_ns += w->cpu_sys_ns;
        if (w->t_first_ns && w->t_first_ns < tfirst)
            tfirst = w->t_first_ns;
        if (w->t_last_ns > tlast)
            tlast = w->t_last_ns;
        bst_hist_merge(&r.hist, &w->hist);
    }
    uint64_t count;
    double secs;
    if (bench.scenario == SC_CONNS) {
        count = r.logins_ok;
        secs = tlast > tfirst ? (double)(tlast - tfirst) / 1e9 : 0;
    } else {
        count = bench.scenario == SC_LOGIN ? r.logins_ok : r.recv_window;
        secs = (double)(o->t_win1 - o->t_win0) / 1e9;
    }
    double rate = secs > 0 ? (double)count / secs : 0;
    double gen_cpu = (double)(r.cpu_user_ns + r.cpu_sys_ns) / 1e9;
    double srv_cpu = bench.server_pid && o->srv_cpu0 >= 0 && o->srv_cpu1 >= 0
                         ? (double)(o->srv_cpu1 - o->srv_cpu0) / 1e9 : -1;
    uint64_t lost = r.expected > r.distinct ? r.expected - r.distinct : 0;

    char line[2048];
    int n = snprintf(line, sizeof line,
        "RESULT scenario=%s%s targets=%d procs=%d rate=%.0f count=%" PRIu64
        " secs=%.2f p50_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f",
        bench.scenario_name,
        bench.handshakes ? "-handshakes" : bench.resume ? "-resume" :
        bench.durable ? "-durable" : "", bench.ntargets,
        bench.procs, rate, count, secs, us(bst_hist_pct(&r.hist, 50)),
        us(bst_hist_pct(&r.hist, 99)), us(bst_hist_pct(&r.hist, 99.9)),
        us(r.hist.max));
    if (bench.rate > 0)
        n += snprintf(line + n, sizeof line - (size_t)n, " offered=%.0f", bench.rate);
    if (bench.scenario == SC_PAIRS || bench.scenario == SC_GROUP)
        n += snprintf(line + n, sizeof line - (size_t)n,
            " sent=%" PRIu64 " expected=%" PRIu64 " received=%" PRIu64
            " lost=%" PRIu64 " dup=%" PRIu64 " ooo=%" PRIu64 " corrupt=%" PRIu64,
            r.sent, r.expected, r.distinct, lost, r.dup, r.ooo, r.corrupt);
    else
        n += snprintf(line + n, sizeof line - (size_t)n,
            " ok=%" PRIu64 " failed=%" PRIu64 " busy=%" PRIu64, r.logins_ok,
            r.logins_fail, r.busy);
    n += snprintf(line + n, sizeof line - (size_t)n,
        " errors=%" PRIu64 " cpu_user_s=%.2f cpu_sys_s=%.2f gen_cpu_us_per_op=%.2f",
        r.errors, (double)r.cpu_user_ns / 1e9, (double)r.cpu_sys_ns / 1e9,
        count ? gen_cpu * 1e6 / (double)count : 0);
    if (srv_cpu >= 0)
        n += snprintf(line + n, sizeof line - (size_t)n,
            " srv_cpu_s=%.2f srv_cpu_us_per_op=%.2f", srv_cpu,
            count ? srv_cpu * 1e6 / (double)count : 0);
    if (bench.scenario == SC_CONNS && bench.server_pid && o->rss0 > 0 && o->rss1 > 0)
        n += snprintf(line + n, sizeof line - (size_t)n,
            " rss_before_kb=%" PRId64 " rss_after_kb=%" PRId64 " rss_idle_kb=%" PRId64
            " rss_per_conn_b=%.0f", o->rss0, o->rss1, o->rss2,
            count ? (double)(o->rss2 > 0 ? o->rss2 - o->rss0 : o->rss1 - o->rss0) *
                        1024.0 / (double)count : 0);
    else if (bench.server_pid && o->rss1 > 0)
        n += snprintf(line + n, sizeof line - (size_t)n, " srv_rss_kb=%" PRId64, o->rss1);
    printf("%s\n", line);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    setvbuf(stderr, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    parse_args(argc, argv);
    raise_nofile();
    bs_setup();
    if (bench.scenario == SC_FAILOVER) {
        if (bench.rate == 0)
            bench.rate = 200;
        bf_run();
        return 0;
    }
    start_workers();
    if (!bench.quiet)
        fprintf(stderr, "chat-bench: %s, %d worker process(es), %d target(s)\n",
                bench.scenario_name, bench.procs, bench.ntargets);
    wait_all(offsetof(struct wproc, ready), "logins", 600);

    struct run_out o;
    memset(&o, 0, sizeof o);
    if (bench.scenario == SC_CONNS)
        run_conns(&o);
    else
        run_timed(&o);
    for (int i = 0; i < bench.procs; i++) {
        int st;
        waitpid(procs[i].pid, &st, 0);
        close(procs[i].cmd_fd);
        close(procs[i].rec_fd);
    }
    report(&o);
    return 0;
}
