"""One on-policy step's loss, gradient and first update, ours against TRL's DistillationTrainer, on the same sampled
completions (issue 15's same learning, with the draw held fixed).

`train_bench.py --learning` compares where 30 steps of each trainer end. Ours' end point moves by up to 0.02 under
changes that only alter rounding (benchmarks/README.md), so a gap of a few thousandths there cannot tell ours doing
something else from chance. This takes the chance out. DistillationTrainer (DT) samples a batch of completions in
train_bench's setup (4 of the demo's sessions, 32 new tokens, T 0.9, the fp32 15-layer student), and each way below
takes its loss, the student's gradient and its optimizer's first update on exactly those prompts and completions:

- "DT": DT as train_bench runs it (fp32 student and teacher, its fused AdamW): the reference;
- "ours, fp32": ours' own training step (its `training_step`: the prompt's pass, every speed-up, `CompactAdamW`),
  only its sampling replaced by DT's completions, with DT's arithmetic (no autocast, the fp32 teacher);
- "ours, bf16 teacher": the same with ours' `auto` teacher (bf16 weights, computed in fp32 on a CPU without native
  bf16), fp32 arithmetic: how `atlas-distill train` trains on a CPU (`model.dtype: auto`);
- where bf16 is native here (a CPU with AVX512-BF16 or AMX, a GPU with native bf16): "ours, bf16 autocast" (the fp32
  teacher) and "ours, bf16 autocast, bf16 teacher" (`model.dtype: bfloat16`, and `auto` on a GPU with native bf16);
- "DT, bf16 autocast": there too, DT's loss under the same autocast (the fp32 teacher): what autocast does to
  another trainer's gradient;
- "DT, another draw": DT on a second sample of completions for the same prompts: how far a step's gradient moves
  with the draw alone, the yardstick for the rows above.

The way `atlas-distill train` would take here is marked "(default here)". Each row: the loss, the gradient's norm,
its cosine with DT's and the norm of the difference relative to DT's; the same for the update (the gradients
clipped at max_grad_norm as the trainers do, then one step of a fresh optimizer). Before any of that, ours' prompts
for the batch's sessions (its collator's) must be DT's token for token, or the script stops (exit 1) and shows the
first difference.

    python benchmarks/gradient_check.py [--batches 3] [--seed 42] [--by-weight] [--ours KEY=VALUE ...] [--json]

`--by-weight` adds each way's gradient cosine with DT's per kind of weight (the embedding, each projection, the
norms), over all layers. `--ours KEY=VALUE` (repeatable) sets one of ours' settings in every one of ours' ways, as
in train_bench.py, e.g. `--ours math_attention=false`.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from _common import cpu_description, log
from train_bench import SETTINGS, _config, _datasets, _distillation_trainer, _models, _teacher, bf16_for, parse_ours


def dt_sample(trainer, rows: list, seed: int) -> dict:
    """DT's completions for `rows`' prompts (system + user turns), drawn after seeding torch with `seed`."""
    import torch

    torch.manual_seed(seed)
    trainer.model.train()
    return trainer._generate_and_score_completions([{"prompt": messages[:-1]} for messages in rows])


def dt_step(trainer, sample: dict) -> float:
    """DT's loss on `sample`, its gradient left in the student's .grad (Trainer.training_step's compute and backward,
    without `_prepare_inputs`, which would sample again)."""
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    # accelerate's autocast, where args.bf16, entered as ours enters it: DT's compute_loss runs the student through
    # _forward_redirection, which bypasses the autocast accelerate puts around a prepared model's forward
    with trainer.accelerator.autocast():
        loss = trainer.compute_loss(trainer.model, sample)
    trainer.accelerator.backward(loss)
    return float(loss.detach())


def ours_step(trainer, indices: list[int], sample: dict) -> float:
    """Ours' training step on the dataset rows `indices`, the completions taken from DT's `sample` instead of
    sampled: its gradient left in the student's .grad. Stops when ours' prompts are not DT's."""
    import torch

    inputs = trainer.data_collator([trainer.train_dataset[i] for i in indices])
    prompts, prompt_mask = inputs["prompts"], inputs["prompt_attention_mask"]
    for row, (mine, theirs) in enumerate(zip(prompts, sample["prompt_ids"], strict=True)):
        mine = mine[prompt_mask[row].bool()].tolist()
        theirs = theirs[sample["prompt_mask"][row].bool()].tolist()
        if mine != theirs:
            at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            raise SystemExit(f"ours' prompt for row {indices[row]} is not DT's: {len(mine)} against {len(theirs)} "
                             f"tokens, first difference at token {at} (ours {mine[at:at + 5]}, DT's "
                             f"{theirs[at:at + 5]})")
    if prompts.shape != sample["prompt_ids"].shape:
        raise SystemExit(f"ours' prompts are padded to {tuple(prompts.shape)}, DT's to "
                         f"{tuple(sample['prompt_ids'].shape)}: the same tokens, other padding")
    completion, completion_mask = sample["completion_ids"], sample["completion_mask"]

    def take_dts(generator, batch, prompt=None):  # in place of ours' _generate_into: DT's completions
        ids = torch.cat([batch["prompts"], completion], dim=1)
        mask = torch.cat([batch["prompt_attention_mask"], completion_mask], dim=1)
        labels = ids.clone()
        labels[:, :batch["prompts"].shape[1]] = -100
        labels[mask == 0] = -100
        batch["input_ids"], batch["attention_mask"], batch["labels"] = ids, mask, labels

    trainer._generate_into = take_dts
    trainer.model.zero_grad(set_to_none=True)
    return float(trainer.training_step(trainer.model, inputs))


def gradient(trainer) -> dict:
    """The student's gradient, by weight name."""
    return {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}


def first_update(trainer) -> dict:
    """The weights' change from one step of a fresh optimizer of `trainer`'s kind on the gradient in .grad, clipped
    at max_grad_norm as its training step clips it; the weights are put back afterwards."""
    import torch

    params = [p for p in trainer.model.parameters() if p.grad is not None]
    before = [p.detach().clone() for p in params]
    trainer.optimizer = None
    optimizer = trainer.create_optimizer()
    torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
    optimizer.step()
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    update = {names[id(p)]: p.detach() - old for p, old in zip(params, before, strict=True)}
    with torch.no_grad():
        for p, old in zip(params, before, strict=True):
            p.copy_(old)
    trainer.optimizer = None
    return update


def _flat(values: dict, names):
    """The tensors of `values` named `names`, as one fp64 vector."""
    import torch

    return torch.cat([values[name].flatten().double() for name in names])


def compare(mine: dict, reference: dict) -> tuple[float, float, float]:
    """(norm of `mine`, its cosine with `reference`, |mine - reference| / |reference|) over all weights."""
    if mine.keys() != reference.keys():
        raise SystemExit(f"the two students' trained weights differ: {sorted(mine.keys() ^ reference.keys())[:5]}")
    a, b = _flat(mine, reference), _flat(reference, reference)
    return float(a.norm()), float(a @ b / (a.norm() * b.norm())), float((a - b).norm() / b.norm())


def weight_kind(name: str) -> str:
    """A weight's kind over all layers: "model.layers.3.mlp.up_proj.weight" -> "mlp.up_proj"."""
    parts = name.removesuffix(".weight").removesuffix(".bias").split(".")
    return ".".join(parts[3:] if parts[1:2] == ["layers"] else parts[1:])


def _by_kind(mine: dict, reference: dict) -> dict[str, float]:
    """The gradient cosine with `reference` per weight kind (`weight_kind`)."""
    kinds: dict[str, list[str]] = {}
    for name in reference:
        kinds.setdefault(weight_kind(name), []).append(name)
    return {kind: round(compare({n: mine[n] for n in names}, {n: reference[n] for n in names})[1], 6)
            for kind, names in kinds.items()}


def _ours_ways(bf16_native: bool, ours_teacher, teacher) -> dict[str, tuple[bool, object]]:
    """Ours' ways (name: (bf16 autocast, teacher)): fp32 with the fp32 teacher and with ours' `auto` teacher, and
    where bf16 is native here, each under bf16 autocast too."""
    ways = {"ours, fp32": (False, teacher), "ours, bf16 teacher": (False, ours_teacher)}
    if bf16_native:
        ways |= {"ours, bf16 autocast": (True, teacher), "ours, bf16 autocast, bf16 teacher": (True, ours_teacher)}
    if ours_teacher.dtype == teacher.dtype:  # an fp32 `auto` teacher: the fp32 ways are those
        ways = {name: way for name, way in ways.items() if "bf16 teacher" not in name}
    return ways


def check(batches: int, seed: int, by_weight: bool = False, ours_settings: dict | None = None) -> list[dict]:
    """For each of `batches` random batches of the demo's training sessions: each way's loss, gradient and update
    against DT's; `ours_settings`: GKDConfig settings for ours' ways."""
    from atlas_distill.gkd import AtlasGKDTrainer
    from atlas_distill.models import cpu_bf16, cuda_bf16

    tokenizer, teacher, student = _models("float32")
    ours_teacher = _teacher("auto")
    train, _held_out = _datasets(tokenizer)
    # how `atlas-distill train` trains here
    default = (bf16_for("atlas", "auto"), ours_teacher if ours_teacher.dtype != teacher.dtype else teacher)
    bf16 = cuda_bf16() or cpu_bf16()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = {"train_dataset": train, "processing_class": tokenizer}
        dt = _distillation_trainer({**data, "model": copy.deepcopy(student), "teacher_model": teacher,
                                    "callbacks": []}, tmp, 1, False, seed, False)
        dt_bf16 = (_distillation_trainer({**data, "model": copy.deepcopy(student), "teacher_model": teacher,
                                          "callbacks": []}, tmp, 1, False, seed, True) if bf16 else None)
        ways = _ours_ways(bf16, ours_teacher, teacher)
        ours = {name: AtlasGKDTrainer(model=copy.deepcopy(student), teacher_model=way_teacher,
                                      args=_config(tmp, 1, False, 1.0, seed, way_bf16, **(ours_settings or {})),
                                      **data)
                for name, (way_bf16, way_teacher) in ways.items()}
        picks = random.Random(seed)
        for batch in range(batches):
            indices = picks.sample(range(len(train)), 4)
            messages = [train[i]["messages"] for i in indices]
            log(f"batch {batch + 1}/{batches}: sessions {indices}")
            losses, gradients, updates = {}, {}, {}

            def took(name: str, loss: float, trainer) -> None:  # a way's loss; its gradient and update, now
                losses[name], gradients[name], updates[name] = loss, gradient(trainer), first_update(trainer)

            sample = dt_sample(dt, messages, seed + batch)
            took("DT", dt_step(dt, sample), dt)
            for name, trainer in ours.items():
                took(name, ours_step(trainer, indices, sample), trainer)
            if dt_bf16 is not None:
                took("DT, bf16 autocast", dt_step(dt_bf16, sample), dt_bf16)
            took("DT, another draw", dt_step(dt, dt_sample(dt, messages, seed + batch + 10_000)), dt)
            tokens = int(sample["completion_mask"].sum())
            for name in gradients:
                norm, cosine, difference = compare(gradients[name], gradients["DT"])
                _, update_cosine, update_difference = compare(updates[name], updates["DT"])
                way_bf16, way_teacher = ways.get(name, (name == "DT, bf16 autocast", teacher))
                row = {"batch": batch, "way": name, "default_here": ways.get(name) == default,
                       "completion_tokens": tokens, "loss": round(losses[name], 6),
                       "gradient_norm": round(norm, 6), "gradient_cosine": round(cosine, 6),
                       "gradient_difference": round(difference, 6), "update_cosine": round(update_cosine, 6),
                       "update_difference": round(update_difference, 6), "bf16": way_bf16,
                       "teacher_dtype": str(way_teacher.dtype).removeprefix("torch.")}
                if by_weight:
                    row["gradient_cosine_by_weight"] = _by_kind(gradients[name], gradients["DT"])
                rows.append(row)
                log(f"  {json.dumps(row)}")
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| way | loss per batch | gradient norm | cosine with DT's | difference / DT's norm | update cosine | "
             "update difference / DT's norm |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in dict.fromkeys(row["way"] for row in rows):
        mine = [row for row in rows if row["way"] == name]
        label = f"{name} (default here)" if mine[0]["default_here"] else name

        def mean(key: str) -> str:
            return f"{statistics.mean(row[key] for row in mine):.4g}"

        losses = ", ".join(f"{row['loss']:.5f}" for row in mine)
        lines.append(f"| {label} | {losses} | {mean('gradient_norm')} | {mean('gradient_cosine')} "
                     f"| {mean('gradient_difference')} | {mean('update_cosine')} | {mean('update_difference')} |")
    if "gradient_cosine_by_weight" in rows[0]:
        kinds = list(rows[0]["gradient_cosine_by_weight"])
        lines += ["", "| way | " + " | ".join(kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
        for name in dict.fromkeys(row["way"] for row in rows):
            mine = [row["gradient_cosine_by_weight"] for row in rows if row["way"] == name]
            lines.append(f"| {name} | " + " | ".join(f"{statistics.mean(c[k] for c in mine):.4f}" for k in kinds)
                         + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=3, help="random batches of 4 training sessions (default 3)")
    parser.add_argument("--seed", type=int, default=SETTINGS["seed"], help="picks the batches and seeds DT's draws")
    parser.add_argument("--by-weight", action="store_true", help="each way's gradient cosine per kind of weight too")
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                        help="one of ours' settings (GKDConfig) in all of ours' ways, e.g. math_attention=false")
    parser.add_argument("--json", action="store_true", help="one JSON list of rows on stdout")
    args = parser.parse_args()
    if args.batches < 1:
        parser.error("--batches: at least 1")
    settings = parse_ours(args.ours)
    rows = check(args.batches, args.seed, args.by_weight, settings)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{cpu_description()}; {args.batches} batches of 4 sessions, seed {args.seed}; means over the batches"
          + (f"; ours with {settings}" if settings else ""))
    print(_table(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
