/*
 * test_webfiles.c - CUnit tests of the web client's file set
 * (core/webfiles.c) and of its service by the WebSocket engine (core/ws.c):
 * what is loaded (regular files, no dotfiles, no symlink out of root, the
 * bounds), request paths (percent-decoding, "..", NUL, backslashes,
 * queries, "/" -> index.html), MIME types, ETag and 304, HEAD, 405 with
 * Allow, the security headers, and that a WebSocket upgrade of the ws path
 * still works beside the files.  Files live in a mkdtemp folder.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <CUnit/Basic.h>

#include "core.h"
#include "ws.h"

static char root[256], outside[256];
static struct web_files *set;

static void put(const char *dir, const char *name, const char *text)
{
    char p[512];
    FILE *f;
    snprintf(p, sizeof p, "%s/%s", dir, name);
    f = fopen(p, "w");
    if (!f) {
        perror(p);
        exit(1);
    }
    fputs(text, f);
    fclose(f);
}

static void make_tree(void)
{
    char p[512], t[512];
    strcpy(root, "/tmp/webfilesXXXXXX");
    strcpy(outside, "/tmp/webfilesoutXXXXXX");
    if (!mkdtemp(root) || !mkdtemp(outside))
        exit(1);
    put(root, "index.html", "<!doctype html><title>chat</title>");
    put(root, "app.js", "export const x = 1;\n");
    put(root, "style.css", "body{}\n");
    put(root, "m.mjs", "export{}\n");
    put(root, "data.json", "{}\n");
    put(root, "icon.svg", "<svg/>\n");
    put(root, "site.webmanifest", "{}\n");
    put(root, "a b.txt", "spaced\n");
    put(root, "odd.xyz", "?\n");
    put(root, ".secret", "dotfile\n");
    put(outside, "passwd", "root:x:0:0\n");
    snprintf(p, sizeof p, "%s/sub", root);
    mkdir(p, 0700);
    put(p, "index.html", "<p>sub</p>");
    snprintf(p, sizeof p, "%s/.git", root);
    mkdir(p, 0700);
    put(p, "config", "[core]\n");
    /* a symlink out of root (skipped) and one inside it (served) */
    snprintf(p, sizeof p, "%s/escape.txt", root);
    snprintf(t, sizeof t, "%s/passwd", outside);
    if (symlink(t, p) != 0)
        exit(1);
    snprintf(p, sizeof p, "%s/alias.js", root);
    if (symlink("app.js", p) != 0)
        exit(1);
    snprintf(p, sizeof p, "%s/outdir", root);
    if (symlink(outside, p) != 0)
        exit(1);
}

static int suite_init(void)
{
    char err[256];
    make_tree();
    return web_load(root, 1 << 20, 100, &set, err, sizeof err) == CHAT_OK ? 0 : 1;
}

static int suite_clean(void)
{
    char cmd[600];
    web_files_unref(set);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", root, outside);
    return system(cmd) == 0 ? 0 : 1;
}

/* The answer to a request, as one string (head and body). */
static int ask(const char *method, const char *target, const char *inm, char *buf,
               size_t len)
{
    struct web_reply r;
    web_answer(set, method, target, strlen(target), inm, &r);
    snprintf(buf, len, "%.*s%.*s", (int)r.head_len, r.head, (int)r.body_len,
             r.body ? r.body : "");
    return r.status;
}

static void test_load_rules(void)
{
    char b[4096];
    /* index, app, style, m, data, icon, manifest, "a b", odd, sub/index,
     * alias: not .secret, .git/, escape.txt, outdir/ */
    CU_ASSERT_EQUAL(web_files_count(set), 11);
    CU_ASSERT_EQUAL(ask("GET", "/alias.js", NULL, b, sizeof b), 200);
    CU_ASSERT_PTR_NOT_NULL(strstr(b, "export const x"));
    CU_ASSERT_EQUAL(ask("GET", "/escape.txt", NULL, b, sizeof b), 404);
    CU_ASSERT_EQUAL(ask("GET", "/outdir/passwd", NULL, b, sizeof b), 404);
    CU_ASSERT_EQUAL(ask("GET", "/.secret", NULL, b, sizeof b), 404);
    CU_ASSERT_EQUAL(ask("GET", "/.git/config", NULL, b, sizeof b), 404);
    CU_ASSERT_PTR_NULL(strstr(b, "core"));
}

static void test_bounds(void)
{
    struct web_files *s = NULL;
    char err[256];
    CU_ASSERT_EQUAL(web_load(root, 1 << 20, 3, &s, err, sizeof err), CHAT_ERR_INVAL);
    CU_ASSERT_PTR_NULL(s);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "max_files"));
    CU_ASSERT_EQUAL(web_load(root, 40, 100, &s, err, sizeof err), CHAT_ERR_INVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "max_bytes"));
    CU_ASSERT_EQUAL(web_load("/nonexistent/web", 1 << 20, 100, &s, err, sizeof err),
                    CHAT_ERR_INVAL);
    CU_ASSERT_PTR_NULL(s);
}

static void test_paths(void)
{
    char out[WEB_NAME_MAX];
    static const char *const bad[] = {
        "", "x", "/..", "/../etc/passwd", "/sub/../app.js", "/%2e%2e/x",
        "/%2E%2e%2fetc", "/a%00b", "/a\\b", "/a%5cb", "/.", "/./app.js", "//app.js",
        "/sub//index.html", "/.git/config", "/%", "/%4", "/%zz", "/sub/.hidden",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int r = web_path(bad[i], strlen(bad[i]), out, sizeof out);
        if (r != CHAT_ERR_INVAL)
            fprintf(stderr, "accepted: %s\n", bad[i]);
        CU_ASSERT_EQUAL(r, CHAT_ERR_INVAL);
    }
    CU_ASSERT_EQUAL(web_path("/", 1, out, sizeof out), CHAT_OK);
    CU_ASSERT_STRING_EQUAL(out, "index.html");
    CU_ASSERT_EQUAL(web_path("/sub/", 5, out, sizeof out), CHAT_OK);
    CU_ASSERT_STRING_EQUAL(out, "sub/index.html");
    CU_ASSERT_EQUAL(web_path("/a%20b.txt?x=../..", 18, out, sizeof out), CHAT_OK);
    CU_ASSERT_STRING_EQUAL(out, "a b.txt");
    CU_ASSERT_EQUAL(web_path("/app.js#frag", 12, out, sizeof out), CHAT_OK);
    CU_ASSERT_STRING_EQUAL(out, "app.js");
    CU_ASSERT_EQUAL(web_path("/x..y", 5, out, sizeof out), CHAT_OK); /* a name, not ".." */
    CU_ASSERT_EQUAL(web_path("/app.js", 7, out, 4), CHAT_ERR_INVAL);  /* too long */
}

static void test_mime(void)
{
    char b[4096];
    static const struct { const char *path, *type; } t[] = {
        {"/", "text/html; charset=utf-8"},
        {"/app.js", "text/javascript; charset=utf-8"},
        {"/m.mjs", "text/javascript; charset=utf-8"},
        {"/style.css", "text/css; charset=utf-8"},
        {"/data.json", "application/json"},
        {"/icon.svg", "image/svg+xml"},
        {"/site.webmanifest", "application/manifest+json"},
        {"/a%20b.txt", "text/plain; charset=utf-8"},
        {"/odd.xyz", "application/octet-stream"},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        char want[128];
        CU_ASSERT_EQUAL(ask("GET", t[i].path, NULL, b, sizeof b), 200);
        snprintf(want, sizeof want, "\r\nContent-Type: %s\r\n", t[i].type);
        CU_ASSERT_PTR_NOT_NULL(strstr(b, want));
    }
    CU_ASSERT_STRING_EQUAL(web_mime("x.png"), "image/png");
    CU_ASSERT_STRING_EQUAL(web_mime("x.ico"), "image/x-icon");
    CU_ASSERT_STRING_EQUAL(web_mime("x.woff2"), "font/woff2");
    CU_ASSERT_STRING_EQUAL(web_mime("dir.js/x"), "application/octet-stream");
}

static void test_headers_and_304(void)
{
    char b[4096], etag[64], inm[160];
    const char *e, *end;
    CU_ASSERT_EQUAL(ask("GET", "/", NULL, b, sizeof b), 200);
    CU_ASSERT_PTR_NOT_NULL(strstr(b, "HTTP/1.1 200 OK\r\n"));
    CU_ASSERT_PTR_NOT_NULL(strstr(b, "Content-Length: 34\r\n"));
    CU_ASSERT_PTR_NOT_NULL(strstr(b, "Cache-Control: no-cache\r\n"));
    CU_ASSERT_PTR_NOT_NULL(strstr(b, "Last-Modified: "));
    CU_ASSERT_PTR_NOT_NULL(strstr(b, " GMT\r\n"));
    CU_ASSERT_PTR_NOT_NULL(strstr(b, "X-Content-Type-Options: nosniff\r\n"));
    CU_ASSERT_PTR_NOT_NULL(strstr(b, "Referrer-Policy: no-referrer\r\n"));
    CU_ASSERT_PTR_NOT_NULL(strstr(b, "Content-Security-Policy: default-src 'self'; "
                                     "script-src 'self'; style-src 'self'; "));
    CU_ASSERT_PTR_NULL(strstr(b, "unsafe-inline"));
    CU_ASSERT_PTR_NOT_NULL(strstr(b, "\r\n\r\n<!doctype html>"));
    e = strstr(b, "ETag: \"");
    CU_ASSERT_PTR_NOT_NULL_FATAL(e);
    e += 6;
    end = strstr(e, "\r\n");
    snprintf(etag, sizeof etag, "%.*s", (int)(end - e), e);
    CU_ASSERT_EQUAL(strlen(etag), 34); /* strong: no W/ */
    /* the same tag: 304, no body; in a list, weak form, or "*" too */
    CU_ASSERT_EQUAL(ask("GET", "/index.html", etag, b, sizeof b), 304);
    CU_ASSERT_PTR_NOT_NULL(strstr(b, etag));
    CU_ASSERT_PTR_NULL(strstr(b, "<!doctype"));
    CU_ASSERT_PTR_NULL(strstr(b, "Content-Length"));
    snprintf(inm, sizeof inm, "\"x\", W/%s", etag);
    CU_ASSERT_EQUAL(ask("GET", "/", inm, b, sizeof b), 304);
    CU_ASSERT_EQUAL(ask("GET", "/", "*", b, sizeof b), 304);
    CU_ASSERT_EQUAL(ask("GET", "/", "\"other\"", b, sizeof b), 200);
    /* another file's tag differs */
    CU_ASSERT_EQUAL(ask("GET", "/app.js", etag, b, sizeof b), 200);
}

static void test_methods(void)
{
    char b[4096];
    CU_ASSERT_EQUAL(ask("HEAD", "/app.js", NULL, b, sizeof b), 200);
    CU_ASSERT_PTR_NOT_NULL(strstr(b, "Content-Length: 20\r\n"));
    CU_ASSERT_PTR_NULL(strstr(b, "export"));
    CU_ASSERT_EQUAL(ask("HEAD", "/nope", NULL, b, sizeof b), 404);
    CU_ASSERT_PTR_NULL(strstr(b, "not found"));
    CU_ASSERT_EQUAL(ask("GET", "/nope", NULL, b, sizeof b), 404);
    CU_ASSERT_PTR_NOT_NULL(strstr(b, "not found"));
    static const char *const m[] = {"POST", "PUT", "DELETE", "OPTIONS", "PATCH"};
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++) {
        CU_ASSERT_EQUAL(ask(m[i], "/", NULL, b, sizeof b), 405);
        CU_ASSERT_PTR_NOT_NULL(strstr(b, "\r\nAllow: GET, HEAD\r\n"));
    }
    /* no set at all: every path is 404 */
    struct web_reply r;
    web_answer(NULL, "GET", "/", 1, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 404);
}

/* ---- through the WebSocket engine ---------------------------------------- */

static int http_status, errors, opened;
static void on_http(void *ud, int status) { (void)ud; http_status = status; }
static void on_error(void *ud, int code, const char *why) { (void)ud; (void)why; errors = code; }
static void on_open(void *ud) { (void)ud; opened = 1; }

/* Feed req to a fresh engine (whole, or byte by byte), return its output. */
static enum ws_state engine(const struct ws_cb *cb, const char *req, int bytewise,
                            char *out, size_t outlen)
{
    struct ws_conf c = {.max_message = 4096, .path = "/chat", .files = set};
    struct ws_conn *w = ws_conn_new(&c, cb, NULL);
    const char *p;
    size_t n, used = 0;
    enum ws_state st;

    http_status = errors = opened = 0;
    if (bytewise) {
        for (size_t i = 0; req[i] && ws_conn_state(w) == WS_HANDSHAKE; i++)
            ws_conn_feed(w, req + i, 1);
    } else {
        ws_conn_feed(w, req, strlen(req));
    }
    n = ws_conn_pending(w, &p);
    if (n >= outlen)
        n = outlen - 1;
    memcpy(out, p, n);
    out[n] = '\0';
    used = n;
    ws_conn_consume(w, used);
    st = ws_conn_state(w);
    ws_conn_free(w);
    return st;
}

static void test_engine(void)
{
    static const struct ws_cb cb = {.on_open = on_open, .on_error = on_error,
                                    .on_http = on_http};
    static const struct ws_cb old_cb = {.on_open = on_open, .on_error = on_error};
    char out[8192];

    for (int bw = 0; bw < 2; bw++) {
        CU_ASSERT_EQUAL(engine(&cb, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", bw, out,
                               sizeof out), WS_CLOSED);
        CU_ASSERT_EQUAL(http_status, 200);
        CU_ASSERT_EQUAL(errors, 0);
        CU_ASSERT_PTR_NOT_NULL(strstr(out, "HTTP/1.1 200 OK\r\n"));
        CU_ASSERT_PTR_NOT_NULL(strstr(out, "<!doctype html>"));
    }
    /* a query, HTTP/1.0, an absolute target */
    engine(&cb, "GET /app.js?v=2 HTTP/1.0\r\n\r\n", 0, out, sizeof out);
    CU_ASSERT_EQUAL(http_status, 200);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "export const x"));
    engine(&cb, "GET http://x/style.css HTTP/1.1\r\nHost: x\r\n\r\n", 0, out, sizeof out);
    CU_ASSERT_EQUAL(http_status, 200);
    /* traversal through the engine */
    engine(&cb, "GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 0, out, sizeof out);
    CU_ASSERT_EQUAL(http_status, 404);
    engine(&cb, "GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 0, out,
           sizeof out);
    CU_ASSERT_EQUAL(http_status, 404);
    CU_ASSERT_PTR_NULL(strstr(out, "root:"));
    /* HEAD, If-None-Match, 405 with a body that is never read */
    engine(&cb, "HEAD /app.js HTTP/1.1\r\nHost: x\r\n\r\n", 0, out, sizeof out);
    CU_ASSERT_EQUAL(http_status, 200);
    CU_ASSERT_PTR_NULL(strstr(out, "export"));
    engine(&cb, "GET /app.js HTTP/1.1\r\nHost: x\r\nIf-None-Match: *\r\n\r\n", 0, out,
           sizeof out);
    CU_ASSERT_EQUAL(http_status, 304);
    engine(&cb, "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 0, out,
           sizeof out);
    CU_ASSERT_EQUAL(http_status, 405);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "Allow: GET, HEAD\r\n"));
    /* without on_http the transport hears of it through on_error */
    engine(&old_cb, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 0, out, sizeof out);
    CU_ASSERT_EQUAL(errors, 404);
    /* the ws path still upgrades, and a plain GET of it is still 426 */
    CU_ASSERT_EQUAL(engine(&cb, "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                "Connection: Upgrade\r\nSec-WebSocket-Key: "
                                "dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                           0, out, sizeof out), WS_OPEN);
    CU_ASSERT(opened);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "101 Switching Protocols"));
    engine(&cb, "GET /chat HTTP/1.1\r\nHost: x\r\n\r\n", 0, out, sizeof out);
    CU_ASSERT_EQUAL(errors, 426);
}

/* The reload runs on the loop: a client of ~200 KB must load fast. */
static void test_load_time(void)
{
    char dir[64] = "/tmp/webfilestimeXXXXXX", name[32], err[256], *blob;
    struct web_files *s = NULL;
    struct timespec a, b;
    double ms;

    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir));
    blob = malloc(20001);
    memset(blob, 'x', 20000);
    blob[20000] = '\0';
    for (int i = 0; i < 10; i++) { /* 10 files of 20 KB */
        snprintf(name, sizeof name, "f%d.js", i);
        put(dir, name, blob);
    }
    free(blob);
    clock_gettime(CLOCK_MONOTONIC, &a);
    CU_ASSERT_EQUAL(web_load(dir, 16 << 20, 1024, &s, err, sizeof err), CHAT_OK);
    clock_gettime(CLOCK_MONOTONIC, &b);
    ms = (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6;
    printf("\n  200 KB in 10 files loaded in %.3f ms\n", ms);
    CU_ASSERT(ms < 10.0);
    CU_ASSERT_EQUAL(web_files_bytes(s), 200000);
    web_files_unref(s);
    {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        CU_ASSERT_EQUAL(system(cmd), 0);
    }
}

int main(void)
{
    CU_pSuite s;
    unsigned failed;

    mem_init();
    if (CU_initialize_registry() != CUE_SUCCESS)
        return 1;
    s = CU_add_suite("webfiles", suite_init, suite_clean);
    CU_add_test(s, "load: regular files, no dotfiles, no symlink escape", test_load_rules);
    CU_add_test(s, "load: max_files, max_bytes, a missing root", test_bounds);
    CU_add_test(s, "paths: traversal, NUL, backslash, queries, index", test_paths);
    CU_add_test(s, "MIME types by extension", test_mime);
    CU_add_test(s, "headers, ETag, If-None-Match: 304", test_headers_and_304);
    CU_add_test(s, "HEAD, 404, 405 with Allow", test_methods);
    CU_add_test(s, "served by the WebSocket engine beside the upgrade", test_engine);
    CU_add_test(s, "a 200 KB client loads in well under 10 ms", test_load_time);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failed = CU_get_number_of_failures() + CU_get_number_of_suites_failed();
    CU_cleanup_registry();
    return failed ? 1 : 0;
}
