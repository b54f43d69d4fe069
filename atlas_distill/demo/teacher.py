"""The demo teacher `smollm2-135m-crm`: the builtin SmolLM2, specialised on the demo task by a short SFT.

As shipped, SmolLM2-135M does not know the demo's CRM agent (its tool calls, the
hidden tagging and rating rules); a GKD teacher must be reliable. So on first use
this fine-tunes it on every target turn (each action and the final answer) of the
training split of the bundled demo traces (never on eval sessions: the split is the
same hash split `train` uses), one pass per conversation with the loss on the target
spans (the collator `train` uses), and caches the result like any builtin.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..models.builtin import builtin_model_dir
from ..models.cache import built_model_dir, publish
from ..progress import Progress, no_progress
from . import DEMO_TRACES

DEMO_TEACHER = "smollm2-135m-crm"
SFT_STEPS = 40
SFT_BATCH = 4
SFT_LR = 3e-4


def sft_rows() -> list[dict]:
    """Conversations with their target turns, from the demo profile's training split."""
    from ..config import load_profile
    from ..data import load_prepared
    from ..traces import TraceFilter

    profile = load_profile("demo")
    prepared = load_prepared(traces=str(DEMO_TRACES), filters=TraceFilter.from_profile(profile),
                             eval_split=profile.data.eval_split, prompt=profile.data.prompt, seed=0,
                             targets=profile.data.targets)
    return [{"messages": row["messages"], "targets": row["targets"]} for row in prepared.train]


class _TargetLabels:
    """The GKD collator's whole-conversation ids and target-span labels, for supervised fine-tuning."""

    def __init__(self, tokenizer, max_length: int) -> None:
        from ..gkd.collator import TargetSpanCollator

        self.collate = TargetSpanCollator(tokenizer, max_length)

    def __call__(self, examples):
        batch = self.collate(examples)
        return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}


def crm_teacher_dir(progress: Progress = no_progress) -> Path:
    def build(tmp: Path) -> None:
        import torch
        from datasets import Dataset, disable_progress_bars
        from transformers import (AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback, Trainer,
                                  TrainerCallback, TrainingArguments)
        from transformers.utils import logging as hf_logging

        disable_progress_bars()  # progress is ours to show; dataset and step bars would garble it
        hf_logging.disable_progress_bar()
        phase = f"Fine-tuning the demo teacher {DEMO_TEACHER} on the demo traces (once)"

        class Steps(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                progress(phase, state.global_step, state.max_steps)

        base = builtin_model_dir(progress)
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        args = TrainingArguments(output_dir=str(tmp / "sft"), max_steps=SFT_STEPS,
                                 per_device_train_batch_size=SFT_BATCH, learning_rate=SFT_LR,
                                 lr_scheduler_type="cosine", warmup_steps=5, logging_steps=10, report_to=[],
                                 save_strategy="no", seed=0, disable_tqdm=True, remove_unused_columns=False,
                                 use_cpu=not torch.cuda.is_available(),
                                 train_sampling_strategy="group_by_length", length_column_name="length")
        rows = sft_rows()
        trainer = Trainer(model=model, args=args, data_collator=_TargetLabels(tokenizer, 512),
                          train_dataset=Dataset.from_list([r | {"length": len(str(r["messages"]))} for r in rows]))
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(Steps())
        progress(phase, 0, SFT_STEPS)
        trainer.train()
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / "sft", ignore_errors=True)

    return publish(build, built_model_dir(DEMO_TEACHER))
