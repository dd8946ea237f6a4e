"""A checkpoint resumes only the run it belongs to: the same weights and data (digests kept in
it), a step count that fits the run, every part of its state present."""
import json
import shutil
from pathlib import Path

import pytest
from datasets import Dataset
from safetensors.torch import load_file, save_file

import headprune.train as train_module
from headprune.config import PruneConfig
from headprune.digests import digest_of_data
from headprune.errors import CheckpointError
from headprune.recipes import prune


class Interrupted(Exception):
    pass


def interrupted_run(cfg, monkeypatch, at_step=4):
    """Run `cfg` until just after step `at_step` (and its checkpoint), as a kill would stop it."""
    monkeypatch.setenv(train_module.KILL_AT_STEP, str(at_step))
    monkeypatch.setattr(train_module.os, "kill", lambda *a: (_ for _ in ()).throw(Interrupted()))
    with pytest.raises(Interrupted):
        prune(cfg)
    monkeypatch.delenv(train_module.KILL_AT_STEP)


@pytest.fixture
def copies(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned
    shutil.copytree(model, tmp_path / "model")
    shutil.copy(data, tmp_path / "data.jsonl")
    return tmp_path / "model", tmp_path / "data.jsonl"


def config(model, data, out, **kw):
    return PruneConfig(model=str(model), dataset=str(data), output_dir=str(out), k=3, batch_size=16, epochs=2,
                       checkpoint_every=2, **kw)


def test_a_checkpoint_of_other_weights_is_refused(copies, tmp_path, monkeypatch):
    model, data = copies
    interrupted_run(config(model, data, tmp_path / "run"), monkeypatch)
    weights = load_file(model / "model.safetensors")
    name = next(n for n in weights if n.endswith("query.weight"))
    weights[name] = weights[name] + 0.01  # another model of the same shape
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="made from other inputs: the model's weights changed .*pass --overwrite to discard it"):
        prune(config(model, data, tmp_path / "run"))
    results = prune(config(model, data, tmp_path / "run", overwrite=True))  # as the message says
    assert results["resumed_from_step"] is None


def test_a_checkpoint_of_other_data_is_refused(copies, tmp_path, monkeypatch):
    model, data = copies
    interrupted_run(config(model, data, tmp_path / "run"), monkeypatch)
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[1:] + rows[:1]))  # the same examples in another order
    with pytest.raises(CheckpointError, match="made from other inputs: the training data, the evaluation data and the calibration data changed"):
        prune(config(model, data, tmp_path / "run"))


def test_a_checkpoint_of_another_config_beside_the_same_weights_is_refused(copies, tmp_path, monkeypatch):
    model, data = copies
    interrupted_run(config(model, data, tmp_path / "run"), monkeypatch)
    settings = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**settings, "hidden_act": "relu"}))  # another model
    with pytest.raises(CheckpointError, match=r"made from other inputs: the model\'s files \(config, tokenizer\) changed"):
        prune(config(model, data, tmp_path / "run"))


def test_michels_rounds_scored_on_other_calibration_data_are_refused(copies, tmp_path, monkeypatch):
    model, data = copies
    calibration = tmp_path / "calibration.jsonl"
    rows = data.read_text().splitlines()
    calibration.write_text("\n".join(rows[:64]))
    run = config(model, data, tmp_path / "run", method="michel", michel_step=1, calibration_dataset=str(calibration))
    interrupted_run(run, monkeypatch, at_step=3)  # three masks scored
    calibration.write_text("\n".join(rows[64:128]))
    with pytest.raises(CheckpointError, match="made from other inputs: the calibration data changed"):
        prune(run)


def test_a_checkpoint_of_before_the_model_files_and_calibration_were_recorded_resumes(copies, tmp_path, monkeypatch):
    model, data = copies
    interrupted_run(config(model, data, tmp_path / "run"), monkeypatch)
    path = tmp_path / "run" / "checkpoint" / "state.json"
    text = path.read_text()
    assert '"model files"' in text and '"calibration data"' in text  # (the default run reconstructs: calibrates)
    path.write_text(text.replace('"model files"', '"a name no headprune records"').replace(
        '"calibration data"', '"another name no headprune records"'))
    assert prune(config(model, data, tmp_path / "run"))["resumed_from_step"] == 4


def test_the_same_inputs_resume(copies, tmp_path, monkeypatch):
    model, data = copies
    interrupted_run(config(model, data, tmp_path / "run"), monkeypatch)
    assert prune(config(model, data, tmp_path / "run"))["resumed_from_step"] == 4


@pytest.mark.parametrize("step,message", [
    (1e9, "its step 1000000000.0 is not a count of steps"), (-7, "its step -7 is not a count of steps"),
    ("abc", "its step 'abc' is not a count of steps"), (None, "its step None is not a count of steps"),
    (10**6, "is at step 1000000, past this run's 18 steps"),
])
def test_a_hand_edited_step_is_refused(copies, tmp_path, monkeypatch, step, message):
    model, data = copies
    interrupted_run(config(model, data, tmp_path / "run"), monkeypatch)
    path = tmp_path / "run" / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    assert state["__items__"][0][0] == "step"
    state["__items__"][0][1] = step
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=message):
        prune(config(model, data, tmp_path / "run"))


def test_a_checkpoint_missing_a_part_is_refused(copies, tmp_path, monkeypatch):
    model, data = copies
    interrupted_run(config(model, data, tmp_path / "run"), monkeypatch)
    path = tmp_path / "run" / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    state["__items__"] = [item for item in state["__items__"] if item[0] != "optimizer"]
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"is damaged \(its optimizer is missing or not a dict\); delete it to start over"):
        prune(config(model, data, tmp_path / "run"))


def test_options_a_run_never_reads_do_not_make_it_another_run():
    # resuming, or a sweep run again, with another method's option or translation's on a classifier
    import dataclasses
    from headprune.config import PruneConfig
    from headprune.train import changed_settings
    saved = dataclasses.asdict(PruneConfig(method="random", k=3))
    assert changed_settings(saved, PruneConfig(method="random", k=3, michel_step=3, beam=2, pruning_lr=0.5, t0=50.0)) == {}
    michel = dataclasses.asdict(PruneConfig(method="michel", k=3))
    assert changed_settings(michel, PruneConfig(method="michel", k=3, michel_step=3)) == {"michel_step": (6, 3)}
    assert changed_settings(dataclasses.asdict(PruneConfig(task="translation")),
                            PruneConfig(task="translation", beam=2)) == {"beam": (5, 2)}
    # nor in what they put in effect (a sweep gives --pruning-dropout to every run)
    assert changed_settings(dataclasses.asdict(PruneConfig(method="michel", k=3, pruning_dropout="off")),
                            PruneConfig(method="michel", k=3)) == {}
    # the temperatures set STE's step rates too: read by it
    ste = dataclasses.asdict(PruneConfig(method="ste", k=3, cooldown_fraction=0.1))
    assert changed_settings(ste, PruneConfig(method="ste", k=3, cooldown_fraction=0.9)) == {"cooldown_fraction": (0.1, 0.9)}


def test_calibration_options_of_a_run_that_reads_none_are_not_compared_and_old_records_read_back():
    # sweeps of before gave --calibration-examples to every run: a joint DSP run recorded one it never read
    import dataclasses
    from headprune.config import PruneConfig, run_settings
    from headprune.train import changed_settings
    joint = PruneConfig(mode="joint", k=3)
    recorded = {**dataclasses.asdict(joint), "calibration_examples": 100}
    assert changed_settings(recorded, joint) == {}
    assert run_settings(recorded).calibration_examples is None
    fisher = {**dataclasses.asdict(PruneConfig(method="fisher", k=3)), "activation_checkpointing": False}
    assert run_settings({**fisher, "pruning_lr": 0.3}).pruning_lr is None  # unread by fisher: today's default


def test_a_checkpoint_whose_inputs_are_damaged_is_named_in_one_line(tmp_path):
    import json
    from headprune.checkpoint import checkpoint_config
    from headprune.errors import CheckpointError
    (tmp_path / "state.json").write_text(json.dumps({"__items__": [["config", {"__items__": []}],
                                                                  ["extra", {"__items__": [["inputs", "zz"]]}]]}))
    with pytest.raises(CheckpointError, match="is unreadable .*delete it to start over"):
        checkpoint_config(tmp_path, with_processes=True)
    assert checkpoint_config(tmp_path) == {}  # its settings alone still read


def checkpoint_at(step, cfg, monkeypatch):
    """`cfg` interrupted after step 4, its checkpoint's step then set to `step`."""
    interrupted_run(cfg, monkeypatch)
    path = Path(cfg.output_dir) / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    assert state["__items__"][0][0] == "step"
    state["__items__"][0][1] = step
    path.write_text(json.dumps(state))


def test_a_checkpoint_one_step_past_the_last_is_refused(copies, tmp_path, monkeypatch):
    model, data = copies
    checkpoint_at(19, config(model, data, tmp_path / "run"), monkeypatch)
    with pytest.raises(CheckpointError, match="is at step 19, past this run's 18 steps"):
        prune(config(model, data, tmp_path / "run"))


def test_a_checkpoint_at_the_last_step_resumes(copies, tmp_path, monkeypatch):
    """A run killed after its last step's checkpoint (while evaluating or saving) finishes from it."""
    model, data = copies
    checkpoint_at(18, config(model, data, tmp_path / "run"), monkeypatch)
    assert prune(config(model, data, tmp_path / "run"))["resumed_from_step"] == 18


def test_a_checkpoint_gives_back_tuples_dict_keys_and_tensors_as_they_were(tmp_path):
    """No pickle, yet the state comes back as it went in: tuples stay tuples (not lists), integer keys
    stay integers (the optimizer's parameter numbers), tensors come back from safetensors."""
    import torch
    from headprune.checkpoint import read_checkpoint, write_checkpoint
    state = {"step": 3, "pair": (1.5, 2), "by_number": {0: torch.arange(3.0), 7: [("a", None)]}}
    write_checkpoint(tmp_path, state)
    back = read_checkpoint(tmp_path / "checkpoint")
    assert back["pair"] == (1.5, 2) and type(back["pair"]) is tuple
    assert list(back["by_number"]) == [0, 7] and torch.equal(back["by_number"][0], torch.arange(3.0))
    assert back["by_number"][7] == [("a", None)] and type(back["by_number"][7][0]) is tuple


def test_the_data_digest_names_each_split_and_ignores_their_order():
    a = Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]})
    b = Dataset.from_dict({"text": ["z"], "label": [1]})
    # the same splits handed in another order (--eval-files b a) are the same data
    assert digest_of_data({"a": a, "b": b}) == digest_of_data({"b": b, "a": a})
    # the same examples under another split name are not: the unpruned metrics cached under this digest
    # are {split: value}, and a run must not be handed another split's name
    assert digest_of_data({"valid": a}) != digest_of_data({"test": a})
    # nor are the same examples in another order (a shuffled training set trains otherwise)
    assert digest_of_data({"train": a}) != digest_of_data({"train": a.select([1, 0])})
