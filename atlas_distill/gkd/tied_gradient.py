"""One gradient buffer for a weight that is both the student's input embedding and its lm_head (tied weights, as the
builtin SmolLM2's).

Such a weight gets two gradients in backward: the chunked loss's head gradient, a [V, H] buffer its chunks add into
(gkd/divergence.py), and the embedding's, which PyTorch's embedding backward builds as a second zero-filled [V, H]
tensor with a row added per input token, before autograd sums the two. That second tensor was the last and largest
allocation of the step, on top of every other gradient: 113 MB for the builtin's 49,152 x 576 in fp32, and 5-150 ms
to zero-fill (the latter while malloc still handed back fresh pages). Inside `shared_gradient`, the embedding's
backward adds its rows straight into the head gradient instead (`index_add_`), before autograd hands that buffer to
the weight as its `.grad`: hooks on the weight, gradient accumulation and clipping see the same sum as before.

The two backward steps are linked only within one backward pass (autograd's graph task): the loss offers its
buffer there, and the embedding takes it only in the same pass, so a buffer from an earlier pass, by then a `.grad`
or freed, is never written. Where nothing was offered (the full-logits loss, a model whose weights are not tied,
evaluation) the embedding's backward is PyTorch's own.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch

# id(lm_head weight) -> the link of the `shared_gradient` block it is trained in
_LINKS: dict[int, _Link] = {}


class _Link:
    """The head gradient the loss offered in the current backward pass (weakly held: autograd owns it)."""

    def __init__(self) -> None:
        self.task: int | None = None
        self.buffer: weakref.ref | None = None

    def offer(self, gradient: torch.Tensor) -> None:
        self.task, self.buffer = torch._C._current_graph_task_id(), weakref.ref(gradient)

    def take(self) -> torch.Tensor | None:
        if self.buffer is None or self.task != torch._C._current_graph_task_id():
            return None
        return self.buffer()


def offer(weight: torch.Tensor, gradient: torch.Tensor | None) -> None:
    """From the loss's backward: `gradient` is the head's gradient of `weight` in this backward pass."""
    link = _LINKS.get(id(weight))
    if link is not None and gradient is not None:
        link.offer(gradient)


class _Embedding(torch.autograd.Function):
    """nn.Embedding's lookup, whose weight gradient goes into the offered head gradient when there is one."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, link: _Link):
        ctx.save_for_backward(ids)
        ctx.rows, ctx.padding_idx, ctx.link = weight.shape[0], padding_idx, link
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_output):
        (ids,) = ctx.saved_tensors
        target = ctx.link.take()
        if target is None:
            padding = -1 if ctx.padding_idx is None else ctx.padding_idx
            return None, torch.ops.aten.embedding_dense_backward(grad_output, ids, ctx.rows, padding, False), None, None
        rows, grads = ids.reshape(-1), grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient
            kept = rows != ctx.padding_idx
            rows, grads = rows[kept], grads[kept]
        target.index_add_(0, rows, grads.to(target.dtype))
        return None, None, None, None


def _shareable(model) -> bool:
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    return (type(embedding) is torch.nn.Embedding and head is not None and embedding.weight is head.weight
            and embedding.max_norm is None and not embedding.scale_grad_by_freq and not embedding.sparse)


@contextmanager
def shared_gradient(model):
    """Within the block, `model`'s tied embedding / lm_head weight gets one gradient buffer (see the module's doc);
    a model without tied weights, or with a non-standard embedding, is left as it is."""
    if not _shareable(model):
        yield
        return
    embedding, link = model.get_input_embeddings(), _Link()

    def lookup(module, args, output):
        if not (args and torch.is_grad_enabled() and module.weight.requires_grad):
            return None
        return _Embedding.apply(args[0], module.weight, module.padding_idx, link)

    handle = embedding.register_forward_hook(lookup)
    _LINKS[id(embedding.weight)] = link
    try:
        yield
    finally:
        handle.remove()
        _LINKS.pop(id(embedding.weight), None)
