"""The teacher store and a profile: the key a run with this profile expects (`run_key`), building a store for it
(`build_for_profile`, what `atlas-distill teacher-store build` calls) and opening one for a run (`open_for_run`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..config import Profile
from ..errors import TrainingError, UsageError, out_of_memory
from .build import BuildResult, build_teacher_store
from .fingerprint import row_keys, teacher_fingerprint, tokenizer_fingerprint
from .store import StoreKey, TeacherStore

DEFAULT_K = 1024  # 8-bit, sorted-delta ids, zlib: 1,886 B/position, 5.0 % below exact (fp32 k=256: 2,052 B, 10.9 %)


def run_key(profile: Profile, *, teacher_name: str, teacher_path: str, tokenizer, k: int,
            teacher_dtype: str = "auto") -> StoreKey:
    """The StoreKey of a run of `profile` with this teacher and tokenizer (the vocabulary is the tokenizer's: the
    shared one, models.shared_vocab_size)."""
    t = profile.trainer
    return StoreKey(teacher=teacher_name, teacher_fingerprint=teacher_fingerprint(teacher_path),
                    tokenizer=tokenizer_fingerprint(tokenizer), max_length=t.max_length, temperature=t.temperature,
                    vocab=len(tokenizer), targets=profile.data.targets, k=k, teacher_dtype=teacher_dtype)


def build_for_profile(profile: Profile, out: str | Path, *, db_url: str | None = None, traces: str | None = None,
                      k: int = DEFAULT_K, batch_size: int = 8, restart: bool = False, skip_invalid: bool = False,
                      on_event: Callable | None = None) -> BuildResult:
    """A store of the profile's teacher over every conversation `train` would use with this profile (its training
    and evaluation split both), encoded with the student's tokenizer, as `train` encodes them."""
    from .. import models
    from ..data import prepare_for_profile
    from ..demo import DEMO_TRACES

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("`teacher-store build` runs in one process; it was started in several (WORLD_SIZE="
                         f"{os.environ['WORLD_SIZE']}), which would each write the same store.",
                         fix="Run it with plain `atlas-distill teacher-store build`, not under accelerate launch or "
                         "torchrun.")
    emit = on_event or (lambda kind, data: None)
    trust = profile.model.trust_remote_code
    teacher_spec = models.resolve_model_spec(profile.teacher_model_name_or_path, profile.model.family)
    student_spec = models.resolve_model_spec(profile.model.model_name_or_path, profile.model.family)
    emit("stage", "Preparing models (first use builds converted, specialised or pruned models into the cache)")
    teacher_path = models.materialize(teacher_spec)
    tokenizer = models.load_tokenizer(models.materialize(student_spec), trust_remote_code=trust)
    models.shared_vocab_size(tokenizer, models.load_tokenizer(teacher_path, trust_remote_code=trust))
    emit("stage", "Loading traces")
    if db_url is None and traces is None:
        traces = str(DEMO_TRACES)
    prepared = prepare_for_profile(profile, db_url=db_url, traces=traces, tokenizer=tokenizer,
                                   skip_invalid=skip_invalid)
    init = profile.teacher_model_init_kwargs
    loaded_as = models.teacher_loaded_as(teacher_path, init.dtype, trust_remote_code=trust,
                                         load_in_8bit=init.load_in_8bit, load_in_4bit=init.load_in_4bit)
    key = run_key(profile, teacher_name=teacher_spec.name, teacher_path=teacher_path, tokenizer=tokenizer,
                  k=min(k, len(tokenizer)), teacher_dtype=loaded_as)

    def load_teacher():
        emit("stage", "Running the teacher over every target position")
        return models.load_teacher(teacher_path, init.dtype, trust_remote_code=trust, load_in_8bit=init.load_in_8bit,
                                   load_in_4bit=init.load_in_4bit)

    try:
        return build_teacher_store(out, key, prepared.train + prepared.eval, tokenizer, load_teacher,
                                   batch_size=batch_size, restart=restart,
                                   on_progress=lambda done, total: emit("step", (done, total)))
    except RuntimeError as exc:
        if not out_of_memory(exc):
            raise
        raise TrainingError(f"Out of memory while running the teacher: {str(exc).splitlines()[0]}",
                            fix=f"Run the same command again with a smaller --batch-size (this one: {batch_size}); it "
                            "resumes after the shards already written. An 8-bit teacher "
                            "(teacher_model_init_kwargs.load_in_8bit=true, CUDA only) needs a store of its own.") \
            from None


def open_for_run(path: str | Path, profile: Profile, *, teacher_name: str, teacher_path: str, tokenizer,
                 rows: list[dict]) -> TeacherStore:
    """The store at `path`, checked whole and refused unless it was built for this run's teacher, tokenizer,
    max_length, temperature and targets and holds every one of `rows`."""
    store = TeacherStore.open(path)
    key = run_key(profile, teacher_name=teacher_name, teacher_path=teacher_path, tokenizer=tokenizer, k=store.key.k)
    store.check_for(key, row_keys(rows, tokenizer, profile.trainer.max_length), "conversations of this run")
    return store
