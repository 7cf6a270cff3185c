"""The CloudWatch side of the CloudWatch backend: boto3 clients and the blocking calls.

Every ``thd_*`` function blocks on the network and runs on the CloudWatch
backend's own thread pool, never on the reactor and never on the cpu-pool that
ingest uses.  boto3 is imported only when a client is made, and that only when
``archive.cloudwatch.enabled`` is true.  Credentials come from boto3's standard
chain (environment, shared files and profile, container and instance roles).

Names (docs/operations.md, "CloudWatch"): log group
``{logGroupPrefix}/{nodeId}/jobs``, streams ``{job}-stdout``, ``{job}-stderr``,
``{job}-metrics`` and ``{job}-<kind>-events``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from joblet_persist.storage.api import EVENT_OF_KIND, SegmentKind

#: Error codes retried with backoff (besides connection errors and HTTP 5xx).
RETRYABLE_CODES = frozenset({
    "ThrottlingException", "Throttling", "ThrottledException", "RequestLimitExceeded",
    "ServiceUnavailable", "ServiceUnavailableException", "InternalFailure",
    "InternalServiceError", "InternalServerError", "LimitExceededException",
})  # fmt: skip
#: PutMetricData: data points per request (the API allows 1,000) and the payload kept
#: well under its 1 MB limit.
METRIC_BATCH_DATUMS = 500
#: The nine metrics of a sample: (metric name, where in the stored sample, unit).
METRICS = (
    ("CPUUsage", ("cpu_usage",), "Percent"),
    ("MemoryUsage", ("memory_usage",), "Bytes"),
    ("GPUUsage", ("gpu_usage",), "Percent"),
    ("DiskReadBytes", ("disk_io", "read_bytes"), "Bytes"),
    ("DiskWriteBytes", ("disk_io", "write_bytes"), "Bytes"),
    ("DiskReadOps", ("disk_io", "read_ops"), "Count"),
    ("DiskWriteOps", ("disk_io", "write_ops"), "Count"),
    ("NetworkRxBytes", ("network_io", "rx_bytes"), "Bytes"),
    ("NetworkTxBytes", ("network_io", "tx_bytes"), "Bytes"),
)


def log_group(prefix: str, node_id: str) -> str:
    """``{prefix}/{node_id}/jobs`` (a trailing ``/`` of the prefix is not doubled)."""
    return f"{prefix.rstrip('/')}/{node_id}/jobs"


def stream_name(job_id: str, kind: SegmentKind) -> str:
    """The log stream of one kind of a job's data."""
    kind = SegmentKind(kind)
    if kind in EVENT_OF_KIND:
        return f"{job_id}-{EVENT_OF_KIND[kind]}-events"
    return f"{job_id}-{kind.value}"


def make_client(cfg, service: str):
    """A boto3 client of ``service`` ("logs" or "cloudwatch") for ``archive.cloudwatch``.

    boto3 makes one attempt per call: the shipper retries with its own
    backoff, and counts and reports every failure.  Timeouts are bounded so
    that a stop never waits long on a dead endpoint.
    """
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=30,
                    retries={"total_max_attempts": 1, "mode": "standard"})
    session = boto3.session.Session()
    return session.client(service, region_name=cfg.region or None,
                          endpoint_url=cfg.endpoint_url or None, config=config)


@dataclass
class Clients:
    """The two clients the backend uses: CloudWatch Logs and CloudWatch (metrics)."""

    logs: object
    metrics: object


def make_clients(cfg) -> Clients:
    """Both clients; pool thread (boto3 reads its configuration files)."""
    return Clients(make_client(cfg, "logs"), make_client(cfg, "cloudwatch"))


def error_code(error: BaseException) -> Optional[str]:
    """The AWS error code of a botocore ClientError, else None."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return (response.get("Error") or {}).get("Code")
    return None


def is_retryable(error: BaseException) -> bool:
    """Throttling, service unavailable, HTTP 5xx and connection errors: retried."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectionError,
        EndpointConnectionError,
        HTTPClientError,
        ReadTimeoutError,
    )

    if isinstance(error, (ConnectionError, EndpointConnectionError, ConnectionClosedError,
                          ReadTimeoutError, HTTPClientError, OSError)):
        return True
    if error_code(error) in RETRYABLE_CODES:
        return True
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
        return status >= 500
    return False


def _tolerate_exists(call, **kwargs) -> None:
    try:
        call(**kwargs)
    except Exception as e:
        if error_code(e) != "ResourceAlreadyExistsException":
            raise


def thd_ensure_group(clients: Clients, cfg, group: str) -> None:
    """Create the log group with its KMS key and retention ("already exists" is fine).

    The retention policy is put every time the group is ensured (once per
    process, and after CloudWatch reported the group missing), so that a
    changed ``retentionDays`` applies.
    """
    args = {"logGroupName": group}
    if cfg.kms_key_id:
        args["kmsKeyId"] = cfg.kms_key_id
    _tolerate_exists(clients.logs.create_log_group, **args)
    if cfg.retention_days:
        clients.logs.put_retention_policy(logGroupName=group,
                                          retentionInDays=cfg.retention_days)


def thd_ensure_stream(clients: Clients, cfg, group: str, stream: str) -> None:
    """Create the stream (and the group when CloudWatch says it is missing)."""
    try:
        _tolerate_exists(clients.logs.create_log_stream, logGroupName=group,
                         logStreamName=stream)
    except Exception as e:
        if error_code(e) != "ResourceNotFoundException":
            raise
        thd_ensure_group(clients, cfg, group)
        _tolerate_exists(clients.logs.create_log_stream, logGroupName=group,
                         logStreamName=stream)


@dataclass(frozen=True, slots=True)
class PutResult:
    """What CloudWatch refused of one PutLogEvents request (rejectedLogEventsInfo)."""

    too_old: int
    too_new: int
    expired: int


def thd_put_log_events(clients: Clients, cfg, group: str, stream: str, events: list,
                       ensured: bool) -> PutResult:
    """One PutLogEvents request.  A missing stream (or group) is created and the
    request sent again; ``ensured`` False creates the stream first."""
    if not ensured:
        thd_ensure_stream(clients, cfg, group, stream)
    try:
        answer = clients.logs.put_log_events(logGroupName=group, logStreamName=stream,
                                             logEvents=events)
    except Exception as e:
        if error_code(e) != "ResourceNotFoundException":
            raise
        thd_ensure_stream(clients, cfg, group, stream)
        answer = clients.logs.put_log_events(logGroupName=group, logStreamName=stream,
                                             logEvents=events)
    info = answer.get("rejectedLogEventsInfo") or {}
    too_old = info.get("tooOldLogEventEndIndex")
    too_new = info.get("tooNewLogEventStartIndex")
    expired = info.get("expiredLogEventEndIndex")
    return PutResult(
        too_old + 1 if too_old is not None else 0,
        len(events) - too_new if too_new is not None else 0,
        expired + 1 if expired is not None else 0,
    )


def metric_datums(job_id: str, node_id: str, extra_dimensions, timestamp_ms: int,
                  data: dict) -> list:
    """The PutMetricData datums of one stored sample (metrics absent from it are left out)."""
    dims = [{"Name": "JobUUID", "Value": job_id}, {"Name": "NodeID", "Value": node_id}]
    dims += [{"Name": name, "Value": value} for name, value in extra_dimensions]
    out = []
    for name, path, unit in METRICS:
        value = data
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out.append({"MetricName": name, "Dimensions": dims, "Timestamp": timestamp_ms / 1000.0,
                    "Value": float(value), "Unit": unit})
    return out


def thd_put_metric_data(clients: Clients, namespace: str, datums: list) -> int:
    """Send ``datums`` in requests of at most METRIC_BATCH_DATUMS; returns the requests."""
    calls = 0
    for start in range(0, len(datums), METRIC_BATCH_DATUMS):
        clients.metrics.put_metric_data(Namespace=namespace,
                                        MetricData=datums[start:start + METRIC_BATCH_DATUMS])
        calls += 1
    return calls


def thd_delete_job_streams(clients: Clients, group: str, job_id: str) -> int:
    """Delete every stream of the job (paginated by name prefix); returns how many.

    A missing group or stream counts as deleted.
    """
    deleted = 0
    names = []
    paginator = clients.logs.get_paginator("describe_log_streams")
    try:
        for page in paginator.paginate(logGroupName=group, logStreamNamePrefix=f"{job_id}-"):
            names += [s["logStreamName"] for s in page.get("logStreams", ())]
    except Exception as e:
        if error_code(e) == "ResourceNotFoundException":
            return 0
        raise
    for name in names:
        if not _is_stream_of(name, job_id):
            continue  # another job whose id starts with this one's followed by "-"
        try:
            clients.logs.delete_log_stream(logGroupName=group, logStreamName=name)
        except Exception as e:
            if error_code(e) != "ResourceNotFoundException":
                raise
        deleted += 1
    return deleted


def _is_stream_of(name: str, job_id: str) -> bool:
    return name in {stream_name(job_id, kind) for kind in SegmentKind}
