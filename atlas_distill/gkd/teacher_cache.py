"""The teacher's top-k log-probs per completion position, kept for examples that come back (`teacher_cache_topk`)."""

from __future__ import annotations

import torch


class TeacherCache:
    """The teacher's top-k log-probs (and tail) at each completion position of the examples it has seen.

    An example is keyed by the digest of its unpadded tokens and its loss positions, so the same example
    padded differently in another batch finds its entry. Entries are kept on the CPU, in fp32.
    """

    def __init__(self, k: int, max_bytes: int = 2 * 2**30) -> None:
        self.k = k
        self.max_bytes = max_bytes  # a large dataset keeps its first examples only, not all RAM
        self.bytes = 0
        self.entries: dict[bytes, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def keys(inputs, mask: torch.Tensor) -> list[bytes]:
        import hashlib

        keys = []
        for ids, attention, positions in zip(inputs["input_ids"], inputs["attention_mask"], mask):
            digest = hashlib.blake2b(ids[attention.bool()].cpu().numpy().tobytes(), digest_size=16)
            # loss positions among the real tokens, so left or right padding does not change the key
            digest.update(positions[(attention[:-1] * attention[1:]).bool()].cpu().numpy().tobytes())
            keys.append(digest.digest())
        return keys

    def lookup(self, keys: list[bytes], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The batch's (indices, log-probs, tail), its rows' positions concatenated in order; None on any miss."""
        found = [self.entries.get(key) for key in keys]
        if any(entry is None for entry in found):
            self.misses += 1
            return None
        self.hits += 1
        return tuple(torch.cat([entry[i] for entry in found]).to(device) for i in range(3))

    def store(self, keys: list[bytes], counts: list[int], topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        splits = [part.detach().cpu().split(counts) for part in topk]
        for key, *parts in zip(keys, *splits):
            if key in self.entries:  # the same example twice in one batch: kept (and counted) once
                continue
            size = sum(part.numel() * part.element_size() for part in parts)
            if self.bytes + size > self.max_bytes:
                return
            self.entries[key] = tuple(part.clone() for part in parts)
            self.bytes += size
