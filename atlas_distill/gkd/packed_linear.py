"""The bf16 sampling copy's linear layers on oneDNN's pre-packed weights, on a CPU (the `packed_generation` setting).

Decoding multiplies a few rows (one per sequence) by every weight of the model, once per token. In bf16 on a CPU,
`F.linear` hands oneDNN each weight in PyTorch's plain layout on every call; packed once into oneDNN's own layout
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing pass uses), the same product
(`_linear_pointwise`) runs faster. On a 2-core Zen 4 CPU, one decoding pass over the builtin student's 106 weights
(155 MB in bf16, batch 4, weights not in cache) took 7.6 ms against 14.0 ms, and a train_bench step's generation
(4 prompts, 32 new tokens) 0.87-0.92 s against 1.15-1.25 s, packing included (about 70 ms: the weights change
every step, so the copy is packed again for each generation). The outputs are the same (equal logits and tokens).

`pack` gives each linear layer of the copy (ours, never the student) a forward on its packed weight. A layer whose
weight is its own (not tied to another module's, as a tied lm_head is to the embedding) needs no plain bf16 copy at
all: the sampling copy holds it on the meta device (`packed_alone`), and `pack` packs it from the student's fp32
weight, cast one layer at a time, which kept 107 of train_bench's 163 MB of plain bf16 weights out of each generation
(a read of such a weight raises, as any meta tensor's does). The plain weights that remain are freed with the rest of
the copy after the generation (`AtlasGKDTrainer._release_sampling_copy`, which calls `unpack` first to drop the
packed ones).

Where there is no bf16 copy (the fp32 student samples itself with no mixed precision: `generation_dtype: auto` on a
CPU, or `float32`), `pack_for_decoding` gives the
student's own fp32 linear layers packed weights for the generation's decoding steps (at most one row per sequence),
and `restore` takes them away again. There PyTorch's plain fp32 product with a
few rows is slow: on a 2-core AVX2 CPU (AMD EPYC, Zen 3) one decoding pass over the builtin student's 106 fp32
weights (326 MB) took 41-44 ms plain against 19-21 ms packed (the tied lm_head alone 20.4 against 5.0 ms), and a
train_bench generation 2.56 s against 1.71 s, packing included (benchmarks/generation_bench.py). The output head is
the exception: decoded as `weight @ hidden.T` on its plain weight (5.2 ms on that CPU, 4.4 against 3.7 packed on a Zen 4
one), it needs no packed copy (113 MB here; a Qwen2.5 vocabulary's head is 545 MB at 0.5B), and a Zen 4 generation was
no slower for it (1.29 / 1.42 against 1.38 / 1.48 s, with 13-43 MB less at the step's peak). The prompt's forward,
hundreds of rows, runs on the plain weight, where packed was 4-12 % slower. The logits are not bit for bit the
plain ones (oneDNN sums in another order: within 7e-6 here); the sampled tokens were the same in that run.
"""

from __future__ import annotations

import functools
import platform

import torch


def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this PyTorch has the packed-weight ops, and this CPU runs them in `dtype`: bf16 where oneDNN runs it
    (AVX512 or newer), fp32 on x86 (where it was measured)."""
    mkldnn = torch.ops.mkldnn
    ops = ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported")
    if not (torch.backends.mkldnn.is_available() and all(hasattr(mkldnn, op) for op in ops)):
        return False
    if dtype == torch.float32:
        return platform.machine().lower() in ("x86_64", "amd64")
    return dtype == torch.bfloat16 and bool(mkldnn._is_mkldnn_bf16_supported())


def _packed_linear(weight, bias, hidden):
    return torch.ops.mkldnn._linear_pointwise(hidden, weight, bias, "none", [], "")


def _linears(model: torch.nn.Module):
    return ((name, module) for name, module in model.named_modules() if type(module) is torch.nn.Linear)


def packed_alone(model: torch.nn.Module) -> set[int]:
    """The ids of `model`'s parameters that are the weight of one nn.Linear and nothing else: a sampling copy packs
    them without a plain copy of its own."""
    uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    return {id(module.weight) for _, module in _linears(model) if uses.get(id(module.weight)) == 1}


@torch.no_grad()
def pack(copy: torch.nn.Module, batch: int, source: torch.nn.Module | None = None) -> None:
    """Run `copy`'s bf16 linear layers on their weights packed by oneDNN for `batch` rows. A layer whose weight is
    on the meta device is packed from the layer of the same name in `source` (the student), cast to bf16."""
    for name, module in _linears(copy):
        weight = module.weight
        if weight.dtype != torch.bfloat16:
            continue
        if weight.is_meta:
            if source is None:
                raise ValueError(f"{name} holds no weight of its own: pack it from the model it was copied from")
            weight = source.get_submodule(name).weight.detach().to(torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch)
        module.forward = functools.partial(_packed_linear, packed, module.bias)


def _decoding_step(hidden, rows: int) -> bool:
    """Whether `hidden` is a decoding step's: at most one row per sequence (the prompt's forward has hundreds)."""
    return hidden.numel() <= rows * hidden.shape[-1]


def _decoding_head(weight, bias, rows: int, hidden):
    """The output head at a decoding step as the weight times the few rows transposed: [V, H] x [H, rows] reads the
    plain weight row by row, where `F.linear`'s [rows, H] x [H, V] was about 4x slower (17.2 against 4.4 ms on Zen 4;
    packed: 3.7 ms, but packing it each generation costs as much)."""
    if not _decoding_step(hidden, rows):
        return torch.nn.functional.linear(hidden, weight, bias)
    logits = (weight @ hidden.reshape(-1, hidden.shape[-1]).T).T.contiguous()  # [rows, V], as F.linear's
    logits = logits.view(*hidden.shape[:-1], weight.shape[0])
    return logits if bias is None else logits + bias


def _decoding_linear(packed, weight, bias, rows: int, hidden):
    if _decoding_step(hidden, rows):
        return _packed_linear(packed, bias, hidden)
    return torch.nn.functional.linear(hidden, weight, bias)


@torch.no_grad()
def pack_for_decoding(model: torch.nn.Module, batch: int, *, skip: set[int] = frozenset()) -> list[torch.nn.Module]:
    """Run `model`'s own fp32 linear layers on packed copies of their weights for inputs of at most `batch` rows (the
    decoding steps of a generation of `batch` sequences), on their plain weights otherwise (the prompt's forward).
    The output head is not packed: it decodes as `weight @ hidden.T` on its plain weight (`_decoding_head`), a
    generation no slower for it, without a packed copy that would be its largest (the vocabulary's rows: 113 MB for
    the builtin).
    The weights are read now: pack again after they change. A layer that already has a forward of its own (an
    accelerate hook, a patch) is left alone, and so is one whose id is in `skip` (gkd/lean_decoding.py's
    `pack_for_decoding` packs a lean layer's projections together itself).
    Returns the modules given a decoding forward, for `restore`."""
    packed = []
    head = getattr(model, "get_output_embeddings", lambda: None)()
    for _, module in _linears(model):
        weight = module.weight
        if (weight.dtype != torch.float32 or weight.device.type != "cpu" or "forward" in vars(module)
                or id(module) in skip):
            continue
        module.forward = (functools.partial(_decoding_head, weight, module.bias, batch) if module is head else
                          functools.partial(_decoding_linear, torch.ops.mkldnn._reorder_linear_weight(weight, batch),
                                            weight, module.bias, batch))
        packed.append(module)
    return packed


def restore(modules: list[torch.nn.Module]) -> None:
    """Give the modules `pack_for_decoding` changed their own forward again (the packed weights are freed)."""
    for module in modules:
        vars(module).pop("forward", None)


def unpack(copy: torch.nn.Module) -> None:
    """Give every module of `copy` its own forward again (the packed weights are freed)."""
    for module in copy.modules():
        vars(module).pop("forward", None)
