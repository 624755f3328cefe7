/*
 * test_admin.c - CUnit tests of the admin listener's request glue
 * (core/admin.c): parsing with http-parser fed whole and byte by byte, the
 * bounds (413, 414, 431, 400), routing (404, 405, user ids) and query
 * integers.  Links chatcore; no socket is opened.
 */
#include <stdlib.h>
#include <string.h>

#include <CUnit/Basic.h>

#include "core.h"

static struct adm_req req; /* large: not on the stack */

static int feed_whole(const char *s)
{
    adm_req_free(&req);
    adm_req_init(&req);
    return adm_req_feed(&req, s, strlen(s));
}

static int feed_bytes(const char *s)
{
    int rc = 0;
    adm_req_free(&req);
    adm_req_init(&req);
    for (size_t i = 0; s[i] && rc == 0; i++)
        rc = adm_req_feed(&req, s + i, 1);
    return rc;
}

static void test_parse(void)
{
    const char *kick = "POST /users/42/kick HTTP/1.1\r\nHost: x\r\n"
                       "AUTHORIZATION: Bearer sekrit\r\nContent-Length: 14\r\n\r\n"
                       "{\"text\":\"bye\"}";
    for (int pass = 0; pass < 2; pass++) {
        CU_ASSERT_EQUAL(pass ? feed_bytes(kick) : feed_whole(kick), 1);
        CU_ASSERT_STRING_EQUAL(req.url, "/users/42/kick");
        CU_ASSERT_STRING_EQUAL(req.auth, "Bearer sekrit");
        CU_ASSERT_EQUAL(req.body_len, 14);
        CU_ASSERT_STRING_EQUAL(req.body, "{\"text\":\"bye\"}");
        CU_ASSERT_EQUAL(req.method, HTTP_POST);
    }
    /* incomplete, then the rest */
    adm_req_free(&req);
    adm_req_init(&req);
    CU_ASSERT_EQUAL(adm_req_feed(&req, "GET /healthz HTTP/1.1\r\n", 23), 0);
    CU_ASSERT_EQUAL(adm_req_feed(&req, "", 0), 0); /* not an EOF */
    CU_ASSERT_EQUAL(adm_req_feed(&req, "\r\n", 2), 1);
    /* a second, pipelined request is not parsed */
    CU_ASSERT_EQUAL(feed_whole("GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"), 1);
    CU_ASSERT_STRING_EQUAL(req.url, "/a");
}

static void test_bounds(void)
{
    char *big = malloc(100000);
    size_t n;

    n = (size_t)sprintf(big, "POST /notice HTTP/1.1\r\nContent-Length: 65537\r\n\r\n");
    CU_ASSERT_EQUAL(feed_whole(big), 413);
    n = (size_t)sprintf(big, "POST /notice HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                             "10001\r\n");
    memset(big + n, 'x', 65537);
    big[n + 65537] = '\0';
    CU_ASSERT_EQUAL(feed_whole(big), 413);
    n = (size_t)sprintf(big, "GET /");
    memset(big + n, 'a', 3000);
    strcpy(big + n + 3000, " HTTP/1.1\r\n\r\n");
    CU_ASSERT_EQUAL(feed_whole(big), 414);
    n = (size_t)sprintf(big, "GET / HTTP/1.1\r\nX: ");
    memset(big + n, 'a', 9000);
    strcpy(big + n + 9000, "\r\n\r\n");
    CU_ASSERT_EQUAL(feed_whole(big), 431);
    CU_ASSERT_EQUAL(feed_bytes(big), 431);
    n = (size_t)sprintf(big, "GET / HTTP/1.1\r\nAuthorization: ");
    memset(big + n, 'a', 600);
    strcpy(big + n + 600, "\r\n\r\n");
    CU_ASSERT_EQUAL(feed_whole(big), 431);
    CU_ASSERT_EQUAL(feed_whole("\x16\x03\x01 hello\r\n\r\n"), 400);
    /* an Upgrade header is ignored: a plain answer, then close */
    CU_ASSERT_EQUAL(feed_whole("GET / HTTP/1.1\r\nUpgrade: websocket\r\n"
                               "Connection: Upgrade\r\n\r\n"), 1);
    CU_ASSERT_EQUAL(feed_whole("CONNECT x:1 HTTP/1.1\r\n\r\n") == 1 ||
                        feed_whole("CONNECT x:1 HTTP/1.1\r\n\r\n") == 400, 1);
    free(big);
}

static int route(const char *method, const char *url, struct adm_route *rt)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s %s HTTP/1.1\r\nContent-Length: 0\r\n\r\n", method, url);
    CU_ASSERT_EQUAL_FATAL(feed_whole(buf), 1);
    return adm_route(&req, rt);
}

static void test_route(void)
{
    struct adm_route rt;
    CU_ASSERT_EQUAL(route("GET", "/metrics", &rt), 0);
    CU_ASSERT_EQUAL(rt.ep, ADM_EP_METRICS);
    CU_ASSERT_EQUAL(route("HEAD", "/healthz", &rt), 0);
    CU_ASSERT_EQUAL(route("GET", "/sessions?offset=1&limit=2", &rt), 0);
    CU_ASSERT_EQUAL(rt.ep, ADM_EP_SESSIONS);
    CU_ASSERT_EQUAL(rt.qlen, 16);
    CU_ASSERT_EQUAL(route("GET", "/users/9223372036854775807/presence", &rt), 0);
    CU_ASSERT_EQUAL(rt.uid, INT64_MAX);
    CU_ASSERT_EQUAL(route("POST", "/users/7/kick", &rt), 0);
    CU_ASSERT_EQUAL(rt.ep, ADM_EP_KICK);
    CU_ASSERT_EQUAL(rt.uid, 7);
    CU_ASSERT(rt.post);
    CU_ASSERT_EQUAL(route("POST", "/drain?seconds=5", &rt), 0);
    CU_ASSERT_EQUAL(rt.ep, ADM_EP_DRAIN);
    CU_ASSERT_EQUAL(route("GET", "/users/0/presence", &rt), 404);
    CU_ASSERT_EQUAL(route("GET", "/users/-1/presence", &rt), 404);
    CU_ASSERT_EQUAL(route("GET", "/users/9223372036854775808/presence", &rt), 404);
    CU_ASSERT_EQUAL(route("GET", "/users/1/presence/", &rt), 404);
    CU_ASSERT_EQUAL(route("GET", "/metricsx", &rt), 404);
    CU_ASSERT_EQUAL(route("POST", "/metrics", &rt), 405);
    CU_ASSERT_EQUAL(route("GET", "/reload", &rt), 405);
    CU_ASSERT_EQUAL(route("PUT", "/notice", &rt), 405);
    CU_ASSERT_EQUAL(route("DELETE", "/healthz", &rt), 405);
}

static void test_query(void)
{
    const char *q = "a=1&limit=20&offset=&x=-3&big=99999999999999999999&limit=7"
                    "&max=9223372036854775807&over=9223372036854775808";
    int64_t v = -5;
    CU_ASSERT_EQUAL(adm_query_int(q, strlen(q), "limit", 0, 100, &v), 1);
    CU_ASSERT_EQUAL(v, 20); /* the first one */
    CU_ASSERT_EQUAL(adm_query_int(q, strlen(q), "limit", 0, 10, &v), -1);
    CU_ASSERT_EQUAL(adm_query_int(q, strlen(q), "offset", 0, 10, &v), -1);
    CU_ASSERT_EQUAL(adm_query_int(q, strlen(q), "x", -10, 10, &v), -1);
    CU_ASSERT_EQUAL(adm_query_int(q, strlen(q), "big", 0, INT64_MAX, &v), -1);
    CU_ASSERT_EQUAL(adm_query_int(q, strlen(q), "lim", 0, 100, &v), 0);
    CU_ASSERT_EQUAL(adm_query_int(q, strlen(q), "max", 0, INT64_MAX, &v), 1);
    CU_ASSERT_EQUAL(v, INT64_MAX);
    CU_ASSERT_EQUAL(adm_query_int(q, strlen(q), "over", 0, INT64_MAX, &v), -1);
    CU_ASSERT_EQUAL(adm_query_int(NULL, 0, "limit", 0, 100, &v), 0);
}

int main(void)
{
    CU_pSuite s;
    unsigned failed;

    mem_init();
    if (CU_initialize_registry() != CUE_SUCCESS)
        return 1;
    s = CU_add_suite("admin", NULL, NULL);
    CU_add_test(s, "parse whole and byte by byte, pipelining", test_parse);
    CU_add_test(s, "bounds: 413, 414, 431, 400", test_bounds);
    CU_add_test(s, "routes, 404, 405", test_route);
    CU_add_test(s, "query integers", test_query);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failed = CU_get_number_of_failures();
    CU_cleanup_registry();
    adm_req_free(&req);
    return failed ? 1 : 0;
}
