"""Reconstruction after selection, without retraining (`--reconstruct`).

Once a method has chosen the heads, each attention block's output is brought back towards the
unpruned model's on calibration data, and the correction is folded into the output projection's
weights and bias: the saved model is a plain pruned model, and gates at the mask on the folded
weights give exactly its outputs.

- `rescale` (Kwon et al. 2022, mask tuning): block by block, in the order the model runs them,
  one scale per kept head (or KV group), fitted by least squares so that the block's output in
  the pruned model (its inputs carry the earlier blocks' pruning and scales) matches the unpruned
  model's output on the same tokens. A scale multiplies the head's columns of the output projection.
- `bias` (An et al. 2024, FLAP's bias compensation): the mean contribution of the removed heads
  over the calibration tokens, measured on the unpruned model, is added to the output
  projection's bias (a bias is added where the architecture has none).
- `both`: the scales and a bias per block fitted together (least squares with one intercept per
  output), on rescale's inputs. With the scales held at 1 and the unpruned model's inputs the
  intercept is FLAP's compensation.

Where this differs from the references (docs/methods.md): the target is the block's output, not
Kwon's output plus the drift of the residual stream (the residual is not the input of a module
every layout has); the teacher is the unpruned model (Kwon's code uses one pruned to the square
root of the budget); every block from the first that lost a head on is tuned, that first one
too (Kwon's code never tunes the first layer); a block whose fit fails or gives a scale beyond
+-10 keeps scales of 1 (Kwon's code stops tuning at that block and every later one). A block's
"before" error is at scales 1 on its inputs in the tuned model (the blocks before it already
tuned), the error its own fit starts from. Each block's fit is handed to `on_block` as it is made
(the command line keeps it in the cache: `read_fits`, `keep_fits`), so that a stopped fit goes on
from the first block not fitted.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager

import torch

from .methods.flap import flap_statistics
from .methods.scoring import is_decoder_only, token_mask, unit_channels
from .outputs import atomic_path, drop_oldest
from .pruning import add_output_biases
from .progress import progress_bar
from .sites import weight_out_in

log = logging.getLogger(__name__)

MODES = ("none", "rescale", "bias", "both")
MAX_SCALE = 10.0  # Kwon et al.: a larger scale means the fit went wrong


class _Reached(Exception):
    """Stops a forward pass at the block of interest: the blocks after it do not matter."""


def reconstruct(model, gates, mask: torch.Tensor, batches, loss_fn, mode: str, reduce=None, disable_progress=False,
                means: list[torch.Tensor] | None = None, done: dict | None = None, on_block=None) -> dict:
    """Fit `mode`'s correction for the heads `mask` keeps on `batches` (a re-iterable loader),
    fold it into the model's output projections and return what to record. `loss_fn(model, batch)`
    runs a forward pass; `reduce` sums a tensor over processes; `means`: the unpruned model's
    `mean_contexts` on these batches if already measured (mean ablation), for `bias`; `done` and
    `on_block`: see `fit_blocks` (rescale, both)."""
    if mode not in MODES[1:]:
        raise ValueError(f"reconstruct {mode!r}: choose one of {', '.join(MODES[1:])}")
    model.eval()
    mask = mask.detach().double().cpu()
    if mode == "bias":
        shifts = flap_shifts(model, gates, mask, batches, loss_fn, reduce, means, disable_progress)
        fold(gates, mask, mask, shifts)
        return {"reconstruct": mode, "reconstruction_passes": 0 if means is not None else 1}
    scales, shifts, errors, passes = fit_blocks(model, gates, mask, batches, loss_fn, intercept=mode == "both",
                                                reduce=reduce, disable_progress=disable_progress, done=done,
                                                on_block=on_block)
    fold(gates, mask, scales, shifts if mode == "both" else {})
    return {"reconstruct": mode, "reconstruction_passes": passes, "reconstruction_error": errors}


FITS_KEPT = 50  # reconstructions' fits in the cache (the newest): kB, or MB with `both` on a large model


def read_fits(path) -> dict | None:
    """The fits per block that an interrupted reconstruction kept (`fit_blocks`' `done`), None where
    there are none or they are damaged (fitted again)."""
    try:
        fits = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None

    def numbers(values) -> bool:
        return isinstance(values, list) and all(isinstance(v, (int, float)) for v in values)

    def whole(fit) -> bool:
        return isinstance(fit, dict) and "scales" in fit and (fit["scales"] is None or (
            numbers(fit["scales"]) and (fit.get("shift") is None or numbers(fit["shift"]))
            and isinstance(fit.get("error"), dict) and numbers([fit["error"].get("before"), fit["error"].get("after")])))
    return fits if isinstance(fits, dict) and all(whole(fit) for fit in fits.values()) else None


def keep_fits(path, fits: dict) -> None:
    """`fit_blocks`' `on_block`: the fits so far into the cache (compact JSON: with `both`, a shift per
    block is the model's width in numbers); one that cannot be written only costs time after a stop."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(fits))
        drop_oldest(path.parent, keep=FITS_KEPT, pattern="*.json")
    except OSError as err:
        log.info("cannot write the reconstruction cache %s: %s", path, err)


def mean_contexts(model, gates, batches, loss_fn, reduce=None, disable_progress=False) -> list[torch.Tensor]:
    """Per block, the mean of each input channel of its output projection over the unpruned
    model's real tokens (what FLAP's compensation puts in place of a removed head)."""
    bar = progress_bar(batches, desc="mean contexts", leave=False, disable=disable_progress)
    with gates.override(torch.ones(gates.num_heads)):
        means, _ = flap_statistics(model, gates, bar, loss_fn, reduce)
    return means


def flap_shifts(model, gates, mask, batches, loss_fn, reduce=None, means=None,
                disable_progress=False) -> dict[int, torch.Tensor]:
    """FLAP: per block, W_o[:, removed] @ mean(x[removed]) over the unpruned model's tokens."""
    if means is None:
        means = mean_contexts(model, gates, batches, loss_fn, reduce, disable_progress)
    shifts = {}
    for i, (offset, site, mean) in enumerate(zip(gates.offsets, gates.sites, means)):
        removed = [c for u in range(site.num_heads) if mask[offset + u] == 0 for c in unit_channels(site, u)]
        if removed:
            weight = weight_out_in(site.output).detach().double().cpu()
            shifts[i] = weight[:, removed] @ mean[removed]
    return shifts


def run_order(model, gates, batch, loss_fn) -> list[int]:
    """The blocks' indices in the order a forward pass runs them (encoder before decoder; a
    decoder layer's self-attention before its cross-attention)."""
    order: list[int] = []

    def hook_for(i):
        def hook(module, args):
            if i not in order:
                order.append(i)
        return hook

    handles = [site.output.register_forward_pre_hook(hook_for(i)) for i, site in enumerate(gates.sites)]
    try:
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return order + [i for i in range(len(gates.sites)) if i not in order]


@contextmanager
def _shifted(gates, shifts: dict[int, torch.Tensor]):
    """Add the fitted biases of the blocks done so far to their outputs (the pruned model's passes)."""
    def hook_for(shift):
        def hook(module, args, output):
            return output + shift.to(output.dtype)
        return hook
    handles = [gates.sites[i].output.register_forward_hook(hook_for(shift.to(gates.sites[i].output.weight.device)))
               for i, shift in shifts.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def context_at(model, gates, index: int, batch, loss_fn, gate_values) -> torch.Tensor:
    """The input of block `index`'s output projection (the gated contexts) on `batch`, with the
    gates at `gate_values`; the pass stops there."""
    site, seen = gates.sites[index], {}

    def hook(module, args):
        seen["x"] = args[0].detach()
        raise _Reached

    handle = site.output.register_forward_pre_hook(hook)  # after the gates' hook: the context is gated
    try:
        with gates.override(gate_values), torch.no_grad():
            loss_fn(model, batch)
    except _Reached:
        pass
    finally:
        handle.remove()
    if "x" not in seen:
        raise RuntimeError(f"a forward pass did not reach the {site.kind} attention of layer {site.layer}")
    return seen["x"]


def fit_blocks(model, gates, mask, batches, loss_fn, intercept: bool, reduce=None, disable_progress=False,
               done: dict | None = None, on_block=None):
    """Least squares, block by block: returns the gate values with the kept heads' scales, the
    intercepts (block index -> bias shift; empty without `intercept`), each block's relative
    error before and after, and the passes over the data it took. `done`: what an interrupted fit of
    the same heads on the same data found per block (`on_block(done)` is called after each block),
    taken as it is."""
    scales, shifts, errors, passes = mask.clone(), {}, [], 0
    done = {} if done is None else done
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("reconstruction needs calibration data: the calibration set is empty")
    order, drifted = run_order(model, gates, first, loss_fn), False
    for i in progress_bar(order, desc="reconstruct", leave=False, disable=disable_progress):
        site, offset = gates.sites[i], gates.offsets[i]
        kept = [u for u in range(site.num_heads) if mask[offset + u] > 0]
        if site.num_heads == 0 or (len(kept) == site.num_heads and not drifted):
            continue  # nothing removed before or here: the block's output is the unpruned one already
        # the blocks after this one are tuned too, those that lost no head as well (as Kwon's code does)
        untouched, drifted = len(kept) == site.num_heads, True
        if not kept and not intercept:  # no scale to fit: the block gives nothing, its error stays all of it
            errors.append({"kind": site.kind, "layer": site.layer, "before": 1.0, "after": 1.0})
            continue
        if str(i) in done:  # fitted before the interruption
            found = done[str(i)]
            passes += 2
            if found["scales"] is not None:
                for u, value in zip(kept, found["scales"]):
                    scales[offset + u] = value
                if found.get("shift") is not None:
                    shifts[i] = torch.tensor(found["shift"], dtype=torch.float64)
                errors.append({"kind": site.kind, "layer": site.layer, **found["error"]})
            continue
        sums = block_sums(model, gates, i, kept, batches, loss_fn, scales, shifts, reduce)
        passes += 2  # the unpruned and the pruned model, each stopped at the block
        s, beta, before, after = solve(sums, intercept)
        if untouched and before <= 1e-9 * float(sums["bb"]):
            done[str(i)] = {"scales": None}
            if on_block:
                on_block(done)
            continue  # its inputs did not drift after all (a decoder's first self-attention after an encoder's pruning)
        if not (torch.isfinite(s).all() and (s.abs() <= MAX_SCALE).all() and after <= before):
            log.warning("reconstruct: the fit of the %s attention of layer %d failed (scales %s): its "
                        "scales stay 1", site.kind, site.layer, [round(v, 3) for v in s.tolist()])
            s = torch.ones(len(kept), dtype=torch.float64)
            beta = (sums["target"] - sums["feature"].T @ s) / sums["n"] if intercept else None
            after = error_of(sums, s, beta)
        for u, value in zip(kept, s.tolist()):
            scales[offset + u] = value
        if intercept:
            shifts[i] = beta
        total = float(sums["bb"]) or 1.0
        errors.append({"kind": site.kind, "layer": site.layer, "before": before / total, "after": after / total})
        done[str(i)] = {"scales": s.tolist(), "shift": beta.tolist() if intercept else None,
                        "error": {"before": before / total, "after": after / total}}
        if on_block:
            on_block(done)
        log.info("reconstruct %s attention of layer %d: relative error %.4g -> %.4g", site.kind, site.layer,
                 before / total, after / total)
    return scales, shifts, errors, passes


def block_sums(model, gates, i, kept, batches, loss_fn, scales, shifts, reduce=None) -> dict[str, torch.Tensor]:
    """The sums the fit needs over every real token: feature u is kept unit u's part of the
    block's output in the pruned model (W_u x_S,u), the target the unpruned model's whole output
    (W x_T; the bias left out: it is on both sides). Only the second moments of the contexts are
    accumulated (input width squared, whatever the number of tokens); the sums over outputs
    follow from them and W^T W."""
    site = gates.sites[i]
    weight = weight_out_in(site.output).detach().double()
    width = weight.shape[1]
    moments = {name: torch.zeros(width, width, dtype=torch.float64, device=weight.device) for name in ("SS", "ST", "TT")}
    moments.update({name: torch.zeros(width, dtype=torch.float64, device=weight.device) for name in ("S", "T")})
    moments["n"] = torch.zeros((), dtype=torch.float64, device=weight.device)
    everything = torch.ones(gates.num_heads)
    decoder_only = is_decoder_only(gates)
    for batch in batches:
        teacher = context_at(model, gates, i, batch, loss_fn, everything)
        with _shifted(gates, shifts):
            student = context_at(model, gates, i, batch, loss_fn, scales)
        tokens = token_mask(batch, site.kind, teacher.shape[1], decoder_only)
        teacher, student = (x.flatten(0, 1) if tokens is None else x[tokens] for x in (teacher, student))
        teacher, student = teacher.double(), student.double()
        moments["SS"] += student.T @ student
        moments["ST"] += student.T @ teacher
        moments["TT"] += teacher.T @ teacher
        moments["S"] += student.sum(0)
        moments["T"] += teacher.sum(0)
        moments["n"] += teacher.shape[0]
    if reduce is not None:
        moments = {name: reduce(value).to(weight.device) for name, value in moments.items()}
    gram = weight.T @ weight  # <W_i x_i, W_j x_j> summed over outputs = gram_ij x_i x_j
    channels = [torch.tensor(unit_channels(site, u), device=weight.device) for u in kept]
    k = len(kept)
    # G[a, b] = sum over a's channels i and b's channels j of gram_ij SS_ij; c[a] = sum over a's i and
    # all j of gram_ij ST_ij: products with `units`, each channel's unit one-hot (no per-entry wait on a GPU)
    units = torch.zeros(weight.shape[1], k, dtype=torch.float64, device=weight.device)
    for a, ca in enumerate(channels):
        units[ca, a] = 1.0
    sums = {"G": (units.T @ (gram * moments["SS"]) @ units).cpu(),
            "c": (units.T @ (gram * moments["ST"]).sum(1)).cpu()}
    sums["feature"] = torch.stack([weight[:, ch] @ moments["S"][ch] for ch in channels]).cpu() if k else \
        torch.zeros(0, weight.shape[0], dtype=torch.float64)
    sums["target"] = (weight @ moments["T"]).cpu()
    sums["bb"] = (gram * moments["TT"]).sum().cpu()
    sums["n"] = moments["n"].cpu()
    return sums


def error_of(sums, s, beta=None) -> float:
    """sum over tokens of |target - sum_u s_u feature_u - beta|^2, from the sums."""
    err = sums["bb"] - 2 * s @ sums["c"] + s @ sums["G"] @ s
    if beta is not None:
        err = err - 2 * beta @ sums["target"] + 2 * beta @ (sums["feature"].T @ s) + sums["n"] * beta @ beta
    return float(err)


def solve(sums, intercept: bool):
    """The scales (and intercept) of least error, parametrised around 1 as Kwon et al. do, with a
    tiny damping towards 1 so that a head whose output is zero keeps its scale. Returns the scales,
    the intercept (None without), and the error with scales 1 (no intercept) and after."""
    G, c, n = sums["G"], sums["c"], sums["n"].clamp(min=1)
    k = len(c)
    ones = torch.ones(k, dtype=torch.float64)
    before = error_of(sums, ones)
    if intercept:  # the intercept of least error for given scales is the mean residual: centre
        G = G - sums["feature"] @ sums["feature"].T / n
        c = c - sums["feature"] @ sums["target"] / n
    s = ones
    if k:
        damp = 1e-9 * float(G.diagonal().abs().mean()) + 1e-30
        try:
            s = ones + torch.linalg.solve(G + damp * torch.eye(k, dtype=G.dtype), c - G @ ones)
        except RuntimeError:  # singular beyond the damping
            s = torch.full((k,), float("nan"), dtype=torch.float64)
    beta = (sums["target"] - sums["feature"].T @ s) / n if intercept else None
    after = error_of(sums, s, beta) if torch.isfinite(s).all() else float("inf")
    return s, beta, before, after


@torch.no_grad()
def fold(gates, mask, scales, shifts: dict[int, torch.Tensor]) -> None:
    """Scale the kept units' columns of each output projection and add the bias shifts: the model
    with gates at `mask` (0 or 1) then computes what it computed with gates at `scales` plus the shifts."""
    if shifts:
        add_output_biases(gates.sites)
    for i, (offset, site) in enumerate(zip(gates.offsets, gates.sites)):
        weight = weight_out_in(site.output)  # a view: scaling it scales the weight
        for u in range(site.num_heads):
            if mask[offset + u] > 0 and scales[offset + u] != 1:
                weight[:, unit_channels(site, u)] *= float(scales[offset + u])
        if i in shifts:
            site.output.bias += shifts[i].to(site.output.bias.dtype).to(site.output.bias.device)
