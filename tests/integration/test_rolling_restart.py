"""A rolling restart of a 3-node cluster behind nginx, under chat traffic,
through the admin listener: drain a node, stop it, start it, wait for
/readyz, then the next one.  No acknowledged message may be lost.

Real chatd x3 (one database, one Redis), Debian's nginx with its stream
module (test_nginx_cluster.Nginx, from contrib/nginx/nginx.conf.in), and
protocol-2 clients (harness.Client) that all connect through nginx and
behave as docs/protocol.md asks on NOTICE 119: keep reading until the
server closes, then connect again and log in.  A sender sends numbered
one-to-one messages round robin to the recipients and records the numbers
whose ACK (errno 0) it got; a message whose ACK never came (the connection
closed first) was not acknowledged and may be lost.  Every acknowledged
number must reach its recipient, live or from the offline store at its next
login.

Skipped only when nginx or its stream module is not installed.
"""

import json
import threading
import time
import unittest
import uuid

from harness import Client, Node, Stack, free_port, wait_for
import test_nginx_cluster as ngx

RECIPIENTS = 3
DRAIN_S = 2


class Peer:
    """A user that reconnects through nginx whenever its session ends."""

    def __init__(self, port, name):
        self.port, self.name = port, name
        c = self.connect()
        self.uid = c.register(name, "pw")
        c.close()
        self.got = []          # msg texts of msgid 6 received
        self.notices = []      # errno of NOTICEs
        self.logins = 0
        self.stop = False

    def connect(self):
        def try_connect():
            try:
                return Client(self.port, proto=2)
            except OSError:
                return None
        return wait_for(try_connect, timeout=30, interval=0.1,
                        what="%s to connect through nginx" % self.name)

    def session(self):
        """A logged-in client (retries while the old session still holds
        the user somewhere: multi_login refuse answers 110)."""
        deadline = time.monotonic() + 30
        while True:
            c = self.connect()
            try:
                ack = c.login(self.uid, "pw")
                if ack.get("errno") == 0:
                    self.logins += 1
                    for m in ack.get("offlinemsg") or []:
                        self.take(json.loads(m) if isinstance(m, str) else m)
                    return c
            except (EOFError, OSError, TimeoutError):
                pass
            c.close()
            if time.monotonic() > deadline:
                raise AssertionError("%s could not log in again" % self.name)
            time.sleep(0.1)

    def take(self, m):
        if m.get("msgid") == 6:
            self.got.append(m.get("msg"))
        elif m.get("msgid") == 12:
            self.notices.append(m.get("errno"))

    def run_recipient(self):
        while not self.stop:
            c = self.session()
            try:
                while True:  # until the server closes (also after 119)
                    try:
                        self.take(c.recv(timeout=0.3))
                    except TimeoutError:
                        if self.stop:
                            break
            except (EOFError, OSError):
                pass
            c.close()


@unittest.skipIf(ngx.NGINX is None, ngx.LOAD_MODULE)
class RollingRestart(unittest.TestCase):
    def test_rolling_restart_loses_no_acknowledged_message(self):
        stack = Stack()
        db = stack.new_database("rolling")
        nodes = []
        for i in range(3):
            n = Node(stack, db=db, node_id="roll-%d-%s" % (i, uuid.uuid4().hex[:6]),
                     migrate=(i == 0))
            self.addCleanup(n.stop)
            nodes.append(n)
        lb = ngx.Nginx(free_port(), [n.port for n in nodes])
        self.addCleanup(lb.stop)

        recips = [Peer(lb.port, "r%d%s" % (i, uuid.uuid4().hex[:6]))
                  for i in range(RECIPIENTS)]
        sender = Peer(lb.port, "s" + uuid.uuid4().hex[:6])
        threads = [threading.Thread(target=p.run_recipient, daemon=True) for p in recips]
        for t in threads:
            t.start()
        wait_for(lambda: all(p.logins for p in recips), timeout=30,
                 what="the recipients to log in")

        acked = {p.uid: [] for p in recips}
        unacked = []
        state = {"stop": False, "sent": 0}

        def send_loop():
            c = sender.session()
            k = 0
            while not state["stop"]:
                k += 1
                to = recips[k % RECIPIENTS]
                text = "n%d" % k
                try:
                    ack = c.request({"msgid": 6, "id": sender.uid, "toid": to.uid,
                                     "msg": text}, timeout=5)
                    while ack.get("msgid") != 11:
                        ack = c.recv(timeout=5)
                    if ack.get("errno") == 0:
                        acked[to.uid].append(text)
                    else:
                        unacked.append((text, ack.get("errno")))
                except (EOFError, OSError, TimeoutError):
                    unacked.append((text, "closed"))
                    c.close()
                    c = sender.session()
                state["sent"] = k
                time.sleep(0.01)
            c.close()

        st = threading.Thread(target=send_loop, daemon=True)
        st.start()
        wait_for(lambda: state["sent"] >= 20, timeout=20, what="traffic")

        for i, n in enumerate(nodes):
            before = state["sent"]
            code, _, body = n.admin("POST", "/drain?seconds=%d" % DRAIN_S)
            self.assertEqual(code, 202, body)
            self.assertEqual(n.admin("GET", "/readyz")[0], 503)
            wait_for(lambda: n.admin("GET", "/sessions?limit=0")[2]["total"] == 0,
                     timeout=DRAIN_S + 10, what="node %d to empty" % i)
            self.assertEqual(n.stop(), 0)
            n.restart()
            wait_for(lambda: n.admin("GET", "/readyz")[0] == 200, timeout=20,
                     what="node %d ready again" % i)
            # traffic flowed while this node was out and back
            wait_for(lambda: state["sent"] >= before + 20, timeout=30,
                     what="traffic after restarting node %d" % i)

        state["stop"] = True
        st.join(30)
        # every acknowledged message arrives (live or from the offline store)
        def complete():
            return all(set(acked[p.uid]) <= set(p.got) for p in recips)
        try:
            wait_for(complete, timeout=20, what="every acknowledged message")
        finally:
            for p in recips:
                p.stop = True
            for t in threads:
                t.join(10)
        lost = {p.name: sorted(set(acked[p.uid]) - set(p.got), key=lambda s: int(s[1:]))
                for p in recips}
        self.assertEqual({k: v for k, v in lost.items() if v}, {},
                         "acknowledged but never received")
        total = sum(len(v) for v in acked.values())
        self.assertGreater(total, 60)
        # the protocol-2 clients were told to move
        self.assertTrue(any(119 in p.notices for p in recips),
                        [p.notices for p in recips])
        print("\nrolling restart: %d acknowledged messages, %d not acknowledged, "
              "recipients logged in %s times"
              % (total, len(unacked), [p.logins for p in recips]))


if __name__ == "__main__":
    unittest.main()
