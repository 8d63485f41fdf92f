"""The supervisor of `leadflow up` with real child processes: restarts with backoff, a bounded
stop that kills what does not drain, no child left behind."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
from pathlib import Path

import psutil

from leadflow.supervise import ChildSpec, Supervisor, SupervisorConfig, describe_exit

FAST = SupervisorConfig(restart_initial=0.05, restart_max=0.4, stable_after=60, stop_timeout=5)


def python(code: str, name: str = "child") -> ChildSpec:
    return ChildSpec(name, [sys.executable, "-c", code], dict(os.environ))


async def until(predicate: object, limit: float = 20) -> None:
    deadline = time.monotonic() + limit
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_child_that_exits_is_restarted_with_growing_pauses(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    code = f"import time; open({str(starts)!r}, 'a').write(repr(time.monotonic()) + '\\n'); raise SystemExit(3)"
    exits: list[int] = []
    supervisor = Supervisor(FAST, on_exit=exits.append)
    stop = asyncio.Event()
    supervisor.start(python(code, "failing"))
    running = asyncio.create_task(supervisor.run(stop))
    # Stop in a pause between runs: stopping a running child would end it by SIGTERM instead.
    await until(
        lambda: (
            starts.exists() and len(starts.read_text().split()) >= 6 and not supervisor.running()
        )
    )
    stop.set()
    await running

    state = supervisor.states["failing"]
    assert state.restarts >= 5
    assert state.last_exit == "exit 3"
    assert state.pid is None
    assert len(exits) >= 6
    times = [float(t) for t in starts.read_text().split()]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.05 s doubling to 0.4 s, ±20 %: by the fifth restart the pause has reached the cap.
    assert min(gaps[4:]) >= 0.4 * 0.8


async def test_stopping_terminates_children_that_drain_and_kills_those_that_do_not(
    tmp_path: Path,
) -> None:
    drained = tmp_path / "drained"
    polite = (
        "import signal, sys, time\n"
        f"def bye(*_):\n    open({str(drained)!r}, 'w').write('ok'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "while True: time.sleep(0.05)\n"
    )
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(0.05)\n"
    supervisor = Supervisor(SupervisorConfig(stop_timeout=1.5))
    stop = asyncio.Event()
    supervisor.start(python(polite, "polite"))
    supervisor.start(python(stubborn, "stubborn"))
    running = asyncio.create_task(supervisor.run(stop))
    await until(lambda: len(supervisor.running()) == 2)
    pids = list(supervisor.running().values())
    await asyncio.sleep(0.5)  # both have installed their handlers
    stop.set()
    await running

    assert drained.read_text() == "ok"
    assert supervisor.states["polite"].last_exit == "exit 0"
    assert supervisor.states["stubborn"].last_exit == "killed by SIGKILL"
    assert supervisor.states["polite"].restarts == supervisor.states["stubborn"].restarts == 0
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids
    )


async def test_a_child_started_after_run_began_is_supervised_and_stopped(tmp_path: Path) -> None:
    supervisor = Supervisor(FAST)
    stop = asyncio.Event()
    supervisor.start(python("import time; time.sleep(60)", "first"))
    running = asyncio.create_task(supervisor.run(stop))
    await until(lambda: "first" in supervisor.running())
    supervisor.start(python("import time; time.sleep(60)", "later"))
    await until(lambda: "later" in supervisor.running())
    stop.set()
    await running
    assert supervisor.running() == {}
    assert supervisor.states["later"].last_exit == "killed by SIGTERM"  # stopped, not crashed
    assert supervisor.states["later"].restarts == 0


def test_exits_are_described_for_people() -> None:
    assert describe_exit(0) == "exit 0"
    assert describe_exit(2) == "exit 2"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-250) == "killed by signal 250"
