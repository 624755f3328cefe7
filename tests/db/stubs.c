/*
 * stubs.c - test-only stand-ins for the parts of the core test_db does not
 * exercise.
 *
 * stub_ref/stub_unref, registered with db_on_ref() as chatd registers
 * plug_ref/plug_unref, count references so the tests can check that every
 * accepted query holds one until its callback has run.  mem_* and log_* are
 * weak fallbacks: test_db also compiles core/alloc.c and core/log.c, and
 * once those define the real functions the linker takes theirs (a strong
 * definition wins over a weak one); while they are placeholders these keep
 * the test linkable.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

#define WEAK __attribute__((weak))

/* Only the loop thread takes and drops references. */
long stub_refs;        /* current total */
long stub_ref_calls;
long stub_unref_calls;
long stub_unref_below_zero;

void stub_ref(struct chat_plugin *p)
{
    (void)p;
    stub_refs++;
    stub_ref_calls++;
}

void stub_unref(struct chat_plugin *p)
{
    (void)p;
    if (--stub_refs < 0)
        stub_unref_below_zero++;
    stub_unref_calls++;
}

WEAK int log_level = CHAT_LOG_WARN;

WEAK void *mem_malloc(size_t n) { return malloc(n); }
WEAK void *mem_calloc(size_t n, size_t sz) { return calloc(n, sz); }
WEAK void *mem_realloc(void *p, size_t n) { return realloc(p, n); }
WEAK void mem_free(void *p) { free(p); }
WEAK char *mem_strdup(const char *s) { return strdup(s); }
WEAK char *mem_strndup(const char *s, size_t n) { return strndup(s, n); }
WEAK void mem_init(void) {}

WEAK int log_parse_level(const char *s)
{
    static const char *names[] = {"error", "warn", "info", "debug"};
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0)
            return i;
    return -1;
}

WEAK void log_vwrite(int level, const char *who, const char *fmt, va_list ap)
{
    static const char *names[] = {"error", "warn", "info", "debug"};
    char line[1024];
    int n = snprintf(line, sizeof line, "[%s] %s: ",
                     level >= 0 && level <= 3 ? names[level] : "?", who);
    if (n < 0)
        return;
    if ((size_t)n < sizeof line)
        vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    fprintf(stderr, "%s\n", line); /* one call: lines from threads stay whole */
}

WEAK void log_write(int level, const char *who, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vwrite(level, who, fmt, ap);
    va_end(ap);
}
