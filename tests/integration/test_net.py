"""The network layer of chatd over real TCP, with the "echo" test plugin only
(no MariaDB, no Redis): framing, frame and connection limits, idle timeout,
slow readers, protocol errors (legacy: silence; protocol 2: error replies),
graceful stop on SIGTERM/SIGINT and reload on SIGHUP.

The echo fixture (build/tests/plugins/v1/echo.so) answers
{"msgid":1000,"n":N} with {"msgid":1001,"ver":1,"n":N,"count":requests}, and
{"msgid":1004,"count":C,"size":S} with C messages {"msgid":1005,"i":i,"pad":...}
of S bytes of padding each.
"""

import os
import re
import signal
import socket
import sys
import time
import unittest

from harness import Client, Node, TEST_PLUGIN_DIR, wait_for

ECHO_DIR = os.path.join(TEST_PLUGIN_DIR, "v1")


def echo_node(**server):
    """A chatd with only the echo plugin; keyword arguments go to [server]."""
    return Node(None, plugins=("echo",), plugin_dir=ECHO_DIR, mysql=False,
                redis=False, conf={"server": server} if server else None)


def echo(n, **extra):
    return dict({"msgid": 1000, "n": n}, **extra)


def echo_reply(n):
    return {"msgid": 1001, "ver": 1, "n": n}


def echoed(m):
    """The reply without the fixture's running "count" of requests."""
    return {k: v for k, v in m.items() if k != "count"}


def is_echo(n):
    return lambda m: m.get("msgid") == 1001 and m.get("n") == n


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def log_has(node, pattern, since=0):
    return re.search(pattern, node.log_text()[since:], re.I)


class NodeCase(unittest.TestCase):
    """Prints the logs of the nodes a failed test used; checks exit codes."""

    nodes = ()

    def run(self, result=None):
        before = len(result.failures) + len(result.errors) if result else 0
        self.test_nodes = []
        out = super().run(result)
        if result and len(result.failures) + len(result.errors) > before:
            for node in list(self.test_nodes) + list(type(self).nodes):
                sys.stderr.write("---- %s (tail)\n%s\n" % (node.log_path, node.log_tail(60)))
        return out

    def node(self, **server):
        node = echo_node(**server)
        self.test_nodes.append(node)
        self.addCleanup(self.stopped_ok, node)
        return node

    def client(self, port, **kw):
        c = Client(port, **kw)
        self.addCleanup(c.close)
        return c

    @staticmethod
    def stopped_ok(node):
        rc = node.stop()
        if rc != 0:
            raise AssertionError("chatd exited with %r\n%s" % (rc, node.log_tail()))

    @classmethod
    def class_node(cls, **server):
        node = echo_node(**server)
        cls.nodes = (node,)
        cls.addClassCleanup(cls.stopped_ok, node)
        return node


class Framing(NodeCase):
    @classmethod
    def setUpClass(cls):
        cls.port = cls.class_node().port

    def test_nul_terminated(self):
        c = self.client(self.port)
        c.send_raw(b'{"msgid":1000,"n":1}\0')
        self.assertEqual(echoed(c.recv()), echo_reply(1))

    def test_newline_delimited(self):
        c = self.client(self.port, term=b"\n")
        for n in range(3):
            c.send(echo(n))
            self.assertEqual(echoed(c.recv()), echo_reply(n))

    def test_back_to_back(self):
        c = self.client(self.port)
        c.send_raw(b'{"msgid":1000,"n":1}{"msgid":1000,"n":2}')
        self.assertEqual(echoed(c.recv()), echo_reply(1))
        self.assertEqual(echoed(c.recv()), echo_reply(2))

    def test_split_across_sends(self):
        c = self.client(self.port)
        # braces and an escaped quote inside a string must not end the frame
        data = b'{"msgid":1000,"s":"a}b{c\\"d}","n":7}\0'
        cuts = [0, 1, 9, 14, 21, 24, 30, len(data)]
        for a, b in zip(cuts, cuts[1:]):
            c.send_raw(data[a:b])
            if b < len(data) - 1:
                c.expect_nothing(0.05)  # also spaces the sends out
        self.assertEqual(echoed(c.recv()), echo_reply(7))

    def test_byte_by_byte(self):
        c = self.client(self.port, term=b"\n")
        for byte in c.encode(echo(8)):
            c.send_raw(bytes([byte]))
        self.assertEqual(echoed(c.recv()), echo_reply(8))

    def test_many_in_one_send(self):
        c = self.client(self.port)
        seps = [b"\0", b"\n", b"\r\n", b" ", b"\t", b"", b"\0\0\n"]
        data = b"".join(b'{"msgid":1000,"n":%d}' % n + seps[n % len(seps)]
                        for n in range(300))
        c.send_raw(data)
        for n in range(300):
            self.assertEqual(echoed(c.recv()), echo_reply(n))

    def test_reply_is_compact_json_and_newline(self):
        c = self.client(self.port)
        c.send(echo(5, s="x y"))
        deadline = time.monotonic() + 5
        while b"\n" not in c.buf:  # look at the bytes, not the parsed object
            self.assertFalse(c.eof)
            self.assertLess(time.monotonic(), deadline, "no reply")
            c._fill(deadline - time.monotonic())
        line = bytes(c.buf[:c.buf.index(b"\n") + 1])
        self.assertNotIn(b": ", line)
        self.assertNotIn(b", ", line)
        self.assertTrue(line.startswith(b"{") and line.endswith(b"}\n"), line)


class Malformed(NodeCase):
    # (frame, errno or tuple of allowed ones, req, seq): what a protocol-2
    # session gets back
    CASES = [
        (b'{"msgid":1000,}', 100, None, None),
        (b'{"msgid" 1000,"seq":3}', 100, None, None),
        (b'{"msgid":tru,"seq":4}', 100, None, None),
        # the framer only knows objects: a top-level array is bytes outside
        # any object, reported as 101 (not an object) or 100 (bad JSON)
        (b'[1,2,3]', (100, 101), None, None),
        (b'{"n":1,"seq":11}', 102, None, 11),
        (b'{"msgid":"1000","seq":12}', 102, None, 12),
        (b'{"msgid":1000.5,"seq":13}', 102, None, 13),
        (b'{"msgid":null,"seq":14}', 102, None, 14),
        (b'{"msgid":99999,"seq":15}', 103, 99999, 15),
    ]

    @classmethod
    def setUpClass(cls):
        cls.port = cls.class_node().port

    def test_legacy_ignored_and_connection_kept(self):
        c = self.client(self.port)
        for n, (frame, _, _, _) in enumerate(self.CASES):
            with self.subTest(frame=frame):
                c.send_raw(frame + b"\0")
                c.expect_nothing(0.2)
                self.assertFalse(c.eof, "connection closed after %r" % frame)
                c.send(echo(n))
                self.assertEqual(echoed(c.recv()), echo_reply(n))

    def test_proto2_error_replies(self):
        c = self.client(self.port, proto=2)
        c.send(echo(-1))
        c.recv_until(is_echo(-1))
        for n, (frame, errno_, req, seq) in enumerate(self.CASES):
            errnos = errno_ if isinstance(errno_, tuple) else (errno_,)
            with self.subTest(frame=frame):
                c.send_raw(frame + b"\n")
                c.send(echo(n))
                got = []
                while True:
                    m = c.recv()
                    if is_echo(n)(m):
                        break
                    got.append(m)
                self.assertTrue(got, "no error reply to %r" % frame)
                err = got[0]
                self.assertEqual(err.get("msgid"), 11, err)
                self.assertIn(err.get("errno"), errnos, err)
                self.assertIn("req", err)
                self.assertEqual(err["req"], req, err)
                self.assertIsInstance(err.get("errmsg"), str, err)
                self.assertTrue(err["errmsg"], err)
                if seq is not None:
                    self.assertEqual(err.get("seq"), seq, err)
                for other in got[1:]:  # garbage may be reported more than once
                    self.assertEqual(other.get("msgid"), 11, other)
                    self.assertIn(other.get("errno"), errnos, other)


class FrameLimit(NodeCase):
    @classmethod
    def setUpClass(cls):
        cls.port = cls.class_node(max_frame=1024).port

    def test_legacy_oversize_closes(self):
        c = self.client(self.port)
        c.send(echo(1, pad="x" * 700))
        self.assertEqual(echoed(c.recv()), echo_reply(1))
        c.send(echo(2, pad="x" * 2000))
        self.assertTrue(c.closed(5), "over-size frame did not close the connection")
        self.assertRaises(EOFError, c.recv, 0.1)

    def test_legacy_unterminated_oversize_closes(self):
        c = self.client(self.port)
        c.send_raw(b'{"msgid":1000,"n":3,"pad":"' + b"y" * 3000)
        self.assertTrue(c.closed(5))

    def test_proto2_oversize_error_then_close(self):
        c = self.client(self.port, proto=2)
        c.send(echo(4))
        c.recv_until(is_echo(4))
        c.send(echo(5, pad="z" * 2000, seq=9))
        err = c.recv()
        self.assertEqual(err.get("msgid"), 11, err)
        self.assertEqual(err.get("errno"), 114, err)
        self.assertTrue(c.closed(5), "over-size frame did not close the connection")

    def test_others_unaffected(self):
        other = self.client(self.port)
        bad = self.client(self.port)
        bad.send(echo(6, pad="x" * 5000))
        self.assertTrue(bad.closed(5))
        other.send(echo(7))
        self.assertEqual(echoed(other.recv()), echo_reply(7))


class ConnectionLimit(NodeCase):
    def test_max_connections(self):
        node = self.node(max_connections=2)
        mark = node.log_mark()
        a = self.client(node.port)
        b = self.client(node.port)
        for n, c in enumerate((a, b)):
            c.send(echo(n))
            self.assertEqual(echoed(c.recv()), echo_reply(n))
        extra = self.client(node.port)
        t0 = time.monotonic()
        self.assertTrue(extra.closed(5), "connection over max_connections kept open")
        self.assertLess(time.monotonic() - t0, 2.0)
        wait_for(lambda: log_has(node, r"max.?connections|too many connections|connection limit",
                                 mark), 5, what="a log line about max_connections")
        # the two sessions are unharmed, and a freed slot can be reused
        b.send(echo(3))
        self.assertEqual(echoed(b.recv()), echo_reply(3))
        a.close()

        def fresh_client_served():
            c = Client(node.port)
            try:
                c.send(echo(4))
                return echoed(c.recv(2)) == echo_reply(4)
            except (EOFError, OSError):
                return False
            finally:
                c.close()
        wait_for(fresh_client_served, 10, interval=0.1, what="a freed connection slot")


class IdleTimeout(NodeCase):
    @classmethod
    def setUpClass(cls):
        cls.port = cls.class_node(idle_timeout=1).port

    def test_silent_client_closed(self):
        c = self.client(self.port)
        t0 = time.monotonic()
        self.assertTrue(c.closed(6), "idle connection not closed")
        self.assertGreaterEqual(time.monotonic() - t0, 0.8)

    def test_active_client_kept(self):
        c = self.client(self.port)
        t0, n = time.monotonic(), 0
        while time.monotonic() - t0 < 2.5:
            c.send(echo(n))
            self.assertEqual(echoed(c.recv()), echo_reply(n))
            c.expect_nothing(0.3)
            n += 1
        self.assertFalse(c.eof)
        self.assertTrue(c.closed(6), "idle connection not closed once quiet")

    def test_proto2_idle_notice(self):
        c = self.client(self.port, proto=2)
        c.send(echo(1))
        c.recv_until(is_echo(1))
        self.assertTrue(c.closed(6))
        notices = []
        while True:
            try:
                notices.append(c.recv(0.1))
            except EOFError:
                break
        self.assertTrue(any(m.get("msgid") == 12 and m.get("errno") == 117 for m in notices),
                        notices)


class SlowReader(NodeCase):
    def test_slow_reader_disconnected(self):
        node = self.node(max_output=65536)
        mark = node.log_mark()
        other = self.client(node.port)
        slow = self.client(node.port, rcvbuf=4096)
        slow.send({"msgid": 1004, "count": 20000, "size": 1000})
        # never read from `slow` until the server has given up on it
        wait_for(lambda: log_has(node, r"slow|max_output|output (queue|buffer)", mark), 15,
                 what="a log line about the slow reader")
        other.send(echo(1))
        self.assertEqual(echoed(other.recv()), echo_reply(1))
        self.assertTrue(slow.closed(15), "slow reader not disconnected")
        self.assertTrue(node.running())
        late = self.client(node.port)
        late.send(echo(2))
        self.assertEqual(echoed(late.recv()), echo_reply(2))


class Signals(NodeCase):
    # 8 MB for a client with a small receive buffer: the kernel holds at most
    # tcp_wmem's 4 MB, so megabytes are still queued in chatd at SIGTERM.
    COUNT, SIZE = 8000, 1000

    def flood_then_sigterm(self, proto):
        node = self.node(max_output=32 << 20)
        c = self.client(node.port, proto=proto, rcvbuf=8192)
        c.send({"msgid": 1004, "count": self.COUNT, "size": self.SIZE})
        first = c.recv(10)
        self.assertEqual((first.get("msgid"), first.get("i")), (1005, 0), first)
        mark = node.log_mark()
        node.kill(signal.SIGTERM)
        # Read nothing until the stop is under way (listener closed, or a log
        # line about it), so the replies still queued must be flushed by the
        # shutdown itself.  Not a failure if neither shows: then just read.
        try:
            wait_for(lambda: not port_open(node.port) or node.log_mark() > mark, 5)
        except TimeoutError:
            pass
        got, others = [0], []
        deadline = time.monotonic() + 30
        while True:
            try:
                m = c.recv(max(0.1, deadline - time.monotonic()))
            except EOFError:
                break
            if m.get("msgid") == 1005:
                got.append(m["i"])
            else:
                others.append(m)
        self.assertEqual(got, list(range(self.COUNT)), "queued replies lost at SIGTERM")
        self.assertEqual(node.wait(30), 0, node.log_tail())
        node.check_sanitizers()
        return others

    def test_sigterm_flushes_legacy(self):
        self.assertEqual(self.flood_then_sigterm(1), [])

    def test_sigterm_flushes_proto2_then_notice(self):
        others = self.flood_then_sigterm(2)
        self.assertEqual([(m.get("msgid"), m.get("errno")) for m in others], [(12, 118)], others)

    def test_sigint_exit_zero(self):
        node = self.node()
        c = self.client(node.port)
        c.send(echo(1))
        self.assertEqual(echoed(c.recv()), echo_reply(1))
        node.kill(signal.SIGINT)
        self.assertEqual(node.wait(30), 0, node.log_tail())
        self.assertTrue(c.closed(5))

    def test_sighup_unchanged_config(self):
        node = self.node()
        c = self.client(node.port)
        c.send(echo(1))
        self.assertEqual(echoed(c.recv()), echo_reply(1))
        mark = node.log_mark()
        node.sighup()
        wait_for(lambda: log_has(node, r"reload", mark), 10, what="a reload log line")
        for n in range(2, 12):
            c.send(echo(n))
            self.assertEqual(echoed(c.recv()), echo_reply(n))
        fresh = self.client(node.port)
        fresh.send(echo(20))
        self.assertEqual(echoed(fresh.recv()), echo_reply(20))
        self.assertTrue(node.running())


if __name__ == "__main__":
    unittest.main()
