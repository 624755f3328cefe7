"""Integration-test harness for chatd (python3 standard library only).

Integration tests start the real chatd against a real MariaDB and Redis and
talk to it over TCP.  Every wait is a poll with a deadline, never a fixed
sleep; everything a test starts is stopped when the interpreter exits, even
when the test failed.

Environment (set by the ctest registration in tests/integration/CMakeLists.txt;
the defaults make `python3 -m unittest test_x` work by hand in this folder):
    CHATD                 the chatd binary            (CHAT_SRC/build/chatd)
    CHAT_PLUGIN_DIR       business plugins            (CHAT_SRC/build/plugins)
    CHAT_TEST_PLUGIN_DIR  test fixture plugins        (CHAT_SRC/build/tests/plugins)
    CHAT_SRC              the source tree             (two folders up from here)
    CHAT_TEST_START_TIMEOUT  seconds chatd may take to listen (20; more
                          for chatd under valgrind: docs/fuzzing.md, Memory)
    CHAT_TEST_MYSQL_DIR, CHAT_TEST_MYSQL_PORT, CHAT_TEST_MYSQL_SOCKET,
    CHAT_TEST_REDIS_DIR, CHAT_TEST_REDIS_PORT
                          the run's MariaDB and Redis (contrib/test.sh starts
                          them once per run); when unset, Stack() starts its
                          own with contrib/stack/*.sh

Stack() -- the run's MariaDB + Redis
    Uses the CHAT_TEST_* servers when set, else starts one MariaDB and one
    Redis per process on free ports in a temp dir (shared by every Stack() of
    the process, stopped at exit).
    .mysql_port, .mysql_socket, .redis_port      where they listen (127.0.0.1)
    .new_database(prefix="t") -> name            a fresh, empty database
    .sql(db, query) -> [tuple of str, ...]       rows via the mariadb client
                                                 over the socket as the server's
                                                 administrator (root in CI); db
                                                 may be None; NULL comes back
                                                 as None
    .redis_cli(*args) -> str                     redis-cli output, stripped
    Stack.private(redis=True, mysql=False)       NEW servers of its own for fault
                                                 tests (the kinds not asked for are
                                                 the shared ones); adds
    .stop_redis(), .start_redis(), .stop_mysql(), .start_mysql()  (same ports,
    same data), .close(); a context manager; stopped at exit anyway.

Node(stack, db=None, plugins=("login","friend","one2one","group","offline"),
     plugin_dir=None, conf=None, node_id=None, redis=True, mysql=True,
     migrate=True, args=(), tls=False, ws=False, wss=False)
    Writes a config in a temp dir: [server] listen 127.0.0.1:<free port>,
    log_level debug, legacy_pace_ms 0 (Client splits lines; a test of
    pacing removes the key) (node_id when given); [plugins] dir = plugin_dir
    or CHAT_PLUGIN_DIR, enabled = plugins; [plugin.friend] policy = open and
    [plugin.group] join = open (the seed's behaviour, as etc/chat.conf);
    [limits] every rate off (LIMIT_KEYS = "off": tests flood from 127.0.0.1);
    [mysql] (when mysql) the stack's
    MariaDB over TCP as chat/chat, database db (a fresh one when None),
    migrations CHAT_SRC/sql; [redis] (when redis) the stack's Redis,
    heartbeat_ttl 3.  `conf` = {section: {key: value}} is merged over that:
    a value None removes the key, a section None removes the section.
    Runs `chatd --migrate -c CONF` when migrate and mysql, then starts
    `CHATD -c CONF [args]` with stdout+stderr to a log file, and waits (20 s)
    until chatd logs "listening on"; on failure raises NodeError with the log
    tail.  stack may be None when neither mysql nor redis is used.  A
    listen set through conf moves .port with it.  [admin] listen is a free
    port of its own (.admin_port; None when conf turns it off) with token
    ADMIN_TOKEN.
    tls=True adds a tls endpoint: listen = "127.0.0.1:<port>,
    tls://127.0.0.1:<tls_port>" and [tls] cert/key, a self-signed pair for
    localhost/127.0.0.1 made by make_cert() in the node's dir.
    .tls_port .tls_cert .tls_key (None without tls)
    .tls_context(cafile=None) -> ssl.SSLContext trusting the node's cert
    ws=True adds ws://127.0.0.1:<ws_port>/chat, wss=True
    wss://127.0.0.1:<wss_port>/chat (with the tls=True pair and [tls]; tls
    itself only when asked).  .ws_port .wss_port (None without), and
    .ws_url / .wss_url ("ws://127.0.0.1:P/chat").
    .port .admin_port .pid .proc .conf_path .db .log_path .dir
    .admin(method, path, body=None, token=ADMIN_TOKEN) -> (status, headers,
                                body)   admin_request() to this node
    .log_text() -> str          the whole log
    .log_mark() -> int          the log's current length, for `since`
    .wait_log(substring, timeout=10, since=0) -> str   the log text once it
                                contains substring after offset `since`
    .write_conf(conf)           merge more overrides over the current ones
                                (same rules) and rewrite the file; pair with
                                .sighup() or .restart()
    .sighup()   .kill(sig=SIGKILL) (no wait)   .wait(timeout=30) -> exit code
    .stop(timeout=30) -> exit code   SIGTERM and wait (SIGKILL + NodeError when
                                it does not exit); raises SanitizerError when
                                the log holds an ASan/UBSan/LSan report
    .restart()                  stop (if running) and start again, same port
                                and config, no migration
    A context manager (stop on exit); every Node is stopped at exit, and
    a sanitizer report (a leak at that exit included) in any Node's log
    then makes the test process exit 1, so a test that never called
    .stop() cannot hide one.

Client(port, host="127.0.0.1", term=b"\\0", proto=1, rcvbuf=None, source=None,
       tls=None)
    A TCP client (over TLS when tls is an ssl.SSLContext: the handshake
    runs in the constructor, verifying the name host).  term ends each message sent (b"\\0" as the seed client
    does, b"\\n", or b"").  proto=2 adds "proto":2 to every object sent that
    lacks it.  rcvbuf sets SO_RCVBUF before connecting (slow-reader tests).
    .send(obj)          compact JSON + term
    .send_raw(data)     bytes as they are
    .recv(timeout=5) -> dict   the next newline-terminated JSON object
                        (messages set aside by request() first); raises
                        TimeoutError, or EOFError when the server closed
    .recv_until(pred, timeout=5) -> dict   the first message pred() accepts;
                        the messages before it are dropped
    .expect_nothing(timeout=0.3)   AssertionError if a message (or part of
                        one) arrives; returns quietly on EOF (.eof is set)
    .closed(timeout=5) -> bool   True once the server closed the connection
                        (data read meanwhile is kept for recv())
    .close()            also a context manager
    .request(obj, timeout=5) -> reply   protocol 2: adds a fresh "seq" and
                        returns the reply carrying it; other messages that
                        arrive meanwhile are kept for later recv() calls.
                        Protocol 1: send + recv().
    .register(name, password) -> id     REG_MSG (4); asserts errno 0
    .login(id, password) -> dict        LOGIN_MSG (1); the LOGIN_MSG_ACK (2)

NodeCase(unittest.TestCase)
    One node per test class: Stack() and Node(conf=cls.conf()) (CONF unless
    conf() is overridden) as cls.stack/cls.node; a failed test prints the
    node's log tail; tearDownClass requires the node to exit 0.

Utilities
    free_port() -> int
    make_cert(cert, key, cn="localhost")   a self-signed pair (openssl CLI)
    admin_request(port, method, path, body=None, token=ADMIN_TOKEN,
                  timeout=10) -> (status, headers, body)   urllib.request to an
        admin listener; HTTP errors come back as their status; a JSON body
        parsed
    wait_for(pred, timeout=10, interval=0.02, what=None) -> pred's truthy value;
        TimeoutError otherwise
    plugin_path(name, variant=None) -> str   CHAT_PLUGIN_DIR/name.so, or
        CHAT_TEST_PLUGIN_DIR/variant/name.so

Temp dirs (configs, logs, server data) are removed at exit unless
CHAT_KEEP_TMP=1 is set.
"""

import atexit
import collections
import ctypes
import itertools
import json
import os
import pwd
import random
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
CHAT_SRC = os.environ.get("CHAT_SRC") or os.path.dirname(os.path.dirname(HERE))
CHATD = os.environ.get("CHATD") or os.path.join(CHAT_SRC, "build", "chatd")
PLUGIN_DIR = os.environ.get("CHAT_PLUGIN_DIR") or os.path.join(CHAT_SRC, "build", "plugins")
TEST_PLUGIN_DIR = (os.environ.get("CHAT_TEST_PLUGIN_DIR")
                   or os.path.join(CHAT_SRC, "build", "tests", "plugins"))
STACK_SCRIPTS = os.path.join(CHAT_SRC, "contrib", "stack")

START_TIMEOUT = float(os.environ.get("CHAT_TEST_START_TIMEOUT") or 20.0)
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                   "runtime error:", "ERROR: ThreadSanitizer",
                   "WARNING: ThreadSanitizer")
# valgrind run with --quiet (CHATD a wrapper, docs/fuzzing.md) prints
# nothing but its findings, each line "==PID== ..."
VALGRIND_MARK = re.compile(r"^==\d+== \S", re.M)


# The [limits] rate keys; the harness turns them all off (see Node).
LIMIT_KEYS = ("session_msgs", "session_bytes", "user_msgs", "addr_conns",
              "addr_regs", "addr_login_failures")


class NodeError(Exception):
    """chatd did not start, did not stop, or a helper command failed."""


class SanitizerError(AssertionError):
    """chatd's log holds a sanitizer report."""


# --------------------------------------------------------------------------
# utilities

_handed_out = set()


def _local_port_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port(count=1):
    """A TCP port on 127.0.0.1 that was free a moment ago (with count > 1,
    the first of count consecutive free ports).

    Ports come from below the kernel's ephemeral range: a port picked by
    binding to 0 can be taken, before chatd binds it, by the local end of
    any outgoing connection (chatd's own MariaDB and Redis connections),
    which once made a worker's admin listener fail to start.  A port is
    never handed out twice by one test process."""
    lo_eph, hi_eph = _local_port_range()
    lo, hi = (10000, lo_eph - 1) if lo_eph > 12000 else (hi_eph + 1, 65535 - count)
    rng = random.Random(os.getpid() ^ int(time.monotonic() * 1e6))
    for _ in range(2000):
        base = rng.randint(lo, hi - count)
        ports = range(base, base + count)
        if any(p in _handed_out for p in ports):
            continue
        try:
            for p in ports:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        _handed_out.update(ports)
        return base
    raise RuntimeError("no free port below the ephemeral range")


def wait_for(pred, timeout=10, interval=0.02, what=None):
    """Poll pred() until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %.1f s waiting for %s"
                               % (timeout, what or getattr(pred, "__name__", "a condition")))
        time.sleep(interval)


ADMIN_TOKEN = "test-admin-token"


def admin_request(port, method, path, body=None, token=ADMIN_TOKEN, timeout=10):
    """An HTTP request to an admin listener on 127.0.0.1:port with
    urllib.request: (status, headers, body), the body parsed as JSON when it
    is JSON, else text.  HTTP errors are returned, not raised."""
    import urllib.error
    import urllib.request
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=data,
                                 method=method)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, headers, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read()
    text = raw.decode("utf-8", "replace")
    if headers.get("Content-Type", "").startswith("application/json") and text:
        return status, headers, json.loads(text)
    return status, headers, text


def make_cert(cert, key, cn="localhost"):
    """A self-signed P-256 certificate for localhost and 127.0.0.1 (openssl
    CLI), valid two days, written to cert and key (PEM)."""
    _run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
          "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=" + cn,
          "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
          "-keyout", key, "-out", cert], timeout=60)


def plugin_path(name, variant=None):
    if variant is None:
        return os.path.join(PLUGIN_DIR, name + ".so")
    return os.path.join(TEST_PLUGIN_DIR, variant, name + ".so")


def _tail(text, lines=40):
    return "\n".join(text.splitlines()[-lines:])


def _run(cmd, timeout=120, check=True, **kw):
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise NodeError("%s exited with %d\n%s%s" % (
            " ".join(cmd), p.returncode, p.stdout.decode(errors="replace"),
            p.stderr.decode(errors="replace")))
    return p


def _stack_script(kind, *args):
    return _run(["bash", os.path.join(STACK_SCRIPTS, kind + ".sh")] + [str(a) for a in args],
                timeout=180)


# --------------------------------------------------------------------------
# MariaDB + Redis

class _Server:
    """One MariaDB or Redis instance: external (from the environment) or ours."""

    def __init__(self, kind, dir_, port, owned):
        self.kind, self.dir, self.port, self.owned = kind, dir_, port, owned
        self.running = False

    @classmethod
    def start_new(cls, kind, parent):
        dir_ = os.path.join(parent, kind)
        last = None
        for _ in range(3):  # another process may take the port we picked
            srv = cls(kind, dir_, free_port(), True)
            try:
                srv.start()
                return srv
            except NodeError as e:
                last = e
                srv.stop(check=False)
        raise last

    def start(self):
        if not self.owned:
            raise NodeError("the shared %s is not this test's to start" % self.kind)
        _stack_script(self.kind, "start", self.dir, self.port)
        self.running = True

    def stop(self, check=True):
        if not self.owned:
            raise NodeError("the shared %s is not this test's to stop" % self.kind)
        self.running = False
        p = _run(["bash", os.path.join(STACK_SCRIPTS, self.kind + ".sh"), "stop", self.dir],
                 timeout=180, check=check)
        return p.returncode


_shared = {}        # "mariadb"/"redis" -> _Server, for this process
_owned_dirs = []    # temp dirs to remove at exit
_private_stacks = []
_nodes = []


def _shared_server(kind):
    srv = _shared.get(kind)
    if srv is not None:
        return srv
    if kind == "mariadb" and os.environ.get("CHAT_TEST_MYSQL_PORT"):
        srv = _Server(kind, os.environ.get("CHAT_TEST_MYSQL_DIR", ""),
                      int(os.environ["CHAT_TEST_MYSQL_PORT"]), False)
        srv.socket = os.environ.get("CHAT_TEST_MYSQL_SOCKET") or os.path.join(srv.dir, "mysqld.sock")
    elif kind == "redis" and os.environ.get("CHAT_TEST_REDIS_PORT"):
        srv = _Server(kind, os.environ.get("CHAT_TEST_REDIS_DIR", ""),
                      int(os.environ["CHAT_TEST_REDIS_PORT"]), False)
    else:
        parent = tempfile.mkdtemp(prefix="chat-stack-")
        _owned_dirs.append(parent)
        srv = _Server.start_new(kind, parent)
    if kind == "mariadb" and not hasattr(srv, "socket"):
        srv.socket = os.path.join(srv.dir, "mysqld.sock")
    _shared[kind] = srv
    return srv


class Stack:
    """The MariaDB + Redis the nodes use (see the module docstring)."""

    _names = itertools.count(1)

    def __init__(self, _mysql=None, _redis=None):
        self._mysql = _mysql or _shared_server("mariadb")
        self._redis = _redis or _shared_server("redis")
        self._sql_user = None
        self._private = []

    @classmethod
    def private(cls, redis=True, mysql=False):
        parent = tempfile.mkdtemp(prefix="chat-private-")
        _owned_dirs.append(parent)
        st = None
        started = []
        try:
            my = _Server.start_new("mariadb", parent) if mysql else None
            if my is not None:
                my.socket = os.path.join(my.dir, "mysqld.sock")
                started.append(my)
            rd = _Server.start_new("redis", parent) if redis else None
            if rd is not None:
                started.append(rd)
            st = cls(_mysql=my, _redis=rd)
        finally:
            if st is None:
                for srv in started:
                    srv.stop(check=False)
        st._private = started
        _private_stacks.append(st)
        return st

    # where things are
    @property
    def mysql_port(self):
        return self._mysql.port

    @property
    def mysql_socket(self):
        return self._mysql.socket

    @property
    def redis_port(self):
        return self._redis.port

    # fault injection (private stacks only)
    def stop_redis(self):
        self._redis.stop()

    def start_redis(self):
        self._redis.start()

    def stop_mysql(self):
        self._mysql.stop()

    def start_mysql(self):
        self._mysql.start()

    def close(self):
        """Stop the servers of a private stack (no-op for the shared one)."""
        while self._private:
            srv = self._private.pop()
            if srv.running:
                srv.stop(check=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # MariaDB
    def _mysql_cmd(self, user, password, db):
        cmd = ["mariadb", "--no-defaults", "--protocol=socket",
               "--socket=" + self.mysql_socket, "--user=" + user,
               "--batch", "--skip-column-names", "--default-character-set=utf8mb4"]
        if password is not None:
            cmd.append("--password=" + password)
        if db:
            cmd += ["--database=" + db]
        return cmd

    def sql(self, db, query):
        """Run query as the server's administrator (the invoking Unix user
        over the socket, contrib/stack/mariadb.sh) or else as chat; rows as
        tuples of str, NULL as None."""
        me = pwd.getpwuid(os.geteuid()).pw_name
        users = [self._sql_user] if self._sql_user else [(me, None), ("chat", "chat")]
        last = None
        for user, password in users:
            p = _run(self._mysql_cmd(user, password, db) + ["--execute=" + query],
                     timeout=60, check=False)
            if p.returncode == 0:
                self._sql_user = (user, password)
                text = p.stdout.decode("utf-8", "replace")
                if not text:
                    return []
                if text.endswith("\n"):
                    text = text[:-1]
                return [tuple(_mysql_unescape(f) for f in line.split("\t"))
                        for line in text.split("\n")]
            last = p
            if b"Access denied" not in p.stderr:
                break
        raise NodeError("mariadb: %s\n%s" % (query, last.stderr.decode(errors="replace")))

    def new_database(self, prefix="t"):
        safe = "".join(c if c.isalnum() else "_" for c in prefix)[:24] or "t"
        name = "%s_%d_%d_%s" % (safe, os.getpid(), next(self._names), uuid.uuid4().hex[:6])
        self.sql(None, "CREATE DATABASE `%s` CHARACTER SET utf8mb4" % name)
        return name

    # Redis
    def redis_cli(self, *args):
        p = _run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.redis_port)]
                 + [str(a) for a in args], timeout=30)
        return p.stdout.decode("utf-8", "replace").strip()


def _mysql_unescape(field):
    if field == "NULL":
        return None
    if "\\" not in field:
        return field
    out, it = [], iter(field)
    for c in it:
        if c != "\\":
            out.append(c)
            continue
        n = next(it, "")
        out.append({"n": "\n", "t": "\t", "0": "\0", "\\": "\\"}.get(n, n))
    return "".join(out)


# --------------------------------------------------------------------------
# chatd

def _merge(base, over):
    """Merge {section: {key: value}} overrides into base (in place)."""
    for sec, kv in (over or {}).items():
        if kv is None:
            base.pop(sec, None)
            continue
        dst = base.setdefault(sec, {})
        for k, v in kv.items():
            if v is None:
                dst.pop(k, None)
            else:
                dst[k] = v
    return base


def _conf_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """In the child before exec: SIGTERM it when this interpreter dies, even
    by SIGKILL (a ctest timeout), so that no chatd outlives its test."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Node:
    """One chatd process (see the module docstring)."""

    def __init__(self, stack=None, db=None,
                 plugins=("login", "friend", "one2one", "group", "offline"),
                 plugin_dir=None, conf=None, node_id=None, redis=True, mysql=True,
                 migrate=True, args=(), tls=False, ws=False, wss=False):
        if stack is None and (redis or mysql):
            stack = Stack()
        self.stack = stack
        self.mysql, self.redis = mysql, redis
        self.db = None
        if mysql:
            self.db = db or stack.new_database("node")
        self.port = free_port()
        self.args = [str(a) for a in args]
        self.dir = tempfile.mkdtemp(prefix="chatd-node-")
        _owned_dirs.append(self.dir)
        self.conf_path = os.path.join(self.dir, "chat.conf")
        self.log_path = os.path.join(self.dir, "chatd.log")
        self.proc = None
        self._start_mark = 0
        self.tls_port = self.tls_cert = self.tls_key = None
        self.ws_port = self.wss_port = None

        # legacy_pace_ms 0: Client splits lines itself, like the load
        # generator; the seed-client tests remove it to get chatd's default
        self._conf = {"server": {"listen": "127.0.0.1:%d" % self.port,
                                 "log_level": "debug", "legacy_pace_ms": 0},
                      "plugins": {"dir": plugin_dir or PLUGIN_DIR,
                                  "enabled": ", ".join(plugins)}}
        # The seed's policies, as etc/chat.conf sets them for `make run`:
        # tests of the defaults (friend mutual, group invite) override them.
        self._conf["plugin.friend"] = {"policy": "open"}
        self._conf["plugin.group"] = {"join": "open"}
        # [limits] off: tests send as fast as they can from 127.0.0.1 (not
        # trusted here); test_ratelimit/test_quota turn on what they test
        self._conf["limits"] = {k: "off" for k in LIMIT_KEYS}
        # the admin listener on a free port of its own (its default, 6080,
        # would collide between nodes), with a token for the actions
        self.admin_port = free_port(4)  # workers add their number to it
        self._conf["admin"] = {"listen": "127.0.0.1:%d" % self.admin_port,
                               "token": ADMIN_TOKEN}
        if tls:  # a second endpoint, tls, with a fresh self-signed pair
            self.tls_port = free_port()
            self.tls_cert = os.path.join(self.dir, "cert.pem")
            self.tls_key = os.path.join(self.dir, "key.pem")
            make_cert(self.tls_cert, self.tls_key)
            self._conf["server"]["listen"] = "127.0.0.1:%d, tls://127.0.0.1:%d" % (
                self.port, self.tls_port)
            self._conf["tls"] = {"cert": self.tls_cert, "key": self.tls_key}
        if ws:  # ws://127.0.0.1:<ws_port>/chat
            self.ws_port = free_port()
            self._conf["server"]["listen"] += ", ws://127.0.0.1:%d/chat" % self.ws_port
        if wss:  # wss://...: the tls=True pair
            self.wss_port = free_port()
            if not self.tls_cert:
                self.tls_cert = os.path.join(self.dir, "cert.pem")
                self.tls_key = os.path.join(self.dir, "key.pem")
                make_cert(self.tls_cert, self.tls_key)
                self._conf["tls"] = {"cert": self.tls_cert, "key": self.tls_key}
            self._conf["server"]["listen"] += ", wss://127.0.0.1:%d/chat" % self.wss_port
        if node_id is not None:
            self._conf["server"]["node_id"] = node_id
        if mysql:
            self._conf["mysql"] = {"host": "127.0.0.1", "port": stack.mysql_port,
                                   "user": "chat", "password": "chat",
                                   "database": self.db, "pool_size": 2,
                                   "connect_timeout": 2,
                                   "migrations": os.path.join(CHAT_SRC, "sql")}
        if redis:
            self._conf["redis"] = {"host": "127.0.0.1", "port": stack.redis_port,
                                   "heartbeat_ttl": 3}
        _merge(self._conf, conf)
        self._sync_port()
        self._write()
        _nodes.append(self)
        if migrate and mysql:
            self.migrate()
        self.start()

    # configuration
    def _write(self):
        lines = []
        for sec, kv in self._conf.items():
            lines.append("[%s]" % sec)
            lines += ["%s = %s" % (k, _conf_value(v)) for k, v in kv.items()]
            lines.append("")
        tmp = self.conf_path + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines))
        os.replace(tmp, self.conf_path)

    def write_conf(self, conf):
        _merge(self._conf, conf)
        self._sync_port()
        self._write()

    def _sync_port(self):
        """.port (.admin_port) follows a listen address set through conf."""
        listen = str(self._conf.get("server", {}).get("listen", ""))
        for i, ep in enumerate(listen.split(",")):  # SCHEME://HOST:PORT[/PATH]
            scheme, _, rest = ep.strip().rpartition("://")
            port = rest.split("/")[0].rpartition(":")[2]
            if not port.isdigit():
                continue
            if i == 0:
                self.port = int(port)
            if scheme in ("tls", "ws", "wss"):
                setattr(self, scheme + "_port", int(port))
        listen = str((self._conf.get("admin") or {}).get("listen", ""))
        port = listen.rpartition(":")[2]
        self.admin_port = int(port) if port.isdigit() else None

    @property
    def ws_url(self):
        return "ws://127.0.0.1:%d/chat" % self.ws_port

    @property
    def wss_url(self):
        return "wss://127.0.0.1:%d/chat" % self.wss_port

    def tls_context(self, cafile=None):
        """A client ssl.SSLContext that trusts this node's certificate."""
        import ssl
        return ssl.create_default_context(cafile=cafile or self.tls_cert)

    def admin(self, method, path, body=None, token=ADMIN_TOKEN, timeout=10,
              port=None):
        """One request to the admin listener: (status, headers, parsed body)."""
        return admin_request(port or self.admin_port, method, path, body, token,
                             timeout)

    @property
    def conf(self):
        return self._conf

    # process
    def migrate(self):
        p = _run([CHATD, "--migrate", "-c", self.conf_path], timeout=120, check=False)
        with open(self.log_path, "ab") as f:
            f.write(p.stdout + p.stderr)
        if p.returncode != 0:
            raise NodeError("chatd --migrate exited with %d\n%s" % (
                p.returncode, _tail((p.stdout + p.stderr).decode(errors="replace"))))

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        if self.running():
            raise NodeError("chatd is already running")
        self._start_mark = self.log_mark()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([CHATD, "-c", self.conf_path] + self.args,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if "listening on" in self.log_text()[self._start_mark:]:
                return
            if self.proc.poll() is not None:
                raise NodeError("chatd exited with %d while starting\n%s"
                                % (self.proc.returncode, self.log_tail()))
            if time.monotonic() >= deadline:
                self.kill(signal.SIGKILL)
                self.proc.wait()
                raise NodeError("chatd did not log 'listening on' within %.0f s\n%s"
                                % (START_TIMEOUT, self.log_tail()))
            time.sleep(0.02)

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=40):
        return _tail(self.log_text(), lines)

    def log_mark(self):
        return len(self.log_text())

    def wait_log(self, substring, timeout=10, since=0):
        try:
            return wait_for(lambda: substring in self.log_text()[since:] and self.log_text(),
                            timeout, what="%r in the chatd log" % substring)
        except TimeoutError as e:
            raise TimeoutError("%s\n%s" % (e, self.log_tail())) from None

    def sighup(self):
        self.kill(signal.SIGHUP)

    def kill(self, sig=signal.SIGKILL):
        if self.running():
            self.proc.send_signal(sig)

    def wait(self, timeout=30):
        return self.proc.wait(timeout)

    def stop(self, timeout=30):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise NodeError("chatd did not stop within %.0f s of SIGTERM\n%s"
                                % (timeout, self.log_tail())) from None
        self.check_sanitizers()
        return self.proc.returncode

    def check_sanitizers(self):
        text = self.log_text()
        vg = VALGRIND_MARK.search(text)
        for mark in SANITIZER_MARKS + ((vg.group(0),) if vg else ()):
            i = text.find(mark)
            if i >= 0:
                raise SanitizerError("sanitizer report in %s:\n%s"
                                     % (self.log_path, text[max(0, i - 200):i + 4000]))

    def restart(self):
        if self.running():
            self.stop()
        self.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------
# client

class Client:
    """A TCP client speaking chatd's framing (see the module docstring)."""

    _seqs = itertools.count(1)

    def __init__(self, port, host="127.0.0.1", term=b"\0", proto=1, rcvbuf=None,
                 timeout=5, source=None, tls=None):
        self.term, self.proto = term, proto
        self.buf = bytearray()
        self.queue = collections.deque()
        self.eof = False
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        try:
            if source is not None:
                self.sock.bind((source, 0))
            self.sock.connect((host, port))
        except BaseException:
            self.sock.close()
            raise
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:  # an ssl.SSLContext: the handshake, blocking
            try:
                self.sock = tls.wrap_socket(self.sock, server_hostname=host)
            except BaseException:
                self.sock.close()
                raise
        self.sock.setblocking(False)

    # sending
    def encode(self, obj):
        if self.proto == 2 and isinstance(obj, dict) and "proto" not in obj:
            obj = dict(obj, proto=2)
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + self.term

    def send(self, obj):
        self.send_raw(self.encode(obj))

    def send_raw(self, data):
        self.sock.setblocking(True)
        self.sock.settimeout(10)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    # receiving
    def _fill(self, timeout):
        """Read what is there (waiting up to timeout); False on timeout.
        Sets .eof when the server closed the connection."""
        if self.eof:
            return False
        pending = getattr(self.sock, "pending", None)  # TLS: decrypted, unread
        if not (pending and pending()):
            r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not r:
                return False
        try:
            data = self.sock.recv(1 << 16)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return True
        except ssl.SSLError:  # a TLS alert or a cut record: the end
            data = b""
        except (ConnectionResetError, ConnectionAbortedError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _pop_line(self):
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                return None
            line = bytes(self.buf[:i])
            del self.buf[:i + 1]
            if line.strip():
                try:
                    return json.loads(line)
                except ValueError as e:
                    raise AssertionError("server sent invalid JSON %r: %s" % (line[:200], e))

    def recv(self, timeout=5):
        if self.queue:
            return self.queue.popleft()
        deadline = time.monotonic() + timeout
        while True:
            msg = self._pop_line()
            if msg is not None:
                return msg
            if self.eof:
                raise EOFError("server closed the connection (%d bytes unparsed)" % len(self.buf))
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message within %.1f s (%d bytes pending: %r)"
                                   % (timeout, len(self.buf), bytes(self.buf[:200])))
            self._fill(left)

    def recv_until(self, pred, timeout=5):
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if pred(msg):
                return msg

    def expect_nothing(self, timeout=0.3):
        if self.queue:
            raise AssertionError("unexpected message: %r" % (self.queue[0],))
        deadline = time.monotonic() + timeout
        while True:
            if self.buf.strip(b"\n"):
                raise AssertionError("unexpected data from the server: %r" % bytes(self.buf[:300]))
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                return
            self._fill(left)

    def closed(self, timeout=5):
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._fill(left)
        return True

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # requests
    def request(self, obj, timeout=5):
        if self.proto != 2:
            self.send(obj)
            return self.recv(timeout)
        seq = next(self._seqs)
        self.send(dict(obj, seq=seq))
        held = collections.deque(self.queue)
        self.queue.clear()
        deadline = time.monotonic() + timeout
        try:
            while True:
                msg = self.recv(max(0.0, deadline - time.monotonic()))
                if isinstance(msg, dict) and msg.get("seq") == seq:
                    return msg
                held.append(msg)
        finally:
            self.queue.extendleft(reversed(held))

    def register(self, name, password):
        msg = {"msgid": 4, "name": name, "password": password}
        if self.proto == 2:
            ack = self.request(msg)
        else:
            self.send(msg)
            ack = self.recv_until(lambda m: m.get("msgid") == 5)
        if ack.get("errno") != 0 or "id" not in ack:
            raise AssertionError("register %r failed: %r" % (name, ack))
        return ack["id"]

    def login(self, id_, password):
        msg = {"msgid": 1, "id": id_, "password": password}
        if self.proto == 2:
            return self.request(msg)
        self.send(msg)
        return self.recv_until(lambda m: m.get("msgid") == 2)


# --------------------------------------------------------------------------
# teardown at exit: nodes first, then private stacks, then our shared servers

class NodeCase(unittest.TestCase):
    """A test class with one node of its own: Stack() and Node(conf=conf()),
    where conf() is CONF unless a subclass says otherwise.  A failed test
    prints the node's log tail; the node must exit 0 when the class ends."""

    CONF = None

    @classmethod
    def conf(cls):
        return cls.CONF

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.node = Node(cls.stack, conf=cls.conf())

    @classmethod
    def tearDownClass(cls):
        rc = cls.node.stop()
        if rc != 0:
            raise AssertionError("chatd exited with %r\n%s" % (rc, cls.node.log_tail()))

    def run(self, result=None):
        before = len(result.failures) + len(result.errors) if result else 0
        out = super().run(result)
        if result and len(result.failures) + len(result.errors) > before:
            sys.stderr.write("---- %s (tail)\n%s\n" % (self.node.log_path,
                                                      self.node.log_tail(60)))
        return out


def _cleanup():
    reports = []
    for node in _nodes:
        if node.running():
            try:
                node.proc.send_signal(signal.SIGTERM)
                node.proc.wait(15)
            except (subprocess.TimeoutExpired, OSError):
                try:
                    node.proc.kill()
                    node.proc.wait(5)
                except (subprocess.TimeoutExpired, OSError):
                    pass
        try:
            node.check_sanitizers()
        except SanitizerError as e:
            reports.append(str(e))
    for st in _private_stacks:
        try:
            st.close()
        except Exception:  # keep tearing down the rest
            pass
    for srv in _shared.values():
        if srv.owned and srv.running:
            try:
                srv.stop(check=False)
            except Exception:
                pass
    for r in reports:
        sys.stderr.write("harness: at exit, %s\n" % r)
    if os.environ.get("CHAT_KEEP_TMP"):
        print("harness: kept %s" % " ".join(_owned_dirs))
    else:
        for d in _owned_dirs:
            shutil.rmtree(d, ignore_errors=True)
    if reports:
        sys.stderr.flush()
        os._exit(1)  # atexit cannot fail the run otherwise


atexit.register(_cleanup)

# SIGTERM (ctest stopping a run, `make test` interrupted) ends the
# interpreter through SystemExit, so that the atexit teardown above runs.
if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
