"""Files a run leaves behind: directories checked before work starts, JSON and checkpoints written whole.

A checkpoint is written under `.checkpoint-staging/` and renamed into the run directory once
complete (transformers 5.24 writes `checkpoint-N` in place), so a `checkpoint-N` directory is
whole or absent; one without `trainer_state.json` (written last) is never resumed from.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import OutputError

STAGING = ".checkpoint-staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# torch.save reports a full disk as "unexpected pos", safetensors as "os error 28": no errno to test.
_WRITE_FAILURE = re.compile(r"no space left|os error|i/o error|write failed|unexpected pos|disk quota", re.I)
FREE_SPACE_FIX = "Free disk space, or point --output-dir at a disk with more room."


def ensure_writable_dir(path: Path, what: str, fix: str) -> Path:
    """Create `path` and prove it takes a file, before hours of work would fail to save."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"Cannot write the {what} {path}: {exc.strerror}.", fix=fix) from None
    return path


def _nearest_existing(path: Path) -> Path:
    """`path`, or the closest of its parents that exists (a directory a run will make may not be there yet)."""
    return next(p for p in (path, *path.parents) if p.exists())


def check_writable_dir(path: Path, what: str, fix: str) -> Path:
    """Prove `path` could be made and written to, making nothing (a failed check or a dry run leaves no trace)."""
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise OutputError(f"Cannot write the {what} {path}: {existing} is not a directory.", fix=fix)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write the {what} {path}: {existing} is not writable (permission denied).", fix=fix)
    return path


def write_json(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    try:
        tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"Cannot write {path}: {exc.strerror}.", fix=FREE_SPACE_FIX) from None


def write_failure(exc: BaseException, path: Path) -> OutputError | None:
    """An OutputError for an exception that says writing `path` failed (full disk, I/O error), else None."""
    if not isinstance(exc, OSError) and not _WRITE_FAILURE.search(str(exc)):
        return None
    text = next((line.strip(" .") for line in str(exc).splitlines() if line.strip(" .")), type(exc).__name__)
    free = shutil.disk_usage(_nearest_existing(path)).free
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    elif re.search(r"no space left|os error 28", text, re.I) or free < 2**20:
        reason = "No space left on device"
    else:
        reason = f"the write failed ({text})"
    return OutputError(f"Writing {path} failed: {reason} ({format_bytes(free)} free there).", fix=FREE_SPACE_FIX)


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} TB"


# Checkpoints


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def is_complete_checkpoint(path: Path) -> bool:
    return (path / "trainer_state.json").is_file()


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    found = [(step, p) for p in run_dir.iterdir() if (step := checkpoint_step(p)) is not None
             and is_complete_checkpoint(p)] if run_dir.is_dir() else []
    return max(found)[1] if found else None


def remove_incomplete_checkpoints(run_dir: Path) -> list[str]:
    """Delete half-written checkpoints (killed mid-save) so that nothing resumes from or rotates into them."""
    removed = []
    for path in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if checkpoint_step(path) is not None and not is_complete_checkpoint(path):
            shutil.rmtree(path)
            removed.append(path.name)
    staging = run_dir / STAGING
    if staging.is_dir():
        removed += [f"{STAGING}/{p.name}" for p in sorted(staging.iterdir())]
        shutil.rmtree(staging)
    return removed


def discard_checkpoint(staged: Path) -> None:
    """Remove a staged checkpoint whose save failed (and the staging directory, when nothing else is in it)."""
    shutil.rmtree(staged, ignore_errors=True)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()


def promote_checkpoint(staged: Path, final: Path) -> None:
    """Move a finished checkpoint into place in one rename (a directory of the same name is replaced)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()  # the staging directory, when nothing else is in it


def checkpoint_bytes(model) -> tuple[int, int]:
    """(bytes of one checkpoint, bytes of the model alone): the weights, plus AdamW's two moments per
    trainable weight (about 3x the model for a full fine-tune, little more than 1x with LoRA)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + moments, weights


def check_free_space(run_dir: Path, model, keep: int | None) -> str | None:
    """OutputError when the disk cannot hold one checkpoint plus final/; a warning (returned) when it cannot
    hold the `keep` checkpoints (+1 while the next is written) that the run keeps."""
    checkpoint, weights = checkpoint_bytes(model)
    free = shutil.disk_usage(_nearest_existing(run_dir)).free
    needed = checkpoint + weights
    if free < needed:
        raise OutputError(
            f"Not enough free disk space in {run_dir}: {format_bytes(free)} free, the run needs about "
            f"{format_bytes(needed)} (one checkpoint: {format_bytes(checkpoint)}, i.e. the weights, "
            f"{format_bytes(weights)}, and AdamW's two moments; plus final/: {format_bytes(weights)}).",
            fix=FREE_SPACE_FIX)
    kept = (keep or 1) + 1
    if keep is not None and free < kept * checkpoint + weights:
        return (f"Warning: {format_bytes(free)} free in {run_dir}; keeping {kept - 1} checkpoints "
                f"(trainer.save_total_limit) needs up to {format_bytes(kept * checkpoint + weights)}.")
    return None
