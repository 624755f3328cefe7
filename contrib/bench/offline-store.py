#!/usr/bin/python3
"""How fast the offline plugin stores a burst, for two builds of its plugins.

Starts MariaDB and Redis with tests/integration/harness.py; for each run and
each of two plugin folders in turn, a fresh chatd, a legacy sender and an
offline recipient.  One warm-up message first (one2one then knows the
recipient exists), then N messages in one write; the figure is N over the
time from that write until all N rows are committed (polled every 20 ms).
Quotas and queue shares are off so that every message is stored.

    /usr/bin/python3 contrib/bench/offline-store.py DIR_A DIR_B [N [RUNS]]

(defaults 30000 and 5).  DIR_A/DIR_B are plugin folders, e.g. build/plugins
and a copy holding another build's offline.so.  Prints each run, the
medians and B/A.  Used for the offline figure in docs/benchmarks.md.
"""
import os
import statistics
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
os.environ.setdefault("CHAT_SRC", ROOT)

from harness import Client, Node, Stack, wait_for  # noqa: E402

CONF = {"plugin.login": {"hash_cost": 1},
        "plugin.offline": {"stored_max": 0, "stored_per_sender_max": 0,
                           "queue_sender_max_bytes": 1 << 30,
                           "queue_user_max_bytes": 1 << 30}}


def one_run(stack, plugin_dir, n):
    node = Node(stack, plugin_dir=plugin_dir, conf=CONF)
    try:
        c = Client(node.port, proto=2)
        b = c.register("u_" + uuid.uuid4().hex[:10], "pw")
        name = "s_" + uuid.uuid4().hex[:10]
        a = c.register(name, "pw")
        c.close()
        s = Client(node.port)
        s.login(a, "pw")
        msg = {"msgid": 6, "id": a, "name": name, "toid": b, "time": "2026-12-05 12:00:00"}
        q = "SELECT COUNT(*) FROM offline_messages WHERE user_id = %d" % b
        s.send(dict(msg, msg="warm"))
        wait_for(lambda: int(stack.sql(node.db, q)[0][0]) == 1, what="the warm-up row")
        data = b"".join(s.encode(dict(msg, msg="m%d" % i)) for i in range(n))
        s.sock.setblocking(True)
        t0 = time.monotonic()
        s.sock.sendall(data)
        while int(stack.sql(node.db, q)[0][0]) < n + 1:
            if time.monotonic() - t0 > 120:
                raise SystemExit("rows stuck short of %d" % (n + 1))
            time.sleep(0.02)
        dt = time.monotonic() - t0
        s.close()
        return n / dt
    finally:
        node.stop()


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    dirs = {"A": os.path.abspath(sys.argv[1]), "B": os.path.abspath(sys.argv[2])}
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 30000
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    stack = Stack()
    res = {"A": [], "B": []}
    for r in range(runs):
        for k in ("A", "B"):  # interleaved: drift hits both alike
            rate = one_run(stack, dirs[k], n)
            res[k].append(rate)
            print("%s run %d: %.0f messages/s" % (k, r, rate), flush=True)
    for k in ("A", "B"):
        print("%s %s: median %.0f messages/s %s" % (k, dirs[k], statistics.median(res[k]),
                                                    [round(x) for x in res[k]]))
    print("B/A %.3f" % (statistics.median(res["B"]) / statistics.median(res["A"])))


if __name__ == "__main__":
    main()
