"""Budgets in parameters or key/value cache instead of heads (issue 24, in part): the cost of a
unit against hand counts, the budget met exactly after save and load (dead heads included), and
bad budgets refused in one line."""
import json
from types import SimpleNamespace
import logging

import pytest
import torch
from conftest import one_line_error, tiny, tiny_model, write_tiny_lm
from test_causal_lm import lm_cfg

from headprune.budget import budget_units, cost_of, site_costs, total_params
from headprune.config import SCORED, PruneConfig
from headprune.errors import ConfigError
from headprune.measuring import kv_cache_bytes_per_token
from headprune.pruning import load_pruned
from headprune.recipes import prune
from headprune.selection import check_budget
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
    # said in KV groups, as the gates prune them, not in heads; the data in texts (blocks: calibration)
    report = (tmp_path / "report.md").read_text()
    assert f"pipelined: {results['k']} of 6 KV groups" in report and f"({results['train_examples']} training texts)" in report
    assert (f"Budget: at most 192 bytes of key/value cache per token (the whole model: 384); predicted "
            f"{budget['predicted']:,.0f}, measured on this model {budget['measured']:,.0f}.") in \
        (tmp_path / "model" / "README.md").read_text()


def test_a_parameter_target_on_a_classifier(tiny_finetuned, tmp_path):
    original = sum(p.numel() for p in load_pruned(tiny_finetuned[0]).parameters())
    target = original - 5 * 1048 + 10  # room for 3 of the 8 heads (a head: 1,048 parameters)
    results = prune(tiny(*tiny_finetuned, tmp_path, k=None, target_params=target))
    assert results["k"] == 3 and results["budget"]["predicted"] == results["budget"]["measured"] == original - 5 * 1048
    assert sum(p.numel() for p in load_pruned(tmp_path / "model").parameters()) == original - 5 * 1048
    from headprune.config import run_settings  # its recorded settings make the same run again (k worked out, left out)
    again = run_settings(results["config"])
    assert again.target_params == target and again.method == results["method"]
    older = {**results["config"], "target_params": None, "k": 3, "at_length": 32}  # an --at-length it did not read
    assert run_settings(older).at_length is None and run_settings(older).k == 3
    fraction = prune(tiny(*tiny_finetuned, tmp_path / "f", k=None, target_params=0.97))
    assert fraction["budget"]["measured"] <= 0.97 * original


def test_bad_budgets_are_refused_in_one_line(tiny_finetuned, tmp_path, capsys):
    with pytest.raises(ConfigError, match="give one budget: --target-params, --k"):
        PruneConfig(k=3, target_params=0.5)
    with pytest.raises(ConfigError, match="give one budget: --target-params, --target-kv-cache"):
        PruneConfig(target_params=0.5, target_kv_cache=0.5)
    with pytest.raises(ConfigError, match="at most 1"):
        PruneConfig(target_kv_cache=2.0)
    with pytest.raises(ConfigError, match="--target-params sizes the smaller model that --save-format physical"):
        PruneConfig(target_params=0.5, save_format="zeroed")  # the zeroed model is no smaller
    for timing in ({"at_length": 32}, {"at_batch_size": 4}, {"at_new_tokens": 8}):
        with pytest.raises(ConfigError, match="says how --target-speedup is timed"):
            PruneConfig(k=3, **timing)  # ignored without a speedup to time
    model, data = tiny_finetuned
    assert "caches no keys and values" in one_line_error(capsys, [
        "prune", "--model", model, "--dataset", data, "--target-kv-cache", "0.5", "--output-dir", tmp_path / "a"])
    assert "already has" in one_line_error(capsys, [
        "prune", "--model", model, "--dataset", data, "--target-params", "100", "--output-dir", tmp_path / "b"])
    assert "a speedup, more than 1" in one_line_error(capsys, [  # a sweep's targets are checked the same way
        "sweep", "--model", model, "--dataset", data, "--target-speedup", "1.2", "0.9", "--output-dir", tmp_path / "c"])
    assert "give one budget" in one_line_error(capsys, [
        "sweep", "--model", model, "--dataset", data, "--target-speedup", "1.2", "--target-params", "0.5",
        "--output-dir", tmp_path / "d"])
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    # a sweep's budget that nothing fits is refused before its first run, not after the others
    assert "already has" in one_line_error(capsys, [
        "sweep", "--model", model, "--dataset", data, "--methods", "random", "--target-params", "0.99", "100",
        "--output-dir", tmp_path / "e"])
    assert not (tmp_path / "e").exists()


# -- a speedup on this machine: the latency table ---------------------------------------------------

def test_the_latency_table_from_pairs_of_timings_and_its_prediction(tiny_lm, tmp_path, monkeypatch, caplog):
    import headprune.latency as latency
    import headprune.measuring as measure
    model = load_pruned(tiny_lm[0])
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path))

    def fake_alternate(models, run, repeats, warmup, device):  # no clock: 10 ms plus 1 ms a kept group
        return {name: {"median": 0.010 + 0.001 * sum(s.num_heads for s in find_sites(m))} for name, m in models.items()}
    monkeypatch.setattr(measure, "alternate", fake_alternate)
    with caplog.at_level(logging.INFO, logger="headprune"):
        table = latency.latency_table(model, "group", 2, 8, "cpu")
    assert "latency table: the whole model takes 16 ms; a layer with every unit decoder 2 ms" in caplog.text
    # whole: 10 + 6 ms; all 3 layers at h = 0, 1, 2 groups: 10 + 3h ms (the fake clock does not count
    # dead groups), so one layer with h groups costs A(h) = (T(h) - T(0)) / 3 = h ms
    assert table["whole"] == pytest.approx(0.016)
    assert table["kinds"]["decoder"]["per_layer"] == pytest.approx([0.0, 0.001, 0.002])
    assert "check" not in table  # one kind: the half model would be the setting h = 1 timed again
    sites = find_sites(model, "group")
    # 1, 2 and 0 groups: 16 - (2 - 1) - 0 - (2 - 0) ms
    assert latency.predicted_seconds(table, sites, torch.tensor([1.0, 0, 1, 1, 0, 0])) == pytest.approx(0.013)
    monkeypatch.setattr(measure, "alternate", None)  # measured once: read back, not timed again
    assert latency.latency_table(model, "group", 2, 8, "cpu") == table
    cached = next((tmp_path / "latency").glob("*.json"))
    cached.write_text("{damaged")  # a damaged cache entry is measured again and replaced
    monkeypatch.setattr(measure, "alternate", fake_alternate)
    assert latency.latency_table(model, "group", 2, 8, "cpu") == table and json.loads(cached.read_text()) == table
    assert latency.even_mask(sites, 4).tolist() == [1, 1, 1, 0, 1, 0]  # 2, 1, 1 a layer
    # 16 / 14 ms: 4 groups spread 2, 1, 1 are predicted to give it; the fit drops the lowest-scored
    cfg = PruneConfig(task="causal-lm", target_speedup=16 / 14)
    from headprune.budget import fit, speed_units
    assert speed_units(cfg, sites, table) == 4
    mask, record = fit(cfg, model, sites, torch.ones(6), torch.tensor([6.0, 5, 4, 3, 2, 1]), table)
    assert mask.tolist() == [1, 1, 1, 1, 0, 0] and record["predicted"] == pytest.approx(16 / 14)
    assert record["target"] == "speedup" and record["predicted_seconds"] == pytest.approx(0.014)
    # uniform: the most units spread evenly that fit (4 would be 2, 1, 1: 14 ms), each layer's best
    cfg = PruneConfig(task="causal-lm", target_speedup=16 / 13, allocation="uniform")
    mask, record = fit(cfg, model, sites, torch.ones(6), torch.tensor([6.0, 5, 3, 4, 1, 2]), table)
    assert mask.tolist() == [1, 0, 0, 1, 0, 1] and record["units"] == 3 and record["allocation"] == "uniform"
    assert record["predicted_seconds"] == pytest.approx(0.013)  # 3 units: 1 a layer, 13 ms
    with pytest.raises(ConfigError, match="a speedup, more than 1"):
        PruneConfig(target_speedup=0.9)


def test_a_speed_target_end_to_end_records_the_measured_speedup(tiny_finetuned, tmp_path, monkeypatch):
    import headprune.measuring as measure
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    import gc
    import weakref
    import headprune.recipes as recipes
    monkeypatch.setattr(measure, "alternate", lambda models, run, *a: {  # 8 ms plus 1 ms a kept head
        name: {"median": 0.008 + 0.001 * sum(s.num_heads for s in find_sites(m))} for name, m in models.items()})
    run_model, alive = [], []
    real_load, real_time = recipes.load_for_run, measure.time_forward_or_generation
    monkeypatch.setattr(recipes, "load_for_run", lambda *a, **k: (
        lambda loaded: run_model.append(weakref.ref(loaded[1])) or loaded)(real_load(*a, **k)))
    monkeypatch.setattr(measure, "time_forward_or_generation", lambda models, *a: (
        gc.collect(), alive.append(run_model[0]() is not None), real_time(models, *a))[-1])
    results = prune(tiny(*tiny_finetuned, tmp_path / "run", k=None, target_speedup=1.5, at_batch_size=4,
                         at_length=16))
    assert alive == [False]  # the saved model measured with the run's model freed: two models in memory, not three
    budget = results["budget"]
    # whole 16 ms; 1.5x: at most 10.67 ms, so 2 of the 8 heads
    assert results["k"] == budget["units"] == 2 and budget["predicted"] == pytest.approx(16 / 10)
    assert budget["measured"] > 0  # timed on the saved model against the whole architecture (no bound asserted)
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "--target-speedup 1.5" in card  # the command, and what it gave: the card does not leave a reader to guess
    assert ("Budget: a speedup of at least 1.5x (on the machine that pruned it); predicted 1.6x, measured on this "
            f"model {budget['measured']:.3g}x.") in card
    assert "- budget (speedup, allocation global): target 1.5 (the whole model: 1), predicted 1.6 with 2 heads, " \
        f"measured on the saved model {budget['measured']:.4g}" in (tmp_path / "run" / "report.md").read_text()


def test_a_speed_target_on_a_model_pruned_before_is_timed_against_it(tiny_finetuned, tmp_path, monkeypatch):
    # the target and the prediction are relative to the model given (4 heads: 12 ms); so is the measurement
    import headprune.measuring as measure
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(measure, "alternate", lambda models, run, *a: {  # 8 ms plus 1 ms a kept head
        name: {"median": 0.008 + 0.001 * sum(s.num_heads for s in find_sites(m))} for name, m in models.items()})
    prune(tiny(*tiny_finetuned, tmp_path / "first", method="random", k=4, allocation="uniform"))
    results = prune(tiny(tmp_path / "first" / "model", tiny_finetuned[1], tmp_path / "again", method="random",
                         k=None, target_speedup=1.2, at_length=16))
    budget = results["budget"]
    assert results["k"] == 2 and budget["predicted"] == pytest.approx(1.2)  # 12 ms -> 10 ms
    assert budget["measured"] == pytest.approx(1.2)  # not 16 / 10 ms: against the whole architecture
    # every "unpruned" figure is that model's: the reports say so
    assert results["pruned_before"] and "pruned before: the baseline below is that model" in \
        (tmp_path / "again" / "report.md").read_text()
    assert "| split | input model (pruned before) | this model |" in (tmp_path / "again" / "model" / "README.md").read_text()


def test_a_sweeps_unreachable_speedup_is_refused_before_its_first_run(tiny_finetuned, tmp_path, monkeypatch, capsys,
                                                                      caplog):
    # 8 ms plus 1 ms a head: 16 ms whole, 9 ms with one head left, so 1.2x is reachable and 50x is not
    import headprune.measuring as measure
    from conftest import one_line_error
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(measure, "alternate", lambda models, run, *a: {
        name: {"median": 0.008 + 0.001 * sum(s.num_heads for s in find_sites(m))} for name, m in models.items()})
    model, data = tiny_finetuned
    line = one_line_error(capsys, ["sweep", "--model", model, "--dataset", data, "--methods", "random", "fisher",
                                   "--target-speedup", "1.2", "50", "--max-length", "16", "--output-dir", tmp_path / "s"])
    assert "--target-speedup 50: even one head predicts 1.78x" in line and not (tmp_path / "s").exists()
    # a reachable one: the table the plan measures is the one its run reads (the same model, loaded alike)
    import logging
    from headprune.cli import main
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "fresh"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="headprune"):
        assert main(["sweep", "--model", str(model), "--dataset", str(data), "--methods", "random", "--target-speedup",
                     "1.2", "--max-length", "16", "--output-dir", str(tmp_path / "r")]) == 0
    assert caplog.text.count("measuring a latency table") == 1
    assert "latency table measured before on this machine" in caplog.text

def test_a_latency_table_stopped_midway_times_only_the_settings_left(tiny_lm, tmp_path, monkeypatch, caplog):
    """Each setting's timing is kept as it is made: the table measured again after a kill times the
    settings left and equals one measured at once; the kept timings go once the table is cached."""
    import headprune.latency as latency
    import headprune.measuring as measure
    model = load_pruned(tiny_lm[0])
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    timed = []

    class Killed(Exception):
        pass

    def fake_alternate(models, run, repeats, warmup, device):  # 10 ms plus `per_group` ms a kept group
        units = sum(s.num_heads for s in find_sites(models["pruned"]))
        if kill and len(timed) == 1:
            raise Killed
        timed.append(units)
        return {name: {"median": 0.010 + per_group * sum(s.num_heads for s in find_sites(m))}
                for name, m in models.items()}
    monkeypatch.setattr(measure, "alternate", fake_alternate)
    kill, per_group = True, 0.001
    with pytest.raises(Killed):
        latency.latency_table(model, "group", 2, 8, "cpu")
    (partial,) = (tmp_path / "cache" / "latency").glob("*.partial.json")
    kill, timed[:] = False, []
    with caplog.at_level(logging.INFO, logger="headprune"):
        table = latency.latency_table(model, "group", 2, 8, "cpu")
    # h = 0 (timed before the kill) timed again to see that the machine times alike, then h = 1
    assert timed == [0, 3] and "times unlike" not in caplog.text
    assert "2 settings, each timed 20 times against the whole model (once per machine: cached); 1 timed before" \
        in caplog.text
    assert not partial.exists() and len(list(partial.parent.iterdir())) == 1
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "another cache"))
    assert latency.latency_table(model, "group", 2, 8, "cpu") == table and timed == [0, 3, 0, 3]
    # a damaged record of timings (or one of settings this table has not) is timed again
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    for entry in partial.parent.iterdir():
        entry.unlink()
    for damaged in ("[damaged", '{"decoder 7": [0.016, 0.5], "encoder 0": [0.016, 0.5]}'):
        partial.write_text(damaged)
        timed[:] = []
        assert latency.latency_table(model, "group", 2, 8, "cpu") == table and timed == [0, 3]
        next(partial.parent.glob("*[0-9a-f].json")).unlink()

    # a stopped table resumed where the machine times otherwise (here each group costs 2 ms, not 1:
    # h = 0 saves 12 of 22 ms, not 6 of 16) is timed again from the start, not mixed
    kill, timed[:] = True, []
    with pytest.raises(Killed):
        latency.latency_table(model, "group", 2, 8, "cpu")
    kill, per_group, timed[:] = False, 0.002, []
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="headprune"):
        resumed = latency.latency_table(model, "group", 2, 8, "cpu")
    assert timed == [0, 3] and "the machine times unlike the stopped run that began this table (decoder 0: the " \
        "pruned model saved 37.5% then, 54.5% now): timing every setting again" in caplog.text
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "a third cache"))
    assert resumed == latency.latency_table(model, "group", 2, 8, "cpu") != table
    assert resumed["kinds"]["decoder"]["per_layer"] == pytest.approx([0.0, 0.002, 0.004])


def test_the_latency_table_is_monotone_and_kept_per_shape_and_kernel(tiny_lm, tmp_path, monkeypatch):
    import headprune.latency as latency
    import headprune.measuring as measure
    from headprune.pruning import remove_heads
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path))
    model = load_pruned(tiny_lm[0])
    noisy = {0: 0.012, 3: 0.011, 6: 0.016}  # every layer at 1 group timed faster than at none: noise
    monkeypatch.setattr(measure, "alternate", lambda models, run, *a: {
        name: {"median": noisy[sum(s.num_heads for s in find_sites(m))]} for name, m in models.items()})
    table = latency.latency_table(model, "group", 1, 8, "cpu")
    assert table["kinds"]["decoder"]["per_layer"] == pytest.approx([0.0, 0.0, 0.004 / 3])  # not -0.001 / 3 at 1
    key = latency._key(model, "group", 1, 8, "cpu", None)
    other = "eager" if model.config._attn_implementation != "eager" else "sdpa"
    assert latency._key(load_pruned(tiny_lm[0], attn_implementation=other), "group", 1, 8, "cpu", None) != key
    smaller = remove_heads(load_pruned(tiny_lm[0]), [("decoder", i, 0) for i in range(3)])  # the same config.json
    assert latency._key(smaller, "group", 1, 8, "cpu", None) != key

def test_a_generation_latency_table_and_its_options(tiny_lm, tiny_finetuned, tmp_path, monkeypatch, capsys):
    import headprune.latency as latency
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path))
    table = latency.latency_table(load_pruned(tiny_lm[0]), "group", 1, 4, "cpu", new_tokens=2, repeats=1, warmup=0)
    entry = table["kinds"]["decoder"]
    assert entry["units"] == 2 and len(entry["per_layer"]) == 3 and entry["per_layer"][0] == 0 and table["whole"] > 0
    with pytest.raises(ConfigError, match="give --target-speedup"):
        PruneConfig(at_new_tokens=8)
    model, data = tiny_finetuned
    assert "this model does not generate" in one_line_error(capsys, [
        "prune", "--model", model, "--dataset", data, "--target-speedup", "1.2", "--at-new-tokens", "4",
        "--output-dir", tmp_path / "x"])


@pytest.mark.parametrize("method", [*SCORED, "michel", "dsp"])
def test_a_parameter_target_on_a_model_pruned_before_counts_its_dead_heads_once(tiny_lm, tmp_path, method):
    from transformers import AutoTokenizer

    from headprune.pruning import save_pruned
    model, data = tiny_lm
    save_pruned(load_pruned(model), tmp_path / "once", [("decoder", 0, 0), ("decoder", 0, 1), ("decoder", 1, 0)],
                tokenizer=AutoTokenizer.from_pretrained(model))
    before = total_params(load_pruned(tmp_path / "once"))  # layer 2 holds a dead head already
    results = prune(lm_cfg(tmp_path / "once", data, tmp_path / "twice", method=method, k=None, michel_step=1,
                           target_params=before - 3072))  # room for one group fewer
    budget = results["budget"]
    # 2 groups fit; 1 where the method's two empty layer 1, whose dead head then costs too
    assert results["k"] in (1, 2) and budget["original"] == before
    assert budget["predicted"] == budget["measured"] == total_params(load_pruned(tmp_path / "twice" / "model"))
    assert budget["measured"] <= before - 3072


def test_a_sweep_refuses_a_size_that_a_model_pruned_before_cannot_fit_before_its_first_run(tiny_lm, tmp_path, capsys):
    """Its sizes are those of the pruned shapes (built on the meta device, as load_pruned builds them),
    not the original's that its config.json describes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from headprune.pruning import save_pruned, with_pruned_shapes
    model, data = tiny_lm
    save_pruned(load_pruned(model), tmp_path / "once", [("decoder", 0, 0), ("decoder", 1, 0), ("decoder", 2, 1)],
                tokenizer=AutoTokenizer.from_pretrained(model))
    loaded = load_pruned(tmp_path / "once")
    config = AutoConfig.from_pretrained(tmp_path / "once")
    with torch.device("meta"):
        skeleton = with_pruned_shapes(AutoModelForCausalLM.from_config(config), config.headprune, "once")
    assert total_params(skeleton) == total_params(loaded) < total_params(load_pruned(model))
    cfg = PruneConfig(task="causal-lm", k=None, target_params=total_params(loaded) - 3072)
    assert budget_units(cfg, skeleton, find_sites(skeleton)) == budget_units(cfg, loaded, find_sites(loaded)) >= 1
    line = one_line_error(capsys, ["sweep", "--task", "causal-lm", "--model", tmp_path / "once", "--dataset", data,
                                   "--methods", "random", "--target-params", "0.99", "100", "--max-length", "16",
                                   "--output-dir", tmp_path / "s"])
    assert "--target-params 100: the model without its attention heads already has" in line
    assert not (tmp_path / "s").exists()


# -- how a budget is shared between layers; budgets in a sweep --------------------------------------

def test_the_fit_spends_what_emptying_a_layer_saves_on_the_best_units_left_out(tiny_lm):
    from headprune.budget import fit
    sites = find_sites(load_pruned(tiny_lm[0]), "group")  # 3 layers x 2 groups
    # 10 ms besides attention; a layer's first group costs 3 ms, its second 1 ms: 22 ms whole
    table = {"whole": 0.022, "kinds": {"decoder": {"units": 2, "layers": [0, 1, 2], "per_layer": [0, 0.003, 0.004]}}}
    cfg = PruneConfig(task="causal-lm", target_speedup=22 / 18)  # at most 18 ms
    # the method kept one group a layer (19 ms): dropping the lowest (layer 2's) saves 3 ms, which
    # buys the second group of layers 0 and 1 (1 ms each): 4 groups in 18 ms, not 2 in 16
    mask, record = fit(cfg, None, sites, torch.tensor([1.0, 0, 1, 0, 1, 0]), torch.tensor([6.0, 5, 4, 3, 2, 1]), table)
    assert mask.tolist() == [1, 1, 1, 1, 0, 0] and record["units"] == 4
    assert record["predicted_seconds"] == pytest.approx(0.018)


def test_an_empty_layers_dead_head_becomes_its_best_group_at_no_cost_in_cache(tiny_lm):
    from headprune.budget import fit
    model = load_pruned(tiny_lm[0])
    sites = find_sites(model, "group")
    cfg = PruneConfig(task="causal-lm", target_kv_cache=0.5)  # 192 bytes a token: 3 key/value heads
    # the method kept layers 0 and 1 whole (4 groups + layer 2's dead head: 320 bytes); the fit drops
    # layer 1's lower group (256), skips its last one (its dead head would cost as much) and drops
    # layer 0's lower one (192); layer 2 holds a dead head anyway, so its best group takes its place free
    mask, record = fit(cfg, model, sites, torch.tensor([1.0, 1, 1, 1, 0, 0]), torch.tensor([6.0, 5, 4, 3, 2, 1]))
    assert mask.tolist() == [1, 0, 1, 0, 1, 0] and record["predicted"] == 192


def test_a_uniform_allocation_by_hand(tiny_lm):
    from headprune.budget import uniform_mask
    sites = find_sites(load_pruned(tiny_lm[0]), "group")  # 3 layers x 2 groups
    scores = torch.tensor([0.1, 0.9, 5.0, 4.0, -1.0, -2.0])
    assert uniform_mask(sites, scores, 4).tolist() == [1, 1, 1, 0, 1, 0]  # 2, 1, 1: the best of each layer
    assert uniform_mask(sites, scores, 3).tolist() == [0, 1, 1, 0, 1, 0]  # one each, not the top 3 overall
    assert uniform_mask(sites, scores, 6).tolist() == [1] * 6


def test_prune_with_a_uniform_allocation_keeps_as_many_heads_per_layer(tiny_lm, tmp_path):
    model, data = tiny_lm
    results = prune(lm_cfg(model, data, tmp_path, method="fisher", k=3, allocation="uniform"))
    assert sorted(layer for _, layer, _ in results["kept_heads"]) == [0, 1, 2]
    assert results["config"]["allocation"] == "uniform"


def test_a_sweep_over_kv_cache_targets(tiny_lm, tmp_path):
    from headprune.config import SweepConfig
    from headprune.sweeping import sweep
    model, data = tiny_lm
    rows = sweep(SweepConfig(task="causal-lm", model=str(model), dataset=str(data), max_length=16, batch_size=8,
                             eval_batch_size=8, checkpoint_every=0, methods=["fisher", "random"], seeds=[0],
                             target_kv_cache=[0.5, 0.67], output_dir=str(tmp_path)))
    assert sorted(r["run"] for r in rows if "+" not in r["method"]) == [  # and a row with the default's bias each
        "fisher-pipelined-kv0.5-s0", "fisher-pipelined-kv0.67-s0", "random-pipelined-kv0.5-s0", "random-pipelined-kv0.67-s0"]
    assert len(rows) == 8
    for row in rows:  # 6 groups of 64 bytes a token: 3 fit in half, 4 in 0.67 (257.3 bytes)
        assert row["measured"] == row["predicted"] <= 64 * row["k"] + 64
        assert row["k"] <= (3 if row["budget_value"] == 0.5 else 4)
    summary = (tmp_path / "summary.md").read_text()
    assert "| 0.5 of the KV cache | 0.67 of the KV cache |" in summary and "[k " in summary
    assert "budget | predicted | measured" in (tmp_path / "sweep.md").read_text()
    assert "--target-kv-cache 0.5 0.67" in (tmp_path / "report.md").read_text()


def test_dsp_with_a_uniform_allocation_learns_with_the_per_layer_budget_it_keeps(tiny_lm, tmp_path):
    from headprune.gates import attach_gates
    from headprune.selection import budget_of, selector_and_optimizer
    model, data = tiny_lm
    cfg = lm_cfg(model, data, tmp_path, method="dsp", k=4, allocation="uniform")
    gates = attach_gates(load_pruned(model), "group")  # 3 layers x 2 groups: 2, 1, 1 kept
    budget = budget_of(cfg, gates)
    assert budget == [([0, 1], 2), ([2, 3], 1), ([4, 5], 1)]
    selector = selector_and_optimizer(cfg, gates.num_heads, steps=10, budget=budget)[0].train()
    mask = selector().detach()  # a training mask: soft, but each layer's share exactly its budget
    assert [round(float(mask[i:i + 2].sum()), 6) for i in (0, 2, 4)] == [2, 1, 1]
    assert 0 < float(mask[2:].max()) < 1
    results = prune(cfg)
    assert sorted(layer for _, layer, _ in results["kept_heads"]) == [0, 0, 1, 2]
    global_cfg = lm_cfg(model, data, tmp_path / "global", method="dsp", k=4)
    assert budget_of(global_cfg, gates) is None  # one budget over every layer
    targeted = lm_cfg(model, data, tmp_path / "t", method="dsp", k=None, target_kv_cache=0.5, allocation="uniform")
    assert budget_of(targeted, gates) is None  # a target's count is known only after training


def test_the_default_allocation_spreads_dsp_on_text_classifiers_where_each_layer_keeps_three(tiny_finetuned, tmp_path):
    from headprune.budget import uniform_allocation
    from headprune.config import allocation_in_effect, roomy_uniform
    from headprune.gates import attach_gates
    from headprune.pruning import load_pruned
    from headprune.train import changed_settings
    default = {"allocation": "default", "task": "classification", "method": "dsp", "mode": "pipelined", "k": 24,
               "uniform_from": 3}
    assert allocation_in_effect(default) == roomy_uniform(3) == "uniform where every layer keeps 3 or more"
    assert allocation_in_effect({**default, "allocation": "global"}) == "global"  # as asked
    for other in ({"task": "causal-lm"}, {"task": "translation"}, {"task": "image-classification"},
                  {"method": "michel"}, {"method": "ste"}, {"mode": "joint"}, {"target_speedup": 1.3}):
        assert allocation_in_effect({**default, **other}) == "global", other
    assert allocation_in_effect({"method": "dsp"}) == "global"  # recorded before `default` existed
    saved = {k: v for k, v in default.items() if k != "uniform_from"}  # the eighteenth session's rule
    assert allocation_in_effect(saved) == roomy_uniform(2)
    now = PruneConfig(model="m", dataset="d", output_dir=str(tmp_path), k=24)
    assert changed_settings({**vars(now), "uniform_from": 3}, now) == {}
    old = {k: v for k, v in vars(now).items() if k != "uniform_from"}  # other settings: a sweep asks for --overwrite
    assert changed_settings(old, now) == {"allocation (in effect)": (roomy_uniform(2), roomy_uniform(3))}
    sites = attach_gates(load_pruned(tiny_finetuned[0])).sites  # 2 layers x 4 heads
    for k, spread in ((6, True), (7, True), (5, False), (4, False), (2, False)):  # 3 + 3, 4 + 3: spread; 3 + 2: not
        assert uniform_allocation(PruneConfig(k=k), sites) is spread, k
        assert uniform_allocation(PruneConfig(k=k, uniform_from=2), sites) is (k >= 4), k
        assert uniform_allocation(PruneConfig(k=k, allocation="uniform"), sites)  # asked: always
        assert not uniform_allocation(PruneConfig(k=k, method="michel"), sites)


def test_a_speed_target_is_timed_at_most_at_the_models_positions(tiny_finetuned, tmp_path, monkeypatch):
    """--max-length 128 on a model of 64 positions: timed at 64 (at 128 the forward pass failed);
    an --at-length past them is refused."""
    import headprune.measuring as measure
    lengths = []

    def clock(models, run, *a):
        return {name: {"median": 0.008 + 0.001 * sum(s.num_heads for s in find_sites(m))} for name, m in models.items()}
    real_time = measure.time_forward_or_generation
    monkeypatch.setattr(measure, "time_forward_or_generation",
                        lambda models, batch, length, *a: lengths.append(length) or real_time(models, batch, length, *a))
    monkeypatch.setattr(measure, "alternate", clock)
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    results = prune(tiny(*tiny_finetuned, tmp_path / "run", k=None, target_speedup=1.5, at_batch_size=4,
                         max_length=128))
    assert results["k"] == 2 and set(lengths) == {64}
    with pytest.raises(ConfigError, match="--at-length 100: longer than the model's 64 positions"):
        prune(tiny(*tiny_finetuned, tmp_path / "other", k=None, target_speedup=1.5, at_length=100))


def test_a_resumed_speed_target_run_keeps_the_budget_it_started_with(tiny_finetuned, tmp_path, monkeypatch, caplog):
    """The latency table measured again (cache gone, another machine) may give another k: the
    checkpoint's scores learned for the first, so the run goes on with it."""

    import headprune.measuring as measure
    import headprune.train as train_mod

    def clock(base):  # `base` ms plus 1 ms a kept head
        return lambda models, run, *a: {name: {"median": base + 0.001 * sum(s.num_heads for s in find_sites(m))}
                                        for name, m in models.items()}

    def run(out, **kw):
        return prune(tiny(*tiny_finetuned, out, k=None, target_speedup=1.3, at_batch_size=4, at_length=16,
                          checkpoint_every=2, **kw))
    monkeypatch.setattr(measure, "alternate", clock(0.008))  # whole 16 ms: 1.3x keeps 4 heads
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache-a"))
    whole = run(tmp_path / "whole")
    assert whole["config"]["k"] == 4

    class Killed(BaseException):
        pass

    real_save = train_mod.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Killed
    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run(tmp_path / "killed")
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    monkeypatch.setattr(measure, "alternate", clock(0.010))  # whole 18 ms: 1.3x would keep 3
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache-b"))
    resumed = run(tmp_path / "killed")
    assert "resuming with the budget this run started with, 4, not the 3 that the target gives now" in caplog.text
    assert resumed["config"]["k"] == 4 and resumed["resumed_from_step"] == 2
    scores = [[h["logit"] for h in json.loads((tmp_path / out / "head_scores.json").read_text())]
              for out in ("whole", "killed")]
    assert scores[1] == pytest.approx(scores[0], abs=1e-9)


def test_a_killed_run_with_a_size_budget_resumes(tiny_lm, tmp_path):
    """Its k follows from the budget: the command's placeholder k is not a change of settings."""
    import os
    import subprocess
    import sys
    model, data = tiny_lm

    def cli(out, env=None):
        return subprocess.run([sys.executable, "-m", "headprune.cli", "prune", "--task", "causal-lm", "--model", str(model),
                               "--dataset", str(data), "--max-length", "16", "--batch-size", "8", "--epochs", "2",
                               "--checkpoint-every", "1", "--target-kv-cache", "0.5", "--output-dir", str(out)],
                              capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    assert cli(tmp_path / "whole").returncode == 0
    killed = cli(tmp_path / "killed", env={"HEADPRUNE_KILL_AT_STEP": "3"})
    assert killed.returncode == -9 and (tmp_path / "killed" / "checkpoint").is_dir()
    resumed = cli(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 3 of" in resumed.stderr
    a, b = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("whole", "killed"))
    assert b["kept_heads"] == a["kept_heads"] and b["resumed_from_step"] == 3


def test_a_size_budget_nothing_meets_is_refused_before_training(tiny_lm, tmp_path, monkeypatch):
    """Every layer left empty keeps a dead head: below one unit and the dead heads, no model fits."""
    import headprune.recipes as recipes
    monkeypatch.setattr(recipes, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    model, data = tiny_lm
    with pytest.raises(ConfigError, match=r"cannot be met: the cheapest model, one unit kept, costs"):
        prune(lm_cfg(model, data, tmp_path / "run", k=None, target_kv_cache=0.3))  # 6 groups: 2 of them is 0.33
    assert not (tmp_path / "run" / "checkpoint").exists()


def _families():
    from conftest import tiny_model
    from test_image_classification import tiny_swin
    from test_llm_heads import tiny_llm
    from test_seq2seq_heads import tiny_seq2seq
    return {"deberta": lambda: (tiny_model("deberta"), "group"),  # q and v biases apart from the fused projection
            "deberta-v2": lambda: (tiny_model("deberta-v2"), "group"),  # position projections of each head's own
            "swin": lambda: (tiny_swin(), "group"),  # a bias table with a column per head
            "cohere": lambda: (tiny_llm("cohere"), "group"),  # a query and a key norm per head
            "gpt_oss": lambda: (tiny_llm("gpt_oss"), "group"),  # an attention sink per head
            "llama-query": lambda: (tiny_llm("llama"), "query"),
            "t5": lambda: (tiny_seq2seq("t5"), "group"),
            "marian": lambda: (tiny_seq2seq("marian"), "group")}


@pytest.mark.parametrize("family", list(_families()))
def test_the_cost_model_counts_what_removal_removes(family):
    # one unit of the first site gone and the last site emptied (a decoder's: its dead head stays):
    # the parameters the cost model predicts are those of the model the heads are removed from
    from headprune.budget import fixed_params
    from headprune.pruning import remove_heads
    model, unit = _families()[family]()
    sites = find_sites(model, unit)
    costs = site_costs(sites)
    mask = torch.ones(sum(s.num_heads for s in sites))
    mask[0] = 0
    mask[-sites[-1].num_heads:] = 0
    heads = [(s.kind, s.layer, u) for s in sites for u in range(s.num_heads)]
    predicted = cost_of(costs, mask, fixed_params(model, costs))["parameters"]
    remove_heads(model, [h for h, m in zip(heads, mask.tolist()) if m], unit)
    assert predicted == total_params(model)


def test_a_fraction_is_of_the_model_as_given_in_whole_bytes(tiny_lm):
    from headprune.budget import SiteCost, target_of
    # 0.7 of 46,080 bytes (SmolLM2's 90 KV groups' cache) is 32,256, though 0.7 * 46080 is 32255.99...
    smollm2 = [SiteCost("decoder", 3, 0, 512, 0, 512)] * 30
    assert target_of(PruneConfig(task="causal-lm", target_kv_cache=0.7), None, smollm2) == ("kv_cache_bytes_per_token", 32256)
    # a model pruned before: layer 2 emptied keeps a dead head (64 bytes), and the fraction is of all 320
    from headprune.pruning import remove_heads
    model = remove_heads(load_pruned(tiny_lm[0]), [("decoder", 0, 0), ("decoder", 0, 1), ("decoder", 1, 0),
                                                   ("decoder", 1, 1)])
    assert kv_cache_bytes_per_token(model) == 320
    cfg = PruneConfig(task="causal-lm", target_kv_cache=0.8)
    assert target_of(cfg, model, site_costs(find_sites(model, "group")))[1] == 256
    assert budget_units(cfg, model, find_sites(model, "group")) == 3  # three groups and the dead head: 256 bytes


@pytest.mark.parametrize("pruned_seconds,scale", [(0.5, 1.5), (0.999, 0.5)])
def test_a_wild_half_model_check_scales_the_latency_table_by_at_most_half_or_one_and_a_half(pruned_seconds, scale):
    """latency._check: a half model that saves far more (or less) than the layers' sum says is not
    trusted: the table's costs are scaled by 1.5 (0.5) at most, never by the raw ratio."""
    from headprune.latency import _check
    model = tiny_model("bert")
    sites = find_sites(model, "group")  # 2 layers of 4 heads
    per_layer = [0.0, 0.01, 0.02, 0.03, 0.04]
    table = {"whole": 1.0, "kinds": {"encoder": {"units": 4, "layers": [0, 1], "per_layer": list(per_layer)}}}

    def timed(pair):
        assert set(pair) == {"whole", "pruned"}
        return {"whole": {"median": 1.0}, "pruned": {"median": pruned_seconds}}
    check = _check(table, model, sites, "group", timed)
    # half the units (2 a layer): the sum predicts 2 * (0.04 - 0.02) = 0.04 s saved
    assert check["saved_predicted"] == pytest.approx(0.04)
    assert check["saved_measured"] == pytest.approx(1.0 - pruned_seconds)
    assert check["scale"] == pytest.approx(scale)
    assert table["kinds"]["encoder"]["per_layer"] == pytest.approx([a * scale for a in per_layer])


COUNTS = {"encoder": 8, "decoder": 8, "cross": 8}


@pytest.mark.parametrize("k_per_kind, message", [
    ([9, 3, 3], "--k-per-kind: 9 encoder heads is more than the model's 8"),
    ([2, 3, 9], "--k-per-kind: 9 cross heads is more than the model's 8"),
    ([2, 3], r"--k-per-kind needs 3 number\(s\) for this model, one per kind \(encoder: 8 heads"),
    ([2, 3, 3, 1], r"--k-per-kind needs 3 number\(s\)"),  # too many: not the first three silently
    ([0, 0, 0], "--k-per-kind keeps no head at all"),
])
def test_a_budget_per_kind_the_model_cannot_hold_is_refused(k_per_kind, message):
    with pytest.raises(ConfigError, match=message):
        check_budget(SimpleNamespace(k_per_kind=k_per_kind, k=None), COUNTS, threshold=False)


def test_a_budget_per_kind_of_every_head_is_accepted():
    check_budget(SimpleNamespace(k_per_kind=[8, 8, 8], k=None), COUNTS, threshold=False)
    check_budget(SimpleNamespace(k_per_kind=None, k=24), COUNTS, threshold=False)
    with pytest.raises(ConfigError, match="k=25 is more than the 24 heads of this model$"):
        check_budget(SimpleNamespace(k_per_kind=None, k=25), COUNTS, threshold=False)


def test_the_latency_tables_pruned_copies_share_the_weights_they_keep_whole(tiny_lm):
    """A setting's pruned model is not a second model: every weight it does not slice is the whole
    model's own tensor, and the whole model stays as it was."""
    from headprune.latency import pruned_copy
    model = load_pruned(tiny_lm[0])
    before = {name: p.clone() for name, p in model.state_dict().items()}
    copy = pruned_copy(model, [("decoder", layer, 0) for layer in range(3)], "group")
    whole = dict(model.named_parameters())
    shared = {name for name, p in copy.named_parameters() if p.data_ptr() == whole[name].data_ptr()}
    sliced = {name for name, _ in copy.named_parameters() if "self_attn" in name}
    assert shared == {name for name, _ in copy.named_parameters()} - sliced and sliced
    assert sum(s.num_heads for s in find_sites(copy)) == 3 and sum(s.num_heads for s in find_sites(model)) == 6
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
