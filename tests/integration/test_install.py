"""`make install` and an out-of-tree plugin built against the installed
header with pkg-config (contrib/example-plugin), loaded by the real chatd.
Also checks that every plugin .so exports exactly one dynamic symbol."""
import glob
import os
import shutil
import subprocess
import tempfile
import unittest

from harness import CHATD, CHAT_SRC, PLUGIN_DIR, TEST_PLUGIN_DIR, Client, Node


def dynamic_symbols(so):
    out = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True,
                         text=True, check=True).stdout
    return sorted(line.split()[-1] for line in out.splitlines() if line.strip())


class ExportTest(unittest.TestCase):
    def test_each_plugin_exports_one_symbol(self):
        sos = glob.glob(os.path.join(PLUGIN_DIR, "*.so"))
        sos += glob.glob(os.path.join(TEST_PLUGIN_DIR, "v1", "*.so"))
        self.assertGreaterEqual(len(sos), 2)
        for so in sos:
            self.assertEqual(dynamic_symbols(so), ["chat_plugin_entry"], so)


class InstallTest(unittest.TestCase):
    def setUp(self):
        self.prefix = tempfile.mkdtemp(prefix="chatd-install-")

    def tearDown(self):
        shutil.rmtree(self.prefix, ignore_errors=True)

    def test_install_and_out_of_tree_plugin(self):
        build = os.path.dirname(CHATD)
        subprocess.run(["cmake", "--install", build, "--prefix", self.prefix],
                       check=True, capture_output=True)
        self.assertTrue(os.access(os.path.join(self.prefix, "bin", "chatd"), os.X_OK))
        self.assertTrue(os.path.exists(
            os.path.join(self.prefix, "include", "chat", "plugin.h")))
        pcs = glob.glob(os.path.join(self.prefix, "**", "chatd-plugin.pc"),
                        recursive=True)
        self.assertEqual(len(pcs), 1)
        plugins = glob.glob(os.path.join(self.prefix, "**", "chatd", "plugins",
                                         "login.so"), recursive=True)
        self.assertEqual(len(plugins), 1, "business plugins installed")

        src = os.path.join(self.prefix, "hello-src")
        shutil.copytree(os.path.join(CHAT_SRC, "contrib", "example-plugin"), src)
        env = dict(os.environ, PKG_CONFIG_PATH=os.path.dirname(pcs[0]))
        # only the installed header may be found: no -I into the source tree
        cflags = subprocess.run(["pkg-config", "--cflags", "chatd-plugin"], env=env,
                                capture_output=True, text=True, check=True).stdout
        self.assertNotIn(CHAT_SRC, cflags)
        subprocess.run(["make", "-C", src, "CFLAGS=-O2 -Wall -Wextra -Werror"],
                       env=env, check=True, capture_output=True)
        so = os.path.join(src, "hello.so")
        self.assertEqual(dynamic_symbols(so), ["chat_plugin_entry"])

        node = Node(None, plugins=("hello",), plugin_dir=src, redis=False,
                    mysql=False, conf={"plugin.hello": {"greeting": "hi there"}})
        with Client(node.port) as c:
            c.send({"msgid": 500})
            r = c.recv()
            self.assertEqual((r["msgid"], r["greeting"], r["logins"]),
                             (501, "hi there", 0))
        self.assertEqual(node.stop(), 0)


if __name__ == "__main__":
    unittest.main()
