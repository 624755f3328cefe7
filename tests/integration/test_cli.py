"""chat-cli in scripted mode against a real chatd.

chat-cli reads commands from a pipe and prints one key=value line per event
(contrib/cli/event.c documents the format).  Two cli processes register, log
in, chat one-to-one, make a group and chat in it; one logs out and gets what
was sent meanwhile at its next login; errors come back as event=error lines;
a whole script given at once runs line by line and the process exits at the
end of its input.

The Cli class is the driver test_nginx_cluster.py uses too (it imports this
module, not its names, so unittest does not collect these tests twice).
"""

import os
import queue
import subprocess
import tempfile
import threading
import time
import unittest

import harness
from harness import Node, Stack

CLI = os.environ.get("CHAT_CLI") or os.path.join(os.path.dirname(harness.CHATD), "chat-cli")

# Free-text fields: they come last and take the rest of the line.
TAIL_KEYS = ("msg", "errmsg", "text", "reason", "json")


def _unescape(s):
    out, i = [], 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s):
            nxt = s[i + 1]
            if nxt == "x" and i + 3 < len(s):
                out.append(chr(int(s[i + 2:i + 4], 16)))
                i += 4
                continue
            out.append({"n": "\n", "r": "\r", "t": "\t"}.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def parse_event(line):
    """'event=chat from=3 name="a b" msg=hi there' -> dict of str; a bare
    word (the "ok" after the kind) maps to True."""
    ev, i, n = {}, 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        if i >= n:
            break
        j = i
        while j < n and line[j] not in "= ":
            j += 1
        key = line[i:j]
        if j >= n or line[j] == " ":
            ev[key] = True
            i = j
            continue
        j += 1  # past '='
        if key in TAIL_KEYS:
            ev[key] = _unescape(line[j:])
            break
        if j < n and line[j] == '"':
            k = j + 1
            while k < n and line[k] != '"':
                k += 2 if line[k] == "\\" else 1
            ev[key] = _unescape(line[j + 1:k])
            i = k + 1
        else:
            k = line.find(" ", j)
            k = n if k < 0 else k
            ev[key] = line[j:k]
            i = k
    return ev


class Cli:
    """One chat-cli process in scripted mode; events are parsed as they come."""

    def __init__(self, port, host="127.0.0.1", reply_timeout=10, name="cli",
                 url=None, args=(), env=None):
        """url (tls://..., ws://...) replaces host:port; args go before it;
        env is merged over os.environ; XDG_STATE_HOME (where chat-cli keeps
        its positions in conversations) is a fresh temp dir unless given."""
        self.name = name
        env = dict(env or {})
        if "XDG_STATE_HOME" not in env:
            env["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="chat-cli-state-")
            harness._owned_dirs.append(env["XDG_STATE_HOME"])
        self.proc = subprocess.Popen(
            [CLI, "-t", str(reply_timeout)] + list(args) + [url or "%s:%d" % (host, port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(os.environ, **env))
        self.events = queue.Queue()
        self.log = []       # every (monotonic time, raw line), for failure messages
        self.skipped = []   # events expect() passed over
        self.history = []   # every parsed event, in order
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log.append((time.monotonic(), line))
            ev = parse_event(line)
            ev["_t"] = time.monotonic()
            ev["_line"] = line
            self.history.append(ev)
            self.events.put(ev)
        self.events.put(None)

    def send(self, *lines):
        self.proc.stdin.write("".join(l + "\n" for l in lines).encode())
        self.proc.stdin.flush()

    def close_input(self):
        self.proc.stdin.close()

    def transcript(self):
        return "\n".join("%s: %s" % (self.name, l) for _, l in self.log[-60:])

    def expect(self, kind, timeout=10, **fields):
        """The next event of this kind whose fields match (compared as str);
        events passed over are kept in .skipped.  An error event fails at
        once unless kind is "error"."""
        deadline = time.monotonic() + timeout
        want = {k: (v if v is True else str(v)) for k, v in fields.items()}
        while True:
            left = deadline - time.monotonic()
            try:
                ev = self.events.get(timeout=max(0.0, left))
            except queue.Empty:
                raise AssertionError("%s: no event=%s %r within %.1f s\n%s"
                                     % (self.name, kind, want, timeout, self.transcript()))
            if ev is None:
                self.events.put(None)
                raise AssertionError("%s: exited (rc %r) before event=%s %r\n%s\nstderr: %s"
                                     % (self.name, self.proc.poll(), kind, want,
                                        self.transcript(), self.stderr()))
            if ev.get("event") == kind and all(ev.get(k) == v for k, v in want.items()):
                return ev
            if ev.get("event") == "error" and kind != "error":
                raise AssertionError("%s: error while waiting for event=%s: %s\n%s"
                                     % (self.name, kind, ev["_line"], self.transcript()))
            self.skipped.append(ev)

    def drain(self):
        """Events that arrived and were not consumed yet."""
        out = []
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return out
            if ev is None:
                self.events.put(None)
                return out
            out.append(ev)

    def stderr(self):
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode("utf-8", "replace")

    def wait(self, timeout=15):
        return self.proc.wait(timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


def cli_or_skip(testcase):
    if not os.access(CLI, os.X_OK):
        testcase.fail("chat-cli not built at %s (set CHAT_CLI)" % CLI)


class CliScripted(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.node = Node(cls.stack)

    @classmethod
    def tearDownClass(cls):
        cls.node.stop()

    def setUp(self):
        cli_or_skip(self)

    def cli(self, name):
        c = Cli(self.node.port, name=name)
        self.addCleanup(c.stop)
        c.expect("connected")
        return c

    def account(self, c, name, password):
        c.send("register %s %s" % (name, password))
        uid = int(c.expect("register", ok=True, name=name)["id"])
        c.send("login %d %s" % (uid, password))
        ev = c.expect("login", ok=True, id=uid, name=name)
        self.assertEqual(ev["offline"], "0")
        return uid

    def test_conversation(self):
        a, b = self.cli("alice"), self.cli("bob")
        aid = self.account(a, "alice", "pw-a")
        bid = self.account(b, "bob", "pw-b")

        # one-to-one, seed syntax; the message keeps its colons, quotes and
        # backslashes, and non-ASCII text
        text = 'hello bob: "quoted" \\ back, ünïcödé'
        a.send("chat:%d:%s" % (bid, text))
        a.expect("sent", to=bid)
        ev = b.expect("chat", **{"from": aid})
        self.assertEqual((ev["name"], ev["msg"]), ("alice", text))
        self.assertNotIn("offline", ev)
        self.assertRegex(ev["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")
        # the space-separated form works too
        b.send("chat %d hi alice" % aid)
        b.expect("sent", to=aid)
        self.assertEqual(a.expect("chat", **{"from": bid})["msg"], "hi alice")

        # a group: its id is shown on creation
        a.send("creategroup:team:the whole team")
        gid = int(a.expect("creategroup", ok=True, name="team")["groupid"])
        self.assertGreater(gid, 0)
        b.send("addgroup:%d" % gid)
        b.expect("addgroup", ok=True, groupid=gid)
        a.send("groupchat:%d:hi team" % gid)
        a.expect("sent", group=gid)
        ev = b.expect("groupchat", group=gid)
        self.assertEqual((ev["from"], ev["name"], ev["msg"]), (str(aid), "alice", "hi team"))

        # lists with presence
        a.send("addfriend:%d" % bid)
        a.expect("addfriend", ok=True, id=bid)
        a.send("friends")
        self.assertEqual(a.expect("friend", id=bid)["state"], "online")
        a.expect("friends", count=1, online=1)
        b.send("groups")
        ev = b.expect("group", id=gid)
        self.assertEqual((ev["name"], ev["desc"], ev["members"]), ("team", "the whole team", "2"))
        b.expect("groups", count=1)

        # errors are shown plainly: the server's errno and errmsg
        a.send("addfriend:%d" % bid)
        ev = a.expect("error", req=7)
        self.assertEqual(ev["errno"], "110")
        self.assertTrue(ev["errmsg"])
        a.send("addgroup:99999999")
        ev = a.expect("error", req=9)
        self.assertNotEqual(ev["errno"], "0")
        a.send("chat:x:no id")
        self.assertIn("usage", a.expect("error", req=0)["errmsg"])

        # logged out, bob gets what was sent meanwhile at his next login
        b.send("loginout")
        b.expect("logout", ok=True)
        a.send("chat:%d:while you were away" % bid, "groupchat:%d:group while away" % gid)
        a.expect("sent", to=bid)
        a.expect("sent", group=gid)
        b.send("login %d pw-b" % bid)
        self.assertEqual(b.expect("login", ok=True, id=bid)["offline"], "2")
        got = [b.expect("chat", offline=1), b.expect("groupchat", offline=1)]
        self.assertEqual([e["msg"] for e in got], ["while you were away", "group while away"])

        # end of input: the process exits once the last reply is in
        a.send("friends")
        a.close_input()
        a.expect("friends", count=1)
        self.assertEqual(a.wait(), 0)

    def test_whole_script_at_once(self):
        """Lines given all at once run one at a time, each after the reply
        to the one before; exit 0 at the end of input."""
        c = Cli(self.node.port, name="script")
        self.addCleanup(c.stop)
        c.send("# a comment", "", "help", "register zed pw-z", "friends",
               "register zed pw-again", "sleep 0.2", "bogus")
        c.close_input()
        self.assertEqual(c.wait(), 0, c.transcript())
        kinds = [parse_event(l)["event"] for _, l in c.log]
        self.assertIn("help", kinds)
        rest = [parse_event(l) for _, l in c.log if not l.startswith("event=help")]
        self.assertEqual([e["event"] for e in rest],
                         ["connected", "register", "error", "error", "error"], c.transcript())
        self.assertEqual(rest[2]["errno"], "106")   # friends needs a login
        self.assertEqual(rest[2]["req"], "13")
        self.assertNotEqual(rest[3]["errno"], "0")  # the name is taken
        self.assertEqual(rest[3]["req"], "4")
        self.assertIn("unknown command", rest[4]["errmsg"])

    def test_no_server(self):
        """Without a server a script's network commands wait; at the end of
        input it gives up after the reply timeout and exits 1."""
        port = harness.free_port()
        c = Cli(port, reply_timeout=1, name="noserver")
        self.addCleanup(c.stop)
        c.expect("connect-failed")
        c.send("friends")
        c.close_input()
        self.assertEqual(c.wait(), 1)
        self.assertEqual(c.expect("timeout")["reason"], "no connection at end of input")


if __name__ == "__main__":
    unittest.main()
