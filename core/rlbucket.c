/*
 * rlbucket.c - the [limits] syntax and the token bucket, apart from the
 * rate limits themselves (ratelimit.c).
 *
 * Pure functions with no state: conf.c parses [limits] with them, and
 * ratelimit.c keeps its buckets with them.  They sit among the leaf
 * utilities so that conf.c, a leaf, calls nothing above it.  A bucket's
 * clock is whatever millisecond count the caller passes (uv_now()).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

/* ---- configuration ------------------------------------------------------ */

void rl_conf_defaults(struct rl_conf *c)
{
    memset(c, 0, sizeof *c);
    c->session_msgs = (struct rl_rate){100, 200};
    c->session_bytes = (struct rl_rate){512 * 1024, 2 * 1024 * 1024};
    c->user_msgs = (struct rl_rate){100, 400};
    c->addr_conns = (struct rl_rate){20, 100};
    c->addr_regs = (struct rl_rate){10.0 / 60, 20};
    c->addr_fails = (struct rl_rate){30.0 / 60, 30};
}

/* "123", "1.5", "256k", "1m" (k, m: 1024, 1024^2); 0 or -1. */
static int parse_amount(const char *s, const char **end, double *out)
{
    char *e;
    double v = strtod(s, &e);
    if (e == s || !(v >= 0) || v > 1e12)
        return -1;
    if (*e == 'k' || *e == 'K')
        v *= 1024, e++;
    else if (*e == 'm' || *e == 'M')
        v *= 1024 * 1024, e++;
    *out = v;
    *end = e;
    return 0;
}

static const char *skip_ws(const char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    return s;
}

int rl_parse_rate(const char *s, struct rl_rate *out)
{
    const char *e;
    double v, per, burst;

    s = skip_ws(s);
    if (!strcmp(s, "off") || !strcmp(s, "0")) {
        out->rate = out->burst = 0;
        return 0;
    }
    if (parse_amount(s, &e, &v) || *e != '/')
        return -1;
    switch (e[1]) {
    case 's': per = 1; break;
    case 'm': per = 60; break;
    case 'h': per = 3600; break;
    default: return -1;
    }
    s = skip_ws(e + 2);
    burst = v > 1 ? v : 1; /* one second's worth */
    if (!strncmp(s, "burst", 5) && (s[5] == ' ' || s[5] == '\t')) {
        if (parse_amount(skip_ws(s + 5), &e, &burst) || burst < 1)
            return -1;
        s = skip_ws(e);
    }
    if (*s || v <= 0)
        return -1;
    out->rate = v / per;
    out->burst = burst;
    return 0;
}

int rl_parse_class(const char *name, const char *s, struct rl_class *out)
{
    size_t n = strlen(name);
    char *e;

    memset(out, 0, sizeof *out);
    if (!n || n >= RL_NAME_MAX || strspn(name, "abcdefghijklmnopqrstuvwxyz0123456789_") != n)
        return -1;
    memcpy(out->name, name, n + 1);
    s = skip_ws(s);
    for (;;) {
        long v = strtol(s, &e, 10);
        if (e == s || v < 1 || v > INT32_MAX || out->nmsgids == RL_CLASS_MSGIDS)
            return -1;
        out->msgids[out->nmsgids++] = (int)v;
        s = skip_ws(e);
        if (*s != ',')
            break;
        s = skip_ws(s + 1);
    }
    return rl_parse_rate(s, &out->r) || out->r.rate <= 0 ? -1 : 0;
}

/* ---- buckets ------------------------------------------------------------ */

void rl_bucket_refill(struct rl_bucket *b, const struct rl_rate *r, uint64_t now)
{
    if (!b->at) {
        b->tokens = r->burst;
    } else if (now > b->at) {
        b->tokens += (double)(now - b->at) * r->rate / 1000.0;
        if (b->tokens > r->burst)
            b->tokens = r->burst;
    }
    b->at = now ? now : 1;
}

uint64_t rl_bucket_need(const struct rl_bucket *b, const struct rl_rate *r, double want)
{
    if (b->tokens >= want)
        return 0;
    return (uint64_t)ceil((want - b->tokens) * 1000.0 / r->rate);
}

uint64_t rl_bucket_wait(struct rl_bucket *b, const struct rl_rate *r, uint64_t now,
                        double cost)
{
    if (r->rate <= 0)
        return 0;
    rl_bucket_refill(b, r, now);
    return rl_bucket_need(b, r, cost < r->burst ? cost : r->burst);
}

void rl_bucket_take(struct rl_bucket *b, const struct rl_rate *r, uint64_t now,
                    double cost)
{
    if (r->rate <= 0)
        return;
    rl_bucket_refill(b, r, now);
    b->tokens -= cost < r->burst ? cost : r->burst;
}

int rl_bucket_full(struct rl_bucket *b, const struct rl_rate *r, uint64_t now)
{
    if (r->rate <= 0 || !b->at)
        return 1;
    rl_bucket_refill(b, r, now);
    return b->tokens >= r->burst;
}
