"""atlas-distill: distill a teacher model into a smaller student with GKD, on Atlas SDK traces.

The Python API of the upstream docs, importable from the package as upstream writes it
(`from atlas_distill import AtlasGKDTrainer, GKDConfig, build_gkd_dataset,
compute_baseline_summary`), each loaded on first use so that `import atlas_distill` stays
light: `AtlasGKDTrainer` and `GKDConfig` live in `atlas_distill.gkd`, `build_gkd_dataset` in
`atlas_distill.data`, `compute_baseline_summary` in `atlas_distill.evaluate`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {"AtlasGKDTrainer": "gkd", "GKDConfig": "gkd", "build_gkd_dataset": "data",
         "compute_baseline_summary": "evaluate"}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
