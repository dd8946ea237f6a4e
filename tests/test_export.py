"""headprune export (issue 22): an uneven pruned classifier, an empty layer among them, runs in ONNX
Runtime with PyTorch's outputs at any batch and length; bad input is refused in one line."""
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import one_line_error, tiny_model
from headprune.cli import main
from headprune.export import sample_inputs
from headprune.pruning import load_pruned, save_pruned


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pruned") / "model"
    model = tiny_model("bert", layers=3)
    save_pruned(model, folder, [("encoder", 0, 1), ("encoder", 0, 2), ("encoder", 2, 3)])  # layer 1: no head
    return folder


def test_a_pruned_classifier_runs_in_onnx_runtime_as_in_pytorch(pruned, tmp_path):
    import onnxruntime
    out = tmp_path / "model.onnx"
    assert main(["export", "--model", str(pruned), "--output", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # BERT's segments too: a classifier of sentence pairs reads which text each token is from
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    model = load_pruned(pruned)
    for shape in ((4, 21), (1, 3)):  # batch and length are free
        inputs = sample_inputs(model.config, *shape, seed=7)
        assert inputs["token_type_ids"][0].tolist() == [0] * (shape[1] // 2) + [1] * (shape[1] - shape[1] // 2)
        with torch.no_grad():
            expected = model(**inputs).logits.numpy()
            one_text = model(**{**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"])}).logits.numpy()
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        assert np.abs(got - expected).max() < 1e-4 < np.abs(one_text - expected).max()


def test_a_pruned_deberta_v1_runs_in_onnx_runtime_as_in_pytorch(tmp_path):
    import onnxruntime
    from test_deberta_heads import KEPT, tiny_deberta_v1  # relative positions; the q and v biases apart
    save_pruned(tiny_deberta_v1(), tmp_path / "model", KEPT)
    assert main(["export", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "model.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    model = load_pruned(tmp_path / "model")
    names = [i.name for i in session.get_inputs()]
    for shape in ((4, 21), (1, 3)):
        inputs = sample_inputs(model.config, *shape, seed=7)
        with torch.no_grad():
            expected = model(**inputs).logits.numpy()
        got = session.run(None, {k: v.numpy() for k, v in inputs.items() if k in names})[0]
        assert np.abs(got - expected).max() < 1e-4


def test_export_refuses_bad_input_in_one_line(pruned, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    assert "exists: give --overwrite" in one_line_error(capsys, ["export", "--model", pruned, "--output", out])
    assert out.read_bytes() == b"an earlier export"
    assert "export needs --model" in one_line_error(capsys, ["export", "--output", out])
    assert "is a folder: --output names the file" in one_line_error(capsys, [
        "export", "--model", pruned, "--output", f"{tmp_path / 'new'}/"])
    assert "no such model folder" in one_line_error(capsys, ["export", "--model", tmp_path / "none", "--output", tmp_path / "x.onnx"])
    (tmp_path / "empty").mkdir()  # an empty folder: told so, as measure tells it (not transformers' model_type text)
    for command in (["export", "--model", tmp_path / "empty", "--output", tmp_path / "x.onnx"],
                    ["export", "--format", "gguf", "--model", tmp_path / "empty", "--output", tmp_path / "x.gguf"]):
        assert one_line_error(capsys, command).endswith(f"{tmp_path / 'empty'} holds no config.json: not a model folder")
    # a missing parent is probed at the nearest folder that exists, not the working folder
    (tmp_path / "a-file").write_text("")
    line = one_line_error(capsys, ["export", "--model", pruned, "--output", tmp_path / "a-file" / "new" / "m.onnx"])
    assert "cannot write to the output folder" in line and "a-file" in line
    # inside the model's own folder: its weights would be replaced, or files added to it
    weights = Path(pruned) / "model.safetensors"
    before = weights.read_bytes()
    for inside in (weights, Path(pruned) / "m.onnx"):
        line = one_line_error(capsys, ["export", "--model", pruned, "--output", inside, "--overwrite"])
        assert "lies inside the model folder" in line
    assert weights.read_bytes() == before and not (Path(pruned) / "m.onnx").exists()
    (tmp_path / "a-folder").mkdir()
    assert "is a folder: --output names the file" in one_line_error(capsys, ["export", "--model", pruned, "--output",
                                                                            tmp_path / "a-folder"])


def test_a_missing_optional_package_is_one_line_before_any_work(pruned, tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("onnxruntime", "gguf") else real(name, *a))
    line = one_line_error(capsys, ["export", "--model", pruned, "--output", tmp_path / "m.onnx"])
    assert line.endswith("this needs onnxruntime: pip install 'headprune[onnx]' (or pip install onnxruntime)")
    line = one_line_error(capsys, ["export", "--format", "gguf", "--model", pruned, "--output", tmp_path / "m.gguf"])
    assert line.endswith("this needs gguf: pip install 'headprune[llm]' (or pip install gguf)")
    line = one_line_error(capsys, ["measure", "--pruned", pruned, "--runtime", "onnxruntime", "--lengths", "16"])
    assert "this needs onnxruntime" in line
    assert not list(tmp_path.iterdir())


def test_export_makes_the_missing_folders_of_its_output(pruned, tmp_path):
    out = tmp_path / "new" / "deeper" / "model.onnx"
    assert main(["export", "--model", str(pruned), "--output", str(out)]) == 0
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["model.onnx"]


def test_models_it_cannot_export_yet_are_named(tmp_path, capsys):
    from conftest import write_tiny_lm
    model, _ = write_tiny_lm(tmp_path / "lm")
    line = one_line_error(capsys, ["export", "--model", model, "--output", tmp_path / "lm.onnx"])
    assert "LlamaForCausalLM model: the ONNX export takes classifiers built on an encoder" in line
    assert not (tmp_path / "lm.onnx").exists()
    from transformers import LlamaConfig, LlamaForSequenceClassification  # a classifier, but on decoder layers
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=37, vocab_size=99, pad_token_id=0)
    save_pruned(LlamaForSequenceClassification(config), tmp_path / "cls", [("decoder", 0, 0), ("decoder", 1, 1)])
    for command in (["export", "--model", tmp_path / "cls", "--output", tmp_path / "cls.onnx"],
                    ["measure", "--pruned", tmp_path / "cls", "--runtime", "onnxruntime", "--lengths", "8"]):
        line = one_line_error(capsys, command)
        assert "LlamaForSequenceClassification model, whose layers are decoder layers: the ONNX export" in line
    assert not (tmp_path / "cls.onnx").exists()


def test_measure_times_both_models_in_onnx_runtime(pruned):
    from headprune.config import MeasureConfig
    from headprune.measuring import markdown, measure
    result = measure(MeasureConfig(pruned=str(pruned), runtime="onnxruntime", batch_sizes=[2], lengths=[16],
                                   repeats=2, warmup=0, threads=1), progress=lambda line: None)
    (row,) = result["settings"]
    assert result["runtime"] == "onnxruntime" and result["heads"] == {"original": 12, "pruned": 3}
    assert row["predicted_speedup"] > 1 and row["speedup"] > 0 and set(row["seconds"]) == {"original", "pruned"}
    assert "ONNX Runtime (CPU provider" in markdown(result)


def test_measure_in_onnx_runtime_refuses_what_it_cannot_run(tmp_path):
    from conftest import write_tiny_lm
    from headprune.config import MeasureConfig
    from headprune.errors import ConfigError
    from headprune.measuring import measure
    model, _ = write_tiny_lm(tmp_path / "lm")
    with pytest.raises(ConfigError, match="--runtime onnxruntime measures encoder classifiers of text or images"):
        measure(MeasureConfig(pruned=str(model), runtime="onnxruntime"))


@pytest.mark.parametrize("arch", ["vit", "deit", "swin"])
def test_a_pruned_image_classifier_runs_in_onnx_runtime_as_in_pytorch(arch, tmp_path):
    """Pixels in, dynamic batch; ViT and DeiT with a layer left without heads, Swin with its shifted
    windows and position bias tables sliced per head."""
    import onnxruntime
    from test_image_classification import tiny_swin, tiny_vit

    from headprune.export import sample_pixels
    model, kept = (tiny_vit(arch=arch), [("encoder", 0, 1), ("encoder", 0, 2), ("encoder", 2, 3)]) if arch != "swin" \
        else (tiny_swin(), [("encoder", 0, 1), ("encoder", 2, 0), ("encoder", 2, 3), ("encoder", 3, 1)])
    save_pruned(model, tmp_path / "model", kept)
    assert main(["export", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "model.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    loaded = load_pruned(tmp_path / "model")
    for batch in (5, 1):
        pixels = sample_pixels(loaded.config, batch, seed=7)
        with torch.no_grad():
            expected = loaded(**pixels).logits.numpy()
        got = session.run(None, {k: v.numpy() for k, v in pixels.items()})[0]
        assert got.shape == (batch, 3) and np.abs(got - expected).max() < 1e-4


def test_measure_times_a_pruned_vit_in_onnx_runtime(tmp_path):
    from test_image_classification import tiny_vit

    from headprune.config import MeasureConfig
    from headprune.measuring import measure
    save_pruned(tiny_vit(), tmp_path / "model", [("encoder", 0, 1), ("encoder", 0, 2), ("encoder", 2, 3)])
    result = measure(MeasureConfig(pruned=str(tmp_path / "model"), runtime="onnxruntime", batch_sizes=[2],
                                   repeats=2, warmup=0, threads=1), progress=lambda line: None)
    (row,) = result["settings"]
    assert result["heads"] == {"original": 12, "pruned": 3} and row["length"] == 17  # 16 patches and the class token
    assert row["predicted_speedup"] > 1 and row["speedup"] > 0 and set(row["seconds"]) == {"original", "pruned"}


def test_an_opset_the_exporter_cannot_convert_to_is_refused_not_swapped(pruned, tmp_path, capsys):
    """torch's exporter writes its own opset (18) when it cannot convert down, and says so only in
    its log: the file would not be what was asked for."""
    line = one_line_error(capsys, ["export", "--model", pruned, "--output", tmp_path / "m.onnx", "--opset", "13"])
    assert "--opset 13: torch's exporter could not convert this model to it (it wrote opset 18): not written" in line
    assert not list(tmp_path.iterdir())


def test_a_large_graphs_weights_move_into_place_beside_it(pruned, tmp_path, monkeypatch):
    """Past 2 GB torch writes the weights to `<file>.data` beside the graph, which names it: both
    move into place (the weights were left under the temporary name the graph named), an earlier
    export's weights are replaced, and a killed export's temporary folder goes."""
    import onnx
    import onnxruntime
    import torch.onnx._internal.exporter._onnx_program as program
    monkeypatch.setattr(program, "_LARGE_MODEL_THRESHOLD", 0)  # every graph is "large"
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    (out.parent / ".model.onnx.abc123.tmp").mkdir()  # what a killed export leaves
    for _ in range(2):
        assert main(["export", "--model", str(pruned), "--output", str(out), "--overwrite"]) == 0
        assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
        graph = onnx.load(str(out), load_external_data=False)
        assert {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"} == \
            {"model.onnx.data"}
    moved = tmp_path / "elsewhere"  # a user ships the two files together
    moved.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        (moved / name).write_bytes((out.parent / name).read_bytes())
    inputs = sample_inputs(load_pruned(pruned).config, 2, 9, seed=3)
    got = onnxruntime.InferenceSession(str(moved / "model.onnx")).run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        assert np.abs(got[0] - load_pruned(pruned)(**inputs).logits.numpy()).max() < 1e-4
    monkeypatch.setattr(program, "_LARGE_MODEL_THRESHOLD", 2 ** 31)  # small again: the stale weights go
    assert main(["export", "--model", str(pruned), "--output", str(out), "--overwrite"]) == 0
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]


def test_an_output_deeper_inside_the_model_folder_is_refused(pruned, capsys):  # noqa: F811
    inside = Path(pruned) / "onnx" / "deeper" / "m.onnx"
    line = one_line_error(capsys, ["export", "--model", pruned, "--output", inside])
    assert "lies inside the model folder" in line
    assert not (Path(pruned) / "onnx").exists()



def test_the_sample_inputs_pad_the_last_sequence_as_a_tokenizer_does():
    # the ONNX check compares padded batches too: a graph that mishandled the mask would differ there
    from types import SimpleNamespace

    import torch

    from headprune.export import sample_inputs
    inputs = sample_inputs(SimpleNamespace(vocab_size=50, type_vocab_size=2), batch=3, length=8, seed=0)
    mask = inputs["attention_mask"]
    assert mask[:2].eq(1).all() and mask[2, :4].eq(1).all() and mask[2, 4:].eq(0).all()
    # two texts: the second half is segment 1, padding segment 0
    assert inputs["token_type_ids"].tolist() == [[0] * 4 + [1] * 4] * 2 + [[0] * 8]
    assert inputs["input_ids"].min() >= 10 and inputs["input_ids"].max() < 50
    one = sample_inputs(SimpleNamespace(vocab_size=50), batch=1, length=8, seed=0)
    assert set(one) == {"input_ids", "attention_mask"} and one["attention_mask"].eq(1).all()
    assert torch.equal(sample_inputs(SimpleNamespace(vocab_size=50), 3, 8, 0)["input_ids"], inputs["input_ids"])
