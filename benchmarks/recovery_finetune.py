"""Accuracy after a short fine-tuning of the pruned model: does it change which method's heads are best?

Pipelined pruning leaves the weights as they were fine-tuned for every head; at 6 or 12 heads of
72 a user fine-tunes the pruned model again before using it. For each run folder (a finished
pipelined `headprune prune` or sweep run; a Michel run gives one row per k of --ks on its curve)
this script removes the heads the run did not keep from the run's fine-tuned model, fine-tunes
what is left with `headprune finetune` on the run's own pruning data (its first
--max-train-examples training examples; --epochs, --lr, one fine-tuning seed for every row, so
that only the heads differ) and prints the accuracy before and after. A run that folded a
reconstruction into its saved model (`--reconstruct`, e.g. DSP's default bias) is fine-tuned from
that saved model, the one its "before" accuracy is of. Finished rows are reused
(each row's folder under --output-dir holds its results.json).

    python benchmarks/recovery_finetune.py runs/sweep-subjectivity/dsp-pipelined-k6-s0 \
        runs/sweep-subjectivity/michel-pipelined-s0 --ks 6 12 24 --output-dir runs/recovery
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from loss_and_accuracy import kept_sets, pipelined_run  # a run's kept heads (a Michel curve: at each k)

from headprune.config import FinetuneConfig, reconstruct_in_effect
from headprune.pruning import save_pruned
from headprune.recipes import finetune
from headprune.tasks import get_task


def metrics_before(results: dict, k: int) -> dict:
    if "curve" not in results:
        return results["metrics_pruned"]
    return next(e["metrics"] for e in results["curve"] if e["heads"] == k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="folders of finished pipelined classification runs")
    parser.add_argument("--ks", type=int, nargs="+", default=[6, 12, 24, 36], help="k of Michel curves")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed (the same for every row)")
    parser.add_argument("--output-dir", default="runs/recovery")
    args = parser.parse_args()

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    print("| run | k | validation before | test before | validation after | test after |")
    print("|---|---|---|---|---|---|")
    for folder in args.runs:
        results, cfg = pipelined_run(folder)
        for k, kept in sorted(kept_sets(results, args.ks).items()):
            row = Path(args.output_dir) / f"{Path(folder).name}-k{k}"
            if not (row / "recovered" / "results.json").is_file():
                start = row / "pruned"
                if reconstruct_in_effect(results["config"]) != "none" and "curve" not in results:
                    start = Path(folder) / "model"  # its heads with the reconstruction folded into them
                else:
                    task = get_task(cfg.task)
                    path, config, _, _ = task.inspect(cfg.model, require_finetuned=True)
                    data = task.load_data(cfg)
                    model, tokenizer = task.load_model(cfg, data, path, config, require_finetuned=True)
                    save_pruned(model, start, sorted(kept), tokenizer, method=results["method"], mode="pipelined")
                finetune(FinetuneConfig(**{**{f: getattr(cfg, f) for f in fields}, "model": str(start),
                                           "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
                                           "output_dir": str(row / "recovered"), "overwrite": True}))
            after = json.loads((row / "recovered" / "results.json").read_text())["metrics"]
            before = metrics_before(results, k)
            print(f"| {Path(folder).name} | {k} | {before['validation']:.4f} | {before['test']:.4f} | "
                  f"{after['validation']:.4f} | {after['test']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
