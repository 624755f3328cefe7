/*
 * dstore.h - durable messages: conversation ids, rendering, and the
 * group-committed writer (writer.c) that the one2one and group plugins link
 * in (a plugin cannot call another plugin; their conversations are
 * disjoint).  docs/architecture.md, "Durable messaging", is the design.
 *
 * Private to the plugins that compile it: nothing here is exported.
 */
#ifndef CHAT_DSTORE_H
#define CHAT_DSTORE_H

#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "chat/plugin.h"

/* ---- wire numbers (docs/protocol.md, "Durable messages") ----------------- */
#define DS_MSG_SYNC 15        /* protocol 2: what the device missed */
#define DS_MSG_HISTORY 16     /* protocol 2: a conversation's earlier messages */
#define DS_MSG_READ 17        /* protocol 2: delivered/read markers (receipts) */
#define DS_E_NOT_PARTICIPANT 121 /* not a participant of the conversation */

/* ---- conversation ids --------------------------------------------------- */
/* Pair conversation of users a and b (any order): (min << 32) | max, > 0.
 * Group g: -g.  User ids must be below 2^31 (DS_UID_MAX). */
#define DS_UID_MAX ((INT64_C(1) << 31) - 1)
#define DS_CID_MAX 64   /* bytes of a client message id */
#define DS_CONV_STR 48  /* room for "p2147483647:2147483647" or "g<int64>" */

static inline int64_t ds_conv_pair(int64_t a, int64_t b)
{
    int64_t lo = a < b ? a : b, hi = a < b ? b : a;

    return (int64_t)(((uint64_t)lo << 32) | (uint64_t)hi);
}

static inline int64_t ds_conv_group(int64_t g) { return -g; }

/* The two users of a pair conversation (0 for a group). */
static inline void ds_conv_users(int64_t conv, int64_t *a, int64_t *b)
{
    *a = conv > 0 ? (int64_t)((uint64_t)conv >> 32) : 0;
    *b = conv > 0 ? (int64_t)((uint64_t)conv & 0xffffffffu) : 0;
}

/* v's decimal digits at p (room for 21 bytes), no NUL.  Returns the
 * length.  (printf costs more than the rest of an ACK's work.) */
static inline size_t ds_fmt_i64(char *p, int64_t v)
{
    char tmp[24];
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    size_t n = 0, k = 0;

    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        p[k++] = '-';
    while (n)
        p[k++] = tmp[--n];
    return k;
}

/* The wire name: "pA:B" or "gG" (cap >= DS_CONV_STR).  Returns its length. */
static inline size_t ds_conv_format(int64_t conv, char *buf, size_t cap)
{
    int64_t a, b;
    size_t n = 0;

    if (cap < DS_CONV_STR) {
        if (cap)
            buf[0] = '\0';
        return 0;
    }
    if (conv < 0) {
        buf[n++] = 'g';
        n += ds_fmt_i64(buf + n, (int64_t)((uint64_t)0 - (uint64_t)conv));
    } else {
        ds_conv_users(conv, &a, &b);
        buf[n++] = 'p';
        n += ds_fmt_i64(buf + n, a);
        buf[n++] = ':';
        n += ds_fmt_i64(buf + n, b);
    }
    buf[n] = '\0';
    return n;
}

/* A decimal in 1..max; advances *p.  0 on anything else. */
static inline int64_t ds_parse_id(const char **p, const char *end, int64_t max)
{
    int64_t v = 0;
    const char *s = *p;

    if (s >= end || *s < '1' || *s > '9')
        return 0;
    while (s < end && *s >= '0' && *s <= '9') {
        if (v > (max - (*s - '0')) / 10) /* v * 10 + digit would pass max */
            return 0;
        v = v * 10 + (*s - '0');
        s++;
    }
    *p = s;
    return v;
}

/* Parse a wire name; 0 when it is not one (a pair names its smaller user
 * first; "pA:A" is a user's conversation with itself). */
static inline int64_t ds_conv_parse(const char *s, size_t len)
{
    const char *p = s + 1, *end = s + len;
    int64_t a, b;

    if (len < 2)
        return 0;
    if (s[0] == 'g') {
        a = ds_parse_id(&p, end, INT64_MAX);
        return a && p == end ? ds_conv_group(a) : 0;
    }
    if (s[0] != 'p' || !(a = ds_parse_id(&p, end, DS_UID_MAX)) || p >= end || *p != ':')
        return 0;
    p++;
    if (!(b = ds_parse_id(&p, end, DS_UID_MAX)) || p != end || a > b)
        return 0;
    return ds_conv_pair(a, b);
}

/* body (a JSON object's text) with ,"mid":M,"conv":"..","cseq":N before its
 * closing brace: the message as it is delivered and synced.  Free with
 * host->free; NULL when out of memory or body is not an object. */
static inline char *ds_render(const struct chat_host *h, int64_t conv, int64_t mid,
                              int64_t cseq, const char *body, size_t len,
                              size_t *outlen)
{
    char tail[160], *out;
    size_t b = len, n = 0;

    while (b > 0 && body[b - 1] != '}')
        b--;
    if (b < 2 || body[0] != '{')
        return NULL;
    b--; /* the closing brace */
    if (b > 1)
        tail[n++] = ',';
    memcpy(tail + n, "\"mid\":", 6);
    n += 6;
    n += ds_fmt_i64(tail + n, mid);
    memcpy(tail + n, ",\"conv\":\"", 9);
    n += 9;
    n += ds_conv_format(conv, tail + n, DS_CONV_STR);
    memcpy(tail + n, "\",\"cseq\":", 9);
    n += 9;
    n += ds_fmt_i64(tail + n, cseq);
    tail[n++] = '}';
    if (!(out = h->malloc(b + n + 1)))
        return NULL;
    memcpy(out, body, b);
    memcpy(out + b, tail, n);
    out[b + n] = '\0';
    *outlen = b + n;
    return out;
}

/* An integer member written as its digits (cJSON_AddNumberToObject prints
 * a double with printf and reads it back with sscanf: the hot path's ACK
 * would spend more there than on the rest of its work). */
static inline void ds_add_int(cJSON *o, const char *key, int64_t v)
{
    char buf[24];

    buf[ds_fmt_i64(buf, v)] = '\0';
    cJSON_AddRawToObject(o, key, buf);
}

/* The ACK of a stored message, written as text and sent with send_raw:
 * the bytes disp_reply would print for the same fields ({"msgid":11,
 * "req":R,"seq":S,"errno":0,"errmsg":"ok","mid":M,"conv":"..","cseq":C
 * [,"dup":true]}), without a cJSON tree, printf and sscanf per message.
 * Protocol-2 sessions only (a durable message is protocol 2). */
static inline int ds_reply_ok(const struct chat_host *h, struct chat_session *s,
                              const struct chat_ack *ack, int64_t conv, int64_t mid,
                              int64_t cseq, int dup)
{
    char buf[256];
    size_t n = 0;

    if (h->session_proto(s) != CHAT_PROTO_2)
        return CHAT_OK;
    memcpy(buf, "{\"msgid\":11,\"req\":", 18);
    n = 18;
    n += ds_fmt_i64(buf + n, ack->msgid);
    if (ack->has_seq) {
        memcpy(buf + n, ",\"seq\":", 7);
        n += 7;
        n += ds_fmt_i64(buf + n, ack->seq);
    }
    memcpy(buf + n, ",\"errno\":0,\"errmsg\":\"ok\",\"mid\":", 31);
    n += 31;
    n += ds_fmt_i64(buf + n, mid);
    memcpy(buf + n, ",\"conv\":\"", 9);
    n += 9;
    n += ds_conv_format(conv, buf + n, DS_CONV_STR);
    memcpy(buf + n, "\",\"cseq\":", 9);
    n += 9;
    n += ds_fmt_i64(buf + n, cseq);
    if (dup) {
        memcpy(buf + n, ",\"dup\":true", 11);
        n += 11;
    }
    buf[n++] = '}';
    buf[n] = '\0';
    return h->send_raw(s, buf, n);
}

/* ---- which messages are durable ----------------------------------------- */
/* The plugin's "durable" key: "all" (the default: every protocol-2 message
 * 6/10 is stored first, with or without a cid) or "cid" (only those that
 * carry a cid; the others take the non-durable path, as before durability
 * became the default).  CHAT_OK and *all set, or CHAT_ERR_INVAL (logged,
 * *all unchanged). */
static inline int ds_conf_mode(const struct chat_host *h, struct chat_plugin *self,
                               int *all)
{
    const char *v = h->conf_get(self, "durable", "all");

    if (strcmp(v, "all") != 0 && strcmp(v, "cid") != 0) {
        chat_log(h, self, CHAT_LOG_ERROR, "durable = %s: expected all or cid", v);
        return CHAT_ERR_INVAL;
    }
    *all = strcmp(v, "all") == 0;
    return CHAT_OK;
}

/* durable = all also needs a way back for what an offline protocol-2 device
 * missed: SYNC, the store plugin's (the offline store leaves durable
 * messages out of a protocol-2 login ack).  1 when some plugin answers SYNC
 * now (or the host cannot tell); else 0, logged once until it comes back:
 * a message without cid then stays non-durable, as before durability
 * became the default, rather than be stored where no device fetches it. */
static inline int ds_sync_served(const struct chat_host *h, struct chat_plugin *self,
                                 int *warned)
{
    if (!CHAT_HOST_HAS(h, msgid_handled) || h->msgid_handled(DS_MSG_SYNC)) {
        *warned = 0;
        return 1;
    }
    if (!*warned)
        chat_log(h, self, CHAT_LOG_WARN, "durable = all, but no plugin answers SYNC "
                 "(15: enable the store plugin): protocol-2 messages without cid "
                 "stay non-durable");
    *warned = 1;
    return 0;
}

/* ---- the writer (writer.c) ---------------------------------------------- */
struct ds_writer;

struct ds_conf {
    size_t lanes;       /* independent batches in flight (1..16) */
    size_t batch_max;   /* messages per transaction (1..512) */
    size_t queue_max;   /* messages waiting, all lanes (113 past it) */
    int64_t id_block;   /* message ids reserved per round trip */
    unsigned linger_ms; /* wait before a much smaller batch under load */
};

/* One message to store.  Everything is copied by ds_submit. */
struct ds_msg {
    int64_t conv;
    int64_t sender;
    const char *cid;    /* 1..DS_CID_MAX bytes; NULL (cid_len 0): no cid, no
                         * idempotency (stored as NULL, a resend is new) */
    size_t cid_len;
    const char *body;   /* the forwarded frame: a JSON object */
    size_t body_len;
};

/* The outcome.  status: CHAT_OK (stored: mid, cseq set; dup=1 when it had
 * been stored before under the same sender and cid (never without a cid),
 * and nothing new was
 * stored), CHAT_ERR_UNAVAILABLE (the database failed: not stored, or maybe
 * stored if it died in COMMIT - a retry with the same cid tells),
 * CHAT_ERR_BUSY (a bound), CHAT_ERR_CLOSED (stopping), CHAT_ERR_DB.
 * body is the stored body (borrowed for the call), ctx the copy of the
 * submitter's ctx. */
struct ds_result {
    int status;
    int dup;
    int64_t conv, mid, cseq;
};
typedef void (*ds_done_fn)(const struct ds_result *r, const char *body, size_t len,
                           void *ctx);
#define DS_CTX_MAX 64

/* NULL when out of memory.  The writer belongs to the instance; free it in
 * fini (the instance has drained: nothing is in flight). */
struct ds_writer *ds_writer_new(const struct chat_host *h, struct chat_plugin *self,
                                const struct ds_conf *conf);
void ds_writer_free(struct ds_writer *w);
void ds_writer_reconf(struct ds_writer *w, const struct ds_conf *conf);
/* Queue a message.  CHAT_OK: fn runs exactly once, later (never inside this
 * call).  CHAT_ERR_BUSY (queue_max), CHAT_ERR_NOMEM, CHAT_ERR_INVAL: fn
 * never runs. */
int ds_submit(struct ds_writer *w, const struct ds_msg *m, ds_done_fn fn,
              const void *ctx, size_t ctx_len);
/* Read the conf keys durable_lanes, durable_batch_max, durable_queue_max,
 * durable_id_block, durable_linger_ms of the plugin's section. */
void ds_conf_read(const struct chat_host *h, struct chat_plugin *self,
                  struct ds_conf *c);

#endif
