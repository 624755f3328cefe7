/*
 * wire.c - how main.c connects the layers: every callback through which a
 * lower layer reports upward is registered here, once, at start.
 *
 * The core is layered (docs/architecture.md): leaf utilities; net, db and
 * bus; the sessions layer (session.c, dispatch, the login ack); the plugin
 * registry; the host table; main.c and the admin listener.  A file calls
 * only into layers below its own; whatever must go up (a frame to
 * dispatch, an event to the plugins' hooks, a reference on a plugin
 * instance) goes through a function pointer set here.  It is a file of its
 * own, beside main.c, so that the tests which drive the whole core
 * (tests/core, the dispatch fuzzer) wire it exactly as chatd does.
 */
#include "core.h"

static void on_broadcast(const struct chat_ev_broadcast *ev)
{
    plug_fire(CHAT_EV_BROADCAST, ev);
}

void wire_core(uv_loop_t *loop)
{
    static const struct bus_calls bus_calls = {
        .live = sess_live,
        .deliver = net_deliver,
        .close = net_close,
        .undeliverable = sess_undeliverable_t,
        .delivered = sess_delivery_done,
        .broadcast = on_broadcast,
        .ref = plug_ref,
        .unref = plug_unref,
        .next = sess_next_device,
    };
    static const struct ack_plugins ack_plugins = {
        .parts = plug_login_parts,
        .name = plug_name,
        .ref = plug_ref,
        .unref = plug_unref,
    };

    defer_init(loop);
    sess_init(loop);
    sess_on_plugins(plug_fire, plug_ref, plug_unref);
    net_on_unsent(sess_undeliverable);
    net_on_frame(disp_frame);
    net_on_error(sess_proto_error);
    net_on_open(sess_open);
    net_on_closing(sess_closing);
    net_on_admit(rl_conn);
    db_on_ref(plug_ref, plug_unref);
    bus_on(&bus_calls);
    disp_on_handlers(plug_handler, plug_run_handler);
    ack_init(loop, &ack_plugins);
    plug_set_host(&host_table);
    plug_on_conf(wire_apply_conf);
}

void wire_apply_conf(const struct conf *c)
{
    net_apply_conf(c);
    rl_apply_conf(c);
    ack_configure(c);
    disp_configure((size_t)c->max_members);
    web_configure(c); /* [web] root: read again (a failure keeps the old set) */
}
