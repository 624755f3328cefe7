/*
 * group_lcache.c - the per-user group-list cache: user id -> that user's
 * list as read (struct grp_ldata, group_list.c), so that the "groups" part
 * of a login ack and GROUP_LIST cost no SELECT while the list is known.
 * Presence is not cached: group_list.c queries it live for every answer.
 *
 * A user's list changes only when the user creates a group, the user joins
 * a group, or anyone joins a group the user is in (names never change,
 * nobody leaves).  So when group G's membership changes (on this node after
 * the commit, or in a broadcast from another node, see group.c) every
 * cached list that holds G is dropped, plus the joiner's or creator's own
 * (which does not hold G yet).  A reverse index (group id -> the cached
 * entries holding it, each entry knowing its slot in every index it is in)
 * makes that cost the size of the group, not of the cache.
 *
 * A load notes the generation before its SELECT; every invalidation bumps
 * it, so a SELECT that may have read the list from before a change does not
 * store it (it still answers its own requests).  An empty list is cached
 * like any other.
 *
 * Bounds: list_cache_ttl seconds per entry (a safety net for a broadcast
 * lost while Redis is down; 0 turns the cache off), list_cache_max entries:
 * an insert into a full cache first drops the expired entries and, if that
 * frees less than an eighth of it, drops the whole cache (INFO log), so a
 * full cache costs one scan per max/8 inserts at most.  The member cache's
 * sweep timer (group_chat.c) frees expired entries.  Not handed over on a
 * hot reload: the new instance starts empty.
 */
#include <string.h>

#include "group.h"

struct lent {
    int64_t uid;
    uint64_t loaded_ms;
    struct grp_ldata *d; /* one reference */
    size_t *slot;        /* per group of d: its position in that group's index */
};

struct gref {
    struct lent *e;
    size_t gi;           /* which group of e->d */
};

struct gidx {            /* the cached entries whose list holds a group */
    size_t n, cap;
    struct gref *refs;
};

static struct chat_map *entries;  /* user id -> struct lent * */
static struct chat_map *by_group; /* group id -> struct gidx * */
static uint64_t generation;

/* ------------------------------------------------------------------------ */

static void entry_free(struct lent *e)
{
    grp_ldata_unref(e->d);
    grp.host->free(e->slot);
    grp.host->free(e);
}

static void gidx_free(struct gidx *x)
{
    grp.host->free(x->refs);
    grp.host->free(x);
}

/* Take group i of e out of that group's index. */
static void unlink_group(struct lent *e, size_t i)
{
    int64_t gid = e->d->groups[i].gid;
    struct gidx *x = grp.host->map_get(by_group, gid);
    size_t pos = e->slot[i];
    struct gref last;

    if (!x || pos >= x->n || x->refs[pos].e != e) /* cannot happen */
        return;
    last = x->refs[--x->n];
    if (pos != x->n) { /* the last one takes the freed slot */
        x->refs[pos] = last;
        last.e->slot[last.gi] = pos;
    }
    if (!x->n) {
        grp.host->map_del(by_group, gid);
        gidx_free(x);
    }
}

/* Put group i of e into that group's index. */
static int link_group(struct lent *e, size_t i)
{
    int64_t gid = e->d->groups[i].gid;
    struct gidx *x = grp.host->map_get(by_group, gid);

    if (!x) {
        if (!(x = grp.host->malloc(sizeof(*x))))
            return CHAT_ERR_NOMEM;
        memset(x, 0, sizeof(*x));
        if (grp.host->map_put(by_group, gid, x) != CHAT_OK) {
            grp.host->free(x);
            return CHAT_ERR_NOMEM;
        }
    }
    if (x->n == x->cap) {
        size_t ncap = x->cap ? x->cap * 2 : 4;
        struct gref *nr = grp.host->realloc(x->refs, ncap * sizeof(*nr));

        if (!nr) {
            if (!x->n) {
                grp.host->map_del(by_group, gid);
                gidx_free(x);
            }
            return CHAT_ERR_NOMEM;
        }
        x->refs = nr;
        x->cap = ncap;
    }
    x->refs[x->n].e = e;
    x->refs[x->n].gi = i;
    e->slot[i] = x->n++;
    return CHAT_OK;
}

/* Forget e: out of every index and of the cache. */
static void drop(struct lent *e)
{
    size_t i;

    for (i = 0; i < e->d->ngroups; i++)
        unlink_group(e, i);
    grp.host->map_del(entries, e->uid);
    entry_free(e);
}

static void drop_all(void)
{
    size_t it;
    int64_t k;
    void *v;

    if (!entries)
        return;
    for (it = 0; grp.host->map_next(entries, &it, &k, &v);) {
        grp.host->map_del(entries, k); /* the entry just returned: allowed */
        entry_free(v);
    }
    for (it = 0; grp.host->map_next(by_group, &it, &k, &v);) {
        grp.host->map_del(by_group, k);
        gidx_free(v);
    }
}

static int expired(const struct lent *e, uint64_t now)
{
    return now - e->loaded_ms >= grp.list_ttl_ms;
}

/* ------------------------------------------------------------------------ */

void grp_lcache_sweep(void)
{
    uint64_t now = grp_now_ms();
    size_t it;
    int64_t uid;
    void *v;

    if (!entries)
        return;
    if (!grp.list_ttl_ms) {
        drop_all();
        return;
    }
    for (it = 0; grp.host->map_next(entries, &it, &uid, &v);)
        if (expired(v, now))
            drop(v); /* deletes the entry just returned: allowed */
}

/* Make room for an entry in a cache that holds list_max or more. */
static void make_room(void)
{
    size_t before = grp.host->map_len(entries), after;

    grp_lcache_sweep();
    after = grp.host->map_len(entries);
    if (after >= grp.list_max || before - after < grp.list_max / 8) {
        chat_log(grp.host, grp.self, CHAT_LOG_INFO,
                 "group list cache full (%zu entries, %zu expired, list_cache_max "
                 "%zu): dropped", before, before - after, grp.list_max);
        drop_all();
    }
}

struct grp_ldata *grp_lcache_get(int64_t uid)
{
    struct lent *e;

    if (!grp.list_ttl_ms || !entries || !(e = grp.host->map_get(entries, uid)))
        return NULL;
    if (!expired(e, grp_now_ms()))
        return e->d;
    drop(e);
    return NULL;
}

uint64_t grp_lcache_gen(void)
{
    return generation;
}

void grp_lcache_put(int64_t uid, struct grp_ldata *d, uint64_t gen)
{
    struct lent *e;
    size_t i;

    if (!grp.list_ttl_ms || !entries || gen != generation)
        return; /* off, or an invalidation came while the SELECT ran */
    if ((e = grp.host->map_get(entries, uid)) != NULL)
        drop(e);
    if (grp.host->map_len(entries) >= grp.list_max)
        make_room();
    if (!(e = grp.host->malloc(sizeof(*e))))
        return;
    e->uid = uid;
    e->loaded_ms = grp_now_ms();
    e->d = d;
    d->refs++;
    e->slot = NULL;
    if ((d->ngroups && !(e->slot = grp.host->malloc(d->ngroups * sizeof(*e->slot)))) ||
        grp.host->map_put(entries, uid, e) != CHAT_OK) {
        entry_free(e);
        return;
    }
    for (i = 0; i < d->ngroups; i++) {
        if (link_group(e, i) != CHAT_OK) { /* out of memory: not cached */
            while (i--)
                unlink_group(e, i);
            grp.host->map_del(entries, uid);
            entry_free(e);
            return;
        }
    }
}

void grp_lcache_invalidate(int64_t gid, int64_t uid)
{
    struct gidx *x;
    struct lent *e;
    size_t n = 0;

    generation++; /* even with nothing cached: a load may be in flight */
    if (!entries)
        return;
    if (gid > 0)
        while ((x = grp.host->map_get(by_group, gid)) != NULL) {
            drop(x->refs[x->n - 1].e); /* frees x with its last reference */
            n++;
        }
    if (uid > 0 && (e = grp.host->map_get(entries, uid)) != NULL) {
        drop(e);
        n++;
    }
    if (n)
        chat_log(grp.host, grp.self, CHAT_LOG_DEBUG,
                 "group %lld, user %lld: %zu cached lists dropped", (long long)gid,
                 (long long)uid, n);
}

void grp_lcache_reconfigure(void)
{
    if (!entries)
        return;
    if (!grp.list_ttl_ms)
        drop_all();
    else if (grp.host->map_len(entries) > grp.list_max)
        make_room();
}

int grp_lcache_start(void)
{
    generation = 0;
    entries = grp.host->map_new();
    by_group = grp.host->map_new();
    if (!entries || !by_group) {
        grp_lcache_fini();
        return CHAT_ERR_NOMEM;
    }
    return CHAT_OK;
}

void grp_lcache_fini(void)
{
    if (entries && by_group)
        drop_all();
    if (entries)
        grp.host->map_free(entries);
    if (by_group)
        grp.host->map_free(by_group);
    entries = by_group = NULL;
}
