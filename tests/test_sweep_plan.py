"""A sweep checks every planned run before the first one starts, counts no run twice, names a
damaged run and its remedy, and still writes its tables when it is stopped part-way."""
import json

import pytest

import headprune.sweeping as sweep_mod
from headprune.cli import main, parser
from headprune.config import PruneConfig, SweepConfig
from headprune.errors import ConfigError, OutputExistsError
from headprune.sweeping import sweep


def sweep_cfg(model, data, out, **kw):
    return SweepConfig(**{**dict(model=str(model), dataset=str(data), methods=["random"], ks=[2, 4], seeds=[0, 1],
                                 batch_size=16, output_dir=str(out)), **kw})


@pytest.mark.parametrize("option,values,message", [
    ("ks", [2, 2, 3], "ks: 2 given more than once"), ("seeds", [1, 1], "seeds: 1 given more than once"),
    ("methods", ["dsp", "random", "dsp"], "methods: dsp given more than once"),
    ("modes", ["joint", "joint"], "modes: joint given more than once"),
])
def test_a_run_is_never_planned_twice(option, values, message):
    with pytest.raises(ConfigError, match=message):
        SweepConfig(**{option: values})


def test_every_budget_is_checked_before_the_first_run(tiny_finetuned, tmp_path, monkeypatch):
    model, data = tiny_finetuned
    monkeypatch.setattr(sweep_mod, "prune", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(ConfigError, match="k=9 is more than the 8 heads of this model"):
        sweep(sweep_cfg(model, data, tmp_path, ks=[2, 9]))
    with pytest.raises(ConfigError, match="plans no runs"):
        sweep(sweep_cfg(model, data, tmp_path, methods=["michel"], modes=["joint"]))
    with pytest.raises(OutputExistsError, match="overlaps the input model"):
        sweep(sweep_cfg(model, data, model.parent.parent))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage,why", [("", "unreadable: Expecting value"), ("[]", "it lacks all"),
                                        ('{"method": "random", "mo', "unreadable: Unterminated string"),
                                        ('{"method": "random"}', "it lacks mode, seed, k")])
def test_a_damaged_run_is_named_with_its_remedy(tiny_finetuned, tmp_path, damage, why):
    model, data = tiny_finetuned
    sweep(sweep_cfg(model, data, tmp_path, ks=[2], seeds=[0]))
    (tmp_path / "random-pipelined-k2-s0" / "results.json").write_text(damage)
    with pytest.raises(OutputExistsError, match=r"random-pipelined-k2-s0/results.json is damaged \(" + why + r".*\); "
                                                r"delete the folder .*random-pipelined-k2-s0 and run the sweep again"):
        sweep(sweep_cfg(model, data, tmp_path, ks=[2], seeds=[0]))


def test_a_stopped_sweep_still_reports_the_runs_it_finished(tiny_finetuned, tmp_path, monkeypatch):
    model, data = tiny_finetuned
    real_prune, done = sweep_mod.prune, []

    def prune_then_stop(run, **kw):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(run.output_dir)
        return real_prune(run, **kw)
    monkeypatch.setattr(sweep_mod, "prune", prune_then_stop)
    with pytest.raises(KeyboardInterrupt):
        sweep(sweep_cfg(model, data, tmp_path))
    table = (tmp_path / "sweep.md").read_text()
    assert table.count("| random | pipelined |") == 3
    assert "| random | pipelined | 2 |" in (tmp_path / "summary.md").read_text()  # k=2: both seeds
    assert (tmp_path / "sweep.png").exists() and (tmp_path / "report.md").exists()


def test_the_sweep_has_no_per_run_options():
    text = parser()._subparsers._group_actions[0].choices["sweep"].format_help()
    for flag in ("--method ", "--mode ", "--k ", "--seed "):
        assert flag not in text
    assert "--methods" in text and "--ks" in text and "--seeds" in text
    with pytest.raises(SystemExit):
        main(["sweep", "--k", "3"])


def test_michel_steps_the_same_in_prune_and_sweep():
    assert PruneConfig().michel_step == SweepConfig().michel_step == 6


def test_per_run_options_in_a_sweep_yaml_are_refused(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("k: 3\n")
    assert main(["sweep", "--config", str(tmp_path / "s.yaml")]) == 2
    assert "unknown option(s) in" in capsys.readouterr().err


def test_a_budget_per_kind_in_a_sweep(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned
    runs = sweep_mod.planned_runs(sweep_cfg(model, data, tmp_path, k_per_kind=[3]))
    assert {run.k for run in runs} == {3}
    json.dumps([run.output_dir for run in runs])


def test_voita_with_its_threshold_is_planned_once_whatever_the_budgets(tmp_path):
    from pathlib import Path
    from headprune.sweeping import planned_runs
    runs = planned_runs(SweepConfig(methods=["voita", "dsp"], ks=[6, 12], seeds=[0], voita_selection="threshold",
                                    output_dir=str(tmp_path)))
    assert [Path(run.output_dir).name for run in runs] == ["voita-pipelined-k6-s0", "dsp-pipelined-k6-s0",
                                                           "dsp-pipelined-k12-s0"]


def test_a_michel_step_that_misses_a_k_is_refused_before_the_first_run(tiny_finetuned, tmp_path, capsys):
    # 8 heads falling by 2: 8, 6, 4, 3 (the last k) -- 5 is never on the curve, its cell would be missing
    from conftest import one_line_error
    model, data = tiny_finetuned
    line = one_line_error(capsys, ["sweep", "--model", model, "--dataset", data, "--methods", "michel", "--ks", "3",
                                   "5", "--michel-step", "2", "--output-dir", tmp_path / "s"])
    assert line.endswith("--michel-step 2: Michel's curve falls from 8 heads by 2 and passes no k = 5: give a step "
                         "that divides 3") and not (tmp_path / "s").exists()

def test_an_option_of_some_methods_goes_to_their_runs_only(tmp_path):
    # --relaxation is DSP's, calibration data the scored methods' (and reconstruction's): the other
    # runs of the sweep would refuse them
    from headprune.sweeping import planned_runs
    runs = planned_runs(SweepConfig(methods=["dsp", "random", "fisher"], ks=[6], seeds=[0], relaxation="k-rounds",
                                    calibration_examples=100, output_dir=str(tmp_path)))
    settings = {run.method: (run.relaxation, run.calibration_examples) for run in runs}
    assert settings == {"dsp": ("k-rounds", 100), "random": ("fewest-rounds", None), "fisher": ("fewest-rounds", 100)}
    # judged on each run's own settings: a joint run's ablation is not the sweep's mean
    runs = planned_runs(SweepConfig(task="causal-lm", methods=["dsp"], modes=["pipelined", "joint"], ablation="mean",
                                    calibration_examples=100, ks=[6], seeds=[0], output_dir=str(tmp_path)))
    assert {run.mode: run.calibration_examples for run in runs} == {"pipelined": 100, "joint": None}

def test_split_names_are_checked_before_any_run_or_evaluation(tiny_finetuned, tmp_path, capsys, monkeypatch):
    from conftest import one_line_error

    import headprune.tasks.classification as classification_task
    model, data = tiny_finetuned
    monkeypatch.setattr(classification_task, "evaluate", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("evaluated before the split name was checked")))
    line = one_line_error(capsys, ["sweep", "--model", model, "--dataset", data, "--methods", "random", "--ks", 3,
                                   "--split", "foo", "--output-dir", tmp_path / "sweep"])
    assert line.endswith("--split 'foo': the evaluation splits are heldout")
    assert not (tmp_path / "sweep").exists()
    line = one_line_error(capsys, ["prune", "--model", model, "--dataset", data, "--k", 3, "--select-by", "foo",
                                   "--output-dir", tmp_path / "run"])
    assert line.endswith("--select-by 'foo': the evaluation splits are heldout")


def test_a_budget_per_kind_replaces_the_ks_with_a_warning(tiny_finetuned, tmp_path, caplog):
    model, data = tiny_finetuned
    sweep(sweep_cfg(model, data, tmp_path, ks=[2, 4], seeds=[0], k_per_kind=[3]))
    assert "--k-per-kind sets each run's budget: --ks 2 4 is not used" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["random-pipelined-k3-s0"]


def test_a_michel_curve_in_a_sweep_with_a_budget_per_kind_is_shown_at_that_budget(tiny_finetuned, tmp_path):
    # the --ks (left at their default) are not the budget: the curve's row is at the k the run pruned to
    model, data = tiny_finetuned
    rows = sweep(sweep_cfg(model, data, tmp_path, methods=["michel"], ks=[6], seeds=[0], k_per_kind=[3],
                           michel_step=1))
    (run,) = json.loads((tmp_path / "michel-pipelined-k3-s0" / "results.json").read_text()),
    assert [(row["k"], row["heldout"]) for row in rows] == [(3, run["metrics_pruned"]["heldout"])]


def test_a_model_trained_again_in_place_makes_the_finished_runs_stale(tiny_finetuned, tmp_path, monkeypatch):
    # the same path and settings, other weights: the finished runs (and their unpruned metric) are not its
    import shutil
    from safetensors.torch import load_file, save_file
    model = tmp_path / "model"
    shutil.copytree(tiny_finetuned[0], model)
    sweep(sweep_cfg(model, tiny_finetuned[1], tmp_path / "sweep", ks=[3], seeds=[0]))
    weights = load_file(model / "model.safetensors")
    save_file({name: t + 0.01 if t.is_floating_point() else t for name, t in weights.items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    monkeypatch.setattr(sweep_mod, "prune", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(OutputExistsError, match=r"made with other settings or from another model or data \(e.g. "
                       r"random-pipelined-k3-s0: the weights: "):
        sweep(sweep_cfg(model, tiny_finetuned[1], tmp_path / "sweep", ks=[3, 4], seeds=[0]))
    monkeypatch.undo()  # another seed into the folder: the old weights' run is not in its tables
    sweep(sweep_cfg(model, tiny_finetuned[1], tmp_path / "sweep", ks=[3], seeds=[1]))
    table = (tmp_path / "sweep" / "sweep.csv").read_text()
    assert "random-pipelined-k3-s1" in table and "random-pipelined-k3-s0" not in table

def test_a_stopped_run_with_other_settings_is_named_before_the_first_run_and_overwritten(
        tiny_finetuned, tmp_path, monkeypatch):
    """Its checkpoint would be refused only when its turn came; with --overwrite it is made again."""
    import headprune.train as train_mod
    model, data = tiny_finetuned
    real_save = train_mod.save_checkpoint

    class Killed(BaseException):
        pass

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Killed
    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        sweep(sweep_cfg(model, data, tmp_path, methods=["dsp"], ks=[3], seeds=[0], checkpoint_every=2))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert (tmp_path / "dsp-pipelined-k3-s0" / "checkpoint").is_dir()
    from headprune.checkpoint import checkpoint_config  # what it was made from, for the plan to compare
    assert len(checkpoint_config(tmp_path / "dsp-pipelined-k3-s0" / "checkpoint", with_processes=True)[2]["model"]) == 64
    monkeypatch.setattr(sweep_mod, "prune", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(OutputExistsError, match="holds 1 run.s., finished or stopped, made with other settings or "
                                                r"from another model or data \(e.g. dsp-pipelined-k3-s0: epochs: 1.0 -> "
                                                r"2.0\)"):
        sweep(sweep_cfg(model, data, tmp_path, methods=["dsp"], ks=[3], seeds=[0], checkpoint_every=2, epochs=2))
    monkeypatch.undo()
    sweep(sweep_cfg(model, data, tmp_path, methods=["dsp"], ks=[3], seeds=[0], checkpoint_every=2, epochs=2,
                    overwrite=True))
    results = json.loads((tmp_path / "dsp-pipelined-k3-s0" / "results.json").read_text())
    assert results["config"]["epochs"] == 2 and results["resumed_from_step"] is None
