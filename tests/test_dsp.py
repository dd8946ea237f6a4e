"""DSP: soft top-k, hard top-k, annealing, STE, and gradients reaching the logits."""
import math

import pytest
import torch

from conftest import tiny_model
from headprune import DSPSelector, attach_gates, hard_top_k, soft_top_k
from headprune.methods import geometric_temperature


def test_soft_top_k_matches_hand_computation():
    # k=2 over four scores at t=1, written out step by step: two rounds of softmax, the second
    # discounting each score by what the first took
    s = [1.0, 0.0, -1.0, -2.0]
    e = [math.exp(x) for x in s]
    p1 = [x / sum(e) for x in e]
    r2 = [math.exp(si) * (1 - pi) for si, pi in zip(s, p1)]
    expected = torch.tensor([a + b / sum(r2) for a, b in zip(p1, r2)], dtype=torch.float64)
    assert torch.allclose(soft_top_k(torch.tensor(s, dtype=torch.float64), 2, 1.0), expected, atol=1e-12)


def test_keeping_more_than_half_relaxes_the_heads_dropped():
    # keep 2 of 3 = drop 1: one round of softmax over the negated scores, one minus that
    s = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    e = [math.exp(-1), 1.0, math.exp(1)]
    expected = torch.tensor([1 - x / sum(e) for x in e], dtype=torch.float64)
    assert torch.allclose(soft_top_k(s, 2, 1.0), expected, atol=1e-12)
    scores = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(soft_top_k(scores, 7, 0.3), 1 - soft_top_k(-scores, 2, 0.3), atol=1e-12)
    keep_all = soft_top_k(scores.requires_grad_(), 9, 0.3)  # nothing to drop: ones, and a zero gradient
    assert torch.equal(keep_all, torch.ones(9, dtype=torch.float64))
    keep_all.sum().backward()
    assert torch.equal(scores.grad, torch.zeros(9, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 5, 12, 20])
def test_soft_top_k_sums_to_k(k):
    scores = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    for t in (1000.0, 1.0, 1e-2, 1e-8):
        assert soft_top_k(scores, k, t).sum().item() == pytest.approx(k, abs=1e-9)


def test_soft_top_k_tends_to_hard_top_k_as_temperature_falls():
    scores = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hard = hard_top_k(scores, 7)
    gaps = [(soft_top_k(scores, 7, t) - hard).abs().max().item() for t in (10.0, 1.0, 0.1, 1e-3, 1e-8)]
    assert all(a >= b for a, b in zip(gaps, gaps[1:]))
    assert gaps[0] > 0.5 and gaps[-1] < 1e-9
    # at a very high temperature the mask is uniform: k/N everywhere
    assert torch.allclose(soft_top_k(scores, 7, 1e9), torch.full((30,), 7 / 30, dtype=torch.float64), atol=1e-6)


def test_hard_top_k_keeps_exactly_k_with_ties_and_k_equal_n():
    ties = torch.tensor([0.5, 1.0, 1.0, 1.0, 0.5])
    assert hard_top_k(ties, 2).tolist() == [0, 1, 1, 0, 0]  # ties go to the lower index
    assert hard_top_k(ties, 4).tolist() == [1, 1, 1, 1, 0]
    assert hard_top_k(torch.zeros(6), 3).tolist() == [1, 1, 1, 0, 0, 0]
    assert hard_top_k(ties, 5).tolist() == [1, 1, 1, 1, 1]


def test_geometric_schedule_hits_t0_and_tf_at_the_right_steps():
    assert geometric_temperature(0, 1000, 1e-8, 100) == 1000
    assert geometric_temperature(50, 1000, 1e-8, 100) == pytest.approx(1000 * (1e-11) ** 0.5)
    assert geometric_temperature(100, 1000, 1e-8, 100) == 1e-8
    assert geometric_temperature(250, 1000, 1e-8, 100) == 1e-8
    ts = [geometric_temperature(s, 1000, 1e-8, 100) for s in range(101)]
    ratios = [b / a for a, b in zip(ts, ts[1:])]
    assert max(ratios) == pytest.approx(min(ratios))  # constant factor per step


def test_selector_samples_in_training_and_is_hard_in_eval():
    sel = DSPSelector(12, 4, t0=1.0, tf=1e-8, cooldown_steps=10, seed=3)
    sel.train()
    a = sel()
    torch.rand(5)  # the global RNG plays no part
    assert torch.equal(sel(), a)  # the noise of a step follows (seed, step)
    sel.set_step(1)
    assert not torch.equal(sel(), a)  # fresh Gumbel noise each step
    assert a.sum().item() == pytest.approx(4)
    other = DSPSelector(12, 4, t0=1.0, tf=1e-8, cooldown_steps=10, seed=4)
    assert not torch.equal(other.logits, sel.logits)  # the initial logits follow the seed
    assert torch.equal(DSPSelector(12, 4, seed=3).logits, sel.logits)
    sel.eval()
    assert torch.equal(sel(), hard_top_k(sel.logits.detach(), 4))


def test_the_noise_is_gumbel_so_the_noisy_argmax_is_a_softmax_draw():
    """Gumbel-max: argmax(logits + G) picks head i with probability softmax(logits)_i (exponential
    noise, -log u, would pick head 0 of [1, 0] 82% of the time, not 73%)."""
    from headprune.methods.dsp import sample_gumbel
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(sample_gumbel(torch.zeros(3, dtype=torch.float64), gen), -torch.log(-torch.log(u)))
    logits = torch.tensor([1.0, 0.0], dtype=torch.float64)
    noise = sample_gumbel(torch.zeros(40_000, 2, dtype=torch.float64), torch.Generator().manual_seed(1))
    picked = ((logits + noise).argmax(1) == 0).double().mean().item()
    assert picked == pytest.approx(math.exp(1) / (math.exp(1) + 1), abs=0.012)  # 0.731; 5 standard errors


@pytest.mark.parametrize("k", [0, 13])
def test_selector_rejects_k_outside_1_to_n(k):
    with pytest.raises(ValueError, match="between 1 and the model's 12 heads"):
        DSPSelector(12, k)


@pytest.mark.parametrize("k", [3, 8])
def test_ste_keeps_exactly_k_and_passes_the_gradient_straight(k):
    sel = DSPSelector(8, k, straight_through=True)
    with torch.no_grad():
        sel.logits.copy_(torch.tensor([0.1, 0.3, 0.3, 0.3, 0.0, 0.0, -1.0, 0.2], dtype=torch.float64))
    sel.train()
    mask = sel()
    assert mask.tolist() == hard_top_k(sel.logits.detach(), k).tolist()
    assert mask.sum().item() == k
    weights = torch.arange(8, dtype=torch.float64)
    (mask * weights).sum().backward()
    assert torch.equal(sel.logits.grad, weights)  # dL/dw = dL/dmask


@pytest.mark.parametrize("method", ["dsp", "ste"])
def test_gradients_reach_the_logits_through_the_model(method, batch):
    model = tiny_model("bert").train()
    gates = attach_gates(model)
    gates.selector = DSPSelector(gates.num_heads, 3, t0=1.0, tf=1e-3, cooldown_steps=10,
                                 straight_through=method == "ste")
    loss = model(**batch, labels=torch.tensor([0, 1, 2])).loss
    loss.backward()
    grad = gates.selector.logits.grad
    assert grad is not None and grad.abs().sum() > 0
