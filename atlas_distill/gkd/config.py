"""AtlasGKDConfig: TRL's GKDConfig plus our settings (gkd/settings.py), and the one mapping of a profile onto it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from .settings import SETTINGS, AtlasSettings, GenerationDtype, Scorer, Targets
from .trl_surface import GKDConfig as TRLGKDConfig

if TYPE_CHECKING:
    from ..config import Profile

__all__ = ["AtlasGKDConfig", "GKDConfig", "from_profile"]

_CHOICES = {"targets": get_args(Targets), "scorer": get_args(Scorer), "generation_dtype": get_args(GenerationDtype)}


@dataclass
class AtlasGKDConfig(TRLGKDConfig, AtlasSettings):
    """TRL's `GKDConfig` (lmbda, beta, temperature, max_new_tokens, seq_kd, max_length and every
    `TrainingArguments` field) with atlas-distill's settings (`AtlasSettings`: data, off-policy warm-up,
    evaluation, speed and memory).

    One default differs from TRL's: with `bf16` left unset it is bf16 autocast on a GPU with native bf16
    (`models.autocast_bf16`; not T4/V100, where it is emulated), else fp32, on a CPU too. TRL's default (bf16
    wherever fp16 is off) stops upstream's own `GKDConfig(output_dir=..., lmbda=1.0, beta=0.5)` on a CPU with
    transformers' "doesn't support bf16/gpu" error; `bf16=True` (with `use_cpu=True` on a CPU) still asks for it.
    """

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        if not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"eval_split={self.eval_split} must lie in [0, 1).")
        if self.bf16 is None and not self.fp16:
            from ..models import autocast_bf16

            self.bf16 = autocast_bf16() and not self.use_cpu
        super().__post_init__()


GKDConfig = AtlasGKDConfig  # upstream's name: `from atlas_distill import GKDConfig`

# Where a profile keeps each of our settings, when not under `trainer:`.
_PROFILE_SECTION = {"eval_split": "data", "targets": "data"}


def mixed_precision(dtype: str) -> tuple[bool, bool]:
    """(bf16, fp16) for a profile's `model.dtype`, the compute dtype of mixed precision: bfloat16 (and auto on a
    GPU with native bf16, `models.autocast_bf16`) trains under bf16 autocast, float16 under fp16
    autocast with a loss scaler (CUDA only), and the trained student's weights stay fp32
    (`models.training_dtype`)."""
    import torch

    from ..errors import ProfileError
    from ..models import autocast_bf16

    if dtype == "float16" and not torch.cuda.is_available():
        raise ProfileError(["model.dtype=float16 trains under fp16 autocast with a loss scaler, which needs a CUDA "
                            "GPU; there is none here."],
                           fix="Use model.dtype=auto (float32 on a CPU), or bfloat16 (bf16 autocast).")
    return dtype == "bfloat16" or (dtype == "auto" and autocast_bf16()), dtype == "float16"


def from_profile(profile: Profile, run_dir: Path, report_to: list[str]) -> AtlasGKDConfig:
    """The AtlasGKDConfig of a profile: TRL's and transformers' settings from `trainer:` and `model:`, ours copied
    by name. The baseline is left unset: `atlas-distill train` measures it before training (`auto`)."""
    import torch

    t = profile.trainer
    bf16, fp16 = mixed_precision(profile.model.dtype)
    ours = {name: getattr(getattr(profile, _PROFILE_SECTION.get(name, "trainer")), name) for name in SETTINGS
            if name not in ("baseline_success", "baseline_tokens")}
    return AtlasGKDConfig(
        output_dir=str(run_dir), run_name=run_dir.name, report_to=report_to, seed=t.seed,
        per_device_train_batch_size=t.per_device_train_batch_size, per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, logging_steps=t.logging_steps,
        eval_strategy="steps", eval_steps=t.eval_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, lmbda=t.lmbda, beta=t.beta, temperature=t.temperature,
        max_new_tokens=t.max_new_tokens, seq_kd=t.seq_kd, max_length=t.max_length,
        gradient_checkpointing=profile.model.gradient_checkpointing, bf16=bf16, fp16=fp16,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, save_only_model=False, **ours,
    )

