"""`materialize`: from a resolved spec to what from_pretrained takes, building a builtin or pruned copy once."""

from __future__ import annotations

from ..progress import Progress, no_progress
from .pruning import pruned_copy
from .registry import build_builtin
from .spec import ModelSpec


def materialize(spec: ModelSpec, progress: Progress = no_progress) -> str:
    """What to pass to from_pretrained; a builtin or pruned copy is built once into the cache, reporting
    (phase, done, total) to `progress` while it is."""
    if spec.kind == "builtin":
        return str(build_builtin(spec.source, progress))
    if spec.kind == "pruned":
        return str(pruned_copy(spec, materialize(spec.base, progress), progress))
    return spec.source
