/*
 * group.h - what the files of the group plugin share.  Private to the
 * plugin (hidden visibility): only chat_plugin_entry is exported.
 *
 *   group.c        init/fini/config, the broadcast hook, shared helpers
 *   group_admin.c  CREATE_GROUP_MSG (8), ADD_GROUP_MSG (9)
 *   group_chat.c   GROUP_CHAT_MSG (10) and the member cache
 *   group_list.c   the "groups" login part and GROUP_LIST (14)
 *   group_lcache.c the per-user group-list cache behind them
 */
#ifndef CHAT_GROUP_PLUGIN_H
#define CHAT_GROUP_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#include "chat/plugin.h"

/* The instance's host, self and settings (one copy per loaded instance). */
struct grp_globals {
    const struct chat_host *host;
    struct chat_plugin *self;
    size_t name_max;        /* bytes of a group name */
    size_t desc_max;        /* bytes of a description */
    size_t msg_max;         /* bytes of a group chat message */
    size_t extra_max;       /* bytes of a forwarded message besides its msg */
    size_t queue_max;       /* bytes of messages waiting for member loads */
    size_t queue_sender_max;/* of those, from one sender */
    size_t size_max;        /* members of a group */
    size_t per_user_max;    /* groups a user may belong to */
    uint64_t cache_ttl_ms;  /* member cache entries are reloaded after this */
    uint64_t list_ttl_ms;   /* list cache entries are trusted this long; 0: off */
    size_t list_max;        /* users whose lists the list cache holds */
    int join_invite;        /* join = invite: only a member adds a user */
    int durable_all;        /* durable = all: protocol 2 stored, cid or not */
};
extern struct grp_globals grp;

/* ---- group.c: helpers --------------------------------------------------- */
/* Protocol 2: the reply (body borrowed, may be NULL); legacy: a log line
 * for a failure (the seed never answers group requests). */
void grp_answer(struct chat_session *s, const struct chat_ack *ack, int64_t uid,
                int err, const char *why, const cJSON *body);
/* Protocol errno for a failed host/db call (CHAT_ERR_*), with its text. */
int grp_db_proto_errno(int err, const char **why);
uint64_t grp_now_ms(void);

/* A growing NUL-terminated string on the heap, for the lists: starts all
 * zero (empty), released with grp_sb_release.  On allocation failure err is
 * set and appends stop. */
struct grp_sb {
    char *p;
    size_t len, cap;
    int err;
};
void grp_sb_release(struct grp_sb *b);
void grp_sb_add(struct grp_sb *b, const char *s, size_t n);
void grp_sb_str(struct grp_sb *b, const char *s);
void grp_sb_int(struct grp_sb *b, int64_t v);

/* ---- group_admin.c ----------------------------------------------------- */
void grp_on_create(struct chat_session *s, const struct chat_request *req, void *ud);
void grp_on_join(struct chat_session *s, const struct chat_request *req, void *ud);

/* ---- group_chat.c ------------------------------------------------------ */
void grp_on_chat(struct chat_session *s, const struct chat_request *req, void *ud);
/* Drop (or mark stale while loading) the cached members of gid. */
void grp_cache_invalidate(int64_t gid);
/* Membership of gid changed here (uid joined or created it, after the
 * commit): invalidate the member cache of gid and the cached lists of gid's
 * members and of uid, here at once and on every node (host->broadcast). */
void grp_membership_changed(int64_t gid, int64_t uid);
int grp_cache_start(void);  /* the cache, its sweep timer and the durable writer */
/* Read the durable_* settings (and apply them to the running writer). */
void grp_durable_conf(void);
void grp_cache_fini(void);
/* Reload: the fresh entries as a blob (host->malloc) / back into the cache. */
int grp_cache_save(void **blob, size_t *len);
int grp_cache_restore(const void *blob, size_t len);

/* ---- group_list.c ------------------------------------------------------ */
/* A user's list as read: the groups (in join order) with all their members.
 * Immutable once built and shared by reference (loop thread only): the
 * cache holds one reference, each request being answered from it another. */
struct grp_lrow {
    int64_t uid;
    size_t name;        /* offset in text of a NUL-terminated JSON literal */
    int creator;
};
struct grp_lgroup {
    int64_t gid;
    size_t name, desc;  /* offsets in text, as in grp_lrow */
    size_t first, n;    /* its members: rows[first .. first + n) */
};
struct grp_ldata {
    unsigned refs;
    size_t nrows, ngroups, nuids;
    struct grp_lrow *rows;
    struct grp_lgroup *groups;
    int64_t *uids;      /* distinct members, sorted (for presence) */
    char *text;         /* the JSON literals */
};
void grp_ldata_unref(struct grp_ldata *d);

void grp_groups_part(struct chat_login *l, int64_t uid, int proto, void *ud);
void grp_on_list(struct chat_session *s, const struct chat_request *req, void *ud);
int grp_list_start(void);   /* the list cache and the map of loads in flight */
void grp_list_fini(void);

/* ---- group_lcache.c: user id -> struct grp_ldata, see the file ---------- */
int grp_lcache_start(void);
void grp_lcache_fini(void);
/* uid's cached list if fresh (borrowed: take a reference to keep it), else
 * NULL; always NULL when the cache is off (list_cache_ttl = 0). */
struct grp_ldata *grp_lcache_get(int64_t uid);
/* The generation: grows with every invalidation.  A load notes it before
 * its SELECT and hands it to grp_lcache_put, which stores nothing when an
 * invalidation came in between. */
uint64_t grp_lcache_gen(void);
void grp_lcache_put(int64_t uid, struct grp_ldata *d, uint64_t gen);
/* Drop every cached list that holds group gid, and uid's own (0: none). */
void grp_lcache_invalidate(int64_t gid, int64_t uid);
void grp_lcache_sweep(void);        /* free the expired entries */
void grp_lcache_reconfigure(void);  /* apply list_cache_ttl/_max now */

#endif
