"""The profile schema: typed, strict sections (database, data, model, teacher, trainer) with their defaults and
validation. Our GKD settings take their default and help from gkd/settings.py."""

from __future__ import annotations

import difflib
import math
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..families import DEFAULT_FAMILY
from ..gkd.settings import GenerationDtype, Scorer, Targets, setting

# The values the Atlas SDK writes (DESIGN §2); it lowercases review statuses, and so do we.
REVIEW_STATUSES = ("pending", "approved", "quarantined")
SESSION_STATUSES = ("succeeded", "failed", "running")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _known_statuses(values: list[str] | None, allowed: tuple[str, ...], what: str) -> list[str] | None:
    """Statuses as the SDK writes them (lowercase); an unknown one is an error naming the closest, not "no data"."""
    if values is None:
        return None
    known = [value.strip().lower() for value in values]
    for value, given in zip(known, values, strict=True):
        if value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.5)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ValueError(f"`{given}` is not a {what} (the SDK writes {', '.join(allowed)}){hint}")
    return list(dict.fromkeys(known))


class DatabaseConfig(_Strict):
    url: str | None = Field(
        None,
        description="Postgres URL of the Atlas store. Null: --database-url, then ATLAS_DB_URL.",
    )


class DataConfig(_Strict):
    """Which sessions to read; min_reward and learning_key live under `trainer` as upstream."""

    review_status: list[str] | None = Field(
        ["approved"],
        description="Review statuses to keep (arc-atlas default: approved). Null keeps all.",
    )
    status: list[str] | None = Field(
        None, description="Session statuses to keep (succeeded, failed, running). Null keeps all."
    )
    created_after: datetime | None = Field(None, description="Keep sessions created after this time.")
    session_ids: list[int] | None = Field(None, description="Keep only these session ids.")
    limit: int | None = Field(None, ge=1, description="At most this many sessions (lowest ids first).")
    eval_split: float = setting("eval_split", ge=0.0, lt=1.0)
    prompt: Literal["conversation", "task"] = Field(
        "conversation", description="conversation: the whole multi-turn exchange; "
        "task: only the task before the final answer (shorter; the final answer is then the only target).")
    targets: Targets = setting("targets")

    @field_validator("review_status")
    @classmethod
    def _review_status(cls, value: list[str] | None) -> list[str] | None:
        return _known_statuses(value, REVIEW_STATUSES, "review status")

    @field_validator("status")
    @classmethod
    def _status(cls, value: list[str] | None) -> list[str] | None:
        return _known_statuses(value, SESSION_STATUSES, "session status")


class LoraConfig(_Strict):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of every student weight.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling (lora_alpha).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[str] | str = Field("all-linear", description="Modules to adapt, or all-linear.")


class ModelConfig(_Strict):
    model_name_or_path: str = Field(
        "Qwen/Qwen2.5-7B-Instruct",
        description="Student model: HF id, local directory, size alias (7b), builtin (smollm2-135m), "
        "or SPEC@NL for a depth-pruned copy keeping N layers.",
    )
    family: str = Field(
        DEFAULT_FAMILY, description="What a size alias (14b, 7b, 3b, 1.5b, 0.5b) resolves to."
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with a checkpoint.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype (mixed precision; a trained student keeps fp32 weights); auto: bfloat16 "
        "on a GPU with native bf16, else float32."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)


class TeacherInitConfig(_Strict):
    """Upstream's teacher_model_init_kwargs: how the teacher is loaded."""

    load_in_8bit: bool = Field(False, description="8-bit teacher (bitsandbytes; needs CUDA).")
    load_in_4bit: bool = Field(False, description="4-bit teacher (bitsandbytes; needs CUDA).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Teacher weights dtype; auto: bfloat16 where the machine has native bf16 (a GPU, or a "
        "CPU with AVX512-BF16 or AMX), else float32.")


class TrainerConfig(_Strict):
    """GKD hyperparameters, data filters and the baseline comparison, as upstream's trainer config."""

    min_reward: float | None = Field(
        0.8, description="Keep sessions whose reward (reward_stats.score, else session_reward.score, else "
        "reward_summary.score) is at least this, in [0, 1]. Null: no reward filter."
    )
    learning_key: str | None = setting("learning_key")
    lmbda: float = Field(1.0, ge=0.0, le=1.0, description="On-policy fraction: share of steps the student generates.")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="Generalized JSD interpolation: 0 forward KL, 1 reverse KL.")
    temperature: float = Field(0.9, gt=0.0, description="Sampling and divergence temperature.")
    num_train_epochs: float = Field(3, gt=0, description="Epochs over the training conversations.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(4, ge=1, description="Conversations per step per device.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    eval_steps: int = Field(100, ge=1, description="Evaluate every this many steps.")
    save_steps: int = Field(100, ge=1, description="Checkpoint every this many steps.")
    baseline_success: float | Literal["auto"] = Field(
        "auto", description="Reference success rate in [0,1], or auto: measured before training."
    )
    baseline_tokens: float | Literal["auto"] | None = Field(
        "auto", description="Reference tokens per episode, auto, or null to skip the token target."
    )
    max_new_tokens: int = Field(128, ge=1, description="Tokens generated per completion (on-policy and eval).")
    seq_kd: bool = Field(False, description="Off-policy steps train on teacher-generated completions.")
    offpolicy_warmup_steps: int = setting("offpolicy_warmup_steps", ge=0)
    offpolicy_warmup_beta: float = setting("offpolicy_warmup_beta", ge=0.0, le=1.0)
    max_length: int = Field(1024, ge=16, description="Max tokens of a conversation; longer ones lose whole turns "
                            "from the left.")
    kv_cache_generation: bool = setting("kv_cache_generation")
    chunked_loss: bool = setting("chunked_loss")
    teacher_cache_topk: int = setting("teacher_cache_topk", ge=0)
    teacher_store: str | None = setting("teacher_store")
    group_by_length: bool = setting("group_by_length")
    group_by_turn: bool = setting("group_by_turn")
    generation_dtype: GenerationDtype = setting("generation_dtype")
    inverse_cdf_sampling: bool = setting("inverse_cdf_sampling")
    packed_generation: bool = setting("packed_generation")
    lean_decoding: bool = setting("lean_decoding")
    prefill_once: bool = setting("prefill_once")
    replay_generation: bool = setting("replay_generation")
    lean_recompute: bool = setting("lean_recompute")
    keep_freed_memory: bool = setting("keep_freed_memory")
    compact_optimizer: bool = setting("compact_optimizer")
    math_attention: bool = setting("math_attention")
    lean_activations: bool = setting("lean_activations")
    lr_scheduler_type: str = Field("linear", description="transformers scheduler name.")
    warmup_steps: int = Field(0, ge=0, description="Learning-rate warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    logging_steps: int = Field(10, ge=1, description="Log train metrics every this many steps.")
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most this many checkpoints.")
    seed: int = Field(42, description="Seed for model init, data order and sampling.")
    scorer: Scorer = setting("scorer")
    eval_max_sessions: int | None = setting("eval_max_sessions", ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1, description="Eval sessions generated at once.")
    report_to: list[str] = Field(["wandb"], description="Trackers; wandb runs offline without an API key. [] for none.")
    success_delta_target: float = setting("success_delta_target")
    token_reduction_target: float = setting("token_reduction_target")

    @field_validator("min_reward")
    @classmethod
    def _reward_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            closest = "" if math.isnan(value) else f"; the closest valid value is {0 if value < 0 else 1}"
            raise ValueError(f"a reward (a judge score) lies in [0, 1]{closest}")
        return value


class Profile(_Strict):
    """The whole configuration of a run; a profile YAML is this model written down."""

    teacher_model_name_or_path: str = Field(
        "Qwen/Qwen2.5-14B-Instruct", description="Teacher model: HF id, local directory, size alias or builtin."
    )
    teacher_model_init_kwargs: TeacherInitConfig = Field(default_factory=TeacherInitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    output_dir: str = Field("outputs/gkd", description="Runs are written under this directory.")
    run_name: str | None = Field(None, description="Run directory name; null: derived from profile and time.")
