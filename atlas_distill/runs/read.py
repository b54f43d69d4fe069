"""Reading finished runs back: a run directory, a chain (stage by stage), or a summary.json.

`read_runs(arg)` turns one RUN argument of `compare` into the runs it names, each with
its validated summary. A `train` run directory holds `summary.json`; a chain directory
holds a chain-level `summary.json` whose `stages` list names (or embeds) each stage's
summary, and `stage-<k>-<student>/` run directories, read directly when the chain has
no summary yet (an interrupted chain). Every problem raises InvalidRunSummary naming the
file and what is wrong in it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidRunSummary
from .summary import RunSummary, figures_problems

SUMMARY = "summary.json"
_RUN_FIX = ("Pass a run directory that `train` or `chain` finished (it holds summary.json), a chain "
            "stage directory, or a summary.json file.")
_STAGE_PATH_KEYS = ("summary", "summary_path", "run_dir", "stage_dir", "output_dir", "dir", "path")


@dataclass
class FinishedRun:
    """One finished run: a display name, where its summary came from, and the summary itself."""

    name: str
    kind: str
    """`run` (a train run) or `stage` (one stage of a chain)."""
    path: str
    """The summary.json file (for a stage embedded in a chain summary: that file)."""
    summary: RunSummary


def summary_problems(summary: Any) -> list[str]:
    """What keeps a summary from being compared; empty when it is usable."""
    if not isinstance(summary, dict):
        return [f"the document is a JSON {type(summary).__name__}, not an object"]
    problems = figures_problems(summary.get("eval"))
    params = summary.get("student_parameters")
    if params is not None and not (isinstance(params, int) and not isinstance(params, bool) and params >= 0):
        problems.append(f"`student_parameters` must be a non-negative integer or null, got {params!r}")
    return problems


def _invalid(path: Path, problems: list[str]) -> InvalidRunSummary:
    body = problems[0] if len(problems) == 1 else "\n" + "\n".join(f"  - {p}" for p in problems)
    return InvalidRunSummary(f"{path}: not a usable run summary: {body}", fix=_RUN_FIX)


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRunSummary(f"{path}: cannot be read: {exc.strerror}.", fix=_RUN_FIX) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _invalid(path, [f"not valid JSON ({exc})"]) from None


def _checked(path: Path, summary: Any, name: str, kind: str) -> FinishedRun:
    problems = summary_problems(summary)
    if problems:
        raise _invalid(path, problems)
    return FinishedRun(name, kind, str(path), RunSummary.from_dict(summary))


def _stage_number(directory: Path) -> tuple[int, str]:
    match = re.match(r"stage-(\d+)", directory.name)
    return (int(match.group(1)) if match else 1 << 30, directory.name)


def _stage_dirs(chain_dir: Path) -> list[Path]:
    return sorted((d for d in chain_dir.glob("stage-*") if (d / SUMMARY).is_file()), key=_stage_number)


def _stage_location(entry: Any, chain_dir: Path) -> Path | None:
    """Where a chain summary's stage entry points: a path string or a path under a known key."""
    target = entry if isinstance(entry, str) else next(
        (entry[k] for k in _STAGE_PATH_KEYS if isinstance(entry, dict) and isinstance(entry.get(k), str)), None)
    if target is None:
        return None
    # Paths are written relative to where the chain ran; the chain directory may have moved since.
    for candidate in (Path(target), chain_dir / target, chain_dir / Path(target).name):
        if (candidate / SUMMARY).is_file():
            return candidate / SUMMARY
        if candidate.is_file():
            return candidate
    return None


def _chain_stages(path: Path, chain: dict[str, Any]) -> list[FinishedRun]:
    chain_dir = path.resolve().parent
    stages = chain["stages"]
    if not stages:
        raise _invalid(path, ["`stages` is an empty list"])
    runs = []
    for index, entry in enumerate(stages, start=1):
        location = _stage_location(entry, chain_dir)
        if location is not None:
            runs.append(_checked(location, _load_json(location), f"{chain_dir.name}/{location.parent.name}", "stage"))
        elif isinstance(entry, dict) and ("eval" in entry or "success_rate" in entry):
            if "eval" not in entry:  # a flat stage row: success_rate, avg_tokens, eval_loss beside the names
                entry = entry | {"eval": {"success_rate": entry.get("success_rate"),
                                          "avg_tokens": entry.get("avg_tokens"), "loss": entry.get("eval_loss")}}
            name = entry.get("name") or entry.get("student") or f"stage-{index}"
            problems = summary_problems(entry)
            if problems:
                raise _invalid(path, [f"stages[{index - 1}]: {p}" for p in problems])
            runs.append(FinishedRun(f"{chain_dir.name}/{name}", "stage", str(path), RunSummary.from_dict(entry)))
        else:
            raise _invalid(path, [f"stages[{index - 1}] neither embeds its figures (`eval` or `success_rate`) "
                                  "nor names a stage directory holding summary.json"])
    return runs


def read_runs(arg: str) -> list[FinishedRun]:
    """The runs one RUN argument names: one for a run or stage, every stage for a chain."""
    path = Path(arg).expanduser()
    if not path.exists():
        raise InvalidRunSummary(f"{arg}: no such run directory or file.", fix=_RUN_FIX)
    if path.is_dir():
        if not (path / SUMMARY).is_file():
            stages = _stage_dirs(path)
            if not stages:
                raise InvalidRunSummary(f"{path} holds no {SUMMARY}: not a finished run or chain.",
                                        fix=_RUN_FIX + " A run writes summary.json when it ends.")
            return [_checked(d / SUMMARY, _load_json(d / SUMMARY), f"{path.resolve().name}/{d.name}", "stage")
                    for d in stages]
        path = path / SUMMARY
    document = _load_json(path)
    if isinstance(document, dict) and "eval" not in document and "stages" in document:
        if not isinstance(document["stages"], list):
            raise _invalid(path, ["`stages` must be a list of stages"])
        return _chain_stages(path, document)
    run_dir = path.resolve().parent
    kind = "stage" if _stage_number(run_dir)[0] < 1 << 30 else "run"
    return [_checked(path, document, run_dir.name, kind)]
