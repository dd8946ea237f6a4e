"""Issue 21's targets from finished sweeps: DSP at its default against the best other method.

Reads the sweep.csv of every folder given (a sweep's rows: method, k, seed, one column per split;
a run with --reconstruct gives "<method>" and "<method> + <mode>" rows), averages over seeds, and
for each k compares DSP (`--dsp`, the rows of the default settings) with the best other method,
each method at its best setting: of its variants (with or without reconstruction) the one with
the best mean on `--choose-on` (validation), reported on `--report-on` (test). Targets: for
accuracy, DSP at least 1 point above at k <= --level-from - 1 and level (at most 0.5 point
below) from --level-from on; for perplexity (--lower-is-better), DSP at most 0.9 x the best.

    python benchmarks/targets.py runs/sweep-rt runs/sweep-rt-scored --ks 6 12 24 36
    python benchmarks/targets.py runs/llm runs/llm-scored --lower-is-better --ks 30 45 60
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path


def read_rows(folders: list[str]) -> list[dict]:
    rows = []
    for folder in folders:
        path = Path(folder) / "sweep.csv"
        if not path.is_file():
            raise SystemExit(f"{folder}: no sweep.csv (not a finished headprune sweep)")
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def means(rows: list[dict], split: str) -> dict[tuple[str, int], float]:
    """(method label, k) -> the mean of `split` over the seeds (the first row of a seed counts)."""
    values = defaultdict(dict)
    for row in rows:
        if row.get(split) not in (None, ""):
            values[(row["method"], int(row["k"]))].setdefault(row["seed"], float(row[split]))
    return {key: statistics.mean(v.values()) for key, v in values.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", help="folders of finished sweeps")
    parser.add_argument("--ks", type=int, nargs="+", required=True)
    parser.add_argument("--dsp", default="dsp", help="the method label of DSP at its default (e.g. 'dsp (mean ablation) + bias')")
    parser.add_argument("--choose-on", default="validation")
    parser.add_argument("--report-on", default="test")
    parser.add_argument("--lower-is-better", action="store_true", help="a metric like perplexity")
    parser.add_argument("--level-from", type=int, default=36, help="from this k on, the target is to be level")
    args = parser.parse_args(argv)
    rows = read_rows(args.sweeps)
    chosen, reported = means(rows, args.choose_on), means(rows, args.report_on)
    sign = -1 if args.lower_is_better else 1
    print(f"| k | DSP ({args.dsp}) | best other (its setting) | target | holds |")
    print("|---|---|---|---|---|")
    for k in args.ks:
        if (args.dsp, k) not in reported:
            print(f"| {k} | not run | | | |")
            continue
        best: dict[str, str] = {}  # base method -> its variant with the best mean on --choose-on
        for (label, kk) in chosen:
            base = label.split(" + ")[0]
            if kk != k or base.split(" (")[0] == "dsp" or (label, k) not in reported:  # "dsp (mean ablation)" too
                continue
            if base not in best or sign * chosen[(label, k)] > sign * chosen[(best[base], k)]:
                best[base] = label
        if not best:
            print(f"| {k} | {reported[(args.dsp, k)]:.4f} | no other method | | |")
            continue
        rival = max(best.values(), key=lambda label: sign * reported[(label, k)])
        dsp, other = reported[(args.dsp, k)], reported[(rival, k)]
        if args.lower_is_better:
            target, holds = "at most 0.9 x", dsp <= 0.9 * other
            gap = f"{dsp / other:.2f} x"
        elif k < args.level_from:
            target, holds = "1 point above", dsp >= other + 0.01
            gap = f"{100 * (dsp - other):+.1f} points"
        else:
            target, holds = "level (at most 0.5 point below)", dsp >= other - 0.005
            gap = f"{100 * (dsp - other):+.1f} points"
        print(f"| {k} | {dsp:.4f} | {other:.4f} ({rival}) | {target}: {gap} | {'yes' if holds else 'no'} |")


if __name__ == "__main__":
    main()
