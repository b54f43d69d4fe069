"""Run tracking: metrics.jsonl and summary.json in the run directory, and W&B (offline without a key)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..errors import OutputError
from ..outputs import FREE_SPACE_FIX

# Trainer log keys -> the names upstream documents (and W&B shows).
_RENAMES = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
            "eval_loss": "eval/loss", "eval_success_rate": "eval/success_rate", "eval_avg_tokens": "eval/avg_tokens"}
_SKIP = {"total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def prepare_wandb(run_dir: Path, report_to: list[str]) -> list[str]:
    """W&B runs offline when no API key is configured, so a run never needs the network."""
    if "wandb" not in report_to:
        return report_to
    has_key = os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").is_file() and "api.wandb.ai" in (
        Path.home() / ".netrc").read_text(errors="ignore")
    if not has_key:
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    return report_to


def rename(logs: dict[str, Any]) -> dict[str, Any]:
    renamed = {}
    for key, value in logs.items():
        if key in _SKIP or value is None:
            continue
        if key.startswith("eval_") and key not in _RENAMES:
            key = "eval/" + key[len("eval_"):]
        renamed[_RENAMES.get(key, key)] = value
    return renamed


class RunTracker(TrainerCallback):
    """Appends every log to metrics.jsonl (main process only), forwards metrics/* to W&B as such."""

    def __init__(self, run_dir: Path, on_log: Callable[[dict[str, Any]], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.on_log_event = on_log
        self.on_step = on_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.on_step:
            self.on_step(state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **rename(logs)}
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise OutputError(f"Cannot write {self.path}: {exc.strerror}.", fix=FREE_SPACE_FIX) from None
        baseline = {k: v for k, v in record.items() if k.startswith("metrics/")}
        if baseline and "wandb" in (args.report_to or []):
            import wandb

            if wandb.run is not None:
                wandb.log(baseline | {"train/global_step": state.global_step})
        if self.on_log_event:
            self.on_log_event(record)


def rewind_metrics(run_dir: Path, step: int) -> None:
    """Drop the records logged after `step`, the checkpoint a resumed run continues from: they are logged again."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
    tmp = path.with_suffix(".jsonl.partial")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _step_of(line: str) -> float:
    """A record's step; a line cut short by a kill mid-write counts as past every checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")
