"""What the tool knows about model families without their files: the few config numbers of each Qwen2.5 size
(the family the README's chains use), and a model's parameter count from a config by arithmetic.

A dry run on a machine without the hub plans the documented chain from these: sizes, and the tokenizer the
family shares. They are the models' published config.json values (hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size, tie_word_embeddings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# What a size alias (14b, 7b, ...) resolves to unless `model.family` says otherwise.
DEFAULT_FAMILY = "Qwen/Qwen2.5-{size}-Instruct"

# Qwen/Qwen2.5-{size}-Instruct (the base models have the same shapes).
_QWEN25 = {
    "0.5B": (896, 4864, 24, 14, 2, 151_936, True),
    "1.5B": (1536, 8960, 28, 12, 2, 151_936, True),
    "3B": (2048, 11008, 36, 16, 2, 151_936, True),
    "7B": (3584, 18944, 28, 28, 4, 152_064, False),
    "14B": (5120, 13824, 48, 40, 8, 152_064, False),
    "32B": (5120, 27648, 64, 40, 8, 152_064, False),
    "72B": (8192, 29568, 80, 64, 8, 152_064, False),
}
_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "vocab_size", "tie_word_embeddings")
QWEN25_FAMILY = "Qwen2.5"
# len(tokenizer) of the one tokenizer each family shares: Qwen2.5's 151,643 tokens and 22 special ones
TOKENIZER_SIZE = {QWEN25_FAMILY: 151_665}


def known_config(hub_id: str) -> dict[str, Any] | None:
    """The config numbers of a Qwen2.5 size by its hub id (Qwen/Qwen2.5-7B-Instruct, Qwen/Qwen2.5-7B)."""
    org, _, name = hub_id.partition("/")
    if org != "Qwen" or not name.startswith("Qwen2.5-"):
        return None
    size = name.removeprefix("Qwen2.5-").removesuffix("-Instruct")
    values = _QWEN25.get(size)
    return dict(zip(_FIELDS, values, strict=True)) | {"model_type": "qwen2", "family": QWEN25_FAMILY} \
        if values else None


def local_config(directory: str) -> dict[str, Any] | None:
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def parameter_count(config: dict[str, Any], layers: int | None = None) -> int | None:
    """Parameters of a Llama-style decoder (Qwen2, Llama, Mistral, SmolLM2) from its config: embeddings, attention
    (with Qwen2's q/k/v biases), the gated MLP, the norms and, unless tied, the output head. None when a number
    is missing or the architecture is another."""
    try:
        hidden, inner = int(config["hidden_size"]), int(config["intermediate_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)  # none given: as many as attention heads
        vocab, depth = int(config["vocab_size"]), int(layers or config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        return None
    if config.get("model_type") not in ("qwen2", "llama", "mistral"):
        return None
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = kv_heads * head_dim
    attention = hidden * heads * head_dim + 2 * hidden * kv + heads * head_dim * hidden
    if config.get("model_type") == "qwen2":
        attention += heads * head_dim + 2 * kv  # q, k and v biases
    per_layer = attention + 3 * hidden * inner + 2 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return embeddings + depth * per_layer + hidden


# The builtin models' config numbers (SmolLM2-135M-Instruct; the demo teacher is a fine-tuned copy), so that a
# plan needs no build: the same fields as config.json.
_SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49_152,
                 "tie_word_embeddings": True}


def builtin_config(name: str) -> dict[str, Any]:
    """The config numbers of a builtin model (models/registry.py names them)."""
    return dict(_SMOLLM2_135M)


def smaller_size(teacher: str) -> str | None:
    """The next smaller Qwen2.5 size alias than the teacher's (`7b` for `14b` or Qwen/Qwen2.5-14B-Instruct), or None
    when the teacher is not a Qwen2.5 size or is the smallest."""
    sizes = [size for size in _QWEN25]
    text = teacher.strip()
    name = text.partition("/")[2] if "/" in text else ""
    size = (name.removeprefix("Qwen2.5-").removesuffix("-Instruct") if name.startswith("Qwen2.5-") else
            text.upper() if text.upper() in sizes else None)
    if size not in sizes or sizes.index(size) == 0:
        return None
    return sizes[sizes.index(size) - 1].lower()
