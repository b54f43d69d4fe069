"""Models evaluated on the spot, as `train` evaluates: the same eval split, scorer and generation settings.

`evaluate_models` is what `compare --model SPEC --traces FILE` runs: it splits the traces
exactly as `train` does (the profile's filters, data.eval_split, data.prompt,
trainer.max_length, trainer.seed), keeps at most trainer.eval_max_sessions eval
conversations, and generates greedily up to trainer.max_new_tokens with each model in
turn, timing the generation to give tokens/s on this machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Profile
from ..progress import Event
from ..traces.jsonl import check_trace_file

if TYPE_CHECKING:
    from .results import EvalResult


@dataclass
class ModelEvaluation:
    spec: str
    """The spec as given."""
    name: str
    """Its short display name (smollm2-135m@15L, Qwen2.5-7B-Instruct)."""
    path: str
    """What it was loaded from."""
    result: EvalResult
    parameters: int
    seconds: float
    """Wall time of the generation over the eval conversations."""
    tokens_per_second: float | None
    """Generated tokens (up to each EOS) / seconds; batched as trainer.per_device_eval_batch_size."""


def evaluate_models(specs: list[str], profile: Profile, traces: str, *, skip_invalid: bool = False,
                    on_event: Event | None = None) -> list[ModelEvaluation]:
    """Each model's success rates (final answer, step, episode), avg tokens and generation speed on `train`'s eval
    split of `traces`.

    Reports "stage" (text), "prepare" ((phase, done, total) of a one-time model preparation) and "progress"
    ((done, total) of the current model) through `on_event`.
    """
    import gc

    from .. import models
    from ..data import prepare_for_profile
    from .generation import evaluate_conversations

    emit = on_event or (lambda kind, data: None)
    trust, t = profile.model.trust_remote_code, profile.trainer
    resolved = [models.resolve_model_spec(spec, profile.model.family) for spec in specs]
    check_trace_file(traces)  # before minutes of preparing models
    emit("stage", "Preparing models")
    paths = [models.materialize(spec, lambda phase, done, total: emit("prepare", (phase, done, total)))
             for spec in resolved]
    emit("stage", f"Loading traces from {traces}")
    # train measures lengths with the student's tokenizer; here the first model's stands in for it.
    prepared = prepare_for_profile(profile, traces=traces, skip_invalid=skip_invalid,
                                   tokenizer=models.load_tokenizer(paths[0], trust_remote_code=trust))
    eval_rows = prepared.eval_sample(t.eval_max_sessions)
    conversations, references = [r["messages"] for r in eval_rows], [r["reference"] for r in eval_rows]
    targets = [r.get("targets") for r in eval_rows]
    evaluations = []
    for spec, path in zip(resolved, paths):
        emit("stage", f"Evaluating {spec.spec} on {len(eval_rows)} eval conversations")
        tokenizer = models.load_tokenizer(path, trust_remote_code=trust)
        model = models.load_model(path, dtype=profile.model.dtype, trust_remote_code=trust)
        started = time.perf_counter()
        # every turn generated (no verification): the row's tokens/s is the model's generation speed
        result = evaluate_conversations(model, tokenizer, conversations, references, targets=targets, scorer=t.scorer,
                                        max_new_tokens=t.max_new_tokens, batch_size=t.per_device_eval_batch_size,
                                        progress=lambda done, total: emit("progress", (done, total)), verify=False)
        seconds = time.perf_counter() - started
        generated = sum(episode.tokens for episode in result.episodes)
        evaluations.append(ModelEvaluation(spec.spec, spec.name, path, result, models.count_parameters(model),
                                           seconds, generated / seconds if seconds > 0 else None))
        del model  # one model in memory at a time: a teacher and its students may not fit together
        gc.collect()
    return evaluations
