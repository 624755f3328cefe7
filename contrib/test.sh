#!/usr/bin/env bash
# contrib/test.sh - `make test`: every test stage of chatd, one summary line.
#
# Stages, each counted as passed or failed:
#   deps         contrib/deps.sh (missing Debian packages)
#   build        configure + build build/ (-Werror when CI=true)
#   stack        ONE private MariaDB and ONE Redis for the whole run, on free
#                ports in a mktemp -d folder (contrib/stack/*.sh); the
#                integration tests find them through CHAT_TEST_* variables
#   test         ctest in build/, everything but the fuzz label
#   asan-build   build-asan/ with ASan + UBSan + -Werror   (CI=true or
#   asan-test    ctest there, leaks and UB fatal             CHAT_SANITIZE=1)
#   fuzz-build   build-fuzz/ with clang and CHAT_FUZZ=ON     (CI=true or
#   fuzz-test    ctest -L fuzz there                         CHAT_FUZZ=1)
# A build that fails part-way still has its tests run (what was not built
# fails there too); a test stage whose configure failed counts as failed.
# The stack is always torn down (trap), whatever happened.  The last line is
# "stages: N passed, N failed"; the exit status is non-zero if any failed.
#
# Knobs: JOBS (build/ctest parallelism, default 2), CHAT_TEST_TIMEOUT
# (seconds per test without its own TIMEOUT, default 300), CTEST_ARGS (extra
# ctest arguments, e.g. "-R integration" while working on one area),
# CHAT_BUILD_DIR, CHAT_ASAN_BUILD_DIR, CHAT_FUZZ_BUILD_DIR (other build
# folders than build/, build-asan/, build-fuzz/).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BUILD=${CHAT_BUILD_DIR:-build}
ASAN_BUILD=${CHAT_ASAN_BUILD_DIR:-build-asan}
FUZZ_BUILD=${CHAT_FUZZ_BUILD_DIR:-build-fuzz}
JOBS=${JOBS:-2}
TEST_TIMEOUT=${CHAT_TEST_TIMEOUT:-300}
read -r -a EXTRA_CTEST <<<"${CTEST_ARGS:-}"
if [[ "${CI:-}" == true ]]; then
    WERROR=ON SANITIZE=1 FUZZ=1
else
    WERROR=${CHAT_WERROR:-OFF} SANITIZE=${CHAT_SANITIZE:-0} FUZZ=${CHAT_FUZZ:-0}
fi

passed=()
failed=()
T0=$SECONDS

# stage NAME CMD...: run CMD, record the outcome, never abort the script.
# (CMD runs in an `if`, where errexit is off: stage bodies chain with &&.)
stage() {
    local name=$1 t=$SECONDS
    shift
    echo "==> $name"
    if "$@"; then
        passed+=("$name")
        echo "==> $name: passed ($((SECONDS - t)) s)"
        return 0
    fi
    failed+=("$name")
    echo "==> $name: FAILED ($((SECONDS - t)) s)"
    return 1
}

skip_failed() { # NAME WHY: a stage that cannot run counts as failed
    failed+=("$1")
    echo "==> $1: FAILED (not run: $2)"
}

free_port() { # below the ephemeral range, so no outgoing connection takes it first
    /usr/bin/python3 -c 'import random, socket
lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for _ in range(2000):
    p = random.randint(10000, max(10001, lo - 1))
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
    except OSError:
        continue
    print(p)
    break'
}

# ---- the stack --------------------------------------------------------------
STACK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/chat-test.XXXXXX")
mysql_up=0
redis_up=0

teardown() {
    local rc=$?
    if ((redis_up)); then
        bash contrib/stack/redis.sh stop "$STACK_DIR/redis" || echo "test.sh: redis stop failed" >&2
    fi
    if ((mysql_up)); then
        bash contrib/stack/mariadb.sh stop "$STACK_DIR/mysql" || echo "test.sh: mariadb stop failed" >&2
    fi
    rm -rf "$STACK_DIR"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_logs() { # the tail of whatever logs a failed server start left
    local f
    while IFS= read -r -d '' f; do
        echo "---- $f (tail)"
        tail -n 30 "$f" || true
    done < <(find "$1" -maxdepth 1 -type f -name '*.log' -print0 2>/dev/null)
}

# start_server mariadb|redis DIR: start on a free port, retrying on a new port
# if another process took the one we picked; prints the port.
start_server() {
    local kind=$1 dir=$2 port attempt
    for attempt in 1 2 3; do
        port=$(free_port)
        if bash "contrib/stack/$kind.sh" start "$dir" "$port" >&2; then
            echo "$port"
            return 0
        fi
        echo "test.sh: $kind did not start on port $port (attempt $attempt)" >&2
        show_logs "$dir" >&2
        bash "contrib/stack/$kind.sh" stop "$dir" >&2 || true
    done
    return 1
}

start_stack() {
    local port
    port=$(start_server mariadb "$STACK_DIR/mysql") || return 1
    mysql_up=1
    export CHAT_TEST_MYSQL_DIR="$STACK_DIR/mysql"
    export CHAT_TEST_MYSQL_PORT="$port"
    export CHAT_TEST_MYSQL_SOCKET="$STACK_DIR/mysql/mysqld.sock"
    port=$(start_server redis "$STACK_DIR/redis") || return 1
    redis_up=1
    export CHAT_TEST_REDIS_DIR="$STACK_DIR/redis"
    export CHAT_TEST_REDIS_PORT="$port"
    echo "stack: mariadb on 127.0.0.1:$CHAT_TEST_MYSQL_PORT, redis on 127.0.0.1:$CHAT_TEST_REDIS_PORT"
}

# ---- builds and test runs -------------------------------------------------
# build_dir DIR cmake-args...: configure and build.  make keeps going past a
# target that fails, so the tests of everything else still run (and report)
# while the stage counts as failed.
build_dir() {
    local dir=$1 keep=() targets=() target
    shift
    cmake -S "$ROOT" -B "$dir" "$@" || return 1
    [[ -f "$dir/Makefile" ]] && keep=(-- -k)
    for target in ${BUILD_TARGETS:-}; do targets+=(--target "$target"); done
    cmake --build "$dir" -j"$JOBS" "${targets[@]}" "${keep[@]}"
}

run_ctest() { # DIR ctest-args...
    local dir=$1
    shift
    ctest --test-dir "$dir" --output-on-failure --timeout "$TEST_TIMEOUT" \
        -j"$JOBS" "$@" "${EXTRA_CTEST[@]}"
}

# with_sanitizers CMD...: CMD with leaks and undefined behaviour fatal.
with_sanitizers() (
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    if [[ -f "$ROOT/tests/lsan.supp" ]]; then
        export LSAN_OPTIONS="suppressions=$ROOT/tests/lsan.supp:print_suppressions=0"
    fi
    "$@"
)

export CHAT_SRC="$ROOT"
export PYTHONDONTWRITEBYTECODE=1

stage deps bash contrib/deps.sh || true
stage stack start_stack || true

# configured DIR: the build folder has a test list (configure succeeded)
configured() { [[ -f "$1/CTestTestfile.cmake" ]]; }

stage build build_dir "$BUILD" -DCHAT_WERROR="$WERROR" || true
if configured "$BUILD"; then
    stage test run_ctest "$BUILD" --no-tests=error -LE fuzz || true
else
    skip_failed test "configure failed"
fi

if [[ "$SANITIZE" == 1 ]]; then
    stage asan-build build_dir "$ASAN_BUILD" -DCHAT_ASAN=ON -DCHAT_UBSAN=ON \
        -DCHAT_WERROR=ON || true
    if configured "$ASAN_BUILD"; then
        stage asan-test with_sanitizers run_ctest "$ASAN_BUILD" --no-tests=error \
            -LE fuzz || true
    else
        skip_failed asan-test "configure failed"
    fi
fi

if [[ "$FUZZ" == 1 ]]; then
    # only what the fuzz tests run; 30 s per core fuzz target, 12 s per plugin one
    BUILD_TARGETS="fuzz_frame fuzz_dispatch fuzz_admin fuzz_ws fuzz_web fuzz_proxyproto fixture_v1 fuzz_login fuzz_friend fuzz_one2one fuzz_group fuzz_offline fuzz_typing" \
        stage fuzz-build build_dir "$FUZZ_BUILD" -DCMAKE_C_COMPILER=clang \
        -DCHAT_FUZZ=ON -DCHAT_FUZZ_SECONDS="${CHAT_FUZZ_SECONDS:-30}" || true
    if configured "$FUZZ_BUILD"; then
        stage fuzz-test with_sanitizers run_ctest "$FUZZ_BUILD" -L fuzz || true
    else
        skip_failed fuzz-test "configure failed"
    fi
fi

echo
echo "==> summary ($((SECONDS - T0)) s)"
((${#passed[@]})) && echo "passed: ${passed[*]}"
((${#failed[@]})) && echo "failed: ${failed[*]}"
echo "stages: ${#passed[@]} passed, ${#failed[@]} failed"
((${#failed[@]} == 0))
