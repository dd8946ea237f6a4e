"""The training loop shared by every recipe: Accelerate over a plain PyTorch loop, a data order
fixed by (seed, epoch), atomic checkpoints with optimiser, scheduler and RNG state, and resumption
that reaches the same result as an uninterrupted run."""

from __future__ import annotations

import logging
import math
import os
import random
import signal
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from .outputs import CHECKPOINT, save_torch

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


def linear_decay(total_steps: int, warmup_steps: int = 0):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def constant(step: int) -> float:
    return 1.0


def steps_per_epoch(n_examples: int, batch_size: int, num_processes: int) -> int:
    return math.ceil(n_examples / (batch_size * num_processes))


def total_steps(cfg, n_examples: int, num_processes: int) -> int:
    return max(1, round(cfg.epochs * steps_per_epoch(n_examples, cfg.batch_size, num_processes)))


@torch.no_grad()
def evaluate(acc: Accelerator, model, datasets: dict, collate, batch_size: int) -> dict[str, float]:
    """Accuracy on each evaluation split, gathered over processes."""
    was_training = model.training
    model.eval()
    scores = {}
    for name, ds in datasets.items():
        loader = acc.prepare(DataLoader(ds, batch_size=batch_size, collate_fn=collate))
        correct = seen = 0
        for batch in tqdm(loader, desc=f"evaluate {name}", leave=False, disable=not acc.is_local_main_process):
            labels = batch.pop("labels")
            predictions = model(**batch).logits.argmax(-1)
            predictions, labels = acc.gather_for_metrics((predictions, labels))
            correct += (predictions == labels).sum().item()
            seen += labels.numel()
        scores[name] = correct / seen
    model.train(was_training)
    return scores


# -- checkpoints ---------------------------------------------------------------------------------

def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(RuntimeError):
    pass


def read_checkpoint(path: Path, cfg) -> dict:
    """Load a checkpoint and check that it belongs to this configuration."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["config"]
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is unreadable ({err}); delete it to start over") from err
    current = asdict(cfg)
    ignored = {"overwrite", "output_dir", "checkpoint_every"}
    changed = sorted(k for k in current if k not in ignored and saved.get(k) != current[k])
    if changed:
        raise CheckpointError(
            f"checkpoint {path} was made with other settings ({', '.join(f'{k}: {saved.get(k)!r} -> {current[k]!r}' for k in changed)}); "
            "resume with the same settings, or use another --output-dir")
    return state


def write_checkpoint(acc: Accelerator, out: Path, cfg, model, optimizer, scheduler, step: int,
                     history: list, extra: dict) -> None:
    """Trainable weights, optimiser, scheduler, RNG of every process, the log so far."""
    if acc.num_processes > 1:  # each process keeps its own RNG stream
        save_torch(out / f"rng_{acc.process_index}.pt", {"step": step, "rng": _rng_state()})
    acc.wait_for_everyone()
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        trainable = {n: p.detach().cpu() for n, p in unwrapped.named_parameters() if p.requires_grad}
        save_torch(out / CHECKPOINT, {
            "step": step, "config": asdict(cfg), "model": trainable,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": _rng_state(), "history": history, "extra": extra})
    acc.wait_for_everyone()


def restore_checkpoint(acc: Accelerator, state: dict, out: Path, model, optimizer, scheduler) -> None:
    missing = acc.unwrap_model(model).load_state_dict(state["model"], strict=False).unexpected_keys
    if missing:
        raise CheckpointError(f"checkpoint holds weights this model lacks: {missing[:5]}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if acc.num_processes > 1 and acc.process_index > 0:
        own = torch.load(out / f"rng_{acc.process_index}.pt", weights_only=False)
        if own["step"] == state["step"]:
            rng = own["rng"]
        else:
            log.warning("process %d: RNG state is from another step; resuming without it", acc.process_index)
            rng = None
    if rng is not None:
        _set_rng_state(rng)


# -- the loop ------------------------------------------------------------------------------------

def train(acc: Accelerator, cfg, out: Path, model, optimizer, scheduler, train_set, collate,
          *, selector=None, resume_state: dict | None = None, extra: dict | None = None,
          desc: str = "train") -> list[dict]:
    """Run `cfg.epochs` of training; return the training log (a row every 10 steps, or often
    enough for 25 rows in a shorter run).

    `model`, `optimizer` and `scheduler` must already be prepared by `acc`. `selector`, if given,
    is told the step before each forward (DSP's temperature follows it) and its `penalty()`, if
    it has one, is added to the loss. `extra` is stored in each checkpoint (e.g. metrics measured
    before training) and comes back in `resume_state["extra"]`.
    """
    per_epoch = steps_per_epoch(len(train_set), cfg.batch_size, acc.num_processes)
    last_step = total_steps(cfg, len(train_set), acc.num_processes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    penalty = getattr(selector, "penalty", None)
    step, history = 0, []
    if resume_state is not None:
        step, history = resume_state["step"], resume_state["history"]
        log.info("resuming %s at step %d of %d", desc, step, last_step)
    log_every = max(1, min(10, last_step // 25))  # every 10 steps; at least 25 rows in short runs
    loss_sum, loss_count = torch.zeros((), device=acc.device), 0
    kill_at = int(os.environ.get(KILL_AT_STEP, "0"))

    model.train()
    progress = tqdm(total=last_step, initial=step, desc=desc, disable=not acc.is_local_main_process)
    while step < last_step:
        epoch, done_in_epoch = divmod(step, per_epoch)
        loader = acc.prepare(DataLoader(train_set, batch_size=cfg.batch_size, collate_fn=collate,
                                        sampler=EpochOrder(len(train_set), cfg.seed, epoch),
                                        generator=torch.Generator()))  # leaves the global RNG alone
        if done_in_epoch:
            loader = acc.skip_first_batches(loader, done_in_epoch)
        for batch in loader:
            if selector is not None:
                selector.set_step(step)
            loss = model(**batch).loss
            if penalty is not None:  # e.g. voita's L0 term
                loss = loss + penalty()
            acc.backward(loss)
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update()
            loss_sum += loss.detach()
            loss_count += 1
            if step % log_every == 0 or step == last_step:
                row = {"step": step, "epoch": round(step / per_epoch, 3),
                       "loss": loss_sum.item() / loss_count,
                       "lr": scheduler.get_last_lr()[0]}
                if selector is not None:
                    row.update(selector.log_values())
                history.append(row)
                loss_sum.zero_()
                loss_count = 0
                progress.set_postfix(loss=f"{row['loss']:.4f}")
            if step == last_step or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                write_checkpoint(acc, out, cfg, model, optimizer, scheduler, step, history, extra or {})
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if step == last_step:
                break
    progress.close()
    return history
