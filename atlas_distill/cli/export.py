"""`atlas-distill export`: Postgres -> JSONL in the arc-atlas format."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from ..config import load_profile
from ..db import mask_url, require_db_url
from ..errors import UsageError
from ..export import NoSessionsMatched, export_traces
from ..traces import TraceFilter
from ..traces.postgres import Reconnect
from ._common import (AllStatusesOpt, DbUrlOpt, IncludeStatusOpt, JsonOpt, LearningKeyOpt, MinRewardOpt, OverridesArg,
                      ProfileOpt, StatusOpt, err, filter_flags, out, print_json, progress_bar, reporting_errors)


def export(
    overrides: OverridesArg = None,
    database_url: DbUrlOpt = None,
    output: Annotated[str, typer.Option("--output", "-o", help="JSONL file to write (.gz compresses; - is stdout).")]
    = "traces/runtime.jsonl",
    min_reward: MinRewardOpt = None,
    learning_key: LearningKeyOpt = None,
    include_status: IncludeStatusOpt = None,
    all_statuses: AllStatusesOpt = False,
    status: StatusOpt = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many sessions.", show_default=False)] = None,
    session_id: Annotated[list[int] | None, typer.Option(help="Only this session id (repeatable).",
                                                         show_default=False)] = None,
    created_after: Annotated[datetime | None, typer.Option(help="Only sessions created after this time.",
                                                           show_default=False)] = None,
    retries: Annotated[int, typer.Option(
        min=0, help="When the connection drops mid-export, reconnect this many times (waiting 0.5 s, 1 s, 2 s, "
        "...) and resume after the last session written.")] = 3,
    profile: ProfileOpt = "default",
    json_out: JsonOpt = False,
) -> None:
    """Export Atlas sessions from Postgres to JSONL (arc-atlas format), streamed with one query."""
    with reporting_errors(json_out):
        if json_out and output == "-":
            raise UsageError("--json and --output - both want stdout.", fix="Write the JSONL to a file with --output.")
        config = load_profile(profile, overrides, {
            **filter_flags(min_reward, learning_key, include_status, all_statuses, status),
            "--limit": ("data.limit", limit),
            "--session-id": ("data.session_ids", session_id or None),
            "--created-after": ("data.created_after", created_after),
        })
        url = require_db_url(database_url, config.database.url)
        filters = TraceFilter.from_profile(config)
        try:
            with progress_bar("Exporting") as update:
                result = export_traces(url, filters, output, retries=retries, progress=update,
                                       on_reconnect=_warn_reconnect)
        except NoSessionsMatched as exc:
            if not json_out:
                err.print(_funnel_table(exc.funnel))
            raise
    summary = {
        "output": output, "database": mask_url(url), "exported": result.exported, "steps": result.steps,
        "events": result.events, "bytes": result.bytes, "seconds": round(result.seconds, 3),
        "sessions_per_second": round(result.sessions_per_second, 1), "reconnects": result.reconnects,
        "funnel": [{"filter": s.label, "remaining": s.remaining} for s in result.funnel],
        "skipped": dict(result.skipped()),
    }
    if json_out:
        print_json(summary)
        return
    table = Table(title=f"Exported {result.exported} sessions", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(justify="right", overflow="fold")  # a path or URL folds, never cut
    for label, value in [("output", output), ("database", summary["database"]), ("sessions", result.exported),
                         ("steps", result.steps), ("trajectory events", result.events),
                         ("bytes", f"{result.bytes:,}"), ("seconds", f"{result.seconds:.2f}"),
                         ("sessions/s", f"{result.sessions_per_second:,.0f}")]:
        table.add_row(label, str(value))
    if result.reconnects:
        table.add_row("reconnects", str(result.reconnects))
    for label, count in result.skipped():
        table.add_row(f"skipped by {label}", str(count))
    (err if output == "-" else out).print(table)


def _funnel_table(funnel) -> Table:
    table = Table(title="Sessions remaining after each filter")
    table.add_column("filter", overflow="fold")
    table.add_column("remaining", justify="right", no_wrap=True)
    for stage in funnel:
        table.add_row(stage.label, str(stage.remaining), style="bold red" if stage.remaining == 0 else None)
    return table


def _warn_reconnect(event: Reconnect) -> None:
    then = f"in {event.delay:g} s (attempt {event.attempt} of {event.retries})"
    if event.attempt == 1:
        text = f"lost the database connection after {event.sessions_read} sessions ({event.reason}); " \
               f"reconnecting {then}"
    else:
        text = f"reconnection attempt {event.attempt - 1} failed ({event.reason.rstrip('.')}); trying again {then}"
    err.print(f"Warning: {text}.", markup=False, highlight=False)
