"""`contiguous_head_input`: keep the lm_head's input contiguous, for PyTorch's bf16 matmul on a CPU.

Generation's first forward projects only the last position: transformers slices the hidden states to
[B, 1, H], a view with the batch stride of the whole sequence. `torch.matmul` folds such an input into one
matrix only when its strides allow a view, so it takes the batched path instead: the [V, H] weight is
expanded to [B, H, V] and, on a CPU in bf16, copied whole (oneDNN's batched kernel needs it dense). With
the builtin's 49,152 x 576 head and 4 sequences that took 211 ms against 2 ms for a contiguous copy of the
[4, 1, 576] input (AMX CPU, bf16 or fp32 weights under bf16 autocast; fp32 weights were not affected).
A sampling copy, a bf16 teacher and an autocast student all paid it once per `generate`.
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
