/*
 * alloc.c - the one allocator of the core and the plugins.
 *
 * Everything that crosses the plugin boundary is allocated here, and cJSON
 * and libuv are routed through the same functions at start-up, so a plugin
 * can free what cJSON built for it with host->free and tests can count or
 * fail allocations in one place.  Policy on failure: return NULL and let the
 * caller fail the one operation (a request gets an error, a connection is
 * closed); nothing aborts the process.  hiredis 0.14 has no allocator hooks,
 * so its buffers come from libc directly and never cross into plugins.
 */
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <uv.h>

#include "core.h"

void *mem_malloc(size_t n) { return malloc(n ? n : 1); }

void *mem_calloc(size_t n, size_t sz) { return calloc(n ? n : 1, sz ? sz : 1); }

void *mem_realloc(void *p, size_t n) { return realloc(p, n ? n : 1); }

void mem_free(void *p) { free(p); }

char *mem_strndup(const char *s, size_t n)
{
    char *d = mem_malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

char *mem_strdup(const char *s) { return s ? mem_strndup(s, strlen(s)) : NULL; }

void mem_init(void)
{
    cJSON_Hooks hooks = {mem_malloc, mem_free};
    cJSON_InitHooks(&hooks);
    uv_replace_allocator(mem_malloc, mem_realloc, mem_calloc, mem_free);
}
