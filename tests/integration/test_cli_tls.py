"""chat-cli over tls://, ws:// and wss:// chatting with a plain TCP client.

TLS: one plain-TCP chatd behind nginx's stream `ssl` (contrib/nginx/
nginx.conf.in, rendered as in test_nginx_cluster.py, certificate from
contrib/stack/tls-cert.sh).  chat-cli tls:// with --ca FILE chats with a
chat-cli on the node's TCP port; a wrong CA and the system CAs (which do not
know the self-signed certificate) are refused with a clear reason;
--insecure connects and warns; Python's ssl module goes the same way.

WebSocket, chatd's own (CliChatdWebSocket): chat-cli and chat-bench over
chatd's ws:// and wss:// listeners, with a ping every second, and nginx's
WebSocket proxy in front of the ws listener.

WebSocket through a relay (CliWebSocket, kept: it checks what chat-cli
sends, the Origin header, independently of chatd): a tiny relay written
with python3-websockets stands in for it: each text message it receives is
written to the node's TCP port, each line the node writes is sent back as
one text message.  The relay pings every 0.2 s and closes a client that
does not answer within 1 s, so a chat that outlives that proves chat-cli
answers pings.  It runs as ws:// and as wss:// (with the same certificate),
records the Origin header, and answers 404 off its path.  Behind nginx's
WebSocket proxy (the template's http server) it shows that the Upgrade, the
frames and the pings pass nginx.

A server that accepts and never speaks is given up after the reply timeout.
chat-bench runs a short pairs load over each of the four schemes.

Skipped only when nginx with its stream module or python3-websockets is not
installed (contrib/deps.sh installs both).
"""

import asyncio
import base64
import hashlib
import http
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import unittest

import harness
import test_cli as clidrv
from harness import Node, Stack, free_port, wait_for
from test_nginx_cluster import LOAD_MODULE, NGINX, Nginx

try:
    import websockets
    import websockets.server
except ImportError:  # pragma: no cover - contrib/deps.sh installs it
    websockets = None


def other_ca():
    """A second self-signed certificate nobody serves: the wrong CA."""
    d = tempfile.mkdtemp(prefix="chat-otherca-")
    subprocess.run(["sh", os.path.join(harness.CHAT_SRC, "contrib", "stack", "tls-cert.sh"), d],
                   check=True, stdout=subprocess.DEVNULL)
    return os.path.join(d, "cert.pem")


class Relay:
    """A WebSocket server on 127.0.0.1 relaying text messages to a chatd
    TCP port and the node's lines back, in a thread of its own."""

    PATH = "/chat"

    def __init__(self, node_port, ssl_ctx=None):
        self.node_port = node_port
        self.port = free_port()
        self.origins = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ssl_ctx, ready), daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise AssertionError("the WebSocket relay did not start")

    def _run(self, ssl_ctx, ready):
        asyncio.set_event_loop(self.loop)

        async def main():
            self.server = await websockets.server.serve(
                self._session, "127.0.0.1", self.port, ssl=ssl_ctx,
                process_request=self._check_path, ping_interval=0.2, ping_timeout=1)
            ready.set()
            await self.server.wait_closed()
        self.loop.run_until_complete(main())

    async def _check_path(self, path, headers):
        self.origins.append(headers.get("Origin"))
        if path != self.PATH:
            return http.HTTPStatus.NOT_FOUND, {"Content-Type": "text/plain"}, b"no WebSocket here\n"
        return None

    async def _session(self, ws, *path):
        reader, writer = await asyncio.open_connection("127.0.0.1", self.node_port)

        async def up():
            async for msg in ws:
                if not isinstance(msg, str):
                    await ws.close(1003, "text only")
                    return
                writer.write(msg.encode() + b"\n")
                await writer.drain()

        async def down():
            while True:
                line = await reader.readline()
                if not line:
                    await ws.close(1000, "node closed")
                    return
                if line.strip(b"\0\r\n "):
                    await ws.send(line.strip(b"\0\r\n ").decode())

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        writer.close()

    def stop(self):
        def close():
            self.server.close()
        self.loop.call_soon_threadsafe(close)
        self.thread.join(10)


class ChatOver(unittest.TestCase):
    """Shared: a node, a plain TCP chat-cli as the peer, and the chat."""

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.node = Node(cls.stack)

    @classmethod
    def tearDownClass(cls):
        cls.node.stop()

    def setUp(self):
        clidrv.cli_or_skip(self)

    def cli(self, name, url=None, args=(), connected=True, timeout=10):
        c = clidrv.Cli(self.node.port, name=name, url=url, args=args, reply_timeout=timeout)
        self.addCleanup(c.stop)
        if connected:
            c.expect("connected")
        return c

    def account(self, c, name):
        c.send("register %s pw" % name)
        uid = int(c.expect("register", ok=True, name=name)["id"])
        c.send("login %d pw" % uid)
        c.expect("login", ok=True, id=uid)
        return uid

    def chat_with_tcp(self, c, tag, linger=0.0):
        """c (any transport) and a plain TCP chat-cli chat both ways; with
        linger, the second message waits that long (pings meanwhile)."""
        peer = self.cli(tag + "-tcp")
        cid = self.account(c, tag + "-x")
        pid = self.account(peer, tag + "-tcp")
        c.send("chat:%d:hello over %s" % (pid, tag))
        c.expect("sent", to=pid)
        self.assertEqual(peer.expect("chat", **{"from": cid})["msg"], "hello over " + tag)
        if linger:
            time.sleep(linger)  # the relay's pings must be answered meanwhile
        peer.send("chat:%d:back to %s" % (cid, tag))
        peer.expect("sent", to=cid)
        self.assertEqual(c.expect("chat", **{"from": pid})["msg"], "back to " + tag)
        c.send("friends")
        c.close_input()
        c.expect("friends")
        self.assertEqual(c.wait(), 0, c.transcript())


@unittest.skipIf(NGINX is None, LOAD_MODULE)
class CliTls(ChatOver):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        try:
            cls.nginx = Nginx(free_port(), [cls.node.port])
        except Exception:
            cls.node.stop()
            raise
        cls.url = "tls://127.0.0.1:%d" % cls.nginx.tls_port

    @classmethod
    def tearDownClass(cls):
        cls.nginx.stop()
        super().tearDownClass()

    def test_ca_file(self):
        c = self.cli("tls-ca", self.url, ["--ca", self.nginx.cert])
        self.assertEqual(c.history[0]["addr"], self.url)
        self.chat_with_tcp(c, "tls")

    def test_host_name_checked(self):
        """localhost is in the certificate's SANs: it verifies by name."""
        c = self.cli("tls-name", "tls://localhost:%d" % self.nginx.tls_port,
                     ["--ca", self.nginx.cert])
        c.close_input()
        self.assertEqual(c.wait(), 0, c.transcript())

    def refused(self, name, args):
        c = self.cli(name, self.url, args, connected=False, timeout=1)
        ev = c.expect("connect-failed")
        self.assertIn("certificate verify failed", ev["reason"])
        c.send("friends")
        c.close_input()
        self.assertEqual(c.wait(), 1, c.transcript())
        self.assertFalse([e for e in c.history if e.get("event") == "connected"], c.transcript())
        return ev["reason"]

    def test_wrong_ca_refused(self):
        reason = self.refused("tls-wrongca", ["--ca", other_ca()])
        self.assertIn("self-signed", reason)

    def test_system_cas_refuse_self_signed(self):
        self.refused("tls-system", [])

    def test_missing_ca_file(self):
        r = subprocess.run([clidrv.CLI, "--ca", "/nonexistent/ca.pem", self.url],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=10)
        self.assertEqual(r.returncode, 2)
        self.assertIn(b"cannot load /nonexistent/ca.pem", r.stderr)

    def test_insecure_warns(self):
        c = self.cli("tls-insecure", self.url, ["--insecure"])
        self.chat_with_tcp(c, "insecure")
        self.assertIn("warning: --insecure", c.stderr())

    def test_python_ssl(self):
        """Python's ssl module through the same port: a register reply."""
        ctx = ssl.create_default_context(cafile=self.nginx.cert)
        with socket.create_connection(("127.0.0.1", self.nginx.tls_port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                self.assertIn(s.version(), ("TLSv1.2", "TLSv1.3"))
                s.sendall(b'{"msgid":4,"name":"py-tls","password":"pw"}\0')
                buf = b""
                while b"\n" not in buf:
                    chunk = s.recv(4096)
                    self.assertTrue(chunk, "nginx closed before the reply")
                    buf += chunk
        self.assertIn(b'"msgid":5', buf)
        self.assertIn(b'"errno":0', buf)
        with socket.create_connection(("127.0.0.1", self.nginx.tls_port), timeout=10) as raw:
            ctx = ssl.create_default_context(cafile=other_ca())
            with self.assertRaises(ssl.SSLCertVerificationError):
                ctx.wrap_socket(raw, server_hostname="localhost")


@unittest.skipIf(websockets is None, "python3-websockets is not installed")
class CliWebSocket(ChatOver):
    def relay(self, tls=False):
        ctx = None
        if tls:
            d = tempfile.mkdtemp(prefix="chat-wss-")
            subprocess.run(["sh", os.path.join(harness.CHAT_SRC, "contrib", "stack", "tls-cert.sh"),
                            d], check=True, stdout=subprocess.DEVNULL)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(os.path.join(d, "cert.pem"), os.path.join(d, "key.pem"))
            self.cert = os.path.join(d, "cert.pem")
        r = Relay(self.node.port, ctx)
        self.addCleanup(r.stop)
        return r

    def test_ws_chat_and_pings(self):
        r = self.relay()
        url = "ws://127.0.0.1:%d/chat" % r.port
        c = self.cli("ws", url, ["--origin", "http://localhost"])
        self.chat_with_tcp(c, "ws", linger=1.5)
        self.assertIn("http://localhost", r.origins)

    def test_wss_chat(self):
        r = self.relay(tls=True)
        c = self.cli("wss", "wss://localhost:%d/chat" % r.port, ["--ca", self.cert])
        self.chat_with_tcp(c, "wss")
        self.assertIn(None, r.origins)  # no --origin: no Origin header

    def test_wrong_path(self):
        r = self.relay()
        c = self.cli("ws-404", "ws://127.0.0.1:%d/nope" % r.port, connected=False, timeout=1)
        ev = c.expect("connect-failed")
        self.assertIn("HTTP 404", ev["reason"])

    @unittest.skipIf(NGINX is None, LOAD_MODULE)
    def test_through_nginx(self):
        """nginx's WebSocket proxy (the template's http server) in front of
        the relay: the Upgrade passes, and pings and frames flow through."""
        r = self.relay()
        ngx = Nginx(free_port(), [self.node.port], ws_ports=[r.port])
        self.addCleanup(ngx.stop)
        c = self.cli("ws-nginx", "ws://127.0.0.1:%d/chat" % ngx.ws_port,
                     ["--origin", "https://chat.example"])
        self.chat_with_tcp(c, "ws-nginx", linger=1.5)
        self.assertIn("https://chat.example", r.origins)
        self.assertIn("GET /chat HTTP/1.1\" 101", ngx.log("http.log"))

    def test_bad_urls(self):
        for url, why in (("http://127.0.0.1:1", b"unknown scheme"),
                         ("tls://127.0.0.1", b"expected HOST:PORT"),
                         ("tcp://127.0.0.1:1/x", b"a path is only for")):
            r = subprocess.run([clidrv.CLI, url], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=10)
            self.assertEqual(r.returncode, 2, url)
            self.assertIn(why, r.stderr, url)


class CliChatdWebSocket(ChatOver):
    """chat-cli against chatd's own ws:// and wss:// listeners (no relay),
    with pings every second that chat-cli must answer, and nginx's
    WebSocket proxy in front of chatd's ws listener; chat-bench over both."""

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.node = Node(cls.stack, ws=True, wss=True,
                        conf={"ws": {"ping_interval": 1, "pong_timeout": 1}})

    def test_ws_chat_and_pings(self):
        c = self.cli("cws", self.node.ws_url, ["--origin", "http://localhost"])
        self.chat_with_tcp(c, "cws", linger=2.5)

    def test_wss_chat(self):
        c = self.cli("cwss", "wss://localhost:%d/chat" % self.node.wss_port,
                     ["--ca", self.node.tls_cert])
        self.chat_with_tcp(c, "cwss", linger=2.5)

    def test_wrong_path(self):
        c = self.cli("cws-404", "ws://127.0.0.1:%d/nope" % self.node.ws_port,
                     connected=False, timeout=1)
        self.assertIn("HTTP 404", c.expect("connect-failed")["reason"])

    @unittest.skipIf(NGINX is None, LOAD_MODULE)
    def test_through_nginx(self):
        ngx = Nginx(free_port(), [self.node.port], ws_ports=[self.node.ws_port])
        self.addCleanup(ngx.stop)
        c = self.cli("cws-nginx", "ws://127.0.0.1:%d/chat" % ngx.ws_port,
                     ["--origin", "https://chat.example"])
        self.chat_with_tcp(c, "cws-nginx", linger=2.5)
        self.assertIn("GET /chat HTTP/1.1\" 101", ngx.log("http.log"))

    def test_bench(self):
        if not os.access(BENCH, os.X_OK):
            self.fail("chat-bench not built at %s" % BENCH)
        ids = os.path.join(tempfile.mkdtemp(prefix="chat-bench-ids-"), "ids.txt")
        for target, extra in (("127.0.0.1:%d" % self.node.port, []),
                              (self.node.ws_url, []),
                              ("wss://localhost:%d/chat" % self.node.wss_port,
                               ["--ca", self.node.tls_cert])):
            r = subprocess.run([BENCH, "pairs", "-t", target, "-P", "2", "-W", "2",
                                "--warmup", "0.5", "--duration", "1", "--drain", "5",
                                "--ids", ids, "-q"] + extra,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
            out = r.stdout.decode()
            self.assertEqual(r.returncode, 0, "%s\n%s" % (out, r.stderr.decode()))
            kv = dict(f.split("=", 1) for f in out.split() if "=" in f)
            self.assertGreater(int(kv["received"]), 0, out)
            for k in ("lost", "dup", "corrupt", "errors"):
                self.assertEqual(kv[k], "0", "%s %s: %s" % (target, k, out))


BENCH = os.path.join(os.path.dirname(harness.CHATD), "chat-bench")


@unittest.skipIf(NGINX is None or websockets is None, "needs nginx's stream module and python3-websockets")
class BenchSchemes(ChatOver):
    """chat-bench pairs over each scheme: everything sent arrives once."""

    def bench(self, target, *args):
        r = subprocess.run([BENCH, "pairs", "-t", target, "-P", "2", "-W", "2", "--warmup", "0.5",
                            "--duration", "1", "--drain", "5", "--ids", self.ids, "-q"] + list(args),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        out = r.stdout.decode()
        self.assertEqual(r.returncode, 0, "%s\n%s" % (out, r.stderr.decode()))
        kv = dict(f.split("=", 1) for f in out.split() if "=" in f)
        self.assertGreater(int(kv["received"]), 0, out)
        for k in ("lost", "dup", "corrupt", "errors"):
            self.assertEqual(kv[k], "0", "%s: %s" % (k, out))
        return kv

    def test_every_scheme(self):
        if not os.access(BENCH, os.X_OK):
            self.fail("chat-bench not built at %s" % BENCH)
        self.ids = os.path.join(tempfile.mkdtemp(prefix="chat-bench-ids-"), "ids.txt")
        self.bench("127.0.0.1:%d" % self.node.port)           # registers the users
        ngx = Nginx(free_port(), [self.node.port])
        self.addCleanup(ngx.stop)
        self.bench("tls://127.0.0.1:%d" % ngx.tls_port, "--ca", ngx.cert)
        self.bench("tls://localhost:%d" % ngx.tls_port)        # unchecked without --ca
        ws = Relay(self.node.port)
        self.addCleanup(ws.stop)
        self.bench("ws://127.0.0.1:%d/chat" % ws.port)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(ngx.cert, os.path.join(os.path.dirname(ngx.cert), "key.pem"))
        wss = Relay(self.node.port, ctx)
        self.addCleanup(wss.stop)
        self.bench("wss://localhost:%d/chat" % wss.port, "--ca", ngx.cert)
        # the handshake storm: new TLS connections, no logins
        r = subprocess.run([BENCH, "login", "--handshakes", "-L", "2", "-t",
                            "tls://127.0.0.1:%d" % ngx.tls_port, "--ca", ngx.cert,
                            "--warmup", "0.5", "--duration", "1", "--ids", self.ids, "-q"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        out = r.stdout.decode()
        self.assertEqual(r.returncode, 0, "%s\n%s" % (out, r.stderr.decode()))
        kv = dict(f.split("=", 1) for f in out.split() if "=" in f)
        self.assertEqual(kv["scenario"], "login-handshakes", out)
        self.assertGreater(int(kv["count"]), 0, out)
        self.assertEqual(kv["errors"], "0", out)
        # a wrong CA: the handshake fails and says why
        r = subprocess.run([BENCH, "pairs", "-t", "tls://127.0.0.1:%d" % ngx.tls_port, "--ca", other_ca(),
                            "-P", "2", "--warmup", "0", "--duration", "1", "--ids", self.ids, "-q"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(b"certificate", r.stderr)


class CliHandshake(unittest.TestCase):
    """Handshakes from hand-made servers: one that never answers (chat-cli
    gives up after its reply timeout and retries), one that sends the
    upgrade response a byte at a time."""

    def test_upgrade_in_pieces(self):
        clidrv.cli_or_skip(self)
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        self.addCleanup(lsock.close)

        def serve():
            s, _ = lsock.accept()
            with s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                req = b""
                while b"\r\n\r\n" not in req:
                    req += s.recv(4096)
                key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n")
                       if l.lower().startswith(b"sec-websocket-key:")][0]
                acc = base64.b64encode(hashlib.sha1(
                    key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
                resp = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
                msg = b'{"msgid":12,"errno":0,"errmsg":"in pieces"}'
                frame = bytes([0x81, len(msg)]) + msg
                for i in range(len(resp + frame)):
                    s.sendall((resp + frame)[i:i + 1])
                    time.sleep(0.002)
                s.recv(1)  # until chat-cli goes
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        c = clidrv.Cli(0, name="pieces", url="ws://127.0.0.1:%d/chat" % lsock.getsockname()[1])
        self.addCleanup(c.stop)
        c.expect("connected")
        self.assertEqual(c.expect("notice")["errmsg"], "in pieces")

    def test_silent_server(self):
        clidrv.cli_or_skip(self)
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)  # the kernel accepts; nobody ever speaks
        self.addCleanup(lsock.close)
        port = lsock.getsockname()[1]
        for url, why in (("tls://127.0.0.1:%d" % port, "the TLS handshake timed out"),
                         ("ws://127.0.0.1:%d/chat" % port, "the handshake timed out")):
            c = clidrv.Cli(port, name="silent", url=url, args=["--insecure"], reply_timeout=1)
            self.addCleanup(c.stop)
            t0 = time.monotonic()
            ev = c.expect("connect-failed", timeout=10)
            self.assertEqual(ev["reason"], why)
            self.assertGreaterEqual(time.monotonic() - t0, 0.9)
            c.stop()


if __name__ == "__main__":
    unittest.main()
