"""Head pruning inside a user's own Hugging Face `Trainer` (joint: the model fine-tunes while the
head scores learn which k heads to keep).

    from headprune.integrations import HeadPruningCallback
    prune = HeadPruningCallback(k=24, method="dsp", output_dir="runs/pruned")
    Trainer(model=model, args=args, train_dataset=train, callbacks=[prune]).train()
    # runs/pruned: the physically pruned model; prune.kept_heads: what it kept

The Trainer's optimizer and scheduler stay the user's and train the weights. At the start of
training the callback puts a gate on every head and a selector (DSP, STE or Voita) on the gates;
the head scores have their own AdamW and schedule (those of `headprune prune --mode joint`, from
`PruneConfig`'s options and the Trainer's number of steps), stepped in `on_optimizer_step`, after
the Trainer's step and before it zeroes the gradients (so the Trainer's gradient clipping covers
the scores too, as headprune's own loop does). Each log line gets the selector's values
(temperature, heads on, ...) under `headprune/`. At the end the hard top-k is kept: the model
given to the Trainer loses its other heads in place and is saved with `save_pruned`.

Not the same run as `headprune prune --mode joint` with the same settings and seed: the Trainer
orders the data with its own sampler and seed, draws dropout from its own generator, schedules
the weights' learning rate with its own warm-up and decay, and its AdamW has the Trainer's
weight decay and epsilon; the heads' schedule and noise are the same (they follow from the step
and the seed alone), so on the same data the choice is comparable, not identical.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from .config import TRAINED_METHODS, PruneConfig
from .errors import ConfigError, OutputExistsError
from .gates import attach_gates, detach_gates
from .pruning import save_pruned
from .selection import selector_and_optimizer
from .sites import UNIT_NAMES, find_sites

log = logging.getLogger(__name__)


class HeadPruningCallback(TrainerCallback):
    def __init__(self, k: int, method: str = "dsp", output_dir: str | None = None, overwrite: bool = False,
                 **options):
        """Keep `k` heads (of `unit`, for grouped-query attention) by `method` (dsp, ste or voita);
        `options`: any other option of `PruneConfig` (schedule, l0_lambda, seed, ...). The pruned model
        goes to `output_dir` (default: the Trainer's output_dir/pruned); a folder that holds files
        already is refused when training begins, unless `overwrite`."""
        if method not in TRAINED_METHODS:
            raise ConfigError(f"the callback trains head scores: method must be one of {', '.join(TRAINED_METHODS)}, "
                              f"not {method!r} (scored methods run after training: headprune prune)")
        self.cfg = PruneConfig(method=method, mode="joint", k=k, **options)
        if self.cfg.k < 1:
            raise ConfigError(f"k={self.cfg.k}: the callback keeps at least one head")
        if self.cfg.pruning_dropout == "off":  # the Trainer puts the model in training mode itself
            raise ConfigError("pruning_dropout='off' is for headprune's own loop: the Trainer trains with the "
                              "model's dropout (set the model config's dropout to 0 to train without it)")
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.gates = None
        self.kept_heads: list | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.gradient_checkpointing and (args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            # reentrant recomputation cannot reach the gates' mask, which no layer takes as an input
            raise ConfigError("HeadPruningCallback: gradient_checkpointing_kwargs use_reentrant=True cannot carry "
                              "the head scores' gradient; leave it out (non-reentrant, transformers' default)")
        if args.fp16:  # its loss scaler does not know the scores (their own optimizer): their gradients
            # stay scaled in the Trainer's clipping, and its skipped steps would still step them
            raise ConfigError("HeadPruningCallback: fp16 is not supported (the head scores' gradients are not "
                              "unscaled); use bf16=True, or full precision")
        self.check_folder(self.folder(args))  # now, not after the training
        model = getattr(model, "module", model)  # under DDP, the model inside
        sites = find_sites(model, self.cfg.unit)  # k checked before the gates go on: the model stays plain
        units = sum(site.num_heads for site in sites)
        if self.cfg.k > units:
            raise ConfigError(f"k={self.cfg.k} is more than the {units} {UNIT_NAMES[sites[0].unit]} of this model")
        self.gates = attach_gates(model, self.cfg.unit)
        selector, self.optimizer, self.scheduler, _ = selector_and_optimizer(
            self.cfg, self.gates.num_heads, state.max_steps)
        self.gates.selector = selector.to(next(model.parameters()).device)
        log.info("headprune: %s keeps %d of %d heads over %d steps", self.cfg.method, self.cfg.k,
                 self.gates.num_heads, state.max_steps)

    def folder(self, args) -> Path:
        """Where the pruned model goes."""
        return Path(self.output_dir or Path(args.output_dir) / "pruned")

    def check_folder(self, folder: Path) -> None:
        """A folder that holds files already is refused unless overwrite."""
        if folder.is_dir() and any(folder.iterdir()) and not self.overwrite:
            raise OutputExistsError(f"HeadPruningCallback: {folder} holds files already; pass overwrite=True to "
                                    "replace them, or another output_dir")

    def on_step_begin(self, args, state, control, **kwargs):
        self.gates.selector.set_step(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        scores = [p for p in self.gates.selector.parameters() if p.grad is not None]
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # created after DDP wrapped
            for p in scores:  # the model: its scores' gradients are averaged here
                torch.distributed.all_reduce(p.grad)
                p.grad /= torch.distributed.get_world_size()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.gates is None or self.gates.selector is None or logs is None or "train_runtime" in logs:
            return  # (the Trainer's summary line at the end is not a training step's)
        values = {f"headprune/{name}": value for name, value in self.gates.selector.log_values().items()}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        model = getattr(model, "module", model)
        self.kept_heads = self.gates.kept_heads()  # the selector's hard choice
        self.gates.selector = None
        detach_gates(model)
        folder = self.folder(args)
        if args.process_index == 0:
            save_pruned(model, folder, self.kept_heads, processing_class, unit=self.cfg.unit,
                        method=self.cfg.method, mode="joint")
        log.info("headprune: kept %d heads; the pruned model is in %s", len(self.kept_heads), folder)
