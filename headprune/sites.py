"""Where the attention heads of each supported architecture live.

An attention *site* is one multi-head attention block: its query, key and value projections and
the output projection whose input is the heads' contexts concatenated head-major. A head is
addressed as (kind, layer, head), kind being "encoder" (encoder self-attention), "decoder"
(decoder self-attention) or "cross" (decoder cross-attention), so encoder-decoders fit the same
structure as encoders.

Decoder-only language models with grouped-query attention (Llama, Mistral, Qwen, SmolLM: several
query heads share one key/value head) are pruned by *units*: a KV group (its query heads and
its key/value head together: the default, which shrinks the KV cache) or a query position (the
j-th query head of every group of a layer, one gate shared by all groups, so the groups stay the
same size and the attention code runs unchanged). A model without shared key/value heads has
one query head per group, so its groups are its heads. A site's "heads" (`num_heads`, the gate
addresses) are its units.

Architectures are recognised by their module layout, not by `model_type`, so a model that reuses
BERT's modules exactly (CamemBERT, ERNIE, ...) works without being listed. To support a new
layout, write a function that yields its sites and add it to LAYOUTS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError, UnsupportedArchitectureError

KINDS = ("encoder", "decoder", "cross")
UNITS = ("group", "query")  # what a gate prunes in grouped-query attention (see above)
DEAD_HEAD = "headprune_dead_head"  # attribute of an attention module that keeps one zeroed head


def weight_out_in(projection: nn.Module):
    """A projection's weight as (out, in), the way nn.Linear holds it; GPT-2's Conv1D holds (in,
    out). A view: writing into it writes the weight."""
    return projection.weight.T if isinstance(projection, Conv1D) else projection.weight


def in_features(projection: nn.Module) -> int:
    return weight_out_in(projection).shape[1]


def out_features(projection: nn.Module) -> int:
    return weight_out_in(projection).shape[0]


def output_rows(projection: nn.Module, rows) -> tuple:
    """The index of a projection's weight that selects these output features (rows of nn.Linear's)."""
    return (slice(None), rows) if isinstance(projection, Conv1D) else (rows,)


def input_columns(projection: nn.Module, columns) -> tuple:
    """The index of a projection's weight that selects these input features."""
    return (columns,) if isinstance(projection, Conv1D) else (slice(None), columns)


@dataclass
class AttentionSite:
    kind: str
    layer: int
    attention: nn.Module  # the module that runs attention and holds its head size
    query: nn.Module  # nn.Linear, or GPT-2's Conv1D
    key: nn.Module
    value: nn.Module
    output: nn.Module  # input: the heads' contexts, concatenated head-major
    head_dim: int
    unit: str = "head"  # "head" (one key/value head per query head), "group" or "query" (GQA)
    # One projection computes queries, keys and values (query, key and value are then that module):
    # "blocks": its rows are every query head's, then every key head's, then every value head's
    # (GPT-2, Phi-3); "heads": per head its query, key and value rows (GPT-NeoX, Pythia).
    fused: str | None = None
    fused_counts: tuple[int, int] | None = None  # fused: (query heads, key/value heads), read at discovery
    layer_config: bool = False  # the module reads its head counts from the config (Phi-3)
    # More projections whose output rows are per head, as (projection, "query" or "key"): DeBERTa's
    # relative-position projections; sliced with the heads they belong to
    extra: tuple = ()
    # Bias vectors kept apart from a fused projection, per head, as (module, attribute, "query" or
    # "value"): DeBERTa v1's q_bias and v_bias; sliced with their heads
    extra_biases: tuple = ()
    # Tables with one column per query head, as (module, attribute): Swin's and BEiT's relative
    # position bias tables; sliced with their heads
    head_columns: tuple = ()
    # Parameters with one row (dim 0) per head, as (module, attribute, "query" or "key"): GPT-OSS's
    # attention sinks, Cohere's query and key norms of each head; sliced with their heads
    head_rows: tuple = ()
    # T5: the module takes a position bias for every head from the layer before and hands it on
    # (computed by each stack's first layer), so a pruned layer takes its own heads' slice of it
    position_bias: bool = False
    # BEiT's shared relative position bias: the model computes it for every head and hands it to each
    # layer (this module) in the attention mask, so a pruned layer takes its own heads' slice of it
    shared_bias: nn.Module | None = None
    # An attribute of the module holding the query heads' width, by which its forward splits the fused
    # output (GPTBigCode's multi-query `embed_dim`); kept true once heads are removed
    query_width: str | None = None

    @property
    def query_heads(self) -> int:
        return self.fused_counts[0] if self.fused else out_features(self.query) // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.fused_counts[1] if self.fused else out_features(self.key) // self.head_dim

    def rows(self, which: str, heads: list[int]) -> list[int]:
        """The rows (output features) of the projection that computes `which` ("query", "key" or
        "value") that belong to `heads` (query heads for "query", key/value heads otherwise)."""
        d = self.head_dim
        if self.fused == "heads":
            start = {"query": 0, "key": d, "value": 2 * d}[which]
            return [h * 3 * d + start + i for h in heads for i in range(d)]
        start = 0
        if self.fused == "blocks":
            start = {"query": 0, "key": self.query_heads * d, "value": (self.query_heads + self.kv_heads) * d}[which]
        return [start + h * d + i for h in heads for i in range(d)]

    def own_rows(self, heads: list[int]) -> list[int]:
        """The rows (or columns) of `heads` in a tensor with head_dim of them per head, head-major: the
        `extra` projections and `extra_biases`, the output projection's input channels; whatever the
        layout of a fused projection."""
        return [h * self.head_dim + i for h in heads for i in range(self.head_dim)]

    def fused_rows(self, queries: list[int], keys: list[int]) -> list[int]:
        """Fused: the rows that keep these query and key/value heads, in the projection's layout."""
        if self.fused == "heads":  # one key/value head per query head
            return [r for h in queries for which in ("query", "key", "value") for r in self.rows(which, [h])]
        return self.rows("query", queries) + self.rows("key", keys) + self.rows("value", keys)

    @property
    def num_heads(self) -> int:
        """Units that count: read from the weights, not the config, so that it stays right once
        heads are removed. A decoder site whose heads were all removed keeps one dead head (its
        output columns zero) so that its cache keeps working: it counts as none."""
        if getattr(self.attention, DEAD_HEAD, False):
            return 0
        if self.unit == "group":
            return self.kv_heads
        if self.unit == "query":
            return self.query_heads // self.kv_heads
        return self.query_heads

    def query_heads_of(self, units: list[int]) -> list[int]:
        """The query heads (in order) that the given units own. Query head h reads key/value head
        h // (query heads per group), as transformers' `repeat_kv` lays them out."""
        per_group = self.query_heads // self.kv_heads
        if self.unit == "group":
            return [g * per_group + j for g in units for j in range(per_group)]
        if self.unit == "query":
            return [g * per_group + j for g in range(self.kv_heads) for j in units]
        return list(units)

    def kv_heads_of(self, units: list[int]) -> list[int]:
        """The key/value heads the given units need."""
        return list(units) if self.unit in ("group", "head") else list(range(self.kv_heads))

    def query_gate(self, gate):
        """One value per query head from one per unit (a tensor)."""
        if self.unit == "group":
            return gate.repeat_interleave(self.query_heads // self.kv_heads)
        if self.unit == "query":
            return gate.repeat(self.kv_heads)
        return gate


def _layer_index(name: str) -> int:
    """The integer after `layer.` in a module path such as `bert.encoder.layer.3.attention`."""
    parts = name.split(".")
    return int(parts[parts.index("layer") + 1])


def _in_layer_list(name: str) -> bool:
    """Whether a module path numbers its layers as BERT's does (`layer.3`): a module of the same
    names elsewhere (Swin v2's `layers.0.blocks.1.attention`, with more per-head tables) is not
    of that layout."""
    return "layer" in name.split(".")


def _holds_only(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether every parameter of `module` belongs to one of its children `names`: a module named
    as a layout's but holding more (a convolution or a norm over the heads, per-head scalars) is of
    another layout, whose heads removal would get wrong."""
    return all(name.split(".")[0] in names for name, _ in module.named_parameters())


# Norms of the queries or keys inside an attention module: one norm of a head's size, shared by
# every head (Qwen3, Gemma 3), slices with nothing; one per head (Cohere) is sliced by head (its
# weights have a row per head); one over all heads together (OLMo 2, OLMoE) couples them: refused
QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm")

# What a BERT-style self-attention module may hold: its projections and BERT's relative-position
# embedding (one head's size, shared); not Nystromformer's convolution per head or ConvBERT's spans
BERT_SELF = ("query", "key", "value", "distance_embedding")


def bert_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """BERT, RoBERTa, XLM-R, ELECTRA, MiniLM: `layer.i.attention.self.{query,key,value}` and
    `layer.i.attention.output.dense`."""
    for name, module in model.named_modules():
        attn = getattr(module, "self", None)
        if (name.endswith("attention") and _in_layer_list(name) and hasattr(attn, "query")
                and hasattr(attn, "attention_head_size") and hasattr(getattr(module, "output", None), "dense")
                and _holds_only(attn, BERT_SELF)):
            kind = "cross" if name.endswith("crossattention") else "encoder"
            yield AttentionSite(kind, _layer_index(name), attn, attn.query, attn.key, attn.value,
                                module.output.dense, attn.attention_head_size)


def deberta_v2_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """DeBERTa-v2 and v3: `layer.i.attention.self.{query_proj,key_proj,value_proj}` and
    `layer.i.attention.output.dense`; with relative attention that does not share the key and
    query projections (`share_att_key` false), `pos_key_proj` (c2p) and `pos_query_proj` (p2c)
    project the relative positions per head too."""
    for name, module in model.named_modules():
        attn = getattr(module, "self", None)
        if (name.endswith("attention") and _in_layer_list(name) and hasattr(attn, "query_proj")
                and hasattr(attn, "attention_head_size") and hasattr(getattr(module, "output", None), "dense")):
            extra = tuple((getattr(attn, p), which) for p, which in (("pos_key_proj", "key"), ("pos_query_proj", "query"))
                          if isinstance(getattr(attn, p, None), nn.Linear))
            yield AttentionSite("encoder", _layer_index(name), attn, attn.query_proj, attn.key_proj, attn.value_proj,
                                module.output.dense, attn.attention_head_size, extra=extra)


def deberta_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """DeBERTa (v1): `layer.i.attention.self.in_proj` (per head its query, key and value rows), the
    query and value biases apart (`q_bias`, `v_bias`), `layer.i.attention.output.dense`; with
    relative attention `pos_proj` (c2p) and `pos_q_proj` (p2c) project the positions per head."""
    for name, module in model.named_modules():
        attn = getattr(module, "self", None)
        if (name.endswith("attention") and isinstance(getattr(attn, "in_proj", None), nn.Linear)
                and hasattr(attn, "q_bias") and hasattr(attn, "attention_head_size")
                and hasattr(getattr(module, "output", None), "dense")):
            if getattr(attn, "head_logits_proj", None) is not None:
                raise UnsupportedArchitectureError("this DeBERTa mixes its heads' scores and weights (talking heads: "
                                                   "config.talking_head): its heads cannot be removed one by one")
            heads = out_features(attn.in_proj) // (3 * attn.attention_head_size)
            extra = tuple((getattr(attn, p), which) for p, which in (("pos_proj", "key"), ("pos_q_proj", "query"))
                          if isinstance(getattr(attn, p, None), nn.Linear))
            yield AttentionSite("encoder", _layer_index(name), attn, attn.in_proj, attn.in_proj, attn.in_proj,
                                module.output.dense, attn.attention_head_size, fused="heads",
                                fused_counts=(heads, heads), extra=extra,
                                extra_biases=((attn, "q_bias", "query"), (attn, "v_bias", "value")))


def vit_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """ViT, DeiT, BEiT, Swin and image encoders of their layout: `layers.i.attention` (Swin:
    `layers.i.blocks.j.attention`, numbered in order over the stages) with `q_proj, k_proj,
    v_proj, o_proj` (transformers 5), attending both ways. A relative position bias table with a
    column per head, in the attention (Swin) or in its layer (BEiT), is sliced with the heads; the
    bias of one table shared by every layer (BEiT's option) reaches each layer whole, and each
    layer takes its heads' slice of it (`AttentionSite.shared_bias`)."""
    layer = 0
    shared = any(getattr(module, "shared_position_bias", None) is not None for module in model.modules())
    for name, module in model.named_modules():
        parts = name.split(".")
        if (parts[-1] == "attention" and "layers" in parts and getattr(module, "is_causal", None) is False
                and all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))
                and _holds_only(module, ("q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias"))):
            parent = model.get_submodule(".".join(parts[:-1]))
            columns = tuple((owner.relative_position_bias, "relative_position_bias_table") for owner in (module, parent)
                            if hasattr(getattr(owner, "relative_position_bias", None), "relative_position_bias_table"))
            yield AttentionSite("encoder", layer, module, module.q_proj, module.k_proj, module.v_proj, module.o_proj,
                                module.head_dim, head_columns=columns, shared_bias=parent if shared else None)
            layer += 1


def distilbert_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """DistilBERT: `transformer.layer.i.attention.{q_lin,k_lin,v_lin,out_lin}`."""
    for name, module in model.named_modules():
        if name.endswith("attention") and _in_layer_list(name) and hasattr(module, "q_lin") and hasattr(module, "out_lin"):
            yield AttentionSite("encoder", _layer_index(name), module, module.q_lin, module.k_lin,
                                module.v_lin, module.out_lin, module.attention_head_size)


def seq2seq_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """BART, mBART, Marian, Pegasus: `encoder.layers.i.self_attn` (encoder), `decoder.layers.i.self_attn`
    (decoder) and `decoder.layers.i.encoder_attn` (cross), each with `q_proj, k_proj, v_proj, out_proj`."""
    for name, module in model.named_modules():
        parts = name.split(".")
        if not (hasattr(module, "q_proj") and hasattr(module, "out_proj") and hasattr(module, "head_dim")
                and "layers" in parts and parts.index("layers") > 0
                and _holds_only(module, ("q_proj", "k_proj", "v_proj", "out_proj"))):
            continue
        stack = parts[parts.index("layers") - 1]
        kind = "cross" if parts[-1] == "encoder_attn" else stack
        if kind in KINDS and parts[-1] in ("self_attn", "encoder_attn"):
            yield AttentionSite(kind, int(parts[parts.index("layers") + 1]), module, module.q_proj,
                                module.k_proj, module.v_proj, module.out_proj, module.head_dim)


# T5's attention modules by their names in a block; LongT5's encoder attends locally in blocks or
# to transient global tokens as well (its decoder is T5's)
T5_ATTENTION = ("SelfAttention", "EncDecAttention", "LocalSelfAttention", "TransientGlobalSelfAttention")


def t5_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """T5, Flan-T5, mT5, UMT5, LongT5-like layouts: `encoder.block.i.layer.0.SelfAttention`
    (encoder; LongT5: `LocalSelfAttention` or `TransientGlobalSelfAttention`),
    `decoder.block.i.layer.0.SelfAttention` (decoder) and `decoder.block.i.layer.1.EncDecAttention`
    (cross), each with `q, k, v, o`. The relative position bias is computed for every head by
    each stack's first layer and handed on to the next (see AttentionSite.position_bias)."""
    for name, module in model.named_modules():
        parts = name.split(".")
        if (parts[-1] in T5_ATTENTION and "block" in parts and parts.index("block") > 0
                and all(hasattr(module, p) for p in ("q", "k", "v", "o", "key_value_proj_dim", "compute_bias"))):
            stack = parts[parts.index("block") - 1]
            kind = "cross" if parts[-1] == "EncDecAttention" else stack
            if kind in KINDS:
                yield AttentionSite(kind, int(parts[parts.index("block") + 1]), module, module.q, module.k, module.v,
                                    module.o, module.key_value_proj_dim, position_bias=True)


def causal_lm_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """Llama, Mistral, Qwen2/3, SmolLM, Gemma and others of that layout: `layers.i.self_attn`
    with `q_proj, k_proj, v_proj, o_proj` and `num_key_value_groups` (query heads per key/value
    head: 1 for plain multi-head attention), and at most norms of the queries and keys (shared, or
    one per head: Cohere) and an attention sink per head (GPT-OSS); not DiffLlama's lambdas or
    BitNet's norm of the heads' output. Pruned by KV group unless asked otherwise."""
    for name, module in model.named_modules():
        parts = name.split(".")
        if (parts[-1] == "self_attn" and "layers" in parts and hasattr(module, "num_key_value_groups")
                and all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))
                and _holds_only(module, ("q_proj", "k_proj", "v_proj", "o_proj", "sinks") + QK_NORMS)):
            rows = [(module, "sinks", "query")] if isinstance(getattr(module, "sinks", None), nn.Parameter) else []
            for norm, which in ((getattr(module, "q_norm", None), "query"), (getattr(module, "k_norm", None), "key")):
                if norm is not None:  # a norm per head: its weights (and bias) have a row per head
                    rows += [(norm, p, which) for p, value in norm.named_parameters(recurse=False) if value.dim() == 2]
            yield AttentionSite("decoder", int(parts[parts.index("layers") + 1]), module, module.q_proj,
                                module.k_proj, module.v_proj, module.o_proj, module.head_dim, unit="group",
                                head_rows=tuple(rows))


def modernbert_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """ModernBERT: `layers.i.attn` with `Wqkv` (in blocks of query, key and value heads) and `Wo`."""
    for name, module in model.named_modules():
        parts = name.split(".")
        if (parts[-1] == "attn" and "layers" in parts and hasattr(module, "Wqkv") and hasattr(module, "Wo")
                and hasattr(module, "head_dim")):
            heads = out_features(module.Wqkv) // (3 * module.head_dim)
            yield AttentionSite("encoder", int(parts[parts.index("layers") + 1]), module, module.Wqkv, module.Wqkv,
                                module.Wqkv, module.Wo, module.head_dim, fused="blocks", fused_counts=(heads, heads))


def gpt2_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """GPT-2: `h.i.attn` with one Conv1D `c_attn` for queries, keys and values (in blocks) and the
    Conv1D `c_proj` (GPTBigCode's nn.Linear `c_attn` is the next layout)."""
    for name, module in model.named_modules():
        parts = name.split(".")
        if (parts[-1] == "attn" and "h" in parts and isinstance(getattr(module, "c_attn", None), Conv1D)
                and hasattr(module, "c_proj") and hasattr(module, "split_size")
                and not getattr(module, "is_cross_attention", False)):
            heads = out_features(module.c_attn) // (3 * module.head_dim)
            yield AttentionSite("decoder", int(parts[parts.index("h") + 1]), module, module.c_attn, module.c_attn,
                                module.c_attn, module.c_proj, module.head_dim, unit="group", fused="blocks",
                                fused_counts=(heads, heads))


def gpt_bigcode_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """GPTBigCode (StarCoder 1, SantaCoder): `h.i.attn` with an nn.Linear `c_attn` and `c_proj`.
    Multi-query: every query head's rows, then the one key head's and the one value head's (a KV
    group is the whole layer: `--unit query` prunes its query heads); otherwise per head its query,
    key and value rows. Its optional cross-attention stays whole."""
    for name, module in model.named_modules():
        parts = name.split(".")
        if (parts[-1] == "attn" and "h" in parts and isinstance(getattr(module, "c_attn", None), nn.Linear)
                and isinstance(getattr(module, "multi_query", None), bool) and hasattr(module, "c_proj")
                and hasattr(module, "head_dim") and not getattr(module, "is_cross_attention", False)
                and _holds_only(module, ("c_attn", "c_proj"))):
            d, rows = module.head_dim, out_features(module.c_attn)
            layout, counts = ("blocks", (rows // d - 2, 1)) if module.multi_query else ("heads", (rows // (3 * d),) * 2)
            yield AttentionSite("decoder", int(parts[parts.index("h") + 1]), module, module.c_attn, module.c_attn,
                                module.c_attn, module.c_proj, d, unit="group", fused=layout, fused_counts=counts,
                                query_width="embed_dim")


def gpt_neox_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """GPT-NeoX, Pythia: `layers.i.attention` with `query_key_value` (per head its query, key and
    value rows) and `dense`."""
    for name, module in model.named_modules():
        parts = name.split(".")
        if (parts[-1] == "attention" and "layers" in parts and hasattr(module, "query_key_value")
                and hasattr(module, "dense") and hasattr(module, "head_size")):
            heads = out_features(module.query_key_value) // (3 * module.head_size)
            yield AttentionSite("decoder", int(parts[parts.index("layers") + 1]), module, module.query_key_value,
                                module.query_key_value, module.query_key_value, module.dense, module.head_size,
                                unit="group", fused="heads", fused_counts=(heads, heads))


def phi3_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """Phi-3, Phi-4-mini: `layers.i.self_attn` with `qkv_proj` (in blocks, grouped keys and values)
    and `o_proj`. Its forward reads the number of query heads from the config, so a pruned layer
    gets a view of the config with its own counts."""
    for name, module in model.named_modules():
        parts = name.split(".")
        if (parts[-1] == "self_attn" and "layers" in parts and hasattr(module, "qkv_proj")
                and hasattr(module, "o_proj") and hasattr(module, "num_key_value_heads")):
            kv = module.num_key_value_heads
            queries = out_features(module.qkv_proj) // module.head_dim - 2 * kv
            yield AttentionSite("decoder", int(parts[parts.index("layers") + 1]), module, module.qkv_proj,
                                module.qkv_proj, module.qkv_proj, module.o_proj, module.head_dim, unit="group",
                                fused="blocks", fused_counts=(queries, kv), layer_config=True)


# layout name (with the models known to use it) -> the function that finds its sites
LAYOUTS: dict[str, Callable[[nn.Module], Iterator[AttentionSite]]] = {
    "BERT-style (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM, CamemBERT, ERNIE)": bert_sites,
    "DistilBERT-style": distilbert_sites,
    "ViT-style image encoder (ViT, DeiT, BEiT, Swin)": vit_sites,
    "DeBERTa-v2/v3 (disentangled attention)": deberta_v2_sites,
    "DeBERTa (v1: one projection, per head its query, key, value; the query and value biases apart)": deberta_sites,
    "BART-style encoder-decoder (BART, mBART, Marian, Pegasus)": seq2seq_sites,
    "T5-style encoder-decoder (T5, Flan-T5, mT5, LongT5: a shared relative position bias)": t5_sites,
    "Llama-style decoder with grouped-query attention (Llama, Mistral, Qwen2/3, SmolLM, Gemma 2/3, Cohere, GPT-OSS)":
        causal_lm_sites,
    "ModernBERT (one projection for queries, keys and values)": modernbert_sites,
    "GPT-2 (one Conv1D for queries, keys and values)": gpt2_sites,
    "GPTBigCode (StarCoder 1, SantaCoder: one projection for queries, keys and values, multi-query or per head)":
        gpt_bigcode_sites,
    "GPT-NeoX-style decoder (GPT-NeoX, Pythia: one projection, per head its query, key, value)": gpt_neox_sites,
    "Phi-3-style decoder (Phi-3, Phi-4-mini: one projection for queries, keys and values)": phi3_sites,
}


def unpruned_attention(model: nn.Module, sites: list[AttentionSite]) -> list[str]:
    """Modules named like attention (class name ending in "Attention") that are neither a site's
    nor inside or around one: heads that no layout reads (GPT-2's optional cross-attention), so
    a run can say that they stay whole."""
    names = {id(module): name for name, module in model.named_modules()}
    found = [names[id(site.attention)] for site in sites]
    return [f"{name} ({type(module).__name__})" for name, module in model.named_modules()
            if type(module).__name__.endswith("Attention")
            and not any(name == f or name.startswith(f + ".") or f.startswith(name + ".") for f in found)]


# Models that a layout matches only in part, refused by model_type before the layouts are tried:
# model_type -> why
RESHAPES_TO_WIDTH = ("its attention reshapes its heads' outputs to the model's width, which a pruned layer no "
                     "longer has")
NOT_YET = {"led": "its encoder's Longformer attention matches no layout, and its decoder's attention reshapes "
                  "its heads' outputs to the model's width, which a pruned layer no longer has",
           "fsmt": RESHAPES_TO_WIDTH, "mvp": RESHAPES_TO_WIDTH, "pegasus_x": RESHAPES_TO_WIDTH,
           "layoutlmv3": "its relative position biases, computed once with a column per head, go to every layer"}


def check_sites(model_type: str, sites: list[AttentionSite]) -> None:
    """What a layout's match must also hold: one site per (kind, layer), since heads are addressed
    by them, and no query or key norm that couples the heads (QK_NORMS)."""
    seen = [(site.kind, site.layer) for site in sites]
    if len(set(seen)) < len(seen):
        twice = next(place for place in seen if seen.count(place) > 1)
        raise UnsupportedArchitectureError(f"headprune does not support {model_type!r}: two of its attention modules "
                                           f"are both {twice[0]} layer {twice[1]} in the layout it matches")
    for site in sites:
        for name in QK_NORMS:
            norm = getattr(site.attention, name, None)
            weight = getattr(norm, "weight", None)
            sliced = any(owner is norm for owner, _, _ in site.head_rows)
            if weight is not None and tuple(weight.shape) != (site.head_dim,) and not sliced:
                raise UnsupportedArchitectureError(
                    f"headprune does not support {model_type!r}: its attention's {name} has weights of shape "
                    f"{tuple(weight.shape)} for heads of size {site.head_dim} (a norm over all heads together), so a "
                    "head cannot be removed without changing the others")


# What one unit of pruning is called in logs and reports.
UNIT_NAMES = {"head": "heads", "group": "KV groups", "query": "query positions (of every group)"}


def check_query_unit(sites: list[AttentionSite], name: str) -> None:
    """--unit query on a model not pruned before (`sites` of its original shapes): refused where
    every group holds one query head, since a query position would be a layer's whole attention."""
    if all(site.query_heads == site.kv_heads for site in sites):
        raise ConfigError(f"--unit query prunes query heads within key/value groups: each group of {name} holds one "
                          "query head, so a query position would be a layer's whole attention (use the default "
                          "unit, its heads)")


def find_sites(model: nn.Module, unit: str = "group") -> list[AttentionSite]:
    """All attention sites of `model`, ordered by kind (encoder, decoder, cross) then layer, their
    gates pruning `unit`s: "group" (the default: a key/value group, or a head where each head has
    its own keys and values: the sites' unit is then "head") or "query" (grouped-query attention only).

    Raises UnsupportedArchitectureError, naming the known layouts, when none matches."""
    if unit not in UNITS:
        raise ValueError(f"unit {unit!r}: choose one of {', '.join(UNITS)}")
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if model_type in NOT_YET:  # before the layouts: one matches a part of it
        raise UnsupportedArchitectureError(f"headprune does not support {model_type!r} yet: {NOT_YET[model_type]}")
    for layout in LAYOUTS.values():
        sites = sorted(layout(model), key=lambda s: (KINDS.index(s.kind), s.layer))
        if sites and unit == "query":
            if any(site.unit != "group" for site in sites):
                raise UnsupportedArchitectureError(
                    "--unit query prunes query heads within key/value groups: this model's "
                    "attention has no key/value groups (use the default unit, its heads)")
            for site in sites:
                site.unit = "query"
        elif sites and all(site.unit == "group" and site.query_heads == site.kv_heads for site in sites):
            for site in sites:  # a group of one query head is a head (GPT-2, Llama-2-7B): named so
                site.unit = "head"
        if sites:
            check_sites(model_type, sites)
            return sites
    unread = next(((name, type(m).__name__) for name, m in model.named_modules()
                   if type(m).__name__.endswith(("Attention", "SelfAttention"))), None)
    raise UnsupportedArchitectureError(
        f"headprune does not support {model_type!r}: "
        + (f"its attention module {unread[0]} ({unread[1]}) matches none of the layouts it knows" if unread
           else "none of its modules matches a layout it knows")
        + " (a layout names the query, key and value projections, or one "
        "fused projection and where each head's rows are in it, the output projection that reads the heads' "
        f"contexts, and the head size; see headprune/sites.py): {'; '.join(LAYOUTS)}")
