"""A teacher store on disk: what it was built for (`StoreKey`), its shards, and reading it (`TeacherStore`).

    DIR/build.json            the StoreKey of the build under way (written first)
    DIR/shards/NNNNN.bin      records (gkd/topk_format.py), one per example, back to back
    DIR/shards/NNNNN.json     that shard's index (key, offset, length, positions per example), size and blake2b
    DIR/manifest.json         written last, by rename: the store is complete

A shard's .bin is renamed into place whole, then its .json; a build killed midway leaves whole shards and no
manifest, so it is never taken for complete and the next build resumes after the last whole shard.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..errors import TeacherStoreError
from ..gkd import topk_format
from ..gkd.teacher_cache import concatenated
from .fingerprint import file_digest

FORMAT = 1
MANIFEST, BUILD, SHARDS = "manifest.json", "build.json", "shards"


@dataclass(frozen=True)
class StoreKey:
    """What a store's records depend on; a run whose own differs in any field but `k` cannot use the store."""

    teacher: str
    teacher_fingerprint: str
    tokenizer: str
    max_length: int | None
    temperature: float
    vocab: int
    targets: str
    k: int
    teacher_dtype: str = "auto"
    """How the teacher was loaded (float32, bfloat16, 8-bit, 4-bit). Not compared with a run's (a bf16 and an fp32
    teacher's distributions differ by a JSD of about 6e-4), but a build resumes only with the same one."""
    format: int = FORMAT

    def differences(self, run: StoreKey) -> list[str]:
        labels = {"teacher_fingerprint": "teacher weights", "tokenizer": "tokenizer", "max_length": "max_length",
                  "temperature": "temperature", "vocab": "shared vocabulary size", "targets": "data.targets",
                  "format": "store format"}
        out = []
        for name, label in labels.items():
            mine, theirs = getattr(self, name), getattr(run, name)
            if mine != theirs:
                if name == "teacher_fingerprint":
                    mine, theirs = f"{self.teacher} ({mine[:12]})", f"{run.teacher} ({theirs[:12]})"
                out.append(f"{label}: store {mine}, this run {theirs}")
        return out

    @classmethod
    def from_dict(cls, data: dict) -> StoreKey:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    """Whole or absent: written beside, flushed, renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def whole_shards(directory: Path) -> list[dict]:
    """The shards whose .bin is there at the size and digest their .json records, in order."""
    shards = []
    for meta_path in sorted((directory / SHARDS).glob("[0-9]*.json")):
        meta = read_json(meta_path)
        data = meta_path.with_suffix(".bin")
        if (_is_shard_meta(meta) and meta["file"] == data.name and data.is_file()
                and data.stat().st_size == meta["bytes"] and file_digest(data) == meta["blake2b"]):
            shards.append(meta)
    return shards


def _is_shard_meta(meta) -> bool:
    return (isinstance(meta, dict) and isinstance(meta.get("file"), str) and isinstance(meta.get("bytes"), int)
            and isinstance(meta.get("blake2b"), str) and isinstance(meta.get("examples"), list)
            and all(isinstance(e, list) and len(e) == 4 for e in meta["examples"]))


class TeacherStore:
    """A complete store, opened for reading: every shard there, whole, and its digest checked."""

    def __init__(self, path: Path, manifest: dict, index: dict[bytes, tuple[int, int, int, int]]) -> None:
        self.path, self.manifest, self.index = path, manifest, index
        self.key = StoreKey.from_dict(manifest["key"])
        # Opened now, so a shard removed or replaced after the checks cannot be read in the middle of training.
        self._handles = [os.open(path / SHARDS / shard["file"], os.O_RDONLY) for shard in manifest["shards"]]

    @classmethod
    def open(cls, path: str | Path) -> TeacherStore:
        path = Path(path)
        manifest = read_json(path / MANIFEST)
        if manifest is None:
            if (path / BUILD).is_file():
                raise TeacherStoreError(f"The teacher store {path} is not complete: its build did not finish.",
                                        fix="Run the same `atlas-distill teacher-store build` command again; it "
                                        "resumes after the last whole shard.")
            raise TeacherStoreError(f"{path} is not a teacher store (no {MANIFEST}).",
                                    fix="Build one with `atlas-distill teacher-store build --out DIR`, or correct "
                                    "trainer.teacher_store.")
        try:
            StoreKey.from_dict(manifest["key"])
            int(manifest["examples"]), int(manifest["positions"]), int(manifest["bytes"])
            shards = manifest["shards"]
            if not all(_is_shard_meta(shard) for shard in shards):
                raise ValueError("a shard entry is not a shard's index")
            index = {bytes.fromhex(key): (number, offset, length, positions)
                     for number, shard in enumerate(shards) for key, offset, length, positions in shard["examples"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise TeacherStoreError(f"The teacher store's {path / MANIFEST} is damaged ({exc}).",
                                    fix="Delete it and run the same `atlas-distill teacher-store build` command "
                                    "again: it checks the shards already there and writes the manifest anew.") from None
        for shard in shards:
            cls._check_shard(path, shard)
        return cls(path, manifest, index)

    @staticmethod
    def _check_shard(path: Path, shard: dict) -> None:
        data = path / SHARDS / shard["file"]
        problem = ("is missing" if not data.is_file() else
                   f"is {data.stat().st_size:,} bytes, not {shard['bytes']:,} (truncated?)"
                   if data.stat().st_size != shard["bytes"] else
                   "does not match its checksum (damaged)" if file_digest(data) != shard["blake2b"] else None)
        if problem:
            stem = Path(shard["file"]).stem
            raise TeacherStoreError(
                f"Shard {data} of the teacher store {problem}.",
                fix=f"Delete {path / SHARDS / stem}.bin and {stem}.json and run the same `atlas-distill teacher-store "
                "build` command again: it rebuilds only what is missing.")

    def missing(self, keys: list[bytes]) -> int:
        return sum(key not in self.index for key in keys)

    def lookup(self, keys: list[bytes], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The batch's (indices, log-probs, tail) in order, as TeacherCache.lookup; None if an example is absent."""
        found = [self.index.get(key) for key in keys]
        if any(entry is None for entry in found):
            return None
        k, vocab = self.key.k, self.key.vocab
        return concatenated([topk_format.decode(self._read(shard, offset, length), positions, k, vocab)
                             for shard, offset, length, positions in found], device)

    def _read(self, shard: int, offset: int, length: int) -> bytes:
        return os.pread(self._handles[shard], length, offset)

    def close(self) -> None:
        for handle in self._handles:
            os.close(handle)
        self._handles = []

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def check_for(self, run: StoreKey, keys: list[bytes], what: str = "training conversations") -> None:
        """Refuse this store for a run it was not built for: name every difference, or how much data it lacks."""
        differences = self.key.differences(run)
        if differences:
            raise TeacherStoreError(
                f"The teacher store {self.path} was built for another run: {'; '.join(differences)}.",
                fix="Build a store for this run (`atlas-distill teacher-store build` with the same teacher, profile "
                "and overrides as `train`), or point trainer.teacher_store at the right one.")
        missing = self.missing(keys)
        if missing:
            raise TeacherStoreError(
                f"{missing} of the {len(keys)} {what} are not in the teacher store {self.path} (it was built from "
                "other traces, filters or data settings).",
                fix="Build the store from the same traces and profile as this run (`atlas-distill teacher-store "
                "build --traces FILE` or `--database-url URL`, the same --profile and overrides).")

    def figures(self) -> dict:
        return {key: self.manifest[key] for key in ("examples", "positions", "bytes", "build_seconds")} | {
            "k": self.key.k, "bytes_per_position": self.manifest["bytes"] / max(self.manifest["positions"], 1)}
