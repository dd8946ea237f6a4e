"""Voita et al.: hard-concrete gates and the L0 penalty against hand-computed values."""
import math

import pytest
import torch

from conftest import tiny_model
from headprune import attach_gates
from headprune.methods import HardConcreteSelector, hard_concrete_eval, hard_concrete_sample, l0_penalty


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_training_sample_for_fixed_noise():
    log_a = torch.tensor([0.0, 1.0, -2.0, 3.0], dtype=torch.float64)
    u = torch.tensor([0.5, 0.9, 0.1, 0.999], dtype=torch.float64)
    expected = []
    for a, x in zip(log_a.tolist(), u.tolist()):
        s = sigmoid((math.log(x) - math.log(1 - x) + a) / 0.33)
        expected.append(min(1.0, max(0.0, s * 1.2 - 0.1)))
    assert hard_concrete_sample(log_a, u).tolist() == pytest.approx(expected, abs=1e-12)
    assert expected[0] == pytest.approx(0.5) and expected[2] == 0.0 and expected[3] == 1.0  # clipped ends


def test_training_samples_the_gates_from_noise_of_its_seed_and_step():
    """The training forward is hard_concrete_sample(log_a, u), u uniform in (eps, 1 - eps) from the
    generator of (seed, step): not the deterministic evaluation gate."""
    from headprune.methods.voita import EPS
    from headprune.randomness import generator
    sel = HardConcreteSelector(6, 2, seed=3)
    sel.train()
    sel.set_step(5)
    u = torch.rand(6, generator=generator("cpu", 3, "hard-concrete", 5), dtype=sel.log_a.dtype) * (1 - 2 * EPS) + EPS
    assert torch.equal(sel(), hard_concrete_sample(sel.log_a, u))
    assert not torch.allclose(sel(), hard_concrete_eval(sel.log_a))


def test_eval_gate():
    log_a = torch.tensor([0.0, 2.0, -3.0, 5.0], dtype=torch.float64)
    expected = [min(1, max(0, sigmoid(a) * 1.2 - 0.1)) for a in log_a.tolist()]
    assert hard_concrete_eval(log_a).tolist() == pytest.approx(expected, abs=1e-12)
    assert expected[3] == 1.0


def test_penalty_is_the_closed_form():
    log_a = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    closed = sum(sigmoid(a - 0.33 * math.log(0.1 / 1.1)) for a in log_a.tolist())
    assert l0_penalty(log_a).item() == pytest.approx(closed, abs=1e-12)
    assert 0.33 * math.log(1.1 / 0.1) == pytest.approx(0.791, abs=1e-3)  # sigmoid(log_a + 0.791)
    sel = HardConcreteSelector(4, k=2, l0_lambda=0.01)
    with torch.no_grad():
        sel.log_a.copy_(log_a)
    assert sel.penalty().item() == pytest.approx(0.01 * closed, abs=1e-7)


def test_top_k_breaks_ties_among_saturated_gates_by_log_a_then_index():
    sel = HardConcreteSelector(5, k=2)
    with torch.no_grad():
        sel.log_a.copy_(torch.tensor([5.0, 6.0, 5.0, -1.0, 4.0]))
    sel.eval()
    assert hard_concrete_eval(sel.log_a).tolist()[:3] == [1.0, 1.0, 1.0]  # three saturated gates
    assert sel().tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    three = HardConcreteSelector(5, k=3)
    with torch.no_grad():
        three.log_a.copy_(sel.log_a)
    assert three.eval()().tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]  # equal log_a: the lower index


def test_threshold_selection_keeps_gates_above_one_half():
    sel = HardConcreteSelector(4, k=None)
    with torch.no_grad():
        sel.log_a.copy_(torch.tensor([0.1, -0.1, 3.0, -3.0]))
    sel.eval()
    assert sel().tolist() == [1.0, 0.0, 1.0, 0.0]
    assert sel.heads_on() == 2


@pytest.mark.parametrize("budget,refusal", [
    (dict(k_per_kind=[2, 3, 5]), "--k-per-kind fixes the heads of each kind"),
    (dict(allocation="uniform"), "--allocation uniform fixes the heads of each layer"),
    (dict(k=None, target_params=0.5), "--target-params fixes the number of heads")])
def test_threshold_selection_refuses_a_budget_that_fixes_the_count(budget, refusal):
    from headprune.config import PruneConfig
    from headprune.errors import ConfigError
    with pytest.raises(ConfigError, match=f"^{refusal}: Voita's threshold selection does not$"):
        PruneConfig(method="voita", voita_selection="threshold", **budget)


def test_gradient_reaches_log_a_from_the_loss_and_the_penalty(batch):
    model = tiny_model("bert").train()
    gates = attach_gates(model)
    gates.selector = HardConcreteSelector(gates.num_heads, k=3, l0_lambda=0.1)
    loss = model(**batch, labels=torch.tensor([0, 1, 2])).loss
    (grad_loss,) = torch.autograd.grad(loss, gates.selector.log_a)
    (grad_penalty,) = torch.autograd.grad(gates.selector.penalty(), gates.selector.log_a)
    assert grad_loss.abs().sum() > 0
    assert (grad_penalty > 0).all()  # the penalty always pushes gates shut
