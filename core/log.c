/*
 * log.c - logging to stderr with a UTC timestamp, level and origin.
 *
 * One line per call, written with a single write(2) so lines from worker
 * threads never interleave.  The level check happens in the LOG() and
 * chat_log() macros, before any argument is formatted.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "core.h"

int log_level = CHAT_LOG_INFO;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

int log_parse_level(const char *s)
{
    for (int i = 0; i < 4; i++)
        if (strcasecmp(s, level_names[i]) == 0)
            return i;
    return -1;
}

void log_vwrite(int level, const char *who, const char *fmt, va_list ap)
{
    char line[2048];
    struct timeval tv;
    struct tm tm;
    size_t n;
    int r;

    if (level < 0)
        level = 0;
    if (level > 3)
        level = 3;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    n = strftime(line, sizeof line, "%Y-%m-%dT%H:%M:%S", &tm);
    r = snprintf(line + n, sizeof line - n, ".%03ldZ %-5s [%s] ",
                 (long)(tv.tv_usec / 1000), level_names[level], who);
    if (r > 0)
        n += (size_t)r;
    if (n < sizeof line) {
        r = vsnprintf(line + n, sizeof line - n, fmt, ap);
        if (r > 0)
            n += (size_t)r < sizeof line - n ? (size_t)r : sizeof line - n - 1;
    }
    if (n >= sizeof line - 1)
        n = sizeof line - 2;
    line[n++] = '\n';
    if (write(STDERR_FILENO, line, n) < 0) {
        /* nowhere left to report it */
    }
}

void log_write(int level, const char *who, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vwrite(level, who, fmt, ap);
    va_end(ap);
}
