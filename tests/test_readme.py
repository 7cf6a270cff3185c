"""The README's run instructions and the CLI agree: the socket the README's service listens
on is where joblet-persist-ctl looks first, and the README's commands are the ones CI runs."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import cli, locate
from joblet_persist.config import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _section(text, title):
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def _blocks(section):
    return re.findall(r"```sh\n(.*?)```", section, re.S)


class ReadmeTests(SynchronousTestCase):
    def setUp(self):
        self.readme = _read("README.md")
        self.run = _section(self.readme, "Run it")
        words = shlex.split(_blocks(self.run)[0])
        self.service_args = words[words.index("joblet-persist") + 1:]

    def test_run_command_and_cli_discovery_agree(self):
        """The README runs the service with --data-dir D; the admin socket the service then
        uses (config.py's rule) is the CLI's first place to look from the same directory,
        and the README's listener table names that path."""
        self.assertIn("--data-dir", self.service_args)
        data_dir = self.service_args[self.service_args.index("--data-dir") + 1]
        self.assertEqual(data_dir, locate.README_DATA_DIR)
        cwd = os.getcwd()
        here = tempfile.mkdtemp(prefix="jr", dir="/tmp")
        self.addCleanup(shutil.rmtree, here, True)
        os.chdir(here)
        self.addCleanup(os.chdir, cwd)
        service_socket = default_config(data_dir=data_dir).server.grpc_socket
        self.assertEqual(locate.candidates()[0].path, service_socket)
        shown = os.path.join(data_dir, "run", os.path.basename(service_socket))
        self.assertIn(f"| gRPC, admin (no TLS) | `{shown}`", self.run)

    def test_cli_instructions_need_no_flag(self):
        """The README's CLI example is a plain `joblet-persist-ctl ping` the parser
        accepts, with no --socket (discovery does the rest)."""
        commands = [b for b in _blocks(self.run) if "joblet-persist-ctl" in b]
        self.assertEqual(len(commands), 1, commands)
        argv = shlex.split(commands[0])
        self.assertNotIn("--socket", argv)
        args = cli.build_parser().parse_args(argv[1:])
        self.assertEqual((args.command, args.socket, args.data_dir), ("ping", None, None))

    def test_ci_runs_the_readme_test_command(self):
        """.ci/run runs the README's test command verbatim."""
        test = _blocks(_section(self.readme, "Test it"))[0].strip()
        self.assertTrue(any(line.startswith(test + " ") or line == test
                            for line in _read(".ci/run").splitlines()), test)
