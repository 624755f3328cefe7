"""Three chatd nodes behind nginx (stream), one of them killed mid-chat.

Real chatd x3 (one database, one Redis, heartbeat_ttl 3), Debian's nginx with
its stream module under a private prefix in a temp dir, rendered from
contrib/nginx/nginx.conf.in, and chat-cli processes (scripted mode) as the
users, all connecting through nginx:

  - users land on different nodes (seen in /proc/net/tcp: which node gained
    the connection nginx opened for each client);
  - they chat one-to-one and in a group across nodes;
  - numbered one-to-one and group messages flow while the node of some users
    is killed with SIGKILL: those users' chat-cli see the disconnect,
    reconnect through nginx (which skips the dead node), log in again with
    their resume token once the dead node's presence expires, and get the
    messages sent meanwhile from the offline store;
  - every numbered message reaches every recipient exactly once.

The nodes run with [server] proxy_protocol = on and nginx with proxy_protocol
on, as `make cluster` does.  NginxRealAddress checks what that is for: behind
nginx a node's admin GET /sessions and its log lines name each client's own
address (clients bound to 127.0.0.2 and 127.0.0.3), and the cap on
connections per client address counts clients, not nginx.

The node is killed once the victims hold every message sent so far, and the
senders go on at once.  A message the node had already taken from the bus
when it died is lost: the bus is Redis pub/sub, at most once (core/bus.c);
keeping that message would need an end-to-end acknowledgement from the
client, which the protocol does not have.  What the test holds chatd to is
the issue's promise: messages sent to users whose node died are stored and
delivered at their next login, none lost, none twice.

Skipped only when nginx or its stream module is not installed
(contrib/deps.sh installs nginx-light and libnginx-mod-stream).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import harness
import test_cli as clidrv
from harness import Node, Stack, free_port, wait_for

TEMPLATE = os.path.join(harness.CHAT_SRC, "contrib", "nginx", "nginx.conf.in")
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
TTL = 3            # heartbeat_ttl of the nodes (the harness default)
USERS = 6          # two per node
PACE = 0.03        # seconds between rounds of numbered messages


def find_nginx():
    """(nginx binary, load_module line) or (None, why not)."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if not exe:
        return None, "nginx is not installed (contrib/deps.sh installs nginx-light)"
    if os.path.exists(STREAM_MODULE):
        return exe, "load_module %s;" % STREAM_MODULE
    v = subprocess.run([exe, "-V"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout.decode()
    if "--with-stream " in v + " " and "--with-stream=dynamic" not in v:
        return exe, ""
    return None, "nginx's stream module is not installed (libnginx-mod-stream)"


NGINX, LOAD_MODULE = find_nginx()
# The nodes behind an Nginx(proxy_protocol=True), as in `make cluster`.
PROXIED = {"server": {"proxy_protocol": "on", "trusted": "127.0.0.1"}}


def established_by_port(ports):
    """Established TCP connections whose local port is one of ports."""
    counts = dict.fromkeys(ports, 0)
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    port = int(fields[1].rsplit(":", 1)[1], 16)
                    if fields[3] == "01" and port in counts:
                        counts[port] += 1
        except FileNotFoundError:
            pass
    return counts


class Nginx:
    """nginx in the foreground under a private prefix."""

    def __init__(self, listen_port, node_ports, tls_port=None, ws_port=None, ws_ports=(),
                 proxy_protocol=False):
        """Plain TCP on listen_port, TLS on tls_port (free when None) with a
        fresh self-signed certificate (self.cert: its own CA), WebSocket on
        ws_port (free when None) to ws_ports (nothing listening by default:
        nginx only needs a server line).  proxy_protocol: the stream ports
        open each node connection with a PROXY header (the nodes need
        [server] proxy_protocol = on and 127.0.0.1 trusted)."""
        self.dir = tempfile.mkdtemp(prefix="chat-nginx-")
        os.makedirs(os.path.join(self.dir, "logs"))
        os.makedirs(os.path.join(self.dir, "temp"))
        self.port = listen_port
        self.tls_port = tls_port or free_port()
        self.ws_port = ws_port or free_port()
        tls_dir = os.path.join(self.dir, "tls")
        subprocess.run(["sh", os.path.join(harness.CHAT_SRC, "contrib", "stack", "tls-cert.sh"),
                        tls_dir], check=True, stdout=subprocess.DEVNULL)
        self.cert = os.path.join(tls_dir, "cert.pem")
        servers = "".join("        server 127.0.0.1:%d max_fails=1 fail_timeout=10s;\n" % p
                          for p in node_ports)
        ws_servers = "".join("        server 127.0.0.1:%d max_fails=1 fail_timeout=10s;\n" % p
                             for p in (ws_ports or [free_port()]))
        with open(TEMPLATE) as f:
            text = f.read()
        text = (text.replace("@STREAM_MODULE@", LOAD_MODULE)
                    .replace("@LISTEN@", "127.0.0.1:%d" % listen_port)
                    .replace("@SERVERS@\n", servers)
                    .replace("@TLS_LISTEN@", "127.0.0.1:%d" % self.tls_port)
                    .replace("@TLS_CERT@", self.cert)
                    .replace("@TLS_KEY@", os.path.join(tls_dir, "key.pem"))
                    .replace("@WS_LISTEN@", "127.0.0.1:%d" % self.ws_port)
                    .replace("@WS_SERVERS@\n", ws_servers)
                    .replace("@WORKER_CONNECTIONS@", "1024")
                    .replace("@NOFILE@", "4096")
                    .replace("@PROXY_PROTOCOL@", "on" if proxy_protocol else "off"))
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(text)
        self.error_log = os.path.join(self.dir, "logs", "error.log")
        args = [NGINX, "-e", self.error_log, "-p", self.dir + "/", "-c", self.conf]
        t = subprocess.run(args + ["-t"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if t.returncode != 0:
            raise AssertionError("nginx -t rejected the rendered template:\n%s" % t.stdout.decode())
        self.proc = subprocess.Popen(args + ["-g", "daemon off;"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: self.proc.poll() is not None or "start worker process" in self.log(),
                     timeout=15, what="nginx to start")
        except TimeoutError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise AssertionError("nginx exited with %d:\n%s" % (self.proc.returncode, self.log()))

    def log(self, name="error.log"):
        try:
            with open(os.path.join(self.dir, "logs", name)) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not os.environ.get("CHAT_KEEP_TMP"):
            shutil.rmtree(self.dir, ignore_errors=True)


@unittest.skipIf(NGINX is None, LOAD_MODULE)
class NginxCluster(unittest.TestCase):
    def setUp(self):
        clidrv.cli_or_skip(self)
        stack = Stack()
        db = stack.new_database("cluster")
        self.nodes = []
        for i in range(3):
            node = Node(stack, db=db, node_id="cluster-n%d" % (i + 1), migrate=(i == 0),
                        conf=PROXIED, ws=True)
            self.addCleanup(node.stop)
            self.nodes.append(node)
        self.node_ports = [n.port for n in self.nodes]
        self.nginx = Nginx(free_port(), self.node_ports, proxy_protocol=True,
                           ws_ports=[n.ws_port for n in self.nodes])
        self.addCleanup(self.nginx.stop)
        self.users = []  # dicts: cli, id, name, node (index)

    def fail_with_logs(self, msg):
        parts = [msg]
        for u in self.users:
            parts.append(u["cli"].transcript())
        for i, n in enumerate(self.nodes):
            parts.append("---- node %d log tail ----\n%s" % (i + 1, n.log_tail(25)))
        parts.append("---- nginx error.log ----\n%s" % self.nginx.log()[-3000:])
        self.fail("\n".join(parts))

    def connect_user(self, i):
        """A chat-cli through nginx; returns the user with the node it hit."""
        before = established_by_port(self.node_ports)
        c = clidrv.Cli(self.nginx.port, name="u%d" % i)
        self.addCleanup(c.stop)
        c.expect("connected")

        def landed():
            now = established_by_port(self.node_ports)
            grown = [k for k, p in enumerate(self.node_ports) if now[p] > before[p]]
            return grown[0] + 1 if len(grown) == 1 else None
        node = wait_for(landed, timeout=5, what="the node connection of u%d" % i) - 1
        name = "u%d" % i
        c.send("register %s pw-%d" % (name, i))
        uid = int(c.expect("register", ok=True, name=name)["id"])
        c.send("login %d pw-%d" % (uid, i))
        c.expect("login", ok=True, id=uid)
        user = {"cli": c, "id": uid, "name": name, "node": node}
        self.users.append(user)
        return user

    @staticmethod
    def received(user, kind, prefix, since):
        """Numbers of the numbered messages (prefix + n) user got since."""
        out = []
        for ev in list(user["cli"].history):
            if ev["_t"] >= since and ev.get("event") == kind and \
                    ev.get("msg", "").startswith(prefix):
                out.append(int(ev["msg"][len(prefix):]))
        return out

    def test_websocket_through_nginx(self):
        """nginx's WebSocket port in front of the nodes' own ws:// listeners:
        ws users (spread over the nodes) chat with a tcp user through nginx."""
        tcp = self.connect_user(0)
        for i in range(1, 4):
            c = clidrv.Cli(self.nginx.port, name="w%d" % i,
                           url="ws://127.0.0.1:%d/chat" % self.nginx.ws_port,
                           args=["--origin", "https://chat.example"])
            self.addCleanup(c.stop)
            c.expect("connected")
            c.send("register w%d pw" % i)
            uid = int(c.expect("register", ok=True)["id"])
            c.send("login %d pw" % uid)
            c.expect("login", ok=True, id=uid)
            c.send("chat:%d:from ws %d" % (tcp["id"], i))
            c.expect("sent", to=tcp["id"])
            self.assertEqual(tcp["cli"].expect("chat", **{"from": uid})["msg"], "from ws %d" % i)
            tcp["cli"].send("chat:%d:back %d" % (uid, i))
            self.assertEqual(c.expect("chat", **{"from": tcp["id"]})["msg"], "back %d" % i)
            c.stop()  # nginx logs a WebSocket request when it ends
        wait_for(lambda: "GET /chat HTTP/1.1\" 101" in self.nginx.log("http.log"),
                 timeout=10, what="nginx's 101 log line")

    def test_failover(self):
        for i in range(USERS):
            self.connect_user(i)
        on_node = [u["node"] for u in self.users]
        self.assertEqual(sorted(set(on_node)), [0, 1, 2],
                         "least_conn should spread %d clients over the 3 nodes: %r" % (USERS, on_node))

        # one group with everybody, made and joined across nodes
        owner = self.users[1]
        owner["cli"].send("creategroup:crew:failover test")
        gid = int(owner["cli"].expect("creategroup", ok=True)["groupid"])
        for u in self.users:
            if u is not owner:
                u["cli"].send("addgroup:%d" % gid)
                u["cli"].expect("addgroup", ok=True, groupid=gid)

        # before the failure: one-to-one between every pair of nodes, and
        # the group
        for a in self.users[:3]:
            for b in self.users[:3]:
                if a is not b:
                    a["cli"].send("chat:%d:hello %s" % (b["id"], b["name"]))
                    a["cli"].expect("sent", to=b["id"])
                    ev = b["cli"].expect("chat", **{"from": a["id"]})
                    self.assertEqual(ev["msg"], "hello %s" % b["name"])
        self.users[2]["cli"].send("groupchat:%d:hello crew" % gid)
        for u in self.users:
            if u is not self.users[2]:
                self.assertEqual(u["cli"].expect("groupchat", group=gid)["msg"], "hello crew")

        # the victim node: the one user 0 is on; senders on the others
        victim_node = self.users[0]["node"]
        victims = [u for u in self.users if u["node"] == victim_node]
        survivors = [u for u in self.users if u["node"] != victim_node]
        s1, s2 = survivors[0], survivors[1]
        self.assertGreaterEqual(len(victims), 1)
        start = time.monotonic()

        # numbered traffic: s1 -> each victim one-to-one, s2 -> the group
        k = 0
        t_kill = None
        k_kill = 20
        k_back = None
        while True:
            k += 1
            for v in victims:
                s1["cli"].send("chat:%d:n%d" % (v["id"], k))
            s2["cli"].send("groupchat:%d:g%d" % (gid, k))
            for v in victims:
                s1["cli"].expect("sent", to=v["id"])
            s2["cli"].expect("sent", group=gid)
            if k == k_kill:
                # a quiet moment: the victims hold all sent so far
                wait_for(lambda: all(len(self.received(v, "chat", "n", start)) == k and
                                     len(self.received(v, "groupchat", "g", start)) == k
                                     for v in victims),
                         timeout=10, what="the victims to receive rounds 1..%d" % k)
                self.nodes[victim_node].kill(signal.SIGKILL)
                t_kill = time.monotonic()
            if t_kill is not None and k_back is None and all(
                    any(e.get("event") == "relogin" and e.get("ok") for e in v["cli"].history)
                    for v in victims):
                k_back = k
            if k_back is not None and k >= k_back + 20:
                break
            if t_kill is not None and time.monotonic() - t_kill > 40:
                self.fail_with_logs("the victims did not log in again within 40 s of the kill")
            time.sleep(PACE)
        self.nodes[victim_node].wait(10)

        # the victims saw the disconnect, came back through nginx (to a
        # survivor: theirs is dead) and logged in within the presence TTL
        for v in victims:
            h = v["cli"].history
            lost = [e for e in h if e.get("event") == "disconnected" and e["_t"] >= t_kill]
            back = [e for e in h if e.get("event") == "relogin" and e.get("ok") and e["_t"] >= t_kill]
            if not lost or not back:
                self.fail_with_logs("%s: no disconnect/relogin after the kill" % v["name"])
            self.assertLess(lost[0]["_t"] - t_kill, 2.0, "%s saw the disconnect late" % v["name"])
            took = back[0]["_t"] - t_kill
            print("\n%s: disconnect seen %.2f s after the kill, logged in again after %.2f s"
                  % (v["name"], lost[0]["_t"] - t_kill, took), file=sys.stderr)
            self.assertLess(took, TTL + 3.0, "%s logged in again only after %.1f s" % (v["name"], took))
            self.assertEqual(established_by_port([self.node_ports[victim_node]])[
                self.node_ports[victim_node]], 0)

        # every numbered message exactly once: live or from the offline store
        expected = list(range(1, k + 1))

        def complete():
            for v in victims:
                if len(self.received(v, "chat", "n", start)) < k:
                    return False
            for u in self.users:
                if u is not s2 and len(self.received(u, "groupchat", "g", start)) < k:
                    return False
            return True
        try:
            wait_for(complete, timeout=15, what="all numbered messages")
        except TimeoutError:
            pass  # the comparison below says what is missing
        time.sleep(0.3)  # let any duplicate arrive before comparing
        problems = []
        for v in victims:
            got = sorted(self.received(v, "chat", "n", start))
            if got != expected:
                problems.append("%s one-to-one: missing %s, duplicated %s" % (
                    v["name"], sorted(set(expected) - set(got)),
                    sorted({n for n in got if got.count(n) > 1})))
            offline = [e for e in v["cli"].history
                       if e.get("event") == "chat" and e.get("offline") == "1" and e["_t"] >= t_kill]
            if not offline:
                problems.append("%s: nothing came from the offline store" % v["name"])
        for u in self.users:
            if u is s2:
                continue
            got = sorted(self.received(u, "groupchat", "g", start))
            if got != expected:
                problems.append("%s group: missing %s, duplicated %s" % (
                    u["name"], sorted(set(expected) - set(got)),
                    sorted({n for n in got if got.count(n) > 1})))
        if problems:
            self.fail_with_logs("\n".join(problems))
        print("%d numbered rounds, killed after round %d, victims back by round %d"
              % (k, k_kill, k_back), file=sys.stderr)

        # after the failover: the victims chat one-to-one and in the group
        v = victims[0]
        v["cli"].send("chat:%d:back again" % s1["id"])
        v["cli"].expect("sent", to=s1["id"])
        self.assertEqual(s1["cli"].expect("chat", **{"from": v["id"], "msg": "back again"})["name"],
                         v["name"])
        v["cli"].send("groupchat:%d:crew, I am back" % gid)
        v["cli"].expect("sent", group=gid)
        for u in self.users:
            if u is not v:
                u["cli"].expect("groupchat", group=gid, msg="crew, I am back")


@unittest.skipIf(NGINX is None, LOAD_MODULE)
class NginxRealAddress(unittest.TestCase):
    """Behind nginx with the PROXY protocol a node sees each client."""

    def setUp(self):
        from test_net import echo_node
        conf = dict(PROXIED["server"], max_connections_per_addr=2, max_unauth_per_addr=0)
        self.node = echo_node(**conf)
        self.addCleanup(self.node.stop)
        self.nginx = Nginx(free_port(), [self.node.port], proxy_protocol=True)
        self.addCleanup(self.nginx.stop)

    def client(self, source, port=None):
        c = harness.Client(port or self.nginx.port, source=source)
        self.addCleanup(c.close)
        return c

    @staticmethod
    def served(c, n):
        c.send({"msgid": 1000, "n": n})
        return c.recv().get("n") == n

    def test_sessions_and_logs_name_the_client(self):
        a, b = self.client("127.0.0.2"), self.client("127.0.0.3")
        self.assertTrue(self.served(a, 1))
        self.assertTrue(self.served(b, 2))
        want = ["127.0.0.2:%d" % a.sock.getsockname()[1], "127.0.0.3:%d" % b.sock.getsockname()[1]]
        status, _, body = self.node.admin("GET", "/sessions")
        self.assertEqual(status, 200, body)
        peers = [s["peer"] for s in body["sessions"]]
        self.assertEqual(sorted(peers), want, "the node should see the clients, not nginx")
        for w in want:
            self.assertIn("peer=%s connected" % w, self.node.log_text())

    def test_per_address_cap_counts_clients_not_nginx(self):
        mark = self.node.log_mark()
        mine = [self.client("127.0.0.2") for _ in range(2)]
        for i, c in enumerate(mine):
            self.assertTrue(self.served(c, i))
        third = self.client("127.0.0.2")
        self.assertTrue(third.closed(5), "a third connection from 127.0.0.2 was kept")
        self.node.wait_log("max_connections_per_addr (2) reached: refused 127.0.0.2:", since=mark)
        # other clients behind the same nginx are not affected
        others = [self.client("127.0.0.3") for _ in range(2)]
        for i, c in enumerate(others):
            self.assertTrue(self.served(c, 10 + i))


if __name__ == "__main__":
    unittest.main()
