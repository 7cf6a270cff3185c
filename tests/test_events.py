"""Tests for joblet_persist.events: the telemetry event kinds and their codec.

Payloads are encoded here by hand from the protocol's field numbers (a small protobuf
encoder below), never with the project's generated classes, and query messages are checked
by decoding their bytes by hand, so these tests hold the code to the wire contract itself.
"""

from __future__ import annotations

import base64
import json
from array import array

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import events
from joblet_persist._proto import ipc_pb2, ipc_views_pb2, persist_pb2

MASK64 = (1 << 64) - 1
U64_MAX = MASK64
U32_MAX = (1 << 32) - 1
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1

# -- the contract, written out from the protocol tables -------------------------------------

# IPC payload layouts: type -> (kind name, [(number, name, type)]).  Every event also starts
# with 1 job_uuid string, 2 timestamp int64, 3 sequence uint64.
_CONN = [
    (4, "pid", "u32"),
    (5, "comm", "str"),
    (6, "src_addr", "str"),
    (7, "src_port", "u32"),
    (8, "dst_addr", "str"),
    (9, "dst_port", "u32"),
    (10, "protocol", "str"),
]
IPC = {
    3: ("exec", [
        (4, "pid", "u32"), (5, "ppid", "u32"), (6, "uid", "u32"), (7, "gid", "u32"),
        (8, "comm", "str"), (9, "filename", "str"), (10, "args", "strs"),
    ]),
    4: ("connect", _CONN),
    5: ("accept", _CONN),
    6: ("socket_data", [
        (4, "pid", "u32"), (5, "comm", "str"), (6, "direction", "str"), (7, "addr", "str"),
        (8, "port", "u32"), (9, "protocol", "str"), (10, "bytes", "i64"),
    ]),
    7: ("mmap", [
        (4, "pid", "u32"), (5, "comm", "str"), (6, "addr", "u64"), (7, "length", "u64"),
        (8, "prot", "u32"), (9, "flags", "u32"), (10, "filename", "str"),
    ]),
    8: ("mprotect", [
        (4, "pid", "u32"), (5, "comm", "str"), (6, "addr", "u64"), (7, "length", "u64"),
        (8, "prot", "u32"),
    ]),
    9: ("file", [
        (4, "pid", "u32"), (5, "comm", "str"), (6, "path", "str"), (7, "operation", "str"),
        (8, "bytes", "i64"),
    ]),
}

# Query layout of joblet.persist: stored (IPC) name -> query field number, where it differs.
QUERY_NUMBER = {6: {"addr": 7, "port": 8, "bytes": 9, "protocol": 10}}
QUERY_NAME = {6: {"addr": "dst_addr", "port": "dst_port"}}
RPC = {
    3: ("QueryExecEvents", "ExecEvent"),
    4: ("QueryConnectEvents", "ConnectEvent"),
    5: ("QueryAcceptEvents", "AcceptEvent"),
    6: ("QuerySocketDataEvents", "SocketDataEvent"),
    7: ("QueryMmapEvents", "MmapEvent"),
    8: ("QueryMprotectEvents", "MprotectEvent"),
    9: ("QueryFileEvents", "FileEvent"),
}

# -- a tiny protobuf encoder and decoder -----------------------------------------------------


def varint(n: int) -> bytes:
    n &= MASK64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def f_int(number: int, value: int) -> bytes:
    return tag(number, 0) + varint(value)


def f_len(number: int, data) -> bytes:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return tag(number, 2) + varint(len(data)) + data


def encode_event(msg_type: int, values: dict, job="payload-job", ts=0, seq=0) -> bytes:
    """Hand-encode an event payload; ``values`` maps field name -> value (absent: unset)."""
    out = f_len(1, job) + f_int(2, ts) + f_int(3, seq)
    for number, name, type_ in IPC[msg_type][1]:
        if name not in values:
            continue
        value = values[name]
        if type_ == "strs":
            out += b"".join(f_len(number, v) for v in value)
        elif type_ == "str":
            out += f_len(number, value)
        else:
            out += f_int(number, value)
    return out


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def decode_fields(data: bytes) -> dict[int, list]:
    """Field number -> list of raw values (ints for varints, bytes for length-delimited)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire == 2:
            size, pos = read_varint(data, pos)
            value = data[pos : pos + size]
            pos += size
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def signed64(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


def query_wire(msg_type: int, job: str, ts: int, seq: int, values: dict) -> dict:
    """What the query message must hold on the wire: number -> list of raw values.

    Strings that are not UTF-8 appear with U+FFFD replacements, and their bytes in field 16
    (map entries: 1 key, 2 value).  Zero / empty scalars are absent (proto3).
    """
    want: dict[int, list] = {}
    non_utf8: dict[bytes, bytes] = {}

    def put(number, raw):
        want.setdefault(number, []).append(raw)

    def text(name, value):
        raw = value.encode("utf-8") if isinstance(value, str) else value
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            non_utf8[name.encode()] = raw
            return raw.decode("utf-8", "replace").encode("utf-8")
        return raw

    put(1, job.encode())
    if ts:
        put(2, ts & MASK64)
    if seq:
        put(3, seq)
    numbers = QUERY_NUMBER.get(msg_type, {})
    names = QUERY_NAME.get(msg_type, {})
    for number, name, type_ in IPC[msg_type][1]:
        number = numbers.get(name, number)
        qname = names.get(name, name)
        value = values.get(name)
        if type_ == "strs":
            for i, v in enumerate(value or ()):
                put(number, text(f"{qname}.{i}", v))
        elif type_ == "str":
            if value:
                put(number, text(qname, value))
        elif value:
            put(number, value & MASK64)
    for key, raw in non_utf8.items():
        put(16, f_len(1, key) + f_len(2, raw))
    return want


def stored_json(value):
    """The stored JSON form of a string value."""
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(value).decode()}


def sorted_wire(fields: dict) -> dict:
    """Map entries (field 16) may come in any order."""
    return {k: sorted(v) if k == 16 else v for k, v in fields.items()}


SAMPLES = {
    3: {"pid": 4242, "ppid": 1, "uid": 0, "gid": 0, "comm": "", "filename": "/usr/bin/curl",
        "args": ["curl", "-s", "https://example.com/ä"]},
    4: {"pid": 7, "comm": "curl", "src_addr": "10.0.0.2", "src_port": 51234,
        "dst_addr": "93.184.216.34", "dst_port": 443, "protocol": "tcp"},
    5: {"pid": 8, "comm": "nginx", "src_addr": "10.0.0.9", "src_port": 80, "dst_addr": "",
        "dst_port": 0, "protocol": "tcp"},
    6: {"pid": 9, "comm": "curl", "direction": "send", "addr": "93.184.216.34", "port": 443,
        "protocol": "tcp", "bytes": 517},
    7: {"pid": 10, "comm": "python3", "addr": 0x7F0000001000, "length": 4096, "prot": 5,
        "flags": 0x22, "filename": "/lib/libc.so.6"},
    8: {"pid": 11, "comm": "java", "addr": 0x7F0000002000, "length": 8192, "prot": 7},
    9: {"pid": 12, "comm": "cat", "path": "/etc/hosts", "operation": "read", "bytes": 174},
}
JOB = "job-7f3a"
TS = 1_700_000_000_123_456_789
SEQ = 42


def full_values(msg_type: int, values: dict) -> dict:
    """``values`` with every field of the kind present (zero / empty when missing)."""
    out = {}
    for _number, name, type_ in IPC[msg_type][1]:
        default = [] if type_ == "strs" else "" if type_ == "str" else 0
        out[name] = values.get(name, default)
    return out


class EventCodecTestsMixin:
    def assertRoundTrip(self, msg_type, values, ts=TS, seq=SEQ, payload=None):
        """IPC payload -> record -> stored line -> query message, each checked by hand."""
        if payload is None:
            payload = encode_event(msg_type, values, ts=7, seq=8)
        record = events.decode_event(msg_type, payload, JOB, ts, seq)
        line = events.event_json_line(record)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        obj = json.loads(line)
        expected = {"job_uuid": JOB, "timestamp": ts, "sequence": seq}
        for name, value in full_values(msg_type, values).items():
            if isinstance(value, list):
                expected[name] = [stored_json(v) for v in value]
            elif isinstance(value, (str, bytes)):
                expected[name] = stored_json(value)
            else:
                expected[name] = value
        self.assertEqual(obj, expected)
        self.assertEqual(list(obj), list(expected))
        kind = events.KINDS_BY_TYPE[msg_type]
        msg = events.event_message(kind, line, JOB)
        self.assertIsInstance(msg, getattr(persist_pb2, RPC[msg_type][1]))
        got = decode_fields(msg.SerializeToString())
        self.assertEqual(
            sorted_wire(got), sorted_wire(query_wire(msg_type, JOB, ts, seq, values))
        )
        return record, obj, msg


class ContractTests(SynchronousTestCase):
    """The .proto files follow the protocol tables."""

    def _check(self, descriptor, layout, bytes_strings=False, renumber=None, rename=None):
        fields = {f.number: f for f in descriptor.fields}
        common = [(1, "job_uuid", "str"), (2, "timestamp", "i64"), (3, "sequence", "u64")]
        types = {
            "u32": "uint32", "u64": "uint64", "i64": "int64",
            "str": "bytes" if bytes_strings else "string",
            "strs": "bytes" if bytes_strings else "string",
        }
        for number, name, type_ in common + layout:
            number = (renumber or {}).get(name, number)
            field = fields.pop(number)
            self.assertEqual(field.name, (rename or {}).get(name, name), descriptor.name)
            want = types[type_]
            got = {4: "uint64", 3: "int64", 13: "uint32", 9: "string", 12: "bytes"}[field.type]
            self.assertEqual(got, want, f"{descriptor.name}.{field.name}")
            self.assertEqual(field.is_repeated, type_ == "strs", f"{descriptor.name}.{field.name}")
        return fields

    def test_ipc_payloads(self):
        """Every IPC event message has the protocol's numbers and types, and no others."""
        for msg_type, (_name, layout) in IPC.items():
            descriptor = events.KINDS_BY_TYPE[msg_type].ipc_class.DESCRIPTOR
            self.assertEqual(descriptor.full_name, f"joblet.ipc.{RPC[msg_type][1]}")
            self.assertEqual(self._check(descriptor, layout), {})
            self.assertEqual(ipc_pb2.MessageType.Value(
                "MESSAGE_TYPE_" + _name.upper() + "_EVENT"), msg_type)

    def test_views(self):
        """The decoding views have the same numbers with every string declared bytes."""
        for msg_type, (_name, layout) in IPC.items():
            descriptor = events.KINDS_BY_TYPE[msg_type].view_class.DESCRIPTOR
            self.assertEqual(self._check(descriptor, layout, bytes_strings=True), {})

    def test_query_messages(self):
        """joblet.persist events: IPC numbers, socket data in the query layout, and only the
        extension field 16 (non_utf8, a string -> bytes map) added."""
        for msg_type, (_name, layout) in IPC.items():
            descriptor = getattr(persist_pb2, RPC[msg_type][1]).DESCRIPTOR
            rest = self._check(
                descriptor, layout,
                renumber=QUERY_NUMBER.get(msg_type), rename=QUERY_NAME.get(msg_type),
            )
            self.assertEqual(list(rest), [16])
            self.assertEqual(rest[16].name, "non_utf8")
            self.assertTrue(rest[16].message_type.GetOptions().map_entry)

    def test_rpcs(self):
        """The seven Query*Events RPCs stream their kind's message for a QueryTelemetryRequest,
        and the batched RPC streams EventBatch."""
        service = persist_pb2.DESCRIPTOR.services_by_name["PersistService"]
        for msg_type, (rpc, message) in RPC.items():
            method = service.methods_by_name[rpc]
            self.assertEqual(method.input_type.full_name, "joblet.persist.QueryTelemetryRequest")
            self.assertEqual(method.output_type.full_name, f"joblet.persist.{message}")
            self.assertTrue(method.server_streaming)
            self.assertFalse(method.client_streaming)
            kind = events.KINDS_BY_TYPE[msg_type]
            self.assertEqual(kind.rpc, rpc)
            self.assertIs(kind.persist_class, getattr(persist_pb2, message))
            self.assertEqual(persist_pb2.EventKind.Value(f"EVENT_KIND_{kind.name.upper()}"),
                             msg_type)
            batch_field = persist_pb2.EventBatch.DESCRIPTOR.fields_by_name[kind.batch_field]
            self.assertEqual(batch_field.message_type.full_name, f"joblet.persist.{message}")
        batched = service.methods_by_name["QueryEventsBatched"]
        self.assertTrue(batched.server_streaming)
        self.assertEqual(batched.output_type.name, "EventBatch")
        request = persist_pb2.QueryTelemetryRequest.DESCRIPTOR
        want = [("job_uuid", 1, 9), ("start_time", 2, 3), ("end_time", 3, 3), ("limit", 4, 5),
                ("offset", 5, 5), ("node_id", 6, 9)]
        self.assertEqual([(f.name, f.number, f.type) for f in request.fields], want)
        self.assertEqual(
            [(f.name, f.number, f.type) for f in batched.input_type.fields][:6], want
        )

    def test_count_extensions(self):
        """Event counts extend GetJobInfoResponse, JobInfo and GetStatsResponse with fields
        numbered 16 and up; the protocol's fields 1..7 are untouched."""
        for message, names in (
            (persist_pb2.GetJobInfoResponse, ("event_count", "event_counts")),
            (persist_pb2.JobInfo, ("event_count", "event_counts")),
            (persist_pb2.GetStatsResponse, ("total_events", "total_events_by_kind")),
        ):
            by_name = message.DESCRIPTOR.fields_by_name
            self.assertEqual([by_name[n].number for n in names], [16, 17])
            self.assertEqual(
                max(f.number for f in message.DESCRIPTOR.fields if f.name not in names),
                7 if message is persist_pb2.GetStatsResponse else 6,
            )

    def test_table(self):
        """One kind per type 3..9 with its file stem, and segment names like the metrics'."""
        self.assertEqual([k.msg_type for k in events.KINDS], list(range(3, 10)))
        self.assertEqual(
            [k.stem for k in events.KINDS],
            ["exec_events", "connect_events", "accept_events", "socket_data_events",
             "mmap_events", "mprotect_events", "file_events"],
        )
        for kind in events.KINDS:
            self.assertIs(events.KINDS_BY_NAME[kind.name], kind)
        exec_ = events.KINDS_BY_NAME["exec"]
        self.assertEqual(exec_.segment_name(0), "exec_events.jsonl.gz")
        self.assertEqual(exec_.segment_name(1), "exec_events_000001.jsonl.gz")
        self.assertEqual(exec_.segment_name(1234567), "exec_events_1234567.jsonl.gz")
        self.assertRaises(ValueError, exec_.segment_name, -1)
        # byte-wise sort is time order, as for logs and metrics
        names = [exec_.segment_name(i) for i in (0, 1, 2, 10, 999999)]
        self.assertEqual(sorted(names), names)


class DecodeTests(EventCodecTestsMixin, SynchronousTestCase):
    """decode_event, event_json_line and event_message on hand-encoded payloads."""

    def test_every_kind(self):
        """Each of the seven kinds decodes, is stored with its snake_case keys and comes back
        in its query layout (socket data: addr -> dst_addr 7, port -> dst_port 8)."""
        for msg_type, values in SAMPLES.items():
            record, obj, msg = self.assertRoundTrip(msg_type, values)
            self.assertEqual(record.kind.msg_type, msg_type)
        _, obj, msg = self.assertRoundTrip(6, SAMPLES[6])
        self.assertEqual((obj["addr"], obj["port"]), ("93.184.216.34", 443))
        self.assertEqual((msg.dst_addr, msg.dst_port, msg.bytes), ("93.184.216.34", 443, 517))

    def test_envelope_is_routing_key(self):
        """Job id, timestamp and sequence are the envelope's; the payload's copies are not
        used, except timestamp and sequence when the envelope's timestamp is 0."""
        payload = encode_event(9, SAMPLES[9], job="other-job", ts=111, seq=222)
        record = events.decode_event(9, payload, JOB, TS, SEQ)
        self.assertEqual((record.job_id, record.timestamp, record.sequence), (JOB, TS, SEQ))
        record = events.decode_event(9, payload, JOB, 0, 5)
        self.assertEqual((record.job_id, record.timestamp, record.sequence), (JOB, 111, 222))
        record = events.decode_event(9, payload, JOB, -5, 0)
        self.assertEqual(record.timestamp, -5)
        line = json.loads(events.event_json_line(record))
        self.assertEqual(line["job_uuid"], JOB)

    def test_extreme_integers(self):
        """uint64 addr/length at 2**64-1, uint32 at 2**32-1, int64 bytes at both ends and
        negative, timestamps at the int64 bounds and sequence at 2**64-1 stay exact."""
        for addr, length in ((U64_MAX, U64_MAX), (1 << 63, 1), (0, 0)):
            for msg_type in (7, 8):
                values = dict(SAMPLES[msg_type], addr=addr, length=length, pid=U32_MAX,
                              prot=U32_MAX)
                _, obj, msg = self.assertRoundTrip(msg_type, values, ts=I64_MIN, seq=U64_MAX)
                self.assertEqual((obj["addr"], obj["length"]), (addr, length))
                self.assertEqual((msg.addr, msg.length), (addr, length))
        for value in (-1, I64_MIN, I64_MAX, -517):
            _, obj, msg = self.assertRoundTrip(6, dict(SAMPLES[6], bytes=value), ts=I64_MAX)
            self.assertEqual((obj["bytes"], msg.bytes), (value, value))
            _, obj, msg = self.assertRoundTrip(9, dict(SAMPLES[9], bytes=value), ts=-1)
            self.assertEqual((obj["bytes"], msg.bytes), (value, value))
        line = events.event_json_line(
            events.decode_event(7, encode_event(7, {"addr": U64_MAX}), JOB, TS, U64_MAX)
        )
        self.assertIn(b'"addr":18446744073709551615', line)
        self.assertIn(b'"sequence":18446744073709551615', line)

    def test_empty(self):
        """Empty strings, absent fields and an empty payload are valid events of zeros."""
        for msg_type in IPC:
            self.assertRoundTrip(msg_type, {}, payload=b"")
            names = [n for _num, n, t in IPC[msg_type][1] if t == "str"]
            self.assertRoundTrip(msg_type, dict.fromkeys(names, ""))
        _, obj, msg = self.assertRoundTrip(3, {"args": ["", "", ""]})
        self.assertEqual(obj["args"], ["", "", ""])
        self.assertEqual(list(msg.args), ["", "", ""])

    def test_thousand_args(self):
        """1,000 arguments keep their order and content."""
        args = [f"arg-{i}-" + "x" * (i % 50) for i in range(1000)]
        _, obj, msg = self.assertRoundTrip(3, dict(SAMPLES[3], args=args))
        self.assertEqual(obj["args"], args)
        self.assertEqual(list(msg.args), args)

    def test_invalid_utf8(self):
        """Strings that are not valid UTF-8 (a stray byte, a surrogate, an overlong form) are
        accepted and kept: stored as {"b64": ...}, sent with U+FFFD in the string field and
        the original bytes in non_utf8."""
        bad = [b"\xff", b"ab\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"ok\x80ok"]
        values = dict(SAMPLES[3], comm=bad[0], filename=b"/tmp/\xfe.sh",
                      args=["sh", bad[1], "-c", bad[2]])
        _, obj, msg = self.assertRoundTrip(3, values)
        self.assertEqual(obj["comm"], {"b64": "/w=="})
        self.assertEqual(obj["args"][0], "sh")
        self.assertEqual(base64.b64decode(obj["args"][3]["b64"]), bad[2])
        self.assertEqual(dict(msg.non_utf8), {
            "comm": b"\xff", "filename": b"/tmp/\xfe.sh", "args.1": bad[1], "args.3": bad[2],
        })
        self.assertEqual(msg.comm, "\ufffd")
        self.assertEqual(list(msg.args)[::2], ["sh", "-c"])
        _, obj, msg = self.assertRoundTrip(6, dict(SAMPLES[6], addr=bad[4], comm=bad[3]))
        self.assertEqual(dict(msg.non_utf8), {"dst_addr": bad[4], "comm": bad[3]})
        self.assertEqual(json.loads(events.event_json_line(
            events.decode_event(9, encode_event(9, {"path": b"\xff\xfe"}), JOB, TS, 0)
        ))["path"], {"b64": "//4="})

    def test_unicode_kept(self):
        """Valid UTF-8 beyond ASCII (and control characters) is stored as JSON text, in one
        line, and comes back unchanged without a non_utf8 entry."""
        text = "naïve ☃ 𝄞 \n\t\u2028 \x00"
        _, obj, msg = self.assertRoundTrip(9, dict(SAMPLES[9], path=text))
        line = events.event_json_line(
            events.decode_event(9, encode_event(9, {"path": text}), JOB, TS, SEQ)
        )
        self.assertIn("naïve ☃ 𝄞 \\n\\t\u2028 \\u0000".encode(), line)
        self.assertEqual(obj["path"], text)
        self.assertEqual(msg.path, text)
        self.assertEqual(dict(msg.non_utf8), {})

    def test_unknown_fields_ignored(self):
        """Unknown fields of every wire type (varint, fixed64, length-delimited, fixed32,
        high field numbers) are skipped; the known fields are read."""
        extra = (
            f_int(11, 5) + tag(12, 1) + b"\x01" * 8 + f_len(13, b"\xff\x00zz")
            + tag(14, 5) + b"\x02" * 4 + f_int(536870911, U64_MAX) + f_len(99, b"")
        )
        for msg_type, values in SAMPLES.items():
            payload = extra + encode_event(msg_type, values) + extra
            self.assertRoundTrip(msg_type, values, payload=payload)

    def test_wrong_wire_type_ignored(self):
        """A known field number with another wire type is treated as an unknown field, as
        the protobuf runtime does."""
        payload = encode_event(9, SAMPLES[9]) + f_len(4, b"not a pid") + f_int(6, 3)
        self.assertRoundTrip(9, SAMPLES[9], payload=payload)

    def test_last_occurrence_wins(self):
        """A scalar field sent twice takes its last value; repeated args accumulate."""
        payload = encode_event(7, dict(SAMPLES[7], addr=1)) + f_int(6, 2) + f_len(5, "late")
        record = events.decode_event(7, payload, JOB, TS, SEQ)
        self.assertEqual(record.as_dict()["addr"], 2)
        self.assertEqual(record.as_dict()["comm"], "late")

    def test_bad_payload(self):
        """A payload that does not decode is EventDecodeError with reason bad_payload and a
        message naming the kind and the job."""
        good = encode_event(3, SAMPLES[3])
        for payload in (
            b"\x08",  # truncated varint
            b"\x08" + b"\xff" * 10 + b"\x01",  # varint of 11 bytes
            f_len(9, b"abc")[:-1],  # length past the end
            b"\x0f",  # wire type 7
            b"\x00\x00",  # field number 0
            good[:-1],
            good + tag(15, 3),  # group start without end
        ):
            with self.assertRaises(events.EventDecodeError) as cm:
                events.decode_event(3, payload, JOB, TS, SEQ)
            self.assertEqual(cm.exception.reason, "bad_payload")
            self.assertIn(JOB, str(cm.exception))
            self.assertIn("exec", str(cm.exception))

    def test_unknown_type(self):
        """Types other than 3..9 are EventDecodeError with reason unknown_type."""
        for msg_type in (0, 1, 2, 10, -1, 1 << 31):
            with self.assertRaises(events.EventDecodeError) as cm:
                events.decode_event(msg_type, b"", JOB, TS, SEQ)
            self.assertEqual(cm.exception.reason, "unknown_type")

    def test_json_lines_for_jq(self):
        """Each stored line is one compact JSON object that json.loads reads with exact
        integers (what `zcat | jq` sees), keyed in field-number order."""
        lines = b"".join(
            events.event_json_line(events.decode_event(t, encode_event(t, v), JOB, TS, SEQ))
            for t, v in SAMPLES.items()
        )
        parsed = [json.loads(line) for line in lines.splitlines()]
        self.assertEqual(len(parsed), 7)
        for obj, msg_type in zip(parsed, SAMPLES, strict=True):
            self.assertEqual(list(obj)[:3], ["job_uuid", "timestamp", "sequence"])
            self.assertEqual(list(obj)[3:], [name for _n, name, _t in IPC[msg_type][1]])
            self.assertIs(type(obj["timestamp"]), int)
            self.assertEqual(obj["timestamp"], TS)
        self.assertNotIn(b": ", lines)
        self.assertNotIn(b", ", lines.replace(b"curl -s", b""))


class StoredLineTests(SynchronousTestCase):
    """event_message on stored lines: tolerant of foreign lines, strict about non-objects."""

    def test_missing_and_wrong_keys(self):
        """Missing keys read as zero / empty, wrong types and out-of-range integers as zero,
        unknown keys are ignored; the job id is the one asked for."""
        kind = events.KINDS_BY_NAME["socket_data"]
        line = json.dumps({
            "job_uuid": "elsewhere", "timestamp": "1e3", "pid": -1, "port": 1 << 32,
            "bytes": 1.5, "addr": ["x"], "comm": {"b64": "not base64!"}, "direction": "recv",
            "extra": 1, "sequence": True,
        })
        msg = events.event_message(kind, line, JOB)
        self.assertEqual(msg, persist_pb2.SocketDataEvent(job_uuid=JOB, direction="recv"))
        msg = events.event_message(kind, b"{}", JOB)
        self.assertEqual(msg, persist_pb2.SocketDataEvent(job_uuid=JOB))

    def test_other_writers(self):
        """Lines of the older Go service (encoding/json of the IPC message: zero values
        omitted) and of protobuf's JSON mapping (camelCase, 64-bit integers as strings)
        read back as the same events."""
        kind = events.KINDS_BY_NAME["connect"]
        go = (b'{"job_uuid":"j","timestamp":1700000000000000001,"sequence":3,"pid":7,'
              b'"src_addr":"10.0.0.2","src_port":5123,"dst_addr":"1.1.1.1","dst_port":53,'
              b'"protocol":"udp"}')
        protojson = (b'{"jobUuid":"j","timestamp":"1700000000000000001","sequence":"3",'
                     b'"pid":7,"srcAddr":"10.0.0.2","srcPort":5123,"dstAddr":"1.1.1.1",'
                     b'"dstPort":53,"protocol":"udp"}')
        want = persist_pb2.ConnectEvent(
            job_uuid=JOB, timestamp=1700000000000000001, sequence=3, pid=7,
            src_addr="10.0.0.2", src_port=5123, dst_addr="1.1.1.1", dst_port=53,
            protocol="udp",
        )
        self.assertEqual(events.event_message(kind, go, JOB), want)
        self.assertEqual(events.event_message(kind, protojson, JOB), want)
        mmap = events.KINDS_BY_NAME["mmap"]
        msg = events.event_message(
            mmap, {"addr": "18446744073709551615", "length": "-1", "prot": "٣"}, JOB
        )
        self.assertEqual((msg.addr, msg.length, msg.prot), (U64_MAX, 0, 0))
        exec_ = events.KINDS_BY_NAME["exec"]
        self.assertEqual(
            list(events.event_message(exec_, {"args": ["a", 1, None, "b"]}, JOB).args),
            ["a", "", "", "b"],
        )

    def test_lone_surrogates(self):
        """JSON escapes of lone surrogates (which valid UTF-8 cannot hold) read as bytes that
        are not UTF-8: U+FFFD in the string field, the surrogatepass bytes in non_utf8."""
        kind = events.KINDS_BY_NAME["file"]
        msg = events.event_message(kind, b'{"path":"a\\ud800b","comm":"\\udcff"}', JOB)
        self.assertEqual(dict(msg.non_utf8), {"path": b"a\xed\xa0\x80b", "comm": b"\xed\xb3\xbf"})
        self.assertEqual(msg.comm, "\ufffd\ufffd\ufffd")
        msg.SerializeToString()

    def test_b64_that_is_utf8(self):
        """A {"b64": ...} whose bytes are valid UTF-8 comes back as plain text."""
        kind = events.KINDS_BY_NAME["file"]
        msg = events.event_message(kind, {"path": {"b64": "L2V0Yw=="}}, JOB)
        self.assertEqual((msg.path, dict(msg.non_utf8)), ("/etc", {}))

    def test_not_an_object(self):
        """A line that is not a JSON object raises EventRecordError."""
        kind = events.KINDS_BY_NAME["exec"]
        for line in (b"", b"not json", b"[1]", b"42", b"\xff", b'{"a":'):
            self.assertRaises(events.EventRecordError, events.event_message, kind, line, JOB)


# -- hypothesis ------------------------------------------------------------------------------

u32 = st.integers(0, U32_MAX)
u64 = st.integers(0, U64_MAX)
i64 = st.integers(I64_MIN, I64_MAX)
text = st.one_of(st.text(max_size=20), st.binary(max_size=20))
STRATEGY = {"u32": u32, "u64": u64, "i64": i64, "str": text,
            "strs": st.lists(text, max_size=8)}


@st.composite
def valid_events(draw):
    msg_type = draw(st.sampled_from(sorted(IPC)))
    values = {}
    for _number, name, type_ in IPC[msg_type][1]:
        if draw(st.booleans()):
            values[name] = draw(STRATEGY[type_])
    return msg_type, values, draw(i64), draw(u64)


# Text with lone surrogates too (JSON can escape them; st.text() leaves them out).
any_text = st.text(st.characters(exclude_categories=()), max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)
field_keys = st.sampled_from(sorted(
    {name for _t, (_k, layout) in IPC.items() for _n, name, _ty in layout}
    | {"job_uuid", "timestamp", "sequence", "srcAddr", "dstPort", "b64"}
))


class FuzzTests(EventCodecTestsMixin, SynchronousTestCase):
    """Property tests of the codec."""

    @given(
        st.sampled_from(sorted(IPC)),
        st.dictionaries(field_keys | st.text(max_size=5), json_values, max_size=12),
    )
    def test_arbitrary_stored_objects(self, msg_type, obj):
        """Any JSON object as a stored line gives a message that serializes; nothing
        raises (foreign or damaged files must not break a query)."""
        kind = events.KINDS_BY_TYPE[msg_type]
        line = json.dumps(obj)
        msg = events.event_message(kind, line, JOB)
        msg.SerializeToString()
        self.assertEqual(msg.job_uuid, JOB)

    @given(valid_events(), json_values, st.booleans())
    def test_event_message_shortcut_agrees(self, event, value, as_bytes):
        """event_message (with its shortcut for lines this service writes) gives exactly
        the message of the tolerant route, record_message(event_record_from_json(...)), for
        a stored line as written and for its variants: each key's value replaced by each
        value at or past a type's edge and by any JSON value, each key removed, a key
        added."""
        msg_type, values, ts, seq = event
        kind = events.KINDS_BY_TYPE[msg_type]
        payload = encode_event(msg_type, values, ts=ts, seq=seq)
        written = json.loads(events.payload_json_line(kind, payload, JOB, ts, seq))
        edges = [
            -1, 0, U32_MAX, U32_MAX + 1, I64_MIN, I64_MIN - 1, I64_MAX, I64_MAX + 1,
            U64_MAX, U64_MAX + 1, True, 1.0, "7", "\ud800", "\u00e9", {"b64": "/w=="}, [],
            ["a", "\ud800"], ["a", {"b64": "/w=="}], ["\u00e9"], None, value,
        ]
        variants = [written, {**written, "extra": value}]
        for key in written:
            variants.append({k: v for k, v in written.items() if k != key})
            variants.extend({**written, key: edge} for edge in edges)
        for obj in variants:
            line = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
            slow = events.record_message(events.event_record_from_json(kind, obj, JOB))
            self.assertEqual(events.event_message(kind, line if as_bytes else obj, JOB), slow)

    @given(st.binary(max_size=60))
    def test_arbitrary_stored_bytes(self, line):
        """Any bytes as a stored line: a message, or EventRecordError."""
        try:
            events.event_message(events.KINDS_BY_NAME["exec"], line, JOB).SerializeToString()
        except events.EventRecordError:
            pass

    @given(st.integers(0, 12), st.binary(max_size=200))
    def test_arbitrary_payload(self, msg_type, payload):
        """Any bytes as a payload of any type either decode into a record that stores and
        reads back, or raise EventDecodeError; nothing else."""
        try:
            record = events.decode_event(msg_type, payload, JOB, TS, SEQ)
        except events.EventDecodeError as e:
            self.assertIn(e.reason, ("bad_payload", "unknown_type"))
            return
        line = events.event_json_line(record)
        msg = events.event_message(record.kind, line, JOB)
        self.assertEqual(msg, events.record_message(record))
        self.assertEqual(events.event_record_from_json(record.kind, line, JOB), record)

    @given(st.integers(0, 12), st.binary(max_size=200), i64, u64)
    def test_check_event_agrees(self, msg_type, payload, ts, seq):
        """check_event accepts and rejects exactly what decode_event does, with the same
        reason, kind, timestamp and sequence; payload_json_line writes the same line."""
        try:
            record = events.decode_event(msg_type, payload, JOB, ts, seq)
        except events.EventDecodeError as e:
            with self.assertRaises(events.EventDecodeError) as cm:
                events.check_event(msg_type, payload, JOB, ts, seq)
            self.assertEqual((cm.exception.reason, str(cm.exception)), (e.reason, str(e)))
            return
        kind, ts2, seq2 = events.check_event(msg_type, payload, JOB, ts, seq)
        self.assertEqual((kind, ts2, seq2), (record.kind, record.timestamp, record.sequence))
        self.assertEqual(
            events.payload_json_line(kind, payload, JOB, ts2, seq2),
            events.event_json_line(record),
        )

    @given(valid_events(), st.booleans())
    def test_check_event_valid(self, event, envelope_time):
        """On valid events check_event gives the envelope's time, or the payload's when the
        envelope's timestamp is 0, and payload_json_line the line decode_event's record has."""
        msg_type, values, ts, seq = event
        payload = encode_event(msg_type, values, ts=ts, seq=seq)
        env_ts = (ts ^ 1) or 5 if envelope_time else 0
        kind, ts2, seq2 = events.check_event(msg_type, payload, JOB, env_ts, 9)
        self.assertEqual((ts2, seq2), (env_ts, 9) if envelope_time else (ts, seq))
        self.assertEqual(
            events.payload_json_line(kind, payload, JOB, ts2, seq2),
            events.event_json_line(events.decode_event(msg_type, payload, JOB, env_ts, 9)),
        )

    @given(st.sampled_from(sorted(IPC)), st.binary(max_size=200))
    def test_agrees_with_ipc_message(self, msg_type, payload):
        """Whenever the generated IPC message class accepts a payload, decode_event accepts
        it with the same values; it rejects only what the runtime rejects for other reasons
        than UTF-8."""
        kind = events.KINDS_BY_TYPE[msg_type]
        try:
            ipc = kind.ipc_class.FromString(payload)
        except Exception:
            return
        record = events.decode_event(msg_type, payload, JOB, TS, SEQ)
        for field, value in zip(kind.fields, record.values, strict=True):
            want = getattr(ipc, field.key)
            self.assertEqual(list(want) if field.type == "repeated string" else want,
                             list(value) if isinstance(value, tuple) else value)

    @given(valid_events(), st.binary(max_size=30))
    def test_valid_events_round_trip(self, event, junk):
        """Arbitrary valid events, hand-encoded, round-trip to the stored line and to the
        query message exactly; the view parse equals what the generated view class reads."""
        msg_type, values, ts, seq = event
        self.assertRoundTrip(msg_type, values, ts=ts or 1, seq=seq)
        payload = encode_event(msg_type, values) + f_len(15, junk)
        view = events.KINDS_BY_TYPE[msg_type].view_class.FromString(payload)
        self.assertIsInstance(view, getattr(ipc_views_pb2, view.DESCRIPTOR.name))


# Raw bytes of string fields: ASCII with every control character, quotes and backslashes,
# any text, and bytes that are often not UTF-8 (lone surrogates, overlong forms, > U+10FFFF).
_RAW_TEXT = st.one_of(
    st.text(st.characters(max_codepoint=0x7F), max_size=12).map(str.encode),
    st.text(max_size=8).map(str.encode),
    st.binary(max_size=12),
    st.sampled_from([b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\x7f\x00\x1f"]),
)


@st.composite
def _event_wire_field(draw) -> bytes:
    """One field of an event payload: a known number (1..10) or an unknown one, with any wire
    type (wrong ones too), varints of any length (10-byte ones with bits past 64 too),
    uint32 fields given values past 32 bits, groups, and string bytes of every sort."""
    number = draw(st.one_of(st.integers(1, 10), st.integers(11, 40)))
    wire = draw(st.sampled_from([0, 0, 0, 2, 2, 2, 1, 5, 3, 4]))
    head = tag(number, wire)
    if wire == 0:
        if draw(st.integers(0, 9)) == 0:
            return head + b"\xff" * 9 + draw(st.sampled_from([b"\x01", b"\x7f", b"\x03"]))
        return head + varint(draw(st.one_of(u32, u64, st.integers(I64_MIN, -1))))
    if wire == 2:
        return f_len(number, draw(_RAW_TEXT))
    if wire == 1:
        return head + bytes(8)
    if wire == 5:
        return head + bytes(4)
    if wire == 3:
        return head + f_int(1, 7) + tag(number, 4)
    return head


class BatchLineTests(SynchronousTestCase):
    """payload_json_lines: the stored lines of a batch, byte for byte payload_json_line's."""

    @given(
        st.sampled_from(sorted(IPC)),
        st.lists(st.lists(_event_wire_field(), max_size=12), min_size=1, max_size=4),
        st.text(max_size=12), i64, u64,
    )
    def test_same_as_single_lines(self, msg_type, payloads, job_id, ts, seq):
        """For any payloads (canonical or not: wrong wire types, groups, unknown fields,
        10-byte varints, uint32 values past 32 bits, control characters, invalid UTF-8,
        truncation) and any job id text, each line of the batch (the C builder when the
        extension is built, and without it) is payload_json_line's line, or None where it
        raises."""
        kind = events.KINDS_BY_TYPE[msg_type]
        batch = []
        for fields in payloads:
            payload = b"".join(fields)
            batch.extend((payload, payload[:-1]))
        want = []
        for payload in batch:
            try:
                want.append(events.payload_json_line(kind, payload, job_id, ts, seq))
            except events.EventDecodeError:
                want.append(None)
        n = len(batch)
        for builder in (events._event_lines_c, None):  # the C builder, then none
            self.patch(events, "_event_lines_c", builder)
            # Int columns as lists, and packed as the writer's event buffers hold them.
            for stamps, seqs in (([ts] * n, [seq] * n), (array("q", [ts] * n),
                                                         array("Q", [seq] * n))):
                got = events.payload_json_lines(kind, batch, job_id, stamps, seqs)
                self.assertEqual(got, want)

    @given(st.lists(valid_events(), min_size=1, max_size=6))
    def test_valid_events(self, evs):
        """Hand-encoded valid events of any kind: the batch's lines are the lines of
        decode_event's records (event_json_line), for each event's own time."""
        for msg_type, values, ts, seq in evs:
            kind = events.KINDS_BY_TYPE[msg_type]
            payload = encode_event(msg_type, values, ts=ts, seq=seq)
            record = events.decode_event(msg_type, payload, JOB, ts, seq)
            self.assertEqual(events.payload_json_lines(kind, [payload], JOB, [ts], [seq]),
                             [events.event_json_line(record)])

    def test_c_builder_in_use(self):
        """With the extension built, canonical payloads take the C builder: every kind,
        64-bit extremes, 1,000 args, escapes and invalid UTF-8; a payload it leaves to the
        protobuf route (a string field sent as a varint) is None from it."""
        if events._event_lines_c is None:
            from twisted.trial.unittest import SkipTest

            raise SkipTest("joblet_persist._speedups is not built")
        by_type = {
            "u32": U32_MAX, "u64": U64_MAX, "i64": I64_MIN,
            "strs": ["a"] * 999 + [b"\xc0\xaf", "\u00e9\t"],
        }
        texts = ["c\"\\\n\x01\x7f\u00e9\u2028", b"\xff/x", "", "10.0.0.1"]
        for msg_type, (_name, layout) in sorted(IPC.items()):
            kind = events.KINDS_BY_TYPE[msg_type]
            mine = {name: by_type[t] if t != "str" else texts[n % len(texts)]
                    for n, name, t in layout}
            payload = encode_event(msg_type, mine, ts=I64_MIN, seq=U64_MAX)
            line = events._event_lines_c(
                events._C_LAYOUTS[msg_type], json.dumps(JOB), [payload], [I64_MAX], [U64_MAX]
            )[0]
            self.assertEqual(line, events.payload_json_line(kind, payload, JOB, I64_MAX,
                                                            U64_MAX))
            bad = payload + f_int(5, 1)  # comm (or ppid's neighbour) as a varint
            if layout[1][2] == "str":
                self.assertIsNone(events._event_lines_c(
                    events._C_LAYOUTS[msg_type], json.dumps(JOB), [bad], [1], [1])[0])

    def test_c_builder_takes_packed_columns(self):
        """Packed timestamps (array('q')) and sequences (array('Q')) give the lines lists
        give, 64-bit extremes included; packed columns of another item type are a
        TypeError, and columns of another length a ValueError, naming what they must be;
        payload_json_lines copies other arrays to lists."""
        if events._event_lines_c is None:
            from twisted.trial.unittest import SkipTest

            raise SkipTest("joblet_persist._speedups is not built")
        kind = events.KINDS_BY_TYPE[3]
        payloads = [encode_event(3, {"pid": i, "comm": "sh"}, ts=1, seq=1) for i in range(300)]
        stamps = [I64_MIN, I64_MAX] + list(range(298))
        seqs = [U64_MAX, 0] + list(range(298))
        layout, job = events._C_LAYOUTS[3], json.dumps(JOB)
        want = events._event_lines_c(layout, job, payloads, stamps, seqs)
        self.assertNotIn(None, want)
        self.assertEqual(events._event_lines_c(layout, job, payloads, array("q", stamps),
                                               array("Q", seqs)), want)
        self.assertEqual(events._event_lines_c(layout, job, payloads, stamps,
                                               array("Q", seqs)), want)
        for odd in ((array("Q", seqs), array("Q", seqs)),
                    (array("q", stamps), array("i", [0] * 300))):
            with self.assertRaises(TypeError) as caught:
                events._event_lines_c(layout, job, payloads, *odd)
            self.assertIn("array('q')", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            events._event_lines_c(layout, job, payloads, array("q", stamps[:5]), seqs)
        self.assertIn("column lengths differ", str(caught.exception))
        self.assertEqual(
            events.payload_json_lines(kind, payloads, JOB, array("l", stamps),
                                      array("Q", seqs)), want)

    def test_has_none(self):
        """has_none (C when built) and has_none_py: whether a batch's lines hold None, by
        identity (an item equal to None is not None); anything but a list is a TypeError."""

        class EqualsEverything:
            def __eq__(self, other):
                return True

            __hash__ = object.__hash__

        cases = [
            ([], False), ([b"x\n"], False), ([None], True), ([b"a", b"b", None], True),
            ([None, b"a"], True), ([EqualsEverything(), b""], False), ([b""] * 1000, False),
        ]
        for check in {events.has_none, events.has_none_py}:
            for lines, want in cases:
                self.assertIs(check(lines), want, (check, lines[:3]))
            for other in ((None,), iter([None]), b"x"):
                self.assertRaises(TypeError, check, other)

    def test_c_builder_leaves_odd_inputs_to_python(self):
        """A payload that is not bytes, or whose timestamp or sequence does not fit 64 bits,
        is None from the C builder and only that one; payload_json_lines then gives each the
        protobuf route's line."""
        if events._event_lines_c is None:
            from twisted.trial.unittest import SkipTest

            raise SkipTest("joblet_persist._speedups is not built")
        kind = events.KINDS_BY_TYPE[3]
        payload = encode_event(3, {"pid": 5, "comm": "sh"}, ts=1, seq=1)
        payloads = [payload, bytearray(payload), payload, payload]
        stamps, seqs = [1, 2, -(1 << 70), 4], [1, 2, 3, -1]
        lines = events._event_lines_c(
            events._C_LAYOUTS[3], json.dumps(JOB), payloads, stamps, seqs)
        self.assertEqual([line is None for line in lines], [False, True, True, True])
        self.assertEqual(
            events.payload_json_lines(kind, payloads, JOB, stamps, seqs),
            [events.payload_json_line(kind, p, JOB, t, q)
             for p, t, q in zip(payloads, stamps, seqs, strict=True)])


class DocsTests(SynchronousTestCase):
    """The storage format document shows what the codec writes."""

    def test_storage_format_examples(self):
        """The example event lines in docs/storage-format.md section 9 are exactly what
        event_json_line produces for those events, and its base64 example decodes."""
        import os

        path = os.path.join(os.path.dirname(__file__), "..", "docs", "storage-format.md")
        with open(path, encoding="utf-8") as f:
            doc = f.read()
        section = doc.split("## 9. Telemetry events", 1)[1]
        block = section.split("```json\n", 1)[1].split("```", 1)[0]
        produced = [
            events.decode_event(3, encode_event(3, {
                "pid": 4242, "ppid": 1, "filename": "/usr/bin/curl",
                "args": ["curl", "-s", "https://example.com/"]}),
                "<job>", 1700000000123456789, 42),
            events.decode_event(6, encode_event(6, {
                "pid": 4242, "comm": "curl", "direction": "send", "addr": "93.184.216.34",
                "port": 443, "protocol": "tcp", "bytes": 517}),
                "<job>", 1700000000223456789, 43),
            events.decode_event(7, encode_event(7, {
                "pid": 4242, "comm": "curl", "addr": U64_MAX, "length": 4096, "prot": 5,
                "flags": 34, "filename": b"/lib/\xfe"}),
                "<job>", 1700000000323456789, 44),
        ]
        self.assertEqual(block.encode(), b"".join(map(events.event_json_line, produced)))
        for kind in events.KINDS:
            self.assertIn(f"`{kind.stem}`", section)
            for field in kind.fields:
                self.assertIn(f"`{field.key}`", section)


class EventMemberTests(SynchronousTestCase):
    """Event lines in the seekable gzip format (storage/format.py)."""

    def test_members_round_trip(self):
        """A batch of event lines becomes members whose JP kind is the IPC type; a file of
        them scans (thd_scan_segment), reads back member by member with timestamps and
        sequences from the table, and plain gzip (zcat) yields exactly the lines."""
        import gzip
        import os

        from joblet_persist.storage import format as fmt
        from joblet_persist.storage.compress import make_compressor
        from joblet_persist.storage.segment import thd_scan_segment

        records = [
            events.decode_event(
                7, encode_event(7, dict(SAMPLES[7], addr=i, filename=b"/x/\xff" * (i % 3))),
                JOB, TS + i * 1000, i,
            )
            for i in range(3000)
        ]
        lines = [events.event_json_line(r) for r in records]
        pieces = fmt.encode_event_members(
            7, [r.timestamp for r in records], [r.sequence for r in records],
            list(range(100, 3100)), lines, make_compressor("zlib", 6), max_member_raw=64 * 1024,
        )
        self.assertGreater(len(pieces), 1)
        blob = b"".join(data for data, _info in pieces)
        for data, info in pieces:
            self.assertEqual(info.kind, 7)
            self.assertEqual(data[16:18], b"\x01\x07")  # JP version 1, kind 7
        self.assertEqual(gzip.decompress(blob), b"".join(lines))
        path = os.path.join(self.mktemp())
        with open(path, "wb") as f:
            f.write(blob)
        scan = thd_scan_segment(path, repair=False)
        self.assertEqual(scan.valid_size, len(blob))
        got_lines, got_ts, got_seq = [], [], []
        with open(path, "rb") as f:
            for member in scan.members:
                self.assertEqual(member.kind, 7)
                table, data = fmt.read_member(f, member)
                got_ts += list(table.timestamps)
                got_seq += list(table.sequences)
                got_lines += data.splitlines(keepends=True)
        self.assertEqual(got_lines, lines)
        self.assertEqual(got_ts, [r.timestamp for r in records])
        self.assertEqual(got_seq, [r.sequence for r in records])
        kind = events.KINDS_BY_TYPE[7]
        self.assertEqual(
            [events.event_message(kind, line, JOB) for line in got_lines[:5]],
            [events.record_message(r) for r in records[:5]],
        )

    def test_bad_batches(self):
        """Only kinds 3..9 and newline-terminated lines are accepted."""
        from joblet_persist.storage import format as fmt
        from joblet_persist.storage.compress import make_compressor

        comp = make_compressor("zlib", 6)
        for kind in (0, 1, 2, 10):
            self.assertRaises(ValueError, fmt.encode_event_members, kind, [1], [1], [1],
                              [b"{}\n"], comp)
        self.assertRaises(ValueError, fmt.encode_event_members, 3, [1], [1], [1], [b"{}"], comp)


class ZcatJqTests(SynchronousTestCase):
    """What an operator sees with the standard tools."""

    def test_zcat_and_jq(self):
        """`zcat` of an event file prints exactly the JSON lines, and jq reads each one:
        keys, the args array, the b64 form of a non-UTF-8 name (which base64 -d restores)."""
        import os
        import shutil
        import subprocess

        from twisted.trial.unittest import SkipTest

        from joblet_persist.storage import format as fmt
        from joblet_persist.storage.compress import make_compressor

        if not (shutil.which("zcat") and shutil.which("jq")):
            raise SkipTest("zcat and jq are needed")
        args = [f"a{i}" for i in range(1000)] + [b"\xfe\xff"]
        records = [
            events.decode_event(3, encode_event(3, dict(SAMPLES[3], args=args, comm=b"\xc0")),
                                JOB, TS, 1),
            events.decode_event(3, encode_event(3, {"pid": 12, "comm": "cat"}), JOB, TS + 1, 2),
        ]
        lines = [events.event_json_line(r) for r in records]
        pieces = fmt.encode_event_members(3, [TS, TS + 1], [1, 2], [1, 2], lines,
                                          make_compressor("zlib", 6))
        path = os.path.join(self.mktemp() + ".jsonl.gz")
        with open(path, "wb") as f:
            f.write(b"".join(data for data, _ in pieces))
        out = subprocess.run(["zcat", path], capture_output=True, check=True).stdout
        self.assertEqual(out, b"".join(lines))
        program = (
            '[(.args | length), (.comm | if type == "object" then .b64 else . end), '
            "(.timestamp | type), .pid]"
        )
        jq = subprocess.run(
            ["sh", "-c", 'zcat "$1" | jq -c "$2"', "sh", path, program],
            capture_output=True, check=True,
        ).stdout
        self.assertEqual(jq.splitlines(), [b'[1001,"wA==","number",4242]',
                                           b'[0,"cat","number",12]'])
        b64 = json.loads(out.splitlines()[0])["args"][1000]["b64"]
        raw = subprocess.run(["base64", "-d"], input=b64.encode(), capture_output=True,
                             check=True).stdout
        self.assertEqual(raw, b"\xfe\xff")


class EventMemberSizeTests(SynchronousTestCase):
    """Event batches are stored in members of at most events.MEMBER_RAW raw bytes."""

    def test_append_splits_members_at_member_raw(self):
        """thd_append_events cuts a batch of 3,000 events (~600 KB of JSON lines) into
        members of at most MEMBER_RAW raw bytes each (not the logs' 1 MiB), so that a first
        page or a narrow time range parses a few hundred lines, not a whole batch; the
        members hold every event, in order."""
        import os

        from joblet_persist.storage.compress import make_compressor
        from joblet_persist.storage.diskwork import thd_append_events

        kind = events.KINDS_BY_NAME["exec"]
        payloads = [
            encode_event(3, {"pid": i, "filename": "/usr/bin/python3",
                             "args": ["python3", "-m", "app.worker", "--shard", str(i)] * 3})
            for i in range(3000)
        ]
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, kind.segment_name(0))
        n = len(payloads)
        result = thd_append_events(
            path, directory, 0, False, make_compressor("deflate", 5), 0, JOB, kind,
            [TS + i for i in range(n)], list(range(n)), list(range(n)), payloads,
        )
        raw = sum(m.raw_size for m in result.members)
        self.assertGreater(raw, 4 * events.MEMBER_RAW)
        self.assertGreater(len(result.members), 4)
        for m in result.members:
            self.assertLessEqual(m.raw_size, events.MEMBER_RAW)
        self.assertEqual(sum(m.count for m in result.members), n)
        self.assertEqual(result.members[0].first_sequence, 0)
        self.assertEqual(result.members[-1].last_sequence, n - 1)
