"""Budgets in what the user wants (issue 24): a parameter count, a share of the key/value
cache or a speedup on this machine (headprune.latency) instead of a number of heads.

The cost model counts, from the weights' shapes, what one unit (a head, a KV group or a query
position: see headprune.sites) of each site costs: its rows of the query, key and value
projections and its columns of the output projection (biases included) in parameters, and its
keys and values in bytes of cache per generated token (decoder self-attention only: an encoder's
or a cross-attention's cache does not grow with the tokens generated). Every unit of a site costs
the same, and in the models headprune knows every site of a kind too, so a budget becomes a number
of units: the most whose cost fits, before any weights are trained.

A decoder layer left without units keeps one dead head for the cache (see pruning.remove_heads),
which costs too; after the method has ranked the units, `fit` drops the lowest-ranked kept units
until the model with its dead heads fits the budget exactly in this cost model, then gives the
room left to the best units left out (or, --allocation uniform, keeps the most units spread
evenly that fit).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .config import allocation_in_effect, reconstruct_in_effect, roomy_uniform, targeted
from .errors import ConfigError
from .latency import even_counts, even_mask, predicted_seconds
from .sites import AttentionSite, in_features, out_features

log = logging.getLogger("headprune")


@dataclass
class SiteCost:
    kind: str
    units: int
    params: int  # of one unit
    kv_bytes: int  # of one unit, per generated token
    dead_params: int  # of the dead head kept where a decoder layer keeps no unit
    dead_kv_bytes: int


def _params(site: AttentionSite, queries: int, kvs: int) -> int:
    """Parameters of `queries` query heads and `kvs` key/value heads of `site`: what removing them
    removes (see pruning.remove_heads): their rows of the projections and biases, their output
    columns, and the per-head rows and columns some families have besides (DeBERTa's relative
    position projections and separate biases, Swin's and BEiT's bias tables, Cohere's norms, GPT-OSS's sinks)."""
    d, width = site.head_dim, in_features(site.query)
    rows = (queries + 2 * kvs) * d
    biases = sum(d * n for p, n in ((site.query, queries), (site.key, kvs), (site.value, kvs)) if p.bias is not None)
    count = rows * width + biases + queries * d * out_features(site.output)

    def heads(which: str) -> int:
        return queries if which == "query" else kvs
    count += sum(heads(which) * d * (in_features(p) + (p.bias is not None)) for p, which in site.extra)
    count += sum(heads(which) * d for _, _, which in site.extra_biases)
    count += sum(queries * getattr(owner, name).shape[0] for owner, name in site.head_columns)
    for owner, name, which in site.head_rows:
        table = getattr(owner, name)
        count += heads(which) * (table.numel() // max(table.shape[0], 1))
    return count


def _dead_params(site: AttentionSite) -> int:
    """What a site's parameters change by when it keeps no unit, against the fixed count (which
    holds, --unit query, its key/value heads): a decoder's keeps one dead head (one query and one
    key/value head); an encoder's tables with a column per head stay whole."""
    dead = _params(site, 1, 1) if site.kind in ("decoder", "cross") else \
        sum(getattr(owner, name).numel() for owner, name in site.head_columns)
    return dead - (_params(site, 0, site.kv_heads) if site.unit == "query" and site.kind in ("decoder", "cross") else 0)


def site_costs(sites: list[AttentionSite]) -> list[SiteCost]:
    costs = []
    for site in sites:
        per_group = site.query_heads // max(site.kv_heads, 1)
        queries = per_group if site.unit == "group" else site.kv_heads if site.unit == "query" else 1
        kvs = 0 if site.unit == "query" else 1
        bytes_per_value = site.key.weight.element_size()
        cached = site.kind == "decoder"
        costs.append(SiteCost(site.kind, site.num_heads, _params(site, queries, kvs),
                              2 * kvs * site.head_dim * bytes_per_value if cached else 0,
                              _dead_params(site), 2 * site.head_dim * bytes_per_value if cached else 0))
    return costs


def total_params(model) -> int:
    """The model's parameters, not counting the gates' (their scores)."""
    from .gates import ATTRIBUTE
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(ATTRIBUTE + "."))


def fixed_params(model, costs: list[SiteCost]) -> int:
    """The parameters no choice of units changes: all but the units' and the dead heads' (a model
    pruned before may already hold dead heads; `cost_of` counts them again where they stay)."""
    return total_params(model) - sum(c.units * c.params + (c.dead_params if c.units == 0 else 0) for c in costs)


def added_bias_params(cfg, sites: list[AttentionSite]) -> int:
    """The output biases that --reconstruct bias or both will add where the architecture has none
    (a cost no choice of units changes)."""
    if reconstruct_in_effect(vars(cfg)) not in ("bias", "both"):
        return 0
    return sum(out_features(site.output) for site in sites if site.output.bias is None)


def target_of(cfg, model, costs: list[SiteCost]) -> tuple[str, int]:
    """What --target-params or --target-kv-cache bounds, and the bound: a fraction made absolute (of
    the model as given, the dead heads of a model pruned before included), in whole parameters or
    bytes, so that 0.7 of 46,080 bytes is 32,256 whatever the float's last bit says."""
    if cfg.target_params is not None:
        key, value, whole = "parameters", cfg.target_params, total_params(model)
    else:
        key, value = "kv_cache_bytes_per_token", cfg.target_kv_cache
        whole = cost_of(costs, None, 0)[key]
    return key, math.floor((value * whole if value <= 1 else value) + 1e-6)


def budget_units(cfg, model, sites: list[AttentionSite]) -> int | list[int]:
    """The most units whose cost fits --target-params or --target-kv-cache (dead heads aside: `fit`
    sees to them once the units are ranked). An encoder-decoder's cache budget is one per kind: only
    its decoder self-attention caches per generated token, so its encoder and cross heads stay."""
    costs = site_costs(sites)
    key, target = target_of(cfg, model, costs)
    if key == "parameters":
        total = total_params(model)
        per_unit = {c.params for c in costs if c.units}
        # with the biases reconstruction adds and the dead heads a model pruned before keeps
        fixed = fixed_params(model, costs) + added_bias_params(cfg, sites) + sum(c.dead_params for c in costs if not c.units)
        if len(per_unit) != 1:
            raise ConfigError("--target-params: this model's heads differ in size between layers; give --k")
        k = int((target - fixed) // per_unit.pop())
        if k < 1:
            raise ConfigError(f"--target-params {cfg.target_params:g}: the model without its attention heads "
                              f"already has {fixed:,} parameters (of {total:,})")
        if k >= sum(c.units for c in costs):
            log.warning("--target-params %g: the unpruned model (%s parameters) fits it already: every head "
                        "is kept", cfg.target_params, f"{total:,}")
        return min(k, sum(c.units for c in costs))
    cached = [c for c in costs if c.kv_bytes]
    if not cached:
        raise ConfigError("--target-kv-cache: this model caches no keys and values per generated token "
                          "(no decoder self-attention pruned by key/value head; --unit query keeps the cache)")
    per_unit = {c.kv_bytes for c in cached}
    if len(per_unit) != 1:
        raise ConfigError("--target-kv-cache: this model's key/value heads differ in size between layers; give --k")
    dead = sum(c.dead_kv_bytes for c in costs if c.units == 0)  # the dead heads of a model pruned before stay
    k = int((target - dead) // per_unit.pop())
    if k < 1:
        raise ConfigError(f"--target-kv-cache {cfg.target_kv_cache:g} keeps less than one key/value head")
    if k >= sum(c.units for c in cached):
        log.warning("--target-kv-cache %g: the unpruned model's cache fits it already: every key/value head is kept",
                    cfg.target_kv_cache)
    if len(cached) != len(costs):  # the other kinds cost no cache per token: all of them kept
        kinds = list(dict.fromkeys(c.kind for c in costs))
        return [k if kind == "decoder" else sum(c.units for c in costs if c.kind == kind) for kind in kinds]
    return k


def cost_of(costs: list[SiteCost], mask: torch.Tensor | None, fixed: int) -> dict:
    """Parameters and cache bytes per token of the model that keeps `mask` (None: every unit), dead
    heads included (`fixed`: the parameters no choice of units changes)."""
    params, kv, offset = fixed, 0, 0
    for c in costs:
        kept = c.units if mask is None else int(mask[offset:offset + c.units].sum())
        params += kept * c.params + (c.dead_params if kept == 0 else 0)
        kv += kept * c.kv_bytes + (c.dead_kv_bytes if kept == 0 else 0)
        offset += c.units
    return {"parameters": params, "kv_cache_bytes_per_token": kv}


def speed_units(cfg, sites: list[AttentionSite], table: dict) -> int:
    """The most units that, spread evenly over the layers, the latency table predicts to run
    --target-speedup times faster than the whole model (the fit then sees to the units chosen)."""
    target = table["whole"] / cfg.target_speedup
    total = sum(s.num_heads for s in sites)
    for k in range(total, 0, -1):
        if predicted_seconds(table, sites, even_mask(sites, k)) <= target:
            return k
    raise ConfigError(f"--target-speedup {cfg.target_speedup:g}: even one head predicts "
                      f"{table['whole'] / predicted_seconds(table, sites, even_mask(sites, 1)):.2f}x on this machine "
                      "(the rest of the model takes the time)")


def _budget(cfg, model, sites: list[AttentionSite], mask: torch.Tensor, table: dict | None):
    """What the target bounds (its name, the whole model's value, the bound) and the cost of a mask."""
    if cfg.target_speedup is not None:
        def cost(m):
            return predicted_seconds(table, sites, m)
        return "seconds", table["whole"], table["whole"] / cfg.target_speedup, cost
    costs = site_costs(sites)
    fixed = fixed_params(model, costs)
    key, target = target_of(cfg, model, costs)
    added = added_bias_params(cfg, sites)  # the pruned model's cost, not the original's

    def cost(m):
        return cost_of(costs, m, fixed + added)[key]
    return key, cost_of(costs, torch.ones_like(mask), fixed)[key], target, cost


def check_reachable(cfg, model, sites: list[AttentionSite]) -> None:
    """Refuse, before any training, a --target-params or --target-kv-cache that no choice meets: `fit`
    keeps one unit at least, and a decoder layer left without units keeps a dead head, which costs no
    more than a unit; so no model it reaches costs less than the cheapest that keeps a single unit."""
    n = sum(site.num_heads for site in sites)
    key, _, target, cost = _budget(cfg, model, sites, torch.ones(n), None)
    cheapest = min(cost(torch.eye(n)[i]) for i in range(n))
    if cheapest > target:
        raise ConfigError(f"the budget ({key.replace('_', ' ')} {target:,.4g}) cannot be met: the cheapest model, "
                          f"one unit kept, costs {cheapest:,.4g} (a decoder layer without units keeps a dead head)")


def _record(cfg, key: str, original: float, target: float, predicted: float, mask: torch.Tensor) -> dict:
    if predicted > target:
        raise ConfigError(f"the budget ({key.replace('_', ' ')} {target:,.4g}) cannot be met: the fewest units "
                          f"the fit reaches cost {predicted:,.4g} (a decoder layer without units keeps a dead head)")
    record = {"target": key, "target_value": target, "original": original, "predicted": predicted,
              "units": int(mask.sum()), "allocation": allocation_in_effect(vars(cfg))}
    if key == "seconds":  # said as the user asked: a speedup
        record.update(target="speedup", target_value=cfg.target_speedup, original=1.0, predicted=original / predicted,
                      predicted_seconds=predicted, whole_seconds=original)
    return record


def fit(cfg, model, sites: list[AttentionSite], mask: torch.Tensor, scores: torch.Tensor,
        table: dict | None = None) -> tuple[torch.Tensor, dict]:
    """`mask` with its lowest-scored kept units dropped until the model, dead heads included, fits
    the budget, then the highest-scored units left out added while they still fit (so the count
    follows the cost, not k); and the budget's record (target, predicted value). `table`: the
    latency table of --target-speedup. With --allocation uniform, the most units spread evenly
    that fit instead."""
    key, original, target, cost = _budget(cfg, model, sites, mask, table)
    if allocation_in_effect(vars(cfg)) == "uniform":  # one count (per kind, with a budget per kind) shrinks until it fits
        kind_of = [s.kind for s in sites for _ in range(s.num_heads)]
        kinds = list(dict.fromkeys(s.kind for s in sites))  # every kind, one a model pruned before emptied too
        counts = ([sum(int(m) for m, k in zip(mask.tolist(), kind_of) if k == kind) for kind in kinds]
                  if cfg.k_per_kind else [int(mask.sum())])

        def spread(c):
            return uniform_mask(sites, scores, c if cfg.k_per_kind else c[0])
        mask = spread(counts)
        while cost(mask) > target:
            fewer = [counts[:j] + [c - 1] + counts[j + 1:] for j, c in enumerate(counts) if c > 0 and sum(counts) > 1]
            best = min(fewer, key=lambda c: cost(spread(c)), default=None)
            if best is None or cost(spread(best)) >= cost(mask):
                break
            counts, mask = best, spread(best)
        return mask, _record(cfg, key, original, target, cost(mask), mask)
    mask = mask.clone()
    order = [i for i in torch.argsort(scores.double(), stable=True).tolist() if mask[i] > 0]  # lowest first
    while cost(mask) > target and mask.sum() > 1:
        now = cost(mask)
        for j, i in enumerate(order):  # the lowest-ranked unit whose removal saves (a layer's last one
            trial = mask.clone()       # may not: its dead head costs as much)
            trial[i] = 0
            if cost(trial) < now:
                mask = trial
                order.pop(j)
                break
        else:
            break
    for i in torch.argsort(scores.double(), descending=True, stable=True).tolist():  # then what room is left
        if mask[i] == 0:  # (a layer's last unit saves more than one more unit elsewhere costs) goes to
            trial = mask.clone()  # the highest-ranked units left out that still fit
            trial[i] = 1
            if cost(trial) <= target:
                mask = trial
    return mask, _record(cfg, key, original, target, cost(mask), mask)


def uniform_counts(sites: list[AttentionSite], k: int | list[int]) -> list[int]:
    """Units per site when k (or, given one number per kind, each kind's) are spread as evenly as
    the layers allow: --allocation uniform."""
    counts = [0] * len(sites)
    kinds = list(dict.fromkeys(s.kind for s in sites))
    budgets = dict(zip(kinds, k)) if isinstance(k, (list, tuple)) else None
    for kind in kinds if budgets else [None]:
        chosen = [j for j, s in enumerate(sites) if budgets is None or s.kind == kind]
        for j, c in zip(chosen, even_counts([sites[j] for j in chosen], budgets[kind] if budgets else k)):
            counts[j] = c
    return counts


def uniform_allocation(cfg, sites: list[AttentionSite]) -> bool:
    """Whether a run with --k or --k-per-kind spreads it evenly over the layers: --allocation
    uniform, or the default's rule for DSP on text (every layer keeping --uniform-from or more). A run with a
    --target-* does not here: its count is known only after selection (`fit` spreads it)."""
    if targeted(vars(cfg)):
        return False
    mode = allocation_in_effect(vars(cfg))
    if mode == roomy_uniform(cfg.uniform_from):
        counts = uniform_counts(sites, cfg.k_per_kind or cfg.k)  # layers pruned empty before do not count
        return min(c for c, s in zip(counts, sites) if s.num_heads > 0) >= cfg.uniform_from
    return mode == "uniform"


def uniform_mask(sites: list[AttentionSite], scores: torch.Tensor, k: int | list[int]) -> torch.Tensor:
    """uniform_counts' units of each layer, each layer keeping its highest-scored."""
    counts = uniform_counts(sites, k)
    mask, offset, scores = torch.zeros(sum(s.num_heads for s in sites)), 0, scores.detach().cpu()
    for site, c in zip(sites, counts):
        layer = scores[offset:offset + site.num_heads].double()
        mask[offset + torch.argsort(layer, descending=True, stable=True)[:c]] = 1.0
        offset += site.num_heads
    return mask
