/*
 * test_pwhash.c - CUnit tests of the login plugin's hashing queue
 * (plugins/login/pwhash.c) against a fake host: work() only records the
 * job, and the test finishes jobs one at a time in the order the queue
 * handed them out.  Checks the address key (IPv4 whole, IPv6 per /64), the
 * round robin between addresses, hash_per_address, and the full queue
 * giving way to a lighter address (issue 14, defect 4).  No hashing runs:
 * a finished job without a result reports an error, which is all the
 * order tests need.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <CUnit/Basic.h>

#include "login.h"

/* ---- what pwhash.c takes from the rest of the plugin -------------------- */
const struct chat_host *login_host;
struct chat_plugin *login_self;
struct login_conf login_cfg;

int login_bucket_take(struct login_bucket *b, double rate, double burst)
{
    (void)b;
    (void)rate;
    (void)burst;
    return 1;
}

/* ---- the fake host ----------------------------------------------------- */
#define MAX_JOBS 64

static struct {
    chat_done_fn done;
    void *ud;
} started[MAX_JOBS];
static size_t nstarted, nfinished;
static const char *peer = "127.0.0.1:5000";
static int log_level = CHAT_LOG_ERROR - 1; /* quiet */

static void *f_malloc(size_t n) { return malloc(n); }
static void f_free(void *p) { free(p); }
static void f_log(struct chat_plugin *self, int level, const char *fmt, ...)
{
    (void)self;
    (void)level;
    (void)fmt;
}
static const char *f_peer(const struct chat_session *s)
{
    (void)s;
    return peer;
}
static int f_work(struct chat_plugin *self, chat_work_fn work_fn, chat_done_fn done_fn,
                  void *ud)
{
    (void)self;
    (void)work_fn;
    CU_ASSERT_FATAL(nstarted < MAX_JOBS);
    started[nstarted].done = done_fn;
    started[nstarted].ud = ud;
    nstarted++;
    return CHAT_OK;
}

static const struct chat_host fake = {
    .size = sizeof(struct chat_host),
    .log_level = &log_level,
    .malloc = f_malloc,
    .free = f_free,
    .log = f_log,
    .session_peer = f_peer,
    .work = f_work,
};

/* ---- jobs: each remembers its tag; callbacks log the order ------------- */
static int order[MAX_JOBS], norder;
static int busy[MAX_JOBS], nbusy;

static void cb(int status, int match, const char *hash, void *ud)
{
    int tag = (int)(intptr_t)ud;

    (void)match;
    (void)hash;
    if (status == CHAT_ERR_BUSY)
        busy[nbusy++] = tag;
    else
        order[norder++] = tag;
}

static struct login_addr addr(const char *p)
{
    struct login_addr a;

    peer = p;
    CU_ASSERT_EQUAL(login_addr_of(NULL, &a), 0);
    return a;
}

static int submit(const char *p, int tag)
{
    struct login_addr a = addr(p);

    return login_pw_hash("pw", 2, &a, cb, (void *)(intptr_t)tag);
}

/* Finish the oldest running job (the fake has one thread's worth). */
static void finish_one(void)
{
    CU_ASSERT_FATAL(nfinished < nstarted);
    started[nfinished].done(CHAT_OK, started[nfinished].ud);
    nfinished++;
}

static void drain(void)
{
    while (nfinished < nstarted)
        finish_one();
}

static void reset(size_t threads, size_t queue_max, size_t per_address)
{
    drain();
    memset(&login_cfg, 0, sizeof(login_cfg));
    login_cfg.hash_threads = threads;
    login_cfg.hash_queue_max = queue_max;
    login_cfg.hash_per_address = per_address;
    login_cfg.hash_budget = 100;
    nstarted = nfinished = 0;
    norder = nbusy = 0;
}

/* ---- tests ------------------------------------------------------------- */

static void test_addr_keys(void)
{
    struct login_addr a, b;

    a = addr("10.1.2.3:1");
    b = addr("10.1.2.3:2");
    CU_ASSERT_EQUAL(memcmp(&a, &b, sizeof(a)), 0); /* the port does not count */
    b = addr("10.1.2.4:1");
    CU_ASSERT_NOT_EQUAL(memcmp(&a, &b, sizeof(a)), 0);
    a = addr("[2001:db8:1:2::1]:5");
    b = addr("[2001:db8:1:2:ffff:1:2:3]:6");
    CU_ASSERT_EQUAL(memcmp(&a, &b, sizeof(a)), 0); /* one /64 */
    b = addr("[2001:db8:1:3::1]:5");
    CU_ASSERT_NOT_EQUAL(memcmp(&a, &b, sizeof(a)), 0);
    a = addr("[::ffff:10.1.2.3]:1"); /* v4-mapped: the IPv4 address, whole */
    b = addr("10.1.2.3:9");
    CU_ASSERT_EQUAL(memcmp(&a, &b, sizeof(a)), 0);
    b = addr("[::ffff:10.1.2.4]:1");
    CU_ASSERT_NOT_EQUAL(memcmp(&a, &b, sizeof(a)), 0);
    peer = "?";
    CU_ASSERT_EQUAL(login_addr_of(NULL, &a), -1);
}

static void test_round_robin(void)
{
    int i;

    reset(1, 0, 0);
    /* A floods with 5, then B and C ask once each */
    for (i = 0; i < 5; i++)
        CU_ASSERT_EQUAL(submit("10.0.0.1:1", 10 + i), CHAT_OK);
    CU_ASSERT_EQUAL(submit("10.0.0.2:1", 20), CHAT_OK);
    CU_ASSERT_EQUAL(submit("10.0.0.3:1", 30), CHAT_OK);
    drain();
    CU_ASSERT_EQUAL(norder, 7);
    /* A's first ran at once; then A, B, C take turns */
    CU_ASSERT_EQUAL(order[0], 10);
    CU_ASSERT_EQUAL(order[1], 11);
    CU_ASSERT_EQUAL(order[2], 20);
    CU_ASSERT_EQUAL(order[3], 30);
    CU_ASSERT_EQUAL(order[4], 12);
    CU_ASSERT_EQUAL(order[6], 14);
}

static void test_per_address_limit(void)
{
    reset(1, 0, 3);
    CU_ASSERT_EQUAL(submit("10.0.0.1:1", 1), CHAT_OK);
    CU_ASSERT_EQUAL(submit("10.0.0.1:2", 2), CHAT_OK);
    CU_ASSERT_EQUAL(submit("10.0.0.1:3", 3), CHAT_OK);
    CU_ASSERT_EQUAL(submit("10.0.0.1:4", 4), LOGIN_ERR_LIMIT);
    CU_ASSERT_EQUAL(submit("[2001:db8::1]:1", 5), CHAT_OK);
    CU_ASSERT_EQUAL(submit("[2001:db8::1]:1", 6), CHAT_OK);
    CU_ASSERT_EQUAL(submit("[2001:db8::2]:1", 7), CHAT_OK); /* same /64 */
    CU_ASSERT_EQUAL(submit("[2001:db8::3]:1", 8), LOGIN_ERR_LIMIT);
    finish_one(); /* one of the first address done: room again */
    CU_ASSERT_EQUAL(submit("10.0.0.1:4", 4), CHAT_OK);
    drain();
    CU_ASSERT_EQUAL(norder, 7);
    CU_ASSERT_EQUAL(nbusy, 0);
}

static void test_full_queue_gives_way(void)
{
    int i;

    reset(1, 4, 0);
    for (i = 0; i < 4; i++)
        CU_ASSERT_EQUAL(submit("10.0.0.1:1", 10 + i), CHAT_OK);
    /* full: B (0 jobs) pushes out A's newest waiting job */
    CU_ASSERT_EQUAL(submit("10.0.0.2:1", 20), CHAT_OK);
    CU_ASSERT_EQUAL(nbusy, 1);
    CU_ASSERT_EQUAL(busy[0], 13);
    /* B now holds 1, A 3: B's second still pushes (3 > 1 + 1) */
    CU_ASSERT_EQUAL(submit("10.0.0.2:1", 21), CHAT_OK);
    CU_ASSERT_EQUAL(nbusy, 2);
    CU_ASSERT_EQUAL(busy[1], 12);
    /* A 2, B 2: a third from B may not push (2 <= 2 + 1): busy */
    CU_ASSERT_EQUAL(submit("10.0.0.2:1", 22), CHAT_ERR_BUSY);
    /* nor may A push itself */
    CU_ASSERT_EQUAL(submit("10.0.0.1:1", 14), CHAT_ERR_BUSY);
    /* a third address (0 jobs) pushes out the newest waiting job of the
     * first of the heaviest (A: 10 running, 11 waiting) */
    CU_ASSERT_EQUAL(submit("10.0.0.3:1", 30), CHAT_OK);
    CU_ASSERT_EQUAL(nbusy, 3);
    CU_ASSERT_EQUAL(busy[2], 11);
    drain();
    CU_ASSERT_EQUAL(norder, 4);
    CU_ASSERT_EQUAL(order[0], 10); /* running: never pushed out */
    CU_ASSERT_EQUAL(order[1], 20);
    CU_ASSERT_EQUAL(order[2], 30);
    CU_ASSERT_EQUAL(order[3], 21);
}

int main(void)
{
    CU_pSuite s;
    int failures;

    login_host = &fake;
    if (CU_initialize_registry() != CUE_SUCCESS)
        return 1;
    s = CU_add_suite("pwhash", NULL, NULL);
    CU_add_test(s, "address keys", test_addr_keys);
    CU_add_test(s, "round robin between addresses", test_round_robin);
    CU_add_test(s, "hash_per_address", test_per_address_limit);
    CU_add_test(s, "a full queue gives way", test_full_queue_gives_way);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failures = (int)CU_get_number_of_failures();
    drain();
    CU_cleanup_registry();
    return failures ? 1 : 0;
}
