"""The storage contract (storage/api.py) as tests, run against every backend and the fake.

``StorageBackendContractMixin`` is mixed into a ``SynchronousTestCase`` that
provides ``make_storage()``: a started backend whose Deferreds fire
synchronously (tests.fakes.FakeStorage, or LocalStorage with a synchronous
thread runner), and ``self.clock``, the task.Clock the backend reads time from.
Running the same tests against the fake and every real backend keeps the fake
honest.  The tests of an optional capability (IRetentionSegments,
IIdleUnload, IFreeSpace, IBulkLogReads) run where the backend provides it.

The contract, beyond storage/api.py's docstrings:

- Reactor-thread methods that take a job id fail their Deferred with
  InvalidJobId for an invalid id; any-thread lookups (snapshot, job_info)
  raise it.
- An empty batch fires with 0.
- Snapshots are immutable: one taken before an append does not change.
- Reading a snapshot whose data was deleted meanwhile raises DataVanished.
"""

from __future__ import annotations

from zope.interface.verify import verifyObject

from joblet_persist import events
from joblet_persist._proto import ipc_pb2
from joblet_persist.storage.api import (
    STREAM_STDERR,
    STREAM_STDOUT,
    STREAM_UNSPECIFIED,
    DataVanished,
    EventBatch,
    IBulkLogReads,
    IFreeSpace,
    IIdleUnload,
    IJobSnapshot,
    InvalidJobId,
    IRetentionSegments,
    IStorageBackend,
    JobInfo,
    LogBatch,
    LogRecord,
    MetricBatch,
    SegmentUsage,
    SpaceProbe,
)


def event_payload(kind: str, timestamp: int, sequence: int, **fields) -> bytes:
    """A serialized joblet.ipc event message of ``kind`` ("exec", ...)."""
    cls = events.KINDS_BY_NAME[kind].ipc_class
    return cls(job_uuid="ignored", timestamp=timestamp, sequence=sequence, **fields).SerializeToString()


def event_batch(job_id: str, kind: str, rows) -> EventBatch:
    """EventBatch from rows of (timestamp, sequence, arrival, payload)."""
    rows = list(rows)
    return EventBatch(
        job_id=job_id,
        kind=kind,
        timestamps=[r[0] for r in rows],
        sequences=[r[1] for r in rows],
        arrivals=[r[2] for r in rows],
        payloads=[r[3] for r in rows],
    )


INVALID_JOB_IDS = ("", "../x", "a/b", "..", "x" * 200, ".hidden", "a\x00b", "job id")


def log_batch(job_id: str, stream: int, rows) -> LogBatch:
    """LogBatch from rows of (timestamp, sequence, arrival, content)."""
    rows = list(rows)
    return LogBatch(
        job_id=job_id,
        stream=stream,
        timestamps=[r[0] for r in rows],
        sequences=[r[1] for r in rows],
        arrivals=[r[2] for r in rows],
        contents=[r[3] for r in rows],
    )


def metric_payload(job_id: str, timestamp: int, sequence: int, cpu: float = 1.5, **more) -> bytes:
    """A serialized joblet.ipc.Metric with every data field set."""
    m = ipc_pb2.Metric(job_uuid=job_id, timestamp=timestamp, sequence=sequence)
    m.data.cpu_usage = cpu
    m.data.memory_usage = more.get("memory", 1 << 40)
    m.data.gpu_usage = more.get("gpu", 0.25)
    m.data.disk_io.read_bytes = more.get("read_bytes", 2**62 + 3)
    m.data.disk_io.write_bytes = 11
    m.data.disk_io.read_ops = 12
    m.data.disk_io.write_ops = 13
    m.data.network_io.rx_bytes = 21
    m.data.network_io.tx_bytes = 22
    m.data.network_io.rx_packets = 23
    m.data.network_io.tx_packets = 24
    return m.SerializeToString()


def metric_batch(job_id: str, rows) -> MetricBatch:
    """MetricBatch from rows of (timestamp, sequence, arrival, payload)."""
    rows = list(rows)
    return MetricBatch(
        job_id=job_id,
        timestamps=[r[0] for r in rows],
        sequences=[r[1] for r in rows],
        arrivals=[r[2] for r in rows],
        payloads=[r[3] for r in rows],
    )


def reference_logs(records, stream, start_time=0, end_time=0, offset=0, limit=0):
    """What iter_logs must return for ``records`` [(arrival, LogRecord)]: brute force."""
    chosen = [
        r
        for _, r in sorted(records, key=lambda item: item[0])
        if (stream == STREAM_UNSPECIFIED or r.stream == stream)
        and (start_time <= 0 or r.timestamp >= start_time)
        and (end_time <= 0 or r.timestamp <= end_time)
    ]
    chosen = chosen[offset:]
    return chosen[:limit] if limit else chosen


class StorageBackendContractMixin:
    """Tests of the IStorageBackend contract; needs ``make_storage()`` and ``clock``."""

    JOB = "3f2a9c1e-0b7d-4e2a-9a51-1c0de0000001"

    def make_storage(self):
        raise NotImplementedError("the test case provides a started backend")

    def _append_logs(self, storage, job_id, stream, rows):
        return self.successResultOf(storage.append_logs(log_batch(job_id, stream, rows)))

    def _open(self, storage, job_id):
        return self.successResultOf(storage.open_job(job_id))

    def _sample_job(self, storage):
        """Append an interleaving of both streams; return [(arrival, LogRecord)]."""
        records = []
        plan = [
            (STREAM_STDOUT, [(1000, 1, 0, b"out-0\n"), (1000, 2, 2, b"out-1\n")]),
            (STREAM_STDERR, [(1500, 3, 1, b"err-0\n"), (2000, 4, 3, b"")]),
            (STREAM_STDOUT, [(2500, 5, 4, b"\x00\xffbinary"), (3000, 6, 6, b"out-3")]),
            (STREAM_STDERR, [(3000, 7, 5, b"err-2\n")]),
        ]
        for stream, rows in plan:
            self._append_logs(storage, self.JOB, stream, rows)
            records.extend((a, LogRecord(stream, ts, seq, content)) for ts, seq, a, content in rows)
        return records

    def test_append_then_read_back(self):
        """Appended log messages read back byte-exact with stream, timestamp and sequence."""
        storage = self.make_storage()
        rows = [(10, 1, 0, b"hello\n"), (11, 2, 1, b""), (12, 3, 2, bytes(range(256)))]
        written = self._append_logs(storage, self.JOB, STREAM_STDOUT, rows)
        self.assertIsInstance(written, int)
        snap = self._open(storage, self.JOB)
        self.assertEqual(snap.job_id, self.JOB)
        self.assertEqual(
            list(snap.iter_logs(STREAM_STDOUT)),
            [LogRecord(STREAM_STDOUT, ts, seq, c) for ts, seq, _, c in rows],
        )
        self.assertEqual(list(snap.iter_logs(STREAM_STDERR)), [])

    def test_merged_streams_in_arrival_order(self):
        """Stream 0 merges stdout and stderr by arrival, not by timestamp or per stream."""
        storage = self.make_storage()
        records = self._sample_job(storage)
        snap = self._open(storage, self.JOB)
        self.assertEqual(
            list(snap.iter_logs(STREAM_UNSPECIFIED)), reference_logs(records, STREAM_UNSPECIFIED)
        )
        self.assertEqual(list(snap.iter_logs(STREAM_STDERR)), reference_logs(records, STREAM_STDERR))

    def test_range_offset_limit(self):
        """Inclusive time range on bounds > 0, then offset, then limit, for every stream."""
        storage = self.make_storage()
        records = self._sample_job(storage)
        snap = self._open(storage, self.JOB)
        for stream in (0, 1, 2):
            for start, end in ((0, 0), (1000, 0), (0, 2000), (1500, 2500), (3001, 0), (1, 999)):
                for offset, limit in ((0, 0), (1, 0), (0, 2), (2, 1), (10, 0)):
                    self.assertEqual(
                        list(snap.iter_logs(stream, start, end, offset, limit)),
                        reference_logs(records, stream, start, end, offset, limit),
                        (stream, start, end, offset, limit),
                    )

    def test_snapshot_is_immutable(self):
        """A snapshot taken before an append keeps showing the data it was taken with."""
        storage = self.make_storage()
        self._append_logs(storage, self.JOB, STREAM_STDOUT, [(1, 1, 0, b"a")])
        before = self._open(storage, self.JOB)
        self._append_logs(storage, self.JOB, STREAM_STDOUT, [(2, 2, 1, b"b")])
        self.assertEqual([r.content for r in before.iter_logs(0)], [b"a"])
        self.assertEqual(before.info.log_count, 1)
        after = storage.snapshot(self.JOB)
        self.assertEqual([r.content for r in after.iter_logs(0)], [b"a", b"b"])

    def test_job_info_counts(self):
        """JobInfo counts messages of both kinds and spans their timestamps."""
        storage = self.make_storage()
        self._sample_job(storage)
        payloads = [(900, 1, 10, metric_payload(self.JOB, 900, 1))]
        self.successResultOf(storage.append_metrics(metric_batch(self.JOB, payloads)))
        info = storage.job_info(self.JOB)
        self.assertIsInstance(info, JobInfo)
        self.assertEqual((info.job_id, info.log_count, info.metric_count), (self.JOB, 7, 1))
        self.assertEqual((info.first_timestamp, info.last_timestamp), (900, 3000))
        self.assertEqual(self._open(storage, self.JOB).info, info)
        self.assertIn(info, storage.list_jobs())

    def test_metrics_round_trip(self):
        """Metric samples read back with exact integers and docs/wire.md snake_case keys."""
        storage = self.make_storage()
        rows = [
            (5_000_000_001, 7, 0, metric_payload(self.JOB, 5_000_000_001, 7, cpu=12.5)),
            (5_000_000_002, 8, 1, metric_payload(self.JOB, 5_000_000_002, 8, memory=3)),
        ]
        self.successResultOf(storage.append_metrics(metric_batch(self.JOB, rows)))
        records = list(self._open(storage, self.JOB).iter_metrics())
        self.assertEqual([(r.timestamp, r.sequence) for r in records], [r[:2] for r in rows])
        data = records[0].data
        self.assertEqual(data["cpu_usage"], 12.5)
        self.assertEqual(data["memory_usage"], 1 << 40)
        self.assertEqual(data["disk_io"]["read_bytes"], 2**62 + 3)
        self.assertEqual(data["network_io"]["tx_packets"], 24)
        self.assertEqual(records[1].data["memory_usage"], 3)
        later = list(self._open(storage, self.JOB).iter_metrics(5_000_000_002))
        self.assertEqual([r.sequence for r in later], [8])

    def test_unknown_job(self):
        """A job never written is unknown everywhere."""
        storage = self.make_storage()
        self.assertIsNone(self._open(storage, "never-written"))
        self.assertIsNone(storage.snapshot("never-written"))
        self.assertIsNone(storage.job_info("never-written"))
        self.assertEqual(self.successResultOf(storage.delete_job("never-written")), 0)

    def test_empty_batch(self):
        """An empty batch fires with 0 bytes."""
        storage = self.make_storage()
        self.assertEqual(self._append_logs(storage, self.JOB, STREAM_STDOUT, []), 0)
        self.assertEqual(self.successResultOf(storage.append_metrics(metric_batch(self.JOB, []))), 0)

    def test_delete_then_recreate(self):
        """A deleted job is gone; data appended afterwards starts a fresh job."""
        storage = self.make_storage()
        self._sample_job(storage)
        freed = self.successResultOf(storage.delete_job(self.JOB))
        self.assertIsInstance(freed, int)
        self.assertIsNone(storage.job_info(self.JOB))
        self.assertIsNone(storage.snapshot(self.JOB))
        self.assertIsNone(self._open(storage, self.JOB))
        self.assertNotIn(self.JOB, [info.job_id for info in storage.list_jobs()])
        self._append_logs(storage, self.JOB, STREAM_STDERR, [(9, 1, 0, b"new")])
        snap = self._open(storage, self.JOB)
        self.assertEqual(list(snap.iter_logs(0)), [LogRecord(STREAM_STDERR, 9, 1, b"new")])
        self.assertEqual((snap.info.log_count, snap.info.first_timestamp), (1, 9))

    def test_invalid_job_ids_rejected(self):
        """Invalid job ids fail every entry point with InvalidJobId."""
        storage = self.make_storage()
        for bad in INVALID_JOB_IDS:
            self.failureResultOf(
                storage.append_logs(log_batch(bad, STREAM_STDOUT, [(1, 1, 0, b"x")])),
                InvalidJobId,
            )
            self.failureResultOf(
                storage.append_metrics(metric_batch(bad, [(1, 1, 0, metric_payload(bad, 1, 1))])),
                InvalidJobId,
            )
            self.failureResultOf(storage.open_job(bad), InvalidJobId)
            self.failureResultOf(storage.delete_job(bad), InvalidJobId)
            self.assertRaises(InvalidJobId, storage.snapshot, bad)
            self.assertRaises(InvalidJobId, storage.job_info, bad)
        self.assertEqual(tuple(storage.list_jobs()), ())

    def test_list_jobs(self):
        """list_jobs returns an immutable tuple holding every job's summary."""
        storage = self.make_storage()
        self.assertEqual(tuple(storage.list_jobs()), ())
        for n, job in enumerate(("job-b", "job-a")):
            self._append_logs(storage, job, STREAM_STDOUT, [(n + 1, 1, 0, b"x" * (n + 1))])
        jobs = storage.list_jobs()
        self.assertIsInstance(jobs, tuple)
        self.assertEqual(sorted(info.job_id for info in jobs), ["job-a", "job-b"])
        self.assertEqual({info.job_id: info for info in jobs}["job-a"], storage.job_info("job-a"))

    def test_provides_the_interfaces(self):
        """The backend and its snapshots provide IStorageBackend / IJobSnapshot, and every
        optional capability they declare, with the declared methods and attributes."""
        storage = self.make_storage()
        self.assertTrue(verifyObject(IStorageBackend, storage))
        for capability in (IRetentionSegments, IIdleUnload, IFreeSpace):
            if capability.providedBy(storage):
                self.assertTrue(verifyObject(capability, storage))
        self._sample_job(storage)
        snap = self._open(storage, self.JOB)
        self.assertTrue(verifyObject(IJobSnapshot, snap))
        if IBulkLogReads.providedBy(snap):
            self.assertTrue(verifyObject(IBulkLogReads, snap))

    def test_bulk_reads_match_iter_logs(self):
        """IBulkLogReads chunks hold exactly iter_logs' records, in order (where provided)."""
        storage = self.make_storage()
        records = self._sample_job(storage)
        snap = self._open(storage, self.JOB)
        if not IBulkLogReads.providedBy(snap):
            return
        for stream in (0, 1, 2):
            for start, end, offset, limit in ((0, 0, 0, 0), (1500, 3000, 1, 2), (0, 0, 5, 0)):
                flat = []
                for streams, timestamps, sequences, contents in snap.iter_log_chunks(
                    stream, start, end, offset, limit
                ):
                    self.assertEqual(
                        len({len(streams), len(timestamps), len(sequences), len(contents)}), 1
                    )
                    flat.extend(map(LogRecord, streams, timestamps, sequences, contents))
                self.assertEqual(
                    flat, reference_logs(records, stream, start, end, offset, limit), stream
                )

    def test_list_jobs_page_and_totals(self):
        """list_jobs_page pages the jobs newest first (ties by id) within an inclusive
        created_at range, counting them all; totals sums every job's counts and bytes."""
        storage = self.make_storage()
        created = {}
        for n, job in enumerate(("job-c", "job-a", "job-b", "job-d")):
            if n in (1, 3):
                self.clock.advance(10)
            self._append_logs(storage, job, STREAM_STDOUT, [(n + 1, 1, 0, b"x" * (n + 1))])
            created[job] = storage.job_info(job).created_at
        infos = list(storage.list_jobs())
        newest_first = sorted(infos, key=lambda i: (-i.created_at, i.job_id))
        t0 = min(created.values())
        for since, until, offset, limit in (
            (0, 0, 0, 0), (0, 0, 1, 2), (t0 + 10, 0, 0, 0), (0, t0 + 10, 0, 1), (t0 + 11, 0, 0, 0),
        ):
            chosen = [
                i for i in newest_first
                if (since <= 0 or i.created_at >= since) and (until <= 0 or i.created_at <= until)
            ]
            page = chosen[offset : offset + limit] if limit else chosen[offset:]
            total, got = storage.list_jobs_page(since, until, offset, limit)
            self.assertEqual((total, list(got)), (len(chosen), page), (since, until, offset, limit))
        self.assertEqual(
            tuple(storage.totals()),
            (
                len(infos),
                sum(i.log_count for i in infos),
                sum(i.metric_count for i in infos),
                sum(i.size_bytes for i in infos),
            ),
        )

    def test_parts(self):
        """part_sizes splits a job's bytes into logs and metrics; delete_part removes one
        part and keeps the other (and created_at); deleting both leaves no job."""
        storage = self.make_storage()
        self.assertEqual(tuple(storage.part_sizes(self.JOB)), (0, 0, 0))
        self._sample_job(storage)
        payloads = [(900, 1, 10, metric_payload(self.JOB, 900, 1))]
        self.successResultOf(storage.append_metrics(metric_batch(self.JOB, payloads)))
        info = storage.job_info(self.JOB)
        logs, metrics, events_bytes = storage.part_sizes(self.JOB)
        self.assertEqual(events_bytes, 0)
        self.assertEqual(logs + metrics, info.size_bytes)
        self.assertGreater(logs, 0)
        self.assertGreater(metrics, 0)
        self.failureResultOf(storage.delete_part(self.JOB, "segment"), ValueError)
        self.assertEqual(self.successResultOf(storage.delete_part(self.JOB, "logs")), logs)
        after = storage.job_info(self.JOB)
        self.assertEqual((after.log_count, after.metric_count), (0, 1))
        self.assertEqual((after.created_at, after.size_bytes), (info.created_at, metrics))
        snap = self._open(storage, self.JOB)
        self.assertEqual(list(snap.iter_logs(0)), [])
        self.assertEqual([r.sequence for r in snap.iter_metrics()], [1])
        self.assertEqual(self.successResultOf(storage.delete_part(self.JOB, "metrics")), metrics)
        self.assertIsNone(storage.job_info(self.JOB))
        self.assertIsNone(self._open(storage, self.JOB))

    def _event_rows(self, kind, n, first_arrival=0, t0=1000):
        payload = {
            "exec": dict(pid=1, comm="sh", filename="/bin/sh", args=["sh", "-c", "true"]),
            "mmap": dict(pid=2, addr=(1 << 64) - 1, length=(1 << 64) - 1, filename="/lib.so"),
            "file": dict(pid=3, path="/etc/passwd", operation="open", bytes=-1),
        }.get(kind, dict(pid=4, comm="x"))
        return [
            (t0 + 10 * i, i + 1, first_arrival + i, event_payload(kind, t0 + 10 * i, i + 1, **payload))
            for i in range(n)
        ]

    def test_events_round_trip(self):
        """Events of every kind read back per kind, in arrival order, with exact integers,
        and a kind without events reads as empty; JobInfo counts them per kind."""
        storage = self.make_storage()
        arrival = 0
        for kind in events.KINDS:
            rows = self._event_rows(kind.name, 3, arrival)
            arrival += 3
            written = self.successResultOf(storage.append_events(event_batch(self.JOB, kind.name, rows)))
            self.assertGreater(written, 0)
        snap = self._open(storage, self.JOB)
        for kind in events.KINDS:
            got = list(snap.iter_events(kind.name))
            self.assertEqual([(r.timestamp, r.sequence) for r in got], [(1000, 1), (1010, 2), (1020, 3)])
            message = events.event_message(kind, got[0].data, self.JOB)
            self.assertEqual(message.job_uuid, self.JOB)
            self.assertEqual(message.timestamp, 1000)
        mmap = list(snap.iter_events("mmap"))[0].data
        self.assertEqual((mmap["addr"], mmap["length"]), ((1 << 64) - 1, (1 << 64) - 1))
        self.assertEqual(list(snap.iter_events("exec"))[0].data["args"], ["sh", "-c", "true"])
        self.assertEqual(list(snap.iter_events("file"))[0].data["bytes"], -1)
        info = storage.job_info(self.JOB)
        self.assertEqual(info.event_counts, {k.name: 3 for k in events.KINDS})
        self.assertEqual(info.event_count, 21)
        self.assertEqual((info.log_count, info.metric_count), (0, 0))
        self.assertEqual(storage.event_totals().get("exec"), 3)
        self.assertEqual(sum(storage.part_sizes(self.JOB)), info.size_bytes)
        self.assertEqual(storage.part_sizes(self.JOB)[2], info.size_bytes)
        self.assertRaises(ValueError, snap.iter_events, "nonsense")

    def test_events_range_offset_limit(self):
        """iter_events applies the inclusive range, then offset, then limit."""
        storage = self.make_storage()
        rows = self._event_rows("connect", 10)
        self.successResultOf(storage.append_events(event_batch(self.JOB, "connect", rows[:4])))
        self.successResultOf(storage.append_events(event_batch(self.JOB, "connect", rows[4:])))
        snap = self._open(storage, self.JOB)
        everything = [(ts, seq) for ts, seq, _a, _p in rows]
        for start, end in ((0, 0), (1010, 0), (0, 1050), (1030, 1060), (5000, 0)):
            for offset, limit in ((0, 0), (1, 0), (0, 2), (3, 4), (20, 0)):
                expected = [
                    r for r in everything
                    if (start <= 0 or r[0] >= start) and (end <= 0 or r[0] <= end)
                ][offset:]
                expected = expected[:limit] if limit else expected
                got = [(r.timestamp, r.sequence) for r in snap.iter_events("connect", start, end, offset, limit)]
                self.assertEqual(got, expected, (start, end, offset, limit))

    def test_events_undecodable_payload_left_out(self):
        """A payload that does not decode as its kind is left out; the rest is stored."""
        storage = self.make_storage()
        rows = self._event_rows("exec", 2)
        rows.insert(1, (1005, 9, 5, b"\xff\xff\xff"))
        self.successResultOf(storage.append_events(event_batch(self.JOB, "exec", rows)))
        snap = self._open(storage, self.JOB)
        self.assertEqual([r.sequence for r in snap.iter_events("exec")], [1, 2])
        self.assertEqual(storage.job_info(self.JOB).exec_events, 2)

    def test_events_bad_batches(self):
        """An unknown kind, an invalid job id or ragged columns fail the append; an empty
        batch fires with 0."""
        storage = self.make_storage()
        rows = self._event_rows("exec", 1)
        self.failureResultOf(storage.append_events(event_batch(self.JOB, "nonsense", rows)), ValueError)
        self.failureResultOf(storage.append_events(event_batch("../x", "exec", rows)), InvalidJobId)
        ragged = EventBatch(self.JOB, "exec", [1], [1, 2], [0], [rows[0][3]])
        self.failureResultOf(storage.append_events(ragged), ValueError)
        self.assertEqual(self.successResultOf(storage.append_events(event_batch(self.JOB, "exec", []))), 0)
        self.assertIsNone(storage.job_info(self.JOB))

    def test_events_part_and_delete(self):
        """Events are their own part: delete_part("events") removes them and keeps the
        logs; delete_job removes everything, and a snapshot read afterwards vanishes."""
        storage = self.make_storage()
        self._append_logs(storage, self.JOB, STREAM_STDOUT, [(1, 1, 100, b"x")])
        rows = self._event_rows("file", 2)
        self.successResultOf(storage.append_events(event_batch(self.JOB, "file", rows)))
        logs, metrics, events_bytes = storage.part_sizes(self.JOB)
        self.assertGreater(events_bytes, 0)
        self.assertEqual(self.successResultOf(storage.delete_part(self.JOB, "events")), events_bytes)
        info = storage.job_info(self.JOB)
        self.assertEqual((info.log_count, info.event_count, info.size_bytes), (1, 0, logs))
        self.assertEqual(list(self._open(storage, self.JOB).iter_events("file")), [])
        self.successResultOf(storage.append_events(event_batch(self.JOB, "file", self._event_rows("file", 1, 200))))
        snap = self._open(storage, self.JOB)
        self.assertEqual(len(list(snap.iter_events("file"))), 1)
        self.successResultOf(storage.delete_job(self.JOB))
        self.assertIsNone(storage.job_info(self.JOB))
        self.assertRaises(DataVanished, list, snap.iter_events("file"))

    def test_deleted_under_a_read(self):
        """Reading a snapshot whose job was deleted meanwhile raises DataVanished (the
        seam's error, never an OSError) for logs and metrics alike."""
        storage = self.make_storage()
        self._sample_job(storage)
        payloads = [(900, 1, 10, metric_payload(self.JOB, 900, 1))]
        self.successResultOf(storage.append_metrics(metric_batch(self.JOB, payloads)))
        snap = self._open(storage, self.JOB)
        self.successResultOf(storage.delete_job(self.JOB))
        with self.assertRaises(DataVanished) as caught:
            list(snap.iter_logs(0))
        self.assertEqual(caught.exception.job_id, self.JOB)
        self.assertRaises(DataVanished, list, snap.iter_metrics())
        if IBulkLogReads.providedBy(snap):
            self.assertRaises(DataVanished, list, snap.iter_log_chunks(0))

    def test_retention_segments(self):
        """IRetentionSegments: segment_usage lists a loaded job's segments (one last segment
        per kind, sizes adding up to the part sizes); the last one is refused, a closed one
        drops with its bytes and records, and readers of older snapshots see DataVanished."""
        storage = self.make_storage()
        if not IRetentionSegments.providedBy(storage):
            return
        self.assertEqual(tuple(storage.segment_usage("never-written")), ())
        for n in range(3):
            self._append_logs(storage, self.JOB, STREAM_STDOUT, [(n + 1, n, n, b"z" * 50)])
        old = self._open(storage, self.JOB)
        usage = storage.segment_usage(self.JOB)
        self.assertTrue(all(isinstance(u, SegmentUsage) for u in usage))
        self.assertEqual({u.kind for u in usage}, {"stdout"})
        self.assertEqual(sum(u.size_bytes for u in usage), storage.part_sizes(self.JOB)[0])
        self.assertEqual([u.last_segment for u in usage], [False] * (len(usage) - 1) + [True])
        last = usage[-1]
        self.failureResultOf(storage.drop_segment(self.JOB, "stdout", last.index), ValueError)
        self.failureResultOf(storage.drop_segment(self.JOB, "stdin", 0), ValueError)
        self.assertEqual(self.successResultOf(storage.drop_segment(self.JOB, "stdout", 999)), 0)
        if len(usage) == 1:
            return  # one segment holds everything: nothing may be dropped
        first = usage[0]
        freed = self.successResultOf(storage.drop_segment(self.JOB, "stdout", first.index))
        self.assertEqual(freed, first.size_bytes)
        info = storage.job_info(self.JOB)
        self.assertEqual(info.size_bytes, sum(u.size_bytes for u in usage[1:]))
        self.assertNotIn(0, [r.sequence for r in self._open(storage, self.JOB).iter_logs(0)])
        self.assertEqual(info.log_count, 3 - 1)
        self.assertRaises(DataVanished, list, old.iter_logs(0))

    def test_idle_unload(self):
        """IIdleUnload: a job unused for ``idle`` seconds leaves memory (snapshot() None,
        not resident) but not the index; open_job brings it back whole."""
        storage = self.make_storage()
        if not IIdleUnload.providedBy(storage):
            return
        self.assertFalse(storage.resident(self.JOB))
        records = self._sample_job(storage)
        self.assertTrue(storage.resident(self.JOB))
        loaded, unloaded = storage.loaded_jobs, storage.unloaded_jobs
        self.assertGreaterEqual(loaded, 1)
        self.assertEqual(storage.unload_idle(60), 0)
        self.clock.advance(61)
        self.assertEqual(storage.unload_idle(60), 1)
        self.assertEqual((storage.loaded_jobs, storage.unloaded_jobs), (loaded - 1, unloaded + 1))
        self.assertFalse(storage.resident(self.JOB))
        self.assertIsNone(storage.snapshot(self.JOB))
        self.assertIsNotNone(storage.job_info(self.JOB))
        snap = self._open(storage, self.JOB)
        self.assertEqual(list(snap.iter_logs(0)), reference_logs(records, 0))
        self.assertTrue(storage.resident(self.JOB))

    def test_free_space(self):
        """IFreeSpace: a healthy backend probes writable with its free space, and
        free_bytes reports room (or None when it cannot tell); neither fails."""
        storage = self.make_storage()
        if not IFreeSpace.providedBy(storage):
            return
        probe = self.successResultOf(storage.probe_space())
        self.assertIsInstance(probe, SpaceProbe)
        self.assertEqual((probe.writable, probe.error), (True, None))
        free = self.successResultOf(storage.free_bytes())
        self.assertTrue(free is None or free > 0, free)
