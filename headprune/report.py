"""Figures: the heat map of kept heads (layer x head, coloured by the learned score)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .outputs import atomic_path  # noqa: E402


def plot_head_map(path: Path, heads: list[tuple[str, int, int]], scores: list[float],
                  kept: list[tuple[str, int, int]], title: str) -> None:
    """One panel per attention kind; a cell per (layer, head) coloured by its score, kept heads
    outlined and marked."""
    kinds = list(dict.fromkeys(kind for kind, _, _ in heads))
    kept = set(map(tuple, kept))
    fig, axes = plt.subplots(1, len(kinds), figsize=(1.2 + 4.5 * len(kinds), 3.6), squeeze=False)
    limit = max(abs(s) for s in scores) or 1.0
    for ax, kind in zip(axes[0], kinds):
        cells = [(layer, head, score) for (k, layer, head), score in zip(heads, scores) if k == kind]
        n_layers = 1 + max(c[0] for c in cells)
        n_heads = 1 + max(c[1] for c in cells)
        grid = np.full((n_layers, n_heads), np.nan)
        for layer, head, score in cells:
            grid[layer, head] = score
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        for layer, head, _ in cells:
            if (kind, layer, head) in kept:
                ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, lw=2, ec="black"))
                ax.text(head, layer, "●", ha="center", va="center", fontsize=7)
        ax.set_title(f"{kind} ({sum((kind, l, h) in kept for l, h, _ in cells)} of {len(cells)} kept)")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        fig.colorbar(image, ax=ax, label="score (logit)")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
