"""Keeping child processes running: the roles of `leadflow up`, each in its own process.

A child that exits while leadflow is not stopping is logged and started again after a backoff
(doubling from `restart_initial` to `restart_max`, with jitter; a child that ran `stable_after`
starts afresh from `restart_initial`). Stopping sends SIGTERM to every child at once — each
role drains: it finishes or rolls back the batch in hand — and SIGKILLs the process group of
any child still running `stop_timeout` later. Children run in their own process groups, so a
terminal's Ctrl-C reaches only the supervisor, which stops them as above; and they get SIGKILL
as a parent-death signal, so a `kill -9` of the supervisor takes them with it (a role may not
be able to drain then — the embedded servers die with the supervisor too — and every role
writes in transactions, so a killed one leaves nothing half-written).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from leadflow.embedded import die_with_parent
from leadflow.logs import get_logger

log = get_logger("leadflow.supervise")


@dataclass(frozen=True)
class ChildSpec:
    """How to start one child: its name (the role), command line and environment."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    #: File descriptors the child inherits (the web role's listening socket).
    pass_fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class SupervisorConfig:
    restart_initial: float = 1.0
    restart_max: float = 30.0
    #: A child that ran at least this long before exiting is restarted after `restart_initial`.
    stable_after: float = 60.0
    #: How long stopping waits for the children to drain before killing them.
    stop_timeout: float = 30.0


@dataclass
class ChildState:
    """What the supervisor knows about one child, for the runtime file and `leadflow status`."""

    name: str
    pid: int | None = None
    started_at: datetime | None = None
    restarts: int = 0
    last_exit: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }


def describe_exit(code: int) -> str:
    """`exit 1`, or `killed by SIGKILL` for a negative return code."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit {code}"


@dataclass
class Supervisor:
    """Runs the children until `stop` is set, then stops them all within `stop_timeout`."""

    config: SupervisorConfig = field(default_factory=SupervisorConfig)
    #: Called with the pid of every child that ended (e.g. to clean its metrics files).
    on_exit: Callable[[int], None] | None = None
    #: Called whenever a child started or ended (e.g. to rewrite the runtime file).
    on_change: Callable[[], None] | None = None
    states: dict[str, ChildState] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _deadline: float | None = None

    def start(self, spec: ChildSpec) -> None:
        """Start keeping `spec` running (also while `run` is under way)."""
        if spec.name in self.states:
            raise ValueError(f"a child named {spec.name!r} is already supervised")
        self.states[spec.name] = ChildState(spec.name)
        self._tasks.append(asyncio.create_task(self._keep(spec), name=f"keep-{spec.name}"))

    async def run(self, stop: asyncio.Event) -> None:
        """Wait for `stop`, then for every child to have stopped."""
        await stop.wait()
        log.info(
            "stopping the roles",
            running=len(self.running()),
            stop_timeout=f"{self.config.stop_timeout:g}s",
        )
        self._deadline = time.monotonic() + self.config.stop_timeout
        self._stop.set()
        # Children started after this point see `_stop` set and never start.
        while self._tasks:
            tasks, self._tasks = self._tasks, []
            await asyncio.gather(*tasks)

    def running(self) -> dict[str, int]:
        """The pid of every child running now, by name."""
        return {name: s.pid for name, s in self.states.items() if s.pid is not None}

    async def _keep(self, spec: ChildSpec) -> None:
        state = self.states[spec.name]
        delay = self.config.restart_initial
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                process = await asyncio.create_subprocess_exec(
                    *spec.argv,
                    env=dict(spec.env),
                    stdin=subprocess.DEVNULL,
                    pass_fds=spec.pass_fds,
                    process_group=0,
                    preexec_fn=die_with_parent(signal.SIGKILL),
                )
            except OSError as exc:
                outcome = f"could not start: {exc.strerror or exc}"
            else:
                state.pid, state.started_at = process.pid, datetime.now(UTC)
                self._changed()
                log.info("role started", role=spec.name, pid=process.pid)
                code = await self._wait(spec.name, process)
                state.pid = None
                if self.on_exit is not None:
                    self.on_exit(process.pid)
                self._changed()
                outcome = describe_exit(code)
                if self._stop.is_set():
                    state.last_exit = outcome
                    log.info("role stopped", role=spec.name, pid=process.pid, outcome=outcome)
                    return
            state.restarts += 1
            state.last_exit = outcome
            if time.monotonic() - started >= self.config.stable_after:
                delay = self.config.restart_initial
            pause = delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not secrecy
            log.error(
                "role exited; restarting",
                role=spec.name,
                outcome=outcome,
                restarts=state.restarts,
                restart_in=f"{pause:.1f}s",
            )
            self._changed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), pause)
            delay = min(delay * 2, self.config.restart_max)

    async def _wait(self, name: str, process: asyncio.subprocess.Process) -> int:
        """The child's return code: when it exits by itself, or once stopping has stopped it."""
        exited = asyncio.create_task(process.wait())
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if exited.done():
            return exited.result()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        assert self._deadline is not None
        remaining = max(0.0, self._deadline - time.monotonic())
        try:
            return await asyncio.wait_for(asyncio.shield(exited), remaining)
        except TimeoutError:
            log.warning(
                "role did not stop in time; killing it",
                role=name,
                pid=process.pid,
                stop_timeout=f"{self.config.stop_timeout:g}s",
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            return await exited

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception as exc:  # a callback's failure must not stop supervision
                log.warning("supervisor callback failed", error=repr(exc))
