"""The comparison: methods x modes x budgets x seeds on one model and data set, in one command.

Every run is an ordinary `prune` run in its own folder (`<method>-<mode>-k<k>-s<seed>`); a run
whose folder holds results is not run again, and one that was interrupted resumes. Michel et al.
is deterministic and yields every budget from one run (`michel-pipelined-s<seed>`, pruned down to
the smallest k); the other scored methods are deterministic too (one seed, one run a k). Random
heads and the scored methods train nothing: they run pipelined only. At the end:
sweep.csv and sweep.md (one row per run and k, the metric on every evaluation split), summary.md
(per split: mean, standard error and spread over seeds, compute and time per method), sweep.png
(metric against kept heads on the reported split) and report.md linking them. Choose settings on
the validation split and report the test split (the default), so the choice does not flatter them.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import gc
import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from .budget import budget_units, speed_units
from .config import (GATED_METHODS, SCORED, SHRINKING, TARGETS, PruneConfig, SweepConfig, ablation_in_effect,
                     checkpoints_activations, default_of, reads_calibration, targeted, unused_settings)
from .checkpoint import checkpoint_config
from .digests import digest_of_rows, run_inputs
from .errors import ConfigError, OutputExistsError, first_line
from .latency import latency_table
from .measuring import is_generator
from .outputs import RESULTS, atomic_path, check_not_inside, checkpoint_folder, hold_folder, settle_held
from .pruning import with_pruned_shapes
from .recipes import check_split, input_paths, load_for_run, prune, timed_length
from .report import plot_sweep, readable
from .selection import calibration_set, check_budget, from_main
from .sites import UNIT_NAMES, find_sites
from .tasks import get_task
from .train import changed_settings, describe_changes

log = logging.getLogger("headprune")

DETERMINISTIC = ("michel", *SCORED)  # one seed is enough
UNTRAINED = ("michel", "random", *SCORED)  # pipelined only


def planned_runs(cfg: SweepConfig) -> list[PruneConfig]:
    prune_fields = {f.name for f in dataclasses.fields(PruneConfig)}
    base = {name: getattr(cfg, name) for name in prune_fields}
    settle = {"joint": cfg.settle_fraction, "pipelined": None}  # frozen weights: nothing to settle
    runs = []
    for method in cfg.methods:
        for mode in cfg.modes:
            if method in UNTRAINED and mode == "joint":
                log.info("%s trains nothing: no joint runs", method)
                continue
            # the settings of this method and mode; the options it never reads (another method's: some
            # would be refused) at their defaults
            settings = {**base, "method": method, "mode": mode, "overwrite": False,
                        "model": cfg.model if mode == "pipelined" else cfg.pretrained_model,
                        "settle_fraction": settle[mode],
                        "shrink_fraction": cfg.shrink_fraction if method in SHRINKING else None,
                        "ablation": cfg.ablation if method in GATED_METHODS and mode == "pipelined" else "default",
                        "pruning_loss": cfg.pruning_loss if method not in UNTRAINED and mode == "pipelined" else "label",
                        "activation_checkpointing": checkpoints_activations({**base, "method": method, "mode": mode})}
            settings.update({name: default_of(PruneConfig.__dataclass_fields__[name])
                             for name in unused_settings(settings)})
            seeds = cfg.seeds[:1] if method in DETERMINISTIC else cfg.seeds
            # michel: one curve through every k; voita with its threshold keeps what it keeps, whatever k
            one_k = method == "michel" or (method == "voita" and cfg.voita_selection == "threshold")
            budgets = (target_budgets(cfg) or ([{"k": None}] if cfg.k_per_kind else  # one budget per kind: one run
                       [{"k": k} for k in ([min(cfg.ks)] if one_k else cfg.ks)]))
            for budget in budgets:
                for seed in seeds:
                    name = (f"{method}-{mode}-s{seed}" if method == "michel" and budget.get("k")
                            else f"{method}-{mode}-{budget_name(budget, cfg.k_per_kind)}-s{seed}")
                    runs.append(PruneConfig(**{**settings, **budget, "seed": seed,
                                               "output_dir": str(Path(cfg.output_dir) / name)}))
    return runs


def target_budgets(cfg: SweepConfig) -> list[dict]:
    """One run's budget per value of the sweep's target (--target-speedup 1.2 1.4 ...), if it has one;
    --ks is then not used (each method ends with the units that fit)."""
    for name in TARGETS:
        if getattr(cfg, name):
            return [{"k": None, "k_per_kind": None, **{other: None for other in TARGETS}, name: value}
                    for value in getattr(cfg, name)]
    return []


def budget_name(budget: dict, k_per_kind: list | None = None) -> str:
    """A run folder's budget: k12, k4-6-8 (per kind), speedup1.4, kv0.5, params0.8 (or params1.2e+08)."""
    if not targeted(budget):
        return f"k{budget['k']}" if budget["k"] is not None else "k" + "-".join(map(str, k_per_kind))
    name, value = next((n, budget[n]) for n in TARGETS if budget.get(n) is not None)
    return {"target_speedup": "speedup", "target_kv_cache": "kv", "target_params": "params"}[name] + f"{value:g}"


def headline_splits(metrics: dict) -> list[str]:
    """The splits with a headline metric (not "test chrF" and the like), in evaluation order."""
    return [name for name in metrics if " " not in name]


def report_split(metrics: dict, chosen: str | None) -> str:
    """The split the tables report: the one chosen, else the last evaluation split's headline
    (the test split after the validation split used for choosing settings; MNLI: mismatched)."""
    headlines = headline_splits(metrics)
    if chosen is not None and chosen not in headlines:
        raise ConfigError(f"--split {chosen!r}: the runs were evaluated on {', '.join(headlines)}")
    return chosen or headlines[-1]


def rows_of(results: dict, ks: list[int], folder: str) -> list[dict]:
    """Table rows of one run, one metric per evaluation split; a Michel run gives one row per k on
    its curve. `passes`: forward-backward passes over the pruning data that the run made to reach
    its k (trained methods: their epochs; Michel: one per importance estimate; random: none). A
    run with --reconstruct gives a row without it (its metrics before the fit) and one with it
    ("<method> + <mode>"), whose passes add the fit's forward passes over the calibration data."""
    seconds = round(sum(results["seconds"].values()), 1)
    mean_ablation = ablation_in_effect(results["config"]) == "mean"  # one more pass: the means, before training
    method = results["method"] + (" (mean ablation)" if mean_ablation else "")
    common = {"method": method, "mode": results["mode"], "seed": results["seed"],
              "seconds": seconds, "run": folder, **budget_labels(results)}
    reconstructed = []
    if "metrics_before_reconstruction" in results:  # one run gives the heads with and without the fit
        common["seconds"] = round(seconds - results["seconds"].get("reconstruct", 0.0), 1)
        reconstructed = [{**common, "method": f"{method} + {results['reconstruct']}", "seconds": seconds,
                          "k": results["k"], "passes": None,
                          **{split: results["metrics_pruned"][split] for split in headline_splits(results["metrics_pruned"])}}]
    if "curve" in results and "budget" not in results:  # (a target's run reports where it ended)
        exact = results.get("michel_exact", True)
        rows = [{**common, "k": e["heads"], "passes": mean_ablation + (estimates if exact else min(estimates, 1)),
                 **{split: e["metrics"][split] for split in headline_splits(e["metrics"])}}
                for estimates, e in enumerate(results["curve"]) if e["heads"] in ks]
    else:
        passes = mean_ablation + (0 if results["method"] == "random" else 1 if results["method"] in SCORED
                                  else len(results["curve"]) - 1 if "curve" in results else results["config"]["epochs"])
        metrics = results.get("metrics_before_reconstruction", results["metrics_pruned"])
        rows = [{**common, "k": results["k"], "passes": passes,
                 **{split: metrics[split] for split in headline_splits(metrics)}}]
    for row in reconstructed:  # the forward passes of the fit come on top of the selection's
        row["passes"] = max((r["passes"] for r in rows), default=0) + results["reconstruction_passes"]
    for row in rows + reconstructed:
        row.setdefault("budget", f"k={row['k']}")
        if isinstance(row["passes"], float) and row["passes"].is_integer():  # whole epochs: "2", as the others
            row["passes"] = int(row["passes"])
        row.setdefault("budget_value", row["k"])
    return rows + reconstructed


TARGET_LABELS = {"speedup": "{:g}x speed", "kv_cache_bytes_per_token": "{:g} of the KV cache",
                 "parameters": "{:,.4g} parameters", "parameters_fraction": "{:g} of the parameters"}


def budget_labels(results: dict) -> dict:
    """A targeted run's budget as the tables show it (the target as given, the predicted and the
    measured value); nothing for a run with --k (its rows are labelled by k)."""
    if "budget" not in results:
        return {}
    budget, config = results["budget"], results["config"]
    given = {"speedup": config.get("target_speedup"), "kv_cache_bytes_per_token": config.get("target_kv_cache"),
             "parameters": config.get("target_params")}[budget["target"]]
    label = "parameters_fraction" if budget["target"] == "parameters" and given <= 1 else budget["target"]
    return {"budget": TARGET_LABELS[label].format(given), "budget_value": given,
            "predicted": budget["predicted"], "measured": budget.get("measured")}


RESULT_KEYS = ("method", "mode", "seed", "k", "num_heads", "seconds", "config", "metrics_pruned", "metric")


def read_results(folder: Path) -> dict:
    """A finished run's results.json, checked enough to build the tables from it."""
    try:
        results = json.loads((folder / RESULTS).read_text())
        missing = [key for key in RESULT_KEYS if key not in results] if isinstance(results, dict) else ["all"]
        why = f"it lacks {', '.join(missing)}"
    except (OSError, ValueError) as err:
        missing, results, why = True, None, f"unreadable: {first_line(err)}"
    if missing:
        raise OutputExistsError(f"{folder / RESULTS} is damaged ({why}); delete the folder {folder} and run the "
                                "sweep again to redo that run")
    return results


def stale_runs(runs: list[PruneConfig], processes=None, now: InputsNow | None = None) -> dict[str, str]:
    """Finished or stopped runs whose recorded settings differ from the plan, or whose model and data
    differ from those the plan reads now (`now`): folder name -> what changed (a stopped one's
    checkpoint would be refused by its run, after the runs before it; so is one made by another
    number of `processes`, an Accelerate PartialState)."""
    now = now or InputsNow(processes)
    def settle():  # a run stopped while its files moved in: completed first, by one process
        for run in runs:
            settle_held(Path(run.output_dir))
    if processes is None:
        settle()
    else:
        from_main(processes, settle)  # (a refusal is every process's)
    stale = {}
    for run in runs:
        folder = Path(run.output_dir)
        made_by, inputs = None, {}
        if (folder / RESULTS).exists():
            results = read_results(folder)
            saved, inputs = results["config"], results.get("inputs") or {}
        elif checkpoint_folder(folder) is not None:
            saved, made_by, inputs = checkpoint_config(checkpoint_folder(folder), with_processes=True)
        else:
            continue
        changed = changed_settings(saved, run) or inputs_changed(inputs, run, now)  # (settings first: cheap)
        if made_by is not None and processes is not None and made_by != processes.num_processes:
            changed["processes"] = (made_by, processes.num_processes)
        if changed:
            stale[folder.name] = describe_changes(changed)
    return stale


def check_plan(cfg: SweepConfig, runs: list[PruneConfig], speeds: bool = True) -> None:
    """Every planned run's model, budget and folder, before the first run starts (`speeds`: a
    --target-speedup too, on the latency table, which this measures then; one process only)."""
    if (Path(cfg.output_dir) / RESULTS).exists():  # its report.md and tables would go beside that run's
        raise OutputExistsError(f"{cfg.output_dir} is a run's folder (it holds {RESULTS}): a sweep writes its "
                                "tables beside the folders of its runs; choose another --output-dir")
    if not runs:
        raise ConfigError(f"the sweep plans no runs ({', '.join(cfg.methods)} in {', '.join(cfg.modes)} mode: "
                          "michel, random and the scored methods run pipelined only)")
    if cfg.split is not None:  # the data's split names, now: the tables are written after every run
        check_split(cfg.split, get_task(cfg.task).load_data(cfg), "--split")
    models, skeletons, timed_models = {}, {}, {}
    for run in runs:
        if (run.model, run.mode) not in models:
            path, config, counts, units = get_task(cfg.task).inspect(
                run.model, require_finetuned=run.mode == "pipelined", unit=cfg.unit,
                attn_implementation=cfg.attn_implementation)
            models[(run.model, run.mode)] = counts, units, input_paths(run, path), config, path
            check_not_inside(Path(cfg.output_dir), models[(run.model, run.mode)][2])
        counts, units, inputs, config, path = models[(run.model, run.mode)]
        get_task(cfg.task).check_settings(run, config)
        is_targeted = targeted(vars(run))  # its k follows from the model
        check_budget(run, counts, is_targeted or run.method == "voita" and run.voita_selection == "threshold", units)
        check_not_inside(Path(run.output_dir), inputs)
        if run.method == "michel" and not is_targeted and not run.k_per_kind:  # one curve: each k a point of it
            total = sum(counts.values())
            missed = [k for k in cfg.ks if k > run.k and (total - k) % run.michel_step]
            if missed:
                raise ConfigError(f"--michel-step {run.michel_step}: Michel's curve falls from {total} {units} by "
                                  f"{run.michel_step} and passes no k = {', '.join(map(str, missed))}: give a step "
                                  f"that divides {', '.join(str(total - k) for k in missed)}")
        if run.target_params is not None or run.target_kv_cache is not None:  # a size nothing fits: refused now
            if run.model not in skeletons:  # shapes only, once a model
                record = getattr(config, "headprune", None) or {}
                with torch.device("meta"):
                    skeleton = get_task(cfg.task).auto_class.from_config(config)
                    if record.get("physical"):  # pruned before: the shapes it was saved with
                        with_pruned_shapes(skeleton, record, run.model)
                skeletons[run.model] = skeleton, find_sites(skeleton, cfg.unit)
            budget_units(run, *skeletons[run.model])
        if speeds and run.target_speedup is not None and PartialState().num_processes == 1:  # a speed nothing reaches
            if (run.model, run.mode) not in timed_models:  # loaded as the run loads it: the run reads the same table
                model = load_for_run(run, get_task(cfg.task), path, config, run.mode == "pipelined")[1]
                if run.at_new_tokens and not is_generator(model):
                    raise ConfigError("--at-new-tokens times generation: this model does not generate (drop it to "
                                      "time one forward pass)")
                timed_models[(run.model, run.mode)] = model.to(PartialState().device)
            model = timed_models[(run.model, run.mode)]
            table = latency_table(model, cfg.unit, run.at_batch_size, timed_length(run, model), model.device.type,
                                  run.at_new_tokens)
            speed_units(run, find_sites(model, cfg.unit), table)


def overwriting(run: PruneConfig) -> PruneConfig:
    """The run with --overwrite (a copy: dataclasses.replace would check the config again, and a run with
    a --target-* holds a placeholder k that the check refuses beside it)."""
    run = copy.copy(run)
    run.overwrite = True
    return run


def sweep(cfg: SweepConfig) -> list[dict]:
    with contextlib.ExitStack() as held:  # the sweep's folder, once its plan is checked
        return _sweep(cfg, held)


def _sweep(cfg: SweepConfig, held: contextlib.ExitStack) -> list[dict]:
    out = Path(cfg.output_dir)
    # torchrun's or accelerate's processes (one without them), made as the runs' Accelerator makes them
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    runs = planned_runs(cfg)
    check_plan(cfg, runs)  # fail now, not hours later
    # held by the main process for all: a second sweep on it would tidy (discard) this one's runs
    from_main(processes, lambda: held.enter_context(hold_folder(out)))
    instead = [name for name in (*TARGETS, "k_per_kind") if getattr(cfg, name)]
    if instead and cfg.ks != default_of(SweepConfig.__dataclass_fields__["ks"]):
        log.warning("--%s sets each run's budget: --ks %s is not used", instead[0].replace("_", "-"),
                    " ".join(map(str, cfg.ks)))
    now = InputsNow(processes)  # (loads the model and data only where there are runs to compare)
    stale = stale_runs(runs, processes, now)
    if stale and not cfg.overwrite:
        first = next(iter(stale))
        raise OutputExistsError(
            f"{out} holds {len(stale)} run(s), finished or stopped, made with other settings or from another model "
            f"or data (e.g. {first}: {stale[first]}); "
            "pass --overwrite to run them again with these settings, or choose another --output-dir")
    joining, others = runs_outside_the_plan(cfg, {Path(run.output_dir).name for run in runs}, now)
    del now
    free_memory()
    if joining:
        log.info("%d finished run(s) of %s made with these settings join the tables (e.g. %s)",
                 len(joining), out, joining[0][0])
    if others:  # the tables are rewritten: say so before they lose rows
        log.warning("%s holds %d finished run(s) made with other settings or inputs (e.g. %s): the tables leave them "
                    "out",
                    out, len(others), others[0])
    rows, finished, unpruned_metrics = [], [], None
    ks = [sum(cfg.k_per_kind)] if cfg.k_per_kind else cfg.ks  # the budgets a Michel curve is shown at
    gc.freeze()  # what the process held before the sweep is left out of free_memory's collections: each
    try:  # scans only what the runs made, fast in a large process (a test's, a notebook's)
        for i, run in enumerate(runs, start=1):
            folder = Path(run.output_dir)
            if folder.name in stale:
                log.info("[%d/%d] running %s again: other settings or inputs (%s)", i, len(runs), folder.name,
                         stale[folder.name])
                results = prune(overwriting(run), metrics_unpruned=unpruned_metrics)
            elif (folder / RESULTS).exists():
                log.info("[%d/%d] done already: %s", i, len(runs), folder.name)
                results = read_results(folder)
            else:
                log.info("[%d/%d] running %s", i, len(runs), folder.name)
                # this sweep's own run, stopped after some of its files and before its results, with no
                # checkpoint to resume: made again in its place
                leftover = folder.is_dir() and checkpoint_folder(folder) is None and any(folder.iterdir())
                results = prune(overwriting(run) if leftover else run, metrics_unpruned=unpruned_metrics)
            free_memory()
            rows += rows_of(results, ks, folder.name)
            finished.append(results)
            if results["mode"] == "pipelined" and unpruned_metrics is None:  # the same for every run
                unpruned_metrics = results["metrics_unpruned"]
    finally:  # a sweep stopped part-way still shows the runs it finished
        gc.unfreeze()
        for name, results in joining:  # a Michel curve: at this sweep's budgets and its own last one
            rows += rows_of(results, sorted({*ks, results["k"]}), name)
        if finished:
            if len(finished) < len(runs):
                log.warning("the sweep stopped after %d of %d runs: the tables show those", len(finished), len(runs))
            if processes.is_main_process:  # (every process has the same rows)
                write_outputs(cfg, out, rows, finished[-1], unpruned_metrics)
    return rows  # (a sweep whose first run was refused leaves no folder: hold_folder removes it)


def free_memory() -> None:
    """A finished run's models (held in reference cycles: Accelerate's and the gates') freed before the next
    run loads its own, not whenever Python's cycle collector next runs; and on a GPU, their memory
    handed back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


INPUT_NAMES = {"model": "the weights", "model files": "the model's files (config, tokenizer)",
               "training data": "the training data", "evaluation data": "the evaluation data",
               "calibration data": "the calibration data"}


class InputsNow:
    """The digests (`digests.run_inputs`) a run of the plan would record, from its model and data as
    they are now: the model loaded and the data tokenised once per model and mode (and the
    calibration data per calibration setting), and only for a sweep folder holding runs to compare."""

    def __init__(self, processes=None):
        self.processes, self.made = processes, {}

    def __call__(self, run: PruneConfig) -> dict:
        key = (run.model, run.mode)
        if key not in self.made:
            log.info("the finished and stopped runs' model and data against %s's now (%s): loading and tokenising "
                     "them once", run.model, run.mode)
            task = get_task(run.task)
            path, config, _, _ = task.inspect(run.model, require_finetuned=run.mode == "pipelined", unit=run.unit,
                                              attn_implementation=run.attn_implementation)
            data, model, tokenizer = load_for_run(run, task, path, config, run.mode == "pipelined")
            del model
            train_set, evals, _ = task.prepare(data, tokenizer, run)
            self.made[key] = run_inputs(run, path, train_set, evals), (task, data, tokenizer, train_set)
        inputs, (task, data, tokenizer, train_set) = self.made[key]
        if reads_calibration(vars(run)):
            setting = (*key, run.calibration_dataset, run.calibration_examples, run.batch_size)
            if setting not in self.made:
                processes = self.processes.num_processes if self.processes is not None else 1
                self.made[setting] = digest_of_rows(calibration_set(run, task, data, tokenizer, train_set, processes))
            inputs = {**inputs, "calibration data": self.made[setting]}
        return inputs


def inputs_changed(recorded: dict | None, run: PruneConfig, now: InputsNow) -> dict[str, tuple]:
    """{what: (then, now)} for each input a finished or stopped run recorded (`inputs` in its
    results.json or checkpoint) that differs from its model and data now (a model trained again in
    place, data edited since); a name a run of before did not record is not held against it."""
    names = [name for name in INPUT_NAMES if (recorded or {}).get(name) is not None]
    if not names:
        return {}
    current = now(run)
    return {INPUT_NAMES[name]: (str(recorded[name])[:12], str(current[name])[:12]) for name in names
            if current.get(name) is not None and current[name] != recorded[name]}


def runs_outside_the_plan(cfg: SweepConfig, planned: set[str], now: InputsNow | None = None
                          ) -> tuple[list[tuple[str, dict]], list[str]]:
    """The finished runs in the sweep's folder that it does not plan: those it would have made itself,
    given their method, mode, budget and seed, from the same model and data (folder name -> results; a
    sweep of one more method adds that method to the tables of the ones before it), and the names of
    the rest."""
    out = Path(cfg.output_dir)
    joining, others, now = [], [], now or InputsNow()
    for folder in sorted(out.iterdir()) if out.is_dir() else []:
        if folder.name in planned or not (folder / RESULTS).is_file():
            continue
        try:
            results = read_results(folder)
        except OutputExistsError:  # damaged: not this sweep's to judge
            others.append(folder.name)
            continue
        twin = twin_run(cfg, results)
        if twin is not None and Path(twin.output_dir).name == folder.name \
                and not changed_settings(results["config"], twin) \
                and not inputs_changed(results.get("inputs"), twin, now):
            joining.append((folder.name, results))
        else:
            others.append(folder.name)
    return joining, others


def twin_run(cfg: SweepConfig, results: dict) -> PruneConfig | None:
    """The run this sweep would plan for a finished run's method, mode, budget and seed (None: none)."""
    saved = results["config"]
    budget = {name: [saved[name]] if saved.get(name) is not None else None for name in TARGETS}
    budget["k_per_kind"] = saved.get("k_per_kind")
    if saved.get("k") is not None:
        budget["ks"] = [saved["k"]]
    try:
        runs = planned_runs(dataclasses.replace(cfg, methods=[results["method"]], modes=[results["mode"]],
                                                seeds=[results["seed"]], **budget))
    except (ConfigError, ValueError):
        return None
    return runs[0] if len(runs) == 1 else None


def write_outputs(cfg: SweepConfig, out: Path, rows: list[dict], results: dict, unpruned_metrics: dict | None) -> None:
    """Tables, summary, plot and report of the rows so far (`results`: any one run's, for the
    splits, the metric and the model's head count)."""
    splits = headline_splits(results["metrics_pruned"])
    reported = report_split(results["metrics_pruned"], cfg.split)
    summaries = {split: summary_table(rows, split, unpruned_metrics and unpruned_metrics[split])
                 for split in splits}
    write_tables(out, rows, splits, summaries)
    plot_sweep(out / "sweep.png", [{**r, "metric": r[reported]} for r in rows],
               unpruned_metrics and unpruned_metrics[reported], f"{cfg.model} on {cfg.dataset}",
               results["num_heads"], metric=f"{results['metric']} ({reported})",
               units=UNIT_NAMES[results.get("unit", "head")].split(" (")[0],
               log_scale=not get_task(cfg.task).higher_is_better)
    write_sweep_report(out, cfg, summaries, reported)


def write_tables(out: Path, rows: list[dict], splits: list[str], summaries: dict[str, str]) -> None:
    budget_columns = ["budget", "predicted", "measured"] if any("predicted" in r for r in rows) else []
    columns = ["method", "mode", *budget_columns, "k", "seed", *splits, "passes", "seconds", "run"]
    rows = sorted(rows, key=lambda r: (r["method"], r["mode"], r["budget_value"], r["k"], r["seed"]))
    with atomic_path(out / "sweep.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def cell(row, column):
        value = row.get(column)
        return (f"{value:.4f}" if column in splits else "" if value is None else
                readable(value) if isinstance(value, float) or column in ("predicted", "measured") else str(value))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    with atomic_path(out / "sweep.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text("\n".join(f"## {split}\n\n{table}" for split, table in summaries.items()))


def mean_cell(values: list[float]) -> str:
    """mean ± standard error of the mean (min-max) over seeds; one value alone as it is."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    stderr = statistics.stdev(values) / len(values) ** 0.5
    return f"{statistics.mean(values):.3f} ± {stderr:.3f} ({min(values):.3f}-{max(values):.3f})"


def summary_table(rows: list[dict], split: str, unpruned: float | None) -> str:
    """Per method and mode, one column per k: the metric on `split` over seeds (mean_cell); then
    the compute each run used (passes over the pruning data) and the time per method."""
    ks = [label for _, label in sorted({(r["budget_value"], r["budget"]) for r in rows})]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["mode"], r["budget"])].append(r)
    lines = ["| method | mode | seeds | " + " | ".join(ks) + " | passes over the "
             "pruning data | run time |", "|---|---|---|" + "---|" * len(ks) + "---|---|"]
    for method, mode in sorted({(r["method"], r["mode"]) for r in rows}):
        cells, seeds, runs, passes = [], 0, {}, {}
        for k in ks:
            group = groups.get((method, mode, k), [])
            seeds = max(seeds, len(group))
            runs.update({r["run"]: r["seconds"] for r in group})
            passes.update({k: r["passes"] for r in group})
            kept = sorted({r["k"] for r in group})  # a target's runs: the units that fit
            cells.append((mean_cell([r[split] for r in group]) if group else "") +
                         (f" [k {', '.join(map(str, kept))}]" if group and not k.startswith("k=") else ""))
        total = sum(runs.values())
        per_run = ("whole curve in one run" if method == "michel" and len(runs) == 1
                   else f"{total / max(1, len(runs)):.0f} s a run")
        distinct = sorted(set(passes.values()))
        compute = (f"{distinct[0]:g}" if len(distinct) == 1 else
                   ", ".join(f"{passes[k]:g} to {k}" for k in ks if k in passes))
        lines.append(f"| {method} | {mode} | {seeds} | " + " | ".join(cells) +
                     f" | {compute} | {total / 60:.1f} min ({per_run}) |")
    if unpruned is not None:
        lines.append(f"\nUnpruned model: {unpruned:.3f}.")
    return "\n".join(lines) + "\n\nMean ± standard error over seeds (min-max).\n"


def budgets_said(cfg: SweepConfig) -> str:
    for name in TARGETS:
        if getattr(cfg, name):
            return f"budgets --{name.replace('_', '-')} {' '.join(f'{v:g}' for v in getattr(cfg, name))}" + \
                (" (allocation uniform)" if cfg.allocation == "uniform" else "")
    return f"k per kind {cfg.k_per_kind}" if cfg.k_per_kind else f"k in {cfg.ks}"


def write_sweep_report(out: Path, cfg: SweepConfig, summaries: dict[str, str], reported: str | None) -> None:
    tables = "".join(f"### {split}{' (reported)' if split == reported else ''}\n\n{table}\n"
                     for split, table in summaries.items())
    text = (f"# Sweep: {', '.join(cfg.methods)} ({', '.join(cfg.modes)})\n\n"
            f"Model `{cfg.model}`, data `{cfg.dataset}`, pruning data: "
            + (f"the first {cfg.max_train_examples} training examples" if cfg.max_train_examples
               else "the training examples")
            + f", {cfg.epochs} epoch(s) for the methods that train; schedule {cfg.schedule}"
            + (" (the one each run used: `schedule` in its results.json)" if cfg.schedule == "default" else "")
            + f"; {budgets_said(cfg)}; seeds {cfg.seeds}.\n\n"
            f"![metric against kept heads](sweep.png)\n\n{tables}"
            "Every run: [sweep.md](sweep.md) ([sweep.csv](sweep.csv)); "
            "each run's folder has its own report.md.\n")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
