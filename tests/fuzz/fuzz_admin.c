/*
 * fuzz_admin.c - libFuzzer target for the admin listener's request glue
 * (core/admin_http.c): http-parser callbacks, the size bounds, routing and query
 * parsing, without sockets.
 *
 * Input layout: byte 0 picks where the request is split in two reads (the
 * way libuv may hand it over), the rest is the request.  Invariants, checked
 * with abort():
 *   - the one-read and two-read parses agree on the outcome, the URL, the
 *     Authorization value and the body;
 *   - the recorded URL, Authorization value and body stay within their
 *     bounds and are NUL-terminated;
 *   - a complete request routes to 0 / 400 / 404 / 405, a route's uid is
 *     positive, its query lies inside the URL, and adm_query_int either
 *     finds nothing or returns a value in range.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

static int parse(struct adm_req *r, const uint8_t *p, size_t n, size_t split)
{
    int rc;
    adm_req_init(r);
    if (split > n)
        split = n;
    rc = adm_req_feed(r, (const char *)p, split);
    if (rc == 0)
        rc = adm_req_feed(r, (const char *)p + split, n - split);
    return rc;
}

static void check_bounds(const struct adm_req *r)
{
    if (r->url_len > 2048 || r->url[r->url_len] || r->auth_len > 512 ||
        r->auth[r->auth_len] || r->body_len > 65536 ||
        (r->body && r->body[r->body_len]))
        abort();
}

static void check_route(const struct adm_req *r)
{
    struct adm_route rt;
    int64_t v = -1;
    int st = adm_route(r, &rt), q;

    if (st != 0 && st != 400 && st != 404 && st != 405)
        abort();
    if (st != 0)
        return;
    if ((rt.ep == ADM_EP_PRESENCE || rt.ep == ADM_EP_KICK) && rt.uid <= 0)
        abort();
    if (rt.query && (rt.query < r->url || rt.query + rt.qlen > r->url + r->url_len))
        abort();
    q = adm_query_int(rt.query, rt.qlen, "limit", 0, 1000, &v);
    if (q < -1 || q > 1 || (q == 1 && (v < 0 || v > 1000)))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct adm_req a, b; /* large: not on the stack */
    int ra, rb;

    if (size < 1)
        return 0;
    ra = parse(&a, data + 1, size - 1, size - 1);
    rb = parse(&b, data + 1, size - 1, data[0] * (size - 1) / 255);
    /* a split inside the headers may hit the head bound at another point,
     * but the outcome class and what was recorded must agree */
    if (ra != rb && !(ra >= 400 && rb >= 400))
        abort();
    check_bounds(&a);
    check_bounds(&b);
    if (ra == 1 && (a.url_len != b.url_len || memcmp(a.url, b.url, a.url_len) ||
                    a.auth_len != b.auth_len || memcmp(a.auth, b.auth, a.auth_len) ||
                    a.body_len != b.body_len ||
                    (a.body_len && memcmp(a.body, b.body, a.body_len))))
        abort();
    if (ra == 1)
        check_route(&a);
    adm_req_free(&a);
    adm_req_free(&b);
    return 0;
}
