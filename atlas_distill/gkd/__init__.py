"""GKD on Atlas traces: the trainer built on TRL and its config.

`settings` (our settings, each written once) imports neither torch nor TRL; the trainer and its config do, so
they load on first use: `from atlas_distill.gkd import AtlasGKDTrainer, AtlasGKDConfig, GKDConfig`.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"AtlasGKDTrainer": "trainer", "AtlasGKDConfig": "config", "GKDConfig": "config"}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
