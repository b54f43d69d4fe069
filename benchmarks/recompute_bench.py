"""`lean_recompute`: one decoder layer's recompute under replayed checkpointing, with the MLP's output and without.

    python benchmarks/recompute_bench.py [--repeats 30] [--positions 200] [--json]

One layer of train_bench.py's student (the builtin's layer 6, fp32) over a batch of 4 x `--positions` random hidden
states, with `lean_activations`' MLP as training runs it: the layer's forward with gradient, then its backward, as
backward's recompute of a replayed layer runs them (gkd/replay.py). Two ways, run alternately `--repeats` times
(medians; the machine's speed drifts): the MLP's output computed, and skipped (`unread_mlp_outputs`: zeros instead
of the down projection, which nothing reads there). It also checks that both give the same gradients bit for bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

from _common import cpu_description, log

BATCH = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--positions", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    options = parser.parse_args()

    import torch
    from train_bench import _models

    from atlas_distill.gkd.lean_activations import lean_activations, unread_mlp_outputs

    _, _, student = _models("float32")
    layer = student.model.layers[3]
    torch.manual_seed(0)
    hidden = torch.randn(BATCH, options.positions, student.config.hidden_size)
    positions = torch.arange(options.positions).expand(BATCH, -1)
    embeddings = student.model.rotary_emb(hidden, positions)
    incoming = torch.randn_like(hidden)

    def recompute(skip: bool) -> tuple[float, float, list[torch.Tensor]]:
        with lean_activations(student, norms=False):
            again = hidden.detach().requires_grad_()
            started = time.perf_counter()
            with unread_mlp_outputs() if skip else nullcontext():
                output = layer(again, attention_mask=None, position_embeddings=embeddings, position_ids=positions)
            forwarded = time.perf_counter()
            torch.autograd.backward(output, incoming)
            done = time.perf_counter()
        grads = [again.grad] + [p.grad for p in layer.parameters()]
        for p in layer.parameters():
            p.grad = None
        return forwarded - started, done - forwarded, grads

    same = all(torch.equal(a, b) for a, b in zip(recompute(False)[2], recompute(True)[2], strict=True))
    seconds = {way: ([], []) for way in ("computed", "skipped")}
    for _ in range(options.repeats):
        for way in seconds:
            forward, backward, _ = recompute(way == "skipped")
            seconds[way][0].append(forward)
            seconds[way][1].append(backward)
    result = {"cpu": cpu_description(), "positions": options.positions, "same_gradients": same}
    for way, (forward, backward) in seconds.items():
        result[way] = {"forward_ms": round(statistics.median(forward) * 1e3, 1),
                       "backward_ms": round(statistics.median(backward) * 1e3, 1)}
    if options.json:
        print(json.dumps(result))
        return
    log(f"CPU: {result['cpu']}; one layer, batch {BATCH} x {options.positions}, medians of {options.repeats}")
    print("| MLP output in the recompute | forward ms | backward ms |\n| --- | ---: | ---: |")
    for way in seconds:
        print(f"| {way} | {result[way]['forward_ms']} | {result[way]['backward_ms']} |")
    print(f"same gradients bit for bit: {same}")


if __name__ == "__main__":
    main()
