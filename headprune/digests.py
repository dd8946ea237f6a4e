"""What a run is made from, and what is measured once for it.

Digests of a model's weights and of the model-ready data say what a checkpoint was made from (a
resume from other inputs is refused) and key the cache of unpruned models' metrics: a sweep or a
second run on the same weights and evaluation data does not evaluate the whole model again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from .outputs import cache_root, write_json

log = logging.getLogger("headprune")

METRICS_KEPT = 500  # unpruned models' metrics kept in the cache (the newest)


def _cache_file() -> Path:
    return cache_root() / "unpruned-metrics.json"


def digest_of_weights(model_path: str | None) -> str | None:
    """sha256 of a local model folder's weight files; None for a hub id or a model from scratch."""
    files = sorted(Path(model_path).glob("*.safetensors")) if model_path and Path(model_path).is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


# the files of a model folder, beside its weights, that build or decode with the model: configs
# and tokenizers' (not the model card, an export, nor an evaluation's results kept beside it)
MODEL_FILES = ("config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
               "vocab.txt", "merges.txt", ".model", ".spm", ".tiktoken", "chat_template.jinja", "chat_template.json")


def digest_of_model_files(model_path: str | None) -> str | None:
    """sha256 of what a local model folder holds beside its weights, by name: config.json,
    generation_config.json, the tokenizer's files (an edited one builds, or decodes with, another
    model from the same weights); None for a hub id or a model from scratch. Not the model card."""
    if not model_path or not Path(model_path).is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(Path(model_path).iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name.endswith(MODEL_FILES):
            h.update(f"{f.name} {f.stat().st_size}\n".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def folder_digest(inputs: dict, name: str) -> str | None:
    """A local model folder's weights and the files beside them (`run_inputs`), as one digest; None
    where no folder holds the model (its `name` then stands for the weights)."""
    if not inputs.get("model") or inputs["model"] == name:
        return None
    return hashlib.sha256(json.dumps([inputs["model"], inputs.get("model files")]).encode()).hexdigest()


def digest_of_model(model) -> str:
    """sha256 of a model's weights as they are in memory (names, dtypes and bytes) and of its config
    (but its path): for weights no folder holds, a joint run's trained here or a hub model's."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        settings = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name} {tensor.dtype} {list(tensor.shape)}".encode())
        h.update(tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def digest_for_caches(model, folder: str | None) -> str:
    """What keys a cache of what was computed from a model: its folder's digest (`folder_digest`)
    where there is one, else the model in memory (a hub model's, whose name says nothing of what a
    run's seed gave its new classifier; weights trained in the run)."""
    return folder or digest_of_model(model)


def digest_of_data(splits: dict) -> str:
    """sha256 of the model-ready examples of every split, in name order."""
    h = hashlib.sha256()
    for name in sorted(splits):
        ds = splits[name]
        h.update(json.dumps([name, len(ds)]).encode())
        for start in range(0, len(ds), 10_000):
            h.update(json.dumps(ds[start:start + 10_000], sort_keys=True).encode())
    return h.hexdigest()


def run_inputs(cfg, model_path: str | None, train_set, evals: dict, calibration=None) -> dict:
    """What a checkpoint must have been made from to be resumed: digests of the model's weights
    (or its name) and of the files beside them, of the training and evaluation data and of the
    calibration data where the run reads some (Michel's rounds so far were scored on them)."""
    inputs = {"model": digest_of_weights(model_path) or cfg.model, "model files": digest_of_model_files(model_path),
              "training data": digest_of_data({"train": train_set}), "evaluation data": digest_of_data(evals)}
    if calibration is not None:
        inputs["calibration data"] = digest_of_rows(calibration)
    return inputs


def digest_of_rows(examples) -> str:
    """sha256 of model-ready examples, read by index (a list, a dataset or a torch Subset of one)."""
    h = hashlib.sha256()
    for start in range(0, len(examples), 1000):
        rows = [examples[i] for i in range(start, min(start + 1000, len(examples)))]
        h.update(json.dumps(rows, sort_keys=True, default=str).encode())
    return h.hexdigest()


def metrics_key(inputs: dict, cfg, model_path: str | None) -> str | None:
    """The unpruned metrics' cache key: the digests of the weights, of the files beside them (an
    edited config.json, fewer layers say, builds another model from the same weights; the generation
    config and the tokenizer change translations) and of the evaluation data, and the settings that
    change a score (task, attention kernel, beam, dtype, mixed precision, translation's generation
    batch); None for a model that is not a local folder."""
    if not inputs["model"] or inputs["model"] == cfg.model:  # no digest of the weights
        return None
    key = [cfg.task, cfg.attn_implementation, cfg.beam, inputs["model"], inputs["evaluation data"],
           f"model files {digest_of_model_files(model_path)}"]
    # the precision of the weights and of the arithmetic: named only when not the default
    key += [f"dtype {cfg.dtype}"] if getattr(cfg, "dtype", "auto") != "auto" else []
    # ("autocast": entries named "mixed" were measured without it when the method trained nothing)
    key += [f"autocast {cfg.mixed_precision}"] if getattr(cfg, "mixed_precision", "no") != "no" else []
    # translation: a batch's longest source bounds the length of every translation in it
    batch = getattr(cfg, "generation_batch_size", 32)
    key += [f"generation batch {batch}"] if cfg.task == "translation" and batch != 32 else []
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def _read_cache() -> dict:
    """The cache, or nothing of it where it is damaged: an entry that is not {split: number} is left
    out (computed again), never handed to a run that would crash on it after its work."""
    try:
        cache = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict):
        return {}
    return {key: value for key, value in cache.items() if isinstance(value, dict) and value and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values())}


def cached_metrics(key: str | None) -> dict | None:
    return _read_cache().get(key) if key else None


def remember_metrics(key: str | None, metrics: dict) -> None:
    if not key:
        return
    cache = _read_cache()
    cache.pop(key, None)  # the newest last: the oldest go first once the cache is full
    kept = list(cache.items())[-(METRICS_KEPT - 1):] if METRICS_KEPT > 1 else []
    try:
        write_json(_cache_file(), {**dict(kept), key: metrics})
    except OSError as err:  # a cache that cannot be written only costs time
        log.info("cannot write the metrics cache %s: %s", _cache_file(), err)
