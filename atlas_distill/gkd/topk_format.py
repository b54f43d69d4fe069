"""One format for the teacher's top-k log-probs: the in-memory cache (teacher_cache.py) and the persistent teacher
store (teacher_store/) both keep an example as one `encode`d record and read it back with `decode`.

An example is found by `example_keys`: the digest of its unpadded tokens and its loss positions among them, so the
same example padded differently in another batch finds its record.

A record holds, per loss position, the teacher's k most likely tokens and their log-probs, and the log of the rest
of the mass (the tail), all at the distillation temperature:
- token ids sorted ascending and stored as deltas (uint16 for a vocabulary up to 65,536 tokens, else uint32),
- each log-prob as an 8-bit code on the position's own linear scale between its highest and its k-th log-prob
  (two float32 ends per position),
- the tail as float32,
and the whole record zlib-compressed (the deltas are small and most codes sit near the k-th, so they shrink).
`decode` renormalises the k + 1 outcomes to sum to one. Against float32 storage the folded divergence was the
same to five digits (benchmarks/README.md, "top-k precision").
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import torch

from .divergence import TAIL_FLOOR

LEVELS = 255  # 8-bit codes 0..255
ZLIB_LEVEL = 6
SPAN = 100.0  # a position's codes cover at most 100 nats below its top log-prob (e^-100: nothing the loss can see)


def example_keys(inputs, mask: torch.Tensor) -> list[bytes]:
    """The key of each row of a batch: its real tokens and its loss positions among them (left or right padding
    does not change it). `mask` is B x L-1, next-token aligned, as the loss uses it."""
    ids, attention = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()
    mask = mask.cpu()
    keys = []
    for row_ids, row_attention, positions in zip(ids, attention, mask):
        real = row_attention.bool()
        digest = hashlib.blake2b(row_ids[real].numpy().tobytes(), digest_size=16)
        digest.update(positions[(row_attention[:-1] * row_attention[1:]).bool()].numpy().tobytes())
        keys.append(digest.digest())
    return keys


def id_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= 2**16 else np.dtype(np.uint32)


def encode(indices: torch.Tensor, values: torch.Tensor, tail: torch.Tensor, vocab: int) -> bytes:
    """One example's record from its positions' top-k (indices [n, k], log-probs [n, k], tail [n])."""
    indices, values = indices.detach().cpu().long(), values.detach().cpu().float()
    order = indices.argsort(dim=-1)
    indices, values = indices.gather(-1, order).numpy(), values.gather(-1, order)
    deltas = np.diff(indices, axis=-1, prepend=0).astype(id_dtype(vocab))
    high = values.max(dim=-1).values
    values = torch.maximum(values, (high - SPAN).unsqueeze(-1))  # a -inf (a token the teacher rules out) stays finite
    low = values.min(dim=-1).values
    step = (high - low).clamp_min(1e-6) / LEVELS
    codes = torch.round((values - low.unsqueeze(-1)) / step.unsqueeze(-1)).clamp(0, LEVELS).to(torch.uint8)
    ends = torch.stack([low, high], dim=-1).numpy().astype(np.float32)
    payload = b"".join([deltas.tobytes(), codes.numpy().tobytes(), ends.tobytes(),
                        tail.detach().cpu().float().numpy().tobytes()])
    return zlib.compress(payload, ZLIB_LEVEL)


def decode(record: bytes, positions: int, k: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices int64 [n, k], log-probs float32 [n, k], tail float32 [n]) of a record of `positions` positions,
    renormalised so each position's k + 1 outcomes sum to one."""
    payload = zlib.decompress(record)
    width = id_dtype(vocab).itemsize
    sizes = [positions * k * width, positions * k, positions * 8, positions * 4]
    if len(payload) != sum(sizes):
        raise ValueError(f"a record of {len(payload)} bytes does not hold {positions} positions of top-{k}")
    cuts = np.cumsum([0] + sizes)
    part = [payload[cuts[i]:cuts[i + 1]] for i in range(4)]
    deltas = np.frombuffer(part[0], dtype=id_dtype(vocab)).reshape(positions, k).astype(np.int64)
    indices = torch.from_numpy(np.cumsum(deltas, axis=-1))
    codes = torch.from_numpy(np.frombuffer(part[1], dtype=np.uint8).reshape(positions, k).astype(np.float32))
    ends = torch.from_numpy(np.frombuffer(part[2], dtype=np.float32).reshape(positions, 2).copy())
    tail = torch.from_numpy(np.frombuffer(part[3], dtype=np.float32).copy())
    low, high = ends[:, :1], ends[:, 1:]
    values = low + codes * ((high - low).clamp_min(1e-6) / LEVELS)
    total = torch.logsumexp(torch.cat([values, tail.unsqueeze(-1)], dim=-1), dim=-1)
    return indices, values - total.unsqueeze(-1), (tail - total).clamp_min(TAIL_FLOOR)
