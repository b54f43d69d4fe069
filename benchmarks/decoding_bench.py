"""`lean_decoding`: one decoding forward of the fp32 student through transformers' decoder layers and the lean ones.

    python benchmarks/decoding_bench.py [--repeats 25] [--calls 8] [--prompt 200] [--generations 8] [--json]

train_bench.py's student (the builtin's 15 layers, fp32), its decoding weights packed as the trainer packs them
when the student samples itself on a CPU (`packed_generation`; gkd/packed_linear.py `pack_for_decoding`), a KV cache
filled by a random prompt of 4 x `--prompt` tokens. One decoding forward (4 sequences, one new token each, the
output head included) is timed `--calls` times in a row, the new token's cache entries dropped after each; the two
ways, transformers' layers (packed_linear's `pack_for_decoding`) and the lean forward (lean_decoding's), alternate
`--repeats` times (medians: the machine's speed drifts). It also checks both give the same logits, and reports
the largest difference.

Then whole generations as ours' trainer runs them (`AtlasGKDTrainer._generate_into` with train_bench.py's settings,
checkpointing on: 4 prompts, 32 new tokens, packing the weights included), on the first 3 batches of its epoch,
each with the setting on and off in turn from the same seed, `--generations` rounds (0: none); medians, and whether
both drew the same samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import cpu_description, log

BATCH = 4


def generations(rounds: int) -> dict:
    """The trainer's generation on fixed batches, lean_decoding on and off in turn: medians in seconds."""
    import tempfile

    import torch
    from train_bench import SETTINGS, _config, _datasets, _models, build_trainer

    tokenizer, teacher, student = _models("bfloat16")
    train, _ = _datasets(tokenizer)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        args = _config(tmp, 1, True, 1.0, SETTINGS["seed"], False)
        common = {"model": student, "teacher_model": teacher, "args": args, "train_dataset": train,
                  "processing_class": tokenizer}
        trainer = build_trainer("atlas", common, tmp, 1, True, SETTINGS["seed"], False)
        batches = [batch for _, batch in zip(range(3), trainer.get_train_dataloader())]
        for round_ in range(rounds):
            for batch in batches:
                samples = {}
                for on in (True, False):
                    trainer.args.lean_decoding = on
                    inputs = dict(batch)
                    torch.manual_seed(round_)
                    started = time.perf_counter()
                    trainer._generate_into(trainer.model, inputs)
                    seconds[on].append(time.perf_counter() - started)
                    samples[on] = inputs["input_ids"]
                    trainer._recording = None
                same = same and torch.equal(samples[True], samples[False])
    return {"runs": len(seconds[True]), "on_s": round(statistics.median(seconds[True]), 3),
            "off_s": round(statistics.median(seconds[False]), 3), "same_samples": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=200)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    options = parser.parse_args()

    import torch
    from train_bench import _models
    from transformers import DynamicCache

    from atlas_distill.gkd import lean_decoding, packed_linear

    _, _, student = _models("float32")
    student.eval()
    torch.manual_seed(0)
    vocab = student.config.vocab_size
    prompt = torch.randint(0, vocab, (BATCH, options.prompt))
    token = torch.randint(0, vocab, (BATCH, 1))
    mask = torch.ones(BATCH, options.prompt + 1, dtype=torch.long)
    position = torch.full((BATCH, 1), options.prompt)
    cache = DynamicCache(config=student.config)
    with torch.no_grad():
        student(input_ids=prompt, cache=cache, use_cache=True)

    def decode(lean: bool, calls: int) -> tuple[float, torch.Tensor]:
        packed = (lean_decoding if lean else packed_linear).pack_for_decoding(student, BATCH)
        try:
            with torch.no_grad():
                started = time.perf_counter()
                for _ in range(calls):
                    logits = student(input_ids=token, attention_mask=mask, position_ids=position, cache=cache,
                                     use_cache=True).logits
                    cache.crop(-1)
                return (time.perf_counter() - started) / calls, logits
        finally:
            packed_linear.restore(packed)

    ways = {"transformers' layers": False, "lean layers": True}
    plain, lean = decode(False, 1)[1], decode(True, 1)[1]
    milliseconds: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(options.repeats):
        for way, on in ways.items():
            decode(on, 1)  # the packing's first call
            milliseconds[way].append(decode(on, options.calls)[0] * 1e3)
    result = {"cpu": cpu_description(), "prompt": options.prompt, "same_logits": bool(torch.equal(plain, lean)),
              "max_logit_difference": float((plain - lean).abs().max()),
              **{way: round(statistics.median(ms), 2) for way, ms in milliseconds.items()}}
    if options.generations:
        result["generation"] = generations(options.generations)
    if options.json:
        print(json.dumps(result))
        return
    log(f"CPU: {result['cpu']}; one decoding forward, batch {BATCH}, after a {options.prompt}-token prompt, "
        f"medians of {options.repeats} x {options.calls} calls")
    print("| decoder layers | ms per decoding forward |\n| --- | ---: |")
    for way in ways:
        print(f"| {way} | {result[way]} |")
    print(f"same logits bit for bit: {result['same_logits']} (largest difference {result['max_logit_difference']:.2e})")
    if "generation" in result:
        g = result["generation"]
        print(f"one generation (the trainer's, packing included), medians of {g['runs']}: transformers' layers "
              f"{g['off_s']:.3f} s, lean layers {g['on_s']:.3f} s; the same samples: {g['same_samples']}")


if __name__ == "__main__":
    main()
