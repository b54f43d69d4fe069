"""What a teacher store is keyed by, read from files and tokenizers without loading a model: the teacher's
fingerprint (its config and every weight file, by content), the tokenizer's, and each example's key.

A weight file's digest is kept in the cache ($ATLAS_DISTILL_CACHE/file-digests.json) under its path, size and
modification time, so a 28 GB teacher is read once, not at every `train`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import TeacherStoreError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_CHUNK = 16 * 2**20


def file_digest(path: Path) -> str:
    """blake2b of the file's bytes, hex."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_digest(path: Path, known: dict) -> str:
    stat = path.stat()
    key = str(path.resolve())
    entry = known.get(key)
    if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
        return entry["digest"]
    digest = file_digest(path)
    known[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "digest": digest}
    return digest


def model_directory(name_or_path: str) -> Path:
    """The local directory of a model: itself, or a hub id's snapshot in the local hub cache."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means the files are not here
        raise TeacherStoreError(
            f"The teacher {name_or_path!r} is neither a local directory nor in the local hub cache, so its weights "
            "cannot be fingerprinted.", fix=f"Download it first (`hf download {name_or_path}`) or pass a local "
            "directory.") from None


def teacher_fingerprint(name_or_path: str) -> str:
    """One digest of the teacher's config.json and every weight file's content (names included)."""
    from ..models import cache_dir

    directory = model_directory(name_or_path)
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)))
    store = cache_dir() / "file-digests.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    parts = [f"{p.name}:{_cached_digest(p, known)}" for p in files]
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".{store.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known))
        tmp.replace(store)
    except OSError:
        pass  # the cache only saves time; the digests were computed
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=20).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Digest of the vocabulary, the special tokens and the chat template: what turns a conversation into ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    text = json.dumps([vocab, special, getattr(tokenizer, "chat_template", None)])
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def row_keys(rows: list[dict], tokenizer, max_length: int | None) -> list[bytes]:
    """The topk_format key of each conversation as the off-policy collator encodes it (every target span)."""
    from ..gkd.collator import TargetSpanCollator
    from ..gkd.topk_format import example_keys

    collator = TargetSpanCollator(tokenizer, max_length)
    keys = []
    for row in rows:
        batch = collator([row])
        keys.extend(example_keys(batch, batch["labels"][:, 1:] != -100))
    return keys
