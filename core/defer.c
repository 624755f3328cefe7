/*
 * defer.c - the core's one way to run something on a later loop turn.
 *
 * A caller that must not run a callback inside the call that asked for it
 * (libuv's rule: a callback never runs synchronously) queues it here.  The
 * queue is drained by one uv_idle handle on the loop main.c injects: the
 * handle is active only while something is queued, so an empty queue costs
 * the loop nothing.  Each drain runs what was queued before it started;
 * what those calls queue waits for the next turn, so a callback that
 * defers again cannot starve the poll phase.
 *
 * Items are intrusive (struct defer_item, embedded in the caller's own
 * object, no allocation: the bus queues its completions this way and can
 * cancel them) or allocated here for a plain fn(arg) (defer_call: the
 * login refusals, the start of a login ack).  Loop thread only.
 */
#include "core.h"

static struct {
    uv_loop_t *loop;
    uv_idle_t idle;
    int ready;   /* defer_init ran and the handle is not closed */
    int stopping; /* defer_stop: close once the queue is empty */
    struct defer_item *head, *tail; /* queued for the next drain */
    struct defer_item *run;         /* the drain under way: still to run */
} dq;

static void close_handle(void)
{
    dq.ready = 0;
    uv_close((uv_handle_t *)&dq.idle, NULL);
}

static void on_idle(uv_idle_t *h)
{
    struct defer_item *it;

    uv_idle_stop(h);
    dq.run = dq.head; /* a callback may cancel one of these: see defer_cancel */
    dq.head = dq.tail = NULL;
    while ((it = dq.run) != NULL) {
        dq.run = it->next;
        it->next = NULL;
        it->queued = 0;
        it->fn(it);
    }
    if (dq.stopping && dq.ready && dq.head == NULL)
        close_handle();
}

void defer_init(uv_loop_t *loop)
{
    if (dq.ready && dq.loop == loop) /* wired again (tests): keep the queue */
        return;
    dq.loop = loop;
    dq.stopping = 0;
    dq.head = dq.tail = NULL;
    uv_idle_init(loop, &dq.idle);
    dq.ready = 1;
}

/* What is queued still runs on the next turn (as it would have without a
 * shutdown); the handle closes once the queue is empty. */
void defer_stop(void)
{
    if (!dq.ready || dq.stopping)
        return;
    dq.stopping = 1;
    if (dq.head == NULL)
        close_handle();
}

void defer_item_init(struct defer_item *it, void (*fn)(struct defer_item *it))
{
    it->next = NULL;
    it->fn = fn;
    it->queued = 0;
}

int defer_add(struct defer_item *it)
{
    if (it->queued)
        return CHAT_OK;
    if (!dq.ready)
        return CHAT_ERR_CLOSED;
    it->next = NULL;
    it->queued = 1;
    if (dq.tail != NULL)
        dq.tail->next = it;
    else
        dq.head = it;
    dq.tail = it;
    if (!uv_is_active((uv_handle_t *)&dq.idle))
        uv_idle_start(&dq.idle, on_idle);
    return CHAT_OK;
}

void defer_cancel(struct defer_item *it)
{
    struct defer_item **pp, *prev = NULL;

    if (!it->queued)
        return;
    for (pp = &dq.run; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == it) {
            *pp = it->next;
            goto out;
        }
    }
    for (pp = &dq.head; *pp != NULL; prev = *pp, pp = &(*pp)->next) {
        if (*pp == it) {
            *pp = it->next;
            if (dq.tail == it)
                dq.tail = prev;
            break;
        }
    }
out:
    it->next = NULL;
    it->queued = 0;
}

/* ---- fn(arg), allocated ---------------------------------------------- */

struct defer_call {
    struct defer_item it; /* first: the item is the allocation */
    void (*fn)(void *arg);
    void *arg;
};

static void call_run(struct defer_item *it)
{
    struct defer_call *c = container_of(it, struct defer_call, it);
    void (*fn)(void *arg) = c->fn;
    void *arg = c->arg;

    mem_free(c);
    fn(arg);
}

int defer_call(void (*fn)(void *arg), void *arg)
{
    struct defer_call *c;
    int rc;

    if (!(c = mem_malloc(sizeof *c)))
        return CHAT_ERR_NOMEM;
    defer_item_init(&c->it, call_run);
    c->fn = fn;
    c->arg = arg;
    if ((rc = defer_add(&c->it)) != CHAT_OK)
        mem_free(c);
    return rc;
}
