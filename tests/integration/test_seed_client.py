"""The seed's own command-line client (src/client/main.cpp of the seed),
emulated byte for byte against chatd: every request is nlohmann's dump() of
the object (compact, keys sorted) sent as strlen(json) + 1 bytes, NUL
included; every response is read with ONE recv() of at most 1024 bytes and
parsed as exactly one JSON document (json::parse of the buffer), and list
entries of the login ack are parsed a second time, as the client does.

Two users drive a whole session: register, login, add a friend, create a
group, log out and in again (the seed client learns group ids only from the
login ack), join the group, chat, group chat, an offline message, logout.
TestReaderOnly: a user who only reads is not dropped as idle (issue 13).
"""

import json
import select
import socket
import threading
import time
import unittest
import uuid

from harness import NodeCase, wait_for

# chatd's own default for legacy_pace_ms (the harness turns pacing off)
FAST = {"plugin.login": {"hash_cost": 1}, "server": {"legacy_pace_ms": None}}


def now():
    return time.strftime("%Y-%m-%d %H:%M:%S")


class SeedClient:
    """What src/client/main.cpp does on the wire."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.user = None  # (id, name) after login

    def close(self):
        self.sock.close()

    def send(self, obj):
        # json::dump(): compact, keys in std::map order; send strlen + 1
        text = json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        data = text.encode() + b"\0"
        assert self.sock.send(data) == len(data)

    def recv(self, timeout=10):
        """One recv(fd, buffer, 1024, 0) and json::parse(buffer)."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(1024)
        if not data:
            raise EOFError("server closed the connection")
        self.last_raw = data
        text = data.split(b"\0", 1)[0].decode()
        try:
            return json.loads(text)  # raises on a second document ("Extra data")
        except ValueError as e:
            raise AssertionError("the seed client cannot parse %r: %s" % (data, e))

    def nothing(self, timeout=0.3):
        r, _, _ = select.select([self.sock], [], [], timeout)
        if r:
            raise AssertionError("unexpected data for the seed client: %r"
                                 % self.sock.recv(1024))

    # -- the menu entries
    def register(self, name, pwd):
        self.send({"msgid": 4, "name": name, "password": pwd})
        r = self.recv()
        return r

    def login(self, uid, pwd):
        self.send({"msgid": 1, "id": uid, "password": pwd})
        r = self.recv()
        if r["errno"] != 0:
            return r, None
        self.user = (r["id"], r["name"])
        view = {"friends": [], "groups": [], "offlinemsg": []}
        for s in r.get("friends", []):
            js = json.loads(s)
            view["friends"].append((js["id"], js["name"], js["state"]))
        for s in r.get("groups", []):
            g = json.loads(s)
            users = []
            for u in g["users"]:
                ju = json.loads(u)
                users.append((ju["id"], ju["name"], ju["state"], ju["role"]))
            view["groups"].append((g["id"], g["groupname"], g["groupdesc"], sorted(users)))
        for s in r.get("offlinemsg", []):
            js = json.loads(s)
            if js["msgid"] == 6:
                view["offlinemsg"].append((6, js["time"], js["id"], js["name"], js["msg"]))
            else:
                view["offlinemsg"].append((10, js["groupid"], js["time"], js["id"],
                                           js["name"], js["msg"]))
        return r, view

    def addfriend(self, friendid):
        self.send({"msgid": 7, "id": self.user[0], "friendid": friendid})

    def chat(self, toid, msg):
        obj = {"msgid": 6, "id": self.user[0], "name": self.user[1], "toid": toid,
               "msg": msg, "time": now()}
        self.send(obj)
        return obj

    def creategroup(self, name, desc):
        self.send({"msgid": 8, "id": self.user[0], "groupname": name, "groupdesc": desc})

    def addgroup(self, groupid):
        self.send({"msgid": 9, "id": self.user[0], "groupid": groupid})

    def groupchat(self, groupid, msg):
        obj = {"msgid": 10, "id": self.user[0], "name": self.user[1], "groupid": groupid,
               "msg": msg, "time": now()}
        self.send(obj)
        return obj

    def loginout(self):
        self.send({"msgid": 3, "id": self.user[0]})


class SeedCase(NodeCase):
    """One node per class with chatd's default pacing: FAST plus CONF."""

    @classmethod
    def conf(cls):
        conf = {k: dict(v) for k, v in FAST.items()}
        for sec, kv in (cls.CONF or {}).items():
            conf.setdefault(sec, {}).update(kv)
        return conf


class TestSeedClient(SeedCase):


    def client(self):
        c = SeedClient(self.node.port)
        self.addCleanup(c.close)
        return c

    def test_whole_session(self):
        tag = uuid.uuid4().hex[:6]
        alice_name, bob_name, group = "alice" + tag, "bob" + tag, "g" + tag
        alice, bob = self.client(), self.client()

        # register (and once more: name taken)
        r = alice.register(alice_name, "apw")
        self.assertEqual((r["msgid"], r["errno"]), (5, 0))
        alice_id = r["id"]
        bob_id = bob.register(bob_name, "bpw")["id"]
        self.assertEqual(bob.register(bob_name, "x"), {"msgid": 5, "errno": 1})

        # a wrong password, then the logins
        r, _ = alice.login(alice_id, "nope")
        self.assertEqual(r, {"msgid": 2, "errno": 1, "errmsg": "id or password is invalid!"})
        r, view = alice.login(alice_id, "apw")
        self.assertEqual(r, {"msgid": 2, "errno": 0, "id": alice_id, "name": alice_name})
        r, _ = bob.login(bob_id, "bpw")
        self.assertEqual(r["errno"], 0)
        other = self.client()
        r, _ = other.login(bob_id, "bpw")
        self.assertEqual(r, {"msgid": 2, "errno": 2,
                             "errmsg": "this account is using, input another!"})

        # addfriend, creategroup: the seed answers neither
        alice.addfriend(bob_id)
        alice.nothing()
        alice.creategroup(group, "the desc")
        alice.nothing()

        # logout and login again: the group id comes with the login ack
        alice.loginout()
        alice.nothing()
        r, view = alice.login(alice_id, "apw")
        self.assertEqual(view["friends"], [(bob_id, bob_name, "online")])
        self.assertEqual(len(view["groups"]), 1, r)
        gid, gname, gdesc, users = view["groups"][0]
        self.assertEqual((gname, gdesc), (group, "the desc"))
        self.assertEqual(users, [(alice_id, alice_name, "online", "creator")])
        self.assertNotIn("offlinemsg", r)

        # bob joins the group
        bob.addgroup(gid)
        bob.nothing()

        # one-to-one: bob's reader thread gets exactly the message sent
        sent = alice.chat(bob_id, "hello bob")
        got = bob.recv()
        self.assertEqual(got, sent)
        alice.nothing()
        sent = bob.chat(alice_id, "hi alice, \"quoted\" \\ and \U0001F600")
        self.assertEqual(alice.recv(), sent)

        # group chat: the other member gets it, the sender does not
        sent = bob.groupchat(gid, "hello group")
        got = alice.recv()
        for k in ("msgid", "id", "name", "groupid", "msg", "time"):
            self.assertEqual(got[k], sent[k], k)
        bob.nothing()

        # offline: alice logs out, bob writes, alice gets it at her login
        alice.loginout()
        alice.nothing()
        sent1 = bob.chat(alice_id, "while you were away")
        sent2 = bob.groupchat(gid, "group, while away")
        bob.nothing()
        r, view = alice.login(alice_id, "apw")
        self.assertEqual(view["offlinemsg"], [
            (6, sent1["time"], bob_id, bob_name, "while you were away"),
            (10, gid, sent2["time"], bob_id, bob_name, "group, while away")])
        self.assertEqual(sorted(view["groups"][0][3]),
                         sorted([(alice_id, alice_name, "online", "creator"),
                                 (bob_id, bob_name, "online", "normal")]))

        # and bob's view after his own re-login
        bob.loginout()
        bob.nothing()
        r, view = bob.login(bob_id, "bpw")
        self.assertEqual(view["friends"], [])  # bob added nobody
        self.assertEqual([g[0] for g in view["groups"]], [gid])
        self.assertNotIn("offlinemsg", r)
        bob.loginout()
        alice.loginout()
        alice.nothing()
        bob.nothing()


class TestSeedClientBursts(SeedCase):
    """Issue 13: bursts must reach the seed client one message per recv().
    chatd's default configuration paces legacy output (legacy_pace_ms)."""


    def user(self):
        c = SeedClient(self.node.port)
        self.addCleanup(c.close)
        name = "b" + uuid.uuid4().hex[:10]
        uid = c.register(name, "pw")["id"]
        r, _ = c.login(uid, "pw")
        self.assertEqual(r["errno"], 0, r)
        return c

    def read_all(self, reader, n):
        """n messages, each one recv() parsed as exactly one document."""
        return [reader.recv() for _ in range(n)]

    def test_burst_from_one_sender(self):
        a, b = self.user(), self.user()
        for round_ in range(3):
            sent = [a.chat(b.user[0], "burst %d/%d" % (round_, i)) for i in range(5)]
            self.assertEqual(self.read_all(b, 5), sent)
        b.nothing()

    def test_bursts_from_five_senders(self):
        b = self.user()
        senders = [self.user() for _ in range(5)]
        for round_ in range(3):
            sent = [s.chat(b.user[0], "from %d, round %d" % (i, round_))
                    for i, s in enumerate(senders)]
            got = self.read_all(b, 5)
            self.assertEqual(sorted(got, key=lambda m: m["msg"]),
                             sorted(sent, key=lambda m: m["msg"]))
        b.nothing()

    def test_group_burst(self):
        a, b, c = self.user(), self.user(), self.user()
        a.creategroup("burst" + uuid.uuid4().hex[:6], "d")
        a.nothing()
        a.loginout()
        a.nothing()
        r, view = a.login(a.user[0], "pw")
        gid = view["groups"][0][0]
        for u in (b, c):
            u.addgroup(gid)
            u.nothing()
        # each seed client has its own reader thread, blocked in recv()
        got, errors = {}, []

        def reader(u):
            try:
                got[u] = self.read_all(u, 5)
            except Exception as e:  # the client would have crashed
                errors.append(e)
        threads = [threading.Thread(target=reader, args=(u,)) for u in (b, c)]
        for t in threads:
            t.start()
        sent = [a.groupchat(gid, "g%d" % i) for i in range(5)]
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])
        for u in (b, c):
            self.assertEqual([m["msg"] for m in got[u]], [m["msg"] for m in sent])


class TestReaderOnly(SeedCase):
    """Issue 13, part 3: a seed-client user who only reads is never dropped
    as idle, whether messages keep arriving or nothing happens at all; a
    client that never logs in still is (idle_timeout is its login
    deadline).  idle_timeout = 2 s stands for the default 600 s."""

    IDLE = 2

    CONF = {"server": {"idle_timeout": IDLE}}

    def user(self):
        c = SeedClient(self.node.port)
        self.addCleanup(c.close)
        name = "r" + uuid.uuid4().hex[:8]
        uid = c.register(name, "pw")["id"]
        r, _ = c.login(uid, "pw")
        self.assertEqual(r["errno"], 0, r)
        return c, uid

    def test_reader_outlives_idle_timeout_while_receiving(self):
        reader, reader_id = self.user()
        writer, _ = self.user()
        t0, n = time.monotonic(), 0
        while time.monotonic() - t0 < 3 * self.IDLE:
            sent = writer.chat(reader_id, "line %d" % n)
            self.assertEqual(reader.recv(), sent)  # one message per recv
            reader.nothing(0.4)                    # and paces the writer
            n += 1
        sent = writer.chat(reader_id, "still there?")
        self.assertEqual(reader.recv(), sent)

    def test_silent_logged_in_user_is_kept(self):
        quiet, quiet_id = self.user()
        writer, _ = self.user()
        quiet.nothing(3 * self.IDLE)  # EOF would be data for select
        sent = writer.chat(quiet_id, "wake up")
        self.assertEqual(quiet.recv(), sent)

    def test_never_logged_in_is_closed(self):
        c = SeedClient(self.node.port)
        self.addCleanup(c.close)
        t0 = time.monotonic()
        c.sock.settimeout(3 * self.IDLE)
        self.assertEqual(c.sock.recv(1024), b"")  # closed, nothing sent
        self.assertGreater(time.monotonic() - t0, self.IDLE - 0.5)


class TestSeedClientLoginAck(SeedCase):
    """Issue 13 part 2: a login ack the seed client can read, and no offline
    message lost.  Its reader is a char[1024] filled by one recv() and parsed
    as a C string: an ack of 1,024 bytes or more has no NUL and crashes it.
    The messages that do not fit in the ack follow it, each read on its own
    (chatd paces legacy output at its default legacy_pace_ms)."""


    def client(self):
        c = SeedClient(self.node.port)
        self.addCleanup(c.close)
        return c

    def rows(self, uid):
        return int(self.stack.sql(self.node.db, "SELECT COUNT(*) FROM offline_messages "
                                  "WHERE user_id = %d" % uid)[0][0])

    def wait_rows(self, uid, n, timeout=30):
        wait_for(lambda: self.rows(uid) == n, timeout=timeout,
                 what="%d offline rows of user %d" % (n, uid))

    def offline_login(self, n):
        tag = uuid.uuid4().hex[:8]
        alice, bob = self.client(), self.client()
        alice_id = alice.register("alice" + tag, "pw")["id"]
        bob_id = bob.register("bob" + tag, "pw")["id"]
        self.assertEqual(alice.login(alice_id, "pw")[0]["errno"], 0)
        sent = [alice.chat(bob_id, "offline %d of %d" % (i, n)) for i in range(n)]
        self.wait_rows(bob_id, n)

        r, view = bob.login(bob_id, "pw")  # one recv(), one document
        self.assertEqual(r["errno"], 0, r)
        self.assertLess(len(bob.last_raw), 1024, "no room for the seed client's NUL")
        got = [m[4] for m in view["offlinemsg"]]
        self.assertLess(len(got), n)
        # the reader thread: each following message in one recv()
        while len(got) < n:
            m = bob.recv()
            self.assertEqual(m["msgid"], 6, m)
            got.append(m["msg"])
        self.assertEqual(got, [m["msg"] for m in sent])
        bob.nothing()
        self.wait_rows(bob_id, 0)
        bob.loginout()
        bob.nothing()
        r, view = bob.login(bob_id, "pw")
        self.assertNotIn("offlinemsg", r)
        bob.nothing()

    def test_login_ack_with_12_offline_messages(self):
        self.offline_login(12)

    def test_login_ack_with_200_offline_messages(self):
        self.offline_login(200)


if __name__ == "__main__":
    unittest.main()
