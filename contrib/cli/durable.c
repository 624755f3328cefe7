/*
 * durable.c - chat-cli's side of durable messages (docs/protocol.md,
 * "Durable messages"): ids on what it sends, a position per conversation,
 * SYNC, HISTORY and read markers.
 *
 * Sending.  Every chat message gets a client id "cid" (a random prefix per
 * run and a counter) and stays in the outbox until the server's ACK says
 * errno 0.  A message whose reply was lost (the connection dropped, the
 * reply timeout passed), or that was answered 113 "busy" or 125 "rate
 * limited", is sent again with the same cid: after the re-login, on the
 * next tick, after 2 s (113) or after its retry_after_ms (125); the server
 * answers a repeat with the original ids and stores nothing twice.
 * A message typed while the connection is down waits in the outbox too.
 *
 * Position.  For each conversation chat-cli keeps `pos`, the cseq up to
 * which it has every message (shown, or sent here), and the cseqs above pos
 * it already has (a live message after a gap, an own message whose ACK
 * came before the one below it).  After each login it SYNCs from those
 * positions until "more" is false, shows what it did not have, conversation
 * by conversation in cseq order, and skips what it had: nothing is shown
 * twice.  A live message that skips a cseq starts a SYNC at once; a gap
 * below an own message is given a second to fill by itself first (the
 * other message is usually on its way).  The positions are also written to
 * $XDG_STATE_HOME/chat-cli/SERVER-USER.json (~/.local/state by default) at
 * most once a second, after each SYNC and at exit, so a restarted chat-cli
 * resumes where it was (--no-state: memory only).  The file is small and
 * written synchronously: this is a client with one user, not a server.
 *
 * Receipts.  A message from someone else that was shown marks its
 * conversation read (msgid 17; with --no-read only "delivered", and the
 * read command marks read), one marker in flight per conversation, after a
 * SYNC pass once for the whole pass.  Marks of the other user arrive live
 * (msgid 17) and with SYNC (peer_delivered, peer_read) and are shown.
 *
 * HISTORY is history.c.
 *
 * A server without the store plugin answers SYNC with 103; chat-cli then
 * says so once and sends plain messages (no cid) from then on.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"

#define GAP_WAIT_MS 1000
#define BUSY_RETRY_MS 2000
#define SYNC_RETRY_MS 2000
#define STATE_EVERY_MS 1000
#define STATE_MAX (1u << 20)

/* ---- conversations ------------------------------------------------------- */

/* "pA:B" (A <= B) or "gG", ids positive. */
static int conv_valid(const char *s)
{
    long long a, b;
    int n = 0;

    if (!s || strlen(s) >= sizeof(((struct cli_conv *)0)->name))
        return 0;
    if (s[0] == 'g')
        return sscanf(s, "g%lld%n", &a, &n) == 1 && !s[n] && a > 0 &&
               s[1] != '+' && s[1] != ' ';
    if (s[0] == 'p')
        return sscanf(s, "p%lld:%lld%n", &a, &b, &n) == 2 && !s[n] &&
               a > 0 && a <= b && s[1] != '+' && s[1] != ' ';
    return 0;
}

static struct cli_conv *conv_get(struct cli *c, const char *name, int create)
{
    struct cli_conv *v, **pp;

    for (pp = &c->convs; (v = *pp); pp = &v->next) {
        int d = strcmp(v->name, name);

        if (!d)
            return v;
        if (d > 0)
            break; /* kept sorted by name */
    }
    if (!create || !conv_valid(name))
        return NULL;
    v = calloc(1, sizeof(*v));
    if (!v)
        cli_oom();
    snprintf(v->name, sizeof(v->name), "%s", name);
    v->next = *pp;
    *pp = v;
    return v;
}

static int conv_holds(const struct cli_conv *v, int64_t cseq)
{
    size_t i;

    if (cseq <= v->pos)
        return 1;
    for (i = 0; i < v->nabove; i++)
        if (v->above[i] == cseq)
            return 1;
    return 0;
}

/* Move pos over the held cseqs that now follow it; drop those below. */
static void conv_absorb(struct cli *c, struct cli_conv *v)
{
    size_t i = 0;

    while (i < v->nabove) {
        if (v->above[i] == v->pos + 1) {
            v->pos++;
            i = 0; /* the next one may be anywhere */
            continue;
        }
        if (v->above[i] <= v->pos) {
            v->above[i] = v->above[--v->nabove];
            continue;
        }
        i++;
    }
    c->state_dirty = 1;
}

static void conv_set_pos(struct cli *c, struct cli_conv *v, int64_t pos)
{
    if (pos > v->pos) {
        v->pos = pos;
        conv_absorb(c, v);
    }
}

static void conv_hold(struct cli *c, struct cli_conv *v, int64_t cseq)
{
    if (conv_holds(v, cseq))
        return;
    if (cseq > v->head)
        v->head = cseq;
    if (cseq == v->pos + 1) {
        conv_set_pos(c, v, cseq);
        return;
    }
    if (v->nabove == v->capabove) {
        size_t cap = v->capabove ? v->capabove * 2 : 8;
        int64_t *n = realloc(v->above, cap * sizeof(*n));

        if (!n)
            cli_oom();
        v->above = n;
        v->capabove = cap;
    }
    v->above[v->nabove++] = cseq;
}

static void conv_free_all(struct cli *c)
{
    while (c->convs) {
        struct cli_conv *v = c->convs;

        c->convs = v->next;
        free(v->above);
        free(v);
    }
}

static int64_t max64(int64_t a, int64_t b)
{
    return a > b ? a : b;
}

/* ---- names --------------------------------------------------------------- */

void dur_learn_name(struct cli *c, int64_t id, const char *name)
{
    char key[24];
    cJSON *old;

    if (id <= 0 || !name)
        return;
    snprintf(key, sizeof(key), "%lld", (long long)id);
    old = cJSON_GetObjectItemCaseSensitive(c->names, key);
    if (cJSON_IsString(old) && !strcmp(old->valuestring, name))
        return;
    cJSON_DeleteItemFromObjectCaseSensitive(c->names, key);
    if (!cJSON_AddStringToObject(c->names, key, name))
        cli_oom();
}

const char *dur_name_of(struct cli *c, int64_t id)
{
    char key[24];

    snprintf(key, sizeof(key), "%lld", (long long)id);
    return cli_jstr(c->names, key);
}

/* ---- the state file ------------------------------------------------------ */

static int mkdirs(char *path) /* path is a directory; modified and restored */
{
    char *p;

    for (p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(path, 0700) < 0 && errno != EEXIST) {
            *p = '/';
            return -1;
        }
        *p = '/';
    }
    return mkdir(path, 0700) < 0 && errno != EEXIST ? -1 : 0;
}

static void state_path(struct cli *c)
{
    const char *base = getenv("XDG_STATE_HOME"), *home = getenv("HOME");
    struct sbuf b = {0};
    const char *s;

    free(c->state_path);
    c->state_path = NULL;
    if (c->no_state)
        return;
    if (base && *base == '/')
        sb_fmt(&b, "%s/chat-cli", base);
    else if (home && *home)
        sb_fmt(&b, "%s/.local/state/chat-cli", home);
    else
        return;
    sb_str(&b, "/");
    for (s = c->label; *s; s++) /* server and user name the file */
        sb_add(&b, (*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
                   (*s >= '0' && *s <= '9') || *s == '.' || *s == '-'
                       ? s : "_", 1);
    sb_fmt(&b, "-u%lld.json", (long long)c->user_id);
    c->state_path = b.data;
}

static void state_load(struct cli *c)
{
    FILE *f = c->state_path ? fopen(c->state_path, "r") : NULL;
    char *buf;
    size_t n;
    cJSON *j, *it;

    if (!f)
        return;
    buf = cli_xmalloc(STATE_MAX);
    n = fread(buf, 1, STATE_MAX, f);
    fclose(f);
    j = cJSON_ParseWithLength(buf, n);
    free(buf);
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(j, "convs")) {
        struct cli_conv *v = cJSON_IsNumber(it) && it->valuedouble > 0
                                 ? conv_get(c, it->string, 1) : NULL;

        if (v)
            conv_set_pos(c, v, (int64_t)it->valuedouble);
    }
    cJSON_Delete(j);
    c->state_dirty = 0;
}

void dur_save(struct cli *c)
{
    struct sbuf tmp = {0};
    struct cli_conv *v;
    cJSON *j, *convs;
    char *text;
    FILE *f;

    if (!c->state_path || !c->state_dirty)
        return;
    c->state_dirty = 0;
    c->state_ms = c->loop ? uv_now(c->loop) : 0;
    j = cJSON_CreateObject();
    convs = cJSON_AddObjectToObject(j, "convs");
    if (!j || !convs || !cJSON_AddNumberToObject(j, "user", (double)c->conv_user))
        cli_oom();
    for (v = c->convs; v; v = v->next)
        if (v->pos > 0 && !cJSON_AddNumberToObject(convs, v->name, (double)v->pos))
            cli_oom();
    text = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!text)
        cli_oom();
    sb_fmt(&tmp, "%s.tmp", c->state_path);
    *strrchr(tmp.data, '/') = '\0'; /* the directory, made on first use */
    if (mkdirs(tmp.data) < 0)
        fprintf(stderr, "chat-cli: %s: %s\n", tmp.data, strerror(errno));
    tmp.data[strlen(tmp.data)] = '/';
    f = fopen(tmp.data, "w");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0 ||
        rename(tmp.data, c->state_path) < 0) {
        if (f)
            remove(tmp.data);
        fprintf(stderr, "chat-cli: cannot write %s: %s\n", c->state_path,
                strerror(errno));
    }
    cJSON_free(text);
    sb_free(&tmp);
}

/* ---- the outbox ---------------------------------------------------------- */

static void out_free(struct cli_out *o)
{
    cJSON_Delete(o->req);
    free(o->cid);
    free(o);
}

static struct cli_out *out_find(struct cli *c, const char *cid)
{
    struct cli_out *o;

    for (o = c->outbox; cid && o; o = o->next)
        if (!strcmp(o->cid, cid))
            return o;
    return NULL;
}

static void out_remove(struct cli *c, struct cli_out *o)
{
    struct cli_out **pp;

    for (pp = &c->outbox; *pp; pp = &(*pp)->next)
        if (*pp == o) {
            *pp = o->next;
            out_free(o);
            return;
        }
}

const char *dur_add_cid(struct cli *c, cJSON *req, int msgid, int64_t target)
{
    struct cli_out *o, **pp;
    char cid[64];

    if (c->durable == 0 || !c->user_id)
        return NULL;
    snprintf(cid, sizeof(cid), "%s-%llu", c->cid_prefix,
             (unsigned long long)++c->cid_n);
    if (!cJSON_AddStringToObject(req, "cid", cid))
        cli_oom();
    o = calloc(1, sizeof(*o));
    if (!o || !(o->req = cJSON_Duplicate(req, 1)))
        cli_oom();
    cJSON_DeleteItemFromObjectCaseSensitive(o->req, "seq");
    o->cid = cli_xstrdup(cid);
    o->msgid = msgid;
    o->target = target;
    for (pp = &c->outbox; *pp; pp = &(*pp)->next)
        ;
    *pp = o;
    return o->cid;
}

void dur_in_flight(struct cli *c, const char *cid, int64_t seq)
{
    struct cli_out *o = out_find(c, cid);

    if (o)
        o->seq = seq > 0 ? seq : 0;
}

static void out_send(struct cli *c, struct cli_out *o)
{
    cJSON *r = cJSON_Duplicate(o->req, 1);
    struct sbuf s = {0}, h = {0};
    int64_t seq;

    if (!r || !cJSON_AddNumberToObject(r, "seq", (double)++c->seq))
        cli_oom();
    sb_fmt(&s, "event=resend %s=%lld seq=%lld", o->msgid == M_CHAT ? "to"
           : "group", (long long)o->target, (long long)c->seq);
    sb_kv(&s, "cid", o->cid);
    sb_fmt(&h, "** sending again (cid %s) to %s %lld", o->cid,
           o->msgid == M_CHAT ? "user" : "group", (long long)o->target);
    ev_info(c, s.data, h.data);
    sb_free(&s);
    sb_free(&h);
    seq = cmd_send(c, r, o->msgid, o->target, o->cid, 0);
    o->seq = seq > 0 ? seq : 0;
}

/* Send what waits: all of it after a login, else what is due. */
static void out_flush(struct cli *c, int all)
{
    struct cli_out *o;
    uint64_t now = uv_now(c->loop);

    if (!c->logged_in || !c->connected || c->relogin)
        return;
    for (o = c->outbox; o; o = o->next)
        if (!o->seq && (all || o->retry_ms <= now))
            out_send(c, o);
}

static void chat_reply(struct cli *c, struct cli_pending *p, int req,
                       const cJSON *m)
{
    struct cli_out *o = out_find(c, p->text);
    int64_t err = cli_jint(m, "errno", -1), seq = cli_jint(m, "seq", -1);
    struct cli_conv *v;

    if ((err == E_BUSY || err == E_RATE) && o) { /* not stored: again */
        struct sbuf s = {0}, h = {0};
        int64_t after = err == E_RATE ? cli_jint(m, "retry_after_ms", 0)
                                      : BUSY_RETRY_MS;

        o->seq = 0;
        o->retry_ms = uv_now(c->loop) + (uint64_t)(after > 100 ? after : 100);
        sb_fmt(&s, "event=retry req=%d seq=%lld", req, (long long)seq);
        sb_kv(&s, "cid", o->cid);
        sb_fmt(&s, " errno=%lld", (long long)err);
        sb_tail(&s, "errmsg", cli_jstr(m, "errmsg"));
        sb_fmt(&h, "!! not stored yet (error %lld: ", (long long)err);
        sb_safe(&h, cli_jstr(m, "errmsg") ? cli_jstr(m, "errmsg") : "");
        sb_fmt(&h, "); sending again in %.1f s with the same id",
               (double)(o->retry_ms - uv_now(c->loop)) / 1000);
        ev_info(c, s.data, h.data);
        sb_free(&s);
        sb_free(&h);
        return;
    }
    if (err != 0) {
        ev_error(c, req, seq, err, cli_jstr(m, "errmsg"));
        if (o)
            out_remove(c, o);
        return;
    }
    if (!o)
        return; /* the answer to an earlier try came first: said already */
    v = conv_get(c, cli_jstr(m, "conv") ? cli_jstr(m, "conv") : "", 1);
    if (v && cli_jint(m, "cseq", 0) > 0) {
        int64_t cseq = cli_jint(m, "cseq", 0);

        if (cseq > v->pos + 1 && !conv_holds(v, cseq) && !v->gap_ms)
            v->gap_ms = uv_now(c->loop);
        conv_hold(c, v, cseq);
        if (c->durable < 0)
            c->durable = 1;
    }
    ev_sent(c, p, m, o);
    out_remove(c, o);
}

/* ---- SYNC ---------------------------------------------------------------- */

static void sync_send(struct cli *c)
{
    cJSON *r, *convs;
    struct cli_conv *v;

    if (!c->logged_in || !c->connected)
        return;
    if (c->sync_inflight) {
        c->sync_again = 1;
        return;
    }
    if (!c->sync_pass) {
        c->sync_pass = 1;
        c->sync_msgs = 0;
        for (v = c->convs; v; v = v->next)
            v->changed = 0;
    }
    r = cmd_req(c, M_SYNC);
    if (!(convs = cJSON_AddArrayToObject(r, "convs")))
        cli_oom();
    for (v = c->convs; v; v = v->next) {
        cJSON *o;

        if (v->pos <= 0)
            continue;
        o = cJSON_CreateObject();
        if (!o || !cJSON_AddStringToObject(o, "conv", v->name) ||
            !cJSON_AddNumberToObject(o, "cseq", (double)v->pos) ||
            !cJSON_AddItemToArray(convs, o))
            cli_oom();
    }
    if (cmd_send(c, r, M_SYNC, 0, NULL, CLI_P_AUTO) >= 0)
        c->sync_inflight = 1;
}

static void flush_marks(struct cli *c);

/* The receipts of one conversation in a SYNC reply. */
static void sync_conv(struct cli *c, const cJSON *h)
{
    struct cli_conv *v = conv_get(c, cli_jstr(h, "conv") ? cli_jstr(h, "conv")
                                                         : "", 1);
    int64_t pd, pr;

    if (!v)
        return;
    v->head = max64(v->head, cli_jint(h, "head", 0));
    if (cli_jint(h, "read", 0) > v->read ||
        cli_jint(h, "delivered", 0) > v->delivered)
        v->changed = 1; /* marked on another device */
    v->delivered = max64(v->delivered, cli_jint(h, "delivered", 0));
    v->read = max64(v->read, cli_jint(h, "read", 0));
    v->delivered = max64(v->delivered, v->read);
    pd = max64(v->peer_delivered, cli_jint(h, "peer_delivered", 0));
    pr = max64(v->peer_read, cli_jint(h, "peer_read", 0));
    if (pd != v->peer_delivered || pr != v->peer_read)
        v->changed = 1;
    v->peer_delivered = max64(pd, pr);
    v->peer_read = pr;
}

static void sync_done(struct cli *c, const cJSON *m)
{
    const cJSON *h;
    struct cli_conv *v;
    struct sbuf s = {0}, u = {0};
    int n = 0;

    cJSON_ArrayForEach(h, cJSON_GetObjectItemCaseSensitive(m, "convs")) {
        v = conv_get(c, cli_jstr(h, "conv") ? cli_jstr(h, "conv") : "", 0);
        if (v) {
            conv_set_pos(c, v, cli_jint(h, "head", 0));
            v->gap_ms = 0;
        }
    }
    for (v = c->convs; v; v = v->next)
        if (v->changed) {
            ev_conv(c, v, "sync");
            n++;
        }
    sb_fmt(&s, "event=sync ok msgs=%d convs=%d", c->sync_msgs, n);
    if (c->sync_msgs)
        sb_fmt(&u, "** synced: %d new message%s", c->sync_msgs,
               c->sync_msgs == 1 ? "" : "s");
    ev_info(c, s.data, u.len ? u.data : NULL);
    sb_free(&s);
    sb_free(&u);
    c->sync_pass = 0;
    c->state_dirty = 1;
    dur_save(c);
    flush_marks(c);
    if (c->sync_again) {
        c->sync_again = 0;
        sync_send(c);
    }
}

static void sync_reply(struct cli *c, const cJSON *m)
{
    int64_t err = cli_jint(m, "errno", -1);
    const cJSON *it;

    c->sync_inflight = 0;
    if (err == E_NO_HANDLER) {
        c->sync_pass = 0;
        if (c->durable != 0) {
            struct sbuf s = {0};

            c->durable = 0;
            sb_fmt(&s, "event=durable off errno=%lld", (long long)err);
            sb_tail(&s, "errmsg", cli_jstr(m, "errmsg"));
            ev_info(c, s.data, "** this server keeps no message store: "
                    "messages are sent without ids, no sync or history");
            sb_free(&s);
        }
        return;
    }
    if (err != 0) {
        c->sync_pass = 0;
        ev_error(c, M_SYNC, cli_jint(m, "seq", -1), err, cli_jstr(m, "errmsg"));
        if (err != 104 && err != 106 && err != 107)
            c->sync_retry_ms = uv_now(c->loop) + SYNC_RETRY_MS;
        return;
    }
    c->durable = 1;
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(m, "msgs")) {
        struct cli_conv *v = conv_get(c, cli_jstr(it, "conv") ?
                                      cli_jstr(it, "conv") : "", 1);
        int64_t cseq = cli_jint(it, "cseq", 0);

        if (!v || cseq <= 0)
            continue;
        dur_learn_name(c, cli_jint(it, "id", 0), cli_jstr(it, "name"));
        if (!conv_holds(v, cseq)) {
            if (!c->sync_msgs && !c->script)
                ev_info(c, NULL, "** while you were away:");
            c->sync_msgs++;
            ev_durable(c, it, EV_SYNC);
            dur_shown(c, it);
        }
        v->head = max64(v->head, cseq);
        conv_set_pos(c, v, cseq); /* a reply's run is contiguous */
    }
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(m, "convs"))
        sync_conv(c, it);
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(m, "more")))
        sync_send(c);
    else
        sync_done(c, m);
}

/* ---- read markers -------------------------------------------------------- */

static int mark_send(struct cli *c, struct cli_conv *v, int64_t upto, int read,
                     int flags)
{
    cJSON *r = cmd_req(c, M_READ);

    if (!cJSON_AddStringToObject(r, "conv", v->name) ||
        !cJSON_AddNumberToObject(r, read ? "read" : "delivered", (double)upto))
        cli_oom();
    if (cmd_send(c, r, M_READ, upto, v->name, flags) < 0)
        return -1;
    v->mark_inflight = 1;
    v->mark_sent = max64(v->mark_sent, upto);
    return 0;
}

/* Mark what was shown: up to the newest message of someone else shown,
 * but not past a gap still open below it. */
static void flush_marks(struct cli *c)
{
    struct cli_conv *v;

    if (!c->logged_in || !c->connected || c->sync_pass || c->durable == 0)
        return;
    for (v = c->convs; v; v = v->next) {
        int64_t upto = v->shown < v->pos ? v->shown : v->pos;
        int64_t have = c->auto_read ? v->read : v->delivered;

        if (upto > have && upto > v->mark_sent && !v->mark_inflight)
            mark_send(c, v, upto, c->auto_read, CLI_P_AUTO);
    }
}

static void read_reply(struct cli *c, const struct cli_pending *p,
                       const cJSON *m)
{
    struct cli_conv *v = p->text ? conv_get(c, p->text, 0) : NULL;
    int64_t err = cli_jint(m, "errno", -1);
    struct sbuf s = {0}, h = {0};

    if (v)
        v->mark_inflight = 0;
    if (err != 0) {
        ev_error(c, M_READ, cli_jint(m, "seq", -1), err, cli_jstr(m, "errmsg"));
        return;
    }
    if (v) {
        v->delivered = max64(v->delivered, cli_jint(m, "delivered", 0));
        v->read = max64(v->read, cli_jint(m, "read", 0));
    }
    if (!(p->flags & CLI_P_AUTO)) {
        sb_str(&s, "event=marked ok");
        sb_kv(&s, "conv", p->text);
        sb_fmt(&s, " delivered=%lld read=%lld",
               (long long)cli_jint(m, "delivered", 0),
               (long long)cli_jint(m, "read", 0));
        sb_fmt(&h, "** %s marked read up to #%lld", p->text ? p->text : "",
               (long long)cli_jint(m, "read", 0));
        ev_info(c, s.data, h.data);
    }
    sb_free(&s);
    sb_free(&h);
    flush_marks(c);
}

int dur_read_cmd(struct cli *c, const char *conv)
{
    struct cli_conv *v;
    int sent = 0;

    for (v = c->convs; v; v = v->next) {
        int64_t upto = max64(v->head, v->pos);

        if (conv ? strcmp(conv, v->name) != 0 : upto <= v->read)
            continue;
        if (upto > 0 && mark_send(c, v, upto, 1, 0) == 0)
            sent++;
    }
    if (!sent && c->connected) {
        struct sbuf s = {0}, h = {0};

        sb_str(&s, "event=marked none");
        if (conv)
            sb_kv(&s, "conv", conv);
        sb_fmt(&h, "** nothing to mark read%s%s", conv ? " in " : "",
               conv ? conv : "");
        ev_info(c, s.data, h.data);
        sb_free(&s);
        sb_free(&h);
    }
    return sent > 0;
}

void dur_receipt(struct cli *c, const cJSON *m)
{
    const char *name = cli_jstr(m, "conv");
    struct cli_conv *v = name ? conv_get(c, name, name[0] == 'p') : NULL;
    int64_t from = cli_jint(m, "id", 0);
    int64_t d = cli_jint(m, "delivered", 0), r = cli_jint(m, "read", 0);

    if (v && from == c->user_id) { /* this user, on another device */
        v->read = max64(v->read, r);
        v->delivered = max64(v->delivered, max64(d, r));
    } else if (v && v->name[0] == 'p') { /* a group's are shown, not kept */
        v->peer_read = max64(v->peer_read, r);
        v->peer_delivered = max64(v->peer_delivered, max64(d, r));
    }
    ev_receipt(c, name ? name : "", from, d, r, "live");
}

/* ---- live messages ------------------------------------------------------- */

int dur_live(struct cli *c, const cJSON *m)
{
    const char *name = cli_jstr(m, "conv");
    int64_t cseq = cli_jint(m, "cseq", 0);
    struct cli_conv *v = name && cseq > 0 ? conv_get(c, name, 1) : NULL;
    int gap;

    if (!v)
        return 1;
    if (conv_holds(v, cseq))
        return 0;
    gap = cseq > v->pos + 1;
    conv_hold(c, v, cseq);
    if (gap)
        sync_send(c); /* fill what was skipped */
    return 1;
}

void dur_shown(struct cli *c, const cJSON *m)
{
    const char *name = cli_jstr(m, "conv");
    struct cli_conv *v = name ? conv_get(c, name, 0) : NULL;

    dur_learn_name(c, cli_jint(m, "id", 0), cli_jstr(m, "name"));
    if (!v || cli_jint(m, "id", 0) == c->user_id)
        return;
    v->shown = max64(v->shown, cli_jint(m, "cseq", 0));
    flush_marks(c);
}

/* "7" (a user), "g5" or "#5" (a group), "pA:B" (a conversation). */
int dur_conv_name(struct cli *c, const char *arg, char *out, size_t n)
{
    char *end;
    long long id;

    if (!arg || !*arg)
        return -1;
    if (arg[0] == 'p' && conv_valid(arg)) {
        snprintf(out, n, "%s", arg);
        return 0;
    }
    if (arg[0] == 'g' || arg[0] == '#') {
        id = strtoll(arg + 1, &end, 10);
        if (*end || end == arg + 1 || id <= 0)
            return -1;
        snprintf(out, n, "g%lld", id);
        return 0;
    }
    id = strtoll(arg, &end, 10);
    if (*end || id <= 0 || !c->user_id)
        return -1;
    snprintf(out, n, "p%lld:%lld", (long long)(id < c->user_id ? id : c->user_id),
             (long long)(id < c->user_id ? c->user_id : id));
    return 0;
}

void dur_list(struct cli *c)
{
    struct cli_conv *v;
    struct sbuf s = {0}, h = {0};
    int n = 0;

    if (!c->script)
        ev_info(c, NULL, c->convs ? "** conversations:"
                                  : "** no conversations seen yet");
    for (v = c->convs; v; v = v->next, n++)
        ev_conv(c, v, NULL);
    sb_fmt(&s, "event=convs count=%d", n);
    if (c->durable == 0)
        sb_str(&h, "** (this server keeps no messages: nothing is numbered)");
    ev_info(c, s.data, h.len ? h.data : NULL);
    sb_free(&s);
    sb_free(&h);
}

/* ---- replies, losses, the tick, login ------------------------------------ */

int dur_on_reply(struct cli *c, struct cli_pending *p, int req, const cJSON *m)
{
    if (!p) /* a late answer to a durable message sent again meanwhile: the
               answer to the repeat is the one shown */
        return (req == M_CHAT || req == M_GROUP_CHAT) && cli_jstr(m, "conv");
    switch (p->msgid) {
    case M_CHAT:
    case M_GROUP_CHAT:
        if (!p->text)
            return 0; /* a plain message: event.c */
        chat_reply(c, p, req, m);
        return 1;
    case M_SYNC: sync_reply(c, m); return 1;
    case M_HISTORY: dur_history_reply(c, m); return 1;
    case M_READ: read_reply(c, p, m); return 1;
    default: return 0;
    }
}

void dur_pending_lost(struct cli *c, const struct cli_pending *p)
{
    struct cli_conv *v;
    struct cli_out *o;

    switch (p->msgid) {
    case M_CHAT:
    case M_GROUP_CHAT:
        if ((o = out_find(c, p->text)) && o->seq == p->seq) {
            o->seq = 0; /* again after the re-login, or on the next tick */
            o->retry_ms = uv_now(c->loop);
        }
        break;
    case M_SYNC:
        c->sync_inflight = 0;
        c->sync_pass = 0;
        if (c->connected)
            c->sync_retry_ms = uv_now(c->loop);
        break;
    case M_HISTORY:
        dur_history_free(c);
        break;
    case M_READ:
        if ((v = conv_get(c, p->text ? p->text : "", 0))) {
            v->mark_inflight = 0;
            v->mark_sent = c->auto_read ? v->read : v->delivered;
        }
        break;
    }
}

void dur_tick(struct cli *c)
{
    uint64_t now = uv_now(c->loop);
    struct cli_conv *v;

    out_flush(c, 0);
    if (c->sync_retry_ms && now >= c->sync_retry_ms && c->logged_in) {
        c->sync_retry_ms = 0;
        sync_send(c);
    }
    for (v = c->convs; v; v = v->next)
        if (v->gap_ms && now - v->gap_ms >= GAP_WAIT_MS) {
            v->gap_ms = 0;
            if (v->nabove)
                sync_send(c); /* the message below an own one never came */
        }
    if (c->state_dirty && !c->sync_pass && now - c->state_ms >= STATE_EVERY_MS)
        dur_save(c);
}

/* Forget every message still waiting for its ACK (another user, or exit). */
static void outbox_free(struct cli *c)
{
    while (c->outbox) {
        struct cli_out *o = c->outbox;

        c->outbox = o->next;
        out_free(o);
    }
}

void dur_logged_in(struct cli *c)
{
    if (c->conv_user != c->user_id) { /* another user: start afresh */
        dur_save(c);
        conv_free_all(c);
        outbox_free(c);
        c->conv_user = c->user_id;
        state_path(c);
        state_load(c);
    }
    c->sync_inflight = c->sync_again = c->sync_pass = 0;
    c->sync_retry_ms = 0;
    sync_send(c);
    out_flush(c, 1);
}

void dur_logged_out(struct cli *c)
{
    dur_save(c);
    c->sync_pass = c->sync_again = 0;
    c->sync_retry_ms = 0;
}

void dur_init(struct cli *c)
{
    unsigned char r[8];
    size_t i;

    c->durable = -1;
    c->auto_read = 1;
    c->names = cJSON_CreateObject();
    if (!c->names)
        cli_oom();
    if (uv_random(NULL, NULL, r, sizeof(r), 0, NULL) < 0)
        for (i = 0; i < sizeof(r); i++)
            r[i] = (unsigned char)rand();
    for (i = 0; i < sizeof(r); i++)
        snprintf(c->cid_prefix + 2 * i, 3, "%02x", r[i]);
}

void dur_free(struct cli *c)
{
    dur_save(c);
    conv_free_all(c);
    outbox_free(c);
    dur_history_free(c);
    free(c->state_path);
    c->state_path = NULL;
    cJSON_Delete(c->names);
    c->names = NULL;
}
