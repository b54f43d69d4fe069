"""Export: Atlas sessions from Postgres into an arc-atlas JSONL file."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .db import mask_url
from .errors import DatabaseConnectionLost, NoTracesFound
from .traces import FunnelStage, JsonlTraceSink, PostgresTraceSource, TraceFilter
from .traces.filters import describe_funnel, no_match_fix
from .traces.postgres import Reconnect

Progress = Callable[[int, "int | None"], None]
APPLICATION_NAME = "atlas-distill export"  # as pg_stat_activity shows export's connection


@dataclass
class ExportResult:
    output: str
    exported: int = 0
    steps: int = 0
    events: int = 0
    bytes: int = 0
    seconds: float = 0.0
    reconnects: int = 0
    funnel: list[FunnelStage] = field(default_factory=list)

    @property
    def sessions_per_second(self) -> float:
        return self.exported / self.seconds if self.seconds > 0 else 0.0

    def skipped(self) -> list[tuple[str, int]]:
        """How many sessions each filter removed, in funnel order."""
        return [(stage.label, before.remaining - stage.remaining)
                for before, stage in zip(self.funnel, self.funnel[1:])]


class NoSessionsMatched(NoTracesFound):
    """No session passed the filters; carries the funnel so the user sees which filter emptied it."""

    def __init__(self, funnel: list[FunnelStage]):
        self.funnel = funnel
        super().__init__(f"No conversations found in database: no session matched the filters. "
                         f"{describe_funnel(funnel)}.", fix=no_match_fix(None))


def export_traces(url: str, filters: TraceFilter, output: str, *, retries: int = 3,
                  progress: Progress | None = None,
                  on_reconnect: Callable[[Reconnect], None] | None = None) -> ExportResult:
    """Stream matching sessions into `output` (a path, .gz for gzip, or - for stdout).

    A connection lost mid-export is reopened up to `retries` times and the export resumes
    after the last session written; when that fails the output is not published.
    """
    started = time.perf_counter()
    source = PostgresTraceSource(url, filters, retries=retries, application_name=APPLICATION_NAME,
                                 on_reconnect=on_reconnect)
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
        result.reconnects = source.reconnects
        if result.exported == 0:
            raise NoSessionsMatched(source.funnel)
        sink.commit()
    except DatabaseConnectionLost as exc:
        sink.abort()
        raise _export_lost(exc, url, output, result.exported) from None
    except BaseException:
        sink.abort()
        raise
    result.bytes = sink.bytes_written
    result.seconds = time.perf_counter() - started
    return result


def _export_lost(exc: DatabaseConnectionLost, url: str, output: str, exported: int) -> DatabaseConnectionLost:
    tried = (f"{exc.attempts} reconnection attempt{'s' if exc.attempts > 1 else ''} failed" if exc.attempts
             else "no reconnection was attempted (--retries 0)")
    left = ("they went to stdout, which therefore holds an incomplete export" if output == "-"
            else f"nothing was written to {output} (a previous file there is untouched)")
    return DatabaseConnectionLost(
        f"Export failed: lost the connection to the database at {mask_url(url)} after {exported} sessions had "
        f"been exported, and {tried}; {left}. Last error: {exc.last_error.rstrip('.')}.",
        sessions_read=exported, attempts=exc.attempts, last_error=exc.last_error,
        fix="Check that the server is up and reachable, then run the export again (it starts from the "
        "beginning); --retries N waits out a longer outage.")
