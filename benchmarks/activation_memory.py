"""Memory and time of a backward pass through the model with and without --activation-checkpointing,
side by side.

One step of `--method dsp` (pipelined): the frozen model's forward pass under DSP's soft mask, the
backward pass to the head scores, an AdamW step of the scores; `--dropout on` in training mode, `off`
(the default for pipelined DSP on text classifiers) in evaluation mode. One step of `--method
fisher` (Michel's and Fisher's scores): one batch's gradient of the loss at the gates, in evaluation
mode; of `--method taylor`: one batch's backward pass to the attention weights. Each setting runs in
a fresh process of its own, so that one's peak memory is not the other's: the peak above what the
process held before its first step (CUDA: peak allocated; CPU: the growth of the process's largest
resident size), and the median time of the steps after the first. The settings alternate over
--repeats processes each; the ratios of the medians are printed.

    python benchmarks/activation_memory.py [--model offline:minilm-l6] [--method dsp|fisher|taylor] \\
        [--dropout on|off] [--batch-size 8] [--length 512] [--steps 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def child(args) -> dict:
    """One process, one setting: a dict of its peak memory (MB) above the start and its median step (ms)."""
    from transformers import AutoModelForSequenceClassification

    from headprune import DSPSelector, attach_gates
    from headprune.methods.michel import mask_gradients
    from headprune.methods.taylor import taylor_scores
    from headprune.tasks import resolve_model
    from headprune.train import activation_checkpointing

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(args.model), num_labels=2,
                                                               attn_implementation="eager").to(device)
    model.requires_grad_(False)
    gates = attach_gates(model)
    ids = torch.randint(1000, model.config.vocab_size, (args.batch_size, args.length), device=device)
    labels = torch.randint(0, 2, (args.batch_size,), device=device)
    batch = {"input_ids": ids, "labels": labels}
    if args.method == "dsp":
        gates.selector = DSPSelector(gates.num_heads, gates.num_heads // 2, t0=1000.0, tf=1e-8,
                                     cooldown_steps=args.steps).to(device)
        optimizer = torch.optim.AdamW(gates.selector.parameters(), lr=0.5)
        model.train(args.dropout == "on")
        gates.selector.train()

        def step(number):
            gates.selector.set_step(number)
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    elif args.method == "fisher":
        def step(number):
            mask_gradients(model, gates, [batch], torch.ones(gates.num_heads, device=device))
    else:
        def step(number):
            taylor_scores(model, gates, [batch], lambda m, b: m(**b).loss)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_memory = torch.cuda.memory_allocated()
    else:
        start_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    times = []
    with activation_checkpointing(model, args.child == "on"):
        for number in range(args.steps):
            began = time.perf_counter()
            step(number)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - start_memory
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_memory
    return {"peak_mb": peak / 2**20, "ms": 1000 * statistics.median(times[1:] or times), "device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offline:minilm-l6", help="a sequence classifier (default: MiniLM-L6)")
    parser.add_argument("--method", choices=["dsp", "fisher", "taylor"], default="dsp",
                        help="a DSP step, or one batch of the scores from gradients (fisher: also Michel's)")
    parser.add_argument("--dropout", choices=["on", "off"], default="off",
                        help="dsp: the model's dropout while the scores learn (on: training mode)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=512, help="tokens a sequence")
    parser.add_argument("--steps", type=int, default=5, help="steps a process (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=2, help="processes of each setting, alternating")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    passed = sys.argv[1:]
    seen = {"off": [], "on": []}
    for _ in range(args.repeats):
        for setting in seen:
            run = subprocess.run([sys.executable, __file__, *passed, "--child", setting], capture_output=True,
                                 text=True, check=True)
            seen[setting].append(json.loads(run.stdout.strip().splitlines()[-1]))
    device = seen["off"][0]["device"]
    what = f"dsp, dropout {args.dropout}" if args.method == "dsp" else args.method
    print(f"{args.model}, {what}, batch {args.batch_size} x {args.length} tokens, {device}, "
          f"{args.repeats} processes each")
    print("| activation checkpointing | peak memory of the steps (MB, median) | ms a step (median) |")
    print("|---|---|---|")
    medians = {}
    for setting, rows in seen.items():
        medians[setting] = (statistics.median(r["peak_mb"] for r in rows), statistics.median(r["ms"] for r in rows))
        print(f"| {setting} | {medians[setting][0]:.0f} | {medians[setting][1]:.0f} |")
    off, on = medians["off"], medians["on"]
    print(f"with / without: memory {on[0] / max(off[0], 1e-9):.2f}x, time {on[1] / off[1]:.2f}x")


if __name__ == "__main__":
    main()
