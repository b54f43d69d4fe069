"""The model cache: where built models live ($ATLAS_DISTILL_CACHE) and how an entry is published whole."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "ATLAS_DISTILL_CACHE"


def cache_dir() -> Path:
    """$ATLAS_DISTILL_CACHE, else ~/.cache/atlas-distill (XDG_CACHE_HOME respected)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "atlas-distill"


def built_model_dir(name: str) -> Path:
    """Where the model cache keeps the model `name` (a builtin, or a pruned copy's cache name)."""
    return cache_dir() / "models" / name


def publish(build, target: Path) -> Path:
    """Build into a temporary directory beside `target`, then rename: a cache entry is whole or absent."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:  # another process published it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
