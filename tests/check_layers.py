#!/usr/bin/python3
"""check_layers.py - the core calls down, never up (docs/architecture.md).

Usage: check_layers.py OBJECT...   (the object files of chatcore and chatd)

LAYERS below is the one table of the core's layers, bottom to top, with the
file and the name prefix of each subsystem.  For every object, `nm -u`
lists the symbols it uses; a symbol defined by an object of a higher layer
is an upward call and fails the test.  Within the layer of net, db and bus
the files may not use each other either: they meet only through the
callbacks main.c registers (wire.c); files of one subsystem (GROUPS: db.c
and migrate.c; a transport beside net.c) may.  An object missing from the
table fails too, so a new core file has to be given its place, and so
does a reference to uv_default_loop() from anything but main.c (the loop
is injected everywhere else).  The subsystem map atop core/core.h must list
each file under the same layer number (1 = the bottom).
"""
import os
import re
import subprocess
import sys

CORE_H = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "core",
                      "core.h")

# (layer, isolated, {file: prefix}) from the bottom up.
LAYERS = [
    ("leaf utilities", False, {
        "alloc": "mem_", "log": "log_", "map": "map_", "frame": "frame_",
        "jsonstr": "json_", "conf": "conf_", "metrics": "metrics_",
        "sdnotify": "sdn_", "defer": "defer_", "admin_http": "adm_",
        "rlbucket": "rl_", "ws": "ws_", "webfiles": "web_",
        "proxyproto": "pp_"}),
    ("net, db and bus", True, {
        "net": "net_", "tls": "tls_", "wstr": "wstr_", "db": "db_", "migrate": "db_", "bus": "bus_"}),
    ("sessions, dispatch and the login ack", False, {
        "session": "sess_", "dispatch": "disp_", "loginack": "ack_",
        "ratelimit": "rl_"}),
    ("the plugin registry", False, {"plugin": "plug_"}),
    ("the host table", False, {"host": "host_"}),
    ("main, its wiring and the admin listener", False, {
        "wire": "wire_", "main": "", "admin": "admin_"}),
]
# Files of an isolated layer that form one subsystem (default: the file alone).
# A transport of net (tls.c, wstr.c: issue 9) goes into the group "net".
GROUPS = {"migrate": "db", "tls": "net", "wstr": "net"}
# Only main.c may take the default loop; the rest get theirs injected.
LOOP_OWNERS = {"main"}


def layer_of():
    where = {}
    for i, (_, isolated, files) in enumerate(LAYERS):
        for f in files:
            where[f] = (i, isolated)
    return where


def unit(path):
    base = os.path.basename(path)
    for ext in (".c.o", ".o", ".obj"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def nm(path, *flags):
    out = subprocess.run(["nm", *flags, path], check=True, capture_output=True,
                         text=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


def check_map(where):
    """The map atop core.h: ' * N ...' starts layer N; every x.c after it
    belongs to that layer."""
    text = open(CORE_H, encoding="utf-8").read()
    head = text[: text.index("#ifndef")]
    layer, seen, errors = None, {}, []
    for line in head.splitlines():
        m = re.match(r"^ \* (\d) ", line)
        if m:
            layer = int(m.group(1)) - 1
        for f in re.findall(r"\b([a-z_]+)\.c\b", line):
            if layer is not None:
                seen.setdefault(f, layer)
    for f, (i, _) in sorted(where.items()):
        if seen.get(f) != i:
            errors.append(f"core/core.h: the map puts {f}.c in layer "
                          f"{'none' if f not in seen else seen[f] + 1}, "
                          f"the table in layer {i + 1} ({LAYERS[i][0]})")
    return errors


def main(objs):
    where = layer_of()
    defined, used, errors = {}, {}, check_map(where)
    for o in objs:
        u = unit(o)
        if u not in where:
            errors.append(f"{u}: not in the layer table of {sys.argv[0]}")
            continue
        for sym in nm(o, "--defined-only", "-g"):
            defined[sym] = u
        used[u] = nm(o, "-u")
    if not used:
        errors.append("no object files given")
    for u, syms in sorted(used.items()):
        lu, isolated = where[u]
        for sym in syms:
            if sym == "uv_default_loop" and u not in LOOP_OWNERS:
                errors.append(f"{u}.c: uv_default_loop() outside main.c")
            d = defined.get(sym)
            if d is None or d == u:
                continue
            ld = where[d][0]
            if ld > lu:
                errors.append(f"{u}.c ({LAYERS[lu][0]}) calls {sym} of {d}.c "
                              f"({LAYERS[ld][0]}): upward")
            elif ld == lu and isolated and GROUPS.get(u, u) != GROUPS.get(d, d):
                errors.append(f"{u}.c calls {sym} of {d}.c: {LAYERS[lu][0]} "
                              "meet only through callbacks")
    for e in errors:
        print(e)
    print(f"{len(used)} objects, {len(errors)} layering errors")
    return 1 if errors else 0


if __name__ == "__main__":
    # ctest hands $<TARGET_OBJECTS:...> over as one ';'-separated list
    sys.exit(main([o for a in sys.argv[1:] for o in a.split(";") if o]))
