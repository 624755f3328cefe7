"""Durable messages (issue 8) against a real chatd, MariaDB and Redis.

A protocol-2 chat message (with a client message id "cid" here; without
one see test_durable_default.py) is stored before it is acknowledged: the
ACK carries its id ("mid"), its conversation ("conv") and its number there
("cseq"); the recipient gets it with the
same three members.  These tests check: numbers in order and ids unique;
an ACK only after COMMIT (MariaDB stopped: 113, and every message ever
acknowledged is in the table); a retry with the same cid is answered with
the original numbers and delivered once; SYNC after being offline, paged,
without gaps or duplicates; HISTORY paging and who may read it (group
members from when they joined); receipts; retention by count and by
age; legacy offline messages
unchanged; one conversation written from two nodes in turn; and faults
while the receiver is offline for the whole run - MariaDB restarted
mid-traffic, Redis restarted mid-traffic, the one2one and group plugins hot-reloaded mid-traffic, a node
killed with SIGKILL mid-traffic: a sender that resends unacknowledged
messages with their cid and a receiver that syncs end with every message
exactly once, in order per conversation.
"""

import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import unittest
import uuid

from harness import PLUGIN_DIR, Client, Node, Stack, wait_for

PLUGINS = ("login", "friend", "one2one", "group", "offline", "store")
FAST = {"plugin.login": {"hash_cost": 1}}


def client2(node):
    return Client(node.port, term=b"\n", proto=2)


def login2(node, uid, pw="pw", timeout=15):
    """A protocol-2 client logged in as uid (retries errno 2 while a killed
    node's presence lingers)."""
    deadline = time.monotonic() + timeout
    while True:
        c = client2(node)
        ack = c.login(uid, pw)
        if ack["errno"] == 0:
            return c
        c.close()
        if time.monotonic() > deadline:
            raise AssertionError("login %d: %r" % (uid, ack))
        time.sleep(0.2)


def sync_all(c, positions=None, limit=None, max_pages=1000):
    """SYNC until "more" is false; returns (messages in order, heads, pages)."""
    pos = dict(positions or {})
    msgs, pages = [], 0
    while True:
        req = {"msgid": 15, "convs": [{"conv": k, "cseq": v} for k, v in pos.items()]}
        if limit:
            req["limit"] = limit
        r = c.request(req, timeout=20)
        assert r["errno"] == 0, r
        pages += 1
        for m in r["msgs"]:
            assert m["cseq"] > pos.get(m["conv"], 0), (m, pos)
            pos[m["conv"]] = m["cseq"]
            msgs.append(m)
        heads = {h["conv"]: h["head"] for h in r["convs"]}
        if not r["more"]:
            return msgs, heads, pages
        assert pages < max_pages


def per_conv(msgs):
    out = {}
    for m in msgs:
        out.setdefault(m["conv"], []).append(m["cseq"])
    return out


class OneNodeCase(unittest.TestCase):
    """One node for the class (set up by the subclass): its stop, its log
    tail on a failure, and users registered through it."""
    stack = None
    node = None

    @classmethod
    def tearDownClass(cls):
        if cls.node:
            assert cls.node.stop() == 0

    def run(self, result=None):
        res = super().run(result)
        if result is not None and not result.wasSuccessful() and self.node:
            print("---- chatd log tail ----\n" + self.node.log_tail(60))
        return res

    def user(self, name):
        c = client2(self.node)
        uid = c.register("%s-%s" % (name, uuid.uuid4().hex[:8]), "pw")
        c.close()
        return uid


class DurableCase(OneNodeCase):
    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.node = Node(cls.stack, plugins=PLUGINS, conf=FAST)
        cls.users = {}

    def test_ids_and_cseq_in_order(self):
        a, b = self.user("a"), self.user("b")
        ca, cb = login2(self.node, a), login2(self.node, b)
        acks = [ca.request({"msgid": 6, "toid": b, "msg": "m%d" % i, "cid": "o%d" % i})
                for i in range(20)]
        conv = "p%d:%d" % (min(a, b), max(a, b))
        for i, r in enumerate(acks):
            self.assertEqual((r["errno"], r["conv"], r["cseq"]), (0, conv, i + 1), r)
            self.assertNotIn("dup", r)
        self.assertEqual(len({r["mid"] for r in acks}), 20)
        got = [cb.recv() for _ in range(20)]
        self.assertEqual([m["msg"] for m in got], ["m%d" % i for i in range(20)])
        self.assertEqual([(m["mid"], m["cseq"], m["conv"]) for m in got],
                         [(r["mid"], r["cseq"], r["conv"]) for r in acks])
        self.assertEqual(got[0]["id"], a)
        # the other direction continues the same conversation
        r = cb.request({"msgid": 6, "toid": a, "msg": "back", "cid": "x"})
        self.assertEqual((r["conv"], r["cseq"]), (conv, 21))
        m = ca.recv()
        self.assertEqual((m["msg"], m["cseq"]), ("back", 21))
        # no cid: durable too (durable = all, the default), numbered next
        # (test_durable_default has the rest of it)
        r = ca.request({"msgid": 6, "toid": b, "msg": "plain"})
        self.assertEqual((r["errno"], r["conv"], r["cseq"]), (0, conv, 22))
        m = cb.recv()
        self.assertEqual((m["msg"], m["mid"], m["cseq"]), ("plain", r["mid"], 22))
        # to oneself: conversation "pA:A", which SYNC names and takes back
        r = ca.request({"msgid": 6, "toid": a, "msg": "note", "cid": "self"})
        self.assertEqual((r["conv"], r["cseq"]), ("p%d:%d" % (a, a), 1))
        ca.recv()
        msgs, heads, _ = sync_all(ca, positions={r["conv"]: 0})
        self.assertEqual(heads[r["conv"]], 1)
        # a bad cid
        for bad in ("", 5, "x" * 65):
            r = ca.request({"msgid": 6, "toid": b, "msg": "m", "cid": bad})
            self.assertEqual(r["errno"], 104, r)
        ca.close()
        cb.close()

    def test_idempotent_retry(self):
        a, b = self.user("a"), self.user("b")
        ca, cb = login2(self.node, a), login2(self.node, b)
        first = ca.request({"msgid": 6, "toid": b, "msg": "once", "cid": "same"})
        again = ca.request({"msgid": 6, "toid": b, "msg": "once", "cid": "same"})
        self.assertEqual(first["errno"], 0)
        self.assertEqual((again["mid"], again["cseq"], again.get("dup")),
                         (first["mid"], first["cseq"], True))
        # two sends of one cid back to back: the second joins the first
        ca.send({"msgid": 6, "toid": b, "msg": "twice", "cid": "pair", "seq": 9001})
        ca.send({"msgid": 6, "toid": b, "msg": "twice", "cid": "pair", "seq": 9002})
        r1 = ca.recv_until(lambda m: m.get("seq") == 9001)
        r2 = ca.recv_until(lambda m: m.get("seq") == 9002)
        self.assertEqual((r1["mid"], r1["cseq"]), (r2["mid"], r2["cseq"]))
        self.assertTrue(r2.get("dup"))
        self.assertEqual(r1["cseq"], 2)
        got = [cb.recv(), cb.recv()]
        self.assertEqual([m["msg"] for m in got], ["once", "twice"])
        cb.expect_nothing(0.5)
        rows = self.stack.sql(self.node.db, "SELECT COUNT(*) FROM messages WHERE "
                              "sender_id = %d" % a)
        self.assertEqual(rows, [("2",)])
        # a cid is the sender's: another sender may use the same one
        r = cb.request({"msgid": 6, "toid": a, "msg": "mine", "cid": "same"})
        self.assertEqual((r["errno"], r["cseq"]), (0, 3))
        self.assertNotIn("dup", r)
        ca.close()
        cb.close()

    def test_sync_after_offline_paged(self):
        a, b, c = self.user("a"), self.user("b"), self.user("c")
        ca, cc = login2(self.node, a), login2(self.node, c)
        g = ca.request({"msgid": 8, "groupname": "g-%s" % uuid.uuid4().hex[:8]})["groupid"]
        for u in (b, c):
            self.assertEqual(ca.request({"msgid": 9, "groupid": g, "userid": u})["errno"], 0)
        sent = {}
        for i in range(23):  # b is offline for all of it
            r = ca.request({"msgid": 6, "toid": b, "msg": "a%d" % i, "cid": "a%d" % i})
            sent.setdefault(r["conv"], []).append(r["mid"])
            r = cc.request({"msgid": 10, "groupid": g, "msg": "g%d" % i, "cid": "g%d" % i})
            sent.setdefault(r["conv"], []).append(r["mid"])
            if i % 5 == 0:
                r = cc.request({"msgid": 6, "toid": b, "msg": "c%d" % i, "cid": "c%d" % i})
                sent.setdefault(r["conv"], []).append(r["mid"])
        cb = client2(self.node)
        ack = cb.login(b, "pw")
        self.assertEqual(ack["offlinemsg"], [])  # durable: by SYNC, not offlinemsg
        msgs, heads, pages = sync_all(cb, limit=7)
        self.assertGreaterEqual(pages, 8)
        conv = per_conv(msgs)
        self.assertEqual(set(conv), set(sent))
        for k, mids in sent.items():
            self.assertEqual(conv[k], list(range(1, len(mids) + 1)), k)
            self.assertEqual([m["mid"] for m in msgs if m["conv"] == k], mids)
            self.assertEqual(heads[k], len(mids))
        # from a position: only what is newer
        r = cc.request({"msgid": 10, "groupid": g, "msg": "late", "cid": "late"})
        more, heads2, _ = sync_all(cb, positions=heads)
        self.assertEqual([(m["conv"], m["cseq"], m["msg"]) for m in more],
                         [(r["conv"], r["cseq"], "late")])
        # live: c's next message arrives with its number
        r = cc.request({"msgid": 6, "toid": b, "msg": "live", "cid": "live"})
        m = cb.recv_until(lambda m: m.get("msgid") == 6)
        self.assertEqual((m["msg"], m["cseq"], m["mid"]), ("live", r["cseq"], r["mid"]))
        for x in (ca, cb, cc):
            x.close()

    def test_history_and_membership(self):
        a, b, c, d = (self.user(n) for n in "abcd")
        ca, cb, cc, cd = (login2(self.node, u) for u in (a, b, c, d))
        conv = None
        for i in range(10):
            conv = ca.request({"msgid": 6, "toid": b, "msg": "h%d" % i, "cid": "h%d" % i})["conv"]
        got, before = [], None
        while True:
            req = {"msgid": 16, "conv": conv, "limit": 3}
            if before:
                req["before"] = before
            r = cb.request(req)
            self.assertEqual(r["errno"], 0, r)
            got = r["msgs"] + got
            if not r["more"]:
                break
            before = r["msgs"][0]["cseq"]
        self.assertEqual([m["msg"] for m in got], ["h%d" % i for i in range(10)])
        self.assertEqual([m["cseq"] for m in got], list(range(1, 11)))
        # not a participant
        r = cc.request({"msgid": 16, "conv": conv})
        self.assertEqual(r["errno"], 121, r)
        for bad in ("x", "p2:1", "p1", "g0", 5):
            self.assertEqual(cc.request({"msgid": 16, "conv": bad})["errno"], 104, bad)
        self.assertEqual(ca.request({"msgid": 16, "conv": conv, "limit": 100000})["errno"], 104)
        # a group: c sees it from when c joined; d, never a member, not at all
        g = ca.request({"msgid": 8, "groupname": "h-%s" % uuid.uuid4().hex[:8]})["groupid"]
        ca.request({"msgid": 9, "groupid": g, "userid": b})
        for i in range(3):
            ca.request({"msgid": 10, "groupid": g, "msg": "old%d" % i, "cid": "old%d" % i})
        time.sleep(0.01)  # joined_at is stamped in ms after the last commit
        ca.request({"msgid": 9, "groupid": g, "userid": c})
        for i in range(2):
            ca.request({"msgid": 10, "groupid": g, "msg": "new%d" % i, "cid": "new%d" % i})
        hb = cb.request({"msgid": 16, "conv": "g%d" % g})
        hc = cc.request({"msgid": 16, "conv": "g%d" % g})
        self.assertEqual([m["msg"] for m in hb["msgs"]], ["old0", "old1", "old2", "new0", "new1"])
        self.assertEqual([m["msg"] for m in hc["msgs"]], ["new0", "new1"])
        self.assertEqual(cd.request({"msgid": 16, "conv": "g%d" % g})["errno"], 121)
        msgs, heads, _ = sync_all(cc)
        self.assertEqual([m["msg"] for m in msgs if m["conv"] == "g%d" % g], ["new0", "new1"])
        self.assertEqual(heads["g%d" % g], 5)
        # a non-member cannot send to the group
        r = cd.request({"msgid": 10, "groupid": g, "msg": "x", "cid": "x"})
        self.assertEqual(r["errno"], 109)
        for x in (ca, cb, cc, cd):
            x.close()

    def test_receipts(self):
        a, b, c = self.user("a"), self.user("b"), self.user("c")
        ca, cb, cc = (login2(self.node, u) for u in (a, b, c))
        for i in range(5):
            conv = ca.request({"msgid": 6, "toid": b, "msg": "r%d" % i, "cid": "r%d" % i})["conv"]
        for _ in range(5):
            cb.recv()
        r = cb.request({"msgid": 17, "conv": conv, "read": 3})
        self.assertEqual((r["errno"], r["delivered"], r["read"]), (0, 3, 3), r)
        m = ca.recv_until(lambda m: m.get("msgid") == 17)  # live, to the other user
        self.assertEqual((m["conv"], m["id"], m["delivered"], m["read"]), (conv, b, 3, 3))
        r = cb.request({"msgid": 17, "conv": conv, "read": 2, "delivered": 5})
        self.assertEqual((r["delivered"], r["read"]), (5, 3))  # marks only grow
        r = cb.request({"msgid": 17, "conv": conv, "read": 100})
        self.assertEqual((r["delivered"], r["read"]), (5, 5))  # capped at the head
        self.assertEqual(cc.request({"msgid": 17, "conv": conv, "read": 1})["errno"], 121)
        self.assertEqual(cb.request({"msgid": 17, "conv": conv})["errno"], 104)
        self.assertEqual(cb.request({"msgid": 17, "conv": conv, "read": -1})["errno"], 104)
        # part of SYNC: the reader's own marks, and the other user's
        _, heads_b, _ = sync_all(cb)
        r = cb.request({"msgid": 15, "convs": [{"conv": conv, "cseq": 5}]})
        e = [x for x in r["convs"] if x["conv"] == conv][0]
        self.assertEqual((e["read"], e["delivered"]), (5, 5))
        self.assertNotIn("peer_read", e)
        r = ca.request({"msgid": 15, "convs": [{"conv": conv, "cseq": 5}]})
        e = [x for x in r["convs"] if x["conv"] == conv][0]
        self.assertEqual((e["peer_read"], e["peer_delivered"]), (5, 5))
        self.assertNotIn("read", e)
        # a group: members only
        g = ca.request({"msgid": 8, "groupname": "r-%s" % uuid.uuid4().hex[:8]})["groupid"]
        ca.request({"msgid": 9, "groupid": g, "userid": b})
        ca.request({"msgid": 10, "groupid": g, "msg": "x", "cid": "gx"})
        r = cb.request({"msgid": 17, "conv": "g%d" % g, "read": 1})
        self.assertEqual((r["errno"], r["read"]), (0, 1))
        self.assertEqual(cc.request({"msgid": 17, "conv": "g%d" % g, "read": 1})["errno"], 121)
        for x in (ca, cb, cc):
            x.close()

    def test_legacy_offline_unchanged(self):
        a, b, c = self.user("a"), self.user("b"), self.user("c")
        # legacy to legacy, offline: byte for byte as before
        la = Client(self.node.port)
        la.login(a, "pw")
        name = self.stack.sql(self.node.db, "SELECT name FROM users WHERE id=%d" % a)[0][0]
        frame = '{"msgid":6,"id":%d,"name":"%s","toid":%d,"msg":"legacy","time":"t"}' % (a, name, b)
        la.send_raw(frame.encode() + b"\0")
        ca = login2(self.node, c)
        r = ca.request({"msgid": 6, "toid": b, "msg": "durable", "cid": "d1"})
        self.assertEqual(r["errno"], 0)
        wait_for(lambda: self.stack.sql(self.node.db, "SELECT COUNT(*) FROM offline_messages "
                                        "WHERE user_id=%d" % b) == [("2",)])
        lb = Client(self.node.port)
        ack = lb.login(b, "pw")
        self.assertEqual(ack["offlinemsg"][0], frame)  # the seed's shape, unchanged
        d = json.loads(ack["offlinemsg"][1])
        self.assertEqual((d["msg"], d["mid"], d["cseq"], d["conv"]),
                         ("durable", r["mid"], r["cseq"], r["conv"]))
        lb.close()
        # a protocol-2 recipient: the non-durable one in offlinemsg, the
        # durable one only by SYNC
        e = self.user("e")
        la.send_raw(('{"msgid":6,"id":%d,"name":"%s","toid":%d,"msg":"legacy2"}' % (
            a, name, e)).encode() + b"\0")
        r = ca.request({"msgid": 6, "toid": e, "msg": "durable2", "cid": "d2"})
        wait_for(lambda: self.stack.sql(self.node.db, "SELECT COUNT(*) FROM offline_messages "
                                        "WHERE user_id=%d" % e) == [("2",)])
        ce = client2(self.node)
        ack = ce.login(e, "pw")
        self.assertEqual([m["msg"] for m in ack["offlinemsg"]], ["legacy2"])
        msgs, _, _ = sync_all(ce)
        self.assertEqual([m["msg"] for m in msgs], ["durable2"])
        wait_for(lambda: self.stack.sql(self.node.db, "SELECT COUNT(*) FROM offline_messages "
                                        "WHERE user_id=%d" % e) == [("0",)])
        for x in (la, ca, ce):
            x.close()


def pump(c, msgs, window=16, timeout=10):
    """Send msgs [(seq, obj)] keeping `window` unanswered; returns {seq: reply}
    for those answered before the connection broke (or all)."""
    replies, todo, inflight = {}, list(msgs), set()
    try:
        while todo or inflight:
            while todo and len(inflight) < window:
                seq, obj = todo.pop(0)
                o = dict(obj)
                o["seq"] = seq
                c.send(o)
                inflight.add(seq)
            r = c.recv(timeout=timeout)
            if r.get("msgid") == 11 and r.get("seq") in inflight:
                inflight.discard(r["seq"])
                replies[r["seq"]] = r
    except (EOFError, ConnectionError, OSError, TimeoutError):
        pass
    return replies


class Retention(unittest.TestCase):
    """[plugin.store] retention_count / retention_seconds: the expired prefix
    of each conversation is purged in small batches; what is kept is the
    newest run up to the head, and SYNC and HISTORY serve it without a gap
    report."""

    def test_count_and_age(self):
        conf = dict(FAST)
        conf["plugin.store"] = {"retention_count": 5, "purge_interval_ms": 50,
                                "purge_batch": 2}
        st = Stack()
        node = Node(st, plugins=PLUGINS, conf=conf)
        try:
            c = client2(node)
            a, b = c.register("a", "pw"), c.register("b", "pw")
            c.close()
            ca, cb = login2(node, a), login2(node, b)
            for i in range(12):
                conv = ca.request({"msgid": 6, "toid": b, "msg": "k%d" % i,
                                   "cid": "k%d" % i})["conv"]
            count = "SELECT MIN(cseq), COUNT(*) FROM messages"
            wait_for(lambda: st.sql(node.db, count) == [("8", "5")], timeout=20)
            msgs, heads, _ = sync_all(cb)
            self.assertEqual([m["cseq"] for m in msgs if m["conv"] == conv],
                             [8, 9, 10, 11, 12])
            self.assertEqual(heads[conv], 12)
            r = cb.request({"msgid": 16, "conv": conv, "limit": 10})
            self.assertEqual(([m["msg"] for m in r["msgs"]], r["more"]),
                             (["k7", "k8", "k9", "k10", "k11"], False))
            # by age: everything older than 1 s goes, whatever the count
            node.write_conf({"plugin.store": {"retention_count": None,
                                              "retention_seconds": 1}})
            node.sighup()
            wait_for(lambda: st.sql(node.db, "SELECT COUNT(*) FROM messages")
                     == [("0",)], timeout=20)
            r = ca.request({"msgid": 6, "toid": b, "msg": "new", "cid": "new"})
            self.assertEqual(r["cseq"], 13)  # numbering goes on from the head
            ca.close()
            cb.close()
        except Exception:
            print(node.log_tail(30))
            raise
        finally:
            node.stop()


class DatabaseDown(unittest.TestCase):
    """MariaDB stopped mid-traffic: sends get 113, never an ACK for a
    message that is not stored; resent with the same cid after the restart,
    every message is stored exactly once, numbers dense."""

    def test_ack_only_after_commit(self):
        with Stack.private(redis=False, mysql=True) as st:
            node = Node(st, plugins=PLUGINS, conf=FAST)
            try:
                self._run(st, node)
            except Exception:
                print(node.log_tail(60))
                raise
            finally:
                node.stop()

    def _run(self, st, node):
        c = client2(node)
        a = c.register("a", "pw")
        b = c.register("b", "pw")
        c.close()
        ca = login2(node, a)
        acked = {}
        for i in range(10):
            r = ca.request({"msgid": 6, "toid": b, "msg": "m%d" % i, "cid": "m%d" % i})
            self.assertEqual(r["errno"], 0)
            acked["m%d" % i] = (r["mid"], r["cseq"])
        st.stop_mysql()
        refused = []
        for i in range(10, 20):
            cid = "m%d" % i
            r = ca.request({"msgid": 6, "toid": b, "msg": cid, "cid": cid}, timeout=40)
            if r["errno"] == 0:
                acked[cid] = (r["mid"], r["cseq"])
            else:
                self.assertEqual(r["errno"], 113, r)
                refused.append(cid)
        self.assertEqual(len(refused), 10)  # the database is down: none stored
        st.start_mysql()
        # resend each refused message with its cid until it is acknowledged
        deadline = time.monotonic() + 60
        for cid in refused:
            while True:
                r = ca.request({"msgid": 6, "toid": b, "msg": cid, "cid": cid}, timeout=40)
                if r["errno"] == 0:
                    acked[cid] = (r["mid"], r["cseq"])
                    break
                self.assertEqual(r["errno"], 113, r)
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.2)
        rows = st.sql(node.db, "SELECT cid, id, cseq FROM messages ORDER BY cseq")
        self.assertEqual({r[0]: (int(r[1]), int(r[2])) for r in rows}, acked)
        self.assertEqual([int(r[2]) for r in rows], list(range(1, 21)))
        ca.close()


def send_until_acked(node, uid, msgs, deadline_s=90):
    """The durable client: send msgs [(seq, obj)], resend every one not
    acknowledged (same cid) until each is, reconnecting when the connection
    breaks.  Returns ({cid: ack}, number of 113 answers)."""
    acked, deadline, busy = {}, time.monotonic() + deadline_s, 0
    while True:
        todo = [(seq, o) for seq, o in msgs if o["cid"] not in acked]
        if not todo:
            return acked, busy
        assert time.monotonic() < deadline, "%d never acknowledged" % len(todo)
        try:
            c = login2(node, uid)
        except (OSError, EOFError, TimeoutError, AssertionError):
            time.sleep(0.2)
            continue
        for seq, r in pump(c, todo, timeout=40).items():
            assert r["errno"] in (0, 113), r
            if r["errno"] == 0:
                acked[msgs[seq - 1][1]["cid"]] = r
            else:
                busy += 1
        c.close()


def check_exactly_once(test, node, uid, acked):
    """The receiver syncs: every acknowledged message once, numbers dense,
    in the sender's order."""
    c = login2(node, uid)
    got, heads, _ = sync_all(c, limit=200)
    c.close()
    conv = per_conv(got)
    for k, seqs in conv.items():
        test.assertEqual(seqs, list(range(1, heads[k] + 1)), k)
    by_cid = {}
    for m in got:
        test.assertNotIn(m["cid"], by_cid)
        by_cid[m["cid"]] = m
    test.assertEqual(set(by_cid), set(acked))
    for cid, r in acked.items():
        test.assertEqual((by_cid[cid]["mid"], by_cid[cid]["cseq"]), (r["mid"], r["cseq"]))
    for k in conv:
        cids = [m["cid"] for m in got if m["conv"] == k]
        test.assertEqual(cids, sorted(cids), k)


def traffic(uid_to, gid, total, tag):
    msgs = []
    for i in range(total):
        cid = "%s%04d" % (tag, i)
        if gid and i % 3 == 2:
            msgs.append((i + 1, {"msgid": 10, "groupid": gid, "msg": cid, "cid": cid}))
        else:
            msgs.append((i + 1, {"msgid": 6, "toid": uid_to, "msg": cid, "cid": cid}))
    return msgs


class MidTraffic(unittest.TestCase):
    """Faults while a durable client sends (the receiver offline throughout):
    MariaDB restarted, Redis restarted, the one2one and group plugins
    hot-reloaded.  The
    client resends what was not acknowledged; the receiver then syncs and
    has every acknowledged message exactly once, in order."""

    def setup_users(self, node):
        c = client2(node)
        s, r = c.register("s", "pw"), c.register("r", "pw")
        c.login(s, "pw")
        g = c.request({"msgid": 8, "groupname": "m-%s" % uuid.uuid4().hex[:6]})["groupid"]
        c.request({"msgid": 9, "groupid": g, "userid": r})
        c.close()
        return s, r, g

    def test_mariadb_restart(self):
        with Stack.private(redis=False, mysql=True) as st:
            node = Node(st, plugins=PLUGINS, conf=FAST)
            try:
                s, r, g = self.setup_users(node)
                # before: stored at full speed (a fixed delay before the
                # outage let a fast writer store everything first)
                acked, _ = send_until_acked(node, s, traffic(r, g, 1000, "a"))
                # during: a session logged in before MariaDB stops sends
                # 2000 more; what cannot be stored is answered 113
                c = login2(node, s)
                st.stop_mysql()

                def back():
                    time.sleep(1)
                    st.start_mysql()
                t = threading.Thread(target=back)
                t.start()
                msgs = traffic(r, g, 2000, "b")
                busy = sum(1 for rep in pump(c, msgs, timeout=40).values()
                           if rep["errno"] == 113)
                c.close()
                t.join()
                self.assertGreater(busy, 0)  # sends during the outage got 113
                # after: the client resends every one with its cid (those
                # stored meanwhile answer dup, with their first ids)
                more, _ = send_until_acked(node, s, msgs)
                acked.update(more)
                check_exactly_once(self, node, r, acked)
            except Exception:
                print(node.log_tail(40))
                raise
            finally:
                node.stop()

    def test_redis_restart(self):
        """Two nodes; Redis restarted mid-traffic (presence and the bus go,
        the store does not): the receiver, on the other node, syncs."""
        with Stack.private(redis=True, mysql=False) as st:
            n1 = Node(st, plugins=PLUGINS, conf=FAST)
            n2 = Node(st, db=n1.db, plugins=PLUGINS, conf=FAST, migrate=False)
            try:
                s, r, g = self.setup_users(n1)
                msgs = traffic(r, g, 3000, "r")

                def outage():
                    time.sleep(0.3)
                    st.stop_redis()
                    time.sleep(1)
                    st.start_redis()
                t = threading.Thread(target=outage)
                t.start()
                acked, _ = send_until_acked(n1, s, msgs)
                t.join()
                check_exactly_once(self, n2, r, acked)
            except Exception:
                print(n1.log_tail(30))
                print(n2.log_tail(30))
                raise
            finally:
                n1.stop()
                n2.stop()

    def test_plugin_reload(self):
        plugdir = tempfile.mkdtemp(prefix="chatd-plugins-")
        self.addCleanup(shutil.rmtree, plugdir, True)

        def install(name):
            tmp = os.path.join(plugdir, ".%s.so.tmp" % name)
            shutil.copyfile(os.path.join(PLUGIN_DIR, name + ".so"), tmp)
            os.replace(tmp, os.path.join(plugdir, name + ".so"))
        for name in PLUGINS:
            install(name)
        node = Node(Stack(), plugins=PLUGINS, conf=FAST, plugin_dir=plugdir)
        try:
            s, r, g = self.setup_users(node)
            msgs = traffic(r, g, 4000, "h")

            def reload():
                for _ in range(2):
                    time.sleep(0.2)
                    install("one2one")
                    install("group")
                    node.sighup()
            t = threading.Thread(target=reload)
            t.start()
            acked, _ = send_until_acked(node, s, msgs)
            t.join()
            wait_for(lambda: len(re.findall(r"plugin one2one \(load \d+\): finalised",
                                            node.log_text())) >= 2, timeout=30)
            check_exactly_once(self, node, r, acked)
        except Exception:
            print(node.log_tail(40))
            raise
        finally:
            node.stop()


class TwoWriters(unittest.TestCase):
    """One conversation written from two nodes in turn: each node numbers
    from the head it cached, so every switch makes the other node's cached
    head stale; the primary key catches it and the batch is numbered again.
    Every message gets its own number, 1..N, none twice."""

    def test_stale_head_renumbered(self):
        st = Stack()
        n1 = Node(st, plugins=PLUGINS, conf=FAST)
        n2 = Node(st, db=n1.db, plugins=PLUGINS, conf=FAST, migrate=False)
        try:
            c = client2(n1)
            a, b = c.register("a", "pw"), c.register("b", "pw")
            c.close()
            ca, cb = login2(n1, a), login2(n2, b)
            acks = []
            for i in range(10):
                acks.append(ca.request({"msgid": 6, "toid": b, "msg": "a%d" % i,
                                        "cid": "a%d" % i}))
                acks.append(cb.request({"msgid": 6, "toid": a, "msg": "b%d" % i,
                                        "cid": "b%d" % i}))
            self.assertEqual([r["errno"] for r in acks], [0] * 20)
            self.assertEqual([r["cseq"] for r in acks], list(range(1, 21)))
            self.assertEqual(len({r["mid"] for r in acks}), 20)
            self.assertIn("Duplicate entry", n1.log_text() + n2.log_text())
            rows = st.sql(n1.db, "SELECT cseq, cid FROM messages ORDER BY cseq")
            self.assertEqual([(int(r[0]), r[1]) for r in rows],
                             [(r["cseq"], ("a%d" if k % 2 == 0 else "b%d") % (k // 2))
                              for k, r in enumerate(acks)])
            self.assertEqual(st.sql(n1.db, "SELECT head FROM conv_heads"), [("20",)])
            ca.close()
            cb.close()
        except Exception:
            print(n1.log_tail(30))
            print(n2.log_tail(30))
            raise
        finally:
            n1.stop()
            n2.stop()


class NodeKilled(unittest.TestCase):
    """Two nodes; the receiver is offline for the whole run; the sender's
    node is killed with SIGKILL mid-traffic; the sender resends what was not
    acknowledged, with the same cid, on the other node; the receiver then
    syncs: every message exactly once, in order, per conversation."""

    def test_sigkill_resend_sync(self):
        st = Stack()
        conf = dict(FAST)
        n1 = Node(st, plugins=PLUGINS, conf=conf)
        n2 = Node(st, db=n1.db, plugins=PLUGINS, conf=conf, migrate=False)
        try:
            self._run(st, n1, n2)
        except Exception:
            print(n1.log_tail(40))
            print(n2.log_tail(40))
            raise
        finally:
            n2.stop()
            if n1.proc.poll() is None:
                n1.stop()

    def _run(self, st, n1, n2):
        c = client2(n2)
        s, r1, r2 = (c.register("%s-%s" % (x, uuid.uuid4().hex[:6]), "pw") for x in "srq")
        g = None
        c.login(r2, "pw")
        g = c.request({"msgid": 8, "groupname": "k-%s" % uuid.uuid4().hex[:6]})["groupid"]
        for u in (s, r1):
            c.request({"msgid": 9, "groupid": g, "userid": u})
        c.close()
        total = 600
        msgs = []
        for i in range(total):
            cid = "k%04d" % i
            if i % 3 == 2:
                msgs.append((i + 1, {"msgid": 10, "groupid": g, "msg": cid, "cid": cid}))
            else:
                msgs.append((i + 1, {"msgid": 6, "toid": r1, "msg": cid, "cid": cid}))
        cs = login2(n1, s)
        # kill n1 once about a third is acknowledged
        acked = {}
        first = pump(cs, msgs[:200])
        for seq, r in first.items():
            self.assertEqual(r["errno"], 0, r)
            acked[msgs[seq - 1][1]["cid"]] = r
        cs_rest = msgs[200:]
        for seq, obj in cs_rest[:100]:
            o = dict(obj)
            o["seq"] = seq
            cs.send(o)
        n1.kill(signal.SIGKILL)
        n1.wait()
        try:  # what came back before the kill
            while True:
                r = cs.recv(timeout=1)
                if r.get("msgid") == 11 and r.get("errno") == 0:
                    acked[msgs[r["seq"] - 1][1]["cid"]] = r
        except (EOFError, ConnectionError, OSError, TimeoutError):
            pass
        cs.close()
        self.assertGreater(len(acked), 0)
        # fail over: resend everything not acknowledged, same cid
        cs = login2(n2, s)
        before_kill, dups = len(acked), 0
        todo = [(seq, o) for seq, o in msgs if o["cid"] not in acked]
        for _ in range(5):
            got = pump(cs, todo)
            for seq, r in got.items():
                if r["errno"] == 0:
                    acked[msgs[seq - 1][1]["cid"]] = r
                    dups += bool(r.get("dup"))
            todo = [(seq, o) for seq, o in msgs if o["cid"] not in acked]
            if not todo:
                break
        self.assertEqual(todo, [])
        cs.close()
        print("\n%d acknowledged before the kill; %d resent, of which %d had been "
              "stored already (dup)" % (before_kill, total - before_kill, dups))
        # the receiver, offline all along, syncs on n2
        cr = login2(n2, r1)
        got, heads, _ = sync_all(cr, limit=100)
        conv = per_conv(got)
        for k, seqs in conv.items():
            self.assertEqual(seqs, list(range(1, heads[k] + 1)), k)  # no gap, no dup
        by_cid = {}
        for m in got:
            self.assertNotIn(m["cid"], by_cid)  # exactly once
            by_cid[m["cid"]] = m
        self.assertEqual(set(by_cid), set(acked))
        for cid, r in acked.items():
            self.assertEqual((by_cid[cid]["mid"], by_cid[cid]["cseq"], by_cid[cid]["conv"]),
                             (r["mid"], r["cseq"], r["conv"]), cid)
        # in order per conversation: the sender's order
        for k in conv:
            cids = [m["cid"] for m in got if m["conv"] == k]
            self.assertEqual(cids, sorted(cids), k)
        cr.close()


if __name__ == "__main__":
    unittest.main()
