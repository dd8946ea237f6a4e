"""What a person reads: the heat map of kept heads, training curves and a Markdown page per run;
the metric-versus-heads plot of a sweep (its tables: sweeping.py)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from .card import calibration_data  # noqa: E402
from .outputs import atomic_path  # noqa: E402
from .sites import UNIT_NAMES  # noqa: E402
from .train import LIVE_GRADIENT  # noqa: E402


UNIT_AXES = {"head": "head", "group": "KV group", "query": "query position"}  # a heat map's columns


def plot_head_map(path: Path, heads: list[tuple[str, int, int]], scores: list[float],
                  kept: list[tuple[str, int, int]], title: str, score_label: str = "logit", unit: str = "head") -> None:
    """One panel per attention kind; a cell per (layer, unit) coloured by its score, kept units
    outlined and marked."""
    kinds = list(dict.fromkeys(kind for kind, _, _ in heads))
    kept = set(map(tuple, kept))
    fig, axes = plt.subplots(1, len(kinds), figsize=(1.2 + 4.5 * len(kinds), 3.6), squeeze=False)
    low, high = min(scores), max(scores)
    signed = low < 0 < high  # logits: a diverging map centred on 0
    limit = max(abs(low), abs(high)) or 1.0
    for ax, kind in zip(axes[0], kinds):
        cells = [(layer, head, score) for (k, layer, head), score in zip(heads, scores) if k == kind]
        n_layers = 1 + max(c[0] for c in cells)
        n_heads = 1 + max(c[1] for c in cells)
        grid = np.full((n_layers, n_heads), np.nan)
        for layer, head, score in cells:
            grid[layer, head] = score
        image = ax.imshow(grid, cmap="RdBu_r" if signed else "viridis", aspect="auto",
                          vmin=-limit if signed else low, vmax=limit if signed else high)
        for layer, head, _ in cells:
            if (kind, layer, head) in kept:
                ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, lw=2, ec="black"))
                ax.text(head, layer, "●", ha="center", va="center", fontsize=7)
        ax.set_title(f"{kind} ({sum((kind, l, h) in kept for l, h, _ in cells)} of {len(cells)} kept)")
        ax.set_xlabel(UNIT_AXES[unit])
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        fig.colorbar(image, ax=ax, label=score_label)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_training_curves(path: Path, history: list[dict], title: str) -> None:
    """Loss, and what the method logs beside it (temperature, L0 penalty, heads on), per step."""
    keys = ["loss"] + [k for k in ("temperature", "score_grad_norm", "mask_gap", "noise_gap", "penalty",
                                   "budget", "heads_on") if any(k in r for r in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        log_scale = key in ("temperature", "score_grad_norm")
        # on a log scale, leave out zeros (a joint run's settled steps: no gradient to the scores)
        rows = [r for r in history if key in r and (not log_scale or r[key] > 0)]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".")
        ax.set_xlabel("step")
        ax.set_title({"heads_on": "heads on (mask > 0.5)", "penalty": "L0 penalty",
                      "score_grad_norm": "|gradient| of the head scores",
                      "mask_gap": "soft mask - hard top-k (heads)",
                      "noise_gap": "sampled heads not kept",
                      "budget": "heads in the training mask"}.get(key, key))
        if log_scale and rows:
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def readable(value) -> str:
    """A count or a measurement as a person reads it: thousands separated and whole from 1,000 up
    (13,756 parameters, not 1.376e+04), four significant digits below (a speedup of 1.107)."""
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())


def write_run_report(out: Path, results: dict, history: list[dict]) -> None:
    """report.md in a prune run's folder, with its figures."""
    units = UNIT_NAMES[results.get("unit", "head")]
    lines = [f"# {results['method']} {results['mode']}: {results['k']} of {results['num_heads']} {units}",
             "", f"- model: `{results['model']}`" + (" (pruned before: the baseline below is that model)"
                                                     if results.get("pruned_before") else "")
             + f", data: `{results['dataset']}` ({results['train_examples']} training "
             # (a language model's: the texts, before they are packed into blocks of tokens)
             + ("texts" if results.get("task") == "causal-lm" else "examples") + f"), seed {results['seed']}",
             f"- {results.get('metric', 'accuracy')} pruned: {_fmt(results['metrics_pruned'])}",
             f"- {results.get('metric', 'accuracy')} {'of the input model' if results.get('pruned_before') else 'unpruned'}"
             f": {_fmt(results['metrics_unpruned'])}",
             f"- seconds: {', '.join(f'{k} {v}' for k, v in results['seconds'].items())}"]
    if results.get("labels"):
        lines.insert(3, f"- labels (index: name): {', '.join(f'{i}: {n}' for i, n in enumerate(results['labels']))}")
    if len(results.get("kept_per_kind", {})) > 1:
        lines.append(f"- kept heads per kind: {', '.join(f'{k} {n}' for k, n in results['kept_per_kind'].items())}")
    for file, n in (results.get("dropped_rows") or {}).items():
        lines.append(f"- dropped {n} rows of {file} with an empty or missing label or text cell")
    if "heads_on_by_threshold" in results:
        lines.append(f"- heads with gate > 0.5 (what lambda gave): {results['heads_on_by_threshold']}; "
                     f"selection: {results['selection']}")
    if results.get("live_steps") is not None:
        lines.append(f"- the head scores had a gradient (above {LIVE_GRADIENT:g}) in {results['live_steps']} of "
                     f"{results['steps']} steps" + (f"; after step {results['settle_step']} the kept heads "
                     "were fixed and only the weights trained" if "settle_step" in results else ""))
    if results.get("pruning_dropout") == "off":
        lines.append("- the scores learned with the model's dropout off (as it is evaluated and saved)")
    if results.get("shrink_steps"):
        lines.append(f"- the training budget fell from all {results['num_heads']} {units} to {results['k']} over "
                     f"the first {results['shrink_steps']} steps ({results['k']} from step {results['shrink_steps'] + 1})")
    if results.get("allocation") == "uniform" and "budget" not in results:
        lines.append("- allocation uniform: every layer kept as many heads as the budget allows, its best ones (a "
                     "trained method's scores learning with that budget in each layer)")
    if "budget" in results:  # a --target-*: what was asked, what the cost model predicted, what was measured
        b = results["budget"]
        lines.append(f"- budget ({b['target'].replace('_', ' ')}, allocation {b.get('allocation', 'global')}): target "
                     f"{readable(b['target_value'])} (the whole model: {readable(b['original'])}), predicted "
                     f"{readable(b['predicted'])} with {b['units']} {units}, measured on the saved model "
                     + ("not measured" if b.get("measured") is None else readable(b["measured"])))
    if calibration_data(results):
        lines.append(f"- calibration data: {calibration_data(results)}")
    if "metrics_before_reconstruction" in results:
        lines.append(f"- reconstruction ({results['reconstruct']}): {results.get('metric', 'accuracy')} before "
                     f"{_fmt(results['metrics_before_reconstruction'])}, after {_fmt(results['metrics_pruned'])}")
        lines += [f"  - {e['kind']} attention of layer {e['layer']}: relative error at scales 1 {e['before']:.3g} "
                  f"-> fitted {e['after']:.3g}"
                  for e in results.get("reconstruction_error", [])]
    lines += ["", "![kept heads](heads.png)", ""]
    if history:
        plot_training_curves(out / "training.png", history, f"{results['method']} {results['mode']}")
        lines += ["![training curves](training.png)", ""]
    if "curve" in results:
        if "metrics_before_reconstruction" in results:
            lines.append(f"Michel's rounds (before reconstruction; after it: {_fmt(results['metrics_pruned'])}):")
            lines.append("")
        lines += [f"| {units} | {results.get('metric', 'accuracy')} |", "|---|---|"]
        lines += [f"| {e['heads']} | {_fmt(e['metrics'])} |" for e in results["curve"]]
        lines.append("")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines))


def plot_sweep(path: Path, rows: list[dict], unpruned: float | None, title: str, num_heads: int,
               metric: str = "accuracy", units: str = "heads", log_scale: bool = False) -> None:
    """Metric against kept heads (or KV groups): one line per (method, mode), mean over seeds with
    min-max band; `log_scale` for a metric like perplexity that spans orders of magnitude."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, mode) in sorted({(r["method"], r["mode"]) for r in rows}):
        ks = sorted({r["k"] for r in rows if (r["method"], r["mode"]) == (method, mode)})
        values = [[r["metric"] for r in rows if (r["method"], r["mode"], r["k"]) == (method, mode, k)] for k in ks]
        mean = [float(np.mean(v)) for v in values]
        seeds = f" (mean of {len(values[0])} seeds, band: min-max)" if len(values[0]) > 1 else ""
        line, = ax.plot(ks, mean, marker="o", label=f"{method} {mode}{seeds}")
        if any(len(v) > 1 for v in values):
            ax.fill_between(ks, [min(v) for v in values], [max(v) for v in values], alpha=0.15, color=line.get_color())
    if unpruned is not None:
        ax.axhline(unpruned, color="black", ls="--", lw=1, label=f"unpruned ({num_heads} {units})")
    ax.set_xlabel(f"{units} kept (of {num_heads})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # (no 2.5 heads)
    ax.set_ylabel(metric + (", log scale" if log_scale else ""))
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
