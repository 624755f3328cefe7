"""Quotas with a clear error (issue 12 "Quotas, each with a clear error").

Each quota is tested with it on (the request is refused with its errno and
a plain errmsg, nothing stored) and off or raised (the same request goes
through), so it is the quota that refused it:
- friends per user: [plugin.friend] friends_max -> 126 "too many friends";
- the group limits that exist: [plugin.group] group_size_max -> 111
  "group is full", groups_per_user_max -> 111 "too many groups".
"""

import unittest

from harness import Client, Node, Stack
from test_net import NodeCase


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


if __name__ == "__main__":
    unittest.main()
