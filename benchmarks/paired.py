"""Is one method ahead of another by more than the test split's noise? A paired comparison.

Each side is one or more finished pipelined classification runs (a method's seeds; a Michel curve
is read at --k). For every test example, each side scores the fraction of its runs that classify
it right; the difference of the two sides' accuracies is the mean of the per-example differences,
its standard error is theirs over the examples (paired: both sides see the same examples, so what
both get right or wrong cancels), and the 95% interval comes from resampling the examples
(bootstrap). A run whose saved model holds a reconstruction (DSP's default bias, FLAP's) is
measured on that model, as its own test accuracy was (a Michel curve's at its last k only; its other
k are its heads without one, as its curve measured them).

    python benchmarks/paired.py --a runs/results/rt-mean-uniform/dsp-pipelined-k24-s{0,1,2} \\
        --b runs/s20/today-rt-michel/michel-pipelined-s0 --k 24

More examples than the test split holds: `--split test unseen-train --unseen-from 4000` adds the
training examples after the first 4,000, where neither the fine-tuning of the model nor any run
(its scores, its calibration) used more than the first 4,000 (checked from their results.json).
`--resample-runs`: the interval also resamples each side's runs (seeds), not only the examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from loss_and_accuracy import (kept_sets, logits_and_labels, pipelined_run,  # a run's settings, heads and model
                               saved_model_if_reconstructed, frozen_model)
from torch.utils.data import DataLoader, Subset

UNSEEN = "unseen-train"  # the training examples after the first --unseen-from, which nothing learned from


def check_unseen(folder: str, results: dict, model: str, first: int | None) -> None:
    """That neither the run (its training and calibration data) nor the fine-tuning of its model used
    more than the first `first` training examples."""
    if first is None:
        raise SystemExit(f"paired: error: --split {UNSEEN} needs --unseen-from N (the training examples used)")
    tuned = Path(model).parent / "results.json"
    if not tuned.is_file():
        raise SystemExit(f"paired: error: {folder}: no results.json beside its model {model} says how many training "
                         f"examples fine-tuned it; --split {UNSEEN} cannot tell they are unseen")
    tuning = json.loads(tuned.read_text())
    if tuning.get("dataset") != results.get("dataset"):
        raise SystemExit(f"paired: error: {folder}: its model was fine-tuned on {tuning.get('dataset')}, not on "
                         f"{results.get('dataset')}: --split {UNSEEN} cannot tell its examples are unseen")
    used = {"its scores": results.get("train_examples"), "its calibration": results.get("calibration_examples") or 0,
            f"the fine-tuning of {model}": tuning.get("train_examples")}  # (no calibration: 0)
    for what, n in used.items():
        if n is None or n > first:
            raise SystemExit(f"paired: error: {folder}: {what} used {n} training examples, "
                             f"not at most the first {first}")


def loaders(cfg, splits: list[str], batch_size: int, first: int | None, folder: str):
    """The gated fine-tuned model of a run's settings and a loader for each of `splits` (the whole
    training split read where the unseen examples are asked for)."""
    whole = dataclasses.replace(cfg, max_train_examples=None) if UNSEEN in splits else cfg
    _, model, gates, train, evals, collate = frozen_model(whole)
    batches = []
    for split in splits:
        if split == UNSEEN:
            if len(train) <= first:
                raise SystemExit(f"paired: error: {cfg.dataset} has {len(train)} training examples: none after {first}")
            data = Subset(train, range(first, len(train)))
        elif split in evals:
            data = evals[split]
        else:
            raise SystemExit(f"paired: error: {folder} has no {split} split (it has {', '.join(evals)}, or {UNSEEN})")
        batches.append(DataLoader(data, batch_size=batch_size, collate_fn=collate))
    return model, gates, batches


def correct(folders: list[str], k: int | None, splits: list[str], batch_size: int, prepared: dict,
            first: int | None = None) -> torch.Tensor:
    """Per run of `folders` (rows) and example of `splits` (columns, one split after the other):
    1 where the run classifies the example right, else 0."""
    rows = []
    for folder in folders:
        results, cfg = pipelined_run(folder)
        at = k if k is not None else results["k"]
        kept = kept_sets(results, [at]).get(at)
        if kept is None or len(kept) != at:
            raise SystemExit(f"paired: error: {folder} kept {results['k']} heads and has no curve through k={at}")
        key = (cfg.model, cfg.dataset, cfg.max_length, cfg.eval_files and tuple(cfg.eval_files))
        if key not in prepared:
            prepared[key] = loaders(cfg, splits, batch_size, first, folder)
        model, gates, batches = prepared[key]
        saved = saved_model_if_reconstructed(folder, results, at)  # a curve's other k: its heads, no bias
        right = []
        with gates.override(torch.tensor([float(h in kept) for h in gates.heads])):
            for split_batches in batches:
                logits, labels = logits_and_labels(saved if saved is not None else model, split_batches)
                right.append((logits.argmax(-1) == labels).double())
        rows.append(torch.cat(right))
    return torch.stack(rows)


def paired_difference(a: torch.Tensor, b: torch.Tensor, resamples: int = 10_000, seed: int = 0,
                      resample_runs: bool = False) -> dict:
    """a - b in accuracy, its standard error over the examples and a 95% bootstrap interval. `a`,
    `b`: per run (rows) and example (columns), 1 where the run is right (a vector: one run, or the
    fraction of a side's runs right). Each resample draws the examples with replacement; with
    `resample_runs` also each side's runs (their own generator: the examples drawn stay the same),
    so that the interval holds the seed-to-seed spread as well as the examples'."""
    a, b = (x if x.dim() == 2 else x[None] for x in (a, b))
    d = a.mean(0) - b.mean(0)
    n = len(d)
    examples, runs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    means, chunk = [], 1000 if resample_runs else resamples  # (one draw of them all: the intervals of results.md)
    for start in range(0, resamples, chunk):  # a chunk's resamples x examples indices at a time
        r = min(chunk, resamples - start)
        index = torch.randint(n, (r, n), generator=examples)
        if resample_runs:  # each resample's weight of every run: how often it was drawn, over the side's count
            weights = [torch.zeros(r, len(x), dtype=x.dtype).scatter_add_(
                1, torch.randint(len(x), (r, len(x)), generator=runs), torch.ones(r, len(x), dtype=x.dtype)) / len(x)
                for x in (a, b)]
            means.append((weights[0] @ a - weights[1] @ b).gather(1, index).mean(1))
        else:
            means.append(d[index].mean(1))
    means = torch.cat(means)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    return {"a": a.mean().item(), "b": b.mean().item(), "difference": d.mean().item(),
            "standard_error": (d.std() / n ** 0.5).item(), "low": low, "high": high,
            "examples": n, "differ": int((d != 0).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="+", required=True, help="runs of the first side (e.g. a method's seeds)")
    parser.add_argument("--b", nargs="+", required=True, help="runs of the second side")
    parser.add_argument("--k", type=int, default=None, help="heads kept (a Michel curve is read there; "
                        "default: each run's own)")
    parser.add_argument("--split", nargs="+", default=["test"],
                        help=f"evaluation splits, or {UNSEEN} (see above); several are pooled")
    parser.add_argument("--unseen-from", type=int, default=None,
                        help=f"{UNSEEN}: the training examples from this index on")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--resample-runs", action="store_true",
                        help="the interval also resamples each side's runs (its seeds), not only the examples")
    args = parser.parse_args()
    for folder in args.a + args.b:  # every folder checked before the long work
        results, cfg = pipelined_run(folder)
        if UNSEEN in args.split:
            check_unseen(folder, results, cfg.model, args.unseen_from)
    prepared: dict = {}
    a, b = (correct(side, args.k, args.split, args.batch_size, prepared, args.unseen_from) for side in (args.a, args.b))
    if a.shape[1] != b.shape[1]:
        raise SystemExit("paired: error: the two sides were evaluated on different examples")
    r = paired_difference(a, b, args.resamples, resample_runs=args.resample_runs)
    names = [", ".join(Path(f).name for f in side) for side in (args.a, args.b)]
    interval = "95% interval (examples and runs)" if args.resample_runs else "95% interval"
    print(f"| a | b | {' + '.join(args.split)} accuracy, a | b | a - b | standard error | {interval} | "
          "examples where they differ |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {names[0]} | {names[1]} | {r['a']:.4f} | {r['b']:.4f} | {100 * r['difference']:+.2f} points | "
          f"{100 * r['standard_error']:.2f} | {100 * r['low']:+.2f} to {100 * r['high']:+.2f} | "
          f"{r['differ']} of {r['examples']} |")


if __name__ == "__main__":
    main()
