/*
 * fuzz_web.c - libFuzzer target for the web client's file service: request
 * paths (web_path: percent-decoding, dot-names, NUL, backslashes) and whole
 * HTTP requests answered by the WebSocket engine from a file set
 * (core/ws.c + core/webfiles.c), from arbitrary bytes.
 *
 * The file set is made once, in a mkdtemp folder: index.html, app.js, a
 * dotfile and a symlink to a file outside the root, both holding a marker
 * that must never be served.  Invariants, checked with abort():
 *   - a path web_path accepts has no NUL, no '\\', no leading '/', no "//",
 *     and no segment that starts with '.';
 *   - the engine's answer to any bytes is either nothing yet (a head still
 *     incomplete), or an HTTP/1.1 status line; it never holds a marker;
 *     a request answered from the files leaves the engine WS_CLOSED.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core.h"
#include "ws.h"

#define MARK "NEVER-SERVED-7f3a"

static struct web_files *set;

static void put(const char *dir, const char *name, const char *text)
{
    char p[512];
    FILE *f;
    snprintf(p, sizeof p, "%s/%s", dir, name);
    if (!(f = fopen(p, "w")))
        abort();
    fputs(text, f);
    fclose(f);
}

static void make_set(void)
{
    char root[] = "/tmp/fuzzwebXXXXXX", out[] = "/tmp/fuzzwebxXXXXXX", a[600], b[600];
    char err[256];
    if (!mkdtemp(root) || !mkdtemp(out))
        abort();
    put(root, "index.html", "<!doctype html>");
    put(root, "app.js", "export{}");
    put(root, ".env", MARK);
    put(out, "secret", MARK);
    snprintf(a, sizeof a, "%s/secret", out);
    snprintf(b, sizeof b, "%s/link.txt", root);
    if (symlink(a, b) != 0)
        abort();
    if (web_load(root, 1 << 20, 16, &set, err, sizeof err) != CHAT_OK ||
        web_files_count(set) != 2)
        abort();
}

static void check_path(const uint8_t *d, size_t n)
{
    char out[WEB_NAME_MAX];
    if (web_path((const char *)d, n, out, sizeof out) != CHAT_OK)
        return;
    if (out[0] == '/' || out[0] == '.' || strchr(out, '\\') || strstr(out, "//") ||
        strstr(out, "/."))
        abort();
}

static void on_http(void *ud, int status)
{
    (void)ud;
    if (status != 200 && status != 304 && status != 404 && status != 405)
        abort();
}

static const struct ws_cb cbs = {NULL, NULL, NULL, NULL, NULL, on_http};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct ws_conf c = {65536, "/chat", NULL, 0, NULL};
    struct ws_conn *w;
    const char *p;
    size_t n;

    if (!set) {
        mem_init();
        log_level = -1; /* the skipped symlink is logged: keep the run quiet */
        make_set();
    }
    check_path(data, size);
    c.files = set;
    if (!(w = ws_conn_new(&c, &cbs, NULL)))
        return 0;
    ws_conn_feed(w, (const char *)data, size);
    n = ws_conn_pending(w, &p);
    if (n && (n < 9 || memcmp(p, "HTTP/1.1 ", 9) != 0))
        abort();
    if (n && memmem(p, n, MARK, sizeof MARK - 1))
        abort();
    ws_conn_free(w);
    return 0;
}
