"""Speed targets (issue 24): prune to each --target-speedup with each --allocation, then time every
saved model against the whole architecture side by side in this one process, and put the
measured speedup beside the target, the latency table's prediction and the quality.

The pruning runs are those a `headprune sweep --target-speedup ...` plans, one set per allocation
(in <output-dir>/<allocation>; finished runs are read back, not run again; a target the model
cannot reach on this machine is reported, not fatal): global lets the method's ranking decide how many units each
layer keeps, uniform keeps as many in every layer of a kind (the baseline a better allocation
should beat at the same speed). Any other option is the sweep's (e.g. --config, --model, --methods).

    python benchmarks/speed_targets.py --config configs/rotten-tomatoes.yaml --model runs/results/finetune/model \\
        --methods fisher --at-batch-size 32 --at-length 64 --output-dir runs/results/speed-targets/minilm
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from headprune.cli import parser as headprune_parser
from headprune.config import MeasureConfig, SweepConfig, build_config
from headprune.measuring import load_models, time_forward_or_generation
from headprune.errors import ConfigError, HeadpruneError
from headprune.outputs import RESULTS, atomic_path
from headprune.pruning import load_pruned
from headprune.recipes import prune, timed_length
from headprune.sweeping import check_plan, planned_runs, read_results, rows_of


NOT_SPLITS = ("method", "mode", "seed", "seconds", "run", "budget", "budget_value", "predicted", "measured", "k",
              "passes", "allocation", "folder")


def main(argv=None) -> None:
    own = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    own.add_argument("--targets", nargs="+", type=float, default=[1.2, 1.4, 1.6], help="speedups (default 1.2 1.4 1.6)")
    own.add_argument("--allocations", nargs="+", default=["global", "uniform"], choices=["global", "uniform"])
    own.add_argument("--repeats", type=int, default=10, help="timed turns of every model, side by side")
    own.add_argument("--output-dir", required=True)
    args, rest = own.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sweep_args = headprune_parser().parse_args(["sweep", *rest, "--seeds", "0"])
    configs = {allocation: build_config(SweepConfig, sweep_args, target_speedup=args.targets, allocation=allocation,
                                        output_dir=str(Path(args.output_dir) / allocation))
               for allocation in args.allocations}  # every option checked before the first run
    rows, unreachable = [], []
    for allocation, cfg in configs.items():
        runs = planned_runs(cfg)
        check_plan(cfg, runs, speeds=False)  # a target out of reach is said in the table, not refused
        for run in runs:
            folder = Path(run.output_dir)
            try:
                results = read_results(folder) if (folder / RESULTS).exists() else prune(run)
            except ConfigError as err:  # a target this model cannot reach on this machine: said, not fatal
                unreachable.append(f"{run.method}, {run.target_speedup:g}x, {allocation}: {err}")
                continue
            rows += [{**row, "allocation": allocation, "folder": str(folder)}
                     for row in rows_of(results, [], folder.name) if " + " not in row["method"]]
    if not rows:
        raise SystemExit("no target could be reached:\n" + "\n".join(unreachable))
    cfg = next(iter(configs.values()))
    timings = time_all(cfg, rows, args.repeats)
    splits = [key for key in rows[0] if key not in NOT_SPLITS]  # the metric on each evaluation split
    lines = ["| method | target | allocation | units kept | predicted | measured in its run | measured here, "
             "side by side | off the target | " + " | ".join(splits) + " |", "|" + "---|" * (8 + len(splits))]
    for row in sorted(rows, key=lambda r: (r["method"], r["budget_value"], r["allocation"])):
        here = timings["whole"] / timings[row["folder"]]
        row["measured_side_by_side"] = here
        lines.append(f"| {row['method']} | {row['budget_value']:g}x | {row['allocation']} | {row['k']} | "
                     f"{row['predicted']:.3f}x | {row['measured']:.3f}x | {here:.3f}x | "
                     f"{100 * (here / row['budget_value'] - 1):+.1f}% | " +
                     " | ".join(f"{row[s]:.4f}" for s in splits) + " |")
    table = "\n".join(lines + [""] + [f"Unreachable: {line}" for line in unreachable])
    print(table)
    out = Path(args.output_dir)
    with atomic_path(out / "speed_targets.md") as tmp:
        tmp.write_text(f"`python {' '.join(sys.argv)}`\n\n{table}\n")
    with atomic_path(out / "speed_targets.json") as tmp:
        tmp.write_text(json.dumps({"rows": rows, "unreachable": unreachable, "whole_seconds": timings["whole"]},
                                  indent=1, default=str))


def time_all(cfg: SweepConfig, rows: list[dict], repeats: int) -> dict[str, float]:
    """Median seconds of the whole architecture ("whole") and of every saved model (by folder),
    all taking turns on one batch: as the runs were timed (a forward pass, or generating)."""
    folders = list(dict.fromkeys(row["folder"] for row in rows))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the runs timed them (accelerate's choice)
    first = load_models(MeasureConfig(pruned=str(Path(folders[0]) / "model"),
                                      attn_implementation=cfg.attn_implementation, device=device))
    models = {"whole": first["original"], folders[0]: first["pruned"]}
    source = Path(cfg.model) / "config.json"  # a model pruned before: the speedups are relative to it
    if source.is_file() and (json.loads(source.read_text()).get("headprune") or {}).get("physical"):
        models["whole"] = load_pruned(cfg.model, attn_implementation=cfg.attn_implementation).eval().to(device)
    for folder in folders[1:]:  # the same architecture: one whole model for them all
        models[folder] = load_pruned(Path(folder) / "model", attn_implementation=cfg.attn_implementation).eval().to(device)
    timings = time_forward_or_generation(models, cfg.at_batch_size, timed_length(cfg, models["whole"]),
                                         cfg.at_new_tokens, repeats, 2, device, models["whole"].config)
    return {name: t["median"] for name, t in timings.items()}


if __name__ == "__main__":
    try:
        main()
    except HeadpruneError as err:  # bad options: one line, as headprune says them
        raise SystemExit(f"speed_targets: error: {err}") from None
