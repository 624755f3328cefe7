"""Live events (issue 8): TYPING (18), PRESENCE (19) and aggregated group
receipts (17 on a group conversation) against a real chatd, MariaDB and
Redis, on two nodes.

Typing goes live to the peer's / other members' protocol-2 sessions on any
node, never to legacy sessions or non-members, and is never stored (a later
SYNC has nothing of it).  Presence: a protocol-2 friend on another node is
told when a user comes online and when its last session goes, a non-friend
is not.  Group receipts: a member's READ reaches the other members live
with the group's aggregate ("read by all up to"), and SYNC carries it.
"""

import time
import unittest
import uuid

from harness import Client, Node, Stack, wait_for

PLUGINS = ("login", "friend", "one2one", "group", "offline", "store", "typing")
FAST = {"plugin.login": {"hash_cost": 1, "multi_login": "replace"},
        "plugin.friend": {"presence_offline_delay_ms": 50},
        "plugin.store": {"group_marks_delay_ms": 50}}


def client2(node):
    return Client(node.port, term=b"\n", proto=2)


def login2(node, uid, pw="pw"):
    c = client2(node)
    ack = c.login(uid, pw)
    assert ack["errno"] == 0, ack
    return c


def login1(node, uid, pw="pw"):
    c = Client(node.port)
    ack = c.login(uid, pw)
    assert ack["errno"] == 0, ack
    return c


def of(msgid):
    return lambda m: m.get("msgid") == msgid


class EventsTest(unittest.TestCase):
    stack = None
    nodes = ()

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        n1 = Node(cls.stack, plugins=PLUGINS, conf=FAST, node_id="e1")
        n2 = Node(cls.stack, db=n1.db, plugins=PLUGINS, conf=FAST, node_id="e2",
                  migrate=False)
        cls.nodes = (n1, n2)

    @classmethod
    def tearDownClass(cls):
        for n in cls.nodes:
            assert n.stop() == 0

    def run(self, result=None):
        res = super().run(result)
        if result is not None and not result.wasSuccessful():
            for n in self.nodes:
                print("---- %s log tail ----\n%s" % (n.log_path, n.log_tail(40)))
        return res

    def user(self, name):
        c = client2(self.nodes[0])
        uid = c.register("%s-%s" % (name, uuid.uuid4().hex[:8]), "pw")
        c.close()
        return uid

    # ---- typing ----------------------------------------------------------

    def test_typing_pair(self):
        n1, n2 = self.nodes
        a, b = self.user("ta"), self.user("tb")
        ca, cb = login2(n1, a), login2(n2, b)  # on two nodes
        r = ca.request({"msgid": 18, "toid": b})
        self.assertEqual(r["errno"], 0, r)
        self.assertEqual((r["msgid"], r["req"]), (11, 18))
        m = cb.recv_until(of(18))
        self.assertEqual((m["id"], m["toid"], m["typing"]), (a, b, True), m)
        self.assertTrue(m["name"].startswith("ta-"))
        self.assertNotIn("seq", m)
        # the same state again at once is coalesced; a change goes through
        self.assertEqual(ca.request({"msgid": 18, "toid": b})["errno"], 0)
        self.assertEqual(ca.request({"msgid": 18, "toid": b, "typing": False})["errno"], 0)
        m = cb.recv_until(of(18))
        self.assertEqual((m["id"], m["typing"]), (a, False), m)
        cb.expect_nothing(0.3)
        ca.expect_nothing(0.1)  # never back to the sender
        # never stored: a later SYNC of b has no typing
        r = cb.request({"msgid": 15})
        self.assertEqual(r["errno"], 0, r)
        self.assertFalse([x for x in r["msgs"] if x.get("msgid") == 18], r)
        ca.close()
        cb.close()

    def test_typing_not_to_legacy_or_offline(self):
        n1, n2 = self.nodes
        a, b, c = self.user("la"), self.user("lb"), self.user("lc")
        ca = login2(n1, a)
        lb = login1(n2, b)  # legacy peer: nothing
        self.assertEqual(ca.request({"msgid": 18, "toid": b})["errno"], 0)
        lb.expect_nothing(0.5)
        lb.close()
        # c offline: answered, dropped; c logging in later gets nothing of it
        self.assertEqual(ca.request({"msgid": 18, "toid": c})["errno"], 0)
        cc = login2(n2, c)
        cc.expect_nothing(0.3)
        r = cc.request({"msgid": 15})
        self.assertFalse([x for x in r["msgs"] if x.get("msgid") == 18], r)
        # a legacy sender's 18 is ignored (no reply, nothing forwarded)
        la = login1(n1, self.user("ld"))
        la.send({"msgid": 18, "toid": c})
        la.expect_nothing(0.3)
        cc.expect_nothing(0.1)
        for x in (ca, cc, la):
            x.close()

    def test_typing_group(self):
        n1, n2 = self.nodes
        a, b, c, d = (self.user(x) for x in ("ga", "gb", "gc", "gd"))
        ca, cb, cc, cd = login2(n1, a), login2(n2, b), login2(n1, c), login2(n2, d)
        g = ca.request({"msgid": 8, "groupname": "t-%s" % uuid.uuid4().hex[:8]})["groupid"]
        self.assertEqual(ca.request({"msgid": 9, "groupid": g, "userid": b})["errno"], 0)
        self.assertEqual(ca.request({"msgid": 9, "groupid": g, "userid": c})["errno"], 0)
        r = cb.request({"msgid": 18, "groupid": g})
        self.assertEqual(r["errno"], 0, r)
        for x in (ca, cc):
            m = x.recv_until(of(18))
            self.assertEqual((m["id"], m["groupid"], m["typing"]), (b, g, True), m)
            self.assertNotIn("toid", m)
        cd.expect_nothing(0.3)  # not a member
        cb.expect_nothing(0.1)  # not to the sender
        # a non-member may not
        self.assertEqual(cd.request({"msgid": 18, "groupid": g})["errno"], 109)
        # a member who joined after the member list was cached is let in
        self.assertEqual(ca.request({"msgid": 9, "groupid": g, "userid": d})["errno"], 0)
        time.sleep(1.1)  # past the 1 s re-check of a non-member
        self.assertEqual(cd.request({"msgid": 18, "groupid": g})["errno"], 0)
        m = cb.recv_until(of(18))
        self.assertEqual((m["id"], m["groupid"]), (d, g))
        for x in (ca, cb, cc, cd):
            x.close()

    def test_typing_errors(self):
        n1, _ = self.nodes
        a = self.user("ea")
        ca = login2(n1, a)
        for bad in ({}, {"toid": 0}, {"toid": "x"}, {"groupid": -1},
                    {"toid": a, "groupid": 1}, {"toid": a, "typing": 1},
                    {"toid": a, "typing": "no"}):
            r = ca.request(dict(bad, msgid=18))
            self.assertEqual(r["errno"], 104, (bad, r))
        self.assertEqual(ca.request({"msgid": 18, "toid": 2000000000})["errno"], 108)
        self.assertEqual(ca.request({"msgid": 18, "groupid": 2000000000})["errno"], 108)
        self.assertEqual(ca.request({"msgid": 18, "id": a + 1, "toid": a})["errno"], 107)
        c = client2(n1)
        self.assertEqual(c.request({"msgid": 18, "toid": a})["errno"], 106)
        c.close()
        ca.close()

    def test_typing_rate_limit_class(self):
        conf = dict(FAST, limits={"class.typing": "18 2/m burst 2"})
        node = Node(self.stack, db=self.nodes[0].db, plugins=PLUGINS, conf=conf,
                    migrate=False)
        try:
            a, b = self.user("ka"), self.user("kb")
            ca = login2(node, a)
            for _ in range(2):
                self.assertEqual(ca.request({"msgid": 18, "toid": b})["errno"], 0)
            r = ca.request({"msgid": 18, "toid": b})
            self.assertEqual(r["errno"], 125, r)
            self.assertIn("retry_after_ms", r)
            # other msgids are not in the class
            self.assertEqual(ca.request({"msgid": 13})["errno"], 0)
            ca.close()
        finally:
            self.assertEqual(node.stop(), 0)

    # ---- presence ----------------------------------------------------------

    def test_presence_online_offline(self):
        n1, n2 = self.nodes
        a, b, c, d = (self.user(x) for x in ("pa", "pb", "pc", "pd"))
        ca = login2(n1, a)
        # a and d see b's presence (policy open: they added b); c does not
        self.assertEqual(ca.request({"msgid": 7, "friendid": b})["errno"], 0)
        cd = login2(n1, d)
        self.assertEqual(cd.request({"msgid": 7, "friendid": b})["errno"], 0)
        cd.close()
        ld = login1(n2, d)  # d now legacy: never gets 19
        cc = login2(n1, c)
        cb = login2(n2, b)  # b comes online on the other node
        m = ca.recv_until(of(19))
        self.assertEqual((m["id"], m["online"]), (b, True), m)
        self.assertTrue(m["name"].startswith("pb-"))
        cc.expect_nothing(0.3)
        ld.expect_nothing(0.1)
        # logout: offline
        self.assertEqual(cb.request({"msgid": 3})["errno"], 0)
        m = ca.recv_until(of(19))
        self.assertEqual((m["id"], m["online"]), (b, False), m)
        cb.close()
        # close: online again, then offline
        cb = login2(n2, b)
        self.assertTrue(ca.recv_until(of(19))["online"])
        cb.close()
        m = ca.recv_until(of(19))
        self.assertEqual((m["id"], m["online"]), (b, False), m)
        cc.expect_nothing(0.2)
        ld.expect_nothing(0.1)
        for x in (ca, cc, ld):
            x.close()

    def test_presence_friend_added_while_online(self):
        # b is online on n2 before a adds b: a still hears b go offline
        n1, n2 = self.nodes
        a, b = self.user("wa"), self.user("wb")
        cb = login2(n2, b)
        ca = login2(n1, a)
        self.assertEqual(ca.request({"msgid": 7, "friendid": b})["errno"], 0)
        # ADD_FRIEND broadcasts "W b" so that n2 reads b's watchers again.
        # A TYPING from a to b rides the same Redis channel after it, so
        # once b has it n2 has taken the W (a read still in flight at the
        # logout announces offline to the new list)
        self.assertEqual(ca.request({"msgid": 18, "toid": b})["errno"], 0)
        cb.recv_until(of(18))
        self.assertEqual(cb.request({"msgid": 3})["errno"], 0)
        m = ca.recv_until(of(19))
        self.assertEqual((m["id"], m["online"]), (b, False), m)
        cb.close()
        ca.close()

    def test_presence_replaced_is_not_offline(self):
        n1, n2 = self.nodes
        a, b = self.user("ra"), self.user("rb")
        ca = login2(n1, a)
        self.assertEqual(ca.request({"msgid": 7, "friendid": b})["errno"], 0)
        cb1 = login2(n1, b)
        self.assertTrue(ca.recv_until(of(19))["online"])
        cb2 = login2(n2, b)  # takes over (multi_login = replace)
        self.assertTrue(cb1.closed(10))
        cb1.close()
        m = ca.recv_until(of(19))
        self.assertEqual((m["id"], m["online"]), (b, True), m)
        ca.expect_nothing(0.5)  # the replaced session's close says nothing
        cb2.close()
        self.assertFalse(ca.recv_until(of(19))["online"])
        ca.close()

    def test_presence_node_shutdown(self):
        st = self.stack
        n3 = Node(st, db=self.nodes[0].db, plugins=PLUGINS, conf=FAST, node_id="e3",
                  migrate=False)
        try:
            a, b = self.user("sa"), self.user("sb")
            ca = login2(self.nodes[0], a)
            self.assertEqual(ca.request({"msgid": 7, "friendid": b})["errno"], 0)
            cb = login2(n3, b)
            self.assertTrue(ca.recv_until(of(19))["online"])
            self.assertEqual(n3.stop(), 0)
            m = ca.recv_until(of(19), timeout=10)
            self.assertEqual((m["id"], m["online"]), (b, False), m)
            cb.close()
            ca.close()
        finally:
            if n3.running():
                n3.stop()

    # ---- group receipts ----------------------------------------------------

    def test_group_receipts_live_and_sync(self):
        n1, n2 = self.nodes
        a, b, c, d = (self.user(x) for x in ("ra", "rb", "rc", "rd"))
        ca, cb, cc, cd = login2(n1, a), login2(n2, b), login2(n1, c), login2(n2, d)
        g = ca.request({"msgid": 8, "groupname": "r-%s" % uuid.uuid4().hex[:8]})["groupid"]
        for u in (b, c):
            self.assertEqual(ca.request({"msgid": 9, "groupid": g, "userid": u})["errno"], 0)
        conv = "g%d" % g
        for i in range(4):
            r = ca.request({"msgid": 10, "groupid": g, "msg": "m%d" % i, "cid": "m%d" % i})
            self.assertEqual(r["errno"], 0, r)
        # b and c read at once: one coalesced 17 per member with both marks
        self.assertEqual(cb.request({"msgid": 17, "conv": conv, "read": 3})["errno"], 0)
        self.assertEqual(cc.request({"msgid": 17, "conv": conv, "read": 2})["errno"], 0)

        def marks_seen(client, want):
            """The marks seen until every user of want has some, and the
            message with c's: its window (node 1's) read every member's
            marks after both READs were stored, so its aggregate is final
            (node 2's window, with b's, may have read them before c's)."""
            got, with_c = {}, None
            while set(got) != want:
                m = client.recv_until(lambda m: m.get("msgid") == 17 and m.get("conv") == conv)
                for x in m["marks"]:
                    got[x["id"]] = (x["delivered"], x["read"])
                    if x["id"] == c:
                        with_c = m
            return got, with_c

        got, m = marks_seen(ca, {b, c})
        self.assertEqual(got, {b: (3, 3), c: (2, 2)})
        # a (the sender) sees: the others' lowest is c's 2
        self.assertEqual((m["all_delivered"], m["all_read"]), (2, 2), m)
        # b's own other devices learn b's marks too; b's "all" leaves b out
        # (a has no mark: 0)
        got, m = marks_seen(cb, {b, c})
        self.assertEqual((m["all_read"]), 0, m)
        cd.expect_nothing(0.3)  # not a member
        # a reads everything: c is now the lowest for b, and b for c
        self.assertEqual(ca.request({"msgid": 17, "conv": conv, "read": 4})["errno"], 0)
        def a_read(m):  # (earlier windows of the other node may come first)
            return m.get("msgid") == 17 and m.get("conv") == conv and \
                {"id": a, "delivered": 4, "read": 4} in m["marks"]
        m = cb.recv_until(a_read)
        self.assertEqual((m["marks"], m["all_read"]),
                         ([{"id": a, "delivered": 4, "read": 4}], 2), m)
        m = cc.recv_until(a_read)
        self.assertEqual(m["all_read"], 3, m)
        # SYNC carries the aggregate (and the member's own marks)
        for cl, own, agg in ((ca, 4, 2), (cb, 3, 2), (cc, 2, 3)):
            r = cl.request({"msgid": 15, "convs": [{"conv": conv, "cseq": 4}]})
            e = [x for x in r["convs"] if x["conv"] == conv][0]
            self.assertEqual((e["read"], e["all_read"], e["all_delivered"]),
                             (own, agg, agg), e)
            self.assertNotIn("peer_read", e)
        # a legacy member gets nothing live
        lc = login1(n1, c)  # replaces c's protocol-2 session
        self.assertTrue(cc.closed(10))
        self.assertEqual(cb.request({"msgid": 17, "conv": conv, "read": 4})["errno"], 0)
        cb.recv_until(lambda m: m.get("msgid") == 17 and m.get("conv") == conv)
        lc.expect_nothing(0.5)
        for x in (ca, cb, cc, cd, lc):
            x.close()


if __name__ == "__main__":
    unittest.main()
