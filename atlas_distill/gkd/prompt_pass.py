"""One pass of the prompt through the student per on-policy step (the `prefill_once` setting).

An on-policy step ran the prompt through the student twice: once without gradient as generation's first forward
(the prefill, which fills the KV cache decoding starts from), and again inside the training forward over prompt and
completion. Both use the same weights and the same tokens. Here the prefill is the training forward's own prompt
part: it runs with gradient (inside the training step's contexts) and keeps its graph and its KV cache; decoding
starts from a detached copy of that cache; and the training forward goes on from the cache over the completion only.
The loss and its gradient are the full forward's within rounding (the attention over the prompt is split across two
calls), and the prompt's position ids are generation's own (counted over the attention mask, as `generate` counts
them), so the samples are those `generate` would have drawn from its own prefill, up to the same rounding.

On a 2-core AVX2 CPU the prefill was about 0.5 s of a 4.7 s train_bench step (benchmarks/README.md). Without
gradient checkpointing only: transformers switches the KV cache off under it, because a checkpointed layer
recomputed in backward would write to the cache again. A recompute that read the cache back was built and measured
(commits 9150eeb-c7bf4fc): it saved 0.06 s of a 4.3 s step on a Zen 4 CPU and 0.18 of 5.7 on AVX2, and raised the
peak by 34-43 MB on both, since autograd runs the prompt's backward after all of the completion's, with every
gradient already made. Under checkpointing, gkd/replay.py (`replay_generation`) instead takes the whole training
forward from what generation computed.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

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


def _forward(student, cache, input_ids: torch.Tensor, **inputs):
    """The student's decoder stack over `input_ids`, filling or reading `cache`, with the grouped keys on a CPU."""
    with _grouped_keys(input_ids.device):
        return divergence.backbone(student)(input_ids=input_ids, **inputs, cache=cache, use_cache=True)


def run(student, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> PromptPass:
    """The prompt's forward through the student's decoder, with gradient (the caller's grad mode and autocast)."""
    positions = decoding_positions(prompt_mask)
    cache = DynamicCache(config=student.config.get_text_config())
    out = _forward(student, cache, prompts, attention_mask=prompt_mask, position_ids=positions)
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
