/*
 * group.c - the group plugin: CREATE_GROUP_MSG (8), ADD_GROUP_MSG (9),
 * GROUP_CHAT_MSG (10), GROUP_LIST (14, protocol 2) and the "groups" part of
 * the login ack.  This file holds the instance (host, self, settings), its
 * registration, the cluster-wide cache invalidation hook and the helpers the
 * other files share.
 *
 * Membership changes are checked by the database in one statement each (see
 * group_admin.c), so two nodes cannot race past a limit.  Group chat, the hot
 * path, never touches the database once a group's member ids are cached
 * (group_chat.c); whoever changes a membership invalidates that cache on
 * every node through host->broadcast(), and a TTL bounds how long any entry
 * lives should a broadcast be lost (Redis down).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "group.h"

struct grp_globals grp;

/* ------------------------------------------------------------------------ */
/* Helpers shared by the plugin's files. */

int grp_get_id(const cJSON *obj, const char *key, int64_t *out)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    double d;

    if (!cJSON_IsNumber(it))
        return 0;
    d = it->valuedouble;
    if (!(d >= 1.0 && d <= 9007199254740991.0) || d != (double)(int64_t)d)
        return 0;
    *out = (int64_t)d;
    return 1;
}

void grp_answer(struct chat_session *s, const struct chat_ack *ack, int64_t uid,
                int err, const char *why, const cJSON *body)
{
    if (grp.host->session_proto(s) == CHAT_PROTO_2) {
        grp.host->reply(s, ack, err, err ? why : NULL, body);
        return;
    }
    if (err)
        chat_log(grp.host, grp.self, CHAT_LOG_INFO, "user %lld: msgid %d refused: %s",
                 (long long)uid, ack->msgid, why);
}

int grp_db_proto_errno(int err, const char **why)
{
    if (err == CHAT_ERR_BUSY || err == CHAT_ERR_UNAVAILABLE) {
        *why = "database unavailable, try again";
        return CHAT_E_UNAVAILABLE;
    }
    *why = err == CHAT_ERR_NOMEM ? "out of memory" : "database error";
    return CHAT_E_INTERNAL;
}

uint64_t grp_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void grp_sb_init(struct grp_sb *b, char *stack, size_t cap)
{
    b->p = stack;
    b->len = 0;
    b->cap = cap;
    b->err = 0;
    b->heap = 0;
}

void grp_sb_release(struct grp_sb *b)
{
    if (b->heap)
        grp.host->free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
    b->heap = 0;
}

void grp_sb_add(struct grp_sb *b, const char *s, size_t n)
{
    if (b->err)
        return;
    if (b->len + n + 1 > b->cap) { /* +1: kept NUL-terminated */
        size_t ncap = b->cap ? b->cap * 2 : 256;
        char *np;

        while (ncap < b->len + n + 1)
            ncap *= 2;
        np = b->heap ? grp.host->realloc(b->p, ncap) : grp.host->malloc(ncap);
        if (!np) {
            b->err = 1;
            return;
        }
        if (!b->heap && b->len)
            memcpy(np, b->p, b->len);
        b->p = np;
        b->cap = ncap;
        b->heap = 1;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void grp_sb_str(struct grp_sb *b, const char *s)
{
    grp_sb_add(b, s, strlen(s));
}

void grp_sb_int(struct grp_sb *b, int64_t v)
{
    char num[24];
    int n = snprintf(num, sizeof(num), "%lld", (long long)v);

    grp_sb_add(b, num, (size_t)n);
}

void grp_sb_quoted(struct grp_sb *b, const char *s, size_t n)
{
    size_t i, qlen;
    char *q;

    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];

        if (c < 0x20 || c == '"' || c == '\\')
            break;
    }
    if (i == n) {
        grp_sb_add(b, "\"", 1);
        grp_sb_add(b, s, n);
        grp_sb_add(b, "\"", 1);
        return;
    }
    if (!(q = grp.host->json_quote(s, n, &qlen))) {
        b->err = 1;
        return;
    }
    grp_sb_add(b, q, qlen);
    grp.host->free(q);
}

/* ---- int64 -> pointer map: linear probing, backward-shift deletion ---- */

static size_t map_hash(int64_t k, size_t mask)
{
    uint64_t h = (uint64_t)k * 0x9E3779B97F4A7C15ull;

    return (size_t)(h ^ (h >> 29)) & mask;
}

void *grp_map_get(const struct grp_map *m, int64_t k)
{
    size_t mask, i;

    if (!m->cap)
        return NULL;
    mask = m->cap - 1;
    for (i = map_hash(k, mask); m->keys[i]; i = (i + 1) & mask)
        if (m->keys[i] == k)
            return m->vals[i];
    return NULL;
}

static int map_grow(struct grp_map *m)
{
    size_t ncap = m->cap ? m->cap * 2 : 64, i, j, mask = ncap - 1;
    int64_t *nk = grp.host->malloc(ncap * sizeof(*nk));
    void **nv = grp.host->malloc(ncap * sizeof(*nv));

    if (!nk || !nv) {
        grp.host->free(nk);
        grp.host->free(nv);
        return CHAT_ERR_NOMEM;
    }
    memset(nk, 0, ncap * sizeof(*nk));
    for (i = 0; i < m->cap; i++) {
        if (!m->keys[i])
            continue;
        for (j = map_hash(m->keys[i], mask); nk[j]; j = (j + 1) & mask)
            ;
        nk[j] = m->keys[i];
        nv[j] = m->vals[i];
    }
    grp.host->free(m->keys);
    grp.host->free(m->vals);
    m->keys = nk;
    m->vals = nv;
    m->cap = ncap;
    return CHAT_OK;
}

int grp_map_put(struct grp_map *m, int64_t k, void *val)
{
    size_t mask, i;

    if ((m->len + 1) * 2 > m->cap && map_grow(m) != CHAT_OK)
        return CHAT_ERR_NOMEM;
    mask = m->cap - 1;
    for (i = map_hash(k, mask); m->keys[i]; i = (i + 1) & mask)
        if (m->keys[i] == k) {
            m->vals[i] = val;
            return CHAT_OK;
        }
    m->keys[i] = k;
    m->vals[i] = val;
    m->len++;
    return CHAT_OK;
}

void grp_map_del(struct grp_map *m, int64_t k)
{
    size_t mask, i, j, h;

    if (!m->cap)
        return;
    mask = m->cap - 1;
    for (i = map_hash(k, mask); m->keys[i] != k; i = (i + 1) & mask)
        if (!m->keys[i])
            return;
    for (j = (i + 1) & mask; m->keys[j]; j = (j + 1) & mask) {
        h = map_hash(m->keys[j], mask);
        /* entry j stays when its home slot lies cyclically in (i, j] */
        if (i <= j ? (i < h && h <= j) : (i < h || h <= j))
            continue;
        m->keys[i] = m->keys[j];
        m->vals[i] = m->vals[j];
        i = j;
    }
    m->keys[i] = 0;
    m->vals[i] = NULL;
    m->len--;
}

void grp_map_free(struct grp_map *m)
{
    grp.host->free(m->keys);
    grp.host->free(m->vals);
    memset(m, 0, sizeof(*m));
}

/* ------------------------------------------------------------------------ */
/* Cluster-wide invalidation: the payload is "inv <group id>". */

static void on_broadcast(int event, const void *arg, void *ud)
{
    const struct chat_ev_broadcast *ev = arg;
    char buf[32];
    long long gid;

    (void)event;
    (void)ud;
    if (ev->len < 5 || ev->len >= sizeof(buf) || memcmp(ev->data, "inv ", 4))
        return;
    memcpy(buf, ev->data, ev->len);
    buf[ev->len] = '\0';
    gid = strtoll(buf + 4, NULL, 10);
    if (gid > 0)
        grp_cache_invalidate(gid);
}

void grp_membership_changed(int64_t gid)
{
    char buf[32];
    int n = snprintf(buf, sizeof(buf), "inv %lld", (long long)gid);

    grp_cache_invalidate(gid); /* here at once: the member's next message */
    if (grp.host->broadcast(grp.self, buf, (size_t)n) != CHAT_OK)
        chat_log(grp.host, grp.self, CHAT_LOG_WARN,
                 "group %lld: invalidation not broadcast; other nodes rely on "
                 "the cache TTL", (long long)gid);
}

/* ------------------------------------------------------------------------ */

/* Setting key in 1..max, else def (logged). */
static size_t conf_size(const char *key, int64_t def, int64_t max)
{
    int64_t v = grp.host->conf_int(grp.self, key, def);

    if (v <= 0 || v > max) {
        chat_log(grp.host, grp.self, CHAT_LOG_WARN, "%s = %lld is not in 1..%lld: "
                 "using %lld", key, (long long)v, (long long)max, (long long)def);
        v = def;
    }
    return (size_t)v;
}

static void read_conf(void)
{
    /* the columns are VARBINARY(255) and VARBINARY(1024) */
    grp.name_max = conf_size("name_max", 64, 255);
    grp.desc_max = conf_size("desc_max", 512, 1024);
    grp.msg_max = conf_size("msg_max", 4096, INT32_MAX);
    grp.size_max = conf_size("group_size_max", 500, INT32_MAX);
    grp.per_user_max = conf_size("groups_per_user_max", 200, INT32_MAX);
    grp.cache_ttl_ms = (uint64_t)conf_size("cache_ttl", 60, 86400) * 1000u;
}

static int group_init(const struct chat_host *h, struct chat_plugin *p, void **state)
{
    int rc;

    memset(&grp, 0, sizeof(grp));
    grp.host = h;
    grp.self = p;
    *state = NULL;
    if (h->abi_major != CHAT_ABI_MAJOR || !CHAT_HOST_HAS(h, login_proto))
        return CHAT_ERR_ABI;
    read_conf();
    if ((rc = h->register_handler(p, CHAT_MSG_CREATE_GROUP, grp_on_create, NULL)) ||
        (rc = h->register_handler(p, CHAT_MSG_ADD_GROUP, grp_on_join, NULL)) ||
        (rc = h->register_handler(p, CHAT_MSG_GROUP_CHAT, grp_on_chat, NULL)) ||
        (rc = h->register_handler(p, CHAT_MSG_GROUP_LIST, grp_on_list, NULL)) ||
        (rc = h->register_hook(p, CHAT_EV_BROADCAST, on_broadcast, NULL)) ||
        (rc = h->register_login_part(p, "groups", grp_groups_part, NULL, NULL)) ||
        (rc = grp_cache_start()))
        return rc;
    return CHAT_OK;
}

static void group_fini(void *state)
{
    (void)state;
    grp_cache_fini();
}

static int group_reconfigure(void *state)
{
    (void)state;
    read_conf();
    return CHAT_OK;
}

/* Reload: the new instance starts with the old one's fresh member lists. */
static int group_save(void *state, void **blob, size_t *len)
{
    (void)state;
    return grp_cache_save(blob, len);
}

static int group_restore(void *state, const void *blob, size_t len)
{
    (void)state;
    return grp_cache_restore(blob, len);
}

static const struct chat_plugin_desc group_desc = {
    CHAT_PLUGIN_DESC_INIT("group", "1.0.0"),
    .init = group_init,
    .fini = group_fini,
    .save = group_save,
    .restore = group_restore,
    .reconfigure = group_reconfigure,
};

CHAT_PLUGIN_DECLARE(group_desc)
