"""deploy/joblet-persist.service: Type=notify, hardened (systemd-analyze security rates it
3.0 or better), and still allowing what the service needs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.support import ROOT

UNIT = os.path.join(ROOT, "deploy", "joblet-persist.service")


def _settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    with open(UNIT) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", "[")):
                key, _, value = line.partition("=")
                found.setdefault(key, []).append(value)
    return found


class UnitTests(SynchronousTestCase):
    def test_notify_and_what_the_service_needs(self):
        """Type=notify with a watchdog; the data directory writable; the descriptor limit;
        Unix and TCP sockets; chown and setrlimit not filtered; no capabilities."""
        s = _settings()
        self.assertEqual(s["Type"], ["notify"])
        self.assertEqual(s["NotifyAccess"], ["main"])
        self.assertTrue(s["WatchdogSec"][0])
        self.assertIn("/opt/joblet", s["ReadWritePaths"][0].split())
        self.assertGreaterEqual(int(s["LimitNOFILE"][0]), 65536)
        families = s["RestrictAddressFamilies"][0].split()
        for family in ("AF_UNIX", "AF_INET", "AF_INET6"):
            self.assertIn(family, families)
        denied = " ".join(v[1:] for v in s["SystemCallFilter"] if v.startswith("~")).split()
        for group in ("@resources", "@chown", "@privileged", "chown", "setrlimit", "prlimit64"):
            self.assertNotIn(group, denied)
        self.assertEqual(s["CapabilityBoundingSet"], [""])

    def test_systemd_analyze_security(self):
        """`systemd-analyze security --offline=true` rates the unit 3.0 or better."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise SkipTest("systemd-analyze is not installed")
        result = subprocess.run(
            [tool, "security", "--offline=true", "--no-pager", UNIT],
            capture_output=True, text=True, timeout=60,
        )
        if "--offline" in result.stderr and result.returncode != 0:
            raise SkipTest(f"this systemd-analyze has no --offline: {result.stderr.strip()}")
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
        self.assertIsNotNone(match, result.stdout + result.stderr)
        self.assertLessEqual(float(match.group(1)), 3.0, result.stdout)


class AlertRulesTests(SynchronousTestCase):
    def test_promtool_check_rules(self):
        """`promtool check rules` accepts deploy/prometheus-alerts.yml."""
        promtool = shutil.which("promtool")
        if promtool is None:
            raise SkipTest("promtool is not installed (Debian: apt-get install prometheus)")
        rules = os.path.join(ROOT, "deploy", "prometheus-alerts.yml")
        result = subprocess.run([promtool, "check", "rules", rules], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
