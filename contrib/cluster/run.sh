#!/usr/bin/env bash
# contrib/cluster/run.sh - `make cluster`: a whole chatd cluster on this
# machine, in the foreground, until Ctrl-C.
#
#   private MariaDB   127.0.0.1:$CLUSTER_MYSQL_PORT  (default 13316)
#   private Redis     127.0.0.1:$CLUSTER_REDIS_PORT  (default 16389)
#   chatd x3          127.0.0.1:6001, :6002, :6003   (node ids node1..node3)
#   their admin APIs  127.0.0.1:6081, :6082, :6083   (token $CLUSTER_ADMIN_TOKEN)
#   nginx (stream)    127.0.0.1:8000, balancing the three nodes
#
# Everything lives in var/cluster (CLUSTER_DIR): data, generated configs, pid
# files and logs.  Nothing touches a system service: MariaDB and Redis come
# from contrib/stack/*.sh, nginx runs with a private prefix (-p) in the
# foreground (daemon off) so that this script owns its pid.  Ctrl-C (or TERM)
# stops, by pid, everything this script started: nginx first, then the
# nodes, then Redis and MariaDB.
#
# Environment: BUILD (default ./build, must hold chatd and plugins/),
# CLUSTER_DIR, CLUSTER_MYSQL_PORT, CLUSTER_REDIS_PORT, CLUSTER_NODE_PORTS
# (default "6001 6002 6003"), CLUSTER_ADMIN_PORTS (default "6081 6082 6083"),
# CLUSTER_ADMIN_TOKEN (default cluster-admin), CLUSTER_LB (default
# 127.0.0.1:8000).  A rolling restart: docs/operations.md, "Draining and
# rolling upgrades".
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-$ROOT/build}
DIR=${CLUSTER_DIR:-$ROOT/var/cluster}
MYSQL_PORT=${CLUSTER_MYSQL_PORT:-13316}
REDIS_PORT=${CLUSTER_REDIS_PORT:-16389}
read -r -a NODE_PORTS <<<"${CLUSTER_NODE_PORTS:-6001 6002 6003}"
read -r -a ADMIN_PORTS <<<"${CLUSTER_ADMIN_PORTS:-6081 6082 6083}"
ADMIN_TOKEN=${CLUSTER_ADMIN_TOKEN:-cluster-admin}
LB=${CLUSTER_LB:-127.0.0.1:8000}
STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so
DB_NAME=chat

die() {
    echo "cluster: $*" >&2
    exit 1
}

say() {
    echo "cluster: $*"
}

# ---- checks before starting anything ----------------------------------------
[ -x "$BUILD/chatd" ] || die "$BUILD/chatd not found: build first (make)"
[ -d "$BUILD/plugins" ] || die "$BUILD/plugins not found: build first (make)"
BUILD=$(cd "$BUILD" && pwd)
NGINX=$(command -v nginx || true)
[ -n "$NGINX" ] || [ ! -x /usr/sbin/nginx ] || NGINX=/usr/sbin/nginx
[ -n "$NGINX" ] || die "nginx not installed (contrib/deps.sh installs nginx-light and libnginx-mod-stream)"
if [ -f "$STREAM_MODULE" ]; then
    LOAD_MODULE="load_module $STREAM_MODULE;"
elif "$NGINX" -V 2>&1 | grep -q -- '--with-stream\( \|$\)'; then
    LOAD_MODULE="" # built in
else
    die "nginx has no stream module: apt-get install libnginx-mod-stream"
fi

# port_busy PORT: something already listens on 127.0.0.1:PORT
port_busy() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

for p in "${NODE_PORTS[@]}" "${LB##*:}"; do
    ! port_busy "$p" || die "127.0.0.1:$p is already in use (another cluster running?)"
done

mkdir -p "$DIR/mariadb" "$DIR/redis" "$DIR/nginx/logs"

# ---- teardown -----------------------------------------------------------------
PIDS=()        # chatd and nginx, in start order
NAMES=()       # what each of PIDS is
STARTED_DB=0
STARTED_REDIS=0
cleanup() {
    local i pid
    trap - INT TERM EXIT
    echo
    say "stopping"
    # reverse order: nginx (last started) first, then the nodes
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[$i]}
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    ((STARTED_REDIS)) && "$ROOT/contrib/stack/redis.sh" stop "$DIR/redis" || true
    ((STARTED_DB)) && "$ROOT/contrib/stack/mariadb.sh" stop "$DIR/mariadb" || true
    say "stopped; logs and data stay in $DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_port PORT PID NAME LOG: until PORT accepts, failing if PID exits.
wait_port() {
    local port=$1 pid=$2 name=$3 log=$4 i
    for ((i = 0; i < 300; i++)); do
        port_busy "$port" && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "---- $log (tail) ----" >&2
            tail -n 30 "$log" >&2 || true
            die "$name exited during start"
        fi
        sleep 0.05
    done
    die "$name did not listen on 127.0.0.1:$port within 15 s (see $log)"
}

# ---- MariaDB and Redis ----------------------------------------------------------
say "starting MariaDB on 127.0.0.1:$MYSQL_PORT"
STARTED_DB=1
"$ROOT/contrib/stack/mariadb.sh" start "$DIR/mariadb" "$MYSQL_PORT"
"$ROOT/contrib/stack/mariadb.sh" createdb "$DIR/mariadb" "$DB_NAME"
say "starting Redis on 127.0.0.1:$REDIS_PORT"
STARTED_REDIS=1
"$ROOT/contrib/stack/redis.sh" start "$DIR/redis" "$REDIS_PORT"

# ---- node configs ---------------------------------------------------------------
# node_conf N PORT ADMIN_PORT: etc/chat.conf with this cluster's values;
# absolute paths, since the generated file does not live next to etc/.  nginx
# reaches the nodes from 127.0.0.1, so that address is trusted: exempt from
# the caps on connections per client address, which would otherwise apply to
# nginx.
node_conf() {
    awk -v listen="127.0.0.1:$2" -v node="node$1" -v admin="127.0.0.1:$3" \
        -v token="$ADMIN_TOKEN" \
        -v plugdir="$BUILD/plugins" -v mig="$ROOT/sql" \
        -v mport="$MYSQL_PORT" -v rport="$REDIS_PORT" -v db="$DB_NAME" '
        function set(v) { sub(/=.*/, "= " v) }
        /^\[/ { sec = $0 }
        sec == "[server]"  && /^listen[ \t]*=/      { set(listen) }
        sec == "[server]"  && /^node_id[ \t]*=/     { set(node) }
        sec == "[server]"  && /^trusted[ \t]*=/     { set("127.0.0.1") }
        sec == "[plugins]" && /^dir[ \t]*=/         { set(plugdir) }
        sec == "[mysql]"   && /^host[ \t]*=/        { set("127.0.0.1") }
        sec == "[mysql]"   && /^port[ \t]*=/        { set(mport) }
        sec == "[mysql]"   && /^socket[ \t]*=/      { set("") }
        sec == "[mysql]"   && /^database[ \t]*=/    { set(db) }
        sec == "[mysql]"   && /^migrations[ \t]*=/  { set(mig) }
        sec == "[redis]"   && /^host[ \t]*=/        { set("127.0.0.1") }
        sec == "[redis]"   && /^port[ \t]*=/        { set(rport) }
        sec == "[admin]"   && /^listen[ \t]*=/      { set(admin) }
        sec == "[admin]"   && /^token[ \t]*=/       { set(token) }
        { print }
    ' "$ROOT/etc/chat.conf"
}

for i in "${!NODE_PORTS[@]}"; do
    node_conf $((i + 1)) "${NODE_PORTS[$i]}" "${ADMIN_PORTS[$i]}" >"$DIR/node$((i + 1)).conf"
done

say "running migrations"
"$BUILD/chatd" --migrate -c "$DIR/node1.conf"

# ---- chatd nodes ------------------------------------------------------------------
for i in "${!NODE_PORTS[@]}"; do
    n=$((i + 1))
    "$BUILD/chatd" -c "$DIR/node$n.conf" >"$DIR/node$n.log" 2>&1 &
    PIDS+=($!)
    NAMES+=("node$n")
    wait_port "${NODE_PORTS[$i]}" "$!" "chatd node$n" "$DIR/node$n.log"
    say "node$n (pid $!) listening on 127.0.0.1:${NODE_PORTS[$i]}, log $DIR/node$n.log"
done

# ---- nginx --------------------------------------------------------------------------
NGX=$DIR/nginx
SERVERS=""
for p in "${NODE_PORTS[@]}"; do
    SERVERS+="        server 127.0.0.1:$p max_fails=1 fail_timeout=10s;"$'\n'
done
NOFILE=$(ulimit -Hn)
[ "$NOFILE" = unlimited ] && NOFILE=65536
WORKER_CONN=$((NOFILE - 100))
[ "$WORKER_CONN" -gt 1024 ] || WORKER_CONN=1024
while IFS= read -r line; do
    case $line in
    @SERVERS@) printf '%s' "$SERVERS" ;;
    *)
        line=${line//@STREAM_MODULE@/$LOAD_MODULE}
        line=${line//@LISTEN@/$LB}
        line=${line//@WORKER_CONNECTIONS@/$WORKER_CONN}
        line=${line//@NOFILE@/$NOFILE}
        printf '%s\n' "$line"
        ;;
    esac
done <"$ROOT/contrib/nginx/nginx.conf.in" >"$NGX/nginx.conf"

NGINX_ARGS=(-e "$NGX/logs/error.log" -p "$NGX/" -c "$NGX/nginx.conf")
"$NGINX" -t -q "${NGINX_ARGS[@]}" || die "nginx rejected $NGX/nginx.conf"
"$NGINX" "${NGINX_ARGS[@]}" -g 'daemon off;' &
PIDS+=($!)
NAMES+=(nginx)
wait_port "${LB##*:}" "$!" nginx "$NGX/logs/error.log"

cat <<EOF

  chatd cluster is up (Ctrl-C stops it all)

    MariaDB  127.0.0.1:$MYSQL_PORT   database $DB_NAME, user chat/chat
    Redis    127.0.0.1:$REDIS_PORT
$(for i in "${!NODE_PORTS[@]}"; do echo "    node$((i + 1))    127.0.0.1:${NODE_PORTS[$i]}   admin 127.0.0.1:${ADMIN_PORTS[$i]}   config $DIR/node$((i + 1)).conf"; done)
    nginx    $LB   config $NGX/nginx.conf, logs $NGX/logs/

  connect:   $BUILD/chat-cli $LB
  (two terminals: register in each, log in, then chat:ID:MSG)

EOF

# Stay until Ctrl-C.  A node that dies is reported and the others carry on
# (that is the point of a cluster: its clients reconnect through nginx);
# without nginx nothing is reachable, so that ends the run.
declare -A REPORTED=()
while :; do
    for i in "${!PIDS[@]}"; do
        pid=${PIDS[$i]}
        name=${NAMES[$i]}
        kill -0 "$pid" 2>/dev/null || [ -n "${REPORTED[$pid]:-}" ] || {
            REPORTED[$pid]=1
            if [ "$name" = nginx ]; then
                say "nginx (pid $pid) exited; stopping the rest (see $NGX/logs/error.log)"
                exit 1
            fi
            say "$name (pid $pid) exited; the other nodes carry on (log $DIR/$name.log)."
            say "restart it by hand with: $BUILD/chatd -c $DIR/$name.conf"
        }
    done
    sleep 1
done
