"""Under gradient checkpointing, the training forward replayed from generation (the `replay_generation` setting).

With checkpointing an on-policy step ran the student's decoder three times over the same tokens: while generating
(the prompt's prefill, then one token at a time), in the training forward, which keeps only each layer's input and
drops the rest, and again in backward, where each layer is recomputed from that input with gradient. The training
forward recomputes what generation has just computed: the same weights, the same tokens, each layer's output at
every position that has a loss after it (a position sees only those before it).

So while the student samples, a forward hook on each decoder layer records its output (`recording`): the prefill's
over the prompt, then one position per decoding step, into one [B, L - 1, H] buffer per layer (the training
sequence without its last token, which predicts nothing). The training forward then runs transformers' own loop
(embeddings, masks, rotary positions, final norm) with each checkpointed layer's checkpoint function replaced
(`replaying`): instead of running the layer, it returns the recorded output and keeps the layer's input, and
backward recomputes the layer from that input with gradient, as reentrant checkpointing does. Nothing is run twice
that checkpointing did not already run twice; the training forward's layers are not run at all.

The loss and gradients are the checkpointed forward's within rounding: generation computed the prompt over fewer
rows and decoded on packed weights (gkd/packed_linear.py), so a recorded output differs from a recomputed one in
the last bits (the tests check the loss to 1e-5 and the gradients to 1e-4 relative). The training forward takes
generation's position ids (`prompt_pass.decoding_positions`) so that the recompute is the computation generation
did. Positions after a sample's end of sequence are masked in training but were not while decoding; nothing with a
loss sees them, so their gradients are zero either way.

It applies where the student itself samples in the dtype it trains in (no sampling copy), one process holds the
whole student, generation keeps a KV cache (one position per decoding step), and nothing in the student is
random (no dropout): then the recorded outputs are the training forward's. A recording that does not cover the
training sequence exactly (a generation that ran otherwise) is not replayed: the step runs the checkpointed
forward as before; so does a layer called otherwise than with its hidden states first (`_replay`).

Backward's recompute of a layer is run for the path of its output's gradient; that output's value is not used. So
with `lean_recompute`, a Llama, Qwen2, Qwen3 or Mistral layer's MLP, whose output only goes into the residual sum,
returns zeros there instead of its down projection (gkd/lean_activations.py `unread_mlp_outputs`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch

from . import divergence
from .lean_activations import reads_no_mlp_output, unread_mlp_outputs
from .prompt_pass import decoding_positions


def checkpointed_layers(model) -> list[torch.nn.Module]:
    """The student's decoder layers that transformers checkpoints (GradientCheckpointingLayer), outermost only."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers: list[torch.nn.Module] = []
    inside: set[str] = set()
    for name, module in divergence.backbone(model).named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(name.startswith(f"{o}.") for o in inside):
            layers.append(module)
            inside.add(name)
    return layers


def fits(model) -> bool:
    """Whether `model` can be replayed: decoder layers transformers checkpoints, and no dropout anywhere (a layer
    recomputed in backward must compute what generation computed)."""
    config = model.config.get_text_config()
    dropouts = [getattr(config, name, 0.0) or 0.0 for name in ("attention_dropout", "hidden_dropout", "dropout")]
    random = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()) or any(p > 0 for p in dropouts)
    return bool(checkpointed_layers(model)) and not random


@dataclass
class Recording:
    """Each checkpointed layer's output over the sequence generated, [B, width, H], as generation computed it."""

    layers: list[torch.nn.Module]
    width: int
    outputs: list[torch.Tensor | None] = field(init=False)  # per layer, made at its first output
    filled: list[int] = field(init=False)  # per layer, the positions recorded so far
    broken: bool = False

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.layers)
        self.filled = [0] * len(self.layers)

    def record(self, index: int, output) -> None:
        if self.broken:
            return
        if not isinstance(output, torch.Tensor) or output.dim() != 3:
            self.broken = True  # a layer that returns a tuple: not replayed
            return
        buffer, start = self.outputs[index], self.filled[index]
        if buffer is None:
            with torch.inference_mode(False):  # kept for backward, which an inference tensor cannot be
                buffer = self.outputs[index] = output.new_empty(output.shape[0], self.width, output.shape[2])
        end = start + output.shape[1]
        if end > self.width or buffer.shape[::2] != output.shape[::2]:  # e.g. generation without a KV cache
            self.broken = True
            return
        buffer[:, start:end] = output
        self.filled[index] = end

    def covers(self, length: int) -> bool:
        """Whether every layer's output was recorded at exactly the first `length` positions."""
        return not self.broken and all(filled == length for filled in self.filled)


@contextmanager
def recording(model, prompt_width: int, max_new_tokens: int):
    """While entered, the output of each of `model`'s checkpointed layers at each forward (a generation's prefill
    and decoding steps) is written into a Recording of prompt_width + max_new_tokens - 1 positions."""
    layers = checkpointed_layers(model)
    taken = Recording(layers, prompt_width + max_new_tokens - 1)
    handles = [layer.register_forward_hook(lambda _m, _a, out, i=i: taken.record(i, out))
               for i, layer in enumerate(layers)]
    try:
        yield taken
    finally:
        for handle in handles:
            handle.remove()


class _Replayed(torch.autograd.Function):
    """A checkpointed layer that returns its recorded output; backward recomputes it from its input with gradient
    and back-propagates through it, as reentrant checkpointing does (the parameters' gradients accumulate there).
    `unread`: the recompute's MLP returns zeros instead of its output (`lean_activations.unread_mlp_outputs`), since
    only the path of the recomputed output's gradient is used, not its value."""

    @staticmethod
    def forward(ctx, run, recorded, unread, hidden, *rest):
        ctx.run, ctx.rest, ctx.unread = run, rest, unread
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(hidden)
        return recorded.view_as(recorded)

    @staticmethod
    def backward(ctx, grad):
        (hidden,) = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled), \
                (unread_mlp_outputs() if ctx.unread else nullcontext()):
            again = hidden.detach().requires_grad_(hidden.requires_grad)
            output = ctx.run(again, *ctx.rest)
        torch.autograd.backward(output, grad)
        return None, None, None, again.grad, *(None for _ in ctx.rest)


def _replay(original, recorded: torch.Tensor, unread: bool, run, *args):
    """The checkpoint function's call: the recorded output where the layer's hidden states came positionally, of
    the recorded shape, and nothing else it was given needs a gradient; else the original checkpoint."""
    hidden, rest = (args[0], args[1:]) if args else (None, ())
    if not isinstance(hidden, torch.Tensor) or hidden.shape[:2] != recorded.shape[:2] or any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in rest):
        return original(run, *args)
    return _Replayed.apply(run, recorded, unread, hidden, *rest)


@contextmanager
def replaying(taken: Recording, length: int, lean: bool = False):
    """While entered, each checkpointing layer's checkpoint function returns the layer's recorded output over the
    first `length` positions instead of running the layer (`_Replayed`); `lean`: backward's recompute of a layer
    whose MLP output only goes into its residual sum skips that output (`reads_no_mlp_output`)."""
    layers = [(layer, output) for layer, output in zip(taken.layers, taken.outputs, strict=True)
              if getattr(layer, "gradient_checkpointing", False)]
    saved = [vars(layer).get("_gradient_checkpointing_func") for layer, _ in layers]
    try:
        for (layer, output), before in zip(layers, saved, strict=True):
            original = before if before is not None else layer._gradient_checkpointing_func
            unread = lean and reads_no_mlp_output(layer)
            layer._gradient_checkpointing_func = partial(_replay, original, output[:, :length], unread)
        yield
    finally:
        for (layer, _), before in zip(layers, saved, strict=True):
            if before is None:
                vars(layer).pop("_gradient_checkpointing_func", None)
            else:
                layer._gradient_checkpointing_func = before


def completion_hidden(student, taken: Recording, inputs, prompt_mask: torch.Tensor, mask: torch.Tensor, *,
                      lean: bool = False) -> torch.Tensor:
    """[N, H] last hidden states at the positions where `mask` (B x L-1, next-token aligned) is set, as
    `divergence.completion_hidden` gives them, with every checkpointed layer replayed from `taken` (as that
    function when no layer checkpoints: the student's checkpointing is switched on when training starts); `lean`:
    as `replaying`'s."""
    if not any(getattr(layer, "gradient_checkpointing", False) for layer in taken.layers):
        return divergence.completion_hidden(student, inputs, mask)
    ids, attention = inputs["input_ids"][:, :-1], inputs["attention_mask"][:, :-1]
    length = ids.shape[1]
    generated = torch.ones(ids.shape[0], length - prompt_mask.shape[1], dtype=prompt_mask.dtype,
                           device=prompt_mask.device)
    positions = decoding_positions(torch.cat([prompt_mask, generated], dim=1))
    with replaying(taken, length, lean):
        out = divergence.backbone(student)(input_ids=ids, attention_mask=attention, position_ids=positions,
                                           use_cache=False)
    return out.last_hidden_state[mask]
