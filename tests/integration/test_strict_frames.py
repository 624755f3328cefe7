"""Regression tests for the request checks of issue 14 (defects 1, 7, 10, 11),
against the real chatd, MariaDB and Redis:

  1  a duplicate key spelled with escapes ("i\\u0064") must not let a sender
     forge "id"/"name" or turn a one-to-one message into a group message;
  7  a frame with thousands of members is refused at once (max_members),
     and the duplicate check is linear;
 10  bytes that are not UTF-8 are refused at the strict scan (errno 104) and
     never forwarded or stored;
 11  "seq" is echoed as the exact integer, or refused when a double cannot
     hold it.
"""
import json
import time
import unittest

from harness import Client
from test_one2one import ChatCase, is_msg, recv_raw_line


class StrictFrames(ChatCase):

    def raw_frame(self, user, text, term=b"\n"):
        user.c.send_raw(text.encode("utf-8", "surrogateescape") + term
                        if isinstance(text, str) else text + term)

    # --- 1: forged sender and msgid ------------------------------------
    def test_escaped_duplicate_id_and_name_cannot_forge_the_sender(self):
        a, b, carol = self.user(), self.user(), self.user()
        forged = ('{"msgid":6,"id":%d,"name":"%s","toid":%d,"msg":"pay carol",'
                  '"i\\u0064":%d,"n\\u0061me":"%s"}' % (a.id, a.name, b.id, carol.id,
                                                       carol.name))
        self.raw_frame(a, forged)
        # whatever reaches bob, a parser keeping the last duplicate must see
        # alice as the sender; chatd refuses the frame, so nothing comes
        a.c.send(a.one(b.id, "marker"))
        got = json.loads(recv_raw_line(b.c))
        self.assertEqual((got["id"], got["name"]), (a.id, a.name), got)
        self.assertEqual(got["msg"], "marker", "the forged frame was forwarded: %r" % got)

    def test_proto2_duplicate_key_gets_104(self):
        a, b = self.user(proto=2), self.user()
        frame = ('{"proto":2,"seq":41,"msgid":6,"id":%d,"toid":%d,"msg":"x",'
                 '"i\\u0064":1}' % (a.id, b.id))
        self.raw_frame(a, frame)
        r = a.c.recv()
        self.assertEqual((r["msgid"], r["errno"], r.get("seq")), (11, 104, 41), r)
        self.assertIn("repeats", r["errmsg"])
        b.c.expect_nothing(0.3)

    def test_escaped_msgid_cannot_turn_chat_into_group_chat(self):
        a, b = self.user(), self.user()
        frame = ('{"msgid":6,"id":%d,"name":"%s","toid":%d,"msg":"m",'
                 '"m\\u0073gid":10,"groupid":1}' % (a.id, a.name, b.id))
        self.raw_frame(a, frame)
        a.c.send(a.one(b.id, "marker"))
        got = json.loads(recv_raw_line(b.c))
        self.assertEqual((got["msgid"], got["msg"]), (6, "marker"), got)

    # --- 7: many members -------------------------------------------------
    def test_frame_with_thousands_of_members_is_refused(self):
        a, b = self.user(proto=2), self.user()
        members = ",".join('"%d":0' % i for i in range(5900))
        frame = '{"msgid":6,"id":%d,"toid":%d,"msg":"x",%s}' % (a.id, b.id, members)
        self.assertLess(len(frame), 65536)
        t0 = time.monotonic()
        for _ in range(20):
            self.raw_frame(a, frame)
        for _ in range(20):
            r = a.c.recv(timeout=10)
            self.assertEqual((r["msgid"], r["errno"]), (11, 104), r)
            self.assertIn("too many members", r["errmsg"])
        elapsed = time.monotonic() - t0
        b.c.expect_nothing(0.2)
        # the loop stays responsive: a normal request right after
        self.expect_ack(a, a.one(b.id, "still here"))
        self.assertEqual(b.c.recv_until(is_msg(6))["msg"], "still here")
        print("20 frames of 5,900 members refused in %.3f s" % elapsed)

    def test_members_up_to_the_limit_pass(self):
        a, b = self.user(proto=2), self.user()
        extra = ",".join('"k%d":%d' % (i, i) for i in range(100))
        frame = ('{"proto":2,"seq":5,"msgid":6,"id":%d,"toid":%d,"msg":"ok",%s}'
                 % (a.id, b.id, extra))
        self.raw_frame(a, frame)
        r = a.c.recv()
        self.assertEqual((r["errno"], r["seq"]), (0, 5), r)
        self.assertEqual(b.c.recv_until(is_msg(6))["k99"], 99)

    # --- 10: UTF-8 -------------------------------------------------------
    def test_invalid_utf8_name_cannot_register(self):
        with Client(self.node.port, proto=2) as c:
            c.request({"msgid": 999})  # the session speaks protocol 2
            c.send_raw(b'{"proto":2,"seq":1,"msgid":4,"name":"evil\xff\xfe","password":"pw"}\n')
            r = c.recv()
            self.assertEqual((r["errno"], r.get("seq")), (104, None), r)
            self.assertIn("UTF-8", r["errmsg"])
        rows = self.stack.sql(self.node.db, "SELECT COUNT(*) FROM users WHERE name LIKE 'evil%'")
        self.assertEqual(rows, [("0",)])

    def test_invalid_utf8_message_is_not_forwarded(self):
        a, b = self.user(proto=2), self.user()
        frame = (b'{"proto":2,"seq":3,"msgid":6,"id":%d,"toid":%d,"msg":"bad \xc0\xaf"}'
                 % (a.id, b.id))
        self.raw_frame(a, frame)
        r = a.c.recv()
        self.assertEqual((r["msgid"], r["errno"]), (11, 104), r)
        b.c.expect_nothing(0.3)
        # legacy sender: nothing forwarded either, the connection stays
        c = self.user()
        self.raw_frame(c, b'{"msgid":6,"id":%d,"name":"%s","toid":%d,"msg":"\xed\xa0\x80"}'
                       % (c.id, c.name.encode(), b.id), term=b"\0")
        c.c.send(c.one(b.id, "after"))
        self.assertEqual(json.loads(recv_raw_line(b.c))["msg"], "after")

    def test_valid_utf8_passes_byte_for_byte(self):
        a, b = self.user(proto=2), self.user()
        text = "caf\u00e9 \u20ac \U0001F600 \U0010FFFF"
        self.expect_ack(a, a.one(b.id, text))
        self.assertEqual(b.c.recv_until(is_msg(6))["msg"], text)

    # --- 11: seq ---------------------------------------------------------
    def test_seq_is_echoed_exactly(self):
        with Client(self.node.port, proto=2) as c:
            for seq in (9007199254740991, -9007199254740991, 0, 1):
                c.send_raw(b'{"proto":2,"seq":%d,"msgid":999}\n' % seq)
                line = recv_raw_line(c)
                self.assertIn(b'"seq":%d,' % seq, line)

    def test_seq_a_double_cannot_hold_is_refused(self):
        with Client(self.node.port, proto=2) as c:
            for seq in (b"9007199254740993", b"4611686018427387903", b"1.5", b'"7"'):
                c.send_raw(b'{"proto":2,"seq":%s,"msgid":999}\n' % seq)
                line = recv_raw_line(c)
                r = json.loads(line)
                self.assertEqual(r["errno"], 104, line)
                self.assertNotIn("seq", r, line)
                self.assertIn("seq", r["errmsg"])


if __name__ == "__main__":
    unittest.main()
