/*
 * dispatch.c - from a complete frame to a plugin's msgid handler.
 *
 * The frame is parsed in place by cJSON (per-call end pointer, never the
 * global error pointer).  "proto":2 on any request switches the session to
 * protocol 2 for good, before the handler runs, so the reply to that very
 * request is already in the new shape.  Problems the core can name by
 * itself (not JSON, not an object, no integer msgid, no handler) follow the
 * seed for legacy sessions: a log line and nothing else, the connection
 * stays.  Protocol-2 sessions get one error reply each (msgid 11).
 *
 * Replies are serialised into a loop-wide buffer with
 * cJSON_PrintPreallocated(), falling back to an allocation only for big
 * messages, so the common reply costs no malloc beyond cJSON's nodes.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core.h"

#define PRINT_BUF 16384

static char print_buf[PRINT_BUF];

/* Decoded string fields handed out by host->req_field_str during the
 * current handler call; freed when it returns. */
struct field_copy {
    struct field_copy *next;
    char *data; /* from json_unescape */
};
static struct field_copy *field_copies;

int disp_send_json(struct chat_session *s, const cJSON *obj, int deliver)
{
    int r;
    if (cJSON_PrintPreallocated((cJSON *)obj, print_buf, PRINT_BUF, 0)) {
        size_t n = strlen(print_buf);
        return deliver ? net_deliver(s, print_buf, n) : net_send(s, print_buf, n);
    }
    char *txt = cJSON_PrintUnformatted(obj);
    if (!txt)
        return CHAT_ERR_NOMEM;
    r = deliver ? net_deliver(s, txt, strlen(txt)) : net_send(s, txt, strlen(txt));
    mem_free(txt);
    return r;
}

static int ack_msgid(int req_msgid)
{
    if (req_msgid == CHAT_MSG_LOGIN)
        return CHAT_MSG_LOGIN_ACK;
    if (req_msgid == CHAT_MSG_REG)
        return CHAT_MSG_REG_ACK;
    return CHAT_MSG_ACK;
}

cJSON *disp_reply_object(const struct chat_ack *ack, int errno_, const char *errmsg,
                         const cJSON *body)
{
    cJSON *o = cJSON_CreateObject();
    const cJSON *it;
    if (!o)
        return NULL;
    cJSON_AddNumberToObject(o, "msgid", ack_msgid(ack->msgid));
    if (ack_msgid(ack->msgid) == CHAT_MSG_ACK) {
        if (ack->msgid)
            cJSON_AddNumberToObject(o, "req", ack->msgid);
        else
            cJSON_AddNullToObject(o, "req");
    }
    if (ack->has_seq)
        cJSON_AddNumberToObject(o, "seq", (double)ack->seq);
    cJSON_AddNumberToObject(o, "errno", errno_);
    cJSON_AddStringToObject(o, "errmsg", errmsg ? errmsg : errno_ ? "error" : "ok");
    if (body) {
        cJSON_ArrayForEach(it, body) {
            if (!it->string || cJSON_GetObjectItemCaseSensitive(o, it->string))
                continue;
            cJSON_AddItemToObject(o, it->string, cJSON_Duplicate(it, 1));
        }
    }
    return o;
}

int disp_reply(struct chat_session *s, const struct chat_ack *ack, int errno_,
               const char *errmsg, const cJSON *body)
{
    cJSON *o;
    int r;
    if (net_session_proto(s) != CHAT_PROTO_2)
        return CHAT_OK;
    if (!(o = disp_reply_object(ack, errno_, errmsg, body)))
        return CHAT_ERR_NOMEM;
    r = disp_send_json(s, o, 0);
    cJSON_Delete(o);
    return r;
}

void disp_error(struct chat_session *s, const struct chat_ack *ack, int errno_,
                const char *errmsg)
{
    if (net_session_proto(s) == CHAT_PROTO_2) {
        disp_reply(s, ack, errno_, errmsg, NULL);
        return;
    }
    /* a client sending garbage must not flood the log: at most 20 lines a
     * second, then one line saying how many were left out */
    {
        static uint64_t window;
        static unsigned lines, dropped;
        uint64_t now = uv_now(uv_default_loop()) / 1000;
        if (now != window) {
            if (dropped)
                LOGI("%u more ignored requests were not logged", dropped);
            window = now;
            lines = dropped = 0;
        }
        if (++lines > 20) {
            dropped++;
            return;
        }
    }
    LOGI("session %llu (%s): %s (msgid %d); ignored as the seed does",
         (unsigned long long)net_session_id(s), net_session_peer(s), errmsg,
         ack->msgid);
}

int disp_json_int(const cJSON *o, const char *key, int64_t lo, int64_t hi,
                  int64_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    double d;
    if (!v)
        return 0;
    if (!cJSON_IsNumber(v))
        return -1;
    d = v->valuedouble;
    /* 2^63 is the first double past INT64_MAX: never convert it */
    if (d != floor(d) || d < -9223372036854775808.0 || d >= 9223372036854775808.0 ||
        (int64_t)d < lo || (int64_t)d > hi)
        return -1;
    *out = (int64_t)d;
    return 1;
}

void disp_frame(struct chat_session *s, const char *buf, size_t len)
{
    const char *end = NULL;
    struct chat_ack ack = {0, 0, 0};
    struct chat_request req;
    const struct plug_handler *h;
    cJSON *root;
    int64_t v;
    int r;

    root = cJSON_ParseWithLengthOpts(buf, len, &end, 0);
    if (!root) {
        char msg[64];
        snprintf(msg, sizeof msg, "malformed JSON near byte %ld",
                 end ? (long)(end - buf) : 0L);
        disp_error(s, &ack, CHAT_E_BAD_JSON, msg);
        return;
    }
    if (!cJSON_IsObject(root)) {
        disp_error(s, &ack, CHAT_E_NOT_OBJECT, "request is not a JSON object");
        goto out;
    }
    if (disp_json_int(root, "proto", 2, 2, &v) == 1)
        net_session_set_proto(s, CHAT_PROTO_2);
    if (disp_json_int(root, "seq", INT64_MIN / 2, INT64_MAX / 2, &v) == 1) {
        ack.has_seq = 1;
        ack.seq = v;
    }
    r = disp_json_int(root, "msgid", INT32_MIN, INT32_MAX, &v);
    if (r != 1) {
        disp_error(s, &ack, CHAT_E_BAD_MSGID,
                   r ? "msgid is not an integer" : "msgid is missing");
        goto out;
    }
    ack.msgid = (int)v;
    if (!(h = plug_handler(ack.msgid))) {
        disp_error(s, &ack, CHAT_E_UNKNOWN_MSGID, "unknown msgid");
        goto out;
    }
    req.size = sizeof req;
    req.msgid = ack.msgid;
    req.json = root;
    req.raw = buf;
    req.raw_len = len;
    req.ack = ack;
    plug_ref(h->inst);
    h->fn(s, &req, h->ud);
    plug_unref(h->inst);
out:
    while (field_copies) {
        struct field_copy *f = field_copies;
        field_copies = f->next;
        mem_free(f->data);
        mem_free(f);
    }
    cJSON_Delete(root);
}

/* ---- forwarding ------------------------------------------------------- */

struct fwd_buf {
    char *p;
    size_t len, cap;
    int err;
};

static void fb_add(struct fwd_buf *b, const char *p, size_t n)
{
    if (b->err)
        return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        char *np;
        while (cap < b->len + n)
            cap *= 2;
        if (!(np = mem_realloc(b->p, cap))) {
            b->err = 1;
            return;
        }
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void fb_str(struct fwd_buf *b, const char *s) { fb_add(b, s, strlen(s)); }

static void fb_quoted(struct fwd_buf *b, const char *s, size_t n)
{
    size_t ql;
    char *q = json_quote(s, n, &ql);
    if (!q) {
        b->err = 1;
        return;
    }
    fb_add(b, q, ql);
    mem_free(q);
}

static int is_sep(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || !c; }

/* Can the frame go out as it is?  Sender fields are the session's, each
 * member appears once (a receiver that keeps the last duplicate must see
 * what was checked), and nothing of the sender's connection is in it. */
static int frame_is_forwardable(const struct chat_request *req, int64_t uid,
                                const char *name, size_t name_len)
{
    const cJSON *c, *d;
    const char *raw;
    char num[24];
    size_t len;
    int n;

    for (c = req->json->child; c; c = c->next) {
        if (!c->string || !strcmp(c->string, "seq") || !strcmp(c->string, "proto"))
            return 0;
        for (d = c->next; d; d = d->next)
            if (d->string && !strcmp(d->string, c->string))
                return 0;
    }
    n = snprintf(num, sizeof num, "%lld", (long long)uid);
    raw = json_member_raw(req->raw, req->raw_len, "id", &len);
    if (!raw || len != (size_t)n || memcmp(raw, num, len))
        return 0;
    raw = json_member_raw(req->raw, req->raw_len, "name", &len);
    if (!raw || len < 2 || raw[0] != '"')
        return 0;
    if (!memchr(raw, '\\', len))
        return len - 2 == name_len && !memcmp(raw + 1, name, name_len);
    raw = disp_field_str(req, "name", &len);
    return raw && len == name_len && !memcmp(raw, name, name_len);
}

const char *disp_forward(struct chat_session *s, const struct chat_request *req,
                         size_t *len)
{
    int64_t uid = net_session_user(s);
    size_t name_len, n;
    const char *name = net_session_name_len(s, &name_len), *raw;
    struct fwd_buf b = {NULL, 0, 0, 0};
    struct field_copy *f;
    const cJSON *c, *d;
    char num[48];

    if (!uid)
        return NULL;
    if (frame_is_forwardable(req, uid, name, name_len)) {
        raw = req->raw;
        n = req->raw_len;
        while (n && is_sep(*raw))
            raw++, n--;
        while (n && is_sep(raw[n - 1]))
            n--;
        *len = n;
        return raw;
    }
    snprintf(num, sizeof num, "{\"msgid\":%d,\"id\":%lld,\"name\":", req->msgid,
             (long long)uid);
    fb_str(&b, num);
    fb_quoted(&b, name, name_len);
    for (c = req->json->child; c; c = c->next) {
        const char *k = c->string;
        if (!k || !strcmp(k, "msgid") || !strcmp(k, "id") || !strcmp(k, "name") ||
            !strcmp(k, "seq") || !strcmp(k, "proto"))
            continue;
        for (d = req->json->child; d != c; d = d->next)
            if (d->string && !strcmp(d->string, k))
                break;
        if (d != c)
            continue; /* a duplicate: the first one was copied */
        if (!(raw = json_member_raw(req->raw, req->raw_len, k, &n)))
            continue; /* a key json_member_raw reads differently (\u0000) */
        fb_add(&b, ",", 1);
        fb_quoted(&b, k, strlen(k));
        fb_add(&b, ":", 1);
        fb_add(&b, raw, n);
    }
    fb_add(&b, "}", 1);
    fb_add(&b, "", 1); /* NUL, not counted */
    if (b.err || !(f = mem_malloc(sizeof *f))) {
        mem_free(b.p);
        return NULL;
    }
    f->data = b.p;
    f->next = field_copies;
    field_copies = f;
    *len = b.len - 1;
    return b.p;
}

const char *disp_field_raw(const struct chat_request *req, const char *key,
                           size_t *len)
{
    size_t n = 0;
    const char *p = json_member_raw(req->raw, req->raw_len, key, &n);
    if (len)
        *len = p ? n : 0;
    return p;
}

const char *disp_field_str(const struct chat_request *req, const char *key,
                           size_t *len)
{
    size_t n, outlen;
    const char *raw = json_member_raw(req->raw, req->raw_len, key, &n);
    struct field_copy *f;
    char *dec;

    if (!raw || n < 2 || raw[0] != '"')
        return NULL;
    if (!(dec = json_unescape(raw, n, &outlen)))
        return NULL;
    if (!(f = mem_malloc(sizeof *f))) {
        mem_free(dec);
        return NULL;
    }
    f->data = dec;
    f->next = field_copies;
    field_copies = f;
    if (len)
        *len = outlen;
    return f->data;
}
