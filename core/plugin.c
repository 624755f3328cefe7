/*
 * plugin.c - loading plugins, checking their versions, counting references
 * to each instance, and hot reload on SIGHUP.
 *
 * Every load opens a private copy of the .so (copied into a temp folder and
 * unlinked once mapped), so dlopen() can never hand back the cached image
 * of an older file with the same path, and the file on disk can be replaced
 * at any time.  The descriptor check is two-sided: the host refuses another
 * ABI major and a newer minor than its own; the plugin sees the host's
 * version and table size in struct chat_host.
 *
 * An instance is referenced by being active (one reference) and by every
 * piece of work that will run its code: a handler or hook call, a timer, a
 * database query, a worker job, a presence query.  A reload initialises the
 * new instance beside the old one; only when every step succeeded (dlopen,
 * descriptor, init, no msgid clash) does the registry switch to it, on the
 * loop thread, between two requests.  The old instance is then retired: its
 * repeating timers stop, it loses its active reference, and it is finalised
 * and unloaded when the last reference goes.  Anything that fails leaves the
 * running instance in place.
 *
 * The file work of a reload (reading chat.conf, stat, copying, dlopen) runs
 * on a worker thread; only init, the swap and fini run on the loop.
 * plug_reload_ex() callers (the admin listener's POST /reload) are told the
 * outcome when the job that starts after their call is done: "ok", the
 * file's error, or the plugins that did not load.
 *
 * The registry sits below the host table and main.c: the table it hands to
 * init (plug_set_host) and what applies a reloaded config's limits to net,
 * dispatch and the login ack (plug_on_conf) are registered by main.c, and
 * the layers below reach handlers, hooks and references only through the
 * callbacks main.c wires to plug_handler, plug_run_handler, plug_fire and
 * plug_ref/plug_unref.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core.h"

struct chat_timer {
    uv_timer_t t;
    struct chat_plugin *inst;
    chat_timer_fn fn;
    void *ud;
    uint64_t repeat;
    int closing, in_cb;
    struct chat_timer *prev, *next;
};

struct inst_handler {
    int msgid;
    struct plug_handler h;
};

struct inst_hook {
    int event;
    struct plug_hook h;
};

struct chat_plugin {
    char *name;
    unsigned gen;            /* load generation, for log lines */
    struct stat st;          /* of the source file when it was copied */
    void *dl;
    const struct chat_plugin_desc *desc;
    void *state;
    int refs;
    int active, in_init, initialised;
    struct conf_section sec; /* private copy of [plugin.NAME] */
    struct inst_handler *handlers;
    size_t nhandlers;
    struct inst_hook *hooks;
    size_t nhooks;
    struct plug_login_part *parts;
    size_t nparts;
    struct chat_timer *timers;
    struct chat_plugin *replaces; /* during a reload: the instance it replaces */
};

/* A plugin file opened (on a worker thread during reload). */
struct opened {
    char *name;
    struct stat st;
    void *dl;
    const struct chat_plugin_desc *(*entry)(void);
    char err[4608]; /* room for a full path and the reason */
    struct chat_plugin *keep; /* unchanged: the active instance stays */
};

struct reload_job {
    uv_work_t req;
    char *path;
    struct conf *conf;       /* new config, or NULL on error */
    char err[512];
    struct opened *files;
    size_t nfiles;
    struct chat_plugin **active; /* snapshot of the active set (names/stats) */
    size_t nactive;
};

static struct {
    uv_loop_t *loop;
    struct conf *conf;       /* the config in force; owned here */
    char tmpdir[256];
    unsigned gen;
    struct chat_plugin **active; /* in config order */
    size_t nactive;
    struct chat_plugin **staging; /* being initialised in this load batch */
    size_t nstaging;
    struct map registry;     /* msgid -> struct plug_handler * */
    struct plug_hook *hooks[CHAT_EV_MAX];
    size_t nhooks[CHAT_EV_MAX];
    struct plug_login_part *parts;
    size_t nparts;
    int reloading, reload_again;
    size_t live; /* instances created and not yet freed */
    /* plug_reload_ex: callers of the next job, and of the running one */
    struct reload_waiter *waiting, *running;
    char fails[512];         /* what apply() could not load, "; "-joined */
} pl;

/* Set by main.c (wire.c): the table plugins are handed, a layer above the
 * registry, and what applies a reloaded config's live settings to the
 * layers below (main.c owns them). */
static const struct chat_host *host;
static void (*conf_cb)(const struct conf *c);

void plug_set_host(const struct chat_host *h) { host = h; }
void plug_on_conf(void (*apply)(const struct conf *c)) { conf_cb = apply; }

struct reload_waiter {
    struct reload_waiter *next;
    void (*done)(int ok, const char *msg, void *ud);
    void *ud;
};

static void note_fail(const char *name, const char *what)
{
    size_t n = strlen(pl.fails);
    if (n < sizeof pl.fails - 1)
        snprintf(pl.fails + n, sizeof pl.fails - n, "%splugin %s: %s",
                 n ? "; " : "", name, what);
}

/* ---- references and teardown ------------------------------------------ */

static void section_free(struct conf_section *s)
{
    for (size_t i = 0; i < s->nkv; i++) {
        mem_free(s->kv[i].key);
        mem_free(s->kv[i].val);
    }
    mem_free(s->kv);
    mem_free(s->name);
    memset(s, 0, sizeof *s);
}

static int section_copy(struct conf_section *dst, const struct conf_section *src,
                        const char *name)
{
    memset(dst, 0, sizeof *dst);
    if (!(dst->name = mem_strdup(name)))
        return -1;
    if (!src)
        return 0;
    if (src->nkv && !(dst->kv = mem_calloc(src->nkv, sizeof *dst->kv)))
        goto fail;
    for (size_t i = 0; i < src->nkv; i++) {
        dst->kv[i].key = mem_strdup(src->kv[i].key);
        dst->kv[i].val = mem_strdup(src->kv[i].val);
        dst->kv[i].line = src->kv[i].line;
        dst->nkv = i + 1;
        if (!dst->kv[i].key || !dst->kv[i].val)
            goto fail;
    }
    return 0;
fail:
    section_free(dst);
    return -1;
}

static int section_equal(const struct conf_section *a, const struct conf_section *b)
{
    size_t na = a ? a->nkv : 0, nb = b ? b->nkv : 0;
    if (na != nb)
        return 0;
    for (size_t i = 0; i < na; i++)
        if (strcmp(a->kv[i].key, b->kv[i].key) || strcmp(a->kv[i].val, b->kv[i].val))
            return 0;
    return 1;
}

static void inst_free(struct chat_plugin *p)
{
    pl.live--;
    metrics_plugin_release(p);
    for (size_t i = 0; i < p->nparts; i++)
        mem_free(p->parts[i].key);
    mem_free(p->parts);
    mem_free(p->handlers);
    mem_free(p->hooks);
    section_free(&p->sec);
    mem_free(p->name);
    mem_free(p);
}

static void inst_unload(struct chat_plugin *p)
{
    if (p->initialised && p->desc->fini)
        p->desc->fini(p->state);
    if (p->dl)
        dlclose(p->dl);
    LOGI("plugin %s (load %u): finalised and unloaded", p->name, p->gen);
    inst_free(p);
}

void plug_ref(struct chat_plugin *p)
{
    if (p)
        p->refs++;
}

void plug_unref(struct chat_plugin *p)
{
    if (p && --p->refs == 0)
        inst_unload(p);
}

const char *plug_name(const struct chat_plugin *p) { return p ? p->name : "core"; }
int plug_in_init(const struct chat_plugin *p) { return p && p->in_init; }
const struct conf_section *plug_conf(const struct chat_plugin *p) { return &p->sec; }

/* ---- timers ----------------------------------------------------------- */

static void timer_closed(uv_handle_t *h)
{
    struct chat_timer *t = container_of((uv_timer_t *)h, struct chat_timer, t);
    struct chat_plugin *p = t->inst;
    if (t->prev)
        t->prev->next = t->next;
    else
        p->timers = t->next;
    if (t->next)
        t->next->prev = t->prev;
    mem_free(t);
    plug_unref(p);
}

static void timer_close(struct chat_timer *t)
{
    if (t->closing)
        return;
    t->closing = 1;
    uv_timer_stop(&t->t);
    uv_close((uv_handle_t *)&t->t, timer_closed);
}

static void timer_fire(uv_timer_t *h)
{
    struct chat_timer *t = container_of(h, struct chat_timer, t);
    t->in_cb = 1;
    t->fn(t, t->ud);
    t->in_cb = 0;
    if (!t->repeat)
        timer_close(t);
}

struct chat_timer *plug_timer_start(struct chat_plugin *p, uint64_t timeout_ms,
                                    uint64_t repeat_ms, chat_timer_fn fn, void *ud)
{
    struct chat_timer *t;
    if (!p || !fn || !(t = mem_calloc(1, sizeof *t)))
        return NULL;
    uv_timer_init(pl.loop, &t->t);
    t->inst = p;
    t->fn = fn;
    t->ud = ud;
    t->repeat = repeat_ms;
    t->next = p->timers;
    if (p->timers)
        p->timers->prev = t;
    p->timers = t;
    plug_ref(p);
    uv_timer_start(&t->t, timer_fire, timeout_ms, repeat_ms);
    return t;
}

void plug_timer_stop(struct chat_timer *t)
{
    if (t)
        timer_close(t);
}

/* ---- registration ----------------------------------------------------- */

/* Which instance other than p's predecessor holds msgid now or in this batch. */
static struct chat_plugin *msgid_owner(const struct chat_plugin *p, int msgid)
{
    for (size_t i = 0; i < pl.nactive; i++) {
        struct chat_plugin *a = pl.active[i];
        if (a == p->replaces || strcmp(a->name, p->name) == 0)
            continue;
        for (size_t j = 0; j < a->nhandlers; j++)
            if (a->handlers[j].msgid == msgid)
                return a;
    }
    for (size_t i = 0; i < pl.nstaging; i++) {
        struct chat_plugin *a = pl.staging[i];
        if (a == p)
            continue;
        for (size_t j = 0; j < a->nhandlers; j++)
            if (a->handlers[j].msgid == msgid)
                return a;
    }
    return NULL;
}

/* ---- metrics ---------------------------------------------------------- */

/* chatd_handler_seconds{plugin} and chatd_handler_calls_total{plugin}:
 * core-owned, shared by every instance of the plugin (so they survive
 * reloads), never freed. */
static struct metrics_series *handler_latency(const struct chat_plugin *p)
{
    const char *labels[] = {"plugin", p->name, NULL};

    return metrics_series_get(METRICS_HISTOGRAM, "chatd_handler_seconds",
                              "Time a plugin's msgid handler ran, by plugin; one call "
                              "in 16 is timed.", labels,
                              metrics_latency_bounds, METRICS_LATENCY_NB);
}

static struct metrics_series *handler_calls(const struct chat_plugin *p)
{
    const char *labels[] = {"plugin", p->name, NULL};

    return metrics_series_get(METRICS_COUNTER, "chatd_handler_calls_total",
                              "Calls of a plugin's msgid handlers, by plugin.", labels,
                              NULL, 0);
}

/* Add n to a load counter (family: loads, reloads, load_failures); n = 0
 * only creates the series. */
static void count_load(const char *family, const char *help, const char *name,
                       const char *version, double n)
{
    char full[64];
    const char *labels[] = {"plugin", name, "version", version ? version : "", NULL};

    snprintf(full, sizeof full, "chatd_plugin_%s_total", family);
    metrics_series_add(metrics_series_get(METRICS_COUNTER, full, help, labels, NULL, 0), n);
}

static void count_failures(const char *name, const char *version, double n)
{
    count_load("load_failures",
               "Plugin loads and reloads that failed (the running instance, if "
               "any, stayed), by plugin and version (\"\" when unknown).",
               name, version, n);
}

static void count_failure(const char *name, const char *version)
{
    count_failures(name, version, 1);
}

static void plug_collect(struct metrics_out *o)
{
    metrics_out_family(o, "chatd_plugin_info",
                       "The active plugins with their versions; always 1.",
                       METRICS_GAUGE);
    for (size_t i = 0; i < pl.nactive; i++) {
        const struct chat_plugin *p = pl.active[i];
        const char *labels[] = {"plugin", p->name, "version",
                                p->desc->version ? p->desc->version : "", NULL};
        metrics_out_u64_labels(o, "chatd_plugin_info", labels, 1);
    }
    metrics_out_family(o, "chatd_plugin_instances",
                       "Plugin instances loaded: active and draining after a reload.",
                       METRICS_GAUGE);
    metrics_out_u64(o, "chatd_plugin_instances", NULL, NULL, pl.live);
}

int plug_register_handler(struct chat_plugin *p, int msgid, chat_handler_fn fn, void *ud)
{
    return plug_register_handler_ex(p, msgid, fn, ud, 0);
}

int plug_register_handler_ex(struct chat_plugin *p, int msgid, chat_handler_fn fn,
                             void *ud, unsigned flags)
{
    struct inst_handler *h;
    struct chat_plugin *owner;
    if (!p || !p->in_init)
        return CHAT_ERR_STATE;
    if (!fn || (flags & ~(unsigned)CHAT_HANDLER_RAW))
        return CHAT_ERR_INVAL;
    for (size_t i = 0; i < p->nhandlers; i++)
        if (p->handlers[i].msgid == msgid)
            return CHAT_ERR_EXISTS;
    if ((owner = msgid_owner(p, msgid))) {
        LOGE("plugin %s: msgid %d is already handled by plugin %s", p->name, msgid,
             owner->name);
        return CHAT_ERR_EXISTS;
    }
    h = mem_realloc(p->handlers, (p->nhandlers + 1) * sizeof *h);
    if (!h)
        return CHAT_ERR_NOMEM;
    p->handlers = h;
    h[p->nhandlers].msgid = msgid;
    h[p->nhandlers].h = (struct plug_handler){p, fn, ud, flags, handler_latency(p),
                                              handler_calls(p)};
    p->nhandlers++;
    return CHAT_OK;
}

int plug_register_hook(struct chat_plugin *p, int event, chat_hook_fn fn, void *ud)
{
    struct inst_hook *h;
    if (!p || !p->in_init)
        return CHAT_ERR_STATE;
    if (!fn || event <= 0 || event >= CHAT_EV_MAX)
        return CHAT_ERR_INVAL;
    h = mem_realloc(p->hooks, (p->nhooks + 1) * sizeof *h);
    if (!h)
        return CHAT_ERR_NOMEM;
    p->hooks = h;
    h[p->nhooks].event = event;
    h[p->nhooks].h = (struct plug_hook){p, fn, ud};
    p->nhooks++;
    return CHAT_OK;
}

static int add_login_part(struct chat_plugin *p, const char *key,
                          chat_login_part_fn part_fn, chat_login_sent_fn sent_fn,
                          chat_login_written_fn written_fn, void *ud)
{
    struct plug_login_part *lp;
    if (!p || !p->in_init)
        return CHAT_ERR_STATE;
    if (!key || !*key || !part_fn)
        return CHAT_ERR_INVAL;
    lp = mem_realloc(p->parts, (p->nparts + 1) * sizeof *lp);
    if (!lp)
        return CHAT_ERR_NOMEM;
    p->parts = lp;
    lp = &p->parts[p->nparts];
    if (!(lp->key = mem_strdup(key)))
        return CHAT_ERR_NOMEM;
    lp->inst = p;
    lp->part_fn = part_fn;
    lp->sent_fn = sent_fn;
    lp->written_fn = written_fn;
    lp->ud = ud;
    p->nparts++;
    return CHAT_OK;
}

int plug_register_login_part(struct chat_plugin *p, const char *key,
                             chat_login_part_fn part_fn, chat_login_sent_fn sent_fn,
                             void *ud)
{
    return add_login_part(p, key, part_fn, sent_fn, NULL, ud);
}

int plug_register_login_messages(struct chat_plugin *p, const char *key,
                                 chat_login_part_fn part_fn,
                                 chat_login_written_fn written_fn, void *ud)
{
    if (!written_fn)
        return CHAT_ERR_INVAL;
    return add_login_part(p, key, part_fn, NULL, written_fn, ud);
}

/* Rebuild the msgid registry, the hook lists and the login parts from the
 * active set.  On allocation failure the previous tables stay. */
static int rebuild(void)
{
    struct map reg;
    struct plug_hook *hooks[CHAT_EV_MAX] = {0};
    size_t nhooks[CHAT_EV_MAX] = {0};
    struct plug_login_part *parts = NULL;
    size_t nparts = 0;

    map_init(&reg);
    for (size_t i = 0; i < pl.nactive; i++) {
        struct chat_plugin *p = pl.active[i];
        for (size_t j = 0; j < p->nhandlers; j++)
            if (map_put(&reg, p->handlers[j].msgid, &p->handlers[j].h))
                goto fail;
        for (size_t j = 0; j < p->nhooks; j++) {
            int ev = p->hooks[j].event;
            struct plug_hook *nh = mem_realloc(hooks[ev], (nhooks[ev] + 1) * sizeof *nh);
            if (!nh)
                goto fail;
            hooks[ev] = nh;
            nh[nhooks[ev]++] = p->hooks[j].h;
        }
        for (size_t j = 0; j < p->nparts; j++) {
            struct plug_login_part *np = mem_realloc(parts, (nparts + 1) * sizeof *np);
            if (!np)
                goto fail;
            parts = np;
            parts[nparts++] = p->parts[j];
        }
    }
    map_free(&pl.registry);
    pl.registry = reg;
    for (int ev = 0; ev < CHAT_EV_MAX; ev++) {
        mem_free(pl.hooks[ev]);
        pl.hooks[ev] = hooks[ev];
        pl.nhooks[ev] = nhooks[ev];
    }
    mem_free(pl.parts);
    pl.parts = parts;
    pl.nparts = nparts;
    return 0;
fail:
    map_free(&reg);
    for (int ev = 0; ev < CHAT_EV_MAX; ev++)
        mem_free(hooks[ev]);
    mem_free(parts);
    return -1;
}

const struct plug_handler *plug_handler(int msgid) { return map_get(&pl.registry, msgid); }

int plug_msgid_handled(int msgid) { return plug_handler(msgid) != NULL; }

/* Timing a handler takes two clock reads, which cost 65-120 ns each on
 * our VMs (kvm-clock): more than the rest of the metrics together.  So one
 * call in PLUG_TIME_EVERY is timed (chatd_handler_seconds is a sample) and
 * every call is counted (chatd_handler_calls_total). */
#define PLUG_TIME_EVERY 16
static unsigned timed_tick;

void plug_run_handler(const struct plug_handler *h, struct chat_session *s,
                      const struct chat_request *req)
{
    uint64_t t0;

    plug_ref(h->inst);
    metrics_series_add(h->calls, 1);
    if (++timed_tick % PLUG_TIME_EVERY == 0) {
        t0 = uv_hrtime();
        h->fn(s, req, h->ud);
        metrics_series_observe(h->latency, (double)(uv_hrtime() - t0) / 1e9);
    } else {
        h->fn(s, req, h->ud);
    }
    plug_unref(h->inst);
}

size_t plug_login_parts(const struct plug_login_part **parts)
{
    *parts = pl.parts;
    return pl.nparts;
}

int plug_fire(int event, const void *arg)
{
    struct plug_hook *hooks;
    size_t n;
    int ran = 0;
    if (event <= 0 || event >= CHAT_EV_MAX)
        return 0;
    hooks = pl.hooks[event];
    n = pl.nhooks[event];
    for (size_t i = 0; i < n; i++) {
        /* a broadcast goes only to the plugin of the same name */
        if (event == CHAT_EV_BROADCAST &&
            strcmp(((const struct chat_ev_broadcast *)arg)->plugin, hooks[i].inst->name))
            continue;
        plug_ref(hooks[i].inst);
        hooks[i].fn(event, arg, hooks[i].ud);
        plug_unref(hooks[i].inst);
        ran++;
    }
    return ran;
}

/* ---- opening files (worker thread or start-up) -------------------------- */

static int copy_file(const char *from, const char *to)
{
    char buf[65536];
    int in, out, rc = -1;
    ssize_t n;

    if ((in = open(from, O_RDONLY | O_CLOEXEC)) < 0)
        return -1;
    if ((out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0700)) < 0)
        goto out;
    while ((n = read(in, buf, sizeof buf)) > 0)
        if (write(out, buf, (size_t)n) != n)
            goto out;
    rc = n == 0 ? 0 : -1;
out:
    if (out >= 0 && close(out) < 0)
        rc = -1;
    close(in);
    return rc;
}

static int same_file(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino &&
           a->st_size == b->st_size && a->st_mtim.tv_sec == b->st_mtim.tv_sec &&
           a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/* Open dir/name.so through a private copy.  keep: the active instance of
 * that name (if any), reused when the file did not change. */
static void open_plugin(const char *dir, const char *tmpdir,
                        struct chat_plugin *keep, struct opened *o)
{
    /* glibc finds an already loaded object by its path name: every copy gets
     * a name never used before in this process.  Calls are serialised (start
     * up, then one reload job at a time), so a plain counter is enough. */
    static unsigned copy_seq;
    char path[4096], copy[4352];
    snprintf(path, sizeof path, "%s/%s.so", dir, o->name);
    if (stat(path, &o->st) != 0) {
        snprintf(o->err, sizeof o->err, "%s: %s", path, strerror(errno));
        return;
    }
    if (keep && same_file(&keep->st, &o->st)) {
        o->keep = keep;
        return;
    }
    snprintf(copy, sizeof copy, "%s/%s.%u.so", tmpdir, o->name, ++copy_seq);
    if (copy_file(path, copy) != 0) {
        snprintf(o->err, sizeof o->err, "%s: cannot copy to %.300s: %s", path, copy,
                 strerror(errno));
        unlink(copy);
        return;
    }
    o->dl = dlopen(copy, RTLD_NOW | RTLD_LOCAL);
    unlink(copy); /* mapped now; nothing on disk to go stale */
    if (!o->dl) {
        snprintf(o->err, sizeof o->err, "%s: dlopen: %s", path, dlerror());
        return;
    }
    *(void **)&o->entry = dlsym(o->dl, CHAT_PLUGIN_ENTRY);
    if (!o->entry) {
        snprintf(o->err, sizeof o->err, "%s: no %s symbol", path, CHAT_PLUGIN_ENTRY);
        dlclose(o->dl);
        o->dl = NULL;
    }
}

/* Check the descriptor; "" or the reason. */
static const char *check_desc(const struct chat_plugin_desc *d, const char *name,
                              char *why, size_t n)
{
    if (!d || d->magic != CHAT_PLUGIN_MAGIC)
        snprintf(why, n, "bad magic (not a chatd plugin)");
    else if (d->abi_major != CHAT_ABI_MAJOR)
        snprintf(why, n, "built for ABI major %u, this host has major %u",
                 d->abi_major, CHAT_ABI_MAJOR);
    else if (d->abi_minor > CHAT_ABI_MINOR)
        snprintf(why, n, "built for ABI %u.%u, newer than this host's %u.%u",
                 d->abi_major, d->abi_minor, CHAT_ABI_MAJOR, CHAT_ABI_MINOR);
    else if (d->size < offsetof(struct chat_plugin_desc, reserved))
        snprintf(why, n, "descriptor too small (%u bytes)", d->size);
    else if (!d->name || strcmp(d->name, name) != 0)
        snprintf(why, n, "descriptor names plugin \"%s\", enabled as \"%s\"",
                 d->name ? d->name : "(null)", name);
    else if (!d->init)
        snprintf(why, n, "descriptor has no init");
    else
        return "";
    return why;
}

/* ---- loading on the loop ---------------------------------------------- */

/* Drop an instance that never became active: fini if init had succeeded,
 * stop its timers, and let the last reference unload it (work it started
 * in init still holds references and finishes first). */
static void discard(struct chat_plugin *p)
{
    struct chat_timer *t, *next;
    if (p->initialised && p->desc->fini)
        p->desc->fini(p->state);
    p->initialised = 0;
    for (t = p->timers; t; t = next) {
        next = t->next;
        timer_close(t);
    }
    plug_unref(p);
}

/* Create and initialise an instance from an opened file.  NULL on failure
 * (logged); the opened handle is consumed either way. */
static struct chat_plugin *instantiate(struct opened *o, const struct conf *c,
                                       struct chat_plugin *replaces)
{
    const struct chat_plugin_desc *d = o->entry();
    struct chat_plugin *p;
    char why[256];
    const char *bad = check_desc(d, o->name, why, sizeof why);
    int rc;

    if (*bad) {
        LOGE("plugin %s: refused: %s", o->name, bad);
        count_failure(o->name, NULL);
        dlclose(o->dl);
        return NULL;
    }
    if ((p = mem_calloc(1, sizeof *p)))
        pl.live++;
    if (!p || !(p->name = mem_strdup(o->name)) ||
        section_copy(&p->sec, conf_section(c, o->name), o->name)) {
        LOGE("plugin %s: out of memory", o->name);
        if (p)
            inst_free(p);
        dlclose(o->dl);
        return NULL;
    }
    p->gen = ++pl.gen;
    p->st = o->st;
    p->dl = o->dl;
    p->desc = d;
    p->replaces = replaces;
    p->refs = 1;
    pl.staging[pl.nstaging++] = p;
    p->in_init = 1;
    rc = host ? d->init(host, p, &p->state) : CHAT_ERR_STATE;
    p->in_init = 0;
    pl.nstaging--;
    if (rc != CHAT_OK) {
        LOGE("plugin %s %s: init failed: %s", p->name, d->version ? d->version : "",
             log_strerror(rc));
        count_failure(p->name, d->version);
        discard(p);
        return NULL;
    }
    p->initialised = 1;
    /* a plugin that ignored a failed registration must not get in either */
    for (size_t i = 0; i < p->nhandlers; i++) {
        struct chat_plugin *owner = msgid_owner(p, p->handlers[i].msgid);
        if (owner) {
            LOGE("plugin %s: msgid %d clashes with plugin %s; refused", p->name,
                 p->handlers[i].msgid, owner->name);
            count_failure(p->name, d->version);
            discard(p);
            return NULL;
        }
    }
    pl.staging[pl.nstaging++] = p; /* visible to later plugins of this batch */
    count_load("loads", "Plugin instances initialised, by plugin and version.", p->name,
               d->version, 1);
    /* reloads and failures exist from the first load on, at 0 until one
     * happens, so that rate() and the dashboard see them */
    count_load("reloads", "Hot reloads that initialised a new instance, by plugin "
               "and the new version.", p->name, d->version, replaces ? 1 : 0);
    count_failures(p->name, d->version, 0);
    LOGI("plugin %s %s (ABI %u.%u, load %u): initialised, %zu msgids, %zu hooks",
         p->name, d->version ? d->version : "", d->abi_major, d->abi_minor, p->gen,
         p->nhandlers, p->nhooks);
    return p;
}

static void handover(struct chat_plugin *old, struct chat_plugin *nw)
{
    void *blob = NULL;
    size_t len = 0;
    if (!old->desc->save || !nw->desc->restore)
        return;
    if (old->desc->save(old->state, &blob, &len) != CHAT_OK) {
        LOGW("plugin %s: save() failed; the new instance starts empty", old->name);
        return;
    }
    if (nw->desc->restore(nw->state, blob, len) != CHAT_OK)
        LOGW("plugin %s: restore() failed", nw->name);
    mem_free(blob);
}

static void retire(struct chat_plugin *p)
{
    struct chat_timer *t, *next;
    p->active = 0;
    for (t = p->timers; t; t = next) {
        next = t->next;
        if (t->repeat)
            timer_close(t);
    }
    LOGI("plugin %s (load %u): retired, draining %d reference%s", p->name, p->gen,
         p->refs - 1, p->refs == 2 ? "" : "s");
    plug_unref(p);
}

static struct chat_plugin *find_active(const char *name)
{
    for (size_t i = 0; i < pl.nactive; i++)
        if (strcmp(pl.active[i]->name, name) == 0)
            return pl.active[i];
    return NULL;
}

/* Apply opened files for config c: the new active set is c's list; each
 * entry is the kept instance, a new instance, or (on failure) the old one. */
static void apply(struct conf *c, struct opened *files, size_t nfiles)
{
    struct chat_plugin **next = mem_calloc(nfiles + 1, sizeof *next);
    struct chat_plugin **fresh = mem_calloc(nfiles + 1, sizeof *fresh);
    size_t nnext = 0;

    if (!next || !fresh || !(pl.staging = mem_calloc(nfiles + 1, sizeof *pl.staging))) {
        LOGE("reload: out of memory; nothing changed");
        for (size_t i = 0; i < nfiles; i++)
            if (files[i].dl)
                dlclose(files[i].dl);
        goto out;
    }
    pl.nstaging = 0;
    for (size_t i = 0; i < nfiles; i++) {
        struct opened *o = &files[i];
        struct chat_plugin *old = find_active(o->name);
        if (o->keep) {
            next[nnext++] = o->keep;
            continue;
        }
        if (!o->dl) {
            LOGE("plugin %s: %s%s", o->name, o->err,
                 old ? "; the running instance stays" : "");
            note_fail(o->name, o->err);
            count_failure(o->name, NULL);
            if (old)
                next[nnext++] = old;
            continue;
        }
        fresh[i] = instantiate(o, c, old);
        if (!fresh[i])
            note_fail(o->name, "init failed (see the log)");
        if (fresh[i])
            next[nnext++] = fresh[i];
        else if (old) {
            LOGE("plugin %s: the running instance (load %u) stays", o->name, old->gen);
            next[nnext++] = old;
        }
    }
    /* state handover, then swap */
    for (size_t i = 0; i < nfiles; i++)
        if (fresh[i] && fresh[i]->replaces)
            handover(fresh[i]->replaces, fresh[i]);
    {
        struct chat_plugin **prev = pl.active;
        size_t nprev = pl.nactive;
        pl.active = next;
        pl.nactive = nnext;
        next = NULL;
        if (rebuild() != 0) {
            LOGE("reload: out of memory while swapping; keeping the old set");
            next = pl.active;
            pl.active = prev;
            pl.nactive = nprev;
            for (size_t i = 0; i < nfiles; i++)
                if (fresh[i])
                    discard(fresh[i]);
            goto out;
        }
        for (size_t i = 0; i < pl.nactive; i++)
            pl.active[i]->active = 1;
        /* retire what is no longer in the set */
        for (size_t i = 0; i < nprev; i++) {
            int still = 0;
            for (size_t j = 0; j < pl.nactive; j++)
                still |= pl.active[j] == prev[i];
            if (!still)
                retire(prev[i]);
        }
        mem_free(prev);
    }
    /* settings of kept instances */
    for (size_t i = 0; i < pl.nactive; i++) {
        struct chat_plugin *p = pl.active[i];
        const struct conf_section *ns = conf_section(c, p->name);
        struct conf_section copy;
        if (p->replaces) {
            p->replaces = NULL;
            continue;
        }
        if (section_equal(&p->sec, ns) || section_copy(&copy, ns, p->name))
            continue;
        section_free(&p->sec);
        p->sec = copy;
        if (p->desc->reconfigure) {
            LOGI("plugin %s: settings changed; reconfigure", p->name);
            plug_ref(p);
            if (p->desc->reconfigure(p->state) != CHAT_OK)
                LOGW("plugin %s: reconfigure() reported an error", p->name);
            plug_unref(p);
        }
    }
    for (size_t i = 0; i < nfiles; i++)
        if (fresh[i])
            fresh[i]->replaces = NULL;
out:
    mem_free(pl.staging);
    pl.staging = NULL;
    pl.nstaging = 0;
    mem_free(next);
    mem_free(fresh);
}

static struct opened *open_all(const struct conf *c, size_t *n)
{
    struct opened *files = mem_calloc(c->nplugins + 1, sizeof *files);
    if (!files)
        return NULL;
    for (size_t i = 0; i < c->nplugins; i++) {
        files[i].name = c->plugins[i];
        open_plugin(c->plugin_dir, pl.tmpdir, find_active(c->plugins[i]), &files[i]);
    }
    *n = c->nplugins;
    return files;
}

int plug_start(uv_loop_t *loop, const struct conf *c)
{
    struct opened *files;
    size_t n = 0;
    const char *tmp = getenv("TMPDIR");

    pl.loop = loop;
    map_init(&pl.registry);
    metrics_add_collector(plug_collect);
    snprintf(pl.tmpdir, sizeof pl.tmpdir, "%s/chatd-plugins-XXXXXX",
             tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(pl.tmpdir)) {
        LOGE("mkdtemp %s: %s", pl.tmpdir, strerror(errno));
        return -1;
    }
    if (!(pl.conf = (struct conf *)c) || !(files = open_all(c, &n)))
        return -1;
    for (size_t i = 0; i < n; i++)
        if (!files[i].dl) {
            LOGE("%s:%d: plugin %s: %s", c->path, c->plugins_line, files[i].name,
                 files[i].err);
            for (size_t j = 0; j < n; j++)
                if (files[j].dl)
                    dlclose(files[j].dl);
            mem_free(files);
            return -1;
        }
    apply(pl.conf, files, n);
    mem_free(files);
    if (pl.nactive != c->nplugins) {
        LOGE("%s:%d: not every enabled plugin could be loaded", c->path,
             c->plugins_line);
        return -1;
    }
    return 0;
}

int plug_check(const struct conf *c, char *err, size_t errlen)
{
    char tmpl[256];
    const char *tmp = getenv("TMPDIR");
    int rc = 0;

    snprintf(tmpl, sizeof tmpl, "%s/chatd-check-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(tmpl)) {
        snprintf(err, errlen, "%s:0: mkdtemp: %s", c->path, strerror(errno));
        return -1;
    }
    for (size_t i = 0; i < c->nplugins && rc == 0; i++) {
        struct opened o;
        char why[256];
        const char *bad;
        memset(&o, 0, sizeof o);
        o.name = c->plugins[i];
        open_plugin(c->plugin_dir, tmpl, NULL, &o);
        if (!o.dl) {
            snprintf(err, errlen, "%s:%d: plugin %s: %s", c->path, c->plugins_line,
                     o.name, o.err);
            rc = -1;
            break;
        }
        bad = check_desc(o.entry(), o.name, why, sizeof why);
        if (*bad) {
            snprintf(err, errlen, "%s:%d: plugin %s: %s", c->path, c->plugins_line,
                     o.name, bad);
            rc = -1;
        }
        dlclose(o.dl);
    }
    rmdir(tmpl);
    return rc;
}

/* ---- reload ----------------------------------------------------------- */

static void reload_work(uv_work_t *req)
{
    struct reload_job *j = container_of(req, struct reload_job, req);
    j->conf = conf_load(j->path, j->err, sizeof j->err);
    if (!j->conf)
        return;
    j->files = mem_calloc(j->conf->nplugins + 1, sizeof *j->files);
    if (!j->files) {
        snprintf(j->err, sizeof j->err, "out of memory");
        return;
    }
    for (size_t i = 0; i < j->conf->nplugins; i++) {
        struct chat_plugin *keep = NULL;
        /* the active snapshot is only read here: names and stat data do not
         * change while the job runs (swaps happen on the loop, after it) */
        for (size_t k = 0; k < j->nactive; k++)
            if (strcmp(j->active[k]->name, j->conf->plugins[i]) == 0)
                keep = j->active[k];
        j->files[i].name = j->conf->plugins[i];
        open_plugin(j->conf->plugin_dir, pl.tmpdir, keep, &j->files[i]);
    }
    j->nfiles = j->conf->nplugins;
}

/* Tell the callers of plug_reload_ex how the job went. */
static void reload_tell(int ok, const char *msg)
{
    struct reload_waiter *w = pl.running, *next;
    pl.running = NULL;
    for (; w; w = next) {
        next = w->next;
        w->done(ok, msg, w->ud);
        mem_free(w);
    }
}

static void reload_done(uv_work_t *req, int status)
{
    struct reload_job *j = container_of(req, struct reload_job, req);
    char msg[sizeof j->err + sizeof pl.fails];
    int ok = 0;

    if (status == 0 && j->conf && j->files) {
        struct conf *old = pl.conf;
        LOGI("reload: %s read; applying", j->path);
        log_level = j->conf->log_level;
        if (log_open(j->conf->log_file, j->conf->log_format, msg, sizeof msg))
            LOGE("reload: %s; logging as before", msg);
        pl.fails[0] = '\0';
        apply(j->conf, j->files, j->nfiles);
        ok = !pl.fails[0];
        snprintf(msg, sizeof msg, "%s", ok ? "ok" : pl.fails);
        pl.conf = j->conf;
        if (conf_cb)
            conf_cb(pl.conf);
        conf_free(old);
        j->conf = NULL;
    } else {
        LOGE("reload: %s; nothing changed", j->err[0] ? j->err : "cancelled");
        snprintf(msg, sizeof msg, "%s; nothing changed",
                 j->err[0] ? j->err : "cancelled");
        if (j->files)
            for (size_t i = 0; i < j->nfiles; i++)
                if (j->files[i].dl)
                    dlclose(j->files[i].dl);
    }
    for (size_t k = 0; k < j->nactive; k++)
        plug_unref(j->active[k]);
    conf_free(j->conf);
    mem_free(j->files);
    mem_free(j->active);
    mem_free(j->path);
    mem_free(j);
    pl.reloading = 0;
    reload_tell(ok, msg);
    if (pl.reload_again) {
        pl.reload_again = 0;
        plug_reload();
    }
}

void plug_reload(void)
{
    struct reload_job *j;
    if (pl.reloading) {
        pl.reload_again = 1;
        return;
    }
    if (!(j = mem_calloc(1, sizeof *j)) || !(j->path = mem_strdup(pl.conf->path)) ||
        !(j->active = mem_calloc(pl.nactive + 1, sizeof *j->active))) {
        LOGE("reload: out of memory");
        if (j)
            mem_free(j->path);
        mem_free(j);
        return;
    }
    for (size_t i = 0; i < pl.nactive; i++) {
        j->active[i] = pl.active[i];
        plug_ref(pl.active[i]); /* the worker reads its stat data */
    }
    j->nactive = pl.nactive;
    pl.reloading = 1;
    pl.running = pl.waiting; /* they wait for this job */
    pl.waiting = NULL;
    LOGI("reload: SIGHUP; reading %s", j->path);
    if (uv_queue_work(pl.loop, &j->req, reload_work, reload_done) != 0) {
        pl.reloading = 0;
        pl.waiting = pl.running; /* for the next reload */
        pl.running = NULL;
        for (size_t i = 0; i < j->nactive; i++)
            plug_unref(j->active[i]);
        mem_free(j->active);
        mem_free(j->path);
        mem_free(j);
    }
}

int plug_reload_ex(void (*done)(int ok, const char *msg, void *ud), void *ud)
{
    struct reload_waiter *w = mem_calloc(1, sizeof *w);
    if (!w)
        return CHAT_ERR_NOMEM;
    w->done = done;
    w->ud = ud;
    w->next = pl.waiting;
    pl.waiting = w;
    plug_reload();
    return CHAT_OK;
}

size_t plug_active(void) { return pl.nactive; }

const struct conf *plug_current_conf(void) { return pl.conf; }

size_t plug_live(void) { return pl.live; }

void plug_stop(void)
{
    struct chat_plugin **act = pl.active;
    size_t n = pl.nactive;
    pl.active = NULL;
    pl.nactive = 0;
    rebuild();
    for (size_t i = n; i-- > 0;) {
        struct chat_timer *t, *next;
        for (t = act[i]->timers; t; t = next) {
            next = t->next;
            timer_close(t); /* one-shot ones too: the server is stopping */
        }
        retire(act[i]);
    }
    mem_free(act);
    map_free(&pl.registry);
    for (int ev = 0; ev < CHAT_EV_MAX; ev++) {
        mem_free(pl.hooks[ev]);
        pl.hooks[ev] = NULL;
        pl.nhooks[ev] = 0;
    }
    mem_free(pl.parts);
    pl.parts = NULL;
    pl.nparts = 0;
    rmdir(pl.tmpdir);
}

void plug_free_conf(void)
{
    conf_free(pl.conf);
    pl.conf = NULL;
}
