/*
 * history.c - chat-cli's history command: HISTORY (msgid 16) paged
 * backwards.
 *
 * `history WHO N` wants the N newest messages of a conversation; the server
 * answers at most a page (its history_limit_max, 200 by default; chat-cli
 * asks 50, the server's default, which every configuration allows), oldest
 * first, with "more" when older ones exist.  chat-cli asks again with
 * before = the first cseq it got until it has N or the beginning, keeps the
 * pages (newest page first) and prints them oldest first, then one summary
 * line.  One history runs at a time; a lost connection drops it (the
 * request is reported unanswered).
 */
#include <stdlib.h>
#include <string.h>

#include "cli.h"

#define HISTORY_PAGE 50
#define HISTORY_MAX 10000

void dur_history_free(struct cli *c)
{
    if (!c->hist)
        return;
    cJSON_Delete(c->hist->msgs);
    free(c->hist);
    c->hist = NULL;
}

static int hist_send(struct cli *c)
{
    struct cli_hist *h = c->hist;
    int left, got = 0;
    const cJSON *pg;
    cJSON *r = cmd_req(c, M_HISTORY);

    cJSON_ArrayForEach(pg, h->msgs)
        got += cJSON_GetArraySize(pg);
    left = h->want - got;
    if (!cJSON_AddStringToObject(r, "conv", h->conv) ||
        !cJSON_AddNumberToObject(r, "limit", left < HISTORY_PAGE ? left
                                                                 : HISTORY_PAGE) ||
        (h->before > 0 && !cJSON_AddNumberToObject(r, "before", (double)h->before)))
        cli_oom();
    if (cmd_send(c, r, M_HISTORY, 0, h->conv, 0) < 0) {
        dur_history_free(c);
        return 0;
    }
    return 1;
}

int dur_history(struct cli *c, const char *conv, int n, int64_t before)
{
    if (c->hist) {
        ev_error(c, M_HISTORY, 0, -1, "a history request is still running");
        return 0;
    }
    c->hist = calloc(1, sizeof(*c->hist));
    if (!c->hist || !(c->hist->msgs = cJSON_CreateArray()))
        cli_oom();
    snprintf(c->hist->conv, sizeof(c->hist->conv), "%s", conv);
    c->hist->want = n < 1 ? 1 : n > HISTORY_MAX ? HISTORY_MAX : n;
    c->hist->before = before;
    return hist_send(c);
}

static void hist_show(struct cli *c)
{
    struct cli_hist *h = c->hist;
    const cJSON *pg, *it;
    struct sbuf s = {0}, u = {0};
    int n = 0, i;
    int64_t first = 0, last = 0;

    cJSON_ArrayForEach(pg, h->msgs)
        n += cJSON_GetArraySize(pg);
    if (!c->script) {
        sb_fmt(&u, "** history of %s: %d message%s", h->conv, n,
               n == 1 ? "" : "s");
        ev_info(c, NULL, u.data);
        u.len = 0;
    }
    for (i = cJSON_GetArraySize(h->msgs) - 1; i >= 0; i--) /* oldest page first */
        cJSON_ArrayForEach(it, cJSON_GetArrayItem(h->msgs, i)) {
            if (!first)
                first = cli_jint(it, "cseq", 0);
            last = cli_jint(it, "cseq", 0);
            dur_learn_name(c, cli_jint(it, "id", 0), cli_jstr(it, "name"));
            ev_durable(c, it, EV_HISTORY);
        }
    sb_str(&s, "event=history ok");
    sb_kv(&s, "conv", h->conv);
    sb_fmt(&s, " count=%d first=%lld last=%lld more=%d", n, (long long)first,
           (long long)last, h->more);
    if (h->more)
        sb_fmt(&u, "** older ones: history %s %d %lld", h->conv, h->want,
               (long long)first);
    ev_info(c, s.data, u.len ? u.data : NULL);
    sb_free(&s);
    sb_free(&u);
}

void dur_history_reply(struct cli *c, const cJSON *m)
{
    struct cli_hist *h = c->hist;
    int64_t err = cli_jint(m, "errno", -1);
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(m, "msgs");
    cJSON *page;
    int got = 0;
    const cJSON *pg;

    if (!h)
        return;
    if (err != 0) {
        ev_error(c, M_HISTORY, cli_jint(m, "seq", -1), err, cli_jstr(m, "errmsg"));
        dur_history_free(c);
        return;
    }
    page = cJSON_IsArray(msgs) ? cJSON_Duplicate(msgs, 1) : cJSON_CreateArray();
    if (!page || !cJSON_AddItemToArray(h->msgs, page))
        cli_oom();
    h->more = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(m, "more"));
    cJSON_ArrayForEach(pg, h->msgs)
        got += cJSON_GetArraySize(pg);
    if (h->more && got < h->want && cJSON_GetArraySize(page) > 0) {
        h->before = cli_jint(cJSON_GetArrayItem(page, 0), "cseq", 0);
        if (h->before > 1 && hist_send(c))
            return;
        if (!c->hist)
            return;
    }
    hist_show(c);
    dur_history_free(c);
}
