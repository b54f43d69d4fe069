"""Multi-stage distillation: 14B -> 7B1 -> 3B2 -> 1.5B3, each stage's student teaching the next.

`plan_chain` validates the whole chain before any weights load: every spec
resolves, every stage's models share a tokenizer (read from tokenizer files
only), the output directory is writable. `run_chain` runs the stages with
`run_training`; stage k > 1 is taught by stage k-1's `final/`. Re-running the
same chain skips complete stages and continues an interrupted one from its
last checkpoint; a failing stage stops the chain, naming it, and leaves the
earlier stages' outputs as they are.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Profile, load_profile
from .errors import AtlasDistillError, ModelSpecError, UsageError
from .models import ModelSpec, resolve_model_spec, tokenizer_family
from .outputs import check_writable_dir, ensure_writable_dir, write_json
from .runs.layout import RunDir
from .runs.summary import RunSummary

_ROOT_FIX = "Choose a writable --output-dir or free disk space."
_STAGE_OVERRIDE = re.compile(r"stage(\d+)\.(.+=.*)", re.DOTALL)


class ChainStageFailed(AtlasDistillError):
    """A stage failed; carries the stage's own exit code."""

    def __init__(self, stage: int, cause: AtlasDistillError):
        self.exit_code = cause.exit_code
        super().__init__(f"Chain stage {stage} failed: {cause.message} Earlier stages' outputs are kept; "
                         "rerun the same command to continue from here.", fix=cause.fix)


@dataclass
class Stage:
    index: int
    teacher: ModelSpec | None  # None: the previous stage's final/ checkpoint
    student: ModelSpec
    run_dir: Path
    overrides: list[str] = field(default_factory=list)

    @property
    def teacher_name(self) -> str:
        return self.teacher.name if self.teacher else f"stage {self.index - 1} final"


@dataclass
class ChainPlan:
    profile_name: str
    name: str
    root: Path
    specs: list[ModelSpec]
    stages: list[Stage]
    flags: dict[str, Any]
    database_url: str | None = None
    trust_remote_code: bool = False
    notes: list[str] = field(default_factory=list)


def default_chain_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", spec.replace("/", "--").replace(":", "_to_")).strip("_")


def parse_chain(spec: str, family: str) -> list[ModelSpec]:
    parts = [part.strip() for part in spec.split(":")]
    if len(parts) < 2 or any(not part for part in parts):
        raise UsageError(f"chain `{spec}` must list at least two model specs separated by `:`, largest first.",
                         fix="For example 14b:7b:3b:1.5b or smollm2-135m:smollm2-135m@15L:smollm2-135m@8L.")
    specs = []
    for position, part in enumerate(parts, start=1):
        try:
            specs.append(resolve_model_spec(part, family))
        except ModelSpecError as exc:
            raise ModelSpecError(f"chain model {position} of {len(parts)}: {exc.message}", fix=exc.fix) from None
    return specs


def split_stage_overrides(overrides: list[str], stages: int) -> tuple[list[str], dict[int, list[str]]]:
    """`stage2.trainer.learning_rate=1e-5` applies to stage 2 only; the rest to every stage."""
    common, per_stage = [], {k: [] for k in range(1, stages + 1)}
    for text in overrides:
        match = _STAGE_OVERRIDE.fullmatch(text)
        if not match:
            common.append(text)
            continue
        stage = int(match.group(1))
        if stage not in per_stage:
            raise UsageError(f"override `{text}` names stage {stage}, but the chain has stages 1-{stages}.",
                             fix="Number stages from 1 (stage 1 trains the second model of the chain).")
        per_stage[stage].append(match.group(2))
    return common, per_stage


def _tokenizer_source(spec: ModelSpec) -> str:
    if spec.kind == "pruned":
        return _tokenizer_source(spec.base)
    if spec.kind == "builtin":  # every builtin is SmolLM2 with its own tokenizer
        from .models import builtin_tokenizer_dir

        return str(builtin_tokenizer_dir())
    return spec.source


def check_tokenizers(specs: list[ModelSpec], trust_remote_code: bool = False) -> None:
    """Adjacent models must share a tokenizer; only tokenizer files are read."""
    from .models import load_tokenizer, shared_vocab_size

    tokenizers = [load_tokenizer(_tokenizer_source(spec), trust_remote_code=trust_remote_code) for spec in specs]
    for k, (teacher, student) in enumerate(zip(tokenizers, tokenizers[1:]), start=1):
        try:
            shared_vocab_size(student, teacher)
        except ModelSpecError as exc:
            raise ModelSpecError(f"chain stage {k} ({specs[k - 1].name} -> {specs[k].name}): {exc.message}",
                                 fix=exc.fix) from None


def plan_chain(spec: str, profile_name: str, overrides: list[str], flags: dict[str, Any], *,
               name: str | None = None, output_dir: str = "outputs/chain", check_models: bool = True,
               dry_run: bool = False) -> ChainPlan:
    """The validated chain. A dry run whose models are not on this machine (no hub, nothing cached) still plans a
    chain of one family the tool knows (Qwen2.5): the tokenizer check is then a note, run for real later."""
    common, per_stage = split_stage_overrides(overrides, max(spec.count(":"), 1))
    profile = load_profile(profile_name, common, flags)
    specs = parse_chain(spec, profile.model.family)
    name = name or default_chain_name(spec)
    root = Path(output_dir) / name
    stages = [Stage(k, specs[0] if k == 1 else None, specs[k],
                    root / f"stage-{k}-{default_chain_name(specs[k].name)}", common + per_stage[k])
              for k in range(1, len(specs))]
    plan = ChainPlan(profile_name, name, root, specs, stages, flags, profile.database.url,
                     profile.model.trust_remote_code)
    for stage in stages:  # every stage's configuration is checked now, not hours into the chain
        stage_profile(plan, stage, teacher="previous-stage")
    check_writable_dir(root, "chain directory", fix=_ROOT_FIX)  # made when the chain starts: a dry run writes nothing
    if check_models:
        check_chain_tokenizers(plan, dry_run=dry_run)
    return plan


def check_chain_tokenizers(plan: ChainPlan, *, dry_run: bool = False) -> None:
    """Neighbouring models share a tokenizer (tokenizer files only). A dry run whose models are not on this
    machine, in one family the tool knows, gets a note instead (plan.notes)."""
    try:
        check_tokenizers(plan.specs, plan.trust_remote_code)
    except ModelSpecError:
        families = {tokenizer_family(spec) for spec in plan.specs}
        if not dry_run or len(families) != 1 or None in families:
            raise
        plan.notes.append(_family_note(families.pop(), plan.specs))


def _family_note(family: str, specs: list[ModelSpec]) -> str:
    from .families import TOKENIZER_SIZE, known_config

    shared = TOKENIZER_SIZE[family]
    rows = sorted({known_config(s.unpruned.source)["vocab_size"] for s in specs})
    return (f"the models are not on this machine, so their tokenizer files were not compared; "
            f"the {family} family shares one tokenizer ({shared:,} tokens; embedding rows "
            f"{' and '.join(f'{n:,}' for n in rows)}: the divergence runs over the {shared:,} shared ones). "
            "The check runs when the chain starts.")


def stage_profile(plan: ChainPlan, stage: Stage, teacher: str) -> Profile:
    return load_profile(plan.profile_name, stage.overrides, {
        **plan.flags, "(chain teacher)": ("teacher_model_name_or_path", teacher),
        "(chain student)": ("model.model_name_or_path", stage.student.spec),
        "(chain output)": ("output_dir", str(plan.root)), "(chain stage)": ("run_name", stage.run_dir.name)})


def run_chain(plan: ChainPlan, *, db_url: str | None = None, traces: str | None = None,
              on_event: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    from .training import run_training

    emit = on_event or (lambda kind, data: None)
    ensure_writable_dir(plan.root, "chain directory", fix=_ROOT_FIX)
    rows = []
    for stage in plan.stages:
        teacher = stage.teacher.spec if stage.teacher else str((plan.stages[stage.index - 2].run_dir / "final"))
        summary = RunDir(stage.run_dir).finished_summary()
        if summary is not None:
            emit("line", f"Stage {stage.index}: {stage.teacher_name} -> {stage.student.name} already complete; skipped")
            rows.append(_row(stage, summary, skipped=True))
            continue
        resume = RunDir(stage.run_dir).last_checkpoint() is not None
        if stage.run_dir.exists() and not resume:
            shutil.rmtree(stage.run_dir)  # an attempt that died before its first checkpoint: start it again
        emit("line", f"Stage {stage.index}: {stage.teacher_name} -> {stage.student.name}"
                     + (" (resuming from its last checkpoint)" if resume else ""))
        profile = stage_profile(plan, stage, teacher)
        started = time.perf_counter()
        try:
            result = run_training(profile, profile_name=plan.profile_name, db_url=db_url, traces=traces, resume=resume,
                                  on_event=on_event)
        except AtlasDistillError as exc:
            raise ChainStageFailed(stage.index, exc) from None
        rows.append(_row(stage, result.summary, skipped=False, seconds=time.perf_counter() - started))
    summary = {"name": plan.name, "root": str(plan.root), "chain": [s.spec for s in plan.specs], "stages": rows}
    write_json(plan.root / "summary.json", summary)
    return summary


def _row(stage: Stage, summary: RunSummary, *, skipped: bool, seconds: float | None = None) -> dict[str, Any]:
    b = summary.baseline
    return {"stage": stage.index, "teacher": stage.teacher_name, "student": stage.student.name,
            "run_dir": str(stage.run_dir), "student_parameters": summary.student_parameters,
            "teacher_parameters": summary.teacher_parameters,
            "success_rate": summary.eval.success_rate, "avg_tokens": summary.eval.avg_tokens,
            "success_delta": b.success_delta, "token_reduction_pct": b.token_reduction_pct,
            "meets_target": b.meets_target, "skipped": skipped,
            "seconds": round(seconds if seconds is not None else summary.seconds or 0.0, 1)}
