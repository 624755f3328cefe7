/*
 * bus_fakes.c - the callbacks test_bus registers with bus_on(), in place of
 * the net, sessions and plugin functions chatd registers (core/wire.c).
 * bus.c calls nothing above it, so the test links it with the leaf
 * utilities and defer.c only, and no stand-in for another core file.
 * Sessions are a small table of bound users; everything the bus hands over
 * is recorded as a struct stub_event.  Closing marks the session closing,
 * and stub_pump() later does what the sessions layer does when the close
 * completes: unbind and bus_release() the user.
 */
#include <stdlib.h>
#include <string.h>

#include "core.h"
#include "bus_fakes.h"

#define MAX_SESSIONS 256

struct chat_session {
    int used;
    int closing;
    int64_t uid;
};

static struct chat_session sessions[MAX_SESSIONS];
static struct stub_event *events;
static size_t nevents, capevents;

void (*stub_on_event)(const struct stub_event *ev);
int stub_refs;

static void record(char kind, int64_t uid, int code, const char *plugin,
                   const char *data, size_t len)
{
    struct stub_event *ev;

    if (nevents == capevents) {
        capevents = capevents ? capevents * 2 : 256;
        events = realloc(events, capevents * sizeof(*events));
        if (events == NULL)
            abort();
    }
    ev = &events[nevents++];
    ev->kind = kind;
    ev->uid = uid;
    ev->code = code;
    ev->plugin = plugin ? strdup(plugin) : NULL;
    ev->data = malloc(len + 1);
    if (ev->data == NULL)
        abort();
    if (len > 0)
        memcpy(ev->data, data, len);
    ev->data[len] = '\0';
    ev->len = len;
    if (stub_on_event != NULL)
        stub_on_event(ev);
}

void stub_reset(void)
{
    for (size_t i = 0; i < nevents; i++) {
        free(events[i].plugin);
        free(events[i].data);
    }
    nevents = 0;
    memset(sessions, 0, sizeof(sessions));
    stub_refs = 0;
}

void stub_bind(int64_t uid)
{
    for (int i = 0; i < MAX_SESSIONS; i++) {
        if (!sessions[i].used) {
            sessions[i].used = 1;
            sessions[i].closing = 0;
            sessions[i].uid = uid;
            return;
        }
    }
    abort();
}

void stub_unbind(int64_t uid)
{
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (sessions[i].used && sessions[i].uid == uid)
            sessions[i].used = 0;
}

void stub_pump(void)
{
    for (int i = 0; i < MAX_SESSIONS; i++) {
        if (sessions[i].used && sessions[i].closing) {
            int64_t uid = sessions[i].uid;
            sessions[i].used = 0;
            bus_release(uid);
            record('R', uid, 0, NULL, NULL, 0);
        }
    }
}

size_t stub_count(char kind, int64_t uid)
{
    size_t n = 0;

    for (size_t i = 0; i < nevents; i++)
        if (events[i].kind == kind && events[i].uid == uid)
            n++;
    return n;
}

const struct stub_event *stub_find(char kind, int64_t uid, size_t nth)
{
    for (size_t i = 0; i < nevents; i++)
        if (events[i].kind == kind && events[i].uid == uid && nth-- == 0)
            return &events[i];
    return NULL;
}

/* ---- the callbacks of struct bus_calls ---------------------------------- */

static struct chat_session *fake_live(int64_t uid)
{
    /* like sess_live: the bound session unless it is closing */
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (sessions[i].used && sessions[i].uid == uid)
            return sessions[i].closing ? NULL : &sessions[i];
    return NULL;
}

static int fake_deliver(struct chat_session *s, const char *json, size_t len)
{
    if (s->closing)
        return CHAT_ERR_CLOSED;
    record('D', s->uid, 0, NULL, json, len);
    return CHAT_OK;
}

static void fake_close(struct chat_session *s, int errno_, const char *why)
{
    (void)why;
    if (s->closing)
        return;
    s->closing = 1;
    record('C', s->uid, errno_, NULL, NULL, 0);
}

/* The bus tests deliver without tickets (bus_deliver): d is NULL. */
static void fake_undeliverable(int64_t uid, const char *json, size_t len,
                               struct chat_delivery *d)
{
    (void)d;
    record('U', uid, 0, NULL, json, len);
}

static void fake_broadcast(const struct chat_ev_broadcast *ev)
{
    record('B', 0, 0, ev->plugin, ev->data, ev->len);
}

static void fake_ref(struct chat_plugin *p)
{
    (void)p;
    stub_refs++;
}

static void fake_unref(struct chat_plugin *p)
{
    (void)p;
    stub_refs--;
}

void stub_wire(uv_loop_t *loop)
{
    static const struct bus_calls calls = {
        .live = fake_live,
        .deliver = fake_deliver,
        .close = fake_close,
        .undeliverable = fake_undeliverable,
        .broadcast = fake_broadcast,
        .ref = fake_ref,
        .unref = fake_unref,
    };

    defer_init(loop);
    bus_on(&calls);
}
