#!/usr/bin/env bash
# mariadb.sh - a private MariaDB server in a directory, for `make run`, the
# test runner and the tests.  Nothing here touches a system-wide server: the
# data, socket, pid file and error log all live under DIR, the server listens
# on 127.0.0.1:PORT only, and every client call reads no option files.
#
#   mariadb.sh start DIR PORT     initialise DIR/data if missing, start the
#                                 server, wait until it answers, ensure the
#                                 users 'chat'@'127.0.0.1' / 'chat'@'localhost'
#                                 (password chat, ALL PRIVILEGES ON *.*)
#   mariadb.sh stop DIR           TERM the server, KILL it after 30 s
#   mariadb.sh createdb DIR NAME  CREATE DATABASE (utf8mb4) if missing
#   mariadb.sh dropdb DIR NAME    DROP DATABASE if present
#   mariadb.sh status DIR         exit 0 when the server is running
#
# CHAT_MARIADB_OPTS, when set, is added to the server's options at start
# (word-split), after the ones below, so it overrides them: the benchmark
# (contrib/bench/run-bench.sh) gives the durable scenarios a larger buffer
# pool and redo log than the tests' small servers need.
#
# The administrator is the invoking Unix user over the socket
# (unix_socket authentication): root in CI, the developer otherwise.
set -euo pipefail

usage() {
    echo "usage: $0 start DIR PORT | stop DIR | createdb DIR NAME | dropdb DIR NAME | status DIR" >&2
    exit 2
}

die() {
    echo "mariadb.sh: $*" >&2
    exit 1
}

# find_bin NAME...: the first of the names found in PATH or the sbin/libexec
# folders a distribution puts the server in (not in a normal user's PATH).
find_bin() {
    local n d
    for n in "$@"; do
        if command -v "$n" >/dev/null 2>&1; then
            command -v "$n"
            return 0
        fi
        for d in /usr/sbin /usr/local/sbin /usr/libexec /usr/local/bin /usr/bin; do
            if [ -x "$d/$n" ]; then
                echo "$d/$n"
                return 0
            fi
        done
    done
    return 1
}

ME=$(id -un)

abs_dir() {
    mkdir -p "$1"
    (cd "$1" && pwd)
}

# alive PID: the process exists and is not a zombie (an exited server may
# wait a while to be reaped, and kill -0 still succeeds on it).
alive() {
    local st
    kill -0 "$1" 2>/dev/null || return 1
    if [ -r "/proc/$1/stat" ]; then
        st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || st=
        [ "$st" != Z ] || return 1
    fi
    return 0
}

# pid_alive DIR: the pid in DIR/mariadb.pid names a live process.
pid_alive() {
    local pid
    [ -s "$1/mariadb.pid" ] || return 1
    pid=$(cat "$1/mariadb.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && alive "$pid"
}

admin() { # admin DIR args...
    local dir=$1
    shift
    "$ADMIN_BIN" --no-defaults --socket="$dir/mysqld.sock" --user="$ME" "$@"
}

client() { # client DIR SQL
    "$CLIENT_BIN" --no-defaults --socket="$1/mysqld.sock" --user="$ME" \
        --batch --skip-column-names -e "$2"
}

show_log_tail() {
    if [ -f "$1/error.log" ]; then
        echo "---- $1/error.log (tail) ----" >&2
        tail -n 30 "$1/error.log" >&2 || true
    fi
}

# wait_ready DIR PID: poll ping until the server answers (60 s).  PID, when
# not empty, is the process just started: its death ends the wait early.
wait_ready() {
    local dir=$1 pid=$2 i
    for ((i = 0; i < 600; i++)); do
        if admin "$dir" --connect-timeout=2 ping >/dev/null 2>&1; then
            return 0
        fi
        if [ -n "$pid" ] && ! alive "$pid"; then
            show_log_tail "$dir"
            die "mariadbd exited during startup"
        fi
        sleep 0.1
    done
    show_log_tail "$dir"
    die "mariadbd in $dir did not answer within 60 s"
}

ensure_users() {
    client "$1" "
CREATE USER IF NOT EXISTS 'chat'@'127.0.0.1' IDENTIFIED BY 'chat';
CREATE USER IF NOT EXISTS 'chat'@'localhost' IDENTIFIED BY 'chat';
GRANT ALL PRIVILEGES ON *.* TO 'chat'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO 'chat'@'localhost';
FLUSH PRIVILEGES;" || die "could not create the chat users"
}

# install_db DIR: create DIR/data.  One retry: a bootstrap that failed
# leaves a half-made directory that would fail the server start anyway.
install_db() {
    local dir=$1 install try
    install=$(find_bin mariadb-install-db mysql_install_db) ||
        die "mariadb-install-db not found"
    for try in 1 2; do
        rm -rf "$dir/data"
        if "$install" --no-defaults --datadir="$dir/data" \
            --auth-root-authentication-method=socket --user="$ME" \
            --skip-test-db >"$dir/install.log" 2>&1; then
            return 0
        fi
        echo "mariadb.sh: mariadb-install-db failed (attempt $try):" >&2
        grep -iE '\[error\]|error:|abort|denied|cannot|can.t' "$dir/install.log" |
            head -n 20 >&2 || true
        cp "$dir/install.log" "$dir/install-failed-$try.log" 2>/dev/null || true
    done
    die "mariadb-install-db failed twice (see $dir/install-failed-*.log)"
}

cmd_start() {
    local dir port pid
    [ $# -eq 2 ] || usage
    dir=$(abs_dir "$1")
    port=$2
    case $port in '' | *[!0-9]*) die "bad port: $port" ;; esac

    if pid_alive "$dir"; then
        wait_ready "$dir" ""
        ensure_users "$dir"
        return 0
    fi
    rm -f "$dir/mariadb.pid" "$dir/mysqld.sock" "$dir/mysqld.sock.lock"

    if [ ! -d "$dir/data/mysql" ]; then
        install_db "$dir"
    fi

    local server
    server=$(find_bin mariadbd mysqld) || die "mariadbd not found"
    # Own session: a Ctrl-C in the shell that ran us does not reach it;
    # `mariadb.sh stop` ends it.
    setsid "$server" --no-defaults \
        --datadir="$dir/data" \
        --socket="$dir/mysqld.sock" \
        --port="$port" \
        --bind-address=127.0.0.1 \
        --pid-file="$dir/mariadb.pid" \
        --log-error="$dir/error.log" \
        --user="$ME" \
        --skip-name-resolve \
        --character-set-server=utf8mb4 \
        --collation-server=utf8mb4_unicode_ci \
        --innodb-buffer-pool-size=32M \
        --innodb-log-file-size=16M \
        --innodb-flush-log-at-trx-commit=2 \
        --max-connections=500 \
        --max-allowed-packet=64M \
        ${CHAT_MARIADB_OPTS:-} \
        </dev/null >/dev/null 2>&1 &
    pid=$!
    wait_ready "$dir" "$pid"
    ensure_users "$dir"
}

cmd_stop() {
    local dir pid i
    [ $# -eq 1 ] || usage
    dir=$(abs_dir "$1")
    if ! pid_alive "$dir"; then
        rm -f "$dir/mariadb.pid"
        return 0
    fi
    pid=$(cat "$dir/mariadb.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        alive "$pid" || {
            rm -f "$dir/mariadb.pid"
            return 0
        }
        sleep 0.1
    done
    echo "mariadb.sh: mariadbd $pid did not stop in 30 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    rm -f "$dir/mariadb.pid" "$dir/mysqld.sock"
}

check_name() {
    case $1 in
    '' | *[!A-Za-z0-9_]*) die "bad database name: $1" ;;
    esac
}

cmd_createdb() {
    local dir
    [ $# -eq 2 ] || usage
    dir=$(abs_dir "$1")
    check_name "$2"
    client "$dir" "CREATE DATABASE IF NOT EXISTS \`$2\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
}

cmd_dropdb() {
    local dir
    [ $# -eq 2 ] || usage
    dir=$(abs_dir "$1")
    check_name "$2"
    client "$dir" "DROP DATABASE IF EXISTS \`$2\`"
}

cmd_status() {
    local dir
    [ $# -eq 1 ] || usage
    [ -d "$1" ] || return 1
    dir=$(cd "$1" && pwd)
    pid_alive "$dir" && admin "$dir" --connect-timeout=2 ping >/dev/null 2>&1
}

[ $# -ge 1 ] || usage
ADMIN_BIN=$(find_bin mariadb-admin mysqladmin) || die "mariadb-admin not found"
CLIENT_BIN=$(find_bin mariadb mysql) || die "mariadb client not found"
cmd=$1
shift
case $cmd in
start) cmd_start "$@" ;;
stop) cmd_stop "$@" ;;
createdb) cmd_createdb "$@" ;;
dropdb) cmd_dropdb "$@" ;;
status) cmd_status "$@" ;;
*) usage ;;
esac
