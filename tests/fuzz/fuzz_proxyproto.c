/*
 * fuzz_proxyproto.c - libFuzzer target for the PROXY protocol parser
 * (core/proxyproto.c), the first thing to read a connection's bytes when
 * [server] proxy_protocol is on.
 *
 * Input layout: byte 0 picks where the stream is cut in two reads; the
 * rest is the connection's first bytes.  The target plays net.c's part (a
 * buffer of PP_MAX_HEADER bytes filled read by read, asked again after
 * each) and checks, with abort():
 *   - the two-read verdict equals the one-read verdict, and every prefix's
 *     verdict is NEED_MORE or that same one (a verdict never changes as
 *     bytes come; DONE always with the same length);
 *   - PP_MAX_HEADER bytes always bring a verdict;
 *   - DONE: 15 <= used <= PP_MAX_HEADER (v1 at most 107), and a PROXY
 *     command carries source and destination of one family, AF_INET or
 *     AF_INET6; INVALID: a reason.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

#define MAX_IN (PP_MAX_HEADER + 64)

static void check(int r, const struct pp_header *h, size_t used, size_t len)
{
    if (len >= PP_MAX_HEADER && r == PP_NEED_MORE)
        abort();
    if (r == PP_INVALID && !h->err)
        abort();
    if (r != PP_DONE)
        return;
    if (used < 15 || used > len || used > PP_MAX_HEADER || (h->version == 1 && used > 107))
        abort();
    if (h->command == PP_PROXY &&
        ((h->src.ss_family != AF_INET && h->src.ss_family != AF_INET6) ||
         h->src.ss_family != h->dst.ss_family))
        abort();
    if (h->command == PP_LOCAL && h->src.ss_family != 0)
        abort();
}

/* net.c's way: two reads (bytes [0, cut) and [cut, n)) appended to a
 * buffer of PP_MAX_HEADER bytes, asked after each. */
static int by_reads(const char *p, size_t n, size_t cut, size_t *used)
{
    char buf[PP_MAX_HEADER];
    size_t have = 0;
    struct pp_header h;
    int r = PP_NEED_MORE;

    for (int i = 0; i < 2 && r == PP_NEED_MORE; i++) {
        size_t from = i == 0 ? 0 : cut, chunk = i == 0 ? cut : n - cut;
        size_t take = chunk < sizeof buf - have ? chunk : sizeof buf - have;
        if (chunk == 0)
            continue;
        if (take == 0)
            abort(); /* NEED_MORE on a full buffer */
        memcpy(buf + have, p + from, take);
        have += take;
        r = pp_parse(buf, have, &h, used);
        check(r, &h, *used, have);
    }
    return r;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pp_header h;
    size_t n, used = 0, used2 = 0, u;
    const char *p;
    int whole, split;

    if (size < 1)
        return 0;
    p = (const char *)data + 1;
    n = size - 1 > MAX_IN ? MAX_IN : size - 1;
    whole = pp_parse(p, n, &h, &used);
    check(whole, &h, used, n);
    for (size_t k = 0; k < n; k++) {
        int r = pp_parse(p, k, &h, &u);
        check(r, &h, u, k);
        if (r != PP_NEED_MORE && (r != whole || (r == PP_DONE && u != used)))
            abort();
    }
    if (n == 0)
        return 0;
    split = by_reads(p, n, data[0] % (n + 1), &used2);
    if (split != whole || (whole == PP_DONE && used2 != used))
        abort();
    return 0;
}
