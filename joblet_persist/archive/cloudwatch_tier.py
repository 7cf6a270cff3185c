"""``storage.backend: cloudwatch``: local storage in front, CloudWatch as the long-term store.

Reactor thread for ``open_job``; any thread for the rest, as the storage
contract says.  ``CloudWatchTier`` is the local backend with one change: when
the local copy of a job (or of one part of it) is gone (local retention may
drop what the CloudWatch shipper has taken), ``open_job`` hands out a snapshot
that reads that data from CloudWatch (``cloudwatch_read``), so QueryLogs,
QueryMetrics, the batched RPCs and the telemetry queries keep answering.  The
job's summary (GetJobInfo) is the one the shipper last saw locally, kept in its
cursor file.  Everything else (appends, deletes, retention, listings) is the
local backend's: ListJobs and GetStats count the jobs held locally.

The composition root builds the tier around the local backend
(``storage.backends``) and attaches the shipper once it exists
(``attach``); before that, and for jobs CloudWatch never received, it is the
local backend exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from twisted.internet import defer
from zope.interface import directlyProvides, implementer, providedBy

from joblet_persist.archive.cloudwatch_read import CloudWatchJobSnapshot, CloudWatchReader
from joblet_persist.storage.api import (
    COUNT_FIELD_OF_PART,
    EVENT_COUNT_FIELDS,
    IJobSnapshot,
    JobInfo,
    Part,
    check_job_id,
)


class CloudWatchTier:
    """The local backend, answering from CloudWatch for data no longer held locally."""

    def __init__(self, local):
        self._local = local
        self._shipper = None
        # Provide every interface the local backend provides (IStorageBackend and the
        # optional capabilities), since every call not overridden here is the local one.
        directlyProvides(self, providedBy(local))

    def attach(self, shipper) -> None:
        """Serve remote reads through ``shipper`` (its clients, its record of jobs)."""
        self._shipper = shipper

    def __getattr__(self, name):
        return getattr(self._local, name)

    @property
    def local(self):
        """The local backend behind the tier (what the shipper reads)."""
        return self._local

    def job_info(self, job_id: str):
        """The local summary, with the counts of parts held only in CloudWatch; for a job
        held only there, the summary the shipper kept.  Any thread."""
        local = self._local.job_info(job_id)
        shipper = self._shipper
        if shipper is None:
            return local
        kept = remote_job_info(shipper.remote_summary(job_id))
        if kept is None or not shipper.holds(job_id):
            return local
        if local is None:
            return kept
        return merged_info(local, kept, _gone_parts(local, kept))

    def snapshot(self, job_id: str):
        """The local snapshot, or None when a part of it is held only in CloudWatch (the
        caller then opens the job on the reactor: ``open_job``).  Any thread."""
        local = self._local.snapshot(job_id)
        shipper = self._shipper
        if local is None or shipper is None:
            return local
        kept = shipper.remote_summary(job_id)
        if kept is None:
            return local
        info = remote_job_info(kept)
        if info is not None and _gone_parts(local.info, info):
            return None
        return local

    def open_job(self, job_id: str):
        """The local snapshot; or, for parts (or the whole job) held only in CloudWatch,
        one that reads them from there.  Reactor thread; Deferred."""
        try:
            check_job_id(job_id)
        except ValueError as e:
            return defer.fail(e)
        d = self._local.open_job(job_id)
        d.addCallback(self._with_remote, job_id)
        return d

    def _with_remote(self, local, job_id: str):
        shipper = self._shipper
        remote_info = shipper.remote_info(job_id) if shipper is not None else None
        if remote_info is None or shipper.logs_client is None:
            return local
        reader = CloudWatchReader(shipper.logs_client, shipper.group)
        remote = CloudWatchJobSnapshot(reader, job_id, remote_info)
        if local is None:
            return remote
        gone = _gone_parts(local.info, remote_info)
        if not gone:
            return local
        return TieredSnapshot(local, remote, gone)


def _count_fields(part: Part) -> list:
    """The JobInfo fields that count a part's messages."""
    if part is Part.EVENTS:
        return list(EVENT_COUNT_FIELDS.values())
    return [COUNT_FIELD_OF_PART[part]]


def _count(info: JobInfo, part: Part) -> int:
    return sum(int(getattr(info, n)) for n in _count_fields(part))


def _gone_parts(local: JobInfo, kept: JobInfo) -> list:
    """The parts with no messages left locally that the kept summary counts."""
    return [part for part in Part if _count(local, part) == 0 and _count(kept, part) > 0]


def merged_info(info: JobInfo, kept: JobInfo, gone) -> JobInfo:
    """The local summary with the counts of the ``gone`` parts (and the time bounds) from
    the kept one."""
    changes = {}
    for part in gone:
        changes.update({n: getattr(kept, n) for n in _count_fields(part)})
    firsts = [t for t in (info.first_timestamp, kept.first_timestamp) if t]
    changes["first_timestamp"] = min(firsts) if firsts else 0
    changes["last_timestamp"] = max(info.last_timestamp, kept.last_timestamp)
    changes["created_at"] = min(info.created_at, kept.created_at) or info.created_at
    return dataclasses.replace(info, **changes)


@implementer(IJobSnapshot)
class TieredSnapshot:
    """A job held locally except for ``gone`` parts, which are read from CloudWatch.

    Any thread.  ``info`` is the local summary with the counts of the gone parts
    (and the time bounds) taken from the summary the shipper kept.
    """

    def __init__(self, local, remote: CloudWatchJobSnapshot, gone):
        self._local = local
        self._remote = remote
        self._gone = set(gone)
        self.job_id = local.job_id
        self.info = merged_info(local.info, remote.info, self._gone)

    def _source(self, part: Part):
        return self._remote if part in self._gone else self._local

    def iter_logs(self, stream, *args, **kwargs):
        return self._source(Part.LOGS).iter_logs(stream, *args, **kwargs)

    def iter_metrics(self, *args, **kwargs):
        return self._source(Part.METRICS).iter_metrics(*args, **kwargs)

    def iter_events(self, kind, *args, **kwargs):
        return self._source(Part.EVENTS).iter_events(kind, *args, **kwargs)


def make_tier(local) -> CloudWatchTier:
    """The tier around a built local backend (storage.backends' ``cloudwatch`` builder)."""
    return CloudWatchTier(local)


def merge_job_info(old: Optional[dict], new: JobInfo) -> dict:
    """The summary to keep for a job: ``new`` (as seen locally), except that a part
    whose local count fell to 0 (local retention dropped it) keeps its earlier counts,
    and the time bounds cover both."""
    fields = dataclasses.asdict(new)
    if not isinstance(old, dict):
        return fields
    for part in Part:
        names = _count_fields(part)
        if all(fields[n] == 0 for n in names) and any(old.get(n) for n in names):
            for n in names:
                fields[n] = old.get(n, 0)
    firsts = [t for t in (old.get("first_timestamp"), fields["first_timestamp"]) if t]
    fields["first_timestamp"] = min(firsts) if firsts else 0
    fields["last_timestamp"] = max(old.get("last_timestamp") or 0, fields["last_timestamp"])
    if old.get("created_at"):
        fields["created_at"] = min(old["created_at"], fields["created_at"])
    return fields


def remote_job_info(fields: Optional[dict]) -> Optional[JobInfo]:
    """A JobInfo from the dict the shipper keeps in its cursor file (None when absent or
    not one)."""
    if not isinstance(fields, dict):
        return None
    try:
        return JobInfo(**fields)
    except TypeError:
        return None
