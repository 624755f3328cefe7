"""systemd: contrib/systemd/chatd.service passes `systemd-analyze verify`
(pointed at the built chatd), and chatd speaks sd_notify to a NOTIFY_SOCKET
that this test binds: READY=1 once listening, RELOADING=1 then READY=1 with
the reload's result in STATUS= around SIGHUP (a bad file too) and around
POST /reload on the admin listener, WATCHDOG=1
pings when WATCHDOG_USEC is set, and STOPPING=1 at SIGTERM."""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

from harness import CHATD, CHAT_SRC, Client, Node, Stack, admin_request, wait_for

UNIT = os.path.join(CHAT_SRC, "contrib", "systemd", "chatd.service")


class UnitFileTest(unittest.TestCase):
    def test_systemd_analyze_verify(self):
        d = tempfile.mkdtemp(prefix="chatd-unit-")
        self.addCleanup(shutil.rmtree, d, True)
        with open(UNIT) as f:
            text = f.read()
        self.assertIn("Type=notify", text)
        self.assertIn("ExecReload=/bin/kill -HUP $MAINPID", text)
        for key in ("ProtectSystem=strict", "PrivateTmp=yes", "NoNewPrivileges=yes",
                    "CapabilityBoundingSet=\n", "AmbientCapabilities=\n",
                    "LimitNOFILE=65536", "User=chatd", "WatchdogSec="):
            self.assertIn(key, text)
        # verify wants the binaries to exist: the built chatd stands in
        copy = os.path.join(d, "chatd.service")
        with open(copy, "w") as f:
            f.write(text.replace("/usr/bin/chatd", os.path.abspath(CHATD)))
        p = subprocess.run(["systemd-analyze", "verify", copy], capture_output=True,
                           text=True, timeout=60, cwd=d)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        # warnings (an unknown key, a bad value) do not change the status
        self.assertEqual(p.stderr.strip(), "", "systemd-analyze warned")


class Notifications:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, test):
        self.dir = tempfile.mkdtemp(prefix="chatd-notify-")
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        test.addCleanup(self.sock.close)
        self.sock.bind(self.path)
        self.got = []  # one dict per datagram

    def _read(self, timeout):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return False
        msg = {}
        for line in data.decode().split("\n"):
            k, _, v = line.partition("=")
            if k:
                msg[k] = v
        self.got.append(msg)
        return True

    def wait(self, key, value=None, timeout=20, since=0):
        """The first message from index since on with key (= value): its index."""
        deadline = time.monotonic() + timeout
        i = since
        while True:
            while i < len(self.got):
                m = self.got[i]
                if key in m and (value is None or m[key] == value):
                    return i
                i += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no %s=%s in %r" % (key, value, self.got))
            self._read(left)


class NotifyTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()

    def start(self, env):
        """chatd on a harness-written config, with env added; harness Node
        provides the config and database, then is stopped."""
        node = Node(self.stack)
        node.stop()
        self.node = node
        e = dict(os.environ, **env)
        log = open(os.path.join(node.dir, "notify.log"), "wb")
        self.addCleanup(log.close)
        p = subprocess.Popen([CHATD, "-c", node.conf_path], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=subprocess.STDOUT, env=e)

        def reap():
            if p.poll() is None:
                p.kill()
                p.wait()
        self.addCleanup(reap)
        return p

    def test_ready_reload_stopping(self):
        n = Notifications(self)
        p = self.start({"NOTIFY_SOCKET": n.path})
        i = n.wait("READY", "1")
        self.assertRegex(n.got[i].get("STATUS", ""), r"^listening on 127\.0\.0\.1:\d+$")
        with Client(self.node.port) as c:  # it does listen
            c.register("notified", "pw")

        p.send_signal(signal.SIGHUP)
        r = n.wait("RELOADING", "1", since=i + 1)
        self.assertIn("MONOTONIC_USEC", n.got[r])
        j = n.wait("READY", "1", since=r + 1)
        self.assertEqual(n.got[j]["STATUS"], "reloaded: 5 plugins")

        # a file that does not parse: READY again, the failure in STATUS
        with open(self.node.conf_path, "a") as f:
            f.write("\n[server]\nno_such_key = 1\n")
        p.send_signal(signal.SIGHUP)
        r = n.wait("RELOADING", "1", since=j + 1)
        j = n.wait("READY", "1", since=r + 1)
        self.assertRegex(n.got[j]["STATUS"],
                         r"^reload failed: .*unknown key \"no_such_key\".*nothing changed$")

        p.send_signal(signal.SIGTERM)
        n.wait("STOPPING", "1", since=j + 1)
        self.assertEqual(p.wait(30), 0)
        self.assertNotIn("WATCHDOG", [k for m in n.got for k in m], "no watchdog asked")

    def test_admin_reload_notifies_like_sighup(self):
        n = Notifications(self)
        p = self.start({"NOTIFY_SOCKET": n.path})
        i = n.wait("READY", "1")
        status, _, body = admin_request(self.node.admin_port, "POST", "/reload")
        self.assertEqual((status, body.get("ok")), (200, True), body)
        r = n.wait("RELOADING", "1", since=i + 1)
        j = n.wait("READY", "1", since=r + 1)
        self.assertEqual(n.got[j]["STATUS"], "reloaded: 5 plugins")
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(30), 0)

    def test_watchdog_pings(self):
        n = Notifications(self)
        p = self.start({"NOTIFY_SOCKET": n.path, "WATCHDOG_USEC": "200000"})
        i = n.wait("READY", "1")
        first = n.wait("WATCHDOG", "1", since=i)
        t0 = time.monotonic()
        n.wait("WATCHDOG", "1", since=first + 1, timeout=5)
        n.wait("WATCHDOG", "1", since=first + 2, timeout=5)
        # at half the interval: two more within about 200 ms, not 2 s
        self.assertLess(time.monotonic() - t0, 2.0)
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(30), 0)

    def test_watchdog_for_another_pid_is_ignored(self):
        """WATCHDOG_PID naming another process: the pings are not ours."""
        n = Notifications(self)
        p = self.start({"NOTIFY_SOCKET": n.path, "WATCHDOG_USEC": "200000",
                        "WATCHDOG_PID": "1"})
        i = n.wait("READY", "1")
        with self.assertRaises(TimeoutError):
            n.wait("WATCHDOG", "1", since=i, timeout=0.6)
        p.send_signal(signal.SIGTERM)
        self.assertEqual(p.wait(30), 0)

    def test_workers_supervisor_notifies(self):
        n = Notifications(self)
        node = Node(self.stack)
        node.stop()
        self.node = node
        e = dict(os.environ, NOTIFY_SOCKET=n.path)
        p = subprocess.Popen([CHATD, "-c", node.conf_path, "-w", "2"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=e)
        self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait()))
        i = n.wait("READY", "1")
        self.assertRegex(n.got[i]["STATUS"], r"^2 workers on 127\.0\.0\.1:\d+$")
        wait_for(lambda: _connects(node.port), what="a worker listening")
        p.send_signal(signal.SIGTERM)
        n.wait("STOPPING", "1", since=i + 1)
        self.assertEqual(p.wait(30), 0)
        # only the supervisor spoke: one READY in all
        self.assertEqual(sum(1 for m in n.got if m.get("READY") == "1"), 1)


def _connects(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    unittest.main()
