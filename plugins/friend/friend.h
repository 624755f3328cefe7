/*
 * friend.h - what the files of the friend plugin share.  Private to the
 * plugin (hidden visibility): only chat_plugin_entry is exported.
 *
 *   friend.c    ADD_FRIEND (7), FRIEND_LIST (13), the "friends" login part
 *   presence.c  PRESENCE (19): friends told live of logins and logouts
 */
#ifndef CHAT_FRIEND_PLUGIN_H
#define CHAT_FRIEND_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#include "chat/plugin.h"

#define FR_MSG_PRESENCE 19 /* protocol 2, server to client */

/* presence.c.  start: in init, after host and self are known (NOMEM);
 * conf: read its settings (init and reconfigure); hook: the LOGIN, LOGOUT
 * and SESSION_CLOSE hooks; broadcast: a "P ..." broadcast of this plugin;
 * fini: free what it holds. */
int fr_presence_start(const struct chat_host *h, struct chat_plugin *p);
void fr_presence_conf(int is_mutual);
void fr_presence_hook(int event, const struct chat_ev_session *ev);
void fr_presence_broadcast(const char *data, size_t len);
/* watch: ADD_FRIEND gave uid a watcher (tell the nodes holding uid);
 * rewatch: a "W <uid>" broadcast of this plugin. */
void fr_presence_watch(int64_t uid);
void fr_presence_rewatch(const char *data, size_t len);
void fr_presence_fini(void);

#endif
