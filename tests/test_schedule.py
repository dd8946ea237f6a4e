"""The schedules of the scores. Steady (issue 9; the default of joint runs, STE and Voita): the
temperature falls over the whole run to where the soft top-k is hard, and the scores' learning
rate follows from the run's length. On planted head importances it finds the best heads where the
reference's schedule does not; on held-out text the reference's generalises better, so it is
pipelined DSP's default (issue 25)."""
import statistics
from types import SimpleNamespace

import pytest
import torch

from benchmarks.planted_heads import NUM_HEADS, cost_ratio, planted_importance, planted_loss, planted_ranks
from headprune.config import PruneConfig
from headprune.errors import ConfigError
from headprune.methods import DSPSelector, resolve_schedule
from headprune.selection import selector_and_optimizer
from headprune.train import linear_decay, total_steps


def test_the_default_is_the_reference_for_pipelined_dsp_where_the_loss_is_a_proxy_and_steady_for_the_rest():
    assert resolve_schedule(PruneConfig(), steps=32)["name"] == "reference"
    assert resolve_schedule(PruneConfig(), steps=32) == resolve_schedule(PruneConfig(schedule="reference"), steps=32)
    assert resolve_schedule(PruneConfig(task="translation"), steps=32)["name"] == "reference"
    for settings in (dict(mode="joint"), dict(method="ste"), dict(method="voita"), dict(mode="joint", method="ste"),
                     dict(task="causal-lm")):
        s = resolve_schedule(PruneConfig(**settings), steps=32)
        assert s == resolve_schedule(PruneConfig(schedule="steady", **settings), steps=32) and s["name"] == "steady"
    assert resolve_schedule(PruneConfig(schedule="steady"), steps=32)["name"] == "steady"


def test_the_steady_schedule_spans_the_run_and_sets_the_rate_from_its_length():
    s = resolve_schedule(PruneConfig(schedule="steady"), steps=32)
    assert (s["t0"], s["tf"], s["cooldown_steps"]) == (1000.0, 1e-2, 32)
    # linear decay from lr over 32 steps sums to lr * 33 / 2; the scores may travel 4 in all
    assert s["pruning_lr"] == pytest.approx(4 / 16.5)
    assert resolve_schedule(PruneConfig(schedule="steady"), steps=1000)["pruning_lr"] == pytest.approx(4 / 500.5)
    constant = resolve_schedule(PruneConfig(schedule="steady", pruning_lr_schedule="constant"), steps=100)
    assert constant["pruning_lr"] == pytest.approx(0.04)
    assert resolve_schedule(PruneConfig(method="voita"), steps=32)["pruning_lr"] == pytest.approx(4 / 16.5)


def test_the_select_rate_spends_the_travel_while_hot_then_jumps_to_half():
    # steady, 32 steps: T = 1000 * 1e-5 ** (s / 32) is below 1 from step 20 (0.75; 1.07 at 19);
    # travel 4 over steps 0-19 (a linear decay from lr sums to lr * 21 / 2), then 0.5 decaying to 0
    s = resolve_schedule(PruneConfig(schedule="steady", pruning_lr_schedule="select"), steps=32)
    assert s["select_step"] == 20 and s["pruning_lr"] == pytest.approx(4 / 10.5)
    _, optimizer, scheduler, _ = selector_and_optimizer(
        PruneConfig(schedule="steady", pruning_lr_schedule="select", k=4), 12, 32)
    rates = []
    for _ in range(33):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert sum(rates[:20]) == pytest.approx(4)
    assert rates[19] == pytest.approx(4 / 10.5 / 20) and rates[20] == pytest.approx(0.5)
    assert rates[26] == pytest.approx(0.5 * 6 / 12) and rates[32] == 0


def test_the_reference_preset_and_explicit_values():
    ref = resolve_schedule(PruneConfig(schedule="reference"), steps=300)
    assert (ref["t0"], ref["tf"], ref["cooldown_steps"], ref["pruning_lr"]) == (1000.0, 1e-8, 200, 0.5)
    assert resolve_schedule(PruneConfig(schedule="reference", method="voita"), steps=300)["pruning_lr"] == 0.1
    mine = resolve_schedule(PruneConfig(tf=1e-3, cooldown_fraction=0.5, pruning_lr=0.3), steps=300)
    assert (mine["tf"], mine["cooldown_steps"], mine["pruning_lr"]) == (1e-3, 150, 0.3)
    assert resolve_schedule(PruneConfig(cooldown_steps=7), steps=300)["cooldown_steps"] == 7
    with pytest.raises(ConfigError, match="schedule"):
        PruneConfig(schedule="fast")


def test_the_soft_mask_is_nearly_hard_at_the_end_of_the_steady_schedule_and_not_before():
    cfg = PruneConfig(k=12, schedule="steady")
    selector, optimizer, _, _ = selector_and_optimizer(cfg, NUM_HEADS, 100)
    w, g = planted_importance(0), torch.Generator().manual_seed(0)
    gaps = []
    for step in range(100):
        selector.set_step(step)
        loss = planted_loss(selector(), w, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        gaps.append(selector.log_values()["mask_gap"])
    # half the L1 distance between the soft mask and the hard top-k of the same noisy scores,
    # averaged over windows of steps because one step's Gumbel draw can make a near-tie (the last
    # step alone measured 0.05 to 1.3 over seeds 0-5). Window means measured with seed 0: 9.99
    # (uniform: 10 of the 12 heads' worth), 5.6 mid-run, 2.9 at 3/4, 1.5 over the last 10 steps.
    windows = [statistics.mean(gaps[a:b]) for a, b in [(0, 5), (45, 55), (70, 80), (90, 100)]]
    assert windows[0] > 9.9 and windows[1] > 4
    assert windows == sorted(windows, reverse=True)  # harder and harder as the temperature falls
    assert windows[3] < 2.5  # at Tf = 0.01 only near-ties of the noisy scores are still soft


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dsp_at_the_steady_schedule_finds_the_planted_heads(seed):
    # 72 heads, importances from 1 down to 0.1 (benchmarks/planted_heads.py), keep 12, 300 steps.
    # Measured: steady keeps ranks 0-9 with every seed and misses only heads whose cost is within
    # 20% of the 12th's (ranks 10-14); the reference schedule drops rank 0 with seeds 0 and 2.
    ranks = planted_ranks("dsp", k=12, steps=300, seed=seed)
    assert set(range(10)) <= set(ranks) and max(ranks) <= 14
    reference = planted_ranks("dsp", k=12, steps=300, seed=seed, schedule="reference")
    assert sum(r < 12 for r in reference) < sum(r < 12 for r in ranks)


def test_keeping_most_heads_finds_the_planted_ones_to_drop():
    # keep 60 of 72 (drop the 12 least important), 125 steps: relaxing the 12 dropped heads cost
    # 1.00-1.02x the best choice's loss with seeds 0-2 (measured); the reference's 60 rounds
    # 1.29-1.72x (1.72 with seed 0)
    for seed in (0, 1, 2):
        assert cost_ratio("dsp", k=60, steps=125, seed=seed) < 1.05
    assert cost_ratio("dsp", k=60, steps=125, seed=0, relaxation="k-rounds") > 1.5


def test_joint_runs_at_the_default_settle_for_their_last_two_thirds():
    joint = resolve_schedule(PruneConfig(mode="joint"), steps=30)
    # 20 settled steps; the temperature and the scores' travel of 4 fit in the 10 that learn
    assert (joint["learn_steps"], joint["cooldown_steps"]) == (10, 10)
    assert joint["pruning_lr"] == pytest.approx(4 / 5.5)
    assert resolve_schedule(PruneConfig(mode="joint", settle_fraction=1 / 3), steps=30)["learn_steps"] == 20
    assert resolve_schedule(PruneConfig(), steps=30)["learn_steps"] == 30  # pipelined: weights frozen
    assert resolve_schedule(PruneConfig(mode="joint", schedule="reference"), steps=30)["learn_steps"] == 30
    assert resolve_schedule(PruneConfig(mode="joint", settle_fraction=0), steps=30)["learn_steps"] == 30
    assert resolve_schedule(PruneConfig(mode="joint", schedule="reference", settle_fraction=0.5),
                            steps=30)["learn_steps"] == 15
    with pytest.raises(ConfigError, match="--settle-fraction is for joint runs: a pipelined run trains no"):
        PruneConfig(settle_fraction=0.5)
    with pytest.raises(ConfigError, match="settle_fraction=1.0: must be less than 1"):
        PruneConfig(mode="joint", settle_fraction=1)


@pytest.mark.parametrize("method,lr_schedule", [("dsp", "linear"), ("dsp", "constant"), ("ste", "linear"),
                                                ("voita", "constant")])
def test_settled_steps_train_the_weights_with_the_kept_heads_and_leave_the_scores(method, lr_schedule):
    """30 steps, the last 10 settled: from step 20 the training mask is the evaluation mask (the
    heads kept), the scores neither get a gradient nor move (also under a constant rate, where
    Adam's momentum would carry them on), and the weights go on learning."""
    cfg = PruneConfig(mode="joint", method=method, k=4, pruning_lr_schedule=lr_schedule, settle_fraction=1 / 3)
    weight = torch.nn.Parameter(torch.zeros(12))
    selector, optimizer, scheduler, info = selector_and_optimizer(
        cfg, 12, 30, joint=({"params": [weight], "lr": 0.1}, lambda step: 1.0))
    assert info["settle_step"] == 20
    target = torch.linspace(1, 0, 12)
    for step in range(30):
        selector.set_step(step)
        mask = selector()
        loss = ((mask * weight - target) ** 2).sum() + getattr(selector, "penalty", lambda: 0)()
        optimizer.zero_grad()
        loss.backward()
        if step == 20:
            kept, scores, weights = selector.eval().forward().clone(), selector.scores().clone(), weight.detach().clone()
            selector.train()
        if step >= 20:
            assert torch.equal(mask.detach(), kept)
            assert all(p.grad is None or not p.grad.any() for p in selector.parameters())
        optimizer.step()
        scheduler.step()
    assert torch.equal(selector.scores(), scores)
    assert not torch.equal(weight.detach(), weights)
    assert "noise_gap" not in selector.log_values()


@pytest.mark.parametrize("straight_through", [False, True])
def test_the_training_budget_falls_from_every_head_to_k(straight_through):
    # 12 heads, keep 4, shrink over 4 steps: 12 - 8 * step / 4 heads, then 4; eval keeps 4 throughout
    selector = DSPSelector(12, 4, t0=1.0, tf=0.1, cooldown_steps=8, straight_through=straight_through,
                           shrink_steps=4)
    budgets = []
    for step in range(8):
        selector.train()
        selector.set_step(step)
        budgets.append(float(selector().detach().sum()))  # the soft top-k, like the hard one, sums to its budget
        assert selector.log_values()["budget"] == round(budgets[-1])
        selector.eval()
        assert selector().sum() == 4
    assert budgets == pytest.approx([12, 10, 8, 6, 4, 4, 4, 4])
    # per group: each group's budget falls from its size to its k (6 - 4 / 2 = 4 and 6 - 5 / 2 = 3.5 -> 4)
    grouped = DSPSelector(12, None, shrink_steps=2, budget=[(list(range(6)), 2), (list(range(6, 12)), 1)])
    grouped.set_step(1)
    mask = grouped().detach()
    assert float(mask[:6].sum()) == pytest.approx(4) and float(mask[6:].sum()) == pytest.approx(4)


def test_the_shrink_is_a_fraction_of_the_steps_that_learn_for_dsp_and_ste_only():
    steps = 32
    assert resolve_schedule(PruneConfig(), steps)["shrink_steps"] == 0  # pipelined: k from the first step
    # joint dsp at the default: over all the steps in which the scores learn (the first third of 30)
    assert resolve_schedule(PruneConfig(mode="joint"), 30)["shrink_steps"] == 10
    assert resolve_schedule(PruneConfig(mode="joint", method="ste"), 30)["shrink_steps"] == 0
    assert resolve_schedule(PruneConfig(mode="joint", schedule="reference"), 30)["shrink_steps"] == 0
    assert resolve_schedule(PruneConfig(mode="joint", shrink_fraction=0), 30)["shrink_steps"] == 0
    assert resolve_schedule(PruneConfig(shrink_fraction=1), steps)["shrink_steps"] == 32
    assert resolve_schedule(PruneConfig(method="ste", shrink_fraction=0.5), steps)["shrink_steps"] == 16
    assert resolve_schedule(PruneConfig(mode="joint", shrink_fraction=0.5), 30)["shrink_steps"] == 5
    with pytest.raises(ConfigError, match="--shrink-fraction is for dsp and ste"):
        PruneConfig(method="voita", shrink_fraction=0.5)
    with pytest.raises(ConfigError, match="shrink_fraction=1.5: must be at most 1"):
        PruneConfig(shrink_fraction=1.5)


def test_linear_warmup_starts_above_zero_and_reaches_the_full_rate_at_its_last_step():
    factor = linear_decay(10, warmup_steps=4)
    assert [factor(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # no step at rate 0
    assert factor(4) == pytest.approx(1.0) and factor(10) == 0.0


def test_a_fractional_number_of_epochs_rounds_to_the_nearest_step():
    cfg = SimpleNamespace(epochs=0.5, batch_size=4, max_tokens=None)
    assert total_steps(cfg, list(range(28)), 1) == 4  # 7 steps an epoch: 3.5 rounds to 4, not down to 3
