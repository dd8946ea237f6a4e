"""One seed, one result: a run does not depend on what ran before it in the process."""
import json

import pytest
import torch

import headprune.train as train_module

from headprune.config import PruneConfig, SweepConfig
from headprune.recipes import prune
from headprune.sweeping import sweep
from headprune.train import EpochOrder


def run_cfg(model, data, out, method):
    return PruneConfig(model=str(model), dataset=str(data), output_dir=str(out), method=method, k=3,
                       epochs=2, batch_size=16, checkpoint_every=0, t0=1.0, tf=1e-4, seed=5)


def outcome(folder):
    results = json.loads((folder / "results.json").read_text())
    scores = json.loads((folder / "head_scores.json").read_text())
    return results["kept_heads"], results["metrics_pruned"], [r["logit"] for r in scores]


@pytest.mark.parametrize("method", ["dsp", "ste", "voita"])
def test_alone_after_other_work_and_inside_a_sweep_give_the_same_run(tiny_finetuned, tmp_path, method, monkeypatch):
    model, data = tiny_finetuned
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))  # the first run evaluates, later ones reuse
    prune(run_cfg(model, data, tmp_path / "alone", method))

    # unrelated work first: an evaluation of another model, draws on every global RNG
    from conftest import tiny_model
    other = tiny_model("bert").train()
    other(input_ids=torch.randint(5, 99, (4, 9))).logits.sum().backward()
    torch.rand(1000), __import__("random").random(), __import__("numpy").random.rand(7)
    prune(run_cfg(model, data, tmp_path / "after", method))

    base = {k: v for k, v in vars(run_cfg(model, data, tmp_path, method)).items() if k in
            {f for f in SweepConfig.__dataclass_fields__}}
    sweep(SweepConfig(**{**base, "methods": [method], "ks": [3], "seeds": [5], "output_dir": str(tmp_path / "sweep")}))

    alone = outcome(tmp_path / "alone")
    assert outcome(tmp_path / "after") == alone
    assert outcome(tmp_path / "sweep" / f"{method}-pipelined-k3-s5") == alone


def test_a_run_leaves_the_callers_rng_as_it_was(tiny_finetuned, tmp_path):
    import random
    model, data = tiny_finetuned
    torch.manual_seed(123)
    random.seed(7)
    expected = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(7)
    prune(run_cfg(model, data, tmp_path, "dsp"))  # seeds, trains with dropout and noise, evaluates
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_the_data_order_is_fixed_by_seed_and_epoch_and_changes_between_epochs():
    """docs/architecture.md: data order fixed by (seed, epoch). The same pair gives the same
    permutation (a resumed run sees the same batches); the next epoch reshuffles (not the first
    epoch's batches again), and another seed gives another order."""
    first = list(EpochOrder(50, seed=3, epoch=0))
    assert sorted(first) == list(range(50))
    assert list(EpochOrder(50, seed=3, epoch=0)) == first
    assert list(EpochOrder(50, seed=3, epoch=1)) != first
    assert list(EpochOrder(50, seed=4, epoch=0)) != first


def test_dropout_is_seeded_from_the_seed_and_each_step(tiny_finetuned, tmp_path, monkeypatch):
    model, data = tiny_finetuned
    seeds = []
    real = train_module.derive_seed

    def spy(*parts):
        if parts[1] == "dropout":
            seeds.append(parts)
        return real(*parts)
    monkeypatch.setattr(train_module, "derive_seed", spy)
    results = prune(PruneConfig(model=str(model), dataset=str(data), output_dir=str(tmp_path), k=3, batch_size=16,
                                epochs=1, mode="joint", seed=5, checkpoint_every=0))
    steps = results["steps"] if "steps" in results else len(seeds)
    # a new draw every step (not one dropout pattern repeated), from this run's seed, on process 0
    assert seeds == [(5, "dropout", step, 0) for step in range(steps)] and len(seeds) > 1
