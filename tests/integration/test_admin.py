"""The admin listener ([admin] listen): /metrics, /healthz, /readyz,
/sessions, presence, and the token-guarded actions (kick, notice, reload,
drain), over HTTP with urllib.request against real chatd nodes, MariaDB and
Redis.  Also the listener's limits: methods, paths, auth, oversize requests,
pipelining and a slowloris client."""

import json
import os
import socket
import time
import unittest
import uuid

from harness import Client, Node, Stack, admin_request, wait_for

PW = "pw"


def uname(prefix="u"):
    return "%s%s" % (prefix, uuid.uuid4().hex[:10])


def login(port, proto=2):
    """A logged-in client: (client, user id)."""
    c = Client(port, proto=proto)
    uid = c.register(uname(), PW)
    ack = c.login(uid, PW)
    assert ack.get("errno") == 0, ack
    return c, uid


def raw_http(port, data, timeout=5):
    """Send raw bytes to the admin port; everything read until the server
    closes (or the timeout), and whether it closed."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    out = b""
    closed = False
    try:
        s.sendall(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                b = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not b:
                closed = True
                break
            out += b
    finally:
        s.close()
    return out, closed


class AdminNode(unittest.TestCase):
    """One node with every plugin."""

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.node = Node(cls.stack)

    @classmethod
    def tearDownClass(cls):
        cls.node.stop()

    def req(self, method, path, body=None, **kw):
        return self.node.admin(method, path, body, **kw)

    # ---- read-only endpoints -----------------------------------------------

    def test_healthz(self):
        st, h, body = self.req("GET", "/healthz")
        self.assertEqual(st, 200)
        self.assertTrue(h["Content-Type"].startswith("application/json"))
        self.assertEqual(body["status"], "ok")
        self.assertIn("loop_lag_ms", body)
        self.assertEqual(h["Connection"], "close")

    def test_head(self):
        st, h, body = self.req("HEAD", "/healthz")
        self.assertEqual(st, 200)
        self.assertEqual(body, "")
        self.assertGreater(int(h["Content-Length"]), 0)

    def test_metrics(self):
        st, h, body = self.req("GET", "/metrics")
        self.assertEqual(st, 200)
        self.assertTrue(h["Content-Type"].startswith("text/plain; version=0.0.4"),
                        h["Content-Type"])
        self.assertIn("chatd_build_info", body)

    def test_readyz(self):
        st, _, body = self.req("GET", "/readyz")
        self.assertEqual(st, 200, body)
        self.assertEqual(body["status"], "ready")
        self.assertEqual(body["checks"],
                         {"mysql": "ok", "redis": "ok", "plugins": "ok",
                          "draining": "no"})
        self.assertEqual(body["failed"], [])

    def test_sessions_paged(self):
        clients = [login(self.node.port, proto=p) for p in (1, 2, 2)]
        bare = Client(self.node.port)
        try:
            bare.send_raw(b"")
            uids = {u for _, u in clients}
            st, _, body = self.req("GET", "/sessions?limit=1000")
            self.assertEqual(st, 200)
            mine = [s for s in body["sessions"] if s["user"] in uids]
            self.assertEqual(len(mine), 3, body)
            for s in mine:
                self.assertEqual(s["transport"], "tcp")
                self.assertTrue(s["peer"].startswith("127.0.0.1:"), s)
                self.assertIn(s["proto"], (1, 2))
                self.assertGreaterEqual(s["connected_s"], 0)
                self.assertIsInstance(s["id"], int)
            self.assertEqual(sorted(s["proto"] for s in mine), [1, 2, 2])
            total = body["total"]
            self.assertGreaterEqual(total, 4)
            # pages of 2 cover every session once
            seen = []
            for off in range(0, total, 2):
                st, _, page = self.req("GET", "/sessions?offset=%d&limit=2" % off)
                self.assertEqual(st, 200)
                self.assertLessEqual(len(page["sessions"]), 2)
                seen += [s["id"] for s in page["sessions"]]
            self.assertEqual(len(seen), len(set(seen)))
            self.assertGreaterEqual(len(seen), 4)
            st, _, page = self.req("GET", "/sessions?limit=50000")
            self.assertEqual((st, page["limit"]), (200, 1000))
            for bad in ("limit=-1", "limit=x", "offset=", "offset=1e3"):
                st, _, _ = self.req("GET", "/sessions?" + bad)
                self.assertEqual(st, 400, bad)
        finally:
            bare.close()
            for c, _ in clients:
                c.close()

    def test_presence(self):
        c, uid = login(self.node.port)
        try:
            st, _, body = self.req("GET", "/users/%d/presence" % uid)
            self.assertEqual(st, 200)
            self.assertEqual((body["user"], body["online"], body["here"]),
                             (uid, True, True))
        finally:
            c.close()
        wait_for(lambda: not self.req("GET", "/users/%d/presence" % uid)[2]["online"],
                 what="user offline after close")
        st, _, body = self.req("GET", "/users/999999/presence")
        self.assertEqual((st, body["online"]), (200, False))

    # ---- routing, methods, auth --------------------------------------------

    def test_unknown_paths(self):
        for p in ("/", "/nope", "/metrics/x", "/users/abc/presence", "/users//kick",
                  "/users/1/other", "/users/99999999999999999999/presence"):
            st, h, body = self.req("GET", p)
            self.assertEqual(st, 404, p)
            self.assertEqual(body["error"], "not found")

    def test_bad_methods(self):
        for m, p, allow in (("POST", "/metrics", "GET, HEAD"),
                            ("PUT", "/healthz", "GET, HEAD"),
                            ("DELETE", "/sessions", "GET, HEAD"),
                            ("GET", "/reload", "POST"),
                            ("HEAD", "/drain", "POST"),
                            ("GET", "/users/1/kick", "POST"),
                            ("POST", "/users/1/presence", "GET, HEAD")):
            st, h, _ = self.req(m, p, b"" if m in ("POST", "PUT") else None)
            self.assertEqual(st, 405, (m, p))
            self.assertEqual(h["Allow"], allow, (m, p))

    def test_auth(self):
        for path in ("/reload", "/notice", "/drain?seconds=1", "/users/1/kick"):
            st, h, body = self.req("POST", path, {"text": "x"}, token=None)
            self.assertEqual(st, 401, path)
            self.assertIn("Bearer", h["WWW-Authenticate"])
            st, _, body = self.req("POST", path, {"text": "x"}, token="wrong")
            self.assertEqual(st, 403, path)
            self.assertEqual(body["error"], "wrong token")
        st, _, _ = self.req("POST", "/reload", token="test-admin-token-and-more")
        self.assertEqual(st, 403)
        # a raw header without the Bearer scheme
        out, _ = raw_http(self.node.admin_port,
                          b"POST /reload HTTP/1.1\r\nHost: x\r\n"
                          b"Authorization: test-admin-token\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 401 "), out)

    # ---- limits ------------------------------------------------------------

    def test_oversize(self):
        st, _, body = self.req("POST", "/notice", b"x" * (65536 + 1))
        self.assertEqual(st, 413)
        out, closed = raw_http(self.node.admin_port,
                               b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 9000
                               + b"\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 431 "), out[:80])
        self.assertTrue(closed)
        out, closed = raw_http(self.node.admin_port,
                               b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 414 "), out[:80])
        out, closed = raw_http(self.node.admin_port, b"\x16\x03\x01garbage\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:80])
        self.assertTrue(closed)

    def test_pipelining_answers_one(self):
        one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        out, closed = raw_http(self.node.admin_port, one * 3)
        self.assertTrue(closed)
        self.assertEqual(out.count(b"HTTP/1.1 200 OK"), 1, out)
        self.assertIn(b"Connection: close", out)

    def test_slowloris_cut(self):
        s = socket.create_connection(("127.0.0.1", self.node.admin_port))
        t0 = time.monotonic()
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
            s.settimeout(0.5)
            closed = False
            out = b""
            while time.monotonic() - t0 < 12:
                try:
                    s.sendall(b"X-A: b\r\n")
                except OSError:
                    closed = True
                    break
                try:
                    b = s.recv(4096)
                except socket.timeout:
                    continue
                except ConnectionResetError:
                    closed = True
                    break
                out += b
                if not b:
                    closed = True
                    break
                # meanwhile the listener still answers others
                self.assertEqual(self.req("GET", "/healthz")[0], 200)
            self.assertTrue(closed or out, "a slow request was not cut")
            self.assertLess(time.monotonic() - t0, 9)
            if out:
                self.assertTrue(out.startswith(b"HTTP/1.1 408 "), out[:80])
        finally:
            s.close()
        self.assertEqual(self.req("GET", "/healthz")[0], 200)

    # ---- actions -------------------------------------------------------------

    def test_reload(self):
        st, _, body = self.req("POST", "/reload")
        self.assertEqual(st, 200, body)
        self.assertEqual(body, {"ok": True, "result": "ok"})
        self.node.write_conf({"server": {"no_such_key": 1}})
        try:
            st, _, body = self.req("POST", "/reload")
            self.assertEqual(st, 500, body)
            self.assertFalse(body["ok"])
            self.assertIn("no_such_key", body["result"])
            self.assertIn("nothing changed", body["result"])
        finally:
            self.node.write_conf({"server": {"no_such_key": None}})
        st, _, body = self.req("POST", "/reload")
        self.assertEqual(st, 200, body)

    def test_notice_all(self):
        c2, _ = login(self.node.port, proto=2)
        c1, _ = login(self.node.port, proto=1)
        try:
            st, _, body = self.req("POST", "/notice", {"text": "maintenance at 5"})
            self.assertEqual(st, 200, body)
            self.assertEqual(body, {"sent": True, "to": "all"})
            m = c2.recv_until(lambda m: m.get("msgid") == 12)
            self.assertEqual(m, {"msgid": 12, "errno": 0, "errmsg": "maintenance at 5"})
            c1.expect_nothing(0.5)  # legacy clients get nothing
            self.assertFalse(c2.closed(0.2))
            for bad in ({}, {"text": ""}, {"text": 5}, {"text": "x", "group": "a"},
                        {"text": "x" * 5000}, b"{not json"):
                st, _, _ = self.req("POST", "/notice", bad)
                self.assertEqual(st, 400, bad)
            st, _, _ = self.req("POST", "/notice")
            self.assertEqual(st, 400)
        finally:
            c1.close()
            c2.close()

    def test_notice_group(self):
        a, ua = login(self.node.port)
        b, ub = login(self.node.port)
        out, _ = login(self.node.port)
        try:
            ack = a.request({"msgid": 8, "id": ua, "groupname": uname("g"),
                             "groupdesc": ""})
            gid = ack["groupid"]
            self.assertEqual(b.request({"msgid": 9, "id": ub, "groupid": gid})["errno"], 0)
            st, _, body = self.req("POST", "/notice", {"text": "to the group",
                                                       "group": gid})
            self.assertEqual(st, 200, body)
            self.assertEqual(body, {"sent": True, "group": gid, "members": 2})
            for c in (a, b):
                m = c.recv_until(lambda m: m.get("msgid") == 12)
                self.assertEqual(m["errmsg"], "to the group")
                self.assertEqual(m["errno"], 0)
            out.expect_nothing(0.5)
            st, _, body = self.req("POST", "/notice", {"text": "x", "group": 987654})
            self.assertEqual(st, 404, body)
        finally:
            for c in (a, b, out):
                c.close()

    def test_kick(self):
        c, uid = login(self.node.port)
        legacy, luid = login(self.node.port, proto=1)
        try:
            st, _, body = self.req("POST", "/users/%d/kick" % uid,
                                   {"text": "bye for now"})
            self.assertEqual(st, 200, body)
            self.assertEqual(body, {"user": uid, "was_online": True, "kicked": True})
            m = c.recv_until(lambda m: m.get("msgid") == 12)
            self.assertEqual(m, {"msgid": 12, "errno": 120, "errmsg": "bye for now"})
            self.assertTrue(c.closed(5))
            st, _, body = self.req("POST", "/users/%d/kick" % luid)
            self.assertEqual((st, body["was_online"]), (200, True))
            self.assertTrue(legacy.closed(5))
            st, _, body = self.req("POST", "/users/%d/kick" % 999999)
            self.assertEqual((st, body["was_online"]), (200, False))
        finally:
            c.close()
            legacy.close()


class AdminNoToken(unittest.TestCase):
    def test_actions_forbidden_without_token(self):
        with Node(Stack(), conf={"admin": {"token": None}}) as n:
            for path in ("/reload", "/drain", "/notice", "/users/1/kick"):
                st, _, body = n.admin("POST", path, {"text": "x"})
                self.assertEqual(st, 403, path)
                self.assertIn("no [admin] token", body["error"])
            # ready once the Redis link is up: polled (an ASan build under
            # load answered 503 for a moment)
            wait_for(lambda: n.admin("GET", "/readyz")[0] == 200, what="ready")

    def test_listen_off(self):
        with Node(Stack(), conf={"admin": {"listen": "off"}}) as n:
            self.assertIsNone(n.admin_port)
            n.wait_log("admin listener off")

    def test_workers_port_plus_i(self):
        with Node(Stack(), args=("-w", "2")) as n:
            for i in range(2):
                port = n.admin_port + i
                try:
                    st, _, body = wait_for(
                        lambda: _try(admin_request, port, "GET", "/healthz"),
                        timeout=30, what="worker %d admin port" % i)
                except TimeoutError as e:
                    raise AssertionError("%s\n%s" % (e, n.log_text())) from None
                self.assertEqual(st, 200)


class AdminReadiness(unittest.TestCase):
    """/readyz names the check that failed."""

    def test_redis_down_then_back(self):
        with Stack.private(redis=True) as st, Node(st) as n:
            wait_for(lambda: n.admin("GET", "/readyz")[0] == 200, what="ready")
            st.stop_redis()
            code, _, body = wait_for(
                lambda: (lambda r: r if r[0] == 503 else None)(n.admin("GET", "/readyz")),
                timeout=15, what="readyz 503 with Redis down")
            self.assertEqual(body["failed"], ["redis"])
            self.assertEqual(body["checks"]["redis"], "down")
            self.assertEqual(n.admin("GET", "/healthz")[0], 200)
            st.start_redis()
            wait_for(lambda: n.admin("GET", "/readyz")[0] == 200, timeout=20,
                     what="ready again with Redis back")

    def test_without_mysql_and_redis(self):
        with Node(None, mysql=False, redis=False, plugins=("login",)) as n:
            code, _, body = n.admin("GET", "/readyz")
            self.assertEqual(code, 200, body)
            self.assertEqual((body["checks"]["mysql"], body["checks"]["redis"]),
                             ("off", "off"))


class AdminConf(unittest.TestCase):
    """chatd -t checks [admin] like the other sections."""

    def check(self, admin_lines):
        import subprocess
        import tempfile
        from harness import CHATD, TEST_PLUGIN_DIR
        d = tempfile.mkdtemp(prefix="chat-admin-conf-")
        path = os.path.join(d, "chat.conf")
        with open(path, "w") as f:
            f.write("[server]\nlisten = 127.0.0.1:1\n[plugins]\ndir = %s\n"
                    "enabled = echo\n[admin]\n%s\n"
                    % (os.path.join(TEST_PLUGIN_DIR, "v1"), "\n".join(admin_lines)))
        p = subprocess.run([CHATD, "-t", "-c", path], capture_output=True, text=True,
                           timeout=30)
        return p.returncode, p.stdout + p.stderr, path

    def test_conf(self):
        for good in (["listen = off"], ["listen = [::1]:6080", "token = abc"],
                     ["listen = 127.0.0.1:6090"]):
            rc, out, _ = self.check(good)
            self.assertEqual(rc, 0, (good, out))
        for bad, why in ((["listen = localhost:6080"], "expected IP:PORT or off"),
                         (["listen = 127.0.0.1"], "expected IP:PORT or off"),
                         (["listen = 127.0.0.1:70000"], "expected IP:PORT or off"),
                         (["port = 1"], 'unknown key "port" in [admin]')):
            rc, out, path = self.check(bad)
            self.assertNotEqual(rc, 0, bad)
            self.assertIn("%s:7: " % path, out)
            self.assertIn(why, out)


def _try(f, *a):
    try:
        return f(*a)
    except OSError:
        return None


class AdminCluster(unittest.TestCase):
    """Two nodes on one Redis and one database."""

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.a = Node(cls.stack, node_id="adm-a-" + uuid.uuid4().hex[:6])
        cls.b = Node(cls.stack, db=cls.a.db, node_id="adm-b-" + uuid.uuid4().hex[:6],
                     migrate=False)

    @classmethod
    def tearDownClass(cls):
        cls.a.stop()
        cls.b.stop()

    def test_kick_across_nodes(self):
        c, uid = login(self.b.port)
        try:
            st, _, body = self.a.admin("GET", "/users/%d/presence" % uid)
            self.assertEqual((st, body["online"], body["here"]), (200, True, False))
            st, _, body = self.a.admin("POST", "/users/%d/kick" % uid)
            self.assertEqual((st, body["was_online"]), (200, True), body)
            m = c.recv_until(lambda m: m.get("msgid") == 12)
            self.assertEqual(m["errno"], 120)
            self.assertTrue(c.closed(5))
            wait_for(lambda: not self.a.admin("GET", "/users/%d/presence" % uid)[2]["online"],
                     what="kicked user offline")
        finally:
            c.close()

    def test_notice_across_nodes(self):
        ca, _ = login(self.a.port)
        cb, _ = login(self.b.port)
        try:
            st, _, _ = self.b.admin("POST", "/notice", {"text": "cluster-wide"})
            self.assertEqual(st, 200)
            for c in (ca, cb):
                m = c.recv_until(lambda m: m.get("msgid") == 12)
                self.assertEqual((m["errno"], m["errmsg"]), (0, "cluster-wide"))
        finally:
            ca.close()
            cb.close()


class AdminDrain(unittest.TestCase):
    def test_drain(self):
        stack = Stack()
        with Node(stack) as n:
            p2 = [login(n.port, proto=2) for _ in range(2)]
            p1 = [login(n.port, proto=1) for _ in range(2)]
            self.assertEqual(n.admin("GET", "/readyz")[0], 200)
            t0 = time.monotonic()
            st, _, body = n.admin("POST", "/drain?seconds=3")
            self.assertEqual(st, 202, body)
            self.assertEqual((body["draining"], body["seconds"]), (True, 3))
            self.assertGreaterEqual(body["sessions"], 4)
            # protocol 2: told at once, connection still open
            for c, _ in p2:
                m = c.recv_until(lambda m: m.get("msgid") == 12)
                self.assertEqual(m, {"msgid": 12, "errno": 119,
                                     "errmsg": "draining, reconnect elsewhere"})
            # no new connections
            with self.assertRaises(OSError):
                socket.create_connection(("127.0.0.1", n.port), timeout=2).close()
            st, _, body = n.admin("GET", "/readyz")
            self.assertEqual(st, 503)
            self.assertIn("draining", body["failed"])
            self.assertEqual(n.admin("POST", "/drain?seconds=1")[0], 409)
            self.assertEqual(n.admin("GET", "/healthz")[0], 200)
            # every session closed within N s (plus slack), none before ~0 s
            for c, _ in p1 + p2:
                self.assertTrue(c.closed(8), "a session outlived the drain")
            self.assertLess(time.monotonic() - t0, 8)
            wait_for(lambda: n.admin("GET", "/sessions")[2]["total"] == 0,
                     what="no sessions left")
            n.wait_log("admin: drain done")
            for c, _ in p1 + p2:
                c.close()
            self.assertEqual(n.stop(), 0)

    def test_drain_bad_seconds(self):
        with Node(Stack()) as n:
            for q in ("seconds=-1", "seconds=3601", "seconds=abc"):
                self.assertEqual(n.admin("POST", "/drain?" + q)[0], 400, q)
            self.assertEqual(n.admin("GET", "/readyz")[0], 200)


if __name__ == "__main__":
    unittest.main()
