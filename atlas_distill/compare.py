"""Baseline metrics side by side: finished runs, and models evaluated on the spot (`atlas-distill compare`).

`compare_runs` reads each RUN (runs.py), optionally evaluates `--model` specs on the
same eval split and with the same scorer as `train` (evaluate/models.py), picks the reference
and recomputes every row's success delta and token reduction against it with
`baseline_summary` and the profile's targets. It never prints; progress goes through `on_event(kind, data)`
(kinds: "stage" text, "progress" (done, total) of the current evaluation).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Profile
from .errors import ProfileError, UsageError
from .evaluate import baseline_summary
from .progress import Event
from .runs.read import FinishedRun, read_runs
from .runs.summary import BaselineSummary, Figures

if TYPE_CHECKING:
    from .evaluate.models import ModelEvaluation


@dataclass
class CompareRow:
    """One compared run or model, and its Baseline Comparison against the reference."""

    name: str
    kind: str
    """`run`, `stage` (of a chain), `model` (evaluated on the spot), or `teacher` / `before` (a run's own
    measurements of its teacher and of its student before training, with --before)."""
    path: str
    """The summary.json read, or the directory the model was loaded from."""
    success_rate: float
    """Final-answer success."""
    avg_tokens: float
    step_success_rate: float | None = None
    """Target turns judged right (runs from before multi-turn evaluation have none)."""
    episode_success_rate: float | None = None
    """Sessions whose every target turn is right."""
    eval_loss: float | None = None
    parameters: int | None = None
    tokens_per_second: float | None = None
    """Generated tokens / wall seconds of the evaluation on this machine (models only)."""
    eval_seconds: float | None = None
    eval_sessions: int | None = None
    model: str | None = None
    reference: bool = False
    baseline: BaselineSummary | None = None
    """Against the comparison's reference; set once the reference is chosen."""

    @property
    def meets_target(self) -> bool | None:
        """None for the reference itself: it is what the others are compared with."""
        return None if self.reference or self.baseline is None else self.baseline.meets_target

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "baseline"}
        b = self.baseline
        compared = not self.reference and b is not None
        return data | {
            "success_delta": b and b.success_delta, "success_delta_pp": b and b.success_delta_pp,
            "token_reduction_pct": b and b.token_reduction_pct,
            "meets_success_target": b.meets_success_target if compared else None,
            "meets_token_target": b.meets_token_target if compared else None,
            "meets_target": self.meets_target,
        }


@dataclass
class Reference:
    """What every row is compared with: a row's figures or the profile's baseline numbers."""

    success: float
    tokens: float | None
    source: dict[str, str]
    """Per figure: `profile`, or the name of the row it was taken from."""
    name: str | None = None
    """The row that is the reference (None when both figures come from the profile)."""


@dataclass
class Comparison:
    reference: Reference
    rows: list[CompareRow]
    success_target: float
    token_target: float

    @property
    def missed(self) -> list[CompareRow]:
        """Compared runs and models that miss their targets (a run's teacher and before rows are context)."""
        return [row for row in self.rows if row.meets_target is False and row.kind not in ("teacher", "before")]

    def to_dict(self) -> dict[str, Any]:
        return {"reference": asdict(self.reference),
                "targets": {"success_delta": self.success_target, "token_reduction_pct": self.token_target},
                "rows": [row.to_dict() for row in self.rows], "missed": [row.name for row in self.missed],
                "all_meet_targets": not self.missed}


def row_from_run(run: FinishedRun) -> CompareRow:
    s = run.summary
    return CompareRow(name=run.name, kind=run.kind, path=run.path, eval_loss=s.eval_loss, parameters=s.student_parameters,
                      eval_sessions=s.data.get("eval_used"), model=s.student, **s.eval.to_dict())


def rows_measured_before(run: FinishedRun) -> list[CompareRow]:
    """A train run's teacher and its student before training, as the run measured them on its own eval sessions
    (summary teacher_eval / student_before), each that the run measured (a run from a teacher store with the
    teacher never loaded has no teacher row)."""
    s = run.summary
    return [CompareRow(name=f"{run.name} ({label})", kind=label, path=run.path, parameters=parameters,
                       eval_sessions=s.data.get("eval_used"), model=model, **figures.to_dict())
            for label, figures, model, parameters in (("teacher", s.teacher_eval, s.teacher, s.teacher_parameters),
                                                      ("before", s.student_before, s.student, s.student_parameters))
            if figures is not None]


def row_from_model(m: ModelEvaluation) -> CompareRow:
    return CompareRow(name=m.spec, kind="model", path=m.path, success_rate=m.result.success_rate,
                      avg_tokens=m.result.avg_tokens, step_success_rate=m.result.step_success_rate,
                      episode_success_rate=m.result.episode_success_rate, parameters=m.parameters,
                      tokens_per_second=m.tokens_per_second, eval_seconds=round(m.seconds, 2), eval_sessions=m.result.count, model=m.name)


def _unique_names(rows: list[CompareRow]) -> None:
    """Two runs with the same directory name are told apart by their path."""
    counts = Counter(row.name for row in rows)
    for row in rows:
        if counts[row.name] > 1 and row.kind != "model":
            row.name = str(Path(row.path).parent)
    seen: Counter = Counter()
    for row in rows:
        seen[row.name] += 1
        if seen[row.name] > 1:
            row.name = f"{row.name} #{seen[row.name]}"


def _matches(row: CompareRow, wanted: str) -> bool:
    target = Path(wanted).expanduser()
    if not target.exists():
        return False
    target, here = target.resolve(), Path(row.path).expanduser().resolve()
    # A run is named by its directory or its summary.json; a model by its directory only.
    return target == here or (row.kind != "model" and target == here.parent)


def _reference_index(rows: list[CompareRow], baseline: str) -> int:
    found = [i for i, row in enumerate(rows) if row.name == baseline] or \
        [i for i, row in enumerate(rows) if _matches(row, baseline)]
    names = ", ".join(f"`{row.name}`" for row in rows)
    if not found:
        raise UsageError(f"--baseline `{baseline}` is none of the compared runs ({names}).",
                         fix="Name one of them, by its name as shown or by its path.")
    if len(found) > 1:
        raise UsageError(f"--baseline `{baseline}` names {len(found)} rows: "
                         + ", ".join(f"`{rows[i].name}`" for i in found) + ".", fix="Name one of them.")
    return found[0]


def _profile_figures(profile: Profile) -> tuple[float | None, float | None | str]:
    t = profile.trainer
    problems = []
    if t.baseline_success != "auto" and not 0.0 <= t.baseline_success <= 1.0:
        problems.append(f"`trainer.baseline_success` must be in [0, 1] or auto, got {t.baseline_success}")
    if t.baseline_tokens not in ("auto", None) and t.baseline_tokens < 0:
        problems.append(f"`trainer.baseline_tokens` must be >= 0, auto or null, got {t.baseline_tokens}")
    if problems:
        raise ProfileError(problems, fix="Fix the profile or override, e.g. trainer.baseline_success=0.75.")
    return (None if t.baseline_success == "auto" else t.baseline_success), t.baseline_tokens


def choose_reference(rows: list[CompareRow], profile: Profile, baseline: str | None = None) -> Reference:
    """--baseline's row; else the profile's numbers where they are numbers and the first row for the rest (a
    teacher row is never the default: with --before, the first run's student before training is).

    `trainer.baseline_tokens: null` always means "no token target", whatever the reference.
    """
    success, tokens = _profile_figures(profile)
    first = next((i for i, row in enumerate(rows) if row.kind != "teacher"), 0)
    index = _reference_index(rows, baseline) if baseline is not None else first
    row = rows[index]
    from_row = baseline is not None or success is None or tokens == "auto"
    if baseline is not None or success is None:
        success, success_source = row.success_rate, row.name
    else:
        success_source = "profile"
    if tokens is None:
        tokens_source = "none"
    elif baseline is not None or tokens == "auto":
        tokens, tokens_source = row.avg_tokens, row.name
    else:
        tokens_source = "profile"
    row.reference = from_row
    return Reference(success=success, tokens=tokens, source={"success": success_source, "tokens": tokens_source},
                     name=row.name if from_row else None)


def compare_runs(runs: list[str], *, profile: Profile, baseline: str | None = None, models: Sequence[str] = (),
                 traces: str | None = None, skip_invalid: bool = False, on_event: Event | None = None,
                 before: bool = False) -> Comparison:
    """Read the runs, evaluate the models, compare every row with the reference. With `before`, each train run
    brings its teacher and its student before training, as it measured them, in rows just before its own."""
    if not runs and not models:
        raise UsageError("Nothing to compare.", fix="Pass run directories (outputs/gkd/<run>) and/or "
                         "--model SPEC with --traces FILE.")
    if models and not traces:
        raise UsageError("--model needs --traces FILE: the sessions to evaluate the models on.",
                         fix="Pass --traces traces/runtime.jsonl (written by `atlas-distill export`).")
    rows = [row for arg in runs for run in read_runs(arg)
            for row in (rows_measured_before(run) if before else []) + [row_from_run(run)]]
    # Models are named by their spec; checking --baseline and the profile now spares a failed evaluation.
    _profile_figures(profile)
    if baseline is not None:
        planned = [CompareRow(**asdict(r)) for r in rows] + [CompareRow(s, "model", s, 0.0, 0.0) for s in models]
        _unique_names(planned)
        _reference_index(planned, baseline)
    if models:
        from .evaluate.models import evaluate_models

        rows += [row_from_model(m) for m in evaluate_models(list(models), profile, traces,
                                                             skip_invalid=skip_invalid, on_event=on_event)]
    _unique_names(rows)
    reference = choose_reference(rows, profile, baseline)
    t = profile.trainer
    for row in rows:
        figures = Figures(success_rate=row.success_rate, avg_tokens=row.avg_tokens)
        row.baseline = baseline_summary(figures, reference.success, reference.tokens,
                                        success_target=t.success_delta_target, token_target=t.token_reduction_target)
    return Comparison(reference, rows, t.success_delta_target, t.token_reduction_target)


def plot_comparison(comparison: Comparison, path: str) -> None:
    """Grouped bars per row: success rate (left axis, %) and avg tokens (right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, width = comparison.rows, 0.38
    x = range(len(rows))
    fig, left = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 2), 4.8))
    right = left.twinx()
    left.bar([i - width / 2 for i in x], [r.success_rate * 100 for r in rows], width, color="#4c72b0",
             label="success rate (%)")
    right.bar([i + width / 2 for i in x], [r.avg_tokens for r in rows], width, color="#dd8452", label="avg tokens")
    left.axhline(comparison.reference.success * 100, color="#4c72b0", linestyle="--", linewidth=1)
    if comparison.reference.tokens is not None:
        right.axhline(comparison.reference.tokens, color="#dd8452", linestyle="--", linewidth=1)
    labels = [r.name if len(r.name) <= 24 else "…" + r.name[-23:] for r in rows]
    left.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("success rate (%)")
    # Headroom above the bars for the legend, drawn on the right axes, which lie on top.
    left.set_ylim(0, 125)
    left.set_yticks(range(0, 101, 20))
    right.set_ylim(0, 1.25 * max([r.avg_tokens for r in rows] + [comparison.reference.tokens or 0, 1]))
    right.set_ylabel("avg tokens per episode")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    right.legend(handles, [h.get_label() for h in handles], loc="upper center", ncol=2, fontsize=8)
    left.set_title("Baseline comparison (dashed: reference)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
