"""Decoder-only models with grouped-query attention (Llama layout): gates per KV group or per query
position, physical removal equal to the mask with and without the KV cache, empty layers, save/load."""
import pytest
import torch
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                          Gemma3TextConfig, GptOssConfig, GptOssForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from headprune import attach_gates, detach_gates
from headprune.errors import UnsupportedArchitectureError
from headprune.pruning import load_pruned, remove_heads, save_pruned
from headprune.sites import find_sites


ARCHS = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen3": (Qwen3ForCausalLM, Qwen3Config),
         "gemma2": (Gemma2ForCausalLM, Gemma2Config), "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig),
         "cohere": (CohereForCausalLM, CohereConfig), "gpt_oss": (GptOssForCausalLM, GptOssConfig)}


def tiny_llm(arch="llama", heads=6, kv_heads=2, layers=3, attn="eager", seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=61, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.3, tie_word_embeddings=True)
    if arch.startswith("gemma"):
        # head_dim 12 with 6 heads in a width of 48 (not 48 / 6), sliding windows of 4 tokens on the
        # first and last layer (shorter than the prompts), Gemma 2's soft-capped attention logits
        common.update(head_dim=12, sliding_window=4, query_pre_attn_scalar=12,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"][:layers])
        if arch == "gemma2":
            common.update(attn_logit_softcapping=5.0, final_logit_softcapping=30.0)
    if arch == "cohere":  # a query and a key norm of each head's own
        common.update(use_qk_norm=True)
    if arch == "gpt_oss":  # an attention sink per head, sliding windows of 4 tokens, 2 experts
        common.update(num_local_experts=2, num_experts_per_tok=1, sliding_window=4,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"][:layers])
    cls, cfg = ARCHS[arch]
    config = cfg(**common)
    config._attn_implementation = attn
    model = cls(config).eval()
    if arch == "cohere":  # its norms start at one: give each head weights of its own
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1.0, 0.5)
                layer.self_attn.k_norm.weight.normal_(1.0, 0.5)
    return model


@pytest.fixture
def prompt():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 61, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding, as for generation
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model, prompt):
    with torch.no_grad():  # logits at the real (not padding) positions: padding's differ by kernel
        logits = model(**prompt).logits[prompt["attention_mask"].bool()]
        cached = model.generate(**prompt, max_new_tokens=6, do_sample=False)
        uncached = model.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    return logits, cached, uncached


def masked(model, kept, unit, fn):
    gates = attach_gates(model, unit)
    gates.set_mask(torch.tensor([float(h in kept) for h in gates.heads]))
    try:
        return fn(model)
    finally:
        detach_gates(model)


def same(got, expected):
    assert torch.allclose(got[0], expected[0], atol=5e-5)
    assert all(torch.equal(a, b) for a, b in zip(got[1:], expected[1:]))


def test_units_of_a_gqa_model():
    model = tiny_llm()  # 3 layers x 6 query heads, 2 key/value heads: 3 query heads per group
    groups, queries = find_sites(model, "group"), find_sites(model, "query")
    assert [s.num_heads for s in groups] == [2, 2, 2] and [s.num_heads for s in queries] == [3, 3, 3]
    assert groups[0].query_heads_of([1]) == [3, 4, 5] and groups[0].kv_heads_of([1]) == [1]
    assert queries[0].query_heads_of([0, 2]) == [0, 2, 3, 5] and queries[0].kv_heads_of([0]) == [0, 1]
    assert {s.kind for s in groups} == {"decoder"}
    mha = find_sites(tiny_llm(kv_heads=6), "group")  # plain multi-head attention: a group is a head
    assert [s.num_heads for s in mha] == [6, 6, 6]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("unit", ["group", "query"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gates_at_one_change_nothing(arch, unit, attn, prompt):
    model = tiny_llm(arch, attn=attn)
    expected = outputs(model, prompt)
    every = [h for h in attach_gates(model, unit).heads]
    detach_gates(model)
    same(masked(model, every, unit, lambda m: outputs(m, prompt)), expected)


CASES = {
    # layer 0 keeps group 1, layer 1 both, layer 2 none (a dead group keeps the cache right)
    ("llama", "group", 2): [("decoder", 0, 1), ("decoder", 1, 0), ("decoder", 1, 1)],
    # query positions 0 and 2 of layer 0, position 1 of layer 1, none of layer 2
    ("llama", "query", 2): [("decoder", 0, 0), ("decoder", 0, 2), ("decoder", 1, 1)],
    # plain multi-head attention (a group per head), and Qwen3 (per-head q/k norms)
    ("llama", "group", 6): [("decoder", 0, 1), ("decoder", 0, 4), ("decoder", 1, 5), ("decoder", 2, 0)],
    ("qwen3", "group", 2): [("decoder", 0, 0), ("decoder", 2, 1)],
    # Gemma 2 and 3: head_dim not width / heads, sliding windows, soft-capping (Gemma 2), q/k norms (3)
    ("gemma2", "group", 2): [("decoder", 0, 1), ("decoder", 1, 0), ("decoder", 1, 1)],
    ("gemma3", "query", 2): [("decoder", 0, 0), ("decoder", 0, 2), ("decoder", 2, 1)],
    # Cohere's norms and GPT-OSS's sinks have a row per head: sliced with them
    ("cohere", "group", 2): [("decoder", 0, 1), ("decoder", 1, 0), ("decoder", 1, 1)],
    ("cohere", "query", 2): [("decoder", 0, 0), ("decoder", 0, 2), ("decoder", 1, 1)],
    ("gpt_oss", "group", 2): [("decoder", 0, 1), ("decoder", 1, 0), ("decoder", 1, 1)],
    ("gpt_oss", "query", 2): [("decoder", 0, 0), ("decoder", 0, 2), ("decoder", 2, 1)],
}
EAGER_ONLY = ("gemma2", "gpt_oss")  # soft-capped logits, attention sinks: transformers runs them eager only


@pytest.mark.parametrize("case,attn", [(c, a) for c in CASES for a in ("eager", "sdpa")
                                      if not (c[0] in EAGER_ONLY and a == "sdpa")],
                         ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else c)
def test_physical_removal_equals_the_mask_with_and_without_the_cache(case, attn, prompt):
    arch, unit, kv_heads = case
    kept = CASES[case]
    model = tiny_llm(arch, kv_heads=kv_heads, attn=attn)
    expected = masked(model, kept, unit, lambda m: outputs(m, prompt))
    full = sum(p.numel() for p in model.parameters())
    remove_heads(model, kept, unit)
    same(outputs(model, prompt), expected)
    assert sum(p.numel() for p in model.parameters()) < full
    assert sum(s.num_heads for s in find_sites(model, unit)) == len(kept)


def test_removing_groups_shrinks_the_kv_cache_and_keeps_the_group_size(prompt):
    model = tiny_llm()
    remove_heads(model, CASES[("llama", "group", 2)], "group")
    attn = [layer.self_attn for layer in model.model.layers]
    assert [a.k_proj.out_features // 8 for a in attn] == [1, 2, 1]  # layer 2: its dead group
    assert [a.q_proj.out_features // 8 for a in attn] == [3, 6, 1]
    assert [a.num_key_value_groups for a in attn] == [3, 3, 1]
    model = tiny_llm()
    remove_heads(model, CASES[("llama", "query", 2)], "query")
    attn = [layer.self_attn for layer in model.model.layers]
    assert [a.k_proj.out_features // 8 for a in attn] == [2, 2, 1]  # every group stays
    assert [a.num_key_value_groups for a in attn] == [2, 1, 1]


@pytest.mark.parametrize("unit", ["group", "query"])
def test_save_and_load_gives_identical_logits_and_generations(unit, prompt, tmp_path):
    kept = CASES[("llama", unit, 2)]
    model = tiny_llm()
    expected = masked(model, kept, unit, lambda m: outputs(m, prompt))
    save_pruned(model, tmp_path, kept, unit=unit)
    loaded = load_pruned(tmp_path)
    assert type(loaded) is LlamaForCausalLM
    same(outputs(loaded, prompt), expected)
    assert sum(s.num_heads for s in find_sites(loaded, unit)) == len(kept)
    # pruned again: the record keeps the original numbers, and the unit must stay the same
    save_pruned(loaded, tmp_path / "again", [("decoder", 1, 0)], unit=unit)
    assert load_pruned(tmp_path / "again").config.headprune["kept_heads"] == [list(kept[1])] if unit == "group" \
        else [["decoder", 1, 1]]
    with pytest.raises(ValueError, match=f"pruned by {unit} before"):
        save_pruned(load_pruned(tmp_path), tmp_path / "other", [], unit={"group": "query", "query": "group"}[unit])


def test_query_units_need_grouped_keys_and_values():
    from tests.test_seq2seq_heads import tiny_seq2seq
    with pytest.raises(UnsupportedArchitectureError, match="no key/value groups"):
        find_sites(tiny_seq2seq("bart"), "query")


def test_measure_reports_the_kv_cache_and_times_generation(tmp_path):
    from headprune.config import MeasureConfig
    from headprune.measuring import markdown, measure
    save_pruned(tiny_llm(), tmp_path / "pruned", CASES[("llama", "group", 2)], unit="group")
    result = measure(MeasureConfig(pruned=str(tmp_path / "pruned"), batch_sizes=[1, 8], lengths=[8], repeats=2,
                                   warmup=0, beams=[1], generate_tokens=4), progress=lambda *_: None)
    # keys and values of 3 layers x 2 KV heads x 8 dims x 4 bytes; pruned: 1 + 2 + 1 (dead) KV heads
    assert result["kv_cache_bytes_per_token"] == {"original": 384, "pruned": 256}
    assert result["heads"] == {"original": 6, "pruned": 3} and result["unit"] == "group"
    assert [(r["batch"], r["beams"]) for r in result["generation"]] == [(1, 1), (8, 1)]
    row = result["settings"][0]
    assert row["attention_flops"]["pruned"] < row["attention_flops"]["original"]
    text = markdown(result)
    assert "KV groups 6 -> 3" in text and "KV cache 384 -> 256 bytes per token (66.7%)" in text
    # Gemma 3 (head_dim 12): 2 x 3 KV heads x 12 x 4 bytes -> 2 x (1 + 1 + 1 dead) x 12 x 4
    save_pruned(tiny_llm("gemma3"), tmp_path / "gemma", CASES[("llama", "group", 2)][:2], unit="group")
    result = measure(MeasureConfig(pruned=str(tmp_path / "gemma"), batch_sizes=[1], lengths=[8], repeats=2,
                                   warmup=0, beams=[1], generate_tokens=4), progress=lambda *_: None)
    assert result["kv_cache_bytes_per_token"] == {"original": 576, "pruned": 288}
    assert result["generation"][0]["tokens_per_second"]["pruned"] > 0
