"""On-policy multi-turn batches grouped by the drawn turn's prompt length against the whole conversation's (issue 15).

An on-policy step generates one drawn target turn per conversation from the recorded conversation before it, and
the teacher's forward, the student's prefill and backward run over those prompts padded to the longest of the batch.
`group_by_turn` (gkd/turn_sampler.py) groups rows by the drawn prompt's length; before it, transformers' sampler
grouped them by the whole conversation's length, whatever turn was drawn. Two parts, on train_bench.py's multi-turn
data (the bundled demo traces, data.targets all) at batch 4:

1. Tokens, exact: over `--epochs` epochs, the on-policy tokens a step computes (batch x (the longest drawn prompt +
   max_new_tokens)) and the real ones, both ways; and the off-policy steps' (the whole conversations), which the
   turn grouping leaves less well grouped, so the mix at lmbda 0.5 too.
2. Time: ours' training steps (train_bench.py's setup, fully on-policy, gradient checkpointing `--gc`) on `--steps`
   batches drawn at random from one epoch's batches grouped each way, one of each in turn in one run (the machine's
   drift reaches both alike); each row's turn is the same draw both ways, so the only difference is which rows share
   a batch. Reported: mean seconds per step each way, and those times one epoch's batches.
3. The loss's token count: the target tokens transformers counts in each dataset batch of one epoch (every target
   turn of its conversations), against the most an on-policy step generates for its one drawn turn (`--steps 0`:
   parts 1 and 3 only).

    python benchmarks/turn_bench.py [--epochs 2] [--steps 8] [--gc on|off] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_description, log  # benchmarks/ is sys.path[0] when a script runs
from train_bench import BATCH, SETTINGS, _config, _datasets, _models, epoch_batches, train_on

WAYS = ("turn", "conversation")


def _orders(sampler, epoch: int) -> dict[str, list[int]]:
    """One epoch's row order grouped each way (the other way as transformers' LengthGroupedSampler orders it, seeded
    here); the turn sampler's draws for it are left in its collator's `draws`."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    sampler.set_epoch(epoch)
    turn = list(sampler)
    generator = torch.Generator().manual_seed(SETTINGS["seed"] + epoch)
    lengths = list(sampler.dataset["length"])
    return {"turn": turn, "conversation": get_length_grouped_indices(lengths, BATCH, generator=generator)}


def _drawn_prompt(sampler, row: int) -> int:
    return sampler.prompt_lengths[row][sampler.collator.draws[row]]


def count_tokens(sampler, epochs: int) -> dict:
    """Per way: on-policy computed / real tokens, off-policy computed / real tokens, summed over `epochs`."""
    new = SETTINGS["max_new_tokens"]
    totals = {way: {"on_policy": 0, "on_policy_real": 0, "off_policy": 0, "off_policy_real": 0} for way in WAYS}
    lengths = list(sampler.dataset["length"])
    for epoch in range(epochs):
        orders = _orders(sampler, epoch)
        prompts = [_drawn_prompt(sampler, row) for row in range(len(lengths))]
        for way, order in orders.items():
            for rows in epoch_batches(order, BATCH):
                totals[way]["on_policy"] += BATCH * (max(prompts[r] for r in rows) + new)
                totals[way]["on_policy_real"] += sum(prompts[r] + new for r in rows)
                totals[way]["off_policy"] += BATCH * max(lengths[r] for r in rows)
                totals[way]["off_policy_real"] += sum(lengths[r] for r in rows)
    return totals


def target_counts(sampler, collator) -> dict:
    """Over one epoch's turn-grouped batches: the target tokens transformers counts in each dataset batch (its
    `num_items_in_batch`, labels after the first position), against the most an on-policy step generates (batch x
    max_new_tokens). Until the fifteenth session ours divided an on-policy step's summed divergence by the first."""
    import statistics

    rows = sampler.dataset
    counts = [int((collator([rows[r] for r in batch])["labels"][:, 1:] != -100).sum())
              for batch in epoch_batches(_orders(sampler, 0)["turn"], BATCH)]
    generated = BATCH * SETTINGS["max_new_tokens"]
    return {"dataset_targets": {"min": min(counts), "median": statistics.median(counts), "max": max(counts)},
            "generated_at_most": generated,
            "generated_over_dataset": {"min": round(generated / max(counts), 2),
                                       "median": round(generated / statistics.median(counts), 2),
                                       "max": round(generated / min(counts), 2)}}


def _sampler(train, collator):
    from atlas_distill.gkd.turn_sampler import TurnGroupedSampler

    return TurnGroupedSampler(train, collator, BATCH, SETTINGS["seed"])


def time_steps(steps: int, gc: bool) -> dict:
    """Ours' steps on random batches of one epoch grouped each way, alternating (turn first), after a warm-up pair."""
    from transformers import TrainerCallback

    from atlas_distill.gkd import AtlasGKDTrainer

    tokenizer, teacher, student = _models("auto")
    train, _ = _datasets(tokenizer, "conversation")
    with tempfile.TemporaryDirectory() as tmp:
        args = _config(tmp, 2 * (steps + 1), gc, 1.0, SETTINGS["seed"], False)
        trainer = AtlasGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                  processing_class=tokenizer)
        sampler = _sampler(trainer.train_dataset, trainer.data_collator)
        orders = _orders(sampler, 0)  # the collator keeps this epoch's draws: the trainer's sampler is not used
        rng = random.Random(SETTINGS["seed"])
        picked = {}
        for way, order in orders.items():
            picked[way] = rng.sample(epoch_batches(order, BATCH), steps + 1)
        schedule = [batch for pair in zip(picked["turn"], picked["conversation"]) for batch in pair]
        train_on(trainer, schedule)
        seconds: dict[str, list[float]] = {way: [] for way in WAYS}
        prompt_tokens: dict[str, list[int]] = {way: [] for way in WAYS}

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                self.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                taken = time.perf_counter() - self.started
                way = WAYS[(state.global_step - 1) % 2]
                rows = schedule[state.global_step - 1]
                width = max(_drawn_prompt(sampler, r) for r in rows)
                log(f"  step {state.global_step} ({way}): {taken:.2f} s, prompts padded to {width}")
                if state.global_step > 2:  # the first pair pays one-off costs
                    seconds[way].append(taken)
                    prompt_tokens[way].append(BATCH * width)

        trainer.add_callback(Clock())
        trainer.train()
    per_epoch = len(train) // BATCH
    return {way: {"s_per_step": round(statistics.mean(seconds[way]), 3), "steps": [round(s, 2) for s in seconds[way]],
                  "prompt_tokens_per_step": round(statistics.mean(prompt_tokens[way])),
                  "epoch_estimate_s": round(statistics.mean(seconds[way]) * per_epoch)} for way in WAYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps each way (0: tokens only)")
    parser.add_argument("--gc", choices=["on", "off"], default="on")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from atlas_distill.gkd.collator import TargetSpanCollator
    from atlas_distill.models.builtin import builtin_tokenizer_dir
    from atlas_distill.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(builtin_tokenizer_dir()))
    train, _ = _datasets(tokenizer, "conversation")
    sampler = _sampler(train, TargetSpanCollator(tokenizer, SETTINGS["max_length"], seed=SETTINGS["seed"]))
    tokens = count_tokens(sampler, args.epochs)
    targets = target_counts(sampler, sampler.collator)
    timing = time_steps(args.steps, args.gc == "on") if args.steps else None
    result = {"cpu": cpu_description(), "epochs": args.epochs, "rows": len(train), "tokens": tokens, "targets": targets,
              "timing": timing, "gradient_checkpointing": args.gc == "on"}
    if args.json:
        print(json.dumps(result))
        return
    print(f"CPU: {result['cpu']}; {len(train)} conversations, batch {BATCH}, {args.epochs} epochs")
    print("| grouped by | on-policy tokens computed | real | padding | off-policy computed | padding "
          "| lmbda 0.5 mix |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for way in WAYS:
        t = tokens[way]
        on_padding, off_padding = 1 - t["on_policy_real"] / t["on_policy"], 1 - t["off_policy_real"] / t["off_policy"]
        print(f"| {way} | {t['on_policy']:,} | {t['on_policy_real']:,} | {on_padding:.1%} "
              f"| {t['off_policy']:,} | {off_padding:.1%} "
              f"| {(t['on_policy'] + t['off_policy']) // 2:,} |")
    counted, share = targets["dataset_targets"], targets["generated_over_dataset"]
    print(f"target tokens per dataset batch (transformers' num_items_in_batch): {counted['min']}-{counted['max']} "
          f"(median {counted['median']}); an on-policy step generates at most {targets['generated_at_most']}: "
          f"{share['min']}-{share['max']}x (median {share['median']}x)")
    if timing:
        ratio = timing["conversation"]["s_per_step"] / timing["turn"]["s_per_step"]
        print(f"ours, gc {args.gc}, {args.steps} random batches each way, alternating:")
        for way in WAYS:
            t = timing[way]
            print(f"  {way}: {t['s_per_step']} s/step {t['steps']}, {t['prompt_tokens_per_step']} prompt tokens "
                  f"computed per step, about {t['epoch_estimate_s']} s per epoch")
        print(f"  turn grouping: {ratio:.2f}x the speed")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
