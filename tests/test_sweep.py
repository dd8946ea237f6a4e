"""The sweep: every combination once, finished runs skipped, one table and one plot."""
import csv
import dataclasses
import json
from pathlib import Path

import pytest

import headprune.sweeping as sweep_mod
from headprune.errors import ConfigError, ModelError
from headprune.sweeping import SweepConfig, planned_runs, runs_outside_the_plan, sweep, write_outputs


def sweep_cfg(model, data, out, **kw):
    return SweepConfig(**{**dict(model=str(model), pretrained_model=str(model), dataset=str(data),
                                 methods=["dsp", "michel", "random"], ks=[2, 4], seeds=[0, 1],
                                 michel_step=2, epochs=1, batch_size=16, t0=1.0, tf=1e-4, reconstruct="none",
                                 output_dir=str(out)), **kw})  # a row per run (DSP's default bias gives two)


def test_plan_covers_the_grid_once():
    cfg = SweepConfig(methods=["dsp", "voita", "michel", "random"], modes=["pipelined", "joint"],
                      ks=[6, 12], seeds=[0, 1, 2])
    names = [run.output_dir.split("/")[-1] for run in planned_runs(cfg)]
    assert len(names) == len(set(names))
    assert sum(n.startswith("dsp-") for n in names) == 2 * 2 * 3  # modes x ks x seeds
    assert [n for n in names if n.startswith("michel")] == ["michel-pipelined-s0"]  # deterministic
    assert not any(n.startswith(("random-joint", "michel-joint")) for n in names)  # nothing to train
    joint = [r for r in planned_runs(cfg) if r.mode == "joint"]
    assert {r.model for r in joint} == {"offline:minilm-l6"}


def test_sweep_writes_table_and_plot_and_skips_finished_runs(tiny_finetuned, tmp_path, monkeypatch):
    model, data = tiny_finetuned
    rows = sweep(sweep_cfg(model, data, tmp_path))
    # dsp and random: 2 ks x 2 seeds each; michel: one run, one row per k on its curve
    assert len(rows) == 4 + 4 + 2
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    splits = [c for c in table[0] if c not in {"method", "mode", "k", "seed", "passes", "seconds", "run"}]
    assert len(table) == 10 and splits == ["heldout"]  # a column per evaluation split
    # compute: one epoch for DSP, nothing for random heads, one pass per importance estimate for
    # Michel (8 heads, 2 a round: 2 estimates to reach 4 heads, 3 to reach 2)
    passes = {(r["method"], r["k"]): r["passes"] for r in table}  # whole numbers written as such
    assert passes[("dsp", "2")] == "1" and passes[("random", "4")] == "0"
    assert passes[("michel", "4")] == "2" and passes[("michel", "2")] == "3"
    assert {r["run"] for r in table if r["method"] == "michel"} == {"michel-pipelined-s0"}
    for name in ("sweep.md", "summary.md", "report.md"):
        assert (tmp_path / name).read_text().strip()
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "summary.md").read_text()
    assert "## heldout" in summary and "| dsp | pipelined | 2 |" in summary
    assert "| 3 to k=2, 2 to k=4 |" in summary

    calls = []
    real_prune = sweep_mod.prune
    monkeypatch.setattr(sweep_mod, "prune", lambda run, **kw: calls.append(run.output_dir) or real_prune(run, **kw))
    assert sweep(sweep_cfg(model, data, tmp_path)) == rows  # all done: nothing runs again
    assert calls == []
    (tmp_path / "dsp-pipelined-k4-s1" / "results.json").unlink()
    sweep(sweep_cfg(model, data, tmp_path))
    assert calls == [str(tmp_path / "dsp-pipelined-k4-s1")]



def test_finished_runs_of_the_same_settings_join_the_tables_and_others_are_named(tiny_finetuned, tmp_path, caplog):
    model, data = tiny_finetuned

    def table_ks():
        with open(tmp_path / "sweep.csv") as f:
            return sorted(r["k"] for r in csv.DictReader(f))

    sweep(sweep_cfg(model, data, tmp_path, methods=["random"], ks=[2, 4], seeds=[0]))
    with caplog.at_level("INFO"):
        sweep(sweep_cfg(model, data, tmp_path, methods=["random"], ks=[2], seeds=[0]))
    assert "1 finished run(s) of" in caplog.text and "join the tables (e.g. random-pipelined-k4-s0)" in caplog.text
    assert table_ks() == ["2", "4"]  # a sweep of part of the grid keeps the rest in its tables
    caplog.clear()
    with caplog.at_level("WARNING"):  # other settings: its own run only, and the others named
        sweep(sweep_cfg(model, data, tmp_path, methods=["random"], ks=[3], seeds=[0], max_length=16))
    assert "holds 2 finished run(s) made with other settings or inputs (e.g. random-pipelined-k2-s0)" in caplog.text
    assert table_ks() == ["3"]
    assert (tmp_path / "random-pipelined-k4-s0" / "results.json").is_file()  # left out, not lost
    sweep(sweep_cfg(model, data, tmp_path, methods=["random"], ks=[2], seeds=[0]))
    assert table_ks() == ["2", "4"]


def test_a_missing_model_stops_the_sweep_before_any_run(tiny_finetuned, tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_mod, "prune", lambda *a, **k: pytest.fail("a run started"))
    cfg = sweep_cfg(*tiny_finetuned, tmp_path, modes=["pipelined", "joint"], pretrained_model=str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="no such model folder"):
        sweep(cfg)


def test_a_sweep_into_a_folder_of_other_settings_refuses_or_redoes_them(tiny_finetuned, tmp_path, monkeypatch):
    model, data = tiny_finetuned
    small = dict(methods=["dsp", "random"], ks=[2], seeds=[0])
    sweep(sweep_cfg(model, data, tmp_path, **small))
    with pytest.raises(sweep_mod.OutputExistsError, match="2 run\\(s\\), finished or stopped, made with other settings .*max_length: 128 -> 16.*--overwrite"):
        sweep(sweep_cfg(model, data, tmp_path, max_length=16, **small))
    calls = []
    real_prune = sweep_mod.prune
    monkeypatch.setattr(sweep_mod, "prune", lambda run, **kw: calls.append(run.output_dir) or real_prune(run, **kw))
    rows = sweep(sweep_cfg(model, data, tmp_path, max_length=16, overwrite=True, **small))
    assert len(calls) == 2 and len(rows) == 2
    import json
    assert all(json.loads((tmp_path / r["run"] / "results.json").read_text())["config"]["max_length"] == 16 for r in rows)


def recorded(config: dict) -> dict:
    """A finished run's results.json with these settings (the rest as a sweep reads it)."""
    return {"config": config, "method": config["method"], "mode": config["mode"], "seed": config["seed"],
            "k": config["k"], "num_heads": 72, "seconds": {}, "metrics_pruned": {"test": 0.5}, "metric": "accuracy"}


def test_runs_recorded_before_an_option_existed_count_it_as_its_default(tmp_path):
    import json
    from headprune.config import PruneConfig
    run = PruneConfig(output_dir=str(tmp_path / "r"), k=6)
    saved = {k: v for k, v in dataclasses.asdict(run).items() if k not in ("task", "k_per_kind")}  # an older run
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text(json.dumps(recorded(saved)))
    assert sweep_mod.stale_runs([run]) == {}
    saved["k"] = 12
    (tmp_path / "r" / "results.json").write_text(json.dumps(recorded(saved)))
    assert sweep_mod.stale_runs([run]) == {"r": "k: 12 -> 6"}


def test_joint_runs_recorded_before_the_settle_existed_are_stale(tmp_path):
    """They never settled; an unset --settle-fraction now settles joint runs (2/3), not pipelined ones."""
    import json
    from headprune.config import PruneConfig
    for mode, expected in (("joint", {"r": "settle_fraction (in effect): 0.0 -> 0.6667"}), ("pipelined", {})):
        run = PruneConfig(output_dir=str(tmp_path / "r"), mode=mode, k=6)
        saved = {k: v for k, v in dataclasses.asdict(run).items() if k != "settle_fraction"}
        (tmp_path / "r").mkdir(exist_ok=True)
        (tmp_path / "r" / "results.json").write_text(json.dumps(recorded(saved)))
        assert sweep_mod.stale_runs([run]) == expected
    # made since: the same settle, given or not
    saved["mode"], saved["settle_fraction"] = "joint", 0.6667
    (tmp_path / "r" / "results.json").write_text(json.dumps(recorded(saved)))
    assert sweep_mod.stale_runs([PruneConfig(output_dir=str(tmp_path / "r"), mode="joint", k=6)]) == {}


def test_a_sweeps_settle_fraction_goes_to_its_joint_runs_only(tmp_path):
    from headprune.config import SweepConfig
    cfg = SweepConfig(methods=["dsp"], modes=["pipelined", "joint"], ks=[6], seeds=[0], settle_fraction=0.5,
                      output_dir=str(tmp_path))
    assert {run.mode: run.settle_fraction for run in sweep_mod.planned_runs(cfg)} == {"pipelined": None, "joint": 0.5}
    with pytest.raises(ConfigError, match="--settle-fraction is for joint runs"):
        SweepConfig(modes=["pipelined"], settle_fraction=0.5)


def test_joint_dsp_runs_recorded_before_the_shrink_existed_are_stale(tmp_path):
    """Their budget was k from the first step; an unset --shrink-fraction now shrinks joint dsp's only."""
    import json
    from headprune.config import PruneConfig
    (tmp_path / "r").mkdir()
    for method, mode, expected in (("dsp", "joint", {"r": "shrink_fraction (in effect): 0.0 -> 1.0"}),
                                   ("ste", "joint", {}), ("dsp", "pipelined", {})):
        run = PruneConfig(output_dir=str(tmp_path / "r"), method=method, mode=mode, k=6)
        saved = {k: v for k, v in dataclasses.asdict(run).items() if k not in ("shrink_fraction", "settle_fraction")}
        saved["settle_fraction"] = 0.6667 if mode == "joint" else None  # made after the settle
        (tmp_path / "r" / "results.json").write_text(json.dumps(recorded(saved)))
        assert sweep_mod.stale_runs([run]) == expected
    saved["mode"], saved["method"], saved["shrink_fraction"] = "joint", "dsp", 1.0  # made since: the same
    (tmp_path / "r" / "results.json").write_text(json.dumps(recorded(saved)))
    assert sweep_mod.stale_runs([PruneConfig(output_dir=str(tmp_path / "r"), mode="joint", k=6)]) == {}


def test_a_sweeps_shrink_fraction_goes_to_its_dsp_and_ste_runs_only(tmp_path):
    from headprune.config import SweepConfig
    cfg = SweepConfig(methods=["dsp", "ste", "voita", "michel", "random"], ks=[6], seeds=[0], shrink_fraction=0.25,
                      output_dir=str(tmp_path))
    assert {run.method: run.shrink_fraction for run in sweep_mod.planned_runs(cfg)} == \
        {"dsp": 0.25, "ste": 0.25, "voita": None, "michel": None, "random": None}
    with pytest.raises(ConfigError, match="--shrink-fraction is for dsp and ste"):
        SweepConfig(methods=["voita", "michel"], shrink_fraction=0.5)


def test_a_summary_cell_is_the_mean_its_standard_error_and_the_range():
    # mean 0.7; sample standard deviation 0.1; standard error 0.1 / sqrt(3) = 0.0577
    assert sweep_mod.mean_cell([0.6, 0.7, 0.8]) == "0.700 ± 0.058 (0.600-0.800)"
    assert sweep_mod.mean_cell([0.5]) == "0.500"


def test_a_run_with_reconstruction_gives_a_row_without_it_and_one_with_it(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned
    rows = sweep(sweep_cfg(model, data, tmp_path, methods=["flap", "michel", "dsp"], ks=[2, 4], seeds=[0],
                           reconstruct="bias"))
    got = {(r["method"], r["k"]): r for r in rows}
    dsp = "dsp (mean ablation)"  # a trained method saving the bias learns with it by default
    assert set(got) == {("flap", 2), ("flap + bias", 2), ("flap", 4), ("flap + bias", 4),
                        ("michel", 2), ("michel", 4), ("michel + bias", 2),  # michel: its final k only
                        (dsp, 2), (dsp + " + bias", 2), (dsp, 4), (dsp + " + bias", 4)}
    assert got[(dsp, 2)]["passes"] == 1 + 1 and got[(dsp + " + bias", 2)]["passes"] == 2  # the means (reused by the bias), the epoch
    import json
    results = json.loads((tmp_path / "flap-pipelined-k2-s0" / "results.json").read_text())
    assert got[("flap", 2)]["heldout"] == results["metrics_before_reconstruction"]["heldout"]
    assert got[("flap + bias", 2)]["heldout"] == results["metrics_pruned"]["heldout"]
    assert got[("flap", 2)]["passes"] == 1 and got[("flap + bias", 2)]["passes"] == 1  # the bias reuses the scores' means
    assert got[("michel + bias", 2)]["passes"] == 3 + 1
    assert got[("flap", 2)]["seconds"] <= got[("flap + bias", 2)]["seconds"]
    assert "| flap + bias | pipelined | 1 |" in (tmp_path / "summary.md").read_text()


def test_a_finished_runs_models_are_freed_before_the_next_run_loads(tiny_finetuned, tmp_path, monkeypatch):
    """The gates' hooks hold a run's model in reference cycles: the sweep collects them after each run
    (on a GPU its memory is the next run's), not whenever Python's cycle collector gets to them."""
    import gc

    from transformers import PreTrainedModel
    model, data = tiny_finetuned

    def models():
        return {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel)}
    before, live = models(), []
    real_prune = sweep_mod.prune
    monkeypatch.setattr(sweep_mod, "prune", lambda run, **kw: live.append(len(models() - before)) or real_prune(run, **kw))
    gc.disable()  # no collection but the sweep's own
    try:
        sweep(sweep_cfg(model, data, tmp_path, methods=["dsp", "random"], ks=[2], seeds=[0]))
    finally:
        gc.enable()
    assert live == [0, 0]


def test_a_stopped_run_of_another_process_count_is_named_before_the_first_run(tmp_path):
    """Its run would refuse the checkpoint (2 processes saw other examples a step), after the runs
    before it; and --overwrite would not have reached it, since the sweep passes it to stale runs only."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from headprune.checkpoint import write_checkpoint
    from headprune.sweeping import stale_runs
    runs = planned_runs(SweepConfig(methods=["dsp"], ks=[6], seeds=[0], output_dir=str(tmp_path)))
    folder = tmp_path / "dsp-pipelined-k6-s0"
    folder.mkdir()
    write_checkpoint(folder, {"step": 3, "config": asdict(runs[0]), "processes": 2, "model": {}})
    one = SimpleNamespace(is_main_process=True, num_processes=1, wait_for_everyone=lambda: None)
    assert stale_runs(runs, one) == {folder.name: "processes: 2 -> 1"}
    assert stale_runs(runs, SimpleNamespace(is_main_process=True, num_processes=2, wait_for_everyone=lambda: None)) == {}


def test_two_processes_sweep_as_one_and_write_the_tables_once(tiny_finetuned, tmp_path):
    """torchrun with 2 CPU processes (gloo), half the batch each: the runs are those of one process
    with the whole batch (DSP, activation and random do not depend on the per-process batch; DSP
    takes as many steps: the processes share each batch, not each a run of its own), and its lines
    are printed once."""
    import json
    import os
    import subprocess
    import sys
    model, data = tiny_finetuned

    def run(out, batch, *launcher):
        args = ["sweep", "--model", model, "--dataset", data, "--methods", "dsp", "activation", "random", "--ks", 2,
                "--seeds", 0, "--batch-size", batch, "--epochs", 1, "--checkpoint-every", 0, "--output-dir", out]
        done = subprocess.run([sys.executable, *launcher, "-m", "headprune.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        return done
    two = run(tmp_path / "two", 8, "-m", "torch.distributed.run", "--nproc_per_node", "2")
    run(tmp_path / "one", 16)
    assert two.stderr.count("[2/3] running activation-pipelined-k2-s0") == 1
    for name in ("dsp-pipelined-k2-s0", "activation-pipelined-k2-s0", "random-pipelined-k2-s0"):
        results = [json.loads((tmp_path / n / name / "results.json").read_text()) for n in ("one", "two")]
        assert results[0]["kept_heads"] == results[1]["kept_heads"] and results[0].get("steps") == results[1].get("steps")
    assert (tmp_path / "two" / "sweep.csv").read_text().count("\n") == 5  # a header and a row a run (DSP: two)


def _results(run) -> dict:
    config = dataclasses.asdict(run)
    return {"config": config, "method": config["method"], "mode": config["mode"], "seed": config["seed"],
            "k": config["k"], "num_heads": 8, "seconds": {}, "metrics_pruned": {"test": 0.5}, "metric": "accuracy"}


def test_a_finished_run_joins_the_tables_only_in_the_folder_the_sweep_would_give_it(tmp_path):
    """A run of the same settings copied to another folder name (a backup, a rename) is not this sweep's
    run: it must not join the tables (it would add a second row for the same method, k and seed)."""
    cfg = SweepConfig(methods=["random"], ks=[2], seeds=[0], output_dir=str(tmp_path))
    run = planned_runs(cfg)[0]
    for name in ("random-pipelined-k2-s0", "backup-of-random"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(run)))
    joining, others = runs_outside_the_plan(cfg, planned=set())
    assert [name for name, _ in joining] == ["random-pipelined-k2-s0"]
    assert others == ["backup-of-random"]


def test_every_split_gets_a_summary_and_the_last_split_is_reported_by_default(tmp_path):
    """summary.md and report.md hold a table per evaluation split, and without --split the tables report
    the last split (the test split after the validation split used for choosing settings)."""
    cfg = SweepConfig(methods=["random"], ks=[2], seeds=[0, 1], output_dir=str(tmp_path))
    rows = [{"method": "random", "mode": "pipelined", "seed": seed, "seconds": 1.0, "run": f"r{seed}", "k": 2,
             "passes": 0, "budget": "k=2", "budget_value": 2, "validation": 0.6 + seed / 10, "test": 0.5}
            for seed in (0, 1)]
    results = {"metrics_pruned": {"validation": 0.7, "test": 0.5}, "num_heads": 8, "metric": "accuracy"}
    write_outputs(cfg, tmp_path, rows, results, {"validation": 0.9, "test": 0.8})
    summary = (tmp_path / "summary.md").read_text()
    assert "## validation" in summary and "## test" in summary
    assert "0.650 ± 0.050" in summary  # the validation split's own numbers
    report = (tmp_path / "report.md").read_text()
    assert "### test (reported)" in report and "### validation\n" in report


def test_a_joint_runs_unpruned_metric_is_not_handed_to_the_pipelined_runs(tiny_finetuned, tmp_path, monkeypatch):
    """A joint run's unpruned metric is that of its own trained weights: the pipelined runs after it
    measure the fine-tuned model's (or take another pipelined run's), never the joint run's."""
    model, data = tiny_finetuned
    handed = {}
    real_prune = sweep_mod.prune

    def prune(run, **kw):
        handed[run.mode] = kw.get("metrics_unpruned")
        return real_prune(run, **kw)
    monkeypatch.setattr(sweep_mod, "prune", prune)
    sweep(SweepConfig(model=str(model), pretrained_model=str(model), dataset=str(data), methods=["dsp"],
                      modes=["joint", "pipelined"], ks=[2], seeds=[0], epochs=1, batch_size=16,
                      reconstruct="none", output_dir=str(tmp_path)))
    assert list(handed) == ["joint", "pipelined"]  # the joint run first
    assert handed["pipelined"] is None


def test_runs_done_before_on_other_data_are_named_before_the_first_run_and_made_again(tiny_finetuned, tmp_path,
                                                                                      monkeypatch):
    """A sweep started again after its data changed: the finished run's recorded data digests are
    not the data's now, so it is refused before any run, or made again with --overwrite (and the
    whole model's metric handed on is the new data's)."""
    import shutil
    from headprune.errors import OutputExistsError
    model, data = tiny_finetuned
    shutil.copy(data, tmp_path / "data.jsonl")
    data = tmp_path / "data.jsonl"
    cfg = dict(out=tmp_path / "sweep", methods=["random"], seeds=[0])
    sweep(sweep_cfg(model, data, **cfg, ks=[3]))
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[::-1]))  # the same examples in another order: other data digests
    made, real_prune = [], sweep_mod.prune
    monkeypatch.setattr(sweep_mod, "prune", lambda run, **kw: made.append(Path(run.output_dir).name)
                        or real_prune(run, **kw))
    with pytest.raises(OutputExistsError, match=r"random-pipelined-k3-s0: the training data: '\w+' -> '\w+', the "
                       r"evaluation data: "):
        sweep(sweep_cfg(model, data, **cfg, ks=[3, 5]))
    assert made == []
    rows = sweep(sweep_cfg(model, data, **cfg, ks=[3, 5], overwrite=True))
    assert made == ["random-pipelined-k3-s0", "random-pipelined-k5-s0"] and len(rows) == 2
    results = json.loads((tmp_path / "sweep" / "random-pipelined-k5-s0" / "results.json").read_text())
    assert results["inputs"]["training data"] == json.loads(
        (tmp_path / "sweep" / "random-pipelined-k3-s0" / "results.json").read_text())["inputs"]["training data"]
    made.clear()
    assert len(sweep(sweep_cfg(model, data, **cfg, ks=[3, 5]))) == 2 and made == []  # all alike now: done


def test_a_stopped_run_of_other_model_files_is_made_again_with_overwrite(tiny_finetuned, tmp_path, monkeypatch):
    """Its checkpoint would be refused when its turn came (another config.json beside the same
    weights); the sweep names it first, and --overwrite makes it again."""
    import shutil
    import headprune.train as train_mod
    from headprune.errors import OutputExistsError
    model = tmp_path / "model"
    shutil.copytree(tiny_finetuned[0], model)
    monkeypatch.setenv(train_mod.KILL_AT_STEP, "2")
    monkeypatch.setattr(train_mod.os, "kill", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    cfg = dict(methods=["dsp"], ks=[3], seeds=[0], checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        sweep(sweep_cfg(model, tiny_finetuned[1], tmp_path / "sweep", **cfg))
    monkeypatch.delenv(train_mod.KILL_AT_STEP)
    settings = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**settings, "hidden_act": "relu"}))
    with pytest.raises(OutputExistsError, match=r"dsp-pipelined-k3-s0: the model's files \(config, tokenizer\)"):
        sweep(sweep_cfg(model, tiny_finetuned[1], tmp_path / "sweep", **cfg))
    (row,) = [r for r in sweep(sweep_cfg(model, tiny_finetuned[1], tmp_path / "sweep", overwrite=True, **cfg))
              if r["method"] == "dsp"]
    assert json.loads((tmp_path / "sweep" / "dsp-pipelined-k3-s0" / "results.json").read_text())["resumed_from_step"] \
        is None
