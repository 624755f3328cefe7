"""WebSocket transport (issue 9) against a real chatd, with python3-websockets
(Debian's 10.4, asyncio API) as the client and raw sockets where a library
would refuse to misbehave.

The node listens on tcp:// and ws://127.0.0.1:PORT/chat at once.  Covered:
the upgrade; the seed flow (protocol 1) and protocol 2 login and chat with a
plain TCP harness Client; fragmented messages; ping/pong both ways and the
pong timeout; the close handshake; a bad Origin refused (403); a missing or
invalid Sec-WebSocket-Key (400); a bad version (426) and path (404); an
unmasked client frame (1002); an oversized message (1009); a binary message
(1003); a peer that never completes the handshake is timed out; a message
that is not one JSON object gets a protocol error; SIGTERM sends the 118
notice and then a 1001 close.  TestWss: login and chat over wss (ws on
tls, Node(wss=True)) with a TCP user on the other end.
"""

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import time
import unittest
import uuid

from harness import Client, Node, NodeCase, NodeError, Stack, free_port

try:
    import websockets
    import websockets.exceptions
except ImportError:  # pragma: no cover - python3-websockets is a build dep
    websockets = None

PASSWORD = "pw-ws"
TIME = "2026-12-04 12:00:00"
GOOD_ORIGIN = "https://chat.example"
MAX_MESSAGE = 4096
PING_INTERVAL = 2
PONG_TIMEOUT = 2
HANDSHAKE_TIMEOUT = 2
KEY = base64.b64encode(b"0123456789abcdef").decode()


def uname(base="ws"):
    return "%s%s" % (base, uuid.uuid4().hex[:10])


# ---- raw WebSocket over a socket (for what a library will not send) -------

def upgrade_request(port, path="/chat", key=KEY, version="13", origin=None, extra=""):
    lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1:%d" % port,
             "Upgrade: websocket", "Connection: Upgrade"]
    if key is not None:
        lines.append("Sec-WebSocket-Key: %s" % key)
    if version is not None:
        lines.append("Sec-WebSocket-Version: %s" % version)
    if origin is not None:
        lines.append("Origin: %s" % origin)
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def client_frame(opcode, payload, fin=True, mask=True):
    if isinstance(payload, str):
        payload = payload.encode()
    head = bytes([(0x80 if fin else 0) | opcode])
    n, m = len(payload), (0x80 if mask else 0)
    if n < 126:
        head += bytes([m | n])
    elif n < 65536:
        head += bytes([m | 126]) + struct.pack(">H", n)
    else:
        head += bytes([m | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawWs:
    """A socket speaking just enough RFC 6455 to misbehave on purpose."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def close(self):
        self.sock.close()

    def _fill(self, deadline):
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.buf += data

    def http_response(self, timeout=5):
        """(status, head text) of the answer to the upgrade request."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            self._fill(deadline)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        text = head.decode("latin-1")
        return int(text.split(" ", 2)[1]), text

    def handshake(self, port, **kw):
        self.sock.sendall(upgrade_request(port, **kw))
        status, head = self.http_response()
        assert status == 101, head
        return head

    def frame(self, timeout=5):
        """(opcode, payload) of the next server frame."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < 2:
            self._fill(deadline)
        b0, b1 = self.buf[0], self.buf[1]
        assert not b1 & 0x80, "a server frame is never masked"
        n, h = b1 & 0x7F, 2
        if n == 126:
            while len(self.buf) < 4:
                self._fill(deadline)
            n, h = struct.unpack(">H", self.buf[2:4])[0], 4
        elif n == 127:
            while len(self.buf) < 10:
                self._fill(deadline)
            n, h = struct.unpack(">Q", self.buf[2:10])[0], 10
        while len(self.buf) < h + n:
            self._fill(deadline)
        payload, self.buf = self.buf[h:h + n], self.buf[h + n:]
        return b0 & 0x0F, payload

    def close_code(self, timeout=5):
        """The code of the next close frame, skipping other frames."""
        deadline = time.monotonic() + timeout
        while True:
            op, payload = self.frame(max(0.01, deadline - time.monotonic()))
            if op == 0x8:
                return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None

    def eof(self, timeout=5):
        """True once the server closed the TCP connection."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self._fill(deadline)  # what arrives meanwhile stays in .buf
        except (EOFError, ConnectionResetError):
            return True
        except socket.timeout:
            return False
        return False


# ---- the class -------------------------------------------------------------

@unittest.skipIf(websockets is None, "python3-websockets is not installed")
class TestWebSocket(NodeCase):
    """One node with a tcp:// and a ws:// listener."""

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        tcp, ws = free_port(), free_port()
        conf = {"server": {"listen": "tcp://127.0.0.1:%d, ws://127.0.0.1:%d/chat" % (tcp, ws)},
                "ws": {"origins": GOOD_ORIGIN, "max_message": MAX_MESSAGE,
                       "ping_interval": PING_INTERVAL, "pong_timeout": PONG_TIMEOUT,
                       "handshake_timeout": HANDSHAKE_TIMEOUT},
                "plugin.login": {"hash_cost": 1}}
        cls.node = Node(cls.stack, conf=conf)
        cls.ws_port = cls.node.ws_port
        assert (cls.node.port, cls.ws_port) == (tcp, ws)

    # helpers
    @property
    def url(self):
        return "ws://127.0.0.1:%d/chat" % self.ws_port

    def connect(self, **kw):
        kw.setdefault("ping_interval", None)  # the server's pings are under test
        kw.setdefault("open_timeout", 10)
        return websockets.connect(self.url, **kw)

    def raw(self):
        r = RawWs(self.ws_port)
        self.addCleanup(r.close)
        return r

    def tcp_user(self, proto=2):
        c = Client(self.node.port, proto=proto)
        self.addCleanup(c.close)
        name = uname("tcp")
        uid = c.register(name, PASSWORD)
        ack = c.login(uid, PASSWORD)
        self.assertEqual(ack.get("errno"), 0, ack)
        return c, uid, name

    @staticmethod
    async def recv_json(ws, pred=lambda m: True, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            text = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
            assert isinstance(text, str), "a reply is a text message: %r" % (text,)
            msg = json.loads(text)  # exactly one JSON document per message
            if pred(msg):
                return msg

    async def ws_request(self, ws, obj, seq):
        await ws.send(json.dumps(dict(obj, proto=2, seq=seq)))
        return await self.recv_json(ws, lambda m: m.get("seq") == seq)

    # tests
    def test_upgrade(self):
        async def go():
            async with self.connect() as ws:
                self.assertEqual(ws.response_headers.get("Upgrade", "").lower(), "websocket")
                self.assertTrue(ws.open)
        asyncio.run(go())

    def test_seed_flow_protocol_1(self):
        """Register, log in and chat as the seed client does, over ws, with a
        TCP user on the other end."""
        tcp, tcp_id, _ = self.tcp_user(proto=1)

        async def go():
            async with self.connect() as ws:
                name = uname()
                await ws.send(json.dumps({"msgid": 4, "name": name, "password": PASSWORD}))
                reg = await self.recv_json(ws, lambda m: m.get("msgid") == 5)
                self.assertEqual(reg.get("errno"), 0, reg)
                await ws.send(json.dumps({"msgid": 1, "id": reg["id"], "password": PASSWORD}))
                ack = await self.recv_json(ws, lambda m: m.get("msgid") == 2)
                self.assertEqual(ack.get("errno"), 0, ack)
                await ws.send(json.dumps({"msgid": 6, "id": reg["id"], "name": name,
                                          "toid": tcp_id, "msg": "hello tcp", "time": TIME}))
                got = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: tcp.recv_until(lambda m: m.get("msgid") == 6, timeout=10))
                self.assertEqual(got["msg"], "hello tcp")
                self.assertEqual(got["id"], reg["id"])
                tcp.send({"msgid": 6, "id": tcp_id, "name": "x", "toid": reg["id"],
                          "msg": "hello ws", "time": TIME})
                back = await self.recv_json(ws, lambda m: m.get("msgid") == 6)
                self.assertEqual(back["msg"], "hello ws")
        asyncio.run(go())

    def test_protocol_2_chat(self):
        tcp, tcp_id, tcp_name = self.tcp_user(proto=2)

        async def go():
            async with self.connect() as ws:
                name = uname()
                reg = await self.ws_request(ws, {"msgid": 4, "name": name,
                                                 "password": PASSWORD}, 1)
                self.assertEqual(reg.get("errno"), 0, reg)
                ack = await self.ws_request(ws, {"msgid": 1, "id": reg["id"],
                                                 "password": PASSWORD}, 2)
                self.assertEqual(ack.get("errno"), 0, ack)
                reply = await self.ws_request(ws, {"msgid": 6, "id": reg["id"], "name": name,
                                                   "toid": tcp_id, "msg": "p2 hello",
                                                   "time": TIME}, 3)
                self.assertEqual(reply.get("errno", 0), 0, reply)
                got = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: tcp.recv_until(lambda m: m.get("msgid") == 6, timeout=10))
                self.assertEqual((got["msg"], got["id"], got["name"]),
                                 ("p2 hello", reg["id"], name))
                tcp.request({"msgid": 6, "id": tcp_id, "name": tcp_name, "toid": reg["id"],
                             "msg": "p2 back", "time": TIME})
                back = await self.recv_json(ws, lambda m: m.get("msgid") == 6)
                self.assertEqual((back["msg"], back["id"]), ("p2 back", tcp_id))
        asyncio.run(go())

    def test_fragmented_message(self):
        async def go():
            async with self.connect() as ws:
                name = uname()
                text = json.dumps({"msgid": 4, "name": name, "password": PASSWORD,
                                   "proto": 2, "seq": 7})
                await ws.send([text[:5], text[5:17], text[17:]])  # three frames
                reply = await self.recv_json(ws, lambda m: m.get("seq") == 7)
                self.assertEqual(reply.get("errno"), 0, reply)
        asyncio.run(go())

    def test_client_ping(self):
        async def go():
            async with self.connect() as ws:
                waiter = await ws.ping(b"are you there")
                await asyncio.wait_for(waiter, 5)
        asyncio.run(go())

    def test_server_ping_and_pong_timeout(self):
        """The server pings every ping_interval; a peer that never answers is
        closed with 1008 after pong_timeout."""
        r = self.raw()
        r.handshake(self.ws_port)
        op, _ = r.frame(timeout=PING_INTERVAL + 3)
        self.assertEqual(op, 0x9)
        r.sock.sendall(client_frame(0xA, b""))  # answered once: still open
        op, _ = r.frame(timeout=PING_INTERVAL + 3)
        self.assertEqual(op, 0x9)
        start = time.monotonic()  # not answered this time
        self.assertEqual(r.close_code(timeout=PONG_TIMEOUT + 3), 1008)
        self.assertGreaterEqual(time.monotonic() - start, PONG_TIMEOUT - 1)
        self.assertTrue(r.eof())

    def test_library_answers_server_pings(self):
        """websockets answers pings itself: the connection outlives several
        ping intervals."""
        async def go():
            async with self.connect() as ws:
                await asyncio.sleep(PING_INTERVAL * 2 + PONG_TIMEOUT)  # a span, not a wait
                reply = await self.ws_request(ws, {"msgid": 4, "name": uname(),
                                                   "password": PASSWORD}, 1)
                self.assertEqual(reply.get("errno"), 0, reply)
        asyncio.run(go())

    def test_close_handshake(self):
        async def go():
            async with self.connect() as ws:
                await ws.close(1000, "bye")
                self.assertEqual(ws.close_code, 1000)
                await asyncio.wait_for(ws.wait_closed(), 5)
        asyncio.run(go())
        # raw: the echo carries the code, then the server closes TCP
        r = self.raw()
        r.handshake(self.ws_port)
        r.sock.sendall(client_frame(0x8, struct.pack(">H", 4000) + b"done"))
        self.assertEqual(r.close_code(), 4000)
        self.assertTrue(r.eof())

    def test_idle_release(self):
        """The engine frees wslay's frame context whenever a read ends on a frame
        boundary with no message open (ws.c) and makes a new one when bytes
        come: a frame split across that point, a fragmented message with
        pings between its frames, pings and the close handshake all work
        on a connection that was idle in between."""
        r = self.raw()
        r.handshake(self.ws_port)

        def reg(seq):
            return json.dumps({"msgid": 4, "name": uname(), "password": PASSWORD,
                               "proto": 2, "seq": seq})

        def reply(seq):
            deadline = time.monotonic() + 10
            while True:
                op, payload = r.frame(max(0.01, deadline - time.monotonic()))
                if op == 0x1 and json.loads(payload).get("seq") == seq:
                    return json.loads(payload)
                self.assertEqual(op, 0x9, payload)  # only the server's pings between

        def pong(data):
            r.sock.sendall(client_frame(0x9, data))
            deadline = time.monotonic() + 10
            while True:
                op, payload = r.frame(max(0.01, deadline - time.monotonic()))
                if op == 0xA:
                    self.assertEqual(payload, data)
                    return
                self.assertEqual(op, 0x9, payload)

        # a whole frame, then the first 3 bytes of the next in the same
        # packet; the rest after the first answer (released in between)
        a, b = client_frame(0x1, reg(1)), client_frame(0x1, reg(2))
        r.sock.sendall(a + b[:3])
        self.assertEqual(reply(1).get("errno"), 0)
        r.sock.sendall(b[3:])
        self.assertEqual(reply(2).get("errno"), 0)
        # a fragmented message across idle points, pings between its frames
        text = reg(3)
        r.sock.sendall(client_frame(0x1, text[:10], fin=False))
        pong(b"one")
        r.sock.sendall(client_frame(0x0, text[10:20], fin=False))
        pong(b"two")
        r.sock.sendall(client_frame(0x0, text[20:]))
        self.assertEqual(reply(3).get("errno"), 0)
        # a 16-bit length frame, byte by byte
        big = json.dumps({"msgid": 4, "name": uname(), "password": PASSWORD,
                          "proto": 2, "seq": 4, "pad": "x" * 300})
        for ch in client_frame(0x1, big):
            r.sock.sendall(bytes([ch]))
        self.assertIn("errno", reply(4))
        # the close handshake after an idle period
        pong(b"last")
        r.sock.sendall(client_frame(0x8, struct.pack(">H", 1000) + b"bye"))
        self.assertEqual(r.close_code(), 1000)
        self.assertTrue(r.eof())

    def test_origin(self):
        async def go():
            with self.assertRaises(websockets.exceptions.InvalidStatusCode) as cm:
                async with self.connect(origin="https://evil.example"):
                    pass
            self.assertEqual(cm.exception.status_code, 403)
            async with self.connect(origin=GOOD_ORIGIN) as ws:
                self.assertTrue(ws.open)
            async with self.connect() as ws:  # no Origin: not a browser
                self.assertTrue(ws.open)
        asyncio.run(go())

    def test_bad_key(self):
        for key in (None, "abc", "not base64 at all!!!!!!=", base64.b64encode(b"x" * 17).decode()):
            r = self.raw()
            r.sock.sendall(upgrade_request(self.ws_port, key=key))
            status, head = r.http_response()
            self.assertEqual(status, 400, (key, head))
            self.assertTrue(r.eof())

    def test_bad_version_and_path(self):
        r = self.raw()
        r.sock.sendall(upgrade_request(self.ws_port, version="8"))
        status, head = r.http_response()
        self.assertEqual(status, 426)
        self.assertIn("Sec-WebSocket-Version: 13", head)
        r = self.raw()
        r.sock.sendall(upgrade_request(self.ws_port, path="/other"))
        self.assertEqual(r.http_response()[0], 404)

    def test_unmasked_frame(self):
        r = self.raw()
        r.handshake(self.ws_port)
        r.sock.sendall(client_frame(0x1, '{"msgid":4}', mask=False))
        self.assertEqual(r.close_code(), 1002)
        self.assertTrue(r.eof())

    def test_oversized(self):
        async def go():
            async with self.connect(max_size=None) as ws:
                await ws.send(json.dumps({"msgid": 4, "name": "x" * MAX_MESSAGE,
                                          "password": PASSWORD}))
                with self.assertRaises(websockets.exceptions.ConnectionClosed) as cm:
                    await asyncio.wait_for(ws.recv(), 10)
                self.assertEqual(cm.exception.rcvd.code, 1009)
        asyncio.run(go())

    def test_binary(self):
        async def go():
            async with self.connect() as ws:
                await ws.send(b'{"msgid":4}')
                with self.assertRaises(websockets.exceptions.ConnectionClosed) as cm:
                    await asyncio.wait_for(ws.recv(), 10)
                self.assertEqual(cm.exception.rcvd.code, 1003)
        asyncio.run(go())

    def test_not_one_json_object(self):
        """A message must be exactly one JSON object: two, or a bare value,
        get the protocol error a tcp client gets (protocol 2: a protocol 1
        session is answered nothing, as on tcp), and the line stays open."""
        async def go():
            async with self.connect() as ws:
                reply = await self.ws_request(ws, {"msgid": 4, "name": uname(),
                                                   "password": PASSWORD}, 1)
                self.assertEqual(reply.get("errno"), 0, reply)  # now protocol 2
                for text in ('{"msgid":4} {"msgid":4}', '[1,2]'):
                    await ws.send(text)
                    reply = await self.recv_json(ws)
                    self.assertIn(reply.get("errno"), (100, 101), (text, reply))
                reply = await self.ws_request(ws, {"msgid": 4, "name": uname(),
                                                   "password": PASSWORD}, 2)
                self.assertEqual(reply.get("errno"), 0, reply)
        asyncio.run(go())

    def test_handshake_timeout(self):
        """A peer that starts the upgrade request and never finishes it is
        closed after handshake_timeout, without an answer."""
        r = self.raw()
        start = time.monotonic()
        r.sock.sendall(b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        self.assertTrue(r.eof(timeout=HANDSHAKE_TIMEOUT + 5))
        self.assertGreaterEqual(time.monotonic() - start, HANDSHAKE_TIMEOUT - 1)
        self.assertNotIn(b"HTTP/1.1 101", r.buf)
        # and one that sends nothing at all
        r = self.raw()
        self.assertTrue(r.eof(timeout=HANDSHAKE_TIMEOUT + 5))


@unittest.skipIf(websockets is None, "python3-websockets is not installed")
class TestWsShutdown(unittest.TestCase):
    """SIGTERM: the 118 notice as a message, then a close frame 1001; SIGHUP
    reloads [ws] for new connections."""

    def test_sigterm_notice_then_going_away(self):
        node = Node(None, redis=False, mysql=False, plugins=("login",), ws=True)
        try:
            r = RawWs(node.ws_port)
            self.addCleanup(r.close)
            r.handshake(node.ws_port)
            r.sock.sendall(client_frame(0x1, '{"msgid":1,"id":1,"password":"x","proto":2}'))
            op, payload = r.frame(timeout=10)
            self.assertEqual((op, json.loads(payload).get("msgid")), (0x1, 2))
            node.kill(signal.SIGTERM)
            op, payload = r.frame(timeout=10)
            self.assertEqual(op, 0x1)
            notice = json.loads(payload)
            self.assertEqual((notice.get("msgid"), notice.get("errno")), (12, 118))
            self.assertEqual(r.close_code(timeout=10), 1001)
            self.assertTrue(r.eof(timeout=10))
            self.assertEqual(node.wait(30), 0)
        finally:
            if node.running():
                node.stop()

    def test_legacy_replies_are_not_paced(self):
        """legacy_pace_ms keeps the seed's TCP reads to one document each;
        over ws every message is a frame of its own, so none waits."""
        node = Node(None, redis=False, mysql=False, plugins=("login",), ws=True,
                    conf={"server": {"legacy_pace_ms": 1000}})
        try:
            r = RawWs(node.ws_port)
            self.addCleanup(r.close)
            r.handshake(node.ws_port)
            start = time.monotonic()
            r.sock.sendall(b"".join(client_frame(0x1, '{"msgid":1,"id":%d,"password":"x"}' % i)
                                    for i in range(1, 5)))
            for _ in range(4):
                op, payload = r.frame(timeout=10)
                self.assertEqual((op, json.loads(payload).get("msgid")), (0x1, 2))
            self.assertLess(time.monotonic() - start, 2.5)  # paced: 3 s at least
        finally:
            node.stop()

    def test_sighup_reloads_origins_for_new_connections(self):
        node = Node(None, redis=False, mysql=False, plugins=("login",), ws=True,
                    conf={"ws": {"origins": "https://a.example"}})
        try:
            def status(origin):
                r = RawWs(node.ws_port)
                try:
                    r.sock.sendall(upgrade_request(node.ws_port, origin=origin))
                    return r.http_response()[0]
                finally:
                    r.close()
            self.assertEqual(status("https://b.example"), 403)
            kept = RawWs(node.ws_port)  # open before the reload: keeps working
            self.addCleanup(kept.close)
            kept.handshake(node.ws_port, origin="https://a.example")
            mark = node.log_mark()
            node.write_conf({"ws": {"origins": "https://b.example"}})
            node.sighup()
            node.wait_log("[ws] reloaded", since=mark)
            self.assertEqual(status("https://b.example"), 101)
            self.assertEqual(status("https://a.example"), 403)
            kept.sock.sendall(client_frame(0x1, '{"msgid":1,"id":1,"password":"x","proto":2}'))
            op, payload = kept.frame(timeout=10)
            self.assertEqual((op, json.loads(payload).get("msgid")), (0x1, 2))
            self.assertEqual(node.stop(), 0)
        finally:
            if node.running():
                node.stop()


@unittest.skipIf(websockets is None, "python3-websockets is not installed")
class TestWss(NodeCase):
    """wss://: WebSocket over tls, with the harness's self-signed pair."""

    recv_json = staticmethod(TestWebSocket.recv_json)
    ws_request = TestWebSocket.ws_request

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.node = Node(cls.stack, wss=True, conf={"plugin.login": {"hash_cost": 1}})

    def test_login_and_chat_with_a_tcp_user(self):
        tcp = Client(self.node.port, proto=2)
        self.addCleanup(tcp.close)
        tcp_name = uname("tcp")
        tcp_id = tcp.register(tcp_name, PASSWORD)
        self.assertEqual(tcp.login(tcp_id, PASSWORD).get("errno"), 0)

        async def go():
            async with websockets.connect(self.node.wss_url, ssl=self.node.tls_context(),
                                          ping_interval=None, open_timeout=10) as ws:
                name = uname("wss")
                reg = await self.ws_request(ws, {"msgid": 4, "name": name,
                                                                "password": PASSWORD}, 1)
                self.assertEqual(reg.get("errno"), 0, reg)
                ack = await self.ws_request(ws, {"msgid": 1, "id": reg["id"],
                                                                "password": PASSWORD}, 2)
                self.assertEqual(ack.get("errno"), 0, ack)
                await ws.send(json.dumps({"msgid": 6, "id": reg["id"], "name": name,
                                          "toid": tcp_id, "msg": "over wss", "time": TIME,
                                          "proto": 2, "seq": 3}))
                got = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: tcp.recv_until(lambda m: m.get("msgid") == 6, timeout=10))
                self.assertEqual((got["msg"], got["id"]), ("over wss", reg["id"]))
                tcp.request({"msgid": 6, "id": tcp_id, "name": tcp_name, "toid": reg["id"],
                             "msg": "back over wss", "time": TIME})
                back = await self.recv_json(ws, lambda m: m.get("msgid") == 6)
                self.assertEqual((back["msg"], back["id"]), ("back over wss", tcp_id))
        asyncio.run(go())

    def test_plain_ws_on_the_wss_port_fails(self):
        """The wss port speaks TLS first: a plain upgrade gets no 101."""
        r = RawWs(self.node.wss_port)
        self.addCleanup(r.close)
        r.sock.sendall(upgrade_request(self.node.wss_port))
        r.eof(timeout=5)
        self.assertNotIn(b"HTTP/1.1 101", r.buf)


if __name__ == "__main__":
    unittest.main()
