"""The S3 side of the archive: a boto3 client and the blocking calls it makes.

Every function here blocks on the network and runs on the archive's own
thread pool, never on the reactor and never on the cpu-pool that ingest
uses.  boto3 is imported only by this module, and this module only when
``archive.s3.enabled`` is true.

Credentials come from boto3's standard chain (environment, shared
credentials/config files and profile, container and instance roles).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from joblet_persist.archive import layout

#: S3's smallest part (except the last) and largest part count of a multipart upload.
MIN_PART_BYTES = 5 * 1024 * 1024
MAX_PARTS = 10_000
#: Keys per DeleteObjects request (S3's limit).
DELETE_BATCH = 1000

_SSE = {"sse-s3": "AES256", "sse-kms": "aws:kms"}


class LocalUnreadable(Exception):
    """The segment file could not be opened (deleted meanwhile, refused symlink): skip it."""


class NoCompleteMember(Exception):
    """The segment has no complete member yet (a crash left it empty or with only a torn
    first member, which loading the job removes): there is nothing to archive."""


class UploadCancelled(Exception):
    """The service is stopping: a multipart upload was abandoned between parts."""


def make_client(cfg):
    """A boto3 S3 client for ``archive.s3`` (``cfg``: S3ArchiveConfig).

    boto3's own retries are kept short (the shipper retries with backoff);
    timeouts are bounded so that a stop never waits long on a dead endpoint.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=min(5.0, cfg.request_timeout),
        read_timeout=cfg.request_timeout,
        retries={"max_attempts": 2, "mode": "standard"},
        s3={"addressing_style": "path" if cfg.force_path_style else "auto"},
    )
    session = boto3.session.Session()
    return session.client(
        "s3",
        region_name=cfg.region or None,
        endpoint_url=cfg.endpoint_url or None,
        config=config,
    )


def put_args(cfg) -> dict:
    """The storage class and server-side encryption arguments of every object written."""
    args = {}
    if cfg.storage_class:
        args["StorageClass"] = cfg.storage_class
    if cfg.sse in _SSE:
        args["ServerSideEncryption"] = _SSE[cfg.sse]
    if cfg.sse_kms_key_id:
        args["SSEKMSKeyId"] = cfg.sse_kms_key_id
    return args


@dataclass(frozen=True, slots=True)
class Uploaded:
    """What one upload took: the bytes uploaded and the file's stamp when it was opened."""

    size: int
    stamp: tuple  # (size, ino, mtime_ns) of the file as uploaded
    multipart: bool


def thd_upload_segment(client, cfg, node_id: str, f: layout.SegmentFile,
                       stopping: threading.Event) -> Uploaded:
    """Upload segment ``f`` (its complete members) and its sidecar.  Archive pool thread.

    The object is written first, then the sidecar; the caller records the
    segment as archived only after both.  A retry writes identical bytes to
    the same keys.  The recorded stamp is the one of the complete file only:
    when the file had bytes past its complete members (an append in
    progress) the stamp cannot match it later, so it is uploaded again.
    """
    key = layout.object_key(cfg.prefix, node_id, f.job_id, f.kind, f.name)
    extra = put_args(cfg)
    try:
        opened = layout.SegmentReader(f.path)
    except OSError as e:
        raise LocalUnreadable(f"{f.path}: {e}") from e
    with opened as reader:
        size = reader.size
        if size == 0:
            raise NoCompleteMember(f.path)
        multipart = size >= cfg.multipart_threshold
        if multipart:
            _multipart(client, cfg.bucket, key, reader, size, cfg.multipart_threshold, extra,
                       stopping)
        else:
            client.put_object(Bucket=cfg.bucket, Key=key, Body=reader.read(0, size),
                              ContentType="application/gzip", **extra)
        sidecar = layout.sidecar_bytes(f.job_id, node_id, f.kind, f.name, size, reader.members)
        client.put_object(Bucket=cfg.bucket, Key=layout.sidecar_key(key), Body=sidecar,
                          ContentType="application/json", **extra)
        complete = reader.size == reader.stat_size
        stamp = (size, reader.ino, reader.mtime_ns) if complete else (size, reader.ino, -1)
    return Uploaded(size, stamp, multipart)


def _multipart(client, bucket, key, reader, size, threshold, extra, stopping) -> None:
    part_size = max(threshold, MIN_PART_BYTES, -(-size // MAX_PARTS))
    upload = client.create_multipart_upload(Bucket=bucket, Key=key,
                                            ContentType="application/gzip", **extra)
    upload_id = upload["UploadId"]
    try:
        parts = []
        for number, offset in enumerate(range(0, size, part_size), start=1):
            if stopping.is_set():
                raise UploadCancelled(key)
            body = reader.read(offset, part_size)
            done = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                      PartNumber=number, Body=body)
            parts.append({"PartNumber": number, "ETag": done["ETag"]})
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception:
            pass  # the bucket's lifecycle rule for incomplete uploads cleans up
        raise


def thd_delete_prefix(client, bucket: str, prefix: str) -> int:
    """Delete every object under ``prefix``: paginated listing, batched DeleteObjects.

    Archive pool thread.  Returns the number of objects deleted; raises when
    S3 reports a key it could not delete (the caller retries the whole job).
    """
    deleted = 0
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start:start + DELETE_BATCH]
            answer = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            errors = answer.get("Errors") or ()
            if errors:
                first = errors[0]
                raise RuntimeError(
                    f"S3 could not delete {len(errors)} objects under {prefix!r}, e.g. "
                    f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )
            deleted += len(batch)
    return deleted


def thd_job_ages(client, bucket: str, node_prefix: str) -> dict:
    """``{job: newest LastModified (Unix seconds)}`` of every job under ``node_prefix``.

    Archive pool thread: a paginated listing of the node's prefix (1,000 keys
    a page), one entry per job kept in memory, not one per object.
    """
    newest: dict = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=node_prefix):
        for item in page.get("Contents", ()):
            job = layout.job_of_key(node_prefix, item["Key"])
            if job is None:
                continue
            when = item["LastModified"].timestamp()
            if when > newest.get(job, float("-inf")):
                newest[job] = when
    return newest
