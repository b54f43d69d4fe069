"""One GKD run, as a recipe: `setup`, `measure_before`, `train`, `finalize`, each a method of `TrainingRecipe`
that reads alone, over a RunDir (run_dir.py) that owns the run directory.

`run_training` is what `atlas-distill train` (and each stage of `chain`) calls. It never
prints: it reports through `on_event(kind, data)` (kinds: "line" for the upstream console
lines, "log" for each metrics record, "stage" for phases, "prepare" and "step" for
progress) and returns a TrainResult.

Under `torchrun` / `accelerate launch` every process runs all of it: each trains on its
share of every batch and generates on its share of the eval sessions; only the main
process reports events and writes files (run directory, profile.yaml, summary.json,
final/, the model card); checks that only it makes are shared with the others (`on_main`),
so that every process stops with the same error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Profile
from .demo import DEMO_TRACES
from .errors import AtlasDistillError, TeacherStoreError, TrainingError, out_of_memory
from .progress import Event
from .runs.layout import RunDir, checkpoint_step
from .runs.summary import Figures, RunSummary, model_card


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    summary: RunSummary


def run_training(profile: Profile, *, profile_name: str = "default", db_url: str | None = None,
                 traces: str | None = None, skip_invalid: bool = False, resume: bool = False,
                 on_event: Event | None = None) -> TrainResult:
    recipe = TrainingRecipe(profile, profile_name=profile_name, on_event=on_event)
    recipe.setup(db_url=db_url, traces=traces, skip_invalid=skip_invalid, resume=resume)
    recipe.measure_before()
    recipe.train()
    return recipe.finalize()


def _quiet(kind: str, data: Any) -> None:
    """Where the other processes' events go: only the main process reports."""


class TrainingRecipe:
    """The phases of one run and what they hand each other (models, data, trainer, figures, timings)."""

    def __init__(self, profile: Profile, *, profile_name: str, on_event: Event | None = None) -> None:
        self.profile, self.profile_name = profile, profile_name
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.state = process_state()
        self.emit: Event = (on_event or _quiet) if self.state.is_main_process else _quiet

    def _timed(self, phase: str) -> None:
        """Record the time since the previous phase ended as `phase`."""
        self.timings[phase] = time.perf_counter() - self.started - sum(self.timings.values())

    def setup(self, *, db_url: str | None, traces: str | None, skip_invalid: bool, resume: bool) -> None:
        """Resolve and prepare the models, load the traces, start the run directory, build the trainer."""
        from datasets import Dataset

        from . import models
        from .data import prepare_for_profile
        from .evaluate import format_baseline_line
        from .gkd import AtlasGKDTrainer
        from .gkd.config import from_profile, mixed_precision
        from .runs.tracking import RunTracker, prepare_wandb

        profile, emit, state = self.profile, self.emit, self.state
        mixed_precision(profile.model.dtype)  # a dtype this machine cannot train in fails before any work
        self.teacher_spec = models.resolve_model_spec(profile.teacher_model_name_or_path, profile.model.family)
        self.student_spec = models.resolve_model_spec(profile.model.model_name_or_path, profile.model.family)
        self.run_dir = RunDir(on_main(state, lambda: RunDir.for_profile(profile, self.profile_name).path))
        self.checkpoint = on_main(state, lambda: self.run_dir.prepare(resume=resume, emit=emit))

        emit("stage", "Preparing models (first use builds converted, specialised or pruned models into the cache)")
        with state.main_process_first():  # the main process builds into the cache, the others then read it
            def prepare(phase: str, done: int, total: int | None) -> None:
                emit("prepare", (phase, done, total))

            teacher_path = models.materialize(self.teacher_spec, prepare)
            student_path = models.materialize(self.student_spec, prepare)
        self._timed("prepare_models")
        trust = profile.model.trust_remote_code
        self.tokenizer = models.load_tokenizer(student_path, trust_remote_code=trust)
        teacher_tokenizer = models.load_tokenizer(teacher_path, trust_remote_code=trust)
        models.shared_vocab_size(self.tokenizer, teacher_tokenizer)

        emit("stage", "Loading traces")
        if db_url is None and traces is None:
            traces = str(DEMO_TRACES)
        self.prepared = prepare_for_profile(profile, db_url=db_url, traces=traces, tokenizer=self.tokenizer,
                                            skip_invalid=skip_invalid)
        emit("line", f"Loaded datasets: train={len(self.prepared.train)}, eval={len(self.prepared.eval)} "
                     "conversations")

        store = self._teacher_store(teacher_path)
        emit("stage", "Loading models")
        init = profile.teacher_model_init_kwargs
        t = profile.trainer
        if store is not None and t.lmbda == 0 and not t.seq_kd:
            from .teacher_store.unloaded import UnloadedTeacher

            teacher = UnloadedTeacher(teacher_path, trust_remote_code=trust)
            emit("line", f"Teacher not loaded: every step is off-policy and reads the teacher store {store.path}")
        else:
            teacher = models.load_teacher(teacher_path, init.dtype, trust_remote_code=trust,
                                          load_in_8bit=init.load_in_8bit, load_in_4bit=init.load_in_4bit)
        student = models.load_model(student_path, trust_remote_code=trust, for_training=True,
                                    dtype=models.training_dtype(profile.model.dtype, lora=profile.model.lora.enabled))
        models.shared_vocab_size(self.tokenizer, teacher_tokenizer, student, teacher)
        student = models.apply_lora(student, profile.model.lora)
        self.parameters = (models.count_parameters(teacher) or models.model_parameters(self.teacher_spec),
                           models.count_parameters(student))
        warning = on_main(state, lambda: self.run_dir.start(profile, student))
        if warning:
            emit("line", warning)

        self.eval_rows = self.prepared.eval_sample(profile.trainer.eval_max_sessions)
        self._timed("load")
        report_to = prepare_wandb(self.run_dir.path, list(profile.trainer.report_to))
        tracker = RunTracker(self.run_dir.path, on_log=lambda record: emit("log", record),
                             on_step=lambda step, total: emit("step", (step, total)))
        self.trainer = AtlasGKDTrainer(
            model=student, teacher_model=teacher, args=from_profile(profile, self.run_dir.path, report_to),
            train_dataset=Dataset.from_list(self.prepared.train), eval_dataset=Dataset.from_list(self.eval_rows),
            processing_class=self.tokenizer, callbacks=[tracker], teacher_store=store)
        self.trainer.on_evaluation = lambda ev: ev["summary"] and emit(
            "line", "  " + format_baseline_line(ev["summary"]))
        _quiet_console(self.trainer)

    def _teacher_store(self, teacher_path: str):
        """trainer.teacher_store opened and checked against this run (teacher, tokenizer, settings, every
        conversation), before any model loads; None without one."""
        path = self.profile.trainer.teacher_store
        if path is None:
            return None
        from .teacher_store.recipe import open_for_run

        if not self.profile.trainer.chunked_loss or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
            raise TeacherStoreError(
                "trainer.teacher_store needs the chunked loss, which this run does not use (trainer.chunked_loss is "
                "off, or DeepSpeed ZeRO-3, under which the trainer computes the full logits).",
                fix="Set trainer.chunked_loss=true and launch with DDP, FSDP or one process, or train without "
                "trainer.teacher_store.")
        self.emit("stage", "Checking the teacher store")
        return open_for_run(path, self.profile, teacher_name=self.teacher_spec.name, teacher_path=teacher_path,
                            tokenizer=self.tokenizer, rows=self.prepared.train + self.prepared.eval)

    def measure_before(self) -> None:
        """Teacher and student before training on the eval sessions, and the baseline the run is judged against;
        a resumed run reads them back from before_training.json rather than generating again."""
        from .evaluate import format_reference_line

        profile, trainer = self.profile, self.trainer
        self.emit("stage", "Evaluating teacher and student before training")
        key = {"teacher": self.teacher_spec.name, "student": self.student_spec.name,
               "max_new_tokens": profile.trainer.max_new_tokens, "scorer": profile.trainer.scorer,
               "targets": profile.data.targets, "prompt": profile.data.prompt,
               "sessions": [row["session_id"] for row in self.eval_rows]}
        saved = self.run_dir.before_training(key) if self.checkpoint is not None else None
        if saved is None:
            rows = self.eval_rows
            conversations, references = [r["messages"] for r in rows], [r["reference"] for r in rows]
            targets = [r.get("targets") for r in rows]
            saved = tuple(trainer.evaluate_model(model, conversations, references, targets).figures()
                          if model is not None else None
                          for model in (trainer.teacher_model if trainer.teacher_loaded else None, trainer.model))
            on_main(self.state, lambda: self.run_dir.save_before_training(key, *saved))
        self.teacher_eval, self.student_before = saved
        self.baseline = _baseline(profile, self.student_before)
        trainer.args.baseline_success, trainer.args.baseline_tokens = self.baseline["success"], self.baseline["tokens"]
        self.emit("line", format_reference_line(self.baseline["success"], self.baseline["tokens"]))
        # upstream's order: the reference line, then this one
        self.emit("line", f"AtlasGKDTrainer initialized with lmbda={profile.trainer.lmbda}, "
                          f"beta={profile.trainer.beta}")
        self._timed("evaluate_before")

    def train(self) -> None:
        """The GKD steps, or the rest of them from the last checkpoint."""
        trainer, checkpoint = self.trainer, self.checkpoint
        self.emit("stage", "Training")
        max_steps = trainer.args.max_steps
        try:
            if checkpoint and max_steps > 0 and checkpoint_step(checkpoint) >= max_steps:
                # transformers resumes a finished run with one step too many; restore it instead (its
                # _load_from_checkpoint loads the weights as resume_from_checkpoint would, wrappers included)
                from transformers import TrainerState

                trainer._load_from_checkpoint(str(checkpoint))
                trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
            else:
                if checkpoint:
                    self.emit("line", f"Resuming from {checkpoint.name} (step {checkpoint_step(checkpoint)} of "
                                      f"{max_steps if max_steps > 0 else 'the epochs'})")
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except RuntimeError as exc:
            raise _training_failure(exc) from None
        self._timed("train")

    def finalize(self) -> TrainResult:
        """The final evaluation (unless the last step was one), final/, the summary and the model card."""
        from .evaluate import baseline_summary, format_baseline_line

        trainer, state, run_dir = self.trainer, self.state, self.run_dir
        last = trainer.last_generation_eval
        if last is None or last["step"] != trainer.state.global_step:  # the last step was not an eval step
            self.emit("stage", "Final evaluation")
            trainer.evaluate()
            last = trainer.last_generation_eval
        after = last["result"]
        history = trainer.state.log_history
        _save_final(trainer, self.tokenizer, run_dir.final, state)
        self._timed("final_eval_and_save")
        b = self.baseline
        summary = RunSummary(
            run_dir=str(run_dir.path), final_dir=str(run_dir.final), profile=self.profile_name,
            teacher=self.teacher_spec.name, student=self.student_spec.name,
            teacher_parameters=self.parameters[0], student_parameters=self.parameters[1],
            data=self.prepared.stats.to_dict() | {"eval_used": len(self.eval_rows)},
            teacher_eval=self.teacher_eval, student_before=self.student_before, eval=after.figures(),
            eval_loss=next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None),
            baseline=baseline_summary(after, b["success"], b["tokens"], success_target=b["success_target"],
                                      token_target=b["token_target"]),
            steps=trainer.state.global_step, processes=state.num_processes,
            seconds=round(time.perf_counter() - self.started, 1),
            timings={k: round(v, 1) for k, v in self.timings.items()},
            train_loss=next((h["loss"] for h in reversed(history) if "loss" in h), None))
        summary.baseline.source = b["source"]
        if state.is_main_process:
            run_dir.write_summary(summary)
            t = self.profile.trainer
            run_dir.write_final_records(model_card(summary, lmbda=t.lmbda, beta=t.beta, temperature=t.temperature),
                                        self.profile)
        state.wait_for_everyone()
        closing = format_baseline_line(summary.baseline)
        if not (last["summary"] and format_baseline_line(last["summary"]) == closing):
            self.emit("line", closing)  # unless the final evaluation's own line already said it
        return TrainResult(run_dir.path, run_dir.final, summary)


def _baseline(profile: Profile, measured: Figures) -> dict[str, Any]:
    t = profile.trainer
    success = measured.success_rate if t.baseline_success == "auto" else t.baseline_success
    tokens = measured.avg_tokens if t.baseline_tokens == "auto" else t.baseline_tokens
    return {"success": success, "tokens": tokens, "success_target": t.success_delta_target,
            "token_target": t.token_reduction_target,
            "source": {"success": "measured" if t.baseline_success == "auto" else "profile",
                       "tokens": "measured" if t.baseline_tokens == "auto" else "profile"}}


def on_main(state, work: Callable[[], Any]) -> Any:
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


def process_state():
    """accelerate's PartialState: under torchrun / accelerate launch this joins the process group (gloo on CPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


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


def _training_failure(exc: RuntimeError) -> TrainingError:
    text = str(exc)
    if out_of_memory(exc):
        return TrainingError(
            f"Out of memory during training: {text.splitlines()[0]}",
            fix="Set trainer.per_device_train_batch_size=2 with trainer.gradient_accumulation_steps=8, keep "
            "model.gradient_checkpointing=true, load the teacher in 8-bit "
            "(teacher_model_init_kwargs.load_in_8bit=true, CUDA only), or use a smaller teacher.")
    return TrainingError(f"Training failed: {text.splitlines()[0] if text else type(exc).__name__}",
                         fix="Rerun with ATLAS_DISTILL_DEBUG=1 for the traceback.")
