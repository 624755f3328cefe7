#!/usr/bin/env bash
# contrib/run.sh - `make run`: chatd on 127.0.0.1:6000 (tcp), 6443 (tls)
# and 8080 (ws://127.0.0.1:8080/chat) with its own MariaDB and Redis, for trying it out by hand (its admin listener, /metrics and
# /healthz among others, on 127.0.0.1:6080: etc/chat.conf [admin]).
#
# Installs missing packages, builds build/, starts a private MariaDB
# (var/mysql, port 13306) and Redis (var/redis, port 16379) - the ports
# etc/chat.conf points at - creates the database "chat" if missing, applies
# the migrations and runs `build/chatd -c etc/chat.conf` in the foreground.
# A self-signed certificate for localhost is created in var/tls/ (cert.pem,
# key.pem: contrib/stack/tls-cert.sh) unless one is there: etc/chat.conf's
# [tls] section points at it for the tls:// listener; clients trust it with
# `chat-cli --ca var/tls/cert.pem tls://127.0.0.1:6443`.
# A MariaDB or Redis still up from an earlier run is reused; var/ keeps the
# data across runs.
#
# Ctrl-C (or SIGTERM to this script) stops chatd, then Redis and MariaDB.
# chatd runs in a session of its own, so the terminal's SIGINT reaches only
# this script, whose trap sends chatd exactly one SIGTERM and waits for its
# graceful exit; the servers are started the same way, out of the terminal's
# reach, and stopped by their pid files (contrib/stack/*.sh stop).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# Overridable to try the script itself without touching var/ or build/; the
# ports must then match the [mysql] and [redis] of CHAT_CONF.
VAR=${CHAT_VAR:-var}
BUILD=${CHAT_BUILD_DIR:-build}
CONF=${CHAT_CONF:-etc/chat.conf}
MYSQL_DIR=$VAR/mysql
MYSQL_PORT=${CHAT_MYSQL_PORT:-13306}
REDIS_DIR=$VAR/redis
REDIS_PORT=${CHAT_REDIS_PORT:-16379}
JOBS=${JOBS:-2}
WERROR=OFF
[[ "${CI:-}" == true ]] && WERROR=ON

bash contrib/deps.sh
cmake -S . -B "$BUILD" -DCHAT_WERROR="$WERROR"
cmake --build "$BUILD" -j"$JOBS"

chatd_pid=
mysql_started=0
redis_started=0
stopping=0

# shellcheck disable=SC2317 # runs from the traps
cleanup() {
    local rc=$?
    ((stopping)) && return
    stopping=1
    trap '' INT TERM
    if [[ -n "$chatd_pid" ]] && kill -0 "$chatd_pid" 2>/dev/null; then
        echo "run.sh: stopping chatd (pid $chatd_pid)"
        kill -TERM "$chatd_pid" 2>/dev/null || true
        wait "$chatd_pid" 2>/dev/null && rc=0 || rc=$?
    fi
    if ((redis_started)); then
        echo "run.sh: stopping redis"
        bash contrib/stack/redis.sh stop "$REDIS_DIR" || rc=1
    fi
    if ((mysql_started)); then
        echo "run.sh: stopping mariadb"
        bash contrib/stack/mariadb.sh stop "$MYSQL_DIR" || rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$VAR"
# etc/chat.conf [tls] reads ../var/tls/{cert,key}.pem: a CHAT_VAR elsewhere
# needs a CHAT_CONF that says so.
bash contrib/stack/tls-cert.sh "$VAR/tls"
# The servers get a session of their own: Ctrl-C must not reach them before
# chatd has stopped.  A server of an earlier run that is still up is reused
# (and stopped with this run).
if bash contrib/stack/mariadb.sh status "$MYSQL_DIR" >/dev/null 2>&1; then
    echo "run.sh: reusing the MariaDB running in $MYSQL_DIR"
else
    setsid -w bash contrib/stack/mariadb.sh start "$MYSQL_DIR" "$MYSQL_PORT"
fi
mysql_started=1
if bash contrib/stack/redis.sh status "$REDIS_DIR" >/dev/null 2>&1; then
    echo "run.sh: reusing the Redis running in $REDIS_DIR"
else
    setsid -w bash contrib/stack/redis.sh start "$REDIS_DIR" "$REDIS_PORT"
fi
redis_started=1

bash contrib/stack/mariadb.sh createdb "$MYSQL_DIR" chat
"$BUILD/chatd" --migrate -c "$CONF"

# In the background only so that the trap can run while we wait; setsid does
# not fork here (we are not a group leader), so $! is chatd itself.
setsid "$BUILD/chatd" -c "$CONF" &
chatd_pid=$!
echo "run.sh: chatd running (pid $chatd_pid); Ctrl-C stops it and the servers"
# the first listen line is [server]'s
listen=$(sed -n 's/^listen[[:space:]]*=[[:space:]]*\([^;]*[^;[:space:]]\).*/\1/p' "$CONF" | head -n 1)
echo "run.sh: listening on $listen; connect with $BUILD/chat-cli URL, e.g."
echo "run.sh:   $BUILD/chat-cli --ca $VAR/tls/cert.pem tls://127.0.0.1:6443"
set +e
wait "$chatd_pid"
rc=$?
set -e
chatd_pid=
echo "run.sh: chatd exited with status $rc"
exit "$rc"
