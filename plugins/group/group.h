/*
 * group.h - what the files of the group plugin share.  Private to the
 * plugin (hidden visibility): only chat_plugin_entry is exported.
 *
 *   group.c        init/fini/config, the broadcast hook, shared helpers
 *   group_admin.c  CREATE_GROUP_MSG (8), ADD_GROUP_MSG (9)
 *   group_chat.c   GROUP_CHAT_MSG (10) and the member cache
 *   group_list.c   the "groups" login part and GROUP_LIST (14)
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
    size_t size_max;        /* members of a group */
    size_t per_user_max;    /* groups a user may belong to */
    uint64_t cache_ttl_ms;  /* member cache entries are reloaded after this */
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
/* Membership of gid changed here: invalidate it on every node. */
void grp_membership_changed(int64_t gid);
int grp_cache_start(void);  /* the cache and its sweep timer */
void grp_cache_fini(void);
/* Reload: the fresh entries as a blob (host->malloc) / back into the cache. */
int grp_cache_save(void **blob, size_t *len);
int grp_cache_restore(const void *blob, size_t len);

/* ---- group_list.c ------------------------------------------------------ */
void grp_groups_part(struct chat_login *l, int64_t uid, int proto, void *ud);
void grp_on_list(struct chat_session *s, const struct chat_request *req, void *ud);

#endif
