#!/bin/sh
# redis.sh - a private redis-server for tests and `make run`, kept in DIR.
#
#   redis.sh start DIR PORT   start on 127.0.0.1:PORT, wait (<= 30 s) for PONG
#   redis.sh stop DIR         TERM, wait (<= 15 s), then KILL
#   redis.sh status DIR       exit 0 and print "running PID PORT" if it answers
#
# No persistence (--save "", no AOF): a restart starts empty, like a crash
# of a cache.  Everything (pid, log, port) lives in DIR.
set -eu

usage() {
    echo "usage: $0 start DIR PORT | stop DIR | status DIR" >&2
    exit 2
}

alive() { # pid; a zombie (exited, not yet reaped) counts as gone
    kill -0 "$1" 2>/dev/null || return 1
    [ -r "/proc/$1/stat" ] || return 0
    state=$(sed 's/^.*) //' "/proc/$1/stat" | cut -d' ' -f1)
    [ "$state" != Z ]
}

pong() { # port
    [ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]
}

[ $# -ge 2 ] || usage
cmd=$1
dir=$2

case $cmd in
start)
    [ $# -eq 3 ] || usage
    port=$3
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [ -f "$dir/redis.pid" ] && alive "$(cat "$dir/redis.pid")"; then
        echo "redis.sh: already running in $dir" >&2
        exit 1
    fi
    rm -f "$dir/redis.pid"
    echo "$port" >"$dir/redis.port"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" \
        --daemonize yes --pidfile "$dir/redis.pid" \
        --logfile "$dir/redis.log" --save "" --appendonly no \
        --protected-mode yes
    i=0
    while ! pong "$port"; do
        i=$((i + 1))
        if [ $i -ge 300 ]; then
            echo "redis.sh: no PONG on port $port after 30 s; log:" >&2
            tail -n 20 "$dir/redis.log" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
    ;;
stop)
    [ $# -eq 2 ] || usage
    [ -f "$dir/redis.pid" ] || exit 0
    pid=$(cat "$dir/redis.pid")
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        i=0
        while alive "$pid"; do
            i=$((i + 1))
            if [ $i -ge 150 ]; then
                echo "redis.sh: $pid still running after 15 s; killing" >&2
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
        # after KILL: wait until it is really gone (port free)
        while alive "$pid"; do
            sleep 0.1
        done
    fi
    rm -f "$dir/redis.pid"
    ;;
status)
    [ $# -eq 2 ] || usage
    if [ -f "$dir/redis.pid" ] && [ -f "$dir/redis.port" ]; then
        pid=$(cat "$dir/redis.pid")
        port=$(cat "$dir/redis.port")
        if alive "$pid" && pong "$port"; then
            echo "running $pid $port"
            exit 0
        fi
    fi
    echo "stopped"
    exit 1
    ;;
*)
    usage
    ;;
esac
