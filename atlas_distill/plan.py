"""What a GKD run needs in memory per device, from the models' configs alone: no weights load, torch is not
imported. `atlas-distill plan` and `train --plan` render it.

The estimate is arithmetic on the config (hidden size, layers, heads, vocabulary ...) and the profile (batch,
lengths, checkpointing, LoRA, dtypes, chunked loss), for each way of running the job: one device, DDP, FSDP
(accelerate_configs/fsdp.yaml: the student sharded, the teacher whole on every device) and DeepSpeed ZeRO-3
(both sharded; the full-logits loss, as the trainer uses under ZeRO-3). What it counts:

- weights: the teacher in its dtype (8/4-bit: its linear layers quantized, the rest in bf16); the student's fp32
  master weights (under LoRA the frozen base in the compute dtype and fp32 adapters); the student's bf16
  sampling copy where the trainer makes one (`generation_dtype`), in the generation phase only (the trainer frees
  its weights after each generation);
- gradients and AdamW's two moments of what trains (fp32; bf16 on a CPU under `compact_optimizer`); DDP's gradient
  buckets;
- activations the student's forward keeps for backward: per decoder layer and token, what autograd saves in a
  Llama/Qwen2 layer (seven hidden-sized tensors, q and the repeated k, v, four intermediate-sized, the softmax
  statistics, the padding mask's row; two hidden- and two intermediate-sized fewer under `lean_activations`),
  counted from a real forward (tests/test_plan.py checks the count);
  with gradient checkpointing only each layer's input, plus one layer recomputed in backward;
- the loss: chunked, one TOKEN_CHUNK x vocabulary tile set at a time; full, both models' [B, L, V] logits;
- generation: the KV cache of a batch of prompts of max_length plus max_new_tokens; where the fp32 student samples
  itself on an x86 CPU, its decoder layers' weights packed for decoding (`packed_generation`); under
  `replay_generation`, each layer's recorded output; under `prefill_once`, the prompt's pass kept for backward;
- the runtime: on a CPU the libraries, tokenizer and data (measured RSS); on a GPU the CUDA context.

The peak is the largest of the phases (training step, optimizer step, on-policy generation, evaluation, and
under FSDP / ZeRO-3 the start, where `train` evaluates both whole models on each GPU and DeepSpeed moves them
whole to the GPU before partitioning),
each its resident weights and state plus what the phase holds at once. benchmarks/plan_check.py measures how
far this is from a real run's peak RSS (benchmarks/README.md, "plan_check.py").
"""

from __future__ import annotations

import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import Profile
from .errors import ModelSpecError, UsageError
from .families import builtin_config, known_config, local_config, parameter_count, smaller_size

GIB = 2**30
# RSS of a CPU training process besides its tensors: Python, torch, transformers, TRL, datasets and peft imported,
# the tokenizer and the demo data loaded. benchmarks/plan_check.py on Zen 4: 860-900 MB once the models were
# loaded, of which the bf16 teacher's 257 MB (the student's weights are file-mapped and not yet read then).
CPU_RUNTIME = 600 * 2**20
# What a CUDA process holds outside torch's allocator (context, cuBLAS/cuDNN workspaces), and the allocator's
# slack: not measured here (no GPU); a usual figure for recent drivers on H100-class GPUs.
CUDA_RUNTIME = int(1.0 * GIB)
# On a CPU, peak RSS ran 1.04-1.56x the plan (median 1.11x) as `train` runs by default (malloc keeping the blocks a
# step frees, `keep_freed_memory`) in benchmarks/plan_check.py, the most for a LoRA student at batch 8: an option
# fits the RAM only with room for the largest of these (a run past RAM is killed by the kernel, with no message).
CPU_RSS_ROOM = 1.6
TOKEN_CHUNK = 64  # gkd/divergence.py's chunk (kept in step with it by tests/test_plan.py)
ADAMW_STATES = 2  # exp_avg, exp_avg_sq per trained parameter, fp32 (bf16 in CompactAdamW)
COMPACT_CHUNK = 1 << 19  # gkd/compact_adamw.py's chunk (kept in step with it by tests/test_plan.py)
LOSS_TILES = 8  # [chunk, V] fp32 tiles alive at once in one chunk of the divergence (both log-softmaxes, mixture ...)
FULL_LOGITS_COPIES = 5  # [B, L, V] fp32 tensors of the full-logits loss: both logits, log-softmaxes, mixture

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(t|g|m)(?:i?b)?\s*", re.IGNORECASE)
_UNITS = {"t": 2**40, "g": 2**30, "m": 2**20}


def parse_memory(text: str) -> int:
    """`80GB`, `80G`, `80GiB`, `24000MB`, `1.5TB` -> bytes (binary units, as nvidia-smi counts MiB)."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise UsageError(f"`{text}` is not a memory size (a number and its unit).",
                         fix="Write it like 80GB, 24GiB or 40000MB; a GPU sold as 24GB may show less in nvidia-smi "
                         "(e.g. 23028MiB): pass that.")
    if float(match.group(1)) <= 0:
        raise UsageError(f"`{text}`: a GPU's memory must be more than 0.", fix="e.g. --gpu-memory 80GB.")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class ModelShape:
    """The config numbers memory depends on."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    parameters: int
    layer_parameters: int

    @property
    def linear_per_layer(self) -> int:
        """Weights of one layer's projections (what bitsandbytes quantizes and LoRA's all-linear adapts)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate

    def kv_cache(self, batch: int, tokens: int, bytes_per: float) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * batch * tokens * bytes_per

    def saved_per_token(self, seq_len: int, *, lean_mlp: bool = False, lean_norms: bool = False) -> int:
        """Elements one decoder layer's forward saves for backward per token (sdpa attention with a padding
        mask, as in training): seven [H] tensors (norm inputs and outputs, projections' inputs, residual), q and
        the repeated k and v, the softmax statistics, the norms' two rsqrt, four [I] (gate, up, act, product), the
        mask's row. `lean_activations` (gkd/lean_activations.py) drops act and product (`lean_mlp`), and the two
        normalised inputs with their rsqrt (`lean_norms`)."""
        q = self.heads * self.head_dim
        hidden, stats = (5, 0) if lean_norms else (7, 2)
        inner = 2 if lean_mlp else 4
        return hidden * self.hidden + 3 * q + self.heads + stats + inner * self.intermediate + seq_len

    def lora_parameters(self, rank: int, targets: list[str] | str) -> int:
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                  "up_proj": (h, i), "down_proj": (i, h)}
        names = shapes if targets == "all-linear" else [t for t in ([targets] if isinstance(targets, str)
                                                                    else targets) if t in shapes]
        return self.layers * sum(rank * sum(shapes[name]) for name in names)


def shape_from_config(name: str, config: dict[str, Any], layers: int | None = None) -> ModelShape:
    total = parameter_count(config, layers)
    if total is None:
        raise ModelSpecError(f"`{name}`: its config is not a Llama-style decoder this tool can plan for "
                             f"(model_type {config.get('model_type')!r}).",
                             fix="Plan with a Qwen2, Qwen2.5, Llama or Mistral model, or measure with a short "
                             "`train` run.")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    depth = int(layers or config["num_hidden_layers"])
    per_layer = parameter_count(config, 2) - parameter_count(config, 1)
    return ModelShape(name=name, layers=depth, hidden=hidden, intermediate=int(config["intermediate_size"]),
                      heads=heads, kv_heads=int(config.get("num_key_value_heads") or heads),
                      head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
                      tied=bool(config.get("tie_word_embeddings")), parameters=total, layer_parameters=per_layer)


def model_shape(spec_text: str, family: str) -> ModelShape:
    """A model's shape from its config: the Qwen2.5 sizes and the builtins ship with the tool; a local directory
    or a hub id in the local hub cache gives its config.json. No weights are read."""
    from .models.spec import resolve_model_spec

    from .models.spec import check_keep_layers

    spec = resolve_model_spec(spec_text, family)
    base = spec.unpruned
    if base.kind == "builtin":
        config = builtin_config(base.source)
    elif base.kind == "local":
        config = local_config(base.source)
        if config is None:
            raise ModelSpecError(f"model `{spec_text}`: {base.source}/config.json cannot be read as JSON.",
                                 fix="Point at the directory save_pretrained wrote.")
    else:
        config = known_config(base.source) or _cached_hub_config(base.source)
    if config is None and base.kind == "alias":
        raise ModelSpecError(f"model `{spec_text}`: {base.source} is not a size this tool knows offline.",
                             fix="Use one of 0.5b, 1.5b, 3b, 7b, 14b, 32b, 72b, or a local directory / hub id.")
    if config is None:
        raise ModelSpecError(
            f"model `{spec_text}`: its config.json is needed to plan for it, and it is neither known to this tool "
            f"nor in the local hub cache.",
            fix=f"Download it where the hub is reachable (`hf download {base.source} config.json`) or pass a "
            "local directory holding config.json; the Qwen2.5 sizes (0.5b ... 72b) plan offline.")
    if spec.keep_layers is not None and isinstance(config.get("num_hidden_layers"), int):
        check_keep_layers(spec, config["num_hidden_layers"])
    return shape_from_config(spec.name, config, spec.keep_layers)


def _cached_hub_config(hub_id: str) -> dict[str, Any] | None:
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(hub_id, "config.json")
    return local_config(str(Path(path).parent)) if isinstance(path, str) else None


@dataclass(frozen=True)
class Workload:
    """What one training step handles, per device, and in which dtypes (bytes per element)."""

    device: str  # "cpu" or "cuda"
    batch: int
    seq_len: int  # the longest padded sequence a step trains on
    prompt_len: int  # the longest prompt generation starts from
    max_new_tokens: int
    completion: int  # loss positions per sequence
    eval_batch: int
    gradient_checkpointing: bool
    chunked_loss: bool
    on_policy: bool
    compute_bytes: int  # activations
    teacher_bytes: float  # per teacher weight in its (possibly quantized) linear layers
    teacher_other_bytes: int  # per teacher weight elsewhere (embeddings, norms)
    teacher_quantized: bool
    student_base_bytes: int  # per frozen base weight under LoRA (fp32 master weights otherwise)
    sampling_copy: bool
    lora_rank: int | None = None
    lora_targets: list[str] | str = "all-linear"
    autocast: bool = False  # bf16/fp16 mixed precision over fp32 weights
    lean_activations: bool = False  # the trainer setting: MLPs and (without checkpointing) norms keep fewer tensors
    replay_generation: bool = False  # the trainer's: generation records each layer's output for the training forward
    packed_decoding: bool = False  # the trainer's `packs_student_generation`: fp32 layers packed for decoding (CPU)
    prefill_once: bool = False  # the trainer's `prefills_once`: generation inside the step, the prompt's pass kept
    compact_optimizer: bool = False  # the trainer's `compacts_optimizer`: AdamW's moments in bf16 (CPU)


@dataclass
class Option:
    """One way of running the job, with its per-device estimate."""

    name: str
    strategy: str  # single, ddp, fsdp, zero3
    devices: int
    components: dict[str, int]
    phases: dict[str, int]
    peak_bytes: int = 0
    peak_phase: str = ""
    fits: bool = False
    notes: list[str] = field(default_factory=list)
    activations_other_setting: int = 0
    """The activations with gradient checkpointing switched the other way."""
    unsupported: str | None = None
    """Why the trainer refuses this way of running the job, if it does (it then never fits)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    device: str
    devices: int
    memory_bytes: int
    teacher: ModelShape
    student: ModelShape
    workload: Workload
    options: list[Option]
    fix: dict[str, Any] | None = None
    host_ram_bytes: int = 0
    """Host RAM a machine needs when every process loads both models on the CPU (FSDP / ZeRO-3 launches)."""

    @property
    def fits(self) -> bool:
        return any(option.fits for option in self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "devices": self.devices, "memory_bytes": self.memory_bytes,
                "fits": self.fits, "teacher": asdict(self.teacher), "student": asdict(self.student),
                "workload": asdict(self.workload), "options": [o.to_dict() for o in self.options], "fix": self.fix,
                "host_ram_bytes": self.host_ram_bytes}


def workload_for(profile: Profile, device: str, *, seq_len: int | None = None, batch: int | None = None
                 ) -> Workload:
    """The profile's step on `device`: the dtypes `train` picks there, the worst-case lengths (a prompt of
    max_length, plus max_new_tokens when the student or teacher generates)."""
    t, m, init = profile.trainer, profile.model, profile.teacher_model_init_kwargs
    on_policy = t.lmbda > 0 or t.seq_kd
    samples = t.lmbda > 0  # the student generates (under seq_kd alone, the teacher does)
    gpu = device == "cuda"
    compute = {"auto": 2 if gpu else 4, "float32": 4, "bfloat16": 2, "float16": 2}[m.dtype]
    # auto on a CPU without native bf16: bf16 weights computed in fp32 (models/upcast.py), so its activations and
    # KV cache are fp32 (counted for its other weights too: the embedding's 2 bytes over, on the safe side); a
    # quantized teacher's figures replace these below
    upcast = init.dtype == "auto" and not gpu and not _cpu_bf16()
    teacher = {"auto": 2, "float32": 4, "bfloat16": 2, "float16": 2}[init.dtype]
    teacher_other = 4 if upcast else teacher
    if init.load_in_8bit or init.load_in_4bit:
        teacher, teacher_other = (1.0 if init.load_in_8bit else 0.5625), 2  # nf4: 4 bits + an fp32 absmax per 64
    lora = m.lora.enabled
    generation = t.generation_dtype
    autocast = compute < 4 and not lora
    replayable = (t.replay_generation and samples and m.gradient_checkpointing and not lora and t.chunked_loss
                  and t.kv_cache_generation)
    # the trainer's `_sampling_dtype`: a bf16 copy of a whole fp32 student (bfloat16; auto: under bf16 mixed
    # precision on a GPU)
    copy = samples and not lora and (generation == "bfloat16" or (
        generation == "auto" and gpu and m.dtype in ("auto", "bfloat16")))
    # the trainer's `packs_student_generation`: the fp32 student samples itself with its decoder layers' weights
    # packed by oneDNN for the decoding steps (gkd/packed_linear.py), on an x86 CPU
    packed = (t.packed_generation and samples and not gpu and not lora and not copy and not autocast
              and platform.machine().lower() in ("x86_64", "amd64"))
    # the trainer's `prefills_once`: the prompt's pass (the training forward's first part, its activations kept for
    # backward) runs before generation, which then happens inside the training step
    prefill_once = (t.prefill_once and samples and t.chunked_loss and t.kv_cache_generation
                    and not m.gradient_checkpointing and not lora)
    length = seq_len or t.max_length + (t.max_new_tokens if on_policy else 0)
    return Workload(
        device=device, batch=batch or t.per_device_train_batch_size, seq_len=length, prompt_len=t.max_length,
        max_new_tokens=t.max_new_tokens, completion=min(t.max_new_tokens, length),
        eval_batch=t.per_device_eval_batch_size,
        gradient_checkpointing=m.gradient_checkpointing, chunked_loss=t.chunked_loss, on_policy=on_policy,
        compute_bytes=compute, teacher_bytes=teacher, teacher_other_bytes=teacher_other,
        teacher_quantized=init.load_in_8bit or init.load_in_4bit,
        student_base_bytes=compute if lora else 4, sampling_copy=copy, lora_rank=m.lora.r if lora else None,
        lora_targets=m.lora.target_modules, autocast=autocast, lean_activations=t.lean_activations,
        replay_generation=replayable and not copy, packed_decoding=packed, prefill_once=prefill_once,
        compact_optimizer=t.compact_optimizer and not gpu)


def _cpu_bf16() -> bool:
    """Whether this CPU has native bf16 as far as /proc/cpuinfo tells without torch (`train` also asks oneDNN):
    an x86 CPU listing AVX512-BF16 or AMX; elsewhere, or unreadable, no."""
    from .models.loading import x86_cpuinfo_bf16

    return bool(x86_cpuinfo_bf16())


def estimate(teacher: ModelShape, student: ModelShape, w: Workload, strategy: str = "single", devices: int = 1
             ) -> Option:
    """Per-device bytes of one way of running the job."""
    shard = devices if strategy in ("fsdp", "zero3") else 1
    chunked = w.chunked_loss and strategy != "zero3"  # the trainer takes the full-logits path under ZeRO-3
    b, length = w.batch, w.seq_len
    # weights and state
    t_linear = teacher.layers * teacher.linear_per_layer
    teacher_weights = t_linear * w.teacher_bytes + (teacher.parameters - t_linear) * w.teacher_other_bytes
    whole_teacher = teacher_weights
    if strategy == "zero3":
        teacher_weights = teacher_weights / devices + 2 * teacher.layer_parameters * w.teacher_other_bytes
    if w.lora_rank:
        trained = student.lora_parameters(w.lora_rank, w.lora_targets)
        student_weights = student.parameters * w.student_base_bytes + trained * 4
    else:
        trained = student.parameters
        student_weights = student.parameters * 4
    # sharded: a decoder layer and the next gathered whole, and the top-level group (embeddings, lm_head), which stays
    # gathered through the forward and the loss; DeepSpeed under bf16 also keeps a bf16 copy of its shard
    embeddings = student.vocab * student.hidden * (1 if student.tied else 2)
    gathered = (2 * student.layer_parameters + embeddings) * 4 if shard > 1 else 0
    if strategy == "zero3" and w.compute_bytes == 2:
        gathered += student.parameters * 2 / shard
    components = {
        "teacher weights": teacher_weights,
        "student weights": student_weights / shard + gathered,
        "sampling copy": student.parameters * 2 if w.sampling_copy and w.on_policy and strategy in ("single", "ddp")
        else 0,
        "optimizer state": trained * (2 if w.compact_optimizer else 4) * ADAMW_STATES / shard,
        "gradients": trained * 4 / shard * (2 if strategy == "ddp" else 1),
    }
    # activations of the student's training forward
    # the trainer leaves the modules as they are under FSDP / DeepSpeed, an MLP with a projection LoRA wraps (a
    # target pattern naming one counts), and the norms under gradient checkpointing (the layers are recomputed anyway)
    lean = w.lean_activations and strategy in ("single", "ddp")
    targets = w.lora_targets if isinstance(w.lora_targets, str) else set(w.lora_targets)
    lora_mlp = bool(w.lora_rank) and (targets == "all-linear"
                                      or any(name in targets for name in ("gate_proj", "up_proj", "down_proj")))

    def per_layer(lean_norms: bool, tokens: int = length) -> float:
        return w.compute_bytes * b * tokens * student.saved_per_token(tokens, lean_mlp=lean and not lora_mlp,
                                                                      lean_norms=lean_norms)

    def rest(lean_norms: bool, tokens: int = length) -> float:  # embeddings' output, the final norm
        return 4 * b * tokens * (2 if lean_norms else 3) * student.hidden

    checkpointed = student.layers * w.compute_bytes * b * length * student.hidden + per_layer(False) + rest(False)
    kept = student.layers * per_layer(lean) + rest(lean)
    if w.autocast:
        kept += student.layers * student.layer_parameters * w.compute_bytes  # the weights cast per forward, kept
    activations, other = (checkpointed, kept) if w.gradient_checkpointing else (kept, checkpointed)
    backward = w.compute_bytes * b * length * (2 * student.intermediate + 2 * student.hidden)  # a layer's grads
    completion = b * w.completion
    vocab = min(student.vocab, teacher.vocab)
    if chunked:
        tiles = LOSS_TILES * min(completion, TOKEN_CHUNK) * vocab * 4
        loss = tiles + completion * (student.hidden + teacher.hidden) * 4
    else:
        loss = FULL_LOGITS_COPIES * b * length * vocab * 4
    head_grad = 0 if w.lora_rank else student.vocab * student.hidden * 4 / shard  # the first gradient backward makes
    components.update({"activations": activations, "loss": loss})
    # generation: the KV cache and one layer of the prefill
    prefill = lambda shape, batch, bytes_per: bytes_per * batch * w.prompt_len * (  # noqa: E731
        3 * shape.intermediate + 4 * shape.hidden + w.prompt_len)
    gen_bytes = 2 if w.sampling_copy else w.compute_bytes
    tokens = w.prompt_len + w.max_new_tokens
    generation = (student.kv_cache(b, tokens, gen_bytes) + prefill(student, b, gen_bytes)) if w.on_policy else 0
    if w.replay_generation:  # each layer's output recorded while generating, the training forward's checkpoints
        generation += student.layers * w.compute_bytes * b * tokens * student.hidden
    if w.packed_decoding and strategy in ("single", "ddp"):  # a packed fp32 copy of each layer's weights (not the head)
        generation += student.layers * student.linear_per_layer * 4
    if w.prefill_once and strategy == "single":  # the prompt's pass, kept for backward while generating
        generation += student.layers * per_layer(lean, w.prompt_len) + rest(lean, w.prompt_len)
        if w.autocast:  # with the weights autocast cast for it
            generation += student.layers * student.layer_parameters * w.compute_bytes
    # under ZeRO-3, generating gathers the student's fp32 weights whole (TRL's unwrap_model_for_generation)
    gathered_student = student_weights * (1 - 1 / devices) if strategy == "zero3" else 0
    evaluation = max(teacher.kv_cache(w.eval_batch, tokens, w.teacher_other_bytes)
                     + prefill(teacher, w.eval_batch, w.teacher_other_bytes),
                     # evaluation generates with the student itself, not the sampling copy
                     student.kv_cache(w.eval_batch, tokens, w.compute_bytes)
                     + prefill(student, w.eval_batch, w.compute_bytes))
    components.update({"generation (KV cache)": max(generation, evaluation)})
    runtime = CPU_RUNTIME if w.device == "cpu" else CUDA_RUNTIME
    components["runtime"] = runtime
    # transformers' default optimizer with torch >= 2.8 is the fused AdamW (in place) on a GPU; on the CPU at most a
    # temporary the size of the largest weight (the embeddings) is allowed for; CompactAdamW's are three fp32 chunks
    # and its two-chunk pool of random bits
    largest = w.lora_rank * student.intermediate if w.lora_rank else student.vocab * student.hidden
    optimizer_temporaries = (0 if w.device == "cuda" else 5 * COMPACT_CHUNK * 4 if w.compact_optimizer
                             else min(largest, trained) * 4)
    resident = teacher_weights + components["student weights"] + components["optimizer state"] + runtime
    grads = components["gradients"]
    phases = {
        "training step": resident + activations + loss + backward + head_grad,
        "optimizer step": resident + grads + optimizer_temporaries,
        # the sampling copy's weights are filled for each generation and freed after it (the trainer's
        # `_release_sampling_copy`)
        "generation": resident + components["sampling copy"] + generation + (gathered_student if w.on_policy else 0),
        "evaluation": resident + evaluation + gathered_student,
    }
    if shard > 1:
        # before training, `train` evaluates the teacher and the whole student on each GPU; DeepSpeed (without
        # zero3_init) moves each model whole to the GPU before it partitions it
        phases["before training"] = whole_teacher + student_weights + runtime + evaluation
    option = Option(name=_option_name(strategy, devices, w.device), strategy=strategy, devices=devices,
                    components={k: int(v) for k, v in components.items()},
                    phases={k: int(v) for k, v in phases.items()})
    option.activations_other_setting = int(other)
    option.peak_phase, peak = max(phases.items(), key=lambda item: item[1])
    option.peak_bytes = int(peak)
    if strategy == "zero3" and w.chunked_loss:
        option.notes.append("ZeRO-3: the loss takes full logits")
    if strategy == "fsdp":
        option.notes.append("FSDP: the teacher whole on every GPU")
    if strategy == "zero3" and w.teacher_quantized:
        option.unsupported = "the trainer refuses an 8/4-bit teacher under ZeRO-3"
    return option


def _option_name(strategy: str, devices: int, device: str) -> str:
    if strategy == "single":
        return "one process (CPU)" if device == "cpu" else "one GPU"
    return {"ddp": "DDP", "fsdp": "FSDP", "zero3": "ZeRO-3"}[strategy] + f" x{devices}"


def plan_profile(profile: Profile, *, device: str = "cpu", devices: int = 1, memory: int | None = None,
                 seq_len: int | None = None, batch: int | None = None, fix: bool = True) -> Plan:
    """The plan of `profile` on `devices` GPUs of `memory` bytes each, or on this machine's CPU and RAM."""
    family = profile.model.family
    teacher = model_shape(profile.teacher_model_name_or_path, family)
    student = model_shape(profile.model.model_name_or_path, family)
    memory = memory or (_ram_bytes() if device == "cpu" else 0)
    workload = workload_for(profile, device, seq_len=seq_len, batch=batch)
    strategies = ["single"] + (["ddp", "fsdp", "zero3"] if device == "cuda" and devices > 1 else [])
    options = [estimate(teacher, student, workload, s, 1 if s == "single" else devices) for s in strategies]
    # a CPU process's RSS runs above its live bytes (glibc keeps what a step freed): leave it that room
    room = CPU_RSS_ROOM if device == "cpu" else 1.0
    for option in options:
        option.fits = option.peak_bytes * room <= memory and option.unsupported is None
    plan = Plan(device=device, devices=devices, memory_bytes=memory, teacher=teacher, student=student,
                workload=workload, options=options)
    if device == "cuda" and devices > 1:  # under FSDP / ZeRO-3 every process loads both models on the CPU first
        single = options[0].components
        plan.host_ram_bytes = devices * (single["teacher weights"] + single["student weights"])
    if fix and not plan.fits:
        plan.fix = cheapest_fix(profile, student, device=device, devices=devices, memory=memory)
    return plan


def _ram_bytes() -> int:
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return 0
    kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemAvailable:")), 0)
    return kib * 1024


def _fix_groups(profile: Profile, device: str, student: ModelShape) -> list[list[tuple[str, list[str]]]]:
    """Upstream's out-of-memory fixes, in its order, each a group of alternatives (at most one of a group is
    taken): a smaller batch with more accumulation (the same global batch); gradient checkpointing; an 8-bit or
    4-bit teacher (CUDA only); a smaller teacher (a Qwen2.5 size still larger than the student); then LoRA."""
    t, m, init = profile.trainer, profile.model, profile.teacher_model_init_kwargs
    groups: list[list[tuple[str, list[str]]]] = []
    batch, accumulation, batches = t.per_device_train_batch_size, t.gradient_accumulation_steps, []
    while batch > 1:
        batch, accumulation = max(1, batch // 2), accumulation * 2
        batches.append((f"batch {batch} x {accumulation} accumulation",
                        [f"trainer.per_device_train_batch_size={batch}",
                         f"trainer.gradient_accumulation_steps={accumulation}"]))
    groups.append(batches)
    checkpointing = ("gradient checkpointing", ["model.gradient_checkpointing=true"])
    groups.append([] if m.gradient_checkpointing else [checkpointing])
    quantized = device == "cuda" and not (init.load_in_8bit or init.load_in_4bit)
    groups.append([("8-bit teacher", ["teacher_model_init_kwargs.load_in_8bit=true"]),
                   ("4-bit teacher", ["teacher_model_init_kwargs.load_in_4bit=true"])] if quantized else [])
    smaller = smaller_size(profile.teacher_model_name_or_path)
    if smaller and model_shape(smaller, m.family).parameters > student.parameters:
        groups.append([(f"teacher {smaller}", [f"teacher_model_name_or_path={smaller}"])])
    groups.append([] if m.lora.enabled else [("LoRA student", ["model.lora.enabled=true"])])
    return [group for group in groups if group]


def cheapest_fix(profile: Profile, student: ModelShape, *, device: str, devices: int, memory: int
                 ) -> dict[str, Any] | None:
    """The fewest fixes that together let some option fit; among as few, the earliest in upstream's order (a
    smaller batch before checkpointing before a quantized teacher ...), then the lowest peak."""
    import itertools

    groups = _fix_groups(profile, device, student)
    found = []
    for count in range(1, len(groups) + 1):
        for chosen in itertools.combinations(range(len(groups)), count):
            for picks in itertools.product(*(range(len(groups[g])) for g in chosen)):
                changes = [groups[g][i] for g, i in zip(chosen, picks, strict=True)]
                overrides = [o for _, group in changes for o in group]
                plan = plan_profile(_with_overrides(profile, overrides), device=device, devices=devices,
                                    memory=memory, fix=False)
                fitting = [o for o in plan.options if o.fits]
                if fitting:
                    best = min(fitting, key=lambda o: o.peak_bytes)
                    found.append(((chosen, picks, best.peak_bytes), {
                        "changes": [label for label, _ in changes], "overrides": overrides, "option": best.name,
                        "peak_bytes": best.peak_bytes}))
        if found:
            return min(found, key=lambda item: item[0])[1]
    return None


def _with_overrides(profile: Profile, overrides: list[str]) -> Profile:
    from .config.loader import parse_override, set_dotted

    data = profile.model_dump()
    for text in overrides:
        set_dotted(data, *parse_override(text))
    return Profile.model_validate(data)


def gib(value: float) -> str:
    """Bytes as GiB (MiB under 0.1 GiB); none as a dash."""
    if value == 0:
        return "—"
    return f"{value / GIB:,.1f} GiB" if value >= GIB / 10 else f"{value / 2**20:,.0f} MiB"
