/*
 * echo.c - the fixture plugin of the loader and network tests.
 *
 * Built several times from this one file (see CMakeLists.txt): the good
 * versions 1 and 2 of plugin "echo", and broken variants that the loader
 * must refuse (bad magic, other ABI major, newer ABI minor, failing init,
 * a msgid another plugin owns, no entry symbol).  Every reply carries the
 * version that produced it, so a test sees which instance answered.
 *
 *   1000 {"n"}            -> {"msgid":1001,"ver":V,"n":n,"count":handled}
 *   1002 {"n","ms"}       -> after ms: {"msgid":1003,"ver":V,"n":n}
 *   1004 {"count","size"} -> count x {"msgid":1005,"i":i,"pad":"..."}
 *   1006 {}               -> protocol-2 reply {"ver":V} through host->reply
 *   1008 {}               -> {"msgid":1009,"greeting":[plugin.echo] greeting}
 *   1010 {"n","sleep"}    -> a database query (SELECT n after SLEEP(sleep));
 *                            its callback answers {"msgid":1011,"ver":V,"n":n}
 * "count" survives a reload through save()/restore().
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat/plugin.h"

#ifndef ECHO_VER
#define ECHO_VER 1
#endif
#ifndef ECHO_NAME
#define ECHO_NAME "echo"
#endif
#ifndef ECHO_MSGID
#define ECHO_MSGID 1000
#endif

#define STR2(x) #x
#define STR(x) STR2(x)

static const struct chat_host *host;
static struct chat_plugin *me;
static long long handled;
static char greeting[64];

struct pending {
    uint64_t sid;
    double n;
};

static void send_obj(struct chat_session *s, cJSON *o)
{
    host->send_json(s, o);
    cJSON_Delete(o);
}

static double num(const struct chat_request *req, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(req->json, key);
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

static void on_echo(struct chat_session *s, const struct chat_request *req, void *ud)
{
    cJSON *o = cJSON_CreateObject();
    (void)ud;
    handled++;
    cJSON_AddNumberToObject(o, "msgid", ECHO_MSGID + 1);
    cJSON_AddNumberToObject(o, "ver", ECHO_VER);
    cJSON_AddNumberToObject(o, "n", num(req, "n"));
    cJSON_AddNumberToObject(o, "count", (double)handled);
    send_obj(s, o);
}

static void on_timer(struct chat_timer *t, void *ud)
{
    struct pending *p = ud;
    struct chat_session *s = host->session_get(p->sid);
    (void)t;
    if (s) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "msgid", 1003);
        cJSON_AddNumberToObject(o, "ver", ECHO_VER);
        cJSON_AddNumberToObject(o, "n", p->n);
        send_obj(s, o);
    }
    host->free(p);
}

static void on_later(struct chat_session *s, const struct chat_request *req, void *ud)
{
    struct pending *p = host->malloc(sizeof *p);
    (void)ud;
    if (!p)
        return;
    p->sid = host->session_id(s);
    p->n = num(req, "n");
    if (!host->timer_start(me, (uint64_t)num(req, "ms"), 0, on_timer, p))
        host->free(p);
}

static void on_flood(struct chat_session *s, const struct chat_request *req, void *ud)
{
    int count = (int)num(req, "count"), size = (int)num(req, "size");
    char *buf;
    (void)ud;
    if (size < 0 || size > 1 << 20 || count < 0)
        return;
    if (!(buf = host->malloc((size_t)size + 64)))
        return;
    for (int i = 0; i < count; i++) {
        int n = snprintf(buf, 64, "{\"msgid\":1005,\"i\":%d,\"pad\":\"", i);
        memset(buf + n, 'x', (size_t)size);
        memcpy(buf + n + size, "\"}", 2);
        if (host->send_raw(s, buf, (size_t)n + (size_t)size + 2) != CHAT_OK)
            break;
    }
    host->free(buf);
}

static void on_db_done(const struct chat_db_result *r, void *ud)
{
    struct pending *p = ud;
    struct chat_session *s = host->session_get(p->sid);
    if (s) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "msgid", 1011);
        cJSON_AddNumberToObject(o, "ver", ECHO_VER);
        cJSON_AddNumberToObject(o, "n", host->db_error(r) ? -1 : (double)host->db_int(r, 0, 0));
        send_obj(s, o);
    }
    host->free(p);
}

static void on_db(struct chat_session *s, const struct chat_request *req, void *ud)
{
    struct pending *p = host->malloc(sizeof *p);
    struct chat_db_param params[2];
    (void)ud;
    if (!p)
        return;
    p->sid = host->session_id(s);
    p->n = num(req, "n");
    params[0] = CHAT_DB_P_INT(p->n);
    params[1] = CHAT_DB_P_INT(num(req, "sleep") * 1000); /* milliseconds */
    if (host->db_query(me, "SELECT ? + 0 * SLEEP(? / 1000)", params, 2, on_db_done,
                       p) != CHAT_OK) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "msgid", 1011);
        cJSON_AddNumberToObject(o, "ver", ECHO_VER);
        cJSON_AddNumberToObject(o, "n", -2);
        send_obj(s, o);
        host->free(p);
    }
}

static void on_v2(struct chat_session *s, const struct chat_request *req, void *ud)
{
    cJSON *o = cJSON_CreateObject();
    (void)ud;
    cJSON_AddNumberToObject(o, "ver", ECHO_VER);
    host->reply(s, &req->ack, 0, NULL, o);
    cJSON_Delete(o);
}

static void on_greeting(struct chat_session *s, const struct chat_request *req, void *ud)
{
    cJSON *o = cJSON_CreateObject();
    (void)req;
    (void)ud;
    cJSON_AddNumberToObject(o, "msgid", 1009);
    cJSON_AddStringToObject(o, "greeting", greeting);
    send_obj(s, o);
}

static int reconfigure(void *state)
{
    (void)state;
    snprintf(greeting, sizeof greeting, "%s", host->conf_get(me, "greeting", "hello"));
    return CHAT_OK;
}

static int init(const struct chat_host *h, struct chat_plugin *self, void **state)
{
    int rc;
    host = h;
    me = self;
    *state = NULL;
#ifdef ECHO_INIT_FAIL
    return CHAT_ERR_INVAL;
#endif
    reconfigure(NULL);
    if ((rc = h->register_handler(self, ECHO_MSGID, on_echo, NULL)) != CHAT_OK)
        return rc;
#ifndef ECHO_ONLY_ONE
    if ((rc = h->register_handler(self, 1002, on_later, NULL)) ||
        (rc = h->register_handler(self, 1004, on_flood, NULL)) ||
        (rc = h->register_handler(self, 1006, on_v2, NULL)) ||
        (rc = h->register_handler(self, 1008, on_greeting, NULL)) ||
        (rc = h->register_handler(self, 1010, on_db, NULL)))
        return rc;
#else
    (void)on_later, (void)on_flood, (void)on_v2, (void)on_greeting, (void)on_db;
#endif
    chat_log(h, self, CHAT_LOG_INFO, "echo version %d ready", ECHO_VER);
    return CHAT_OK;
}

static void fini(void *state)
{
    (void)state;
    chat_log(host, me, CHAT_LOG_INFO, "echo version %d finalised after %lld requests",
             ECHO_VER, handled);
}

static int save(void *state, void **blob, size_t *len)
{
    long long *p = host->malloc(sizeof *p);
    (void)state;
    if (!p)
        return CHAT_ERR_NOMEM;
    *p = handled;
    *blob = p;
    *len = sizeof *p;
    return CHAT_OK;
}

static int restore(void *state, const void *blob, size_t len)
{
    (void)state;
    if (len != sizeof handled)
        return CHAT_ERR_INVAL;
    memcpy(&handled, blob, sizeof handled);
    return CHAT_OK;
}

static const struct chat_plugin_desc desc = {
#ifdef ECHO_BAD_MAGIC
    .magic = 0xdeadbeefu,
#else
    .magic = CHAT_PLUGIN_MAGIC,
#endif
#ifdef ECHO_WRONG_MAJOR
    .abi_major = CHAT_ABI_MAJOR + 1,
#else
    .abi_major = CHAT_ABI_MAJOR,
#endif
#ifdef ECHO_NEWER_MINOR
    .abi_minor = CHAT_ABI_MINOR + 1,
#else
    .abi_minor = CHAT_ABI_MINOR,
#endif
    .size = sizeof(struct chat_plugin_desc),
    .name = ECHO_NAME,
    .version = ECHO_NAME "-" STR(ECHO_VER),
    .init = init,
    .fini = fini,
    .save = save,
    .restore = restore,
    .reconfigure = reconfigure,
};

#ifndef ECHO_NO_ENTRY
CHAT_PLUGIN_DECLARE(desc)
#else
/* keeps desc referenced so the build does not warn */
const void *echo_unused_desc(void);
const void *echo_unused_desc(void) { return &desc; }
#endif
