"""One GKD run, start to finish: resolve models, load data, measure the baseline, train, evaluate, save.

`run_training` is what `atlas-distill train` calls. It never prints: it reports
through `on_event(kind, data)` (kinds: "line" for the upstream console lines,
"log" for each metrics record, "stage" for phases) and returns a TrainResult.

Under `torchrun` / `accelerate launch` every process runs all of it: each trains on its
share of every batch and generates on its share of the eval sessions; only the main
process reports events and writes files (run directory, profile.yaml, summary.json,
final/, the model card); checks that only it makes are shared with the others (`_on_main`),
so that every process stops with the same error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import Profile, profile_to_yaml
from .demo import DEMO_TRACES
from .errors import AtlasDistillError, OutputError, TrainingError, UsageError
from .outputs import (FREE_SPACE_FIX, check_free_space, check_writable_dir, ensure_writable_dir,
                      last_complete_checkpoint, remove_incomplete_checkpoints, write_json)
from .progress import Event
from .summary import Figures, RunSummary


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    summary: RunSummary


def _prepare_run_dir(profile: Profile, profile_name: str, resume: bool, emit: Event) -> tuple[Path, str | None]:
    """(run directory, checkpoint to resume from); main process only. Half-written checkpoints are removed."""
    from .tracking import rewind_metrics

    name = profile.run_name or f"{Path(profile_name).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(profile.output_dir) / name
    checkpoint = None
    if resume:
        for removed in remove_incomplete_checkpoints(run_dir):
            emit("line", f"Removed the incomplete checkpoint {removed} (the run stopped while writing it)")
        checkpoint = _last_checkpoint(run_dir)
        if checkpoint is None:
            raise UsageError(f"--resume: {run_dir} holds no checkpoint to continue.",
                             fix="Check --output-dir and --run-name, or start the run without --resume.")
        rewind_metrics(run_dir, _state(checkpoint)["global_step"])
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise UsageError(f"The run directory {run_dir} already holds a run.",
                         fix="Pass --resume to continue it, or choose another --run-name.")
    else:  # the run directory is made when the run starts (_start_run_dir): a failed check leaves nothing
        check_writable_dir(run_dir.parent, "output directory",
                           fix="Choose a writable output_dir (--output-dir) or free disk space.")
    return run_dir, checkpoint


def _start_run_dir(run_dir: Path, profile: Profile, student) -> str | None:
    """Main process, once data and models are loaded: the free-space check, then the run directory and its
    profile.yaml. Returns the free-space warning, if any."""
    warning = check_free_space(run_dir, student, profile.trainer.save_total_limit)
    ensure_writable_dir(run_dir, "run directory", fix="Choose a writable output_dir (--output-dir) or free disk space.")
    (run_dir / "profile.yaml").write_text(profile_to_yaml(profile))
    return warning


def _on_main(state, work: Callable[[], Any]) -> Any:
    """Run `work` on the main process only and hand its result, or the error it raised, to every process."""
    if state.num_processes == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None]
    if state.is_main_process:
        try:
            outcome = [("ok", work())]
        except AtlasDistillError as exc:
            outcome = [("error", (type(exc), exc.args, exc.__dict__))]
        except BaseException as exc:
            message = f"The main process failed: {exc!r}"
            broadcast_object_list([("error", (TrainingError, (message,), {"message": message, "fix": None}))])
            raise
    kind, value = broadcast_object_list(outcome)[0]
    if kind == "ok":
        return value
    cls, args, attributes = value
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(attributes)
    raise error


def _process_state():
    """accelerate's PartialState: under torchrun / accelerate launch this joins the process group (gloo on CPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _baseline(profile: Profile, measured: Figures) -> dict[str, Any]:
    t = profile.trainer
    success = measured.success_rate if t.baseline_success == "auto" else t.baseline_success
    tokens = measured.avg_tokens if t.baseline_tokens == "auto" else t.baseline_tokens
    return {"success": success, "tokens": tokens, "success_target": t.success_delta_target,
            "token_target": t.token_reduction_target,
            "source": {"success": "measured" if t.baseline_success == "auto" else "profile",
                       "tokens": "measured" if t.baseline_tokens == "auto" else "profile"}}


def run_training(profile: Profile, *, profile_name: str = "default", db_url: str | None = None,
                 traces: str | None = None, skip_invalid: bool = False, resume: bool = False,
                 on_event: Event | None = None) -> TrainResult:
    from . import models
    from .data import prepare_for_profile
    from .evaluate import baseline_summary, format_baseline_line, format_reference_line
    from .tracking import RunTracker, prepare_wandb

    started = time.perf_counter()
    state = _process_state()
    emit = (on_event or (lambda kind, data: None)) if state.is_main_process else (lambda kind, data: None)
    teacher_spec = models.resolve_model_spec(profile.teacher_model_name_or_path, profile.model.family)
    student_spec = models.resolve_model_spec(profile.model.model_name_or_path, profile.model.family)
    run_dir, checkpoint = _on_main(state, lambda: _prepare_run_dir(profile, profile_name, resume, emit))
    run_dir = Path(run_dir)

    emit("stage", "Preparing models (first use builds converted, specialised or pruned models into the cache)")
    with state.main_process_first():  # the main process builds into the cache, the others then read it
        def prepare(phase: str, done: int, total: int | None) -> None:
            emit("prepare", (phase, done, total))

        teacher_path = models.materialize(teacher_spec, prepare)
        student_path = models.materialize(student_spec, prepare)
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
    warning = _on_main(state, lambda: _start_run_dir(run_dir, profile, student))
    if warning:
        emit("line", warning)

    from datasets import Dataset

    from .gkd import AtlasGKDTrainer
    from .gkd.config import from_profile

    eval_rows = prepared.eval_sample(profile.trainer.eval_max_sessions)
    timings["load"] = time.perf_counter() - started - sum(timings.values())
    report_to = prepare_wandb(run_dir, list(profile.trainer.report_to))
    tracker = RunTracker(run_dir, on_log=lambda record: emit("log", record),
                         on_step=lambda step, total: emit("step", (step, total)))
    trainer = AtlasGKDTrainer(
        model=student, teacher_model=teacher, args=from_profile(profile, run_dir, report_to),
        train_dataset=Dataset.from_list(prepared.train), eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tokenizer, callbacks=[tracker])
    trainer.on_evaluation = lambda ev: ev["summary"] and emit("line", "  " + format_baseline_line(ev["summary"]))
    _quiet_console(trainer)

    emit("stage", "Evaluating teacher and student before training")
    teacher_eval, before = _before_training(trainer, state, run_dir, eval_rows, resume=checkpoint is not None,
                                            key={"teacher": teacher_spec.name, "student": student_spec.name,
                                                 "max_new_tokens": profile.trainer.max_new_tokens,
                                                 "scorer": profile.trainer.scorer, "targets": profile.data.targets,
                                                 "prompt": profile.data.prompt})
    baseline = _baseline(profile, before)
    trainer.args.baseline_success, trainer.args.baseline_tokens = baseline["success"], baseline["tokens"]
    emit("line", format_reference_line(baseline["success"], baseline["tokens"]))
    # upstream's order: the reference line, then this one
    emit("line", f"AtlasGKDTrainer initialized with lmbda={profile.trainer.lmbda}, beta={profile.trainer.beta}")
    timings["evaluate_before"] = time.perf_counter() - started - sum(timings.values())

    emit("stage", "Training")
    try:
        if checkpoint and _finished(checkpoint, trainer.args.max_steps):
            # transformers resumes a finished run with one step too many; restore it instead
            from transformers import TrainerState

            trainer._load_from_checkpoint(checkpoint)
            trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        else:
            if checkpoint:
                emit("line", f"Resuming from {Path(checkpoint).name} (step {_state(checkpoint)['global_step']} "
                             f"of {trainer.args.max_steps if trainer.args.max_steps > 0 else 'the epochs'})")
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
    _save_final(trainer, tokenizer, final_dir, state)
    timings["final_eval_and_save"] = time.perf_counter() - started - sum(timings.values())
    summary = RunSummary(
        run_dir=str(run_dir), final_dir=str(final_dir), profile=profile_name,
        teacher=teacher_spec.name, student=student_spec.name,
        teacher_parameters=models.count_parameters(teacher), student_parameters=models.count_parameters(student),
        data=prepared.stats.to_dict() | {"eval_used": len(eval_rows)},
        teacher_eval=teacher_eval, student_before=before, eval=after.figures(), eval_loss=eval_loss,
        baseline=baseline_summary(after, baseline["success"], baseline["tokens"],
                                  success_target=baseline["success_target"], token_target=baseline["token_target"]),
        steps=trainer.state.global_step, processes=state.num_processes,
        seconds=round(time.perf_counter() - started, 1), timings={k: round(v, 1) for k, v in timings.items()},
        train_loss=next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None))
    summary.baseline.source = baseline["source"]
    if state.is_main_process:
        write_json(run_dir / "summary.json", summary.to_dict())
        _write(final_dir / "README.md", _model_card(summary, profile))
        _write(final_dir / "profile.yaml", profile_to_yaml(profile))  # a copied final/ keeps its configuration
    state.wait_for_everyone()
    closing = format_baseline_line(summary.baseline)
    if not (last["summary"] and format_baseline_line(last["summary"]) == closing):
        emit("line", closing)  # unless the final evaluation's own line already said it
    return TrainResult(run_dir, final_dir, summary)


def _before_training(trainer, state, run_dir: Path, rows: list[dict], *, resume: bool,
                     key: dict[str, Any]) -> tuple[Figures, Figures]:
    """(teacher, student) success rates and avg_tokens before training; a resumed run reads them back from
    before_training.json rather than generating again (the student is loaded from its checkpoint later)."""
    import json

    path = run_dir / "before_training.json"
    key = key | {"sessions": [row["session_id"] for row in rows]}
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return Figures.from_dict(saved["teacher_eval"]), Figures.from_dict(saved["student_before"])
    conversations, references = [r["messages"] for r in rows], [r["reference"] for r in rows]
    targets = [r.get("targets") for r in rows]
    measured = [trainer.evaluate_model(model, conversations, references, targets).figures()
                for model in (trainer.teacher_model, trainer.model)]
    if state.is_main_process:
        write_json(path, {"key": key, "teacher_eval": measured[0].to_dict(), "student_before": measured[1].to_dict()})
    return measured[0], measured[1]


def _quiet_console(trainer) -> None:
    """The CLI renders progress; transformers' own printers would write log dicts to stdout."""
    from transformers import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _save_final(trainer, tokenizer, final_dir: Path, state) -> None:
    """A plain checkpoint that AutoModelForCausalLM loads: LoRA adapters are merged first. Written once: by
    the main process, or through trainer.save_model where FSDP / DeepSpeed must gather the sharded weights."""
    from .outputs import write_failure

    try:
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            trainer.save_model(str(final_dir))
        elif state.is_main_process:
            model = trainer.accelerator.unwrap_model(trainer.model)
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
            model.save_pretrained(final_dir, safe_serialization=True)
        if state.is_main_process:
            tokenizer.save_pretrained(final_dir)
    except Exception as exc:  # noqa: BLE001 - a full disk is an OutputError, anything else stays itself
        raise (write_failure(exc, final_dir) or exc) from None
    state.wait_for_everyone()


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise OutputError(f"Cannot write {path}: {exc.strerror}.", fix=FREE_SPACE_FIX) from None


def _last_checkpoint(run_dir: Path) -> str | None:
    """The newest whole checkpoint (one with trainer_state.json, which transformers writes last)."""
    last = last_complete_checkpoint(Path(run_dir))
    return str(last) if last else None


def _state(checkpoint: str) -> dict[str, Any]:
    import json

    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


def _finished(checkpoint: str, max_steps: int) -> bool:
    return max_steps > 0 and _state(checkpoint).get("global_step", 0) >= max_steps


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


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _rates(figures: Figures) -> str:
    return (f"{figures.success_rate:.2%} ({_percent(figures.step_success_rate)} / "
            f"{_percent(figures.episode_success_rate)})")


def _model_card(summary: RunSummary, profile: Profile) -> str:
    b, e, loss = summary.baseline, summary.eval, summary.eval_loss
    reduction = "n/a" if b.token_reduction_pct is None else f"{b.token_reduction_pct:.1f}%"
    return (
        f"# {summary.student} distilled from {summary.teacher} with GKD\n\n"
        f"Trained by atlas-distill on Atlas traces ({summary.data['train']} train / "
        f"{summary.data['eval']} eval conversations), {summary.steps} steps, "
        f"lmbda={profile.trainer.lmbda}, beta={profile.trainer.beta}, temperature={profile.trainer.temperature}.\n\n"
        "| metric | value |\n| --- | --- |\n"
        f"| eval/success_rate (final answer) | {e.success_rate:.2%} |\n"
        f"| eval/step_success_rate | {_percent(e.step_success_rate)} |\n"
        f"| eval/episode_success_rate | {_percent(e.episode_success_rate)} |\n"
        f"| eval/avg_tokens (per episode) | {e.avg_tokens:.1f} |\n"
        f"| eval/loss | {loss if loss is None else round(loss, 4)} |\n"
        f"| teacher success_rate (step / episode) | {_rates(summary.teacher_eval)} |\n"
        f"| student before training (step / episode) | {_rates(summary.student_before)} |\n"
        f"| metrics/success_delta | {b.success_delta_pp:+.1f} pp |\n"
        f"| metrics/token_reduction_pct | {reduction} |\n| metrics/meets_target | {b.meets_target} |\n\n"
        "Load it with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` on this folder.\n"
        "The resolved profile is `profile.yaml` here (as `../profile.yaml`); metrics per step are in "
        "`../metrics.jsonl`.\n"
    )
