/*
 * test_ratelimit.c - CUnit tests of core/ratelimit.c's pure parts: the
 * [limits] value syntax and the token bucket (refill, burst cap, debt).
 */
#include <string.h>

#include <CUnit/Basic.h>

#include "core.h"

static void test_parse_rate(void)
{
    struct rl_rate r;

    CU_ASSERT_EQUAL(rl_parse_rate("50/s burst 100", &r), 0);
    CU_ASSERT_DOUBLE_EQUAL(r.rate, 50, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(r.burst, 100, 1e-9);
    CU_ASSERT_EQUAL(rl_parse_rate("256k/s burst 1m", &r), 0);
    CU_ASSERT_DOUBLE_EQUAL(r.rate, 262144, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(r.burst, 1048576, 1e-9);
    CU_ASSERT_EQUAL(rl_parse_rate("6/m", &r), 0); /* burst: one second's worth, >= 1 */
    CU_ASSERT_DOUBLE_EQUAL(r.rate, 0.1, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(r.burst, 6, 1e-9);
    CU_ASSERT_EQUAL(rl_parse_rate("1/h burst 3", &r), 0);
    CU_ASSERT_DOUBLE_EQUAL(r.rate, 1.0 / 3600, 1e-12);
    CU_ASSERT_EQUAL(rl_parse_rate("off", &r), 0);
    CU_ASSERT_DOUBLE_EQUAL(r.rate, 0, 1e-9);
    CU_ASSERT_EQUAL(rl_parse_rate("0", &r), 0);
    CU_ASSERT_EQUAL(rl_parse_rate("50", &r), -1);
    CU_ASSERT_EQUAL(rl_parse_rate("50/d", &r), -1);
    CU_ASSERT_EQUAL(rl_parse_rate("-5/s", &r), -1);
    CU_ASSERT_EQUAL(rl_parse_rate("0/s", &r), -1);
    CU_ASSERT_EQUAL(rl_parse_rate("5/s burst", &r), -1);
    CU_ASSERT_EQUAL(rl_parse_rate("5/s burst 0", &r), -1);
    CU_ASSERT_EQUAL(rl_parse_rate("5/s junk", &r), -1);
}

static void test_parse_class(void)
{
    struct rl_class c;

    CU_ASSERT_EQUAL(rl_parse_class("chat", "6,10 20/s burst 40", &c), 0);
    CU_ASSERT_STRING_EQUAL(c.name, "chat");
    CU_ASSERT_EQUAL(c.nmsgids, 2);
    CU_ASSERT_EQUAL(c.msgids[0], 6);
    CU_ASSERT_EQUAL(c.msgids[1], 10);
    CU_ASSERT_DOUBLE_EQUAL(c.r.rate, 20, 1e-9);
    CU_ASSERT_EQUAL(rl_parse_class("auth", "1, 4 2/s", &c), 0);
    CU_ASSERT_EQUAL(c.nmsgids, 2);
    CU_ASSERT_EQUAL(rl_parse_class("Bad", "6 1/s", &c), -1);
    CU_ASSERT_EQUAL(rl_parse_class("x", "1/s", &c), -1);  /* no msgid */
    CU_ASSERT_EQUAL(rl_parse_class("x", "6 off", &c), -1); /* a class is a limit */
    CU_ASSERT_EQUAL(rl_parse_class("x", "6,", &c), -1);
}

static void test_bucket(void)
{
    struct rl_rate r = {10, 5}; /* 10 a second, burst 5 */
    struct rl_bucket b = {0, 0};
    uint64_t t = 1000;

    CU_ASSERT_TRUE(rl_bucket_full(&b, &r, t));
    for (int i = 0; i < 5; i++) {
        CU_ASSERT_EQUAL(rl_bucket_wait(&b, &r, t, 1), 0);
        rl_bucket_take(&b, &r, t, 1);
    }
    CU_ASSERT_EQUAL(rl_bucket_wait(&b, &r, t, 1), 100); /* one token: 100 ms */
    CU_ASSERT_EQUAL(rl_bucket_wait(&b, &r, t + 50, 1), 50);
    CU_ASSERT_EQUAL(rl_bucket_wait(&b, &r, t + 100, 1), 0);
    /* debt: take 3 more at once, then wait it off */
    rl_bucket_take(&b, &r, t + 100, 3);
    CU_ASSERT_EQUAL(rl_bucket_wait(&b, &r, t + 100, 1), 300);
    CU_ASSERT_FALSE(rl_bucket_full(&b, &r, t + 500));
    CU_ASSERT_TRUE(rl_bucket_full(&b, &r, t + 100 + 700));
    /* never above the burst, however long it rested */
    rl_bucket_take(&b, &r, t + 100000, 5);
    CU_ASSERT_EQUAL(rl_bucket_wait(&b, &r, t + 100000, 1), 100);
    /* a cost over the burst is capped (a big frame is not refused for ever) */
    CU_ASSERT_EQUAL(rl_bucket_wait(&b, &r, t + 200000, 1000), 0);
    /* off: never waits */
    r.rate = 0;
    CU_ASSERT_EQUAL(rl_bucket_wait(&b, &r, t, 1e9), 0);
}

int main(void)
{
    CU_pSuite s;
    unsigned failed;

    if (CU_initialize_registry() != CUE_SUCCESS)
        return 2;
    s = CU_add_suite("ratelimit", NULL, NULL);
    CU_add_test(s, "rates: RATE/UNIT [burst N], off", test_parse_rate);
    CU_add_test(s, "classes: MSGIDs and a rate", test_parse_class);
    CU_add_test(s, "bucket: burst, refill, debt, cap", test_bucket);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failed = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failed ? 1 : 0;
}
