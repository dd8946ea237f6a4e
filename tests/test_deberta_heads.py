"""DeBERTa-v2 and v3 (issue 23) and DeBERTa v1: disentangled attention, whose relative-position projections
(`pos_key_proj`, `pos_query_proj`, when `share_att_key` is off) hold rows per head too. Gates at 1
change nothing, removal (with a layer left without heads) equals the mask, save and load give the
same outputs, with and without shared keys; a classifier prunes by every family of method."""
import copy

import pytest
import torch
from conftest import finetuned_tiny, tiny, tiny_model, write_tiny_assets

from headprune import attach_gates, detach_gates
from headprune.pruning import load_pruned, remove_heads, save_pruned
from headprune.recipes import prune
from headprune.sites import find_sites

KEPT = [("encoder", 0, 1), ("encoder", 0, 3), ("encoder", 2, 2)]  # layer 1 keeps none


def tiny_deberta(share_att_key: bool):
    model = tiny_model("deberta-v2", layers=3)
    if share_att_key:  # the same weights otherwise: keys and queries project the positions too
        config = copy.deepcopy(model.config)
        config.share_att_key = True
        torch.manual_seed(0)
        model = type(model)(config).eval()
    return model


def tiny_deberta_v1():
    """DeBERTa v1: one projection with per head its query, key and value rows, the query and value
    biases apart (zero at init: random here, so that slicing them wrongly shows)."""
    model = tiny_model("deberta", layers=3)
    with torch.no_grad():
        for site in find_sites(model):
            site.attention.q_bias.normal_(0, 0.5)
            site.attention.v_bias.normal_(0, 0.5)
    return model


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def gated(model, kept, batch):
    gates = attach_gates(model)
    gates.set_mask(torch.tensor([float(h in kept) for h in gates.heads]))
    try:
        return logits(model, batch)
    finally:
        detach_gates(model)


@pytest.mark.parametrize("version", ["v2", "v2 with shared keys", "v1"])
def test_gates_removal_and_reload(version, batch, tmp_path):
    model = tiny_deberta_v1() if version == "v1" else tiny_deberta(share_att_key=version == "v2 with shared keys")
    site = find_sites(model)[0]
    assert site.num_heads == 4 and len(site.extra) == (0 if version == "v2 with shared keys" else 2)
    assert (site.fused, len(site.extra_biases)) == (("heads", 2) if version == "v1" else (None, 0))
    before = logits(model, batch)
    every = list(attach_gates(model).heads)
    detach_gates(model)
    assert torch.allclose(gated(model, every, batch), before, atol=1e-6)
    expected = gated(model, KEPT, batch)
    assert not torch.allclose(expected, before, atol=1e-3)
    save_pruned(copy.deepcopy(model), tmp_path, KEPT)
    remove_heads(model, KEPT)
    assert torch.allclose(logits(model, batch), expected, atol=1e-6)
    attention = find_sites(model)[0].attention
    assert attention.num_attention_heads == 2 and attention.all_head_size == 16
    if version == "v2":  # the relative-position projections keep the rows of the heads kept
        assert attention.pos_key_proj.out_features == attention.pos_query_proj.out_features == 16
    if version == "v1":  # and the fused projection its 3 x 2 heads' rows, the biases apart theirs
        assert attention.in_proj.out_features == 48 and attention.q_bias.shape == attention.v_bias.shape == (16,)
        assert attention.pos_proj.out_features == attention.pos_q_proj.out_features == 16
    assert torch.allclose(logits(load_pruned(tmp_path), batch), expected, atol=1e-6)


@pytest.mark.parametrize("method,reconstruct", [("dsp", "none"), ("fisher", "rescale"), ("taylor", "bias")])
def test_a_deberta_classifier_pruned_by_each_family(method, reconstruct, tmp_path_factory, tmp_path):
    model, data = finetuned_tiny("deberta-v2", tmp_path_factory)
    results = prune(tiny(model, data, tmp_path, method=method, reconstruct=reconstruct))
    assert results["k"] == 3 and results["num_heads"] == 8
    assert sum(s.num_heads for s in find_sites(load_pruned(tmp_path / "model"))) == 3


def test_a_deberta_classifier_pruned_jointly(tmp_path):
    model, data = write_tiny_assets(tmp_path / "assets", arch="deberta-v2")
    results = prune(tiny(model, data, tmp_path / "joint", mode="joint", method="voita", k=3, epochs=2))
    assert results["mode"] == "joint" and results["k"] == 3


def test_deberta_v1_with_talking_heads_is_refused():
    config = tiny_model("deberta").config
    config.talking_head = True
    from headprune.errors import UnsupportedArchitectureError
    with pytest.raises(UnsupportedArchitectureError, match="talking heads"):
        find_sites(type(tiny_model("deberta"))(config))
