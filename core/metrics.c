/*
 * metrics.c - the node's metrics in the Prometheus text exposition format.
 *
 * The admin listener serves what metrics_render() writes.  This first cut
 * exports the build and the uptime only; the registry of counters, gauges
 * and histograms (per thread on the hot path, no locks) grows from here.
 */
#include <stdio.h>
#include <string.h>

#include "core.h"

static uint64_t started_ns;

void metrics_start(void)
{
    started_ns = uv_hrtime();
}

char *metrics_render(size_t *len)
{
    char *out = mem_malloc(512);
    int n;

    if (!out)
        return NULL;
    n = snprintf(out, 512,
                 "# HELP chatd_build_info The chatd build; always 1.\n"
                 "# TYPE chatd_build_info gauge\n"
                 "chatd_build_info{version=\"%s\",abi=\"%d.%d\"} 1\n"
                 "# HELP chatd_uptime_seconds Seconds since this process started.\n"
                 "# TYPE chatd_uptime_seconds gauge\n"
                 "chatd_uptime_seconds %.3f\n",
                 CHATD_VERSION, CHAT_ABI_MAJOR, CHAT_ABI_MINOR,
                 (double)(uv_hrtime() - started_ns) / 1e9);
    if (n < 0 || n >= 512) {
        mem_free(out);
        return NULL;
    }
    *len = (size_t)n;
    return out;
}
