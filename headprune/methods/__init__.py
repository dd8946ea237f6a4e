"""Pruning methods. Each is a *selector*: an nn.Module whose forward returns one mask value per
head (training: a relaxed or sampled mask; eval: the hard mask), and which the gates call once per
model forward. A new method plugs in here: write the selector, add it to `make_selector`."""

from __future__ import annotations

from torch import nn

from .dsp import DSPSelector, geometric_temperature, hard_top_k, soft_top_k

METHODS = ("dsp", "ste")


def make_selector(method: str, num_heads: int, k: int, *, t0: float, tf: float,
                  cooldown_steps: int) -> nn.Module:
    if method == "dsp":
        return DSPSelector(num_heads, k, t0, tf, cooldown_steps)
    if method == "ste":
        return DSPSelector(num_heads, k, straight_through=True)
    raise ValueError(f"unknown pruning method {method!r}; choose from {', '.join(METHODS)}")


__all__ = ["DSPSelector", "METHODS", "geometric_temperature", "hard_top_k", "make_selector", "soft_top_k"]
