"""How well each trained method finds planted head importances, against the number of steps.

A frozen toy "model" with 72 heads whose importances are known: head h writes w_h * u_h (u_h a
fresh random vector per example), the model's output is the sum over heads, and the loss is the
squared distance between the masked output and the full one, so that a pruned head costs about
w_h^2 and the best k heads are the k largest w_h. Each method trains its scores with headprune's
own selector, optimiser and schedules (`headprune.selection.selector_and_optimizer`) for a given
number of steps; the score is the overlap of the heads it keeps with the planted best k.

    python benchmarks/planted_heads.py                   # steady against the reference schedule
    python benchmarks/planted_heads.py --steps 32 125 --seeds 0 1 2 3 4
    python benchmarks/planted_heads.py --grid --ks 6 12 --steps 32 125 1000   # how steady was chosen
    python benchmarks/planted_heads.py --ks 6 12 --steps 32 300 \
        --settings "dsp --schedule steady" "dsp --shrink-fraction 0.5" "dsp --shrink-fraction 1"   # a shrinking budget
    python benchmarks/planted_heads.py --metric cost --ks 36 48 60 --steps 32 125 \
        --settings "dsp --schedule steady" "dsp, k rounds"      # keeping more than half: the relaxation
    python benchmarks/planted_heads.py --steps 32 125 500 --settings "dsp --schedule steady" \
        "dsp --schedule steady --pruning-lr-schedule constant"   # a constant rate for the scores (issue 25)
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from headprune.config import PruneConfig
from headprune.selection import selector_and_optimizer

NUM_HEADS, WIDTH, BATCH = 72, 16, 8


def planted_importance(seed: int) -> torch.Tensor:
    """72 importances from 1 down to 0.1 (a pruned head costs w^2), in a random order of heads."""
    g = torch.Generator().manual_seed(10_000 + seed)
    w = torch.logspace(0, -1, NUM_HEADS, dtype=torch.float64)
    return w[torch.randperm(NUM_HEADS, generator=g)]


def planted_loss(mask: torch.Tensor, w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    u = torch.randn(BATCH, NUM_HEADS, WIDTH, generator=g, dtype=torch.float64)
    missing = ((1 - mask) * w)[None, :, None] * u  # what the pruned model lacks, per head
    return missing.sum(1).pow(2).mean() * NUM_HEADS


def planted_ranks(method: str, k: int, steps: int, seed: int = 0, **options) -> list[int]:
    """The planted ranks (0 = most important) of the k heads `method` keeps after `steps` steps;
    `options`: PruneConfig fields (schedule: steady unless given, relaxation, ...)."""
    cfg = PruneConfig(method=method, k=k, seed=seed, **{"schedule": "steady", **options})
    selector, optimizer, scheduler, _ = selector_and_optimizer(cfg, NUM_HEADS, steps)
    w = planted_importance(seed)
    g = torch.Generator().manual_seed(seed)
    selector.train()
    for step in range(steps):
        selector.set_step(step)
        loss = planted_loss(selector(), w, g)
        if hasattr(selector, "penalty"):
            loss = loss + selector.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    selector.eval()
    rank = torch.argsort(torch.argsort(w, descending=True))
    return sorted(rank[selector().bool()].tolist())


def overlap(method: str, k: int, steps: int, seed: int = 0, **options) -> float:
    """Fraction of the planted best k heads among the k heads `method` keeps after `steps` steps."""
    return sum(r < k for r in planted_ranks(method, k, steps, seed, **options)) / k


def cost_ratio(method: str, k: int, steps: int, seed: int = 0, **options) -> float:
    """The planted cost of the heads `method` drops (the sum of their w^2) over that of the best
    choice (the n - k least important): 1 is the best possible."""
    cost = torch.logspace(0, -1, NUM_HEADS, dtype=torch.float64) ** 2  # by planted rank
    kept = torch.zeros(NUM_HEADS, dtype=torch.bool)
    kept[planted_ranks(method, k, steps, seed, **options)] = True
    return float(cost[~kept].sum() / cost[k:].sum())


METRICS = {"overlap": overlap, "cost": cost_ratio}
SETTINGS = {
    "dsp --schedule steady": dict(method="dsp"),
    "dsp, k rounds": dict(method="dsp", relaxation="k-rounds"),
    "dsp --schedule reference": dict(method="dsp", schedule="reference"),
    "dsp --schedule steady --pruning-lr-schedule constant": dict(method="dsp", pruning_lr_schedule="constant"),
    "dsp --schedule steady --pruning-lr-schedule select": dict(method="dsp", pruning_lr_schedule="select"),
    "dsp --shrink-fraction 0.5": dict(method="dsp", shrink_fraction=0.5),
    "dsp --shrink-fraction 1": dict(method="dsp", shrink_fraction=1.0),
    "ste": dict(method="ste"),
    "voita": dict(method="voita"),
}


def grid(ks, steps_list, seeds) -> None:
    """DSP over T0 x Tf x travel (the sum of the scores' learning rate over the run, linear decay;
    "0.5": the fixed rate of the reference), the temperature annealed over the whole run."""
    print("| T0 | Tf | travel | k | " + " | ".join(f"{s} steps" for s in steps_list) + " |")
    print("|---|---|---|---|" + "---|" * len(steps_list))
    for t0, tf, travel, k in itertools.product([1, 10, 100, 1000], [1e-1, 1e-2, 1e-3],
                                               [1, 2, 4, 8, 16, "0.5"], ks):
        cells = []
        for steps in steps_list:
            lr = 0.5 if travel == "0.5" else travel / ((steps + 1) / 2)
            values = [overlap("dsp", k, steps, seed, t0=t0, tf=tf, cooldown_fraction=1.0, pruning_lr=lr)
                      for seed in seeds]
            cells.append(f"{statistics.mean(values):.2f}")
        print(f"| {t0} | {tf} | {travel} | {k} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[32, 125, 500, 2000])
    parser.add_argument("--ks", type=int, nargs="+", default=[6, 12, 36])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS),
                        default=[name for name in SETTINGS if name != "dsp, k rounds"
                                 and "shrink" not in name and "lr-schedule" not in name])
    parser.add_argument("--metric", default="overlap", choices=list(METRICS),
                        help="overlap with the best k, or the cost of the dropped heads over the best choice's")
    parser.add_argument("--grid", action="store_true", help="DSP over T0 x Tf x travel instead")
    args = parser.parse_args()
    if args.grid:
        return grid(args.ks, args.steps, args.seeds)
    what = {"overlap": f"overlap with the planted best k heads of {NUM_HEADS}",
            "cost": "cost of the dropped heads over the best choice's"}[args.metric]
    print(f"{what}, mean (min-max) over seeds {' '.join(map(str, args.seeds))}\n")
    print("| setting | k | " + " | ".join(f"{s} steps" for s in args.steps) + " |")
    print("|---|---|" + "---|" * len(args.steps))
    for name in args.settings:
        for k in args.ks:
            cells = []
            for steps in args.steps:
                values = [METRICS[args.metric](k=k, steps=steps, seed=seed, **SETTINGS[name]) for seed in args.seeds]
                cells.append(f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})")
            print(f"| {name} | {k} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
