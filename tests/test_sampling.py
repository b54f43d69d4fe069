"""gkd/sampling.py: the inverse-CDF draw that replaces torch.multinomial(probs, 1) while on-policy sampling."""

from __future__ import annotations

import pytest
import torch

from atlas_distill.gkd.sampling import inverse_cdf_draw, inverse_cdf_sampling


def test_draws_follow_the_weights_and_never_pick_a_zero_weight_token():
    weights = torch.tensor([[0.0, 1.0, 2.0, 0.0, 5.0, 2.0],  # unnormalised, as multinomial accepts
                            [0.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([inverse_cdf_draw(weights, generator) for _ in range(20000)], dim=1)
    assert draws.shape == (2, 20000) and draws.dtype == torch.int64
    assert (draws[1] == 5).all()  # one token holds all the weight
    counts = torch.bincount(draws[0], minlength=6).double()
    assert counts[0] == counts[3] == 0
    expected = weights[0].double() / weights[0].sum() * 20000
    # within 4 standard deviations of each binomial count
    sd = (expected * (1 - expected / 20000)).sqrt()
    assert ((counts - expected).abs() <= 4 * sd + 1e-9).all(), (counts, expected)


def test_the_same_seed_gives_the_same_draws():
    probs = torch.softmax(torch.randn(4, 300, generator=torch.Generator().manual_seed(1)), dim=-1)
    first = inverse_cdf_draw(probs, torch.Generator().manual_seed(7))
    assert torch.equal(first, inverse_cdf_draw(probs, torch.Generator().manual_seed(7)))


def test_only_single_cpu_draws_are_replaced_and_multinomial_is_restored():
    original = torch.multinomial
    probs = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    with inverse_cdf_sampling():
        assert torch.multinomial is not original
        torch.manual_seed(3)
        ours = torch.multinomial(probs, 1)
        torch.manual_seed(3)
        assert torch.equal(ours, inverse_cdf_draw(probs))
        assert torch.multinomial(probs, 2).shape == (2, 2)  # several samples: torch's own
        with pytest.raises(RuntimeError, match="probability tensor contains"):
            torch.multinomial(torch.tensor([[float("nan"), 1.0]]), 1)  # invalid weights: torch's own error
    assert torch.multinomial is original
    with pytest.raises(ValueError), inverse_cdf_sampling():
        raise ValueError("a failure inside still restores it")
    assert torch.multinomial is original
