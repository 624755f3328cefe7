"""The authentication cache (issue 12, the failover login storm).

After a successful password verification the login plugin stores
HMAC-SHA256(secret, id, stored hash, password) in Redis; a later login of
that user whose HMAC matches skips the slow yescrypt verification, on any
node sharing the secret.  Observed through the counter
chatd_login_auth_cache_total{result="hit"|"miss"|"stored"} on each node's
/metrics, and the key chatd:kv:login:u:<id> in Redis.

Two nodes share one database, one Redis and one secret (random per class,
so entries another test or run left in the shared Redis never match).
Every test needs a hit that only the cache can produce, so each fails with
the cache switched off: run with CHAT_TEST_AUTH_CACHE_TTL=0 (the cache's
own off switch), or against a build without the cache (main).
"""

import os
import re
import secrets
import sys
import unittest
import urllib.request

from harness import Client, Node, Stack, wait_for

TTL = os.environ.get("CHAT_TEST_AUTH_CACHE_TTL", "3600")


def cache_count(node, result):
    """chatd_login_auth_cache_total{result=...} on node (0 when absent)."""
    url = "http://127.0.0.1:%d/metrics" % node.admin_port
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("chatd_login_auth_cache_total{") and \
                'result="%s"' % result in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


class AuthCacheTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.stack = Stack()
        cls.secret = secrets.token_hex(32)
        conf = {"plugin.login": {"auth_cache_secret": cls.secret,
                                 "auth_cache_ttl": TTL}}
        cls.a = Node(cls.stack, conf=conf)
        cls.b = Node(cls.stack, db=cls.a.db, conf=conf, migrate=False)
        cls.n = 0

    @classmethod
    def tearDownClass(cls):
        for node in (cls.a, cls.b):
            if node.running():
                node.stop()

    def run(self, result=None):
        before = len(result.failures) + len(result.errors) if result else 0
        out = super().run(result)
        if result and len(result.failures) + len(result.errors) > before:
            for node in (self.a, self.b):
                sys.stderr.write("---- %s (tail)\n%s\n" % (node.log_path,
                                                          node.log_tail(40)))
        return out

    # -- helpers ---------------------------------------------------------

    def user(self, password="pw-right-1"):
        type(self).n += 1
        with Client(self.a.port) as c:
            uid = c.register("ac%d-%s" % (self.n, secrets.token_hex(3)), password)
        return uid

    def login(self, node, uid, password, keep=False):
        """A legacy login on node: the ack (and the client when keep)."""
        c = Client(node.port)
        ack = c.login(uid, password)
        if keep:
            return ack, c
        c.close()
        if ack.get("errno") == 0:  # the session is gone before the next login
            wait_for(lambda: self.offline(node, uid), timeout=10,
                     what="user %d's session to end" % uid)
        return ack

    def offline(self, node, uid):
        return self.stack.redis_cli("EXISTS", "chatd:user:%d" % uid) == "0"

    def key(self, uid):
        return "chatd:kv:login:u:%d" % uid

    def cached_login(self, node, uid, password):
        """A first login that must end with an entry in Redis."""
        stored = cache_count(node, "stored")
        self.assertEqual(self.login(node, uid, password)["errno"], 0)
        wait_for(lambda: cache_count(node, "stored") > stored, timeout=5,
                 what="the auth cache entry to be stored")
        self.assertEqual(self.stack.redis_cli("EXISTS", self.key(uid)), "1")

    def assert_hit(self, node, uid, password):
        hits = cache_count(node, "hit")
        self.assertEqual(self.login(node, uid, password)["errno"], 0)
        self.assertEqual(cache_count(node, "hit"), hits + 1,
                         "the login was not answered from the auth cache")

    def assert_miss(self, node, uid, password, errno):
        hits, misses = cache_count(node, "hit"), cache_count(node, "miss")
        self.assertEqual(self.login(node, uid, password)["errno"], errno)
        self.assertEqual(cache_count(node, "hit"), hits, "unexpected cache hit")
        self.assertEqual(cache_count(node, "miss"), misses + 1)

    # -- tests -----------------------------------------------------------

    def test_relogin_after_restart_hits(self):
        uid = self.user()
        self.cached_login(self.a, uid, "pw-right-1")
        self.a.kill()
        self.a.wait()
        self.a.restart()
        self.assert_hit(self.a, uid, "pw-right-1")

    def test_other_node_hits(self):
        uid = self.user()
        self.cached_login(self.a, uid, "pw-right-1")
        self.assert_hit(self.b, uid, "pw-right-1")

    def test_wrong_password_never_hits(self):
        uid = self.user()
        self.cached_login(self.a, uid, "pw-right-1")
        for wrong in ("pw-right-2", "pw-right-1 ", "", "PW-RIGHT-1"):
            self.assert_miss(self.a, uid, wrong, 1)
            self.assert_miss(self.b, uid, wrong, 1)
        self.assert_hit(self.b, uid, "pw-right-1")  # the entry is still there

    def test_stored_hash_change_invalidates(self):
        uid = self.user("old-password")
        self.cached_login(self.a, uid, "old-password")
        # a password change as an operator or a tool does it: a new users row
        # hash (another user's hash of "new-password")
        other = self.user("new-password")
        self.stack.sql(self.a.db, "UPDATE users SET pwhash = (SELECT pwhash FROM "
                       "(SELECT pwhash FROM users WHERE id = %d) o) WHERE id = %d"
                       % (other, uid))
        self.assert_miss(self.a, uid, "old-password", 1)
        self.assert_miss(self.b, uid, "new-password", 0)  # slow, then stored
        self.assert_hit(self.a, uid, "new-password")
        # the same password hashed again (a new salt): the old entry misses too
        again = self.user("new-password")
        self.stack.sql(self.a.db, "UPDATE users SET pwhash = (SELECT pwhash FROM "
                       "(SELECT pwhash FROM users WHERE id = %d) o) WHERE id = %d"
                       % (again, uid))
        self.assert_miss(self.a, uid, "new-password", 0)
        self.assert_hit(self.b, uid, "new-password")

    def test_logout_invalidates(self):
        uid = self.user()
        self.cached_login(self.a, uid, "pw-right-1")
        ack, c = self.login(self.b, uid, "pw-right-1", keep=True)
        self.assertEqual(ack["errno"], 0)
        c.send({"msgid": 3, "id": uid})
        wait_for(lambda: self.stack.redis_cli("EXISTS", self.key(uid)) == "0",
                 timeout=5, what="the logout to delete the cache entry")
        c.close()
        wait_for(lambda: self.offline(self.b, uid), timeout=10)
        self.assert_miss(self.a, uid, "pw-right-1", 0)
        self.assert_hit(self.a, uid, "pw-right-1")  # stored again by that login


if __name__ == "__main__":
    unittest.main()
