"""Reconstruction on heads that finished runs chose: each --reconstruct mode side by side.

For each folder of a finished pipelined `headprune prune` or sweep run, this rebuilds the run's
fine-tuned model and data from its results.json, switches on the heads it kept, and for each mode
of --modes fits the reconstruction on the run's calibration data (its pruning data, or
--calibration-examples of it), folds it in, evaluates every split and puts the weights back. The
row "none" is the run's own result. So one selection (a DSP run of minutes) is measured with every
mode without being chosen again.

    python benchmarks/reconstruction.py runs/sweep/dsp-pipelined-k12-s0 runs/sweep/flap-pipelined-k12-s0 \\
        --modes rescale bias both --calibration-examples 1000
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from headprune.reconstruction import MODES, reconstruct
from headprune.selection import calibration_set
from loss_and_accuracy import finished_run, frozen_model  # a run's settings; its gated fine-tuned model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="folders of finished pipelined runs")
    parser.add_argument("--modes", nargs="+", default=list(MODES[1:]), choices=list(MODES[1:]))
    parser.add_argument("--calibration-examples", type=int, default=None,
                        help="the first N examples of each run's calibration data (default: the run's setting)")
    args = parser.parse_args(argv)
    runs = [finished_run(folder) for folder in args.runs]  # every folder checked before the long work
    for folder, (_, cfg) in zip(args.runs, runs):
        if cfg.calibration_dataset:
            raise SystemExit(f"{folder}: calibrated on another dataset ({cfg.calibration_dataset}); this script "
                             "reconstructs on the run's pruning data only")
    acc = Accelerator()
    print("| run | k | reconstruct | " + "metrics | seconds |")
    print("|---|---|---|---|---|")
    for folder, (results, cfg) in zip(args.runs, runs):
        if args.calibration_examples:  # (a copy set by hand: the run's own settings may read no calibration data)
            cfg = copy.copy(cfg)
            cfg.calibration_examples = args.calibration_examples
        task, model, gates, train_set, evals, collate = frozen_model(cfg)
        model = model.to(acc.device)
        calibration = calibration_set(cfg, task, None, None, train_set)
        loader = DataLoader(calibration, batch_size=cfg.batch_size, collate_fn=collate)
        kept = {tuple(h) for h in results["kept_heads"]}
        mask = torch.tensor([float(h in kept) for h in gates.heads])
        name = Path(folder).name
        before = results.get("metrics_before_reconstruction", results["metrics_pruned"])  # a run with its own fit
        print(f"| {name} | {len(kept)} | none (the run's heads) | {json.dumps(before)} | |", flush=True)
        weights = [(site.output, site.output.weight.detach().clone(),
                    None if site.output.bias is None else site.output.bias.detach().clone()) for site in gates.sites]
        for mode in args.modes:
            start = time.perf_counter()
            reconstruct(model, gates, mask, loader, task.loss, mode, disable_progress=True)
            seconds = time.perf_counter() - start
            with gates.override(mask):
                metrics = task.evaluate(acc, model, evals, collate, cfg)
            print(f"| {name} | {len(kept)} | {mode} | {json.dumps(metrics)} | {seconds:.0f} |", flush=True)
            with torch.no_grad():  # back to the fine-tuned weights for the next mode
                for output, weight, bias in weights:
                    output.weight.copy_(weight)
                    output.bias = None if bias is None else torch.nn.Parameter(bias.clone(), requires_grad=False)


if __name__ == "__main__":
    main()
