"""Scored methods (issue 21): each score against a hand computation, and every method end to end."""
import json
import logging
import math

import pytest
import torch
from torch import nn

from conftest import tiny
from headprune.config import SCORED
from headprune.gates import HeadGates
from headprune.methods.activation import activation_scores
from headprune.methods.fisher import fisher_gradients, fisher_scores, rearrange
from headprune.methods.flap import flap_scores, flap_statistics
from headprune.methods.scoring import unit_channels
from headprune.methods.taylor import taylor_scores
from headprune.recipes import prune
from headprune.sites import AttentionSite

# One attention block of 2 heads of size 2 (4 channels into its output projection), two sequences
# of 2 tokens, the second sequence's second token padding (its 100s must count nowhere).
CONTEXTS = torch.tensor([[[1.0, -2, 3, 0], [3, 2, -1, 0]],
                         [[2.0, 2, 2, 2], [100, 100, 100, 100]]])
BATCH = {"x": CONTEXTS, "attention_mask": torch.tensor([[1, 1], [1, 0]])}


def one_block():
    """A 'model' whose forward feeds CONTEXTS to the block's output projection, with its gates."""
    output = nn.Linear(4, 3, bias=False)
    with torch.no_grad():  # squared column norms 1, 1, 1, 4
        output.weight.zero_()
        output.weight[0, 0], output.weight[1, 1], output.weight[2, 2], output.weight[0, 3] = 1, 1, 1, 2
    site = AttentionSite("encoder", 0, nn.Module(), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), output, 2)
    gates = HeadGates([site])
    return gates, (lambda model, batch: output(batch["x"]))


@pytest.mark.parametrize("aggregation,expected", [
    # per sequence, the mean |x| of each channel over its real tokens: (2, 2, 2, 0) and (2, 2, 2, 2)
    ("l2", [math.hypot(math.sqrt(8), math.sqrt(8)), math.hypot(math.sqrt(8), 2)]),  # sqrt(sum of squares)
    ("mean", [math.hypot(2, 2), math.hypot(2, 1)]),
    ("var", [0.0, 1.0]),  # channel 3: values 0 and 2
])
def test_activation_is_the_norm_of_each_heads_aggregated_mean_output(aggregation, expected):
    gates, forward = one_block()
    got = activation_scores(nn.Module(), gates, [BATCH], forward, aggregation)
    assert got.tolist() == pytest.approx(expected)


def test_flap_is_the_standardised_variance_times_the_column_norm():
    gates, forward = one_block()
    means, variances = flap_statistics(nn.Module(), gates, [BATCH], forward)
    # the 3 real tokens (1, -2, 3, 0), (3, 2, -1, 0), (2, 2, 2, 2)
    assert means[0].tolist() == pytest.approx([2, 2 / 3, 4 / 3, 2 / 3])
    assert variances[0].tolist() == pytest.approx([1, 16 / 3, 13 / 3, 4 / 3])  # unbiased
    fluctuation = torch.tensor([1, 16 / 3, 13 / 3, 16 / 3], dtype=torch.float64)  # x column norms 1, 1, 1, 4
    standardised = (fluctuation - 4) / math.sqrt((9 + 16 / 9 + 1 / 9 + 16 / 9) / 3)
    expected = [float(standardised[:2].mean()), float(standardised[2:].mean())]
    assert flap_scores(gates, variances).tolist() == pytest.approx(expected)
    assert expected[0] == pytest.approx(-expected[1])


def test_flap_standardises_each_block_apart():
    """The standardisation is per block (what lets layers of different scales compete): a second
    block whose channels vary 100 times as much scores as the first, not above it."""
    gates, _ = one_block()
    site = gates.sites[0]
    gates = HeadGates([site, AttentionSite("encoder", 1, nn.Module(), site.query, site.key, site.value, site.output, 2)])
    variances = torch.tensor([1, 16 / 3, 13 / 3, 4 / 3], dtype=torch.float64)
    scores = flap_scores(gates, [variances, 100 * variances])
    assert scores[2:].tolist() == pytest.approx(scores[:2].tolist())
    assert scores[0] < 0 < scores[1]  # (one standardisation over both blocks: block 1's first head above block 0's second)


def test_fisher_sums_the_squared_mask_gradient_of_each_batch(tiny_finetuned):
    from transformers import AutoModelForSequenceClassification
    from headprune import attach_gates
    model = AutoModelForSequenceClassification.from_pretrained(tiny_finetuned[0]).double()
    gates = attach_gates(model)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 99, (n, 6), generator=g), "attention_mask": torch.ones(n, 6, dtype=torch.long),
                "labels": torch.tensor([0, 1, 1][:n])} for n in (3, 1)]
    grads = fisher_gradients(model, gates, batches)
    for b, batch in enumerate(batches):  # against finite differences of each batch's mean loss
        for h in (0, 5):
            up, down = torch.ones(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
            up[h], down[h] = 1 + 1e-6, 1 - 1e-6
            with torch.no_grad(), gates.override(up):
                high = model(**batch).loss
            with torch.no_grad(), gates.override(down):
                low = model(**batch).loss
            assert float(grads[b, h]) == pytest.approx(float(high - low) / 2e-6, rel=1e-4, abs=1e-8)
    assert fisher_scores(grads).tolist() == pytest.approx((grads[0] ** 2 + grads[1] ** 2).tolist())


def test_rearrangement_prunes_the_heads_whose_gradients_cancel():
    # one layer of 4 heads, gradients over 2 batches: a (1, 0), b (0, 1), c (1.1, 0), d (-1.1, 0);
    # prune 2. The diagonal Fisher (1, 1, 1.21, 1.21) prunes a and b (|a + b|^2 = 2); the greedy
    # pass tries c (a + b + c: dropping c is best, back to a, b) then d (a + b + d: dropping b
    # leaves |a + d|^2 = 0.01): a and d pruned, b and c kept
    grads = torch.tensor([[1.0, 0.0, 1.1, -1.1], [0.0, 1.0, 0.0, 0.0]])
    diagonal = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert rearrange(diagonal, grads, [[0, 1, 2, 3]]).tolist() == [0, 1, 1, 0]
    assert rearrange(diagonal, grads, [[0, 1], [2, 3]]).tolist() == [0, 0, 1, 1]  # each layer all or none: as it was


def test_a_kv_groups_channels_are_those_of_its_query_heads():
    site = AttentionSite("decoder", 0, nn.Module(), nn.Linear(8, 12), nn.Linear(8, 4), nn.Linear(8, 4),
                         nn.Linear(12, 8), 2, unit="group")  # 6 query heads of size 2 in 2 groups
    assert unit_channels(site, 1) == [6, 7, 8, 9, 10, 11]
    site.unit = "query"  # the second query head of each group
    assert unit_channels(site, 1) == [2, 3, 8, 9]


@pytest.mark.parametrize("method,options", [(method, {}) for method in SCORED] + [
    ("activation", {"activation_aggregation": "var"}), ("taylor", {"taylor_variant": "vector"}),
    ("fisher", {"fisher_rearrange": False})])
def test_each_scored_method_keeps_k_heads_by_its_scores(tiny_finetuned, tmp_path, method, options):
    results = prune(tiny(*tiny_finetuned, tmp_path, method=method, k=3, **options))
    assert results["k"] == 3 and results["calibration_examples"] > 0
    scores = json.loads((tmp_path / "head_scores.json").read_text())
    kept = [s for s in scores if s["kept"]]
    assert len(kept) == 3 and len(scores) == 8
    if not (method == "fisher" and options.get("fisher_rearrange", True)):  # the top 3 of the scores
        assert min(s["score"] for s in kept) >= max(s["score"] for s in scores if not s["kept"])
    assert results["metrics_pruned"] and (tmp_path / "model" / "config.json").exists()


def test_taylor_by_hand_on_one_block():
    # 2 heads of size 1; loss = output(value(x)).sum() for x = (1, 2): y = O (V x + b), so
    # dL/dV_jk = O_j x_k, dL/db_j = O_j, dL/dO_j = (V x + b)_j = (-0.5, 2); query and key unused.
    # w * dL/dw per head: head 0 (3, -6 | 1.5 | -1.5), head 1 (-4, -2 | 2 | -4)
    value, output = nn.Linear(2, 2), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        value.weight.copy_(torch.tensor([[1.0, -1], [2, 0.5]]))
        value.bias.copy_(torch.tensor([0.5, -1.0]))
        output.weight.copy_(torch.tensor([[3.0, -2]]))
    site = AttentionSite("encoder", 0, nn.Module(), nn.Linear(2, 2), nn.Linear(2, 2), value, output, 1)
    gates = HeadGates([site])
    forward = (lambda model, batch: output(value(batch["x"])).sum())
    batch = {"x": torch.tensor([[1.0, 2.0]])}
    assert taylor_scores(nn.Module(), gates, [batch], forward, "element").tolist() == pytest.approx([12, 12])
    assert taylor_scores(nn.Module(), gates, [batch], forward, "vector").tolist() == pytest.approx([3, 8])
    assert value.weight.grad is None and not any(p.requires_grad is False for p in value.parameters())


@pytest.mark.parametrize("unit", ["group", "query"])
def test_taylor_groups_of_grouped_query_attention_by_hand(tmp_path, unit):
    """Llama, 4 query heads in 2 KV groups of head_dim 8: a KV group owns its 2 query heads' q rows and
    o columns and its k and v rows; a query unit j owns query head j of each group (heads j and 2 + j),
    q rows and o columns only. Checked against w * dL/dw summed over those index sets, written out."""
    from conftest import write_tiny_lm
    from transformers import AutoModelForCausalLM
    from headprune.gates import attach_gates
    write_tiny_lm(tmp_path, layers=1, heads=4, kv_heads=2, n_train=4, n_eval=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="eager").double()
    ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(0))

    def loss(model, batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    attention = model.model.layers[0].self_attn
    loss(model, {"input_ids": ids}).backward()
    wg = {name: (p.detach() * p.grad).double() for name, p in attention.named_parameters()}
    model.zero_grad(set_to_none=True)
    rows = lambda heads: [h * 8 + i for h in heads for i in range(8)]  # noqa: E731
    if unit == "group":
        owned = [(rows([0, 1]), rows([0])), (rows([2, 3]), rows([1]))]  # (query heads' rows, key/value rows)
    else:
        owned = [(rows([0, 2]), []), (rows([1, 3]), [])]
    parts = [[wg["q_proj.weight"][q], wg["k_proj.weight"][kv], wg["v_proj.weight"][kv], wg["o_proj.weight"][:, q]]
             for q, kv in owned]
    gates = attach_gates(model, unit)
    element = taylor_scores(model, gates, [{"input_ids": ids}], loss, "element")
    vector = taylor_scores(model, gates, [{"input_ids": ids}], loss, "vector")
    assert element.tolist() == pytest.approx([float(sum(x.abs().sum() for x in p)) for p in parts], rel=1e-9)
    assert vector.tolist() == pytest.approx([abs(float(sum(x.sum() for x in p))) for p in parts], rel=1e-9)
    assert all(float(wg["q_proj.weight"][q].abs().sum()) > 0 for q, _ in owned)  # queries count: their gradient is not 0


def test_taylor_vector_is_the_loss_change_when_a_head_is_scaled(tiny_finetuned):
    # sum over the head's weights of w * dL/dw = dL/de where the head's weights are scaled by (1 + e),
    # L the mean loss over the calibration sequences: batches of 3 and 1 sequences, each sequence
    # counting alike (the batch of 1 does not weigh as much as the batch of 3)
    from transformers import AutoModelForSequenceClassification
    from headprune import attach_gates
    from headprune.methods.taylor import group_weights
    model = AutoModelForSequenceClassification.from_pretrained(tiny_finetuned[0]).double().eval()
    model.requires_grad_(False)
    gates = attach_gates(model)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 99, (n, 6), generator=g), "attention_mask": torch.ones(n, 6, dtype=torch.long),
                "labels": torch.tensor([0, 1, 1][:n])} for n in (3, 1)]
    forward = (lambda m, b: m(**b).loss)
    got = taylor_scores(model, gates, batches, forward, "vector")
    # two processes that saw the same batches: twice the gradients over twice the sequences
    assert taylor_scores(model, gates, batches, forward, "vector", reduce=lambda t: 2 * t).tolist() == pytest.approx(got.tolist())
    for gate in (1, 6):
        site = gates.sites[gate // 4]

        def loss_at(scale):
            saved = [(p, index, p[index].clone()) for p, index in group_weights(site, gate % 4)]
            with torch.no_grad():
                for p, index, value in saved:
                    p[index] = value * scale
                total = sum(forward(model, b) * len(b["labels"]) for b in batches) / 4
                for p, index, value in saved:
                    p[index] = value
            return float(total)
        assert float(got[gate]) == pytest.approx(abs(loss_at(1 + 1e-6) - loss_at(1 - 1e-6)) / 2e-6, rel=1e-4)
    assert not any(p.requires_grad for p in model.parameters())  # left as it was


def test_taylor_sums_half_precision_gradients_in_float32(tiny_finetuned):
    # a bfloat16 model: 64 copies of a batch give the scores of the batch alone (each gradient is
    # the same bfloat16 tensor; summed in bfloat16 the sum would round at every batch)
    from transformers import AutoModelForSequenceClassification
    from headprune import attach_gates
    model = AutoModelForSequenceClassification.from_pretrained(tiny_finetuned[0], dtype=torch.bfloat16).eval()
    model.requires_grad_(False)  # as a pipelined run holds it
    gates = attach_gates(model)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, 99, (3, 6), generator=g), "labels": torch.tensor([0, 1, 1])}
    forward = (lambda m, b: m(**b).loss)
    once = taylor_scores(model, gates, [batch], forward, "element")
    assert taylor_scores(model, gates, [batch] * 64, forward, "element").tolist() == pytest.approx(once.tolist(), rel=1e-9)
    assert all(p.grad is None and not p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())


def test_a_half_precision_taylor_pass_stopped_midway_goes_on_from_its_float32_sums(tiny_finetuned, tmp_path,
                                                                                   monkeypatch):
    import headprune.methods.scoring as scoring
    from transformers import AutoModelForSequenceClassification
    from headprune import attach_gates
    from headprune.methods.scoring import PassRecord
    model = AutoModelForSequenceClassification.from_pretrained(tiny_finetuned[0], dtype=torch.bfloat16).eval()
    model.requires_grad_(False)
    gates = attach_gates(model)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 99, (3, 6), generator=g), "labels": torch.tensor([0, 1, 1])}
               for _ in range(5)]
    forward = (lambda m, b: m(**b).loss)
    whole = taylor_scores(model, gates, batches, forward, "element")

    def stopped_after(n):
        yield from batches[:n]
        raise Killed
    monkeypatch.setattr(scoring, "RECORD_EVERY", 0.0)  # a record after every batch
    record = PassRecord(tmp_path / "pass.partial")
    with pytest.raises(Killed):
        taylor_scores(model, gates, stopped_after(3), forward, "element", record=record)
    assert record.read()[0] == 3 and all(t.dtype != torch.bfloat16 for t in record.read()[1].values())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())  # left as it was
    calls = []
    resumed = taylor_scores(model, gates, batches, lambda m, b: calls.append(1) or forward(m, b), "element",
                            record=PassRecord(tmp_path / "pass.partial"))
    assert torch.equal(resumed, whole) and len(calls) == 2 and not record.path.exists()


def test_scored_methods_prune_a_fine_tuned_model_only(tiny_finetuned, tmp_path):
    from headprune.errors import ConfigError
    with pytest.raises(ConfigError, match="flap prunes a fine-tuned model and trains nothing: use --mode pipelined"):
        prune(tiny(*tiny_finetuned, tmp_path, method="flap", mode="joint"))
    with pytest.raises(ConfigError, match="activation_aggregation: 'max' is not one of l2, mean, var"):
        tiny(*tiny_finetuned, tmp_path, method="activation", activation_aggregation="max")


def test_a_sweep_scores_once_for_all_its_ks(tiny_finetuned, tmp_path, monkeypatch):
    import headprune.methods.activation as activation
    calls = []
    real = activation.activation_scores
    monkeypatch.setattr(activation, "activation_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    first = prune(tiny(*tiny_finetuned, tmp_path / "k3", method="activation", k=3))
    second = prune(tiny(*tiny_finetuned, tmp_path / "k5", method="activation", k=5, reconstruct="bias"))
    assert calls == [1] and not first["scores_from_cache"] and second["scores_from_cache"]
    assert second["scoring_passes"] == 0
    scores = [[h["score"] for h in json.loads((tmp_path / f"k{k}" / "head_scores.json").read_text())] for k in (3, 5)]
    assert scores[0] == scores[1]
    # other calibration data, or another option of the method: scored again
    prune(tiny(*tiny_finetuned, tmp_path / "fewer", method="activation", calibration_examples=20))
    prune(tiny(*tiny_finetuned, tmp_path / "mean", method="activation", activation_aggregation="mean"))
    assert calls == [1, 1, 1]
    # a damaged entry is computed again
    for entry in (tmp_path / "cache" / "scores").iterdir():
        entry.write_bytes(b"not safetensors")
    assert not prune(tiny(*tiny_finetuned, tmp_path / "again", method="activation"))["scores_from_cache"]
    assert calls == [1, 1, 1, 1]


def test_weights_no_folder_digests_key_the_scores_cache_by_their_bytes(tiny_finetuned, tmp_path, monkeypatch):
    """A hub model's weights (or any that no folder digest names) key the scores by the weights as
    loaded: a second k reads the scores; other weights under the same name are scored again."""
    import shutil
    import headprune.digests as digests
    import headprune.methods.activation as activation
    from safetensors.torch import load_file, save_file
    calls, real = [], activation.activation_scores
    monkeypatch.setattr(activation, "activation_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(digests, "digest_of_weights", lambda path: None)  # as for a hub id
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    hub = tmp_path / "hub"
    shutil.copytree(tiny_finetuned[0], hub)
    assert not prune(tiny(hub, tiny_finetuned[1], tmp_path / "k3", method="activation"))["scores_from_cache"]
    assert prune(tiny(hub, tiny_finetuned[1], tmp_path / "k5", method="activation", k=5))["scores_from_cache"]
    weights = load_file(hub / "model.safetensors")
    name = next(n for n in weights if n.endswith("value.weight"))
    weights[name] = weights[name] * 2
    save_file(weights, str(hub / "model.safetensors"), metadata={"format": "pt"})
    assert not prune(tiny(hub, tiny_finetuned[1], tmp_path / "k4", method="activation", k=4))["scores_from_cache"]
    assert calls == [1, 1]


def test_a_config_edited_beside_the_same_weights_is_scored_and_fitted_again(tiny_finetuned, tmp_path, monkeypatch):
    """Another config.json builds another model from the same weights (here: another activation):
    neither its scores nor its reconstruction's fits come from the cache."""
    import shutil
    import headprune.reconstruction as reconstruction
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(tiny_finetuned[0], folder)
    fitted, real = [], reconstruction.block_sums
    monkeypatch.setattr(reconstruction, "block_sums", lambda *a, **k: fitted.append(1) or real(*a, **k))
    first = prune(tiny(folder, tiny_finetuned[1], tmp_path / "a", method="activation", reconstruct="rescale"))
    blocks = len(fitted)
    assert blocks > 0 and not first["scores_from_cache"]
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "hidden_act": "relu"}))
    second = prune(tiny(folder, tiny_finetuned[1], tmp_path / "b", method="activation", reconstruct="rescale"))
    assert not second["scores_from_cache"] and len(fitted) == 2 * blocks
    third = prune(tiny(folder, tiny_finetuned[1], tmp_path / "c", method="activation", reconstruct="rescale"))
    assert third["scores_from_cache"] and len(fitted) == 2 * blocks  # (the same again: read back)


def test_calibration_data_is_cut_to_whole_batches_of_every_process():
    """Accelerate fills the last batches with examples from the start: summed over processes they would
    count twice (100 examples, batches of 8 on 2 processes: 96, none repeated)."""
    from headprune.errors import ConfigError
    from headprune.selection import whole_batches
    data = list(range(100))
    assert whole_batches(data, 8, 1) is data
    kept = whole_batches(data, 8, 2)
    assert len(kept) == 96 and list(kept) == data[:96]
    assert whole_batches(data[:32], 8, 2) == data[:32]  # whole already
    with pytest.raises(ConfigError, match="10 calibration examples are fewer than a batch for each of the 2 processes"):
        whole_batches(data[:10], 8, 2)


def test_fisher_keeps_the_heads_its_rearrangement_chose(tiny_finetuned, tmp_path, monkeypatch):
    """--fisher-rearrange (the default) must apply Kwon's rearrangement to the top-k mask: the heads
    saved are those the rearrangement returns, not the plain top k of the diagonal Fisher."""
    import headprune.methods.fisher as fisher
    seen = []

    def swapped(mask, grads, layers):  # a stand-in rearrangement: the mask reversed (still k heads)
        seen.append(mask.clone())
        return torch.flip(mask, [0])
    monkeypatch.setattr(fisher, "rearrange", swapped)
    prune(tiny(*tiny_finetuned, tmp_path, method="fisher", k=3))
    assert len(seen) == 1
    scores = json.loads((tmp_path / "head_scores.json").read_text())
    kept = [s["kept"] for s in scores]
    assert kept == [bool(m) for m in torch.flip(seen[0], [0]).tolist()]
    assert kept != [bool(m) for m in seen[0].tolist()]  # (the plain top 3 is not symmetric here)


def test_fisher_rearranges_within_the_counts_a_uniform_allocation_sets(tiny_finetuned, tmp_path, monkeypatch):
    """--allocation uniform sets how many heads each layer keeps (2 of 4 here); the rearrangement
    then chooses which, and those are the heads saved (not the per-layer top k of the diagonal)."""
    import headprune.methods.fisher as fisher
    calls = []
    real = fisher.rearrange
    monkeypatch.setattr(fisher, "rearrange", lambda mask, grads, layers: calls.append(
        (mask.clone(), real(mask, grads, layers))) or calls[-1][1])
    prune(tiny(*tiny_finetuned, tmp_path, method="fisher", k=4, allocation="uniform"))
    (before, after), = calls
    kept = torch.tensor([s["kept"] for s in json.loads((tmp_path / "head_scores.json").read_text())]).float()
    assert before.view(2, 4).sum(1).tolist() == after.view(2, 4).sum(1).tolist() == [2, 2]
    assert torch.equal(kept, after) and not torch.equal(after, before)  # (the rearrangement moves a head here)


def test_decoder_and_cross_sites_count_the_target_positions_with_a_label():
    """scoring.token_mask: an encoder site reads the source's attention mask; an encoder-decoder's
    decoder or cross site the target positions whose label is not -100 (its padding counts nowhere
    in the activation, FLAP and reconstruction statistics)."""
    from headprune.methods.scoring import token_mask
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
             "labels": torch.tensor([[5, 6, -100], [5, 6, 7]])}
    expected = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.equal(token_mask(batch, "decoder", 3), expected)
    assert torch.equal(token_mask(batch, "cross", 3), expected)
    assert torch.equal(token_mask(batch, "encoder", 5), batch["attention_mask"].bool())
    assert token_mask(batch, "encoder", 4) is None  # a length the batch does not describe: every position


def test_a_decoder_only_models_prompt_tokens_count_though_their_labels_are_minus_100(tmp_path):
    """A causal LM batch given through the API with its prompt's labels at -100 (and a padded end):
    the prompt's contexts are real tokens for the activation statistics (its attention mask says
    so), so the scores are those of the same batch with every real token labelled."""
    from conftest import write_tiny_lm
    from transformers import AutoModelForCausalLM
    from headprune.gates import attach_gates
    from headprune.methods.scoring import token_mask
    write_tiny_lm(tmp_path, layers=1, heads=4, kv_heads=2, n_train=4, n_eval=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="eager").double()
    gates = attach_gates(model, "group")
    ids = torch.randint(3, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0  # the second sequence padded at its end
    answer_only = ids.masked_fill(attention == 0, -100).clone()
    answer_only[:, :4] = -100  # the prompt: no loss on it
    every_token = ids.masked_fill(attention == 0, -100)
    forward = (lambda model, batch: model(**batch).loss)  # noqa: E731
    scores = [activation_scores(model, gates, [{"input_ids": ids, "attention_mask": attention, "labels": labels}],
                                forward) for labels in (answer_only, every_token)]
    assert torch.equal(scores[0], scores[1])
    assert torch.equal(token_mask({"attention_mask": attention, "labels": answer_only}, "decoder", 8, True),
                       attention.bool())


class Killed(Exception):
    pass


@pytest.fixture
def losses(monkeypatch):
    """The task's loss counted, and a kill before the call `kill_at` names (None: none); the passes
    recorded after every batch."""
    import headprune.methods.scoring as scoring
    from headprune.tasks.base import Task
    monkeypatch.setattr(scoring, "RECORD_EVERY", 0.0)
    real, state = Task.loss, {"calls": 0, "kill_at": None}

    def loss(self, model, batch):
        state["calls"] += 1
        if state["calls"] == state["kill_at"]:
            raise Killed
        return real(self, model, batch)
    monkeypatch.setattr(Task, "loss", loss)
    return state


@pytest.mark.parametrize("method", ["fisher", "activation", "flap", "taylor"])
def test_a_scoring_pass_stopped_midway_goes_on_from_the_batches_it_summed(method, tiny_finetuned, tmp_path,
                                                                         monkeypatch, losses):
    """The pass keeps its sums as they grow (here after every batch): the same command started again
    after a kill skips the batches summed, and keeps the heads, with the same scores, that a run
    never stopped keeps; the record goes once the pass is whole."""
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    losses["kill_at"] = 4  # three batches summed
    with pytest.raises(Killed):
        prune(tiny(*tiny_finetuned, tmp_path / "run", method=method))
    assert len(list((tmp_path / "cache" / "scores").glob("*.partial"))) == 1
    losses.update(calls=0, kill_at=None)
    resumed = prune(tiny(*tiny_finetuned, tmp_path / "run", method=method))
    resumed_calls = losses["calls"]
    assert not list((tmp_path / "cache" / "scores").glob("*.partial"))
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "another cache"))
    losses["calls"] = 0
    whole = prune(tiny(*tiny_finetuned, tmp_path / "whole", method=method))
    assert resumed_calls == losses["calls"] - 3
    assert resumed["kept_heads"] == whole["kept_heads"]
    scores = [json.loads((tmp_path / folder / "head_scores.json").read_text()) for folder in ("run", "whole")]
    assert scores[0] == scores[1]


def test_taylors_pass_keeps_no_record_of_gradients_over_its_size_limit(tiny_finetuned, tmp_path, monkeypatch,
                                                                       losses, caplog):
    import headprune.methods.taylor as taylor
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(taylor, "RECORD_MAX_BYTES", 1000)
    losses["kill_at"] = 4
    with pytest.raises(Killed), caplog.at_level(logging.INFO, logger="headprune"):
        prune(tiny(*tiny_finetuned, tmp_path / "run", method="taylor"))
    assert not list((tmp_path / "cache" / "scores").glob("*.partial"))
    assert "taylor: the pass keeps no record of its gradients" in caplog.text


def test_a_damaged_record_of_a_pass_is_a_pass_from_the_start(tmp_path):
    from headprune.methods.scoring import PassRecord
    record = PassRecord(tmp_path / "key.partial")
    assert record.read() is None  # none kept
    record.path.write_bytes(b"not safetensors")
    assert record.read() is None
    from safetensors.torch import save_file
    save_file({"sums.0": torch.zeros(2)}, str(record.path))  # no count of batches
    assert record.read() is None
    record.last = float("-inf")
    record.save(2, lambda: {"sums.0": torch.ones(2)})
    batches, kept = record.read()
    assert batches == 2 and torch.equal(kept["sums.0"], torch.ones(2))
    record.done()
    assert not record.path.exists()


def test_a_michel_round_stopped_midway_goes_on_from_the_batches_it_summed(tiny_finetuned, tmp_path, monkeypatch,
                                                                         losses):
    """Michel's rounds resume from the run's checkpoint; a round's own pass from its record: a kill
    three batches into the second round's pass costs those three batches only, and the curve and
    heads are those of a run never stopped."""
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    losses["kill_at"] = 9 + 4  # the first round's 9 batches, then 3 of the second's
    with pytest.raises(Killed):
        prune(tiny(*tiny_finetuned, tmp_path / "run", method="michel", michel_step=2, checkpoint_every=50))
    losses.update(calls=0, kill_at=None)
    resumed = prune(tiny(*tiny_finetuned, tmp_path / "run", method="michel", michel_step=2, checkpoint_every=50))
    resumed_calls = losses["calls"]
    assert not list((tmp_path / "cache" / "scores").glob("*.partial"))
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "another cache"))
    losses["calls"] = 0
    whole = prune(tiny(*tiny_finetuned, tmp_path / "whole", method="michel", michel_step=2, checkpoint_every=50))
    assert resumed_calls == losses["calls"] - 9 - 3 and losses["calls"] == 3 * 9
    assert resumed["curve"] == whole["curve"] and resumed["kept_heads"] == whole["kept_heads"]
