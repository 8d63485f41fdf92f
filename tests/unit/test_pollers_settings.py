"""`sources:` and `scheduler:` in leadflow.yaml: every key checked at load, errors naming it,
credentials from the environment and never shown."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from leadflow.settings import ConfigError, env_names, load_settings

CONTRACT_EXAMPLE = """
sources:
  - name: silent_high_value
    url: ${DWH_URL}
    query: |
      SELECT user_id AS external_id, mobile AS phone, nick AS name, updated_at, ltv
      FROM user_profile WHERE silent = 1 AND updated_at > :watermark
      ORDER BY updated_at LIMIT :limit
    watermark: updated_at
    schedule: "*/10 * * * *"
    event_type: stock_profile
    batch_size: 5000
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "leadflow.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_contract_example_loads_with_the_url_from_the_environment(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, CONTRACT_EXAMPLE), environ={"DWH_URL": "mysql://reader:s3cret@dwh/dwh"}
    )
    (source,) = settings.sources
    assert source.masked_url == "mysql+pymysql://reader:***@dwh/dwh"
    assert "s3cret" not in repr(source)
    (spec,) = settings.source_specs()
    assert spec.url == "mysql+pymysql://reader:s3cret@dwh/dwh"  # PyMySQL: the `mysql` extra
    assert "s3cret" not in repr(spec)
    assert spec.masked_url == "mysql+pymysql://reader:***@dwh/dwh"
    assert spec.password == "s3cret"
    assert not spec.keyed
    assert spec.key is None
    assert spec.batch_size == 5000
    assert spec.schedule.crontab == "*/10 * * * *"
    assert spec.start == datetime(1970, 1, 1)  # noqa: DTZ001
    assert spec.timezone == ZoneInfo("Asia/Shanghai")  # allocation.default_timezone


def test_a_missing_variable_names_the_source_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sources\[0\]\.url: environment variable DWH_URL"):
        load_settings(write(tmp_path, CONTRACT_EXAMPLE), environ={})


def test_keyed_sources_and_every_optional_key(tmp_path: Path) -> None:
    text = """
scheduler:
  timezone: Europe/London
  misfire_grace_time: 10m
  retry_backoff_initial: 1s
  retry_backoff_max: 1m
sources:
  - name: partners
    url: postgresql://reader@pg:5432/dwh
    query: >-
      SELECT id, phone, updated_at FROM partner_leads
      WHERE (updated_at, id) > (:watermark, :watermark_key) ORDER BY updated_at, id LIMIT :limit
    watermark: updated_at
    key: id
    schedule: 90s
    event_type: partner_batch
    columns: {mobile: phone, internal: null, score: attributes.partner_score}
    start: 2026-01-01
    timezone: Asia/Shanghai
  - name: numbered
    url: mariadb://root@127.0.0.1/test
    query: SELECT * FROM t WHERE seq > :watermark ORDER BY seq LIMIT :limit
    watermark: seq
    schedule: 1h
    event_type: numbered
    start: 0
"""
    settings = load_settings(write(tmp_path, text), environ={})
    partners, numbered = settings.source_specs()
    assert partners.keyed
    assert partners.key == "id"
    assert partners.url == "postgresql+psycopg://reader@pg:5432/dwh"
    assert partners.columns == {
        "mobile": "phone",
        "internal": None,
        "score": "attributes.partner_score",
    }
    assert partners.start == date(2026, 1, 1)
    assert partners.timezone == ZoneInfo("Asia/Shanghai")
    assert partners.schedule.interval == timedelta(seconds=90)
    assert numbered.start == 0
    assert numbered.url == "mariadb+pymysql://root@127.0.0.1/test"
    assert numbered.timezone == ZoneInfo("Europe/London")  # scheduler.timezone
    assert settings.scheduler.misfire_grace_time == timedelta(minutes=10)


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ("schedule: every minute", "sources[0].schedule: 'every minute' is neither a crontab"),
        ("schedule: '0 0 * * 9'", "sources[0].schedule: day of week '9'"),
        ("query: SELECT 1 LIMIT :limit", "sources[0].query: must use :watermark"),
        ("url: not a url", "sources[0].url: is not a SQLAlchemy URL"),
        ("columns: {a: phones}", "sources[0].columns: a: 'phones' is not a LeadEvent field"),
        ("batch_size: 0", "sources[0].batch_size: Input should be greater than or equal to 1"),
        ("event_type: Stock Profile", "sources[0].event_type: String should match pattern"),
        ("timezone: Mars/Base", "sources[0].timezone: 'Mars/Base' is not an IANA timezone"),
        ("colums: {}", "sources[0].colums: unknown key"),
        (
            "query: SELECT * FROM t WHERE (w, id) > (:watermark, :watermark_key) LIMIT :limit",
            "sources[0]: the query uses :watermark_key, so `key` must name",
        ),
    ],
)
def test_bad_source_entries_name_the_key(tmp_path: Path, entry: str, error: str) -> None:
    base = {
        "name": "s",
        "url": "mysql://root@127.0.0.1/test",
        "query": "SELECT * FROM t WHERE w > :watermark ORDER BY w LIMIT :limit",
        "watermark": "w",
        "schedule": "1m",
        "event_type": "stock",
    }
    key = entry.split(":", 1)[0]
    lines = [f"    {k}: {v!r}" for k, v in base.items() if k != key]
    text = "sources:\n  - " + "\n".join(lines).lstrip() + f"\n    {entry}\n"
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text), environ={})
    assert error in str(raised.value)
    assert "leadflow.yaml" in str(raised.value)


def test_source_names_are_unique(tmp_path: Path) -> None:
    entry = """
  - name: twice
    url: mysql://root@127.0.0.1/test
    query: SELECT * FROM t WHERE w > :watermark ORDER BY w LIMIT :limit
    watermark: w
    schedule: 1m
    event_type: stock
"""
    with pytest.raises(ConfigError, match="source names must be unique; repeated: twice"):
        load_settings(write(tmp_path, "sources:" + entry + entry), environ={})


def test_sources_are_written_in_the_file_only_and_the_scheduler_also_by_environment() -> None:
    names = env_names()
    assert not any(key.startswith("sources") for key in names)
    assert names["scheduler.retry_backoff_max"] == "LEADFLOW_SCHEDULER_RETRY_BACKOFF_MAX"
    settings = load_settings(None, environ={"LEADFLOW_SCHEDULER_RETRY_BACKOFF_MAX": "30s"})
    assert settings.scheduler.retry_backoff_max == timedelta(seconds=30)
