"""`atlas-distill chain`: teacher -> student -> smaller student ..., one GKD stage per arrow."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..db import check_database, resolve_db_url
from ..errors import UsageError
from ..traces.jsonl import check_trace_file
from ._common import (AllStatusesOpt, IncludeStatusOpt, JsonOpt, LearningKeyOpt, LiveProgress, MinRewardOpt, ProfileOpt,
                      StatusOpt, err, filter_flags, fit_table, out, print_json, reporting_errors, split_args)

Opt = typer.Option


def chain(
    args: Annotated[list[str], typer.Argument(
        help="SPEC (models largest first, separated by `:`, e.g. 14b:7b:3b:1.5b), then KEY=VALUE overrides; "
        "stageN.KEY=VALUE applies to stage N only.", show_default=False)],
    family: Annotated[str | None, Opt(help="What size aliases resolve to [model.family], e.g. "
                                           "Qwen/Qwen2.5-{size}-Instruct.", show_default=False)] = None,
    name: Annotated[str | None, Opt(help="Chain directory name (default: derived from SPEC, so rerunning the "
                                         "same command resumes).", show_default=False)] = None,
    output_dir: Annotated[str, Opt(help="Chains are written under this directory.")] = "outputs/chain",
    traces: Annotated[str | None, Opt(help="Train every stage on this JSONL trace file.", show_default=False)] = None,
    database_url: Annotated[str | None, Opt("--database-url", help="Atlas Postgres URL; default: profile "
                                            "database.url, then $ATLAS_DB_URL.", show_default=False)] = None,
    max_steps: Annotated[int | None, Opt(help="[trainer.max_steps] for every stage.", show_default=False)] = None,
    min_reward: MinRewardOpt = None,
    learning_key: LearningKeyOpt = None,
    include_status: IncludeStatusOpt = None,
    all_statuses: AllStatusesOpt = False,
    status: StatusOpt = None,
    dry_run: Annotated[bool, Opt("--dry-run", help="Validate the chain and print the plan; train nothing.")] = False,
    profile: ProfileOpt = "default",
    json_out: JsonOpt = False,
) -> None:
    """Distill a chain of models: stage k trains model k+1 from model k (from stage k-1's final/ for k > 1)."""
    with reporting_errors(json_out):
        positionals, overrides = split_args(args)
        if len(positionals) != 1:
            raise UsageError(f"chain takes one SPEC, got {len(positionals)}: {' '.join(positionals) or 'none'}.",
                             fix="Write the models as one argument: atlas-distill chain 14b:7b:3b:1.5b")
        if traces and database_url:
            raise UsageError("--traces and --database-url both name a data source.", fix="Pass only one.")
        check_trace_file(traces)  # --dry-run too: every stage would read it
        from ..chain import check_chain_tokenizers, plan_chain, run_chain
        from ..models import model_parameters

        flags = {"--family": ("model.family", family), "--max-steps": ("trainer.max_steps", max_steps),
                 **filter_flags(min_reward, learning_key, include_status, all_statuses, status)}
        plan = plan_chain(positionals[0], profile, overrides, flags, name=name, output_dir=output_dir,
                          check_models=False)
        url = None if traces else resolve_db_url(database_url, plan.database_url)
        if url:
            check_database(url)  # --dry-run too: every stage would read it; before tokenizers import torch
        check_chain_tokenizers(plan, dry_run=dry_run)
        if dry_run:
            sizes = [model_parameters(spec) for spec in plan.specs]  # from configs only: no weights load
            document = {"name": plan.name, "root": str(plan.root), "notes": plan.notes, "stages": [
                {"stage": s.index, "teacher": s.teacher_name, "student": s.student.name, "run_dir": str(s.run_dir),
                 "teacher_parameters": sizes[s.index - 1], "student_parameters": sizes[s.index],
                 "overrides": s.overrides} for s in plan.stages]}
            if json_out:
                print_json(document)
            else:
                out.print(_plan_table(document))
                for note in plan.notes:
                    err.print(f"Note: {note}", markup=False, highlight=False)
            return
        with LiveProgress(quiet=json_out) as on_event, contextlib.redirect_stdout(sys.stderr):
            summary = run_chain(plan, db_url=url, traces=traces, on_event=on_event)
    if json_out:
        print_json(summary)
        return
    out.print(_result_table(summary))
    err.print(f"Chain summary: {summary['root']}/summary.json", highlight=False)


def _plan_table(document: dict) -> Table:
    rows = [[str(s["stage"]), _sized(s["teacher"], s["teacher_parameters"]),
             _sized(s["student"], s["student_parameters"]), Path(s["run_dir"]).name, " ".join(s["overrides"]) or "-"]
            for s in document["stages"]]
    return fit_table(f"Chain {document['name']} (dry run: nothing trained)",
                     ["stage", "teacher", "student", "output", "stage overrides"], rows,
                     caption=f"Outputs go under the chain directory {document['root']}", left=5)


def _sized(name: str, parameters: int | None) -> str:
    if parameters is None:
        return name
    return f"{name} ({parameters / 1e9:.2f}B)" if parameters >= 1e9 else f"{name} ({parameters / 1e6:.1f}M)"


def _result_table(summary: dict) -> Table:
    rows = []
    for r in summary["stages"]:
        reduction = "n/a" if r["token_reduction_pct"] is None else f"{r['token_reduction_pct']:.1f}%"
        params = f"{r['student_parameters'] / 1e6:.1f}M" if r["student_parameters"] else "?"
        wall = f"{r['seconds']:.0f} s" + (" (done before)" if r["skipped"] else "")
        rows.append([str(r["stage"]), r["teacher"], r["student"], params, f"{r['success_rate']:.1%}",
                     f"{r['success_delta'] * 100:+.1f} pp", f"{r['avg_tokens']:.1f}", reduction,
                     "✅" if r["meets_target"] else "❌", wall])
    return fit_table(f"Chain {summary['name']}", ["stage", "teacher", "student", "params", "success", "Δ vs baseline",
                                                   "avg tokens", "token reduction", "meets target", "wall time"],
                     rows, left=3)
