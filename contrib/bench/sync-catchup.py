#!/usr/bin/python3
"""How long a device that missed N durable messages takes to SYNC them.

Starts a chatd (and MariaDB and Redis) with tests/integration/harness.py,
registers two users, sends N protocol-2 messages with a cid from one to the
other while the other is offline (a window of 200 in flight), then logs the
receiver in three times and times SYNC until "more" is false, checking that
every message came once, in order.  Last, what the messages take on disk
(InnoDB's data and index lengths of `messages` after ANALYZE TABLE).

    /usr/bin/python3 contrib/bench/sync-catchup.py [N [SYNC_LIMIT_MAX]]

(defaults 10000 and 500; build first: make build CI=true).  Used for the
catch-up figure in docs/benchmarks.md.
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
os.environ.setdefault("CHAT_SRC", ROOT)

from harness import Node, Stack  # noqa: E402
from test_durable import FAST, PLUGINS, client2, login2, pump, sync_all  # noqa: E402


def main():
    n_msgs = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    conf = dict(FAST)
    conf["plugin.store"] = {"sync_limit_max": limit}
    st = Stack()
    node = Node(st, plugins=PLUGINS, conf=conf)
    c = client2(node)
    a, b = c.register("a", "pw"), c.register("b", "pw")
    c.close()
    ca = login2(node, a)
    msgs = [(i + 1, {"msgid": 6, "toid": b, "msg": "message number %05d with some text" % i,
                     "cid": "c%d" % i}) for i in range(n_msgs)]
    t = time.monotonic()
    acks = pump(ca, msgs, window=200, timeout=30)
    assert len(acks) == n_msgs and all(r["errno"] == 0 for r in acks.values())
    print("sent %d durable messages in %.2f s" % (n_msgs, time.monotonic() - t))
    for _ in range(3):
        cb = login2(node, b)
        t0 = time.monotonic()
        got, _, pages = sync_all(cb)
        dt = time.monotonic() - t0
        assert [m["cseq"] for m in got] == list(range(1, n_msgs + 1))
        print("sync of %d missed messages: %.3f s in %d pages (limit %d)"
              % (n_msgs, dt, pages, limit))
        cb.close()
    st.sql(node.db, "ANALYZE TABLE messages")
    (body, n), = st.sql(node.db, "SELECT AVG(LENGTH(body)), COUNT(*) FROM messages")
    (data, index), = st.sql(node.db, "SELECT data_length, index_length FROM "
                            "information_schema.tables WHERE table_schema = DATABASE() "
                            "AND table_name = 'messages'")
    print("disk: %s messages, body %.0f bytes on average: data %s bytes, index %s "
          "bytes, %.0f bytes a message" % (n, float(body), data, index,
                                           (int(data) + int(index)) / int(n)))
    node.stop()


if __name__ == "__main__":
    main()
