"""GKD step benchmark: TRL's GKDTrainer against AtlasGKDTrainer on the identical setup.

Setup (issue 5): teacher = the builtin SmolLM2-135M-Instruct in fp32; student = a copy of it keeping its
15 even-numbered decoder layers (0, 2, ..., 28); the bundled demo CRM traces (task prompts of 148-203
tokens, reference answers of 44-55); batch 4, max_new_tokens 32, beta 0.5, temperature 0.9, lr 1e-5,
seed 42. Precision (`--precision`): auto, each trainer as it trains best here: ours as `atlas-distill train`
sets it (model.dtype auto: bf16 autocast on a GPU with native bf16, else fp32, on every CPU; fp32 master
weights either way), TRL's in fp32 (TRL's configs default to bf16 autocast, which on a CPU without native bf16
made TRL's step 7x slower, and on an AMX CPU made DistillationTrainer's step slower, not faster); fp32 or bf16
(autocast) sets it for every trainer. For
every (gradient checkpointing, lmbda) asked for, each trainer runs `--steps` steps in a fresh
subprocess, so its peak RSS (VmHWM) is its own; s/step is the mean wall time of the steps after the
first (the first pays one-off costs: allocator warm-up, the optimizer state). Each trainer's steps are a random
sample of its first epoch's batches (`--batches random`, the default): TRL's samplers shuffle the rows, and ours'
steps are batches picked at random from its epoch, since its length-grouped sampler puts the epoch's longest batch
first (`--batches first` times those, as the runs before the thirteenth session did).

    python benchmarks/train_bench.py [--steps 6] [--gc on|off|both] [--lmbda 0,0.5,1] [--precision auto] [--json]
                                     [--data task|conversation] [--batches random|first]
    python benchmarks/train_bench.py --learning 30 --gc off --lmbda 0.5 --seeds 42,1,2
        # 30 steps of each trainer per training seed, then both students' held-out loss

--json prints one JSON list of rows {trainer, gradient_checkpointing, lmbda, steps, s_per_step, peak_rss_mb,
final_loss, seed, teacher_dtype, data, batches, bf16} on stdout (--learning rows add heldout_loss_before,
heldout_loss_after and losses); progress goes to stderr. Without it, a table with the ratios.
`--alternate SETTING` switches one of ours' boolean settings on and off step by step in ours' runs and reports
both medians (from one run, so the machine's drift between runs does not enter the comparison).
`--atlas-off` runs ours with all its speedups switched off (a check that the switches work); `--ours KEY=VALUE`
(repeatable) sets one of ours' settings, e.g. `--ours keep_freed_memory=false`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import log, peak_rss_mb  # benchmarks/ is sys.path[0] when a script runs

BATCH = 4
SETTINGS = {"max_new_tokens": 32, "beta": 0.5, "temperature": 0.9, "learning_rate": 1e-5, "seed": 42,
            "max_length": 512}


def _models(teacher_dtype: str = "float32", student_layers: int | None = 15):
    """The tokenizer, the teacher in `teacher_dtype` and the fp32 student: `student_layers` evenly spaced layers of
    the builtin's 30 (15: the even-numbered ones, 0, 2, ..., 28), all of them when None."""
    import torch

    from atlas_distill.models.builtin import builtin_model_dir, builtin_tokenizer_dir
    from atlas_distill.models import load_model, load_tokenizer
    from atlas_distill.models.pruning import prune_layers

    torch.manual_seed(SETTINGS["seed"])
    tokenizer = load_tokenizer(str(builtin_tokenizer_dir()))
    teacher = _teacher(teacher_dtype)
    student = load_model(str(builtin_model_dir()), dtype="float32", for_training=True)
    depth = student.config.num_hidden_layers
    if student_layers is not None and student_layers < depth:
        prune_layers(student, list(range(0, depth, depth // student_layers))[:student_layers])
    return tokenizer, teacher, student


def _teacher(dtype: str):
    """The builtin SmolLM2-135M-Instruct, frozen, in `dtype`; auto: as `atlas-distill train` loads it
    (models.load_teacher)."""
    from atlas_distill.models import load_model, load_teacher
    from atlas_distill.models.builtin import builtin_model_dir

    if dtype == "auto":
        return load_teacher(str(builtin_model_dir()))
    return load_model(str(builtin_model_dir()), dtype=dtype)


def _datasets(tokenizer, data: str = "task"):
    """(train, held-out) of the bundled demo traces. data "task": each session as its task prompt and final answer;
    "conversation": the whole multi-turn episode, every action of the agent and the final answer a target."""
    from atlas_distill.data import build_gkd_dataset
    from atlas_distill.demo import DEMO_TRACES

    return build_gkd_dataset(traces=str(DEMO_TRACES), min_reward=None, prompt=data, tokenizer=tokenizer,
                             max_length=SETTINGS["max_length"], seed=SETTINGS["seed"])


def _config(output_dir: str, steps: int, gc: bool, lmbda: float, seed: int, bf16: bool, *, batch: int = BATCH,
            max_new_tokens: int = SETTINGS["max_new_tokens"], **ours):
    import torch

    from atlas_distill.gkd import GKDConfig

    return GKDConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch, lmbda=lmbda,
        beta=SETTINGS["beta"], temperature=SETTINGS["temperature"], max_new_tokens=max_new_tokens,
        learning_rate=SETTINGS["learning_rate"], seed=seed, max_length=SETTINGS["max_length"],
        gradient_checkpointing=gc, bf16=bf16, logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, **ours)


def heldout_loss(student, teacher, tokenizer, rows, temperature: float, beta: float) -> float:
    """The generalized JSD (TRL's formula, at `temperature`) on the reference answers of held-out sessions."""
    import torch
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=SETTINGS["max_length"])
    total, count = 0.0, 0
    student.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), BATCH):
            batch = collator([{"messages": m} for m in rows[start:start + BATCH]])
            s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            n = int((labels != -100).sum())
            loss = GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels=labels, beta=beta,
                                                   temperature=temperature)
            total, count = total + float(loss) * n, count + n
    return total / count


def topk_error(ks: list[int], sessions: int = 32, bits: tuple[int, ...] = (32,)) -> list[dict]:
    """The top-k cache's error: exact vs folded generalized JSD of the untrained student on held-out answers, with
    the teacher's k log-probs stored in `bits` each (32: fp32; 16: fp16; 8: the teacher store's records), and what
    a position then costs in bytes."""
    import torch
    from trl.experimental.utils import DataCollatorForChatML

    from atlas_distill.gkd import divergence

    tokenizer, teacher, student = _models()
    _train, held_out = _datasets(tokenizer)
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=SETTINGS["max_length"])
    beta, temperature, vocab = SETTINGS["beta"], SETTINGS["temperature"], len(tokenizer)
    exact, folded = [], {(k, b): [] for k in ks for b in bits}
    sizes = dict.fromkeys(folded, 0)
    with torch.inference_mode():
        for start in range(0, sessions, BATCH):
            batch = collator([{"messages": m} for m in held_out["messages"][start:start + BATCH]])
            mask = batch["labels"][:, 1:] != -100
            h_s = divergence.completion_hidden(student, batch, mask)
            h_t = divergence.completion_hidden(teacher, batch, mask)
            exact.append(divergence.chunked_divergence(h_s, h_t, student, teacher, vocab=vocab, beta=beta,
                                                       temperature=temperature))
            for k in ks:
                indices, values, tail = divergence.teacher_topk(h_t, teacher, vocab=vocab, k=k, temperature=temperature)
                for b in bits:
                    stored_indices, stored, stored_tail, size = _stored(indices, values, tail, b, vocab)
                    sizes[k, b] += size
                    folded[k, b].append(divergence.topk_divergence(
                        h_s, student, vocab=vocab, beta=beta, temperature=temperature, indices=stored_indices,
                        teacher_values=stored, teacher_tail=stored_tail))
    exact_mean = float(torch.cat(exact).mean())
    positions = sum(len(part) for part in exact)
    rows = []
    for (k, b), parts in folded.items():
        mean = float(torch.cat(parts).mean())
        rows.append({"k": k, "bits": b, "bytes_per_token": round(sizes[k, b] / positions),
                     "exact_loss": round(exact_mean, 5), "topk_loss": round(mean, 5),
                     "relative_error": round(1 - mean / exact_mean, 5)})
    return rows


def teacher_error(sessions: int = 32) -> list[dict]:
    """How far each way of holding the teacher puts its next-token distribution from the fp32 teacher's: the
    generalized JSD (beta 0.5, at T) per position on held-out reference answers. "bfloat16": bf16 weights and
    compute, the logits in fp32 as the loss computes them (divergence._teacher_log_probs); "bfloat16, bf16 logits":
    the same with the head's product in bf16, as the loss computed them before; "bfloat16-in-float32": bf16
    weights computed in fp32 (models/upcast.py, `auto` on a CPU without native bf16)."""
    import torch
    from trl.experimental.utils import DataCollatorForChatML

    from atlas_distill.gkd import divergence
    from atlas_distill.models import load_teacher
    from atlas_distill.models.upcast import compute_in_float32

    tokenizer, reference, _student = _models()
    path = reference.name_or_path
    teachers = {"bfloat16": load_teacher(path, "bfloat16"),
                "bfloat16-in-float32": compute_in_float32(load_teacher(path, "bfloat16"))}
    _train, held_out = _datasets(tokenizer)
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=SETTINGS["max_length"])
    vocab, temperature = len(tokenizer), SETTINGS["temperature"]
    ways = {"bfloat16": [], "bfloat16, bf16 logits": [], "bfloat16-in-float32": []}
    with torch.inference_mode():
        for start in range(0, sessions, BATCH):
            batch = collator([{"messages": m} for m in held_out["messages"][start:start + BATCH]])
            mask = batch["labels"][:, 1:] != -100
            hidden = divergence.completion_hidden(reference, batch, mask)
            exact = divergence._teacher_log_probs(hidden, *divergence._head(reference, vocab), temperature)
            for name, teacher in teachers.items():
                hidden = divergence.completion_hidden(teacher, batch, mask)
                weight, bias = divergence._head(teacher, vocab)
                ways[name].append(divergence._teacher_log_probs(hidden, weight, bias, temperature))
                if name == "bfloat16":
                    ways["bfloat16, bf16 logits"].append(divergence._log_probs(hidden, weight, bias, temperature))
            for name in ways:
                ways[name][-1] = divergence.generalized_jsd(ways[name][-1], exact, 0.5)
    rows = []
    for name, parts in ways.items():
        jsd = torch.cat(parts)
        rows.append({"teacher": name, "mean_jsd": float(f"{jsd.mean():.3g}"), "max_jsd": float(f"{jsd.max():.3g}"),
                     "positions": len(jsd)})
    return rows


def _stored(indices, values, tail, bits: int, vocab: int):
    """Top-k (indices, log-probs, tail) as read back from storage with `bits` per log-prob, renormalised so the
    k + 1 outcomes sum to one again, and the bytes that took. 8: the record format of the teacher store and the
    in-memory cache (gkd/topk_format.py: an 8-bit code per log-prob on its position's scale, zlib), its size
    measured; 32 and 16: the raw size of ids, log-probs and an fp32 tail."""
    import torch

    from atlas_distill.gkd import topk_format
    from atlas_distill.gkd.divergence import TAIL_FLOOR

    n, k = indices.shape
    if bits == 8:
        record = topk_format.encode(indices, values, tail, vocab)
        return *topk_format.decode(record, n, k, vocab), len(record)
    if bits == 16:
        values = values.half().float()
    total = torch.logsumexp(torch.cat([values, tail.unsqueeze(-1)], dim=-1), dim=-1)
    size = n * (k * (topk_format.id_dtype(vocab).itemsize + bits // 8) + 4)  # ids, log-probs, fp32 tail; raw
    return indices, values - total.unsqueeze(-1), (tail - total).clamp_min(TAIL_FLOOR), size


def _distillation_trainer(common: dict, output_dir: str, steps: int, gc: bool, seed: int, bf16: bool, *,
                          batch: int = BATCH, max_new_tokens: int = SETTINGS["max_new_tokens"]):
    """TRL's stable DistillationTrainer on the same models and sessions, matched where it can be: the prompt column
    is each session's system + user turns (what ours generates from), one completion per prompt, 4 prompts per
    step, max_completion_length = max_new_tokens, the same beta, temperature, lr, seed and precision. It cannot be
    matched in: no lmbda (always on-policy: rows only at lmbda 1), the temperature applied in its loss as in ours
    (TRL's GKDTrainer samples with it only), its loss normalised by generated tokens (as ours since the fifteenth
    session; before, ours divided an on-policy step's sum by the dataset batch's answer tokens)."""
    import copy

    import torch
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    tokenizer = copy.deepcopy(common["processing_class"])
    tokenizer.padding_side = "left"  # DistillationTrainer requires left padding for its prompts
    prompts = Dataset.from_list([{"prompt": messages[:-1]} for messages in common["train_dataset"]["messages"]])
    args = DistillationConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch, beta=SETTINGS["beta"],
        temperature=SETTINGS["temperature"], max_completion_length=max_new_tokens,
        learning_rate=SETTINGS["learning_rate"], seed=seed, gradient_checkpointing=gc, bf16=bf16, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0)
    return DistillationTrainer(model=common["model"], teacher_model=common["teacher_model"], args=args,
                               train_dataset=prompts, processing_class=tokenizer, callbacks=common["callbacks"])


def teacher_dtype_for(trainer_name: str, setting: str) -> str:
    """The teacher's dtype in a run: `setting` when named; auto: ours as `atlas-distill train` loads it ("auto",
    models.load_teacher: bf16 on a CPU with native bf16, else bf16 weights computed in fp32), TRL's trainers fp32
    (the model they are given; neither casts it); as-ours: every trainer's teacher loaded as ours' auto loads it."""
    if setting == "as-ours":
        return "auto"
    if setting != "auto":
        return setting
    return "auto" if trainer_name == "atlas" else "float32"


def build_trainer(trainer_name: str, common: dict, output_dir: str, steps: int, gc: bool, seed: int, bf16: bool,
                  **shape):
    """`trainer_name`'s trainer on `common` (model, teacher, args, data, tokenizer, callbacks). `shape`: batch /
    max_new_tokens for DistillationTrainer (the others read them from common["args"])."""
    from trl.experimental.gkd import GKDTrainer

    from atlas_distill.gkd import AtlasGKDTrainer

    if trainer_name == "trl":
        return GKDTrainer(**common)
    if trainer_name == "trl-distillation":
        return _distillation_trainer(common, output_dir, steps, gc, seed, bf16, **shape)
    return AtlasGKDTrainer(**common)


def epoch_batches(order: list[int], batch: int) -> list[list[int]]:
    """An epoch's row `order` (a sampler's) cut into its whole batches of `batch` rows (a last partial one left out)."""
    return [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]


def train_on(trainer, batches: list[list[int]]) -> None:
    """Make `trainer` train on these batches of rows, in this order: its sampler yields their rows."""
    rows = [row for batch in batches for row in batch]
    trainer._get_train_sampler = lambda train_dataset=None: rows


def random_batches(trainer, steps: int, seed: int) -> None:
    """Make ours train on `steps` batches picked at random from its first epoch's batches, instead of the epoch's
    first ones: transformers' length-grouped sampler, and ours grouped by turn (gkd/turn_sampler.py), put an epoch's
    longest batch first, while TRL's trainers shuffle their rows, so their first steps are already a random sample.
    Iterating ours' sampler once leaves the epoch's drawn turns in its collator, as training would."""
    import random

    batches = epoch_batches(list(trainer._get_train_sampler()), trainer.args.train_batch_size)
    train_on(trainer, random.Random(seed).sample(batches, min(steps, len(batches))))


def timed_run(trainer_name: str, common: dict, output_dir: str, steps: int, gc: bool, seed: int, bf16: bool, *,
              label: str, synchronize=None, batches: str = "random", **shape) -> tuple[float, list[float]]:
    """Train `build_trainer`'s trainer with every step's end stamped (after `synchronize`, e.g. the GPU's); the
    mean s/step over the steps after the first (the first pays one-off costs) and the logged losses. `batches`
    "random": ours' steps take random batches of its epoch (`random_batches`); "first": its epoch's first ones."""
    from transformers import TrainerCallback

    stamps: list[float] = []

    def usage() -> tuple[float, int]:
        used = resource.getrusage(resource.RUSAGE_SELF)
        return used.ru_utime + used.ru_stime, used.ru_minflt + used.ru_majflt

    class Clock(TrainerCallback):
        cpu, faults = 0.0, 0

        def on_step_begin(self, args, state, control, **kwargs):
            if not stamps:
                stamps.append(time.perf_counter())
                self.cpu, self.faults = usage()

        def on_step_end(self, args, state, control, **kwargs):
            if synchronize is not None:
                synchronize()
            stamps.append(time.perf_counter())
            cpu, faults = usage()
            log(f"  [{label}] step {state.global_step}/{steps} {stamps[-1] - stamps[-2]:.2f} s "
                f"({cpu - self.cpu:.1f} s of CPU time, {faults - self.faults} page faults)")
            self.cpu, self.faults = cpu, faults

    trainer = build_trainer(trainer_name, {**common, "callbacks": [Clock(), *common.get("callbacks", [])]}, output_dir,
                            steps, gc, seed, bf16, **shape)
    if batches == "random" and trainer_name == "atlas":
        random_batches(trainer, steps, seed)
    trainer.train()
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    timed = times[1:] or times
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return sum(timed) / len(timed), losses


def bf16_for(trainer_name: str, precision: str) -> bool:
    """Whether `trainer_name` trains under bf16 autocast at `precision` (the module docstring says why)."""
    from atlas_distill.gkd.config import mixed_precision

    if precision != "auto":
        return precision == "bf16"
    return trainer_name == "atlas" and mixed_precision("auto")[0]


def parse_ours(pairs: list[str]) -> dict:
    """`--ours KEY=VALUE` pairs as GKDConfig keyword arguments (VALUE read as YAML: true, 0, 0.5, text)."""
    import dataclasses

    import yaml

    from atlas_distill.gkd import GKDConfig

    known, settings = {field.name for field in dataclasses.fields(GKDConfig)}, {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--ours {pair!r}: expected KEY=VALUE with KEY a GKDConfig setting, e.g. --ours "
                             "keep_freed_memory=false")
        settings[key] = yaml.safe_load(value)
    return settings


# ours' boolean settings read at every step, which --alternate can switch between steps
ALTERNATING = ("prefill_once", "replay_generation", "lean_recompute", "packed_generation", "lean_decoding",
               "inverse_cdf_sampling", "lean_activations", "math_attention")


def _alternation(setting: str):
    """A callback switching ours' `setting` on for even steps and off for odd ones, and the step times it saw:
    {True: [...], False: [...]}, the first step of each left out (one-off costs)."""
    from transformers import TrainerCallback

    seen: dict[bool, list[float]] = {True: [], False: []}

    class Alternate(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.on = state.global_step % 2 == 0
            setattr(args, setting, self.on)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > 2:
                seen[self.on].append(time.perf_counter() - self.started)

    return Alternate(), seen


def worker(trainer_name: str, steps: int, gc: bool, lmbda: float, learning: bool, atlas_off: bool,
           seed: int, precision: str, teacher_setting: str = "auto", data: str = "task", ours: tuple = (),
           alternate: str | None = None, batches: str = "random") -> dict:
    """Child process: one training run; its timings, loss and peak RSS."""
    from atlas_distill.models import teacher_loaded_as
    from atlas_distill.models.builtin import builtin_model_dir

    bf16 = bf16_for(trainer_name, "fp32" if atlas_off and precision == "auto" else precision)
    dtype = teacher_dtype_for(trainer_name, "float32" if atlas_off and teacher_setting == "auto" else teacher_setting)
    tokenizer, teacher, student = _models(dtype)
    # the held-out loss is measured against the fp32 teacher for every trainer (one formula for all)
    judge = teacher if dtype == "float32" or not learning else _teacher("float32")
    train, held_out = _datasets(tokenizer, data)

    heldout_rows = list(held_out["messages"][:32])
    before = heldout_loss(student, judge, tokenizer, heldout_rows, SETTINGS["temperature"],
                          SETTINGS["beta"]) if learning else None
    with tempfile.TemporaryDirectory() as tmp:
        switches = ({"kv_cache_generation": False, "chunked_loss": False, "teacher_cache_topk": 0,
                     "group_by_length": False, "generation_dtype": "float32", "inverse_cdf_sampling": False,
                     "packed_generation": False, "lean_decoding": False, "prefill_once": False,
                     "replay_generation": False, "lean_recompute": False, "keep_freed_memory": False,
                     "compact_optimizer": False}
                    if atlas_off else {})
        overrides = parse_ours(list(ours)) if trainer_name == "atlas" else {}
        switches.update(overrides)
        args = _config(tmp, steps, gc, lmbda, seed, bf16, **switches)
        common = {"model": student, "teacher_model": teacher, "args": args, "train_dataset": train,
                  "processing_class": tokenizer}
        alternation, seen = _alternation(alternate) if alternate and trainer_name == "atlas" else (None, None)
        if alternation is not None:
            common["callbacks"] = [alternation]
        s_per_step, losses = timed_run(trainer_name, common, tmp, steps, gc, seed, bf16, batches=batches,
                                       label=f"{trainer_name} gc={'on' if gc else 'off'} lmbda={lmbda}")
    row = {"trainer": trainer_name, "gradient_checkpointing": gc, "lmbda": lmbda, "steps": steps,
           "s_per_step": round(s_per_step, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
           "final_loss": round(losses[-1], 5) if losses else None, "seed": seed,
           "teacher_dtype": teacher_loaded_as(str(builtin_model_dir())) if dtype == "auto" else dtype,
           "data": data, "batches": batches, "bf16": bf16}
    if overrides:
        row["ours"] = overrides
    if seen is not None:
        row["alternate"] = {"setting": alternate}
        for on, times in seen.items():
            label = "on" if on else "off"
            row["alternate"][f"{label}_s_per_step"] = round(statistics.median(times), 3) if times else None
            row["alternate"][f"{label}_steps"] = [round(t, 3) for t in times]
    if learning:
        row["heldout_loss_before"] = round(before, 5)
        row["heldout_loss_after"] = round(heldout_loss(student, judge, tokenizer, heldout_rows,
                                                       SETTINGS["temperature"], SETTINGS["beta"]), 5)
        row["losses"] = [round(x, 5) for x in losses]
    return row


def run_child(trainer_name: str, steps: int, gc: bool, lmbda: float, learning: bool, atlas_off: bool,
              seed: int, precision: str, teacher_setting: str = "auto", data: str = "task", ours: tuple = (),
              alternate: str | None = None, batches: str = "random") -> dict:
    command = [sys.executable, __file__, "--worker", trainer_name, "--steps", str(steps), "--gc",
               "on" if gc else "off", "--lmbda", str(lmbda), "--seeds", str(seed), "--teacher-dtype", teacher_setting,
               "--data", data, "--batches", batches, "--precision", precision, *(f"--ours={pair}" for pair in ours)]
    command += ["--learning-worker"] if learning else []
    command += ["--atlas-off"] if atlas_off else []
    command += ["--alternate", alternate] if alternate else []
    log(f"running {trainer_name}, gradient checkpointing {'on' if gc else 'off'}, lmbda {lmbda}, {steps} steps, "
        f"seed {seed}")
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if done.returncode != 0:
        raise SystemExit(f"the {trainer_name} worker failed (exit {done.returncode}); its stderr is above")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    log(f"  {json.dumps(row)}")
    return row


ANCHORS = ("trl", "trl-distillation")  # TRL's legacy GKDTrainer, its stable DistillationTrainer


def against_ours(row: dict, ours: dict | None, memory_key: str) -> tuple[str, str]:
    """Ours' speed-up over `row`'s trainer and ours' memory as a fraction of its, as table cells ("" for ours)."""
    if row["trainer"] == "atlas" or ours is None:
        return "", ""
    return (f"{row['s_per_step'] / ours['s_per_step']:.2f}x", f"{ours[memory_key] / row[memory_key]:.2f}x")


def _ratio_table(rows: list[dict]) -> str:
    """Per (gc, lmbda): each trainer's s/step and peak RSS, and ours against each anchor that ran there."""
    lines = ["| gc | lmbda | trainer | compute | s/step | ours' speed-up | peak RSS MB | ours' RSS ratio "
             "| final loss |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    keyed = {(r["trainer"], r["gradient_checkpointing"], r["lmbda"]): r for r in rows}
    for gc, lmbda in dict.fromkeys((r["gradient_checkpointing"], r["lmbda"]) for r in rows):
        ours = keyed.get(("atlas", gc, lmbda))
        for name in (*ANCHORS, "atlas"):
            row = keyed.get((name, gc, lmbda))
            if row is None:
                continue
            speed, memory = against_ours(row, ours, "peak_rss_mb")
            lines.append(f"| {'on' if gc else 'off'} | {lmbda:g} | {name} | {'bf16' if row.get('bf16') else 'fp32'} "
                         f"| {row['s_per_step']:.2f} | {speed} "
                         f"| {row['peak_rss_mb']:.0f} | {memory} | {row['final_loss']} |")
    return "\n".join(lines)


def _trainers(names: str, lmbda: float) -> list[str]:
    """The trainers asked for that can run at `lmbda`: DistillationTrainer is on-policy only (lmbda 1)."""
    return [name for name in names.split(",") if name != "trl-distillation" or lmbda == 1.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--gc", choices=["on", "off", "both"], default="both")
    parser.add_argument("--lmbda", default="0,0.5,1", help="comma-separated lmbda values")
    parser.add_argument("--json", action="store_true", help="one JSON list of rows on stdout")
    parser.add_argument("--learning", type=int, metavar="STEPS",
                        help="instead: STEPS steps of each trainer at the first lmbda (checkpointed with --gc on, "
                             "else not), held-out loss before/after")
    parser.add_argument("--topk-error", metavar="K,K,...",
                        help="instead: the top-k cache's divergence error vs the exact loss for these k")
    parser.add_argument("--teacher-error", action="store_true",
                        help="instead: each way of holding the teacher: its distribution's JSD from the fp32 teacher's")
    parser.add_argument("--topk-bits", default="32", metavar="B,B,...",
                        help="with --topk-error: bits per stored log-prob, of 32, 16, 8 (the store's records)")
    parser.add_argument("--seeds", default=str(SETTINGS["seed"]),
                        help="comma-separated training seeds (data order, sampling, on/off-policy draws); "
                             "--learning runs each trainer once per seed, timing runs use the first; the "
                             "held-out split stays seed 42's")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: ours as `atlas-distill train` picks it here (fp32 on a CPU), TRL's in fp32; fp32 / "
                        "bf16 (autocast): every trainer so; bf16 is slow on a CPU without native bf16")
    parser.add_argument("--atlas-off", action="store_true", help="run ours with every speedup switched off")
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                        help="one of ours' settings (GKDConfig), e.g. keep_freed_memory=false; repeatable")
    parser.add_argument("--data", choices=["task", "conversation"], default="task",
                        help="task: task prompt -> final answer; conversation: the multi-turn episodes, ours learning "
                        "every action (one on-policy target turn per example), TRL's trainers the final answer after "
                        "the whole recorded conversation")
    parser.add_argument("--batches", choices=["random", "first"], default="random",
                        help="random: ours' steps take batches picked at random from its first epoch (TRL's samplers "
                        "shuffle rows, so theirs are random either way); first: ours' epoch's first batches, the "
                        "longest (length grouping puts them first)")
    parser.add_argument("--teacher-dtype", choices=["auto", "float32", "bfloat16", "as-ours"], default="auto",
                        help="the teacher's weights; auto: ours as `atlas-distill train` loads it (bf16, computed in "
                        "fp32 on a CPU without native bf16), TRL's trainers fp32; as-ours: every trainer's as ours'")
    parser.add_argument("--trainers", default="trl,trl-distillation,atlas",
                        help="comma-separated, of trl (legacy GKDTrainer), trl-distillation (DistillationTrainer, "
                        "lmbda 1 only), atlas")
    parser.add_argument("--alternate", choices=ALTERNATING, metavar="SETTING",
                        help="ours' runs switch this boolean setting on and off step by step (even steps on) and "
                        "report both medians: the two figures come from one run, minutes apart on a machine whose "
                        f"speed drifts; one of {', '.join(ALTERNATING)}")
    parser.add_argument("--worker", choices=["trl", "trl-distillation", "atlas"], help=argparse.SUPPRESS)
    parser.add_argument("--learning-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    lmbdas = [float(x) for x in args.lmbda.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    ours = tuple(args.ours)
    if args.worker:
        with contextlib.redirect_stdout(sys.stderr):
            row = worker(args.worker, args.steps, args.gc == "on", lmbdas[0], args.learning_worker, args.atlas_off,
                         seeds[0], args.precision, args.teacher_dtype, args.data, ours, args.alternate, args.batches)
        print(json.dumps(row), flush=True)
        return
    parse_ours(args.ours)  # a malformed pair or an unknown key stops here, before any model loads
    if args.topk_error:
        bits = tuple(int(b) for b in args.topk_bits.split(","))
        if not set(bits) <= {32, 16, 8}:
            parser.error("--topk-bits: each of 32, 16, 8")
        rows = topk_error([int(k) for k in args.topk_error.split(",")], bits=bits)
        print(json.dumps(rows) if args.json else "\n".join(
            f"k={r['k']} in {r['bits']} bits ({r['bytes_per_token']} B/token): exact {r['exact_loss']}, top-k "
            f"{r['topk_loss']}, relative error {r['relative_error']:.2%}" for r in rows))
        return
    if args.teacher_error:
        rows = teacher_error()
        print(json.dumps(rows) if args.json else "\n".join(
            f"{r['teacher']}: JSD from the fp32 teacher {r['mean_jsd']} per position (max {r['max_jsd']}, "
            f"{r['positions']} positions)" for r in rows))
        return
    if args.learning:
        rows = [run_child(name, args.learning, args.gc == "on", lmbdas[0], True, args.atlas_off, seed, args.precision,
                          args.teacher_dtype, args.data, ours, batches=args.batches)
                for seed in seeds for name in _trainers(args.trainers, lmbdas[0])]
    else:
        gcs = {"on": [True], "off": [False], "both": [True, False]}[args.gc]
        rows = [run_child(name, args.steps, gc, lmbda, False, args.atlas_off, seeds[0], args.precision,
                          args.teacher_dtype, args.data, ours, args.alternate, args.batches)
                for gc in gcs for lmbda in lmbdas for name in _trainers(args.trainers, lmbda)]
    if args.json:
        print(json.dumps(rows))
        return
    if not args.learning:
        print(_ratio_table(rows))
        for row in rows:
            if "alternate" in row:
                alt = row["alternate"]
                print(f"ours, gc {'on' if row['gradient_checkpointing'] else 'off'}, {alt['setting']} switched step by "
                      f"step: on {alt['on_s_per_step']} s/step {alt['on_steps']}, off {alt['off_s_per_step']} s/step "
                      f"{alt['off_steps']} (medians)")
        return
    for row in rows:
        print(f"{row['trainer']} seed {row['seed']}: held-out loss {row['heldout_loss_before']} -> "
              f"{row['heldout_loss_after']}; {row['s_per_step']} s/step; train losses {row['losses']}")
    after = {name: [row["heldout_loss_after"] for row in rows if row["trainer"] == name]
             for name in dict.fromkeys(row["trainer"] for row in rows)}
    for name, values in after.items():
        spread = f" +- {statistics.stdev(values):.4f} (sd over {len(values)} seeds)" if len(values) > 1 else ""
        print(f"{name}: held-out loss after {statistics.mean(values):.4f}{spread}")
    if len(seeds) > 1 and "atlas" in after:  # paired by seed: is the gap larger than its own spread?
        for anchor in (name for name in ANCHORS if name in after):
            gaps = [ours - theirs for theirs, ours in zip(after[anchor], after["atlas"], strict=True)]
            print(f"ours - {anchor}, per seed: {statistics.mean(gaps):+.4f} +- {statistics.stdev(gaps):.4f} (sd); "
                  f"per seed {[round(g, 4) for g in gaps]}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
