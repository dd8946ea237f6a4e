"""Damaged and unusual inputs (an audit of every command, the twenty-ninth session): each is refused
in one line before the work, or read as the user meant; nothing is run from a pickle, nothing
already written is replaced without --overwrite."""
import json
import os
import pickle
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import one_line_error, tiny, tiny_model
from safetensors.torch import load_file, save_file

from headprune.checkpoint import write_checkpoint
from headprune.config import PruneConfig, load_yaml
from headprune.errors import CheckpointError, DataError, ModelError, OutputExistsError, PrunedCheckpointError
from headprune.export import check_output
from headprune.pruning import load_pruned, save_pruned
from headprune.recipes import prune


class Plant:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pruned_folder(tmp_path):
    folder = tmp_path / "pruned"
    save_pruned(tiny_model("bert"), folder, [("encoder", 0, 1), ("encoder", 1, 2), ("encoder", 1, 3)])
    return folder


def test_a_pickle_beside_a_decoy_safetensors_file_is_never_read(tmp_path):
    """The pickle check passes a folder with any .safetensors file: the weights themselves are read
    from model.safetensors (or its index's shards) only, never from pytorch_model*.bin."""
    folder, marker = pruned_folder(tmp_path), tmp_path / "ran"
    (folder / "model.safetensors").unlink()
    save_file({"unused": torch.zeros(1)}, str(folder / "decoy.safetensors"))
    (folder / "pytorch_model-00001-of-00001.bin").write_bytes(pickle.dumps(Plant(marker)))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"bert.embeddings.word_embeddings.weight": "pytorch_model-00001-of-00001.bin"}}))
    with pytest.raises(PrunedCheckpointError, match="no model.safetensors .* headprune reads safetensors only"):
        load_pruned(folder)
    assert not marker.exists()


def test_a_pruned_model_in_safetensors_shards_loads_to_the_same_outputs(tmp_path, batch):
    folder = pruned_folder(tmp_path)
    model = load_pruned(folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB", save_original_format=False)
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "sharded")(**batch).logits, model(**batch).logits)
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(PrunedCheckpointError, match="does not name safetensors shards in its folder"):
        load_pruned(tmp_path / "sharded")


def with_nan(folder):
    weights = load_file(folder / "model.safetensors")
    name = next(n for n in weights if n.endswith("query.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return name


def test_weights_holding_nan_are_refused_in_one_line(tiny_finetuned, tmp_path, capsys):
    """Their scores, metrics and exports would all be NaN (accuracy from NaN logits looked fine)."""
    model, data = tiny_finetuned
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    name = with_nan(broken)
    line = one_line_error(capsys, ["prune", "--model", broken, "--dataset", data, "--k", 3, "--method", "random",
                                   "--output-dir", tmp_path / "o"])
    assert line.endswith(f"'{broken}': 1 weight tensor(s) hold NaN or infinite values (e.g. {name}): a damaged file, "
                         "or a model that diverged in training")
    assert not (tmp_path / "o").exists()
    line = one_line_error(capsys, ["finetune", "--model", broken, "--dataset", data, "--output-dir", tmp_path / "f"])
    assert "hold NaN or infinite values" in line and not (tmp_path / "f").exists()  # (no empty folder left)
    line = one_line_error(capsys, ["sweep", "--model", broken, "--dataset", data, "--methods", "random", "--ks", 2,
                                   "--output-dir", tmp_path / "s"])
    assert "hold NaN or infinite values" in line and not (tmp_path / "s").exists()
    folder = pruned_folder(tmp_path)
    with_nan(folder)
    with pytest.raises(ModelError, match="hold NaN or infinite values"):
        load_pruned(folder)


def test_an_export_never_writes_over_the_gguf_it_reads(tmp_path):
    tokenizer = tmp_path / "model.gguf"
    tokenizer.write_bytes(b"GGUF")
    cfg = SimpleNamespace(output=str(tokenizer), model=str(tmp_path / "pruned"), overwrite=True,
                          tokenizer_gguf=str(tokenizer))
    with pytest.raises(OutputExistsError, match="is the --tokenizer-gguf this export reads"):
        check_output(cfg)
    assert tokenizer.read_bytes() == b"GGUF"


def test_a_sweep_into_a_runs_folder_and_measure_over_its_report_are_refused(tiny_finetuned, tmp_path, capsys):
    model, data = tiny_finetuned
    run = tmp_path / "run"
    prune(tiny(model, data, run, method="random"))
    report = (run / "report.md").read_text()
    line = one_line_error(capsys, ["sweep", "--model", model, "--dataset", data, "--methods", "random", "--ks", 2,
                                   "--output-dir", run])
    assert line.endswith(f"{run} is a run's folder (it holds results.json): a sweep writes its tables beside the "
                         "folders of its runs; choose another --output-dir")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "measure.md").write_text("earlier")
    line = one_line_error(capsys, ["measure", "--pruned", run / "model", "--output-dir", tmp_path / "m"])
    assert line.endswith("already holds measure.md; pass --overwrite or choose another --output-dir")
    assert (run / "report.md").read_text() == report and (tmp_path / "m" / "measure.md").read_text() == "earlier"


def test_text_that_gives_no_training_or_no_evaluation_is_one_line(tmp_path, monkeypatch):
    from headprune import text
    (tmp_path / "one.txt").write_text("a single document\n")
    with pytest.raises(DataError, match="one.txt holds one document: a tenth of them is held out"):
        text.load_text(str(tmp_path / "one.txt"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.txt").write_text("w1 w2\nw3 w4\n")
    with pytest.raises(DataError, match="holds train.txt but no validation.txt or test.txt to evaluate on"):
        text.load_text(str(tmp_path / "folder"))
    import datasets
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["w1 w2", None, "  "]}),
                                   "validation": datasets.Dataset.from_dict({"text": [3, 7]})})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: splits)
    with pytest.raises(DataError, match="row 0 of its validation split holds int 3 in the 'text' column, not text"):
        text.load_text("hf:local")
    splits["validation"] = datasets.Dataset.from_dict({"text": ["w3", None]})
    assert text.load_text("hf:local") == text.TextData(["w1 w2"], {"validation": ["w3"]})  # missing cells left out


def test_json_columns_of_different_lengths_are_one_line(tmp_path):
    from headprune.data import load_classification
    (tmp_path / "cols.json").write_text(json.dumps({"text": ["a", "b", "c"], "label": [0, 1]}))
    with pytest.raises(DataError, match=r"cols.json: its columns are lists of different lengths \(text: 3, label: 2\)"):
        load_classification(str(tmp_path / "cols.json"))


def test_a_model_without_attention_heads_is_refused_by_the_onnx_export(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from transformers import FNetConfig, FNetForSequenceClassification
    model = FNetForSequenceClassification(FNetConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     intermediate_size=16, max_position_embeddings=16))
    model.save_pretrained(tmp_path / "fnet")
    line = one_line_error(capsys, ["export", "--model", tmp_path / "fnet", "--format", "onnx",
                                   "--output", tmp_path / "fnet.onnx"])
    assert "headprune does not support 'fnet': none of its modules matches a layout it knows" in line
    assert not (tmp_path / "fnet.onnx").exists()


def test_a_hand_edited_checkpoint_is_one_line_and_kept(tiny_finetuned, tmp_path):
    """Valid JSON and safetensors, but not this run's: shapes, NaN weights, a log that is not records."""
    from dataclasses import asdict
    model, data = tiny_finetuned
    saved = {"step": 2, "config": asdict(tiny(model, data, tmp_path, checkpoint_every=2)), "processes": 1,
             "model": {"head_gates.selector.logits": torch.zeros(8, dtype=torch.float64)}, "optimizer": {},
             "scheduler": {}, "history": [], "extra": {}, "seconds": {}}
    for i, (edit, message) in enumerate([
        ({"model": {"head_gates.selector.logits": torch.full((8,), float("nan"), dtype=torch.float64)}},
         "its weights hold NaN or infinite values"),
        ({"history": [1, 2]}, "its log holds rows that are not records"),
        ({"seconds": {"prune": "long"}}, "its seconds are not all numbers"),
        ({"extra": {"loss_since_log": "x"}}, "its loss since the last log row is not a sum and a count"),
        ({"model": {"head_gates.selector.logits": torch.zeros(5, dtype=torch.float64)}},
         r"does not fit this run's model or optimizer \(RuntimeError: .*size mismatch"),
    ]):
        again = tmp_path / f"again-{i}"
        again.mkdir()
        write_checkpoint(again, {**saved, **edit})
        with pytest.raises(CheckpointError, match=message):
            prune(tiny(model, data, again, checkpoint_every=2))
        assert (again / "checkpoint" / "state.json").is_file()


def test_yaml_reads_numbers_as_yaml_1_2_and_refuses_a_key_given_twice(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\npruning_lr: 2.5E+1\nk: 12\n")
    assert load_yaml(str(tmp_path / "c.yaml"), PruneConfig) == {"lr": 0.001, "pruning_lr": 25.0, "k": 12}
    (tmp_path / "twice.yaml").write_text("k: 3\nk: 4\n")
    from headprune.errors import ConfigError
    with pytest.raises(ConfigError, match="'k' is given twice"):
        load_yaml(str(tmp_path / "twice.yaml"), PruneConfig)


def test_a_parameter_budget_the_whole_model_fits_says_so(tiny_finetuned, tmp_path, caplog):
    model, data = tiny_finetuned
    results = prune(tiny(model, data, tmp_path / "o", method="random", k=None, target_params=1e12))
    assert results["k"] == 8
    assert "--target-params 1e+12: the unpruned model" in caplog.text and "every head is kept" in caplog.text
