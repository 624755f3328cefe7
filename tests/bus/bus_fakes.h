/*
 * bus_fakes.h - the callbacks test_bus registers with bus_on() (what chatd
 * wires to net, the sessions layer and the plugins): simulated local
 * sessions and a log of what the bus did with each message (delivered,
 * undeliverable, session closed, broadcast fired).
 */
#ifndef BUS_FAKES_H
#define BUS_FAKES_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

/* kinds: 'D' deliver, 'U' undeliverable, 'C' close (code), 'R' the
 * simulated sessions layer released the closed session's user, 'B' the
 * broadcast callback (plugin, data) */
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
/* ref minus unref calls. */
extern int stub_refs;

/* defer_init(loop) and bus_on() with these callbacks: before bus_start. */
void stub_wire(uv_loop_t *loop);
void stub_reset(void);
/* A live local session bound to uid (the live callback finds it). */
void stub_bind(int64_t uid);
void stub_unbind(int64_t uid);
/* What the sessions layer does after a session closed: unbind and
 * bus_release(). */
void stub_pump(void);
size_t stub_count(char kind, int64_t uid);
/* The nth (0-based) event of kind for uid, or NULL. */
const struct stub_event *stub_find(char kind, int64_t uid, size_t nth);

#endif
