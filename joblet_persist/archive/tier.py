"""The read side of the S3 archive: what a bucket holds, and ranged reads of it.

Blocking functions and immutable values; no reactor.  The ``thd_*``
functions and ``ArchiveSource.fetch`` block on the network: they run on the
tiered storage's own pool (listings, sidecars at start) or on a gRPC handler
thread (a query's ranged GETs), never on the reactor.  boto3 is imported only
when ``make_read_client`` is called (archiving on).

- ``ArchivedSegment``: one archived segment (its key, size and members, from
  its ``.members.json`` sidecar or from the local segment it was copied from).
- ``ArchivedJob``: the archived segments of one job that are not on local disk,
  with the summary they add to the job's JobInfo.
- ``ArchiveSource``: a bucket, prefix and client; lists a node's or a job's
  objects (paginated ``list_objects_v2``), reads sidecars, and fetches byte
  ranges (counting the bytes in ``persist_archive_read_bytes_total``).  A
  read that cannot reach S3 raises StorageUnavailable naming the job; an
  object that is gone, DataVanished.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from joblet_persist import events
from joblet_persist.archive import layout
from joblet_persist.storage import jobindex, safefs
from joblet_persist.storage.api import (
    COUNT_FIELD_OF_KIND,
    EVENT_OF_KIND,
    DataVanished,
    JobInfo,
    SegmentKind,
    StorageUnavailable,
    is_valid_job_id,
)
from joblet_persist.storage.format import KIND_LOG, KIND_METRIC, MemberInfo
from joblet_persist.storage.reader import SegmentView
from joblet_persist.storage.remote import RemotePath
from joblet_persist.storage.segment import parse_segment_name

#: The member kind of each segment kind's members (sidecars written before the "kind"
#: column existed are read with it).
_MEMBER_KIND = {
    SegmentKind.STDOUT: KIND_LOG,
    SegmentKind.STDERR: KIND_LOG,
    SegmentKind.METRICS: KIND_METRIC,
    **{kind: events.KINDS_BY_NAME[name].msg_type for kind, name in EVENT_OF_KIND.items()},
}

#: Keys per list_objects_v2 page (S3's maximum).
LIST_PAGE = 1000


@dataclass(frozen=True, slots=True)
class ArchivedSegment:
    """One archived segment: ``key`` holds ``size`` bytes, the complete ``members``."""

    kind: SegmentKind
    index: int
    name: str
    key: str
    size: int
    members: tuple


@dataclass(frozen=True, slots=True)
class ListedObject:
    """A segment object a listing found: its job, kind, name and index, key, size, mtime."""

    job_id: str
    kind: SegmentKind
    index: int
    name: str
    key: str
    size: int
    modified: int  # Unix seconds


@dataclass(frozen=True)
class ArchivedJob:
    """The archived segments of a job that only the archive holds; immutable, any thread.

    ``segments`` maps a SegmentKind to its ArchivedSegments by index order.
    ``created_at``/``last_updated`` (Unix seconds) are the job's times as the
    local index had them when its segments were released, or, for a catalog
    rebuilt from a listing, the earliest message and the latest upload.
    """

    job_id: str
    created_at: int
    last_updated: int
    segments: dict

    def with_segments(self, added: Iterable[ArchivedSegment], created_at: int = 0,
                      last_updated: int = 0) -> ArchivedJob:
        """A copy holding ``added`` too (replacing segments of the same kind and index)."""
        merged = {kind: {s.index: s for s in segs} for kind, segs in self.segments.items()}
        for s in added:
            merged.setdefault(s.kind, {})[s.index] = s
        segments = {kind: tuple(by[i] for i in sorted(by)) for kind, by in merged.items()}
        created = min(t for t in (self.created_at, created_at) if t) if (
            self.created_at or created_at) else 0
        return dataclasses.replace(
            self, segments=segments, created_at=created,
            last_updated=max(self.last_updated, last_updated),
        )

    def info(self) -> JobInfo:
        """The job's JobInfo as far as the archived segments tell it."""
        counts, size, first, last = jobindex.tally_members(
            (kind, s.size, s.members) for kind, segs in self.segments.items() for s in segs
        )
        created = self.created_at or (first // 1_000_000_000 if first else self.last_updated)
        return JobInfo(self.job_id, created, self.last_updated or created,
                       size_bytes=size, first_timestamp=first, last_timestamp=last, **counts)

    def indexes(self, kind) -> frozenset:
        return frozenset(s.index for s in self.segments.get(kind, ()))


def combine_info(local: Optional[JobInfo], archived: Optional[ArchivedJob]) -> Optional[JobInfo]:
    """One JobInfo over a job's local data and its archive-only segments."""
    if archived is None:
        return local
    remote = archived.info()
    if local is None:
        return remote
    sums = {f: getattr(local, f) + getattr(remote, f) for f in set(COUNT_FIELD_OF_KIND.values())}
    firsts = [t for t in (local.first_timestamp, remote.first_timestamp) if t]
    return dataclasses.replace(
        local,
        created_at=min(local.created_at, remote.created_at) if remote.created_at else local.created_at,
        size_bytes=local.size_bytes + remote.size_bytes,
        first_timestamp=min(firsts) if firsts else 0,
        last_timestamp=max(local.last_timestamp, remote.last_timestamp),
        **sums,
    )


def parse_key(prefix: str, node_id: str, key: str) -> Optional[tuple]:
    """``(job, kind, index, name)`` of a segment object's key under the node's prefix,
    or None (a sidecar, a manifest, anything else)."""
    head = f"{prefix}{node_id}/"
    if not key.startswith(head) or key.endswith(layout.SIDECAR_SUFFIX):
        return None
    parts = key[len(head):].split("/")
    if len(parts) != 3 or not is_valid_job_id(parts[0]):
        return None
    job_id, kind_name, name = parts
    parsed = parse_segment_name(name)
    if parsed is None or str(parsed[0]) != kind_name:
        return None
    return job_id, parsed[0], parsed[1], name


def members_of_sidecar(doc: dict, kind: SegmentKind) -> tuple:
    """The MemberInfos a parsed sidecar (layout.parse_sidecar) lists."""
    default = _MEMBER_KIND[kind]
    return tuple(
        MemberInfo(
            offset=m["offset"], size=m["size"], kind=m.get("kind", default), count=m["count"],
            first_ordinal=m["first_ordinal"], last_ordinal=m["last_ordinal"],
            min_timestamp=m["min_timestamp"], max_timestamp=m["max_timestamp"],
            first_sequence=m["first_sequence"], last_sequence=m["last_sequence"],
            raw_size=m["raw_size"],
        )
        for m in doc["members"]
    )


def make_read_client(cfg):
    """A boto3 S3 client for reads of ``archive.s3`` (``cfg``: S3ArchiveConfig).

    Short timeouts and one retry: a query waiting on an unreachable store
    fails within seconds (UNAVAILABLE) instead of hanging.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=cfg.read_timeout,
        read_timeout=cfg.read_timeout,
        retries={"max_attempts": 2, "mode": "standard"},
        s3={"addressing_style": "path" if cfg.force_path_style else "auto"},
        max_pool_connections=32,
    )
    return boto3.session.Session().client(
        "s3", region_name=cfg.region or None, endpoint_url=cfg.endpoint_url or None, config=config
    )


class ArchiveSource:
    """One bucket and prefix, read with ``client`` (a boto3 S3 client).  Any thread.

    ``on_read(nbytes)`` is told the bytes of every ranged GET and sidecar read
    (the metric).  Every method blocks on the network.
    """

    def __init__(self, client, bucket: str, prefix: str,
                 on_read: Callable[[int], None] = lambda n: None):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self._on_read = on_read
        #: Bytes read from the bucket so far (ranged GETs and sidecars).
        self.read_bytes = 0

    def _counted(self, data: bytes) -> bytes:
        self.read_bytes += len(data)
        self._on_read(len(data))
        return data

    def fetch(self, job_id: str, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of object ``key`` (one ranged GET) of job ``job_id``."""
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key,
                                            Range=f"bytes={start}-{end - 1}")
            data = answer["Body"].read()
        except Exception as e:
            raise _read_error(job_id, key, e) from None
        if len(data) != end - start:
            raise StorageUnavailable(
                f"reading the archive of job {job_id}: s3://{self.bucket}/{key} returned "
                f"{len(data)} bytes for a range of {end - start}"
            )
        return self._counted(data)

    def remote_path(self, job_id: str, seg: ArchivedSegment) -> RemotePath:
        key = seg.key
        return RemotePath(f"s3://{self.bucket}/{key}",
                          lambda start, end: self.fetch(job_id, key, start, end), seg.size)

    def view(self, job_id: str, seg: ArchivedSegment) -> SegmentView:
        """The reader's view of an archived segment: its members, read by ranged GETs."""
        return SegmentView(self.remote_path(job_id, seg), seg.members)

    # -- listings and sidecars --------------------------------------------------

    def thd_list(self, node_id: str, job_id: str = "", page_size: int = LIST_PAGE) -> list:
        """The segment objects under the node's prefix (one job's with ``job_id``), as
        ListedObjects, from a paginated listing.  Raises StorageUnavailable."""
        prefix = f"{self.prefix}{node_id}/" + (f"{job_id}/" if job_id else "")
        found = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=self.bucket, Prefix=prefix,
                                       PaginationConfig={"PageSize": page_size})
            for page in pages:
                for item in page.get("Contents", ()):
                    parsed = parse_key(self.prefix, node_id, item["Key"])
                    if parsed is None:
                        continue
                    job, kind, index, name = parsed
                    found.append(ListedObject(job, kind, index, name, item["Key"], item["Size"],
                                              int(item["LastModified"].timestamp())))
        except Exception as e:
            what = f"job {job_id} of node {node_id}" if job_id else f"node {node_id}"
            raise StorageUnavailable(
                f"listing the archive of {what} in s3://{self.bucket}/{prefix} failed: {e}"
            ) from None
        return found

    def thd_segment(self, obj: ListedObject) -> Optional[ArchivedSegment]:
        """The ArchivedSegment of a listed object, from its sidecar; None when the sidecar
        is missing or damaged (the object is then not readable by range: left out, logged
        by the caller).  Raises StorageUnavailable when S3 cannot be reached."""
        key = layout.sidecar_key(obj.key)
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
            data = self._counted(answer["Body"].read())
        except Exception as e:
            if _is_missing(e):
                return None
            raise _read_error(obj.job_id, key, e) from None
        try:
            doc = layout.parse_sidecar(data)
            members = members_of_sidecar(doc, obj.kind)
            size = int(doc["size"])
        except (ValueError, KeyError, TypeError):
            return None
        return ArchivedSegment(obj.kind, obj.index, obj.name, obj.key, size, members)

    def thd_job(self, node_id: str, job_id: str, objects: Optional[list] = None,
                skip: Callable[[ListedObject], bool] = lambda obj: False) -> Optional[ArchivedJob]:
        """The ArchivedJob of a job from its objects (listed here when ``objects`` is None),
        leaving out those ``skip`` names (segments still on local disk).  None when the
        archive has no readable segment of the job."""
        if objects is None:
            objects = self.thd_list(node_id, job_id)
        segments = []
        for obj in objects:
            if skip(obj):
                continue
            seg = self.thd_segment(obj)
            if seg is not None:
                segments.append(seg)
        if not segments:
            return None
        modified = max(obj.modified for obj in objects)
        return ArchivedJob(job_id, 0, 0, {}).with_segments(segments, 0, modified)


def _is_missing(e: Exception) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
    return code in ("NoSuchKey", "404", "NotFound")


def _read_error(job_id: str, key: str, e: Exception) -> Exception:
    if _is_missing(e):
        return DataVanished(job_id, f"archived object {key} is gone")
    return StorageUnavailable(f"the S3 archive could not be read for job {job_id} ({key}): {e}")


def local_segment_exists(data_dir: str, obj: ListedObject) -> bool:
    """Whether the local disk still holds the listed segment.  Pool thread."""
    path = os.path.join(jobindex.job_dir(data_dir, obj.kind, obj.job_id), obj.name)
    try:
        return os.path.exists(path)
    except OSError:
        return False


# -- the floors file ----------------------------------------------------------------

FLOORS_FILENAME = "archive_tier.json"
FLOORS_VERSION = 1


def floors_path(data_dir: str) -> str:
    return os.path.join(data_dir, FLOORS_FILENAME)


def floors_to_bytes(target: tuple, floors: dict) -> bytes:
    """``floors``: job -> ``({kind: last archived index}, ordinal base)``."""
    bucket, prefix, node_id = target
    doc = {
        "version": FLOORS_VERSION,
        "bucket": bucket,
        "prefix": prefix,
        "node_id": node_id,
        "jobs": {job: {"top": {str(k): i for k, i in indexes.items()}, "base": base}
                 for job, (indexes, base) in floors.items()},
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def floors_from_bytes(data: bytes, target: tuple) -> dict:
    """The floors a file holds (empty for another target); ValueError when damaged."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("version") != FLOORS_VERSION:
        raise ValueError("unknown archive tier file version")
    if (doc.get("bucket"), doc.get("prefix"), doc.get("node_id")) != tuple(target):
        return {}
    floors = {}
    for job, entry in doc["jobs"].items():
        if not is_valid_job_id(job):
            raise ValueError(f"bad job id {job!r}")
        indexes = {SegmentKind(k): int(i) for k, i in entry["top"].items()}
        floors[job] = (indexes, int(entry["base"]))
    return floors


def thd_read_floors(data_dir: str) -> Optional[bytes]:
    """The floors file's bytes, None when there is none.  Pool thread."""
    return safefs.thd_read_state_file(floors_path(data_dir))


def thd_write_floors(data_dir: str, data: bytes,
                     modes: safefs.FileModes = safefs.DEFAULT_MODES) -> None:
    """Replace the floors file atomically (safefs.thd_replace_file).  Pool thread."""
    safefs.thd_replace_file(floors_path(data_dir), data, modes)
