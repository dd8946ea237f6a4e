"""LLM-Pruner (Ma et al. 2023): first-order Taylor importance of a coupled group of weights, the
estimated change in the loss if the group were zeroed.

A head's (or KV group's) group is every weight that goes with it: its rows of the query, key and
value projections (and their biases) and its columns of the output projection; a query unit of
grouped-query attention owns query rows and output columns only (the key/value heads stay). With
G the gradient of the calibration loss, the mean over its sequences (each batch's mean loss
weighted by its number of sequences, so that a short last batch counts no more than its share):
  element (LLM-Pruner's code default, `param_first`): sum over the group of |w * G|
  vector: |sum over the group of w * G| (the paper's vector-wise importance, over the whole group)
ranked globally, with no per-layer normalisation, as the issue asks. (The reference code takes the
vector-wise absolute value per layer and channel before summing; see docs/usage.md.)
"""

from __future__ import annotations

import logging

import torch

from ..sites import input_columns, output_rows
from .scoring import Scores

log = logging.getLogger("headprune")

VARIANTS = ("element", "vector")


def group_weights(site, unit: int) -> list[tuple[torch.nn.Parameter, tuple]]:
    """(parameter, index) pairs: the slices of the site's weights that belong to `unit` (rows of
    one fused projection where queries, keys and values share one)."""
    queries = site.query_heads_of([unit])
    keys = [] if site.unit == "query" else site.kv_heads_of([unit])
    parts = []
    projections = [(getattr(site, which), which, False) for which in ("query", "key", "value")] + \
        [(linear, which, True) for linear, which in site.extra]  # DeBERTa's relative-position projections
    for linear, which, extra in projections:
        heads = queries if which == "query" else keys
        if heads:
            rows = site.own_rows(heads) if extra else site.rows(which, heads)
            parts.append((linear.weight, output_rows(linear, rows)))
            if linear.bias is not None:
                parts.append((linear.bias, (rows,)))
    for owner, name, which in site.extra_biases:  # DeBERTa v1's query and value biases
        heads = queries if which == "query" else keys
        if heads:
            parts.append((getattr(owner, name), (site.own_rows(heads),)))
    parts.append((site.output.weight, input_columns(site.output, site.own_rows(queries))))
    return parts


RECORD_MAX_BYTES = 1 << 30  # a pass keeps a record of its gradients (see below) up to this size


def taylor_scores(model, gates, batches, loss_fn, variant: str = "element", reduce=None, record=None) -> torch.Tensor:
    """One score per gate; `reduce` sums the gradients over processes. `record` (scoring.PassRecord)
    keeps the gradients summed so far, so that a pass stopped midway goes on from them: every
    attention weight's gradient in float32 (SmolLM2-135M: 106 MB), so not where that is over
    RECORD_MAX_BYTES (a 7B model's: 8.6 GB a minute)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    params = list({id(p): p for site in gates.sites
                   for linear in (site.query, site.key, site.value, site.output, *[p for p, _ in site.extra])
                   for p in (linear.weight, linear.bias) if p is not None}.values())
    params += [getattr(owner, name) for site in gates.sites for owner, name, _ in site.extra_biases]
    was = [p.requires_grad for p in params]
    # half-precision weights' gradients are summed in float32: rounded to 8 bits at every batch,
    # a sum over a hundred batches would lose the small differences between heads
    half = [p for p in params if p.dtype in (torch.bfloat16, torch.float16)]
    sums, sequences = {}, torch.zeros((), dtype=torch.float64, device=params[0].device)
    if record is not None and 4 * sum(p.numel() for p in params) > RECORD_MAX_BYTES:
        log.info("taylor: the pass keeps no record of its gradients (%.1f GB of them): stopped, it starts over",
                 4 * sum(p.numel() for p in params) / 1e9)
        record = None
    skip, kept = (record.read() if record is not None else None) or (0, {})
    shapes = {f"grad.{i}": p.shape for i, p in enumerate(params)}
    if any(name != "sequences" and shapes.get(name) != t.shape for name, t in kept.items()):
        skip, kept = 0, {}  # not this pass's gradients: it starts over
    model.eval()
    try:
        for i, p in enumerate(params):
            p.requires_grad_(True)
            p.grad = None
            if f"grad.{i}" in kept:  # summed before the pass was stopped
                grad = kept[f"grad.{i}"].to(p.device)
                if p.dtype in (torch.bfloat16, torch.float16):
                    sums[id(p)] = grad.float()
                else:
                    p.grad = grad.to(p.dtype)
        if "sequences" in kept:
            sequences += kept["sequences"].to(sequences)

        def state():  # what the record keeps: the gradients summed so far, and over how many sequences
            grads = {f"grad.{i}": sums.get(id(p), p.grad) for i, p in enumerate(params)}
            return {**{name: g for name, g in grads.items() if g is not None}, "sequences": sequences}
        for done, batch in enumerate(batches, start=1):
            if done <= skip:  # its gradient came before the pass was stopped
                continue
            size = len(next(iter(batch.values())))  # sequences (or images) in the batch
            (loss_fn(model, batch) * size).backward()
            sequences += size
            for p in half:
                if p.grad is not None:
                    if id(p) in sums:
                        sums[id(p)].add_(p.grad)
                    else:
                        sums[id(p)] = p.grad.float()
                    p.grad = None
            if record is not None:
                record.save(done, state)
        grads = {}
        for p in params:  # a weight the loss does not reach (none of its outputs used) has no gradient
            grad = sums.get(id(p), p.grad)
            grad = grad if grad is not None else torch.zeros_like(p)
            grads[id(p)] = reduce(grad).to(p.device) if reduce is not None else grad
        scores = []
        for site in gates.sites:
            for unit in range(site.num_heads):
                # w * dL/dw in float64 on the group's slices only: a float64 copy of every weight at
                # once would need four times a half-precision model's attention weights
                products = [p.detach()[index].double() * grads[id(p)][index].double()
                            for p, index in group_weights(site, unit)]
                scores.append(sum(x.abs().sum() for x in products) if variant == "element"
                              else sum(x.sum() for x in products).abs())
        sequences = reduce(sequences) if reduce is not None else sequences
        # the sums' gradient over the sequences: that of the mean loss
        scores = (torch.stack(scores) / sequences.clamp(min=1)).cpu()  # one wait for the device, not one per unit
        if record is not None:
            record.done()
    finally:
        for p, flag in zip(params, was):
            p.grad = None
            p.requires_grad_(flag)
    return scores


def score(run, mask: torch.Tensor):
    """The scorer of the driver (`headprune.selection`)."""
    return Scores(run.cached(lambda: taylor_scores(run.model, run.gates, run.progress("taylor scores"), run.loss_fn,
                                                   run.cfg.taylor_variant, run.reduce, run.record())))
