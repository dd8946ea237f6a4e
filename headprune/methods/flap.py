"""FLAP (An et al., AAAI 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language
Models"): a channel of the output projection's input matters if it fluctuates across tokens and
its weight column is large; scores are standardised per layer so that layers compare.

As CASIA-IVA-Lab/FLAP computes it (lib/prune.py, metric WIFV, structure AL-AM): for each input
channel c of the output projection, over every calibration token (padding left out), the variance
of x_c times the squared norm of the weight column W[:, c]; each attention block's (layer's)
channel scores standardised (minus their mean, over their standard deviation); a head's (or KV
group's) score the mean over its channels. The reference code squares the attention scores once
more before standardising; the paper does not, nor does headprune. The channels' means (the first
of `flap_statistics`' results) are what the bias compensation adds back for the heads removed: the
scorer hands them on (`run.means`), so that `--reconstruct bias` makes no pass of its own.
"""

from __future__ import annotations

import torch

from ..sites import weight_out_in
from .scoring import Scores, channel_moments, per_unit


def flap_statistics(model, gates, batches, loss_fn, reduce=None, record=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per site: the mean and the (unbiased) variance of each input channel of its output
    projection over every real token of `batches` (`record`: see `channel_moments`)."""
    def real_tokens(x, tokens):
        return x.flatten(0, 1) if tokens is None else x[tokens]

    means, variances = [], []
    for n, s, q in channel_moments(model, gates, batches, loss_fn, real_tokens, reduce, record):
        mean = s / n
        means.append(mean)
        variances.append(((q - n * mean.pow(2)) / max(n - 1, 1.0)).clamp(min=0))
    return means, variances


def flap_scores(gates, variances: list[torch.Tensor]) -> torch.Tensor:
    """One score per gate from the channels' variances (see the module's docstring)."""
    standardised = []
    for site, var in zip(gates.sites, variances):
        weight = weight_out_in(site.output).detach().double().cpu()
        fluctuation = var * weight.pow(2).sum(0)  # times the squared norm of each input channel's column
        std = fluctuation.std()
        standardised.append((fluctuation - fluctuation.mean()) / std if std > 0 else torch.zeros_like(fluctuation))
    return per_unit(gates, standardised, torch.mean)


def score(run, mask: torch.Tensor):
    """The scorer of the driver (`headprune.selection`)."""
    def compute():
        run.means, variances = flap_statistics(run.model, run.gates, run.progress("flap scores"), run.loss_fn,
                                               run.reduce, run.record())
        return flap_scores(run.gates, variances)
    return Scores(run.cached(compute))
