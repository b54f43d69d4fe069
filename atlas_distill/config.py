"""Profiles: typed, strict configuration shared by every subcommand.

Precedence, lowest first: the defaults declared below < the profile YAML <
dotted overrides given as trailing arguments (``trainer.min_reward=0.9``) <
explicit command-line flags. Every problem in a profile or override is reported
at once, each naming the key, where it came from and the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ProfileError
from .gkd.settings import setting

PACKAGED_PROFILES = Path(__file__).parent / "profiles"
LOCAL_PROFILE_DIR = Path("profiles")


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
    targets: Literal["all", "final"] = setting("targets")

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
        "Qwen/Qwen2.5-{size}-Instruct", description="What a size alias (14b, 7b, 3b, 1.5b, 0.5b) resolves to."
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with a checkpoint.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto: bfloat16 on a GPU that has it, else float32."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)


class TeacherInitConfig(_Strict):
    """Upstream's teacher_model_init_kwargs: how the teacher is loaded."""

    load_in_8bit: bool = Field(False, description="8-bit teacher (bitsandbytes; needs CUDA).")
    load_in_4bit: bool = Field(False, description="4-bit teacher (bitsandbytes; needs CUDA).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Teacher weights dtype.")


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
    group_by_length: bool = setting("group_by_length")
    generation_dtype: Literal["auto", "float32", "bfloat16"] = setting("generation_dtype")
    lr_scheduler_type: str = Field("linear", description="transformers scheduler name.")
    warmup_steps: int = Field(0, ge=0, description="Learning-rate warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    logging_steps: int = Field(10, ge=1, description="Log train metrics every this many steps.")
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most this many checkpoints.")
    seed: int = Field(42, description="Seed for model init, data order and sampling.")
    scorer: Literal["auto", "exact", "numeric", "json", "contains"] = setting("scorer")
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


def profile_paths() -> list[tuple[str, Path]]:
    """Every profile a name can resolve to: ./profiles first, then the packaged ones."""
    found: dict[str, Path] = {}
    for folder in (LOCAL_PROFILE_DIR, PACKAGED_PROFILES):
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            found.setdefault(path.stem, path)
    return sorted(found.items())


def resolve_profile_path(name_or_path: str) -> Path:
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        path = Path(name_or_path)
        if not os.path.isfile(path):  # unlike Path.is_file, False (not OSError) for a name too long
            raise ProfileError([f"profile file {name_or_path} does not exist"], fix="Check the path.")
        return path
    known = dict(profile_paths())
    if name_or_path in known:
        return known[name_or_path]
    close = difflib.get_close_matches(name_or_path, known, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    raise ProfileError(
        [f"unknown profile `{name_or_path}`.{hint}"],
        fix=f"Known profiles: {', '.join(known)}; or pass a path to a YAML file.",
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ProfileError([f"{path}: nested too deeply to read (about 1,000 levels)"],
                           fix="A profile is a few levels of keys; see `atlas-distill profile show`.") from None
    except (OSError, ValueError, yaml.YAMLError) as exc:  # ValueError: not UTF-8, a date 2024-13-45, 5000 digits
        raise ProfileError([f"{path}: cannot be read as YAML: {exc}"],
                           fix="Fix the file's syntax or that value.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ProfileError([f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"])
    return data


_noted_upstream: set[Path] = set()


def _from_upstream(tree: dict[str, Any], path: Path) -> dict[str, Any]:
    """An upstream Atlas run config (configs/run/*.yaml) read as a profile: its Hydra `defaults:` list is ignored
    with one note (a profile is whole by itself, and train always runs GKD), its top-level `model_name_or_path`
    is the student (model.model_name_or_path), and a top-level trainer setting (lmbda, beta, ...) goes under
    trainer. Anything else is validated as ours."""
    if "defaults" not in tree and "model_name_or_path" not in tree and not set(tree) & set(TrainerConfig.model_fields):
        return tree
    tree = dict(tree)
    defaults = tree.pop("defaults", None)
    moved = []
    if "model_name_or_path" in tree:
        model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
        tree["model"] = {**model, "model_name_or_path": tree.pop("model_name_or_path")}
        moved.append("model_name_or_path -> model.model_name_or_path")
    for key in [k for k in tree if k in TrainerConfig.model_fields and k not in Profile.model_fields]:
        trainer = tree.get("trainer") if isinstance(tree.get("trainer"), dict) else {}
        tree["trainer"] = {key: tree.pop(key), **trainer}  # a value under trainer: wins over a top-level one
        moved.append(f"{key} -> trainer.{key}")
    if path not in _noted_upstream:
        _noted_upstream.add(path)
        said = ([f"its Hydra `defaults` list ({_brief(defaults)}) is ignored: a profile is whole by itself and "
                 "`train` always runs GKD"] if defaults is not None else [])
        said += [f"read the upstream keys as ours ({', '.join(moved)})"] if moved else []
        print(f"Note: {path} is an upstream Atlas run config: {'; '.join(said)}.", file=sys.stderr, flush=True)
    return tree


def _brief(value: Any) -> str:
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    except (yaml.YAMLError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """`trainer.min_reward=0.9` -> ("trainer.min_reward", 0.9); values are YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("+")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ProfileError(
            [f"override `{text}` is not of the form key.path=value"],
            fix="Write overrides as e.g. trainer.min_reward=0.9 or trainer.learning_key=null.",
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # not a YAML value (e.g. 2024-13-45): the text as given
        value = raw
    return key, value


def known_keys(model: type[BaseModel] = Profile, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(known_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _closest_key(dotted: str) -> str | None:
    keys = known_keys()
    leaf = dotted.rsplit(".", 1)[-1]
    by_path = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    if by_path:
        return by_path[0]
    by_leaf = [k for k in keys if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], n=1, cutoff=0.75)]
    return by_leaf[0] if by_leaf else None


def _describe(error: dict[str, Any], sources: dict[str, str]) -> str:
    dotted = ".".join(str(p) for p in error["loc"])
    origin = sources.get(dotted) or next(
        (src for key, src in sources.items() if key.startswith(dotted + ".") or dotted.startswith(key + ".")),
        "defaults",
    )
    if error["type"] == "extra_forbidden":
        close = _closest_key(dotted)
        hint = f"; did you mean `{close}`?" if close else ""
        return f"{origin}: unknown key `{dotted}`{hint}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{origin}: `{dotted}`: {message} (got {error.get('input')!r})"


def load_profile(
    profile: str | None = "default",
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> Profile:
    """Resolve a profile by name or path, apply overrides then flags (dotted keys, None = unset)."""
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if profile:
        path = resolve_profile_path(profile)
        tree = _from_upstream(_read_yaml(path), path)
        sources.update({key: str(path) for key in _flatten(tree)})
    problems: list[str] = []
    for text in overrides or []:
        try:
            key, value = parse_override(text)
        except ProfileError as exc:
            problems.extend(exc.problems)
            continue
        _set_dotted(tree, key, value)
        sources[key] = f"override `{text}`"
    for key, (flag, value) in _flag_items(flags):
        if isinstance(value, Widen):
            value = _widened(tree, key, value)
        _set_dotted(tree, key, None if isinstance(value, Null) else value)
        sources[key] = f"flag {flag}"
    try:
        resolved = Profile.model_validate(tree)
    except ValidationError as exc:
        problems.extend(_describe(err, sources) for err in exc.errors())
        resolved = None
    if problems or resolved is None:
        raise ProfileError(problems, fix="Fix or remove those keys; `atlas-distill profile show` prints valid ones.")
    return resolved


class Widen(list):
    """A flag's values added to its key's list as resolved so far (--include-status pending), not replacing it."""


@dataclass(frozen=True)
class Null:
    """A flag that sets its key to null (--all-statuses): a plain None means the flag was not given."""


def _widened(tree: dict[str, Any], key: str, extra: Widen) -> list[Any] | Null:
    """The key's list from the tree so far (or its default) with `extra` added; a null list (keep all) stays null."""
    try:
        current = Profile.model_validate(tree).model_dump()
    except ValidationError:  # reported by the full validation that follows
        return list(extra)
    for part in key.split("."):
        current = current[part]
    return Null() if current is None else list(dict.fromkeys([*current, *extra]))


def _flag_items(flags: dict[str, Any] | None):
    """Flags arrive as {"--min-reward": ("trainer.min_reward", value)}; unset flags are skipped."""
    for flag, (key, value) in (flags or {}).items():
        if value is not None:
            yield key, (flag, value)


def profile_to_yaml(profile: Profile) -> str:
    from .db import mask_url

    data = copy.deepcopy(profile.model_dump(mode="json"))
    if data["database"]["url"]:
        data["database"]["url"] = mask_url(data["database"]["url"])
    return yaml.safe_dump(data, sort_keys=False)
