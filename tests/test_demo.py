"""`headprune demo` reuses what an earlier demo made, and says so when today's defaults would prune
differently (it never overwrites the earlier results)."""
import json
import logging
from dataclasses import asdict

import pytest

import headprune.recipes as recipes
from headprune.errors import OutputExistsError


def test_a_demo_made_under_other_defaults_is_kept_and_named(tmp_path, monkeypatch, caplog):
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "results.json").write_text("{}")  # the fine-tuned model: reused

    def fake_prune(cfg):
        out = tmp_path / "dsp-pipelined-k36"
        out.mkdir()
        (out / "results.json").write_text(json.dumps({"config": asdict(cfg), "metrics_pruned": {"test": 0.5}}))
    monkeypatch.setattr(recipes, "prune", fake_prune)
    assert recipes.demo(tmp_path)["metrics_pruned"] == {"test": 0.5}
    with caplog.at_level(logging.WARNING, logger="headprune"):
        recipes.demo(tmp_path)  # the same defaults: reused quietly
    assert not caplog.records

    saved = tmp_path / "dsp-pipelined-k36" / "results.json"
    results = json.loads(saved.read_text())
    results["config"]["default_rules"] = 2  # made before DSP on text classifiers learned without dropout
    saved.write_text(json.dumps(results))
    monkeypatch.setattr(recipes, "prune", lambda cfg: (_ for _ in ()).throw(AssertionError("pruned again")))
    with caplog.at_level(logging.WARNING, logger="headprune"):
        assert recipes.demo(tmp_path)["metrics_pruned"] == {"test": 0.5}
    assert "made with other defaults (pruning_dropout (in effect): 'on' -> 'off')" in caplog.text
    saved.write_text('{"config": ')  # damaged: one line saying so, not a traceback
    with pytest.raises(OutputExistsError, match="dsp-pipelined-k36/results.json is damaged .*run the demo again"):
        recipes.demo(tmp_path)


def test_a_demo_phase_stopped_while_its_files_moved_in_is_completed_and_reused(tmp_path, monkeypatch):
    from headprune import outputs
    stage = tmp_path / "finetune" / outputs.STAGE
    stage.mkdir(parents=True)
    (stage / "results.json").write_text("{}")
    (stage / "commit.json").write_text(json.dumps({"files": ["results.json"], "in_place": []}))
    monkeypatch.setattr(recipes, "finetune", lambda cfg: pytest.fail("fine-tuned again"))
    monkeypatch.setattr(recipes, "prune", lambda cfg: (tmp_path / "dsp-pipelined-k36").mkdir()
                        or (tmp_path / "dsp-pipelined-k36" / "results.json").write_text('{"k": 36}'))
    assert recipes.demo(tmp_path) == {"k": 36} and (tmp_path / "finetune" / "results.json").is_file()


def test_a_demo_refused_before_it_wrote_anything_leaves_no_empty_folder(tmp_path, monkeypatch):
    """The translation demo without its dictionary: one line, and no empty --output-dir behind."""
    from pathlib import Path

    from headprune.errors import DataError

    def refused(cfg):  # as finetune: its own folder made, then removed when the data cannot be read
        Path(cfg.output_dir).mkdir(parents=True)
        Path(cfg.output_dir).rmdir()
        raise DataError("offline:ding-de-en needs Debian's trans-de-en")
    monkeypatch.setattr(recipes, "finetune", refused)
    with pytest.raises(DataError):
        recipes.demo(tmp_path / "demo", task="translation")
    assert not (tmp_path / "demo").exists()
