"""The speedups of AtlasGKDTrainer change the cost, not the result.

- the chunked divergence equals TRL's generalized_jsd_loss on identical logits (value and gradient, the hidden
  states' and the head's, with the gradient taken in forward whatever weight backward gives each position);
- the trainer's chunked loss equals its full-logits loss on tiny models;
- the top-k teacher cache: never above the exact divergence, exact when k covers the vocabulary, and
  for forward KL short by exactly tail mass x KL of the tails;
- KV-cache generation under gradient checkpointing gives the tokens no-cache generation gives (greedy);
- the bf16 sampling copy is used only where the CPU has native bf16, and bf16 autocast without it warns.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from test_gkd_trainer import batch, make_trainer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from atlas_distill.gkd import divergence, packed_linear
from atlas_distill.models import loading
from atlas_distill.gkd.trl_surface import GKDTrainer

V, H, N = 300, 24, 40


class Head(torch.nn.Module):
    """Just an lm_head, the part of a model the divergence functions read."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.lm_head.weight.data.copy_(weight)

    def get_output_embeddings(self):
        return self.lm_head


def heads(seed: int = 0, sharpness: float = 3.0):
    generator = torch.Generator().manual_seed(seed)
    student = Head(torch.randn(V, H, generator=generator) * sharpness / H ** 0.5)
    teacher = Head(torch.randn(V, H, generator=generator) * sharpness / H ** 0.5)
    hidden_s = torch.randn(N, H, generator=generator, requires_grad=True)
    hidden_t = torch.randn(N, H, generator=generator)
    return student, teacher, hidden_s, hidden_t


def trl_loss(hidden_s, hidden_t, student, teacher, beta, temperature):
    s_logits = (hidden_s @ student.lm_head.weight.t()).unsqueeze(0)
    t_logits = (hidden_t @ teacher.lm_head.weight.t()).unsqueeze(0)
    return GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=torch.zeros(1, N, dtype=torch.long), beta=beta,
                                           temperature=temperature)


@pytest.mark.parametrize("chunk", [256, 16])  # one chunk; three chunks, each recomputed in backward
@pytest.mark.parametrize("temperature", [1.0, 0.9])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_chunked_divergence_equals_trl_generalized_jsd(beta, temperature, chunk, monkeypatch):
    monkeypatch.setattr(divergence, "TOKEN_CHUNK", chunk)
    student, teacher, hidden_s, hidden_t = heads()
    expected = trl_loss(hidden_s, hidden_t, student, teacher, beta, temperature)
    expected_grad, expected_head = torch.autograd.grad(expected, [hidden_s, student.lm_head.weight])
    ours = divergence.chunked_divergence(hidden_s, hidden_t, student, teacher, vocab=V, beta=beta,
                                         temperature=temperature).mean()
    our_grad, our_head = torch.autograd.grad(ours, [hidden_s, student.lm_head.weight])
    assert expected.item() > 1e-3  # a real divergence, not two equal distributions
    assert abs(ours.item() - expected.item()) < 1e-5
    assert torch.allclose(our_grad, expected_grad, atol=1e-6)
    assert expected_head.abs().max() > 1e-3 and torch.allclose(our_head, expected_head, atol=1e-6)


class _LiveTiles(TorchDispatchMode):
    """The most [rows, V] tensors alive at once: each new one is counted until its last reference goes."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.live, self.most = vocab, 0, 0

    def _gone(self) -> None:
        self.live -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {leaf.untyped_storage().data_ptr() for leaf in tree_leaves((args, kwargs))
                  if isinstance(leaf, torch.Tensor)}
        if (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == self.vocab and out.shape[0] > 1
                and out.untyped_storage().data_ptr() not in inputs):
            self.live += 1
            self.most = max(self.most, self.live)
            weakref.finalize(out, self._gone)
        return out


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_chunk_of_the_fused_divergence_holds_at_most_four_tiles(beta, monkeypatch):
    """Each chunk's divergence and gradient work in place on its [chunk, V] tiles: at most four exist at once (the
    student's and teacher's log-probs and two more), where the formulas written out held seven; the same values."""
    monkeypatch.setattr(divergence, "TOKEN_CHUNK", 16)
    student, teacher, hidden_s, hidden_t = heads()
    expected = reference_divergence(hidden_s, hidden_t, student, teacher, vocab=V, beta=beta, temperature=0.9)
    expected_grad = torch.autograd.grad(expected.sum(), hidden_s)[0]
    with _LiveTiles(V) as tiles:
        ours = divergence.chunked_divergence(hidden_s, hidden_t, student, teacher, vocab=V, beta=beta,
                                             temperature=0.9)
    assert 2 <= tiles.most <= 4
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), hidden_s)[0], expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_in_place_divergence_and_gradient_are_bit_for_bit_the_written_out_formulas(beta):
    """divergence_and_gradient overwrites its two tiles step by step; the same operations in the same order as the
    formulas in its docstring, so the same bits."""
    generator = torch.Generator().manual_seed(7)
    s = torch.log_softmax(torch.randn(8, V, generator=generator) * 3, dim=-1)
    t = torch.log_softmax(torch.randn(8, V, generator=generator) * 3, dim=-1)
    temperature, p_s, p_t = 0.9, s.exp(), t.exp()
    if beta == 0:
        expected = (p_t * (t - s)).sum(-1), (p_s - p_t) / temperature
    elif beta == 1:
        kl = (p_s * (s - t)).sum(-1)
        expected = kl, p_s * (s - t - kl.unsqueeze(-1)) / temperature
    else:
        mixture = torch.logaddexp(s + math.log(1 - beta), t + math.log(beta))
        kl_s, kl_t = (p_s * (s - mixture)).sum(-1), (p_t * (t - mixture)).sum(-1)
        expected = (beta * kl_t + (1 - beta) * kl_s,
                    p_s * (s - mixture - kl_s.unsqueeze(-1)) * ((1 - beta) / temperature))
    ours = divergence.divergence_and_gradient(s.clone(), t.clone(), beta, temperature)
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])
    assert torch.equal(divergence.generalized_jsd(s, t, beta), ours[0])  # the value without a gradient, too


def reference_divergence(hidden_s, hidden_t, student, teacher, *, vocab, beta, temperature):
    """Per-position generalized JSD through both heads' full logits, differentiated by autograd."""
    def log_probs(hidden, head):
        return torch.log_softmax(head(hidden)[:, :vocab] / temperature, dim=-1)

    with torch.no_grad():
        teacher_log_probs = log_probs(hidden_t, teacher.lm_head)
    return divergence.generalized_jsd(log_probs(hidden_s, student.lm_head), teacher_log_probs, beta)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_divergence_gradient_with_a_weight_per_position_a_bias_and_a_shared_vocabulary(beta, monkeypatch):
    """Backward reuses forward's gradients when every position has the same weight (a sum or mean); with a weight
    per position it recomputes them with each weight. Either way: autograd's gradients on the full logits."""
    monkeypatch.setattr(divergence, "TOKEN_CHUNK", 16)
    generator = torch.Generator().manual_seed(3)
    student, teacher, hidden_s, hidden_t = heads()
    for head in (student, teacher):
        head.lm_head.bias = torch.nn.Parameter(torch.randn(V, generator=generator))
    shared, weights = V - 37, torch.rand(N, generator=generator)
    parameters = [hidden_s, student.lm_head.weight, student.lm_head.bias]
    for loss in (lambda per_position: per_position.sum() * 0.3, lambda per_position: (per_position * weights).sum()):
        expected = torch.autograd.grad(loss(reference_divergence(hidden_s, hidden_t, student, teacher, vocab=shared,
                                                                 beta=beta, temperature=0.9)), parameters)
        ours = torch.autograd.grad(loss(divergence.chunked_divergence(hidden_s, hidden_t, student, teacher,
                                                                      vocab=shared, beta=beta, temperature=0.9)),
                                   parameters)
        for mine, theirs in zip(ours, expected, strict=True):
            assert theirs.abs().max() > 1e-3 and torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5)
        assert not ours[1][shared:].any() and not ours[2][shared:].any()  # the shared vocabulary only
    kept = divergence.chunked_divergence(hidden_s, hidden_t, student, teacher, vocab=shared, beta=beta,
                                         temperature=0.9).sum()
    first = torch.autograd.grad(kept, parameters, retain_graph=True)
    again = torch.autograd.grad(kept, parameters)  # a retained graph's second backward: the same gradients
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(first, again, strict=True))
    monkeypatch.setattr(divergence, "divergence_and_gradient", None)  # without a gradient, not called
    with torch.no_grad():  # the same values
        plain = divergence.chunked_divergence(hidden_s, hidden_t, student, teacher, vocab=shared, beta=beta,
                                              temperature=0.9)
    assert torch.allclose(plain, reference_divergence(hidden_s, hidden_t, student, teacher, vocab=shared, beta=beta,
                                                      temperature=0.9), atol=1e-6)


def test_chunked_divergence_over_a_shared_prefix_of_the_vocabulary():
    student, teacher, hidden_s, hidden_t = heads()
    shared = V - 37  # a teacher with padded rows: only the first `shared` tokens are compared
    s_logits = (hidden_s @ student.lm_head.weight[:shared].t()).unsqueeze(0)
    t_logits = (hidden_t @ teacher.lm_head.weight[:shared].t()).unsqueeze(0)
    expected = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=torch.zeros(1, N, dtype=torch.long), beta=0.5)
    ours = divergence.chunked_divergence(hidden_s, hidden_t, student, teacher, vocab=shared, beta=0.5,
                                         temperature=1.0).mean()
    assert abs(ours.item() - expected.item()) < 1e-5


def folded_and_exact(k, beta, temperature=1.0, seed=0):
    student, teacher, hidden_s, hidden_t = heads(seed)
    exact = divergence.chunked_divergence(hidden_s, hidden_t, student, teacher, vocab=V, beta=beta,
                                          temperature=temperature)
    indices, values, tail = divergence.teacher_topk(hidden_t, teacher, vocab=V, k=k, temperature=temperature)
    folded = divergence.topk_divergence(hidden_s, student, vocab=V, beta=beta, temperature=temperature,
                                        indices=indices, teacher_values=values, teacher_tail=tail)
    return folded, exact, (hidden_s, hidden_t, student, teacher, indices, tail)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_topk_cache_never_exceeds_the_exact_divergence_and_is_exact_at_full_k(beta):
    errors = []
    for k in (4, 16, 64, 256):
        folded, exact, _ = folded_and_exact(k, beta, temperature=0.9)
        assert torch.all(folded <= exact + 1e-5), f"k={k}: folded above exact"
        errors.append((exact - folded).mean().item())
    assert errors == sorted(errors, reverse=True), f"error should shrink as k grows: {errors}"
    folded, exact, _ = folded_and_exact(V, beta)
    assert torch.allclose(folded, exact, atol=1e-5)


def test_topk_cache_forward_kl_error_is_the_tail_term():
    """KL(t||s) - KL(t_folded||s_folded) = T_tail * KL(t restricted to the tail || s restricted to the tail)."""
    folded, exact, (hidden_s, hidden_t, student, teacher, indices, tail) = folded_and_exact(16, beta=0.0)
    log_s = torch.log_softmax(hidden_s @ student.lm_head.weight.t(), dim=-1)
    log_t = torch.log_softmax(hidden_t @ teacher.lm_head.weight.t(), dim=-1)
    in_tail = torch.ones_like(log_t, dtype=torch.bool).scatter(-1, indices.long(), False)
    t_tail = torch.where(in_tail, log_t - tail.unsqueeze(-1), float("-inf"))  # teacher, renormalized on the tail
    s_tail = torch.where(in_tail, log_s - torch.logsumexp(log_s.masked_fill(~in_tail, float("-inf")), -1,
                                                          keepdim=True), float("-inf"))
    kl_tails = torch.where(in_tail, t_tail.exp() * (t_tail - s_tail), 0.0).sum(-1)
    assert torch.allclose(exact - folded, tail.exp() * kl_tails, atol=1e-5)


def reference_folded(hidden_s, student, indices, values, tail, *, vocab, beta, temperature):
    """The folded divergence through the student's full logits, differentiated by autograd."""
    log_probs = torch.log_softmax(student.lm_head(hidden_s)[:, :vocab] / temperature, dim=-1)
    return folded_from_log_probs(log_probs, indices.long(), values, tail, beta)


def folded_from_log_probs(log_probs, indices, values, tail, beta):
    """The student's log-probs folded onto the teacher's top k + tail, as written out, and the divergence."""
    rest = torch.logsumexp(log_probs.scatter(-1, indices, float("-inf")), dim=-1)
    folded = torch.cat([log_probs.gather(-1, indices), rest.clamp_min(divergence.TAIL_FLOOR).unsqueeze(-1)], -1)
    return divergence.generalized_jsd(folded, torch.cat([values, tail.unsqueeze(-1)], -1), beta)


@pytest.mark.parametrize("k", [16, V])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_divergence_takes_autograds_gradient_in_its_forward_pass(beta, k, monkeypatch):
    """The folded divergence's gradient is taken in forward, per chunk (as the exact one's): the same values and
    autograd's gradients on the full logits, with a weight per position, a shared vocabulary, the tail empty (k = V),
    and a teacher whose stored k + 1 probabilities do not sum to 1 (the teacher store's 8-bit records)."""
    monkeypatch.setattr(divergence, "TOKEN_CHUNK", 16)
    student, teacher, hidden_s, hidden_t = heads()
    shared = V - 13
    indices, values, tail = divergence.teacher_topk(hidden_t, teacher, vocab=shared, k=min(k, shared), temperature=0.9)
    values = values + 0.01  # off by a little, as rounded records are
    weights = torch.rand(N, generator=torch.Generator().manual_seed(5))
    parameters = [hidden_s, student.lm_head.weight]
    for loss in (lambda per_position: per_position.sum() * 0.3, lambda per_position: (per_position * weights).sum()):
        expected_values = reference_folded(hidden_s, student, indices, values, tail, vocab=shared, beta=beta,
                                           temperature=0.9)
        expected = torch.autograd.grad(loss(expected_values), parameters)
        ours_values = divergence.topk_divergence(hidden_s, student, vocab=shared, beta=beta, temperature=0.9,
                                                 indices=indices, teacher_values=values, teacher_tail=tail)
        ours = torch.autograd.grad(loss(ours_values), parameters)
        torch.testing.assert_close(ours_values, expected_values, rtol=1e-6, atol=1e-6)
        for mine, theirs in zip(ours, expected, strict=True):
            assert theirs.abs().max() > 1e-4
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
        assert not ours[1][shared:].any()
    with torch.inference_mode():  # evaluation, and train_bench's --topk-error: the values, no gradient work
        plain = divergence.topk_divergence(hidden_s, student, vocab=shared, beta=beta, temperature=0.9,
                                           indices=indices, teacher_values=values, teacher_tail=tail)
    torch.testing.assert_close(plain, expected_values.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_a_floored_tail_passes_no_gradient_as_clamps_does(beta):
    """Where the student leaves the tail (all but the teacher's top k) less than e^-10000 of its mass, the folded tail
    is floored and, as through clamp_min, no gradient flows through it, while the teacher's tail still has mass."""
    indices = torch.tensor([[3, 7], [1, 2]])
    logits = torch.zeros(2, V).scatter(-1, indices, 3e4).requires_grad_()  # the rest 30,000 below: floored
    values, tail = torch.log(torch.tensor([[0.6, 0.3], [0.5, 0.4]])), torch.log(torch.tensor([0.1, 0.1]))
    log_probs = torch.log_softmax(logits / 0.9, dim=-1)
    expected = folded_from_log_probs(log_probs, indices, values, tail, beta)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    per_position, grad = divergence._folded_chunk(indices, values, tail, beta, 0.9, slice(0, 2), log_probs.detach(),
                                                  True)
    torch.testing.assert_close(per_position, expected.detach())
    assert expected_grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trainer_chunked_loss_equals_full_logits_loss(tmp_path, make_tiny_model, beta):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(layers=3, seed=2)
    trainer = make_trainer(tmp_path, student, teacher, args={"beta": beta, "temperature": 0.9},
                           teacher_cache_topk=0)
    assert trainer.chunked_loss
    inputs = batch(trainer)
    chunked = trainer.compute_loss(trainer.model, inputs)
    chunked_grads = torch.autograd.grad(chunked, list(trainer.model.parameters()))
    full = trainer._logits_loss(trainer.model, inputs)
    full_grads = torch.autograd.grad(full, list(trainer.model.parameters()))
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    for a, b in zip(chunked_grads, full_grads):
        assert b.abs().max() > 0  # every parameter gets a gradient
        # relative to each tensor's own scale: some whole gradients are below 1e-5
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_trainer_second_epoch_reads_the_teacher_cache(tmp_path, make_tiny_model):
    """lmbda 0, 8 examples, batch 2: steps 5-8 are the second epoch, all served from the cache."""
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, teacher_cache_topk=64, group_by_length=False,
                           args={"lmbda": 0.0, "max_steps": 8})
    calls = []
    decoder = trainer.teacher_model.model  # the chunked loss runs the teacher's decoder, not its lm_head
    forward = decoder.forward
    decoder.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    trainer.train()
    assert (trainer.teacher_cache.misses, trainer.teacher_cache.hits) == (4, 4)
    assert len(trainer.teacher_cache.entries) == 8
    assert len(calls) == 4  # the teacher ran for the first epoch only
    inputs = batch(trainer)
    mask = inputs["labels"][:, 1:] != -100
    cached = trainer.teacher_cache.lookup(trainer.teacher_cache.keys(inputs, mask), "cpu")
    assert cached is not None and cached[0].shape == (int(mask.sum()), 64)


def test_kv_cache_generation_matches_no_cache_generation(tmp_path, make_tiny_model):
    student, teacher = make_tiny_model(layers=3, seed=1), make_tiny_model(seed=2)
    outputs = {}
    for kv in (True, False):
        trainer = make_trainer(tmp_path, student, teacher, kv_cache_generation=kv, generation_dtype="float32",
                               args={"gradient_checkpointing": True, "max_new_tokens": 12})
        assert trainer.generation_config.use_cache is kv
        trainer.generation_config.do_sample = False  # greedy, so the two must agree token for token
        trainer.model.train()
        trainer.model.gradient_checkpointing_enable()  # as Trainer.train does before the first step
        inputs = batch(trainer)
        trainer._generate_into(trainer.model, inputs)
        outputs[kv] = inputs["input_ids"]
        assert trainer.model.is_gradient_checkpointing  # switched back on after generating
    assert outputs[True].shape[1] > batch(trainer)["prompts"].shape[1]
    assert torch.equal(outputs[True], outputs[False])


def test_bf16_sampling_copy_follows_the_student_after_each_step(tmp_path, make_tiny_model):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, generation_dtype="bfloat16",
                           args={"lmbda": 1.0, "max_steps": 2, "learning_rate": 1e-2})
    assert trainer.generation_dtype == torch.bfloat16
    trainer.train()
    copy = trainer._sampler
    assert copy is not None and copy is not trainer.model and copy.dtype == torch.bfloat16
    # between generations the copy holds no weights (they are not part of the loss, backward or optimizer step)
    assert all(weight.untyped_storage().size() == 0 for weight in copy.parameters() if not weight.is_meta)
    inputs = batch(trainer)
    student_calls, sampled_with = [], []
    hook = trainer.model.model.register_forward_hook(lambda *_: student_calls.append(1))
    generate = trainer.generate_on_policy_outputs

    def recording(model, *args):
        sampled_with.append({name: _weight_in_use(model, name, weight) for name, weight in model.named_parameters()})
        return generate(model, *args)

    trainer.generate_on_policy_outputs = recording
    trainer._generate_into(trainer.model, inputs)  # a later step refreshes the copy from the trained student
    hook.remove()
    assert student_calls == []  # the copy samples with its own weights (not through a patched student forward)
    for name, source in trainer.model.named_parameters():
        assert torch.equal(sampled_with[0][name], source.detach().to(torch.bfloat16)), name
    assert all(weight.untyped_storage().size() == 0 for weight in copy.parameters() if not weight.is_meta)
    assert inputs["input_ids"].shape[1] > batch(trainer)["prompts"].shape[1]


def _weight_in_use(model, name: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight `model` computes with: its own, or for a layer that holds only a packed one (packed_linear), the
    packed product of the identity (the packed weight's values, transposed; bf16 x bf16 sums one product each)."""
    if not weight.is_meta:
        return weight.detach().clone()
    layer = model.get_submodule(name.rsplit(".", 1)[0])
    with torch.no_grad():
        bias = layer(torch.zeros(1, layer.in_features, dtype=torch.bfloat16))
        return (layer(torch.eye(layer.in_features, dtype=torch.bfloat16)) - bias).t().contiguous()


def cpuinfo_variant(remove: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> str:
    """The /proc/cpuinfo of a 2-core AMD EPYC (Zen 4: AVX512 with AVX512-BF16) recorded on a build machine, or
    that text with flags removed or added, which is what an AVX2-only or AVX512-without-bf16 CPU (both seen on
    these machines) and a Sapphire Rapids one with AMX show."""
    text = (Path(__file__).parent / "data/cpuinfo-amd-epyc-zen4.txt").read_text()
    lines = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if key.strip() == "flags":
            kept = [flag for flag in value.split() if not any(flag.startswith(prefix) for prefix in remove)]
            line = f"{key}{sep} {' '.join(kept + list(add))}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_native_bf16_is_read_from_the_flags_of_real_cpuinfo_texts():
    recorded = cpuinfo_variant()
    assert recorded.count("processor\t:") == 2 and "avx512_bf16" in recorded
    assert loading.native_bf16(recorded)  # Zen 4
    assert not loading.native_bf16(cpuinfo_variant(remove=("avx512",)))  # AVX2 only
    assert not loading.native_bf16(cpuinfo_variant(remove=("avx512_bf16",)))  # AVX512F, no bf16
    assert loading.native_bf16(cpuinfo_variant(remove=("avx512_bf16",),
                                                      add=("amx_bf16", "amx_tile", "amx_int8")))  # AMX
    # only the flags count: a word elsewhere in the text does not
    assert not loading.native_bf16(cpuinfo_variant(remove=("avx512_bf16",)).replace(
        "model name\t: AMD EPYC", "model name\t: AMD EPYC avx512_bf16"))
    assert not loading.native_bf16("")


@pytest.mark.parametrize("cuda, cuda_native, native, expected", [
    (False, False, False, False),  # AVX2 only
    (False, False, True, False),  # native bf16 (AVX512-BF16 or AMX): fp32 too, where bf16 learned worse
    (True, True, False, True),  # a GPU with native bf16 decides, whatever the CPU
    (True, False, True, False)])  # a T4 / V100: emulated bf16, even on a host with native bf16
def test_auto_trains_under_bf16_autocast_on_a_native_bf16_gpu_only(monkeypatch, cuda, cuda_native, native, expected):
    from atlas_distill.gkd.config import mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_native)
    monkeypatch.setattr(loading, "cpu_bf16", lambda: native)
    assert loading.autocast_bf16() is expected
    assert mixed_precision("auto") == (expected, False)
    assert mixed_precision("float32") == (False, False)
    assert mixed_precision("bfloat16") == (True, False)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_generation_dtype_auto_makes_no_sampling_copy_on_a_cpu(tmp_path, make_tiny_model, monkeypatch, fast_bf16):
    """On a CPU, with or without native bf16, `auto` lets the student sample itself, in the arithmetic it trains in
    (a bf16 copy's samples learned worse, benchmarks/README.md); `bfloat16` still makes the copy."""
    monkeypatch.setattr(loading, "cpu_bf16", lambda: fast_bf16)
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, args={"gradient_checkpointing": False})
    assert trainer.generation_dtype is None and trainer.prefills_once
    # under checkpointing its training forward is replayed from generation, also under bf16 autocast
    for bf16 in (False, True):
        replayed = make_trainer(tmp_path, student, teacher, args={"gradient_checkpointing": True, "bf16": bf16})
        assert replayed.generation_dtype is None and replayed.replays_generation
        assert replayed.packs_student_generation is (not bf16 and packed_linear.available(torch.float32))
    copied = make_trainer(tmp_path, student, teacher, generation_dtype="bfloat16",
                          args={"gradient_checkpointing": True})
    assert copied.generation_dtype == torch.bfloat16 and not copied.replays_generation


def test_bf16_autocast_on_a_cpu_without_fast_bf16_warns_and_names_the_fix(tmp_path, make_tiny_model, monkeypatch):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    monkeypatch.setattr(loading, "cpu_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"7x slower.*GKDConfig\(bf16=False\); with `atlas-distill train`"):
        make_trainer(tmp_path, student, teacher, args={"bf16": True})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*bf16 autocast.*")
        make_trainer(tmp_path, student, teacher, args={"bf16": False})
        monkeypatch.setattr(loading, "cpu_bf16", lambda: True)
        make_trainer(tmp_path, student, teacher, args={"bf16": True})


def test_every_speedup_can_be_switched_off(tmp_path, make_tiny_model):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, kv_cache_generation=False, chunked_loss=False,
                           teacher_cache_topk=0, group_by_length=False, generation_dtype="float32",
                           args={"gradient_checkpointing": True})
    assert trainer.generation_config.use_cache is False and trainer.generation_dtype is None
    assert not trainer.chunked_loss and trainer.teacher_cache is None
    assert trainer.args.train_sampling_strategy == "random"
    on = make_trainer(tmp_path, student, teacher)
    assert on.args.train_sampling_strategy == "group_by_length" and "length" in on.train_dataset.column_names


def test_teacher_cache_stops_storing_at_its_memory_budget():
    from atlas_distill.gkd import topk_format
    from atlas_distill.gkd.teacher_cache import TeacherCache

    topk = (torch.arange(100, dtype=torch.int32).reshape(25, 4), torch.zeros(25, 4), torch.zeros(25))
    one = len(topk_format.encode(topk[0][:5], topk[1][:5], topk[2][:5], vocab=100))
    cache = TeacherCache(k=4, vocab=100, max_bytes=3 * one + one // 2)  # room for three and a half rows
    cache.store([bytes([i]) for i in range(5)], [5] * 5, topk)
    assert len(cache.entries) == 3 and cache.bytes <= cache.max_bytes


def _head_inputs(model) -> list[torch.Tensor]:
    """Every input the model's lm_head receives from now on (a hook registered after the trainer's)."""
    seen: list[torch.Tensor] = []
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    return seen


def test_generation_hands_the_lm_head_a_contiguous_input(tmp_path, make_tiny_model):
    from transformers import AutoModelForCausalLM

    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, generation_dtype="bfloat16")
    inputs = batch(trainer)
    prompts = {"input_ids": inputs["prompts"], "attention_mask": inputs["prompt_attention_mask"]}
    # without the hook, generation's first forward gives the head a [B, 1, H] view of the whole sequence
    plain = AutoModelForCausalLM.from_pretrained(student)
    unhooked = _head_inputs(plain)
    plain.generate(**prompts, max_new_tokens=2, do_sample=False)
    assert not unhooked[0].is_contiguous() and unhooked[0].shape[:2] == (2, 1)
    for model in (trainer.model, trainer.teacher_model, trainer._sampling_copy()):  # the copy keeps the hook
        seen = _head_inputs(model)
        model.generate(**prompts, max_new_tokens=2, do_sample=False)
        assert seen and all(each.is_contiguous() for each in seen)
        logits = model(**prompts).logits[:, -1:]  # and the projection is unchanged
        # (to rounding: a [B, L, H] and a [B, 1, H] matmul may block differently, as on a Zen 4 CPU)
        torch.testing.assert_close(logits, model(**prompts, logits_to_keep=1).logits)


def _flash_enabled_in(model, calls: list[bool]):
    return model.get_input_embeddings().register_forward_hook(
        lambda *_: calls.append(torch.backends.cuda.flash_sdp_enabled()))


@pytest.mark.parametrize("bf16, switch", [(True, True), (False, True), (True, False)])
def test_a_cpu_bf16_step_trains_the_student_with_the_math_attention_kernel(tmp_path, make_tiny_model, bf16, switch):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-native-bf16 warning, on CPUs without it
        trainer = make_trainer(tmp_path, student, teacher, args={"bf16": bf16, "lmbda": 0.0}, math_attention=switch)
    student_calls, teacher_calls = [], []
    hooks = [_flash_enabled_in(trainer.model, student_calls), _flash_enabled_in(trainer.teacher_model, teacher_calls)]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # as Trainer.train sets it
    trainer.training_step(trainer.model, batch(trainer))
    for hook in hooks:
        hook.remove()
    # CPU flash attention's bf16 backward is slow: the student's forward (and so its backward) is math's there
    assert student_calls == [not (bf16 and switch)] and teacher_calls == [True]
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the step


def test_the_chunked_divergence_under_autocast_trains_the_fp32_head(monkeypatch):
    student, teacher, hidden_s, hidden_t = heads()
    shared = V - 37
    exact = divergence.chunked_divergence(hidden_s, hidden_t, student, teacher, vocab=shared, beta=0.5,
                                          temperature=0.9)
    monkeypatch.setattr(divergence, "TOKEN_CHUNK", 16)  # three chunks, each recomputed in backward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = divergence.chunked_divergence(hidden_s, hidden_t, student, teacher, vocab=shared, beta=0.5,
                                              temperature=0.9)
    exact_grad = torch.autograd.grad(exact.sum(), student.lm_head.weight)[0]
    mixed.sum().backward()
    weight = student.lm_head.weight
    assert weight.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert weight.grad[:shared].abs().sum() > 0 and not weight.grad[shared:].any()  # the shared vocabulary only
    assert torch.allclose(mixed, exact, rtol=0.05, atol=0.02)  # bf16 logits: close, not equal
    assert torch.nn.functional.cosine_similarity(weight.grad.flatten(), exact_grad.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("autocast", [False, True])
def test_a_bf16_teachers_logits_are_computed_in_fp32_not_rounded_to_bf16(autocast):
    student, teacher, hidden_s, _ = heads()
    teacher.to(torch.bfloat16)
    hidden_t = (torch.randn(N, H, generator=torch.Generator().manual_seed(5)) * 4).bfloat16()  # a bf16 teacher's
    weight = teacher.lm_head.weight.float()
    fp32_logits = (hidden_t.float() @ weight.t()) / 0.9
    expected = torch.log_softmax(fp32_logits, dim=-1)
    bf16_rounded = torch.log_softmax((hidden_t @ teacher.lm_head.weight.t()).float() / 0.9, dim=-1)
    assert (expected - bf16_rounded).abs().max() > 1e-3  # the rounding this avoids is there to see
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        indices, values, _tail = divergence.teacher_topk(hidden_t, teacher, vocab=V, k=5, temperature=0.9)
        ours = divergence.chunked_divergence(hidden_s, hidden_t, student, teacher, vocab=V, beta=0.5,
                                             temperature=0.9)
        exact = divergence.chunked_divergence(hidden_s, hidden_t.float(), student, Head(weight), vocab=V, beta=0.5,
                                              temperature=0.9)
    assert torch.allclose(values, expected.gather(-1, indices.long()), atol=1e-5)
    assert torch.allclose(ours, exact, atol=1e-6)


def test_on_policy_sampling_draws_by_inverse_cdf_on_a_cpu(tmp_path, make_tiny_model, monkeypatch):
    from atlas_distill.gkd import sampling

    trainer = make_trainer(tmp_path, make_tiny_model(seed=1), make_tiny_model(seed=2), generation_dtype="float32")
    draws = []
    original = sampling.inverse_cdf_draw
    monkeypatch.setattr(sampling, "inverse_cdf_draw", lambda probs, generator=None: draws.append(probs.shape)
                        or original(probs, generator))
    inputs = batch(trainer)
    trainer._generate_into(trainer.model, inputs)
    new = inputs["input_ids"].shape[1] - inputs["prompts"].shape[1]
    assert new > 0 and len(draws) == new  # one draw per generated position, each over the whole batch
    assert all(shape[0] == 2 for shape in draws)
    off = make_trainer(tmp_path, make_tiny_model(seed=1), make_tiny_model(seed=2), generation_dtype="float32",
                       inverse_cdf_sampling=False)
    draws.clear()
    off._generate_into(off.model, batch(off))
    assert draws == []  # switched off: torch.multinomial draws


MALLOC_PROBE = """
import ctypes, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
from test_gkd_trainer import make_trainer

class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo
make_trainer(Path({tmp!r}), Path({student!r}), Path({teacher!r}), keep_freed_memory={keep})
mapped = libc.mallinfo2().hblkhd
block = torch.empty(64 << 20, dtype=torch.uint8)  # above glibc's default mmap threshold (32 MB at most)
print((libc.mallinfo2().hblkhd - mapped) >> 20)
"""


@pytest.mark.parametrize("keep", [True, False])
def test_keep_freed_memory_serves_a_large_block_from_the_heap_not_a_fresh_mapping(tmp_path, make_tiny_model, keep):
    """The setting is process-wide, so each case runs in its own process: with it, a 64 MB block comes from malloc's
    heap (where a freed one is reused, its pages already there); without it, from a new mapping (mallinfo2's
    hblkhd) whose pages are faulted in again each time."""
    import subprocess
    import sys

    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    probe = MALLOC_PROBE.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), student=str(student),
                                teacher=str(teacher), keep=keep)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    mapped_mb = int(done.stdout.split()[-1])
    assert mapped_mb == 0 if keep else mapped_mb >= 64


def test_malloc_thresholds_cover_twice_the_largest_parameter_within_mallopts_int():
    from atlas_distill.gkd.allocator import INT_MAX, MMAP_THRESHOLD, thresholds

    assert thresholds(0) == (MMAP_THRESHOLD, 4 * MMAP_THRESHOLD)
    assert thresholds(300 << 20) == (600 << 20, INT_MAX)  # 4 x 600 MB is above what an int holds
    assert thresholds(49152 * 576 * 4)[0] > 2 * 49152 * 576 * 4 - 1  # the builtin's [V, H] fp32 gradient, twice
    assert thresholds(10 << 30) == (INT_MAX, INT_MAX)


class _NewTensors(TorchDispatchMode):
    """The shapes of the tensors ops allocate (not views or in-place results, which share an input's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {leaf.untyped_storage().data_ptr() for leaf in tree_leaves((args, kwargs))
                  if isinstance(leaf, torch.Tensor)}
        if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs:  # not a view
            self.shapes.append((func._schema.name, tuple(out.shape)))
        return out


def _two_backward_passes(trainer, inputs, shared: bool):
    """Gradients after two forward + backward passes of the chunked loss (gradient accumulation), and the tensors
    backward created."""
    from contextlib import nullcontext

    from atlas_distill.gkd import tied_gradient

    model = trainer.model
    model.zero_grad(set_to_none=True)
    created = _NewTensors()
    with tied_gradient.shared_gradient(model) if shared else nullcontext():
        for _ in range(2):
            loss = trainer.compute_loss(model, inputs)
            with created:
                loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, created.shapes


def test_a_tied_embedding_adds_its_gradient_into_the_heads_buffer_with_the_same_result(tmp_path, make_tiny_model):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, teacher_cache_topk=0)
    model = trainer.model
    embedding = model.get_input_embeddings()
    assert embedding.weight is model.get_output_embeddings().weight and embedding.padding_idx is not None
    inputs = batch(trainer)
    assert (inputs["input_ids"] == embedding.padding_idx).any()  # the padding row must get no gradient
    expected, default_created = _two_backward_passes(trainer, inputs, shared=False)
    ours, shared_created = _two_backward_passes(trainer, inputs, shared=True)
    vocab_by_hidden = tuple(embedding.weight.shape)
    assert ("aten::embedding_dense_backward", vocab_by_hidden) in default_created
    assert [name for name, shape in shared_created if shape == vocab_by_hidden] == []  # no second [V, H] tensor
    assert expected.keys() == ours.keys()
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert expected["model.embed_tokens.weight"][embedding.padding_idx].abs().max() > 0  # the head's part
    assert embedding._forward_hooks == {}  # the block leaves the model as it was


def test_a_training_step_gives_the_tied_weight_one_gradient_buffer(tmp_path, make_tiny_model):
    from atlas_distill.gkd import tied_gradient

    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, teacher_cache_topk=0, args={"lmbda": 0.0})
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1  # as Trainer.train sets it
    created = _NewTensors()
    with created:
        trainer.training_step(model, batch(trainer))
    vocab_by_hidden = tuple(model.get_input_embeddings().weight.shape)
    assert ("aten::embedding_dense_backward", vocab_by_hidden) not in created.shapes
    assert model.get_input_embeddings().weight.grad.abs().max() > 0
    assert tied_gradient._LINKS == {}


def test_a_head_gradient_offered_in_one_backward_pass_is_taken_only_later_in_the_same_pass():
    from atlas_distill.gkd import tied_gradient

    link, buffer, taken = tied_gradient._Link(), torch.zeros(2), []

    class Offer(torch.autograd.Function):
        forward = staticmethod(lambda ctx, x: x.clone())

        @staticmethod
        def backward(ctx, grad):
            link.offer(buffer)
            return grad

    class Take(torch.autograd.Function):
        forward = staticmethod(lambda ctx, x: x.clone())

        @staticmethod
        def backward(ctx, grad):
            taken.append(link.take())
            return grad

    x = torch.ones(1, requires_grad=True)
    Take.apply(Offer.apply(x)).sum().backward()  # taken before anything was offered
    Offer.apply(Take.apply(x)).sum().backward()  # offered, then taken, in one pass
    Take.apply(x).sum().backward()  # a later pass: that buffer may be a .grad by now
    assert taken[0] is None and taken[1] is buffer and taken[2] is None


def test_packed_generation_gives_the_copys_own_logits_and_is_dropped_after_each_generation(tmp_path,
                                                                                          make_tiny_model):
    from atlas_distill.gkd import packed_linear

    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, generation_dtype="bfloat16", args={"lmbda": 1.0})
    assert trainer.packs_generation == packed_linear.available()
    if not packed_linear.available():  # this CPU's oneDNN has no bf16 (AVX2): the copy's own forward samples
        assert make_trainer(tmp_path, student, teacher, generation_dtype="bfloat16").packs_generation is False
        return
    inputs, seen = batch(trainer), {}
    generate = trainer.generate_on_policy_outputs
    plain = copy.deepcopy(trainer.model).to(torch.bfloat16)  # the student in bf16, on PyTorch's own linear
    vars(plain).pop("forward", None)  # SFTTrainer's forward patch on the instance would run the fp32 student

    def recording(model, *args):
        linears = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
        seen["packed"] = all("forward" in vars(m) for m in linears.values()) and len(linears) > 0
        # a layer of its own holds no plain bf16 weight (only its packed one); the tied lm_head keeps the embedding's
        seen["plain"] = {name for name, m in linears.items() if not m.weight.is_meta}
        with torch.no_grad():
            ids = inputs["prompts"]
            seen["packed_logits"] = model(input_ids=ids).logits.float()
            seen["plain_logits"] = plain(input_ids=ids).logits.float()
        return generate(model, *args)

    trainer.generate_on_policy_outputs = recording
    trainer._generate_into(trainer.model, inputs)
    assert seen["packed"] and seen["plain"] == {"lm_head"}
    torch.testing.assert_close(seen["packed_logits"], seen["plain_logits"], rtol=1e-2, atol=1e-2)
    assert not any("forward" in vars(m) for m in trainer._sampler.modules())  # unpacked, then freed
    assert all(weight.untyped_storage().size() == 0 for weight in trainer._sampler.parameters() if not weight.is_meta)
    with pytest.raises(ValueError, match="no weight of its own"):  # nothing to pack a meta weight from
        packed_linear.pack(trainer._sampler, 2)
    off = make_trainer(tmp_path, student, teacher, generation_dtype="bfloat16", packed_generation=False)
    assert off.packs_generation is False


def test_fp32_student_decodes_on_packed_weights_and_gets_its_own_layers_back(tmp_path, make_tiny_model, monkeypatch):
    """Without a sampling copy the fp32 student's own linear layers decode on packed fp32 weights: every decoding
    step's product goes through the packed op, except the output head's (its plain weight, no packed copy), the
    prompt's forward through the plain weight (bit for bit), the samples are the plain student's, and afterwards each
    layer has its own forward again, a layer that already had one (a hook's, a patch's) having kept it throughout."""
    import functools
    import platform

    from atlas_distill.gkd import packed_linear

    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    # each linear layer packed on its own (lean_decoding packs a layer's projections together: its own test)
    trainer = make_trainer(tmp_path, student, teacher, generation_dtype="float32", lean_decoding=False,
                           args={"lmbda": 1.0})
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert trainer.packs_student_generation is x86 and packed_linear.available(torch.float32) is x86
    if not x86:  # measured on x86 only: elsewhere the student decodes on its own forward
        return
    model = trainer.model
    linears = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    patched = linears.pop("model.layers.0.mlp.down_proj")
    own_forward = patched.forward = functools.partial(torch.nn.Linear.forward, patched)
    packed_calls, seen = [], {}
    packed_product = packed_linear._packed_linear
    monkeypatch.setattr(packed_linear, "_packed_linear",
                        lambda *args: packed_calls.append(args[-1].shape) or packed_product(*args))
    generate = trainer.generate_on_policy_outputs

    def recording(sampler, inputs, config):
        seen["packed"] = {name for name, m in linears.items() if "forward" in vars(m)}
        seen["patched"] = vars(patched).get("forward") is own_forward
        layer = linears["model.layers.0.self_attn.q_proj"]
        few, many = torch.randn(2, 1, layer.in_features), torch.randn(2, 7, layer.in_features)
        head = linears["lm_head"]
        with torch.no_grad():
            seen["few"] = (layer(few), torch.nn.functional.linear(few, layer.weight))
            seen["many"] = (layer(many), torch.nn.functional.linear(many, layer.weight))
            seen["head"] = (head(few), torch.nn.functional.linear(few, head.weight))
        seen["head_forward"] = vars(head)["forward"].func  # its plain weight, not a packed copy
        packed_calls.clear()
        return generate(sampler, inputs, config)

    trainer.generate_on_policy_outputs = recording
    inputs = batch(trainer)
    torch.manual_seed(7)
    trainer._generate_into(trainer.model, dict(inputs))
    assert seen["packed"] == set(linears) and seen["patched"]
    torch.testing.assert_close(*seen["few"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(*seen["head"], rtol=1e-5, atol=1e-5)
    assert seen["head_forward"] is packed_linear._decoding_head
    assert torch.equal(*seen["many"])  # the prompt's rows: the plain weight
    # every layer but the head in each of the 3 decoding steps after the prompt's
    assert len(packed_calls) == 3 * (len(linears) - 1)
    assert all(shape[:-1].numel() <= 2 for shape in packed_calls)  # one row per sequence
    assert not any("forward" in vars(m) for m in linears.values()) and vars(patched)["forward"] is own_forward

    packed_ids, plain_ids = dict(inputs), dict(inputs)
    torch.manual_seed(7)
    trainer.generate_on_policy_outputs = generate
    trainer._generate_into(trainer.model, packed_ids)
    off = make_trainer(tmp_path, student, teacher, generation_dtype="float32", packed_generation=False,
                       args={"lmbda": 1.0})
    assert off.packs_student_generation is False
    torch.manual_seed(7)
    off._generate_into(off.model, plain_ids)
    assert torch.equal(packed_ids["input_ids"], plain_ids["input_ids"])  # the same samples
    lean = make_trainer(tmp_path, student, teacher, generation_dtype="float32",
                        args={"lmbda": 1.0, "gradient_checkpointing": False})
    lean_ids, layers = dict(inputs), []
    lean.generate_on_policy_outputs = lambda sampler, *args: (  # the model, or _FromCache's around it
        layers.extend(m for m in getattr(sampler, "model", sampler).modules()
                      if "forward" in vars(m) and hasattr(m, "self_attn"))
        or generate(sampler, *args))
    torch.manual_seed(7)
    lean._generate_into(lean.model, lean_ids)
    assert len(layers) == len(lean.model.model.layers)  # lean_decoding, on by default, decoded every layer
    assert torch.equal(lean_ids["input_ids"], plain_ids["input_ids"])
    # and in an on-policy step without checkpointing, which generates inside lean_activations (from the prompt's pass)
    layers.clear()
    assert lean.prefills_once and lean.args.lean_activations
    lean.current_gradient_accumulation_steps = 1  # as Trainer.train sets it
    lean.training_step(lean.model, batch(lean))
    assert len(layers) == len(lean.model.model.layers)


def test_decoding_head_is_the_plain_product_for_few_rows_and_many():
    from atlas_distill.gkd import packed_linear

    torch.manual_seed(0)
    weight, bias = torch.randn(300, 16), torch.randn(300)
    for shape in ((2, 16), (2, 1, 16), (2, 5, 16)):  # decoding steps (at most 2 rows), and a prompt's 10 rows
        hidden = torch.randn(shape)
        for b in (None, bias):
            ours = packed_linear._decoding_head(weight, b, 2, hidden)
            assert ours.shape == (*shape[:-1], 300) and ours.is_contiguous()
            torch.testing.assert_close(ours, torch.nn.functional.linear(hidden, weight, b), rtol=1e-5, atol=1e-5)


def _backbone_lengths(trainer) -> list[tuple[int, bool]]:
    """(sequence length, grad enabled) of every forward of the student's decoder stack, recorded from now on."""
    calls: list[tuple[int, bool]] = []
    trainer.model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["input_ids"].shape[1], torch.is_grad_enabled())),
        with_kwargs=True)
    return calls


def _one_step_each(trainers: dict, record_calls, *, checkpointing: bool = False) -> dict:
    """One training step of each trainer on the same batch and seed: name -> (loss, gradients, inputs, calls)."""
    steps = {}
    for name, trainer in trainers.items():
        inputs, calls = batch(trainer), record_calls(trainer)
        trainer.current_gradient_accumulation_steps = 1  # as Trainer.train sets it
        if checkpointing:  # as Trainer.train switches it on
            trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
        trainer.model.eval()  # as after an evaluation: the step's own forward must still train
        torch.manual_seed(11)
        loss = trainer.training_step(trainer.model, inputs)
        steps[name] = (loss.detach(), [p.grad.clone() for p in trainer.model.parameters()], inputs, calls)
        assert trainer.model.training
    return steps


def _assert_same_samples_loss_and_gradients(ours: tuple, full: tuple) -> None:
    assert torch.equal(ours[2]["input_ids"], full[2]["input_ids"])  # the samples generate draws itself
    torch.testing.assert_close(ours[0], full[0], rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(ours[1], full[1], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_prefill_once_runs_the_prompt_once_and_gives_the_full_forwards_loss_and_gradients(tmp_path, make_tiny_model):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    args = {"lmbda": 1.0, "max_new_tokens": 5, "gradient_checkpointing": False}
    on = make_trainer(tmp_path, student, teacher, generation_dtype="float32", args=args)
    off = make_trainer(tmp_path, student, teacher, generation_dtype="float32", prefill_once=False, args=args)
    assert on.prefills_once and not off.prefills_once
    steps = _one_step_each({"on": on, "off": off}, _backbone_lengths)
    assert on._prompt_pass is None and off._prompt_pass is None
    inputs, calls = steps["on"][2], steps["on"][3]
    prompt, length = inputs["prompts"].shape[1], inputs["input_ids"].shape[1]
    assert length == prompt + 5
    # the prompt once, with gradient; generate runs the last prompt token and 4 more, then the completion's forward
    assert calls == [(prompt, True)] + [(1, False)] * 5 + [(length - 1 - prompt, True)]
    assert steps["off"][3] == [(prompt, False)] + [(1, False)] * 4 + [(length, True)]
    _assert_same_samples_loss_and_gradients(steps["on"], steps["off"])


def test_prefill_once_only_where_the_cache_can_be_kept(tmp_path, make_tiny_model):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    plain = {"gradient_checkpointing": False}
    assert make_trainer(tmp_path, student, teacher, args=plain).prefills_once
    assert not make_trainer(tmp_path, student, teacher, args={"gradient_checkpointing": True}).prefills_once
    assert not make_trainer(tmp_path, student, teacher, kv_cache_generation=False, args=plain).prefills_once
    assert not make_trainer(tmp_path, student, teacher, chunked_loss=False, args=plain).prefills_once
    # a bf16 sampling copy decodes from the prompt's cache cast to its dtype
    copy = make_trainer(tmp_path, student, teacher, generation_dtype="bfloat16", args={"lmbda": 1.0, **plain})
    assert copy.prefills_once
    inputs = batch(copy)
    copy.current_gradient_accumulation_steps = 1
    copy.training_step(copy.model, inputs)
    assert inputs["input_ids"].shape[1] == inputs["prompts"].shape[1] + 4
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in copy.model.parameters())


def _attention_calls(trainer) -> list[tuple[int, bool]]:
    """(positions, grad enabled) of every call of the student's first attention block from now on: generation's,
    the training forward's and the backward's recompute (which runs the layer's forward, not its hooks)."""
    calls: list[tuple[int, bool]] = []
    trainer.model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["hidden_states"].shape[1], torch.is_grad_enabled())),
        with_kwargs=True)
    return calls


def test_replay_generation_runs_no_layer_in_the_training_forward_and_gives_the_checkpointed_loss_and_gradients(
        tmp_path, make_tiny_model):
    student, teacher = make_tiny_model(seed=1, layers=3), make_tiny_model(seed=2)
    args = {"lmbda": 1.0, "max_new_tokens": 5, "gradient_checkpointing": True}
    on = make_trainer(tmp_path, student, teacher, generation_dtype="float32", args=args)
    off = make_trainer(tmp_path, student, teacher, generation_dtype="float32", replay_generation=False, args=args)
    assert on.replays_generation and not off.replays_generation
    steps = _one_step_each({"on": on, "off": off}, _attention_calls, checkpointing=True)
    assert on._recording is None
    inputs, calls = steps["on"][2], steps["on"][3]
    prompt, length = inputs["prompts"].shape[1], inputs["input_ids"].shape[1]
    assert length == prompt + 5
    generation = [(prompt, False)] + [(1, False)] * 4
    # replayed: the layer runs while generating and once in backward, over all but the last position
    assert calls == generation + [(length - 1, True)]
    assert steps["off"][3] == generation + [(length, True)] * 2  # checkpointed: forward, then backward's recompute
    _assert_same_samples_loss_and_gradients(steps["on"], steps["off"])


@pytest.mark.parametrize("arch,bf16", [("llama", False), ("qwen2", False), ("llama", True)])
def test_lean_recompute_skips_the_mlp_output_nothing_reads_with_the_same_gradients_bit_for_bit(
        tmp_path, make_tiny_model, monkeypatch, arch, bf16):
    from transformers import AutoModelForCausalLM

    from atlas_distill.gkd import lean_activations

    student, teacher = make_tiny_model(arch, seed=1, layers=2), make_tiny_model(seed=2)
    args = {"lmbda": 1.0, "max_new_tokens": 5, "gradient_checkpointing": True, "bf16": bf16}
    lean = make_trainer(tmp_path, student, teacher, generation_dtype="auto", args=args)
    full = make_trainer(tmp_path, student, teacher, generation_dtype="auto", lean_recompute=False, args=args)
    assert lean.replays_generation and full.replays_generation
    forward = lean_activations._GatedDown.forward
    calls: list[tuple] = []  # the running step's: (unread, every output zero)

    def recorded(ctx, gate, up, weight, unread=False):
        out = forward(ctx, gate, up, weight, unread)
        calls.append((unread, bool(out.eq(0).all())))
        return out

    def new_list(trainer):
        nonlocal calls
        calls = []
        return calls

    monkeypatch.setattr(lean_activations._GatedDown, "forward", staticmethod(recorded))
    steps = _one_step_each({"lean": lean, "full": full}, new_list, checkpointing=True)
    # the lean MLP runs only in backward's recompute (generation runs the module's own forward, the training
    # forward no layer): there, with lean_recompute, it returns zeros instead of down_proj's product
    assert steps["lean"][3] == [(True, True)] * 2 and steps["full"][3] == [(False, False)] * 2
    assert torch.equal(steps["lean"][2]["input_ids"], steps["full"][2]["input_ids"])
    assert torch.equal(steps["lean"][0], steps["full"][0])
    for mine, theirs in zip(steps["lean"][1], steps["full"][1], strict=True):
        assert torch.equal(mine, theirs)
    model = AutoModelForCausalLM.from_pretrained(student)
    assert all(lean_activations.reads_no_mlp_output(layer) for layer in model.model.layers)
    assert not lean_activations.reads_no_mlp_output(model.model.layers[0].mlp)


def test_replay_generation_only_where_generation_computes_the_training_forward(tmp_path, make_tiny_model):
    from transformers import AutoModelForCausalLM

    from atlas_distill.gkd import replay

    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    gc = {"gradient_checkpointing": True}
    assert make_trainer(tmp_path, student, teacher, generation_dtype="float32", args=gc).replays_generation
    assert not make_trainer(tmp_path, student, teacher, generation_dtype="float32",
                            args={"gradient_checkpointing": False}).replays_generation
    for setting in ({"kv_cache_generation": False}, {"chunked_loss": False}, {"replay_generation": False},
                    {"generation_dtype": "bfloat16"}):  # a bf16 sampling copy computes other outputs
        trainer = make_trainer(tmp_path, student, teacher, **{"generation_dtype": "float32", **setting}, args=gc)
        assert not trainer.replays_generation, setting
    # dropout: backward's recompute would not compute what generation did
    dropping = AutoModelForCausalLM.from_pretrained(student, attention_dropout=0.1)
    assert replay.fits(AutoModelForCausalLM.from_pretrained(student)) and not replay.fits(dropping)


def test_a_recording_that_does_not_cover_the_training_sequence_is_not_replayed():
    from atlas_distill.gkd.replay import Recording

    taken = Recording([torch.nn.Identity(), torch.nn.Identity()], width=4)
    for index in (0, 1):
        taken.record(index, torch.ones(2, 3, 5))
    assert taken.covers(3) and not taken.covers(4)
    taken.record(0, torch.ones(2, 2, 5))  # more positions than the generation can have made
    assert taken.broken and not taken.covers(3)
    tupled = Recording([torch.nn.Identity()], width=4)
    tupled.record(0, (torch.ones(2, 3, 5),))  # a layer that returns a tuple
    assert not tupled.covers(3)


def test_a_layer_called_otherwise_than_recorded_runs_its_own_checkpoint():
    from atlas_distill.gkd.replay import _replay

    calls = []
    original = lambda run, *args: calls.append(len(args)) or run(*args)  # noqa: E731
    recorded = torch.zeros(2, 3, 4)
    hidden = torch.ones(2, 3, 4, requires_grad=True)
    assert torch.equal(_replay(original, recorded, False, lambda: torch.ones(1)), torch.ones(1))  # hidden by keyword
    assert torch.equal(_replay(original, recorded, False, lambda x: x * 2, torch.ones(2, 5, 4)),
                       torch.full((2, 5, 4), 2.0))
    needs_grad = torch.ones(1, requires_grad=True)
    _replay(original, recorded, False, lambda x, y: x + y, hidden, needs_grad)  # another input that needs a gradient
    assert calls == [0, 1, 2]
    replayed = _replay(original, recorded, False, lambda x: x * 5, hidden)
    assert calls == [0, 1, 2] and torch.equal(replayed, recorded)  # the recording, not the layer
    replayed.sum().backward()  # backward runs the layer: d(5x)/dx
    assert torch.equal(hidden.grad, torch.full((2, 3, 4), 5.0))


@pytest.mark.parametrize("fast_bf16", [True, False])
@pytest.mark.parametrize("settings", [
    {}, {"gradient_checkpointing": False}, {"replay_generation": False}, {"generation_dtype": "float32"},
    {"generation_dtype": "bfloat16"}, {"gradient_checkpointing": False, "packed_generation": False},
    {"gradient_checkpointing": False, "prefill_once": False}, {"gradient_checkpointing": False, "lmbda": 0.0},
    {"bf16": True}, {"bf16": True, "gradient_checkpointing": False}, {"bf16": True, "generation_dtype": "bfloat16"},
], ids=lambda settings: ",".join(f"{k}={v}" for k, v in settings.items()) or "defaults")
def test_the_memory_plan_follows_the_trainers_generation_rules(tmp_path, make_tiny_model, monkeypatch, fast_bf16,
                                                               settings):
    """plan.py mirrors the trainer's choices for on-policy generation (a sampling copy, packed decoding weights,
    the prompt's pass before generation, the replayed forward): the same settings give the same choices."""
    from atlas_distill import plan
    from atlas_distill.config import load_profile

    monkeypatch.setattr(loading, "cpu_bf16", lambda: fast_bf16)
    monkeypatch.setattr(plan, "_cpu_bf16", lambda: fast_bf16)
    chosen = {"gradient_checkpointing": True, "lmbda": 1.0, "generation_dtype": "auto", "packed_generation": True,
              "prefill_once": True, "replay_generation": True, **settings}
    args = {name: chosen.pop(name) for name in ("gradient_checkpointing", "lmbda", "bf16") if name in chosen}
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, args=args, **chosen)
    profile = load_profile("default", [
        "teacher_model_name_or_path=smollm2-135m", "model.model_name_or_path=smollm2-135m",
        f"model.dtype={'bfloat16' if args.get('bf16') else 'float32'}",
        f"model.gradient_checkpointing={str(args['gradient_checkpointing']).lower()}", f"trainer.lmbda={args['lmbda']}",
        *(f"trainer.{name}={str(value).lower()}" for name, value in chosen.items())])
    work = plan.workload_for(profile, "cpu")
    samples = args["lmbda"] > 0  # the trainer's properties say what it does when the student samples
    assert work.sampling_copy == (samples and trainer.generation_dtype is not None)
    assert work.packed_decoding == (samples and trainer.packs_student_generation)
    assert work.prefill_once == (samples and trainer.prefills_once)
    assert work.replay_generation == (samples and trainer.replays_generation)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_decoding_samples_what_the_layers_own_forward_samples(make_tiny_model, arch):
    """gkd/lean_decoding.py: the fp32 student's decoding steps through the lean layer forward give the samples and
    logits of transformers' own layers on the same packed weights, from left-padded prompts; the prompt's forward
    still runs the layer's own (its projections are called then and only then), and `restore` takes it all away."""
    from transformers import AutoModelForCausalLM

    from atlas_distill.gkd import lean_decoding

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(arch=arch, layers=3), attn_implementation="sdpa",
                                                 dtype=torch.float32).eval()
    ids = torch.tensor([[0, 0, 0, 11, 12, 13], [21, 22, 23, 24, 25, 26]])
    prompts = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    q_proj = model.model.layers[1].self_attn.q_proj
    runs = {}
    for lean in (False, True):
        calls = []
        packed = (lean_decoding if lean else packed_linear).pack_for_decoding(model, 2)
        hook = q_proj.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
        try:
            if lean:
                assert set(packed) >= set(model.model.layers) and "forward" not in vars(q_proj)
            torch.manual_seed(5)
            out = model.generate(**prompts, do_sample=True, temperature=0.9, max_new_tokens=7, min_new_tokens=7,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        finally:
            hook.remove()
            packed_linear.restore(packed)
        runs[lean] = (out.sequences, torch.stack(out.logits), calls)
    assert torch.equal(runs[True][0], runs[False][0])
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-5, atol=1e-5)
    assert runs[False][2] == [6] + [1] * 6 and runs[True][2] == [6]  # the lean forward ran every decoding step
    assert not any("forward" in vars(module) for module in model.modules())

    from atlas_distill.gkd.lean_activations import lean_activations

    with lean_activations(model, norms=True) as changed:  # where an on-policy step without checkpointing generates
        assert changed == 10 and all(lean_decoding.fits(layer) for layer in model.model.layers)
    hooked = model.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    assert not lean_decoding.fits(model.model.layers[0]) and lean_decoding.fits(model.model.layers[1])
    hooked.remove()
    model.model.layers[2].mlp.forward = lambda hidden: hidden  # a forward of its own (accelerate's hooks set one)
    assert not lean_decoding.fits(model.model.layers[2]) and lean_decoding.fits(model.model.layers[1])
    del model.model.layers[2].mlp.forward
    eager = AutoModelForCausalLM.from_pretrained(make_tiny_model(arch=arch, layers=3), attn_implementation="eager",
                                                 dtype=torch.float32)
    assert lean_decoding.pack(eager, 2) == []  # another attention kernel: transformers' own layers decode
