/*
 * fuzz_plugin.c - libFuzzer target for one business plugin's requests,
 * loaded as chatd loads it (the real .so from build/plugins through
 * plugin.c) into the real core: bytes -> net.c framing -> dispatch.c -> the
 * plugin's handlers -> buffered output.  Compiled once per plugin, with
 * FUZZ_PLUGINS naming what the target enables (CMake: fuzz_<name>).
 *
 * No MySQL and no Redis: db_start() and bus_start() are never called, so
 * every db_query/db_txn a handler makes fails at once with
 * CHAT_ERR_UNAVAILABLE (the plugin answers its error reply), presence
 * queries see local sessions only and deliveries reach local sessions
 * only.  Password hashing runs for real on the host's worker threads, at
 * yescrypt cost 1 so that it is cheap.
 *
 * Input layout:
 *   byte 0   session state: bit 0 the client starts in protocol 2; bit 1
 *            the client is logged in as user 7 "alice"; bit 2 a second
 *            session is logged in as user 8 "bob" (the peer of chat, friend
 *            and group requests, so deliveries reach a local session);
 *            bit 3 the client's stream is fed a byte at a time
 *   byte 1   where the stream is cut in two reads
 *   rest     the client's byte stream: frames as the protocol has them
 *            (a sequence of JSON objects ended by NUL or newline)
 * After the stream the loop runs until the worker-thread jobs the input
 * started (hashing) are done and their callbacks ran; then every session
 * is closed and the loop runs again, so each input ends with the core idle
 * and runs the same way every time.  Crashes,
 * sanitizer reports and leaks are the findings.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FZ_PROTO2   0x01
#define FZ_LOGGED   0x02
#define FZ_PEER     0x04
#define FZ_BYTEWISE 0x08

static uv_loop_t *loop;

static void setup(void)
{
    char dir[] = "/tmp/chatd-fuzz-XXXXXX", path[256], err[1024];
    struct conf *c;
    FILE *f;

    mem_init();
    /* silent (the fuzzer prints enough); FUZZ_LOG=3 shows what the
     * handlers did, to check that a seed reaches them */
    log_level = getenv("FUZZ_LOG") ? atoi(getenv("FUZZ_LOG")) : -1;
    loop = uv_default_loop();
    if (!mkdtemp(dir))
        abort();
    snprintf(path, sizeof path, "%s/chat.conf", dir);
    if (!(f = fopen(path, "w")))
        abort();
    fprintf(f, "[plugins]\ndir = %s\nenabled = %s\n"
               "[plugin.login]\nhash_cost = 1\nhash_threads = 1\n"
               "hash_queue_max = 8\nhash_per_address = 4\n"
               "resume_purge_interval = 0\n"
               "[plugin.friend]\npolicy = mutual\n"
               "[plugin.group]\njoin = invite\n",
            PLUGIN_DIR, FUZZ_PLUGINS);
    fclose(f);
    if (!(c = conf_load(path, err, sizeof err)) || (unlink(path), rmdir(dir), 0)) {
        fprintf(stderr, "fuzz_plugin: %s\n", err);
        abort();
    }
    wire_core(loop);
    if (plug_start(loop, c) != 0)
        abort();
}

static struct chat_session *session(int proto2, int64_t uid, const char *name)
{
    struct chat_session *s = net_test_session(loop, 4096);

    if (!s)
        return NULL;
    if (proto2)
        net_session_set_proto(s, CHAT_PROTO_2);
    if (uid && net_session_bind(s, uid, name, strlen(name)) != CHAT_OK) {
        net_close(s, 0, NULL);
        return NULL;
    }
    return s;
}

static void feed(struct chat_session *s, const uint8_t *p, size_t n, int bytewise)
{
    if (!bytewise) {
        net_test_feed(s, (const char *)p, n);
        return;
    }
    for (size_t i = 0; i < n && !net_session_closing(s); i++)
        net_test_feed(s, (const char *)p + i, 1);
}

/* Run the loop until no worker-thread job is outstanding (bounded). */
static void drain(void)
{
    uv_run(loop, UV_RUN_NOWAIT);
    for (int i = 0; i < 10000 && loop->active_reqs.count > 0; i++)
        uv_run(loop, UV_RUN_ONCE);
    uv_run(loop, UV_RUN_NOWAIT);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct chat_session *s, *peer = NULL;
    uint64_t sid, pid = 0;
    size_t n, cut;
    int flags;

    if (!loop)
        setup();
    if (size < 2)
        return 0;
    flags = data[0];
    if (flags & FZ_PEER) {
        peer = session(0, 8, "bob");
        pid = peer ? net_session_id(peer) : 0;
    }
    s = session(flags & FZ_PROTO2, (flags & FZ_LOGGED) ? 7 : 0, "alice");
    if (!s)
        goto out;
    sid = net_session_id(s);
    n = size - 2;
    cut = n ? data[1] % (n + 1) : 0;
    feed(s, data + 2, cut, flags & FZ_BYTEWISE);
    if (!net_session_closing(s))
        feed(s, data + 2 + cut, n - cut, flags & FZ_BYTEWISE);
    drain(); /* hashing done: its replies are queued on a live session */
    if ((s = net_session_get(sid)) != NULL)
        net_close(s, 0, NULL);
out:
    if (pid && (peer = net_session_get(pid)) != NULL)
        net_close(peer, 0, NULL);
    drain();
    return 0;
}
