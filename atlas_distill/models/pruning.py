"""Depth pruning: keep a subset of a model's decoder layers, as Minitron does.

A pruned copy starts far from its teacher; distillation then recovers quality
(DESIGN.md §5). `pruned_copy` builds it once into the cache, where
`registry.materialize` finds it from then on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from ..progress import Progress, no_progress
from .cache import built_model_dir, publish
from .loading import load_pretrained
from .spec import check_keep_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .spec import ModelSpec


def kept_layer_indices(total: int, keep: int) -> list[int]:
    """Which of `total` layers to keep: `keep` of them, evenly spaced, first and last included.

    The indices are round(linspace(0, total - 1, keep)), rounding halves up. Even
    spacing (Minitron-style depth pruning) keeps the first layer, which reads the
    embeddings, and the last, which feeds the output head, and spreads what is left
    over the depth rather than cutting one contiguous block. For keep < total the
    step (total - 1) / (keep - 1) exceeds 1, so no two indices round to the same
    layer. keep == 1 keeps the first layer alone.
    """
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [0]
    # exact integer form of floor(i * (total - 1) / (keep - 1) + 1/2)
    return [(2 * i * (total - 1) + keep - 1) // (2 * (keep - 1)) for i in range(keep)]


def decoder_layers(model: PreTrainedModel):
    """The model's ModuleList of decoder layers (model.model.layers for Llama, Qwen2, Mistral...)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no `layers` list of decoder layers to prune")
    return layers


def prune_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """Keep only the decoder layers at `keep` (sorted indices), renumbering them; in place.

    Each attention module's `layer_idx` is where it reads and writes the KV cache,
    so it is renumbered to the layer's new position; `config.layer_types` (per-layer
    full or sliding attention) keeps the entries of the kept layers.
    """
    import torch

    decoder = model.get_decoder()
    layers = decoder_layers(model)
    decoder.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_idx, layer in enumerate(decoder.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        config.layer_types = [layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    return model


def _cache_name(spec: ModelSpec) -> str:
    """The copy's directory name; a local base is told apart by its path and config.json time."""
    if spec.kind == "pruned":
        return f"{_cache_name(spec.base)}@{spec.keep_layers}L"
    if spec.kind == "local":
        stamp = f"{spec.source}:{(Path(spec.source) / 'config.json').stat().st_mtime_ns}"
        return f"{spec.name}-{hashlib.sha256(stamp.encode()).hexdigest()[:10]}"
    return spec.source.replace("/", "--")


def pruned_copy(spec: ModelSpec, base_path: str, progress: Progress = no_progress) -> Path:
    """The cached copy of `base_path` keeping `spec.keep_layers` layers; built once, atomically."""
    target = built_model_dir(_cache_name(spec))
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_keep_layers(spec, load_pretrained(AutoConfig, base_path, spec.base.spec).num_hidden_layers)

    def build(tmp: Path) -> None:
        progress(f"Pruning {spec.base.name} to {spec.keep_layers} layers (once)", 0, None)
        # dtype="auto": the checkpoint's own dtype, so the copy is neither widened nor rounded
        model = load_pretrained(AutoModelForCausalLM, base_path, spec.base.spec, dtype="auto")
        prune_layers(model, kept_layer_indices(len(decoder_layers(model)), spec.keep_layers))
        model.save_pretrained(tmp, safe_serialization=True)
        load_pretrained(AutoTokenizer, base_path, spec.base.spec).save_pretrained(tmp)

    return publish(build, target)
