"""Cross-entropy and accuracy of pruned classifiers: what every method optimises against what is reported.

Every trained method and Michel's importance follow the gradient of the cross-entropy on the
pruning data, while the sweep reports accuracy. This script puts both side by side for the heads
that finished pipelined runs kept: for each run folder (a `headprune prune` or sweep run; a
Michel run gives one row per k of --ks on its curve) it rebuilds the run's model and data from the
settings in its results.json, switches on the kept heads only, and measures, without dropout, the
mean cross-entropy and the accuracy on the pruning data (the first --max-train-examples training
examples of the run) and on the test split; and the cross-entropy once the logits are multiplied by
the one factor that minimises it on the pruning data (the "best logit scale", fitted on a grid):
with many heads gone the frozen classifier is less sure overall, and this takes that out of the
loss, leaving how well the kept heads separate the classes. A run that folded a reconstruction into
its saved model (`--reconstruct`, e.g. DSP's default bias) is measured on that saved model: its kept
heads alone are not what it saved.

    python benchmarks/loss_and_accuracy.py runs/sweep-subjectivity/dsp-pipelined-k6-s0 \
        runs/sweep-subjectivity/michel-pipelined-s0 --ks 6 12 24 36
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from headprune.config import PruneConfig, reconstruct_in_effect, run_settings
from headprune.gates import attach_gates
from headprune.tasks import get_task


def kept_sets(results: dict, ks: list[int]) -> dict[int, set]:
    """k -> the heads a run kept; a Michel curve gives every k of `ks` it passed through."""
    if "curve" not in results:
        return {results["k"]: {tuple(h) for h in results["kept_heads"]}}
    everything = {tuple(h) for h in results["kept_heads"]}
    for entry in results["curve"]:
        everything |= {tuple(h) for h in entry.get("pruned_now", [])}
    sets, pruned = {}, set()
    for entry in results["curve"]:  # from all heads down: each entry lists what its round pruned
        pruned |= {tuple(h) for h in entry.get("pruned_now", [])}
        if entry["heads"] in ks:
            sets[entry["heads"]] = everything - pruned
    return sets


def finished_run(folder: str) -> tuple[dict, PruneConfig]:
    """The results and settings of a finished pipelined run (an error otherwise)."""
    if not (Path(folder) / "results.json").is_file():
        raise SystemExit(f"{folder}: no results.json (not a finished headprune run)")
    results = json.loads((Path(folder) / "results.json").read_text())
    if results["mode"] != "pipelined":
        raise SystemExit(f"{folder}: only pipelined runs (their weights are the fine-tuned model's)")
    return results, run_settings(results["config"])


def pipelined_run(folder: str) -> tuple[dict, PruneConfig]:
    """The results and settings of a finished pipelined classification run (an error otherwise)."""
    results, cfg = finished_run(folder)
    if results["task"] != "classification":
        raise SystemExit(f"{folder}: only pipelined classification runs (accuracy and cross-entropy of a classifier)")
    return results, cfg


def frozen_model(cfg: PruneConfig):
    """The fine-tuned model of a pipelined run's settings, gated and in eval mode, with its task and
    data: (task, model, gates, pruning data, evaluation splits, collate)."""
    task = get_task(cfg.task)
    path, config, _, _ = task.inspect(cfg.model, require_finetuned=True, unit=cfg.unit)
    data = task.load_data(cfg)
    model, tokenizer = task.load_model(cfg, data, path, config, require_finetuned=True)
    gates = attach_gates(model, cfg.unit)
    train_set, evals, collate = task.prepare(data, tokenizer, cfg)
    return task, model.eval(), gates, train_set, evals, collate


def saved_model_if_reconstructed(folder: str, results: dict, k: int):
    """The model a run saved at `k` heads, where it folded a reconstruction into it: None for a run
    without one, and for the other k of a Michel curve (it saves its last k only)."""
    if reconstruct_in_effect(results["config"]) == "none" or k != results["k"]:
        return None
    from headprune import load_pruned
    return load_pruned(Path(folder) / "model").eval()


@torch.no_grad()
def logits_and_labels(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = [], []
    for batch in batches:
        batch = dict(batch)
        labels.append(batch.pop("labels"))
        logits.append(model(**batch).logits.float())
    return torch.cat(logits), torch.cat(labels)


def best_scale(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The factor on the logits (one over a temperature) with the lowest mean cross-entropy, on a
    log grid from 0.1 to 20. It changes no prediction: it takes out of the loss how sure the pruned
    model is overall, and leaves how well its heads separate the classes."""
    grid = torch.logspace(-1, 1.3, 231).tolist()
    return min(grid, key=lambda scale: F.cross_entropy(logits * scale, labels).item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="folders of finished pipelined classification runs")
    parser.add_argument("--ks", type=int, nargs="+", default=[6, 12, 24, 36], help="k of Michel curves")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    prepared = {}  # (model, data settings) -> (model, gates, pruning batches, test batches)

    def row(name: str, key, kept: set, saved=None) -> None:
        model, gates, pruning_batches, test_batches = prepared[key]
        mask = torch.tensor([float(h in kept) for h in gates.heads])
        with gates.override(mask):
            model = saved if saved is not None else model  # the saved model: its own heads only
            (z, y), (z_test, y_test) = logits_and_labels(model, pruning_batches), logits_and_labels(model, test_batches)
        scale = best_scale(z, y)
        cells = [F.cross_entropy(z, y), (z.argmax(-1) == y).float().mean(), scale, F.cross_entropy(z * scale, y),
                 F.cross_entropy(z_test, y_test), (z_test.argmax(-1) == y_test).float().mean(),
                 F.cross_entropy(z_test * scale, y_test)]
        print(f"| {name} | {len(kept)} | " + " | ".join(f"{float(c):.4f}" for c in cells) + " |")

    print("| run | k | cross-entropy, pruning data | accuracy, pruning data | best logit scale | cross-entropy at "
          "it | cross-entropy, test | accuracy, test | cross-entropy, test, at that scale |")
    print("|---|---|---|---|---|---|---|---|---|")
    for folder in args.runs:
        results, cfg = pipelined_run(folder)
        key = (cfg.model, cfg.dataset, cfg.max_train_examples, cfg.max_length)
        if key not in prepared:
            _, model, gates, train_set, evals, collate = frozen_model(cfg)

            def batches(ds):
                return [collate([ds[i] for i in range(j, min(j + args.batch_size, len(ds)))])
                        for j in range(0, len(ds), args.batch_size)]
            prepared[key] = model, gates, batches(train_set), batches(evals["test"])
            row(f"unpruned: {cfg.model}", key, set(gates.heads))
        for k, kept in sorted(kept_sets(results, args.ks).items()):
            saved = saved_model_if_reconstructed(folder, results, k)
            row(Path(folder).name + (f" + {results['reconstruct']}" if saved is not None else ""), key, kept, saved)


if __name__ == "__main__":
    main()
