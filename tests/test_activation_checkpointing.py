"""--activation-checkpointing: the layers' activations are recomputed in the backward pass while the
model trains, and the run learns exactly what it learns without (the recomputed layers see the same
mask and the same dropout); refused in one line where it would do nothing or cannot run."""
import json

import pytest
import torch
import transformers.modeling_utils
from conftest import tiny, tiny_model, write_tiny_lm
from test_causal_lm import lm_cfg

from headprune.config import PruneConfig, SweepConfig
from headprune.errors import ConfigError
from headprune.recipes import prune
from headprune.train import activation_checkpointing, changed_settings


@pytest.fixture
def recomputed(monkeypatch):
    """Counts the layers transformers runs under torch's checkpoint."""
    calls = []
    real = transformers.modeling_utils.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)
    return calls


def scores(folder):
    return [head["logit"] for head in json.loads((folder / "head_scores.json").read_text())]


def test_refused_where_the_model_does_not_train_in_training_mode():
    with pytest.raises(ConfigError, match="--pruning-dropout on"):
        PruneConfig(activation_checkpointing=True)  # pipelined dsp on a classifier: dropout off by default
    with pytest.raises(ConfigError, match="michel score the model in evaluation mode"):
        PruneConfig(method="michel", activation_checkpointing=True)
    with pytest.raises(ConfigError, match="fisher, michel score the model"):
        SweepConfig(methods=["fisher", "michel"], activation_checkpointing=True, pruning_dropout="on")
    with pytest.raises(ConfigError, match="add --pruning-dropout on"):
        SweepConfig(methods=["dsp", "fisher"], activation_checkpointing=True)
    PruneConfig(activation_checkpointing=True, pruning_dropout="on")
    PruneConfig(method="ste", activation_checkpointing=True)
    PruneConfig(mode="joint", activation_checkpointing=True)
    PruneConfig(task="causal-lm", activation_checkpointing=True)


def test_a_sweep_passes_it_to_the_runs_where_it_acts(tmp_path):
    from headprune.sweep import planned_runs
    runs = planned_runs(SweepConfig(methods=["dsp", "fisher", "ste"], modes=["pipelined", "joint"], ks=[3],
                                    activation_checkpointing=True, output_dir=str(tmp_path)))
    acting = {(run.method, run.mode): run.activation_checkpointing for run in runs}
    # pipelined dsp learns without dropout by default (evaluation mode); fisher trains nothing
    assert acting == {("dsp", "pipelined"): False, ("dsp", "joint"): True, ("fisher", "pipelined"): False,
                      ("ste", "pipelined"): True, ("ste", "joint"): True}


def test_a_run_resumes_or_is_reused_with_it_switched_on():  # e.g. after running out of memory
    before = vars(PruneConfig(pruning_dropout="on"))
    assert changed_settings(before, PruneConfig(pruning_dropout="on", activation_checkpointing=True)) == {}


def test_switched_on_while_training_and_off_after():
    model = tiny_model()
    with activation_checkpointing(model, True):
        assert model.is_gradient_checkpointing
    assert not model.is_gradient_checkpointing
    with activation_checkpointing(model, False):
        assert not model.is_gradient_checkpointing


@pytest.mark.parametrize("settings", [dict(pruning_dropout="on"), dict(mode="joint")])
def test_a_classifier_learns_the_same_scores_with_it(tiny_finetuned, tmp_path, recomputed, settings):
    plain = prune(tiny(*tiny_finetuned, tmp_path / "plain", **settings))
    assert not recomputed
    checkpointed = prune(tiny(*tiny_finetuned, tmp_path / "checkpointed", activation_checkpointing=True, **settings))
    assert len(recomputed) == 2 * checkpointed["steps"]  # both layers of the tiny BERT, every step
    assert checkpointed["kept_heads"] == plain["kept_heads"]
    assert checkpointed["metrics_pruned"] == pytest.approx(plain["metrics_pruned"], abs=1e-6)
    learned = scores(tmp_path / "plain")
    assert len(set(learned)) == len(learned)  # the scores moved from their common start
    assert scores(tmp_path / "checkpointed") == pytest.approx(learned, abs=1e-6)


def test_a_language_model_learns_the_same_kv_groups_with_it(tmp_path, recomputed):
    model, data = write_tiny_lm(tmp_path / "lm")
    plain = prune(lm_cfg(model, data, tmp_path / "plain"))
    checkpointed = prune(lm_cfg(model, data, tmp_path / "checkpointed", activation_checkpointing=True))
    assert len(recomputed) == 3 * checkpointed["steps"]  # the tiny Llama's 3 layers
    assert checkpointed["kept_heads"] == plain["kept_heads"]
    assert checkpointed["metrics_pruned"]["validation"] == pytest.approx(plain["metrics_pruned"]["validation"],
                                                                         rel=1e-5)


def test_a_model_transformers_cannot_checkpoint_is_refused_before_training(tiny_finetuned, tmp_path, monkeypatch):
    from transformers import BertForSequenceClassification
    monkeypatch.setattr(BertForSequenceClassification, "supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError, match="no activation checkpointing for BertForSequenceClassification"):
        prune(tiny(*tiny_finetuned, tmp_path / "out", pruning_dropout="on", activation_checkpointing=True))
    assert not (tmp_path / "out" / "results.json").exists()
    assert torch.is_grad_enabled()


def test_fine_tuning_trains_the_same_weights_with_it(tiny_assets, tmp_path, recomputed):
    from safetensors.torch import load_file

    from headprune.config import FinetuneConfig
    from headprune.recipes import finetune
    model, data = tiny_assets
    for name, on in (("plain", False), ("checkpointed", True)):
        finetune(FinetuneConfig(model=str(model), dataset=str(data), epochs=1, batch_size=16, checkpoint_every=0,
                                output_dir=str(tmp_path / name), activation_checkpointing=on))
    assert recomputed  # the second run's layers ran under torch's checkpoint
    plain, checkpointed = (load_file(str(tmp_path / name / "model" / "model.safetensors"))
                           for name in ("plain", "checkpointed"))
    start = load_file(str(model / "model.safetensors"))
    base = {name.removeprefix("bert."): tensor for name, tensor in plain.items()}  # the saved encoder was a BertModel
    shared = [name for name in base if name in start]
    assert shared and any(not torch.equal(base[name], start[name]) for name in shared)  # fine-tuning moved them
    assert all(torch.allclose(checkpointed[name], plain[name], atol=1e-6) for name in plain)
