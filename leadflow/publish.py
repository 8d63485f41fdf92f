"""`leadflow publish FILE.jsonl`: validate each line as a LeadEvent and send the valid ones."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ingest.chain import describe
from ingest.publisher import LeadPublisher
from leadflow.errors import LeadflowError
from leadflow.settings import Settings

MAX_REPORTED = 20


@dataclass
class PublishSummary:
    sent: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)


def _lines(path: Path) -> list[str]:
    if str(path) == "-":
        return sys.stdin.read().splitlines()
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LeadflowError(f"{path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LeadflowError(f"{path}: cannot read it: {exc}.") from None


async def publish_file(
    settings: Settings, path: Path, topic: str, console: Console
) -> PublishSummary:
    lines = _lines(path)
    summary = PublishSummary()
    progress = Progress(
        TextColumn("publishing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    async with LeadPublisher(
        topic, default_region=settings.intake.default_region, **settings.kafka.client_options()
    ) as publisher:
        with progress:
            task = progress.add_task("publish", total=len(lines))
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    try:
                        await publisher.publish(line)
                    except ValidationError as exc:
                        summary.rejected += 1
                        reason = describe(exc.errors(include_url=False))
                        summary.reasons[reason.split(":")[0]] += 1
                        if len(summary.examples) < MAX_REPORTED:
                            summary.examples.append(f"line {number}: {reason}")
                progress.advance(task)
            await publisher.flush()
        summary.sent = publisher.sent
    table = Table(title=f"published to {topic}", title_justify="left")
    table.add_column("")
    table.add_column("events", justify="right")
    table.add_row("sent", f"{summary.sent:,}")
    table.add_row("rejected locally", f"{summary.rejected:,}")
    console.print(table)
    for example in summary.examples:
        console.print(f"[yellow]rejected[/] {example}")
    if summary.rejected > len(summary.examples):
        console.print(f"… and {summary.rejected - len(summary.examples)} more rejected lines")
    return summary
