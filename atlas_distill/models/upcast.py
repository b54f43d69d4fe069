"""A frozen model whose weights are kept in bf16 and computed with in fp32 (the teacher on a CPU without native bf16).

On a CPU without native bf16 (plain AVX2), a bf16 matmul ran 6x slower than fp32, so the teacher is computed in
fp32 there; but its weights need not be held in fp32 for that. `compute_in_float32` keeps each linear layer's
weight in bf16 and casts it to fp32 for its own product only (one layer's weight at a time), the embedding's rows
after their lookup, and everything else (norms, biases) in fp32: the hidden states are fp32 throughout, and the
model computes exactly what an fp32 model with bf16-rounded weights would. For the builtin SmolLM2-135M that is
269 MB of weights instead of 538 MB, for a cast of each weight at each forward (a teacher only runs forward
passes, so it has no fp32 master weights to keep). On a 2-core AVX2 CPU its forward over a GKD batch took 1.27 s
against 1.29 s in fp32, and the loss casts the bf16 head in tiles (gkd/divergence.py `_upcast_product`).

Only models made of what this knows are changed (`fits`): nn.Linear, nn.Embedding, and modules whose own
parameters are at most 1-D (norms); a model with anything else (GPT-2's Conv1D, a quantized layer) is left alone.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F

COMPUTE_DTYPE = "_atlas_compute_dtype"  # set on a model by compute_in_float32: the dtype its hidden states are in


def _upcast_linear(self, hidden):
    bias = self.bias.float() if self.bias is not None else None
    return F.linear(hidden, self.weight.float(), bias)


def _float_output(module, args, output):
    return output.float()


def fits(model: torch.nn.Module) -> bool:
    """Whether every parameter of `model` belongs to an nn.Linear, an nn.Embedding or is at most 1-D."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own or type(module) in (torch.nn.Linear, torch.nn.Embedding):
            continue
        if any(p.dim() > 1 for p in own):
            return False
    return True


def compute_in_float32(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (bf16 weights, frozen) computing in fp32: see the module's doc. Returns it."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            if module.bias is not None:
                module.bias.data = module.bias.data.float()
            module.forward = MethodType(_upcast_linear, module)
        elif type(module) is torch.nn.Embedding:
            module.register_forward_hook(_float_output)
        else:
            for name, parameter in module.named_parameters(recurse=False):
                parameter.data = parameter.data.float()
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.is_floating_point():
                    setattr(module, name, buffer.float())
    setattr(model, COMPUTE_DTYPE, torch.float32)
    return model


def compute_dtype(model) -> torch.dtype | None:
    """The dtype `model` computes in when compute_in_float32 set it (its weights' dtype otherwise: None)."""
    return getattr(model, COMPUTE_DTYPE, None)
