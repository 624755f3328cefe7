"""The tls transport (issue 9): a node listening on tcp and tls at once,
driven by Python's ssl module and `openssl s_client`.

Covers the seed flows and protocol 2 over TLS against a plain tcp client
both ways, a login through s_client, TLS 1.0/1.1 refused, plaintext sent to
the TLS port closed cleanly, the handshake timeout, and the certificate
reload on SIGHUP: existing connections kept, the new pair served to new
handshakes, a bad file keeping the old pair (logged).
"""
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import time
import unittest

from harness import Client, Node, NodeError, Stack, free_port, make_cert, wait_for
import test_delivery
from test_one2one import PASSWORD, ChatCase, User, is_msg

HANDSHAKE_TIMEOUT = 2


class Tls(ChatCase):
    CONF = {"tls": {"handshake_timeout": HANDSHAKE_TIMEOUT}}

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.class_nodes = []
        cls.node = cls.start_node(tls=True)

    # helpers
    def tls_client(self, proto=1, ctx=None):
        c = Client(self.node.tls_port, proto=proto, tls=ctx or self.node.tls_context())
        self.addCleanup(c.close)
        return c

    def tls_user(self, proto=1, ctx=None):
        uid, name = self.register()
        c = self.tls_client(proto, ctx)
        ack = wait_for(lambda: (lambda a: a if a.get("errno") != 2 else None)(
            c.login(uid, PASSWORD)), 10, what="login over tls")
        self.assertEqual(ack.get("errno"), 0, ack)
        return User(c, uid, name, ack, proto)

    def chat_both_ways(self, a, b):
        """a and b (any transports, any protocols) chat both ways."""
        if a.proto == 2:
            self.expect_ack(a, a.one(b.id, "a->b over " + str(a.c.sock.__class__.__name__)))
        else:
            a.c.send(a.one(b.id, "a->b"))
        self.assertEqual(b.c.recv_until(is_msg(6))["id"], a.id)
        if b.proto == 2:
            self.expect_ack(b, b.one(a.id, "b->a"))
        else:
            b.c.send(b.one(a.id, "b->a"))
        got = a.c.recv_until(is_msg(6))
        self.assertEqual((got["id"], got["msg"]), (b.id, "b->a"))

    def peer_cert(self, ctx=None):
        with Client(self.node.tls_port, tls=ctx or self.node.tls_context()) as c:
            return c.sock.getpeercert(binary_form=True)

    def pem_der(self, path):
        with open(path) as f:
            return ssl.PEM_cert_to_DER_cert(f.read())

    def reload(self, expect):
        mark = self.node.log_mark()
        self.node.sighup()
        self.node.wait_log(expect, since=mark)

    # --- the seed flows and protocol 2 -----------------------------------
    def test_seed_protocol_over_tls_with_a_tcp_peer(self):
        a, b = self.tls_user(), self.user()
        self.assertIsInstance(a.c.sock, ssl.SSLSocket)
        self.chat_both_ways(a, b)

    def test_sessions_gauge_by_transport(self):
        a, b = self.tls_user(), self.user()

        def sample(body, transport):
            key = 'chatd_sessions{node="%s",transport="%s",state="logged_in"}'
            for line in body.splitlines():
                if line.startswith("chatd_sessions{") and \
                        'transport="%s"' % transport in line and "logged_in" in line:
                    return float(line.split()[-1])
            raise AssertionError("no %s in\n%s" % (key % ("*", transport), body))
        status, _, body = self.node.admin("GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertGreaterEqual(sample(body, "tls"), 1)
        self.assertGreaterEqual(sample(body, "tcp"), 1)
        self.chat_both_ways(a, b)

    def test_protocol_2_over_tls_with_a_tcp_peer(self):
        a, b = self.tls_user(proto=2), self.user(proto=2)
        self.chat_both_ways(a, b)
        self.chat_both_ways(b, a)
        r = a.c.request({"msgid": 6, "id": a.id, "name": a.name, "toid": 999999,
                         "msg": "to nobody", "time": "t"})
        self.assertEqual(r.get("msgid"), 11, r)

    def test_many_messages_in_both_directions_stay_whole(self):
        a, b = self.tls_user(proto=2), self.user()
        texts = ["m%d " % i + "x" * (i * 97 % 3000) for i in range(60)]
        for t in texts:
            a.c.send(a.one(b.id, t))
        got = [b.c.recv_until(is_msg(6))["msg"] for _ in texts]
        self.assertEqual(got, texts)
        for t in texts:
            b.c.send(b.one(a.id, t))
        got = [a.c.recv_until(is_msg(6))["msg"] for _ in texts]
        self.assertEqual(got, texts)

    def test_records_cut_anywhere_and_after_idle(self):
        """Records cut between reads anywhere (in the 5-byte header, in the
        body), several records in one read, and a connection that went idle
        (OpenSSL's buffers released) still reading and writing: the server
        reads ahead (all of a read at once), so this is its edge."""
        uid, _ = self.register()
        sock = socket.create_connection(("127.0.0.1", self.node.tls_port), timeout=10)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.node.tls_context().wrap_bio(inc, out, server_hostname="127.0.0.1")

        def pump_in(deadline):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            self.assertTrue(data, "the server closed the connection")
            inc.write(data)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(out.read())
                pump_in(time.monotonic() + 10)
        sock.sendall(out.read())

        def records(*texts):  # each text its own record, all ciphertext
            for t in texts:
                tls.write(t.encode())
            return out.read()

        def replies(n):
            got, buf, deadline = [], b"", time.monotonic() + 10
            while len(got) < n:
                try:
                    buf += tls.read(65536)
                except ssl.SSLWantReadError:
                    pump_in(deadline)
                    continue
                *lines, buf = buf.split(b"\n")
                got += [json.loads(x) for x in lines if x.strip()]
            return got

        def req(seq):
            return json.dumps({"msgid": 13, "id": uid, "proto": 2, "seq": seq}) + "\0"

        login = records(json.dumps({"msgid": 1, "id": uid, "password": PASSWORD,
                                    "proto": 2, "seq": 1}) + "\0")
        sock.sendall(login[:3])  # inside the record header
        time.sleep(0.05)  # not a wait: the two pieces should be two reads
        sock.sendall(login[3:])
        self.assertEqual(replies(1)[0].get("errno"), 0)
        for cut in (5, 9, 40):  # after the header, in the body
            wire = records(req(cut))
            sock.sendall(wire[:cut])
            time.sleep(0.05)
            sock.sendall(wire[cut:])
            self.assertEqual(replies(1)[0].get("seq"), cut)
        sock.sendall(records(req(100), req(101), req(102)))  # three in one read
        self.assertEqual(sorted(m.get("seq") for m in replies(3)), [100, 101, 102])
        time.sleep(1)  # idle on purpose (nothing to wait for)
        sock.sendall(records(req(200)))
        self.assertEqual(replies(1)[0].get("seq"), 200)

    def test_openssl_s_client_logs_in(self):
        uid, _ = self.register()
        p = subprocess.Popen(["openssl", "s_client", "-connect",
                              "127.0.0.1:%d" % self.node.tls_port, "-quiet",
                              "-CAfile", self.node.tls_cert, "-verify_return_error"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        self.addCleanup(p.wait, 10)
        self.addCleanup(p.kill)
        p.stdin.write(b'{"msgid":1,"id":%d,"password":"%s"}\n' % (uid, PASSWORD.encode()))
        p.stdin.flush()
        out = b""
        deadline = time.monotonic() + 10
        while b"\n" not in out and time.monotonic() < deadline:
            r, _, _ = select.select([p.stdout], [], [], 0.2)
            if r:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
        self.assertIn(b'"msgid":2', out)
        self.assertIn(b'"errno":0', out)

    # --- refusals ----------------------------------------------------------
    def test_tls_1_0_and_1_1_refused(self):
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            ctx.minimum_version = ctx.maximum_version = version
            mark = self.node.log_mark()
            with self.assertRaises((ssl.SSLError, ConnectionError)):
                Client(self.node.tls_port, tls=ctx).close()
            # the server saw the hello and refused it (not only our client)
            self.node.wait_log("tls handshake failed", since=mark)
        self.tls_user()  # and it still serves TLS 1.2+

    def test_plaintext_to_the_tls_port_is_closed(self):
        uid, _ = self.register()
        with Client(self.node.tls_port) as c:
            c.send({"msgid": 1, "id": uid, "password": PASSWORD})
            self.assertTrue(c.closed(5))
        with Client(self.node.tls_port, term=b"") as c:  # HTTP, say
            c.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(c.closed(5))
        self.assertTrue(self.node.running())
        self.tls_user()

    def test_handshake_timeout(self):
        started = time.monotonic()
        with Client(self.node.tls_port) as silent, Client(self.node.tls_port) as half:
            half.send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a hello, cut
            half.expect_nothing(0.5)
            self.assertTrue(silent.closed(HANDSHAKE_TIMEOUT + 5))
            self.assertTrue(half.closed(5))
        took = time.monotonic() - started
        self.assertGreaterEqual(took, HANDSHAKE_TIMEOUT - 0.2)
        self.assertIn("handshake not done after", self.node.log_text())

    # --- reload ------------------------------------------------------------
    def test_sighup_reloads_the_pair_and_keeps_connections(self):
        a, b = self.tls_user(proto=2), self.user()
        before = a.c.sock.getpeercert(binary_form=True)
        self.assertEqual(before, self.pem_der(self.node.tls_cert))
        tmp = os.path.join(self.node.dir, "next")
        os.makedirs(tmp, exist_ok=True)
        make_cert(os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem"), cn="next")
        os.replace(os.path.join(tmp, "key.pem"), self.node.tls_key)
        os.replace(os.path.join(tmp, "cert.pem"), self.node.tls_cert)
        self.reload("certificate and key reloaded")
        after = self.peer_cert()
        self.assertNotEqual(after, before)
        self.assertEqual(after, self.pem_der(self.node.tls_cert))
        self.chat_both_ways(a, b)  # the connection made before the reload

    def test_bad_files_on_reload_keep_the_old_pair(self):
        a, b = self.tls_user(), self.user()
        good = self.pem_der(self.node.tls_cert)
        saved = os.path.join(self.node.dir, "saved")
        os.makedirs(saved, exist_ok=True)
        shutil.copy(self.node.tls_cert, saved)
        shutil.copy(self.node.tls_key, saved)
        trust_old = self.node.tls_context(cafile=os.path.join(saved, "cert.pem"))
        try:
            with open(self.node.tls_cert, "w") as f:
                f.write("not a certificate\n")
            self.reload("reload failed")
            self.assertEqual(self.peer_cert(trust_old), good)
            # a valid certificate whose key is another one's
            other = os.path.join(self.node.dir, "other")
            os.makedirs(other, exist_ok=True)
            make_cert(os.path.join(other, "cert.pem"), os.path.join(other, "key.pem"))
            shutil.copy(os.path.join(other, "cert.pem"), self.node.tls_cert)
            self.reload("reload failed: key")
            self.assertIn("mismatch", self.node.log_text())
            self.assertEqual(self.peer_cert(trust_old), good)
            os.unlink(self.node.tls_key)  # unreadable
            self.reload("reload failed")
            self.assertEqual(self.peer_cert(trust_old), good)
            self.assertIn("keeping the old certificate", self.node.log_text())
        finally:
            shutil.copy(os.path.join(saved, "cert.pem"), self.node.tls_cert)
            shutil.copy(os.path.join(saved, "key.pem"), self.node.tls_key)
        self.chat_both_ways(a, b)


class TlsOnly(ChatCase):
    """A node whose only endpoint is tls, on IPv4 and IPv6 loopback."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        n = cls.node
        n.tls_cert = os.path.join(n.dir, "cert.pem")
        n.tls_key = os.path.join(n.dir, "key.pem")
        make_cert(n.tls_cert, n.tls_key)
        cls.has_v6 = socket.has_ipv6 and os.path.exists("/proc/net/if_inet6")
        listen = "tls://127.0.0.1:%d" % n.port
        if cls.has_v6:
            cls.v6_port = free_port()
            listen += ", tcp://[::1]:%d" % cls.v6_port
        n.write_conf({"server": {"listen": listen},
                      "tls": {"cert": n.tls_cert, "key": n.tls_key, "min_version": "1.3"}})
        n.restart()

    def test_tls_1_3_minimum_and_ipv6_tcp(self):
        ctx = self.node.tls_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with self.assertRaises((ssl.SSLError, ConnectionError)):
            Client(self.node.port, tls=ctx).close()
        with Client(self.node.port, tls=self.node.tls_context()) as c:
            self.assertEqual(c.sock.version(), "TLSv1.3")
        if self.has_v6:
            with Client(self.v6_port, host="::1") as c:
                c.send({"msgid": 1, "id": 1, "password": "x"})
                self.assertEqual(c.recv().get("msgid"), 2)


class TlsSlowReader(test_delivery.TestSlowReader):
    """test_delivery's 3c with the reader over TLS: a reader cut at
    max_output loses nothing acknowledged, though part of its output was
    already encrypted (a delivery counts as written only once its records
    reached the kernel; the rest goes to the offline store)."""

    def node(self, stack, conf=None, **kw):
        return super().node(stack, conf, tls=True, **kw)

    def client(self, node, **kw):
        if kw.get("rcvbuf") is None:
            return super().client(node, **kw)
        c = Client(node.tls_port, tls=node.tls_context(), **kw)  # the reader
        self.addCleanup(c.close)
        return c


class TlsStart(unittest.TestCase):
    """Endpoints that cannot start stop chatd with the reason; workers share
    every endpoint (SO_REUSEPORT)."""

    def start_fails(self, conf, why):
        with self.assertRaises(NodeError) as e:
            Node(None, redis=False, mysql=False, plugins=("login",), conf=conf)
        self.assertIn(why, str(e.exception))

    def test_wss_needs_the_tls_pair(self):
        """wss stacks on tls: an unreadable [tls] pair stops the start."""
        self.start_fails({"server": {"listen": "127.0.0.1:%d, wss://127.0.0.1:%d/chat"
                                     % (free_port(), free_port())},
                          "tls": {"cert": "/nonexistent/cert.pem", "key": "/nonexistent/k"}},
                         "cert /nonexistent/cert.pem")

    def test_check_flag_accepts_ws_and_wss(self):
        node = Node(None, redis=False, mysql=False, plugins=("login",), tls=True)
        node.stop()
        node.write_conf({"server": {"listen": "127.0.0.1:%d, ws://127.0.0.1:%d/chat, "
                                    "wss://127.0.0.1:%d/chat"
                                    % (node.port, free_port(), free_port())}})
        import harness
        p = subprocess.run([harness.CHATD, "-t", "-c", node.conf_path],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    def test_unreadable_certificate_stops_the_start(self):
        self.start_fails({"server": {"listen": "tls://127.0.0.1:%d" % free_port()},
                          "tls": {"cert": "/nonexistent/cert.pem", "key": "/nonexistent/k"}},
                         "cert /nonexistent/cert.pem")

    def test_sigterm_notice_and_close_notify_over_tls(self):
        node = Node(None, redis=False, mysql=False, plugins=("login",), tls=True)
        try:
            raw = socket.create_connection(("127.0.0.1", node.tls_port), timeout=10)
            # a cut stream raises instead of reading as a clean end
            ctx = node.tls_context()
            ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
            c = ctx.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False)
            self.addCleanup(c.close)
            c.sendall(b'{"msgid":1,"id":1,"password":"x","proto":2}\n')
            data = b""
            while b"\n" not in data:
                data += c.recv(4096)
            node.kill(signal.SIGTERM)
            while True:
                chunk = c.recv(4096)  # SSLEOFError without a close_notify
                if not chunk:
                    break
                data += chunk
            lines = [json.loads(x) for x in data.split(b"\n") if x.strip()]
            self.assertEqual(lines[0].get("msgid"), 2)
            self.assertEqual([(m["msgid"], m["errno"]) for m in lines[1:]], [(12, 118)])
            self.assertEqual(node.wait(30), 0)
        finally:
            if node.running():
                node.stop()

    def test_workers_share_the_tls_endpoint(self):
        node = Node(None, redis=False, mysql=False, plugins=("login",), tls=True,
                    args=("-w", "2"))
        try:
            for _ in range(20):
                with Client(node.tls_port, tls=node.tls_context()) as c:
                    c.send({"msgid": 1, "id": 1, "password": "x"})
                    self.assertEqual(c.recv().get("msgid"), 2)
            self.assertEqual(node.stop(), 0)
        finally:
            if node.running():
                node.stop()


if __name__ == "__main__":
    unittest.main()
