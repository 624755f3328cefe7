"""Multi-device logins ([plugin.login] multi_login = multi, issue 8).

One user logged in on several devices at once, on one node and on two
nodes sharing one Redis and one database: every device gets every message
of the user's conversations (one2one and group, durable and not), the
user's other devices get what it sent itself (durable: the same delivery
JSON, with mid and cseq; the sending device has its ack instead), logout
of one device leaves the others online and their resume tokens valid, SYNC
from independent positions converges, devices_max refuses one more device
with errno 127, and a node killed with SIGKILL leaves the user online
through the device on the other node.  With multi_login = refuse (today's
default) the second device's login fails, so every test here fails.
"""

import time
import unittest
import uuid

from harness import Client, Node, Stack, wait_for

PLUGINS = ("login", "friend", "one2one", "group", "offline", "store", "typing")
# "plain" below means non-durable: durable = cid keeps protocol-2 messages
# without cid on that path (under the default, all, they are durable as
# those with a cid; test_durable_default checks their copies to devices)
CONF = {"plugin.login": {"hash_cost": 1, "multi_login": "multi", "devices_max": 3},
        "plugin.one2one": {"durable": "cid"}, "plugin.group": {"durable": "cid"}}


def client2(node):
    return Client(node.port, term=b"\n", proto=2)


def login2(node, uid, pw="pw", timeout=15):
    """A protocol-2 client logged in as uid (retries while a killed node's
    presence lingers); returns (client, ack)."""
    deadline = time.monotonic() + timeout
    while True:
        c = client2(node)
        ack = c.login(uid, pw)
        if ack["errno"] == 0:
            return c, ack
        c.close()
        if time.monotonic() > deadline:
            raise AssertionError("login %d: %r" % (uid, ack))
        time.sleep(0.2)


def sync_all(c, positions=None):
    """SYNC until "more" is false; returns (messages in order, heads)."""
    pos = dict(positions or {})
    msgs = []
    while True:
        r = c.request({"msgid": 15, "convs": [{"conv": k, "cseq": v}
                                              for k, v in pos.items()]}, timeout=20)
        assert r["errno"] == 0, r
        for m in r["msgs"]:
            assert m["cseq"] > pos.get(m["conv"], 0), (m, pos)
            pos[m["conv"]] = m["cseq"]
            msgs.append(m)
        if not r["more"]:
            return msgs, {h["conv"]: h["head"] for h in r["convs"]}


def is_msg(msgid, text):
    return lambda m: m.get("msgid") == msgid and m.get("msg") == text


def no_such(c, msgid, text, timeout=0.5):
    """c receives no msgid/text message within timeout."""
    try:
        m = c.recv_until(is_msg(msgid, text), timeout=timeout)
    except TimeoutError:
        return True
    raise AssertionError("unexpected %r" % m)


class MultiBase(unittest.TestCase):
    nodes = ()

    @classmethod
    def start_nodes(cls, n):
        cls.stack = Stack()
        first = Node(cls.stack, plugins=PLUGINS, conf=CONF)
        cls.nodes = [first] + [Node(cls.stack, db=first.db, migrate=False,
                                    plugins=PLUGINS, conf=CONF) for _ in range(n - 1)]

    @classmethod
    def tearDownClass(cls):
        for n in cls.nodes:
            if n.running():
                assert n.stop() == 0, n.log_tail()

    def run(self, result=None):
        before = len(result.failures) + len(result.errors) if result else 0
        res = super().run(result)
        if result and len(result.failures) + len(result.errors) > before:
            for n in self.nodes:
                print("---- %s (tail)\n%s" % (n.log_path, n.log_tail(60)))
        return res

    def user(self):
        c = client2(self.nodes[0])
        uid = c.register("u-%s" % uuid.uuid4().hex[:10], "pw")
        c.close()
        return uid

    def online(self, node, uid):
        st, _, body = node.admin("GET", "/users/%d/presence" % uid)
        assert st == 200, (st, body)
        return body["online"]

    def group(self, owner_c, members):
        g = owner_c.request({"msgid": 8, "groupname": "g-%s" % uuid.uuid4().hex[:8]})
        self.assertEqual(g["errno"], 0, g)
        for u in members:
            r = owner_c.request({"msgid": 9, "groupid": g["groupid"], "userid": u})
            self.assertEqual(r["errno"], 0, r)
        return g["groupid"]

    def check_fanout(self, peer_c, peer, me, devs):
        """peer -> me (one2one and group, durable and not): every device of
        me gets each; me's durable and plain sends from devs[0] reach the
        peer and devs[1:], never devs[0] itself."""
        gid = self.group(peer_c, [me])
        tag = uuid.uuid4().hex[:6]
        for kind, extra in (("plain", {}), ("durable", {"cid": "c-" + tag})):
            text = "%s-o2o-%s" % (kind, tag)
            r = peer_c.request(dict({"msgid": 6, "toid": me, "msg": text}, **extra))
            self.assertEqual(r["errno"], 0, r)
            for d in devs:
                m = d.recv_until(is_msg(6, text))
                self.assertEqual(m["id"], peer)
                if extra:
                    self.assertEqual((m["mid"], m["cseq"]), (r["mid"], r["cseq"]))
            text = "%s-grp-%s" % (kind, tag)
            extra = {"cid": "g-" + tag} if extra else {}
            r = peer_c.request(dict({"msgid": 10, "groupid": gid, "msg": text}, **extra))
            self.assertEqual(r["errno"], 0, r)
            for d in devs:
                m = d.recv_until(is_msg(10, text))
                if extra:
                    self.assertEqual(m["mid"], r["mid"])
        # the user's own sends, from the first device
        for kind, extra in (("plain", {}), ("durable", {"cid": "m-" + tag})):
            text = "mine-%s-%s" % (kind, tag)
            r = devs[0].request(dict({"msgid": 6, "toid": peer, "msg": text}, **extra))
            self.assertEqual(r["errno"], 0, r)
            got = peer_c.recv_until(is_msg(6, text))
            for d in devs[1:]:
                m = d.recv_until(is_msg(6, text))
                self.assertEqual((m["id"], m["toid"]), (me, peer))
                if extra:
                    self.assertEqual((m["mid"], m["cseq"], m["conv"]),
                                     (r["mid"], r["cseq"], r["conv"]))
                    self.assertEqual(m, got)  # the same delivery JSON
            text = "mine-grp-%s-%s" % (kind, tag)
            extra = {"cid": "mg-" + tag} if extra else {}
            r = devs[0].request(dict({"msgid": 10, "groupid": gid, "msg": text}, **extra))
            self.assertEqual(r["errno"], 0, r)
            peer_c.recv_until(is_msg(10, text))
            for d in devs[1:]:
                m = d.recv_until(is_msg(10, text))
                if extra:
                    self.assertEqual(m["mid"], r["mid"])
        no_such(devs[0], 6, "mine-durable-%s" % tag)
        no_such(devs[0], 10, "mine-grp-durable-%s" % tag, timeout=0.1)


class TwoNodes(MultiBase):
    @classmethod
    def setUpClass(cls):
        cls.start_nodes(2)

    def test_devices_on_two_nodes_get_everything(self):
        a, b = self.nodes
        me, peer = self.user(), self.user()
        d1, _ = login2(a, me)
        d2, _ = login2(b, me)
        pc, _ = login2(a, peer)
        self.check_fanout(pc, peer, me, [d1, d2])
        self.check_fanout(pc, peer, me, [d2, d1])  # the echo the other way
        for c in (d1, d2, pc):
            c.close()

    def test_devices_on_one_node_get_everything(self):
        a, b = self.nodes
        me, peer = self.user(), self.user()
        d1, _ = login2(a, me)
        d2, _ = login2(a, me)
        pc, _ = login2(b, peer)  # the peer on the other node
        self.check_fanout(pc, peer, me, [d1, d2])
        for c in (d1, d2, pc):
            c.close()

    def test_logout_of_one_device_keeps_the_other(self):
        a, b = self.nodes
        me, peer = self.user(), self.user()
        d1, ack1 = login2(a, me)
        d2, ack2 = login2(b, me)
        d3, _ = login2(b, me)
        pc, _ = login2(a, peer)
        self.assertTrue(self.online(a, me))
        self.assertEqual(d1.request({"msgid": 3, "id": me})["errno"], 0)
        d3.close()
        # still online through d2, and messages still arrive there
        self.assertTrue(self.online(a, me))
        self.assertTrue(self.online(b, me))
        r = pc.request({"msgid": 6, "toid": me, "msg": "after logout", "cid": "al"})
        self.assertEqual(d2.recv_until(is_msg(6, "after logout"))["mid"], r["mid"])
        no_such(d1, 6, "after logout")
        # per-device resume tokens: d1's died with its logout, d2's lives
        t = client2(a)
        self.assertEqual(t.request({"msgid": 1, "id": me, "token": ack1["token"]})["errno"], 1)
        t.close()
        t = client2(a)
        self.assertEqual(t.request({"msgid": 1, "id": me, "token": ack2["token"]})["errno"], 0)
        # offline only when the last device is gone
        d2.close()
        self.assertTrue(self.online(a, me))  # t is a device too
        t.close()
        wait_for(lambda: not self.online(a, me) and not self.online(b, me), 10,
                 what="offline once the last device closed")
        # a non-durable message now goes to the offline store, once
        r = pc.request({"msgid": 6, "toid": me, "msg": "stored"})
        self.assertEqual(r["errno"], 0, r)
        d4 = client2(b)
        ack = d4.login(me, "pw")
        self.assertEqual([m["msg"] for m in ack["offlinemsg"]], ["stored"])
        for c in (d1, d4, pc):
            c.close()

    def test_sync_from_independent_positions_converges(self):
        a, b = self.nodes
        me, peer = self.user(), self.user()
        pc, _ = login2(a, peer)
        gid = self.group(pc, [me])
        d1, _ = login2(a, me)
        for i in range(5):
            pc.request({"msgid": 6, "toid": me, "msg": "s%d" % i, "cid": "s%d" % i})
            pc.request({"msgid": 10, "groupid": gid, "msg": "gs%d" % i, "cid": "gs%d" % i})
        first, heads1 = sync_all(d1)  # d1 is now at the heads; d2 was never on
        d1.request({"msgid": 6, "toid": peer, "msg": "own", "cid": "own"})
        for i in range(5, 8):
            pc.request({"msgid": 6, "toid": me, "msg": "s%d" % i, "cid": "s%d" % i})
        d2, _ = login2(b, me)
        all2, heads2 = sync_all(d2)              # from nothing
        more1, heads1b = sync_all(d1, heads1)    # from where d1 was
        self.assertEqual(heads2, heads1b)
        by_conv = lambda ms: {k: [m["mid"] for m in ms if m["conv"] == k]
                              for k in {m["conv"] for m in ms}}
        self.assertEqual(by_conv(first + more1), by_conv(all2))
        self.assertIn("own", [m["msg"] for m in all2])
        for c in (d1, d2, pc):
            c.close()

    def test_read_receipts_reach_every_device(self):
        a, b = self.nodes
        me, peer = self.user(), self.user()
        d1, _ = login2(a, me)
        d2, _ = login2(a, me)
        d3, _ = login2(b, me)
        pc, _ = login2(b, peer)
        r = d1.request({"msgid": 6, "toid": peer, "msg": "read me", "cid": "rm"})
        pc.recv_until(is_msg(6, "read me"))
        self.assertEqual(pc.request({"msgid": 17, "conv": r["conv"], "read": r["cseq"]})
                         ["errno"], 0)
        for d in (d1, d2, d3):
            m = d.recv_until(lambda m: m.get("msgid") == 17)
            self.assertEqual((m["conv"], m["id"], m["read"]), (r["conv"], peer, r["cseq"]))
        for c in (d1, d2, d3, pc):
            c.close()

    def test_admin_kick_closes_every_device(self):
        a, b = self.nodes
        me = self.user()
        devs = [login2(a, me)[0], login2(a, me)[0], login2(b, me)[0]]
        st, _, body = a.admin("POST", "/users/%d/kick" % me, {"text": "all of you"})
        self.assertEqual((st, body["kicked"]), (200, True), body)
        for d in devs:
            m = d.recv_until(lambda m: m.get("msgid") == 12)
            self.assertEqual((m["errno"], m["errmsg"]), (120, "all of you"))
            self.assertTrue(d.closed(5))
            d.close()
        wait_for(lambda: not self.online(b, me), 10, what="offline after the kick")

    def test_presence_and_typing_on_every_device(self):
        a, b = self.nodes
        me, fr = self.user(), self.user()
        f1, _ = login2(a, fr)
        f2, _ = login2(a, fr)  # the friend has two devices on one node
        self.assertEqual(f1.request({"msgid": 7, "friendid": me})["errno"], 0)
        d1, _ = login2(a, me)
        for f in (f1, f2):
            m = f.recv_until(lambda m: m.get("msgid") == 19)
            self.assertEqual((m["id"], m["online"]), (me, True))
        d2, _ = login2(a, me)
        d3, _ = login2(b, me)
        # typing reaches every device of the peer
        self.assertEqual(f2.request({"msgid": 18, "toid": me})["errno"], 0)
        for d in (d1, d2, d3):
            m = d.recv_until(lambda m: m.get("msgid") == 18)
            self.assertEqual(m["id"], fr)
        # devices go: no "offline" until the last one has gone
        self.assertEqual(d1.request({"msgid": 3})["errno"], 0)
        d1.close()
        d2.close()
        for f in (f1, f2):  # (presence_offline_delay_ms is 1 s)
            self.assertRaises(TimeoutError, f.recv_until,
                              lambda m: m.get("msgid") == 19 and not m["online"], 1.5)
        d3.close()
        for f in (f1, f2):
            m = f.recv_until(lambda m: m.get("msgid") == 19 and not m["online"], timeout=10)
            self.assertEqual(m["id"], me)
        for f in (f1, f2):
            f.close()

    def test_devices_max_gives_127(self):
        a, b = self.nodes
        me = self.user()
        devs = [login2(a, me)[0], login2(b, me)[0], login2(a, me)[0]]
        for node in (a, b):
            c = client2(node)
            ack = c.login(me, "pw")
            self.assertEqual((ack["msgid"], ack["errno"], ack["errmsg"]),
                             (2, 127, "too many devices"), ack)
            c.close()
        legacy = Client(b.port)
        ack = legacy.login(me, "pw")
        self.assertEqual((ack["errno"], ack["errmsg"]), (127, "too many devices"), ack)
        legacy.close()
        # one device gone: room for one more
        devs.pop().close()
        wait_for(lambda: (lambda c: (c.close(), True)[1] if c else False)(
            self._try(b, me)), 10, what="a login once a device left")
        for c in devs:
            c.close()

    def _try(self, node, uid):
        c = client2(node)
        if c.login(uid, "pw")["errno"] == 0:
            return c
        c.close()
        return None


class NodeKilled(MultiBase):
    @classmethod
    def setUpClass(cls):
        cls.start_nodes(2)

    def test_sigkill_of_one_node_leaves_the_other_device(self):
        a, b = self.nodes
        me, peer = self.user(), self.user()
        d1, _ = login2(a, me)
        d2, _ = login2(b, me)
        pc, _ = login2(b, peer)
        a.kill()
        a.wait()
        self.assertTrue(d1.closed(10))
        d1.close()
        # a's heartbeat expires (ttl 3 s); me stays online through d2
        wait_for(lambda: self.stack.redis_cli("EXISTS", "chatd:hb:" + self.hb(a)) == "0",
                 15, what="the killed node's heartbeat to expire")
        self.assertTrue(self.online(b, me))
        pc.request({"msgid": 6, "toid": me, "msg": "after kill"})
        d2.recv_until(is_msg(6, "after kill"))
        r = pc.request({"msgid": 6, "toid": me, "msg": "after kill 2", "cid": "ak"})
        self.assertEqual(d2.recv_until(is_msg(6, "after kill 2"))["mid"], r["mid"])
        d2.close()
        wait_for(lambda: not self.online(b, me), 10, what="offline")
        pc.close()

    @staticmethod
    def hb(node):
        import re
        return re.search(r"bus: node (\S+),", node.log_text()).group(1)


if __name__ == "__main__":
    unittest.main()
