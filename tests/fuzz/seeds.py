#!/usr/bin/python3
"""seeds.py - writes the seed corpora of the plugin fuzz targets
(corpus_<name>/) from the examples in docs/protocol.md.

Each seed is byte 0 (session state, see fuzz_plugin.c), byte 1 (the cut)
and a stream of frames.  Every example is written in the states that make
sense for it (logged in or not, protocol 2 or legacy, the peer online or
not), alone and, per target, all of them in one stream.  Run it from
anywhere; it rewrites only the seed-* files, so inputs the fuzzer found and
kept (other names) stay.

    /usr/bin/python3 tests/fuzz/seeds.py
"""
import hashlib
import itertools
import os

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO2, LOGGED, PEER, BYTEWISE = 1, 2, 4, 8

LOGIN = [
    '{"msgid":4,"name":"alice","password":"secret"}',
    '{"msgid":4,"name":"alice","password":"x"}',
    '{"msgid":4,"proto":2,"seq":1,"name":"carol","password":"pw"}',
    '{"msgid":4,"proto":2,"seq":4,"name":"' + "x" * 65 + '","password":"pw"}',
    '{"msgid":4,"proto":2,"seq":5,"name":"a\\u0000b","password":""}',
    '{"msgid":1,"id":1,"password":"wrong"}',
    '{"msgid":1,"id":1,"password":"secret"}',
    '{"msgid":1,"proto":2,"seq":10,"id":3,"password":"nope"}',
    '{"msgid":1,"proto":2,"seq":12,"id":3,"password":"pw"}',
    '{"msgid":1,"proto":2,"seq":1,"id":3,"token":"'
    '42089920518e36b31d89571555dbe49d180b0e99cee9fc066a2a9e5c74e6a2db"}',
    '{"msgid":1,"proto":2,"seq":2,"id":3,"token":"zz"}',
    '{"msgid":3,"id":7}',
    '{"msgid":3,"id":1}',
    '{"msgid":3,"proto":2,"seq":16,"id":7}',
    '{"msgid":3,"proto":2,"seq":8}',
]
FRIEND = [
    '{"msgid":7,"id":7,"friendid":8}',
    '{"msgid":7,"proto":2,"seq":42,"id":7,"friendid":8}',
    '{"msgid":7,"seq":43,"id":7,"friendid":7}',
    '{"msgid":7,"proto":2,"seq":44,"id":7,"friendid":"8"}',
    '{"msgid":7,"proto":2,"seq":45,"friendid":-1}',
    '{"msgid":13,"proto":2,"seq":48}',
    '{"msgid":13,"seq":49,"id":7}',
]
ONE2ONE = [
    '{"msgid":6,"id":7,"name":"alice","toid":8,"msg":"hi bob",'
    '"time":"2024-05-01 12:00:00"}',
    '{"msgid":6,"proto":2,"seq":41,"id":7,"name":"mallory","toid":8,"msg":"hi",'
    '"time":"12:00"}',
    '{"msgid":6,"proto":2,"seq":42,"id":7,"toid":9,"msg":"see you"}',
    '{"msgid":6,"proto":2,"seq":43,"id":7,"toid":8,"msg":"x","extra":[1,{"a":null}]}',
    '{"msgid":6,"proto":2,"seq":44,"id":7,"toid":0,"msg":"x"}',
    '{"msgid":6,"proto":2,"seq":45,"id":7,"toid":8,"msg":7}',
    '{"msgid":6,"id":7,"name":"alice","toid":8,"msg":"a\\u0000b\\ud83d\\ude00"}',
]
GROUP = [
    '{"msgid":8,"id":7,"groupname":"cats","groupdesc":"all about cats"}',
    '{"msgid":8,"proto":2,"seq":44,"id":7,"groupname":"cats","groupdesc":"all about cats"}',
    '{"msgid":8,"proto":2,"seq":45,"id":7,"groupname":"","groupdesc":null}',
    '{"msgid":9,"id":8,"groupid":3}',
    '{"msgid":9,"proto":2,"seq":45,"id":7,"groupid":3}',
    '{"msgid":9,"proto":2,"seq":46,"id":7,"groupid":77,"userid":8}',
    '{"msgid":10,"id":7,"name":"alice","groupid":3,"msg":"meow",'
    '"time":"2024-05-01 12:01:00"}',
    '{"msgid":10,"proto":2,"seq":47,"id":7,"groupid":3,"msg":"meow"}',
    '{"msgid":10,"proto":2,"seq":48,"id":7,"groupid":3.5,"msg":""}',
    '{"msgid":14,"proto":2,"seq":49}',
]
OFFLINE = [
    '{"msgid":6,"id":7,"name":"alice","toid":9,"msg":"see you"}',
    '{"msgid":6,"proto":2,"seq":41,"id":7,"toid":9,"msg":"again"}',
    '{"msgid":6,"proto":2,"seq":42,"id":7,"toid":8,"msg":"m1"}',
]
TYPING = [
    '{"msgid":18,"proto":2,"seq":9,"toid":8}',
    '{"msgid":18,"proto":2,"seq":10,"id":7,"toid":8,"typing":false}',
    '{"msgid":18,"proto":2,"seq":11,"groupid":5}',
    '{"msgid":18,"proto":2,"seq":12,"groupid":5,"typing":true}',
    '{"msgid":18,"proto":2,"seq":13,"toid":8,"groupid":5}',
    '{"msgid":18,"proto":2,"seq":14,"toid":"8","typing":1}',
    '{"msgid":18,"proto":2,"seq":15,"toid":8,"typing":"no"}',
    '{"msgid":18,"proto":2,"seq":16,"groupid":-1}',
    '{"msgid":18,"toid":8}',
]
TARGETS = {"login": LOGIN, "friend": FRIEND, "one2one": ONE2ONE,
           "group": GROUP, "offline": OFFLINE, "typing": TYPING}


def seed(state, frames, term=b"\0"):
    stream = b"".join(f.encode() + term for f in frames)
    return bytes([state, len(stream) // 2 % 256]) + stream


def seeds(frames):
    out = []
    for f, state in itertools.product(frames, (0, LOGGED, LOGGED | PEER)):
        if '"proto":2' in f:
            state |= PROTO2
        out.append(seed(state, [f]))
    out.append(seed(LOGGED | PEER, frames))
    out.append(seed(LOGGED | PEER | PROTO2 | BYTEWISE, frames[:3], b"\n"))
    out.append(seed(PROTO2, frames, b"\n"))
    return out


def main():
    for name, frames in TARGETS.items():
        d = os.path.join(HERE, "corpus_" + name)
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            if f.startswith("seed-"):
                os.unlink(os.path.join(d, f))
        for s in seeds(frames):
            with open(os.path.join(d, "seed-" + hashlib.sha1(s).hexdigest()[:16]), "wb") as f:
                f.write(s)


if __name__ == "__main__":
    main()
