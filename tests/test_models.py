"""Model specs, pruned copies, loading, shared vocabulary and LoRA, on tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from atlas_distill.models.builtin import builtin_model_dir
from atlas_distill.config import LoraConfig
from atlas_distill.errors import ModelSpecError, TrainingError
from atlas_distill.models import (
    ModelSpec,
    apply_lora,
    count_parameters,
    load_model,
    load_tokenizer,
    materialize,
    resolve_model_spec,
    shared_vocab_size,
)
from atlas_distill.models.pruning import decoder_layers, kept_layer_indices, prune_layers


@pytest.mark.parametrize(
    ("spec", "kind", "source", "name"),
    [
        ("smollm2-135m", "builtin", "smollm2-135m", "smollm2-135m"),
        ("SmolLM2-135M", "builtin", "smollm2-135m", "smollm2-135m"),
        ("14b", "alias", "Qwen/Qwen2.5-14B-Instruct", "Qwen2.5-14B-Instruct"),
        ("7B", "alias", "Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct"),
        ("3b", "alias", "Qwen/Qwen2.5-3B-Instruct", "Qwen2.5-3B-Instruct"),
        ("1.5b", "alias", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen2.5-1.5B-Instruct"),
        ("0.5B", "alias", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-Instruct"),
        ("32b", "alias", "Qwen/Qwen2.5-32B-Instruct", "Qwen2.5-32B-Instruct"),
        ("meta-llama/Llama-3.2-1B", "hub", "meta-llama/Llama-3.2-1B", "Llama-3.2-1B"),
        ("smollm2-135m@15L", "pruned", "smollm2-135m", "smollm2-135m@15L"),
        ("7b@20L", "pruned", "Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct@20L"),
        ("org/model@4l", "pruned", "org/model", "model@4L"),
    ],
)
def test_resolve_each_form(spec, kind, source, name):
    resolved = resolve_model_spec(spec)
    assert (resolved.spec, resolved.kind, resolved.source, resolved.name) == (spec, kind, source, name)
    assert (resolved.base is None) == (kind != "pruned")


def test_resolve_pruned_keeps_its_base():
    resolved = resolve_model_spec("smollm2-135m@15L@8L")
    assert resolved.keep_layers == 8 and resolved.name == "smollm2-135m@15L@8L"
    assert resolved.base.keep_layers == 15 and resolved.base.base.kind == "builtin"


def test_resolve_alias_in_another_family():
    assert resolve_model_spec("3b", family="org/Thing-{size}").source == "org/Thing-3B"
    with pytest.raises(ModelSpecError, match="model.family"):
        resolve_model_spec("3b", family="org/Thing")


def test_resolve_local_directory(make_tiny_model):
    path = make_tiny_model(layers=4)
    local = resolve_model_spec(str(path))
    assert (local.kind, local.source, local.name) == ("local", str(path.resolve()), path.name)
    pruned = resolve_model_spec(f"{path}@2L")
    assert pruned.kind == "pruned" and pruned.base == local and pruned.keep_layers == 2
    # the local config says how many layers there are, so keeping all of them fails before any loading
    with pytest.raises(ModelSpecError, match="keeps 4 layers, but .* has only 4"):
        resolve_model_spec(f"{path}@4L")


@pytest.mark.parametrize("spec", ["", "   ", "foo", "@3L", "x@0L", "x@abcL", "7b@L", "smollm2-135m@15",
                                  "a/b/c", "/nonexistent/model", "./missing", "bad id/x", "7b@0L"])
def test_resolve_rejects_with_the_accepted_forms(spec):
    with pytest.raises(ModelSpecError) as info:
        resolve_model_spec(spec)
    message = str(info.value)
    assert f"`{spec}`" in message
    for form in ("smollm2-135m", "14b, 7b, 3b, 1.5b, 0.5b", "config.json", "org/name", "SPEC@NL"):
        assert form in message
    assert info.value.exit_code == 1


def test_resolve_rejects_a_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelSpecError, match="has no config.json"):
        resolve_model_spec(str(tmp_path))


def test_kept_layer_indices_are_even_distinct_and_keep_both_ends():
    assert kept_layer_indices(4, 2) == [0, 3]
    assert kept_layer_indices(30, 15) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
    assert kept_layer_indices(15, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert kept_layer_indices(5, 1) == [0]
    for total in range(2, 65):
        for keep in range(2, total + 1):
            kept = kept_layer_indices(total, keep)
            assert len(set(kept)) == keep and kept == sorted(kept)
            assert kept[0] == 0 and kept[-1] == total - 1
            gaps = [b - a for a, b in zip(kept, kept[1:])]
            assert max(gaps) - min(gaps) <= 1


def _greedy(model, tokenizer, use_cache: bool) -> list[int]:
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=use_cache,
                         pad_token_id=tokenizer.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pruned_copy_keeps_first_and_last_layer_and_generates(make_tiny_model, arch):
    base = make_tiny_model(arch=arch, layers=4)
    path = materialize(resolve_model_spec(f"{base}@2L"))

    pruned = AutoModelForCausalLM.from_pretrained(path)
    original = AutoModelForCausalLM.from_pretrained(base)
    assert pruned.config.num_hidden_layers == 2 and len(decoder_layers(pruned)) == 2
    if hasattr(pruned.config, "layer_types"):
        assert len(pruned.config.layer_types) == 2
    for new, old in ((0, 0), (1, 3)):
        got, want = decoder_layers(pruned)[new].state_dict(), decoder_layers(original)[old].state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)
        assert decoder_layers(pruned)[new].self_attn.layer_idx == new
    assert torch.equal(pruned.get_input_embeddings().weight, original.get_input_embeddings().weight)

    tokenizer = load_tokenizer(path)
    cached = _greedy(pruned, tokenizer, use_cache=True)
    assert len(cached) == 12
    assert cached == _greedy(pruned, tokenizer, use_cache=False)
    # pruned in memory (not reloaded, so layer_idx is what prune_layers set) it generates the same with a KV cache
    assert _greedy(prune_layers(original, [0, 3]), tokenizer, use_cache=True) == cached


def test_pruned_copy_is_built_once(make_tiny_model):
    spec = resolve_model_spec(f"{make_tiny_model(layers=4)}@2L")
    path = materialize(spec)
    stamps = {f.name: f.stat().st_mtime_ns for f in Path(path).iterdir()}
    assert "model.safetensors" in stamps and "tokenizer.json" in stamps
    assert materialize(resolve_model_spec(spec.spec)) == path
    assert {f.name: f.stat().st_mtime_ns for f in Path(path).iterdir()} == stamps

    # a pruned copy of a pruned copy is cached beside it, from the cached one
    nested = materialize(resolve_model_spec(f"{spec.spec}@1L"))
    assert nested.endswith("@2L@1L")
    assert AutoModelForCausalLM.from_pretrained(nested).config.num_hidden_layers == 1


def test_materialize_refuses_to_keep_every_layer(make_tiny_model):
    base = resolve_model_spec(str(make_tiny_model(layers=4)))
    # a spec built by hand skips resolution's check; materialize reads the base config before loading weights
    spec = ModelSpec("x@4L", "pruned", base.source, "x@4L", base=base, keep_layers=4)
    with pytest.raises(ModelSpecError, match="keeps 4 layers"):
        materialize(spec)


def test_materialize_passes_other_specs_through(make_tiny_model):
    local = str(make_tiny_model())
    assert materialize(resolve_model_spec(local)) == str(resolve_model_spec(local).source)
    assert materialize(resolve_model_spec("7b")) == "Qwen/Qwen2.5-7B-Instruct"
    assert materialize(resolve_model_spec("org/name")) == "org/name"


def test_shared_vocab_over_padded_embeddings(make_tiny_model):
    student_path, teacher_path = make_tiny_model("llama"), make_tiny_model("qwen2", extra_rows=64)
    student, teacher = load_model(student_path), load_model(teacher_path)
    tokenizer, teacher_tokenizer = load_tokenizer(student_path), load_tokenizer(teacher_path)
    assert shared_vocab_size(tokenizer, teacher_tokenizer) == 49152
    shared = shared_vocab_size(tokenizer, teacher_tokenizer, student, teacher)
    assert shared == 49152

    batch = tokenizer(["Hello there", "A longer second prompt here"], return_tensors="pt", padding=True)
    student_logits, teacher_logits = student(**batch).logits, teacher(**batch).logits
    assert (student_logits.shape[-1], teacher_logits.shape[-1]) == (49152, 49152 + 64)
    kl = torch.nn.functional.kl_div(student_logits[..., :shared].log_softmax(-1),
                                    teacher_logits[..., :shared].log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert torch.isfinite(kl) and kl > 0


def _word_level_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def test_different_tokenizers_are_refused(tiny_tokenizer_dir):
    with pytest.raises(ModelSpecError) as info:
        shared_vocab_size(load_tokenizer(tiny_tokenizer_dir), _word_level_tokenizer())
    message = str(info.value)
    assert "different tokenizers" in message and "49152 vs 4 tokens" in message
    assert "token by token" in message and "TEACHER@NL" in message
    assert "in the student" in message and "in the teacher" in message


def test_tokenizer_larger_than_a_model_is_refused(make_tiny_model, tiny_tokenizer_dir):
    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    with pytest.raises(ModelSpecError, match="teacher model has 100 embedding rows"):
        shared_vocab_size(tokenizer, tokenizer, load_model(make_tiny_model()), small)


def test_load_tokenizer_pads_with_eos(tmp_path):
    _word_level_tokenizer().save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "right"  # callers choose left for generation


@pytest.mark.parametrize("cuda, bf16, cpu_bf16, expected, teacher", [
    (False, False, False, "float32", "float32"),  # an AVX2-only CPU
    # a CPU with AVX512-BF16 or AMX: fp32 weights (bf16 autocast is opt-in), the frozen teacher in bf16
    (False, False, True, "float32", "bfloat16"),
    (True, False, True, "float32", "float32"),  # a GPU without native bf16 decides, whatever the CPU
    (True, True, False, "bfloat16", "bfloat16")])
def test_auto_dtype_is_bf16_only_on_a_gpu_with_native_bf16(monkeypatch, cuda, bf16, cpu_bf16, expected, teacher):
    from atlas_distill.models import loading
    from atlas_distill.models import resolve_dtype

    # stand in for what torch.cuda and the CPU's flags would report
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    monkeypatch.setattr(loading, "cpu_bf16", lambda: cpu_bf16)
    assert resolve_dtype("auto") == getattr(torch, expected)
    assert resolve_dtype("float16") == torch.float16  # a named dtype is taken as is
    assert loading.teacher_dtype("auto") == teacher
    assert loading.teacher_dtype("float32") == "float32"  # a named teacher dtype is taken as is


def test_load_model_for_inference_and_for_training(make_tiny_model):
    path = make_tiny_model()
    frozen = load_model(path)
    from atlas_distill.models import cuda_bf16

    assert next(frozen.parameters()).dtype == (torch.bfloat16 if cuda_bf16() else torch.float32)  # auto
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    trainable = load_model(path, dtype="bfloat16", for_training=True)
    assert next(trainable.parameters()).dtype == torch.bfloat16
    assert all(p.requires_grad for p in trainable.parameters()) and trainable.config.use_cache is False


@pytest.mark.parametrize("flag", ["load_in_8bit", "load_in_4bit"])
def test_quantized_loading_needs_a_gpu(make_tiny_model, flag):
    with pytest.raises(TrainingError) as info:
        load_model(make_tiny_model(), **{flag: True})
    assert "needs bitsandbytes on a CUDA GPU; none here" in str(info.value)
    assert "teacher_model_init_kwargs.load_in_8bit" in str(info.value) and info.value.exit_code == 7


def test_quantized_loading_without_bitsandbytes(make_tiny_model, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kwargs: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(TrainingError, match=r"pip install 'atlas-distill\[cuda\]'"):
        load_model(make_tiny_model(), load_in_8bit=True)


@pytest.mark.parametrize("spec", ["/nonexistent/model-dir", "Qwen/Qwen2.5-7B-Instruct", "no-such-org/no-such-model"])
def test_unreachable_model_is_a_spec_error(spec, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelSpecError) as info:
            load(spec)
        message = str(info.value)
        assert f"`{spec}`" in message and "offline" in message and "smollm2-135m" in message
        assert "Traceback" not in message


def test_apply_lora_trains_only_adapters(make_tiny_model):
    model = load_model(make_tiny_model(), for_training=True)
    assert apply_lora(model, LoraConfig()) is model
    wrapped = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    trainable = {name: p.numel() for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert 0 < sum(trainable.values()) < count_parameters(wrapped)


def test_count_parameters_counts_tied_embeddings_once(make_tiny_model):
    model = load_model(make_tiny_model())
    embeddings = model.get_input_embeddings().weight.numel()
    layers = sum(p.numel() for p in decoder_layers(model).parameters())
    norm = model.get_decoder().norm.weight.numel()
    assert count_parameters(model) == embeddings + layers + norm


@pytest.mark.slow
def test_builtin_pruned_to_15_layers():
    path = materialize(resolve_model_spec("smollm2-135m@15L"))
    full = count_parameters(load_model(builtin_model_dir()))
    assert round(full / 1e6, 1) == 134.5
    model = load_model(path)
    assert model.config.num_hidden_layers == 15 and len(decoder_layers(model)) == 15
    assert count_parameters(model) < full
    tokenizer = load_tokenizer(path)
    assert len(_greedy(model, tokenizer, use_cache=True)) == 12


def test_model_preparation_reports_its_own_progress_and_no_third_party_bars(cli, trace_file, tmp_path):
    """The one-time GGUF conversion of the builtin printed transformers' raw tqdm bar; in a log it is now a few
    plain lines of ours (the phase, each quarter, the end). A fresh cache makes this run build it."""
    result = cli("train", "--teacher", "smollm2-135m", "--student", "smollm2-135m@2L", "--traces", str(trace_file),
                 "--learning-key", "nope", env={"ATLAS_DISTILL_CACHE": str(tmp_path / "fresh-cache")})
    assert result.code == 2, result.stderr  # no data: it stops right after preparing the models
    lines = result.stderr.splitlines()
    start = lines.index("Converting the builtin smollm2-135m from GGUF (once) ...")
    assert [line.split(" in ")[0].strip() for line in lines[start + 1:start + 5]] == [
        "68/272 (25%)", "136/272 (50%)", "204/272 (75%)", "272/272 (100%)"]
    assert "Pruning smollm2-135m to 2 layers (once) ..." in lines
    assert "de-quantizing" not in result.stderr and "it/s]" not in result.stderr and "%|" not in result.stderr


def test_parameter_count_from_a_config_matches_the_built_model():
    """The arithmetic the dry run uses for sizes (families.parameter_count) against real models built from small
    configs: Qwen2 (q/k/v biases; tied and untied heads), Llama/SmolLM2, and a pruned depth."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from atlas_distill.families import parameter_count

    configs = [Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied) for tied in (True, False)]
    configs.append(LlamaConfig(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                               num_key_value_heads=2, vocab_size=250, tie_word_embeddings=True))
    for config in configs:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        expected = sum(p.numel() for p in model.parameters())  # tied weights are counted once
        assert parameter_count(config.to_dict()) == expected, config.model_type
    no_kv = LlamaConfig(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                        vocab_size=250).to_dict()  # a config without num_key_value_heads: one per attention head
    no_kv.pop("num_key_value_heads", None)
    assert parameter_count(no_kv) == sum(p.numel() for p in AutoModelForCausalLM.from_config(
        LlamaConfig(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                    num_key_value_heads=6, vocab_size=250)).parameters())
    pruned = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    assert parameter_count(configs[0].to_dict(), layers=1) == sum(
        p.numel() for p in AutoModelForCausalLM.from_config(pruned).parameters())


def test_gguf_reads_shared_while_converting_are_undone_after():
    """builtin._gguf_read_once shares one parsed GGUF file and one tensor-name table during a conversion; outside
    it gguf's own functions are back."""
    import gguf

    from atlas_distill.models.builtin import _gguf_read_once

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_read_once():
        assert gguf.GGUFReader is not reader
        arch = next(iter(gguf.MODEL_ARCH))
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map
    assert gguf.get_tensor_name_map(arch, 2) is not gguf.get_tensor_name_map(arch, 2)
