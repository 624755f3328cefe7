/*
 * offline.h - what the files of the offline plugin share (private).
 *
 *   offline.c  entry points, settings, the CHAT_EV_UNDELIVERABLE hook
 *   store.c    the ordered insert queue: one multi-row INSERT in flight
 *   part.c     the "offlinemsg" part of the login ack (a part of messages)
 *              and the deletion of what was delivered
 *   quota.c    the stored-message quotas: a batch's counts, refusals
 *   take.c     rows committed after their user's login: taken and sent live
 */
#ifndef OFFLINE_H
#define OFFLINE_H

#include <stddef.h>
#include <stdint.h>

#include "chat/plugin.h"

/* Settings of [plugin.offline]. */
struct off_conf {
    size_t max_per_login;    /* messages handed out per login */
    size_t batch_max;        /* rows per INSERT */
    size_t batch_bytes;      /* message bytes per INSERT (one row may exceed) */
    size_t queue_max_bytes;  /* memory of the insert queue */
    size_t queue_sender_max_bytes; /* of it, queued from one sender */
    size_t queue_user_max_bytes;   /* of it, queued for one recipient */
    uint64_t retry_min_ms;   /* first retry after a database error */
    uint64_t retry_max_ms;   /* backoff cap */
    uint64_t flush_wait_ms;  /* how long a login waits for queued messages */
    int64_t stored_max;            /* stored for one recipient (0: off) */
    int64_t stored_per_sender_max; /* of them, from one sender (0: off) */
};

/* One queued message (store.c's queue; quota.c reads batches of them). */
struct off_msg {
    struct off_msg *next;
    uint64_t seq;   /* report order, from 1 */
    int64_t uid;
    int64_t from;   /* the sender (0: unknown) */
    struct chat_delivery *ticket; /* a sender waits for the commit; or NULL */
    int durable;    /* without a ticket: the copy of a durable message (the
                     * message store has it), bounded by the quotas too */
    size_t len;
    char json[];    /* len bytes */
};

extern const struct chat_host *off_host;
extern struct chat_plugin *off_self;
extern struct off_conf off_cfg;

/* ---- part.c ------------------------------------------------------------ */
/* Whether json[0..len) is a durable message (issue 8: numbered, with
 * "mid", "conv" and "cseq"), which the message store keeps: 1, else 0; -1
 * when it is not a JSON object. */
int off_json_durable(const char *json, size_t len);

/* ---- store.c ----------------------------------------------------------- */
/* The per-sender and per-recipient accounting (in init). */
int off_store_start(void);
/* Queue json[0..len) (copied) for user uid from user from (0: unknown);
 * stored in report order.  With a ticket (claimed from the event) the
 * bounds apply and the ticket is completed when the row is committed.
 * CHAT_OK: queued (the ticket is the store's); else CHAT_ERR_BUSY (a bound),
 * CHAT_ERR_UNAVAILABLE (the database is failing) or CHAT_ERR_NOMEM, and the
 * caller completes the ticket. */
int off_store_add(int64_t uid, int64_t from, const char *json, size_t len,
                  struct chat_delivery *ticket);
/* The sequence number of the newest message of uid still queued (not yet
 * committed), or 0 when none is. */
uint64_t off_store_pending(int64_t uid);
/* 1 when every message queued up to seq has been stored (or dropped). */
int off_store_done(uint64_t seq);
/* Free what is left (logged: those messages are lost). */
void off_store_fini(void);
/* Reload handover (see store.c): save() gives the next instance every
 * message not in flight (blob from host->malloc, the host frees it);
 * restore() queues them, in order, before anything new. */
int off_store_save(void **blob, size_t *len);
int off_store_restore(const void *blob, size_t len);

/* ---- quota.c ------------------------------------------------------------ */
/* 1 when m is checked against the quotas (its sender waits; a quota on). */
int off_quota_applies(const struct off_msg *m);
/* Count, in one SELECT, what the checked rows among the n messages from m
 * on need; as db_query returns (cb gets the counts). */
int off_quota_query(const struct off_msg *m, size_t n, chat_db_cb cb);
/* From the counts r: status[i] of the i-th message, CHAT_OK (insert it),
 * CHAT_ERR_QUOTA or CHAT_ERR_QUOTA_SENDER (refused).  CHAT_ERR_NOMEM. */
int off_quota_decide(const struct chat_db_result *r, const struct off_msg *m,
                     size_t n, int *status);
/* Register the refusal metrics (in init). */
void off_quota_start(void);
/* Count (and log, at most once a second) a refusal with status (durable:
 * the offline copy of a durable message). */
void off_quota_refused(int64_t uid, int64_t from, int status, int durable);

/* ---- part.c ------------------------------------------------------------ */
void off_part_fn(struct chat_login *l, int64_t user_id, int proto, void *ud);
/* chat_login_written_fn: the first n messages reached the client. */
void off_written_fn(size_t n, int last, int64_t user_id, void *state, void *ud);
/* The store made progress: wake the logins that waited for it. */
void off_part_progress(void);
/* Free what waits for timers that will never run (shutdown). */
void off_part_fini(void);
/* db_query sql with the parameters (uid, max_per_login): one page of rows. */
int off_page_query(const char *sql, int64_t uid, chat_db_cb cb, void *ud);
/* 1 while a login of uid waits for the queue or delivers stored rows here
 * (a take waits for it). */
int off_part_busy(int64_t uid);

/* ---- take.c ------------------------------------------------------------ */
/* The metric (in init). */
void off_take_start(void);
/* A batch for these recipients (n of them, reordered) is committed: those
 * online now are told to every node, whose session holder takes the rows. */
void off_take_check(int64_t *uids, size_t n);
/* A CHAT_EV_BROADCAST notice of this plugin. */
void off_take_note(const char *data, size_t len);
/* 1 while a take of uid's rows is in flight here (a login waits for it). */
int off_take_running(int64_t uid);
/* uid's logins here are done: a take that waited for them runs. */
void off_take_progress(int64_t uid);
void off_take_fini(void);

#endif /* OFFLINE_H */
