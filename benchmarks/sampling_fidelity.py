"""How far each way ours can sample from is from the fp32 student's own distribution, at the same prefixes (issue 15).

`train_bench.py --learning` found ours' 30-step gap to DistillationTrainer with sampling in bf16 and none with the
fp32 student sampling itself (benchmarks/README.md). A learning run takes minutes per seed and its end moves by up to
0.02 with rounding alone; this measures the cause directly, in seconds. For each of `--sessions` demo training
sessions (train_bench's setup: the builtin's 15 even-numbered layers, fp32), the prompt and the first `--tokens`
tokens of the reference answer are fed to each way as generation feeds a sampler: the prompt (all but its last
token) through the model that fills the KV cache, then one token at a time through the sampler with that cache. At
each answer position the way's next-token distribution at T is compared with the fp32 student's:

- "fp32 student, packed decoding": the fp32 student samples itself as the trainer does on a CPU (its decoding
  steps on oneDNN's packed fp32 weights, `packed_linear.pack_for_decoding`): the check that the yardstick is ~0;
- "bf16 copy": the trainer's own sampling copy (`_sampling_copy`, packed where oneDNN has bf16), filling its cache
  itself (under gradient checkpointing, or with `prefill_once` off);
- "bf16 copy, prompt pass in fp32" / "... under bf16 autocast": the copy decoding from the training forward's cache
  of the prompt (`prefill_once`, no checkpointing), computed in fp32 or under autocast;
- "student under bf16 autocast": the student sampling itself under bf16 mixed precision
  (`generation_dtype: float32` with `model.dtype: bfloat16`);
- "bf16 copy, fp32 head": a candidate measured and not adopted: the copy with its output head's product in fp32
  (the bf16 hidden state widened, times the student's fp32 head), as the teacher's logits are computed.

Each row: the mean KL(fp32 student || way) per position, the mean over sessions of its sum over the answer's
positions (how far `--tokens` sampled tokens drift from on-policy), and the mean entropy of the way's distributions
(the fp32 student's on the first row).

    python benchmarks/sampling_fidelity.py [--sessions 16] [--tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

from _common import cpu_description, log
from train_bench import SETTINGS, _config, _datasets, _models


def next_token_log_probs(filler, sampler, ids, prompt_length: int, *, temperature: float, fill_autocast: bool = False,
                         sample_autocast: bool = False, cache_dtype=None):
    """[n, V] fp32 log-probs at `temperature` of the next token after each of ids[prompt_length - 1:-1] (ids: [L],
    the prompt then n answer tokens), as a sampler computes them in generation: ids[:prompt_length - 1] through
    `filler` into a KV cache (in `cache_dtype`: None keeps it), then one token at a time through `sampler`."""
    import torch
    from transformers import DynamicCache

    def autocast(enabled: bool):
        return torch.autocast(ids.device.type, dtype=torch.bfloat16) if enabled else nullcontext()

    with torch.inference_mode():
        with autocast(fill_autocast):
            filled = filler(input_ids=ids[None, :prompt_length - 1], use_cache=True).past_key_values
        cache = DynamicCache([(layer.keys.to(cache_dtype or layer.keys.dtype),
                               layer.values.to(cache_dtype or layer.values.dtype)) for layer in filled.layers])
        rows = []
        with autocast(sample_autocast):
            for position in range(prompt_length - 1, ids.shape[0] - 1):
                out = sampler(input_ids=ids[None, position:position + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                rows.append(out.logits[0, -1].float())
    return (torch.stack(rows) / temperature).log_softmax(-1)


@contextmanager
def _fp32_head(copy_model, student):
    """While entered, the copy's output head computes its logits in fp32: its bf16 hidden state widened, times the
    student's fp32 head (the candidate row)."""
    import functools

    import torch

    head, source = copy_model.get_output_embeddings(), student.get_output_embeddings()
    own = vars(head).get("forward")  # a packed forward (packed_linear.pack), or none

    def forward(weight, bias, hidden):
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.linear(hidden.float(), weight, bias)

    head.forward = functools.partial(forward, source.weight, source.bias)
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def measure(sessions: int, tokens: int) -> list[dict]:
    """Each way's KL from the fp32 student and entropy, per position and summed over each session's answer."""
    import torch

    from atlas_distill.gkd import AtlasGKDTrainer, divergence, packed_linear

    def entropy_of(log_probs) -> float:  # mean over positions
        return float(-(log_probs.exp() * log_probs).sum(-1).mean())

    temperature = SETTINGS["temperature"]
    tokenizer, teacher, student = _models("float32")
    del teacher
    train, _held_out = _datasets(tokenizer)
    student.eval()
    with tempfile.TemporaryDirectory() as tmp:
        # the trainer's own bf16 sampling copy (`generation_dtype: bfloat16` makes one on any CPU)
        trainer = AtlasGKDTrainer(model=student, teacher_model=copy.deepcopy(student),
                                  args=_config(tmp, 1, False, 1.0, SETTINGS["seed"], False,
                                               generation_dtype="bfloat16"),
                                  train_dataset=train, processing_class=tokenizer)
        sampler = trainer._sampling_copy().eval()
        packed_student = copy.deepcopy(student)
        packed_linear.pack_for_decoding(packed_student, trainer.args.per_device_train_batch_size)
        ways = {
            "fp32 student, packed decoding": dict(filler=student, sampler=packed_student),
            "bf16 copy": dict(filler=sampler, sampler=sampler),
            "bf16 copy, prompt pass in fp32": dict(filler=student, sampler=sampler, cache_dtype=torch.bfloat16),
            "bf16 copy, prompt pass under bf16 autocast": dict(filler=student, sampler=sampler, fill_autocast=True,
                                                               cache_dtype=torch.bfloat16),
            "student under bf16 autocast": dict(filler=student, sampler=student, fill_autocast=True,
                                                sample_autocast=True),
            "bf16 copy, fp32 head (candidate)": dict(filler=sampler, sampler=sampler, head=True),
        }
        kl = {name: [] for name in ways}
        entropy = {name: [] for name in ["fp32 student", *ways]}
        for index in range(min(sessions, len(train))):
            row = train[index]
            prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
            answer = tokenizer(row["messages"][-1]["content"], add_special_tokens=False)["input_ids"][:tokens]
            ids = torch.tensor(prompt + answer)
            reference = next_token_log_probs(student, student, ids, len(prompt), temperature=temperature)
            entropy["fp32 student"].append(entropy_of(reference))
            for name, way in ways.items():
                way = dict(way)
                with _fp32_head(sampler, student) if way.pop("head", False) else nullcontext():
                    mine = next_token_log_probs(ids=ids, prompt_length=len(prompt), temperature=temperature, **way)
                kl[name].append(divergence.generalized_jsd(mine, reference, 0.0))  # beta 0: KL(reference || mine)
                entropy[name].append(entropy_of(mine))
            log(f"session {index + 1}/{sessions}: {len(prompt)} prompt tokens, {len(answer)} answer tokens")
    rows = [{"way": "fp32 student", "kl_per_position": 0.0, "kl_per_answer": 0.0,
             "entropy": round(statistics.mean(entropy["fp32 student"]), 5)}]
    for name in ways:
        rows.append({"way": name, "kl_per_position": round(float(torch.cat(kl[name]).mean()), 6),
                     "kl_per_answer": round(statistics.mean(float(values.sum()) for values in kl[name]), 5),
                     "entropy": round(statistics.mean(entropy[name]), 5)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=16, help="demo training sessions (default 16)")
    parser.add_argument("--tokens", type=int, default=SETTINGS["max_new_tokens"],
                        help="answer tokens per session (default: train_bench's max_new_tokens)")
    parser.add_argument("--json", action="store_true", help="one JSON list of rows on stdout")
    args = parser.parse_args()
    if args.sessions < 1 or args.tokens < 1:
        parser.error("--sessions and --tokens: at least 1")
    rows = measure(args.sessions, args.tokens)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{cpu_description()}; {args.sessions} sessions, the first {args.tokens} answer tokens, "
          f"T {SETTINGS['temperature']}")
    print("| way | KL from the fp32 student, per position | per answer | entropy |\n| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['way']} | {row['kl_per_position']:.5f} | {row['kl_per_answer']:.4f} | {row['entropy']:.4f} |")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
