"""headprune's caches (scores of scored methods, metrics of unpruned models) stay bounded: the
newest entries are kept."""
import json
import os

import headprune.digests as digests
from headprune.outputs import drop_oldest
from headprune.config import PruneConfig
from headprune.digests import metrics_key


def test_the_scores_cache_keeps_the_newest_entries(tmp_path):
    for age, name in enumerate(["newest", "middle", "oldest"]):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
    (tmp_path / "not-an-entry.txt").write_text("kept")
    drop_oldest(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["middle.safetensors", "newest.safetensors", "not-an-entry.txt"]


def test_the_scores_cache_stays_within_its_bytes_the_newest_entry_always_kept(tmp_path):
    for age, (name, size) in enumerate([("newest", 600), ("middle", 300), ("oldest", 200)]):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(b"x" * size)
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
    drop_oldest(tmp_path, keep=10, max_bytes=1000)  # 600 + 300 fit; 200 more do not
    assert sorted(p.name for p in tmp_path.iterdir()) == ["middle.safetensors", "newest.safetensors"]
    drop_oldest(tmp_path, keep=10, max_bytes=100)  # the newest stays, however large
    assert [p.name for p in tmp_path.iterdir()] == ["newest.safetensors"]


def test_the_metrics_cache_keeps_the_newest_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(digests, "METRICS_KEPT", 2)
    for value, key in enumerate(("a", "b", "c")):
        digests.remember_metrics(key, {"accuracy": value})
    assert digests.cached_metrics("a") is None and digests.cached_metrics("c") == {"accuracy": 2}
    digests.remember_metrics("b", {"accuracy": 0.5})  # written again: the newest now
    digests.remember_metrics("d", {"accuracy": 0.25})
    assert list(json.loads((tmp_path / "unpruned-metrics.json").read_text())) == ["b", "d"]


def test_a_damaged_metrics_cache_is_computed_again_not_handed_to_a_run(tmp_path, monkeypatch):
    """A run would crash on an entry that is not {split: number}, after its work (its report)."""
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path))
    cache = tmp_path / "unpruned-metrics.json"
    cache.write_text("[1, 2]")  # not an object
    assert digests.cached_metrics("a") is None
    digests.remember_metrics("a", {"validation": 0.75})
    assert digests.cached_metrics("a") == {"validation": 0.75}
    cache.write_text(json.dumps({"a": "0.75", "b": {"validation": "high"}, "c": {}, "d": {"validation": True},
                                 "e": {"validation": 0.5, "test": 0.25}}))
    assert [digests.cached_metrics(key) for key in "abcde"] == [None] * 4 + [{"validation": 0.5, "test": 0.25}]


def test_the_scores_key_holds_what_a_scorer_reads_and_nothing_else():
    import dataclasses
    import torch
    from headprune.selection import fit_key, pass_key
    cfg = PruneConfig(model="some/folder", dataset="some.csv", method="activation", k=2)
    key = pass_key(cfg, "weights", "calibration")
    # another copy of the same weights and files, evaluation, training and another method's options
    for same in ({"model": "another/copy"}, {"eval_batch_size": 7}, {"max_eval_examples": 9}, {"epochs": 9},
                 {"lr": 0.5}, {"checkpoint_every": 9}, {"michel_step": 3}, {"taylor_variant": "vector"},
                 {"pruning_dropout": "on"}, {"k": 5}):
        assert pass_key(dataclasses.replace(cfg, **same), "weights", "calibration") == key, same
    for other in ({"batch_size": 7}, {"activation_aggregation": "mean"}, {"dtype": "bfloat16"},
                  {"attn_implementation": "sdpa"}):
        assert pass_key(dataclasses.replace(cfg, **other), "weights", "calibration") != key, other
    assert pass_key(cfg, "other weights", "calibration") != key != pass_key(cfg, "weights", "other calibration")
    mask = torch.ones(4)
    fits = fit_key(cfg, "weights", "calibration", mask, "rescale")
    assert fit_key(dataclasses.replace(cfg, eval_batch_size=7), "weights", "calibration", mask, "rescale") == fits
    assert fit_key(cfg, "weights", "calibration", mask, "both") != fits


def test_the_scores_key_changes_with_code_a_scorer_borrows(tmp_path, monkeypatch):
    """Fisher's gradients come from michel.py: a change there is a change of Fisher's scores."""
    from pathlib import Path

    from headprune.config import PruneConfig
    from headprune.methods import michel, scoring
    from headprune.selection import pass_key
    methods = tmp_path / "methods"
    methods.mkdir()
    for path in Path(scoring.__file__).parent.glob("*.py"):
        (methods / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(scoring, "__file__", str(methods / "scoring.py"))
    cfg = PruneConfig(model="some/folder", dataset="some.csv", method="fisher", k=2)
    before = pass_key(cfg, "weights-digest", "calibration-digest")
    assert before == pass_key(cfg, "weights-digest", "calibration-digest")
    (methods / Path(michel.__file__).name).write_text("# changed\n")
    assert pass_key(cfg, "weights-digest", "calibration-digest") != before


def test_the_unpruned_metrics_key_changes_with_the_evaluation_data_and_the_weights(tmp_path):
    """The same weights measured on other evaluation data (another file, --max-eval-examples) is
    another metric: it must not be read back from the cache."""
    (tmp_path / "config.json").write_text("{}")
    cfg = PruneConfig(model="folder")
    key = metrics_key({"model": "weights", "evaluation data": "data"}, cfg, str(tmp_path))
    assert key is not None
    assert metrics_key({"model": "weights", "evaluation data": "other data"}, cfg, str(tmp_path)) != key
    assert metrics_key({"model": "other weights", "evaluation data": "data"}, cfg, str(tmp_path)) != key
    assert metrics_key({"model": "weights", "evaluation data": "data"}, PruneConfig(model="folder"), str(tmp_path)) == key
    # the files beside the weights: the config, the generation config and the tokenizer (translations
    # decode with them), but not the model card
    inputs = {"model": "weights", "evaluation data": "data"}
    (tmp_path / "README.md").write_text("a card measure --card wrote")
    assert metrics_key(inputs, cfg, str(tmp_path)) == key
    for name, text in (("config.json", '{"hidden_act": "relu"}'), ("generation_config.json", '{"num_beams": 1}'),
                       ("tokenizer.json", '{"decoder": null}')):
        (tmp_path / name).write_text(text)
        assert metrics_key(inputs, cfg, str(tmp_path)) != key
        key = metrics_key(inputs, cfg, str(tmp_path))


def test_records_of_passes_never_started_again_do_not_pile_up(tiny_finetuned, tmp_path, monkeypatch):
    """A scoring pass stopped midway leaves `<key>.partial` for its run to go on from; a pass that
    starts keeps the newest RECORDS_KEPT of them, RECORDS_BYTES in all, and removes the older ones
    (and its own when whole)."""
    import headprune.selection as selection
    from conftest import tiny
    from headprune.recipes import prune
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "scores"
    folder.mkdir(parents=True)
    for kept, limits in ((["newest"], {"RECORDS_KEPT": 1}), (["middle", "newest"], {"RECORDS_BYTES": 5})):
        for entry in folder.glob("*.safetensors"):  # the scores of the run before: this run scores
            entry.unlink()
        for age, name in enumerate(["newest", "middle", "oldest"]):
            (folder / f"{name}.partial").write_bytes(b"x" * 2)
            os.utime(folder / f"{name}.partial", (1_000_000 - age, 1_000_000 - age))
        with monkeypatch.context() as patch:
            for name, value in limits.items():
                patch.setattr(selection, name, value)
            prune(tiny(*tiny_finetuned, tmp_path / "run", method="activation", overwrite=True))
        assert sorted(p.stem for p in folder.glob("*.partial")) == kept


def test_a_digest_of_weights_in_memory_tells_every_bit_and_dtype():
    import copy
    import torch
    from headprune.digests import digest_of_model
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    same = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    same.load_state_dict(model.state_dict())
    assert digest_of_model(model) == digest_of_model(same)
    with torch.no_grad():
        same[1].bias.copy_(torch.nextafter(same[1].bias, torch.tensor(1.0)))  # one bit of one weight
    assert digest_of_model(model) != digest_of_model(same)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert digest_of_model(half) != digest_of_model(model) and digest_of_model(half) == digest_of_model(half)
    # the same bytes under another shape are other weights
    reshaped = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    reshaped.load_state_dict(model.state_dict())
    with torch.no_grad():
        reshaped[0].weight = torch.nn.Parameter(model[0].weight.detach().reshape(3, 2).clone())
    assert digest_of_model(reshaped) != digest_of_model(model)


def test_the_model_files_are_its_configs_and_tokenizer_not_what_else_the_folder_holds(tmp_path):
    from headprune.digests import digest_of_model_files
    (tmp_path / "config.json").write_text("{}")
    before = digest_of_model_files(str(tmp_path))
    for name in ("README.md", "eval_results.json", "LICENSE.txt", "model.onnx", "model.gguf", "model.safetensors"):
        (tmp_path / name).write_text("beside the model")
    assert digest_of_model_files(str(tmp_path)) == before
    for name in ("generation_config.json", "tokenizer_config.json", "tokenizer.json", "vocab.txt", "spiece.model"):
        (tmp_path / name).write_text("read with the model")
        assert digest_of_model_files(str(tmp_path)) != before
        before = digest_of_model_files(str(tmp_path))
    assert digest_of_model_files("some/hub-id") is None
