"""A teacher held in bf16 and computed in fp32 (models/upcast.py), as `auto` loads it on a CPU without native bf16."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from atlas_distill.gkd import divergence
from atlas_distill.models import loading, upcast


def _rounded_fp32(path):
    """The fp32 model with every weight rounded to bf16: what the upcast model must compute exactly."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.bfloat16().float())
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q, k and v
def test_bf16_weights_compute_exactly_what_fp32_does_with_those_weights(make_tiny_model, monkeypatch, arch):
    path = make_tiny_model(arch, seed=3)
    monkeypatch.setattr(loading, "cpu_bf16", lambda: False)
    assert loading.teacher_upcast("auto") and loading.teacher_loaded_as(str(path)) == "bfloat16-in-float32"
    teacher = loading.load_teacher(str(path))
    assert upcast.compute_dtype(teacher) == torch.float32 and not teacher.training
    linears = [m for m in teacher.modules() if type(m) is torch.nn.Linear]
    assert all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert teacher.get_input_embeddings().weight.dtype == torch.bfloat16
    norms = [p for n, p in teacher.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    reference = _rounded_fp32(path)
    ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        ours = teacher(input_ids=ids, attention_mask=mask)
        expected = reference(input_ids=ids, attention_mask=mask)
        hidden = divergence.backbone(teacher)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert ours.logits.dtype == torch.float32 and hidden.dtype == torch.float32
    assert torch.equal(ours.logits, expected.logits)
    with torch.no_grad():  # generation (seq_kd, evaluation) too: the KV cache in fp32
        assert torch.equal(teacher.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                           reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False))
    # the chunked loss's projection of those hidden states through the bf16 head, a tile of rows at a time
    head, _ = divergence._head(teacher, 49152)
    assert head.dtype == torch.bfloat16
    flat = hidden.reshape(-1, hidden.shape[-1])
    assert torch.equal(divergence._log_probs(flat, head, None, 0.9),
                       divergence._log_probs(flat, reference.lm_head.weight, None, 0.9))


def test_auto_keeps_fp32_where_asked_or_where_bf16_computes_natively(make_tiny_model, monkeypatch):
    path = str(make_tiny_model(seed=3))
    monkeypatch.setattr(loading, "cpu_bf16", lambda: False)
    explicit = loading.load_teacher(path, "float32")
    assert explicit.dtype == torch.float32 and upcast.compute_dtype(explicit) is None
    assert loading.teacher_loaded_as(path, "float32") == "float32"
    assert loading.teacher_loaded_as(path, load_in_8bit=True) == "8-bit"
    monkeypatch.setattr(loading, "cpu_bf16", lambda: True)  # bf16 computes natively: plainly bf16
    native = loading.load_teacher(path)
    assert native.dtype == torch.bfloat16 and upcast.compute_dtype(native) is None
    assert loading.teacher_loaded_as(path) == "bfloat16"


def test_a_model_with_layers_it_does_not_know_is_loaded_in_fp32(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=8, n_layer=1, n_head=2))
    assert not upcast.fits(model)  # GPT-2's Conv1D holds a 2-D weight of its own
    model.save_pretrained(tmp_path / "gpt2")
    monkeypatch.setattr(loading, "cpu_bf16", lambda: False)
    assert loading.teacher_loaded_as(str(tmp_path / "gpt2")) == "float32"  # what a teacher store's key records
    teacher = loading.load_teacher(str(tmp_path / "gpt2"))
    assert teacher.dtype == torch.float32 and upcast.compute_dtype(teacher) is None
    with torch.no_grad():
        assert teacher(input_ids=torch.tensor([[1, 2, 3]])).logits.dtype == torch.float32


def test_a_checkpoint_quantized_on_disk_is_labelled_as_loaded_not_upcast(make_tiny_model, tmp_path, monkeypatch):
    import json
    import shutil

    path = tmp_path / "quantized"
    shutil.copytree(make_tiny_model(seed=3), path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(loading, "cpu_bf16", lambda: False)
    # its layers are quantized ones, which models/upcast.py does not know: the store's key says what load_teacher does
    assert loading.teacher_loaded_as(str(path)) == "float32"
    assert loading.teacher_loaded_as(str(make_tiny_model(seed=3))) == "bfloat16-in-float32"
