/*
 * metrics.c - the node's metrics in the Prometheus text exposition format.
 *
 * The admin listener serves what metrics_render() writes.  Three kinds of
 * numbers feed it, chosen so that counting costs nothing worth measuring:
 *
 *  - The hot path (frames, bytes, deliveries, closes, bus commands) bumps
 *    plain uint64_t fields of one struct, metrics_loop, which only the loop
 *    thread touches: no atomics, no locks, no lookups (labels are array
 *    indexes known at compile time, msgids bounded to the known ones plus
 *    "other").
 *  - A small registry of labelled series (families with label names fixed
 *    at registration) for what appears at run time: plugin loads, handler
 *    latency per plugin, and the metrics plugins register through the host
 *    table (ABI 1.6).  A series is looked up once, when it is registered;
 *    the caller keeps the pointer and updates it directly.  Series are
 *    reference counted, so a reloaded plugin's new instance that registers
 *    the same name and labels shares the series (its values continue) and
 *    a series nobody registers any more goes away with its last owner.
 *  - Collectors: other subsystems (net, db, bus, plugins) register a
 *    function that writes their gauges at scrape time, so this file calls
 *    nobody above it and the unit test links it alone.  Worker threads (the
 *    database pool) keep their own counters under the locks they already
 *    take; a collector reads them only when scraped.
 *
 * Every sample carries node="<node id>": with -w K each worker is its own
 * process with its own node id and admin port, and the numbers are that
 * process's.  Rendering runs on the loop thread; reading /proc/self costs a
 * few system calls per scrape, never a disk.
 */
#include <dirent.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "core.h"

struct metrics_loop metrics_loop;

/* Seconds; from 100 us (a handler) to 10 s (a stalled back end). */
const double metrics_latency_bounds[METRICS_LATENCY_NB] = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10};

static const char *const msgid_names[METRICS_MSGID_MAX + 1] = {
    "other", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12",
    "13", "14"};
static const char *const close_names[METRICS_CLOSE_N] = {
    "peer", "read_error", "write_error", "slow_reader", "frame_too_large",
    "idle", "shutdown", "replaced", "server", "error"};
static const char *const refuse_names[METRICS_REFUSE_N] = {
    "max_connections", "stopping", "max_connections_per_addr", "max_unauth_per_addr",
    "addr_conns_rate", "proxy_protocol"};
static const char *const route_names[METRICS_ROUTE_N] = {"local", "remote",
                                                         "stored", "undeliverable"};
static const char *const bus_cmd_names[METRICS_BUS_N] = {
    "script", "heartbeat", "sync", "deliver", "claim", "release", "presence",
    "publish"};
static const char *const presence_names[METRICS_PRESENCE_N] = {"claim", "release",
                                                               "query"};
static const char *const publish_names[METRICS_PUBLISH_N] = {"deliver", "broadcast"};

/* ---- histograms ------------------------------------------------------- */

void metrics_hist_init(struct metrics_hist *h, const double *bounds, size_t nb)
{
    memset(h, 0, sizeof *h);
    if (nb > METRICS_BUCKETS_MAX)
        nb = METRICS_BUCKETS_MAX;
    h->nb = (unsigned)nb;
    memcpy(h->bounds, bounds, nb * sizeof *bounds);
}

void metrics_observe(struct metrics_hist *h, double v)
{
    unsigned i = 0;

    while (i < h->nb && v > h->bounds[i])
        i++;
    h->counts[i]++;
    h->count++;
    h->sum += v;
}

/* ---- the registry ----------------------------------------------------- */

struct metrics_series {
    struct metrics_series *next;
    struct metrics_family *fam;
    char *labels;             /* rendered 'a="x",b="y"' (escaped), or "" */
    int refs;
    double value;             /* counter, gauge */
    struct metrics_hist hist; /* histogram */
};

struct metrics_family {
    struct metrics_family *next;
    char *name, *help;
    int type;
    char *label_names;        /* "a,b" for the consistency check */
    double bounds[METRICS_BUCKETS_MAX];
    unsigned nb;
    struct metrics_series *series, *tail;
};

/* A plugin's handle: one registration of one series by one instance. */
struct chat_metric {
    struct chat_metric *next;
    const struct chat_plugin *owner;
    struct metrics_series *s;
};

struct collector {
    struct collector *next;
    metrics_collect_fn fn;
};

static struct {
    uint64_t started_ns;
    char node[128];
    struct metrics_family *fams, *fams_tail;
    struct chat_metric *handles;
    struct collector *collectors, *collectors_tail;
    uv_timer_t lag_timer;
    uint64_t lag_last_ns;
    int lag_on;
} mt;

static int name_ok(const char *s)
{
    if (!s || !*s || !((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || *s == '_'))
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || *s == '_' ||
              (*s >= '0' && *s <= '9')))
            return 0;
    return 1;
}

/* ---- an output buffer ------------------------------------------------- */

struct metrics_out {
    char *p;
    size_t len, cap;
    int oom;
};

static void out_grow(struct metrics_out *o, size_t need)
{
    size_t cap = o->cap ? o->cap : 4096;
    char *np;

    if (o->oom)
        return;
    while (cap < o->len + need + 1)
        cap *= 2;
    if (cap == o->cap)
        return;
    if (!(np = mem_realloc(o->p, cap))) {
        o->oom = 1;
        return;
    }
    o->p = np;
    o->cap = cap;
}

static void out_put(struct metrics_out *o, const char *s, size_t n)
{
    out_grow(o, n);
    if (o->oom)
        return;
    memcpy(o->p + o->len, s, n);
    o->len += n;
    o->p[o->len] = '\0';
}

static void out_printf(struct metrics_out *o, const char *fmt, ...) CHAT_PRINTF(2, 3);
static void out_printf(struct metrics_out *o, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof tmp) {
        out_put(o, tmp, (size_t)n);
        return;
    }
    out_grow(o, (size_t)n);
    if (o->oom)
        return;
    va_start(ap, fmt);
    vsnprintf(o->p + o->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    o->len += (size_t)n;
}

/* A label value: backslash, double quote and line feed escaped. */
static void out_label_value(struct metrics_out *o, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\')
            out_put(o, "\\\\", 2);
        else if (*v == '"')
            out_put(o, "\\\"", 2);
        else if (*v == '\n')
            out_put(o, "\\n", 2);
        else
            out_put(o, v, 1);
    }
}

/* HELP text: backslash and line feed escaped. */
static void out_help_text(struct metrics_out *o, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\')
            out_put(o, "\\\\", 2);
        else if (*v == '\n')
            out_put(o, "\\n", 2);
        else
            out_put(o, v, 1);
    }
}

static void out_double(struct metrics_out *o, double v)
{
    if (isnan(v))
        out_put(o, "NaN", 3);
    else if (isinf(v))
        out_put(o, v > 0 ? "+Inf" : "-Inf", 4);
    else
        out_printf(o, "%.15g", v);
}

static const char *type_name(int type)
{
    return type == METRICS_COUNTER ? "counter"
           : type == METRICS_GAUGE ? "gauge" : "histogram";
}

void metrics_out_family(struct metrics_out *o, const char *name, const char *help,
                        int type)
{
    out_printf(o, "# HELP %s ", name);
    out_help_text(o, help);
    out_printf(o, "\n# TYPE %s %s\n", name, type_name(type));
}

/* name{node="..",labels,extra} value: labels is already rendered; extra is
 * one more pair whose value needs escaping (NULL: none). */
static void out_sample_head(struct metrics_out *o, const char *name, const char *suffix,
                            const char *labels, const char *ek, const char *ev)
{
    out_printf(o, "%s%s{node=\"", name, suffix);
    out_label_value(o, mt.node);
    out_put(o, "\"", 1);
    if (labels && *labels) {
        out_put(o, ",", 1);
        out_put(o, labels, strlen(labels));
    }
    if (ek) {
        out_printf(o, ",%s=\"", ek);
        out_label_value(o, ev);
        out_put(o, "\"", 1);
    }
    out_put(o, "} ", 2);
}

void metrics_out_u64(struct metrics_out *o, const char *name, const char *lk,
                     const char *lv, uint64_t v)
{
    out_sample_head(o, name, "", NULL, lk, lv);
    out_printf(o, "%llu\n", (unsigned long long)v);
}

void metrics_out_double(struct metrics_out *o, const char *name, const char *lk,
                        const char *lv, double v)
{
    out_sample_head(o, name, "", NULL, lk, lv);
    out_double(o, v);
    out_put(o, "\n", 1);
}

void metrics_out_u64_labels(struct metrics_out *o, const char *name,
                            const char *const *labels, uint64_t v)
{
    out_printf(o, "%s{node=\"", name);
    out_label_value(o, mt.node);
    out_put(o, "\"", 1);
    for (size_t i = 0; labels && labels[i] && labels[i + 1]; i += 2) {
        out_printf(o, ",%s=\"", labels[i]);
        out_label_value(o, labels[i + 1]);
        out_put(o, "\"", 1);
    }
    out_printf(o, "} %llu\n", (unsigned long long)v);
}

static void out_hist_rendered(struct metrics_out *o, const char *name,
                              const char *labels, const struct metrics_hist *h)
{
    uint64_t acc = 0;
    char le[64];

    for (unsigned i = 0; i < h->nb; i++) {
        acc += h->counts[i];
        snprintf(le, sizeof le, "%.15g", h->bounds[i]);
        out_sample_head(o, name, "_bucket", labels, "le", le);
        out_printf(o, "%llu\n", (unsigned long long)acc);
    }
    out_sample_head(o, name, "_bucket", labels, "le", "+Inf");
    out_printf(o, "%llu\n", (unsigned long long)h->count);
    out_sample_head(o, name, "_sum", labels, NULL, NULL);
    out_double(o, h->sum);
    out_put(o, "\n", 1);
    out_sample_head(o, name, "_count", labels, NULL, NULL);
    out_printf(o, "%llu\n", (unsigned long long)h->count);
}

void metrics_out_hist(struct metrics_out *o, const char *name, const char *lk,
                      const char *lv, const struct metrics_hist *h)
{
    char *labels = NULL;
    struct metrics_out l = {0};

    if (lk) {
        out_printf(&l, "%s=\"", lk);
        out_label_value(&l, lv);
        out_put(&l, "\"", 1);
        if (l.oom) {
            o->oom = 1;
            mem_free(l.p);
            return;
        }
        labels = l.p;
    }
    out_hist_rendered(o, name, labels, h);
    mem_free(labels);
}

/* One family of u64 counters indexed by a label. */
static void out_counter_array(struct metrics_out *o, const char *name, const char *help,
                              const char *lk, const char *const *names,
                              const uint64_t *v, size_t n)
{
    metrics_out_family(o, name, help, METRICS_COUNTER);
    for (size_t i = 0; i < n; i++)
        metrics_out_u64(o, name, lk, names[i], v[i]);
}

/* ---- registry: families and series ------------------------------------ */

static struct metrics_family *family_find(const char *name)
{
    for (struct metrics_family *f = mt.fams; f; f = f->next)
        if (strcmp(f->name, name) == 0)
            return f;
    return NULL;
}

/* "a,b" and 'a="x",b="y"' from a NULL-terminated name, value list. */
static int labels_render(const char *const *labels, int type, char **names, char **rendered)
{
    struct metrics_out n = {0}, r = {0};
    size_t i;

    for (i = 0; labels && labels[i]; i += 2) {
        if (!labels[i + 1] || !name_ok(labels[i]) || strncmp(labels[i], "__", 2) == 0 ||
            strcmp(labels[i], "node") == 0 ||
            (type == METRICS_HISTOGRAM && strcmp(labels[i], "le") == 0))
            goto bad;
        out_printf(&n, "%s%s", i ? "," : "", labels[i]);
        out_printf(&r, "%s%s=\"", i ? "," : "", labels[i]);
        out_label_value(&r, labels[i + 1]);
        out_put(&r, "\"", 1);
    }
    out_put(&n, "", 0);
    out_put(&r, "", 0);
    if (n.oom || r.oom || !n.p || !r.p)
        goto bad;
    /* kept for the series' life: the exact size, not the buffer's */
    *names = mem_strdup(n.p);
    *rendered = mem_strdup(r.p);
    mem_free(n.p);
    mem_free(r.p);
    if (!*names || !*rendered) {
        mem_free(*names);
        mem_free(*rendered);
        return CHAT_ERR_NOMEM;
    }
    return CHAT_OK;
bad:
    mem_free(n.p);
    mem_free(r.p);
    return n.oom || r.oom ? CHAT_ERR_NOMEM : CHAT_ERR_INVAL;
}

static struct metrics_family *family_get(int type, const char *name, const char *help,
                                         const char *label_names, const double *bounds,
                                         size_t nb)
{
    struct metrics_family *f = family_find(name);

    if (f) {
        if (f->type != type || strcmp(f->label_names, label_names) != 0 ||
            (type == METRICS_HISTOGRAM &&
             (f->nb != nb || memcmp(f->bounds, bounds, nb * sizeof *bounds) != 0)))
            return NULL;
        return f;
    }
    if (!(f = mem_calloc(1, sizeof *f)))
        return NULL;
    f->type = type;
    f->nb = (unsigned)nb;
    if (nb)
        memcpy(f->bounds, bounds, nb * sizeof *bounds);
    if (!(f->name = mem_strdup(name)) || !(f->help = mem_strdup(help ? help : "")) ||
        !(f->label_names = mem_strdup(label_names))) {
        mem_free(f->name);
        mem_free(f->help);
        mem_free(f);
        return NULL;
    }
    if (mt.fams_tail)
        mt.fams_tail->next = f;
    else
        mt.fams = f;
    mt.fams_tail = f;
    return f;
}

static int bounds_ok(const double *bounds, size_t nb)
{
    if (nb > METRICS_BUCKETS_MAX || (nb && !bounds))
        return 0;
    for (size_t i = 0; i < nb; i++)
        if (isnan(bounds[i]) || isinf(bounds[i]) || (i && bounds[i] <= bounds[i - 1]))
            return 0;
    return 1;
}

struct metrics_series *metrics_series_get(int type, const char *name, const char *help,
                                          const char *const *labels,
                                          const double *bounds, size_t nb)
{
    struct metrics_family *f;
    struct metrics_series *s = NULL;
    char *names = NULL, *rendered = NULL;

    if (!name_ok(name) || (type == METRICS_HISTOGRAM && !bounds_ok(bounds, nb)))
        return NULL;
    if (type != METRICS_HISTOGRAM)
        nb = 0;
    if (labels_render(labels, type, &names, &rendered) != CHAT_OK)
        return NULL;
    if (!(f = family_get(type, name, help, names, bounds, nb)))
        goto out;
    for (s = f->series; s; s = s->next)
        if (strcmp(s->labels, rendered) == 0) {
            s->refs++;
            goto out;
        }
    if (!(s = mem_calloc(1, sizeof *s)))
        goto out;
    s->fam = f;
    s->labels = rendered;
    rendered = NULL;
    s->refs = 1;
    if (type == METRICS_HISTOGRAM)
        metrics_hist_init(&s->hist, f->bounds, f->nb);
    if (f->tail)
        f->tail->next = s;
    else
        f->series = s;
    f->tail = s;
out:
    mem_free(names);
    mem_free(rendered);
    return s;
}

void metrics_series_put(struct metrics_series *s)
{
    struct metrics_family *f;
    struct metrics_series **pp, *prev = NULL;

    if (!s || --s->refs > 0)
        return;
    f = s->fam;
    for (pp = &f->series; *pp && *pp != s; pp = &(*pp)->next)
        prev = *pp;
    if (*pp)
        *pp = s->next;
    if (f->tail == s)
        f->tail = prev;
    mem_free(s->labels);
    mem_free(s);
    /* an empty family stays: its name and type may be registered again */
}

void metrics_series_add(struct metrics_series *s, double v)
{
    if (s && v >= 0 && s->fam->type == METRICS_COUNTER)
        s->value += v;
    else if (s && s->fam->type == METRICS_GAUGE)
        s->value += v;
}

void metrics_series_set(struct metrics_series *s, double v)
{
    if (s && s->fam->type == METRICS_GAUGE)
        s->value = v;
}

void metrics_series_observe(struct metrics_series *s, double v)
{
    if (s && s->fam->type == METRICS_HISTOGRAM)
        metrics_observe(&s->hist, v);
}

double metrics_series_value(const struct metrics_series *s)
{
    return s ? (s->fam->type == METRICS_HISTOGRAM ? (double)s->hist.count : s->value) : 0;
}

/* ---- the plugin side (ABI 1.6) ---------------------------------------- */

struct chat_metric *metrics_plugin_register(const struct chat_plugin *self,
                                            const char *pname, int type,
                                            const char *name, const char *help,
                                            const char *const *labels,
                                            const double *bounds, size_t nb)
{
    char full[256];
    struct chat_metric *m;
    int n;

    if (!self || !pname || !name_ok(name))
        goto bad;
    n = snprintf(full, sizeof full, "chatd_%s_%s", pname, name);
    if (n < 0 || (size_t)n >= sizeof full || !name_ok(full))
        goto bad;
    if (!(m = mem_calloc(1, sizeof *m)))
        return NULL;
    if (!(m->s = metrics_series_get(type, full, help, labels, bounds, nb))) {
        mem_free(m);
        goto bad;
    }
    m->owner = self;
    m->next = mt.handles;
    mt.handles = m;
    return m;
bad:
    LOGE("plugin %s: metric %s refused: a bad name, label or bucket list, or "
         "the name is taken with another type, labels or buckets",
         pname ? pname : "?", name ? name : "(null)");
    return NULL;
}

void metrics_plugin_release(const struct chat_plugin *self)
{
    struct chat_metric **pp = &mt.handles;

    while (*pp) {
        struct chat_metric *m = *pp;
        if (m->owner == self) {
            *pp = m->next;
            metrics_series_put(m->s);
            mem_free(m);
        } else
            pp = &m->next;
    }
}

void metrics_metric_add(struct chat_metric *m, double v)
{
    if (m)
        metrics_series_add(m->s, v);
}

void metrics_metric_set(struct chat_metric *m, double v)
{
    if (m)
        metrics_series_set(m->s, v);
}

void metrics_metric_observe(struct chat_metric *m, double v)
{
    if (m)
        metrics_series_observe(m->s, v);
}

/* ---- collectors ------------------------------------------------------- */

int metrics_add_collector(metrics_collect_fn fn)
{
    struct collector *c;

    for (c = mt.collectors; c; c = c->next)
        if (c->fn == fn)
            return CHAT_OK;
    if (!(c = mem_calloc(1, sizeof *c)))
        return CHAT_ERR_NOMEM;
    c->fn = fn;
    if (mt.collectors_tail)
        mt.collectors_tail->next = c;
    else
        mt.collectors = c;
    mt.collectors_tail = c;
    return CHAT_OK;
}

void metrics_set_node(const char *node)
{
    snprintf(mt.node, sizeof mt.node, "%s", node ? node : "");
}

/* ---- event-loop lag --------------------------------------------------- */

static void on_lag_timer(uv_timer_t *t)
{
    uint64_t now = uv_hrtime();
    uint64_t due = mt.lag_last_ns + (uint64_t)METRICS_LAG_INTERVAL_MS * 1000000u;

    (void)t;
    metrics_observe(&metrics_loop.loop_lag, now > due ? (double)(now - due) / 1e9 : 0);
    mt.lag_last_ns = now;
}

void metrics_start(uv_loop_t *loop)
{
    mt.started_ns = uv_hrtime();
    metrics_hist_init(&metrics_loop.loop_lag, metrics_latency_bounds, METRICS_LATENCY_NB);
    for (int i = 0; i < METRICS_BUS_N; i++)
        metrics_hist_init(&metrics_loop.bus_rtt[i], metrics_latency_bounds,
                          METRICS_LATENCY_NB);
    if (!loop || uv_timer_init(loop, &mt.lag_timer) != 0)
        return;
    mt.lag_last_ns = uv_hrtime();
    uv_timer_start(&mt.lag_timer, on_lag_timer, METRICS_LAG_INTERVAL_MS,
                   METRICS_LAG_INTERVAL_MS);
    uv_unref((uv_handle_t *)&mt.lag_timer); /* never keeps the loop alive */
    mt.lag_on = 1;
}

void metrics_stop(void)
{
    if (mt.lag_on) {
        uv_close((uv_handle_t *)&mt.lag_timer, NULL);
        mt.lag_on = 0;
    }
}

/* ---- process figures from /proc/self ---------------------------------- */

static void render_process(struct metrics_out *o)
{
    char buf[1024], *p;
    FILE *f;
    unsigned long long ut = 0, st = 0;
    long long rss = 0;
    long tck = sysconf(_SC_CLK_TCK), page = sysconf(_SC_PAGESIZE);
    size_t fds = 0;
    DIR *d;
    struct rlimit rl;

    if ((f = fopen("/proc/self/stat", "r"))) {
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        buf[n] = '\0';
        fclose(f);
        /* after "(comm)": field 3 is state; utime is 14, stime 15, rss 24 */
        if ((p = strrchr(buf, ')')))
            sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu "
                          "%*d %*d %*d %*d %*d %*d %*u %*u %lld",
                   &ut, &st, &rss);
    }
    if ((d = opendir("/proc/self/fd"))) {
        struct dirent *e;
        while ((e = readdir(d)))
            if (e->d_name[0] != '.')
                fds++;
        closedir(d);
        fds--; /* the directory stream itself */
    }
    metrics_out_family(o, "chatd_process_cpu_seconds_total",
                       "User and system CPU time of this process.", METRICS_COUNTER);
    metrics_out_double(o, "chatd_process_cpu_seconds_total", NULL, NULL,
                       tck > 0 ? (double)(ut + st) / (double)tck : 0);
    metrics_out_family(o, "chatd_process_resident_memory_bytes",
                       "Resident set size of this process.", METRICS_GAUGE);
    metrics_out_u64(o, "chatd_process_resident_memory_bytes", NULL, NULL,
                    (uint64_t)(rss > 0 && page > 0 ? rss * page : 0));
    metrics_out_family(o, "chatd_process_open_fds", "Open file descriptors.",
                       METRICS_GAUGE);
    metrics_out_u64(o, "chatd_process_open_fds", NULL, NULL, fds);
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        metrics_out_family(o, "chatd_process_max_fds",
                           "The file descriptor limit (RLIMIT_NOFILE).", METRICS_GAUGE);
        metrics_out_u64(o, "chatd_process_max_fds", NULL, NULL,
                        rl.rlim_cur == RLIM_INFINITY ? 0 : (uint64_t)rl.rlim_cur);
    }
}

/* ---- rendering -------------------------------------------------------- */

static void render_build(struct metrics_out *o)
{
    char labels[96];

    snprintf(labels, sizeof labels, "version=\"%s\",abi=\"%d.%d\"", CHATD_VERSION,
             CHAT_ABI_MAJOR, CHAT_ABI_MINOR);
    metrics_out_family(o, "chatd_build_info", "The chatd build; always 1.",
                       METRICS_GAUGE);
    out_sample_head(o, "chatd_build_info", "", labels, NULL, NULL);
    out_put(o, "1\n", 2);
    metrics_out_family(o, "chatd_uptime_seconds", "Seconds since this process started.",
                       METRICS_GAUGE);
    metrics_out_double(o, "chatd_uptime_seconds", NULL, NULL,
                       (double)(uv_hrtime() - mt.started_ns) / 1e9);
}

static void render_loop(struct metrics_out *o)
{
    const struct metrics_loop *m = &metrics_loop;

    metrics_out_family(o, "chatd_connections_accepted_total",
                       "TCP connections accepted (refused ones included).",
                       METRICS_COUNTER);
    metrics_out_u64(o, "chatd_connections_accepted_total", "transport", "tcp",
                    m->accepted);
    out_counter_array(o, "chatd_connections_refused_total",
                      "Connections closed at once after accept, by reason.", "reason",
                      refuse_names, m->refused, METRICS_REFUSE_N);
    out_counter_array(o, "chatd_connections_closed_total",
                      "Sessions closed, by reason.", "reason", close_names, m->closed,
                      METRICS_CLOSE_N);
    out_counter_array(o, "chatd_frames_total",
                      "Complete frames received, by msgid (unknown ones as other).",
                      "msgid", msgid_names, m->frames, METRICS_MSGID_MAX + 1);
    out_counter_array(o, "chatd_errors_total",
                      "Error replies and protocol errors, by request msgid.", "msgid",
                      msgid_names, m->errors, METRICS_MSGID_MAX + 1);
    metrics_out_family(o, "chatd_bytes_received_total", "Bytes read from clients.",
                       METRICS_COUNTER);
    metrics_out_u64(o, "chatd_bytes_received_total", "transport", "tcp", m->bytes_in);
    metrics_out_family(o, "chatd_bytes_sent_total", "Bytes written to clients.",
                       METRICS_COUNTER);
    metrics_out_u64(o, "chatd_bytes_sent_total", "transport", "tcp", m->bytes_out);
    out_counter_array(o, "chatd_deliveries_total",
                      "Messages for users, by route: local (queued to a session "
                      "here), remote (published to the node holding the user), "
                      "undeliverable (handed to the offline store's hooks), stored "
                      "(the store confirmed one a sender waited for).",
                      "route", route_names, m->deliveries, METRICS_ROUTE_N);
    out_counter_array(o, "chatd_bus_publishes_total",
                      "Redis PUBLISHes (routed deliveries and broadcasts).", "kind",
                      publish_names, m->bus_publishes, METRICS_PUBLISH_N);
    out_counter_array(o, "chatd_bus_presence_operations_total",
                      "Presence operations: claims, releases and queries.", "op",
                      presence_names, m->bus_presence, METRICS_PRESENCE_N);
    metrics_out_family(o, "chatd_bus_reconnects_total",
                       "Times the Redis link came back after being lost.",
                       METRICS_COUNTER);
    metrics_out_u64(o, "chatd_bus_reconnects_total", NULL, NULL, m->bus_reconnects);
    metrics_out_family(o, "chatd_bus_link_lost_total",
                       "Times the Redis link was dropped or could not be opened.",
                       METRICS_COUNTER);
    metrics_out_u64(o, "chatd_bus_link_lost_total", NULL, NULL, m->bus_link_lost);
    metrics_out_family(o, "chatd_bus_roundtrip_seconds",
                       "Redis command round trips, by command.", METRICS_HISTOGRAM);
    for (int i = 0; i < METRICS_BUS_N; i++)
        metrics_out_hist(o, "chatd_bus_roundtrip_seconds", "command", bus_cmd_names[i],
                         &m->bus_rtt[i]);
    metrics_out_family(o, "chatd_event_loop_lag_seconds",
                       "How late a 100 ms timer on the event loop fires.",
                       METRICS_HISTOGRAM);
    metrics_out_hist(o, "chatd_event_loop_lag_seconds", NULL, NULL, &m->loop_lag);
}

static void render_registry(struct metrics_out *o)
{
    for (struct metrics_family *f = mt.fams; f; f = f->next) {
        if (!f->series)
            continue;
        metrics_out_family(o, f->name, f->help, f->type);
        for (struct metrics_series *s = f->series; s; s = s->next) {
            if (f->type == METRICS_HISTOGRAM) {
                out_hist_rendered(o, f->name, s->labels, &s->hist);
                continue;
            }
            out_sample_head(o, f->name, "", s->labels, NULL, NULL);
            out_double(o, s->value);
            out_put(o, "\n", 1);
        }
    }
}

char *metrics_render(size_t *len)
{
    struct metrics_out o = {0};

    render_build(&o);
    render_loop(&o);
    for (struct collector *c = mt.collectors; c; c = c->next)
        c->fn(&o);
    render_registry(&o);
    render_process(&o);
    out_put(&o, "", 0); /* a NUL-terminated buffer even when empty */
    if (o.oom || !o.p) {
        mem_free(o.p);
        return NULL;
    }
    *len = o.len;
    return o.p;
}
