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

/* The wire name: "pA:B" or "gG".  Returns its length. */
static inline size_t ds_conv_format(int64_t conv, char *buf, size_t cap)
{
    int64_t a, b;
    int n;

    if (conv < 0)
        n = snprintf(buf, cap, "g%" PRId64, -conv);
    else {
        ds_conv_users(conv, &a, &b);
        n = snprintf(buf, cap, "p%" PRId64 ":%" PRId64, a, b);
    }
    return n < 0 ? 0 : (size_t)n;
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
    char conv_s[DS_CONV_STR], tail[160], *out;
    size_t b = len, n;

    while (b > 0 && body[b - 1] != '}')
        b--;
    if (b < 2 || body[0] != '{')
        return NULL;
    b--; /* the closing brace */
    ds_conv_format(conv, conv_s, sizeof(conv_s));
    n = (size_t)snprintf(tail, sizeof(tail), "%s\"mid\":%" PRId64 ",\"conv\":\"%s\","
                         "\"cseq\":%" PRId64 "}", b > 1 ? "," : "", mid, conv_s, cseq);
    if (!(out = h->malloc(b + n + 1)))
        return NULL;
    memcpy(out, body, b);
    memcpy(out + b, tail, n + 1);
    *outlen = b + n;
    return out;
}

/* An integer member written as its digits (cJSON_AddNumberToObject prints
 * a double with printf and reads it back with sscanf: the hot path's ACK
 * would spend more there than on the rest of its work). */
static inline void ds_add_int(cJSON *o, const char *key, int64_t v)
{
    char buf[24];

    snprintf(buf, sizeof(buf), "%" PRId64, v);
    cJSON_AddRawToObject(o, key, buf);
}

/* ---- the writer (writer.c) ---------------------------------------------- */
struct ds_writer;

struct ds_conf {
    size_t lanes;       /* independent batches in flight (1..16) */
    size_t batch_max;   /* messages per transaction (1..512) */
    size_t queue_max;   /* messages waiting, all lanes (113 past it) */
    int64_t id_block;   /* message ids reserved per round trip */
};

/* One message to store.  Everything is copied by ds_submit. */
struct ds_msg {
    int64_t conv;
    int64_t sender;
    const char *cid;    /* 1..DS_CID_MAX bytes */
    size_t cid_len;
    const char *body;   /* the forwarded frame: a JSON object */
    size_t body_len;
};

/* The outcome.  status: CHAT_OK (stored: mid, cseq set; dup=1 when it had
 * been stored before under the same sender and cid, and nothing new was
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
 * durable_id_block of the plugin's section. */
void ds_conf_read(const struct chat_host *h, struct chat_plugin *self,
                  struct ds_conf *c);

#endif
