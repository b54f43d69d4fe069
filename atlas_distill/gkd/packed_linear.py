"""The bf16 sampling copy's linear layers on oneDNN's pre-packed weights, on a CPU (the `packed_generation` setting).

Decoding multiplies a few rows (one per sequence) by every weight of the model, once per token. In bf16 on a CPU,
`F.linear` hands oneDNN each weight in PyTorch's plain layout on every call; packed once into oneDNN's own layout
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing pass uses), the same product
(`_linear_pointwise`) runs faster. On a 2-core Zen 4 CPU, one decoding pass over the builtin student's 106 weights
(155 MB in bf16, batch 4, weights not in cache) took 7.6 ms against 14.0 ms, and a train_bench step's generation
(4 prompts, 32 new tokens) 0.87-0.92 s against 1.15-1.25 s, packing included (about 70 ms: the weights change
every step, so the copy is packed again for each generation). The outputs are the same (equal logits and tokens).

`pack` gives each linear layer of the copy (ours, never the student) a forward on its packed weight; the plain
weights stay, and are freed with the rest of the copy after the generation (`AtlasGKDTrainer._release_sampling_copy`,
which calls `unpack` first to drop the packed ones).
"""

from __future__ import annotations

import functools

import torch


def available() -> bool:
    """Whether this PyTorch has the packed-weight ops and this CPU runs oneDNN in bf16 (AVX512 or newer)."""
    mkldnn = torch.ops.mkldnn
    ops = ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported")
    return (torch.backends.mkldnn.is_available() and all(hasattr(mkldnn, op) for op in ops)
            and bool(mkldnn._is_mkldnn_bf16_supported()))


def _packed_linear(weight, bias, hidden):
    return torch.ops.mkldnn._linear_pointwise(hidden, weight, bias, "none", [], "")


@torch.no_grad()
def pack(copy: torch.nn.Module, batch: int) -> None:
    """Run `copy`'s bf16 linear layers on their weights packed by oneDNN for `batch` rows."""
    for module in copy.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16:
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight, batch)
            module.forward = functools.partial(_packed_linear, packed, module.bias)


def unpack(copy: torch.nn.Module) -> None:
    """Give every module of `copy` its own forward again (the packed weights are freed)."""
    for module in copy.modules():
        vars(module).pop("forward", None)
