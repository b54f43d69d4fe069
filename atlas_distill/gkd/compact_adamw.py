"""AdamW with its two moments kept in bf16, rounded stochastically (the `compact_optimizer` setting).

transformers' default optimizer, PyTorch's fused AdamW, keeps two fp32 moments per trained weight: for the
15-layer builtin student (81 M weights) 621 MB, the largest single part of a CPU run's peak memory (more than the
weights, their gradients or the bf16 teacher). `CompactAdamW` does AdamW's arithmetic in fp32 with PyTorch's own
fused kernel (`torch._fused_adamw_`: the same formula, weight decay decoupled), on the moments widened from bf16 a
chunk at a time, and stores both moments in bf16: 310 MB less.

Rounding each moment to bf16 to the nearest would bias it: the second moment moves by (1 - beta2) = 0.1 % of
itself per step, less than half of bf16's relative spacing (0.4-0.8 %), so a decaying moment would stay where it
is. Each moment is rounded stochastically instead, up or down with the probability that makes its expected
value the fp32 one (random bits added below bf16's 16 bits, then cut off), so it tracks fp32 AdamW's on average
(tests/test_compact_adamw.py checks a decaying moment and a training trajectory against PyTorch's AdamW).

The random bits: drawing fresh ones for every weight took 0.48 s per step on a 2-core CPU (PyTorch's CPU generator
is sequential) against the fused AdamW's 0.04 s. Each step draws a pool of two chunks' worth instead, from a
generator seeded with (seed, step), and each chunk's rounding reads a window of it at an offset drawn from that
generator: every rounding's noise is then uniform and independent of the last step's, so no bias builds up (a
moment adds up its roundings over 1 / (1 - beta) steps: a pool drawn once for the whole run, its mean off by a
fraction of a unit, left a decaying moment 4 % low in a test). The optimizer never touches torch's global random
state (the on-policy sampling draws from it), the same seed gives the same trajectory, and a run resumed from a
checkpoint (the moments and steps in the state dict) rounds as the uninterrupted run would have.

Large tensors are processed in chunks of `CHUNK` elements, so the step's fp32 temporaries stay a few MB
(and in the CPU's cache). A step over the builtin student's 81 M weights took 87.8 ms against 150.9 ms when this
class did the arithmetic in seven separate passes, and PyTorch's fused AdamW (fp32 moments) 44.6 ms (2-core Zen 4;
benchmarks/optimizer_bench.py).
"""

from __future__ import annotations

import torch

CHUNK = 1 << 19  # elements per chunk: the fp32 temporaries of one chunk are 2 MB each (the fastest of 128K-1M)
RANDOM_BITS = 16  # bf16 keeps the upper 16 bits of an fp32


def stochastic_round_(destination: torch.Tensor, values: torch.Tensor, noise: torch.Tensor) -> None:
    """Write fp32 `values` into bf16 `destination`, each rounded up or down at random: `noise` (int32, uniform in
    [0, 2**16)) is added to the 16 bits bf16 drops and those bits are cleared, which leaves an exact bf16 value for
    the (vectorised) conversion to copy. Rounds the magnitude, so the same for negative values. `values` is
    overwritten."""
    bits = values.view(torch.int32).add_(noise).bitwise_and_(-(1 << RANDOM_BITS))
    destination.copy_(bits.view(values.dtype))


class CompactAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected, PyTorch's formula) with bf16 moments rounded stochastically;
    the weights stay in their own dtype, the arithmetic is fp32. `seed` seeds the rounding's random bits."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, seed: int = 0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"CompactAdamW needs lr, eps, weight_decay >= 0 and betas in [0, 1): lr={lr}, "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.seed = seed
        self.generator = torch.Generator()
        self._pool: torch.Tensor | None = None

    def _draw_pool(self, step: int) -> None:
        """This step's random bits: two chunks' worth of int32 values in [0, 2**16), from (seed, step)."""
        self.generator.manual_seed(hash((self.seed, step)) & (2**63 - 1))
        if self._pool is None or len(self._pool) != 2 * CHUNK:
            self._pool = torch.empty(2 * CHUNK, dtype=torch.int32)
        self._pool.random_(0, 1 << RANDOM_BITS, generator=self.generator)

    def _noise(self, length: int, device: torch.device) -> torch.Tensor:
        """`length` of this step's random bits, a window of its pool (on the CPU, as its generator) at an offset
        drawn from `generator`, on `device` (no copy for CPU weights, the trainer's case)."""
        start = int(torch.randint(0, CHUNK + 1, (), generator=self.generator))
        return self._pool[start:start + length].to(device)

    def load_state_dict(self, state_dict) -> None:
        """PyTorch's, which casts each moment to its weight's dtype, then the moments back to bf16 (exactly, where
        they were bf16 values), contiguous as `step` reads them (PyTorch's AdamW keeps a transposed weight's moments
        transposed)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for name in ("exp_avg", "exp_avg_sq"):
                if name in state:
                    state[name] = state[name].to(torch.bfloat16, memory_format=torch.contiguous_format)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # the step this is, as the state dict has it after a resume: one more than the most any weight has taken
        self._draw_pool(1 + max((int(state["step"]) for state in self.state.values() if "step" in state), default=0))
        scratch = {}  # device -> the fp32 [3, CHUNK] the chunks' arithmetic reuses, for this step only
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("CompactAdamW does not take sparse gradients.")
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for name in ("exp_avg", "exp_avg_sq"):
                        state[name] = torch.zeros(param.shape, dtype=torch.bfloat16, device=param.device)
                state["step"] += 1
                weights = param.view(-1) if param.is_contiguous() else param.contiguous().view(-1)
                if param.device not in scratch:
                    scratch[param.device] = torch.empty(3, CHUNK, device=param.device)
                self._update(weights, param.grad.reshape(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                             state["step"].to(param.device), group, scratch[param.device])
                if not param.is_contiguous():  # the update went to a copy
                    param.copy_(weights.view(param.shape))
        return loss

    def _update(self, weights, grads, exp_avg, exp_avg_sq, step: torch.Tensor, group: dict,
                scratch: torch.Tensor) -> None:
        """PyTorch's AdamW update of flat `weights` in place, chunk by chunk: the moments widened into `scratch`
        (fp32 [3, CHUNK], reused for every chunk and weight: three new tensors per chunk cost more than the
        arithmetic), updated with the weights by PyTorch's own fused AdamW kernel (`torch._fused_adamw_`, its
        formula and its one pass over the four tensors), then rounded back to bf16 stochastically. Weights and
        gradients in another dtype are widened too, and the weights rounded back to it to the nearest."""
        beta1, beta2 = group["betas"]
        for start in range(0, weights.numel(), CHUNK):
            end = min(start + CHUNK, weights.numel())
            first, second, wide = scratch[:, :end - start]
            first.copy_(exp_avg[start:end])
            second.copy_(exp_avg_sq[start:end])
            chunk = weights[start:end]
            widened = chunk.dtype != scratch.dtype
            if widened:
                wide.copy_(chunk)
            torch._fused_adamw_([wide if widened else chunk], [grads[start:end].to(scratch.dtype)], [first], [second],
                                [], [step], lr=group["lr"], beta1=beta1, beta2=beta2,
                                weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False)
            if widened:
                chunk.copy_(wide)
            stochastic_round_(exp_avg[start:end], first, self._noise(end - start, weights.device))
            stochastic_round_(exp_avg_sq[start:end], second, self._noise(end - start, weights.device))
