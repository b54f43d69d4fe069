"""CompactAdamW (gkd/compact_adamw.py): AdamW with bf16 moments rounded stochastically, as the trainer's default
optimizer on a CPU (`compact_optimizer`)."""

import pytest
import torch

from atlas_distill.gkd import compact_adamw
from atlas_distill.gkd.compact_adamw import CompactAdamW, stochastic_round_

from test_gkd_trainer import make_trainer


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 1,000 elements, so that the tensors below span several (and the last one is short)."""
    monkeypatch.setattr(compact_adamw, "CHUNK", 1000)


def regression(seed: int = 0):
    """A least-squares problem: weights of 2,500 elements (two chunks and a short one; a transposed, non-contiguous
    tensor) and 40, data, targets."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(256, 50, generator=generator)
    targets = inputs @ torch.randn(50, 50, generator=generator) + torch.randn(50, generator=generator)
    weight = torch.nn.Parameter(torch.zeros(50, 50).t())
    bias = torch.nn.Parameter(torch.zeros(40))
    return inputs, targets, [weight, bias]


def train(optimizer, inputs, targets, params, steps: int) -> list[float]:
    weight, bias = params
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((inputs @ weight + torch.cat([bias, bias[:10]]) - targets) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_stochastic_rounding_over_every_noise_value_averages_to_the_fp32_value_exactly():
    """Each of the 2**16 noise values once: the bf16 results are the two neighbours of the fp32 value, and their
    mean is the fp32 value itself, for a positive, a negative and a small value."""
    noise = torch.arange(1 << 16, dtype=torch.int32)
    for value in (1.0 + 0.3 * 2.0 ** -7, -(1.0 + 0.3 * 2.0 ** -7), 3.7e-5):  # 30 % of the way from 1 to 1 + 2**-7
        values = torch.full((1 << 16,), value)
        exact = values[0].double().item()  # the fp32 value
        rounded = torch.empty(1 << 16, dtype=torch.bfloat16)
        stochastic_round_(rounded, values.clone(), noise)
        neighbours = rounded.double().unique()
        assert len(neighbours) == 2 and neighbours[0] < exact < neighbours[1]
        assert neighbours[1] == torch.tensor(neighbours[0].item(), dtype=torch.bfloat16).nextafter(
            torch.tensor(float("inf"), dtype=torch.bfloat16)).double()
        assert rounded.double().mean().item() == pytest.approx(exact, rel=1e-12)


def test_a_decaying_second_moment_decays_as_in_fp32_where_rounding_to_nearest_would_stick(small_chunks):
    """One gradient of 1, then 1,500 steps of 0: fp32 AdamW's exp_avg_sq is 0.001 * 0.999**1499 = 2.2e-4. Each
    step moves it by 0.1 %, under half of bf16's spacing, so rounded to the nearest bf16 it would stay at 1e-3."""
    param = torch.nn.Parameter(torch.zeros(4000))
    optimizer = CompactAdamW([param], lr=1e-3, weight_decay=0.0)
    param.grad = torch.ones(4000)
    optimizer.step()
    param.grad = torch.zeros(4000)
    for _ in range(1499):
        optimizer.step()
    state = optimizer.state[param]
    assert state["exp_avg_sq"].dtype == torch.bfloat16 and state["exp_avg"].dtype == torch.bfloat16
    expected = 1e-3 * 0.999 ** 1499
    nearest = torch.tensor(1e-3, dtype=torch.bfloat16)
    assert (nearest.float() * 0.999).to(torch.bfloat16) == nearest  # what rounding to nearest would do
    assert state["exp_avg_sq"].double().mean().item() == pytest.approx(expected, rel=0.02)


def test_training_follows_pytorchs_adamw_with_half_the_state(small_chunks):
    inputs, targets, ours = regression()
    _, _, theirs = regression()
    decayed = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    compact = CompactAdamW(ours, **decayed, seed=5)
    reference = torch.optim.AdamW(theirs, **decayed)
    ours_losses = train(compact, inputs, targets, ours, 300)
    their_losses = train(reference, inputs, targets, theirs, 300)
    assert their_losses[-1] < 0.02 * their_losses[0]  # it learned
    for step in (0, 9, 99, 299):
        assert ours_losses[step] == pytest.approx(their_losses[step], rel=0.03), step
    for mine, their in zip(ours, theirs):
        assert (mine - their).norm() <= 0.02 * their.norm()
    state_bytes = {name: sum(s[name].numel() * s[name].element_size() for s in compact.state.values())
                   for name in ("exp_avg", "exp_avg_sq")}
    reference_bytes = sum(s["exp_avg"].numel() * s["exp_avg"].element_size() for s in reference.state.values())
    assert state_bytes == {"exp_avg": reference_bytes // 2, "exp_avg_sq": reference_bytes // 2}


def test_a_first_step_is_pytorchs_fused_adamw_bit_for_bit_and_a_bf16_weight_takes_the_fp32_update(small_chunks):
    """The moments start at zero (exact in bf16), so the first step's weights are PyTorch's fused AdamW's bit for
    bit: the same kernel does the arithmetic. A bf16 weight (with a bf16 gradient) takes the fp32 weight's update,
    rounded to the nearest bf16, and its moments are rounded as the fp32 weight's are."""
    torch.manual_seed(0)
    start, grad = torch.randn(2500), torch.randn(2500).to(torch.bfloat16).float()  # a gradient exact in bf16
    decayed = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    params = {name: torch.nn.Parameter(start.clone()) for name in ("ours", "theirs")}
    params["bf16"] = torch.nn.Parameter(start.to(torch.bfloat16))
    optimizers = {"ours": CompactAdamW([params["ours"]], **decayed, seed=2),
                  "theirs": torch.optim.AdamW([params["theirs"]], **decayed, fused=True),
                  "bf16": CompactAdamW([params["bf16"]], **decayed, seed=2)}
    for name, optimizer in optimizers.items():
        params[name].grad = grad.to(params[name].dtype)
        optimizer.step()
    assert not torch.equal(params["ours"], start) and torch.equal(params["ours"], params["theirs"])
    widened = torch.nn.Parameter(start.to(torch.bfloat16).float())  # the bf16 weight's values, in fp32
    wide = CompactAdamW([widened], **decayed, seed=2)
    widened.grad = grad.clone()
    wide.step()
    assert params["bf16"].dtype == torch.bfloat16
    assert torch.equal(params["bf16"], widened.to(torch.bfloat16))
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizers["bf16"].state[params["bf16"]][name], wide.state[widened][name])


def test_the_same_seed_gives_the_same_run_and_torchs_global_random_state_is_left_alone(small_chunks):
    runs = []
    for seed in (3, 3, 4):
        inputs, targets, params = regression()
        before = torch.get_rng_state()
        train(CompactAdamW(params, lr=0.05, seed=seed), inputs, targets, params, 20)
        assert torch.equal(torch.get_rng_state(), before)
        runs.append(torch.cat([p.detach().flatten() for p in params]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # the seed decides the rounding


def test_a_run_resumed_from_the_state_dict_is_the_uninterrupted_run(small_chunks, tmp_path):
    inputs, targets, whole = regression()
    train(CompactAdamW(whole, lr=0.05, seed=7), inputs, targets, whole, 20)
    _, _, first = regression()
    optimizer = CompactAdamW(first, lr=0.05, seed=7)
    train(optimizer, inputs, targets, first, 10)
    torch.save({"optimizer": optimizer.state_dict(), "params": [p.detach() for p in first]}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt")
    resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    optimizer = CompactAdamW(resumed, lr=0.05, seed=7)
    optimizer.load_state_dict(saved["optimizer"])
    assert all(s["exp_avg"].dtype == torch.bfloat16 == s["exp_avg_sq"].dtype for s in optimizer.state.values())
    train(optimizer, inputs, targets, resumed, 10)
    for mine, uninterrupted in zip(resumed, whole):
        assert torch.equal(mine, uninterrupted)


def test_the_trainer_uses_it_on_a_cpu_with_transformers_arguments_and_not_where_switched_off_or_chosen(
        tmp_path, make_tiny_model):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    arguments = {"weight_decay": 0.1, "adam_beta1": 0.8, "adam_beta2": 0.99, "adam_epsilon": 1e-7,
                 "learning_rate": 3e-4}
    trainer = make_trainer(tmp_path / "a", student, teacher, args=arguments)
    optimizer = trainer.create_optimizer()
    assert trainer.compacts_optimizer and isinstance(optimizer, CompactAdamW)
    assert optimizer.seed == trainer.args.seed
    groups = sorted(optimizer.param_groups, key=lambda group: group["weight_decay"])
    assert [group["weight_decay"] for group in groups] == [0.0, 0.1]  # transformers' groups: no decay on norms
    assert all(group["betas"] == (0.8, 0.99) and group["eps"] == 1e-7 and group["lr"] == 3e-4 for group in groups)
    trained = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert {id(p) for group in groups for p in group["params"]} == trained

    off = make_trainer(tmp_path / "b", student, teacher, compact_optimizer=False, args=arguments)
    assert not off.compacts_optimizer and type(off.create_optimizer()) is torch.optim.AdamW
    sgd = make_trainer(tmp_path / "c", student, teacher, args={**arguments, "optim": "sgd"})
    assert not sgd.compacts_optimizer and type(sgd.create_optimizer()) is torch.optim.SGD
    mine = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    given = make_trainer(tmp_path / "d", student, teacher, optimizers=(mine, None))
    assert not given.compacts_optimizer and given.create_optimizer() is mine


def test_a_trainer_run_steps_with_it_and_saves_its_bf16_moments_in_the_checkpoint(tmp_path, make_tiny_model):
    student, teacher = make_tiny_model(seed=1), make_tiny_model(seed=2)
    trainer = make_trainer(tmp_path, student, teacher, args={"save_strategy": "steps", "save_steps": 2})
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), CompactAdamW)  # accelerate's wrap
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    saved = torch.load(tmp_path / "run" / "checkpoint-2" / "optimizer.pt")
    moments = [state[name] for state in saved["state"].values() for name in ("exp_avg", "exp_avg_sq")]
    assert moments and all(moment.dtype == torch.bfloat16 for moment in moments)
    assert all(state["step"].item() == 2 for state in saved["state"].values())


def test_either_optimizer_loads_the_others_state(small_chunks):
    """A checkpoint of fused fp32 AdamW resumes under CompactAdamW with bf16 moments, and the other way round."""
    inputs, targets, params = regression()
    fp32 = torch.optim.AdamW(params, lr=0.05)
    train(fp32, inputs, targets, params, 3)
    compact = CompactAdamW(params, lr=0.05)
    compact.load_state_dict(fp32.state_dict())
    assert all(s["exp_avg"].dtype == torch.bfloat16 == s["exp_avg_sq"].dtype for s in compact.state.values())
    train(compact, inputs, targets, params, 2)
    assert all(int(s["step"]) == 5 for s in compact.state.values())
    back = torch.optim.AdamW(params, lr=0.05)
    back.load_state_dict(compact.state_dict())
    assert all(s["exp_avg"].dtype == torch.float32 for s in back.state.values())
    losses = train(back, inputs, targets, params, 2)
    assert all(int(s["step"]) == 7 for s in back.state.values()) and losses[-1] < losses[0]
