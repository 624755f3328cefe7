"""CREATE_GROUP_MSG (8), ADD_GROUP_MSG (9), GROUP_CHAT_MSG (10), GROUP_LIST
(14) and the "groups" part of the login ack, against the real chatd,
MariaDB and Redis: both protocols, every error and limit, offline copies,
the member cache, the per-user list cache, live presence and byte-exact
names and messages."""
import json
import time
import unittest

from harness import Stack, wait_for
from test_one2one import (SPECIAL_TEXTS, TIME, ChatCase, User, is_msg, loads_maybe,
                          recv_raw_line)

COMPACT = (",", ":")


class GroupCase(ChatCase):
    """Helpers for group tests."""

    def create(self, u, name=None, desc="a group"):
        """Create a group as u; its id (protocol 2 from the ack, legacy from
        the database once the silent request is done)."""
        name = name if name is not None else self.uname("g")
        req = {"msgid": 8, "id": u.id, "groupname": name, "groupdesc": desc}
        if u.proto == 2:
            r = self.expect_ack(u, req)
            self.assertIsInstance(r.get("groupid"), int, r)
            return r["groupid"]
        u.c.send(req)
        return int(wait_for(lambda: self.gid_of(name), 10, what="group %r" % name))

    def gid_of(self, name):
        rows = self.stack.sql(self.node.db, "SELECT id FROM chat_groups WHERE name = 0x%s"
                              % name.encode().hex())
        return rows[0][0] if rows else None

    def is_member(self, gid, uid):
        return self.stack.sql(self.node.db, "SELECT COUNT(*) FROM group_members WHERE "
                              "group_id = %d AND user_id = %d" % (gid, uid))[0][0] == "1"

    def join(self, u, gid):
        req = {"msgid": 9, "id": u.id, "groupid": gid}
        if u.proto == 2:
            r = self.expect_ack(u, req)
            self.assertEqual(r.get("groupid"), gid, r)
            return
        u.c.send(req)
        wait_for(lambda: self.is_member(gid, u.id), 10, what="membership")

    def group(self, n, protos=None):
        """A group of n users (the first is the creator)."""
        protos = protos or [2] * n
        users = [self.user(proto=p) for p in protos]
        gid = self.create(users[0])
        for u in users[1:]:
            self.join(u, gid)
        return gid, users

    def listed(self, u):
        r = u.c.request({"msgid": 14, "id": u.id})
        self.assertEqual((r["msgid"], r["req"], r["errno"]), (11, 14, 0), r)
        return r["groups"]

    def recv_group(self, u, timeout=5):
        return u.c.recv_until(is_msg(10), timeout)

    def relogin(self, u, proto=None):
        self.drop(u)
        return self.login(u.id, u.name, proto or u.proto)

    def concurrent_joins(self, gid, users):
        """Send every join before reading any answer; the errnos."""
        for u in users:
            u.c.send({"msgid": 9, "id": u.id, "groupid": gid, "seq": 9000 + u.id})
        out = []
        for u in users:
            r = u.c.recv_until(lambda m: m.get("seq") == 9000 + u.id, 10)
            self.assertEqual((r["msgid"], r["req"]), (11, 9), r)
            out.append(r["errno"])
        return out


class Groups(GroupCase):
    CONF = {"plugin.group": {"msg_max": 64, "cache_ttl": 300}}

    # --- create / join ----------------------------------------------------
    def test_create_proto2_returns_id_creator_listed(self):
        a = self.user(proto=2)
        name = self.uname("grp")
        gid = self.create(a, name, "desc")
        self.assertEqual(str(gid), self.gid_of(name))
        self.assertEqual(self.listed(a), [{
            "id": gid, "groupname": name, "groupdesc": "desc",
            "users": [{"id": a.id, "name": a.name, "role": "creator", "state": "online"}]}])

    def test_legacy_create_join_silent_listed_in_seed_shape(self):
        a, b = self.user(), self.user()
        name = self.uname("legacy")
        gid = self.create(a, name, "the desc")
        a.c.expect_nothing(0.2)
        self.join(b, gid)
        b.c.expect_nothing(0.2)
        self.drop(b)
        a = self.relogin(a)
        groups = a.ack["groups"]
        self.assertEqual(len(groups), 1)
        self.assertIsInstance(groups[0], str)
        g = json.loads(groups[0])
        self.assertEqual(list(g), ["groupdesc", "groupname", "id", "users"], "seed key order")
        self.assertEqual((g["id"], g["groupname"], g["groupdesc"]), (gid, name, "the desc"))
        self.assertTrue(all(isinstance(s, str) for s in g["users"]))
        want = [{"id": a.id, "name": a.name, "role": "creator", "state": "online"},
                {"id": b.id, "name": b.name, "role": "normal", "state": "offline"}]
        self.assertEqual(g["users"], [json.dumps(w, separators=COMPACT) for w in want])

    def test_create_errors(self):
        a = self.user(proto=2)
        taken = self.uname("taken")
        self.create(a, taken)
        self.create(a, taken.upper())  # names are bytes: another name
        cases = [
            ({"groupname": taken, "groupdesc": "x"}, 110),
            ({"groupdesc": "x"}, 104),
            ({"groupname": "", "groupdesc": "x"}, 104),
            ({"groupname": 12, "groupdesc": "x"}, 104),
            ({"groupname": None, "groupdesc": "x"}, 104),
            ({"groupname": self.uname("d"), "groupdesc": 5}, 104),
            ({"groupname": "n" * 65, "groupdesc": "x"}, 105),
            ({"groupname": self.uname("long"), "groupdesc": "d" * 513}, 105),
        ]
        for fields, errno_ in cases:
            with self.subTest(fields=fields):
                r = self.expect_ack(a, dict({"msgid": 8, "id": a.id}, **fields), errno_)
                self.assertNotIn("groupid", r)
        r = self.expect_ack(a, {"msgid": 8, "id": a.id, "groupname": self.uname("nd")})
        self.assertIsInstance(r["groupid"], int, "groupdesc is optional")
        other = self.user(proto=2)
        self.expect_ack(other, {"msgid": 8, "id": a.id, "groupname": "x"}, 107)
        c = self.client(proto=2)
        self.assertEqual(c.request({"msgid": 8, "groupname": "y"})["errno"], 106)

    def test_join_errors(self):
        a, b = self.user(proto=2), self.user(proto=2)
        gid = self.create(a)
        self.join(b, gid)
        cases = [({"groupid": gid}, 110),            # already a member
                 ({"groupid": 99999999}, 108),
                 ({"groupid": str(gid)}, 104),
                 ({"groupid": gid + 0.5}, 104),
                 ({}, 104)]
        for fields, errno_ in cases:
            with self.subTest(fields=fields):
                self.expect_ack(b, dict({"msgid": 9, "id": b.id}, **fields), errno_)
        self.expect_ack(a, {"msgid": 9, "id": a.id, "groupid": gid}, 110)  # the creator
        self.expect_ack(a, {"msgid": 9, "id": b.id, "groupid": gid}, 107)
        c = self.client(proto=2)
        self.assertEqual(c.request({"msgid": 9, "groupid": gid})["errno"], 106)

    def test_legacy_errors_are_silent(self):
        a, b = self.user(), self.user()
        taken = self.uname("t")
        gid = self.create(a, taken)
        before = self.stack.sql(self.node.db, "SELECT COUNT(*) FROM group_members")
        for req in ({"msgid": 8, "id": a.id, "groupname": taken},
                    {"msgid": 8, "id": a.id, "groupname": ""},
                    {"msgid": 9, "id": a.id, "groupid": gid},
                    {"msgid": 9, "id": b.id, "groupid": 99999999},
                    {"msgid": 9, "id": a.id, "groupid": "x"},
                    {"msgid": 10, "id": b.id, "groupid": gid, "msg": "not a member"},
                    {"msgid": 10, "id": b.id, "groupid": 99999999, "msg": "no group"},
                    {"msgid": 10, "id": a.id, "groupid": gid},
                    {"msgid": 14, "id": a.id}):
            (b if req["id"] == b.id else a).c.send(req)
        a.c.expect_nothing(0.5)
        b.c.expect_nothing(0.1)
        self.assertFalse(a.c.eof or b.c.eof)
        self.assertEqual(self.stack.sql(self.node.db, "SELECT COUNT(*) FROM group_members"),
                         before)

    def test_concurrent_joins_all_succeed(self):
        a = self.user(proto=2)
        gid = self.create(a)
        users = [self.user(proto=2) for _ in range(8)]
        self.assertEqual(self.concurrent_joins(gid, users), [0] * 8)
        self.assertEqual(len(self.listed(a)[0]["users"]), 9)

    # --- chat ---------------------------------------------------------------
    def test_chat_reaches_every_member_but_the_sender(self):
        gid, (a, b, c) = self.group(3, protos=[2, 1, 2])
        self.expect_ack(a, a.group_msg(gid, "hello all"))
        want = {"msgid": 10, "id": a.id, "name": a.name, "groupid": gid,
                "msg": "hello all", "time": TIME}
        self.assertEqual(self.recv_group(b), want)
        self.assertEqual(self.recv_group(c), want)
        a.c.expect_nothing(0.3)
        sent = b.group_msg(gid, "legacy here")
        b.c.send(sent)
        self.assertEqual(recv_raw_line(a.c), json.dumps(sent, separators=COMPACT).encode(),
                         "a seed frame is forwarded as is")
        self.assertEqual(self.recv_group(c)["msg"], "legacy here")
        b.c.expect_nothing(0.3)

    def test_chat_errors(self):
        gid, (a, b) = self.group(2)
        outsider = self.user(proto=2)
        base = a.group_msg(gid, "x")
        no_msg = dict(base)
        del no_msg["msg"]
        no_gid = dict(base)
        del no_gid["groupid"]
        for req, errno_ in [(dict(base, groupid=99999999), 108),
                            (no_gid, 104), (dict(base, groupid=str(gid)), 104),
                            (dict(base, groupid=1.5), 104),
                            (no_msg, 104), (dict(base, msg=7), 104),
                            (dict(base, msg="m" * 65), 105),
                            (dict(base, id=b.id), 107)]:
            with self.subTest(req=req):
                self.expect_ack(a, req, errno_)
        self.expect_ack(outsider, outsider.group_msg(gid, "let me in"), 109)
        self.expect_ack(a, a.group_msg(gid, "m" * 64))
        self.assertEqual(self.recv_group(b)["msg"], "m" * 64)
        b.c.expect_nothing(0.3)
        c = self.client(proto=2)
        self.assertEqual(c.request({"msgid": 10, "groupid": gid, "msg": "x"})["errno"], 106)

    def test_spoofed_sender_replaced(self):
        gid, (a, b) = self.group(2, protos=[1, 1])
        a.c.send(a.group_msg(gid, "spoof", name="mallory"))
        got = self.recv_group(b)
        self.assertEqual((got["id"], got["name"], got["msg"]), (a.id, a.name, "spoof"))
        a.c.send({"msgid": 10, "groupid": gid, "msg": "no sender fields"})
        got = self.recv_group(b)
        self.assertEqual((got["id"], got["name"]), (a.id, a.name))
        frame = ('{"msgid":10,"id":%d,"name":%s,"groupid":%d,"msg":"dup","time":"%s",'
                 '"name":"mallory"}' % (a.id, json.dumps(a.name), gid, TIME))
        a.c.send_raw(frame.encode() + b"\0")
        # a key twice refuses the frame whole: the next message arrives
        a.c.send(a.group_msg(gid, "after"))
        got = json.loads(recv_raw_line(b.c))
        self.assertEqual((got["name"], got["msg"]), (a.name, "after"))

    def test_offline_members_get_copies_sender_none(self):
        gid, (a, b, c) = self.group(3, protos=[2, 2, 2])
        self.drop(b)
        self.drop(c)
        texts = ["one", "two", "three"]
        for t in texts:
            self.expect_ack(a, a.group_msg(gid, t))
        for u in (b, c):
            u2 = self.login(u.id, u.name)
            got = [loads_maybe(s) for s in u2.ack.get("offlinemsg", [])]
            self.assertEqual([m["msg"] for m in got], texts)
            for m in got:
                self.assertEqual((m["msgid"], m["groupid"], m["id"], m["name"]),
                                 (10, gid, a.id, a.name))
        a = self.relogin(a)
        self.assertFalse(a.ack.get("offlinemsg"), "the sender gets no copy of her own")

    def test_new_member_gets_the_next_message(self):
        gid, (a, b) = self.group(2)
        self.expect_ack(a, a.group_msg(gid, "before"))  # the cache is warm now
        self.assertEqual(self.recv_group(b)["msg"], "before")
        c = self.user(proto=2)
        self.expect_ack(c, c.group_msg(gid, "not yet"), 109)
        self.join(c, gid)
        self.expect_ack(a, a.group_msg(gid, "after"))
        self.assertEqual(self.recv_group(c)["msg"], "after")
        self.expect_ack(c, c.group_msg(gid, "I am in"))
        self.assertEqual(self.recv_group(a)["msg"], "I am in")

    def test_order_kept_while_members_load(self):
        gid, (a, b) = self.group(2, protos=[1, 1])
        for n in range(200):
            a.c.send(a.group_msg(gid, "n%d" % n))
        self.assertEqual([self.recv_group(b)["msg"] for _ in range(200)],
                         ["n%d" % n for n in range(200)])

    # --- lists ----------------------------------------------------------------
    def test_lists_follow_presence(self):
        gid, (a, b, c) = self.group(3, protos=[2, 1, 1])
        gid2 = self.create(b)

        def states():
            return {g["id"]: {u["id"]: (u["state"], u["role"]) for u in g["users"]}
                    for g in self.listed(a)}
        self.assertEqual(states(), {gid: {a.id: ("online", "creator"),
                                          b.id: ("online", "normal"),
                                          c.id: ("online", "normal")}})
        self.join(a, gid2)
        self.drop(b)
        wait_for(lambda: states() == {
            gid: {a.id: ("online", "creator"), b.id: ("offline", "normal"),
                  c.id: ("online", "normal")},
            gid2: {b.id: ("offline", "creator"), a.id: ("online", "normal")}}, 5)
        self.assertEqual([g["id"] for g in self.listed(a)], [gid, gid2], "in join order")
        b = self.login(b.id, b.name)
        wait_for(lambda: states()[gid2][b.id] == ("online", "creator"), 5)
        a = self.relogin(a)  # protocol 2 login ack: objects
        self.assertEqual([g["id"] for g in a.ack["groups"]], [gid, gid2])
        self.assertEqual(a.ack["groups"][0]["users"][1],
                         {"id": b.id, "name": b.name, "role": "normal", "state": "online"})
        legacy = self.relogin(c, 1)
        g = [json.loads(s) for s in legacy.ack["groups"]]
        self.assertEqual([x["id"] for x in g], [gid])
        self.assertEqual([json.loads(u)["state"] for u in g[0]["users"]],
                         ["online", "online", "online"])

    # --- bytes ----------------------------------------------------------------
    def test_special_bytes_round_trip(self):
        a = self.user(proto=2)
        member_name = self.uname("m\u0000'\"\U0001F600")
        mid, _ = self.register(member_name)
        made = []
        for i, text in enumerate(SPECIAL_TEXTS):
            name = ("%d " % i) + text[:50]
            desc = text * 3
            gid = self.create(a, name, desc)
            made.append((gid, name, desc))
        m = self.login(mid, member_name, proto=1)
        for gid, _, _ in made:
            self.join(m, gid)
        listed = self.listed(a)
        self.assertEqual([(g["id"], g["groupname"], g["groupdesc"]) for g in listed], made)
        self.assertEqual(listed[0]["users"][1]["name"], member_name)
        gid = made[0][0]
        for text in SPECIAL_TEXTS:
            self.expect_ack(a, a.group_msg(gid, text))
            got = self.recv_group(m)
            self.assertEqual((got["msg"], got["name"]), (text, a.name))
        m = self.relogin(m)
        # a legacy ack holds what fits in the seed client's one read (1,023
        # bytes): the first groups, byte for byte; the rest are trimmed
        g = [json.loads(s) for s in m.ack["groups"]]
        self.assertTrue(g)
        self.assertEqual([(x["id"], x["groupname"], x["groupdesc"]) for x in g],
                         made[:len(g)])
        self.assertEqual(json.loads(g[0]["users"][1])["name"], member_name)


class GroupsInvite(GroupCase):
    """join = invite, the default (issue 14: anyone could join any group by
    its sequential id): joining by id alone is refused (109, legacy silent,
    the same for an unknown group); a member adds a user with "userid"."""

    CONF = {"plugin.group": {"join": None}}  # the default

    def add_user(self, u, gid, uid, errno_=0):
        return self.expect_ack(u, {"msgid": 9, "id": u.id, "groupid": gid,
                                   "userid": uid}, errno_)

    def test_join_by_id_refused(self):
        a, b, c = self.user(proto=2), self.user(proto=2), self.user()
        gid = self.create(a)
        for g in (gid, gid + 100000):  # the reply does not say whether it exists
            r = self.expect_ack(b, {"msgid": 9, "id": b.id, "groupid": g}, 109)
            self.assertEqual(r["errmsg"], "invite only: a member of the group must add you")
        c.c.send({"msgid": 9, "id": c.id, "groupid": gid})
        c.c.expect_nothing(0.3)  # legacy: silent, as the seed
        self.assertFalse(self.is_member(gid, b.id))
        self.assertFalse(self.is_member(gid, c.id))

    def test_member_adds_users(self):
        a, b, c, d = self.user(proto=2), self.user(proto=2), self.user(), self.user(proto=2)
        gid = self.create(a)
        r = self.add_user(a, gid, b.id)
        self.assertEqual((r["groupid"], r["userid"]), (gid, b.id), r)
        self.assertTrue(self.is_member(gid, b.id))
        self.add_user(b, gid, c.id)  # any member may add
        self.assertTrue(self.is_member(gid, c.id))
        self.add_user(a, gid, c.id, 110)
        self.assertEqual(self.add_user(a, gid, 99999999, 108)["errmsg"], "unknown user")
        self.assertEqual(self.add_user(d, gid, d.id + 1, 109)["errmsg"],
                         "only a member can add users to the group")
        self.add_user(a, gid + 100000, d.id, 108)
        self.add_user(a, gid, "x", 104)
        # the added users chat with the group at once
        a.c.send({"msgid": 10, "id": a.id, "name": a.name, "groupid": gid,
                  "msg": "welcome", "time": TIME})
        self.assertEqual(self.recv_group(b)["msg"], "welcome")
        self.assertEqual(self.recv_group(c)["msg"], "welcome")
        # a legacy member sees the group in the seed's shape at its next login
        c = self.relogin(c)
        self.assertEqual([json.loads(g)["id"] for g in c.ack["groups"]], [gid])


class GroupLimits(GroupCase):
    CONF = {"plugin.group": {"name_max": 8, "desc_max": 10, "group_size_max": 3,
                             "groups_per_user_max": 2}}

    def test_name_and_desc_limits_in_bytes(self):
        a = self.user(proto=2)
        self.create(a, "abcdefgh", "0123456789")
        self.create(a, "\u00e9" * 4, "")
        for fields, errno_ in [({"groupname": "abcdefghi"}, 105),
                               ({"groupname": "\u00e9" * 5}, 105),
                               ({"groupname": "ok", "groupdesc": "01234567890"}, 105)]:
            with self.subTest(fields=fields):
                r = self.expect_ack(a, dict({"msgid": 8, "id": a.id}, **fields), errno_)
                self.assertIn("too long", r["errmsg"])

    def test_groups_per_user(self):
        a, b = self.user(proto=2), self.user(proto=2)
        g1, g2 = self.create(a, self.uname("p")), self.create(a, self.uname("p"))
        r = self.expect_ack(a, {"msgid": 8, "id": a.id, "groupname": self.uname("p")}, 111)
        self.assertIn("too many groups", r["errmsg"])
        g3, g4 = self.create(b, self.uname("q")), self.create(b, self.uname("q"))
        r = self.expect_ack(b, {"msgid": 9, "id": b.id, "groupid": g1}, 111)
        self.assertIn("too many groups", r["errmsg"])
        self.expect_ack(a, {"msgid": 9, "id": a.id, "groupid": g3}, 111)
        for g in (g1, g2, g3, g4):
            self.assertEqual(len(self.listed(a if g in (g1, g2) else b)), 2)

    def test_group_full(self):
        gid, users = self.group(3)
        d = self.user(proto=2)
        r = self.expect_ack(d, {"msgid": 9, "id": d.id, "groupid": gid}, 111)
        self.assertIn("full", r["errmsg"])
        # already a member wins over full
        self.expect_ack(users[1], {"msgid": 9, "id": users[1].id, "groupid": gid}, 110)

    def test_concurrent_joins_respect_the_size(self):
        a = self.user(proto=2)
        gid = self.create(a, self.uname("c"))
        errnos = self.concurrent_joins(gid, [self.user(proto=2) for _ in range(5)])
        self.assertEqual(sorted(errnos), [0, 0, 111, 111, 111])
        self.assertEqual(len(self.listed(a)[0]["users"]), 3)

    def test_legacy_limits_are_silent(self):
        a = self.user()
        self.create(a, "l1")
        self.create(a, "l2")
        a.c.send({"msgid": 8, "id": a.id, "groupname": "l3"})
        a.c.send({"msgid": 8, "id": a.id, "groupname": "toolongname"})
        a.c.expect_nothing(0.5)
        self.assertIsNone(self.gid_of("l3"))
        self.assertIsNone(self.gid_of("toolongname"))


def shape(groups):
    """A group list (login ack or GROUP_LIST, either protocol) without the
    live part: [(group id, [(member id, role), ...]), ...] in list order."""
    out = []
    for g in map(loads_maybe, groups):
        out.append((g["id"], [(u["id"], u["role"]) for u in map(loads_maybe, g["users"])]))
    return out


class ListCacheCase(GroupCase):
    """Helpers for the group-list cache tests."""

    def behind_the_back(self, gid, uid):
        """Make uid a member of gid in SQL only: no node hears of it."""
        self.stack.sql(self.node.db, "INSERT INTO group_members (group_id, user_id) "
                       "VALUES (%d, %d)" % (gid, uid))

    def token_relogin(self, u, node=None):
        """Reconnect and log in again with the resume token of u's last
        login ack (protocol 2), as a returning client does."""
        self.drop(u)
        c = self.client(2, node)

        def attempt():
            ack = c.request({"msgid": 1, "id": u.id, "token": u.ack["token"]})
            return None if ack.get("errno") == 2 else ack  # still online: retry
        ack = wait_for(attempt, 10, interval=0.05, what="token login of %d" % u.id)
        self.assertEqual((ack.get("msgid"), ack.get("errno")), (2, 0), ack)
        return User(c, u.id, u.name, ack, 2)


class GroupListCache(ListCacheCase):
    """Lists come from the cache until a membership changes: a long TTL, so
    only an invalidation can make a change visible."""
    CONF = {"plugin.group": {"list_cache_ttl": 300, "cache_ttl": 300}}

    def test_relogin_served_from_cache_until_a_member_joins(self):
        gid, (u, w) = self.group(2)
        x = self.user(proto=2)
        other = self.create(x)  # a group u is not in
        u = self.token_relogin(u)  # u's list is read and cached
        before = [(gid, [(u.id, "creator"), (w.id, "normal")])]
        self.assertEqual(shape(u.ack["groups"]), before)
        self.behind_the_back(other, u.id)
        u = self.token_relogin(u)
        self.assertEqual(shape(u.ack["groups"]), before, "the login ack is cached")
        self.assertEqual(shape(self.listed(u)), before, "so is GROUP_LIST")
        legacy = self.relogin(u, 1)
        self.assertEqual(shape(legacy.ack["groups"]), before, "either protocol")
        self.assertTrue(all(isinstance(g, str) for g in legacy.ack["groups"]))
        u = self.relogin(legacy, 2)
        v = self.user(proto=2)
        self.join(v, gid)  # a join to one of u's groups drops u's list
        after = [(gid, [(u.id, "creator"), (w.id, "normal"), (v.id, "normal")]),
                 (other, [(x.id, "creator"), (u.id, "normal")])]
        self.assertEqual(shape(self.listed(u)), after)
        u = self.token_relogin(u)
        self.assertEqual(shape(u.ack["groups"]), after)
        states = {m["id"]: m["state"] for m in u.ack["groups"][0]["users"]}
        self.assertEqual(states, {u.id: "online", w.id: "online", v.id: "online"})
        self.drop(w)  # presence is not cached
        wait_for(lambda: {m["id"]: m["state"] for m in self.listed(u)[0]["users"]}[w.id]
                 == "offline", 5, what="w offline in the list")

    def test_empty_list_cached_until_the_user_creates_or_joins(self):
        u = self.user(proto=2)
        x = self.user(proto=2)
        g1, g2 = self.create(x), self.create(x)
        self.assertEqual(self.listed(u), [])  # read and cached: empty
        self.behind_the_back(g1, u.id)
        self.assertEqual(self.listed(u), [], "an empty list is cached too")
        mine = self.create(u)  # the creator's own list is dropped
        self.assertEqual([g for g, _ in shape(self.listed(u))], [g1, mine])
        self.behind_the_back(g2, u.id)
        self.assertEqual([g for g, _ in shape(self.listed(u))], [g1, mine])
        y = self.user(proto=2)
        g3 = self.create(y)
        self.join(u, g3)  # the joiner's own list is dropped
        self.assertEqual([g for g, _ in shape(self.listed(u))], [g1, mine, g2, g3])

    def test_only_the_lists_holding_the_group_are_dropped(self):
        owner = self.user(proto=2)
        g = [self.create(owner) for _ in range(3)]
        users = [self.user(proto=2) for _ in range(6)]
        member_of = [[0, 1], [1, 2], [0, 2], [1], [], [0, 1, 2]]
        for u, ks in zip(users, member_of):
            for k in ks:
                self.join(u, g[k])
        extra = self.create(owner)
        for u, ks in zip(users, member_of):  # read and cached
            self.assertEqual([gid for gid, _ in shape(self.listed(u))], [g[k] for k in ks])
        for u in users:
            self.behind_the_back(extra, u.id)
        self.join(self.user(proto=2), g[1])
        for i, (u, ks) in enumerate(zip(users, member_of)):
            want = [g[k] for k in ks] + ([extra] if 1 in ks else [])  # reloaded
            self.assertEqual([gid for gid, _ in shape(self.listed(u))], want, "user %d" % i)
        self.join(self.user(proto=2), g[0])  # the index still right after removals
        for i, (u, ks) in enumerate(zip(users, member_of)):
            want = [g[k] for k in ks] + ([extra] if set(ks) & {0, 1} else [])
            self.assertEqual([gid for gid, _ in shape(self.listed(u))], want, "user %d" % i)

    def test_old_broadcast_format_still_invalidates(self):
        """An instance from before the list cache broadcasts "inv <gid>"
        only (a hot reload on one node may leave such a peer)."""
        gid, (u, w) = self.group(2)
        y = self.user(proto=2)
        self.assertEqual(len(self.listed(u)[0]["users"]), 2)  # cached
        self.behind_the_back(gid, y.id)
        self.assertEqual(len(self.listed(u)[0]["users"]), 2)
        self.stack.redis_cli("PUBLISH", "chatd:all", "B old-node\ngroup\ninv %d" % gid)
        wait_for(lambda: len(self.listed(u)[0]["users"]) == 3, 5, what="the old-format "
                 "invalidation")


class GroupListCacheCluster(ListCacheCase):
    """Two nodes on one database: a change made on B reaches the list that
    A has cached, through the broadcast only (long TTLs)."""
    CONF = {"plugin.group": {"list_cache_ttl": 300, "cache_ttl": 300}}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()  # node A
        cls.a_node = cls.node
        cls.b_node = cls.start_node(db=cls.a_node.db, migrate=False)

    def test_changes_on_another_node_reach_the_cached_list(self):
        a_node, b_node = self.a_node, self.b_node
        u = self.user(proto=2, node=a_node)
        gid = self.create(u)
        u = self.token_relogin(u, a_node)  # u's list cached on A
        self.assertEqual(shape(u.ack["groups"]), [(gid, [(u.id, "creator")])])
        # someone joins u's group on B: A drops the lists holding the group
        v = self.user(proto=2, node=b_node)
        self.join(v, gid)
        want = [(gid, [(u.id, "creator"), (v.id, "normal")])]
        wait_for(lambda: shape(self.listed(u)) == want, 5, what="B's join seen on A")
        u = self.token_relogin(u, a_node)  # cached on A again, with v
        self.assertEqual(shape(u.ack["groups"]), want)
        # u joins a new group on B: A drops u's own list (not in that group yet)
        x = self.user(proto=2, node=b_node)
        g2 = self.create(x)
        self.drop(u)
        on_b = self.login(u.id, u.name, 2, node=b_node)
        self.join(on_b, g2)
        self.drop(on_b)
        u = self.login(u.id, u.name, 2, node=a_node)
        self.assertEqual(shape(u.ack["groups"]),
                         want + [(g2, [(x.id, "creator"), (u.id, "normal")])])


class GroupListCacheTTL(ListCacheCase):
    """A change no node heard of (a lost broadcast) shows once the entry
    is list_cache_ttl old."""
    CONF = {"plugin.group": {"list_cache_ttl": 1}}

    def test_row_behind_the_back_seen_after_the_ttl(self):
        gid, (u, w) = self.group(2)
        other = self.create(w)
        start = time.monotonic()
        self.assertEqual([g for g, _ in shape(self.listed(u))], [gid])  # cached now
        self.behind_the_back(other, u.id)
        self.assertEqual([g for g, _ in shape(self.listed(u))], [gid])
        wait_for(lambda: [g for g, _ in shape(self.listed(u))] == [gid, other], 5,
                 what="the row after the TTL")
        self.assertGreaterEqual(time.monotonic() - start, 0.9)


class GroupListCacheFull(ListCacheCase):
    """list_cache_max entries: an insert into a full cache of unexpired
    entries drops the whole cache."""
    CONF = {"plugin.group": {"list_cache_ttl": 300, "list_cache_max": 3}}

    def test_full_cache_is_dropped(self):
        owner = self.user(proto=2)
        gid, other = self.create(owner), self.create(owner)
        users = [self.user(proto=2) for _ in range(4)]
        for u in users:
            self.join(u, gid)
        mark = self.node.log_mark()
        for u in users[:3]:
            self.listed(u)  # the cache holds 3
        for u in users:
            self.behind_the_back(other, u.id)
        self.assertEqual([g for g, _ in shape(self.listed(users[0]))], [gid], "cached")
        self.assertEqual([g for g, _ in shape(self.listed(users[3]))], [gid, other])
        self.node.wait_log("group list cache full (3 entries", since=mark)
        self.assertEqual([g for g, _ in shape(self.listed(users[0]))], [gid, other],
                         "dropped with the rest")


class GroupListCacheOff(ListCacheCase):
    """list_cache_ttl = 0: every list is read from the database; SIGHUP
    turns the cache on and off."""
    CONF = {"plugin.group": {"list_cache_ttl": 0}}

    def test_rows_behind_the_back_seen_at_once(self):
        gid, (u, w) = self.group(2)
        g2, g3 = self.create(w), self.create(w)
        self.assertEqual([g for g, _ in shape(self.listed(u))], [gid])
        u = self.token_relogin(u)
        self.behind_the_back(g2, u.id)
        self.assertEqual([g for g, _ in shape(self.listed(u))], [gid, g2])
        u = self.token_relogin(u)
        self.assertEqual([g for g, _ in shape(u.ack["groups"])], [gid, g2])
        # on by SIGHUP: cached; off again: the cache is dropped
        for ttl, want in ((300, [gid, g2]), (0, [gid, g2, g3])):
            mark = self.node.log_mark()
            self.node.write_conf({"plugin.group": {"list_cache_ttl": ttl}})
            self.node.sighup()
            self.node.wait_log("plugin group: settings changed", since=mark)
            self.listed(u)
            if ttl:
                self.behind_the_back(g3, u.id)
            self.assertEqual([g for g, _ in shape(self.listed(u))], want)


if __name__ == "__main__":
    unittest.main()


class GroupDisabled(GroupCase):
    """Without the group plugin its msgids and its login part are gone, and
    nothing else breaks."""

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.class_nodes = []
        cls.node = cls.start_node(plugins=("login", "friend", "one2one", "offline"))

    def test_msgids_and_part_gone_rest_works(self):
        a, b = self.user(proto=2), self.user()
        self.assertNotIn("groups", a.ack)
        self.assertEqual(a.ack.get("friends"), [])
        for msgid in (8, 9, 10, 14):
            r = a.c.request({"msgid": msgid, "id": a.id, "groupid": 1, "groupname": "x",
                             "msg": "x"})
            self.assertEqual((r["msgid"], r["req"], r["errno"]), (11, msgid, 103), r)
        self.expect_ack(a, {"msgid": 7, "id": a.id, "friendid": b.id})
        self.expect_ack(a, a.one(b.id, "still here"))
        self.assertEqual(b.c.recv_until(is_msg(6))["msg"], "still here")
