/*
 * gmarks.h - aggregated group receipts (gmarks.c), private to the store
 * plugin.  gm_start: in init (CHAT_ERR_NOMEM); gm_conf: read
 * group_marks_delay_ms (init and reconfigure); gm_note: a member's marks
 * of group gid were stored (after COMMIT); gm_broadcast: a "G ..."
 * broadcast of this plugin from any node; gm_fini: free what is left.
 */
#ifndef CHAT_STORE_GMARKS_H
#define CHAT_STORE_GMARKS_H

#include <stddef.h>
#include <stdint.h>

#include "chat/plugin.h"

int gm_start(const struct chat_host *h, struct chat_plugin *p);
void gm_conf(void);
void gm_note(int64_t gid, int64_t uid, int64_t dl, int64_t rd);
void gm_broadcast(const char *data, size_t len);
void gm_fini(void);

#endif
