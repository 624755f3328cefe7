"""Each business plugin (login, friend, one2one, group, offline) replaced and
reloaded with SIGHUP while clients chat: numbered one-to-one and group
messages, to online users in both protocols and to an offline user, keep
flowing; afterwards every message arrived exactly once and in order, no
connection was dropped, and the log shows the reload."""
import os
import re
import shutil
import tempfile
import time
import unittest

from harness import PLUGIN_DIR, Node, Stack, wait_for
from test_one2one import FAST_LOGIN, ChatCase, is_msg, loads_maybe, merge_conf

PLUGINS = ("login", "friend", "one2one", "group", "offline")
ROUNDS = 60          # chat rounds per test
RELOAD_AT = 15       # the round after which the plugin is replaced


def install(plugdir, name):
    """Copy the built NAME.so into plugdir as a new file (new inode, new
    mtime), renamed over the old one as a deployment would."""
    tmp = os.path.join(plugdir, ".%s.so.tmp" % name)
    shutil.copyfile(os.path.join(PLUGIN_DIR, name + ".so"), tmp)
    os.replace(tmp, os.path.join(plugdir, name + ".so"))


class PluginReload(ChatCase):

    @classmethod
    def setUpClass(cls):
        pass  # a node per test, on its own copy of the plugins

    def setUp(self):
        self.plugdir = tempfile.mkdtemp(prefix="chatd-plugins-")
        self.addCleanup(shutil.rmtree, self.plugdir, True)
        for name in PLUGINS:
            install(self.plugdir, name)
        type(self).class_nodes = []
        self.node = type(self).start_node(plugin_dir=self.plugdir)

    def tearDown(self):
        for node in type(self).class_nodes:
            self.stopped_ok(node)

    @classmethod
    def start_node(cls, conf=None, **kw):
        node = Node(Stack(), conf=merge_conf(FAST_LOGIN, conf), **kw)
        cls.class_nodes.append(node)
        return node

    def load_number(self, plugin, since=0):
        """The load number of the newest instance of plugin in the log."""
        found = re.findall(r"plugin %s \S+ \(ABI [0-9.]+, load (\d+)\): initialised"
                           % plugin, self.node.log_text()[since:])
        return int(found[-1]) if found else None

    def chat_through_reload(self, plugin):
        old_load = self.load_number(plugin)
        self.assertIsNotNone(old_load, "the log names the plugin's load")
        retired = "plugin %s (load %d): retired" % (plugin, old_load)
        s1, s2 = self.user(proto=1), self.user(proto=2)
        r1, r2 = self.user(proto=1), self.user(proto=2)
        off_id, off_name = self.register()
        gid = s2.c.request({"msgid": 8, "id": s2.id, "groupname": self.uname("rl")})["groupid"]
        for u in (s1, r1, r2):
            u.c.send({"msgid": 9, "id": u.id, "groupid": gid})
        off = self.login(off_id, off_name, proto=2)
        self.expect_ack(off, {"msgid": 9, "id": off.id, "groupid": gid})
        self.drop(off)
        s2.c.request({"msgid": 13})  # s2's joins are done, and the others' sent before
        self.wait_members(gid, 5)

        received = {r1.id: [], r2.id: []}
        acks = []
        mark = None
        reloaded = False

        def drain(timeout=0.001):
            for r in (r1, r2):
                while True:
                    try:
                        m = r.c.recv(timeout)
                    except TimeoutError:
                        break
                    if m.get("msgid") in (6, 10):
                        received[r.id].append((m["msgid"], m["id"], m["msg"]))
            for s in (s1, s2):  # acks (s2), and the other sender's group messages
                while True:
                    try:
                        m = s.c.recv(0.001)
                    except TimeoutError:
                        break
                    if m.get("msgid") == 11:
                        acks.append(m)

        for k in range(ROUNDS):
            for s in (s1, s2):
                for to in (r1.id, r2.id, off_id):
                    s.c.send(s.one(to, "%s o%d" % (s.id, k)))
                s.c.send(s.group_msg(gid, "%s g%d" % (s.id, k)))
            drain()
            if k == RELOAD_AT:
                install(self.plugdir, plugin)
                mark = self.node.log_mark()
                self.node.sighup()
            if mark is not None and not reloaded:
                reloaded = retired in self.node.log_text()[mark:]
            if k == ROUNDS - 5 and not reloaded:  # the last rounds run on the new instance
                self.node.wait_log(retired, since=mark)
                reloaded = True
            drain(0.005)  # paces the rounds so that the chat spans the reload

        def want(kind_filter):
            out = []
            for k in range(ROUNDS):
                for s in (s1, s2):
                    if 6 in kind_filter:
                        out.append((6, s.id, "%s o%d" % (s.id, k)))
                    if 10 in kind_filter:
                        out.append((10, s.id, "%s g%d" % (s.id, k)))
            return out

        total = len(want((6, 10)))
        deadline = time.monotonic() + 15
        while (any(len(v) < total for v in received.values()) or len(acks) < ROUNDS * 4) \
                and time.monotonic() < deadline:
            drain(0.05)
        drain(0.3)  # anything extra (a duplicate) shows up here

        for r in (r1, r2):
            got = received[r.id]
            self.assertEqual(len(got), len(set(got)), "duplicates for user %d" % r.id)
            self.assertEqual(sorted(got), sorted(want((6, 10))), "lost for user %d" % r.id)
            for s in (s1, s2):  # each sender's stream in order
                for kind in (6, 10):
                    stream = [m for m in got if m[0] == kind and m[1] == s.id]
                    self.assertEqual(stream, [m for m in want((kind,)) if m[1] == s.id],
                                     "order of %d from %d to %d" % (kind, s.id, r.id))
        self.assertEqual(len(acks), ROUNDS * 4, "one ack per protocol-2 request")
        self.assertEqual([a for a in acks if a.get("errno") != 0], [])
        for u in (s1, s2, r1, r2):
            self.assertFalse(u.c.eof, "connection of user %d dropped" % u.id)

        off = self.login(off_id, off_name)
        stored = [loads_maybe(m) for m in off.ack.get("offlinemsg", [])]
        # a legacy ack holds what fits in 1,023 bytes; the rest follows it
        while len(stored) < len(want((6, 10))):
            stored.append(off.c.recv())
        got = [(m["msgid"], m["id"], m["msg"]) for m in stored]
        self.assertEqual(len(got), len(set(got)), "duplicated offline messages")
        self.assertEqual(sorted(got), sorted(want((6, 10))), "lost offline messages")
        # after the reload the plugin still does its job
        n = self.user(proto=2)
        self.expect_ack(n, {"msgid": 7, "id": n.id, "friendid": s1.id})
        self.assertEqual([f["id"] for f in n.c.request({"msgid": 13})["friends"]], [s1.id])
        self.expect_ack(n, {"msgid": 9, "id": n.id, "groupid": gid})
        self.expect_ack(n, n.group_msg(gid, "after"))
        self.assertEqual(r2.c.recv_until(is_msg(10))["msg"], "after")
        self.node.wait_log("plugin %s (load %d): finalised and unloaded" % (plugin, old_load))
        self.assertGreater(self.load_number(plugin, mark), old_load, "a new instance")

    def wait_members(self, gid, n):
        wait_for(lambda: self.stack_sql("SELECT COUNT(*) FROM group_members WHERE "
                                        "group_id = %d" % gid) == [(str(n),)], 10)

    def stack_sql(self, q):
        return self.node.stack.sql(self.node.db, q)

    def test_reload_login(self):
        self.chat_through_reload("login")

    def test_reload_friend(self):
        self.chat_through_reload("friend")

    def test_reload_one2one(self):
        self.chat_through_reload("one2one")

    def test_reload_group(self):
        self.chat_through_reload("group")

    def test_reload_offline(self):
        self.chat_through_reload("offline")


if __name__ == "__main__":
    unittest.main()
