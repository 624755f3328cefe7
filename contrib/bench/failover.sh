#!/usr/bin/env bash
# contrib/bench/failover.sh - the failover login storm (issue 12) on this
# machine: three chatd nodes behind nginx, N legacy users logged in on
# node1, node1 killed, chat-bench's `failover` scenario measuring the
# re-login curve through nginx and the chat latency of other pairs.
#
#   contrib/bench/failover.sh [on|off ...]     (default: on off)
#
# Each mode is run FO_RUNS times (3) on one cluster:
#   on   every node has the authentication cache (one shared secret)
#   off  the survivors' cache is switched off (SIGHUP) just before the kill,
#        so each re-login costs a yescrypt verification; node1 keeps its
#        cache so that the fill (N logins on node1) stays fast
# Before each run the cache entries of the N users are written to Redis as
# their logins would have left them (warm_cache below), so the fill is fast
# (FO_COLD=1: it costs N yescrypt verifications instead).  The users are inserted with SQL,
# all with one yescrypt hash of the password at libcrypt's default cost
# (the cost of etc/chat.conf's hash_cost = 0): registering N users through
# chatd would cost N more hashes, and a verification costs the same whatever
# the salt.  Everything else is etc/chat.conf as shipped, with the cluster's
# addresses (as contrib/cluster/run.sh writes them) and no [web] root (its
# relative path does not resolve from FO_DIR, and nothing here serves it).
#
# Environment: BUILD (./build), FO_DIR (var/failover), FO_N (10000 users),
# FO_PAIRS (20), FO_RATE (200 msg/s), FO_RUNS (3), FO_STORM_MAX (120 s),
# FO_CALM (10 s), FO_LOGIN_RATE and FO_LOGIN_QUEUE (the survivors'
# [plugin.login] login_rate and login_queue_max; default etc/chat.conf's;
# node1 keeps etc/chat.conf's so that the fill, which is not measured, is
# not slowed by them), FO_HEARTBEAT_TTL ([redis] heartbeat_ttl), FO_COLD (1: no warm_cache, the fill hashes), FO_BASE_PORT (26000: MariaDB +1, Redis +2, nodes +11..13,
# admin +21..23, nginx +30).  Output: FO_DIR/results.txt (RESULT lines) and
# one log per run.  Stops, by pid, everything it started.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=$(cd "${BUILD:-$ROOT/build}" && pwd)
DIR=${FO_DIR:-$ROOT/var/failover}
N=${FO_N:-10000}
PAIRS=${FO_PAIRS:-20}
RATE=${FO_RATE:-200}
RUNS=${FO_RUNS:-3}
STORM_MAX=${FO_STORM_MAX:-120}
CALM=${FO_CALM:-10}
BASE=${FO_BASE_PORT:-26000}
MYSQL_PORT=$((BASE + 1))
REDIS_PORT=$((BASE + 2))
NODE_PORTS=($((BASE + 11)) $((BASE + 12)) $((BASE + 13)))
ADMIN_PORTS=($((BASE + 21)) $((BASE + 22)) $((BASE + 23)))
LB_PORT=$((BASE + 30))
PASSWORD=benchpw1
MODES=("$@")
[ ${#MODES[@]} -gt 0 ] || MODES=(on off)
STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so

say() { echo "failover: $*" >&2; }
die() { say "$*"; exit 1; }

# set_cache N PID on|off: node N's config to that, SIGHUP, wait for its log
set_cache() {
    local mark
    ! cmp -s "$DIR/node$1.$3.conf" "$DIR/node$1.conf" || return 0
    mark=$(wc -c <"$DIR/node$1.log")
    cp "$DIR/node$1.$3.conf" "$DIR/node$1.conf"
    kill -HUP "$2"
    for ((i = 0; i < 200; i++)); do
        tail -c +"$((mark + 1))" "$DIR/node$1.log" | grep -q "auth_cache=$3" && return 0
        sleep 0.05
    done
    die "node$1 did not report auth_cache=$3 after SIGHUP"
}

# `failover.sh set-cache N PID on|off`: the --hook of an "off" run
if [ "${1:-}" = set-cache ]; then
    set_cache "$2" "$3" "$4"
    exit 0
fi

mkdir -p "$DIR/mariadb" "$DIR/redis" "$DIR/nginx/logs"
declare -A PID=()
cleanup() {
    trap - EXIT INT TERM
    for k in nginx node3 node2 node1; do
        [ -n "${PID[$k]:-}" ] && kill -TERM "${PID[$k]}" 2>/dev/null || true
    done
    for k in nginx node3 node2 node1; do
        [ -n "${PID[$k]:-}" ] && wait "${PID[$k]}" 2>/dev/null || true
    done
    "$ROOT/contrib/stack/redis.sh" stop "$DIR/redis" >/dev/null 2>&1 || true
    "$ROOT/contrib/stack/mariadb.sh" stop "$DIR/mariadb" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
    for ((i = 0; i < 600; i++)); do
        port_busy "$1" && return 0
        sleep 0.05
    done
    die "nothing listens on :$1 after 30 s"
}

"$ROOT/contrib/stack/mariadb.sh" start "$DIR/mariadb" "$MYSQL_PORT" >/dev/null
"$ROOT/contrib/stack/mariadb.sh" createdb "$DIR/mariadb" chat >/dev/null
"$ROOT/contrib/stack/redis.sh" start "$DIR/redis" "$REDIS_PORT" >/dev/null
sql() { mariadb --no-defaults -h127.0.0.1 -P"$MYSQL_PORT" -uchat -pchat chat "$@"; }

[ -s "$DIR/secret" ] || { openssl rand -hex 32 >"$DIR/secret"; chmod 0400 "$DIR/secret"; }

# node_conf N CACHE(on|off): etc/chat.conf with this cluster's values, to
# node<N>.<CACHE>.conf
node_conf() {
    awk -v listen="127.0.0.1:${NODE_PORTS[$1 - 1]}" -v node="node$1" \
        -v admin="127.0.0.1:${ADMIN_PORTS[$1 - 1]}" -v plugdir="$BUILD/plugins" \
        -v mig="$ROOT/sql" -v mport="$MYSQL_PORT" -v rport="$REDIS_PORT" \
        -v secret="$([ "$2" = on ] && echo "$DIR/secret")" \
        -v lrate="$([ "$1" != 1 ] && echo "${FO_LOGIN_RATE:-}")" \
        -v lqueue="$([ "$1" != 1 ] && echo "${FO_LOGIN_QUEUE:-}")" \
        -v hbttl="${FO_HEARTBEAT_TTL:-}" '
        function set(v) { sub(/=.*/, "= " v) }
        /^\[/ { sec = $0 }
        sec == "[server]"  && /^listen[ \t]*=/      { set(listen) }
        sec == "[server]"  && /^node_id[ \t]*=/     { set(node) }
        sec == "[server]"  && /^trusted[ \t]*=/     { set("127.0.0.1") }
        sec == "[plugins]" && /^dir[ \t]*=/         { set(plugdir) }
        sec == "[mysql]"   && /^port[ \t]*=/        { set(mport) }
        sec == "[mysql]"   && /^migrations[ \t]*=/  { set(mig) }
        sec == "[redis]"   && /^port[ \t]*=/        { set(rport) }
        sec == "[admin]"   && /^listen[ \t]*=/      { set(admin) }
        sec == "[web]"     && /^root[ \t]*=/        { set("") }
        sec == "[plugin.login]" && /^login_rate[ \t]*=/ && lrate != "" { set(lrate) }
        sec == "[plugin.login]" && /^login_queue_max[ \t]*=/ && lqueue != "" { set(lqueue) }
        sec == "[redis]"   && /^heartbeat_ttl[ \t]*=/ && hbttl != "" { set(hbttl) }
        { print }
        sec == "[plugin.login]" && /^auth_cache_ttl/ && secret != "" {
            print "auth_cache_secret_file = " secret }
    ' "$ROOT/etc/chat.conf" >"$DIR/node$1.$2.conf"
}

start_node() {
    "$BUILD/chatd" -c "$DIR/node$1.conf" >>"$DIR/node$1.log" 2>&1 &
    PID[node$1]=$!
    wait_port "${NODE_PORTS[$1 - 1]}"
}

for n in 1 2 3; do
    node_conf $n on
    node_conf $n off
    cp "$DIR/node$n.on.conf" "$DIR/node$n.conf"
done
"$BUILD/chatd" --migrate -c "$DIR/node1.conf" >/dev/null

# ---- users: N + 2 x PAIRS, inserted with one default-cost yescrypt hash ----
NEED=$((N + 2 * PAIRS))
IDS=$DIR/ids.txt
if [ ! -s "$IDS" ] || [ "$(grep -c '^user ' "$IDS")" -lt "$NEED" ]; then
    say "inserting $NEED users"
    HASH=$(python3 -c '
import ctypes, sys
c = ctypes.CDLL("libcrypt.so.1")
c.crypt_gensalt.restype = ctypes.c_char_p
c.crypt.restype = ctypes.c_char_p
s = c.crypt_gensalt(b"$y$", 0, None, 0)
print(c.crypt(sys.argv[1].encode(), s).decode())' "$PASSWORD")
    case $HASH in '$y$'*) ;; *) die "no yescrypt hash: $HASH" ;; esac
    sql -e "DELETE FROM users WHERE name LIKE 'fo\\_%'"
    python3 -c '
import sys
n, h = int(sys.argv[1]), sys.argv[2]
for i in range(0, n, 1000):
    print("INSERT INTO users (name, pwhash) VALUES " + ",".join(
        "(\x27fo_%d\x27,\x27%s\x27)" % (j, h) for j in range(i, min(n, i + 1000))) + ";")
' "$NEED" "$HASH" | sql
    sql -N -e "SELECT id, name FROM users WHERE name LIKE 'fo\\_%' ORDER BY id" |
        awk -v pw="$PASSWORD" '{ print "user " $1 " " $2 " " pw }' >"$IDS"
fi

# warm_cache: the authentication cache entries of every user, as N logins
# within the last hour would have left them (the HMAC of authcache.c, from
# the secret, each id, the users row's hash and the password), so that the
# fill does not cost N yescrypt verifications on a busy machine (about 4/s
# here: 40 minutes for 10,000).  The storm is what is measured; it finds
# the cache as a real cluster would.
warm_cache() {
    sql -N -e "SELECT id, pwhash FROM users WHERE name LIKE 'fo\\_%'" |
        python3 -c '
import hashlib, hmac, sys
secret = open(sys.argv[1], "rb").read().rstrip(b"\r\n")
pw, ttl = sys.argv[2].encode(), sys.argv[3]
out = sys.stdout.buffer
for line in sys.stdin:
    uid, h = line.split()
    uid, h = int(uid), h.encode()
    msg = b"chatd-authcache-v1" + uid.to_bytes(8, "big") + len(h).to_bytes(4, "big") + h + pw
    mac = hmac.new(secret, msg, hashlib.sha256).digest()
    key = b"chatd:kv:login:u:%d" % uid
    args = [b"SET", key, mac, b"EX", ttl.encode()]
    out.write(b"*%d\r\n" % len(args))
    for a in args:
        out.write(b"$%d\r\n%s\r\n" % (len(a), a))
' "$DIR/secret" "$PASSWORD" 3600 | redis-cli -p "$REDIS_PORT" --pipe >/dev/null
}

for n in 1 2 3; do start_node $n; done

NOFILE=$(ulimit -Hn)
[ "$NOFILE" = unlimited ] && NOFILE=65536
if [ -f "$STREAM_MODULE" ]; then LOAD="load_module $STREAM_MODULE;"; else LOAD=""; fi
SERVERS=""
for p in "${NODE_PORTS[@]}"; do
    SERVERS+="        server 127.0.0.1:$p max_fails=1 fail_timeout=10s;"$'\n'
done
# the tcp part of contrib/nginx/nginx.conf.in (the same balancing and
# failover settings; no TLS or WebSocket ports)
cat >"$DIR/nginx/nginx.conf" <<EOF
$LOAD
worker_processes auto;
worker_rlimit_nofile $NOFILE;
pid nginx.pid;
error_log logs/error.log notice;
events { worker_connections $((NOFILE - 100)); }
stream {
    upstream chatd {
        zone chatd 64k;
        least_conn;
$SERVERS    }
    server {
        listen 127.0.0.1:$LB_PORT;
        proxy_pass chatd;
        proxy_connect_timeout 1s;
        proxy_next_upstream on;
        proxy_next_upstream_tries 3;
        proxy_next_upstream_timeout 5s;
        proxy_timeout 1h;
        proxy_socket_keepalive on;
        tcp_nodelay on;
    }
}
EOF
nginx -e "$DIR/nginx/logs/error.log" -p "$DIR/nginx/" -c "$DIR/nginx/nginx.conf" \
    -g 'daemon off;' &
PID[nginx]=$!
wait_port "$LB_PORT"

# ---- runs ------------------------------------------------------------------
for mode in "${MODES[@]}"; do
    for ((r = 1; r <= RUNS; r++)); do
        cp "$DIR/node1.on.conf" "$DIR/node1.conf"
        [ "${FO_COLD:-0}" = 1 ] || warm_cache
        port_busy "${NODE_PORTS[0]}" || start_node 1
        for n in 2 3; do set_cache $n "${PID[node$n]}" on; done
        HOOK=true
        [ "$mode" = off ] && HOOK="FO_DIR=$DIR $0 set-cache 2 ${PID[node2]} off && FO_DIR=$DIR $0 set-cache 3 ${PID[node3]} off"
        CMD=("$BUILD/chat-bench" failover -t "127.0.0.1:${NODE_PORTS[0]}"
             -t "127.0.0.1:$LB_PORT" -t "127.0.0.1:${NODE_PORTS[1]}"
             -t "127.0.0.1:${NODE_PORTS[2]}" -K "$N" -P "$PAIRS" --rate "$RATE"
             --victim-pid "${PID[node1]}" --ids "$IDS" --src-ips 64
             --calm "$CALM" --storm-max "$STORM_MAX" --hook "$HOOK")
        say "mode $mode run $r: ${CMD[*]}"
        log=$DIR/run-$mode-$r.log
        load0=$(cut -d' ' -f1 /proc/loadavg)
        FO_DIR=$DIR "${CMD[@]}" >"$log" 2>&1 || { tail -20 "$log"; die "chat-bench failed"; }
        wait "${PID[node1]}" 2>/dev/null || true
        unset 'PID[node1]'
        line=$(grep '^RESULT' "$log")
        echo "mode=$mode run=$r load1_before=$load0 load1_after=$(cut -d' ' -f1 /proc/loadavg) login_rate=${FO_LOGIN_RATE:-conf} login_queue_max=${FO_LOGIN_QUEUE:-conf} heartbeat_ttl=${FO_HEARTBEAT_TTL:-conf} $line" |
            tee -a "$DIR/results.txt"
    done
done
