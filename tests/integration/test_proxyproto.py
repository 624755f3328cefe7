"""The PROXY protocol on the client listener ([server] proxy_protocol; issue
12), over real TCP with the echo fixture plugin (no MariaDB, no Redis).

- A v1 or v2 header from a trusted peer sets the session's address: the
  admin API's GET /sessions shows the header's source as the peer, and the
  per-address caps count that address (three connections from one trusted
  balancer carrying the same client, max_connections_per_addr = 2: the
  third is refused, another client still gets in).
- A v2 LOCAL header (a balancer's own check) keeps the socket's address.
- A header from a peer outside [server] trusted is refused, bytes that are
  not a header are refused, a header not finished within request_timeout
  is refused; each with a log line.
- proxy_protocol = off: a PROXY line is bytes outside a JSON object, as
  before, and the session keeps the socket's address.
- proxy_protocol = on without a trusted list is a config error.

Every case fails on a chatd without the feature (the key is unknown there).
"""

import ipaddress
import os
import shutil
import struct
import subprocess
import tempfile
import time
import unittest

import harness
from harness import Client, wait_for
from test_net import NodeCase, echo, echo_reply, echoed, log_has

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(src, sport, dport=6000, dst="127.0.0.1"):
    fam = "TCP6" if ":" in src else "TCP4"
    if fam == "TCP6" and ":" not in dst:
        dst = "::1"
    return ("PROXY %s %s %s %d %d\r\n" % (fam, src, dst, sport, dport)).encode()


def v2(src, sport, dport=6000, dst=None, local=False, tlvs=b""):
    if local:
        return SIG + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    a = ipaddress.ip_address(src)
    d = ipaddress.ip_address(dst or ("::1" if a.version == 6 else "127.0.0.1"))
    body = a.packed + d.packed + struct.pack("!HH", sport, dport) + tlvs
    fam = 0x11 if a.version == 4 else 0x21
    return SIG + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


def served(c, n):
    c.send(echo(n))
    return echoed(c.recv()) == echo_reply(n)


class ProxyCase(NodeCase):
    def proxied(self, port, header, source=None):
        """A connection that opens with header (bytes), then is a client."""
        c = self.client(port, source=source)
        c.send_raw(header)
        return c

    def peers(self, node):
        status, _, body = node.admin("GET", "/sessions")
        self.assertEqual(status, 200, body)
        return [s["peer"] for s in body["sessions"]]

    def assert_refused(self, c, node, pattern, mark):
        self.assertTrue(c.closed(5), "the connection was kept open")
        wait_for(lambda: log_has(node, pattern, mark), 5,
                 what="a log line matching %r" % pattern)


class HeaderSetsAddress(ProxyCase):
    @classmethod
    def setUpClass(cls):
        cls.n = cls.class_node(proxy_protocol="on", trusted="127.0.0.1")

    def test_v1_tcp4(self):
        c = self.proxied(self.n.port, v1("192.0.2.10", 40001) + b'{"msgid":1000,"n":1}')
        self.assertEqual(echoed(c.recv()), echo_reply(1))
        self.assertIn("192.0.2.10:40001", self.peers(self.n))

    def test_v1_split_over_reads(self):
        h = v1("192.0.2.11", 40002)
        c = self.client(self.n.port)
        for i in range(0, len(h), 7):  # several reads, at least some of them
            c.send_raw(h[i:i + 7])
            c.expect_nothing(0.02)
        self.assertTrue(served(c, 2))
        self.assertIn("192.0.2.11:40002", self.peers(self.n))

    def test_v2_tcp6_with_tlv(self):
        h = v2("2001:db8::5", 443, tlvs=b"\x04\x00\x02xx")
        c = self.proxied(self.n.port, h)
        self.assertTrue(served(c, 3))
        self.assertIn("[2001:db8::5]:443", self.peers(self.n))

    def test_v2_tcp4(self):
        c = self.proxied(self.n.port, v2("198.51.100.7", 50000))
        self.assertTrue(served(c, 4))
        self.assertIn("198.51.100.7:50000", self.peers(self.n))

    def test_v2_local_keeps_socket_address(self):
        c = self.proxied(self.n.port, v2(None, 0, local=True), source="127.0.0.1")
        self.assertTrue(served(c, 5))
        port = c.sock.getsockname()[1]
        self.assertIn("127.0.0.1:%d" % port, self.peers(self.n))

    def test_garbage_instead_of_header_refused(self):
        mark = self.n.log_mark()
        c = self.proxied(self.n.port, b'{"msgid":1000,"n":6}\n')
        self.assert_refused(c, self.n, r"PROXY protocol: invalid header: refused 127\.0\.0\.1:\d+",
                            mark)

    def test_bad_v1_refused(self):
        mark = self.n.log_mark()
        c = self.proxied(self.n.port, b"PROXY TCP4 192.0.2.1 127.0.0.1 65536 6000\r\n")
        self.assert_refused(c, self.n, r"invalid header: refused 127\.0\.0\.1:\d+: v1: bad port",
                            mark)


class HeaderAddressCounted(ProxyCase):
    def test_per_address_cap_on_header_source(self):
        node = self.node(proxy_protocol="on", trusted="127.0.0.1",
                         max_connections_per_addr=2, max_unauth_per_addr=0)
        mark = node.log_mark()
        mine = [self.proxied(node.port, v1("192.0.2.20", 41000 + i)) for i in range(2)]
        for i, c in enumerate(mine):
            self.assertTrue(served(c, i))
        third = self.proxied(node.port, v1("192.0.2.20", 41009))
        self.assertTrue(third.closed(5), "a third connection of 192.0.2.20 was kept")
        wait_for(lambda: log_has(node, r"max_connections_per_addr \(2\) reached: refused "
                                 r"192\.0\.2\.20:41009", mark), 5, what="the refusal's log line")
        # another client through the same balancer still gets in
        other = self.proxied(node.port, v1("192.0.2.21", 41010))
        self.assertTrue(served(other, 7))
        self.assertTrue(served(mine[0], 8))


class Refusals(ProxyCase):
    def test_untrusted_peer_refused(self):
        node = self.node(proxy_protocol="on", trusted="127.0.0.2")
        mark = node.log_mark()
        c = self.proxied(node.port, v1("192.0.2.30", 42000), source="127.0.0.1")
        self.assert_refused(c, node, r"PROXY protocol: peer not in \[server\] trusted: "
                            r"refused 127\.0\.0\.1:\d+", mark)
        ok = self.proxied(node.port, v1("192.0.2.30", 42001), source="127.0.0.2")
        self.assertTrue(served(ok, 1))
        self.assertIn("192.0.2.30:42001", self.peers(node))
        status, _, text = node.admin("GET", "/metrics")
        self.assertRegex(text if isinstance(text, str) else text.decode(),
                         r'chatd_connections_refused_total\{[^}]*reason="proxy_protocol"\} 1')

    def test_slow_header_times_out(self):
        node = self.node(proxy_protocol="on", trusted="127.0.0.1", request_timeout=1)
        mark = node.log_mark()
        c = self.proxied(node.port, b"PROXY TCP4 192.0.2.")
        t0 = time.monotonic()
        self.assertTrue(c.closed(5), "a header never finished kept the connection")
        self.assertLess(time.monotonic() - t0, 3.0)
        wait_for(lambda: log_has(node, r"no header within request_timeout: refused "
                                 r"127\.0\.0\.1:\d+", mark), 5, what="the timeout's log line")

    def test_on_without_trusted_is_a_config_error(self):
        d = tempfile.mkdtemp(prefix="chat-pp-")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "chat.conf")
        with open(path, "w") as f:
            f.write("[server]\nlisten = 127.0.0.1:%d\nproxy_protocol = on\n" % harness.free_port())
        r = subprocess.run([harness.CHATD, "-t", "-c", path], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(b"proxy_protocol = on needs [server] trusted", r.stdout)


class Off(ProxyCase):
    def test_proxy_line_is_a_bad_frame_when_off(self):
        node = self.node(proxy_protocol="off", trusted="127.0.0.1")
        c = self.proxied(node.port, v1("192.0.2.40", 43000) + b'{"msgid":1000,"n":1}')
        self.assertEqual(echoed(c.recv_until(lambda m: m.get("msgid") == 1001)), echo_reply(1))
        peers = self.peers(node)
        self.assertFalse([p for p in peers if p.startswith("192.0.2.40")], peers)
        self.assertTrue([p for p in peers if p.startswith("127.0.0.1:")], peers)


if __name__ == "__main__":
    unittest.main()
