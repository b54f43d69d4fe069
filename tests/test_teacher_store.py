"""The teacher store (issue 16): its record format, building (resume, refusal), checks, and training from it with
the teacher unloaded. Tiny random models with the real SmolLM2 tokenizer; the CLI on them end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas_distill.errors import OutputError, TeacherStoreError
from atlas_distill.gkd import AtlasGKDTrainer, GKDConfig, divergence, topk_format
from atlas_distill.teacher_store import (StoreKey, TeacherStore, build_teacher_store, row_keys, teacher_fingerprint,
                                         tokenizer_fingerprint)
from atlas_distill.teacher_store.unloaded import UnloadedTeacher

K = 16


def rows(n=8):
    return [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}],
             "reference": f"It is {2 * i}."} for i in range(n)]


def store_key(teacher_dir, tokenizer, **changes) -> StoreKey:
    fields = dict(teacher="tiny", teacher_fingerprint=teacher_fingerprint(str(teacher_dir)),
                  tokenizer=tokenizer_fingerprint(tokenizer), max_length=128, temperature=0.9, vocab=len(tokenizer),
                  targets="all", k=K)
    return StoreKey(**(fields | changes))


def build(out, teacher_dir, data=None, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    key = kwargs.pop("key", None) or store_key(teacher_dir, tokenizer)
    return build_teacher_store(out, key, data or rows(), tokenizer,
                               lambda: AutoModelForCausalLM.from_pretrained(teacher_dir), batch_size=3, **kwargs)


def demo_traces(path, sessions: int):
    """The first `sessions` lines of the bundled demo traces, as a trace file."""
    import gzip

    from atlas_distill.demo import DEMO_TRACES

    with gzip.open(DEMO_TRACES, "rt") as source:
        path.write_text("".join(source.readline() for _ in range(sessions)))
    return path


def trainer_for(tmp_path, student_dir, teacher, eval_rows=None, **settings):
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    args = GKDConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=2, report_to=[],
                     max_new_tokens=4, use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
                     max_length=128, seed=3, bf16=False, lmbda=0.0, temperature=0.9, group_by_length=False,
                     **settings)
    return AtlasGKDTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), teacher_model=teacher, args=args,
                           train_dataset=Dataset.from_list(rows()),
                           eval_dataset=Dataset.from_list(eval_rows or rows(3)),
                           processing_class=tokenizer)


# The record format


@pytest.mark.parametrize("vocab", [49_152, 151_665])
def test_a_record_reads_back_its_tokens_and_log_probs_within_the_8_bit_step(vocab):
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(7, vocab) * 3, dim=-1)
    top = log_probs.topk(64, dim=-1)
    tail = divergence._tail(log_probs, top.indices)
    record = topk_format.encode(top.indices.to(torch.int32), top.values, tail, vocab)
    indices, values, read_tail = topk_format.decode(record, 7, 64, vocab)
    assert torch.equal(indices.sort(-1).values, top.indices.sort(-1).values)
    expected = log_probs.gather(-1, indices)
    step = (top.values.max(-1).values - top.values.min(-1).values) / topk_format.LEVELS
    # within half a code step, plus the renormalisation's shift of all of them (at most another half step)
    assert ((values - expected).abs() <= step.unsqueeze(-1) + 1e-5).all()
    total = torch.logsumexp(torch.cat([values, read_tail.unsqueeze(-1)], -1), -1)
    torch.testing.assert_close(total, torch.zeros(7), atol=1e-5, rtol=0)
    assert len(record) < 7 * (64 * (2 if vocab <= 2**16 else 4) + 64 + 12)  # compressed below its raw layout


def test_a_record_of_the_wrong_shape_is_refused():
    record = topk_format.encode(torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 4), torch.zeros(2), 100)
    with pytest.raises(ValueError, match="does not hold 3 positions"):
        topk_format.decode(record, 3, 4, 100)


def test_a_token_the_teacher_rules_out_stays_finite_in_the_record():
    log_probs = torch.log_softmax(torch.randn(2, 100), dim=-1)
    log_probs[0, :50] = float("-inf")  # e.g. a teacher that masks tokens, or probabilities that underflow
    top = log_probs.topk(80, dim=-1)
    record = topk_format.encode(top.indices.to(torch.int32), top.values, torch.full((2,), -1e4), 100)
    _, values, tail = topk_format.decode(record, 2, 80, 100)
    assert torch.isfinite(values).all() and torch.isfinite(tail).all()
    torch.testing.assert_close(values.exp().sum(-1), torch.ones(2), atol=1e-4, rtol=0)
    assert (values[0].sort(descending=True).values[50:] < -50).all()  # the ruled-out tokens stay near zero mass


def test_the_cache_reads_back_a_k_larger_than_the_vocabulary_and_an_example_with_no_positions():
    from atlas_distill.gkd.teacher_cache import TeacherCache

    cache = TeacherCache(k=500, vocab=100)  # teacher_topk then keeps all 100 tokens
    log_probs = torch.log_softmax(torch.randn(3, 100), dim=-1)
    top = log_probs.topk(100, dim=-1)
    cache.store([b"a", b"b"], [3, 0], (top.indices.to(torch.int32), top.values, torch.full((3,), -1e4)))
    indices, values, _ = cache.lookup([b"a", b"b"], "cpu")
    assert indices.shape == (3, 100)
    torch.testing.assert_close(values.exp().sum(-1), torch.ones(3), atol=1e-4, rtol=0)


# Building


def test_build_stores_every_conversation_and_reads_back_the_teachers_top_k(tmp_path, make_tiny_model):
    teacher_dir = make_tiny_model(seed=2)
    result = build(tmp_path / "store", teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    store = TeacherStore.open(tmp_path / "store")
    keys = row_keys(rows(), tokenizer, 128)
    assert result.examples == 8 and store.missing(keys) == 0 and result.resumed == 0
    assert result.bytes == (tmp_path / "store/shards/00000.bin").stat().st_size
    # one conversation, against the teacher run live on it
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    from atlas_distill.gkd.collator import TargetSpanCollator

    batch = TargetSpanCollator(tokenizer, 128)([rows()[5]])
    mask = batch["labels"][:, 1:] != -100
    with torch.inference_mode():
        hidden = divergence.completion_hidden(teacher, batch, mask)
        live = divergence.teacher_topk(hidden, teacher, vocab=len(tokenizer), k=K, temperature=0.9)
    indices, values, tail = store.lookup([keys[5]], "cpu")
    assert indices.shape == (int(mask.sum()), K)
    assert torch.equal(indices.sort(-1).values, live[0].long().sort(-1).values)
    torch.testing.assert_close(values.logsumexp(-1), live[1].logsumexp(-1), atol=0.02, rtol=0)


def test_a_killed_build_looks_incomplete_and_resumes_where_it_stopped(tmp_path, make_tiny_model):
    teacher_dir = make_tiny_model(seed=2)

    def killed(done, total):
        if done >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "store", teacher_dir, shard_bytes=1, on_progress=killed)  # a shard per batch
    assert not (tmp_path / "store/manifest.json").exists()
    with pytest.raises(TeacherStoreError, match="not complete"):
        TeacherStore.open(tmp_path / "store")
    (tmp_path / "store/shards/.00009.bin.tmp").write_bytes(b"half a shard")  # as a kill mid-write leaves it
    (tmp_path / "store/shards/00010.json").write_text('{"file": 3}')  # not a shard's index: ignored, removed
    (tmp_path / "store/shards/kept").mkdir()  # a directory someone made there is left alone
    result = build(tmp_path / "store", teacher_dir, shard_bytes=1)
    assert result.resumed == 6 and result.examples == 8
    assert not (tmp_path / "store/shards/.00009.bin.tmp").exists()
    assert not (tmp_path / "store/shards/00010.json").exists() and (tmp_path / "store/shards/kept").is_dir()
    build(tmp_path / "again", teacher_dir)
    resumed, fresh = TeacherStore.open(tmp_path / "store"), TeacherStore.open(tmp_path / "again")
    assert set(resumed.index) == set(fresh.index)
    assert build(tmp_path / "store", teacher_dir).resumed == 8  # complete: nothing is recomputed


def test_a_build_refuses_another_builds_directory_unless_restarted(tmp_path, make_tiny_model):
    teacher_dir = make_tiny_model(seed=2)
    build(tmp_path / "store", teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    with pytest.raises(TeacherStoreError, match="temperature: store 0.9, this run 0.5.*--restart"):
        build(tmp_path / "store", teacher_dir, key=store_key(teacher_dir, tokenizer, temperature=0.5))
    with pytest.raises(TeacherStoreError, match="the conversations"):
        build(tmp_path / "store", teacher_dir, data=rows(5))
    with pytest.raises(TeacherStoreError, match="teacher_dtype: store auto, this build bfloat16"):
        build(tmp_path / "store", teacher_dir, key=store_key(teacher_dir, tokenizer, teacher_dtype="bfloat16"))
    import fcntl

    with open(tmp_path / "store/.lock") as held:  # another build writing the store now
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(TeacherStoreError, match="Another `teacher-store build` is writing"):
            build(tmp_path / "store", teacher_dir)
    result = build(tmp_path / "store", teacher_dir, data=rows(5), restart=True)
    assert result.examples == 5 and result.resumed == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not a teacher store"):
        build(tmp_path / "other", teacher_dir)
    assert (tmp_path / "other/notes.txt").read_text() == "mine"


def test_a_build_out_of_memory_or_in_several_processes_is_refused_with_the_fix(tmp_path, make_tiny_model,
                                                                                  monkeypatch):
    from atlas_distill import models
    from atlas_distill.config import load_profile
    from atlas_distill.errors import TrainingError, UsageError
    from atlas_distill.teacher_store.recipe import build_for_profile

    teacher_dir = make_tiny_model(seed=2)
    traces = demo_traces(tmp_path / "traces.jsonl", 8)
    profile = load_profile("default", [f"teacher_model_name_or_path={teacher_dir}",
                                       f"model.model_name_or_path={teacher_dir}", "trainer.min_reward=0",
                                       "data.eval_split=0.25"])

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9000000000 bytes.")

    monkeypatch.setattr(models, "load_teacher", no_memory)
    with pytest.raises(TrainingError, match="Out of memory while running the teacher.*smaller --batch-size"):
        build_for_profile(profile, tmp_path / "store", traces=str(traces), batch_size=4)
    assert not (tmp_path / "store/manifest.json").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="runs in one process"):
        build_for_profile(profile, tmp_path / "store", traces=str(traces))


# Checks when opened


def test_a_damaged_or_truncated_shard_is_named(tmp_path, make_tiny_model):
    build(tmp_path / "store", make_tiny_model(seed=2))
    shard = tmp_path / "store/shards/00000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherStoreError, match=r"00000.bin .*does not match its checksum.*Delete"):
        TeacherStore.open(tmp_path / "store")
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(TeacherStoreError, match="truncated"):
        TeacherStore.open(tmp_path / "store")
    manifest = tmp_path / "store/manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"shards": [{"file": "00000.bin"}]}))
    with pytest.raises(TeacherStoreError, match="manifest.json is damaged"):
        TeacherStore.open(tmp_path / "store")


def test_a_store_for_another_teacher_or_settings_is_refused_with_what_differs(tmp_path, make_tiny_model):
    teacher_dir, other_teacher = make_tiny_model(seed=2), make_tiny_model(seed=4)
    build(tmp_path / "store", teacher_dir)
    store = TeacherStore.open(tmp_path / "store")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    keys = row_keys(rows(), tokenizer, 128)
    store.check_for(store_key(teacher_dir, tokenizer, k=99), keys)  # k is the store's own: not a difference
    with pytest.raises(TeacherStoreError, match=r"teacher weights: store tiny \(\w+\), this run tiny \(\w+\); "
                                                r"max_length: store 128, this run 64"):
        store.check_for(store_key(other_teacher, tokenizer, max_length=64), keys)
    more = row_keys(rows(10), tokenizer, 128)
    with pytest.raises(TeacherStoreError, match="2 of the 10 training conversations are not in the teacher store"):
        store.check_for(store_key(teacher_dir, tokenizer), more)
    with pytest.raises(TeacherStoreError, match="is not a teacher store"):
        TeacherStore.open(tmp_path)


# Training from it


def test_training_from_the_store_never_runs_the_teacher_and_matches_the_in_memory_cache(tmp_path, make_tiny_model):
    student_dir, teacher_dir = make_tiny_model(seed=1), make_tiny_model(seed=2)
    build(tmp_path / "store", teacher_dir)
    cached = trainer_for(tmp_path / "a", student_dir, AutoModelForCausalLM.from_pretrained(teacher_dir),
                         teacher_cache_topk=K)
    stored = trainer_for(tmp_path / "b", student_dir, UnloadedTeacher(str(teacher_dir)),
                         teacher_store=str(tmp_path / "store"))
    assert stored.teacher_cache is None and not stored.teacher_loaded and cached.teacher_loaded
    inputs = cached.data_collator(rows()[:2])
    cached.compute_loss(cached.model, inputs)  # the first sight fills the cache; the second reads it
    from_cache = cached.compute_loss(cached.model, inputs)
    assert cached.teacher_cache.hits == 1
    from_store = stored.compute_loss(stored.model, inputs)
    assert from_store.item() == pytest.approx(from_cache.item(), rel=1e-4)
    before = [p.detach().clone() for p in stored.model.parameters()]
    stored.train()  # two steps with no teacher in memory: UnloadedTeacher raises if anything runs it
    assert all(math_finite(h["loss"]) for h in stored.state.log_history if "loss" in h)
    assert any(not torch.equal(a, b) for a, b in zip(before, stored.model.parameters()))
    metrics = stored.evaluate()
    assert math_finite(metrics["eval_loss"])


def test_an_on_policy_step_uses_the_live_teacher_beside_the_store(tmp_path, make_tiny_model):
    student_dir, teacher_dir = make_tiny_model(seed=1), make_tiny_model(seed=2)
    build(tmp_path / "store", teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    trainer = trainer_for(tmp_path, student_dir, teacher, teacher_store=str(tmp_path / "store"))
    calls = []
    forward = teacher.model.forward
    teacher.model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    inputs = trainer.data_collator(rows()[:2])
    trainer.compute_loss(trainer.model, inputs)
    assert calls == []  # off-policy: the store
    trainer._batch_from_dataset = False  # as after the student generated the batch
    trainer.compute_loss(trainer.model, inputs)
    assert calls == [1]


def test_eval_loss_with_the_teacher_loaded_is_exact_whatever_the_last_step_read(tmp_path, make_tiny_model):
    student_dir, teacher_dir = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = trainer_for(tmp_path, student_dir, AutoModelForCausalLM.from_pretrained(teacher_dir),
                          teacher_cache_topk=K)
    trainer._batch_from_dataset = True  # as after an off-policy step, which reads the top-k cache
    first = trainer.evaluate()["eval_loss"]
    second = trainer.evaluate()["eval_loss"]  # the cache would hold the eval rows now, were they read through it
    trainer._batch_from_dataset = False  # as after an on-policy step
    third = trainer.evaluate()["eval_loss"]
    assert first == pytest.approx(second, rel=1e-6) and first == pytest.approx(third, rel=1e-6)
    assert trainer.teacher_cache.hits == 0 and not trainer.teacher_cache.entries


def test_the_trainer_refuses_a_store_without_its_eval_conversations(tmp_path, make_tiny_model):
    student_dir, teacher_dir = make_tiny_model(seed=1), make_tiny_model(seed=2)
    build(tmp_path / "store", teacher_dir)
    with pytest.raises(TeacherStoreError, match="1 of the 9 training and eval conversations are not in"):
        trainer_for(tmp_path, student_dir, UnloadedTeacher(str(teacher_dir)), eval_rows=rows(9)[8:],
                    teacher_store=str(tmp_path / "store"))


def test_the_trainer_refuses_a_store_built_at_another_temperature(tmp_path, make_tiny_model):
    student_dir, teacher_dir = make_tiny_model(seed=1), make_tiny_model(seed=2)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    build(tmp_path / "store", teacher_dir, key=store_key(teacher_dir, tokenizer, temperature=1.0))
    with pytest.raises(TeacherStoreError, match="temperature: store 1.0, this run 0.9"):
        trainer_for(tmp_path, student_dir, UnloadedTeacher(str(teacher_dir)), teacher_store=str(tmp_path / "store"))


def math_finite(value) -> bool:
    import math

    return math.isfinite(float(value))


# The CLI, end to end


def test_cli_builds_a_store_and_train_runs_from_it_without_the_teacher(cli, tmp_path, make_tiny_model):
    student_dir, teacher_dir = make_tiny_model(seed=1), make_tiny_model(seed=2)
    traces = demo_traces(tmp_path / "traces.jsonl", 12)
    common = [f"--teacher={teacher_dir}", f"--student={student_dir}", f"--traces={traces}", "--min-reward=0",
              "trainer.max_length=256", "data.eval_split=0.25"]
    built = cli("teacher-store", "build", "--out", "store", "--k", "8", "--json", *common)
    assert built.code == 0, built.stderr
    figures = json.loads(built.stdout)
    assert figures["positions"] > 0 and figures["bytes_per_position"] > 0
    trained = cli("train", *common, "--json", "--max-steps", "2", "--output-dir", "out", "trainer.lmbda=0",
                  "trainer.offpolicy_warmup_steps=0", f"trainer.teacher_store={tmp_path / 'store'}",
                  "trainer.report_to=[]", "trainer.eval_max_sessions=1", "trainer.max_new_tokens=4")
    assert trained.code == 0, trained.stderr
    assert "Teacher not loaded" in trained.stderr
    loaded = re.search(r"train=(\d+), eval=(\d+)", trained.stderr)
    assert int(loaded[1]) + int(loaded[2]) == figures["examples"]  # the store holds the run's every conversation
    summary = json.loads(trained.stdout)
    assert summary["teacher_eval"] is None and summary["steps"] == 2 and summary["eval"]["loss"] is not None
    refused = cli("train", *common, "--max-steps", "2", "--output-dir", "out", "trainer.lmbda=0",
                  f"trainer.teacher_store={tmp_path / 'store'}", "trainer.temperature=0.5")
    assert refused.code == 5
    assert "temperature: store 0.9, this run 0.5" in refused.stderr and "Traceback" not in refused.stderr
    unchunked = cli("train", *common, "--max-steps", "2", "--output-dir", "out", "trainer.lmbda=0",
                    f"trainer.teacher_store={tmp_path / 'store'}", "trainer.chunked_loss=false")
    assert unchunked.code == 5 and "needs the chunked loss" in unchunked.stderr
    assert "Loading models" not in unchunked.stderr  # refused before any model loads
