"""ADD_FRIEND_MSG (7), FRIEND_LIST (13) and the "friends" part of the login
ack, against the real chatd, MariaDB and Redis: both protocols, every
error, live presence and byte-exact names; and the friend list cache (rows
added behind the plugin's back in SQL show whether a list came from it):
used at login and for FRIEND_LIST, dropped by ADD_FRIEND on this node and,
through the broadcast, on another, bounded by list_cache_ttl, off at 0."""
import json
import time
import unittest

from harness import wait_for
from test_one2one import SPECIAL_TEXTS, ChatCase, loads_maybe


class FriendHelpers:

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

    def relogin(self, u, proto=None, node=None):
        self.drop(u)
        return self.login(u.id, u.name, proto or u.proto, node=node)


class Friends(FriendHelpers, ChatCase):

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


def ids(friends):
    return [loads_maybe(f)["id"] for f in friends]


class FriendsMutual(FriendHelpers, ChatCase):
    """policy = mutual, the default (issue 14: ADD_FRIEND needed no consent
    and showed anyone's presence): a row is a request; the list and its
    presence show only users who added each other; FRIEND_LIST also returns
    the requests waiting for the user.  The seed's shapes are kept."""

    CONF = {"plugin.friend": {"policy": None}}  # the default

    def requests(self, a):
        r = a.c.request({"msgid": 13, "id": a.id})
        self.assertEqual((r["msgid"], r["req"], r["errno"]), (11, 13, 0), r)
        return r["requests"]

    def test_one_sided_add_is_a_request(self):
        a, b = self.user(proto=2), self.user(proto=2)
        self.assertEqual(self.listed(a), [])  # cached empty
        r = self.expect_ack(a, {"msgid": 7, "id": a.id, "friendid": b.id})
        self.assertIs(r["mutual"], False, r)
        self.assertEqual(self.listed(a), [])  # no presence without consent
        self.assertEqual(self.listed(b), [])
        self.assertEqual(self.requests(b), [{"id": a.id, "name": a.name}])
        self.assertEqual(self.requests(a), [])
        self.assertEqual(a.c.request({"msgid": 7, "id": a.id, "friendid": b.id})["errno"],
                         110)
        # b accepts by adding a: both lists (a's was cached) show the other
        r = self.expect_ack(b, {"msgid": 7, "id": b.id, "friendid": a.id})
        self.assertIs(r["mutual"], True, r)
        self.assertEqual(self.listed(a), [{"id": b.id, "name": b.name, "state": "online"}])
        self.assertEqual(self.listed(b), [{"id": a.id, "name": a.name, "state": "online"}])
        self.assertEqual(self.requests(b), [])
        a = self.relogin(a)
        self.assertEqual([f["id"] for f in a.ack["friends"]], [b.id])

    def test_seed_client_shapes_unchanged(self):
        a, b = self.user(), self.user()
        a.c.send({"msgid": 7, "id": a.id, "friendid": b.id})
        a.c.expect_nothing(0.3)
        self.wait_rows(a.id, 1)
        a = self.relogin(a)
        self.assertNotIn("friends", a.ack)  # empty lists are left out, as the seed
        b.c.send({"msgid": 7, "id": b.id, "friendid": a.id})
        b.c.expect_nothing(0.3)
        self.wait_rows(b.id, 1)
        a = self.relogin(a)
        self.assertEqual(a.ack["friends"], [json.dumps(
            {"id": b.id, "name": b.name, "state": "online"}, separators=(",", ":"))])

    def test_policy_applies_on_sighup(self):
        a, b = self.user(proto=2), self.user()
        self.expect_ack(a, {"msgid": 7, "id": a.id, "friendid": b.id})
        self.assertEqual(self.listed(a), [])
        mark = self.node.log_mark()
        self.node.write_conf({"plugin.friend": {"policy": "open"}})
        self.node.sighup()
        self.node.wait_log("policy=open", since=mark)
        try:
            self.assertEqual([f["id"] for f in self.listed(a)], [b.id])
        finally:
            mark = self.node.log_mark()
            self.node.write_conf({"plugin.friend": {"policy": None}})
            self.node.sighup()
            self.node.wait_log("policy=mutual", since=mark)
        self.assertEqual(self.listed(a), [])


class FriendCache(FriendHelpers, ChatCase):
    # a long TTL: within a test only an invalidation can refresh a list
    CONF = {"plugin.friend": {"list_cache_ttl": 300}}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()  # node A
        cls.b_node = cls.start_node(db=cls.node.db, migrate=False)

    def behind_the_back(self, uid, fid):
        """A friendship row the plugin does not know about."""
        self.stack.sql(self.node.db, "INSERT INTO friends (user_id, friend_id) "
                       "VALUES (%d, %d)" % (uid, fid))

    def token_login(self, u, node=None):
        """Log u in again with the resume token of its last (protocol-2)
        ack, as a reconnecting client does; a new User."""
        token = u.ack["token"]
        self.drop(u)
        c = self.client(2, node)

        def attempt():
            ack = c.request({"msgid": 1, "id": u.id, "token": token})
            return None if ack.get("errno") == 2 else ack
        ack = wait_for(attempt, 10, interval=0.05, what="token login of %d" % u.id)
        self.assertEqual((ack.get("msgid"), ack.get("errno")), (2, 0), ack)
        self.assertIn("friends", ack)
        return type(u)(c, u.id, u.name, ack, 2)

    def test_login_and_list_use_the_cache_until_add_friend(self):
        (x, _), (y, _), (z, _) = self.register(), self.register(), self.register()
        u = self.user(proto=2)
        self.expect_ack(u, {"msgid": 7, "id": u.id, "friendid": x})
        self.assertEqual(ids(self.listed(u)), [x])  # read once, cached
        self.behind_the_back(u.id, y)
        self.assertEqual(ids(self.listed(u)), [x], "FRIEND_LIST must use the cache")
        u = self.token_login(u)
        self.assertEqual(ids(u.ack["friends"]), [x], "the login ack must use the cache")
        self.assertEqual(u.ack["friends"][0]["state"], "offline")  # presence is live
        # an ADD_FRIEND drops the list: every row is read again
        self.expect_ack(u, {"msgid": 7, "id": u.id, "friendid": z})
        self.assertEqual(ids(self.listed(u)), [x, y, z])
        u = self.token_login(u)
        self.assertEqual(ids(u.ack["friends"]), [x, y, z])
        # and the legacy shape from the same cached list
        u = self.relogin(u, proto=1)
        self.assertEqual(ids(u.ack["friends"]), [x, y, z])
        self.assertIsInstance(u.ack["friends"][0], str)

    def test_add_friend_on_another_node_drops_the_cached_list(self):
        (x, _), (y, _) = self.register(), self.register()
        u = self.user(proto=2, node=self.node)  # A caches the empty list
        self.assertEqual(u.ack["friends"], [])
        u = self.token_login(u, node=self.node)
        self.assertEqual(u.ack["friends"], [])
        self.drop(u)
        ub = self.login(u.id, u.name, proto=2, node=self.b_node)
        self.expect_ack(ub, {"msgid": 7, "id": ub.id, "friendid": x})
        self.drop(ub)
        # TTL 300 s: only the broadcast from B can have dropped A's list
        ua = self.token_login(u, node=self.node)
        self.assertEqual(ids(ua.ack["friends"]), [x])
        self.drop(ua)
        # and A's own ADD_FRIEND reaches B the same way
        ub = self.login(u.id, u.name, proto=2, node=self.b_node)  # B caches [x]
        self.assertEqual(ids(ub.ack["friends"]), [x])
        self.drop(ub)
        ua = self.login(u.id, u.name, proto=2, node=self.node)
        self.expect_ack(ua, {"msgid": 7, "id": ua.id, "friendid": y})
        self.drop(ua)
        ub = self.login(u.id, u.name, proto=2, node=self.b_node)
        self.assertEqual(ids(ub.ack["friends"]), [x, y])

    def test_ttl_bounds_a_cached_list(self):
        node = self.start_node(conf={"plugin.friend": {"list_cache_ttl": 1}},
                               db=self.node.db, migrate=False)
        (x, _) = self.register(node=node)
        u = self.user(proto=2, node=node)
        read = time.monotonic()
        self.assertEqual(self.listed(u), [])
        self.behind_the_back(u.id, x)
        got = ids(self.listed(u))
        if time.monotonic() - read < 0.8:  # surely younger than the TTL
            self.assertEqual(got, [], "a list younger than list_cache_ttl is cached")
        time.sleep(max(0.0, read + 1.5 - time.monotonic()))
        self.assertEqual(ids(self.listed(u)), [x], "list_cache_ttl = 1: read again")
        u = self.relogin(u, node=node)
        self.assertEqual(ids(u.ack["friends"]), [x])

    def test_ttl_zero_turns_the_cache_off(self):
        node = self.start_node(conf={"plugin.friend": {"list_cache_ttl": 0}},
                               db=self.node.db, migrate=False)
        (x, _), (y, _) = self.register(node=node), self.register(node=node)
        u = self.user(proto=2, node=node)
        self.assertEqual(u.ack["friends"], [])
        self.assertEqual(self.listed(u), [])
        self.behind_the_back(u.id, x)
        self.assertEqual(ids(self.listed(u)), [x])
        u = self.relogin(u, node=node)
        self.assertEqual(ids(u.ack["friends"]), [x])
        self.behind_the_back(u.id, y)
        u = self.relogin(u, node=node)
        self.assertEqual(ids(u.ack["friends"]), [x, y])

    def test_list_cache_max_and_settings_on_sighup(self):
        node = self.start_node(conf={"plugin.friend": {"list_cache_max": 2}},
                               db=self.node.db, migrate=False)
        (x, _), (y, _) = self.register(node=node), self.register(node=node)
        mark = node.log_mark()
        u0, _, u = (self.user(proto=2, node=node) for _ in range(3))
        node.wait_log("friend list cache full", since=mark)
        # the third list found the cache full of fresh lists: all were dropped
        self.behind_the_back(u0.id, x)
        self.assertEqual(ids(self.listed(u0)), [x])
        # u's list is cached; list_cache_ttl = 0 on SIGHUP turns the cache off
        self.behind_the_back(u.id, x)
        self.assertEqual(self.listed(u), [])

        def reconfigure(ttl):
            node.write_conf({"plugin.friend": {"list_cache_ttl": ttl}})
            mark = node.log_mark()
            node.sighup()
            node.wait_log("plugin friend: settings changed", since=mark)
        reconfigure(0)
        self.assertEqual(ids(self.listed(u)), [x])
        reconfigure(300)  # and on again
        self.assertEqual(ids(self.listed(u)), [x])
        self.behind_the_back(u.id, y)
        self.assertEqual(ids(self.listed(u)), [x])



if __name__ == "__main__":
    unittest.main()
