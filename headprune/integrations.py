"""Head pruning inside a user's own Hugging Face `Trainer` (joint: the model fine-tunes while the
head scores learn which k heads to keep).

    from headprune.integrations import HeadPruningCallback
    callback = HeadPruningCallback(k=24, method="dsp", output_dir="runs/pruned")
    Trainer(model=model, args=args, train_dataset=train, callbacks=[callback]).train()
    # runs/pruned: the physically pruned model; callback.kept_heads: what it kept

The Trainer's optimizer and scheduler stay the user's and train the weights. At the start of
training the callback puts a gate on every head and a selector (DSP, STE or Voita) on the gates;
the head scores have their own AdamW and schedule (those of `headprune prune --mode joint`, from
`PruneConfig`'s options and the Trainer's number of steps), stepped in `on_optimizer_step`, after
the Trainer's step and before it zeroes the gradients (so the Trainer's gradient clipping covers
the scores too, as headprune's own loop does; Voita's L0 penalty goes into their gradients at the
start of each step, since the Trainer's loss does not know it). Under several processes each
score's gradient is averaged as the backward pass makes it (the gates come after DDP wrapped the
model, so DDP does not), before the clipping. Each log line gets the selector's values
(temperature, heads on, ...) under `headprune/`. Each of the Trainer's checkpoints gets the
scores' state (`checkpoint-N/headprune/`, safetensors and JSON), which `resume_from_checkpoint`
brings back. At the end the hard top-k is kept: the model given to the Trainer loses its other
heads in place, on every process, and the main process saves it with `save_pruned`.

Not the same run as `headprune prune --mode joint` with the same settings and seed: the Trainer
orders the data with its own sampler and seed, draws dropout from its own generator, schedules
the weights' learning rate with its own warm-up and decay, and its AdamW has the Trainer's
weight decay and epsilon; the heads' schedule and noise are the same (they follow from the step
and the seed alone), so on the same data the choice is comparable, not identical.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoint import read_checkpoint, write_checkpoint
from .config import TRAINED_METHODS, PruneConfig
from .errors import CheckpointError, ConfigError, OutputExistsError
from .gates import ATTRIBUTE, attach_gates, detach_gates
from .pruning import prune_in_place, save_pruned
from .selection import selector_and_optimizer
from .sites import UNIT_NAMES, check_query_unit, find_sites
from .train import changed_settings, describe_changes

log = logging.getLogger(__name__)
STATE_FOLDER = "headprune"  # in each of the Trainer's checkpoint folders: the head scores' state


def processes() -> int:
    """How many processes train (torch.distributed's world; 1 without it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def averaged_over_processes(selector) -> list:
    """Hooks that average each score's gradient over the processes as each backward pass makes it,
    as DDP does for the weights, so that the Trainer's clipping sees the same gradients everywhere
    (averaged after it, each process clipped by its own norm and the weights drifted apart)."""
    if processes() == 1:
        return []

    def average(grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad / processes()
    return [p.register_hook(average) for p in selector.parameters() if p.requires_grad]


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
        self.gates, self.draw = None, 0  # draw: the micro-batch within a step (gradient accumulation)
        self.hooks: list = []
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
        if self.gates is not None and getattr(model, ATTRIBUTE, None) is self.gates:
            detach_gates(model)  # a train() that an error stopped left them: this one starts its own
        sites = find_sites(model, self.cfg.unit)  # k checked before the gates go on: the model stays plain
        if self.cfg.unit == "query" and not (getattr(model.config, "headprune", None) or {}).get("physical"):
            check_query_unit(sites, "this model")
        units = sum(site.num_heads for site in sites)
        if self.cfg.k > units:
            raise ConfigError(f"k={self.cfg.k} is more than the {units} {UNIT_NAMES[sites[0].unit]} of this model")
        resumed = self.saved_state(args, state) if state.global_step else None  # (read before the gates go on)
        self.gates = attach_gates(model, self.cfg.unit)
        selector, self.optimizer, self.scheduler, _ = selector_and_optimizer(
            self.cfg, self.gates.num_heads, state.max_steps)
        self.gates.selector = selector.to(next(model.parameters()).device)
        if resumed:
            selector.load_state_dict(resumed["selector"])
            self.optimizer.load_state_dict(resumed["optimizer"])
            self.scheduler.load_state_dict(resumed["scheduler"])
        self.hooks = averaged_over_processes(selector)
        log.info("headprune: %s keeps %d of %d heads over %d steps%s", self.cfg.method, self.cfg.k,
                 self.gates.num_heads, state.max_steps, f", from step {state.global_step}" if resumed else "")

    def saved_state(self, args, state) -> dict:
        """The scores' state in the checkpoint the Trainer resumes from (named after its step, in the
        Trainer's output_dir: the Trainer does not tell its callbacks which folder it read)."""
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / STATE_FOLDER
        if not (folder / "state.json").is_file():
            raise CheckpointError(f"HeadPruningCallback: the Trainer resumes at step {state.global_step}, but "
                                  f"{folder} is missing (the head scores would start over): resume from a "
                                  "checkpoint the callback saved, in the Trainer's output_dir")
        saved = read_checkpoint(folder)
        changed = changed_settings(saved["config"], self.cfg)
        if changed:
            raise CheckpointError(f"HeadPruningCallback: {folder} was saved with other settings "
                                  f"({describe_changes(changed)})")
        return saved

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and self.gates is not None and folder.is_dir():
            write_checkpoint(folder, {"step": state.global_step, "config": asdict(self.cfg), "processes": processes(),
                                      "selector": self.gates.selector.state_dict(),
                                      "optimizer": self.optimizer.state_dict(),
                                      "scheduler": self.scheduler.state_dict()}, name=STATE_FOLDER)

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
        self.draw = 0
        penalty = getattr(self.gates.selector, "penalty", None)
        if penalty is not None:  # Voita's L0 term, once a step (as headprune's own loop adds it to each loss)
            penalty().backward()

    def on_substep_end(self, args, state, control, **kwargs):
        # gradient accumulation: each micro-batch of the step trains on a subset of its own (fresh
        # noise, as the reference draws at every forward), at the step's temperature
        self.draw += 1
        self.gates.selector.set_step(state.global_step, self.draw)

    def on_optimizer_step(self, args, state, control, **kwargs):
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
        for hook in self.hooks:
            hook.remove()
        self.gates.selector = None
        detach_gates(model)
        folder, record = self.folder(args), {"method": self.cfg.method, "mode": "joint"}
        if args.process_index == 0:
            save_pruned(model, folder, self.kept_heads, processing_class, unit=self.cfg.unit, **record)
        else:  # every process's model loses the same heads (evaluating after training reads them all)
            prune_in_place(model, self.kept_heads, unit=self.cfg.unit, **record)
        if processes() > 1:
            torch.distributed.barrier()  # the pruned model is in its folder before any process goes on
        log.info("headprune: kept %d heads; the pruned model is in %s", len(self.kept_heads), folder)
