"""The C member-table builder produces exactly the Python encoder's bytes and errors."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist.storage import format as fmt
from joblet_persist.storage.compress import make_compressor

I64 = st.integers(-(2**63), 2**63 - 1)
U64 = st.integers(0, 2**64 - 1)


@st.composite
def batches(draw):
    n = draw(st.integers(1, 60))
    contents = draw(st.lists(st.binary(max_size=40), min_size=n, max_size=n))
    timestamps = draw(
        st.one_of(
            st.lists(I64, min_size=n, max_size=n),
            st.lists(st.integers(1_700_000_000 * 10**9, 1_700_000_100 * 10**9), min_size=n,
                     max_size=n),
        )
    )
    sequences = draw(st.lists(U64, min_size=n, max_size=n))
    start = draw(I64.filter(lambda v: v < 2**63 - 10_000))
    steps = draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
    ordinals, value = [], start
    for step in steps:
        value += step
        ordinals.append(value)
    if ordinals[-1] > 2**63 - 1:
        ordinals = list(range(n))
    return timestamps, sequences, ordinals, contents


def _encode(batch, use_c: bool, max_member_raw: int):
    saved = fmt._member_table
    if not use_c:
        fmt._member_table = None
    try:
        return fmt.encode_log_members(*batch, make_compressor("zlib", 1),
                                      max_member_raw=max_member_raw)
    finally:
        fmt._member_table = saved


class MemberTableTests(SynchronousTestCase):
    def setUp(self):
        if fmt._member_table is None:
            self.skipTest("joblet_persist._speedups is not built (no C compiler at install)")

    @given(batches(), st.integers(1, 400))
    def test_same_members_as_python(self, batch, max_member_raw):
        """For any valid batch, including extreme timestamps and sequences whose deltas wrap,
        the C path encodes byte-identical members with identical MemberInfo."""
        self.assertEqual(_encode(batch, True, max_member_raw),
                         _encode(batch, False, max_member_raw))

    def test_same_errors_as_python(self):
        """Out-of-range values and non-increasing ordinals raise ValueError on both paths."""
        bad = [
            ([2**63], [0], [0], [b"x"]),
            ([-(2**63) - 1], [0], [0], [b"x"]),
            ([0], [-1], [0], [b"x"]),
            ([0], [2**64], [0], [b"x"]),
            ([0, 0], [0, 0], [1, 1], [b"x", b"y"]),
            ([0, 0], [0, 0], [2, 1], [b"x", b"y"]),
            ([0, 0], [0, 0], [0, 2**63], [b"x", b"y"]),
        ]
        for batch in bad:
            for use_c in (True, False):
                with self.subTest(batch=batch, c=use_c):
                    self.assertRaises(ValueError, _encode, batch, use_c, 1 << 20)

    def test_order_checked_across_member_boundaries(self):
        """A non-increasing ordinal exactly at a member boundary is still refused."""
        batch = ([0, 0, 0], [0, 0, 0], [5, 6, 6], [b"aa", b"bb", b"cc"])
        self.assertRaises(ValueError, _encode, batch, True, 2)
