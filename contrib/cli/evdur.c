/*
 * evdur.c - the output of durable messages and of the events that came
 * with them (receipts, typing, presence), for a person or a script; the
 * rest of the output, and the format's rules, are in event.c.
 *
 * A durable message is one line with its ids and time, the same shape
 * live, synced and from history:
 *   person:  [12:00:01 p1:2#5 m17] alice (1): hi
 *            [12:00:01 p1:2#6 m18] you -> alice (1): hello
 *            [12:00:01 g3#7 m100004] team | bob (2): hi all
 *   script:  event=chat from=1 name=alice to=2 time=2026-12-04T12:00:01
 *            mid=17 conv=p1:2 cseq=5 [sync=1|history=1] msg=hi
 * The ACK of one sent from here is, for a person, the message again with
 * its ids; for a script event=sent ... mid= conv= cseq= cid= [dup=1].
 * Marks are shown as "✓ delivered #5" and "✓✓ read #3".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static const char *nz(const char *s)
{
    return s ? s : "";
}

void ev_info(struct cli *c, const char *script_line, const char *human)
{
    const char *line = c->script ? script_line : human;

    if (line)
        cli_out(c, line);
}

/* "bob (2)", or "user 2" when the name is not known. */
static void who(struct cli *c, struct sbuf *b, int64_t id)
{
    const char *name = id == c->user_id ? c->user_name : dur_name_of(c, id);

    if (name) {
        sb_safe(b, name);
        sb_fmt(b, " (%lld)", (long long)id);
    } else {
        sb_fmt(b, "user %lld", (long long)id);
    }
}

/* The user of a pair conversation who is not this one. */
static int64_t peer_of(struct cli *c, const char *conv)
{
    long long a = 0, b = 0;

    if (!conv || sscanf(conv, "p%lld:%lld", &a, &b) != 2)
        return 0;
    return a == c->user_id ? b : a;
}

static void durable_script(struct sbuf *b, const cJSON *m,
                           int how, const char *when)
{
    int group = cli_jint(m, "msgid", 0) == M_GROUP_CHAT;

    sb_str(b, group ? "event=groupchat" : "event=chat");
    if (group)
        sb_kvi(b, "group", cli_jint(m, "groupid", 0));
    sb_kvi(b, "from", cli_jint(m, "id", 0));
    sb_kv(b, "name", cli_jstr(m, "name"));
    if (!group)
        sb_kvi(b, "to", cli_jint(m, "toid", 0));
    sb_kv(b, "time", when);
    sb_kvi(b, "mid", cli_jint(m, "mid", 0));
    sb_kv(b, "conv", cli_jstr(m, "conv"));
    sb_kvi(b, "cseq", cli_jint(m, "cseq", 0));
    if (how == EV_SYNC)
        sb_str(b, " sync=1");
    else if (how == EV_HISTORY)
        sb_str(b, " history=1");
    sb_tail(b, "msg", nz(cli_jstr(m, "msg")));
}

/* [12:00:01 p1:2#5 m17] alice (1): hi     (a pair; "you -> bob (2)" for
 * this user's own) and [12:00:01 g3#7 m100004] team | alice (1): hi */
void ev_durable(struct cli *c, const cJSON *m, int how)
{
    struct sbuf b = {0};
    char when[40];
    int64_t from = cli_jint(m, "id", 0);
    int group = cli_jint(m, "msgid", 0) == M_GROUP_CHAT;

    ev_time(m, c->script, how == EV_SYNC || how == EV_HISTORY, when,
             sizeof(when));
    if (c->script) {
        durable_script(&b, m, how, when);
        ev_out(c, &b);
        sb_free(&b);
        return;
    }
    sb_fmt(&b, "[%s ", when);
    sb_safe(&b, nz(cli_jstr(m, "conv")));
    sb_fmt(&b, "#%lld m%lld] ", (long long)cli_jint(m, "cseq", 0),
           (long long)cli_jint(m, "mid", 0));
    if (group) {
        const char *gname = ev_group_name(c, cli_jint(m, "groupid", 0));

        if (gname) {
            sb_safe(&b, gname);
            sb_str(&b, " | ");
        }
    }
    if (from == c->user_id) {
        sb_str(&b, "you");
        if (!group) {
            sb_str(&b, " -> ");
            who(c, &b, cli_jint(m, "toid", 0));
        }
    } else {
        who(c, &b, from);
    }
    sb_str(&b, ": ");
    sb_safe(&b, nz(cli_jstr(m, "msg")));
    ev_out(c, &b);
    sb_free(&b);
}

/* The ACK of a durable message: its ids; a person sees the message itself
 * with them, as it now stands in the conversation. */
void ev_sent(struct cli *c, const struct cli_pending *p, const cJSON *ack,
             const struct cli_out *o)
{
    struct sbuf b = {0};
    int dup = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(ack, "dup"));
    cJSON *m;

    if (c->script) {
        sb_fmt(&b, "event=sent %s=%lld seq=%lld", p->msgid == M_CHAT ? "to"
               : "group", (long long)p->arg, (long long)cli_jint(ack, "seq", -1));
        if (cli_jstr(ack, "conv")) {
            sb_kvi(&b, "mid", cli_jint(ack, "mid", 0));
            sb_kv(&b, "conv", cli_jstr(ack, "conv"));
            sb_kvi(&b, "cseq", cli_jint(ack, "cseq", 0));
        }
        sb_kv(&b, "cid", o->cid);
        if (dup)
            sb_str(&b, " dup=1");
        ev_out(c, &b);
        sb_free(&b);
        return;
    }
    if (!cli_jstr(ack, "conv"))
        return; /* not stored: as a plain message, nothing to add */
    m = cJSON_Duplicate(o->req, 1);
    if (!m || !cJSON_AddNumberToObject(m, "mid", (double)cli_jint(ack, "mid", 0)) ||
        !cJSON_AddStringToObject(m, "conv", cli_jstr(ack, "conv")) ||
        !cJSON_AddNumberToObject(m, "cseq", (double)cli_jint(ack, "cseq", 0)))
        cli_oom();
    cJSON_DeleteItemFromObjectCaseSensitive(m, "id");
    if (!cJSON_AddNumberToObject(m, "id", (double)c->user_id))
        cli_oom();
    ev_durable(c, m, EV_SENT);
    cJSON_Delete(m);
}

static void marks(struct sbuf *b, int64_t delivered, int64_t read)
{
    if (read > 0)
        sb_fmt(b, "\xe2\x9c\x93\xe2\x9c\x93 read #%lld", (long long)read);
    if (delivered > read)
        sb_fmt(b, "%s\xe2\x9c\x93 delivered #%lld", read > 0 ? " \xc2\xb7 " : "",
               (long long)delivered);
    if (!read && !delivered)
        sb_str(b, "nothing delivered yet");
}

/* One conversation: its head, this user's marks and the other user's. */
void ev_conv(struct cli *c, const struct cli_conv *v, const char *why)
{
    struct sbuf b = {0};
    int64_t peer = peer_of(c, v->name), unread = v->head - v->read;

    if (unread < 0)
        unread = 0;
    if (c->script) {
        sb_kv(&b, "event=conv conv", v->name);
        sb_fmt(&b, " head=%lld pos=%lld delivered=%lld read=%lld unread=%lld",
               (long long)v->head, (long long)v->pos, (long long)v->delivered,
               (long long)v->read, (long long)unread);
        if (peer)
            sb_fmt(&b, " peer=%lld peer_delivered=%lld peer_read=%lld",
                   (long long)peer, (long long)v->peer_delivered,
                   (long long)v->peer_read);
        if (why)
            sb_kv(&b, "via", why);
        ev_out(c, &b);
        sb_free(&b);
        return;
    }
    sb_fmt(&b, "   %s ", v->name);
    if (peer) {
        sb_str(&b, "with ");
        who(c, &b, peer);
    } else if (ev_group_name(c, atoll(v->name + 1))) {
        sb_safe(&b, ev_group_name(c, atoll(v->name + 1)));
    }
    sb_fmt(&b, ": #%lld, %lld unread", (long long)v->head, (long long)unread);
    if (peer && (v->peer_delivered || v->peer_read)) {
        sb_str(&b, "; ");
        who(c, &b, peer);
        sb_str(&b, ": ");
        marks(&b, v->peer_delivered, v->peer_read);
    }
    ev_out(c, &b);
    sb_free(&b);
}

/* Someone's delivered/read marks (msgid 17). */
void ev_receipt(struct cli *c, const char *conv, int64_t from,
                int64_t delivered, int64_t read, const char *via)
{
    struct sbuf b = {0};

    if (c->script) {
        sb_kv(&b, "event=receipt conv", conv);
        if (from)
            sb_kvi(&b, "from", from);
        sb_fmt(&b, " delivered=%lld read=%lld", (long long)delivered,
               (long long)read);
        sb_kv(&b, "via", via);
    } else {
        sb_str(&b, "** ");
        sb_safe(&b, conv);
        if (from) {
            sb_str(&b, " ");
            if (from == c->user_id)
                sb_str(&b, "you (another device)");
            else
                who(c, &b, from);
        }
        sb_str(&b, ": ");
        marks(&b, delivered, read);
    }
    ev_out(c, &b);
    sb_free(&b);
}

/* msgid 18: {"id","name","toid"|"groupid","typing"} */
void ev_typing(struct cli *c, const cJSON *m)
{
    struct sbuf b = {0};
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(m, "typing");
    int on = !cJSON_IsFalse(t);
    int64_t gid = cli_jint(m, "groupid", 0);

    dur_learn_name(c, cli_jint(m, "id", 0), cli_jstr(m, "name"));
    if (c->script) {
        sb_str(&b, "event=typing");
        sb_kvi(&b, "from", cli_jint(m, "id", 0));
        sb_kv(&b, "name", cli_jstr(m, "name"));
        if (gid)
            sb_kvi(&b, "group", gid);
        else
            sb_kvi(&b, "to", cli_jint(m, "toid", 0));
        sb_kv(&b, "state", on ? "typing" : "stopped");
    } else {
        sb_str(&b, "** ");
        who(c, &b, cli_jint(m, "id", 0));
        sb_str(&b, on ? " is typing" : " stopped typing");
        if (gid) {
            sb_fmt(&b, " in #%lld", (long long)gid);
            if (ev_group_name(c, gid)) {
                sb_str(&b, " ");
                sb_safe(&b, ev_group_name(c, gid));
            }
        }
        if (on)
            sb_str(&b, "\xe2\x80\xa6");
    }
    ev_out(c, &b);
    sb_free(&b);
}

/* msgid 19: {"id","name","online"} */
void ev_presence(struct cli *c, const cJSON *m)
{
    struct sbuf b = {0};
    int on = ev_online(m);

    dur_learn_name(c, cli_jint(m, "id", 0), cli_jstr(m, "name"));
    if (c->script) {
        sb_str(&b, "event=presence");
        sb_kvi(&b, "id", cli_jint(m, "id", 0));
        sb_kv(&b, "name", cli_jstr(m, "name"));
        sb_kv(&b, "state", on ? "online" : "offline");
    } else {
        sb_str(&b, "** ");
        who(c, &b, cli_jint(m, "id", 0));
        sb_str(&b, on ? " is online" : " went offline");
    }
    ev_out(c, &b);
    sb_free(&b);
}
