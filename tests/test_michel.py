"""Michel et al.: importance against finite differences, the normalisations and the loop by hand."""
import json
import math

import pytest
import torch

from conftest import tiny, tiny_model
from headprune import attach_gates
from headprune.methods import head_importance, iterative_pruning, normalize_importance, random_mask
from headprune.recipes import prune


def test_importance_equals_abs_dL_dmask_per_token_by_finite_differences():
    model = tiny_model("bert").double()
    gates = attach_gates(model)
    g = torch.Generator().manual_seed(0)
    batches = []
    for n in (3, 2):
        ids = torch.randint(5, 99, (n, 6), generator=g)
        attention = torch.ones_like(ids)
        attention[0, 4:] = 0
        batches.append({"input_ids": ids, "attention_mask": attention, "labels": torch.arange(n) % 3})
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.float64)  # partly pruned already

    got = head_importance(model, gates, batches, mask)

    def loss_at(m, batch):
        with torch.no_grad(), gates.override(m):
            return model(**batch).loss.item()

    eps = 1e-6
    expected = torch.zeros(8, dtype=torch.float64)
    for batch in batches:
        for h in range(8):
            up, down = mask.clone(), mask.clone()
            up[h] += eps
            down[h] -= eps
            expected[h] += abs(loss_at(up, batch) - loss_at(down, batch)) / (2 * eps)
    expected /= sum(b["attention_mask"].sum().item() for b in batches)  # 6 + 6 + 4 + 6 + 6 tokens
    assert got.tolist() == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-9)
    assert not model.training  # dropout off while scoring


def test_normalisation_per_layer_l2_then_global_min_max():
    scores = torch.tensor([3.0, 4.0, 1.0, 1.0], dtype=torch.float64)
    per_layer = [3 / 5, 4 / 5, 1 / math.sqrt(2), 1 / math.sqrt(2)]
    low, high = min(per_layer), max(per_layer)
    expected = [(x - low) / (high - low) for x in per_layer]
    assert normalize_importance(scores, [2, 2]).tolist() == pytest.approx(expected, abs=1e-12)
    assert normalize_importance(torch.ones(4), [2, 2]).tolist() == [0, 0, 0, 0]  # all equal
    # --michel-normalize none: min-max of the raw scores (3 -> 2/3, 4 -> 1, 1 -> 0), so the second
    # layer ranks last where per layer its heads outranked the first layer's 3
    assert normalize_importance(scores, [2, 2], per_layer=False).tolist() == pytest.approx([2 / 3, 1, 0, 0])


SCORES = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.6])


def run_loop(step, stop_at, exact=False, importance=None):
    masks = []
    curve = iterative_pruning(7, step, stop_at, importance or (lambda m: SCORES),
                              lambda m: masks.append(m.clone()) or {"acc": float(m.sum())}, exact=exact)
    return curve, masks


def test_loop_prunes_lowest_first_when_n_is_not_divisible_by_the_step():
    curve, masks = run_loop(step=3, stop_at=0)
    assert [e["heads"] for e in curve] == [7, 4, 1, 0]
    assert [e["pruned_now"] for e in curve] == [[], [1, 5, 3], [0, 6, 4], [2]]
    assert [e["metrics"]["acc"] for e in curve] == [7, 4, 1, 0]  # evaluated at every step
    assert masks[1].tolist() == [1, 0, 1, 0, 1, 0, 1]


def test_loop_lands_exactly_on_the_target():
    curve, _ = run_loop(step=3, stop_at=2)
    assert [e["heads"] for e in curve] == [7, 4, 2]
    assert curve[-1]["mask"].tolist() == [0, 0, 1, 0, 1, 0, 0]


def test_exact_pruning_re_estimates_under_the_new_mask():
    calls = []

    def importance(mask):
        calls.append(mask.clone())
        # after the first step, head 6 becomes the least important one left
        return SCORES if len(calls) == 1 else torch.tensor([0.5, 0, 0.9, 0, 0.7, 0, 0.05])

    curve, _ = run_loop(step=3, stop_at=1, exact=True, importance=importance)
    assert [e["pruned_now"] for e in curve] == [[], [1, 5, 3], [6, 0, 4]]
    assert len(calls) == 2 and calls[1].tolist() == [1, 0, 1, 0, 1, 0, 1]
    _, _ = run_loop(step=3, stop_at=1, exact=False, importance=lambda m: calls.append(m) or SCORES)
    assert len(calls) == 3  # once only without exact pruning


def test_ties_go_to_the_lower_index():
    curve = iterative_pruning(4, 1, 2, lambda m: torch.zeros(4), lambda m: {})
    assert [e["pruned_now"] for e in curve] == [[], [0], [1]]
    with pytest.raises(ValueError, match="at least 1"):
        iterative_pruning(4, 0, 2, lambda m: torch.zeros(4), lambda m: {})


def test_random_mask_is_reproducible_and_exact():
    a, b = random_mask(72, 12, seed=1), random_mask(72, 12, seed=1)
    assert torch.equal(a, b) and a.sum() == 12
    assert not torch.equal(a, random_mask(72, 12, seed=2))


@pytest.mark.parametrize("normalize,kept", [("layer", [("encoder", 0, 0), ("encoder", 1, 0)]),
                                            ("none", [("encoder", 0, 0), ("encoder", 0, 1)])])
def test_michel_normalize_chooses_between_layers_alike_and_raw_importance(tiny_finetuned, tmp_path, monkeypatch,
                                                                          normalize, kept):
    # 2 layers x 4 heads, importance 40 30 20 10 | 4 3 2 1: per layer both layers read 0.73 0.55
    # 0.37 0.18, so the top 2 are the first head of each (ties to the lower index); raw, layer 0's
    from conftest import tiny
    import headprune.methods.michel as michel
    from headprune.recipes import prune
    raw = torch.tensor([40.0, 30, 20, 10, 4, 3, 2, 1], dtype=torch.float64)
    monkeypatch.setattr(michel, "head_importance", lambda *args, **kw: raw)
    results = prune(tiny(*tiny_finetuned, tmp_path, method="michel", k=2, michel_step=3, michel_exact=False,
                         michel_normalize=normalize))
    assert results["kept_heads"] == kept and results["michel_normalize"] == normalize


def test_the_heads_michel_keeps_rank_above_every_head_it_pruned(tiny_finetuned, tmp_path):
    """head_scores.json (and the heat map) rank Michel's heads by the round in which they went:
    the kept heads rank highest, above the heads of the last round."""
    prune(tiny(*tiny_finetuned, tmp_path, method="michel", k=3, michel_step=2))
    scores = json.loads((tmp_path / "head_scores.json").read_text())
    kept = [s["pruning_round"] for s in scores if s["kept"]]
    pruned = [s["pruning_round"] for s in scores if not s["kept"]]
    assert len(kept) == 3 and len(pruned) == 5
    assert min(kept) > max(pruned)
    assert sorted(set(pruned)) == [1, 2, 3]  # 8 heads down to 3, two a round: rounds 1, 2 and 3


def test_importance_is_scored_with_dropout_off_whatever_mode_the_model_was_in(batch):
    """mask_gradients puts the model in evaluation mode itself: a model handed over in training
    mode (dropout on) gets the same, deterministic importance as one in evaluation mode."""
    model = tiny_model("bert").double()
    gates = attach_gates(model)
    batches = [{**batch, "labels": torch.tensor([0, 1, 2])}]
    expected = head_importance(model, gates, batches, torch.ones(8, dtype=torch.float64))
    model.train()
    got = head_importance(model, gates, batches, torch.ones(8, dtype=torch.float64))
    assert not model.training
    assert torch.allclose(got, expected, rtol=1e-9, atol=0)


def test_michel_evaluates_each_mask_once(tiny_finetuned, tmp_path, monkeypatch):
    """The unpruned model is its first round and its last round's heads are the model it saves: each
    mask is evaluated once (a translation model's evaluation is a beam search over every split)."""
    import headprune.tasks.classification as classification
    evaluated = []
    real = classification.Classification.evaluate

    def evaluate(self, acc, model, *args):
        evaluated.append(tuple(acc.unwrap_model(model).head_gates._override.tolist()))
        return real(self, acc, model, *args)
    monkeypatch.setattr(classification.Classification, "evaluate", evaluate)
    results = prune(tiny(*tiny_finetuned, tmp_path, method="michel", k=3, michel_step=2, reconstruct="none"))
    assert [entry["heads"] for entry in results["curve"]] == [8, 6, 4, 3]
    assert len(evaluated) == len(set(evaluated)) and len(evaluated) in (3, 4)  # (4: the unpruned one not cached)
    assert results["metrics_pruned"] == results["curve"][-1]["metrics"]
    assert results["curve"][0]["metrics"] == results["metrics_unpruned"]
