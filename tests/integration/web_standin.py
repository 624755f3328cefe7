"""A stand-in WebSocket server for the web client's tests (test_web.py).

It answers the requests the page sends at login and when chatting (REG,
LOGIN, SYNC, HISTORY, chats, everything else with an ACK, errno 0), records
every request, and lets a test push any server message to the page: the
live events chatd does not send yet (TYPING 18, PRESENCE 19, group
receipts on 17, a message from another device of the user) and notices
(116, 119).  So the client's handling of the agreed wire format is checked
in a real browser before the server side lands; the tests against chatd
itself skip until it does.

python3-websockets (10.x, Debian 12) on a thread with its own asyncio loop,
on 127.0.0.1 and a free port.  The page is loaded from a real chatd (its
CSP allows `connect-src ws:`) with `?ws=` pointing here.
"""

import asyncio
import json
import threading
import time

import websockets

ME, BOB, CAT, GROUP = 7, 8, 9, 3

LOGIN_ACK = {
    "msgid": 2, "errno": 0, "id": ME, "name": "me", "token": "standin-token",
    "friends": [{"id": BOB, "name": "bob", "state": "online"}],
    "groups": [{"id": GROUP, "groupname": "team", "groupdesc": "", "users": [
        {"id": ME, "name": "me", "state": "online", "role": "creator"},
        {"id": BOB, "name": "bob", "state": "online", "role": "member"},
        {"id": CAT, "name": "cat", "state": "online", "role": "member"}]}],
    "offlinemsg": [],
}


class StandIn:
    """The server: .url, .got (requests, in order), .connections (count),
    .push(obj) to the newest connection, .stop()."""

    def __init__(self, port):
        self.port = port
        self.url = "ws://127.0.0.1:%d/chat" % port
        self.got = []
        self.connections = 0
        self.cseq = 0
        self.ws = None
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise RuntimeError("the stand-in WebSocket server did not start")

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            websockets.serve(self._conn, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    def answer(self, m):
        r = {"msgid": 11, "seq": m.get("seq"), "errno": 0}
        n = m.get("msgid")
        if n == 4:
            r = {"msgid": 5, "seq": m["seq"], "errno": 0, "id": ME}
        elif n == 1:
            r = dict(LOGIN_ACK, seq=m["seq"])
        elif n == 15:
            r.update(msgs=[], convs=[], more=False)
        elif n == 16:
            r.update(msgs=[], more=False)
        elif n in (6, 10):
            self.cseq += 1
            r.update(mid=1000 + self.cseq, cseq=self.cseq,
                     conv="g%d" % GROUP if n == 10 else "p%d:%d" % (ME, m.get("toid", 0)))
        return r

    async def _conn(self, ws, path=None):
        self.connections += 1
        self.ws = ws
        try:
            async for raw in ws:
                m = json.loads(raw)
                self.got.append(m)
                await ws.send(json.dumps(self.answer(m)))
        except websockets.ConnectionClosed:
            pass

    def push(self, obj):
        fut = asyncio.run_coroutine_threadsafe(self.ws.send(json.dumps(obj)), self.loop)
        fut.result(10)

    def sent(self, msgid, since=0):
        """The page's requests with this msgid (from index since on)."""
        return [m for m in self.got[since:] if m.get("msgid") == msgid]

    def stop(self):
        async def close():
            self.server.close()
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def wait_quiet(pred, seconds):
    """pred() stays false for seconds (a thing that must not happen)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return False
        time.sleep(0.05)
    return True
