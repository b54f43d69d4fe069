"""The student's gated MLPs and RMSNorms keeping fewer tensors for backward (the `lean_activations` setting).

- **Gated MLP.** A Llama-style MLP computes down_proj(silu(gate_proj(x)) * up_proj(x)), and autograd keeps four
  [tokens, intermediate] tensors of it for backward: gate (SiLU's input), silu(gate) and up (the product's
  factors), and the product (down_proj's input). Here what follows the two projections is one autograd Function
  that keeps gate and up only and makes silu(gate) * up again in backward (two elementwise passes), for
  down_proj's weight gradient and the product's own. Its backward is autograd's own formulas on the same values.
- **RMSNorm.** Autograd keeps the normalised [tokens, hidden] input (x * rsqrt(mean(x^2) + eps)) for the weight's
  gradient, beside x itself. Here the norm runs under PyTorch's non-reentrant checkpoint, which keeps x and
  runs the norm again in backward. Only without gradient checkpointing: with it, the layer is recomputed anyway.

The gradients are the same bit for bit, in fp32 and under autocast (tests). For the builtin's 15-layer student at
batch 4 x 140 positions, what one forward keeps for backward fell from 591 to 455 MB (98 MB from the MLPs, 38
from the norms). It matters without gradient checkpointing, where every layer's activations are kept at once;
with it, one layer's at a time.

Only modules known to compute exactly that are changed: transformers' Llama, Qwen2, Qwen3 and Mistral MLPs and
RMSNorms (SmolLM2, Qwen2.5); an MLP only with SiLU, plain nn.Linear projections and no down_proj bias; none with
hooks (forward or backward) or a forward of its own on it, nor, for an MLP, on down_proj or act_fn, which it no
longer calls; nothing at all while global module hooks are set. An MLP with a LoRA or quantized projection is
left as it is (its norms are still checkpointed), and so is every module under DeepSpeed's or accelerate's hooks.
Under autocast, down_proj's weight is cast again in backward (the forward's cast lives in autocast's cache until
the forward and loss are done, as before, and is not kept for backward).

- **An MLP output nothing reads** (`unread_mlp_outputs`, the `lean_recompute` setting). When backward recomputes a
  replayed decoder layer (gkd/replay.py), the recomputed output is not used, only the path of its gradient: the
  layer's output is the one recorded while generating. In these families' decoder layers the MLP's output goes
  only into the residual sum, whose gradient needs no values, and the MLP's backward above makes silu(gate) * up
  again itself, from gate and up. So inside that recompute the MLP returns zeros of its output's shape instead of
  down_proj's product: a quarter of each layer's multiply-adds, and the same gradients bit for bit (tests).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from types import MethodType

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

_FAMILIES = ("Llama", "Qwen2", "Qwen3", "Mistral")  # their MLP: down(act(gate(x)) * up(x)); their RMSNorm: Llama's
_unread = threading.local()  # .on: this thread is recomputing a layer whose MLP output nothing reads


class _GatedDown(torch.autograd.Function):
    """down_proj(silu(gate) * up) without bias, keeping gate and up (not silu(gate) or the product) for backward;
    `unread`: zeros of its shape and dtype instead, where nothing reads the value (backward is the same)."""

    @staticmethod
    def forward(ctx, gate, up, weight, unread: bool = False):
        if unread:
            device = gate.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
            out = gate.new_zeros(*gate.shape[:-1], weight.shape[0], dtype=dtype)
        else:
            out = F.linear(F.silu(gate) * up, weight)  # under autocast: the weight's cast, as down_proj's own call
        ctx.save_for_backward(gate, up, weight)
        ctx.compute_dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight = ctx.saved_tensors
        # as autograd differentiates the unfused graph: linear's matmul in the forward's dtype, then the casts'
        # backward; Trainer runs backward outside autocast, so the forward's casts are written out here
        with torch.autocast(grad_out.device.type, enabled=False):
            act = F.silu(gate)
            product = act * up
            grad = grad_out.reshape(-1, grad_out.shape[-1])
            grad_weight = None
            if ctx.needs_input_grad[2]:
                grad_weight = product.to(ctx.compute_dtype).reshape(grad.shape[0], -1).t().mm(grad).t()
                grad_weight = grad_weight.to(weight.dtype)
            grad_product = grad.mm(weight.to(ctx.compute_dtype)).view(product.shape).to(product.dtype)
            del product
            grad_up = grad_product * act if ctx.needs_input_grad[1] else None
            grad_gate = torch.ops.aten.silu_backward(grad_product * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, grad_weight, None


def _lean_mlp(self, x):
    if not torch.is_grad_enabled():  # nothing kept for backward: the module's own forward (its down_proj's own call)
        return type(self).forward(self, x)
    return _GatedDown.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight, getattr(_unread, "on", False))


@contextmanager
def unread_mlp_outputs():
    """While entered, in this thread, each lean MLP (`lean_activations`) returns zeros instead of its output: for a
    recompute whose output nothing reads and whose MLP outputs only go into a residual sum (`reads_no_mlp_output`)."""
    before = getattr(_unread, "on", False)
    _unread.on = True
    try:
        yield
    finally:
        _unread.on = before


def reads_no_mlp_output(layer: torch.nn.Module) -> bool:
    """Whether `layer` is one of these families' decoder layers, whose MLP output goes only into the residual sum
    that is the layer's output (so when that output's value is not used, neither is the MLP's)."""
    return _known(layer, "DecoderLayer")


def _recomputed_norm(self, hidden_states):
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    return checkpoint(type(self).forward, self, hidden_states, use_reentrant=False, preserve_rng_state=False)


def _hooked(module: torch.nn.Module, allowed: tuple = ()) -> bool:
    """Hooks of any kind on `module`, or a forward of its own (accelerate's hooks set one) other than a method made
    of one of the `allowed` functions."""
    forward = vars(module).get("forward")
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks
                or (forward is not None and getattr(forward, "__func__", None) not in allowed))


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks or module._global_backward_hooks
                or module._global_backward_pre_hooks)


def _known(module: torch.nn.Module, kind: str, families: tuple[str, ...] = _FAMILIES, allowed: tuple = ()) -> bool:
    """Whether `module` is transformers' `kind` (MLP, RMSNorm, ...) of one of `families`, with no hooks and no
    forward of its own but `allowed`'s (see `_hooked`)."""
    cls = type(module)
    return (cls.__module__.startswith("transformers.models.") and cls.__name__ in {f + kind for f in families}
            and not _hooked(module, allowed))


def _lean_mlp_fits(module: torch.nn.Module) -> bool:
    from transformers.activations import SiLUActivation

    if not _known(module, "MLP"):
        return False
    layers = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    # down_proj and act_fn are not called as modules any more, so nothing may hang on them
    return (all(type(layer) is torch.nn.Linear for layer in layers) and layers[2].bias is None
            and not _hooked(layers[2]) and type(act) in (torch.nn.SiLU, SiLUActivation) and not _hooked(act))


@contextmanager
def lean_activations(model: torch.nn.Module, *, norms: bool = True):
    """Within the block, `model`'s eligible MLPs, and RMSNorms when `norms`, keep fewer tensors for backward (see
    the module's doc); yields how many modules were changed."""
    if _global_hooks():  # they would miss the calls the lean forwards no longer make
        yield 0
        return
    changed = [(module, _lean_mlp) for module in model.modules() if _lean_mlp_fits(module)]
    if norms:
        changed += [(module, _recomputed_norm) for module in model.modules() if _known(module, "RMSNorm")]
    for module, forward in changed:
        module.forward = MethodType(forward, module)
    try:
        yield len(changed)
    finally:
        for module, _ in changed:
            vars(module).pop("forward", None)
