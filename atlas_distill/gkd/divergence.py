"""The generalized JSD without full logits: from hidden states, and from a teacher's cached top-k.

`chunked_divergence` projects only the completion positions' hidden states through both models'
`lm_head`, TOKEN_CHUNK positions at a time, and takes the divergence chunk by chunk, so no B x L x V
logits tensor exists and the prompt positions are never projected. When a gradient is wanted, each chunk's
gradient (the hidden states' and the head's) is taken in the forward pass while its tiles exist, the head's
summed into one buffer: nothing is recomputed in backward, which only scales what forward kept. Each chunk works
in place on its [TOKEN_CHUNK, V] tiles (at most four at once). For 128 positions x 49,152 tokens on a Zen 4 CPU
the loss's forward + backward took 272 ms in fp32 against 596 ms for the same chunks checkpointed and
recomputed in backward (the way before) and 528 ms for TRL's ChunkedDivergenceFunction
(trl/kernels/chunked_divergence.py, vocabulary tiles, its torch path without Triton); 141 / 219 / 582 ms
under bf16 autocast (benchmarks/loss_bench.py, benchmarks/README.md).

`teacher_topk` and `topk_divergence` are the off-policy cache (and the teacher store's reader): the teacher's
distribution at a position is kept as its k most likely tokens plus one tail bucket holding the rest of the
mass, and the student's distribution is folded onto the same k + 1 outcomes. The divergence of the folded pair
never exceeds the exact one (data processing inequality), equals it when k covers the vocabulary, and for
forward KL falls short by exactly tail_mass x KL(teacher tail || student tail); tests check all three. Its
gradient is taken in forward too (`_folded_chunk`): at 200 positions against a top 512, 353 ms in fp32 and
190 under bf16 autocast, against 683 / 343 ms for the chunks checkpointed (`loss_bench.py --topk 512`).
"""

from __future__ import annotations

import functools
import math

import torch

from . import tied_gradient

# Positions projected at once: a [TOKEN_CHUNK, V] fp32 tile is 12.6 MB at V = 49,152, and a chunk's gradient
# holds a few of them at a time. Smaller than a batch's completion (4 x 32 positions in train_bench.py).
TOKEN_CHUNK = 64
VOCAB_TILE = 8192  # rows of a bf16 head cast to fp32 at once for an fp32 product (`_upcast_product`): 19 MB
TAIL_FLOOR = -1e4  # log-probability standing for "no mass": exp() is 0 in fp32 and 0 * TAIL_FLOOR is 0, not NaN

# Config attributes that rescale logits after lm_head; a model using one takes the full-logits path.
_LOGIT_TRANSFORMS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling",
                     "final_logit_softcapping")


def plain_head(model) -> bool:
    """Whether the model's logits are exactly lm_head(hidden), which the chunked paths assume."""
    config = model.config.get_text_config()
    return all(getattr(config, name, None) is None for name in _LOGIT_TRANSFORMS)


def backbone(model):
    """The decoder stack without lm_head (PEFT's wrapper unwrapped; its adapters stay active inside)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


def completion_hidden(model, inputs, mask: torch.Tensor) -> torch.Tensor:
    """[N, H] last hidden states at the positions where `mask` (B x L-1, next-token aligned) is set."""
    out = backbone(model)(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
    return out.last_hidden_state[:, :-1][mask]


def _head(model, vocab: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lm_head's weight and bias over the first `vocab` tokens, as the model holds them: the teacher's, whose logits
    are computed in fp32 under autocast too (`_teacher_log_probs`; a bf16 head is cast in tiles there)."""
    head = model.get_output_embeddings()
    bias = head.bias[:vocab] if getattr(head, "bias", None) is not None else None
    return head.weight[:vocab], bias


def generalized_jsd(student_log_probs, teacher_log_probs, beta: float) -> torch.Tensor:
    """Per-position generalized JSD of normalized log-probs [..., V] -> [...]; TRL's formula (beta 0 is
    KL(teacher || student), 1 is KL(student || teacher), the mixture is (1 - beta) student + beta teacher)."""
    s, t = student_log_probs, teacher_log_probs
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    mixture = torch.logaddexp(s + math.log(1 - beta), t + math.log(beta))
    return beta * (t.exp() * (t - mixture)).sum(-1) + (1 - beta) * (s.exp() * (s - mixture)).sum(-1)


def chunked_divergence(student_hidden, teacher_hidden, student, teacher, *, vocab: int, beta: float,
                       temperature: float) -> torch.Tensor:
    """Per-position generalized JSD [N] over the first `vocab` tokens, TOKEN_CHUNK positions at a time.

    Where a gradient is wanted, each chunk's gradient is taken in the forward pass, while its tiles exist
    (`_FusedDivergence`): the student's head gradient is summed into one buffer, no tile is recomputed in
    backward, and backward only scales what forward kept."""
    t_weight, t_bias = _head(teacher, vocab)
    return _fused(student_hidden, student, vocab, temperature,
                  functools.partial(_exact_chunk, teacher_hidden, t_weight, t_bias, beta, temperature))


def _fused(student_hidden, student, vocab: int, temperature: float, chunk_loss) -> torch.Tensor:
    """Per-position divergence [N] of `chunk_loss` over the student's head, each chunk's gradient taken in forward
    (`_FusedDivergence`) where one is wanted."""
    head = student.get_output_embeddings()
    device = student_hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    args = (student_hidden, head.weight, getattr(head, "bias", None), vocab, dtype, temperature, chunk_loss)
    if torch.is_grad_enabled() and (student_hidden.requires_grad or head.weight.requires_grad):
        return _FusedDivergence.apply(*args)
    return _fused_pass(*args, (False, False, False), None)[0]


def _exact_chunk(teacher_hidden, t_weight, t_bias, beta: float, temperature: float, rows: slice,
                 student: torch.Tensor, gradient: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's divergence from the teacher's full distribution, and (`gradient`) its gradient w.r.t. the
    student's logits."""
    teacher = _teacher_log_probs(teacher_hidden[rows], t_weight, t_bias, temperature)
    if not gradient:
        return generalized_jsd(student, teacher, beta), None
    return divergence_and_gradient(student, teacher, beta, temperature)


def divergence_and_gradient(student: torch.Tensor, teacher: torch.Tensor, beta: float,
                            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position generalized JSD [c] of log-probs [c, V] (as `generalized_jsd`) and its gradient with respect to
    the student's logits before the temperature: for the mixture m = (1 - beta) p_s + beta p_t it is
    (1 - beta) p_s (log p_s - log m - KL(p_s || m)) / T, at beta 0 (p_s - p_t) / T, at beta 1
    p_s (log p_s - log p_t - KL(p_s || p_t)) / T.

    Both tiles are the caller's scratch and are overwritten: every step works in place, so at most four [c, V]
    tiles exist at once (the two given included) where the same formulas written out held seven. The values are
    the same operations in the same order, so the results are bit for bit those of the formulas above."""
    s, t = student, teacher
    if beta == 0:
        p_t = t.exp()
        kl = torch.sub(t, s, out=t).mul_(p_t).sum(-1)  # sum p_t (t - s)
        return kl, s.exp_().sub_(p_t).div_(temperature)
    if beta == 1:
        d = torch.sub(s, t, out=t)  # log p_s - log p_t
        p_s = s.exp_()
        kl_s = (p_s * d).sum(-1)
        return kl_s, d.sub_(kl_s.unsqueeze(-1)).mul_(p_s).div_(temperature)
    mixture = s + math.log(1 - beta)
    scratch = t + math.log(beta)
    torch.logaddexp(mixture, scratch, out=mixture)
    kl_t = torch.sub(t, mixture, out=scratch).mul_(t.exp_()).sum(-1)  # sum p_t (t - m); t now holds p_t
    d = torch.sub(s, mixture, out=mixture)  # log p_s - log m
    p_s = s.exp_()
    kl_s = torch.mul(p_s, d, out=scratch).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s, d.sub_(kl_s.unsqueeze(-1)).mul_(p_s).mul_((1 - beta) / temperature)


class _FusedDivergence(torch.autograd.Function):
    """A chunked divergence (`chunked_divergence`'s or `topk_divergence`'s) with each chunk's gradient taken in
    forward, while its [TOKEN_CHUNK, V] tiles exist.

    Checkpointed chunks (the way before) recomputed both models' tiles in backward, and autograd gave each
    chunk's head gradient its own [V, H] tensor before summing them (and another for the vocabulary slice, and
    another for autocast's cast): those were the step's peak memory. Here the head gradient is one fp32
    [V, H] buffer that each chunk adds into. Backward scales the kept gradients by the loss's weight per
    position when it is the same for all (a sum or mean, as the trainer's loss); otherwise it recomputes the
    chunks with each position's weight."""

    @staticmethod
    def forward(ctx, student_hidden, weight, bias, vocab: int, dtype: torch.dtype, temperature: float, chunk_loss):
        ctx.args = (student_hidden, weight, bias, vocab, dtype, temperature, chunk_loss)
        ctx.wants = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        per_position, ctx.grads = _fused_pass(*ctx.args, ctx.wants, None)
        return per_position

    @staticmethod
    def backward(ctx, grad_output):
        kept, ctx.grads = ctx.grads, None  # a second backward (retain_graph) recomputes
        if kept is not None and torch.equal(grad_output, grad_output[:1].expand_as(grad_output)):
            grads, scale = kept, grad_output[:1]
        else:
            grads, scale = _fused_pass(*ctx.args, ctx.wants, grad_output)[1], None
        if scale is not None and scale.numel():
            for grad in grads:
                if grad is not None:
                    grad.mul_(scale.to(grad.dtype))
        grad_hidden, grad_weight, grad_bias = grads
        tied_gradient.offer(ctx.args[1], grad_weight)  # a tied input embedding adds its rows into it
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _fused_pass(student_hidden, weight, bias, vocab, dtype, temperature, chunk_loss, wants, row_weight):
    """Per-position divergence [N] and the gradients `wants` asks for (hidden, head weight, head bias), each
    position's gradient weighted by `row_weight` [N] (None: 1). `chunk_loss(rows, student_log_probs, gradient)`
    gives a chunk's per-position divergence and, when `gradient`, its gradient w.r.t. the student's logits (it may
    overwrite the log-probs)."""
    want_hidden, want_weight, want_bias = wants
    with torch.no_grad(), torch.autocast(student_hidden.device.type, enabled=False):
        s_weight = weight[:vocab].to(dtype)
        s_bias = bias[:vocab].to(dtype) if bias is not None else None
        grad_hidden = torch.empty_like(student_hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        grad_bias = torch.zeros_like(bias) if want_bias else None
        parts = []
        for start in range(0, student_hidden.shape[0], TOKEN_CHUNK):
            rows = slice(start, start + TOKEN_CHUNK)
            hidden = student_hidden[rows].to(dtype)
            # the tile is handed over, not kept here: it is freed as soon as chunk_loss is done with it
            per_position, grad = chunk_loss(rows, _log_probs(hidden, s_weight, s_bias, temperature), any(wants))
            parts.append(per_position)
            if grad is None:
                continue
            if row_weight is not None:
                grad.mul_(row_weight[rows].unsqueeze(-1))
            low = grad.to(dtype)  # the tile itself in fp32; under autocast its copy in the autocast dtype
            if want_hidden:
                grad_hidden[rows] = low @ s_weight
            if want_weight and low.dtype == grad_weight.dtype:
                grad_weight[:vocab].addmm_(low.t(), hidden)  # in place: no [V, H] temporary
            elif want_weight and grad.device.type == "cpu":
                # an fp32 head under autocast: in place from the fp32 tile (PyTorch has no CPU matmul of bf16 inputs
                # into an fp32 output), 19 against 58 ms a chunk for the product and sum below, and no bf16 rounding
                grad_weight[:vocab].addmm_(grad.to(grad_weight.dtype).t(), hidden.to(grad_weight.dtype))
            elif want_weight:
                grad_weight[:vocab] += low.t() @ hidden
            if want_bias:
                grad_bias[:vocab] += (grad if grad.dtype == grad_bias.dtype else low).sum(0)
            del grad, low  # before the next chunk's tiles
        return _joined(parts, student_hidden), (grad_hidden, grad_weight, grad_bias)


def _joined(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts) if parts else like.new_zeros(0, dtype=torch.float32)


def _log_probs(hidden, weight, bias, temperature: float) -> torch.Tensor:
    """log_softmax(lm_head(hidden) / T) in fp32; the logits tile is scaled in place (a matmul keeps its inputs for
    backward, not its output), so two [c, V] tiles exist here, not three."""
    if hidden.dtype == torch.float32 and weight.dtype != torch.float32:
        logits = _upcast_product(hidden, weight)
    else:
        logits = hidden.to(weight.dtype) @ weight.t()
    if bias is not None:
        logits += bias
    return torch.log_softmax(logits.float().div_(temperature), dim=-1)


def _teacher_log_probs(hidden, weight, bias, temperature: float) -> torch.Tensor:
    """The teacher's log-probs at `hidden`, from logits computed in fp32 whatever the teacher's dtype or autocast (a
    bf16 teacher's hidden states widened, its bf16 head cast in tiles by `_upcast_product`), where a bf16 product
    rounded each logit to bf16 (a spacing of 0.125 at 16-32). Over 490 held-out answer positions that rounding was
    a third of the bf16 teacher's divergence from the fp32 one: a generalized JSD of 2.5e-4 per position against
    3.6e-4 with bf16 logits (benchmarks/README.md)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _log_probs(hidden.float(), weight, bias, temperature)


def _upcast_product(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.t() in fp32 for a lower-precision weight (a teacher whose bf16 weights compute in fp32,
    models/upcast.py), VOCAB_TILE rows of the weight cast at a time: the whole [V, H] head cast at once was a
    113 MB fp32 copy (the builtin's) at the loss, where a step's memory peaks without gradient checkpointing."""
    logits = hidden.new_empty(hidden.shape[0], weight.shape[0])
    for start in range(0, weight.shape[0], VOCAB_TILE):
        rows = slice(start, start + VOCAB_TILE)
        logits[:, rows] = hidden @ weight[rows].float().t()
    return logits


def _tail(log_probs: torch.Tensor, top_indices: torch.Tensor, floored: bool = True) -> torch.Tensor:
    """log of the mass outside `top_indices`, exactly (logsumexp over the rest), floored at TAIL_FLOOR unless
    `floored` is False."""
    tail = torch.logsumexp(log_probs.scatter(-1, top_indices, float("-inf")), dim=-1)
    return tail.clamp_min(TAIL_FLOOR) if floored else tail


@torch.no_grad()
def teacher_topk(teacher_hidden, teacher, *, vocab: int, k: int, temperature: float):
    """The teacher's k most likely tokens per position: (indices int32 [N, k], log-probs [N, k], tail [N])."""
    weight, bias = _head(teacher, vocab)
    k = min(k, vocab)
    indices, values, tails = [], [], []
    for start in range(0, teacher_hidden.shape[0], TOKEN_CHUNK):
        log_probs = _teacher_log_probs(teacher_hidden[start:start + TOKEN_CHUNK], weight, bias, temperature)
        top = log_probs.topk(k, dim=-1)
        indices.append(top.indices.to(torch.int32))
        values.append(top.values)
        tails.append(_tail(log_probs, top.indices))
    return torch.cat(indices), torch.cat(values), torch.cat(tails)


def topk_divergence(student_hidden, student, *, vocab: int, beta: float, temperature: float, indices,
                    teacher_values, teacher_tail) -> torch.Tensor:
    """Per-position generalized JSD [N] between the student and a cached top-k teacher, over k + 1 outcomes.

    The student is projected TOKEN_CHUNK positions at a time and, as in `chunked_divergence`, each chunk's
    gradient is taken in the forward pass while its tile exists (`_folded_chunk`): nothing is recomputed in
    backward (the way before checkpointed each chunk and projected it again there).
    """
    return _fused(student_hidden, student, vocab, temperature,
                  functools.partial(_folded_chunk, indices.long(), teacher_values, teacher_tail, beta, temperature))


def _folded_chunk(indices, teacher_values, teacher_tail, beta: float, temperature: float, rows: slice,
                  student: torch.Tensor, gradient: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's divergence from the teacher's top-k over k + 1 outcomes (its k tokens and the tail), and its
    gradient w.r.t. the student's logits.

    With a the divergence's partials w.r.t. the folded log-probs (autograd on the [c, k + 1] pair, so exactly the
    formula's), a top-k token i's log-prob s_i moves with logit j as delta_ij - p_j, and the tail's log-mass
    log p_tail as [j in the tail] p_j / p_tail - p_j (not at all where it was floored at TAIL_FLOOR, as clamp's
    gradient). So the gradient at z = logits / T is a_i - p_i r at a top-k token and p_j / p_tail (a_tail - p_tail r)
    at any other, r being the sum of a over the outcomes the gradient reaches; divided by T for the logits.
    The gradient is made in place in the student's log-probs tile (the tail's logsumexp needs its own for a
    moment, before)."""
    index = indices[rows]
    top = student.gather(-1, index)
    tail = _tail(student, index, floored=False)  # log p_tail, exactly
    floored = tail.clamp_min(TAIL_FLOOR).unsqueeze(-1)
    teacher = torch.cat([teacher_values[rows], teacher_tail[rows].unsqueeze(-1)], dim=-1)
    folded = torch.cat([top, floored], dim=-1)
    if not gradient:
        return generalized_jsd(folded, teacher, beta), None
    with torch.enable_grad():  # (an autograd Function's forward runs without)
        folded.requires_grad_()
        per_position = generalized_jsd(folded, teacher, beta)
        (partials,) = torch.autograd.grad(per_position.sum(), folded)
    reached = (tail >= TAIL_FLOOR).to(partials.dtype)  # clamp_min passes the gradient where it did not clamp
    a_top, a_tail = partials[:, :-1], partials[:, -1] * reached
    r = a_top.sum(-1) + a_tail
    # p_j / p_tail = exp(s_j - log p_tail) <= 1 in the tail (0 where it was floored: a_tail is 0 there); the top-k
    # entries, clamped here first, are overwritten below
    grad = student.sub_(floored).clamp_max_(0).exp_().mul_((a_tail - tail.exp() * r).unsqueeze(-1))
    grad.scatter_(-1, index, a_top - top.exp() * r.unsqueeze(-1))
    return per_position.detach(), grad.div_(temperature)
