"""Settings: one pydantic-settings model built from `leadflow.yaml` and `LEADFLOW_*` variables.

Precedence, highest first: keyword arguments, the environment, the YAML file, the defaults.
Every scalar has one environment name derived from its key path — `database.url` is
`LEADFLOW_DATABASE_URL`, `intake.default_region` is `LEADFLOW_INTAKE_DEFAULT_REGION` — so the
names are listed by `env_names()` rather than guessed. String values in the YAML may use
`${VAR}` or `${VAR:-default}` (`$$` is a literal `$`).

Anything wrong raises `ConfigError` whose message names the file (or variable), the key path and
the reason in one paragraph; the CLI prints it instead of a traceback.
"""

from __future__ import annotations

import os
import re
import zoneinfo
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import phonenumbers
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from allocate.model import QueueSpec, Window
from allocate.work import WorkConfig
from ingest.chain import ChainConfig
from leadflow.errors import LeadflowError
from schemas.vocab import Strategy
from sync.pollers import SourceSpec, parse_schedule
from sync.pollers.poller import query_parameters, source_url
from sync.pollers.rows import check_target

ENV_PREFIX = "LEADFLOW_"
DEFAULT_CONFIG_FILE = "leadflow.yaml"


class ConfigError(LeadflowError):
    """The configuration cannot be used; the message is meant for a person, as it is."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _parse_duration(value: Any) -> Any:
    """Accept '90s', '5m', '2h', '30d' and a bare number of seconds (also as text, as the
    environment gives it) besides what pydantic takes (ISO 8601)."""
    if isinstance(value, str):
        if match := _DURATION.match(value):
            return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
        try:
            return timedelta(seconds=float(value))
        except ValueError:
            return value
    return value


Duration = Annotated[timedelta, BeforeValidator(_parse_duration)]


class _Section(BaseModel):
    # A typo in a key must fail loudly, not be ignored and leave the default in force.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DatabaseSettings(_Section):
    url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy/libpq URL of PostgreSQL; unset means the embedded server.",
    )
    pool_size: int = Field(
        default=10,
        ge=1,
        le=200,
        description="The web role's SQLAlchemy pool; the other roles hold a few connections each.",
    )
    connect_timeout: Duration = Field(default=timedelta(seconds=5), gt=timedelta(0))

    @field_validator("url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("url")
    @classmethod
    def _postgres_only(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("postgresql", "postgres:")
        ):
            raise ValueError(
                "must be a PostgreSQL URL such as postgresql://user@host:5432/leadflow"
            )
        return value


class KafkaSettings(_Section):
    bootstrap: str | None = Field(
        default=None,
        description="Comma-separated host:port list; unset means the embedded broker.",
    )
    client_id: str = "leadflow"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    request_timeout: Duration = Field(default=timedelta(seconds=10), gt=timedelta(0))

    @field_validator("bootstrap")
    @classmethod
    def _host_ports(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{server.strip()!r} is not host:port")
        return value

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka clients (security settings pass straight through)."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": int(self.request_timeout.total_seconds() * 1000),
        }
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            if self.sasl_password is not None:
                options["sasl_plain_password"] = self.sasl_password.get_secret_value()
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        return options


class TopicSettings(_Section):
    raw: str = Field(default="leads.raw", min_length=1, max_length=249)
    dlq: str = Field(default="leads.dlq", min_length=1, max_length=249)
    assigned: str = Field(default="leads.assigned", min_length=1, max_length=249)
    partitions: int = Field(default=6, ge=1, le=1024)
    replication_factor: int = Field(default=1, ge=1, le=16)


class _GroupMember(_Section):
    """A role that reads Kafka in a consumer group: how it stays a member."""

    session_timeout: Duration = Field(
        default=timedelta(seconds=10),
        ge=timedelta(seconds=1),
        description="A worker silent this long leaves the group and its partitions move on; "
        "also how long a rebalance waits for the group's members to rejoin.",
    )
    heartbeat_interval: Duration = Field(
        default=timedelta(seconds=3), ge=timedelta(milliseconds=100)
    )

    @model_validator(mode="after")
    def _heartbeat_below_session(self) -> Self:
        # Kafka drops a member that heartbeats less often than its session timeout.
        if self.heartbeat_interval >= self.session_timeout:
            raise ValueError(
                "heartbeat_interval must be shorter than session_timeout (about a third of it)"
            )
        return self


class IntakeSettings(_GroupMember):
    default_region: str = Field(
        default="CN",
        description="ISO 3166-1 region used to read phone numbers written without a country code.",
    )
    max_event_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    require_consent: bool = Field(
        default=False, description="Reject events without consent.telemarketing (consent_missing)."
    )
    dedup_window: Duration = Field(default=timedelta(days=30), gt=timedelta(0))
    consumer_group: str = Field(default="leadflow-intake", min_length=1)
    batch_size: int = Field(
        default=2000, ge=1, le=50_000, description="Most records one intake transaction takes."
    )
    batch_wait: Duration = Field(
        default=timedelta(milliseconds=50),
        ge=timedelta(0),
        description="How long a poll waits for records before handling what it has.",
    )
    retry_backoff_max: Duration = Field(default=timedelta(seconds=30), gt=timedelta(0))

    @field_validator("default_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        region = value.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not a region phonenumbers knows (e.g. CN, US, GB)")
        return region

    def chain_config(self) -> ChainConfig:
        """The intake chain's configuration, the same for every channel."""
        return ChainConfig(
            default_region=self.default_region,
            max_event_bytes=self.max_event_bytes,
            require_consent=self.require_consent,
        )


class WebSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port.")
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Where a process without the web role (`leadflow run intake`, ...) serves "
        "/metrics, /healthz and /readyz; unset serves none, 0 picks a free port.",
    )


class EmbeddedSettings(_Section):
    data_dir: Path = Field(
        default=Path(".leadflow"),
        description="Where `leadflow up` keeps the embedded PostgreSQL data and its runtime file.",
    )
    postgres_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port.")
    kafka_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port.")


class SupervisorSettings(_Section):
    """How `leadflow up` keeps its roles (child processes) running and stops them."""

    stop_timeout: Duration = Field(
        default=timedelta(seconds=45),
        gt=timedelta(0),
        description="How long stopping waits for the roles to drain before killing them; "
        "longer than scheduler.stop_timeout, so a poller finishes its page.",
    )
    restart_backoff_initial: Duration = Field(
        default=timedelta(seconds=1),
        gt=timedelta(0),
        description="Pause before restarting a role that exited; it doubles on every exit.",
    )
    restart_backoff_max: Duration = Field(
        default=timedelta(seconds=30),
        gt=timedelta(0),
        description="Longest pause between restarts of a role that keeps failing.",
    )


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["console", "json"] = "console"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.\-]{0,63}$"


class ClassificationSettings(_Section):
    rules_file: Path | None = Field(
        default=None,
        description="The rules file; relative paths are read from the configuration file's "
        "directory. Unset: the demo rules shipped with leadflow (deploy/rules.example.yaml).",
    )
    default_business_line: str = Field(default="general", pattern=_NAME_PATTERN)
    default_segment: str = Field(default="general", pattern=_NAME_PATTERN)
    default_priority: int = Field(default=50, ge=0, le=100)
    realtime_boost: int = Field(
        default=10, ge=0, le=100, description="Added to real-time leads' priority, capped at 100."
    )
    reload_interval: Duration = Field(
        default=timedelta(seconds=2),
        ge=timedelta(0),
        description="How often workers look for a changed rules file; 0s stops looking.",
    )

    @field_validator("rules_file")
    @classmethod
    def _beside_the_config(cls, value: Path | None) -> Path | None:
        # A rules file named in leadflow.yaml sits next to it, wherever leadflow is started.
        context = _CONTEXT.get()
        if value is None or value.is_absolute() or context is None or context.path is None:
            return value
        return context.path.parent / value


def _comma_list(value: Any) -> Any:
    """A list given as one string ("30m,2h,1d"), as the environment can only give it."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _known_timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA timezone (e.g. Asia/Shanghai)") from None
    return value


class QueueSettings(_Section):
    """One allocation queue; leads go to the first queue in the list that serves them."""

    name: str = Field(pattern=_NAME_PATTERN)
    business_line: str = Field(pattern=_NAME_PATTERN)
    segments: list[str] = Field(
        default_factory=list, description="Segments served; empty means every segment."
    )
    strategy: Strategy = "round_robin"
    fallback_strategy: Strategy = Field(
        default="least_loaded", description="What `sticky` does when the last agent cannot."
    )
    sla: Duration = Field(
        default=timedelta(minutes=5),
        gt=timedelta(0),
        description="First-contact SLA: an assignment not contacted in time is reassigned.",
    )
    max_attempts: int = Field(default=3, ge=1, le=50)
    call_window: str | None = Field(
        default="09:00-21:00",
        description="When leads may be called, in the lead's local time; null: any time.",
    )
    timezone: str | None = Field(
        default=None,
        description="Timezone of leads whose own is unknown; unset: allocation.default_timezone.",
    )

    @field_validator("fallback_strategy")
    @classmethod
    def _not_sticky(cls, value: Strategy) -> Strategy:
        if value == "sticky":
            raise ValueError("the fallback of sticky cannot be sticky itself")
        return value

    @field_validator("call_window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None:
            Window.parse(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        return None if value is None else _known_timezone(value)

    def spec(self, default_timezone: str) -> QueueSpec:
        return QueueSpec(
            name=self.name,
            business_line=self.business_line,
            segments=frozenset(self.segments),
            strategy=self.strategy,
            fallback_strategy=self.fallback_strategy,
            sla=self.sla,
            max_attempts=self.max_attempts,
            call_window=Window.parse(self.call_window) if self.call_window else None,
            default_timezone=self.timezone or default_timezone,
        )


class AllocationSettings(_Section):
    batch_size: int = Field(
        default=1000, ge=1, le=50_000, description="Most leads of one queue one decision takes."
    )
    sweep_interval: Duration = Field(
        default=timedelta(seconds=1),
        gt=timedelta(0),
        description="How often the allocator looks for expired SLAs, due callbacks and retries "
        "and opened call windows (new leads wake it at once).",
    )
    default_timezone: str = Field(
        default="Asia/Shanghai", description="Timezone of leads whose own is unknown."
    )
    implicit_queues: bool = Field(
        default=True,
        description="A lead no configured queue serves waits in a queue named after its "
        "business line, with the defaults of a queue entry; false leaves it unrouted.",
    )
    no_answer_delays: Annotated[list[Duration], BeforeValidator(_comma_list)] = Field(
        default_factory=lambda: [
            timedelta(minutes=30),
            timedelta(hours=2),
            timedelta(days=1),
        ],
        min_length=1,
        description="Wait before the n-th retry after no answer; the last one repeats.",
    )
    reject_delay: Duration = Field(
        default=timedelta(0),
        ge=timedelta(0),
        description="Wait before a lead an agent rejected is offered to another agent.",
    )

    @field_validator("default_timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        return _known_timezone(value)


class AnalyticsSettings(_GroupMember):
    app_id: str = Field(
        default="leadflow-analytics",
        min_length=1,
        description="The faust app id: its consumer group and the prefix of its changelog topics.",
    )
    flush_interval: Duration = Field(
        default=timedelta(seconds=5),
        gt=timedelta(0),
        description="How often the windows are written to PostgreSQL for the ops views.",
    )
    retention: Duration = Field(
        default=timedelta(hours=2),
        ge=timedelta(minutes=5),
        description="How long per-minute figures are kept (faust windows and stream_minutes).",
    )


class RelaySettings(_Section):
    batch_size: int = Field(default=500, ge=1, le=50_000)
    poll_interval: Duration = Field(
        default=timedelta(seconds=1),
        gt=timedelta(0),
        description="Fallback look for unpublished rows; new ones wake the relay at once.",
    )
    retention: Duration = Field(
        default=timedelta(days=7),
        gt=timedelta(0),
        description="Published outbox rows older than this are deleted.",
    )


_SLUG_PATTERN = r"^[a-z0-9][a-z0-9_.\-]{0,63}$"


class StagingSettings(_Section):
    """The staging loaders (`leadflow run staging`): the data team's extracts."""

    schema_name: str = Field(
        default="staging",
        min_length=1,
        description="Schema of the data team's staging tables; the loader reads no other. The "
        "manifest stays in staging.extracts.",
    )
    chunk_rows: int = Field(
        default=20_000,
        ge=100,
        le=1_000_000,
        description="About how many rows one chunk (one transaction, one checkpoint) takes.",
    )
    lanes: int = Field(
        default=1,
        ge=1,
        le=8,
        description="Lanes of a new extract: loaders (`leadflow run staging` processes) that can "
        "load it at once, each its own share of the customers; one loader loads them in turn.",
    )
    poll_interval: Duration = Field(
        default=timedelta(seconds=5),
        gt=timedelta(0),
        description="Fallback look for submitted extracts; a submission wakes loaders at once.",
    )
    retry_backoff_max: Duration = Field(default=timedelta(seconds=30), gt=timedelta(0))
    default_source: str = Field(
        default="staging",
        pattern=_SLUG_PATTERN,
        description="Source of rows whose extract names none.",
    )
    default_event_type: str = Field(
        default="staging_extract",
        pattern=_SLUG_PATTERN,
        description="Event type of rows with no event_type column value and no extract default.",
    )

    @field_validator("schema_name")
    @classmethod
    def _identifier_length(cls, value: str) -> str:
        if len(value.encode()) > 63 or "\x00" in value:
            raise ValueError("must be a PostgreSQL schema name: at most 63 bytes, no NUL")
        return value


class SchedulerSettings(_Section):
    """The scheduler role (`leadflow run scheduler`) that runs the stock-data pollers."""

    timezone: str | None = Field(
        default=None,
        description="Timezone of crontab schedules and of naive timestamps in sources; unset: "
        "allocation.default_timezone.",
    )
    misfire_grace_time: Duration | None = Field(
        default=None,
        description="A tick that comes later than this (the process was busy or paused) is "
        "skipped; null: it runs however late (missed ticks are coalesced into one run).",
    )
    retry_backoff_initial: Duration = Field(
        default=timedelta(seconds=5),
        gt=timedelta(0),
        description="Wait after a source's first failed run; it doubles with every failure.",
    )
    retry_backoff_max: Duration = Field(
        default=timedelta(minutes=5),
        gt=timedelta(0),
        description="The longest wait between retries of a failing source.",
    )
    lock_interval: Duration = Field(
        default=timedelta(seconds=1),
        gt=timedelta(0),
        description="How often a standby scheduler tries the lock and the leader checks it.",
    )
    stop_timeout: Duration = Field(
        default=timedelta(seconds=30),
        gt=timedelta(0),
        description="How long stopping waits for runs to finish the page in hand.",
    )
    max_page_rows: int = Field(
        default=100_000,
        ge=1,
        le=10_000_000,
        description="The most rows a page of a plain `> :watermark` query may grow to when all "
        "its rows share one watermark value.",
    )
    history_retention: Duration = Field(
        default=timedelta(days=30),
        gt=timedelta(0),
        description="How long poller_runs (and their rejected rows) are kept.",
    )

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        return None if value is None else _known_timezone(value)


def _start_value(value: Any) -> Any:
    """A watermark to start from as YAML gives it: numbers and dates as they are, text that is
    an ISO 8601 date-time as a datetime, other text as text."""
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.strip())
        except ValueError:
            return value
    return value


class SourceSettings(_Section):
    """One stock-data source the scheduler polls (CONTRACT.md §6)."""

    name: str = Field(pattern=_SLUG_PATTERN, description="Also the `source` of its events.")
    url: SecretStr = Field(
        description="SQLAlchemy URL of the source database; credentials via ${VAR}."
    )
    query: str = Field(
        min_length=1,
        description="Reads the rows after :watermark in watermark order, LIMIT :limit.",
    )
    watermark: str = Field(min_length=1, description="The result column compared with :watermark.")
    key: str | None = Field(
        default=None,
        min_length=1,
        description="A result column unique per row: the tiebreak of :watermark_key queries and "
        "the row's identity in its event id.",
    )
    schedule: str = Field(description='Crontab ("*/10 * * * *") or an interval ("5m").')
    event_type: str = Field(pattern=_SLUG_PATTERN)
    batch_size: int = Field(default=5000, ge=1, le=100_000)
    columns: dict[str, str | None] = Field(
        default_factory=dict,
        description="Source column -> LeadEvent field, attributes.NAME, or null (dropped).",
    )
    start: Annotated[datetime | date | int | Decimal | str, BeforeValidator(_start_value)] = Field(
        default=datetime(1970, 1, 1),  # noqa: DTZ001 - compared with naive and aware columns
        description="The watermark of the first run.",
    )
    timezone: str | None = Field(
        default=None, description="Of naive timestamps in this source; unset: scheduler.timezone."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        return SecretStr(source_url(value.get_secret_value()))

    @field_validator("query")
    @classmethod
    def _parameters(cls, value: str) -> str:
        missing = {"watermark", "limit"} - query_parameters(value)
        if missing:
            raise ValueError(
                f"must use {' and '.join(f':{name}' for name in sorted(missing, reverse=True))}"
                " (the rows after :watermark in watermark order, LIMIT :limit)"
            )
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        parse_schedule(value)
        return value

    @field_validator("columns")
    @classmethod
    def _targets(cls, value: dict[str, str | None]) -> dict[str, str | None]:
        for column, target in value.items():
            try:
                check_target(target)
            except ValueError as exc:
                raise ValueError(f"{column}: {exc}") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        return None if value is None else _known_timezone(value)

    @model_validator(mode="after")
    def _key_for_keyed_queries(self) -> SourceSettings:
        if "watermark_key" in query_parameters(self.query) and self.key is None:
            raise ValueError(
                "the query uses :watermark_key, so `key` must name the result column it is "
                "compared with"
            )
        return self

    def spec(self, default_timezone: str) -> SourceSpec:
        return SourceSpec(
            name=self.name,
            url=self.url.get_secret_value(),
            query=self.query,
            watermark=self.watermark,
            schedule=parse_schedule(self.schedule),
            event_type=self.event_type,
            batch_size=self.batch_size,
            key=self.key,
            keyed="watermark_key" in query_parameters(self.query),
            columns=dict(self.columns),
            start=self.start,
            timezone=zoneinfo.ZoneInfo(self.timezone or default_timezone),
        )

    @property
    def masked_url(self) -> str:
        return masked_url(self.url.get_secret_value())


@dataclass(frozen=True)
class _LoadContext:
    path: Path | None
    data: Mapping[str, Any]
    environ: Mapping[str, str] = field(default_factory=dict)


_CONTEXT: ContextVar[_LoadContext | None] = ContextVar("leadflow_settings_context", default=None)


class Settings(BaseSettings):
    """Everything leadflow reads at start-up. Build it with `load_settings()`."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    embedded: EmbeddedSettings = Field(default_factory=EmbeddedSettings)
    supervisor: SupervisorSettings = Field(default_factory=SupervisorSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    classification: ClassificationSettings = Field(default_factory=ClassificationSettings)
    allocation: AllocationSettings = Field(default_factory=AllocationSettings)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    analytics: AnalyticsSettings = Field(default_factory=AnalyticsSettings)
    staging: StagingSettings = Field(default_factory=StagingSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    queues: list[QueueSettings] = Field(default_factory=list)
    sources: list[SourceSettings] = Field(default_factory=list)

    @field_validator("queues")
    @classmethod
    def _unique_queue_names(cls, value: list[QueueSettings]) -> list[QueueSettings]:
        names = [queue.name for queue in value]
        if duplicates := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"queue names must be unique; repeated: {', '.join(duplicates)}")
        return value

    def queue_specs(self) -> list[QueueSpec]:
        """The configured queues, in routing order."""
        return [queue.spec(self.allocation.default_timezone) for queue in self.queues]

    @field_validator("sources")
    @classmethod
    def _unique_source_names(cls, value: list[SourceSettings]) -> list[SourceSettings]:
        names = [source.name for source in value]
        if duplicates := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"source names must be unique; repeated: {', '.join(duplicates)}")
        return value

    @property
    def scheduler_timezone(self) -> str:
        return self.scheduler.timezone or self.allocation.default_timezone

    def source_specs(self) -> list[SourceSpec]:
        """The configured stock-data sources."""
        return [source.spec(self.scheduler_timezone) for source in self.sources]

    def work_config(self) -> WorkConfig:
        """How agents' dispositions and rejects recycle leads (allocate.work)."""
        allocation = self.allocation
        return WorkConfig(
            max_attempts={queue.name: queue.max_attempts for queue in self.queues},
            default_max_attempts=QueueSettings.model_fields["max_attempts"].default,
            no_answer_delays=tuple(allocation.no_answer_delays),
            reject_delay=allocation.reject_delay,
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _FlatEnvSource(settings_cls), _YamlSource(settings_cls))


def _scalar_paths(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if name in _FILE_ONLY:
            continue  # lists of entries (queues) are written in the file, not the environment
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _scalar_paths(annotation, (*prefix, name))
        else:
            yield (*prefix, name), info


#: Top-level keys only the YAML file can set.
_FILE_ONLY = frozenset({"queues", "sources"})


def env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(path).upper()


def env_names() -> dict[str, str]:
    """Every overridable key path and its environment variable, e.g. {'database.url': ...}."""
    return {".".join(path): env_name(path) for path, _ in _scalar_paths(Settings)}


class _FlatEnvSource(PydanticBaseSettingsSource):
    """LEADFLOW_<SECTION>_<KEY> for every scalar; names come from the model, never parsed."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole tree at once

    def __call__(self) -> dict[str, Any]:
        context = _CONTEXT.get()
        environ = context.environ if context else os.environ
        tree: dict[str, Any] = {}
        for path, _ in _scalar_paths(Settings):
            value = environ.get(env_name(path))
            if value is None or value == "":
                continue
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
        return tree


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        context = _CONTEXT.get()
        return dict(context.data) if context else {}


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, path: tuple[str | int, ...], environ: Mapping[str, str], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, (*path, k), environ, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*path, i), environ, where) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, default = match[1], match[2]
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(
            f"{where}: {_dotted(path)}: environment variable {name} is not set "
            f"(referenced as ${{{name}}}; set it, or write ${{{name}:-default}})."
        )

    return _VAR.sub(substitute, value)


def _dotted(path: tuple[str | int, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _read_yaml(path: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: the configuration file does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (database, kafka, ...), "
            f"not a {type(data).__name__}."
        )
    expanded: dict[str, Any] = _expand(data, (), environ, str(path))
    return expanded


def resolve_config_path(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """--config wins, then LEADFLOW_CONFIG, then ./leadflow.yaml if present, else none."""
    if explicit is not None:
        return explicit
    if environ.get(ENV_PREFIX + "CONFIG"):
        return Path(environ[ENV_PREFIX + "CONFIG"])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def load_settings(
    config: Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings or raise `ConfigError` with the file, key path and reason."""
    environ = os.environ if environ is None else environ
    path = resolve_config_path(config, environ)
    data = _read_yaml(path, environ) if path is not None else {}
    token = _CONTEXT.set(_LoadContext(path=path, data=data, environ=environ))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, path, environ)) from None
    finally:
        _CONTEXT.reset(token)


def _explain(exc: ValidationError, path: Path | None, environ: Mapping[str, str]) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = tuple(error["loc"])
        key = _dotted(loc)
        variable = env_name(tuple(str(p) for p in loc))
        if variable in environ:
            origin = f"environment variable {variable}"
        else:
            origin = str(path) if path is not None else "built-in default"
        reason = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            reason = (
                "unknown key (check the spelling; deploy/leadflow.example.yaml lists every key)"
            )
        problems.append(f"{origin}: {key}: {reason}")
    count = len(problems)
    head = "invalid configuration" if count == 1 else f"invalid configuration ({count} problems)"
    return f"{head}: " + "; ".join(problems) + "."


def masked_url(url: str) -> str:
    """A URL safe to print or log: the password, if any, replaced by ***."""
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)
