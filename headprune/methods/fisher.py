"""Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers": the diagonal Fisher
information of the head masks ranks the heads; then, in each layer, the heads it prunes are chosen
again with the block-diagonal Fisher (how the pruned heads' gradients add up, not only their sizes).

As the reference code (WoosukKwon/retraining-free-pruning, prune/fisher.py and rearrange.py): g_b is
the gradient of batch b's mean loss with respect to a mask of ones, F_h = sum_b g_b,h^2; the
rearrangement keeps each layer's number of pruned heads and greedily swaps which ones, minimising
|| sum_{h pruned} g_h ||^2 over the batches' gradient vectors g_h = (g_1,h, ..., g_B,h). Kwon et al.
prune heads and feed-forward neurons under one FLOPs budget; headprune prunes heads to k.
"""

from __future__ import annotations

import torch

from .michel import mask_gradients
from .scoring import Scores


def fisher_gradients(model, gates, batches, loss_fn=None, gather=None, record=None) -> torch.Tensor:
    """The batches' mask gradients at every head on (batches x heads), from every process
    (`gather`, e.g. `accelerator.gather`, stacks them); `record`: see `mask_gradients`."""
    grads, _ = mask_gradients(model, gates, batches, torch.ones(gates.num_heads, device=gates.fixed_mask.device),
                              loss_fn, record)
    return (gather(grads) if gather is not None else grads).cpu()


def fisher_scores(grads: torch.Tensor) -> torch.Tensor:
    """Diagonal Fisher per head: the sum over batches of the squared mask gradient."""
    return grads.pow(2).sum(0)


def rearrange(mask: torch.Tensor, grads: torch.Tensor, layers: list[list[int]]) -> torch.Tensor:
    """Kwon et al.'s mask rearrangement: in each layer (a list of gate indices) the same number of
    heads stays pruned, chosen greedily: start from the lowest diagonal Fisher, then for each other
    head (lowest Fisher first) add it to the pruned set and drop the member whose removal leaves
    the smallest || sum of the set's gradient vectors ||^2."""
    mask = mask.clone()
    for layer in layers:
        index = torch.tensor(layer, dtype=torch.long)  # a layer pruned empty before has no gates
        pruned_count = int((mask[index] == 0).sum())
        if pruned_count in (0, len(layer)):
            continue
        g = grads[:, index].T.double()  # heads of the layer x batches
        order = torch.argsort(g.pow(2).sum(1), stable=True).tolist()
        pruned = order[:pruned_count]
        for head in order[pruned_count:]:
            pruned.append(head)
            total = g[pruned].sum(0)
            costs = torch.stack([(total - g[p]).pow(2).sum() for p in pruned])
            del pruned[int(torch.argmin(costs))]
        mask[index] = 1.0
        mask[index[pruned]] = 0.0
    return mask


def score(run, mask: torch.Tensor):
    """The scorer of the driver (`headprune.selection`): the diagonal Fisher, and the rearrangement per layer
    (unless --no-fisher-rearrange) as the step after the top k."""
    gates = run.gates
    grads = run.cached(lambda: fisher_gradients(run.model, gates, run.progress("fisher scores"), run.loss_fn,
                                                gather=run.gather, record=run.record()))
    layers = [list(range(offset, offset + site.num_heads)) for offset, site in zip(gates.offsets, gates.sites)]
    return Scores(fisher_scores(grads), refine=(lambda m: rearrange(m, grads, layers)) if run.cfg.fisher_rearrange else None)
