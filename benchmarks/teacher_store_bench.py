"""The teacher store (issue 16) against the live teacher: its size per position, its build time against one teacher
epoch, and off-policy training speed and peak memory with and without it.

Setup, as `atlas-distill train` builds it (`TrainingRecipe`): the builtin SmolLM2-135M teacher (bf16 where the CPU
has native bf16, as `teacher_dtype: auto`), its 15-layer pruned copy as the student (fp32), the bundled demo
traces (every session, every target turn), batch 4, max_length 512, lmbda 0 (every step off-policy), gradient
checkpointing off, the in-memory teacher cache off (so the live run runs the teacher at every step, as in a first
epoch).

1. `build`: `teacher-store build`'s library call over the profile's conversations at k (default 512); its wall time
   and the teacher's share of it.
2. `teacher epoch`: the same teacher's forward passes over the same conversations in training batches (4, grouped
   by length): what one off-policy epoch spends in the teacher when it runs live.
3. `train`: each of {live teacher, store} in a fresh process, STEPS steps; s/step = mean of steps 2..STEPS, peak RSS
   (VmHWM) over the whole process (setup included: the store run never loads the teacher) and over the steps.

    python benchmarks/teacher_store_bench.py [--k 512] [--steps 8] [--out teacher_store_bench.json]

Nothing else should run meanwhile (two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_description, log, peak_rss_mb, reset_peak_rss  # noqa: E402

OVERRIDES = ["teacher_model_name_or_path=smollm2-135m", "model.model_name_or_path=smollm2-135m@15L",
             "trainer.per_device_train_batch_size=4", "trainer.max_length=512", "model.gradient_checkpointing=false",
             "trainer.lmbda=0", "trainer.teacher_cache_topk=0", "trainer.eval_steps=1000", "trainer.save_steps=1000",
             "trainer.report_to=[]", "trainer.min_reward=null", "data.review_status=null"]


def profile(*extra: str):
    from atlas_distill.config import load_profile

    return load_profile("default", [*OVERRIDES, *extra])


def build(out: Path, k: int) -> dict:
    from atlas_distill.teacher_store.recipe import build_for_profile

    result = build_for_profile(profile(), out, k=k)
    return {"examples": result.examples, "positions": result.positions, "bytes": result.bytes,
            "bytes_per_position": round(result.bytes / result.positions, 1), "k": k,
            "build_seconds": result.seconds, "build_teacher_seconds": result.teacher_seconds}


def teacher_epoch() -> float:
    """Seconds of the teacher's forward passes (completion hidden states, as the chunked loss runs it) over every
    conversation of the profile, in training batches of 4 grouped by length."""
    import torch

    from atlas_distill import models
    from atlas_distill.data import prepare_for_profile
    from atlas_distill.demo import DEMO_TRACES
    from atlas_distill.gkd import divergence
    from atlas_distill.gkd.collator import TargetSpanCollator

    config = profile()
    teacher_path = models.materialize(models.resolve_model_spec(config.teacher_model_name_or_path))
    tokenizer = models.load_tokenizer(models.materialize(models.resolve_model_spec(config.model.model_name_or_path)))
    prepared = prepare_for_profile(config, traces=str(DEMO_TRACES), tokenizer=tokenizer)
    rows = sorted(prepared.train + prepared.eval, key=lambda row: row["length"])
    teacher = models.load_teacher(teacher_path).eval()
    collator = TargetSpanCollator(tokenizer, config.trainer.max_length)
    seconds = 0.0
    for start in range(0, len(rows), 4):
        batch = collator(rows[start:start + 4])
        mask = batch["labels"][:, 1:] != -100
        began = time.perf_counter()
        with torch.inference_mode():
            divergence.completion_hidden(teacher, batch, mask)
        seconds += time.perf_counter() - began
    return round(seconds, 2)


def train_one(store: str | None, steps: int) -> dict:
    """One run in this process: setup, then `steps` off-policy steps; no evaluation, no checkpoint."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    from atlas_distill.training import TrainingRecipe

    with tempfile.TemporaryDirectory() as tmp:
        extra = [f"trainer.max_steps={steps}", f"output_dir={tmp}"] + ([f"trainer.teacher_store={store}"] if store
                                                                      else [])
        recipe = TrainingRecipe(profile(*extra), profile_name="default")
        recipe.setup(db_url=None, traces=None, skip_invalid=False, resume=False)
        trainer = recipe.trainer
        trainer.evaluate = lambda *args, **kwargs: {}
        trainer._save_checkpoint = lambda *args, **kwargs: None
        times, step = [], trainer.training_step

        def timed(model, inputs, num_items_in_batch=None):
            began = time.perf_counter()
            loss = step(model, inputs, num_items_in_batch)
            times.append(time.perf_counter() - began)
            return loss

        trainer.training_step = timed
        setup_peak = peak_rss_mb()
        reset_peak_rss()
        trainer.train()
        later = times[1:]
        return {"store": store is not None, "teacher_loaded": trainer.teacher_loaded,
                "s_per_step": round(sum(later) / len(later), 3), "step_seconds": [round(t, 3) for t in times],
                "peak_rss_process_mb": round(max(setup_peak, peak_rss_mb()), 1),
                "peak_rss_steps_mb": round(peak_rss_mb(), 1),
                "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="teacher_store_bench.json")
    parser.add_argument("--train-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_one is not None:
        print(json.dumps(train_one(args.train_one or None, args.steps)))
        return 0
    os.environ.setdefault("WANDB_MODE", "disabled")
    log(f"CPU: {cpu_description()}")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        figures = build(store, args.k)
        log(f"store: {figures}")
        figures["teacher_epoch_seconds"] = teacher_epoch()
        figures["build_vs_teacher_epoch"] = round(figures["build_seconds"] / figures["teacher_epoch_seconds"], 2)
        log(f"one teacher epoch {figures['teacher_epoch_seconds']} s; build / epoch "
            f"{figures['build_vs_teacher_epoch']}x")
        runs = {}
        for name, path in (("live", ""), ("store", str(store))):
            done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--train-one", path],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                log(done.stderr[-3000:])
                return 1
            runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
            log(f"{name}: {runs[name]}")
    live, stored = runs["live"], runs["store"]
    figures |= {"runs": runs, "speedup": round(live["s_per_step"] / stored["s_per_step"], 2),
                "peak_ratio_process": round(stored["peak_rss_process_mb"] / live["peak_rss_process_mb"], 3),
                "peak_ratio_steps": round(stored["peak_rss_steps_mb"] / live["peak_rss_steps_mb"], 3),
                "cpu": cpu_description()}
    log(f"store vs live teacher: {figures['speedup']}x steps/s; peak RSS {figures['peak_ratio_process']}x (process), "
        f"{figures['peak_ratio_steps']}x (steps)")
    Path(args.out).write_text(json.dumps(figures, indent=2))
    log(f"JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
