"""ADD_FRIEND_MSG (7), FRIEND_LIST (13) and the "friends" part of the login
ack, against the real chatd, MariaDB and Redis: both protocols, every
error, live presence and byte-exact names."""
import json
import unittest

from harness import wait_for
from test_one2one import SPECIAL_TEXTS, ChatCase, loads_maybe


class Friends(ChatCase):

    def add(self, a, fid):
        return a.request({"msgid": 7, "id": a.id, "friendid": fid})

    def friend_rows(self, uid):
        return self.stack.sql(self.node.db, "SELECT friend_id FROM friends WHERE "
                              "user_id = %d ORDER BY created_at, friend_id" % uid)

    def wait_rows(self, uid, n):
        wait_for(lambda: len(self.friend_rows(uid)) == n, 10, what="%d friend rows" % n)

    def listed(self, a):
        r = a.c.request({"msgid": 13, "id": a.id})
        self.assertEqual((r["msgid"], r["req"], r["errno"]), (11, 13, 0), r)
        self.assertIsInstance(r["friends"], list)
        return r["friends"]

    def relogin(self, u, proto=None):
        self.drop(u)
        return self.login(u.id, u.name, proto or u.proto)

    # --- legacy -----------------------------------------------------------
    def test_legacy_add_is_silent_and_listed_at_next_login(self):
        a, b = self.user(), self.user()
        a.c.send({"msgid": 7, "id": a.id, "friendid": b.id})
        a.c.expect_nothing(0.3)
        self.wait_rows(a.id, 1)
        a = self.relogin(a)
        friends = a.ack["friends"]
        self.assertEqual(len(friends), 1)
        self.assertIsInstance(friends[0], str, "legacy lists hold JSON strings")
        self.assertEqual(friends[0], json.dumps({"id": b.id, "name": b.name, "state": "online"},
                                                separators=(",", ":")))
        self.drop(b)
        a = self.relogin(a)
        self.assertEqual(json.loads(a.ack["friends"][0])["state"], "offline")

    def test_legacy_login_without_lists_has_no_keys(self):
        a = self.user()
        for key in ("friends", "groups", "offlinemsg"):
            self.assertNotIn(key, a.ack)
        self.assertEqual(set(a.ack), {"msgid", "errno", "id", "name"})

    def test_legacy_errors_are_silent(self):
        a, b = self.user(), self.user()
        self.add(a, b.id)
        self.wait_rows(a.id, 1)
        for req in ({"msgid": 7, "id": a.id, "friendid": b.id},        # already
                    {"msgid": 7, "id": a.id, "friendid": 99999999},    # unknown
                    {"msgid": 7, "id": a.id, "friendid": a.id},        # self
                    {"msgid": 7, "id": a.id, "friendid": "x"},
                    {"msgid": 7, "id": a.id},
                    {"msgid": 7, "id": b.id, "friendid": a.id},        # spoofed id
                    {"msgid": 13, "id": a.id}):                        # protocol 2 only
            a.c.send(req)
        a.c.expect_nothing(0.5)
        self.assertFalse(a.c.eof)
        self.assertEqual(self.friend_rows(a.id), [(str(b.id),)])
        self.assertEqual(self.friend_rows(b.id), [])

    # --- protocol 2 ---------------------------------------------------------
    def test_proto2_add_and_errors(self):
        a, b = self.user(proto=2), self.user()
        self.expect_ack(a, {"msgid": 7, "id": a.id, "friendid": b.id}, 0)
        cases = [({"msgid": 7, "id": a.id, "friendid": b.id}, 110),
                 ({"msgid": 7, "id": a.id, "friendid": 99999999}, 108),
                 ({"msgid": 7, "id": a.id, "friendid": a.id}, 104),
                 ({"msgid": 7, "id": a.id, "friendid": "%d" % b.id}, 104),
                 ({"msgid": 7, "id": a.id, "friendid": b.id + 0.5}, 104),
                 ({"msgid": 7, "id": a.id, "friendid": None}, 104),
                 ({"msgid": 7, "id": a.id}, 104),
                 ({"msgid": 7, "id": b.id, "friendid": a.id}, 107)]
        for req, errno_ in cases:
            with self.subTest(req=req):
                r = self.expect_ack(a, req, errno_)
                self.assertNotEqual(r["errmsg"], "ok")
        self.assertEqual(self.friend_rows(a.id), [(str(b.id),)])
        c = self.client(proto=2)
        r = c.request({"msgid": 7, "id": a.id, "friendid": b.id})
        self.assertEqual((r["req"], r["errno"]), (7, 106))
        r = c.request({"msgid": 13})
        self.assertEqual((r["req"], r["errno"]), (13, 106))

    def test_friendship_is_one_way(self):
        a, b, c, d = (self.user(proto=2) for _ in range(4))
        for f in (d, b, c):
            self.expect_ack(a, {"msgid": 7, "id": a.id, "friendid": f.id})
        # ordered by when they were added (milliseconds), ties by id
        self.assertEqual(sorted(f["id"] for f in self.listed(a)), sorted([b.id, c.id, d.id]))
        self.assertEqual(self.listed(b), [])

    def test_proto2_list_follows_presence(self):
        a, b, c = self.user(proto=2), self.user(), self.user()
        for f in (b, c):
            self.expect_ack(a, {"msgid": 7, "id": a.id, "friendid": f.id})

        def states():
            return {f["id"]: f["state"] for f in self.listed(a)}
        self.assertEqual(states(), {b.id: "online", c.id: "online"})
        for f in self.listed(a):
            self.assertEqual(set(f), {"id", "name", "state"})
            self.assertEqual(f["name"], {b.id: b.name, c.id: c.name}[f["id"]])
        self.drop(b)  # a dropped client is offline at once
        wait_for(lambda: states() == {b.id: "offline", c.id: "online"}, 5)
        c.c.send({"msgid": 3, "id": c.id})  # logout
        wait_for(lambda: states() == {b.id: "offline", c.id: "offline"}, 5)
        b = self.login(b.id, b.name)
        self.assertEqual(states(), {b.id: "online", c.id: "offline"})
        # the login ack of a protocol-2 session: objects
        a = self.relogin(a)
        self.assertEqual({f["id"]: f["state"] for f in a.ack["friends"]},
                         {b.id: "online", c.id: "offline"})

    def test_proto2_login_ack_has_empty_lists(self):
        a = self.user(proto=2)
        self.assertEqual(a.ack.get("friends"), [])

    # --- bytes --------------------------------------------------------------
    def test_special_names_round_trip(self):
        names = [self.uname(t[:40]) for t in SPECIAL_TEXTS]
        friends = [self.register(n) for n in names]
        a = self.user(proto=2)
        for fid, _ in friends:
            self.expect_ack(a, {"msgid": 7, "id": a.id, "friendid": fid})
        self.assertEqual([f["name"] for f in self.listed(a)], names)
        self.assertEqual([f["name"] for f in a.c.request({"msgid": 13})["friends"]], names)
        for proto in (1, 2):
            a = self.relogin(a, proto)
            got = [loads_maybe(s) for s in a.ack["friends"]]
            self.assertEqual([f["name"] for f in got], names, "proto %d" % proto)
            self.assertEqual({f["state"] for f in got}, {"offline"})


if __name__ == "__main__":
    unittest.main()
