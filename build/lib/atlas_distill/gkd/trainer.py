"""AtlasGKDTrainer: TRL's GKD trainer, fed from Atlas traces, evaluated for real.

On top of `trl.experimental.gkd.GKDTrainer` (its collator, on-policy generation
and generalized JSD are used as they are), this trainer:
- builds its datasets from Postgres (`db_url=`) or a trace file (`traces=`);
- applies `temperature` in the divergence too (TRL only samples with it);
- compares teacher and student over their shared real vocabulary, so models
  with the same tokenizer but differently padded embeddings work (Qwen2.5 7B/3B);
- runs an off-policy warmup (lmbda 0, its own beta) for `offpolicy_warmup_steps`,
  and draws on/off-policy from its own seeded RNG, not Python's global one;
- evaluates by generating answers on the eval sessions and scoring them:
  eval/success_rate, eval/avg_tokens and the baseline comparison metrics.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl import SFTTrainer  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402
from trl.models.utils import unwrap_model_for_generation  # noqa: E402

from ..models import shared_vocab_size  # noqa: E402

__all__ = ["AtlasGKDTrainer", "GKDConfig"]


@contextmanager
def _declared_vocab_matching(student, teacher):
    """GKDTrainer refuses models whose config.vocab_size differ; padded embeddings of one tokenizer are fine here
    (the divergence is taken over the shared rows), so the teacher's declared size matches during its checks."""
    student_size = student.config.get_text_config().vocab_size
    teacher_config = teacher.config.get_text_config()
    declared = teacher_config.vocab_size
    teacher_config.vocab_size = student_size
    try:
        yield
    finally:
        teacher_config.vocab_size = declared


class AtlasGKDTrainer(GKDTrainer):
    def __init__(self, model=None, teacher_model=None, args: GKDConfig | None = None, *, db_url: str | None = None,
                 traces: str | None = None, min_reward: float | None = 0.8, learning_key: str | None = None,
                 eval_split: float = 0.15, train_dataset=None, eval_dataset=None, processing_class=None,
                 offpolicy_warmup_steps: int = 0, offpolicy_warmup_beta: float = 0.0, scorer: str = "auto",
                 eval_max_sessions: int | None = None, baseline: dict[str, Any] | None = None,
                 on_evaluation: Callable[[dict[str, Any]], None] | None = None, **kwargs):
        if train_dataset is None:
            from ..data import build_gkd_dataset

            train_dataset, built_eval = build_gkd_dataset(
                db_url, traces=traces, min_reward=min_reward, learning_key=learning_key, eval_split=eval_split,
                seed=args.seed, tokenizer=processing_class, max_length=args.max_length)
            eval_dataset = built_eval if eval_dataset is None else eval_dataset
        with _declared_vocab_matching(model, teacher_model):
            super().__init__(model=model, teacher_model=teacher_model, args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.shared_vocab = shared_vocab_size(processing_class, processing_class, self.model, teacher_model)
        self.offpolicy_warmup_steps = offpolicy_warmup_steps
        self.offpolicy_warmup_beta = offpolicy_warmup_beta
        self.scorer = scorer
        self.eval_max_sessions = eval_max_sessions
        self.baseline = baseline
        self.on_evaluation = on_evaluation
        self.step_beta = self.beta
        self.policy_rng = random.Random(args.seed)
        self.last_generation_eval: dict[str, Any] | None = None

    def in_warmup(self) -> bool:
        return self.state.global_step < self.offpolicy_warmup_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_outputs = self.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        vocab = self.shared_vocab
        loss = self.generalized_jsd_loss(
            student_logits=student_outputs.logits[:, :-1, :vocab],
            teacher_logits=teacher_outputs.logits[:, :-1, :vocab],
            labels=inputs["labels"][:, 1:],
            beta=self.step_beta,
            temperature=self.temperature,
            num_items_in_batch=num_items_in_batch,
        )
        return (loss, student_outputs) if return_outputs else loss

    def _generate_into(self, generator, inputs) -> None:
        with unwrap_model_for_generation(generator, self.accelerator, generation_kwargs=self.generation_kwargs,
                                         gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
                                         ) as unwrapped:
            ids, mask, labels = self.generate_on_policy_outputs(unwrapped, inputs, self.generation_config)
        inputs["input_ids"], inputs["attention_mask"], inputs["labels"] = ids, mask, labels

    def training_step(self, model, inputs, num_items_in_batch=None):
        warm = self.in_warmup()
        self.step_beta = self.offpolicy_warmup_beta if warm else self.beta
        lmbda = 0.0 if warm else self.lmbda
        if self.policy_rng.random() < lmbda:
            self._generate_into(model, inputs)
        elif self.seq_kd:
            self._generate_into(self.teacher_model, inputs)
        # GKDTrainer.training_step would draw on/off-policy again; the step itself is SFT's.
        return SFTTrainer.training_step(self, model, inputs, num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        self.step_beta = self.beta
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None or len(dataset) == 0:
            return metrics
        extra = self.generation_metrics(dataset, prefix=metric_key_prefix)
        self.log({key: value for key, value in extra.items() if value is not None})
        metrics.update(extra)
        return metrics

    def generation_metrics(self, dataset, *, prefix: str = "eval") -> dict[str, Any]:
        """Generate answers for the eval sessions, score them; add the baseline comparison when configured."""
        from ..evaluate import compute_baseline_summary, evaluate_conversations

        rows = dataset if self.eval_max_sessions is None else dataset.select(range(min(len(dataset),
                                                                                     self.eval_max_sessions)))
        result = evaluate_conversations(
            self.accelerator.unwrap_model(self.model), self.processing_class, list(rows["messages"]),
            list(rows["reference"]), scorer=self.scorer, max_new_tokens=self.args.max_new_tokens,
            batch_size=self.args.per_device_eval_batch_size)
        metrics: dict[str, Any] = {f"{prefix}_success_rate": result.success_rate,
                                   f"{prefix}_avg_tokens": result.avg_tokens}
        if self.baseline is not None:
            summary = compute_baseline_summary(result, self.baseline["success"], self.baseline.get("tokens"),
                                               success_target=self.baseline.get("success_target", 0.10),
                                               token_target=self.baseline.get("token_target", 30.0))
            metrics.update({"metrics/success_delta": summary["success_delta"],
                            "metrics/token_reduction_pct": summary["token_reduction_pct"],
                            "metrics/meets_target": summary["meets_all_targets"]})
        else:
            summary = None
        self.last_generation_eval = {"step": self.state.global_step, "result": result, "summary": summary}
        if self.on_evaluation:
            self.on_evaluation(self.last_generation_eval)
        return metrics
