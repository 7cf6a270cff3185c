"""Tests for joblet_persist.rules: the value rules config, the CLI and security share."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import rules


class DurationTests(SynchronousTestCase):
    def test_one_unit_table(self):
        """parse_duration and duration_with_units share the units ms, s, m, h, d, w;
        only parse_duration takes a bare number (seconds)."""
        for text, seconds in (("500ms", 0.5), ("90s", 90.0), ("1h30m", 5400.0),
                              ("1d", 86400.0), ("2w", 1209600.0), ("1.5h", 5400.0)):
            self.assertEqual(rules.parse_duration(text), seconds, text)
            self.assertEqual(rules.duration_with_units(text), seconds, text)
        self.assertEqual(rules.parse_duration("90"), 90.0)
        self.assertIsNone(rules.duration_with_units("90"))
        self.assertIsNone(rules.duration_with_units(" 2h"))
        for bad in ("-2h", "2y", "soon", ""):
            self.assertRaises(rules.InvalidValue, rules.parse_duration, bad)
            self.assertIsNone(rules.duration_with_units(bad))


class GroupTests(SynchronousTestCase):
    def test_group_text_and_parse_group(self):
        """A group is a name or a gid (string or int); "" and null keep the process's
        group; a malformed value or unknown name is an InvalidValue saying so."""
        self.assertEqual(rules.group_text(0), "0")
        self.assertEqual(rules.group_text(" root "), "root")
        self.assertEqual(rules.group_text(None), "")
        self.assertEqual((rules.parse_group(""), rules.parse_group(None)), (None, None))
        self.assertEqual((rules.parse_group(4242), rules.parse_group("4242")), (4242, 4242))
        self.assertEqual(rules.parse_group("root"), 0)
        e = self.assertRaises(rules.InvalidValue, rules.parse_group, "no-such-group-jp")
        self.assertIn("no group named", str(e))
        e = self.assertRaises(rules.InvalidValue, rules.parse_group, "a b")
        self.assertIn("not a group name or a gid", str(e))
        e = self.assertRaises(rules.InvalidValue, rules.parse_group, -1)
        self.assertIn("expected a group name or a gid", str(e))
        self.assertRaises(rules.InvalidValue, rules.parse_group, [1])


class ModeTests(SynchronousTestCase):
    def test_octal_modes(self):
        """parse_mode takes "0600", "0o600", "600" (quoted) and ints; refuses the rest."""
        for value in ("0600", "0o600", "600", 0o600, 384):
            self.assertEqual(rules.parse_mode(value), 0o600, value)
        for bad in ("0800", "rw", 0o1000, True, None):
            self.assertRaises(rules.InvalidValue, rules.parse_mode, bad)


class AddressTests(SynchronousTestCase):
    def test_listen_host(self):
        """listen_host: the host of host:port, "" for grpc's ":port" form; a bad port
        or address is an error."""
        self.assertEqual(rules.listen_host("127.0.0.1:1"), "127.0.0.1")
        self.assertEqual(rules.listen_host("[::1]:1"), "::1")
        self.assertEqual(rules.listen_host(":50052"), "")
        for bad in (":70000", "nohost", "::1:5"):
            self.assertRaises(ValueError, rules.listen_host, bad)

    def test_loopback(self):
        """localhost (with trailing dots), 127/8, ::1 and v4-mapped 127/8 are loopback."""
        for host in ("localhost", "LOCALHOST.", "127.9.9.9", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(rules.is_loopback_host(host), host)
        for host in ("", "0.0.0.0", "::", "localhost.example", "::ffff:10.0.0.1"):
            self.assertFalse(rules.is_loopback_host(host), host)
