"""Our GKD settings, each written once: its name, default and help.

`AtlasSettings` holds every setting atlas-distill adds to TRL's `GKDConfig`, in TRL's style (a dataclass
field with its help). `AtlasGKDConfig` (gkd/config.py) inherits them; the CLI's profile schema takes the same
default and help through `setting(name)` (config/schema.py), and `gkd/config.py::from_profile` copies each by name.
This module imports neither torch nor TRL, so that reading a profile stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args


Scorer = Literal["auto", "exact", "numeric", "json", "contains"]
Targets = Literal["all", "final"]
GenerationDtype = Literal["auto", "float32", "bfloat16"]
SCORERS: tuple[str, ...] = get_args(Scorer)


@dataclass
class AtlasSettings:
    """Settings atlas-distill adds to TRL's `GKDConfig`, in four sections (the `# >` comments below): the data
    (when the trainer builds its datasets from `db_url=` or `traces=`), the off-policy warm-up, evaluation
    (generated and judged per turn and per episode), and speed and memory (each on by default, each with a switch
    to turn it off). Each field's help is in its metadata, as in TRL's configs."""

    # > Parameters that control the data
    learning_key: str | None = field(
        default=None, metadata={"help": "Keep sessions with this metadata.learning_key."})
    eval_split: float = field(
        default=0.15, metadata={"help": "Fraction of sessions held out for evaluation."})
    targets: Targets = field(
        default="all", metadata={"help": "What the student learns: all: every action of the agent (each step's "
                                         "output or tool call) and the final answer; final: only the final answer, "
                                         "the rest of the episode is prompt."})

    # > Parameters that control the off-policy warm-up
    offpolicy_warmup_steps: int = field(
        default=0, metadata={"help": "First steps off-policy (lmbda 0) at offpolicy_warmup_beta: forward KL on the "
                                     "traces' own completions, which a freshly pruned student needs before on-policy "
                                     "JSD gives gradient."})
    offpolicy_warmup_beta: float = field(
        default=0.0, metadata={"help": "beta during the warm-up (0: forward KL)."})

    # > Parameters that control evaluation
    scorer: Scorer = field(
        default="auto", metadata={"help": "How an eval turn is judged against the recorded one; auto: tool calls by "
                                          "tool and arguments (json), other turns by their text."})
    eval_max_sessions: int | None = field(
        default=None, metadata={"help": "Generate on at most this many eval sessions per evaluation (null: all)."})
    baseline_success: float | None = field(
        default=None, metadata={"help": "Reference success rate in [0, 1]; set, each evaluation adds "
                                        "metrics/success_delta and metrics/meets_target (`atlas-distill train` "
                                        "measures it before training). None: no baseline comparison."})
    baseline_tokens: float | None = field(
        default=None, metadata={"help": "Reference tokens per episode, for metrics/token_reduction_pct; None: no "
                                        "token target."})
    success_delta_target: float = field(
        default=0.10, metadata={"help": "Success delta needed to meet target (0.10 = 10 pp)."})
    token_reduction_target: float = field(
        default=30.0, metadata={"help": "Token reduction (percent) needed to meet target."})

    # > Parameters that control speed and memory
    kv_cache_generation: bool = field(
        default=True, metadata={"help": "On-policy generation uses the KV cache, also under gradient checkpointing "
                                        "(TRL generates without one then)."})
    chunked_loss: bool = field(
        default=True, metadata={"help": "Divergence from hidden states through lm_head in tiles, completion "
                                        "positions only; false: both models' full logits, as TRL."})
    teacher_cache_topk: int = field(
        default=256, metadata={"help": "Off-policy batches keep the teacher's top-k log-probs and a tail bucket; a "
                                       "repeated example (next epoch) skips the teacher. 0: off."})
    teacher_store: str | None = field(
        default=None, metadata={"help": "A teacher store directory (`atlas-distill teacher-store build`): off-policy "
                                        "steps (lmbda 0, the warm-up) read the teacher's top-k from it instead of "
                                        "running the teacher; a run with no on-policy step never loads the teacher. "
                                        "null: none."})
    group_by_length: bool = field(
        default=True, metadata={"help": "Batches of similar-length examples (less padding)."})
    group_by_turn: bool = field(
        default=True, metadata={"help": "With group_by_length, where at least half the steps are on-policy (lmbda "
                                        ">= 0.5, or seq_kd), conversations have several target turns and "
                                        "dataloader_num_workers is 0: each row's "
                                        "on-policy turn is drawn when the epoch's batches are made, and rows are "
                                        "grouped by the length of the prompt before it, not of the whole "
                                        "conversation (less padding in the prompts)."})
    generation_dtype: GenerationDtype = field(
        default="auto", metadata={"help": "On-policy samples from a copy of the student in this dtype; auto: "
                                          "bfloat16 for an fp32 student on a GPU training in bf16, else the student "
                                          "itself (on a CPU, a bf16 copy's samples learned worse); float32: always "
                                          "the student itself."})
    inverse_cdf_sampling: bool = field(
        default=True, metadata={"help": "On a CPU, each sampled token is drawn by inverting the cumulative "
                                        "distribution, not by torch.multinomial's vocabulary-wide random fill (the "
                                        "same distribution; 11 % off decoding)."})
    packed_generation: bool = field(
        default=True, metadata={"help": "On a CPU, the bf16 sampling copy's linear layers run on oneDNN's "
                                        "pre-packed weights, packed again for each generation (the same outputs; "
                                        "generation about 25 % faster); without a copy (the fp32 student "
                                        "sampling itself with no mixed precision, as auto has it on a CPU), the "
                                        "student's own layers but its output head decode on packed fp32 weights "
                                        "(logits within 1e-5; generation about 33 % faster on AVX2)."})
    lean_decoding: bool = field(
        default=True, metadata={"help": "With packed_generation, where the fp32 student samples itself, each Llama "
                                        "or Qwen2 decoder layer decodes through a lean forward (q, k and v as one "
                                        "packed product, gate and up too, PyTorch's rms_norm): the same outputs "
                                        "within rounding, with fewer calls per token (gkd/lean_decoding.py)."})
    prefill_once: bool = field(
        default=True, metadata={"help": "On-policy steps without gradient checkpointing run each prompt through the "
                                        "student once: the forward that generation starts from is the training "
                                        "forward's (it keeps its graph), and the training forward goes on from its "
                                        "cache over the completion only (the same loss within rounding)."})
    replay_generation: bool = field(
        default=True, metadata={"help": "On-policy steps under gradient checkpointing, where the student samples "
                                        "itself, take each decoder layer's output recorded while it generated "
                                        "instead of running the layer in the training forward; backward recomputes "
                                        "it as checkpointing does (the same loss within rounding)."})
    lean_recompute: bool = field(
        default=True, metadata={"help": "With replay_generation and lean_activations, backward's recompute of a "
                                        "Llama, Qwen2, Qwen3 or Mistral decoder layer skips its MLP's output (the "
                                        "down projection), which only goes into the residual sum whose value the "
                                        "recompute does not use: the same gradients, bit for bit."})
    keep_freed_memory: bool = field(
        default=True, metadata={"help": "On a Linux CPU, glibc's malloc keeps the large blocks a step frees for the "
                                        "next step instead of returning them to the kernel, which faulted their "
                                        "pages in again every step (gkd/allocator.py); process-wide."})
    compact_optimizer: bool = field(
        default=True, metadata={"help": "On a CPU, where the optimizer is transformers' default AdamW, AdamW keeps "
                                        "its two moments in bf16, rounded stochastically (their expected value is "
                                        "fp32 AdamW's), instead of fp32: 310 MB less for the 15-layer builtin "
                                        "student (gkd/compact_adamw.py); false: transformers' fused fp32 AdamW."})
    math_attention: bool = field(
        default=True, metadata={"help": "Under bf16 autocast on a CPU the student trains with PyTorch's math "
                                        "attention kernel (the flash kernel's bf16 backward took twice as long); "
                                        "false: PyTorch's own choice."})
    lean_activations: bool = field(
        default=True, metadata={"help": "The student's gated MLPs (Llama, Qwen2, Qwen3, Mistral) keep gate and up for "
                                        "backward, not also silu(gate) and the product, and without gradient "
                                        "checkpointing its RMSNorms keep their input, not also the normalised "
                                        "input; backward makes those again: the same gradients, bit for bit "
                                        "(gkd/lean_activations.py)."})


SETTINGS = {f.name: f for f in dataclasses.fields(AtlasSettings)}


def setting(name: str, **constraints: Any):
    """The profile schema's pydantic Field for our setting `name`: its default and help from AtlasSettings, plus
    the profile's own validation (`ge=0`, ...)."""
    from pydantic import Field

    declared = SETTINGS[name]
    return Field(declared.default, description=declared.metadata["help"], **constraints)
