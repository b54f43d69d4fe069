"""Where a GKD step's time goes: AtlasGKDTrainer against TRL's DistillationTrainer, phase by phase (issue 15).

    python benchmarks/step_profile.py [--steps 6] [--gc on|off] [--trainers trl-distillation,atlas] [--precision auto]
                                      [--data task|conversation] [--ours KEY=VALUE] [--json]

The setup is train_bench.py's at lmbda 1 (fully on-policy, the only mode DistillationTrainer has). Each trainer
runs in its own subprocess, ours on batches picked at random from its epoch (as in train_bench.py); the phases are
timed by wrapping the functions that do them (wall clock; on a CPU every op is synchronous): generation, the teacher's
forward, the student's forward, the divergence (forward; ours and DT's take its gradient there too), backward, the
optimizer step, and the rest of the step. Figures are the means over the steps after the first. It also times one
matmul of the step's main shape ([tokens, hidden] x [hidden, intermediate]) in the step's dtype: the machine's
limit, against which the step's achieved FLOP/s (2 x non-embedding parameters x tokens per forward, x3 with
backward, plus the lm_head over the completion positions) is set. `--precision` as train_bench.py's (auto: fp32
on a CPU, ours' bf16 autocast on a GPU with native bf16); the matmul is timed in bf16 when any trainer ran under
autocast. The arithmetic counted is DT's step's without checkpointing for both (checkpointing adds a recompute, not counted): with
`prefill_once` ours runs generation's prompt forward as part of its training forward, and with `replay_generation`
its checkpointed training forward runs no layer, so it does less than that.
`--ours KEY=VALUE` (repeatable) sets one of ours' settings, as in train_bench.py. `--data conversation` profiles
train_bench.py's multi-turn row (ours samples one recorded action of each conversation, DT the final answer after the
whole conversation); its arithmetic is counted over each example's whole conversation, DT's prompt, so ours' achieved
GFLOP/s there is an upper bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _common import cpu_description, log, peak_rss_mb, reset_peak_rss
from train_bench import (BATCH, SETTINGS, _config, _datasets, _models, bf16_for, build_trainer, parse_ours,
                         random_batches, teacher_dtype_for)

PHASES = ("generation", "teacher_forward", "student_forward", "divergence", "backward", "optimizer", "other")


class Clock:
    """Wall time per phase, per optimizer step; nested phases are charged to the innermost only. Also the peak
    RSS per phase: the process's high-water mark is read when a phase ends and then reset, so a phase's figure
    is the peak since the previous phase ended (what runs between two phases is charged to the later one)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []
        self.peaks: dict[str, float] = defaultdict(float)
        self.tracks_peaks = reset_peak_rss()

    def peak_reached(self, phase: str) -> None:
        if self.tracks_peaks:
            self.peaks[phase] = max(self.peaks[phase], peak_rss_mb())
            reset_peak_rss()

    def wrap(self, owner, name: str, phase_of):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            phase = phase_of(*args, **kwargs) if callable(phase_of) else phase_of
            started = time.perf_counter()
            self.stack.append([phase, 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.perf_counter() - started
                self.peak_reached(phase)
                _, inner = self.stack.pop()
                self.current[phase] += spent - inner
                if self.stack:
                    self.stack[-1][1] += spent

        setattr(owner, name, timed)

    def step_done(self, total: float) -> None:
        self.current["other"] = total - sum(self.current.values())
        self.steps.append(dict(self.current))
        self.current = defaultdict(float)


def _teacher_or_student(*args, **kwargs) -> str:
    """The phase of a backbone forward: the student's runs with autograd on, the teacher's without."""
    import torch

    return "student_forward" if torch.is_grad_enabled() else "teacher_forward"


def worker(name: str, steps: int, gc: bool, bf16: bool, teacher_setting: str, ours: dict, data: str = "task") -> dict:
    import torch
    from transformers import TrainerCallback

    from atlas_distill.gkd import divergence, prompt_pass, replay
    from atlas_distill.models import upcast

    tokenizer, teacher, student = _models(teacher_dtype_for(name, teacher_setting))
    train, _held_out = _datasets(tokenizer, data)
    clock = Clock()
    started: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            started.append(time.perf_counter())

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            started.append(time.perf_counter())

        def on_optimizer_step(self, args, state, control, **kwargs):
            clock.current["optimizer"] += time.perf_counter() - started.pop()
            clock.peak_reached("optimizer")

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done(time.perf_counter() - started.pop())
            log(f"  [{name}] step {state.global_step}/{steps}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in clock.steps[-1].items()))

    with tempfile.TemporaryDirectory() as tmp:
        common = {"model": student, "teacher_model": teacher, "train_dataset": train, "processing_class": tokenizer,
                  "callbacks": [StepClock()],
                  "args": _config(tmp, steps, gc, 1.0, SETTINGS["seed"], bf16, **(ours if name == "atlas" else {}))}
        trainer = build_trainer(name, common, tmp, steps, gc, SETTINGS["seed"], bf16)
        if name == "trl-distillation":
            import trl.trainer.distillation_trainer as module

            clock.wrap(trainer, "_generate", "generation")
            clock.wrap(trainer, "_get_last_hidden_state", _teacher_or_student)
            clock.wrap(module, "_chunked_divergence_loss", "divergence")
        else:
            clock.wrap(trainer, "_generate_into", "generation")
            clock.wrap(divergence, "completion_hidden", _teacher_or_student)
            # prefill_once: the student's forward in two parts, the prompt's before generation
            clock.wrap(prompt_pass, "run", "student_forward")
            clock.wrap(prompt_pass, "completion_hidden", "student_forward")
            # replay_generation: the training forward's layers replayed from generation's recording
            clock.wrap(replay, "completion_hidden", "student_forward")
            clock.wrap(divergence, "chunked_divergence", "divergence")
        clock.wrap(trainer.accelerator, "backward", "backward")
        if name == "atlas":  # as in train_bench.py: random batches of its epoch, not the epoch's longest first
            random_batches(trainer, steps, SETTINGS["seed"])
        trainer.train()
    overall = max(peak_rss_mb(), *clock.peaks.values())
    timed = clock.steps[1:] or clock.steps
    phases = {phase: round(sum(s.get(phase, 0.0) for s in timed) / len(timed), 3) for phase in PHASES}
    return {"trainer": name, "gradient_checkpointing": gc, "bf16": bf16, "steps": steps,
            "s_per_step": round(sum(phases.values()), 3), "phases": phases, "peak_rss_mb": round(overall, 1),
            "phase_peak_rss_mb": {phase: round(mb) for phase, mb in clock.peaks.items()},
            "tokens": _step_tokens(train, tokenizer), "dtype": str(torch.bfloat16 if bf16 else torch.float32),
            "teacher_dtype": "bfloat16-in-float32" if upcast.compute_dtype(teacher) else str(teacher.dtype)}


def _step_tokens(train, tokenizer) -> int:
    """Mean tokens per step: BATCH conversations' prompts plus max_new_tokens each (the on-policy sequence)."""
    lengths = [int(n) for n in train["length"][:200]]
    return round(BATCH * (sum(lengths) / len(lengths)))


def matmul_limit(tokens: int, bf16: bool) -> dict:
    """GFLOP/s of the step's largest matmul shape, [tokens, hidden] x [hidden, intermediate], in the step's dtype."""
    import torch

    from atlas_distill.models.builtin import builtin_model_dir
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(builtin_model_dir())
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(tokens, config.hidden_size, dtype=dtype)
    b = torch.randn(config.hidden_size, config.intermediate_size, dtype=dtype)
    for _ in range(3):
        a @ b
    runs, started = 20, time.perf_counter()
    for _ in range(runs):
        a @ b
    seconds = (time.perf_counter() - started) / runs
    flops = 2 * tokens * config.hidden_size * config.intermediate_size
    return {"shape": f"[{tokens}, {config.hidden_size}] x [{config.hidden_size}, {config.intermediate_size}]",
            "dtype": str(dtype), "gflops": round(flops / seconds / 1e9, 1)}


def step_gflop(tokens: int, completion: int) -> float:
    """The step's arithmetic by parameter count: teacher forward, student forward + backward (x3), generation
    (student forward over prompt + new tokens), lm_heads over the completion positions (both models, x3 student)."""
    from transformers import AutoConfig

    from atlas_distill.models.builtin import builtin_model_dir

    config = AutoConfig.from_pretrained(builtin_model_dir())
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i  # q, o, k, v, gate/up/down
    teacher, student = per_layer * layers, per_layer * ((layers + 1) // 2)
    flops = 2 * tokens * (teacher + 3 * student + student) + 2 * completion * h * v * (1 + 3)
    return flops / 1e9


def run_child(name: str, steps: int, gc: bool, precision: str, teacher_setting: str, ours: list[str],
              data: str = "task") -> dict:
    command = [sys.executable, __file__, "--worker", name, "--steps", str(steps), "--gc", "on" if gc else "off",
               "--teacher-dtype", teacher_setting, "--precision", precision, "--data", data,
               *(f"--ours={pair}" for pair in ours)]
    log(f"profiling {name}, gradient checkpointing {'on' if gc else 'off'}, {steps} steps")
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {name} worker failed (exit {done.returncode}); its stderr is above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--gc", choices=["on", "off"], default="off")
    parser.add_argument("--trainers", default="trl-distillation,atlas")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: ours as `atlas-distill train` picks it (fp32 on a CPU), TRL's fp32; "
                        "fp32 / bf16: both trainers so")
    parser.add_argument("--teacher-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: ours as `atlas-distill train` loads it (bf16, computed in fp32 on a CPU without "
                        "native bf16), TRL's fp32")
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                        help="one of ours' settings (GKDConfig), e.g. prefill_once=false; repeatable")
    parser.add_argument("--data", choices=["task", "conversation"], default="task",
                        help="as train_bench.py's: task prompt -> final answer, or the multi-turn episodes")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ours = parse_ours(args.ours)  # a malformed pair or an unknown key stops here, before any model loads
    if args.worker:
        with contextlib.redirect_stdout(sys.stderr):
            row = worker(args.worker, args.steps, args.gc == "on", bf16_for(args.worker, args.precision),
                         args.teacher_dtype, ours, args.data)
        print(json.dumps(row), flush=True)
        return
    rows = [run_child(name, args.steps, args.gc == "on", args.precision, args.teacher_dtype, args.ours, args.data)
            for name in args.trainers.split(",")]
    tokens = rows[0]["tokens"]
    limit = matmul_limit(tokens, any(row["bf16"] for row in rows))
    gflop = step_gflop(tokens, BATCH * SETTINGS["max_new_tokens"])
    for row in rows:
        row["step_gflop"] = round(gflop, 1)
        row["achieved_gflops"] = round(gflop / row["s_per_step"], 1)
        row["matmul_limit"] = limit
        row["cpu"] = cpu_description()
    if args.json:
        print(json.dumps(rows))
        return
    print(f"CPU: {rows[0]['cpu']}; matmul {limit['shape']} {limit['dtype']}: {limit['gflops']} GFLOP/s")
    print("| phase | " + " | ".join(f"{row['trainer']} ({'bf16' if row['bf16'] else 'fp32'})" for row in rows) + " |")
    print("| --- |" + " ---: |" * len(rows))
    for phase in (*PHASES, "s_per_step"):
        values = [row["phases"][phase] if phase != "s_per_step" else row["s_per_step"] for row in rows]
        print(f"| {phase} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    print("| achieved GFLOP/s | " + " | ".join(f"{row['achieved_gflops']}" for row in rows) + " |")
    print("| peak RSS MB | " + " | ".join(f"{row['peak_rss_mb']:.0f}" for row in rows) + " |")
    for phase in PHASES[:-1]:
        print(f"| peak RSS MB up to the end of {phase} | "
              + " | ".join(f"{row['phase_peak_rss_mb'].get(phase, 0)}" for row in rows) + " |")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
