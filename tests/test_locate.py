"""Where joblet-persist-ctl finds the service's socket (joblet_persist.locate)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import cli, locate
from joblet_persist.config import default_config


class LocateTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="jl", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        self.patch(locate, "SYSTEM_CONFIG", os.path.join(self.dir, "etc-persist.yml"))

    def bind(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        self.addCleanup(s.close)
        return path

    def test_explicit_order(self):
        """--socket beats $JOBLET_PERSIST_SOCKET, which beats --config, which beats
        --data-dir; an explicit choice is used whether or not a socket is there."""
        config = os.path.join(self.dir, "c.yml")
        with open(config, "w") as f:
            f.write("server:\n  grpcSocket: /x/from-config.sock\n")
        env = {locate.SOCKET_ENV: "/x/env.sock"}
        self.assertEqual(locate.locate(socket="/x/s.sock", environ=env).path, "/x/s.sock")
        self.assertEqual(locate.locate(config=config, environ=env).path, "/x/env.sock")
        self.assertEqual(locate.locate(config=config, data_dir="/d", environ={}).path,
                         "/x/from-config.sock")
        found = locate.locate(data_dir="/d", environ={})
        self.assertEqual(found.path, "/d/run/persist-grpc.sock")
        self.assertIn("--data-dir /d", found.source)
        env = {locate.DATA_DIR_ENV: "/e"}
        self.assertEqual(locate.locate(environ=env).path, "/e/run/persist-grpc.sock")
        env = {locate.CONFIG_ENV: config}
        self.assertEqual(locate.locate(environ=env).path, "/x/from-config.sock")

    def test_config_applies_data_dir_like_the_service(self):
        """--config without server.grpcSocket plus --data-dir gives the socket the service
        puts under that data directory; a broken configuration is a LocateError naming it."""
        config = os.path.join(self.dir, "c.yml")
        with open(config, "w") as f:
            f.write("logging:\n  level: info\n")
        found = locate.locate(config=config, data_dir="/srv/p", environ={})
        self.assertEqual(
            found.path, default_config(data_dir="/srv/p").server.grpc_socket
        )
        with open(config, "w") as f:
            f.write("server:\n  grpcSockett: /x\n")
        e = self.assertRaises(locate.LocateError, locate.locate, config=config, environ={})
        self.assertIn("c.yml", str(e))
        self.assertIn("grpcSockett", str(e))

    def test_finds_the_readme_data_dir(self):
        """Without any choice, a socket at ./data/run/persist-grpc.sock (the README's
        --data-dir ./data) is found before the system configuration and the default."""
        path = self.bind(os.path.join(self.dir, "data", "run", "persist-grpc.sock"))
        found = locate.locate(environ={})
        self.assertEqual(found.path, path)
        self.assertIn("README", found.source)

    def test_finds_the_system_configuration(self):
        """Without ./data, the socket named by /etc/joblet/persist.yml is found."""
        path = self.bind(os.path.join(self.dir, "sys", "g.sock"))
        with open(locate.SYSTEM_CONFIG, "w") as f:
            f.write(f"server:\n  grpcSocket: {path}\n")
        self.assertEqual(locate.locate(environ={}).path, path)

    def test_not_found_lists_every_place(self):
        """Nothing found: the error names each place looked at and why it was passed over,
        and how to choose; the CLI exits 5 with that one line and prints nothing else."""
        os.makedirs(os.path.join(self.dir, "data", "run", "persist-grpc.sock"))
        with open(locate.SYSTEM_CONFIG, "w") as f:
            f.write("server: [\n")
        e = self.assertRaises(locate.NotFound, locate.locate, environ={})
        text = str(e)
        self.assertIn(os.path.join(self.dir, "data", "run", "persist-grpc.sock"), text)
        self.assertIn("not a socket", text)
        self.assertIn(locate.SYSTEM_CONFIG, text)
        self.assertIn(default_config().server.grpc_socket, text)
        self.assertIn("--socket", text)
        self.assertIn(locate.SOCKET_ENV, text)
        for name in (locate.SOCKET_ENV, locate.CONFIG_ENV, locate.DATA_DIR_ENV):
            self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != name})
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(cli.main(["ping"], stdout=out, stderr=err), cli.EXIT_UNAVAILABLE)
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(err.getvalue().count("\n"), 1)
        self.assertIn("looked at", err.getvalue())

    def test_cli_options(self):
        """The CLI's --data-dir and --config reach the lookup (before or after the
        command), and an unreachable explicit socket names where it came from."""
        parser = cli.build_parser()
        args = parser.parse_args(["ping", "--data-dir", "/d"])
        self.assertEqual(args.data_dir, "/d")
        args = parser.parse_args(["--config", "/c.yml", "ping"])
        self.assertEqual(args.config, "/c.yml")
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["ping", "--data-dir", self.dir, "--timeout", "1"], stdout=out,
                        stderr=err)
        self.assertEqual(code, cli.EXIT_UNAVAILABLE)
        self.assertIn(f"--data-dir {self.dir}", err.getvalue())
        self.assertIn(os.path.join(self.dir, "run", "persist-grpc.sock"), err.getvalue())
