#!/usr/bin/env bash
# contrib/cluster/run.sh - `make cluster`: a whole chatd cluster on this
# machine, in the foreground, until Ctrl-C.
#
#   private MariaDB   127.0.0.1:$CLUSTER_MYSQL_PORT  (default 13316)
#   private Redis     127.0.0.1:$CLUSTER_REDIS_PORT  (default 16389)
#   chatd x3          127.0.0.1:6001, :6002, :6003   (node ids node1..node3)
#   their admin APIs  127.0.0.1:6081, :6082, :6083   (token $CLUSTER_ADMIN_TOKEN)
#   their ws listeners 127.0.0.1:6011, :6012, :6013 (path /chat), when this
#                     chatd takes `listen = tcp://..., ws://...` (checked with
#                     chatd -t; without it the nodes listen on tcp only)
#   nginx (stream)    127.0.0.1:8000, balancing the three nodes
#   nginx (stream ssl) 127.0.0.1:8443: TLS ends in nginx, plain TCP to the nodes
#   nginx (http)      127.0.0.1:8080/chat: WebSocket, proxied to the ws listeners;
#                     127.0.0.1:8080/: the web client (contrib/web), which
#                     the nodes serve from their [web] root, proxied too
#
# The certificate of 8443 is self-signed for localhost, made once in
# $CLUSTER_DIR/tls (contrib/stack/tls-cert.sh); trust it with
# chat-cli --ca var/cluster/tls/cert.pem tls://127.0.0.1:8443.
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
# 127.0.0.1:8000), CLUSTER_WS_PORTS (default "6011 6012 6013"),
# CLUSTER_TLS_LB (default 127.0.0.1:8443), CLUSTER_WS_LB (default
# 127.0.0.1:8080).  A rolling restart: docs/operations.md, "Draining and
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
read -r -a WS_PORTS <<<"${CLUSTER_WS_PORTS:-6011 6012 6013}"
TLS_LB=${CLUSTER_TLS_LB:-127.0.0.1:8443}
WS_LB=${CLUSTER_WS_LB:-127.0.0.1:8080}
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

for p in "${NODE_PORTS[@]}" "${WS_PORTS[@]}" "${LB##*:}" "${TLS_LB##*:}" "${WS_LB##*:}"; do
    ! port_busy "$p" || die "127.0.0.1:$p is already in use (another cluster running? make run?)"
done

mkdir -p "$DIR/mariadb" "$DIR/redis" "$DIR/nginx/logs" "$DIR/nginx/temp"
"$ROOT/contrib/stack/tls-cert.sh" "$DIR/tls"

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
# node_conf N LISTEN ADMIN_PORT: etc/chat.conf with this cluster's values;
# absolute paths, since the generated file does not live next to etc/ ([tls]
# points at this cluster's certificate, should etc/chat.conf have that
# section: the nodes have no tls:// listener, nginx ends TLS).  nginx
# reaches the nodes from 127.0.0.1, so that address is trusted: exempt from
# the caps on connections per client address, and allowed to send the PROXY
# protocol header that nginx opens each connection with (proxy_protocol on
# in nginx.conf, [server] proxy_protocol = on here), so that the nodes'
# limits and logs see each client's own address.
node_conf() {
    awk -v listen="$2" -v node="node$1" -v admin="127.0.0.1:$3" \
        -v token="$ADMIN_TOKEN" -v tlsdir="$DIR/tls" \
        -v plugdir="$BUILD/plugins" -v mig="$ROOT/sql" -v web="$ROOT/contrib/web" \
        -v mport="$MYSQL_PORT" -v rport="$REDIS_PORT" -v db="$DB_NAME" '
        function set(v) { sub(/=.*/, "= " v) }
        /^\[/ { sec = $0 }
        sec == "[server]"  && /^listen[ \t]*=/      { set(listen) }
        sec == "[server]"  && /^node_id[ \t]*=/     { set(node) }
        sec == "[server]"  && /^trusted[ \t]*=/     { set("127.0.0.1") }
        sec == "[server]"  && /^proxy_protocol[ \t]*=/ { set("on") }
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
        sec == "[tls]"     && /^cert[ \t]*=/        { set(tlsdir "/cert.pem") }
        sec == "[tls]"     && /^key[ \t]*=/         { set(tlsdir "/key.pem") }
        sec == "[web]"     && /^root[ \t]*=/        { set(web) }
        { print }
    ' "$ROOT/etc/chat.conf"
}

# node_listen I: the node's listeners: tcp, and ws when this chatd has it.
node_listen() {
    if ((WS_OK)); then
        echo "tcp://127.0.0.1:${NODE_PORTS[$1]}, ws://127.0.0.1:${WS_PORTS[$1]}/chat"
    else
        echo "127.0.0.1:${NODE_PORTS[$1]}"
    fi
}

WS_OK=1
node_conf 1 "$(node_listen 0)" "${ADMIN_PORTS[0]}" >"$DIR/node1.conf"
if ! "$BUILD/chatd" -t -c "$DIR/node1.conf" >"$DIR/check.log" 2>&1; then
    WS_OK=0
    say "this chatd has no ws:// listener yet ($(tail -n 1 "$DIR/check.log"));"
    say "the nodes listen on tcp only and nginx's WebSocket port has nothing behind it"
fi
for i in "${!NODE_PORTS[@]}"; do
    node_conf $((i + 1)) "$(node_listen "$i")" "${ADMIN_PORTS[$i]}" >"$DIR/node$((i + 1)).conf"
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
WS_SERVERS=""
for p in "${WS_PORTS[@]}"; do
    WS_SERVERS+="        server 127.0.0.1:$p max_fails=1 fail_timeout=10s;"$'\n'
done
NOFILE=$(ulimit -Hn)
[ "$NOFILE" = unlimited ] && NOFILE=65536
WORKER_CONN=$((NOFILE - 100))
[ "$WORKER_CONN" -gt 1024 ] || WORKER_CONN=1024
while IFS= read -r line; do
    case $line in
    @SERVERS@) printf '%s' "$SERVERS" ;;
    @WS_SERVERS@) printf '%s' "$WS_SERVERS" ;;
    *)
        line=${line//@STREAM_MODULE@/$LOAD_MODULE}
        line=${line//@LISTEN@/$LB}
        line=${line//@TLS_LISTEN@/$TLS_LB}
        line=${line//@TLS_CERT@/$DIR/tls/cert.pem}
        line=${line//@TLS_KEY@/$DIR/tls/key.pem}
        line=${line//@WS_LISTEN@/$WS_LB}
        line=${line//@WORKER_CONNECTIONS@/$WORKER_CONN}
        line=${line//@NOFILE@/$NOFILE}
        line=${line//@PROXY_PROTOCOL@/on}
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
wait_port "${TLS_LB##*:}" "$!" nginx "$NGX/logs/error.log"
wait_port "${WS_LB##*:}" "$!" nginx "$NGX/logs/error.log"

cat <<EOF

  chatd cluster is up (Ctrl-C stops it all)

    MariaDB  127.0.0.1:$MYSQL_PORT   database $DB_NAME, user chat/chat
    Redis    127.0.0.1:$REDIS_PORT
$(for i in "${!NODE_PORTS[@]}"; do echo "    node$((i + 1))    $(node_listen "$i")   admin 127.0.0.1:${ADMIN_PORTS[$i]}   config $DIR/node$((i + 1)).conf"; done)
    nginx    $LB (tcp)   $TLS_LB (tls)   $WS_LB/chat (ws$( ((WS_OK)) || echo ': no node has a ws listener yet'))
             config $NGX/nginx.conf, logs $NGX/logs/

  connect:   $BUILD/chat-cli $LB
             $BUILD/chat-cli --ca $DIR/tls/cert.pem tls://$TLS_LB
             $BUILD/chat-cli ws://$WS_LB/chat
  browser:   http://$WS_LB/  (the web client, served by the nodes through nginx)
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
