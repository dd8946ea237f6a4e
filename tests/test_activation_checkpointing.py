"""--activation-checkpointing: the layers' activations are recomputed in every backward pass through
the model (training, in training or evaluation mode, and the gradients that michel, fisher and taylor
score), and the run learns or scores exactly what it does without (the recomputed layers see the same
mask, the same dropout, and none in evaluation mode); refused in one line where it would do nothing or
cannot run."""
import json

import pytest
import torch
from conftest import tiny, tiny_model, write_tiny_lm
from test_causal_lm import lm_cfg

from headprune.config import PruneConfig, SweepConfig
from headprune.errors import ConfigError
from headprune.recipes import prune
import headprune.train
from headprune import attach_gates
from headprune.methods.michel import mask_gradients
from headprune.train import activation_checkpointing, changed_settings


@pytest.fixture
def recomputed(monkeypatch):
    """Counts the layers run under torch's checkpoint."""
    calls = []
    real = headprune.train.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(headprune.train, "checkpoint", counting)
    return calls


def scores(folder, field="logit"):
    """Each head's score (`field`; None: the one a method writes besides where the head is and whether kept)."""
    heads = json.loads((folder / "head_scores.json").read_text())
    if field is None:
        (field,) = set(heads[0]) - {"kind", "layer", "head", "kept"}
    return [head[field] for head in heads]


def test_refused_where_no_backward_pass_runs():
    with pytest.raises(ConfigError, match="backward passes, and a run of activation makes none"):
        PruneConfig(method="activation", activation_checkpointing=True)
    with pytest.raises(ConfigError, match="backward passes, and runs of flap, random make none"):
        SweepConfig(methods=["flap", "random"], activation_checkpointing=True)
    for settings in (dict(), dict(pruning_dropout="on"), dict(method="ste"), dict(mode="joint"),
                     dict(task="causal-lm"), dict(method="michel"), dict(method="fisher"), dict(method="taylor")):
        assert PruneConfig(activation_checkpointing=True, **settings).activation_checkpointing
    SweepConfig(methods=["dsp", "flap"], activation_checkpointing=True)


def test_a_sweep_passes_it_to_the_runs_where_it_acts(tmp_path):
    from headprune.sweeping import planned_runs
    runs = planned_runs(SweepConfig(methods=["dsp", "fisher", "flap", "ste"], modes=["pipelined", "joint"], ks=[3],
                                    activation_checkpointing=True, output_dir=str(tmp_path)))
    acting = {(run.method, run.mode): run.activation_checkpointing for run in runs}
    # flap scores from forward passes only
    assert acting == {("dsp", "pipelined"): True, ("dsp", "joint"): True, ("fisher", "pipelined"): True,
                      ("flap", "pipelined"): False, ("ste", "pipelined"): True, ("ste", "joint"): True}


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


@pytest.mark.parametrize("settings", [dict(), dict(pruning_dropout="on"), dict(mode="joint")])
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


@pytest.mark.parametrize("method", ["michel", "fisher", "taylor"])
def test_the_scores_from_gradients_are_the_same_with_it(tiny_finetuned, tmp_path, recomputed, method):
    settings = dict(method=method, k=3, michel_step=2)
    plain = prune(tiny(*tiny_finetuned, tmp_path / "plain", **settings))
    assert not recomputed
    checkpointed = prune(tiny(*tiny_finetuned, tmp_path / "checkpointed", activation_checkpointing=True, **settings))
    assert recomputed  # its backward passes recomputed the layers
    assert checkpointed["kept_heads"] == plain["kept_heads"]
    assert checkpointed["metrics_pruned"] == pytest.approx(plain["metrics_pruned"], abs=1e-6)
    learned = scores(tmp_path / "plain", field=None)
    assert len(set(learned)) > 1
    assert scores(tmp_path / "checkpointed", field=None) == pytest.approx(learned, rel=1e-6)
    assert len(plain.get("curve", [])) == (4 if method == "michel" else 0)  # all heads, then 3 rounds
    for a, b in zip(checkpointed.get("curve", []), plain.get("curve", [])):  # michel's rounds
        assert a["pruned_now"] == b["pruned_now"] and a["metrics"] == pytest.approx(b["metrics"], abs=1e-6)


def test_a_layer_that_reads_its_own_mode_for_dropout_stays_without_it(recomputed):
    """BART's layers apply dropout by their own training flag, which transformers' check needs set:
    in evaluation mode the checkpointed layers must run, and be recomputed, without dropout."""
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    config = BartConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
                        dropout=0.5, attention_dropout=0.5, activation_dropout=0.5, attn_implementation="eager")
    model = BartForConditionalGeneration(config)
    gates = attach_gates(model)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(4, 99, (3, 9), generator=g),
                "labels": torch.randint(4, 99, (3, 6), generator=g)} for _ in range(2)]
    mask = torch.ones(gates.num_heads)
    plain, _ = mask_gradients(model, gates, batches, mask)
    with activation_checkpointing(model, True):
        checkpointed, _ = mask_gradients(model, gates, batches, mask)
        assert len(recomputed) == 2 * 4  # 2 encoder and 2 decoder layers, each batch
    assert not model.training and not any(m.training for m in model.modules())
    assert plain.abs().sum() > 0
    assert torch.allclose(checkpointed, plain, rtol=1e-5, atol=1e-7)
