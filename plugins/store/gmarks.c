/*
 * gmarks.c - aggregated group receipts: a member's READ (17) on a group
 * conversation reaches the group's members live, coalesced.
 * docs/protocol.md, "17 READ", is the wire; docs/architecture.md, "Group
 * receipts", the design.
 *
 * What a chat UI needs for the ticks of its own messages in a group is
 * "delivered to all / read by all up to cseq": the lowest mark among the
 * other members.  Telling every member of a 50-member group about every
 * member's READ one by one would be 50 x 50 messages; instead the marks of
 * a group stored on this node are gathered for group_marks_delay_ms, then
 * one SELECT reads every member's marks, and one broadcast (per
 * GM_BATCH members) carries, besides the member ids, the marks that
 * changed and the aggregate: the lowest delivered / read and, when one
 * member alone holds it, that member and the second lowest (that member's
 * own "all" excludes itself).  Each node writes one msgid 17 to each of
 * its protocol-2 sessions of the members (the readers' own users
 * included: their other devices clear their unread counts):
 *   {"msgid":17,"conv":"g5","all_delivered":7,"all_read":4,
 *    "marks":[{"id":3,"delivered":9,"read":9}]}
 * So a group costs at most one SELECT and one broadcast per window per
 * node, and each member one message, however many read meanwhile.
 */
#include <stdlib.h>

#include "dstore.h"
#include "gmarks.h"

#define GM_READERS_MAX 32   /* marks carried per window; more: the latest */
#define GM_BATCH 500        /* member ids per broadcast */
#define GM_MEMBERS_MAX 100000

static const struct chat_host *host;
static struct chat_plugin *self;
static uint64_t delay_ms = 250;
static struct chat_map *pending; /* group id -> struct gwin * */

struct gmark {
    int64_t uid, dl, rd;
};

struct gwin {
    int64_t gid;
    size_t n;
    struct gmark m[GM_READERS_MAX];
};

/* ------------------------------------------------------------------------ */
/* Receiving */

/* "G <gid> <d1> <dholder> <d2> <r1> <rholder> <r2> <nmarks> (uid dl rd)*
 *  <nids> <ids>" */
void gm_broadcast(const char *data, size_t len)
{
    long long gid, d1, dh, d2, r1, rh, r2, nm, ni, v[3];
    char *text = NULL, *marks = NULL, *p, *end, *msg = NULL;
    size_t mcap, mlen = 0, cap;
    int off, i;

    if (!(text = host->malloc(len + 1)))
        return;
    memcpy(text, data, len);
    text[len] = '\0';
    if (sscanf(text, "G %lld %lld %lld %lld %lld %lld %lld %lld%n", &gid, &d1, &dh, &d2,
               &r1, &rh, &r2, &nm, &off) != 8 || nm < 0 || nm > GM_READERS_MAX)
        goto out;
    mcap = 16 + (size_t)nm * 96;
    if (!(marks = host->malloc(mcap)))
        goto out;
    mlen = (size_t)snprintf(marks, mcap, "[");
    for (p = text + off; nm-- > 0;) {
        for (i = 0; i < 3; i++, p = end) {
            v[i] = strtoll(p, &end, 10);
            if (end == p)
                goto out;
        }
        mlen += (size_t)snprintf(marks + mlen, mcap - mlen,
                                 "%s{\"id\":%lld,\"delivered\":%lld,\"read\":%lld}",
                                 mlen > 1 ? "," : "", v[0], v[1], v[2]);
    }
    marks[mlen++] = ']';
    ni = strtoll(p, &end, 10);
    if (end == p || ni < 0 || ni > GM_BATCH)
        goto out;
    cap = mlen + 160;
    if (!(msg = host->malloc(cap)))
        goto out;
    for (p = end; ni-- > 0; p = end) {
        long long id = strtoll(p, &end, 10), ad, ar;
        struct chat_session *s, *next;
        size_t n;

        if (end == p)
            break;
        if (!(s = host->session_by_user(id)))
            continue;
        n = (size_t)snprintf(msg, cap, "{\"msgid\":%d,\"conv\":\"g%lld\"", DS_MSG_READ,
                             gid);
        ad = id == dh ? d2 : d1; /* the sole holder of the lowest: the next */
        ar = id == rh ? r2 : r1;
        if (ad >= 0)
            n += (size_t)snprintf(msg + n, cap - n, ",\"all_delivered\":%lld", ad);
        if (ar >= 0)
            n += (size_t)snprintf(msg + n, cap - n, ",\"all_read\":%lld", ar);
        n += (size_t)snprintf(msg + n, cap - n, ",\"marks\":");
        memcpy(msg + n, marks, mlen);
        msg[n + mlen] = '}';
        /* every device of id here (multi-device, host ABI 1.9) */
        for (; s; s = next) {
            next = CHAT_HOST_HAS(host, session_next_device) ? host->session_next_device(s)
                                                            : NULL;
            if (host->session_proto(s) == CHAT_PROTO_2)
                host->send_raw(s, msg, n + mlen + 1); /* may close s */
        }
    }
out:
    host->free(msg);
    host->free(marks);
    host->free(text);
}

/* ------------------------------------------------------------------------ */
/* Sending */

/* The lowest of v over n members, the member holding it when only one does
 * (else 0), and the second lowest (the lowest when two share it; -1 when
 * there is no other member). */
static void lowest(const struct chat_db_result *r, size_t n, size_t col, int64_t *lo,
                   int64_t *holder, int64_t *second)
{
    size_t i;

    *lo = *second = -1;
    *holder = 0;
    for (i = 0; i < n; i++) {
        int64_t v = host->db_int(r, i, col);

        if (*lo < 0 || v < *lo) {
            *second = *lo;
            *lo = v;
            *holder = host->db_int(r, i, 0);
        } else if (*second < 0 || v < *second) {
            *second = v;
        }
    }
    if (*second == *lo)
        *holder = 0;
    if (n == 1) /* the one member has no "others" */
        *lo = -1;
}

static void members_read(const struct chat_db_result *r, void *ud)
{
    struct gwin *w = ud;
    int64_t d1, dh, d2, r1, rh, r2;
    size_t n, i, j, cap, head, used;
    char *note = NULL;

    if (host->db_error(r) != CHAT_OK) {
        chat_log(host, self, CHAT_LOG_WARN, "group %lld marks: %s: not told live",
                 (long long)w->gid, host->db_errmsg(r));
        goto out;
    }
    if (!(n = host->db_nrows(r)))
        goto out;
    lowest(r, n, 1, &d1, &dh, &d2);
    lowest(r, n, 2, &r1, &rh, &r2);
    cap = 256 + w->n * 66 + GM_BATCH * 21;
    if (!(note = host->malloc(cap)))
        goto out;
    head = (size_t)snprintf(note, cap, "G %lld %lld %lld %lld %lld %lld %lld %zu",
                            (long long)w->gid, (long long)d1, (long long)dh, (long long)d2,
                            (long long)r1, (long long)rh, (long long)r2, w->n);
    for (i = 0; i < w->n; i++)
        head += (size_t)snprintf(note + head, cap - head, " %lld %lld %lld",
                                 (long long)w->m[i].uid, (long long)w->m[i].dl,
                                 (long long)w->m[i].rd);
    for (i = 0; i < n; i += GM_BATCH) {
        size_t k = n - i < GM_BATCH ? n - i : GM_BATCH;

        used = head + (size_t)snprintf(note + head, cap - head, " %zu", k);
        for (j = 0; j < k; j++)
            used += (size_t)snprintf(note + used, cap - used, " %lld",
                                     (long long)host->db_int(r, i + j, 0));
        if (host->broadcast(self, note, used) != CHAT_OK)
            chat_log(host, self, CHAT_LOG_WARN, "group %lld marks: broadcast failed",
                     (long long)w->gid);
    }
out:
    host->free(note);
    host->free(w);
}

static void flush(struct chat_timer *t, void *ud)
{
    static const char sql[] =
        "SELECT m.user_id, COALESCE(c.delivered, 0), COALESCE(c.read_seq, 0)"
        " FROM group_members m LEFT JOIN conv_marks c"
        " ON c.conv_id = ? AND c.user_id = m.user_id"
        " WHERE m.group_id = ? LIMIT ?";
    int64_t gid = (int64_t)(intptr_t)ud;
    struct gwin *w = host->map_del(pending, gid);
    struct chat_db_param p[3];

    (void)t;
    if (!w)
        return;
    p[0] = CHAT_DB_P_INT(ds_conv_group(gid));
    p[1] = CHAT_DB_P_INT(gid);
    p[2] = CHAT_DB_P_INT(GM_MEMBERS_MAX);
    if (host->db_query(self, sql, p, 3, members_read, w) != CHAT_OK) {
        chat_log(host, self, CHAT_LOG_WARN, "group %lld marks: database busy: not told live",
                 (long long)gid);
        host->free(w);
    }
}

void gm_note(int64_t gid, int64_t uid, int64_t dl, int64_t rd)
{
    struct gwin *w = host->map_get(pending, gid);
    size_t i;

    if (!w) {
        if (!(w = host->malloc(sizeof(*w))))
            return;
        w->gid = gid;
        w->n = 0;
        if (host->map_put(pending, gid, w) != CHAT_OK) {
            host->free(w);
            return;
        }
        if (!host->timer_start(self, delay_ms, 0, flush, (void *)(intptr_t)gid)) {
            host->map_del(pending, gid);
            host->free(w);
            return;
        }
    }
    for (i = 0; i < w->n && w->m[i].uid != uid; i++)
        ;
    if (i == w->n && w->n == GM_READERS_MAX) { /* full: the oldest makes room */
        memmove(w->m, w->m + 1, (GM_READERS_MAX - 1) * sizeof(w->m[0]));
        i = --w->n;
    }
    if (i == w->n)
        w->n++;
    w->m[i] = (struct gmark){uid, dl, rd};
}

/* ------------------------------------------------------------------------ */

void gm_conf(void)
{
    delay_ms = (uint64_t)chat_conf_range(host, self, "group_marks_delay_ms", 250, 0, 60000);
}

int gm_start(const struct chat_host *h, struct chat_plugin *p)
{
    host = h;
    self = p;
    return (pending = h->map_new()) ? CHAT_OK : CHAT_ERR_NOMEM;
}

void gm_fini(void)
{
    /* drained: every window's timer has run, so nothing is left; be safe */
    chat_map_free_values(host, &pending);
}
