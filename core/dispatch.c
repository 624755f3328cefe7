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
 * Before any of that, one strict pass (json_scan_object) validates the frame
 * as RFC 8259 JSON in UTF-8 and records its top-level members; a frame with
 * more than max_members of them, or with a key twice (compared after
 * decoding escapes, so "i\u0064" repeats "id"), is refused whole.  What a
 * handler checked is then what every receiving parser reads, whichever
 * duplicate it would have kept.
 *
 * Replies are serialised into a loop-wide buffer with
 * cJSON_PrintPreallocated(), falling back to an allocation only for big
 * messages, so the common reply costs no malloc beyond cJSON's nodes.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
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
    if (ack->has_seq) { /* as text: cJSON prints big doubles with 15 digits */
        char num[24];
        snprintf(num, sizeof num, "%lld", (long long)ack->seq);
        cJSON_AddRawToObject(o, "seq", num);
    }
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
    if (errno_)
        metrics_loop.errors[metrics_msgid_slot(ack->msgid)]++;
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
    metrics_loop.errors[metrics_msgid_slot(ack->msgid)]++;
    /* a client sending garbage must not flood the log: at most 20 lines a
     * second, then one line saying how many were left out */
    {
        static uint64_t window;
        static unsigned lines, dropped;
        uint64_t now = uv_hrtime() / 1000000000;
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
    LOGSI(s, "%s (msgid %d); ignored as the seed does", errmsg, ack->msgid);
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

/* The current request's top-level members, recorded by the validating scan
 * (dispatch is not re-entered while a handler runs).  A frame may have at
 * most max_members of them, so the array never needs to grow. */
static struct json_span spans[JSON_SPAN_DUP_MAX];
static struct json_span *cur_spans; /* spans while a request is handled */
static long nmembers;
static size_t max_members = DISP_MAX_MEMBERS_DEF;
static const struct chat_request *cur_req;

void disp_configure(size_t members)
{
    max_members = members >= 1 && members <= JSON_SPAN_DUP_MAX ? members
                                                                 : DISP_MAX_MEMBERS_DEF;
}

/* The members of req (the request being handled) as spans. */
static const struct json_span *req_spans(const struct chat_request *req, size_t *n)
{
    if (req != cur_req || !cur_spans)
        return NULL;
    *n = (size_t)nmembers;
    return cur_spans;
}

/* A JSON number's text as an integer in [lo, hi]: 1, or -1.  Plain
 * integer text is read exactly (strtoll); other forms ("1e3", "2.0") go
 * through a double and count only within 2^53, where doubles are exact. */
static int span_int(const struct json_span *m, int64_t lo, int64_t hi, int64_t *out)
{
    char num[40], *end;
    double d;
    if (!m->vlen || m->vlen >= sizeof num || (m->val[0] != '-' && (m->val[0] < '0' || m->val[0] > '9')))
        return -1;
    memcpy(num, m->val, m->vlen);
    num[m->vlen] = '\0';
    if (strspn(num + (num[0] == '-'), "0123456789") == m->vlen - (num[0] == '-')) {
        long long ll;
        errno = 0;
        ll = strtoll(num, &end, 10);
        if (errno || ll < lo || ll > hi)
            return -1;
        *out = (int64_t)ll;
        return 1;
    }
    d = strtod(num, NULL);
    if (d > 9007199254740992.0 || d < -9007199254740992.0)
        return -1;
    if (d != floor(d) || d < -9223372036854775808.0 || d >= 9223372036854775808.0 ||
        (int64_t)d < lo || (int64_t)d > hi)
        return -1;
    *out = (int64_t)d;
    return 1;
}

int disp_req_int(const struct chat_request *req, const char *key, int64_t lo,
                 int64_t hi, int64_t *out)
{
    size_t n;
    const struct json_span *m = req_spans(req, &n);
    if (m) {
        const struct json_span *f = json_span_find(m, n, key);
        return f ? span_int(f, lo, hi, out) : 0;
    }
    return req->json ? disp_json_int(req->json, key, lo, hi, out) : 0;
}

/* Why a frame the strict scan refused is bad, in cJSON's words. */
static void refuse_frame(struct chat_session *s, const char *buf, size_t len, long why)
{
    struct chat_ack ack = {0, 0, 0};
    const char *end = NULL;
    char msg[96];
    cJSON *root;

    if (why == JSON_SCAN_UTF8) {
        disp_error(s, &ack, CHAT_E_BAD_FIELD, "a string is not valid UTF-8");
        return;
    }
    root = cJSON_ParseWithLengthOpts(buf, len, &end, 0);
    if (!root)
        snprintf(msg, sizeof msg, "malformed JSON near byte %ld",
                 end ? (long)(end - buf) : 0L);
    else if (!cJSON_IsObject(root))
        snprintf(msg, sizeof msg, "request is not a JSON object");
    else
        snprintf(msg, sizeof msg, "not strict JSON (a raw control character in a "
                                  "string, a leading zero, or nesting over 64)");
    disp_error(s, &ack, root && !cJSON_IsObject(root) ? CHAT_E_NOT_OBJECT : CHAT_E_BAD_JSON,
               msg);
    cJSON_Delete(root);
}

/* Members the strict scan cannot judge: too many, or a key twice (a
 * receiver that keeps the last duplicate would see something other than
 * what was checked).  Returns 0 when the frame may be handled. */
static int refuse_members(struct chat_session *s)
{
    struct chat_ack ack = {0, 0, 0};
    size_t rec = (size_t)nmembers < max_members ? (size_t)nmembers : max_members;
    const struct json_span *seq = json_span_find(spans, rec, "seq");
    char msg[96];
    int64_t v;
    long d;

    /* the client matches the error by its seq (the first one, if twice) */
    if (seq && span_int(seq, -DISP_SEQ_MAX, DISP_SEQ_MAX, &v) == 1) {
        ack.has_seq = 1;
        ack.seq = v;
    }

    if ((size_t)nmembers > max_members) {
        snprintf(msg, sizeof msg, "too many members (%ld, at most %zu)", nmembers,
                 max_members);
        disp_error(s, &ack, CHAT_E_BAD_FIELD, msg);
        return -1;
    }
    if ((d = json_span_dup(spans, (size_t)nmembers)) >= 0) {
        snprintf(msg, sizeof msg, "member %ld repeats an earlier key", d + 1);
        disp_error(s, &ack, CHAT_E_BAD_FIELD, msg);
        return -1;
    }
    return 0;
}

/* The handlers live in the plugin registry, a layer above: dispatch
 * reaches them through the two functions main.c registers. */
static disp_find_fn find_handler;
static disp_run_fn run_handler;

void disp_on_handlers(disp_find_fn find, disp_run_fn run)
{
    find_handler = find;
    run_handler = run;
}

void disp_frame(struct chat_session *s, const char *buf, size_t len)
{
    struct chat_ack ack = {0, 0, 0};
    struct chat_request req;
    const struct plug_handler *h;
    cJSON *root = NULL;
    int64_t v;
    int r;

    /* one strict pass validates the frame and finds its members; the cJSON
     * tree is built only for handlers that read it */
    nmembers = json_scan_object(buf, len, spans, max_members);
    if (nmembers < 0) {
        metrics_loop.frames[0]++;
        refuse_frame(s, buf, len, nmembers);
        return;
    }
    if (refuse_members(s)) {
        metrics_loop.frames[0]++;
        return;
    }
    req.size = sizeof req;
    req.json = NULL;
    req.raw = buf;
    req.raw_len = len;
    cur_req = &req;
    cur_spans = spans;
    if (disp_req_int(&req, "proto", 2, 2, &v) == 1)
        net_session_set_proto(s, CHAT_PROTO_2);
    /* seq is echoed through a JSON number: only what a double holds exactly */
    r = disp_req_int(&req, "seq", -DISP_SEQ_MAX, DISP_SEQ_MAX, &v);
    if (r == 1) {
        ack.has_seq = 1;
        ack.seq = v;
    } else if (r < 0) {
        metrics_loop.frames[0]++;
        disp_error(s, &ack, CHAT_E_BAD_FIELD,
                   "seq must be an integer within +-9007199254740991");
        goto out;
    }
    r = disp_req_int(&req, "msgid", INT32_MIN, INT32_MAX, &v);
    if (r != 1) {
        metrics_loop.frames[0]++;
        disp_error(s, &ack, CHAT_E_BAD_MSGID,
                   r ? "msgid is not an integer" : "msgid is missing");
        goto out;
    }
    ack.msgid = (int)v;
    metrics_loop.frames[metrics_msgid_slot(ack.msgid)]++;
    if (rl_check(s, &ack, len)) /* [limits]: answered 125, not executed */
        goto out;
    if (!find_handler || !(h = find_handler(ack.msgid))) {
        disp_error(s, &ack, CHAT_E_UNKNOWN_MSGID, "unknown msgid");
        goto out;
    }
    if (!root && !(h->flags & CHAT_HANDLER_RAW)) {
        if (!(root = cJSON_ParseWithLengthOpts(buf, len, NULL, 0))) {
            disp_error(s, &ack, CHAT_E_BAD_JSON, "malformed JSON");
            goto out;
        }
        req.json = root;
    }
    req.msgid = ack.msgid;
    req.ack = ack;
    run_handler(h, s, &req);
out:
    cur_req = NULL;
    cur_spans = NULL;
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

/* Does member k's key (a literal body) decode to key? */
static int key_is(const struct json_span *k, const char *key)
{
    return json_span_find(k, 1, key) != NULL;
}

/* Can the frame go out as it is?  Sender fields are the session's and
 * nothing of the sender's connection is in it (that each member appears
 * once, keys compared decoded, disp_frame has made sure). */
static int frame_is_forwardable(const struct chat_request *req,
                                const struct json_span *m, size_t n, int64_t uid,
                                const char *name, size_t name_len)
{
    const struct json_span *f;
    char num[24];
    size_t len;
    const char *raw;
    int k;

    for (size_t i = 0; i < n; i++)
        if (key_is(&m[i], "seq") || key_is(&m[i], "proto"))
            return 0;
    k = snprintf(num, sizeof num, "%lld", (long long)uid);
    f = json_span_find(m, n, "id");
    if (!f || f->vlen != (size_t)k || memcmp(f->val, num, f->vlen))
        return 0;
    f = json_span_find(m, n, "name");
    if (!f || f->vlen < 2 || f->val[0] != '"')
        return 0;
    if (!memchr(f->val, '\\', f->vlen))
        return f->vlen - 2 == name_len && !memcmp(f->val + 1, name, name_len);
    raw = disp_field_str(req, "name", &len);
    return raw && len == name_len && !memcmp(raw, name, name_len);
}

const char *disp_forward(struct chat_session *s, const struct chat_request *req,
                         size_t *len)
{
    int64_t uid = net_session_user(s);
    size_t name_len, n = 0;
    const char *name = net_session_name_len(s, &name_len), *raw;
    struct fwd_buf b = {NULL, 0, 0, 0};
    const struct json_span *m;
    struct field_copy *f;
    char num[48];

    if (!uid || !(m = req_spans(req, &n)))
        return NULL;
    if (frame_is_forwardable(req, m, n, uid, name, name_len)) {
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
    for (size_t i = 0; i < n; i++) {
        if (key_is(&m[i], "msgid") || key_is(&m[i], "id") || key_is(&m[i], "name") ||
            key_is(&m[i], "seq") || key_is(&m[i], "proto"))
            continue;
        fb_add(&b, ",\"", 2);
        fb_add(&b, m[i].key, m[i].klen); /* the key as the client wrote it */
        fb_add(&b, "\":", 2);
        fb_add(&b, m[i].val, m[i].vlen);
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
    size_t n = 0, nm;
    const struct json_span *m = req_spans(req, &nm), *f;
    const char *p;
    if (m) {
        f = json_span_find(m, nm, key);
        if (len)
            *len = f ? f->vlen : 0;
        return f ? f->val : NULL;
    }
    p = json_member_raw(req->raw, req->raw_len, key, &n);
    if (len)
        *len = p ? n : 0;
    return p;
}

const char *disp_field_str(const struct chat_request *req, const char *key,
                           size_t *len)
{
    size_t n, outlen;
    const char *raw = disp_field_raw(req, key, &n);
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
