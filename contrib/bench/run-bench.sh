#!/usr/bin/env bash
# contrib/bench/run-bench.sh - `make bench`: chat-bench's standard set against
# a local chatd and the bare relay, a table of medians at the end.
#
# Assumes build/ is built (chatd, plugins, chat-bench, chat-relay).  Brings
# up what it needs the way contrib/run.sh does, but on free ports and under
# var/bench/ (BENCH_DIR): a private MariaDB (database chat_bench) and Redis
# (contrib/stack/*.sh), a chatd config written there (etc/chat.conf's
# settings; the login plugin's hash_cost lowered to BENCH_HASH_COST so that
# registering and logging in 19,000 users takes seconds, not minutes), the
# migrations, chatd and chat-relay.  Then every scenario of the set runs
# BENCH_RUNS times (interleaved: run 1 of each, then run 2 of each, ...) and
# a table of medians is printed.  Everything started here is stopped on exit
# (trap), Ctrl-C included.
#
# Users are kept in var/bench/ids-*.txt next to the database they live in,
# so a second `make bench` does not register them again (the files are
# dropped whenever the MariaDB data directory is new).
#
# The set (BENCH_SET, names separated by spaces):
#   relay-pairs   pairs P=50 W=8 against chat-relay            (baseline)
#   pairs         pairs P=50 W=8 against chatd
#   relay-pairs-150k, pairs-150k
#                 the same with the offered load fixed at 150,000 msgs/s
#                 (--rate): latency below saturation, the target's terms
#   group         group G=50 S=5 W=8 against chatd
#   conns         conns K=BENCH_CONNS (19000) idle, --procs 2
#   login         login storm, L=50 connections, LOGINOUT+LOGIN (password)
#   resume        login storm with protocol-2 resume tokens (reconnect+login)
#   pairs-calm    pairs P=50 W=8 at a fixed offered load of BENCH_CALM_RATE
#                 (20000) msgs/s: the baseline for the next one
#   pairs-storm   the same while a password login storm (L=20) runs.  Open
#                 loop on purpose: a closed-loop run saturates both cores by
#                 itself, so any second load "degrades" it whatever the server
#                 does; at a fixed rate p99 shows the loop's responsiveness
#   pairs-rstorm  the same during a reconnect storm with resume tokens
#   tls-pairs, ws-pairs, wss-pairs
#                 pairs P=50 W=8 against chatd's own tls://, ws:// and wss://
#                 listeners (certificate: contrib/stack/tls-cert.sh in
#                 BENCH_DIR/tls); skipped, with a note, when this chatd does
#                 not take them (chatd -t)
# and, not in the default set:
#   tls-conns     conns K=BENCH_CONNS idle over tls: RSS per TLS connection
#   ws-conns      the same over ws: RSS per idle WebSocket connection
#   tls-handshakes  login --handshakes L=50 over tls: full handshakes/s
#   pairs-durable pairs P=50 W=8 with --durable (issue 8): protocol-2
#                 messages with a cid, counted and timed send-to-ACK
#   pairs-durable-linger1  pairs-durable with durable_linger_ms = 1 (A/B)
#   group-durable group G=50 S=5 with --durable: each message stored once,
#                 deliveries counted and timed; W is BENCH_GROUP_DURABLE_W (8)
#   pairs-seed    pairs P=500 W=1, the shape of the seed's published figure
#   seed-paced, seed-unpaced
#                 pairs P=500 W=1 with chatd's legacy pacing on
#                 (legacy_pace_ms = 20, the default) and off (0), switched by
#                 SIGHUP before each run: what pacing costs the seed's shape
#   calm-paced, calm-unpaced
#                 the same pairs at a fixed 10,000 msgs/s (20 a second per
#                 receiver, under the paced cap of 50): CPU and latency
# Knobs: BENCH_RUNS (3), BENCH_WARMUP (5), BENCH_DURATION (10),
# BENCH_CONNS (19000), BENCH_HASH_COST (1; 0 = libcrypt's default),
# BENCH_HASH_BUDGET (the login plugin's hash_budget, 100 = none),
# BENCH_CALM_RATE (20000), BENCH_PLUGINS (the enabled list; all five),
# BENCH_LOGIN_RATE (the login plugin's login_rate, 0 = none),
# BENCH_PROCS (generator processes for pairs/group, 2), BENCH_DIR
# (var/bench), CHAT_BUILD_DIR (build), BENCH_CHATD_WORKERS (chatd -w N; 1),
# BENCH_THREADPOOL (chatd's [server] threadpool: hashing threads; 4),
# BENCH_LEGACY_PACE_MS (chatd's [server] legacy_pace_ms; 0: the load
# generator's legacy sessions read whole segments and opt out of pacing),
# BENCH_DURABLE_LANES (the one2one plugin's durable_lanes: transactions
# in flight for pairs-durable; 2), BENCH_DURABLE_LINGER_MS (its
# durable_linger_ms; 0), BENCH_GROUP_DURABLE_W (W of group-durable;
# 8), BENCH_POOL_SIZE ([mysql] pool_size; 4), BENCH_MARIADB_OPTS (options
# added to the private MariaDB's, CHAT_MARIADB_OPTS of contrib/stack/mariadb.sh;
# "--innodb-buffer-pool-size=256M --innodb-log-file-size=256M": the tests'
# 32 MB pool and 16 MB redo log make a durable run flush pages all along), BENCH_PERF (scenario names: `perf record -g` chatd during those runs and
# write the flat profile to BENCH_DIR/perf-NAME-RUN.txt; BENCH_PERF_ARGS are
# perf record's options, "-F 499 -g" unless set, e.g. "--call-graph dwarf").
# The conns scenario restarts chatd first, so that the RSS it reads is that
# of a fresh process.  Each result line records the 1-minute load average
# at its start (load1=): the machine may be shared.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

BUILD=${CHAT_BUILD_DIR:-build}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
RUNS=${BENCH_RUNS:-3}
WARMUP=${BENCH_WARMUP:-5}
DURATION=${BENCH_DURATION:-10}
CONNS=${BENCH_CONNS:-19000}
HASH_COST=${BENCH_HASH_COST:-1}
HASH_BUDGET=${BENCH_HASH_BUDGET:-100}
CALM_RATE=${BENCH_CALM_RATE:-20000}
LOGIN_RATE=${BENCH_LOGIN_RATE:-0}
PLUGINS=${BENCH_PLUGINS:-login, friend, one2one, group, offline}
PROCS=${BENCH_PROCS:-2}
CHATD_WORKERS=${BENCH_CHATD_WORKERS:-1}
THREADPOOL=${BENCH_THREADPOOL:-4}
LEGACY_PACE_MS=${BENCH_LEGACY_PACE_MS:-0}
DURABLE_LANES=${BENCH_DURABLE_LANES:-2}
GROUP_DURABLE_W=${BENCH_GROUP_DURABLE_W:-8}
SET=${BENCH_SET:-relay-pairs pairs tls-pairs ws-pairs wss-pairs relay-pairs-150k pairs-150k group conns login resume pairs-calm pairs-storm}
DIR=${BENCH_DIR:-$ROOT/var/bench}
PERF=${BENCH_PERF:-}
read -r -a PERF_ARGS <<<"${BENCH_PERF_ARGS:--F 499 -g}"
BENCH=$BUILD/chat-bench

for f in "$BUILD/chatd" "$BENCH" "$BUILD/chat-relay" "$BUILD/plugins/login.so" \
    "$BUILD/plugins/one2one.so" "$BUILD/plugins/group.so"; do
    [[ -x "$f" || -f "$f" ]] || { echo "run-bench.sh: $f is missing: build first (make)" >&2; exit 1; }
done

free_port() {
    /usr/bin/python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# wait_port PORT PID: poll until PORT accepts connections (30 s), or PID dies.
wait_port() {
    local i
    for ((i = 0; i < 300; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

mkdir -p "$DIR"
LOG=$DIR/logs
mkdir -p "$LOG"
chatd_pid=
relay_pid=
storm_pid=
mysql_up=0
redis_up=0
stopping=0

cleanup() {
    local rc=$?
    ((stopping)) && return
    stopping=1
    trap '' INT TERM
    for p in "$storm_pid" "$relay_pid" "$chatd_pid"; do
        if [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; then
            kill -TERM "$p" 2>/dev/null || true
            wait "$p" 2>/dev/null || true
        fi
    done
    ((redis_up)) && { bash contrib/stack/redis.sh stop "$DIR/redis" || rc=1; }
    ((mysql_up)) && { bash contrib/stack/mariadb.sh stop "$DIR/mysql" || rc=1; }
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- the stack ---------------------------------------------------------------
if [[ ! -d "$DIR/mysql/data/mysql" ]]; then
    rm -f "$DIR"/ids-*.txt # users of a database that is gone
fi
MYSQL_PORT=$(free_port)
CHAT_MARIADB_OPTS=${BENCH_MARIADB_OPTS---innodb-buffer-pool-size=256M --innodb-log-file-size=256M} \
    setsid -w bash contrib/stack/mariadb.sh start "$DIR/mysql" "$MYSQL_PORT" >"$LOG/mariadb.out" 2>&1 ||
    { cat "$LOG/mariadb.out" >&2; exit 1; }
mysql_up=1
if bash contrib/stack/redis.sh status "$DIR/redis" >/dev/null 2>&1; then
    bash contrib/stack/redis.sh stop "$DIR/redis"
fi
REDIS_PORT=$(free_port)
setsid -w bash contrib/stack/redis.sh start "$DIR/redis" "$REDIS_PORT" >"$LOG/redis.out" 2>&1 ||
    { cat "$LOG/redis.out" >&2; exit 1; }
redis_up=1
bash contrib/stack/mariadb.sh createdb "$DIR/mysql" chat_bench

CHATD_PORT=$(free_port)
ADMIN_PORT=$(free_port)
TLS_PORT=$(free_port)
WS_PORT=$(free_port)
WSS_PORT=$(free_port)
bash contrib/stack/tls-cert.sh "$DIR/tls" >/dev/null
CONF=$DIR/chat.conf
# write_conf LISTEN [TLS]: the config, with a [tls] section when TLS is 1
write_conf() {
cat >"$CONF" <<EOF
; written by contrib/bench/run-bench.sh
[server]
listen = $1
log_level = warn
max_connections = 19800
trusted = 127.0.0.0/8
max_frame = 65536
idle_timeout = 0
max_output = 4194304
legacy_pace_ms = $LEGACY_PACE_MS
login_part_timeout_ms = 2000
threadpool = $THREADPOOL

[plugins]
dir = $BUILD/plugins
enabled = $PLUGINS

[mysql]
host = 127.0.0.1
port = $MYSQL_PORT
socket = $DIR/mysql/mysqld.sock
user = chat
password = chat
database = chat_bench
pool_size = ${BENCH_POOL_SIZE:-4}
queue_max = 100000
connect_timeout = 2
migrations = $ROOT/sql

[admin]
listen = 127.0.0.1:$ADMIN_PORT

[redis]
host = 127.0.0.1
port = $REDIS_PORT
heartbeat_ttl = 10

[plugin.login]
multi_login = refuse
name_max = 64
password_min = 1
password_max = 128
resume_ttl = 604800
hash_cost = $HASH_COST
hash_budget = $HASH_BUDGET
; the bench is one address standing in for many clients
hash_per_address = 0
login_rate = $LOGIN_RATE

[plugin.friend]
policy = open

[plugin.one2one]
msg_max = 4096
durable_lanes = $DURABLE_LANES
durable_linger_ms = ${BENCH_DURABLE_LINGER_MS:-0}

[plugin.group]
join = open
name_max = 64
desc_max = 512
msg_max = 4096
group_size_max = 500
groups_per_user_max = 200

[plugin.offline]
max_per_login = 1000
EOF
if [[ "${2:-0}" == 1 ]]; then
    printf '\n[tls]\ncert = %s\nkey = %s\n' "$DIR/tls/cert.pem" "$DIR/tls/key.pem" >>"$CONF"
fi
}

# tls, ws and wss beside tcp when this chatd has them; tcp alone otherwise
XP=1
write_conf "tcp://127.0.0.1:$CHATD_PORT, tls://127.0.0.1:$TLS_PORT, ws://127.0.0.1:$WS_PORT/chat, wss://127.0.0.1:$WSS_PORT/chat" 1
if ! "$BUILD/chatd" -t -c "$CONF" >"$LOG/check.log" 2>&1; then
    XP=0
    echo "run-bench.sh: this chatd has no tls/ws/wss listeners ($(tail -n 1 "$LOG/check.log")): those scenarios are skipped"
    write_conf "127.0.0.1:$CHATD_PORT"
fi

"$BUILD/chatd" --migrate -c "$CONF" >"$LOG/migrate.log" 2>&1 ||
    { cat "$LOG/migrate.log" >&2; exit 1; }

# chatd and the relay need ~19,000 descriptors each: raise the soft limit
ulimit -n "$(ulimit -Hn)"
WFLAG=()
((CHATD_WORKERS > 1)) && WFLAG=(-w "$CHATD_WORKERS")
start_chatd() {
    setsid "$BUILD/chatd" -c "$CONF" "${WFLAG[@]}" >>"$LOG/chatd.log" 2>&1 &
    chatd_pid=$!
    wait_port "$CHATD_PORT" "$chatd_pid" || { tail -n 30 "$LOG/chatd.log" >&2; exit 1; }
    CHATD=(-t "127.0.0.1:$CHATD_PORT" --server-pid "$chatd_pid")
    XTLS=(-t "tls://127.0.0.1:$TLS_PORT" --ca "$DIR/tls/cert.pem" --server-pid "$chatd_pid")
    XWS=(-t "ws://127.0.0.1:$WS_PORT/chat" --server-pid "$chatd_pid")
    XWSS=(-t "wss://127.0.0.1:$WSS_PORT/chat" --ca "$DIR/tls/cert.pem" --server-pid "$chatd_pid")
}
# A fresh chatd: its RSS before the conns scenario must not hold memory
# that an earlier scenario freed but malloc kept.
restart_chatd() {
    kill -TERM "$chatd_pid" 2>/dev/null || true
    wait "$chatd_pid" 2>/dev/null || true
    chatd_pid=
    start_chatd
}
start_chatd

RELAY_PORT=$(free_port)
setsid "$BUILD/chat-relay" -l "127.0.0.1:$RELAY_PORT" >"$LOG/relay.log" 2>&1 &
relay_pid=$!
wait_port "$RELAY_PORT" "$relay_pid" || { cat "$LOG/relay.log" >&2; exit 1; }

echo "run-bench.sh: chatd pid $chatd_pid on :$CHATD_PORT (workers=$CHATD_WORKERS," \
    "threadpool=$THREADPOOL), relay pid $relay_pid on :$RELAY_PORT, hash_cost=$HASH_COST, hash_budget=$HASH_BUDGET, login_rate=$LOGIN_RATE," \
    "$RUNS runs of: $SET"
echo "run-bench.sh: machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)," \
    "kernel $(uname -r)"

RELAY=(-t "127.0.0.1:$RELAY_PORT" --server-pid "$relay_pid")
TIMING=(--warmup "$WARMUP" --duration "$DURATION" -q)
RESULTS=$DIR/results-$(date +%Y%m%d-%H%M%S).txt
: >"$RESULTS"

# db_ticks: mariadbd's CPU time (user + system, clock ticks) now.
db_ticks() {
    local pid
    pid=$(cat "$DIR/mysql/mariadb.pid" 2>/dev/null) || { echo 0; return; }
    sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}' || echo 0
}

# db_cpu T0 T1 RESULT: "db_cpu_s=S db_cpu_us_per_sent=U": mariadbd's CPU over
# the whole chat-bench call (setup, warmup, window, drain) and per message
# sent in it (issue 8: what a durable message costs MariaDB).
db_cpu() {
    local sent
    sent=$(sed -n 's/.* sent=\([0-9]*\).*/\1/p' <<<"$3")
    awk -v t0="$1" -v t1="$2" -v hz="$(getconf CLK_TCK)" -v n="${sent:-0}" 'BEGIN {
        s = (t1 - t0) / hz
        printf "db_cpu_s=%.2f db_cpu_us_per_sent=%.2f", s, (n > 0 ? s * 1e6 / n : 0) }'
}

# bench NAME RUN ARGS...: one chat-bench run; its RESULT line is kept.
bench() {
    local name=$1 run=$2 out
    shift 2
    local load perf_pid=
    load=$(cut -d' ' -f1 /proc/loadavg)
    echo "+ chat-bench $*" >>"$LOG/commands.txt"
    if [[ -n "$PERF" && " $PERF " == *" $name "* ]]; then
        # profile the server over the warmup and the measured window
        perf record -q "${PERF_ARGS[@]}" -p "$chatd_pid" -o "$DIR/perf-$name-$run.data" \
            -- sleep "$(awk "BEGIN{print $WARMUP + $DURATION}")" >/dev/null 2>&1 &
        perf_pid=$!
    fi
    local db0 db1
    db0=$(db_ticks)
    if out=$("$BENCH" "$@" 2>>"$LOG/bench-$name.err"); then
        db1=$(db_ticks)
        out="$out $(db_cpu "$db0" "$db1" "$out")"
        echo "$name run=$run load1=$load ${out#RESULT }" >>"$RESULTS"
        echo "  $name #$run: ${out#RESULT }"
    else
        echo "  $name #$run: FAILED (see $LOG/bench-$name.err)"
        echo "$name run=$run FAILED" >>"$RESULTS"
    fi
    if [[ -n "$perf_pid" ]]; then
        wait "$perf_pid" || true
        perf report -i "$DIR/perf-$name-$run.data" --no-children --stdio -g none \
            --percent-limit 0.7 >"$DIR/perf-$name-$run.txt" 2>/dev/null || true
        echo "  $name #$run: profile of chatd in $DIR/perf-$name-$run.txt"
    fi
}

# set_linger MS: the one2one plugin's durable_linger_ms, applied by SIGHUP
set_linger() {
    sed -i "s/^durable_linger_ms = .*/durable_linger_ms = $1/" "$CONF"
    kill -HUP "$chatd_pid"
    sleep 1
}

# set_pace MS: legacy_pace_ms in the config, applied by SIGHUP (a live key;
# the reload is read off the loop in milliseconds, a second is plenty)
set_pace() {
    sed -i "s/^legacy_pace_ms = .*/legacy_pace_ms = $1/" "$CONF"
    kill -HUP "$chatd_pid"
    sleep 1
}

for ((run = 1; run <= RUNS; run++)); do
    echo "run-bench.sh: run $run of $RUNS"
    for s in $SET; do
        case $s in
        relay-pairs)
            bench "$s" "$run" pairs "${RELAY[@]}" -P 50 -W 8 --procs "$PROCS" "${TIMING[@]}" ;;
        pairs)
            bench "$s" "$run" pairs "${CHATD[@]}" -P 50 -W 8 --procs "$PROCS" \
                --ids "$DIR/ids-pairs-c$HASH_COST.txt" "${TIMING[@]}" ;;
        tls-pairs|ws-pairs|wss-pairs)
            if ((!XP)); then
                echo "  $s #$run: skipped (no such listener in this chatd)"
                continue
            fi
            case $s in
            tls-*) target=("${XTLS[@]}") ;;
            ws-*) target=("${XWS[@]}") ;;
            *) target=("${XWSS[@]}") ;;
            esac
            bench "$s" "$run" pairs "${target[@]}" -P 50 -W 8 --procs "$PROCS" \
                --ids "$DIR/ids-pairs-c$HASH_COST.txt" "${TIMING[@]}" ;;
        tls-handshakes)
            if ((!XP)); then
                echo "  $s #$run: skipped (no tls listener in this chatd)"
                continue
            fi
            bench "$s" "$run" login --handshakes "${XTLS[@]}" -L 50 --procs "$PROCS" \
                --ids "$DIR/ids-login-c$HASH_COST.txt" "${TIMING[@]}" ;;
        tls-conns|ws-conns)
            if ((!XP)); then
                echo "  $s #$run: skipped (no tls listener in this chatd)"
                continue
            fi
            restart_chatd
            if [[ $s == ws-* ]]; then target=("${XWS[@]}"); else target=("${XTLS[@]}"); fi
            bench "$s" "$run" conns "${target[@]}" -K "$CONNS" --procs 2 --concurrency 64 \
                --ids "$DIR/ids-conns-c$HASH_COST.txt" --duration 3 -q ;;
        group)
            bench "$s" "$run" group "${CHATD[@]}" -G 50 -S 5 -W 8 --procs "$PROCS" \
                --ids "$DIR/ids-group-c$HASH_COST.txt" "${TIMING[@]}" ;;
        group-durable)
            # issue 8: the same group, durable (stored once, then fanned out)
            bench "$s" "$run" group --durable "${CHATD[@]}" -G 50 -S 5 -W "$GROUP_DURABLE_W" \
                --procs "$PROCS" --ids "$DIR/ids-group-c$HASH_COST.txt" "${TIMING[@]}" ;;
        conns)
            restart_chatd
            bench "$s" "$run" conns "${CHATD[@]}" -K "$CONNS" --procs 2 --concurrency 64 \
                --ids "$DIR/ids-conns-c$HASH_COST.txt" --duration 3 -q ;;
        login)
            bench "$s" "$run" login "${CHATD[@]}" -L 50 \
                --ids "$DIR/ids-login-c$HASH_COST.txt" "${TIMING[@]}" ;;
        resume)
            bench "$s" "$run" login --resume "${CHATD[@]}" -L 50 \
                --ids "$DIR/ids-login-c$HASH_COST.txt" "${TIMING[@]}" ;;
        pairs-durable)
            # issue 8: protocol-2 durable messages, count and latency
            # send-to-ACK (the ACK comes after the COMMIT); run it beside
            # "pairs" in one BENCH_SET for the side-by-side figures
            bench "$s" "$run" pairs --durable "${CHATD[@]}" -P 50 -W 8 --procs "$PROCS" \
                --ids "$DIR/ids-pairs-c$HASH_COST.txt" "${TIMING[@]}" ;;
        pairs-durable-linger1)
            # the same with durable_linger_ms = 1 (by SIGHUP), then back
            set_linger 1
            bench "$s" "$run" pairs --durable "${CHATD[@]}" -P 50 -W 8 --procs "$PROCS" \
                --ids "$DIR/ids-pairs-c$HASH_COST.txt" "${TIMING[@]}"
            set_linger "${BENCH_DURABLE_LINGER_MS:-0}" ;;
        relay-pairs-150k)
            bench "$s" "$run" pairs "${RELAY[@]}" -P 50 -W 8 --rate 150000 --procs "$PROCS" \
                "${TIMING[@]}" ;;
        pairs-150k)
            bench "$s" "$run" pairs "${CHATD[@]}" -P 50 -W 8 --rate 150000 --procs "$PROCS" \
                --ids "$DIR/ids-pairs-c$HASH_COST.txt" "${TIMING[@]}" ;;
        pairs-seed)
            bench "$s" "$run" pairs "${CHATD[@]}" -P 500 -W 1 --procs "$PROCS" \
                --ids "$DIR/ids-seed-c$HASH_COST.txt" "${TIMING[@]}" ;;
        seed-paced|seed-unpaced|calm-paced|calm-unpaced)
            pace=0 rate=()
            [[ $s == *-paced ]] && pace=20
            [[ $s == calm-* ]] && rate=(--rate 10000)
            set_pace "$pace"
            bench "$s" "$run" pairs "${CHATD[@]}" -P 500 -W 1 "${rate[@]}" --procs "$PROCS" \
                --ids "$DIR/ids-seed-c$HASH_COST.txt" "${TIMING[@]}"
            set_pace "$LEGACY_PACE_MS" ;;
        pairs-calm)
            bench "$s" "$run" pairs "${CHATD[@]}" -P 50 -W 8 --rate "$CALM_RATE" \
                --ids "$DIR/ids-pairs-c$HASH_COST.txt" "${TIMING[@]}" ;;
        pairs-storm|pairs-rstorm)
            # the storm outlasts the pairs run (setup, warmup, window, drain);
            # pairs-rstorm: a reconnect storm with resume tokens instead
            storm=(login -L 20)
            [ "$s" = pairs-rstorm ] && storm=(login --resume -L 20)
            "$BENCH" "${storm[@]}" "${CHATD[@]}" --ids "$DIR/ids-storm-c$HASH_COST.txt" \
                --warmup 0 --duration "$(awk "BEGIN{print $WARMUP + $DURATION + 5}")" -q \
                >"$LOG/storm-$run.out" 2>>"$LOG/bench-storm.err" &
            storm_pid=$!
            bench "$s" "$run" pairs "${CHATD[@]}" -P 50 -W 8 --rate "$CALM_RATE" \
                --ids "$DIR/ids-pairs-c$HASH_COST.txt" "${TIMING[@]}"
            wait "$storm_pid" || true
            storm_pid=
            sed "s/^RESULT /storm-during-$s run=$run /" "$LOG/storm-$run.out" >>"$RESULTS"
            ;;
        *)
            echo "run-bench.sh: unknown scenario $s" >&2 ;;
        esac
    done
done

echo
echo "run-bench.sh: medians of $RUNS runs (raw results: $RESULTS)"
/usr/bin/python3 - "$RESULTS" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) < 3 or parts[2] == "FAILED":
        continue
    kv = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    rows.setdefault(parts[0], []).append(kv)

def med(name, key):
    vals = [float(r[key]) for r in rows.get(name, []) if key in r]
    return statistics.median(vals) if vals else None

def fmt(v, nd=0):
    return "-" if v is None else f"{v:,.{nd}f}"

cols = ["scenario", "runs", "rate/s", "p50 us", "p99 us", "p99.9 us", "lost", "dup",
        "gen cpu us/op", "srv cpu us/op", "rss B/conn"]
print(" | ".join(cols))
print(" | ".join("---" for _ in cols))
order = ["relay-pairs", "pairs", "pairs-durable", "pairs-durable-linger1", "group-durable", "tls-pairs", "ws-pairs", "wss-pairs", "relay-pairs-150k", "pairs-150k", "pairs-seed", "group", "conns", "tls-conns", "ws-conns", "tls-handshakes", "login", "resume", "pairs-calm",
         "pairs-storm", "storm-during-pairs-storm", "pairs-rstorm", "storm-during-pairs-rstorm"]
for name in order + sorted(set(rows) - set(order)):
    if name not in rows:
        continue
    print(" | ".join([name, str(len(rows[name])), fmt(med(name, "rate")),
                      fmt(med(name, "p50_us"), 1), fmt(med(name, "p99_us"), 1),
                      fmt(med(name, "p999_us"), 1), fmt(med(name, "lost")),
                      fmt(med(name, "dup")), fmt(med(name, "gen_cpu_us_per_op"), 2),
                      fmt(med(name, "srv_cpu_us_per_op"), 2),
                      fmt(med(name, "rss_per_conn_b"))]))
# chatd pairs as a fraction of the relay measured in the same run
ratios = []
relay = {r["run"]: float(r["rate"]) for r in rows.get("relay-pairs", [])}
for r in rows.get("pairs", []):
    if r["run"] in relay and relay[r["run"]] > 0:
        ratios.append(float(r["rate"]) / relay[r["run"]])
if ratios:
    print(f"\nchatd pairs / relay pairs (same run): median {statistics.median(ratios):.2f}"
          f" (runs: {', '.join(f'{x:.2f}' for x in ratios)})")
# each transport's pairs as a fraction of tcp pairs in the same run
tcp = {r["run"]: float(r["rate"]) for r in rows.get("pairs", [])}
for name in ("tls-pairs", "ws-pairs", "wss-pairs"):
    rs = [float(r["rate"]) / tcp[r["run"]] for r in rows.get(name, [])
          if tcp.get(r["run"], 0) > 0]
    if rs:
        print(f"{name} / pairs (same run): median {statistics.median(rs):.2f}"
              f" (runs: {', '.join(f'{x:.2f}' for x in rs)})")
EOF
