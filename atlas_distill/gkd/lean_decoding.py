"""The fp32 student's decoding steps through a lean decoder layer (the `lean_decoding` setting).

Where the fp32 student samples itself on a CPU, its decoding steps run on oneDNN's packed weights
(gkd/packed_linear.py `pack_for_decoding`). A decoding step is then small: one row per sequence through every
weight. Besides reading the weights, transformers' decoder layer makes about 190 ATen calls per layer and token
(the RMSNorms' six operations each, seven projections, the rotary embedding, the attention's reshapes): on a
2-core CPU a tenth of a decoding step or more.

`pack` gives each eligible decoder layer a forward for decoding steps that computes the same thing with fewer
calls: q, k and v as one product on their weights packed together (and gate and up likewise), each RMSNorm as
PyTorch's `rms_norm`, the rotary embedding and the KV cache as transformers' own (`apply_rotary_pos_emb`,
`cache.update`), and the attention as transformers' sdpa attention with the mask the model built. The
prompt's forward (hundreds of rows), and anything with gradients, runs the layer's own forward.

Eligible: transformers' Llama and Qwen2 decoder layers (SmolLM2, Qwen2.5) with sdpa attention and no sliding
window, SiLU MLPs without biases, plain fp32 nn.Linear projections on the CPU, and no hooks on the layer or
anything in it when packed (the replay's recording hook, added after packing, is called as for any forward: the
lean forward is the layer's own), decoding with transformers' DynamicCache (what generate makes). The outputs
are the same within rounding (tests: the same samples and logits within 1e-5 for Llama and Qwen2, with padded
prompts; on the builtin the logits and samples were the same bit for bit).

Measured on a 2-core Zen 4 CPU (benchmarks/decoding_bench.py; benchmarks/README.md, twenty-first session): one
decoding forward of the builtin's 15-layer student at batch 4 after a 200-token prompt, 26.4 ms with transformers'
layers against 24.2 ms; the trainer's generation (4 prompts, 32 new tokens, packing included) 1.299 against
1.231 s; a train_bench step 2-3 % faster with checkpointing, about 5 % without (three ABBA pairs), on the same
samples and losses.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import packed_linear
from .lean_activations import _hooked, _known, _lean_mlp, _recomputed_norm
from .packed_linear import _packed_linear

_FAMILIES = ("Llama", "Qwen2")  # their decoder layer: x + attn(norm(x)), then x + down(silu(gate) * up)
_LAYER_ARGUMENTS = ("attention_mask", "cache", "past_key_values", "position_embeddings")  # the attention's own


@dataclass
class _Packed:
    """A layer's projections packed for decoding: q, k and v together, o, gate and up together, down."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    qkv_sizes: list[int]
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def _plain(module: torch.nn.Module, kind: str) -> bool:
    """transformers' Llama or Qwen2 `kind`, with no hooks and no forward of its own but lean_activations' MLP and
    RMSNorm ones (which without gradients are the class's: an on-policy step without checkpointing generates inside
    lean_activations)."""
    return _known(module, kind, _FAMILIES, allowed=(_lean_mlp, _recomputed_norm))


def fits(layer: torch.nn.Module) -> bool:
    """Whether `layer` can decode through the lean forward (the module's doc says what is eligible)."""
    from transformers.activations import SiLUActivation

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = [getattr(layer, name, None) for name in ("input_layernorm", "post_attention_layernorm")]
    if not (_plain(layer, "DecoderLayer") and _plain(attn, "Attention") and _plain(mlp, "MLP")
            and all(_plain(norm, "RMSNorm") for norm in norms)):
        return False
    projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if any(type(p) is not torch.nn.Linear or p.weight.dtype != torch.float32 or p.weight.device.type != "cpu"
           or _hooked(p) for p in projections):
        return False
    return (attn.config._attn_implementation == "sdpa" and getattr(attn, "sliding_window", None) is None
            and type(mlp.act_fn) in (torch.nn.SiLU, SiLUActivation) and all(p.bias is None for p in projections[4:]))


def _pack(layer: torch.nn.Module, rows: int) -> _Packed:
    attn, mlp = layer.self_attn, layer.mlp
    reorder = torch.ops.mkldnn._reorder_linear_weight
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    bias = None
    if any(p.bias is not None for p in qkv):
        bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in qkv])
    return _Packed(qkv=reorder(torch.cat([p.weight for p in qkv]), rows), qkv_bias=bias,
                   qkv_sizes=[p.out_features for p in qkv], o=reorder(attn.o_proj.weight, rows),
                   gate_up=reorder(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), rows),
                   down=reorder(mlp.down_proj.weight, rows))


def _rms_norm(norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(hidden, hidden.shape[-1:], norm.weight, norm.variance_epsilon)


def _decoding_forward(layer, packed: _Packed, rows: int, hidden_states, *args, **kwargs):
    """The layer's forward: the lean one at a decoding step (at most one row per sequence, a KV cache, no
    gradients), the layer's own otherwise."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if (args or type(cache) is not DynamicCache or torch.is_grad_enabled() or hidden_states.dim() != 3
            or hidden_states.shape[1] != 1 or hidden_states.shape[0] > rows
            or kwargs.get("position_embeddings") is None):
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    attn = layer.self_attn
    shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
    q, k, v = _packed_linear(packed.qkv, packed.qkv_bias,
                             _rms_norm(layer.input_layernorm, hidden_states)).split(packed.qkv_sizes, dim=-1)
    q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
    cos, sin = kwargs["position_embeddings"]
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    rest = {key: value for key, value in kwargs.items() if key not in _LAYER_ARGUMENTS}  # as the layer passes on
    k, v = cache.update(k, v, attn.layer_idx, kwargs=rest)
    out, _ = sdpa_attention_forward(attn, q, k, v, kwargs.get("attention_mask"), dropout=0.0, scaling=attn.scaling)
    out = out.reshape(*hidden_states.shape[:-1], -1)
    hidden = hidden_states + _packed_linear(packed.o, attn.o_proj.bias, out)
    gate, up = _packed_linear(packed.gate_up, None, _rms_norm(layer.post_attention_layernorm, hidden)).chunk(2, dim=-1)
    return hidden + _packed_linear(packed.down, None, F.silu(gate).mul_(up))


@torch.no_grad()
def pack(model: torch.nn.Module, rows: int) -> list[torch.nn.Module]:
    """Give each eligible decoder layer of `model` the lean forward for decoding steps of at most `rows` sequences,
    on its weights packed now (pack again after they change). Returns the layers changed; their projections are
    not called at decoding steps, so they need no packed weight of their own."""
    layers = [module for module in model.modules() if fits(module)]
    for layer in layers:
        layer.forward = functools.partial(_decoding_forward, layer, _pack(layer, rows), rows)
    return layers


def pack_for_decoding(model: torch.nn.Module, batch: int) -> list[torch.nn.Module]:
    """packed_linear's `pack_for_decoding` with each eligible decoder layer on its lean forward (`pack`): the other
    linear layers (the output head among them) as packed_linear decodes them. Returns the modules changed, for
    packed_linear's `restore`."""
    layers = pack(model, batch)
    fused = {id(module) for layer in layers for module in layer.modules() if type(module) is torch.nn.Linear}
    return layers + packed_linear.pack_for_decoding(model, batch, skip=fused)
