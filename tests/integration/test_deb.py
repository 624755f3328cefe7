"""`make deb`: the package builds (in <build>/deb, prefix /usr), holds what
an installed chatd needs with /etc/chatd/chat.conf as its conffile, passes
lintian without errors, and the chatd unpacked from it (dpkg-deb -x into a
scratch root) checks its own production config, and serves a login against
the test MariaDB and Redis with the plugins and migrations from that root."""
import glob
import os
import shutil
import subprocess
import tempfile
import unittest

import harness
from harness import CHATD, CHAT_SRC, Client, Node, Stack

EXPECTED = [
    "./usr/bin/chatd", "./usr/bin/chat-cli", "./etc/chatd/chat.conf",
    "./lib/systemd/system/chatd.service", "./usr/lib/sysusers.d/chatd.conf",
    "./usr/include/chat/plugin.h", "./usr/share/chatd/sql/001_init.sql",
    "./usr/share/doc/chatd/copyright", "./usr/share/doc/chatd/changelog.gz",
    "./usr/share/doc/chatd/operations.md.gz", "./usr/share/man/man8/chatd.8.gz",
]
PLUGINS = ("login", "friend", "one2one", "group", "offline", "store", "typing")


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


class DebTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        build = os.path.dirname(os.path.abspath(CHATD))
        cls.debdir = os.path.join(build, "deb")
        for old in glob.glob(os.path.join(cls.debdir, "package", "*.deb")):
            os.unlink(old)
        p = run(["make", "-C", CHAT_SRC, "deb", "BUILD=" + build, "JOBS=2"])
        if p.returncode != 0:
            raise AssertionError("make deb failed\n%s\n%s" % (p.stdout[-4000:],
                                                              p.stderr[-4000:]))
        debs = glob.glob(os.path.join(cls.debdir, "package", "chatd_*.deb"))
        assert len(debs) == 1, debs
        cls.deb = debs[0]
        cls.root = tempfile.mkdtemp(prefix="chatd-deb-root-")
        subprocess.run(["dpkg-deb", "-x", cls.deb, cls.root], check=True)
        cls.chatd = os.path.join(cls.root, "usr", "bin", "chatd")
        plugins = glob.glob(os.path.join(cls.root, "usr", "lib", "*", "chatd",
                                         "plugins"))
        assert len(plugins) == 1, plugins
        cls.plugin_dir = plugins[0]

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)

    def test_contents_and_conffile(self):
        listing = run(["dpkg-deb", "-c", self.deb]).stdout
        paths = {line.split()[-1] for line in listing.splitlines()}
        for f in EXPECTED:
            self.assertIn(f, paths)
        for name in PLUGINS:
            self.assertTrue(os.path.exists(os.path.join(self.plugin_dir, name + ".so")))
        pcs = glob.glob(os.path.join(self.root, "usr", "lib", "*", "pkgconfig",
                                     "chatd-plugin.pc"))
        self.assertEqual(len(pcs), 1)
        conffiles = run(["dpkg-deb", "-I", self.deb, "conffiles"]).stdout.split()
        self.assertEqual(conffiles, ["/etc/chatd/chat.conf"])
        control = run(["dpkg-deb", "-f", self.deb]).stdout
        self.assertIn("Package: chatd", control)
        self.assertIn("libsystemd0", control)  # dpkg-shlibdeps ran
        # the binary looks for /etc/chatd/chat.conf by default
        p = run([self.chatd, "-t"])
        self.assertIn("/etc/chatd/chat.conf", p.stdout + p.stderr)
        self.assertIn("chatd 0.1.0", run([self.chatd, "-V"]).stdout)

    def rooted_conf(self):
        """The packaged chat.conf with its absolute paths moved into root."""
        with open(os.path.join(self.root, "etc", "chatd", "chat.conf")) as f:
            text = f.read()
        self.assertIn("policy = mutual", text)
        self.assertIn("listen = 127.0.0.1:", text)
        for key in ("dir = /usr/lib/", "migrations = /usr/share/chatd/sql"):
            self.assertIn(key, text)
        text = text.replace("= /usr/", "= %s/usr/" % self.root)
        path = os.path.join(self.root, "etc", "chatd", "rooted.conf")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_packaged_config_checks(self):
        p = run([self.chatd, "-t", "-c", self.rooted_conf()])
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("ok (7 plugins)", p.stdout)

    def test_packaged_unit_verifies(self):
        unit = os.path.join(self.root, "lib", "systemd", "system", "chatd.service")
        with open(unit) as f:
            text = f.read()
        self.assertIn("ExecStart=/usr/bin/chatd -c /etc/chatd/chat.conf", text)
        copy = os.path.join(self.root, "chatd.service")
        with open(copy, "w") as f:
            f.write(text.replace("/usr/bin/chatd", self.chatd))
        p = run(["systemd-analyze", "verify", copy], cwd=self.root)
        self.assertEqual((p.returncode, p.stderr.strip()), (0, ""), p.stdout)

    def test_unpacked_chatd_serves_a_login(self):
        saved = harness.CHATD
        harness.CHATD = self.chatd  # Node runs (and migrates with) this binary
        try:
            node = Node(Stack(), plugin_dir=self.plugin_dir, conf={"mysql": {
                "migrations": os.path.join(self.root, "usr", "share", "chatd", "sql")}})
        finally:
            harness.CHATD = saved
        with node:
            with Client(node.port) as c:
                uid = c.register("packaged", "pw")
                r = c.login(uid, "pw")
                self.assertEqual(r.get("errno"), 0, r)
            # the packaged binary, with the packaged plugins (chatd loads
            # private copies of them, so /proc/PID/maps does not name them)
            self.assertEqual(os.readlink("/proc/%d/exe" % node.pid), self.chatd)
            self.assertEqual(node.conf["plugins"]["dir"], self.plugin_dir)
        self.assertEqual(node.proc.returncode, 0)

    def test_lintian_reports_no_errors(self):
        p = run(["lintian", "--fail-on", "error", self.deb])
        errors = [line for line in p.stdout.splitlines() if line.startswith("E:")]
        self.assertEqual(errors, [], p.stdout)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)


if __name__ == "__main__":
    unittest.main()
