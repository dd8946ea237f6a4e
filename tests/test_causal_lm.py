"""The causal language-modelling task end to end on a tiny random Llama with grouped-query
attention: packing, perplexity, every method pipelined, joint DSP, exact budgets in groups or
query positions, the saved model's perplexity equal to the pruned one's."""
import json
import math

import pytest
import torch
from conftest import LM_WORDS, word_tokenizer, write_tiny_lm

from headprune.config import METHODS, PruneConfig
from headprune.errors import ConfigError
from headprune.pruning import load_pruned
from headprune.recipes import prune
from headprune.tasks.language_modeling import pack

WORDS = LM_WORDS


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny Llama (3 layers, 6 query heads in 2 KV groups) and a patterned text folder."""
    return write_tiny_lm(tmp_path_factory.mktemp("lm"))


def lm_cfg(model, data, out, **kw):
    return PruneConfig(**{**dict(task="causal-lm", model=str(model), dataset=str(data), max_length=16,
                                 batch_size=8, eval_batch_size=8, epochs=1, output_dir=str(out),
                                 checkpoint_every=0, k=3), **kw})


def test_packing_joins_documents_with_the_end_token_and_drops_the_remainder():
    tokenizer = word_tokenizer()
    blocks = pack(["w0 w1 w2", "w3 w4"], tokenizer, 3)  # 3 + 1 + 2 + 1 = 7 ids: two blocks of 3
    eos = tokenizer.eos_token_id
    ids = tokenizer.convert_tokens_to_ids
    assert blocks == [[ids("w0"), ids("w1"), ids("w2")], [eos, ids("w3"), ids("w4")]]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "ste"])  # (ste: dsp's selector, another gradient)
def test_every_method_prunes_kv_groups_and_the_saved_model_scores_the_same(tiny_lm, tmp_path, method):
    model, data = tiny_lm
    results = prune(lm_cfg(model, data, tmp_path, method=method, michel_step=1))
    assert results["metric"] == "perplexity" and results["unit"] == "group"
    assert results["k"] == 3 and results["num_heads"] == 6  # 3 layers x 2 KV groups
    pruned, unpruned = results["metrics_pruned"]["validation"], results["metrics_unpruned"]["validation"]
    assert 1 < unpruned < 100 and pruned > 1  # a random model: near the vocabulary size (44)
    loaded = load_pruned(tmp_path / "model")
    assert loaded.config.headprune["unit"] == "group"
    blocks = pack((data / "validation.txt").read_text().splitlines(), word_tokenizer(), 16)
    ids = torch.tensor(blocks)
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert math.exp(loss.item()) == pytest.approx(pruned, rel=1e-4)


def test_query_units_and_joint_training(tiny_lm, tmp_path):
    model, data = tiny_lm
    results = prune(lm_cfg(model, data, tmp_path / "q", unit="query", k=4))
    assert results["unit"] == "query" and results["num_heads"] == 9 and results["k"] == 4
    kept = json.loads((tmp_path / "q" / "results.json").read_text())["kept_heads"]
    loaded = load_pruned(tmp_path / "q" / "model")
    per_layer = [sum(h[1] == layer for h in kept) for layer in range(3)]
    groups = [a.self_attn.num_key_value_groups for a in loaded.model.layers]
    assert groups == [n or 1 for n in per_layer]  # every group keeps the same query positions
    joint = prune(lm_cfg(model, data, tmp_path / "joint", mode="joint", k=2, epochs=2, lr=1e-3))
    assert joint["k"] == 2 and joint["metrics_pruned"]["validation"] < joint["metrics_unpruned"]["validation"] * 10


def test_budgets_are_checked_in_units_before_loading(tiny_lm, tmp_path):
    model, data = tiny_lm
    with pytest.raises(ConfigError, match=r"^k=7 is more than the 6 KV groups of this model \(--unit query prunes the "
                       r"query heads within them\)$"):
        prune(lm_cfg(model, data, tmp_path, k=7))
    with pytest.raises(ConfigError, match=r"^k=10 is more than the 9 query positions \(of every group\) of this model$"):
        prune(lm_cfg(model, data, tmp_path / "q", unit="query", k=10))
    prune(lm_cfg(model, data, tmp_path / "q", unit="query", k=7))  # 9 query positions: fine
    # blocks longer than the model's 256 positions: refused before anything is loaded or written
    with pytest.raises(ConfigError, match=r"^--max-length 300: longer than the model's 256 positions"):
        prune(lm_cfg(model, data, tmp_path / "long", max_length=300))
    assert not (tmp_path / "long").exists()


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    return {arch: write_tiny_lm(tmp_path_factory.mktemp(arch), arch=arch) for arch in ("gemma2", "gemma3")}


def saved_perplexity(folder, data):
    blocks = pack((data / "validation.txt").read_text().splitlines(), word_tokenizer(), 16)
    ids = torch.tensor(blocks)
    with torch.no_grad():
        logits = load_pruned(folder)(input_ids=ids).logits
    return math.exp(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())


@pytest.mark.parametrize("arch,method,mode,reconstruct", [
    ("gemma3", "dsp", "pipelined", "none"), ("gemma3", "dsp", "joint", "none"), ("gemma3", "ste", "joint", "none"),
    ("gemma3", "voita", "pipelined", "none"), ("gemma3", "michel", "pipelined", "none"),
    ("gemma3", "fisher", "pipelined", "both"), ("gemma3", "activation", "pipelined", "none"),
    ("gemma3", "flap", "pipelined", "bias"), ("gemma3", "taylor", "pipelined", "none"),
    ("gemma2", "dsp", "pipelined", "none"), ("gemma2", "taylor", "pipelined", "rescale")])
def test_gemma_with_every_method_and_the_saved_model_scores_the_same(tiny_gemma, tmp_path, arch, method, mode,
                                                                      reconstruct):
    model, data = tiny_gemma[arch]
    results = prune(lm_cfg(model, data, tmp_path, method=method, mode=mode, reconstruct=reconstruct, michel_step=1,
                           lr=1e-3))
    assert results["k"] == 3 and results["num_heads"] == 6 and results["unit"] == "group"
    assert saved_perplexity(tmp_path / "model", data) == pytest.approx(results["metrics_pruned"]["validation"], rel=1e-4)
    layers = load_pruned(tmp_path / "model").model.layers
    assert sum(a.self_attn.k_proj.out_features // 12 for a in layers if a.self_attn.o_proj.weight.abs().sum() > 0) == 3


def test_a_bf16_checkpoint_is_pruned_and_reloads_in_bf16(tiny_lm, tmp_path):
    """Most language models are published in bf16: headprune loads them so (transformers' dtype
    "auto"), saves the pruned model so, and load_pruned rebuilds it so, with the run's perplexity."""
    from transformers import AutoModelForCausalLM
    model, data = tiny_lm
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(model).to(torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bf16 / name).write_bytes((model / name).read_bytes())
    results = prune(lm_cfg(bf16, data, tmp_path / "out"))
    loaded = load_pruned(tmp_path / "out" / "model")
    assert loaded.dtype == torch.bfloat16
    assert load_pruned(tmp_path / "out" / "model", dtype=torch.float32).dtype == torch.float32  # asked for
    ids = torch.tensor(pack((data / "validation.txt").read_text().splitlines(), word_tokenizer(), 16))
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert math.exp(loss.item()) == pytest.approx(results["metrics_pruned"]["validation"], rel=1e-3)
    from headprune.config import MeasureConfig
    from headprune.measuring import load_models
    models = load_models(MeasureConfig(pruned=str(tmp_path / "out" / "model")))
    assert {m.dtype for m in models.values()} == {torch.bfloat16}  # measure times both in the dtype saved
