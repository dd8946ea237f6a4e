"""Along a pipelined DSP run: the heads its hard mask keeps, layer by layer, and their accuracy.

A run ends with the hard top-k of its scores; this script shows how that choice forms. It runs
`headprune prune` (pipelined, DSP) with the settings given, records the scores before every step,
and prints, at --points steps spread over the run, the temperature, the kept heads per layer, how
many differ from the final choice and the hard mask's accuracy on --split (a mask seen before is
not evaluated again). Where the run chose its heads for FLAP's bias (`--ablation mean`, DSP's
default on text classifiers) a closed head leaves its mean output there too, so each accuracy is
that of the model the run would save with that mask. Then the training log's noise gap: how many
of the heads a step's noisy top-k chose the noise-free one would not.

    python benchmarks/schedule_trace.py --config configs/rotten-tomatoes.yaml --model runs/results/finetune/model \\
        --k 12 --seed 0 --max-train-examples 4000 --schedule steady --output-dir runs/trace/steady-k12-s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from loss_and_accuracy import frozen_model  # the gated fine-tuned model of a run's settings
from torch.utils.data import DataLoader

from headprune.config import PruneConfig, ablation_in_effect, build_config, load_yaml
from headprune.methods import DSPSelector, geometric_temperature, hard_top_k
from headprune.outputs import write_json
from headprune.reconstruction import mean_contexts
from headprune.recipes import prune
from headprune.selection import calibration_set


def run_with_trace(cfg) -> tuple[dict, list[list[float]]]:
    """`headprune prune` with every training step's scores recorded before the step; both kept in
    the output folder (trace.json), so that a second call only reads them."""
    out = Path(cfg.output_dir)
    if (out / "results.json").is_file() and (out / "trace.json").is_file():
        return json.loads((out / "results.json").read_text()), json.loads((out / "trace.json").read_text())
    if (out / "results.json").is_file():  # a run made without this script: its steps were not recorded
        raise SystemExit(f"schedule_trace: error: {out} holds a run without its trace (trace.json); choose "
                         "another --output-dir, or delete that folder to run it again with the trace")
    trace: list[list[float]] = []
    set_step = DSPSelector.set_step

    def recording(self, step: int) -> None:
        if self.training:
            del trace[step:]
            trace.append(self.logits.detach().cpu().tolist())
        set_step(self, step)
    DSPSelector.set_step = recording
    try:
        results = prune(cfg)
    finally:
        DSPSelector.set_step = set_step
    write_json(out / "trace.json", trace)  # atomic
    return results, trace


def per_layer(mask: torch.Tensor, heads: list) -> str:
    layers = sorted({(kind, layer) for kind, layer, _ in heads})
    return " ".join(str(int(sum(m for m, h in zip(mask.tolist(), heads) if (h[0], h[1]) == kl))) for kl in layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a prune config (YAML) with the model's data settings")
    parser.add_argument("--model", required=True, help="the fine-tuned model")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-examples", type=int, default=None, help="default: the config's")
    parser.add_argument("--schedule", default="default", choices=["default", "steady", "reference"],
                        help="default: the reference's for pipelined DSP")
    parser.add_argument("--points", type=int, default=8, help="steps along the run where the mask is evaluated")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                        help="more prune options, e.g. pruning_lr=0.1 (YAML values)")
    args = parser.parse_args()

    import yaml
    overrides = {**load_yaml(args.config, PruneConfig), **{o.split("=", 1)[0]: yaml.safe_load(o.split("=", 1)[1])
                                                          for o in args.set}}
    cfg = build_config(PruneConfig, **{**overrides, "model": args.model, "output_dir": args.output_dir,
                                       "method": "dsp", "mode": "pipelined", "k": args.k, "seed": args.seed,
                                       "schedule": args.schedule,
                                       **({"max_train_examples": args.max_train_examples}
                                          if args.max_train_examples else {})})
    if cfg.calibration_dataset and ablation_in_effect(vars(cfg)) == "mean":  # before the run: one line
        raise SystemExit("schedule_trace: error: the means of another --calibration-dataset are not rebuilt here: "
                         "leave calibration_dataset out")
    results, trace = run_with_trace(cfg)
    steps = len(trace)

    task, model, gates, train_set, evals, collate = frozen_model(cfg)
    from accelerate import Accelerator
    acc = Accelerator()
    if ablation_in_effect(vars(cfg)) == "mean":  # the model the bias saves: closed heads leave their means
        loader = DataLoader(calibration_set(cfg, task, None, None, train_set), batch_size=cfg.batch_size,
                            collate_fn=collate)
        gates.fill = mean_contexts(model, gates, loader, task.loss)
    last_scores = final_scores(args.output_dir, gates.heads)
    final = hard_top_k(last_scores, args.k)
    log = [json.loads(line) for line in (Path(args.output_dir) / "train_log.jsonl").read_text().splitlines()]

    seen: dict[tuple, float] = {}
    points = sorted({max(1, round(steps * i / args.points)) for i in range(1, args.points + 1)})
    print(f"{args.schedule}, k={args.k}, seed {args.seed}: {steps} steps, final {cfg.task} "
          f"{results['metrics_pruned']}, live steps {results.get('live_steps')}")
    print(f"| step | temperature | kept per layer | not in the final choice | {args.split} |")
    print("|---|---|---|---|---|")
    for step in points:  # the scores after `step` steps: recorded before step `step` (the last: the final scores)
        scores = torch.tensor(trace[step], dtype=torch.float64) if step < steps else last_scores
        mask = hard_top_k(scores, args.k)
        key = tuple(mask.tolist())
        if key not in seen:
            with gates.override(mask):
                seen[key] = task.evaluate(acc, model, {args.split: evals[args.split]}, collate, cfg)[args.split]
        temperature = geometric_temperature(step, results["t0"], results["tf"], results["cooldown_steps"])
        print(f"| {step} | {temperature:.3g} | {per_layer(mask, gates.heads)} | "
              f"{int((mask * (1 - final)).sum())} | {seen[key]:.4f} |")
    gaps = [row["noise_gap"] for row in log if "noise_gap" in row]
    print("noise gap at the log rows:", " ".join(str(g) for g in gaps))


def final_scores(folder: str, heads: list) -> torch.Tensor:
    """The scores the run ended with, in gate order, from its head_scores.json."""
    saved = {(h["kind"], h["layer"], h["head"]): h["logit"] for h in json.loads((Path(folder) / "head_scores.json").read_text())}
    return torch.tensor([saved[tuple(h)] for h in heads], dtype=torch.float64)


if __name__ == "__main__":
    main()
