"""From a mask to a smaller model, and back from disk.

`remove_heads` slices the pruned heads out of the query, key and value projections (their rows)
and the output projection (its columns), and out of whatever else the site holds per head (position
bias tables, norms, sinks: see AttentionSite), site by site, so each layer keeps its own number of
heads; the attention code infers the head count from the tensor shapes. An encoder site left with
no heads skips attention: its output is the output projection's bias, exactly what the masked model
gives; a decoder (self or cross) site keeps one dead head, its output projection zero, so that the
key/value cache keeps a tensor per layer.

`save_pruned` writes a standard model folder whose config.json records the kept heads
(`headprune.kept_heads`, in the original numbering, with a checksum); `load_pruned` rebuilds those
shapes from the config and loads the weights, refusing weights that do not match the record and a
record whose head numbers were edited (same counts, other heads: the shapes alone cannot tell).

`zero_pruned_heads` is the weights-only alternative: a model of the original shape whose pruned
heads' output-projection columns are zero (same outputs, not smaller, loads anywhere).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ModelError, PrunedCheckpointError, first_line
from .gates import ATTRIBUTE as GATES_ATTRIBUTE
from .outputs import atomic_folder
from .sites import DEAD_HEAD, AttentionSite, find_sites, out_features, weight_out_in

Head = tuple[str, int, int]

# Nothing read from disk may run code: every transformers load says so explicitly (without it a
# folder with `auto_map` makes transformers ask on the terminal whether to run its code), and
# weights come from safetensors only (a pickle can run code when it is read).
SAFE = {"trust_remote_code": False}
SAFE_WEIGHTS = {**SAFE, "use_safetensors": True}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_model_folder(folder, name: str | None = None) -> None:
    """Refuse a local model folder that asks to run its own code or holds its weights only as a
    pickle, with one line, before transformers reads it."""
    folder, name = Path(folder), name or str(folder)
    for file in ("config.json", "tokenizer_config.json"):
        try:
            settings = json.loads((folder / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # absent or unreadable: the loader that needs it says so
        if isinstance(settings, dict) and settings.get("auto_map"):
            raise ModelError(f"{name} asks to run code of its own ({file} has an auto_map); headprune never "
                             "runs code from a model folder: use a model whose architecture transformers has")
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles and not any(folder.glob("*.safetensors")):
        raise ModelError(f"{name} holds its weights only as a pickle ({', '.join(pickles[:3])}), which headprune "
                         "does not read (loading a pickle can run code); convert them to safetensors first")


def check_finite_weights(model: nn.Module, name: str) -> None:
    """Refuse weights that hold NaN or infinite values (a damaged file whose header still reads, or a
    model that diverged): every score, metric and export of them would be NaN, or silently wrong."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelError(f"{name}: {len(bad)} weight tensor(s) hold NaN or infinite values (e.g. {bad[0]}): "
                         "a damaged file, or a model that diverged in training")


def heads_checksum(kept) -> str:
    """sha256 of the kept heads, in a canonical order: detects an edited record."""
    canonical = json.dumps(sorted([str(k), int(l), int(h)] for k, l, h in kept))
    return hashlib.sha256(canonical.encode()).hexdigest()


@torch.no_grad()
def zero_pruned_heads(sites: list[AttentionSite], mask: torch.Tensor) -> None:
    offset = 0
    for site in sites:
        d = site.head_dim
        gate = site.query_gate(mask[offset:offset + site.num_heads])
        for head in range(site.query_heads):
            if gate[head] == 0:
                weight_out_in(site.output)[:, head * d:(head + 1) * d] = 0
        offset += site.num_heads


@torch.no_grad()
def add_output_biases(sites: list[AttentionSite]) -> int:
    """Give every output projection without a bias a zero one (where reconstruction puts the
    removed heads' mean contribution); returns how many were added. A saved model records this
    (`headprune.output_biases`) so that `load_pruned` adds them again before loading the weights."""
    added = 0
    for site in sites:
        if site.output.bias is None:
            weight = site.output.weight
            site.output.bias = nn.Parameter(weight.new_zeros(out_features(site.output)),
                                            requires_grad=weight.requires_grad)
            added += 1
    return added


def _keep_rows(linear: nn.Module, index: torch.Tensor) -> None:
    """Keep these output features of an nn.Linear (rows of its weight) or a Conv1D (columns)."""
    conv = isinstance(linear, Conv1D)
    linear.weight = nn.Parameter(linear.weight.detach().index_select(1 if conv else 0, index).clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach().index_select(0, index).clone())
    if conv:
        linear.nf = len(index)
    else:
        linear.out_features = len(index)


def _keep_columns(linear: nn.Module, index: torch.Tensor) -> None:
    """Keep these input features of an nn.Linear (columns of its weight) or a Conv1D (rows)."""
    conv = isinstance(linear, Conv1D)
    linear.weight = nn.Parameter(linear.weight.detach().index_select(0 if conv else 1, index).clone())
    if conv:
        linear.nx = len(index)
    else:
        linear.in_features = len(index)


class LayerConfig:
    """One layer's view of the model's config with its own head counts, for attention code that
    reads them from the config (Phi-3); everything else, the attention kernel included, is read
    from the shared config as it is now."""

    def __init__(self, shared, **own):
        self.__dict__.update(_shared=shared, _own=own)

    def __getattr__(self, name):
        if name.startswith("__") or "_shared" not in self.__dict__:
            raise AttributeError(name)
        own = self.__dict__["_own"]
        return own[name] if name in own else getattr(self.__dict__["_shared"], name)


def _set_head_count(site: AttentionSite, queries: int, keys: int) -> None:
    """Keep the module's own bookkeeping true (DeBERTa-like code reads it; BERT infers it)."""
    attention, d = site.attention, site.head_dim
    for name in ("num_attention_heads", "n_heads", "num_heads"):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, queries)
    for name in ("all_head_size", "inner_dim"):  # inner_dim: T5-like (LongT5's block attention reads it)
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, queries * d)
    if isinstance(getattr(attention, "num_key_value_heads", None), int):
        attention.num_key_value_heads = keys
    if isinstance(getattr(attention, "num_key_value_groups", None), int) and keys:
        attention.num_key_value_groups = queries // keys
    if site.query_width:
        setattr(attention, site.query_width, queries * d)
    if site.fused and isinstance(getattr(attention, "split_size", None), int):
        attention.split_size = queries * d  # GPT-2 splits its fused output into three equal parts
    if site.layer_config:
        shared = attention.config._shared if isinstance(attention.config, LayerConfig) else attention.config
        attention.config = LayerConfig(shared, num_attention_heads=queries, num_key_value_heads=keys)


def _skip_attention(attention: nn.Module, output: nn.Linear) -> None:
    """Give `attention` a forward that returns an empty context (projected, where the module owns
    its output projection), so a layer without heads costs nothing."""
    owned = next((name for name, m in attention.named_modules() if m is output), None)
    base = type(attention)

    def forward(self, hidden_states, *args, **kwargs):
        context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        return (self.get_submodule(owned)(context) if owned else context), None

    attention.__class__ = type(f"Headless{base.__name__}", (base,), {"forward": forward})


BIAS_HEADS = "headprune_bias_heads"  # T5, BEiT: the heads (original numbers) of a layer's slice of a position bias


def _share_position_bias(attention: nn.Module, heads: list[int]) -> None:
    """T5: each stack's first layer computes the relative position bias for every head and the
    stack hands it from layer to layer, so a pruned layer takes the slice of its own heads (in
    the original numbering: `heads`) and hands on the whole; a layer left without heads still
    hands it on (and computes it, where it owns the table). LongT5's encoder attends in blocks
    (local or transient-global): its bias holds the heads at dim 2 (see _block_bias_forward)."""
    base = type(attention)
    if not base.__name__.startswith("HeadPruned"):
        width = attention.n_heads  # the bias of every head, before any is removed
        if hasattr(attention, "block_len"):
            forward = _block_bias_forward(base)
        else:
            def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None,
                        **kwargs):
                if position_bias is None:
                    position_bias = self.headprune_full_bias(hidden_states, key_value_states, cache)
                mine = getattr(self, BIAS_HEADS)
                if not mine:
                    return self.o(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), position_bias, None
                output, _, weights = base.forward(self, hidden_states, mask=mask, key_value_states=key_value_states,
                                                  position_bias=position_bias[:, mine], cache=cache, **kwargs)
                return output, position_bias, weights

        def full_bias(self, hidden_states, key_value_states, cache):
            """What T5Attention computes when no bias is handed in, for every head."""
            queries = hidden_states.shape[1]
            past = 0 if key_value_states is not None or cache is None else cache.get_seq_length(self.layer_idx)
            if key_value_states is not None:
                keys = key_value_states.shape[1]
            else:  # the keys after this step's update: past + queries, a static cache's whole length
                keys = cache.get_mask_sizes(queries, self.layer_idx)[0] if cache is not None else queries
            if self.has_relative_attention_bias:
                return self.compute_bias(queries, keys, device=hidden_states.device, past_seen_tokens=past)
            return hidden_states.new_zeros(1, self.headprune_width, queries, keys)

        attention.__class__ = type(f"HeadPruned{base.__name__}", (base,),
                                   {"forward": forward, "headprune_full_bias": full_bias, "headprune_width": width})
    setattr(attention, BIAS_HEADS, heads)


def _bias_heads(owner: nn.Module, site: AttentionSite, queries: list[int]) -> list[int]:
    """The original numbers of the query heads `queries` (current numbering) of a site whose module
    `owner` slices a position bias computed for every original head (pruned before: its record)."""
    numbers = getattr(owner, BIAS_HEADS, None) or list(range(site.query_heads))
    return [numbers[h] for h in queries]


def _slice_shared_bias(layer: nn.Module, heads: list[int]) -> None:
    """BEiT's shared relative position bias: the model computes it for every head and hands it to
    each layer as the attention mask, so a pruned layer takes the slice of its own heads (in the
    original numbering: `heads`) before it adds the bias of its own table; a layer left without
    heads takes it whole (its table stays whole; its attention is skipped)."""
    base = type(layer)
    if not base.__name__.startswith("HeadPruned"):
        def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
            mine = getattr(self, BIAS_HEADS)
            if attention_mask is not None and mine:
                attention_mask = attention_mask[:, mine]
            return base.forward(self, hidden_states, attention_mask, *args, **kwargs)
        layer.__class__ = type(f"HeadPruned{base.__name__}", (base,), {"forward": forward})
    setattr(layer, BIAS_HEADS, heads)


def _block_bias_forward(base: type):
    """The forward of LongT5's local or transient-global attention taking its heads' slice of a
    position bias shaped (1 or batch, 1 or blocks, heads, block, keys). Without one handed in (the
    stack's first layer) it builds the bias of every head as transformers' own forward does: the
    relative table, the local mask and, transient-global, the side bias to the global tokens."""

    def forward(self, hidden_states, mask=None, position_bias=None, output_attentions=False, **kwargs):
        if position_bias is None:
            position_bias = _full_block_bias(self, hidden_states, mask)
        mine = getattr(self, BIAS_HEADS)
        if not mine:
            output = self.o(hidden_states.new_zeros(*hidden_states.shape[:-1], 0))
            return (output, position_bias) + ((None,) if output_attentions else ())
        outputs = base.forward(self, hidden_states, mask=mask, position_bias=position_bias[:, :, mine],
                               output_attentions=output_attentions, **kwargs)
        return (outputs[0], position_bias) + tuple(outputs[2:])
    return forward


def _full_block_bias(attention: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    from transformers.models.longt5 import modeling_longt5 as longt5
    blocks, width = attention.block_len, attention.headprune_width
    if attention.has_relative_attention_bias:
        bias = attention.compute_bias(blocks)
    else:
        bias = hidden_states.new_zeros(1, 1, width, blocks, 3 * blocks)
    side = hasattr(attention, "global_block_size")  # transient-global
    if mask is not None:  # local: the stack hands in the local mask; transient-global: the plain one
        local = longt5._get_local_attention_mask(mask, blocks, hidden_states.device) if side else mask
        bias = bias + torch.where(local > 0, 0.0, -1e10).transpose(1, 2)
    if not side:
        return bias
    bias = bias.to(hidden_states.dtype)
    mask = mask if mask is not None else hidden_states.new_ones(hidden_states.shape[:-1])
    _, segments = longt5._make_global_fixed_block_ids(mask, attention.global_block_size)
    side_bias = longt5._split_into_blocks(attention.compute_side_bias(mask, segments), blocks, dim=-2).transpose(1, 2)
    return torch.cat([bias, side_bias.to(hidden_states.dtype).to(hidden_states.device)], dim=-1)


def remove_heads(model: nn.Module, kept: list[Head], unit: str = "group") -> nn.Module:
    """Remove every head (unit: see `headprune.sites`) of `model` not in `kept`, addressed by the
    model's current numbering.

    An encoder site left with no heads skips attention. A decoder self- or cross-attention site
    left with none keeps one dead head (its output columns zero: the same outputs; with grouped
    keys and values, one query head and its key/value head), because the key/value cache of
    generation reads its length from the first layer's keys, and a layer that caches nothing
    would put every later position off.

    Raises ValueError for a kept list that names a head the model does not have or a head twice,
    and for a model with head gates still attached (their masks would fall on the
    renumbered heads: detach_gates first)."""
    if hasattr(model, GATES_ATTRIBUTE):
        raise ValueError("this model still has head gates: call detach_gates(model) before removing heads")
    sites = find_sites(model, unit)
    kept, problem = checked_heads(kept, {(site.kind, site.layer): site.num_heads for site in sites})
    if problem:
        raise ValueError(f"remove_heads: the list of kept heads {problem}")
    kept = set(kept)
    for site in sites:
        keep = [h for h in range(site.num_heads) if (site.kind, site.layer, h) in kept]
        if len(keep) == site.num_heads:
            continue
        dead = not keep and site.kind in ("decoder", "cross")
        queries, keys = ([0], [0]) if dead else (site.query_heads_of(keep), site.kv_heads_of(keep))
        device = site.query.weight.device
        # before the counts change: the kept heads' numbers in a bias computed for every head
        if site.position_bias:  # T5
            _share_position_bias(site.attention, _bias_heads(site.attention, site, queries) if keep or dead else [])
        if site.shared_bias is not None:  # BEiT
            _slice_shared_bias(site.shared_bias, _bias_heads(site.shared_bias, site, queries))

        def index(rows):
            return torch.tensor(rows, dtype=torch.long, device=device)
        if site.fused:
            _keep_rows(site.query, index(site.fused_rows(queries, keys)))
        else:
            for which in ("query", "key", "value"):
                _keep_rows(getattr(site, which), index(site.rows(which, queries if which == "query" else keys)))
        for projection, which in site.extra:
            _keep_rows(projection, index(site.own_rows(queries if which == "query" else keys)))
        for owner, name, which in site.extra_biases:
            bias = getattr(owner, name)
            rows = index(site.own_rows(queries if which == "query" else keys))
            setattr(owner, name, nn.Parameter(bias.detach().index_select(0, rows).clone(),
                                              requires_grad=bias.requires_grad))
        # tables with a column per head; a layer left without heads keeps its table whole (BEiT's
        # layer still computes the bias from it, which the skipped attention then drops)
        for owner, name in site.head_columns if queries else ():
            table = getattr(owner, name)
            setattr(owner, name, nn.Parameter(table.detach().index_select(1, index(queries)).clone(),
                                              requires_grad=table.requires_grad))
        for owner, name, which in site.head_rows:
            rows = getattr(owner, name)
            setattr(owner, name, nn.Parameter(rows.detach().index_select(0, index(queries if which == "query" else keys))
                                              .clone(), requires_grad=rows.requires_grad))
        _keep_columns(site.output, index(site.own_rows(queries)))
        _set_head_count(site, len(queries), len(keys))
        if dead:
            with torch.no_grad():
                site.output.weight.zero_()
            setattr(site.attention, DEAD_HEAD, True)
        elif not keep and not site.position_bias:  # (a T5 layer skips its attention in _share_position_bias)
            _skip_attention(site.attention, site.output)
    # transformers' save_pretrained then keeps the modules' own weight names (as save_pruned does), not
    # an older layout's (ViT's, GPT-NeoX's): load_pruned loads them into the rebuilt modules as they are
    model._weight_conversions = []
    return model


def original_numbering(config, kept: list[Head]) -> list[Head]:
    """`kept` of a model that was physically pruned before, in its original head numbers."""
    previous = getattr(config, "headprune", None) or {}
    if not previous.get("physical"):
        return list(kept)
    before: dict = {}
    for kind, layer, head in sorted(tuple(h) for h in previous["kept_heads"]):
        before.setdefault((kind, layer), []).append(head)
    return [(kind, layer, before[(kind, layer)][head]) for kind, layer, head in kept]


def save_pruned(model: nn.Module, folder: Path, kept: list[Head], tokenizer=None, unit: str = "group",
                **record) -> None:
    """Remove the heads (units) not kept (current numbering) and save a model folder that
    `load_pruned` loads again; config.json records the kept heads in the original numbering and
    the unit they count."""
    prune_in_place(model, kept, unit, **record)
    with atomic_folder(Path(folder)) as tmp:  # a kill leaves no half-written model folder
        # the module's own weight names (not transformers' renaming back to an older checkpoint
        # layout, e.g. GPT-NeoX's embed_out): load_pruned loads them into the rebuilt modules as they are
        model.save_pretrained(tmp, save_original_format=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def prune_in_place(model: nn.Module, kept: list[Head], unit: str = "group", **record) -> None:
    """What `save_pruned` does to the model before writing it: the heads not kept removed, and
    config.json's record of the kept ones (the original numbering)."""
    earlier = getattr(model.config, "headprune", None) or {}
    if earlier.get("physical") and earlier.get("unit", "group") != unit:
        raise ValueError(f"this model was pruned by {earlier.get('unit', 'group')} before: prune it "
                         f"again by {earlier.get('unit', 'group')}")
    remove_heads(model, kept, unit)  # first: it checks the kept heads against the model
    recorded = original_numbering(model.config, kept)
    if earlier.get("output_biases"):  # pruned again: the biases added before stay
        record.setdefault("output_biases", True)
    if earlier.get("kept_heads"):  # pruned again: how the model it started from was made stays on record
        record.setdefault("pruned_before", {key: value for key, value in earlier.items()
                                            if key not in ("kept_heads", "kept_heads_sha256")})
    model.config.headprune = {"kept_heads": [list(h) for h in recorded], "physical": True, "unit": unit,
                              "kept_heads_sha256": heads_checksum(recorded), **record}


def model_class_of(config):
    """The class the config was saved from (`architectures[0]`), else the sequence classifier."""
    import transformers

    names = getattr(config, "architectures", None) or []
    if not names:
        return transformers.AutoModelForSequenceClassification
    found = getattr(transformers, str(names[0]), None)
    if not (isinstance(found, type) and issubclass(found, transformers.PreTrainedModel)):
        raise PrunedCheckpointError(f"config.json names the architecture {names[0]!r}, which is not a model "
                                    "class of transformers")
    return found


def load_pruned_config(folder, **config_kwargs):
    """The config of a saved model folder, read without running anything from it."""
    from transformers import AutoConfig

    if not Path(folder).is_dir():
        raise PrunedCheckpointError(f"no such model folder: {folder}")
    if not (Path(folder) / "config.json").is_file():
        raise PrunedCheckpointError(f"{folder} holds no config.json: not a model folder")
    check_model_folder(folder)
    try:
        return AutoConfig.from_pretrained(folder, **SAFE, **config_kwargs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PrunedCheckpointError(f"cannot read {folder}/config.json: {first_line(err)}") from err


def checked_heads(heads, sizes: dict) -> tuple[list[Head], str | None]:
    """`heads` as (kind, layer, head) tuples, and what is wrong with them, if anything: a malformed
    entry, a head the model does not have (`sizes`: heads per (kind, layer)) or one named twice."""
    kept = []
    for head in heads:
        if not (isinstance(head, (list, tuple)) and len(head) == 3 and isinstance(head[0], str)
                and all(isinstance(i, int) and not isinstance(i, bool) for i in head[1:])):
            return kept, f"has a malformed kept head {head!r} (expected [kind, layer, head])"
        if not 0 <= head[2] < sizes.get((head[0], head[1]), 0):
            return kept, f"names {head[0]} head {head[2]} of layer {head[1]}, which the model does not have"
        kept.append((head[0], head[1], head[2]))
    if len(set(kept)) < len(kept):
        return kept, "names a head more than once"
    return kept, None


def check_record(record, sites: list[AttentionSite], where) -> list[Head]:
    """The kept heads of a physically pruned model's record, checked against the sites of its
    original shape: well formed, every head one of the model's, none twice, and the checksum that
    headprune writes (a record edited to other heads of the same counts fits the weights' shapes,
    so only the checksum can tell). Returns them as tuples."""
    def bad(why: str):
        return PrunedCheckpointError(f"{where}: the headprune record in config.json {why}; restore the "
                                     "config.json that headprune wrote")
    if not isinstance(record, dict) or not isinstance(record.get("kept_heads"), list):
        raise bad("is malformed (no list of kept_heads)")
    if record.get("unit", "group") not in ("group", "query"):
        raise bad(f"has an unknown unit {record.get('unit')!r}")
    kept, problem = checked_heads(record["kept_heads"], {(site.kind, site.layer): site.num_heads for site in sites})
    if problem:
        raise bad(problem)
    if "kept_heads_sha256" not in record:
        raise bad("has no checksum (kept_heads_sha256)")
    if record["kept_heads_sha256"] != heads_checksum(kept):
        raise bad("does not match its checksum (the record was edited)")
    return kept


def model_from_config(model_class, config) -> nn.Module:
    """A model of `config` with fresh weights, built as from_pretrained builds it: in the dtype it was
    saved in (config.dtype: a bf16 model stays bf16, not the float32 a plain constructor gives)."""
    build = getattr(model_class, "from_config", None) or getattr(model_class, "_from_config", None)
    return build(config) if build else model_class(config)


def with_pruned_shapes(model: nn.Module, record: dict, where) -> nn.Module:
    """A model built from a physically pruned model's config (its original shapes) given the shapes
    its headprune `record` names: the kept heads alone, and the output biases the reconstruction
    added. On the meta device it costs nothing (the sizes of a pruned model, before any weights)."""
    unit = record.get("unit", "group")
    kept = check_record(record, find_sites(model, unit) if unit in ("group", "query") else [], where)
    remove_heads(model, kept, unit)
    if record.get("output_biases"):
        add_output_biases(find_sites(model, unit))
    return model


def load_pruned(folder, model_class=None, **config_kwargs) -> nn.Module:
    """Load a model saved by headprune: physically pruned ones get their shapes rebuilt from
    `config.headprune.kept_heads` before the weights are loaded; others load as usual. The class
    is the one the model was saved as (`config.architectures`) unless `model_class` is given."""
    config = load_pruned_config(folder, **config_kwargs)
    saved_as = (getattr(config, "architectures", None) or [None])[0]
    asked_for = model_class.__name__ if model_class is not None else None
    model_class = model_class or model_class_of(config)
    record = getattr(config, "headprune", None) or {}
    if not isinstance(record, dict):
        check_record(record, [], folder)  # says what is wrong with it
    if not record.get("physical"):
        try:
            return model_class.from_pretrained(folder, **SAFE_WEIGHTS, **config_kwargs)
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            raise PrunedCheckpointError(f"cannot load the model in {folder}: {first_line(err)}") from err
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):  # parameters on the meta device: no full-size random model
        model = with_pruned_shapes(model_from_config(model_class, config), record, folder)
    kept = record["kept_heads"]
    try:
        _load_weights(model, Path(folder))
        if any(p.is_meta for p in model.parameters()):  # one the files leave out (fixed positions): built for real
            model = with_pruned_shapes(model_from_config(model_class, config), record, folder)
            _load_weights(model, Path(folder))
    except RuntimeError as err:
        if asked_for and saved_as and asked_for != saved_as:
            raise PrunedCheckpointError(
                f"{folder} holds a {saved_as}, whose weights {asked_for} does not take: load it as saved "
                "(without model_class) and use its .base_model for the model without its head") from err
        raise PrunedCheckpointError(
            f"the weights in {folder} do not match the heads its config.json records "
            f"({len(kept)} kept heads): {first_line(err)} ... "
            "was config.json edited or were the weights replaced?") from err
    except (OSError, ValueError, SafetensorError) as err:
        raise PrunedCheckpointError(f"cannot read the weights in {folder}: {first_line(err)}") from err
    check_finite_weights(model, str(folder))
    if model.can_generate() and (Path(folder) / "generation_config.json").is_file():  # as from_pretrained reads it
        from transformers import GenerationConfig
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as err:
            raise PrunedCheckpointError(f"cannot read {folder}/generation_config.json: {first_line(err)}") from err
    return model.eval()


def _load_weights(model: nn.Module, folder: Path) -> None:
    """Load model.safetensors, or the safetensors shards its index names (never a pickle beside
    them), refusing any key that is neither there nor one the model itself leaves out of its files
    (tied embeddings, fixed sinusoidal positions: transformers' `_tied_weights_keys` and
    `_keys_to_ignore_on_save`)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        shards = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if not names or not all(isinstance(n, str) and n.endswith(".safetensors") and Path(n).name == n for n in names):
            raise ValueError(f"{index.name} does not name safetensors shards in its folder")
        shards = [folder / n for n in names]
    else:
        raise OSError(f"no model.safetensors (or model.safetensors.index.json) in {folder}: headprune reads "
                      "safetensors only (loading a pickle can run code)")
    loaded, unexpected = set(), []
    own = model.state_dict()  # (meta parameters: shapes and dtypes only)
    for shard in shards:  # one shard in memory at a time
        # each tensor, read into memory of its own (not left mapped to the file, which another program
        # could rewrite) in the parameter's dtype, becomes the parameter (assign): no model of random weights
        weights = {name: t.to(own[name].dtype if name in own else t.dtype, copy=True)
                   for name, t in load_file(shard).items()}
        wrong = [name for name, t in weights.items() if name in own and tuple(t.shape) != tuple(own[name].shape)]
        if wrong:
            raise RuntimeError(f"size mismatch for {wrong[0]}: {tuple(weights[wrong[0]].shape)} in the file, "
                               f"{tuple(own[wrong[0]].shape)} in the model")
        result = model.load_state_dict(weights, strict=False, assign=True)
        unexpected += result.unexpected_keys
        loaded |= set(weights) - set(result.unexpected_keys)
        del weights
    missing_in_files = [k for k in model.state_dict() if k not in loaded]
    left_out = []
    for prefix, module in model.named_modules():  # submodules (BART's encoder) declare their own
        for attribute in ("_tied_weights_keys", "_keys_to_ignore_on_save", "_keys_to_ignore_on_load_missing"):
            left_out += [f"{prefix}.{key}" if prefix else key for key in getattr(module, attribute, None) or []]
    missing = [k for k in missing_in_files
               if k not in left_out and not any(re.fullmatch(pattern, k) for pattern in left_out)]
    if missing or unexpected:
        raise RuntimeError(f"Missing key(s): {missing[:5]}; unexpected key(s): {unexpected[:5]}")
    model.tie_weights()
