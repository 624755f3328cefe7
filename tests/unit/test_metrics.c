/*
 * test_metrics.c - CUnit tests of the metrics registry and its Prometheus
 * text exposition (core/metrics.c), linked alone: label-value and HELP
 * escaping, histogram buckets cumulative with +Inf, _sum and _count,
 * series shared by reference count (a reloaded plugin's instance), clashes
 * refused, a plugin's handles dropped when its instance goes, collectors,
 * and `promtool check metrics` on a rendered sample with traffic-like
 * values in every family.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <CUnit/Basic.h>

#include "core.h"
#include "../prom_sample.h"

static char *render(void)
{
    size_t len = 0;
    char *t = metrics_render(&len);

    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    CU_ASSERT_EQUAL(strlen(t), len);
    return t;
}

static void test_escaping(void)
{
    const char *labels[] = {"who", "a\"b\\c\nd", NULL};
    struct metrics_series *s =
        metrics_series_get(METRICS_COUNTER, "t_escape_total", "Help with \\ and\nnewline.",
                           labels, NULL, 0);
    char *t;

    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    metrics_series_add(s, 3);
    metrics_series_add(s, -1); /* a counter never goes down */
    t = render();
    CU_ASSERT_PTR_NOT_NULL(
        strstr(t, "# HELP t_escape_total Help with \\\\ and\\nnewline.\n"));
    CU_ASSERT_PTR_NOT_NULL(strstr(t, "# TYPE t_escape_total counter\n"));
    CU_ASSERT_EQUAL(prom_sample(t, "t_escape_total{node=\"n\\\"1\",who=\"a\\\"b\\\\c\\nd\"}"), 3);
    mem_free(t);
    metrics_series_put(s);
}

static void test_histogram(void)
{
    const double b[] = {0.1, 1, 10};
    const char *labels[] = {"op", "x", NULL};
    struct metrics_series *s =
        metrics_series_get(METRICS_HISTOGRAM, "t_lat_seconds", "Latency.", labels, b, 3);
    const double obs[] = {0.05, 0.1, 0.5, 5, 50, 50};
    char *t;

    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    for (size_t i = 0; i < sizeof obs / sizeof obs[0]; i++)
        metrics_series_observe(s, obs[i]);
    t = render();
    /* le is "less or equal": 0.1 falls in the first bucket */
    CU_ASSERT_EQUAL(prom_sample(t, "t_lat_seconds_bucket{node=\"n\\\"1\",op=\"x\",le=\"0.1\"}"), 2);
    CU_ASSERT_EQUAL(prom_sample(t, "t_lat_seconds_bucket{node=\"n\\\"1\",op=\"x\",le=\"1\"}"), 3);
    CU_ASSERT_EQUAL(prom_sample(t, "t_lat_seconds_bucket{node=\"n\\\"1\",op=\"x\",le=\"10\"}"), 4);
    CU_ASSERT_EQUAL(prom_sample(t, "t_lat_seconds_bucket{node=\"n\\\"1\",op=\"x\",le=\"+Inf\"}"), 6);
    CU_ASSERT_EQUAL(prom_sample(t, "t_lat_seconds_count{node=\"n\\\"1\",op=\"x\"}"), 6);
    CU_ASSERT_DOUBLE_EQUAL(prom_sample(t, "t_lat_seconds_sum{node=\"n\\\"1\",op=\"x\"}"), 105.65,
                           1e-9);
    CU_ASSERT_PTR_NOT_NULL(strstr(t, "# TYPE t_lat_seconds histogram\n"));
    mem_free(t);
    /* a histogram's series must keep the family's bounds; le is reserved */
    {
        const double other[] = {0.1, 2};
        const char *le[] = {"le", "1", NULL};
        CU_ASSERT_PTR_NULL(metrics_series_get(METRICS_HISTOGRAM, "t_lat_seconds", "",
                                              labels, other, 2));
        CU_ASSERT_PTR_NULL(metrics_series_get(METRICS_HISTOGRAM, "t_le_seconds", "", le,
                                              b, 3));
        const double unsorted[] = {1, 0.5};
        CU_ASSERT_PTR_NULL(metrics_series_get(METRICS_HISTOGRAM, "t_unsorted", "", NULL,
                                              unsorted, 2));
    }
    metrics_series_put(s);
}

static void test_core_histogram(void)
{
    struct metrics_hist h;

    metrics_hist_init(&h, metrics_latency_bounds, METRICS_LATENCY_NB);
    metrics_observe(&h, 0.00005);
    metrics_observe(&h, 0.003);
    metrics_observe(&h, 100);
    CU_ASSERT_EQUAL(h.counts[0], 1);
    CU_ASSERT_EQUAL(h.counts[5], 1); /* 0.0025 < 0.003 <= 0.005 */
    CU_ASSERT_EQUAL(h.counts[METRICS_LATENCY_NB], 1);
    CU_ASSERT_EQUAL(h.count, 3);
}

static void test_sharing_and_clashes(void)
{
    const char *l1[] = {"k", "v", NULL};
    const char *l2[] = {"k", "w", NULL};
    const char *other[] = {"j", "v", NULL};
    struct metrics_series *a = metrics_series_get(METRICS_GAUGE, "t_g", "G.", l1, NULL, 0);
    struct metrics_series *b = metrics_series_get(METRICS_GAUGE, "t_g", "G.", l1, NULL, 0);
    struct metrics_series *c = metrics_series_get(METRICS_GAUGE, "t_g", "G.", l2, NULL, 0);
    char *t;

    CU_ASSERT_PTR_NOT_NULL_FATAL(a);
    CU_ASSERT_PTR_EQUAL(a, b);
    CU_ASSERT_PTR_NOT_NULL_FATAL(c);
    CU_ASSERT_PTR_NOT_EQUAL(a, c);
    metrics_series_set(a, 7);
    metrics_series_add(a, -2);
    CU_ASSERT_EQUAL(metrics_series_value(b), 5);
    /* another type, other label names, bad names: refused */
    CU_ASSERT_PTR_NULL(metrics_series_get(METRICS_COUNTER, "t_g", "", l1, NULL, 0));
    CU_ASSERT_PTR_NULL(metrics_series_get(METRICS_GAUGE, "t_g", "", other, NULL, 0));
    CU_ASSERT_PTR_NULL(metrics_series_get(METRICS_GAUGE, "9bad", "", NULL, NULL, 0));
    CU_ASSERT_PTR_NULL(metrics_series_get(METRICS_GAUGE, "t-bad", "", NULL, NULL, 0));
    {
        const char *node[] = {"node", "x", NULL}, *dunder[] = {"__x", "y", NULL};
        const char *odd[] = {"k", NULL};
        CU_ASSERT_PTR_NULL(metrics_series_get(METRICS_GAUGE, "t_n", "", node, NULL, 0));
        CU_ASSERT_PTR_NULL(metrics_series_get(METRICS_GAUGE, "t_n", "", dunder, NULL, 0));
        CU_ASSERT_PTR_NULL(metrics_series_get(METRICS_GAUGE, "t_n", "", odd, NULL, 0));
    }
    metrics_series_put(a);
    t = render(); /* b still holds it */
    CU_ASSERT_EQUAL(prom_sample(t, "t_g{node=\"n\\\"1\",k=\"v\"}"), 5);
    mem_free(t);
    metrics_series_put(b);
    t = render();
    CU_ASSERT_EQUAL(prom_sample(t, "t_g{node=\"n\\\"1\",k=\"v\"}"), -1);
    CU_ASSERT_EQUAL(prom_sample(t, "t_g{node=\"n\\\"1\",k=\"w\"}"), 0);
    mem_free(t);
    metrics_series_put(c);
    t = render(); /* an empty family is not rendered at all */
    CU_ASSERT_PTR_NULL(strstr(t, "# TYPE t_g "));
    mem_free(t);
}

static void test_plugin_handles(void)
{
    /* two instances of plugin "demo": the second (a reload) shares the
     * series; the values continue and outlive the first instance */
    struct chat_plugin *old = (struct chat_plugin *)(uintptr_t)0x1000;
    struct chat_plugin *nw = (struct chat_plugin *)(uintptr_t)0x2000;
    const char *l[] = {"outcome", "ok", NULL};
    struct chat_metric *m1 =
        metrics_plugin_register(old, "demo", METRICS_COUNTER, "hits_total", "Hits.", l, NULL, 0);
    struct chat_metric *only_old =
        metrics_plugin_register(old, "demo", METRICS_GAUGE, "old_only", "Gone.", NULL, NULL, 0);
    struct chat_metric *m2;
    char *t;

    CU_ASSERT_PTR_NOT_NULL_FATAL(m1);
    CU_ASSERT_PTR_NOT_NULL_FATAL(only_old);
    CU_ASSERT_PTR_NULL(metrics_plugin_register(old, "demo", METRICS_COUNTER, "bad-name",
                                               "", NULL, NULL, 0));
    metrics_metric_add(m1, 2);
    metrics_metric_add(NULL, 2); /* a failed registration's NULL: no-op */
    m2 = metrics_plugin_register(nw, "demo", METRICS_COUNTER, "hits_total", "Hits.", l, NULL, 0);
    CU_ASSERT_PTR_NOT_NULL_FATAL(m2);
    metrics_metric_add(m2, 1);
    metrics_plugin_release(old);
    t = render();
    CU_ASSERT_EQUAL(prom_sample(t, "chatd_demo_hits_total{node=\"n\\\"1\",outcome=\"ok\"}"), 3);
    CU_ASSERT_PTR_NULL(strstr(t, "chatd_demo_old_only{"));
    mem_free(t);
    metrics_plugin_release(nw);
    t = render();
    CU_ASSERT_PTR_NULL(strstr(t, "chatd_demo_hits_total{"));
    mem_free(t);
}

static void collect(struct metrics_out *o)
{
    const char *l[] = {"transport", "tcp", "state", "logged_in", NULL};

    metrics_out_family(o, "chatd_sessions", "Sessions.", METRICS_GAUGE);
    metrics_out_u64_labels(o, "chatd_sessions", l, 42);
}

static void test_core_families(void)
{
    char *t;

    metrics_loop.frames[metrics_msgid_slot(6)] += 5;
    metrics_loop.frames[metrics_msgid_slot(999)] += 2;
    metrics_loop.frames[metrics_msgid_slot(-1)] += 1;
    metrics_loop.closed[METRICS_CLOSE_IDLE]++;
    metrics_add_collector(collect);
    metrics_add_collector(collect); /* once */
    t = render();
    CU_ASSERT_EQUAL(prom_sample(t, "chatd_frames_total{node=\"n\\\"1\",msgid=\"6\"}"), 5);
    CU_ASSERT_EQUAL(prom_sample(t, "chatd_frames_total{node=\"n\\\"1\",msgid=\"other\"}"), 3);
    CU_ASSERT_EQUAL(prom_sample(t, "chatd_connections_closed_total{node=\"n\\\"1\",reason=\"idle\"}"),
                    1);
    CU_ASSERT_EQUAL(prom_sample(t, "chatd_sessions{node=\"n\\\"1\",transport=\"tcp\",state=\"logged_in\"}"),
                    42);
    CU_ASSERT_PTR_NOT_NULL(strstr(t, "chatd_build_info{node=\"n\\\"1\",version=\""));
    CU_ASSERT_TRUE(prom_sample(t, "chatd_process_resident_memory_bytes{node=\"n\\\"1\"}") > 0);
    CU_ASSERT_TRUE(prom_sample(t, "chatd_process_open_fds{node=\"n\\\"1\"}") >= 3);
    /* one TYPE line per family */
    {
        const char *p = t;
        int n = 0;
        while ((p = strstr(p, "# TYPE chatd_sessions "))) {
            n++;
            p++;
        }
        CU_ASSERT_EQUAL(n, 1);
    }
    mem_free(t);
}

/* Traffic-like values everywhere, then promtool's linter on the text. */
static void test_promtool(void)
{
    char path[] = "/tmp/chatd-metrics-XXXXXX", cmd[512];
    const double b[] = {0.01, 0.1, 1};
    const char *pl[] = {"plugin", "one2one", NULL};
    struct metrics_series *h = metrics_series_get(
        METRICS_HISTOGRAM, "chatd_handler_seconds", "Handler time.", pl, metrics_latency_bounds,
        METRICS_LATENCY_NB);
    struct chat_plugin *inst = (struct chat_plugin *)(uintptr_t)0x3000;
    const char *kl[] = {"kind", "password", "outcome", "ok", NULL};
    struct chat_metric *lg =
        metrics_plugin_register(inst, "login", METRICS_COUNTER, "logins_total", "Logins.", kl,
                                NULL, 0);
    struct chat_metric *hs = metrics_plugin_register(inst, "login", METRICS_HISTOGRAM,
                                                     "hash_seconds", "Hash.", NULL, b, 3);
    char *t;
    FILE *f;
    int fd, rc;

    for (int i = 1; i <= METRICS_MSGID_MAX; i++) {
        metrics_loop.frames[i] += (uint64_t)i * 1000;
        metrics_loop.errors[i] += (uint64_t)i;
    }
    metrics_loop.accepted += 1200;
    metrics_loop.bytes_in += 123456789;
    metrics_loop.bytes_out += 987654321;
    for (int i = 0; i < METRICS_ROUTE_N; i++)
        metrics_loop.deliveries[i] += 10u * (unsigned)(i + 1);
    for (int i = 0; i < 1000; i++) {
        metrics_series_observe(h, i * 1e-5);
        metrics_observe(&metrics_loop.loop_lag, i * 1e-4);
        metrics_observe(&metrics_loop.bus_rtt[METRICS_BUS_DELIVER], i * 2e-5);
        metrics_metric_observe(hs, 0.05 + i * 1e-3);
    }
    metrics_metric_add(lg, 500);
    t = render();
    fd = mkstemp(path);
    CU_ASSERT_FATAL(fd >= 0);
    f = fdopen(fd, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fputs(t, f);
    fclose(f);
    mem_free(t);
    if (system("command -v promtool >/dev/null 2>&1") != 0) {
        fprintf(stderr, "promtool not found (Debian package prometheus; contrib/deps.sh "
                        "installs it)\n");
        CU_FAIL("promtool missing");
        unlink(path);
        return;
    }
    snprintf(cmd, sizeof cmd, "promtool check metrics < %s", path);
    rc = system(cmd);
    if (rc != 0) {
        snprintf(cmd, sizeof cmd, "cat %s >&2", path);
        (void)system(cmd);
    }
    CU_ASSERT_EQUAL(rc, 0);
    unlink(path);
    metrics_plugin_release(inst);
}

/* test_metrics --cost: what the request path's instrumentation costs per
 * chat message, in a tight loop on this machine: the frame counter, the
 * handler call counter and, for one call in 16, its timing (two uv_hrtime()
 * calls and a histogram observation), the delivery counter and the byte
 * counters, as disp_frame, net_deliver, on_read and flush_session do them.
 * Prints ns per message, and what timing every call would cost. */
static volatile uint64_t sink;

static double cost_run(int instrumented, unsigned every, long n)
{
    struct metrics_series *h = metrics_series_get(
        METRICS_HISTOGRAM, "cost_handler_seconds", "", NULL, metrics_latency_bounds,
        METRICS_LATENCY_NB);
    struct metrics_series *c =
        metrics_series_get(METRICS_COUNTER, "cost_calls_total", "", NULL, NULL, 0);
    unsigned tick = 0;
    uint64_t t0 = uv_hrtime();

    for (long i = 0; i < n; i++) {
        if (!instrumented) {
            sink += (uint64_t)i; /* stands for the handler */
            continue;
        }
        metrics_loop.frames[metrics_msgid_slot(6)]++;
        metrics_series_add(c, 1);
        if (++tick % every == 0) {
            uint64_t a = uv_hrtime();
            sink += (uint64_t)i;
            metrics_series_observe(h, (double)(uv_hrtime() - a) / 1e9);
        } else {
            sink += (uint64_t)i;
        }
        metrics_loop.deliveries[METRICS_ROUTE_LOCAL]++;
        metrics_loop.bytes_in += 60;
        metrics_loop.bytes_out += 60;
    }
    metrics_series_put(h);
    metrics_series_put(c);
    return (double)(uv_hrtime() - t0) / (double)n;
}

static int cost_main(void)
{
    const long n = 20000000;

    for (int r = 0; r < 5; r++) {
        double base = cost_run(0, 1, n), with = cost_run(1, 16, n);
        double every = cost_run(1, 1, n / 4);
        printf("run %d: %.1f ns/message added (handler timed 1 in 16); "
               "%.1f ns if every call were timed\n",
               r + 1, with - base, every - base);
    }
    return 0;
}

int main(int argc, char **argv)
{
    CU_pSuite s;
    unsigned failed;

    mem_init();
    if (argc > 1 && strcmp(argv[1], "--cost") == 0) {
        metrics_start(NULL);
        return cost_main();
    }
    log_level = CHAT_LOG_ERROR - 1; /* the refusals are expected */
    metrics_start(NULL);
    metrics_set_node("n\"1"); /* escaped in every sample */
    if (CU_initialize_registry() != CUE_SUCCESS)
        return 1;
    s = CU_add_suite("metrics", NULL, NULL);
    CU_add_test(s, "label value and HELP escaping", test_escaping);
    CU_add_test(s, "histogram: cumulative buckets, +Inf, _sum, _count", test_histogram);
    CU_add_test(s, "core histogram buckets (le semantics)", test_core_histogram);
    CU_add_test(s, "series shared by refcount; clashes refused", test_sharing_and_clashes);
    CU_add_test(s, "plugin handles: reload shares, release drops", test_plugin_handles);
    CU_add_test(s, "core families, msgid bound, collectors", test_core_families);
    CU_add_test(s, "promtool check metrics on a traffic-like sample", test_promtool);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failed = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failed ? 1 : 0;
}
