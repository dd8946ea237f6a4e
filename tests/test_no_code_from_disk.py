"""Nothing read from a model folder runs code: custom code (`auto_map`) and pickled weights are
refused with one line, before transformers reads the folder, with or without a terminal."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
from conftest import one_line_error

from headprune.errors import ModelError
from headprune.pruning import load_pruned, save_pruned

EVIL_CODE = "import pathlib; pathlib.Path({marker!r}).touch()\n"


class Plant:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def with_custom_code(model, folder, marker, file="config.json"):
    shutil.copytree(model, folder)
    (folder / "modeling_evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    settings = json.loads((folder / file).read_text()) if (folder / file).exists() else {}
    settings["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                            "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (folder / file).write_text(json.dumps(settings))
    return folder


def cli(*args):
    # no terminal and no input: transformers' "run the custom code? [y/N]" must never be reached
    return subprocess.run([sys.executable, "-m", "headprune.cli", *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


def test_a_model_folder_with_custom_code_is_refused_without_a_terminal(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned
    marker = tmp_path / "ran"
    evil = with_custom_code(model, tmp_path / "evil", marker)
    run = cli("prune", "--model", evil, "--dataset", data, "--k", 3, "--output-dir", tmp_path / "out")
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == (
        f"headprune: error: {evil} asks to run code of its own (config.json has an auto_map); headprune never runs "
        "code from a model folder: use a model whose architecture transformers has")
    assert "Traceback" not in run.stderr and not marker.exists()


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_custom_code_is_refused_by_every_command_and_the_api(tiny_finetuned, tmp_path, capsys, file):
    model, data = tiny_finetuned
    marker = tmp_path / "ran"
    evil = with_custom_code(model, tmp_path / "evil", marker, file)
    expected = f"asks to run code of its own ({file} has an auto_map)"
    assert expected in one_line_error(capsys, ["finetune", "--model", evil, "--dataset", data, "--output-dir", tmp_path / "o"])
    assert expected in one_line_error(capsys, ["measure", "--pruned", evil, "--lengths", 8])
    with pytest.raises(ModelError, match="asks to run code of its own"):
        load_pruned(evil)
    assert not marker.exists()


def test_pickled_weights_are_refused_with_one_line_and_never_read(tiny_finetuned, tmp_path, capsys):
    model, data = tiny_finetuned
    marker = tmp_path / "ran"
    folder = tmp_path / "pickled"
    shutil.copytree(model, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Plant(marker)))
    line = one_line_error(capsys, ["prune", "--model", folder, "--dataset", data, "--k", 3, "--output-dir", tmp_path / "o"])
    assert line == (
        f"headprune: error: {folder} holds its weights only as a pickle (pytorch_model.bin), which headprune does "
        "not read (loading a pickle can run code); convert them to safetensors first")
    with pytest.raises(ModelError, match="only as a pickle"):
        load_pruned(folder)
    assert not marker.exists()


def test_a_saved_pruned_model_is_not_mistaken_for_either(tmp_path):
    from conftest import tiny_model
    save_pruned(tiny_model("bert"), tmp_path / "p", [("encoder", 0, 1), ("encoder", 1, 2)])
    assert load_pruned(tmp_path / "p") is not None
