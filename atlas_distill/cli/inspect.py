"""`atlas-distill inspect`: reward, learning_key, status, turn and length histograms."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..config import load_profile
from ..db import require_db_url
from ..errors import NoTracesFound, UsageError
from ..inspect import inspect_sessions, plot_report
from ..traces import JsonlTraceSource, PostgresTraceSource, TraceFilter
from ._common import (DbUrlOpt, JsonOpt, ProfileOpt, err, out, print_json, progress_bar, save_plot,
                      reporting_errors, split_args)

BAR_WIDTH = 40


# The profile keys TraceFilter.from_profile reads: overrides of them matter only with --filtered.
_FILTER_KEYS = ("trainer.min_reward", "trainer.learning_key", "data.review_status", "data.status",
                "data.created_after", "data.session_ids", "data.limit")


def inspect(
    args: Annotated[list[str] | None, typer.Argument(
        help="A JSONL or .jsonl.gz trace file (- for stdin), then optional KEY=VALUE overrides.",
        show_default=False)] = None,
    database_url: DbUrlOpt = None,
    filtered: Annotated[bool, typer.Option(
        "--filtered", help="Apply the profile's filters (min_reward, learning_key, review status) first; "
        "by default every session is counted.")] = False,
    top: Annotated[int, typer.Option(min=1, help="learning_key rows to show; the rest are grouped.")] = 10,
    skip_invalid: Annotated[bool, typer.Option(help="Skip malformed lines and count them.")] = False,
    plot: Annotated[str | None, typer.Option(help="Also draw the histograms into this PNG file.",
                                             show_default=False)] = None,
    profile: ProfileOpt = "default",
    json_out: JsonOpt = False,
) -> None:
    """Show what a trace file (or the database) holds: reward histogram, learning keys, statuses, lengths."""
    with reporting_errors(json_out):
        positionals, overrides = split_args(args)
        if len(positionals) > 1:
            raise UsageError(f"inspect takes one trace file, got {len(positionals)}: {' '.join(positionals)}.",
                             fix="Inspect one file at a time.")
        config = load_profile(profile, overrides)
        filters = TraceFilter.from_profile(config) if filtered else TraceFilter(review_status=None)
        unused = [o for o in overrides if o.partition("=")[0].strip() in _FILTER_KEYS] if not filtered else []
        if unused:
            err.print(f"Note: {' '.join(unused)} filters only with --filtered; without it every session is "
                      "counted.", markup=False, highlight=False)
        if positionals:
            path = positionals[0]
            source = JsonlTraceSource(path, filters, skip_invalid=skip_invalid)
        elif database_url or config.database.url:
            path = "database"
            source = PostgresTraceSource(require_db_url(database_url, config.database.url), filters)
        else:
            raise UsageError("Nothing to inspect.", fix="Pass a trace file, e.g. `atlas-distill inspect "
                             "traces/runtime.jsonl`, or --database-url.")
        with progress_bar("Reading") as update:
            report = inspect_sessions(source, source=path, top=top, progress=lambda n: update(n, None))
        report.invalid_skipped = getattr(source, "invalid", 0)
        report.comment_lines = getattr(source, "comments", 0)
        if report.sessions == 0 and report.invalid_skipped and getattr(source, "valid", None) == 0:
            raise NoTracesFound(f"No valid session in {path}: all {report.invalid_skipped} lines were invalid and "
                                "skipped.", fix="Check that it is an Atlas trace export (one JSON session per line, "
                                "as `atlas-distill export` writes); without --skip-invalid the error names the "
                                "first bad line.")
        if report.sessions == 0:
            raise NoTracesFound(f"No session in {path} passed the filters.",
                                fix="Drop --filtered, or lower trainer.min_reward / clear trainer.learning_key.")
        if plot:
            save_plot(lambda path: plot_report(report, path), plot)
    if json_out:
        print_json(report.to_dict() | {"plot": plot})
        return
    mean = f", mean reward {report.reward_mean:.3f}" if report.reward_mean is not None else ""
    skipped = f", {report.invalid_skipped} invalid lines skipped" if report.invalid_skipped else ""
    skipped += f", {report.comment_lines} comment lines (#)" if report.comment_lines else ""
    out.print(f"[bold]{path}[/]: {report.sessions} sessions{mean}{skipped}")
    out.print(_histogram(f"Reward ({_reward_fields(report)})", report.reward + _no_reward(report)))
    out.print(_histogram("learning_key", report.learning_keys))
    out.print(_histogram("Session status", report.status))
    out.print(_histogram("Review status", report.review_status))
    out.print(_histogram("Turns per conversation", report.turns))
    out.print(_histogram("Approx. tokens per conversation (chars/4)", report.approx_tokens))
    if plot:
        out.print(f"Plot written to {plot}")


def _reward_fields(report) -> str:
    """Where the rewards were read from: `reward_stats.score`, or each field with its count when they differ."""
    if len(report.reward_fields) <= 1:
        return report.reward_fields[0].label if report.reward_fields else "no session has one"
    return "read from " + ", ".join(f"{b.label}: {b.count}" for b in report.reward_fields)


def _no_reward(report) -> list:
    from ..inspect import Bin

    return [Bin("no reward", report.no_reward)]


def _histogram(title: str, bins) -> Table:
    """Labels are printed whole (a sha256 learning key must be copyable into --learning-key); the bars take the
    width that is left, up to BAR_WIDTH, and are left out when none is."""
    from rich import box

    longest = max((len(b.label) for b in bins), default=3)
    bar_width = min(BAR_WIDTH, out.width - max(longest, 3) - len("sessions") - 8)
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("bin", no_wrap=True, min_width=longest)
    table.add_column("sessions", justify="right", no_wrap=True)
    if bar_width > 0:
        table.add_column("", no_wrap=True, overflow="crop")
    peak = max((b.count for b in bins), default=0) or 1
    for b in bins:
        bar = ["█" * round(bar_width * b.count / peak)] if bar_width > 0 else []
        table.add_row(b.label, str(b.count), *bar)
    return table
