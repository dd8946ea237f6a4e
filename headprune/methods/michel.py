"""Michel et al. 2019: head importance from gradients, then iterative pruning.

Importance of head h: I_h = (1 / tokens) * sum over batches of |dL_b / dm_h|, with the model in
eval mode (dropout off) and the current mask m. Each layer's scores are divided by that layer's
L2 norm, then all are min-max normalised. The loop masks the `step` least important heads still on
(fewer at the end, so that it lands exactly on the target), evaluates, and with "exact pruning"
re-estimates the importance under the new mask. One run gives the whole metric-vs-heads curve.
Fixed from the reference: |.| per batch (fairseq summed signed gradients), an integer step, a
stop condition that fires, and N not divisible by the step.
"""

from __future__ import annotations

from typing import Callable

import torch

from .scoring import Scores


def mask_gradients(model, gates, batches, mask: torch.Tensor, loss_fn=None, record=None) -> tuple[torch.Tensor, torch.Tensor]:
    """dL_b/dmask for every batch b (batches x heads) at `mask`, model in eval mode (dropout off),
    and the number of (non-padding) tokens seen. `loss_fn(model, batch)` gives the loss (default:
    the model's own); `record` (scoring.PassRecord) keeps them as they come (a pass stopped midway
    goes on)."""
    model.eval()
    skip, kept = (record.read() if record is not None else None) or (0, {})
    grads = list(kept["grads"].to(mask.device)) if "grads" in kept else []
    tokens = kept["tokens"].to(mask.device) if "tokens" in kept else torch.zeros((), dtype=torch.float64,
                                                                                   device=mask.device)
    for done, batch in enumerate(batches, start=1):
        if done <= skip:  # its gradient came before the pass was stopped
            continue
        m = mask.detach().clone().requires_grad_(True)
        with gates.override(m):
            loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
        (grad,) = torch.autograd.grad(loss, m)
        grads.append(grad.double())
        # tokens that are not padding; images have no padding: count the images
        tokens += batch["attention_mask"].sum() if "attention_mask" in batch else len(batch["labels"])
        if record is not None:
            record.save(done, lambda: {"grads": torch.stack(grads), "tokens": tokens})
    if record is not None:
        record.done()
    return torch.stack(grads) if grads else mask.new_zeros((0, mask.numel()), dtype=torch.float64), tokens


def head_importance(model, gates, batches, mask: torch.Tensor, reduce=None, loss_fn=None, record=None) -> torch.Tensor:
    """Sum over `batches` of |dL/dmask| per head, divided by the number of (non-padding) tokens.

    `reduce`, if given, sums a tensor over processes (e.g. `accelerator.reduce`); `loss_fn(model,
    batch)` gives the loss (default: the model's own); `record`: see `mask_gradients`."""
    grads, tokens = mask_gradients(model, gates, batches, mask, loss_fn, record)
    total = grads.abs().sum(0)
    if reduce is not None:
        total, tokens = reduce(total), reduce(tokens)
    return (total / tokens).cpu()


def normalize_importance(scores: torch.Tensor, heads_per_layer: list[int], per_layer: bool = True) -> torch.Tensor:
    """Divide each layer's scores by their L2 norm (unless not `per_layer`), then min-max over all
    heads. Per layer, as the reference does, every layer looks alike: with few heads a layer (3 KV
    groups of SmolLM2) the pruning spreads evenly over the layers whatever their importance."""
    parts = []
    for layer_scores in torch.split(scores, heads_per_layer):
        norm = torch.linalg.vector_norm(layer_scores)
        parts.append(layer_scores / norm if norm > 0 and per_layer else layer_scores)
    scores = torch.cat(parts)
    low, high = scores.min(), scores.max()
    return (scores - low) / (high - low) if high > low else torch.zeros_like(scores)


def iterative_pruning(num_heads: int, step: int, stop_at: int, importance: Callable[[torch.Tensor], torch.Tensor],
                      evaluate: Callable[[torch.Tensor], dict], exact: bool = True,
                      budget: list[tuple[list[int], int]] | None = None) -> list[dict]:
    """Mask the least important heads `step` at a time down to `stop_at` heads (or, with a
    `budget` of groups, down to k_g heads in each group: a group at its budget loses no more).

    `importance(mask)` returns normalised scores; `evaluate(mask)` the metrics. Returns the curve:
    one entry per mask, from all heads on to the budget, each with the heads pruned at that step.
    Ties in importance go to the lower head index.
    """
    if step < 1:
        raise ValueError(f"the pruning step must be at least 1, got {step}")
    budget = budget or [(list(range(num_heads)), stop_at)]
    group_of = {h: g for g, (indices, _) in enumerate(budget) for h in indices}
    mask = torch.ones(num_heads)
    scores = importance(mask)
    curve = [{"heads": num_heads, "pruned_now": [], "mask": mask.clone(), "metrics": evaluate(mask)}]

    def excess() -> list[int]:
        return [int(mask[indices].sum()) - k for indices, k in budget]

    while sum(excess()) > 0:
        left, pruned = excess(), []
        on = torch.nonzero(mask).flatten()
        for head in on[torch.argsort(scores[on], stable=True)].tolist():
            if left[group_of[head]] > 0:
                pruned.append(head)
                left[group_of[head]] -= 1
                if len(pruned) == step:
                    break
        mask[pruned] = 0.0
        curve.append({"heads": int(mask.sum()), "pruned_now": pruned, "mask": mask.clone(),
                      "metrics": evaluate(mask)})
        if exact and sum(excess()) > 0:
            scores = importance(mask)
    return curve


def score(run, mask: torch.Tensor):
    """The scorer of the driver (`headprune.selection`): importance under `mask`,
    normalised per layer or not (--michel-normalize)."""
    gates = run.gates
    raw = head_importance(run.model, gates, run.progress("importance"), mask.to(gates.fixed_mask.device),
                          reduce=run.reduce, loss_fn=run.loss_fn, record=run.record(mask))
    sizes = [site.num_heads for site in gates.sites]
    return Scores(normalize_importance(raw, sizes, per_layer=run.cfg.michel_normalize == "layer"))
