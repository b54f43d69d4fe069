"""The demo teacher `smollm2-135m-crm`: the builtin SmolLM2, specialised on the demo task by a short SFT.

As shipped, SmolLM2-135M rarely writes the right JSON tool call for a CRM note;
a GKD teacher must be reliable. So on first use this fine-tunes it on the
training split of the bundled demo traces (never on eval sessions: the split is
the same hash split `train` uses) and caches the result like any builtin.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..builtin import _publish, builtin_model_dir, cache_dir
from . import DEMO_TRACES

DEMO_TEACHER = "smollm2-135m-crm"
SFT_STEPS = 50
SFT_BATCH = 8
SFT_LR = 1e-4
SFT_EXAMPLES = 400


def sft_rows() -> list[dict]:
    """Prompt/completion pairs from the demo profile's training split."""
    from ..config import load_profile
    from ..data import load_prepared
    from ..traces import TraceFilter

    profile = load_profile("demo")
    prepared = load_prepared(traces=str(DEMO_TRACES), filters=TraceFilter.from_profile(profile),
                             eval_split=profile.data.eval_split, prompt=profile.data.prompt, seed=0)
    return [{"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
            for row in prepared.train[:SFT_EXAMPLES]]


def crm_teacher_dir() -> Path:
    def build(tmp: Path) -> None:
        import torch
        from datasets import Dataset, disable_progress_bars
        from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback
        from transformers.utils import logging as hf_logging
        from trl import SFTConfig, SFTTrainer

        disable_progress_bars()  # the CLI shows a stage line; dataset and step bars would garble it
        hf_logging.disable_progress_bar()

        base = builtin_model_dir()
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        args = SFTConfig(output_dir=str(tmp / "sft"), max_steps=SFT_STEPS, per_device_train_batch_size=SFT_BATCH,
                         learning_rate=SFT_LR, lr_scheduler_type="cosine", warmup_steps=5, logging_steps=10,
                         report_to=[], save_strategy="no", seed=0, max_length=256, disable_tqdm=True,
                         use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sft_rows()),
                             processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / "sft", ignore_errors=True)

    return _publish(build, cache_dir() / "models" / DEMO_TEACHER)
