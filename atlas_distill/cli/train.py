"""`atlas-distill train`: one GKD run with the baseline comparison."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Annotated

import typer
from rich.table import Table

from ..config import load_profile
from ..db import check_database, resolve_db_url
from ..errors import AtlasDistillError, UsageError
from ..models import resolve_model_spec
from ..runs.summary import Figures, RunSummary
from ..traces.jsonl import check_trace_file
from ._common import (AllStatusesOpt, IncludeStatusOpt, JsonOpt, LearningKeyOpt, LiveProgress, MinRewardOpt,
                      OverridesArg, ProfileOpt, StatusOpt, filter_flags, out, print_json, reporting_errors)

Opt = typer.Option
_REPORT_GRACE = 2.0  # seconds another process waits, on an error, for the main process to report it


def train(
    overrides: OverridesArg = None,
    teacher: Annotated[str | None, Opt(help="Teacher model spec [teacher_model_name_or_path].",
                                       show_default=False)] = None,
    student: Annotated[str | None, Opt(help="Student model spec [model.model_name_or_path].",
                                       show_default=False)] = None,
    traces: Annotated[str | None, Opt(help="Train on this JSONL trace file instead of the database.",
                                      show_default=False)] = None,
    database_url: Annotated[str | None, Opt("--database-url", help="Atlas Postgres URL; default: profile "
                                            "database.url, then $ATLAS_DB_URL.", show_default=False)] = None,
    min_reward: MinRewardOpt = None,
    learning_key: LearningKeyOpt = None,
    include_status: IncludeStatusOpt = None,
    all_statuses: AllStatusesOpt = False,
    status: StatusOpt = None,
    max_steps: Annotated[int | None, Opt(help="[trainer.max_steps]", show_default=False)] = None,
    output_dir: Annotated[str | None, Opt(help="[output_dir]", show_default=False)] = None,
    run_name: Annotated[str | None, Opt(help="[run_name]", show_default=False)] = None,
    resume: Annotated[bool, Opt(help="Continue the run directory's last checkpoint.")] = False,
    skip_invalid: Annotated[bool, Opt(help="Skip malformed trace file lines and count them.")] = False,
    plan: Annotated[bool, Opt("--plan", help="Print the memory plan for this machine (`atlas-distill plan`) and "
                              "exit: 0 when it fits, 3 when not.")] = False,
    profile: ProfileOpt = "default",
    json_out: JsonOpt = False,
) -> None:
    """Distill the teacher into the student with GKD on Atlas traces, then compare with the baseline.

    Data: --traces FILE when given, else Postgres when a database URL is given (flag, profile or
    ATLAS_DB_URL), else the bundled demo traces.
    """
    main = _is_main_process()
    with reporting_errors(json_out), _replica(main):
        if traces and database_url:
            raise UsageError("--traces and --database-url both name a data source.", fix="Pass only one.")
        config = load_profile(profile, overrides, {
            "--teacher": ("teacher_model_name_or_path", teacher), "--student": ("model.model_name_or_path", student),
            **filter_flags(min_reward, learning_key, include_status, all_statuses, status),
            "--max-steps": ("trainer.max_steps", max_steps), "--output-dir": ("output_dir", output_dir),
            "--run-name": ("run_name", run_name),
        })
        if plan:
            from .plan import show_plan

            raise typer.Exit(show_plan(config, gpus=None, gpu_memory=None, json_out=json_out,
                                       teacher_flag=teacher is not None))
        if resume and not config.run_name:
            raise UsageError("--resume needs the run to continue.", fix="Pass --run-name NAME of the run directory.")
        url = None if traces else resolve_db_url(database_url, config.database.url)
        # Input problems are found in a moment, not after importing torch and preparing the models.
        check_trace_file(traces)
        for spec in (config.teacher_model_name_or_path, config.model.model_name_or_path):
            resolve_model_spec(spec, config.model.family)
        if url:
            check_database(url)
        from ..training import run_training

        # Libraries print to stdout (transformers announces W&B offline mode there); stdout is ours.
        live = LiveProgress(quiet=json_out or not main)
        with live as on_event, contextlib.redirect_stdout(sys.stderr if main else sys.stdout):
            result = run_training(config, profile_name=profile, db_url=url, traces=traces,
                                  skip_invalid=skip_invalid, resume=resume, on_event=on_event)
    if not main:
        return
    if json_out:
        print_json(result.summary.to_dict())
        return
    out.print(_summary_table(result.summary))


def _is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or mpirun) job, or a plain single process."""
    rank = next((os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK") if k in os.environ), "0")
    return int(rank) == 0


@contextlib.contextmanager
def _replica(main: bool):
    """On the other processes of a multi-process run: nothing on stdout, and no second copy of an error that
    the main process reports (every process raises the same one); a crash of their own still shows."""
    if main:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        try:
            yield
        except AtlasDistillError as exc:
            time.sleep(_REPORT_GRACE)  # the launcher stops every process once one has exited
            raise typer.Exit(exc.exit_code) from None


def _rates(figures: Figures | None) -> str:
    """final-answer / step / episode success, e.g. `95.0% / 97.5% / 92.5%` (older runs: final only)."""
    if figures is None:
        return "not measured (teacher not loaded)"
    shown = [figures.success_rate, figures.step_success_rate, figures.episode_success_rate]
    return " / ".join("n/a" if value is None else f"{value:.1%}" for value in shown)


def _summary_table(summary: RunSummary) -> Table:
    b, data = summary.baseline, summary.data
    table = Table(title=f"GKD run {summary.run_dir}", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(justify="right", overflow="fold")  # a path or URL folds, never cut
    reduction = "n/a" if b.token_reduction_pct is None else f"{b.token_reduction_pct:.1f}%"
    rows = [("teacher", f"{summary.teacher} ({summary.teacher_parameters / 1e6:.1f}M)"),
            ("student", f"{summary.student} ({summary.student_parameters / 1e6:.1f}M)"),
            ("train / eval conversations", f"{data['train']} / {data['eval_used']}"),
            ("truncated / dropped", f"{data['truncated']} / {data['dropped_too_long'] + data['dropped_no_answer']}"),
            ("steps", summary.steps), ("seconds", summary.seconds),
            ("success: final / step / episode", ""),
            ("  teacher", _rates(summary.teacher_eval)),
            ("  student before", _rates(summary.student_before)),
            ("  student after (eval/*_success_rate)", _rates(summary.eval)),
            ("eval/avg_tokens (per episode)", f"{summary.eval.avg_tokens:.1f}"),
            ("metrics/success_delta", f"{b.success_delta_pp:+.1f} pp"),
            ("metrics/token_reduction_pct", reduction),
            ("metrics/meets_target", "✅" if b.meets_target else "❌"),
            ("final model", summary.final_dir)]
    for label, value in rows:
        table.add_row(label, str(value))
    return table
