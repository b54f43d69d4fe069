"""One pass of the prompt through the student per on-policy step (the `prefill_once` setting).

An on-policy step ran the prompt through the student twice: once without gradient as generation's first forward
(the prefill, which fills the KV cache decoding starts from), and again inside the training forward over prompt and
completion. Both use the same weights and the same tokens. Here the prefill is the training forward's own prompt
part: it runs with gradient (inside the training step's contexts) and keeps its graph and its KV cache; decoding
starts from a detached copy of that cache; and the training forward goes on from the cache over the completion only.
The loss and its gradient are the full forward's within rounding (the attention over the prompt is split across two
calls), and the prompt's position ids are generation's own (counted over the attention mask, as `generate` counts
them), so the samples are those `generate` would have drawn from its own prefill, up to the same rounding.

Under gradient checkpointing transformers switches the KV cache off, because a checkpointed layer recomputed in
backward would write to the cache again. Here its two forwards keep the cache: each checkpointed layer runs under
PyTorch's non-reentrant checkpoint (the default transformers enables), with a recompute context that makes the
cache's `update` return what the first call returned (the cache's positions before that call, then the recomputed
keys and values) and store nothing (`_ReplayingCache`). Backward then runs through the forward's own graph, as
non-reentrant checkpointing always does, with the same saved tensors.

On a 2-core AVX2 CPU the prefill was about 0.5 s of a 4.7 s train_bench step without checkpointing, and the prompt
once saved 0.18 s of a 5.7 s step with it; the trainer leaves it off under checkpointing where the student decodes on
packed fp32 weights, which would make generation the step's peak (`AtlasGKDTrainer.prefills_once`,
benchmarks/README.md).
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from . import divergence


@dataclass
class PromptPass:
    """The prompt's forward with gradient: its KV cache (with graph), the last prompt position's hidden state
    [B, H] (the one that predicts the first completion token), the prompt's position ids [B, P]."""

    cache: object
    last_hidden: torch.Tensor
    positions: torch.Tensor


def decoding_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` makes them for a left-padded batch: counted over the real tokens, 0 at padding."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def fits(model) -> bool:
    """Whether `model`'s KV cache is plain (every layer a DynamicLayer: no sliding window, no state-space layer),
    which `sampling_cache` copies and crops by hand."""
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config.get_text_config())
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _checkpointed_layers(model) -> list[GradientCheckpointingLayer]:
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def checkpoint_fits(model) -> bool:
    """Whether `model`'s gradient checkpointing, if on, can keep the prompt's cache (`_checkpointed`): every
    checkpointed module is one of transformers' checkpointing layers, each checkpointed by PyTorch's `checkpoint`
    itself (as transformers sets it up, without a `context_fn` of its own; not the offloading variant)."""
    for module in model.modules():
        if not getattr(module, "gradient_checkpointing", False) or module is model:
            continue
        if not isinstance(module, GradientCheckpointingLayer):
            if any(isinstance(m, GradientCheckpointingLayer) for m in module.modules()):
                continue  # the decoder stack holding the layers (its flag is the layers' too)
            return False
        func = getattr(module, "_gradient_checkpointing_func", None)
        if not (isinstance(func, functools.partial) and func.func is checkpoint and "context_fn" not in func.keywords):
            return False
    return True


class _ReplayingCache(DynamicCache):
    """A DynamicCache whose `update`, while `replay_from` is set (a checkpointed layer recomputed in backward), returns
    what that layer's first call returned (the cache's first `replay_from` positions, then the recomputed keys and
    values) and stores nothing."""

    replay_from: int | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.replay_from is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer, before = self.layers[layer_idx], self.replay_from
        return (torch.cat([layer.keys[..., :before, :], key_states], dim=-2),
                torch.cat([layer.values[..., :before, :], value_states], dim=-2))


class _Replaying:
    """A checkpointed layer's recompute: the cache replays the call that started at `before` positions, and the
    attention gets the grouped keys as in the forward (the recomputed tensors must match the saved ones). Reusable:
    a graph kept for a second backward is recomputed again."""

    def __init__(self, cache: _ReplayingCache, before: int, device: torch.device) -> None:
        self.cache, self.before, self.device = cache, before, device

    def __enter__(self) -> None:
        self.keys = _grouped_keys(self.device)
        self.keys.__enter__()
        self.cache.replay_from = self.before

    def __exit__(self, *exc) -> None:
        self.cache.replay_from = None
        self.keys.__exit__(*exc)


@contextmanager
def _checkpointed(model, cache: _ReplayingCache, device: torch.device):
    """Under gradient checkpointing, `model`'s checkpointed layers keep `cache` through this forward: each runs under
    non-reentrant `checkpoint` (the user's other checkpoint arguments kept) whose recompute replays the cache."""
    layers = _checkpointed_layers(model)
    if not layers:
        yield
        return
    before = cache.get_seq_length()

    def replaying():
        return nullcontext(), _Replaying(cache, before, device)

    saved = [(layer, layer._gradient_checkpointing_func, vars(layer).get("_can_checkpoint_with_cache"))
             for layer in layers]
    for layer, func, _ in saved:
        keywords = {**func.keywords, "use_reentrant": False, "context_fn": replaying}  # the user's others kept
        layer._gradient_checkpointing_func = functools.partial(checkpoint, **keywords)
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer, func, own in saved:
            layer._gradient_checkpointing_func = func
            if own is None:
                del layer._can_checkpoint_with_cache
            else:
                layer._can_checkpoint_with_cache = own


@contextmanager
def _grouped_keys(device: torch.device):
    """On a CPU, transformers' SDPA attention hands the grouped keys and values to PyTorch's kernel as they are
    (`enable_gqa`) instead of repeating them for every query head first, which it does under a padding mask unless
    TRANSFORMERS_SDPA_FORCE_GQA is set. The repeated copies are what the kernel keeps for backward: split in two
    forwards, the prompt's part of them would be kept twice (47 MB for train_bench's student); with the grouped ones,
    the CPU kernel kept 0.4 MB instead of 4.1 MB per layer (the same output)."""
    name = "TRANSFORMERS_SDPA_FORCE_GQA"
    if device.type != "cpu" or os.environ.get(name) == "1":
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _forward(student, cache: _ReplayingCache, input_ids: torch.Tensor, **inputs):
    """The student's decoder stack over `input_ids`, filling or reading `cache`: the grouped keys on a CPU, and
    under gradient checkpointing each layer's recompute replaying the cache (`_checkpointed`). use_cache is False
    there, as transformers would make it anyway with a warning (Llama-like stacks still hand their layers the
    cache; `run` checks that they did)."""
    backbone = divergence.backbone(student)
    with _grouped_keys(input_ids.device), _checkpointed(student, cache, input_ids.device):
        return backbone(input_ids=input_ids, **inputs, cache=cache,
                        use_cache=not getattr(backbone, "gradient_checkpointing", False))


def run(student, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> PromptPass | None:
    """The prompt's forward through the student's decoder, with gradient (the caller's grad mode and autocast); None
    where the decoder stack kept nothing in the cache (GPT-2's withholds it from its blocks under gradient
    checkpointing), and the caller generates as usual."""
    positions = decoding_positions(prompt_mask)
    cache = _ReplayingCache(config=student.config.get_text_config())
    out = _forward(student, cache, prompts, attention_mask=prompt_mask, position_ids=positions)
    if not all(layer.is_initialized and layer.keys.shape[-2] == prompts.shape[1] for layer in cache.layers):
        return None
    return PromptPass(cache, out.last_hidden_state[:, -1], positions)


def sampling_cache(prompt: PromptPass, dtype: torch.dtype | None = None):
    """A detached copy of the prompt's cache without its last position, in `dtype` (None: as it is): `generate`,
    given the whole prompt and this cache, runs only the last prompt token itself, and its logits give the first
    sample. The copy shares the cache's storage (decoding only concatenates onto it, never writes in place)."""
    return DynamicCache([tuple(t[..., :-1, :].detach().to(dtype or t.dtype) for t in (layer.keys, layer.values))
                         for layer in prompt.cache.layers])


def completion_hidden(student, prompt: PromptPass, inputs, mask: torch.Tensor) -> torch.Tensor:
    """[N, H] last hidden states at the positions where `mask` (B x L-1, next-token aligned) is set, as
    `divergence.completion_hidden` gives them, from the prompt's pass and a forward over the completion only."""
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    length = prompt.positions.shape[1]
    if mask[:, :length - 1].any():
        raise ValueError("a loss position inside the prompt: the prompt's pass covers none of those")
    hidden = prompt.last_hidden.unsqueeze(1)  # position length - 1
    new = ids.shape[1] - 1 - length  # completion positions before the last one
    if new > 0:
        positions = prompt.positions[:, -1:] + 1 + torch.arange(new, device=ids.device)
        out = _forward(student, prompt.cache, ids[:, length:-1], attention_mask=attention[:, :-1],
                       position_ids=positions)
        hidden = torch.cat([hidden, out.last_hidden_state], dim=1)
    return hidden[mask[:, length - 1:]]
