"""Hostile and careless input: nothing read from disk runs code, no bad row trains silently, no
long run is lost at its end, every mistake is one line with exit code 2 before any work."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
from conftest import one_line_error, tiny

import headprune.recipes as recipes
import headprune.tasks.classification as classification_task
from headprune.cli import main
from headprune.config import FinetuneConfig
from headprune.data import load_classification
from headprune.errors import CheckpointError, DataError, ModelError, OutputExistsError
from headprune.outputs import atomic_folder, settle_stopped_run
from headprune.pruning import load_pruned
from headprune.recipes import finetune, prune


class Plant:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))



@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("data or model was loaded before the input was checked")
    monkeypatch.setattr(classification_task, "load_classification", fail)
    monkeypatch.setattr(recipes, "train", fail)


# -- 1. no code runs from an output folder ---------------------------------------------------------

def test_a_planted_pickle_in_the_output_folder_runs_nothing(tiny_finetuned, tmp_path, no_loading):
    model, data = tiny_finetuned
    marker = tmp_path / "pwned"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoint.pt").write_bytes(pickle.dumps(Plant(marker)))
    with pytest.raises(OutputExistsError, match="older headprune \\(a pickle.*not read"):
        prune(tiny(model, data, tmp_path / "old"))
    # a pickle where the checkpoint's tensors should be: safetensors refuses it
    ckpt = tmp_path / "new" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "tensors.safetensors").write_bytes(pickle.dumps(Plant(marker)))
    (ckpt / "state.json").write_text('{"__items__": []}')
    with pytest.raises(CheckpointError, match="unreadable"):
        prune(tiny(model, data, tmp_path / "new"))
    assert not marker.exists()


def test_a_checkpoint_holds_only_json_and_safetensors(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned
    env = {**os.environ, "HEADPRUNE_KILL_AT_STEP": "4"}
    args = ["prune", "--model", model, "--dataset", data, "--k", 3, "--batch-size", 16, "--checkpoint-every", 2,
            "--mode", "joint", "--output-dir", tmp_path]
    subprocess.run([sys.executable, "-m", "headprune.cli", *map(str, args)], env=env, capture_output=True, timeout=300)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["state.json", "tensors.safetensors"]
    from headprune.checkpoint import read_checkpoint
    state = read_checkpoint(tmp_path / "checkpoint")
    assert state["step"] == 4 and state["config"]["mode"] == "joint"
    assert state["optimizer"]["state"] and all(isinstance(k, int) for k in state["optimizer"]["state"])
    assert isinstance(state["optimizer"]["param_groups"][0]["betas"], tuple)
    assert "prune" in state["seconds"]


# -- 2. bad labels and texts ---------------------------------------------------------------------

@pytest.mark.parametrize("name,content,message", [
    ("a.csv", "text,label\ngood film,pos\nbad film,\nok film,neg\n", r"a.csv, line 3: the label cell of column 'label'"),
    ("b.csv", "text,label\ngood film,pos\nbad film,NaN\nok film,neg\n", r"b.csv, line 3: the label cell"),
    ("c.jsonl", '{"text": "x", "label": 1}\n{"text": "y", "label": null}\n', r"c.jsonl, line 2: the label cell"),
    ("d.jsonl", '{"text": "x", "label": 1}\n{"text": "", "label": 0}\n', r"d.jsonl, line 2: the text cell of column 'text'"),
    ("e.jsonl", '{"text": "x", "label": 1}\n{"label": 0}\n', r"e.jsonl, line 2: the text cell"),
    ("f.csv", "text,label\nx,pos\n,neg\n", r"f.csv, line 3: the text cell"),
])
def test_missing_label_or_text_cells_name_the_file_row_and_column(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message + ".*--drop-incomplete-rows"):
        load_classification(str(tmp_path / name))


def test_incomplete_rows_can_be_dropped_and_are_counted(tiny_assets, tmp_path):
    model, _ = tiny_assets
    rows = [{"text": f"w{i % 7} w{i % 5}", "label": "yes" if i % 2 else "no"} for i in range(40)]
    rows[3]["label"], rows[8]["text"] = "", "   "
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_classification(str(tmp_path / "d.jsonl"), drop_incomplete=True)
    assert len(data.train) + len(data.evals["heldout"]) == 38
    assert data.dropped_rows == {str(tmp_path / "d.jsonl"): 2}
    results = finetune(tiny(model, tmp_path / "d.jsonl", tmp_path / "ft", drop_incomplete_rows=True))
    assert results["dropped_rows"] == {str(tmp_path / "d.jsonl"): 2}
    assert "dropped 2 rows" in (tmp_path / "ft" / "results.json").read_text() or results["dropped_rows"]


# -- 3. an unwritable or full output folder is refused before loading anything ------------------------

def test_an_unwritable_output_folder_is_refused_before_loading(tiny_finetuned, tmp_path, no_loading):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputExistsError, match="cannot write to the output folder .*a-file/out"):
        prune(tiny(*tiny_finetuned, tmp_path / "a-file" / "out"))


def test_a_full_disk_is_refused_before_loading(tiny_finetuned, tmp_path, no_loading, monkeypatch):
    import headprune.outputs as outputs
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputExistsError, match="MiB free; this run needs about"):
        prune(tiny(*tiny_finetuned, tmp_path))


# -- 4. label names survive fine-tuning, pruning and reloading ------------------------------------------

def test_label_names_go_into_the_saved_models_and_results(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned  # labels "no" / "yes"
    assert json.loads((model / "config.json").read_text())["id2label"] == {"0": "no", "1": "yes"}
    results = prune(tiny(model, data, tmp_path, method="random"))
    assert results["labels"] == ["no", "yes"]
    reloaded = load_pruned(tmp_path / "model")
    assert reloaded.config.id2label == {0: "no", 1: "yes"} and reloaded.config.label2id == {"no": 0, "yes": 1}
    assert "0: no, 1: yes" in (tmp_path / "report.md").read_text()


def test_data_with_other_label_names_is_refused(tiny_finetuned, tmp_path, no_training_only):
    rows = [{"text": f"w{i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    (tmp_path / "other.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ModelError, match=r"trained for the labels \['no', 'yes'\], the data has \['neg', 'pos'\]"):
        prune(tiny(tiny_finetuned[0], tmp_path / "other.jsonl", tmp_path / "out"))


@pytest.fixture
def no_training_only(monkeypatch):
    monkeypatch.setattr(recipes, "train", lambda *a, **k: pytest.fail("training started"))


# -- 5. one line and exit code 2, before any long work ----------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", 0], "batch_size=0: must be at least 1"),
    (["--max-train-examples", -5], "max_train_examples=-5: must be at least 1"),
    (["--max-train-examples", 0], "max_train_examples=0: must be at least 1"),
    (["--epochs", 0], "epochs=0.0: must be greater than 0"),
    (["--k", -1], "k=-1: must be at least 0"),
])
def test_out_of_range_options(capsys, tmp_path, flags, message):
    assert message in one_line_error(capsys, ["prune", "--output-dir", tmp_path, *flags])


def test_a_yaml_value_of_the_wrong_type(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("k: abc\n")
    assert "k: expected an integer, got 'abc'" in one_line_error(capsys, ["prune", "--config", tmp_path / "c.yaml"])
    (tmp_path / "c.yaml").write_text("- a list\n")
    assert "must hold `option: value` lines" in one_line_error(capsys, ["prune", "--config", tmp_path / "c.yaml"])


@pytest.mark.parametrize("flags,message", [
    (["--batch-sizes", 0], "batch_sizes=0: must be at least 1"),
    (["--lengths", 0], "lengths=0: must be at least 1"),
    (["--lengths", 100000], "--lengths 100000: longer than the model's 64 positions"),
    (["--repeats", 0], "repeats=0: must be at least 1"),
])
def test_measure_options(capsys, tmp_path, tiny_finetuned, flags, message):
    assert message in one_line_error(capsys, ["measure", "--pruned", tiny_finetuned[0], *flags])


def test_a_missing_or_corrupt_model(capsys, tmp_path, tiny_finetuned):
    model, data = tiny_finetuned
    line = one_line_error(capsys, ["prune", "--model", tmp_path / "nowhere", "--dataset", data, "--output-dir", tmp_path / "o"])
    assert line.endswith(f"no such model folder: {tmp_path / 'nowhere'}")
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    line = one_line_error(capsys, ["prune", "--model", broken, "--dataset", data, "--k", 3, "--output-dir", tmp_path / "o"])
    assert f"cannot load the weights of '{broken}'" in line
    # no tokenizer: transformers would make one of a few special tokens, and every word [UNK]
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    from headprune.tasks.base import TOKENIZER_FILES
    removed = [f.unlink() or f.name for f in bare.iterdir() if f.name in TOKENIZER_FILES or "token" in f.name]
    assert removed
    line = one_line_error(capsys, ["prune", "--model", bare, "--dataset", data, "--k", 3, "--output-dir", tmp_path / "o"])
    assert line.endswith(f"'{bare}' holds no tokenizer (tokenizer.json, tokenizer_config.json, vocab.txt, ...): copy "
                         "the tokenizer files of the model it was made from into it")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name,content,message", [
    ("empty.csv", "", "empty.csv is empty"),
    ("header.csv", "text,label\n", "header.csv has no rows"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0,}\n', "bad.jsonl, line 2: not valid JSON"),
    ("latin.csv", b"text,label\nok,1\ncaf\xe9,0\n", r"latin.csv, line 3: not UTF-8 text \(byte 0xe9\)"),
    ("ragged.csv", "text,label\na,1\nb,0,extra,more\n", r"ragged.csv: not valid CSV: .*line 3"),
])
def test_unreadable_files_say_file_line_and_cause(capsys, tmp_path, tiny_finetuned, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = one_line_error(capsys, ["finetune", "--model", tiny_finetuned[0], "--dataset", path, "--output-dir", tmp_path / "o"])
    assert __import__("re").search(message, line), line


# -- 6. a model folder is never half-written ------------------------------------------------------------

KILL_WHILE_SAVING = """
import os, signal, sys
from pathlib import Path
from headprune.outputs import atomic_folder
with atomic_folder(Path(sys.argv[1])) as tmp:
    (tmp / "config.json").write_text("")  # as a kill in the middle of save_pretrained leaves it
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_kill_while_saving_leaves_the_earlier_folder_whole(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"earlier": true}')
    run = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, str(model)], timeout=60)
    assert run.returncode == -9
    assert json.loads((model / "config.json").read_text()) == {"earlier": True}
    assert [p.name for p in tmp_path.glob(".model.*.tmp")]  # the half-written one is aside
    settle_stopped_run(tmp_path)  # the next run in this folder clears it first
    assert not list(tmp_path.glob(".model.*.tmp"))
    with pytest.raises(RuntimeError):
        with atomic_folder(model) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("save failed")
    assert json.loads((model / "config.json").read_text()) == {"earlier": True}


# -- 7. nothing stale beside new results -----------------------------------------------------------------

def test_overwrite_leaves_no_file_of_the_earlier_run(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned
    prune(tiny(model, data, tmp_path, method="dsp"))
    assert (tmp_path / "train_log.jsonl").exists() and (tmp_path / "training.png").exists()
    with pytest.raises(OutputExistsError):
        prune(tiny(model, data, tmp_path, method="random"))
    prune(tiny(model, data, tmp_path, method="random", overwrite=True))  # trains nothing: no log
    assert not (tmp_path / "train_log.jsonl").exists() and not (tmp_path / "training.png").exists()
    assert json.loads((tmp_path / "results.json").read_text())["method"] == "random"


# -- 8. a quick start ------------------------------------------------------------------------------------

CHECK_IMPORTS = """
import sys
from headprune.cli import main
from headprune.config import FinetuneConfig
for argv in (["--help"], ["prune", "--mode", "sideways"]):
    try:
        main(argv)
    except SystemExit:
        pass
assert main(["prune", "--batch-size", "0"]) == 2
heavy = [m for m in ("torch", "transformers", "datasets", "matplotlib", "pandas", "accelerate") if m in sys.modules]
print(heavy)
"""


def test_help_and_input_errors_load_no_heavy_library():
    run = subprocess.run([sys.executable, "-c", CHECK_IMPORTS], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert "invalid choice: 'sideways'" in run.stderr and "batch_size=0" in run.stderr


# -- also ------------------------------------------------------------------------------------------------

def test_unpruned_metrics_are_measured_once_per_weights_and_data(tiny_finetuned, tmp_path, monkeypatch):
    model, data = tiny_finetuned
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    first = prune(tiny(model, data, tmp_path / "a", method="random"))
    second = prune(tiny(model, data, tmp_path / "b", method="random", k=2))
    assert "evaluate_unpruned" in first["seconds"] and "evaluate_unpruned" not in second["seconds"]
    assert second["metrics_unpruned"] == first["metrics_unpruned"]
    third = prune(tiny(model, data, tmp_path / "c", method="random", max_eval_examples=5))  # other data
    assert "evaluate_unpruned" in third["seconds"]


def test_a_bare_encoder_is_announced_in_our_words(tiny_assets, tmp_path, caplog):
    model, data = tiny_assets
    with caplog.at_level("WARNING", logger="headprune"):
        prune(tiny(model, data, tmp_path, mode="joint"))
    assert "has no classification head for these 2 labels: headprune adds a new, randomly initialised one" in caplog.text


def test_michel_reports_each_round(tiny_finetuned, tmp_path, caplog):
    with caplog.at_level("INFO", logger="headprune"):
        prune(tiny(*tiny_finetuned, tmp_path, method="michel", k=2, michel_step=3))
    assert "michel round 1: 5 heads left" in caplog.text and "michel round 2: 2 heads left" in caplog.text


def test_a_resumed_run_counts_the_seconds_before_the_interruption(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned
    args = ["prune", "--model", model, "--dataset", data, "--k", 3, "--batch-size", 16, "--epochs", 2,
            "--checkpoint-every", 4, "--output-dir", tmp_path]
    cli = [sys.executable, "-m", "headprune.cli", *map(str, args)]
    subprocess.run(cli, env={**os.environ, "HEADPRUNE_KILL_AT_STEP": "9"}, capture_output=True, timeout=300)
    from headprune.checkpoint import read_checkpoint
    before = read_checkpoint(tmp_path / "checkpoint")["seconds"]
    assert subprocess.run(cli, capture_output=True, timeout=300).returncode == 0
    after = json.loads((tmp_path / "results.json").read_text())["seconds"]
    assert after["prune"] > before["prune"] > 0 and after["load"] > before["load"] > 0


@pytest.mark.parametrize("command,mode", [("finetune", None), ("prune", "pipelined"), ("prune", "joint")])
def test_every_command_checks_the_architecture_from_the_config_first(tmp_path, tiny_assets, command, mode, monkeypatch):
    from transformers import MPNetConfig, MPNetForSequenceClassification
    MPNetForSequenceClassification(MPNetConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=8, vocab_size=99)).save_pretrained(tmp_path / "mpnet")
    import transformers
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights were loaded"))
    monkeypatch.setattr(classification_task, "load_classification", lambda *a, **k: pytest.fail("data was loaded"))
    from headprune.errors import UnsupportedArchitectureError
    run = finetune if command == "finetune" else prune
    kw = {} if mode is None else {"mode": mode}
    with pytest.raises(UnsupportedArchitectureError, match="does not support 'mpnet'.*BERT-style"):
        run(tiny(tmp_path / "mpnet", tiny_assets[1], tmp_path / "out", **kw))


def test_measure_reports_the_spread(tmp_path):
    from conftest import tiny_model
    from headprune.pruning import save_pruned
    save_pruned(tiny_model("bert", layers=2), tmp_path / "p", [("encoder", 1, 1)])
    assert main(["measure", "--pruned", str(tmp_path / "p"), "--batch-sizes", "2", "--lengths", "8",
                 "--repeats", "5", "--output-dir", str(tmp_path / "m")]) == 0
    row = json.loads((tmp_path / "m" / "measure.json").read_text())["settings"][0]
    for t in row["timings"].values():
        assert t["min"] <= t["q1"] <= t["median"] <= t["q3"] <= t["max"]
    assert row["seconds"]["pruned"] == row["timings"]["pruned"]["median"]
    assert "ms orig (IQR)" in (tmp_path / "m" / "measure.md").read_text()


def test_inputs_longer_than_the_model_s_positions_are_cut_to_them(tiny_assets, tmp_path, caplog):
    """--max-length above the model's positions crashed on the first long input; now truncated, with a warning."""
    import json as json_module
    model, _ = tiny_assets
    rows = [{"text": " ".join(f"w{(i * 7 + j) % 94}" for j in range(8 if i else 300)), "label": i % 2}
            for i in range(40)]  # the first row: 300 words, the tiny BERT has 64 positions
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json_module.dumps(r) for r in rows))
    results = finetune(FinetuneConfig(model=str(model), dataset=str(data), max_length=1000, epochs=1, batch_size=8,
                                      checkpoint_every=0, output_dir=str(tmp_path / "ft")))
    assert results["metrics"]
    assert "--max-length 1000: the model takes 64 tokens at most; inputs are truncated to 64" in caplog.text


def test_measure_refuses_a_pruned_or_broken_original_in_one_line(capsys, tmp_path, tiny_finetuned):
    from transformers import AutoModelForSequenceClassification

    from headprune.pruning import save_pruned
    model, _ = tiny_finetuned
    save_pruned(AutoModelForSequenceClassification.from_pretrained(model), tmp_path / "pruned", [("encoder", 0, 1)])
    line = one_line_error(capsys, ["measure", "--pruned", tmp_path / "pruned", "--original", tmp_path / "pruned",
                                   "--lengths", 16])
    assert line.endswith(f"--original {tmp_path / 'pruned'} is a pruned model itself: give the model "
                         f"{tmp_path / 'pruned'} was pruned from")
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    line = one_line_error(capsys, ["measure", "--pruned", tmp_path / "pruned", "--original", broken, "--lengths", 16])
    assert f"cannot load the weights of --original {broken}" in line


@pytest.mark.parametrize("edit,message", [
    (lambda text: "not json", "cannot read the config.json of '{model}': It looks like the config file"),
    (lambda text: text.replace('"model_type": "bert"', '"model_type": "nosuch"'),
     "cannot read the config.json of '{model}': The checkpoint you are trying to load has model type `nosuch`"),
    (lambda text: text.replace('"num_attention_heads": 4', '"num_attention_heads": 5'),
     "transformers cannot build '{model}' from its config.json: The hidden size (32) is not a multiple"),
])
def test_a_broken_config_json_is_named_as_such(capsys, tmp_path, tiny_finetuned, edit, message):
    model, data = tiny_finetuned
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "config.json").write_text(edit((broken / "config.json").read_text()))
    line = one_line_error(capsys, ["prune", "--model", broken, "--dataset", data, "--k", 3, "--output-dir", tmp_path / "o"])
    assert message.format(model=broken) in line
