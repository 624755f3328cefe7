/*
 * main.c - command line, start-up order, signals and graceful shutdown.
 *
 * Start-up: config, then the database pool and the bus (plugins may use
 * them from init), then the plugins, and only then the listener, so no
 * client is accepted before every handler is in place.  Shutdown runs the
 * other way round: stop accepting, flush and close every session, run the
 * outstanding database callbacks, leave the bus, finalise the plugins, and
 * let the loop end when the last handle has closed.
 *
 * With workers = K (or -w K) the process forks K workers that share the
 * listen port through SO_REUSEPORT; each worker is a full node on the bus
 * (node id suffixed with its number) with its own admin port (the
 * configured one + its number).  The parent only supervises: it
 * forwards SIGHUP/SIGTERM/SIGINT/SIGUSR1 and restarts a worker that died.
 *
 * The layers below report upward only through callbacks; wire.c registers
 * every one of them first thing (wire_core), and applies a reloaded
 * config's live settings to them (wire_apply_conf, which the plugin
 * registry calls once a reload has swapped).
 *
 * Logs go where [server] log_file says (stderr by default), set before the
 * node starts (a reload applies a new one: plugin.c); SIGUSR1 reopens the
 * file (for logrotate) on the loop thread.  Under systemd the node reports
 * READY, RELOADING and STOPPING through sdnotify.c; with workers the
 * supervisor reports for the lot (the workers' own notifications would be
 * refused by NotifyAccess=main), so READY comes once they are forked.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core.h"

static uv_signal_t sig_hup, sig_int, sig_term, sig_usr1;
static int stopping;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: chatd [-c FILE] [-l HOST:PORT] [-w WORKERS] [-t] [--migrate] [-V]\n"
            "  -c FILE      configuration (default %s)\n"
            "  -l HOST:PORT listen here instead of [server] listen\n"
            "  -w N         run N worker processes sharing the port\n"
            "  -t           check the configuration and its plugins, then exit\n"
            "  --migrate    apply the missing sql/ migrations, then exit\n"
            "  -V           print the version and exit\n",
            CHAT_DEFAULT_CONF);
}

/* Shutdown after the sessions are gone, in phases polled by one timer:
 * the bus first (its last replies may still raise undeliverable events,
 * which the plugins store), then the plugins (retired, they finish their
 * own database work, e.g. offline messages still queued), then the pool. */
static uv_timer_t stop_timer;
static int stop_phase;
static uint64_t phase_since;

static void on_stop_tick(uv_timer_t *t)
{
    uint64_t waited = uv_now(t->loop) - phase_since;
    if (stop_phase == 0 && (bus_finished() || waited > 3000)) {
        plug_stop();
        stop_phase = 1;
        phase_since = uv_now(t->loop);
    } else if (stop_phase == 1 && (plug_live() == 0 || waited > 10000)) {
        if (plug_live())
            LOGW("%zu plugin instances still busy after 10 s; stopping anyway",
                 plug_live());
        db_stop();
        metrics_stop();
        rl_stop();
        defer_stop();
        uv_close((uv_handle_t *)&stop_timer, NULL);
        uv_close((uv_handle_t *)&sig_hup, NULL);
        uv_close((uv_handle_t *)&sig_int, NULL);
        uv_close((uv_handle_t *)&sig_term, NULL);
        uv_close((uv_handle_t *)&sig_usr1, NULL);
    }
}

static void after_sessions(void)
{
    LOGI("all sessions closed; stopping the bus, the plugins and the database pool");
    bus_stop();
    uv_timer_init(uv_default_loop(), &stop_timer);
    phase_since = uv_now(uv_default_loop());
    uv_timer_start(&stop_timer, on_stop_tick, 0, 10);
}

/* A SIGHUP reload has finished: log its result and tell systemd. */
static void on_reloaded(int ok, const char *msg, void *ud)
{
    (void)ud;
    sdn_reload_result(ok, msg, plug_active());
}

static void on_signal(uv_signal_t *h, int signum)
{
    (void)h;
    if (signum == SIGUSR1) {
        log_reopen();
        return;
    }
    if (signum == SIGHUP) {
        if (!stopping) {
            sdn_reloading();
            if (plug_reload_ex(on_reloaded, NULL) != CHAT_OK)
                sdn_reloaded("reload failed: out of memory; nothing changed");
        }
        return;
    }
    if (stopping) {
        LOGW("second %s: exiting at once", signum == SIGINT ? "SIGINT" : "SIGTERM");
        exit(1);
    }
    stopping = 1;
    sdn_stopping();
    admin_stop();
    LOGI("%s: stopping gracefully (%zu sessions)",
         signum == SIGINT ? "SIGINT" : "SIGTERM", net_session_count());
    net_shutdown(after_sessions);
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static int run_node(struct conf *c)
{
    uv_loop_t *loop = uv_default_loop();
    char n[16];

    snprintf(n, sizeof n, "%d", c->threadpool_size);
    setenv("UV_THREADPOOL_SIZE", n, 1);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGUSR1, SIG_IGN); /* until its handler is in place: never fatal */
    raise_nofile();
    log_level = c->log_level;
    wire_core(loop); /* every upward callback, before anything starts */
    sess_set_work_nice(c->worker_nice);
    metrics_start(loop);
    ack_configure(c);
    disp_configure((size_t)c->max_members);
    LOGI("chatd %s starting (ABI %d.%d, config %s)", CHATD_VERSION, CHAT_ABI_MAJOR,
         CHAT_ABI_MINOR, c->path);
    if (db_start(loop, c) != 0 || bus_start(loop, c) != 0)
        return 1;
    if (plug_start(loop, c) != 0) /* takes c */
        return 1;
    uv_signal_init(loop, &sig_hup);
    uv_signal_init(loop, &sig_int);
    uv_signal_init(loop, &sig_term);
    uv_signal_start(&sig_hup, on_signal, SIGHUP);
    uv_signal_start(&sig_int, on_signal, SIGINT);
    uv_signal_start(&sig_term, on_signal, SIGTERM);
    uv_signal_init(loop, &sig_usr1);
    uv_signal_start(&sig_usr1, on_signal, SIGUSR1);
    rl_start(loop, c);
    /* the admin endpoint first: once "listening on" is logged, both are up */
    if (admin_start(loop, c) != 0 || net_start(loop, c) != 0)
        return 1;
    sdn_ready(loop, "listening on %s:%d", c->listen_host, c->listen_port);
    uv_run(loop, UV_RUN_DEFAULT);
    plug_free_conf();
    uv_loop_close(loop);
    LOGI("stopped");
    return 0;
}

/* ---- worker processes -------------------------------------------------- */

static pid_t spawn_worker(struct conf *c, int i, const char *base_id)
{
    pid_t pid = fork();
    if (pid == 0) {
        sigset_t none;
        char id[256];
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        snprintf(id, sizeof id, "%s-w%d", base_id, i);
        unsetenv("NOTIFY_SOCKET"); /* the supervisor speaks to systemd */
        mem_free(c->node_id);
        c->node_id = mem_strdup(id);
        c->workers = 1;
        if (c->admin_port) /* worker i: the admin port + i */
            c->admin_port = c->admin_port + i <= 65535 ? c->admin_port + i : 0;
        exit(run_node(c));
    }
    return pid;
}

static int supervise(struct conf *c)
{
    int k = c->workers, alive = 0, rc = 0;
    pid_t *pids = mem_calloc((size_t)k, sizeof *pids);
    char base[128];
    sigset_t set;

    if (!pids)
        return 1;
    if (c->node_id[0])
        snprintf(base, sizeof base, "%s", c->node_id);
    else {
        char host[64] = "node";
        gethostname(host, sizeof host - 1);
        snprintf(base, sizeof base, "%s-%ld", host, (long)getpid());
    }
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGUSR1);
    sigprocmask(SIG_BLOCK, &set, NULL);
    for (int i = 0; i < k; i++)
        if ((pids[i] = spawn_worker(c, i, base)) > 0)
            alive++;
    LOGI("supervisor %ld: %d workers on %s:%d", (long)getpid(), alive,
         c->listen_host, c->listen_port);
    sdn_ready(NULL, "%d workers on %s:%d", alive, c->listen_host, c->listen_port);
    while (alive > 0) {
        int sig = sigwaitinfo(&set, NULL), st;
        pid_t pid;
        if (sig == SIGHUP || sig == SIGINT || sig == SIGTERM || sig == SIGUSR1) {
            if (sig == SIGUSR1)
                log_reopen();
            else if (sig != SIGHUP && !stopping) {
                stopping = 1;
                sdn_stopping();
            }
            for (int i = 0; i < k; i++)
                if (pids[i] > 0)
                    kill(pids[i], sig);
            continue;
        }
        while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
            for (int i = 0; i < k; i++) {
                if (pids[i] != pid)
                    continue;
                pids[i] = 0;
                alive--;
                if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
                    rc = 1;
                if (!stopping) {
                    LOGW("worker %d (pid %ld) died (status %d); restarting", i,
                         (long)pid, st);
                    sleep(1);
                    if ((pids[i] = spawn_worker(c, i, base)) > 0)
                        alive++;
                }
            }
        }
    }
    mem_free(pids);
    return stopping ? 0 : rc;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {{"migrate", no_argument, NULL, 'M'},
                                             {"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    const char *path = CHAT_DEFAULT_CONF, *listen = NULL;
    int check = 0, migrate = 0, workers = 0, opt, rc;
    char err[1024];
    struct conf *c;

    mem_init();
    while ((opt = getopt_long(argc, argv, "c:l:w:tVh", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c': path = optarg; break;
        case 'l': listen = optarg; break;
        case 'w': workers = atoi(optarg); break;
        case 't': check = 1; break;
        case 'M': migrate = 1; break;
        case 'V': printf("chatd %s (plugin ABI %d.%d)\n", CHATD_VERSION,
                         CHAT_ABI_MAJOR, CHAT_ABI_MINOR);
            return 0;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }
    if (!(c = conf_load(path, err, sizeof err))) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    if (listen) {
        char *h = NULL;
        int port;
        if (conf_parse_hostport(listen, &h, &port) || !conf_ip_ok(h)) {
            mem_free(h);
            fprintf(stderr, "-l %s: expected IP:PORT\n", listen);
            conf_free(c);
            return 2;
        }
        mem_free(c->listen_host);
        c->listen_host = h;
        c->listen_port = port;
    }
    if (workers > 0)
        c->workers = workers;
    if (check) {
        rc = plug_check(c, err, sizeof err);
        if (rc)
            fprintf(stderr, "%s\n", err);
        else
            printf("%s: ok (%zu plugins)\n", c->path, c->nplugins);
        conf_free(c);
        return rc ? 1 : 0;
    }
    log_level = c->log_level;
    if (migrate) { /* run by hand: stderr, in the configured format */
        if (log_open(NULL, c->log_format, err, sizeof err))
            fprintf(stderr, "%s\n", err);
        rc = db_migrate(c);
        conf_free(c);
        return rc ? 1 : 0;
    }
    if (log_open(c->log_file, c->log_format, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        conf_free(c);
        return 1;
    }
    if (c->workers > 1) {
        rc = supervise(c);
        conf_free(c);
        return rc;
    }
    return run_node(c);
}
