"""Physical head removal: same outputs as the mask, fewer parameters, a save/load round trip."""
import copy
import json
import subprocess
import sys

import pytest
import torch

from conftest import ARCHS, tiny_model
from headprune import attach_gates, detach_gates
from headprune.pruning import PrunedCheckpointError, heads_checksum, load_pruned, remove_heads, save_pruned
from headprune.sites import find_sites

# 3 layers x 4 heads: layer 0 loses every head, layer 1 keeps one, layer 2 keeps two
KEPT = [("encoder", 1, 2), ("encoder", 2, 0), ("encoder", 2, 3)]


def masked_logits(model, kept, batch):
    gates = attach_gates(model)
    gates.set_mask(torch.tensor([float(h in kept) for h in gates.heads]))
    with torch.no_grad():
        out = model(**batch).logits
    detach_gates(model)
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_physically_pruned_equals_masked_with_zero_and_one_head_layers(arch, attn, batch):
    model = tiny_model(arch, attn, layers=3)
    expected = masked_logits(model, KEPT, batch)
    pruned = remove_heads(copy.deepcopy(model), KEPT)
    with torch.no_grad():
        got = pruned(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert (got - model(**batch).logits).abs().max() > 1e-3  # pruning did change the outputs
    gates = attach_gates(pruned)  # the smaller model can be gated again
    assert [s.num_heads for s in gates.sites] == [0, 1, 2]


@pytest.mark.parametrize("arch", ARCHS)
def test_parameters_drop_by_exactly_the_removed_heads(arch):
    model = tiny_model(arch, layers=3)
    before = sum(p.numel() for p in model.parameters())
    remove_heads(model, KEPT)
    hidden, d, removed = 32, 8, 12 - len(KEPT)
    per_head = 3 * (hidden * d + d) + hidden * d  # q, k, v rows with biases; output columns
    assert before - sum(p.numel() for p in model.parameters()) == removed * per_head


def test_random_masks_on_every_architecture(batch):
    g = torch.Generator().manual_seed(7)
    for arch in ARCHS:
        for trial in range(3):
            model = tiny_model(arch, "sdpa", seed=trial, layers=3)
            heads = attach_gates(model).heads
            detach_gates(model)
            keep = torch.rand(len(heads), generator=g) < 0.5
            kept = [h for h, k in zip(heads, keep) if k]
            expected = masked_logits(model, kept, batch)
            with torch.no_grad():
                assert torch.allclose(remove_heads(model, kept)(**batch).logits, expected, atol=1e-5)


LOAD_AND_RUN = """
import json, sys, torch
from headprune.pruning import load_pruned
model = load_pruned(sys.argv[1])
batch = json.loads(sys.argv[2])
with torch.no_grad():
    out = model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"])).logits
print(json.dumps(out.tolist()))
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_in_a_fresh_process(arch, batch, tmp_path):
    model = tiny_model(arch, layers=3)
    expected = masked_logits(model, KEPT, batch)
    save_pruned(model, tmp_path, KEPT, method="test")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["headprune"]["kept_heads"] == [list(h) for h in KEPT]
    run = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(tmp_path),
                          json.dumps({k: v.tolist() for k, v in batch.items()})],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.allclose(torch.tensor(json.loads(run.stdout)), expected, atol=1e-5)
    loaded = load_pruned(tmp_path)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def edit_record(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config["headprune"])
    (folder / "config.json").write_text(json.dumps(config))


def test_mismatched_record_gives_a_clear_error(tmp_path):
    save_pruned(tiny_model("bert", layers=3), tmp_path, KEPT)

    def one_head_fewer(record):
        record["kept_heads"] = record["kept_heads"][:-1]
        record["kept_heads_sha256"] = heads_checksum(record["kept_heads"])  # a consistent record, other weights
    edit_record(tmp_path, one_head_fewer)
    with pytest.raises(PrunedCheckpointError, match="do not match the heads its config.json records"):
        load_pruned(tmp_path)


def test_a_record_with_other_head_numbers_but_the_same_counts_is_detected(tmp_path):
    """The shapes alone cannot tell (layer 1 keeps one head either way): the checksum can."""
    save_pruned(tiny_model("bert", layers=3), tmp_path, KEPT)
    edit_record(tmp_path, lambda record: record["kept_heads"][0].__setitem__(2, 0))  # head 2 -> head 0
    with pytest.raises(PrunedCheckpointError, match="does not match its checksum.*edited"):
        load_pruned(tmp_path)


def test_corrupt_weights_give_a_clear_error(tmp_path):
    save_pruned(tiny_model("bert", layers=3), tmp_path, KEPT)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(PrunedCheckpointError, match="cannot read the weights"):
        load_pruned(tmp_path)


def test_a_model_that_was_not_pruned_loads_as_usual(tmp_path, batch):
    model = tiny_model("bert")
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        # (reloaded with the default SDPA kernel: equal up to rounding)
        assert torch.allclose(load_pruned(tmp_path)(**batch).logits, model(**batch).logits, atol=1e-6)


def test_the_documented_plain_transformers_loading_works(tmp_path, batch):
    """The code block of docs/usage.md, run as written (on a folder of ours)."""
    from pathlib import Path
    doc = (Path(__file__).parent.parent / "docs" / "usage.md").read_text()
    block = doc.split("<!-- plain-transformers-loading")[1].split("```python\n")[1].split("```")[0]
    kept = [("encoder", 0, 1), ("encoder", 1, 0), ("encoder", 1, 2), ("encoder", 1, 3)]  # no empty layer
    model = tiny_model("bert")
    expected = masked_logits(model, kept, batch)
    save_pruned(model, tmp_path, kept)
    scope = {}
    exec(block.replace('"runs/dsp24/model"', repr(str(tmp_path))), scope)
    with torch.no_grad():
        assert torch.allclose(scope["model"](**batch).logits, expected, atol=1e-5)
    # a layer with no heads: stock transformers cannot run it, and the recipe says so
    save_pruned(tiny_model("bert"), tmp_path / "empty", [("encoder", 1, 0)])
    with pytest.raises(ValueError, match="layers with no heads: load it with headprune.load_pruned"):
        exec(block.replace('"runs/dsp24/model"', repr(str(tmp_path / "empty"))), {})


def test_pruning_again_records_the_original_head_numbers():
    from types import SimpleNamespace
    from headprune.pruning import original_numbering
    config = SimpleNamespace(headprune={"physical": True, "kept_heads": [
        ["encoder", 0, 1], ["encoder", 0, 3], ["encoder", 1, 2]]})
    assert original_numbering(config, [("encoder", 0, 1), ("encoder", 1, 0)]) == [("encoder", 0, 3), ("encoder", 1, 2)]
    assert original_numbering(SimpleNamespace(), [("encoder", 0, 1)]) == [("encoder", 0, 1)]


def test_loading_builds_no_model_of_random_weights(tmp_path, monkeypatch):
    """load_pruned builds the pruned shapes on the meta device and takes the files' tensors as the
    weights (no full-size random model, no second copy); a model whose files leave a weight out
    (Marian's fixed sinusoidal positions) is built for real, and both give the saved outputs."""
    import headprune.pruning as pruning
    from test_seq2seq_heads import tiny_seq2seq
    real, built = pruning.model_from_config, []

    def model_from_config(*args, **kwargs):
        model = real(*args, **kwargs)
        built.append(all(p.is_meta for p in model.parameters()))
        return model
    monkeypatch.setattr(pruning, "model_from_config", model_from_config)
    model = tiny_model("bert", layers=3)
    batch = {"input_ids": torch.tensor([[1, 5, 7, 2]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    expected = masked_logits(model, KEPT, batch)
    save_pruned(model, tmp_path / "bert", KEPT)
    loaded = load_pruned(tmp_path / "bert")
    assert built == [True] and not any(p.is_meta for p in loaded.parameters())
    assert torch.allclose(loaded(**batch).logits, expected, atol=1e-5)
    # the weights are the model's own memory, not the file's: rewritten in place, it changes nothing loaded
    from safetensors.torch import load_file
    from safetensors.torch import save as to_bytes
    with open(tmp_path / "bert" / "model.safetensors", "r+b") as file:
        file.write(to_bytes({name: t * 0 for name, t in load_file(tmp_path / "bert" / "model.safetensors").items()}))
    assert torch.allclose(loaded(**batch).logits, expected, atol=1e-5)
    marian = tiny_seq2seq("marian").eval()
    kept = [(site.kind, site.layer, h) for site in find_sites(marian) for h in range(site.num_heads) if h != 1]
    save_pruned(marian, tmp_path / "marian", kept)
    built.clear()
    loaded = load_pruned(tmp_path / "marian")
    assert built == [True, False] and not any(p.is_meta for p in loaded.parameters())
    positions = loaded.model.encoder.embed_positions.weight
    assert torch.equal(positions, marian.model.encoder.embed_positions.weight) and positions.abs().sum() > 0
