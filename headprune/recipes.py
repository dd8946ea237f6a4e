"""Runnable recipes: fine-tune a model for a task, prune its heads, and the demo that chains them.

The task (`--task`: text classification, translation, language modelling or image classification,
see headprune/tasks/) gives the data, the
model, the loss and the metric; everything here is the same for every task. Each recipe checks
everything it can (options, model config and architecture, budget, output folder, checkpoint,
data) before any long work starts, then trains, evaluates and writes its output folder (the final
files are staged and moved into place together, results.json last: outputs.finish_run):
  results.json      what was run and what it measured
  model/            the final model (save_pretrained folder with tokenizer)
  train_log.jsonl   loss, learning rate (temperature, penalty, heads on) every 10 steps or more often
  head_scores.json  prune only: every head's score (logit, gate or pruning round) and whether it was kept
  heads.png         prune only: heat map of kept heads (layer x head) with their scores
  training.png, report.md   prune only: training curves and a page that shows the run
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from .card import command_of, write_model_card
from .config import (DEMO_DIR, SCORED, TRAINED_METHODS, FinetuneConfig, PruneConfig, ablation_in_effect,
                     pruning_dropout_in_effect, reads_calibration, reconstruct_in_effect, targeted)
from .digests import (cached_metrics, digest_for_caches, digest_of_weights, folder_digest, metrics_key,
                      remember_metrics, run_inputs)
from .errors import ConfigError, OutputExistsError, first_line
from .budget import budget_units, check_reachable, fit, speed_units, uniform_allocation, uniform_mask
from .gates import attach_gates, detach_gates
from .latency import latency_table
from .measuring import is_generator, sequence_length, size_facts
from .outputs import (BEST, RESULTS, atomic_folder, cache_root, check_not_inside, check_output_dir, finish_run,
                      folder_bytes, hold_folder, remove_path, settle_held, settle_stopped_run, stage_folder, versions,
                      write_json, write_jsonl)
from .pruning import check_finite_weights, load_pruned, save_pruned, zero_pruned_heads
from .randomness import keeps_global_rng
from .reconstruction import keep_fits, mean_contexts, read_fits, reconstruct
from .selection import (attach_selector, calibration_set, check_budget, choose_by_scores, fit_key, from_main,
                        process_sum, pruning_loss)
from .report import plot_head_map, write_run_report
from .sites import UNIT_NAMES
from .tasks import get_task
from .train import (changed_settings, check_activation_checkpointing, check_inputs, describe_changes,
                    restore_checkpoint, resume_state, save_rounds, total_steps, train)

log = logging.getLogger("headprune")


# -- shared set-up -------------------------------------------------------------------------------

TRACKER_DIR = "tracker"  # --report-to tensorboard: the event files
STAGED_TRACKER = ".tracker.new"  # a run replacing an earlier one (--overwrite) writes its events here until it is done

@contextmanager
def timed(seconds: dict, phase: str):
    """Adds the block's time to `seconds[phase]`; yields a function that gives the seconds with
    this phase's time so far (what a checkpoint taken inside the block records)."""
    start = time.perf_counter()
    yield lambda: {**seconds, phase: round(seconds.get(phase, 0.0) + time.perf_counter() - start, 2)}
    seconds[phase] = round(seconds.get(phase, 0.0) + time.perf_counter() - start, 2)


def input_paths(cfg, model_path: str | None) -> dict[str, str | None]:
    """The run's inputs that may be local files or folders (what it must never write into)."""
    return {"input model": model_path, "dataset": cfg.dataset, "calibration dataset": getattr(cfg, "calibration_dataset", None),
            **{f"evaluation file {i}": f for i, f in enumerate(cfg.eval_files or [], start=1)}}


def _start(cfg, model_path: str, held: contextlib.ExitStack):
    """After the model's config was checked: the output folder (apart from the inputs, held by this
    run until `held` closes, writable, room for the model and a checkpoint), then any checkpoint to
    resume from."""
    out = Path(cfg.output_dir)
    check_not_inside(out, input_paths(cfg, model_path))
    acc = _accelerator(cfg, out)  # before the folder is made: a refusal leaves nothing behind
    from_main(acc, lambda: held.enter_context(hold_folder(out)))  # the main process holds it for all
    if acc.is_main_process:
        settle_stopped_run(out)
    acc.wait_for_everyone()
    resume = check_output_dir(out, cfg.overwrite, needed_bytes=2 * folder_bytes(model_path))
    state = resume_state(out, cfg, acc) if resume else None
    if not acc.is_main_process:  # one process speaks for all (its warnings too: every process has them)
        log.setLevel(logging.ERROR)
        transformers.logging.set_verbosity_error()
    if state is None and acc.is_main_process:  # a fresh start: events a stopped run left are not this run's
        remove_path(out / STAGED_TRACKER)
        if not (out / RESULTS).exists():  # (an earlier complete run's stay until this one completes)
            remove_path(out / TRACKER_DIR)
    if cfg.report_to != "none":
        acc.init_trackers(out.resolve().name, config={k: v if isinstance(v, (bool, int, float, str)) else str(v)
                                                      for k, v in asdict(cfg).items()})
    set_seed(cfg.seed)  # the new classifier's initialisation
    return out, state, acc


def _accelerator(cfg, out: Path) -> Accelerator:
    """Accelerate's state is one per process, its mixed precision set by the first run: a later run
    of the same process asking for another is refused in one line, not with Accelerate's traceback."""
    try:
        # the schedules count global steps (train.total_steps divides by the processes): stepped once a
        # step, not once per process as Accelerate would by default
        acc = Accelerator(mixed_precision=cfg.mixed_precision, step_scheduler_with_optimizer=False,
                          **tracker_settings(cfg, out))
        if cfg.mixed_precision != "no" and not acc.native_amp:  # fp16 on a CPU: Accelerate leaves it float32
            log.warning("--mixed-precision %s does nothing on %s (Accelerate does not autocast to it there): this "
                        "run computes in float32%s", cfg.mixed_precision, acc.device.type,
                        "; bf16 does autocast on CPU" if cfg.mixed_precision == "fp16" else "")
        return acc
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        from accelerate.state import AcceleratorState
        raise ConfigError(f"--mixed-precision {cfg.mixed_precision}: this process already runs Accelerate with "
                          f"{AcceleratorState().mixed_precision!r}, which is set once per process; run this in "
                          "a new process") from err


TRACKER_PACKAGES = {"tensorboard": ("is_tensorboard_available", "tensorboard or tensorboardX: pip install "
                                                             "'headprune[tensorboard]' (or pip install tensorboardX)"),
                    "wandb": ("is_wandb_available", "wandb: pip install wandb"),
                    "mlflow": ("is_mlflow_available", "mlflow: pip install mlflow")}


def tracker_settings(cfg, out: Path) -> dict:
    """Accelerate's tracker for --report-to, its files in out/tracker; refused at once without its package."""
    if cfg.report_to == "none":
        return {}
    import accelerate.utils
    check, package = TRACKER_PACKAGES[cfg.report_to]
    if not getattr(accelerate.utils, check)():
        raise ConfigError(f"--report-to {cfg.report_to} needs {package}")
    # beside an earlier run's events, which stay whole (as its results do) until this run is complete
    folder = STAGED_TRACKER if (out / RESULTS).exists() else TRACKER_DIR
    return {"log_with": cfg.report_to, "project_dir": str(out / folder)}


def load_for_run(cfg, task, path, config, require_finetuned: bool):
    """The data, model and tokenizer a run of `cfg` reads, checked (finite weights, --select-by's
    split), in --dtype, the tokenizer's length capped at the model's positions."""
    data = task.load_data(cfg)
    check_split(getattr(cfg, "select_by", None), data, "--select-by")  # now, not after the unpruned evaluation
    model, tokenizer = task.load_model(cfg, data, path, config, require_finetuned)
    if not (getattr(model.config, "headprune", None) or {}).get("physical"):  # (load_pruned checked those)
        check_finite_weights(model, repr(cfg.model))  # NaN weights would give NaN scores and metrics, or crash later
    if cfg.dtype != "auto":  # --dtype: loaded in it (tasks.weights_dtype); a model built from scratch too
        model.to(getattr(torch, cfg.dtype))
    if getattr(cfg, "activation_checkpointing", False):
        check_activation_checkpointing(model)
    positions = getattr(model.config, "max_position_embeddings", None)  # (relative positions, T5's: none)
    if cfg.task in ("classification", "translation") and isinstance(positions, int):
        tokenizer.model_max_length = min(tokenizer.model_max_length, positions)  # see tasks.base.token_limit
    return data, model, tokenizer


def _finish(acc, out: Path, results: dict, history: list) -> dict:
    """The run's log joins its staged files, and they all move into place with results.json (an
    earlier run's other files are removed then)."""
    in_place: tuple[str, ...] = ()
    if acc.trackers:
        metrics = results.get("metrics_pruned", results.get("metrics", {}))
        acc.log({f"final/{split}": value for split, value in metrics.items()}, step=results.get("steps"))
        for tracker in acc.trackers:  # (not acc.end_training: it ends the process group too, which a
            tracker.finish()          # program running another run after this one still needs)
        if (out / STAGED_TRACKER).exists():  # beside an earlier run's events: they give way with its files
            if acc.is_main_process:
                os.replace(out / STAGED_TRACKER, stage_folder(out) / TRACKER_DIR)
        else:
            in_place = (TRACKER_DIR,)
    if acc.is_main_process:
        if history:
            write_jsonl(stage_folder(out) / "train_log.jsonl", history)
        finish_run(out, results, in_place)
    acc.wait_for_everyone()
    log.info("results in %s", out / RESULTS)
    return results


def _common_results(cfg, task, data, seconds: dict, resumed_from: int | None) -> dict:
    return {"task": task.name, "model": cfg.model, "dataset": cfg.dataset, "metric": task.metric,
            **task.results(data),
            "train_examples": len(data.train), "eval_examples": {n: len(d) for n, d in data.evals.items()},
            "seed": cfg.seed, "resumed_from_step": resumed_from, "seconds": seconds,
            "versions": versions(), "config": asdict(cfg), "model_dir": "model"}


# -- keeping the best epoch ---------------------------------------------------------------------------

def check_split(name: str | None, data, option: str) -> None:
    """An option naming an evaluation split (`name`, or None: not given) names one of the data's."""
    if name is not None and name not in data.evals:
        raise ConfigError(f"{option} {name!r}: the evaluation splits are {', '.join(data.evals)}")


def best_epoch_keeper(cfg, task, acc, model, evals: dict, collate, out: Path, extra: dict):
    """With --select-by SPLIT: (on_epoch_end, restore). At the end of every epoch the model is
    evaluated on SPLIT (under the hard mask: model.eval() makes the selector hard); the trainable
    weights of the best epoch so far are written to out/best/ and the score to `extra`, which the
    checkpoints keep, so resuming keeps the choice. `restore()` loads the best weights back."""
    if not cfg.select_by:
        return None, lambda: None
    from safetensors.torch import load_file, save_file

    def on_epoch_end(epoch: int) -> None:
        score = task.evaluate(acc, model, {cfg.select_by: evals[cfg.select_by]}, collate, cfg)[cfg.select_by]
        best = extra.get("best")
        log.info("epoch %d: %s %s %.4f%s", epoch, cfg.select_by, task.metric, score,
                 "" if best is None else f" (best so far {best['score']:.4f}, epoch {best['epoch']})")
        if best is not None and (score <= best["score"] if task.higher_is_better else score >= best["score"]):
            return
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(model)
            weights = {n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}
            with atomic_folder(out / BEST) as tmp:
                save_file(weights, str(tmp / "weights.safetensors"))
        acc.wait_for_everyone()
        extra["best"] = {"epoch": epoch, "score": score}

    def restore() -> None:
        if extra.get("best"):
            acc.unwrap_model(model).load_state_dict(load_file(str(out / BEST / "weights.safetensors")), strict=False)
            log.info("keeping the weights of epoch %d (%s %s %.4f)", extra["best"]["epoch"], cfg.select_by,
                     task.metric, extra["best"]["score"])

    return on_epoch_end, restore


# -- fine-tuning ---------------------------------------------------------------------------------

@keeps_global_rng
def finetune(cfg: FinetuneConfig) -> dict:
    """Plain fine-tuning (or, for translation from scratch, training) of a model for the task:
    what pipelined pruning starts from."""
    with contextlib.ExitStack() as held:  # the output folder, from `_start` on (a refused run leaves none)
        return _finetune(cfg, held)


def _finetune(cfg: FinetuneConfig, held: contextlib.ExitStack) -> dict:
    task = get_task(cfg.task)
    path, config, _, _ = task.inspect(cfg.model, require_finetuned=False, attn_implementation=cfg.attn_implementation)
    task.check_settings(cfg, config)
    out, state, acc = _start(cfg, path, held)
    seconds: dict = dict(state["seconds"]) if state else {}
    with timed(seconds, "load"):
        data, model, tokenizer = load_for_run(cfg, task, path, config, require_finetuned=False)
        train_set, evals, collate = _prepare(task, data, tokenizer, cfg)
        inputs = run_inputs(cfg, path, train_set, evals)
        state = check_inputs(out, state, inputs, cfg)
        if state is None:
            seconds.clear()
        steps = total_steps(cfg, train_set, acc.num_processes)
        optimizer, scheduler = task.optimizer(cfg, model.parameters(), steps)
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        if state:
            restore_checkpoint(acc, state, model, optimizer, scheduler)
    log.info("fine-tuning %s on %d examples for %d steps", cfg.model, len(train_set), steps)
    extra = {**(state["extra"] if state else {}), "inputs": inputs}  # (a checkpoint of before it: recorded now)
    on_epoch_end, keep_best = best_epoch_keeper(cfg, task, acc, model, evals, collate, out, extra)
    with timed(seconds, "train"):
        history = train(acc, cfg, out, model, optimizer, scheduler, train_set, collate, loss_fn=task.loss,
                        resume_state=state, extra=extra, seconds=seconds, phase="train", desc="fine-tune",
                        on_epoch_end=on_epoch_end)
        keep_best()
    with timed(seconds, "evaluate"):
        metrics = task.evaluate(acc, model, evals, collate, cfg)
    log.info("%s: %s", task.metric, metrics)
    with timed(seconds, "save"):
        if acc.is_main_process:
            saved_model = stage_folder(out) / "model"  # moved into place with the results
            with atomic_folder(saved_model) as tmp:  # a kill leaves no half-written folder
                task.save(acc.unwrap_model(model), tokenizer, tmp)
            saved = {**inputs, "model": digest_of_weights(str(saved_model))}
            remember_metrics(metrics_key(saved, cfg, str(saved_model)), metrics)  # pruning it reuses them
    results = {"method": "none", "mode": "finetune", "metrics": metrics, "steps": steps,
               "selected_epoch": extra.get("best"),
               **_common_results(cfg, task, data, seconds, state and state["step"])}
    if acc.is_main_process:
        write_model_card(stage_folder(out) / "model", results, command_of("finetune", cfg))
    return _finish(acc, out, results, history)


# -- pruning -------------------------------------------------------------------------------------

@keeps_global_rng
def prune(cfg: PruneConfig, metrics_unpruned: dict | None = None) -> dict:
    """Keep `cfg.k` heads by any method, joint or pipelined; write the output folder.

    `metrics_unpruned`: the pipelined model's metrics if already known (a sweep measures them
    once), so that they are not evaluated again."""
    with contextlib.ExitStack() as held:  # the output folder, from `_start` on (a refused run leaves none)
        acc, out, results, history, timing = _prune(cfg, metrics_unpruned, held)
        if timing is not None:  # now that _prune's model is gone: two models in memory, not three
            with timed(results["seconds"], "measure_speedup"):
                _time_saved_model(cfg, acc, out, results["budget"], **timing)
        if acc.is_main_process:
            write_model_card(stage_folder(out) / "model", results, command_of("prune", cfg))
            write_run_report(stage_folder(out), results, history)
        return _finish(acc, out, results, history)


def _prune(cfg: PruneConfig, metrics_unpruned: dict | None, held: contextlib.ExitStack):
    """The run up to its saved model: (accelerator, output folder, results, training log, what
    `_time_saved_model` takes or None)."""
    threshold = cfg.method == "voita" and cfg.voita_selection == "threshold"
    if cfg.k < 1 and not threshold and not cfg.k_per_kind:
        raise ConfigError(f"k={cfg.k}: at least one head must be kept")
    pipelined = cfg.mode == "pipelined"
    if cfg.method not in TRAINED_METHODS and not pipelined:
        raise ConfigError(f"{cfg.method} prunes a fine-tuned model and trains nothing: use --mode pipelined")
    task = get_task(cfg.task)
    path, config, counts, units = task.inspect(cfg.model, require_finetuned=pipelined, unit=cfg.unit,
                                                 attn_implementation=cfg.attn_implementation)
    task.check_settings(cfg, config)
    is_targeted = targeted(vars(cfg))
    check_budget(cfg, counts, threshold or is_targeted, units)  # a target's k follows once the model is loaded
    out, state, acc = _start(cfg, path, held)
    seconds: dict = dict(state["seconds"]) if state else {}
    with timed(seconds, "load"):
        data, model, tokenizer = load_for_run(cfg, task, path, config, require_finetuned=pipelined)
        table = None
        if cfg.target_speedup is not None:  # timed before any gate is on it
            if cfg.at_new_tokens and not is_generator(model):
                raise ConfigError("--at-new-tokens times generation: this model does not generate (drop it to "
                                  "time one forward pass)")
            model.to(acc.device)  # timed on the main process; every process keeps the budget it gives
            table = from_main(acc, lambda: latency_table(model, cfg.unit, cfg.at_batch_size, timed_length(cfg, model),
                                                         acc.device.type, cfg.at_new_tokens))
        gates = attach_gates(model, cfg.unit)
        if is_targeted:  # the budget in units: what fits the target
            cfg = copy.copy(cfg)
            units = speed_units(cfg, gates.sites, table) if table else budget_units(cfg, model, gates.sites)
            if isinstance(units, list):  # a budget per kind (an encoder-decoder's cache)
                cfg.k_per_kind, units = units, sum(units)
            cfg.k = units
            started = state and state["config"]  # a resumed run trains on with the budget it started with
            if started and (started.get("k"), started.get("k_per_kind")) != (cfg.k, cfg.k_per_kind):
                log.warning("resuming with the budget this run started with, %s, not the %s that the target gives "
                            "now (a latency table measured again)", started.get("k_per_kind") or started.get("k"),
                            cfg.k_per_kind or cfg.k)
                cfg.k, cfg.k_per_kind = started.get("k"), started.get("k_per_kind")
            log.info("the budget keeps at most %s %s (before the dead heads of empty layers)",
                     f"{cfg.k_per_kind} (per kind)" if cfg.k_per_kind else cfg.k, UNIT_NAMES[gates.sites[0].unit])
            if not table:
                check_reachable(cfg, model, gates.sites)  # now, not after the training
        check_reconstruct(cfg, gates)
        train_set, evals, collate = _prepare(task, data, tokenizer, cfg)
        calibration = calibration_set(cfg, task, data, tokenizer, train_set, acc.num_processes) \
            if reads_calibration(vars(cfg)) else None
        inputs = run_inputs(cfg, path, train_set, evals, calibration)
        state = check_inputs(out, state, inputs, cfg)
        if state is None:
            seconds.clear()
        means = None
        if ablation_in_effect(vars(cfg)) == "mean":  # the scores learn on the model the bias makes
            means = _mean_contexts(cfg, acc, model, gates, calibration, collate, task.loss)
            gates.fill = [mean.float().to(acc.device) for mean in means]
        if pipelined:  # the fine-tuned weights stay as they are (dropout: --pruning-dropout)
            model.requires_grad_(False)
        if cfg.method in TRAINED_METHODS:
            optimizer, scheduler, info = attach_selector(cfg, task, model, gates, train_set, acc)
            model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
            if state:
                restore_checkpoint(acc, state, model, optimizer, scheduler)
        else:  # nothing to train: no DDP wrapper (it refuses a model without trainable weights)
            model, info = model.to(acc.device), {}

    def evaluate_with(mask):  # the heads removed (zero), whatever --ablation: before any reconstruction
        with gates.override(mask), gates.filled(None), acc.autocast():  # --mixed-precision, prepared or not
            return task.evaluate(acc, model, evals, collate, cfg)

    all_heads = torch.ones(gates.num_heads)
    extra = {**(state["extra"] if state else {}), "inputs": inputs}  # (a checkpoint of before it: recorded now)
    if pipelined and metrics_unpruned is not None:
        extra.setdefault("metrics_unpruned", metrics_unpruned)
    if pipelined and "metrics_unpruned" not in extra:  # the same weights and data: measured once
        key = metrics_key(inputs, cfg, path)
        extra["metrics_unpruned"] = from_main(acc, lambda: cached_metrics(key))  # one decision for all
        if extra["metrics_unpruned"] is None:
            with timed(seconds, "evaluate_unpruned"):
                extra["metrics_unpruned"] = evaluate_with(all_heads)
            if acc.is_main_process:
                remember_metrics(key, extra["metrics_unpruned"])
        else:
            log.info("unpruned %s of these weights on this data, measured before: %s", task.metric,
                     extra["metrics_unpruned"])
        log.info("unpruned %s: %s", task.metric, extra["metrics_unpruned"])

    history: list = []
    given = None  # the digest of the weights as given, where a scored method makes it (see below)
    log.info("%s %s: keeping %s of %d %s", cfg.mode, cfg.method, "those over 0.5" if threshold else
             f"{cfg.k_per_kind} (per kind)" if cfg.k_per_kind else cfg.k, gates.num_heads,
             UNIT_NAMES[gates.sites[0].unit])
    with timed(seconds, "prune") as so_far:
        if cfg.method in TRAINED_METHODS:
            selector = gates.selector
            on_epoch_end, keep_best = best_epoch_keeper(cfg, task, acc, model, evals, collate, out, extra)
            info["pruning_dropout"] = pruning_dropout_in_effect(vars(cfg))
            history = train(acc, cfg, out, model, optimizer, scheduler, train_set, collate,
                            loss_fn=pruning_loss(cfg, task, gates),
                            selector=selector, resume_state=state, extra=extra, seconds=seconds,
                            phase="prune", desc=f"{cfg.method} {cfg.mode}", on_epoch_end=on_epoch_end,
                            dropout=info["pruning_dropout"] == "on")
            keep_best()
            info["selected_epoch"] = extra.get("best")
            info["live_steps"] = extra.get("live_steps")
            selector.eval()
            # on the CPU, as the scored methods' (the budget's masks index with them; on a GPU the
            # selector's are on its device)
            mask, scores, refine = selector().detach().cpu(), selector.scores().cpu(), None
            gates.selector = None  # from here on the gates hold the final mask
            if cfg.method == "voita":
                info["heads_on_by_threshold"] = selector.heads_on()
        else:
            measured = []  # flap's scoring pass measures the mean contexts too: the bias reuses them
            # the weights as given (a scored run is pipelined): what keys the caches of scores and fits, digested
            # once (random reads no calibration data: nothing to key)
            if "calibration data" in inputs:
                given = digest_for_caches(acc.unwrap_model(model), folder_digest(inputs, cfg.model))
            mask, scores, info, refine = choose_by_scores(
                cfg, task, acc, model, gates, calibration, collate, evaluate_with, (given, inputs.get("calibration data")),
                rounds_done=extra.get("michel_rounds"), metrics_unpruned=extra["metrics_unpruned"] if pipelined else None,
                save_rounds=lambda rounds: save_rounds(acc, out, cfg, rounds, extra, so_far()), on_means=measured.append)
            means = measured[0] if means is None and measured else means
    chosen = mask.clone()
    gates.fill = None  # zero again: the reconstruction puts the means into the weights
    info["allocation"] = "uniform" if uniform_allocation(cfg, gates.sites) else "global"
    if info["allocation"] == "uniform":  # as many per layer (of a kind), the best of each layer
        mask = uniform_mask(gates.sites, scores, cfg.k_per_kind or cfg.k)
    if is_targeted:  # the lowest-ranked units go until the model, dead heads included, fits
        mask, info["budget"] = fit(cfg, acc.unwrap_model(model), gates.sites, mask, scores, table)
        info["allocation"] = info["budget"]["allocation"]  # the fit's: it spreads the count it reaches
        log.info("budget: %s %s (the whole model: %s): predicted %s with %d %s", info["budget"]["target"],
                 f"{info['budget']['target_value']:,.4g}", f"{info['budget']['original']:,.4g}",
                 f"{info['budget']['predicted']:,.4g}", info["budget"]["units"], UNIT_NAMES[gates.sites[0].unit])
    if refine is not None:  # fisher's rearrangement within each layer, once the counts per layer are set
        mask = refine(mask)
    if not pipelined:  # the jointly trained weights with every head on (before reconstruction changes them)
        with timed(seconds, "evaluate_unpruned"):
            extra["metrics_unpruned"] = evaluate_with(all_heads)
    bare = [site.output for site in gates.sites if site.output.bias is None]  # reconstruction may give them biases
    if reconstruct_in_effect(vars(cfg)) != "none":
        with timed(seconds, "evaluate_pruned"):
            info["metrics_before_reconstruction"] = evaluate_with(mask)
        log.info("before reconstruction: %s %s; --reconstruct %s on %d calibration examples", task.metric,
                 info["metrics_before_reconstruction"], reconstruct_in_effect(vars(cfg)), len(calibration))
        with timed(seconds, "reconstruct"):
            # a pipelined run's weights are those the means were measured on: the bias reuses them
            info.update(_reconstruct(cfg, task, acc, model, gates, mask, calibration, collate, inputs,
                                     means=means if pipelined else None, weights_as_given=pipelined, given=given))
    if "curve" in info and reconstruct_in_effect(vars(cfg)) == "none" and torch.equal(mask, chosen):
        metrics = info["curve"][-1]["metrics"]  # Michel's last round evaluated these heads of these weights
    else:
        with timed(seconds, "evaluate_pruned"):
            metrics = evaluate_with(mask)
    kept = gates.kept_heads(mask)
    kinds = list(counts)  # every kind of the original, one a model pruned before has emptied too
    log.info("kept %d %s; %s %s (unpruned %s)", len(kept), UNIT_NAMES[gates.sites[0].unit], task.metric, metrics,
             extra["metrics_unpruned"])
    timing = None  # --target-speedup's measurement on the saved model (after this function)
    with timed(seconds, "save"):
        if acc.is_main_process:
            size = _save_pruned(cfg, task, stage_folder(out), acc.unwrap_model(model), gates, tokenizer, mask, scores,
                                added=sum(o.bias.numel() for o in bare if o.bias is not None))
            if size:
                info["size"] = size
                if "budget" in info and table:  # timed on the smaller model itself, once this model is freed
                    timing = {"pruned_before": path if (getattr(config, "headprune", None) or {}).get("physical")
                              else None}
                elif "budget" in info:  # counted on it
                    info["budget"]["measured"] = size["pruned"].get(info["budget"]["target"])
                    log.info("budget: %s measured on the saved model: %s", info["budget"]["target"],
                             f"{info['budget']['measured']:,.4g}")
    results = {"method": cfg.method, "mode": cfg.mode, "k": len(kept), "num_heads": gates.num_heads,
               "layers": {kind: sum(site.kind == kind for site in gates.sites) for kind in kinds},
               "unit": gates.sites[0].unit,
               # a model pruned before is the baseline of every "unpruned" figure: said so in the reports
               **({"pruned_before": True} if any((getattr(config, name, None) or {}).get("kept_heads")
                                                 for name in ("headprune", "headprune_source")) else {}),
               "kept_per_kind": {kind: sum(h[0] == kind for h in kept) for kind in kinds},
               "kept_heads": kept, "metrics_pruned": metrics, "metrics_unpruned": extra["metrics_unpruned"],
               **info, **_common_results(cfg, task, data, seconds, state and state["step"]),
               "inputs": inputs}  # digests of the weights and data (as the resume checked): a sweep tells a model changed in place
    return acc, out, results, history, timing


def _time_saved_model(cfg, acc, out: Path, budget: dict, pruned_before: str | None) -> None:
    """--target-speedup: the saved model timed against the one the run started from (recorded in `budget`)."""
    acc.free_memory()  # a trained selector's prepared model and optimizer: the run's model goes
    budget["measured"] = measured_speedup(cfg, stage_folder(out) / "model", acc.device.type, pruned_before)
    log.info("budget: speedup measured on the saved model: %s", f"{budget['measured']:,.4g}")
    if budget["measured"] < cfg.target_speedup:  # timed: noise, or the table
        log.warning("the saved model measured %.3gx faster, under the --target-speedup %g that the latency table "
                    "predicted it to reach (%.3gx): timings vary from run to run; `headprune measure` times it at "
                    "more settings", budget["measured"], cfg.target_speedup, budget["predicted"])


def timed_length(cfg, model) -> int:
    """The sequence length --target-speedup times: --at-length, else --max-length up to the model's positions."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if cfg.at_length is not None:
        if isinstance(positions, int) and cfg.at_length > positions:
            raise ConfigError(f"--at-length {cfg.at_length}: longer than the model's {positions} positions")
        return cfg.at_length
    return min(cfg.max_length, positions) if isinstance(positions, int) else cfg.max_length


def measured_speedup(cfg, folder: Path, device: str, pruned_before: str | None = None) -> float:
    """The saved model against the model the run started from (the whole architecture, or
    `pruned_before`: the folder of a model pruned before, whose speed the target is relative to),
    taking turns on one random batch (as `headprune measure` times them)."""
    from .config import MeasureConfig
    from .measuring import load_models, time_forward_or_generation
    if pruned_before:
        pruned = load_pruned(folder, attn_implementation=cfg.attn_implementation).eval().to(device)
        models = {"original": load_pruned(pruned_before, attn_implementation=cfg.attn_implementation,
                                          dtype=pruned.dtype).eval().to(device), "pruned": pruned}  # (as the table timed it)
    else:
        models = load_models(MeasureConfig(pruned=str(folder), attn_implementation=cfg.attn_implementation, device=device))
    timings = time_forward_or_generation(models, cfg.at_batch_size, timed_length(cfg, models["pruned"]), cfg.at_new_tokens,
                                         10, 2, device, models["original"].config)
    return timings["original"]["median"] / timings["pruned"]["median"]


def check_reconstruct(cfg, gates) -> None:
    """A bias added by reconstruction must be saved where plain from_pretrained would drop it."""
    mode = reconstruct_in_effect(vars(cfg))
    if mode in ("bias", "both") and cfg.save_format == "zeroed" and \
            any(site.output.bias is None for site in gates.sites):
        raise ConfigError(f"--reconstruct {mode} adds a bias to attention output projections that "
                          "have none, which a model saved --save-format zeroed would lose on loading: use "
                          "--save-format physical (load it with headprune.load_pruned)")


def _prepare(task, data, tokenizer, cfg):
    """task.prepare, said in the log: tokenising a large file takes minutes before the first bar."""
    log.info("tokenising the data")
    start = time.perf_counter()
    train_set, evals, collate = task.prepare(data, tokenizer, cfg)
    log.info("data: %s training %s; %s (%.0f s)", f"{len(train_set):,}", task.examples(cfg),
             ", ".join(f"{split} {len(examples):,}" for split, examples in evals.items()), time.perf_counter() - start)
    return train_set, evals, collate


def _mean_contexts(cfg, acc, model, gates, calibration, collate, loss_fn) -> list[torch.Tensor]:
    """--ablation mean: each block's mean context on the calibration data (unpruned model)."""
    loader = acc.prepare(DataLoader(calibration, batch_size=cfg.batch_size, collate_fn=collate))
    model.to(acc.device)
    log.info("--ablation mean: each head's mean output on %d calibration examples (one pass)", len(calibration))
    with acc.autocast():  # (the means add up in float64)
        means = mean_contexts(model, gates, loader, loss_fn, reduce=process_sum(acc),
                              disable_progress=not acc.is_local_main_process)
    log.info("--ablation mean: a closed gate leaves its heads' mean output")
    return means


def _reconstruct(cfg, task, acc, model, gates, mask, calibration, collate, inputs, means=None,
                 weights_as_given=True, given: str | None = None) -> dict:
    """--reconstruct on the calibration data, folded into the model's weights. The fit of each block
    (rescale, both: two passes over the data a block) is kept in the cache as it is made, so that the
    same run started again after an interruption goes on from the first block not fitted: keyed by
    the run's `inputs` (`digests.run_inputs`: the calibration data; the model folder's digest where
    the `weights_as_given` are in one), else by the model in memory (a joint run's, trained here and
    resumed from its last checkpoint; a hub model's; `given`: its digest, where the scoring made it)."""
    loader = acc.prepare(DataLoader(calibration, batch_size=cfg.batch_size, collate_fn=collate))
    reduce = process_sum(acc)
    biased = sum(site.output.bias is not None for site in gates.sites)
    mode = reconstruct_in_effect(vars(cfg))
    key = None
    if mode in ("rescale", "both"):
        if given is None:
            folder = folder_digest(inputs, cfg.model) if weights_as_given else None
            given = digest_for_caches(acc.unwrap_model(model), folder)
        key = fit_key(cfg, given, inputs["calibration data"], mask, mode)
    path = cache_root() / "reconstruction" / f"{key}.json"
    done = from_main(acc, lambda: read_fits(path)) if key else None
    if done:
        log.info("reconstruct: %d blocks fitted before (a run stopped during its reconstruction), from %s",
                 len(done), path)
    on_block = (lambda fits: keep_fits(path, fits)) if key and acc.is_main_process else None
    with acc.autocast():  # the forward passes; the fit's sums are float64, which autocast leaves alone
        info = reconstruct(model, gates, mask, loader, task.loss, mode, reduce=reduce,
                           disable_progress=not acc.is_local_main_process, means=means, done=done, on_block=on_block)
    info.update(calibration_examples=len(calibration),
                output_biases_added=sum(site.output.bias is not None for site in gates.sites) - biased)
    return info


def _save_pruned(cfg, task, folder: Path, model, gates, tokenizer, mask, scores, added: int = 0) -> dict | None:
    """Saves (in `folder`: the run's stage) the model without the heads not kept; returns its size before and after
    (parameters, attention FLOPs, KV cache), None for --save-format zeroed (same shapes). `added`: the
    parameters of the output biases reconstruction gave it (the unpruned model had none)."""
    heads, kept, unit = gates.heads, gates.kept_heads(mask), cfg.unit  # before the heads go
    gated = gates.sites[0].unit  # what a gate prunes here: a head where each has its own keys and values
    detach_gates(model)
    length = sequence_length(model, cfg.max_length)  # an image model: its patches
    before = size_facts(model, unit, length)
    before["parameters"] -= added
    output_biases = added > 0
    record = {"method": cfg.method, "mode": cfg.mode}
    if reconstruct_in_effect(vars(cfg)) != "none":
        record["reconstruct"] = reconstruct_in_effect(vars(cfg))
    if output_biases:
        record["output_biases"] = True
    if cfg.save_format == "physical":
        save_pruned(model, folder / "model", kept, tokenizer, unit=cfg.unit, **record)
    else:
        zero_pruned_heads(gates.sites, mask)
        model.config.headprune = {"kept_heads": kept, "physical": False, "unit": cfg.unit, **record}
        with atomic_folder(folder / "model") as tmp:
            task.save(model, tokenizer, tmp)
    score_name = {"michel": "pruning_round", "random": "kept", **dict.fromkeys(SCORED, "score")}.get(cfg.method, "logit")
    write_json(folder / "head_scores.json", [
        {"kind": kind, "layer": layer, "head": head, score_name: score, "kept": bool(m)}
        for (kind, layer, head), score, m in zip(heads, scores.tolist(), mask.tolist())])
    plot_head_map(folder / "heads.png", heads, scores.tolist(), kept,
                  f"{cfg.method} {cfg.mode}: {len(kept)} of {len(heads)} {UNIT_NAMES[gated]} kept",
                  score_label=score_name.replace("_", " "), unit=gated)
    if cfg.save_format == "physical":
        return {"length": length, "unpruned": before, "pruned": size_facts(model, unit, length)}
    return None


# -- the demo ------------------------------------------------------------------------------------


DEMO_TRANSLATION_EPOCHS = 8.0  # about 20 minutes on 2 CPU cores

# The two offline demos: the settings of configs/rotten-tomatoes.yaml and configs/ding-de-en.yaml.
DEMOS = {
    "classification": dict(k=36, heads=72, finetune=dict(max_train_examples=4000, epochs=1.0, max_length=64)),
    "translation": dict(k=18, heads=36, finetune=dict(
        task="translation", model="scratch:transformer-small", dataset="offline:ding-de-en", vocab_size=8000,
        max_length=64, epochs=DEMO_TRANSLATION_EPOCHS, batch_size=64, lr=2e-3, warmup_steps=400,
        weight_decay=1e-4, dropout=0.3, beam=5, generation_batch_size=64, max_grad_norm=0.0,
        attn_implementation="sdpa")),
}


def demo(root: Path = DEMO_DIR, k: int | None = None, task: str = "classification") -> dict:
    """The default job on the offline assets, then DSP-pruned pipelined to k heads:
    classification: MiniLM-L6 fine-tuned on 4,000 Rotten Tomatoes snippets (72 heads, k=36);
    translation: a small Transformer trained from scratch on the Ding German-English pairs
    (36 heads, k=18). A phase whose results already exist is reused."""
    settings = DEMOS[task]
    k = settings["k"] if k is None else k
    if not 1 <= k <= settings["heads"]:  # before the fine-tuning, not after it
        raise ConfigError(f"--k {k}: the {task} demo's model has {settings['heads']} heads; keep 1 to "
                          f"{settings['heads']}")
    pruned_dir = root / f"dsp-pipelined-k{k}"
    fields = {f: v for f, v in settings["finetune"].items() if f not in ("model", "epochs", "lr", "warmup_steps")}
    cfg = PruneConfig(**{**fields, "model": str(root / "finetune" / "model"), "method": "dsp",
                         "mode": "pipelined", "k": k, "epochs": 1.0, "output_dir": str(pruned_dir)})
    base = FinetuneConfig(**settings["finetune"], output_dir=str(root / "finetune"))
    with hold_folder(root):  # (missing data: no empty demo folder either)
        return _demo(root, base, cfg, pruned_dir)


def _demo(root: Path, base: FinetuneConfig, cfg: PruneConfig, pruned_dir: Path) -> dict:
    for phase in (root / "finetune", pruned_dir):  # a phase stopped while its files moved in: completed
        settle_held(phase)
    if not (root / "finetune" / RESULTS).exists():
        finetune(base)
    else:
        log.info("reusing the trained model in %s", root / "finetune")
    if not (pruned_dir / RESULTS).exists():
        prune(cfg)
    else:
        log.info("reusing the pruned model in %s", pruned_dir)
        changed = changed_settings(_demo_results(pruned_dir).get("config", {}), cfg)
        if changed:  # kept, not overwritten: the user's results stay until they remove them
            log.warning("%s was made with other defaults (%s): remove it, or give another --output-dir, "
                        "to prune at today's", pruned_dir, describe_changes(changed))
    return _demo_results(pruned_dir)


def _demo_results(folder: Path) -> dict:
    try:
        results = json.loads((folder / RESULTS).read_text())
        if isinstance(results, dict):
            return results
        why = "not a JSON object"
    except (OSError, ValueError) as err:
        why = first_line(err)
    raise OutputExistsError(f"{folder / RESULTS} is damaged ({why}); delete {folder} and run the demo again")
