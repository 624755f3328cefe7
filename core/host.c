/*
 * host.c - the function table handed to plugins (struct chat_host).
 *
 * A table and nothing else, like a Redis module's API table: every entry
 * points at a function of a layer below (alloc, log, net, db, bus, the
 * sessions layer in session.c, dispatch, the login ack, the plugin
 * registry), directly or through a one-line adapter that fixes a signature
 * or checks an argument.  What combines several subsystems (login, logout,
 * delivery outcomes, worker jobs) lives in session.c, which also takes the
 * reference on the calling instance that keeps its code loaded while one
 * of its callbacks is pending.  Nothing here keeps state.
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>

#include "core.h"

/* ---- small wrappers --------------------------------------------------- */

static void h_log(struct chat_plugin *self, int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vwrite(level, plug_name(self), fmt, ap);
    va_end(ap);
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

static struct chat_session *h_session_by_user(int64_t uid) { return sess_live(uid); }

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

static int h_broadcast(struct chat_plugin *self, const char *data, size_t len)
{
    if (!self || !data)
        return CHAT_ERR_INVAL;
    return bus_broadcast(plug_name(self), data, len);
}

/* ---- the key-value store (ABI 1.8, auth cache): bus.c, keyed by plugin */

static int h_kv_get(struct chat_plugin *self, const char *key, chat_kv_cb cb,
                    void *ud)
{
    return self ? bus_kv_get(self, plug_name(self), key, cb, ud) : CHAT_ERR_INVAL;
}

static int h_kv_set(struct chat_plugin *self, const char *key, const char *val,
                    size_t len, uint64_t ttl_ms)
{
    return self ? bus_kv_set(plug_name(self), key, val, len, ttl_ms) : CHAT_ERR_INVAL;
}

static int h_kv_del(struct chat_plugin *self, const char *key)
{
    return self ? bus_kv_del(plug_name(self), key) : CHAT_ERR_INVAL;
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
    .strerror = log_strerror,
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
    .session_logout = sess_logout,
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
    .req_auth = sess_req_auth,
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
    .work = sess_work,
    .presence_query = bus_presence_query,
    .session_login = sess_login,
    .broadcast = h_broadcast,
    .register_login_part = plug_register_login_part,
    .login_ack_begin = ack_begin,
    .login_part_set = ack_part_set,
    .login_proto = ack_proto,
    .session_name_len = net_session_name_len,
    .session_login_len = sess_login_len,
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
    .deliver_ex = sess_deliver_ex,
    .undeliverable_claim = sess_undeliverable_claim,
    .delivery_done = sess_delivery_stored,
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
    /* ABI 1.8 (auth cache) */
    .kv_get = h_kv_get,
    .kv_set = h_kv_set,
    .kv_del = h_kv_del,
    /* ABI 1.9 (multi-device) */
    .session_next_device = sess_next_device,
    .deliver_devices = bus_deliver_devices,
    /* ABI 1.10 */
    .msgid_handled = plug_msgid_handled,
};
