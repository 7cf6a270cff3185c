"""Tests for joblet_persist.config: YAML -> frozen dataclasses, with every error path."""

import dataclasses
import json
import os

import yaml
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.config import (
    QUERY_MESSAGE_OVERHEAD,
    Config,
    ConfigError,
    IPCConfig,
    LoggingConfig,
    MonitoringConfig,
    QueryConfig,
    RetentionConfig,
    SecurityConfig,
    ServerConfig,
    StorageConfig,
    WriterConfig,
    config_from_string,
    default_config,
    is_loopback_host,
    load_config,
    parse_duration,
    parse_host_port,
    parse_size,
    read_pem,
)
from joblet_persist.rules import parse_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "config.example.yml")
DOCS = os.path.join(ROOT, "docs", "configuration.md")

MiB = 1024 * 1024

CERT = "-----BEGIN CERTIFICATE-----\nMIIBcert\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIBkey\n-----END PRIVATE KEY-----\n"
CA = "-----BEGIN CERTIFICATE-----\nMIIBca\n-----END CERTIFICATE-----\n"


def _yaml(document):
    """Serialize a Python structure as YAML text for config_from_string."""
    return yaml.safe_dump(document, default_flow_style=False)


def _schema_keys(described, prefix=""):
    """Dotted YAML keys of a describe() dict (or of a parsed YAML mapping)."""
    keys = set()
    for key, value in described.items():
        if key == "source" and not prefix:
            continue
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            keys |= _schema_keys(value, dotted + ".")
        else:
            keys.add(dotted)
    return keys


class ConfigErrorMixin:
    """Helpers to assert that parsing fails with a ConfigError naming file and key."""

    def assertConfigError(self, text, key, *fragments, source="config.yml", data_dir=None):
        with self.assertRaises(ConfigError) as caught:
            config_from_string(text, source=source, data_dir=data_dir)
        error = caught.exception
        self.assertEqual(error.source, source)
        self.assertEqual(error.key, key)
        message = str(error)
        prefix = f"{source}: {key}: " if key else f"{source}"
        self.assertTrue(message.startswith(prefix), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return error


class DefaultsTests(SynchronousTestCase):
    """default_config() holds exactly the documented defaults."""

    def test_server_defaults(self):
        """server: the admin Unix socket only (no viewer socket, no TCP, no plaintext opt-in),
        16 MiB requests, 64 RPCs, 16 workers."""
        s = default_config().server
        self.assertEqual(s.node_id, "")
        self.assertEqual(s.grpc_socket, "/opt/joblet/run/persist-grpc.sock")
        self.assertEqual(s.grpc_socket_mode, 0o600)
        self.assertEqual(s.grpc_viewer_socket, "")
        self.assertEqual(s.grpc_viewer_socket_mode, 0o660)
        self.assertEqual(s.grpc_viewer_socket_group, "")
        self.assertEqual(s.grpc_address, "")
        self.assertFalse(s.allow_plaintext_tcp)
        self.assertEqual(s.max_message_bytes, 16 * MiB)
        self.assertEqual(s.max_concurrent_rpcs, 64)
        self.assertEqual(s.grpc_workers, 16)
        self.assertEqual(s.shutdown_grace, 5.0)
        self.assertIsNone(s.grpc_host)

    def test_ipc_defaults(self):
        """ipc: socket under /opt/joblet/run, mode 0600, 128 MiB frames, 1024 connections,
        5 s shutdown drain."""
        i = default_config().ipc
        self.assertEqual(i.socket, "/opt/joblet/run/persist-ipc.sock")
        self.assertEqual(i.socket_mode, 0o600)
        self.assertEqual(i.max_frame_bytes, 134217728)
        self.assertEqual(i.max_connections, 1024)
        self.assertEqual(i.drain_timeout, 5.0)

    def test_storage_defaults(self):
        """storage and storage.retention hold the documented defaults and derived paths."""
        st_ = default_config().storage
        self.assertEqual(st_.data_dir, "/opt/joblet")
        self.assertEqual(st_.compressor, "deflate")
        self.assertEqual(st_.compression_level, "adaptive")
        self.assertEqual(st_.segment_max_bytes, 256 * MiB)
        self.assertEqual(st_.fsync, "batch")
        self.assertEqual(st_.max_open_files, 256)
        self.assertEqual(st_.index_path, "/opt/joblet/job_index.json")
        r = st_.retention
        self.assertEqual(r.log_max_age, 30 * 86400.0)
        self.assertEqual(r.metric_max_age, 30 * 86400.0)
        self.assertEqual(r.event_max_age, 30 * 86400.0)
        self.assertEqual(r.job_max_bytes, 0)
        self.assertEqual(r.total_max_bytes, 0)
        self.assertEqual(r.min_free_bytes, 100 * MiB)
        self.assertEqual(r.active_window, 600.0)
        self.assertEqual(r.interval, 300.0)

    def test_event_max_age(self):
        """storage.retention.eventMaxAge is a duration; a wrong type names the key."""
        cfg = config_from_string("storage:\n  retention:\n    eventMaxAge: 2d\n")
        self.assertEqual(cfg.storage.retention.event_max_age, 2 * 86400.0)
        with self.assertRaises(ConfigError) as caught:
            config_from_string("storage:\n  retention:\n    eventMaxAge: [1]\n")
        self.assertIn("storage.retention.eventMaxAge", str(caught.exception))

    def test_writer_defaults(self):
        """writer: 1 s flush, 20000 messages / 2 MiB batches, 64/32 MiB water marks."""
        w = default_config().writer
        self.assertEqual(w.flush_interval, 1.0)
        self.assertEqual(w.batch_max_messages, 20000)
        self.assertEqual(w.batch_max_bytes, 2 * MiB)
        self.assertEqual(w.high_water_bytes, 128 * MiB)
        self.assertEqual(w.low_water_bytes, 64 * MiB)
        self.assertEqual(w.threads, 0)
        self.assertEqual(w.retry_initial, 0.5)
        self.assertEqual(w.retry_max, 30.0)
        self.assertEqual(w.index_interval, 5.0)

    def test_query_monitoring_logging_security_defaults(self):
        """query, monitoring, logging and security hold the documented defaults."""
        c = default_config()
        self.assertEqual(c.query, QueryConfig(4096, MiB, 100000000))
        self.assertEqual(c.monitoring, MonitoringConfig(True, "127.0.0.1", 9092, 9093))
        self.assertEqual(c.logging, LoggingConfig("info", "text"))
        self.assertEqual(c.security, SecurityConfig("", "", "", True, "admin", "viewer"))
        self.assertFalse(c.security.tls_enabled)
        self.assertEqual(c.source, "<defaults>")

    def test_dataclass_defaults_match(self):
        """Each section class built without arguments equals the section of default_config()."""
        c = default_config()
        self.assertEqual(c.server, ServerConfig())
        self.assertEqual(c.ipc, IPCConfig())
        self.assertEqual(c.storage, StorageConfig())
        self.assertEqual(c.storage.retention, RetentionConfig())
        self.assertEqual(c.writer, WriterConfig())
        self.assertEqual(c, Config())

    def test_frozen(self):
        """Config objects are immutable."""
        c = default_config()
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, c.writer, "threads", 3)
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, c, "writer", None)

    def test_empty_and_comment_only_text(self):
        """An empty file, a comment-only file and empty sections all give the defaults."""
        for text in ["", "# nothing here\n", "server:\nstorage:\n  retention:\n"]:
            c = config_from_string(text, source="x.yml")
            self.assertEqual(c, default_config())
            self.assertEqual(c.source, "x.yml")

    def test_load_config_none_is_defaults(self):
        """load_config() without a path returns the defaults."""
        self.assertEqual(load_config(), default_config())
        self.assertEqual(load_config().source, "<defaults>")

    def test_thread_count(self):
        """writer.thread_count is threads when set, one per CPU when 0."""
        self.assertEqual(WriterConfig(threads=3).thread_count, 3)
        self.assertEqual(WriterConfig(threads=0).thread_count, os.cpu_count() or 1)

    def test_log_level(self):
        """logging.log_level maps the level name to a twisted LogLevel."""
        self.assertIs(LoggingConfig(level="warn").log_level, LogLevel.warn)
        self.assertIs(LoggingConfig().log_level, LogLevel.info)


class ExampleFileTests(SynchronousTestCase):
    """config.example.yml at the repository root documents exactly the defaults."""

    def test_example_equals_defaults(self):
        """Loading config.example.yml gives default_config(), with the file as source."""
        c = load_config(EXAMPLE)
        self.assertEqual(c, default_config())
        self.assertEqual(c.source, EXAMPLE)

    def test_example_lists_every_key(self):
        """Every configuration key appears in config.example.yml, and nothing else does."""
        with open(EXAMPLE) as f:
            document = yaml.safe_load(f)
        self.assertEqual(_schema_keys(document), _schema_keys(default_config().describe()))

    def test_docs_mention_every_key(self):
        """docs/configuration.md names every key by its dotted path."""
        with open(DOCS) as f:
            docs = f.read()
        missing = sorted(k for k in _schema_keys(default_config().describe()) if k not in docs)
        self.assertEqual(missing, [])


class LoadFileTests(SynchronousTestCase, ConfigErrorMixin):
    """load_config reads files and names them in errors."""

    def _write(self, text, mode="w"):
        path = self.mktemp()
        with open(path, mode) as f:
            f.write(text)
        return path

    def test_load_file(self):
        """A file's values are read; the result's source is its path."""
        path = self._write("writer:\n  flushInterval: 250ms\n")
        c = load_config(path)
        self.assertEqual(c.writer.flush_interval, 0.25)
        self.assertEqual(c.source, path)

    def test_missing_file(self):
        """A missing file is a ConfigError naming the file."""
        path = self.mktemp()
        e = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(e.source, path)
        self.assertIsNone(e.key)
        self.assertTrue(str(e).startswith(f"{path}: cannot read configuration file"), str(e))

    def test_directory(self):
        """A directory instead of a file is a ConfigError naming it."""
        path = self.mktemp()
        os.mkdir(path)
        e = self.assertRaises(ConfigError, load_config, path)
        self.assertIn(path, str(e))

    def test_not_utf8(self):
        """A file that is not UTF-8 text is a ConfigError naming it."""
        path = self._write(b"server:\n  nodeId: \xff\xfe\n", "wb")
        e = self.assertRaises(ConfigError, load_config, path)
        self.assertIn("not UTF-8", str(e))
        self.assertEqual(e.source, path)

    def test_error_names_file(self):
        """A bad value in a file names the file path and the dotted key."""
        path = self._write("storage:\n  retention:\n    logMaxAge: soon\n")
        e = self.assertRaises(ConfigError, load_config, path)
        self.assertTrue(
            str(e).startswith(f"{path}: storage.retention.logMaxAge: expected a duration"),
            str(e),
        )

    def test_yaml_syntax_error(self):
        """A YAML syntax error names the file and the line."""
        path = self._write("server:\n  nodeId: a\n  grpcWorkers: [1\nipc:\n")
        e = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(e.source, path)
        self.assertIsNotNone(e.line)
        self.assertTrue(str(e).startswith(f"{path}, line {e.line}: invalid YAML"), str(e))

    def test_yaml_syntax_error_line(self):
        """The reported line is the line of the problem."""
        text = "server:\n  nodeId: a\nipc: x: y\n"
        e = self.assertRaises(ConfigError, config_from_string, text, source="c.yml")
        self.assertEqual(e.line, 3)
        self.assertIn("c.yml, line 3: invalid YAML", str(e))

    def test_duplicate_key(self):
        """A key written twice is refused with its line, not silently overwritten."""
        text = "writer:\n  threads: 1\n  threads: 2\n"
        e = self.assertRaises(ConfigError, config_from_string, text, source="c.yml")
        self.assertEqual(e.line, 3)
        self.assertIn("duplicate key 'threads'", str(e))

    def test_two_documents(self):
        """A file with two YAML documents is refused."""
        e = self.assertRaises(ConfigError, config_from_string, "a: 1\n---\nb: 2\n")
        self.assertIn("invalid YAML", str(e))


class StructureErrorTests(SynchronousTestCase, ConfigErrorMixin):
    """Unknown keys and sections that are not mappings are refused."""

    def test_unknown_top_level_key(self):
        """An unknown section names itself, lists the valid sections and hints at persist:."""
        self.assertConfigError(
            "storage: {}\njoblet:\n  maxConcurrentJobs: 5\n",
            "joblet",
            "unknown key",
            "server, ipc, storage, writer, query, monitoring, logging, security",
            "persist:",
        )

    def test_unknown_nested_key(self):
        """An unknown key inside a section names its dotted path and that section's keys."""
        self.assertConfigError(
            "writer:\n  flushIntervall: 1s\n",
            "writer.flushIntervall",
            "unknown key",
            "flushInterval, batchMaxMessages",
        )

    def test_unknown_key_in_retention(self):
        """An unknown key two levels deep is named with its full dotted path."""
        self.assertConfigError(
            "storage:\n  retention:\n    maxAge: 1d\n",
            "storage.retention.maxAge",
            "valid keys of section 'storage.retention'",
            "logMaxAge",
        )

    def test_section_not_mapping(self):
        """A section whose value is a scalar or a list is refused."""
        self.assertConfigError("server: 5\n", "server", "expected a mapping", "got 5")
        self.assertConfigError("storage:\n  retention: [1, 2]\n", "storage.retention", "got a list")

    def test_top_level_not_mapping(self):
        """A document that is a list or a scalar is refused."""
        self.assertConfigError("- a\n- b\n", None, "mapping of sections", "got a list")
        self.assertConfigError("hello\n", None, 'got "hello"')


class ValueTypeTests(SynchronousTestCase, ConfigErrorMixin):
    """Each kind of value parses its accepted forms and refuses the others."""

    def test_integer(self):
        """Integers accept ints only: not bools, strings or floats."""
        c = config_from_string("server:\n  grpcWorkers: 3\n")
        self.assertEqual(c.server.grpc_workers, 3)
        self.assertEqual(type(c.server.grpc_workers), int)
        self.assertConfigError(
            "server:\n  grpcWorkers: true\n", "server.grpcWorkers", "expected an integer, got true"
        )
        self.assertConfigError('server:\n  grpcWorkers: "3"\n', "server.grpcWorkers", 'got "3"')
        self.assertConfigError("server:\n  grpcWorkers: 2.5\n", "server.grpcWorkers", "got 2.5")
        self.assertConfigError("server:\n  grpcWorkers:\n", "server.grpcWorkers", "got null")

    def test_integer_ranges(self):
        """Counts have lower bounds: workers, RPCs, batches >= 1; threads >= 0."""
        for text, key in [
            ("server:\n  grpcWorkers: 0\n", "server.grpcWorkers"),
            ("server:\n  maxConcurrentRpcs: 0\n", "server.maxConcurrentRpcs"),
            ("writer:\n  batchMaxMessages: 0\n", "writer.batchMaxMessages"),
            ("writer:\n  threads: -1\n", "writer.threads"),
            ("ipc:\n  maxConnections: 0\n", "ipc.maxConnections"),
            ("query:\n  batchMaxItems: 0\n", "query.batchMaxItems"),
            ("query:\n  maxLimit: 0\n", "query.maxLimit"),
            ("storage:\n  maxOpenFiles: 0\n", "storage.maxOpenFiles"),
        ]:
            self.assertConfigError(text, key, "must be")
        self.assertEqual(config_from_string("writer:\n  threads: 0\n").writer.threads, 0)

    def test_ports(self):
        """Ports are 0..65535."""
        c = config_from_string("monitoring:\n  metricsPort: 0\n  healthPort: 65535\n")
        self.assertEqual((c.monitoring.metrics_port, c.monitoring.health_port), (0, 65535))
        self.assertConfigError(
            "monitoring:\n  healthPort: 65536\n", "monitoring.healthPort", "between 0 and 65535"
        )
        self.assertConfigError("monitoring:\n  metricsPort: -1\n", "monitoring.metricsPort")

    def test_boolean(self):
        """Booleans accept YAML booleans only, not strings or numbers."""
        c = config_from_string(
            "monitoring:\n  enabled: false\nsecurity:\n  requireClientCert: no\n"
        )
        self.assertFalse(c.monitoring.enabled)
        self.assertFalse(c.security.require_client_cert)
        self.assertConfigError(
            'monitoring:\n  enabled: "false"\n', "monitoring.enabled", "expected true or false"
        )
        self.assertConfigError("monitoring:\n  enabled: 1\n", "monitoring.enabled", "got 1")

    def test_string(self):
        """Strings refuse numbers (with a hint to quote) and nulls."""
        self.assertEqual(config_from_string('server:\n  nodeId: "7"\n').server.node_id, "7")
        self.assertConfigError(
            "server:\n  nodeId: 7\n", "server.nodeId", "expected a string, got 7", "quote it"
        )
        self.assertConfigError(
            'security:\n  adminOu: ""\n', "security.adminOu", "must not be empty"
        )

    def test_duration_forms(self):
        """Durations accept seconds as numbers or strings with ms/s/m/h/d/w units (the
        units the CLI's --since/--until take too)."""
        cases = {
            "2": 2.0,
            "0.25": 0.25,
            '"500ms"': 0.5,
            '"30s"': 30.0,
            '"15m"': 900.0,
            '"12h"': 43200.0,
            '"7d"': 604800.0,
            '"1h30m"': 5400.0,
            '"1.5h"': 5400.0,
            '"90"': 90.0,
            '"2w"': 1209600.0,
        }
        for written, seconds in cases.items():
            c = config_from_string(f"server:\n  shutdownGrace: {written}\n")
            self.assertEqual(c.server.shutdown_grace, seconds, written)
            self.assertEqual(type(c.server.shutdown_grace), float)

    def test_duration_errors(self):
        """Negative, unit-less garbage, unknown units, bools and infinities are refused."""
        key = "storage.retention.logMaxAge"
        for written, fragment in [
            ("-5", "must not be negative"),
            ('"-5s"', "must not be negative"),
            ("soon", "expected a duration"),
            ('"5 weeks"', "expected a duration"),
            ('"5y"', "expected a duration"),
            ("true", "got true"),
            (".inf", "finite"),
            ("[1]", "got a list"),
        ]:
            self.assertConfigError(
                f"storage:\n  retention:\n    logMaxAge: {written}\n", key, fragment
            )

    def test_positive_durations(self):
        """Timer intervals must be greater than zero; ages may be 0 (disabled)."""
        self.assertConfigError(
            "writer:\n  flushInterval: 0\n", "writer.flushInterval", "greater than 0"
        )
        self.assertConfigError(
            "storage:\n  retention:\n    interval: 0s\n",
            "storage.retention.interval",
            "greater than 0",
        )
        c = config_from_string("storage:\n  retention:\n    logMaxAge: 0\n")
        self.assertEqual(c.storage.retention.log_max_age, 0.0)

    def test_switch_interval(self):
        """writer.switchInterval: 1 ms unless set, a duration greater than 0."""
        self.assertEqual(config_from_string("").writer.switch_interval, 0.001)
        c = config_from_string('writer:\n  switchInterval: "5ms"\n')
        self.assertEqual(c.writer.switch_interval, 0.005)
        self.assertConfigError(
            "writer:\n  switchInterval: 0s\n", "writer.switchInterval", "greater than 0"
        )

    def test_drain_timeout(self):
        """ipc.drainTimeout is a duration greater than 0; a bad value is an error naming the
        key."""
        c = config_from_string('ipc:\n  drainTimeout: "250ms"\n')
        self.assertEqual(c.ipc.drain_timeout, 0.25)
        self.assertEqual(config_from_string("ipc:\n  drainTimeout: 30\n").ipc.drain_timeout, 30.0)
        error = self.assertConfigError("ipc:\n  drainTimeout: 0\n", "ipc.drainTimeout")
        self.assertEqual(str(error), "config.yml: ipc.drainTimeout: must be greater than 0, got 0")
        for written, fragment in [
            ('"0s"', 'must be greater than 0, got "0s"'),
            ("abc", 'expected a duration: a number of seconds or a string like "500ms"'),
            ("-1", "must not be negative"),
        ]:
            self.assertConfigError(
                f"ipc:\n  drainTimeout: {written}\n", "ipc.drainTimeout", fragment
            )

    def test_size_forms(self):
        """Sizes accept bytes as numbers or strings with decimal and binary units."""
        cases = {
            "4096": 4096,
            '"64KiB"': 65536,
            '"16MiB"': 16 * MiB,
            '"1GiB"': 1 << 30,
            '"10KB"': 10000,
            '"5MB"': 5000000,
            '"1GB"': 10**9,
            '"123B"': 123,
            '"123"': 123,
            '"1.5KiB"': 1536,
            '"2 mib"': 2 * MiB,
            "1.0e+6": 1000000,
        }
        for written, size in cases.items():
            c = config_from_string(f"storage:\n  segmentMaxBytes: {written}\n")
            self.assertEqual(c.storage.segment_max_bytes, size, written)
            self.assertEqual(type(c.storage.segment_max_bytes), int)

    def test_size_errors(self):
        """Negative, fractional-byte, unknown-unit and non-numeric sizes are refused."""
        key = "storage.segmentMaxBytes"
        for written, fragment in [
            ("-1", "must not be negative"),
            ('"-1KiB"', "must not be negative"),
            ('"1.5B"', "not a whole number of bytes"),
            ("1.5", "not a whole number of bytes"),
            ('"10XB"', "unknown size unit"),
            ('"lots"', "expected a size"),
            ("true", "got true"),
            ("0", "at least 1"),
        ]:
            self.assertConfigError(f"storage:\n  segmentMaxBytes: {written}\n", key, fragment)
        self.assertConfigError(
            "ipc:\n  maxFrameBytes: 4GiB\n", "ipc.maxFrameBytes", "at most 4294967295"
        )

    def test_mode_forms(self):
        """Modes accept "0600", YAML octal 0600, decimal 384 and "0o640"."""
        for written, mode in [
            ('"0600"', 0o600),
            ("0600", 0o600),
            ("384", 0o600),
            ('"0o640"', 0o640),
            ('"660"', 0o660),
            ("0", 0),
        ]:
            c = config_from_string(f"ipc:\n  socketMode: {written}\n")
            self.assertEqual(c.ipc.socket_mode, mode, written)
            self.assertEqual(type(c.ipc.socket_mode), int)

    def test_mode_errors(self):
        """A bare 600 (decimal), non-octal digits, large modes and bools are refused."""
        self.assertConfigError(
            "ipc:\n  socketMode: 600\n",
            "ipc.socketMode",
            "600 is read as a decimal number",
            '"0600"',
        )
        self.assertConfigError(
            'server:\n  grpcSocketMode: "0699"\n', "server.grpcSocketMode", "octal file mode"
        )
        self.assertConfigError('ipc:\n  socketMode: "4755"\n', "ipc.socketMode", "out of range")
        self.assertConfigError("ipc:\n  socketMode: 1000\n", "ipc.socketMode", "out of range")
        self.assertConfigError("ipc:\n  socketMode: true\n", "ipc.socketMode", "got true")

    def test_enumerations(self):
        """Enumerations accept their names in any case and refuse others, listing choices."""
        c = config_from_string(
            "storage:\n  compressor: ZLIB\n  fsync: interval\n"
            "logging:\n  level: WARNING\n  format: json\n"
        )
        self.assertEqual(c.storage.compressor, "zlib")
        self.assertEqual(c.storage.fsync, "interval")
        self.assertEqual(c.logging.level, "warn")
        self.assertEqual(c.logging.format, "json")
        self.assertConfigError(
            "storage:\n  compressor: lz4\n",
            "storage.compressor",
            "zlib, deflate, isal",
            'got "lz4"',
        )
        self.assertConfigError(
            "storage:\n  fsync: always\n", "storage.fsync", "batch, interval, never"
        )
        self.assertConfigError(
            "logging:\n  level: trace\n", "logging.level", "debug, info, warn, error"
        )
        self.assertConfigError("logging:\n  format: xml\n", "logging.format", "text, json")
        self.assertConfigError("logging:\n  level: 1\n", "logging.level", "got 1")

    def test_host_port(self):
        """grpcAddress accepts host:port forms and "" (disabled)."""
        for address, host, port in [
            ("localhost:1", "localhost", 1),
            ("[::1]:50052", "::1", 50052),
            ("127.0.0.2:0", "127.0.0.2", 0),
        ]:
            server = {"grpcAddress": address, "allowPlaintextTcp": True}
            c = config_from_string(_yaml({"server": server}))
            self.assertEqual(c.server.grpc_host, host)
            self.assertEqual(parse_host_port(c.server.grpc_address), (host, port))
        c = config_from_string('server:\n  grpcAddress: ""\n')
        self.assertEqual(c.server.grpc_address, "")
        self.assertIsNone(c.server.grpc_host)

    def test_host_port_errors(self):
        """Missing ports, bad ports, unbracketed IPv6 and non-strings are refused."""
        for address, fragment in [
            ("127.0.0.1", "expected host:port"),
            (":50052", "expected host:port"),
            ("::1:50052", "needs brackets"),
            ("127.0.0.1:99999", "out of range"),
            ("127.0.0.1:http", "not a number"),
            ("[127.0.0.1]:1", "not an IPv6 address"),
            ("bad host:1", "not an IP address or a host name"),
            (50052, "expected host:port"),
        ]:
            self.assertConfigError(
                _yaml({"server": {"grpcAddress": address}}), "server.grpcAddress", fragment
            )

    def test_bind_address(self):
        """monitoring.bindAddress is an IP address or host name."""
        c = config_from_string("monitoring:\n  bindAddress: '::1'\n")
        self.assertEqual(c.monitoring.bind_address, "::1")
        self.assertConfigError(
            'monitoring:\n  bindAddress: "a b"\n', "monitoring.bindAddress", "not an IP address"
        )
        self.assertConfigError(
            'monitoring:\n  bindAddress: ""\n', "monitoring.bindAddress", "must not be empty"
        )

    def test_paths_made_absolute(self):
        """Relative paths in the file are made absolute against the working directory."""
        c = config_from_string("storage:\n  dataDir: data\nipc:\n  socket: ipc.sock\n")
        self.assertEqual(c.storage.data_dir, os.path.abspath("data"))
        self.assertEqual(c.ipc.socket, os.path.abspath("ipc.sock"))
        self.assertConfigError('ipc:\n  socket: ""\n', "ipc.socket", "must not be empty")
        self.assertConfigError('storage:\n  dataDir: ""\n', "storage.dataDir", "must not be empty")

    @given(
        st.integers(min_value=1, max_value=10**9),
        st.sampled_from([("B", 1), ("KB", 1000), ("MiB", 1 << 20), ("gib", 1 << 30)]),
    )
    def test_size_round_trip(self, number, unit):
        """Any whole number with any unit parses to number * unit bytes."""
        name, multiplier = unit
        self.assertEqual(parse_size(f"{number}{name}"), number * multiplier)

    @given(
        st.integers(min_value=0, max_value=10**6),
        st.sampled_from([("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)]),
    )
    def test_duration_round_trip(self, number, unit):
        """Any whole number with any unit parses to number * unit seconds."""
        name, seconds = unit
        self.assertAlmostEqual(parse_duration(f"{number}{name}"), number * seconds)

    def test_public_parsers_raise_value_error(self):
        """parse_size, parse_duration and parse_host_port raise ValueError on bad input."""
        self.assertRaises(ValueError, parse_size, "1XB")
        self.assertRaises(ValueError, parse_duration, "-1s")
        self.assertRaises(ValueError, parse_host_port, "nope")


class CrossFieldTests(SynchronousTestCase, ConfigErrorMixin):
    """Checks that involve several keys name the key to change."""

    def test_low_water_not_below_high(self):
        """lowWaterBytes equal to or above highWaterBytes is refused."""
        self.assertConfigError(
            "writer:\n  lowWaterBytes: 128MiB\n",
            "writer.lowWaterBytes",
            "must be less than writer.highWaterBytes",
        )
        self.assertConfigError(
            "writer:\n  lowWaterBytes: 10MiB\n  highWaterBytes: 1MiB\n",
            "writer.lowWaterBytes",
        )
        c = config_from_string("writer:\n  lowWaterBytes: 0\n  highWaterBytes: 1\n")
        self.assertEqual((c.writer.low_water_bytes, c.writer.high_water_bytes), (0, 1))

    def test_compression_level_ranges(self):
        """Levels are checked against the compressor: zlib 0-9, deflate 0-12, isal 0-3."""
        for compressor, ok, bad in [("zlib", 9, 10), ("deflate", 12, 13), ("isal", 3, 4)]:
            c = config_from_string(
                f"storage:\n  compressor: {compressor}\n  compressionLevel: {ok}\n"
            )
            self.assertEqual(c.storage.compression_level, ok)
            self.assertConfigError(
                f"storage:\n  compressor: {compressor}\n  compressionLevel: {bad}\n",
                "storage.compressionLevel",
            )
        self.assertConfigError("storage:\n  compressionLevel: -1\n", "storage.compressionLevel")

    def test_compression_level_adaptive(self):
        """``adaptive`` (any case) selects the adaptive policy for every compressor; other
        words, floats and booleans are refused naming the key and both accepted forms."""
        for compressor in ("zlib", "deflate", "isal"):
            c = config_from_string(
                f"storage:\n  compressor: {compressor}\n  compressionLevel: Adaptive\n"
            )
            self.assertEqual(c.storage.compression_level, "adaptive")
        for bad in ("fast", "5.5", "true", "''"):
            error = self.assertConfigError(
                f"storage:\n  compressionLevel: {bad}\n", "storage.compressionLevel"
            )
            self.assertIn("'adaptive' or an integer level", str(error))

    def test_isal_without_level(self):
        """isal with the level omitted uses ISA-L's default 2 instead of the out-of-range 6."""
        c = config_from_string("storage:\n  compressor: isal\n")
        self.assertEqual(c.storage.compression_level, 2)

    def test_retry_bounds(self):
        """retryMax below retryInitial is refused."""
        self.assertConfigError(
            "writer:\n  retryInitial: 10s\n  retryMax: 1s\n",
            "writer.retryMax",
            "writer.retryInitial",
        )

    def test_open_files_leave_room_for_queries(self):
        """maxOpenFiles must exceed what the write pool may hold (2 per thread)."""
        self.assertConfigError(
            "writer:\n  threads: 4\nstorage:\n  maxOpenFiles: 8\n",
            "storage.maxOpenFiles",
            "writer.threads",
            "resolving to 4",
            "9 or more",
        )
        c = config_from_string("writer:\n  threads: 4\nstorage:\n  maxOpenFiles: 9\n")
        self.assertEqual(c.storage.max_open_files, 9)

    def test_default_open_files_grow_with_the_pool(self):
        """Left unset, maxOpenFiles leaves queries 252 files however many pool threads run
        (a many-core node must not be refused by the defaults); set, it is taken as is."""
        self.assertEqual(config_from_string("").storage.max_open_files, 256)
        self.assertEqual(
            config_from_string("writer:\n  threads: 2\n").storage.max_open_files, 256
        )
        self.assertEqual(
            config_from_string("writer:\n  threads: 200\n").storage.max_open_files, 652
        )
        self.patch(os, "cpu_count", lambda: 192)  # threads: 0 means one per core
        self.assertEqual(config_from_string("").storage.max_open_files, 636)
        self.assertEqual(default_config().storage.max_open_files, 636)
        self.assertConfigError(
            "storage:\n  maxOpenFiles: 256\n", "storage.maxOpenFiles", "resolving to 192"
        )

    def test_query_batch_fits_message(self):
        """A query batch as large as the gRPC message limit is refused."""
        self.assertConfigError(
            "query:\n  batchMaxBytes: 16MiB\n", "query.batchMaxBytes", "server.maxMessageBytes"
        )

    def test_same_socket_paths(self):
        """The IPC and gRPC sockets must be different files."""
        self.assertConfigError(
            "ipc:\n  socket: /tmp/s.sock\nserver:\n  grpcSocket: /tmp/s.sock\n",
            "server.grpcSocket",
            "must differ from ipc.socket",
        )

    def test_socket_path_too_long(self):
        """A socket path longer than AF_UNIX allows is refused at load, not at bind."""
        path = "/" + "x" * 120
        self.assertConfigError(_yaml({"ipc": {"socket": path}}), "ipc.socket", "107 bytes")
        self.assertConfigError(
            "", "ipc.socket", "107 bytes", "placed under the data directory", data_dir=path
        )
        self.assertConfigError(
            _yaml({"server": {"grpcSocket": path}}), "server.grpcSocket", "107 bytes"
        )

    def test_tls_needs_cert_and_key(self):
        """serverCert without serverKey (and the reverse) is refused."""
        self.assertConfigError(
            _yaml({"security": {"serverCert": CERT}}), "security.serverKey", "TLS needs both"
        )
        self.assertConfigError(
            _yaml({"security": {"serverKey": KEY}}), "security.serverCert", "TLS needs both"
        )

    def test_client_certs_need_ca(self):
        """TLS that requires client certificates needs caCert; without the requirement not."""
        self.assertConfigError(
            _yaml({"security": {"serverCert": CERT, "serverKey": KEY}}),
            "security.caCert",
            "requireClientCert",
        )
        c = config_from_string(
            _yaml({"security": {"serverCert": CERT, "serverKey": KEY, "requireClientCert": False}})
        )
        self.assertTrue(c.security.tls_enabled)

    def test_roles_differ(self):
        """adminOu and viewerOu must differ."""
        self.assertConfigError(
            "security:\n  viewerOu: admin\n", "security.viewerOu", "security.adminOu"
        )

    def test_non_loopback_plaintext_refused(self):
        """Plaintext gRPC TCP on a non-loopback address is refused, even with the opt-in."""
        for address in [
            "0.0.0.0:50052",
            "10.0.0.1:50052",
            "example.com:50052",
            "[::]:1",
            "[::ffff:10.0.0.1]:1",
        ]:
            for allow in (False, True):
                self.assertConfigError(
                    _yaml({"server": {"grpcAddress": address, "allowPlaintextTcp": allow}}),
                    "server.grpcAddress",
                    "plaintext TCP is only allowed on loopback (127.0.0.0/8, ::1, localhost)",
                )

    def test_loopback_plaintext_allowed(self):
        """Plaintext gRPC TCP on loopback addresses is accepted with allowPlaintextTcp."""
        for address in [
            "127.0.0.1:1",
            "127.9.9.9:1",
            "[::1]:1",
            "localhost:1",
            "LOCALHOST:1",
            "[::ffff:127.0.0.1]:1",
        ]:
            server = {"grpcAddress": address, "allowPlaintextTcp": True}
            c = config_from_string(_yaml({"server": server}))
            self.assertEqual(c.server.grpc_address, address)
            self.assertTrue(c.server.allow_plaintext_tcp)

    def test_tcp_without_tls_or_opt_in_refused(self):
        """A TCP address without TLS and without allowPlaintextTcp is an error naming the
        file, the address key and both ways out (TLS keys, the opt-in)."""
        for address in ["127.0.0.1:50052", "[::1]:1", "localhost:1"]:
            e = self.assertConfigError(
                _yaml({"server": {"grpcAddress": address}}),
                "server.grpcAddress",
                "the TCP listener needs TLS",
            )
            for key in ("security.serverCert", "security.serverKey", "server.allowPlaintextTcp"):
                self.assertIn(key, str(e))
        e = self.assertRaises(
            ConfigError,
            config_from_string,
            'server:\n  grpcAddress: "127.0.0.1:50052"\n',
            source="/etc/joblet/persist.yml",
        )
        self.assertTrue(str(e).startswith("/etc/joblet/persist.yml: server.grpcAddress: "))

    def test_opt_in_alone_opens_nothing(self):
        """allowPlaintextTcp without an address opens no TCP listener: the default address
        is "" (off)."""
        c = config_from_string("server:\n  allowPlaintextTcp: true\n")
        self.assertEqual(c.server.grpc_address, "")

    def test_non_loopback_with_tls_allowed(self):
        """A non-loopback address is accepted when TLS is configured."""
        c = config_from_string(
            _yaml(
                {
                    "server": {"grpcAddress": "0.0.0.0:50052"},
                    "security": {"serverCert": CERT, "serverKey": KEY, "caCert": CA},
                }
            )
        )
        self.assertEqual(c.server.grpc_host, "0.0.0.0")
        self.assertTrue(c.security.tls_enabled)

    def test_is_loopback_host(self):
        """is_loopback_host knows localhost, 127/8, ::1 and IPv4-mapped loopback."""
        for host in ["localhost", "127.0.0.1", "127.255.0.1", "::1", "::ffff:127.0.0.1"]:
            self.assertTrue(is_loopback_host(host), host)
        for host in ["0.0.0.0", "::", "10.1.1.1", "example.com", "localhost.example.com"]:
            self.assertFalse(is_loopback_host(host), host)


class NestedModeTests(SynchronousTestCase, ConfigErrorMixin):
    """A joblet-config.yml with a persist: section."""

    ROOT = {
        "version": "3.0",
        "server": {"address": "0.0.0.0", "port": 50051, "nodeId": "node-7"},
        "joblet": {"maxConcurrentJobs": 5},
        "cgroup": {"baseDir": "/sys/fs/cgroup"},
        "ipc": {"socket": "/run/joblet/persist-ipc.sock", "enabled": True},
        "logging": {"level": "INFO", "output": "stdout"},
        "security": {
            "serverCert": CERT,
            "serverKey": KEY,
            "caCert": CA,
            "clientCert": "core's own",
            "tlsMinVersion": "1.3",
        },
    }

    def _root(self, persist):
        return _yaml({**self.ROOT, "persist": persist})

    def test_inherits_from_root(self):
        """ipc.socket, server.nodeId and security.* come from the root; core keys are ignored."""
        c = config_from_string(self._root({"writer": {"threads": 2}}), source="joblet.yml")
        self.assertEqual(c.ipc.socket, "/run/joblet/persist-ipc.sock")
        self.assertEqual(c.server.node_id, "node-7")
        self.assertEqual(c.security.server_cert, CERT)
        self.assertEqual(c.security.server_key, KEY)
        self.assertEqual(c.security.ca_cert, CA)
        self.assertTrue(c.security.tls_enabled)
        self.assertEqual(c.writer.threads, 2)
        # The root's server and logging sections are core's, not ours.
        self.assertEqual(c.server.grpc_address, "")
        self.assertEqual(c.logging.level, "info")

    def test_persist_section_overrides(self):
        """Keys the persist section sets win over the root's, key by key."""
        c = config_from_string(
            self._root(
                {
                    "ipc": {"socket": "/run/p.sock"},
                    "server": {"nodeId": "mine"},
                    "security": {"caCert": "/etc/ca.pem"},
                }
            )
        )
        self.assertEqual(c.ipc.socket, "/run/p.sock")
        self.assertEqual(c.server.node_id, "mine")
        self.assertEqual(c.security.ca_cert, "/etc/ca.pem")
        self.assertEqual(c.security.server_cert, CERT)

    def test_empty_persist_section(self):
        """persist: with nothing under it means defaults plus inherited values."""
        c = config_from_string("persist:\nserver:\n  nodeId: n1\n  port: 1\n")
        self.assertEqual(c.server.node_id, "n1")
        self.assertEqual(c.storage, default_config().storage)

    def test_root_without_inherited_sections(self):
        """A root with none of ipc/server/security gives plain defaults."""
        c = config_from_string("version: 3\njoblet: {}\npersist:\n  writer:\n    threads: 1\n")
        self.assertEqual(c, dataclasses.replace(default_config(), writer=WriterConfig(threads=1)))

    def test_unknown_key_in_persist(self):
        """An unknown key inside persist names the persist.* path."""
        self.assertConfigError(
            self._root({"storage": {"bogus": 1}}),
            "persist.storage.bogus",
            "section 'persist.storage'",
        )
        self.assertConfigError(self._root({"cgroup": {}}), "persist.cgroup", "section 'persist'")

    def test_wrong_type_in_persist(self):
        """A bad value inside persist names the persist.* path."""
        self.assertConfigError(
            self._root({"writer": {"threads": "two"}}),
            "persist.writer.threads",
            "expected an integer",
        )

    def test_inherited_wrong_type(self):
        """An inherited value of the wrong type names the root's key."""
        root = {**self.ROOT, "security": {"serverCert": 5}, "persist": {}}
        self.assertConfigError(_yaml(root), "security.serverCert", "expected a string")
        root = {**self.ROOT, "server": {"nodeId": ["a"]}, "persist": {}}
        self.assertConfigError(_yaml(root), "server.nodeId", "got a list")

    def test_inherited_section_not_mapping(self):
        """A root section we inherit from that is not a mapping is refused."""
        self.assertConfigError("ipc: 5\npersist: {}\n", "ipc", "expected a mapping")

    def test_persist_not_mapping(self):
        """persist: with a scalar value is refused."""
        self.assertConfigError("persist: 5\n", "persist", "expected a mapping")

    def test_cross_field_names_origin(self):
        """Cross-key errors name persist.* for persist keys and root keys for inherited ones."""
        root = {"security": {"serverCert": CERT}, "persist": {}}
        self.assertConfigError(_yaml(root), "persist.security.serverKey", "security.serverCert")
        self.assertConfigError(
            _yaml({"persist": {"writer": {"lowWaterBytes": "1GiB"}}}),
            "persist.writer.lowWaterBytes",
            "persist.writer.highWaterBytes",
        )

    def test_inherited_ipc_socket_beats_data_dir(self):
        """An inherited ipc.socket counts as set: --data-dir does not move it."""
        c = config_from_string(self._root({}), data_dir="/srv/p")
        self.assertEqual(c.ipc.socket, "/run/joblet/persist-ipc.sock")
        self.assertEqual(c.server.grpc_socket, "/srv/p/run/persist-grpc.sock")


class DataDirTests(SynchronousTestCase, ConfigErrorMixin):
    """The --data-dir option."""

    def test_sockets_under_data_dir(self):
        """data_dir sets storage.dataDir and puts both default sockets under DIR/run/."""
        for make in (
            lambda d: default_config(data_dir=d),
            lambda d: config_from_string("", data_dir=d),
            lambda d: load_config(None, data_dir=d),
        ):
            c = make("/srv/persist")
            self.assertEqual(c.storage.data_dir, "/srv/persist")
            self.assertEqual(c.ipc.socket, "/srv/persist/run/persist-ipc.sock")
            self.assertEqual(c.server.grpc_socket, "/srv/persist/run/persist-grpc.sock")
            self.assertEqual(c.storage.index_path, "/srv/persist/job_index.json")

    def test_data_dir_made_absolute(self):
        """A relative data_dir is made absolute."""
        c = default_config(data_dir="rel/dir")
        self.assertEqual(c.storage.data_dir, os.path.abspath("rel/dir"))
        self.assertEqual(
            c.ipc.socket, os.path.join(os.path.abspath("rel/dir"), "run", "persist-ipc.sock")
        )

    def test_explicit_sockets_win(self):
        """Sockets the file sets (even "" for disabled) stay; data_dir overrides dataDir."""
        text = (
            'storage:\n  dataDir: /var/x\nipc:\n  socket: /run/i.sock\nserver:\n  grpcSocket: ""\n'
        )
        c = config_from_string(text, data_dir="/srv/d")
        self.assertEqual(c.ipc.socket, "/run/i.sock")
        self.assertEqual(c.server.grpc_socket, "")
        self.assertEqual(c.storage.data_dir, "/srv/d")

    def test_file_data_dir_without_option(self):
        """Without the option, the file's dataDir does not move the sockets."""
        c = config_from_string("storage:\n  dataDir: /var/x\n")
        self.assertEqual(c.storage.data_dir, "/var/x")
        self.assertEqual(c.ipc.socket, "/opt/joblet/run/persist-ipc.sock")

    def test_empty_data_dir_refused(self):
        """An empty --data-dir is refused, naming the option."""
        e = self.assertRaises(ConfigError, default_config, data_dir="")
        self.assertEqual(e.key, "--data-dir")


class DescribeTests(SynchronousTestCase):
    """Config.describe() for the startup log."""

    def test_defaults(self):
        """describe() uses YAML keys, shows modes as octal text and unset secrets as <unset>."""
        d = default_config().describe()
        self.assertEqual(d["source"], "<defaults>")
        self.assertEqual(d["ipc"]["socketMode"], "0600")
        self.assertEqual(d["server"]["grpcSocketMode"], "0600")
        self.assertEqual(d["storage"]["retention"]["logMaxAge"], 2592000.0)
        self.assertEqual(d["security"]["serverKey"], "<unset>")
        self.assertEqual(d["security"]["serverCert"], "<unset>")
        self.assertEqual(d["writer"]["highWaterBytes"], 128 * MiB)
        json.dumps(d)

    def test_hides_secrets(self):
        """Inline PEM reads <pem>, the key <set>, a cert path stays visible; no PEM leaks."""
        c = config_from_string(
            _yaml(
                {"security": {"serverCert": CERT, "serverKey": KEY, "caCert": "/etc/joblet/ca.pem"}}
            ),
            source="c.yml",
        )
        d = c.describe()
        self.assertEqual(d["source"], "c.yml")
        self.assertEqual(d["security"]["serverCert"], "<pem>")
        self.assertEqual(d["security"]["serverKey"], "<set>")
        self.assertEqual(d["security"]["caCert"], "/etc/joblet/ca.pem")
        text = json.dumps(d)
        self.assertNotIn("BEGIN", text)
        self.assertNotIn("MIIB", text)

    def test_key_path_hidden_too(self):
        """serverKey given as a path still reads <set>."""
        c = config_from_string(
            _yaml(
                {"security": {"serverCert": "/c.pem", "serverKey": "/k.pem", "caCert": "/ca.pem"}}
            )
        )
        self.assertEqual(c.describe()["security"]["serverKey"], "<set>")
        self.assertEqual(c.describe()["security"]["serverCert"], "/c.pem")


class ReadPemTests(SynchronousTestCase):
    """read_pem: inline PEM text or a file path."""

    def test_inline(self):
        """Inline PEM text is returned as bytes without touching the filesystem."""
        self.assertEqual(read_pem(CERT, "security.serverCert"), CERT.encode())
        self.assertEqual(read_pem("\n  " + CERT, "security.serverCert"), ("\n  " + CERT).encode())

    def test_from_file(self):
        """A path is read and its bytes returned."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(KEY.encode())
        self.assertEqual(read_pem(path, "security.serverKey"), KEY.encode())

    def test_missing_file(self):
        """An unreadable path is a ConfigError naming the key (and source when given)."""
        path = self.mktemp()
        e = self.assertRaises(ConfigError, read_pem, path, "security.caCert", source="c.yml")
        self.assertEqual(e.key, "security.caCert")
        self.assertTrue(str(e).startswith("c.yml: security.caCert: cannot read PEM file"), str(e))
        e = self.assertRaises(ConfigError, read_pem, path, "security.caCert")
        self.assertTrue(str(e).startswith("security.caCert: cannot read PEM file"), str(e))

    def test_file_without_pem(self):
        """A file that holds no PEM block is refused."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate\n")
        e = self.assertRaises(ConfigError, read_pem, path, "security.serverCert")
        self.assertIn("does not contain PEM data", str(e))

    def test_empty_and_truncated(self):
        """An empty value and inline text without an END line are refused."""
        e = self.assertRaises(ConfigError, read_pem, "", "security.serverCert")
        self.assertEqual(str(e), "security.serverCert: is not set")
        e = self.assertRaises(ConfigError, read_pem, "-----BEGIN X-----\nabc", "security.caCert")
        self.assertIn("no -----END line", str(e))


class ConfigErrorTests(SynchronousTestCase):
    """The text and fields of ConfigError."""

    def test_format(self):
        """str() is 'source: key: message', with the line after the source when known."""
        self.assertEqual(str(ConfigError("c.yml", "a.b", "bad")), "c.yml: a.b: bad")
        self.assertEqual(str(ConfigError("c.yml", None, "bad", line=3)), "c.yml, line 3: bad")
        self.assertEqual(str(ConfigError(None, "a.b", "bad")), "a.b: bad")
        e = ConfigError("c.yml", "a.b", "bad", line=4)
        self.assertEqual((e.source, e.key, e.message, e.line), ("c.yml", "a.b", "bad", 4))


class AccessKeyTests(SynchronousTestCase, ConfigErrorMixin):
    """server.grpcViewerSocket*, server.allowPlaintextTcp, and the query send limit."""

    def test_viewer_socket_keys(self):
        """The viewer socket takes a path, a mode and a group name or gid."""
        c = config_from_string(
            _yaml(
                {
                    "server": {
                        "grpcViewerSocket": "/run/jp/viewer.sock",
                        "grpcViewerSocketMode": "0640",
                        "grpcViewerSocketGroup": "root",
                    }
                }
            )
        )
        self.assertEqual(c.server.grpc_viewer_socket, "/run/jp/viewer.sock")
        self.assertEqual(c.server.grpc_viewer_socket_mode, 0o640)
        self.assertEqual(c.server.grpc_viewer_socket_group, "root")
        self.assertEqual(c.describe()["server"]["grpcViewerSocketMode"], "0640")
        c = config_from_string(
            "server:\n  grpcViewerSocket: /run/v.sock\n  grpcViewerSocketGroup: 0\n"
        )
        self.assertEqual(c.server.grpc_viewer_socket_group, "0")
        self.assertEqual(parse_group("0"), 0)
        self.assertEqual(parse_group("root"), 0)
        self.assertIsNone(parse_group(""))

    def test_viewer_socket_errors(self):
        """An unknown group, a bad group value, a shared path or a long path is refused,
        naming the key."""
        self.assertConfigError(
            "server:\n  grpcViewerSocket: /run/v.sock\n  grpcViewerSocketGroup: nosuchgroup-jp\n",
            "server.grpcViewerSocketGroup",
            "no group named 'nosuchgroup-jp'",
        )
        self.assertConfigError(
            "server:\n  grpcViewerSocketGroup: 'a b'\n",
            "server.grpcViewerSocketGroup",
            "not a group name or a gid",
        )
        self.assertConfigError(
            "server:\n  grpcViewerSocketGroup: -1\n",
            "server.grpcViewerSocketGroup",
            "expected a group name or a gid",
        )
        self.assertConfigError(
            "server:\n  grpcSocket: /run/a.sock\n  grpcViewerSocket: /run/a.sock\n",
            "server.grpcViewerSocket",
            "must differ",
        )
        self.assertConfigError(
            "server:\n  grpcViewerSocket: /" + "x" * 120 + ".sock\n",
            "server.grpcViewerSocket",
            "limited to 107 bytes",
        )
        self.assertConfigError(
            "server:\n  allowPlaintextTcp: 1\n", "server.allowPlaintextTcp", "true or false"
        )

    def test_send_limit_covers_the_largest_frame(self):
        """Queries may send a message as large as the largest accepted IPC frame plus the
        response's overhead, and at least server.maxMessageBytes."""
        c = default_config()
        self.assertEqual(c.grpc_send_message_bytes, 128 * MiB + QUERY_MESSAGE_OVERHEAD)
        c = config_from_string("ipc:\n  maxFrameBytes: 1MiB\n")
        self.assertEqual(c.grpc_send_message_bytes, 16 * MiB)
        c = config_from_string("ipc:\n  maxFrameBytes: 1GiB\n")
        self.assertEqual(c.grpc_send_message_bytes, 1024 * MiB + QUERY_MESSAGE_OVERHEAD)

    def test_frame_larger_than_a_query_can_send_refused(self):
        """An ipc.maxFrameBytes whose lines could never be sent back (beyond gRPC's 2 GiB
        message limit) is an error naming both keys."""
        e = self.assertConfigError(
            "ipc:\n  maxFrameBytes: 2GiB\n",
            "ipc.maxFrameBytes",
            "never read back",
            "server.maxMessageBytes",
        )
        self.assertIn(str(2**31 - 1 - QUERY_MESSAGE_OVERHEAD), str(e))
        largest = 2**31 - 1 - QUERY_MESSAGE_OVERHEAD
        c = config_from_string(f"ipc:\n  maxFrameBytes: {largest}\n")
        self.assertEqual(c.grpc_send_message_bytes, 2**31 - 1)
