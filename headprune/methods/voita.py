"""Voita et al. 2019: hard-concrete gates with an L0 penalty.

One parameter `log_a` per head. Training samples a stretched, clipped concrete gate per head and
adds lambda * P(gate open), summed over heads, to the loss. Evaluation: the deterministic gate;
a head is kept when it exceeds 0.5, or, when an exact k is asked for, the k heads with the
largest `log_a` (the gate saturates at 1, `log_a` does not; ties go to the lower index).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..randomness import generator
from .dsp import Budget, as_groups, hard_top_k, noise_key, per_group

BETA = 0.33  # temperature of the concrete distribution
GAMMA, ZETA = -0.1, 1.1  # stretch limits
EPS = 1e-6


def hard_concrete_sample(log_a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The training gate for uniform noise `u` in (0, 1)."""
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_a) / BETA)
    return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def hard_concrete_eval(log_a: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(log_a) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def l0_penalty(log_a: torch.Tensor) -> torch.Tensor:
    """Expected number of open gates: sum of P(gate > 0) = sigmoid(log_a - beta * log(-gamma/zeta))."""
    p_open = torch.sigmoid(log_a - BETA * math.log(-GAMMA / ZETA))
    return torch.clamp(p_open, EPS, 1 - EPS).sum()


class HardConcreteSelector(nn.Module):
    def __init__(self, num_heads: int, k: int | None = None, l0_lambda: float = 0.0015, seed: int = 0,
                 budget: Budget | None = None, settle_step: int | None = None):
        super().__init__()
        # k=None (and no budget): keep the heads whose gate exceeds 0.5, as many as lambda leaves
        self.budget = None if k is None and budget is None else as_groups(num_heads, k, budget)
        self.k = None if self.budget is None else sum(group_k for _, group_k in self.budget)
        self.l0_lambda, self.seed, self.step, self.draw = l0_lambda, seed, 0, 0
        self.settle_step = settle_step  # from this step on, training uses the kept heads (no gradient)
        init = torch.empty(num_heads).uniform_(-0.5, 0.5, generator=generator("cpu", seed, "voita-init"))
        # U(-0.5, 0.5), as DSP's logits; the reference's Xavier init of a [1, heads, 1, 1] tensor
        # draws from +-sqrt(6 / (heads + 1)) (+-0.68 for 12 heads a layer): about half the gates open either way
        self.log_a = nn.Parameter(init)

    def set_step(self, step: int, draw: int = 0) -> None:  # no schedule; the noise follows the step (and draw)
        self.step, self.draw = step, draw

    @property
    def settled(self) -> bool:
        return self.settle_step is not None and self.step >= self.settle_step

    def forward(self) -> torch.Tensor:
        if self.training and not self.settled:
            g = generator(self.log_a.device, *noise_key(self, "hard-concrete"))
            u = torch.rand(self.log_a.shape, generator=g, device=self.log_a.device,
                           dtype=self.log_a.dtype) * (1 - 2 * EPS) + EPS
            return hard_concrete_sample(self.log_a, u)
        if self.training:  # settled: in the graph with a zero gradient, as every process reduces one
            return self.eval_mask() + (self.log_a - self.log_a.detach()) * 0.0
        return self.eval_mask()

    def eval_mask(self) -> torch.Tensor:
        if self.budget is not None:
            return per_group(hard_top_k, self.log_a.detach(), self.budget)
        return (hard_concrete_eval(self.log_a.detach()) > 0.5).to(self.log_a.dtype)

    def penalty(self) -> torch.Tensor:
        if self.settled:  # the heads are fixed: the penalty would only move the gates' ranking
            return self.log_a.sum() * 0.0
        return self.l0_lambda * l0_penalty(self.log_a)

    def scores(self) -> torch.Tensor:
        return self.log_a.detach()

    def heads_on(self) -> int:
        """How many heads the L0 penalty left open (eval gate > 0.5), whatever k is."""
        return int((hard_concrete_eval(self.log_a.detach()) > 0.5).sum())

    def log_values(self) -> dict[str, float]:
        return {"penalty": self.penalty().item(), "heads_on": self.heads_on()}
