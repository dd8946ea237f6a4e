"""--pruning-dropout: while trained scores learn, the model runs without dropout (evaluation mode)
and the selector still relaxes its choice (training mode); the default takes dropout out for
pipelined DSP on text classifiers only, and a run saved under the earlier rules reads as one with it."""
import pytest
import torch

import headprune.recipes as recipes
from conftest import tiny
from headprune.config import PruneConfig, pruning_dropout_in_effect
from headprune.recipes import prune
from headprune.train import changed_settings


def test_the_default_is_off_for_pipelined_dsp_on_text_classifiers_only():
    assert pruning_dropout_in_effect(vars(PruneConfig())) == "off"
    assert pruning_dropout_in_effect(vars(PruneConfig(method="ste"))) == "on"
    assert pruning_dropout_in_effect(vars(PruneConfig(method="voita"))) == "on"
    assert pruning_dropout_in_effect(vars(PruneConfig(mode="joint"))) == "on"
    assert pruning_dropout_in_effect(vars(PruneConfig(task="translation"))) == "on"
    assert pruning_dropout_in_effect(vars(PruneConfig(task="causal-lm"))) == "on"
    assert pruning_dropout_in_effect(vars(PruneConfig(task="image-classification"))) == "on"
    assert pruning_dropout_in_effect(vars(PruneConfig(default_rules=2))) == "on"
    assert pruning_dropout_in_effect(vars(PruneConfig(pruning_dropout="on"))) == "on"
    assert pruning_dropout_in_effect(vars(PruneConfig(method="ste", pruning_dropout="off"))) == "off"
    assert pruning_dropout_in_effect({"task": "classification", "method": "dsp"}) == "on"  # saved before


def test_a_run_made_with_dropout_is_not_read_as_the_default_now():
    now = PruneConfig()
    before = {k: v for k, v in vars(now).items() if k not in ("pruning_dropout", "default_rules")}
    assert changed_settings(before, now) == {"pruning_dropout (in effect)": ("on", "off")}
    assert changed_settings(before, PruneConfig(default_rules=2)) == {}
    assert changed_settings(before, PruneConfig(pruning_dropout="on")) == {}
    assert changed_settings({**vars(now), "pruning_dropout": "off"}, now) == {}  # what the default chose


@pytest.mark.parametrize("setting, dropout_on", [("default", False), ("on", True)])
def test_the_scores_learn_with_the_dropout_asked_and_a_relaxed_mask(tiny_finetuned, tmp_path, monkeypatch,
                                                                     setting, dropout_on):
    seen = []
    learn = recipes.pruning_loss

    def recording(cfg, task, gates):
        loss = learn(cfg, task, gates)

        def step(model, batch):
            dropouts = [m.training for m in model.modules() if isinstance(m, torch.nn.Dropout)]
            mask = gates()
            seen.append((set(dropouts), gates.selector.training, bool(((mask > 0) & (mask < 1)).any())))
            return loss(model, batch)
        return step

    monkeypatch.setattr(recipes, "pruning_loss", recording)
    results = prune(tiny(*tiny_finetuned, tmp_path / "out", pruning_dropout=setting))
    assert results["pruning_dropout"] == ("on" if dropout_on else "off")
    assert len(seen) == results["steps"]
    assert all(dropouts == {dropout_on} and selector_training for dropouts, selector_training, _ in seen)
    assert seen[0][2]  # the first step's mask is soft: the selector relaxes its choice, not its hard top-k
    assert ("dropout off" in (tmp_path / "out" / "report.md").read_text()) is not dropout_on
