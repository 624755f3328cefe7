/*
 * host.c - the function table handed to plugins (struct chat_host).
 *
 * Most entries point straight at a subsystem; the few that combine several
 * (session_login, session_logout, req_auth, work) live here.  Everything
 * asynchronous that runs plugin code takes a reference on the calling
 * instance first and drops it after the callback, so a reload can never
 * unload code that a pending callback will still run.
 */
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

static uv_loop_t *host_loop;

/* ---- deferral --------------------------------------------------------- */

struct deferred {
    uv_timer_t t;
    void (*fn)(void *arg);
    void *arg;
};

static void deferred_closed(uv_handle_t *h) { mem_free(h); }

static void deferred_fire(uv_timer_t *t)
{
    struct deferred *d = (struct deferred *)t;
    d->fn(d->arg);
    uv_close((uv_handle_t *)&d->t, deferred_closed);
}

int host_defer(void (*fn)(void *arg), void *arg)
{
    struct deferred *d = mem_malloc(sizeof *d);
    if (!d)
        return CHAT_ERR_NOMEM;
    d->fn = fn;
    d->arg = arg;
    uv_timer_init(host_loop, &d->t);
    uv_timer_start(&d->t, deferred_fire, 0, 0);
    return CHAT_OK;
}

void host_init(uv_loop_t *loop) { host_loop = loop; }

/* ---- small wrappers --------------------------------------------------- */

static void h_log(struct chat_plugin *self, int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vwrite(level, plug_name(self), fmt, ap);
    va_end(ap);
}

static const char *h_strerror(int err)
{
    switch (err) {
    case CHAT_OK: return "ok";
    case CHAT_ERR_NOMEM: return "out of memory";
    case CHAT_ERR_INVAL: return "invalid argument";
    case CHAT_ERR_EXISTS: return "already exists";
    case CHAT_ERR_NOTFOUND: return "not found";
    case CHAT_ERR_STATE: return "not allowed in this state";
    case CHAT_ERR_BUSY: return "queue full";
    case CHAT_ERR_DB: return "database error";
    case CHAT_ERR_UNAVAILABLE: return "service unavailable";
    case CHAT_ERR_CLOSED: return "closed";
    case CHAT_ERR_TIMEOUT: return "timed out";
    case CHAT_ERR_ABI: return "ABI mismatch";
    case CHAT_ERR_IO: return "I/O error";
    default: return "unknown error";
    }
}

static const char *h_conf_get(struct chat_plugin *self, const char *key, const char *def)
{
    const char *v = self ? conf_section_get(plug_conf(self), key) : NULL;
    return v ? v : def;
}

static int64_t h_conf_int(struct chat_plugin *self, const char *key, int64_t def)
{
    const char *v = h_conf_get(self, key, NULL);
    char *end;
    long long x;
    if (!v || !*v)
        return def;
    x = strtoll(v, &end, 10);
    if (*end) {
        log_write(CHAT_LOG_WARN, plug_name(self),
                  "setting %s = \"%s\" is not an integer; using %lld", key, v,
                  (long long)def);
        return def;
    }
    return x;
}

static uint64_t h_session_id(const struct chat_session *s) { return net_session_id(s); }
static struct chat_session *h_session_get(uint64_t id) { return net_session_get(id); }
static int h_session_proto(const struct chat_session *s) { return net_session_proto(s); }
static int64_t h_session_user(const struct chat_session *s) { return net_session_user(s); }
static const char *h_session_name(const struct chat_session *s) { return net_session_name(s); }
static const char *h_session_peer(const struct chat_session *s) { return net_session_peer(s); }

static struct chat_session *h_session_by_user(int64_t uid)
{
    struct chat_session *s = net_session_by_user(uid);
    return s && !net_session_closing(s) ? s : NULL;
}

static int h_session_logout(struct chat_session *s)
{
    struct chat_ev_session ev;
    int64_t uid = net_session_user(s);
    if (!uid)
        return CHAT_ERR_STATE;
    ev.size = sizeof ev;
    ev.session = s;
    ev.user_id = uid;
    plug_fire(CHAT_EV_LOGOUT, &ev);
    bus_release(uid);
    net_session_unbind(s);
    return CHAT_OK;
}

static void h_session_close(struct chat_session *s, int errno_, const char *why)
{
    net_close(s, errno_, why);
}

static int h_send_json(struct chat_session *s, const cJSON *obj)
{
    return obj ? disp_send_json(s, obj, 0) : CHAT_ERR_INVAL;
}

static int h_send_raw(struct chat_session *s, const char *json, size_t len)
{
    return json && len ? net_send(s, json, len) : CHAT_ERR_INVAL;
}

static int h_deliver(struct chat_plugin *self, int64_t uid, const char *json, size_t len)
{
    (void)self;
    if (uid <= 0 || !json || !len)
        return CHAT_ERR_INVAL;
    return bus_deliver(uid, json, len);
}

static char *h_json_quote(const char *s, size_t len, size_t *outlen)
{
    return json_quote(s, len, outlen);
}

static int h_req_int(const struct chat_request *req, const char *key, int64_t *out);

static int64_t h_req_auth(struct chat_session *s, const struct chat_request *req)
{
    int64_t uid = net_session_user(s), id = 0;
    int r;
    if (!uid) {
        disp_error(s, &req->ack, CHAT_E_NOT_LOGGED_IN, "not logged in");
        return 0;
    }
    if ((r = h_req_int(req, "id", &id)) == 0)
        return uid;
    if (r < 0) {
        disp_error(s, &req->ack, CHAT_E_BAD_FIELD, "id must be an integer");
        return 0;
    }
    if (id != uid) {
        LOGSW(s, "user %lld sent a request as user %lld; refused", (long long)uid,
              (long long)id);
        disp_error(s, &req->ack, CHAT_E_ID_MISMATCH, "id is not the logged-in user");
        return 0;
    }
    return uid;
}

/* ---- delivery with an outcome (ABI 1.5) -------------------------------
 * A ticket exists only while an outcome is pending: the hot path (a live
 * local session) never allocates one.  It is owned by the bus while the
 * message is routed, then by whichever plugin claims it from the
 * undeliverable event, and freed by host_delivery_done.  A claimer may
 * complete the ticket inside its hook (refused at once), so whether it was
 * claimed is remembered outside the ticket, for the event being fired. */

struct chat_delivery {
    struct chat_plugin *inst; /* referenced until cb has run */
    chat_deliver_cb cb;
    int64_t uid, from;
    union {
        max_align_t align;
        unsigned char b[CHAT_DELIVER_CTX_MAX];
    } ctx;
};

void host_delivery_done(struct chat_delivery *d, int status)
{
    d->cb(status, d->uid, d->ctx.b);
    plug_unref(d->inst);
    mem_free(d);
}

/* The ticket of the undeliverable event being fired, and whether a hook
 * took it (events nest only through a hook delivering again). */
static struct chat_delivery *firing;
static int firing_claimed;

static struct chat_delivery *h_undeliverable_claim(const struct chat_ev_undeliverable *ev)
{
    struct chat_delivery *d;

    if (!ev || ev->size < sizeof *ev || !(d = ev->ticket) || d != firing ||
        firing_claimed)
        return NULL;
    firing_claimed = 1;
    return d;
}

static void h_delivery_done(struct chat_delivery *d, int status)
{
    if (!d)
        return;
    if (status == CHAT_OK)
        metrics_loop.deliveries[METRICS_ROUTE_STORED]++;
    host_delivery_done(d, status);
}

void host_undeliverable_t(int64_t uid, const char *json, size_t len,
                          struct chat_delivery *d)
{
    struct chat_ev_undeliverable ev = {sizeof ev, uid, json, len, 0, d};
    struct chat_delivery *outer = firing;
    int outer_claimed = firing_claimed, claimed, n;

    if (d)
        ev.from = d->from;
    metrics_loop.deliveries[METRICS_ROUTE_UNDELIVERABLE]++;
    firing = d;
    firing_claimed = 0;
    n = plug_fire(CHAT_EV_UNDELIVERABLE, &ev); /* d may be freed by now */
    claimed = firing_claimed;
    firing = outer;
    firing_claimed = outer_claimed;
    if (d && !claimed) {
        LOGD("message for user %lld is undeliverable and no plugin took it; "
             "its sender is told", (long long)uid);
        host_delivery_done(d, CHAT_ERR_UNAVAILABLE);
        return;
    }
    if (n == 0)
        LOGW("message for user %lld is undeliverable and no plugin stores such "
             "messages (enable the offline plugin); dropped: %.*s",
             (long long)uid, (int)(len > 200 ? 200 : len), json);
}

void host_undeliverable(int64_t uid, const char *json, size_t len)
{
    host_undeliverable_t(uid, json, len, NULL);
}

static int h_deliver_ex(struct chat_plugin *self, int64_t from, int64_t uid,
                        const char *json, size_t len, chat_deliver_cb cb,
                        const void *ctx, size_t ctx_len)
{
    struct chat_delivery *d;
    int rc;

    if (uid <= 0 || !json || !len || !cb || ctx_len > CHAT_DELIVER_CTX_MAX ||
        (ctx_len && !ctx))
        return CHAT_ERR_INVAL;
    if (bus_deliver_local(uid, json, len) == CHAT_OK)
        return CHAT_OK; /* the hot path: no ticket */
    if (!(d = mem_calloc(1, sizeof *d)))
        return CHAT_ERR_NOMEM;
    d->inst = self;
    d->cb = cb;
    d->uid = uid;
    d->from = from;
    if (ctx_len)
        memcpy(d->ctx.b, ctx, ctx_len);
    plug_ref(self);
    if ((rc = bus_deliver_t(uid, json, len, d)) == CHAT_DELIVER_PENDING)
        return rc; /* the bus owns d now */
    plug_unref(self); /* CHAT_OK (went out locally after all) or an error */
    mem_free(d);
    return rc;
}

/* ---- worker jobs ------------------------------------------------------ */

struct work_job {
    uv_work_t req;
    struct chat_plugin *inst;
    chat_work_fn fn;
    chat_done_fn done;
    void *ud;
};

/* Worker jobs (password hashes) yield to the event loop: each worker
 * thread lowers its own scheduling priority once, so a login storm slows
 * logins down rather than the chat of everybody else. */
static int work_nice;

static void work_run(uv_work_t *req)
{
    struct work_job *j = container_of(req, struct work_job, req);
    static _Thread_local int niced;
    if (!niced) {
        niced = 1;
        if (work_nice && setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), work_nice))
            log_write(CHAT_LOG_WARN, "core", "setpriority(%d) for a worker thread "
                      "failed: %s", work_nice, strerror(errno));
    }
    j->fn(j->ud);
}

void host_set_work_nice(int nice) { work_nice = nice; }

static void work_after(uv_work_t *req, int status)
{
    struct work_job *j = container_of(req, struct work_job, req);
    j->done(status == UV_ECANCELED ? CHAT_ERR_CLOSED : CHAT_OK, j->ud);
    plug_unref(j->inst);
    mem_free(j);
}

static int h_work(struct chat_plugin *self, chat_work_fn fn, chat_done_fn done, void *ud)
{
    struct work_job *j;
    if (!fn || !done)
        return CHAT_ERR_INVAL;
    if (!(j = mem_malloc(sizeof *j)))
        return CHAT_ERR_NOMEM;
    j->inst = self;
    j->fn = fn;
    j->done = done;
    j->ud = ud;
    if (uv_queue_work(host_loop, &j->req, work_run, work_after) != 0) {
        mem_free(j);
        return CHAT_ERR_BUSY;
    }
    plug_ref(self);
    return CHAT_OK;
}

/* ---- login ------------------------------------------------------------ */

struct login_ctx {
    struct chat_plugin *inst;
    uint64_t sid;
    int64_t uid;
    int status;    /* for the local refusal path */
    char *name;
    size_t name_len;
    chat_login_cb cb;
    void *ud;
};

static void login_finish(struct login_ctx *c, int status)
{
    c->cb(status, c->sid, c->ud);
    plug_unref(c->inst);
    mem_free(c->name);
    mem_free(c);
}

static void login_deferred(void *arg)
{
    struct login_ctx *c = arg;
    login_finish(c, c->status);
}

static void login_claimed(int status, void *ud)
{
    struct login_ctx *c = ud;
    struct chat_session *s = net_session_get(c->sid);
    struct chat_ev_session ev;
    int r;

    if (status != CHAT_OK) {
        login_finish(c, status);
        return;
    }
    /* every granted claim is paired with exactly one bus_release (the bus
     * counts claims per user), so a claim that ends up unused is given back */
    if (!s) {
        bus_release(c->uid);
        login_finish(c, CHAT_ERR_CLOSED);
        return;
    }
    if ((r = net_session_bind(s, c->uid, c->name, c->name_len)) != CHAT_OK) {
        bus_release(c->uid);
        login_finish(c, r);
        return;
    }
    ev.size = sizeof ev;
    ev.session = s;
    ev.user_id = c->uid;
    plug_fire(CHAT_EV_LOGIN, &ev);
    login_finish(c, CHAT_OK);
}

static int h_session_login_len(struct chat_plugin *self, struct chat_session *s,
                               int64_t uid, const char *name, size_t name_len,
                               int flags, chat_login_cb cb, void *ud)
{
    struct login_ctx *c;
    struct chat_session *other;

    if (!s || uid <= 0 || !cb)
        return CHAT_ERR_INVAL;
    if (net_session_closing(s))
        return CHAT_ERR_CLOSED;
    if (net_session_user(s))
        return CHAT_ERR_STATE;
    if (!name)
        name_len = 0;
    if (!(c = mem_calloc(1, sizeof *c)) ||
        !(c->name = mem_strndup(name ? name : "", name_len))) {
        mem_free(c);
        return CHAT_ERR_NOMEM;
    }
    c->name_len = name_len;
    c->inst = self;
    c->sid = net_session_id(s);
    c->uid = uid;
    c->cb = cb;
    c->ud = ud;
    plug_ref(self);
    other = net_session_by_user(uid);
    if (other && other != s && !net_session_closing(other)) {
        if (!(flags & CHAT_LOGIN_REPLACE)) {
            c->status = CHAT_ERR_EXISTS;
            if (host_defer(login_deferred, c) != CHAT_OK)
                goto fail;
            return CHAT_OK;
        }
        LOGSI(s, "new login of user %lld replaces session %llu", (long long)uid,
              (unsigned long long)net_session_id(other));
        net_close(other, CHAT_E_REPLACED, "logged in elsewhere");
    }
    if (bus_claim(uid, flags, login_claimed, c) != CHAT_OK)
        goto fail;
    return CHAT_OK;
fail:
    plug_unref(self);
    mem_free(c->name);
    mem_free(c);
    return CHAT_ERR_NOMEM;
}

static int h_session_login(struct chat_plugin *self, struct chat_session *s,
                           int64_t uid, const char *name, int flags,
                           chat_login_cb cb, void *ud)
{
    return h_session_login_len(self, s, uid, name, name ? strlen(name) : 0, flags,
                               cb, ud);
}

static int h_broadcast(struct chat_plugin *self, const char *data, size_t len)
{
    if (!self || !data)
        return CHAT_ERR_INVAL;
    return bus_broadcast(plug_name(self), data, len);
}

/* ---- maps and integers for plugins ------------------------------------ */

struct chat_map {
    struct map m;
};

static struct chat_map *h_map_new(void)
{
    struct chat_map *m = mem_malloc(sizeof *m);
    if (m)
        map_init(&m->m);
    return m;
}

static void h_map_free(struct chat_map *m)
{
    if (m) {
        map_free(&m->m);
        mem_free(m);
    }
}

static void *h_map_get(const struct chat_map *m, int64_t k) { return map_get(&m->m, k); }
static int h_map_put(struct chat_map *m, int64_t k, void *v) { return map_put(&m->m, k, v); }
static void *h_map_del(struct chat_map *m, int64_t k) { return map_del(&m->m, k); }
static size_t h_map_len(const struct chat_map *m) { return m->m.len; }

static int h_map_next(const struct chat_map *m, size_t *it, int64_t *k, void **v)
{
    return map_next(&m->m, it, k, v);
}

static int h_req_int(const struct chat_request *req, const char *key, int64_t *out)
{
    return disp_req_int(req, key, INT64_MIN, INT64_MAX, out);
}

/* ---- metrics (ABI 1.6) ------------------------------------------------ */

static struct chat_metric *h_metric_counter(struct chat_plugin *self, const char *name,
                                            const char *help, const char *const *labels)
{
    return metrics_plugin_register(self, plug_name(self), METRICS_COUNTER, name, help,
                                   labels, NULL, 0);
}

static struct chat_metric *h_metric_gauge(struct chat_plugin *self, const char *name,
                                          const char *help, const char *const *labels)
{
    return metrics_plugin_register(self, plug_name(self), METRICS_GAUGE, name, help,
                                   labels, NULL, 0);
}

static struct chat_metric *h_metric_histogram(struct chat_plugin *self,
                                              const char *name, const char *help,
                                              const char *const *labels,
                                              const double *bounds, size_t nbounds)
{
    return metrics_plugin_register(self, plug_name(self), METRICS_HISTOGRAM, name, help,
                                   labels, bounds, nbounds);
}

static void h_metric_inc(struct chat_metric *m) { metrics_metric_add(m, 1); }

const struct chat_host host_table = {
    .size = sizeof(struct chat_host),
    .abi_major = CHAT_ABI_MAJOR,
    .abi_minor = CHAT_ABI_MINOR,
    .log_level = &log_level,
    .malloc = mem_malloc,
    .realloc = mem_realloc,
    .free = mem_free,
    .strdup = mem_strdup,
    .log = h_log,
    .strerror = h_strerror,
    .register_handler = plug_register_handler,
    .register_hook = plug_register_hook,
    .conf_get = h_conf_get,
    .conf_int = h_conf_int,
    .session_id = h_session_id,
    .session_get = h_session_get,
    .session_proto = h_session_proto,
    .session_user = h_session_user,
    .session_name = h_session_name,
    .session_by_user = h_session_by_user,
    .session_peer = h_session_peer,
    .session_logout = h_session_logout,
    .session_close = h_session_close,
    .send_json = h_send_json,
    .send_raw = h_send_raw,
    .reply = disp_reply,
    .deliver = h_deliver,
    .timer_start = plug_timer_start,
    .timer_stop = plug_timer_stop,
    .req_field_raw = disp_field_raw,
    .req_field_str = disp_field_str,
    .json_quote = h_json_quote,
    .req_auth = h_req_auth,
    .db_query = db_query,
    .db_txn = db_txn,
    .db_error = db_error,
    .db_errno = db_errno,
    .db_errmsg = db_errmsg,
    .db_nrows = db_nrows,
    .db_ncols = db_ncols,
    .db_is_null = db_is_null,
    .db_int = db_int,
    .db_str = db_str,
    .db_affected = db_affected,
    .db_insert_id = db_insert_id,
    .db_sub = db_sub,
    .work = h_work,
    .presence_query = bus_presence_query,
    .session_login = h_session_login,
    .broadcast = h_broadcast,
    .register_login_part = plug_register_login_part,
    .login_ack_begin = ack_begin,
    .login_part_set = ack_part_set,
    .login_proto = ack_proto,
    .session_name_len = net_session_name_len,
    .session_login_len = h_session_login_len,
    .req_forward = disp_forward,
    .req_int = h_req_int,
    .map_new = h_map_new,
    .map_free = h_map_free,
    .map_get = h_map_get,
    .map_put = h_map_put,
    .map_del = h_map_del,
    .map_len = h_map_len,
    .map_next = h_map_next,
    .register_handler_ex = plug_register_handler_ex,
    .deliver_ex = h_deliver_ex,
    .undeliverable_claim = h_undeliverable_claim,
    .delivery_done = h_delivery_done,
    /* ABI 1.5 (login ack) */
    .register_login_messages = plug_register_login_messages,
    .metric_counter = h_metric_counter,
    .metric_gauge = h_metric_gauge,
    .metric_histogram = h_metric_histogram,
    .metric_inc = h_metric_inc,
    .metric_add = metrics_metric_add,
    .metric_set = metrics_metric_set,
    .metric_observe = metrics_metric_observe,
    /* ABI 1.7 (abuse limits) */
    .login_failed = rl_login_failed,
};
