"""How a run chooses its heads: one driver per family of methods.

- Trained selectors (dsp, ste, voita): `attach_selector` puts the method's selector on the gates
  and returns the optimiser and schedules that `train.train` runs; the scores learn with the loss.
- Scored methods (michel, fisher, activation, flap, taylor, random): `choose_by_scores` runs the
  method's scorer (`SCORERS`) on the calibration data and keeps the top k, in one shot or, for
  michel, in rounds of `--michel-step` heads, scored again under the mask after each round.

A scorer is a function `score(run, mask) -> Scores` in the method's file: `run` (a `Calibration`)
holds the model, its gates, the calibration batches, the task's loss, the config and the
functions that sum or stack a tensor over processes; `mask` is the current one (all ones but in
michel's later rounds). Adding a scorer is that file, `methods/<name>.py`, and its name in
`config.SCORED` (which makes it a `--method` choice and puts it in `SCORERS`); see
docs/architecture.md, "Where things plug in", for the rest of the list.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset

from .budget import uniform_allocation, uniform_counts
from .config import (BACKWARD_SCORED, METHOD_OPTIONS, SCORED, PruneConfig, ablation_in_effect, checkpoints_activations,
                     unused_settings)
from .errors import ConfigError, HeadpruneError
from .methods import iterative_pruning, make_selector, random_mask, resolve_schedule
from .methods import scoring
from .methods.scoring import PassRecord
from .methods.dsp import as_groups, hard_top_k, per_group
from .outputs import atomic_path, cache_root, drop_oldest
from .progress import progress_bar
from .sites import UNIT_NAMES
from .train import activation_checkpointing, constant_until, explore_then_select, linear_decay, total_steps

log = logging.getLogger("headprune")


# -- budgets -------------------------------------------------------------------------------------

def check_budget(cfg, counts: dict[str, int], threshold: bool, units: str = "heads") -> None:
    """k, or --k-per-kind, against the model's heads (`units`: what counts, as `UNIT_NAMES` calls
    them) of each kind; before anything is loaded."""
    num_heads = sum(counts.values())
    if cfg.k_per_kind:
        if len(cfg.k_per_kind) != len(counts):
            raise ConfigError(f"--k-per-kind needs {len(counts)} number(s) for this model, one per kind "
                              f"({', '.join(f'{kind}: {n} {units}' for kind, n in counts.items())})")
        for (kind, n), k in zip(counts.items(), cfg.k_per_kind):
            if k > n:
                raise ConfigError(f"--k-per-kind: {k} {kind} {units} is more than the model's {n}")
        if sum(cfg.k_per_kind) < 1:
            raise ConfigError("--k-per-kind keeps no head at all")
    elif cfg.k > num_heads and not threshold:
        hint = " (--unit query prunes the query heads within them)" if units == UNIT_NAMES["group"] else ""
        raise ConfigError(f"k={cfg.k} is more than the {num_heads} {units} of this model{hint}")


def budget_of(cfg, gates):
    """The budget as groups of gate indices: --k-per-kind, one group per kind; --allocation uniform
    (with --k or --k-per-kind), one group per layer, the layers of a kind keeping as many units as
    the budget allows (so that a trained method learns with the per-layer choice it keeps); None
    for one global budget."""
    if uniform_allocation(cfg, gates.sites):
        counts = uniform_counts(gates.sites, cfg.k_per_kind or cfg.k)
        return [(list(range(offset, offset + site.num_heads)), count)
                for offset, site, count in zip(gates.offsets, gates.sites, counts)]
    if not cfg.k_per_kind:
        return None
    kinds = list(dict.fromkeys(site.kind for site in gates.sites))  # (a kind a model pruned before emptied: 0 heads)
    return [([i for i, head in enumerate(gates.heads) if head[0] == kind], k) for kind, k in zip(kinds, cfg.k_per_kind)]


# -- trained selectors ---------------------------------------------------------------------------

def attach_selector(cfg, task, model, gates, train_set, acc):
    """The method's selector on the gates, and AdamW with the scores in their own group."""
    steps = total_steps(cfg, train_set, acc.num_processes)
    joint = None
    if cfg.mode == "joint":
        weights = [p for n, p in model.named_parameters() if not n.startswith("head_gates.")]
        joint = ({"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                 task.schedule(cfg, steps))
    gates.selector, optimizer, scheduler, info = selector_and_optimizer(
        cfg, gates.num_heads, steps, budget=budget_of(cfg, gates), joint=joint, betas=task.betas)
    return optimizer, scheduler, info


def pruning_loss(cfg, task, gates):
    """What the scores learn from: the task's loss, or for `--pruning-loss distill` (pipelined runs)
    the KL divergence from the unpruned model's output distribution to the pruned one's, per
    example (classifiers) or per target token (the tokens the task's loss reads): the teacher is
    the same frozen model with every head on and no dropout, run in the same step without a graph."""
    if cfg.pruning_loss != "distill":
        return task.loss

    def distill(model, batch):
        inputs = {name: value for name, value in batch.items() if name != "labels"}
        modes = [(module, module.training) for module in (model, gates.selector) if module is not None]
        with torch.no_grad(), gates.override(torch.ones(gates.num_heads)):
            teacher = model.eval()(**inputs).logits.float().log_softmax(-1)
        for module, training in modes:  # the model first: the selector may train inside a model without dropout
            module.train(training)
        student = model(**inputs).logits.float().log_softmax(-1)
        kl = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
        if kl.dim() == 1:  # one distribution an example
            return kl.mean()
        labels = batch["labels"]
        if not getattr(model, "module", model).config.is_encoder_decoder:  # a decoder predicts the next token
            kl, labels = kl[:, :-1], labels[:, 1:]
        real = (labels != -100).to(kl.dtype)  # a sum, not a boolean index: no wait for the device a step
        return (kl * real).sum() / real.sum().clamp(min=1)
    return distill


def selector_and_optimizer(cfg: PruneConfig, num_heads: int, steps: int, budget=None, joint=None,
                           betas=(0.9, 0.999)):
    """A trained method's selector for `steps` training steps, and AdamW with the scores in their
    own group at the method's pruning learning rate and schedule (plus `joint`: the model's
    parameter group and its learning-rate schedule, when the weights train too)."""
    k = None if cfg.method == "voita" and cfg.voita_selection == "threshold" else cfg.k
    schedule = resolve_schedule(cfg, steps)
    learn_steps = schedule["learn_steps"]
    settle_step = learn_steps if learn_steps < steps else None
    selector = make_selector(cfg.method, num_heads, k, t0=schedule["t0"], tf=schedule["tf"],
                             cooldown_steps=schedule["cooldown_steps"], l0_lambda=cfg.l0_lambda,
                             seed=cfg.seed, budget=budget, settle_step=settle_step,
                             shrink_steps=schedule["shrink_steps"], k_rounds=cfg.relaxation == "k-rounds")
    pruning_lr = schedule["pruning_lr"]
    groups = [{"params": list(selector.parameters()), "lr": pruning_lr, "weight_decay": 0.0}]
    # the scores stop at the settle step (a zero rate: Adam's momentum must not move them on)
    if cfg.pruning_lr_schedule == "select":
        schedules = [explore_then_select(learn_steps, schedule["select_step"], schedule["select_factor"])]
    else:
        schedules = [(linear_decay if cfg.pruning_lr_schedule == "linear" else constant_until)(learn_steps)]
    if joint is not None:
        weights, weights_schedule = joint
        groups.append(weights)
        schedules.append(weights_schedule)
    optimizer = torch.optim.AdamW(groups, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
    info = {"steps": steps, "schedule": schedule["name"], "pruning_lr": pruning_lr}
    if settle_step is not None:
        info["settle_step"] = settle_step
        log.info("the kept heads are fixed from step %d of %d on: the weights learn with them", settle_step, steps)
    if schedule["shrink_steps"]:
        info["shrink_steps"] = schedule["shrink_steps"]
        log.info("the training budget falls from all %d heads to k over the first %d steps", num_heads,
                 schedule["shrink_steps"])
    if cfg.method == "dsp":
        info.update(t0=schedule["t0"], tf=schedule["tf"], cooldown_steps=schedule["cooldown_steps"],
                    relaxation=cfg.relaxation)
    if cfg.method == "voita":
        info.update(l0_lambda=cfg.l0_lambda, selection=cfg.voita_selection)
    return selector, optimizer, scheduler, info


# -- scored methods ------------------------------------------------------------------------------

@dataclass
class Calibration:
    """What a scorer reads: the model with its gates, the calibration batches (a loader that can be
    iterated again), the task's loss, the run's config; `reduce` sums a tensor over processes and
    `gather` stacks one (None on one process). `key`: where `cached` keeps what a scorer computed
    from these weights, this data and these settings (None: nothing kept). `means`: each block's
    mean context with every head on, where the scorer measured them on its way (flap): what
    `--reconstruct bias` adds back, kept beside the scores so that it needs no pass of its own."""
    model: torch.nn.Module
    gates: object
    batches: object
    loss_fn: Callable
    cfg: PruneConfig
    reduce: Callable | None = None
    gather: Callable | None = None
    show_progress: bool = True
    key: str | None = None
    writes: bool = True  # the main process writes the cache
    agree: Callable = lambda read: read()  # the main process's reading for all (selection.from_main)
    hit: bool = False
    means: list[torch.Tensor] | None = None
    pass_key: str | None = None  # what a pass's record is kept under (`pass_key`)

    def progress(self, desc: str):
        return progress_bar(self.batches, desc=desc, leave=False, disable=not self.show_progress)

    def record(self, mask: torch.Tensor | None = None) -> PassRecord | None:
        """Where a scorer's pass (under `mask`: one of michel's rounds) keeps its sums as they grow
        (see PassRecord), in the scores cache; None with several processes (each would hold a part)."""
        if not self.pass_key or not self.writes or self.gather is not None:
            return None
        tag = "" if mask is None else "-" + hashlib.sha256(json.dumps(mask.tolist()).encode()).hexdigest()[:16]
        path = cache_root() / "scores" / f"{self.pass_key}{tag}.partial"
        if path.is_file():  # this run's own, to go on from: the newest, never dropped below
            os.utime(path)
        # the records of runs stopped and never started again: the newest few stay, for their runs
        drop_oldest(path.parent, keep=RECORDS_KEPT, pattern="*.partial", max_bytes=RECORDS_BYTES)
        return PassRecord(path)

    def cached(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """compute(), or what it gave for the same key before: a sweep scores once for all its ks."""
        path = cache_root() / "scores" / f"{self.key}.safetensors"

        def read():
            if not self.key or not path.is_file():
                return None
            try:
                entry = load_file(path)
                means = [entry[f"means.{i}"] for i in range(len(self.gates.sites))] if "means.0" in entry else None
                return entry["scores"], means
            except (OSError, SafetensorError, KeyError):
                return None  # a damaged entry is computed again
        entry = self.agree(read)
        if entry is not None:
            self.hit = True
            log.info("%s: scores of these weights on this calibration data, computed before (%s)",
                     self.cfg.method, path)
            value, self.means = entry
            return value
        value = compute()
        if self.key and self.writes:
            kept = {"scores": value}
            kept.update({f"means.{i}": mean for i, mean in enumerate(self.means or [])})
            try:
                with atomic_path(path) as tmp:
                    save_file({name: t.detach().cpu().contiguous() for name, t in kept.items()}, str(tmp))
                drop_oldest(path.parent, keep=SCORES_KEPT, max_bytes=SCORES_BYTES)
            except OSError as err:  # a cache that cannot be written only costs time
                log.info("cannot write the scores cache %s: %s", path, err)
        return value


# entries of the scores cache, the newest kept: a few kB each (flap's, with its float64 channel means, 140 kB
# for SmolLM2-135M, 1 MB for an 8B Llama), 256 MiB in all at most
SCORES_KEPT, SCORES_BYTES = 1000, 256 * 2**20
RECORDS_KEPT = 100  # records of passes stopped midway (`<key>.partial`), the newest kept
RECORDS_BYTES = 2 << 30  # and within this in all (taylor's: 106 MB for SmolLM2-135M), the newest always


# settings that do not change a scorer's output (the rest of the config is part of the cache key, but
# the options the run never reads, config.unused_settings): the budget, the output, evaluation and
# training only, and the model's name (the digest of its weights and files stands for it)
NOT_SCORING = ("k", "k_per_kind", "seed", "output_dir", "overwrite", "reconstruct", "save_format", "allocation",
               "uniform_from", "target_params", "target_kv_cache", "target_speedup", "at_batch_size", "at_length",
               "at_new_tokens", "model", "eval_files", "max_eval_examples", "select_by", "beam",
               "generation_batch_size", "eval_batch_size", "report_to", "checkpoint_every", "epochs", "lr",
               "weight_decay", "warmup_ratio", "max_grad_norm")
# the code a scorer's (or a fit's) result comes from beside its own: the gates, the sites and the tasks' losses
SHARED_CODE = ("gates.py", "sites.py", "tasks/*.py")


def _settings_in_key(cfg) -> dict:
    unused = unused_settings(dataclasses.asdict(cfg))
    return {name: value for name, value in dataclasses.asdict(cfg).items()
            if name not in NOT_SCORING and name not in unused}


def _code(*own: Path) -> list[Path]:
    package = Path(scoring.__file__).parent.parent
    return [*own, *sorted(path for pattern in SHARED_CODE for path in package.glob(pattern))]


def pass_key(cfg, model_digest: str, calibration_digest: str) -> str | None:
    """The key of what one scoring pass computes: the methods' code, the weights' and the calibration
    data's digests and every setting but NOT_SCORING; the scores cache's key for every method but
    michel, whose scores change with each round's mask (its passes' records add the mask). None for
    random, which scores nothing."""
    if cfg.method not in SCORERS:
        return None
    settings = _settings_in_key(cfg)
    settings.pop("ablation", None)  # in the key only where it changes the scores
    if ablation_in_effect(dataclasses.asdict(cfg)) == "mean":
        settings["ablation"] = "mean"
    # every file of methods/: scorers share code (fisher's gradients are michel's)
    return _cache_key(_code(*sorted(Path(scoring.__file__).parent.glob("*.py"))), model_digest, calibration_digest,
                      settings)


def fit_key(cfg, model_digest: str, calibration_digest: str, mask: torch.Tensor, mode: str) -> str:
    """The key of a reconstruction's fits per block (`--reconstruct rescale` or `both`): its code, the
    weights' and the calibration data's digests, the heads kept and every setting but NOT_SCORING."""
    settings = {**_settings_in_key(cfg), "mask": mask.tolist(), "reconstruct": mode}
    code = _code(Path(scoring.__file__).parent.parent / "reconstruction.py", Path(scoring.__file__))
    return _cache_key(code, model_digest, calibration_digest, settings)


def _cache_key(code_files, model_digest: str, calibration_digest: str, settings: dict) -> str:
    code = hashlib.sha256()
    for path in code_files:
        code.update(path.read_bytes())
    key = [code.hexdigest(), model_digest, calibration_digest, settings]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


# the scorer of method m is `score` in methods/m.py (random: a draw, no scores)
SCORERS: dict[str, Callable] = {name: importlib.import_module(f"{__package__}.methods.{name}").score
                                for name in ("michel", *SCORED)}


def calibration_set(cfg, task, data, tokenizer, train_set, processes: int = 1):
    """The calibration data: the training split of --calibration-dataset (else the pruning data,
    `train_set`), its first --calibration-examples; with several processes, cut to whole batches of
    all of them (see `whole_batches`)."""
    if cfg.calibration_dataset:
        # a copy set by hand, not dataclasses.replace: that checks the config again, which a budget a
        # target worked out (now in it beside the target) fails
        settings = copy.copy(cfg)
        settings.dataset, settings.eval_files = cfg.calibration_dataset, None
        other = task.load_data(settings)
        for name in ("label_names", "languages"):  # the loss of label- or target-reading methods needs them equal
            if getattr(other, name, None) != getattr(data, name, None):
                raise ConfigError(f"--calibration-dataset {cfg.calibration_dataset}: its {name.replace('_', ' ')} "
                                  f"({getattr(other, name, None)}) are not the pruning data's ({getattr(data, name, None)})")
        train_set = task.prepare(other, tokenizer, cfg)[0]
    if cfg.calibration_examples is not None and cfg.calibration_examples < len(train_set):
        train_set = Subset(train_set, range(cfg.calibration_examples))
    return whole_batches(train_set, cfg.batch_size, processes)


def whole_batches(dataset, batch_size: int, processes: int):
    """`dataset` cut to a whole number of batches of every process: Accelerate fills the last ones
    with examples from the start, which the sums over processes of the scores, the means and the
    reconstruction would count twice."""
    if processes == 1:
        return dataset
    keep = len(dataset) - len(dataset) % (batch_size * processes)
    if keep == 0:
        raise ConfigError(f"{len(dataset)} calibration examples are fewer than a batch for each of the "
                          f"{processes} processes ({batch_size} each): give more, or a smaller --batch-size")
    if keep < len(dataset):
        log.info("calibration: the first %d of %d examples, whole batches for the %d processes", keep,
                 len(dataset), processes)
        return Subset(dataset, range(keep))
    return dataset


def from_main(acc, read: Callable):
    """`read()` on the main process, its value given to every process (a cache read, a timing):
    processes that decided apart (each machine its own cache) would pair their collectives wrongly."""
    value, refusal = None, None
    if acc.is_main_process:
        try:
            value = read()
        except HeadpruneError as err:  # every process refuses with it (not one waiting for the others)
            refusal = err
    if acc.num_processes > 1:
        value, refusal = broadcast_object_list([value, refusal])
    if refusal is not None:
        raise refusal
    return value


def process_sum(acc):
    """Sums a tensor over the processes (on the CPU after); None on one process: nothing to sum."""
    if acc.num_processes == 1:
        return None
    return lambda t: acc.reduce(t.to(acc.device), "sum").cpu()


def method_options(cfg) -> dict:
    """The method's own options (`config.METHOD_OPTIONS`), for results.json."""
    return {name: getattr(cfg, name) for name in METHOD_OPTIONS.get(cfg.method, ())}


def choose_by_scores(cfg, task, acc, model, gates, calibration, collate, evaluate_with, digests: tuple[str, str],
                     rounds_done=None, save_rounds=None, metrics_unpruned=None, on_means=None):
    """Keep the top k (k_g of each group) by the method's scores on the calibration data (random:
    none); michel in rounds, with the metrics after each (its curve). Returns the mask, the scores
    to show (michel: the round in which a head went), what to record, and the method's step after
    the top k or None (fisher's rearrangement of the heads within each layer, its count kept: the
    recipe applies it once --allocation or a --target-* budget has set the counts). `rounds_done`: michel's
    rounds of an interrupted run (their masks, scores and metrics), reused; `save_rounds(rounds)`
    is called with all of them after each new one (a checkpoint). `metrics_unpruned`: evaluate_with(every
    head), measured already (michel's first round). `on_means(means)`: given each block's mean context
    where the scorer measured them (flap; see `Calibration`). `digests`: of the model and of the
    calibration data, which key its scores in the cache."""
    budget = as_groups(gates.num_heads, cfg.k, budget_of(cfg, gates))
    info = method_options(cfg)
    if cfg.method == "random":
        mask = random_mask(gates.num_heads, cfg.k, cfg.seed, budget)
        return mask, mask, info, None
    loader = acc.prepare(DataLoader(calibration, batch_size=cfg.batch_size, collate_fn=collate))
    key = pass_key(cfg, *digests)
    run = Calibration(model, gates, loader, task.loss, cfg, reduce=process_sum(acc),
                      gather=acc.gather if acc.num_processes > 1 else None, show_progress=acc.is_local_main_process,
                      key=None if cfg.method == "michel" else key, pass_key=key, writes=acc.is_main_process,
                      agree=lambda read: from_main(acc, read))
    info["calibration_examples"] = len(calibration)
    unit = UNIT_NAMES[gates.sites[0].unit]
    # --activation-checkpointing: michel's, fisher's and taylor's backward passes recompute the layers
    with scoring_precision(acc, cfg.method), \
            activation_checkpointing(acc.unwrap_model(model), checkpoints_activations(vars(cfg))):
        if cfg.method == "michel":
            mask, order, curve = _rounds(run, budget, evaluate_with, task.metric, rounds_done, save_rounds,
                                         metrics_unpruned)
            info.update(scoring_passes=len(curve) - 1 if cfg.michel_exact else 1, curve=[
                {"heads": e["heads"], "metrics": e["metrics"], "pruned_now": [gates.heads[i] for i in e["pruned_now"]]}
                for e in curve])
            return mask, order, info, None
        scores = SCORERS[cfg.method](run, torch.ones(gates.num_heads))
    mask = per_group(hard_top_k, scores.values, budget)
    if run.means is not None and on_means is not None:
        on_means(run.means)
    info["scoring_passes"] = 0 if run.hit else 1
    info["scores_from_cache"] = run.hit
    log.info("%s: scored %d %s on %d calibration examples", cfg.method, gates.num_heads, unit, len(calibration))
    return mask.float(), scores.values.float(), info, scores.refine


def scoring_precision(acc, method: str):
    """--mixed-precision for a scorer's passes: Accelerate's autocast (a model with nothing to train
    is not `prepare`d, so its forward is not wrapped); but under fp16 the gradient scorers compute in
    float32, since with no loss scaler their small gradients would underflow to zero."""
    if acc.mixed_precision == "fp16" and method in BACKWARD_SCORED:
        if acc.native_amp:
            log.info("%s scores in float32: fp16 gradients without a loss scaler would underflow", method)
        return contextlib.nullcontext()
    return acc.autocast()


def _rounds(run, budget, evaluate_with, metric: str, rounds_done=None, save_rounds=None, metrics_unpruned=None):
    """Michel et al.'s loop: mask the `--michel-step` lowest-scoring heads still on, evaluate, score
    again under the new mask (--michel-exact), down to the budget. What an interrupted run scored
    and evaluated under a mask (`rounds_done`) is reused, not computed again; so is the unpruned
    model's metric where the run measured it before (`metrics_unpruned`)."""
    cfg, gates = run.cfg, run.gates
    keep = sum(cfg.k_per_kind) if cfg.k_per_kind else cfg.k
    rounds = progress_bar(total=math.ceil((gates.num_heads - keep) / cfg.michel_step), desc="michel rounds",
                          disable=not run.show_progress)
    done = {tuple(r["mask"]): r for r in rounds_done or []}  # mask -> {"mask", "scores", "metrics"}
    if done:
        log.info("michel: resuming with %d masks scored or evaluated before", len(done))
    if metrics_unpruned is not None:
        every_head = [1.0] * gates.num_heads
        done.setdefault(tuple(every_head), {"mask": every_head}).setdefault("metrics", metrics_unpruned)

    def remembered(mask, part: str, compute):
        entry = done.setdefault(tuple(mask.tolist()), {"mask": mask.tolist()})
        if part not in entry:
            value = compute()
            entry[part] = value.tolist() if torch.is_tensor(value) else value
            if save_rounds is not None:
                save_rounds(list(done.values()))
        return entry[part]

    def evaluate_round(mask):
        metrics = remembered(mask, "metrics", lambda: evaluate_with(mask))
        heads = int(mask.sum())
        rounds.set_postfix(heads=heads, **{n: f"{v:.4f}" for n, v in metrics.items()}, refresh=False)
        if heads < gates.num_heads:
            rounds.update()
        log.info("michel round %d: %d heads left, %s %s", rounds.n, heads, metric, metrics)
        return metrics

    def importance(mask):
        return torch.tensor(remembered(mask, "scores", lambda: SCORERS["michel"](run, mask).values),
                            dtype=torch.float64)

    curve = iterative_pruning(gates.num_heads, cfg.michel_step, cfg.k, importance, evaluate_round,
                              exact=cfg.michel_exact, budget=budget)
    rounds.close()
    mask = curve[-1]["mask"]
    # rank for the heat map: heads pruned later score higher; the kept ones highest
    order = torch.zeros(gates.num_heads)
    for rank, entry in enumerate(curve[1:], start=1):
        order[entry["pruned_now"]] = rank
    order[mask.bool()] = len(curve)
    return mask, order, curve
