"""The `lean_activations` setting: the student's gated MLPs and RMSNorms keep fewer tensors for backward
(gkd/lean_activations.py)."""

from __future__ import annotations

import pytest
import torch
from test_gkd_trainer import batch, make_trainer

from atlas_distill.gkd.lean_activations import lean_activations

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)


def tiny(arch: str, **changes):
    """A tiny random model of `arch` (transformers' own classes), fp32, seeded."""
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed(0)
    return model_class(config_class(**(TINY | changes)))


def inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as the trainer's batches
    return ids, mask


def forward_backward(model, autocast: bool):
    """Logits and every parameter's gradient of one forward (under bf16 autocast when asked) and one backward
    outside it, as Trainer runs them; and the bytes the forward kept for backward (besides the weights)."""
    ids, mask = inputs()
    model.zero_grad(set_to_none=True)
    kept: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            kept.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=mask).logits
    logits.float().pow(2).mean().backward()
    trained = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), trained, sum(kept.values())


def mlps_and_norms(model) -> tuple[int, int]:
    names = [type(module).__name__ for module in model.modules()]
    return sum(name.endswith("MLP") for name in names), sum(name.endswith("RMSNorm") for name in names)


@pytest.mark.parametrize("norms", [True, False], ids=["norms", "mlps-only"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_lean_activations_give_the_same_logits_and_gradients_bit_for_bit(arch, autocast, norms):
    model = tiny(arch)
    logits, grads, _ = forward_backward(model, autocast)
    with lean_activations(model, norms=norms) as changed:
        lean_logits, lean_grads, _ = forward_backward(model, autocast)
    mlps, rms_norms = mlps_and_norms(model)
    assert mlps == TINY["num_hidden_layers"] and rms_norms >= 2 * mlps + 1  # Qwen3 also normalises q and k
    assert changed == mlps + (rms_norms if norms else 0)
    assert torch.equal(lean_logits, logits)
    assert grads.keys() == lean_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(lean_grads[name], grad), name


def test_they_keep_fewer_tensors_for_backward_and_are_undone_after_the_block():
    model = tiny("llama")
    *_, full = forward_backward(model, autocast=False)
    with lean_activations(model, norms=False):
        *_, lean_mlps = forward_backward(model, autocast=False)
    with lean_activations(model):
        *_, lean = forward_backward(model, autocast=False)
    positions, layers = inputs()[0].numel(), TINY["num_hidden_layers"]
    # per layer silu(gate) and silu(gate) * up, [3 x 12, 32] fp32 each
    assert full - lean_mlps == 2 * layers * positions * TINY["intermediate_size"] * 4
    # per RMSNorm (two a layer and the final one) the normalised input and its rsqrt, [3 x 12, 16 + 1] fp32
    assert lean_mlps - lean == (2 * layers + 1) * positions * (TINY["hidden_size"] + 1) * 4
    assert not any("forward" in vars(module) for module in model.modules())
    *_, after = forward_backward(model, autocast=False)
    assert after == full


def _hooked_down_proj(model):
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *_: None)
    return model


def _hooked_act_fn(model):
    model.model.layers[0].mlp.act_fn.register_forward_hook(lambda *_: None)
    return model


def _backward_hook_on_down_proj(model):
    model.model.layers[0].mlp.down_proj.register_full_backward_hook(lambda *_: None)
    return model


def _lora(*targets):
    def wrap(model):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=2, target_modules=list(targets)))

    return wrap


@pytest.mark.parametrize(("arch", "changes", "wrap", "left"), [
    ("llama", {"mlp_bias": True}, None, 2),  # a bias on down_proj
    ("llama", {"hidden_act": "gelu"}, None, 2),  # not SiLU
    ("llama", {}, _hooked_down_proj, 1),  # a hook on one layer's down_proj
    ("llama", {}, _hooked_act_fn, 1),  # on its act_fn
    ("llama", {}, _backward_hook_on_down_proj, 1),  # a backward hook on its down_proj
    ("llama", {}, _lora("down_proj"), 2),  # LoRA: down_proj is peft's layer
    ("llama", {}, _lora("up_proj"), 2),  # up_proj is
    ("llama", {}, _lora("q_proj", "v_proj"), 0),  # LoRA elsewhere: the MLPs' frozen weights get no gradient
], ids=["bias", "gelu", "hook", "act-hook", "backward-hook", "lora-down", "lora-up", "lora-attention"])
def test_an_mlp_it_cannot_vouch_for_is_left_as_it_is(arch, changes, wrap, left):
    model = tiny(arch, **changes)
    model = wrap(model) if wrap else model
    logits, grads, _ = forward_backward(model, autocast=False)
    with lean_activations(model) as changed:
        lean_logits, lean_grads, _ = forward_backward(model, autocast=False)
    assert changed == TINY["num_hidden_layers"] - left + mlps_and_norms(model)[1]  # the norms all changed
    assert torch.equal(lean_logits, logits)
    assert all(torch.equal(lean_grads[name], grad) for name, grad in grads.items())


def test_nothing_is_changed_while_a_global_module_hook_is_set():
    model = tiny("llama")
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        with lean_activations(model) as changed:
            assert changed == 0 and not any("forward" in vars(module) for module in model.modules())
    finally:
        handle.remove()
    with lean_activations(model) as changed:
        assert changed == sum(mlps_and_norms(model))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["gc-off", "gc-on"])
def test_a_training_step_gives_the_same_gradients_with_and_without_it(tmp_path, make_tiny_model, checkpointing):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    grads, losses = [], []
    for switch in (True, False):
        trainer = make_trainer(tmp_path / str(switch), student, teacher, lean_activations=switch,
                               args={"lmbda": 0.0, "gradient_checkpointing": checkpointing})
        layer = trainer.model.model.layers[0]
        seen = []
        hook = layer.mlp.gate_proj.register_forward_hook(lambda *_: seen.append(
            ("forward" in vars(layer.mlp), "forward" in vars(layer.input_layernorm))))
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # as Trainer.train sets it
        losses.append(trainer.training_step(trainer.model, batch(trainer)))
        hook.remove()
        # in forward (and the recompute), only when on; the norms only without gradient checkpointing
        assert seen and set(seen) == {(switch, switch and not checkpointing)}
        assert not any("forward" in vars(module) for module in trainer.model.modules()
                       if type(module).__name__.endswith(("MLP", "RMSNorm")))
        grads.append({name: p.grad.clone() for name, p in trainer.model.named_parameters()})
    assert torch.equal(losses[0], losses[1])
    for name, grad in grads[1].items():
        assert torch.equal(grads[0][name], grad), name

