"""Where the attention heads of each supported architecture live.

An attention *site* is one multi-head attention block: its query, key and value projections and
the output projection whose input is the heads' contexts concatenated head-major. A head is
addressed as (kind, layer, head), kind being "encoder" (encoder self-attention), "decoder"
(decoder self-attention) or "cross" (decoder cross-attention), so encoder-decoders fit the same
structure as encoders.

To support a new architecture, write a function that yields its sites and add it to
ARCHITECTURES under the model's `config.model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from torch import nn

KINDS = ("encoder", "decoder", "cross")


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
        # Read from the weights, not the config, so that it stays right once heads are removed.
        return self.query.out_features // self.head_dim


def _layer_index(name: str) -> int:
    """The integer after `layer.` in a module path such as `bert.encoder.layer.3.attention`."""
    parts = name.split(".")
    return int(parts[parts.index("layer") + 1])


def bert_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """BERT, RoBERTa, XLM-R, ELECTRA, MiniLM: `layer.i.attention.self.{query,key,value}` and
    `layer.i.attention.output.dense`."""
    for name, module in model.named_modules():
        if name.endswith("attention") and hasattr(module, "self") and hasattr(module, "output"):
            attn = module.self
            kind = "cross" if name.endswith("crossattention") else "encoder"
            yield AttentionSite(kind, _layer_index(name), attn, attn.query, attn.key, attn.value,
                                module.output.dense, attn.attention_head_size)


def distilbert_sites(model: nn.Module) -> Iterator[AttentionSite]:
    """DistilBERT: `transformer.layer.i.attention.{q_lin,k_lin,v_lin,out_lin}`."""
    for name, module in model.named_modules():
        if name.endswith("attention") and hasattr(module, "q_lin"):
            yield AttentionSite("encoder", _layer_index(name), module, module.q_lin, module.k_lin,
                                module.v_lin, module.out_lin, module.attention_head_size)


ARCHITECTURES: dict[str, Callable[[nn.Module], Iterator[AttentionSite]]] = {
    "bert": bert_sites,
    "roberta": bert_sites,
    "xlm-roberta": bert_sites,
    "electra": bert_sites,
    "distilbert": distilbert_sites,
}


class UnsupportedArchitectureError(ValueError):
    pass


def find_sites(model: nn.Module) -> list[AttentionSite]:
    """All attention sites of `model`, ordered by kind (encoder, decoder, cross) then layer."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"headprune does not support model_type {model_type!r}; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    sites = sorted(ARCHITECTURES[model_type](model), key=lambda s: (KINDS.index(s.kind), s.layer))
    if not sites:
        raise UnsupportedArchitectureError(
            f"found no attention modules in this {model_type!r} model; "
            "its module layout differs from what headprune expects"
        )
    return sites
