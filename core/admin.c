/*
 * admin.c - the admin listener: a small HTTP/1.1 endpoint for operators
 * (Prometheus scrapes, health checks, and admin actions).
 *
 * It sits at the top of the core, next to main.c: it calls down into net,
 * bus, db, plugin and metrics, and nothing below calls it (kicks and notices
 * from other nodes reach it through the callback it gives bus_on_core()).
 *
 * HTTP.  Requests are parsed by http-parser (libhttp-parser-dev) through
 * admin_http.c (the glue and the routing, without I/O); this file reads
 * and writes them on the loop.  One request per connection: every
 * answer carries "Connection: close" and the connection is shut down once
 * the answer is written; bytes after the first request (pipelining) are
 * never read.  Bounds: the request line and headers 8 KiB (431), the URL
 * 2 KiB (414), a body 64 KiB (413) (admin_http.c checks those), the whole
 * request must arrive within ADM_READ_MS of the connect (408, then close:
 * a slowloris client holds a slot 5 s at most), ADM_CONNS_MAX connections at
 * once (more are closed at accept).  Only GET, HEAD and POST are routed.
 *
 * Authentication.  The endpoints that change something (POST) need
 * "Authorization: Bearer <[admin] token>": no header 401, a wrong token
 * 403, and with no token configured they always answer 403.  The token is
 * read from the config in force, so a reload changes it; the listen
 * address is bound once at start.
 *
 * Cluster-wide actions.  Kicks and notices are broadcast on the bus as
 * BUS_CORE messages (one JSON object each); every node, this one included,
 * applies them to its own sessions.  Presence asks the bus.  Reload and
 * drain act on this process only (with -w K, each worker has its own admin
 * port: [admin] listen's port + worker number).
 *
 * Drain.  Stop accepting, send every protocol-2 session NOTICE 119 (the
 * connection stays open so the client can reconnect elsewhere first), then
 * close the sessions that are left evenly over N seconds, legacy ones
 * first; /readyz answers 503 from then on.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cJSON.h>
#include <http_parser.h>

#include "core.h"

#define ADM_READ_MS 5000      /* the whole request, from the connect */
#define ADM_REPLY_MS 30000    /* an answer that waits (presence, reload) */
#define ADM_WRITE_MS 5000     /* writing the answer */
#define ADM_CONNS_MAX 64
#define ADM_PAGE_DEF 100
#define ADM_PAGE_MAX 1000
#define ADM_NOTICE_MAX 4096   /* bytes of notice text */
#define ADM_DRAIN_DEF 30
#define ADM_DRAIN_MAX 3600
#define ADM_LAG_EVERY_MS 500

/* ---- connections -------------------------------------------------------- */

struct adm_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wreq;
    uv_shutdown_t sreq;
    struct adm_req req;
    struct adm_conn *prev, *next;
    int refs;          /* 1 for the handles + 1 per answer being waited for */
    int open_handles;
    unsigned closing : 1, answered : 1, waiting : 1;
    char *out;
};

static struct {
    uv_loop_t *loop;
    uv_tcp_t listener;
    int listening;
    uv_timer_t lag_timer;
    uint64_t lag_due_ns;
    double lag_ms;          /* the last measured lag, ms */
    struct adm_conn *conns;
    int nconns;
    /* drain */
    int draining;
    uv_timer_t drain_timer;
    uint64_t drain_start, drain_ms;
    uint64_t *drain_ids;
    size_t drain_n, drain_next;
    char rbuf[16384];
} adm;

static void conn_unref(struct adm_conn *c)
{
    if (--c->refs > 0)
        return;
    adm_req_free(&c->req);
    mem_free(c->out);
    mem_free(c);
}

static void on_conn_closed(uv_handle_t *h)
{
    struct adm_conn *c = h->data;
    if (--c->open_handles == 0)
        conn_unref(c);
}

static void conn_close(struct adm_conn *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    if (c->prev)
        c->prev->next = c->next;
    else
        adm.conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    adm.nconns--;
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
    uv_close((uv_handle_t *)&c->timer, on_conn_closed);
}

static void on_shut(uv_shutdown_t *req, int status)
{
    (void)status;
    conn_close(req->data);
}

static void on_written(uv_write_t *req, int status)
{
    struct adm_conn *c = req->data;
    if (status < 0 || c->closing ||
        uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shut) != 0)
        conn_close(c);
}

static void on_timer(uv_timer_t *t);

/* Send the answer (body mem_malloc'd or NULL; taken) and close. */
static void respond(struct adm_conn *c, int status, const char *ctype,
                    char *body, size_t blen, const char *extra)
{
    char head[512];
    int hl;
    uv_buf_t b;

    if (c->closing || c->answered) {
        mem_free(body);
        return;
    }
    c->answered = 1;
    c->waiting = 0;
    hl = snprintf(head, sizeof head,
                  "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                  "Cache-Control: no-store\r\nConnection: close\r\n%s\r\n",
                  status, http_status_str((enum http_status)status), ctype, blen,
                  extra ? extra : "");
    if (c->req.method == HTTP_HEAD)
        blen = 0;
    if (hl < 0 || (size_t)hl >= sizeof head ||
        !(c->out = mem_malloc((size_t)hl + blen))) {
        mem_free(body);
        conn_close(c);
        return;
    }
    memcpy(c->out, head, (size_t)hl);
    if (blen)
        memcpy(c->out + hl, body, blen);
    mem_free(body);
    b = uv_buf_init(c->out, (unsigned)((size_t)hl + blen));
    c->wreq.data = c;
    c->sreq.data = c;
    uv_timer_start(&c->timer, on_timer, ADM_WRITE_MS, 0);
    if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0)
        conn_close(c);
}

/* Answer with a JSON object (deleted here). */
static void respond_json(struct adm_conn *c, int status, cJSON *o,
                         const char *extra)
{
    char *txt = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!txt) {
        respond(c, 500, "text/plain", NULL, 0, NULL);
        return;
    }
    /* cJSON's buffer is from mem_malloc (mem_init routes it) */
    size_t n = strlen(txt);
    txt[n] = '\n';
    respond(c, status, "application/json", txt, n + 1, extra);
}

static void respond_error(struct adm_conn *c, int status, const char *why,
                          const char *extra)
{
    cJSON *o = cJSON_CreateObject();
    if (o)
        cJSON_AddStringToObject(o, "error", why);
    respond_json(c, status, o, extra);
}

static void on_timer(uv_timer_t *t)
{
    struct adm_conn *c = t->data;
    if (c->answered) {
        conn_close(c); /* the client does not read its answer */
        return;
    }
    uv_read_stop((uv_stream_t *)&c->tcp);
    if (c->waiting)
        respond_error(c, 504, "timed out waiting for the answer", NULL);
    else
        respond_error(c, 408, "request not complete in time", NULL);
}

/* ---- endpoints ---------------------------------------------------------- */

static void ep_metrics(struct adm_conn *c)
{
    size_t n = 0;
    char *txt = metrics_render(&n);
    if (!txt) {
        respond_error(c, 500, "out of memory", NULL);
        return;
    }
    respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", txt, n, NULL);
}

static void ep_healthz(struct adm_conn *c)
{
    cJSON *o = cJSON_CreateObject();
    if (o) {
        cJSON_AddStringToObject(o, "status", "ok");
        cJSON_AddNumberToObject(o, "loop_lag_ms", adm.lag_ms);
    }
    respond_json(c, 200, o, NULL);
}

static void ep_readyz(struct adm_conn *c)
{
    const struct conf *cf = plug_current_conf();
    cJSON *o = cJSON_CreateObject(), *ch = cJSON_CreateObject(),
          *failed = cJSON_CreateArray();
    int up = db_conns_up();
    const char *my = up < 0 ? "off" : up > 0 ? "ok" : "down";
    const char *rd = !bus_configured() ? "off" : bus_connected() ? "ok" : "down";
    int plugs = cf && plug_active() == cf->nplugins;

    if (!o || !ch || !failed) {
        cJSON_Delete(ch);
        cJSON_Delete(failed);
        respond_json(c, 500, o, NULL);
        return;
    }
    cJSON_AddStringToObject(ch, "mysql", my);
    cJSON_AddStringToObject(ch, "redis", rd);
    cJSON_AddStringToObject(ch, "plugins", plugs ? "ok" : "not loaded");
    cJSON_AddStringToObject(ch, "draining", adm.draining ? "yes" : "no");
    if (up == 0)
        cJSON_AddItemToArray(failed, cJSON_CreateString("mysql"));
    if (rd[0] == 'd')
        cJSON_AddItemToArray(failed, cJSON_CreateString("redis"));
    if (!plugs)
        cJSON_AddItemToArray(failed, cJSON_CreateString("plugins"));
    if (adm.draining)
        cJSON_AddItemToArray(failed, cJSON_CreateString("draining"));
    cJSON_AddStringToObject(o, "status",
                            cJSON_GetArraySize(failed) ? "not ready" : "ready");
    cJSON_AddItemToObject(o, "checks", ch);
    cJSON_AddItemToObject(o, "failed", failed);
    respond_json(c, cJSON_GetArraySize(failed) ? 503 : 200, o, NULL);
}

static cJSON *session_json(const struct chat_session *s, uint64_t now)
{
    cJSON *o = cJSON_CreateObject();
    int64_t uid = net_session_user(s);
    if (!o)
        return NULL;
    cJSON_AddNumberToObject(o, "id", (double)net_session_id(s));
    cJSON_AddStringToObject(o, "peer", net_session_peer(s));
    if (uid) {
        cJSON_AddNumberToObject(o, "user", (double)uid);
        cJSON_AddStringToObject(o, "name", net_session_name(s));
    } else {
        cJSON_AddNullToObject(o, "user");
        cJSON_AddNullToObject(o, "name");
    }
    cJSON_AddNumberToObject(o, "proto", net_session_proto(s));
    cJSON_AddStringToObject(o, "transport", "tcp");
    cJSON_AddNumberToObject(o, "connected_s",
                            (double)(now - net_session_connected_at(s)) / 1000.0);
    return o;
}

static void ep_sessions(struct adm_conn *c, const struct adm_route *rt)
{
    int64_t off = 0, lim = ADM_PAGE_DEF;
    uint64_t now = uv_now(adm.loop);
    cJSON *o, *arr;
    int64_t i = 0;

    if (adm_query_int(rt->query, rt->qlen, "offset", 0, INT64_MAX, &off) < 0 ||
        adm_query_int(rt->query, rt->qlen, "limit", 0, INT64_MAX, &lim) < 0) {
        respond_error(c, 400, "offset and limit are non-negative integers", NULL);
        return;
    }
    if (lim > ADM_PAGE_MAX)
        lim = ADM_PAGE_MAX;
    o = cJSON_CreateObject();
    arr = cJSON_AddArrayToObject(o, "sessions");
    if (!arr) {
        respond_json(c, 500, o, NULL);
        return;
    }
    for (const struct chat_session *s = net_session_next(NULL); s;
         s = net_session_next(s), i++)
        if (i >= off && i - off < lim)
            cJSON_AddItemToArray(arr, session_json(s, now));
    cJSON_AddNumberToObject(o, "total", (double)i);
    cJSON_AddNumberToObject(o, "offset", (double)off);
    cJSON_AddNumberToObject(o, "limit", (double)lim);
    respond_json(c, 200, o, NULL);
}

/* An answer that waits: the connection stays alive until cb runs. */
static void wait_begin(struct adm_conn *c)
{
    c->waiting = 1;
    c->refs++;
    uv_timer_start(&c->timer, on_timer, ADM_REPLY_MS, 0);
}

/* 1 when the connection is still there to answer; drops the wait's ref
 * otherwise. */
static int wait_end(struct adm_conn *c)
{
    if (c->closing || c->answered) {
        conn_unref(c);
        return 0;
    }
    c->refs--; /* the handles' ref keeps it */
    return 1;
}

static void on_presence(int status, const int64_t *uids,
                        const unsigned char *online, size_t n, void *ud)
{
    struct adm_conn *c = ud;
    cJSON *o;
    if (!wait_end(c))
        return;
    if (status != CHAT_OK || n != 1) {
        respond_error(c, 503, "presence query failed", NULL);
        return;
    }
    o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "user", (double)uids[0]);
    cJSON_AddBoolToObject(o, "online", online[0]);
    cJSON_AddBoolToObject(o, "here", net_session_by_user(uids[0]) != NULL);
    cJSON_AddStringToObject(o, "node", bus_node_id());
    respond_json(c, 200, o, NULL);
}

static void ep_presence(struct adm_conn *c, int64_t uid)
{
    wait_begin(c);
    if (bus_presence_query(NULL, &uid, 1, on_presence, c) != CHAT_OK) {
        wait_end(c);
        respond_error(c, 503, "the bus is not running", NULL);
    }
}

/* Publish a BUS_CORE action (o deleted here). */
static int core_broadcast(cJSON *o)
{
    char *txt = o ? cJSON_PrintUnformatted(o) : NULL;
    int rc;
    cJSON_Delete(o);
    if (!txt)
        return CHAT_ERR_NOMEM;
    rc = bus_broadcast(BUS_CORE, txt, strlen(txt));
    mem_free(txt);
    return rc;
}

/* Body {"text": ...} (optional when dflt is set): the text, or NULL with
 * the error answered. */
static const char *body_text(struct adm_conn *c, cJSON **doc, const char *dflt)
{
    const cJSON *t;
    *doc = NULL;
    if (!c->req.body_len) {
        if (!dflt)
            respond_error(c, 400, "a JSON body with \"text\" is required", NULL);
        return dflt;
    }
    *doc = cJSON_ParseWithLength(c->req.body, c->req.body_len);
    if (!cJSON_IsObject(*doc)) {
        respond_error(c, 400, "the body is not a JSON object", NULL);
        return NULL;
    }
    t = cJSON_GetObjectItemCaseSensitive(*doc, "text");
    if (!t && dflt)
        return dflt;
    if (!cJSON_IsString(t) || !t->valuestring[0] ||
        strlen(t->valuestring) > ADM_NOTICE_MAX) {
        respond_error(c, 400, "\"text\" must be a non-empty string of at most "
                              "4096 bytes", NULL);
        return NULL;
    }
    return t->valuestring;
}

struct kick_job {
    struct adm_conn *c;
    char *text;
};

static void on_kick_presence(int status, const int64_t *uids,
                             const unsigned char *online, size_t n, void *ud)
{
    struct kick_job *k = ud;
    struct adm_conn *c = k->c;
    cJSON *msg = cJSON_CreateObject(), *o;
    int rc;

    cJSON_AddStringToObject(msg, "op", "kick");
    cJSON_AddNumberToObject(msg, "user", (double)uids[0]);
    cJSON_AddStringToObject(msg, "text", k->text);
    rc = core_broadcast(msg); /* even when offline: a login may be racing */
    mem_free(k->text);
    mem_free(k);
    if (!wait_end(c))
        return;
    if (rc != CHAT_OK) {
        respond_error(c, 503, "the bus refused the kick", NULL);
        return;
    }
    o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "user", (double)uids[0]);
    cJSON_AddBoolToObject(o, "was_online", status == CHAT_OK && n == 1 && online[0]);
    cJSON_AddBoolToObject(o, "kicked", 1);
    respond_json(c, 200, o, NULL);
}

static void ep_kick(struct adm_conn *c, int64_t uid)
{
    cJSON *doc;
    const char *text = body_text(c, &doc, "closed by an operator");
    struct kick_job *k;

    if (!text) {
        cJSON_Delete(doc);
        return;
    }
    k = mem_calloc(1, sizeof *k);
    if (!k || !(k->text = mem_strdup(text))) {
        mem_free(k);
        cJSON_Delete(doc);
        respond_error(c, 500, "out of memory", NULL);
        return;
    }
    cJSON_Delete(doc);
    k->c = c;
    wait_begin(c);
    if (bus_presence_query(NULL, &uid, 1, on_kick_presence, k) != CHAT_OK) {
        mem_free(k->text);
        mem_free(k);
        wait_end(c);
        respond_error(c, 503, "the bus is not running", NULL);
    }
}

struct notice_job {
    struct adm_conn *c;
    int64_t group;
    char *text;
};

static void notice_answer(struct adm_conn *c, int rc, int64_t group, long members)
{
    cJSON *o;
    if (rc != CHAT_OK) {
        respond_error(c, 503, "the bus refused the notice", NULL);
        return;
    }
    o = cJSON_CreateObject();
    cJSON_AddBoolToObject(o, "sent", 1);
    if (group) {
        cJSON_AddNumberToObject(o, "group", (double)group);
        cJSON_AddNumberToObject(o, "members", (double)members);
    } else
        cJSON_AddStringToObject(o, "to", "all");
    respond_json(c, 200, o, NULL);
}

static void on_members(const struct chat_db_result *r, void *ud)
{
    struct notice_job *j = ud;
    struct adm_conn *c = j->c;
    cJSON *msg, *users;
    size_t n = db_error(r) ? 0 : db_nrows(r);
    int rc = CHAT_ERR_NOMEM, err = db_error(r);

    if (!err && n > 0) {
        msg = cJSON_CreateObject();
        cJSON_AddStringToObject(msg, "op", "notice");
        cJSON_AddStringToObject(msg, "text", j->text);
        users = cJSON_AddArrayToObject(msg, "users");
        for (size_t i = 0; users && i < n; i++)
            cJSON_AddItemToArray(users, cJSON_CreateNumber((double)db_int(r, i, 0)));
        rc = core_broadcast(msg);
    }
    if (wait_end(c)) {
        if (err)
            respond_error(c, 503, db_errmsg(r), NULL);
        else if (n == 0)
            respond_error(c, 404, "no such group", NULL);
        else
            notice_answer(c, rc, j->group, (long)n);
    }
    mem_free(j->text);
    mem_free(j);
}

static void ep_notice(struct adm_conn *c)
{
    cJSON *doc, *msg;
    const char *text = body_text(c, &doc, NULL);
    const cJSON *g;
    struct notice_job *j;
    struct chat_db_param p;

    if (!text) {
        cJSON_Delete(doc);
        return;
    }
    g = cJSON_GetObjectItemCaseSensitive(doc, "group");
    if (!g || cJSON_IsNull(g)) {
        msg = cJSON_CreateObject();
        cJSON_AddStringToObject(msg, "op", "notice");
        cJSON_AddStringToObject(msg, "text", text);
        cJSON_Delete(doc);
        notice_answer(c, core_broadcast(msg), 0, 0);
        return;
    }
    if (!cJSON_IsNumber(g) || g->valuedouble < 1 || g->valuedouble > 9e15 ||
        g->valuedouble != (double)(int64_t)g->valuedouble) {
        cJSON_Delete(doc);
        respond_error(c, 400, "\"group\" must be a positive integer", NULL);
        return;
    }
    j = mem_calloc(1, sizeof *j);
    if (!j || !(j->text = mem_strdup(text))) {
        mem_free(j);
        cJSON_Delete(doc);
        respond_error(c, 500, "out of memory", NULL);
        return;
    }
    j->c = c;
    j->group = (int64_t)g->valuedouble;
    cJSON_Delete(doc);
    p = CHAT_DB_P_INT(j->group);
    wait_begin(c);
    if (db_query(NULL, "SELECT user_id FROM group_members WHERE group_id = ?", &p,
                 1, on_members, j) != CHAT_OK) {
        mem_free(j->text);
        mem_free(j);
        wait_end(c);
        respond_error(c, 503, "the database is not available", NULL);
    }
}

static void on_reloaded(int ok, const char *msg, void *ud)
{
    struct adm_conn *c = ud;
    cJSON *o;
    sdn_reload_result(ok, msg, plug_active()); /* systemd sees it as SIGHUP's */
    net_reload_tls(plug_current_conf());          /* as SIGHUP does (main.c) */
    if (!wait_end(c))
        return;
    o = cJSON_CreateObject();
    cJSON_AddBoolToObject(o, "ok", ok);
    cJSON_AddStringToObject(o, "result", msg);
    respond_json(c, ok ? 200 : 500, o, NULL);
}

static void ep_reload(struct adm_conn *c)
{
    wait_begin(c);
    sdn_reloading();
    if (plug_reload_ex(on_reloaded, c) != CHAT_OK) {
        sdn_reloaded("reload failed: out of memory; nothing changed");
        wait_end(c);
        respond_error(c, 500, "out of memory", NULL);
    }
}

/* ---- drain -------------------------------------------------------------- */

static void drain_close_upto(size_t upto)
{
    for (; adm.drain_next < upto && adm.drain_next < adm.drain_n; adm.drain_next++) {
        struct chat_session *s = net_session_get(adm.drain_ids[adm.drain_next]);
        if (s && !net_session_closing(s))
            net_close(s, 0, NULL); /* protocol 2 had its notice already */
    }
}

static void on_drain_tick(uv_timer_t *t)
{
    uint64_t el = uv_now(t->loop) - adm.drain_start;
    size_t upto = adm.drain_ms == 0 || el >= adm.drain_ms
                      ? adm.drain_n
                      : (size_t)((double)adm.drain_n * (double)el / (double)adm.drain_ms);
    drain_close_upto(upto);
    if (adm.drain_next >= adm.drain_n) {
        uv_timer_stop(t);
        mem_free(adm.drain_ids);
        adm.drain_ids = NULL;
        LOGI("admin: drain done; %zu sessions left", net_session_count());
    }
}

static const char drain_notice[] =
    "{\"msgid\":12,\"errno\":119,\"errmsg\":\"draining, reconnect elsewhere\"}";

/* Legacy sessions first (they get no notice), protocol 2 last, to leave
 * those clients the most time to move on their own. */
static size_t drain_collect(void)
{
    size_t n = 0, cap = net_session_count() + 1;
    if (!(adm.drain_ids = mem_calloc(cap, sizeof *adm.drain_ids)))
        return 0;
    for (int pass = 0; pass < 2; pass++)
        for (struct chat_session *s = net_session_next(NULL); s && n < cap;
             s = net_session_next(s)) {
            int p2 = net_session_proto(s) == CHAT_PROTO_2;
            if (p2 != pass)
                continue;
            adm.drain_ids[n++] = net_session_id(s);
            if (p2)
                net_send(s, drain_notice, sizeof drain_notice - 1);
        }
    return n;
}

static void ep_drain(struct adm_conn *c, const struct adm_route *rt)
{
    int64_t secs = ADM_DRAIN_DEF;
    cJSON *o;

    if (adm_query_int(rt->query, rt->qlen, "seconds", 0, ADM_DRAIN_MAX, &secs) < 0) {
        respond_error(c, 400, "seconds must be an integer in 0..3600", NULL);
        return;
    }
    if (adm.draining) {
        respond_error(c, 409, "already draining", NULL);
        return;
    }
    adm.draining = 1;
    net_stop_accepting();
    adm.drain_n = drain_collect();
    adm.drain_next = 0;
    adm.drain_start = uv_now(adm.loop);
    adm.drain_ms = (uint64_t)secs * 1000;
    LOGI("admin: draining: stopped accepting; closing %zu sessions over %" PRId64 " s",
         adm.drain_n, secs);
    uv_timer_start(&adm.drain_timer, on_drain_tick, secs ? 100 : 0, 100);
    o = cJSON_CreateObject();
    cJSON_AddBoolToObject(o, "draining", 1);
    cJSON_AddNumberToObject(o, "seconds", (double)secs);
    cJSON_AddNumberToObject(o, "sessions", (double)adm.drain_n);
    respond_json(c, 202, o, NULL);
}

/* ---- what every node does with BUS_CORE messages ------------------------ */

static void notice_send(struct chat_session *s, const char *txt, size_t n)
{
    if (s && !net_session_closing(s) && net_session_proto(s) == CHAT_PROTO_2)
        net_send(s, txt, n);
}

static void apply_notice(const cJSON *msg, const char *text)
{
    const cJSON *users = cJSON_GetObjectItemCaseSensitive(msg, "users"), *u;
    cJSON *n = cJSON_CreateObject();
    char *txt;
    size_t len;

    cJSON_AddNumberToObject(n, "msgid", CHAT_MSG_NOTICE);
    cJSON_AddNumberToObject(n, "errno", 0);
    cJSON_AddStringToObject(n, "errmsg", text);
    txt = cJSON_PrintUnformatted(n);
    cJSON_Delete(n);
    if (!txt)
        return;
    len = strlen(txt);
    if (cJSON_IsArray(users)) {
        cJSON_ArrayForEach(u, users) {
            if (!cJSON_IsNumber(u))
                continue;
            /* every device of the user (multi-device logins) */
            struct chat_session *s = net_session_by_user((int64_t)u->valuedouble), *next;
            for (; s; s = next) {
                next = net_session_next_device(s); /* a send may close s */
                notice_send(s, txt, len);
            }
        }
    } else {
        for (struct chat_session *s = net_session_next(NULL); s; s = net_session_next(s))
            notice_send(s, txt, len);
    }
    mem_free(txt);
}

static void on_core(const char *data, size_t len)
{
    cJSON *msg = cJSON_ParseWithLength(data, len);
    const cJSON *op = cJSON_GetObjectItemCaseSensitive(msg, "op");
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(msg, "text");
    const cJSON *user = cJSON_GetObjectItemCaseSensitive(msg, "user");

    if (!cJSON_IsString(op) || !cJSON_IsString(text)) {
        LOGW("admin: malformed core broadcast ignored");
    } else if (strcmp(op->valuestring, "kick") == 0 && cJSON_IsNumber(user)) {
        struct chat_session *s = net_session_by_user((int64_t)user->valuedouble), *next;
        /* every device of the user (multi-device logins); closing may
         * unbind s, so its successor is taken first */
        for (; s; s = next) {
            next = net_session_next_device(s);
            if (net_session_closing(s))
                continue;
            LOGI("admin: kicking user %" PRId64 " (session %llu)",
                 (int64_t)user->valuedouble, (unsigned long long)net_session_id(s));
            net_close(s, CHAT_E_KICKED, text->valuestring);
        }
    } else if (strcmp(op->valuestring, "notice") == 0) {
        apply_notice(msg, text->valuestring);
    }
    cJSON_Delete(msg);
}

/* ---- dispatch ------------------------------------------------------------ */

/* 0 when the request may change things, else the status answered. */
static int check_token(struct adm_conn *c)
{
    const struct conf *cf = plug_current_conf();
    const char *tok = cf && cf->admin_token ? cf->admin_token : "";
    const char *a = c->req.auth;
    size_t tl = strlen(tok), al;
    unsigned char diff = 0;

    if (!tok[0]) {
        respond_error(c, 403, "no [admin] token is configured", NULL);
        return 403;
    }
    if (!c->req.have_auth || strncasecmp(a, "Bearer ", 7) != 0) {
        respond_error(c, 401, "a bearer token is required",
                      "WWW-Authenticate: Bearer realm=\"chatd\"\r\n");
        return 401;
    }
    a += 7;
    while (*a == ' ')
        a++;
    al = strlen(a);
    for (size_t i = 0; i < tl; i++)
        diff |= (unsigned char)(tok[i] ^ (i < al ? a[i] : 0));
    if (diff || al != tl) {
        respond_error(c, 403, "wrong token", NULL);
        return 403;
    }
    return 0;
}

static void handle(struct adm_conn *c)
{
    struct adm_route rt;
    int st = adm_route(&c->req, &rt);

    if (st == 405) {
        respond_error(c, 405, "method not allowed",
                      rt.post ? "Allow: POST\r\n" : "Allow: GET, HEAD\r\n");
        return;
    }
    if (st) {
        respond_error(c, st, st == 404 ? "not found" : "bad request", NULL);
        return;
    }
    if (rt.post && check_token(c))
        return;
    switch (rt.ep) {
    case ADM_EP_METRICS: ep_metrics(c); break;
    case ADM_EP_HEALTHZ: ep_healthz(c); break;
    case ADM_EP_READYZ: ep_readyz(c); break;
    case ADM_EP_SESSIONS: ep_sessions(c, &rt); break;
    case ADM_EP_PRESENCE: ep_presence(c, rt.uid); break;
    case ADM_EP_KICK: ep_kick(c, rt.uid); break;
    case ADM_EP_NOTICE: ep_notice(c); break;
    case ADM_EP_RELOAD: ep_reload(c); break;
    case ADM_EP_DRAIN: ep_drain(c, &rt); break;
    default: respond_error(c, 404, "not found", NULL); break;
    }
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)h;
    (void)hint;
    *buf = uv_buf_init(adm.rbuf, sizeof adm.rbuf);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct adm_conn *c = st->data;
    int rc;

    if (nread == 0)
        return;
    if (nread < 0) {
        conn_close(c);
        return;
    }
    rc = adm_req_feed(&c->req, buf->base, (size_t)nread);
    if (rc == 0)
        return;
    uv_read_stop(st);
    if (rc == 1)
        handle(c);
    else
        respond_error(c, rc, rc == 413   ? "request body too large"
                             : rc == 414 ? "URL too long"
                             : rc == 431 ? "request headers too large"
                                         : "malformed request",
                      NULL);
}

static void on_connection(uv_stream_t *server, int status)
{
    struct adm_conn *c;

    if (status < 0 || !(c = mem_calloc(1, sizeof *c)))
        return;
    adm_req_init(&c->req);
    c->refs = 1;
    uv_tcp_init(adm.loop, &c->tcp);
    uv_timer_init(adm.loop, &c->timer);
    c->open_handles = 2;
    c->tcp.data = c->timer.data = c;
    c->next = adm.conns;
    if (adm.conns)
        adm.conns->prev = c;
    adm.conns = c;
    adm.nconns++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0 || adm.nconns > ADM_CONNS_MAX) {
        conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, on_timer, ADM_READ_MS, 0);
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0)
        conn_close(c);
}

/* ---- loop lag ------------------------------------------------------------ */

static void on_lag(uv_timer_t *t)
{
    uint64_t now = uv_hrtime();
    adm.lag_ms = now > adm.lag_due_ns ? (double)(now - adm.lag_due_ns) / 1e6 : 0;
    adm.lag_due_ns = now + (uint64_t)ADM_LAG_EVERY_MS * 1000000;
    (void)t;
}

/* ---- start and stop ------------------------------------------------------ */

int admin_start(uv_loop_t *loop, const struct conf *c)
{
    struct sockaddr_storage ss;
    int r;

    adm.loop = loop;
    bus_on_core(on_core);
    if (!c->admin_port) {
        LOGI("admin listener off");
        return 0;
    }
    if (uv_ip4_addr(c->admin_host, c->admin_port, (struct sockaddr_in *)&ss) != 0 &&
        uv_ip6_addr(c->admin_host, c->admin_port, (struct sockaddr_in6 *)&ss) != 0)
        return -1;
    uv_tcp_init(loop, &adm.listener);
    uv_timer_init(loop, &adm.lag_timer);
    uv_timer_init(loop, &adm.drain_timer);
    adm.listening = 1;
    if ((r = uv_tcp_bind(&adm.listener, (struct sockaddr *)&ss, 0)) != 0 ||
        (r = uv_listen((uv_stream_t *)&adm.listener, 128, on_connection)) != 0) {
        LOGE("admin: listen %s:%d: %s", c->admin_host, c->admin_port, uv_strerror(r));
        admin_stop();
        return -1;
    }
    adm.lag_due_ns = uv_hrtime() + (uint64_t)ADM_LAG_EVERY_MS * 1000000;
    uv_timer_start(&adm.lag_timer, on_lag, ADM_LAG_EVERY_MS, ADM_LAG_EVERY_MS);
    uv_unref((uv_handle_t *)&adm.lag_timer);
    LOGI("admin endpoint on http://%s%s%s:%d/%s", strchr(c->admin_host, ':') ? "[" : "",
         c->admin_host, strchr(c->admin_host, ':') ? "]" : "", c->admin_port,
         c->admin_token && c->admin_token[0] ? "" : " (no token: actions answer 403)");
    return 0;
}

void admin_stop(void)
{
    if (!adm.listening)
        return;
    adm.listening = 0;
    uv_close((uv_handle_t *)&adm.listener, NULL);
    uv_close((uv_handle_t *)&adm.lag_timer, NULL);
    uv_close((uv_handle_t *)&adm.drain_timer, NULL);
    mem_free(adm.drain_ids);
    adm.drain_ids = NULL;
    while (adm.conns)
        conn_close(adm.conns);
}

int admin_draining(void) { return adm.draining; }
