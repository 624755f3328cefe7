/*
 * test_proxyproto.c - CUnit tests of the PROXY protocol parser
 * (core/proxyproto.c).
 *
 * pp_parse() sees the first bytes of a connection, as many as have come so
 * far; net.c asks again after every read.  So every case is checked at
 * every split: each prefix of a good header (followed by the connection's
 * own bytes) must answer NEED_MORE until the header is whole and DONE with
 * the same length from then on; a bad one answers NEED_MORE up to some
 * byte and INVALID from there on, never DONE.  Random inputs check that a
 * verdict never changes as bytes are added and that PP_MAX_HEADER bytes
 * always bring one.
 */
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>

#include <CUnit/Basic.h>

#include "core.h"

#define TAIL "{\"msgid\":1}"

/* Good: every prefix of buf (n bytes, the header hlen of them). */
static void check_good(const char *buf, size_t n, size_t hlen, struct pp_header *out)
{
    struct pp_header h;
    size_t used;
    int bad = 0;

    for (size_t k = 0; k <= n; k++) {
        int r = pp_parse(buf, k, &h, &used);
        if (k < hlen)
            bad += r != PP_NEED_MORE;
        else
            bad += r != PP_DONE || used != hlen;
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(pp_parse(buf, n, out, &used), PP_DONE);
}

/* Bad: NEED_MORE up to some prefix, INVALID from there on, at full length
 * (and a reason given). */
static void check_bad(const char *buf, size_t n)
{
    struct pp_header h;
    size_t used;
    int seen_invalid = 0, bad = 0;

    for (size_t k = 0; k <= n; k++) {
        int r = pp_parse(buf, k, &h, &used);
        if (r == PP_DONE)
            bad++;
        else if (r == PP_INVALID) {
            seen_invalid = 1;
            bad += h.err == NULL;
        } else
            bad += seen_invalid;
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT(seen_invalid);
}

static void good_str(const char *hdr, struct pp_header *h)
{
    char buf[1024];
    size_t n = strlen(hdr);
    memcpy(buf, hdr, n);
    memcpy(buf + n, TAIL, sizeof TAIL - 1);
    check_good(buf, n + sizeof TAIL - 1, n, h);
}

static void bad_str(const char *s) { check_bad(s, strlen(s)); }

static void assert_v4(const struct sockaddr_storage *ss, const char *ip, unsigned port)
{
    const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
    char txt[INET_ADDRSTRLEN] = "";
    CU_ASSERT_EQUAL(ss->ss_family, AF_INET);
    inet_ntop(AF_INET, &a->sin_addr, txt, sizeof txt);
    CU_ASSERT_STRING_EQUAL(txt, ip);
    CU_ASSERT_EQUAL(ntohs(a->sin_port), port);
}

static void assert_v6(const struct sockaddr_storage *ss, const char *ip, unsigned port)
{
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
    char txt[INET6_ADDRSTRLEN] = "";
    CU_ASSERT_EQUAL(ss->ss_family, AF_INET6);
    inet_ntop(AF_INET6, &a->sin6_addr, txt, sizeof txt);
    CU_ASSERT_STRING_EQUAL(txt, ip);
    CU_ASSERT_EQUAL(ntohs(a->sin6_port), port);
}

/* ---- v1 --------------------------------------------------------------- */

static void test_v1_good(void)
{
    struct pp_header h;

    good_str("PROXY TCP4 192.0.2.1 198.51.100.2 56324 6000\r\n", &h);
    CU_ASSERT_EQUAL(h.version, 1);
    CU_ASSERT_EQUAL(h.command, PP_PROXY);
    assert_v4(&h.src, "192.0.2.1", 56324);
    assert_v4(&h.dst, "198.51.100.2", 6000);

    good_str("PROXY TCP6 2001:db8::1 2001:db8::2 0 65535\r\n", &h);
    CU_ASSERT_EQUAL(h.command, PP_PROXY);
    assert_v6(&h.src, "2001:db8::1", 0);
    assert_v6(&h.dst, "2001:db8::2", 65535);

    /* the longest TCP6 line (104 bytes) */
    good_str("PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
             "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n", &h);
    assert_v6(&h.src, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535);

    good_str("PROXY UNKNOWN\r\n", &h);
    CU_ASSERT_EQUAL(h.command, PP_LOCAL);
    CU_ASSERT_EQUAL(h.src.ss_family, 0);
}

static void test_v1_unknown_longest(void)
{
    /* the spec's worst case: UNKNOWN followed by a TCP6 line, 107 bytes */
    char line[200];
    struct pp_header h;
    int n = snprintf(line, sizeof line, "PROXY UNKNOWN %s %s 65535 65535\r\n",
                     "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                     "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
    CU_ASSERT_EQUAL(n, 107);
    good_str(line, &h);
    CU_ASSERT_EQUAL(h.command, PP_LOCAL);
    /* one byte more in the address part: no CRLF within 107 bytes */
    n = snprintf(line, sizeof line, "PROXY UNKNOWN %s %s 65535 655350\r\n",
                 "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                 "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
    CU_ASSERT_EQUAL(n, 108);
    bad_str(line);
}

static void test_v1_bad(void)
{
    static const char *const cases[] = {
        "PROXY TCP4 192.0.2.1 198.51.100.2 56324 6000\n",     /* LF alone */
        "PROXY TCP4 192.0.2.1 198.51.100.2 56324 6000\rX",    /* CR alone */
        "PROXY TCP4  192.0.2.1 198.51.100.2 56324 6000\r\n",  /* two spaces */
        "PROXY TCP4 192.0.2.1 198.51.100.2 56324 6000 \r\n",  /* trailing space */
        "PROXY TCP5 192.0.2.1 198.51.100.2 56324 6000\r\n",
        "PROXY tcp4 192.0.2.1 198.51.100.2 56324 6000\r\n",
        "PROXY TCP4 2001:db8::1 2001:db8::2 1 2\r\n",          /* family mismatch */
        "PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 65536 6000\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 056324 6000\r\n",   /* leading zero */
        "PROXY TCP4 192.0.2.1 198.51.100.2 -1 6000\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 +1 6000\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 1x 6000\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",         /* four fields */
        "PROXY TCP4 192.0.2.1 198.51.100.2 56324 6000 7\r\n",  /* six */
        "PROXY TCP4 256.0.2.1 198.51.100.2 56324 6000\r\n",
        "PROXY TCP4 192.0.2.01 198.51.100.2 56324 6000\r\n",
        "PROXY TCP4 example.com 198.51.100.2 56324 6000\r\n",
        "PROXY UNKNOWNX\r\n",
        "PROXY \r\n",
        "PROXY\r\n",
        "proxy TCP4 192.0.2.1 198.51.100.2 56324 6000\r\n",
        "{\"msgid\":1,\"id\":1}",                            /* no header at all */
        "GET / HTTP/1.1\r\n\r\n",
        "\r\n\r\n\r\n",                                    /* not the v2 signature */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        bad_str(cases[i]);
    /* a NUL inside the line */
    check_bad("PROXY TCP4 192.0.2.1\0 198.51.100.2 1 2\r\n", 41);
}

static void test_v1_no_crlf_in_107(void)
{
    char buf[300];
    struct pp_header h;
    size_t used;

    memcpy(buf, "PROXY UNKNOWN ", 14);
    memset(buf + 14, 'a', sizeof buf - 14);
    CU_ASSERT_EQUAL(pp_parse(buf, 106, &h, &used), PP_NEED_MORE);
    CU_ASSERT_EQUAL(pp_parse(buf, 107, &h, &used), PP_INVALID);
    check_bad(buf, sizeof buf);
}

/* ---- v2 --------------------------------------------------------------- */

static const unsigned char sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                      0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

/* A v2 header into buf: ver_cmd, fam, then body (blen bytes) with the
 * length field set to len (usually blen); returns the bytes written. */
static size_t v2(unsigned char *buf, unsigned ver_cmd, unsigned fam, unsigned len,
                 const void *body, size_t blen)
{
    memcpy(buf, sig, 12);
    buf[12] = (unsigned char)ver_cmd;
    buf[13] = (unsigned char)fam;
    buf[14] = (unsigned char)(len >> 8);
    buf[15] = (unsigned char)len;
    memcpy(buf + 16, body, blen);
    return 16 + blen;
}

static void good_v2(unsigned char *buf, size_t hlen, struct pp_header *h)
{
    memcpy(buf + hlen, TAIL, sizeof TAIL - 1);
    check_good((const char *)buf, hlen + sizeof TAIL - 1, hlen, h);
}

static const unsigned char inet_body[12] = {203, 0, 113, 7, 10, 0, 0, 1,
                                            0x9c, 0x40, 0x17, 0x70};

static void test_v2_good(void)
{
    unsigned char buf[1024], body[600];
    struct pp_header h;
    size_t n;

    n = v2(buf, 0x21, 0x11, 12, inet_body, 12);
    good_v2(buf, n, &h);
    CU_ASSERT_EQUAL(h.version, 2);
    CU_ASSERT_EQUAL(h.command, PP_PROXY);
    assert_v4(&h.src, "203.0.113.7", 40000);
    assert_v4(&h.dst, "10.0.0.1", 6000);

    /* IPv6 and two TLVs (a NOOP and an authority), skipped */
    memset(body, 0, sizeof body);
    inet_pton(AF_INET6, "2001:db8::7", body);
    inet_pton(AF_INET6, "2001:db8::1", body + 16);
    body[32] = 0x01, body[33] = 0xbb, body[34] = 0x17, body[35] = 0x70;
    memcpy(body + 36, "\x04\x00\x02xx\x02\x00\x09localhost", 17);
    n = v2(buf, 0x21, 0x21, 36 + 17, body, 36 + 17);
    good_v2(buf, n, &h);
    assert_v6(&h.src, "2001:db8::7", 443);
    assert_v6(&h.dst, "2001:db8::1", 6000);

    /* LOCAL (a balancer's own health check): no address, or one ignored */
    n = v2(buf, 0x20, 0x00, 0, "", 0);
    good_v2(buf, n, &h);
    CU_ASSERT_EQUAL(h.command, PP_LOCAL);
    n = v2(buf, 0x20, 0x11, 12, inet_body, 12);
    good_v2(buf, n, &h);
    CU_ASSERT_EQUAL(h.command, PP_LOCAL);
    CU_ASSERT_EQUAL(h.src.ss_family, 0);

    /* PROXY over AF_UNSPEC: the socket's addresses */
    n = v2(buf, 0x21, 0x00, 4, "abcd", 4);
    good_v2(buf, n, &h);
    CU_ASSERT_EQUAL(h.command, PP_LOCAL);

    /* the longest accepted: 512 bytes after the fixed 16 */
    memset(body, 0, sizeof body);
    memcpy(body, inet_body, 12);
    body[12] = 0x04, body[13] = (512 - 15) >> 8, body[14] = (512 - 15) & 0xff;
    n = v2(buf, 0x21, 0x11, 512, body, 512);
    CU_ASSERT_EQUAL(n, PP_MAX_HEADER);
    good_v2(buf, n, &h);
    assert_v4(&h.src, "203.0.113.7", 40000);
}

static void test_v2_bad(void)
{
    unsigned char buf[1024], body[600];
    size_t n;

    memset(body, 0, sizeof body);
    memcpy(body, inet_body, 12);
    check_bad((const char *)buf, v2(buf, 0x11, 0x11, 12, body, 12)); /* version 1 */
    check_bad((const char *)buf, v2(buf, 0x31, 0x11, 12, body, 12)); /* version 3 */
    check_bad((const char *)buf, v2(buf, 0x22, 0x11, 12, body, 12)); /* command 2 */
    check_bad((const char *)buf, v2(buf, 0x21, 0x12, 12, body, 12)); /* DGRAM */
    check_bad((const char *)buf, v2(buf, 0x21, 0x10, 12, body, 12)); /* proto 0 */
    check_bad((const char *)buf, v2(buf, 0x21, 0x31, 216, body, 216)); /* AF_UNIX */
    check_bad((const char *)buf, v2(buf, 0x21, 0x41, 12, body, 12)); /* family 4 */
    check_bad((const char *)buf, v2(buf, 0x21, 0x11, 11, body, 11)); /* short */
    check_bad((const char *)buf, v2(buf, 0x21, 0x21, 12, body, 12)); /* short v6 */
    check_bad((const char *)buf, v2(buf, 0x21, 0x11, 513, body, 513)); /* too long */
    check_bad((const char *)buf, v2(buf, 0x21, 0x11, 0xffff, body, 20));
    /* a TLV longer than what is left, a cut TLV head */
    body[12] = 0x04, body[13] = 0, body[14] = 5;
    check_bad((const char *)buf, v2(buf, 0x21, 0x11, 12 + 3 + 4, body, 12 + 3 + 4));
    check_bad((const char *)buf, v2(buf, 0x21, 0x11, 12 + 2, body, 12 + 2));
    /* the signature broken at each of its bytes */
    for (size_t i = 0; i < 12; i++) {
        n = v2(buf, 0x21, 0x11, 12, inet_body, 12);
        buf[i] ^= 0x20;
        check_bad((const char *)buf, n);
    }
}

/* ---- properties ------------------------------------------------------- */

/* Random inputs that start like a header: a verdict, once given, stays, and
 * PP_MAX_HEADER bytes always bring one. */
static void test_random_monotone(void)
{
    unsigned char buf[PP_MAX_HEADER + 8];
    struct pp_header h;
    size_t used, first_used;
    int bad = 0;

    srand(12);
    for (int it = 0; it < 3000; it++) {
        int verdict = PP_NEED_MORE;
        for (size_t i = 0; i < sizeof buf; i++)
            buf[i] = (unsigned char)rand();
        if (it % 3 == 0) {
            memcpy(buf, sig, 12);
            buf[12] = (unsigned char)(it & 1 ? 0x21 : 0x20);
            buf[13] = (unsigned char)(0x11 + ((it / 3) % 3) * 0x10);
            buf[14] = (unsigned char)((it / 7) % 3);
        } else if (it % 3 == 1) {
            memcpy(buf, "PROXY TCP4 1.2.3.4 5.6.7.8 ", 27);
            for (size_t i = 27; i < 27 + (size_t)(it % 80); i++)
                buf[i] = (unsigned char)("0123456789 \r\n:."[rand() % 15]);
        } else {
            memcpy(buf, "PROXY UNKNOWN ", 14);
            buf[14 + it % 90] = '\r';
            buf[15 + it % 90] = '\n';
        }
        first_used = 0;
        for (size_t k = 0; k <= sizeof buf; k++) {
            int r = pp_parse((const char *)buf, k, &h, &used);
            if (verdict == PP_NEED_MORE && r != PP_NEED_MORE) {
                verdict = r;
                first_used = used;
            } else if (r != verdict || (r == PP_DONE && used != first_used))
                bad++;
            if (k >= PP_MAX_HEADER && r == PP_NEED_MORE)
                bad++;
        }
    }
    CU_ASSERT_EQUAL(bad, 0);
}

int main(void)
{
    CU_pSuite s;
    unsigned failed;

    if (CU_initialize_registry() != CUE_SUCCESS)
        return 2;
    s = CU_add_suite("proxyproto", NULL, NULL);
    CU_add_test(s, "v1 good headers, every split", test_v1_good);
    CU_add_test(s, "v1 UNKNOWN at 107 bytes, 108 refused", test_v1_unknown_longest);
    CU_add_test(s, "v1 bad headers, every split", test_v1_bad);
    CU_add_test(s, "v1 without CRLF within 107 bytes", test_v1_no_crlf_in_107);
    CU_add_test(s, "v2 good headers, every split", test_v2_good);
    CU_add_test(s, "v2 bad headers, every split", test_v2_bad);
    CU_add_test(s, "random inputs: verdicts stay, always one by PP_MAX_HEADER",
                test_random_monotone);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failed = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failed ? 1 : 0;
}
