"""The login plugin against a real chatd, MariaDB and Redis: REG_MSG (4),
LOGIN_MSG (1), LOGINOUT_MSG (3), legacy replies in the seed's exact shapes,
protocol-2 replies and errors, the multi-login policies (on one node and
across two), clients that drop without logging out, resume tokens, spoofed
ids, and names that must round-trip byte for byte.

Password hashing uses hash_cost = 1 (a test-only setting) so registrations
stay cheap; one test keeps libcrypt's default cost.
"""

import hashlib
import itertools
import json
import socket
import struct
import sys
import threading
import time
import unittest
import uuid

from harness import Client, Node, Stack, wait_for

INVALID = "id or password is invalid!"
IN_USE = "this account is using, input another!"
FAST = {"plugin.login": {"hash_cost": 1}}

_names = itertools.count(1)


def uname(prefix="u"):
    """A fresh user name (unique across the test run)."""
    return "%s%d_%s" % (prefix, next(_names), uuid.uuid4().hex[:8])


def conf(**login):
    c = {"plugin.login": dict(FAST["plugin.login"], **login)}
    return c


class LoginCase(unittest.TestCase):
    """Node logs on failure; clients closed after each test."""

    nodes = ()

    def run(self, result=None):
        before = len(result.failures) + len(result.errors) if result else 0
        out = super().run(result)
        if result and len(result.failures) + len(result.errors) > before:
            for node in type(self).nodes:
                sys.stderr.write("---- %s (tail)\n%s\n" % (node.log_path, node.log_tail(60)))
        return out

    @classmethod
    def tearDownClass(cls):
        for node in cls.nodes:
            rc = node.stop()
            if rc != 0:
                raise AssertionError("chatd exited with %r" % rc)

    def client(self, node=None, **kw):
        c = Client((node or self.nodes[0]).port, **kw)
        self.addCleanup(c.close)
        return c

    def new_user(self, name=None, password="secret", node=None):
        c = self.client(node, proto=2)
        name = name if name is not None else uname()
        r = c.request({"msgid": 4, "name": name, "password": password})
        self.assertEqual(r["errno"], 0, r)
        c.close()
        return r["id"], name, password

    def logged_in(self, uid, password="secret", node=None, proto=1):
        c = self.client(node, proto=proto)
        ack = c.login(uid, password)
        self.assertEqual(ack["errno"], 0, ack)
        return c, ack

    def sql(self, query):
        return self.stack.sql(self.nodes[0].db, query)


# --------------------------------------------------------------------------

class TestRegister(LoginCase):

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.nodes = (Node(cls.stack, conf=FAST),)

    def test_legacy_success_exact_shape(self):
        c = self.client()
        name = uname()
        c.send({"msgid": 4, "name": name, "password": "pw"})
        r = c.recv()
        self.assertEqual(set(r), {"msgid", "errno", "id"})
        self.assertEqual((r["msgid"], r["errno"]), (5, 0))
        self.assertIsInstance(r["id"], int)
        rows = self.sql("SELECT name, pwhash FROM users WHERE id = %d" % r["id"])
        self.assertEqual(rows[0][0], name)
        self.assertTrue(rows[0][1].startswith("$y$"), rows[0][1])
        c.expect_nothing()

    def test_legacy_name_taken_exact_shape(self):
        uid, name, _ = self.new_user()
        c = self.client()
        c.send({"msgid": 4, "name": name, "password": "other"})
        self.assertEqual(c.recv(), {"msgid": 5, "errno": 1})
        self.assertEqual(self.sql("SELECT COUNT(*) FROM users WHERE name = '%s'" % name),
                         [("1",)])

    def test_p2_success_and_name_taken(self):
        c = self.client(proto=2)
        name = uname()
        r = c.request({"msgid": 4, "name": name, "password": "pw"})
        self.assertEqual((r["msgid"], r["errno"], r["errmsg"]), (5, 0, "ok"))
        self.assertIsInstance(r["id"], int)
        r2 = c.request({"msgid": 4, "name": name, "password": "pw"})
        self.assertEqual((r2["msgid"], r2["errno"]), (5, 1))
        self.assertEqual(r2["errmsg"], "name is already taken")
        self.assertNotIn("id", r2)

    def test_p2_bad_fields(self):
        c = self.client(proto=2)
        cases = [
            ({"password": "pw"}, 104),                       # no name
            ({"name": 12, "password": "pw"}, 104),           # name not a string
            ({"name": "", "password": "pw"}, 104),           # empty name
            ({"name": uname()}, 104),                        # no password
            ({"name": uname(), "password": 1234}, 104),      # password not a string
            ({"name": uname(), "password": None}, 104),
            ({"name": uname(), "password": ""}, 104),        # under password_min
            ({"name": uname(), "password": "a\u0000b"}, 104),  # NUL in a password
            ({"name": "n" * 65, "password": "pw"}, 105),     # over name_max (64)
            ({"name": "\U0001F600" * 17, "password": "pw"}, 105),  # 68 bytes
            ({"name": uname(), "password": "p" * 129}, 105),  # over password_max
        ]
        for fields, errno in cases:
            r = c.request(dict(fields, msgid=4))
            self.assertEqual((r["msgid"], r["errno"]), (5, errno), (fields, r))
            self.assertTrue(r["errmsg"] and r["errmsg"] != "ok", r)
        # the limits themselves are fine: 64 bytes of name, 128 of password
        r = c.request({"msgid": 4, "name": "\U0001F600" * 15 + uuid.uuid4().hex[:4],
                       "password": "p" * 128})
        self.assertEqual(r["errno"], 0, r)
        r = c.request({"msgid": 4, "name": "x" * 56 + uuid.uuid4().hex[:8], "password": "p"})
        self.assertEqual(r["errno"], 0, r)

    def test_legacy_bad_fields_get_errno_1(self):
        c = self.client()
        for fields in ({"password": "pw"}, {"name": 5, "password": "pw"},
                       {"name": uname()}, {"name": "n" * 65, "password": "pw"}):
            c.send(dict(fields, msgid=4))
            self.assertEqual(c.recv(), {"msgid": 5, "errno": 1}, fields)


class TestLogin(LoginCase):
    """Two nodes sharing one database and one Redis."""

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        # a long presence TTL: a user is free again only because chatd
        # releases it, never because a heartbeat expired
        c = dict(FAST, redis={"heartbeat_ttl": 30})
        a = Node(cls.stack, conf=c)
        b = Node(cls.stack, db=a.db, migrate=False, conf=c)
        cls.nodes = (a, b)

    def test_legacy_success_exact_shape(self):
        uid, name, pw = self.new_user()
        c = self.client()
        c.send({"msgid": 1, "id": uid, "password": pw})
        ack = c.recv()
        # no friends, groups or offline messages: the lists are absent
        self.assertEqual(ack, {"msgid": 2, "errno": 0, "id": uid, "name": name})
        c.expect_nothing()

    def test_p2_success_shape(self):
        uid, name, pw = self.new_user()
        c = self.client(proto=2)
        ack = c.request({"msgid": 1, "id": uid, "password": pw})
        self.assertEqual((ack["msgid"], ack["errno"], ack["errmsg"]), (2, 0, "ok"))
        self.assertEqual((ack["id"], ack["name"]), (uid, name))
        for key in ("friends", "groups", "offlinemsg"):
            self.assertEqual(ack[key], [], key)
        self.assertRegex(ack["token"], "^[0-9a-f]{64}$")
        self.assertAlmostEqual(ack["token_expires"], time.time() + 604800, delta=120)

    def test_wrong_password_and_unknown_id_look_the_same(self):
        uid, _, _ = self.new_user()
        unknown = int(self.sql("SELECT COALESCE(MAX(id), 0) + 1000 FROM users")[0][0])
        c = self.client()
        c.send({"msgid": 1, "id": uid, "password": "wrong"})
        wrong = c.recv()
        c.send({"msgid": 1, "id": unknown, "password": "secret"})
        missing = c.recv()
        expected = {"msgid": 2, "errno": 1, "errmsg": INVALID}
        self.assertEqual(wrong, expected)
        self.assertEqual(missing, expected)
        c2 = self.client(proto=2)
        for who in (uid, unknown):
            r = c2.request({"msgid": 1, "id": who, "password": "wrong"})
            self.assertEqual((r["msgid"], r["errno"], r["errmsg"]), (2, 1, INVALID))
            self.assertNotIn("token", r)

    def test_password_prefix_with_nul_is_refused(self):
        # crypt() stops at NUL: "secret\0x" must not pass as "secret"
        uid, _, _ = self.new_user()
        c = self.client(proto=2)
        r = c.request({"msgid": 1, "id": uid, "password": "secret\u0000x"})
        self.assertEqual(r["errno"], 1, r)

    def test_bad_fields(self):
        uid, _, _ = self.new_user()
        c = self.client(proto=2)
        for fields, errno in [({"id": str(uid), "password": "secret"}, 104),
                              ({"id": uid + 0.5, "password": "secret"}, 104),
                              ({"id": -3, "password": "secret"}, 104),
                              ({"password": "secret"}, 104),
                              ({"id": uid, "password": 7}, 104),
                              ({"id": uid}, 104),
                              ({"id": uid, "password": "p" * 129}, 105),
                              ({"id": uid, "token": "abc"}, 104),
                              ({"id": uid, "token": 5}, 104)]:
            r = c.request(dict(fields, msgid=1))
            self.assertEqual((r["msgid"], r["errno"]), (2, errno), (fields, r))
        legacy = self.client()
        for fields in ({"id": str(uid), "password": "secret"}, {"id": uid}):
            legacy.send(dict(fields, msgid=1))
            self.assertEqual(legacy.recv(), {"msgid": 2, "errno": 1, "errmsg": INVALID})
        # the session is still usable afterwards
        r = c.request({"msgid": 1, "id": uid, "password": "secret"})
        self.assertEqual(r["errno"], 0, r)

    def test_in_use_on_the_same_node(self):
        uid, _, pw = self.new_user()
        self.logged_in(uid)
        c = self.client()
        c.send({"msgid": 1, "id": uid, "password": pw})
        self.assertEqual(c.recv(), {"msgid": 2, "errno": 2, "errmsg": IN_USE})
        c2 = self.client(proto=2)
        r = c2.request({"msgid": 1, "id": uid, "password": pw})
        self.assertEqual((r["errno"], r["errmsg"]), (2, IN_USE))
        self.assertNotIn("token", r)

    def test_in_use_on_another_node(self):
        uid, _, pw = self.new_user()
        self.logged_in(uid, node=self.nodes[0])
        c = self.client(self.nodes[1])
        c.send({"msgid": 1, "id": uid, "password": pw})
        self.assertEqual(c.recv(), {"msgid": 2, "errno": 2, "errmsg": IN_USE})

    def test_login_twice_on_one_connection(self):
        uid, _, pw = self.new_user()
        other, _, _ = self.new_user()
        c, _ = self.logged_in(uid)
        c.send({"msgid": 1, "id": uid, "password": pw})
        self.assertEqual(c.recv(), {"msgid": 2, "errno": 2, "errmsg": IN_USE})
        c.send({"msgid": 1, "id": other, "password": "secret"})
        self.assertEqual(c.recv(), {"msgid": 2, "errno": 2, "errmsg": IN_USE})
        p, _ = self.logged_in(other, proto=2)
        r = p.request({"msgid": 1, "id": other, "password": "secret"})
        self.assertEqual((r["msgid"], r["errno"]), (2, 110), r)
        # two logins sent back to back on a fresh connection: one wins
        uid2, _, _ = self.new_user()
        q = self.client(proto=2)
        q.send({"msgid": 1, "id": uid2, "password": "secret", "seq": 1})
        q.send({"msgid": 1, "id": uid2, "password": "secret", "seq": 2})
        replies = sorted((q.recv(), q.recv()), key=lambda m: m["seq"])
        self.assertEqual(sorted(m["errno"] for m in replies), [0, 110], replies)

    def test_logout_then_login_again(self):
        uid, name, pw = self.new_user()
        c, _ = self.logged_in(uid)
        c.send({"msgid": 3, "id": uid})
        c.expect_nothing()  # the seed does not answer a logout
        # the same connection logs in again (the seed client does this)
        c.send({"msgid": 1, "id": uid, "password": pw})
        self.assertEqual(c.recv(), {"msgid": 2, "errno": 0, "id": uid, "name": name})
        c.send({"msgid": 3, "id": uid})
        c.expect_nothing()
        # and so does another connection on the other node
        d, _ = self.logged_in(uid, node=self.nodes[1])
        # protocol 2: the logout is acknowledged
        d.close()
        p = self.client(proto=2)
        wait_for(lambda: p.login(uid, pw)["errno"] == 0, timeout=5, what="login")
        r = p.request({"msgid": 3, "id": uid})
        self.assertEqual((r["msgid"], r["req"], r["errno"]), (11, 3, 0), r)
        r = p.request({"msgid": 3, "id": uid})
        self.assertEqual((r["msgid"], r["errno"]), (11, 106), r)

    def _drop_and_relogin(self, abortive):
        uid, _, pw = self.new_user()
        c, _ = self.logged_in(uid)
        if abortive:  # RST instead of FIN
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        t0 = time.monotonic()
        d = self.client(self.nodes[1])

        def login_ok():
            ack = d.login(uid, pw)
            return ack["errno"] == 0

        wait_for(login_ok, timeout=5, interval=0.05, what="login after the drop")
        # far below the 30 s presence TTL: chatd released the user itself
        self.assertLess(time.monotonic() - t0, 5)

    def test_dropped_client_is_offline_at_once(self):
        self._drop_and_relogin(abortive=False)

    def test_reset_client_is_offline_at_once(self):
        self._drop_and_relogin(abortive=True)

    def test_spoofed_ids(self):
        u1, _, _ = self.new_user()
        u2, _, pw2 = self.new_user()
        a, _ = self.logged_in(u1)
        b, _ = self.logged_in(u2, node=self.nodes[1])
        # legacy: a logout in someone else's name is ignored (seed: silence)
        a.send({"msgid": 3, "id": u2})
        a.expect_nothing()
        c = self.client()
        c.send({"msgid": 1, "id": u2, "password": pw2})
        self.assertEqual(c.recv()["errno"], 2)  # u2 is still online
        a.send({"msgid": 1, "id": u1, "password": "secret"})
        self.assertEqual(a.recv()["errno"], 2)  # and so is u1
        # protocol 2: refused with a reason
        p = self.client(proto=2)
        r = p.request({"msgid": 3, "id": u2})
        self.assertEqual(r["errno"], 106, r)  # not logged in
        u3, _, _ = self.new_user()
        p.login(u3, "secret")
        r = p.request({"msgid": 3, "id": u2})
        self.assertEqual(r["errno"], 107, r)  # not the session's user
        r = p.request({"msgid": 3, "id": "x"})
        self.assertEqual(r["errno"], 104, r)
        c2 = self.client()
        c2.send({"msgid": 1, "id": u2, "password": pw2})
        self.assertEqual(c2.recv()["errno"], 2)
        b.expect_nothing()

    def test_default_hash_cost(self):
        node = Node(self.stack, db=self.nodes[0].db, migrate=False)
        self.addCleanup(node.stop)
        c = self.client(node, proto=2)
        name = uname()
        r = c.request({"msgid": 4, "name": name, "password": "pw"}, timeout=20)
        self.assertEqual(r["errno"], 0, r)
        stored = self.sql("SELECT pwhash FROM users WHERE id = %d" % r["id"])[0][0]
        self.assertTrue(stored.startswith("$y$"), stored)
        ack = c.request({"msgid": 1, "id": r["id"], "password": "pw"}, timeout=20)
        self.assertEqual(ack["errno"], 0, ack)


class TestResumeToken(LoginCase):
    """Tokens against the database itself: the token cache is off here
    (TestTokenCache covers it), so changes made in SQL count at once."""

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.nodes = (Node(cls.stack, conf=conf(token_cache_ttl=0)),)

    def token_login(self, uid, token, proto=2):
        c = self.client(proto=proto)
        if proto == 2:
            return c.request({"msgid": 1, "id": uid, "token": token})
        c.send({"msgid": 1, "id": uid, "token": token})
        return c.recv()

    def test_token_login(self):
        uid, name, pw = self.new_user()
        c, ack = self.logged_in(uid, proto=2)
        token, expires = ack["token"], ack["token_expires"]
        # only the SHA-256 is stored
        rows = self.sql("SELECT LOWER(HEX(token_hash)), user_id FROM resume_tokens "
                        "WHERE user_id = %d" % uid)
        self.assertEqual(rows, [(hashlib.sha256(token.encode()).hexdigest(), str(uid))])
        self.assertEqual(self.sql("SELECT COUNT(*) FROM resume_tokens WHERE "
                                  "token_hash = '%s'" % token), [("0",)])
        c.close()
        mark = self.nodes[0].log_mark()
        r = wait_for(lambda: (lambda a: a if a["errno"] != 2 else None)(
            self.token_login(uid, token)), timeout=5, what="token login")
        self.assertEqual((r["msgid"], r["errno"]), (2, 0), r)
        self.assertEqual((r["id"], r["name"], r["token"], r["token_expires"]),
                         (uid, name, token, expires))
        self.nodes[0].wait_log("user %d logged in from" % uid, since=mark)
        self.assertIn("(token)", self.nodes[0].log_text()[mark:])

    def test_token_of_another_user_is_refused(self):
        u1, _, _ = self.new_user()
        u2, _, _ = self.new_user()
        c, ack = self.logged_in(u1, proto=2)
        c.close()
        r = self.token_login(u2, ack["token"])
        self.assertEqual((r["errno"], r["errmsg"]), (1, "id or token is invalid!"))
        r = self.token_login(u1, "0" * 64)
        self.assertEqual(r["errno"], 1, r)

    def test_token_is_revoked_by_logout(self):
        uid, _, _ = self.new_user()
        c, ack = self.logged_in(uid, proto=2)
        r = c.request({"msgid": 3})
        self.assertEqual(r["errno"], 0, r)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM resume_tokens WHERE user_id = %d"
                                  % uid), [("0",)])
        r = self.token_login(uid, ack["token"])
        self.assertEqual(r["errno"], 1, r)

    def test_expired_token_is_refused(self):
        uid, _, _ = self.new_user()
        c, ack = self.logged_in(uid, proto=2)
        c.close()
        self.sql("UPDATE resume_tokens SET expires_at = UTC_TIMESTAMP() - INTERVAL 1 SECOND "
                 "WHERE user_id = %d" % uid)
        r = self.token_login(uid, ack["token"])
        self.assertEqual(r["errno"], 1, r)

    def test_refused_login_revokes_its_new_token(self):
        uid, _, pw = self.new_user()
        self.logged_in(uid, proto=2)
        before = self.sql("SELECT COUNT(*) FROM resume_tokens WHERE user_id = %d" % uid)
        c = self.client(proto=2)
        r = c.request({"msgid": 1, "id": uid, "password": pw})
        self.assertEqual(r["errno"], 2, r)
        wait_for(lambda: self.sql("SELECT COUNT(*) FROM resume_tokens WHERE user_id = %d"
                                  % uid) == before, timeout=5, what="token revoked")

    def test_legacy_gets_no_token_and_cannot_use_one(self):
        uid, _, _ = self.new_user()
        c, ack = self.logged_in(uid, proto=1)
        self.assertNotIn("token", ack)
        c.close()
        p, ack2 = self.logged_in(uid, proto=2)
        p.close()
        r = self.token_login(uid, ack2["token"], proto=1)  # no password
        self.assertEqual(r, {"msgid": 2, "errno": 1, "errmsg": INVALID})

    def test_expired_tokens_are_purged(self):
        node = Node(self.stack, db=self.nodes[0].db, migrate=False,
                    conf=conf(resume_purge_interval=1))
        self.addCleanup(node.stop)
        uid, _, _ = self.new_user()
        c, _ = self.logged_in(uid, proto=2)
        self.sql("UPDATE resume_tokens SET expires_at = UTC_TIMESTAMP() - INTERVAL 1 SECOND "
                 "WHERE user_id = %d" % uid)
        wait_for(lambda: self.sql("SELECT COUNT(*) FROM resume_tokens WHERE user_id = %d"
                                  % uid) == [("0",)], timeout=10, what="purge")


class TestTokenCache(LoginCase):
    """Verified tokens are kept in memory: a re-login with one costs no
    query; logout revokes the cached copies on every node; the cache
    trusts an entry for token_cache_ttl seconds and never past the token's
    own expiry."""

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        a = Node(cls.stack, conf=FAST)
        b = Node(cls.stack, db=a.db, migrate=False, conf=FAST)
        cls.nodes = (a, b)

    def token_login(self, uid, token, node=None):
        def attempt():
            c = self.client(node, proto=2)
            r = c.request({"msgid": 1, "id": uid, "token": token})
            if r["errno"] == 2:  # the previous connection's close not seen yet
                c.close()
                return None
            return c, r
        return wait_for(attempt, timeout=10, what="token login")

    def test_cached_token_needs_no_query(self):
        uid, name, _ = self.new_user()
        c, ack = self.logged_in(uid, proto=2)
        token = ack["token"]
        c.close()
        # the row goes behind the plugin's back: only the cache knows it now
        self.sql("DELETE FROM resume_tokens WHERE user_id = %d" % uid)
        c, r = self.token_login(uid, token)
        self.assertEqual((r["errno"], r["id"], r["name"], r["token"]),
                         (0, uid, name, token), r)
        self.assertEqual(r["token_expires"], ack["token_expires"])
        c.close()
        # the other node never saw it and asks the database: refused
        _, r = self.token_login(uid, token, node=self.nodes[1])
        self.assertEqual(r["errno"], 1, r)

    def test_logout_revokes_cached_copies_everywhere(self):
        a, b = self.nodes
        uid, _, _ = self.new_user()
        c, ack = self.logged_in(uid, node=a, proto=2)  # cached on a
        token = ack["token"]
        c.close()
        c, r = self.token_login(uid, token, node=b)     # checked, cached on b
        self.assertEqual(r["errno"], 0, r)
        c.close()
        c, r = self.token_login(uid, token, node=a)     # from a's cache
        self.assertEqual(r["errno"], 0, r)
        r = c.request({"msgid": 3})
        self.assertEqual(r["errno"], 0, r)
        # b dropped its copy when a's broadcast arrived; a at once
        for node in (a, b):
            _, r = self.token_login(uid, token, node=node)
            self.assertEqual((r["errno"], r["errmsg"]), (1, "id or token is invalid!"),
                             (node.port, r))

    def test_token_expiry_holds_in_the_cache(self):
        node = Node(self.stack, db=self.nodes[0].db, migrate=False,
                    conf=conf(resume_ttl=2))
        self.addCleanup(node.stop)
        uid, _, _ = self.new_user()
        c, ack = self.logged_in(uid, node=node, proto=2)
        c.close()
        time.sleep(max(0.0, ack["token_expires"] - time.time()) + 1.0)
        _, r = self.token_login(uid, ack["token"], node=node)
        self.assertEqual(r["errno"], 1, r)

    def test_cache_ttl(self):
        node = Node(self.stack, db=self.nodes[0].db, migrate=False,
                    conf=conf(token_cache_ttl=1))
        self.addCleanup(node.stop)
        uid, _, _ = self.new_user()
        c, ack = self.logged_in(uid, node=node, proto=2)
        c.close()
        self.sql("DELETE FROM resume_tokens WHERE user_id = %d" % uid)
        time.sleep(1.5)  # the cached copy is too old to trust
        _, r = self.token_login(uid, ack["token"], node=node)
        self.assertEqual(r["errno"], 1, r)


class TestReplacePolicy(LoginCase):

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        c = dict(conf(multi_login="replace"), redis={"heartbeat_ttl": 30})
        a = Node(cls.stack, conf=c)
        b = Node(cls.stack, db=a.db, migrate=False, conf=c)
        cls.nodes = (a, b)

    def test_replace_on_the_same_node(self):
        uid, name, pw = self.new_user()
        old, _ = self.logged_in(uid, proto=2)
        new, ack = self.logged_in(uid, proto=2)
        self.assertEqual(ack["name"], name)
        notice = old.recv()
        self.assertEqual((notice["msgid"], notice["errno"]), (12, 116), notice)
        self.assertTrue(old.closed())
        r = new.request({"msgid": 3})
        self.assertEqual(r["errno"], 0, r)

    def test_replace_legacy_is_closed_silently(self):
        uid, _, _ = self.new_user()
        old, _ = self.logged_in(uid, proto=1)
        self.logged_in(uid, proto=1)
        self.assertTrue(old.closed())
        self.assertRaises(EOFError, old.recv, 1)  # no notice: the seed has none

    def test_policy_changes_on_sighup(self):
        node = Node(self.stack, db=self.nodes[0].db, migrate=False, conf=conf())
        self.addCleanup(node.stop)
        uid, _, pw = self.new_user(node=node)
        old, _ = self.logged_in(uid, proto=2, node=node)
        c = self.client(node, proto=2)
        self.assertEqual(c.login(uid, pw)["errno"], 2)  # refuse
        node.write_conf(conf(multi_login="replace"))
        mark = node.log_mark()
        node.sighup()
        node.wait_log("multi_login=replace", since=mark)
        self.assertEqual(c.login(uid, pw)["errno"], 0)  # now replace
        self.assertEqual(old.recv()["errno"], 116)
        self.assertTrue(old.closed())

    def test_replace_across_nodes(self):
        uid, _, _ = self.new_user()
        old, _ = self.logged_in(uid, proto=2, node=self.nodes[0])
        self.logged_in(uid, proto=2, node=self.nodes[1])
        notice = old.recv(timeout=10)
        self.assertEqual((notice["msgid"], notice["errno"]), (12, 116), notice)
        self.assertTrue(old.closed())


class TestAdmission(LoginCase):
    """hash_budget: password hashing may take only a share of the hashing
    threads' CPU; logins and registrations past it are answered busy at once,
    token logins are not counted, and the budget refills.  login_rate: all
    logins, token logins included, past a rate per second are busy."""

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.nodes = (Node(cls.stack, conf=conf(hash_threads=1)),)

    def configure(self, **kw):
        """Apply settings with SIGHUP and wait until the plugin took them."""
        node = self.nodes[0]
        settings = dict(hash_threads=1, hash_budget=100, login_rate=0)
        settings.update(kw)
        node.write_conf(conf(**settings))
        mark = node.log_mark()
        node.sighup()
        node.wait_log("hash_budget=%d%% login_rate=%d/s" % (
            settings["hash_budget"], settings["login_rate"]), since=mark)

    def storm(self, users):
        """One password login per user, all sent before any reply is read."""
        clients = []
        for uid, _, pw in users:
            c = self.client(proto=2)
            c.send({"msgid": 1, "id": uid, "password": pw, "seq": 1})
            clients.append(c)
        return clients, [c.recv(timeout=20) for c in clients]

    def test_budget(self):
        self.configure()
        users = [self.new_user() for _ in range(30)]  # no budget yet
        self.configure(hash_budget=1)

        clients, acks = self.storm(users)
        ok = [i for i, a in enumerate(acks) if a["errno"] == 0]
        busy = [a for a in acks if a["errno"] == 113]
        self.assertEqual(len(ok) + len(busy), len(acks), acks)
        self.assertGreaterEqual(len(ok), 1, acks)
        # 1% of one thread at well under 100 ms a hash: a few per second
        self.assertGreaterEqual(len(busy), 15, acks)
        self.assertEqual(busy[0]["errmsg"], "server busy, try again later")

        # legacy clients get the seed's LOGIN_MSG_ACK shape
        busy_users = [users[i] for i, a in enumerate(acks) if a["errno"] == 113]
        for uid, _, pw in busy_users:
            legacy = self.client()
            legacy.send({"msgid": 1, "id": uid, "password": pw})
            r = legacy.recv(timeout=20)
            if r["errno"] != 0:
                break
        self.assertEqual(r, {"msgid": 2, "errno": 1,
                             "errmsg": "server busy, try again later"})
        # registrations count too (one connection each: a connection has
        # one registration in flight at a time)
        cs = [self.client(proto=2) for _ in range(10)]
        for i, c in enumerate(cs):
            c.send({"msgid": 4, "name": uname(), "password": "pw", "seq": i})
        regs = [c.recv(timeout=20) for c in cs]
        self.assertTrue(any(r["errno"] == 113 for r in regs), regs)

        # token logins never hash: not counted against the budget
        first = ok[0]
        token = acks[first]["token"]
        clients[first].close()
        t = self.client(proto=2)

        def token_login():
            r = t.request({"msgid": 1, "id": users[first][0], "token": token})
            return r if r["errno"] != 2 else None  # the close not seen yet
        r = wait_for(token_login, timeout=10)
        self.assertEqual(r["errno"], 0, r)

        # the budget refills
        time.sleep(1.5)
        uid, _, pw = busy_users[-1]
        self.assertEqual(self.client(proto=2).login(uid, pw)["errno"], 0)

    def test_login_rate(self):
        self.configure()
        users = [self.new_user() for _ in range(12)]
        # tokens for all of them, then off-line again
        tokens = []
        for uid, _, pw in users:
            c, ack = self.logged_in(uid, pw, proto=2)
            tokens.append(ack["token"])
            c.close()
        self.configure(login_rate=4)
        time.sleep(0.5)  # the bucket fills: a quarter second's worth, 1 token

        def storm():
            clients = []
            for (uid, _, _), token in zip(users, tokens):
                c = self.client(proto=2)
                c.send({"msgid": 1, "id": uid, "token": token, "seq": 1})
                clients.append(c)
            return clients, [c.recv(timeout=20) for c in clients]

        # token logins count too; errno 2: a close not processed yet
        clients, acks = wait_for(lambda: (lambda r: r if all(
            a["errno"] != 2 for a in r[1]) else None)(storm()), timeout=10)
        errnos = sorted(a["errno"] for a in acks)
        self.assertGreaterEqual(errnos.count(0), 1, acks)
        self.assertGreaterEqual(errnos.count(113), 8, acks)
        self.assertEqual(errnos.count(0) + errnos.count(113), len(acks), acks)
        for c in clients:
            c.close()
        # the rate refills: one login every quarter second gets through
        uid, _, pw = users[0]
        time.sleep(0.5)
        r = wait_for(lambda: (lambda a: a if a["errno"] != 2 else None)(
            self.client(proto=2).login(uid, pw)), timeout=10)
        self.assertEqual(r["errno"], 0, r)

    def test_login_queue(self):
        """login_queue_max: logins over login_rate wait their turn (errno 0,
        paced at the rate) instead of being refused; a client that leaves
        while queued is dropped; only a full queue answers busy (113)."""
        self.configure()
        users = [self.new_user() for _ in range(12)]
        tokens = []
        for uid, _, pw in users:
            c, ack = self.logged_in(uid, pw, proto=2)
            tokens.append(ack["token"])
            c.close()

        def storm(pick, leave=()):
            """Token logins of users pick (and of leave, whose clients close
            at once); the acks, once none is errno 2 (a close of the last
            round not processed yet), and the seconds they took."""
            def once():
                t0 = time.monotonic()
                gone = [self.client(proto=2) for _ in leave]
                for c, i in zip(gone, leave):
                    c.send({"msgid": 1, "id": users[i][0], "token": tokens[i], "seq": 1})
                clients = [self.client(proto=2) for _ in pick]
                for c, i in zip(clients, pick):
                    c.send({"msgid": 1, "id": users[i][0], "token": tokens[i], "seq": 1})
                for c in gone:
                    c.close()
                acks = [c.recv(timeout=20) for c in clients]
                elapsed = time.monotonic() - t0
                for c in clients:
                    c.close()
                if any(a["errno"] == 2 for a in acks):
                    time.sleep(0.3)
                    return None
                return acks, elapsed
            return wait_for(once, timeout=30)

        self.configure(login_rate=4, login_queue_max=20)
        time.sleep(0.5)  # a quarter second's worth: 1 token
        # two clients leave while they wait: the others still get their turn
        acks, elapsed = storm(range(10), leave=(10, 11))
        self.assertEqual([a["errno"] for a in acks], [0] * 10, acks)
        # 10 logins (and 2 dropped) at 4/s with one token at the start:
        # paced, not refused
        self.assertGreater(elapsed, 1.5, acks)

        # a full queue: busy, as without it
        self.configure(login_rate=4, login_queue_max=2)
        time.sleep(0.5)
        acks, _ = storm(range(12))
        errnos = sorted(a["errno"] for a in acks)
        self.assertGreaterEqual(errnos.count(0), 3, acks)
        self.assertGreaterEqual(errnos.count(113), 6, acks)
        self.assertEqual(errnos.count(0) + errnos.count(113), len(acks), acks)


class Flood:
    """Connections from 127.0.0.1 that pipeline REG_MSG as fast as they can
    (in batches, bounded: at most about 10,000 frames a second each) and
    read every reply, until stop().  .replies counts replies by errno."""

    def __init__(self, port, conns=2):
        self.stop_ev = threading.Event()
        self.replies = {}
        self.lock = threading.Lock()
        self.threads = []
        name = uname("flood")
        frame = b'{"msgid":4,"proto":2,"seq":1,"name":"%s","password":"pw"}\0' % (
            name.encode())
        for _ in range(conns):
            sock = socket.create_connection(("127.0.0.1", port))
            for fn, arg in ((self._send, frame * 50), (self._drain, None)):
                t = threading.Thread(target=fn, args=(sock, arg), daemon=True)
                t.start()
                self.threads.append((t, sock))

    def _send(self, sock, batch):
        try:
            while not self.stop_ev.is_set():
                sock.sendall(batch)
                time.sleep(0.005)
        except OSError:
            pass

    def _drain(self, sock, _):
        buf = b""
        sock.settimeout(0.2)
        while not self.stop_ev.is_set():
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            with self.lock:
                for line in lines:
                    e = json.loads(line)["errno"]
                    self.replies[e] = self.replies.get(e, 0) + 1

    def total(self):
        with self.lock:
            return sum(self.replies.values())

    def stop(self):
        self.stop_ev.set()
        for t, sock in self.threads:
            t.join(5)
        for _, sock in self.threads:
            sock.close()


class TestHashFairness(LoginCase):
    """Issue 14, defect 4: a registration flood must not block password
    logins.  One registration in flight per connection, at most
    hash_per_address hashing jobs per client address, and a hashing queue
    served round robin between addresses, where a full queue gives way to
    the lighter address."""

    BASE = dict(hash_threads=1, hash_cost=1, hash_per_address=32, hash_queue_max=256)

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.settings = dict(cls.BASE)
        cls.nodes = (Node(cls.stack, conf=conf(**cls.settings)),)

    def configure(self, **kw):
        """Apply BASE updated with kw (SIGHUP) unless that is in force."""
        node = self.nodes[0]
        settings = dict(self.BASE, **kw)
        if settings == type(self).settings:
            return
        node.write_conf(conf(**settings))
        mark = node.log_mark()
        node.sighup()
        node.wait_log("hash_cost=%d hash_threads=1 hash_per_address=%d " % (
            settings["hash_cost"], settings["hash_per_address"]), since=mark)
        type(self).settings = settings

    def test_registration_flood_does_not_block_logins(self):
        self.configure()
        users = [self.new_user() for _ in range(50)]
        flood = Flood(self.nodes[0].port)
        try:
            wait_for(lambda: flood.total() > 200, timeout=20)
            t0 = time.monotonic()
            acks = []
            for uid, _, pw in users:
                c = self.client(proto=2, source="127.0.0.2")
                acks.append(c.login(uid, pw))
                c.close()
            took = time.monotonic() - t0
            replies = dict(flood.replies)
        finally:
            flood.stop()
        self.assertEqual([a["errno"] for a in acks], [0] * 50,
                         [a for a in acks if a["errno"]][:3])
        self.assertLess(took, 30)
        # the flood was real and was told why it is refused
        self.assertGreater(replies.get(111, 0), 100, replies)

    def test_one_registration_per_connection(self):
        self.configure()
        c = self.client(proto=2)
        c.send({"msgid": 4, "name": uname(), "password": "pw", "seq": 1})
        c.send({"msgid": 4, "name": uname(), "password": "pw", "seq": 2})
        r = {m["seq"]: m for m in (c.recv(timeout=10), c.recv(timeout=10))}
        self.assertEqual(r[1]["errno"], 0, r)
        self.assertEqual((r[2]["errno"], r[2]["errmsg"]), (
            111, "a registration is already in progress on this connection"))
        # legacy: the seed's only failure shape
        c = self.client()
        c.send({"msgid": 4, "name": uname(), "password": "pw"})
        c.send({"msgid": 4, "name": uname(), "password": "pw"})
        got = sorted([c.recv(timeout=10), c.recv(timeout=10)], key=lambda m: m["errno"])
        self.assertEqual(got[1], {"msgid": 5, "errno": 1})
        self.assertEqual(set(got[0]), {"msgid", "errno", "id"})

    def test_per_address_limit(self):
        # libcrypt's default cost: tens of ms a hash, so jobs pile up
        self.configure(hash_cost=0, hash_per_address=3)
        cs = [self.client(proto=2) for _ in range(10)]
        for i, c in enumerate(cs):
            c.send({"msgid": 4, "name": uname(), "password": "pw", "seq": i})
        regs = [c.recv(timeout=20) for c in cs]
        errnos = sorted(r["errno"] for r in regs)
        self.assertGreaterEqual(errnos.count(0), 3, regs)
        self.assertGreaterEqual(errnos.count(111), 5, regs)
        self.assertEqual(errnos.count(0) + errnos.count(111), 10, regs)
        limited = [r for r in regs if r["errno"] == 111][0]
        self.assertEqual(limited["errmsg"], "too many registrations in progress "
                         "from your address, try again shortly")
        # another address is not affected
        uid, _, pw = self.new_user()
        fill = [self.client() for _ in range(6)]
        for c in fill:
            c.send({"msgid": 4, "name": uname(), "password": "pw"})
        other = self.client(proto=2, source="127.0.0.2")
        self.assertEqual(other.login(uid, pw)["errno"], 0)
        # legacy logins past the limit: the seed's shape
        legacy = [self.client() for _ in range(6)]
        for c in legacy:
            c.send({"msgid": 1, "id": uid + 100000, "password": "pw"})
        acks = [c.recv(timeout=20) for c in legacy]
        self.assertIn({"msgid": 2, "errno": 1, "errmsg": "server busy, try again later"},
                      acks)
        for c in fill:
            c.recv(timeout=20)

    def test_full_queue_gives_way_to_lighter_address(self):
        self.configure(hash_cost=0, hash_per_address=0, hash_queue_max=4)
        uid, _, pw = self.new_user()
        cs = [self.client(proto=2) for _ in range(4)]
        for i, c in enumerate(cs):
            c.send({"msgid": 4, "name": uname(), "password": "pw", "seq": i})
        other = self.client(proto=2, source="127.0.0.2")
        self.assertEqual(other.login(uid, pw)["errno"], 0)
        regs = [c.recv(timeout=20) for c in cs]
        errnos = sorted(r["errno"] for r in regs)
        self.assertIn(113, errnos, regs)
        self.assertEqual(errnos.count(0) + errnos.count(113), 4, regs)


class TestNames(LoginCase):
    """Names are bytes: whatever a client sends comes back exactly."""

    NAMES = ['quote"d', "back\\slash", "nul\u0000byte", "emoji\U0001F600\U0001F680",
             "ctl\n\t\r\u0001", "sql'); DROP TABLE users; --", "\u00e9\u4e2d\u6587"]

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.nodes = (Node(cls.stack, conf=FAST),)

    def test_names_round_trip(self):
        me, _, _ = self.new_user()
        ids = {}
        for base in self.NAMES:
            name = base + uuid.uuid4().hex[:6]
            uid, _, _ = self.new_user(name=name)
            ids[uid] = name
            stored = self.sql("SELECT HEX(name) FROM users WHERE id = %d" % uid)[0][0]
            self.assertEqual(bytes.fromhex(stored), name.encode(), base)
            # the login ack, both shapes
            c, ack = self.logged_in(uid, proto=1)
            self.assertEqual(ack["name"], name)
            c.close()
            p, ack = self.logged_in(uid, proto=2)
            self.assertEqual(ack["name"], name)
            r = p.request({"msgid": 3})
            self.assertEqual(r["errno"], 0, r)
        # in a friend list
        p, _ = self.logged_in(me, proto=2)
        for uid in ids:
            r = p.request({"msgid": 7, "friendid": uid})
            self.assertEqual(r["errno"], 0, r)
        p.request({"msgid": 3})
        p.close()
        p2, ack = self.logged_in(me, proto=2)
        self.assertEqual({f["id"]: f["name"] for f in ack["friends"]}, ids)
        p2.request({"msgid": 3})
        p2.close()
        c, ack = self.logged_in(me, proto=1)
        friends = [json.loads(s) for s in ack["friends"]]
        self.assertEqual({f["id"]: f["name"] for f in friends}, ids)


if __name__ == "__main__":
    unittest.main()
