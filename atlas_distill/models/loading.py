"""Loading models and tokenizers: every failure becomes a typed error that says the fix; the shared vocabulary
GKD compares; LoRA; the hub probe. Heavy libraries are imported inside the functions that use them."""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelSpecError, TrainingError
from .builtin import BUILTIN_NAME
from .head import contiguous_head_input

if TYPE_CHECKING:
    from ..config import LoraConfig


_hub_checked = False
HUB_PROBE_SECONDS = 3.0


def use_cache_if_hub_unreachable() -> None:
    """Before the first hub lookup of a process: when HF_HUB_OFFLINE is unset and the hub does not answer within
    a few seconds, the hub client reads its local cache only (as HF_HUB_OFFLINE=1), said once in one line.
    Otherwise huggingface_hub retries every file for about 50 s before failing."""
    global _hub_checked
    if _hub_checked:
        return
    _hub_checked = True
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    from huggingface_hub.utils import get_session

    try:  # the hub's own HTTP client, so that proxies and HF_ENDPOINT count; any HTTP answer means reachable
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except Exception as exc:  # noqa: BLE001 - connection, DNS, TLS and proxy failures are all "unreachable"
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"  # and for the processes this one starts
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"Note: the model hub ({constants.ENDPOINT}) is unreachable ({reason}); using the local model cache "
              "only. Set HF_HUB_OFFLINE=1 to skip this check.", file=sys.stderr, flush=True)


def load_pretrained(auto_class, path_or_id: str, spec: str | None = None, **kwargs):
    """auto_class.from_pretrained; a missing model (or no network) becomes a ModelSpecError naming `spec`."""
    looks_local = path_or_id.startswith(("/", ".", "~"))
    if not looks_local and not Path(path_or_id).exists():  # a hub id: from the cache, or the hub if it answers
        use_cache_if_hub_unreachable()
    try:
        return auto_class.from_pretrained(path_or_id, **kwargs)
    except OSError as exc:
        missing = looks_local and not Path(path_or_id).expanduser().exists()
        reason = f"no directory {path_or_id} exists" if missing else str(exc).splitlines()[0].rstrip(".")
        where = "" if spec in (None, path_or_id) else f" from {path_or_id}"
        raise ModelSpecError(
            f"cannot load model `{spec or path_or_id}`{where}: {reason}.",
            fix=f"This machine may be offline: use a local directory, the builtin `{BUILTIN_NAME}`, "
            "or download the model first (`hf download ORG/NAME`) where the hub is reachable.",
        ) from None


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False):
    """AutoTokenizer with a pad token (EOS if it has none). Callers set padding_side for generation."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, str(path_or_id), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def cuda_bf16() -> bool:
    """Whether a CUDA GPU here computes in bf16 natively (Ampere and later). `torch.cuda.is_bf16_supported()`
    also says yes where bf16 is only emulated (T4, V100), where it is slower than fp16 or fp32."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


@functools.cache
def cpu_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic. On x86 that is AVX512-BF16 or AMX, read from
    /proc/cpuinfo: oneDNN also claims bf16 on plain AVX512, where it emulates it. On a plain AVX2 CPU a bf16
    matmul ran 6x slower than fp32 here, and a GKD step under bf16 autocast 7x slower."""
    import torch

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    listed = x86_cpuinfo_bf16()
    return True if listed is None else listed  # elsewhere oneDNN's own check (e.g. Arm's BF16 extension) decides


def autocast_bf16() -> bool:
    """Whether `auto` (model.dtype, GKDConfig's unset bf16) trains under bf16 autocast here, fp32 master weights
    kept: on a GPU with native bf16 (`cuda_bf16`). Not on a CPU, even with AMX, where it made the benchmark's
    on-policy step up to 1.35x faster: with bf16 in the student's arithmetic (training under autocast, sampling from
    a bf16 copy or under autocast) ours ended 30 on-policy steps about 0.010 above DistillationTrainer's held-out
    divergence over eight seeds, and level with it all in fp32 (benchmarks/README.md); `model.dtype: bfloat16` asks
    for it."""
    return cuda_bf16()


def x86_cpuinfo_bf16() -> bool | None:
    """Whether this x86 CPU's /proc/cpuinfo lists native bf16 (`native_bf16`); None off x86 or when it cannot be
    read. Needs no torch: `plan` asks it too."""
    text = _x86_cpuinfo()
    return None if text is None else native_bf16(text)


def _x86_cpuinfo() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def _flag_sets(cpuinfo: str) -> list[set[str]]:
    return [set(line.partition(":")[2].split()) for line in cpuinfo.splitlines()
            if line.partition(":")[0].strip() == "flags"]


def native_bf16(cpuinfo: str) -> bool:
    """Whether an x86 /proc/cpuinfo text lists AVX512-BF16 or AMX-BF16 in the flags of every processor."""
    flags = _flag_sets(cpuinfo)
    return bool(flags) and all({"avx512_bf16", "amx_bf16"} & each for each in flags)


def teacher_dtype(dtype: str = "auto") -> str:
    """The dtype the frozen teacher is loaded in: `dtype` when named; auto: bfloat16 where this machine computes
    in bf16 natively (a GPU with native bf16, else a CPU with AVX512-BF16 or AMX), float32 elsewhere. The
    teacher only runs forward passes, so it needs no fp32 master weights: on a Zen 4 CPU its forward over a
    GKD batch took 0.70 s in bf16 against 1.24 s in fp32, its next-token distribution within a JSD of 6e-4
    per position of fp32's (benchmarks/README.md)."""
    import torch

    if dtype != "auto":
        return dtype
    if torch.cuda.is_available():
        return "bfloat16" if cuda_bf16() else "float32"
    return "bfloat16" if cpu_bf16() else "float32"


def teacher_upcast(dtype: str = "auto") -> bool:
    """Whether the teacher keeps bf16 weights and computes in fp32 (models/upcast.py): `auto` where it computes in
    fp32 (a CPU without native bf16, no GPU). Its weights take half the memory (269 instead of 538 MB for the
    builtin); its next-token distribution was within a JSD of 3e-5 per position of the fp32 teacher's (bf16
    compute: 3.4e-4), at the same forward speed on a 2-core AVX2 CPU (benchmarks/README.md)."""
    import torch

    return dtype == "auto" and not torch.cuda.is_available() and not cpu_bf16()


def _upcast_fits(path_or_id: str, trust_remote_code: bool) -> bool:
    """Whether models/upcast.py knows every layer of the model at `path_or_id`: its architecture built on the meta
    device (no weights read), as from_pretrained builds it there. False for a checkpoint quantized on disk, and where
    the skeleton cannot be built (load_teacher then loads fp32, as it did for any model before the upcast)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import meta_device_safe_creation_ops

    from .upcast import fits

    config = load_pretrained(AutoConfig, str(path_or_id), trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None):
        return False
    try:
        with torch.device("meta"), meta_device_safe_creation_ops():
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - an architecture this check cannot build is simply not upcast
        return False
    return fits(skeleton)


def teacher_loaded_as(path_or_id: str, dtype: str = "auto", *, trust_remote_code: bool = False,
                      load_in_8bit: bool = False, load_in_4bit: bool = False) -> str:
    """How `load_teacher` holds the teacher at `path_or_id`, for a teacher store's key: 8-bit, 4-bit,
    `bfloat16-in-float32` (bf16 weights computed in fp32), or `teacher_dtype(dtype)`."""
    if load_in_8bit or load_in_4bit:
        return "8-bit" if load_in_8bit else "4-bit"
    if teacher_upcast(dtype) and _upcast_fits(path_or_id, trust_remote_code):
        return "bfloat16-in-float32"
    return teacher_dtype(dtype)


def load_teacher(path_or_id: str, dtype: str = "auto", *, trust_remote_code: bool = False,
                 load_in_8bit: bool = False, load_in_4bit: bool = False):
    """The frozen teacher as `teacher_model_init_kwargs` asks (`load_model` in `teacher_dtype(dtype)`); where that
    is fp32 by `auto` (`teacher_upcast`), its weights are held in bf16 and computed with in fp32, unless the model
    has layers models/upcast.py does not know (then fp32, as before): as `teacher_loaded_as` says. The loaded
    model is checked again, in case it holds layers its skeleton did not."""
    from .upcast import compute_in_float32, fits

    if teacher_loaded_as(path_or_id, dtype, trust_remote_code=trust_remote_code, load_in_8bit=load_in_8bit,
                         load_in_4bit=load_in_4bit) == "bfloat16-in-float32":
        model = load_model(path_or_id, dtype="bfloat16", trust_remote_code=trust_remote_code)
        if fits(model):
            return compute_in_float32(model)
        del model
    return load_model(path_or_id, dtype=teacher_dtype(dtype), trust_remote_code=trust_remote_code,
                      load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)


def resolve_dtype(dtype: str = "auto"):
    """auto: bfloat16 on a GPU with native bf16, else float32 (also on a CPU with native bf16: see README,
    "Precision"); otherwise the named torch dtype."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if cuda_bf16() else torch.float32
    return getattr(torch, dtype)


def sharded_launch() -> bool:
    """Whether `accelerate launch` started this process for FSDP or DeepSpeed: those place (and shard) the
    models themselves, from wherever they were loaded."""
    return any(os.environ.get(name, "").lower() in ("1", "true")
               for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


def load_device() -> str | None:
    """Where a model is loaded: this process's GPU (LOCAL_RANK under torchrun) when there is one and no FSDP or
    DeepSpeed launch shards it; else None (the CPU). Each process then holds its copy on its own GPU only,
    never first in host RAM (8 processes x (14B + 7B) would be about 350 GB)."""
    import torch

    if not torch.cuda.is_available() or sharded_launch():
        return None
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def training_dtype(dtype: str, *, lora: bool) -> str:
    """The dtype a trained student is loaded in. A full-weight student keeps fp32 master weights whatever
    `dtype` names (bf16 or fp16 is then the autocast compute dtype): AdamW's updates at the profiles' learning
    rates are below half a bf16 step for most weights, which would then never change. Under LoRA only the
    adapters train (PEFT keeps them in fp32), so the frozen base stays in `dtype`."""
    return dtype if lora else "float32"


def _quantization_config(load_in_8bit: bool, load_in_4bit: bool, dtype):
    import importlib.util

    import torch

    if load_in_8bit and load_in_4bit:
        raise ModelSpecError("`load_in_8bit` and `load_in_4bit` are both set.", fix="Set only one of them.")
    if not torch.cuda.is_available():
        raise TrainingError("8-bit/4-bit loading needs bitsandbytes on a CUDA GPU; none here.",
                            fix="Set `teacher_model_init_kwargs.load_in_8bit` (and `load_in_4bit`) to false, "
                            "or use a smaller teacher that fits in memory unquantized.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingError("8-bit/4-bit loading needs bitsandbytes, which is not installed.",
                            fix="pip install 'atlas-distill[cuda]'")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")


def load_model(path_or_id: str, *, dtype: str = "auto", trust_remote_code: bool = False,
               load_in_8bit: bool = False, load_in_4bit: bool = False, for_training: bool = False):
    """AutoModelForCausalLM, optionally 8/4-bit, on this process's GPU when it has one (`load_device`).
    Not for training: eval mode, weights frozen."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    device = load_device()
    if load_in_8bit or load_in_4bit:
        kwargs["quantization_config"] = _quantization_config(load_in_8bit, load_in_4bit, torch_dtype)
        # each process holds its own quantized copy on its own GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if device is not None:
        kwargs["device_map"] = {"": device}
    model = load_pretrained(AutoModelForCausalLM, str(path_or_id), **kwargs)
    contiguous_head_input(model)
    if for_training:
        model.config.use_cache = False  # no KV cache in training forward passes (and none with checkpointing)
    else:
        model.eval().requires_grad_(False)
    return model


def apply_lora(model, lora: LoraConfig):
    """Wrap the model in LoRA adapters (peft) when `lora.enabled`; otherwise return it unchanged."""
    if not lora.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def count_parameters(model) -> int:
    """Distinct parameters (tied embeddings counted once); a ZeRO-3 partitioned parameter by its full size."""
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters())


def weight_rows(weight) -> int:
    """A weight's first dimension; under ZeRO-3 a partitioned weight is empty outside a forward, and its full
    shape is `ds_shape`."""
    shape = getattr(weight, "ds_shape", None)
    return shape[0] if shape is not None else weight.shape[0]


def _vocab_difference(student: dict[str, int], teacher: dict[str, int], limit: int = 2) -> list[str]:
    examples = []
    for token, idx in sorted(student.items(), key=lambda item: item[1]):
        if teacher.get(token) != idx:
            where = f"id {teacher[token]}" if token in teacher else "absent"
            examples.append(f"{token!r} is id {idx} in the student, {where} in the teacher")
            if len(examples) == limit:
                break
    return examples or [f"the teacher has tokens the student lacks, e.g. {sorted(set(teacher) - set(student))[0]!r}"]


def _embedding_rows(model) -> int:
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return min(weight_rows(head.weight if head is not None else embeddings.weight), weight_rows(embeddings.weight))


def shared_vocab_size(student_tokenizer, teacher_tokenizer, student_model=None, teacher_model=None) -> int:
    """The number of logits GKD compares: the real tokens of the tokenizer both models share.

    Models may pad their embeddings differently (Qwen2.5 7B has 152,064 rows, 3B 151,936,
    one tokenizer); the divergence is taken over the first `shared` logits of each.
    """
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        names = f"student {student_tokenizer.name_or_path or '?'}, teacher {teacher_tokenizer.name_or_path or '?'}"
        raise ModelSpecError(
            f"The teacher and student use different tokenizers ({names}: {len(student_tokenizer)} vs "
            f"{len(teacher_tokenizer)} tokens; {'; '.join(_vocab_difference(student_vocab, teacher_vocab))}). "
            "GKD compares their next-token distributions token by token, so they must share one.",
            fix="Choose a student from the teacher's family (e.g. a smaller size alias), "
            "or a pruned copy of the teacher: TEACHER@NL.")
    shared = len(student_tokenizer)
    for role, model in (("student", student_model), ("teacher", teacher_model)):
        if model is not None and _embedding_rows(model) < shared:
            raise ModelSpecError(f"The {role} model has {_embedding_rows(model)} embedding rows, fewer than "
                                 f"the {shared} tokens of its tokenizer.", fix="Use the tokenizer saved with it.")
    return shared
