/*
 * log.c - one line per event, as text or JSON, to stderr or a file.
 *
 * A line is built in a stack buffer and written with a single write(2), so
 * lines from worker threads never interleave and no lock is needed.  The
 * level check happens in the LOG() and chat_log() macros, before any
 * argument is formatted.
 *
 * The descriptor never changes number once log_open() ran: it is a private
 * duplicate of stderr or the log_file, and log_reopen() (SIGUSR1, on the
 * loop thread) replaces what it refers to with dup3(), which is atomic, so
 * a worker thread writing at that moment reaches the old file or the new
 * one, never a closed descriptor.  The format flags are atomics for the same
 * reason: a reload may flip them while a worker thread logs.
 *
 * Under systemd (JOURNAL_STREAM names the device and inode of our stderr)
 * lines carry no time of their own (the journal stamps them) and start with
 * the syslog priority as "<N>", which journald turns into PRIORITY=
 * (sd-daemon.h): error 3, warn 4, info 6, debug 7.
 *
 * A line about a session carries its context (struct log_ctx: session id,
 * peer, user id and name): text lines as "session=ID peer=ADDR user=UID
 * name=NAME" before the message, JSON lines as members.  This file knows
 * nothing of sessions; LOGS() in core.h fills the context from net.c's
 * accessors.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "core.h"

int log_level = CHAT_LOG_INFO;

static const char *const level_names[] = {"error", "warn", "info", "debug"};
static const int level_prio[] = {3, 4, 6, 7}; /* LOG_ERR .. LOG_DEBUG */

static atomic_int fmt_json;   /* LOG_FORMAT_JSON */
static atomic_int journal;    /* stderr is the journal's stream */
static int log_fd = STDERR_FILENO; /* a private duplicate once log_open ran */
static int own_fd;            /* log_fd is ours (not STDERR_FILENO itself) */
static char log_path[4096];   /* "" = stderr; loop thread only */

int log_parse_level(const char *s)
{
    for (int i = 0; i < 4; i++)
        if (strcasecmp(s, level_names[i]) == 0)
            return i;
    return -1;
}

int log_parse_format(const char *s)
{
    if (strcasecmp(s, "text") == 0)
        return LOG_FORMAT_TEXT;
    if (strcasecmp(s, "json") == 0)
        return LOG_FORMAT_JSON;
    return -1;
}

/* JOURNAL_STREAM is "DEV:INO" of the stream systemd connected; it counts
 * only while our stderr is still that stream (not redirected since). */
int log_stderr_is_journal(void)
{
    const char *e = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;
    if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
        return 0;
    if (fstat(STDERR_FILENO, &st) != 0)
        return 0;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

/* Point log_fd at path ("" = stderr) without changing its number. */
static int point_fd(const char *path, char *err, size_t errlen)
{
    int fd = STDERR_FILENO;
    if (path[0]) {
        fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0640);
        if (fd < 0) {
            snprintf(err, errlen, "log_file %s: %s", path, strerror(errno));
            return -1;
        }
    }
    if (!own_fd) {
        int d = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (d < 0) {
            snprintf(err, errlen, "log: dup: %s", strerror(errno));
            goto fail;
        }
        log_fd = d;
        own_fd = 1;
    } else if (dup3(fd, log_fd, O_CLOEXEC) < 0) {
        snprintf(err, errlen, "log: dup3: %s", strerror(errno));
        goto fail;
    }
    if (fd != STDERR_FILENO)
        close(fd);
    return 0;
fail:
    if (fd != STDERR_FILENO)
        close(fd);
    return -1;
}

int log_open(const char *path, int format, char *err, size_t errlen)
{
    if (!path)
        path = "";
    if (strlen(path) >= sizeof log_path) {
        snprintf(err, errlen, "log_file: path too long");
        return -1;
    }
    if (!own_fd || strcmp(path, log_path) != 0) {
        if (point_fd(path, err, errlen))
            return -1;
        snprintf(log_path, sizeof log_path, "%s", path);
    }
    atomic_store_explicit(&journal, !path[0] && log_stderr_is_journal(),
                          memory_order_relaxed);
    atomic_store_explicit(&fmt_json, format == LOG_FORMAT_JSON, memory_order_relaxed);
    return 0;
}

int log_reopen(void)
{
    char err[512];
    if (!log_path[0])
        return 0; /* stderr: nothing to reopen */
    if (point_fd(log_path, err, sizeof err)) {
        LOGE("SIGUSR1: %s; still writing to the old file", err);
        return -1;
    }
    LOGI("SIGUSR1: reopened %s", log_path);
    return 0;
}

/* ---- building a line ---------------------------------------------------- */

struct line {
    char buf[2048];
    size_t n;
    size_t cap; /* bytes usable (room is kept for what must close a line) */
};

static void put(struct line *l, const char *s, size_t len)
{
    size_t room = l->cap - l->n;
    if (len > room)
        len = room;
    memcpy(l->buf + l->n, s, len);
    l->n += len;
}

/* All or nothing: an escape sequence is never cut in half. */
static int put_all(struct line *l, const char *s, size_t len)
{
    if (len > l->cap - l->n)
        return -1;
    memcpy(l->buf + l->n, s, len);
    l->n += len;
    return 0;
}

static void putf(struct line *l, const char *fmt, ...) CHAT_PRINTF(2, 3);
static void putf(struct line *l, const char *fmt, ...)
{
    size_t room = l->cap - l->n;
    va_list ap;
    int r;
    va_start(ap, fmt);
    r = vsnprintf(l->buf + l->n, room + 1, fmt, ap);
    va_end(ap);
    if (r > 0)
        l->n += (size_t)r < room ? (size_t)r : room;
}

/* Length of the UTF-8 sequence at s (lead byte >= 0x80), or 0 when it is
 * not one: a message cut mid-character, or bytes from a peer. */
static size_t utf8_len(const unsigned char *s)
{
    size_t n = s[0] >= 0xf0 && s[0] < 0xf5 ? 4 : s[0] >= 0xe0 ? 3 : s[0] >= 0xc2 ? 2 : 0;
    for (size_t i = 1; i < n; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    return n;
}

/* s as the body of a JSON string (json: valid UTF-8 out, whatever came in)
 * or with control characters shown as '?' (text: one event stays one line
 * whatever a peer sent). */
static void put_str(struct line *l, const char *s, int json)
{
    char e[8];
    int r = 0;
    for (; *s && r == 0; s++) {
        unsigned char c = (unsigned char)*s;
        size_t n;
        if (json && c >= 0x80) {
            if ((n = utf8_len((const unsigned char *)s)) == 0)
                r = put_all(l, "\\ufffd", 6);
            else if ((r = put_all(l, s, n)) == 0)
                s += n - 1;
        } else if (c >= 0x20 && c != 0x7f && (!json || (c != '"' && c != '\\')))
            r = put_all(l, (const char *)&c, 1);
        else if (!json)
            r = put_all(l, "?", 1);
        else if (c == '"' || c == '\\')
            r = put_all(l, c == '"' ? "\\\"" : "\\\\", 2);
        else if (c == '\n')
            r = put_all(l, "\\n", 2);
        else if (c == '\t')
            r = put_all(l, "\\t", 2);
        else
            r = put_all(l, e, (size_t)snprintf(e, sizeof e, "\\u%04x", c));
    }
}

static void put_time(struct line *l, int json)
{
    struct timeval tv;
    struct tm tm;
    char t[32];
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    strftime(t, sizeof t, "%Y-%m-%dT%H:%M:%S", &tm);
    putf(l, json ? "\"ts\":\"%s.%03ldZ\"," : "%s.%03ldZ ", t,
         (long)(tv.tv_usec / 1000));
}

static void put_ctx_text(struct line *l, const struct log_ctx *c)
{
    putf(l, "session=%llu ", (unsigned long long)c->session);
    if (c->peer) {
        put(l, "peer=", 5);
        put_str(l, c->peer, 0);
        put(l, " ", 1);
    }
    if (c->user > 0) {
        putf(l, "user=%lld ", (long long)c->user);
        if (c->name && c->name[0]) {
            put(l, "name=", 5);
            put_str(l, c->name, 0);
            put(l, " ", 1);
        }
    }
}

static void put_ctx_json(struct line *l, const struct log_ctx *c)
{
    putf(l, ",\"session\":%llu", (unsigned long long)c->session);
    if (c->peer) {
        put(l, ",\"peer\":\"", 9);
        put_str(l, c->peer, 1);
        put(l, "\"", 1);
    }
    if (c->user > 0) {
        putf(l, ",\"user\":%lld", (long long)c->user);
        if (c->name && c->name[0]) {
            put(l, ",\"name\":\"", 9);
            put_str(l, c->name, 1);
            put(l, "\"", 1);
        }
    }
}

/* The message itself: formatted, then copied (JSON-escaped) into l. */
static void put_msg(struct line *l, int json, const char *fmt, va_list ap)
{
    char msg[1536];
    int r = vsnprintf(msg, sizeof msg, fmt, ap);
    if (r < 0)
        msg[0] = '\0';
    if (json)
        put_str(l, msg, 1);
    else
        put(l, msg, strlen(msg));
}

void log_vwrite_ctx(int level, const char *who, const struct log_ctx *ctx,
                    const char *fmt, va_list ap)
{
    struct line l;
    int json = atomic_load_explicit(&fmt_json, memory_order_relaxed);
    int jr = atomic_load_explicit(&journal, memory_order_relaxed);

    if (level < 0)
        level = 0;
    if (level > 3)
        level = 3;
    l.n = 0;
    l.cap = sizeof l.buf - 1; /* the '\n' */
    if (jr)
        putf(&l, "<%d>", level_prio[level]);
    if (json) {
        put(&l, "{", 1);
        if (!jr)
            put_time(&l, 1);
        putf(&l, "\"level\":\"%s\",\"who\":\"", level_names[level]);
        put_str(&l, who, 1);
        put(&l, "\"", 1);
        if (ctx)
            put_ctx_json(&l, ctx);
        put(&l, ",\"msg\":\"", 8);
        l.cap -= 2; /* a cut line still closes its string and object */
        put_msg(&l, 1, fmt, ap);
        l.cap += 2;
        put(&l, "\"}", 2);
    } else {
        if (!jr)
            put_time(&l, 0);
        putf(&l, "%-5s [", level_names[level]);
        put_str(&l, who, 0);
        put(&l, "] ", 2);
        if (ctx)
            put_ctx_text(&l, ctx);
        put_msg(&l, 0, fmt, ap);
    }
    l.buf[l.n++] = '\n';
    if (write(log_fd, l.buf, l.n) < 0) {
        /* nowhere left to report it */
    }
}

void log_vwrite(int level, const char *who, const char *fmt, va_list ap)
{
    log_vwrite_ctx(level, who, NULL, fmt, ap);
}

void log_write(int level, const char *who, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vwrite_ctx(level, who, NULL, fmt, ap);
    va_end(ap);
}

void log_write_ctx(int level, const char *who, const struct log_ctx *ctx,
                   const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vwrite_ctx(level, who, ctx, fmt, ap);
    va_end(ap);
}

/* The name of a CHAT_ERR_* code: log lines and host->strerror. */
const char *log_strerror(int err)
{
    switch (err) {
    case CHAT_OK: return "ok";
    case CHAT_ERR_NOMEM: return "out of memory";
    case CHAT_ERR_INVAL: return "invalid argument";
    case CHAT_ERR_EXISTS: return "already exists";
    case CHAT_ERR_NOTFOUND: return "not found";
    case CHAT_ERR_STATE: return "not allowed in this state";
    case CHAT_ERR_BUSY: return "queue full";
    case CHAT_ERR_DB: return "database error";
    case CHAT_ERR_UNAVAILABLE: return "service unavailable";
    case CHAT_ERR_CLOSED: return "closed";
    case CHAT_ERR_TIMEOUT: return "timed out";
    case CHAT_ERR_ABI: return "ABI mismatch";
    case CHAT_ERR_IO: return "I/O error";
    case CHAT_ERR_QUOTA: return "recipient's mailbox is full";
    case CHAT_ERR_QUOTA_SENDER: return "too many messages wait for this recipient from the sender";
    default: return "unknown error";
    }
}
