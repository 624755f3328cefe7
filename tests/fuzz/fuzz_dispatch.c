/*
 * fuzz_dispatch.c - libFuzzer target for a connection's whole input path
 * inside the real core: bytes -> net.c framing -> dispatch.c -> the msgid
 * registry -> a loaded plugin (the echo fixture) -> buffered output.
 *
 * One process-wide core is set up on the first input: the echo fixture
 * (tests/plugins, path baked in at build time) loaded through plugin.c
 * exactly as chatd loads it.  Each input is fed to a fresh socketless
 * session (net_test_session) in two pieces, byte 0 choosing the split;
 * then the session is closed and the loop runs once so close callbacks,
 * timers and deferred work happen.  Crashes, sanitizer reports and leaks
 * are the findings.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uv_loop_t *loop;

static void setup(void)
{
    char dir[] = "/tmp/chatd-fuzz-XXXXXX", path[256], err[1024];
    struct conf *c;
    FILE *f;

    mem_init();
    log_level = -1; /* silent: the fuzzer prints enough */
    loop = uv_default_loop();
    if (!mkdtemp(dir))
        abort();
    snprintf(path, sizeof path, "%s/chat.conf", dir);
    if (!(f = fopen(path, "w")))
        abort();
    fprintf(f, "[plugins]\ndir = %s/v1\nenabled = echo\n", FIXTURES);
    fclose(f);
    if (!(c = conf_load(path, err, sizeof err)) || (unlink(path), rmdir(dir), 0))
        abort();
    wire_core(loop);
    if (plug_start(loop, c) != 0)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct chat_session *s;
    size_t cut;

    if (!loop)
        setup();
    if (size < 1)
        return 0;
    s = net_test_session(loop, 4096);
    if (!s)
        return 0;
    cut = size > 1 ? 1 + data[0] % (size - 1) : 1;
    net_test_feed(s, (const char *)data + 1, cut - 1);
    if (!net_session_closing(s))
        net_test_feed(s, (const char *)data + cut, size - cut);
    net_close(s, 0, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    return 0;
}
