"""`atlas-distill teacher-store build`: the teacher's top-k log-probs over the training conversations, on disk."""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated

import typer

from ..config import load_profile
from ..db import check_database, resolve_db_url
from ..errors import UsageError
from ..models import resolve_model_spec
from ..traces.jsonl import check_trace_file
from ._common import (AllStatusesOpt, IncludeStatusOpt, JsonOpt, LearningKeyOpt, LiveProgress, MinRewardOpt,
                      OverridesArg, ProfileOpt, StatusOpt, err, filter_flags, out, print_json, reporting_errors)

Opt = typer.Option
app = typer.Typer(help="Build a teacher store: off-policy training without the teacher in memory.",
                  no_args_is_help=True)


@app.command("build")
def build(
    out_dir: Annotated[str, Opt("--out", help="Directory of the store (new, or this build's to resume).",
                                show_default=False)],
    overrides: OverridesArg = None,
    teacher: Annotated[str | None, Opt(help="Teacher model spec [teacher_model_name_or_path].",
                                       show_default=False)] = None,
    student: Annotated[str | None, Opt(help="Student model spec [model.model_name_or_path]; its tokenizer encodes "
                                       "the conversations, as in `train`.", show_default=False)] = None,
    traces: Annotated[str | None, Opt(help="Read this JSONL trace file instead of the database.",
                                      show_default=False)] = None,
    database_url: Annotated[str | None, Opt("--database-url", help="Atlas Postgres URL; default: profile "
                                            "database.url, then $ATLAS_DB_URL.", show_default=False)] = None,
    min_reward: MinRewardOpt = None,
    learning_key: LearningKeyOpt = None,
    include_status: IncludeStatusOpt = None,
    all_statuses: AllStatusesOpt = False,
    status: StatusOpt = None,
    k: Annotated[int, Opt("--k", min=1, help="Teacher tokens kept per position, plus one tail bucket (1024: about "
                          "1.9 KB per position, the loss 5 % below exact on the demo).")] = 1024,
    batch_size: Annotated[int, Opt(min=1, help="Conversations per teacher forward pass.")] = 8,
    restart: Annotated[bool, Opt(help="Discard what --out holds (another build's store) and build anew.")] = False,
    skip_invalid: Annotated[bool, Opt(help="Skip malformed trace file lines and count them.")] = False,
    profile: ProfileOpt = "default",
    json_out: JsonOpt = False,
) -> None:
    """Run the teacher once over every target position of the conversations `train` would use with the same
    profile and overrides, and store its top-k log-probs; then train with trainer.teacher_store=DIR.

    Data: --traces FILE when given, else Postgres when a database URL is given, else the bundled demo traces.
    A build that was stopped resumes when run again with the same command.
    """
    with reporting_errors(json_out):
        if traces and database_url:
            raise UsageError("--traces and --database-url both name a data source.", fix="Pass only one.")
        config = load_profile(profile, overrides, {
            "--teacher": ("teacher_model_name_or_path", teacher), "--student": ("model.model_name_or_path", student),
            **filter_flags(min_reward, learning_key, include_status, all_statuses, status)})
        url = None if traces else resolve_db_url(database_url, config.database.url)
        check_trace_file(traces)
        for spec in (config.teacher_model_name_or_path, config.model.model_name_or_path):
            resolve_model_spec(spec, config.model.family)
        if url:
            check_database(url)
        from ..teacher_store.recipe import build_for_profile

        try:
            with LiveProgress(quiet=json_out) as on_event, contextlib.redirect_stdout(sys.stderr):
                result = build_for_profile(config, out_dir, db_url=url, traces=traces, k=k, batch_size=batch_size,
                                           restart=restart, skip_invalid=skip_invalid, on_event=on_event)
        except KeyboardInterrupt:
            err.print(f"Interrupted. {out_dir} is not a complete store (no manifest.json), so no run will take it; the "
                      "same command resumes after the last whole shard.", markup=False)
            raise typer.Exit(130) from None
    figures = {"store": str(result.path), "examples": result.examples, "positions": result.positions,
               "bytes": result.bytes, "bytes_per_position": round(result.bytes / max(result.positions, 1), 1),
               "k": result.k, "seconds": result.seconds, "teacher_seconds": result.teacher_seconds,
               "resumed_examples": result.resumed}
    if json_out:
        print_json(figures)
        return
    done = "already complete" if result.resumed == result.examples else (
        f"resumed after {result.resumed} examples" if result.resumed else "built")
    out.print(f"Teacher store {result.path} {done}: {result.examples} conversations, {result.positions:,} target "
              f"positions, {result.bytes / 1e6:.1f} MB ({figures['bytes_per_position']:,} B per position at "
              f"k={result.k}); {result.seconds:.1f} s, of which the teacher {result.teacher_seconds:.1f} s.",
              markup=False)
    out.print(f"Train with it: `atlas-distill train` with this build's --profile, --teacher, --student, data flags "
              f"and overrides, plus trainer.teacher_store={result.path} (off-policy steps read it; with "
              "trainer.lmbda=0 the teacher is never loaded).", markup=False)
