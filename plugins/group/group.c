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
 * lives should a broadcast be lost (Redis down).  The same broadcast drops
 * the cached group lists (group_lcache.c) of the group's members and of the
 * user who joined or created it.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "group.h"
#include "../store/dstore.h"

struct grp_globals grp;

/* ------------------------------------------------------------------------ */
/* Helpers shared by the plugin's files. */

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

void grp_sb_release(struct grp_sb *b)
{
    grp.host->free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
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
        if (!(np = grp.host->realloc(b->p, ncap))) {
            b->err = 1;
            return;
        }
        b->p = np;
        b->cap = ncap;
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

/* ------------------------------------------------------------------------ */
/* Cluster-wide invalidation.  The payload is "inv <group id> <user id>":
 * the membership of the group changed because that user joined or created
 * it.  Instances from before the list cache sent (and read) "inv <group
 * id>" only, so the user id is optional here, and receivers of that age
 * read the group id and ignore the rest, provided the text is under 32
 * bytes (their buffer): a longer one is sent in the old form as well. */

#define INV_OLD_MAX 31 /* longest payload an older receiver reads */

static void on_broadcast(int event, const void *arg, void *ud)
{
    const struct chat_ev_broadcast *ev = arg;
    char buf[64], *end;
    long long gid, uid = 0;

    (void)event;
    (void)ud;
    if (ev->len < 5 || ev->len >= sizeof(buf) || memcmp(ev->data, "inv ", 4))
        return;
    memcpy(buf, ev->data, ev->len);
    buf[ev->len] = '\0';
    gid = strtoll(buf + 4, &end, 10);
    if (*end == ' ')
        uid = strtoll(end + 1, NULL, 10);
    if (gid <= 0)
        return;
    grp_cache_invalidate(gid);
    grp_lcache_invalidate(gid, uid > 0 ? uid : 0);
}

void grp_membership_changed(int64_t gid, int64_t uid)
{
    char buf[64];
    int n = snprintf(buf, sizeof(buf), "inv %lld %lld", (long long)gid, (long long)uid);
    int rc = CHAT_OK;

    /* here at once: the member's next message, the user's next list */
    grp_cache_invalidate(gid);
    grp_lcache_invalidate(gid, uid);
    if (n > INV_OLD_MAX) { /* too long for an older receiver: the old form too */
        char old[32];
        int m = snprintf(old, sizeof(old), "inv %lld", (long long)gid);

        rc = grp.host->broadcast(grp.self, old, (size_t)m);
    }
    if (rc == CHAT_OK)
        rc = grp.host->broadcast(grp.self, buf, (size_t)n);
    if (rc != CHAT_OK)
        chat_log(grp.host, grp.self, CHAT_LOG_WARN,
                 "group %lld: invalidation not broadcast (%s); other nodes rely on "
                 "cache_ttl and list_cache_ttl", (long long)gid, grp.host->strerror(rc));
}

/* ------------------------------------------------------------------------ */

/* Setting key in 1..max, else def (logged). */
static size_t conf_size(const char *key, int64_t def, int64_t max)
{
    return (size_t)chat_conf_range(grp.host, grp.self, key, def, 1, max);
}

/* Setting key in 0..max, else def (logged). */
static int64_t conf_range0(const char *key, int64_t def, int64_t max)
{
    return chat_conf_range(grp.host, grp.self, key, def, 0, max);
}

/* join = open | invite; CHAT_OK or CHAT_ERR_INVAL (logged). */
static int read_join(void)
{
    const char *v = grp.host->conf_get(grp.self, "join", "invite");

    if (strcmp(v, "open") != 0 && strcmp(v, "invite") != 0) {
        chat_log(grp.host, grp.self, CHAT_LOG_ERROR, "join = %s: expected open or invite", v);
        return CHAT_ERR_INVAL;
    }
    grp.join_invite = strcmp(v, "invite") == 0;
    chat_log(grp.host, grp.self, CHAT_LOG_INFO, "join=%s", v);
    return CHAT_OK;
}

/* join and durable (all | cid); CHAT_OK, or CHAT_ERR_INVAL (logged)
 * with neither applied. */
static int read_modes(void)
{
    int all = grp.durable_all;
    int rc;

    if ((rc = ds_conf_mode(grp.host, grp.self, &all)) != CHAT_OK ||
        (rc = read_join()) != CHAT_OK)
        return rc;
    grp.durable_all = all;
    return CHAT_OK;
}

static void read_conf(void)
{
    /* the columns are VARBINARY(255) and VARBINARY(1024) */
    grp.name_max = conf_size("name_max", 64, 255);
    grp.desc_max = conf_size("desc_max", 512, 1024);
    grp.msg_max = conf_size("msg_max", 4096, INT32_MAX);
    grp.extra_max = (size_t)chat_conf_range(grp.host, grp.self, "extra_max", 2048,
                                            256, INT32_MAX);
    grp.queue_max = (size_t)chat_conf_range(grp.host, grp.self, "load_queue_max_bytes",
                                            8 << 20, 4096, INT64_MAX);
    grp.queue_sender_max = (size_t)chat_conf_range(grp.host, grp.self,
                                                   "load_queue_sender_max_bytes",
                                                   256 << 10, 1024, INT64_MAX);
    grp.size_max = conf_size("group_size_max", 500, INT32_MAX);
    grp.per_user_max = conf_size("groups_per_user_max", 200, INT32_MAX);
    grp.cache_ttl_ms = (uint64_t)conf_size("cache_ttl", 60, 86400) * 1000u;
    grp.list_ttl_ms = (uint64_t)conf_range0("list_cache_ttl", 60, 86400) * 1000u;
    grp.list_max = conf_size("list_cache_max", 100000, INT32_MAX);
    grp_durable_conf();
}

static int group_init(const struct chat_host *h, struct chat_plugin *p, void **state)
{
    int rc;

    memset(&grp, 0, sizeof(grp));
    grp.host = h;
    grp.self = p;
    *state = NULL;
    CHAT_HOST_REQUIRE(h, p, deliver_ex);
    if ((rc = read_modes()) != CHAT_OK)
        return rc;
    read_conf();
    if ((rc = h->register_handler(p, CHAT_MSG_CREATE_GROUP, grp_on_create, NULL)) ||
        (rc = h->register_handler(p, CHAT_MSG_ADD_GROUP, grp_on_join, NULL)) ||
        (rc = h->register_handler_ex(p, CHAT_MSG_GROUP_CHAT, grp_on_chat, NULL,
                                     CHAT_HANDLER_RAW)) ||
        (rc = h->register_handler(p, CHAT_MSG_GROUP_LIST, grp_on_list, NULL)) ||
        (rc = h->register_hook(p, CHAT_EV_BROADCAST, on_broadcast, NULL)) ||
        (rc = h->register_login_part(p, "groups", grp_groups_part, NULL, NULL)) ||
        (rc = grp_list_start()))
        return rc;
    if ((rc = grp_cache_start()) != CHAT_OK) { /* fini is not called */
        grp_list_fini();
        return rc;
    }
    return CHAT_OK;
}

static void group_fini(void *state)
{
    (void)state;
    grp_cache_fini();
    grp_list_fini();
}

static int group_reconfigure(void *state)
{
    int rc;

    (void)state;
    if ((rc = read_modes()) != CHAT_OK)
        return rc; /* the previous settings stay */
    read_conf();
    grp_lcache_reconfigure();
    return CHAT_OK;
}

/* Reload: the new instance starts with the old one's fresh member lists
 * (its list cache starts empty). */
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
