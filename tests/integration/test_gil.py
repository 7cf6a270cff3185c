"""The pool threads' per-batch C routines let other threads run: they release the GIL.

The reactor thread needs the GIL for every frame it receives, so the work a pool thread
does on a batch (planning and joining members, writing event JSON lines) must not hold it.
Real threads: a witness thread counts while the main thread is inside one C call, with the
interpreter's switch interval set so long that the witness can only run while the main
thread has released the GIL.  (Batches under 256 messages and 64 KiB keep the GIL: handing
it over costs more.)
"""

from __future__ import annotations

import json
import sys
import threading
import time

from twisted.trial import unittest

from joblet_persist import events
from joblet_persist._proto import ipc_pb2
from joblet_persist.storage import format as fmt
from tests.test_events import encode_event

ATTEMPTS = 20


class _Witness:
    """A thread that counts, giving the GIL back after every step (``time.sleep(0)``)."""

    def __init__(self):
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.count += 1
            time.sleep(0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def ran_during(call, attempts: int = ATTEMPTS) -> bool:
    """Whether another thread ran while ``call()`` was running, in any of ``attempts`` calls.

    With the switch interval at an hour, the main thread keeps the GIL through the Python
    code around the call: the witness can count only while the call releases it.  A call
    that holds the GIL throughout gives no count in any attempt.
    """
    saved = sys.getswitchinterval()
    sys.setswitchinterval(3600)
    try:
        with _Witness() as witness:
            for _ in range(attempts):
                before = witness.count
                call()
                if witness.count != before:
                    return True
            return False
    finally:
        sys.setswitchinterval(saved)


class GilTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        if events._event_lines_c is None or fmt._metric_lines_c is None:
            raise unittest.SkipTest("joblet_persist._speedups is not built")

    def test_member_planning_releases_the_gil(self):
        """Planning a 200,000-message batch (boundaries, tables, joined and checksummed data)
        lets another thread run."""
        if fmt._plan_members_c is None:
            raise unittest.SkipTest("joblet_persist._speedups has no plan_members")
        n = 200_000
        items = [b"line %d of a batch of log output\n" % i for i in range(n)]
        ts = [1_700_000_000 * 10**9 + i for i in range(n)]
        ords = list(range(n))

        def call():
            fmt._plan_members_c(items, ts, ords, ords, 1 << 20, True, fmt.MAX_TABLE_BYTES)

        self.assertTrue(ran_during(call))

    def test_flush_sized_batches_are_planned_without_the_gil(self):
        """A batch of the size a busy job's event or sample buffer holds at a flush tick
        (4,000 JSON lines, under 256 KiB) is planned without the GIL too: the service seals
        dozens of them per second.  The call is short, so it gets more attempts: a call that
        holds the GIL still gives the witness no turn in any of them."""
        if fmt._plan_members_c is None:
            raise unittest.SkipTest("joblet_persist._speedups has no plan_members")
        n = 4000
        items = [b'{"pid":%d,"comm":"python3","fd":%d,"bytes":4096}\n' % (i, i % 64)
                 for i in range(n)]
        self.assertLess(sum(map(len, items)), 256 * 1024)
        ts = [1_700_000_000 * 10**9 + i for i in range(n)]
        ords = list(range(n))

        def call():
            fmt._plan_members_c(items, ts, ords, ords, events.MEMBER_RAW, True,
                                fmt.MAX_TABLE_BYTES, True)

        self.assertTrue(ran_during(call, attempts=500))

    def test_event_lines_release_the_gil(self):
        """Writing the JSON lines of 50,000 exec events lets another thread run."""
        payload = encode_event(3, {"pid": 4242, "ppid": 1, "filename": "/usr/bin/curl",
                                   "args": ["curl", "-s", "https://example.com/"]})
        n = 50_000
        payloads = [payload] * n
        layout = events._C_LAYOUTS[3]

        def call():
            return events._event_lines_c(layout, json.dumps("job"), payloads, [1] * n, [2] * n)

        self.assertTrue(ran_during(call))
        kind = events.KINDS_BY_TYPE[3]
        self.assertEqual(call(), [events.payload_json_line(kind, payload, "job", 1, 2)] * n)

    def test_metric_lines_release_the_gil(self):
        """Writing the JSON lines of 50,000 metric samples lets another thread run, and gives
        the protobuf route's lines."""
        n = 50_000
        payloads = []
        for i in range(n):
            m = ipc_pb2.Metric(timestamp=1_700_000_000 * 10**9 + i, sequence=i)
            m.data.cpu_usage = i / 7
            m.data.gpu_usage = float("nan") if i % 5 == 0 else i * 1e-9
            m.data.memory_usage = i * 4096
            m.data.network_io.rx_bytes = 2**62 + i
            payloads.append(m.SerializeToString())

        def call():
            return fmt._metric_lines_c(json.dumps("job"), payloads)

        self.assertTrue(ran_during(call))
        self.assertEqual(call(), [fmt._metric_json_line_py("job", p) for p in payloads])

    def test_witness_sees_a_call_that_holds_the_gil(self):
        """The check itself: a C call that holds the GIL throughout (sorting a long list of
        ints) gives the witness no turn."""
        values = list(range(2_000_000, 0, -1))
        self.assertFalse(ran_during(lambda: sorted(values)))
