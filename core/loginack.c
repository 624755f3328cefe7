/*
 * loginack.c - the login acknowledgement, assembled from plugin parts.
 *
 * The seed's login ack carries the friend list, the group list and the
 * offline messages, which belong to three plugins that must not know each
 * other (or the login plugin).  The login plugin starts an assembly; every
 * plugin that registered a login part gets its own slot (the struct
 * chat_login it is handed) and answers once, now or later.  The ack is sent
 * when every slot has answered or the part timeout has passed (a late part
 * is logged and left out).  While the ack is pending the session holds
 * messages delivered to it, so nothing overtakes the ack; they follow it in
 * the same write.  Once the ack has reached the socket, each part's sent
 * function learns it (ok=1), so the offline plugin deletes exactly what the
 * client was given; a part that was left out or a session that closed
 * first gets ok=0.
 *
 * The assembly lives until it has been sent, written out (or the session
 * closed) and every slot has answered, because a slow plugin may still
 * answer after the timeout and a paced or slow write may finish later.
 */
#include <string.h>

#include "core.h"

struct assembly;

/* One part's slot; this is what plugins see as struct chat_login. */
struct chat_login {
    struct assembly *a;
    struct plug_login_part part; /* inst referenced until sent_fn ran */
    cJSON *value;
    void *state;
    int answered, included, notified;
};

struct assembly {
    uv_timer_t timer;
    uint64_t sid;
    int64_t uid;
    int proto;
    struct chat_ack ack;
    cJSON *body;
    struct chat_plugin *starter;
    chat_login_done_fn done;
    void *ud;
    struct chat_login *slots;
    size_t nslots, unanswered;
    int sent, closed_timer;
    int flushing; /* on_flushed is still to come (the write may be paced or slow) */
};

static int part_timeout_ms = 2000;
static uv_loop_t *ack_loop;

void ack_configure(int ms) { part_timeout_ms = ms > 0 ? ms : 2000; }

int ack_proto(const struct chat_login *l) { return l->a->proto; }

static void assembly_closed(uv_handle_t *h)
{
    struct assembly *a = container_of((uv_timer_t *)h, struct assembly, timer);
    mem_free(a->slots);
    mem_free(a);
}

/* Free when sent and every slot answered. */
static void maybe_free(struct assembly *a)
{
    if (!a->sent || a->unanswered || a->closed_timer || a->flushing)
        return;
    a->closed_timer = 1;
    uv_close((uv_handle_t *)&a->timer, assembly_closed);
}

static void notify(struct chat_login *l, int ok)
{
    if (l->notified)
        return;
    l->notified = 1;
    if (l->part.sent_fn)
        l->part.sent_fn(ok, l->a->uid, l->state, l->part.ud);
    plug_unref(l->part.inst);
}

static void on_flushed(int ok, void *ud)
{
    struct assembly *a = ud;
    a->flushing = 0;
    for (size_t i = 0; i < a->nslots; i++)
        if (a->slots[i].included)
            notify(&a->slots[i], ok);
    maybe_free(a);
}

static void add_part(cJSON *obj, struct chat_login *l, int proto)
{
    cJSON *v = l->value;
    l->value = NULL;
    if (proto != CHAT_PROTO_2 && (!v || (cJSON_IsArray(v) && !cJSON_GetArraySize(v)))) {
        cJSON_Delete(v);
        return;
    }
    if (!v)
        v = cJSON_CreateArray();
    cJSON_DeleteItemFromObjectCaseSensitive(obj, l->part.key);
    cJSON_AddItemToObject(obj, l->part.key, v);
}

static void send_ack(struct assembly *a)
{
    struct chat_session *s = net_session_get(a->sid);
    cJSON *obj = NULL;
    int status = CHAT_ERR_CLOSED;

    a->sent = 1;
    uv_timer_stop(&a->timer);
    if (s) {
        obj = a->proto == CHAT_PROTO_2 ? disp_reply_object(&a->ack, 0, NULL, a->body)
                                       : cJSON_Duplicate(a->body, 1);
    }
    if (obj) {
        for (size_t i = 0; i < a->nslots; i++) {
            struct chat_login *l = &a->slots[i];
            if (!l->answered) {
                LOGW("login of user %lld: part \"%s\" of plugin %s did not answer "
                     "within %d ms; ack sent without it", (long long)a->uid,
                     l->part.key, plug_name(l->part.inst), part_timeout_ms);
                continue;
            }
            l->included = 1;
            add_part(obj, l, a->proto);
        }
        status = disp_send_json(s, obj, 0);
        cJSON_Delete(obj);
        net_hold(s, 0);
        if (status == CHAT_OK && net_on_flushed(s, on_flushed, a) == CHAT_OK) {
            a->flushing = 1; /* on_flushed notifies the included parts */
        } else {
            for (size_t i = 0; i < a->nslots; i++)
                a->slots[i].included = 0;
        }
    }
    /* parts not included (or nothing sent) learn it now */
    for (size_t i = 0; i < a->nslots; i++) {
        struct chat_login *l = &a->slots[i];
        if (l->answered && !l->included)
            notify(l, 0);
    }
    if (a->done)
        a->done(status == CHAT_OK ? CHAT_OK : CHAT_ERR_CLOSED, a->sid, a->ud);
    plug_unref(a->starter);
    cJSON_Delete(a->body);
    a->body = NULL;
    maybe_free(a);
}

void ack_part_set(struct chat_login *l, cJSON *value, void *state)
{
    struct assembly *a = l->a;
    if (l->answered) {
        LOGW("login part \"%s\" answered twice; ignored", l->part.key);
        cJSON_Delete(value);
        return;
    }
    l->answered = 1;
    l->state = state;
    a->unanswered--;
    if (a->sent) { /* too late */
        cJSON_Delete(value);
        notify(l, 0);
        maybe_free(a);
        return;
    }
    l->value = value;
    if (a->unanswered == 0)
        send_ack(a);
}

static void on_timeout(uv_timer_t *t)
{
    struct assembly *a = container_of(t, struct assembly, timer);
    if (!a->sent)
        send_ack(a);
}

/* Ask every part, on the loop iteration after ack_begin returned. */
static void start_parts(void *arg)
{
    struct assembly *a = arg;
    if (a->nslots == 0) {
        send_ack(a);
        return;
    }
    for (size_t i = 0; i < a->nslots && !a->sent; i++) {
        struct chat_login *l = &a->slots[i];
        l->part.part_fn(l, a->uid, a->proto, l->part.ud);
    }
}

int ack_begin(struct chat_plugin *self, struct chat_session *s,
              const struct chat_ack *ack, const cJSON *base,
              chat_login_done_fn done_fn, void *ud)
{
    const struct plug_login_part *parts;
    size_t n = plug_login_parts(&parts);
    struct assembly *a;

    if (!s || !ack || !base || !cJSON_IsObject(base))
        return CHAT_ERR_INVAL;
    if (net_session_closing(s))
        return CHAT_ERR_CLOSED;
    if (!(a = mem_calloc(1, sizeof *a)))
        return CHAT_ERR_NOMEM;
    a->slots = mem_calloc(n + 1, sizeof *a->slots);
    a->body = cJSON_Duplicate(base, 1);
    if (!a->slots || !a->body) {
        cJSON_Delete(a->body);
        mem_free(a->slots);
        mem_free(a);
        return CHAT_ERR_NOMEM;
    }
    if (!ack_loop)
        ack_loop = uv_default_loop();
    a->sid = net_session_id(s);
    a->uid = net_session_user(s);
    a->proto = net_session_proto(s);
    a->ack = *ack;
    a->starter = self;
    a->done = done_fn;
    a->ud = ud;
    a->nslots = a->unanswered = n;
    for (size_t i = 0; i < n; i++) {
        a->slots[i].a = a;
        a->slots[i].part = parts[i];
        plug_ref(parts[i].inst);
    }
    plug_ref(self);
    uv_timer_init(ack_loop, &a->timer);
    net_hold(s, 1);
    if (host_defer(start_parts, a) != CHAT_OK) {
        net_hold(s, 0);
        for (size_t i = 0; i < n; i++)
            plug_unref(parts[i].inst);
        plug_unref(self);
        cJSON_Delete(a->body);
        a->sent = 1;
        a->unanswered = 0;
        maybe_free(a);
        return CHAT_ERR_NOMEM;
    }
    uv_timer_start(&a->timer, on_timeout, (uint64_t)part_timeout_ms, 0);
    return CHAT_OK;
}
