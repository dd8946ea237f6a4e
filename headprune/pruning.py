"""Turning a hard head mask into weights.

`zero_pruned_heads` writes the mask into the model: a pruned head's columns of the output
projection become zero, which gives exactly the masked model's outputs (its context is multiplied
by 0 before that projection) in a plain model that any transformers user can load.
"""

from __future__ import annotations

import torch

from .sites import AttentionSite


@torch.no_grad()
def zero_pruned_heads(sites: list[AttentionSite], mask: torch.Tensor) -> None:
    offset = 0
    for site in sites:
        d = site.head_dim
        for head in range(site.num_heads):
            if mask[offset + head] == 0:
                site.output.weight[:, head * d:(head + 1) * d] = 0
        offset += site.num_heads
