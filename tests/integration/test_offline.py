"""The offline plugin against a real chatd, MariaDB and Redis: one-to-one
messages to an offline user come back in its next login ack, in order and
exactly once, in the legacy shape (JSON strings) and the protocol-2 shape
(objects); rows are deleted only after the ack was written; messages still in
the insert queue at login time are neither lost nor reordered; an unknown
user's message is dropped with a log line; a database outage is retried; a
hot reload of the plugin keeps the queue and its order.

A few tests hold a table lock from a separate MariaDB session (TableLock) to
keep the plugin's INSERT in flight while the test acts: that is how "a
message still in the queue" is made deterministic without sleeping.
"""

import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest
import uuid

from harness import Client, Node, Stack, PLUGIN_DIR, wait_for

# The offline store is what is tested, with protocol-2 senders for their
# ACKs: durable = cid keeps their messages (without cid) on its path, as
# before protocol-2 chat became durable by default (test_durable_default
# checks that durable messages reach an offline protocol-2 device by SYNC).
FAST = {"plugin.login": {"hash_cost": 1},
        "plugin.one2one": {"durable": "cid"}, "plugin.group": {"durable": "cid"}}
PLUGINS = ("login", "friend", "one2one", "group", "offline")
TEXTS = ['plain', 'quote " and \\ backslash', 'nul \u0000 inside', 'emoji \U0001F600',
         "sql '); DELETE FROM offline_messages; --", 'ctl \n\t\u0001', '']


def ranges(texts):
    """["m1","m2","m3","m7"] -> "m1..m3 m7" (for failure messages)."""
    out, run = [], []
    for t in texts:
        if run and t[1:].isdigit() and run[-1][1:].isdigit() and int(t[1:]) == int(run[-1][1:]) + 1:
            run.append(t)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else "%s..%s" % (run[0], run[-1]))
        run = [t]
    if run:
        out.append(run[0] if len(run) == 1 else "%s..%s" % (run[0], run[-1]))
    return " ".join(out)


def merged(*confs):
    out = {}
    for c in confs:
        for sec, kv in c.items():
            out.setdefault(sec, {}).update(kv)
    return out


class TableLock:
    """LOCK TABLES t WRITE (or READ: others may read, not write) held by a
    separate MariaDB session until release()."""

    def __init__(self, stack, db, table="offline_messages", mode="WRITE"):
        stack.sql(db, "SELECT 1")  # settles which account the harness uses
        user, password = stack._sql_user
        self.proc = subprocess.Popen(
            stack._mysql_cmd(user, password, db) + ["--unbuffered"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.proc.stdin.write(b"LOCK TABLES %s %s; SELECT 'locked';\n" % (table.encode(), mode.encode()))
        self.proc.stdin.flush()
        r, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if r else b""
        if b"locked" not in line:
            self.release()
            raise AssertionError("could not lock %s: %r" % (table, line))

    def release(self):
        if self.proc.returncode is None:
            try:
                self.proc.communicate(b"UNLOCK TABLES;\n", timeout=30)
            except (BrokenPipeError, ValueError):
                self.proc.communicate(timeout=30)


class OfflineCase(unittest.TestCase):
    nodes = ()
    extra_conf = {}

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.nodes = (Node(cls.stack, conf=merged(FAST, cls.extra_conf)),)

    @classmethod
    def tearDownClass(cls):
        for node in cls.nodes:
            if node.running():
                node.stop()

    def run(self, result=None):
        before = len(result.failures) + len(result.errors) if result else 0
        self.test_nodes = []
        out = super().run(result)
        if result and len(result.failures) + len(result.errors) > before:
            for node in list(type(self).nodes) + self.test_nodes:
                sys.stderr.write("---- %s (tail)\n%s\n" % (node.log_path, node.log_tail(60)))
        return out

    @property
    def node(self):
        return self.nodes[0]

    def client(self, node=None, **kw):
        c = Client((node or self.node).port, **kw)
        self.addCleanup(c.close)
        return c

    def user(self, node=None):
        c = self.client(node, proto=2)
        name = "u_" + uuid.uuid4().hex[:10]
        uid = c.register(name, "pw")
        c.close()
        return uid, name

    def sender(self, node=None):
        """A logged-in protocol-2 client."""
        uid, name = self.user(node)
        c = self.client(node, proto=2)
        ack = c.login(uid, "pw")
        self.assertEqual(ack["errno"], 0, ack)
        c.uid, c.name = uid, name
        return c

    def chat(self, c, to, text, wait=True, seq=None):
        msg = {"msgid": 6, "id": c.uid, "name": c.name, "toid": to, "msg": text,
               "time": "2024-05-01 12:00:00"}
        if seq is not None:
            msg["seq"] = seq
        if wait:
            r = c.request(msg)
            self.assertEqual(r["errno"], 0, r)
        else:
            c.send(msg)

    def replies(self, c, n, timeout=20):
        """The next n protocol-2 replies (msgid 11) as {seq: errno}."""
        out = {}
        deadline = time.monotonic() + timeout
        while len(out) < n:
            r = c.recv_until(lambda m: m.get("msgid") == 11,
                             timeout=max(0.1, deadline - time.monotonic()))
            out[r.get("seq")] = r["errno"]
        return out

    def rows(self, uid, node=None):
        return int(self.stack.sql((node or self.node).db, "SELECT COUNT(*) FROM "
                                  "offline_messages WHERE user_id = %d" % uid)[0][0])

    def wait_rows(self, uid, n, node=None, timeout=10):
        wait_for(lambda: self.rows(uid, node) == n, timeout=timeout,
                 what="%d offline rows of user %d" % (n, uid))

    def login_legacy(self, uid, node=None):
        c = self.client(node)
        c.send({"msgid": 1, "id": uid, "password": "pw"})
        ack = c.recv()
        self.assertEqual(ack["errno"], 0, ack)
        return c, ack

    def texts_legacy(self, ack):
        """The msg fields of a legacy ack's offlinemsg (strings parsed)."""
        out = []
        for s in ack.get("offlinemsg", []):
            self.assertIsInstance(s, str)
            out.append(json.loads(s)["msg"])
        return out

    def received_legacy(self, c, ack, n):
        """The msg fields of the first n stored messages: those of a legacy
        ack, then those that follow it as ordinary messages (a legacy ack
        holds what fits in the seed client's 1,024-byte read)."""
        out = self.texts_legacy(ack)
        while len(out) < n:
            out.append(c.recv(timeout=10)["msg"])
        return out


class TestOffline(OfflineCase):

    def test_one_to_one_in_order_exactly_once_legacy(self):
        a = self.sender()
        b, bname = self.user()
        texts = [t + " #%d" % i for i, t in enumerate(TEXTS * 4)]
        for t in texts:
            self.chat(a, b, t)
        self.wait_rows(b, len(texts))
        c, ack = self.login_legacy(b)
        self.assertEqual(set(ack), {"msgid", "errno", "id", "name", "offlinemsg"})
        self.assertEqual(self.received_legacy(c, ack, len(texts)), texts)
        first = json.loads(ack["offlinemsg"][0])
        self.assertEqual((first["msgid"], first["id"], first["name"], first["toid"]),
                         (6, a.uid, a.name, b))
        self.wait_rows(b, 0)
        c.send({"msgid": 3, "id": b})
        c.send({"msgid": 1, "id": b, "password": "pw"})
        self.assertEqual(c.recv(), {"msgid": 2, "errno": 0, "id": b, "name": bname})

    def test_protocol2_gets_objects(self):
        a = self.sender()
        b, _ = self.user()
        for t in TEXTS:
            self.chat(a, b, t)
        self.wait_rows(b, len(TEXTS))
        c = self.client(proto=2)
        ack = c.login(b, "pw")
        self.assertEqual(ack["errno"], 0, ack)
        self.assertEqual([m["msg"] for m in ack["offlinemsg"]], TEXTS)
        self.assertTrue(all(m["msgid"] == 6 and m["id"] == a.uid for m in ack["offlinemsg"]))
        self.wait_rows(b, 0)
        c.request({"msgid": 3})
        ack = c.login(b, "pw")
        self.assertEqual(ack["offlinemsg"], [])

    def test_burst_is_stored_in_order(self):
        a = self.sender()
        b, _ = self.user()
        n = 400
        for i in range(n):
            self.chat(a, b, "m%d" % i, wait=False)
        a.request({"msgid": 6, "toid": b, "msg": "last"})
        self.wait_rows(b, n + 1)
        ordered = [json.loads(r[0])["msg"] for r in self.stack.sql(
            self.node.db, "SELECT message FROM offline_messages WHERE user_id = %d "
            "ORDER BY id" % b)]
        self.assertEqual(ordered, ["m%d" % i for i in range(n)] + ["last"])

    def test_live_messages_follow_the_stored_ones(self):
        """a keeps sending while b logs in: what b sees (ack, then live) is
        every message once, in order.  Messages in flight while b's claim
        reaches Redis are routed back to this node over the bus' pub/sub
        connection while earlier ones still come back "offline" on its
        command connection; the two must not overtake each other."""
        a = self.sender()
        b, _ = self.user()
        n = 300
        for i in range(n // 2):
            self.chat(a, b, "m%d" % i, wait=False)
        c = self.client()
        c.send({"msgid": 1, "id": b, "password": "pw"})
        for i in range(n // 2, n):
            self.chat(a, b, "m%d" % i, wait=False)
        a.request({"msgid": 6, "toid": b, "msg": "end"})
        ack = c.recv(timeout=10)
        self.assertEqual(ack["errno"], 0, ack)
        seen = self.texts_legacy(ack)
        while not seen or seen[-1] != "end":
            try:
                seen.append(c.recv(timeout=10)["msg"])
            except TimeoutError:
                raise AssertionError("stuck after %d messages (%d in the ack, %d rows): %s"
                                     % (len(seen), len(ack.get("offlinemsg", [])),
                                        self.rows(b), ranges(seen)))
        self.assertEqual(seen, ["m%d" % i for i in range(n)] + ["end"],
                         "%d in the ack, %d rows left: %s" % (
                             len(ack.get("offlinemsg", [])), self.rows(b), ranges(seen)))
        self.wait_rows(b, 0)

    def test_rows_stay_until_the_ack_is_written(self):
        a = self.sender()
        b, _ = self.user()
        texts = ["r%d" % i for i in range(5)]
        for t in texts:
            self.chat(a, b, t)
        self.wait_rows(b, 5)
        for _ in range(5):
            # LOGIN, then an abortive close (RST) before the ack can be sent
            s = socket.create_connection(("127.0.0.1", self.node.port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.sendall(json.dumps({"msgid": 1, "id": b, "password": "pw"}).encode() + b"\0")
            s.close()
        # every one of those logins died before its ack: no row was deleted
        # (if one had been answered, its rows would be gone and the login
        # below would miss them)
        self.assertEqual(self.rows(b), 5)
        # nothing was lost: the next login gets them all, then they go
        c = self.client()
        ack = wait_for(lambda: (lambda a_: a_ if a_["errno"] == 0 else None)(
            c.login(b, "pw")), timeout=5, what="login")
        self.assertEqual(self.texts_legacy(ack), texts)
        self.wait_rows(b, 0)

    def test_cross_node(self):
        other = Node(self.stack, db=self.node.db, migrate=False, conf=FAST)
        self.test_nodes.append(other)
        self.addCleanup(other.stop)
        a = self.sender()
        b, _ = self.user()
        for i in range(10):
            self.chat(a, b, "x%d" % i)
        self.wait_rows(b, 10)
        c, ack = self.login_legacy(b, node=other)
        self.assertEqual(self.received_legacy(c, ack, 10), ["x%d" % i for i in range(10)])
        self.wait_rows(b, 0)


class TestLateRows(OfflineCase):
    """A row one node commits just after the user's login on another node
    has read the table (docs/reliability.md): the node holding the user
    takes it and sends it live, once.  A READ lock lets the login read the
    table while it holds the sender's INSERT back."""

    def setUp(self):
        self.other = Node(self.stack, db=self.node.db, migrate=False, conf=FAST)
        self.test_nodes.append(self.other)
        self.addCleanup(self.other.stop)

    def held_back(self, a, b, texts):
        """Send texts from a to b while the table is READ-locked; the lock."""
        lk = TableLock(self.stack, self.node.db, mode="READ")
        self.addCleanup(lk.release)
        mark = self.node.log_mark()
        for i, t in enumerate(texts):
            self.chat(a, b, t, wait=False, seq=i)
        self.node.wait_log("queued a message for user %d (%d waiting)" % (b, len(texts)),
                           since=mark)
        return lk

    def test_legacy_login_elsewhere(self):
        a = self.sender()
        b, _ = self.user()
        texts = ["late0", "late1", "late2"]
        lk = self.held_back(a, b, texts)
        c, ack = self.login_legacy(b, node=self.other)  # reads the table: nothing yet
        self.assertEqual(self.texts_legacy(ack), [])
        c.expect_nothing(0.3)
        lk.release()
        self.assertEqual(self.replies(a, 3), {0: 0, 1: 0, 2: 0})
        self.assertEqual([c.recv(timeout=10)["msg"] for _ in texts], texts)
        self.wait_rows(b, 0)
        c.expect_nothing(0.5)  # once: the next login has nothing either
        self.other.wait_log("offline messages of user %d stored after its login" % b)

    def test_protocol2_login_elsewhere(self):
        a = self.sender()
        b, _ = self.user()
        lk = self.held_back(a, b, ["late"])
        c = self.client(self.other, proto=2)
        ack = c.login(b, "pw")
        self.assertEqual((ack["errno"], ack.get("offlinemsg", [])), (0, []), ack)
        lk.release()
        m = c.recv_until(lambda m: m.get("msgid") == 6, timeout=10)
        self.assertEqual((m["msg"], m["id"]), ("late", a.uid))
        self.wait_rows(b, 0)
        c.expect_nothing(0.5)


class TestLimits(OfflineCase):
    extra_conf = {"plugin.offline": {"max_per_login": 5}}

    def test_max_per_login(self):
        a = self.sender()
        b, _ = self.user()
        for i in range(12):
            self.chat(a, b, "k%d" % i)
        self.wait_rows(b, 12)
        got = []
        for expect in (5, 5, 2, 0):
            c, ack = self.login_legacy(b)
            self.assertEqual(len(ack.get("offlinemsg", [])), expect, ack)
            got += self.texts_legacy(ack)
            self.wait_rows(b, 12 - len(got))
            c.send({"msgid": 3, "id": b})
            c.close()
            wait_for(lambda: self.client(proto=2).request(
                {"msgid": 1, "id": b, "password": "bad"})["errno"] == 1, what="logout")
        self.assertEqual(got, ["k%d" % i for i in range(12)])


class TestQueue(OfflineCase):
    """The insert queue itself, held back by a table lock."""

    extra_conf = {"plugin.offline": {"flush_wait_ms": 20000},
                  "server": {"login_part_timeout_ms": 30000}}

    def lock(self, db=None):
        lk = TableLock(self.stack, db or self.node.db)
        self.addCleanup(lk.release)
        return lk

    def test_queued_messages_are_in_the_login_ack(self):
        a = self.sender()
        b, _ = self.user()
        lk = self.lock()
        mark = self.node.log_mark()
        for i in range(10):
            # the first INSERT blocks, the rest queue; acknowledged once stored
            self.chat(a, b, "q%d" % i, wait=False, seq=1000 + i)
        self.node.wait_log("queued a message for user %d (10 waiting)" % b, since=mark)
        c = self.client(proto=2)
        c.send({"msgid": 1, "id": b, "password": "pw", "seq": 1})
        # the ack waits for the queue; b is bound meanwhile, so these are live
        self.node.wait_log("user %d logged in" % b)
        for i in range(10, 15):
            self.chat(a, b, "q%d" % i)
        c.expect_nothing(0.5)
        a.expect_nothing(0.1)           # nothing stored yet: no ack
        lk.release()
        self.assertEqual(self.replies(a, 10), {1000 + i: 0 for i in range(10)})
        ack = c.recv(timeout=20)
        self.assertEqual((ack["msgid"], ack["errno"]), (2, 0), ack)
        live = [c.recv()["msg"] for _ in range(5)]
        self.assertEqual([m["msg"] for m in ack["offlinemsg"]] + live,
                         ["q%d" % i for i in range(15)])
        self.wait_rows(b, 0)

    def test_unknown_user_is_dropped_and_logged(self):
        a = self.sender()
        b, _ = self.user()
        gone, _ = self.user()
        self.chat(a, gone, "warm")  # one2one now knows the id exists
        self.wait_rows(gone, 1)
        self.stack.sql(self.node.db, "DELETE FROM users WHERE id = %d" % gone)
        lk = self.lock()
        mark = self.node.log_mark()
        self.chat(a, b, "v0", wait=False, seq=1)         # in flight, blocked
        self.chat(a, gone, "nobody", wait=False, seq=2)  # the next batch: 1452 ...
        self.chat(a, b, "v1", wait=False, seq=3)
        self.chat(a, b, "v2", wait=False, seq=4)
        self.node.wait_log("queued a message for user %d (4 waiting)" % b, since=mark)
        lk.release()
        # acknowledged once stored; the unknown user's copy gets 108
        self.assertEqual(self.replies(a, 4), {1: 0, 2: 108, 3: 0, 4: 0})
        self.node.wait_log("dropping an offline message for unknown user %d" % gone,
                           since=mark)
        self.wait_rows(b, 3)            # ... and the rest of it is kept
        c, ack = self.login_legacy(b)
        self.assertEqual(self.texts_legacy(ack), ["v0", "v1", "v2"])

    def test_reload_keeps_the_queue_in_order(self):
        plugdir = tempfile.mkdtemp(prefix="chatd-plugins-")
        self.addCleanup(shutil.rmtree, plugdir, True)
        for p in PLUGINS:
            shutil.copyfile(os.path.join(PLUGIN_DIR, p + ".so"), os.path.join(plugdir, p + ".so"))
        node = Node(self.stack, plugin_dir=plugdir, conf=merged(FAST, self.extra_conf))
        self.test_nodes.append(node)
        self.addCleanup(node.stop)
        a = self.sender(node)
        b, _ = self.user(node)
        lk = self.lock(node.db)
        mark = node.log_mark()
        for i in range(8):
            self.chat(a, b, "h%d" % i, wait=False, seq=i)  # h0 in flight, h1..h7 queued
        node.wait_log("queued a message for user %d (8 waiting)" % b, since=mark)
        tmp = os.path.join(plugdir, ".offline.so.tmp")
        shutil.copyfile(os.path.join(PLUGIN_DIR, "offline.so"), tmp)
        os.replace(tmp, os.path.join(plugdir, "offline.so"))
        mark = node.log_mark()
        node.sighup()
        node.wait_log("handing 7 queued offline messages to the new instance", since=mark)
        node.wait_log("plugin offline (load 5): retired", since=mark)
        for i in range(8, 12):
            self.chat(a, b, "h%d" % i, wait=False, seq=i)  # queued in the new instance
        lk.release()
        # the tickets moved with the queue: every sender hears once stored
        self.assertEqual(self.replies(a, 12), {i: 0 for i in range(12)})
        self.wait_rows(b, 12, node=node)
        node.wait_log("plugin offline (load 5): finalised and unloaded", since=mark)
        c, ack = self.login_legacy(b, node=node)
        self.assertEqual(self.received_legacy(c, ack, 12), ["h%d" % i for i in range(12)])


# A database outage: see test_delivery.TestDatabaseDown (sends during the
# outage are answered 113, never acknowledged and then lost).


if __name__ == "__main__":
    unittest.main()
