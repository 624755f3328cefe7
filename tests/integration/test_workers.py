"""Several worker processes on one port (chatd -w 2, SO_REUSEPORT): each is
a node on the bus, users on different workers chat through Redis, and the
supervisor stops them all gracefully."""
import unittest

from harness import Client, Node, Stack, admin_request, wait_for


def _ready(port):
    try:
        return admin_request(port, "GET", "/readyz")[0] == 200
    except OSError:
        return False


class WorkersTest(unittest.TestCase):
    def test_two_workers_share_the_port_and_the_bus(self):
        stack = Stack()
        node = Node(stack, args=("-w", "2"), node_id="wk",
                    conf={"plugin.login": {"hash_cost": 1}})
        wait_for(lambda: node.log_text().count("listening on") >= 2, 20,
                 what="both workers listening")
        # ready: each worker's database and Redis links are up (a slow,
        # sanitized build may still be connecting when it listens)
        for i in range(2):
            wait_for(lambda: _ready(node.admin_port + i), 30,
                     what="worker %d ready" % i)
        clients, ids = [], []
        try:
            for i in range(16):
                c = Client(node.port)
                uid = c.register("worker-user-%d" % i, "pw")
                self.assertEqual(c.login(uid, "pw")["errno"], 0)
                clients.append(c)
                ids.append(uid)
            # which worker holds each user, as the bus announced it
            holder = {uid: stack.redis_cli("GET", "chatd:user:%d" % uid) for uid in ids}
            self.assertEqual(set(holder.values()), {"wk-w0", "wk-w1"},
                             "16 connections should land on both workers")
            a = next(i for i, u in enumerate(ids) if holder[u] == "wk-w0")
            b = next(i for i, u in enumerate(ids) if holder[u] == "wk-w1")
            for src, dst in ((a, b), (b, a)):
                clients[src].send({"msgid": 6, "id": ids[src], "name": "x",
                                   "toid": ids[dst], "msg": "across workers",
                                   "time": "2026-01-01 00:00:00"})
                got = clients[dst].recv_until(lambda m: m.get("msgid") == 6)
                self.assertEqual((got["id"], got["msg"]), (ids[src], "across workers"))
        finally:
            for c in clients:
                c.close()
        self.assertEqual(node.stop(), 0)
        self.assertGreaterEqual(node.log_text().count("] stopped"), 2)


if __name__ == "__main__":
    unittest.main()
