"""The HTTP surface: liveness, readiness, Prometheus metrics and the API (`leadflow.api`).

`/healthz` answers while the process serves requests. `/readyz` answers 200 only when
PostgreSQL answers with the schema at the head revision and the Kafka broker answers with the
configured topics present; otherwise 503 with what is missing, never a stack trace.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Histogram, make_asgi_app, multiprocess
from sqlalchemy.engine import Engine

from ingest.chain import IntakeChain
from ingest.store import Classifier, LeadStore
from leadflow import __version__, api
from leadflow.db import check_database, schema_version
from leadflow.errors import ServiceUnavailable
from leadflow.kafka import describe_topics
from leadflow.rules import RULES_INFO
from leadflow.settings import Settings

READY_TIMEOUT_SECONDS = 3.0
#: The pages and their assets (a vendored chart library among them: no CDN, no internet).
STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class WebContext:
    settings: Settings
    engine: Engine
    #: The classifier of the rules in force, for HTTP intake; None answers 503 there.
    classifier: Callable[[], Classifier] | None = None


def _database_check(engine: Engine) -> dict[str, Any]:
    version = check_database(engine)
    current, head = schema_version(engine)
    return {
        "ok": current == head,
        "server_version": version,
        "schema": current,
        "schema_head": head,
    }


async def _kafka_check(settings: Settings) -> dict[str, Any]:
    names = [settings.topics.raw, settings.topics.dlq, settings.topics.assigned]
    topics = await describe_topics(settings.kafka, names)
    missing = [name for name, info in topics.items() if info is None]
    return {"ok": not missing, "bootstrap": settings.kafka.bootstrap, "missing_topics": missing}


async def _guarded(name: str, check: Any) -> dict[str, Any]:
    try:
        return dict(await asyncio.wait_for(check, READY_TIMEOUT_SECONDS))
    except ServiceUnavailable as exc:
        return {"ok": False, "error": str(exc)}
    except TimeoutError:
        return {"ok": False, "error": f"{name} did not answer within {READY_TIMEOUT_SECONDS:.0f}s"}


# Pages load nothing from elsewhere; this makes the browser hold them to it.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _metrics_app() -> Any:
    """Prometheus metrics of this process; under `leadflow up` (PROMETHEUS_MULTIPROC_DIR set)
    those of every role: each process writes its samples there, this sums them up."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return make_asgi_app()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    registry.register(RULES_INFO)  # an info metric lives in its process: the web role's rules
    return make_asgi_app(registry=registry)


def create_probe_app(context: WebContext, *, role: str = "web") -> FastAPI:
    """Liveness, readiness and Prometheus metrics: what every role serves (the web role adds
    the API and pages; others serve this alone on `web.metrics_port`)."""
    app = FastAPI(
        title="leadflow" if role == "web" else f"leadflow {role}",
        version=__version__,
        description="Lead ingestion and distribution for telesales call centers.",
    )
    app.mount("/metrics", _metrics_app())

    @app.get("/healthz", tags=["health"], summary="Liveness: the process serves requests")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: PostgreSQL and Kafka answer")
    async def readyz() -> JSONResponse:
        database, kafka = await asyncio.gather(
            _guarded("PostgreSQL", asyncio.to_thread(_database_check, context.engine)),
            _guarded("Kafka", _kafka_check(context.settings)),
        )
        ready = database["ok"] and kafka["ok"]
        body = {"status": "ready" if ready else "not ready", "postgres": database, "kafka": kafka}
        return JSONResponse(body, status_code=200 if ready else 503)

    return app


_REQUESTS = Counter(
    "leadflow_http_requests_total",
    "HTTP requests by method, route (its template, not the path) and status.",
    ["method", "route", "status"],
)
_REQUEST_SECONDS = Histogram(
    "leadflow_http_request_seconds",
    "Time to answer an HTTP request, by route.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def create_app(context: WebContext) -> FastAPI:
    """The web role's app: probes and metrics, the API, the agent workbench, ops and reports
    pages."""
    app = create_probe_app(context)

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response: Response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", None) or (
                "/static" if request.url.path.startswith("/static/") else "unmatched"
            )
            _REQUESTS.labels(request.method, template, str(status)).inc()
            _REQUEST_SECONDS.labels(template).observe(time.perf_counter() - started)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/agent", tags=["pages"], summary="The agent workbench", include_in_schema=False)
    async def agent_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "agent.html", headers=_PAGE_HEADERS)

    @app.get("/ops", tags=["pages"], summary="The live ops dashboard", include_in_schema=False)
    async def ops_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "ops.html", headers=_PAGE_HEADERS)

    @app.get(
        "/ops/reports", tags=["pages"], summary="The lead funnel reports", include_in_schema=False
    )
    async def reports_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "reports.html", headers=_PAGE_HEADERS)

    settings = context.settings
    api.install(
        app,
        api.ApiContext(
            settings=settings,
            engine=context.engine,
            classifier=context.classifier,
            chain=IntakeChain(settings.intake.chain_config()),
            store=LeadStore(settings.intake.dedup_window),
            work=settings.work_config(),
        ),
    )
    return app
