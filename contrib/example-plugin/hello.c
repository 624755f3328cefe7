/*
 * hello.c - a complete chatd plugin, built out of tree.
 *
 * It answers msgid 500 with a greeting taken from its config section
 * [plugin.hello] and counts the logins it has seen.  Build it against the
 * installed header:
 *
 *   cc -shared $(pkg-config --cflags chatd-plugin) -o hello.so hello.c \
 *      $(pkg-config --libs libcjson)
 *
 * then put hello.so in chatd's plugin folder, add "hello" to [plugins]
 * enabled and send chatd SIGHUP.
 */
#include <chat/plugin.h>

static const struct chat_host *host; /* valid from init to fini */
static struct chat_plugin *self;
static long logins;

/* {"msgid":500} -> {"msgid":501,"greeting":"...","logins":N} */
static void on_hello(struct chat_session *s, const struct chat_request *req, void *ud)
{
    cJSON *o = cJSON_CreateObject(); /* ours: freed below */
    (void)req;
    (void)ud;
    cJSON_AddNumberToObject(o, "msgid", 501);
    cJSON_AddStringToObject(o, "greeting", host->conf_get(self, "greeting", "hello"));
    cJSON_AddNumberToObject(o, "logins", (double)logins);
    host->send_json(s, o); /* the host copies what it sends */
    cJSON_Delete(o);
}

static void on_login(int event, const void *arg, void *ud)
{
    const struct chat_ev_session *ev = arg; /* borrowed for this call */
    (void)event;
    (void)ud;
    logins++;
    chat_log(host, self, CHAT_LOG_DEBUG, "user %lld logged in", (long long)ev->user_id);
}

static int init(const struct chat_host *h, struct chat_plugin *me, void **state)
{
    int rc;
    host = h;
    self = me;
    *state = NULL;
    if ((rc = h->register_handler(me, 500, on_hello, NULL)) != CHAT_OK)
        return rc; /* e.g. another plugin owns msgid 500: refuse the load */
    return h->register_hook(me, CHAT_EV_LOGIN, on_login, NULL);
}

static void fini(void *state)
{
    (void)state;
    chat_log(host, self, CHAT_LOG_INFO, "hello: %ld logins seen", logins);
}

static const struct chat_plugin_desc desc = {
    CHAT_PLUGIN_DESC_INIT("hello", "1.0.0"),
    .init = init,
    .fini = fini,
};

CHAT_PLUGIN_DECLARE(desc)
