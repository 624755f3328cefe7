"""Durable by default: every protocol-2 chat message is stored, cid or not.

Under `durable = all` (the default of [plugin.one2one] and [plugin.group])
a protocol-2 ONE_CHAT (6) or GROUP_CHAT (10) without a "cid" takes the same
path as one with a cid: stored by the group-committed writer, its ACK after
COMMIT with "mid", "conv", "cseq", delivered live with them, in SYNC and
HISTORY, and an offline protocol-2 recipient gets it by SYNC, not in
offlinemsg.  It has no idempotency key: a resend without cid is stored
again (documented).  These tests check that, that `durable = cid` brings
back the non-durable path for messages without cid, that a legacy sender's
message is forwarded byte for byte and stored nowhere new, that user ids
of 2^31 and above fall back to the non-durable path without a cid (and are
refused with one, as before), that a node without the store plugin (no
SYNC) keeps messages without cid non-durable, and that the writer's dedup
query keeps its plan with NULL cids in the table.
"""

import json
import time
import unittest
import uuid

from harness import Client, Node, Stack, wait_for
from test_durable import OneNodeCase, client2, login2, sync_all

PLUGINS = ("login", "friend", "one2one", "group", "offline", "store")
FAST = {"plugin.login": {"hash_cost": 1}}


class Base(OneNodeCase):
    CONF = {}
    PLUGINS = PLUGINS

    @classmethod
    def setUpClass(cls):
        conf = dict(FAST)
        conf.update(cls.CONF)
        cls.stack = Stack()
        cls.node = Node(cls.stack, plugins=cls.PLUGINS, conf=conf)

    def send_plain(self, ca, cb, b, g):
        """A pair message to b (received by cb) and a group message to g,
        both without cid: acknowledged and delivered without numbers."""
        r = ca.request({"msgid": 6, "toid": b, "msg": "plain"})
        self.assertEqual(r["errno"], 0)
        self.assertNotIn("mid", r)
        self.assertNotIn("mid", cb.recv_until(lambda m: m.get("msgid") == 6))
        r = ca.request({"msgid": 10, "groupid": g, "msg": "gplain"})
        self.assertEqual(r["errno"], 0)
        self.assertNotIn("mid", r)

    def sql(self, q):
        return self.stack.sql(self.node.db, q)

    def count(self, q):
        return int(self.sql(q)[0][0])

    def group(self, owner, *members):
        g = owner.request({"msgid": 8, "groupname": "g-%s" % uuid.uuid4().hex[:8]})["groupid"]
        for u in members:
            self.assertEqual(owner.request({"msgid": 9, "groupid": g, "userid": u})["errno"], 0)
        return g


def raw_line(c, needle, timeout=5):
    """The next line c receives that holds needle, as bytes."""
    assert not c.queue, c.queue
    deadline = time.monotonic() + timeout
    while True:
        i = c.buf.find(b"\n")
        if i >= 0:
            line = bytes(c.buf[:i])
            del c.buf[:i + 1]
            if needle in line:
                return line
            continue
        left = deadline - time.monotonic()
        assert left > 0, "no line with %r" % needle
        c._fill(left)


def conv_of(a, b):
    return "p%d:%d" % (min(a, b), max(a, b))


class DefaultAll(Base):
    """No durable key: the default, all."""

    CONF = {"plugin.login": {"hash_cost": 1, "multi_login": "multi"}}

    def test_pair_without_cid_is_numbered(self):
        a, b = self.user("a"), self.user("b")
        ca, cb = login2(self.node, a), login2(self.node, b)
        acks = [ca.request({"msgid": 6, "toid": b, "msg": "n%d" % i}) for i in range(3)]
        for i, r in enumerate(acks):
            self.assertEqual((r["errno"], r["conv"], r["cseq"]), (0, conv_of(a, b), i + 1), r)
            self.assertNotIn("dup", r)
        got = [cb.recv_until(lambda m: m.get("msgid") == 6) for _ in range(3)]
        self.assertEqual([(m["msg"], m["mid"], m["conv"], m["cseq"]) for m in got],
                         [("n%d" % i, r["mid"], r["conv"], r["cseq"]) for i, r in enumerate(acks)])
        self.assertNotIn("cid", got[0])
        self.assertEqual(self.count("SELECT COUNT(*) FROM messages WHERE sender_id=%d AND "
                                    "cid IS NULL" % a), 3)
        # in HISTORY and in SYNC, as delivered
        h = cb.request({"msgid": 16, "conv": conv_of(a, b)})
        self.assertEqual([m["msg"] for m in h["msgs"]], ["n0", "n1", "n2"])
        msgs, heads, _ = sync_all(cb)
        self.assertEqual([(m["msg"], m["mid"]) for m in msgs],
                         [("n%d" % i, r["mid"]) for i, r in enumerate(acks)])
        self.assertEqual(heads[conv_of(a, b)], 3)
        # nothing went to the offline store
        self.assertEqual(self.count("SELECT COUNT(*) FROM offline_messages WHERE "
                                    "user_id=%d" % b), 0)
        ca.close()
        cb.close()

    def test_resend_without_cid_is_stored_twice(self):
        a, b = self.user("a"), self.user("b")
        ca, cb = login2(self.node, a), login2(self.node, b)
        r1 = ca.request({"msgid": 6, "toid": b, "msg": "again"})
        r2 = ca.request({"msgid": 6, "toid": b, "msg": "again"})
        self.assertEqual((r1["errno"], r2["errno"]), (0, 0))
        self.assertNotEqual(r1["mid"], r2["mid"])
        self.assertEqual((r1["cseq"], r2["cseq"]), (1, 2))
        self.assertNotIn("dup", r2)
        got = [cb.recv_until(lambda m: m.get("msgid") == 6) for _ in range(2)]
        self.assertEqual([m["mid"] for m in got], [r1["mid"], r2["mid"]])
        self.assertEqual(self.count("SELECT COUNT(*) FROM messages WHERE sender_id=%d" % a), 2)
        # with a cid the resend is still a dup
        r3 = ca.request({"msgid": 6, "toid": b, "msg": "once", "cid": "k"})
        r4 = ca.request({"msgid": 6, "toid": b, "msg": "once", "cid": "k"})
        self.assertEqual((r4["mid"], r4.get("dup")), (r3["mid"], True))
        ca.close()
        cb.close()

    def test_offline_protocol2_recipient_syncs(self):
        a, b, c = self.user("a"), self.user("b"), self.user("c")
        ca = login2(self.node, a)
        g = self.group(ca, b)
        sent = [ca.request({"msgid": 6, "toid": b, "msg": "off%d" % i}) for i in range(3)]
        gr = ca.request({"msgid": 10, "groupid": g, "msg": "goff"})
        for r in sent + [gr]:
            self.assertEqual(r["errno"], 0, r)
            self.assertIn("mid", r)
        self.assertEqual(gr["conv"], "g%d" % g)
        # the offline store keeps a copy for a legacy login ...
        wait_for(lambda: self.count("SELECT COUNT(*) FROM offline_messages WHERE "
                                    "user_id=%d" % b) == 4)
        # ... which a protocol-2 login leaves out: SYNC has them, once
        cb = client2(self.node)
        ack = cb.login(b, "pw")
        self.assertEqual(ack["errno"], 0)
        self.assertEqual(ack.get("offlinemsg", []), [])
        msgs, _, _ = sync_all(cb)
        self.assertEqual(sorted((m["conv"], m["cseq"], m["msg"]) for m in msgs),
                         sorted([(r["conv"], r["cseq"], "off%d" % i) for i, r in enumerate(sent)]
                                + [(gr["conv"], gr["cseq"], "goff")]))
        cb.expect_nothing(0.3)
        wait_for(lambda: self.count("SELECT COUNT(*) FROM offline_messages WHERE "
                                    "user_id=%d" % b) == 0)
        # a legacy recipient that was offline gets it in offlinemsg, numbered
        ca.request({"msgid": 6, "toid": c, "msg": "to-legacy"})
        wait_for(lambda: self.count("SELECT COUNT(*) FROM offline_messages WHERE "
                                    "user_id=%d" % c) == 1)
        lc = Client(self.node.port)
        ack = lc.login(c, "pw")
        d = json.loads(ack["offlinemsg"][0])
        self.assertEqual((d["msg"], d["conv"], d["cseq"]), ("to-legacy", conv_of(a, c), 1))
        for x in (ca, cb, lc):
            x.close()

    def test_group_without_cid_and_devices(self):
        a, b, c = self.user("a"), self.user("b"), self.user("c")
        ca, ca2, cb = login2(self.node, a), login2(self.node, a), login2(self.node, b)
        lc = Client(self.node.port)  # a legacy member
        lc.login(c, "pw")
        g = self.group(ca, b, c)
        r = ca.request({"msgid": 10, "groupid": g, "msg": "hello"})
        self.assertEqual((r["errno"], r["conv"], r["cseq"]), (0, "g%d" % g, 1), r)
        for x in (cb, ca2, lc):  # the member, the sender's other device, legacy
            m = x.recv_until(lambda m: m.get("msgid") == 10)
            self.assertEqual((m["msg"], m["mid"], m["cseq"]), ("hello", r["mid"], 1))
        ca.expect_nothing(0.3)  # the sending device has its ACK only
        # one2one: the sender's other device gets its copy, numbered
        r = ca.request({"msgid": 6, "toid": b, "msg": "pair"})
        for x in (cb, ca2):
            m = x.recv_until(lambda m: m.get("msgid") == 6)
            self.assertEqual((m["msg"], m["mid"]), ("pair", r["mid"]))
        # a non-member: 109 as before
        self.assertEqual(self.count("SELECT COUNT(*) FROM messages WHERE conv_id=%d" % -g), 1)
        d = self.user("d")
        cd = login2(self.node, d)
        self.assertEqual(cd.request({"msgid": 10, "groupid": g, "msg": "x"})["errno"], 109)
        for x in (ca, ca2, cb, lc, cd):
            x.close()

    def test_legacy_sender_unchanged(self):
        a, b = self.user("a"), self.user("b")
        la = Client(self.node.port)
        la.login(a, "pw")
        cb = login2(self.node, b)
        name = self.sql("SELECT name FROM users WHERE id=%d" % a)[0][0]
        frame = '{"msgid":6,"id":%d,"name":"%s","toid":%d,"msg":"seed","time":"t"}' % (a, name, b)
        la.send_raw(frame.encode() + b"\0")
        self.assertEqual(raw_line(cb, b'"msg":"seed"'), frame.encode())  # as sent
        la.expect_nothing(0.3)  # the seed answers nothing
        self.assertEqual(self.count("SELECT COUNT(*) FROM messages WHERE sender_id=%d" % a), 0)
        la.close()
        cb.close()

    def test_dedup_plan_with_null_cids(self):
        a, b = self.user("a"), self.user("b")
        ca = login2(self.node, a)
        for i in range(20):
            ca.request({"msgid": 6, "toid": b, "msg": "p%d" % i})
        ca.request({"msgid": 6, "toid": b, "msg": "k", "cid": "plan"})
        self.sql("ANALYZE TABLE messages")
        rows = self.sql("EXPLAIN SELECT sender_id, cid, id, conv_id, cseq FROM messages "
                        "WHERE sender_id IN (%d, %d) AND cid IN ('plan', NULL)" % (a, b))
        self.assertEqual(len(rows), 1, rows)
        self.assertEqual(rows[0][5], "uq_messages_cid", rows)  # the key used
        ca.close()


class CidOnly(Base):
    """durable = cid: without a cid, the non-durable path as before."""

    CONF = {"plugin.one2one": {"durable": "cid"}, "plugin.group": {"durable": "cid"}}

    def test_without_cid_not_stored(self):
        a, b, c = self.user("a"), self.user("b"), self.user("c")
        ca, cb = login2(self.node, a), login2(self.node, b)
        g = self.group(ca, b)
        self.send_plain(ca, cb, b, g)
        self.assertNotIn("mid", cb.recv_until(lambda m: m.get("msgid") == 10))
        self.assertEqual(self.count("SELECT COUNT(*) FROM messages WHERE sender_id=%d" % a), 0)
        # with a cid: durable
        r = ca.request({"msgid": 6, "toid": b, "msg": "kept", "cid": "c1"})
        self.assertEqual((r["errno"], r["cseq"]), (0, 1))
        # an offline protocol-2 recipient: offlinemsg, as before
        ca.request({"msgid": 6, "toid": c, "msg": "later"})
        wait_for(lambda: self.count("SELECT COUNT(*) FROM offline_messages WHERE "
                                    "user_id=%d" % c) == 1)
        cc = client2(self.node)
        ack = cc.login(c, "pw")
        self.assertEqual([m["msg"] for m in ack["offlinemsg"]], ["later"])
        self.assertNotIn("mid", ack["offlinemsg"][0])
        msgs, _, _ = sync_all(cc)
        self.assertEqual(msgs, [])
        for x in (ca, cb, cc):
            x.close()

    def test_reload_switches_mode(self):
        a, b = self.user("a"), self.user("b")
        ca, cb = login2(self.node, a), login2(self.node, b)
        mark = self.node.log_mark()
        self.node.write_conf({"plugin.one2one": {"durable": "bogus"}})
        self.node.sighup()
        self.node.wait_log("durable = bogus: expected all or cid", since=mark)
        r = ca.request({"msgid": 6, "toid": b, "msg": "still"})  # kept: cid
        self.assertNotIn("mid", r)
        try:
            mark = self.node.log_mark()
            self.node.write_conf({"plugin.one2one": {"durable": "all"}})
            self.node.sighup()
            wait_for(lambda: "mid" in ca.request({"msgid": 6, "toid": b, "msg": "now"}),
                     timeout=10, what="durable = all after SIGHUP")
        finally:
            self.node.write_conf({"plugin.one2one": {"durable": "cid"}})
            self.node.sighup()
        for x in (ca, cb):
            x.close()


class NoStore(Base):
    """durable = all on a node without the store plugin: nothing answers
    SYNC, so an offline protocol-2 device could not fetch a durable
    message; one without cid stays non-durable (offlinemsg), and the node
    says why once."""

    PLUGINS = ("login", "friend", "one2one", "group", "offline")

    def test_without_cid_stays_non_durable(self):
        a, b, c = self.user("a"), self.user("b"), self.user("c")
        ca, cb = login2(self.node, a), login2(self.node, b)
        g = self.group(ca, b)
        mark = self.node.log_mark()
        self.send_plain(ca, cb, b, g)
        self.node.wait_log("durable = all, but no plugin answers SYNC", since=mark)
        ca.request({"msgid": 6, "toid": c, "msg": "later"})
        wait_for(lambda: self.count("SELECT COUNT(*) FROM offline_messages WHERE "
                                    "user_id=%d" % c) == 1)
        cc = client2(self.node)
        ack = cc.login(c, "pw")
        self.assertEqual([m["msg"] for m in ack["offlinemsg"]], ["later"])
        self.assertEqual(self.count("SELECT COUNT(*) FROM messages"), 0)
        # with a cid: durable as before (the client asked for it)
        r = ca.request({"msgid": 6, "toid": b, "msg": "kept", "cid": "k"})
        self.assertEqual((r["errno"], r["cseq"]), (0, 1))
        for x in (ca, cb, cc):
            x.close()


class Quota(Base):
    """The offline quotas bound the copies of durable messages too.

    A durable message's sender has its ACK once the message store has it,
    so nobody is refused; but the copy kept in the offline store for a
    legacy device is refused past stored_max / stored_per_sender_max, or a
    protocol-2 sender could fill an offline user's mailbox without bound.
    A protocol-2 device still gets every message by SYNC.  Fails with the
    quota off (STORED_MAX = 0: every copy is stored)."""

    STORED_MAX = 3
    CONF = {"plugin.offline": {"stored_max": STORED_MAX}}

    def test_copies_bounded_sync_whole(self):
        a, b = self.user("a"), self.user("b")
        ca = login2(self.node, a)
        sent = [ca.request({"msgid": 6, "toid": b, "msg": "q%d" % i}) for i in range(6)]
        for r in sent:
            self.assertEqual(r["errno"], 0, r)  # stored: acknowledged
            self.assertIn("mid", r)
        stored = "SELECT COUNT(*) FROM offline_messages WHERE user_id=%d" % b
        wait_for(lambda: self.count(stored) >= 3)
        # the store writes in batches: wait for the last copy's outcome
        ca.request({"msgid": 6, "toid": b, "msg": "last", "cid": uuid.uuid4().hex})
        time.sleep(0.5)
        self.assertEqual(self.count(stored), self.STORED_MAX)
        lc = Client(self.node.port)  # a legacy device: the first three
        ack = lc.login(b, "pw")
        self.assertEqual([json.loads(m)["msg"] for m in ack["offlinemsg"]],
                         ["q0", "q1", "q2"])
        lc.close()
        cb = client2(self.node)  # a protocol-2 device: all of them
        self.assertEqual(cb.login(b, "pw")["errno"], 0)
        msgs, _, _ = sync_all(cb)
        self.assertEqual([m["msg"] for m in msgs], ["q%d" % i for i in range(6)] + ["last"])
        for x in (ca, cb):
            x.close()


class LargeIds(Base):
    """User ids past 2^31: a pair conversation cannot hold them."""

    def test_fallback_without_cid(self):
        small = self.user("s")
        self.sql("ALTER TABLE users AUTO_INCREMENT = %d" % ((1 << 31) + 5))
        big = self.user("big")
        self.assertGreaterEqual(big, 1 << 31)
        cs, cb = login2(self.node, small), login2(self.node, big)
        for frm, to, rcv in ((cs, big, cb), (cb, small, cs)):
            r = frm.request({"msgid": 6, "toid": to, "msg": "big"})
            self.assertEqual(r["errno"], 0, r)
            self.assertNotIn("mid", r)
            self.assertNotIn("mid", rcv.recv_until(lambda m: m.get("msgid") == 6))
            r = frm.request({"msgid": 6, "toid": to, "msg": "big", "cid": "c"})
            self.assertEqual((r["errno"], r["errmsg"]),
                             (104, "durable messages need user ids below 2^31"))
        # groups hold no user id in their conversation: durable
        g = self.group(cb, small)
        r = cb.request({"msgid": 10, "groupid": g, "msg": "gbig"})
        self.assertEqual((r["errno"], r["conv"]), (0, "g%d" % g), r)
        for x in (cs, cb):
            x.close()


if __name__ == "__main__":
    unittest.main()
