"""Differentiable Subset Pruning (Li, Cotterell, Sachan, TACL 2021) and its straight-through variant.

One logit per head. Training: a Gumbel soft top-k of the logits (the iterative softmax of Xie and
Ermon 2019) whose temperature is annealed geometrically, so the mask moves from uniform towards a
hard choice of exactly k heads. Evaluation and export: the hard top-k of the logits, no noise.
The STE variant uses the hard top-k forward and passes the gradient straight to the logits.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..randomness import generator


Budget = list[tuple[list[int], int]]  # (indices of a group of heads, heads to keep in that group)


def per_group(top_k, scores: torch.Tensor, budget: Budget, *args) -> torch.Tensor:
    """`top_k(scores, k, *args)` applied to each group of heads on its own, as one mask over all
    heads (out-of-place, so autograd stays clean): an exact budget per group, e.g. per kind."""
    mask = scores.new_zeros(scores.shape)
    for indices, k in budget:
        index = _index(tuple(indices), scores.device)
        if k > 0:
            mask = mask.index_copy(0, index, top_k(scores[index], k, *args))
    return mask


@functools.lru_cache(maxsize=4096)
def _index(indices: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A group's indices as a tensor on `device`, made once (a copy to a GPU a group and a step waits for it)."""
    return torch.tensor(indices, device=device)


def as_groups(num_heads: int, k: int, budget: Budget | None) -> Budget:
    """The budget as (head indices, k) groups, checked: one group of all heads with k, or the groups given."""
    if budget is None:
        if not 1 <= k <= num_heads:
            raise ValueError(f"k={k} must be between 1 and the model's {num_heads} heads")
        return [(list(range(num_heads)), k)]
    for indices, group_k in budget:
        if not 0 <= group_k <= len(indices):
            raise ValueError(f"a budget of {group_k} heads in a group of {len(indices)}")
    if sum(group_k for _, group_k in budget) < 1:
        raise ValueError("the budget keeps no head at all")
    return [(list(indices), group_k) for indices, group_k in budget]


def hard_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A 0/1 mask with exactly k ones on the largest scores; ties go to the lower index."""
    order = torch.argsort(scores, descending=True, stable=True)
    mask = torch.zeros_like(scores)
    mask[order[:k]] = 1.0
    return mask


def soft_top_k(scores: torch.Tensor, k: int, temperature: float, fewest_rounds: bool = True) -> torch.Tensor:
    """Relaxed top-k: k rounds of softmax, each discounting what earlier rounds took.

    The result sums to k; it tends to hard_top_k(scores, k) as the temperature falls. Built by
    collecting the rounds (no in-place updates) so that autograd is clean. Keeping k of n is
    dropping n - k: when that is fewer rounds, the mask is one minus the relaxed choice of the
    n - k lowest. The same hard mask, but each round spreads some mass over near-ties: keeping 60
    of 72 planted heads (benchmarks/planted_heads.py) cost 1.8x and 1.6x the best choice's loss
    after 32 and 125 steps with 60 rounds, 1.24x and 1.01x with 12. The reference always runs k
    rounds (`fewest_rounds=False`).
    """
    n = scores.shape[-1]
    if fewest_rounds and 2 * k > n:
        return 1.0 - _soft_top_k_rounds(-scores, n - k, temperature)
    return _soft_top_k_rounds(scores, k, temperature)


def _soft_top_k_rounds(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    tiny = torch.finfo(scores.dtype).tiny
    rounds = []
    r = scores
    for _ in range(k):
        p = torch.softmax(r / temperature, dim=-1)
        rounds.append(p)
        r = r + torch.log(torch.clamp(1.0 - p, min=tiny))
    return torch.stack(rounds).sum(0) if rounds else scores * 0.0  # no rounds: zero, still in the graph


def geometric_temperature(step: int, t0: float, tf: float, cooldown_steps: int) -> float:
    """T0 at step 0, Tf at step `cooldown_steps` and after, geometric in between."""
    if step >= cooldown_steps:
        return tf
    return t0 * (tf / t0) ** (step / cooldown_steps)


def sample_gumbel(like: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    u = torch.rand(like.shape, generator=gen, device=like.device, dtype=like.dtype)
    tiny = torch.finfo(like.dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-12)))


def noise_key(selector, name: str) -> tuple:
    """What seeds a selector's noise: its seed and step, and the micro-batch after a step's first
    (a step's first draw is the one it had before micro-batches were told apart)."""
    return (selector.seed, name, selector.step, *([selector.draw] if selector.draw else []))


class DSPSelector(nn.Module):
    """Chooses exactly k of `num_heads` heads from learned logits.

    The trainer calls `set_step` before each training forward; the temperature and the Gumbel
    noise follow from it (the noise from a generator seeded by (seed, step), and the micro-batch
    `draw` of a step that accumulates gradients), so a resumed run continues exactly where it
    stopped and nothing else in the process changes the draws.
    """

    def __init__(self, num_heads: int, k: int | None, t0: float = 1000.0, tf: float = 1e-2,
                 cooldown_steps: int = 1000, straight_through: bool = False, seed: int = 0,
                 budget: Budget | None = None, settle_step: int | None = None, shrink_steps: int = 0,
                 k_rounds: bool = False):
        super().__init__()
        self.budget = as_groups(num_heads, k, budget)  # exactly k overall, or k per group
        self.k = sum(group_k for _, group_k in self.budget)
        self.t0, self.tf, self.cooldown_steps = t0, tf, max(1, cooldown_steps)
        self.straight_through = straight_through
        self.seed = seed
        self.settle_step = settle_step  # from this step on, training uses the kept heads (no gradient)
        self.shrink_steps = shrink_steps  # the training budget falls from every head to k over these steps
        self.k_rounds = k_rounds  # the reference's relaxation: k rounds of softmax even when n - k are fewer
        # float64 as in the reference: the soft top-k at temperatures near 1e-8 needs the range.
        init = torch.empty(num_heads, dtype=torch.float64).uniform_(
            -0.5, 0.5, generator=generator("cpu", seed, "dsp-init"))
        self.logits = nn.Parameter(init)
        self.step, self.draw = 0, 0
        self._last: torch.Tensor | None = None  # the last training mask, for the log
        self._hard: torch.Tensor | None = None  # the hard top-k of the same noisy scores
        self._kept: torch.Tensor | None = None  # the hard top-k of the scores: what eval keeps

    def set_step(self, step: int, draw: int = 0) -> None:
        """`draw`: the micro-batch of an optimizer step that accumulates gradients (each its own noise)."""
        self.step, self.draw = step, draw

    @property
    def temperature(self) -> float:
        return geometric_temperature(self.step, self.t0, self.tf, self.cooldown_steps)

    def budget_now(self) -> Budget:
        """The budget of this training step: while shrinking, from every head of a group down to its k
        in equal steps (the scores first learn near the whole model, as Michel's importance does,
        rather than among sampled subsets of k heads); k from then on."""
        if self.step >= self.shrink_steps:
            return self.budget
        done = self.step / self.shrink_steps
        return [(indices, round(len(indices) - (len(indices) - k) * done)) for indices, k in self.budget]

    @property
    def settled(self) -> bool:
        return self.settle_step is not None and self.step >= self.settle_step

    def forward(self) -> torch.Tensor:
        kept = per_group(hard_top_k, self.logits.detach(), self.budget)
        if not self.training:
            return kept
        if self.settled:  # in the graph with a zero gradient: every process still reduces one
            self._last = self._hard = kept
            return kept + (self.logits - self.logits.detach()) * 0.0
        budget = self.budget_now()
        if budget is not self.budget:  # shrinking: the hard top-k of this step's budget
            kept = per_group(hard_top_k, self.logits.detach(), budget)
        if self.straight_through:
            mask = kept + self.logits - self.logits.detach()  # forward hard, backward identity
        else:
            noise = sample_gumbel(self.logits, generator(self.logits.device, *noise_key(self, "gumbel")))
            relaxed = functools.partial(soft_top_k, fewest_rounds=not self.k_rounds)
            mask = per_group(relaxed, self.logits + noise, budget, self.temperature)
            self._hard = per_group(hard_top_k, (self.logits + noise).detach(), budget)
        self._last = mask.detach()
        self._kept = kept
        return mask

    def scores(self) -> torch.Tensor:
        """What ranks the heads: the logits."""
        return self.logits.detach()

    def log_values(self) -> dict[str, float]:
        """For the training log: the temperature, how many heads the last mask had above 0.5, and
        (DSP) how far it was from the hard top-k of the same noisy scores: half the L1 distance,
        the heads' worth of mask that the relaxation still spreads; near 0 the soft top-k is hard
        and passes almost no gradient to the logits; and `noise_gap`, how many of the heads that
        noisy top-k chose the noise-free one (what the run keeps) would not: the weights of a joint
        run learn with those subsets."""
        values = {} if self.straight_through else {"temperature": self.temperature}
        if self.shrink_steps:
            values["budget"] = sum(k for _, k in self.budget_now())
        if self._last is not None:
            values["heads_on"] = int((self._last > 0.5).sum())
            if not self.straight_through:
                values["mask_gap"] = float((self._last - self._hard).abs().sum() / 2)
                if not self.settled:
                    values["noise_gap"] = int((self._hard * (1 - self._kept)).sum())
        return values
