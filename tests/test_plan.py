"""`atlas-distill plan`: the memory arithmetic against what real models hold, and the command's contract."""

from __future__ import annotations

import pytest

from atlas_distill.config import load_profile
from atlas_distill.errors import UsageError
from atlas_distill.plan import (COMPACT_CHUNK, GIB, TOKEN_CHUNK, estimate, model_shape, parse_memory, plan_profile,
                                shape_from_config, workload_for)

TINY = {"hidden_size": 96, "intermediate_size": 200, "num_attention_heads": 6, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 500, "tie_word_embeddings": True}


def _saved_bytes(arch: str, layers: int, *, batch: int, length: int, checkpointing: bool = False,
                 lean: bool = False) -> int:
    """Bytes autograd keeps for backward in a real forward of a random model (weights not counted); `lean`: under
    the trainer's `lean_activations` (its norms only without checkpointing, as the trainer)."""
    from contextlib import nullcontext

    import torch

    from atlas_distill.gkd.lean_activations import lean_activations
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config = (LlamaConfig if arch == "llama" else Qwen2Config)(num_hidden_layers=layers, **TINY)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, TINY["vocab_size"], (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, : length // 4] = 0  # padded, as training batches are
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            (lean_activations(model, norms=not checkpointing) if lean else nullcontext()):
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(saved.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_activation_count_is_what_a_real_layer_saves_for_backward(arch):
    batch, length = 3, 40
    shape = shape_from_config("tiny", {"model_type": arch, "num_hidden_layers": 2, **TINY})
    per_layer = _saved_bytes(arch, 2, batch=batch, length=length) - _saved_bytes(arch, 1, batch=batch, length=length)
    assert per_layer == 4 * batch * length * shape.saved_per_token(length)
    # with checkpointing, a layer keeps only its input
    kept = (_saved_bytes(arch, 2, batch=batch, length=length, checkpointing=True)
            - _saved_bytes(arch, 1, batch=batch, length=length, checkpointing=True))
    assert kept == 4 * batch * length * shape.hidden
    # under lean_activations (the default): two [H] and two [I] fewer, and the norms' rsqrt
    lean = (_saved_bytes(arch, 2, batch=batch, length=length, lean=True)
            - _saved_bytes(arch, 1, batch=batch, length=length, lean=True))
    assert lean == 4 * batch * length * shape.saved_per_token(length, lean_mlp=True, lean_norms=True)
    assert lean == per_layer - 4 * batch * length * (2 * shape.hidden + 2 + 2 * shape.intermediate)



def test_the_plan_counts_lean_activations_only_where_the_trainer_applies_them():
    import dataclasses

    teacher = model_shape("14b", "Qwen/Qwen2.5-{size}-Instruct")
    student = model_shape("7b", "Qwen/Qwen2.5-{size}-Instruct")
    work = workload_for(_profile("model.gradient_checkpointing=false"), "cuda")

    def activations(strategy="single", **changes):
        changed = dataclasses.replace(work, **changes)
        return estimate(teacher, student, changed, strategy, 1 if strategy == "single" else 8).components["activations"]

    full, lean = activations(lean_activations=False), activations()
    per_token = work.compute_bytes * work.batch * work.seq_len
    # per layer two [H], the norms' two rsqrt and two [I] fewer; the final norm's normalised input (fp32)
    assert full - lean == student.layers * per_token * (2 * student.hidden + 2 + 2 * student.intermediate) \
        + 4 * work.batch * work.seq_len * student.hidden
    for sharded in ("fsdp", "zero3"):  # the trainer leaves the modules as they are
        assert activations(sharded) == activations(sharded, lean_activations=False)
    # LoRA on attention only keeps the lean MLPs; on any MLP projection (or all-linear), only the norms are lean
    lora = {"lora_rank": 8}
    attention_only = activations(**lora, lora_targets=["q_proj", "v_proj"])
    on_mlp = [activations(**lora, lora_targets=targets) for targets in (["gate_proj"], "all-linear", ".*up_proj")]
    assert on_mlp[0] == on_mlp[1] == on_mlp[2] > attention_only
    assert on_mlp[0] - attention_only == student.layers * per_token * 2 * student.intermediate

@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_parameter_and_lora_counts_match_the_real_models(arch):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch](num_hidden_layers=3, **TINY)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shape = shape_from_config("tiny", {"model_type": arch, "num_hidden_layers": 3, **TINY})
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.layer_parameters == sum(p.numel() for p in model.model.layers[0].parameters())
    linear = sum(m.weight.numel() for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    assert shape.linear_per_layer == linear
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert shape.lora_parameters(4, "all-linear") == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert shape.lora_parameters(4, ["q_proj", "v_proj"]) == 3 * 4 * ((96 + 96) + (96 + 32))


def test_the_chunks_are_the_trainers():
    from atlas_distill.gkd import compact_adamw, divergence

    assert TOKEN_CHUNK == divergence.TOKEN_CHUNK
    assert COMPACT_CHUNK == compact_adamw.CHUNK


def test_on_a_cpu_the_compact_optimizers_moments_take_half_the_bytes():
    teacher = model_shape("smollm2-135m", "Qwen/Qwen2.5-{size}-Instruct")
    student = model_shape("smollm2-135m@15L", "Qwen/Qwen2.5-{size}-Instruct")
    compact = estimate(teacher, student, workload_for(load_profile("default"), "cpu"))
    full = estimate(teacher, student, workload_for(load_profile("default", ["trainer.compact_optimizer=false"]), "cpu"))
    on_gpu = estimate(teacher, student, workload_for(load_profile("default"), "cuda"))
    assert compact.components["optimizer state"] == student.parameters * 4  # two bf16 moments
    assert full.components["optimizer state"] == on_gpu.components["optimizer state"] == student.parameters * 8
    assert compact.phases["optimizer step"] < full.phases["optimizer step"] - student.parameters * 4


def test_builtin_and_qwen_shapes_need_no_files():
    builtin = model_shape("smollm2-135m", "Qwen/Qwen2.5-{size}-Instruct")
    assert (builtin.layers, builtin.hidden, builtin.vocab, builtin.parameters) == (30, 576, 49_152, 134_515_008)
    pruned = model_shape("smollm2-135m@15L", "Qwen/Qwen2.5-{size}-Instruct")
    assert pruned.layers == 15 and pruned.parameters == builtin.parameters - 15 * builtin.layer_parameters
    seven = model_shape("7b", "Qwen/Qwen2.5-{size}-Instruct")
    assert seven.name == "Qwen2.5-7B-Instruct" and round(seven.parameters / 1e9, 2) == 7.62


def _profile(*overrides: str):
    return load_profile("default", ["teacher_model_name_or_path=14b", "model.model_name_or_path=7b", *overrides])


def test_strategies_shard_what_they_shard():
    teacher = model_shape("14b", "Qwen/Qwen2.5-{size}-Instruct")
    student = model_shape("7b", "Qwen/Qwen2.5-{size}-Instruct")
    work = workload_for(_profile(), "cuda")
    one, ddp, fsdp, zero3 = (estimate(teacher, student, work, s, 1 if s == "single" else 8)
                             for s in ("single", "ddp", "fsdp", "zero3"))
    assert one.components["student weights"] == student.parameters * 4  # fp32 master weights
    assert one.components["optimizer state"] == student.parameters * 8  # AdamW's two moments
    assert ddp.components["gradients"] == 2 * one.components["gradients"]  # DDP's buckets
    assert fsdp.components["optimizer state"] == one.components["optimizer state"] // 8
    assert fsdp.components["teacher weights"] == one.components["teacher weights"]  # whole on every GPU
    assert zero3.components["teacher weights"] < one.components["teacher weights"] / 4
    assert zero3.components["loss"] > 10 * fsdp.components["loss"]  # full logits under ZeRO-3
    assert fsdp.phases["before training"] > one.components["teacher weights"] + one.components["student weights"]
    quantized = workload_for(_profile("teacher_model_init_kwargs.load_in_8bit=true"), "cuda")
    assert estimate(teacher, student, quantized, "zero3", 8).unsupported  # the trainer refuses it
    lora = estimate(teacher, student, workload_for(_profile("model.lora.enabled=true"), "cuda"))
    assert lora.components["optimizer state"] < one.components["optimizer state"] / 50
    assert lora.components["student weights"] < one.components["student weights"] / 1.9  # bf16 base
    off = estimate(teacher, student, workload_for(_profile("model.gradient_checkpointing=false"), "cuda"))
    assert off.components["activations"] > 5 * one.components["activations"]
    assert (off.activations_other_setting, one.activations_other_setting) == (
        one.components["activations"], off.components["activations"])  # the table's other-setting row


def test_the_cheapest_fix_is_the_fewest_changes_then_upstreams_order():
    # 14B -> pruned 14B on one 48 GB GPU: an 8-bit teacher and LoRA together, not every fix before them
    result = plan_profile(load_profile("default", ["teacher_model_name_or_path=14b",
                                                   "model.model_name_or_path=14b@30L"]), device="cuda",
                          memory=48 * GIB)
    assert result.fix["changes"] == ["8-bit teacher", "LoRA student"]
    # a smaller teacher is never one smaller than the student (Qwen2.5 7B has 7.6B parameters, the student 9.8B)
    assert all("teacher_model_name_or_path" not in o for o in result.fix["overrides"])


def test_a_smaller_batch_comes_first_when_it_is_enough():
    profile = _profile("model.lora.enabled=true")
    at_two = plan_profile(_profile("model.lora.enabled=true", "trainer.per_device_train_batch_size=2",
                                   "trainer.gradient_accumulation_steps=2"), device="cuda", memory=1000 * GIB)
    memory = at_two.options[0].peak_bytes + 2**20
    result = plan_profile(profile, device="cuda", memory=memory)
    assert not result.fits
    assert result.fix["changes"] == ["batch 2 x 2 accumulation"]
    assert result.fix["overrides"] == ["trainer.per_device_train_batch_size=2", "trainer.gradient_accumulation_steps=2"]
    assert result.fix["peak_bytes"] <= memory


@pytest.mark.parametrize("text, expected", [("80GB", 80 * GIB), ("80G", 80 * GIB), ("24GiB", 24 * GIB),
                                            ("40000MB", 40000 * 2**20), ("1.5TB", int(1.5 * 2**40)),
                                            ("23028MiB", 23028 * 2**20)])
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text, message", [("", "not a memory size"), ("lots", "not a memory size"),
                                           ("-4GB", "not a memory size"), ("80", "not a memory size"),
                                           ("80B", "not a memory size"), ("80XB", "not a memory size"),
                                           ("0GB", "more than 0")])
def test_bad_memory_sizes_are_usage_errors(text, message):
    with pytest.raises(UsageError, match=message):
        parse_memory(text)


def test_plan_json_fits_on_eight_gpus(cli):
    result = cli("plan", "--gpus", "8", "--gpu-memory", "80GB", "--json")
    assert result.code == 0, result.stderr
    plan = result.json()
    assert plan["fits"] and plan["device"] == "cuda" and plan["devices"] == 8
    verdicts = {o["name"]: o["fits"] for o in plan["options"]}
    assert verdicts == {"one GPU": False, "DDP x8": False, "FSDP x8": True, "ZeRO-3 x8": True}
    assert plan["fix"] is None and plan["exit_code"] == 0


def test_plan_names_the_fix_and_exits_3_when_nothing_fits(cli):
    result = cli("plan", "--gpus", "1", "--gpu-memory", "80GB")
    assert result.code == 3, result.stderr
    assert "does not fit" in result.stdout
    assert "Cheapest change that fits: LoRA student" in result.stdout
    assert "model.lora.enabled=true" in result.stdout
    # a teacher given as a flag is changed with the flag (a KEY=VALUE override would lose to it)
    smaller = cli("plan", "--teacher", "32b", "--student", "1.5b", "--gpus", "1", "--gpu-memory", "24GB")
    assert smaller.code == 3 and "teacher 14b" in smaller.stdout and "--teacher 14b" in smaller.stdout


def test_plan_on_this_cpu_for_the_builtin_models(cli):
    result = cli("plan", "--teacher", "smollm2-135m", "--student", "smollm2-135m@15L", "trainer.max_length=256",
                 "--json")
    assert result.code == 0, result.stderr
    plan = result.json()
    assert plan["device"] == "cpu" and plan["workload"]["seq_len"] == 256 + 128
    assert plan["options"][0]["fits"] and plan["options"][0]["peak_bytes"] < 8 * GIB


@pytest.mark.parametrize("args, message", [
    (["--gpus", "2"], "--gpus needs --gpu-memory"),
    (["--gpu-memory", "80GB"], "--gpu-memory needs --gpus"),
    (["--gpus", "2", "--gpu-memory", "lots"], "not a memory size"),
    (["--student", "someorg/not-cached-model"], "config.json is needed"),
    (["--teacher", "7b@40L", "--student", "1.5b"], "has only 28"),
    (["--teacher", "13b"], "not a size this tool knows"),
])
def test_plan_usage_errors(cli, args, message):
    result = cli("plan", *args)
    assert result.code == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_train_plan_prints_the_plan_and_loads_nothing(cli, tmp_path):
    result = cli("train", "--plan", "--teacher", "smollm2-135m", "--student", "smollm2-135m@8L", "--json")
    assert result.code == 0, result.stderr
    assert result.json()["student"]["layers"] == 8
    assert not (tmp_path / "outputs").exists()


def test_a_cpu_plan_leaves_room_for_the_allocator():
    from atlas_distill.plan import CPU_RSS_ROOM

    profile = load_profile("default", ["teacher_model_name_or_path=smollm2-135m",
                                       "model.model_name_or_path=smollm2-135m"])
    peak = plan_profile(profile, device="cpu", memory=100 * GIB).options[0].peak_bytes
    assert not plan_profile(profile, device="cpu", memory=int(peak * 1.1), fix=False).fits
    assert plan_profile(profile, device="cpu", memory=int(peak * CPU_RSS_ROOM) + 1, fix=False).fits
    gpu_peak = plan_profile(profile, device="cuda", memory=100 * GIB).options[0].peak_bytes
    assert plan_profile(profile, device="cuda", memory=gpu_peak, fix=False).fits  # a GPU's allocator: live bytes


@pytest.mark.parametrize("native", [True, False])
def test_a_cpu_plan_counts_the_dtypes_train_picks_on_that_cpu(monkeypatch, native):
    from atlas_distill import plan

    monkeypatch.setattr(plan, "_cpu_bf16", lambda: native)
    work = workload_for(_profile(), "cpu")
    assert not work.autocast and work.compute_bytes == 4  # model.dtype auto: fp32 on any CPU
    # the teacher's weights in bf16 either way: computed in bf16 with native bf16, else in fp32 (models/upcast.py)
    assert work.teacher_bytes == 2 and work.teacher_other_bytes == (2 if native else 4)
    # no sampling copy on a CPU: the student samples itself, and under checkpointing its forward is replayed
    assert not work.sampling_copy and work.replay_generation
    unreplayed = workload_for(_profile("model.gradient_checkpointing=false"), "cpu")
    assert not unreplayed.sampling_copy and not unreplayed.replay_generation and unreplayed.prefill_once
    autocast = workload_for(_profile("model.dtype=bfloat16"), "cpu")
    assert autocast.autocast and autocast.compute_bytes == 2 and not autocast.sampling_copy
    assert workload_for(_profile("trainer.generation_dtype=bfloat16"), "cpu").sampling_copy


def test_the_plan_counts_generations_recording_where_the_trainer_replays_it(monkeypatch):
    import dataclasses

    from atlas_distill import plan

    monkeypatch.setattr(plan, "_cpu_bf16", lambda: False)  # no sampling copy: the student samples itself
    work = workload_for(_profile("model.gradient_checkpointing=true"), "cpu")
    assert work.replay_generation and not work.sampling_copy
    for changes in ("model.gradient_checkpointing=false", "trainer.replay_generation=false", "trainer.lmbda=0",
                    "trainer.generation_dtype=bfloat16"):
        assert not workload_for(_profile("model.gradient_checkpointing=true", changes), "cpu").replay_generation
    shape = model_shape("7b", "Qwen/Qwen2.5-{size}-Instruct")
    phases = {on: estimate(shape, shape, dataclasses.replace(work, replay_generation=on), "single", 1).phases
              for on in (True, False)}
    tokens = work.prompt_len + work.max_new_tokens
    recorded = shape.layers * work.compute_bytes * work.batch * tokens * shape.hidden
    assert phases[True]["generation"] - phases[False]["generation"] == recorded
    assert phases[True]["training step"] == phases[False]["training step"]


def test_the_plan_counts_the_packed_decoding_weights_where_the_student_samples_itself(monkeypatch):
    import dataclasses

    from atlas_distill import plan

    monkeypatch.setattr(plan, "_cpu_bf16", lambda: False)  # no sampling copy: the fp32 student samples itself
    monkeypatch.setattr(plan.platform, "machine", lambda: "x86_64")
    work = workload_for(_profile(), "cpu")
    assert work.packed_decoding and not work.sampling_copy
    for changes in ("trainer.packed_generation=false", "trainer.lmbda=0", "model.lora.enabled=true",
                    "trainer.generation_dtype=bfloat16", "model.dtype=bfloat16"):
        assert not workload_for(_profile(changes), "cpu").packed_decoding, changes
    # under seq_kd alone the teacher generates: nothing of the student's is packed, copied or recorded
    teacher_generates = workload_for(_profile("trainer.lmbda=0", "trainer.seq_kd=true"), "cpu")
    assert teacher_generates.on_policy
    assert not (teacher_generates.packed_decoding or teacher_generates.sampling_copy
                or teacher_generates.replay_generation)
    assert not workload_for(_profile(), "cuda").packed_decoding
    monkeypatch.setattr(plan.platform, "machine", lambda: "aarch64")  # oneDNN's fp32 packing measured on x86 only
    assert not workload_for(_profile(), "cpu").packed_decoding
    shape = model_shape("7b", "Qwen/Qwen2.5-{size}-Instruct")
    phases = {on: estimate(shape, shape, dataclasses.replace(work, packed_decoding=on), "single", 1).phases
              for on in (True, False)}
    # every decoder layer's projections in fp32; not the head, which decodes on its own weight
    assert phases[True]["generation"] - phases[False]["generation"] == shape.layers * shape.linear_per_layer * 4
    assert phases[True]["training step"] == phases[False]["training step"]
    assert phases[True]["optimizer step"] == phases[False]["optimizer step"]


def test_the_sampling_copy_counts_in_generation_only(monkeypatch):
    import dataclasses

    from atlas_distill import plan

    monkeypatch.setattr(plan, "_cpu_bf16", lambda: True)
    work = workload_for(_profile("model.gradient_checkpointing=false", "trainer.generation_dtype=bfloat16"), "cpu")
    assert work.sampling_copy
    shape = model_shape("7b", "Qwen/Qwen2.5-{size}-Instruct")
    # bf16 activations either way, so that generation's KV cache is the same size with the copy and without
    with_copy, without = (estimate(shape, shape, dataclasses.replace(work, sampling_copy=on, compute_bytes=2),
                                   "single", 1) for on in (True, False))
    # the trainer fills the copy for each generation and frees it after (_release_sampling_copy)
    assert with_copy.components["sampling copy"] == shape.parameters * 2
    assert with_copy.phases["generation"] - without.phases["generation"] == shape.parameters * 2
    for phase in ("training step", "optimizer step", "evaluation"):
        assert with_copy.phases[phase] == without.phases[phase], phase


def test_under_prefill_once_generation_holds_the_prompts_pass(monkeypatch):
    import dataclasses

    from atlas_distill import plan

    monkeypatch.setattr(plan, "_cpu_bf16", lambda: True)
    # the trainer's prefills_once: on-policy, no checkpointing, chunked loss, KV cache, the whole student
    work = workload_for(_profile("model.gradient_checkpointing=false"), "cpu")
    assert work.prefill_once
    for changes in ("model.gradient_checkpointing=true", "trainer.prefill_once=false", "trainer.lmbda=0",
                    "trainer.chunked_loss=false", "trainer.kv_cache_generation=false", "model.lora.enabled=true"):
        assert not workload_for(_profile("model.gradient_checkpointing=false", changes), "cpu").prefill_once, changes
    shape = model_shape("7b", "Qwen/Qwen2.5-{size}-Instruct")
    once, twice = (estimate(shape, shape, dataclasses.replace(work, prefill_once=on), "single", 1)
                   for on in (True, False))
    # generation runs inside the step, after the prompt's pass: what that pass keeps for backward (every layer's
    # activations over the prompt, as the training forward keeps them over the sequence) is there too
    prompt = dataclasses.replace(work, seq_len=work.prompt_len, prefill_once=False)
    kept = estimate(shape, shape, prompt, "single", 1).components["activations"]
    assert once.phases["generation"] - twice.phases["generation"] == pytest.approx(kept, rel=1e-6)
    assert once.phases["training step"] == twice.phases["training step"]
