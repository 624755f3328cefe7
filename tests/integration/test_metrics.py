"""Metrics (issue 11): /metrics on the admin listener, a real Prometheus
server scraping it, and the Grafana dashboard's queries.

MetricsScrapeTest starts a node with `[admin] listen = 127.0.0.1:PORT`,
makes traffic (register, login with a right and a wrong password, a chat
message) and scrapes GET /metrics over HTTP with urllib: the text passes
`promtool check metrics`, every family the dashboard uses is exported, and
the counters the traffic should move moved by exactly what it caused.

PrometheusTest starts the Debian `prometheus` binary on a free port in a
temporary folder with a generated config that scrapes the node every
second, makes traffic, and polls Prometheus' HTTP API (/api/v1/query) until
the chatd series carry the values the traffic caused.

Both need the admin listener (core/admin.c, another part of issue 11).
ADMIN below asks the chatd under test whether it knows the [admin] section
(`chatd -t` on a config that has one); until it does, those two classes are
skipped rather than failed.  Once it does, a listener that never answers is
a failure.

DashboardTest needs no server: every metric name a query of
contrib/grafana/chatd.json uses must be a family the source registers
(core/*.c literals, or a plugin's chatd_<plugin>_<name> registration).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest
import urllib.parse
import urllib.request

from harness import CHATD, Client, Node, NodeError, Stack, free_port, wait_for

SRC = os.environ.get("CHAT_SRC") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
DASHBOARD = os.path.join(SRC, "contrib", "grafana", "chatd.json")
PLUGIN_DIR = os.environ.get("CHAT_PLUGIN_DIR") or os.path.join(SRC, "build", "plugins")
FAST = {"plugin.login": {"hash_cost": 1}}


def _admin_supported():
    """True when this chatd accepts an [admin] listen setting."""
    d = tempfile.mkdtemp(prefix="chatd-admin-probe-")
    try:
        conf = os.path.join(d, "chat.conf")
        with open(conf, "w") as f:
            f.write("[server]\nlisten = 127.0.0.1:%d\n"
                    "[plugins]\ndir = %s\nenabled = one2one\n"
                    "[admin]\nlisten = 127.0.0.1:%d\n"
                    % (free_port(), PLUGIN_DIR, free_port()))
        try:
            p = subprocess.run([CHATD, "-t", "-c", conf], capture_output=True,
                               timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return p.returncode == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


ADMIN = _admin_supported()
NO_ADMIN = "this chatd has no [admin] listener yet (core/admin.c is merged separately)"

# ---- the text format ------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """[(name, {label: value}, float)] of every sample line."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise AssertionError("not a sample line: %r" % line)
        labels = {k: re.sub(r'\\(.)', lambda x: {"n": "\n"}.get(x.group(1), x.group(1)), v)
                  for k, v in _LABEL.findall(m.group(2) or "")}
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def families(text):
    """The family names of the # TYPE lines."""
    return {l.split()[2] for l in text.splitlines() if l.startswith("# TYPE ")}


def value(samples, name, **labels):
    """The sum of the samples of name whose labels include labels (0: none)."""
    return sum(v for n, l, v in samples
               if n == name and all(l.get(k) == str(x) for k, x in labels.items()))


def dashboard_metrics():
    """Every chatd_* metric name the dashboard's queries use, as families
    (histogram suffixes _bucket/_sum/_count removed)."""
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = []

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k in ("expr", "query") and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(dash)
    names = set()
    for e in exprs:
        for n in re.findall(r'\b(chatd_[a-zA-Z0-9_]+)', e):
            names.add(re.sub(r'_(bucket|sum|count)$', "", n))
    return exprs, names


def promtool_check(testcase, text):
    if not shutil.which("promtool"):
        testcase.fail("promtool not found (Debian package prometheus; contrib/deps.sh)")
    p = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                       capture_output=True, timeout=60)
    testcase.assertEqual(p.returncode, 0, "promtool: %s%s" % (
        p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")))


# ---- traffic -----------------------------------------------------------------

def traffic(port):
    """Register two users, log both in (one wrong password first), send one
    chat message and read it.  Returns the two clients (still connected)."""
    a, b = Client(port, proto=2), Client(port, proto=2)
    ra = a.request({"msgid": 4, "name": "ma%d" % os.getpid(), "password": "pw123456"})
    rb = b.request({"msgid": 4, "name": "mb%d" % os.getpid(), "password": "pw123456"})
    assert ra["errno"] == 0 and rb["errno"] == 0, (ra, rb)
    assert a.request({"msgid": 1, "id": ra["id"], "password": "pw123456"})["errno"] == 0
    assert b.request({"msgid": 1, "id": rb["id"], "password": "nope"})["errno"] == 1
    assert b.request({"msgid": 1, "id": rb["id"], "password": "pw123456"})["errno"] == 0
    assert a.request({"msgid": 6, "id": ra["id"], "toid": rb["id"], "msg": "hi"})["errno"] == 0
    assert b.recv()["msg"] == "hi"
    return a, b


class AdminNode:
    """A node with an admin listener; .scrape() -> the /metrics text."""

    def __init__(self, stack, **kw):
        self.admin_port = free_port()
        conf = dict(FAST, admin={"listen": "127.0.0.1:%d" % self.admin_port})
        self.node = Node(stack, conf=conf, **kw)
        self.url = "http://127.0.0.1:%d/metrics" % self.admin_port
        self.text = None
        wait_for(self._answers, timeout=10, what="the admin listener to answer")

    def _answers(self):
        try:
            self.text = self.scrape()
            return True
        except OSError:
            return False

    def scrape(self):
        with urllib.request.urlopen(self.url, timeout=5) as r:
            self.content_type = r.headers.get("Content-Type", "")
            return r.read().decode()


@unittest.skipUnless(ADMIN, NO_ADMIN)
class MetricsScrapeTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.n = AdminNode(cls.stack)

    @classmethod
    def tearDownClass(cls):
        cls.n.node.stop()

    def test_traffic_moves_the_counters(self):
        before = parse(self.n.scrape())
        self.assertTrue(self.n.content_type.startswith("text/plain"), self.n.content_type)
        a, b = traffic(self.n.node.port)
        text = self.n.scrape()
        promtool_check(self, text)
        after = parse(text)

        def moved(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        self.assertEqual(moved("chatd_login_registrations_total", outcome="ok"), 2)
        self.assertEqual(moved("chatd_login_logins_total", kind="password", outcome="ok"), 2)
        self.assertEqual(moved("chatd_login_logins_total", kind="password",
                               outcome="invalid"), 1)
        self.assertEqual(moved("chatd_login_hash_seconds_count", op="hash"), 2)
        self.assertEqual(moved("chatd_login_hash_seconds_count", op="verify"), 3)
        self.assertEqual(moved("chatd_frames_total", msgid="4"), 2)
        self.assertEqual(moved("chatd_frames_total", msgid="1"), 3)
        self.assertEqual(moved("chatd_frames_total", msgid="6"), 1)
        self.assertEqual(moved("chatd_errors_total", msgid="1"), 1)
        self.assertEqual(moved("chatd_deliveries_total", route="local"), 1)
        self.assertEqual(moved("chatd_handler_calls_total", plugin="one2one"), 1)
        self.assertEqual(moved("chatd_handler_calls_total", plugin="login"), 5)
        self.assertEqual(moved("chatd_connections_accepted_total", transport="tcp"), 2)
        self.assertGreater(moved("chatd_bytes_received_total"), 200)
        self.assertGreater(moved("chatd_bytes_sent_total"), 200)
        self.assertGreaterEqual(moved("chatd_db_queries_total"), 6)
        self.assertGreaterEqual(moved("chatd_bus_presence_operations_total", op="claim"), 2)
        self.assertEqual(value(after, "chatd_sessions", state="logged_in"), 2)
        self.assertEqual(value(after, "chatd_bus_up"), 1)
        self.assertEqual(value(after, "chatd_db_connections", state="down"), 0)
        self.assertEqual(value(after, "chatd_plugin_info", plugin="login"), 1)
        self.assertGreater(value(after, "chatd_process_resident_memory_bytes"), 1e6)
        # the lag timer ticks every 100 ms: the traffic may have been quicker
        wait_for(lambda: value(parse(self.n.scrape()),
                               "chatd_event_loop_lag_seconds_count") > 0,
                 timeout=5, what="a loop-lag sample")
        # every sample carries this node's id
        nodes = {l.get("node") for _, l, _ in after}
        self.assertEqual(len(nodes), 1, nodes)
        a.close()
        b.close()

        def closed():
            s = parse(self.n.scrape())
            return (value(s, "chatd_connections_closed_total", reason="peer")
                    - value(before, "chatd_connections_closed_total", reason="peer") >= 2
                    and value(s, "chatd_sessions", state="logged_in") == 0)
        wait_for(closed, timeout=10, what="both sessions counted as closed")

    def test_dashboard_families_exported(self):
        exported = families(self.n.scrape())
        _, names = dashboard_metrics()
        missing = sorted(names - exported)
        self.assertEqual(missing, [], "dashboard queries metrics /metrics lacks")


@unittest.skipUnless(ADMIN, NO_ADMIN)
class ReloadTest(unittest.TestCase):
    """A hot reload of the login plugin: counted with its version, and the
    new instance's metrics continue from the old one's values."""

    PLUGINS = ("login", "friend", "one2one", "group", "offline")

    def install(self, name):
        tmp = os.path.join(self.plugdir, ".%s.so.tmp" % name)
        shutil.copyfile(os.path.join(PLUGIN_DIR, name + ".so"), tmp)
        os.replace(tmp, os.path.join(self.plugdir, name + ".so"))

    def test_reload_counts_and_keeps_values(self):
        self.plugdir = tempfile.mkdtemp(prefix="chatd-metrics-plugins-")
        self.addCleanup(shutil.rmtree, self.plugdir, True)
        for name in self.PLUGINS:
            self.install(name)
        n = AdminNode(Stack(), plugin_dir=self.plugdir)
        self.addCleanup(n.node.stop)
        a, b = traffic(n.node.port)
        before = parse(n.scrape())
        self.assertEqual(value(before, "chatd_plugin_reloads_total", plugin="login"), 0)
        self.assertEqual(value(before, "chatd_plugin_loads_total", plugin="login"), 1)
        mark = n.node.log_mark()
        time.sleep(0.01)  # a new mtime even on a coarse clock
        self.install("login")
        n.node.sighup()
        n.node.wait_log("plugin login (load 1): finalised and unloaded", timeout=30,
                        since=mark)
        after = parse(n.scrape())
        self.assertEqual(value(after, "chatd_plugin_reloads_total", plugin="login"), 1)
        self.assertEqual(value(after, "chatd_plugin_loads_total", plugin="login"), 2)
        self.assertEqual(value(after, "chatd_plugin_load_failures_total", plugin="login"), 0)
        self.assertEqual(value(after, "chatd_plugin_instances"), len(self.PLUGINS))
        for name, labels in (("chatd_login_registrations_total", {"outcome": "ok"}),
                             ("chatd_login_logins_total", {"outcome": "ok"})):
            self.assertEqual(value(after, name, **labels), value(before, name, **labels),
                             name)
        # the new instance counts on
        c = Client(n.node.port, proto=2)
        self.assertEqual(c.request({"msgid": 4, "name": "mc%d" % os.getpid(),
                                    "password": "pw123456"})["errno"], 0)
        self.assertEqual(value(parse(n.scrape()), "chatd_login_registrations_total",
                               outcome="ok"), 3)
        for x in (a, b, c):
            x.close()


@unittest.skipUnless(ADMIN, NO_ADMIN)
@unittest.skipUnless(shutil.which("prometheus"), "no prometheus binary (package prometheus)")
class PrometheusTest(unittest.TestCase):

    def setUp(self):
        self.stack = Stack()
        self.n = AdminNode(self.stack)
        self.addCleanup(self.n.node.stop)
        self.dir = tempfile.mkdtemp(prefix="chatd-prom-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.port = free_port()
        cfg = os.path.join(self.dir, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                    "scrape_configs:\n  - job_name: chatd\n    static_configs:\n"
                    "      - targets: ['127.0.0.1:%d']\n" % self.n.admin_port)
        self.log = open(os.path.join(self.dir, "prometheus.log"), "wb")
        self.addCleanup(self.log.close)
        self.prom = subprocess.Popen(
            ["prometheus", "--config.file=" + cfg,
             "--storage.tsdb.path=" + os.path.join(self.dir, "data"),
             "--web.listen-address=127.0.0.1:%d" % self.port],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)
        self.addCleanup(self._stop_prom)

    def _stop_prom(self):
        if self.prom.poll() is None:
            self.prom.send_signal(signal.SIGTERM)
            try:
                self.prom.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.prom.kill()
                self.prom.wait()

    def query(self, q):
        url = "http://127.0.0.1:%d/api/v1/query?%s" % (
            self.port, urllib.parse.urlencode({"query": q}))
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
        except OSError:
            return None
        if body.get("status") != "success":
            return None
        return body["data"]["result"]

    def scalar(self, q):
        r = self.query(q)
        return float(r[0]["value"][1]) if r else None

    def test_prometheus_scrapes_chatd(self):
        wait_for(lambda: self.scalar('up{job="chatd"}') == 1, timeout=60,
                 what="prometheus to scrape chatd")
        a, b = traffic(self.n.node.port)
        expect = {
            'sum(chatd_login_registrations_total{outcome="ok"})': 2,
            'sum(chatd_login_logins_total{kind="password",outcome="ok"})': 2,
            'sum(chatd_login_logins_total{outcome="invalid"})': 1,
            'sum(chatd_frames_total{msgid="6"})': 1,
            'sum(chatd_deliveries_total{route="local"})': 1,
            'sum(chatd_sessions{state="logged_in"})': 2,
            'sum(chatd_handler_calls_total{plugin="one2one"})': 1,
        }
        for q, v in expect.items():
            wait_for(lambda: self.scalar(q) == v, timeout=30,
                     what="%s == %s in prometheus (now %s)" % (q, v, self.scalar(q)))
        r = self.query('chatd_build_info')
        self.assertTrue(r and r[0]["metric"].get("node"), r)
        a.close()
        b.close()


class DashboardTest(unittest.TestCase):
    """Static: the dashboard parses and every metric it queries is one the
    source registers."""

    def source_families(self):
        names = set()
        for d in ("core", os.path.join("plugins")):
            for root, _, files in os.walk(os.path.join(SRC, d)):
                for fn in files:
                    if not fn.endswith(".c"):
                        continue
                    with open(os.path.join(root, fn)) as f:
                        text = f.read()
                    names.update(re.findall(r'"(chatd_[a-zA-Z0-9_]+)"', text))
                    if root.startswith(os.path.join(SRC, "plugins")):
                        plugin = os.path.relpath(root, os.path.join(SRC, "plugins")).split(
                            os.sep)[0]
                        for n in re.findall(
                                r'metric_(?:counter|gauge|histogram)\(\s*\w+,\s*"(\w+)"',
                                text):
                            names.add("chatd_%s_%s" % (plugin, n))
        # families built from a pattern (plugin.c: chatd_plugin_%s_total)
        names.update({"chatd_plugin_loads_total", "chatd_plugin_reloads_total",
                      "chatd_plugin_load_failures_total"})
        return names

    def test_dashboard_queries_known_metrics(self):
        exprs, names = dashboard_metrics()
        self.assertGreaterEqual(len(exprs), 10)
        missing = sorted(names - self.source_families())
        self.assertEqual(missing, [], "dashboard queries metrics chatd does not export")

    def test_dashboard_shape(self):
        with open(DASHBOARD) as f:
            dash = json.load(f)
        self.assertEqual(dash.get("title"), "chatd")
        self.assertTrue(any(v.get("name") == "node"
                            for v in dash.get("templating", {}).get("list", [])))
        ids = [p["id"] for p in dash["panels"]]
        self.assertEqual(len(ids), len(set(ids)), "panel ids must be unique")
        for p in dash["panels"]:
            if p.get("type") == "row":
                continue
            self.assertTrue(p.get("targets"), p.get("title"))


if __name__ == "__main__":
    unittest.main()
