"""On-policy sampling's two CPU fixes, each against what it replaced, interleaved in one process (issue 15).

    python benchmarks/generation_bench.py [--repeats 8] [--json]
    python benchmarks/generation_bench.py --overlap [--repeats 8] [--json]

The model is the sampling copy of train_bench.py's student (the builtin's 15 even-numbered layers, bf16), the
prompts 4 random ones of 170 tokens, left-padded by 20 and 5, as a GKD batch is; 32 new tokens at temperature
0.9, top_k 0. Two comparisons, each run alternately `--repeats` times (medians; the machine's speed drifts):
- the head's input: generation's first forward (the prompt, projecting its last position) with the lm_head's
  input as transformers slices it, a [4, 1, 576] view, against it made contiguous (`models.contiguous_head_input`);
- the draw: `generate` with torch.multinomial against the inverse-CDF draw (`gkd.sampling`), the head fixed.

`--overlap` measures a candidate that was not adopted: the teacher's forward over the prompts (as train loads it,
bf16 here) in a second thread while the fp32 student samples on its packed decoding weights (as under gradient
checkpointing), against the two one after the other, and each alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from _common import cpu_description, log


def _alternate(runs: dict, repeats: int) -> dict[str, float]:
    for run in runs.values():  # warm-up
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return {name: round(statistics.median(values), 4) for name, values in seconds.items()}


def _prompts(tokenizer):
    """4 random prompts of 170 tokens, left-padded by 20 and 5 (the module's doc): ids and attention mask."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, len(tokenizer), (4, 170), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :20] = mask[1, :5] = 0
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--overlap", action="store_true", help="the teacher's prompt forward beside generation")
    args = parser.parse_args()
    if args.overlap:
        return overlap(args)

    import torch
    from transformers import GenerationConfig

    from atlas_distill.gkd.sampling import inverse_cdf_sampling
    from atlas_distill.models import contiguous_head_input
    from train_bench import _models

    tokenizer, _teacher, student = _models("bfloat16")
    del _teacher
    sampler = student.to(torch.bfloat16).eval().requires_grad_(False)  # frozen, as the trainer's copy
    head = sampler.get_output_embeddings()
    head._forward_pre_hooks.clear()  # load_model put the fix there: measured without it first
    head._atlas_contiguous_input = False
    ids, mask = _prompts(tokenizer)
    config = GenerationConfig(max_new_tokens=32, do_sample=True, temperature=0.9, top_k=0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=None)

    @torch.no_grad()
    def prefill():
        sampler(input_ids=ids, attention_mask=mask, logits_to_keep=1)

    @torch.no_grad()
    def generate(draw):
        with draw():
            sampler.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    log("the head's input: generation's first forward")
    sliced = _alternate({"sliced": prefill}, args.repeats)
    contiguous_head_input(sampler)
    fixed = _alternate({"contiguous": prefill}, args.repeats)
    assert head._forward_pre_hooks, "the fix was not installed"
    log("the draw: 32 tokens for 4 prompts")
    draws = _alternate({"multinomial": lambda: generate(nullcontext), "inverse_cdf": lambda: generate(
        inverse_cdf_sampling)}, args.repeats)
    result = {"cpu": cpu_description(), "prefill_s": {**sliced, **fixed}, "generate_s": draws}
    if args.json:
        print(json.dumps(result))
        return
    print(f"CPU: {result['cpu']}")
    print(f"first forward, head input as sliced: {sliced['sliced']:.3f} s; contiguous: {fixed['contiguous']:.3f} s "
          f"({sliced['sliced'] / fixed['contiguous']:.1f}x)")
    print(f"generate, torch.multinomial: {draws['multinomial']:.3f} s; inverse CDF: {draws['inverse_cdf']:.3f} s "
          f"({1 - draws['inverse_cdf'] / draws['multinomial']:.0%} less)")


def overlap(args) -> None:
    import threading

    import torch

    from atlas_distill.gkd import packed_linear
    from atlas_distill.gkd.divergence import backbone
    from train_bench import _models

    tokenizer, teacher, student = _models("auto")
    teacher.eval()
    student.eval()
    ids, mask = _prompts(tokenizer)
    settings = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": True, "temperature": 0.9, "top_k": 0,
                "pad_token_id": tokenizer.pad_token_id}

    @torch.no_grad()
    def generate():
        packed = packed_linear.pack_for_decoding(student, ids.shape[0])
        try:
            student.generate(input_ids=ids, attention_mask=mask, **settings)
        finally:
            packed_linear.restore(packed)

    @torch.inference_mode()
    def teacher_prompt():
        backbone(teacher)(input_ids=ids, attention_mask=mask, use_cache=True)

    def overlapped():
        beside = threading.Thread(target=teacher_prompt)
        beside.start()
        generate()
        beside.join()

    log("generation (32 tokens for 4 prompts) and the teacher's prompt forward: alone, in turn, overlapped")
    seconds = _alternate({"generation": generate, "teacher_prompt": teacher_prompt,
                          "in_turn": lambda: (generate(), teacher_prompt()), "overlapped": overlapped}, args.repeats)
    result = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "seconds": seconds}
    if args.json:
        print(json.dumps(result))
        return
    print(f"CPU: {result['cpu']}; {result['threads']} intra-op threads")
    print(f"generation {seconds['generation']:.2f} s, teacher's prompt forward {seconds['teacher_prompt']:.2f} s; "
          f"in turn {seconds['in_turn']:.2f} s, overlapped {seconds['overlapped']:.2f} s "
          f"({seconds['in_turn'] - seconds['overlapped']:+.2f} s)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
