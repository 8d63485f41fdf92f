"""Settings: YAML + LEADFLOW_* environment, ${VAR} expansion, and errors a person can act on."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from leadflow.settings import ConfigError, env_names, load_settings, masked_url

EXAMPLE = Path(__file__).parents[2] / "deploy" / "leadflow.example.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "leadflow.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_any_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings.database.url is None
    assert settings.kafka.bootstrap is None
    assert settings.topics.raw == "leads.raw"
    assert settings.topics.dlq == "leads.dlq"
    assert settings.topics.assigned == "leads.assigned"
    assert settings.intake.dedup_window == timedelta(days=30)
    assert settings.intake.max_event_bytes == 64 * 1024


def test_the_shipped_example_is_valid_and_documents_every_key() -> None:
    assert load_settings(EXAMPLE, environ={}).database.url is None  # unset: embedded server
    settings = load_settings(
        EXAMPLE, environ={"DATABASE_URL": "postgresql://u:pw@db:5432/leadflow"}
    )
    assert settings.database.url is not None
    assert settings.database.url.get_secret_value() == "postgresql://u:pw@db:5432/leadflow"
    text = EXAMPLE.read_text(encoding="utf-8")
    for key, variable in env_names().items():
        assert f"{key.rsplit('.', 1)[-1]}:" in text, f"{key} is not documented in the example"
        assert variable in text, f"{variable} is not mentioned in the example"


def test_yaml_values_and_environment_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "kafka:\n  bootstrap: broker-1:9092,broker-2:9092\nweb:\n  port: 9000\n"
        "intake:\n  dedup_window: 7d\n  default_region: us\n",
    )
    settings = load_settings(
        path, environ={"LEADFLOW_WEB_PORT": "9100", "LEADFLOW_TOPICS_RAW": "x.raw"}
    )
    assert settings.kafka.bootstrap == "broker-1:9092,broker-2:9092"
    assert settings.web.port == 9100  # the environment wins over the file
    assert settings.topics.raw == "x.raw"
    assert settings.intake.dedup_window == timedelta(days=7)
    assert settings.intake.default_region == "US"


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "web:\n  port: 9555\n")
    assert load_settings(environ={"LEADFLOW_CONFIG": str(path)}).web.port == 9555


def test_variable_expansion_with_defaults_and_escapes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "database:\n  url: postgresql://app:${DB_PASSWORD}@${DB_HOST:-localhost}/leadflow\n"
        "kafka:\n  client_id: cost$$center\n",
    )
    settings = load_settings(path, environ={"DB_PASSWORD": "s3cret"})
    assert settings.database.url is not None
    assert settings.database.url.get_secret_value() == "postgresql://app:s3cret@localhost/leadflow"
    assert "s3cret" not in repr(settings)  # secrets stay secret in logs and reprs
    assert settings.kafka.client_id == "cost$center"


def test_secrets_are_secret_str(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, "kafka:\n  sasl_mechanism: PLAIN\n  sasl_username: u\n"),
        environ={"LEADFLOW_KAFKA_SASL_PASSWORD": "pw"},
    )
    assert settings.kafka.sasl_password is not None
    assert str(settings.kafka.sasl_password) == "**********"
    assert settings.kafka.client_options()["sasl_plain_password"] == "pw"


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("database: [\n", {}, ["not valid YAML at line 2", "leadflow.yaml"]),
        ("- just\n- a list\n", {}, ["top level must be a mapping"]),
        ("kafka:\n  bootsrap: x:1\n", {}, ["kafka.bootsrap", "unknown key"]),
        ("web:\n  port: eighty\n", {}, ["web.port", "valid integer"]),
        ("web:\n  port: 70000\n", {}, ["web.port", "less than or equal to 65535"]),
        ("intake:\n  default_region: ZZ\n", {}, ["intake.default_region", "'ZZ'"]),
        ("intake:\n  dedup_window: soon\n", {}, ["intake.dedup_window"]),
        ("database:\n  url: mysql://x@y/z\n", {}, ["database.url", "PostgreSQL URL"]),
        ("kafka:\n  bootstrap: no-port\n", {}, ["kafka.bootstrap", "not host:port"]),
        ("database:\n  url: ${DB_URL}\n", {}, ["database.url", "DB_URL is not set"]),
        ("topics:\n  partitions: 0\n", {}, ["topics.partitions", "greater than or equal to 1"]),
        ("log:\n  level: LOUD\n", {}, ["log.level"]),
        (
            "analytics:\n  session_timeout: 5s\n  heartbeat_interval: 5s\n",
            {},
            ["analytics", "heartbeat_interval must be shorter than session_timeout"],
        ),
        (
            "intake:\n  heartbeat_interval: 30s\n",
            {},
            ["intake", "heartbeat_interval must be shorter than session_timeout"],
        ),
    ],
)
def test_a_broken_file_names_file_key_and_reason(
    tmp_path: Path, text: str, environ: dict[str, str], expected: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ=environ)
    message = str(raised.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message
    assert "\n" not in message.strip()  # one paragraph
    assert "Traceback" not in message


def test_a_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"environment variable LEADFLOW_WEB_PORT: web\.port"):
        load_settings(write(tmp_path, ""), environ={"LEADFLOW_WEB_PORT": "x"})


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, "web:\n  port: x\nkafka:\n  bootsrap: y\n")
    with pytest.raises(ConfigError, match=r"2 problems") as raised:
        load_settings(path, environ={})
    assert "web.port" in str(raised.value)
    assert "kafka.bootsrap" in str(raised.value)


def test_a_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_environment_names_follow_key_paths() -> None:
    names = env_names()
    assert names["database.url"] == "LEADFLOW_DATABASE_URL"
    assert names["kafka.bootstrap"] == "LEADFLOW_KAFKA_BOOTSTRAP"
    assert names["intake.default_region"] == "LEADFLOW_INTAKE_DEFAULT_REGION"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:s3cret@db:5432/x", "postgresql://app:***@db:5432/x"),
        ("postgresql://app@db/x", "postgresql://app@db/x"),
    ],
)
def test_masked_url(url: str, shown: str) -> None:
    assert masked_url(url) == shown


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5", 5), ("2.5", 2.5), ("90s", 90), ("5m", 300), ("250ms", 0.25), ("PT1M", 60)],
)
def test_durations_from_the_environment(text: str, seconds: float) -> None:
    settings = load_settings(environ={"LEADFLOW_DATABASE_CONNECT_TIMEOUT": text})
    assert settings.database.connect_timeout == timedelta(seconds=seconds)
