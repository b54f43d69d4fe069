"""`atlas-distill plan` (and `train --plan`): what fits where, before any weight loads."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..errors import TargetsNotMet, UsageError
from ._common import JsonOpt, OverridesArg, ProfileOpt, out, print_json, reporting_errors

Opt = typer.Option
CPU_NOTE = ("Note: these are live bytes; an option fits when 1.6x them is within the RAM available now. On a CPU, "
            "malloc keeps memory a step freed, so the process's peak RSS ran 4-56 % above the plan in "
            "benchmarks/plan_check.py (median 11 %); trainer.keep_freed_memory=false with "
            "MALLOC_MMAP_THRESHOLD_=131072 in the environment returns it (RSS then within 7 % of the plan) at slower "
            "steps (25-60 % slower than glibc's default, which keep_freed_memory beats by 9-15 %).")
_SHOWN = ("teacher weights", "student weights", "sampling copy", "gradients", "optimizer state", "activations",
          "loss", "generation (KV cache)", "runtime")


def plan(
    overrides: OverridesArg = None,
    teacher: Annotated[str | None, Opt(help="Teacher model spec [teacher_model_name_or_path].",
                                       show_default=False)] = None,
    student: Annotated[str | None, Opt(help="Student model spec [model.model_name_or_path].",
                                       show_default=False)] = None,
    gpus: Annotated[int | None, Opt(min=1, help="GPUs per machine to plan for; default: this machine (its GPUs, "
                                    "else its CPU and RAM).", show_default=False)] = None,
    gpu_memory: Annotated[str | None, Opt("--gpu-memory", help="Memory of each GPU, e.g. 80GB (binary units); "
                                          "needed with --gpus.", show_default=False)] = None,
    profile: ProfileOpt = "default",
    json_out: JsonOpt = False,
) -> None:
    """Estimate per-device memory of a GKD run from the models' configs (no weights load): weights, gradients,
    optimizer state, activations, loss, KV cache, for one device, DDP, FSDP and ZeRO-3, with a verdict each.

    Exit 0 when at least one way of running it fits, 3 when none does (the cheapest change that fits is named).
    """
    from ..config import load_profile

    with reporting_errors(json_out):
        config = load_profile(profile, overrides, {
            "--teacher": ("teacher_model_name_or_path", teacher), "--student": ("model.model_name_or_path", student)})
        code = show_plan(config, gpus=gpus, gpu_memory=gpu_memory, json_out=json_out,
                         teacher_flag=teacher is not None)
    raise typer.Exit(code)


def show_plan(config, *, gpus: int | None, gpu_memory: str | None, json_out: bool,
              teacher_flag: bool = False) -> int:
    """Print the plan of `config`; its exit code: 0 when an option fits, 3 when none does."""
    from ..plan import gib, parse_memory, plan_profile

    if gpus is None and gpu_memory is not None:
        raise UsageError("--gpu-memory needs --gpus.", fix="Pass both, e.g. --gpus 8 --gpu-memory 80GB.")
    if gpus is not None and gpu_memory is None:
        raise UsageError("--gpus needs --gpu-memory, the memory of each GPU.", fix="e.g. --gpus 8 --gpu-memory 80GB.")
    if gpus is None:
        gpus, memory = _this_machine()
    else:
        memory = parse_memory(gpu_memory)
    result = plan_profile(config, device="cuda" if gpus else "cpu", devices=gpus or 1, memory=memory)
    code = 0 if result.fits else TargetsNotMet.exit_code
    if json_out:
        print_json(result.to_dict() | {"exit_code": code})
    else:
        out.print(_table(result))
        out.print(_verdict(result, teacher_flag), markup=False, highlight=False)
        if result.host_ram_bytes:
            out.print(f"Host RAM: under FSDP or ZeRO-3 every process loads both models on the CPU first: "
                      f"{result.devices} x {gib(result.host_ram_bytes / result.devices)} = "
                      f"{gib(result.host_ram_bytes)} per machine.", markup=False, highlight=False)
        if result.device == "cpu":
            out.print(CPU_NOTE, markup=False, highlight=False)
    return code


def _this_machine() -> tuple[int, int | None]:
    """(GPUs, memory of the smallest) when torch sees CUDA GPUs here, else (0, None): the CPU and its RAM."""
    import torch

    if not torch.cuda.is_available():
        return 0, None
    count = torch.cuda.device_count()
    return count, min(torch.cuda.get_device_properties(i).total_memory for i in range(count))


def _table(result) -> Table:
    from ..plan import gib

    w = result.workload
    where = (f"this machine's CPU, {gib(result.memory_bytes)} RAM" if result.device == "cpu" else
             f"{result.devices} GPU{'s' if result.devices > 1 else ''} of {gib(result.memory_bytes)}")
    title = (f"Memory plan: {result.teacher.name} ({_size(result.teacher.parameters)}) -> {result.student.name} "
             f"({_size(result.student.parameters)}) on {where}")
    table = Table(title=title, title_justify="left")
    table.add_column("per device", no_wrap=True)
    for option in result.options:
        table.add_column(option.name, justify="right")
    other = "off" if w.gradient_checkpointing else "on"
    for name in _SHOWN:
        table.add_row(name, *(gib(option.components[name]) for option in result.options))
        if name == "activations":
            table.add_row(f"  (checkpointing {other})", *(gib(o.activations_other_setting) for o in result.options),
                          style="dim")
    table.add_row("peak (phase)", *(f"{gib(o.peak_bytes)} ({o.peak_phase})" for o in result.options), style="bold")
    table.add_row("verdict", *("not supported" if o.unsupported else "fits" if o.fits else "does not fit"
                               for o in result.options), style="bold")
    notes = "; ".join(dict.fromkeys([n for o in result.options for n in o.notes]
                                    + [f"{o.name}: {o.unsupported}" for o in result.options if o.unsupported]))
    if result.device == "cuda":
        notes = "GPUs with native bf16 assumed (Ampere or later)" + (f"; {notes}" if notes else "")
    lengths = "max_length + max_new_tokens" if w.on_policy else "max_length"
    table.caption = (f"batch {w.batch} x {w.seq_len} tokens ({lengths}), gradient checkpointing "
                     f"{'on' if w.gradient_checkpointing else 'off'}, {'chunked' if w.chunked_loss else 'full'} loss, "
                     f"LoRA {'r=' + str(w.lora_rank) if w.lora_rank else 'off'}" + (f"; {notes}" if notes else ""))
    table.caption_justify = "left"
    return table


def _size(parameters: int) -> str:
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e9 else f"{parameters / 1e6:.1f}M"


def _verdict(result, teacher_flag: bool = False) -> str:
    from ..plan import gib

    fitting = [o for o in result.options if o.fits]
    if fitting:
        shown = ", ".join(f"{o.name} ({gib(o.peak_bytes)})" for o in fitting)
        return f"Fits in {gib(result.memory_bytes)}: {shown}."
    if result.fix is None:
        tried = ("a smaller batch, gradient checkpointing, a smaller teacher or LoRA" if result.device == "cpu" else
                 "a smaller batch, gradient checkpointing, a quantized or smaller teacher or LoRA")
        where = "a machine with more RAM" if result.device == "cpu" else "more or larger GPUs"
        return f"Does not fit, even with {tried}. Use {where}."
    fix = result.fix
    overrides = [f"--teacher {o.partition('=')[2]}" if teacher_flag and o.startswith("teacher_model_name_or_path=")
                 else o for o in fix["overrides"]]
    return (f"Does not fit. Cheapest change that fits: {' + '.join(fix['changes'])} -> {fix['option']}, "
            f"{gib(fix['peak_bytes'])} per device: {' '.join(overrides)}")
