"""Encoder-decoders (Marian, BART, T5, LongT5): gates on encoder self, decoder self and cross attention,
and physical removal that gives the masked model's logits and generations, with and without the
key/value cache, including layers left with no heads. T5's relative position bias, computed for
every head by each stack's first layer and handed on, is sliced per layer, also when a pruned
model is pruned again (LongT5's encoder: a bias per block, with the side bias to its global tokens)."""
import copy

import pytest
import torch
from transformers import (BartConfig, BartForConditionalGeneration, LongT5Config, LongT5ForConditionalGeneration,
                          MarianConfig, MarianMTModel, T5Config, T5ForConditionalGeneration)

from headprune import attach_gates, detach_gates
from headprune.pruning import load_pruned, remove_heads, save_pruned

# LongT5's encoder attends in blocks of 3 here (local radius 2): locally, or also to the means of
# every 2 tokens (transient-global); its bias holds the heads at another dim than T5's
SEQ2SEQ = ["marian", "bart", "t5", "longt5-local", "longt5-global"]
# every architecture with both attention kernels, but LongT5, which has eager attention only
WITH_KERNELS = [(arch, attn) for arch in SEQ2SEQ for attn in ("eager", "sdpa")
                if not (arch.startswith("longt5") and attn == "sdpa")]


def tiny_seq2seq(arch: str, attn: str = "eager", seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    if "t5" in arch:  # no biases; a relative position bias table in each stack's first layer
        common = dict(vocab_size=50, d_model=32, d_kv=8, d_ff=37, num_layers=layers, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=2, decoder_start_token_id=1, initializer_factor=3.0)
        if arch == "t5":
            config, cls = T5Config(**common), T5ForConditionalGeneration
        else:
            config = LongT5Config(**common, local_radius=2, global_block_size=2,
                                  encoder_attention_type="local" if arch == "longt5-local" else "transient-global")
            cls = LongT5ForConditionalGeneration
        config._attn_implementation = attn
        return cls(config).eval()
    common = dict(vocab_size=50, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
                  pad_token_id=0, eos_token_id=2, bos_token_id=1, decoder_start_token_id=1, init_std=0.3,
                  dropout=0.0, attention_dropout=0.0)
    cls, cfg = ((MarianMTModel, MarianConfig) if arch == "marian" else (BartForConditionalGeneration, BartConfig))
    config = cfg(**common)
    config._attn_implementation = attn
    return cls(config).eval()


@pytest.fixture
def source():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[2, 5:], mask[2, 5:] = 0, 0  # padding
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model, source, decoder_ids):
    with torch.no_grad():
        logits = model(**source, decoder_input_ids=decoder_ids).logits
        greedy = model.generate(**source, max_new_tokens=8, num_beams=1, do_sample=False)
        uncached = model.generate(**source, max_new_tokens=8, num_beams=1, do_sample=False, use_cache=False)
        beam = model.generate(**source, max_new_tokens=8, num_beams=3, do_sample=False)
        # a static cache: keys of its whole length from the first step (T5's bias is computed for them)
        static = model.generate(**source, max_new_tokens=8, num_beams=1, do_sample=False, cache_implementation="static")
    return logits, greedy, uncached, beam, static


def masked(model, kept, fn):
    gates = attach_gates(model)
    gates.set_mask(torch.tensor([float(h in kept) for h in gates.heads]))
    try:
        return fn(model)
    finally:
        detach_gates(model)


DECODER_IDS = torch.tensor([[1, 5, 9, 4], [1, 7, 7, 3], [1, 3, 8, 11]])


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_heads_of_all_three_kinds_are_found(arch):
    gates = attach_gates(tiny_seq2seq(arch))
    assert gates.num_heads == 24
    assert [(k, sum(h[0] == k for h in gates.heads)) for k in ("encoder", "decoder", "cross")] == \
        [("encoder", 8), ("decoder", 8), ("cross", 8)]


@pytest.mark.parametrize("arch,attn", WITH_KERNELS)
def test_gates_at_one_change_nothing(arch, attn, source):
    model = tiny_seq2seq(arch, attn)
    plain = outputs(model, source, DECODER_IDS)
    gated = masked(model, set(attach_gates(copy.deepcopy(model)).heads), lambda m: outputs(m, source, DECODER_IDS))
    assert torch.allclose(gated[0], plain[0], atol=1e-6)
    for a, b in zip(gated[1:], plain[1:]):
        assert torch.equal(a, b)


# layer 0: every decoder-self and cross head gone, encoder layer 0 empty too; layer 1: some of each
KEPT = [("encoder", 1, 1), ("encoder", 1, 3), ("decoder", 1, 0), ("decoder", 1, 2), ("decoder", 1, 3),
        ("cross", 1, 2)]


@pytest.mark.parametrize("arch,attn", WITH_KERNELS)
def test_physical_removal_equals_the_mask_with_and_without_the_cache(arch, attn, source):
    model = tiny_seq2seq(arch, attn)
    expected = masked(model, KEPT, lambda m: outputs(m, source, DECODER_IDS))
    pruned = remove_heads(copy.deepcopy(model), KEPT)
    got = outputs(pruned, source, DECODER_IDS)
    # float32 sums over fewer heads: LongT5's transient-global logits (up to 34 here) differ by 7e-5
    assert torch.allclose(got[0], expected[0], atol=1e-5 * max(1.0, float(expected[0].abs().max())))
    assert not torch.allclose(got[0], model(**source, decoder_input_ids=DECODER_IDS).logits, atol=1e-3)
    for a, b in zip(got[1:], expected[1:]):
        assert torch.equal(a, b)
    assert torch.equal(got[1], got[2]) and torch.equal(got[1], got[4])  # cached (dynamic, static) = uncached,
    # with decoder layers of no heads
    gates = attach_gates(pruned)  # the smaller model can be gated again; dead heads do not count
    assert [(s.kind, s.layer, s.num_heads) for s in gates.sites] == [
        ("encoder", 0, 0), ("encoder", 1, 2), ("decoder", 0, 0), ("decoder", 1, 3), ("cross", 0, 0), ("cross", 1, 1)]


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_random_masks_per_kind(arch, source):
    g = torch.Generator().manual_seed(3)
    for trial in range(3):
        model = tiny_seq2seq(arch, "eager" if arch.startswith("longt5") else "sdpa", seed=trial)
        heads = attach_gates(model).heads
        detach_gates(model)
        kept = [h for h, keep in zip(heads, torch.rand(len(heads), generator=g) < 0.4) if keep]
        expected = masked(model, kept, lambda m: outputs(m, source, DECODER_IDS))
        got = outputs(remove_heads(model, kept), source, DECODER_IDS)
        # float32 sums over fewer heads, to the scale of the logits: T5's reach 30 here (initializer_factor
        # 3), and with transformers 5.25 its sdpa path differs by up to 1e-3 (3e-5 of that scale); the
        # tokens generated agree exactly
        assert torch.allclose(got[0], expected[0], atol=1e-4 * float(expected[0].abs().max()))
        assert all(torch.equal(a, b) for a, b in zip(got[1:], expected[1:]))


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_save_and_load_gives_identical_generations(arch, source, tmp_path):
    model = tiny_seq2seq(arch)
    expected = masked(model, KEPT, lambda m: outputs(m, source, DECODER_IDS))
    save_pruned(model, tmp_path, KEPT, method="test")
    loaded = load_pruned(tmp_path)  # the class comes from config.architectures
    assert type(loaded) is type(model)
    got = outputs(loaded.eval(), source, DECODER_IDS)
    assert torch.allclose(got[0], expected[0], atol=1e-5 * max(1.0, float(expected[0].abs().max())))
    assert all(torch.equal(a, b) for a, b in zip(got[1:], expected[1:]))
    full = sum(p.numel() for p in tiny_seq2seq(arch).parameters())
    # removed: 24 - 6 kept heads, less the 2 dead heads kept for the cache (decoder 0, cross 0);
    # T5's projections have no biases, and its position bias tables keep every head
    per_head = 3 * (32 * 8 + ("t5" not in arch) * 8) + 32 * 8
    assert sum(p.numel() for p in loaded.parameters()) == full - (24 - 6 - 2) * per_head


@pytest.mark.parametrize("arch", ["marian", "t5", "longt5-global"])
def test_measure_times_generation_side_by_side(arch, tmp_path):
    import json
    from headprune.cli import main
    save_pruned(tiny_seq2seq(arch), tmp_path / "pruned", KEPT)
    assert main(["measure", "--pruned", str(tmp_path / "pruned"), "--batch-sizes", "2", "--lengths", "8",
                 "--repeats", "2", "--warmup", "1", "--beams", "1", "3", "--generate-tokens", "5",
                 "--output-dir", str(tmp_path / "m")]) == 0
    result = json.loads((tmp_path / "m" / "measure.json").read_text())
    assert result["heads"] == {"original": 24, "pruned": 6}
    # asked for sdpa (the default), LongT5 runs eager attention, which is all transformers gives it
    assert result["attn_implementation"] == ("eager" if arch.startswith("longt5") else "sdpa")
    assert [(r["beams"], r["new_tokens"]) for r in result["generation"]] == [(1, 5), (3, 5)]
    for row in result["generation"]:
        assert row["tokens_per_second"]["pruned"] == pytest.approx(2 * 5 / row["seconds"]["pruned"])
        assert row["predicted_speedup"] == result["settings"][0]["predicted_speedup"] > 1
    assert "| 2 | 8 | 3 |" in (tmp_path / "m" / "measure.md").read_text()


@pytest.mark.parametrize("arch,attn", [("t5", "eager"), ("t5", "sdpa"), ("longt5-global", "eager")])
def test_t5_pruned_again_takes_its_slice_of_the_position_bias_by_original_numbers(arch, attn, source, tmp_path):
    model = tiny_seq2seq(arch, attn, layers=3)
    first = [("encoder", 0, 1), ("encoder", 0, 3), ("encoder", 1, 0), ("encoder", 1, 2), ("encoder", 1, 3),
             ("encoder", 2, 2), ("decoder", 0, 2), ("decoder", 1, 1), ("decoder", 1, 3), ("decoder", 2, 0),
             ("cross", 0, 0), ("cross", 1, 1), ("cross", 2, 2), ("cross", 2, 3)]
    # then, in the pruned model's numbers: encoder layer 0 keeps its second head (originally 3),
    # layer 1 its third (3), layer 2 none; decoder 1 its second (3); cross 2 its first (2)
    second = [("encoder", 0, 1), ("encoder", 1, 2), ("decoder", 0, 0), ("decoder", 1, 1), ("decoder", 2, 0),
              ("cross", 0, 0), ("cross", 1, 0), ("cross", 2, 0)]
    original = [("encoder", 0, 3), ("encoder", 1, 3), ("decoder", 0, 2), ("decoder", 1, 3), ("decoder", 2, 0),
                ("cross", 0, 0), ("cross", 1, 1), ("cross", 2, 2)]
    expected = masked(model, original, lambda m: outputs(m, source, DECODER_IDS))
    save_pruned(model, tmp_path / "once", first)
    again = load_pruned(tmp_path / "once")
    save_pruned(again, tmp_path / "twice", second)  # removes the heads of `again` in place: pruned twice
    twice = load_pruned(tmp_path / "twice")  # rebuilt from the original shapes in one go
    assert sorted(map(tuple, twice.config.headprune["kept_heads"])) == sorted(original)
    for pruned in (again, twice):
        got = outputs(pruned, source, DECODER_IDS)
        # logits up to 27 in size through 3 layers of T5 (unscaled scores): float32 rounding reaches 2e-4
        assert torch.allclose(got[0], expected[0], atol=1e-3)
        assert all(torch.equal(a, b) for a, b in zip(got[1:], expected[1:]))


@pytest.mark.parametrize("arch", ["marian", "bart"])  # T5 needs headprune's loader (its shared position bias)
def test_the_plain_transformers_recipe_of_usage_md_loads_a_pruned_seq2seq_model(arch, source, tmp_path):
    """The code block of docs/usage.md, run as written (on folders of ours)."""
    from pathlib import Path
    doc = (Path(__file__).parent.parent / "docs" / "usage.md").read_text()
    block = doc.split("<!-- plain-transformers-loading-seq2seq")[1].split("```python\n")[1].split("```")[0]
    kept = KEPT + [("encoder", 0, 2)]  # every encoder layer keeps a head; decoder 0 and cross 0 none
    model = tiny_seq2seq(arch)
    expected = masked(model, kept, lambda m: outputs(m, source, DECODER_IDS))
    save_pruned(model, tmp_path, kept)
    scope = {}
    exec(block.replace('"runs/mt-dsp18/model"', repr(str(tmp_path))), scope)
    got = outputs(scope["model"], source, DECODER_IDS)
    assert torch.allclose(got[0], expected[0], atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(got[1:], expected[1:]))
    save_pruned(tiny_seq2seq(arch), tmp_path / "empty", KEPT)  # encoder layer 0 has no heads
    with pytest.raises(ValueError, match="encoder layers with no heads: load it with headprune.load_pruned"):
        exec(block.replace('"runs/mt-dsp18/model"', repr(str(tmp_path / "empty"))), {})


def test_a_t5_classifier_is_pruned_in_all_three_kinds(tmp_path):
    from conftest import tiny, write_tiny_assets
    from headprune.config import FinetuneConfig
    from headprune.recipes import finetune, prune
    model, data = write_tiny_assets(tmp_path / "assets", arch="t5")
    finetune(FinetuneConfig(model=str(model), dataset=str(data), epochs=2, batch_size=16, output_dir=str(tmp_path / "ft"),
                            checkpoint_every=0))
    joint = prune(tiny(model, data, tmp_path / "joint", k=4, mode="joint", method="ste"))  # from the bare T5
    assert joint["mode"] == "joint" and joint["k"] == 4
    results = prune(tiny(tmp_path / "ft" / "model", data, tmp_path / "p", k=5, method="fisher", reconstruct="bias"))
    assert results["k"] == 5 and results["num_heads"] == 24  # 2 layers x 4 heads x 3 kinds
    loaded = load_pruned(tmp_path / "p" / "model")
    assert type(loaded).__name__ == "T5ForSequenceClassification"
    assert sum(s.num_heads for s in attach_gates(loaded).sites) == 5
