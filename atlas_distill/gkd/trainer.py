"""AtlasGKDTrainer: TRL's GKD trainer, fed from Atlas traces, evaluated for real.

On top of `trl.experimental.gkd.GKDTrainer` (its on-policy generation and generalized
JSD are used as they are), this trainer:
- builds its datasets from Postgres (`db_url=`) or a trace file (`traces=`), and learns every
  target turn of a conversation (each action of the agent and the final answer; `args.targets`):
  its collator (gkd/collator.py) labels every target span for one off-policy pass and picks one
  target turn per conversation, seeded, as the on-policy prompt;
- applies `temperature` in the divergence too (TRL only samples with it);
- compares teacher and student over their shared real vocabulary, so models
  with the same tokenizer but differently padded embeddings work (Qwen2.5 7B/3B);
- runs an off-policy warmup (lmbda 0, its own beta) for `offpolicy_warmup_steps`,
  and draws on/off-policy from its own seeded RNG, not Python's global one;
- evaluates by generating every target turn of the eval sessions and judging it:
  eval/success_rate (final answer), eval/step_success_rate, eval/episode_success_rate,
  eval/avg_tokens and the baseline comparison metrics.

It is also faster and leaner than GKDTrainer (issue 5; benchmarks/train_bench.py measures both).
Each speedup is on by default and has a switch to turn it off:
- `kv_cache_generation`: on-policy generation uses the KV cache, also under gradient checkpointing
  (TRL then generates without one; checkpointing is off during `generate` either way);
- `chunked_loss`: the divergence is computed from the completion positions' hidden states only,
  projected through both lm_heads in chunks (gkd/divergence.py), so no B x L x V logits exist, each chunk's
  gradient taken in forward (nothing recomputed in backward); the teacher runs its backbone only, under
  `torch.inference_mode`;
- `teacher_cache_topk`: off-policy batches (lmbda < 1) keep the teacher's top-k log-probs plus a tail
  bucket per position; when the same example comes back (the next epoch) the teacher does not run;
- `teacher_store`: off-policy batches read the teacher's top-k from a store built before training
  (`atlas-distill teacher-store build`, teacher_store/) and the teacher does not run; `atlas-distill train` does not
  load it at all when no step is on-policy (an `UnloadedTeacher` stands in its place);
- `group_by_length`: batches are drawn from examples of similar length, so they are less padding;
- `group_by_turn`: multi-turn rows grouped by the length of the prompt of the turn drawn for each this epoch, not the
  whole conversation's, where it applies (`_turns_grouped`; gkd/turn_sampler.py);
- `inverse_cdf_sampling`: on a CPU each sampled token is drawn by inverting the cumulative distribution
  (gkd/sampling.py), not by torch.multinomial's vocabulary-wide fill of random numbers: the same distribution,
  11 % off decoding;
- `packed_generation`: on a CPU, the bf16 sampling copy's linear layers run on oneDNN's pre-packed weights
  (gkd/packed_linear.py), packed again for each generation: a step's generation 0.87-0.92 s instead of 1.15-1.25;
  where there is no copy (the fp32 student sampling itself, as "auto" has it on a CPU), the student's own linear
  layers but its output head decode on packed fp32 weights: 1.71 s instead of 2.56 on AVX2;
- `lean_decoding`: there, the fp32 student's Llama and Qwen2 decoder layers decode through a lean forward (q, k and
  v as one packed product, gate and up too, PyTorch's rms_norm; gkd/lean_decoding.py): the same outputs within
  rounding, with fewer calls per token;
- `prefill_once`: without gradient checkpointing, an on-policy step runs the prompt through the student once: the
  prompt's training forward (with gradient) fills the KV cache generation starts from, and the training forward goes
  on over the completion only (gkd/prompt_pass.py);
- `replay_generation`: with gradient checkpointing, where the student samples itself, each decoder layer's output is
  recorded while it generates, and the training forward returns those instead of running the layers; backward
  recomputes each layer from its input, as checkpointing does (gkd/replay.py);
- `lean_recompute`: in that recompute, a Llama, Qwen2, Qwen3 or Mistral layer's MLP returns zeros instead of its
  output, which only goes into the residual sum whose value nothing reads (gkd/lean_activations.py);
- `keep_freed_memory`: on a Linux CPU, glibc's malloc keeps the large blocks a step frees (the [V, H] gradient, the
  loss's tiles) for the next step instead of unmapping them and faulting new pages in (gkd/allocator.py);
- `compact_optimizer`: on a CPU, transformers' default AdamW becomes `CompactAdamW` (gkd/compact_adamw.py), which keeps
  both moments in bf16, rounded stochastically: half the optimizer state (310 MB less for the 15-layer builtin);
- `math_attention`: under bf16 autocast on a CPU the student trains with the math attention kernel
  (gkd/attention.py), whose bf16 backward is twice as fast as the flash kernel's;
- `lean_activations`: the student's gated MLPs keep gate and up for backward, not also silu(gate) and their
  product, and (without gradient checkpointing) its RMSNorms keep their input, not also the normalised input; backward
  makes those again (gkd/lean_activations.py): the same gradients, bit for bit, with fewer activations kept;
- `generation_dtype`: on-policy samples come from a bf16 copy of the student (filled from it for each generation,
  its weights freed between generations) on a GPU training in bf16; on a CPU "auto" samples from the student itself,
  as "float32" always does: a bf16 copy's samples are not the fp32 student's own distribution (a KL of 0.024 per
  token, benchmarks/sampling_fidelity.py), and ours learned worse from them over 30 on-policy steps
  (benchmarks/README.md). "bfloat16" keeps the copy: 1.5x faster decoding on a CPU with native bf16.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from ..errors import TrainingError
from ..models import contiguous_head_input, loading, shared_vocab_size
from . import (allocator, attention, divergence, lean_decoding, packed_linear, prompt_pass, replay, tied_gradient,
               topk_format, turn_sampler)
from .collator import ROW_COLUMN, TargetSpanCollator
from .compact_adamw import CompactAdamW
from .lean_activations import lean_activations
from .sampling import inverse_cdf_sampling
from .config import AtlasGKDConfig, GKDConfig
from .settings import AtlasSettings
from .teacher_cache import TeacherCache
from .trl_surface import GKDTrainer, SFTTrainer, _ForwardRedirection, unwrap_model_for_generation

__all__ = ["AtlasGKDTrainer", "AtlasGKDConfig", "GKDConfig"]


@contextmanager
def _declared_vocab_matching(student, teacher):
    """GKDTrainer refuses models whose config.vocab_size differ; padded embeddings of one tokenizer are fine here
    (the divergence is taken over the shared rows), so the teacher's declared size matches during its checks."""
    student_size = student.config.get_text_config().vocab_size
    teacher_config = teacher.config.get_text_config()
    declared = teacher_config.vocab_size
    teacher_config.vocab_size = student_size
    try:
        yield
    finally:
        teacher_config.vocab_size = declared


def _refuse_data_parallel(args) -> None:
    """transformers wraps the student in nn.DataParallel when one process sees several GPUs; our forward (the
    chunked loss, the teacher beside it) assumes one device per process."""
    if args.n_gpu > 1:
        raise TrainingError(
            f"This process sees {args.n_gpu} GPUs and was not started by a launcher, so transformers would train "
            "with nn.DataParallel, which atlas-distill does not support (one process must drive one GPU).",
            fix="Start one process per GPU: `torchrun --nproc_per_node N -m atlas_distill.cli train ...` or "
            "`accelerate launch --config_file accelerate_configs/ddp.yaml -m atlas_distill.cli train ...`; "
            "or use one GPU: CUDA_VISIBLE_DEVICES=0 atlas-distill train ...")


def _quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


class _SyncedGeneration:
    """A model whose generate() keeps every process in step (synced_gpus): under FSDP each decoding step
    all-gathers weights, so a process whose samples all ended must go on stepping until every process is done.
    transformers turns this on by itself only for modules it wrapped in FSDP itself, not accelerate's."""

    def __init__(self, model) -> None:
        self.model = model

    def generate(self, **kwargs):
        return self.model.generate(synced_gpus=True, **kwargs)


class _FromCache:
    """A model whose generate() starts from a filled KV cache (the prompt's pass, gkd/prompt_pass.py)."""

    def __init__(self, model, cache) -> None:
        self.model, self.cache = model, cache

    def generate(self, **kwargs):
        return self.model.generate(cache=self.cache, **kwargs)


def _turns_grouped(args, collator, train_dataset) -> bool:
    """Whether on-policy turns are drawn by the sampler and rows grouped by the drawn prompt's length
    (`group_by_turn`, gkd/turn_sampler.py): with group_by_length, where at least half the steps generate from a drawn
    turn (lmbda >= 0.5, or seq_kd, whose teacher generates from it), some row has several target turns, our collator
    collates, and in this process (no data loader workers, which would not see the sampler's draws)."""
    return bool(args.group_by_length and args.group_by_turn and (args.lmbda >= 0.5 or args.seq_kd)
                and args.dataloader_num_workers == 0 and isinstance(collator, TargetSpanCollator)
                and turn_sampler.several_turns(train_dataset))


def _with_lengths(dataset, tokenizer):
    """The dataset with a `length` column (prompt + answer tokens) for the length-grouped sampler; data.py's
    prepare_conversations already counts them when it has a tokenizer, so this is for datasets built without."""
    if "length" in dataset.column_names or tokenizer is None or "messages" not in dataset.column_names:
        return dataset
    lengths = [len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
               for messages in dataset["messages"]]
    return dataset.add_column("length", lengths)


class AtlasGKDTrainer(GKDTrainer):
    """TRL's GKDTrainer on Atlas traces. It takes TRL's arguments, with `args` an AtlasGKDConfig (every setting of
    ours lives there), plus upstream's `db_url=` / `traces=` and `min_reward=` to build its own datasets when
    `train_dataset` is not given. After construction, `on_evaluation` may be set to a callable that receives each
    generation evaluation (`last_generation_eval`)."""

    def __init__(self, model=None, teacher_model=None, args: AtlasGKDConfig | None = None, *,
                 db_url: str | None = None, traces: str | None = None, min_reward: float | None = 0.8,
                 train_dataset=None, eval_dataset=None, processing_class=None, teacher_store=None, **kwargs):
        if not isinstance(args, AtlasSettings):
            raise TypeError("AtlasGKDTrainer needs atlas-distill's config as `args`: `from atlas_distill import "
                            "GKDConfig` (TRL's GKDConfig plus our settings), not "
                            f"{type(args).__module__}.{type(args).__name__}.")
        if train_dataset is None:
            from ..data import build_gkd_dataset

            train_dataset, built_eval = build_gkd_dataset(
                db_url, traces=traces, min_reward=min_reward, learning_key=args.learning_key,
                eval_split=args.eval_split, seed=args.seed, tokenizer=processing_class, max_length=args.max_length,
                targets=args.targets)
            eval_dataset = built_eval if eval_dataset is None else eval_dataset
        _refuse_data_parallel(args)
        self._given_optimizer = kwargs.get("optimizers", (None, None))[0] is not None
        if args.ddp_find_unused_parameters is None:
            # every trainable parameter (the whole student, or its LoRA adapters) is used in every forward; left
            # unset, transformers would search for unused ones each step for a PEFT model (not a PreTrainedModel)
            args.ddp_find_unused_parameters = False
        if kwargs.get("data_collator") is None and processing_class is not None:
            kwargs["data_collator"] = TargetSpanCollator(processing_class, args.max_length, seed=args.seed)
        if args.group_by_length and hasattr(train_dataset, "column_names"):
            # Trainer applies the strategy to the eval sampler too, so both datasets carry lengths.
            train_dataset = _with_lengths(train_dataset, processing_class)
            if hasattr(eval_dataset, "column_names"):
                eval_dataset = _with_lengths(eval_dataset, processing_class)
            args.train_sampling_strategy, args.length_column_name = "group_by_length", "length"
        self.groups_by_turn = _turns_grouped(args, kwargs.get("data_collator"), train_dataset)
        if self.groups_by_turn:  # each row's index, by which the collator finds the turn the sampler drew for it
            train_dataset = turn_sampler.with_row_index(train_dataset)
        with _declared_vocab_matching(model, teacher_model):
            super().__init__(model=model, teacher_model=teacher_model, args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self._turn_batches: turn_sampler.TurnGroupedSampler | None = None
        self.zero3 = bool(self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3)
        if self.zero3 and _quantized(teacher_model):
            raise TrainingError("An 8-bit or 4-bit teacher cannot be partitioned by DeepSpeed ZeRO-3.",
                                fix="Use accelerate_configs/fsdp.yaml or DDP with the quantized teacher, or load the "
                                "teacher unquantized (teacher_model_init_kwargs.load_in_8bit/load_in_4bit=false).")
        if self.is_fsdp_enabled and not _quantized(teacher_model):
            # accelerate does not move a model it prepares for evaluation under FSDP: the frozen teacher is placed
            # whole on each process's GPU (it is never trained, so it needs no sharded optimizer state)
            self.teacher_model = self.teacher_model.to(self.accelerator.device)
        for each in (self.model, self.teacher_model):  # models given to the Python API, not only load_model's
            contiguous_head_input(self.accelerator.unwrap_model(each))
        self.shared_vocab = shared_vocab_size(processing_class, processing_class, self.model, teacher_model)
        self.on_evaluation: Callable[[dict[str, Any]], None] | None = None
        self.step_beta = self.beta
        self.policy_rng = random.Random(args.seed)
        self.last_generation_eval: dict[str, Any] | None = None
        if args.kv_cache_generation:  # unwrap_model_for_generation switches checkpointing off around generate
            self.generation_config.use_cache = self.generation_kwargs["use_cache"] = True
        # Under ZeRO-3 the weights are empty outside their module's forward, and the chunked loss reads both lm_heads
        # outside it: the full-logits path runs there (and, with it, no teacher cache whose per-process hits could
        # let one process skip the teacher forward's all-gathers while the others wait in them).
        self.chunked_loss = (args.chunked_loss and not self.zero3 and divergence.plain_head(self.model)
                             and divergence.plain_head(teacher_model))
        self.teacher_store = teacher_store if teacher_store is not None else self._open_store(args.teacher_store)
        if self.teacher_store is not None and not self.chunked_loss:
            raise TrainingError("trainer.teacher_store needs the chunked loss, which this run does not use "
                                "(chunked_loss off, DeepSpeed ZeRO-3, or a model whose logits are rescaled).",
                                fix="Set trainer.chunked_loss=true, or train without trainer.teacher_store.")
        self.teacher_cache = (TeacherCache(args.teacher_cache_topk, self.shared_vocab)
                              if self.chunked_loss and args.teacher_cache_topk > 0 and self.teacher_store is None
                              else None)
        self._forward_redirection = _ForwardRedirection()
        self._batch_from_dataset = True
        if self.args.bf16 and self.args.device.type == "cpu" and not loading.cpu_bf16():
            warnings.warn("bf16=True trains this CPU run under bf16 autocast, but this CPU has no native bf16 "
                          "(AVX512-BF16 or AMX): a GKD step measured 7x slower than in fp32. Train in fp32: "
                          "GKDConfig(bf16=False); with `atlas-distill train`, model.dtype=auto or float32.",
                          stacklevel=2)
        self._sampler: torch.nn.Module | None = None
        self._sampler_packs = False
        self._prompt_pass: prompt_pass.PromptPass | None = None
        self._plain_cache = prompt_pass.fits(self.accelerator.unwrap_model(self.model))
        self._replayable = replay.fits(self.accelerator.unwrap_model(self.model))
        self._recording: replay.Recording | None = None
        if self.args.keep_freed_memory and self.args.device.type == "cpu":
            student = self.accelerator.unwrap_model(self.model)
            allocator.keep_freed_memory(max(p.numel() * p.element_size() for p in student.parameters()))

    def _get_train_sampler(self, train_dataset=None):
        """transformers' sampler, or where `groups_by_turn` (set at construction), rows grouped by the length of the
        prompt of the turn drawn for each this epoch (gkd/turn_sampler.py); the prompts' lengths are measured once
        per training dataset and batch size."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not self.groups_by_turn or ROW_COLUMN not in getattr(dataset, "column_names", ()):
            return super()._get_train_sampler(train_dataset)
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        built = self._turn_batches
        if built is None or built.dataset is not dataset or built.batch_size != batch:
            self._turn_batches = built = turn_sampler.TurnGroupedSampler(dataset, self.data_collator, batch,
                                                                         self.args.seed)
        return built

    def _open_store(self, path: str | None):
        """The store named by `teacher_store`, checked against this trainer's teacher, tokenizer, settings,
        training and eval rows (`atlas-distill train` opens and checks it before loading models, and passes it in)."""
        if path is None:
            return None
        from ..teacher_store import StoreKey, TeacherStore, row_keys, teacher_fingerprint, tokenizer_fingerprint

        store = TeacherStore.open(path)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        tokenizer = self.processing_class
        name = teacher.name_or_path
        key = StoreKey(teacher=name, teacher_fingerprint=teacher_fingerprint(name),
                       tokenizer=tokenizer_fingerprint(tokenizer), max_length=self.args.max_length,
                       temperature=self.temperature, vocab=self.shared_vocab, targets=self.args.targets, k=store.key.k)
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset or []]
        rows = list(self.train_dataset or []) + [row for part in evals for row in part]
        store.check_for(key, row_keys(rows, tokenizer, self.args.max_length), "training and eval conversations")
        return store

    @property
    def teacher_loaded(self) -> bool:
        from ..teacher_store.unloaded import UnloadedTeacher

        return not isinstance(self.accelerator.unwrap_model(self.teacher_model), UnloadedTeacher)

    def in_warmup(self) -> bool:
        return self.state.global_step < self.args.offpolicy_warmup_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.chunked_loss:  # evaluation's prediction_step wants the logits
            return self._logits_loss(model, inputs, return_outputs, num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)
        # Through the wrapper's forward, so DDP/FSDP/DeepSpeed see the student's forward pass; the redirection
        # bypasses the autocast accelerate puts around that forward, so mixed precision is entered here.
        with self.accelerator.autocast():
            return self._forward_redirection(model, unwrapped, self._chunked_loss, unwrapped, inputs,
                                             num_items_in_batch)

    def _chunked_loss(self, student, inputs, num_items_in_batch=None):
        mask = inputs["labels"][:, 1:] != -100
        prompt, self._prompt_pass = self._prompt_pass, None  # the prompt's pass serves one forward
        taken, self._recording = self._recording, None  # so does generation's recording
        if prompt is not None:
            student_hidden = prompt_pass.completion_hidden(student, prompt, inputs, mask)
        elif taken is not None:
            student_hidden = replay.completion_hidden(student, taken, inputs, inputs["prompt_attention_mask"], mask,
                                                      lean=self.args.lean_recompute)
        else:
            student_hidden = divergence.completion_hidden(student, inputs, mask)
        vocab, beta, temperature = self.shared_vocab, self.step_beta, self.temperature
        store = self.teacher_store if self._batch_from_dataset else None
        cache = self.teacher_cache if self._batch_from_dataset else None
        keys = topk_format.example_keys(inputs, mask) if store is not None or cache is not None else []
        cached = (store or cache).lookup(keys, student_hidden.device) if keys else None
        if store is not None and cached is None:
            raise TrainingError(f"A batch holds a conversation that the teacher store {store.path} does not.",
                                fix="Build the store from this run's traces and profile (`atlas-distill "
                                "teacher-store build`), or train without trainer.teacher_store.")
        if cached is not None:
            per_position = divergence.topk_divergence(student_hidden, student, vocab=vocab, beta=beta,
                                                      temperature=temperature, indices=cached[0],
                                                      teacher_values=cached[1], teacher_tail=cached[2])
        else:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            teacher.eval()
            with torch.inference_mode(), attention.for_inference(self.args):
                teacher_hidden = self._forward_redirection(self.teacher_model, teacher, divergence.completion_hidden,
                                                           teacher, inputs, mask)
                topk = (divergence.teacher_topk(teacher_hidden, teacher, vocab=vocab, k=cache.k,
                                                temperature=temperature) if cache is not None else None)
            if topk is not None:  # stored outside inference mode, so they can later be saved for backward
                cache.store(keys, mask.sum(dim=1).tolist(), topk)
            # An inference tensor cannot be saved for backward; this copy is only [N, H].
            per_position = divergence.chunked_divergence(student_hidden, teacher_hidden.clone(), student, teacher,
                                                         vocab=vocab, beta=beta, temperature=temperature)
        if num_items_in_batch is not None:
            return per_position.sum() / torch.as_tensor(num_items_in_batch, device=per_position.device)
        return per_position.sum() / mask.sum().clamp_min(1)

    def _logits_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """GKDTrainer.compute_loss with temperature and the shared vocabulary: both models' full logits."""
        student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self.teacher_model.eval()
        with torch.no_grad(), attention.for_inference(self.args):
            teacher_outputs = self.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        vocab = self.shared_vocab
        loss = self.generalized_jsd_loss(
            student_logits=student_outputs.logits[:, :-1, :vocab],
            teacher_logits=teacher_outputs.logits[:, :-1, :vocab],
            labels=inputs["labels"][:, 1:],
            beta=self.step_beta,
            temperature=self.temperature,
            num_items_in_batch=num_items_in_batch,
        )
        return (loss, student_outputs) if return_outputs else loss

    @property
    def synced_generation(self) -> bool:
        """Whether generate must keep the processes in step: sharded weights (FSDP, ZeRO-3), several processes."""
        return (self.is_fsdp_enabled or self.zero3) and self.accelerator.num_processes > 1

    @contextmanager
    def generation_view(self, model, *, gather: bool = True):
        """TRL's unwrap_model_for_generation (checkpointing off while generating, ZeRO-3 weights gathered unless
        `gather` is False), under this run's autocast, and without the hook it would leak: re-enabling gradient
        checkpointing registers the input embeddings' requires-grad hook again and forgets the last one, so every
        generation added one more hook to every later forward. The current one is removed first here."""
        unwrapped = self.accelerator.unwrap_model(model)
        if getattr(unwrapped, "is_gradient_checkpointing", False):
            unwrapped.disable_input_require_grads()
        with unwrap_model_for_generation(model, self.accelerator, gather_deepspeed3_params=gather,
                                         generation_kwargs=self.generation_kwargs,
                                         gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
                                         ) as view, self.accelerator.autocast():
            yield view

    def _generate_into(self, generator, inputs, prompt: prompt_pass.PromptPass | None = None) -> None:
        """Samples completions of inputs' prompts from `generator` and makes them the batch; from the prompt's
        pass (`prefill_once`) when one is given."""
        # on a CPU, each token's draw without multinomial's vocabulary-wide RNG fill
        with inverse_cdf_sampling() if self.args.inverse_cdf_sampling else nullcontext():
            if generator is self.model and self.generation_dtype is not None:
                try:
                    sampler = self._sampling_copy()
                    if prompt is not None:
                        sampler = _FromCache(sampler, prompt_pass.sampling_cache(prompt, self.generation_dtype))
                    ids, mask, labels = self.generate_on_policy_outputs(sampler, inputs, self.generation_config)
                finally:
                    self._release_sampling_copy()
            else:
                with self.generation_view(generator) as unwrapped:
                    sampler = _SyncedGeneration(unwrapped) if self.synced_generation else unwrapped
                    if prompt is not None:
                        sampler = _FromCache(sampler, prompt_pass.sampling_cache(prompt))
                    packing = lean_decoding if self.args.lean_decoding else packed_linear
                    packed = (packing.pack_for_decoding(unwrapped, self.args.per_device_train_batch_size)
                              if generator is self.model and self.packs_student_generation else [])
                    replays = generator is self.model and prompt is None and self.replays_generation
                    try:
                        with (replay.recording(unwrapped, inputs["prompts"].shape[1],
                                               self.generation_config.max_new_tokens)
                              if replays else nullcontext()) as taken:
                            ids, mask, labels = self.generate_on_policy_outputs(sampler, inputs,
                                                                                self.generation_config)
                    finally:
                        packed_linear.restore(packed)
                    self._recording = taken if replays and taken.covers(ids.shape[1] - 1) else None
        inputs["input_ids"], inputs["attention_mask"], inputs["labels"] = ids, mask, labels

    def _sampling_dtype(self, setting: str) -> torch.dtype | None:
        """The dtype of the student's sampling copy, or None to sample from the student itself.

        "auto" makes a bf16 copy of an fp32 student (its master weights) on a GPU training under bf16 mixed precision
        (autocast would cast every weight again at every decoded token), when the student is whole in each process
        (no LoRA wrapper, no FSDP/DeepSpeed sharding). On a CPU the student samples itself, in the arithmetic it
        trains in: a bf16 copy decoded 1.5x faster there (Zen 4), but its samples are not the fp32 student's own
        distribution (a KL of 0.024 per token, benchmarks/sampling_fidelity.py), and after 30 on-policy steps ours
        ended 0.0098 +- 0.0032 above DistillationTrainer's held-out divergence with it over eight seeds, level with it
        (+0.0006 +- 0.0032) with the fp32 student sampling itself (an AMX CPU, benchmarks/README.md).
        "bfloat16" makes the copy wherever the student is a whole fp32 one; "float32" never does.
        """
        student = self.accelerator.unwrap_model(self.model)
        if setting == "float32" or not (self.whole_student and student.dtype == torch.float32):
            return None
        if setting == "bfloat16":
            return torch.bfloat16
        on_cpu = next(student.parameters()).device.type == "cpu"
        return torch.bfloat16 if self.args.bf16 and not on_cpu else None

    def _sampling_copy(self) -> torch.nn.Module:
        """The student cast to generation_dtype, its weights copied from the student's current ones."""
        import copy

        student = self.accelerator.unwrap_model(self.model)
        if self._sampler is None:
            # Each weight is copied straight into generation_dtype (tied weights stay tied): a deepcopy first would
            # hold a second fp32 student for a moment, which set the run's peak memory. A weight that will only be
            # packed gets no plain copy (packed_linear.pack packs it from the student's).
            self._sampler_packs = self.packs_generation
            alone = packed_linear.packed_alone(student) if self._sampler_packs else set()
            alone.discard(id(next(student.parameters())))  # model.device / .dtype read the first parameter
            dtype = self.generation_dtype  # a property, worked out from the settings at each read
            memo = {id(p): torch.nn.Parameter(torch.empty_like(p, dtype=dtype, device="meta")
                                              if id(p) in alone else p.detach().to(dtype),
                                              requires_grad=False)
                    for p in student.parameters()}
            self._sampler = copy.deepcopy(student, memo).to(dtype).eval().requires_grad_(False)
            # SFTTrainer patches the student's forward on the instance (its fused lm_head) with a closure over the
            # student's own bound forward: a copied patch would run the fp32 student, not this copy.
            vars(self._sampler).pop("forward", None)
            if self._sampler.is_gradient_checkpointing:
                self._sampler.gradient_checkpointing_disable()
        else:
            with torch.no_grad():
                for target, source in zip(self._sampler.parameters(), student.parameters(), strict=True):
                    if not target.is_meta:
                        target.untyped_storage().resize_(target.numel() * target.element_size())
                        target.copy_(source)
        if self._sampler_packs:  # as decided when the copy was made (its packed-only weights hold nothing else)
            packed_linear.pack(self._sampler, self.args.per_device_train_batch_size, source=student)
        return self._sampler

    @property
    def whole_student(self) -> bool:
        """Whether this process holds the whole student as plain modules: no PEFT wrapper, no FSDP or DeepSpeed
        sharding (whose weights are views of flat buffers, or adapters over a frozen base)."""
        student = self.accelerator.unwrap_model(self.model)
        return not hasattr(student, "get_base_model") and not self.is_fsdp_enabled and not self.is_deepspeed_enabled

    @property
    def packs_generation(self) -> bool:
        """Whether the bf16 sampling copy runs its linear layers on oneDNN's packed weights (gkd/packed_linear.py):
        `packed_generation` on, a CPU whose oneDNN has bf16."""
        return (self.args.packed_generation and self.generation_dtype == torch.bfloat16
                and self.args.device.type == "cpu" and packed_linear.available())

    @property
    def packs_student_generation(self) -> bool:
        """Whether the fp32 student samples on-policy with its linear layers on oneDNN's packed fp32 weights while
        decoding (gkd/packed_linear.py `pack_for_decoding`): `packed_generation` on, no sampling copy, a whole fp32
        student (`whole_student`), no mixed precision, an x86 CPU."""
        student = self.accelerator.unwrap_model(self.model)
        return (self.args.packed_generation and self.generation_dtype is None and self.args.device.type == "cpu"
                and not (self.args.bf16 or self.args.fp16) and student.dtype == torch.float32
                and self.whole_student and packed_linear.available(torch.float32))

    @property
    def prefills_once(self) -> bool:
        """Whether on-policy steps run the prompt through the student once (gkd/prompt_pass.py): `prefill_once`
        on, the chunked loss, the KV cache in generation, no gradient checkpointing, one process with the whole
        student (`whole_student`), a plain KV cache. Not under checkpointing: transformers switches the KV cache off
        there, and keeping it (each layer's recompute reading the cache back) cost 34-43 MB at the step's peak on
        the 2-core CPUs measured, for 0.06 s of a 4.3 s step with native bf16 and 0.18 of 5.7 on AVX2
        (benchmarks/README.md)."""
        return (self.args.prefill_once and self.chunked_loss and self.args.kv_cache_generation
                and not self.args.gradient_checkpointing and self.accelerator.num_processes == 1
                and self.whole_student and self._plain_cache)

    @property
    def replays_generation(self) -> bool:
        """Whether on-policy steps take the training forward's layer outputs from generation (gkd/replay.py):
        `_replay_fits`, and the student samples itself (no sampling copy, which computes other outputs)."""
        return self._replay_fits and self.generation_dtype is None

    @property
    def _replay_fits(self) -> bool:
        """`replay_generation` on, gradient checkpointing, the chunked loss, the KV cache in generation, one process
        with the whole student, no dropout in it: where generation computes the training forward's layer outputs
        if the student samples itself."""
        return (self.args.replay_generation and self.args.gradient_checkpointing and self.chunked_loss
                and self.args.kv_cache_generation and self.generation_config.max_new_tokens is not None
                and self.accelerator.num_processes == 1 and self.whole_student and self._replayable)

    @property
    def generation_dtype(self) -> torch.dtype | None:
        """This step's sampling copy dtype, or None where the student samples itself (`_sampling_dtype`): read
        at every step, as the settings it depends on may change between steps (train_bench's `--alternate`)."""
        return self._sampling_dtype(self.args.generation_dtype)

    def _release_sampling_copy(self) -> None:
        """Frees the sampling copy's weights until the next generation fills them again: the copy is refreshed
        from the student for each generation anyway, and kept through the loss, backward and optimizer step it
        was part of the step's peak memory (its size in generation_dtype, 163 MB for train_bench's student)."""
        if self._sampler is not None:
            packed_linear.unpack(self._sampler)
            for weight in self._sampler.parameters():
                if not weight.is_meta:
                    weight.untyped_storage().resize_(0)

    def training_step(self, model, inputs, num_items_in_batch=None):
        warm = self.in_warmup()
        self.step_beta = self.args.offpolicy_warmup_beta if warm else self.beta
        lmbda = 0.0 if warm else self.lmbda
        self._batch_from_dataset = False
        on_policy = self.policy_rng.random() < lmbda
        prefill = on_policy and self.prefills_once  # generation happens inside the step's contexts, below
        if on_policy:
            if not prefill:
                self._generate_into(model, inputs)
        elif self.seq_kd:
            self._generate_into(self.teacher_model, inputs)
        else:
            self._batch_from_dataset = True
        # GKDTrainer.training_step would draw on/off-policy again; the step itself is SFT's.
        # FSDP and DeepSpeed hand out the weights as views of flat buffers whose gradients they manage themselves
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        student = self.accelerator.unwrap_model(model)
        with attention.for_training(self.args), \
                (tied_gradient.shared_gradient(student) if self.chunked_loss and not sharded else nullcontext()), \
                (lean_activations(student, norms=not self.args.gradient_checkpointing)
                 if self.args.lean_activations and not sharded else nullcontext()):
            if prefill:
                model.train()  # the prompt's pass is the training forward's first part
                with self.accelerator.autocast():
                    self._prompt_pass = prompt_pass.run(student, inputs["prompts"], inputs["prompt_attention_mask"])
                try:
                    with attention.for_inference(self.args):
                        self._generate_into(model, inputs, self._prompt_pass)
                    loss = SFTTrainer.training_step(self, model, inputs, self._loss_items(inputs, num_items_in_batch))
                finally:
                    self._prompt_pass = None
            else:
                try:
                    loss = SFTTrainer.training_step(self, model, inputs, self._loss_items(inputs, num_items_in_batch))
                finally:
                    self._recording = None
        self._check_finite_loss(loss)
        return loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        self.step_beta = self.beta
        # eval_loss is the loss over the eval batches as recorded: against the live teacher when it is loaded (exact,
        # never the top-k cache or store, whatever the last training step read), from the teacher store when not.
        saved = self.args.prediction_loss_only, self._batch_from_dataset
        self.args.prediction_loss_only, self._batch_from_dataset = True, not self.teacher_loaded
        try:
            metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self.args.prediction_loss_only, self._batch_from_dataset = saved
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None or len(dataset) == 0:
            return metrics
        extra = self.generation_metrics(dataset, prefix=metric_key_prefix)
        self.log({key: value for key, value in extra.items() if value is not None})
        metrics.update(extra)
        return metrics

    def generation_metrics(self, dataset, *, prefix: str = "eval") -> dict[str, Any]:
        """Generate every target turn of the eval sessions and judge it; add the baseline comparison when set."""
        from ..evaluate import baseline_summary

        limit = self.args.eval_max_sessions
        rows = dataset if limit is None else dataset.select(range(min(len(dataset), limit)))
        targets = list(rows["targets"]) if "targets" in rows.column_names else None
        result = self.evaluate_model(self.model_wrapped, list(rows["messages"]), list(rows["reference"]), targets)
        metrics: dict[str, Any] = {f"{prefix}_success_rate": result.success_rate,
                                   f"{prefix}_step_success_rate": result.step_success_rate,
                                   f"{prefix}_episode_success_rate": result.episode_success_rate,
                                   f"{prefix}_avg_tokens": result.avg_tokens}
        if self.args.baseline_success is not None:
            summary = baseline_summary(result, self.args.baseline_success, self.args.baseline_tokens,
                                       success_target=self.args.success_delta_target,
                                       token_target=self.args.token_reduction_target)
            metrics.update({"metrics/success_delta": summary.success_delta,
                            "metrics/token_reduction_pct": summary.token_reduction_pct,
                            "metrics/meets_target": summary.meets_target})
        else:
            summary = None
        self.last_generation_eval = {"step": self.state.global_step, "result": result, "summary": summary}
        if self.on_evaluation:
            self.on_evaluation(self.last_generation_eval)
        return metrics

    def evaluate_model(self, model, conversations: list, references: list[str], targets: list | None = None):
        """Generate and judge `model`'s turns (evaluate.evaluate_conversations); each process generates an equal
        share of all the sessions' turns and every process gets the same EvalResult, episodes in order."""
        from accelerate.utils import gather_object

        from ..evaluate import episode_turns, evaluate_conversations, generate_answers, judge

        # Sharded models (FSDP, ZeRO-3) generate in lockstep: no process may skip generating what it verified.
        kwargs = dict(max_new_tokens=self.args.max_new_tokens, batch_size=self.args.per_device_eval_batch_size,
                      verify=not (self.is_fsdp_enabled or self.is_deepspeed_enabled),
                      sharded=self.is_fsdp_enabled or self.zero3)
        unwrapped = self.accelerator.unwrap_model(model)
        if self.accelerator.device.type != "cpu" and next(unwrapped.parameters()).device.type == "cpu":
            # under FSDP / DeepSpeed the student is loaded on the CPU and reaches its GPU only in train(); before
            # that it is evaluated there too (a ZeRO-3 teacher's partitioned weights are already on the GPU)
            unwrapped.to(self.accelerator.device)
        # Under ZeRO-3 the teacher is never gathered whole on one GPU (it may not fit one): it generates sharded.
        with self.generation_view(model, gather=not (self.zero3 and model is self.teacher_model)) as unwrapped:
            if self.accelerator.num_processes == 1:
                return evaluate_conversations(unwrapped, self.processing_class, conversations, references,
                                              targets=targets, scorer=self.args.scorer, **kwargs)
            turns = episode_turns(self.processing_class, conversations, targets)
            flat = [turn for episode in turns for turn in episode]
            # Turns (not sessions) padded to equal shares: under FSDP / ZeRO-3 every process must make as many
            # generate calls, and sessions have different numbers of turns.
            with self.accelerator.split_between_processes(list(range(len(flat))), apply_padding=True) as mine:
                made = generate_answers(unwrapped, self.processing_class, [flat[i] for i in mine], **kwargs)
        by_index = dict(gather_object(list(zip(mine, made))))
        return judge(turns, [by_index[i] for i in range(len(flat))], references, self.args.scorer)

    @property
    def compacts_optimizer(self) -> bool:
        """Whether `compact_optimizer` applies: a CPU run whose optimizer is transformers' default AdamW (`optim`
        adamw_torch or adamw_torch_fused, no `optim_args`), not one given to the trainer or made by DeepSpeed."""
        from transformers.training_args import OptimizerNames

        default_adamw = (OptimizerNames.ADAMW_TORCH, OptimizerNames.ADAMW_TORCH_FUSED)
        return (self.args.compact_optimizer and self.args.device.type == "cpu" and self.args.optim in default_adamw
                and not self.args.optim_args and not self._given_optimizer and not self.is_deepspeed_enabled)

    def create_optimizer(self, model=None):
        """transformers' optimizer (its parameter groups, weight decay and arguments), as `CompactAdamW` where
        `compacts_optimizer`: AdamW with bf16 moments (gkd/compact_adamw.py)."""
        if self.optimizer is None and self.compacts_optimizer:
            args = self.args
            self.optimizer_cls_and_kwargs = (CompactAdamW, {
                "lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
                "seed": args.seed})
        return super().create_optimizer(model)

    def _loss_items(self, inputs, num_items_in_batch):
        """The token count the step's loss is divided by: transformers' `num_items_in_batch` for a dataset batch. It
        counts the target tokens of the dataset's batches before the step, but a batch this step generated has its
        loss over its completions instead (for the demo's tasks 128 generated tokens against 62 in the answers: the
        loss was twice their mean). So for one: its completion tokens, shared between the processes as
        `_get_num_items_in_batch` shares the dataset's, times the accumulation steps (whose later batches are not
        generated yet), which makes each batch's loss its completions' mean over the window, as TRL's trainers
        normalise by generated tokens."""
        if self._batch_from_dataset:
            return num_items_in_batch
        count = (inputs["labels"][:, 1:] != -100).sum()
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count.reshape(1)).sum() / self.accelerator.num_processes
        return count * getattr(self, "current_gradient_accumulation_steps", 1)  # set by train(), not before

    def _get_num_items_in_batch(self, batch_samples: list, device):
        """The loss's token count, per process. transformers counts the tokens of all processes and multiplies
        the loss by the process count in Trainer.compute_loss, which ours replaces: without this share, DDP's
        gradient average would be 1/N of the one-process gradient."""
        count = super()._get_num_items_in_batch(batch_samples, device)
        if count is not None and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            count = count / self.accelerator.num_processes
        return count

    def _check_finite_loss(self, loss: torch.Tensor) -> None:
        """Stop at the first NaN/inf loss of any process, before that step's optimizer update and checkpoint."""
        from pathlib import Path

        from ..outputs import last_complete_checkpoint

        losses = loss.detach().float().reshape(1)
        if self.accelerator.num_processes > 1:  # every process stops, not just the one that saw it
            losses = self.accelerator.gather(losses)
        bad = losses[~torch.isfinite(losses)]
        if bad.numel() == 0:
            return
        step = self.state.global_step + 1
        last = last_complete_checkpoint(Path(self.args.output_dir))
        kept = f"The last good checkpoint is {last} (--resume continues from it)." if last else \
            "No checkpoint was saved before it."
        raise TrainingError(
            f"The loss became {bad[0].item()} at step {step} (of {self.state.max_steps}); training stopped before "
            f"that step's update and saved nothing after it. {kept}",
            fix=f"Lower the learning rate (now {self.args.learning_rate:g}; trainer.learning_rate in a profile), "
            "check the traces for broken or empty answers, or train in bfloat16 or float32 rather than float16 "
            "(model.dtype in a profile; GKDConfig(bf16=True) or (bf16=False) in Python).")

    def _get_output_dir(self, trial) -> str:
        """The staging directory while `_save_checkpoint` runs, else the run directory."""
        return getattr(self, "_staging_root", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers writes checkpoint-N in place; here it is written under .checkpoint-staging/ and renamed
        into the run directory once whole, so a kill mid-save never leaves a partial checkpoint to resume from.
        A failed write (full disk) is an OutputError on every process, and the partial copy is removed."""
        import shutil
        from pathlib import Path

        from accelerate.utils import gather_object
        from transformers.trainer_utils import rotate_checkpoints

        from ..errors import OutputError
        from ..outputs import STAGING, discard_checkpoint, promote_checkpoint, write_failure

        run_dir = Path(super()._get_output_dir(trial))
        staged = run_dir / STAGING / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and staged.exists():
            shutil.rmtree(staged)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        self._staging_root, failure = str(staged.parent), None
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:  # noqa: BLE001 - a write failure is turned into an OutputError below
            failure = write_failure(exc, staged) or exc
        finally:
            self._staging_root = None
        # Every process learns whether any failed, so that all stop here rather than wait for each other.
        shared = failure if failure is None or isinstance(failure, OutputError) else repr(failure)
        reported = [f for f in gather_object([shared]) if f is not None] if self.accelerator.num_processes > 1 \
            else [shared] if failure else []
        if reported:
            if self.args.should_save:
                discard_checkpoint(staged)
            if failure is not None:
                raise failure
            raise reported[0] if isinstance(reported[0], OutputError) else TrainingError(
                f"Another process failed to save checkpoint-{self.state.global_step}: {reported[0]}")
        if self.args.should_save:
            promote_checkpoint(staged, run_dir / staged.name)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
