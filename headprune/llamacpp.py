"""`headprune export --format gguf`: a pruned Llama-family model as a GGUF file for llama.cpp.

llama.cpp's plain `llama` architecture sizes every layer by one head count (the first layer's);
its `deci` architecture (DeciLM, Nemotron-NAS) reads the query and key/value head counts per
layer (`deci.attention.head_count` and `head_count_kv` as arrays) and builds each layer with its
own, allocating the key/value cache per layer, so a pruned model keeps its smaller cache there.
Otherwise `deci` computes what `llama` does (RMS norms, RoPE on consecutive pairs, SwiGLU), with
two things to respect:
- a layer with no heads is "attention-free" in `deci` (the residual passes on, no attention
  tensors, no cache), but `deci` reads the head size from the first layer's count, so a first
  layer without heads keeps headprune's one dead head (zero output: the same outputs);
- `deci` adds an output-projection bias only in a layer with heads: a headless layer whose bias
  was set by `--reconstruct bias` keeps the dead head too.
Query and key rows are permuted per layer the way llama.cpp's `convert_hf_to_gguf.py` does (its
RoPE pairs neighbouring values; Hugging Face's pairs the two halves), with that layer's counts.

The tokenizer is copied from a GGUF of the unpruned model (`--tokenizer-gguf`; for
offline:smollm2-135m the file its package ships), because llama.cpp's pre-tokenizer names come
from its converter's table of known tokenizers, which headprune does not repeat.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, ModelError, require
from .outputs import atomic_files
from .pruning import load_pruned, load_pruned_config
from .sites import DEAD_HEAD, find_sites

log = logging.getLogger(__name__)

ARCH = "deci"


def _ggml_type(name: str):
    from gguf import GGMLQuantizationType, LlamaFileType

    return {"f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
            "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
            "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)}[name]


def check_llama(config, where) -> None:
    """Refuse, in one line, what the `deci` graph would compute differently."""
    names = getattr(config, "architectures", None) or []
    if getattr(config, "model_type", None) != "llama" or "LlamaForCausalLM" not in names:
        raise ModelError(f"{where} is a {', '.join(names) or config.model_type} model: `headprune export --format "
                         "gguf` writes Llama-family decoders (model_type llama, LlamaForCausalLM) so far")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelError(f"{where}: query/key/value or MLP biases are not written to GGUF yet")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ModelError(f"{where}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not written to "
                         "GGUF yet (plain RoPE only)")


def rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def permute_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query or key projection from Hugging Face's RoPE layout (two halves) to llama.cpp's
    (neighbouring pairs), head by head: what `convert_hf_to_gguf.py` does with a layer's counts."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def layer_plan(model) -> list[dict]:
    """Per layer: the query and key/value head counts to write and whether its attention tensors
    are written (False: a `deci` attention-free layer)."""
    plan = []
    for site in find_sites(model, "group"):
        d = site.head_dim
        queries, kv = site.query.out_features // d, site.key.out_features // d
        dead = bool(getattr(site.attention, DEAD_HEAD, False))
        bias = site.output.bias
        if dead and site.layer > 0 and (bias is None or not bool(bias.any())):
            plan.append({"heads": 0, "kv_heads": 0, "attention": False})
            continue
        if queries % kv:
            raise ModelError(f"layer {site.layer} keeps {queries} query heads over {kv} key/value heads: llama.cpp "
                             "needs a whole number of query heads per key/value head")
        plan.append({"heads": queries, "kv_heads": kv, "attention": True})
    return plan


def default_tokenizer_gguf(model_folder) -> str | None:
    """The GGUF of offline:smollm2-135m for a model pruned from it, where its package is installed."""
    from .card import OFFLINE_BASES, base_model_of
    from .tasks.base import smollm2_gguf

    if base_model_of(str(model_folder)) == OFFLINE_BASES["offline:smollm2-135m"]:
        return smollm2_gguf()
    return None


def tokenizer_fields(path, vocab_size: int) -> list:
    """The `tokenizer.*` fields of a GGUF file, checked to hold `vocab_size` tokens."""
    from gguf import GGUFReader

    if not Path(path).is_file():
        raise ConfigError(f"--tokenizer-gguf {path}: no such file")
    try:
        fields = [f for name, f in GGUFReader(path).fields.items() if name.startswith("tokenizer.")]
    except (ValueError, OSError) as err:
        raise ConfigError(f"--tokenizer-gguf {path}: not a readable GGUF file ({err})") from err
    tokens = next((f for f in fields if f.name == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise ConfigError(f"--tokenizer-gguf {path} holds no tokenizer (tokenizer.ggml.tokens)")
    if len(tokens.data) != vocab_size:
        raise ConfigError(f"--tokenizer-gguf {path} has {len(tokens.data)} tokens, the model {vocab_size}: "
                          "give the GGUF of the model this one was pruned from")
    return fields


def export_gguf(cfg) -> dict:
    """Write the model folder cfg.model as a GGUF file cfg.output for llama.cpp's `deci` graph."""
    require("gguf", extra="llm")
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import quantize

    from .export import check_output

    output = Path(cfg.output)
    check_output(cfg)
    config = load_pruned_config(cfg.model)
    check_llama(config, cfg.model)
    source = cfg.tokenizer_gguf or default_tokenizer_gguf(cfg.model)
    if not source:
        raise ConfigError("export --format gguf needs --tokenizer-gguf: a GGUF file of the unpruned model (llama.cpp's "
                          "convert_hf_to_gguf.py writes one), whose tokenizer is copied")
    fields = tokenizer_fields(source, config.vocab_size)
    model = load_pruned(cfg.model).eval()  # in its own dtype: each tensor goes to float32 alone (add)
    plan = layer_plan(model)
    tensor_type, file_type = _ggml_type(cfg.dtype)
    head_dim = find_sites(model, "group")[0].head_dim

    def add(name: str, tensor: torch.Tensor, matrix: bool = True) -> None:
        array = tensor.detach().to(torch.float32).cpu().numpy()
        kind = tensor_type if matrix else GGMLQuantizationType.F32
        if kind == GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
            kind = GGMLQuantizationType.F16  # Q8_0 packs rows in blocks of 32; llama.cpp's converter falls back too
        writer.add_tensor(name, quantize(array, kind), raw_dtype=kind)

    sites = find_sites(model, "group")
    with atomic_files(output) as folder:  # (a killed export's temporary folder goes at the next one)
        tmp = folder / output.name
        writer = GGUFWriter(tmp, ARCH, use_temp_file=True)
        # each tensor spooled to a file as it is made, not held: beside the output (the system's temporary
        # folder may be small, or in memory)
        writer.temp_file = tempfile.SpooledTemporaryFile(mode="w+b", max_size=256 * 2**20, dir=folder)
        writer.add_name(Path(cfg.model).resolve().name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count([p["heads"] for p in plan])
        writer.add_head_count_kv([p["kv_heads"] for p in plan])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(rope_theta(config))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)
        for f in fields:
            array = f.types[0] == GGUFValueType.ARRAY
            writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if array else None)

        inner = model.model
        add("token_embd.weight", inner.embed_tokens.weight)
        add("output_norm.weight", inner.norm.weight, matrix=False)
        if not getattr(config, "tie_word_embeddings", False):
            add("output.weight", model.lm_head.weight)
        for layer, (site, p) in enumerate(zip(sites, plan)):
            block = inner.layers[layer]
            if p["attention"]:
                add(f"blk.{layer}.attn_norm.weight", block.input_layernorm.weight, matrix=False)
                q = permute_for_rope(site.query.weight.detach().float().numpy(), p["heads"])
                k = permute_for_rope(site.key.weight.detach().float().numpy(), p["kv_heads"])
                add(f"blk.{layer}.attn_q.weight", torch.from_numpy(q))
                add(f"blk.{layer}.attn_k.weight", torch.from_numpy(k))
                add(f"blk.{layer}.attn_v.weight", site.value.weight)
                add(f"blk.{layer}.attn_output.weight", site.output.weight)
                if site.output.bias is not None:
                    add(f"blk.{layer}.attn_output.bias", site.output.bias, matrix=False)
            add(f"blk.{layer}.ffn_norm.weight", block.post_attention_layernorm.weight, matrix=False)
            add(f"blk.{layer}.ffn_gate.weight", block.mlp.gate_proj.weight)
            add(f"blk.{layer}.ffn_up.weight", block.mlp.up_proj.weight)
            add(f"blk.{layer}.ffn_down.weight", block.mlp.down_proj.weight)
        log.info("writing %s (%s, %d layers, %d query and %d key/value heads kept)", output, cfg.dtype, len(plan),
                 sum(p["heads"] for p in plan), sum(p["kv_heads"] for p in plan))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        written = GGUFReader(tmp)  # read back: the counts llama.cpp will build from
        heads = list(written.fields[f"{ARCH}.attention.head_count"].contents())
        if heads != [p["heads"] for p in plan]:
            raise ModelError(f"the written file reads back other head counts ({heads}): not written")
    kv_per_token = 2 * head_dim * sum(p["kv_heads"] for p in plan)
    full = 2 * head_dim * config.num_hidden_layers * getattr(config, "num_key_value_heads", config.num_attention_heads)
    return {"output": str(output), "format": "gguf", "architecture": ARCH, "dtype": cfg.dtype,
            "tokenizer_from": str(source), "head_count": [p["heads"] for p in plan],
            "head_count_kv": [p["kv_heads"] for p in plan],
            "kv_cache_values_per_token": kv_per_token, "kv_cache_values_per_token_unpruned": full}
