"""The records a run writes and others read, one class each: a model's figures on the eval sessions (`Figures`),
the Baseline Comparison (`BaselineSummary`) and a train run's summary (`RunSummary`, summary.json).

`train` writes them, `compare` and `chain` read them, the CLI renders them. The JSON keeps its keys, except that
`meets_all_targets` (always equal to `meets_target`) is no longer written; files that have it still read.
`from_dict` reads what `to_dict` writes, and also older or hand-made summaries that hold only some of it:
`compare` needs only `eval` (runs.py checks it first and names what is wrong).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Figures:
    """A model's figures on the eval sessions: final-answer, per-turn and per-episode success; tokens per episode."""

    success_rate: float
    avg_tokens: float
    step_success_rate: float | None = None
    """Target turns judged right (runs from before multi-turn evaluation have none)."""
    episode_success_rate: float | None = None
    """Sessions whose every target turn is right."""

    def to_dict(self) -> dict[str, Any]:
        return {"success_rate": self.success_rate, "step_success_rate": self.step_success_rate,
                "episode_success_rate": self.episode_success_rate, "avg_tokens": self.avg_tokens}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Figures:
        return cls(success_rate=float(data["success_rate"]), avg_tokens=float(data["avg_tokens"]),
                   step_success_rate=_rate(data.get("step_success_rate")),
                   episode_success_rate=_rate(data.get("episode_success_rate")))


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def figures_problems(figures: Any, where: str = "eval") -> list[str]:
    """What keeps `figures` (a summary's `eval`, `teacher_eval` or `student_before`) from being read; empty when
    it is usable."""
    if not isinstance(figures, dict):
        return [f"`{where}` is missing or not an object (expected {{success_rate, avg_tokens, loss}})"]
    problems = []
    rate, tokens, loss = figures.get("success_rate"), figures.get("avg_tokens"), figures.get("loss")
    if not (is_number(rate) and 0.0 <= rate <= 1.0):
        problems.append(f"`{where}.success_rate` must be a number in [0, 1], got {rate!r}"
                        if "success_rate" in figures else f"`{where}.success_rate` is missing")
    if not (is_number(tokens) and tokens >= 0):
        problems.append(f"`{where}.avg_tokens` must be a non-negative number, got {tokens!r}"
                        if "avg_tokens" in figures else f"`{where}.avg_tokens` is missing")
    if loss is not None and not is_number(loss):
        problems.append(f"`{where}.loss` must be a number or null, got {loss!r}")
    return problems


def _rate(value: Any) -> float | None:
    """A rate from a summary: a number in [0, 1], else none (an older run, or a hand-edited file)."""
    return float(value) if is_number(value) and 0.0 <= value <= 1.0 else None


@dataclass
class BaselineSummary:
    """The Baseline Comparison of one model's figures against a reference (DESIGN §4)."""

    success_rate: float
    avg_tokens: float
    baseline_success: float
    baseline_tokens: float | None
    success_delta: float
    token_reduction_pct: float | None
    """None without a token reference."""
    success_target: float
    token_target: float
    meets_success_target: bool
    meets_token_target: bool | None
    """None without a token reference: then only the success target counts."""
    source: dict[str, str] | None = None
    """Per figure, where the reference came from (`measured` or `profile`); `train` sets it."""

    @property
    def success_delta_pp(self) -> float:
        return self.success_delta * 100

    @property
    def meets_target(self) -> bool:
        return self.meets_success_target and self.meets_token_target is not False

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        data |= {"success_delta_pp": self.success_delta_pp, "meets_target": self.meets_target}
        return data | ({"source": self.source} if self.source is not None else {})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaselineSummary:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class RunSummary:
    """What `train` writes to summary.json when a run ends, and returns."""

    eval: Figures
    """The student after training."""
    eval_loss: float | None = None
    baseline: BaselineSummary | None = None
    teacher_eval: Figures | None = None
    student_before: Figures | None = None
    run_dir: str | None = None
    final_dir: str | None = None
    profile: str | None = None
    teacher: str | None = None
    student: str | None = None
    teacher_parameters: int | None = None
    student_parameters: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    """The data funnel (data.DataStats) and `eval_used`, the eval sessions generated on."""
    steps: int | None = None
    processes: int | None = None
    seconds: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    train_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["eval"] = self.eval.to_dict() | {"loss": self.eval_loss}
        del document["eval_loss"]
        for key in ("teacher_eval", "student_before"):
            document[key] = getattr(self, key).to_dict() if getattr(self, key) else None
        document["baseline"] = self.baseline.to_dict() if self.baseline else None
        return document

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        def figures(key: str) -> Figures | None:
            value = data.get(key)
            return None if figures_problems(value, key) else Figures.from_dict(value)

        baseline = data.get("baseline")
        # a hand-made summary may hold anything under a key: what is not of the expected kind reads as absent
        simple = {name: data[name] for name, kinds in _SIMPLE.items()
                  if isinstance(data.get(name), kinds) and not isinstance(data[name], bool)}
        return cls(eval=Figures.from_dict(data["eval"]), eval_loss=data["eval"].get("loss"),
                   baseline=BaselineSummary.from_dict(baseline) if isinstance(baseline, dict) and _is_baseline(
                       baseline) else None,
                   teacher_eval=figures("teacher_eval"), student_before=figures("student_before"), **simple)


_SIMPLE = {"run_dir": str, "final_dir": str, "profile": str, "teacher": str, "student": str,
           "teacher_parameters": int, "student_parameters": int, "data": dict, "steps": int, "processes": int,
           "seconds": int | float, "timings": dict, "train_loss": int | float}


def _is_baseline(value: dict[str, Any]) -> bool:
    return {f.name for f in fields(BaselineSummary) if f.name != "source"} <= set(value)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _rates(figures: Figures | None) -> str:
    if figures is None:
        return "not measured (the run read a teacher store and did not load the teacher)"
    return (f"{figures.success_rate:.2%} ({_percent(figures.step_success_rate)} / "
            f"{_percent(figures.episode_success_rate)})")


def model_card(summary: RunSummary, *, lmbda: float, beta: float, temperature: float) -> str:
    """final/README.md: what the model is, how it was trained, its figures, how to load it."""
    b, e, loss = summary.baseline, summary.eval, summary.eval_loss
    reduction = "n/a" if b.token_reduction_pct is None else f"{b.token_reduction_pct:.1f}%"
    return (
        f"# {summary.student} distilled from {summary.teacher} with GKD\n\n"
        f"Trained by atlas-distill on Atlas traces ({summary.data['train']} train / "
        f"{summary.data['eval']} eval conversations), {summary.steps} steps, "
        f"lmbda={lmbda}, beta={beta}, temperature={temperature}.\n\n"
        "| metric | value |\n| --- | --- |\n"
        f"| eval/success_rate (final answer) | {e.success_rate:.2%} |\n"
        f"| eval/step_success_rate | {_percent(e.step_success_rate)} |\n"
        f"| eval/episode_success_rate | {_percent(e.episode_success_rate)} |\n"
        f"| eval/avg_tokens (per episode) | {e.avg_tokens:.1f} |\n"
        f"| eval/loss | {loss if loss is None else round(loss, 4)} |\n"
        f"| teacher success_rate (step / episode) | {_rates(summary.teacher_eval)} |\n"
        f"| student before training (step / episode) | {_rates(summary.student_before)} |\n"
        f"| metrics/success_delta | {b.success_delta_pp:+.1f} pp |\n"
        f"| metrics/token_reduction_pct | {reduction} |\n| metrics/meets_target | {b.meets_target} |\n\n"
        "Load it with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` on this folder.\n"
        "The resolved profile is `profile.yaml` here (as `../profile.yaml`); metrics per step are in "
        "`../metrics.jsonl`.\n"
    )
