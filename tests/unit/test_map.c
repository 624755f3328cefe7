/*
 * test_map.c - CUnit tests of the int64 -> pointer hash map (core/map.c).
 *
 * The large tests run random put/replace/delete/get sequences over 100k
 * keys against a reference (a plain array indexed by key number; keys are
 * spread over the whole int64 range by an invertible mapping), and check
 * the iteration contract: every entry exactly once, also while deleting the
 * entries already returned.
 */
#include <stdlib.h>
#include <string.h>

#include <CUnit/Basic.h>

#include "core.h"

#define NKEYS 100000

static unsigned long long rng_state = 0x2545F4914F6CDD1DULL;

static unsigned long long rnd64(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* Key number i -> an int64 key spread over the range (odd multiplier: a
 * bijection mod 2^64, so distinct numbers give distinct keys). */
static int64_t key_of(size_t i)
{
    return (int64_t)((unsigned long long)i * 0xD6E8FEB86659FD93ULL + 0x1234567ULL);
}

/* A non-NULL value that encodes i. */
static void *val_of(size_t i, unsigned gen)
{
    return (void *)(((uintptr_t)i << 8) | (gen & 0x7f) | 0x80);
}

static struct map_stats {
    size_t cap_not_pow2, over_load;
} stats;

static void check_shape(const struct map *m)
{
    if (m->cap & (m->cap - 1))
        stats.cap_not_pow2++;
    if (m->len * 10 > m->cap * 7)
        stats.over_load++;
}

static void test_basic(void)
{
    struct map m;
    int a, b;

    map_init(&m);
    CU_ASSERT_PTR_NULL(map_get(&m, 1));
    CU_ASSERT_PTR_NULL(map_del(&m, 1));
    CU_ASSERT_EQUAL(map_put(&m, 1, NULL), CHAT_ERR_INVAL);
    CU_ASSERT_EQUAL(m.len, 0);
    CU_ASSERT_EQUAL(map_put(&m, 1, &a), CHAT_OK);
    CU_ASSERT_EQUAL(map_put(&m, -1, &b), CHAT_OK);
    CU_ASSERT_EQUAL(map_put(&m, INT64_MIN, &a), CHAT_OK);
    CU_ASSERT_EQUAL(map_put(&m, INT64_MAX, &b), CHAT_OK);
    CU_ASSERT_EQUAL(map_put(&m, 0, &a), CHAT_OK);
    CU_ASSERT_EQUAL(m.len, 5);
    CU_ASSERT_PTR_EQUAL(map_get(&m, 1), &a);
    CU_ASSERT_PTR_EQUAL(map_get(&m, -1), &b);
    CU_ASSERT_PTR_EQUAL(map_get(&m, INT64_MIN), &a);
    CU_ASSERT_PTR_EQUAL(map_get(&m, INT64_MAX), &b);
    CU_ASSERT_PTR_EQUAL(map_get(&m, 0), &a);
    CU_ASSERT_PTR_NULL(map_get(&m, 2));
    /* replace keeps len */
    CU_ASSERT_EQUAL(map_put(&m, 1, &b), CHAT_OK);
    CU_ASSERT_EQUAL(m.len, 5);
    CU_ASSERT_PTR_EQUAL(map_get(&m, 1), &b);
    /* NULL does not delete or replace */
    CU_ASSERT_EQUAL(map_put(&m, 1, NULL), CHAT_ERR_INVAL);
    CU_ASSERT_PTR_EQUAL(map_get(&m, 1), &b);
    CU_ASSERT_PTR_EQUAL(map_del(&m, 1), &b);
    CU_ASSERT_PTR_NULL(map_del(&m, 1));
    CU_ASSERT_PTR_NULL(map_get(&m, 1));
    CU_ASSERT_EQUAL(m.len, 4);
    map_free(&m);
    CU_ASSERT_EQUAL(m.len, 0);
    CU_ASSERT_EQUAL(m.cap, 0);
    CU_ASSERT_PTR_NULL(map_get(&m, -1));
    map_free(&m);   /* twice is fine */
}

static void test_grow(void)
{
    struct map m;
    size_t last_cap = 0, grows = 0, bad = 0;

    memset(&stats, 0, sizeof(stats));
    map_init(&m);
    for (size_t i = 0; i < NKEYS; i++) {
        /* sequential ids, the common case */
        if (map_put(&m, (int64_t)i, val_of(i, 0)) != CHAT_OK)
            bad++;
        check_shape(&m);
        if (m.cap != last_cap) {
            grows++;
            last_cap = m.cap;
        }
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(m.len, NKEYS);
    CU_ASSERT_EQUAL(stats.cap_not_pow2, 0);
    CU_ASSERT_EQUAL(stats.over_load, 0);
    CU_ASSERT_TRUE(grows >= 10);
    CU_ASSERT_TRUE(m.cap <= 4 * (size_t)NKEYS);   /* grows to fit, not wildly */
    for (size_t i = 0; i < NKEYS; i++)
        bad += map_get(&m, (int64_t)i) != val_of(i, 0);
    bad += map_get(&m, NKEYS) != NULL;
    bad += map_get(&m, -1) != NULL;
    CU_ASSERT_EQUAL(bad, 0);
    map_free(&m);
}

static void test_random_ops_against_reference(void)
{
    static void *ref[NKEYS];
    struct map m;
    size_t live = 0, bad = 0;

    memset(ref, 0, sizeof(ref));
    memset(&stats, 0, sizeof(stats));
    map_init(&m);
    for (unsigned op = 0; op < 600000; op++) {
        size_t i = (size_t)(rnd64() % NKEYS);
        unsigned r = (unsigned)(rnd64() % 10);

        if (r < 5) {                       /* put / replace */
            void *v = val_of(i, op);
            if (map_put(&m, key_of(i), v) != CHAT_OK)
                bad++;
            live += ref[i] == NULL;
            ref[i] = v;
        } else if (r < 8) {                /* delete */
            if (map_del(&m, key_of(i)) != ref[i])
                bad++;
            live -= ref[i] != NULL;
            ref[i] = NULL;
        } else {                           /* get */
            if (map_get(&m, key_of(i)) != ref[i])
                bad++;
        }
        if (m.len != live)
            bad++;
        check_shape(&m);
    }
    /* full comparison, including keys never inserted */
    for (size_t i = 0; i < NKEYS; i++)
        bad += map_get(&m, key_of(i)) != ref[i];
    for (size_t i = NKEYS; i < 2 * NKEYS; i++)
        bad += map_get(&m, key_of(i)) != NULL;
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(stats.cap_not_pow2, 0);
    CU_ASSERT_EQUAL(stats.over_load, 0);
    CU_ASSERT_TRUE(live > NKEYS / 4);
    /* delete everything */
    for (size_t i = 0; i < NKEYS; i++)
        bad += map_del(&m, key_of(i)) != ref[i];
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(m.len, 0);
    map_free(&m);
}

/* Keys differing only in high or only in low bits. */
static void test_bit_patterns(void)
{
    struct map m;
    size_t bad = 0, n = 0;

    map_init(&m);
    for (int s = 0; s < 63; s++) {
        for (int64_t j = 1; j < 200; j++) {
            int64_t k = (int64_t)((uint64_t)j << s);
            if (map_get(&m, k) == NULL) {
                bad += map_put(&m, k, val_of((size_t)j, (unsigned)s)) != CHAT_OK;
                n++;
            }
        }
    }
    CU_ASSERT_EQUAL(m.len, n);
    for (int s = 0; s < 63; s++)
        for (int64_t j = 1; j < 200; j++)
            bad += map_get(&m, (int64_t)((uint64_t)j << s)) == NULL;
    CU_ASSERT_EQUAL(bad, 0);
    map_free(&m);
}

/* Iterate; count how often each key number was returned.  del: 0 none,
 * 1 the entry just returned, 2 also an entry returned earlier. */
static void iterate_count(struct map *m, unsigned char *seen, size_t nkeys,
                          int del, size_t *foreign)
{
    int64_t k, prev_k = 0;
    void *v;
    int have_prev = 0;
    size_t n = 0;

    for (size_t it = 0; map_next(m, &it, &k, &v);) {
        size_t i = (size_t)((uintptr_t)v >> 8);
        if (i >= nkeys || key_of(i) != k)
            (*foreign)++;
        else if (seen[i] < 255)
            seen[i]++;
        if (del == 1 || (del == 2 && n % 3 == 0)) {
            if (map_del(m, k) != v)
                (*foreign)++;
        }
        if (del == 2 && have_prev && n % 3 == 2) {
            if (map_del(m, prev_k) == NULL)   /* returned earlier, still there */
                (*foreign)++;
        }
        prev_k = k;
        have_prev = 1;
        n++;
    }
}

static void test_iterate(void)
{
    static unsigned char seen[NKEYS];
    struct map m;
    size_t foreign = 0, not_once;

    for (int del = 0; del <= 2; del++) {
        map_init(&m);
        for (size_t i = 0; i < NKEYS; i++)
            CU_ASSERT_EQUAL_FATAL(map_put(&m, key_of(i), val_of(i, 0)), CHAT_OK);
        memset(seen, 0, sizeof(seen));
        iterate_count(&m, seen, NKEYS, del, &foreign);
        not_once = 0;
        for (size_t i = 0; i < NKEYS; i++)
            not_once += seen[i] != 1;
        CU_ASSERT_EQUAL(not_once, 0);
        CU_ASSERT_EQUAL(foreign, 0);
        if (del == 0)
            CU_ASSERT_EQUAL(m.len, NKEYS);
        if (del == 1)
            CU_ASSERT_EQUAL(m.len, 0);
        /* what is left is still found */
        not_once = 0;
        for (size_t i = 0; i < NKEYS; i++) {
            void *v = map_get(&m, key_of(i));
            not_once += v != NULL && v != val_of(i, 0);
        }
        CU_ASSERT_EQUAL(not_once, 0);
        map_free(&m);
    }
    /* empty maps, never allocated and emptied */
    {
        size_t it = 0;
        int64_t k;
        void *v;
        map_init(&m);
        CU_ASSERT_FALSE(map_next(&m, &it, &k, &v));
        map_put(&m, 5, &m);
        map_del(&m, 5);
        it = 0;
        CU_ASSERT_FALSE(map_next(&m, &it, &k, &v));
        CU_ASSERT_FALSE(map_next(&m, &it, &k, &v));  /* stays finished */
        map_free(&m);
    }
}

/* Small maps with clusters wrapping around the end of the table, deleting
 * during iteration: checked exhaustively over many random fillings. */
static void test_iterate_small_wrapping(void)
{
    static unsigned char seen[64];
    size_t bad = 0, foreign = 0;

    for (int round = 0; round < 20000; round++) {
        struct map m;
        size_t n = 1 + (size_t)(rnd64() % 11);   /* cap 16, up to 11 entries */
        size_t idx[64], cnt = 0;

        map_init(&m);
        for (size_t j = 0; j < n; j++) {
            size_t i = (size_t)(rnd64() % 64);
            if (map_get(&m, key_of(i)) == NULL) {
                map_put(&m, key_of(i), val_of(i, 0));
                idx[cnt++] = i;
            }
        }
        memset(seen, 0, sizeof(seen));
        iterate_count(&m, seen, 64, 1 + round % 2, &foreign);
        for (size_t j = 0; j < cnt; j++)
            bad += seen[idx[j]] != 1;
        map_free(&m);
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(foreign, 0);
}

int main(void)
{
    CU_pSuite s;
    unsigned failed;

    if (CU_initialize_registry() != CUE_SUCCESS)
        return 2;
    s = CU_add_suite("map", NULL, NULL);
    CU_add_test(s, "put/get/del/replace, NULL refused", test_basic);
    CU_add_test(s, "grow to 100k sequential keys", test_grow);
    CU_add_test(s, "100k keys, random ops vs reference", test_random_ops_against_reference);
    CU_add_test(s, "keys differing in high/low bits", test_bit_patterns);
    CU_add_test(s, "iterate, with deletion of returned entries", test_iterate);
    CU_add_test(s, "iterate small wrapping tables", test_iterate_small_wrapping);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failed = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failed ? 1 : 0;
}
