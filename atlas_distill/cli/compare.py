"""`atlas-distill compare`: baseline metrics of runs (and models evaluated on the spot) side by side."""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..config import load_profile
from ..errors import TargetsNotMet, UsageError
from ._common import (AllStatusesOpt, IncludeStatusOpt, JsonOpt, LearningKeyOpt, LiveProgress, MinRewardOpt, ProfileOpt,
                      StatusOpt, err, filter_flags, fit_table, out, print_json, reporting_errors, save_plot,
                      split_args)

Opt = typer.Option
COLUMNS = ("run", "success", "step / episode", "Δ vs baseline", "avg tokens", "token reduction", "meets target", "eval loss",
           "parameters", "tokens/s")
TABLE_HEADERS = ("run", "success", "step / episode", "Δ vs baseline", "avg tokens", "token reduction", "meets target", "eval loss",
                 "params", "tokens/s")


def compare(
    args: Annotated[list[str] | None, typer.Argument(
        help="Run directories (train runs, chains, chain stages) or summary.json files, then optional "
        "KEY=VALUE overrides.", show_default=False)] = None,
    baseline: Annotated[str | None, Opt(help="The reference: one compared run or model, by name or path. "
                                        "Default: the profile's trainer.baseline_success/baseline_tokens "
                                        "when they are numbers, else the first run.", show_default=False)] = None,
    model: Annotated[list[str] | None, Opt("--model", help="Also evaluate this model spec now on --traces "
                                           "(repeatable): teacher, untouched student, final/ of a run.",
                                           show_default=False)] = None,
    traces: Annotated[str | None, Opt(help="JSONL trace file the --model evaluations use (train's eval split).",
                                      show_default=False)] = None,
    markdown: Annotated[bool, Opt("--markdown", help="Print a Markdown table (for a PR) instead.")] = False,
    plot: Annotated[str | None, Opt(help="Also draw grouped bars (success rate, avg tokens) into this PNG.",
                                    show_default=False)] = None,
    before: Annotated[bool, Opt("--before", help="Also show each train run's teacher and its student before "
                                "training, as the run measured them (rows `RUN (teacher)`, `RUN (before)`).")] = False,
    fail_on_miss: Annotated[bool, Opt("--fail-on-miss", help="Exit 3 when a compared run misses its "
                                      "targets (the reference itself is not checked).")] = False,
    skip_invalid: Annotated[bool, Opt(help="Skip malformed --traces lines and count them.")] = False,
    min_reward: MinRewardOpt = None,
    learning_key: LearningKeyOpt = None,
    include_status: IncludeStatusOpt = None,
    all_statuses: AllStatusesOpt = False,
    status: StatusOpt = None,
    profile: ProfileOpt = "default",
    json_out: JsonOpt = False,
) -> None:
    """Compare runs side by side: success rate, delta vs baseline, avg tokens, token reduction, targets."""
    with reporting_errors(json_out):
        runs, overrides = split_args(args)
        if json_out and markdown:
            raise UsageError("--json and --markdown both choose the output.", fix="Pass only one of them.")
        config = load_profile(profile, overrides, filter_flags(min_reward, learning_key, include_status, all_statuses,
                                                               status))
        from ..compare import compare_runs, plot_comparison

        live = LiveProgress(quiet=json_out or markdown, log_stages=True)
        with live as on_event, contextlib.redirect_stdout(sys.stderr):
            comparison = compare_runs(runs, profile=config, baseline=baseline, models=model or [], traces=traces,
                                      skip_invalid=skip_invalid, on_event=on_event, before=before)
        if plot:
            save_plot(lambda path: plot_comparison(comparison, path), plot)
    if json_out:
        print_json(comparison.to_dict() | {"plot": plot})
    elif markdown:
        sys.stdout.write(to_markdown(comparison))
    else:
        out.print(_table(comparison))
        if plot:
            out.print(f"Plot written to {plot}")
    if fail_on_miss and comparison.missed:
        missed = ", ".join(row.name for row in comparison.missed)
        exc = TargetsNotMet(f"Targets not met by {len(comparison.missed)} of {len(comparison.rows)} rows: {missed}.")
        err.print(f"[bold red]❌[/] {escape(exc.message)}", markup=True, highlight=False)
        raise typer.Exit(exc.exit_code)


def _cells(row) -> list[str]:
    b = row.baseline
    reduction = "n/a" if b.token_reduction_pct is None else f"{b.token_reduction_pct:+.1f}%"
    meets = "ref" if row.reference else ("✅" if row.meets_target else "❌")
    loss = "—" if row.eval_loss is None else f"{row.eval_loss:.4f}"
    speed = "—" if row.tokens_per_second is None else f"{row.tokens_per_second:,.1f}"
    multi_turn = "—" if row.step_success_rate is None or row.episode_success_rate is None else \
        f"{row.step_success_rate:.1%} / {row.episode_success_rate:.1%}"
    return [row.name, f"{row.success_rate:.1%}", multi_turn, f"{b.success_delta_pp:+.1f} pp", f"{row.avg_tokens:.1f}",
            reduction, meets, loss, _human(row.parameters), speed]


def _human(count: int | None) -> str:
    if count is None:
        return "—"
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _reference_text(comparison) -> str:
    ref = comparison.reference
    tokens = "no token target" if ref.tokens is None else f"{ref.tokens:.1f} tokens ({ref.source['tokens']})"
    return (f"Reference: success {ref.success:.1%} ({ref.source['success']}), {tokens}. Targets: "
            f"success delta >= {comparison.success_target * 100:.1f} pp"
            + ("" if ref.tokens is None else f", token reduction >= {comparison.token_target:.1f}%") + ".")


def _table(comparison) -> Table:
    return fit_table("Baseline comparison", list(TABLE_HEADERS), [_cells(row) for row in comparison.rows],
                     caption=_reference_text(comparison))


def to_markdown(comparison) -> str:
    """A GitHub table, then the reference line."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "| --- |" + " ---: |" * (len(COLUMNS) - 1)]
    for row in comparison.rows:
        cells = [cell.replace("|", "\\|") for cell in _cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + _reference_text(comparison) + "\n"
