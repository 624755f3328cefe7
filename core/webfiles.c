/*
 * webfiles.c - the static files of the web client, served from memory by
 * the HTTP/WebSocket listener (core/ws.c answers a plain GET with them).
 *
 * A file set is read whole from `[web] root` at start and on SIGHUP, with
 * plain blocking I/O: it is small (the client in contrib/web/ is ~60 KB,
 * bounded by `[web] max_bytes` and `max_files`) and the load is timed and
 * logged by main.c, so the price paid on the loop is visible (well under a
 * millisecond for 200 KB from the page cache).  Serving then never touches
 * the disk: a request is a binary search over the sorted names and one
 * header formatted into the caller's buffer; the body is borrowed from the
 * set.  A set is immutable once loaded and reference-counted (loop thread
 * only): web_reload swaps the current one, and a listener that keeps a set
 * for its open connections holds a reference (web_files_ref).
 *
 * What is loaded: regular files only, found by walking root; names that
 * start with '.' (files and folders) are skipped; a symlink is followed
 * only when realpath() puts its target inside root, and never into a
 * folder (no loops); everything else is skipped with a log line.  What is
 * served: GET and HEAD (else 405 with Allow); the target's path is
 * percent-decoded and refused (404) when it holds NUL, a backslash, a
 * "." or ".." segment or a dot-name; the query string is ignored; "/" and
 * any "dir/" mean "index.html" in that folder; there are no listings.
 *
 * Caching: `Cache-Control: no-cache` with a strong ETag (SHA-256 of the
 * content) everywhere.  The client has no build step, so its file names
 * carry no content hash: with a max-age a browser could run a new app.js
 * against an old protocol.js after an upgrade.  no-cache revalidates each
 * file (a 304 with no body when unchanged), which is one cheap round trip
 * per file on a page load.
 */
#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "core.h"

#define WEB_DEPTH_MAX 8

struct web_file {
    char *name;       /* relative to root, '/'-separated, no leading '/' */
    char *data;
    size_t len;
    const char *mime;
    char etag[36];    /* "\"" 32 hex digits "\"" */
    char lastmod[32]; /* IMF-fixdate */
};

struct web_files {
    struct web_file *f; /* sorted by name */
    size_t n, cap;
    size_t bytes;
    int refs;
};

static struct web_files *current;

/* ---- MIME types ---------------------------------------------------------- */

const char *web_mime(const char *name)
{
    static const struct { const char *ext, *type; } types[] = {
        {"html", "text/html; charset=utf-8"},
        {"js", "text/javascript; charset=utf-8"},
        {"mjs", "text/javascript; charset=utf-8"},
        {"css", "text/css; charset=utf-8"},
        {"json", "application/json"},
        {"svg", "image/svg+xml"},
        {"png", "image/png"},
        {"ico", "image/x-icon"},
        {"webmanifest", "application/manifest+json"},
        {"woff2", "font/woff2"},
        {"txt", "text/plain; charset=utf-8"},
    };
    const char *dot = strrchr(name, '.'), *slash = strrchr(name, '/');
    if (dot && (!slash || dot > slash))
        for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
            if (strcmp(dot + 1, types[i].ext) == 0)
                return types[i].type;
    return "application/octet-stream";
}

/* ---- loading -------------------------------------------------------------- */

struct load {
    struct web_files *set;
    char root[PATH_MAX]; /* realpath of root */
    size_t rootlen;
    size_t max_bytes, max_files;
    char *err;
    size_t errlen;
};

static int load_fail(struct load *l, const char *what, const char *path)
{
    snprintf(l->err, l->errlen, "%s: %s", path, what);
    return -1;
}

static void file_meta(struct web_file *f, const struct stat *st)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    struct tm tm;
    static const char hex[] = "0123456789abcdef";

    f->etag[0] = '"';
    if (EVP_Digest(f->data, f->len, md, &mdlen, EVP_sha256(), NULL) && mdlen >= 16) {
        for (int i = 0; i < 16; i++) {
            f->etag[1 + 2 * i] = hex[md[i] >> 4];
            f->etag[2 + 2 * i] = hex[md[i] & 15];
        }
    } else { /* no digest: the size and mtime still change with the file */
        snprintf(f->etag + 1, 33, "%016llx%016llx", (unsigned long long)f->len,
                 (unsigned long long)st->st_mtime);
    }
    f->etag[33] = '"';
    f->etag[34] = '\0';
    gmtime_r(&st->st_mtime, &tm);
    strftime(f->lastmod, sizeof f->lastmod, "%a, %d %b %Y %H:%M:%S GMT", &tm);
}

/* Read one regular file (already checked) into the set under name. */
static int load_file(struct load *l, const char *path, const char *name,
                     const struct stat *st)
{
    struct web_files *s = l->set;
    struct web_file *f;
    int fd = -1, r = -1;
    size_t got = 0;

    if (s->n >= l->max_files)
        return load_fail(l, "more files than [web] max_files", path);
    if ((size_t)st->st_size > l->max_bytes - s->bytes)
        return load_fail(l, "the files are over [web] max_bytes", path);
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 32;
        struct web_file *nf = mem_realloc(s->f, cap * sizeof *nf);
        if (!nf)
            return load_fail(l, "out of memory", path);
        s->f = nf;
        s->cap = cap;
    }
    f = &s->f[s->n];
    memset(f, 0, sizeof *f);
    f->len = (size_t)st->st_size;
    if (!(f->name = mem_strdup(name)) || !(f->data = mem_malloc(f->len ? f->len : 1))) {
        load_fail(l, "out of memory", path);
        goto out;
    }
    if ((fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)) < 0 && errno == ELOOP)
        fd = open(path, O_RDONLY | O_CLOEXEC); /* a checked symlink */
    if (fd < 0) {
        load_fail(l, strerror(errno), path);
        goto out;
    }
    while (got < f->len) {
        ssize_t n = read(fd, f->data + got, f->len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            load_fail(l, n ? strerror(errno) : "changed while read", path);
            goto out;
        }
        got += (size_t)n;
    }
    f->mime = web_mime(name);
    file_meta(f, st);
    s->bytes += f->len;
    s->n++;
    r = 0;
out:
    if (fd >= 0)
        close(fd);
    if (r) {
        mem_free(f->name);
        mem_free(f->data);
    }
    return r;
}

static int load_dir(struct load *l, const char *dir, const char *rel, int depth);

/* One directory entry: decide what it is, then load or descend. */
static int load_entry(struct load *l, const char *dir, const char *rel,
                      const char *dname, int depth)
{
    char path[PATH_MAX], name[PATH_MAX], real[PATH_MAX];
    struct stat st;

    if (dname[0] == '.') /* dotfiles, ".", "..": never served */
        return 0;
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, dname) >= sizeof path ||
        (size_t)snprintf(name, sizeof name, "%s%s%s", rel, rel[0] ? "/" : "",
                         dname) >= sizeof name)
        return load_fail(l, "path too long", dir);
    if (lstat(path, &st) != 0)
        return 0; /* gone meanwhile */
    if (S_ISLNK(st.st_mode)) {
        if (!realpath(path, real) || strncmp(real, l->root, l->rootlen) != 0 ||
            real[l->rootlen] != '/') {
            LOGW("web: %s: a symlink that leaves the root; skipped", path);
            return 0;
        }
        if (stat(real, &st) != 0 || !S_ISREG(st.st_mode)) {
            LOGW("web: %s: a symlink to something other than a file; skipped", path);
            return 0;
        }
        return load_file(l, real, name, &st);
    }
    if (S_ISDIR(st.st_mode)) {
        if (depth >= WEB_DEPTH_MAX)
            return load_fail(l, "folders nested too deep", path);
        return load_dir(l, path, name, depth + 1);
    }
    if (!S_ISREG(st.st_mode)) {
        LOGW("web: %s: not a regular file; skipped", path);
        return 0;
    }
    return load_file(l, path, name, &st);
}

static int load_dir(struct load *l, const char *dir, const char *rel, int depth)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int r = 0;

    if (!d)
        return load_fail(l, strerror(errno), dir);
    while (r == 0 && (e = readdir(d)) != NULL)
        r = load_entry(l, dir, rel, e->d_name, depth);
    closedir(d);
    return r;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(((const struct web_file *)a)->name, ((const struct web_file *)b)->name);
}

int web_load(const char *root, size_t max_bytes, size_t max_files,
             struct web_files **out, char *err, size_t errlen)
{
    struct load l = {.max_bytes = max_bytes, .max_files = max_files,
                     .err = err, .errlen = errlen};
    struct stat st;

    *out = NULL;
    if (!realpath(root, l.root) || stat(l.root, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "%s: %s", root,
                 errno ? strerror(errno) : "not a folder");
        return CHAT_ERR_INVAL;
    }
    l.rootlen = strlen(l.root);
    if (l.rootlen == 1) /* "/": every path is under it */
        l.rootlen = 0;
    if (!(l.set = mem_calloc(1, sizeof *l.set))) {
        snprintf(err, errlen, "out of memory");
        return CHAT_ERR_NOMEM;
    }
    l.set->refs = 1;
    if (load_dir(&l, l.root, "", 0) != 0) {
        web_files_unref(l.set);
        return CHAT_ERR_INVAL;
    }
    if (l.set->n)
        qsort(l.set->f, l.set->n, sizeof *l.set->f, by_name);
    *out = l.set;
    return CHAT_OK;
}

struct web_files *web_files_ref(struct web_files *s)
{
    if (s)
        s->refs++;
    return s;
}

void web_files_unref(struct web_files *s)
{
    if (!s)
        return;
    assert(s->refs > 0); /* an unref without its ref */
    if (--s->refs > 0)
        return;
    for (size_t i = 0; i < s->n; i++) {
        mem_free(s->f[i].name);
        mem_free(s->f[i].data);
    }
    mem_free(s->f);
    mem_free(s);
}

size_t web_files_count(const struct web_files *s)
{
    return s ? s->n : 0;
}

size_t web_files_bytes(const struct web_files *s)
{
    return s ? s->bytes : 0;
}

const struct web_files *web_current(void)
{
    return current;
}

void web_set_current(struct web_files *s)
{
    struct web_files *old = current;
    current = s;
    web_files_unref(old);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

int web_configure(const struct conf *c)
{
    struct web_files *s = NULL;
    char err[PATH_MAX + 128];
    double t0 = now_ms();
    int r;

    if (!c->web_root || !c->web_root[0]) {
        if (current)
            LOGI("web: [web] root is off; no files served");
        web_set_current(NULL);
        return CHAT_OK;
    }
    r = web_load(c->web_root, c->web_max_bytes, (size_t)c->web_max_files, &s,
                 err, sizeof err);
    if (r != CHAT_OK) {
        LOGE("web: [web] root: %s%s", err,
             current ? "; the files loaded before are kept" : "");
        return r;
    }
    LOGI("web: %zu files, %zu bytes from %s in %.2f ms", s->n, s->bytes,
         c->web_root, now_ms() - t0);
    web_set_current(s);
    return CHAT_OK;
}

/* ---- paths ---------------------------------------------------------------- */

static int hexval(int c)
{
    return c >= '0' && c <= '9' ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

int web_path(const char *target, size_t len, char *out, size_t outlen)
{
    static const char idx[] = "index.html";
    char dec[WEB_NAME_MAX];
    size_t n = 0, i;
    const char *p;

    if (len == 0 || target[0] != '/')
        return CHAT_ERR_INVAL;
    for (i = 1; i < len && target[i] != '?' && target[i] != '#'; i++) {
        int c = (unsigned char)target[i];
        if (c == '%') {
            int hi = i + 2 < len ? hexval(target[i + 1]) : -1;
            int lo = i + 2 < len ? hexval(target[i + 2]) : -1;
            if (hi < 0 || lo < 0)
                return CHAT_ERR_INVAL;
            c = hi * 16 + lo;
            i += 2;
        }
        if (c == 0 || c == '\\' || n + 1 >= sizeof dec)
            return CHAT_ERR_INVAL;
        dec[n++] = (char)c;
    }
    dec[n] = '\0';
    /* every segment: not empty ("//") unless last, no dot-name (".", "..",
     * dotfiles); the decoded bytes are checked, so "%2e%2e" is ".." */
    for (p = dec;;) {
        const char *slash = strchr(p, '/');
        size_t sl = slash ? (size_t)(slash - p) : strlen(p);
        if ((sl == 0 && slash) || (sl > 0 && p[0] == '.'))
            return CHAT_ERR_INVAL;
        if (!slash)
            break;
        p = slash + 1;
    }
    if (n == 0 || dec[n - 1] == '/') { /* "/" or "dir/": its index.html */
        if (n + sizeof idx > sizeof dec)
            return CHAT_ERR_INVAL;
        memcpy(dec + n, idx, sizeof idx);
        n += sizeof idx - 1;
    }
    if (n + 1 > outlen)
        return CHAT_ERR_INVAL;
    memcpy(out, dec, n + 1);
    return CHAT_OK;
}

/* ---- answers ---------------------------------------------------------------- */

static const struct web_file *find(const struct web_files *s, const char *name)
{
    size_t lo = 0, hi = s ? s->n : 0;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, s->f[mid].name);
        if (c == 0)
            return &s->f[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

/* If-None-Match: "*" or a list of entity tags; W/ tags compare weakly. */
static int etag_match(const char *inm, const char *etag)
{
    size_t el = strlen(etag);
    const char *p = inm;

    while (p && *p) {
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        if (*p == '*')
            return 1;
        if (p[0] == 'W' && p[1] == '/')
            p += 2;
        if (strncmp(p, etag, el) == 0 && (p[el] == '\0' || p[el] == ',' ||
                                          p[el] == ' ' || p[el] == '\t'))
            return 1;
        p = strchr(p, ',');
    }
    return 0;
}

#define WEB_SECURITY                                                          \
    "Content-Security-Policy: default-src 'self'; script-src 'self'; "       \
    "style-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "   \
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'\r\n"          \
    "X-Content-Type-Options: nosniff\r\n"                                     \
    "Referrer-Policy: no-referrer\r\n"

static void status_reply(struct web_reply *r, int status, const char *text,
                         int head_only, const char *extra)
{
    static const char body[] = "not found\n";
    size_t blen = status == 404 ? sizeof body - 1 : 0;
    int n = snprintf(r->head, sizeof r->head,
                     "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     "Content-Length: %zu\r\n%s" WEB_SECURITY
                     "Connection: close\r\n\r\n",
                     status, text, blen, extra);
    r->status = status;
    r->head_len = n > 0 && (size_t)n < sizeof r->head ? (size_t)n : 0;
    r->body = head_only || !blen ? NULL : body;
    r->body_len = head_only ? 0 : blen;
}

void web_answer(const struct web_files *s, const char *method, const char *target,
                size_t len, const char *if_none_match, struct web_reply *r)
{
    char name[WEB_NAME_MAX];
    const struct web_file *f;
    int head = strcmp(method, "HEAD") == 0;
    int n;

    memset(r, 0, sizeof *r);
    if (!head && strcmp(method, "GET") != 0) {
        status_reply(r, 405, "Method Not Allowed", 0, "Allow: GET, HEAD\r\n");
        return;
    }
    if (web_path(target, len, name, sizeof name) != CHAT_OK || !(f = find(s, name))) {
        status_reply(r, 404, "Not Found", head, "");
        return;
    }
    if (if_none_match && etag_match(if_none_match, f->etag)) {
        n = snprintf(r->head, sizeof r->head,
                     "HTTP/1.1 304 Not Modified\r\nETag: %s\r\n"
                     "Cache-Control: no-cache\r\n" WEB_SECURITY
                     "Connection: close\r\n\r\n", f->etag);
        r->status = 304;
    } else {
        n = snprintf(r->head, sizeof r->head,
                     "HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "ETag: %s\r\nLast-Modified: %s\r\nCache-Control: no-cache\r\n"
                     WEB_SECURITY "Connection: close\r\n\r\n",
                     f->mime, f->len, f->etag, f->lastmod);
        r->status = 200;
        if (!head) {
            r->body = f->data;
            r->body_len = f->len;
        }
    }
    r->head_len = n > 0 && (size_t)n < sizeof r->head ? (size_t)n : 0;
}
