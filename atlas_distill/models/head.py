"""`contiguous_head_input`: keep the lm_head's input contiguous, for PyTorch's bf16 matmul on a CPU.

Generation's first forward projects only the last position: transformers slices the hidden states to
[B, 1, H], a view with the batch stride of the whole sequence. `torch.matmul` folds such an input into one
matrix only when its strides allow a view (or when an operand requires grad), so for a frozen weight it takes
the batched path: the [V, H] weight is expanded to [B, H, V] and, on a CPU in bf16, copied whole. With the
builtin's 49,152 x 576 head and 4 sequences that one projection took 296 ms against 4 ms, and generation's
first forward 0.49 s against 0.24 s (benchmarks/generation_bench.py, AMX CPU). A bf16 sampling copy, a bf16
teacher and a student under autocast (its casts do not require grad) all paid it once per `generate`; fp32
weights did not.
"""

from __future__ import annotations

_MARK = "_atlas_contiguous_input"


def contiguous_head_input(model) -> None:
    """Register (once) a forward pre-hook on `model`'s lm_head that makes a non-contiguous batched input
    contiguous. A copy of the model (`copy.deepcopy`) keeps the hook."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, _MARK, False):
        return
    head.register_forward_pre_hook(_contiguous_input)
    setattr(head, _MARK, True)


def _contiguous_input(module, args):
    hidden = args[0] if args else None
    if hidden is not None and hidden.dim() > 2 and not hidden.is_contiguous():
        return (hidden.contiguous(), *args[1:])
    return None
