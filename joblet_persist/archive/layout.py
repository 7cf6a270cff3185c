"""What an archive stores and where: object keys, the member-table sidecar, the manifest.

Leaf module: pure functions and ``thd_*`` blocking file work for a pool thread;
no reactor, no boto3.  docs/storage-format.md section "Archived segments" is
the specification of the keys, the sidecar and the manifest.

- An archived segment is the segment file's bytes exactly as on disk (plain
  gzip), stored at ``{prefix}{node_id}/{job}/{kind}/{segment name}``.
- Its sidecar, at the same key plus ``.members.json``, lists the segment's
  members (offset, size, counts, ordinal/timestamp/sequence bounds) so that a
  reader can fetch single members with ranged GETs.
- The manifest (``<dataDir>/archive_s3.json``) records which segment files
  were uploaded, by (size, inode, mtime): a file that grew or was rewritten no
  longer matches and is uploaded again.  It is replaced atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Optional

from joblet_persist.storage import safefs, segment
from joblet_persist.storage.api import PART_OF_KIND, SegmentKind
from joblet_persist.storage.format import (
    CorruptMember,
    MemberInfo,
    inflate_member,
    parse_member_header,
    read_member_header,
)

SIDECAR_SUFFIX = ".members.json"
SIDECAR_FORMAT = "joblet-persist-segment-members"
SIDECAR_VERSION = 1
#: The sidecar's member columns, in order (each member is one list of these).
SIDECAR_COLUMNS = (
    "offset", "size", "count", "raw_size", "first_ordinal", "last_ordinal",
    "min_timestamp", "max_timestamp", "first_sequence", "last_sequence",
    "kind",  # the member kind (format.KIND_*): tells members of the older service apart
)  # fmt: skip
MANIFEST_FILENAME = "archive_s3.json"
MANIFEST_VERSION = 1


def job_prefix(prefix: str, node_id: str, job_id: str) -> str:
    """The key prefix of every object of one job (ends in ``/``)."""
    return f"{prefix}{node_id}/{job_id}/"


def node_prefix(prefix: str, node_id: str) -> str:
    """The key prefix of every object of one node (ends in ``/``)."""
    return f"{prefix}{node_id}/"


def object_key(prefix: str, node_id: str, job_id: str, kind: str, name: str) -> str:
    """``{prefix}{node_id}/{job}/{kind}/{segment name}``."""
    return f"{job_prefix(prefix, node_id, job_id)}{kind}/{name}"


def sidecar_key(key: str) -> str:
    """The member-table sidecar of the object at ``key``."""
    return key + SIDECAR_SUFFIX


def archived_kinds(parts: Iterable[str]) -> tuple[SegmentKind, ...]:
    """The segment kinds of the named parts (all kinds when ``parts`` is empty)."""
    wanted = set(parts)
    return tuple(k for k in SegmentKind if not wanted or PART_OF_KIND[k].value in wanted)


def routed_kinds(routes) -> dict:
    """``{SegmentKind: mode}`` of the kinds ``routes`` (config.RoutesConfig) sends, by
    their part's route; kinds routed ``never`` are left out."""
    modes = {kind: routes.mode(PART_OF_KIND[kind]) for kind in SegmentKind}
    return {kind: mode for kind, mode in modes.items() if mode != "never"}


def job_of_key(node_prefix: str, key: str) -> Optional[str]:
    """The job of an object key under ``node_prefix`` (``{prefix}{node_id}/``), or None."""
    if not key.startswith(node_prefix):
        return None
    job, sep, _rest = key[len(node_prefix):].partition("/")
    return job if sep and job else None


# -- segment files on disk ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentFile:
    """One segment file as a scan found it; immutable."""

    job_id: str
    kind: SegmentKind
    index: int
    name: str
    path: str
    size: int
    ino: int
    mtime_ns: int
    last: bool  # the highest index of its kind: appends may still go to it

    @property
    def stamp(self) -> tuple[int, int, int]:
        """What changes when the file grows or is replaced."""
        return (self.size, self.ino, self.mtime_ns)


def thd_scan_jobs(data_dir: str, job_ids: Iterable[str], kinds: Iterable[SegmentKind]) -> dict:
    """``{job: [SegmentFile, ...]}`` of the segments on disk.  Pool thread.

    Symlinks and other non-regular entries are skipped (segment listing never
    follows them); a job directory that is missing or vanishes has no files.
    """
    from joblet_persist.storage import jobindex

    kinds = tuple(kinds)
    found: dict = {}
    for job_id in job_ids:
        files = []
        for kind in kinds:
            listed = segment.thd_list_segments(jobindex.job_dir(data_dir, kind, job_id), kind)
            for n, (index, path) in enumerate(listed):
                try:
                    st = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                files.append(SegmentFile(
                    job_id, kind, index, os.path.basename(path), path,
                    st.st_size, st.st_ino, st.st_mtime_ns, n == len(listed) - 1,
                ))  # fmt: skip
        found[job_id] = files
    return found


def walk_members(f, size: int) -> tuple[list[MemberInfo], int]:
    """The complete members of file ``f`` within its first ``size`` bytes, and where they end.

    Members are walked by their headers; the last one is inflated and checked
    (CRC32, size) so that a member still being written is never included.
    Plain gzip members without our header (files of the older service) are
    found with the segment scanner's rules when ``f`` has a name.
    """
    members: list[MemberInfo] = []
    pos = 0
    while pos < size:
        try:
            info, _hlen = parse_member_header(read_member_header(f, pos, size), pos)
        except ValueError:
            break
        if info is None or pos + info.size > size:
            break
        members.append(info)
        pos = info.offset + info.size
    while members:
        try:
            inflate_member(f, members[-1])
            break
        except CorruptMember:
            members.pop()
    end = members[-1].offset + members[-1].size if members else 0
    return members, end


def sidecar_bytes(job_id: str, node_id: str, kind: str, name: str, size: int,
                  members: Iterable[MemberInfo]) -> bytes:
    """The sidecar document of a segment uploaded with ``size`` bytes."""
    doc = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "node_id": node_id,
        "job": job_id,
        "kind": str(kind),
        "segment": name,
        "size": size,
        "columns": list(SIDECAR_COLUMNS),
        "members": [[getattr(m, c) for c in SIDECAR_COLUMNS] for m in members],
    }
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def parse_sidecar(data: bytes) -> dict:
    """The sidecar document, members as dicts; ValueError when it is not one."""
    doc = json.loads(data)
    if doc.get("format") != SIDECAR_FORMAT or doc.get("version") != SIDECAR_VERSION:
        raise ValueError("not a joblet-persist segment sidecar of a known version")
    columns = doc["columns"]
    doc["members"] = [dict(zip(columns, row, strict=True)) for row in doc["members"]]
    return doc


class SegmentReader:
    """A segment file opened without following symlinks, read within a fixed extent.

    ``open`` walks its members up to the size found; ``size`` is then the end of
    complete members (what is uploaded), ``members`` their headers.  Pool thread.
    """

    def __init__(self, path: str):
        fd = safefs.open_file(path, 3, os.O_RDONLY)
        self._file = os.fdopen(fd, "rb")
        st = os.fstat(fd)
        self.stat_size, self.ino, self.mtime_ns = st.st_size, st.st_ino, st.st_mtime_ns
        self.members, self.size = walk_members(self._file, self.stat_size)
        if not self.members and self.stat_size:
            # Not our format (a file of the older service): its scanned valid extent.
            scan = segment.thd_scan_segment(path, repair=False, depth=3)
            self.members, self.size = list(scan.members), scan.valid_size

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        self._file.seek(offset)
        return self._file.read(length)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- the manifest -------------------------------------------------------------


def manifest_path(data_dir: str) -> str:
    return os.path.join(data_dir, MANIFEST_FILENAME)


@dataclass
class Manifest:
    """What the archive has taken: ``segments[job][kind/name] = [size, ino, mtime_ns]``.

    ``deletes`` holds the jobs whose archived objects DeleteJob asked to
    remove and that are not removed yet (retried until S3 answers).
    ``target`` is (bucket, prefix, node_id): a manifest written for another
    target is ignored (everything is uploaded to the new one).  Reactor thread
    (mutations); written by ``thd_write_manifest`` from a copy.
    """

    target: tuple
    segments: dict
    deletes: dict

    @classmethod
    def empty(cls, target: tuple) -> Manifest:
        return cls(tuple(target), {}, {})

    @staticmethod
    def entry_name(kind: str, name: str) -> str:
        return f"{kind}/{name}"

    def matches(self, f: SegmentFile) -> bool:
        entry = self.segments.get(f.job_id, {}).get(self.entry_name(f.kind, f.name))
        return entry is not None and tuple(entry) == f.stamp

    def record(self, job_id: str, kind: str, name: str, stamp: tuple) -> None:
        self.segments.setdefault(job_id, {})[self.entry_name(kind, name)] = list(stamp)

    def forget_job(self, job_id: str) -> None:
        self.segments.pop(job_id, None)

    def prune(self, on_disk: dict) -> bool:
        """Drop entries of files a scan no longer found (scanned jobs only); True if any."""
        changed = False
        for job_id, files in on_disk.items():
            entries = self.segments.get(job_id)
            if not entries:
                continue
            present = {self.entry_name(f.kind, f.name) for f in files}
            for name in [n for n in entries if n not in present]:
                del entries[name]
                changed = True
            if not entries:
                del self.segments[job_id]
        return changed

    def to_bytes(self) -> bytes:
        bucket, prefix, node_id = self.target
        doc = {
            "version": MANIFEST_VERSION,
            "bucket": bucket,
            "prefix": prefix,
            "node_id": node_id,
            "segments": self.segments,
            "deletes": self.deletes,
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, target: tuple) -> Manifest:
        """Parse a manifest; one for another target, or of an unknown version, is empty."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION:
            raise ValueError("unknown manifest version")
        if (doc.get("bucket"), doc.get("prefix"), doc.get("node_id")) != tuple(target):
            return cls.empty(target)
        segments = doc.get("segments")
        deletes = doc.get("deletes")
        if not isinstance(segments, dict) or not isinstance(deletes, dict):
            raise ValueError("manifest segments/deletes are not objects")
        for entries in segments.values():
            for stamp in entries.values():
                if not (isinstance(stamp, list) and len(stamp) == 3
                        and all(isinstance(v, int) for v in stamp)):
                    raise ValueError(f"bad manifest entry {stamp!r}")
        return cls(tuple(target), segments, deletes)


def thd_read_manifest(data_dir: str) -> Optional[bytes]:
    """The manifest file's bytes, None when there is none.  Pool thread."""
    return safefs.thd_read_state_file(manifest_path(data_dir))


def thd_write_manifest(data_dir: str, data: bytes, modes: safefs.FileModes = safefs.DEFAULT_MODES):
    """Replace the manifest atomically (safefs.thd_replace_file).  Pool thread."""
    safefs.thd_replace_file(manifest_path(data_dir), data, modes)
