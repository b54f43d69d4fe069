"""GPU smoke check (issue 12): what only a GPU can show of the CUDA paths, in stages, each in its own process under
its own timeout, on tiny random models built from a config (no download) and the bundled demo traces.

    python benchmarks/gpu_smoke.py                       # on the GPU (cuda)
    python benchmarks/gpu_smoke.py --device cpu          # the stages that apply on a CPU (part of `make test`)
    python benchmarks/gpu_smoke.py --tokenizer tok.tgz   # a tokenizer directory, or a .tgz of one

Stages:
- single: one process: teacher and student on the device, the student in fp32 master weights under the
  run's mixed precision, the sampling copy (or none), the embeddings' forward hooks constant over on-policy
  steps with gradient checkpointing, >90 % of the weights changed by one step at lr 2e-5, autocast active in
  the chunked loss, teacher-cache hits in a second epoch, `evaluate()`'s metrics, and (cuda) the peak memory of
  the chunked against the full-logits loss at B=4, L=1024;
- quantized (cuda): 8-bit and 4-bit teachers (bitsandbytes): on the GPU, frozen, finite losses over 2 steps;
- fsdp (cuda): `accelerate launch --num_processes 1 --config_file accelerate_configs/fsdp.yaml`: the teacher
  on the GPU, the student evaluated there before training, 3 steps, the student FSDP-managed (fully_shard);
- zero3 (cuda, when deepspeed imports): the same under accelerate_configs/deepspeed_zero3.yaml;
- compare: `compare --model`'s evaluation (evaluate_models) loads the model on the device.

It prints one JSON document {"ok", "device", "gpu", "versions", "stages": {name: {"ok", "checks", "figures",
"seconds", "error"?, "skipped"?}}} on stdout and exits 1 when any check failed (2 on bad arguments).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing it (the GPU machine)

STAGES = ("single", "quantized", "fsdp", "zero3", "compare")
CUDA_ONLY = ("quantized", "fsdp", "zero3")
TIMEOUT = {"single": 300, "quantized": 180, "fsdp": 240, "zero3": 240, "compare": 180}  # seconds per stage
LR = 2e-5


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- models and data


def tokenizer_dir(given: str | None, work: Path) -> Path:
    if given is None:
        from atlas_distill.models import builtin_tokenizer_dir

        return Path(builtin_tokenizer_dir())
    path = Path(given)
    if path.is_dir():
        return path
    with tarfile.open(path) as archive:
        archive.extractall(work / "tokenizer", filter="data")
    return next(p.parent for p in (work / "tokenizer").rglob("tokenizer_config.json"))


def build_model(tokenizer_path: Path, out: Path, *, layers: int, seed: int) -> Path:
    """A tiny random Llama with the tokenizer's full vocabulary, saved with that tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def demo_data(tokenizer, max_length: int = 512):
    from atlas_distill.config import load_profile
    from atlas_distill.data import prepare_for_profile
    from atlas_distill.demo import DEMO_TRACES

    profile = load_profile("demo", [f"trainer.max_length={max_length}"])
    return prepare_for_profile(profile, traces=str(DEMO_TRACES), tokenizer=tokenizer)


def trainer_for(student_dir: Path, teacher_dir: Path, work: Path, *, teacher=None, train_rows=8, eval_rows=2,
                callbacks=(), **settings):
    """An AtlasGKDTrainer as `atlas-distill train` builds one: models through models.load_model, the student in
    its training dtype, the mixed precision from the profile's model.dtype=auto."""
    import torch
    from datasets import Dataset

    from atlas_distill import models
    from atlas_distill.gkd import AtlasGKDTrainer, GKDConfig
    from atlas_distill.gkd.config import mixed_precision

    tokenizer = models.load_tokenizer(student_dir)
    data = demo_data(tokenizer)
    student = models.load_model(student_dir, dtype=models.training_dtype("auto", lora=False), for_training=True)
    teacher = teacher if teacher is not None else models.load_model(teacher_dir, dtype="auto")
    bf16, fp16 = mixed_precision("auto")
    args = dict(output_dir=str(work / "run"), per_device_train_batch_size=2, per_device_eval_batch_size=4,
                max_steps=2, report_to=[], max_new_tokens=8, logging_steps=1, save_strategy="no", disable_tqdm=True,
                max_length=512, seed=3, bf16=bf16, fp16=fp16, learning_rate=LR, lr_scheduler_type="constant",
                weight_decay=0.0, eval_max_sessions=eval_rows, use_cpu=not torch.cuda.is_available())
    args.update(settings)
    return AtlasGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(**args),
                           train_dataset=Dataset.from_list(data.train[:train_rows]),
                           eval_dataset=Dataset.from_list(data.eval[:eval_rows]), processing_class=tokenizer,
                           callbacks=list(callbacks))


def devices(model) -> list[str]:
    return sorted({p.device.type for p in model.parameters()})


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ------------------------------------------------------------------------------------------------------ stages


class Report:
    def __init__(self) -> None:
        self.checks: dict[str, bool] = {}
        self.figures: dict[str, object] = {}

    def check(self, name: str, ok: bool, **figures) -> None:
        self.checks[name] = bool(ok)
        self.figures.update(figures)
        log(f"  {'ok  ' if ok else 'FAIL'} {name} {figures or ''}")


def stage_single(device: str, tok: Path, work: Path, report: Report) -> None:
    import torch
    from transformers import TrainerCallback

    from atlas_distill.gkd import divergence

    student_dir = build_model(tok, work / "student", layers=2, seed=1)
    teacher_dir = build_model(tok, work / "teacher", layers=3, seed=2)

    # on-policy steps with gradient checkpointing, generating from the student itself (no copy): hooks, updates
    hooks: list[int] = []

    class CountHooks(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            hooks.append(len(trainer.accelerator.unwrap_model(trainer.model).get_input_embeddings()._forward_hooks))

    autocast: list[bool] = []
    original = divergence.completion_hidden

    def spy(model, inputs, mask):
        autocast.append(torch.is_autocast_enabled(device))
        return original(model, inputs, mask)

    divergence.completion_hidden = spy
    trainer = trainer_for(student_dir, teacher_dir, work / "a", callbacks=[CountHooks()], lmbda=1.0, max_steps=3,
                          gradient_checkpointing=True, generation_dtype="float32")
    student = trainer.accelerator.unwrap_model(trainer.model)
    report.check("models_on_device", devices(student) == devices(trainer.teacher_model) == [device],
                 student_device=devices(student), teacher_device=devices(trainer.teacher_model))
    report.check("student_fp32_masters", student.dtype == torch.float32, student_dtype=str(student.dtype),
                 teacher_dtype=str(trainer.teacher_model.dtype), mixed_precision="bf16" if trainer.args.bf16 else
                 "fp16" if trainer.args.fp16 else "no")
    before = [p.detach().float().clone() for p in student.parameters()]
    trainer.train()
    after = list(student.parameters())
    changed = sum((a.detach().float() != b).sum().item() for a, b in zip(after, before))
    changed /= sum(b.numel() for b in before)
    report.check("hooks_constant", len(hooks) == 3 and len(set(hooks)) == 1, hooks_per_step=hooks)
    report.check("weights_updated", changed > 0.9, changed_fraction=round(changed, 4))
    report.check("autocast_in_loss", bool(autocast) and all(a == trainer.args.bf16 for a in autocast),
                 autocast_seen=sorted(set(autocast)))
    report.check("losses_finite", all(math.isfinite(x) for x in losses(trainer)), losses=losses(trainer))
    divergence.completion_hidden = original

    # evaluate(): the generation metrics
    metrics = trainer.evaluate()
    names = ("eval_success_rate", "eval_step_success_rate", "eval_episode_success_rate", "eval_avg_tokens")
    report.check("evaluate_metrics", all(isinstance(metrics.get(n), (int, float)) for n in names),
                 eval_metrics={n: metrics.get(n) for n in names})

    # the sampling copy "auto" chooses for this device and precision
    auto = trainer_for(student_dir, teacher_dir, work / "b", lmbda=1.0)
    report.figures["sampling_auto"] = str(auto.generation_dtype)

    # the teacher cache: a second epoch over the same examples reads it
    cached = trainer_for(student_dir, teacher_dir, work / "c", lmbda=0.0, max_steps=-1, num_train_epochs=2,
                         train_rows=4)
    cached.train()
    cache = cached.teacher_cache
    report.check("teacher_cache_hits", cache is not None and cache.hits > 0,
                 cache_hits=cache.hits if cache else None, cache_misses=cache.misses if cache else None)

    if device == "cuda":
        report.figures.update(loss_peak_memory(trainer))
        report.check("chunked_loss_less_memory", report.figures["chunked_peak_mb"] < report.figures["full_peak_mb"])


def loss_peak_memory(trainer, batch: int = 4, length: int = 1024) -> dict[str, float]:
    """Peak GPU memory of one loss forward + backward, chunked against full logits, at B x L tokens all targets."""
    import torch

    figures = {}
    vocab = trainer.shared_vocab
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=generator).cuda()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    inputs["labels"][:, : length // 4] = -100
    keep = trainer.chunked_loss, trainer.teacher_cache
    trainer.teacher_cache = None
    for name, chunked in (("chunked", True), ("full", False)):
        trainer.chunked_loss = chunked
        trainer.model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        torch.cuda.synchronize()
        figures[f"{name}_peak_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        figures[f"{name}_loss"] = round(loss.item(), 5)
    trainer.chunked_loss, trainer.teacher_cache = keep
    trainer.model.zero_grad(set_to_none=True)
    figures["loss_memory_shape"] = f"B={batch} L={length} V={vocab}"
    return figures


def stage_quantized(device: str, tok: Path, work: Path, report: Report) -> None:
    from atlas_distill import models

    student_dir = build_model(tok, work / "student", layers=2, seed=1)
    teacher_dir = build_model(tok, work / "teacher", layers=3, seed=2)
    for bits in (8, 4):
        teacher = models.load_model(teacher_dir, load_in_8bit=bits == 8, load_in_4bit=bits == 4)
        trainer = trainer_for(student_dir, teacher_dir, work / f"q{bits}", teacher=teacher, lmbda=0.5, max_steps=2)
        frozen = not any(p.requires_grad for p in trainer.teacher_model.parameters())
        loaded = getattr(trainer.teacher_model, f"is_loaded_in_{bits}bit", False)
        trainer.train()
        report.check(f"teacher_{bits}bit", loaded and frozen and devices(trainer.teacher_model) == ["cuda"]
                     and len(losses(trainer)) == 2 and all(math.isfinite(x) for x in losses(trainer)),
                     **{f"teacher_{bits}bit_losses": losses(trainer),
                        f"teacher_{bits}bit_device": devices(trainer.teacher_model)})


def stage_launched(config: str, device: str, tok: Path, work: Path, report: Report) -> None:
    """The sharded stages: this script again under `accelerate launch`, one process."""
    out = work / "launched.json"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--config_file",
               str(ROOT / "accelerate_configs" / config), __file__, "--worker", config, "--device", device,
               "--tokenizer", str(tok), "--work", str(work), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT["fsdp"] - 20)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"accelerate launch exited {done.returncode}: {done.stderr[-3000:]}")
    launched = json.loads(out.read_text())
    for name, ok in launched["checks"].items():
        report.check(name, ok)
    report.figures.update(launched["figures"])


def launched_worker(config: str, device: str, tok: Path, work: Path, out: Path) -> None:
    report = Report()
    student_dir = build_model(tok, work / "student", layers=2, seed=1)
    teacher_dir = build_model(tok, work / "teacher", layers=3, seed=2)
    trainer = trainer_for(student_dir, teacher_dir, work / "w", lmbda=0.5, max_steps=3)
    sharded = trainer.is_fsdp_enabled if config == "fsdp.yaml" else trainer.zero3
    report.check("sharded_run", sharded, fsdp=trainer.is_fsdp_enabled, zero3=trainer.zero3)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    if config == "fsdp.yaml":
        report.check("teacher_on_gpu", devices(teacher) == [device], teacher_device=devices(teacher))
    rows = trainer.eval_dataset
    before = trainer.evaluate_model(trainer.model, list(rows["messages"]), list(rows["reference"]),
                                    list(rows["targets"]))
    student = trainer.accelerator.unwrap_model(trainer.model)
    report.check("student_evaluated_on_gpu", devices(student) == [device], student_device_before=devices(student),
                 student_before_success=before.success_rate)
    trainer.train()
    if config == "fsdp.yaml":
        from torch.distributed.fsdp import FSDPModule

        managed = isinstance(trainer.accelerator.unwrap_model(trainer.model_wrapped), FSDPModule) or any(
            isinstance(m, FSDPModule) for m in trainer.model.modules())
        report.check("student_fsdp_managed", managed)
    report.check("three_steps_finite", trainer.state.global_step == 3 and
                 all(math.isfinite(x) for x in losses(trainer)), launched_losses=losses(trainer))
    metrics = trainer.evaluate()
    report.check("launched_evaluate", isinstance(metrics.get("eval_success_rate"), (int, float)))
    if trainer.accelerator.is_main_process:
        out.write_text(json.dumps({"checks": report.checks, "figures": report.figures}))


def stage_compare(device: str, tok: Path, work: Path, report: Report) -> None:
    from atlas_distill import models
    from atlas_distill.config import load_profile
    from atlas_distill.demo import DEMO_TRACES
    from atlas_distill.evaluate import models as evaluate_models_module

    student_dir = build_model(tok, work / "student", layers=2, seed=1)
    loaded: list[list[str]] = []
    load = models.load_model

    def recording(*args, **kwargs):
        model = load(*args, **kwargs)
        loaded.append(devices(model))
        return model

    models.load_model = recording
    try:
        profile = load_profile("demo", ["trainer.eval_max_sessions=2", "trainer.max_new_tokens=8"])
        [evaluation] = evaluate_models_module.evaluate_models([str(student_dir)], profile, str(DEMO_TRACES))
    finally:
        models.load_model = load
    report.check("compare_model_on_device", loaded == [[device]], compare_device=loaded,
                 compare_tokens_per_second=round(evaluation.tokens_per_second or 0, 1),
                 compare_step_success=evaluation.result.step_success_rate)


# ------------------------------------------------------------------------------------------------------- driver


def run_stage(name: str, device: str, tok: Path, work: Path) -> dict:
    report, started = Report(), time.perf_counter()
    entry: dict = {}
    try:
        if name == "single":
            stage_single(device, tok, work, report)
        elif name == "quantized":
            stage_quantized(device, tok, work, report)
        elif name == "fsdp":
            stage_launched("fsdp.yaml", device, tok, work, report)
        elif name == "zero3":
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                entry["skipped"] = "deepspeed is not installed (pip install deepspeed)"
            else:
                stage_launched("deepspeed_zero3.yaml", device, tok, work, report)
        elif name == "compare":
            stage_compare(device, tok, work, report)
    except Exception as exc:  # noqa: BLE001 - a stage's failure is reported in the JSON, the next stage runs
        import traceback

        entry["error"] = f"{type(exc).__name__}: {exc}"
        log(traceback.format_exc())
    entry.update(ok="error" not in entry and all(report.checks.values()), checks=report.checks,
                 figures=report.figures, seconds=round(time.perf_counter() - started, 1))
    return entry


def environment(device: str) -> dict:
    import importlib.metadata as metadata

    import torch

    versions = {}
    for package in ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "bitsandbytes", "deepspeed"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    return {"device": device, "gpu": gpu, "versions": versions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of: " + ", ".join(STAGES))
    parser.add_argument("--tokenizer", help="a tokenizer directory or a .tgz of one (default: the builtin's)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # one stage, in this process (the driver's child)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the launched stages' worker
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the JSON document here, after every stage")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    stages = [s for s in args.stages.split(",") if s]
    if unknown := [s for s in stages if s not in STAGES]:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(json.dumps({"ok": False, "device": "cuda", "error": "no CUDA GPU here; run with --device cpu"}))
            return 1

    if args.worker:
        launched_worker(args.worker, args.device, Path(args.tokenizer), Path(args.work), Path(args.out))
        return 0
    if args.stage:
        work = Path(args.work)
        print(json.dumps(run_stage(args.stage, args.device, Path(args.tokenizer), work)))
        return 0

    document: dict = {"ok": True, **environment(args.device), "stages": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        work = Path(tmp)
        tok = tokenizer_dir(args.tokenizer, work)
        for name in stages:
            if args.device == "cpu" and name in CUDA_ONLY:
                document["stages"][name] = {"ok": True, "skipped": "needs a CUDA GPU", "checks": {}}
                continue
            log(f"stage {name}")
            command = [sys.executable, __file__, "--stage", name, "--device", args.device, "--tokenizer", str(tok),
                       "--work", str(work / name)]
            try:
                done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=TIMEOUT[name])
                lines = done.stdout.strip().splitlines()
                entry = json.loads(lines[-1]) if lines else {"ok": False, "error": f"exit {done.returncode}"}
            except subprocess.TimeoutExpired:
                entry = {"ok": False, "error": f"timed out after {TIMEOUT[name]} s"}
            except json.JSONDecodeError:
                entry = {"ok": False, "error": f"exit {done.returncode}, no result"}
            document["stages"][name] = entry
            document["ok"] = document["ok"] and entry["ok"]
            if args.out:  # what was found so far survives a kill of the whole run
                Path(args.out).write_text(json.dumps(document, indent=1))
    print(json.dumps(document, indent=1))
    return 0 if document["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
