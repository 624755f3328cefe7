/*
 * cmd.c - chat-cli's command language: each typed (or scripted) line becomes
 * one protocol-2 request, or a local action (help, sleep, quit).
 *
 * The seed client's commands are kept as they were (`chat:ID:MSG`,
 * `creategroup:NAME:DESC`, ...), and every command also takes its arguments
 * separated by spaces (`chat 3 hello there`): the word ends at the first ':'
 * or blank, and the separator it ended with splits the arguments; the last
 * argument takes the rest of the line, so a message may hold either.
 *
 * Every request carries "proto":2 and a "seq" of its own; the request is
 * remembered in a pending list until the reply with that seq arrives (event.c
 * takes it out), the connection drops (the request is reported unanswered)
 * or the reply timeout passes.  The re-login after a reconnect is a request
 * like the others, flagged CLI_P_AUTO_LOGIN so that its answer drives the
 * reconnect logic instead of being shown as a user's login; CLI_P_QUIET
 * marks internal refreshes whose answers update state and print nothing.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"

#define RELOGIN_MAX_TRIES 120

struct cmd_def {
    const char *name;
    const char *usage;
    const char *help;
    int (*fn)(struct cli *c, char *args, char sep);
    int local; /* needs no server */
};

static const struct cmd_def *cmd_find(const char *word, size_t n);

void cmd_pending_free(struct cli_pending *p)
{
    if (!p)
        return;
    if (p->text && p->msgid == M_LOGIN)
        memset(p->text, 0, strlen(p->text)); /* a password */
    free(p->text);
    free(p);
}

static void say_error(struct cli *c, const char *msg)
{
    struct sbuf b = {0};

    if (c->script) {
        sb_str(&b, "event=error req=0 errno=-1");
        sb_tail(&b, "errmsg", msg);
    } else {
        sb_str(&b, "!! ");
        sb_safe(&b, msg);
    }
    cli_out(c, b.data);
    sb_free(&b);
}

cJSON *cmd_req(struct cli *c, int msgid)
{
    cJSON *r = cJSON_CreateObject();

    if (!r || !cJSON_AddNumberToObject(r, "msgid", msgid) ||
        !cJSON_AddNumberToObject(r, "proto", 2) ||
        !cJSON_AddNumberToObject(r, "seq", (double)++c->seq))
        cli_oom();
    return r;
}

static void add_num(cJSON *o, const char *k, int64_t v)
{
    if (!cJSON_AddNumberToObject(o, k, (double)v))
        cli_oom();
}

static void add_str(cJSON *o, const char *k, const char *v)
{
    if (!cJSON_AddStringToObject(o, k, v))
        cli_oom();
}

/* The sender fields the seed's client puts in every request once logged in. */
static void add_me(struct cli *c, cJSON *o, int with_name)
{
    if (!c->logged_in)
        return;
    add_num(o, "id", c->user_id);
    if (with_name && c->user_name)
        add_str(o, "name", c->user_name);
}

static void add_time(cJSON *o)
{
    char buf[32];
    time_t now = time(NULL);
    struct tm tm;

    localtime_r(&now, &tm);
    strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
    add_str(o, "time", buf);   /* the seed's field: the sender's local time */
    add_num(o, "ts", (int64_t)now); /* zone-free, so receivers show their own */
}

int64_t cmd_send(struct cli *c, cJSON *req, int msgid, int64_t arg,
                 const char *text, int flags)
{
    struct cli_pending *p;
    /* req_new put the seq there; read it before req goes */
    int64_t seq = (int64_t)cJSON_GetNumberValue(
        cJSON_GetObjectItemCaseSensitive(req, "seq"));
    int rc = conn_send(c, req);

    cJSON_Delete(req);
    if (rc < 0) {
        char msg[300];

        snprintf(msg, sizeof(msg), "not connected to %s (reconnecting)",
                 c->label);
        if (!flags)
            say_error(c, msg);
        return -1;
    }
    p = cli_xmalloc(sizeof(*p));
    p->seq = seq;
    p->msgid = msgid;
    p->arg = arg;
    p->text = text ? cli_xstrdup(text) : NULL;
    p->sent_ms = uv_now(c->loop);
    p->flags = flags;
    p->next = c->pending;
    c->pending = p;
    return p->seq;
}

struct cli_pending *cmd_take_pending(struct cli *c, int64_t seq, int msgid)
{
    struct cli_pending **pp;

    for (pp = &c->pending; *pp; pp = &(*pp)->next) {
        struct cli_pending *p = *pp;

        if (p->seq == seq && (msgid <= 0 || p->msgid == msgid)) {
            *pp = p->next;
            return p;
        }
    }
    return NULL;
}

static void say_unanswered(struct cli *c, const struct cli_pending *p,
                           const char *why)
{
    struct sbuf b = {0};

    int again = (p->msgid == M_CHAT || p->msgid == M_GROUP_CHAT) && p->text;

    if (c->script) {
        sb_fmt(&b, "event=%s req=%d seq=%lld",
               strcmp(why, "timeout") ? "unacked" : "timeout", p->msgid,
               (long long)p->seq);
        if (again)
            sb_kv(&b, "cid", p->text);
        if (again)
            sb_str(&b, " resend=1");
        sb_tail(&b, "reason", why);
    } else {
        sb_fmt(&b, "!! request %lld (msgid %d) got no reply: ",
               (long long)p->seq, p->msgid);
        sb_safe(&b, why);
        if (again)
            sb_str(&b, "; it will be sent again with the same id");
    }
    cli_out(c, b.data);
    sb_free(&b);
}

void cmd_fail_pending(struct cli *c, const char *why)
{
    while (c->pending) {
        struct cli_pending *p = c->pending;

        c->pending = p->next;
        if (!p->flags)
            say_unanswered(c, p, why);
        dur_pending_lost(c, p);
        cmd_pending_free(p);
    }
}

void cmd_check_timeouts(struct cli *c)
{
    uint64_t now = uv_now(c->loop);
    uint64_t limit = (uint64_t)(c->reply_timeout * 1000);
    struct cli_pending **pp = &c->pending;
    int relogin_lost = 0;

    while (*pp) {
        struct cli_pending *p = *pp;

        if (now - p->sent_ms < limit) {
            pp = &p->next;
            continue;
        }
        *pp = p->next;
        if (p->flags & CLI_P_AUTO_LOGIN)
            relogin_lost = 1;
        else if (!p->flags)
            say_unanswered(c, p, "timeout");
        dur_pending_lost(c, p);
        cmd_pending_free(p);
    }
    if (relogin_lost && c->relogin)
        conn_relogin_in(c, CLI_RELOGIN_DELAY_MS);
}

void cmd_relogin(struct cli *c)
{
    cJSON *r;

    if (!c->user_id || (!c->token && !c->password)) {
        c->relogin = 0;
        return;
    }
    if (++c->relogin_tries > RELOGIN_MAX_TRIES) {
        c->relogin = 0;
        say_error(c, "gave up logging in again; use login ID PASSWORD");
        return;
    }
    c->relogin = 1;
    r = cmd_req(c, M_LOGIN);
    add_num(r, "id", c->user_id);
    if (c->token && !c->relogin_with_password) {
        add_str(r, "token", c->token);
        cmd_send(c, r, M_LOGIN, c->user_id, NULL, CLI_P_AUTO_LOGIN);
    } else {
        add_str(r, "password", c->password);
        cmd_send(c, r, M_LOGIN, c->user_id, c->password, CLI_P_AUTO_LOGIN);
    }
}

void cmd_refresh_groups(struct cli *c)
{
    cmd_send(c, cmd_req(c, M_GROUP_LIST), M_GROUP_LIST, 0, NULL, CLI_P_QUIET);
}

/* ---- argument splitting ------------------------------------------------ */

static char *trim(char *s)
{
    char *e;

    while (isspace((unsigned char)*s))
        s++;
    e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1]))
        *--e = '\0';
    return s;
}

/* The next argument; with last set, the rest of the line.  NULL when none. */
static char *next_arg(char **p, char sep, int last)
{
    char *s = *p, *e;

    if (!s)
        return NULL;
    if (sep != ':')
        while (isspace((unsigned char)*s))
            s++;
    if (last) {
        *p = NULL;
        return *s ? s : NULL;
    }
    e = sep == ':' ? strchr(s, ':') : s + strcspn(s, " \t");
    if (e && *e) {
        *e = '\0';
        *p = e + 1;
    } else {
        *p = NULL;
    }
    return *s ? s : NULL;
}

static int parse_id(const char *s, int64_t *out)
{
    char *end;
    long long v;

    if (!s)
        return -1;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v <= 0)
        return -1;
    *out = v;
    return 0;
}

static int usage(struct cli *c, const char *name)
{
    const struct cmd_def *d = cmd_find(name, strlen(name));
    char msg[200];

    snprintf(msg, sizeof(msg), "usage: %s", d ? d->usage : name);
    say_error(c, msg);
    return 0;
}

/* ---- commands ---------------------------------------------------------- */

static int c_help(struct cli *c, char *args, char sep);

static int c_register(struct cli *c, char *args, char sep)
{
    char *name = next_arg(&args, sep, 0);
    char *pw = next_arg(&args, sep, 1);
    cJSON *r;

    if (!name || !pw)
        return usage(c, "register");
    r = cmd_req(c, M_REG);
    add_str(r, "name", name);
    add_str(r, "password", pw);
    return cmd_send(c, r, M_REG, 0, name, 0) >= 0;
}

static int c_login(struct cli *c, char *args, char sep)
{
    int64_t id;
    char *ids = next_arg(&args, sep, 0);
    char *pw = next_arg(&args, sep, 1);
    cJSON *r;

    if (parse_id(ids, &id) < 0 || !pw)
        return usage(c, "login");
    if (c->connected) { /* the user takes over from a delayed re-login */
        c->relogin = 0;
        uv_timer_stop(&c->retry_timer); /* (when down it is the reconnect) */
    }
    r = cmd_req(c, M_LOGIN);
    add_num(r, "id", id);
    add_str(r, "password", pw);
    return cmd_send(c, r, M_LOGIN, id, pw, 0) >= 0;
}

/* The commands that name one user or group: chat:ID:MSG, groupchat:ID:MSG
 * (with_msg) and addfriend:ID, addgroup:ID. */
static int id_command(struct cli *c, char *args, char sep, const char *name,
                      int msgid, const char *idkey, int with_msg)
{
    int64_t id, seq;
    char *ids = next_arg(&args, sep, !with_msg);
    char *msg = with_msg ? next_arg(&args, sep, 1) : NULL;
    const char *cid = NULL;
    cJSON *r;

    if (parse_id(ids, &id) < 0 || (with_msg && !msg))
        return usage(c, name);
    r = cmd_req(c, msgid);
    add_me(c, r, with_msg);
    add_num(r, idkey, id);
    if (with_msg) {
        add_str(r, "msg", msg);
        add_time(r);
        cid = dur_add_cid(c, r, msgid, id); /* NULL: not durable */
    }
    if (cid && (!c->connected || !c->logged_in || c->relogin)) {
        struct sbuf s = {0}, h = {0};

        sb_fmt(&s, "event=queued %s=%lld", msgid == M_CHAT ? "to" : "group",
               (long long)id);
        sb_kv(&s, "cid", cid);
        sb_str(&h, "** kept: sent once logged in again");
        ev_info(c, s.data, h.data);
        sb_free(&s);
        sb_free(&h);
        cJSON_Delete(r);
        return 0;
    }
    seq = cmd_send(c, r, msgid, id, cid, 0);
    if (cid)
        dur_in_flight(c, cid, seq);
    return seq >= 0;
}

static int c_chat(struct cli *c, char *args, char sep)
{
    return id_command(c, args, sep, "chat", M_CHAT, "toid", 1);
}

static int c_addfriend(struct cli *c, char *args, char sep)
{
    return id_command(c, args, sep, "addfriend", M_ADD_FRIEND, "friendid", 0);
}

static int c_creategroup(struct cli *c, char *args, char sep)
{
    char *name = next_arg(&args, sep, 0);
    char *desc = next_arg(&args, sep, 1);
    cJSON *r;

    if (!name)
        return usage(c, "creategroup");
    r = cmd_req(c, M_CREATE_GROUP);
    add_me(c, r, 0);
    add_str(r, "groupname", name);
    add_str(r, "groupdesc", desc ? desc : "");
    return cmd_send(c, r, M_CREATE_GROUP, 0, name, 0) >= 0;
}

static int c_addgroup(struct cli *c, char *args, char sep)
{
    return id_command(c, args, sep, "addgroup", M_ADD_GROUP, "groupid", 0);
}

static int c_groupchat(struct cli *c, char *args, char sep)
{
    return id_command(c, args, sep, "groupchat", M_GROUP_CHAT, "groupid", 1);
}

static int c_loginout(struct cli *c, char *args, char sep)
{
    cJSON *r;

    (void)args;
    (void)sep;
    r = cmd_req(c, M_LOGOUT);
    add_me(c, r, 0);
    return cmd_send(c, r, M_LOGOUT, c->user_id, NULL, 0) >= 0;
}

static int c_friends(struct cli *c, char *args, char sep)
{
    (void)args;
    (void)sep;
    return cmd_send(c, cmd_req(c, M_FRIEND_LIST), M_FRIEND_LIST, 0, NULL, 0) >= 0;
}

static int c_groups(struct cli *c, char *args, char sep)
{
    (void)args;
    (void)sep;
    return cmd_send(c, cmd_req(c, M_GROUP_LIST), M_GROUP_LIST, 0, NULL, 0) >= 0;
}

/* history CONV|USER|gGROUP [N] [BEFORE] */
static int c_history(struct cli *c, char *args, char sep)
{
    char *target = next_arg(&args, sep, 0), *ns = next_arg(&args, sep, 0);
    char *bs = next_arg(&args, sep, 1), conv[32];
    int64_t n = 20, before = 0;

    if (dur_conv_name(c, target, conv, sizeof(conv)) < 0 ||
        (ns && parse_id(ns, &n) < 0) || (bs && parse_id(bs, &before) < 0))
        return usage(c, "history");
    return dur_history(c, conv, n > 100000 ? 100000 : (int)n, before);
}

/* read [CONV|USER|gGROUP] */
static int c_read(struct cli *c, char *args, char sep)
{
    char *target = next_arg(&args, sep, 1), conv[32];

    if (target && dur_conv_name(c, target, conv, sizeof(conv)) < 0)
        return usage(c, "read");
    return dur_read_cmd(c, target ? conv : NULL);
}

static int c_convs(struct cli *c, char *args, char sep)
{
    (void)args;
    (void)sep;
    dur_list(c);
    return 0;
}

static void sleep_cb(uv_timer_t *t)
{
    struct cli *c = t->data;

    c->sleeping = 0;
    cli_script_pump(c);
}

static int c_sleep(struct cli *c, char *args, char sep)
{
    char *s = next_arg(&args, sep, 1), *end;
    double secs;

    if (!s || (secs = strtod(s, &end), *end) || secs < 0 || secs > 86400)
        return usage(c, "sleep");
    if (!c->script) {
        say_error(c, "sleep is for scripts");
        return 0;
    }
    c->sleeping = 1;
    uv_timer_start(&c->sleep_timer, sleep_cb, (uint64_t)(secs * 1000), 0);
    return 0;
}

static int c_quit(struct cli *c, char *args, char sep)
{
    (void)args;
    (void)sep;
    cli_quit(c, 0);
    return 0;
}

static const struct cmd_def cmds[] = {
    {"help", "help", "show this list", c_help, 1},
    {"register", "register NAME PASSWORD", "create an account; prints its id",
     c_register, 0},
    {"login", "login ID PASSWORD", "log in (comes back by itself after a "
     "reconnect)", c_login, 0},
    {"chat", "chat:ID:MSG", "send MSG to user ID", c_chat, 0},
    {"addfriend", "addfriend:ID", "add user ID to your friends", c_addfriend, 0},
    {"creategroup", "creategroup:NAME:DESC", "create a group; prints its id",
     c_creategroup, 0},
    {"addgroup", "addgroup:ID", "join group ID", c_addgroup, 0},
    {"groupchat", "groupchat:ID:MSG", "send MSG to group ID", c_groupchat, 0},
    {"friends", "friends", "list your friends and who is online", c_friends, 0},
    {"groups", "groups", "list your groups and their members", c_groups, 0},
    {"loginout", "loginout", "log out (also: logout)", c_loginout, 0},
    {"logout", "logout", NULL, c_loginout, 0},
    {"history", "history WHO [N] [BEFORE]", "the last N (20) messages with "
     "user ID, group gID or conversation pA:B (before #BEFORE)", c_history, 0},
    {"read", "read [WHO]", "mark a conversation (or all) read", c_read, 0},
    {"convs", "convs", "conversations: newest #, unread, the other's "
     "\xe2\x9c\x93 delivered / \xe2\x9c\x93\xe2\x9c\x93 read", c_convs, 1},
    {"sleep", "sleep SECONDS", "scripts: wait, showing what arrives", c_sleep, 1},
    {"quit", "quit", "leave (also: exit, Ctrl-D)", c_quit, 1},
    {"exit", "exit", NULL, c_quit, 1},
};

static const struct cmd_def *cmd_find(const char *word, size_t n)
{
    size_t i;

    for (i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
        if (strlen(cmds[i].name) == n && !strncasecmp(cmds[i].name, word, n))
            return &cmds[i];
    return NULL;
}

static int c_help(struct cli *c, char *args, char sep)
{
    size_t i;
    struct sbuf b = {0};

    (void)args;
    (void)sep;
    for (i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        if (!cmds[i].help)
            continue;
        b.len = 0;
        if (c->script) {
            sb_kv(&b, "event=help usage", cmds[i].usage);
            sb_tail(&b, "text", cmds[i].help);
        } else {
            sb_fmt(&b, "  %-24s %s", cmds[i].usage, cmds[i].help);
        }
        cli_out(c, b.data);
    }
    sb_free(&b);
    return 0;
}

/* Split "word[:| ]rest"; returns the command or NULL (and says so). */
static const struct cmd_def *cmd_parse(char *line, char **args, char *sep)
{
    size_t n;

    if (*line == '/') /* "/history 3" as in other chat programs */
        line++;
    n = strcspn(line, ": \t");

    *sep = line[n] == ':' ? ':' : ' ';
    *args = line[n] ? line + n + 1 : line + n;
    return cmd_find(line, n);
}

int cmd_is_local(const char *line)
{
    char buf[32];
    char *args, sep;
    const struct cmd_def *d;

    while (isspace((unsigned char)*line))
        line++;
    if (!*line || *line == '#')
        return 1;
    snprintf(buf, sizeof(buf), "%s", line);
    d = cmd_parse(buf, &args, &sep);
    return !d || d->local;
}

int cmd_run(struct cli *c, const char *line)
{
    char *copy = cli_xstrdup(line), *s = trim(copy), *args, sep;
    const struct cmd_def *d;
    int rc = 0;

    if (!*s || *s == '#')
        goto out;
    d = cmd_parse(s, &args, &sep);
    if (!d) {
        char msg[120];

        snprintf(msg, sizeof(msg), "unknown command \"%.*s\" (try help)",
                 (int)strcspn(s + (*s == '/'), ": \t") + (*s == '/'), s);
        say_error(c, msg);
        goto out;
    }
    rc = d->fn(c, args, sep);
out:
    memset(copy, 0, strlen(line)); /* may hold a password */
    free(copy);
    return rc;
}
