"""Where the attention heads of each supported architecture live.

An attention *site* is one multi-head attention block: its query, key and value projections and
the output projection whose input is the heads' contexts concatenated head-major. A head is
addressed as (kind, layer, head), kind being "encoder" (encoder self-attention), "decoder"
(decoder self-attention) or "cross" (decoder cross-attention), so encoder-decoders fit the same
structure as encoders.

Architectures are recognised by their module layout, not by `model_type`, so a model that reuses
BERT's modules exactly (CamemBERT, ERNIE, ...) works without being listed. To support a new
layout, write a function that yields its sites and add it to LAYOUTS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from torch import nn

from .errors import UnsupportedArchitectureError

KINDS = ("encoder", "decoder", "cross")
DEAD_HEAD = "headprune_dead_head"  # attribute of an attention module that keeps one zeroed head


@dataclass
class AttentionSite:
    kind: str
    layer: int
    attention: nn.Module  # the module that runs attention and holds its head size
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    output: nn.Linear  # input: the heads' contexts, concatenated head-major
    head_dim: int

    @property
    def num_heads(self) -> int:
        """Heads that count: read from the weights, not the config, so that it stays right once
        heads are removed. A decoder site whose heads were all removed keeps one dead head (its
        output columns zero) so that its cache keeps working: it counts as none."""
        if getattr(self.attention, DEAD_HEAD, False):
            return 0
        return self.query.out_features // self.head_dim


def _layer_index(name: str) -> int:
    """The integer after `layer.` in a module path such as `bert.encoder.layer.3.attention`."""
    parts = name.split(".")
    return int(parts[parts.index("layer") + 1])


def bert_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """BERT, RoBERTa, XLM-R, ELECTRA, MiniLM: `layer.i.attention.self.{query,key,value}` and
    `layer.i.attention.output.dense`."""
    for name, module in model.named_modules():
        attn = getattr(module, "self", None)
        if (name.endswith("attention") and hasattr(attn, "query") and hasattr(attn, "attention_head_size")
                and hasattr(getattr(module, "output", None), "dense")):
            kind = "cross" if name.endswith("crossattention") else "encoder"
            yield AttentionSite(kind, _layer_index(name), attn, attn.query, attn.key, attn.value,
                                module.output.dense, attn.attention_head_size)


def distilbert_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """DistilBERT: `transformer.layer.i.attention.{q_lin,k_lin,v_lin,out_lin}`."""
    for name, module in model.named_modules():
        if name.endswith("attention") and hasattr(module, "q_lin") and hasattr(module, "out_lin"):
            yield AttentionSite("encoder", _layer_index(name), module, module.q_lin, module.k_lin,
                                module.v_lin, module.out_lin, module.attention_head_size)


def seq2seq_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """BART, mBART, Marian, Pegasus: `encoder.layers.i.self_attn` (encoder), `decoder.layers.i.self_attn`
    (decoder) and `decoder.layers.i.encoder_attn` (cross), each with `q_proj, k_proj, v_proj, out_proj`."""
    for name, module in model.named_modules():
        parts = name.split(".")
        if not (hasattr(module, "q_proj") and hasattr(module, "out_proj") and hasattr(module, "head_dim")
                and "layers" in parts and parts.index("layers") > 0):
            continue
        stack = parts[parts.index("layers") - 1]
        kind = "cross" if parts[-1] == "encoder_attn" else stack
        if kind in KINDS and parts[-1] in ("self_attn", "encoder_attn"):
            yield AttentionSite(kind, int(parts[parts.index("layers") + 1]), module, module.q_proj,
                                module.k_proj, module.v_proj, module.out_proj, module.head_dim)


# layout name (with the models known to use it) -> the function that finds its sites
LAYOUTS: dict[str, Callable[[nn.Module], Iterator[AttentionSite]]] = {
    "BERT-style (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM, CamemBERT, ERNIE)": bert_sites,
    "DistilBERT-style": distilbert_sites,
    "BART-style encoder-decoder (BART, mBART, Marian, Pegasus)": seq2seq_sites,
}


# Known layouts that need more than slicing q, k, v and the output projection.
_T5 = ("its relative position bias is computed in the first layer of each stack and shared by all "
       "layers, so removing heads needs the bias sliced per layer (BART, mBART and Marian are supported)")
NOT_YET = {"t5": _T5, "mt5": _T5, "umt5": _T5, "longt5": _T5,
           "deberta": "its relative attention reads the head count from the module",
           "deberta-v2": "its relative attention reads the head count from the module"}


def find_sites(model: nn.Module) -> list[AttentionSite]:
    """All attention sites of `model`, ordered by kind (encoder, decoder, cross) then layer.

    Raises UnsupportedArchitectureError, naming the known layouts, when none matches."""
    for layout in LAYOUTS.values():
        sites = sorted(layout(model), key=lambda s: (KINDS.index(s.kind), s.layer))
        if sites:
            return sites
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if model_type in NOT_YET:
        raise UnsupportedArchitectureError(f"headprune does not support {model_type!r} yet: {NOT_YET[model_type]}")
    raise UnsupportedArchitectureError(
        f"headprune does not support {model_type!r}: its attention modules match none of the "
        f"layouts it knows: {'; '.join(LAYOUTS)}")
