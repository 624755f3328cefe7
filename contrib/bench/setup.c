/*
 * setup.c - the users and the group a scenario needs, before any traffic.
 *
 * Registering is slow on chatd by design (every password is hashed with
 * yescrypt on a worker thread), so users are kept in an ids file (--ids):
 * one line "user ID NAME PASSWORD" per user and "group GID N" for a group
 * made of the file's first N users.  A run loads the file, registers only
 * the users still missing and writes the file back (to FILE.tmp, then
 * rename), so repeated runs against the same database skip registration.
 *
 * Registration runs over a few parallel connections with one REG_MSG in
 * flight on each: a legacy REG_MSG_ACK does not say which request it
 * answers, and chatd may finish two hashes in either order.
 *
 * The legacy protocol never tells a client the id of the group it created,
 * so the group is made over protocol 2 on separate setup connections: the
 * creator logs in with "proto":2, CREATE_GROUP_MSG is answered by an ACK
 * (msgid 11) carrying "groupid", then every other member logs in the same
 * way and sends ADD_GROUP_MSG.  Each setup connection logs out (and waits
 * for the ACK) before it closes, so that the workers' legacy logins that
 * follow do not find the user still logged in.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

#define REPLY_TIMEOUT_NS (60ull * 1000000000ull)
#define LOGOUT_TIMEOUT_NS (5ull * 1000000000ull)

enum job { JOB_REG = 1, JOB_GROUP };
enum step { ST_IDLE = 0, ST_CONNECT, ST_REG, ST_LOGIN, ST_GROUP, ST_LOGOUT };
#define RETRY_NS (200ull * 1000000ull)

struct lane {
    struct bn_conn c;
    struct setup *su;
    int slot;              /* user being handled, -1 when idle */
    enum step step;
    uint64_t t_sent;
    uint64_t retry_at;     /* the server was busy: resend the step then */
};

struct setup {
    uv_loop_t loop;
    struct bn_net net;
    uv_timer_t timer;
    enum job job;
    struct lane *lanes;
    int nlanes;
    int next, end, done;   /* slots [next, end) still to start */
    int creator_done;      /* JOB_GROUP: the group exists */
    int ticks;
    uint64_t t_start;
};

static void lane_next(struct lane *l);

static void lane_send(struct lane *l, struct bn_buf *b)
{
    bn_buf_addc(b, '\0');
    bn_send(&l->c, b->p, b->len);
    l->t_sent = bst_now_ns();
}

static void send_login2(struct lane *l)
{
    const struct bench_user *u = &bench.users[l->slot];
    struct bn_buf b = {0};
    bn_buf_add(&b, "{\"msgid\":1,\"proto\":2,\"seq\":1,\"id\":", 34);
    bn_buf_addi(&b, u->id);
    bn_buf_add(&b, ",\"password\":", 12);
    bn_buf_addjs(&b, u->pass, strlen(u->pass));
    bn_buf_addc(&b, '}');
    lane_send(l, &b);
    bn_buf_free(&b);
    l->step = ST_LOGIN;
}

static void send_group_op(struct lane *l)
{
    const struct bench_user *u = &bench.users[l->slot];
    struct bn_buf b = {0};
    if (l->slot == 0) {
        char gname[BENCH_NAME_MAX + 24];
        snprintf(gname, sizeof gname, "%sg%ld", bench.prefix, (long)time(NULL));
        bn_buf_add(&b, "{\"msgid\":8,\"proto\":2,\"seq\":2,\"id\":", 34);
        bn_buf_addi(&b, u->id);
        bn_buf_add(&b, ",\"groupname\":", 13);
        bn_buf_addjs(&b, gname, strlen(gname));
        bn_buf_add(&b, ",\"groupdesc\":\"chat-bench\"}", 26);
    } else {
        bn_buf_add(&b, "{\"msgid\":9,\"proto\":2,\"seq\":2,\"id\":", 34);
        bn_buf_addi(&b, u->id);
        bn_buf_add(&b, ",\"groupid\":", 11);
        bn_buf_addi(&b, bench.group_id);
        bn_buf_addc(&b, '}');
    }
    lane_send(l, &b);
    bn_buf_free(&b);
    l->step = ST_GROUP;
}

static void send_logout2(struct lane *l)
{
    struct bn_buf b = {0};
    bn_buf_add(&b, "{\"msgid\":3,\"proto\":2,\"seq\":3,\"id\":", 34);
    bn_buf_addi(&b, bench.users[l->slot].id);
    bn_buf_addc(&b, '}');
    lane_send(l, &b);
    bn_buf_free(&b);
    l->step = ST_LOGOUT;
}

static void send_reg(struct lane *l)
{
    const struct bench_user *u = &bench.users[l->slot];
    struct bn_buf b = {0};
    bn_buf_add(&b, "{\"msgid\":4,\"name\":", 18);
    bn_buf_addjs(&b, u->name, strlen(u->name));
    bn_buf_add(&b, ",\"password\":", 12);
    bn_buf_addjs(&b, u->pass, strlen(u->pass));
    bn_buf_addc(&b, '}');
    lane_send(l, &b);
    bn_buf_free(&b);
    l->step = ST_REG;
}

static void slot_done(struct lane *l)
{
    struct setup *su = l->su;
    su->done++;
    if (su->job == JOB_GROUP && l->slot == 0)
        su->creator_done = 1;
    l->slot = -1;
    l->step = ST_IDLE;
    if (su->done == su->end)
        uv_stop(&su->loop);
}

/* A lane is idle when it has no user and no connection. */
static int lane_idle(const struct lane *l)
{
    return l->slot < 0 && l->c.net == NULL;
}

static void lane_bufs_free(struct lane *l);

static void lane_closed(uv_handle_t *h)
{
    struct lane *l = ((struct bn_conn *)h->data)->data;
    struct setup *su = l->su;
    lane_bufs_free(l); /* the closed connection's buffers, before the wipe */
    memset(&l->c, 0, sizeof l->c);
    for (int i = 0; i < su->nlanes; i++)
        if (lane_idle(&su->lanes[i]))
            lane_next(&su->lanes[i]);
}

static void logout_done(struct lane *l)
{
    slot_done(l);
    bn_close(&l->c, lane_closed);
}

static void on_frame(struct bn_conn *c, const char *f, size_t len)
{
    struct lane *l = c->data;
    struct bn_fields fl;
    if (l->slot < 0 || bn_scan(f, len, &fl) < 0 || !fl.has_msgid)
        return;
    const struct bench_user *u = &bench.users[l->slot];
    if (fl.has_errno && fl.errno_ != 0 && bn_is_busy(&fl) &&
        (l->step == ST_REG || l->step == ST_LOGIN || l->step == ST_GROUP)) {
        l->retry_at = bst_now_ns() + RETRY_NS; /* timer_cb resends */
        return;
    }
    switch (l->step) {
    case ST_REG:
        if (fl.msgid != 5)
            return;
        if (!fl.has_errno || fl.errno_ != 0 || !fl.has_id)
            bx_die("registering %s failed: %.*s (name taken? use another "
                   "--prefix or a fresh --ids file)", u->name, (int)len, f);
        bench.users[l->slot].id = fl.id;
        slot_done(l);
        lane_next(l);
        return;
    case ST_LOGIN:
        if (fl.msgid != 2)
            return;
        if (!fl.has_errno || fl.errno_ != 0)
            bx_die("group setup: login of user %lld failed: %.*s",
                   (long long)u->id, (int)len, f);
        send_group_op(l);
        return;
    case ST_GROUP:
        if (fl.msgid != 11 || (fl.has_req && fl.req != (l->slot ? 9 : 8)))
            return;
        if (!fl.has_errno || fl.errno_ != 0)
            bx_die("group setup: %s failed for user %lld: %.*s",
                   l->slot ? "ADD_GROUP" : "CREATE_GROUP", (long long)u->id,
                   (int)len, f);
        if (l->slot == 0) {
            if (!fl.has_groupid)
                bx_die("group setup: no \"groupid\" in %.*s", (int)len, f);
            bench.group_id = fl.groupid;
        }
        send_logout2(l);
        return;
    case ST_LOGOUT:
        if (fl.msgid != 11 || (fl.has_req && fl.req != 3))
            return;
        logout_done(l);
        return;
    default:
        return;
    }
}

static void on_error(struct bn_conn *c, int status)
{
    struct lane *l = c->data;
    bx_die("setup connection lost (user slot %d): %s", l->slot, uv_strerror(status));
}

static void on_connect(struct bn_conn *c, int status)
{
    struct lane *l = c->data;
    if (status < 0)
        bx_die("setup: connect failed: %s", uv_strerror(status));
    if (l->su->job == JOB_GROUP)
        send_login2(l);
    else
        lane_next(l);
}

/* The buffers of the lane's previous connection (closed by now). */
static void lane_bufs_free(struct lane *l)
{
    bn_buf_free(&l->c.out);
    bn_buf_free(&l->c.wbuf);
    bn_buf_free(&l->c.in);
}

static void lane_connect(struct lane *l, int target)
{
    lane_bufs_free(l); /* a lane's connection is used again */
    memset(&l->c, 0, sizeof l->c);
    l->c.on_frame = on_frame;
    l->c.on_connect = on_connect;
    l->c.on_error = on_error;
    l->c.data = l;
    l->c.tcp.data = &l->c;
    l->step = ST_CONNECT;
    int r = bn_connect(&l->su->net, &l->c,
                       (const struct sockaddr *)&bench.targets[target],
                       &bench.target_xp[target]);
    if (r < 0)
        bx_die("setup: connect: %s", uv_strerror(r));
}

/* Start the lane's next job, if any. */
static void lane_next(struct lane *l)
{
    struct setup *su = l->su;
    if (su->next >= su->end)
        return;
    if (su->job == JOB_GROUP && su->next > 0 && !su->creator_done)
        return; /* members join once the creator has made the group */
    l->slot = su->next++;
    if (su->job == JOB_REG) {
        send_reg(l);
    } else {
        lane_connect(l, bm_target_of(l->slot));
    }
}

static void resend(struct lane *l)
{
    l->retry_at = 0;
    if (l->step == ST_REG)
        send_reg(l);
    else if (l->step == ST_LOGIN)
        send_login2(l);
    else if (l->step == ST_GROUP)
        send_group_op(l);
}

static void timer_cb(uv_timer_t *t)
{
    struct setup *su = t->data;
    uint64_t now = bst_now_ns();
    for (int i = 0; i < su->nlanes; i++) {
        struct lane *l = &su->lanes[i];
        if (l->slot < 0 || l->step == ST_IDLE || l->step == ST_CONNECT)
            continue;
        if (l->retry_at && now >= l->retry_at)
            resend(l);
        /* a logout that is not acknowledged is not worth failing over */
        else if (l->step == ST_LOGOUT && now - l->t_sent > LOGOUT_TIMEOUT_NS)
            logout_done(l);
        else if (now - l->t_sent > REPLY_TIMEOUT_NS)
            bx_die("setup: no reply for user slot %d after 60 s (does the "
                   "target speak this request?)", l->slot);
    }
    if (++su->ticks % 10 == 0 && !bench.quiet)
        fprintf(stderr, "setup: %s %d/%d (%.0f s)\n",
                su->job == JOB_REG ? "registered" : "joined group",
                su->done, su->end, (double)(now - su->t_start) / 1e9);
}

static void idle_close_cb(uv_handle_t *h)
{
    (void)h;
}

static void run(enum job job, int from, int to, int nlanes)
{
    struct setup su;
    memset(&su, 0, sizeof su);
    su.job = job;
    su.next = from;
    su.end = to;
    su.done = from;
    su.t_start = bst_now_ns();
    if (nlanes > to - from)
        nlanes = to - from;
    uv_loop_init(&su.loop);
    bn_net_init(&su.net, &su.loop);
    uv_timer_init(&su.loop, &su.timer);
    su.timer.data = &su;
    uv_timer_start(&su.timer, timer_cb, 100, 100);
    su.lanes = bx_calloc((size_t)nlanes, sizeof *su.lanes);
    su.nlanes = nlanes;
    for (int i = 0; i < nlanes; i++) {
        su.lanes[i].su = &su;
        su.lanes[i].slot = -1;
    }
    if (job == JOB_REG) {
        /* one node registers for the cluster (they share the database) */
        for (int i = 0; i < nlanes; i++)
            lane_connect(&su.lanes[i], 0);
    } else {
        lane_next(&su.lanes[0]); /* the creator first, the others after */
    }
    uv_run(&su.loop, UV_RUN_DEFAULT);
    for (int i = 0; i < nlanes; i++)
        if (su.lanes[i].c.net && !su.lanes[i].c.closing)
            bn_close(&su.lanes[i].c, idle_close_cb);
    uv_close((uv_handle_t *)&su.timer, NULL);
    bn_net_close(&su.net);
    /* let the lanes that closed themselves run lane_closed with no work left */
    uv_run(&su.loop, UV_RUN_DEFAULT);
    uv_loop_close(&su.loop);
    for (int i = 0; i < nlanes; i++)
        lane_bufs_free(&su.lanes[i]);
    free(su.lanes);
}

/* ---- the ids file ------------------------------------------------------- */

/* The file's group line, kept when a run that needs no group rewrites it. */
static int64_t file_group_id;
static int file_group_n;

static int load_ids(const char *path, int want_group, int *group_n)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        if (errno == ENOENT)
            return 0;
        bx_die("cannot read %s: %s", path, strerror(errno));
    }
    char line[512];
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        long long id;
        int gn;
        char name[BENCH_NAME_MAX], pass[BENCH_PASS_MAX];
        if (sscanf(line, "user %lld %63s %63s", &id, name, pass) == 3) {
            if (n == bench.nusers)
                continue;
            struct bench_user *u = &bench.users[n++];
            u->id = id;
            snprintf(u->name, sizeof u->name, "%s", name);
            snprintf(u->pass, sizeof u->pass, "%s", pass);
        } else if (sscanf(line, "group %lld %d", &id, &gn) == 2) {
            file_group_id = id;
            file_group_n = gn;
            if (want_group) {
                bench.group_id = id;
                *group_n = gn;
            }
        }
    }
    fclose(f);
    return n;
}

static void save_ids(const char *path, int group_n)
{
    /* keep users beyond this run's need that the file already had */
    struct bench_user *keep = NULL;
    int nkeep = 0;
    FILE *f = fopen(path, "r");
    if (f) {
        char line[512];
        int seen = 0;
        while (fgets(line, sizeof line, f)) {
            long long id;
            char name[BENCH_NAME_MAX], pass[BENCH_PASS_MAX];
            if (sscanf(line, "user %lld %63s %63s", &id, name, pass) != 3)
                continue;
            if (seen++ < bench.nusers)
                continue;
            keep = bx_realloc(keep, (size_t)(nkeep + 1) * sizeof *keep);
            keep[nkeep].id = id;
            snprintf(keep[nkeep].name, sizeof keep[nkeep].name, "%s", name);
            snprintf(keep[nkeep].pass, sizeof keep[nkeep].pass, "%s", pass);
            nkeep++;
        }
        fclose(f);
    }
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    f = fopen(tmp, "w");
    if (!f)
        bx_die("cannot write %s: %s", tmp, strerror(errno));
    fprintf(f, "# chat-bench ids: user ID NAME PASSWORD / group GID N\n");
    if (group_n > 0)
        fprintf(f, "group %lld %d\n", (long long)bench.group_id, group_n);
    else if (file_group_n > 0)
        fprintf(f, "group %lld %d\n", (long long)file_group_id, file_group_n);
    for (int i = 0; i < bench.nusers; i++)
        fprintf(f, "user %lld %s %s\n", (long long)bench.users[i].id,
                bench.users[i].name, bench.users[i].pass);
    for (int i = 0; i < nkeep; i++)
        fprintf(f, "user %lld %s %s\n", (long long)keep[i].id, keep[i].name,
                keep[i].pass);
    free(keep);
    if (fclose(f) != 0 || rename(tmp, path) != 0)
        bx_die("cannot write %s: %s", path, strerror(errno));
}

void bs_setup(void)
{
    int group_n = 0;
    int have = 0;
    bench.nusers = bm_users_needed();
    bench.users = bx_calloc((size_t)bench.nusers, sizeof *bench.users);
    if (bench.ids_file)
        have = load_ids(bench.ids_file, bench.scenario == SC_GROUP, &group_n);
    for (int i = have; i < bench.nusers; i++) {
        struct bench_user *u = &bench.users[i];
        snprintf(u->name, sizeof u->name, "%s%d", bench.prefix, i);
        snprintf(u->pass, sizeof u->pass, "%s", bench.password);
    }
    if (have < bench.nusers) {
        uint64_t t = bst_now_ns();
        run(JOB_REG, have, bench.nusers, bench.reg_conns);
        fprintf(stderr, "setup: registered %d users in %.1f s\n",
                bench.nusers - have, (double)(bst_now_ns() - t) / 1e9);
    }
    if (bench.scenario == SC_GROUP && group_n != bench.group_size) {
        uint64_t t = bst_now_ns();
        bench.group_id = 0;
        run(JOB_GROUP, 0, bench.group_size, bench.reg_conns);
        group_n = bench.group_size;
        fprintf(stderr, "setup: group %lld with %d members in %.1f s\n",
                (long long)bench.group_id, group_n,
                (double)(bst_now_ns() - t) / 1e9);
    }
    if (bench.ids_file && (have < bench.nusers || bench.scenario == SC_GROUP))
        save_ids(bench.ids_file, group_n);
}
