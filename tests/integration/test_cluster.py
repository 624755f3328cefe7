"""Two (and three) chatd nodes on one database and one Redis: one-to-one and
group chat across nodes, the group member cache invalidated cluster-wide,
and a node killed with SIGKILL whose users log in on another node within
the presence TTL without losing what was sent to them meanwhile."""
import signal
import time
import unittest

from harness import Node, wait_for
from test_one2one import FAST_LOGIN, ChatCase, is_msg, loads_maybe, merge_conf

HEARTBEAT_TTL = 3  # the harness's [redis] heartbeat_ttl


def sync_all(c):
    """SYNC (15) from nothing until "more" is false: the messages in order."""
    pos, out = {}, []
    while True:
        r = c.request({"msgid": 15, "convs": [{"conv": k, "cseq": v}
                                              for k, v in pos.items()]})
        assert r["errno"] == 0, r
        for m in r["msgs"]:
            pos[m["conv"]] = m["cseq"]
            out.append(m)
        if not r["more"]:
            return out


# store: SYNC, how a protocol-2 device gets the durable messages it missed
PLUGINS = ("login", "friend", "one2one", "group", "offline", "store")


class Cluster(ChatCase):
    # a long TTL: only the broadcast can make another node see a new member
    CONF = {"plugin.group": {"cache_ttl": 300}}

    @classmethod
    def start_node(cls, conf=None, **kw):
        kw.setdefault("plugins", PLUGINS)
        return super().start_node(conf, **kw)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()  # node A
        cls.a_node = cls.node
        cls.b_node = cls.start_node(db=cls.a_node.db, migrate=False)

    def create_group(self, u):
        r = self.expect_ack(u, {"msgid": 8, "id": u.id, "groupname": self.uname("cg"),
                                "groupdesc": "cluster"})
        return r["groupid"]

    def join(self, u, gid):
        self.expect_ack(u, {"msgid": 9, "id": u.id, "groupid": gid})

    def test_one_to_one_across_nodes(self):
        a = self.user(node=self.a_node)
        b = self.user(proto=2, node=self.b_node)
        a.c.send(a.one(b.id, "A to B"))
        got = b.c.recv_until(is_msg(6))
        self.assertEqual((got["id"], got["name"], got["msg"]), (a.id, a.name, "A to B"))
        self.expect_ack(b, b.one(a.id, "B to A"))
        got = a.c.recv_until(is_msg(6))
        self.assertEqual((got["id"], got["name"], got["msg"]), (b.id, b.name, "B to A"))
        a.c.expect_nothing(0.2)

    def test_group_spans_nodes(self):
        a = self.user(proto=2, node=self.a_node)
        b = self.user(proto=2, node=self.b_node)
        c = self.user(node=self.a_node)
        d = self.user(proto=2, node=self.b_node)
        gid = self.create_group(a)
        for u in (b, d):
            self.join(u, gid)
        c.c.send({"msgid": 9, "id": c.id, "groupid": gid})
        wait_for(lambda: self.stack.sql(self.a_node.db, "SELECT COUNT(*) FROM group_members "
                                        "WHERE group_id = %d" % gid)[0][0] == "4", 10)
        self.expect_ack(a, a.group_msg(gid, "from A"))
        for u in (b, c, d):
            got = u.c.recv_until(is_msg(10))
            self.assertEqual((got["id"], got["msg"], got["groupid"]), (a.id, "from A", gid))
        self.expect_ack(b, b.group_msg(gid, "from B"))
        for u in (a, c, d):
            got = u.c.recv_until(is_msg(10))
            self.assertEqual((got["id"], got["name"], got["msg"]), (b.id, b.name, "from B"))
        a.c.expect_nothing(0.2)
        b.c.expect_nothing(0.2)
        # an offline member (logged in on B before) gets its copy at login on A
        self.drop(d)
        self.expect_ack(b, b.group_msg(gid, "while d is away"))
        d = self.login(d.id, d.name, node=self.a_node)
        self.assertEqual([loads_maybe(m)["msg"] for m in d.ack.get("offlinemsg", [])],
                         ["while d is away"])

    def test_join_on_one_node_seen_by_the_other(self):
        a = self.user(proto=2, node=self.a_node)
        b = self.user(proto=2, node=self.b_node)
        gid = self.create_group(a)
        self.join(b, gid)
        self.expect_ack(b, b.group_msg(gid, "warm B's cache"))
        a.c.recv_until(is_msg(10))
        n = self.user(proto=2, node=self.a_node)
        self.join(n, gid)  # on A: B learns it through the broadcast
        start = time.monotonic()
        k = 0
        while True:
            k += 1
            self.expect_ack(b, b.group_msg(gid, "probe %d" % k))
            try:
                got = n.c.recv_until(is_msg(10), timeout=0.2)
                break
            except TimeoutError:
                self.assertLess(time.monotonic() - start, 5,
                                "node B never saw the new member (cache_ttl is 300 s)")
        self.assertEqual(got["msg"], "probe %d" % k)
        # and B accepts the new member as a sender at once
        self.expect_ack(n, n.group_msg(gid, "hi from n"))
        self.assertEqual(b.c.recv_until(is_msg(10))["msg"], "hi from n")

    def test_sigkill_users_move_and_nothing_is_lost(self):
        victim = Node(self.stack, db=self.a_node.db, migrate=False, plugins=PLUGINS,
                      conf=merge_conf(FAST_LOGIN, self.CONF))
        s = self.user(proto=2, node=self.b_node)
        v1 = self.user(node=victim)
        v2 = self.user(proto=2, node=victim)
        gid = self.create_group(s)
        v1.c.send({"msgid": 9, "id": v1.id, "groupid": gid})
        self.join(v2, gid)
        wait_for(lambda: self.stack.sql(self.a_node.db, "SELECT COUNT(*) FROM group_members "
                                        "WHERE group_id = %d" % gid)[0][0] == "3", 10)
        self.expect_ack(s, s.group_msg(gid, "before the crash"))
        for v in (v1, v2):
            self.assertEqual(v.c.recv_until(is_msg(10))["msg"], "before the crash")

        victim.kill(signal.SIGKILL)
        killed = time.monotonic()
        victim.wait(10)
        sent = {v1.id: [], v2.id: []}
        for k in range(3):  # while the dead node still holds their presence
            for v in (v1, v2):
                text = "to %d while down %d" % (v.id, k)
                self.expect_ack(s, s.one(v.id, text))
                sent[v.id].append(text)
            text = "group while down %d" % k
            self.expect_ack(s, s.group_msg(gid, text))
            for v in (v1, v2):
                sent[v.id].append(text)

        moved = {}
        for v in (v1, v2):
            moved[v.id] = self.login(v.id, v.name, proto=v.proto, node=self.b_node,
                                     timeout=HEARTBEAT_TTL + 5)
        elapsed = time.monotonic() - killed
        self.assertLess(elapsed, HEARTBEAT_TTL + 1.5,
                        "users of a killed node must log in within the presence TTL")
        for v in (v1, v2):
            got = [loads_maybe(m)["msg"] for m in moved[v.id].ack.get("offlinemsg", [])]
            if v.proto == 2:
                # s's messages are durable (protocol 2): a protocol-2 device
                # gets them by SYNC, not in offlinemsg; in order per
                # conversation, the group's first (SYNC's conv order)
                self.assertEqual(got, [], "user %d" % v.id)
                got = [m["msg"] for m in sync_all(moved[v.id].c)
                       if m["msg"] != "before the crash"]
                want = sorted(sent[v.id], key=lambda t: not t.startswith("group"))
                self.assertEqual(got, want, "user %d" % v.id)
                continue
            # a legacy ack holds what fits in 1,023 bytes; the rest follows it
            while len(got) < len(sent[v.id]):
                got.append(moved[v.id].c.recv()["msg"])
            self.assertEqual(got, sent[v.id], "user %d" % v.id)
            # and live again, on B
            self.expect_ack(s, s.one(v.id, "welcome back"))
            self.assertEqual(moved[v.id].c.recv_until(is_msg(6))["msg"], "welcome back")
        self.expect_ack(s, s.group_msg(gid, "all here"))
        for v in (v1, v2):
            self.assertEqual(moved[v.id].c.recv_until(is_msg(10))["msg"], "all here")
            moved[v.id].c.expect_nothing(0.2)


if __name__ == "__main__":
    unittest.main()
