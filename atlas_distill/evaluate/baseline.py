"""The Baseline Comparison of DESIGN §4: success delta and token reduction against a reference, and upstream's
console lines."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..runs.summary import BaselineSummary, Figures, is_number
from .results import Episode, EvalResult


def _rates(eval_results: Any) -> tuple[float, float]:
    if isinstance(eval_results, EvalResult | Figures):
        eval_results = eval_results.to_dict()
    if isinstance(eval_results, dict):
        def get(key: str) -> Any:  # ours, a metrics.jsonl record, or what transformers' evaluate() returns
            return next((eval_results[k] for k in (key, f"eval/{key}", f"eval_{key}") if k in eval_results), None)

        rate, tokens = get("success_rate"), get("avg_tokens")
        if get("count") == 0:
            raise ValueError("The eval results are empty (count 0).")
        if rate is None or tokens is None:
            raise ValueError("Eval results need `success_rate` and `avg_tokens` (or `eval/success_rate` or "
                             "`eval_success_rate`, as trainer.evaluate() returns them, ...).")
        return float(rate), float(tokens)
    episodes = [asdict(e) if isinstance(e, Episode) else e for e in eval_results]
    if not episodes:
        raise ValueError("The eval results are empty: no episodes.")
    return (sum(bool(e["success"]) for e in episodes) / len(episodes),
            sum(e["tokens"] for e in episodes) / len(episodes))


def baseline_summary(eval_results, baseline_success: float, baseline_tokens: float | None = None, *,
                     success_target: float = 0.10, token_target: float = 30.0) -> BaselineSummary:
    """The Baseline Comparison: success delta, token reduction (%), which targets are met."""
    if not (is_number(baseline_success) and 0.0 <= baseline_success <= 1.0):
        raise ValueError(f"`baseline_success` must be a number in [0, 1] (resolve `auto` first); "
                         f"got {baseline_success!r}.")
    if baseline_tokens is not None and not (is_number(baseline_tokens) and baseline_tokens >= 0):
        raise ValueError(f"`baseline_tokens` must be a non-negative number or None (resolve `auto` first); "
                         f"got {baseline_tokens!r}.")
    success_rate, avg_tokens = _rates(eval_results)
    delta = success_rate - baseline_success
    reduction = (baseline_tokens - avg_tokens) / baseline_tokens * 100 if baseline_tokens else None
    # A small tolerance so that e.g. 0.85 - 0.75 (0.0999...98 in floats) meets a 0.10 target.
    return BaselineSummary(
        success_rate=success_rate, avg_tokens=avg_tokens, baseline_success=float(baseline_success),
        baseline_tokens=None if baseline_tokens is None else float(baseline_tokens), success_delta=delta,
        token_reduction_pct=reduction, success_target=success_target, token_target=token_target,
        meets_success_target=delta >= success_target - 1e-9,
        meets_token_target=None if reduction is None else reduction >= token_target - 1e-9)


def compute_baseline_summary(eval_results, baseline_success: float, baseline_tokens: float | None = None, *,
                             success_target: float = 0.10, token_target: float = 30.0) -> dict[str, Any]:
    """Upstream's API: `baseline_summary` as a dict, with upstream's `meets_all_targets` beside `meets_target`."""
    summary = baseline_summary(eval_results, baseline_success, baseline_tokens, success_target=success_target,
                               token_target=token_target)
    return summary.to_dict() | {"meets_all_targets": summary.meets_target}


def format_baseline_line(summary: BaselineSummary) -> str:
    """`✅ Baseline Comparison targets MET: success delta=12.3 pp, token reduction=35.2%` (as upstream)."""
    head = "✅ Baseline Comparison targets MET" if summary.meets_target else "❌ Baseline Comparison targets NOT met"
    line = f"{head}: success delta={summary.success_delta_pp:.1f} pp"
    if summary.token_reduction_pct is not None:
        line += f", token reduction={summary.token_reduction_pct:.1f}%"
    return line


def format_reference_line(baseline_success: float, baseline_tokens: float | None) -> str:
    """`Starting GKD training with Baseline Comparison reference: success=75.00%, tokens=1200`."""
    if baseline_tokens is None:
        tokens = "n/a"
    else:
        tokens = f"{int(baseline_tokens)}" if float(baseline_tokens).is_integer() else f"{baseline_tokens:.1f}"
    return f"Starting GKD training with Baseline Comparison reference: success={baseline_success:.2%}, tokens={tokens}"
