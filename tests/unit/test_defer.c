/*
 * test_defer.c - CUnit tests of the deferral queue (core/defer.c) on a
 * private loop: nothing runs inside the call that queued it, calls run in
 * the order queued, what a call queues waits for the next turn, a
 * cancelled item (even one of the drain under way) never runs, and
 * defer_stop lets what is queued run before the handle closes, so the loop
 * ends with every handle closed.
 */
#include <string.h>

#include <CUnit/Basic.h>

#include "core.h"

static uv_loop_t loop;
static char trace[64];
static size_t ntrace;

static void note(char c)
{
    if (ntrace < sizeof trace - 1)
        trace[ntrace++] = c;
    trace[ntrace] = '\0';
}

static void setup(void)
{
    ntrace = 0;
    trace[0] = '\0';
    CU_ASSERT_FATAL(uv_loop_init(&loop) == 0);
    defer_init(&loop);
}

/* defer_stop, then the loop must end by itself with nothing left open. */
static void teardown(void)
{
    defer_stop();
    CU_ASSERT(uv_run(&loop, UV_RUN_DEFAULT) == 0);
    CU_ASSERT(uv_loop_close(&loop) == 0);
}

static void call_note(void *arg) { note(*(const char *)arg); }

static void test_order(void)
{
    static const char a = 'a', b = 'b', c = 'c';

    setup();
    CU_ASSERT(defer_call(call_note, (void *)&a) == CHAT_OK);
    CU_ASSERT(defer_call(call_note, (void *)&b) == CHAT_OK);
    CU_ASSERT(defer_call(call_note, (void *)&c) == CHAT_OK);
    CU_ASSERT_STRING_EQUAL(trace, ""); /* never inside the call */
    uv_run(&loop, UV_RUN_NOWAIT);
    CU_ASSERT_STRING_EQUAL(trace, "abc");
    teardown();
}

/* An item that queues again runs once per turn, not in a loop. */
static int again_left;
static struct defer_item again;

static void again_run(struct defer_item *it)
{
    note('x');
    if (--again_left > 0)
        CU_ASSERT(defer_add(it) == CHAT_OK);
}

static void test_next_turn(void)
{
    setup();
    again_left = 3;
    defer_item_init(&again, again_run);
    CU_ASSERT(defer_add(&again) == CHAT_OK);
    CU_ASSERT(defer_add(&again) == CHAT_OK); /* queued once only */
    uv_run(&loop, UV_RUN_NOWAIT);
    CU_ASSERT_STRING_EQUAL(trace, "x");
    uv_run(&loop, UV_RUN_NOWAIT);
    CU_ASSERT_STRING_EQUAL(trace, "xx");
    uv_run(&loop, UV_RUN_NOWAIT);
    CU_ASSERT_STRING_EQUAL(trace, "xxx");
    uv_run(&loop, UV_RUN_NOWAIT);
    CU_ASSERT_STRING_EQUAL(trace, "xxx");
    teardown();
}

/* p cancels q, which was queued in the same drain after it. */
static struct defer_item p, q, r;

static void p_run(struct defer_item *it)
{
    (void)it;
    note('p');
    defer_cancel(&q);
}

static void q_run(struct defer_item *it)
{
    (void)it;
    note('q');
}

static void r_run(struct defer_item *it)
{
    (void)it;
    note('r');
}

static void test_cancel(void)
{
    setup();
    defer_item_init(&p, p_run);
    defer_item_init(&q, q_run);
    defer_item_init(&r, r_run);
    defer_add(&p);
    defer_add(&q);
    defer_add(&r);
    uv_run(&loop, UV_RUN_NOWAIT);
    CU_ASSERT_STRING_EQUAL(trace, "pr");
    CU_ASSERT(!q.queued);
    defer_add(&q);
    defer_add(&r);
    defer_cancel(&r); /* the tail: q must still run, r not */
    defer_add(&p);
    uv_run(&loop, UV_RUN_NOWAIT);
    CU_ASSERT_STRING_EQUAL(trace, "prqp");
    teardown();
}

static void test_stop_runs_queued(void)
{
    static const char z = 'z';

    setup();
    CU_ASSERT(defer_call(call_note, (void *)&z) == CHAT_OK);
    defer_stop();
    CU_ASSERT(uv_run(&loop, UV_RUN_DEFAULT) == 0);
    CU_ASSERT_STRING_EQUAL(trace, "z");
    CU_ASSERT(defer_call(call_note, (void *)&z) == CHAT_ERR_CLOSED);
    CU_ASSERT(uv_loop_close(&loop) == 0);
}

int main(void)
{
    CU_pSuite s;
    unsigned failed;

    mem_init();
    if (CU_initialize_registry() != CUE_SUCCESS)
        return 2;
    s = CU_add_suite("defer", NULL, NULL);
    CU_add_test(s, "later, in the order queued", test_order);
    CU_add_test(s, "queued from a call: the next turn", test_next_turn);
    CU_add_test(s, "cancel, also within the drain under way", test_cancel);
    CU_add_test(s, "defer_stop runs what is queued, then closes", test_stop_runs_queued);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failed = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failed ? 1 : 0;
}
