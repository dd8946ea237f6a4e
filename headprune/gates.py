"""Head gates: one multiplier per attention head, on current transformers (no `head_mask`).

The gate of a head scales that head's slice of the context just before the attention output
projection, which is what transformers 4.x `head_mask` did (the projection's bias is untouched).
With `fill` set (`--ablation mean`) a closed gate leaves the slice's mean instead of zero.
A forward pre-hook on each output projection applies it; a forward pre-hook on the whole model
computes the mask once per model forward, so every site of one pass sees the same sample and
activation checkpointing does not re-sample.

`HeadGates` is attached as a submodule of the model (`model.head_gates`) so that DDP and
Accelerate wrap and synchronise the pruning parameters with the rest of the model. What the mask
is comes from a *selector* (a pruning method, see `headprune.methods`); without one the gates
hold a fixed mask (all ones unless set).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from .sites import AttentionSite, find_sites, unpruned_attention

log = logging.getLogger("headprune")

ATTRIBUTE = "head_gates"

Head = tuple[str, int, int]  # (kind, layer, head)


class HeadGates(nn.Module):
    def __init__(self, sites: list[AttentionSite]):
        super().__init__()
        self.sites = sites  # a plain list: the attention modules stay registered in the model only
        self.offsets = []
        total = 0
        for site in sites:
            self.offsets.append(total)
            total += site.num_heads
        self.num_heads = total
        self.selector: nn.Module | None = None
        self.register_buffer("fixed_mask", torch.ones(total), persistent=False)
        self._mask: torch.Tensor | None = None  # the mask of the forward pass in progress
        self._forwards = 0  # model forward passes in progress (0: a module run on its own, as generate runs the encoder)
        self._override: torch.Tensor | None = None
        self._handles: list = []
        # per site, what a closed gate leaves in its heads' place (each context channel's mean), or None: zero
        self.fill: list[torch.Tensor] | None = None

    @property
    def heads(self) -> list[Head]:
        """Address of every gate, in gate order."""
        return [(s.kind, s.layer, h) for s in self.sites for h in range(s.num_heads)]

    def forward(self) -> torch.Tensor:
        """The mask for one model forward pass: one value per head."""
        if self._override is not None:
            return self._override
        if self.selector is not None:
            return self.selector()
        return self.fixed_mask

    def set_mask(self, mask: torch.Tensor) -> None:
        if self.selector is not None:
            raise RuntimeError("these gates are driven by a selector; remove it to set a fixed mask")
        self.fixed_mask.copy_(self._checked(torch.as_tensor(mask, dtype=self.fixed_mask.dtype)))

    def _checked(self, mask: torch.Tensor) -> torch.Tensor:
        """A mask of one value per gate (a longer or shorter one would broadcast into the wrong heads)."""
        if mask.shape != (self.num_heads,):
            raise ValueError(f"a mask of shape {tuple(mask.shape)} for {self.num_heads} gates: give one value per gate")
        return mask

    @contextmanager
    def override(self, mask: torch.Tensor):
        """Use `mask` instead of the selector's inside the block (e.g. all ones: the unpruned model)."""
        mask = self._checked(torch.as_tensor(mask, device=self.fixed_mask.device))
        before = self._override  # blocks nest: the outer mask is back after the inner block
        # keep a float mask's dtype (and its graph: Michel's importance differentiates through it)
        self._override = mask if mask.is_floating_point() else mask.to(self.fixed_mask.dtype)
        try:
            yield
        finally:
            self._override = before

    @contextmanager
    def filled(self, fill: list[torch.Tensor] | None):
        """Use `fill` (None: zero) for the closed gates inside the block."""
        before, self.fill = self.fill, fill
        try:
            yield
        finally:
            self.fill = before

    def kept_heads(self, mask: torch.Tensor | None = None) -> list[Head]:
        """The heads whose gates are open in `mask`; without one, in the selector's choice as
        evaluation makes it (its hard top-k, no noise) or, with no selector, in the fixed mask."""
        if mask is None:
            mask = self.fixed_mask if self.selector is None else self.selector_choice()
        return [head for head, m in zip(self.heads, mask.tolist()) if m > 0]

    def selector_choice(self) -> torch.Tensor:
        """The selector's evaluation mask, whatever mode it is in (its mode is left as it was)."""
        training = self.selector.training
        self.selector.eval()
        try:
            with torch.no_grad():
                return self.selector().detach().cpu()
        finally:
            self.selector.train(training)

    # -- hooks --------------------------------------------------------------------------------

    def _refresh(self, module, args, kwargs=None):
        self._forwards += 1
        self._mask = self()

    def _leave(self, module, args, output):
        self._forwards = max(0, self._forwards - 1)

    def _refresh_outside_forward(self, module, args):
        """generate() runs an encoder-decoder's encoder on its own, before the model's first forward:
        it gets the mask of now, not the one the last forward pass left (a training step's sample, the
        previous evaluation's heads). Inside a model forward the mask is left as drawn for the pass."""
        if self._forwards == 0:
            self._mask = self()

    def _site_hook(self, index: int, offset: int, site: AttentionSite):
        def scale_heads(module, args):
            if site.num_heads == 0:  # a dead head kept for the cache: its output is zero already
                return None
            if self._mask is None:  # a site called outside a model forward
                self._mask = self()
            context = args[0]
            # (to the context's device too: a model split over GPUs has its layers on several)
            gate = site.query_gate(self._mask[offset:offset + site.num_heads].to(context.device, context.dtype))
            heads = context.unflatten(-1, (site.query_heads, site.head_dim))
            gated = heads * gate[:, None]
            if self.fill is not None:  # mean ablation: a closed head gives its mean output, not zero
                fill = self.fill[index].to(context.device, context.dtype).view(site.query_heads, -1)
                gated = gated + (1 - gate[:, None]) * fill
            return (gated.flatten(-2), *args[1:])
        return scale_heads

    def register_hooks(self, model: nn.Module) -> None:
        self._handles.append(model.register_forward_pre_hook(self._refresh))
        self._handles.append(model.register_forward_hook(self._leave, always_call=True))
        encoder = model.get_encoder() if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else None
        if encoder is not None and encoder is not model:
            self._handles.append(encoder.register_forward_pre_hook(self._refresh_outside_forward))
        for index, (offset, site) in enumerate(zip(self.offsets, self.sites)):
            self._handles.append(site.output.register_forward_pre_hook(self._site_hook(index, offset, site)))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._mask, self._forwards = None, 0


def attach_gates(model: nn.Module, unit: str = "group") -> HeadGates:
    """Find the attention heads of `model`, register a gate on each and return the gates. With
    grouped-query attention a gate prunes a key/value group (`unit="group"`) or a query position
    of every group of its layer (`unit="query"`); see `headprune.sites`.

    Raises UnsupportedArchitectureError, naming the supported ones, for any other model.
    """
    if hasattr(model, ATTRIBUTE):
        raise RuntimeError("this model already has head gates; call detach_gates first")
    gates = HeadGates(find_sites(model, unit))
    whole = unpruned_attention(model, gates.sites)
    if whole:
        log.warning("no layout reads the heads of %s: they are kept whole", ", ".join(whole))
    param = next(model.parameters(), None)
    if param is not None:
        gates.to(param.device)
    model.add_module(ATTRIBUTE, gates)
    gates.register_hooks(model)
    return gates


def detach_gates(model: nn.Module) -> HeadGates:
    """Remove the gates (hooks and submodule) and return them; the model is plain again."""
    if not hasattr(model, ATTRIBUTE):
        raise ValueError("this model has no head gates to detach")
    gates = getattr(model, ATTRIBUTE)
    gates.remove_hooks()
    delattr(model, ATTRIBUTE)
    return gates


def get_gates(model: nn.Module) -> HeadGates:
    model = getattr(model, "module", model)  # unwrap DDP
    return getattr(model, ATTRIBUTE)
