/*
 * offline.c - the offline plugin: messages for users nobody could deliver
 * to are stored and handed back in the user's next login ack.
 *
 * The core raises CHAT_EV_UNDELIVERABLE when deliver() finds no session for
 * a user (offline, its node gone, the bus down); this plugin queues the
 * message (store.c) and adds the "offlinemsg" part to the login ack
 * (part.c).  Stored messages are bounded per recipient and per sender ->
 * recipient (quota.c).  A row committed just after its user's login (on
 * another node) is taken and sent live by the node holding the user
 * (take.c).  It owns the table offline_messages and no msgid.
 */
#include <inttypes.h>
#include <stddef.h>
#include <string.h>

#include "offline.h"

const struct chat_host *off_host;
struct chat_plugin *off_self;
struct off_conf off_cfg;

static void on_undeliverable(int event, const void *arg, void *ud)
{
    const struct chat_ev_undeliverable *ev = arg;
    struct chat_delivery *d = NULL;
    int64_t from = 0;
    int rc;

    (void)ud;
    if (event != CHAT_EV_UNDELIVERABLE || ev->size < offsetof(struct chat_ev_undeliverable, from))
        return;
    if (ev->size >= sizeof(*ev)) {
        from = ev->from;
        d = off_host->undeliverable_claim(ev);
    }
    rc = off_store_add(ev->user_id, from, ev->json, ev->len, d);
    if (rc != CHAT_OK && d)
        off_host->delivery_done(d, rc);
}

static void on_broadcast(int event, const void *arg, void *ud)
{
    const struct chat_ev_broadcast *ev = arg;

    (void)ud;
    if (event == CHAT_EV_BROADCAST && ev->size >= sizeof(*ev))
        off_take_note(ev->data, ev->len);
}

static int64_t conf_range(const char *key, int64_t def, int64_t lo, int64_t hi)
{
    return chat_conf_range(off_host, off_self, key, def, lo, hi);
}

static int load_conf(void)
{
    struct off_conf c;

    c.max_per_login = (size_t)conf_range("max_per_login", 1000, 1, 100000);
    c.batch_max = (size_t)conf_range("batch_max", 100, 1, 10000);
    c.batch_bytes = (size_t)conf_range("batch_bytes", 1 << 20, 1024, 8 << 20);
    c.queue_max_bytes = (size_t)conf_range("queue_max_bytes", 64 << 20, 1 << 16,
                                           INT64_C(1) << 40);
    c.queue_sender_max_bytes = (size_t)conf_range("queue_sender_max_bytes", 1 << 20,
                                                  1024, INT64_C(1) << 40);
    c.queue_user_max_bytes = (size_t)conf_range("queue_user_max_bytes", 1 << 20,
                                                1024, INT64_C(1) << 40);
    c.retry_min_ms = (uint64_t)conf_range("retry_min_ms", 100, 1, 3600000);
    c.retry_max_ms = (uint64_t)conf_range("retry_max_ms", 30000, 1, 3600000);
    c.flush_wait_ms = (uint64_t)conf_range("flush_wait_ms", 1000, 1, 60000);
    c.stored_max = conf_range("stored_max", 10000, 0, INT64_C(1) << 31);
    c.stored_per_sender_max = conf_range("stored_per_sender_max", 5000, 0,
                                         INT64_C(1) << 31);
    if (c.retry_max_ms < c.retry_min_ms)
        c.retry_max_ms = c.retry_min_ms;
    off_cfg = c;
    return CHAT_OK;
}

static int off_init(const struct chat_host *host, struct chat_plugin *self,
                    void **state)
{
    int rc;

    off_host = host;
    off_self = self;
    *state = NULL;
    CHAT_HOST_REQUIRE(host, self, login_part_set);
    CHAT_HOST_REQUIRE(host, self, delivery_done);
    CHAT_HOST_REQUIRE(host, self, register_login_messages); /* ABI 1.5 (login ack) */
    load_conf();
    off_quota_start();
    off_take_start();
    if ((rc = off_store_start()) != CHAT_OK)
        return rc;
    rc = host->register_hook(self, CHAT_EV_UNDELIVERABLE, on_undeliverable, NULL);
    if (rc == CHAT_OK)
        rc = host->register_hook(self, CHAT_EV_BROADCAST, on_broadcast, NULL);
    if (rc == CHAT_OK)
        rc = host->register_login_messages(self, "offlinemsg", off_part_fn,
                                           off_written_fn, NULL);
    return rc;
}

static void off_fini(void *state)
{
    (void)state;
    off_part_fini();
    off_take_fini();
    off_store_fini();
}

static int off_reconfigure(void *state)
{
    (void)state;
    return load_conf();
}

static int off_save(void *state, void **blob, size_t *len)
{
    (void)state;
    return off_store_save(blob, len);
}

static int off_restore(void *state, const void *blob, size_t len)
{
    (void)state;
    return off_store_restore(blob, len);
}

static const struct chat_plugin_desc off_desc = {
    CHAT_PLUGIN_DESC_INIT("offline", "1.0.0"),
    .init = off_init,
    .fini = off_fini,
    .save = off_save,
    .restore = off_restore,
    .reconfigure = off_reconfigure,
};

CHAT_PLUGIN_DECLARE(off_desc)
