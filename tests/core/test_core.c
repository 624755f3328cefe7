/*
 * test_core.c - unit tests of the config parser and the plugin registry.
 *
 * No servers: the registry tests load the fixture plugins built under
 * tests/plugins into a loop that never listens.  The metrics test feeds
 * frames to a socketless session and reads what dispatch and the plugin
 * loader counted in metrics_render()'s text.
 */
#include <sys/socket.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <CUnit/Basic.h>

#include "core.h"
#include "../prom_sample.h"

static char dir[256];

static const char *write_conf(const char *name, const char *text)
{
    static char path[512];
    FILE *f;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
    return path;
}

/* Load text; expect failure at line with reason containing why. */
static void expect_error(const char *text, int line, const char *why)
{
    char err[1024], want[600];
    const char *path = write_conf("bad.conf", text);
    struct conf *c = conf_load(path, err, sizeof err);
    CU_ASSERT_PTR_NULL(c);
    conf_free(c);
    snprintf(want, sizeof want, "%s:%d: ", path, line);
    if (strncmp(err, want, strlen(want)) != 0 || !strstr(err, why)) {
        fprintf(stderr, "\n  got \"%s\"\n  want \"%s...%s\"\n", err, want, why);
        CU_FAIL("error message");
    }
}

static void test_conf_good(void)
{
    char err[1024];
    const char *path = write_conf("good.conf",
        "; comment\n[server]\nlisten = [::1]:7000\nlog_level = debug\n"
        "max_frame = 1024 ; inline\n[plugins]\ndir = plug\nenabled = a, b,c\n"
        "[plugin.a]\nk = v\nk = w\n[mysql]\nport = 3307\nsocket = my.sock\n");
    struct conf *c = conf_load(path, err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(c);
    CU_ASSERT_STRING_EQUAL(c->listen_host, "::1");
    CU_ASSERT_EQUAL(c->listen_port, 7000);
    CU_ASSERT_EQUAL(c->log_level, CHAT_LOG_DEBUG);
    CU_ASSERT_EQUAL(c->max_frame, 1024);
    CU_ASSERT_EQUAL(c->nplugins, 3);
    CU_ASSERT_STRING_EQUAL(c->plugins[2], "c");
    CU_ASSERT_EQUAL(c->plugins_line, 8);
    CU_ASSERT(c->have_mysql && !c->have_redis);
    CU_ASSERT_EQUAL(c->my_port, 3307);
    /* relative paths are relative to the config's folder */
    CU_ASSERT(strncmp(c->plugin_dir, dir, strlen(dir)) == 0);
    CU_ASSERT(strstr(c->my_socket, "/my.sock") != NULL);
    CU_ASSERT_STRING_EQUAL(conf_section_get(conf_section(c, "a"), "k"), "w");
    CU_ASSERT_PTR_NULL(conf_section(c, "b"));
    conf_free(c);
}

static void test_conf_defaults(void)
{
    char err[1024];
    struct conf *c = conf_load(write_conf("empty.conf", ""), err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(c);
    CU_ASSERT_EQUAL(c->max_frame, 65536);
    CU_ASSERT_EQUAL(c->listen_port, 6000);
    CU_ASSERT_EQUAL(c->nplugins, 0);
    CU_ASSERT(!c->have_mysql && !c->have_redis);
    conf_free(c);
}

static void test_conf_errors(void)
{
    char err[1024];
    expect_error("[server]\nlisten = 1.2.3.4:1\nbogus = 1\n", 3, "unknown key \"bogus\"");
    expect_error("[server]\n\nmax_frame = lots\n", 3, "max_frame: not an integer");
    expect_error("[server]\nmax_frame = 1\n", 2, "max_frame");
    expect_error("[sever]\n", 1, "unknown section [sever]");
    expect_error("[server]\nlisten = nohost\n", 2, "listen: expected IP:PORT");
    expect_error("[server]\nlisten = h:70000\n", 2, "listen");
    expect_error("[server]\nlog_level = loud\n", 2, "log_level");
    expect_error("[plugins]\nenabled = a, a\n", 2, "listed twice");
    expect_error("[plugins]\nenabled = ../evil\n", 2, "bad plugin name");
    expect_error("[redis]\nport = 0\n", 2, "port");
    expect_error("[mysql]\nuser = a\nflavour = b\n", 3, "unknown key \"flavour\" in [mysql]");
    expect_error("[server]\nthis is not ini\n", 2, "");
    CU_ASSERT_PTR_NULL(conf_load("/nonexistent/chat.conf", err, sizeof err));
    CU_ASSERT(strstr(err, "/nonexistent/chat.conf:0: cannot open") != NULL);
}

/* [server] log_format and log_file. */
static void test_conf_log(void)
{
    char err[1024];
    struct conf *c = conf_load(write_conf("log.conf", "[server]\nlog_format = JSON\n"
                                          "log_file = logs/chatd.log\n"), err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(c);
    CU_ASSERT_EQUAL(c->log_format, LOG_FORMAT_JSON);
    CU_ASSERT(strncmp(c->log_file, dir, strlen(dir)) == 0); /* relative to the file */
    CU_ASSERT(strstr(c->log_file, "/logs/chatd.log") != NULL);
    conf_free(c);
    c = conf_load(write_conf("log2.conf", "[server]\nlog_file =\n"), err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(c);
    CU_ASSERT_EQUAL(c->log_format, LOG_FORMAT_TEXT);
    CU_ASSERT_STRING_EQUAL(c->log_file, ""); /* stderr */
    conf_free(c);
    expect_error("[server]\nlog_format = xml\n", 2, "log_format: \"xml\" is not text or json");
}

/* [ws]: origins, max_message (default [server] max_frame), timers. */
static void test_conf_ws(void)
{
    char err[1024];
    struct conf *c = conf_load(write_conf("ws.conf",
        "[ws]\norigins = https://chat.example, http://localhost:8000\n"
        "ping_interval = 0\npong_timeout = 5\nhandshake_timeout = 3\n"
        "[server]\nmax_frame = 1024\n"), err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(c);
    CU_ASSERT_EQUAL_FATAL(c->nws_origins, 2);
    CU_ASSERT_STRING_EQUAL(c->ws_origins[1], "http://localhost:8000");
    CU_ASSERT_EQUAL(c->ws_max_message, 1024); /* max_frame, though it came later */
    CU_ASSERT_EQUAL(c->ws_ping_interval_s, 0);
    CU_ASSERT_EQUAL(c->ws_pong_timeout_s, 5);
    CU_ASSERT_EQUAL(c->ws_handshake_timeout_s, 3);
    conf_free(c);
    c = conf_load(write_conf("ws2.conf", "[ws]\nmax_message = 4096\n"), err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(c);
    CU_ASSERT_EQUAL(c->ws_max_message, 4096);
    CU_ASSERT_EQUAL(c->nws_origins, 0);
    CU_ASSERT_EQUAL(c->ws_ping_interval_s, 30);
    CU_ASSERT_EQUAL(c->ws_pong_timeout_s, 10);
    CU_ASSERT_EQUAL(c->ws_handshake_timeout_s, 10);
    conf_free(c);
    expect_error("[ws]\norigins = https://a.example/path\n", 2,
                 "origins: \"https://a.example/path\" is not");
    expect_error("[ws]\norigins = *\n", 2, "origins");
    expect_error("[ws]\npong_timeout = 0\n", 2, "pong_timeout");
    expect_error("[ws]\nmax_message = 10\n", 2, "max_message");
    expect_error("[ws]\npath = /chat\n", 2, "unknown key \"path\" in [ws]");
}

/* [server] trusted and the per-address and time-limit settings. */
static void test_conf_net_limits(void)
{
    char err[1024];
    struct conf_cidr c;
    unsigned char a[16] = {10, 1, 2, 3};
    const char *path = write_conf("limits.conf",
        "[server]\nmax_connections_per_addr = 0\nmax_unauth_per_addr = 5\n"
        "trusted = 10.0.0.0/8, 192.168.1.7 2001:db8::/32\nrequest_timeout = 0\n"
        "tcp_keepalive = 0\ntcp_user_timeout = 30\n");
    struct conf *cf = conf_load(path, err, sizeof err);

    CU_ASSERT_PTR_NOT_NULL_FATAL(cf);
    CU_ASSERT_EQUAL(cf->max_conns_per_addr, 0);
    CU_ASSERT_EQUAL(cf->max_unauth_per_addr, 5);
    CU_ASSERT_EQUAL(cf->request_timeout_s, 0);
    CU_ASSERT_EQUAL(cf->keepalive_idle_s, 0);
    CU_ASSERT_EQUAL(cf->user_timeout_s, 30);
    CU_ASSERT_EQUAL_FATAL(cf->ntrusted, 3);
    CU_ASSERT(conf_cidr_match(&cf->trusted[0], AF_INET, a));
    a[0] = 11;
    CU_ASSERT(!conf_cidr_match(&cf->trusted[0], AF_INET, a));
    CU_ASSERT_EQUAL(cf->trusted[1].bits, 32);
    CU_ASSERT_EQUAL(cf->trusted[2].family, AF_INET6);
    conf_free(cf);

    /* a prefix that ends inside a byte */
    CU_ASSERT_EQUAL(conf_parse_cidr("172.16.0.0/12", &c), CHAT_OK);
    memcpy(a, (unsigned char[]){172, 31, 255, 1}, 4);
    CU_ASSERT(conf_cidr_match(&c, AF_INET, a));
    a[1] = 32;
    CU_ASSERT(!conf_cidr_match(&c, AF_INET, a));
    CU_ASSERT(!conf_cidr_match(&c, AF_INET6, a));
    CU_ASSERT_EQUAL(conf_parse_cidr("::/0", &c), CHAT_OK);
    CU_ASSERT(conf_cidr_match(&c, AF_INET6, a));
    CU_ASSERT_EQUAL(conf_parse_cidr("1.2.3.4/33", &c), CHAT_ERR_INVAL);
    CU_ASSERT_EQUAL(conf_parse_cidr("host/8", &c), CHAT_ERR_INVAL);
    CU_ASSERT_EQUAL(conf_parse_cidr("/8", &c), CHAT_ERR_INVAL);

    expect_error("[server]\ntrusted = 10.0.0.1, nginx\n", 2,
                 "trusted: \"nginx\" is not an IP address");
    expect_error("[server]\nmax_unauth_per_addr = -1\n", 2, "max_unauth_per_addr");

    cf = conf_load(write_conf("empty2.conf", ""), err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cf);
    CU_ASSERT_EQUAL(cf->max_conns_per_addr, 512);
    CU_ASSERT_EQUAL(cf->max_unauth_per_addr, 64);
    CU_ASSERT_EQUAL(cf->request_timeout_s, 30);
    CU_ASSERT_EQUAL(cf->ntrusted, 0);
    conf_free(cf);
}

static void test_hostport(void)
{
    char *h = NULL;
    int port = 0;
    CU_ASSERT_EQUAL(conf_parse_hostport("127.0.0.1:6000", &h, &port), CHAT_OK);
    CU_ASSERT_STRING_EQUAL(h, "127.0.0.1");
    CU_ASSERT_EQUAL(port, 6000);
    mem_free(h);
    CU_ASSERT_EQUAL(conf_parse_hostport("[::1]:1", &h, &port), CHAT_OK);
    CU_ASSERT_STRING_EQUAL(h, "::1");
    mem_free(h);
    CU_ASSERT_NOT_EQUAL(conf_parse_hostport(":80", &h, &port), CHAT_OK);
    CU_ASSERT_NOT_EQUAL(conf_parse_hostport("a:", &h, &port), CHAT_OK);
    CU_ASSERT_NOT_EQUAL(conf_parse_hostport("[::1]80", &h, &port), CHAT_OK);
}

/* Registry: load echo (msgids 1000..1008) then "dup" which claims 1000. */
static void test_registry(void)
{
    char err[1024], text[1024];
    struct conf *c;
    const struct plug_handler *h;

    snprintf(text, sizeof text,
             "[plugins]\ndir = %s/v1\nenabled = echo\n", FIXTURES);
    c = conf_load(write_conf("reg.conf", text), err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(c);
    wire_core(uv_default_loop());
    CU_ASSERT_EQUAL_FATAL(plug_start(uv_default_loop(), c), 0);
    h = plug_handler(1000);
    CU_ASSERT_PTR_NOT_NULL_FATAL(h);
    CU_ASSERT_STRING_EQUAL(plug_name(h->inst), "echo");
    CU_ASSERT_PTR_NULL(plug_handler(1001));
    /* registration is only allowed inside init */
    CU_ASSERT_EQUAL(plug_register_handler(h->inst, 3000, (chat_handler_fn)abort, NULL),
                    CHAT_ERR_STATE);
    CU_ASSERT_PTR_NULL(plug_handler(3000));
    plug_stop();
    uv_run(uv_default_loop(), UV_RUN_DEFAULT);
    CU_ASSERT_PTR_NULL(plug_handler(1000));
    plug_free_conf();

    /* a clash at start-up fails the start */
    snprintf(text, sizeof text, "[plugins]\ndir = %s\nenabled = echo, dup\n", dir);
    {
        char cmd[1024];
        snprintf(cmd, sizeof cmd, "cp %s/v1/echo.so %s/dup/dup.so %s/", FIXTURES,
                 FIXTURES, dir);
        CU_ASSERT_EQUAL_FATAL(system(cmd), 0);
    }
    c = conf_load(write_conf("clash.conf", text), err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(c);
    CU_ASSERT_NOT_EQUAL(plug_start(uv_default_loop(), c), 0);
    plug_stop();
    uv_run(uv_default_loop(), UV_RUN_DEFAULT);
    plug_free_conf();
}

static void test_metrics_wiring(void)
{
    static const char frames[] = "{\"msgid\":1000,\"n\":1}\n{\"msgid\":1000,\"n\":2}\n"
                                 "{\"msgid\":77}\n{\"msgid\":6,\"x\":1,\"x\":2}\n";
    const char *loads = "chatd_plugin_loads_total{node=\"\",plugin=\"echo\","
                        "version=\"echo-1\"}";
    char err[1024], text[1024], *t;
    struct conf *c;
    struct chat_session *s;
    double loads0;
    size_t len;

    snprintf(text, sizeof text,
             "[plugins]\ndir = %s/v1\nenabled = echo\n", FIXTURES);
    c = conf_load(write_conf("metrics.conf", text), err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(c);
    metrics_start(NULL);
    t = metrics_render(&len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    loads0 = prom_sample(t, loads); /* the registry test loaded echo before */
    mem_free(t);
    wire_core(uv_default_loop());
    CU_ASSERT_EQUAL_FATAL(plug_start(uv_default_loop(), c), 0);
    s = net_test_session(uv_default_loop(), 65536);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    net_test_feed(s, frames, sizeof frames - 1);
    net_close(s, 0, NULL);
    t = metrics_render(&len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    /* 1000 and 77 are no known msgid: "other"; so is the last frame,
     * refused (a key given twice) before its msgid was read.  Errors: the
     * unknown msgid 77 and the refused frame */
    CU_ASSERT_EQUAL(prom_sample(t, "chatd_frames_total{node=\"\",msgid=\"other\"}"), 4);
    CU_ASSERT_EQUAL(prom_sample(t, "chatd_frames_total{node=\"\",msgid=\"6\"}"), 0);
    CU_ASSERT_EQUAL(prom_sample(t, "chatd_errors_total{node=\"\",msgid=\"other\"}"), 2);
    CU_ASSERT_EQUAL(prom_sample(t, "chatd_handler_calls_total{node=\"\",plugin=\"echo\"}"), 2);
    CU_ASSERT_TRUE(prom_sample(t, "chatd_handler_seconds_count{node=\"\",plugin=\"echo\"}") >= 0);
    CU_ASSERT_EQUAL(prom_sample(t, loads), (loads0 < 0 ? 0 : loads0) + 1);
    CU_ASSERT_EQUAL(prom_sample(t, "chatd_plugin_reloads_total{node=\"\",plugin=\"echo\","
                              "version=\"echo-1\"}"), 0);
    CU_ASSERT_EQUAL(prom_sample(t, "chatd_plugin_info{node=\"\",plugin=\"echo\","
                              "version=\"echo-1\"}"), 1);
    CU_ASSERT_EQUAL(prom_sample(t, "chatd_connections_closed_total{node=\"\",reason=\"server\"}"),
                    1);
    mem_free(t);
    plug_stop();
    uv_run(uv_default_loop(), UV_RUN_DEFAULT);
    plug_free_conf();
}

int main(void)
{
    CU_pSuite s;
    unsigned failed;
    char cmd[300];

    mem_init();
    log_level = CHAT_LOG_ERROR;
    snprintf(dir, sizeof dir, "/tmp/chatd-unit-XXXXXX");
    if (!mkdtemp(dir))
        return 1;
    if (CU_initialize_registry() != CUE_SUCCESS)
        return 1;
    s = CU_add_suite("core", NULL, NULL);
    CU_add_test(s, "conf: a good file", test_conf_good);
    CU_add_test(s, "conf: defaults", test_conf_defaults);
    CU_add_test(s, "conf: errors name file:line", test_conf_errors);
    CU_add_test(s, "conf: host:port", test_hostport);
    CU_add_test(s, "conf: trusted, per-address caps, time limits", test_conf_net_limits);
    CU_add_test(s, "conf: log_format, log_file", test_conf_log);
    CU_add_test(s, "conf: [ws]", test_conf_ws);
    CU_add_test(s, "registry: msgids, init-only registration, clashes", test_registry);
    CU_add_test(s, "metrics: frames, errors, handler calls, plugin loads", test_metrics_wiring);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failed = CU_get_number_of_failures();
    CU_cleanup_registry();
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        failed++;
    return failed ? 1 : 0;
}
