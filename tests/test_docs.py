"""The documentation stands alone: no reference to files outside the repository, every
docs/ file it names exists, docs/wire.md's field tables match the .proto files, and the
documented frame rejection reasons are the ones ingest produces."""

from __future__ import annotations

import ast
import glob
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist._proto import ipc_pb2, persist_pb2
from joblet_persist.metrics import FRAME_REJECT_REASONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + [os.path.join(ROOT, "README.md")]


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


class StandAloneTests(SynchronousTestCase):
    def test_no_reference_outside_the_repository(self):
        """No doc names WIRE.md, DESIGN.md, STYLE.md, ../shared or /work paths."""
        bad = re.compile(r"WIRE\.md|DESIGN\.md|STYLE\.md|\.\./shared|/work/")
        found = [(os.path.basename(p), m.group()) for p in DOCS for m in bad.finditer(_read(p))]
        self.assertEqual(found, [])

    def test_no_source_comment_points_outside_the_repository(self):
        """Comments and docstrings of the package cite docs/, never WIRE.md, DESIGN.md,
        STYLE.md or ../shared, which are not part of the repository."""
        bad = re.compile(r"(?<!docs/)WIRE\.md|DESIGN\.md|STYLE\.md|\.\./shared")
        sources = [p for p in glob.glob(os.path.join(ROOT, "joblet_persist", "**", "*.py"),
                                        recursive=True) if "_proto" not in p]
        self.assertTrue(sources)
        found = [(os.path.relpath(p, ROOT), m.group()) for p in sources
                 for m in bad.finditer(_read(p))]
        self.assertEqual(found, [])

    def test_named_docs_exist(self):
        """Every docs/NAME.md a doc mentions is in the repository."""
        missing = set()
        for path in DOCS:
            for name in re.findall(r"docs/([\w-]+\.md)", _read(path)):
                if not os.path.exists(os.path.join(ROOT, "docs", name)):
                    missing.add((os.path.basename(path), name))
        self.assertEqual(missing, set())


def _wire_rows():
    """(module, message, number, field) for each single field row of docs/wire.md."""
    text = _read(os.path.join(ROOT, "docs", "wire.md"))
    persist_from = text.index("## 2. gRPC")
    message = None
    cell = r"\|[ \t]*([^|\n]*?)[ \t]*"
    for match in re.finditer("^" + cell * 4 + r"\|", text, re.M):
        name, number, field, _type = (g.strip() for g in match.groups())
        if name == "message" or set(name) <= set("-") and name:
            continue
        if name:
            message = re.findall(r"\b([A-Z]\w+)(?: \(\d+\))?", name)
        module = persist_pb2 if match.start() > persist_from else ipc_pb2
        if not number or not message:
            continue
        fields = [f.strip() for f in field.split(",")]
        if ".." in number:
            first, last = map(int, number.split(".."))
            numbers = range(first, last + 1)
            if len(fields) != len(numbers):
                continue  # "same fields as ..."
        else:
            numbers = [int(number)]
        for m in message:
            for n, f in zip(numbers, fields[: len(numbers)], strict=True):
                yield module, m, n, f


class WireDocTests(SynchronousTestCase):
    def test_wire_tables_match_the_protos(self):
        """Every field row of docs/wire.md (message, number, name) is in the generated
        descriptors, for the IPC and the query packages."""
        rows = list(_wire_rows())
        self.assertGreater(len(rows), 100)
        wrong = []
        for module, message, number, field in rows:
            descriptor = module.DESCRIPTOR.message_types_by_name.get(message)
            if descriptor is None:
                wrong.append((module.__name__, message, "no such message"))
                continue
            by_number = descriptor.fields_by_number.get(number)
            if by_number is None or by_number.name != field:
                wrong.append((module.__name__, message, number, field))
        self.assertEqual(wrong, [])


class HealthExampleTests(SynchronousTestCase):
    def test_health_example_shows_the_version(self):
        """docs/operations.md's /health example carries the running version, as /health
        does (not an empty string)."""
        from joblet_persist import __version__

        doc = _read(os.path.join(ROOT, "docs", "operations.md"))
        self.assertIn(f'"version": "{__version__}"}}', doc)


def _produced_frame_reject_reasons() -> set:
    """The rejection reasons the service can produce: every string literal ingest.py passes
    as the reason of a rejection (``self._reject(...)``, ``rejections.reject(...)``), and
    the reasons of ``events.EventDecodeError`` (ingest passes ``e.reason`` on)."""
    reasons = set()
    tree = ast.parse(_read(os.path.join(ROOT, "joblet_persist", "ingest.py")))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("_reject", "reject") and node.args):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                reasons.add(arg.value)
    tree = ast.parse(_read(os.path.join(ROOT, "joblet_persist", "events.py")))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "EventDecodeError" and node.args
                and isinstance(node.args[0], ast.Constant)):
            reasons.add(node.args[0].value)
    return reasons


def _documented_frame_reject_reasons() -> set:
    """The ``reason`` values docs/operations.md lists for persist_ipc_frames_rejected_total."""
    text = _read(os.path.join(ROOT, "docs", "operations.md"))
    row = re.search(r"^\| `persist_ipc_frames_rejected_total` \|[^|]*\|([^|]*)\|", text, re.M)
    return set(re.findall(r"`(\w+)`", row.group(1).split("`reason`:", 1)[1]))


class RejectReasonDocTests(SynchronousTestCase):
    def test_documented_reasons_are_the_produced_ones(self):
        """docs/operations.md lists exactly the frame rejection reasons ingest produces (no
        reason that is no longer produced, none missing), and the metric's series that
        exist from the first scrape (metrics.FRAME_REJECT_REASONS) are those same reasons."""
        produced = _produced_frame_reject_reasons()
        self.assertIn("stalled_frame", produced)  # the extraction finds them
        self.assertIn("too_many_connections", produced)
        self.assertEqual(_documented_frame_reject_reasons(), produced)
        self.assertEqual(set(FRAME_REJECT_REASONS), produced)
