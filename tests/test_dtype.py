"""--dtype: a pipelined run holds the model's weights in the dtype asked (half the memory of a float32
model in bfloat16), saves the pruned model so, and does not reuse the float32 model's unpruned
metrics; runs that train weights refuse half precision in one line."""
import math

import pytest
import torch
from conftest import word_tokenizer
from test_causal_lm import lm_cfg, tiny_lm  # noqa: F401 (a fixture)

from headprune.config import FinetuneConfig, PruneConfig, SweepConfig
from headprune.digests import metrics_key
from headprune.errors import ConfigError
from headprune.pruning import load_pruned
from headprune.recipes import prune
from headprune.tasks.language_modeling import pack


def test_runs_that_train_weights_refuse_half_precision():
    with pytest.raises(ConfigError, match="fine-tuning loses their updates: use --mixed-precision bf16"):
        FinetuneConfig(dtype="bfloat16")
    with pytest.raises(ConfigError, match="--dtype float16 keeps the weights in half precision, where joint"):
        PruneConfig(mode="joint", dtype="float16")
    with pytest.raises(ConfigError, match="where joint"):
        SweepConfig(modes=["pipelined", "joint"], dtype="bfloat16")
    assert PruneConfig(dtype="bfloat16").dtype == "bfloat16"
    FinetuneConfig(dtype="float32")


def test_the_unpruned_metrics_cache_tells_precisions_and_configs_apart(tmp_path):
    inputs = {"model": "weights-digest", "evaluation data": "data-digest"}
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 6}')
    keys = {metrics_key(inputs, PruneConfig(model="folder", **kw), str(tmp_path))
            for kw in ({}, {"dtype": "bfloat16"}, {"mixed_precision": "bf16"}, {"dtype": "float32"})}
    assert len(keys) == 4
    plain = metrics_key(inputs, PruneConfig(model="folder"), str(tmp_path))
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 3}')  # the same weights, another model
    assert metrics_key(inputs, PruneConfig(model="folder"), str(tmp_path)) not in (plain, None)
    # translation: the longest source of a batch bounds its translations' length
    batches = {metrics_key(inputs, PruneConfig(model="folder", task="translation", generation_batch_size=n),
                           str(tmp_path)) for n in (1, 32)}
    assert len(batches) == 2


def test_a_float32_model_pruned_in_bf16_is_saved_and_reloaded_in_bf16(tiny_lm, tmp_path):  # noqa: F811
    model, data = tiny_lm
    full = prune(lm_cfg(model, data, tmp_path / "float32"))
    half = prune(lm_cfg(model, data, tmp_path / "bf16", dtype="bfloat16"))
    assert half["metrics_unpruned"] != full["metrics_unpruned"]  # measured in bf16, not the float32 cache
    assert half["metrics_unpruned"]["validation"] == pytest.approx(full["metrics_unpruned"]["validation"], rel=2e-2)
    loaded = load_pruned(tmp_path / "bf16" / "model")
    assert loaded.dtype == torch.bfloat16 and load_pruned(tmp_path / "float32" / "model").dtype == torch.float32
    ids = torch.tensor(pack((data / "validation.txt").read_text().splitlines(), word_tokenizer(), 16))
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert math.exp(loss.item()) == pytest.approx(half["metrics_pruned"]["validation"], rel=1e-3)


def test_the_weights_are_loaded_straight_into_the_dtype(tiny_lm, tmp_path):  # noqa: F811
    """Not held in float32 first: the task loads them in the dtype asked, a pruned model too."""
    from headprune.tasks import get_task
    model, data = tiny_lm
    prune(lm_cfg(model, data, tmp_path / "pruned"))
    task = get_task("causal-lm")
    for source in (model, tmp_path / "pruned" / "model"):
        cfg = lm_cfg(source, data, tmp_path / "unused", dtype="bfloat16")
        path, config, _, _ = task.inspect(cfg.model, require_finetuned=True, attn_implementation=cfg.attn_implementation)
        loaded, _ = task.load_model(cfg, task.load_data(cfg), path, config, require_finetuned=True)
        assert loaded.dtype == torch.bfloat16
