/*
 * presence.c - PRESENCE (19, protocol 2, server to client): the friends of
 * a user are told, live and cluster-wide, when it comes online and when
 * its last session goes.  docs/protocol.md, "19 PRESENCE", is the wire.
 *
 * Who is told: the users who see this user's presence in their friend list
 * (policy open: who added it; mutual: who added it and was added back), at
 * most presence_fanout_max of them.  The list is read with one SELECT when
 * the user's first session on this node logs in (CHAT_EV_LOGIN) and kept
 * while the user has a session here, so the "offline" side needs no query
 * and leaves at once from the LOGOUT / SESSION_CLOSE hook, while the bus is
 * surely still up (also while the node shuts down, whose closes run before
 * the bus stops).  A friend added while the user is online is one more
 * watcher at once: ADD_FRIEND broadcasts "W <uid>" for the user whose
 * watchers grew, and the node(s) holding that user read the list again
 * (no event is sent for the re-read itself).
 *
 * Both go to this plugin on every node with host->broadcast(), in batches
 * of PRES_BATCH ids ("P <uid> <online> <n> <ids>\n<quoted name>"); each node
 * writes {"msgid":19,...} to its own protocol-2 sessions of the listed ids
 * (host->deliver() would reach legacy clients and the offline store).
 *
 * Offline, several devices.  With multi_login = multi a user may still be
 * online on another device (here or on another node) when one closes, and
 * with replace a new session may have taken over: the node that receives an
 * "offline" batch waits presence_offline_delay_ms and asks
 * host->presence_query() before telling anyone, and says nothing when the
 * user is online.  The race it settles: the closing node releases the
 * user's presence just before the hook (session.c), and that release leaves
 * for Redis ahead of the broadcast's PUBLISH, so Redis has applied it
 * before any receiver can ask; the delay covers Redis being down (presence
 * then answers from local sessions, and the closing one is gone by then)
 * and turns a quick reconnect into no event at all.  "Online" is sent for
 * the first session of a user on a node: a second device on another node
 * repeats online:true, which a client treats as a state, not a toggle.
 * A node that dies sends nothing: its users' presence expires with its
 * heartbeat and friends see them offline in the next list (FRIEND_LIST or
 * login ack), not live.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "friend.h"

#define PRES_BATCH 500

static const struct chat_host *host;
static struct chat_plugin *self;
static int mutual;
static uint64_t offline_delay_ms = 1000;
static int64_t fanout_max = 10000;

static struct chat_map *sessions; /* session id -> (void *)uid, counted here */
static struct chat_map *users;    /* uid -> struct puser * */

struct puser {
    size_t local;       /* sessions of the user on this node */
    int loading;        /* the watchers' SELECT is running */
    int reread;         /* the list changed while it was being read */
    char *name;         /* the name as a JSON literal (host->free) */
    size_t n;
    int64_t *ids;       /* the watchers, once read (host->free) */
};

static void puser_free(struct puser *u)
{
    if (!u)
        return;
    host->free(u->name);
    host->free(u->ids);
    host->free(u);
}

/* ------------------------------------------------------------------------ */
/* Receiving */

/* The event as sent to a client; host->free. */
static char *event_text(long long uid, const char *name, size_t nlen, int online,
                        size_t *len)
{
    size_t cap = nlen + 96;
    char *t = host->malloc(cap);
    int n;

    if (!t)
        return NULL;
    n = snprintf(t, cap, "{\"msgid\":%d,\"id\":%lld,\"name\":", FR_MSG_PRESENCE, uid);
    memcpy(t + n, name, nlen);
    *len = (size_t)n + nlen;
    *len += (size_t)snprintf(t + *len, cap - *len, ",\"online\":%s}",
                             online ? "true" : "false");
    return t;
}

/* An "offline" waiting for its presence check: whom to tell, and what. */
struct pend {
    struct pend *prev, *next; /* on the waiting list while its timer runs */
    int64_t uid;
    size_t n;
    char *text;
    size_t len;
    int64_t ids[];      /* the watchers with a protocol-2 session here */
};

/* Send text to every local protocol-2 session (device) of user id. */
static void send_devices(int64_t id, const char *text, size_t len)
{
    struct chat_session *s = host->session_by_user(id), *next;

    for (; s; s = next) {
        next = CHAT_HOST_HAS(host, session_next_device) ? host->session_next_device(s)
                                                        : NULL;
        if (host->session_proto(s) == CHAT_PROTO_2)
            host->send_raw(s, text, len); /* may close s: next was taken first */
    }
}

/* The offlines whose timer has not fired yet: freed at fini (a stopping
 * server closes one-shot timers without calling them back). */
static struct pend *waiting;

static void pend_unlink(struct pend *p)
{
    if (p->prev)
        p->prev->next = p->next;
    else if (waiting == p)
        waiting = p->next;
    if (p->next)
        p->next->prev = p->prev;
    p->prev = p->next = NULL;
}

static void pend_free(struct pend *p)
{
    host->free(p->text);
    host->free(p);
}

static void pend_checked(int status, const int64_t *uids, const unsigned char *online,
                         size_t n, void *ud)
{
    struct pend *p = ud;
    size_t i;

    (void)uids;
    if (status != CHAT_OK || n != 1) {
        chat_log(host, self, CHAT_LOG_WARN, "presence of %lld: %s: offline not told",
                 (long long)p->uid, host->strerror(status));
    } else if (!online[0]) {
        for (i = 0; i < p->n; i++)
            send_devices(p->ids[i], p->text, p->len);
    }
    pend_free(p);
}

static void pend_timer(struct chat_timer *t, void *ud)
{
    struct pend *p = ud;

    (void)t;
    pend_unlink(p);
    if (host->presence_query(self, &p->uid, 1, pend_checked, p) != CHAT_OK)
        pend_free(p);
}

/* A batch from any node (this one included). */
void fr_presence_broadcast(const char *data, size_t len)
{
    const char *nl = memchr(data, '\n', len);
    char *head = NULL, *p, *end, *text = NULL;
    long long uid, online, nids;
    struct pend *pd = NULL;
    size_t tlen, k = 0;
    int off;

    if (!nl || !(head = host->malloc((size_t)(nl - data) + 1)))
        return;
    memcpy(head, data, (size_t)(nl - data));
    head[nl - data] = '\0';
    if (sscanf(head, "P %lld %lld %lld%n", &uid, &online, &nids, &off) != 3 || nids < 0 ||
        nids > PRES_BATCH)
        goto out;
    if (!(text = event_text(uid, nl + 1, len - (size_t)(nl + 1 - data), (int)online, &tlen)))
        goto out;
    if (!online) {
        if (!(pd = host->malloc(sizeof(*pd) + (size_t)nids * sizeof(int64_t))))
            goto out;
        pd->text = NULL;
        pd->prev = pd->next = NULL;
    }
    for (p = head + off; nids-- > 0; p = end) {
        struct chat_session *s;
        long long id = strtoll(p, &end, 10);

        if (end == p)
            break;
        /* every device of id here (multi-device, host ABI 1.9) */
        if (!(s = host->session_by_user(id)))
            continue;
        if (online)
            send_devices(id, text, tlen);
        else
            pd->ids[k++] = id;
    }
    if (pd && k) {
        pd->uid = uid;
        pd->n = k;
        pd->text = text;
        pd->len = tlen;
        text = NULL;
        if (host->timer_start(self, offline_delay_ms, 0, pend_timer, pd)) {
            pd->next = waiting;
            if (waiting)
                waiting->prev = pd;
            waiting = pd;
            pd = NULL;
        }
    }
out:
    if (pd) { /* not handed to a timer: nobody to tell, or no timer */
        if (!pd->text) {
            pd->text = text;
            text = NULL;
        }
        pend_free(pd);
    }
    host->free(text);
    host->free(head);
}

/* ------------------------------------------------------------------------ */
/* Sending */

/* Tell every node: uid is online / offline, to u's watchers in batches. */
static void announce(int64_t uid, const struct puser *u, int online)
{
    size_t i, j, used, cap, nlen = strlen(u->name);
    char *note;

    if (!u->n)
        return;
    cap = 64 + PRES_BATCH * 21 + nlen;
    if (!(note = host->malloc(cap))) {
        chat_log(host, self, CHAT_LOG_WARN, "presence of %lld: out of memory",
                 (long long)uid);
        return;
    }
    for (i = 0; i < u->n; i += PRES_BATCH) {
        size_t k = u->n - i < PRES_BATCH ? u->n - i : PRES_BATCH;

        used = (size_t)snprintf(note, cap, "P %lld %d %zu", (long long)uid, online, k);
        for (j = 0; j < k; j++)
            used += (size_t)snprintf(note + used, cap - used, " %lld",
                                     (long long)u->ids[i + j]);
        note[used++] = '\n';
        memcpy(note + used, u->name, nlen);
        used += nlen;
        if (host->broadcast(self, note, used) != CHAT_OK)
            chat_log(host, self, CHAT_LOG_WARN, "presence of %lld: broadcast failed",
                     (long long)uid);
    }
    host->free(note);
}

enum { W_OFFLINE, W_ONLINE, W_REFRESH };

struct wload {
    int64_t uid;
    int mode;           /* W_OFFLINE: a session of an unknown user (a reload)
                           closed; W_ONLINE: the first login here; W_REFRESH:
                           a friend was added while the user is online */
    struct puser *u;    /* W_OFFLINE: owned here; else users' entry */
};

static int watchers_start(int64_t uid, struct puser *u, int mode);

static void watchers_read(const struct chat_db_result *r, void *ud)
{
    struct wload *w = ud;
    struct puser *u = w->u;
    size_t i, n;

    int64_t *ids;

    u->loading = 0;
    if (host->db_error(r) != CHAT_OK) {
        chat_log(host, self, CHAT_LOG_WARN, "watchers of %lld: %s", (long long)w->uid,
                 host->db_errmsg(r));
    } else if ((n = host->db_nrows(r)) && (ids = host->malloc(n * sizeof(int64_t)))) {
        for (i = 0; i < n; i++)
            ids[i] = host->db_int(r, i, 0);
        host->free(u->ids); /* a refresh replaces the list it had */
        u->ids = ids;
        u->n = n;
    }
    if (w->mode == W_OFFLINE) {
        announce(w->uid, u, 0);
        puser_free(u);
    } else if (u->local) {
        if (w->mode == W_ONLINE)
            announce(w->uid, u, 1);
        if (u->reread) {
            u->reread = 0;
            if (watchers_start(w->uid, u, W_REFRESH) != CHAT_OK)
                chat_log(host, self, CHAT_LOG_WARN, "watchers of %lld: not read again",
                         (long long)w->uid);
        }
    } else { /* every session went while reading */
        host->map_del(users, w->uid);
        if (w->mode == W_REFRESH) /* online was told: offline is owed */
            announce(w->uid, u, 0);
        puser_free(u);
    }
    host->free(w);
}

static int watchers_start(int64_t uid, struct puser *u, int mode)
{
    static const char sql_open[] =
        "SELECT user_id FROM friends WHERE friend_id = ? LIMIT ?";
    static const char sql_mutual[] =
        "SELECT f.user_id FROM friends f JOIN friends b"
        " ON b.user_id = f.friend_id AND b.friend_id = f.user_id"
        " WHERE f.friend_id = ? LIMIT ?";
    struct chat_db_param p[2] = {CHAT_DB_P_INT(uid), CHAT_DB_P_INT(fanout_max)};
    struct wload *w = host->malloc(sizeof(*w));
    int rc;

    if (!w)
        return CHAT_ERR_NOMEM;
    w->uid = uid;
    w->mode = mode;
    w->u = u;
    if ((rc = host->db_query(self, mutual ? sql_mutual : sql_open, p, 2, watchers_read,
                             w)) != CHAT_OK)
        host->free(w);
    else
        u->loading = 1;
    return rc;
}

static struct puser *puser_new(struct chat_session *s)
{
    struct puser *u = host->malloc(sizeof(*u));
    const char *name;
    size_t len, qlen;

    if (!u)
        return NULL;
    memset(u, 0, sizeof(*u));
    name = host->session_name_len(s, &len);
    if (!(u->name = host->json_quote(name ? name : "", name ? len : 0, &qlen))) {
        host->free(u);
        return NULL;
    }
    return u;
}

static void on_login(struct chat_session *s, int64_t uid)
{
    uint64_t sid = host->session_id(s);
    struct puser *u;

    if (!fanout_max || host->map_get(sessions, (int64_t)sid) ||
        host->map_put(sessions, (int64_t)sid, (void *)(intptr_t)uid) != CHAT_OK)
        return;
    if ((u = host->map_get(users, uid))) {
        u->local++; /* online here already: nobody to tell */
        return;
    }
    if (!(u = puser_new(s)) || host->map_put(users, uid, u) != CHAT_OK) {
        puser_free(u);
        host->map_del(sessions, (int64_t)sid);
        return;
    }
    u->local = 1;
    if (watchers_start(uid, u, W_ONLINE) != CHAT_OK)
        chat_log(host, self, CHAT_LOG_WARN, "watchers of %lld: not read: presence not told",
                 (long long)uid);
}

static void on_logout(struct chat_session *s, int64_t uid)
{
    uint64_t sid = host->session_id(s);
    struct chat_session *other;
    struct puser *u;

    if (!host->map_del(sessions, (int64_t)sid)) {
        /* logged in under an earlier instance (a reload): read the list now,
         * unless another session of the user is here */
        if (fanout_max && ((other = host->session_by_user(uid)) == NULL || other == s) &&
            !host->map_get(users, uid) && (u = puser_new(s)) &&
            watchers_start(uid, u, W_OFFLINE) != CHAT_OK)
            puser_free(u);
        return;
    }
    if (!(u = host->map_get(users, uid)) || --u->local > 0)
        return;
    if (u->loading)
        return; /* watchers_read drops it */
    host->map_del(users, uid);
    announce(uid, u, 0);
    puser_free(u);
}

/* ADD_FRIEND stored a row that gives uid one more watcher: every node
 * holding uid reads its watchers again. */
void fr_presence_watch(int64_t uid)
{
    char buf[32];
    int n = snprintf(buf, sizeof(buf), "W %lld", (long long)uid);

    if (fanout_max && host->broadcast(self, buf, (size_t)n) != CHAT_OK)
        chat_log(host, self, CHAT_LOG_WARN, "watchers of %lld: change not broadcast: "
                 "the new friend is told from the next login on", (long long)uid);
}

/* "W <uid>" from any node (this one included). */
void fr_presence_rewatch(const char *data, size_t len)
{
    char buf[32];
    long long uid;
    struct puser *u;

    if (len < 3 || len >= sizeof(buf))
        return;
    memcpy(buf, data, len);
    buf[len] = '\0';
    if ((uid = strtoll(buf + 2, NULL, 10)) <= 0 || !(u = host->map_get(users, uid)))
        return;
    if (u->loading) {
        u->reread = 1; /* the SELECT in flight may predate the new row */
        return;
    }
    if (watchers_start(uid, u, W_REFRESH) != CHAT_OK)
        chat_log(host, self, CHAT_LOG_WARN, "watchers of %lld: not read again",
                 (long long)uid);
}

void fr_presence_hook(int event, const struct chat_ev_session *ev)
{
    if (!ev->session || ev->user_id <= 0)
        return;
    if (event == CHAT_EV_LOGIN)
        on_login(ev->session, ev->user_id);
    else if (event == CHAT_EV_LOGOUT || event == CHAT_EV_SESSION_CLOSE)
        on_logout(ev->session, ev->user_id);
}

/* ------------------------------------------------------------------------ */

void fr_presence_conf(int is_mutual)
{
    mutual = is_mutual;
    offline_delay_ms = (uint64_t)chat_conf_range(host, self, "presence_offline_delay_ms",
                                                 1000, 0, 60000);
    fanout_max = chat_conf_range(host, self, "presence_fanout_max", 10000, 0, 1000000);
}

int fr_presence_start(const struct chat_host *h, struct chat_plugin *p)
{
    host = h;
    self = p;
    if (!(sessions = h->map_new()))
        return CHAT_ERR_NOMEM;
    if (!(users = h->map_new())) {
        h->map_free(sessions);
        sessions = NULL;
        return CHAT_ERR_NOMEM;
    }
    return CHAT_OK;
}

void fr_presence_fini(void)
{
    int64_t k;
    void *v;

    /* a timer holds a reference on the instance, so fini runs only once
     * every timer is closed: these are the ones a stopping server closed
     * without calling back */
    while (waiting) {
        struct pend *p = waiting;

        pend_unlink(p);
        pend_free(p);
    }
    for (size_t it = 0; users && host->map_next(users, &it, &k, &v);)
        puser_free(v);
    if (users)
        host->map_free(users);
    if (sessions)
        host->map_free(sessions);
    users = sessions = NULL;
}
