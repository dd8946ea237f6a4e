"""Cost of a joint DSP training step against a plain fine-tuning step, measured side by side.

Both steps (forward, backward, AdamW step) run on the same real batches of the default benchmark
(MiniLM-L6, Rotten Tomatoes), alternating A, B, A, B ... so that machine noise hits both alike;
the ratio of the medians is printed. Target: at most 1.10.

    python benchmarks/step_overhead.py [--rounds 20] [--batch-size 32] [--max-length 64] [--k 36]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from headprune import DSPSelector, attach_gates
from headprune.data import rotten_tomatoes
from headprune.tasks import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="timed steps of each kind (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--k", type=int, default=36, help="heads to keep of 72")
    parser.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    args = parser.parse_args()

    torch.manual_seed(0)
    path = resolve_model("offline:minilm-l6")
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = rotten_tomatoes().train["text"]
    collate = DataCollatorWithPadding(tokenizer)
    n = args.rounds + args.warmup
    batches = [collate([tokenizer(t, truncation=True, max_length=args.max_length)
                        for t in texts[i * args.batch_size:(i + 1) * args.batch_size]]) for i in range(n)]
    labels = torch.tensor(rotten_tomatoes().train["label"][:n * args.batch_size]).view(n, -1)

    plain = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation=args.attn)
    joint = copy.deepcopy(plain)
    gates = attach_gates(joint)
    gates.selector = DSPSelector(gates.num_heads, args.k, t0=1000.0, tf=1e-8, cooldown_steps=n)
    weights = [p for name, p in joint.named_parameters() if not name.startswith("head_gates.")]
    runs = {
        "plain fine-tuning": (plain, torch.optim.AdamW(plain.parameters(), lr=2e-5), None),
        "joint DSP": (joint, torch.optim.AdamW([{"params": weights, "lr": 2e-5},
                                                {"params": gates.selector.parameters(), "lr": 0.5}]),
                      gates.selector),
    }
    times = {name: [] for name in runs}
    for i in range(n):
        for name, (model, optimizer, selector) in runs.items():
            model.train()
            if selector is not None:
                selector.set_step(i)
            start = time.perf_counter()
            loss = model(**batches[i], labels=labels[i]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    print(f"MiniLM-L6, batch {args.batch_size}, max length {args.max_length}, {args.attn} attention, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved steps each")
    for name, ts in times.items():
        print(f"  {name:18s} median {statistics.median(ts) * 1000:8.1f} ms  (min {min(ts) * 1000:.1f})")
    ratio = statistics.median(times["joint DSP"]) / statistics.median(times["plain fine-tuning"])
    pairwise = statistics.median(b / a for a, b in zip(times["plain fine-tuning"], times["joint DSP"]))
    print(f"joint DSP / plain step: {ratio:.3f} (ratio of medians), {pairwise:.3f} (median of paired "
          f"ratios); target <= 1.10")


if __name__ == "__main__":
    main()
