"""Reconstruction after selection (--reconstruct, issue 21): the fits against hand computations,
the errors it reports against the model it leaves, and the folded model against its saved copy."""
import json
import logging

import pytest
import torch
from torch import nn

from conftest import tiny, tiny_model
from headprune import attach_gates, detach_gates
from headprune.config import PruneConfig, reconstruct_in_effect
from headprune.gates import HeadGates
from headprune.pruning import load_pruned, save_pruned
from headprune.reconstruction import MAX_SCALE, reconstruct
from headprune.recipes import prune
from headprune.sites import AttentionSite

# One block of 2 heads of size 1 whose output is their sum: tokens (1, 1), (2, 1), (1, 2).
# Head 1 removed: the target is 2, 3, 3 and head 0's part 1, 2, 1.
TOKENS = torch.tensor([[[1.0, 1], [2, 1], [1, 2]]])


class Block(nn.Module):
    def __init__(self, weight=(1.0, 1.0)):
        super().__init__()
        self.output = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.output.weight.copy_(torch.tensor([weight]))

    def forward(self, x):
        return self.output(x)


def one_block(weight=(1.0, 1.0)):
    model = Block(weight)
    site = AttentionSite("encoder", 0, nn.Module(), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2), model.output, 1)
    gates = HeadGates([site])
    gates.register_hooks(model)
    return model, gates, (lambda m, batch: m(batch["x"]))


@pytest.mark.parametrize("mode,weight,bias,before,after", [
    # scale of least squares: sum(part * target) / sum(part^2) = 11 / 6; error 22 - 11^2 / 6 = 11 / 6 of 22
    ("rescale", 11 / 6, None, 6 / 22, (11 / 6) / 22),
    # with an intercept: centred, scale (1/3) / (2/3) = 1/2, intercept 8/3 - 1/2 * 4/3 = 2; residuals -0.5, 0, 0.5
    ("both", 0.5, 2.0, 6 / 22, 0.5 / 22),
    # FLAP: the removed head's mean, 4/3, through its weight 1; scale untouched
    ("bias", 1.0, 4 / 3, None, None),
])
def test_each_fit_by_hand_on_one_block(mode, weight, bias, before, after):
    model, gates, forward = one_block()
    info = reconstruct(model, gates, torch.tensor([1.0, 0.0]), [{"x": TOKENS}], forward, mode, disable_progress=True)
    assert model.output.weight[0, 0].item() == pytest.approx(weight)
    assert model.output.weight[0, 1].item() == 1.0  # the removed head's column: gated, untouched
    assert (model.output.bias is None) if bias is None else model.output.bias.item() == pytest.approx(bias)
    if before is not None:
        (error,) = info["reconstruction_error"]
        assert (error["before"], error["after"]) == pytest.approx((before, after))
    with gates.override(torch.tensor([1.0, 0.0])), torch.no_grad():  # the folded block at the mask
        got = model(TOKENS)[0, :, 0]
    expected = {"rescale": [11 / 6, 22 / 6, 11 / 6], "both": [2.5, 3, 2.5], "bias": [7 / 3, 10 / 3, 7 / 3]}[mode]
    assert got.tolist() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["rescale", "both"])
def test_the_fit_of_two_kept_heads_is_torchs_least_squares(mode):
    """3 heads of size 2 into 3 outputs, heads 0 and 2 kept, random contexts: the scales (and the
    intercept, `both`) are torch.linalg.lstsq's over every (token, output) of the block."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 20, 6, generator=g, dtype=torch.float64)
    model = Block().double()
    model.output = nn.Linear(6, 3, bias=False).double()
    with torch.no_grad():
        model.output.weight.copy_(torch.randn(3, 6, generator=g, dtype=torch.float64))
    weight = model.output.weight.detach().clone()
    site = AttentionSite("encoder", 0, nn.Module(), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6), model.output, 2)
    gates = HeadGates([site])
    gates.register_hooks(model)
    reconstruct(model, gates, torch.tensor([1.0, 0.0, 1.0]), [{"x": x}], lambda m, batch: m(batch["x"]), mode,
                disable_progress=True)
    target = (x[0] @ weight.T).reshape(-1)  # every head's output, token-major
    columns = [(x[0, :, 2 * h:2 * h + 2] @ weight[:, 2 * h:2 * h + 2].T).reshape(-1) for h in (0, 2)]
    if mode == "both":  # one intercept per output
        columns += [torch.eye(3, dtype=torch.float64).repeat(20, 1)[:, o] for o in range(3)]
    solution = torch.linalg.lstsq(torch.stack(columns, 1), target.unsqueeze(1)).solution[:, 0]
    folded = model.output.weight.detach()
    assert torch.allclose(folded[:, 0:2], solution[0] * weight[:, 0:2], atol=1e-7)
    assert torch.allclose(folded[:, 4:6], solution[1] * weight[:, 4:6], atol=1e-7)
    assert not torch.allclose(solution[:2], torch.ones(2, dtype=torch.float64), atol=1e-3)  # (a fit that moves)
    if mode == "both":
        assert torch.allclose(model.output.bias.detach(), solution[2:], atol=1e-7)


def test_the_bias_uses_means_already_measured_and_costs_no_pass():
    # mean ablation measured the means before selection: the bias takes them (here made up) as they are
    model, gates, forward = one_block()
    info = reconstruct(model, gates, torch.tensor([1.0, 0.0]), [{"x": TOKENS}], forward, "bias", disable_progress=True,
                       means=[torch.tensor([5.0, 3.0], dtype=torch.float64)])
    assert model.output.bias.item() == pytest.approx(3.0) and info["reconstruction_passes"] == 0


def test_nothing_removed_changes_nothing():
    model, gates, forward = one_block()
    info = reconstruct(model, gates, torch.ones(2), [{"x": TOKENS}], forward, "both", disable_progress=True)
    assert info["reconstruction_error"] == [] and model.output.weight.tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize("mode,passes", [("rescale", 4), ("both", 6)])
def test_a_block_with_no_head_kept_has_no_scale_to_fit_and_costs_no_pass(mode, passes):
    model = tiny_model("bert", layers=3).double()
    gates = attach_gates(model)
    mask = torch.tensor([0.0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0])  # layer 0 loses every head
    info = reconstruct(model, gates, mask, calibration(), lambda m, b: m(**b).logits.sum(), mode, disable_progress=True)
    first = info["reconstruction_error"][0]
    assert info["reconstruction_passes"] == passes
    assert first["before"] == pytest.approx(1.0)  # the block gives nothing: its error is all of its output
    if mode == "rescale":
        assert first["after"] == 1.0
    else:  # both fits layer 0's intercept: FLAP's bias in effect
        assert first["after"] < 0.999
    assert set(first) == {"kind", "layer", "before", "after"}


def calibration(n=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(5, 99, (3, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[2, 4:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def block_outputs(model, gates, mask, batches):
    """Each block's output projection's output at the real tokens, with the gates at `mask`."""
    seen = {i: [] for i in range(len(gates.sites))}
    handles = []
    for i, site in enumerate(gates.sites):
        handles.append(site.output.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out.detach())))
    with torch.no_grad(), gates.override(mask):
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    tokens = torch.cat([b["attention_mask"].bool() for b in batches])
    return [torch.cat(seen[i])[tokens] for i in range(len(gates.sites))]


@pytest.mark.parametrize("mode", ["rescale", "both"])
def test_reported_errors_are_those_of_the_model_it_leaves_and_it_reloads_exactly(mode, tmp_path, batch):
    model = tiny_model("bert", layers=3).double()
    gates = attach_gates(model)
    mask = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0])  # every layer loses heads
    batches = calibration()
    teacher = block_outputs(model, gates, torch.ones(12), batches)
    targets = [t - site.output.bias.detach() for t, site in zip(teacher, gates.sites)]  # the fit leaves the bias out
    plain = block_outputs(model, gates, mask, batches)
    info = reconstruct(model, gates, mask, batches, lambda m, b: m(**b).logits.sum(), mode, disable_progress=True)
    tuned = block_outputs(model, gates, mask, batches)
    errors = info["reconstruction_error"]
    assert [(e["kind"], e["layer"]) for e in errors] == [("encoder", 0), ("encoder", 1), ("encoder", 2)]
    for i, e in enumerate(errors):
        relative = float((tuned[i] - teacher[i]).pow(2).sum() / targets[i].pow(2).sum())
        assert e["after"] == pytest.approx(relative, rel=1e-6) and e["after"] < e["before"]
    first = float((plain[0] - teacher[0]).pow(2).sum() / targets[0].pow(2).sum())
    assert errors[0]["before"] == pytest.approx(first, rel=1e-6)  # the first block's inputs are the unpruned ones
    # gates at the mask on the folded weights = the physically pruned model, saved and loaded
    with torch.no_grad(), gates.override(mask):
        expected = model(**batch).logits
    kept = gates.kept_heads(mask)
    detach_gates(model)
    save_pruned(model, tmp_path, kept, reconstruct=mode)
    with torch.no_grad():
        assert torch.allclose(load_pruned(tmp_path).double()(**batch).logits, expected, atol=1e-10)



def test_blocks_after_a_pruned_one_are_tuned_though_they_lost_no_head():
    # only layer 0 loses heads: layers 1 and 2 keep all theirs, but their inputs drift, so (as Kwon's
    # code does) they are fitted too, and their errors are reported and lowered
    model = tiny_model("bert", layers=3).double()
    gates = attach_gates(model)
    mask = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    batches = calibration()
    teacher = block_outputs(model, gates, torch.ones(12), batches)
    plain = block_outputs(model, gates, mask, batches)
    last = model.bert.encoder.layer[2].attention.output.dense.weight.detach().clone()
    info = reconstruct(model, gates, mask, batches, lambda m, b: m(**b).logits.sum(), "rescale", disable_progress=True)
    tuned = block_outputs(model, gates, mask, batches)
    errors = info["reconstruction_error"]
    assert [e["layer"] for e in errors] == [0, 1, 2] and info["reconstruction_passes"] == 6
    assert not torch.equal(model.bert.encoder.layer[2].attention.output.dense.weight, last)  # rescaled
    for i in (1, 2):
        assert errors[i]["after"] < errors[i]["before"]
        assert (tuned[i] - teacher[i]).pow(2).sum() < (plain[i] - teacher[i]).pow(2).sum()


def test_a_decoders_first_self_attention_is_not_fitted_when_only_the_encoder_lost_heads():
    # its inputs are the decoder's embeddings, whatever the encoder does: nothing to fit, no error reported
    from test_seq2seq_heads import tiny_seq2seq
    model = tiny_seq2seq("marian").double()
    gates = attach_gates(model)
    mask = torch.ones(gates.num_heads)
    mask[:3] = 0  # three heads of the encoder's layer 0
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(3, 50, (3, 7), generator=g),
                "decoder_input_ids": torch.randint(3, 50, (3, 5), generator=g)} for _ in range(2)]
    info = reconstruct(model, gates, mask, batches, lambda m, b: m(**b).logits.sum(), "rescale", disable_progress=True)
    fitted = [(e["kind"], e["layer"]) for e in info["reconstruction_error"]]
    assert ("decoder", 0) not in fitted and {("encoder", 0), ("encoder", 1), ("cross", 0), ("decoder", 1)} <= set(fitted)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from conftest import write_tiny_lm
    return write_tiny_lm(tmp_path_factory.mktemp("lm"))


@pytest.mark.parametrize("mode,unit", [("bias", "group"), ("both", "query")])
def test_a_language_model_gets_output_biases_that_reload(tiny_lm, tmp_path, mode, unit):
    # Llama's output projections have no bias: one is added, recorded, and made again on loading
    import math
    from conftest import word_tokenizer
    from headprune.config import PruneConfig
    from headprune.tasks.language_modeling import pack
    model, data = tiny_lm
    cfg = PruneConfig(task="causal-lm", model=str(model), dataset=str(data), max_length=16, batch_size=8,
                      eval_batch_size=8, output_dir=str(tmp_path / "run"), checkpoint_every=0, method="activation",
                      unit=unit, k=3, reconstruct=mode, calibration_examples=20)
    results = prune(cfg)
    assert results["reconstruct"] == mode and results["calibration_examples"] == 20
    assert results["output_biases_added"] == 3  # one per layer
    unpruned = sum(p.numel() for p in load_pruned(model).parameters())  # without the biases reconstruction added
    assert results["size"]["unpruned"]["parameters"] == unpruned
    report = (tmp_path / "run" / "report.md").read_text()
    assert "- calibration data: 20 blocks of 16 tokens of the pruning data" in report  # packed text: blocks
    pruned = results["metrics_pruned"]["validation"]
    assert pruned != results["metrics_before_reconstruction"]["validation"]
    loaded = load_pruned(tmp_path / "run" / "model")
    assert loaded.config.headprune["output_biases"] and loaded.config.headprune["reconstruct"] == mode
    assert all(layer.self_attn.o_proj.bias is not None for layer in loaded.model.layers)
    ids = torch.tensor(pack((data / "validation.txt").read_text().splitlines(), word_tokenizer(), 16))
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert math.exp(loss.item()) == pytest.approx(pruned, rel=1e-4)
    # pruned again without reconstruction: the biases stay, and so does their record
    again = prune(PruneConfig(**{**cfg.__dict__, "model": str(tmp_path / "run" / "model"), "k": 2,
                                 "reconstruct": "none", "output_dir": str(tmp_path / "again")}))
    record = load_pruned(tmp_path / "again" / "model").config.headprune
    assert again["k"] == 2 and record["output_biases"] and "reconstruct" not in record
    assert record["pruned_before"]["reconstruct"] == mode and record["pruned_before"]["method"] == "activation"
    assert record["pruned_before"]["unit"] == unit and "kept_heads" not in record["pruned_before"]


def test_a_bias_that_zeroed_weights_would_lose_is_refused_before_pruning(tiny_lm, tmp_path, capsys):
    from conftest import one_line_error
    model, data = tiny_lm
    line = one_line_error(capsys, ["prune", "--task", "causal-lm", "--model", model, "--dataset", data,
                                   "--method", "flap", "--k", "3", "--reconstruct", "bias", "--save-format", "zeroed",
                                   "--output-dir", tmp_path / "run"])
    assert "--save-format physical" in line and not (tmp_path / "run" / "results.json").exists()


def test_prune_records_the_metrics_before_and_after_and_each_blocks_error(tiny_finetuned, tmp_path, batch):
    results = prune(tiny(*tiny_finetuned, tmp_path, method="fisher", k=3, reconstruct="rescale"))
    assert set(results["metrics_before_reconstruction"]) == set(results["metrics_pruned"])
    assert results["reconstruction_passes"] == 4 and len(results["reconstruction_error"]) == 2
    assert all(e["after"] <= e["before"] for e in results["reconstruction_error"])
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["headprune"]
    assert saved["reconstruct"] == "rescale" and "output_biases" not in saved  # BERT has its biases
    report = (tmp_path / "report.md").read_text()
    assert "- reconstruction (rescale): accuracy before heldout" in report and "encoder attention of layer 1: relative error" in report
    assert f"- calibration data: {results['calibration_examples']} examples of the pruning data" in report
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"Calibration data: {results['calibration_examples']} examples of the pruning data." in card


def test_calibration_data_can_come_from_another_dataset_with_the_same_labels(tiny_finetuned, tmp_path):
    from headprune.errors import ConfigError
    model, data = tiny_finetuned
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(data.read_text().splitlines()[:60]))
    few = prune(tiny(model, data, tmp_path / "few", method="activation", calibration_dataset=str(other),
                     calibration_examples=10, reconstruct="bias"))
    assert few["calibration_examples"] == 10 and few["config"]["calibration_dataset"] == str(other)
    # with a budget a target works out (it is in the run's settings then): the data are still read
    targeted = prune(tiny(model, data, tmp_path / "targeted", method="activation", k=None, target_params=0.97,
                          calibration_dataset=str(other), calibration_examples=10))
    assert targeted["calibration_examples"] == 10 and "budget" in targeted
    every = prune(tiny(model, data, tmp_path / "every", method="activation", calibration_dataset=str(other)))
    own = prune(tiny(model, data, tmp_path / "own", method="activation"))
    assert every["calibration_examples"] < 60 < own["calibration_examples"]  # its training split, not ours
    relabelled = tmp_path / "relabelled.jsonl"
    relabelled.write_text(other.read_text().replace('"yes"', '"maybe"'))
    with pytest.raises(ConfigError, match="--calibration-dataset .*relabelled.jsonl: its label names"):
        prune(tiny(model, data, tmp_path / "bad", method="activation", calibration_dataset=str(relabelled)))
    assert not (tmp_path / "bad" / "results.json").exists()


def test_the_default_is_the_bias_for_pipelined_language_models_and_none_for_the_rest():
    from headprune.config import PruneConfig, reconstruct_in_effect
    assert reconstruct_in_effect(vars(PruneConfig())) == "bias"  # DSP on a text classifier: chosen for the bias
    assert reconstruct_in_effect(vars(PruneConfig(method="fisher"))) == "none"
    assert reconstruct_in_effect(vars(PruneConfig(method="ste"))) == "none"
    assert reconstruct_in_effect(vars(PruneConfig(mode="joint"))) == "none"
    assert reconstruct_in_effect(vars(PruneConfig(task="translation"))) == "none"
    assert reconstruct_in_effect(vars(PruneConfig(task="image-classification"))) == "bias"  # DSP, as on text
    assert reconstruct_in_effect(vars(PruneConfig(task="image-classification", method="fisher"))) == "none"
    assert reconstruct_in_effect(vars(PruneConfig(task="image-classification", default_rules=1))) == "none"
    assert reconstruct_in_effect(vars(PruneConfig(task="causal-lm"))) == "bias"
    assert reconstruct_in_effect(vars(PruneConfig(task="causal-lm", method="fisher"))) == "bias"
    assert reconstruct_in_effect(vars(PruneConfig(task="causal-lm", mode="joint"))) == "none"
    assert reconstruct_in_effect(vars(PruneConfig(task="causal-lm", save_format="zeroed"))) == "none"
    assert reconstruct_in_effect(vars(PruneConfig(task="causal-lm", reconstruct="none"))) == "none"
    assert reconstruct_in_effect(vars(PruneConfig(reconstruct="rescale"))) == "rescale"
    assert reconstruct_in_effect({"task": "causal-lm"}) == "none"  # saved before the option existed


def test_a_run_saved_with_what_the_default_chose_is_the_same_run(tmp_path):
    from headprune.config import PruneConfig
    from headprune.train import changed_settings
    lm = PruneConfig(task="causal-lm")
    assert changed_settings({**vars(lm), "reconstruct": "bias"}, lm) == {}
    assert changed_settings({**vars(lm), "reconstruct": "bias", "ablation": "mean"}, lm) == {}
    assert changed_settings({**vars(lm), "reconstruct": "none"}, lm) == {"ablation (in effect)": ("zero", "mean"),
                                                                         "reconstruct (in effect)": ("none", "bias")}
    assert changed_settings({**vars(lm), "ablation": "zero"}, lm) == {"ablation (in effect)": ("zero", "mean")}
    old = {k: v for k, v in vars(lm).items() if k not in ("reconstruct", "ablation")}  # before either existed
    assert changed_settings(old, lm) == {"ablation (in effect)": ("zero", "mean"),
                                         "reconstruct (in effect)": ("none", "bias")}
    fisher = PruneConfig(method="fisher")  # a scored method on a classifier: no reconstruction by default
    assert changed_settings({k: v for k, v in vars(fisher).items() if k not in ("reconstruct", "ablation")}, fisher) == {}
    dsp = {k: v for k, v in vars(PruneConfig()).items() if k not in ("reconstruct", "ablation")}
    assert changed_settings(dsp, PruneConfig()) == {"ablation (in effect)": ("zero", "mean"),
                                                    "reconstruct (in effect)": ("none", "bias")}


def test_an_image_run_made_under_the_first_rules_is_not_read_as_one_with_the_bias():
    from headprune.config import PruneConfig
    from headprune.train import changed_settings
    images = PruneConfig(task="image-classification")
    before = {k: v for k, v in vars(images).items() if k != "default_rules"}  # saved before the option existed
    assert changed_settings(before, images) == {"ablation (in effect)": ("zero", "mean"),
                                                "reconstruct (in effect)": ("none", "bias")}
    assert changed_settings(before, PruneConfig(task="image-classification", default_rules=1)) == {}
    assert changed_settings(vars(images), images) == {}
    text = PruneConfig(method="fisher")  # where the rules agree, the generation alone is no change
    assert changed_settings({k: v for k, v in vars(text).items() if k != "default_rules"}, text) == {}
    assert changed_settings(vars(text), PruneConfig(method="fisher", default_rules=1)) == {}
    dsp = PruneConfig()  # generation 3 took dropout out of DSP on text (test_pruning_dropout.py)
    assert changed_settings(vars(dsp), PruneConfig(default_rules=2)) == {"pruning_dropout (in effect)": ("off", "on")}


def test_a_language_model_pruned_at_the_default_gets_the_bias_and_reloads_with_it(tiny_lm, tmp_path, caplog):
    from test_causal_lm import lm_cfg, saved_perplexity
    model, data = tiny_lm
    with caplog.at_level(logging.INFO, logger="headprune"):
        results = prune(lm_cfg(model, data, tmp_path, method="fisher"))
    lines = [r.getMessage() for r in caplog.records]
    # the pass and the metric before it are said, not minutes of silence
    said = next(line for line in lines if line.startswith("before reconstruction: perplexity"))
    assert said.endswith(f"--reconstruct bias on {results['calibration_examples']} calibration examples")
    assert results["reconstruct"] == "bias" and results["output_biases_added"] > 0
    assert results["config"]["reconstruct"] == "default"
    assert results["metrics_pruned"] != results["metrics_before_reconstruction"]
    assert saved_perplexity(tmp_path / "model", data) == pytest.approx(results["metrics_pruned"]["validation"], rel=1e-4)


def test_a_closed_gate_with_mean_ablation_gives_the_model_the_bias_makes():
    # the removed head's mean on the calibration tokens (4/3) stands in for it: FLAP's bias, by hand
    from headprune.reconstruction import mean_contexts
    model, gates, forward = one_block()
    gates.fill = mean_contexts(model, gates, [{"x": TOKENS}], forward)
    assert gates.fill[0].tolist() == pytest.approx([4 / 3, 4 / 3])
    with gates.override(torch.tensor([1.0, 0.0])), torch.no_grad():
        assert model(TOKENS)[0, :, 0].tolist() == pytest.approx([7 / 3, 10 / 3, 7 / 3])
    with gates.override(torch.tensor([1.0, 0.25])), torch.no_grad():  # a soft gate: between the head and its mean
        assert model(TOKENS)[0, :, 0].tolist() == pytest.approx([1 + 0.25 + 0.75 * 4 / 3, 2 + 0.25 + 1, 1 + 0.5 + 1])


def test_dsp_with_mean_ablation_saves_the_model_it_learnt_on(tiny_lm, tmp_path):
    from test_causal_lm import lm_cfg, saved_perplexity
    model, data = tiny_lm
    results = prune(lm_cfg(model, data, tmp_path / "mean", ablation="mean", lr=1e-3))
    assert results["reconstruct"] == "bias" and results["config"]["ablation"] == "mean"
    assert saved_perplexity(tmp_path / "mean" / "model", data) == \
        pytest.approx(results["metrics_pruned"]["validation"], rel=1e-4)
    prune(lm_cfg(model, data, tmp_path / "zero", ablation="zero", lr=1e-3))
    scores = [json.loads((tmp_path / run / "head_scores.json").read_text()) for run in ("mean", "zero")]
    assert scores[0] != scores[1]  # the same seed and steps: the scores learnt on another model


def test_the_default_ablation_is_the_mean_where_a_trained_method_saves_the_bias():
    from headprune.config import PruneConfig, ablation_in_effect
    assert ablation_in_effect(vars(PruneConfig(task="causal-lm"))) == "mean"
    assert ablation_in_effect(vars(PruneConfig(task="causal-lm", method="voita"))) == "mean"
    assert ablation_in_effect(vars(PruneConfig(reconstruct="both"))) == "mean"
    assert ablation_in_effect(vars(PruneConfig(task="causal-lm", method="fisher"))) == "zero"  # as published
    assert ablation_in_effect(vars(PruneConfig(task="causal-lm", reconstruct="rescale"))) == "zero"
    assert ablation_in_effect(vars(PruneConfig())) == "mean"  # DSP on a text classifier saves the bias
    assert ablation_in_effect(vars(PruneConfig(method="ste"))) == "zero"  # there STE does not
    assert ablation_in_effect(vars(PruneConfig(task="causal-lm", ablation="zero"))) == "zero"
    assert ablation_in_effect(vars(PruneConfig(task="causal-lm", mode="joint", reconstruct="bias"))) == "zero"
    assert ablation_in_effect({"method": "dsp", "reconstruct": "bias"}) == "zero"  # saved before the option


def test_mean_ablation_needs_the_bias_and_a_trained_method():
    from headprune.config import PruneConfig, SweepConfig, ablation_in_effect
    from headprune.errors import ConfigError
    with pytest.raises(ConfigError, match="give --reconstruct bias"):
        PruneConfig(ablation="mean", method="ste")  # STE on a classifier: no bias by default
    with pytest.raises(ConfigError, match="give --reconstruct bias"):
        PruneConfig(ablation="mean", reconstruct="rescale")
    with pytest.raises(ConfigError, match="never close a gate while scoring"):
        PruneConfig(task="causal-lm", method="flap", ablation="mean")
    PruneConfig(ablation="mean", reconstruct="both")
    with pytest.raises(ConfigError, match="is for pipelined runs"):  # the means would be of weights that then train
        PruneConfig(ablation="mean", reconstruct="bias", mode="joint")
    sweep = SweepConfig(task="causal-lm", methods=["dsp", "fisher", "flap"], ablation="mean")
    from headprune.sweeping import planned_runs
    assert {run.method: run.ablation for run in planned_runs(sweep)} == {"dsp": "mean", "fisher": "mean",
                                                                          "flap": "default"}
    both = SweepConfig(task="causal-lm", methods=["dsp"], modes=["joint", "pipelined"], ablation="mean",
                       reconstruct="bias")
    assert {run.mode: ablation_in_effect(vars(run)) for run in planned_runs(both)} == {"joint": "zero",
                                                                                     "pipelined": "mean"}


def test_the_gate_gradient_with_mean_ablation_is_that_of_the_head_against_its_mean():
    # loss = the sum of the block's outputs: d/dg1 of sum(x0 + g1 x1 + (1 - g1) m1) = sum(x1 - m1) = 4 - 3 * 4/3
    from headprune.methods.michel import mask_gradients
    from headprune.reconstruction import mean_contexts
    model, gates, forward = one_block()
    loss = (lambda m, batch: forward(m, batch).sum())
    batches = [{"x": TOKENS, "labels": torch.zeros(1)}]
    (zero,), _ = mask_gradients(model, gates, batches, torch.ones(2), loss)
    gates.fill = mean_contexts(model, gates, batches, forward)
    (mean,), _ = mask_gradients(model, gates, batches, torch.ones(2), loss)
    assert zero.tolist() == pytest.approx([4.0, 4.0]) and mean.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_fisher_with_mean_ablation_differentiates_the_gates_of_the_mean_filled_model(tiny_lm, tmp_path):
    # d loss / d g at g = 1 of g x + (1 - g) m is the gradient at the context times (x - m), not times x
    from test_causal_lm import lm_cfg
    model, data = tiny_lm
    runs = {a: prune(lm_cfg(model, data, tmp_path / a, method="fisher", ablation=a, reconstruct="bias"))
            for a in ("zero", "mean")}
    scores = [json.loads((tmp_path / a / "head_scores.json").read_text()) for a in ("zero", "mean")]
    assert scores[0] != scores[1]
    assert runs["mean"]["metrics_pruned"]["validation"] > 0


def test_michels_curve_with_mean_ablation_is_of_the_heads_removed_as_its_rows_say(tiny_lm, tmp_path):
    # the means steer the gradients; the curve, like every metric before reconstruction, has the heads at zero
    from test_causal_lm import lm_cfg
    model, data = tiny_lm
    results = prune(lm_cfg(model, data, tmp_path, method="michel", michel_step=1, ablation="mean", reconstruct="bias"))
    assert results["curve"][-1]["metrics"] == results["metrics_before_reconstruction"]
    assert results["metrics_pruned"] != results["metrics_before_reconstruction"]


def test_dsp_on_a_classifier_at_the_defaults_saves_the_bias_it_chose_the_heads_for(tiny_finetuned, tmp_path):
    results = prune(tiny(*tiny_finetuned, tmp_path, reconstruct="default", epochs=0.5))
    assert results["reconstruct"] == "bias" and results["config"]["ablation"] == "default"
    # the bias reuses the means that mean ablation measured: no pass of its own
    assert results["reconstruction_passes"] == 0 and "metrics_before_reconstruction" in results
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["headprune"]
    assert saved["reconstruct"] == "bias"
    fisher = prune(tiny(*tiny_finetuned, tmp_path / "fisher", method="fisher", reconstruct="default"))
    assert "reconstruct" not in fisher  # the scored methods keep their heads as chosen on a classifier


def test_a_scale_beyond_the_limit_is_not_folded_and_the_block_keeps_scales_of_one(caplog):
    """The docs: a fit that gives a scale beyond +-10 keeps scales of 1 (Kwon et al.: the fit went
    wrong). Head 0's column is 0.05 and head 1 (removed) carries most of the output: least squares
    asks head 0 for a scale of 0.265 / 0.015 = 17.7, which lowers the error but must be refused."""
    model, gates, loss_fn = one_block([0.05, 1.0])
    with caplog.at_level(logging.WARNING):
        info = reconstruct(model, gates, torch.tensor([1.0, 0.0]), [{"x": TOKENS}], loss_fn, "rescale",
                           disable_progress=True)
    assert 0.265 / 0.015 > MAX_SCALE
    assert model.output.weight[0, 0].item() == pytest.approx(0.05)  # scale 1: the column as it was
    assert "scales stay 1" in caplog.text
    (error,) = info["reconstruction_error"]
    assert error["after"] == pytest.approx(error["before"])  # the error of scales 1


@pytest.mark.parametrize("run", [{"method": "fisher"}, {"method": "dsp", "mode": "joint"}])
def test_a_reconstruction_stopped_midway_goes_on_from_the_first_block_not_fitted(tiny_finetuned, tmp_path,
                                                                                monkeypatch, run):
    """Each block's fit (two passes over the calibration data) is kept as it is made: the same command
    started again after a kill fits only the blocks left, and saves the model an unstopped run saves.
    A joint run's weights, trained in the run and resumed from its last checkpoint, key the fits too."""
    import headprune.reconstruction as reconstruction
    from safetensors.torch import load_file
    real, calls = reconstruction.block_sums, []

    class Killed(Exception):
        pass

    def block_sums(*args, **kwargs):
        calls.append(args[3])  # the block's index
        if len(calls) == 2 and kill:
            raise Killed
        return real(*args, **kwargs)
    monkeypatch.setattr(reconstruction, "block_sums", block_sums)
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    kill = True
    with pytest.raises(Killed):
        prune(tiny(*tiny_finetuned, tmp_path / "run", k=3, reconstruct="both", **run))
    kill, calls[:] = False, []
    resumed = prune(tiny(*tiny_finetuned, tmp_path / "run", k=3, reconstruct="both", **run))
    assert len(calls) == 1  # the second block only
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "another cache"))
    whole = prune(tiny(*tiny_finetuned, tmp_path / "whole", k=3, reconstruct="both", **run))
    assert len(calls) == 3
    for key in ("metrics_pruned", "reconstruction_error", "reconstruction_passes"):
        assert resumed[key] == whole[key]
    saved = [load_file(folder / "model" / "model.safetensors") for folder in (tmp_path / "run", tmp_path / "whole")]
    assert all(torch.equal(saved[0][name], saved[1][name]) for name in saved[1])
    (fits,) = (tmp_path / "cache" / "reconstruction").glob("*.json")
    fits.write_text('{"0": {"scales": ["damaged"], "shift": null, "error": {"before": 1, "after": 0}}}')  # fitted again
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    calls[:] = []
    again = prune(tiny(*tiny_finetuned, tmp_path / "run", k=3, reconstruct="both", **run, overwrite=True))
    assert len(calls) == 2 and again["reconstruction_error"] == whole["reconstruction_error"]


def test_image_classifiers_got_the_bias_from_default_rules_2():
    # a run saved under rules 2 (before rule 3 took dropout out) did reconstruct with the bias; one of rules 1 did not
    image = {**vars(PruneConfig(task="image-classification")), "reconstruct": "default"}
    assert reconstruct_in_effect({**image, "default_rules": 2}) == "bias"
    assert reconstruct_in_effect({**image, "default_rules": 1}) == "none"
    assert reconstruct_in_effect({k: v for k, v in image.items() if k != "default_rules"}) == "none"  # unrecorded: 1


def test_flaps_bias_reuses_the_means_its_scoring_pass_measured(tiny_finetuned, tmp_path, monkeypatch):
    """FLAP's scores come from each channel's mean and variance: the bias compensation reuses those
    means (one pass over the calibration data in all, not two), and a second budget reads both from
    the cache (no pass). A cache entry of scores alone (written before) costs the bias its pass and
    gives the same model."""
    import headprune.methods.scoring as scoring
    from safetensors.torch import load_file, save_file
    real, passes = scoring.observe_calibration, []
    monkeypatch.setattr(scoring, "observe_calibration", lambda *a, **k: passes.append(1) or real(*a, **k))
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    first = prune(tiny(*tiny_finetuned, tmp_path / "k3", method="flap", reconstruct="bias"))
    assert len(passes) == 1 and first["scoring_passes"] == 1 and first["reconstruction_passes"] == 0
    second = prune(tiny(*tiny_finetuned, tmp_path / "k5", method="flap", k=5, reconstruct="bias"))
    assert len(passes) == 1 and second["scoring_passes"] == 0 and second["reconstruction_passes"] == 0
    (entry,) = (tmp_path / "cache" / "scores").iterdir()
    save_file({"scores": load_file(entry)["scores"]}, str(entry))
    old = prune(tiny(*tiny_finetuned, tmp_path / "old", method="flap", reconstruct="bias"))
    assert len(passes) == 2 and old["scoring_passes"] == 0 and old["reconstruction_passes"] == 1
    saved = [load_file(tmp_path / folder / "model" / "model.safetensors") for folder in ("k3", "old")]
    assert saved[0].keys() == saved[1].keys() and any("o_proj.bias" in name or "output.dense.bias" in name
                                                      for name in saved[0])
    assert all(torch.equal(saved[0][name], saved[1][name]) for name in saved[0])
    assert first["metrics_pruned"] == old["metrics_pruned"]
