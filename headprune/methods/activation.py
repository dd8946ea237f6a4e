"""Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"): a head's importance is the size of its attention output on calibration data, from
forward passes only.

As NVIDIA Model-Optimizer computes it (mcore_minitron, the hook on the output projection's input):
for each input channel c of the output projection, the mean of |x_c| over a sequence's tokens
(padding left out), aggregated over the sequences by `aggregation`; a head's (or KV group's) score
is the L2 norm of its channels' values. Aggregations over the batch, as the paper compares them:
l2 (the square root of the sum of squares: the paper's choice and the default), mean, var (the
variance over sequences).
"""

from __future__ import annotations

import torch

from .scoring import Scores, channel_moments, per_unit

AGGREGATIONS = ("l2", "mean", "var")


def activation_scores(model, gates, batches, loss_fn, aggregation: str = "l2", reduce=None, record=None) -> torch.Tensor:
    """One score per gate; `loss_fn(model, batch)` runs the forward pass; `reduce` sums over processes;
    `record`: see `channel_moments`."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")

    def sequence_means(x, tokens):  # the mean |x| over each sequence's real tokens
        if tokens is None:
            return x.abs().mean(1)
        t = tokens[..., None].double()
        return ((x.abs() * t).sum(1) / t.sum(1).clamp(min=1))[tokens.any(1)]

    channel = []
    for n, s, q in channel_moments(model, gates, batches, loss_fn, sequence_means, reduce, record):
        channel.append(q.sqrt() if aggregation == "l2" else s / n if aggregation == "mean"
                       else (q / n - (s / n).pow(2)).clamp(min=0))
    return per_unit(gates, channel, lambda values: torch.linalg.vector_norm(values))


def score(run, mask: torch.Tensor):
    """The scorer of the driver (`headprune.selection`)."""
    return Scores(run.cached(lambda: activation_scores(run.model, run.gates, run.progress("activation scores"),
                                                       run.loss_fn, run.cfg.activation_aggregation, run.reduce,
                                                       run.record())))
