/*
 * map.c - int64 -> pointer hash map for the hot paths (user id -> session,
 * session id -> session, msgid -> handler).
 *
 * Design: open addressing in one flat array of {key, value} slots, linear
 * probing, a power-of-two capacity grown (doubled) before the load passes
 * 70%.  A NULL value marks an empty slot, which is why NULL values cannot be
 * stored.  Keys are spread with a multiplicative (Fibonacci) hash because
 * ids are often sequential.  Deletion shifts the following entries of the
 * cluster back instead of leaving tombstones, so lookups never slow down
 * after churn and the struct needs no tombstone count.
 *
 * Iteration walks the slots downwards, starting just below an empty slot, so
 * that the backward shift of a deletion can only move entries the iteration
 * has already returned: deleting entries already returned (in particular
 * the one just returned) during an iteration is allowed and every other
 * entry is still returned exactly once.  Inserting, or deleting entries not
 * yet returned, during an iteration may make it miss or repeat entries.
 * The iterator packs the start slot and a step count into one size_t, which
 * caps the capacity at 2^31 slots (32 GiB of table).
 */
#include <stdint.h>

#include "core.h"

struct map_slot {
    int64_t key;
    void *val;      /* NULL: empty */
};

#define MAP_MIN_CAP 16
#define MAP_MAX_CAP ((size_t)1 << 31)
#define MAP_IT_SHIFT 32

_Static_assert(sizeof(size_t) >= 8, "map_next packs two 32-bit numbers");

static size_t map_home(const struct map *m, int64_t key)
{
    uint64_t h = (uint64_t)key * UINT64_C(0x9E3779B97F4A7C15);

    /* the top bits are the well-mixed ones; cap is 2^k with k >= 4 */
    return (size_t)(h >> (64 - __builtin_ctzll((unsigned long long)m->cap)));
}

void map_init(struct map *m)
{
    m->slots = NULL;
    m->cap = 0;
    m->len = 0;
}

void map_free(struct map *m)
{
    mem_free(m->slots);
    map_init(m);
}

/* The slot holding key, or the empty slot where it would go. */
static struct map_slot *map_find(const struct map *m, int64_t key)
{
    size_t mask = m->cap - 1, i = map_home(m, key);

    for (;;) {
        struct map_slot *s = &m->slots[i];
        if (s->val == NULL || s->key == key)
            return s;
        i = (i + 1) & mask;
    }
}

void *map_get(const struct map *m, int64_t key)
{
    if (m->len == 0)
        return NULL;
    return map_find(m, key)->val;
}

static int map_grow(struct map *m)
{
    struct map old = *m;
    size_t cap = m->cap ? m->cap * 2 : MAP_MIN_CAP;

    if (cap > MAP_MAX_CAP)
        return CHAT_ERR_NOMEM;
    m->slots = mem_calloc(cap, sizeof(*m->slots));
    if (m->slots == NULL) {
        *m = old;
        return CHAT_ERR_NOMEM;
    }
    m->cap = cap;
    for (size_t i = 0; i < old.cap; i++) {
        if (old.slots[i].val != NULL)
            *map_find(m, old.slots[i].key) = old.slots[i];
    }
    mem_free(old.slots);
    return CHAT_OK;
}

int map_put(struct map *m, int64_t key, void *val)
{
    struct map_slot *s;

    if (val == NULL)
        return CHAT_ERR_INVAL;
    if (m->cap != 0) {
        s = map_find(m, key);
        if (s->val != NULL) {
            s->val = val;
            return CHAT_OK;
        }
    }
    /* keep len + 1 <= 0.7 cap */
    if ((m->len + 1) * 10 > m->cap * 7) {
        int rc = map_grow(m);
        if (rc != CHAT_OK)
            return rc;
    }
    s = map_find(m, key);
    s->key = key;
    s->val = val;
    m->len++;
    return CHAT_OK;
}

void *map_del(struct map *m, int64_t key)
{
    struct map_slot *s;
    size_t mask, hole, i;
    void *old;

    if (m->len == 0)
        return NULL;
    s = map_find(m, key);
    if (s->val == NULL)
        return NULL;
    old = s->val;
    mask = m->cap - 1;
    hole = (size_t)(s - m->slots);
    /* Backward shift: move each following entry of the cluster into the
     * hole unless its home lies cyclically in (hole, i]. */
    for (i = (hole + 1) & mask; m->slots[i].val != NULL; i = (i + 1) & mask) {
        size_t home = map_home(m, m->slots[i].key);
        if (((i - home) & mask) >= ((i - hole) & mask)) {
            m->slots[hole] = m->slots[i];
            hole = i;
        }
    }
    m->slots[hole].val = NULL;
    m->len--;
    return old;
}

int map_next(const struct map *m, size_t *it, int64_t *key, void **val)
{
    size_t mask = m->cap - 1, start, step;

    if (m->cap == 0)
        return 0;
    if (*it == 0) {
        /* Start just below an empty slot (there is one: load <= 70%). */
        for (start = 0; m->slots[start].val != NULL; start++)
            ;
        step = 0;
    } else {
        start = *it >> MAP_IT_SHIFT;
        step = *it & (((size_t)1 << MAP_IT_SHIFT) - 1);
    }
    /* step counts the slots done, in the order start-1, start-2, ... */
    while (step < m->cap) {
        struct map_slot *s = &m->slots[(start - 1 - step) & mask];
        step++;
        if (s->val != NULL) {
            *it = (start << MAP_IT_SHIFT) | step;
            if (key != NULL)
                *key = s->key;
            if (val != NULL)
                *val = s->val;
            return 1;
        }
    }
    *it = (start << MAP_IT_SHIFT) | step;
    return 0;
}
