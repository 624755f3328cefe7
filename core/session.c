/*
 * session.c - what happens to a session beyond one subsystem: login and
 * logout, its opening and closing, delivery with an outcome, and worker
 * jobs started on a plugin's behalf.
 *
 * This is the sessions layer, above net, db and bus and below the plugin
 * registry (docs/architecture.md).  It combines the subsystems below it
 * (bind the user in net, claim it on the bus) and tells the layer above
 * through the three functions main.c registers with sess_on_plugins():
 * fire an event to the plugins' hooks, and take or drop a reference on a
 * plugin instance, so a reload can never unload code a pending callback
 * will still run.  The layers below reach it the same way: net calls
 * sess_open, sess_closing and sess_proto_error through its callbacks, the
 * bus hands over what it cannot deliver through its own.
 */
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "core.h"

static struct {
    uv_loop_t *loop;
    int (*fire)(int event, const void *arg);
    void (*ref)(struct chat_plugin *p);
    void (*unref)(struct chat_plugin *p);
} up;

void sess_init(uv_loop_t *loop) { up.loop = loop; }

void sess_on_plugins(int (*fire)(int event, const void *arg),
                     void (*ref)(struct chat_plugin *p),
                     void (*unref)(struct chat_plugin *p))
{
    up.fire = fire;
    up.ref = ref;
    up.unref = unref;
}

static int fire(int event, const void *arg) { return up.fire ? up.fire(event, arg) : 0; }

static void ref(struct chat_plugin *p)
{
    if (up.ref)
        up.ref(p);
}

static void unref(struct chat_plugin *p)
{
    if (up.unref)
        up.unref(p);
}

/* s or the first older device after it that is not closing. */
static struct chat_session *first_live(struct chat_session *s)
{
    while (s && net_session_closing(s))
        s = net_session_next_device(s);
    return s;
}

struct chat_session *sess_live(int64_t uid)
{
    return first_live(net_session_by_user(uid));
}

struct chat_session *sess_next_device(const struct chat_session *s)
{
    return s ? first_live(net_session_next_device(s)) : NULL;
}

/* ---- opening and closing (net's callbacks) ---------------------------- */

static void fire_session_n(int event, struct chat_session *s, int64_t uid,
                           int devices)
{
    struct chat_ev_session ev;

    ev.size = sizeof ev;
    ev.session = s;
    ev.user_id = uid;
    ev.devices = devices;
    fire(event, &ev);
}

static void fire_session(int event, struct chat_session *s, int64_t uid)
{
    fire_session_n(event, s, uid, 0);
}

void sess_open(struct chat_session *s) { fire_session(CHAT_EV_SESSION_OPEN, s, 0); }

/* A closing session's last words (protocol 2, closed by the server with a
 * reason), then the user's presence (this device's), then
 * CHAT_EV_SESSION_CLOSE with the user still bound; net unbinds the user
 * after this returns.  Presence goes first so that a presence query made
 * from the hook, queued behind the release on the bus, sees this device
 * gone (multi-device: "was it the last one?"). */
void sess_closing(struct chat_session *s, int errno_, const char *why, int graceful)
{
    int64_t uid = net_session_user(s);

    if (graceful && errno_ && net_session_proto(s) == CHAT_PROTO_2) {
        cJSON *n = cJSON_CreateObject();
        char *txt;
        cJSON_AddNumberToObject(n, "msgid", CHAT_MSG_NOTICE);
        cJSON_AddNumberToObject(n, "errno", errno_);
        cJSON_AddStringToObject(n, "errmsg", why ? why : "closing");
        txt = cJSON_PrintUnformatted(n);
        cJSON_Delete(n);
        if (txt) {
            net_send_last(s, txt, strlen(txt));
            mem_free(txt);
        }
    }
    if (uid)
        bus_release(uid);
    fire_session(CHAT_EV_SESSION_CLOSE, s, uid);
}

/* A problem net found in the byte stream itself (no request to answer). */
void sess_proto_error(struct chat_session *s, int errno_, const char *errmsg)
{
    struct chat_ack ack = {0, 0, 0};
    disp_error(s, &ack, errno_, errmsg);
}

/* ---- logout and request authentication ------------------------------- */

int sess_logout(struct chat_session *s)
{
    int64_t uid = net_session_user(s);
    if (!uid)
        return CHAT_ERR_STATE;
    bus_release(uid); /* first: see sess_closing */
    fire_session(CHAT_EV_LOGOUT, s, uid);
    net_session_unbind(s);
    return CHAT_OK;
}

int64_t sess_req_auth(struct chat_session *s, const struct chat_request *req)
{
    int64_t uid = net_session_user(s), id = 0;
    int r;
    if (!uid) {
        disp_error(s, &req->ack, CHAT_E_NOT_LOGGED_IN, "not logged in");
        return 0;
    }
    if ((r = disp_req_int(req, "id", INT64_MIN, INT64_MAX, &id)) == 0)
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
 * undeliverable event, and freed by sess_delivery_done.  A claimer may
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

void sess_delivery_done(struct chat_delivery *d, int status)
{
    d->cb(status, d->uid, d->ctx.b);
    unref(d->inst);
    mem_free(d);
}

/* The ticket of the undeliverable event being fired, and whether a hook
 * took it (events nest only through a hook delivering again). */
static struct chat_delivery *firing;
static int firing_claimed;

struct chat_delivery *sess_undeliverable_claim(const struct chat_ev_undeliverable *ev)
{
    struct chat_delivery *d;

    if (!ev || ev->size < sizeof *ev || !(d = ev->ticket) || d != firing ||
        firing_claimed)
        return NULL;
    firing_claimed = 1;
    return d;
}

void sess_delivery_stored(struct chat_delivery *d, int status)
{
    if (!d)
        return;
    if (status == CHAT_OK)
        metrics_loop.deliveries[METRICS_ROUTE_STORED]++;
    sess_delivery_done(d, status);
}

void sess_undeliverable_t(int64_t uid, const char *json, size_t len,
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
    n = fire(CHAT_EV_UNDELIVERABLE, &ev); /* d may be freed by now */
    claimed = firing_claimed;
    firing = outer;
    firing_claimed = outer_claimed;
    if (d && !claimed) {
        LOGD("message for user %lld is undeliverable and no plugin took it; "
             "its sender is told", (long long)uid);
        sess_delivery_done(d, CHAT_ERR_UNAVAILABLE);
        return;
    }
    if (n == 0)
        LOGW("message for user %lld is undeliverable and no plugin stores such "
             "messages (enable the offline plugin); dropped: %.*s",
             (long long)uid, (int)(len > 200 ? 200 : len), json);
}

void sess_undeliverable(int64_t uid, const char *json, size_t len)
{
    sess_undeliverable_t(uid, json, len, NULL);
}

int sess_deliver_ex(struct chat_plugin *self, int64_t from, int64_t uid,
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
    ref(self);
    if ((rc = bus_deliver_t(uid, json, len, d)) == CHAT_DELIVER_PENDING)
        return rc; /* the bus owns d now */
    unref(self); /* CHAT_OK (went out locally after all) or an error */
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

void sess_set_work_nice(int nice) { work_nice = nice; }

static void work_after(uv_work_t *req, int status)
{
    struct work_job *j = container_of(req, struct work_job, req);
    j->done(status == UV_ECANCELED ? CHAT_ERR_CLOSED : CHAT_OK, j->ud);
    unref(j->inst);
    mem_free(j);
}

int sess_work(struct chat_plugin *self, chat_work_fn fn, chat_done_fn done, void *ud)
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
    if (uv_queue_work(up.loop, &j->req, work_run, work_after) != 0) {
        mem_free(j);
        return CHAT_ERR_BUSY;
    }
    ref(self);
    return CHAT_OK;
}

/* ---- login ------------------------------------------------------------ */

struct login_ctx {
    struct chat_plugin *inst;
    uint64_t sid;
    int64_t uid;
    int status;    /* for the local refusal path */
    int flags;     /* CHAT_LOGIN_* */
    char *name;
    size_t name_len;
    chat_login_cb cb;
    void *ud;
};

static void login_finish(struct login_ctx *c, int status)
{
    c->cb(status, c->sid, c->ud);
    unref(c->inst);
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
    int r, devices;

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
    devices = bus_claim_devices();
    if ((r = net_session_bind_ex(s, c->uid, c->name, c->name_len,
                                 (c->flags & CHAT_LOGIN_MULTI) != 0)) != CHAT_OK) {
        bus_release(c->uid);
        login_finish(c, r);
        return;
    }
    fire_session_n(CHAT_EV_LOGIN, s, c->uid, devices > 0 ? devices : 1);
    login_finish(c, CHAT_OK);
}

int sess_login_len(struct chat_plugin *self, struct chat_session *s, int64_t uid,
                   const char *name, size_t name_len, int flags, chat_login_cb cb,
                   void *ud)
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
    c->flags = flags;
    ref(self);
    /* multi-device: the user's other sessions here stay (the bus counts
     * them against the login's maximum) */
    other = (flags & CHAT_LOGIN_MULTI) ? NULL : net_session_by_user(uid);
    if (other && other != s && !net_session_closing(other)) {
        if (!(flags & CHAT_LOGIN_REPLACE)) {
            c->status = CHAT_ERR_EXISTS;
            if (defer_call(login_deferred, c) != CHAT_OK)
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
    unref(self);
    mem_free(c->name);
    mem_free(c);
    return CHAT_ERR_NOMEM;
}

int sess_login(struct chat_plugin *self, struct chat_session *s, int64_t uid,
               const char *name, int flags, chat_login_cb cb, void *ud)
{
    return sess_login_len(self, s, uid, name, name ? strlen(name) : 0, flags, cb, ud);
}
