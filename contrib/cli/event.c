/*
 * event.c - what the server sends, turned into output for a person or for a
 * script.
 *
 * Every event is written twice over in this file: a line for a person
 * (times in local time, names before ids, errors as "error N: text") and one
 * key=value line for a script ("event=chat from=3 name=bob msg=hi").  The
 * script format is a contract for tests and demos:
 *   - one line per event, first field event=KIND, then key=value fields, and
 *     the bare word "ok" after the kind of a successful reply;
 *   - a value holding a blank, a quote, a backslash or a control character is
 *     written as a double-quoted string with backslash escapes (\" \\ \n \r
 *     \t \xHH);
 *   - the free-text fields msg, errmsg, text and reason come last and take the
 *     rest of the line, unquoted; only \\ \n \r \t \xHH are escaped in them.
 *
 * Durable messages (with conv and cseq), receipts, typing and presence
 * are written by evdur.c, in the same format.  docs/cli.md lists every
 * event.
 *
 * Text for a person goes through sb_safe, which shows control characters as
 * ^X: a message must not be able to move the cursor or restyle the terminal.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"

/* ---- sbuf ---------------------------------------------------------------- */

void sb_add(struct sbuf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 128;
        char *d;

        while (cap < b->len + n + 1)
            cap *= 2;
        d = realloc(b->data, cap);
        if (!d)
            cli_oom();
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void sb_str(struct sbuf *b, const char *s)
{
    sb_add(b, s, strlen(s));
}

void sb_fmt(struct sbuf *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof(tmp)) {
        sb_add(b, tmp, (size_t)n);
        return;
    }
    {
        char *big = cli_xmalloc((size_t)n + 1);

        va_start(ap, fmt);
        vsnprintf(big, (size_t)n + 1, fmt, ap);
        va_end(ap);
        sb_add(b, big, (size_t)n);
        free(big);
    }
}

static void sb_escaped(struct sbuf *b, const char *s, int quote)
{
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;

        if (ch == '\\')
            sb_str(b, "\\\\");
        else if (ch == '"' && quote)
            sb_str(b, "\\\"");
        else if (ch == '\n')
            sb_str(b, "\\n");
        else if (ch == '\r')
            sb_str(b, "\\r");
        else if (ch == '\t')
            sb_str(b, "\\t");
        else if (ch < 0x20 || ch == 0x7f)
            sb_fmt(b, "\\x%02x", ch);
        else
            sb_add(b, s, 1);
    }
}

void sb_kv(struct sbuf *b, const char *key, const char *val)
{
    const char *p;
    int quote = !val || !*val;

    if (!val)
        val = "";
    for (p = val; *p && !quote; p++)
        if ((unsigned char)*p <= 0x20 || *p == '"' || *p == '\\' || *p == 0x7f)
            quote = 1;
    if (b->len)
        sb_str(b, " ");
    sb_str(b, key);
    sb_str(b, "=");
    if (!quote) {
        sb_str(b, val);
        return;
    }
    sb_str(b, "\"");
    sb_escaped(b, val, 1);
    sb_str(b, "\"");
}

void sb_kvi(struct sbuf *b, const char *key, int64_t val)
{
    sb_fmt(b, "%s%s=%lld", b->len ? " " : "", key, (long long)val);
}

void sb_tail(struct sbuf *b, const char *key, const char *val)
{
    sb_fmt(b, "%s%s=", b->len ? " " : "", key);
    sb_escaped(b, val ? val : "", 0);
}

void sb_safe(struct sbuf *b, const char *s)
{
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;

        if (ch < 0x20 || ch == 0x7f) {
            char x[3] = {'^', (char)(ch ^ 0x40), 0};
            sb_str(b, x);
        } else if (ch == 0xc2 && (unsigned char)s[1] >= 0x80 &&
                   (unsigned char)s[1] <= 0x9f) {
            sb_str(b, "?"); /* a C1 control such as CSI, UTF-8 encoded */
            s++;
        } else {
            sb_add(b, s, 1);
        }
    }
}

void sb_free(struct sbuf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* ---- JSON field access --------------------------------------------------- */

int64_t cli_jint(const cJSON *o, const char *k, int64_t def)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

    return cJSON_IsNumber(v) ? (int64_t)v->valuedouble : def;
}

const char *cli_jstr(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static const char *nz(const char *s)
{
    return s ? s : "";
}

static void set_str(char **dst, const char *src)
{
    if (*dst)
        memset(*dst, 0, strlen(*dst));
    free(*dst);
    *dst = src ? cli_xstrdup(src) : NULL;
}

/* A presence value: "state":"online"|"offline" or "online":true|false. */
int ev_online(const cJSON *o)
{
    const char *st = cli_jstr(o, "state");
    const cJSON *on = cJSON_GetObjectItemCaseSensitive(o, "online");

    if (st)
        return !strcmp(st, "online");
    return cJSON_IsTrue(on);
}

/* ---- time ---------------------------------------------------------------- */

/* When a message was sent, in local time: from a numeric "ts" (seconds or
 * milliseconds since the epoch, when the server stamps one), else the
 * sender's "time" text, else now (a stored message without either: "?"
 * or "--:--:--").  Human form "HH:MM:SS" for today and
 * "YYYY-MM-DD HH:MM" before; script form "YYYY-MM-DDTHH:MM:SS". */
void ev_time(const cJSON *m, int script, int stored, char *out, size_t n)
{
    const cJSON *ts = cJSON_GetObjectItemCaseSensitive(m, "ts");
    const char *txt = cli_jstr(m, "time");
    time_t t = time(NULL), now = t;
    struct tm tm, today;

    if (!txt && !cJSON_IsNumber(ts) && stored) {
        snprintf(out, n, script ? "?" : "--:--:--"); /* stored, undated */
        return;
    }
    if (cJSON_IsNumber(ts) && ts->valuedouble > 0) {
        double v = ts->valuedouble;
        t = (time_t)(v > 1e11 ? v / 1000 : v);
    } else if (txt) {
        memset(&tm, 0, sizeof(tm));
        if (sscanf(txt, "%d-%d-%d %d:%d:%d", &tm.tm_year, &tm.tm_mon,
                   &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &tm.tm_sec) == 6) {
            tm.tm_year -= 1900;
            tm.tm_mon -= 1;
            tm.tm_isdst = -1;
            t = mktime(&tm);
        }
    }
    localtime_r(&t, &tm);
    localtime_r(&now, &today);
    if (script)
        strftime(out, n, "%Y-%m-%dT%H:%M:%S", &tm);
    else if (tm.tm_year == today.tm_year && tm.tm_yday == today.tm_yday)
        strftime(out, n, "%H:%M:%S", &tm);
    else
        strftime(out, n, "%Y-%m-%d %H:%M", &tm);
}

/* ---- output helpers ------------------------------------------------------ */

void ev_out(struct cli *c, struct sbuf *b)
{
    cli_out(c, b->data ? b->data : "");
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

static const char *req_name(int msgid)
{
    switch (msgid) {
    case M_LOGIN: return "login";
    case M_LOGOUT: return "loginout";
    case M_REG: return "register";
    case M_CHAT: return "chat";
    case M_ADD_FRIEND: return "addfriend";
    case M_CREATE_GROUP: return "creategroup";
    case M_ADD_GROUP: return "addgroup";
    case M_GROUP_CHAT: return "groupchat";
    case M_FRIEND_LIST: return "friends";
    case M_GROUP_LIST: return "groups";
    case M_SYNC: return "sync";
    case M_HISTORY: return "history";
    case M_READ: return "read";
    default: return "request";
    }
}

void ev_error(struct cli *c, int req, int64_t seq, int64_t err,
                      const char *msg)
{
    struct sbuf b = {0};

    if (c->script) {
        sb_fmt(&b, "event=error req=%d seq=%lld errno=%lld", req,
               (long long)seq, (long long)err);
        sb_tail(&b, "errmsg", nz(msg));
    } else {
        sb_fmt(&b, "!! %s failed: error %lld: ", req_name(req), (long long)err);
        sb_safe(&b, msg ? msg : "(no message)");
    }
    ev_out(c, &b);
    sb_free(&b);
}

const char *ev_group_name(struct cli *c, int64_t gid)
{
    const cJSON *g;

    cJSON_ArrayForEach(g, c->groups)
        if (cli_jint(g, "id", 0) == gid)
            return cli_jstr(g, "groupname");
    return NULL;
}

/* ---- incoming messages --------------------------------------------------- */

static void on_chat(struct cli *c, const cJSON *m, int offline)
{
    struct sbuf b = {0};
    char when[40];

    ev_time(m, c->script, 0, when, sizeof(when));
    if (c->script) {
        sb_str(&b, "event=chat");
        sb_kvi(&b, "from", cli_jint(m, "id", 0));
        sb_kv(&b, "name", cli_jstr(m, "name"));
        sb_kv(&b, "time", when);
        if (offline)
            sb_str(&b, " offline=1");
        sb_tail(&b, "msg", nz(cli_jstr(m, "msg")));
    } else {
        sb_fmt(&b, "[%s%s] ", when, offline ? ", while away" : "");
        sb_safe(&b, nz(cli_jstr(m, "name")));
        sb_fmt(&b, " (%lld): ", (long long)cli_jint(m, "id", 0));
        sb_safe(&b, nz(cli_jstr(m, "msg")));
    }
    ev_out(c, &b);
    sb_free(&b);
}

static void on_groupchat(struct cli *c, const cJSON *m, int offline)
{
    struct sbuf b = {0};
    char when[40];
    int64_t gid = cli_jint(m, "groupid", 0);
    const char *gname = ev_group_name(c, gid);

    ev_time(m, c->script, 0, when, sizeof(when));
    if (c->script) {
        sb_str(&b, "event=groupchat");
        sb_kvi(&b, "group", gid);
        sb_kvi(&b, "from", cli_jint(m, "id", 0));
        sb_kv(&b, "name", cli_jstr(m, "name"));
        sb_kv(&b, "time", when);
        if (offline)
            sb_str(&b, " offline=1");
        sb_tail(&b, "msg", nz(cli_jstr(m, "msg")));
    } else {
        sb_fmt(&b, "[%s%s] #%lld", when, offline ? ", while away" : "",
               (long long)gid);
        if (gname) {
            sb_str(&b, " ");
            sb_safe(&b, gname);
        }
        sb_str(&b, " | ");
        sb_safe(&b, nz(cli_jstr(m, "name")));
        sb_fmt(&b, " (%lld): ", (long long)cli_jint(m, "id", 0));
        sb_safe(&b, nz(cli_jstr(m, "msg")));
    }
    ev_out(c, &b);
    sb_free(&b);
}

/* An offline message: an object, or (legacy shape) a string holding one. */
static void on_offline(struct cli *c, const cJSON *item)
{
    cJSON *parsed = NULL;
    const cJSON *m = item;

    if (cJSON_IsString(item)) {
        parsed = cJSON_Parse(item->valuestring);
        m = parsed;
    }
    if (cJSON_IsObject(m)) {
        if (cli_jint(m, "msgid", 0) == M_GROUP_CHAT)
            on_groupchat(c, m, 1);
        else
            on_chat(c, m, 1);
    }
    cJSON_Delete(parsed);
}

/* A chat message live: durable ones (with conv and cseq) once each. */
static void on_live(struct cli *c, const cJSON *m)
{
    dur_learn_name(c, cli_jint(m, "id", 0), cli_jstr(m, "name"));
    if (!cli_jstr(m, "conv") || cli_jint(m, "cseq", 0) <= 0) {
        if (cli_jint(m, "msgid", 0) == M_GROUP_CHAT)
            on_groupchat(c, m, 0);
        else
            on_chat(c, m, 0);
        return;
    }
    if (!dur_live(c, m))
        return; /* had it already */
    ev_durable(c, m, EV_LIVE);
    dur_shown(c, m);
}

/* ---- lists --------------------------------------------------------------- */

static void list_friends(struct cli *c, const cJSON *friends, int brief)
{
    struct sbuf b = {0};
    const cJSON *f;
    int n = cJSON_GetArraySize(friends), on = 0;

    cJSON_ArrayForEach(f, friends) {
        on += ev_online(f);
        if (c->script && !brief) {
            sb_str(&b, "event=friend");
            sb_kvi(&b, "id", cli_jint(f, "id", 0));
            sb_kv(&b, "name", cli_jstr(f, "name"));
            sb_kv(&b, "state", ev_online(f) ? "online" : "offline");
            ev_out(c, &b);
        }
    }
    if (c->script) {
        if (!brief) {
            sb_fmt(&b, "event=friends count=%d online=%d", n, on);
            ev_out(c, &b);
        }
        sb_free(&b);
        return;
    }
    sb_fmt(&b, "** friends (%d, %d online):", n, on);
    if (!n)
        sb_str(&b, " none yet (addfriend:ID)");
    cJSON_ArrayForEach(f, friends) {
        sb_str(&b, brief ? " " : "\n   ");
        sb_safe(&b, nz(cli_jstr(f, "name")));
        sb_fmt(&b, " (%lld)%s%s", (long long)cli_jint(f, "id", 0),
               ev_online(f) ? " online" : " offline", brief ? ";" : "");
    }
    ev_out(c, &b);
    sb_free(&b);
}

static void list_groups(struct cli *c, const cJSON *groups, int brief)
{
    struct sbuf b = {0};
    const cJSON *g, *u;
    int n = cJSON_GetArraySize(groups);

    cJSON_ArrayForEach(g, groups) {
        const cJSON *users = cJSON_GetObjectItemCaseSensitive(g, "users");
        int members = cJSON_GetArraySize(users), on = 0;

        cJSON_ArrayForEach(u, users)
            on += ev_online(u);
        if (c->script) {
            if (brief)
                continue;
            sb_str(&b, "event=group");
            sb_kvi(&b, "id", cli_jint(g, "id", 0));
            sb_kv(&b, "name", cli_jstr(g, "groupname"));
            sb_kv(&b, "desc", cli_jstr(g, "groupdesc"));
            sb_fmt(&b, " members=%d online=%d", members, on);
            ev_out(c, &b);
            cJSON_ArrayForEach(u, users) {
                sb_str(&b, "event=member");
                sb_kvi(&b, "group", cli_jint(g, "id", 0));
                sb_kvi(&b, "id", cli_jint(u, "id", 0));
                sb_kv(&b, "name", cli_jstr(u, "name"));
                sb_kv(&b, "state", ev_online(u) ? "online" : "offline");
                sb_kv(&b, "role", cli_jstr(u, "role"));
                ev_out(c, &b);
            }
            continue;
        }
        if (!b.len)
            sb_fmt(&b, "** groups (%d):", n);
        sb_fmt(&b, "\n   #%lld ", (long long)cli_jint(g, "id", 0));
        sb_safe(&b, nz(cli_jstr(g, "groupname")));
        sb_fmt(&b, " - %d members, %d online", members, on);
        if (!brief && cli_jstr(g, "groupdesc") && *cli_jstr(g, "groupdesc")) {
            sb_str(&b, " - ");
            sb_safe(&b, cli_jstr(g, "groupdesc"));
        }
        if (!brief)
            cJSON_ArrayForEach(u, users) {
                sb_str(&b, "\n      ");
                sb_safe(&b, nz(cli_jstr(u, "name")));
                sb_fmt(&b, " (%lld) %s%s", (long long)cli_jint(u, "id", 0),
                       ev_online(u) ? "online" : "offline",
                       cli_jstr(u, "role") && !strcmp(cli_jstr(u, "role"), "creator")
                           ? ", creator" : "");
            }
    }
    if (c->script) {
        if (!brief) {
            sb_fmt(&b, "event=groups count=%d", n);
            ev_out(c, &b);
        }
    } else {
        if (!n)
            sb_str(&b, "** groups: none yet (creategroup:NAME:DESC, addgroup:ID)");
        ev_out(c, &b);
    }
    sb_free(&b);
}

static void keep_groups(struct cli *c, const cJSON *groups)
{
    const cJSON *g, *u;

    cJSON_ArrayForEach(g, groups)
        cJSON_ArrayForEach(u, cJSON_GetObjectItemCaseSensitive(g, "users"))
            dur_learn_name(c, cli_jint(u, "id", 0), cli_jstr(u, "name"));
    cJSON_Delete(c->groups);
    c->groups = cJSON_IsArray(groups) ? cJSON_Duplicate(groups, 1)
                                      : cJSON_CreateArray();
    if (!c->groups)
        cli_oom();
}

/* ---- replies ------------------------------------------------------------- */

static void forget_session(struct cli *c)
{
    dur_logged_out(c);
    c->logged_in = 0;
    c->relogin = 0;
    c->user_id = 0;
    set_str(&c->user_name, NULL);
    set_str(&c->token, NULL);
    set_str(&c->password, NULL);
    cli_prompt_update(c);
}

/* A re-login was refused.  Credentials that no longer work (errno 1: bad
 * id, password or token; or a malformed field) fall back from the token to
 * the password, then give up.  Anything else is taken as passing: the old
 * session still counted online (errno 2 "this account is using", or 110)
 * until the dead node's presence expires, or a back end briefly down. */
static void relogin_failed(struct cli *c, const cJSON *m)
{
    int64_t err = cli_jint(m, "errno", -1);
    int bad_credentials = err == 1 || (err >= 104 && err <= 108);
    struct sbuf b = {0};

    if (!bad_credentials) {
        if (c->relogin_tries == 1) {
            if (c->script) {
                sb_fmt(&b, "event=relogin wait errno=%lld", (long long)err);
                sb_tail(&b, "errmsg", nz(cli_jstr(m, "errmsg")));
            } else {
                sb_str(&b, "** cannot log in again yet (");
                sb_safe(&b, nz(cli_jstr(m, "errmsg")));
                sb_str(&b, "); retrying every second");
            }
            ev_out(c, &b);
        }
        sb_free(&b);
        conn_relogin_in(c, CLI_RELOGIN_DELAY_MS);
        return;
    }
    if (c->token && !c->relogin_with_password && c->password) {
        c->relogin_with_password = 1;
        cmd_relogin(c);
        return;
    }
    if (c->script) {
        sb_fmt(&b, "event=relogin failed errno=%lld", (long long)err);
        sb_tail(&b, "errmsg", nz(cli_jstr(m, "errmsg")));
    } else {
        sb_fmt(&b, "!! could not log in again: error %lld: ", (long long)err);
        sb_safe(&b, nz(cli_jstr(m, "errmsg")));
        sb_str(&b, " (use login ID PASSWORD)");
    }
    ev_out(c, &b);
    sb_free(&b);
    forget_session(c);
}

static void on_login_ack(struct cli *c, const cJSON *m)
{
    struct cli_pending *p = cmd_take_pending(c, cli_jint(m, "seq", -1), M_LOGIN);
    int64_t err = cli_jint(m, "errno", -1);
    const cJSON *item, *offline = cJSON_GetObjectItemCaseSensitive(m, "offlinemsg");
    const cJSON *friends = cJSON_GetObjectItemCaseSensitive(m, "friends");
    const cJSON *groups = cJSON_GetObjectItemCaseSensitive(m, "groups");
    int auto_login = p && (p->flags & CLI_P_AUTO_LOGIN);
    struct sbuf b = {0};

    if (err != 0) {
        if (auto_login)
            relogin_failed(c, m);
        else
            ev_error(c, M_LOGIN, cli_jint(m, "seq", -1), err, cli_jstr(m, "errmsg"));
        goto out;
    }
    c->logged_in = 1;
    c->relogin = 0;
    c->relogin_tries = 0;
    c->relogin_with_password = 0;
    c->user_id = cli_jint(m, "id", p ? p->arg : 0);
    set_str(&c->user_name, cli_jstr(m, "name"));
    if (cli_jstr(m, "token"))
        set_str(&c->token, cli_jstr(m, "token"));
    if (p && p->text && !auto_login)
        set_str(&c->password, p->text);
    keep_groups(c, groups);
    if (c->script) {
        sb_fmt(&b, "event=%s ok id=%lld", auto_login ? "relogin" : "login",
               (long long)c->user_id);
        sb_kv(&b, "name", c->user_name);
        sb_fmt(&b, " friends=%d groups=%d offline=%d",
               cJSON_GetArraySize(friends), cJSON_GetArraySize(groups),
               cJSON_GetArraySize(offline));
        ev_out(c, &b);
    } else {
        sb_str(&b, auto_login ? "** logged in again as " : "** logged in as ");
        sb_safe(&b, nz(c->user_name));
        sb_fmt(&b, " (id %lld)", (long long)c->user_id);
        if (cJSON_GetArraySize(offline))
            sb_fmt(&b, "; %d message%s came while you were away",
                   cJSON_GetArraySize(offline),
                   cJSON_GetArraySize(offline) == 1 ? "" : "s");
        ev_out(c, &b);
        if (!auto_login) {
            list_friends(c, friends, 1);
            list_groups(c, c->groups, 1);
        }
    }
    cJSON_ArrayForEach(item, offline)
        on_offline(c, item);
    cJSON_ArrayForEach(item, friends)
        dur_learn_name(c, cli_jint(item, "id", 0), cli_jstr(item, "name"));
    cli_prompt_update(c);
    dur_logged_in(c); /* SYNC, and send again what waits */
out:
    sb_free(&b);
    cmd_pending_free(p);
}

static void on_reg_ack(struct cli *c, const cJSON *m)
{
    struct cli_pending *p = cmd_take_pending(c, cli_jint(m, "seq", -1), M_REG);
    int64_t err = cli_jint(m, "errno", -1);
    struct sbuf b = {0};

    if (err != 0) {
        ev_error(c, M_REG, cli_jint(m, "seq", -1), err, cli_jstr(m, "errmsg"));
    } else if (c->script) {
        sb_fmt(&b, "event=register ok id=%lld", (long long)cli_jint(m, "id", 0));
        sb_kv(&b, "name", cli_jstr(m, "name") ? cli_jstr(m, "name") : p ? p->text : "");
        ev_out(c, &b);
    } else {
        sb_str(&b, "** registered ");
        sb_safe(&b, p && p->text ? p->text : "");
        sb_fmt(&b, ": your id is %lld (now: login %lld PASSWORD)",
               (long long)cli_jint(m, "id", 0), (long long)cli_jint(m, "id", 0));
        ev_out(c, &b);
    }
    sb_free(&b);
    cmd_pending_free(p);
}

static void ack_ok(struct cli *c, const struct cli_pending *p, int req,
                   const cJSON *m)
{
    struct sbuf b = {0};
    int64_t seq = cli_jint(m, "seq", -1);
    int64_t arg = p ? p->arg : 0;

    switch (req) {
    case M_CHAT:
        if (c->script)
            sb_fmt(&b, "event=sent to=%lld seq=%lld", (long long)arg,
                   (long long)seq);
        break;
    case M_GROUP_CHAT:
        if (c->script)
            sb_fmt(&b, "event=sent group=%lld seq=%lld", (long long)arg,
                   (long long)seq);
        break;
    case M_ADD_FRIEND:
        sb_fmt(&b, c->script ? "event=addfriend ok id=%lld"
                             : "** user %lld is now your friend",
               (long long)arg);
        break;
    case M_CREATE_GROUP: {
        int64_t gid = cli_jint(m, "groupid", 0);
        cJSON *g = cJSON_CreateObject();

        if (!g || !cJSON_AddNumberToObject(g, "id", (double)gid) ||
            !cJSON_AddStringToObject(g, "groupname", p && p->text ? p->text : "") ||
            !cJSON_AddItemToArray(c->groups, g))
            cli_oom();
        if (c->script) {
            sb_fmt(&b, "event=creategroup ok groupid=%lld", (long long)gid);
            sb_kv(&b, "name", p ? p->text : NULL);
        } else {
            sb_str(&b, "** created group ");
            sb_safe(&b, p && p->text ? p->text : "");
            sb_fmt(&b, " with id %lld (groupchat:%lld:MSG)", (long long)gid,
                   (long long)gid);
        }
        break;
    }
    case M_ADD_GROUP:
        sb_fmt(&b, c->script ? "event=addgroup ok groupid=%lld"
                             : "** joined group %lld", (long long)arg);
        if (!c->script)
            cmd_refresh_groups(c); /* learn its name for incoming messages */
        break;
    case M_LOGOUT:
        sb_str(&b, c->script ? "event=logout ok" : "** logged out");
        forget_session(c);
        break;
    case M_FRIEND_LIST:
        list_friends(c, cJSON_GetObjectItemCaseSensitive(m, "friends"), 0);
        break;
    case M_GROUP_LIST:
        keep_groups(c, cJSON_GetObjectItemCaseSensitive(m, "groups"));
        if (!(p && (p->flags & CLI_P_QUIET)))
            list_groups(c, c->groups, 0);
        break;
    default:
        if (c->script)
            sb_fmt(&b, "event=ack req=%d seq=%lld", req, (long long)seq);
    }
    if (b.len)
        ev_out(c, &b);
    sb_free(&b);
}

static void on_ack(struct cli *c, const cJSON *m)
{
    int req = (int)cli_jint(m, "req", 0);
    int64_t seq = cli_jint(m, "seq", -1), err = cli_jint(m, "errno", -1);
    struct cli_pending *p = cmd_take_pending(c, seq, req);

    if (dur_on_reply(c, p, req, m)) {
        cmd_pending_free(p);
        return;
    }
    if (err != 0) {
        if (!(p && (p->flags & CLI_P_QUIET)))
            ev_error(c, req, seq, err, cli_jstr(m, "errmsg"));
    } else {
        ack_ok(c, p, req, m);
    }
    cmd_pending_free(p);
}

static void on_notice(struct cli *c, const cJSON *m)
{
    int64_t err = cli_jint(m, "errno", 0);
    struct sbuf b = {0};

    if (c->script) {
        sb_fmt(&b, "event=notice errno=%lld", (long long)err);
        sb_tail(&b, "errmsg", nz(cli_jstr(m, "errmsg")));
    } else {
        sb_str(&b, "** server says: ");
        sb_safe(&b, nz(cli_jstr(m, "errmsg")));
        sb_fmt(&b, " (%lld)", (long long)err);
        if (err == E_REPLACED)
            sb_str(&b, "; not logging in again by itself");
    }
    ev_out(c, &b);
    sb_free(&b);
    if (err == E_REPLACED)
        forget_session(c); /* someone else has the account now: no ping-pong */
}

void ev_message(struct cli *c, cJSON *m)
{
    struct sbuf b = {0};
    char *raw;

    switch (cli_jint(m, "msgid", 0)) {
    case M_LOGIN_ACK: on_login_ack(c, m); break;
    case M_REG_ACK: on_reg_ack(c, m); break;
    case M_ACK: on_ack(c, m); break;
    case M_NOTICE: on_notice(c, m); break;
    case M_CHAT:
    case M_GROUP_CHAT: on_live(c, m); break;
    case M_READ: dur_receipt(c, m); break;
    case M_TYPING: ev_typing(c, m); break;
    case M_PRESENCE: ev_presence(c, m); break;
    default:
        raw = cJSON_PrintUnformatted(m);
        if (!raw)
            cli_oom();
        if (c->script) {
            sb_tail(&b, "event=unknown json", raw);
        } else {
            sb_str(&b, "** unexpected message: ");
            sb_safe(&b, raw);
        }
        cJSON_free(raw);
        ev_out(c, &b);
        sb_free(&b);
    }
    cli_script_pump(c); /* a reply may unblock the next script line */
}

/* ---- connection state ---------------------------------------------------- */

void ev_connected(struct cli *c)
{
    struct sbuf b = {0};

    if (c->script) {
        sb_fmt(&b, "event=connected addr=%s", c->label);
    } else {
        sb_fmt(&b, "** %s %s", c->lost_reported ? "reconnected to"
               : "connected to", c->label);
        if (!c->user_id)
            sb_str(&b, " - register NAME PASSWORD or login ID PASSWORD; "
                       "help lists the commands");
    }
    c->lost_reported = 0;
    ev_out(c, &b);
    sb_free(&b);
    cli_prompt_update(c);
    if (c->user_id && (c->token || c->password)) {
        c->relogin_tries = 0;
        c->relogin_with_password = 0;
        cmd_relogin(c);
    }
    cli_script_pump(c);
}

void ev_disconnected(struct cli *c, const char *why, uint64_t retry_ms,
                     int was_up)
{
    struct sbuf b = {0};

    c->logged_in = 0; /* the user and token stay for the re-login */
    cmd_fail_pending(c, "connection lost");
    if (c->script) {
        sb_fmt(&b, "event=%s retry_ms=%llu", was_up ? "disconnected"
               : "connect-failed", (unsigned long long)retry_ms);
        sb_tail(&b, "reason", why);
    } else if (was_up) {
        sb_fmt(&b, "** lost the connection to %s: ", c->label);
        sb_safe(&b, why);
        sb_fmt(&b, "; reconnecting in %.1f s", (double)retry_ms / 1000);
    } else {
        sb_fmt(&b, "** cannot reach %s: ", c->label);
        sb_safe(&b, why);
        sb_fmt(&b, "; next try in %.1f s", (double)retry_ms / 1000);
    }
    c->lost_reported = 1;
    ev_out(c, &b);
    sb_free(&b);
    cli_prompt_update(c);
}
