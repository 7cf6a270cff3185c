"""Kinds of stored data are enums with one table each, and keep their on-disk names."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import retention
from joblet_persist.events import KINDS, KINDS_BY_NAME
from joblet_persist.storage import api, jobindex, segment
from joblet_persist.writer import BufferKey


class KindTests(SynchronousTestCase):
    def test_values_are_the_on_disk_names(self):
        """Each kind's value is the name in paths and files, so the layout is unchanged."""
        events = [f"{k.name}_events" for k in KINDS]
        self.assertEqual(
            [k.value for k in api.SegmentKind], ["stdout", "stderr", "metrics", *events]
        )
        self.assertEqual([p.value for p in api.Part], ["logs", "metrics", "events"])
        self.assertEqual(
            segment.segment_name(api.SegmentKind.SOCKET_DATA_EVENTS, 2),
            KINDS_BY_NAME["socket_data"].segment_name(2),
        )
        self.assertEqual(jobindex.job_dir("/d", api.SegmentKind.EXEC_EVENTS, "j"), "/d/events/j")
        self.assertEqual(segment.segment_name(api.SegmentKind.STDERR, 3), "stderr_000003.log.gz")
        self.assertEqual(segment.segment_name(api.SegmentKind.METRICS, 0), "metrics.jsonl.gz")
        self.assertEqual(jobindex.job_dir("/d", api.SegmentKind.STDOUT, "j"), "/d/logs/j")
        self.assertEqual(jobindex.job_dir("/d", api.SegmentKind.METRICS, "j"), "/d/metrics/j")
        # As strings they serialise and compare as before.
        self.assertEqual(json.dumps([api.SegmentKind.STDOUT]), '["stdout"]')
        self.assertEqual(api.Part.LOGS, "logs")

    def test_every_kind_has_a_row_in_every_table(self):
        """Adding a kind means adding rows: each table covers every member, no if-chain decides."""
        self.assertEqual(set(api.PART_OF_KIND), set(api.SegmentKind))
        self.assertEqual(set(segment.SEGMENT_KINDS), set(api.SegmentKind))
        self.assertEqual(
            sorted(k for kinds in api.KINDS_OF_PART.values() for k in kinds),
            sorted(api.SegmentKind),
        )
        self.assertEqual(set(retention.PART_OF_TARGET.values()), set(api.Part))
        self.assertEqual(set(api.COUNT_FIELD_OF_PART), set(api.Part))
        self.assertEqual(set(api.COUNT_FIELD_OF_KIND), set(api.SegmentKind))
        fields = set(api.JobInfo.__dataclass_fields__)
        self.assertLessEqual(set(api.COUNT_FIELD_OF_KIND.values()), fields)
        for name in api.COUNT_FIELD_OF_PART.values():
            self.assertTrue(hasattr(api.JobInfo, name), name)
        # Every event kind of the codec has its segment kind, buffer and count field.
        self.assertEqual(set(api.KIND_OF_EVENT), set(KINDS_BY_NAME))
        for kind in KINDS:
            self.assertEqual(api.KIND_OF_EVENT[kind.name].value, kind.stem)
            self.assertEqual(BufferKey(kind.msg_type).name, api.KIND_OF_EVENT[kind.name].name)

    def test_parsed_names_are_kinds(self):
        """parse_segment_name returns a SegmentKind, for every kind's names and no others."""
        for kind in api.SegmentKind:
            for index in (0, 7):
                parsed = segment.parse_segment_name(segment.segment_name(kind, index))
                self.assertEqual(parsed, (kind, index))
                self.assertIsInstance(parsed[0], api.SegmentKind)
        self.assertIsNone(segment.parse_segment_name("stdout.jsonl.gz"))
        self.assertIsNone(segment.parse_segment_name("events.log.gz"))

    def test_writer_buffer_key_is_not_a_stream(self):
        """The writer's metrics buffer has its own name, distinct from STREAM_UNSPECIFIED."""
        self.assertIs(BufferKey(api.STREAM_STDOUT), BufferKey.STDOUT)
        self.assertIs(BufferKey(api.STREAM_STDERR), BufferKey.STDERR)
        self.assertEqual(BufferKey.METRICS.name, "METRICS")
        self.assertEqual(api.KIND_OF_STREAM.get(api.STREAM_UNSPECIFIED), None)

    def test_retention_targets(self):
        """Retention's actions name their target with Target; part targets map to Parts."""
        policy = retention.RetentionPolicy(log_max_age=10)
        jobs = [retention.JobUsage("a", 0.0, 5, 7)]
        plan = retention.plan_retention(jobs, policy, now=100000.0)
        self.assertEqual([(a.what, a.job_id) for a in plan.actions], [("logs", "a")])
        self.assertIs(plan.actions[0].what, retention.Target.LOGS)
        self.assertIs(retention.PART_OF_TARGET[plan.actions[0].what], api.Part.LOGS)
