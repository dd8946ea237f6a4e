"""Options: defaults < YAML file < command-line flags; every option has help."""
import dataclasses

import pytest
import torch

from headprune.cli import main, parser
from headprune.config import FinetuneConfig, PruneConfig, build_config, unused_settings
from headprune.errors import ConfigError
from headprune.train import changed_settings


def parse(*argv):
    return parser().parse_args(["prune", *argv])


def test_flags_override_the_yaml_file_which_overrides_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("k: 12\nmode: joint\npruning_lr: 0.2\n")
    cfg = build_config(PruneConfig, parse("--config", str(tmp_path / "c.yaml"), "--k", "24"))
    assert (cfg.k, cfg.mode, cfg.pruning_lr) == (24, "joint", 0.2)
    assert cfg.schedule == "default" and cfg.t0 is None and cfg.method == "dsp"  # untouched defaults
    assert build_config(PruneConfig, parse("--text-columns", "a", "b")).text_columns == ["a", "b"]
    assert build_config(PruneConfig, parse("--overwrite")).overwrite is True
    # a budget flag replaces the file's budget, also one of another kind (the two would be refused together)
    targeted = build_config(PruneConfig, parse("--config", str(tmp_path / "c.yaml"), "--target-params", "0.8"))
    assert (targeted.target_params, targeted.k_per_kind, targeted.mode) == (0.8, None, "joint")
    (tmp_path / "speed.yaml").write_text("target_speedup: 1.5\nat_length: 32\n")  # and how it was to be timed
    assert build_config(PruneConfig, parse("--config", str(tmp_path / "speed.yaml"), "--k", "8")).at_length is None
    assert build_config(PruneConfig, parse("--config", str(tmp_path / "speed.yaml"), "--target-speedup", "2")).at_length == 32


def test_none_on_the_command_line_clears_a_number_the_yaml_file_sets(tmp_path):
    (tmp_path / "c.yaml").write_text("max_train_examples: 4000\npruning_lr: 0.2\nk: 12\n")
    cfg = build_config(PruneConfig, parse("--config", str(tmp_path / "c.yaml"), "--max-train-examples", "none",
                                          "--pruning-lr", "None"))
    assert (cfg.max_train_examples, cfg.pruning_lr, cfg.k) == (None, None, 12)
    cleared = build_config(PruneConfig, parse("--config", str(tmp_path / "c.yaml"), "--k", "none"))
    assert cleared.k == build_config(PruneConfig, parse()).k != 12  # the default budget
    with pytest.raises(SystemExit):  # options with a default of their own keep it: `none` is no value of theirs
        parse("--epochs", "none")


def test_unknown_yaml_keys_are_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("k: 12\nheads: 3\n")
    with pytest.raises(ValueError, match="unknown option.*heads"):
        build_config(PruneConfig, parse("--config", str(tmp_path / "c.yaml")))

    (tmp_path / "d.yaml").write_text("3: 4\nk: 12\n")  # a key read as a number: the same one line
    with pytest.raises(ValueError, match="unknown option.*: 3$"):
        build_config(PruneConfig, parse("--config", str(tmp_path / "d.yaml")))


def test_yaml_values_are_read_as_yaml_1_2_reads_them(tmp_path):
    # YAML 1.1 (PyYAML's) reads off and no as false and 010 as octal 8: documented values broke
    (tmp_path / "c.yaml").write_text("pruning_dropout: off\nsource_lang: no\nk: 010\nlr: 1e-3\noverwrite: true\n")
    cfg = build_config(PruneConfig, parse("--config", str(tmp_path / "c.yaml")))
    assert (cfg.pruning_dropout, cfg.source_lang, cfg.k, cfg.lr, cfg.overwrite) == ("off", "no", 10, 1e-3, True)


def test_every_option_has_help_and_a_flag():
    text = parser()._subparsers._group_actions[0].choices["prune"].format_help()
    for f in dataclasses.fields(PruneConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert f.metadata["help"]


def test_prune_has_its_own_defaults():
    assert PruneConfig().epochs == 1.0 and FinetuneConfig().epochs == 3.0


def test_bad_choice_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--mode", "sideways"])
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_user_errors_return_2_with_a_message(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    assert main(["finetune", "--output-dir", str(tmp_path)]) == 2
    assert "already holds results" in capsys.readouterr().err


def test_the_command_line_flushes_subnormal_floats_to_zero(tmp_path, capsys):
    # they slow CPUs down many times over (the translation model's training: 15 against 95 steps a minute)
    smallest = torch.tensor([1e-323], dtype=torch.float64)  # a subnormal double: not flushed yet
    assert smallest.item() > 0
    (tmp_path / "results.json").write_text("{}")
    assert main(["finetune", "--output-dir", str(tmp_path)]) == 2
    assert torch.tensor([1e-323], dtype=torch.float64).item() == 0.0
    assert (smallest * 1.0).item() == 0.0


@pytest.mark.parametrize("k", [0, -1, 100])
def test_the_demo_checks_k_before_it_fine_tunes(tmp_path, capsys, k):
    from conftest import one_line_error
    line = one_line_error(capsys, ["demo", "--k", k, "--output-dir", tmp_path / "demo"])
    assert line == f"headprune: error: --k {k}: the classification demo's model has 72 heads; keep 1 to 72"
    assert not (tmp_path / "demo").exists()


def test_an_interrupted_command_says_how_to_resume_in_one_line(capsys, monkeypatch):
    import headprune.cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(headprune.cli, "run", interrupted)
    assert headprune.cli.main(["prune", "--k", "3"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["headprune: interrupted; the same command again resumes training and Michel's rounds from their "
                   "last checkpoint, a pipelined run's reconstruction from its last block, a latency table and "
                   "measure from their last setting, a scoring pass from its last record and a sweep at its "
                   "unfinished run (taylor's pass and export start over)"]


def test_other_libraries_log_warnings_only(monkeypatch):
    import logging

    import headprune.cli
    monkeypatch.setattr(headprune.cli, "run", lambda args: 0)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # so that basicConfig configures it here
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    headprune.cli.main(["prune", "--k", "3"])
    assert not logging.getLogger("onnxscript").isEnabledFor(logging.INFO)
    assert logging.getLogger("headprune.recipes").isEnabledFor(logging.INFO)


def test_evaluation_files_of_one_name_and_text_columns_that_cannot_work_are_refused():
    from headprune.errors import ConfigError
    with pytest.raises(ConfigError, match="two files are named 'dev', and each file's metric is reported under"):
        PruneConfig(dataset="train.csv", eval_files=["a/dev.csv", "b/dev.csv"])
    for columns in (["text", "text"], ["label"], ["a", "b", "c"]):
        with pytest.raises(ConfigError, match="one text column, or two for sentence pairs"):
            FinetuneConfig(dataset="train.csv", text_columns=columns)
    FinetuneConfig(dataset="train.csv", text_columns=["premise", "hypothesis"], eval_files=["a/dev.csv", "b/test.csv"])


def test_a_bad_flag_is_one_line_and_where_to_look(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["prune", "--mode", "sideways"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "headprune prune: error: argument --mode: invalid choice: 'sideways' (choose from 'pipelined', 'joint') "
        "(`headprune prune --help` lists the options)"]


def test_an_annealing_that_does_not_fall_is_refused():
    from headprune.errors import ConfigError
    with pytest.raises(ConfigError, match="--tf 5 is not below --t0 1: the temperature falls from t0 to tf"):
        PruneConfig(t0=1.0, tf=5.0)
    with pytest.raises(ConfigError, match=r"--tf 5000 is not below --t0 1000 \(the t0 of --schedule steady\)"):
        PruneConfig(tf=5000.0, schedule="steady")  # the t0 not given is the schedule's
    with pytest.raises(ConfigError, match=r"--tf 0.01 is not below --t0 0.001 \(the tf of --schedule steady\)"):
        PruneConfig(t0=1e-3, schedule="steady")
    with pytest.raises(ConfigError, match="cooldown_fraction=2.0: must be at most 1"):
        PruneConfig(cooldown_fraction=2.0)
    assert PruneConfig(t0=1.0, tf=1e-3, cooldown_fraction=1.0).cooldown_fraction == 1.0


def test_calibration_options_where_nothing_reads_them_are_refused():
    from headprune.errors import ConfigError
    for settings in (dict(method="random", reconstruct="none"), dict(mode="joint", reconstruct="none")):
        with pytest.raises(ConfigError, match="this run reads no calibration data"):
            PruneConfig(calibration_examples=10, **settings)
    assert PruneConfig(calibration_examples=10).calibration_examples == 10  # dsp's default: the bias
    assert PruneConfig(method="fisher", reconstruct="none", calibration_dataset="other.csv").calibration_dataset


def test_a_learning_rate_that_overflows_the_optimizer_is_refused():
    from headprune.errors import ConfigError
    with pytest.raises(ConfigError, match=r"lr=1e\+38: must be at most 10000"):
        PruneConfig(mode="joint", lr=1e38)
    with pytest.raises(ConfigError, match=r"pruning_lr=20000.0: must be at most 10000"):
        PruneConfig(pruning_lr=2e4)


def test_an_option_the_run_never_reads_is_said(tiny_finetuned, tmp_path, caplog):
    model, data = tiny_finetuned
    main(["prune", "--model", str(model), "--dataset", str(data), "--method", "random", "--k", "3", "--michel-step", "2",
          "--beam", "3", "--max-length", "16", "--output-dir", str(tmp_path / "run")])
    assert "--beam, --michel-step: not read by this run (method random, task classification)" in caplog.text


def test_a_value_equal_to_an_exclusive_upper_bound_is_refused():
    """`below` bounds are exclusive: the seed must be less than 2**32 (torch's generators), the
    cooldown fraction less than 1."""
    PruneConfig(seed=2**32 - 1)
    with pytest.raises(ConfigError, match=r"seed=4294967296: must be less than 4294967296"):
        PruneConfig(seed=2**32)


def test_each_methods_options_are_its_own():
    """A method's options (config.METHOD_OPTIONS) are recorded with its results and read by no other
    method; --activation-checkpointing, though named like Minitron's method, belongs to every run."""
    from headprune.config import METHOD_OPTIONS, METHODS
    from headprune.selection import method_options
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    for method in METHODS:
        own = set(METHOD_OPTIONS.get(method, ()))
        assert own <= fields
        others = set().union(*(names for owner, names in METHOD_OPTIONS.items() if owner != method))
        assert own.isdisjoint(unused_settings({"method": method})) and others <= unused_settings({"method": method})
    assert method_options(PruneConfig(method="activation")) == {"activation_aggregation": "l2"}
    assert "activation_checkpointing" not in unused_settings({"method": "dsp"})


def test_fishers_rearrangement_is_read_by_fisher_runs_only():
    """--no-fisher-rearrange on a DSP run changes nothing it does: it resumes, and a sweep keeps the run."""
    assert "fisher_rearrange" in unused_settings({"method": "dsp"})
    assert "fisher_rearrange" not in unused_settings({"method": "fisher"})
    saved = dataclasses.asdict(PruneConfig(method="dsp"))
    assert changed_settings(saved, PruneConfig(method="dsp", fisher_rearrange=False)) == {}
    saved = dataclasses.asdict(PruneConfig(method="fisher"))
    assert "fisher_rearrange" in changed_settings(saved, PruneConfig(method="fisher", fisher_rearrange=False))


def test_an_option_finetune_never_reads_is_said(tmp_path, caplog):
    # translation's --beam on a classifier: accepted, but said (the run then stops at its missing data)
    assert main(["finetune", "--dataset", str(tmp_path / "none.csv"), "--beam", "3", "--max-length", "16",
                 "--output-dir", str(tmp_path / "run")]) == 2
    assert "--beam: not read by this run (task classification)" in caplog.text
    assert "--max-length" not in caplog.text.split("not read by this run")[0]
