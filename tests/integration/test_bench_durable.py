"""chat-bench --durable against one node (issue 8): the load generator's
durable modes count what the guarantee promises.

pairs --durable: every message is acknowledged after its COMMIT and
delivered once (0 lost, 0 duplicated, 0 out of order).  group --durable
(new): members log in with protocol 2, each message carries a cid, the
sender's credit comes back with the ACK and the deliveries to the other
members are counted; 0 lost / dup / ooo, and each message is stored once,
not once per member (rows in `messages` for the group's conversation ==
messages sent).  Short runs (1 s), a few users.
"""

import os
import subprocess
import tempfile
import unittest

import harness
from harness import Node, Stack

PLUGINS = ("login", "friend", "one2one", "group", "offline", "store")
FAST = {"plugin.login": {"hash_cost": 1}}
BENCH = os.path.join(os.path.dirname(harness.CHATD), "chat-bench")


class BenchDurable(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.node = Node(cls.stack, plugins=PLUGINS, conf=FAST)
        cls.tmp = tempfile.mkdtemp(prefix="chat-bench-durable-")

    @classmethod
    def tearDownClass(cls):
        if cls.node:
            assert cls.node.stop() == 0

    def bench(self, *args):
        if not os.access(BENCH, os.X_OK):
            self.fail("chat-bench not built at %s" % BENCH)
        r = subprocess.run([BENCH] + list(args) + [
            "-t", "127.0.0.1:%d" % self.node.port, "--warmup", "0.5", "--duration", "1",
            "--drain", "5", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        out = r.stdout.decode()
        self.assertEqual(r.returncode, 0, "%s\n%s" % (out, r.stderr.decode()))
        kv = dict(f.split("=", 1) for f in out.split() if "=" in f)
        self.assertGreater(int(kv["count"]), 0, out)
        self.assertGreater(int(kv["received"]), 0, out)
        for k in ("lost", "dup", "ooo", "corrupt", "errors"):
            self.assertEqual(kv[k], "0", "%s: %s" % (k, out))
        return kv

    def test_pairs_durable(self):
        kv = self.bench("pairs", "--durable", "-P", "3", "-W", "4",
                        "--ids", os.path.join(self.tmp, "pairs.txt"))
        self.assertEqual(kv["scenario"], "pairs-durable")

    def test_group_durable_stored_once(self):
        ids = os.path.join(self.tmp, "group.txt")
        kv = self.bench("group", "--durable", "-G", "6", "-S", "2", "-W", "4", "--ids", ids)
        self.assertEqual(kv["scenario"], "group-durable")
        sent = int(kv["sent"])
        self.assertEqual(int(kv["expected"]), sent * 5)   # to the 5 other members
        self.assertEqual(int(kv["received"]), sent * 5)
        # one row per message, not per member: every durable row of this
        # run is a group message (the pairs test stores only pair rows)
        rows = self.stack.sql(self.node.db, "SELECT COUNT(*), COUNT(DISTINCT id) "
                              "FROM messages WHERE conv_id < 0")
        self.assertEqual(int(rows[0][0]), sent)
        self.assertEqual(int(rows[0][1]), sent)


if __name__ == "__main__":
    unittest.main()
