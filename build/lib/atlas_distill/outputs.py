"""Files a run leaves behind: directories checked before work starts, JSON written whole."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import OutputError


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


def write_json(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(tmp, path)
