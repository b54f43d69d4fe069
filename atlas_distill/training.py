"""One GKD run, start to finish: resolve models, load data, measure the baseline, train, evaluate, save.

`run_training` is what `atlas-distill train` calls. It never prints: it reports
through `on_event(kind, data)` (kinds: "line" for the upstream console lines,
"log" for each metrics record, "stage" for phases) and returns a TrainResult.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import Profile, profile_to_yaml
from .errors import TrainingError, UsageError
from .outputs import ensure_writable_dir, write_json
from .demo import DEMO_TRACES

Event = Callable[[str, Any], None]


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    summary: dict[str, Any]


def _run_dir(profile: Profile, profile_name: str, resume: bool) -> Path:
    name = profile.run_name or f"{Path(profile_name).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(profile.output_dir) / name
    if resume and _last_checkpoint(run_dir) is None:
        raise UsageError(f"--resume: {run_dir} holds no checkpoint to continue.",
                         fix="Check --output-dir and --run-name, or start the run without --resume.")
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise UsageError(f"The run directory {run_dir} already holds a run.",
                         fix="Pass --resume to continue it, or choose another --run-name.")
    return ensure_writable_dir(run_dir, "run directory",
                               fix="Choose a writable output_dir (--output-dir) or free disk space.")


def _gkd_args(profile: Profile, run_dir: Path, report_to: list[str]):
    import torch

    from .gkd import GKDConfig

    t = profile.trainer
    bf16 = profile.model.dtype == "bfloat16" or (
        profile.model.dtype == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return GKDConfig(
        output_dir=str(run_dir), run_name=run_dir.name, report_to=report_to, seed=t.seed,
        per_device_train_batch_size=t.per_device_train_batch_size, per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, logging_steps=t.logging_steps,
        eval_strategy="steps", eval_steps=t.eval_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, lmbda=t.lmbda, beta=t.beta, temperature=t.temperature,
        max_new_tokens=t.max_new_tokens, seq_kd=t.seq_kd, max_length=t.max_length,
        gradient_checkpointing=profile.model.gradient_checkpointing, bf16=bf16, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, save_only_model=False,
    )


def _baseline(profile: Profile, measured: dict[str, float] | None) -> dict[str, Any]:
    t = profile.trainer
    success = measured["success_rate"] if t.baseline_success == "auto" else t.baseline_success
    tokens = measured["avg_tokens"] if t.baseline_tokens == "auto" else t.baseline_tokens
    return {"success": success, "tokens": tokens, "success_target": t.success_delta_target,
            "token_target": t.token_reduction_target,
            "source": {"success": "measured" if t.baseline_success == "auto" else "profile",
                       "tokens": "measured" if t.baseline_tokens == "auto" else "profile"}}


def run_training(profile: Profile, *, profile_name: str = "default", db_url: str | None = None,
                 traces: str | None = None, skip_invalid: bool = False, resume: bool = False,
                 on_event: Event | None = None) -> TrainResult:
    from . import models
    from .data import prepare_for_profile
    from .evaluate import (compute_baseline_summary, evaluate_conversations, format_baseline_line,
                           format_reference_line)
    from .tracking import RunTracker, prepare_wandb

    emit = on_event or (lambda kind, data: None)
    started = time.perf_counter()
    teacher_spec = models.resolve_model_spec(profile.teacher_model_name_or_path, profile.model.family)
    student_spec = models.resolve_model_spec(profile.model.model_name_or_path, profile.model.family)
    run_dir = _run_dir(profile, profile_name, resume)
    (run_dir / "profile.yaml").write_text(profile_to_yaml(profile))

    emit("stage", "Preparing models (first use builds converted, specialised or pruned models into the cache)")
    teacher_path, student_path = models.materialize(teacher_spec), models.materialize(student_spec)
    timings = {"prepare_models": time.perf_counter() - started}
    trust = profile.model.trust_remote_code
    tokenizer = models.load_tokenizer(student_path, trust_remote_code=trust)
    teacher_tokenizer = models.load_tokenizer(teacher_path, trust_remote_code=trust)
    models.shared_vocab_size(tokenizer, teacher_tokenizer)

    emit("stage", "Loading traces")
    if db_url is None and traces is None:
        traces = str(DEMO_TRACES)
    prepared = prepare_for_profile(profile, db_url=db_url, traces=traces, tokenizer=tokenizer,
                                   skip_invalid=skip_invalid)
    emit("line", f"Loaded datasets: train={len(prepared.train)}, eval={len(prepared.eval)} conversations")

    emit("stage", "Loading models")
    init = profile.teacher_model_init_kwargs
    teacher = models.load_model(teacher_path, dtype=init.dtype, trust_remote_code=trust,
                                load_in_8bit=init.load_in_8bit, load_in_4bit=init.load_in_4bit)
    student = models.load_model(student_path, dtype=profile.model.dtype, trust_remote_code=trust, for_training=True)
    models.shared_vocab_size(tokenizer, teacher_tokenizer, student, teacher)
    student = models.apply_lora(student, profile.model.lora)

    from datasets import Dataset

    eval_rows = prepared.eval_sample(profile.trainer.eval_max_sessions)
    eval_kwargs = dict(scorer=profile.trainer.scorer, max_new_tokens=profile.trainer.max_new_tokens,
                       batch_size=profile.trainer.per_device_eval_batch_size)
    conversations, references = [r["messages"] for r in eval_rows], [r["reference"] for r in eval_rows]
    timings["load"] = time.perf_counter() - started - sum(timings.values())
    emit("stage", "Evaluating teacher and student before training")
    teacher_eval = evaluate_conversations(teacher, tokenizer, conversations, references, **eval_kwargs)
    before = evaluate_conversations(student, tokenizer, conversations, references, **eval_kwargs)
    baseline = _baseline(profile, {"success_rate": before.success_rate, "avg_tokens": before.avg_tokens})
    emit("line", format_reference_line(baseline["success"], baseline["tokens"]))
    timings["evaluate_before"] = time.perf_counter() - started - sum(timings.values())

    from .gkd import AtlasGKDTrainer

    report_to = prepare_wandb(run_dir, list(profile.trainer.report_to))
    tracker = RunTracker(run_dir, on_log=lambda record: emit("log", record),
                         on_step=lambda step, total: emit("step", (step, total)))
    trainer = AtlasGKDTrainer(
        model=student, teacher_model=teacher, args=_gkd_args(profile, run_dir, report_to),
        train_dataset=Dataset.from_list(prepared.train), eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tokenizer, offpolicy_warmup_steps=profile.trainer.offpolicy_warmup_steps,
        offpolicy_warmup_beta=profile.trainer.offpolicy_warmup_beta, scorer=profile.trainer.scorer,
        baseline=baseline, callbacks=[tracker],
        on_evaluation=lambda ev: ev["summary"] and emit("line", "  " + format_baseline_line(ev["summary"])))
    _quiet_console(trainer)
    emit("line", f"AtlasGKDTrainer initialized with lmbda={profile.trainer.lmbda}, beta={profile.trainer.beta}")
    emit("stage", "Training")
    checkpoint = _last_checkpoint(run_dir) if resume else None
    try:
        if checkpoint and _finished(checkpoint, trainer.args.max_steps):
            # transformers resumes a finished run with one step too many; restore it instead
            from transformers import TrainerState

            trainer._load_from_checkpoint(checkpoint)
            trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        else:
            trainer.train(resume_from_checkpoint=checkpoint)
    except RuntimeError as exc:
        raise _training_failure(exc) from None

    timings["train"] = time.perf_counter() - started - sum(timings.values())
    last = trainer.last_generation_eval
    if last is None or last["step"] != trainer.state.global_step:  # the last step was not an eval step
        emit("stage", "Final evaluation")
        trainer.evaluate()
        last = trainer.last_generation_eval
    after = last["result"]
    eval_loss = next((h["eval_loss"] for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    final_dir = run_dir / "final"
    _save_final(trainer, tokenizer, final_dir)
    timings["final_eval_and_save"] = time.perf_counter() - started - sum(timings.values())
    summary = {
        "run_dir": str(run_dir), "final_dir": str(final_dir), "profile": profile_name,
        "teacher": teacher_spec.name, "student": student_spec.name,
        "teacher_parameters": models.count_parameters(teacher), "student_parameters": models.count_parameters(student),
        "data": prepared.stats.to_dict() | {"eval_used": len(eval_rows)},
        "teacher_eval": {"success_rate": teacher_eval.success_rate, "avg_tokens": teacher_eval.avg_tokens},
        "student_before": {"success_rate": before.success_rate, "avg_tokens": before.avg_tokens},
        "eval": {"success_rate": after.success_rate, "avg_tokens": after.avg_tokens,
                 "loss": eval_loss},
        "baseline": compute_baseline_summary(after, baseline["success"], baseline["tokens"],
                                             success_target=baseline["success_target"],
                                             token_target=baseline["token_target"]) | {"source": baseline["source"]},
        "steps": trainer.state.global_step, "seconds": round(time.perf_counter() - started, 1),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "train_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
    }
    write_json(run_dir / "summary.json", summary)
    (final_dir / "README.md").write_text(_model_card(summary, profile))
    emit("line", format_baseline_line(summary["baseline"]))
    return TrainResult(run_dir, final_dir, summary)


def _quiet_console(trainer) -> None:
    """The CLI renders progress; transformers' own printers would write log dicts to stdout."""
    from transformers import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _save_final(trainer, tokenizer, final_dir: Path) -> None:
    """A plain checkpoint that AutoModelForCausalLM loads: LoRA adapters are merged first."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(final_dir, safe_serialization=True)
    tokenizer.save_pretrained(final_dir)


def _last_checkpoint(run_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None


def _finished(checkpoint: str, max_steps: int) -> bool:
    import json

    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return max_steps > 0 and state.get("global_step", 0) >= max_steps


def _training_failure(exc: RuntimeError) -> TrainingError:
    text = str(exc)
    if "out of memory" in text.lower() or "DefaultCPUAllocator" in text:
        return TrainingError(
            f"Out of memory during training: {text.splitlines()[0]}",
            fix="Set trainer.per_device_train_batch_size=2 with trainer.gradient_accumulation_steps=8, keep "
            "model.gradient_checkpointing=true, load the teacher in 8-bit "
            "(teacher_model_init_kwargs.load_in_8bit=true, CUDA only), or use a smaller teacher.")
    return TrainingError(f"Training failed: {text.splitlines()[0] if text else type(exc).__name__}",
                         fix="Rerun with ATLAS_DISTILL_DEBUG=1 for the traceback.")


def _model_card(summary: dict[str, Any], profile: Profile) -> str:
    b, e = summary["baseline"], summary["eval"]
    reduction = "n/a" if b["token_reduction_pct"] is None else f"{b['token_reduction_pct']:.1f}%"
    return (
        f"# {summary['student']} distilled from {summary['teacher']} with GKD\n\n"
        f"Trained by atlas-distill on Atlas traces ({summary['data']['train']} train / "
        f"{summary['data']['eval']} eval conversations), {summary['steps']} steps, "
        f"lmbda={profile.trainer.lmbda}, beta={profile.trainer.beta}, temperature={profile.trainer.temperature}.\n\n"
        "| metric | value |\n| --- | --- |\n"
        f"| eval/success_rate | {e['success_rate']:.2%} |\n| eval/avg_tokens | {e['avg_tokens']:.1f} |\n"
        f"| eval/loss | {e['loss'] if e['loss'] is None else round(e['loss'], 4)} |\n"
        f"| teacher success_rate | {summary['teacher_eval']['success_rate']:.2%} |\n"
        f"| student before training | {summary['student_before']['success_rate']:.2%} |\n"
        f"| metrics/success_delta | {b['success_delta'] * 100:+.1f} pp |\n"
        f"| metrics/token_reduction_pct | {reduction} |\n| metrics/meets_target | {b['meets_all_targets']} |\n\n"
        "Load it with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` on this folder.\n"
        "The resolved profile is `../profile.yaml`; metrics per step are in `../metrics.jsonl`.\n"
    )
