"""Composition root: twistd options and makeService.  Reactor thread.

This is the only place where components are wired together.  Nothing here
creates threads or servers: ``makeService`` only builds Service objects, and
each creates its pools, sockets and gRPC server in ``startService`` (twistd may
fork between the two).

``build_service`` calls one builder per subsystem, each given the
configuration and what the earlier ones built: ``build_storage`` (lock, pool,
backend), ``build_health``, ``build_writer``, ``build_ingest``,
``build_lifecycle`` (retention, idle unloading), ``build_queries`` (servicer,
gRPC) and ``build_monitoring`` (Klein).  The one cycle (the writer pauses the
ingest factory that feeds it) goes through a ``LateBound`` callable.  The
root's children are then listed once, in start order (stop order is the
reverse, each step waiting for the previous):

 0. lock          exclusive lock on the data directory (a second instance refuses to start)
 1. cpu-pool      compression/append/scan thread pool, sized to the cores
 2. storage       job index loaded (or rebuilt from the files)
 3. writer        batching writer and its flush timer
 4. unload        idle jobs' in-memory state dropped (absent when storage.unloadIdleAfter is 0)
 5. health        probe loop feeding /health, Ping and gRPC health
 6. ingest        IPC Unix socket listener (stop: close listener, drain connections)
 7. query-pool, retention   SearchLogs' and AggregateMetrics' scan threads (stop after grpc's calls ended);
                  periodic retention run (stop: wait for a run in progress)
 7a. archive-pool, archive   S3 archive shipper and its pool (only when archive.s3.enabled)
 7b. cloudwatch-pool, cloudwatch   CloudWatch shipper and its pool (only when
     archive.cloudwatch.enabled)
 8. grpc          gRPC server on the Unix sockets and/or TCP (stop: refuse, then grace)
 9. metrics-http, health-http   Klein listeners (one when they share a port; none when off)
10. sighup        configuration reload on SIGHUP (added by makeService, under twistd)
11. sdnotify      systemd READY=1 / STOPPING=1 and the watchdog (makeService; a no-op
                  without $NOTIFY_SOCKET)

So on SIGTERM: SIGHUP handling, monitoring and gRPC stop first, a retention run in
progress finishes, ingest closes its connections, the writer flushes and fsyncs
every received frame, storage writes the job index, the pool is joined and the
data directory lock is released.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from twisted.python import usage

from joblet_persist import __version__


class Options(usage.Options):
    synopsis = "[--config FILE] [--data-dir DIR] [--check-config]"
    longdesc = (
        "Receive joblet job output and metrics over a Unix socket, store them as gzip "
        "files, and answer historical queries over gRPC."
    )
    optParameters = [
        ["config", "c", None, "YAML configuration file (see config.example.yml)."],
        [
            "data-dir",
            "d",
            None,
            "Data directory (overrides storage.dataDir); default socket paths go under DIR/run/.",
        ],
    ]
    optFlags = [
        [
            "check-config",
            None,
            "Check the configuration and exit: print the effective configuration (status 0) "
            "or one line naming the file, line and key (status 1).",
        ],
    ]

    def postOptions(self):
        from joblet_persist.checkconfig import check
        from joblet_persist.config import ConfigError, load_config

        if self["check-config"]:
            import sys

            # Before twistd sets up logging: plain stdout/stderr, then exit.
            raise SystemExit(check(self["config"], self["data-dir"], sys.stdout, sys.stderr))
        try:
            self.config = load_config(self["config"], data_dir=self["data-dir"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        from joblet_persist import logs

        # Runs before twistd picks its log observer: lets logging.format apply.
        logs.select_twistd_logger(self)


def makeService(options, reactor=None):
    """Build the service tree for ``twistd joblet-persist``."""
    if reactor is None:
        from twisted.internet import reactor
    config = getattr(options, "config", None)
    if config is None:
        from joblet_persist.config import load_config

        config = load_config(options.get("config"), data_dir=options.get("data-dir"))
    from joblet_persist import logs
    from joblet_persist.reload import Reloader, SighupService

    # Process-wide settings live here, not in build_service, so tests and benchmarks
    # that build services in-process do not change them.
    logs.configure(config.logging.log_level, config.logging.format)
    logs.bridge_stdlib_logging()
    ensure_descriptor_limit(config)
    warn_exposed_settings(config)

    def sighup(parts):
        def apply_retention(policy):
            parts["retention"].policy = policy
            parts["health"].set_min_free_bytes(policy.min_free_bytes)

        reloader = Reloader(
            options.get("config"),
            options.get("data-dir"),
            apply_retention,
            logs.set_level,
            current=config,
            run_in_thread=parts["pool"].run,
        )
        return [SighupService(reactor, reloader.reload)]

    def last_services(parts):
        from joblet_persist.sdnotify import NotifyService

        def status():
            listening = _listeners(config, parts)
            return "serving; " + ", ".join(f"{k} {v}" for k, v in listening.items())

        # Last to start (every listener is up: READY=1), first to stop (STOPPING=1).
        return [*sighup(parts), NotifyService(reactor, status=status)]

    root = build_service(config, reactor, exit_on_start_failure=True,
                         extra_services=last_services)
    parts = root.components
    root.started.addCallback(lambda _: logs.log_startup(config, _listeners(config, parts)))
    return root


def warn_exposed_settings(config, log=None) -> list[str]:
    """Log a warning for each accepted setting that exposes the service to other users
    (security.config_warnings: socket modes open to others, monitoring off loopback).
    Returns the messages.  Called by makeService."""
    from joblet_persist.logs import Logger
    from joblet_persist.security import config_warnings

    log = log if log is not None else Logger(namespace="joblet_persist.tap")
    messages = config_warnings(config)
    for message in messages:
        log.warn("{detail}", detail=message)
    return messages


#: Descriptors beyond data files and IPC connections: listeners, gRPC clients, logs.
DESCRIPTOR_RESERVE = 256


def ensure_descriptor_limit(config, log=None, getrlimit=None, setrlimit=None) -> tuple:
    """Raise the soft RLIMIT_NOFILE to what the configuration may use, if it is lower.

    The service may hold ``storage.maxOpenFiles`` data files, ``ipc.maxConnections``
    IPC connections and DESCRIPTOR_RESERVE more (listeners, gRPC clients, log
    files).  A soft limit below that is raised as far as the hard limit allows
    (like most daemons, since systemd's default soft limit is 1024); when even
    the hard limit is lower, a warning names the keys to lower.  Returns the
    (needed, soft limit in effect) pair.  Process-wide: called by makeService.
    """
    import resource

    from joblet_persist.logs import Logger

    log = log if log is not None else Logger(namespace="joblet_persist.tap")
    getrlimit = getrlimit or resource.getrlimit
    setrlimit = setrlimit or resource.setrlimit
    needed = config.storage.max_open_files + config.ipc.max_connections + DESCRIPTOR_RESERVE
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed, soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warn("could not raise the open file limit from {soft} to {target}: {error}",
                     soft=soft, target=target, error=e)
        else:
            log.info("raised the open file limit (RLIMIT_NOFILE) from {soft} to {target}",
                     soft=soft, target=target)
            soft = target
    if soft < needed:
        log.warn(
            "the open file limit is {soft}, below the {needed} descriptors the configuration "
            "may use (storage.maxOpenFiles {files} + ipc.maxConnections {conns} + {reserve}); "
            "lower those keys or raise the limit (LimitNOFILE= in the systemd unit)",
            soft=soft, needed=needed, files=config.storage.max_open_files,
            conns=config.ipc.max_connections, reserve=DESCRIPTOR_RESERVE,
        )
    return needed, soft


def _listeners(config, parts):
    """Where the running service listens, for the startup line."""
    found = {"ipc": f"unix:{parts['ingest'].path}"}
    grpc = parts["grpc"]
    if grpc.unix_socket:
        found["grpc"] = f"unix:{grpc.unix_socket}"
    if grpc.viewer_socket:
        found["grpc-viewer"] = f"unix:{grpc.viewer_socket}"
    if grpc.tcp_port:
        scheme = "tls" if config.security.tls_enabled else "plaintext"
        found["grpc-tcp"] = f"{config.server.grpc_host}:{grpc.tcp_port} ({scheme})"
    for web in parts["web"]:
        found[web.name] = f"http://{config.monitoring.bind_address}:{web.port_number}/"
    return found


def _exit_nonzero_at_interpreter_exit():
    """Make the process exit with status 1 once twistd has shut down and cleaned up.

    twistd has no way to set the exit status; a service that failed to start
    must not look like a clean stop to systemd's Restart=on-failure.
    """
    import atexit
    import os

    atexit.register(os._exit, 1)


class LateBound:
    """A callable whose target is set once, after construction.

    Breaks the one cycle of the composition: the writer pauses the ingest
    factory (backpressure), and the factory feeds the writer.  The writer is
    built with a LateBound, the ingest builder binds it to the factory.
    Calling it before ``bind`` raises, naming it.  Reactor thread.
    """

    def __init__(self, name: str):
        self.name = name
        self._target = None

    def bind(self, target) -> None:
        if self._target is not None:
            raise RuntimeError(f"{self.name} is already bound")
        self._target = target

    def __call__(self, *args):
        if self._target is None:
            raise RuntimeError(f"{self.name} was called before it was bound")
        return self._target(*args)


@dataclasses.dataclass(frozen=True)
class StorageParts:
    """What build_storage produces: the data directory lock, the CPU/IO pool, the backend
    and the service that starts and stops it."""

    lock: object
    pool: object
    storage: object
    service: object


@dataclasses.dataclass(frozen=True)
class WriterParts:
    """What build_writer produces.  ``pause``/``resume`` are bound by build_ingest."""

    writer: object
    service: object
    pause: LateBound
    resume: LateBound


@dataclasses.dataclass(frozen=True)
class IngestParts:
    """What build_ingest produces: the protocol factory and the IPC listener service."""

    factory: object
    listener: object


@dataclasses.dataclass(frozen=True)
class LifecycleParts:
    """Retention, the idle-unload timer (None when off) and the health monitor."""

    health: object
    health_service: object
    unloader: Optional[object]
    retention: object
    retention_timer: object


@dataclasses.dataclass(frozen=True)
class ArchiveParts:
    """What build_archive produces when ``archive.s3.enabled``: the shipper, its own pool
    (S3 calls never take the cpu-pool's threads) and its service."""

    shipper: object
    pool: object
    service: object


@dataclasses.dataclass(frozen=True)
class CloudWatchParts:
    """What build_cloudwatch produces when ``archive.cloudwatch.enabled``: the shipper, its
    own pool (CloudWatch calls never take the cpu-pool's threads) and its service."""

    shipper: object
    pool: object
    service: object


@dataclasses.dataclass(frozen=True)
class QueryParts:
    """What build_queries produces: the gRPC servicer and the gRPC server service."""

    servicer: object
    grpc: object
    pool: object = None  # query-pool: SearchLogs' and AggregateMetrics' member scans


def build_service(config, reactor, *, registry=None, exit_on_start_failure=False,
                  extra_services=None):
    """Wire every component for ``config``; returns the root service.

    One builder per subsystem, each given what earlier ones built; then the
    root's children in start order (stop order is the reverse), in one list.
    ``extra_services(components)``, when given, returns services that start last
    (makeService's SIGHUP service).
    ``root.components`` exposes the parts for tests and benchmarks.
    """
    from prometheus_client import CollectorRegistry

    from joblet_persist.metrics import PersistMetrics
    from joblet_persist.services import OrderedMultiService

    metrics = PersistMetrics(registry if registry is not None else CollectorRegistry())
    metrics.set_clock(reactor.seconds)

    st = build_storage(config, reactor, metrics)
    health = build_health(config, reactor, st, metrics)
    wr = build_writer(config, reactor, st, health, metrics)
    ing = build_ingest(config, reactor, st, wr, health, metrics)
    arc = build_archive(config, reactor, st, health, metrics)
    cw = build_cloudwatch(config, reactor, st, health, metrics)
    lc = build_lifecycle(config, reactor, st, wr, health, metrics, archive=arc, cloudwatch=cw)
    q = build_queries(config, reactor, st, wr, lc, metrics, archive=arc, cloudwatch=cw)
    web = build_monitoring(config, reactor, lc.health, metrics)

    components = {
        "config": config,
        "lock": st.lock,
        "metrics": metrics,
        "pool": st.pool,
        "storage": st.storage,
        "writer": wr.writer,
        "factory": ing.factory,
        "health": lc.health,
        "ingest": ing.listener,
        "servicer": q.servicer,
        "retention": lc.retention,
        "grpc": q.grpc,
        "web": web,
        "archive": arc.shipper if arc is not None else None,
        "cloudwatch": cw.shipper if cw is not None else None,
    }
    extra = extra_services(components) if extra_services is not None else []

    # The start order; each child waits for the one before, and they stop in reverse.
    children = [
        st.lock,            # lock: nothing touches the data or a socket before it is held
        st.pool,            # cpu-pool: compression, appends, probes
        st.service,         # storage: job index loaded (or rebuilt); written last at stop
        wr.service,         # writer: flush timer; stop flushes and fsyncs every frame
        lc.unloader,        # unload: idle jobs' state dropped every minute (None when off)
        lc.health_service,  # health: probe loop for /health, Ping and gRPC health
        ing.listener,       # ingest: IPC socket; stop closes it and drains connections
        q.pool,             # query-pool: member scans (stops after grpc ended its calls)
        lc.retention_timer,  # retention: stop waits for a run in progress
        arc and arc.pool,     # archive-pool: the archive's S3 calls (absent when off)
        arc and arc.service,  # archive: upload rounds; stop waits for a round in progress
        cw and cw.pool,       # cloudwatch-pool: CloudWatch calls (absent when off)
        cw and cw.service,    # cloudwatch: shipping rounds; stop waits for a round in progress
        q.grpc,             # grpc: stop refuses new RPCs, then the grace period
        *web,               # metrics-http, health-http
        *extra,             # sighup, sdnotify (under twistd, from makeService)
    ]

    def start_failed(failure):
        # A service that cannot start (socket in use, unreadable data dir) ends the process.
        if exit_on_start_failure:
            _exit_nonzero_at_interpreter_exit()
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    root = OrderedMultiService(on_start_failure=start_failed)
    for child in children:
        if child is not None:
            child.setServiceParent(root)

    # The verdict checks the listeners, which start after the health monitor's first probe:
    # recompute it once everything runs, or Ping reports unhealthy until the next probe.
    root.started.addCallback(_refresh_verdict, lc.health)
    root.components = components

    return root


def build_storage(config, reactor, metrics) -> StorageParts:
    """The data directory lock, the cpu-pool and the storage backend named by
    ``storage.backend`` (storage/backends.py); the rest sees IStorageBackend."""
    from joblet_persist.logs import Logger
    from joblet_persist.services import CallbackService, DataDirLockService, ThreadPoolService
    from joblet_persist.storage.api import IIdleUnload
    from joblet_persist.storage.backends import make_storage
    from joblet_persist.storage.files import FileBudget, query_share

    sc, wc = config.storage, config.writer
    lock = DataDirLockService(sc.data_dir)
    pool = ThreadPoolService(
        reactor, "cpu-pool", wc.thread_count, switch_interval=wc.switch_interval
    )
    # Queries share what storage.maxOpenFiles leaves after the pool's own files.
    file_budget = FileBudget(query_share(sc.max_open_files, wc.thread_count))
    metrics.set_file_budget(file_budget)
    storage = make_storage(
        config, run=pool.run, clock=reactor, metrics=metrics, file_budget=file_budget
    )
    for key, mode in (("storage.fileMode", sc.file_mode), ("storage.dirMode", sc.dir_mode)):
        if mode & 0o004:
            Logger(namespace="joblet_persist.tap").warn(
                "{key} is {mode}: every local user can read the stored job output",
                key=key,
                mode=f"{mode:04o}",
            )

    from joblet_persist.storage.api import ILocalTier

    # The metric counts what is on disk: with tiering, the local tier's jobs and bytes.
    on_disk = storage.local if ILocalTier.providedBy(storage) else storage

    def storage_totals():
        # Running totals (constant time), not a walk of every job at each scrape.
        jobs, _logs, _metrics, size_bytes = on_disk.totals()
        return jobs, size_bytes

    metrics.set_storage_source(storage_totals)
    metrics.set_event_source(storage.event_totals)
    if IIdleUnload.providedBy(storage):
        metrics.set_loaded_source(lambda: (storage.loaded_jobs, storage.unloaded_jobs))
    service = CallbackService("storage", storage.start, storage.stop)
    return StorageParts(lock=lock, pool=pool, storage=storage, service=service)


def build_health(config, reactor, st: StorageParts, metrics):
    """The health monitor, probing the backend's IFreeSpace on the pool.  The other
    builders add their checks to it."""
    from joblet_persist.health import HealthMonitor
    from joblet_persist.storage.api import IFreeSpace

    storage = st.storage
    health = HealthMonitor(
        reactor,
        storage if IFreeSpace.providedBy(storage) else None,
        min_free_bytes=config.storage.retention.min_free_bytes,
        run_in_thread=st.pool.run,
    )
    metrics.set_health_source(health)
    return health


def build_writer(config, reactor, st: StorageParts, health, metrics) -> WriterParts:
    """The batching writer over the backend; its pause/resume reach the ingest factory
    once build_ingest binds them."""
    from joblet_persist.services import CallbackService
    from joblet_persist.writer import BatchingWriter

    wc = config.writer
    pause, resume = LateBound("writer pause"), LateBound("writer resume")
    writer = BatchingWriter(
        st.storage,
        reactor,
        flush_interval=wc.flush_interval,
        batch_max_messages=wc.batch_max_messages,
        batch_max_bytes=wc.batch_max_bytes,
        high_water_bytes=wc.high_water_bytes,
        low_water_bytes=wc.low_water_bytes,
        retry_initial=wc.retry_initial,
        retry_max=wc.retry_max,
        on_pause=pause,
        on_resume=resume,
        # Failing writes turn the verdict (Ping, gRPC health) unhealthy at once; on recovery
        # the disk is probed again first, since the last probe may have seen it full.
        on_health_change=lambda ok: health.probe_now() if ok else health.refresh(),
        metrics=metrics,
    )
    health.add_check(
        "writer",
        lambda: (
            not writer.failed_pending,
            "writes failing; retrying" if writer.failed_pending else "writes succeeding",
        ),
    )
    # An adaptive compression level falls to its fastest while ingest waits on appends.
    from joblet_persist.storage.api import ICompressionBacklog

    if ICompressionBacklog.providedBy(st.storage):
        high_water = wc.high_water_bytes
        st.storage.set_compression_backlog(lambda: writer.buffered_bytes / high_water)
    service = CallbackService("writer", writer.start, writer.stop)
    return WriterParts(writer=writer, service=service, pause=pause, resume=resume)


def build_ingest(config, reactor, st: StorageParts, wr: WriterParts, health,
                 metrics) -> IngestParts:
    """The IPC listener and its protocol factory; binds the writer's backpressure."""
    from joblet_persist.ingest import IngestFactory
    from joblet_persist.services import UnixListenerService

    ic = config.ipc
    factory = IngestFactory(
        wr.writer,
        metrics,
        reactor,
        max_frame_bytes=ic.max_frame_bytes,
        max_connections=ic.max_connections,
        max_partial_bytes=ic.max_partial_bytes,
        max_partial_bytes_per_connection=ic.partial_bytes_per_connection,
        partial_frame_timeout=ic.partial_frame_timeout,
    )
    wr.pause.bind(factory.pause_all)
    wr.resume.bind(factory.resume_all)
    listener = UnixListenerService(
        reactor, "ingest", ic.socket, factory, mode=ic.socket_mode,
        on_stop=lambda: factory.disconnect_all(ic.drain_timeout),
        on_recreated=metrics.ipc_socket_recreated,
    )
    # Each health round checks on the pool that the socket path is still ours.
    health.add_probe(listener.path_probe)
    health.add_check("ingest", listener.check)
    health.add_check("ipc_connections", factory.connections_check)
    health.add_check("ipc_partial_frames", factory.budget.check)
    health.add_check("ipc_events", factory.events.check)
    return IngestParts(factory=factory, listener=listener)


def build_archive(config, reactor, st: StorageParts, health, metrics) -> Optional[ArchiveParts]:
    """The S3 archive shipper (None unless ``archive.s3.enabled``: then boto3 is imported
    here, never otherwise).  It reads the local segments, so it needs the local backend."""
    s3c = config.archive.s3
    if not s3c.enabled:
        return None
    from joblet_persist.archive import s3
    from joblet_persist.archive.shipper import S3Shipper
    from joblet_persist.services import CallbackService, ThreadPoolService
    from joblet_persist.storage.safefs import FileModes

    sc = config.storage
    pool = ThreadPoolService(reactor, "archive-pool", 2)
    shipper = S3Shipper(
        s3c, config.server.node_id, sc.data_dir, st.storage, reactor, pool.run,
        s3=s3, make_client=s3.make_client,
        modes=FileModes(sc.file_mode, sc.dir_mode, sc.group),
    )
    shipper.set_metrics(metrics.archive("s3", shipper))
    from joblet_persist.storage.api import ILocalTier

    if ILocalTier.providedBy(st.storage):
        # Tiering releases only the local segments the shipper has archived as they are.
        st.storage.set_archive_check(shipper)
    health.add_check("archive", shipper.health_check)
    service = CallbackService("archive", shipper.start, shipper.stop)
    return ArchiveParts(shipper=shipper, pool=pool, service=service)


def build_cloudwatch(config, reactor, st: StorageParts, health,
                     metrics) -> Optional[CloudWatchParts]:
    """The CloudWatch shipper (None unless ``archive.cloudwatch.enabled``: then boto3 is
    imported when its pool starts, never otherwise).  It reads the local backend's snapshots."""
    cwc = config.archive.cloudwatch
    if not cwc.enabled:
        return None
    from joblet_persist.archive.cloudwatch import CloudWatchShipper
    from joblet_persist.services import CallbackService, ThreadPoolService
    from joblet_persist.storage.safefs import FileModes

    sc = config.storage
    pool = ThreadPoolService(reactor, "cloudwatch-pool", 2)
    tiered = sc.backend == "cloudwatch"
    shipper = CloudWatchShipper(
        cwc, config.server.node_id, sc.data_dir, st.storage.local if tiered else st.storage,
        reactor, pool.run,
        modes=FileModes(sc.file_mode, sc.dir_mode, sc.group),
    )
    shipper.set_metrics(metrics.cloudwatch(shipper))
    if tiered:
        st.storage.attach(shipper)  # the tier reads what is gone locally from CloudWatch
    health.add_check("cloudwatch", shipper.health_check)
    service = CallbackService("cloudwatch", shipper.start, shipper.stop)
    return CloudWatchParts(shipper=shipper, pool=pool, service=service)


def _archived_check(archive: Optional[ArchiveParts], cloudwatch: Optional[CloudWatchParts]):
    """Retention's IArchivedCheck: every configured remote must have taken the data."""
    if cloudwatch is None:
        return archive.shipper if archive is not None else None
    if archive is None:
        return cloudwatch.shipper
    from joblet_persist.archive.cloudwatch import AllArchived

    return AllArchived(archive.shipper, cloudwatch.shipper)


def build_lifecycle(config, reactor, st: StorageParts, wr: WriterParts, health,
                    metrics, archive: Optional[ArchiveParts] = None,
                    cloudwatch: Optional[CloudWatchParts] = None) -> LifecycleParts:
    """Retention (timer and runner), the idle-unload timer, the health monitor's service."""
    from twisted.application.internet import TimerService

    from joblet_persist.logs import Logger
    from joblet_persist.retention import RetentionPolicy, RetentionRunner, RetentionTimerService
    from joblet_persist.services import CallbackService
    from joblet_persist.storage.api import IIdleUnload

    sc, storage, writer = config.storage, st.storage, wr.writer
    unloader = None
    if sc.unload_idle_after > 0 and IIdleUnload.providedBy(storage):
        unload_log = Logger(namespace="joblet_persist.unload")

        # Memory follows the jobs in use: storage first, so that the writer may then forget
        # the arrival counters of jobs storage no longer holds.
        def unload_idle():
            try:
                storage.unload_idle(sc.unload_idle_after)
                writer.unload_idle(sc.unload_idle_after, storage.resident)
            except Exception:
                # Logged and tried again next time: a failure must not stop the timer.
                unload_log.failure("unloading idle jobs failed")

        unloader = TimerService(min(60.0, sc.unload_idle_after), unload_idle)
        unloader.clock = reactor
        unloader.setName("unload")

    health_service = CallbackService("health", health.start, health.stop)
    retention = RetentionRunner(
        storage,
        RetentionPolicy.from_config(sc.retention),
        reactor,
        busy_jobs=writer.busy_jobs,
        discard_job=writer.discard_job,
        metrics=metrics,
        archive=_archived_check(archive, cloudwatch),
    )
    retention_timer = RetentionTimerService(reactor, retention, sc.retention.interval)
    return LifecycleParts(health=health, health_service=health_service, unloader=unloader,
                          retention=retention, retention_timer=retention_timer)


def build_queries(config, reactor, st: StorageParts, wr: WriterParts, lc: LifecycleParts,
                  metrics, archive: Optional[ArchiveParts] = None,
                  cloudwatch: Optional[CloudWatchParts] = None) -> QueryParts:
    """The gRPC servicer (queries, DeleteJob, CleanupOldData) and its server."""
    from joblet_persist.grpc_server import GrpcServerService
    from joblet_persist.query import PersistServicer
    from joblet_persist.rules import parse_group
    from joblet_persist.services import ExecutorService

    storage, writer, health, qc = st.storage, wr.writer, lc.health, config.query

    def delete_job(job_id):
        if archive is None:
            d = writer.discard_job(job_id)
            d.addCallback(lambda _: storage.delete_job(job_id))
        else:
            # The archived objects go too: the deletion is recorded durably first (a crash
            # after the local deletion must not leave the job archived-only), and the
            # shipper deletes the objects once the local files are gone (none is uploaded
            # again).
            shipper = archive.shipper
            d = shipper.delete_job(job_id, hold=True)
            d.addCallback(lambda _: writer.discard_job(job_id))
            d.addCallback(lambda _: storage.delete_job(job_id))
            d.addBoth(lambda result: (shipper.release_delete(job_id), result)[1])
        if cloudwatch is not None:
            # The job's log streams go too: recorded durably once the local files are gone
            # (so no round ships them again), deleted by the shipper.
            d.addCallback(lambda freed: cloudwatch.shipper.delete_job(job_id).addCallback(
                lambda _: freed))
        return d

    def ingest_stats():
        return {
            "messages_received": writer.messages_received,
            "messages_written": writer.messages_written,
            "write_errors": writer.write_errors,
        }

    def cleanup(dry_run):
        d = lc.retention.run(dry_run)
        if not dry_run:
            d.addCallback(_refresh_health_after, health)
        return d

    import grpc

    from joblet_persist.follow import FollowHub

    follow_hub = FollowHub(
        writer, storage, reactor, buffer_bytes=qc.follow_buffer_bytes, metrics=metrics
    )

    def delete_job_ending_followers(job_id):
        follow_hub.end_job(job_id, grpc.StatusCode.NOT_FOUND, f"job {job_id} was deleted")
        return delete_job(job_id)


    # Search's member scans (inflate + match) on threads of their own, never the cpu-pool's.
    query_pool = ExecutorService("query-pool", qc.search_thread_count)
    servicer = PersistServicer(
        storage,
        reactor,
        is_healthy=lambda: health.healthy,
        ingest_stats=ingest_stats,
        delete_job=delete_job_ending_followers,
        cleanup=cleanup,
        batch_max_items=qc.batch_max_items,
        batch_max_bytes=qc.batch_max_bytes,
        max_limit=qc.max_limit,
        metrics=metrics,
        admin_ou=config.security.admin_ou,
        viewer_ou=config.security.viewer_ou,
        follow_hub=follow_hub,
        delete_note=cloudwatch.shipper.delete_note if cloudwatch is not None else "",
        search_submit=query_pool.submit,
        search_window=2 * query_pool.size,
        search_max_bytes=qc.search_max_bytes,
        search_max_seconds=qc.search_max_time,
        aggregate_max_points=qc.aggregate_max_points,
    )
    grpc_service = GrpcServerService(
        servicer,
        unix_socket=config.server.grpc_socket or None,
        unix_socket_mode=config.server.grpc_socket_mode,
        viewer_socket=config.server.grpc_viewer_socket or None,
        viewer_socket_mode=config.server.grpc_viewer_socket_mode,
        viewer_socket_gid=parse_group(config.server.grpc_viewer_socket_group),
        tcp_address=config.server.grpc_address or None,
        tls=_tls_settings(config),
        allow_plaintext_tcp=config.server.allow_plaintext_tcp,
        max_workers=config.server.grpc_workers,
        max_message_bytes=config.server.max_message_bytes,
        max_send_message_bytes=config.grpc_send_message_bytes,
        max_concurrent_rpcs=config.server.max_concurrent_rpcs,
        shutdown_grace=config.server.shutdown_grace,
        reactor=reactor,
    )
    grpc_service.setName("grpc")
    health.add_check(
        "grpc", lambda: (grpc_service.running, "serving" if grpc_service.running else "stopped")
    )
    return QueryParts(servicer=servicer, grpc=grpc_service, pool=query_pool)


def build_monitoring(config, reactor, health, metrics) -> list:
    """The Klein /metrics and /health listeners (one when they share a port; none when
    monitoring is off)."""
    from joblet_persist.services import TCPListenerService
    from joblet_persist.web import MonitoringApp, MonitoringSite

    mc = config.monitoring
    if not mc.enabled:
        return []
    app = MonitoringApp(health, metrics.registry, node_id=config.server.node_id,
                        version=__version__)
    site = MonitoringSite(app.resource())
    web_services = [
        TCPListenerService(reactor, "metrics-http", mc.bind_address, mc.metrics_port, site)
    ]
    if mc.health_port != mc.metrics_port or mc.health_port == 0:
        web_services.append(
            TCPListenerService(reactor, "health-http", mc.bind_address, mc.health_port, site)
        )
    return web_services


def _tls_settings(config):
    sec = config.security
    if not sec.tls_enabled:
        return None
    from joblet_persist.config import read_pem

    return {
        "server_cert": read_pem(sec.server_cert, "security.serverCert", source=config.source),
        "server_key": read_pem(sec.server_key, "security.serverKey", source=config.source),
        "ca_cert": (
            read_pem(sec.ca_cert, "security.caCert", source=config.source) if sec.ca_cert else None
        ),
        "require_client_cert": sec.require_client_cert,
    }


def _refresh_health_after(result, health):
    health.probe_now()
    return result


def _refresh_verdict(result, health):
    health.refresh()
    return result
