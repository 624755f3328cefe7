/*
 * prom_sample.h - for tests that read metrics_render()'s text: the value of
 * the sample line that starts with prefix (name and labels), -1 if none.
 */
#ifndef CHAT_TEST_PROM_SAMPLE_H
#define CHAT_TEST_PROM_SAMPLE_H

#include <stdlib.h>
#include <string.h>

static inline double prom_sample(const char *text, const char *prefix)
{
    const char *p = text;
    size_t n = strlen(prefix);

    while (p && *p) {
        if (strncmp(p, prefix, n) == 0 && p[n] == ' ')
            return strtod(p + n + 1, NULL);
        p = strchr(p, '\n');
        if (p)
            p++;
    }
    return -1;
}

#endif
