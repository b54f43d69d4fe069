"""How close `atlas-distill plan` comes to the memory a real run uses on this machine.

Each row trains a few real steps (`TrainingRecipe`, as `atlas-distill train` builds it: builtin teacher, the
named student, the demo traces, off-policy with the exact teacher so every step has the same work, or on-policy
at lmbda 1) in a fresh process, and reads that process's peak RSS over the training steps (VmHWM, reset just
before them), and its RSS before any model loaded. The plan's one-device estimate for the same profile, at the
batch shape the run really had (its longest padded batch; on-policy, its longest prompt and what it generated),
is set beside it.

    python benchmarks/plan_check.py                       # the README's rows
    python benchmarks/plan_check.py --rows 'smollm2-135m@15L,4,256,on,off'   # student,batch,max_length,gc,lora
    python benchmarks/plan_check.py --rows 'smollm2-135m@15L,4,256,on,off,1'  # ... ,lmbda (default 0)

Each row runs twice on a CPU: "live", with `keep_freed_memory` off and every malloc block over 128 KiB mmapped
(freeing one returns it, so RSS follows the live bytes, as a GPU's max_memory_allocated does: what the plan
counts), and "trainer", as `atlas-distill train` runs by default (malloc keeps the blocks a step frees: what the
plan's CPU_RSS_ROOM must cover).

On a GPU (`--device cuda`) each row runs once and its figure is torch.cuda.max_memory_allocated over the
steps, against the plan for one GPU less the CUDA context it adds (which the allocator does not count).

Prints a table and writes JSON (--out). Rows run one after another; nothing else should run meanwhile.
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
from _common import cpu_description, log, peak_rss_mb, reset_peak_rss, status_mb  # noqa: E402

TEACHER = "smollm2-135m"
DEFAULT_ROWS = ("smollm2-135m@15L,4,256,on,off", "smollm2-135m@15L,4,256,off,off", "smollm2-135m@15L,8,512,on,off",
                "smollm2-135m@15L,8,512,off,off", "smollm2-135m,4,512,on,off", "smollm2-135m,4,512,off,off",
                "smollm2-135m,8,512,off,on", "smollm2-135m@8L,16,128,off,off", "smollm2-135m@15L,4,256,on,off,1",
                "smollm2-135m@15L,4,256,off,off,1")
STEPS = 3
# Each allocator's environment and overrides (the module's doc). Under "live" the trainer must not raise malloc's
# thresholds itself (its mallopt call would override the environment's).
LIVE = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
ALLOCATORS = {"live": (LIVE, ["trainer.keep_freed_memory=false"]), "trainer": ({}, [])}


def overrides(row: dict, output_dir: str) -> list[str]:
    """The profile of one row: the demo data with the exact teacher, nothing saved or tracked."""
    return [f"teacher_model_name_or_path={TEACHER}", f"model.model_name_or_path={row['student']}",
            f"trainer.per_device_train_batch_size={row['batch']}", f"trainer.max_length={row['max_length']}",
            f"model.gradient_checkpointing={str(row['gc']).lower()}", f"model.lora.enabled={str(row['lora']).lower()}",
            f"trainer.lmbda={row.get('lmbda', 0)}", "trainer.teacher_cache_topk=0", f"trainer.max_steps={STEPS}",
            "trainer.eval_steps=1000", "trainer.save_steps=1000", "trainer.report_to=[]", "trainer.min_reward=null",
            "data.review_status=null", f"output_dir={output_dir}"]


def measure(row: dict, extra: list[str]) -> dict:
    """One row in this process: RSS with the libraries and data loaded, then the peak over the training steps."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    from atlas_distill.config import load_profile
    from atlas_distill.training import TrainingRecipe

    with tempfile.TemporaryDirectory() as tmp:
        profile = load_profile("default", overrides(row, tmp) + extra)
        recipe = TrainingRecipe(profile, profile_name="default")
        recipe.setup(db_url=None, traces=None, skip_invalid=False, resume=False)
        trainer, shapes, prompts = recipe.trainer, [], []
        step = trainer.training_step

        def recording(model, inputs, num_items_in_batch=None):
            prompts.append(list(inputs["prompts"].shape) if "prompts" in inputs else None)
            loss = step(model, inputs, num_items_in_batch)
            shapes.append(list(inputs["input_ids"].shape))  # on-policy: the generated batch the step trained on
            return loss

        trainer.training_step = recording
        # the steps only: no evaluation or checkpoint at the last step (both are outside what the plan's
        # training phases count; evaluation's generation is its own phase)
        trainer.evaluate = lambda *args, **kwargs: {}
        trainer._save_checkpoint = lambda *args, **kwargs: None
        import torch

        cuda = torch.cuda.is_available()
        loaded = status_mb("VmRSS")
        reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.train()
        figures = {"rss_loaded_mb": round(loaded, 1), "peak_train_mb": round(peak_rss_mb(), 1), "shapes": shapes,
                   "prompts": prompts, "seconds": round(time.perf_counter() - started, 1)}
        if cuda:
            figures |= {"peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                        "gpu": torch.cuda.get_device_name()}
        return figures


def parse_row(text: str) -> dict:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (5, 6):
        raise ValueError(f"{text!r} has {len(parts)} fields")
    student, batch, length, gc, lora, *lmbda = parts
    return {"student": student, "batch": int(batch), "max_length": int(length), "gc": gc == "on", "lora": lora == "on",
            "lmbda": float(lmbda[0]) if lmbda else 0.0}


def predicted(row: dict, measured: dict, device: str = "cpu") -> dict:
    """The plan's one-device estimate at the run's longest padded batch; on-policy, with prompts of the run's
    longest (the plan's generation starts from max_length)."""
    from atlas_distill.config import load_profile
    from atlas_distill.plan import plan_profile

    batch, length = max(measured["shapes"], key=lambda shape: shape[0] * shape[1])
    extra = []
    if row.get("lmbda", 0) > 0:
        longest = max((shape[1] for shape in measured.get("prompts", []) if shape), default=row["max_length"])
        extra = [f"trainer.max_length={longest}"]
    profile = load_profile("default", overrides(row, "unused") + extra)
    plan = plan_profile(profile, device=device, seq_len=length, batch=batch)
    return plan.options[0].to_dict()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=";".join(DEFAULT_ROWS),
                        help="';'-separated rows: student,batch,max_length,gc(on|off),lora(on|off)[,lmbda]")
    parser.add_argument("--out", default="plan_check.json")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: one run per row, peak torch.cuda.max_memory_allocated")
    parser.add_argument("--replan", metavar="JSON", help="Compare the plan again with the measurements in a "
                        "previous --out file (after a change to the plan), without training again. A file from "
                        "before 2026-12-06 has 'live' / 'default' columns, and its 'live' runs were not live (the "
                        "trainer's keep_freed_memory was on).")
    parser.add_argument("--measure-one", help=argparse.SUPPRESS)
    parser.add_argument("--extra", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_one:
        print(json.dumps(measure(json.loads(args.measure_one), args.extra)))
        return 0
    if args.replan:
        previous = json.loads(Path(args.replan).read_text())
        log(f"measured on: {previous['cpu']}")
        results = [compare(row, row["measured"]) for row in previous["rows"]]
        return report(results, previous["cpu"], args.out)
    try:
        rows = [parse_row(text) for text in args.rows.split(";") if text.strip()]
    except ValueError as exc:
        parser.error(f"--rows: {exc}; each row is student,batch,max_length,gc,lora[,lmbda]")
    log(f"CPU: {cpu_description()}")
    results = []
    for row in rows:
        measured = {}
        for allocator, (env, extra) in (ALLOCATORS if args.device == "cpu" else {"cuda": ({}, [])}).items():
            done = subprocess.run([sys.executable, __file__, "--measure-one", json.dumps(row),
                                   *(f"--extra={item}" for item in extra)], capture_output=True,
                                  text=True, check=False, env=os.environ | env)
            if done.returncode != 0:
                log(done.stderr[-3000:])
                return 1
            measured[allocator] = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(compare(row, measured))
    return report(results, cpu_description(), args.out)


def compare(row: dict, measured: dict) -> dict:
    """The row, its measurements and the plan's estimate, with the plan's error against each."""
    from atlas_distill.plan import CUDA_RUNTIME

    row = {key: row.get(key, 0.0) for key in ("student", "batch", "max_length", "gc", "lora", "lmbda")}
    cuda = "cuda" in measured
    first = next(iter(measured.values()))
    plan = predicted(row, first, "cuda" if cuda else "cpu")
    planned = (plan["peak_bytes"] - (CUDA_RUNTIME if cuda else 0)) / 2**20
    figures = {name: m["peak_cuda_mb" if name == "cuda" else "peak_train_mb"] for name, m in measured.items()}
    errors = {name: round(planned / figure - 1, 4) for name, figure in figures.items()}
    shown = ", ".join(f"{name} {figure:,.0f} MB ({errors[name]:+.1%})" for name, figure in figures.items())
    log(f"{row['student']:>18} b{row['batch']} L{row['max_length']} gc {'on ' if row['gc'] else 'off'} "
        f"lora {'on ' if row['lora'] else 'off'} lmbda {row['lmbda']:g} shape {max(first['shapes'])}: "
        f"plan {planned:,.0f} MB ({plan['peak_phase']}); measured {shown}")
    return row | {"measured": measured, "plan": plan, "error": errors}


def report(results: list[dict], cpu: str, out: str) -> int:
    Path(out).write_text(json.dumps({"cpu": cpu, "rows": results}, indent=2))
    for name in results[0]["error"]:
        log(f"worst error against {name}: {max(abs(r['error'][name]) for r in results):.1%} over {len(results)} rows")
    log(f"JSON in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
