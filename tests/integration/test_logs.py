"""Logs: log_format json and text, session context on the lines about a
session, log_file set by a reload and reopened on SIGUSR1 (logrotate), and
the journal's form (no timestamps, <N> priorities) when stderr is the
stream JOURNAL_STREAM names."""
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

from harness import CHATD, Client, Node, Stack, wait_for

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def scratch(test, prefix):
    d = tempfile.mkdtemp(prefix=prefix)
    test.addCleanup(shutil.rmtree, d, True)
    return d


def json_lines(text):
    """Every line of text parsed as JSON (fails the test on one that is not)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class LogFormatTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()

    def login_and_misbehave(self, node, name):
        """Log in as a new user and send an unknown msgid: chatd logs a line
        about that session.  Returns the user id."""
        with Client(node.port) as c:
            uid = c.register(name, "pw")
            c.login(uid, "pw")
            c.send({"msgid": 9999})
            node.wait_log("ignored as the seed does")
        return uid

    def test_json_lines_carry_the_session(self):
        node = Node(self.stack, conf={"server": {"log_format": "json"}})
        uid = self.login_and_misbehave(node, "jsonuser")
        self.assertEqual(node.stop(), 0)
        lines = json_lines(node.log_text())
        for o in lines:
            self.assertTrue({"ts", "level", "who", "msg"} <= set(o), o)
            self.assertRegex(o["ts"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
            self.assertIn(o["level"], ("error", "warn", "info", "debug"))
        self.assertTrue(any(o["msg"].startswith("listening on") for o in lines))
        self.assertTrue(any(o["who"] == "login" for o in lines), "plugin lines")
        bad = [o for o in lines if "ignored as the seed does" in o["msg"]]
        self.assertEqual(len(bad), 1)
        o = bad[0]
        self.assertEqual((o["who"], o["user"], o["name"]), ("core", uid, "jsonuser"))
        self.assertIsInstance(o["session"], int)
        self.assertRegex(o["peer"], r"^127\.0\.0\.1:\d+$")
        self.assertNotIn("session", [k for x in lines if "listening on" in x["msg"]
                                     for k in x])

    def test_text_lines_carry_the_session(self):
        node = Node(self.stack)
        uid = self.login_and_misbehave(node, "textuser")
        self.assertEqual(node.stop(), 0)
        line = [x for x in node.log_text().splitlines() if "ignored as" in x][0]
        self.assertRegex(line, TS.pattern + r"info  \[core\] session=\d+ "
                         r"peer=127\.0\.0\.1:\d+ user=%d name=textuser unknown msgid" % uid)

    def test_json_escapes_what_a_client_sent(self):
        """A user name with quotes, backslashes and a newline stays one valid
        JSON line."""
        node = Node(self.stack, conf={"server": {"log_format": "json"}})
        name = 'q"b\\n\nx'
        with Client(node.port) as c:
            uid = c.register(name, "pw")
            c.login(uid, "pw")
            c.send({"msgid": 9999})
            node.wait_log("ignored as the seed does")
        self.assertEqual(node.stop(), 0)
        o = [x for x in json_lines(node.log_text()) if "ignored as" in x["msg"]][0]
        self.assertEqual(o["name"], name)

    def test_bad_values_are_refused(self):
        d = scratch(self, "chatd-logconf-")
        conf = os.path.join(d, "chat.conf")
        with open(conf, "w") as f:
            f.write("[server]\nlog_format = xml\n")
        p = subprocess.run([CHATD, "-t", "-c", conf], capture_output=True, text=True)
        self.assertEqual(p.returncode, 1)
        self.assertIn("chat.conf:2: log_format: \"xml\" is not text or json", p.stderr)
        with open(conf, "w") as f:
            f.write("[server]\nlog_file = %s/no/such/dir/chatd.log\n"
                    "listen = 127.0.0.1:1\n" % d)
        p = subprocess.run([CHATD, "-c", conf], capture_output=True, text=True,
                           timeout=30)
        self.assertEqual(p.returncode, 1)
        self.assertIn("no/such/dir/chatd.log: No such file or directory", p.stderr)


class LogFileTest(unittest.TestCase):
    def test_reload_sets_log_file_and_sigusr1_reopens_it(self):
        node = Node(Stack())
        path = os.path.join(node.dir, "chatd-file.log")
        mark = node.log_mark()
        node.write_conf({"server": {"log_file": path, "log_format": "json"}})
        node.sighup()
        wait_for(lambda: "reloaded" in read(path),
                 what="the reload's result in log_file")
        # from now on nothing more reaches stderr
        stderr_len = node.log_mark()
        self.assertIn("reload: SIGHUP", node.log_text()[mark:])
        rotated = path + ".1"
        os.rename(path, rotated)       # what logrotate does
        with Client(node.port) as c:   # a line while the old file is still open
            c.send({"msgid": 9999})
            wait_for(lambda: "ignored as" in read(rotated),
                     what="a line in the renamed file before SIGUSR1")
        node.kill(signal.SIGUSR1)
        wait_for(lambda: "reopened" in read(path),
                 what="SIGUSR1 reopening log_file")
        with Client(node.port) as c:
            c.send({"msgid": 9998})
            wait_for(lambda: "msgid 9998" in read(path),
                     what="a line in the new file after SIGUSR1")
        self.assertNotIn("9998", read(rotated))
        self.assertEqual(node.stop(), 0)
        self.assertIn('"msg":"stopped"', read(path))
        json_lines(read(path))
        json_lines(read(rotated))
        self.assertEqual(node.log_mark(), stderr_len, "nothing more on stderr")


class JournalTest(unittest.TestCase):
    def run_chatd(self, conf, env):
        """chatd -c conf with stderr to a file; returns (that file's text)
        once chatd listened and stopped on SIGTERM."""
        d = scratch(self, "chatd-journal-")
        err = os.path.join(d, "stderr")
        with open(err, "wb") as f:
            st = os.fstat(f.fileno())
            e = dict(os.environ)
            for k, v in env.items():
                e[k] = v.format(dev=st.st_dev, ino=st.st_ino)
            p = subprocess.Popen([CHATD, "-c", conf], stdin=subprocess.DEVNULL,
                                 stdout=f, stderr=f, env=e)
        try:
            wait_for(lambda: "listening on" in read(err) or p.poll() is not None,
                     timeout=20, what="chatd listening")
            p.send_signal(signal.SIGTERM)
            self.assertEqual(p.wait(30), 0)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        return read(err)

    def test_journal_stream_drops_timestamps_and_uses_priorities(self):
        node = Node(Stack())
        node.stop()
        text = self.run_chatd(node.conf_path, {"JOURNAL_STREAM": "{dev}:{ino}"})
        lines = text.splitlines()
        self.assertTrue(lines)
        for line in lines:
            self.assertRegex(line, r"^<[3467]>(error|warn |info |debug) \[")
        self.assertIn("<6>info  [core] listening on", text)
        self.assertIn("<7>debug [core]", text)
        # another stream's dev:ino (stderr redirected since): a plain log
        text = self.run_chatd(node.conf_path, {"JOURNAL_STREAM": "{dev}:1"})
        for line in text.splitlines():
            self.assertRegex(line, TS.pattern)

    def test_journal_with_json(self):
        node = Node(Stack(), conf={"server": {"log_format": "json"}})
        node.stop()
        text = self.run_chatd(node.conf_path, {"JOURNAL_STREAM": "{dev}:{ino}"})
        for line in text.splitlines():
            m = re.match(r"^<([3467])>(\{.*\})$", line)
            self.assertTrue(m, line)
            o = json.loads(m.group(2))
            self.assertNotIn("ts", o)
            self.assertEqual(int(m.group(1)),
                             {"error": 3, "warn": 4, "info": 6, "debug": 7}[o["level"]])


if __name__ == "__main__":
    unittest.main()
