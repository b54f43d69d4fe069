"""The chunked loss's forward + backward: ours against the checkpointed chunks it replaced and TRL's (issue 15).

    python benchmarks/loss_bench.py [--repeats 8] [--json]

One batch of train_bench.py's shape: 4 completions of 32 positions (128 hidden states of width 576), both heads
[49,152, 576] fp32 and random, beta 0.5, temperature 0.9; the loss is the sum over positions / 128, then backward
into the student's hidden states and head. Three ways, run alternately `--repeats` times (medians; the machine's
speed drifts), in fp32 and under bf16 autocast:
- ours: `divergence.chunked_divergence`, each 64-position chunk's gradient taken in its forward pass;
- checkpointed: the same chunks under activation checkpointing, recomputed in backward (ours until commit 86dd449);
- trl: DistillationTrainer's `_chunked_divergence_loss` (TRL's ChunkedDivergenceFunction; no Triton on a CPU).

`--topk K` times the off-policy loss against a teacher's cached top K (the teacher cache's and the teacher store's,
`divergence.topk_divergence`) instead, two ways: ours (each chunk's gradient taken in forward) and checkpointed (each
chunk recomputed in backward, ours until this option came); TRL has no such loss.

    python benchmarks/loss_bench.py --topk 512 [--positions 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import cpu_description, log

V, H, BATCH, COMPLETION, BETA, TEMPERATURE = 49_152, 576, 4, 32, 0.5, 0.9


def _head_as_it_was(model):
    """lm_head over V as the loss read it before (divergence._head, then cast once to autocast's dtype when it is
    on), for the comparators below that stand for the chunks as they were."""
    import torch

    from atlas_distill.gkd import divergence

    weight, bias = divergence._head(model, V)
    if torch.is_autocast_enabled(weight.device.type):
        dtype = torch.get_autocast_dtype(weight.device.type)
        weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
    return weight, bias


def _checkpointed(hidden_s, hidden_t, student, teacher):
    """The chunked loss as it was: each chunk checkpointed, its tiles recomputed in backward."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from atlas_distill.gkd import divergence

    s_weight, s_bias = _head_as_it_was(student)
    t_weight, t_bias = _head_as_it_was(teacher)

    def chunk(h_s, h_t):
        log_s = divergence._log_probs(h_s, s_weight, s_bias, TEMPERATURE)
        with torch.no_grad():
            log_t = divergence._log_probs(h_t, t_weight, t_bias, TEMPERATURE)
        return divergence.generalized_jsd(log_s, log_t, BETA)

    step = divergence.TOKEN_CHUNK
    return torch.cat([checkpoint(chunk, hidden_s[i:i + step], hidden_t[i:i + step], use_reentrant=False)
                      for i in range(0, hidden_s.shape[0], step)])


def _checkpointed_topk(hidden_s, student, indices, values, tail):
    """The top-k loss as it was: each chunk checkpointed, the student's tile projected again in backward."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from atlas_distill.gkd import divergence

    weight, bias = _head_as_it_was(student)

    def chunk(h_s, index, chunk_values, chunk_tail):
        log_probs = divergence._log_probs(h_s, weight, bias, TEMPERATURE)
        folded = torch.cat([log_probs.gather(-1, index), divergence._tail(log_probs, index).unsqueeze(-1)], dim=-1)
        return divergence.generalized_jsd(folded, torch.cat([chunk_values, chunk_tail.unsqueeze(-1)], dim=-1), BETA)

    step, index = divergence.TOKEN_CHUNK, indices.long()
    return torch.cat([checkpoint(chunk, hidden_s[i:i + step], index[i:i + step], values[i:i + step],
                                 tail[i:i + step], use_reentrant=False) for i in range(0, hidden_s.shape[0], step)])


def _exact_losses(hidden_s, hidden_t, student, teacher) -> dict:
    """The exact loss three ways: ours, checkpointed, TRL's (in its [batch, completion] layout: BATCH rows when the
    positions divide evenly, else one)."""
    import torch
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from atlas_distill.gkd import divergence

    n = hidden_s.shape[0]
    rows = BATCH if n % BATCH == 0 else 1
    shape = (rows, n // rows, H)
    mask = torch.ones(shape[:2], dtype=torch.long)
    return {
        "ours": lambda: divergence.chunked_divergence(hidden_s, hidden_t, student, teacher, vocab=V, beta=BETA,
                                                      temperature=TEMPERATURE).sum() / n,
        "checkpointed": lambda: _checkpointed(hidden_s, hidden_t, student, teacher).sum() / n,
        "trl": lambda: _chunked_divergence_loss(hidden_s.view(shape), hidden_t.view(shape), student.lm_head.weight,
                                                teacher.lm_head.weight, mask, BETA, temperature=TEMPERATURE)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--topk", type=int, metavar="K", help="instead: the loss against a cached top-K teacher")
    parser.add_argument("--positions", type=int, default=BATCH * COMPLETION, help="completion positions in the batch")
    args = parser.parse_args()

    import torch

    from atlas_distill.gkd import divergence

    class Head(torch.nn.Module):
        def __init__(self, generator) -> None:
            super().__init__()
            self.lm_head = torch.nn.Linear(H, V, bias=False)
            self.lm_head.weight.data.copy_(torch.randn(V, H, generator=generator) * 0.05)

        def get_output_embeddings(self):
            return self.lm_head

    generator = torch.Generator().manual_seed(0)
    student, teacher = Head(generator), Head(generator)
    n = args.positions
    hidden_s = torch.randn(n, H, generator=generator, requires_grad=True)
    hidden_t = torch.randn(n, H, generator=generator)
    if args.topk:
        cached = divergence.teacher_topk(hidden_t, teacher, vocab=V, k=args.topk, temperature=TEMPERATURE)
        losses = {
            "ours": lambda: divergence.topk_divergence(hidden_s, student, vocab=V, beta=BETA, temperature=TEMPERATURE,
                                                       indices=cached[0], teacher_values=cached[1],
                                                       teacher_tail=cached[2]).sum() / n,
            "checkpointed": lambda: _checkpointed_topk(hidden_s, student, *cached).sum() / n,
        }
    else:
        losses = _exact_losses(hidden_s, hidden_t, student, teacher)
    results = {"cpu": cpu_description(), "positions": n, "vocab": V, "topk": args.topk}
    for precision in ("fp32", "bf16"):
        def run(loss, bf16=precision == "bf16"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                value = loss()
            value.backward()
            student.lm_head.weight.grad = hidden_s.grad = None
            return value.item()

        values = {name: run(loss) for name, loss in losses.items()}  # warm-up, and the same loss from each
        seconds: dict[str, list[float]] = {name: [] for name in losses}
        for _ in range(args.repeats):
            for name, loss in losses.items():
                started = time.perf_counter()
                run(loss)
                seconds[name].append(time.perf_counter() - started)
        medians = {name: statistics.median(times) for name, times in seconds.items()}
        results[precision] = {name: {"ms": round(medians[name] * 1e3, 1), "loss": round(values[name], 6),
                                     "ours_speedup": round(medians[name] / medians["ours"], 2)} for name in losses}
        log(f"{precision}: " + ", ".join(f"{name} {medians[name] * 1e3:.1f} ms" for name in losses))
    if args.json:
        print(json.dumps(results))
        return
    against = f", against a cached top {args.topk}" if args.topk else ""
    print(f"CPU: {results['cpu']}; {n} positions x {V:,} tokens{against}, forward + backward, medians of "
          f"{args.repeats}")
    print("| precision | way | ms | ours' speed-up | loss |\n| --- | --- | ---: | ---: | ---: |")
    for precision in ("fp32", "bf16"):
        for name, row in results[precision].items():
            speedup = "" if name == "ours" else f"{row['ours_speedup']:.2f}x"
            print(f"| {precision} | {name} | {row['ms']} | {speedup} | {row['loss']} |")


if __name__ == "__main__":
    main()
