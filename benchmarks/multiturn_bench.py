"""Off-policy multi-turn GKD: one pass per conversation over all its target spans, against the naive expansion.

The naive way to learn every action of an episode is one training row per target turn: the
conversation up to that turn, with that turn as the only completion (what a final-answer-only
trainer, TRL's GKDTrainer included, would need). Ours is one row per conversation with the loss on
every target span, in one forward pass. Both see the same target tokens once, with the same models
and settings; what differs is how often the shared prefixes are recomputed.

Setup: teacher = the builtin SmolLM2-135M-Instruct (fp32), student = its 15 even-numbered layers; the
first `--sessions` training conversations of the bundled demo traces (data.targets all); lmbda 0
(off-policy), beta 0.5, T 0.9, batch 4, lr 1e-5, the teacher cache off (each target is seen once
anyway). Figures: wall seconds of the whole pass, target tokens trained per second, and the ratio.

    python benchmarks/multiturn_bench.py [--sessions 12] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

from _common import log  # benchmarks/ is sys.path[0] when a script runs
from train_bench import BATCH, SETTINGS, _config, _models


def _rows(tokenizer, sessions: int) -> list[dict]:
    from atlas_distill.data import build_gkd_dataset
    from atlas_distill.demo import DEMO_TRACES

    train, _ = build_gkd_dataset(traces=str(DEMO_TRACES), min_reward=None, targets="all", tokenizer=tokenizer,
                                 max_length=SETTINGS["max_length"], seed=SETTINGS["seed"])
    return [{"messages": r["messages"], "targets": r["targets"], "reference": r["reference"]}
            for r in train.select(range(sessions))]


def expand(rows: list[dict]) -> list[dict]:
    """One row per target turn: the conversation through that turn, that turn its only target."""
    return [{"messages": r["messages"][: t + 1], "targets": [t], "reference": r["reference"]}
            for r in rows for t in r["targets"]]


def target_tokens(tokenizer, rows: list[dict]) -> int:
    from atlas_distill.target_spans import encode_to_fit

    return sum(e - s for r in rows
               for s, e in encode_to_fit(tokenizer, r["messages"], r["targets"], SETTINGS["max_length"]).spans)


def run(mode: str, rows: list[dict]) -> dict:
    import torch
    from datasets import Dataset

    from atlas_distill.gkd import AtlasGKDTrainer

    tokenizer, teacher, student = _models()
    steps = -(-len(rows) // BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = AtlasGKDTrainer(model=student, teacher_model=teacher, processing_class=tokenizer,
                                  args=_config(tmp, steps, gc=False, lmbda=0.0, seed=SETTINGS["seed"], bf16=False,
                                               teacher_cache_topk=0, group_by_length=False),
                                  train_dataset=Dataset.from_list(rows))
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # stdout is the --json document
        torch.manual_seed(0)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    tokens = target_tokens(tokenizer, rows)
    return {"mode": mode, "rows": len(rows), "steps": steps, "seconds": round(seconds, 1),
            "target_tokens": tokens, "target_tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=12)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tokenizer, _, _ = _models()
    rows = _rows(tokenizer, args.sessions)
    results = []
    for mode, data in (("one pass per conversation", rows), ("naive: one row per target", expand(rows))):
        log(f"{mode}: {len(data)} rows")
        results.append(run(mode, data))
        log(json.dumps(results[-1]))
    ours, naive = results
    summary = {"cpu": platform.processor() or platform.machine(), "rows": results,
               "speedup": round(ours["target_tokens_per_s"] / naive["target_tokens_per_s"], 2)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for r in results:
        print(f"{r['mode']:<28} {r['rows']:>4} rows {r['steps']:>3} steps {r['seconds']:>7.1f} s "
              f"{r['target_tokens_per_s']:>7.1f} target tokens/s")
    print(f"one pass / naive: {summary['speedup']}x target tokens/s")


if __name__ == "__main__":
    main()
