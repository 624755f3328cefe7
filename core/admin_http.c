/*
 * admin_http.c - the admin listener's request glue: http-parser callbacks
 * that record one request within bounds, the routing table and query
 * integers.  No I/O and no state beyond the struct adm_req it is given, so
 * the unit test and the fuzz target (tests/fuzz/fuzz_admin.c) drive it
 * directly; admin.c feeds it what it reads.
 *
 * Bounds (answered by admin.c with the status adm_req_feed returns): the
 * URL ADM_URL_MAX bytes (414), the Authorization value ADM_AUTH_MAX (431),
 * the request line and headers ADM_HEAD_MAX (431, counted in the callbacks
 * as well as per read, since a request that arrives whole is parsed in one
 * call), a body ADM_BODY_MAX (413, by Content-Length or as chunks arrive).
 * After the first complete request the parser is paused: pipelined bytes
 * are never parsed.
 */
#include <ctype.h>
#include <stdint.h>
#include <string.h>

#include <http_parser.h>

#include "core.h"

#define ADM_HEAD_MAX 8192
#define ADM_URL_MAX 2048
#define ADM_AUTH_MAX 512
#define ADM_BODY_MAX 65536

static int req_fail(struct adm_req *r, int status)
{
    if (!r->status)
        r->status = status;
    return 1; /* http-parser: stop */
}

/* Bytes of URL and header names and values, whichever read they came in
 * (a request that arrives whole is parsed in one call). */
static int head_bytes(struct adm_req *r, size_t n)
{
    r->hbytes += n + 4; /* ": " and CRLF */
    return r->hbytes > ADM_HEAD_MAX ? req_fail(r, 431) : 0;
}

static int on_url(http_parser *p, const char *at, size_t n)
{
    struct adm_req *r = p->data;
    if (n > ADM_URL_MAX - r->url_len)
        return req_fail(r, 414);
    memcpy(r->url + r->url_len, at, n);
    r->url_len += n;
    r->url[r->url_len] = '\0';
    return 0;
}

static int on_hfield(http_parser *p, const char *at, size_t n)
{
    struct adm_req *r = p->data;
    if (head_bytes(r, n))
        return 1;
    if (r->in_value) { /* a new header starts */
        r->in_value = 0;
        r->field_len = 0;
    }
    for (size_t i = 0; i < n; i++, r->field_len++)
        if (r->field_len < sizeof r->field - 1)
            r->field[r->field_len] = (char)tolower((unsigned char)at[i]);
    r->field[r->field_len < sizeof r->field ? r->field_len : sizeof r->field - 1] = '\0';
    return 0;
}

static int on_hvalue(http_parser *p, const char *at, size_t n)
{
    struct adm_req *r = p->data;
    if (head_bytes(r, n))
        return 1;
    r->in_value = 1;
    if (r->field_len != 13 || strcmp(r->field, "authorization") != 0)
        return 0;
    if (n > ADM_AUTH_MAX - r->auth_len)
        return req_fail(r, 431);
    memcpy(r->auth + r->auth_len, at, n);
    r->auth_len += n;
    r->auth[r->auth_len] = '\0';
    r->have_auth = 1;
    return 0;
}

static int on_headers_done(http_parser *p)
{
    struct adm_req *r = p->data;
    r->headers_done = 1;
    if ((p->flags & F_CONTENTLENGTH) && p->content_length > ADM_BODY_MAX)
        return req_fail(r, 413);
    r->method = (int)p->method;
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t n)
{
    struct adm_req *r = p->data;
    char *b;
    if (n > ADM_BODY_MAX - r->body_len)
        return req_fail(r, 413);
    if (!(b = mem_realloc(r->body, r->body_len + n + 1)))
        return req_fail(r, 500);
    memcpy(b + r->body_len, at, n);
    r->body = b;
    r->body_len += n;
    b[r->body_len] = '\0';
    return 0;
}

static int on_done(http_parser *p)
{
    struct adm_req *r = p->data;
    r->complete = 1;
    http_parser_pause(p, 1); /* one request per connection */
    return 0;
}

static const http_parser_settings req_settings = {
    .on_url = on_url,
    .on_header_field = on_hfield,
    .on_header_value = on_hvalue,
    .on_headers_complete = on_headers_done,
    .on_body = on_body,
    .on_message_complete = on_done,
};

void adm_req_init(struct adm_req *r)
{
    memset(r, 0, sizeof *r);
    http_parser_init(&r->hp, HTTP_REQUEST);
    r->hp.data = r;
}

void adm_req_free(struct adm_req *r)
{
    mem_free(r->body);
    r->body = NULL;
}

int adm_req_feed(struct adm_req *r, const char *buf, size_t len)
{
    size_t used;
    enum http_errno e;

    if (r->status)
        return r->status;
    if (r->complete)
        return 1;
    if (len == 0) /* http-parser takes 0 bytes as the end of the stream */
        return 0;
    used = http_parser_execute(&r->hp, &req_settings, buf, len);
    if (!r->headers_done) {
        r->head += used;
        if (r->head > ADM_HEAD_MAX)
            req_fail(r, 431);
    }
    if (r->status)
        return r->status;
    if (r->complete)
        return 1;
    e = HTTP_PARSER_ERRNO(&r->hp);
    if (e == HPE_HEADER_OVERFLOW)
        return req_fail(r, 431), r->status;
    if (e != HPE_OK || r->hp.upgrade)
        return req_fail(r, 400), r->status;
    return 0;
}

static int path_is(const char *p, size_t n, const char *lit)
{
    return n == strlen(lit) && memcmp(p, lit, n) == 0;
}

/* "/users/<id>/<what>": the id (1..INT64_MAX), else 0. */
static int64_t path_user(const char *p, size_t n, const char *what)
{
    size_t wl = strlen(what), i = 7;
    int64_t id = 0;
    if (n < 7 + 1 + 1 + wl || memcmp(p, "/users/", 7) != 0 ||
        memcmp(p + n - wl, what, wl) != 0 || p[n - wl - 1] != '/')
        return 0;
    for (; i < n - wl - 1; i++) {
        if (p[i] < '0' || p[i] > '9' || id > (INT64_MAX - (p[i] - '0')) / 10)
            return 0;
        id = id * 10 + (p[i] - '0');
    }
    return id;
}

int adm_route(const struct adm_req *r, struct adm_route *rt)
{
    struct http_parser_url u;
    const char *p;
    size_t n;
    int get = r->method == HTTP_GET || r->method == HTTP_HEAD;

    memset(rt, 0, sizeof *rt);
    http_parser_url_init(&u);
    if (http_parser_parse_url(r->url, r->url_len, 0, &u) != 0 ||
        !(u.field_set & (1 << UF_PATH)))
        return 400;
    p = r->url + u.field_data[UF_PATH].off;
    n = u.field_data[UF_PATH].len;
    if (u.field_set & (1 << UF_QUERY)) {
        rt->query = r->url + u.field_data[UF_QUERY].off;
        rt->qlen = u.field_data[UF_QUERY].len;
    }
    if (path_is(p, n, "/metrics"))
        rt->ep = ADM_EP_METRICS;
    else if (path_is(p, n, "/healthz"))
        rt->ep = ADM_EP_HEALTHZ;
    else if (path_is(p, n, "/readyz"))
        rt->ep = ADM_EP_READYZ;
    else if (path_is(p, n, "/sessions"))
        rt->ep = ADM_EP_SESSIONS;
    else if ((rt->uid = path_user(p, n, "presence")) > 0)
        rt->ep = ADM_EP_PRESENCE;
    else if ((rt->uid = path_user(p, n, "kick")) > 0)
        rt->ep = ADM_EP_KICK;
    else if (path_is(p, n, "/notice"))
        rt->ep = ADM_EP_NOTICE;
    else if (path_is(p, n, "/reload"))
        rt->ep = ADM_EP_RELOAD;
    else if (path_is(p, n, "/drain"))
        rt->ep = ADM_EP_DRAIN;
    else
        return 404;
    rt->post = rt->ep >= ADM_EP_KICK;
    if (rt->post ? r->method != HTTP_POST : !get)
        return 405;
    return 0;
}

int adm_query_int(const char *q, size_t qlen, const char *key, int64_t lo,
                  int64_t hi, int64_t *out)
{
    size_t kl = strlen(key), i = 0;
    while (i < qlen) {
        size_t end = i;
        while (end < qlen && q[end] != '&')
            end++;
        if (end - i > kl && memcmp(q + i, key, kl) == 0 && q[i + kl] == '=') {
            int64_t v = 0;
            size_t j = i + kl + 1;
            if (j == end)
                return -1;
            for (; j < end; j++) {
                if (q[j] < '0' || q[j] > '9' || v > (INT64_MAX - (q[j] - '0')) / 10)
                    return -1;
                v = v * 10 + (q[j] - '0');
            }
            if (v < lo || v > hi)
                return -1;
            *out = v;
            return 1;
        }
        i = end + 1;
    }
    return 0;
}
