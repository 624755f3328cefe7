#!/usr/bin/python3
"""Soak with faults (issue 12): three chatd nodes behind nginx, mixed chat
traffic from protocol-2 clients that count every acknowledged message, and a
fault schedule, for SOAK_MINUTES; then a Markdown report (docs/reliability.md
says how to read it).

The stack is the integration harness's (tests/integration/harness.py): a
private MariaDB and Redis of its own (Stack.private, so they can be
restarted), three Node()s on one database, nginx (stream) from
test_nginx_cluster.Nginx in front of them, and between the clients and nginx
a fault-injecting TCP proxy of our own (FaultProxy: cut = close both sides,
stall = stop forwarding for N s, slow = trickle bytes), which needs no root,
unlike ip netns / tc.

Accounting.  Every chat message carries its identity in its text,
"soak|<sender id>|<n>|<attempt>|...": n is the sender's message number and
attempt counts its sends.  Most users are durable clients (issue 8,
docs/protocol.md "Durable messages"): each message has a cid
("soak-<sender>-<n>") and is resent with the same cid until an ACK with
errno 0 (after COMMIT: mid, conv, cseq); every user - durable sender or
not - SYNCs until more is false after every login, holds each
conversation as one contiguous run of cseqs (a copy at or below its
position is dropped: dedup by mid; a live message that skips a cseq
triggers a SYNC instead of being taken).  A quarter of the users
(SOAK_LEGACY) send without cid, the at-most-once path (the nodes run
with durable = cid, so that these stay non-durable): their message is
resent until errno 0 too, which means delivered or committed to the
offline store (docs/protocol.md, "What an ACK of a chat message means").
At the end every user logs in again, after the traffic stopped, syncs,
drains what follows, and syncs once more for the heads.  Then, for
durable messages, strictly:
  lost        = (acknowledged message, recipient) pairs never received;
  duplicated  = a message held twice by one recipient (two mids for one
                cid: stored twice);
  out of order / behind / mid mismatch = a SYNC that skipped a cseq, a
                conversation short of its head at the end, a mid other
                than the ACK's;
and for legacy messages as before: lost, and "in flight" when its
recipient's connection was cut, or ended with its node, within a few
seconds of the ACK (pub/sub delivery is at most once without a cid, so
such a loss is the known limit, reported apart from unexplained ones);
duplicated = the same (message, attempt) received twice (the same message
from two attempts is a resend whose first ACK was lost: counted, not a
fault).

Exit status non-zero (the CI check) on: any durable loss, duplicate or
order fault, an unexplained legacy loss or a legacy duplicate, a crash (a
node that exited without our SIGKILL, a sanitizer report), an error/warn
kind in the chatd logs that docs/reliability.md does not explain, or no
acknowledged message (durable, and legacy when there are legacy users).
Never on throughput or growth (those are reported).  SOAK_STRICT=1 also
fails on legacy in-flight losses.  SOAK_SELFTEST=1 checks the checker:
user 0 forgets its 5th durable message and holds its 6th twice; the
verdict must be FAIL with exactly 1 durable lost and 1 durable duplicated
(and nothing else wrong), and the exit status is 0 when it is.

Environment: SOAK_MINUTES (30), SOAK_RATE (messages/s over all users, 8),
SOAK_USERS (12), SOAK_LEGACY (senders without cid, SOAK_USERS / 4),
SOAK_SAMPLE_S (5), SOAK_FAULT_EVERY (seconds between
faults, 20), SOAK_SEED, SOAK_OUT (the output folder; default
var/soak/<UTC timestamp>/ in the source tree), SOAK_STRICT; CHATD and
CHAT_PLUGIN_DIR as for the harness.

`soak.py --errors DIR` classifies the error kinds of a finished run's logs
(DIR/chatd-n*.log) again, against today's table in docs/reliability.md.
"""

import collections
import csv
import json
import os
import queue
import random
import re
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))

import harness  # noqa: E402
from harness import Client, Node, Stack, free_port, wait_for  # noqa: E402
import test_nginx_cluster as ngx  # noqa: E402

PLUGINS = ("login", "friend", "one2one", "group", "offline", "store")
ACK_TIMEOUT = 20.0      # longer than any stall, so a stall is not a reconnect
STALL_S = 6
SLOW_S = 8
SLOW_BPS = 400          # bytes a second each way while slowed
INFLIGHT_BEFORE = 2.0   # a loss is "in flight" when the recipient's session
INFLIGHT_AFTER = 15.0   # ended within [ack - 2 s, ack + 15 s]
GROWTH_LIMIT = 0.05
MIN_SERIES_S = 60       # shorter RSS/fd series are reported, not judged
FD_SLACK = 2            # descriptors (besides sessions) within the noise


def env_float(name, default):
    v = os.environ.get(name)
    return float(v) if v not in (None, "") else default


def log(fmt, *args):
    sys.stdout.write("[soak %s] %s\n" % (time.strftime("%H:%M:%S"), fmt % args))
    sys.stdout.flush()


# --------------------------------------------------------------------------
# the fault-injecting proxy

class ProxyConn:
    """One client connection through the proxy: client socket <-> upstream."""

    def __init__(self, proxy, csock, usock, cid):
        self.proxy, self.c, self.u, self.id = proxy, csock, usock, cid
        self.cut = False
        self.stall_until = 0.0
        self.slow_until = 0.0
        self.port = csock.getpeername()[1]   # the client's local port

    def run(self):
        pend = {self.c: bytearray(), self.u: bytearray()}  # bytes to write TO key
        other = {self.c: self.u, self.u: self.c}
        eof = set()
        allowance = {self.c: 0.0, self.u: 0.0}
        last = time.monotonic()
        try:
            while not self.cut and not self.proxy.closed:
                now = time.monotonic()
                dt, last = now - last, now
                if now < self.stall_until:
                    time.sleep(0.05)
                    continue
                slow = now < self.slow_until
                for s in allowance:
                    allowance[s] = min(SLOW_BPS, allowance[s] + SLOW_BPS * dt) if slow else 1 << 20
                rl = [s for s in (self.c, self.u) if s not in eof and len(pend[other[s]]) < 1 << 18]
                wl = [s for s in (self.c, self.u) if pend[s] and allowance[s] >= 1]
                if not rl and not wl:
                    if eof and not any(pend.values()):
                        break
                    time.sleep(0.05)
                    continue
                r, w, _ = select.select(rl, wl, [], 0.1)
                for s in r:
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        eof.add(s)
                    else:
                        pend[other[s]] += data
                for s in w:
                    n = int(min(len(pend[s]), allowance[s]))
                    try:
                        sent = s.send(bytes(pend[s][:n]))
                    except OSError:
                        raise EOFError
                    del pend[s][:sent]
                    allowance[s] -= sent
                if eof and not any(pend.values()):
                    break
                if len(eof) == 1 and not pend[other[next(iter(eof))]]:
                    break   # one side closed and everything it sent is through
        except (EOFError, OSError):
            pass
        finally:
            for s in (self.c, self.u):
                try:
                    s.close()
                except OSError:
                    pass
            self.proxy.forget(self)


class FaultProxy:
    """127.0.0.1:port -> upstream_port, one thread per connection."""

    def __init__(self, upstream_port):
        self.upstream = upstream_port
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.port = free_port()
        self.lsock.bind(("127.0.0.1", self.port))
        self.lsock.listen(256)
        self.conns = {}
        self.lock = threading.Lock()
        self.closed = False
        self.ids = 0
        threading.Thread(target=self.accept_loop, daemon=True, name="proxy").start()

    def accept_loop(self):
        while not self.closed:
            r, _, _ = select.select([self.lsock], [], [], 0.2)
            if not r:
                continue
            try:
                c, _ = self.lsock.accept()
            except OSError:
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                c.close()
                continue
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.setblocking(False)
            with self.lock:
                self.ids += 1
                pc = ProxyConn(self, c, u, self.ids)
                self.conns[pc.id] = pc
            threading.Thread(target=pc.run, daemon=True).start()

    def forget(self, pc):
        with self.lock:
            self.conns.pop(pc.id, None)

    def pick(self, rng, k):
        with self.lock:
            live = list(self.conns.values())
        return rng.sample(live, min(k, len(live)))

    def close(self):
        self.closed = True
        self.lsock.close()


# --------------------------------------------------------------------------
# one long-lived thread starts every chatd

class Starter:
    """Runs calls on one thread that lives as long as the process.  The
    harness starts chatd with PR_SET_PDEATHSIG, which fires when the *thread*
    that forked it ends: a node started from the fault thread would get
    SIGTERM when that thread returns."""

    def __init__(self):
        self.q = queue.Queue()
        threading.Thread(target=self.loop, daemon=True, name="starter").start()

    def loop(self):
        while True:
            fn, done, box = self.q.get()
            try:
                box.append((True, fn()))
            except BaseException as e:  # handed back to the caller
                box.append((False, e))
            done.set()

    def call(self, fn):
        done, box = threading.Event(), []
        self.q.put((fn, done, box))
        done.wait()
        ok, v = box[0]
        if not ok:
            raise v
        return v


STARTER = Starter()


# --------------------------------------------------------------------------
# users

class Msg:
    __slots__ = ("sender", "n", "kind", "to", "attempt", "acked_at", "errnos",
                 "durable", "mid", "conv", "cseq", "dup_ack")

    def __init__(self, sender, n, kind, to, durable):
        self.sender, self.n, self.kind, self.to = sender, n, kind, to
        self.attempt = 0
        self.acked_at = None
        self.errnos = collections.Counter()
        self.durable = durable      # sent with a cid (issue 8)
        self.mid = self.conv = self.cseq = None     # from its ACK
        self.dup_ack = False        # its ACK said "dup": an earlier send stored it


class User:
    def __init__(self, soak, idx, uid, name):
        self.soak, self.idx, self.uid, self.name = soak, idx, uid, name
        self.password = "pw-" + name
        self.token = None
        self.rng = random.Random(soak.seed * 1000 + idx)
        self.partner = None
        self.groups = []
        self.sent = []              # Msg, in creation order
        self.pending = collections.deque()
        self.got = collections.defaultdict(list)   # (sender, n) -> [(attempt, t)]
        self.ends = []              # (t, why) of sessions that ended unasked
        self.stats = collections.Counter()
        self.client = None
        self.proxy_port = None      # the client's local port, to match proxy conns
        # durable sender: every message with a cid (the others are legacy:
        # no cid, at most once).  Every user is a durable *receiver*: it
        # SYNCs after each login and when a conversation's cseq skips.
        self.durable = idx not in soak.legacy_idx
        self.pos = {}               # conv -> the last cseq held, contiguous
        self.held = collections.defaultdict(set)   # conv -> own cseqs above pos+1
        self.cmid = {}              # (conv, cseq) -> mid seen there
        self.dgot = collections.defaultdict(list)  # (sender, n) -> [(mid, conv, cseq, t)]
        self.heads = {}             # conv -> head, from the last SYNC
        self.need_sync = False

    # receiving
    def take(self, m):
        if not isinstance(m, dict):
            return
        if m.get("msgid") in (6, 10) and "mid" in m:
            self.take_durable(m, live=True)
        elif m.get("msgid") in (6, 10):
            text = m.get("msg")
            if isinstance(text, str) and text.startswith("soak|"):
                parts = text.split("|")
                try:
                    key = (int(parts[1]), int(parts[2]))
                    self.stats["received"] += 1
                    self.got[key].append((int(parts[3]), time.monotonic()))
                except (IndexError, ValueError):
                    self.stats["garbled"] += 1
        elif m.get("msgid") == 12:
            self.stats["notice_%s" % m.get("errno")] += 1

    # durable receiving: one contiguous run of cseqs per conversation
    def take_durable(self, m, live):
        conv, c, mid = m.get("conv"), m.get("cseq"), m.get("mid")
        if not isinstance(conv, str) or not isinstance(c, int) or not isinstance(mid, int):
            self.stats["durable_garbled"] += 1
            return
        pos = self.pos.get(conv, 0)
        if c <= pos or c in self.held[conv]:
            self.stats["durable_dedup"] += 1     # a copy of what we hold
            if self.cmid.get((conv, c), mid) != mid:
                self.stats["durable_mid_mismatch"] += 1
            return
        if c != pos + 1:
            if live:    # a gap in live delivery: SYNC fetches it in order
                self.stats["gap_syncs"] += 1
                self.need_sync = True
                return
            self.stats["durable_sync_gap"] += 1   # SYNC must never skip
        self.pos[conv] = c
        self.cmid[(conv, c)] = mid
        if m.get("id") != self.uid:
            self.record_durable(m, conv, c, mid, live)
        self.advance(conv)

    def record_durable(self, m, conv, c, mid, live):
        text = m.get("msg")
        if not isinstance(text, str) or not text.startswith("soak|"):
            self.stats["durable_garbled"] += 1
            return
        parts = text.split("|")
        try:
            key = (int(parts[1]), int(parts[2]))
        except (IndexError, ValueError):
            self.stats["durable_garbled"] += 1
            return
        self.stats["received_durable"] += 1
        self.stats["received_durable_live" if live else "received_durable_sync"] += 1
        entry = (mid, conv, c, time.monotonic())
        if self.soak.selftest and self.idx == 0:
            if self.stats["received_durable"] == 5:
                return          # the self-test's loss
            if self.stats["received_durable"] == 6:
                self.dgot[key].append(entry)    # the self-test's duplicate
        self.dgot[key].append(entry)

    def advance(self, conv):
        h = self.held[conv]
        pos = self.pos.get(conv, 0)
        while pos + 1 in h:
            pos += 1
        self.pos[conv] = pos
        h.difference_update([x for x in h if x <= pos])

    def own_ack(self, conv, c, mid):
        """Our own message has cseq c there: the position may pass it."""
        self.cmid[(conv, c)] = mid
        if c > self.pos.get(conv, 0):
            self.held[conv].add(c)
            self.advance(conv)

    def sync(self, c):
        """SYNC until more is false (after every login, after a gap)."""
        self.need_sync = False
        deadline = time.monotonic() + 60
        while True:
            req = {"msgid": 15, "id": self.uid,
                   "convs": [{"conv": k, "cseq": v} for k, v in sorted(self.pos.items())]}
            r = c.request(req, timeout=ACK_TIMEOUT)
            e = r.get("errno")
            self.stats["syncs"] += 1
            if e != 0:
                self.stats["sync_errno_%s" % e] += 1
                if e not in (112, 113) or time.monotonic() > deadline:
                    raise TimeoutError("SYNC answered %r" % (r,))
                self.drain_queue(c)
                time.sleep(0.3 + self.rng.random() * 0.3)
                continue
            for m in r.get("msgs") or []:
                self.take_durable(m, live=False)
            self.heads = {h.get("conv"): h.get("head") for h in r.get("convs") or []}
            self.drain_queue(c)
            if not r.get("more"):
                return

    def drain_queue(self, c):
        while c.queue:
            self.take(c.queue.popleft())

    # sessions
    def connect(self):
        while True:
            try:
                c = Client(self.soak.proxy.port, proto=2, timeout=5)
                self.proxy_port = c.sock.getsockname()[1]
                return c
            except OSError:
                time.sleep(0.2 + self.rng.random() * 0.3)

    def login(self, c, use_token):
        if use_token and self.token:
            req = {"msgid": 1, "id": self.uid, "token": self.token}
        else:
            req = {"msgid": 1, "id": self.uid, "password": self.password}
        ack = c.request(req, timeout=ACK_TIMEOUT)
        self.drain_queue(c)
        return ack

    def session(self, deadline=None, use_token=True):
        """A logged-in Client; retries through every fault."""
        delay = 0.2
        while True:
            if deadline and time.monotonic() > deadline:
                raise TimeoutError("%s could not log in" % self.name)
            c = self.connect()
            req_kind = "token" if use_token and self.token else "password"
            try:
                ack = self.login(c, use_token)
                e = ack.get("errno")
                if e == 0:
                    self.token = ack.get("token") or self.token
                    self.stats["logins_token" if "token" in req_kind else "logins"] += 1
                    for m in ack.get("offlinemsg") or []:
                        self.take(json.loads(m) if isinstance(m, str) else m)
                    self.sync(c)
                    return c
                self.stats["login_errno_%s" % e] += 1
                if e == 1 and use_token:
                    use_token = False   # token gone (Redis restarted) or revoked
            except (EOFError, OSError, TimeoutError):
                self.stats["login_broken"] += 1
            c.close()
            time.sleep(delay + self.rng.random() * delay)
            delay = min(delay * 1.5, 2.0)

    # sending
    def new_msg(self):
        n = len(self.sent) + 1
        if self.groups and self.rng.random() < 0.4:
            m = Msg(self.uid, n, "group", self.rng.choice(self.groups), self.durable)
        else:
            m = Msg(self.uid, n, "pair", self.partner.uid, self.durable)
        self.sent.append(m)
        return m

    def send_one(self, c, m):
        """True when the message got an answer (acked or refused), False to
        retry after a reconnect (raises on a dead connection)."""
        m.attempt += 1
        self.stats["sends"] += 1
        text = "soak|%d|%d|%d|%s" % (self.uid, m.n, m.attempt, "x" * self.rng.randint(0, 200))
        if m.kind == "pair":
            req = {"msgid": 6, "id": self.uid, "toid": m.to, "msg": text}
        else:
            req = {"msgid": 10, "id": self.uid, "groupid": m.to, "msg": text}
        if m.durable:   # the same cid on every resend
            req["cid"] = "soak-%d-%d" % (self.uid, m.n)
        ack = c.request(req, timeout=ACK_TIMEOUT)
        e = ack.get("errno")
        m.errnos[e] += 1
        if e == 0:
            m.acked_at = time.monotonic()
            self.stats["acked"] += 1
            if m.durable:
                m.mid, m.conv, m.cseq = ack.get("mid"), ack.get("conv"), ack.get("cseq")
                m.dup_ack = bool(ack.get("dup"))
                self.stats["acked_dup"] += m.dup_ack
                if isinstance(m.cseq, int) and isinstance(m.conv, str):
                    self.own_ack(m.conv, m.cseq, m.mid)
                else:
                    self.soak.problem("%s: durable ACK without conv/cseq: %r" % (self.name, ack))
            self.drain_queue(c)
            return True
        self.drain_queue(c)
        self.stats["errno_%s" % e] += 1
        if e in (113, 125, 112):    # not executed (or partly): send again later
            time.sleep(min(1.0, (ack.get("retry_after_ms") or 200) / 1000.0))
            return False
        self.soak.problem("%s: message %d refused with %r" % (self.name, m.n, ack))
        return True

    def run(self):
        try:
            self.loop()
        except Exception:
            self.soak.problem("user %s crashed:\n%s" % (self.name, traceback.format_exc()))

    def loop(self):
        soak = self.soak
        per_user = soak.rate / soak.n_users
        while not soak.stop_users.is_set():
            c = self.session()
            self.client = c
            planned = False
            next_send = time.monotonic() + self.rng.expovariate(per_user)
            reconnect_at = time.monotonic() + self.rng.uniform(30, 120)
            try:
                while not soak.stop_users.is_set():
                    now = time.monotonic()
                    if now >= reconnect_at and not soak.stop_new.is_set():
                        planned = True     # a logout and a password login
                        c.request({"msgid": 3, "id": self.uid}, timeout=ACK_TIMEOUT)
                        self.drain_queue(c)
                        self.token = None
                        self.stats["logouts"] += 1
                        break
                    if not self.pending and not soak.stop_new.is_set() and now >= next_send:
                        self.pending.append(self.new_msg())
                        next_send = now + self.rng.expovariate(per_user)
                    if self.need_sync:
                        self.sync(c)
                        continue
                    if self.pending:
                        if self.send_one(c, self.pending[0]):
                            self.pending.popleft()
                        continue
                    try:
                        self.take(c.recv(timeout=0.2))
                    except TimeoutError:
                        pass
            except (EOFError, OSError, TimeoutError) as e:
                self.ends.append((time.monotonic(), type(e).__name__))
                self.stats["session_ends"] += 1
            self.client = None
            c.close()
            if planned:
                self.stats["reconnects_planned"] += 1
        self.pending_left = len(self.pending)

    def final_drain(self, quiet=3.0):
        """Log in after the traffic stopped, take the offline messages and
        whatever follows until `quiet` seconds pass without a message."""
        c = self.session(deadline=time.monotonic() + 120, use_token=False)
        try:
            n = -1
            while n != self.stats["received"] + self.stats["received_durable"]:
                n = self.stats["received"] + self.stats["received_durable"]
                deadline = time.monotonic() + quiet
                while time.monotonic() < deadline:
                    try:
                        self.take(c.recv(timeout=max(0.0, deadline - time.monotonic())))
                    except TimeoutError:
                        break
                if self.need_sync:
                    self.sync(c)
            self.sync(c)    # the heads to compare the positions with
            c.request({"msgid": 3, "id": self.uid}, timeout=ACK_TIMEOUT)
            self.drain_queue(c)
        finally:
            c.close()


# --------------------------------------------------------------------------
# the soak

class Soak:
    def __init__(self):
        self.minutes = env_float("SOAK_MINUTES", 30)
        self.duration = self.minutes * 60
        self.rate = env_float("SOAK_RATE", 8)
        self.n_users = max(4, int(env_float("SOAK_USERS", 12)) // 4 * 4)
        self.sample_s = env_float("SOAK_SAMPLE_S", 5)
        self.fault_every = env_float("SOAK_FAULT_EVERY", 20)
        self.seed = int(env_float("SOAK_SEED", int(time.time()) % 100000))
        self.strict = os.environ.get("SOAK_STRICT") == "1"
        # legacy senders (no cid): users 3, 7, 11, ... (a quarter by default)
        n_legacy = int(env_float("SOAK_LEGACY", self.n_users // 4))
        self.legacy_idx = set(list(range(3, self.n_users, 4))[:n_legacy])
        # SOAK_SELFTEST=1: user 0 forgets its 5th message and counts its 6th
        # twice, so the report must show 1 lost and 1 duplicated and fail
        self.selftest = os.environ.get("SOAK_SELFTEST") == "1"
        out = os.environ.get("SOAK_OUT")
        if not out:
            out = os.path.join(harness.CHAT_SRC, "var", "soak",
                               time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        self.out = out
        os.makedirs(out, exist_ok=True)
        self.rng = random.Random(self.seed)
        self.stop_users = threading.Event()
        self.stop_new = threading.Event()
        self.stop_faults = threading.Event()
        self.problems = []
        self.faults = []            # (t, kind, detail)
        self.crashes = []
        self.killing = set()        # node indexes we are killing on purpose
        self.node_series = {}       # node index -> pid of its current series
        self.lock = threading.Lock()
        self.t0 = None

    def problem(self, text):
        with self.lock:
            self.problems.append(text)
        log("PROBLEM: %s", text.splitlines()[0])

    def rel(self, t=None):
        return (t if t is not None else time.monotonic()) - self.t0

    # setup
    def start_stack(self):
        log("starting MariaDB + Redis (private), 3 nodes, nginx, proxy; output %s", self.out)
        self.stack = Stack.private(redis=True, mysql=True)
        db = self.stack.new_database("soak")
        self.plugdir = tempfile.mkdtemp(prefix="chat-soak-plugins-")
        for name in PLUGINS:
            self.install_plugin(name)
        # durable = cid: the SOAK_LEGACY senders (no cid) measure the
        # non-durable, at-most-once path; under the default (all) their
        # messages would be durable, and their resends new messages
        conf = {"server": {"log_level": "info", "log_format": "json"},
                "plugin.login": {"hash_cost": 1},
                "plugin.one2one": {"durable": "cid"}, "plugin.group": {"durable": "cid"}}
        self.nodes = []
        for i in range(3):
            n = Node(self.stack, db=db, node_id="soak-n%d" % (i + 1), migrate=(i == 0),
                     plugins=PLUGINS, plugin_dir=self.plugdir, conf=conf)
            self.nodes.append(n)
            self.node_series[i] = n.pid
        self.nginx = ngx.Nginx(free_port(), [n.port for n in self.nodes])
        self.proxy = FaultProxy(self.nginx.port)

    def install_plugin(self, name):
        tmp = os.path.join(self.plugdir, ".%s.so.tmp" % name)
        shutil.copyfile(os.path.join(harness.PLUGIN_DIR, name + ".so"), tmp)
        os.replace(tmp, os.path.join(self.plugdir, name + ".so"))

    def make_users(self):
        self.users = []
        tag = "%05d" % self.seed
        c = Client(self.proxy.port, proto=2, timeout=10)
        try:
            for i in range(self.n_users):
                name = "soak%s_%d" % (tag, i)
                uid = c.register(name, "pw-" + name)
                self.users.append(User(self, i, uid, name))
        finally:
            c.close()
        for i, u in enumerate(self.users):
            u.partner = self.users[i ^ 1]
        # groups of four (0-3, 4-7, ...) and one of everybody
        groups = [self.users[i:i + 4] for i in range(0, len(self.users), 4)] + [self.users]
        self.group_members = {}
        for k, members in enumerate(groups):
            owner = members[0]
            c = owner.session(deadline=time.monotonic() + 60, use_token=False)
            try:
                ack = c.request({"msgid": 8, "id": owner.uid,
                                 "groupname": "soak%s_g%d" % (tag, k), "groupdesc": "soak"})
                assert ack.get("errno") == 0, ack
                gid = ack["groupid"]
                c.request({"msgid": 3, "id": owner.uid})
            finally:
                c.close()
            for u in members[1:]:
                c = u.session(deadline=time.monotonic() + 60, use_token=False)
                try:
                    ack = c.request({"msgid": 9, "id": u.uid, "groupid": gid})
                    assert ack.get("errno") == 0, ack
                    c.request({"msgid": 3, "id": u.uid})
                finally:
                    c.close()
            for u in members:
                u.groups.append(gid)
            self.group_members[gid] = [u.uid for u in members]
        for u in self.users:
            u.token = None
            u.stats.clear()

    # faults
    def fault(self, kind, detail=""):
        with self.lock:
            self.faults.append((self.rel(), kind, detail))
        log("fault %-14s %s", kind, detail)

    def fault_kill_node(self):
        # n1 is never killed: its one process spans the whole run, the
        # witness of the RSS/fd growth check (the others restart often)
        i = self.rng.randrange(1, 3)
        n = self.nodes[i]
        self.killing.add(i)
        self.fault("kill-node", "n%d pid %d SIGKILL" % (i + 1, n.pid))
        n.kill(signal.SIGKILL)
        n.wait(30)
        self.stop_faults.wait(self.rng.uniform(2, 5))
        self.start_node(i)

    def start_node(self, i):
        n = self.nodes[i]
        for attempt in range(5):
            try:
                STARTER.call(n.start)
                break
            except harness.NodeError as e:
                self.problem("n%d did not start again (attempt %d): %s"
                             % (i + 1, attempt + 1, str(e).splitlines()[0]))
                time.sleep(2)
        self.node_series[i] = n.pid
        self.killing.discard(i)
        self.fault("node-started", "n%d pid %s" % (i + 1, n.pid))

    def fault_redis(self):
        self.fault("redis-restart", "stop")
        self.stack.stop_redis()
        self.stop_faults.wait(self.rng.uniform(1, 3))
        self.stack.start_redis()
        self.fault("redis-up", "")

    def fault_mysql(self):
        self.fault("mysql-restart", "stop")
        self.stack.stop_mysql()
        self.stop_faults.wait(self.rng.uniform(1, 3))
        self.stack.start_mysql()
        self.fault("mysql-up", "")

    def fault_sighup(self):
        names = self.rng.sample(PLUGINS, self.rng.randint(1, len(PLUGINS)))
        for name in names:
            self.install_plugin(name)
        msg_max = self.rng.choice([4096, 4000, 4095])
        for n in self.nodes:
            n.write_conf({"plugin.one2one": {"msg_max": msg_max}})
            n.sighup()
        self.fault("sighup-plugins", "%s replaced, one2one msg_max %d, all nodes"
                   % (",".join(sorted(names)), msg_max))

    def fault_cut(self):
        conns = self.proxy.pick(self.rng, self.rng.randint(1, 4))
        for pc in conns:
            pc.cut = True
        self.fault("cut", "%d connections" % len(conns))
        self.mark_cut(conns)

    def mark_cut(self, conns):
        ports = {pc.port for pc in conns}
        now = time.monotonic()
        for u in self.users:
            if u.client is not None and u.proxy_port in ports:
                u.ends.append((now, "cut"))

    def fault_stall(self):
        conns = self.proxy.pick(self.rng, self.rng.randint(1, 4))
        until = time.monotonic() + STALL_S
        for pc in conns:
            pc.stall_until = until
        self.fault("stall", "%d connections for %d s" % (len(conns), STALL_S))

    def fault_slow(self):
        conns = self.proxy.pick(self.rng, self.rng.randint(1, 6))
        until = time.monotonic() + SLOW_S
        for pc in conns:
            pc.slow_until = until
        self.fault("slow", "%d connections at %d B/s for %d s" % (len(conns), SLOW_BPS, SLOW_S))

    SCHEDULE = ("cut", "kill_node", "stall", "sighup", "redis", "slow", "cut",
                "mysql", "kill_node", "stall", "sighup", "slow")

    def fault_loop(self):
        k = 0
        end = self.t0 + self.duration - 10
        while not self.stop_faults.wait(self.fault_every * self.rng.uniform(0.7, 1.3)):
            if time.monotonic() > end:
                break
            kind = self.SCHEDULE[k % len(self.SCHEDULE)]
            k += 1
            try:
                getattr(self, "fault_" + kind)()
            except Exception:
                self.problem("fault %s failed:\n%s" % (kind, traceback.format_exc()))

    # watching
    def monitor_loop(self):
        while not self.stop_users.is_set():
            for i, n in enumerate(self.nodes):
                if i in self.killing or n.proc is None:
                    continue
                rc = n.proc.poll()
                if rc is not None and i not in self.killing:
                    self.crashes.append("n%d (pid %d) exited with %d at %.0f s"
                                        % (i + 1, n.pid, rc, self.rel()))
                    self.problem(self.crashes[-1])
                    self.killing.add(i)
                    threading.Thread(target=self.start_node, args=(i,), daemon=True).start()
            time.sleep(0.5)

    def sample_loop(self):
        path = os.path.join(self.out, "resources.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t_s", "node", "pid", "rss_kb", "fds", "sessions"])
            while not self.stop_faults.is_set():
                for i, n in enumerate(self.nodes):
                    pid = n.pid
                    if pid is None or i in self.killing:
                        continue
                    row = self.sample(pid, n)
                    if row:
                        w.writerow(["%.1f" % self.rel(), "n%d" % (i + 1), pid] + row)
                f.flush()
                self.stop_faults.wait(self.sample_s)

    @staticmethod
    def sample(pid, node):
        try:
            with open("/proc/%d/status" % pid) as st:
                rss = next(int(l.split()[1]) for l in st if l.startswith("VmRSS:"))
            fds = len(os.listdir("/proc/%d/fd" % pid))
        except (OSError, StopIteration):
            return None
        sessions = ""
        try:
            code, _, body = node.admin("GET", "/sessions?limit=0", timeout=2)
            if code == 200 and isinstance(body, dict):
                sessions = body.get("total", "")
        except Exception:
            pass
        return [rss, fds, sessions]

    # the run
    def run(self):
        self.start_stack()
        self.t0 = time.monotonic()
        self.make_users()
        self.t0 = time.monotonic()
        log("%d users, %.1f msg/s, %.1f min, a fault every ~%.0f s, seed %d",
            self.n_users, self.rate, self.minutes, self.fault_every, self.seed)
        threads = [threading.Thread(target=u.run, daemon=True, name=u.name) for u in self.users]
        for t in threads:
            t.start()
        aux = [threading.Thread(target=f, daemon=True)
               for f in (self.fault_loop, self.monitor_loop, self.sample_loop)]
        for t in aux:
            t.start()
        while self.rel() < self.duration:
            time.sleep(min(10, max(0.1, self.duration - self.rel())))
            acked = sum(u.stats["acked"] for u in self.users)
            log("%4.0f s: %d acknowledged, %d received (%d durable)", self.rel(), acked,
                sum(u.stats["received"] + u.stats["received_durable"] for u in self.users),
                sum(u.stats["received_durable"] for u in self.users))
        self.end_phase(threads, aux)

    def end_phase(self, threads, aux):
        log("stopping faults and new messages")
        self.stop_faults.set()
        self.t_end_traffic = self.rel()
        aux[0].join(120)
        for i, n in enumerate(self.nodes):   # everything up again
            if not n.running() and i not in self.killing:
                self.start_node(i)
        self.stop_new.set()
        try:
            wait_for(lambda: not any(u.pending for u in self.users), timeout=120,
                     interval=0.2, what="the pending messages to be acknowledged")
        except TimeoutError as e:
            self.problem(str(e))
        # no new message now: read until nothing arrives for 3 s, so that no
        # client closes on a delivery still in its socket
        last = -1
        while last != sum(u.stats["received"] + u.stats["received_durable"] for u in self.users):
            last = sum(u.stats["received"] + u.stats["received_durable"] for u in self.users)
            time.sleep(3)
        self.stop_users.set()
        for t in threads:
            t.join(60)
        aux[1].join(10)
        aux[2].join(10)
        time.sleep(2)   # let nodes hand unwritten deliveries to the store
        log("final logins: every user drains its offline messages")
        fin = [threading.Thread(target=self.final_drain_one, args=(u,), daemon=True)
               for u in self.users]
        for t in fin:
            t.start()
        for t in fin:
            t.join(180)
        self.t_end = self.rel()

    def final_drain_one(self, u):
        try:
            u.final_drain()
        except Exception:
            self.problem("final login of %s:\n%s" % (u.name, traceback.format_exc()))

    def shutdown(self):
        if not hasattr(self, "proxy"):
            return      # the stack did not come up: run() raised already
        for i, n in enumerate(self.nodes):
            try:
                rc = n.stop()
                if rc not in (0, None):
                    self.crashes.append("n%d exited with %s on SIGTERM" % (i + 1, rc))
            except harness.SanitizerError as e:
                self.crashes.append("n%d: %s" % (i + 1, str(e)[:2000]))
            except harness.NodeError as e:
                self.crashes.append("n%d: %s" % (i + 1, str(e)[:2000]))
        for i, n in enumerate(self.nodes):
            shutil.copyfile(n.log_path, os.path.join(self.out, "chatd-n%d.log" % (i + 1)))
            text = n.log_text()
            for mark in harness.SANITIZER_MARKS:
                if mark in text and not any(("n%d:" % (i + 1)) in c for c in self.crashes):
                    self.crashes.append("n%d: %r in its log" % (i + 1, mark))
        self.nginx.stop()
        self.proxy.close()
        self.stack.close()
        shutil.rmtree(self.plugdir, ignore_errors=True)


# --------------------------------------------------------------------------
# analysis

def rcpts_of(soak, u, m):
    return [m.to] if m.kind == "pair" else [x for x in soak.group_members[m.to] if x != u.uid]


def analyse_durable(soak):
    """Messages sent with a cid, strictly: every acknowledged one received
    exactly once (after dedup by mid) by every recipient, with the mid of
    its ACK, and every conversation held as one contiguous run up to its
    head.  No loss is "in flight" here: SYNC repairs every cut."""
    by_uid = {u.uid: u for u in soak.users}
    d = collections.Counter()
    lost = []
    for u in soak.users:
        for m in u.sent:
            if not m.durable:
                continue
            d["created"] += 1
            d["attempts"] += m.attempt
            if m.acked_at is None:
                d["not_acked"] += 1
                continue
            d["acked"] += 1
            d["acked_dup"] += m.dup_ack
            for to in rcpts_of(soak, u, m):
                d["expected"] += 1
                got = by_uid[to].dgot.get((u.uid, m.n), [])
                if not got:
                    lost.append((u, m, to))
                    continue
                d["duplicated"] += len(got) - 1
                d["mid_mismatch"] += sum(1 for e in got if e[0] != m.mid)
    for u in soak.users:
        for (sender, n), copies in u.dgot.items():
            d["received_distinct"] += 1
            s = by_uid.get(sender)
            if s is None or n > len(s.sent) or not s.sent[n - 1].durable:
                d["phantom"] += 1
        d["dedup"] += u.stats["durable_dedup"]
        d["by_sync"] += u.stats["received_durable_sync"]
        d["gap_syncs"] += u.stats["gap_syncs"]
        d["syncs"] += u.stats["syncs"]
        d["phantom"] += u.stats["durable_garbled"]
        d["mid_mismatch"] += u.stats["durable_mid_mismatch"]
        d["order"] += u.stats["durable_sync_gap"]
        for conv, head in u.heads.items():     # the final SYNC's heads
            if isinstance(head, int) and u.pos.get(conv, 0) != head:
                d["behind"] += 1
    return d, lost


def analyse_messages(soak):
    """Legacy messages (no cid): at most once, so a loss at a cut or kill
    of the recipient is "in flight", reported apart."""
    by_uid = {u.uid: u for u in soak.users}
    r = collections.Counter()
    lost, inflight = [], []
    for u in soak.users:
        for m in u.sent:
            if m.durable:
                continue
            r["created"] += 1
            r["attempts"] += m.attempt
            if m.acked_at is None:
                r["not_acked"] += 1
                continue
            r["acked"] += 1
            for to in rcpts_of(soak, u, m):
                r["expected"] += 1
                got = by_uid[to].got.get((u.uid, m.n))
                if got:
                    continue
                ends = [t for t, _ in by_uid[to].ends
                        if m.acked_at - INFLIGHT_BEFORE <= t <= m.acked_at + INFLIGHT_AFTER]
                (inflight if ends else lost).append((u, m, to))
    for u in soak.users:
        for (sender, n), copies in u.got.items():
            r["received_copies"] += len(copies)
            r["received_distinct"] += 1
            attempts = collections.Counter(a for a, _ in copies)
            r["duplicated"] += sum(c - 1 for c in attempts.values())
            r["resend_copies"] += len(attempts) - 1
            s = by_uid.get(sender)
            if (s is None or n > len(s.sent) or s.sent[n - 1].durable
                    or max(attempts) > s.sent[n - 1].attempt):
                r["phantom"] += 1
        r["garbled"] += u.stats["garbled"]
    return r, lost, inflight


def load_explanations(path):
    """The error-kind table of docs/reliability.md: [(regex, cause, fault)]."""
    rows = []
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return rows
    sec = text.split("## Error kinds", 1)
    if len(sec) < 2:
        return rows
    for line in sec[1].splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|([^|]*)\|([^|]*)\|", line)
        if m:
            rx = m.group(1).replace("\\|", "|")   # a pipe is escaped in a table
            rows.append((re.compile(rx), m.group(2).strip(), m.group(3).strip()))
        elif line.startswith("## "):
            break
    return rows


NORMALISE = [(re.compile(r"\b[0-9a-f]{16,}\b"), "H"),
             (re.compile(r"\b\d+\.\d+\.\d+\.\d+(:\d+)?"), "ADDR"),
             (re.compile(r"\d+"), "N")]


def error_kinds(texts):
    """Count the error/warn lines of the node logs (a list of their texts)
    by kind; also the first line of each kind."""
    kinds = collections.Counter()
    first = {}
    for i, text in enumerate(texts):
        for line in text.splitlines():
            if '"level":"error"' not in line and '"level":"warn"' not in line:
                if line.startswith("{") or not line.strip():
                    continue
                # not ours (a sanitizer, libc): a kind of its own
                kind = "stderr: " + line.strip()[:100]
            else:
                try:
                    o = json.loads(line)
                except ValueError:
                    continue
                msg = o.get("msg", "")
                for rx, rep in NORMALISE:
                    msg = rx.sub(rep, msg)
                kind = "%s %s: %s" % (o.get("level"), o.get("who"), msg[:160])
            kinds[kind] += 1
            first.setdefault(kind, "n%d: %s" % (i + 1, line[:300]))
    return kinds, first


def growth(soak):
    """Per node and pid: first/last RSS and fds-minus-sessions, and the
    growth over the last two thirds of the run (of the series)."""
    rows = collections.defaultdict(list)
    path = os.path.join(soak.out, "resources.csv")
    with open(path) as f:
        for row in csv.DictReader(f):
            rows[(row["node"], row["pid"])].append(row)
    out = []
    cut = soak.t_end_traffic / 3
    for (node, pid), rs in sorted(rows.items(), key=lambda kv: float(kv[1][0]["t_s"])):
        t = [float(r["t_s"]) for r in rs]
        rss = [int(r["rss_kb"]) for r in rs]
        fds = [int(r["fds"]) for r in rs]
        other = [int(r["fds"]) - int(r["sessions"]) if r["sessions"] != "" else None for r in rs]
        win = [k for k in range(len(rs)) if t[k] >= max(cut, t[0] + (t[-1] - t[0]) / 3)]
        verdict, g_rss, g_fd = "short", None, None
        if win and t[win[-1]] - t[win[0]] >= MIN_SERIES_S:
            q = max(1, len(win) // 10)
            head, tail = win[:q], win[-q:]
            a = sum(rss[k] for k in head) / q
            b = sum(rss[k] for k in tail) / q
            g_rss = (b - a) / a
            oh = [other[k] for k in head if other[k] is not None]
            ot = [other[k] for k in tail if other[k] is not None]
            fd_up = 0.0
            if oh and ot:
                a_fd = sum(oh) / len(oh)
                fd_up = sum(ot) / len(ot) - a_fd
                g_fd = fd_up / max(1.0, a_fd)
            # a node holds ~20 descriptors besides its sessions: 5 % of that
            # is one, so a descriptor more or less (an unauthenticated
            # connection, a pool reconnect) is within FD_SLACK
            fd_ok = g_fd is None or g_fd <= GROWTH_LIMIT or fd_up <= FD_SLACK
            verdict = "ok" if g_rss <= GROWTH_LIMIT and fd_ok else "GROWTH"
        out.append(dict(node=node, pid=pid, t0=t[0], t1=t[-1], rss0=rss[0], rss1=rss[-1],
                        fds0=fds[0], fds1=fds[-1], g_rss=g_rss, g_fd=g_fd, verdict=verdict))
    return out


EXPLANATIONS = os.path.join(harness.CHAT_SRC, "docs", "reliability.md")


def kinds_table(L, kinds, first):
    """Append the error-kind table to the lines L; the unexplained kinds."""
    expl = load_explanations(EXPLANATIONS)
    unexplained = []
    L.append("| count | kind | explanation (docs/reliability.md) |")
    L.append("|---|---|---|")
    for kind, count in kinds.most_common():
        why = next(("%s (%s)" % (c, f) for rx, c, f in expl if rx.search(kind)), None)
        if why is None:
            unexplained.append(kind)
            why = "**UNEXPLAINED** — e.g. `%s`" % first[kind].replace("|", "\\|")[:240]
        L.append("| %d | `%s` | %s |" % (count, kind.replace("|", "\\|"), why))
    L.append("")
    return unexplained


def recheck_errors(out):
    """soak.py --errors DIR: the error kinds of a finished run's logs
    (DIR/chatd-n*.log) against today's table; 1 if any is unexplained."""
    texts = []
    for i in range(1, 4):
        with open(os.path.join(out, "chatd-n%d.log" % i), encoding="utf-8",
                  errors="replace") as f:
            texts.append(f.read())
    kinds, first = error_kinds(texts)
    L = []
    unexplained = kinds_table(L, kinds, first)
    print("\n".join(L))
    print("%d kinds, %d unexplained" % (len(kinds), len(unexplained)))
    return 1 if unexplained else 0


def pct(x):
    return "—" if x is None else "%+.1f%%" % (100 * x)


def lost_lines(soak, what, items):
    L = []
    if items:
        L.append("")
        L.append("%s (first 20):" % what)
        for u, m, to in items[:20]:
            L.append("- %s #%d (%s to %s%s) acked at %.1f s after %d attempt(s); recipient's "
                     "session ends: %s" % (u.name, m.n, m.kind, to,
                                           ", mid %s %s cseq %s" % (m.mid, m.conv, m.cseq)
                                           if m.durable else "",
                                           soak.rel(m.acked_at), m.attempt, ", ".join(
                                               "%.1f s %s" % (soak.rel(t), w)
                                               for t, w in soak.users[[x.uid for x in soak.users].index(to)].ends
                                               if abs(t - m.acked_at) < 30) or "none near"))
    return L


def report(soak):
    d, dlost = analyse_durable(soak)
    r, lost, inflight = analyse_messages(soak)
    kinds, first = error_kinds([n.log_text() for n in soak.nodes])
    res = growth(soak)
    stats = collections.Counter()
    for u in soak.users:
        stats.update(u.stats)
    unexplained = []
    L = []
    L.append("# Soak report %s" % os.path.basename(soak.out.rstrip("/")))
    L.append("")
    L.append("- chatd: `%s` (plugins `%s`)" % (harness.CHATD, harness.PLUGIN_DIR))
    L.append("- %.1f min of traffic (%.0f s with the final logins), %d users "
             "(pairs, groups of 4, one group of all), %.1f msg/s offered, "
             "a fault every ~%.0f s, seed %d"
             % (soak.t_end_traffic / 60, soak.t_end, soak.n_users, soak.rate,
                soak.fault_every, soak.seed))
    L.append("")
    L.append("## Durable messages (with cid; strict)")
    L.append("")
    L.append("%d of %d users send with a `cid`; every user SYNCs after each login and "
             "at a gap, and dedups by mid." % (soak.n_users - len(soak.legacy_idx), soak.n_users))
    L.append("")
    L.append("| | count |")
    L.append("|---|---|")
    rows = [("messages created", d["created"]), ("sends (with resends, same cid)", d["attempts"]),
            ("acknowledged (errno 0, after COMMIT)", d["acked"]),
            ("of which answered `dup` (an earlier send was stored)", d["acked_dup"]),
            ("never acknowledged (given up at the end)", d["not_acked"]),
            ("deliveries owed (acked x recipients)", d["expected"]),
            ("distinct (message, recipient) received", d["received_distinct"]),
            ("of which fetched by SYNC (missed live: offline, cut, killed node, gap)", d["by_sync"]),
            ("copies dropped by dedup (mid already held)", d["dedup"]),
            ("SYNCs (after logins and %d live gaps)" % d["gap_syncs"], d["syncs"]),
            ("**lost**", len(dlost)),
            ("**duplicated** (one message held twice by a recipient)", d["duplicated"]),
            ("**out of order** (SYNC skipped a cseq)", d["order"]),
            ("**behind** (conversation short of its head at the end)", d["behind"]),
            ("**mid mismatch** (a message's mid differs from its ACK's)", d["mid_mismatch"]),
            ("phantom or garbled", d["phantom"])]
    L += ["| %s | %d |" % row for row in rows]
    L += lost_lines(soak, "Durable lost", dlost)
    L.append("")
    L.append("## Legacy messages (no cid; at most once)")
    L.append("")
    L.append("| | count |")
    L.append("|---|---|")
    rows = [("messages created", r["created"]), ("sends (with resends)", r["attempts"]),
            ("acknowledged (errno 0)", r["acked"]),
            ("never acknowledged (given up at the end)", r["not_acked"]),
            ("deliveries owed (acked x recipients)", r["expected"]),
            ("copies received", r["received_copies"]),
            ("distinct (message, recipient) received", r["received_distinct"]),
            ("copies from a resend (first ACK lost)", r["resend_copies"]),
            ("**lost, unexplained**", len(lost)),
            ("lost in flight at a cut/kill of the recipient (at most once without cid)", len(inflight)),
            ("**duplicated** (same message and attempt twice)", r["duplicated"]),
            ("phantom or garbled", r["phantom"] + r["garbled"])]
    L += ["| %s | %d |" % row for row in rows]
    L.append("")
    errs = sorted((k, v) for k, v in stats.items() if k.startswith(("errno_", "login_errno_", "notice_", "sync_errno_")))
    L.append("Sessions: %d logins, %d ended by a fault, %d planned logouts; "
             "answers other than 0: %s."
             % (stats["logins"] + stats["logins_token"], stats["session_ends"],
                stats["logouts"], ", ".join("%s ×%d" % kv for kv in errs) or "none"))
    for what, items in (("Legacy lost, unexplained", lost), ("Legacy lost in flight", inflight)):
        L += lost_lines(soak, what, items)
    L.append("")
    L.append("## Faults injected")
    L.append("")
    L.append("| t (s) | fault | detail |")
    L.append("|---|---|---|")
    L += ["| %.1f | %s | %s |" % f for f in soak.faults]
    L.append("")
    L.append("Counts: %s." % ", ".join("%s ×%d" % kv for kv in
                                       sorted(collections.Counter(k for _, k, _ in soak.faults).items())))
    L.append("")
    L.append("## RSS and open fds per node")
    L.append("")
    L.append("A series is one process (a restarted node starts a new one).  Growth compares "
             "the first and last tenth of the series' samples within the last two thirds of "
             "the run (and of the series); fds are counted without the sessions (the "
             "admin listener's count), which move between nodes with every fault, and "
             "growth by up to %d of them is noise.  Series "
             "shorter than %d s are not judged.  Samples: resources.csv." % (FD_SLACK, MIN_SERIES_S))
    L.append("")
    L.append("| node | pid | from–to (s) | RSS start→end (kB) | RSS growth | fds start→end | fds-sessions growth | verdict |")
    L.append("|---|---|---|---|---|---|---|---|")
    for g in res:
        L.append("| %s | %s | %.0f–%.0f | %d→%d | %s | %d→%d | %s | %s |"
                 % (g["node"], g["pid"], g["t0"], g["t1"], g["rss0"], g["rss1"], pct(g["g_rss"]),
                    g["fds0"], g["fds1"], pct(g["g_fd"]), g["verdict"]))
    L.append("")
    L.append("## Errors and warnings logged by chatd, by kind")
    L.append("")
    unexplained = kinds_table(L, kinds, first)
    fails = []
    for key, what in (("duplicated", "durable messages duplicated"),
                      ("order", "durable messages out of order"),
                      ("behind", "conversations behind their head"),
                      ("mid_mismatch", "durable mid mismatches"),
                      ("phantom", "durable phantom/garbled messages")):
        if d[key]:
            fails.append("%d %s" % (d[key], what))
    if dlost:
        fails.insert(0, "%d acknowledged durable messages lost" % len(dlost))
    if lost:
        fails.append("%d acknowledged legacy messages lost (unexplained)" % len(lost))
    if soak.strict and inflight:
        fails.append("%d legacy lost in flight (SOAK_STRICT)" % len(inflight))
    if r["duplicated"]:
        fails.append("%d legacy duplicated" % r["duplicated"])
    if r["phantom"] + r["garbled"]:
        fails.append("%d legacy phantom/garbled messages" % (r["phantom"] + r["garbled"]))
    if soak.crashes:
        fails.append("crashes: " + "; ".join(c.splitlines()[0] for c in soak.crashes))
    if unexplained:
        fails.append("%d unexplained error kinds" % len(unexplained))
    if not d["acked"] or (soak.legacy_idx and not r["acked"]):
        fails.append("no durable or no legacy message was acknowledged")
    broken = [p for p in soak.problems if p.startswith(("user ", "final login", "fault ", "shutdown"))]
    if broken:  # the soak itself went wrong: its counts cannot be trusted
        fails.append("%d soak problems (%s)" % (len(broken), broken[0].splitlines()[0]))
    growth_flags = [g for g in res if g["verdict"] == "GROWTH"]
    L.append("## Verdict")
    L.append("")
    L.append("**%s**" % ("FAIL: " + "; ".join(fails) if fails else "PASS"))
    if growth_flags:
        L.append("")
        L.append("Growth over 5%% (reported, not a failure): %s"
                 % ", ".join("%s pid %s" % (g["node"], g["pid"]) for g in growth_flags))
    if soak.problems:
        L.append("")
        L.append("Problems noted during the run:")
        L += ["- " + p.splitlines()[0] for p in soak.problems[:30]]
    if soak.crashes:
        L.append("")
        L.append("Crashes:")
        L += ["```", *[c for c in soak.crashes], "```"]
    text = "\n".join(L) + "\n"
    with open(os.path.join(soak.out, "report.md"), "w") as f:
        f.write(text)
    if soak.selftest:   # the checker must have seen exactly what was planted
        # user 0 is a durable receiver: 1 durable lost, 1 durable duplicated,
        # nothing else wrong (legacy in-flight losses may happen)
        planted = (len(dlost) == 1 and d["duplicated"] == 1 and fails and not lost
                   and not r["duplicated"] and not soak.crashes and not unexplained
                   and d["acked"])
        text += "\nSelf-test: the planted loss and duplicate were %s.\n" % (
            "found" if planted else "NOT found as planted")
        return text, planted
    return text, not fails


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--errors":
        return recheck_errors(sys.argv[2])
    if ngx.NGINX is None:
        print("soak: %s" % ngx.LOAD_MODULE)
        return 77 if os.environ.get("SOAK_SKIP_OK") else 1
    soak = Soak()
    try:
        soak.run()
    finally:
        soak.stop_faults.set()
        soak.stop_users.set()
        try:
            soak.shutdown()
        except Exception:
            soak.problem("shutdown:\n%s" % traceback.format_exc())
    text, ok = report(soak)
    print(text)
    print("soak: report in %s" % os.path.join(soak.out, "report.md"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
