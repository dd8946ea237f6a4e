"""The kept-heads record of a physically pruned model is checked against the model whether or not
it carries its checksum: well formed, heads that exist, none twice, a class transformers has."""
import json

import pytest

from conftest import tiny_model
from headprune.cli import main
from headprune.errors import ConfigError, PrunedCheckpointError
from headprune.pruning import heads_checksum, load_pruned, save_pruned

KEPT = [("encoder", 0, 1), ("encoder", 0, 3), ("encoder", 1, 2)]


@pytest.fixture
def saved(tmp_path):
    save_pruned(tiny_model("bert", layers=2), tmp_path / "p", KEPT)
    return tmp_path / "p"


def edit(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_the_record_as_saved_loads(saved):
    assert load_pruned(saved).config.headprune["kept_heads"] == [list(h) for h in KEPT]


def with_checksum(heads):
    def change(config):
        config["headprune"]["kept_heads"] = heads
        config["headprune"]["kept_heads_sha256"] = heads_checksum(heads)  # as a careful forger would
    return change


@pytest.mark.parametrize("change,message", [
    (lambda c: c["headprune"].pop("kept_heads_sha256"), "has no checksum"),
    (lambda c: c["headprune"].update(kept_heads=[["encoder", 0, 0], ["encoder", 0, 3], ["encoder", 1, 2]]),
     "does not match its checksum"),
    (with_checksum([["encoder", 0, 1], ["encoder", 0, 3], ["encoder", 1, 2], ["bogus", 1, 2]]),
     "names bogus head 2 of layer 1, which the model does not have"),
    (with_checksum([["encoder", 0, 1], ["encoder", 0, 1], ["encoder", 1, 2]]), "names a head more than once"),
    (with_checksum([["encoder", 0, 1], ["encoder", 0, 3], ["encoder", 1, 4]]),
     "names encoder head 4 of layer 1, which the model does not have"),
    (with_checksum([["encoder", 0, 1], ["encoder", 0, 3], ["encoder", 1, "2"]]), "malformed kept head"),
    (lambda c: c["headprune"].update(unit="row"), "unknown unit 'row'"),
    (lambda c: c.update(headprune=[1, 2]), r"is malformed \(no list of kept_heads\)"),
    (lambda c: c["headprune"].pop("kept_heads"), r"is malformed \(no list of kept_heads\)"),
])
def test_an_edited_record_is_refused_with_or_without_its_checksum(saved, change, message):
    edit(saved, change)
    with pytest.raises(PrunedCheckpointError, match=message + ".*restore the config.json that headprune wrote"):
        load_pruned(saved)


def test_other_heads_with_the_same_counts_are_refused_by_their_checksum_or_by_the_weights(saved):
    edit(saved, with_checksum([["encoder", 0, 0], ["encoder", 0, 2], ["encoder", 1, 2]]))
    model = load_pruned(saved)  # same shapes, a recomputed checksum: only the numbering differs
    assert model.config.headprune["kept_heads"][0] == ["encoder", 0, 0]
    edit(saved, with_checksum([["encoder", 0, 0], ["encoder", 1, 1], ["encoder", 1, 2]]))  # other counts per layer
    with pytest.raises(PrunedCheckpointError, match="do not match the heads its config.json records"):
        load_pruned(saved)


def test_pruning_an_edited_model_again_is_refused_before_loading(saved, tmp_path, capsys):
    edit(saved, lambda c: c["headprune"].pop("kept_heads_sha256"))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"w{i}", "label": i % 3}) for i in range(30)))
    assert main(["prune", "--model", str(saved), "--dataset", str(tmp_path / "d.jsonl"), "--k", "2",
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "has no checksum" in capsys.readouterr().err


def test_an_architecture_that_is_not_a_model_class_is_refused(saved, capsys):
    edit(saved, lambda c: c.update(architectures=["pipeline"]))
    with pytest.raises(PrunedCheckpointError, match="names the architecture 'pipeline', which is not a model class"):
        load_pruned(saved)
    assert main(["measure", "--pruned", str(saved), "--lengths", "8"]) == 2
    assert "not a model class of transformers" in capsys.readouterr().err


def test_measure_refuses_an_original_of_another_architecture(saved, tmp_path, capsys):
    from conftest import write_tiny_lm
    llama, _ = write_tiny_lm(tmp_path / "lm", n_train=2, n_eval=2)
    assert main(["measure", "--pruned", str(saved), "--original", str(llama), "--lengths", "8", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--original {llama} is not the model {saved} was pruned from: model llama (pruned model: bert)" in err
    assert "Traceback" not in err
    tiny_model("bert", layers=3).save_pretrained(tmp_path / "deeper")
    assert main(["measure", "--pruned", str(saved), "--original", str(tmp_path / "deeper"), "--lengths", "8", "--repeats", "1"]) == 2
    assert "layers 3 (pruned model: 2)" in capsys.readouterr().err


def test_a_malformed_config_is_one_line(saved, capsys):
    (saved / "config.json").write_text("{not json")
    assert main(["measure", "--pruned", str(saved)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("headprune: error: cannot read")


def test_seeds_out_of_range_and_a_yaml_file_that_is_not_utf8(tmp_path, capsys):
    for seed, message in ((-1, "seed=-1: must be at least 0"), (2**32, f"seed={2**32}: must be less than {2**32}")):
        assert main(["finetune", "--seed", str(seed)]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "c.yaml").write_bytes(b"k: 3\ndataset: caf\xe9\n")
    assert main(["prune", "--config", str(tmp_path / "c.yaml")]) == 2
    assert f"config file {tmp_path / 'c.yaml'}: not UTF-8 text (byte 17)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not both"):
        from headprune.config import PruneConfig
        PruneConfig(k=3, k_per_kind=[1])
