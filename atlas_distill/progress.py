"""The two callbacks long work reports through, so that the CLI renders it (library code does not print it).

- Event(kind, data): a run's lines, stages, steps, logs and model preparation (training, compare, evaluation).
- Progress(phase, done, total): one-time model preparation (GGUF conversion, the demo teacher, pruning).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Event = Callable[[str, Any], None]
Progress = Callable[[str, int, "int | None"], None]


def no_progress(phase: str, done: int, total: int | None) -> None:
    pass
