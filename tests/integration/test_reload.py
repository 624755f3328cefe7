"""Plugin loading and hot reload, against the real chatd with fixture plugins.

The fixture plugin "echo" (tests/plugins/echo.c) exists as good versions v1
and v2 and as broken variants; every answer says which version produced it.
Each test runs a node whose plugin folder is a private copy, replaces
echo.so there the way a deployment would (write a new file, rename it over
the old one) and sends SIGHUP.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import unittest

from harness import CHATD, Client, Node, Stack, plugin_path, wait_for


def install(plugdir, variant, name="echo"):
    """Put variant's NAME.so into plugdir atomically (new inode)."""
    tmp = os.path.join(plugdir, ".%s.so.tmp" % name)
    shutil.copyfile(plugin_path(name, variant), tmp)
    os.replace(tmp, os.path.join(plugdir, name + ".so"))


def echo(c, n):
    c.send({"msgid": 1000, "n": n})
    r = c.recv()
    assert r["msgid"] == 1001 and r["n"] == n, r
    return r


class ReloadTest(unittest.TestCase):
    def setUp(self):
        self.plugdir = tempfile.mkdtemp(prefix="chatd-plugins-")
        install(self.plugdir, "v1")
        self.node = Node(None, plugins=("echo",), plugin_dir=self.plugdir,
                         redis=False, mysql=False,
                         conf={"plugin.echo": {"greeting": "hello"}})

    def tearDown(self):
        self.assertEqual(self.node.stop(), 0)
        shutil.rmtree(self.plugdir, ignore_errors=True)

    def reload(self, what):
        mark = self.node.log_mark()
        self.node.sighup()
        return self.node.wait_log(what, since=mark)

    def test_v1_to_v2_keeps_connection_and_state(self):
        with Client(self.node.port) as c:
            self.assertEqual(echo(c, 1)["ver"], 1)
            install(self.plugdir, "v2")
            self.reload("echo echo-2")
            r = echo(c, 2)
            self.assertEqual(r["ver"], 2)
            self.assertEqual(r["count"], 2, "save/restore handed the count over")
        self.node.wait_log("plugin echo (load 1): finalised and unloaded")

    def test_bad_updates_keep_the_old_instance(self):
        cases = {
            "badmagic": "bad magic",
            "major": "ABI major 2, this host has major 1",
            "minor": "newer than this host's",
            "initfail": "init failed",
            "noentry": "no chat_plugin_entry symbol",
        }
        with Client(self.node.port) as c:
            for i, (variant, why) in enumerate(sorted(cases.items())):
                install(self.plugdir, variant)
                log = self.reload("the running instance")
                self.assertIn(why, log, variant)
                self.assertEqual(echo(c, i)["ver"], 1, variant)
            # a good file after the bad ones is taken
            install(self.plugdir, "v2")
            self.reload("echo echo-2")
            self.assertEqual(echo(c, 99)["ver"], 2)

    def test_msgid_clash_refuses_only_the_clasher(self):
        install(self.plugdir, "dup", name="dup")
        self.node.write_conf({"plugins": {"enabled": "echo, dup"}})
        log = self.reload("msgid 1000 is already handled by plugin echo")
        self.assertIn("init failed", log)
        with Client(self.node.port) as c:
            self.assertEqual(echo(c, 1)["ver"], 1)
            # the same plugin name with a msgid of its own loads fine
            install(self.plugdir, "other", name="dup")
            self.reload("plugin dup dup-9")
            c.send({"msgid": 2000, "n": 5})
            self.assertEqual(c.recv()["ver"], 9)
            self.assertEqual(echo(c, 2)["ver"], 1)

    def test_pending_timer_keeps_old_code_until_it_fires(self):
        with Client(self.node.port) as c:
            c.send({"msgid": 1002, "n": 7, "ms": 800})
            install(self.plugdir, "v2")
            self.reload("retired, draining")
            self.assertEqual(echo(c, 1)["ver"], 2)
            self.assertNotIn("(load 1): finalised", self.node.log_text())
            r = c.recv(timeout=5)
            self.assertEqual((r["msgid"], r["ver"], r["n"]), (1003, 1, 7))
            self.node.wait_log("plugin echo (load 1): finalised and unloaded")

    def test_reconfigure_without_reload(self):
        with Client(self.node.port) as c:
            c.send({"msgid": 1008})
            self.assertEqual(c.recv()["greeting"], "hello")
            self.node.write_conf({"plugin.echo": {"greeting": "bonjour"}})
            self.reload("settings changed; reconfigure")
            c.send({"msgid": 1008})
            self.assertEqual(c.recv()["greeting"], "bonjour")
            self.assertNotIn("load 2", self.node.log_text())

    def test_invalid_config_changes_nothing(self):
        with Client(self.node.port) as c:
            self.node.write_conf({"server": {"max_frame": "lots"}})
            self.reload("nothing changed")
            self.assertEqual(echo(c, 1)["ver"], 1)

    def test_disable_and_enable(self):
        with Client(self.node.port, proto=2) as c:
            self.node.write_conf({"plugins": {"enabled": ""}})
            self.reload("retired")
            r = c.request({"msgid": 1000, "n": 1})
            self.assertEqual(r["errno"], 103)
            self.node.write_conf({"plugins": {"enabled": "echo"}})
            self.reload("initialised")
            self.assertEqual(echo(c, 2)["ver"], 1)

    def test_reload_under_traffic(self):
        """A client sends continuously while SIGHUP swaps v1 and v2 back and
        forth: every request gets exactly one answer, in order, and the
        connection stays up."""
        c = Client(self.node.port)
        total = 3000
        answers = []
        done = threading.Event()

        def reader():
            while len(answers) < total:
                answers.append(c.recv(timeout=10))
            done.set()

        t = threading.Thread(target=reader)
        t.start()
        swaps = 0
        for n in range(total):
            c.send({"msgid": 1000, "n": n})
            if n % 300 == 150:
                install(self.plugdir, "v2" if swaps % 2 == 0 else "v1")
                mark = self.node.log_mark()
                self.node.sighup()
                swaps += 1
                # the requests already sent are handled while the reload
                # runs; the next ones go after it has swapped (on a slow
                # build all 3000 could otherwise be answered before it)
                self.node.wait_log("reloaded:", since=mark)
        t.join(60)
        self.assertTrue(done.is_set(), "answers missing: got %d" % len(answers))
        self.assertEqual([a["n"] for a in answers], list(range(total)))
        vers = {a["ver"] for a in answers}
        self.assertEqual(vers, {1, 2})
        c.expect_nothing(0.3)
        c.close()


class ReloadWithQueriesTest(unittest.TestCase):
    """A reload while database queries of the old instance are in flight:
    every callback runs, in the old code, before that code is unloaded."""

    def setUp(self):
        self.plugdir = tempfile.mkdtemp(prefix="chatd-plugins-")
        install(self.plugdir, "v1")
        self.node = Node(Stack(), plugins=("echo",), plugin_dir=self.plugdir,
                         redis=False, mysql=True)

    def tearDown(self):
        self.assertEqual(self.node.stop(), 0)  # raises on a sanitizer report
        shutil.rmtree(self.plugdir, ignore_errors=True)

    def test_queries_in_flight_finish_in_old_code(self):
        with Client(self.node.port) as c:
            for n in range(20):
                c.send({"msgid": 1010, "n": n, "sleep": 0.3})
            install(self.plugdir, "v2")
            mark = self.node.log_mark()
            self.node.sighup()
            self.node.wait_log("retired, draining", since=mark)
            # the registry already points at v2
            c.send({"msgid": 1010, "n": 100, "sleep": 0})
            got = [c.recv(timeout=15) for _ in range(21)]
            old = sorted(g["n"] for g in got if g["ver"] == 1)
            new = [g["n"] for g in got if g["ver"] == 2]
            self.assertEqual(old, list(range(20)))
            self.assertEqual(new, [100])
            # unloaded once the last old callback has run (a callback into
            # unmapped code would crash the node, or trip ASan in CI)
            self.node.wait_log("plugin echo (load 1): finalised and unloaded",
                               since=mark)


class CheckFlagTest(unittest.TestCase):
    """chatd -t loads each plugin it names and reports file:line: reason."""

    def run_check(self, variant):
        d = tempfile.mkdtemp(prefix="chatd-check-")
        try:
            install(d, variant)
            conf = os.path.join(d, "chat.conf")
            with open(conf, "w") as f:
                f.write("[server]\nlisten = 127.0.0.1:1\n[plugins]\ndir = %s\n"
                        "enabled = echo\n" % d)
            p = subprocess.run([CHATD, "-t", "-c", conf], capture_output=True,
                               text=True, timeout=30)
            return p.returncode, p.stdout + p.stderr, conf
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_good(self):
        rc, out, _ = self.run_check("v1")
        self.assertEqual(rc, 0, out)

    def test_bad_variants(self):
        for variant in ("badmagic", "major", "minor", "noentry"):
            rc, out, conf = self.run_check(variant)
            self.assertNotEqual(rc, 0, variant)
            self.assertIn("%s:5: plugin echo:" % conf, out, variant)


if __name__ == "__main__":
    unittest.main()
