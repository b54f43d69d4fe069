"""AtlasGKDTrainer on tiny random models: temperature in the loss, padded vocabularies, warmup schedule."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas_distill.gkd import AtlasGKDTrainer, GKDConfig


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
    return AtlasGKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_dir),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir),
        args=GKDConfig(**settings), train_dataset=Dataset.from_list(rows()), eval_dataset=Dataset.from_list(rows(3)),
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
    betas = []
    real_loss = trainer.compute_loss
    monkeypatch.setattr(trainer, "compute_loss", lambda *a, **k: betas.append(trainer.step_beta) or real_loss(*a, **k))
    trainer.train()
    assert seen == [2, 3]  # steps 0 and 1 were off-policy, then every step on-policy (lmbda 1)
    assert betas == [0.0, 0.0, 0.7, 0.7]


def test_evaluation_generates_and_scores(tmp_path, make_tiny_model):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher,
                           baseline={"success": 0.0, "tokens": 10.0, "success_target": 0.1, "token_target": 30.0})
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_success_rate", "eval_avg_tokens", "metrics/success_delta",
            "metrics/token_reduction_pct", "metrics/meets_target"} <= set(metrics)
    result = trainer.last_generation_eval["result"]
    assert result.count == 3 and metrics["eval_avg_tokens"] == pytest.approx(result.avg_tokens)
    assert metrics["metrics/token_reduction_pct"] == pytest.approx((10.0 - result.avg_tokens) / 10.0 * 100)


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
