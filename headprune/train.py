"""The training loop shared by every recipe: Accelerate over a plain PyTorch loop, a data order
fixed by (seed, epoch), atomic checkpoints with optimiser and scheduler state, and resumption that
reaches the same result as an uninterrupted run.

Randomness: before each step the global torch RNG (dropout) is seeded from (seed, step, process),
and the selectors draw their noise from generators seeded from (seed, step); the caller's RNG
state is restored when the loop ends. So a run's result depends only on its seed, whatever ran
before it in the process or between its steps (evaluation), and a resumed run needs no RNG state.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Sampler

from .checkpoint import read_checkpoint, write_checkpoint
from .errors import CheckpointError, ConfigError, TrainingDivergedError
from .outputs import checkpoint_folder
from .progress import progress_bar
from .randomness import derive_seed

log = logging.getLogger("headprune")

# Test hook: SIGKILL the process right after this training step (and its checkpoint, if one is
# due), as a crash or an impatient user would.
KILL_AT_STEP = "HEADPRUNE_KILL_AT_STEP"


class EpochOrder(Sampler):
    """A permutation that depends only on (seed, epoch), the same on every process, so that a
    resumed run sees exactly the batches it would have seen."""

    def __init__(self, n: int, seed: int, epoch: int):
        self.n, self.seed, self.epoch = n, seed, epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


# A step is "live" when the head scores' gradient norm is above this. Adam (eps 1e-8) turns any
# gradient well above its eps into a step of about the learning rate, so the size of a gradient
# matters little, its vanishing does: a soft top-k at a temperature far below the gaps between
# scores (the reference's 1e-8) passes gradients of 1e-10 and less. (Not relative to the run's
# largest: near-ties at a low temperature give rare spikes thousands of times the usual size.)
LIVE_GRADIENT = 1e-6


def linear_decay(total_steps: int, warmup_steps: int = 0):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def explore_then_select(total_steps: int, select_step: int, select_factor: float):
    """Linear decay from 1 to 0 over the first `select_step` steps, then a jump to `select_factor`
    decaying linearly to 0 at `total_steps`: two phases with their own rate."""
    def factor(step: int) -> float:
        if step < select_step:
            return (select_step - step) / select_step
        return max(0.0, select_factor * (total_steps - step) / max(1, total_steps - select_step))
    return factor


def constant_until(total_steps: int):
    """A rate factor of 1 up to `total_steps`, then 0 (Adam's momentum cannot move anything on)."""
    def factor(step: int) -> float:
        return float(step < total_steps)
    return factor


class TokenBatches(Sampler):
    """Batches of at most `max_tokens` tokens (sentences x the longest of them, as fairseq's
    --max-tokens counts), of similar lengths: sorted by length (ties in an order fixed by (seed,
    epoch)), cut greedily, the batches shuffled by (seed, epoch). The number of batches is the
    same in every epoch."""

    def __init__(self, lengths: list[int], max_tokens: int, seed: int, epoch: int):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        tie = torch.randperm(len(lengths), generator=g).tolist()
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tie[i]))
        self.batches, current, longest = [], [], 0
        for i in order:
            if current and max(longest, lengths[i]) * (len(current) + 1) > max_tokens:
                self.batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, lengths[i])
        if current:
            self.batches.append(current)
        self.batches = [self.batches[j] for j in torch.randperm(len(self.batches), generator=g).tolist()]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def token_batching(cfg) -> bool:
    return bool(getattr(cfg, "max_tokens", None))


def epoch_loader(cfg, train_set, collate, epoch: int) -> DataLoader:
    """One epoch's batches: `--batch-size` examples in an order fixed by (seed, epoch), or with
    `--max-tokens` batches by token count (the dataset's `length` column)."""
    if token_batching(cfg):
        sampler = TokenBatches(list(train_set["length"]), cfg.max_tokens, cfg.seed, epoch)
        return DataLoader(train_set, batch_sampler=sampler, collate_fn=collate)
    return DataLoader(train_set, batch_size=cfg.batch_size, collate_fn=collate,
                      sampler=EpochOrder(len(train_set), cfg.seed, epoch),
                      generator=torch.Generator())  # leaves the global RNG alone


def steps_per_epoch(cfg, train_set, num_processes: int) -> int:
    if token_batching(cfg):
        return math.ceil(len(TokenBatches(list(train_set["length"]), cfg.max_tokens, cfg.seed, 0)) / num_processes)
    return math.ceil(len(train_set) / (cfg.batch_size * num_processes))


def total_steps(cfg, train_set, num_processes: int) -> int:
    return max(1, round(cfg.epochs * steps_per_epoch(cfg, train_set, num_processes)))


# -- checkpoints ---------------------------------------------------------------------------------

# may change between resumes (activation checkpointing: the same run in less memory, e.g. after running
# out of it); default_rules counts only through the settings it decides (below)
IGNORED_SETTINGS = {"overwrite", "output_dir", "checkpoint_every", "default_rules", "activation_checkpointing"}


def changed_settings(saved: dict, cfg) -> dict[str, tuple]:
    """The settings of `cfg` that differ from those `saved` with a run: name -> (saved, now), but
    those the run never reads. A setting the saved run did not have yet (an option added later)
    counts as its default; the settle and the shrink count as what they did (runs saved before they
    existed had neither)."""
    from .config import (ablation_in_effect, allocation_in_effect, default_of, pruning_dropout_in_effect,
                         reconstruct_in_effect, settle_fraction_in_effect, shrink_fraction_in_effect, targeted,
                         unused_settings)

    defaults = {f.name: default_of(f) for f in fields(cfg)}
    current = asdict(cfg)
    # with a --target-*, k (and a budget per kind) follow from it and the model: the saved run holds the
    # ones it computed, the command a placeholder
    derived = {"k", "k_per_kind"} if targeted(current) else set()
    derived |= unused_settings(current)  # another method's options: the run never read them
    changed = {k: (saved.get(k, defaults[k]), current[k]) for k in current
               if k not in IGNORED_SETTINGS | derived and saved.get(k, defaults[k]) != current[k]}
    for name, in_effect in (("settle_fraction", settle_fraction_in_effect),
                            ("shrink_fraction", shrink_fraction_in_effect)):
        if name in current and name not in derived:
            changed.pop(name, None)
            then = in_effect(saved) if name in saved else 0.0
            now = in_effect(current)
            if round(then, 4) != round(now, 4):
                changed[f"{name} (in effect)"] = (round(then, 4), round(now, 4))
    for name, in_effect in (("reconstruct", reconstruct_in_effect), ("ablation", ablation_in_effect),
                            ("allocation", allocation_in_effect), ("pruning_dropout", pruning_dropout_in_effect)):
        if name in current and name not in derived:  # "default" and what it chose are the same run
            changed.pop(name, None)
            then, now = in_effect(saved), in_effect(current)
            if then != now:
                changed[f"{name} (in effect)"] = (then, now)
    return dict(sorted(changed.items()))


def describe_changes(changed: dict[str, tuple]) -> str:
    return ", ".join(f"{k}: {then!r} -> {now!r}" for k, (then, now) in changed.items())


def resume_state(out: Path, cfg, acc: Accelerator) -> dict | None:
    """The checkpoint in `out` if it belongs to this configuration and as many processes (each takes
    its share of every global batch: another count would see other examples at the same step). One
    made otherwise is refused, or with --overwrite discarded. Every process calls it."""
    folder = checkpoint_folder(out)
    if folder is None:
        return None
    state = read_checkpoint(folder)
    check_state(state, folder)
    changed = changed_settings(state["config"], cfg)
    if state.get("processes", 1) != acc.num_processes:  # (checkpoints written before it was recorded: one)
        changed["processes"] = (state.get("processes", 1), acc.num_processes)
    if not changed:
        return state
    what = describe_changes(changed)
    if cfg.overwrite:
        log.warning("discarding the checkpoint in %s, made with other settings (%s)", out, what)
        acc.wait_for_everyone()  # every process has read it; then one removes it
        if acc.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
        acc.wait_for_everyone()
        return None
    raise CheckpointError(f"{folder} was made with other settings ({what}); resume with the same "
                          "settings, pass --overwrite to discard it and start over, or choose "
                          "another --output-dir")


STATE_PARTS = {"config": dict, "model": dict, "optimizer": dict, "scheduler": dict, "history": list,
               "extra": dict, "seconds": dict}


def check_state(state, folder: Path) -> None:
    """A checkpoint's state has every part, of the right type, and a step count (a hand-edited or
    damaged one is refused before anything is restored from it)."""
    def bad(why: str):
        return CheckpointError(f"checkpoint {folder} is damaged ({why}); delete it to start over")
    if not isinstance(state, dict):
        raise bad("not a state")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad(f"its step {step!r} is not a count of steps")
    for part, kind in STATE_PARTS.items():
        if not isinstance(state.get(part), kind):
            raise bad(f"its {part} is missing or not a {kind.__name__}")
    if not all(isinstance(row, dict) for row in state["history"]):
        raise bad("its log holds rows that are not records")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in state["seconds"].values()):
        raise bad("its seconds are not all numbers")
    since = state["extra"].get("loss_since_log")
    if since is not None and not (isinstance(since, (list, tuple)) and len(since) == 2 and
                                  all(isinstance(v, (int, float, torch.Tensor)) for v in since)):
        raise bad("its loss since the last log row is not a sum and a count")
    if not all(torch.isfinite(t).all() for t in state["model"].values() if isinstance(t, torch.Tensor)):
        raise bad("its weights hold NaN or infinite values")  # (a run stops before it would save them)


def check_inputs(out: Path, state: dict | None, inputs: dict, cfg) -> dict | None:
    """The checkpoint in `state` if it was made from the same inputs (`inputs`: digests of the
    model weights and data, kept in the checkpoint's extra); one made from others is refused, or
    with --overwrite discarded (None)."""
    if state is None or state["extra"].get("inputs") == inputs:
        return state
    saved = state["extra"].get("inputs")
    if saved is None:  # written before checkpoints recorded their inputs
        log.warning("the checkpoint in %s does not record its model and data: resuming it as it is", out)
        return state
    # (an input a checkpoint of before does not record, the model's files or the calibration data: not held against it)
    changed = [name for name in inputs if name in saved and saved[name] != inputs[name]]
    if not changed:
        return state
    names = {"model": "the model's weights", "model files": "the model's files (config, tokenizer)"}
    said = [names.get(name, f"the {name}") for name in changed]
    what = said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]
    if cfg.overwrite:
        log.warning("discarding the checkpoint in %s, made from other inputs: %s changed", out, what)
        shutil.rmtree(checkpoint_folder(out), ignore_errors=True)  # every process may try
        return None
    raise CheckpointError(f"the checkpoint in {out} was made from other inputs: {what} changed since the run was "
                          "interrupted; resume with the same ones, pass --overwrite to discard it and start over, or "
                          "choose another --output-dir")


def save_rounds(acc: Accelerator, out: Path, cfg, rounds: list, extra: dict, seconds: dict) -> None:
    """A scored method's rounds so far (Michel's masks with their scores and metrics) as a checkpoint
    that the same command, started again, reads back (`extra["michel_rounds"]`); no weights: nothing
    trains. Written after every round unless checkpoints are off (--checkpoint-every 0)."""
    if cfg.checkpoint_every and acc.is_main_process:
        write_checkpoint(out, {"step": len(rounds), "config": asdict(cfg), "processes": acc.num_processes,
                               "model": {}, "optimizer": {},
                               "scheduler": {}, "history": [], "extra": {**extra, "michel_rounds": rounds},
                               "seconds": seconds})
    if len(rounds) == int(os.environ.get(KILL_AT_STEP, "0")):  # the tests' interruption
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(acc: Accelerator, out: Path, cfg, model, optimizer, scheduler, step: int,
                    history: list, extra: dict, seconds: dict) -> None:
    """Trainable weights, optimiser, scheduler, the log so far (no RNG: it follows from the step)."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        trainable = {n: p.detach().cpu() for n, p in unwrapped.named_parameters() if p.requires_grad}
        write_checkpoint(out, {
            "step": step, "config": asdict(cfg), "processes": acc.num_processes, "model": trainable,
            "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "history": history, "extra": extra, "seconds": seconds})
    acc.wait_for_everyone()


def restore_checkpoint(acc: Accelerator, state: dict, model, optimizer, scheduler) -> None:
    try:
        unexpected = acc.unwrap_model(model).load_state_dict(state["model"], strict=False).unexpected_keys
        if unexpected:
            raise CheckpointError(f"checkpoint holds weights this model lacks: {unexpected[:5]}")
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # (a moment of another shape would fail at the first step)
            for p in group["params"]:
                for name, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                        raise ValueError(f"its optimizer's {name} has shape {tuple(value.shape)} for a weight "
                                         f"of shape {tuple(p.shape)}")
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:  # (a hand-edited one: shapes, groups)
        detail = " ".join(str(err).split())  # (torch's first line only names the model)
        raise CheckpointError(f"the checkpoint does not fit this run's model or optimizer ({type(err).__name__}: "
                              f"{detail[:300]}); delete it to start over") from err
    if acc.scaler is not None and state.get("grad_scaler"):  # fp16: the loss scale it had reached
        acc.scaler.load_state_dict(state["grad_scaler"])


# -- the loop ------------------------------------------------------------------------------------

def train(acc: Accelerator, cfg, out: Path, model, optimizer, scheduler, train_set, collate,
          *, loss_fn=None, selector=None, resume_state: dict | None = None, extra: dict | None = None,
          seconds: dict | None = None, phase: str = "train", desc: str = "train",
          on_epoch_end=None, dropout: bool = True) -> list[dict]:
    """Run `cfg.epochs` of training; return the training log (a row every 10 steps, or often
    enough for 25 rows in a shorter run).

    `model`, `optimizer` and `scheduler` must already be prepared by `acc`; `loss_fn(model, batch)`
    gives the loss (default: the model's own). `selector`, if given,
    is told the step before each forward (DSP's temperature follows it) and its `penalty()`, if
    it has one, is added to the loss. `extra` is stored in each checkpoint (e.g. metrics measured
    before training) and comes back in `resume_state["extra"]`; so do `seconds` (the phases timed
    so far; the caller times this one as `phase`), with this phase's seconds so far added.
    `on_epoch_end(epoch)`, if given, runs after the last step of each epoch, before that step's
    checkpoint (e.g. validation that keeps the best weights; what it records in `extra` is saved).
    `dropout=False`: the model trains in evaluation mode (no dropout), the selector in training mode.
    `cfg.activation_checkpointing`: the model recomputes its layers' activations in the backward
    pass while it trains here.
    """
    rng_devices = [acc.device] if acc.device.type == "cuda" else []
    checkpointing = getattr(cfg, "activation_checkpointing", False)
    with torch.random.fork_rng(devices=rng_devices), activation_checkpointing(acc.unwrap_model(model), checkpointing):
        return _train(acc, cfg, out, model, optimizer, scheduler, train_set, collate,
                      loss_fn or (lambda m, b: m(**b).loss), selector, resume_state,
                      extra if extra is not None else {}, seconds if seconds is not None else {}, phase, desc,
                      on_epoch_end, dropout)


def check_activation_checkpointing(model) -> None:
    """--activation-checkpointing on a model transformers cannot checkpoint: one line, before any long work."""
    if not getattr(model, "supports_gradient_checkpointing", False) or not checkpointing_layers(model):
        raise ConfigError(f"--activation-checkpointing: transformers has no activation checkpointing for "
                          f"{type(model).__name__}")


def checkpointing_layers(model) -> list[torch.nn.Module]:
    """The layers transformers can run under torch's checkpoint (its GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextmanager
def activation_checkpointing(model, on: bool):
    """Activation checkpointing while the block runs, non-reentrant: the recomputed layers read the
    gates' mask of their forward pass (computed once per forward, not drawn again) and get the
    forward's dropout (torch restores the random state for the recomputation).

    transformers checkpoints a layer in training mode only; the backward passes of a model in
    evaluation mode (DSP's scores learned without dropout, Michel's, Fisher's and Taylor's
    gradients) would keep every activation. So each layer is marked training for transformers'
    check while gradients are on, and runs in the mode it was in, forward and recomputation alike
    (some layers read their own flag for dropout: BART's)."""
    if not on:
        yield
        return
    check_activation_checkpointing(model)
    enable = getattr(model, "activation_checkpointing_enable", None)  # its name from transformers 5.x on
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    layers = checkpointing_layers(model)
    for layer in layers:
        mode = {"training": layer.training}
        layer._gradient_checkpointing_func = _checkpoint_in_mode(layer, mode)
        layer.forward = _forward_marked_training(layer, type(layer).forward, mode)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's own again
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def _forward_marked_training(layer, forward, mode: dict):
    def marked(*args, **kwargs):
        mode["training"] = layer.training
        if layer.training or not torch.is_grad_enabled():
            return forward(layer, *args, **kwargs)
        layer.training = True  # for transformers' check only: _checkpoint_in_mode runs it in evaluation mode
        try:
            return forward(layer, *args, **kwargs)
        finally:
            layer.training = False
    return marked


def _checkpoint_in_mode(layer, mode: dict):
    def checkpointed(function, *args):
        training = mode["training"]  # this forward's mode, kept for its recomputation

        def run(*inputs):
            before, layer.training = layer.training, training
            try:
                return function(*inputs)
            finally:
                layer.training = before
        return checkpoint(run, *args, use_reentrant=False)
    return checkpointed


def training_mode(model, selector, dropout: bool) -> None:
    """The model in training mode, or without dropout in evaluation mode with its selector training
    (a selector in evaluation mode gives its hard choice)."""
    model.train(dropout)
    if selector is not None:
        selector.train()


def _train(acc, cfg, out, model, optimizer, scheduler, train_set, collate, loss_fn, selector, resume_state,
           extra, seconds, phase, desc, on_epoch_end, dropout):
    per_epoch = steps_per_epoch(cfg, train_set, acc.num_processes)
    last_step = total_steps(cfg, train_set, acc.num_processes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    penalty = getattr(selector, "penalty", None)
    step, history = 0, []
    if resume_state is not None:
        step, history = resume_state["step"], resume_state["history"]
        if step > last_step:
            raise CheckpointError(f"the checkpoint in {out} is at step {step}, past this run's {last_step} steps; "
                                  "delete it to start over")
        log.info("resuming %s at step %d of %d", desc, step, last_step)
    log_every = max(1, min(10, last_step // 25))  # every 10 steps; at least 25 rows in short runs
    loss_sum, loss_count = torch.zeros((), device=acc.device), 0
    if resume_state is not None and "loss_since_log" in extra:  # the next log row averages the same steps
        loss_sum += extra["loss_since_log"][0]
        loss_count = extra["loss_since_log"][1]
    kill_at = int(os.environ.get(KILL_AT_STEP, "0"))
    started = time.perf_counter()

    # the norm of the scores' gradient at every step (kept in `extra`, so a resumed run has them all)
    pending_norms: list = []

    def flush_norms() -> None:
        if pending_norms:
            extra["score_grad_norms"] = extra.get("score_grad_norms", []) + torch.stack(pending_norms).tolist()
            pending_norms.clear()

    saved_step = step if resume_state is not None else None  # the last good checkpoint
    diverged = torch.zeros((), dtype=torch.bool, device=acc.device)  # a non-finite loss since the last check

    def check_finite() -> None:
        """Stop a run whose loss or trainable weights (head scores among them) turned NaN or
        infinite, before it writes a checkpoint or evaluates."""
        # one wait for the device, not one a tensor (a tensor's largest magnitude is inf or NaN if any is)
        peaks = [p.detach().abs().amax().float().to(diverged.device) for p in trainable]
        finite = torch.isfinite(torch.stack(peaks)).all() if peaks else ~diverged
        if not (diverged | ~finite).item():
            return
        kept = (f"the last good checkpoint (step {saved_step}) is kept in {out}" if saved_step is not None
                else "no checkpoint had been written")
        raise TrainingDivergedError(
            f"training diverged: the loss or the weights became NaN or infinite by step {step} of {last_step}; "
            f"stopped ({kept}); lower --lr or --pruning-lr, or clip gradients with --max-grad-norm")

    training_mode(model, selector, dropout)
    progress = progress_bar(total=last_step, initial=step, desc=desc, disable=not acc.is_local_main_process)
    while step < last_step:
        epoch, done_in_epoch = divmod(step, per_epoch)
        loader = acc.prepare(epoch_loader(cfg, train_set, collate, epoch))
        if done_in_epoch:
            loader = acc.skip_first_batches(loader, done_in_epoch)
        for batch in loader:
            torch.manual_seed(derive_seed(cfg.seed, "dropout", step, acc.process_index))
            if selector is not None:
                selector.set_step(step)
            loss = loss_fn(model, batch)
            if penalty is not None:  # e.g. voita's L0 term
                loss = loss + penalty()
            acc.backward(loss)
            if acc.scaler is not None:  # fp16 on a GPU: the true gradients, for the norms below and the clipping
                acc.unscale_gradients()
            if selector is not None:  # before clipping: what the loss itself sends to the scores
                scores_grad = torch.linalg.vector_norm(torch.cat(
                    [p.grad.detach().flatten().double() for p in selector.parameters() if p.grad is not None]
                    or [torch.zeros(1, dtype=torch.float64, device=acc.device)]))
                pending_norms.append(scores_grad)
            if cfg.max_grad_norm:  # (Accelerate's would unscale a second time: refused by the scaler)
                clip = torch.nn.utils.clip_grad_norm_ if acc.scaler is not None else acc.clip_grad_norm_
                clip(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update()
            loss_sum += loss.detach()
            loss_count += 1
            diverged |= ~torch.isfinite(loss.detach())
            epoch_ends = step % per_epoch == 0 or step == last_step
            checkpoint_due = step == last_step or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            if step % log_every == 0 or epoch_ends or checkpoint_due:
                check_finite()
            if step % log_every == 0 or step == last_step:
                row = {"step": step, "epoch": round(step / per_epoch, 3),
                       "loss": acc.reduce(loss_sum, "mean").item() / loss_count,  # every process's batches
                       "lr": scheduler.get_last_lr()[0]}
                if selector is not None:
                    row.update(selector.log_values(), score_grad_norm=scores_grad.item())
                history.append(row)
                acc.log({f"{phase}/{name}": value for name, value in row.items()
                         if name != "step" and isinstance(value, (int, float))}, step=step)  # --report-to
                loss_sum.zero_()
                loss_count = 0
                progress.set_postfix(loss=f"{row['loss']:.4f}")
            if on_epoch_end is not None and epoch_ends:
                on_epoch_end(math.ceil(step / per_epoch))
                training_mode(model, selector, dropout)
            if checkpoint_due:
                flush_norms()
                extra["loss_since_log"] = [acc.reduce(loss_sum, "mean").item(), loss_count]  # (all processes' mean)
                so_far = {**seconds, phase: round(seconds.get(phase, 0.0) + time.perf_counter() - started, 2)}
                save_checkpoint(acc, out, cfg, model, optimizer, scheduler, step, history, extra, so_far)
                saved_step = step
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if step == last_step:
                break
    progress.close()
    flush_norms()
    norms = extra.get("score_grad_norms", [])
    if norms:
        extra["live_steps"] = sum(n > LIVE_GRADIENT for n in norms)
        log.info("the head scores had a gradient (norm above %g) in %d of %d steps", LIVE_GRADIENT,
                 extra["live_steps"], len(norms))
    return history
