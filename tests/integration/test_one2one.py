"""ONE_CHAT_MSG (6) against the real chatd, MariaDB and Redis: delivery in
both protocols, the session's identity on what is forwarded, every error,
byte-exact round trips, offline delivery and ordering.

This module also holds ChatCase and User, the small toolkit the other chat
tests (friend, group, cluster, plugin reload) import.
"""
import itertools
import json
import sys
import time
import unittest

from harness import Client, Node, Stack, wait_for

# yescrypt at its lowest cost: registrations are cheap (login plugin setting)
FAST_LOGIN = {"plugin.login": {"hash_cost": 1}}
TIME = "2024-05-01 12:00:00"
PASSWORD = "pw"

# message texts that must come back byte for byte
SPECIAL_TEXTS = [
    "'; DROP TABLE users; -- ",
    'quote " backslash \\ slash / percent % underscore _',
    "nul\u0000in the middle\u0000",
    "controls \u0001\u0002\u001f tab\t newline\n return\r",
    "4-byte UTF-8 \U0001F600 \U0001D11E \U00020B9F",
    "separators \u2028\u2029 and bom \ufeff",
]


def merge_conf(*confs):
    out = {}
    for conf in confs:
        for sec, kv in (conf or {}).items():
            out.setdefault(sec, {}).update(kv or {})
    return out


def loads_maybe(item):
    """A list entry: a legacy JSON string, or a protocol-2 object."""
    return json.loads(item) if isinstance(item, str) else item


def recv_raw_line(client, timeout=5):
    """The next line the server sent, as bytes (not parsed)."""
    deadline = time.monotonic() + timeout
    while b"\n" not in client.buf:
        if client.eof:
            raise EOFError("server closed the connection")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no line within %.1f s" % timeout)
        client._fill(left)
    i = client.buf.index(b"\n")
    line = bytes(client.buf[:i])
    del client.buf[:i + 1]
    return line


def is_msg(msgid, **fields):
    def pred(m):
        return m.get("msgid") == msgid and all(m.get(k) == v for k, v in fields.items())
    return pred


class User:
    """A registered, logged-in user and its connection."""

    def __init__(self, client, uid, name, ack, proto):
        self.c, self.id, self.name, self.ack, self.proto = client, uid, name, ack, proto

    def one(self, toid, msg, **extra):
        """A ONE_CHAT_MSG as the seed client builds it."""
        return dict({"msgid": 6, "id": self.id, "name": self.name, "toid": toid,
                     "msg": msg, "time": TIME}, **extra)

    def group_msg(self, gid, msg, **extra):
        return dict({"msgid": 10, "id": self.id, "name": self.name, "groupid": gid,
                     "msg": msg, "time": TIME}, **extra)

    def request(self, obj):
        """Protocol 2: the reply; legacy: send only (the seed answers nothing)."""
        if self.proto == 2:
            return self.c.request(obj)
        self.c.send(obj)
        return None


class ChatCase(unittest.TestCase):
    """A node per class (MariaDB + Redis of the run), users made on demand;
    prints the logs of the nodes when a test fails."""

    CONF = None
    names = itertools.count(1)

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.class_nodes = []
        cls.node = cls.start_node()

    @classmethod
    def start_node(cls, conf=None, **kw):
        node = Node(cls.stack, conf=merge_conf(FAST_LOGIN, cls.CONF, conf), **kw)
        cls.class_nodes.append(node)
        cls.addClassCleanup(cls.stopped_ok, node)
        return node

    @staticmethod
    def stopped_ok(node):
        if node.running():
            rc = node.stop()
            if rc != 0:
                raise AssertionError("chatd exited with %r\n%s" % (rc, node.log_tail()))

    def run(self, result=None):
        before = len(result.failures) + len(result.errors) if result else 0
        out = super().run(result)
        if result and len(result.failures) + len(result.errors) > before:
            for node in getattr(type(self), "class_nodes", []):
                sys.stderr.write("---- %s (tail)\n%s\n" % (node.log_path, node.log_tail(60)))
        return out

    # users
    def uname(self, base="u"):
        return "%s%d" % (base, next(ChatCase.names))

    def client(self, proto=1, node=None):
        c = Client((node or self.node).port, proto=proto)
        self.addCleanup(c.close)
        return c

    def register(self, name=None, node=None):
        name = name if name is not None else self.uname()
        with Client((node or self.node).port) as c:
            return c.register(name, PASSWORD), name

    def login(self, uid, name, proto=1, node=None, timeout=10):
        """Log uid in on a new connection; retried while the server still
        sees the user online (a connection closed a moment ago)."""
        c = self.client(proto, node)

        def attempt():
            ack = c.login(uid, PASSWORD)
            if ack.get("errno") == 2:
                return None
            return ack
        ack = wait_for(attempt, timeout, interval=0.05, what="login of %d" % uid)
        self.assertEqual(ack.get("errno"), 0, ack)
        return User(c, uid, name, ack, proto)

    def user(self, name=None, proto=1, node=None):
        uid, name = self.register(name, node)
        return self.login(uid, name, proto, node)

    def drop(self, user):
        """Close the user's connection (the server sees it offline at once)."""
        user.c.close()

    def expect_ack(self, user, obj, errno_=0):
        r = user.c.request(obj)
        self.assertEqual(r.get("msgid"), 11, r)
        self.assertEqual(r.get("req"), obj["msgid"], r)
        self.assertEqual(r.get("errno"), errno_, r)
        self.assertIsInstance(r.get("errmsg"), str, r)
        return r


class OneToOne(ChatCase):
    CONF = {"plugin.one2one": {"msg_max": 64}}

    def recv_chat(self, user, timeout=5):
        return user.c.recv_until(is_msg(6), timeout)

    # --- delivery --------------------------------------------------------
    def test_legacy_frame_forwarded_as_sent(self):
        a, b = self.user(), self.user()
        sent = a.one(b.id, "hello bob")
        a.c.send(sent)
        line = recv_raw_line(b.c)
        self.assertEqual(line, json.dumps(sent, separators=(",", ":")).encode())
        a.c.expect_nothing(0.3)  # the seed never answers a chat message

    def test_proto2_sender_gets_one_ack_and_no_metadata_is_forwarded(self):
        a, b = self.user(proto=2), self.user()
        r = self.expect_ack(a, a.one(b.id, "from proto 2"))
        self.assertEqual(r["errmsg"], "ok")
        got = self.recv_chat(b)
        self.assertEqual(got, {"msgid": 6, "id": a.id, "name": a.name, "toid": b.id,
                               "msg": "from proto 2", "time": TIME})
        a.c.expect_nothing(0.3)  # exactly one reply

    def test_both_directions_and_protocol_mix(self):
        a, b = self.user(proto=2), self.user()
        self.expect_ack(a, a.one(b.id, "a->b"))
        self.assertEqual(self.recv_chat(b)["msg"], "a->b")
        b.c.send(b.one(a.id, "b->a"))
        got = self.recv_chat(a)
        self.assertEqual((got["id"], got["name"], got["msg"]), (b.id, b.name, "b->a"))

    def test_other_fields_kept_raw(self):
        a, b = self.user(), self.user()
        extra = {"x": [1, {"y": "z\u0000"}], "flag": True, "n": None}
        a.c.send(a.one(b.id, "with extras", **extra))
        got = self.recv_chat(b)
        for k, v in extra.items():
            self.assertEqual(got.get(k), v)
        # a frame that needs rebuilding keeps them too
        a.c.send(a.one(b.id, "rebuilt", name="spoof", **extra))
        got = self.recv_chat(b)
        self.assertEqual(got["name"], a.name)
        for k, v in extra.items():
            self.assertEqual(got.get(k), v)

    def test_order_kept_to_a_recipient_never_seen(self):
        a, b = self.user(), self.user()
        for n in range(200):  # the first ones wait for the existence check
            a.c.send(a.one(b.id, "n%d" % n))
        got = [self.recv_chat(b)["msg"] for _ in range(200)]
        self.assertEqual(got, ["n%d" % n for n in range(200)])
        b.c.expect_nothing(0.3)

    # --- the session's identity -------------------------------------------
    def test_spoofed_name_replaced(self):
        for proto in (1, 2):
            with self.subTest(proto=proto):
                a, b = self.user(proto=proto), self.user()
                a.request(a.one(b.id, "who am i", name="mallory"))
                got = self.recv_chat(b)
                self.assertEqual((got["id"], got["name"]), (a.id, a.name))

    def test_missing_sender_fields_added(self):
        a, b = self.user(), self.user()
        a.c.send({"msgid": 6, "toid": b.id, "msg": "no id, no name", "time": TIME})
        got = self.recv_chat(b)
        self.assertEqual(got, {"msgid": 6, "id": a.id, "name": a.name, "toid": b.id,
                               "msg": "no id, no name", "time": TIME})

    def test_duplicate_name_key_cannot_spoof(self):
        a, b = self.user(), self.user()
        frame = ('{"msgid":6,"id":%d,"name":%s,"toid":%d,"msg":"dup","time":"%s",'
                 '"name":"mallory","id":%d}' % (a.id, json.dumps(a.name), b.id, TIME, b.id))
        a.c.send_raw(frame.encode() + b"\0")
        # a key twice refuses the frame whole (Python, like nlohmann, would
        # keep the last duplicate); the next message is the one that arrives
        a.c.send(a.one(b.id, "after"))
        line = recv_raw_line(b.c)
        got = json.loads(line)
        self.assertEqual((got["id"], got["name"], got["msg"]), (a.id, a.name, "after"))

    def test_escaped_spelling_of_own_name_is_accepted(self):
        a, b = self.user(name=self.uname("esc")), self.user()
        escaped = "".join("\\u%04x" % ord(ch) for ch in a.name)
        frame = ('{"msgid":6,"id":%d,"name":"%s","toid":%d,"msg":"x","time":"%s"}'
                 % (a.id, escaped, b.id, TIME))
        a.c.send_raw(frame.encode() + b"\0")
        got = self.recv_chat(b)
        self.assertEqual((got["id"], got["name"]), (a.id, a.name))

    def test_spoofed_id_refused(self):
        a, b, c = self.user(), self.user(), self.user(proto=2)
        a.c.send(dict(a.one(b.id, "as b"), id=c.id))  # legacy: dropped, silent
        a.c.expect_nothing(0.3)
        self.expect_ack(c, dict(c.one(b.id, "as a"), id=a.id), 107)
        b.c.expect_nothing(0.3)
        a.c.send(a.one(b.id, "real"))
        self.assertEqual(self.recv_chat(b)["msg"], "real")

    def test_not_logged_in(self):
        b = self.user()
        c2 = self.client(proto=2)
        r = c2.request({"msgid": 6, "id": 1, "name": "x", "toid": b.id, "msg": "hi"})
        self.assertEqual((r["msgid"], r["req"], r["errno"]), (11, 6, 106))
        c1 = self.client()
        c1.send({"msgid": 6, "id": 1, "name": "x", "toid": b.id, "msg": "hi"})
        c1.expect_nothing(0.3)
        b.c.expect_nothing(0.2)

    # --- errors -----------------------------------------------------------
    def bad_requests(self, a, b):
        base = a.one(b.id, "x")
        no_toid = dict(base)
        del no_toid["toid"]
        no_msg = dict(base)
        del no_msg["msg"]
        return [
            (no_toid, 104),
            (dict(base, toid=str(b.id)), 104),
            (dict(base, toid=b.id + 0.5), 104),
            (dict(base, toid=0), 104),
            (dict(base, toid=-3), 104),
            (dict(base, toid=None), 104),
            (no_msg, 104),
            (dict(base, msg=123), 104),
            (dict(base, msg=None), 104),
            (dict(base, msg=["x"]), 104),
            (dict(base, msg="y" * 65), 105),
            (dict(base, msg="\U0001F600" * 17), 105),  # 68 bytes
            (dict(base, toid=99999999), 108),
        ]

    def test_errors_proto2(self):
        a, b = self.user(proto=2), self.user()
        for req, errno_ in self.bad_requests(a, b):
            with self.subTest(req=req):
                self.expect_ack(a, req, errno_)
        b.c.expect_nothing(0.3)

    def test_errors_legacy_are_silent(self):
        a, b = self.user(), self.user()
        for req, _ in self.bad_requests(a, b):
            a.c.send(req)
        a.c.send(a.one(b.id, "after the bad ones"))
        self.assertEqual(self.recv_chat(b)["msg"], "after the bad ones")
        b.c.expect_nothing(0.3)
        a.c.expect_nothing(0.2)
        self.assertFalse(a.c.eof)

    def test_length_limit_counts_decoded_bytes(self):
        a, b = self.user(proto=2), self.user()
        for text in ("y" * 64, "\u00e9" * 32, "\u0000" * 64, "\U0001F600" * 16):
            with self.subTest(text=text[:4]):
                self.expect_ack(a, a.one(b.id, text))
                self.assertEqual(self.recv_chat(b)["msg"], text)

    def test_unknown_recipient_then_registered(self):
        a = self.user(proto=2)
        self.expect_ack(a, a.one(99999998, "nobody"), 108)
        b = self.user()  # a new user is found on its first message
        self.expect_ack(a, a.one(b.id, "somebody"))
        self.assertEqual(self.recv_chat(b)["msg"], "somebody")

    # --- bytes ------------------------------------------------------------
    def test_special_messages_round_trip(self):
        for proto in (1, 2):
            a, b = self.user(proto=proto), self.user(proto=proto)
            for text in SPECIAL_TEXTS:
                with self.subTest(proto=proto, text=text):
                    a.request(a.one(b.id, text))
                    got = self.recv_chat(b)
                    self.assertEqual(got["msg"], text)
                    self.assertEqual(got["name"], a.name)

    def test_special_sender_name_round_trips(self):
        name = self.uname("n'\"\\;--\U0001F600\u0001")
        a, b = self.user(name=name, proto=1), self.user()
        self.assertEqual(a.ack["name"], name)
        a.c.send(a.one(b.id, "as sent"))        # forwarded as is
        a.c.send(a.one(b.id, "spoofed", name="x"))  # rebuilt
        for msg in ("as sent", "spoofed"):
            got = self.recv_chat(b)
            self.assertEqual((got["name"], got["msg"]), (name, msg))

    def test_sender_name_with_nul_round_trips(self):
        name = self.uname("nul\u0000name")
        a, b = self.user(name=name), self.user()
        self.assertEqual(a.ack["name"], name)
        a.c.send(a.one(b.id, "from a name with NUL"))
        got = self.recv_chat(b)
        self.assertEqual(got["name"], name)

    # --- offline ----------------------------------------------------------
    def test_offline_recipient_gets_messages_at_login_in_order(self):
        a = self.user(proto=2)
        bid, bname = self.register()
        texts = ["first"] + SPECIAL_TEXTS + ["last"]
        for text in texts:
            self.expect_ack(a, a.one(bid, text))
        b = self.login(bid, bname)
        offline = [loads_maybe(s) for s in b.ack.get("offlinemsg", [])]
        # a legacy ack holds what fits in 1,023 bytes; the rest follows it
        while len(offline) < len(texts):
            offline.append(b.c.recv())
        self.assertEqual([m["msg"] for m in offline], texts)
        for m in offline:
            self.assertEqual((m["msgid"], m["id"], m["name"], m["toid"]),
                             (6, a.id, a.name, bid))
        self.drop(b)
        b = self.login(bid, bname)  # exactly once
        self.assertNotIn("offlinemsg", b.ack)


if __name__ == "__main__":
    unittest.main()
