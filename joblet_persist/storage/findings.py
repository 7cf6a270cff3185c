"""What the local backend found wrong on disk or could not do: counted, logged, reported.

Reactor thread: LocalStorage calls these as it applies scans and append
results.  Leaf module: no reactor imports, no Deferreds.  Each finding bumps a
counter (read by tests and operators through LocalStorage's attributes of the
same names), calls the injected metrics object (``NullStorageMetrics``'s
methods) and logs what happened and what follows from it.
"""

from __future__ import annotations

from joblet_persist.storage import reader, safefs
from joblet_persist.storage.api import SegmentKind
from joblet_persist.threads import reactor_only


class NullStorageMetrics:
    """The metrics calls LocalStorage makes; a no-op default."""

    def metric_payloads_skipped(self, count: int) -> None:
        """``count`` undecodable metric payloads were left out of a batch."""

    @reactor_only
    def index_write_failed(self) -> None:
        """Writing job_index.json failed (it is retried)."""

    def segment_shrunk(self) -> None:
        """A segment was found shorter than what was written to it; appends moved on."""

    def overlapping_segments(self) -> None:
        """A loaded job's segments hold ordinals that overlap or go backwards."""

    def unsafe_entry(self) -> None:
        """A symlink or non-regular file was refused where storage expected its own entry."""

    def compression_level(self, level: int) -> None:
        """A batch was handed to the pool to be compressed at ``level``."""

    def unsupported_member(self) -> None:
        """A segment holds a member of a later format: left as it is, not read past."""


class Findings:
    """Counters, log lines and metrics of LocalStorage's findings.  Reactor thread."""

    def __init__(self, log, metrics) -> None:
        self._log = log
        self._metrics = metrics
        #: Undecodable metric payloads left out of batches.
        self.skipped_metric_payloads = 0
        #: Failed job index writes.
        self.index_write_errors = 0
        #: Segment files whose torn tail was cut (or that held no complete member and
        #: were removed) when their job was loaded.
        self.repaired_segments = 0
        #: Damaged regions in the middle of segments, stepped over when their job was loaded.
        self.damaged_regions = 0
        #: Segments found cut or removed behind the service's back while appending.
        self.shrunk_segments = 0
        #: Symlinks (or non-regular files) refused where storage expected its own entry.
        self.unsafe_entries = 0
        #: Jobs found with overlapping or out-of-order segments when loaded.
        self.disordered_jobs = 0
        #: Segments holding a member of a later format (written by a newer release), found
        #: when their job was loaded: left as they are, read up to that member.
        self.unsupported_segments = 0

    @reactor_only
    def scanned(self, job_id: str, scan) -> None:
        """What the scan of a job being loaded (a jobindex.JobScan) refused, cut or skipped."""
        for path in scan.refused:
            self.unsafe(
                job_id,
                safefs.UnsafeEntry(path, "a symlink or not a regular file"),
                "not read; appends go on in a later segment",
            )
        for path in scan.truncated:
            self.repaired_segments += 1
            self._log.warn("cut a torn tail off {path}", path=path)
        for path in scan.removed:
            self.repaired_segments += 1
            self._log.warn(
                "removed {path}: it held no complete member (a crash during its first "
                "append); the next append creates it again",
                path=path,
            )
        for kind in SegmentKind:
            for s in scan.kind_segments(kind):
                for start, end in s.result.holes:
                    # Complete members follow the damage, so it is not a torn tail: the
                    # members in it are lost to queries, the ones around it are kept.
                    self.damaged_regions += 1
                    self._log.error(
                        "{path}: bytes {start}-{end} are damaged and were skipped; the "
                        "messages stored there cannot be read",
                        path=s.path,
                        start=start,
                        end=end,
                    )
                if s.result.unsupported is not None:
                    offset, reason = s.result.unsupported
                    self.unsupported_segments += 1
                    self._metrics.unsupported_member()
                    self._log.error(
                        "{path}: the member at offset {offset} is of a later storage format "
                        "({reason}), written by a newer release; the file is left as it is "
                        "(nothing cut), its messages from there on are not readable by this "
                        "release, and appends go on in a new segment. Upgrade to read it.",
                        path=s.path,
                        offset=offset,
                        reason=reason,
                    )

    @reactor_only
    def unsafe(self, job_id: str, error: OSError, consequence: str) -> None:
        """A refused symlink or non-regular file (safefs.UnsafeEntry)."""
        self.unsafe_entries += 1
        self._metrics.unsafe_entry()
        self._log.error(
            "job {job}: {path} is {what}, refused (never followed, written or removed "
            "through); {consequence}",
            job=job_id,
            path=error.filename,
            what=getattr(error, "what", "a symlink"),
            consequence=consequence,
        )

    @reactor_only
    def check_order(self, job_id: str, segments: dict) -> None:
        """Log and count a job whose segments' ordinals overlap or go backwards.

        This service never writes such segments; a segment copied under another
        name, or a second writer of the directory, does.  Queries read them in
        stored order (see reader._stored_order): nothing stored is hidden.
        """
        for kind in SegmentKind:
            found = reader.find_disorder([s.view for s in segments[kind]])
            if found is None:
                continue
            self.disordered_jobs += 1
            self._metrics.overlapping_segments()
            self._log.error(
                "job {job}: the ordinals of {later} overlap or precede those of {earlier} "
                "(a copied segment or a second writer?); its {kind} are read in segment "
                "order, every stored message is returned",
                job=job_id,
                kind=kind,
                earlier=found[0],
                later=found[1],
            )
            return

    @reactor_only
    def shrunk(self, job_id: str, old, error) -> None:
        """Segment ``old`` was found shorter than written (``error``); appends moved on."""
        self._log.error(
            "job {job}: segment {path} is shorter than the {size} bytes written to it (cut or "
            "removed outside the service: {error}); appends go on in a new segment",
            job=job_id,
            path=old.path,
            size=old.size,
            error=error,
        )
        self.shrunk_segments += 1
        self._metrics.segment_shrunk()

    @reactor_only
    def skipped_payloads(self, job_id: str, count: int) -> None:
        """``count`` undecodable metric payloads were left out of a batch."""
        self.skipped_metric_payloads += count
        self._metrics.metric_payloads_skipped(count)
        self._log.warn(
            "job {job}: {count} undecodable metric payloads skipped", job=job_id, count=count
        )

    def index_write_failed(self, path: str, failure) -> None:
        """Writing the job index at ``path`` failed (it is written again later)."""
        self.index_write_errors += 1
        self._metrics.index_write_failed()
        self._log.failure("writing the job index {path} failed", failure, path=path)
