"""Issue 14, defects 3, 8 and 9: an acknowledgement means "delivered or
stored", every queue has a bound, and a message is bounded as a whole.

  3a  one sender's group fan-out to offline members cannot take the offline
      queue from anybody else: it gets 113 past its own share, while an
      unrelated user's messages to an offline friend are all acknowledged
      and all arrive;
  3b  with MariaDB down a send to an offline user is never acknowledged
      errno 0; whatever was acknowledged 0 survives kill -9 and SIGTERM;
  3c  a reader cut at max_output loses nothing that was acknowledged: what
      was queued for it and unwritten goes to the offline store;
  8   with MariaDB stopped (SIGSTOP) messages to ids not yet known get 113
      past the lookup bounds, and chatd's memory stays bounded;
  9   a message with a 60 KB extra field gets 105; a seed-shaped message
      with "time" is forwarded byte for byte.
"""

import json
import os
import select
import signal
import socket
import sys
import time
import unittest
import uuid

from harness import Client, Node, Stack, wait_for
from test_offline import TableLock

FAST = {"plugin.login": {"hash_cost": 1}}
# 3a-3c test the non-durable path's promise (an ACK means delivered or in
# the offline store) with protocol-2 senders, whose messages are durable by
# default (stored first: test_durable covers that path's outage, restart
# and kill): durable = cid keeps them on the offline store's path.
NONDURABLE = {"plugin.one2one": {"durable": "cid"}, "plugin.group": {"durable": "cid"}}


def merged(*confs):
    out = {}
    for c in confs:
        for sec, kv in c.items():
            out.setdefault(sec, {}).update(kv)
    return out


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Case(unittest.TestCase):
    def setUp(self):
        self.nodes = []

    def run(self, result=None):
        before = len(result.failures) + len(result.errors) if result else 0
        out = super().run(result)
        if result and len(result.failures) + len(result.errors) > before:
            for node in getattr(self, "nodes", []):
                sys.stderr.write("---- %s (tail)\n%s\n" % (node.log_path, node.log_tail(40)))
        return out

    def node(self, stack, conf=None, **kw):
        n = Node(stack, conf=merged(FAST, conf or {}), **kw)
        self.nodes.append(n)
        self.addCleanup(lambda: n.running() and n.stop())
        return n

    def client(self, node, **kw):
        c = Client(node.port, **kw)
        self.addCleanup(c.close)
        return c

    def user(self, node):
        c = self.client(node, proto=2)
        name = "u_" + uuid.uuid4().hex[:10]
        uid = c.register(name, "pw")
        c.close()
        return uid, name

    def sender(self, node):
        uid, name = self.user(node)
        c = self.client(node, proto=2)
        self.assertEqual(c.login(uid, "pw")["errno"], 0)
        c.uid, c.name = uid, name
        return c

    def replies(self, c, n, timeout=20):
        """The next n replies (msgid 11) as {seq: reply}."""
        out = {}
        deadline = time.monotonic() + timeout
        while len(out) < n:
            r = c.recv_until(lambda m: m.get("msgid") == 11,
                             timeout=max(0.1, deadline - time.monotonic()))
            out[r.get("seq")] = r
        return out

    def offline_texts(self, node, uid):
        """Log uid in (once its last session is gone) and out again: the
        texts of its login ack's offlinemsg and of the stored messages that
        follow the ack (its "following" count)."""
        def attempt():
            c = Client(node.port, proto=2)
            ack = c.login(uid, "pw")
            if ack["errno"] != 0:
                c.close()
                return None
            texts = [m["msg"] for m in ack["offlinemsg"]]
            for _ in range(ack.get("following", {}).get("offlinemsg", 0)):
                texts.append(c.recv_until(lambda m: m.get("msgid") in (6, 10),
                                          timeout=10)["msg"])
            c.request({"msgid": 3})
            c.close()
            return (texts,)  # truthy even when empty
        return wait_for(attempt, timeout=10, what="login of %d" % uid)[0]


class TestFairQueue(Case):
    """3a: per-sender shares of the offline queue."""

    CONF = merged(NONDURABLE,
                  {"plugin.offline": {"queue_max_bytes": 65536,
                                      "queue_sender_max_bytes": 8192,
                                      "queue_user_max_bytes": 65536,
                                      "flush_wait_ms": 20000},
                   "server": {"login_part_timeout_ms": 30000}})

    def test_fan_out_cannot_starve_others(self):
        stack = Stack()
        node = self.node(stack, self.CONF)
        g = self.sender(node)
        u = self.sender(node)
        friend, _ = self.user(node)
        # 30 offline members, made in SQL (they never log in)
        names = ["m_" + uuid.uuid4().hex[:12] for _ in range(30)]
        stack.sql(node.db, "INSERT INTO users (name, pwhash) VALUES " +
                  ",".join("('%s','x')" % n for n in names))
        gname = "g_" + uuid.uuid4().hex[:10]
        stack.sql(node.db, "INSERT INTO chat_groups (name, created_by) VALUES ('%s', %d)"
                  % (gname, g.uid))
        gid = int(stack.sql(node.db, "SELECT id FROM chat_groups WHERE name = '%s'"
                            % gname)[0][0])
        stack.sql(node.db, "INSERT INTO group_members (group_id, user_id, role) "
                  "SELECT %d, id, 'normal' FROM users WHERE name LIKE 'm\\_%%'" % gid)
        stack.sql(node.db, "INSERT INTO group_members (group_id, user_id, role) "
                  "VALUES (%d, %d, 'creator')" % (gid, g.uid))
        lk = TableLock(stack, node.db)
        self.addCleanup(lk.release)
        mark = node.log_mark()
        for i in range(20):
            g.send({"msgid": 10, "groupid": gid, "msg": "fan-out %d %s" % (i, "x" * 80),
                    "seq": 100 + i})
        for i in range(20):
            u.send({"msgid": 6, "toid": friend, "msg": "f%d" % i, "seq": 200 + i})
        wait_for(lambda: node.log_text()[mark:].count(
            "queued a message for user %d " % friend) == 20, timeout=20,
            what="the friend's 20 messages queued")
        lk.release()
        ur = self.replies(u, 20)
        self.assertEqual({s: r["errno"] for s, r in ur.items()},
                         {200 + i: 0 for i in range(20)})
        gr = self.replies(g, 20)
        busy = [r for r in gr.values() if r["errno"] == 113]
        self.assertTrue(busy, "the fan-out never hit its share: %r" % gr)
        self.assertTrue(all(r.get("failed", 0) > 0 for r in busy), busy)
        self.assertTrue(all(r["errno"] in (0, 113) for r in gr.values()), gr)
        self.assertEqual(self.offline_texts(node, friend), ["f%d" % i for i in range(20)])


class TestDatabaseDown(Case):
    """3b: nothing acknowledged 0 is lost when MariaDB is down."""

    CONF = merged(NONDURABLE, {"plugin.offline": {"retry_min_ms": 50, "retry_max_ms": 200}})

    def outage(self, how):
        stack = Stack.private(redis=True, mysql=True)
        self.addCleanup(stack.close)
        node = self.node(stack, self.CONF)
        a = self.sender(node)
        b, _ = self.user(node)
        r = a.request({"msgid": 6, "toid": b, "msg": "before"})
        self.assertEqual(r["errno"], 0, r)   # acknowledged once committed
        self.assertEqual(stack.sql(node.db, "SELECT COUNT(*) FROM offline_messages"),
                         [("1",)])
        stack.stop_mysql()
        acked = ["before"]
        for i in range(30):
            a.send({"msgid": 6, "toid": b, "msg": "d%d" % i, "seq": 1000 + i})
        got = {}
        deadline = time.monotonic() + 15
        while len(got) < 30 and time.monotonic() < deadline:
            try:
                m = a.recv(timeout=0.5)
            except TimeoutError:
                continue
            if m.get("msgid") == 11:
                got[m["seq"]] = m["errno"]
        self.assertTrue(all(e != 0 for e in got.values()),
                        "acknowledged while the database is down: %r" % got)
        self.assertTrue(all(e == 113 for e in got.values()), got)
        if how == "sigkill":
            node.kill(signal.SIGKILL)
            node.wait()
        elif how == "sigterm":
            node.stop()
        stack.start_mysql()
        if how is not None:
            node = self.node(stack, self.CONF, db=node.db, migrate=False)
            uid = a.uid
            a.close()
            a = self.client(node, proto=2)
            # a killed node's presence lasts until its heartbeat expires
            wait_for(lambda: a.login(uid, "pw")["errno"] == 0, timeout=15,
                     what="login after the restart")
        # after the outage sends are stored and acknowledged again
        deadline = time.monotonic() + 30
        while True:
            r = a.request({"msgid": 6, "toid": b, "msg": "after"})
            if r["errno"] == 0:
                acked.append("after")
                break
            self.assertEqual(r["errno"], 113, r)
            self.assertLess(time.monotonic(), deadline, "never acknowledged again")
            time.sleep(0.1)
        self.assertEqual(self.offline_texts(node, b), acked)

    def test_outage(self):
        self.outage(None)

    def test_outage_then_kill9(self):
        self.outage("sigkill")

    def test_outage_then_sigterm(self):
        self.outage("sigterm")


class TestSlowReader(Case):
    """3c: a reader cut at max_output gets every acknowledged message."""

    def test_cut_reader_loses_nothing(self):
        stack = Stack()
        node = self.node(stack, merged(NONDURABLE, {"server": {"max_output": 65536}}))
        a = self.sender(node)
        rid, _ = self.user(node)
        reader = self.client(node, proto=2, rcvbuf=4096)
        self.assertEqual(reader.login(rid, "pw")["errno"], 0)
        mark = node.log_mark()
        n = 3000
        pad = "p" * 3000
        replies = {}

        def read_reply(timeout):
            m = a.recv(timeout=timeout)
            if m.get("msgid") == 11:
                replies[m["seq"]] = m["errno"]

        # at most 200 requests in flight, as a client that reads its replies
        # does: the sender is never the slow reader, however loaded the box
        for i in range(n):
            while i - len(replies) >= 200:
                read_reply(10)
            a.send({"msgid": 6, "toid": rid, "msg": "s%d %s" % (i, pad), "seq": i})
        deadline = time.monotonic() + 30
        while len(replies) < n and time.monotonic() < deadline:
            try:
                read_reply(1)
            except TimeoutError:
                continue
        self.assertEqual(len(replies), n)
        node.wait_log("over max_output", since=mark)
        acked = {"s%d" % i for i, e in replies.items() if e == 0}
        self.assertGreater(len(acked), n // 2)
        seen = set()
        while True:
            try:
                m = reader.recv(timeout=5)
            except (EOFError, ConnectionError):
                break
            except TimeoutError:
                break
            if m.get("msgid") == 6:
                seen.add(m["msg"].split()[0])
        # a login ack of stored messages this big would itself be cut at
        # this max_output (issue 14 #2, not this test's): read them with a
        # larger one, after a graceful restart (which stores what is queued)
        node.write_conf({"server": {"max_output": 64 << 20}})
        node.restart()
        stored = {t.split()[0] for t in self.offline_texts_all(node, rid)}
        missing = acked - seen - stored
        self.assertFalse(missing, "%d acknowledged messages lost (read %d, stored %d)"
                         % (len(missing), len(seen), len(stored)))

    def offline_texts_all(self, node, uid):
        """Log in until the store is empty; every stored text (a set)."""
        out = set()
        for _ in range(20):
            got = self.offline_texts(node, uid)
            if not got:
                return out
            out.update(got)
        return out


class TestLookupBound(Case):
    """8: a stalled database cannot grow the lookup queue without bound."""

    def test_stalled_database_memory_is_bounded(self):
        stack = Stack.private(redis=True, mysql=True)
        self.addCleanup(stack.close)
        # Under ASan freed memory waits in a quarantine (256 MB by default)
        # and shows in RSS; without it the growth measured is the queues'.
        # (Harmless for a chatd built without ASan, which ignores it.)
        saved = os.environ.get("ASAN_OPTIONS")
        os.environ["ASAN_OPTIONS"] = (saved + ":" if saved else "") + "quarantine_size_mb=0"
        try:
            node = self.node(stack, {"plugin.one2one": {"msg_max": 60000}})
        finally:
            if saved is None:
                del os.environ["ASAN_OPTIONS"]
            else:
                os.environ["ASAN_OPTIONS"] = saved
        a = self.sender(node)
        with open(os.path.join(stack._mysql.dir, "mariadb.pid")) as f:
            mpid = int(f.read().strip())
        base = rss_kb(node.pid)
        os.kill(mpid, signal.SIGSTOP)
        self.addCleanup(os.kill, mpid, signal.SIGCONT)
        text = "y" * 50000
        busy = 0
        for i in range(1500):
            a.send({"msgid": 6, "toid": 10 ** 12 + i % 5, "msg": text, "seq": i})
            while True:
                try:
                    m = a.recv(timeout=0)
                except TimeoutError:
                    break
                busy += m.get("errno") == 113
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                m = a.recv(timeout=0.2)
            except TimeoutError:
                break
            busy += m.get("errno") == 113
        grown = rss_kb(node.pid) - base
        self.assertGreater(busy, 1000, "the sender was never told busy")
        self.assertLess(grown, 40 * 1024, "chatd grew by %d kB" % grown)


class TestWholeMessage(Case):
    """9: the forwarded message is bounded as a whole; "time" is kept."""

    def test_pad_gets_105_and_time_is_forwarded(self):
        stack = Stack()
        node = self.node(stack)
        a = self.sender(node)
        b = self.sender(node)
        r = a.request({"msgid": 6, "toid": b.uid, "msg": "hi", "pad": "z" * 60000})
        self.assertEqual(r["errno"], 105, r)
        r = a.request({"msgid": 10, "groupid": 1, "msg": "hi", "pad": "z" * 60000})
        self.assertEqual(r["errno"], 105, r)
        # a legacy (seed) sender: the frame is forwarded byte for byte
        legacy_a, name = self.user(node)
        lc = self.client(node)
        lc.send({"msgid": 1, "id": legacy_a, "password": "pw"})
        self.assertEqual(lc.recv()["errno"], 0)
        text = ('{"msgid":6,"id":%d,"name":"%s","toid":%d,"msg":"hello there",'
                '"time":"2024-05-01 12:00:00"}' % (legacy_a, name, b.uid))
        lc.send_raw(text.encode() + b"\0")
        got = b.recv_until(lambda m: m.get("msgid") == 6)
        self.assertEqual(json.dumps(got, separators=(",", ":")), text)


if __name__ == "__main__":
    unittest.main()
