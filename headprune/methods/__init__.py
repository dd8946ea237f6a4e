"""Pruning methods.

Trained methods are *selectors*: nn.Modules whose forward returns one mask value per head
(training: a relaxed or sampled mask; eval: the hard mask), which the gates call once per model
forward. They also give `scores()` (what ranks the heads), `set_step(step)` and `log_values()`;
a selector with a `penalty()` has it added to the loss. Michel et al. and random heads need no
training and are plain functions. A new trained method plugs in here: write the selector and add
it to `make_selector`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import METHODS
from .dsp import Budget, DSPSelector, geometric_temperature, hard_top_k, per_group, soft_top_k
from .michel import head_importance, iterative_pruning, normalize_importance
from .voita import HardConcreteSelector, hard_concrete_eval, hard_concrete_sample, l0_penalty

TRAINED = ("dsp", "ste", "voita")
DEFAULT_PRUNING_LR = {"dsp": 0.5, "ste": 0.5, "voita": 0.1}  # the reference's BERT values


def make_selector(method: str, num_heads: int, k: int | None, *, t0: float = 1000.0, tf: float = 1e-8,
                  cooldown_steps: int = 1000, l0_lambda: float = 0.0015, seed: int = 0,
                  budget: Budget | None = None) -> nn.Module:
    """The selector of a trained method; for voita, k=None keeps the heads whose gate is above 0.5.
    `budget`, instead of k: exactly k_g heads in each group g (e.g. per kind of attention).
    Its initial scores and its noise at every step follow from `seed` alone."""
    if method == "dsp":
        return DSPSelector(num_heads, k, t0, tf, cooldown_steps, seed=seed, budget=budget)
    if method == "ste":
        return DSPSelector(num_heads, k, straight_through=True, seed=seed, budget=budget)
    if method == "voita":
        return HardConcreteSelector(num_heads, k, l0_lambda, seed=seed, budget=budget)
    raise ValueError(f"unknown trained pruning method {method!r}; choose from {', '.join(TRAINED)}")


def random_mask(num_heads: int, k: int, seed: int, budget: Budget | None = None) -> torch.Tensor:
    """k heads (or k_g of each group) drawn uniformly at random, reproducibly from the seed."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(num_heads)
    for indices, group_k in budget or [(list(range(num_heads)), k)]:
        keep = torch.randperm(len(indices), generator=g)[:group_k]
        mask[torch.tensor(indices)[keep]] = 1.0
    return mask


__all__ = ["Budget", "DEFAULT_PRUNING_LR", "DSPSelector", "per_group", "HardConcreteSelector", "METHODS", "TRAINED",
           "geometric_temperature", "hard_concrete_eval", "hard_concrete_sample", "hard_top_k",
           "head_importance", "iterative_pruning", "l0_penalty", "make_selector", "normalize_importance",
           "random_mask", "soft_top_k"]
