"""Pruning methods.

Trained methods (dsp, ste, voita) are *selectors*: nn.Modules whose forward returns one mask
value per head (training: a relaxed or sampled mask; eval: the hard mask), which the gates call once
per model forward. They also give `scores()` (what ranks the heads), `set_step(step)` and
`log_values()`; a selector with a `penalty()` has it added to the loss. Scored methods (michel,
fisher, activation, flap, taylor) are a `score(run, mask)` function each, driven by
`selection.choose_by_scores`; random heads are `random_mask`. Where a new method plugs in (a file
here; its name in `config`; a trained one also in `make_selector` below): docs/architecture.md,
"Where things plug in".
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import (SHRINKING, TEMPERATURES, TRAINED_METHODS, schedule_in_effect,
                      settle_fraction_in_effect, shrink_fraction_in_effect)
from .dsp import Budget, DSPSelector, geometric_temperature, hard_top_k, per_group, soft_top_k
from .michel import head_importance, iterative_pruning, normalize_importance
from .voita import HardConcreteSelector, hard_concrete_eval, hard_concrete_sample, l0_penalty

REFERENCE_PRUNING_LR = {"dsp": 0.5, "ste": 0.5, "voita": 0.1}  # the reference's BERT values
# How far (in total over the run) Adam may move a score by default. Adam moves each score by about
# its learning rate per step whatever the gradient's size, so a fixed rate makes a 1,000-step run
# move the scores 30 times further than a 32-step one: they saturate early and stop exploring, or,
# in a short run, barely leave their initial spread (+-0.5). Measured on planted importances
# (benchmarks/planted_heads.py --grid), a travel of 4 was best or level from 32 to 1,000 steps.
SCORE_TRAVEL = 4.0
SELECT_RATE = 0.5  # --pruning-lr-schedule select: the scores' rate once the temperature is below 1


def make_selector(method: str, num_heads: int, k: int | None, *, t0: float = 1000.0, tf: float = 1e-2,
                  cooldown_steps: int = 1000, l0_lambda: float = 0.0015, seed: int = 0,
                  budget: Budget | None = None, settle_step: int | None = None, shrink_steps: int = 0,
                  k_rounds: bool = False) -> nn.Module:
    """The selector of a trained method; for voita, k=None keeps the heads whose gate is above 0.5.
    `budget`, instead of k: exactly k_g heads in each group g (e.g. per kind of attention).
    From `settle_step` on, training uses the evaluation mask (the heads kept), with no gradient.
    dsp, ste: the training budget falls from every head to k over the first `shrink_steps`.
    dsp with `k_rounds`: the reference's relaxation (k rounds of softmax, however large k).
    Its initial scores and its noise at every step follow from `seed` alone."""
    if method == "dsp":
        return DSPSelector(num_heads, k, t0, tf, cooldown_steps, seed=seed, budget=budget,
                           settle_step=settle_step, shrink_steps=shrink_steps, k_rounds=k_rounds)
    if method == "ste":
        return DSPSelector(num_heads, k, straight_through=True, seed=seed, budget=budget,
                           settle_step=settle_step, shrink_steps=shrink_steps)
    if method == "voita":
        return HardConcreteSelector(num_heads, k, l0_lambda, seed=seed, budget=budget, settle_step=settle_step)
    raise ValueError(f"unknown trained pruning method {method!r}; choose from {', '.join(TRAINED_METHODS)}")


def resolve_schedule(cfg, steps: int) -> dict:
    """The temperatures (dsp), the scores' learning rate and the step where the kept heads are fixed
    (`learn_steps`: the scores learn before it) of a run of `steps` steps: --schedule's preset,
    overridden by whatever the user gave explicitly (--t0, --tf, --cooldown-*, --pruning-lr,
    --settle-fraction, --shrink-fraction); `shrink_steps`: dsp and ste, the steps over which the
    budget of the training masks falls from every head to k."""
    name = schedule_in_effect(vars(cfg))
    preset = TEMPERATURES[name]
    settle = settle_fraction_in_effect(vars(cfg))
    learn_steps = max(1, steps - round(settle * steps))
    t0 = cfg.t0 if cfg.t0 is not None else preset["t0"]
    tf = cfg.tf if cfg.tf is not None else preset["tf"]
    fraction = cfg.cooldown_fraction if cfg.cooldown_fraction is not None else preset["cooldown_fraction"]
    cooldown = cfg.cooldown_steps or max(1, round(fraction * learn_steps))
    # the first step at which the temperature is below 1 (where the soft top-k tells subsets apart)
    select_step = (min(learn_steps, max(1, math.ceil(cooldown * math.log(t0) / math.log(t0 / tf))))
                   if t0 > 1 > tf else learn_steps)
    if cfg.pruning_lr is not None:
        lr = cfg.pruning_lr
    elif name == "reference":
        lr = REFERENCE_PRUNING_LR[cfg.method]
    elif cfg.pruning_lr_schedule == "select":  # SCORE_TRAVEL while T >= 1, then SELECT_RATE
        lr = SCORE_TRAVEL / max(1.0, (select_step + 1) / 2)
    else:  # the peak rate whose sum over the steps that learn (after the decay) is SCORE_TRAVEL
        factors = (learn_steps + 1) / 2 if cfg.pruning_lr_schedule == "linear" else learn_steps
        lr = SCORE_TRAVEL / max(1.0, factors)
    shrink = round(shrink_fraction_in_effect(vars(cfg)) * learn_steps) if cfg.method in SHRINKING else 0
    return {"name": name, "t0": t0, "tf": tf, "cooldown_steps": cooldown, "pruning_lr": lr, "learn_steps": learn_steps,
            "select_step": select_step, "select_factor": SELECT_RATE / lr if lr > 0 else 0.0,
            "shrink_steps": shrink}


def random_mask(num_heads: int, k: int, seed: int, budget: Budget | None = None) -> torch.Tensor:
    """k heads (or k_g of each group) drawn uniformly at random, reproducibly from the seed."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(num_heads)
    for indices, group_k in budget or [(list(range(num_heads)), k)]:
        keep = torch.randperm(len(indices), generator=g)[:group_k]
        mask[torch.tensor(indices, dtype=torch.long)[keep]] = 1.0  # (a kind emptied before: no indices)
    return mask


__all__ = ["Budget", "REFERENCE_PRUNING_LR", "SCORE_TRAVEL", "TEMPERATURES", "DSPSelector", "per_group", "HardConcreteSelector",
           "geometric_temperature", "hard_concrete_eval", "hard_concrete_sample", "hard_top_k",
           "head_importance", "iterative_pruning", "l0_penalty", "make_selector", "normalize_importance",
           "random_mask", "resolve_schedule", "soft_top_k"]
