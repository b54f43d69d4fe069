"""Export: Atlas sessions from Postgres into an arc-atlas JSONL file."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import NoTracesFound
from .traces import FunnelStage, JsonlTraceSink, PostgresTraceSource, TraceFilter

Progress = Callable[[int, "int | None"], None]

NO_MATCH_FIX = (
    "Confirm ATLAS_DB_URL (or --database-url) points at the right cluster, temporarily lower "
    "trainer.min_reward (--min-reward), clear learning_key (trainer.learning_key=null), or widen the "
    "review filter (--include-status pending, --all-statuses)."
)


@dataclass
class ExportResult:
    output: str
    exported: int = 0
    steps: int = 0
    events: int = 0
    bytes: int = 0
    seconds: float = 0.0
    funnel: list[FunnelStage] = field(default_factory=list)

    @property
    def sessions_per_second(self) -> float:
        return self.exported / self.seconds if self.seconds > 0 else 0.0

    def skipped(self) -> list[tuple[str, int]]:
        """How many sessions each filter removed, in funnel order."""
        return [(stage.label, before.remaining - stage.remaining)
                for before, stage in zip(self.funnel, self.funnel[1:])]


def describe_funnel(funnel: list[FunnelStage]) -> str:
    parts = [f"{stage.label}: {stage.remaining}" for stage in funnel]
    emptied = next((stage.label for stage in funnel if stage.remaining == 0), None)
    text = " -> ".join(parts)
    return f"{text} (the filter `{emptied}` left none)" if emptied and emptied != funnel[0].label else text


class NoSessionsMatched(NoTracesFound):
    """No session passed the filters; carries the funnel so the user sees which filter emptied it."""

    def __init__(self, funnel: list[FunnelStage]):
        self.funnel = funnel
        super().__init__(f"No conversations found in database: no session matched the filters. "
                         f"{describe_funnel(funnel)}.", fix=NO_MATCH_FIX)


def export_traces(url: str, filters: TraceFilter, output: str, *, progress: Progress | None = None) -> ExportResult:
    """Stream matching sessions into `output` (a path, .gz for gzip, or - for stdout)."""
    started = time.perf_counter()
    source = PostgresTraceSource(url, filters)
    result = ExportResult(output=output)
    sink = JsonlTraceSink(output)
    try:
        for session in source:
            sink.write(session)
            result.exported += 1
            result.steps += len(session.steps)
            result.events += len(session.trajectory_events)
            if progress and (result.exported % 100 == 0 or result.exported == source.expected):
                progress(result.exported, source.expected)
        result.funnel = source.funnel
        if result.exported == 0:
            raise NoSessionsMatched(source.funnel)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    result.bytes = sink.bytes_written
    result.seconds = time.perf_counter() - started
    return result
