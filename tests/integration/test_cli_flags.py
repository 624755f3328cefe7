"""chatd's command line: -V, -t (config check with "file:line: reason"
diagnostics), -l (listen override), and the shipped etc/chat.conf passing -t.

Configs here use only the echo test plugin and no [mysql]/[redis], so no
servers are needed.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import unittest

from harness import (CHAT_SRC, CHATD, PLUGIN_DIR, TEST_PLUGIN_DIR, Client, Node,
                     free_port)

ECHO_DIR = os.path.join(TEST_PLUGIN_DIR, "v1")


def good_lines(port):
    return ["; a config chatd -t must accept",
            "[server]",
            "listen = 127.0.0.1:%d" % port,
            "log_level = info",
            "max_connections = 100",
            "max_frame = 65536",
            "",
            "[plugins]",
            "dir = %s" % ECHO_DIR,
            "enabled = echo",
            ""]


class ConfCase(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="chat-cli-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, name, lines):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def check(self, path):
        p = subprocess.run([CHATD, "-t", "-c", path], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=60)
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")

    def assert_error_at(self, lines, marker, name="bad.conf", also=()):
        """chatd -t on lines fails and names the line holding marker (or one of
        the lines holding the `also` markers)."""
        path = self.write(name, lines)
        want = [i + 1 for i, line in enumerate(lines)
                if line == marker or line in also]
        rc, out, err = self.check(path)
        self.assertNotEqual(rc, 0, "chatd -t accepted:\n" + "\n".join(lines))
        found = re.findall(re.escape(path) + r":(\d+): \S", err)
        self.assertTrue(found, "no '%s:LINE: reason' on stderr:\n%s%s" % (path, out, err))
        self.assertIn(int(found[0]), want, "wrong line in:\n" + err)
        return err


class Version(unittest.TestCase):
    def test_version(self):
        with open(os.path.join(CHAT_SRC, "CMakeLists.txt")) as f:
            version = re.search(r"project\(chatd\s+VERSION\s+([0-9.]+)", f.read()).group(1)
        p = subprocess.run([CHATD, "-V"], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn(version, (p.stdout + p.stderr).decode())


class CheckConfig(ConfCase):
    def test_good_config(self):
        path = self.write("good.conf", good_lines(free_port()))
        rc, out, err = self.check(path)
        self.assertEqual(rc, 0, out + err)

    def test_unknown_key_in_server(self):
        lines = good_lines(free_port())
        lines.insert(4, "no_such_key = 1")
        self.assert_error_at(lines, "no_such_key = 1")

    def test_bad_number(self):
        lines = good_lines(free_port())
        lines[lines.index("max_connections = 100")] = "max_connections = lots"
        self.assert_error_at(lines, "max_connections = lots")

    def test_bad_number_trailing_garbage(self):
        lines = good_lines(free_port())
        lines[lines.index("max_frame = 65536")] = "max_frame = 64k"
        self.assert_error_at(lines, "max_frame = 64k")

    def test_unknown_section(self):
        lines = good_lines(free_port()) + ["[no_such_section]", "key = 1"]
        self.assert_error_at(lines, "[no_such_section]", also=("key = 1",))

    def test_missing_plugin(self):
        lines = good_lines(free_port())
        lines[lines.index("enabled = echo")] = "enabled = echo, no_such_plugin"
        err = self.assert_error_at(lines, "enabled = echo, no_such_plugin")
        self.assertIn("no_such_plugin", err)

    def test_bad_listen(self):
        for bad in ("127.0.0.1:99999", "300.1.2.3:5000", "127.0.0.1", "nonsense"):
            with self.subTest(listen=bad):
                lines = good_lines(0)
                lines[2] = "listen = " + bad
                self.assert_error_at(lines, lines[2])

    def test_missing_file(self):
        rc, out, err = self.check(os.path.join(self.dir, "absent.conf"))
        self.assertNotEqual(rc, 0)
        self.assertIn("absent.conf", out + err)

    def test_shipped_config(self):
        """etc/chat.conf, pointed at this build's plugins, passes -t."""
        plugins = ("login", "friend", "one2one", "group", "offline")
        missing = [p for p in plugins
                   if not os.path.exists(os.path.join(PLUGIN_DIR, p + ".so"))]
        if missing:
            self.skipTest("business plugins not built: %s" % ", ".join(missing))
        with open(os.path.join(CHAT_SRC, "etc", "chat.conf")) as f:
            text = f.read()
        text, n1 = re.subn(r"(?m)^dir\s*=.*$", "dir = " + PLUGIN_DIR, text)
        text, n2 = re.subn(r"(?m)^migrations\s*=.*$",
                           "migrations = " + os.path.join(CHAT_SRC, "sql"), text)
        self.assertEqual((n1, n2), (1, 1))
        path = self.write("chat.conf", text.splitlines())
        rc, out, err = self.check(path)
        self.assertEqual(rc, 0, out + err)


class ListenOverride(unittest.TestCase):
    def test_dash_l(self):
        port = free_port()
        node = Node(None, plugins=("echo",), plugin_dir=ECHO_DIR, mysql=False,
                    redis=False, args=["-l", "127.0.0.1:%d" % port])
        try:
            self.assertIn("listening on 127.0.0.1:%d" % port, node.log_text())
            with Client(port) as c:
                c.send({"msgid": 1000, "n": 1})
                reply = c.recv()
                self.assertEqual((reply.get("msgid"), reply.get("n")), (1001, 1), reply)
            with self.assertRaises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", node.port), timeout=2).close()
        finally:
            rc = node.stop()
        self.assertEqual(rc, 0, node.log_tail())

    def test_sigterm_exit_code(self):
        node = Node(None, plugins=("echo",), plugin_dir=ECHO_DIR, mysql=False, redis=False)
        node.kill(signal.SIGTERM)
        self.assertEqual(node.wait(30), 0, node.log_tail())


if __name__ == "__main__":
    unittest.main()
