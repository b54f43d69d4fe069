"""`compact_optimizer`: one optimizer step over the builtin student's weights, CompactAdamW against PyTorch's AdamW.

    python benchmarks/optimizer_bench.py [--repeats 16] [--json]

The weights of train_bench.py's student (the builtin's 15 layers: the tied embedding and every layer's
projections and norms, 81 M in fp32, random), each with a random gradient, stepped by three optimizers that each
own a copy of them: PyTorch's fused AdamW (transformers' default, fp32 moments: the anchor), CompactAdamW as it is
(bf16 moments; the arithmetic in PyTorch's fused kernel, gkd/compact_adamw.py), and CompactAdamW doing the same
arithmetic in seven separate passes per chunk (what it did before the fused kernel; `SevenPasses` below). They
step in turn, the order reversed every round, `--repeats` rounds (medians: the machine's speed drifts). The
weights are not a model's, so no forward or backward runs: only the optimizer's step is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

from _common import cpu_description, log


def _student_shapes() -> list[tuple[int, ...]]:
    """The trained weights of train_bench.py's student: SmolLM2-135M's embedding and 15 of its 30 layers."""
    layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536), (576,), (576,)]
    return [(49152, 576), *layer * 15, (576,)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    options = parser.parse_args()

    import torch

    from atlas_distill.gkd import compact_adamw
    from atlas_distill.gkd.compact_adamw import CompactAdamW

    class SevenPasses(CompactAdamW):
        """The update as separate PyTorch operations on each chunk (lerp, copy, mul, addcmul, sqrt, add, addcdiv)."""

        def _update(self, weights, grads, exp_avg, exp_avg_sq, step, group, scratch) -> None:
            (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
            step_size, root_correction = lr / (1 - beta1 ** step.item()), math.sqrt(1 - beta2 ** step.item())
            if group["weight_decay"]:
                weights.mul_(1 - lr * group["weight_decay"])
            for start in range(0, weights.numel(), compact_adamw.CHUNK):
                end = min(start + compact_adamw.CHUNK, weights.numel())
                first, second, denominator = scratch[:, :end - start]
                grad = grads[start:end].to(scratch.dtype)
                first.copy_(exp_avg[start:end]).lerp_(grad, 1 - beta1)
                second.copy_(exp_avg_sq[start:end]).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                torch.sqrt(second, out=denominator).add_(eps * root_correction)
                weights[start:end].addcdiv_(first, denominator, value=-step_size * root_correction)
                compact_adamw.stochastic_round_(exp_avg[start:end], first, self._noise(end - start, weights.device))
                compact_adamw.stochastic_round_(exp_avg_sq[start:end], second,
                                                self._noise(end - start, weights.device))

    makers = {
        "PyTorch fused AdamW (fp32 moments)": lambda params: torch.optim.AdamW(params, lr=1e-5, fused=True),
        "CompactAdamW (bf16 moments, fused kernel)": lambda params: CompactAdamW(params, lr=1e-5),
        "CompactAdamW, seven passes (before)": lambda params: SevenPasses(params, lr=1e-5),
    }
    torch.manual_seed(0)
    optimizers = {}
    for name, make in makers.items():
        params = [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape in _student_shapes()]
        for param in params:
            param.grad = torch.randn_like(param) * 1e-3
        optimizers[name] = make(params)
        optimizers[name].step()  # the moments made
    seconds: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_ in range(options.repeats):
        for name in (list(optimizers) if round_ % 2 == 0 else list(optimizers)[::-1]):
            started = time.perf_counter()
            optimizers[name].step()
            seconds[name].append(time.perf_counter() - started)
    weights = sum(math.prod(shape) for shape in _student_shapes())
    result = {"cpu": cpu_description(), "weights": weights,
              "step_ms": {name: round(statistics.median(values) * 1e3, 1) for name, values in seconds.items()}}
    if options.json:
        print(json.dumps(result))
        return
    log(f"CPU: {result['cpu']}; one step over {weights / 1e6:.1f} M fp32 weights, medians of {options.repeats}")
    anchor = result["step_ms"][next(iter(makers))]
    print("| optimizer | ms per step | against PyTorch's fused AdamW |\n| --- | ---: | ---: |")
    for name, ms in result["step_ms"].items():
        print(f"| {name} | {ms} | {ms / anchor:.2f}x |")


if __name__ == "__main__":
    main()
