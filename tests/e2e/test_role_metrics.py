"""A role run alone (`leadflow run relay`) serves /metrics, /healthz and /readyz on
`web.metrics_port`, so every role can be scraped and probed."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.fault.roles import RoleProcess

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_lone_role_is_scraped_and_probed(
    tmp_path: Path, db_url: str, kafka_bootstrap: str
) -> None:
    port = free_port()
    suffix = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADFLOW_")}
    env.update(
        LEADFLOW_DATABASE_URL=db_url,
        LEADFLOW_KAFKA_BOOTSTRAP=kafka_bootstrap,
        LEADFLOW_TOPICS_RAW=f"m.raw.{suffix}",
        LEADFLOW_TOPICS_DLQ=f"m.dlq.{suffix}",
        LEADFLOW_TOPICS_ASSIGNED=f"m.asg.{suffix}",
        LEADFLOW_TOPICS_PARTITIONS="1",
        LEADFLOW_WEB_METRICS_PORT=str(port),
    )
    role = RoleProcess("relay", env, tmp_path / "relay.log")
    role.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            role.assert_alive()
            try:
                metrics = httpx.get(f"http://127.0.0.1:{port}/metrics/", timeout=5)
                if metrics.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "relay.log").read_text()
            time.sleep(0.3)
        assert "leadflow_relay" in metrics.text
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json() == {"status": "ok"}
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        # Only probes and metrics: the API belongs to the web role.
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/me", timeout=5).status_code == 404
    finally:
        assert role.stop() == 0
