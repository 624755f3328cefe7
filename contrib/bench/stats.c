/*
 * stats.c - measurement helpers: a mergeable latency histogram, the
 * monotonic clock, this process's CPU time and a server's CPU time and RSS
 * read from /proc (summed over the server's child processes too, so that
 * chatd -w K with its K workers counts as one server).
 *
 * The histogram is log-linear like HdrHistogram: values below 64 ns have a
 * bucket each, above that every power of two is cut into 64 equal
 * sub-buckets, so a percentile is exact to about 1.6% whatever the scale,
 * recording is a few instructions (count leading zeros, shift) and merging
 * the workers' histograms is adding arrays.  A sorted sample would be exact
 * but costs memory per message and a sort at the end.
 */
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

#define TOP_EXP (BST_NBUCKETS / BST_SUB + BST_SUB_BITS - 2)

static size_t bucket_of(uint64_t v)
{
    if (v < BST_SUB)
        return (size_t)v;
    int e = 63 - __builtin_clzll(v);
    if (e > TOP_EXP)
        return BST_NBUCKETS - 1;
    size_t sub = (size_t)(v >> (e - BST_SUB_BITS)) - BST_SUB;
    return (size_t)(e - BST_SUB_BITS + 1) * BST_SUB + sub;
}

/* The middle of bucket i. */
static uint64_t value_of(size_t i)
{
    if (i < BST_SUB)
        return i;
    int e = (int)(i / BST_SUB) + BST_SUB_BITS - 1;
    uint64_t sub = i % BST_SUB;
    uint64_t width = 1ull << (e - BST_SUB_BITS);
    return ((BST_SUB + sub) << (e - BST_SUB_BITS)) + width / 2;
}

void bst_hist_add(struct bst_hist *h, uint64_t v)
{
    h->buckets[bucket_of(v)]++;
    h->count++;
    if (v > h->max)
        h->max = v;
}

void bst_hist_merge(struct bst_hist *dst, const struct bst_hist *src)
{
    for (size_t i = 0; i < BST_NBUCKETS; i++)
        dst->buckets[i] += src->buckets[i];
    dst->count += src->count;
    if (src->max > dst->max)
        dst->max = src->max;
}

uint64_t bst_hist_pct(const struct bst_hist *h, double pct)
{
    if (h->count == 0)
        return 0;
    uint64_t rank = (uint64_t)(pct / 100.0 * (double)h->count + 0.999999);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < BST_NBUCKETS; i++) {
        seen += h->buckets[i];
        if (seen >= rank) {
            uint64_t v = value_of(i);
            return v < h->max ? v : h->max;
        }
    }
    return h->max;
}

uint64_t bst_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t bst_cpu_ns(uint64_t *user, uint64_t *sys)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    uint64_t u = (uint64_t)ru.ru_utime.tv_sec * 1000000000ull +
                 (uint64_t)ru.ru_utime.tv_usec * 1000ull;
    uint64_t s = (uint64_t)ru.ru_stime.tv_sec * 1000000000ull +
                 (uint64_t)ru.ru_stime.tv_usec * 1000ull;
    if (user)
        *user = u;
    if (sys)
        *sys = s;
    return u + s;
}

static int64_t proc_cpu_one(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* the command name may hold spaces and parentheses: skip to the last ')' */
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    unsigned long long ut, st;
    /* after ')': state ppid pgrp session tty tpgid flags minflt cminflt
     * majflt cmajflt utime stime */
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
               &ut, &st) != 2)
        return -1;
    long hz = sysconf(_SC_CLK_TCK);
    if (hz <= 0)
        hz = 100;
    return (int64_t)((ut + st) * (1000000000ull / (unsigned long long)hz));
}

static int64_t proc_rss_one(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    int64_t kb = -1;
    while (fgets(line, sizeof line, f)) {
        long long v;
        if (sscanf(line, "VmRSS: %lld kB", &v) == 1) {
            kb = v;
            break;
        }
    }
    fclose(f);
    return kb;
}

/* Call fn for pid and every process below it (chatd -w K forks workers).
 * Children are listed per thread in /proc/PID/task/TID/children. */
static int64_t proc_tree_sum(pid_t pid, int64_t (*fn)(pid_t), int depth)
{
    int64_t v = fn(pid);
    if (v < 0 || depth > 4)
        return v;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (!d)
        return v;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        char cpath[320];
        snprintf(cpath, sizeof cpath, "/proc/%d/task/%s/children", (int)pid, de->d_name);
        FILE *f = fopen(cpath, "r");
        if (!f)
            continue;
        int child;
        while (fscanf(f, "%d", &child) == 1) {
            int64_t c = proc_tree_sum((pid_t)child, fn, depth + 1);
            if (c > 0)
                v += c;
        }
        fclose(f);
    }
    closedir(d);
    return v;
}

int64_t bst_proc_cpu_ns(pid_t pid)
{
    return proc_tree_sum(pid, proc_cpu_one, 0);
}

int64_t bst_proc_rss_kb(pid_t pid)
{
    return proc_tree_sum(pid, proc_rss_one, 0);
}
