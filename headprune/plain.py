"""`headprune export --format transformers`: a pruned model with the same heads in every layer as a
plain transformers folder, which `from_pretrained` loads without headprune, as do the runtimes that
read a transformers config and refuse a head count per layer (vLLM, TGI, llama.cpp's converter).

A transformers config holds one head count for every layer. A model pruned to as many query heads
and key/value heads in each layer (`--allocation uniform` with a k that the layers divide) fits one
where the config also names the head size (`head_dim`: Llama, Mistral, Qwen, Gemma, ...); a config
that derives the head size from the width (BERT, GPT-2) cannot hold fewer heads of the same size,
and the model is refused. An output-projection bias that `--reconstruct bias` added where the
architecture has none is kept through the config's `attention_bias` where it has that switch (the
query, key and value biases it brings are zero). The plain model is built from its config, given
the weights and compared with the pruned one on random tokens before anything is written.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import torch

from .errors import ConfigError, ModelError, OutputExistsError
from .export import TOLERANCE, sample_inputs
from .outputs import atomic_folder, check_not_inside, check_writable, nearest_existing
from .pruning import load_pruned, load_pruned_config
from .sites import DEAD_HEAD, find_sites

log = logging.getLogger(__name__)

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "README.md")  # written anew


def plain_config(model: torch.nn.Module):
    """The model's config with the head counts its layers share; ModelError where they differ."""
    sites = find_sites(model, "group")
    if len({site.kind for site in sites}) > 1:
        raise ModelError("a plain transformers config of an encoder-decoder holds its counts per stack, which "
                         "export --format transformers does not write yet: load this model with headprune.load_pruned")
    counts = [(site.query_heads, site.kv_heads) for site in sites]
    empty = [site.layer for site in sites if getattr(site.attention, DEAD_HEAD, False) or not site.query_heads]
    if empty or len(set(counts)) > 1:
        per_layer = ", ".join(f"{q}/{kv}" for q, kv in counts)
        without = f" (layers without heads: {empty})" if empty else ""
        raise ModelError(f"a plain transformers config holds one head count for every layer; this model's layers keep "
                         f"{per_layer} query/key-value heads{without}: prune with --allocation uniform and a k that "
                         "the layers divide")
    config = copy.deepcopy(model.config)
    queries, keys = counts[0]
    config.num_attention_heads = queries
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = keys
    if hasattr(config, "head_dim"):
        config.head_dim = sites[0].head_dim
    record = getattr(config, "headprune", None) or {}
    del config.headprune
    config.headprune_source = {key: record[key] for key in ("kept_heads", "unit") if key in record}
    return config


def _shapes(cls, config) -> dict[str, tuple]:
    with torch.device("meta"):  # shapes only
        return {name: tuple(t.shape) for name, t in cls(config).state_dict().items()}


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The same model built from a plain config, with the pruned model's weights (zero biases where
    the config's `attention_bias` brings more than the output bias it keeps)."""
    config, cls, state = plain_config(model), type(model), model.state_dict()
    shapes = _shapes(cls, config)
    if any(name not in shapes for name in state) and getattr(config, "attention_bias", None) is False:
        config.attention_bias = True  # the output biases of --reconstruct bias
        shapes = _shapes(cls, config)
    zeros = {name: torch.zeros(shape) for name, shape in shapes.items() if name not in state and name.endswith(".bias")}
    state = {**state, **zeros}
    wrong = [name for name in sorted(set(shapes) | set(state))
             if shapes.get(name) != (tuple(state[name].shape) if name in state else None)]
    if wrong:
        name = wrong[0]
        got = tuple(state[name].shape) if name in state else "none"
        raise ModelError(f"a plain {cls.__name__} with {config.num_attention_heads} heads a layer has other shapes "
                         f"than this model ({name}: {shapes.get(name, 'none')} there, {got} here): its config cannot "
                         "hold these heads (BERT's and GPT-2's derive the head size from the width); load this "
                         "model with headprune.load_pruned")
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):  # no second model's worth of random weights
        plain = cls(config)
    plain.load_state_dict(state, strict=True, assign=True)  # the pruned model's tensors themselves, not copies
    plain.tie_weights()
    return plain.eval()


def check_output_folder(cfg) -> Path:
    output = Path(cfg.output)
    if output.is_file():
        raise OutputExistsError(f"{output} is a file: --output names the folder to write")
    if output.is_dir() and any(output.iterdir()) and not cfg.overwrite:
        raise OutputExistsError(f"{output} holds files: give --overwrite to replace them, or another --output")
    check_not_inside(output, {"model": cfg.model}, option="--output")
    # the nearest folder that exists takes the new one: probed now, nothing created before the work
    check_writable(nearest_existing(output))
    return output


def export_transformers(cfg) -> dict:
    """Write cfg.model as a plain transformers folder cfg.output, checked against the pruned model."""
    output = check_output_folder(cfg)
    if not (getattr(load_pruned_config(cfg.model), "headprune", None) or {}).get("physical"):
        raise ConfigError(f"{cfg.model} is not a physically pruned model: it is a plain transformers folder already")
    model = load_pruned(cfg.model)
    saved_dtype = model.dtype  # checked in float32, written as it was saved (a bf16 model stays bf16)
    model = model.float().eval()
    plain = plain_model(model)
    worst = 0.0
    for shape, seed in (((2, 12), 1), ((1, 5), 2)):
        inputs = sample_inputs(model.config, *shape, seed=seed)
        with torch.no_grad():
            expected, got = model(**inputs).logits, plain(**inputs).logits
        worst = float(torch.stack([torch.tensor(worst), (got - expected).abs().max()]).max())  # (NaN stays NaN)
    if not worst <= TOLERANCE:
        raise ModelError(f"the plain model differs from the pruned one by {worst:.2g} (more than {TOLERANCE:g}): "
                         "not written")
    with atomic_folder(output) as tmp:
        plain.to(saved_dtype).save_pretrained(tmp)
        for file in Path(cfg.model).iterdir():  # the tokenizer and the generation settings
            if file.is_file() and file.name not in MODEL_FILES:
                shutil.copy2(file, tmp / file.name)
    log.info("wrote %s: a plain %s with %d query and %d key/value heads a layer (largest difference %.2g)", output,
             type(plain).__name__, plain.config.num_attention_heads,
             getattr(plain.config, "num_key_value_heads", plain.config.num_attention_heads), worst)
    return {"output": str(output), "format": "transformers", "max_abs_difference": worst,
            "num_attention_heads": plain.config.num_attention_heads,
            "num_key_value_heads": getattr(plain.config, "num_key_value_heads", plain.config.num_attention_heads)}
