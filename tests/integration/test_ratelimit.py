"""Rate limits ([limits], issue 12 "Limits, each with a clear answer").

Each limit is tested twice: switched on, the test sees the answer the
protocol promises (protocol 2: errno 125 with retry_after_ms, the request
not executed; legacy: every request runs, but later: reads are paused);
switched off ("off", the harness's default) the same traffic goes through,
so it is the limit, and nothing else, that stopped it.

- per session: messages/s, bytes/s and a class of msgids (echo fixture, no
  servers); a protocol-2 retry after retry_after_ms succeeds;
- legacy flood: reads paused, nothing dropped, the rate held;
- per user, across sessions and nodes (two nodes on one Redis);
- per address: connections, registrations, failed logins; the [server]
  trusted list exempts an address;
- chatd_rate_limited_total counts what was limited, by limit.
"""

import json
import os
import re
import time
import unittest
import urllib.request

from harness import Client, LIMIT_KEYS, Node, Stack, wait_for
from test_net import ECHO_DIR, NodeCase, echo

OFF = {k: "off" for k in LIMIT_KEYS}


def limits(**on):
    """A [limits] section: everything off but the given keys."""
    d = dict(OFF)
    d.update(on)
    return d


def echo_node(lim, **server):
    conf = {"limits": lim}
    if server:
        conf["server"] = server
    return Node(None, plugins=("echo",), plugin_dir=ECHO_DIR, mysql=False,
                redis=False, conf=conf)


def scrape(node, limit):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % node.admin_port,
                                timeout=5) as r:
        text = r.read().decode()
    m = re.search(r'^chatd_rate_limited_total\{[^}]*limit="%s"[^}]*\} (\d+)$'
                  % re.escape(limit), text, re.M)
    return int(m.group(1)) if m else None


def answers(c, n, timeout=10):
    """n answers of a protocol-2 burst: {"echo": [n...], "limited": [msgs]}."""
    out = {"echo": [], "limited": []}
    deadline = time.monotonic() + timeout
    while len(out["echo"]) + len(out["limited"]) < n:
        m = c.recv(max(0.0, deadline - time.monotonic()))
        if m.get("msgid") == 1001:
            out["echo"].append(m["n"])
        elif m.get("msgid") == 11 and m.get("errno") == 125:
            out["limited"].append(m)
        else:
            raise AssertionError("unexpected answer %r" % (m,))
    return out


def burst(c, n, **extra):
    """n echo requests in one write (so in one read on the server)."""
    c.send_raw(b"".join(c.encode(dict(echo(i, **extra), seq=i)) for i in range(n)))


class SessionLimits(NodeCase):
    def node_with(self, lim, **server):
        node = echo_node(lim, **server)
        self.test_nodes.append(node)
        self.addCleanup(self.stopped_ok, node)
        return node

    def test_p2_messages_answer_125_then_retry_succeeds(self):
        for on in (True, False):
            with self.subTest(limit="session_msgs = 5/s burst 5" if on else "off"):
                node = self.node_with(limits(session_msgs="5/s burst 5") if on else OFF)
                c = self.client(node.port, proto=2)
                burst(c, 10)
                got = answers(c, 10)
                if not on:
                    self.assertEqual(sorted(got["echo"]), list(range(10)))
                    continue
                # the burst of 5 runs, the rest is refused, not executed
                self.assertEqual(got["echo"][:5], [0, 1, 2, 3, 4])
                self.assertGreaterEqual(len(got["limited"]), 4)
                for m in got["limited"]:
                    self.assertEqual(m["req"], 1000)
                    self.assertIn(m["seq"], range(5, 10))
                    self.assertTrue(0 < m["retry_after_ms"] <= 1000, m)
                    self.assertIn("rate limited", m["errmsg"])
                # after retry_after_ms, the retry succeeds
                time.sleep(got["limited"][-1]["retry_after_ms"] / 1000.0 + 0.05)
                c.send(dict(echo(99), seq=99))
                self.assertEqual(c.recv()["n"], 99)
                self.assertGreaterEqual(scrape(node, "session_msgs"), 4)

    def test_p2_bytes(self):
        pad = "x" * 600
        for on in (True, False):
            with self.subTest(limit="session_bytes = 2k/s burst 2k" if on else "off"):
                node = self.node_with(limits(session_bytes="2k/s burst 2k") if on else OFF)
                c = self.client(node.port, proto=2)
                burst(c, 6, pad=pad)
                got = answers(c, 6)
                if on:  # about 630 bytes each: three fit in 2 KiB
                    self.assertEqual(got["echo"], [0, 1, 2])
                    self.assertEqual(len(got["limited"]), 3)
                else:
                    self.assertEqual(sorted(got["echo"]), list(range(6)))

    def test_class_limits_only_its_msgids(self):
        for on in (True, False):
            with self.subTest(limit="class.echo = 1000 2/m burst 2" if on else "off"):
                lim = limits(**{"class.echo": "1000 2/m burst 2"}) if on else OFF
                node = self.node_with(lim)
                c = self.client(node.port, proto=2)
                burst(c, 4)
                got = answers(c, 4)
                self.assertEqual(len(got["limited"]), 2 if on else 0)
                # another msgid (1008, the greeting) is not in the class
                c.send({"msgid": 1008})
                self.assertIn("greeting", c.recv_until(lambda m: m.get("msgid") == 1009))
                if on:
                    self.assertEqual(scrape(node, "class.echo"), 2)

    def test_legacy_flood_paused_not_dropped(self):
        # 6000 requests (about 240 KB: several reads of 64 KiB) at a limit
        # of 1000/s: with the limit every one is answered, in order, but it
        # takes seconds (reads paused while the session is in debt); off,
        # the same flood is answered at once
        n, rate = 6000, 1000
        for on in (True, False):
            with self.subTest(limit="session_msgs = 1000/s burst 100" if on else "off"):
                node = self.node_with(limits(session_msgs="%d/s burst 100" % rate)
                                      if on else OFF)
                mark = node.log_mark()
                c = self.client(node.port, timeout=30)
                t0 = time.monotonic()
                c.send_raw(b"".join(c.encode(echo(i, pad="p" * 10)) for i in range(n)))
                for i in range(n):
                    m = c.recv(timeout=30)
                    self.assertEqual(m.get("n"), i, "answer %d out of order or lost" % i)
                took = time.monotonic() - t0
                if on:
                    # one read (~64 KiB, 1600 requests) may run ahead; the
                    # rest waits for tokens at 1000/s
                    self.assertGreater(took, (n - 100 - 1700) / rate * 0.8)
                    self.assertTrue(node.log_text().find("reads paused", mark) >= 0)
                    self.assertGreater(scrape(node, "session_msgs"), 0)
                else:
                    self.assertLess(took, 2.0)

    def test_trusted_address_is_exempt(self):
        node = self.node_with(limits(session_msgs="2/m burst 2"), trusted="127.0.0.1")
        c = self.client(node.port, proto=2)
        burst(c, 5)
        self.assertEqual(len(answers(c, 5)["echo"]), 5)
        # a client from another loopback address is limited
        c2 = Client(node.port, proto=2, source="127.0.0.2")
        self.addCleanup(c2.close)
        burst(c2, 5)
        self.assertEqual(len(answers(c2, 5)["limited"]), 3)

    def test_connection_rate_per_address(self):
        for on in (True, False):
            with self.subTest(limit="addr_conns = 1/m burst 3" if on else "off"):
                node = self.node_with(limits(addr_conns="1/m burst 3") if on else OFF)
                kept = [self.client(node.port) for _ in range(3)]
                for i, c in enumerate(kept):
                    c.send(echo(i))
                    self.assertEqual(c.recv()["n"], i)
                extra = self.client(node.port)
                if on:
                    self.assertTrue(extra.closed(5), "a 4th connection within the minute was kept")
                    self.assertEqual(scrape(node, "addr_conns"), 1)
                    other = self.client(node.port, source="127.0.0.2")
                    other.send(echo(7))
                    self.assertEqual(other.recv()["n"], 7)
                else:
                    extra.send(echo(9))
                    self.assertEqual(extra.recv()["n"], 9)


class StackLimits(NodeCase):
    """Limits that need logins: MariaDB and Redis."""

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()

    def full_node(self, lim, db=None, **kw):
        conf = {"limits": lim, "plugin.login": {"hash_cost": 1}}
        node = Node(self.stack, db=db, conf=conf, **kw)
        self.test_nodes.append(node)
        self.addCleanup(self.stopped_ok, node)
        return node

    def test_registrations_per_address(self):
        for on in (True, False):
            with self.subTest(limit="addr_regs = 3/m burst 3" if on else "off"):
                node = self.full_node(limits(addr_regs="3/m burst 3") if on else OFF)
                c = self.client(node.port, proto=2)
                for i in range(3):
                    c.register("r%d" % i, "pw")
                ack = c.request({"msgid": 4, "name": "r3", "password": "pw"})
                if on:
                    self.assertEqual(ack["errno"], 125, ack)
                    self.assertGreater(ack["retry_after_ms"], 1000)
                    # another address registers
                    c2 = self.client(node.port, proto=2, source="127.0.0.2")
                    c2.register("r4", "pw")
                else:
                    self.assertEqual(ack["errno"], 0, ack)
                self.stopped_ok(node)  # user ids restart at 1: free the presence

    def test_failed_logins_per_address(self):
        for on in (True, False):
            with self.subTest(limit="addr_login_failures = 3/m burst 3" if on else "off"):
                node = self.full_node(limits(addr_login_failures="3/m burst 3")
                                      if on else OFF)
                c = self.client(node.port, proto=2)
                uid = c.register("victim", "right")
                for _ in range(3):
                    self.assertEqual(c.login(uid, "wrong")["errno"], 1)
                ack = c.login(uid, "right")
                if on:  # even the right password waits: the address guessed
                    self.assertEqual(ack["errno"], 125, ack)
                    c2 = self.client(node.port, proto=2, source="127.0.0.2")
                    self.assertEqual(c2.login(uid, "right")["errno"], 0)
                else:
                    self.assertEqual(ack["errno"], 0, ack)
                self.stopped_ok(node)  # user ids restart at 1: free the presence

    def test_user_limit_across_sessions_and_nodes(self):
        # 5 requests a minute per user: what one session used, the next
        # session of the user (here, then on another node) cannot use again
        lim = limits(user_msgs="1/m burst 5")
        for on in (True, False):
            with self.subTest(limit="user_msgs = 1/m burst 5" if on else "off"):
                self.stack.redis_cli("EVAL", "for _,k in ipairs(redis.call('KEYS',"
                                     "'chatd:rl:u:*')) do redis.call('DEL',k) end", "0")
                a = self.full_node(lim if on else OFF)
                b = self.full_node(lim if on else OFF, db=a.db, migrate=False)
                c = self.client(a.port, proto=2)
                uid = c.register("u", "pw")
                self.assertEqual(c.login(uid, "pw")["errno"], 0)
                for _ in range(4):
                    self.assertEqual(c.request({"msgid": 13, "id": uid})["errno"], 0)
                c.close()
                # a new session on the same node: one left
                c = self.client(a.port, proto=2)
                wait_for(lambda: c.login(uid, "pw")["errno"] == 0, 10,
                         what="a login after the first session closed")
                errs = [c.request({"msgid": 13, "id": uid})["errno"] for _ in range(2)]
                self.assertEqual(errs, [0, 125] if on else [0, 0])
                c.close()
                # the other node: the bucket comes along through Redis (one
                # round trip late: the first request may pass)
                c = self.client(b.port, proto=2)
                wait_for(lambda: c.login(uid, "pw")["errno"] == 0, 10,
                         what="a login on the second node")
                # the first request asks Redis for the bucket and may pass;
                # once the answer is in (b logs it), nothing more passes
                first = c.request({"msgid": 13, "id": uid})["errno"]
                self.assertIn(first, (0, 125) if on else (0,))
                if on:
                    b.wait_log("bucket full again in", timeout=15)
                errs = [c.request({"msgid": 13, "id": uid})["errno"] for _ in range(3)]
                self.assertEqual(errs, [125, 125, 125] if on else [0, 0, 0])
                self.stopped_ok(a)
                self.stopped_ok(b)


if __name__ == "__main__":
    unittest.main()
