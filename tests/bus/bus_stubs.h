/*
 * bus_stubs.h - test-only stand-ins for what core/bus.c calls in net.c,
 * host.c and plugin.c: simulated local sessions and a log of what the bus
 * did with each message (delivered, undeliverable, session closed,
 * broadcast fired).  Lets test_bus link bus.c alone.
 */
#ifndef BUS_STUBS_H
#define BUS_STUBS_H

#include <stddef.h>
#include <stdint.h>

/* kinds: 'D' net_deliver, 'U' host_undeliverable, 'C' net_close (code),
 * 'R' the simulated host released the closed session's user,
 * 'B' plug_fire(CHAT_EV_BROADCAST) (plugin, data) */
struct stub_event {
    char kind;
    int64_t uid;
    int code;
    char *plugin;
    char *data;
    size_t len;
};

/* Called for every event recorded (the child node forwards them). */
extern void (*stub_on_event)(const struct stub_event *ev);
/* plug_ref minus plug_unref calls. */
extern int stub_refs;

void stub_reset(void);
/* A live local session bound to uid (net_session_by_user finds it). */
void stub_bind(int64_t uid);
void stub_unbind(int64_t uid);
/* What the host does after a session closed: unbind and bus_release(). */
void stub_pump(void);
size_t stub_count(char kind, int64_t uid);
/* The nth (0-based) event of kind for uid, or NULL. */
const struct stub_event *stub_find(char kind, int64_t uid, size_t nth);

#endif
