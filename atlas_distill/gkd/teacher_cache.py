"""The teacher's top-k log-probs per completion position, kept for examples that come back (`teacher_cache_topk`)."""

from __future__ import annotations

import torch

from . import topk_format


class TeacherCache:
    """The teacher's top-k log-probs (and tail) at each completion position of the examples it has seen, in memory,
    one topk_format record per example (the teacher store's format), keyed by `topk_format.example_keys`."""

    def __init__(self, k: int, vocab: int, max_bytes: int = 2 * 2**30) -> None:
        self.k, self.vocab = min(k, vocab), vocab  # teacher_topk keeps at most the whole vocabulary
        self.max_bytes = max_bytes  # a large dataset keeps its first examples only, not all RAM
        self.bytes = 0
        self.entries: dict[bytes, tuple[bytes, int]] = {}
        self.hits = 0
        self.misses = 0

    keys = staticmethod(topk_format.example_keys)

    def lookup(self, keys: list[bytes], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The batch's (indices, log-probs, tail), its rows' positions concatenated in order; None on any miss."""
        found = [self.entries.get(key) for key in keys]
        if any(entry is None for entry in found):
            self.misses += 1
            return None
        self.hits += 1
        return concatenated([topk_format.decode(record, n, self.k, self.vocab) for record, n in found], device)

    def store(self, keys: list[bytes], counts: list[int], topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        splits = [part.detach().cpu().split(counts) for part in topk]
        for key, count, *parts in zip(keys, counts, *splits):
            if key in self.entries:  # the same example twice in one batch: kept (and counted) once
                continue
            record = topk_format.encode(*parts, self.vocab)
            if self.bytes + len(record) > self.max_bytes:
                return
            self.entries[key] = (record, count)
            self.bytes += len(record)


def concatenated(parts: list[tuple[torch.Tensor, ...]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoded examples' (indices, log-probs, tail), their positions concatenated in order, on `device`."""
    return tuple(torch.cat([part[i] for part in parts]).to(device) for i in range(3))
