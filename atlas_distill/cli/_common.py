"""What every subcommand shares: option types, error rendering, JSON output, progress."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import AtlasDistillError, OutputError, UsageError

# Piped output (logs, CI) is not squeezed into 80 columns; a terminal uses its own width.
_PIPE_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 140
out = Console(highlight=False, soft_wrap=True, width=_PIPE_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_PIPE_WIDTH)

DEBUG_ENV = "ATLAS_DISTILL_DEBUG"
INTERNAL_ERROR_EXIT = 70
PRECEDENCE = "Precedence: built-in defaults < --profile < KEY=VALUE overrides < explicit flags."

ProfileOpt = Annotated[
    str, typer.Option("--profile", "-p", help="Profile name (./profiles, then packaged) or a YAML path.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
DbUrlOpt = Annotated[
    str | None,
    typer.Option("--database-url", help="Atlas Postgres URL; default: profile database.url, then $ATLAS_DB_URL.",
                 show_default=False),
]
# The session filters every command that reads sessions takes, by the same names (export's vocabulary).
MinRewardOpt = Annotated[float | None, typer.Option(
    "--min-reward", help="Keep sessions whose reward (reward_stats, else session_reward, else reward_summary "
    "score) is >= this, in [0, 1] [trainer.min_reward].", show_default=False)]
LearningKeyOpt = Annotated[str | None, typer.Option(
    "--learning-key", help="Keep one metadata.learning_key [trainer.learning_key].", show_default=False)]
IncludeStatusOpt = Annotated[list[str] | None, typer.Option(
    "--include-status", help="Also keep this review status: pending, quarantined (repeatable); approved is kept by "
    "default [data.review_status].", show_default=False)]
AllStatusesOpt = Annotated[bool, typer.Option(
    "--all-statuses", help="Drop the review-status filter [data.review_status=null].")]
StatusOpt = Annotated[list[str] | None, typer.Option(
    "--status", help="Keep only this session status: succeeded, failed, running (repeatable) [data.status].",
    show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides such as trainer.min_reward=0.9 trainer.learning_key=null.",
                   show_default=False),
]


def filter_flags(min_reward: float | None, learning_key: str | None, include_status: list[str] | None,
                 all_statuses: bool, status: list[str] | None) -> dict[str, tuple[str, Any]]:
    """The shared filter flags as load_profile's flags: each names the profile key it sets."""
    from ..config import Null, Widen

    if all_statuses and include_status:
        raise UsageError("--all-statuses and --include-status contradict each other.", fix="Pass only one.")
    review = Null() if all_statuses else Widen(include_status) if include_status else None
    return {"--min-reward": ("trainer.min_reward", min_reward),
            "--learning-key": ("trainer.learning_key", learning_key),
            "--include-status" if include_status else "--all-statuses": ("data.review_status", review),
            "--status": ("data.status", status or None)}


def split_args(args: list[str] | None) -> tuple[list[str], list[str]]:
    """Positional arguments and KEY=VALUE overrides, given in any order."""
    positionals, overrides = [], []
    for arg in args or []:
        (overrides if "=" in arg and not arg.startswith(("/", ".")) else positionals).append(arg)
    return positionals, overrides


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def show_error(exc: AtlasDistillError, *, json_mode: bool) -> None:
    """The one error format: a paragraph on stderr, and under --json one error document on stdout."""
    if json_mode:
        print_json({"error": {"type": type(exc).__name__, "message": exc.message, "fix": exc.fix},
                    "exit_code": exc.exit_code})
    err.print(f"[bold red]Error:[/] {escape(exc.message)}", markup=True, highlight=False)
    if exc.fix:  # escaped: a fix such as data.review_status=[approved,pending] is text, not Rich markup
        err.print(f"[bold]Fix:[/] {escape(exc.fix)}", markup=True, highlight=False)


def fail(exc: AtlasDistillError, *, json_mode: bool) -> NoReturn:
    show_error(exc, json_mode=json_mode)
    raise typer.Exit(exc.exit_code)


def quiet_closed_pipe() -> NoReturn:
    """One rule for a closed pipe, in every command: the reader went away, which is not an error (exit 0)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0)


@contextmanager
def reporting_errors(json_mode: bool = False) -> Iterator[None]:
    """Typed errors become a message, a fix and their exit code; never a traceback."""
    try:
        yield
    except AtlasDistillError as exc:
        fail(exc, json_mode=json_mode)
    except KeyboardInterrupt:
        err.print("Interrupted; nothing partial was left behind.")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        quiet_closed_pipe()
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        message = f"Internal error: {type(exc).__name__}: {exc}"
        err.print(f"[bold red]{escape(message)}[/]\nThis is a bug; rerun with {DEBUG_ENV}=1 for the traceback and "
                  "report it.", markup=True, highlight=False)
        raise typer.Exit(INTERNAL_ERROR_EXIT) from None


@contextmanager
def progress_bar(label: str, unit: str = "sessions") -> Iterator[Callable[[int, int | None], None]]:
    """A Rich progress bar on stderr (only on a terminal); yields update(done, total)."""
    if not err.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class SpeedColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else "")

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               SpeedColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        yield update


EMPTY = "—"


def fit_table(title: str, headers: list[str], rows: list[list[str]], *, caption: str | None = None,
              left: int = 1, console: Console | None = None) -> Table:
    """Figures in a table that fits the console (80 columns and up): a column that is empty (—) in every row is
    left out; when the rest is still too wide, the table is turned, one row per figure and one column per row.
    Cells fold rather than end in an ellipsis, so that a name or path is always whole. The first `left` columns
    are text (left-aligned), the rest figures."""
    from rich import box

    console = console or out
    keep = [i for i, _ in enumerate(headers) if i < left or any(row[i] != EMPTY for row in rows)]
    headers, rows = [headers[i] for i in keep], [[row[i] for i in keep] for row in rows]
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, caption_justify="left", title_justify="left")
    for index, header in enumerate(headers):
        # figures keep their width and headers wrap instead; text folds
        longest = max([len(row[index]) for row in rows] + [len(word) for word in header.split()])
        table.add_column(header, justify="left" if index < left else "right", overflow="fold",
                         min_width=min(longest, 36) if index < left else longest)
    for row in rows:
        table.add_row(*row)
    if _rendered_width(table, console.width) <= console.width:
        return table
    turned = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, caption_justify="left", title_justify="left")
    turned.add_column(headers[0], overflow="fold")
    for row in rows:
        turned.add_column(row[0], justify="left" if left >= len(headers) else "right", overflow="fold")
    for index, header in enumerate(headers[1:], start=1):
        turned.add_row(header, *(row[index] for row in rows))
    return turned


def _rendered_width(table: Table, width: int) -> int:
    """How wide the table prints (Rich's own measure can promise less than it then uses)."""
    import io

    from rich.cells import cell_len

    probe = Console(width=width, file=io.StringIO(), soft_wrap=True, highlight=False)
    with probe.capture() as captured:
        probe.print(table)
    return max((cell_len(line) for line in captured.get().splitlines()), default=0)


def save_plot(draw: Callable[[str], None], path: str) -> None:
    """Run a plotting function into `path`; an unwritable path is an output error (exit 6)."""
    try:
        draw(path)
    except OSError as exc:
        raise OutputError(f"Cannot write the plot to {path}: {exc.strerror}.", fix="Choose a writable --plot path.") \
            from None


class LiveProgress:
    """The one progress renderer of long commands (train, chain, compare): on stderr, the lines as they come and,
    on a terminal, one bar that follows each stage, model preparation and step (with the latest metrics). In a
    log (no terminal) model preparation is said at its start, each quarter and its end, each logged loss as a
    line, and each stage only with `log_stages`. `quiet` (--json, --markdown, the other processes) shows lines
    only.

    Events: "line" text; "stage" text; "prepare" (phase, done, total); "step" or "progress" (done, total);
    "log" a metrics record.
    """

    def __init__(self, quiet: bool, log_stages: bool = False):
        self.quiet, self.log_stages = quiet, log_stages
        self.progress = None
        self.task = None
        self.last: dict = {}
        self.phase: tuple[str, float, int] | None = None  # model preparation: (phase, started, quarters said)

    def __enter__(self):
        if err.is_terminal and not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[metrics]}"), TextColumn("ETA"), TimeRemainingColumn(),
                                     console=err, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("Preparing", total=None, metrics="")
        return self.event

    def event(self, kind: str, data) -> None:
        if kind == "line":
            (self.progress.console if self.progress else err).print(data, markup=False, highlight=False)
        elif kind == "stage" and self.progress:
            self.progress.update(self.task, description=data, completed=0, total=None)
        elif kind == "stage" and self.log_stages and not self.quiet:
            err.print(data, markup=False, highlight=False)
        elif kind == "prepare":
            self._prepare(*data)
        elif kind in ("step", "progress") and self.progress:
            self.progress.update(self.task, completed=data[0], total=data[1], metrics=self._metrics())
        elif kind == "log":
            self.last.update({k: v for k, v in data.items() if isinstance(v, int | float)})
            if not self.progress and "train/loss" in data:
                err.print(f"  Step {data['step']}: loss={data['train/loss']:.4f}", highlight=False)

    def _prepare(self, phase: str, done: int, total: int | None) -> None:
        """A one-time model preparation: the bar on a terminal; in a log, its start, each quarter and its end."""
        if self.progress:
            self.progress.update(self.task, description=phase, completed=done, total=total)
            return
        if self.phase is None or self.phase[0] != phase:
            self.phase = (phase, time.perf_counter(), 0)
            err.print(f"{phase} ...", markup=False, highlight=False)
        name, started, said = self.phase
        quarter = 4 * done // total if total else 0
        if quarter <= said:
            return
        self.phase = (name, started, quarter)
        elapsed = time.perf_counter() - started
        eta = f", about {elapsed * (total - done) / done:.0f} s left" if done < total else ""
        err.print(f"  {done}/{total} ({done / total:.0%}) in {elapsed:.0f} s{eta}", markup=False, highlight=False)

    def _metrics(self) -> str:
        parts = [f"loss={self.last['train/loss']:.4f}" if "train/loss" in self.last else "",
                 f"lr={self.last['train/learning_rate']:.2e}" if "train/learning_rate" in self.last else "",
                 f"eval_loss={self.last['eval/loss']:.4f}" if "eval/loss" in self.last else "",
                 f"success={self.last['eval/success_rate']:.0%}" if "eval/success_rate" in self.last else ""]
        return " ".join(p for p in parts if p)

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()
