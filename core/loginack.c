/*
 * loginack.c - the login acknowledgement, assembled from plugin parts and
 * bounded in bytes.
 *
 * The seed's login ack carries the friend list, the group list and the
 * offline messages, which belong to three plugins that must not know each
 * other (or the login plugin).  The login plugin starts an assembly; every
 * plugin that registered a login part gets its own slot (the struct
 * chat_login it is handed) and answers once, now or later.  The ack is sent
 * when every slot has answered or the part timeout has passed (a late part
 * is logged and left out).  While the ack is pending the session holds
 * messages delivered to it, so nothing overtakes the ack.
 *
 * One ack is at most login_ack_max bytes on the wire, and for a legacy
 * session at most LEGACY_ACK_MAX: the seed client reads its ack with one
 * recv() of 1,024 bytes into a char[1024] and parses it as a C string, so
 * 1,023 bytes (the '\n' included) leave room for the NUL it relies on.  The
 * base always goes.  Then the list parts (register_login_part) take what
 * fits, element by element in order, and are cut there: protocol 2 names
 * them in "truncated" (FRIEND_LIST and GROUP_LIST give the rest), legacy
 * keeps the seed's shape.  Protocol 2 also learns how many messages follow
 * ("following").  Lists go first because what is cut from them is
 * gone for a legacy client, while messages are not: the parts of messages
 * (register_login_messages) take what is left, and the messages that did
 * not fit follow the ack in order as ordinary messages.  They are queued one
 * batch at a time (legacy: one message per write), each batch when the one
 * before it has been written, so a long backlog never sits in the output
 * buffer at once and never trips max_output.  Live deliveries stay held
 * until the last batch is written, and go out in a write of their own.
 *
 * Once the ack has reached the socket, each list part's sent function
 * learns it (ok=1); a part that was left out or a session that closed first
 * gets ok=0.  A part of messages learns after every write how many of its
 * messages have been written, so the offline plugin deletes exactly those.
 *
 * The assembly lives until the ack and whatever follows it have been
 * written (or the session closed) and every slot has answered, because a
 * slow plugin may still answer after the timeout.
 *
 * The login ack sits in the sessions layer, below the plugin registry: it
 * learns the registered parts, their plugins' names and keeps their code
 * loaded through the functions main.c registers with ack_on_plugins().
 */
#include <stdint.h>
#include <string.h>

#include "core.h"

#define LEGACY_ACK_MAX 1023

struct assembly;

/* One part's slot; this is what plugins see as struct chat_login. */
struct chat_login {
    struct assembly *a;
    struct plug_login_part part; /* inst referenced until notified */
    cJSON *value;    /* the answer; a part of messages keeps it to the end */
    cJSON *shown;    /* what goes into the ack */
    cJSON *cursor;   /* a part of messages: the next one to follow the ack */
    void *state;
    /* parts of messages: elements in all, in the ack, queued, written, and
     * the count last reported to written_fn */
    size_t total, in_ack, next, written, reported;
    int answered, included, notified, cut;
};

struct assembly {
    uv_timer_t timer;    /* the part timeout */
    uint64_t sid;
    int64_t uid;
    int proto;
    size_t max;      /* bytes of this ack on the wire, '\n' included */
    struct chat_ack ack;
    cJSON *body;
    struct chat_plugin *starter;
    chat_login_done_fn done;
    void *ud;
    struct chat_login *slots;
    size_t nslots, unanswered;
    int sent, closed_timer;
    int following;   /* the ack is queued; messages may follow; hold is on */
    int halted;      /* a message could not be queued: stop after this batch */
};

static int part_timeout_ms = 2000;
static size_t ack_max = 65536;
static size_t batch_max = 65536; /* bytes of one batch that follows an ack */
static uv_loop_t *ack_loop;
static struct ack_plugins up;

void ack_init(uv_loop_t *loop, const struct ack_plugins *plugins)
{
    ack_loop = loop;
    up = *plugins;
}

void ack_configure(const struct conf *c)
{
    part_timeout_ms = c->login_part_timeout_ms > 0 ? c->login_part_timeout_ms : 2000;
    ack_max = c->login_ack_max >= 1024 ? c->login_ack_max : 65536;
    /* well inside max_output, which counts what is pending before each
     * message of a batch */
    batch_max = c->max_output / 2 < ack_max ? c->max_output / 2 : ack_max;
}

int ack_proto(const struct chat_login *l) { return l->a->proto; }

static int is_messages(const struct chat_login *l) { return l->part.written_fn != NULL; }

static void assembly_closed(uv_handle_t *h)
{
    struct assembly *a = container_of((uv_timer_t *)h, struct assembly, timer);
    for (size_t i = 0; i < a->nslots; i++) {
        cJSON_Delete(a->slots[i].value);
        cJSON_Delete(a->slots[i].shown);
    }
    mem_free(a->slots);
    mem_free(a);
}

/* Free when sent, followed up and every slot answered. */
static void maybe_free(struct assembly *a)
{
    if (!a->sent || a->unanswered || a->following || a->closed_timer)
        return;
    a->closed_timer = 1;
    uv_close((uv_handle_t *)&a->timer, assembly_closed);
}

/* The last word to a part: sent_fn(ok), or written_fn(written, last=1). */
static void notify(struct chat_login *l, int ok)
{
    if (l->notified)
        return;
    l->notified = 1;
    if (is_messages(l))
        l->part.written_fn(l->written, 1, l->a->uid, l->state, l->part.ud);
    else if (l->part.sent_fn)
        l->part.sent_fn(ok, l->a->uid, l->state, l->part.ud);
    cJSON_Delete(l->value);
    l->value = NULL;
    up.unref(l->part.inst);
}

/* A part of messages: tell it how many are written now. */
static void progress(struct chat_login *l)
{
    if (l->notified)
        return;
    if (l->written == l->total) {
        notify(l, 1);
        return;
    }
    if (l->written > l->reported) {
        l->reported = l->written;
        l->part.written_fn(l->written, 0, l->a->uid, l->state, l->part.ud);
    }
}

/* ---- fitting the ack into its bound --------------------------------- */

struct fit {
    size_t size;   /* bytes of the ack so far */
    size_t limit;  /* bytes of JSON text allowed ('\n' not counted) */
    int legacy;
};

/* ,"key":[] */
static size_t key_len(const char *key) { return strlen(key) + 6; }

/* Bytes of an element as cJSON prints it (SIZE_MAX when unknown). */
static size_t item_len(const cJSON *it)
{
    char *t;
    size_t n;

    if (cJSON_IsRaw(it) && it->valuestring)
        return strlen(it->valuestring);
    if (!(t = cJSON_PrintUnformatted(it)))
        return SIZE_MAX;
    n = strlen(t);
    cJSON_free(t);
    return n;
}

static int take(struct fit *f, size_t n)
{
    if (n == SIZE_MAX || f->size + n > f->limit)
        return 0;
    f->size += n;
    return 1;
}

/* A message's text: a raw item's own text, or *tmp (cJSON_free it). */
static const char *message_text(const cJSON *it, char **tmp, size_t *len)
{
    const char *t = cJSON_IsRaw(it) ? it->valuestring : (*tmp = cJSON_PrintUnformatted(it));
    *len = t ? strlen(t) : 0;
    return t;
}

/* A list part: keep the elements that fit, in order; delete the rest. */
static void fit_list(struct fit *f, struct chat_login *l)
{
    cJSON *arr = l->value, *it, *next;
    size_t k = 0;

    l->value = NULL;
    if (!arr) {
        l->shown = f->legacy ? NULL : cJSON_CreateArray();
        return;
    }
    if (!cJSON_IsArray(arr)) { /* not a list: all or nothing */
        size_t n = item_len(arr);
        if (n != SIZE_MAX)
            n = f->legacy ? n + key_len(l->part.key) - 2 : n > 2 ? n - 2 : 0;
        if (take(f, n)) {
            l->shown = arr;
        } else {
            l->cut = 1;
            l->shown = f->legacy ? NULL : cJSON_CreateArray();
            cJSON_Delete(arr);
        }
        return;
    }
    for (it = arr->child; it; it = it->next, k++) {
        size_t n = item_len(it);
        if (n != SIZE_MAX)
            n += k ? 1 : f->legacy ? key_len(l->part.key) : 0;
        if (!take(f, n))
            break;
    }
    if (it)
        l->cut = 1;
    for (; it; it = next) {
        next = it->next;
        cJSON_Delete(cJSON_DetachItemViaPointer(arr, it));
    }
    if (f->legacy && k == 0) { /* the seed leaves an empty list out */
        cJSON_Delete(arr);
        arr = NULL;
    }
    l->shown = arr;
}

/* One message as an element of the ack: the object for protocol 2, a
 * JSON string of its text for legacy (the seed's shape).  NULL when it
 * does not fit (or memory ran out: it follows the ack then). */
static cJSON *message_item(struct fit *f, const char *text, size_t len, size_t k,
                           const char *key)
{
    size_t extra = k ? 1 : f->legacy ? key_len(key) : 0;
    cJSON *item = NULL;
    char *q;

    if (!f->legacy)
        return take(f, len + extra) ? cJSON_CreateRaw(text) : NULL;
    if (!(q = json_quote(text, len, &len)))
        return NULL;
    if (take(f, len + extra) && !(item = cJSON_CreateRaw(q)))
        f->size -= len + extra;
    mem_free(q);
    return item;
}

/* A part of messages: the first ones that fit go into the ack; l->value
 * keeps them all for what follows. */
static void fit_messages(struct fit *f, struct chat_login *l)
{
    cJSON *out = cJSON_CreateArray(), *it, *item;
    size_t k = 0, len;

    l->total = cJSON_IsArray(l->value) ? (size_t)cJSON_GetArraySize(l->value) : 0;
    for (it = l->total ? l->value->child : NULL; out && it; it = it->next, k++) {
        char *tmp = NULL;
        const char *text = message_text(it, &tmp, &len);

        item = text ? message_item(f, text, len, k, l->part.key) : NULL;
        cJSON_free(tmp);
        if (!item)
            break;
        cJSON_AddItemToArray(out, item);
    }
    l->in_ack = l->next = k;
    l->cursor = it;
    if (out && f->legacy && k == 0) {
        cJSON_Delete(out);
        out = NULL;
    }
    l->shown = out;
}

/* Decide what of every included part goes into the ack.  Protocol 2
 * reserves its always-present keys and the "truncated" and "following"
 * markers first. */
static void fit_parts(struct assembly *a, size_t base_len)
{
    struct fit f = {base_len, a->max - 1, a->proto != CHAT_PROTO_2};
    size_t i, key;

    if (!f.legacy) {
        f.size += 15 + 15; /* ,"truncated":[] ,"following":{} */
        for (i = 0; i < a->nslots; i++) {
            if (!a->slots[i].included)
                continue;
            key = strlen(a->slots[i].part.key);
            f.size += key_len(a->slots[i].part.key);
            /* "key", in truncated; "key":N, in following */
            f.size += is_messages(&a->slots[i]) ? key + 4 + 20 : key + 3;
        }
    }
    for (i = 0; i < a->nslots; i++)
        if (a->slots[i].included && !is_messages(&a->slots[i]))
            fit_list(&f, &a->slots[i]);
    for (i = 0; i < a->nslots; i++)
        if (a->slots[i].included && is_messages(&a->slots[i]))
            fit_messages(&f, &a->slots[i]);
}

/* The ack object: base, the parts in slot order, then for protocol 2 the
 * lists that were cut ("truncated") and how many messages follow. */
static void add_parts(struct assembly *a, cJSON *obj)
{
    cJSON *cut = NULL, *follow = NULL;
    int p2 = a->proto == CHAT_PROTO_2;

    for (size_t i = 0; i < a->nslots; i++) {
        struct chat_login *l = &a->slots[i];
        if (!l->included)
            continue;
        if (l->cut && p2 && (cut || (cut = cJSON_CreateArray())))
            cJSON_AddItemToArray(cut, cJSON_CreateString(l->part.key));
        if (is_messages(l) && l->total > l->in_ack && p2 &&
            (follow || (follow = cJSON_CreateObject())))
            cJSON_AddNumberToObject(follow, l->part.key, (double)(l->total - l->in_ack));
        if (!l->shown)
            continue;
        cJSON_DeleteItemFromObjectCaseSensitive(obj, l->part.key);
        cJSON_AddItemToObject(obj, l->part.key, l->shown);
        l->shown = NULL;
    }
    if (cut)
        cJSON_AddItemToObject(obj, "truncated", cut);
    if (follow)
        cJSON_AddItemToObject(obj, "following", follow);
}

/* ---- the messages that follow the ack -------------------------------- */

static void follow_next(struct assembly *a);


/* Nothing more follows: release the held deliveries, last word to the
 * parts of messages. */
static void follow_done(struct assembly *a)
{
    struct chat_session *s = net_session_get(a->sid);

    if (s && !net_session_closing(s)) {
        net_hold(s, 0);
    }
    a->following = 0;
    for (size_t i = 0; i < a->nslots; i++)
        if (a->slots[i].included)
            notify(&a->slots[i], 0);
    maybe_free(a);
}

/* What was queued so far has been written (ok=0: the session closed). */
static void on_written_out(int ok, void *ud)
{
    struct assembly *a = ud;

    for (size_t i = 0; ok && i < a->nslots; i++) {
        struct chat_login *l = &a->slots[i];
        if (!l->included || l->notified)
            continue;
        if (is_messages(l)) {
            l->written = l->next;
            progress(l);
        } else {
            notify(l, 1);
        }
    }
    if (!ok || a->halted)
        follow_done(a);
    else
        follow_next(a);
}

/* Queue the next batch of messages that did not fit in the ack: at least
 * one, up to batch_max bytes.  Legacy: exactly one, so that net's pace
 * (legacy_pace_ms) spaces them like any other messages to the seed
 * client. */
static void follow_next(struct assembly *a)
{
    struct chat_session *s = net_session_get(a->sid);
    size_t bytes = 0, queued = 0, len;

    if (!s || net_session_closing(s)) {
        follow_done(a);
        return;
    }
    for (size_t i = 0; i < a->nslots; i++) {
        struct chat_login *l = &a->slots[i];
        cJSON *it;

        if (!l->included || l->notified || !is_messages(l))
            continue;
        for (it = l->cursor; it; it = l->cursor = it->next) {
            char *tmp = NULL;
            const char *text = message_text(it, &tmp, &len);
            int rc;

            if (queued && (a->proto != CHAT_PROTO_2 || bytes + len + 1 > batch_max)) {
                cJSON_free(tmp);
                goto queued;
            }
            rc = text ? net_send(s, text, len) : CHAT_ERR_NOMEM;
            cJSON_free(tmp);
            if (rc != CHAT_OK) {
                LOGW("login of user %lld: %zu stored messages could not follow "
                     "the ack (%s); they come with the next login", (long long)a->uid,
                     l->total - l->next, log_strerror(rc));
                a->halted = 1;
                goto queued;
            }
            l->next++;
            queued++;
            bytes += len + 1;
        }
    }
queued:
    if (queued && net_on_flushed(s, on_written_out, a) == CHAT_OK)
        return;
    follow_done(a);
}

/* ---- sending the ack ------------------------------------------------- */

/* Queue the ack; its parts are notified once it has been written. */
static int queue_ack(struct assembly *a, struct chat_session *s, cJSON *obj)
{
    char *txt;
    size_t len;
    int status;

    for (size_t i = 0; i < a->nslots; i++) {
        struct chat_login *l = &a->slots[i];
        if (!l->answered) {
            LOGW("login of user %lld: part \"%s\" of plugin %s did not answer "
                 "within %d ms; ack sent without it", (long long)a->uid,
                 l->part.key, up.name(l->part.inst), part_timeout_ms);
            continue;
        }
        l->included = 1;
    }
    if (!(txt = cJSON_PrintUnformatted(obj)))
        return CHAT_ERR_NOMEM;
    fit_parts(a, strlen(txt));
    cJSON_free(txt);
    add_parts(a, obj);
    if (!(txt = cJSON_PrintUnformatted(obj)))
        return CHAT_ERR_NOMEM;
    len = strlen(txt);
    if (len + 1 > a->max) /* fit_parts counts exactly; this is a bug */
        LOGE("login of user %lld: ack of %zu bytes is over its bound of %zu",
             (long long)a->uid, len + 1, a->max);
    status = net_send(s, txt, len);
    cJSON_free(txt);
    if (status == CHAT_OK && (status = net_on_flushed(s, on_written_out, a)) == CHAT_OK)
        a->following = 1; /* on_written_out notifies the included parts */
    return status;
}

static void send_ack(struct assembly *a)
{
    struct chat_session *s = net_session_get(a->sid);
    cJSON *obj = NULL;
    int status = CHAT_ERR_CLOSED;

    a->sent = 1;
    uv_timer_stop(&a->timer);
    a->max = a->proto == CHAT_PROTO_2 || ack_max < LEGACY_ACK_MAX ? ack_max : LEGACY_ACK_MAX;
    if (s) {
        obj = a->proto == CHAT_PROTO_2 ? disp_reply_object(&a->ack, 0, NULL, a->body)
                                       : cJSON_Duplicate(a->body, 1);
    }
    if (obj) {
        status = queue_ack(a, s, obj);
        cJSON_Delete(obj);
    }
    if (!a->following) { /* nothing (more) to follow: deliveries go on */
        if (s)
            net_hold(s, 0);
        for (size_t i = 0; i < a->nslots; i++)
            a->slots[i].included = 0;
    }
    /* parts not included (or nothing sent) learn it now */
    for (size_t i = 0; i < a->nslots; i++) {
        struct chat_login *l = &a->slots[i];
        if (l->answered && !l->included)
            notify(l, 0);
    }
    if (a->done)
        a->done(status == CHAT_OK ? CHAT_OK : CHAT_ERR_CLOSED, a->sid, a->ud);
    up.unref(a->starter);
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
    if (a->sent)
        return;
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
    size_t n = up.parts ? up.parts(&parts) : 0;
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
        up.ref(parts[i].inst);
    }
    up.ref(self);
    uv_timer_init(ack_loop, &a->timer);
    net_hold(s, 1);
    if (defer_call(start_parts, a) != CHAT_OK) {
        net_hold(s, 0);
        for (size_t i = 0; i < n; i++)
            up.unref(parts[i].inst);
        up.unref(self);
        cJSON_Delete(a->body);
        a->sent = 1;
        a->unanswered = 0;
        maybe_free(a);
        return CHAT_ERR_NOMEM;
    }
    uv_timer_start(&a->timer, on_timeout, (uint64_t)part_timeout_ms, 0);
    return CHAT_OK;
}
