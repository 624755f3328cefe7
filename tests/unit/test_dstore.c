/*
 * test_dstore.c - CUnit tests of the durable-message helpers that the
 * one2one, group and store plugins share (plugins/store/dstore.h):
 * conversation ids and their wire names (round trips, and every malformed
 * name refused), the rendering of a stored body with mid/conv/cseq, and
 * the text ACK of a stored message (ds_reply_ok).
 */
#include <stdlib.h>
#include <string.h>

#include <CUnit/Basic.h>

#include "dstore.h"

static void *t_malloc(size_t n) { return malloc(n); }
static void t_free(void *p) { free(p); }

static int64_t parse(const char *s) { return ds_conv_parse(s, strlen(s)); }

static void test_pair_ids(void)
{
    char buf[DS_CONV_STR];
    int64_t c = ds_conv_pair(8, 3), a, b;

    CU_ASSERT(c > 0);
    CU_ASSERT_EQUAL(c, ds_conv_pair(3, 8)); /* either direction, one conversation */
    ds_conv_users(c, &a, &b);
    CU_ASSERT_EQUAL(a, 3);
    CU_ASSERT_EQUAL(b, 8);
    CU_ASSERT_EQUAL(ds_conv_format(c, buf, sizeof buf), strlen("p3:8"));
    CU_ASSERT_STRING_EQUAL(buf, "p3:8");
    CU_ASSERT_EQUAL(parse("p3:8"), c);
    c = ds_conv_pair(DS_UID_MAX, DS_UID_MAX - 1);
    ds_conv_format(c, buf, sizeof buf);
    CU_ASSERT_STRING_EQUAL(buf, "p2147483646:2147483647");
    CU_ASSERT_EQUAL(parse(buf), c);
    c = ds_conv_pair(5, 5); /* a user's notes to itself */
    ds_conv_format(c, buf, sizeof buf);
    CU_ASSERT_STRING_EQUAL(buf, "p5:5");
    CU_ASSERT_EQUAL(parse("p5:5"), c); /* SYNC hands it out, so it parses */
}

static void test_group_ids(void)
{
    char buf[DS_CONV_STR];
    int64_t c = ds_conv_group(42), a, b;

    CU_ASSERT(c < 0);
    ds_conv_users(c, &a, &b);
    CU_ASSERT_EQUAL(a, 0);
    CU_ASSERT_EQUAL(b, 0);
    ds_conv_format(c, buf, sizeof buf);
    CU_ASSERT_STRING_EQUAL(buf, "g42");
    CU_ASSERT_EQUAL(parse("g42"), c);
    CU_ASSERT_EQUAL(parse("g9223372036854775807"), -INT64_MAX);
}

static void test_bad_names(void)
{
    static const char *const bad[] = {
        "", "p", "g", "x1", "p1", "p1:", "p:2", "p2:1", "p3:3x", "p01:2", "p1:02",
        "p0:1", "g0", "g01", "g-1", "g1 ", " g1", "p1:2147483648", "p2147483648:2147483649",
        "g9223372036854775808", "P1:2", "G1", "p1;2", "g1:2",
    };
    size_t i;

    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (parse(bad[i]) != 0)
            fprintf(stderr, "accepted: \"%s\"\n", bad[i]);
        CU_ASSERT_EQUAL(parse(bad[i]), 0);
    }
}

static void test_render(void)
{
    struct chat_host h;
    size_t n;
    char *out;

    memset(&h, 0, sizeof h);
    h.malloc = t_malloc;
    h.free = t_free;
    out = ds_render(&h, ds_conv_pair(1, 2), 9001, 5, "{\"msgid\":6,\"msg\":\"hi\"}", 22, &n);
    CU_ASSERT_PTR_NOT_NULL_FATAL(out);
    CU_ASSERT_STRING_EQUAL(out, "{\"msgid\":6,\"msg\":\"hi\",\"mid\":9001,\"conv\":\"p1:2\",\"cseq\":5}");
    CU_ASSERT_EQUAL(n, strlen(out));
    free(out);
    out = ds_render(&h, ds_conv_group(7), 1, 1, "{}", 2, &n); /* no comma after "{" */
    CU_ASSERT_PTR_NOT_NULL_FATAL(out);
    CU_ASSERT_STRING_EQUAL(out, "{\"mid\":1,\"conv\":\"g7\",\"cseq\":1}");
    free(out);
    CU_ASSERT_PTR_NULL(ds_render(&h, 1, 1, 1, "[1]", 3, &n)); /* not an object */
    CU_ASSERT_PTR_NULL(ds_render(&h, 1, 1, 1, "", 0, &n));
}

static void test_fmt(void)
{
    char buf[DS_CONV_STR];

    buf[ds_fmt_i64(buf, 0)] = '\0';
    CU_ASSERT_STRING_EQUAL(buf, "0");
    buf[ds_fmt_i64(buf, -42)] = '\0';
    CU_ASSERT_STRING_EQUAL(buf, "-42");
    buf[ds_fmt_i64(buf, INT64_MAX)] = '\0';
    CU_ASSERT_STRING_EQUAL(buf, "9223372036854775807");
    buf[ds_fmt_i64(buf, INT64_MIN)] = '\0';
    CU_ASSERT_STRING_EQUAL(buf, "-9223372036854775808");
    CU_ASSERT_EQUAL(ds_conv_format(ds_conv_group(INT64_MAX), buf, sizeof buf),
                    strlen("g9223372036854775807"));
    CU_ASSERT_STRING_EQUAL(buf, "g9223372036854775807");
}

static char sent[512];
static int proto = CHAT_PROTO_2;

static int t_proto(const struct chat_session *s) { (void)s; return proto; }
static int t_send_raw(struct chat_session *s, const char *json, size_t len)
{
    (void)s;
    CU_ASSERT_EQUAL(strlen(json), len);
    snprintf(sent, sizeof sent, "%.*s", (int)len, json);
    return CHAT_OK;
}

/* The text ACK has the bytes disp_reply printed for the same fields. */
static void test_reply_ok(void)
{
    struct chat_host h;
    struct chat_ack ack = {6, 1, 41};

    memset(&h, 0, sizeof h);
    h.session_proto = t_proto;
    h.send_raw = t_send_raw;
    ds_reply_ok(&h, NULL, &ack, ds_conv_pair(7, 8), 9001, 5, 0);
    CU_ASSERT_STRING_EQUAL(sent, "{\"msgid\":11,\"req\":6,\"seq\":41,\"errno\":0,"
                           "\"errmsg\":\"ok\",\"mid\":9001,\"conv\":\"p7:8\",\"cseq\":5}");
    ack.msgid = 10;
    ack.has_seq = 0;
    ds_reply_ok(&h, NULL, &ack, ds_conv_group(3), 12, 1, 1);
    CU_ASSERT_STRING_EQUAL(sent, "{\"msgid\":11,\"req\":10,\"errno\":0,\"errmsg\":\"ok\","
                           "\"mid\":12,\"conv\":\"g3\",\"cseq\":1,\"dup\":true}");
    proto = 1; /* not protocol 2: nothing sent */
    sent[0] = '\0';
    ds_reply_ok(&h, NULL, &ack, ds_conv_group(3), 12, 1, 0);
    CU_ASSERT_STRING_EQUAL(sent, "");
    proto = CHAT_PROTO_2;
}

int main(void)
{
    CU_pSuite s;

    if (CU_initialize_registry() != CUE_SUCCESS)
        return 1;
    s = CU_add_suite("dstore", NULL, NULL);
    CU_add_test(s, "pair conversations", test_pair_ids);
    CU_add_test(s, "group conversations", test_group_ids);
    CU_add_test(s, "malformed names refused", test_bad_names);
    CU_add_test(s, "a stored body rendered with mid/conv/cseq", test_render);
    CU_add_test(s, "digits without printf", test_fmt);
    CU_add_test(s, "the text ACK of a stored message", test_reply_ok);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    {
        unsigned failed = CU_get_number_of_failures();

        CU_cleanup_registry();
        return failed ? 1 : 0;
    }
}
