"""Quotas with a clear error (issue 12 "Quotas, each with a clear error").

Each quota is tested with it on (the request is refused with its errno and
a plain errmsg, nothing stored) and off or raised (the same request goes
through), so it is the quota that refused it:
- friends per user: [plugin.friend] friends_max -> 126 "too many friends";
- the group limits that exist: [plugin.group] group_size_max -> 111
  "group is full", groups_per_user_max -> 111 "too many groups";
- undelivered messages stored per recipient and per sender -> recipient
  ([plugin.offline] stored_max -> 128, stored_per_sender_max -> 129;
  OfflineQuotas below, on the non-durable path: test_offline's FAST sets
  durable = cid, as protocol-2 messages are otherwise stored in the message
  store, acknowledged, and only their offline copies refused, silently:
  test_durable_default.Quota).  Those tests assert the
  refusal itself, so each
  fails with its key at 0 (quota off), e.g.:
    python3 -c 'import sys, unittest, test_quota as t;
      t.OfflineQuotas.STORED_MAX = 0;
      sys.exit(not unittest.main(module=t, argv=["x", "OfflineQuotas"],
                                 exit=False).result.wasSuccessful())'
"""

import re
import unittest

from harness import Client, Node, Stack, wait_for
from test_net import NodeCase
from test_offline import FAST, OfflineCase, merged


class Quotas(NodeCase):
    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()

    def user_node(self, conf):
        conf = dict(conf, **{"plugin.login": {"hash_cost": 1}})
        node = Node(self.stack, conf=conf)
        self.test_nodes.append(node)
        self.addCleanup(self.stopped_ok, node)
        return node

    def users(self, node, n):
        out = []
        for i in range(n):
            c = Client(node.port, proto=2)
            self.addCleanup(c.close)
            uid = c.register("q%d" % i, "pw")
            self.assertEqual(c.login(uid, "pw")["errno"], 0)
            out.append((c, uid))
        return out

    def test_friends_per_user(self):
        for on in (True, False):
            with self.subTest(friends_max=2 if on else 0):
                node = self.user_node({"plugin.friend": {"policy": "open",
                                                         "friends_max": 2 if on else 0}})
                (c, me), *others = self.users(node, 4)
                for _, fid in others[:2]:
                    self.assertEqual(c.request({"msgid": 7, "id": me, "friendid": fid})["errno"], 0)
                ack = c.request({"msgid": 7, "id": me, "friendid": others[2][1]})
                if on:
                    self.assertEqual((ack["errno"], ack["errmsg"]), (126, "too many friends"))
                    flist = c.request({"msgid": 13, "id": me})["friends"]
                    self.assertEqual(len(flist), 2)
                else:
                    self.assertEqual(ack["errno"], 0, ack)
                self.stopped_ok(node)  # user ids restart at 1: free the presence

    def test_group_limits_answer_clearly(self):
        node = self.user_node({"plugin.group": {"join": "open", "group_size_max": 2,
                                                "groups_per_user_max": 2}})
        (a, ida), (b, idb), (c, idc) = self.users(node, 3)
        gid = a.request({"msgid": 8, "id": ida, "groupname": "g1", "groupdesc": ""})["groupid"]
        self.assertEqual(b.request({"msgid": 9, "id": idb, "groupid": gid})["errno"], 0)
        ack = c.request({"msgid": 9, "id": idc, "groupid": gid})
        self.assertEqual((ack["errno"], ack["errmsg"]), (111, "group is full"))
        a.request({"msgid": 8, "id": ida, "groupname": "g2", "groupdesc": ""})
        ack = a.request({"msgid": 8, "id": ida, "groupname": "g3", "groupdesc": ""})
        self.assertEqual((ack["errno"], ack["errmsg"]), (111, "too many groups"))
        self.stopped_ok(node)


class OfflineQuotas(OfflineCase):
    """[plugin.offline] stored_max and stored_per_sender_max: a protocol-2
    sender over a quota gets 128 / 129 and the message is not stored; the
    recipient later gets exactly the stored ones; a legacy sender gets
    nothing (the seed answers no chat message): logged and counted; a group
    message skips a full member's mailbox without failing ("full": n)."""
    STORED_MAX = 4
    PER_SENDER = 3

    @classmethod
    def setUpClass(cls):
        cls.extra_conf = {"plugin.offline": {"stored_max": cls.STORED_MAX,
                                             "stored_per_sender_max": cls.PER_SENDER},
                          "plugin.group": {"join": "open"}}
        super().setUpClass()

    def send(self, c, to, text):
        """One chat message; its ACK (errno, errmsg)."""
        r = c.request({"msgid": 6, "id": c.uid, "name": c.name, "toid": to,
                       "msg": text}, timeout=20)
        return r["errno"], r.get("errmsg")

    def stored(self, uid, n):
        """uid logs in (legacy) and gets exactly its n stored messages."""
        self.wait_rows(uid, n)
        c, ack = self.login_legacy(uid)
        got = self.received_legacy(c, ack, n)
        c.expect_nothing(0.3)
        self.wait_rows(uid, 0)
        c.close()
        self.offline(uid)
        return got

    def offline(self, uid):
        wait_for(lambda: not self.node.admin("GET", "/users/%d/presence" % uid)[2]["online"],
                 timeout=10, what="user %d offline" % uid)

    def refused(self, quota):
        text = self.node.admin("GET", "/metrics")[2]
        m = re.search(r'^chatd_offline_refused_total\{[^}]*quota="%s"[^}]*\} (\S+)$' % quota,
                      text, re.M)
        return float(m.group(1)) if m else 0.0

    def test_per_recipient_128_across_nodes(self):
        other = Node(self.stack, db=self.node.db, migrate=False,
                     conf=merged(FAST, self.extra_conf))
        self.test_nodes.append(other)
        self.addCleanup(other.stop)
        a, b = self.sender(), self.sender(other)  # b writes from another node
        r, _ = self.user()
        before = self.refused("recipient")
        for i in range(2):
            self.assertEqual(self.send(a, r, "a%d" % i), (0, "ok"))
            self.assertEqual(self.send(b, r, "b%d" % i), (0, "ok"))
        self.assertEqual(self.send(b, r, "b2"), (128, "recipient's mailbox is full"))
        self.assertEqual(self.send(a, r, "a2"), (128, "recipient's mailbox is full"))
        self.assertEqual(self.refused("recipient"), before + 1)  # a's, on this node
        self.assertEqual(self.stored(r, 4), ["a0", "b0", "a1", "b1"])
        # delivered and deleted: the mailbox has room again
        self.assertEqual(self.send(a, r, "a3"), (0, "ok"))
        self.assertEqual(self.stored(r, 1), ["a3"])

    def test_per_sender_129(self):
        a, b = self.sender(), self.sender()
        r, _ = self.user()
        before = self.refused("sender")
        for i in range(3):
            self.assertEqual(self.send(a, r, "a%d" % i), (0, "ok"))
        self.assertEqual(self.send(a, r, "a3"),
                         (129, "too many messages waiting for this recipient from you"))
        self.assertEqual(self.refused("sender"), before + 1)
        self.assertEqual(self.send(b, r, "b0"), (0, "ok"))  # others still reach r
        self.assertEqual(self.stored(r, 4), ["a0", "a1", "a2", "b0"])

    def test_burst_stops_at_the_quota(self):
        """Sent without waiting (they share insert batches): exactly
        PER_SENDER are stored, in order, the rest answered 129."""
        a = self.sender()
        r, _ = self.user()
        for i in range(8):
            a.send({"msgid": 6, "id": a.uid, "name": a.name, "toid": r,
                    "msg": "x%d" % i, "seq": i})
        got = {}
        while len(got) < 8:
            m = a.recv_until(lambda m: m.get("msgid") == 11, timeout=20)
            got[m["seq"]] = m["errno"]
        self.assertEqual([got[i] for i in range(8)], [0] * 3 + [129] * 5)
        self.assertEqual(self.stored(r, 3), ["x0", "x1", "x2"])

    def test_legacy_sender_gets_nothing_logged_and_counted(self):
        uid, name = self.user()
        a = self.client()
        a.send({"msgid": 1, "id": uid, "password": "pw"})
        self.assertEqual(a.recv()["errno"], 0)
        r, _ = self.user()
        before = self.refused("sender")
        mark = self.node.log_mark()
        for i in range(5):
            a.send({"msgid": 6, "id": uid, "name": name, "toid": r, "msg": "l%d" % i})
        wait_for(lambda: self.refused("sender") == before + 2, timeout=10,
                 what="two refusals counted")
        self.node.wait_log("for user %d not stored: too many from this sender" % r,
                           since=mark)
        a.expect_nothing(0.3)  # the seed answers no chat message
        self.assertEqual(self.stored(r, 3), ["l0", "l1", "l2"])

    def test_group_message_skips_a_full_mailbox(self):
        a, b, c = self.sender(), self.sender(), self.sender()
        gid = a.request({"msgid": 8, "id": a.uid, "groupname": "qg" + a.name,
                         "groupdesc": ""})["groupid"]
        full, free = self.sender(), self.sender()
        for m in (full, free):
            self.assertEqual(m.request({"msgid": 9, "id": m.uid, "groupid": gid})["errno"], 0)
            m.close()
            self.offline(m.uid)
        for i in range(4):  # under PER_SENDER each: the recipient's quota fills
            self.assertEqual(self.send((b, c)[i % 2], full.uid, "m%d" % i), (0, "ok"))
        r = a.request({"msgid": 10, "id": a.uid, "name": a.name, "groupid": gid,
                       "msg": "hello group"}, timeout=20)
        self.assertEqual((r["errno"], r.get("full")), (0, 1), r)
        self.assertEqual(self.stored(free.uid, 1), ["hello group"])
        self.assertEqual(self.stored(full.uid, 4), ["m0", "m1", "m2", "m3"])


if __name__ == "__main__":
    unittest.main()
