"""`build_teacher_store`: one pass of the teacher over every target position of the conversations, into a store.

Resumable: shards are published whole (store.py), and a build that finds `build.json` for the same key and data
continues after the shards already there; one for another key or data is refused unless `restart` is set.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import OutputError, TeacherStoreError
from ..outputs import write_failure
from .fingerprint import file_digest, row_keys
from .store import BUILD, MANIFEST, SHARDS, StoreKey, read_json, whole_shards, write_json

LOCK = ".lock"
SHARD_BYTES = 64 * 2**20  # a shard is checked whole when opened: 64 MB reads in well under a second


@dataclass
class BuildResult:
    path: Path
    examples: int
    positions: int
    bytes: int
    seconds: float
    """This invocation's wall time."""
    teacher_seconds: float
    """Of it, the teacher's forward passes (what one off-policy epoch spends in the teacher)."""
    resumed: int
    """Examples found already built (a resumed build), not recomputed."""
    k: int


def data_digest(keys: list[bytes]) -> str:
    return hashlib.blake2b(b"".join(sorted(set(keys))), digest_size=20).hexdigest()


def build_teacher_store(out: str | Path, key: StoreKey, rows: list[dict], tokenizer,
                        load_teacher: Callable[[], torch.nn.Module], *, batch_size: int = 8, restart: bool = False,
                        shard_bytes: int = SHARD_BYTES,
                        on_progress: Callable[[int, int], None] | None = None) -> BuildResult:
    started = time.perf_counter()
    out = Path(out)
    if key.k > key.vocab:
        raise ValueError(f"k={key.k} is more than the {key.vocab} tokens of the vocabulary")
    keys = row_keys(rows, tokenizer, key.max_length)
    data = data_digest(keys)
    with _locked(out):
        _claim(out, key, data, restart)
        done = whole_shards(out)
        _remove_strays(out, done)
        built = {entry[0] for shard in done for entry in shard["examples"]}
        todo = {}
        for row, row_key in zip(rows, keys):
            if row_key.hex() not in built:
                todo.setdefault(row_key, row)  # the same conversation twice is built once
        complete = read_json(out / MANIFEST)
        if not todo and isinstance(complete, dict) and complete.get("shards") == done:
            return _result(out, complete, started, 0.0, len(built))
        (out / MANIFEST).unlink(missing_ok=True)
        teacher_seconds, written = (0.0, []) if not todo else _run_teacher(
            out, key, list(todo.values()), tokenizer, load_teacher, done, batch_size, shard_bytes, on_progress,
            len(built), len(built) + len(todo))
        shards = done + written  # the shards found whole, then this build's (not read back again)
        manifest = {"key": asdict(key), "data": data, "shards": shards,
                    "examples": sum(len(s["examples"]) for s in shards),
                    "positions": sum(e[3] for s in shards for e in s["examples"]),
                    "bytes": sum(s["bytes"] for s in shards),
                    "build_seconds": round(time.perf_counter() - started, 2)}
        write_json(out / MANIFEST, manifest)
        return _result(out, manifest, started, teacher_seconds, len(built))


def _result(out: Path, manifest: dict, started: float, teacher_seconds: float, resumed: int) -> BuildResult:
    return BuildResult(out, manifest["examples"], manifest["positions"], manifest["bytes"],
                       round(time.perf_counter() - started, 2), round(teacher_seconds, 2), resumed,
                       manifest["key"]["k"])


@contextmanager
def _locked(out: Path):
    """`out` held by this build alone while it runs (an flock on out/.lock, released when the process ends)."""
    import fcntl

    is_store = (out / BUILD).is_file() or (out / MANIFEST).is_file()
    if out.exists() and (not out.is_dir() or (any(p.name != LOCK for p in out.iterdir()) and not is_store)):
        raise OutputError(f"{out} exists and is not a teacher store; the build would mix its files with others.",
                          fix="Choose a new --out directory (or an existing store's).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK, "a+")
    except OSError as exc:
        raise write_failure(exc, out) or exc from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TeacherStoreError(f"Another `teacher-store build` is writing {out} now.",
                                    fix="Wait for it to finish (a second build into the same --out would mix their "
                                    "shards), or choose another --out.") from None
        yield


def _claim(out: Path, key: StoreKey, data: str, restart: bool) -> None:
    """Make `out` this build's: new, or the same build's to resume; another build's only with `restart`."""
    is_store = (out / BUILD).is_file() or (out / MANIFEST).is_file()
    claimed = read_json(out / BUILD) or read_json(out / MANIFEST)
    if claimed is not None and not restart:
        try:
            theirs = StoreKey.from_dict(claimed["key"])
        except (KeyError, TypeError):
            raise TeacherStoreError(f"{out} holds a teacher store whose {BUILD} and {MANIFEST} are damaged.",
                                    fix="Add --restart to discard it and build anew, or choose another --out.") \
                from None
        differences = theirs.differences(key)
        for name in ("k", "teacher_dtype"):  # one store's records all come from one k and one teacher dtype
            if getattr(theirs, name) != getattr(key, name):
                differences.append(f"{name}: store {getattr(theirs, name)}, this build {getattr(key, name)}")
        if claimed.get("data") != data:
            differences.append("the conversations (other traces, filters or data settings)")
        if differences:
            raise TeacherStoreError(f"{out} holds a teacher store built for something else: {'; '.join(differences)}.",
                                    fix="Add --restart to discard it and build anew, or choose another --out.")
    if restart and is_store:
        for name in (MANIFEST, BUILD):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / SHARDS, ignore_errors=True)
    try:
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
        write_json(out / BUILD, {"key": asdict(key), "data": data})
    except OSError as exc:
        raise write_failure(exc, out) or exc from None


def _remove_strays(out: Path, done: list[dict]) -> None:
    """Everything in shards/ that is not a whole shard: a shard being written when the build was killed."""
    keep = {name for shard in done for name in (shard["file"], Path(shard["file"]).with_suffix(".json").name)}
    for path in (out / SHARDS).iterdir():
        if path.name not in keep and not path.is_dir():
            path.unlink()


def _run_teacher(out: Path, key: StoreKey, rows: list[dict], tokenizer, load_teacher, done: list[dict],
                 batch_size: int, shard_bytes: int, on_progress, finished: int, total: int) -> tuple[float, list]:
    from ..gkd import divergence, topk_format
    from ..gkd.collator import TargetSpanCollator

    teacher = load_teacher().eval()
    device = next(teacher.parameters()).device
    collator = TargetSpanCollator(tokenizer, key.max_length)
    rows = sorted(rows, key=lambda row: row.get("length") or 0)  # batches of like length: less padding
    writer = _ShardWriter(out, 1 + max((int(Path(s["file"]).stem) for s in done), default=-1), shard_bytes)
    teacher_seconds = 0.0
    for start in range(0, len(rows), batch_size):
        batch = collator(rows[start:start + batch_size])
        mask = batch["labels"][:, 1:] != -100
        inputs = {name: batch[name].to(device) for name in ("input_ids", "attention_mask")}
        began = time.perf_counter()
        with torch.inference_mode():
            hidden = divergence.completion_hidden(teacher, inputs, mask.to(device))
            topk = divergence.teacher_topk(hidden, teacher, vocab=key.vocab, k=key.k, temperature=key.temperature)
        teacher_seconds += time.perf_counter() - began
        counts = mask.sum(dim=1).tolist()
        for row_key, count, *parts in zip(topk_format.example_keys(batch, mask), counts,
                                          *[part.cpu().split(counts) for part in topk]):
            writer.add(row_key, topk_format.encode(*parts, key.vocab), count)
        finished += len(counts)
        if on_progress:
            on_progress(finished, total)
    writer.flush()
    return teacher_seconds, writer.written


class _ShardWriter:
    """Records buffered into shards of about `limit` bytes, each published whole: .bin renamed into place, then
    its .json index."""

    def __init__(self, out: Path, number: int, limit: int) -> None:
        self.out, self.number, self.limit = out / SHARDS, number, limit
        self.records: list[bytes] = []
        self.examples: list[list] = []
        self.size = 0
        self.written: list[dict] = []  # the index of each shard published

    def add(self, key: bytes, record: bytes, positions: int) -> None:
        self.examples.append([key.hex(), self.size, len(record), positions])
        self.records.append(record)
        self.size += len(record)
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        name = f"{self.number:05d}.bin"
        path = self.out / name
        tmp = path.with_name(f".{name}.tmp")
        try:
            with open(tmp, "wb") as handle:
                for record in self.records:
                    handle.write(record)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(path)
            meta = {"file": name, "bytes": self.size, "blake2b": file_digest(path), "examples": self.examples}
            write_json(path.with_suffix(".json"), meta)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise write_failure(exc, path) or exc from None
        self.written.append(meta)
        self.number, self.records, self.examples, self.size = self.number + 1, [], [], 0
