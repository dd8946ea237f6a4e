"""Budgets in parameters or key/value cache instead of heads (issue 24, in part): the cost of a
unit against hand counts, the budget met exactly after save and load (dead heads included), and
bad budgets refused in one line."""
import pytest
import torch
from conftest import one_line_error, tiny, write_tiny_lm
from test_causal_lm import lm_cfg

from headprune.budget import budget_units, cost_of, site_costs, total_params
from headprune.cli import main
from headprune.config import PruneConfig
from headprune.errors import ConfigError
from headprune.measure import kv_cache_bytes_per_token
from headprune.pruning import load_pruned
from headprune.recipes import prune
from headprune.sites import find_sites


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return write_tiny_lm(tmp_path_factory.mktemp("lm"))  # 3 layers x 2 KV groups of 3 query heads of 8; width 48


def test_the_cost_of_a_unit_by_hand(tiny_lm):
    model = load_pruned(tiny_lm[0])
    costs = site_costs(find_sites(model, "group"))
    # a KV group: 3 query heads, a key and a value head (rows of 48 inputs), 3 x 8 output columns of 48
    assert [(c.kind, c.units, c.params) for c in costs] == [("decoder", 2, (24 + 16 + 24) * 48)] * 3
    assert costs[0].kv_bytes == 2 * 8 * 4  # its key and value, float32, per token
    assert costs[0].dead_params == (8 + 16 + 8) * 48 and costs[0].dead_kv_bytes == 64  # one query head kept
    fixed = total_params(model) - 6 * 3072
    # layer 0 keeps both groups, layer 1 one, layer 2 none: its dead head costs
    mask = torch.tensor([1.0, 1, 0, 1, 0, 0])
    assert cost_of(costs, mask, fixed) == {"parameters": fixed + 3 * 3072 + 1536, "kv_cache_bytes_per_token": 4 * 64}
    cfg = PruneConfig(task="causal-lm", target_kv_cache=0.5)
    assert budget_units(cfg, model, find_sites(model, "group")) == 3  # half of 6 groups' cache


@pytest.mark.parametrize("method", ["dsp", "fisher"])
def test_a_kv_cache_target_is_met_exactly_after_save_and_load(tiny_lm, tmp_path, method):
    model, data = tiny_lm
    cfg = lm_cfg(model, data, tmp_path, method=method, k=None, target_kv_cache=0.5)
    results = prune(cfg)
    budget = results["budget"]
    assert budget["target"] == "kv_cache_bytes_per_token" and budget["original"] == 6 * 64
    assert budget["target_value"] == 3 * 64 and budget["predicted"] == budget["measured"] <= 3 * 64
    loaded = load_pruned(tmp_path / "model")
    assert kv_cache_bytes_per_token(loaded) == budget["measured"]
    assert results["k"] == budget["units"] and "--target-kv-cache 0.5" in (tmp_path / "model" / "README.md").read_text()


def test_a_parameter_target_on_a_classifier(tiny_finetuned, tmp_path):
    original = sum(p.numel() for p in load_pruned(tiny_finetuned[0]).parameters())
    target = original - 5 * 1048 + 10  # room for 3 of the 8 heads (a head: 1,048 parameters)
    results = prune(tiny(*tiny_finetuned, tmp_path, k=None, target_params=target))
    assert results["k"] == 3 and results["budget"]["predicted"] == results["budget"]["measured"] == original - 5 * 1048
    assert sum(p.numel() for p in load_pruned(tmp_path / "model").parameters()) == original - 5 * 1048
    fraction = prune(tiny(*tiny_finetuned, tmp_path / "f", k=None, target_params=0.97))
    assert fraction["budget"]["measured"] <= 0.97 * original


def test_bad_budgets_are_refused_in_one_line(tiny_finetuned, tmp_path, capsys):
    with pytest.raises(ConfigError, match="give one budget: --target-params, --k"):
        PruneConfig(k=3, target_params=0.5)
    with pytest.raises(ConfigError, match="give one budget: --target-params, --target-kv-cache"):
        PruneConfig(target_params=0.5, target_kv_cache=0.5)
    with pytest.raises(ConfigError, match="at most 1"):
        PruneConfig(target_kv_cache=2.0)
    model, data = tiny_finetuned
    assert "caches no keys and values" in one_line_error(capsys, [
        "prune", "--model", model, "--dataset", data, "--target-kv-cache", "0.5", "--output-dir", tmp_path / "a"])
    assert "already has" in one_line_error(capsys, [
        "prune", "--model", model, "--dataset", data, "--target-params", "100", "--output-dir", tmp_path / "b"])
    with pytest.raises(SystemExit):  # a sweep compares budgets in --ks: no target option
        main(["sweep", "--model", str(model), "--target-params", "0.5", "--output-dir", str(tmp_path / "c")])
