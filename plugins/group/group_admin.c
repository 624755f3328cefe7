/*
 * group_admin.c - CREATE_GROUP_MSG (8) and ADD_GROUP_MSG (9).
 *
 * Each change is decided by the database in one round trip, limits
 * included, so that concurrent requests on several nodes cannot race past a
 * check made beforehand:
 *   - create: one transaction.  The group row is inserted only while the
 *     creator is in fewer than groups_per_user_max groups (INSERT ... SELECT
 *     ... WHERE (count) < limit), then the creator's membership ("creator")
 *     is inserted for the group of that name created by that user.  The
 *     unique name gives "name taken" (1062).
 *   - join: one transaction: the group row is locked (FOR UPDATE), so the
 *     joins of one group take turns, then one INSERT ... SELECT guarded by
 *     both limits (and, when a member adds someone else, by the requester's
 *     membership); the foreign key gives "unknown group" or, for someone
 *     else, "unknown user" (1452), the primary key "already a member"
 *     (1062).  When the guard stops it (0 rows), a second query tells which
 *     reason applies.
 * Who may join (issue 14: anyone could join any group by its sequential id,
 * and read it): with join = invite (the default) a user joins only when a
 * member adds it, ADD_GROUP_MSG with "userid"; joining by id alone is
 * refused (109) without asking the database, so the reply does not say
 * whether the group exists.  join = open is the seed's behaviour.  A member
 * may add someone under both policies.
 * After the commit of either, grp_membership_changed() invalidates the
 * member cache of the group and the cached group lists of its members and
 * of the joiner/creator, on every node.
 * InnoDB takes shared next-key locks on the rows the guards count, so two
 * concurrent requests against the same limit cannot both pass; when that
 * makes one of them a deadlock victim (1213, rolled back), it is run again,
 * up to ADMIN_TRIES times, before the client is told "busy, try again"
 * (113).
 */
#include <string.h>

#include "group.h"

#define ER_DUP_ENTRY 1062
#define ER_NO_REFERENCED_ROW_2 1452
#define ER_LOCK_WAIT_TIMEOUT 1205
#define ER_LOCK_DEADLOCK 1213

/* Attempts of a transaction that InnoDB rolled back as a deadlock victim
 * (or after a lock wait timeout): it is run again, as the server asks. */
#define ADMIN_TRIES 5

struct admin_req {
    uint64_t sid;
    int64_t uid, gid;
    int64_t target;    /* join: the user joining (uid, or whom uid adds) */
    struct chat_ack ack;
    int tries;
    size_t nlen, dlen;
    char *name, *desc; /* create: copies of the request's bytes (in buf) */
    char buf[];
};

static struct admin_req *admin_new(struct chat_session *s, const struct chat_request *req,
                                   int64_t uid, const char *name, size_t nlen,
                                   const char *desc, size_t dlen)
{
    struct admin_req *a = grp.host->malloc(sizeof(*a) + nlen + dlen + 2);

    if (!a)
        return NULL;
    memset(a, 0, sizeof(*a));
    a->sid = grp.host->session_id(s);
    a->uid = uid;
    a->ack = req->ack;
    a->name = a->buf;
    a->desc = a->buf + nlen + 1;
    a->nlen = nlen;
    a->dlen = dlen;
    if (nlen)
        memcpy(a->name, name, nlen);
    if (dlen)
        memcpy(a->desc, desc, dlen);
    a->name[nlen] = a->desc[dlen] = '\0';
    return a;
}

/* 1 when r failed on a lock conflict and another attempt is allowed. */
static int retry_lock(const struct chat_db_result *r, struct admin_req *a)
{
    int e = grp.host->db_errno(r);

    if (e != ER_LOCK_DEADLOCK && e != ER_LOCK_WAIT_TIMEOUT)
        return 0;
    if (++a->tries >= ADMIN_TRIES)
        return 0;
    chat_log(grp.host, grp.self, CHAT_LOG_DEBUG, "user %lld: msgid %d: %s; attempt %d",
             (long long)a->uid, a->ack.msgid, grp.host->db_errmsg(r), a->tries + 1);
    return 1;
}

/* Protocol errno for a failed statement that is none of the expected ones. */
static int db_failure(const struct chat_db_result *r, const char *what,
                      const struct admin_req *a, const char **why)
{
    int e = grp.host->db_errno(r);

    chat_log(grp.host, grp.self, CHAT_LOG_WARN, "user %lld: %s: %s",
             (long long)a->uid, what, grp.host->db_errmsg(r));
    if (e == ER_LOCK_DEADLOCK || e == ER_LOCK_WAIT_TIMEOUT) {
        *why = "busy, try again";
        return CHAT_E_UNAVAILABLE;
    }
    return grp_db_proto_errno(grp.host->db_error(r), why);
}

/* Answer a's request (body borrowed, may be NULL) and free a. */
static void admin_reply(struct admin_req *a, int err, const char *why, const cJSON *body)
{
    struct chat_session *s = grp.host->session_get(a->sid);

    if (s)
        grp_answer(s, &a->ack, a->uid, err, why, body);
    else if (err)
        chat_log(grp.host, grp.self, CHAT_LOG_INFO, "user %lld: msgid %d failed after "
                 "the client left: %s", (long long)a->uid, a->ack.msgid, why);
    grp.host->free(a);
}

/* Decoded string member key: *s and *len, "" when absent and opt is set.
 * Returns 0, or CHAT_E_BAD_FIELD when it is present but not a string. */
static int get_str(const struct chat_request *req, const char *key, int opt,
                   const char **s, size_t *len)
{
    if ((*s = grp.host->req_field_str(req, key, len)) != NULL)
        return 0;
    if (opt && !grp.host->req_field_raw(req, key, len)) {
        *s = "";
        *len = 0;
        return 0;
    }
    return CHAT_E_BAD_FIELD;
}

/* ------------------------------------------------------------------------ */
/* CREATE_GROUP_MSG */

static void create_done(const struct chat_db_result *r, void *ud);

static int create_start(struct admin_req *a)
{
    static const char ins_group[] =
        "INSERT INTO chat_groups (name, description, created_by) "
        "SELECT ?, ?, ? FROM DUAL "
        "WHERE (SELECT COUNT(*) FROM group_members WHERE user_id = ?) < ?";
    static const char ins_creator[] =
        "INSERT INTO group_members (group_id, user_id, role) "
        "SELECT id, created_by, 'creator' FROM chat_groups "
        "WHERE name = ? AND created_by = ?";
    struct chat_db_param p0[5], p1[2];
    struct chat_db_stmt st[2];

    p0[0] = CHAT_DB_P_STR(a->name, a->nlen);
    p0[1] = CHAT_DB_P_STR(a->desc, a->dlen);
    p0[2] = CHAT_DB_P_INT(a->uid);
    p0[3] = CHAT_DB_P_INT(a->uid);
    p0[4] = CHAT_DB_P_INT(grp.per_user_max);
    p1[0] = CHAT_DB_P_STR(a->name, a->nlen);
    p1[1] = CHAT_DB_P_INT(a->uid);
    st[0] = (struct chat_db_stmt){ins_group, p0, 5};
    st[1] = (struct chat_db_stmt){ins_creator, p1, 2};
    return grp.host->db_txn(grp.self, st, 2, create_done, a);
}

static void create_done(const struct chat_db_result *r, void *ud)
{
    struct admin_req *a = ud;
    const struct chat_db_result *ins = grp.host->db_sub(r, 0);
    const char *why = NULL;
    cJSON *body = NULL;
    int err = 0, rc;

    if (grp.host->db_error(r) != CHAT_OK && retry_lock(r, a)) {
        if ((rc = create_start(a)) == CHAT_OK)
            return;
        err = grp_db_proto_errno(rc, &why);
    } else if (ins && grp.host->db_error(ins) != CHAT_OK &&
               grp.host->db_errno(ins) == ER_DUP_ENTRY) {
        err = CHAT_E_ALREADY;
        why = "group name taken";
    } else if (ins && grp.host->db_error(ins) == CHAT_OK && grp.host->db_affected(ins) == 0) {
        err = CHAT_E_LIMIT; /* the guard held: nothing was created */
        why = "too many groups";
    } else if (grp.host->db_error(r) != CHAT_OK) {
        err = db_failure(r, "create group", a, &why);
    } else {
        a->gid = (int64_t)grp.host->db_insert_id(ins);
        chat_log(grp.host, grp.self, CHAT_LOG_DEBUG, "user %lld created group %lld",
                 (long long)a->uid, (long long)a->gid);
        /* The creator's list changed (on every node), and a member load
         * may have seen "no such group". */
        grp_membership_changed(a->gid, a->uid);
        if ((body = cJSON_CreateObject()) != NULL)
            cJSON_AddNumberToObject(body, "groupid", (double)a->gid);
    }
    admin_reply(a, err, why, body);
    cJSON_Delete(body);
}

void grp_on_create(struct chat_session *s, const struct chat_request *req, void *ud)
{
    struct admin_req *a;
    const char *name, *desc, *why;
    size_t nlen, dlen;
    int64_t uid;
    int rc;

    (void)ud;
    if (!(uid = grp.host->req_auth(s, req)))
        return;
    if (get_str(req, "groupname", 0, &name, &nlen) || nlen == 0) {
        grp_answer(s, &req->ack, uid, CHAT_E_BAD_FIELD,
                   "groupname must be a non-empty string", NULL);
        return;
    }
    if (nlen > grp.name_max) {
        grp_answer(s, &req->ack, uid, CHAT_E_TOO_LONG, "groupname is too long", NULL);
        return;
    }
    if (get_str(req, "groupdesc", 1, &desc, &dlen)) {
        grp_answer(s, &req->ack, uid, CHAT_E_BAD_FIELD, "groupdesc must be a string", NULL);
        return;
    }
    if (dlen > grp.desc_max) {
        grp_answer(s, &req->ack, uid, CHAT_E_TOO_LONG, "groupdesc is too long", NULL);
        return;
    }
    if (!(a = admin_new(s, req, uid, name, nlen, desc, dlen))) {
        grp_answer(s, &req->ack, uid, CHAT_E_INTERNAL, "out of memory", NULL);
        return;
    }
    if ((rc = create_start(a)) != CHAT_OK) {
        grp.host->free(a);
        rc = grp_db_proto_errno(rc, &why);
        grp_answer(s, &req->ack, uid, rc, why, NULL);
    }
}

/* ------------------------------------------------------------------------ */
/* ADD_GROUP_MSG */

static void join_reply(struct admin_req *a, int err, const char *why)
{
    cJSON *body = NULL;

    if (!err && (body = cJSON_CreateObject()) != NULL) {
        cJSON_AddNumberToObject(body, "groupid", (double)a->gid);
        if (a->target != a->uid)
            cJSON_AddNumberToObject(body, "userid", (double)a->target);
    }
    admin_reply(a, err, why, body);
    cJSON_Delete(body);
}

/* The guard refused the join: find out why. */
static void join_why_done(const struct chat_db_result *r, void *ud)
{
    struct admin_req *a = ud;
    const char *why;
    int err;

    if (grp.host->db_error(r) != CHAT_OK || grp.host->db_nrows(r) != 1) {
        err = db_failure(r, "join group (reason)", a, &why);
    } else if (grp.host->db_int(r, 0, 0) == 0) {
        err = CHAT_E_NOT_FOUND;
        why = "unknown group";
    } else if (a->target != a->uid && grp.host->db_int(r, 0, 3) == 0) {
        err = CHAT_E_NOT_MEMBER;
        why = "only a member can add users to the group";
    } else if (grp.host->db_int(r, 0, 1) != 0) {
        err = CHAT_E_ALREADY;
        why = "already a member";
    } else if ((size_t)grp.host->db_int(r, 0, 2) >= grp.size_max) {
        err = CHAT_E_LIMIT;
        why = "group is full";
    } else {
        err = CHAT_E_LIMIT;
        why = "too many groups";
    }
    join_reply(a, err, why);
}

static void join_done(const struct chat_db_result *r, void *ud);

/* One transaction: lock the group row (joins of one group take turns, so
 * its size guard cannot be passed twice and they do not deadlock on the
 * guard's range locks), then the guarded insert. */
static int join_start(struct admin_req *a)
{
    static const char lock_sql[] = "SELECT id FROM chat_groups WHERE id = ? FOR UPDATE";
    static const char ins_sql[] =
        "INSERT INTO group_members (group_id, user_id, role) "
        "SELECT ?, ?, 'normal' FROM DUAL "
        "WHERE (SELECT COUNT(*) FROM group_members WHERE group_id = ?) < ? "
        "AND (SELECT COUNT(*) FROM group_members WHERE user_id = ?) < ? "
        "AND (? = 0 OR EXISTS (SELECT 1 FROM group_members "
        "WHERE group_id = ? AND user_id = ?))";
    struct chat_db_param p0[1], p1[9];
    struct chat_db_stmt st[2];

    p0[0] = CHAT_DB_P_INT(a->gid);
    p1[0] = CHAT_DB_P_INT(a->gid);
    p1[1] = CHAT_DB_P_INT(a->target);
    p1[2] = CHAT_DB_P_INT(a->gid);
    p1[3] = CHAT_DB_P_INT(grp.size_max);
    p1[4] = CHAT_DB_P_INT(a->target);
    p1[5] = CHAT_DB_P_INT(grp.per_user_max);
    p1[6] = CHAT_DB_P_INT(a->target != a->uid); /* adding someone: be a member */
    p1[7] = CHAT_DB_P_INT(a->gid);
    p1[8] = CHAT_DB_P_INT(a->uid);
    st[0] = (struct chat_db_stmt){lock_sql, p0, 1};
    st[1] = (struct chat_db_stmt){ins_sql, p1, 9};
    return grp.host->db_txn(grp.self, st, 2, join_done, a);
}

static void join_done(const struct chat_db_result *r, void *ud)
{
    static const char why_sql[] =
        "SELECT (SELECT COUNT(*) FROM chat_groups WHERE id = ?), "
        "(SELECT COUNT(*) FROM group_members WHERE group_id = ? AND user_id = ?), "
        "(SELECT COUNT(*) FROM group_members WHERE group_id = ?), "
        "(SELECT COUNT(*) FROM group_members WHERE group_id = ? AND user_id = ?)";
    struct admin_req *a = ud;
    const struct chat_db_result *ins = grp.host->db_sub(r, 1);
    struct chat_db_param p[6];
    const char *why = NULL;
    int err = 0, rc;

    if (grp.host->db_error(r) != CHAT_OK) {
        if (retry_lock(r, a)) {
            if ((rc = join_start(a)) == CHAT_OK)
                return;
            err = grp_db_proto_errno(rc, &why);
        } else if (grp.host->db_errno(r) == ER_DUP_ENTRY) {
            err = CHAT_E_ALREADY;
            why = "already a member";
        } else if (grp.host->db_errno(r) == ER_NO_REFERENCED_ROW_2) {
            /* adding someone, the guard saw the group: the user is unknown */
            err = CHAT_E_NOT_FOUND;
            why = a->target != a->uid ? "unknown user" : "unknown group";
        } else {
            err = db_failure(r, "join group", a, &why);
        }
    } else if (!ins || grp.host->db_affected(ins) == 0) {
        p[0] = CHAT_DB_P_INT(a->gid);
        p[1] = CHAT_DB_P_INT(a->gid);
        p[2] = CHAT_DB_P_INT(a->target);
        p[3] = CHAT_DB_P_INT(a->gid);
        p[4] = CHAT_DB_P_INT(a->gid);
        p[5] = CHAT_DB_P_INT(a->uid);
        rc = grp.host->db_query(grp.self, why_sql, p, 6, join_why_done, a);
        if (rc == CHAT_OK)
            return;
        err = CHAT_E_LIMIT;
        why = "a group limit is reached";
    } else {
        grp_membership_changed(a->gid, a->target);
    }
    join_reply(a, err, why);
}

void grp_on_join(struct chat_session *s, const struct chat_request *req, void *ud)
{
    struct admin_req *a;
    const char *why;
    int64_t uid, gid, target;
    int rc;

    (void)ud;
    if (!(uid = grp.host->req_auth(s, req)))
        return;
    if (grp.host->req_int(req, "groupid", &gid) != 1 || gid <= 0) {
        grp_answer(s, &req->ack, uid, CHAT_E_BAD_FIELD, "groupid must be a group id", NULL);
        return;
    }
    rc = grp.host->req_int(req, "userid", &target);
    if (rc == 0) {
        target = uid; /* no "userid": the user joins itself */
    } else if (rc != 1 || target <= 0) {
        grp_answer(s, &req->ack, uid, CHAT_E_BAD_FIELD, "userid must be a user id", NULL);
        return;
    }
    if (target == uid && grp.join_invite) {
        grp_answer(s, &req->ack, uid, CHAT_E_NOT_MEMBER,
                   "invite only: a member of the group must add you", NULL);
        return;
    }
    if (!(a = admin_new(s, req, uid, NULL, 0, NULL, 0))) {
        grp_answer(s, &req->ack, uid, CHAT_E_INTERNAL, "out of memory", NULL);
        return;
    }
    a->gid = gid;
    a->target = target;
    if ((rc = join_start(a)) != CHAT_OK) {
        grp.host->free(a);
        rc = grp_db_proto_errno(rc, &why);
        grp_answer(s, &req->ack, uid, rc, why, NULL);
    }
}
