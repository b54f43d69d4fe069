"""The three trainers on a GPU (issue 15): TRL's legacy GKDTrainer, TRL's stable DistillationTrainer, AtlasGKDTrainer.

    python benchmarks/gpu_bench.py [--device cuda|cpu] [--steps 6] [--batch 16] [--gc on|off|both] [--json] [--out F]
    python benchmarks/gpu_bench.py --device cpu --steps 2 --batch 2 --max-new-tokens 4 --student-layers 2 \\
        --dtype float32          # what the test runs: every trainer, on the CPU, in a minute

The setup of train_bench.py scaled to a GPU: the builtin SmolLM2-135M-Instruct as the teacher and, at full depth (all
30 layers; `--student-layers N` keeps N evenly spaced ones), as the student; batch 16, lmbda 1 (fully on-policy, the
only mode DistillationTrainer has), max_new_tokens 32, beta 0.5, temperature 0.9, lr 1e-5, seed 42; bf16 mixed
precision for all three (fp32 master weights under bf16 autocast, the teacher's weights in bf16; `--dtype float32`
for fp32 throughout), sdpa attention (transformers' default; each row records what the model used). Each trainer
runs in its own process, ours on batches picked at random from its epoch (TRL's samplers shuffle; train_bench.py's
`random_batches`); s/step is the mean over the steps after the first (the GPU is synchronised at every step end),
peak memory is `torch.cuda.max_memory_allocated` on a GPU and the process's VmHWM on a CPU.

`--json` prints one JSON list of rows {trainer, device, device_name, dtype, gradient_checkpointing, batch, steps,
s_per_step, sequences_per_s, peak_memory_mb, memory, attn_implementation, final_loss}; `--out FILE` also writes it.
Exit 1 when a trainer's run fails (its stderr is shown), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import cpu_description, log, peak_rss_mb
from train_bench import ANCHORS, SETTINGS, _config, _datasets, _models, against_ours, timed_run

TRAINERS = (*ANCHORS, "atlas")


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else cpu_description()


def worker(name: str, opts: argparse.Namespace) -> dict:
    """Child process: one trainer's run on opts.device; its timings, peak memory and last loss."""
    import torch

    cuda = opts.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch here; use --device cpu")
    bf16 = opts.dtype == "bfloat16"
    tokenizer, teacher, student = _models(opts.dtype, student_layers=opts.student_layers)
    train, _held_out = _datasets(tokenizer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        args = _config(tmp, opts.steps, opts.gc, 1.0, SETTINGS["seed"], bf16, batch=opts.batch,
                       max_new_tokens=opts.max_new_tokens)
        common = {"model": student, "teacher_model": teacher, "args": args, "train_dataset": train,
                  "processing_class": tokenizer}
        s_per_step, losses = timed_run(name, common, tmp, opts.steps, opts.gc, SETTINGS["seed"], bf16,
                                       label=name, synchronize=torch.cuda.synchronize if cuda else None,
                                       batch=opts.batch, max_new_tokens=opts.max_new_tokens)
    memory = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    return {"trainer": name, "device": opts.device, "device_name": _device_name(opts.device), "dtype": opts.dtype,
            "gradient_checkpointing": opts.gc, "batch": opts.batch, "steps": opts.steps,
            "s_per_step": round(s_per_step, 4), "sequences_per_s": round(opts.batch / s_per_step, 2),
            "peak_memory_mb": round(memory, 1), "memory": "cuda max_memory_allocated" if cuda else "VmHWM",
            "attn_implementation": student.config._attn_implementation,
            "final_loss": round(losses[-1], 5) if losses else None}


def run_child(name: str, opts: argparse.Namespace, gc: bool) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--device", opts.device, "--steps", str(opts.steps),
               "--batch", str(opts.batch), "--max-new-tokens", str(opts.max_new_tokens), "--dtype", opts.dtype,
               "--gc", "on" if gc else "off"]
    command += ["--student-layers", str(opts.student_layers)] if opts.student_layers else []
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if opts.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU run stays on the CPU on a GPU host too
    log(f"running {name} on {opts.device}, {opts.dtype}, gradient checkpointing {'on' if gc else 'off'}, "
        f"batch {opts.batch}, {opts.steps} steps")
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        log(f"the {name} run failed (exit {done.returncode}); its stderr is above")
        raise SystemExit(1)
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio_table(rows: list[dict]) -> str:
    """Per gradient-checkpointing setting: each trainer's s/step and peak memory, ours against each anchor."""
    lines = [f"{rows[0]['device_name']}, {rows[0]['dtype']}, batch {rows[0]['batch']}, memory: {rows[0]['memory']}",
             "| gc | trainer | s/step | sequences/s | ours' speed-up | peak memory MB | ours' memory ratio |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for gc in dict.fromkeys(row["gradient_checkpointing"] for row in rows):
        here = {row["trainer"]: row for row in rows if row["gradient_checkpointing"] == gc}
        ours = here.get("atlas")
        for name, row in here.items():
            speed, memory = against_ours(row, ours, "peak_memory_mb")
            lines.append(f"| {'on' if gc else 'off'} | {name} | {row['s_per_step']:.3f} | {row['sequences_per_s']} "
                         f"| {speed} | {row['peak_memory_mb']:.0f} | {memory} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=SETTINGS["max_new_tokens"])
    parser.add_argument("--student-layers", type=int, help="keep this many evenly spaced layers (default: all 30)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="bfloat16: bf16 autocast over fp32 master weights and a bf16 teacher, for all three")
    parser.add_argument("--gc", choices=["on", "off", "both"], default="both")
    parser.add_argument("--trainers", default=",".join(TRAINERS))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the JSON rows here")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    unknown = sorted(set(opts.trainers.split(",")) - set(TRAINERS))
    if unknown or opts.steps < 1 or opts.batch < 1 or opts.max_new_tokens < 1:
        parser.error(f"--trainers takes {', '.join(TRAINERS)}; --steps, --batch and --max-new-tokens at least 1"
                     + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    if opts.worker:
        opts.gc = opts.gc == "on"
        with contextlib.redirect_stdout(sys.stderr):
            row = worker(opts.worker, opts)
        print(json.dumps(row), flush=True)
        return
    gcs = {"on": [True], "off": [False], "both": [True, False]}[opts.gc]
    rows = [run_child(name, opts, gc) for gc in gcs for name in opts.trainers.split(",")]
    if opts.out:
        opts.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows) if opts.json else ratio_table(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
