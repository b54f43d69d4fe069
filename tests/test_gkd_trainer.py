"""AtlasGKDTrainer on tiny random models: temperature in the loss, padded vocabularies, warmup schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas_distill.gkd import AtlasGKDTrainer, GKDConfig
from atlas_distill.gkd.settings import SETTINGS

from helpers import greedy_answers


def rows(n=8):
    return [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": str(2 * i)}],
             "reference": str(2 * i)} for i in range(n)]


def make_trainer(tmp_path, student_dir, teacher_dir, **overrides):
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    settings = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=2, report_to=[],
                    max_new_tokens=4, use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
                    max_length=128, seed=3, bf16=False)
    settings.update(overrides.pop("args", {}))
    settings.update({name: overrides.pop(name) for name in list(overrides) if name in SETTINGS})  # ours, in args
    eval_rows = overrides.pop("eval_rows", None) or rows(3)
    return AtlasGKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_dir),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir),
        args=GKDConfig(**settings), train_dataset=Dataset.from_list(rows()),
        eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tokenizer, **overrides)


def batch(trainer):
    return trainer.data_collator(list(trainer.train_dataset.select(range(2))))


def test_loss_matches_trl_at_temperature_one_and_temperature_matters(tmp_path, make_tiny_model):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, args={"temperature": 1.0})
    inputs = batch(trainer)
    ours = trainer.compute_loss(trainer.model, inputs)
    trl = super(AtlasGKDTrainer, trainer).compute_loss(trainer.model, inputs)  # TRL's own GKDTrainer
    assert torch.allclose(ours, trl, atol=1e-6)
    trainer.temperature = 2.0
    hot = trainer.compute_loss(trainer.model, inputs)
    assert abs(hot.item() - ours.item()) > 1e-4 * max(1.0, ours.item())


def test_same_tokenizer_with_padded_vocab_trains(tmp_path, make_tiny_model):
    """Teacher with 64 extra embedding rows (as Qwen2.5 7B vs 3B): TRL refuses, we compare the shared rows."""
    student, teacher = make_tiny_model("llama", seed=1), make_tiny_model("qwen2", extra_rows=64, seed=2)
    trainer = make_trainer(tmp_path, student, teacher, args={"lmbda": 0.0})
    assert trainer.shared_vocab == 49152
    assert trainer.teacher_model.config.vocab_size == 49152 + 64  # declared size restored after TRL's check
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_offpolicy_warmup_then_on_policy(tmp_path, make_tiny_model, monkeypatch):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, offpolicy_warmup_steps=2, offpolicy_warmup_beta=0.0,
                           args={"lmbda": 1.0, "beta": 0.7, "max_steps": 4})
    seen = []
    original = trainer.generate_on_policy_outputs

    def spy(model, inputs, config):
        seen.append(trainer.state.global_step)
        return original(model, inputs, config)

    monkeypatch.setattr(trainer, "generate_on_policy_outputs", spy)
    trainer.train()
    assert seen == [2, 3]  # steps 0 and 1 were off-policy, then every step on-policy (lmbda 1)


def reference_divergence(trainer, inputs, beta: float) -> float:
    """The loss a GKD step should use, written out from the definitions: forward KL(teacher || student) for
    beta 0, else the generalized JSD with mixture beta * teacher + (1 - beta) * student; both at the
    trainer's temperature, averaged over the completion tokens."""
    labels = inputs["labels"][:, 1:]
    mask = labels != -100
    with torch.no_grad():
        student, teacher = (model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                            for model in (trainer.model, trainer.teacher_model))
    s = torch.log_softmax(student[:, :-1].double() / trainer.temperature, dim=-1)[mask]
    t = torch.log_softmax(teacher[:, :-1].double() / trainer.temperature, dim=-1)[mask]
    if beta == 0:
        per_token = (t.exp() * (t - s)).sum(-1)
    else:
        m = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))
        per_token = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return per_token.mean().item()


def test_warmup_steps_use_forward_kl_and_later_steps_the_generalized_jsd(tmp_path, make_tiny_model):
    """The loss actually returned by a step, against the divergence computed independently on the same batch
    (on-policy steps: on the sequences the step generated)."""
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, offpolicy_warmup_steps=2, offpolicy_warmup_beta=0.0,
                           args={"lmbda": 1.0, "beta": 0.7, "temperature": 0.8})
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before its first step
    inputs = batch(trainer)
    forward_kl, jsd = reference_divergence(trainer, inputs, 0.0), reference_divergence(trainer, inputs, 0.7)
    assert abs(forward_kl - jsd) > 0.1 * jsd  # the two differ enough to tell apart
    # a new batch at each step: a batch seen before would take the teacher's cached top-k (a lower bound)
    for step, rows_ in ((0, range(0, 2)), (1, range(2, 4))):
        trainer.state.global_step = step
        fresh = trainer.data_collator(list(trainer.train_dataset.select(rows_)))
        warm = dict(fresh)
        loss = trainer.training_step(trainer.model, warm).item()
        assert torch.equal(warm["input_ids"], fresh["input_ids"])  # off-policy: the dataset's own batch
        assert loss == pytest.approx(reference_divergence(trainer, fresh, 0.0), rel=1e-4)
    trainer.state.global_step = 2
    on_policy = dict(inputs)
    loss = trainer.training_step(trainer.model, on_policy).item()
    assert not torch.equal(on_policy["labels"], inputs["labels"])  # the student's own completions
    assert loss == pytest.approx(reference_divergence(trainer, on_policy, 0.7), rel=1e-4)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_an_on_policy_steps_loss_in_training_is_the_mean_over_its_generated_tokens(tmp_path, make_tiny_model,
                                                                                  monkeypatch, accumulation):
    """Through train(), which hands the step the dataset batch's target-token count (num_items_in_batch): an
    on-policy step's loss is the mean divergence over the completions it generated (4 tokens a row here, against
    answers of 1-2 tokens), averaged over the accumulated batches, as TRL's trainers normalise."""
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, args={
        "lmbda": 1.0, "beta": 0.5, "learning_rate": 0.0, "gradient_accumulation_steps": accumulation})
    counts, generated = [], []
    original_step, original_loss = trainer.training_step, trainer.compute_loss

    def step(model, inputs, num_items_in_batch=None):
        counts.append(num_items_in_batch)
        return original_step(model, inputs, num_items_in_batch)

    def loss(model, inputs, *args, **kwargs):
        generated.append({key: inputs[key].clone() for key in ("input_ids", "attention_mask", "labels")})
        return original_loss(model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer, "training_step", step)
    monkeypatch.setattr(trainer, "compute_loss", loss)
    trainer.train()
    assert len(generated) == 2 * accumulation and all(count is not None for count in counts)
    tokens = [int((inputs["labels"][:, 1:] != -100).sum()) for inputs in generated]
    windows = [sum(tokens[i:i + accumulation]) for i in range(0, len(tokens), accumulation)]
    assert all(n > count for n, count in zip(windows, counts[::accumulation]))  # more than the dataset's targets
    means = [reference_divergence(trainer, inputs, 0.5) for inputs in generated]  # lr 0: the weights as trained on
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    expected = [sum(means[i:i + accumulation]) / accumulation for i in range(0, len(means), accumulation)]
    assert logged == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("checkpointing, prefill_once", [(False, True), (False, False), (True, True)])
def test_an_on_policy_step_on_distillation_trainers_completions_has_its_loss_and_gradient(
        tmp_path, make_tiny_model, monkeypatch, checkpointing, prefill_once):
    """Against TRL's stable DistillationTrainer, with the draw held fixed: ours' whole on-policy training step (with
    the prompt's pass or without, checkpointed or not, every speed-up) on the completions DistillationTrainer sampled
    gives its loss and the student's gradient, within fp32 rounding (benchmarks/gradient_check.py measures the same
    on the builtin)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gradient_check
    from train_bench import _distillation_trainer

    student, teacher = make_tiny_model(seed=1), make_tiny_model(layers=3, seed=2)
    ours = make_trainer(tmp_path, student, teacher, prefill_once=prefill_once, args={
        "lmbda": 1.0, "beta": 0.5, "temperature": 0.9, "max_new_tokens": 6, "gradient_checkpointing": checkpointing})
    assert ours.prefills_once is (prefill_once and not checkpointing)
    dt = _distillation_trainer({"model": AutoModelForCausalLM.from_pretrained(student),
                                "teacher_model": ours.teacher_model, "train_dataset": ours.train_dataset,
                                "processing_class": ours.processing_class, "callbacks": []},
                               str(tmp_path / "dt"), 1, False, 3, False, batch=2, max_new_tokens=6)
    indices = [1, 6]
    sample = gradient_check.dt_sample(dt, [ours.train_dataset[i]["messages"] for i in indices], seed=3)
    assert int(sample["completion_mask"].sum()) > 2  # something was generated, and it is what both learn from
    theirs = gradient_check.dt_step(dt, sample)
    mine = gradient_check.ours_step(ours, indices, sample)
    assert mine == pytest.approx(theirs, rel=1e-5)
    norm, cosine, difference = gradient_check.compare(gradient_check.gradient(ours), gradient_check.gradient(dt))
    assert norm > 0 and cosine > 0.99999 and difference < 1e-3


def test_sampling_fidelity_feeds_each_sampler_as_generation_does(make_tiny_model, monkeypatch):
    """benchmarks/sampling_fidelity.py's measure of a sampler: the prompt's cache from one model, then one token at
    a time through the sampler. With the fp32 student as both, it must give the student's own next-token
    distributions over the whole sequence (so its KL yardstick is 0 for the right reason); a bf16 copy decoding from
    the student's cache must differ, by bf16 rounding only."""
    import copy

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from sampling_fidelity import next_token_log_probs

    student = AutoModelForCausalLM.from_pretrained(make_tiny_model(seed=1)).eval()
    ids = torch.randint(5, student.config.vocab_size, (14,), generator=torch.Generator().manual_seed(0))
    prompt = 9
    with torch.no_grad():
        whole = (student(input_ids=ids[None]).logits[0, prompt - 1:-1] / 0.9).log_softmax(-1)
    decoded = next_token_log_probs(student, student, ids, prompt, temperature=0.9)
    assert decoded.shape == whole.shape == (len(ids) - prompt, student.config.vocab_size)
    assert torch.allclose(decoded, whole, atol=1e-5)
    bf16 = copy.deepcopy(student).to(torch.bfloat16)
    mine = next_token_log_probs(student, bf16, ids, prompt, temperature=0.9, cache_dtype=torch.bfloat16)
    difference = (mine - whole).abs().max()
    assert 0 < difference < 0.05


def test_evaluation_generates_and_scores(tmp_path, make_tiny_model):
    """Two of the three eval answers are set to what the student itself answers (found independently, with
    plain transformers): the evaluation must generate those answers and judge them right, and only them."""
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    eval_rows = rows(3)
    own = greedy_answers(student, [r["messages"] for r in eval_rows], max_new_tokens=4)
    assert own[0] and own[2] and own[1] != "2", own  # the random student answers something, not "2"
    for index in (0, 2):
        eval_rows[index]["messages"][-1]["content"] = eval_rows[index]["reference"] = own[index]
    trainer = make_trainer(tmp_path, student, teacher, eval_rows=eval_rows,
                           baseline_success=0.0, baseline_tokens=10.0)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_success_rate", "eval_avg_tokens", "metrics/success_delta",
            "metrics/token_reduction_pct", "metrics/meets_target"} <= set(metrics)
    result = trainer.last_generation_eval["result"]
    assert [e.prediction for e in result.episodes] == own
    assert [e.success for e in result.episodes] == [True, False, True]
    assert metrics["eval_success_rate"] == pytest.approx(2 / 3)
    assert result.count == 3 and metrics["eval_avg_tokens"] == pytest.approx(result.avg_tokens)
    assert metrics["metrics/token_reduction_pct"] == pytest.approx((10.0 - result.avg_tokens) / 10.0 * 100)
    # upstream's own use: the baseline summary straight from what evaluate() returns (eval_-prefixed keys)
    from atlas_distill import compute_baseline_summary

    summary = compute_baseline_summary(metrics, 0.5, 10.0)
    assert summary["success_delta"] == pytest.approx(metrics["eval_success_rate"] - 0.5)


def test_upstream_api_builds_its_datasets_from_postgres(tmp_path, make_tiny_model, seeded_db):
    """AtlasGKDTrainer(model=..., teacher_model=..., args=GKDConfig(...), db_url=..., min_reward=...)."""
    from helpers import db_ids

    student_dir, teacher_dir = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = AtlasGKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_dir),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir),
        args=GKDConfig(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, max_length=512, bf16=False),
        db_url=seeded_db, min_reward=0.7, processing_class=AutoTokenizer.from_pretrained(student_dir))
    matching = db_ids(seeded_db, "review_status = 'approved' AND (reward_stats->>'score')::float >= 0.7")
    assert len(trainer.train_dataset) + len(trainer.eval_dataset) == len(matching)
    assert set(trainer.train_dataset["session_id"]).isdisjoint(trainer.eval_dataset["session_id"])


def test_upstreams_config_snippet_works_on_a_cpu(tmp_path, monkeypatch):
    """GKDConfig(output_dir=..., per_device_train_batch_size=4, lmbda=1.0, beta=0.5), as upstream writes it: TRL's
    default bf16 stops it here; ours trains in fp32 where no GPU has bf16 (on a CPU with native bf16 or AMX too), and
    bf16=True is still honoured."""
    from transformers.utils import is_torch_bf16_gpu_available

    from atlas_distill import GKDConfig as Exported
    from atlas_distill.models import loading

    config = Exported(output_dir=str(tmp_path), per_device_train_batch_size=4, lmbda=1.0, beta=0.5)
    assert config.bf16 is is_torch_bf16_gpu_available() and (config.lmbda, config.beta) == (1.0, 0.5)
    for native in (True, False):
        monkeypatch.setattr(loading, "cpu_bf16", lambda native=native: native)
        assert GKDConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is False
        assert GKDConfig(output_dir=str(tmp_path)).bf16 is is_torch_bf16_gpu_available()
    assert GKDConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True).bf16 is True
    assert GKDConfig(output_dir=str(tmp_path), bf16=False).bf16 is False
