"""Models whose queries, keys and values come from one projection (issue 23): ModernBERT (an
encoder, in blocks), GPT-2 (a Conv1D, in
blocks of query, key and value heads), GPT-NeoX and Pythia (per head its query, key and value
rows), Phi-3 (in blocks, grouped keys and values; its forward reads the head count from the
config) and GPTBigCode (multi-query: every query head, then one key and one value head; or per head). Gates at 1 change nothing, removal slices the right rows and equals the mask with and
without the cache, save and load give the same outputs, and every method runs end to end."""
import json

import pytest
import torch
from conftest import write_tiny_lm
from test_causal_lm import lm_cfg, saved_perplexity
from test_llm_heads import masked, outputs, same
from transformers import (GPT2Config, GPT2LMHeadModel, GPTBigCodeConfig, GPTBigCodeForCausalLM, GPTNeoXConfig,
                          GPTNeoXForCausalLM, Phi3Config, Phi3ForCausalLM)

from headprune import attach_gates, detach_gates
from headprune.pruning import load_pruned, remove_heads, save_pruned
from headprune.recipes import prune
from headprune.sites import find_sites

COMMON = dict(vocab_size=61, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, max_position_embeddings=64,
              initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_fused(arch: str, attn: str = "eager"):
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(**COMMON, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cls = GPT2LMHeadModel
    elif arch.startswith("gpt_bigcode"):  # gpt_bigcode: multi-query; gpt_bigcode_mha: a key/value head per head
        config = GPTBigCodeConfig(**COMMON, multi_query=arch == "gpt_bigcode", resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
        cls = GPTBigCodeForCausalLM
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(**COMMON, intermediate_size=64, rotary_pct=0.5, attention_bias=True)
        cls = GPTNeoXForCausalLM
    else:
        config = Phi3Config(**COMMON, intermediate_size=64, num_key_value_heads=2)
        cls = Phi3ForCausalLM
    config._attn_implementation = attn
    model = cls(config).eval()
    with torch.no_grad():  # biases too, so that slicing them wrongly shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    return model


@pytest.fixture
def prompt():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 61, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def test_each_heads_rows_in_the_fused_projection():
    gpt2, neox, phi3 = (find_sites(tiny_fused(a))[0] for a in ("gpt2", "gpt_neox", "phi3"))
    assert (gpt2.query_heads, gpt2.kv_heads, gpt2.num_heads) == (6, 6, 6) and gpt2.query is gpt2.key is gpt2.value
    # GPT-2: 6 query heads of 8, then 6 key heads, then 6 value heads (Conv1D: columns of its weight)
    assert gpt2.rows("key", [1])[:2] == [56, 57] and gpt2.rows("value", [0])[0] == 96
    assert gpt2.fused_rows([2], [2]) == [*range(16, 24), *range(64, 72), *range(112, 120)]
    # GPT-NeoX: per head 24 rows: its query, key and value
    assert neox.rows("query", [1])[0] == 24 and neox.rows("key", [1])[0] == 32 and neox.rows("value", [1])[0] == 40
    assert neox.fused_rows([1], [1]) == list(range(24, 48))
    # Phi-3: 6 query heads, then 2 key heads, then 2 value heads, of 8; a KV group is 3 query heads
    assert (phi3.query_heads, phi3.kv_heads, phi3.num_heads) == (6, 2, 2)
    assert phi3.fused_rows(phi3.query_heads_of([1]), phi3.kv_heads_of([1])) == [
        *range(24, 48), *range(56, 64), *range(72, 80)]
    # GPTBigCode, multi-query: 6 query heads, then the key head, then the value head; one group a
    # layer (its query heads by --unit query); without multi-query, per head as GPT-NeoX
    mq, query, mha = (find_sites(tiny_fused(a), u)[0] for a, u in (("gpt_bigcode", "group"), ("gpt_bigcode", "query"),
                                                                     ("gpt_bigcode_mha", "group")))
    assert (mq.query_heads, mq.kv_heads, mq.num_heads, query.num_heads) == (6, 1, 1, 6)
    assert query.fused_rows(query.query_heads_of([2]), query.kv_heads_of([2])) == [*range(16, 24), *range(48, 64)]
    assert (mha.num_heads, mha.fused) == (6, "heads") and mha.fused_rows([1], [1]) == list(range(24, 48))


FUSED = ["gpt2", "gpt_neox", "phi3", "gpt_bigcode", "gpt_bigcode_mha"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", FUSED)
def test_gates_at_one_change_nothing(arch, attn, prompt):
    model = tiny_fused(arch, attn)
    expected = outputs(model, prompt)
    every = list(attach_gates(model, "group").heads)
    detach_gates(model)
    same(masked(model, every, "group", lambda m: outputs(m, prompt)), expected)


# layer 0 keeps units 1 and 4 (Phi-3: group 1; multi-query GPTBigCode: its one group), layer 1 one,
# layer 2 none (one dead head keeps the cache)
KEPT = {"gpt2": [("decoder", 0, 1), ("decoder", 0, 4), ("decoder", 1, 5)],
        "gpt_neox": [("decoder", 0, 1), ("decoder", 0, 4), ("decoder", 1, 5)],
        "phi3": [("decoder", 0, 1), ("decoder", 1, 0)],
        "gpt_bigcode": [("decoder", 0, 0), ("decoder", 1, 0)],
        "gpt_bigcode_mha": [("decoder", 0, 1), ("decoder", 0, 4), ("decoder", 1, 5)]}
HEADS_LEFT = {"phi3": [1, 1, 0], "gpt_bigcode": [1, 1, 0]}  # the others: [2, 1, 0]
# the rows of the fused projection left: a head's query, key and value: 3 x 8; a Phi-3 group's: 3 query
# heads, a key and a value head; a multi-query layer's: 6 query heads and one key and one value head;
# the last layer's dead unit keeps one query head and its key and value head: 3 x 8
ROWS_LEFT = {"phi3": [40, 40, 24], "gpt_bigcode": [64, 64, 24]}  # the others: [48, 24, 24]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", FUSED)
def test_physical_removal_equals_the_mask_with_and_without_the_cache(arch, attn, prompt):
    model = tiny_fused(arch, attn)
    expected = masked(model, KEPT[arch], "group", lambda m: outputs(m, prompt))
    remove_heads(model, KEPT[arch], "group")
    same(outputs(model, prompt), expected)
    sites = find_sites(model)
    assert [s.num_heads for s in sites] == HEADS_LEFT.get(arch, [2, 1, 0])
    fused = [s.query for s in sites]
    width = [f.weight.shape[1] if arch == "gpt2" else f.weight.shape[0] for f in fused]
    assert width == ROWS_LEFT.get(arch, [48, 24, 24])
    if arch == "gpt2":
        assert [s.attention.split_size for s in sites] == [16, 8, 8]
    if arch == "phi3":  # its forward reads the query heads from the config: a view with the layer's own
        assert [s.attention.config.num_attention_heads for s in sites] == [3, 3, 1]
        assert model.config.num_attention_heads == 6 and sites[0].attention.config.hidden_size == 48
    if arch == "gpt_bigcode":  # its forward splits the fused output at the query heads' width
        assert [s.attention.embed_dim for s in sites] == [48, 48, 8]


@pytest.mark.parametrize("arch", FUSED)
def test_save_and_load_gives_identical_logits_and_generations(arch, prompt, tmp_path):
    model = tiny_fused(arch)
    expected = masked(model, KEPT[arch], "group", lambda m: outputs(m, prompt))
    save_pruned(model, tmp_path, KEPT[arch], unit="group")
    loaded = load_pruned(tmp_path)
    assert type(loaded) is type(model)
    same(outputs(loaded, prompt), expected)
    loaded.set_attn_implementation("sdpa")  # the per-layer config of Phi-3 follows the model's kernel
    same(outputs(loaded, prompt), expected)


@pytest.fixture(scope="module")
def tiny_fused_lms(tmp_path_factory):
    return {arch: write_tiny_lm(tmp_path_factory.mktemp(arch), arch=arch)
            for arch in ("gpt2", "gpt_neox", "phi3", "gpt_bigcode")}


@pytest.mark.parametrize("arch,method,mode,reconstruct", [
    ("gpt2", "dsp", "pipelined", "none"), ("gpt2", "dsp", "joint", "none"), ("gpt2", "michel", "pipelined", "none"),
    ("gpt2", "taylor", "pipelined", "both"), ("gpt2", "flap", "pipelined", "bias"),
    ("gpt_neox", "voita", "pipelined", "none"), ("gpt_neox", "fisher", "pipelined", "rescale"),
    ("gpt_neox", "activation", "pipelined", "none"), ("phi3", "ste", "joint", "none"),
    ("phi3", "taylor", "pipelined", "bias"), ("phi3", "fisher", "pipelined", "both"),
    ("gpt_bigcode", "dsp", "pipelined", "bias"), ("gpt_bigcode", "michel", "pipelined", "none")])
def test_every_method_and_the_saved_model_scores_the_same(tiny_fused_lms, tmp_path, arch, method, mode, reconstruct):
    model, data = tiny_fused_lms[arch]
    unit = "query" if arch == "gpt_bigcode" else "group"  # multi-query: its query heads (a group is a layer)
    results = prune(lm_cfg(model, data, tmp_path, method=method, mode=mode, reconstruct=reconstruct, michel_step=1,
                           lr=1e-3, unit=unit))
    assert results["k"] == 3 and results["num_heads"] == (18 if arch != "phi3" else 6)
    assert saved_perplexity(tmp_path / "model", data) == pytest.approx(results["metrics_pruned"]["validation"], rel=1e-4)
    assert sum(s.num_heads for s in find_sites(load_pruned(tmp_path / "model"), unit)) == 3  # (by group, the query
    # heads kept in one layer would count as one)


# -- ModernBERT: an encoder with one projection for queries, keys and values -------------------------

@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 99, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def classify(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_modernbert_gates_removal_and_reload(attn, batch, tmp_path):
    from conftest import tiny_model
    model = tiny_model("modernbert", attn, layers=3)  # 3 layers x 4 heads; layers 0 and 2 global, 1 local
    site = find_sites(model)[0]
    assert (site.kind, site.num_heads, site.fused) == ("encoder", 4, "blocks") and site.rows("value", [1])[0] == 72
    before = classify(model, batch)
    every = list(attach_gates(model).heads)
    detach_gates(model)
    assert torch.allclose(masked(model, every, "group", lambda m: classify(m, batch)), before, atol=1e-6)
    kept = [("encoder", 0, 1), ("encoder", 0, 3), ("encoder", 2, 2)]  # layer 1 keeps none: it skips attention
    expected = masked(model, kept, "group", lambda m: classify(m, batch))
    assert not torch.allclose(expected, before, atol=1e-3)
    save_pruned(model, tmp_path, kept)
    loaded = load_pruned(tmp_path)
    assert [s.num_heads for s in find_sites(loaded)] == [2, 0, 1]
    assert torch.allclose(classify(loaded, batch), expected, atol=1e-6)


@pytest.mark.parametrize("method,reconstruct", [("dsp", "none"), ("flap", "both"), ("taylor", "none")])
def test_modernbert_classifier_pruned_by_each_method(method, reconstruct, tmp_path_factory, tmp_path):
    from conftest import finetuned_tiny, tiny
    model, data = finetuned_tiny("modernbert", tmp_path_factory)
    results = prune(tiny(model, data, tmp_path, method=method, reconstruct=reconstruct))
    assert results["k"] == 3 and results["num_heads"] == 8
    assert sum(s.num_heads for s in find_sites(load_pruned(tmp_path / "model"))) == 3


@pytest.mark.parametrize("arch", FUSED)
def test_measure_counts_the_fused_projection_and_times_generation(arch, tmp_path):
    from headprune.config import MeasureConfig
    from headprune.measuring import measure
    save_pruned(tiny_fused(arch), tmp_path, KEPT[arch], unit="group")
    result = measure(MeasureConfig(pruned=str(tmp_path), batch_sizes=[2], lengths=[8], repeats=2, warmup=0, beams=[1],
                                   generate_tokens=3), progress=lambda *_: None)
    # keys and values cached per token, float32: 3 layers x the kept (or dead) key/value heads x 8 x 2 x 4 bytes
    kv = {"phi3": (6, 3), "gpt_bigcode": (3, 3)}.get(arch, (18, 4))
    assert result["kv_cache_bytes_per_token"] == {"original": kv[0] * 64, "pruned": kv[1] * 64}
    row = result["settings"][0]
    assert row["attention_flops"]["pruned"] < row["attention_flops"]["original"] and result["generation"]


def test_modernbert_pruned_jointly(tmp_path):
    from conftest import tiny, write_tiny_assets
    model, data = write_tiny_assets(tmp_path / "assets", arch="modernbert")
    results = prune(tiny(model, data, tmp_path / "joint", mode="joint", k=3, epochs=2))
    assert results["mode"] == "joint" and results["k"] == 3
    assert sum(s.num_heads for s in find_sites(load_pruned(tmp_path / "joint" / "model"))) == 3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_phi3_by_query_position(attn, prompt):
    model = tiny_fused("phi3", attn)  # 3 query positions a layer (6 query heads in 2 groups)
    kept = [("decoder", 0, 0), ("decoder", 0, 2), ("decoder", 1, 1)]
    expected = masked(model, kept, "query", lambda m: outputs(m, prompt))
    remove_heads(model, kept, "query")
    same(outputs(model, prompt), expected)
    sites = find_sites(model, "query")
    assert [s.num_heads for s in sites] == [2, 1, 0] and [s.kv_heads for s in sites] == [2, 2, 1]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_multi_query_gpt_bigcode_by_query_head(attn, prompt, tmp_path):
    model = tiny_fused("gpt_bigcode", attn)  # 6 query heads a layer sharing one key/value head
    kept = [("decoder", 0, 0), ("decoder", 0, 3), ("decoder", 0, 5), ("decoder", 1, 2)]
    expected = masked(model, kept, "query", lambda m: outputs(m, prompt))
    save_pruned(model, tmp_path, kept, unit="query")  # removes the heads from model, then saves it
    same(outputs(model, prompt), expected)
    sites = find_sites(model, "query")
    assert [s.num_heads for s in sites] == [3, 1, 0] and [s.kv_heads for s in sites] == [1, 1, 1]
    assert [s.attention.embed_dim for s in sites] == [24, 8, 8]
    same(outputs(load_pruned(tmp_path), prompt), expected)


@pytest.mark.parametrize("arch, kv_heads, unit, warned", [
    ("gpt_bigcode", 1, "group", True), ("gpt_bigcode", 1, "query", False), ("llama", 2, "group", False),
    ("gpt_bigcode", 1, None, False)])  # None: fine-tuning, which prunes nothing
def test_a_multi_query_model_pruned_by_kv_group_is_told_a_group_is_a_layer(arch, kv_heads, unit, warned, tmp_path,
                                                                           caplog):
    from headprune.tasks import get_task
    write_tiny_lm(tmp_path, arch=arch, kv_heads=kv_heads, n_train=4, n_eval=2)
    with caplog.at_level("WARNING", logger="headprune"):
        _, _, counts, _ = get_task("causal-lm").inspect(str(tmp_path / "model"), require_finetuned=False, unit=unit)
    assert counts == {"decoder": 3 * (6 if unit == "query" else kv_heads)}  # None counts by group
    assert ("one KV group (multi-query attention)" in caplog.text) == warned


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_query_positions_of_groups_of_one_query_head_are_refused(arch, tmp_path):
    """GPT-2's heads, and a Llama whose every group holds one query head: a query position would be
    a layer's whole attention. Refused before anything loads; the default unit prunes their heads."""
    from headprune.errors import ConfigError
    from headprune.tasks import get_task
    write_tiny_lm(tmp_path, arch=arch, kv_heads=6, n_train=4, n_eval=2)
    task = get_task("causal-lm")
    with pytest.raises(ConfigError, match="each group of .* holds one query head, so a query position would be a "
                                          "layer's whole attention"):
        task.inspect(str(tmp_path / "model"), require_finetuned=False, unit="query")
    assert task.inspect(str(tmp_path / "model"), require_finetuned=False, unit="group")[2] == {"decoder": 18}
    config = json.loads((tmp_path / "model" / "config.json").read_text())  # pruned before, zeroed: the same shapes
    config["headprune"] = {"kept_heads": [["decoder", 0, 0]], "physical": False, "unit": "group"}
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="a query position would be a layer's whole attention"):
        task.inspect(str(tmp_path / "model"), require_finetuned=False, unit="query")


def test_a_key_value_group_of_one_query_head_is_called_a_head(tmp_path):
    """GPT-2 and GPT-NeoX give each query head its own keys and values: logs, results and measure's
    table say heads, not KV groups; Phi-3's groups of three stay KV groups."""
    from headprune.config import MeasureConfig
    from headprune.measuring import markdown, measure
    assert [find_sites(tiny_fused(a))[0].unit for a in ("gpt2", "gpt_neox", "gpt_bigcode_mha", "phi3")] == [
        "head", "head", "head", "group"]
    save_pruned(tiny_fused("gpt2"), tmp_path, KEPT["gpt2"], unit="group")
    result = measure(MeasureConfig(pruned=str(tmp_path), batch_sizes=[1], lengths=[4], repeats=1, warmup=0, beams=[1],
                                   generate_tokens=1), progress=lambda *_: None)
    assert result["unit"] == "head" and markdown(result).startswith(f"Heads 18 -> {len(KEPT['gpt2'])};")
    # a tiny model's GFLOPs in three significant figures, not "0.00"
    cells = markdown(result).splitlines()[4].split("|")
    flops = result["settings"][0]["flops"]
    assert [float(cells[3]), float(cells[4])] == pytest.approx([flops["original"] / 1e9, flops["pruned"] / 1e9], rel=5e-3)
