"""Composition root: twistd options and makeService.  Reactor thread.

This is the only place where components are wired together.  Nothing here
creates threads or servers: ``makeService`` only builds Service objects, and
each creates its pools, sockets and gRPC server in ``startService`` (twistd may
fork between the two).

Start order (stop order is the reverse, each step waiting for the previous):

0. lock          exclusive lock on the data directory (a second instance refuses to start)
1. cpu-pool      compression/append/scan thread pool, sized to the cores
2. storage       job index loaded (or rebuilt from the files)
3. writer        batching writer and its flush timer
4. health        disk probe loop feeding /health, Ping and gRPC health
5. ingest        IPC Unix socket listener (stop: close listener, drain connections)
6. retention     periodic retention run (stop: wait for a run in progress)
7. grpc          gRPC server on the Unix socket and/or TCP (stop: refuse, then grace)
8. monitoring    Klein /metrics and /health listeners

So on SIGTERM: monitoring and gRPC stop accepting first, a retention run in
progress finishes, ingest closes its connections, the writer flushes and fsyncs
every received frame, storage writes the job index, and the pool is joined.
"""

from __future__ import annotations

from twisted.python import usage

from joblet_persist import __version__


class Options(usage.Options):
    synopsis = "[--config FILE] [--data-dir DIR]"
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

    def postOptions(self):
        from joblet_persist.config import ConfigError, load_config

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
    root = build_service(config, reactor, exit_on_start_failure=True)
    parts = root.components

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
    SighupService(reactor, reloader.reload).setServiceParent(root)
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


def build_service(config, reactor, *, registry=None, exit_on_start_failure=False):
    """Wire every component for ``config``; returns the root service.

    ``root.components`` exposes the parts for tests and benchmarks.
    """
    from prometheus_client import CollectorRegistry
    from twisted.application.internet import TimerService
    from twisted.web.server import Site

    from joblet_persist.config import resolve_group
    from joblet_persist.grpc_server import GrpcServerService
    from joblet_persist.health import HealthMonitor
    from joblet_persist.ingest import IngestFactory
    from joblet_persist.logs import Logger
    from joblet_persist.metrics import PersistMetrics
    from joblet_persist.query import PersistServicer
    from joblet_persist.retention import (
        RetentionPolicy,
        RetentionRunner,
        RetentionTimerService,
    )
    from joblet_persist.services import (
        CallbackService,
        DataDirLockService,
        OrderedMultiService,
        TCPListenerService,
        ThreadPoolService,
        UnixListenerService,
    )
    from joblet_persist.storage.api import IFreeSpace, IIdleUnload
    from joblet_persist.storage.backends import make_storage
    from joblet_persist.storage.files import FileBudget, query_share
    from joblet_persist.web import MonitoringApp
    from joblet_persist.writer import BatchingWriter

    sc, wc, ic, qc, mc = config.storage, config.writer, config.ipc, config.query, config.monitoring
    metrics = PersistMetrics(registry if registry is not None else CollectorRegistry())
    metrics.set_clock(reactor.seconds)

    def start_failed(failure):
        # A service that cannot start (socket in use, unreadable data dir) ends the process.
        if exit_on_start_failure:
            _exit_nonzero_at_interpreter_exit()
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    root = OrderedMultiService(on_start_failure=start_failed)

    # First to start, last to stop: nothing touches the data or replaces a socket unless this
    # process is the only one using the data directory.
    lock = DataDirLockService(sc.data_dir)
    lock.setServiceParent(root)

    pool = ThreadPoolService(reactor, "cpu-pool", wc.thread_count)
    pool.setServiceParent(root)

    # Queries share what storage.maxOpenFiles leaves after the pool's own files.
    file_budget = FileBudget(query_share(sc.max_open_files, wc.thread_count))
    metrics.set_file_budget(file_budget)
    # The backend storage.backend names (storage/backends.py); the rest sees IStorageBackend.
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

    def storage_totals():
        jobs = storage.list_jobs()
        return len(jobs), sum(j.size_bytes for j in jobs)

    metrics.set_storage_source(storage_totals)
    CallbackService("storage", storage.start, storage.stop).setServiceParent(root)

    factory_box: list = []
    writer = BatchingWriter(
        storage,
        reactor,
        flush_interval=wc.flush_interval,
        batch_max_messages=wc.batch_max_messages,
        batch_max_bytes=wc.batch_max_bytes,
        high_water_bytes=wc.high_water_bytes,
        low_water_bytes=wc.low_water_bytes,
        retry_initial=wc.retry_initial,
        retry_max=wc.retry_max,
        on_pause=lambda: factory_box[0].pause_all(),
        on_resume=lambda: factory_box[0].resume_all(),
        # Failing writes turn the verdict (Ping, gRPC health) unhealthy at once; on recovery
        # the disk is probed again first, since the last probe may have seen it full.
        on_health_change=lambda ok: health.probe_now() if ok else health.refresh(),
        metrics=metrics,
    )
    CallbackService("writer", writer.start, writer.stop).setServiceParent(root)

    if sc.unload_idle_after > 0 and IIdleUnload.providedBy(storage):
        # Memory follows the jobs in use: storage first, so that the writer may then forget
        # the arrival counters of jobs storage no longer holds.
        def unload_idle():
            try:
                storage.unload_idle(sc.unload_idle_after)
                writer.unload_idle(sc.unload_idle_after, storage.resident)
            except Exception:
                # Logged and tried again next time: a failure must not stop the timer.
                unload_log.failure("unloading idle jobs failed")

        unload_log = Logger(namespace="joblet_persist.unload")

        unloader = TimerService(min(60.0, sc.unload_idle_after), unload_idle)
        unloader.clock = reactor
        unloader.setName("unload")
        unloader.setServiceParent(root)
    if IIdleUnload.providedBy(storage):
        metrics.set_loaded_source(lambda: (storage.loaded_jobs, storage.unloaded_jobs))

    factory = IngestFactory(
        writer,
        metrics,
        reactor,
        max_frame_bytes=ic.max_frame_bytes,
        max_connections=ic.max_connections,
        max_partial_bytes=ic.max_partial_bytes,
        max_partial_bytes_per_connection=ic.partial_bytes_per_connection,
        partial_frame_timeout=ic.partial_frame_timeout,
    )
    factory_box.append(factory)

    health = HealthMonitor(
        reactor,
        storage if IFreeSpace.providedBy(storage) else None,
        min_free_bytes=sc.retention.min_free_bytes,
        run_in_thread=pool.run,
    )
    metrics.set_health_source(health)
    CallbackService("health", health.start, health.stop).setServiceParent(root)

    ingest = UnixListenerService(
        reactor, "ingest", ic.socket, factory, mode=ic.socket_mode,
        on_stop=lambda: factory.disconnect_all(ic.drain_timeout),
        on_recreated=metrics.ipc_socket_recreated,
    )
    ingest.setServiceParent(root)
    # Each health round checks on the pool that the socket path is still ours.
    health.add_probe(ingest.path_probe)

    def delete_job(job_id):
        d = writer.discard_job(job_id)
        d.addCallback(lambda _: storage.delete_job(job_id))
        return d

    def ingest_stats():
        return {
            "messages_received": writer.messages_received,
            "messages_written": writer.messages_written,
            "write_errors": writer.write_errors,
        }

    retention = RetentionRunner(
        storage,
        RetentionPolicy.from_config(sc.retention),
        reactor,
        busy_jobs=writer.busy_jobs,
        discard_job=writer.discard_job,
        metrics=metrics,
    )
    retention_timer = RetentionTimerService(reactor, retention, sc.retention.interval)
    retention_timer.setServiceParent(root)

    def cleanup(dry_run):
        d = retention.run(dry_run)
        if not dry_run:
            d.addCallback(_refresh_health_after, health)
        return d

    servicer = PersistServicer(
        storage,
        reactor,
        is_healthy=lambda: health.healthy,
        ingest_stats=ingest_stats,
        delete_job=delete_job,
        cleanup=cleanup,
        batch_max_items=qc.batch_max_items,
        batch_max_bytes=qc.batch_max_bytes,
        max_limit=qc.max_limit,
        metrics=metrics,
        admin_ou=config.security.admin_ou,
        viewer_ou=config.security.viewer_ou,
    )
    grpc_service = GrpcServerService(
        servicer,
        unix_socket=config.server.grpc_socket or None,
        unix_socket_mode=config.server.grpc_socket_mode,
        viewer_socket=config.server.grpc_viewer_socket or None,
        viewer_socket_mode=config.server.grpc_viewer_socket_mode,
        viewer_socket_gid=resolve_group(config.server.grpc_viewer_socket_group),
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
        "writer",
        lambda: (
            not writer.failed_pending,
            "writes failing; retrying" if writer.failed_pending else "writes succeeding",
        ),
    )
    health.add_check("ingest", ingest.check)
    health.add_check("ipc_connections", factory.connections_check)
    health.add_check("ipc_partial_frames", factory.budget.check)
    health.add_check(
        "grpc", lambda: (grpc_service.running, "serving" if grpc_service.running else "stopped")
    )
    grpc_service.setServiceParent(root)

    web_services = []
    if mc.enabled:
        app = MonitoringApp(
            health, metrics.registry, node_id=config.server.node_id, version=__version__
        )
        site = Site(app.resource())
        site.noisy = False
        web_services.append(
            TCPListenerService(reactor, "metrics-http", mc.bind_address, mc.metrics_port, site)
        )
        if mc.health_port != mc.metrics_port or mc.health_port == 0:
            web_services.append(
                TCPListenerService(reactor, "health-http", mc.bind_address, mc.health_port, site)
            )
        for web in web_services:
            web.setServiceParent(root)

    # The verdict checks the listeners, which start after the health monitor's first probe:
    # recompute it once everything runs, or Ping reports unhealthy until the next probe.
    root.started.addCallback(_refresh_verdict, health)

    root.components = {
        "config": config,
        "lock": lock,
        "metrics": metrics,
        "pool": pool,
        "storage": storage,
        "writer": writer,
        "factory": factory,
        "health": health,
        "ingest": ingest,
        "servicer": servicer,
        "retention": retention,
        "grpc": grpc_service,
        "web": web_services,
    }
    return root


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
