"""The web client (contrib/web, issue 10) in a real browser: headless
Chromium driven by Selenium (Debian's chromium, chromium-driver and
python3-selenium, the `browser` group of contrib/deps.sh), against a chatd
that serves the client from `[web] root` and carries it over its ws://
listener.

Forms are submitted, conversations opened and messages sent from the
keyboard (Enter), as a keyboard-only user would.

Covered, in order (one browser, two windows, each its own origin so each
has its own localStorage: http://127.0.0.1:PORT and http://localhost:PORT):
  1. the files: the CSP and the other headers, 304, HEAD, 405, traversal;
  2. two browser users register, become friends and chat both ways;
  3. a group with a third member who is a plain TCP client (the harness's
     Client, protocol 2), so messages cross transports both ways;
  4. a reload keeps the session (resume token) and the unread counts;
  5. with the store plugin (durable messages): read ticks, and SYNC after
     a tab was away, or from a browser that kept nothing, shows every
     message once;
  6. an error (105, a message over msg_max) shown beside the composer and
     on the message;
  7. XSS payloads in a user name, a group name and a message render as
     those characters; no alert fires and no <img> is created;
and screenshots of the login, conversation list, one-to-one and group
screens at phone (390x844) and desktop (1280x800) widths into
$CHAT_TEST_OUT, else tests/integration/out/ (gitignored).

Until the ws:// transport is wired into core/net.c, chatd refuses a listen
with schemes (or does not answer on the ws port): the class is then
skipped and says why, as test_ws.py does.
"""

import http.client
import os
import shutil
import socket
import threading
import time
import unittest
import uuid

import test_nginx_cluster as tnc
from harness import CHAT_SRC, PLUGIN_DIR, Client, Node, NodeError, Stack, free_port

try:
    from selenium import webdriver
    from selenium.common.exceptions import (NoAlertPresentException, NoSuchElementException,
                                            WebDriverException)
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # pragma: no cover - python3-selenium is in contrib/deps.sh
    webdriver = None

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PASSWORD = "pw-web"
# one attribute (a DOM property when the element has it) of every match, in document order
ATTRS_JS = ("var a = arguments[1];"
            "return Array.prototype.map.call(document.querySelectorAll(arguments[0]),"
            " function (e) { return (a in e) ? e[a] : e.getAttribute(a); });")
XSS = "<img src=x onerror=alert(1)>"
OUT = os.environ.get("CHAT_TEST_OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "out")
PHONE, DESKTOP = (390, 844), (1280, 800)
# the store plugin (durable messages: SYNC, HISTORY, READ) and the typing
# plugin (msgid 18) when they are built, as etc/chat.conf enables them
PLUGINS = ("login", "friend", "one2one", "group", "offline") + tuple(
    p for p in ("store", "typing") if os.path.exists(os.path.join(PLUGIN_DIR, p + ".so")))


def uname(base):
    return "%s%s" % (base, uuid.uuid4().hex[:6])


def browser_missing():
    if webdriver is None:
        return "python3-selenium is not installed (bash contrib/deps.sh)"
    for p in (CHROMIUM, CHROMEDRIVER):
        if not os.access(p, os.X_OK):
            return "%s is missing (bash contrib/deps.sh installs chromium chromium-driver)" % p
    return None


def typing_missing(client, toid):
    """Why the server cannot carry typing and presence events (None when it
    answers TYPING, msgid 18, with errno 0): the tests of the UI for them
    skip until it does."""
    try:
        ack = client.request({"msgid": 18, "toid": toid, "typing": False}, timeout=3)
    except (TimeoutError, EOFError) as e:
        return "the server does not answer TYPING (msgid 18): %s" % e
    if ack.get("errno") != 0:
        return ("the server answers TYPING (msgid 18) with errno %r (%s): typing and "
                "presence events are not in this chatd yet" % (ack.get("errno"), ack.get("errmsg")))
    return None


def start_browser():
    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--disable-gpu", "--disable-extensions",
              "--disable-dev-shm-usage", "--no-first-run", "--mute-audio",
              "--disable-background-networking", "--renderer-process-limit=2",
              "--window-size=%d,%d" % DESKTOP):
        opts.add_argument(a)
    if os.geteuid() == 0:
        opts.add_argument("--no-sandbox")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP reports
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


class BrowserCase(unittest.TestCase):
    """One headless Chromium against a server that a subclass starts
    (start_server sets cls.web_port, where the page is served; stop_server).
    The helpers drive the page as a keyboard user would.  No tests here."""

    driver = None

    @classmethod
    def setUpClass(cls):
        cls.start_server()
        os.makedirs(OUT, exist_ok=True)
        try:
            cls.driver = start_browser()
        except WebDriverException as e:
            cls.stop_server()
            raise unittest.SkipTest("headless Chromium does not start: %s" % e.msg)
        cls.driver.set_page_load_timeout(30)
        cls.win = {}
        cls.users = {}

    @classmethod
    def tearDownClass(cls):
        if cls.driver:
            cls.driver.quit()
        cls.stop_server()

    # ---- helpers -----------------------------------------------------------
    def url(self, host="127.0.0.1"):
        return "http://%s:%d/" % (host, self.web_port)

    def use(self, who):
        self.driver.switch_to.window(self.win[who])

    def wait(self, pred, timeout=15, what="a condition"):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                v = pred()
                if v:
                    return v
            except WebDriverException as e:  # an element not there yet
                last = e
            time.sleep(0.05)
        self.shot("timeout")
        self.fail("timed out waiting for %s (%s)" % (what, last))

    def q(self, css):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def qs(self, css):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def attrs(self, css, attr="textContent"):
        """One attribute of every element matching css, read in one script.

        The page renders its lists anew on every change: element handles
        from qs() can go stale between the query and the read, a read in
        the page's own thread cannot."""
        return self.driver.execute_script(ATTRS_JS, css, attr)

    def text(self, css):
        v = self.attrs(css)
        if not v:
            raise NoSuchElementException(css)
        return v[0]

    def visible(self, css):
        els = self.qs(css)
        return bool(els) and els[0].is_displayed()

    def no_csp_violation(self):
        """The page needs nothing the Content-Security-Policy forbids."""
        try:
            logs = self.driver.get_log("browser")
        except WebDriverException:  # a driver without the log endpoint
            return
        bad = [e["message"] for e in logs if "Content Security Policy" in e["message"]
               or "Refused to" in e["message"]]
        self.assertEqual(bad, [], "the page broke its CSP")

    def no_alert(self):
        try:
            alert = self.driver.switch_to.alert
        except NoAlertPresentException:
            return
        txt = alert.text
        alert.dismiss()
        self.fail("a script ran: alert(%r)" % txt)

    def shot(self, name, size=None):
        if size:
            self.driver.set_window_size(*size)
            time.sleep(0.2)  # layout after a resize; nothing is waited for
        self.driver.save_screenshot(os.path.join(OUT, "web-%s.png" % name))

    def shots(self, name):
        self.shot(name + "-phone", PHONE)
        self.shot(name + "-desktop", DESKTOP)

    def fill(self, css, value):
        el = self.q(css)
        el.clear()
        el.send_keys(value)

    def register(self, who, name, host):
        self.driver.switch_to.new_window("window")
        self.win[who] = self.driver.current_window_handle
        self.driver.get(self.url(host))
        self.wait(lambda: self.visible("#register-form"), what="the login screen")
        self.fill("#register-name", name)
        self.fill("#register-password", PASSWORD)
        self.q("#register-password").send_keys(Keys.ENTER)  # the keyboard submits
        self.wait(lambda: self.visible("#chat-screen") and self.text("#me-id"),
                  what="%s logged in" % who)
        uid = int(self.text("#me-id"))
        self.users[who] = (uid, name)
        return uid

    def conv_item(self, key):
        return self.q('.conv-item[data-key="%s"]' % key)

    def unread(self, key):
        v = self.attrs('.conv-item[data-key="%s"] .unread' % key)
        return int(v[0]) if v else 0

    def open_conv(self, key):
        self.wait(lambda: self.qs('.conv-item[data-key="%s"]' % key), what="conversation " + key)
        self.driver.set_window_size(*DESKTOP)
        # from the keyboard (a conversation is a button); the list is
        # rendered anew on every change: press until it takes
        self.wait(lambda: self.conv_item(key).send_keys(Keys.ENTER) or True,
                  what="Enter on " + key)
        self.wait(lambda: self.visible("#message-input") and
                  self.attrs(".conv-item[aria-current=true]", "data-key") == [key],
                  what="conversation %s open" % key)

    def say(self, text):
        box = self.q("#message-input")
        box.send_keys(text)
        box.send_keys(Keys.ENTER)
        self.wait(lambda: text in self.attrs(".msg.mine:not(.pending) .msg-text"),
                  what="%r acknowledged" % text)

    def messages(self):
        return self.attrs("#messages .msg-text")

    def tcp_user(self):
        c = Client(self.tcp_port, proto=2, term=b"\n")
        self.addCleanup(c.close)
        name = uname("tcp")
        uid = c.register(name, PASSWORD)
        ack = c.login(uid, PASSWORD)
        self.assertEqual(ack.get("errno"), 0, ack)
        return c, uid, name

    def accessible_name_missing(self):
        """Visible controls without an accessible name (a <label for>, an
        aria-label or aria-labelledby, or a button's text)."""
        return self.driver.execute_script("""
            const bad = [];
            for (const e of document.querySelectorAll('input, textarea, select, button, summary')) {
              if (!e.offsetParent && getComputedStyle(e).position !== 'fixed') continue; // not shown
              const name = e.getAttribute('aria-label') || e.getAttribute('aria-labelledby') ||
                (e.id && document.querySelector('label[for="' + e.id + '"]')) ||
                ((e.tagName === 'BUTTON' || e.tagName === 'SUMMARY') && e.textContent.trim());
              if (!name) bad.push(e.outerHTML.slice(0, 120));
            }
            return bad;""")

    def tab_order(self, start_css, steps, back=False):
        """The ids (else tag.class) of the elements that Tab (Shift+Tab)
        focuses, steps times from start_css."""
        self.driver.execute_script("document.querySelector(arguments[0]).focus()", start_css)
        seen = []
        for _ in range(steps):
            key = (Keys.SHIFT + Keys.TAB) if back else Keys.TAB
            self.driver.switch_to.active_element.send_keys(key)
            seen.append(self.driver.execute_script(
                "const e = document.activeElement;"
                "return e.id || (e.tagName.toLowerCase() + '.' + e.className);"))
        return seen

    def http(self, method, path, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=10)
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        conn.close()
        return r, body

    def check_files(self, refused=(404,)):
        """The headers of the files (CSP, MIME types, ETag and 304, HEAD,
        405, no traversal), as the page's origin serves them.  refused: the
        statuses a path out of the root may get (nginx answers 400 itself
        to a path that climbs above /)."""
        r, body = self.http("GET", "/")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.getheader("Content-Type"), "text/html; charset=utf-8")
        csp = r.getheader("Content-Security-Policy")
        self.assertIn("script-src 'self'", csp)
        self.assertNotIn("unsafe-inline", csp)
        self.assertEqual(r.getheader("X-Content-Type-Options"), "nosniff")
        self.assertTrue(r.getheader("Referrer-Policy"))
        with open(os.path.join(CHAT_SRC, "contrib", "web", "index.html"), "rb") as f:
            self.assertEqual(body, f.read())
        etag = r.getheader("ETag")
        r, body = self.http("GET", "/", {"If-None-Match": etag})
        self.assertEqual((r.status, body), (304, b""))
        r, body = self.http("HEAD", "/app.js")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.getheader("Content-Type"), "text/javascript; charset=utf-8")
        r, _ = self.http("POST", "/")
        self.assertEqual(r.status, 405)
        self.assertEqual(r.getheader("Allow"), "GET, HEAD")
        for p in ("/../harness.py", "/%2e%2e/%2e%2e/CMakeLists.txt", "/nope.js"):
            r, _ = self.http("GET", p)
            self.assertIn(r.status, refused if ".." in p or "%2e" in p else (404,), p)


@unittest.skipIf(browser_missing(), browser_missing() or "")
class TestWebClient(BrowserCase):
    """chatd with tcp:// and ws:// listeners and [web] root = contrib/web."""

    # ---- the server (a subclass may bring its own: see start_server) -----
    @classmethod
    def start_server(cls):
        """Sets cls.node, cls.tcp_port and cls.web_port (http and ws)."""
        cls.stack = Stack()
        tcp, ws = free_port(), free_port()
        conf = {"server": {"listen": "tcp://127.0.0.1:%d, ws://127.0.0.1:%d/chat" % (tcp, ws)},
                "web": {"root": os.path.join(CHAT_SRC, "contrib", "web")},
                "plugin.login": {"hash_cost": 1}}
        try:
            cls.node = Node(cls.stack, conf=conf, plugins=PLUGINS)
        except NodeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
            raise unittest.SkipTest("this chatd has no ws:// listener yet (the issue 9 "
                                    "transport is not wired): %s" % first)
        cls.node.port = tcp
        cls.tcp_port = tcp
        cls.web_port = getattr(cls.node, "ws_port", None) or ws
        try:
            socket.create_connection(("127.0.0.1", cls.web_port), timeout=5).close()
        except OSError as e:
            cls.node.stop()
            raise unittest.SkipTest("chatd accepted the ws:// listen but does not answer "
                                    "on %d: %s" % (cls.web_port, e))

    @classmethod
    def stop_server(cls):
        rc = cls.node.stop()
        if rc != 0:
            raise AssertionError("chatd exited with %r\n%s" % (rc, cls.node.log_tail()))

    # ---- 1. the files --------------------------------------------------------
    def test_1_files(self):
        self.check_files()

    # ---- 2. two browser users ---------------------------------------------
    def test_2_two_users_chat(self):
        self.driver.get(self.url())
        self.wait(lambda: self.visible("#login-form"), what="the login screen")
        self.shots("login")
        self.assertEqual(self.accessible_name_missing(), [], "the login screen")
        self.assertEqual(self.tab_order("#login-id", 5),
                         ["login-password", "button.", "register-name", "register-password",
                          "button."])
        alice = self.register("alice", XSS + uname("alice"), "127.0.0.1")
        bob = self.register("bob", uname("bob"), "localhost")
        self.no_alert()
        # each adds the other (friend policy open in the harness; mutual works too)
        for who, other in (("alice", bob), ("bob", alice)):
            self.use(who)
            self.q(".tools summary").click()
            self.fill("#friend-id", str(other))
            self.q("#add-friend-form button").click()
            self.wait(lambda: self.qs('.conv-item[data-key="u:%d"]' % other),
                      what="%s sees friend %d" % (who, other))
        self.use("bob")
        # alice's name is shown as the characters it is
        self.wait(lambda: self.text('.conv-item[data-key="u:%d"] .conv-name' % alice)
                  == self.users["alice"][1], what="alice's name as text")
        self.assertFalse(self.qs("#conv-list img"))
        self.use("alice")
        self.open_conv("u:%d" % bob)
        self.say("hello bob")
        self.use("bob")
        self.wait(lambda: self.unread("u:%d" % alice) == 1, what="bob's unread count 1")
        self.shots("list")
        self.open_conv("u:%d" % alice)
        self.wait(lambda: "hello bob" in self.messages(), what="bob sees the message")
        self.assertEqual(self.unread("u:%d" % alice), 0)
        if "store" in PLUGINS:  # bob read it: alice's message gets the read ticks
            self.use("alice")
            self.wait(lambda: self.qs("#messages .msg.mine .tick.read"), what="the read tick")
            self.use("bob")
        self.say("hello alice")
        self.say(XSS)
        self.no_alert()
        self.use("alice")
        self.wait(lambda: self.messages()[-2:] == ["hello alice", XSS], what="alice sees both")
        self.assertFalse(self.qs("#messages img"))
        self.assertEqual(self.text("#conv-title"), self.users["bob"][1])
        self.wait(lambda: self.qs("#messages time"), what="message times")
        self.no_alert()
        self.no_csp_violation()
        self.shots("one2one")

    # ---- 3. a group across transports ----------------------------------------
    def test_3_group_with_tcp_member(self):
        if "bob" not in self.users:
            self.skipTest("needs test_2's users")
        carol, cid, cname = self.tcp_user()
        alice, bob = self.users["alice"][0], self.users["bob"][0]
        gname = XSS + uname("g")
        self.use("alice")
        self.driver.set_window_size(*DESKTOP)
        summary = self.q(".tools")
        if not summary.get_attribute("open"):
            self.q(".tools summary").click()
        self.fill("#group-name", gname)
        self.fill("#group-desc", "about " + XSS)
        self.q("#create-group-form button").click()
        self.wait(lambda: self.visible("#members-toggle") and self.text("#conv-title") == gname,
                  what="the new group open")
        gid = int(self.attrs(".conv-item[aria-current=true]", "data-key")[0][2:])
        self.q("#members-toggle").click()
        for uid in (bob, cid):
            self.fill("#member-id", str(uid))
            self.q("#add-member-form button").click()
            self.wait(lambda: any(t.startswith(" #%d" % uid)
                                  for t in self.attrs("#member-list .me-id")),
                      what="member %d listed" % uid)
        self.assertFalse(self.qs("#members img"))
        # the TCP member speaks: both browsers see it
        ack = carol.request({"msgid": 10, "groupid": gid, "msg": "meow from tcp"})
        self.assertEqual(ack.get("errno"), 0, ack)
        self.wait(lambda: "meow from tcp" in self.messages(), what="alice sees carol")
        self.say("hi all from the browser")
        m = carol.recv_until(lambda m: m.get("msgid") == 10, timeout=10)
        self.assertEqual((m["groupid"], m["msg"], m["id"]),
                         (gid, "hi all from the browser", alice))
        self.use("bob")
        key = "g:%d" % gid
        self.wait(lambda: self.unread(key) == 2, what="bob's group unread 2")
        self.assertEqual(self.text('.conv-item[data-key="%s"] .conv-name' % key), gname)
        self.open_conv(key)
        self.wait(lambda: self.messages()[-2:] == ["meow from tcp", "hi all from the browser"],
                  what="bob sees the group")
        froms = self.attrs("#messages .msg-from")
        self.assertIn(cname, froms)
        self.assertIn(self.users["alice"][1], froms)
        self.say("bob here")
        m = carol.recv_until(lambda m: m.get("msgid") == 10 and m.get("msg") == "bob here",
                             timeout=10)
        self.assertEqual(m["id"], bob)
        self.no_alert()
        self.q("#members-toggle").click()
        self.shots("group")
        self.use("alice")
        self.wait(lambda: "bob here" in self.messages(), what="alice sees bob in the group")
        self.no_alert()

    # ---- 4. reload keeps the session and the unread counts -----------------------
    def test_4_reload_keeps_session_and_unread(self):
        if "bob" not in self.users:
            self.skipTest("needs test_2's users")
        alice, bob = self.users["alice"][0], self.users["bob"][0]
        self.use("bob")
        self.driver.set_window_size(*PHONE)
        if self.visible("#back"):
            self.q("#back").click()  # bob looks at the list: messages count as unread
        self.use("alice")
        self.open_conv("u:%d" % bob)
        self.say("one")
        self.say("two")
        self.use("bob")
        key = "u:%d" % alice
        self.wait(lambda: self.unread(key) == 2, what="bob's unread 2")
        self.driver.refresh()
        self.wait(lambda: self.visible("#chat-screen") and self.text("#me-id") == str(bob),
                  what="bob still logged in after the reload")
        self.assertFalse(self.visible("#login-screen"))
        self.wait(lambda: self.unread(key) == 2, what="the unread count after the reload")
        self.wait(lambda: self.text("#conn") == "online", what="the session resumed")
        # the resumed session is live: a new message arrives
        self.use("alice")
        self.say("three")
        self.use("bob")
        self.wait(lambda: self.unread(key) == 3, what="bob's unread 3 after the resume")
        self.driver.set_window_size(*DESKTOP)
        self.open_conv(key)
        self.wait(lambda: self.messages()[-3:] == ["one", "two", "three"], what="history kept")
        self.no_alert()

    # ---- 5. sync after reconnect: nothing missed, nothing twice -------------------
    @unittest.skipUnless("store" in PLUGINS, "the store plugin is not built")
    def test_5_sync_without_duplicates(self):
        if "bob" not in self.users:
            self.skipTest("needs test_2's users")
        alice, bob = self.users["alice"][0], self.users["bob"][0]
        key = "u:%d" % alice
        self.use("bob")
        self.driver.set_window_size(*DESKTOP)
        self.open_conv(key)
        before = self.messages()
        self.driver.set_window_size(*PHONE)
        self.q("#back").click()  # the list: what comes counts as unread
        # bob's tab goes away; alice writes meanwhile; bob comes back
        self.driver.get("about:blank")
        self.use("alice")
        self.open_conv("u:%d" % bob)
        for t in ("while away 1", "while away 2"):
            self.say(t)
        self.use("bob")
        self.driver.get(self.url("localhost"))
        self.wait(lambda: self.unread(key) == 2, what="bob's unread 2 after the sync")
        self.open_conv(key)
        self.wait(lambda: self.messages()[-2:] == ["while away 1", "while away 2"],
                  what="the messages sent while away")
        self.assertEqual(self.messages(), before + ["while away 1", "while away 2"])
        # a device with nothing stored (localStorage cleared, the token kept)
        # gets the whole conversation from SYNC, each message once
        self.driver.execute_script(
            "for (const k of Object.keys(localStorage))"
            " if (k !== 'chatd.session') localStorage.removeItem(k);")
        self.driver.refresh()
        self.wait(lambda: self.text("#conn") == "online", what="bob online again")
        self.open_conv(key)
        self.wait(lambda: self.messages()[-2:] == ["while away 1", "while away 2"],
                  what="the conversation from SYNC")
        msgs = self.messages()
        self.assertEqual(msgs, before + ["while away 1", "while away 2"])
        self.no_alert()


    # ---- 6. an error in the UI ------------------------------------------------------
    def test_6_error_shown(self):
        if "bob" not in self.users:
            self.skipTest("needs test_2's users")
        self.use("alice")
        self.open_conv("u:%d" % self.users["bob"][0])
        box = self.q("#message-input")
        # over [plugin.one2one] msg_max (4096): 105, shown beside the composer
        self.driver.execute_script("arguments[0].value = 'x'.repeat(5000)", box)
        box.send_keys(Keys.ENTER)
        self.wait(lambda: self.qs("#messages .msg.failed"), what="the message marked not sent")
        self.assertIn("Too long", self.text("#send-error"))
        self.assertIn("not sent", self.text("#messages .msg.failed .msg-meta"))

    # ---- 7. typing and presence (msgid 18, 19) ------------------------------------
    def test_7_typing_and_presence(self):
        if "bob" not in self.users:
            self.skipTest("needs test_2's users")
        carol, cid, cname = self.tcp_user()
        alice = self.users["alice"][0]
        why = typing_missing(carol, alice)
        if why:
            self.skipTest(why)
        # alice adds carol (on TCP) from the page: carol is online
        self.use("alice")
        self.driver.set_window_size(*DESKTOP)
        if not self.q(".tools").get_attribute("open"):
            self.q(".tools summary").click()
        self.fill("#friend-id", str(cid))
        self.q("#add-friend-form button").click()
        key_c = "u:%d" % cid
        self.wait(lambda: self.qs('.conv-item[data-key="%s"] .dot.online' % key_c),
                  what="carol online in alice's list")
        # alice types to carol: TYPING reaches carol's TCP session; Enter
        # sends typing:false, then the message
        self.open_conv(key_c)
        self.q("#message-input").send_keys("typed in the brow")
        m = carol.recv_until(lambda m: m.get("msgid") == 18, timeout=10)
        self.assertEqual((m.get("id"), m.get("toid"), m.get("typing", True)), (alice, cid, True), m)
        self.q("#message-input").send_keys("ser" + Keys.ENTER)
        m = carol.recv_until(lambda m: m.get("msgid") in (6, 18), timeout=10)
        self.assertEqual((m.get("msgid"), m.get("typing")), (18, False), m)
        m = carol.recv_until(lambda m: m.get("msgid") in (6, 18), timeout=10)
        self.assertEqual((m.get("msgid"), m.get("msg")), (6, "typed in the browser"), m)
        # carol types to alice: one TYPING and nothing after it shows for ~5 s
        ack = carol.request({"msgid": 18, "toid": alice})
        self.assertEqual(ack.get("errno"), 0, ack)
        t0 = time.monotonic()
        self.wait(lambda: self.text("#typing") == cname + " is typing…", timeout=5,
                  what="carol typing")
        self.shots("typing")
        self.wait(lambda: self.text("#typing") == "", timeout=10, what="the typing line to expire")
        self.assertGreater(time.monotonic() - t0, 3.5, "the typing line went too soon")
        # and her message ends it at once
        self.assertEqual(carol.request({"msgid": 18, "toid": alice}).get("errno"), 0)
        self.wait(lambda: self.text("#typing") != "", timeout=5, what="carol typing again")
        self.assertEqual(carol.request({"msgid": 6, "toid": alice, "msg": "from tcp"}).get("errno"), 0)
        self.wait(lambda: "from tcp" in self.messages() and self.text("#typing") == "", timeout=3,
                  what="carol's message in place of her typing line")
        # presence, live: carol's last connection closes, then she logs in
        # again; alice's dot follows well within the 30 s list poll
        carol.close()
        self.wait(lambda: self.qs('.conv-item[data-key="%s"] .dot.offline' % key_c), timeout=10,
                  what="carol offline (PRESENCE)")
        again = Client(self.tcp_port, proto=2, term=b"\n")
        self.addCleanup(again.close)
        self.assertEqual(again.login(cid, PASSWORD).get("errno"), 0)
        self.wait(lambda: self.qs('.conv-item[data-key="%s"] .dot.online' % key_c), timeout=10,
                  what="carol online again (PRESENCE)")
        self.no_alert()

    # ---- 8. the keyboard and labels ---------------------------------------------------
    def test_8_keyboard_and_labels(self):
        if "bob" not in self.users:
            self.skipTest("needs test_2's users")
        bob = self.users["bob"][0]
        self.use("alice")
        self.open_conv("u:%d" % bob)
        self.assertEqual(self.accessible_name_missing(), [], "desktop, a conversation")
        self.assertEqual(self.tab_order("#message-input", 1), ["send"])
        # a phone in a conversation: the hidden list takes no focus
        self.driver.set_window_size(*PHONE)
        self.assertEqual(self.accessible_name_missing(), [], "phone, a conversation")
        seen = self.tab_order("#back", 8)
        self.assertIn("message-input", seen)
        self.assertFalse([x for x in seen if "conv-item" in x or x == "friend-id"], seen)
        # Escape goes back to the list, whose buttons are then reachable
        self.driver.switch_to.active_element.send_keys(Keys.ESCAPE)
        self.wait(lambda: self.visible(".conv-item"), what="the list after Escape")
        self.assertEqual(self.accessible_name_missing(), [], "phone, the list")
        self.driver.set_window_size(*DESKTOP)


# ---- the cluster: three nodes behind nginx (`make cluster`) -----------------------------

@unittest.skipIf(browser_missing(), browser_missing() or "")
@unittest.skipIf(tnc.NGINX is None, tnc.LOAD_MODULE)
@unittest.skipUnless("store" in PLUGINS, "the store plugin is not built (SYNC fills the gap)")
class TestWebCluster(BrowserCase):
    """Three nodes (one database, one Redis) with ws:// listeners and
    [web] root, behind nginx rendered from contrib/nginx/nginx.conf.in as
    `make cluster` does (PROXY protocol on in the stream ports and the
    nodes): the page and its WebSocket come from nginx's http port (one
    origin), nginx passes both to the nodes."""

    @classmethod
    def start_server(cls):
        cls.stack = Stack()
        db = cls.stack.new_database("webcl")
        conf = {"web": {"root": os.path.join(CHAT_SRC, "contrib", "web")},
                "plugin.login": {"hash_cost": 1}, "server": dict(tnc.PROXIED["server"])}
        cls.nodes = []
        try:
            for i in range(3):
                cls.nodes.append(Node(cls.stack, db=db, node_id="web-n%d" % (i + 1),
                                      migrate=(i == 0), conf=conf, plugins=PLUGINS, ws=True))
        except NodeError as e:
            cls.stop_server()
            first = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
            raise unittest.SkipTest("the nodes do not start with ws:// and [web]: %s" % first)
        cls.nginx = tnc.Nginx(free_port(), [n.port for n in cls.nodes], proxy_protocol=True,
                              ws_ports=[n.ws_port for n in cls.nodes])
        cls.web_port = cls.nginx.ws_port

    @classmethod
    def stop_server(cls):
        if getattr(cls, "nginx", None):
            cls.nginx.stop()
        for n in cls.nodes:
            n.stop()

    def node_of(self, uid):
        """The running nodes that hold a session of user uid (admin API)."""
        found = []
        for i, n in enumerate(self.nodes):
            if not n.running():
                continue
            status, _, body = n.admin("GET", "/sessions?limit=1000")
            if status == 200 and any(x.get("user") == uid for x in body["sessions"]):
                found.append(i)
        return found

    def test_1_files_through_nginx(self):
        self.check_files(refused=(400, 404))
        r, _ = self.http("GET", "/style.css")
        self.assertEqual(r.getheader("Content-Type"), "text/css; charset=utf-8")
        self.assertEqual(r.getheader("Cache-Control"), "no-cache")

    def test_2_node_stopped_page_moves_and_misses_nothing(self):
        self.driver.get(self.url())
        self.wait(lambda: self.visible("#login-form"), what="the login screen through nginx")
        pia = self.register("pia", uname("pia"), "127.0.0.1")
        self.wait(lambda: self.text("#conn") == "online", what="pia online")
        self.wait(lambda: len(self.node_of(pia)) == 1, what="pia's node")
        victim = self.node_of(pia)[0]
        # the sender is on TCP, on a node that stays up; durable sends (cid),
        # each resent with its cid on 113 until acknowledged
        sender_node = self.nodes[(victim + 1) % 3]
        sam = Client(sender_node.port, proto=2, term=b"\n")
        self.addCleanup(sam.close)
        # straight to that node, as nginx would (the nodes take PROXY headers)
        sam.send_raw(b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 %d\r\n" % sender_node.port)
        sam_id = sam.register(uname("sam"), PASSWORD)
        self.assertEqual(sam.login(sam_id, PASSWORD).get("errno"), 0)
        self.assertEqual(sam.request({"msgid": 7, "friendid": pia}).get("errno"), 0)
        sent = []

        def send():
            text = "n%03d" % (len(sent) + 1)
            cid = uuid.uuid4().hex
            for _ in range(50):
                ack = sam.request({"msgid": 6, "toid": pia, "msg": text, "cid": cid}, timeout=10)
                if ack.get("errno") == 0:
                    break
                self.assertEqual(ack.get("errno"), 113, ack)  # busy: again, same cid
                time.sleep(0.1)
            self.assertIn("mid", ack, "a durable ack")
            sent.append(text)

        for _ in range(3):
            send()
        key = "u:%d" % sam_id
        self.open_conv(key)
        self.wait(lambda: self.messages() == sent, what="the first messages")
        # stop pia's node (SIGTERM) and keep sending while the page is away
        stopper = threading.Thread(target=self.nodes[victim].stop)
        stopper.start()
        during = 0          # sent after the node was gone, before pia was back
        after = 0
        deadline = time.monotonic() + 60
        while after < 5:
            self.assertLess(time.monotonic(), deadline, "pia's page did not come back")
            gone = not stopper.is_alive()
            back = gone and self.node_of(pia)
            send()
            if back:
                after += 1
            elif gone:
                during += 1
            time.sleep(0.1)  # pacing the sender, not waiting for anything
        stopper.join()
        moved = self.node_of(pia)
        self.assertTrue(moved and moved[0] != victim, moved)
        self.assertGreater(during, 0, "nothing was sent while the page was away")
        self.wait(lambda: self.messages() == sent, timeout=30,
                  what="every message once, in order, after the reconnect (%d sent, %d "
                  "during the outage)" % (len(sent), during))
        self.assertEqual(self.text("#conn"), "online")
        self.shots("cluster-after-failover")
        self.no_alert()
        self.no_csp_violation()


# ---- several tabs of one user -------------------------------------------------------------

class TabsCase(BrowserCase):
    """One node with [plugin.login] multi_login = MULTI_LOGIN; tabs of one
    user in one browser (one origin: they share the session)."""

    MULTI_LOGIN = None

    @classmethod
    def start_server(cls):
        cls.stack = Stack()
        conf = {"web": {"root": os.path.join(CHAT_SRC, "contrib", "web")},
                "plugin.login": {"hash_cost": 1, "multi_login": cls.MULTI_LOGIN}}
        try:
            cls.node = Node(cls.stack, conf=conf, plugins=PLUGINS, ws=True)
        except NodeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
            raise unittest.SkipTest("chatd does not start with multi_login = %s: %s"
                                    % (cls.MULTI_LOGIN, first))
        log = cls.node.log_text()
        if "multi_login=%s" % cls.MULTI_LOGIN not in log:
            cls.node.stop()
            raise unittest.SkipTest("the login plugin does not say it uses multi_login = %s"
                                    % cls.MULTI_LOGIN)
        cls.tcp_port = cls.node.port
        cls.web_port = cls.node.ws_port

    @classmethod
    def stop_server(cls):
        cls.node.stop()

    def sessions_of(self, uid):
        status, _, body = self.node.admin("GET", "/sessions?limit=1000")
        self.assertEqual(status, 200, body)
        return [x for x in body["sessions"] if x.get("user") == uid]

    def two_tabs(self):
        """User 'tab' registered in tab A, then tab B opened: their ids."""
        self.driver.get(self.url())
        uid = self.register("A", uname("tab"), "127.0.0.1")
        self.driver.switch_to.new_window("tab")
        self.win["B"] = self.driver.current_window_handle
        self.driver.get(self.url())
        self.wait(lambda: self.visible("#chat-screen") and self.text("#me-id") == str(uid),
                  what="tab B logged in with the shared session")
        return uid


@unittest.skipIf(browser_missing(), browser_missing() or "")
class TestWebTabsReplace(TabsCase):
    """multi_login = replace: the newer tab takes the login, the older one
    stops and waits for its Reconnect button; they never kick each other in
    a loop."""

    MULTI_LOGIN = "replace"

    def assert_settled(self, holder, parked, uid):
        """holder online with the one session, parked waiting; for 4 s."""
        self.use(parked)
        self.wait(lambda: self.text("#conn").startswith("signed in elsewhere") and
                  self.visible("#reconnect"), what="tab %s parked" % parked)
        self.use(holder)
        self.wait(lambda: self.text("#conn") == "online", what="tab %s online" % holder)
        self.wait(lambda: len(self.sessions_of(uid)) == 1, what="one session")
        end = time.monotonic() + 4
        while time.monotonic() < end:  # watching for a fight, not waiting for one thing
            self.assertEqual(len(self.sessions_of(uid)), 1)
            self.assertEqual(self.text("#conn"), "online")
            time.sleep(0.2)
        self.use(parked)
        self.assertTrue(self.text("#conn").startswith("signed in elsewhere"))

    def test_tabs_do_not_fight(self):
        uid = self.two_tabs()
        self.assert_settled("B", "A", uid)
        # the user picks tab A again: A takes over, B waits; still no loop
        self.use("A")
        self.q("#reconnect").click()
        self.assert_settled("A", "B", uid)
        self.shots("tab-replaced")
        # the one that holds the login chats
        c, cid, _ = self.tcp_user()
        self.assertEqual(c.request({"msgid": 6, "toid": uid, "msg": "to the live tab"}).get("errno"), 0)
        self.use("A")
        self.open_conv("u:%d" % cid)
        self.wait(lambda: "to the live tab" in self.messages(), what="tab A gets the message")


@unittest.skipIf(browser_missing(), browser_missing() or "")
@unittest.skipUnless("store" in PLUGINS, "the store plugin is not built")
class TestWebTabsMulti(TabsCase):
    """multi_login = multi: every tab is a device, all stay in step."""

    MULTI_LOGIN = "multi"

    def test_tabs_in_step(self):
        uid = self.two_tabs()
        for t in ("A", "B"):
            self.use(t)
            self.wait(lambda: self.text("#conn") == "online", what="tab %s online" % t)
        self.wait(lambda: len(self.sessions_of(uid)) == 2, what="two sessions, one per tab")
        c, cid, _ = self.tcp_user()
        self.assertEqual(c.request({"msgid": 7, "friendid": uid}).get("errno"), 0)
        ack = c.request({"msgid": 6, "toid": uid, "msg": "to every tab", "cid": uuid.uuid4().hex})
        self.assertEqual(ack.get("errno"), 0, ack)
        key = "u:%d" % cid
        for t in ("A", "B"):
            self.use(t)
            self.open_conv(key)
            self.wait(lambda: self.messages() == ["to every tab"], what="tab %s has it" % t)
        # sent from tab A: tab B shows it too (ours), once
        self.use("A")
        self.say("from tab A")
        self.use("B")
        self.wait(lambda: self.messages() == ["to every tab", "from tab A"],
                  what="tab B has tab A's message")
        self.assertTrue(self.qs("#messages .msg.mine"))
        self.shots("tabs-multi")
        # neither tab was parked
        for t in ("A", "B"):
            self.use(t)
            self.assertEqual(self.text("#conn"), "online")


# ---- the client's side of what chatd does not send yet -------------------------------

try:
    import web_standin
except ImportError:  # pragma: no cover - python3-websockets is in contrib/deps.sh
    web_standin = None


@unittest.skipIf(browser_missing(), browser_missing() or "")
@unittest.skipIf(web_standin is None, "python3-websockets is not installed (bash contrib/deps.sh)")
class TestWebClientStandIn(BrowserCase):
    """The page from a real chatd (its CSP), its WebSocket to a stand-in
    server (web_standin.py, `?ws=`) that pushes the events of the agreed
    wire format: PRESENCE (19), TYPING (18), group receipts (17 for gG),
    a message from another device of the user, notices 116 and 119.  The
    same features against chatd are TestWebClient.test_7 and
    TestWebTabsMulti, which skip until chatd has them."""

    @classmethod
    def start_server(cls):
        cls.stack = Stack()
        conf = {"web": {"root": os.path.join(CHAT_SRC, "contrib", "web")}}
        try:
            cls.node = Node(cls.stack, conf=conf, ws=True)
        except NodeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
            raise unittest.SkipTest("chatd does not start with ws:// and [web]: %s" % first)
        cls.web_port = cls.node.ws_port
        cls.fake = web_standin.StandIn(free_port())

    @classmethod
    def stop_server(cls):
        if getattr(cls, "fake", None):
            cls.fake.stop()
        cls.node.stop()

    def url(self, host="127.0.0.1"):
        return "http://%s:%d/?ws=%s" % (host, self.web_port, self.fake.url)

    def setUp(self):
        if self.users.get("me"):
            return
        self.driver.get(self.url())
        self.wait(lambda: self.visible("#register-form"), what="the login screen")
        self.fill("#register-name", "me")
        self.fill("#register-password", PASSWORD)
        self.q("#register-password").send_keys(Keys.ENTER)
        self.wait(lambda: self.text("#conn") == "online", what="logged in at the stand-in")
        self.users["me"] = web_standin.ME

    def ticks(self):
        return self.attrs("#messages .tick", "title")

    def test_1_presence(self):
        dot = '.conv-item[data-key="u:%d"] .dot.%s'
        self.wait(lambda: self.qs(dot % (web_standin.BOB, "online")), what="bob online")
        self.fake.push({"msgid": 19, "id": web_standin.BOB, "name": "bob", "online": False})
        self.wait(lambda: self.qs(dot % (web_standin.BOB, "offline")), what="bob offline")
        self.fake.push({"msgid": 19, "id": web_standin.BOB, "name": "bob", "online": True})
        self.wait(lambda: self.qs(dot % (web_standin.BOB, "online")), what="bob online again")

    def test_2_typing_shown_and_expires(self):
        key = "u:%d" % web_standin.BOB
        ev = {"msgid": 18, "id": web_standin.BOB, "name": XSS, "toid": web_standin.ME}
        self.fake.push(ev)
        self.wait(lambda: self.text('.conv-item[data-key="%s"] .conv-preview' % key)
                  == XSS + " is typing…", what="typing in the list, as text")
        self.open_conv(key)
        self.wait(lambda: self.text("#typing") == XSS + " is typing…", what="the typing line")
        self.assertFalse(self.qs("#typing img"))
        self.fake.push(dict(ev, typing=False))
        self.wait(lambda: self.text("#typing") == "", timeout=3, what="typing:false")
        self.fake.push(ev)
        t0 = time.monotonic()
        self.wait(lambda: self.text("#typing") != "", what="typing again")
        self.wait(lambda: self.text("#typing") == "", timeout=10, what="the line to expire")
        self.assertGreater(time.monotonic() - t0, 4, "expired too soon")
        # two in a group; the message of one ends their line
        self.open_conv("g:%d" % web_standin.GROUP)
        for uid, name in ((web_standin.CAT, "cat"), (web_standin.BOB, "bob")):
            self.fake.push({"msgid": 18, "id": uid, "name": name, "groupid": web_standin.GROUP})
        self.wait(lambda: self.text("#typing") == "cat and bob are typing…", what="two typing")
        self.fake.push({"msgid": 10, "id": web_standin.CAT, "name": "cat",
                        "groupid": web_standin.GROUP, "msg": "done typing"})
        self.wait(lambda: self.text("#typing") == "bob is typing…", what="cat's line gone")
        self.no_alert()

    def test_3_typing_sent_throttled(self):
        self.open_conv("g:%d" % web_standin.GROUP)
        n = len(self.fake.got)
        box = self.q("#message-input")
        box.send_keys("hel")
        self.wait(lambda: self.fake.sent(18, n), what="TYPING sent")
        box.send_keys("lo group")
        self.assertTrue(web_standin.wait_quiet(lambda: len(self.fake.sent(18, n)) > 1, 1),
                        "a second TYPING within 3 s")
        t = self.fake.sent(18, n)[0]
        self.assertEqual((t.get("groupid"), t.get("proto"), "typing" in t),
                         (web_standin.GROUP, 2, False), t)
        box.send_keys(Keys.ENTER)
        self.wait(lambda: self.fake.sent(10, n), what="the message")
        seq = [(m["msgid"], m.get("typing")) for m in self.fake.got[n:] if m["msgid"] in (10, 18)]
        self.assertEqual(seq, [(18, None), (18, False), (10, None)])
        # typing again, then leaving the composer: typing:false
        n = len(self.fake.got)
        box.send_keys("x")
        self.wait(lambda: self.fake.sent(18, n), what="TYPING again")
        self.q("#members-toggle").click()
        self.wait(lambda: [m.get("typing") for m in self.fake.sent(18, n)] == [None, False],
                  what="typing:false on blur")
        self.q("#members-toggle").click()
        box.clear()

    def test_4_group_ticks(self):
        self.open_conv("g:%d" % web_standin.GROUP)
        self.say("ticks please")
        conv = "g%d" % web_standin.GROUP
        cseq = int(self.attrs("#messages .msg.mine", "data-cseq")[-1])
        self.assertEqual(self.ticks()[-1:], [])  # no group receipts seen yet: no tick
        self.fake.push({"msgid": 17, "id": web_standin.BOB, "conv": conv, "delivered": cseq})
        self.wait(lambda: self.ticks()[-1:] == ["sent"], what="one member of two: sent")
        self.fake.push({"msgid": 17, "id": web_standin.CAT, "conv": conv, "delivered": cseq})
        self.wait(lambda: self.ticks()[-1:] == ["delivered to everyone"], what="delivered to all")
        self.fake.push({"msgid": 17, "id": web_standin.CAT, "conv": conv, "all_read": cseq})
        self.wait(lambda: self.ticks()[-1:] == ["read by everyone"], what="read by all")
        self.shots("standin-group-ticks")

    def test_5_other_device(self):
        key = "u:%d" % web_standin.BOB
        self.open_conv("g:%d" % web_standin.GROUP)
        self.fake.push({"msgid": 6, "id": web_standin.ME, "name": "me", "toid": web_standin.BOB,
                        "msg": "from my phone"})
        self.wait(lambda: self.qs('.conv-item[data-key="%s"]' % key) and
                  self.text('.conv-item[data-key="%s"] .conv-preview' % key) == "from my phone",
                  what="our message from another device")
        self.assertEqual(self.unread(key), 0)
        self.open_conv(key)
        self.wait(lambda: self.attrs("#messages .msg.mine .msg-text")[-1:] == ["from my phone"],
                  what="shown as ours")

    def test_6_notices(self):
        n = self.fake.connections
        self.fake.push({"msgid": 12, "errno": 116, "errmsg": "logged in elsewhere"})
        self.wait(lambda: self.text("#conn").startswith("signed in elsewhere"), what="parked")
        self.assertTrue(web_standin.wait_quiet(lambda: self.fake.connections > n, 3),
                        "reconnected after 116")
        self.q("#reconnect").click()
        self.wait(lambda: self.fake.connections == n + 1 and self.text("#conn") == "online",
                  what="Reconnect")
        self.fake.push({"msgid": 12, "errno": 119, "errmsg": "draining, reconnect elsewhere"})
        self.wait(lambda: self.fake.connections == n + 2 and self.text("#conn") == "online",
                  what="a new connection after 119")
        self.no_csp_violation()


if __name__ == "__main__":
    unittest.main()
