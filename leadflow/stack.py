"""Bringing leadflow up: servers (configured or embedded), migrations, topics, process roles.

`leadflow up` runs everything in one process tree; `leadflow run ROLE` runs one role against
configured servers (or the servers of a `leadflow up` running from the same directory, found
through its runtime file). Stopping — Ctrl-C or SIGTERM — ends the roles, then the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import psycopg
import structlog
import uvicorn
from prometheus_client import multiprocess
from pydantic import SecretStr

from allocate.allocator import Allocator, AllocatorConfig
from allocate.model import Window
from allocate.relay import OutboxRelay, RelayConfig
from allocate.service import AllocatorService, ServiceConfig
from classify import classify
from ingest.chain import IntakeChain
from ingest.consumer import IntakeConfig, KafkaIntake
from ingest.store import Classifier, LeadStore
from leadflow.analytics import analytics_worker
from leadflow.db import check_database, make_engine, schema_version, upgrade
from leadflow.embedded import EmbeddedServers
from leadflow.errors import RoleFailed, ServiceUnavailable, StartupError
from leadflow.kafka import ensure_topics
from leadflow.logs import get_logger
from leadflow.privacy import mask_text
from leadflow.rules import RulesHolder, watch_rules
from leadflow.settings import QueueSettings, Settings, masked_url
from leadflow.supervise import ChildSpec, Supervisor, SupervisorConfig
from leadflow.web import WebContext, create_app, create_probe_app
from schemas import migrate
from schemas.lead import Classification, CustomerContext, Lead
from sync.pollers import Poller, PollerConfig, SchedulerConfig, SchedulerService
from sync.staging import LoaderConfig, StagingLoader

if TYPE_CHECKING:
    from leadflow.demo import DemoSetup

log = get_logger("leadflow.stack")

RUNTIME_FILE = "runtime.json"


@dataclass(frozen=True)
class Endpoints:
    """Where the servers are, and whether they are leadflow's embedded ones."""

    database_url: str | None
    kafka_bootstrap: str | None
    web_url: str | None = None
    from_runtime_file: bool = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_runtime(data_dir: Path) -> dict[str, Any] | None:
    """The runtime file of a `leadflow up` still running from `data_dir`, if any."""
    path = data_dir / RUNTIME_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not _pid_alive(int(data.get("pid", 0))):
        return None
    return data


def resolve_endpoints(settings: Settings) -> Endpoints:
    """Configured URLs win; otherwise those of a running `leadflow up` in the data directory."""
    database = settings.database.url.get_secret_value() if settings.database.url else None
    kafka = settings.kafka.bootstrap
    runtime = read_runtime(settings.embedded.data_dir)
    if runtime is None:
        return Endpoints(database, kafka)
    return Endpoints(
        database or runtime.get("database_url"),
        kafka or runtime.get("kafka_bootstrap"),
        runtime.get("web_url"),
        from_runtime_file=True,
    )


def with_endpoints(
    settings: Settings, database_url: str | None, kafka_bootstrap: str | None
) -> Settings:
    """The settings with the servers actually in use filled in."""
    database = settings.database.model_copy(
        update={"url": SecretStr(database_url) if database_url else settings.database.url}
    )
    kafka = settings.kafka.model_copy(
        update={"bootstrap": kafka_bootstrap or settings.kafka.bootstrap}
    )
    return settings.model_copy(update={"database": database, "kafka": kafka})


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the stack owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


def _write_runtime(path: Path, runtime: dict[str, Any] | None) -> None:
    """Record (or, given None, remove) the running stack's endpoints for other commands."""
    if runtime is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runtime, indent=2))


Announce = Callable[[dict[str, Any]], None]


def bind_web(host: str, port: int) -> socket.socket:
    """Take the web port before anything else starts, so a taken port fails fast and clearly
    (and port 0 resolves to a free port with no race)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"Cannot listen on {host}:{port} for the web app: {exc.strerror or exc}. Another process "
            f"may use that port; set web.port (or LEADFLOW_WEB_PORT) to a free one, or 0 to pick one."
        ) from None
    sock.set_inheritable(False)
    return sock


def intake_worker(settings: Settings, classifier: Callable[[], Classifier]) -> KafkaIntake:
    """The real-time intake role, wired from the settings."""
    assert settings.database.url is not None
    url = settings.database.url.get_secret_value()
    timeout = max(1, int(settings.database.connect_timeout.total_seconds()))
    intake = settings.intake
    return KafkaIntake(
        IntakeConfig(
            topic=settings.topics.raw,
            dlq_topic=settings.topics.dlq,
            group=intake.consumer_group,
            batch_size=intake.batch_size,
            batch_wait=intake.batch_wait,
            retry_backoff_max=intake.retry_backoff_max,
            session_timeout=intake.session_timeout,
            heartbeat_interval=intake.heartbeat_interval,
        ),
        settings.kafka.client_options(),
        lambda: psycopg.connect(
            url, autocommit=True, connect_timeout=timeout, application_name="leadflow-intake"
        ),
        IntakeChain(intake.chain_config()),
        LeadStore(intake.dedup_window),
        classifier,
    )


def staging_loader(settings: Settings, classifier: Callable[[], Classifier]) -> StagingLoader:
    """The staging loader role, wired from the settings."""
    assert settings.database.url is not None
    url = settings.database.url.get_secret_value()
    timeout = max(1, int(settings.database.connect_timeout.total_seconds()))
    intake, staging = settings.intake, settings.staging
    return StagingLoader(
        LoaderConfig(
            schema=staging.schema_name,
            chunk_rows=staging.chunk_rows,
            lanes=staging.lanes,
            poll_interval=staging.poll_interval,
            retry_backoff_max=staging.retry_backoff_max,
            default_source=staging.default_source,
            default_event_type=staging.default_event_type,
            timezone=ZoneInfo(settings.allocation.default_timezone),
        ),
        lambda: psycopg.connect(
            url, autocommit=True, connect_timeout=timeout, application_name="leadflow-staging"
        ),
        IntakeChain(intake.chain_config()),
        LeadStore(intake.dedup_window),
        classifier,
        lambda: psycopg.AsyncConnection.connect(
            url,
            autocommit=True,
            connect_timeout=timeout,
            application_name="leadflow-staging-listener",
        ),
    )


def source_pollers(settings: Settings, classifier: Callable[[], Classifier]) -> list[Poller]:
    """One poller per configured stock-data source, wired from the settings."""
    assert settings.database.url is not None
    url = settings.database.url.get_secret_value()
    timeout = max(1, int(settings.database.connect_timeout.total_seconds()))
    intake, scheduler = settings.intake, settings.scheduler
    config = PollerConfig(
        retry_initial=scheduler.retry_backoff_initial,
        retry_max=scheduler.retry_backoff_max,
        max_page_rows=scheduler.max_page_rows,
    )
    chain, store = IntakeChain(intake.chain_config()), LeadStore(intake.dedup_window)

    def connect() -> psycopg.Connection:
        return psycopg.connect(
            url, autocommit=True, connect_timeout=timeout, application_name="leadflow-poller"
        )

    return [
        Poller(spec, config, connect, chain, store, classifier, redact=mask_text)
        for spec in settings.source_specs()
    ]


def scheduler_service(settings: Settings, classifier: Callable[[], Classifier]) -> SchedulerService:
    """The scheduler role: every source's job, run by one replica at a time."""
    assert settings.database.url is not None
    url = settings.database.url.get_secret_value()
    timeout = max(1, int(settings.database.connect_timeout.total_seconds()))
    scheduler = settings.scheduler
    return SchedulerService(
        source_pollers(settings, classifier),
        SchedulerConfig(
            timezone=ZoneInfo(settings.scheduler_timezone),
            misfire_grace=scheduler.misfire_grace_time,
            lock_interval=scheduler.lock_interval,
            stop_timeout=scheduler.stop_timeout,
            history_retention=scheduler.history_retention,
        ),
        lambda: psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=timeout, application_name="leadflow-scheduler"
        ),
    )


def allocator_service(settings: Settings) -> AllocatorService:
    """The allocator role, wired from the settings."""
    assert settings.database.url is not None
    url = settings.database.url.get_secret_value()
    timeout = max(1, int(settings.database.connect_timeout.total_seconds()))
    allocation = settings.allocation
    defaults = QueueSettings(name="implicit", business_line="implicit")
    allocator = Allocator(
        AllocatorConfig(
            queues=settings.queue_specs(),
            assigned_topic=settings.topics.assigned,
            batch_size=allocation.batch_size,
            implicit_queues=allocation.implicit_queues,
            default_timezone=allocation.default_timezone,
            implicit_sla=defaults.sla,
            implicit_max_attempts=defaults.max_attempts,
            implicit_call_window=Window.parse(defaults.call_window)
            if defaults.call_window
            else None,
        )
    )
    return AllocatorService(
        allocator,
        lambda: psycopg.connect(
            url, autocommit=True, connect_timeout=timeout, application_name="leadflow-allocator"
        ),
        lambda: psycopg.AsyncConnection.connect(
            url,
            autocommit=True,
            connect_timeout=timeout,
            application_name="leadflow-allocator-listener",
        ),
        ServiceConfig(
            sweep_interval=allocation.sweep_interval,
            retry_backoff_max=settings.intake.retry_backoff_max,
        ),
    )


def relay_worker(settings: Settings) -> OutboxRelay:
    """The outbox relay role, wired from the settings (a standby while another relay leads)."""
    assert settings.database.url is not None
    url = settings.database.url.get_secret_value()
    timeout = max(1, int(settings.database.connect_timeout.total_seconds()))
    relay = settings.relay
    return OutboxRelay(
        RelayConfig(
            batch_size=relay.batch_size,
            poll_interval=relay.poll_interval,
            retention=relay.retention,
        ),
        settings.kafka.client_options(),
        lambda: psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=timeout, application_name="leadflow-relay"
        ),
    )


def rules_classifier(holder: RulesHolder) -> Callable[[], Classifier]:
    """The classifier of the rules in force: asked once per batch, so a reload applies between
    batches and every batch is classified by exactly one rule set."""

    def current() -> Classifier:
        rules = holder.rules

        def decide(
            leads: Sequence[Lead], now: datetime, context: Mapping[str, CustomerContext]
        ) -> list[Classification]:
            return classify(leads, rules, now, context)

        return decide

    return current


async def _serve(
    settings: Settings,
    roles: Sequence[str],
    announce: Announce,
    *,
    web_socket: socket.socket | None = None,
    probe_socket: socket.socket | None = None,
) -> None:
    """Run the roles until SIGINT/SIGTERM or until a role fails (then re-raise: a supervisor
    restarts a process whose role broke)."""
    created = await ensure_topics(settings.kafka, settings.topics)
    if created:
        log.info("topics created", topics=created)

    assert settings.database.url is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: dict[str, asyncio.Task[Any]] = {}
    failed: dict[str, str] = {}
    engine = None
    web: _Server | None = None
    probe: _Server | None = None
    runtime: dict[str, Any] = {
        "pid": os.getpid(),
        "started_at": datetime.now(UTC).isoformat(),
        "database_url": settings.database.url.get_secret_value(),
        "kafka_bootstrap": settings.kafka.bootstrap,
        "web_url": None,
        "roles": list(roles),
        "embedded_postgres": False,
        "embedded_kafka": False,
    }
    try:
        holder = None
        if {"web", "intake", "staging", "scheduler"} & set(roles):
            # One rule set per process, reloaded for every role in it that classifies.
            holder = RulesHolder.from_settings(settings)
            tasks["rules"] = asyncio.create_task(
                watch_rules(holder, settings, settings.database.url.get_secret_value(), stop),
                name="rules",
            )
        if "web" in roles:
            assert web_socket is not None
            assert holder is not None
            engine = make_engine(
                settings.database.url.get_secret_value(), pool_size=settings.database.pool_size
            )
            port = int(web_socket.getsockname()[1])
            web = _Server(
                uvicorn.Config(
                    create_app(WebContext(settings, engine, rules_classifier(holder))),
                    host=settings.web.host,
                    port=port,
                    log_config=None,
                    access_log=False,
                    lifespan="on",
                )
            )
            tasks["web"] = asyncio.create_task(web.serve(sockets=[web_socket]), name="web")
            while not web.started and not tasks["web"].done():  # noqa: ASYNC110 - uvicorn has no event
                await asyncio.sleep(0.05)
            runtime["web_url"] = f"http://{settings.web.host}:{port}"
        if probe_socket is not None:
            # A role without the web app still answers probes and scrapes.
            engine = make_engine(settings.database.url.get_secret_value(), pool_size=1)
            port = int(probe_socket.getsockname()[1])
            probe = _Server(
                uvicorn.Config(
                    create_probe_app(WebContext(settings, engine), role=",".join(roles)),
                    host=settings.web.host,
                    port=port,
                    log_config=None,
                    access_log=False,
                    lifespan="on",
                )
            )
            tasks["probe"] = asyncio.create_task(probe.serve(sockets=[probe_socket]), name="probe")
            while not probe.started and not tasks["probe"].done():  # noqa: ASYNC110 - no event
                await asyncio.sleep(0.05)
            runtime["metrics_url"] = f"http://{settings.web.host}:{port}/metrics"
        if "intake" in roles:
            assert holder is not None
            worker = intake_worker(settings, rules_classifier(holder))
            tasks["intake"] = asyncio.create_task(worker.run(stop), name="intake")
        if "staging" in roles:
            assert holder is not None
            loader = staging_loader(settings, rules_classifier(holder))
            tasks["staging"] = asyncio.create_task(loader.run(stop), name="staging")
        if "scheduler" in roles:
            assert holder is not None
            service = scheduler_service(settings, rules_classifier(holder))
            tasks["scheduler"] = asyncio.create_task(service.run(stop), name="scheduler")
        if "relay" in roles:
            tasks["relay"] = asyncio.create_task(relay_worker(settings).run(stop), name="relay")
        if "allocator" in roles:
            tasks["allocator"] = asyncio.create_task(
                allocator_service(settings).run(stop), name="allocator"
            )
        if "analytics" in roles:
            tasks["analytics"] = asyncio.create_task(
                analytics_worker(settings).run(stop), name="analytics"
            )
        announce(runtime)
        stopping = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait(
            [stopping, *tasks.values()], return_when=asyncio.FIRST_COMPLETED
        )
        stopping.cancel()
        for task in done:
            if task is stopping:
                continue
            # A role runs until told to stop: one that ends before, even quietly, has failed.
            if task.cancelled():
                failed[task.get_name()] = "cancelled"
            elif (error := task.exception()) is not None:
                failed[task.get_name()] = repr(error)  # masked by the log, like every field
            elif not stop.is_set():
                failed[task.get_name()] = "ended by itself"
        for name, why in failed.items():
            log.error("role failed; stopping", role=name, error=why)
    finally:
        log.info("stopping")
        stop.set()
        for server in (web, probe):
            if server is not None:
                server.should_exit = True
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        if engine is not None:
            engine.dispose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    # Exit 1 (a supervisor restarts the process) with the traceback in the log, where personal
    # data is masked, rather than printed raw by the interpreter.
    for name, outcome in zip(tasks, results, strict=True):
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            log.error("role traceback", role=name, exc_info=outcome)
            raise RoleFailed(f"the {name} role failed: {mask_text(repr(outcome))}") from outcome
    if failed:  # cancelled or ended by itself: nothing raised to chain from
        name, why = next(iter(failed.items()))
        raise RoleFailed(f"the {name} role failed: {why}")


async def _watch_servers(servers: EmbeddedServers, stop: asyncio.Event) -> bool:
    while not stop.is_set():
        for name, server in (("postgres", servers.postgres), ("kafka", servers.kafka)):
            if server is not None and not server.alive():
                log.error("embedded server exited; stopping", server=name)
                stop.set()
                return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1)
    return False


#: The roles `leadflow up` runs in one process, and those `leadflow run ROLE` can run alone.
UP_ROLES = ("web", "intake", "allocator", "relay", "staging", "scheduler", "analytics")
BUILT_ROLES = frozenset(UP_ROLES)


#: Environment a child of `leadflow up` gets (internal): its listening socket (web) and a mark
#: that the web role serves every role's metrics, so no child binds `web.metrics_port`.
UP_CHILD_ENV = "LEADFLOW_UP_CHILD"
UP_WEB_FD_ENV = "LEADFLOW_UP_WEB_FD"
#: Where the roles of `leadflow up` keep their metrics for the web role to serve them all.
METRICS_DIR = "metrics"


def up(
    settings: Settings,
    announce: Announce,
    *,
    config_path: Path | None = None,
    demo: bool = False,
) -> int:
    """Start what is not configured, migrate, create topics, then run every role as a supervised
    child process until told to stop. Returns the exit status: 0 when stopped, 1 when an embedded
    server died under the roles."""
    # Ctrl-C while the servers start must still stop them: handle it as an exception until the
    # event loop takes the signals over.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    web_socket = bind_web(settings.web.host, settings.web.port)
    servers = EmbeddedServers(
        settings.embedded.data_dir,
        database_url=settings.database.url.get_secret_value() if settings.database.url else None,
        kafka_bootstrap=settings.kafka.bootstrap,
        postgres_port=settings.embedded.postgres_port,
        kafka_port=settings.embedded.kafka_port,
    )
    with web_socket, servers:
        live = with_endpoints(settings, servers.database_url, servers.kafka_bootstrap)
        assert live.database.url is not None
        database_url = live.database.url.get_secret_value()
        engine = make_engine(database_url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        log.info("schema up to date", database=masked_url(database_url))
        setup = None
        if demo:
            from leadflow import demo as demo_package

            setup = demo_package.prepare(live, database_url, settings.embedded.data_dir)
            config_path = setup.config_path
        try:
            return asyncio.run(
                _supervise(
                    live,
                    announce,
                    config_path=config_path,
                    servers=servers,
                    web_socket=web_socket,
                    demo=setup,
                )
            )
        except KeyboardInterrupt:
            return 0


def _child_env(
    settings: Settings, config_path: Path | None, metrics_dir: Path, extra: Mapping[str, str]
) -> dict[str, str]:
    """The environment of every child: the servers in use, the configuration file, the shared
    metrics directory."""
    env = dict(os.environ)
    env.pop(UP_WEB_FD_ENV, None)
    assert settings.database.url is not None
    assert settings.kafka.bootstrap is not None
    env["LEADFLOW_DATABASE_URL"] = settings.database.url.get_secret_value()
    env["LEADFLOW_KAFKA_BOOTSTRAP"] = settings.kafka.bootstrap
    if config_path is not None:
        env["LEADFLOW_CONFIG"] = str(config_path.resolve())
    else:
        env.pop("LEADFLOW_CONFIG", None)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    env[UP_CHILD_ENV] = "1"
    env.update(extra)
    return env


async def _supervise(
    settings: Settings,
    announce: Announce,
    *,
    config_path: Path | None,
    servers: EmbeddedServers,
    web_socket: socket.socket,
    demo: DemoSetup | None = None,
) -> int:
    created = await ensure_topics(settings.kafka, settings.topics)
    if created:
        log.info("topics created", topics=created)
    data_dir = settings.embedded.data_dir
    metrics_dir = data_dir / METRICS_DIR
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    env = _child_env(settings, config_path, metrics_dir, demo.env if demo is not None else {})
    port = int(web_socket.getsockname()[1])
    web_url = f"http://{settings.web.host}:{port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    config = settings.supervisor
    runtime_path = data_dir / RUNTIME_FILE
    runtime: dict[str, Any] = {
        "pid": os.getpid(),
        "started_at": datetime.now(UTC).isoformat(),
        "database_url": settings.database.url.get_secret_value() if settings.database.url else None,
        "kafka_bootstrap": settings.kafka.bootstrap,
        "web_url": web_url,
        "roles": list(UP_ROLES),
        "children": {},
        "embedded_postgres": servers.postgres is not None,
        "embedded_kafka": servers.kafka is not None,
        "ready": False,
    }

    def changed() -> None:
        runtime["children"] = {n: s.as_dict() for n, s in supervisor.states.items()}
        if runtime["ready"]:  # other commands find the stack once it answers
            _write_runtime(runtime_path, runtime)

    def ended(pid: int) -> None:
        # Gauges of a process that ended leave the web role's /metrics with it.
        multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]

    supervisor = Supervisor(
        SupervisorConfig(
            restart_initial=config.restart_backoff_initial.total_seconds(),
            restart_max=config.restart_backoff_max.total_seconds(),
            stop_timeout=config.stop_timeout.total_seconds(),
        ),
        on_exit=ended,
        on_change=changed,
    )
    command = [sys.executable, "-m", "leadflow", "run"]
    web_socket.set_inheritable(True)
    for role in UP_ROLES:
        if role == "web":
            fd = web_socket.fileno()
            spec = ChildSpec(role, [*command, role], {**env, UP_WEB_FD_ENV: str(fd)}, (fd,))
        else:
            spec = ChildSpec(role, [*command, role], env)
        supervisor.start(spec)
    watch = asyncio.create_task(_watch_servers(servers, stop), name="watch-servers")
    running = asyncio.create_task(supervisor.run(stop), name="supervisor")
    try:
        if await _wait_web(web_url, stop):
            if demo is not None:
                supervisor.start(
                    ChildSpec(
                        "demo",
                        [sys.executable, "-m", "leadflow.demo"],
                        {**env, "LEADFLOW_DEMO_WEB_URL": web_url},
                    )
                )
                runtime["demo"] = {
                    "ops_url": f"{web_url}/ops#token={demo.ops_token}",
                    "agent_url": f"{web_url}/agent#token={demo.agent_token}",
                    "agent_id": demo.agent_id,
                    "tips": list(demo.tips),
                }
            runtime["ready"] = True
            changed()
            announce(runtime)
        await running
    finally:
        stop.set()
        await running
        died = watch.done() and watch.result()
        watch.cancel()
        _write_runtime(runtime_path, None)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 1 if died else 0


async def _wait_web(web_url: str, stop: asyncio.Event) -> bool:
    """Wait until the web role answers /healthz (True), or until stopping (False)."""
    url = f"{web_url}/healthz"

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - our own URL
                return bool(response.status == 200)
        except OSError:
            return False

    while not stop.is_set():
        if await asyncio.to_thread(probe):
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)
    return False


def require_schema(database_url: str) -> None:
    """Refuse to start a role on a database behind this code's schema (a deployment whose
    migration has not run yet): it would fail on the first table or column it lacks, in the
    middle of its work. A database ahead of the code (a rolling upgrade migrated first) is left
    to the old code while it drains, and one that does not answer to the role, which waits."""
    engine = make_engine(database_url, pool_size=1)
    try:
        try:
            check_database(engine)
        except ServiceUnavailable:
            return
        current, head = schema_version(engine)
    finally:
        engine.dispose()
    if current != head and (current is None or migrate.known(current)):
        raise StartupError(
            f"The database at {masked_url(database_url)} is at schema revision "
            f"{current or 'none (leadflow never migrated it)'}; this leadflow needs {head}. Run "
            "`leadflow db upgrade` first (`leadflow up` does it itself; on Kubernetes, the "
            "migration Job)."
        )


def serve_role(settings: Settings, endpoints: Endpoints, role: str, announce: Announce) -> None:
    """`leadflow run ROLE`: one role against existing servers, until SIGINT/SIGTERM.

    Started by `leadflow up`, the web role listens on the socket `up` hands it (kept open across
    restarts) and the other roles open no metrics port: the web role serves everyone's metrics.
    """
    if role not in BUILT_ROLES:
        raise ValueError(f"role {role!r} is not built yet")
    structlog.contextvars.bind_contextvars(role=role)
    live = with_endpoints(settings, endpoints.database_url, endpoints.kafka_bootstrap)
    assert live.database.url is not None
    require_schema(live.database.url.get_secret_value())
    under_up = os.environ.get(UP_CHILD_ENV) == "1"
    inherited = os.environ.get(UP_WEB_FD_ENV)
    if under_up:  # `leadflow up` announces the whole stack once

        def announce(runtime: dict[str, Any]) -> None:
            log.info("role ready", pid=runtime["pid"])

    with contextlib.ExitStack() as stack, contextlib.suppress(KeyboardInterrupt):
        web_socket = None
        if role == "web":
            web_socket = stack.enter_context(
                socket.socket(fileno=int(inherited))
                if inherited
                else bind_web(settings.web.host, settings.web.port)
            )
        port = settings.web.metrics_port
        probe_socket = (
            stack.enter_context(bind_web(settings.web.host, port))
            if role != "web" and port is not None and not under_up
            else None
        )
        asyncio.run(
            _serve(live, [role], announce, web_socket=web_socket, probe_socket=probe_socket)
        )
