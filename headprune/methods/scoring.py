"""Scored methods: one score per head (or KV group) from calibration data, then the top k.

A *scorer* is a function `score(run, mask) -> Scores` in the method's file; the driver
(`headprune.selection.choose_by_scores`) gives it the calibration data (the training split, or
its first --calibration-examples) in `run` and keeps the top k (or k_g of each group with
--k-per-kind); Michel et al. is scored again after each round of its loop. The helpers here are
what the activation-based scorers share.

What the activation-based scorers read is the input of each attention block's output
projection: the heads' contexts, concatenated head-major, after the gates. `observe_calibration`
hands them over with a mask of the tokens that count (padding left out).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..outputs import atomic_path
from ..sites import in_features

log = logging.getLogger("headprune")

RECORD_EVERY = 60.0  # seconds between two records of a pass's sums (a pass stopped midway goes on from the last)


@dataclass
class Scores:
    """A scorer's answer: one value per gate (higher: more important) and, optionally, the
    method's own step after the top k (Kwon et al.'s rearrangement)."""
    values: torch.Tensor
    refine: Callable[[torch.Tensor], torch.Tensor] | None = None


class PassRecord:
    """What a pass over the calibration batches has summed so far, kept in `path` (safetensors) every
    RECORD_EVERY seconds: the same run started again after an interruption skips the batches summed
    and goes on from their sums, to the same scores. One process only (with several, each holds a
    part); removed once the pass is whole."""

    def __init__(self, path: Path):
        self.path, self.last = path, time.monotonic()

    def read(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(batches summed, the sums), or None: none kept, or damaged (the pass starts over)."""
        try:
            kept = load_file(self.path) if self.path.is_file() else None
        except (OSError, SafetensorError):
            return None
        if not kept or "batches" not in kept:
            return None
        batches = int(kept.pop("batches"))
        log.info("a pass stopped midway summed %d calibration batches: going on from them (%s)", batches, self.path)
        return batches, kept

    def save(self, batches: int, sums: Callable[[], dict[str, torch.Tensor]]) -> None:
        if time.monotonic() - self.last < RECORD_EVERY:
            return
        tensors = {name: t.detach().cpu().contiguous() for name, t in sums().items()}
        tensors["batches"] = torch.tensor(batches)
        try:
            with atomic_path(self.path) as tmp:
                save_file(tensors, str(tmp))
        except OSError as err:  # the pass goes on without its record
            log.info("cannot keep the pass's sums in %s: %s", self.path, err)
        self.last = time.monotonic()

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def token_mask(batch: dict, kind: str, length: int, decoder_only: bool = False) -> torch.Tensor | None:
    """Which of the `length` positions of a site of `kind` are real tokens (batch x length, bool):
    encoder sites, and every site of a `decoder_only` model, read the attention mask (a prompt's
    tokens are real though their labels may be -100); an encoder-decoder's decoder and cross sites
    the target positions with a label; None where the batch does not say (every position counts)."""
    if kind == "encoder" or decoder_only or "labels" not in batch or batch["labels"].dim() != 2:
        mask = batch.get("attention_mask")
    else:
        mask = batch["labels"] != -100
    if mask is None or mask.shape[-1] != length:
        return None
    return mask.bool()


def is_decoder_only(gates) -> bool:
    """A model whose every attention site is a decoder's self-attention (no encoder, no cross)."""
    return all(site.kind == "decoder" for site in gates.sites)


def unit_channels(site, unit: int) -> list[int]:
    """The output projection's input channels that belong to one unit (head or KV group) of a site."""
    return site.own_rows(site.query_heads_of([unit]))


def per_unit(gates, channel_scores: list[torch.Tensor], combine: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One score per gate from per-channel scores of each site: `combine` of the unit's channels."""
    out = []
    for site, scores in zip(gates.sites, channel_scores):
        out.extend(float(combine(scores[unit_channels(site, u)])) for u in range(site.num_heads))
    return torch.tensor(out, dtype=torch.float64)


def observe_calibration(model, gates, batches, loss_fn, on_context: Callable, skip: int = 0,
                        after_batch: Callable[[int], None] | None = None) -> None:
    """Forward passes only (evaluation mode: dropout off; no gradient) over every batch but the
    first `skip`; each site's output projection calls `on_context(site_index, x, tokens)` with its
    input `x` (batch x length x heads*head_dim) and the bool mask of its real tokens (or None);
    `after_batch(batches so far)` after each."""
    current: dict = {}
    decoder_only = is_decoder_only(gates)

    def hook_for(index, site):
        def hook(module, args):
            x = args[0]
            on_context(index, x.detach(), token_mask(current["batch"], site.kind, x.shape[1], decoder_only))
        return hook

    # registered after the gates' own hooks, so the contexts are already gated
    handles = [site.output.register_forward_pre_hook(hook_for(i, site)) for i, site in enumerate(gates.sites)]
    model.eval()
    try:
        with torch.no_grad():
            for done, batch in enumerate(batches, start=1):
                if done <= skip:  # summed before the pass was stopped
                    continue
                current["batch"] = batch
                loss_fn(model, batch)
                if after_batch is not None:
                    after_batch(done)
    finally:
        for handle in handles:
            handle.remove()


def channel_moments(model, gates, batches, loss_fn, rows_of: Callable, reduce=None, record: PassRecord | None = None):
    """Per site, over the calibration data: the count, sum and sum of squares of each input
    channel of the output projection, over the rows `rows_of(x, tokens)` makes of each context
    (tokens, or one row per sequence). `reduce` sums them over processes; `record` keeps them as
    they grow (a pass stopped midway goes on)."""
    n = len(gates.sites)
    sums, squares = [None] * n, [None] * n  # on the model's device until the end: no sync per batch
    counts = torch.zeros(n, dtype=torch.float64)
    skip, kept = (record.read() if record is not None else None) or (0, {})
    device = gates.fixed_mask.device
    for i in range(n):
        if f"sums.{i}" in kept:
            sums[i], squares[i] = kept[f"sums.{i}"].to(device), kept[f"squares.{i}"].to(device)
    counts = kept.get("counts", counts)

    def state():
        named = {"counts": counts}
        for i in range(n):
            if sums[i] is not None:
                named.update({f"sums.{i}": sums[i], f"squares.{i}": squares[i]})
        return named

    def on_context(i, x, tokens):
        rows = rows_of(x.double(), tokens)
        sums[i] = rows.sum(0) if sums[i] is None else sums[i] + rows.sum(0)
        squares[i] = rows.pow(2).sum(0) if squares[i] is None else squares[i] + rows.pow(2).sum(0)
        counts[i] += rows.shape[0]

    observe_calibration(model, gates, batches, loss_fn, on_context, skip,
                        after_batch=None if record is None else lambda done: record.save(done, state))
    if record is not None:
        record.done()
    zeros = [torch.zeros(in_features(site.output), dtype=torch.float64) for site in gates.sites]
    sums = [z if t is None else t.cpu() for z, t in zip(zeros, sums)]
    squares = [z if t is None else t.cpu() for z, t in zip(zeros, squares)]
    if reduce is not None:
        sums, squares, counts = [reduce(s) for s in sums], [reduce(s) for s in squares], reduce(counts)
    return [(max(c, 1.0), s, q) for c, s, q in zip(counts.tolist(), sums, squares)]
